package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
-- tests/lua/test_torchfile.lua: nemo.torchfile reads torch.save() files (zip + pickle) without
-- Python. The fixtures in tests/golden/torch_save/ were written by torch 2.x
-- (make_fixtures.py, a record only): every value is compared with its .expected.json twin and
-- every tensor bitwise with its .expected.safetensors twin; then damaged and hostile files must
-- give clear errors that name the file.
local ffi = require "ffi"
local bit = require "bit"
local nemo = require "nemo"
local json = require "nemo.json"
local tf = require "nemo.torchfile"

local DIR = "tests/golden/torch_save/"

local tmp, cleanup = T.scratch()
local read_bytes, write_bytes = T.read_bytes, T.write_bytes
local function u16le(n) return string.char(n % 256, math.floor(n / 256) % 256) end
local function u32le(n)
    return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
end
local function le(s, i, k)
    local v = 0
    for j = i + k - 1, i, -1 do v = v * 256 + s:byte(j) end
    return v
end

-- The call fails with a message that names the file and matches pattern (plain text).
local function fails_naming(fn, fname, pattern, name)
    local ok, err = pcall(fn)
    err = tostring(err)
    return T.ok(not ok and err:find(fname, 1, true) ~= nil and err:find(pattern, 1, true) ~= nil,
        name .. ": error names the file and says '" .. pattern .. "'",
        ok and "no error raised" or ("error was: " .. err))
end

-- ==== comparing a loaded value with its tagged JSON tree ====

local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end

local function key_of(node)
    local t = node.t
    if t == "str" or t == "int" or t == "bool" then return node.v end
    if t == "float" then return tonumber(node.v) end
    if t == "none" then return tf.None end
    error("unexpected key node " .. tostring(t))
end

