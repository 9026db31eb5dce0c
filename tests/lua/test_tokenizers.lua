-- tests/lua/test_tokenizers.lua: nemo.tokenizers against transformers' CLIPTokenizer and
-- T5TokenizerFast on tests/golden/tokenizers (made by its make_golden.py): 19 prompts (ASCII,
-- white space runs, contractions, digits, punctuation, accents, full-width letters, ligatures,
-- CJK, emoji, special-token text, empty, over-long) tokenized as FLUX's pipeline calls them
-- (CLIP: max_length 77; T5: 32 and 64), with three T5 normalizer / pre-tokenizer layouts and a
-- byte-fallback model; then padding / truncation options, the batch tensors and errors. Exact:
-- every id must equal. A missing golden folder FAILS.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local fs = require "nemo.fs"
local golden = require "golden"
local tk = require "nemo.tokenizers"

local root, why = golden.case("tokenizers", "cases.json")
if not root then
    T.ok(false, "tokenizer golden cases: " .. tostring(why))
    T.done()
    os.exit(1)
end
local cases = json.decode(fs.read(root .. "/cases.json"))

local function eq(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end
local function check_all(name, tok, key, max_length, tokens_key)
    local bad = {}
    for i, c in ipairs(cases.cases) do
        local r = tok(c.prompt, {padding = "max_length", max_length = max_length, truncation = true})
        if not eq(r.ids[1], c[key]) then
            bad[#bad + 1] = string.format("case %d %q: got %s, expected %s", i, c.prompt:sub(1, 40),
                table.concat(r.ids[1], ","), table.concat(c[key], ","))
        end
        if tokens_key and c[tokens_key] and not eq(tok:tokenize(c.prompt), c[tokens_key]) then
            bad[#bad + 1] = string.format("case %d %q tokens: got %s, expected %s", i, c.prompt:sub(1, 40),
                table.concat(tok:tokenize(c.prompt), " "), table.concat(c[tokens_key], " "))
        end
    end
    T.ok(#bad == 0, string.format("%s: the input_ids of all %d prompts equal transformers' (%s)", name, #cases.cases,
        cases.transformers), table.concat(bad, "\n"))
end

-- ==== CLIP ====
local clip = tk.CLIPTokenizer.from_pretrained(root .. "/clip")
check_all("CLIPTokenizer, max_length 77", clip, "clip_input_ids", 77, "clip_tokens")
T.ok(rawequal(getmetatable(tk.from_pretrained(root .. "/clip")), tk.CLIPTokenizer), "from_pretrained picks CLIP for vocab.json + merges.txt")
local r = clip({"a photo of a cat", "a much longer prompt about a dog"}, {padding = "longest"})
T.ok(r.input_ids.shape[1] == 2 and r.input_ids.shape[2] == #r.ids[2] and r.input_ids.dtype == "int64",
    "a batch padded to the longest prompt: an int64 (2, L) tensor")
