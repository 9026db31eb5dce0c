package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
-- tests/lua/test_safetensors.lua: nemo.safetensors (engine/safetensors.c): round trips of every
-- dtype, the reference writer's exact bytes, hand-written files, the diffusers golden file,
-- zero-copy loading, malformed files and failing saves.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local st = require "nemo.safetensors"
local C = nffi.C

local tmp, cleanup = T.scratch()
local read_bytes, write_bytes = T.read_bytes, T.write_bytes
local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() return true end
    return false
end

local function u64le(n)
    local b = {}
    for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
    return table.concat(b)
end
-- A file as another writer would make it: length, header text as given, data bytes.
local function raw_file(path, header, data)
    write_bytes(path, u64le(#header) .. header .. (data or ""))
    return path
end
local function cbytes(ctype, vals)
    local a = ffi.new(ctype .. "[?]", #vals, vals)
    return ffi.string(a, ffi.sizeof(a))
end
local function tensor_bytes(t)
    local c = t:contiguous()
    return ffi.string(c:data_ptr(), c:numel() * c:element_size())
end
local function addr(t) return tonumber(ffi.cast("uintptr_t", t:data_ptr())) end

local function same_list(a, b)
    if type(a) ~= type(b) then return false end
    if type(a) ~= "table" then return a == b end
    if #a ~= #b then return false end
    for i = 1, #a do if not same_list(a[i], b[i]) then return false end end
    return true
end
local function show(v)
    if type(v) ~= "table" then return tostring(v) end
    local p = {}
    for i, x in ipairs(v) do p[i] = show(x) end
    return "{" .. table.concat(p, ", ") .. "}"
end
local function bytes_list(s)
    local out = {}
    for i = 1, #s do out[i] = s:byte(i) end
    return out
end

-- The call fails with a message that names the file and matches pattern.
local function fails_naming(fn, fname, pattern, name)
    local ok, err = pcall(fn)
    err = tostring(err)
    return T.ok(not ok and err:find(fname, 1, true) ~= nil and err:find(pattern) ~= nil,
        name .. ": error names the file and matches '" .. pattern .. "'",
        ok and "no error raised" or ("error was: " .. err))
end

-- ==== round trip of every dtype, 0-dim, empty and non-contiguous tensors ====
do
    local int64s = Tensor.int64s
    local src = Tensor.tensor({{1, 2, 3}, {4, 5, 6}}, {dtype = "float32"})
    local nc = Tensor.wrap(C.nemo_tensor_view(src._c, 2, int64s{3, 2}, int64s{1, 3}, 0))   -- src^T
    local i64 = Tensor.tensor({0, -1, 2^53, -(2^53)}, {dtype = "int64"})
    ffi.cast("int64_t *", i64:data_ptr())[0] = 4611686018427387905LL   -- 2^62 + 1: beyond doubles
    local tensors = {
        f32 = Tensor.tensor({{1.5, -2.25, 3}, {4, 5, 6.125}}, {dtype = "float32"}),
        f64 = Tensor.tensor({1 / 3, -1e300, 5e-324}, {dtype = "float64"}),
        bf16 = Tensor.tensor({1, -2, 0.5, 3.140625}, {dtype = "bfloat16"}),
        f16 = Tensor.tensor({1, -2, 0.5, 65504, 2^-24}, {dtype = "float16"}),
        i64 = i64,
        i32 = Tensor.tensor({-2^31, 2^31 - 1, 0}, {dtype = "int32"}),
        bool = Tensor.tensor({true, false, true}),
        scalar = Tensor.tensor(3.5, {dtype = "float32"}),
        empty = Tensor.zeros({0, 3}, {dtype = "float32"}),
        empty_bf16 = Tensor.zeros({0}, {dtype = "bfloat16"}),
        noncontig = nc,
    }
    T.ok(not nc:is_contiguous(), "the non-contiguous source really is non-contiguous")
    local path = tmp("roundtrip.safetensors")
    st.save_file(tensors, path)
    local back = st.load_file(path)
    local nback = 0
    for _ in pairs(back) do nback = nback + 1 end
    T.is(nback, 11, "round trip: 11 tensors come back")
    for name, t in pairs(tensors) do
        local b = back[name]
        T.ok(b ~= nil and b.dtype == t.dtype and same_list(b.shape, t.shape) and b.device == "cpu",
            string.format("round trip %s: dtype %s shape %s on cpu", name, t.dtype, show(t.shape)),
            b and ("got " .. b.dtype .. " " .. show(b.shape)) or "missing")
        T.ok(b ~= nil and tensor_bytes(b) == tensor_bytes(t),
            string.format("round trip %s: bytes identical (exact)", name))
    end
    T.ok(same_list(back.noncontig:tolist(), {{1, 4}, {2, 5}, {3, 6}}) and back.noncontig:is_contiguous(),
        "round trip noncontig: transposed values {{1,4},{2,5},{3,6}} written contiguously")
    T.is(back.scalar:item(), 3.5, "round trip scalar: 0-dim value 3.5 (exact)")
    T.is(#back.scalar.shape, 0, "round trip scalar: shape {} (0 dims)")
    T.ok(same_list(back.bool:tolist(), {true, false, true}), "round trip bool: {true, false, true}")
    T.is(tostring(ffi.cast("int64_t *", back.i64:data_ptr())[0]), "4611686018427387905LL",
        "round trip i64: 2^62+1 survives exactly")

    -- layout: reference order (dtype alignment descending, then name), packed, header % 8 == 0
    local f = st.safe_open(path)
    T.ok(same_list(f:offset_keys(), {"i64", "f64", "empty", "f32", "noncontig", "scalar", "i32",
                                      "bf16", "empty_bf16", "f16", "bool"}),
        "layout: file order is I64, F64, F32, I32, BF16, F16, BOOL, then by name", show(f:offset_keys()))
    T.ok(same_list(f:keys(), {"bf16", "bool", "empty", "empty_bf16", "f16", "f32", "f64", "i32", "i64",
                               "noncontig", "scalar"}), "keys(): sorted by name", show(f:keys()))
    T.is(f:metadata(), nil, "metadata(): nil when the file has none")
    f:close()
    local raw = read_bytes(path)
    local n = 0
    for i = 8, 1, -1 do n = n * 256 + raw:byte(i) end
    local header = raw:sub(9, 8 + n)
    T.is(n % 8, 0, "layout: header length " .. n .. " is a multiple of 8")
    local pos, packed = 0, true
    for b, e in header:gmatch('"data_offsets":%[(%d+),(%d+)%]') do
        if tonumber(b) ~= pos then packed = false end
        pos = tonumber(e)
    end
    T.ok(packed and pos == #raw - 8 - n, "layout: tensors packed from offset 0 to the end of the file without gaps")
end

-- ==== exact bytes of the reference implementation's own tests (huggingface/safetensors) ====
do
    local p = tmp("ref1.safetensors")
    st.save_file({["attn.0"] = Tensor.tensor({{{0, 1, 2}, {3, 4, 5}}}, {dtype = "float32"})}, p)
    local expect = {64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
        116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
        58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
        101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
        0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64}
    T.ok(same_list(bytes_list(read_bytes(p)), expect), "reference bytes: test_serialization (attn.0, F32 [1,2,3])")

    p = tmp("ref2.safetensors")
    st.save_file({attn0 = Tensor.tensor({{{{0, 1, 2}, {3, 4, 5}}}}, {dtype = "float32"})}, p)
    expect = {72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116,
        121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58,
        91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102,
        115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32,
        32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0,
        160, 64}
    T.ok(same_list(bytes_list(read_bytes(p)), expect),
        "reference bytes: test_serialization_forced_alignement (header padded with 7 spaces)")

    p = tmp("ref3.safetensors")
    st.save_file({}, p)
    T.ok(same_list(bytes_list(read_bytes(p)), {8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32}),
        "reference bytes: test_empty (no tensors, no metadata)")
    p = tmp("ref4.safetensors")
    st.save_file({}, p, {framework = "pt"})
    expect = {40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95,
        95, 34, 58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112,
        116, 34, 125, 125, 32, 32, 32, 32, 32}
    T.ok(same_list(bytes_list(read_bytes(p)), expect), "reference bytes: test_empty with metadata {framework = pt}")
    local f = st.safe_open(p)
    T.ok(#f:keys() == 0 and f:metadata().framework == "pt", "empty file with metadata reads back: 0 tensors, framework = pt")
    f:close()
end

-- ==== metadata round trip ====
do
    local p = tmp("meta.safetensors")
    local meta = {format = "pt", note = 'quote " backslash \\ newline \n tab \t ctrl \1 del \127',
                  ["ключ"] = "значение é 😀", [""] = ""}
    st.save_file({w = Tensor.tensor({1, 2}, {dtype = "float32"})}, p, meta)
    local got = st.safe_open(p):metadata()
    local same = true
    for k, v in pairs(meta) do if got[k] ~= v then same = false end end
    for k in pairs(got) do if meta[k] == nil then same = false end end
    T.ok(same, "metadata round trip: escapes, control characters, UTF-8 and empty strings come back equal")
end

-- ==== the diffusers golden file (written by torch + safetensors) ====
do
    local case, why = require("golden").case("flux_tiny", "diffusion_pytorch_model.safetensors")
    if not case then
        T.ok(false, "golden flux_tiny weight file: " .. why)
    else
        local f = st.safe_open(case .. "/diffusion_pytorch_model.safetensors")
        T.is(#f:keys(), 62, "golden: 62 tensors")
        local meta = f:metadata() or {}
        T.ok(meta.format == "pt" and next(meta, next(meta)) == nil, "golden: metadata is exactly {format = pt}")
        T.is(f:offset_keys()[1], "context_embedder.bias", "golden: first tensor in file order is context_embedder.bias")
        local w = f:get_tensor("x_embedder.weight")
        T.ok(same_list(w.shape, {32, 4}) and w.dtype == "float32", "golden: x_embedder.weight is float32 (32, 4)")
        local row = w:tolist()[1]
        T.ok(same_list(row, {-0.2033330202102661, 0.32381802797317505, -0.1070372462272644, -0.2713471055030823}),
            "golden: x_embedder.weight[0] matches the values read by Python (exact)", show(row))
        local b = f:get_tensor("proj_out.bias")
        T.ok(same_list(b:tolist(), {-0.03407260775566101, -0.018926231190562248, 0.12029825150966644, -0.13091376423835754}),
            "golden: proj_out.bias matches the values read by Python (exact)", show(b:tolist()))
        f:close()
    end
end

-- ==== a file written by hand, byte by byte ====
do
    -- A 45-byte header (not a multiple of 8: data misaligned), whitespace and escapes in names,
    -- a gap, trailing bytes, an empty tensor, and a dtype nemo does not hold.
    local header = '{ "x\\u00e9" : {"dtype":"BF16", "shape":[3], "data_offsets":[0,6]},\n' ..
        '"y\\ud83d\\ude00":{"shape":[2],"dtype":"F32","data_offsets":[6,14],"extra":[1,{"a":null}]},\t' ..
        '"z":{"dtype":"I64","shape":[1,1],"data_offsets":[16,24]},' ..
        '"w":{"dtype":"BOOL","shape":[4],"data_offsets":[24,28]},' ..
        '"e":{"dtype":"F16","shape":[2,0],"data_offsets":[28,28]},' ..
        '"u":{"dtype":"U8","shape":[2],"data_offsets":[28,30]},' ..
        '"__metadata__":{"k\\n":"v\\"\\/"} }'
    local data = cbytes("uint16_t", {0x3f80, 0xc000, 0x3f00}) ..          -- bf16 1, -2, 0.5
        cbytes("float", {1.25, -3.5}) .. "\255\255" ..                      -- f32 and a 2-byte gap
        cbytes("int64_t", {-7}) .. "\0\1\1\0" .. "\9\9" .. "trailing"
    local p = raw_file(tmp("hand.safetensors"), header, data)
    local f = st.safe_open(p)
    T.ok(same_list(f:keys(), {"e", "u", "w", "xé", "y😀", "z"}), "hand-written: names decoded (\\u escapes, surrogate pair)",
        show(f:keys()))
    local x = f:get_tensor("xé")
    T.ok(x.dtype == "bfloat16" and same_list(x:tolist(), {1, -2, 0.5}), "hand-written: BF16 {1, -2, 0.5} (exact)")
    local y = f:get_tensor("y😀")
    T.ok(y.dtype == "float32" and same_list(y:tolist(), {1.25, -3.5}),
        "hand-written: misaligned F32 {1.25, -3.5} (exact, read through a copy)")
    T.is(addr(y) % 4, 0, "hand-written: the misaligned F32 tensor's data address is 4-byte aligned (copied)")
    local z = f:get_tensor("z")
    T.ok(same_list(z.shape, {1, 1}) and z:tolist()[1][1] == -7, "hand-written: I64 (1, 1) = -7")
    T.ok(same_list(f:get_tensor("w"):tolist(), {false, true, true, false}), "hand-written: BOOL {false, true, true, false}")
    local e = f:get_tensor("e")
    T.ok(e.dtype == "float16" and same_list(e.shape, {2, 0}) and e:numel() == 0, "hand-written: empty F16 (2, 0)")
    T.ok(f:metadata()["k\n"] == 'v"/', "hand-written: metadata escapes decoded")
    T.is(f:dtype_of("u"), "U8", "hand-written: dtype_of reports the file's dtype string U8")
    fails_naming(function() f:get_tensor("u") end, p, "unsupported dtype U8 for tensor 'u'",
        "hand-written: U8 tensor")
    fails_naming(function() st.load_file(p) end, p, "unsupported dtype U8", "hand-written: load_file with a U8 tensor")
    fails_naming(function() f:get_tensor("nope") end, p, "no tensor named 'nope'", "get_tensor of a missing key")
    f:close()
    T.raises(function() f:get_tensor("z") end, "is closed", "get_tensor after close raises 'is closed'")
    -- tensors taken before close keep the mapping alive
    collectgarbage(); collectgarbage()
    T.ok(same_list(x:tolist(), {1, -2, 0.5}) and z:tolist()[1][1] == -7, "tensors stay valid after close + full GC")
end

-- ==== zero copy: a 64 MB file is mapped, not allocated ====
do
    local p = tmp("big.safetensors")
    local n = 16 * 1024 * 1024
    local big = Tensor.zeros({n}, {dtype = "float32"})
    big:fill_(0.25)
    st.save_file({big = big}, p)
    big:free()
    collectgarbage(); collectgarbage()
    local before = tonumber(C.nemo_memory_current(0, 0))
    local sd = st.load_file(p)
    local after = tonumber(C.nemo_memory_current(0, 0))
    T.is(after - before, 0, "zero copy: loading a 64 MB file adds 0 bytes to memory_current")
    local v = ffi.new("double[1]")
    nffi.check(C.nemo_get_flat(sd.big._c, n - 1, v))
    T.is(v[0], 0.25, "zero copy: the last element reads 0.25")
    local f = st.safe_open(p)
    local a, b = f:get_tensor("big"), f:get_tensor("big")
    T.ok(addr(a) == addr(b), "zero copy: two reads of the same key share one address")
    -- copy-on-write: writing into a loaded tensor changes neither the file nor other views
    nffi.check(C.nemo_fill_(a._c, 7))
    local g = st.load_file(p).big
    nffi.check(C.nemo_get_flat(g._c, 0, v))
    T.is(v[0], 0.25, "copy-on-write: filling a loaded tensor leaves the file (and new loads) at 0.25")
    f:close()
    a, b, g, sd = nil, nil, nil, nil
    collectgarbage(); collectgarbage()
end

-- ==== malformed files: a clear error naming the file, never a crash ====
do
    local function entry(name, dtype, shape, b, e)
        return string.format('"%s":{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}', name, dtype, shape, b, e)
    end
    local d16 = string.rep("\0", 16)
    local cases = {
        {"short file", function(p) write_bytes(p, "abc") end, "3 bytes, too short"},
        {"empty file", function(p) write_bytes(p, "") end, "0 bytes, too short"},
        {"header past the end", function(p) write_bytes(p, u64le(100) .. "{}") end, "runs past the end"},
        {"absurd header size", function(p) write_bytes(p, u64le(2^40) .. "{}") end, "larger than the 100000000 bytes"},
        {"invalid JSON", function(p) raw_file(p, '{"a":') end, "invalid JSON at byte"},
        {"trailing text", function(p) raw_file(p, '{} x') end, "unexpected text after"},
        {"not an object", function(p) raw_file(p, '[1,2]') end, "expected a JSON object"},
        {"missing dtype", function(p) raw_file(p, '{"a":{"shape":[2],"data_offsets":[0,8]}}', d16) end, "'a' has no 'dtype'"},
        {"missing shape", function(p) raw_file(p, '{"a":{"dtype":"F32","data_offsets":[0,8]}}', d16) end, "'a' has no 'shape'"},
        {"missing data_offsets", function(p) raw_file(p, '{"a":{"dtype":"F32","shape":[2]}}', d16) end,
            "'a' has no 'data_offsets'"},
        {"entry not an object", function(p) raw_file(p, '{"a":[1]}') end, "entry 'a' is an array"},
        {"unknown dtype", function(p) raw_file(p, "{" .. entry("a", "F99", "2", 0, 8) .. "}", d16) end,
            "unknown dtype 'F99'"},
        {"byte count mismatch", function(p) raw_file(p, "{" .. entry("a", "F32", "2,2", 0, 8) .. "}", d16) end,
            "needs 16 bytes but data_offsets %[0, 8%] hold 8"},
        {"offsets past the data", function(p) raw_file(p, "{" .. entry("a", "F32", "8", 0, 32) .. "}", d16) end,
            "out of range"},
        {"begin after end", function(p) raw_file(p, "{" .. entry("a", "F32", "0", 8, 4) .. "}", d16) end,
            "out of range"},
        {"overlapping offsets", function(p)
            raw_file(p, "{" .. entry("a", "F32", "3", 0, 12) .. "," .. entry("b", "F32", "2", 8, 16) .. "}", d16)
        end, "tensors 'a' %[0, 12%] and 'b' %[8, 16%] overlap"},
        {"negative dimension", function(p) raw_file(p, "{" .. entry("a", "F32", "-2", 0, 8) .. "}", d16) end,
            "negative dimension"},
        {"duplicate names", function(p)
            raw_file(p, "{" .. entry("a", "F32", "2", 0, 8) .. "," .. entry("a", "F32", "2", 8, 16) .. "}", d16)
        end, "duplicate tensor name 'a'"},
        {"non-integer shape", function(p) raw_file(p, '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', d16) end,
            "non%-integer number"},
        {"three offsets", function(p) raw_file(p, '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', d16) end,
            "two integers"},
        {"too many dims", function(p) raw_file(p, "{" .. entry("a", "F32", "1,1,1,1,1,1,1,1,1", 0, 4) .. "}", d16) end,
            "9 dimensions"},
        {"huge shape", function(p) raw_file(p, "{" .. entry("a", "F32", "4294967296,4294967296", 0, 8) .. "}", d16) end,
            "too large"},
        {"metadata value not a string", function(p) raw_file(p, '{"__metadata__":{"n":1}}') end,
            "metadata__\" value for key 'n' is an integer"},
        {"lone surrogate", function(p) raw_file(p, '{"\\ud800":{}}') end, "surrogate"},
        {"bad escape", function(p) raw_file(p, '{"\\x":{}}') end, "unknown escape"},
        {"invalid UTF-8", function(p) raw_file(p, '{"\255":{}}') end, "invalid UTF%-8"},
        {"control character", function(p) raw_file(p, '{"a\1":{}}') end, "control character"},
        {"deep nesting", function(p) raw_file(p, '{"a":{"x":' .. string.rep("[", 100) .. string.rep("]", 100) .. '}}') end,
            "nested too deeply"},
        {"NUL in a name", function(p) raw_file(p, '{"a\\u0000b":{}}') end, "u0000"},
    }
    for i, c in ipairs(cases) do
        local p = tmp(string.format("bad%02d.safetensors", i))
        c[2](p)
        fails_naming(function() st.load_file(p) end, p, c[3], "malformed: " .. c[1])
    end
    local missing = tmp("does_not_exist.safetensors")
    fails_naming(function() st.load_file(missing) end, missing, "cannot open", "malformed: missing file")
    local dir = tmp("adir")
    os.execute("mkdir -p '" .. dir .. "'")
    fails_naming(function() st.safe_open(dir) end, dir, "is a directory", "malformed: a directory")
    os.execute("rmdir '" .. dir .. "'")
end

-- ==== mutated headers: each file loads or raises an error naming it, never crashes ====
do
    local src = tmp("fuzz_src.safetensors")
    st.save_file({a = Tensor.tensor({1, 2, 3}, {dtype = "float32"}), ['b\n"é'] = Tensor.tensor({1, 2}, {dtype = "bfloat16"}),
                  c = Tensor.tensor(true), d = Tensor.zeros({0, 2})}, src, {format = "pt"})
    local good = read_bytes(src)
    local n = 0
    for i = 8, 1, -1 do n = n * 256 + good:byte(i) end
    local header, data = good:sub(9, 8 + n), good:sub(9 + n)
    local alpha = '{}[]",:0123456789-.eE\\u"abtrnfl \t\n\255\1'
    math.randomseed(12345)
    local p = tmp("fuzz.safetensors")
    local loaded, clean_errors, total = 0, 0, 300
    for _ = 1, total do
        local h = header
        for _ = 1, math.random(1, 4) do
            local pos, r = math.random(1, #h), math.random()
            local c = alpha:sub(math.random(1, #alpha)):sub(1, 1)
            if r < 0.4 then h = h:sub(1, pos - 1) .. c .. h:sub(pos + 1)
            elseif r < 0.7 then h = h:sub(1, pos - 1) .. h:sub(pos + 1)
            elseif r < 0.9 then h = h:sub(1, pos - 1) .. c .. h:sub(pos)
            else h = h:sub(1, pos - 1) .. tostring(math.random(0, 2^40)) .. h:sub(pos) end
        end
        local bytes = u64le(#h) .. h .. data
        if math.random() < 0.1 then bytes = bytes:sub(1, math.random(0, #bytes)) end
        write_bytes(p, bytes)
        local ok, res = pcall(st.load_file, p)
        if ok then
            for _, t in pairs(res) do local _ = t:tolist() end
            loaded = loaded + 1
        elseif tostring(res):find(p, 1, true) then
            clean_errors = clean_errors + 1
        end
    end
    T.is(loaded + clean_errors, total, string.format("fuzz: %d mutated files: %d load, %d raise an error naming the file",
        total, loaded, clean_errors))
end

-- ==== failing saves leave an existing file untouched ====
do
    pcall(ffi.cdef, "int getpid(void);")
    local p = tmp("keep.safetensors")
    local t = Tensor.tensor({1, 2, 3}, {dtype = "float32"})
    st.save_file({t = t}, p, {format = "pt"})
    local orig = read_bytes(p)
    local function untouched(what)
        T.ok(read_bytes(p) == orig and not exists(p .. ".tmp." .. ffi.C.getpid()),
            what .. ": the existing file is unchanged and no temporary file is left")
    end
    T.raises(function() st.save_file({t = t:clone()}, p, {format = "pt", n = 1}) end,
        "metadata value for key 'n' is a number, expected a string", "save with a number metadata value raises naming the key")
    untouched("number metadata (Lua check)")
    -- the engine's own check, reached directly with a JSON text
    local names = ffi.new("const char *[1]", {"t"})
    local ts = ffi.new("nemo_tensor *[1]", {t._c})
    local rc = C.nemo_st_save(p, 1, names, ts, '{"n":1}')
    T.ok(rc < 0 and ffi.string(C.nemo_last_error()):find("metadata value for key 'n' is an integer", 1, true),
        "engine save with metadata {\"n\":1} fails naming the key", ffi.string(C.nemo_last_error()))
    untouched("number metadata (engine check)")
    rc = C.nemo_st_save(p, 1, names, ts, '{"n":"1"')
    T.ok(rc < 0 and ffi.string(C.nemo_last_error()):find("invalid JSON", 1, true), "engine save with bad metadata JSON fails")
    untouched("bad metadata JSON")
    local dup = ffi.new("const char *[2]", {"a", "a"})
    local ts2 = ffi.new("nemo_tensor *[2]", {t._c, t._c})
    rc = C.nemo_st_save(p, 2, dup, ts2, nil)
    T.ok(rc < 0 and ffi.string(C.nemo_last_error()):find("duplicate tensor name 'a'", 1, true), "engine save with duplicate names fails")
    untouched("duplicate names")
    T.raises(function() st.save_file({t = 1}, p) end, "value for key 't' is a number, expected a tensor",
        "save of a non-tensor raises naming the key")
    T.raises(function() st.save_file({[1] = t}, p) end, "tensor key 1 is a number", "save with a non-string key raises")
    T.raises(function() st.save_file({__metadata__ = t}, p) end, "__metadata__' is reserved", "save of a tensor named __metadata__ raises")
    untouched("bad arguments")
    local nodir = tmp("no_such_dir") .. "/x.safetensors"
    T.raises(function() st.save_file({t = t}, nodir) end, "cannot create", "save into a missing directory raises 'cannot create'")
    -- a failure after the bytes were written (rename onto a directory) removes the temporary file
    local dir = tmp("target_is_dir")
    os.execute("mkdir -p '" .. dir .. "'")
    T.raises(function() st.save_file({t = t}, dir) end, "renaming", "save whose rename fails raises")
    T.ok(not exists(dir .. ".tmp." .. ffi.C.getpid()), "failed rename: the temporary file is removed")
    os.execute("rmdir '" .. dir .. "'")
    -- overwriting the file that the saved tensors are mapped from (the reference's bug #764)
    local sd = st.load_file(p)
    st.save_file({t = sd.t, u = sd.t}, p)
    T.ok(same_list(sd.t:tolist(), {1, 2, 3}), "overwrite the mapped source: old tensors still read {1, 2, 3}")
    local sd2 = st.load_file(p)
    T.ok(same_list(sd2.u:tolist(), {1, 2, 3}) and same_list(sd2.t:tolist(), {1, 2, 3}),
        "overwrite the mapped source: the new file holds t and u = {1, 2, 3}")
end

-- ==== devices: load onto CUDA, save from CUDA ====
if C.nemo_device_count(1) > 0 then
    local p = tmp("cuda.safetensors")
    local t = Tensor.tensor({{1.5, -2}, {3, 4.25}}, {dtype = "bfloat16"})
    st.save_file({t = t}, p)
    local g = st.load_file(p, {device = "cuda:0"}).t
    T.ok(g.device == "cuda:0" and same_list(g:cpu():tolist(), {{1.5, -2}, {3, 4.25}}),
        "load_file {device = cuda:0}: on cuda:0 with values {{1.5, -2}, {3, 4.25}} (exact)")
    local q = tmp("cuda2.safetensors")
    st.save_file({g = g}, q)
    T.ok(tensor_bytes(st.load_file(q).g) == tensor_bytes(t), "save_file of a cuda tensor: bytes identical (exact)")
else
    T.skip("load_file onto cuda:0", "no CUDA device")
    T.skip("save_file of a cuda tensor", "no CUDA device")
end

-- ==== API errors ====
do
    T.raises(function() st.load_file(tmp("x.safetensors"), {device = "tpu"}) end, "unknown device 'tpu'",
        "load_file with an unknown device raises")
    T.raises(function() st.save_file({}, tmp("m.safetensors"), "pt") end, "metadata must be a table",
        "save_file with string metadata raises")
end

-- ==== in_background: the files written by threads from copies taken at the call ====
do
    local nemo = require "nemo"
    local a = nemo.randn({64, 33}, {generator = nemo.Generator(1)})
    local b = nemo.randn({7}, {dtype = "float64", generator = nemo.Generator(2)}):to{dtype = "bfloat16"}
    local want_a = a:clone()
    local jobs = st.in_background(function()
        st.save_file({a = a, b = b}, tmp("bg.safetensors"), {format = "pt"})
        st.save_file({at = a:t()}, tmp("bg2.safetensors"))   -- a strided view
    end)
    a:fill_(3)                                              -- after the call: not in the file
    T.is(#jobs, 2, "in_background: one job per save_file")
    st.wait(jobs)
    st.save_file({a = want_a, b = b}, tmp("fg.safetensors"), {format = "pt"})
    T.ok(T.read_bytes(tmp("bg.safetensors")) == T.read_bytes(tmp("fg.safetensors")),
        "in_background: the file is save_file's, byte for byte, with the values at the call")
    T.ok(T.same_bits(nemo.load_file(tmp("bg2.safetensors")).at, want_a:t():contiguous()),
        "in_background: a strided view is written as its values")
    local bad = st.in_background(function() st.save_file({a = a}, tmp("no/such/dir/x.safetensors")) end)
    T.raises(function() st.wait(bad) end, "save_file %(in the background%): .*cannot create",
        "a failed background write raises at wait, naming the file")
    T.raises(function() st.in_background(function() error("boom") end) end, "boom",
        "an error inside in_background goes on (after its started jobs are joined)")
end

cleanup()
T.done()