-- walks value and node; fills tensors[#+1] = {t = tensor, node = node, path = path}; returns nil or a mismatch
local function compare(v, node, path, tensors)
    local t = node.t
    local function bad(what) return string.format("%s: %s (got %s)", path, what, tostring(v)) end
    if t == "tensor" then
        if not nemo.is_tensor(v) then return bad("expected a tensor") end
        tensors[#tensors + 1] = {t = v, node = node, path = path}
        return nil
    end
    if nemo.is_tensor(v) then return bad("unexpected tensor, expected " .. t) end
    local function want(cond, what) if cond then return nil end return bad(what) end
    if t == "none" then return want(rawequal(v, tf.None), "expected None") end
    if t == "bool" then return want(v == node.v, "expected " .. tostring(node.v)) end
    if t == "int" then return want(type(v) == "number" and v == node.v, string.format("expected int %.17g", node.v)) end
    if t == "str" or t == "dtype" or t == "device" then return want(v == node.v, "expected '" .. node.v .. "'") end
    if t == "bytes" then return want(type(v) == "string" and hex(v) == node.hex, "expected bytes " .. node.hex) end
    if t == "float" then
        if type(v) ~= "number" then return bad("expected a float") end
        local x = node.v
        if x == "nan" then return want(v ~= v, "expected nan") end
        if x == "inf" then return want(v == math.huge, "expected inf") end
        if x == "-inf" then return want(v == -math.huge, "expected -inf") end
        if x == "-0.0" then return want(v == 0 and 1 / v < 0, "expected -0.0") end
        return want(v == x and (v ~= 0 or 1 / v > 0), string.format("expected %.17g", x))
    end
    if type(v) ~= "table" or rawequal(v, tf.None) then return bad("expected a " .. t) end
    local n = 0
    for _ in pairs(v) do n = n + 1 end
    if n ~= #node.items then return bad(string.format("expected %d entries, found %d", #node.items, n)) end
    if t == "dict" then
        for _, kv in ipairs(node.items) do
            local k = key_of(kv[1])
            if v[k] == nil then return bad("missing key " .. tostring(k)) end
            local e = compare(v[k], kv[2], path .. "." .. tostring(k), tensors)
            if e then return e end
        end
        return nil
    end
    -- list / tuple / set: a 1-based array
    for i, item in ipairs(node.items) do
        local e = compare(v[i], item, path .. "[" .. i .. "]", tensors)
        if e then return e end
    end
    return nil
end

local function same_list(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end
local function list_str(a)
    local p = {}
    for i, x in ipairs(a) do p[i] = tostring(x) end
    return "[" .. table.concat(p, ", ") .. "]"
end

local NATIVE = {float32 = true, float64 = true, float16 = true, bfloat16 = true, int64 = true, int32 = true, bool = true}

local loaded = {}
local function check_fixture(file, stem)
    local exp = json.read_file(DIR .. stem .. ".expected.json")
    local twins = nemo.load_file(DIR .. stem .. ".expected.safetensors")
    local ok, v = pcall(tf.load, DIR .. file)
    if not T.ok(ok, file .. ": loads", tostring(v)) then return end
    loaded[stem] = v
    local tensors = {}
    local e = compare(v, exp.value, file, tensors)
    T.ok(e == nil, string.format("%s: every value (dict keys, lists, None, str, int, float, bool) equals the JSON twin", file), e)
    local storages = {}
    for _, rec in ipairs(tensors) do
        local t, node = rec.t, rec.node
        local twin = twins[node.key]
        local layout = not NATIVE[node.torch_dtype] or
            (same_list(t:stride(), node.stride) and t:storage_offset() == node.offset)
        T.ok(t.dtype == node.dtype and same_list(t.shape, node.shape) and layout and t.device == "cpu" and
             tf.stored_dtype(t) == node.torch_dtype and twin ~= nil and T.same_bits(t, twin),
            string.format("%s: %s %s %s%s: dtype, shape, %sbits equal", file, rec.path, node.torch_dtype,
                list_str(node.shape), NATIVE[node.torch_dtype] and (" stride " .. list_str(node.stride) ..
                " offset " .. node.offset) or (" -> " .. node.dtype), NATIVE[node.torch_dtype] and "strides, " or ""),
            string.format("got %s %s stride %s offset %d stored %s, twin %s", t.dtype, list_str(t.shape),
                list_str(t:stride()), t:storage_offset(), tostring(tf.stored_dtype(t)), tostring(twin)))
        if NATIVE[node.torch_dtype] and t:numel() > 0 then
            local s = storages[node.storage] or {}
            storages[node.storage] = s
            s[#s + 1] = rec
        end
    end
    -- tensors that shared one torch storage share one nemo storage; others do not
    local ptr_of = {}
    local share_ok, share_msg = true, nil
    for sid, recs in pairs(storages) do
        for _, rec in ipairs(recs) do
            local p = tostring(ffi.cast("uintptr_t", rec.t._c.storage))
            if recs[1].t._c.storage ~= rec.t._c.storage then
                share_ok, share_msg = false, rec.path .. " does not share " .. recs[1].path .. "'s storage"
            end
            if ptr_of[p] and ptr_of[p] ~= sid then
                share_ok, share_msg = false, rec.path .. " shares a storage it should not"
            end
            ptr_of[p] = sid
        end
    end
    T.ok(share_ok, file .. ": tensors share nemo storages exactly as they shared torch storages", share_msg)
    return v, exp
end

-- ==== the good fixtures ====
check_fixture("flux_sample.pt", "flux_sample")
local _, p4 = check_fixture("flux_sample_p4.pt", "flux_sample_p4")
T.is(p4 and p4.archive_prefix, "archive", "flux_sample_p4.pt: its archive folder is 'archive', not the file stem")
check_fixture("wan_sample.pt", "wan_sample")
check_fixture("edge.pt", "edge")
check_fixture("edge_p4.pt", "edge_p4")
check_fixture("sample.meta", "sample")

do
    local d = loaded.flux_sample
    if d then
        T.ok(rawequal(d.negative_prompt, tf.None) and tf.is_none(d.negative_prompt) and tostring(d.negative_prompt) == "None",
            "flux: negative_prompt None is kept as torchfile.None")
        T.is(d.prompt, "A café in Zürich at night — 東京の夜景 🌃, \"quoted\"\nsecond line", "flux: prompt (UTF-8)")
        T.ok(d.latent.dtype == "float16" and same_list(d.latent.shape, {16, 8, 12}) and
             d.prompt_embeds.dtype == "bfloat16" and same_list(d.prompt_embeds.shape, {1, 20, 32}),
            "flux: latent fp16 [16, 8, 12], prompt_embeds bf16 [1, 20, 32]")
        T.is(ffi.cast("int64_t *", d.t5_tokens:data_ptr())[19], 2 ^ 40 + 3, "flux: t5_tokens int64 value 2^40+3 exact")
        T.ok(d.original_resolution[1] == 1024 and d.original_resolution[2] == 768 and #d.crop_offset == 2,
            "flux: tuples and lists of ints are Lua arrays")
    end
    local w = loaded.wan_sample
    if w then
        T.ok(w.first_frame.dtype == "int32" and tf.stored_dtype(w.first_frame) == "uint8" and
             same_list(w.first_frame.shape, {6, 8, 3}), "wan: uint8 first_frame [6, 8, 3] -> int32, stored_dtype uint8")
        T.ok(w.deterministic_latents == true and w.num_frames == 9 and w.fps == 16,
            "wan: bool, int and float metadata")
    end
    local e = loaded.edge
    if e then
        local base = e.shared_base:tolist()
        local a = e.shared_a:contiguous():reshape{-1}:tolist()
        local b = e.shared_b:tolist()
        local ok = true
        for i = 1, 6 do if a[i] ~= base[2 + i] then ok = false end end
        for i = 1, 5 do if b[i] ~= base[11 + 2 * (i - 1)] then ok = false end end
        T.ok(ok, "edge: views with offsets 2 and 10 (stride 2) read their slice of the shared storage")
        T.ok(e.shared_a._c.storage == e.shared_base._c.storage and e.transposed._c.storage == e.tensor_list[2]._c.storage,
            "edge: views of one storage are views of one nemo storage (no copies)")
        T.ok(not e.transposed:is_contiguous() and same_list(e.transposed:tolist()[1], {0, 4, 8}),
            "edge: transposed view is strided and reads row 1 = {0, 4, 8}")
        T.ok(rawequal(e.alias1, e.alias2), "edge: a tensor pickled twice (memo) is one Lua object")
        T.ok(#e.scalar.shape == 0 and e.scalar:item() == 3.5 and e.scalar_int:item() == -7, "edge: 0-d tensors 3.5 and -7")
        T.ok(e.empty:numel() == 0 and same_list(e.empty.shape, {0, 3}), "edge: empty tensor [0, 3]")
        T.ok(same_list(e.expanded:stride(), {0, 1}) and same_list(e.expanded:tolist()[4], {0, 1, 2}),
            "edge: expanded tensor keeps stride 0")
        T.ok(e.ints[14] == 2 ^ 53 and e.ints[15] == -(2 ^ 53) and e.ints[11] == -2 ^ 31 - 1,
            "edge: ints up to +-2^53 and LONG1 negatives exact")
    end
end

-- ==== files that must be refused, each with a clear message ====
fails_naming(function() return tf.load(DIR .. "no_such_file.pt") end, "no_such_file.pt", "cannot open", "missing file")
for _, c in ipairs {
    {"err_global.pt", "forbidden global 'os.system'"},
    {"err_compressed.pt", "is compressed (method 8, deflate)"},
    {"err_bigendian.pt", "big-endian"},
    {"err_missing_storage.pt", "missing storage record 'flux_sample/data/3'"},
    {"err_no_pkl.pt", "no data.pkl record"},
    {"err_small_storage.pt", "holds 4 float32 elements, too small for a tensor of size (2, 3), stride (3, 1) and offset 0"},
    {"err_offset.pt", "too small for a tensor of size (2,), stride (1,) and offset 3"},
    {"err_short_record.pt", "holds 16 bytes, but its storage has 8 elements of float32 (32 bytes)"},
    {"err_pid.pt", "persistent id is not a ('storage', ...) tuple"},
    {"err_bigint.pt", "beyond 2^53"},
    {"err_float8.pt", "float8_e4m3fn tensors are not supported"},
    {"err_legacy.pt", "legacy torch.save format"},
} do
    fails_naming(function() return tf.load(DIR .. c[1]) end, c[1], c[2], c[1])
end

-- ==== damaged copies of a good file ====
local good = read_bytes(DIR .. "flux_sample.pt")

-- the central directory record of an entry: its position in the file and fields
local function cd_entry(s, name)
    local i = s:find("PK\1\2", 1, true)
    while i do
        local nlen = le(s, i + 28, 2)
        if s:sub(i + 46, i + 45 + nlen) == name then
            return {at = i, crc_at = i + 16, method_at = i + 10, size = le(s, i + 24, 4), lho = le(s, i + 42, 4)}
        end
        i = s:find("PK\1\2", i + 4, true)
    end
    error("no central directory entry " .. name)
end
local function data_at(s, e) return e.lho + 30 + le(s, e.lho + 27, 2) + le(s, e.lho + 29, 2) + 1 end  -- 1-based
local function replace(s, at, new) return s:sub(1, at - 1) .. new .. s:sub(at + #new) end

do  -- truncated at many lengths: never a crash, always "truncated", "not a zip" or "corrupt"
    local n = #good
    local lengths = {0, 1, 4, 21, 22, 100, 1000, math.floor(n / 2), n - 200, n - 100, n - 23, n - 22, n - 1}
    local all, msg = true, nil
    local p = tmp("trunc.pt")
    for _, len in ipairs(lengths) do
        write_bytes(p, good:sub(1, len))
        local ok, err = pcall(tf.load, p)
        err = tostring(err)
        if ok or not err:find(p, 1, true) or not (err:find("truncated", 1, true) or err:find("not a zip", 1, true)
            or err:find("corrupt", 1, true)) then
            all, msg = false, string.format("length %d: %s", len, ok and "loaded" or err)
        end
    end
    T.ok(all, string.format("truncated copies (%d lengths from 0 to %d bytes): each error names the file and says truncated / not a zip / corrupt",
        #lengths, n - 1), msg)
    write_bytes(p, good:sub(1, n - 1))
    fails_naming(function() return tf.load(p) end, p, "no end-of-central-directory record", "truncated by one byte")
end

local pkl = cd_entry(good, "flux_sample/data.pkl")
local pkl_at = data_at(good, pkl)
-- a copy with data.pkl's bytes changed, its CRC-32 fixed (so the pickle VM sees the damage) or not
local function with_pkl(new_pkl, fix_crc)
    local s = replace(good, pkl_at, new_pkl)
    if fix_crc then s = replace(s, pkl.crc_at, u32le(tf.crc32(new_pkl))) end
    return s
end
local pkl_bytes = good:sub(pkl_at, pkl_at + pkl.size - 1)

do
    local p = tmp("crc.pt")
    write_bytes(p, with_pkl(replace(pkl_bytes, 100, string.char(bit.bxor(pkl_bytes:byte(100), 0x20))), false))
    fails_naming(function() return tf.load(p) end, p, "data.pkl is corrupt: CRC-32", "a flipped byte in data.pkl (CRC-32 unchanged)")
    write_bytes(p, with_pkl(replace(pkl_bytes, 3, "\255"), true))
    fails_naming(function() return tf.load(p) end, p, "data.pkl byte 2: unknown pickle opcode 0xff", "opcode 0xff in data.pkl")
    write_bytes(p, with_pkl(replace(pkl_bytes, 3, "i"), true))
    fails_naming(function() return tf.load(p) end, p, "opcode INST: opcode not supported", "INST opcode in data.pkl")

    -- every byte of data.pkl flipped in turn (CRC fixed): a clean error naming the file, or a value
    local t0 = os.clock()
    local nerr, nok, bad = 0, 0, nil
    local step = math.max(1, math.floor(#pkl_bytes / 700))
    for i = 1, #pkl_bytes, step do
        for _, x in ipairs {0xff, 0x01} do
            local q = replace(pkl_bytes, i, string.char(bit.bxor(pkl_bytes:byte(i), x)))
            write_bytes(p, with_pkl(q, true))
            local ok, err = pcall(tf.load, p)
            if ok then nok = nok + 1
            else
                nerr = nerr + 1
                err = tostring(err)
                if not err:find("torchfile: " .. p .. ": ", 1, true) or err:find("internal error", 1, true) then
                    bad = bad or string.format("byte %d ^ 0x%02x: %s", i, x, err)
                end
            end
        end
    end
    T.ok(bad == nil, string.format("data.pkl with single bytes flipped (%d copies, CRC fixed): %d errors, each 'torchfile: <file>: ...' and none internal; %d still load (%.2f s)",
        nerr + nok, nerr, nok, os.clock() - t0), bad)

    -- the central directory marks data.pkl compressed
    write_bytes(p, replace(good, pkl.method_at, u16le(8)))
    fails_naming(function() return tf.load(p) end, p, "'flux_sample/data.pkl' is compressed (method 8", "data.pkl marked deflated")
    -- a storage record's bytes changed: read as is unless verify_crc
    local rec = cd_entry(good, "flux_sample/data/0")
    local at = data_at(good, rec)
    write_bytes(p, replace(good, at, string.char(bit.bxor(good:byte(at), 0x40))))
    T.ok(pcall(tf.load, p), "a damaged storage record still loads without verify_crc")
    fails_naming(function() return tf.load(p, {verify_crc = true}) end, p, "'flux_sample/data/0' is corrupt: CRC-32",
        "a damaged storage record with verify_crc")
    T.ok(pcall(tf.load, DIR .. "flux_sample.pt", {verify_crc = true}), "every CRC-32 of a good file checks out with verify_crc")
end

-- ==== hand-made archives: pickles torch never writes ====
-- a minimal zip writer (stored entries), as torch lays them out without the alignment padding
local function make_zip(path, entries)
    local body, cd = {}, {}
    local off = 0
    for _, e in ipairs(entries) do
        local name, data = e[1], e[2]
        local crc = tf.crc32(data)
        local common = u16le(0) .. u16le(0) .. u16le(0) .. u16le(0) .. u32le(crc) .. u32le(#data) .. u32le(#data) ..
            u16le(#name) .. u16le(0)
        local lh = "PK\3\4" .. u16le(20) .. common .. name
        cd[#cd + 1] = "PK\1\2" .. u16le(20) .. u16le(20) .. common .. u16le(0) .. u16le(0) .. u16le(0) .. u32le(0) ..
            u32le(off) .. name
        body[#body + 1] = lh .. data
        off = off + #lh + #data
    end
    local cds = table.concat(cd)
    local eocd = "PK\5\6" .. u16le(0) .. u16le(0) .. u16le(#entries) .. u16le(#entries) .. u32le(#cds) .. u32le(off) .. u16le(0)
    return write_bytes(path, table.concat(body) .. cds .. eocd)
end
local function pickle_file(name, pk, extra)
    local entries = {{"x/data.pkl", pk}, {"x/byteorder", "little"}}
    for _, e in ipairs(extra or {}) do entries[#entries + 1] = e end
    return make_zip(tmp(name), entries)
end

do
    local f32x4 = ffi.string(ffi.new("float[4]", {1, 2, 3, 4}), 16)
    -- ('storage', torch.FloatStorage, '0', 'cpu', 4) then _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())
    local function tensor_pickle(size_ops, stride_ops)
        return "\128\2ctorch._utils\n_rebuild_tensor_v2\n((X\7\0\0\0storagectorch\nFloatStorage\nX\1\0\0\0" ..
            "0X\3\0\0\0cpuK\4tQK\0" .. size_ops .. stride_ops .. "\137ccollections\nOrderedDict\n)RtR."
    end
    local p = pickle_file("vec.pt", tensor_pickle("K\4\133", "K\1\133"), {{"x/data/0", f32x4}})
    local ok, t = pcall(tf.load, p)
    T.ok(ok and nemo.is_tensor(t) and same_list(t:tolist(), {1, 2, 3, 4}),
        "hand-made archive: a bare tensor [1, 2, 3, 4] as the whole value", not ok and tostring(t) or nil)
    p = pickle_file("nine.pt", tensor_pickle("(K\1K\1K\1K\1K\1K\1K\1K\1K\1t", "(K\1K\1K\1K\1K\1K\1K\1K\1K\1t"),
        {{"x/data/0", f32x4}})
    fails_naming(function() return tf.load(p) end, p, "9 dimensions", "a 9-dimensional tensor")
    p = pickle_file("norec.pt", tensor_pickle("K\4\133", "K\1\133"))
    fails_naming(function() return tf.load(p) end, p, "missing storage record 'x/data/0'", "no storage record")
    p = pickle_file("stride.pt", tensor_pickle("K\2\133", "K\4\133"), {{"x/data/0", f32x4}})
    fails_naming(function() return tf.load(p) end, p, "too small for a tensor of size (2,), stride (4,) and offset 0 (needs 5)",
        "stride past the storage")

    local cases = {
        {"empty_stack.pt", "\128\2.", "stack underflow"},
        {"memo.pt", "\128\2]q\0h\5.", "memo key 5 was never stored"},
        {"eval.pt", "\128\2cbuiltins\neval\nX\1\0\0\0" .. "1\133R.", "forbidden global 'builtins.eval'"},
        {"posix.pt", "\128\2cposix\nsystem\n.", "forbidden global 'posix.system'"},
        {"stack_global.pt", "\128\4\140\2os\140\6system\147.", "forbidden global 'os.system'"},
        {"getattr.pt", "\128\2c__builtin__\ngetattr\n.", "forbidden global 'builtins.getattr'"},
        {"reduce_str.pt", "\128\2X\1\0\0\0a)R.", "REDUCE of a string: only allowed globals can be called"},
        {"storage_call.pt", "\128\2ctorch\nFloatStorage\n)R.", "global 'torch.FloatStorage' cannot be called"},
        {"sparse.pt", "\128\2ctorch._utils\n_rebuild_sparse_tensor\n.", "unsupported tensor kind"},
        {"no_stop.pt", "\128\2]", "without a STOP opcode"},
        {"long_str.pt", "\128\2X\255\255\255\127abc.", "pickle truncated"},
        {"setitem_list.pt", "\128\2]K\1K\2s.", "SETITEM on something that is not a dict"},
        {"nomark.pt", "\128\2e.", "no MARK on the stack"},
        {"proto9.pt", "\128\9.", "pickle protocol 9 is newer than 5"},
        {"ext1.pt", "\128\2\130\1.", "opcode EXT1: opcode not supported"},
        {"long4.pt", "\128\2\139\9\0\0\0\0\0\0\0\0\0\0\0\1.", "beyond 2^53"},
        {"nanint.pt", "\128\2}G\127\248\0\0\0\0\0\0K\1s.", "dict key NaN"},
        {"pid.pt", "\128\2K\1Q.", "persistent id is not a ('storage', ...) tuple"},
    }
    for _, c in ipairs(cases) do
        local path = pickle_file(c[1], c[2])
        fails_naming(function() return tf.load(path) end, path, c[3], "hand-made pickle " .. c[1])
    end

    -- values torch could write that are not in the fixtures
    p = pickle_file("cycle.pt", "\128\2]q\0h\0a.")
    local okc, v = pcall(tf.load, p)
    T.ok(okc and rawequal(v[1], v), "a list that contains itself loads (no endless recursion)", not okc and tostring(v) or nil)
    p = pickle_file("proto0.pt", "(lp0\nI1\naI01\naF-2.5\naL12345678901L\na(dp1\nS'x'\np2\nNsa.")
    fails_naming(function() return tf.load(p) end, p, "opcode STRING: opcode not supported", "protocol-0 STRING")
    p = pickle_file("proto0b.pt", "(lp0\nI1\naI01\naF-2.5\naL12345678901L\na(dp1\nNNsa.")
    okc, v = pcall(tf.load, p)
    T.ok(okc and v[1] == 1 and v[2] == true and v[3] == -2.5 and v[4] == 12345678901 and type(v[5]) == "table",
        "protocol-0 text opcodes INT, FLOAT, LONG, LIST, DICT, PUT", not okc and tostring(v) or nil)
    p = pickle_file("bytes8.pt", "\128\5\142\3\0\0\0\0\0\0\0abc\150\2\0\0\0\0\0\0\0xy\134.")
    okc, v = pcall(tf.load, p)
    T.ok(okc and v[1] == "abc" and v[2] == "xy", "protocol-5 BINBYTES8 and BYTEARRAY8", not okc and tostring(v) or nil)
    p = pickle_file("counter.pt", "\128\2ccollections\nCounter\n}(X\1\0\0\0aK\3u\133R.")
    okc, v = pcall(tf.load, p)
    T.ok(okc and v.a == 3, "collections.Counter({'a': 3}) is a dict", not okc and tostring(v) or nil)
end

cleanup()
T.done()