local m = r.attention_mask:tolist()
local short = 0
for _, v in ipairs(m[1]) do short = short + v end
T.ok(short == #clip:encode("a photo of a cat") and m[2][#m[2]] == 1, "attention_mask marks the real tokens")
T.is(r.ids[1][#r.ids[1]], clip.pad_id, "padding uses the pad token")
local long = string.rep("cat ", 200)
local lr = clip(long, {padding = "max_length", max_length = 77, truncation = true})
T.ok(#lr.ids[1] == 77 and lr.ids[1][1] == clip.bos_id and lr.ids[1][77] == clip.eos_id,
    "truncation keeps <|startoftext|> and <|endoftext|> at the ends of 77")
T.is(#clip(long, {padding = "longest"}).ids[1], 202, "without truncation a long prompt keeps all its tokens")
T.raises(function() clip({"a", "a b c"}) end, "need padding", "prompts of different lengths without padding: an error")
T.raises(function() clip("a", {padding = "max_len"}) end, "padding must be", "a bad padding value")
T.raises(function() clip("a", {maxlength = 3}) end, "unknown option 'maxlength'", "an unknown option")
T.raises(function() clip(42) end, "expected a prompt", "a number instead of a prompt")
T.raises(function() tk.CLIPTokenizer.from_pretrained(root) end, "holds neither", "a folder without CLIP files")

-- ==== T5 (Unigram) ====
local t5 = tk.T5Tokenizer.from_pretrained(root .. "/t5")
check_all("T5Tokenizer (transformers 5's tokenizer.json), max_length 64", t5, "t5_input_ids_64", 64, "t5_tokens")
check_all("T5Tokenizer, max_length 32 (truncated, </s> kept)", t5, "t5_input_ids_32", 32)
do
    local bad = {}
    for i, c in ipairs(cases.cases) do
        local r2 = t5(c.prompt, {padding = "max_length", max_length = 32, truncation = true})
        if not eq(r2.attention_mask:tolist()[1], c.t5_attention_mask_32) then bad[#bad + 1] = tostring(i) end
    end
    T.ok(#bad == 0, "T5Tokenizer: attention masks equal transformers'", table.concat(bad, ","))
end
local tj = json.decode(fs.read(root .. "/t5/tokenizer.json"))
local pc = tj.normalizer.type == "Precompiled" and tj.normalizer or tj.normalizer.normalizers[1]
local function variant(name)
    local v = cases.t5_variants[name]
    local copy = json.decode(fs.read(root .. "/t5/tokenizer.json"))
    copy.normalizer = v.normalizer
    for i, n in ipairs(copy.normalizer.normalizers) do
        if n.type == "Precompiled" then copy.normalizer.normalizers[i] = pc end
    end
    copy.pre_tokenizer = v.pre_tokenizer
    return tk.T5Tokenizer.new(copy, {model_max_length = 512})
end
check_all("T5Tokenizer, the 2023-24 layout (Precompiled + Replace ' {2,}', a lone Metaspace)", variant("legacy"),
    "t5_legacy_input_ids_64", 64, "t5_legacy_tokens")
check_all("T5Tokenizer, transformers 4.4x's layout (Strip right, runs of spaces to U+2581)", variant("strip"),
    "t5_strip_input_ids_64", 64)
do
    local bj = json.decode(fs.read(root .. "/t5_bytefallback/tokenizer.json"))
    bj.normalizer = pc
    local off = tk.T5Tokenizer.new(bj, {model_max_length = 512})
    T.ok(not off.byte_fallback, "a model with <0xXX> pieces but byte_fallback false (transformers' conversion)")
    check_all("T5Tokenizer, that model: unknown characters fuse into <unk>", off, "t5_bytefallback_input_ids_64", 64,
        "t5_bytefallback_tokens")
    bj.model.byte_fallback = true
    local on = tk.T5Tokenizer.new(bj, {model_max_length = 512})
    T.ok(on.byte_fallback, "byte_fallback true is read")
    check_all("T5Tokenizer with byte_fallback: unknown characters as <0xXX> byte tokens (tokenizers' ids)", on,
        "t5_bytefallback_on_input_ids_64", 64)
end
T.ok(rawequal(getmetatable(tk.from_pretrained(root .. "/t5")), tk.T5Tokenizer), "from_pretrained picks T5 for a Unigram tokenizer.json")
T.raises(function() tk.T5Tokenizer.from_pretrained(root .. "/clip") end, "has no tokenizer.json", "a folder without tokenizer.json")
do
    local bad = json.decode(fs.read(root .. "/t5/tokenizer.json"))
    bad.model.type = "WordPiece"
    T.raises(function() tk.T5Tokenizer.new(bad) end, "expected a Unigram model", "a tokenizer.json of another model type")
    local bad2 = json.decode(fs.read(root .. "/t5/tokenizer.json"))
    bad2.normalizer = {type = "NFD"}
    T.raises(function() tk.T5Tokenizer.new(bad2) end, "normalizer 'NFD' is not supported", "an unsupported normalizer is named")
    local bad3 = json.decode(fs.read(root .. "/t5/tokenizer.json"))
    bad3.normalizer = {type = "Replace", pattern = {Regex = "[a-z]+"}, content = ""}
    T.raises(function() tk.T5Tokenizer.new(bad3) end, "is not supported", "an unsupported Replace pattern is named")
end

T.done()
