-- lua/nemo/tokenizers/init.lua: the text tokenizers of the FLUX and Wan pipelines, without Python
-- (nemo.tokenizers):
--   CLIPTokenizer.from_pretrained(dir)   FLUX's `tokenizer` (vocab.json + merges.txt, or a
--                                        tokenizer.json holding a BPE model): byte-level BPE
--   T5Tokenizer.from_pretrained(dir)     FLUX's `tokenizer_2` (T5TokenizerFast) and Wan's
--                                        (UMT5): the Unigram model of dir/tokenizer.json
--   from_pretrained(dir)                 whichever of the two the folder holds
--   tok(prompts, {padding = "max_length" | "longest" | false, max_length =, truncation = true})
--       -> {input_ids = int64 (B, L) tensor, attention_mask = int64 (B, L), ids = {{...}, ...}}
--   tok:encode(text) -> ids (special tokens added), tok:tokenize(text) -> token strings
--
-- They follow Hugging Face tokenizers' pipelines as the pipelines' tokenizer files describe them
-- and equal transformers' CLIPTokenizer / T5TokenizerFast on tests/golden/tokenizers:
-- - CLIP: special tokens (<|startoftext|>, <|endoftext|>) are split out of the raw text first;
--   then runs of white space become one space, the text is lower-cased, split with CLIP's pattern
--   ('s|'t|'re|'ve|'m|'ll|'d|letters+|one digit|other non-space runs), each piece mapped to
--   GPT-2's byte alphabet and merged by BPE with the "</w>" word-end suffix; ids are wrapped in
--   <|startoftext|> ... <|endoftext|>, truncated to max_length and padded with the pad token.
-- - Unigram (T5): added tokens (</s>, <pad>, <extra_id_N>, ...) are split out first; the
--   normalizer chain of tokenizer.json runs (Precompiled: sentencepiece's nmt_nfkc character map,
--   read from its double-array trie; Replace; Strip; Lowercase), then its pre-tokenizers
--   (WhitespaceSplit, Metaspace with "\u{2581}"), each piece is segmented by Viterbi over the
--   vocabulary's log probabilities (an unknown character costs min score - 10 and consecutive
--   unknowns fuse into one <unk>, or become <0xXX> byte tokens with byte_fallback), and </s> is
--   appended (truncation keeps it).
-- Unicode: letters, digits, white space and lower case come from lua/nemo/tokenizers/unicode.lua
-- (Unicode 14, generated from Python's unicodedata). Not done: NFC recomposition before CLIP's
-- lower-casing (text is taken to be NFC already, as nearly all text is), and grapheme clusters are
-- approximated as a character plus its combining marks, variation selectors and ZWJ sequences.
local ffi = require "ffi"
local bit = require "bit"
local json = require "nemo.json"
local fs = require "nemo.fs"
local U = require "nemo.tokenizers.unicode"

local M = {}

-- ==== UTF-8 and Unicode properties ====

-- code points of s (invalid bytes are taken as Latin-1 characters, as a lenient decoder does)
local function codepoints(s)
    local out, i, n = {}, 1, #s
    while i <= n do
        local c = s:byte(i)
        local cp, len = c, 1
        if c >= 0xF0 and i + 3 <= n then
            cp = bit.bor(bit.lshift(bit.band(c, 0x07), 18), bit.lshift(bit.band(s:byte(i + 1), 0x3F), 12),
                bit.lshift(bit.band(s:byte(i + 2), 0x3F), 6), bit.band(s:byte(i + 3), 0x3F)); len = 4
        elseif c >= 0xE0 and i + 2 <= n then
            cp = bit.bor(bit.lshift(bit.band(c, 0x0F), 12), bit.lshift(bit.band(s:byte(i + 1), 0x3F), 6),
                bit.band(s:byte(i + 2), 0x3F)); len = 3
        elseif c >= 0xC0 and i + 1 <= n then
            cp = bit.bor(bit.lshift(bit.band(c, 0x1F), 6), bit.band(s:byte(i + 1), 0x3F)); len = 2
        end
        out[#out + 1] = cp
        i = i + len
    end
    return out
end

local function utf8(cp)
    if cp < 0x80 then return string.char(cp) end
    if cp < 0x800 then return string.char(0xC0 + bit.rshift(cp, 6), 0x80 + bit.band(cp, 0x3F)) end
    if cp < 0x10000 then
        return string.char(0xE0 + bit.rshift(cp, 12), 0x80 + bit.band(bit.rshift(cp, 6), 0x3F), 0x80 + bit.band(cp, 0x3F))
    end
    return string.char(0xF0 + bit.rshift(cp, 18), 0x80 + bit.band(bit.rshift(cp, 12), 0x3F),
        0x80 + bit.band(bit.rshift(cp, 6), 0x3F), 0x80 + bit.band(cp, 0x3F))
end
local function utf8_all(cps, i, j)
    local t = {}
    for k = i or 1, j or #cps do t[#t + 1] = utf8(cps[k]) end
    return table.concat(t)
end

-- membership in a flat {lo, hi, ...} range table, by binary search
local function in_ranges(r, cp)
    local lo, hi = 1, #r / 2
    while lo <= hi do
        local mid = math.floor((lo + hi) / 2)
        if cp < r[2 * mid - 1] then hi = mid - 1
        elseif cp > r[2 * mid] then lo = mid + 1
        else return true end
    end
    return false
end
local function is_letter(cp) return cp < 128 and ((cp >= 65 and cp <= 90) or (cp >= 97 and cp <= 122)) or
    (cp >= 128 and in_ranges(U.letter, cp)) end
local function is_number(cp) return (cp >= 48 and cp <= 57) or (cp >= 128 and in_ranges(U.number, cp)) end
local function is_space(cp) return cp == 32 or (cp >= 9 and cp <= 13) or (cp >= 128 and in_ranges(U.space, cp)) or
    (cp >= 28 and cp <= 31) end
local function is_extend(cp) return cp >= 0x300 and in_ranges(U.extend, cp) end
M._is_letter, M._is_number, M._is_space = is_letter, is_number, is_space

local function lower_cps(cps)
    local out = {}
    for _, cp in ipairs(cps) do
        if cp >= 65 and cp <= 90 then out[#out + 1] = cp + 32
        elseif cp >= 128 and U.lower[cp] then for _, c in ipairs(U.lower[cp]) do out[#out + 1] = c end
        else out[#out + 1] = cp end
    end
    return out
end

-- Splits text around the added (special) tokens: a list of {text = s} and {special = id}. The
-- longest token wins at a position, as tokenizers' AddedVocabulary does.
local function split_added(text, added)
    if #added == 0 or text == "" then return {{text = text}} end
    local out, pos, n = {}, 1, #text
    local buf = {}
    while pos <= n do
        local hit
        for _, a in ipairs(added) do   -- sorted longest first
            if text:sub(pos, pos + #a.content - 1) == a.content then hit = a; break end
        end
        if hit then
            if #buf > 0 then out[#out + 1] = {text = table.concat(buf)}; buf = {} end
            out[#out + 1] = {special = hit.id}
            pos = pos + #hit.content
        else
            buf[#buf + 1] = text:sub(pos, pos)
            pos = pos + 1
        end
    end
    if #buf > 0 then out[#out + 1] = {text = table.concat(buf)} end
    return out
end

-- ==== printing ====

local function vocab_size(self)
    if self.pieces then local n = 0; for _ in pairs(self.pieces) do n = n + 1 end return n end
    local n = 0
    for _ in pairs(self.vocab or {}) do n = n + 1 end
    return n
end

-- ==== the common __call: batches, truncation, padding, tensors ====

local Base = {}
Base.__index = Base

local function check_opts(o, who)
    o = o or {}
    if type(o) ~= "table" then error(who .. ": expected a table of options, got " .. type(o), 3) end
    local known = {padding = true, max_length = true, truncation = true, return_tensors = true}
    for k in pairs(o) do
        if not known[k] then error(string.format("%s: unknown option '%s' (padding, max_length, truncation)", who, tostring(k)), 3) end
    end
    local p = o.padding
    if p == true then p = "longest" end
    if p ~= nil and p ~= false and p ~= "longest" and p ~= "max_length" and p ~= "do_not_pad" then
        error(who .. ": padding must be 'max_length', 'longest' or false, got " .. tostring(p), 3)
    end
    if p == "do_not_pad" then p = false end
    if o.max_length ~= nil and (type(o.max_length) ~= "number" or o.max_length < 1 or o.max_length % 1 ~= 0) then
        error(who .. ": max_length must be a positive integer, got " .. tostring(o.max_length), 3)
    end
    return p, o.max_length, o.truncation
end

-- tok(prompts, opts): prompts a string or a list of strings.
function Base:__call(prompts, o)
    local who = self.name
    if type(prompts) == "string" then prompts = {prompts} end
    if type(prompts) ~= "table" or #prompts == 0 then error(who .. ": expected a prompt or a list of prompts", 2) end
    local padding, max_length, truncation = check_opts(o, who)
    max_length = max_length or self.model_max_length
    local rows, longest = {}, 0
    for i, p in ipairs(prompts) do
        if type(p) ~= "string" then error(string.format("%s: prompt %d is a %s, not a string", who, i, type(p)), 2) end
        local ids = self:encode(p, (truncation and max_length) or nil)
        rows[i] = ids
        if #ids > longest then longest = #ids end
    end
    local L = longest
    if padding == "max_length" then
        if not max_length then error(who .. ": padding = 'max_length' needs max_length", 2) end
        L = math.max(max_length, longest)
    end
    if not padding then
        for _, r in ipairs(rows) do
            if #r ~= longest then error(who .. ": prompts of different lengths need padding ('max_length' or 'longest')", 2) end
        end
    end
    local Tensor = require "nemo.tensor"
    local ids = Tensor.zeros({#rows, L}, {dtype = "int64"})
    local mask = Tensor.zeros({#rows, L}, {dtype = "int64"})
    local pi, pm = ffi.cast("int64_t *", ids:data_ptr()), ffi.cast("int64_t *", mask:data_ptr())
    local out_rows = {}
    for b, r in ipairs(rows) do
        local full = {}
        for j = 1, L do
            local v = r[j]
            pi[(b - 1) * L + j - 1] = v or self.pad_id
            pm[(b - 1) * L + j - 1] = v and 1 or 0
            full[j] = v or self.pad_id
        end
        out_rows[b] = full
    end
    return {input_ids = ids, attention_mask = mask, ids = out_rows}
end

-- ==== CLIP: byte-level BPE ====

local function bytes_to_unicode()
    local bs = {}
    for b = 33, 126 do bs[#bs + 1] = b end
    for b = 161, 172 do bs[#bs + 1] = b end
    for b = 174, 255 do bs[#bs + 1] = b end
    local have, cs = {}, {}
    for i, b in ipairs(bs) do have[b] = true; cs[i] = b end
    local n = 0
    for b = 0, 255 do
        if not have[b] then bs[#bs + 1] = b; cs[#cs + 1] = 256 + n; n = n + 1 end
    end
    local map = {}
    for i, b in ipairs(bs) do map[b] = utf8(cs[i]) end
    return map
end
local BYTE_ENC = bytes_to_unicode()

local CLIPTokenizer = setmetatable({}, {__index = Base})
CLIPTokenizer.__index = CLIPTokenizer
CLIPTokenizer.__call = Base.__call
CLIPTokenizer.__tostring = function(self)
    return string.format("CLIPTokenizer(vocab %d, model_max_length %d)", vocab_size(self), self.model_max_length)
end
M.CLIPTokenizer = CLIPTokenizer

-- CLIP's pre-tokenizer on code points (already lower-cased, white space collapsed): the pieces
-- its pattern matches, in order (everything else, i.e. white space, is dropped).
local CONTRACTIONS = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"}
local function clip_pieces(cps)
    local out, i, n = {}, 1, #cps
    while i <= n do
        local cp = cps[i]
        local done = false
        if cp == 39 then   -- an apostrophe: the contractions come first in the alternation
            for _, c in ipairs(CONTRACTIONS) do
                local ok = true
                for k = 2, #c do if cps[i + k - 1] ~= c:byte(k) then ok = false; break end end
                if ok then out[#out + 1] = utf8_all(cps, i, i + #c - 1); i = i + #c; done = true; break end
            end
        end
        if not done then
            if is_letter(cp) then
                local j = i
                while j + 1 <= n and is_letter(cps[j + 1]) do j = j + 1 end
                out[#out + 1] = utf8_all(cps, i, j); i = j + 1
            elseif is_number(cp) then
                out[#out + 1] = utf8(cp); i = i + 1
            elseif is_space(cp) then
                i = i + 1
            else   -- [^\s\p{L}\p{N}]+ (the contractions are tried again inside? no: the regex engine
                   -- takes the longest run here, apostrophes included)
                local j = i
                while j + 1 <= n and not is_space(cps[j + 1]) and not is_letter(cps[j + 1]) and not is_number(cps[j + 1]) do
                    j = j + 1
                end
                out[#out + 1] = utf8_all(cps, i, j); i = j + 1
            end
        end
    end
    return out
end

local function read_text(path, who)
    local f, err = io.open(path, "rb")
    if not f then error(string.format("%s: cannot read '%s': %s", who, path, tostring(err)), 3) end
    local s = f:read("*a")
    f:close()
    return s
end

-- CLIPTokenizer.from_pretrained(dir, {subfolder=}) or CLIPTokenizer.new{vocab=, merges=, ...}
function CLIPTokenizer.from_pretrained(dir, o)
    local who = "CLIPTokenizer.from_pretrained"
    if type(dir) ~= "string" then error(who .. ": expected a folder", 2) end
    if o and o.subfolder then dir = dir .. "/" .. o.subfolder end
    local vocab, merges
    if fs.isfile(dir .. "/vocab.json") and fs.isfile(dir .. "/merges.txt") then
        vocab = json.decode(read_text(dir .. "/vocab.json", who))
        merges = {}
        for line in read_text(dir .. "/merges.txt", who):gmatch("[^\n]+") do
            if not line:match("^#version") then
                local a, b = line:match("^(%S+) (%S+)%s*$")
                if not a then error(string.format("%s: %s/merges.txt: cannot read the line '%s' (expected 'a b')", who, dir, line), 2) end
                merges[#merges + 1] = {a, b}
            end
        end
    elseif fs.isfile(dir .. "/tokenizer.json") then
        local tj = json.decode(read_text(dir .. "/tokenizer.json", who))
        if type(tj.model) ~= "table" or tj.model.type ~= "BPE" then
            error(string.format("%s: %s/tokenizer.json holds a %s model, not CLIP's BPE", who, dir,
                tostring(tj.model and tj.model.type)), 2)
        end
        vocab = tj.model.vocab
        merges = {}
        for i, m in ipairs(tj.model.merges) do
            if type(m) == "string" then local a, b = m:match("^(%S+) (%S+)$"); merges[i] = {a, b} else merges[i] = m end
        end
    else
        error(string.format("%s: '%s' holds neither vocab.json + merges.txt nor tokenizer.json", who, dir), 2)
    end
    local cfg = fs.isfile(dir .. "/tokenizer_config.json") and json.decode(read_text(dir .. "/tokenizer_config.json", who)) or {}
    local function tok_name(v, default)
        if type(v) == "table" then return v.content end
        return v or default
    end
    return CLIPTokenizer.new{vocab = vocab, merges = merges, bos = tok_name(cfg.bos_token, "<|startoftext|>"),
        eos = tok_name(cfg.eos_token, "<|endoftext|>"), pad = tok_name(cfg.pad_token, "<|endoftext|>"),
        unk = tok_name(cfg.unk_token, "<|endoftext|>"),
        model_max_length = type(cfg.model_max_length) == "number" and cfg.model_max_length < 1e9 and cfg.model_max_length or 77,
        source = dir}
end

function CLIPTokenizer.new(o)
    local self = setmetatable({name = "CLIPTokenizer", vocab = o.vocab, ranks = {}, cache = {}}, CLIPTokenizer)
    for i, m in ipairs(o.merges) do self.ranks[m[1] .. " " .. m[2]] = i end
    local function id_of(t, what)
        local id = o.vocab[t]
        if id == nil then error(string.format("CLIPTokenizer: the %s token '%s' is not in the vocabulary%s", what, t,
            o.source and (" of " .. o.source) or ""), 3) end
        return id
    end
    self.bos_id, self.eos_id = id_of(o.bos, "bos"), id_of(o.eos, "eos")
    self.pad_id, self.unk_id = id_of(o.pad, "pad"), id_of(o.unk, "unk")
    self.model_max_length = o.model_max_length or 77
    self.added = {{content = o.bos, id = self.bos_id}, {content = o.eos, id = self.eos_id}}
    table.sort(self.added, function(a, b) return #a.content > #b.content end)
    return self
end

-- BPE of one piece (byte-mapped), the last symbol carrying "</w>": a list of token strings.
function CLIPTokenizer:_bpe(piece)
    local c = self.cache[piece]
    if c then return c end
    local word = {}
    for _, cp in ipairs(codepoints(piece)) do word[#word + 1] = utf8(cp) end
    word[#word] = word[#word] .. "</w>"
    local ranks = self.ranks
    while #word > 1 do
        local best, bi = math.huge, nil
        for i = 1, #word - 1 do
            local r = ranks[word[i] .. " " .. word[i + 1]]
            if r and r < best then best, bi = r, i end
        end
        if not bi then break end
        local a, b = word[bi], word[bi + 1]
        local nw, i = {}, 1   -- merge every occurrence of the pair, left to right
        while i <= #word do
            if i < #word and word[i] == a and word[i + 1] == b then nw[#nw + 1] = a .. b; i = i + 2
            else nw[#nw + 1] = word[i]; i = i + 1 end
        end
        word = nw
    end
    self.cache[piece] = word
    return word
end

function CLIPTokenizer:tokenize(text)
    local out = {}
    for _, part in ipairs(split_added(text, self.added)) do
        if part.special then
            for t, id in pairs(self.vocab) do if id == part.special then out[#out + 1] = t; break end end
        else
            local cps = codepoints(part.text)
            local col, prev_space = {}, false   -- runs of white space -> one space, then lower case
            for _, cp in ipairs(cps) do
                if is_space(cp) then
                    if not prev_space then col[#col + 1] = 32 end
                    prev_space = true
                else
                    col[#col + 1] = cp
                    prev_space = false
                end
            end
            for _, piece in ipairs(clip_pieces(lower_cps(col))) do
                local mapped = {}
                for k = 1, #piece do mapped[k] = BYTE_ENC[piece:byte(k)] end
                for _, t in ipairs(self:_bpe(table.concat(mapped))) do out[#out + 1] = t end
            end
        end
    end
    return out
end

-- ids with <|startoftext|> ... <|endoftext|>; max_length: truncate (keeping both)
function CLIPTokenizer:encode(text, max_length)
    local ids = {self.bos_id}
    for _, t in ipairs(self:tokenize(text)) do ids[#ids + 1] = self.vocab[t] or self.unk_id end
    if max_length and #ids + 1 > max_length then
        for i = #ids, math.max(max_length, 1), -1 do ids[i] = nil end
    end
    ids[#ids + 1] = self.eos_id
    return ids
end

-- ==== Unigram (T5, UMT5) ====

-- sentencepiece's precompiled character map: a darts-clone double-array trie over UTF-8 keys
-- whose values index NUL-terminated replacement strings.
local Charsmap = {}
Charsmap.__index = Charsmap

local function b64decode(s)
    local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    local dec = {}
    for i = 1, 64 do dec[alphabet:byte(i)] = i - 1 end
    s = s:gsub("[^%w%+/=]", "")
    local out = {}
    for i = 1, #s, 4 do
        local a, b, c, d = dec[s:byte(i)], dec[s:byte(i + 1)], dec[s:byte(i + 2)], dec[s:byte(i + 3)]
        local n = bit.bor(bit.lshift(a or 0, 18), bit.lshift(b or 0, 12), bit.lshift(c or 0, 6), d or 0)
        out[#out + 1] = string.char(bit.band(bit.rshift(n, 16), 255))
        if s:sub(i + 2, i + 2) ~= "=" and c then out[#out + 1] = string.char(bit.band(bit.rshift(n, 8), 255)) end
        if s:sub(i + 3, i + 3) ~= "=" and d then out[#out + 1] = string.char(bit.band(n, 255)) end
    end
    return table.concat(out)
end

function Charsmap.new(b64, who)
    local blob = b64decode(b64)
    if #blob < 4 then error(who .. ": the Precompiled normalizer's charsmap is empty or damaged", 3) end
    local size = blob:byte(1) + blob:byte(2) * 256 + blob:byte(3) * 65536 + blob:byte(4) * 16777216
    if size % 4 ~= 0 or 4 + size > #blob then
        error(string.format("%s: the Precompiled charsmap's trie size %d does not fit its %d bytes", who, size, #blob), 3)
    end
    local n = size / 4
    local units = ffi.new("uint32_t[?]", n)
    ffi.copy(units, blob:sub(5, 4 + size), size)
    return setmetatable({units = units, n = n, normalized = blob:sub(5 + size)}, Charsmap)
end

-- The replacement of the first key that is a prefix of s (bytes i..j), or nil (spm_precompiled's
-- transform: common_prefix_search(...)[0]).
function Charsmap:transform(s)
    local units, n = self.units, self.n
    local function offset(u) return bit.lshift(bit.rshift(u, 10), bit.rshift(bit.band(u, 512), 6)) end
    local pos = 0
    local u = units[0]
    pos = bit.bxor(pos, offset(u))
    for k = 1, #s do
        local c = s:byte(k)
        if c == 0 then break end
        pos = bit.bxor(pos, c)
        if pos < 0 or pos >= n then return nil end
        u = units[pos]
        if bit.band(u, 0x800000FF) ~= c then return nil end
        pos = bit.bxor(pos, offset(u))
        if bit.band(bit.rshift(u, 8), 1) == 1 then
            local v = bit.band(units[pos], 0x7FFFFFFF)
            local e = self.normalized:find("\0", v + 1, true)
            return self.normalized:sub(v + 1, (e or #self.normalized + 1) - 1)
        end
    end
    return nil
end

-- Precompiled.normalize: grapheme by grapheme (a grapheme under 6 bytes is looked up whole),
-- else character by character.
function Charsmap:normalize(cps)
    local out, i, n = {}, 1, #cps
    while i <= n do
        local j = i
        while j + 1 <= n and (is_extend(cps[j + 1]) or cps[j] == 0x200D) do j = j + 1 end
        local g = utf8_all(cps, i, j)
        local r = #g < 6 and self:transform(g) or nil
        if r then
            out[#out + 1] = r
        else
            for k = i, j do
                local c = utf8(cps[k])
                out[#out + 1] = self:transform(c) or c
            end
        end
        i = j + 1
    end
    return table.concat(out)
end

local METASPACE = "\226\150\129"   -- U+2581

local T5Tokenizer = setmetatable({}, {__index = Base})
T5Tokenizer.__index = T5Tokenizer
T5Tokenizer.__call = Base.__call
T5Tokenizer.__tostring = function(self)
    return string.format("T5Tokenizer(Unigram, vocab %d%s, model_max_length %d)", vocab_size(self),
        self.byte_fallback and ", byte fallback" or "", self.model_max_length)
end
M.T5Tokenizer = T5Tokenizer

-- A normalizer of tokenizer.json as a function string -> string.
local function build_normalizer(spec, who)
    if spec == nil or spec == json.null then return function(s) return s end end
    local t = spec.type
    if t == "Sequence" then
        local fns = {}
        for i, n in ipairs(spec.normalizers) do fns[i] = build_normalizer(n, who) end
        return function(s) for _, f in ipairs(fns) do s = f(s) end return s end
    elseif t == "Precompiled" then
        local cm = Charsmap.new(spec.precompiled_charsmap, who)
        return function(s) return cm:normalize(codepoints(s)) end
    elseif t == "Replace" then
        local pat = spec.pattern or {}
        local content = spec.content or ""
        if pat.String then
            local lit = pat.String:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
            local rep = content:gsub("%%", "%%%%")
            return function(s) return (s:gsub(lit, rep)) end
        end
        local rx = pat.Regex
        local rep = content:gsub("%%", "%%%%")
        if rx == " {2,}" then return function(s) return (s:gsub("  +", rep)) end
        elseif rx == " +" then return function(s) return (s:gsub(" +", rep)) end
        elseif rx == "\\s+" then
            return function(s)
                local cps, out, prev = codepoints(s), {}, false
                for _, cp in ipairs(cps) do
                    if is_space(cp) then if not prev then out[#out + 1] = content end prev = true
                    else out[#out + 1] = utf8(cp); prev = false end
                end
                return table.concat(out)
            end
        end
        error(string.format("%s: tokenizer.json's Replace normalizer with the pattern %s is not supported (known: ' {2,}', ' +', '\\s+' and plain strings)",
            who, json.encode(pat)), 4)
    elseif t == "Strip" then
        local left, right = spec.strip_left ~= false, spec.strip_right ~= false
        if spec.left ~= nil then left = spec.left end
        if spec.right ~= nil then right = spec.right end
        return function(s)
            local cps = codepoints(s)
            local i, j = 1, #cps
            if left then while i <= j and is_space(cps[i]) do i = i + 1 end end
            if right then while j >= i and is_space(cps[j]) do j = j - 1 end end
            return utf8_all(cps, i, j)
        end
    elseif t == "Lowercase" then
        return function(s) return utf8_all(lower_cps(codepoints(s))) end
    end
    error(string.format("%s: tokenizer.json's normalizer '%s' is not supported (known: Sequence, Precompiled, Replace, Strip, Lowercase)",
        who, tostring(t)), 4)
end

-- A pre-tokenizer of tokenizer.json as a function {pieces} -> {pieces}.
local function build_pretokenizer(spec, who)
    if spec == nil or spec == json.null then return function(p) return p end end
    local t = spec.type
    if t == "Sequence" then
        local fns = {}
        for i, n in ipairs(spec.pretokenizers) do fns[i] = build_pretokenizer(n, who) end
        return function(p) for _, f in ipairs(fns) do p = f(p) end return p end
    elseif t == "WhitespaceSplit" then
        return function(pieces)
            local out = {}
            for _, piece in ipairs(pieces) do
                local cps, cur = codepoints(piece.s), {}
                for _, cp in ipairs(cps) do
                    if is_space(cp) then
                        if #cur > 0 then out[#out + 1] = {s = utf8_all(cur), first = piece.first and #out == 0}; cur = {} end
                    else cur[#cur + 1] = cp end
                end
                if #cur > 0 then out[#out + 1] = {s = utf8_all(cur), first = piece.first and #out == 0} end
            end
            return out
        end
    elseif t == "Metaspace" then
        local rep = spec.replacement or METASPACE
        local scheme = spec.prepend_scheme
        if scheme == nil then scheme = (spec.add_prefix_space == false) and "never" or "always" end
        local split = spec.split ~= false
        local lit = rep:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
        return function(pieces)
            local out = {}
            for _, piece in ipairs(pieces) do
                local s = piece.s:gsub(" ", rep)
                if s == "" then goto continue end
                if (scheme == "always" or (scheme == "first" and piece.first)) and s:sub(1, #rep) ~= rep then
                    s = rep .. s
                end
                if split then   -- each replacement starts a new piece (MergedWithNext)
                    local starts = {}
                    local pos = 1
                    while true do
                        local a = s:find(lit, pos)
                        if not a then break end
                        starts[#starts + 1] = a
                        pos = a + #rep
                    end
                    if #starts == 0 or starts[1] ~= 1 then table.insert(starts, 1, 1) end
                    for k, a in ipairs(starts) do
                        local b = (starts[k + 1] or (#s + 1)) - 1
                        if b >= a then out[#out + 1] = {s = s:sub(a, b)} end
                    end
                else
                    out[#out + 1] = {s = s}
                end
                ::continue::
            end
            return out
        end
    end
    error(string.format("%s: tokenizer.json's pre-tokenizer '%s' is not supported (known: Sequence, WhitespaceSplit, Metaspace)",
        who, tostring(t)), 4)
end

-- T5Tokenizer.from_pretrained(dir, {subfolder=}): dir/tokenizer.json with a Unigram model.
function T5Tokenizer.from_pretrained(dir, o)
    local who = "T5Tokenizer.from_pretrained"
    if type(dir) ~= "string" then error(who .. ": expected a folder", 2) end
    if o and o.subfolder then dir = dir .. "/" .. o.subfolder end
    local path = dir .. "/tokenizer.json"
    if not fs.isfile(path) then
        error(string.format("%s: '%s' has no tokenizer.json (a folder with only spiece.model is not supported: " ..
            "convert it once with transformers' T5TokenizerFast.save_pretrained)", who, dir), 2)
    end
    local ok, tj = pcall(json.decode, read_text(path, who))
    if not ok then error(string.format("%s: '%s' is not valid JSON: %s", who, path, tostring(tj)), 2) end
    local cfg = fs.isfile(dir .. "/tokenizer_config.json") and json.decode(read_text(dir .. "/tokenizer_config.json", who)) or {}
    local mml = type(cfg.model_max_length) == "number" and cfg.model_max_length < 1e9 and cfg.model_max_length or 512
    return T5Tokenizer.new(tj, {model_max_length = mml, source = path})
end

-- T5Tokenizer.new(tokenizer_json_table, {model_max_length=, source=})
function T5Tokenizer.new(tj, o)
    o = o or {}
    local who = "T5Tokenizer(" .. (o.source or "tokenizer.json") .. ")"
    local m = tj.model
    if type(m) ~= "table" or m.type ~= "Unigram" then
        error(string.format("%s: expected a Unigram model, got %s", who, tostring(m and m.type)), 2)
    end
    local self = setmetatable({name = "T5Tokenizer", pieces = {}, scores = {}, index = {}, trie = {},
                               byte_fallback = m.byte_fallback == true, unk_id = m.unk_id,
                               model_max_length = o.model_max_length or 512}, T5Tokenizer)
    local min_score = math.huge
    for i, e in ipairs(m.vocab) do
        local piece, score = e[1], e[2]
        self.pieces[i - 1], self.scores[i - 1] = piece, score
        if self.index[piece] == nil then self.index[piece] = i - 1 end
        if score < min_score then min_score = score end
        local node = self.trie   -- a byte trie over the pieces
        for k = 1, #piece do
            local c = piece:byte(k)
            node[c] = node[c] or {}
            node = node[c]
        end
        if node.id == nil then node.id = i - 1 end
    end
    self.unk_score = min_score - 10
    if self.unk_id == nil or self.unk_id == json.null then
        error(who .. ": the Unigram model has no unk_id", 2)
    end
    self.added = {}
    for _, a in ipairs(tj.added_tokens or {}) do self.added[#self.added + 1] = {content = a.content, id = a.id} end
    table.sort(self.added, function(a, b) return #a.content > #b.content end)
    self.normalize = build_normalizer(tj.normalizer, who)
    self.pretokenize = build_pretokenizer(tj.pre_tokenizer, who)
    self.eos_id = self.index["</s>"]
    self.pad_id = self.index["<pad>"] or 0
    local pp = tj.post_processor
    self.append_eos = pp ~= nil and pp ~= json.null and self.eos_id ~= nil
    return self
end

-- Viterbi segmentation of one pre-token: token strings.
function T5Tokenizer:_segment(s)
    local n = #s
    if n == 0 then return {} end
    local best = {[0] = 0}            -- best score of a path ending at byte position k
    local back = {}                   -- {start, id} of the last token of that path
    local pos = 0
    while pos < n do
        if best[pos] ~= nil then
            local c = s:byte(pos + 1)
            local clen = c >= 0xF0 and 4 or c >= 0xE0 and 3 or c >= 0xC0 and 2 or 1
            local node, single = self.trie, false
            for k = pos + 1, n do
                node = node[s:byte(k)]
                if not node then break end
                if node.id then
                    local e, sc = k, best[pos] + self.scores[node.id]
                    if best[e] == nil or sc > best[e] then best[e] = sc; back[e] = {pos, node.id} end
                    if k - pos == clen then single = true end
                end
            end
            if not single then
                local e = math.min(pos + clen, n)
                local sc = best[pos] + self.unk_score
                if best[e] == nil or sc > best[e] then best[e] = sc; back[e] = {pos, self.unk_id} end
            end
        end
        local c = s:byte(pos + 1)
        pos = pos + (c >= 0xF0 and 4 or c >= 0xE0 and 3 or c >= 0xC0 and 2 or 1)
    end
    -- walk back; consecutive unknowns fuse into one piece
    local rev, e, unk_run = {}, n, nil
    while e > 0 do
        local b = back[e]
        local piece = s:sub(b[1] + 1, e)
        if b[2] == self.unk_id then
            unk_run = piece .. (unk_run or "")
        else
            if unk_run then rev[#rev + 1] = unk_run; unk_run = nil end
            rev[#rev + 1] = piece
        end
        e = b[1]
    end
    if unk_run then rev[#rev + 1] = unk_run end
    local out = {}
    for i = #rev, 1, -1 do out[#out + 1] = rev[i] end
    return out
end

function T5Tokenizer:tokenize(text)
    local toks = {}
    local first = true
    for _, part in ipairs(split_added(text, self.added)) do
        if part.special then
            toks[#toks + 1] = self.pieces[part.special] or ""
        else
            local pieces = self.pretokenize({{s = self.normalize(part.text), first = first}})
            for _, p in ipairs(pieces) do
                for _, t in ipairs(self:_segment(p.s)) do toks[#toks + 1] = t end
            end
        end
        first = false
    end
    return toks
end

-- ids of a token string (byte fallback: <0xXX> per byte when the piece is unknown)
function T5Tokenizer:_ids_of(t, out)
    local id = self.index[t]
    if id then out[#out + 1] = id; return end
    if self.byte_fallback then
        local all = true
        for k = 1, #t do if not self.index[string.format("<0x%02X>", t:byte(k))] then all = false end end
        if all then
            for k = 1, #t do out[#out + 1] = self.index[string.format("<0x%02X>", t:byte(k))] end
            return
        end
    end
    out[#out + 1] = self.unk_id
end

-- ids followed by </s>; max_length: truncate, keeping </s>
function T5Tokenizer:encode(text, max_length)
    local ids = {}
    for _, part in ipairs(split_added(text, self.added)) do
        if part.special then
            ids[#ids + 1] = part.special
        else
            for _, p in ipairs(self.pretokenize({{s = self.normalize(part.text), first = #ids == 0}})) do
                for _, t in ipairs(self:_segment(p.s)) do self:_ids_of(t, ids) end
            end
        end
    end
    local room = max_length and (max_length - (self.append_eos and 1 or 0)) or nil
    if room and #ids > room then for i = #ids, room + 1, -1 do ids[i] = nil end end
    if self.append_eos then ids[#ids + 1] = self.eos_id end
    return ids
end

-- ==== any of them ====

-- from_pretrained(dir, {subfolder=}): the tokenizer the folder holds (tokenizer_config.json's
-- tokenizer_class, else the files).
function M.from_pretrained(dir, o)
    if type(dir) ~= "string" then error("tokenizers.from_pretrained: expected a folder", 2) end
    local d = (o and o.subfolder) and (dir .. "/" .. o.subfolder) or dir
    local cls
    if fs.isfile(d .. "/tokenizer_config.json") then
        local ok, cfg = pcall(json.decode, read_text(d .. "/tokenizer_config.json", "tokenizers.from_pretrained"))
        if ok then cls = cfg.tokenizer_class end
    end
    if cls and cls:match("^CLIPTokenizer") then return CLIPTokenizer.from_pretrained(d) end
    if cls and (cls:match("^T5Tokenizer") or cls:match("^UMT5")) then return T5Tokenizer.from_pretrained(d) end
    if fs.isfile(d .. "/vocab.json") and fs.isfile(d .. "/merges.txt") then return CLIPTokenizer.from_pretrained(d) end
    if fs.isfile(d .. "/tokenizer.json") then return T5Tokenizer.from_pretrained(d) end
    error(string.format("tokenizers.from_pretrained: '%s' holds no tokenizer nemo-lua reads (vocab.json + merges.txt " ..
        "for CLIP, tokenizer.json for T5 / UMT5)", d), 2)
end

-- the names of transformers' classes, as model_index.json lists them
M.CLIPTokenizerFast = CLIPTokenizer
M.T5TokenizerFast = T5Tokenizer

M._codepoints, M._utf8 = codepoints, utf8
return M
