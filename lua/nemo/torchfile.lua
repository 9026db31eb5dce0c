-- lua/nemo/torchfile.lua: read files written by PyTorch's torch.save (the zip format of
-- torch >= 1.6), without Python, for what torch.load(weights_only=True) allows: tensors and
-- plain values. NVIDIA Automodel's preprocessing writes one such file per sample (.pt / .meta).
--
--   local torchfile = require "nemo.torchfile"
--   local d = torchfile.load("0a1b2c.pt")        -- {latent = tensor, prompt = "...", ...}
--   if d.negative_prompt == torchfile.None then ... end
--
-- Values: dict -> Lua table with the same keys (str keys as strings, int keys as numbers),
-- list / tuple / torch.Size / set -> Lua array (1-based), None -> torchfile.None (a unique
-- sentinel, so dict entries and list slots holding None are kept), str -> string,
-- bytes / bytearray -> string, int -> number (an error beyond 2^53), float -> number,
-- bool -> boolean, torch dtype -> its name ("bfloat16"), torch.device -> "cpu" / "cuda:0",
-- tensor / nn.Parameter -> a nemo CPU tensor (requires_grad is not restored).
--
-- Tensors keep their dtype, shape, strides and storage offset: a tensor of dtype float32,
-- float64, float16, bfloat16, int64, int32 or bool is a (possibly strided) view of one nemo
-- storage per torch storage, so tensors that shared a storage in torch share it here too.
-- nemo has no 8/16-bit integer dtypes: uint8, int8, int16 and uint16 tensors come back as
-- contiguous int32 tensors and uint32 as int64, with the same values; torchfile.stored_dtype(t)
-- gives the dtype torch stored ("uint8"). Complex, quantized, float8 and sparse tensors are
-- refused with an error.
--
-- The pickle is run by a small VM that knows the pickle opcodes of protocols 0-5 that torch
-- writes, and calls only the globals weights_only allows (collections.OrderedDict, the
-- torch._utils tensor rebuild functions, torch.<X>Storage, torch.storage.UntypedStorage, torch
-- dtypes, torch.Size, torch.device, set, bytes): any other global (os.system, a class of the
-- user's) is an error that names it, and nothing in the file is ever executed.
--
-- Errors (never a crash): each is "torchfile: <path>: <problem>", for a missing file, a file
-- that is not a zip or is truncated, a compressed or encrypted entry, a missing data.pkl or
-- storage record, a big-endian file, a bad CRC-32 of data.pkl, an unknown opcode, a forbidden
-- global, or a storage too small for a tensor's size / stride / offset.
--
-- torchfile.load(path[, {verify_crc = false}]): verify_crc = true also checks the CRC-32 of
-- every storage record read (data.pkl's is always checked).
local ffi = require "ffi"
local bit = require "bit"
local nemo = require "nemo"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"

local C = nffi.C
local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
local byte, sub, char, format = string.byte, string.sub, string.char, string.format

local M = {}

M.None = setmetatable({}, {__name = "torchfile.None", __tostring = function() return "None" end})
function M.is_none(v) return rawequal(v, M.None) end

-- A Python global that survives into the loaded value (e.g. a class object): {global = "mod.name"}.
local Global = {__name = "torchfile.Global"}
Global.__index = Global
Global.__tostring = function(g) return "<global " .. g.global .. ">" end

local stored = setmetatable({}, {__mode = "k"})
-- The dtype torch stored for a tensor loaded here ("uint8", "bfloat16", ...), or nil.
function M.stored_dtype(t) return stored[t] end

-- ==== CRC-32 (zip's, polynomial 0xEDB88320) ====

local crc_table = ffi.new("uint32_t[256]")
for i = 0, 255 do
    local c = i
    for _ = 1, 8 do
        if band(c, 1) ~= 0 then c = bxor(0xEDB88320, rshift(c, 1)) else c = rshift(c, 1) end
    end
    crc_table[i] = c
end

-- crc32(data[, n[, crc]]): data a Lua string or a pointer to n bytes; returns an unsigned number.
local function crc32(data, n, crc)
    local p
    if type(data) == "string" then
        p = ffi.cast("const uint8_t *", data)
        n = n or #data
    else
        p = ffi.cast("const uint8_t *", data)
    end
    local c = bxor(crc or 0, 0xFFFFFFFF)
    for i = 0, n - 1 do
        c = bxor(crc_table[band(bxor(c, p[i]), 0xFF)], rshift(c, 8))
    end
    c = bxor(c, 0xFFFFFFFF)
    if c < 0 then c = c + 4294967296 end
    return c
end
M.crc32 = crc32

-- ==== little helpers ====

local function u16(s, i) local a, b = byte(s, i, i + 1); return a + b * 256 end
local function u32(s, i)
    local a, b, c, d = byte(s, i, i + 3)
    return a + b * 256 + c * 65536 + d * 16777216
end
local function u64(s, i)        -- exact below 2^53; larger values come back as > 2^53 (caller checks)
    return u32(s, i) + u32(s, i + 4) * 4294967296
end

local function shape_str(t)
    local p = {}
    for i, v in ipairs(t) do p[i] = tostring(v) end
    return "(" .. table.concat(p, ", ") .. (#t == 1 and ",)" or ")")
end

-- ==== the zip archive ====

local Zip = {}
Zip.__index = Zip

-- holder.zip is set as soon as the file is open, so that the caller closes it on any error.
local function zip_open(path, fail, holder)
    local f, err = io.open(path, "rb")
    if not f then fail("cannot open: %s", tostring(err)) end
    local self = setmetatable({f = f, path = path, fail = fail}, Zip)
    holder.zip = self
    local probe, rerr = f:read(0)
    if probe == nil and rerr then fail("cannot read: %s", tostring(rerr)) end
    local size = f:seek("end")
    self.size = size
    if size < 22 then
        f:seek("set", 0)
        local head = f:read(size) or ""
        if head:sub(1, 2) == "\128\2" then
            fail("legacy torch.save format (torch < 1.6, _use_new_zipfile_serialization=False) is not supported; re-save it with torch >= 1.6")
        end
        fail("not a zip archive (torch.save file): only %d bytes", size)
    end
    f:seek("set", 0)
    local head = f:read(4)
    if head ~= "PK\3\4" then
        if head and head:sub(1, 2) == "\128\2" then
            fail("legacy torch.save format (torch < 1.6, _use_new_zipfile_serialization=False) is not supported; re-save it with torch >= 1.6")
        end
        fail("not a zip archive (torch.save file): it does not start with a zip local header")
    end
    -- end of central directory: the last "PK\5\6" whose comment reaches the end of the file
    local tail_len = math.min(size, 22 + 65535)
    f:seek("set", size - tail_len)
    local tail = f:read(tail_len)
    if not tail or #tail ~= tail_len then fail("read error near the end of the file") end
    local eocd
    for i = tail_len - 21, 1, -1 do
        if byte(tail, i) == 0x50 and sub(tail, i, i + 3) == "PK\5\6" and i + 21 + u16(tail, i + 20) == tail_len then
            eocd = i
            break
        end
    end
    if not eocd then
        fail("truncated or corrupt zip archive: no end-of-central-directory record (file is %d bytes)", size)
    end
    local eocd_pos = size - tail_len + eocd - 1          -- 0-based file offset
    local n_entries = u16(tail, eocd + 10)
    local cd_size, cd_off = u32(tail, eocd + 12), u32(tail, eocd + 16)
    -- zip64: a locator 20 bytes before, pointing at the zip64 end of central directory
    if eocd > 20 and sub(tail, eocd - 20, eocd - 17) == "PK\6\7" then
        local z64_off = u64(tail, eocd - 12)
        if z64_off + 56 > eocd_pos then fail("corrupt zip archive: zip64 end-of-central-directory offset %d out of range", z64_off) end
        f:seek("set", z64_off)
        local z = f:read(56)
        if not z or #z ~= 56 or sub(z, 1, 4) ~= "PK\6\6" then
            fail("corrupt zip archive: no zip64 end-of-central-directory record at offset %d", z64_off)
        end
        n_entries, cd_size, cd_off = u64(z, 33), u64(z, 41), u64(z, 49)
        self.cd_end = z64_off
    else
        self.cd_end = eocd_pos
    end
    if cd_off + cd_size > self.cd_end or cd_size > 2^31 then
        fail("truncated or corrupt zip archive: the central directory (offset %d, %d bytes) lies outside the file", cd_off, cd_size)
    end
    f:seek("set", cd_off)
    local cd = cd_size > 0 and f:read(cd_size) or ""
    if not cd or #cd ~= cd_size then fail("truncated zip archive: cannot read the central directory") end
    local entries, order = {}, {}
    local p = 1
    for k = 1, n_entries do
        if p + 45 > cd_size or sub(cd, p, p + 3) ~= "PK\1\2" then
            fail("corrupt zip archive: central directory entry %d of %d is damaged", k, n_entries)
        end
        local flags, method = u16(cd, p + 8), u16(cd, p + 10)
        local crc, csize, usize = u32(cd, p + 16), u32(cd, p + 20), u32(cd, p + 24)
        local nlen, elen, clen = u16(cd, p + 28), u16(cd, p + 30), u16(cd, p + 32)
        local lho = u32(cd, p + 42)
        if p + 45 + nlen + elen + clen > cd_size then
            fail("corrupt zip archive: central directory entry %d of %d runs past its end", k, n_entries)
        end
        local name = sub(cd, p + 46, p + 45 + nlen)
        -- zip64 extended information: the fields that read 0xFFFFFFFF, in this order
        local e, e_end = p + 46 + nlen, p + 45 + nlen + elen
        while e + 3 <= e_end do
            local id, len = u16(cd, e), u16(cd, e + 2)
            if e + 3 + len > e_end then break end
            if id == 1 then
                local q = e + 4
                if usize == 0xFFFFFFFF and q + 7 <= e + 3 + len then usize = u64(cd, q); q = q + 8 end
                if csize == 0xFFFFFFFF and q + 7 <= e + 3 + len then csize = u64(cd, q); q = q + 8 end
                if lho == 0xFFFFFFFF and q + 7 <= e + 3 + len then lho = u64(cd, q) end
            end
            e = e + 4 + len
        end
        entries[name] = {name = name, flags = flags, method = method, crc = crc, csize = csize,
                         usize = usize, lho = lho}
        order[#order + 1] = name
        p = p + 46 + nlen + elen + clen
    end
    self.entries, self.order = entries, order
    return self
end

function Zip:close()
    if self.f then self.f:close(); self.f = nil end
end

local METHODS = {[8] = "deflate", [9] = "deflate64", [12] = "bzip2", [14] = "lzma", [93] = "zstd", [95] = "xz"}

-- Where entry's bytes start, checked: stored, not encrypted, inside the file.
function Zip:locate(e)
    if e.data_off then return e.data_off end
    local fail = self.fail
    if band(e.flags, 1) ~= 0 then fail("zip entry '%s' is encrypted; torch.save never encrypts", e.name) end
    if e.method ~= 0 then
        fail("zip entry '%s' is compressed (method %d, %s); only stored (uncompressed) entries, as torch.save writes them, are supported",
            e.name, e.method, METHODS[e.method] or "unknown")
    end
    if e.csize ~= e.usize then
        fail("corrupt zip entry '%s': stored entry with compressed size %d ~= size %d", e.name, e.csize, e.usize)
    end
    if e.lho + 30 > self.cd_end then fail("corrupt zip entry '%s': local header offset %d out of range", e.name, e.lho) end
    self.f:seek("set", e.lho)
    local h = self.f:read(30)
    if not h or #h ~= 30 or sub(h, 1, 4) ~= "PK\3\4" then
        fail("corrupt zip entry '%s': no local file header at offset %d", e.name, e.lho)
    end
    local off = e.lho + 30 + u16(h, 27) + u16(h, 29)
    if off + e.usize > self.cd_end then
        fail("truncated or corrupt zip entry '%s': its %d bytes at offset %d run past the data area (%d bytes)",
            e.name, e.usize, off, self.cd_end)
    end
    e.data_off = off
    return off
end

-- An entry's bytes as a Lua string (for small entries: data.pkl, byteorder).
function Zip:read(e)
    local off = self:locate(e)
    self.f:seek("set", off)
    local s = e.usize > 0 and self.f:read(e.usize) or ""
    if not s or #s ~= e.usize then self.fail("read error in zip entry '%s'", e.name) end
    return s
end

-- Copy the first n bytes of an entry into dst (a pointer), in chunks.
local CHUNK = 16 * 1024 * 1024
function Zip:read_into(e, dst, n, verify)
    local off = self:locate(e)
    self.f:seek("set", off)
    dst = ffi.cast("uint8_t *", dst)
    local done, crc = 0, 0
    while done < n do
        local k = math.min(CHUNK, n - done)
        local s = self.f:read(k)
        if not s or #s ~= k then self.fail("read error in zip entry '%s'", e.name) end
        ffi.copy(dst + done, s, k)
        if verify then crc = crc32(s, k, crc) end
        done = done + k
    end
    if verify and n == e.usize and e.crc ~= 0 and crc ~= e.crc then
        self.fail("zip entry '%s' is corrupt: CRC-32 %08x, expected %08x", e.name, crc, e.crc)
    end
end

-- ==== dtypes ====

-- torch dtype -> {size = bytes, nemo = dtype it loads as, kind = "native" | "widen" | nil}
local DTYPES = {
    float32 = {size = 4, nemo = "float32"}, float64 = {size = 8, nemo = "float64"},
    float16 = {size = 2, nemo = "float16"}, bfloat16 = {size = 2, nemo = "bfloat16"},
    int64 = {size = 8, nemo = "int64"}, int32 = {size = 4, nemo = "int32"}, bool = {size = 1, nemo = "bool"},
    uint8 = {size = 1, nemo = "int32", ctype = "const uint8_t *"},
    int8 = {size = 1, nemo = "int32", ctype = "const int8_t *"},
    int16 = {size = 2, nemo = "int32", ctype = "const int16_t *"},
    uint16 = {size = 2, nemo = "int32", ctype = "const uint16_t *"},
    uint32 = {size = 4, nemo = "int64", ctype = "const uint32_t *"},
}
-- dtypes torch can store that nemo cannot hold: a clear refusal
local UNSUPPORTED = {
    complex64 = 8, complex128 = 16, complex32 = 4, uint64 = 8, qint8 = 1, qint32 = 4, quint8 = 1,
    quint4x2 = 1, quint2x4 = 1, float8_e5m2 = 1, float8_e4m3fn = 1, float8_e5m2fnuz = 1,
    float8_e4m3fnuz = 1, float8_e8m0fnu = 1, float4_e2m1fn_x2 = 1, bits8 = 1, bits16 = 2,
    bits1x8 = 1, bits2x4 = 1, bits4x2 = 1, bcomplex32 = 4,
}
-- legacy typed storage classes (torch.<Name>Storage) -> dtype
local STORAGE_DTYPE = {
    FloatStorage = "float32", DoubleStorage = "float64", HalfStorage = "float16", BFloat16Storage = "bfloat16",
    LongStorage = "int64", IntStorage = "int32", BoolStorage = "bool", ByteStorage = "uint8",
    CharStorage = "int8", ShortStorage = "int16", ComplexFloatStorage = "complex64",
    ComplexDoubleStorage = "complex128", QInt8Storage = "qint8", QInt32Storage = "qint32",
    QUInt8Storage = "quint8", QUInt4x2Storage = "quint4x2", QUInt2x4Storage = "quint2x4",
}
-- torch.<name> dtype objects (str(dtype) without "torch.") and their aliases
local DTYPE_ALIAS = {float = "float32", double = "float64", half = "float16", long = "int64", int = "int32",
                     short = "int16", cfloat = "complex64", cdouble = "complex128", chalf = "complex32"}
for i = 1, 7 do DTYPE_ALIAS["uint" .. i] = "uint" .. i; DTYPE_ALIAS["int" .. i] = "int" .. i end

-- ==== the pickle VM ====

local OPNAMES = {
    ["("] = "MARK", ["."] = "STOP", ["0"] = "POP", ["1"] = "POP_MARK", ["2"] = "DUP", F = "FLOAT",
    I = "INT", J = "BININT", K = "BININT1", L = "LONG", M = "BININT2", N = "NONE", P = "PERSID",
    Q = "BINPERSID", R = "REDUCE", S = "STRING", T = "BINSTRING", U = "SHORT_BINSTRING", V = "UNICODE",
    X = "BINUNICODE", a = "APPEND", b = "BUILD", c = "GLOBAL", d = "DICT", ["}"] = "EMPTY_DICT",
    e = "APPENDS", g = "GET", h = "BINGET", i = "INST", j = "LONG_BINGET", l = "LIST", ["]"] = "EMPTY_LIST",
    o = "OBJ", p = "PUT", q = "BINPUT", r = "LONG_BINPUT", s = "SETITEM", t = "TUPLE", [")"] = "EMPTY_TUPLE",
    u = "SETITEMS", G = "BINFLOAT", ["\128"] = "PROTO", ["\129"] = "NEWOBJ", ["\130"] = "EXT1",
    ["\131"] = "EXT2", ["\132"] = "EXT4", ["\133"] = "TUPLE1", ["\134"] = "TUPLE2", ["\135"] = "TUPLE3",
    ["\136"] = "NEWTRUE", ["\137"] = "NEWFALSE", ["\138"] = "LONG1", ["\139"] = "LONG4", B = "BINBYTES",
    C = "SHORT_BINBYTES", ["\140"] = "SHORT_BINUNICODE", ["\141"] = "BINUNICODE8", ["\142"] = "BINBYTES8",
    ["\143"] = "EMPTY_SET", ["\144"] = "ADDITEMS", ["\145"] = "FROZENSET", ["\146"] = "NEWOBJ_EX",
    ["\147"] = "STACK_GLOBAL", ["\148"] = "MEMOIZE", ["\149"] = "FRAME", ["\150"] = "BYTEARRAY8",
    ["\151"] = "NEXT_BUFFER", ["\152"] = "READONLY_BUFFER",
}

local f64_buf = ffi.new("union { double d; uint8_t b[8]; }")

-- Python 2 module names a protocol-2 pickle may use (pickle's fix_imports)
local MODULE_ALIAS = {__builtin__ = "builtins", copy_reg = "copyreg"}

-- utf-8 text -> latin-1 bytes (bytes pickled by protocol 2 as _codecs.encode(str, "latin1"))
local function utf8_to_latin1(s, fail)
    local out, i, n = {}, 1, #s
    while i <= n do
        local c = byte(s, i)
        if c < 0x80 then out[#out + 1] = char(c); i = i + 1
        elseif c >= 0xC2 and c <= 0xC3 and i < n then
            out[#out + 1] = char(band(c, 0x1F) * 64 + band(byte(s, i + 1), 0x3F)); i = i + 2
        else fail("bytes object: a character beyond latin-1 in _codecs.encode's text") end
    end
    return table.concat(out)
end

-- Run data.pkl. ctx: {fail = fn(fmt, ...), storage = fn(pid) -> storage object,
-- tensor = fn(storage, offset, size, stride, dtype) -> tensor}.
local function unpickle(s, ctx)
    local fail = ctx.fail
    local n = #s
    local pos = 1
    local stack, sp = {}, 0
    local marks, nmarks = {}, 0
    local memo = {}
    local kind = {}         -- Lua table -> "dict" | "list" | "set" | "tuple" | "storage" | "global"
    local op, op_at         -- the opcode being run (for messages)

    local function err(fmt, ...)
        fail("data.pkl byte %d, opcode %s: " .. fmt, op_at, OPNAMES[op] or format("0x%02x", byte(op)), ...)
    end
    local function need(k)
        if pos + k - 1 > n then err("pickle truncated (needs %d more bytes, %d left)", k, n - pos + 1) end
    end
    local function take(k)
        need(k)
        local v = sub(s, pos, pos + k - 1)
        pos = pos + k
        return v
    end
    local function readline()
        local j = s:find("\n", pos, true)
        if not j then err("pickle truncated (no end of line)") end
        local v = sub(s, pos, j - 1)
        pos = j + 1
        return v
    end
    local function push(v) sp = sp + 1; stack[sp] = v end
    local function pop()
        if sp <= (nmarks > 0 and marks[nmarks] or 0) then err("stack underflow") end
        local v = stack[sp]
        stack[sp] = nil
        sp = sp - 1
        return v
    end
    local function top()
        if sp <= (nmarks > 0 and marks[nmarks] or 0) then err("stack underflow") end
        return stack[sp]
    end
    -- the items above the last mark, removed with the mark
    local function pop_mark()
        if nmarks == 0 then err("no MARK on the stack") end
        local m = marks[nmarks]
        marks[nmarks] = nil
        nmarks = nmarks - 1
        local items = {}
        for i = m + 1, sp do items[i - m] = stack[i]; stack[i] = nil end
        sp = m
        return items
    end
    local function new(k, t) t = t or {}; kind[t] = k; return t end
    local function check_int(v)
        if v > 2^53 or v < -2^53 then err("integer %.17g is beyond 2^53 and cannot be a Lua number exactly", v) end
        return v
    end
    -- little-endian two's complement, as LONG1 / LONG4 store it
    local function decode_long(b)
        local k = #b
        if k == 0 then return 0 end
        local neg = byte(b, k) >= 0x80
        local mag = 0
        for i = k, 1, -1 do
            local c = byte(b, i)
            if neg then c = 255 - c end
            mag = mag * 256 + c
            if mag > 2^53 + 1 then err("integer of %d bytes is beyond 2^53 and cannot be a Lua number exactly", k) end
        end
        if neg then mag = -(mag + 1) end
        return check_int(mag)
    end
    local function is_dict(v) return type(v) == "table" and kind[v] == "dict" end
    local function setitem(d, k, v)
        if k == nil or (type(k) == "number" and k ~= k) then err("dict key NaN cannot be a Lua table key") end
        d[k] = v
    end
    local function dict_from(arg)
        local d = new("dict")
        if arg == nil then return d end
        if is_dict(arg) then for k, v in pairs(arg) do d[k] = v end return d end
        if type(arg) == "table" and (kind[arg] == "list" or kind[arg] == "tuple") then
            for _, kv in ipairs(arg) do
                if type(kv) ~= "table" or #kv ~= 2 then err("dict(): expected (key, value) pairs") end
                setitem(d, kv[1], kv[2])
            end
            return d
        end
        err("dict(): unsupported argument")
    end
    local function str_arg(v, what)
        if type(v) ~= "string" then err("%s: expected a string, got %s", what, type(v)) end
        return v
    end
    local function num_arg(v, what)
        if type(v) ~= "number" or v % 1 ~= 0 then err("%s: expected an integer, got %s", what, tostring(v)) end
        return v
    end
    local function ints_arg(v, what)
        if type(v) ~= "table" or not (kind[v] == "tuple" or kind[v] == "list") then
            err("%s: expected a tuple of integers", what)
        end
        for i = 1, #v do
            if type(v[i]) ~= "number" or v[i] % 1 ~= 0 or v[i] < 0 then
                err("%s: element %d is %s, expected a non-negative integer", what, i, tostring(v[i]))
            end
        end
        return v
    end

    -- rebuild functions: (args) -> value
    local function rebuild(name, a, dtype)
        local st = a[1]
        if type(st) ~= "table" or kind[st] ~= "storage" then err("%s: argument 1 is not a storage", name) end
        local offset = num_arg(a[2], name .. " storage_offset")
        local size = ints_arg(a[3], name .. " size")
        local stride = ints_arg(a[4], name .. " stride")
        if #size ~= #stride then err("%s: size %s and stride %s differ in length", name, shape_str(size), shape_str(stride)) end
        if offset < 0 then err("%s: negative storage offset %d", name, offset) end
        return ctx.tensor(st, offset, size, stride, dtype)
    end
    local REBUILD = {}
    REBUILD["torch._utils._rebuild_tensor"] = function(a) return rebuild("_rebuild_tensor", a) end
    REBUILD["torch._utils._rebuild_tensor_v2"] = function(a) return rebuild("_rebuild_tensor_v2", a) end
    REBUILD["torch._utils._rebuild_tensor_v3"] = function(a)
        if type(a[7]) ~= "string" then err("_rebuild_tensor_v3: argument 7 is not a dtype") end
        return rebuild("_rebuild_tensor_v3", a, a[7])
    end
    local function param(a)
        if not Tensor.is_tensor(a[1]) then err("_rebuild_parameter: argument 1 is not a tensor") end
        return a[1]
    end
    REBUILD["torch._utils._rebuild_parameter"] = param
    REBUILD["torch._utils._rebuild_parameter_with_state"] = param

    local CALLS = {}
    for k, f in pairs(REBUILD) do CALLS[k] = f end
    CALLS["collections.OrderedDict"] = function(a) return dict_from(a[1]) end
    CALLS["collections.Counter"] = CALLS["collections.OrderedDict"]
    CALLS["builtins.dict"] = CALLS["collections.OrderedDict"]
    local function set_of(a)
        local out = new("set")
        local src = a[1]
        if src ~= nil then
            if type(src) ~= "table" or not (kind[src] == "list" or kind[src] == "tuple" or kind[src] == "set") then
                err("set(): expected a list")
            end
            for i, v in ipairs(src) do out[i] = v end
        end
        return out
    end
    CALLS["builtins.set"] = set_of
    CALLS["builtins.frozenset"] = set_of
    CALLS["torch.Size"] = function(a)
        local t = new("tuple")
        for i, v in ipairs(ints_arg(a[1] or new("tuple"), "torch.Size")) do t[i] = v end
        return t
    end
    CALLS["torch.device"] = function(a)
        local d = str_arg(a[1], "torch.device")
        if a[2] ~= nil and a[2] ~= M.None then d = d .. ":" .. tostring(num_arg(a[2], "torch.device index")) end
        return d
    end
    CALLS["_codecs.encode"] = function(a)
        local enc = a[2] and str_arg(a[2], "_codecs.encode encoding"):lower():gsub("[-_]", "") or "utf8"
        local txt = str_arg(a[1], "_codecs.encode")
        if enc == "latin1" or enc == "iso88591" then return utf8_to_latin1(txt, err) end
        if enc == "utf8" or enc == "ascii" then return txt end
        err("_codecs.encode: unsupported encoding '%s'", tostring(a[2]))
    end
    CALLS["builtins.bytearray"] = function(a)
        if a[1] == nil then return "" end
        if a[2] ~= nil then return CALLS["_codecs.encode"](a) end
        return str_arg(a[1], "bytearray")
    end
    CALLS["builtins.bytes"] = CALLS["builtins.bytearray"]
    CALLS["torch.serialization._get_layout"] = function(a) return str_arg(a[1], "_get_layout") end
    CALLS["torch._tensor._rebuild_from_type_v2"] = function(a)
        local fn, ty, args = a[1], a[2], a[3]
        if type(fn) ~= "table" or kind[fn] ~= "global" or not REBUILD[fn.global] then
            err("_rebuild_from_type_v2: argument 1 is not a tensor rebuild function")
        end
        if type(ty) ~= "table" or kind[ty] ~= "global" or
            not (ty.global == "torch.Tensor" or ty.global == "torch._tensor.Tensor" or ty.global == "torch.nn.parameter.Parameter") then
            err("_rebuild_from_type_v2: tensor subclass %s is not supported (only torch.Tensor and nn.Parameter)",
                type(ty) == "table" and tostring(ty.global) or tostring(ty))
        end
        if type(args) ~= "table" or kind[args] ~= "tuple" then err("_rebuild_from_type_v2: argument 3 is not a tuple") end
        return REBUILD[fn.global](args)
    end
    CALLS["torch.nn.parameter.Parameter"] = function(a)       -- NEWOBJ Parameter(data, requires_grad)
        if not Tensor.is_tensor(a[1]) then err("nn.Parameter: argument 1 is not a tensor") end
        return a[1]
    end

    -- Resolve GLOBAL module.name: a callable, a storage class, a dtype, or a forbidden name.
    local function global(module, name)
        module = MODULE_ALIAS[module] or module
        local full = module .. "." .. name
        if CALLS[full] or full == "torch.Tensor" or full == "torch._tensor.Tensor" then
            return new("global", setmetatable({global = full}, Global))
        end
        if module == "torch" or module == "torch.storage" then
            if name == "UntypedStorage" then     -- bytes; _rebuild_tensor_v3 names the dtype
                return new("global", setmetatable({global = full, storage_dtype = "bytes"}, Global))
            end
            if STORAGE_DTYPE[name] then
                return new("global", setmetatable({global = full, storage_dtype = STORAGE_DTYPE[name]}, Global))
            end
            if module == "torch" then
                local dt = DTYPE_ALIAS[name] or name
                if DTYPES[dt] or UNSUPPORTED[dt] then return dt end       -- a dtype object: its name
            end
        end
        if full:match("^torch%._utils%._rebuild_") then
            err("unsupported tensor kind: global %s (quantized, sparse, nested or subclass tensors are not supported)", full)
        end
        err("forbidden global '%s': only tensors and plain Python values are loaded (torch.load weights_only=True rules); nothing is executed",
            full)
    end

    local function call(fn, args, how)
        if type(fn) ~= "table" or kind[fn] ~= "global" then
            err("%s of a %s: only allowed globals can be called", how, type(fn) == "table" and (kind[fn] or "table") or type(fn))
        end
        local f = CALLS[fn.global]
        if not f then err("%s: global '%s' cannot be called", how, fn.global) end
        if type(args) ~= "table" or (kind[args] ~= "tuple" and kind[args] ~= "list") then
            err("%s of '%s': the arguments are not a tuple", how, fn.global)
        end
        return f(args)
    end

    local H = {}
    H["\128"] = function()     -- PROTO
        need(1)
        local v = byte(s, pos); pos = pos + 1
        if v > 5 then err("pickle protocol %d is newer than 5", v) end
    end
    H["\149"] = function() take(8) end                                  -- FRAME: a hint only
    H["."] = function() return true end                                 -- STOP
    H["("] = function() nmarks = nmarks + 1; marks[nmarks] = sp end    -- MARK
    H["0"] = function() pop() end                                       -- POP
    H["1"] = function() pop_mark() end                                  -- POP_MARK
    H["2"] = function() push(top()) end                                 -- DUP
    H.N = function() push(M.None) end
    H["\136"] = function() push(true) end
    H["\137"] = function() push(false) end
    H.K = function() need(1); push(byte(s, pos)); pos = pos + 1 end
    H.M = function() need(2); push(u16(s, pos)); pos = pos + 2 end
    H.J = function()
        need(4)
        local v = u32(s, pos); pos = pos + 4
        if v >= 2^31 then v = v - 2^32 end
        push(v)
    end
    H["\138"] = function() need(1); local k = byte(s, pos); pos = pos + 1; push(decode_long(take(k))) end
    H["\139"] = function()
        need(4)
        local k = u32(s, pos); pos = pos + 4
        if k >= 2^31 then err("negative LONG4 length") end
        push(decode_long(take(k)))
    end
    H.I = function()                  -- INT (protocol 0): "01"/"00" are True/False
        local l = readline()
        if l == "01" then push(true) elseif l == "00" then push(false)
        else
            local v = tonumber(l)
            if not v or v % 1 ~= 0 then err("bad INT text '%s'", l) end
            push(check_int(v))
        end
    end
    H.L = function()
        local l = readline():gsub("L$", "")
        local v = tonumber(l)
        if not v or v % 1 ~= 0 or not l:match("^%-?%d+$") then err("bad LONG text '%s'", l) end
        push(check_int(v))
    end
    H.F = function()
        local l = readline()
        local v = tonumber(l)
        if l == "nan" then v = 0 / 0 elseif l == "inf" then v = math.huge elseif l == "-inf" then v = -math.huge end
        if not v then err("bad FLOAT text '%s'", l) end
        push(v)
    end
    H.G = function()
        need(8)
        for i = 0, 7 do f64_buf.b[7 - i] = byte(s, pos + i) end
        pos = pos + 8
        push(f64_buf.d)
    end
    local function counted(lenbytes)
        need(lenbytes)
        local k
        if lenbytes == 1 then k = byte(s, pos) elseif lenbytes == 4 then k = u32(s, pos) else k = u64(s, pos) end
        pos = pos + lenbytes
        return take(k)
    end
    H.X = function() push(counted(4)) end                                -- BINUNICODE
    H["\140"] = function() push(counted(1)) end                          -- SHORT_BINUNICODE
    H["\141"] = function() push(counted(8)) end                          -- BINUNICODE8
    H.T = function() push(counted(4)) end                                -- BINSTRING
    H.U = function() push(counted(1)) end                                -- SHORT_BINSTRING
    H.B = function() push(counted(4)) end                                -- BINBYTES
    H.C = function() push(counted(1)) end                                -- SHORT_BINBYTES
    H["\142"] = function() push(counted(8)) end                          -- BINBYTES8
    H["\150"] = function() push(counted(8)) end                          -- BYTEARRAY8
    H[")"] = function() push(new("tuple")) end
    H["]"] = function() push(new("list")) end
    H["}"] = function() push(new("dict")) end
    H["\143"] = function() push(new("set")) end
    H.t = function() push(new("tuple", pop_mark())) end
    H.l = function() push(new("list", pop_mark())) end
    H["\145"] = function() push(new("set", pop_mark())) end             -- FROZENSET
    H["\133"] = function() push(new("tuple", {pop()})) end
    H["\134"] = function() local b = pop(); local a = pop(); push(new("tuple", {a, b})) end
    H["\135"] = function() local c = pop(); local b = pop(); local a = pop(); push(new("tuple", {a, b, c})) end
    H.d = function()
        local items = pop_mark()
        if #items % 2 ~= 0 then err("odd number of items") end
        local d = new("dict")
        for i = 1, #items, 2 do setitem(d, items[i], items[i + 1]) end
        push(d)
    end
    H.a = function()
        local v = pop()
        local l = top()
        if type(l) ~= "table" or kind[l] ~= "list" then err("APPEND to something that is not a list") end
        l[#l + 1] = v
    end
    -- the items above the mark appended to the list / set (want) below it
    local function extend(want, opname)
        local items = pop_mark()
        local l = top()
        if type(l) ~= "table" or kind[l] ~= want then err(opname .. " to something that is not a " .. want) end
        local k = #l
        for i = 1, #items do l[k + i] = items[i] end
    end
    H.e = function() extend("list", "APPENDS") end
    H["\144"] = function() extend("set", "ADDITEMS") end                 -- ADDITEMS
    H.s = function()
        local v = pop()
        local k = pop()
        local d = top()
        if not is_dict(d) then err("SETITEM on something that is not a dict") end
        setitem(d, k, v)
    end
    H.u = function()
        local items = pop_mark()
        local d = top()
        if not is_dict(d) then err("SETITEMS on something that is not a dict") end
        if #items % 2 ~= 0 then err("odd number of items") end
        for i = 1, #items, 2 do setitem(d, items[i], items[i + 1]) end
    end
    local function memo_get(i)
        local v = memo[i]
        if v == nil then err("memo key %d was never stored", i) end
        push(v)
    end
    local nmemo = 0         -- len(memo), as MEMOIZE counts
    local function memo_put(i)
        if memo[i] == nil then nmemo = nmemo + 1 end
        memo[i] = top()
    end
    H.h = function() need(1); local i = byte(s, pos); pos = pos + 1; memo_get(i) end
    H.j = function() need(4); local i = u32(s, pos); pos = pos + 4; memo_get(i) end
    H.g = function() local i = tonumber(readline()); if not i then err("bad GET index") end; memo_get(i) end
    H.q = function() need(1); local i = byte(s, pos); pos = pos + 1; memo_put(i) end
    H.r = function() need(4); local i = u32(s, pos); pos = pos + 4; memo_put(i) end
    H.p = function() local i = tonumber(readline()); if not i then err("bad PUT index") end; memo_put(i) end
    H["\148"] = function() memo_put(nmemo) end                          -- MEMOIZE: memo[len(memo)]
    H.c = function()
        local module = readline()
        local name = readline()
        push(global(module, name))
    end
    H["\147"] = function()                                               -- STACK_GLOBAL
        local name = pop()
        local module = pop()
        if type(module) ~= "string" or type(name) ~= "string" then err("module and name must be strings") end
        push(global(module, name))
    end
    H.R = function()
        local args = pop()
        local fn = pop()
        push(call(fn, args, "REDUCE"))
    end
    H["\129"] = function()                                               -- NEWOBJ cls(*args)
        local args = pop()
        local cls = pop()
        push(call(cls, args, "NEWOBJ"))
    end
    H["\146"] = function()                                               -- NEWOBJ_EX cls(*args, **kwargs)
        local kwargs = pop()
        local args = pop()
        local cls = pop()
        if not is_dict(kwargs) or next(kwargs) ~= nil then err("keyword arguments are not supported") end
        push(call(cls, args, "NEWOBJ_EX"))
    end
    H.b = function()                                                     -- BUILD: setstate
        local state = pop()
        local inst = top()
        if state == M.None then return end
        if is_dict(inst) then return end           -- an OrderedDict's __dict__: not kept
        if Tensor.is_tensor(inst) and is_dict(state) then return end      -- Python attributes of a tensor
        err("BUILD (setstate) on a %s is not supported",
            Tensor.is_tensor(inst) and "tensor" or type(inst) == "table" and (kind[inst] or "table") or type(inst))
    end
    H.Q = function()                                                     -- BINPERSID
        local pid = pop()
        push(ctx.storage(pid, kind, err))
    end
    H.P = function() err("text persistent ids are not written by torch.save") end

    while true do
        if pos > n then
            op, op_at = "\0", pos - 1
            fail("data.pkl ends at byte %d without a STOP opcode (truncated pickle)", n)
        end
        op_at = pos - 1
        op = sub(s, pos, pos)
        pos = pos + 1
        local h = H[op]
        if not h then
            if OPNAMES[op] then
                err("opcode not supported (it is never needed for tensors and plain values)")
            end
            fail("data.pkl byte %d: unknown pickle opcode 0x%02x", op_at, byte(op))
        end
        if h() then break end
    end
    return pop(), kind
end

-- ==== load ====

function M.load(path, opts)
    if type(path) ~= "string" then error("torchfile.load: path must be a string, got " .. type(path), 2) end
    opts = opts or {}
    local prefix_msg = "torchfile: " .. path .. ": "
    local function fail(fmt, ...)
        error(prefix_msg .. format(fmt, ...), 0)
    end
    local holder = {}
    local ok, res = pcall(function()
        local zip = zip_open(path, fail, holder)
        -- the archive's folder: the one holding data.pkl (torch names it after the file stem or
        -- "archive"; it may differ from the file's name)
        local prefix
        for _, name in ipairs(zip.order) do
            local p = name:match("^(.*)/data%.pkl$")
            if p and (prefix == nil or #p < #prefix) then prefix = p end
        end
        if prefix == nil then
            if zip.entries["data.pkl"] then prefix = "" else
                local shown = {}
                for i = 1, math.min(#zip.order, 8) do shown[i] = zip.order[i] end
                fail("no data.pkl record in the archive (entries: %s%s); not a torch.save file?",
                    table.concat(shown, ", "), #zip.order > 8 and ", ..." or "")
            end
        end
        local dir = prefix == "" and "" or prefix .. "/"
        local bo = zip.entries[dir .. "byteorder"]
        if bo then
            local v = zip:read(bo)
            if v == "big" then
                fail("the file was written on a big-endian machine (byteorder 'big'); only little-endian files are supported")
            elseif v ~= "little" then
                fail("unknown byteorder record '%s'", v:sub(1, 20))
            end
        end
        local pkl_entry = zip.entries[dir .. "data.pkl"]
        local pkl = zip:read(pkl_entry)
        if pkl_entry.crc ~= 0 and #pkl > 0 and crc32(pkl) ~= pkl_entry.crc then
            fail("data.pkl is corrupt: CRC-32 %08x, expected %08x", crc32(pkl), pkl_entry.crc)
        end

        local storages = {}     -- key -> storage object
        local ctx = {fail = fail}
        function ctx.storage(pid, kind, err)
            if type(pid) ~= "table" or kind[pid] ~= "tuple" or pid[1] ~= "storage" then
                err("persistent id is not a ('storage', ...) tuple; only tensor storages are loaded")
            end
            if #pid ~= 5 then err("storage persistent id has %d fields, expected 5", #pid) end
            local stype, key, location, numel = pid[2], pid[3], pid[4], pid[5]
            if type(stype) ~= "table" or kind[stype] ~= "global" or not stype.storage_dtype then
                err("storage persistent id: field 2 is not a torch storage class")
            end
            if type(key) ~= "string" then err("storage persistent id: key is not a string") end
            if type(numel) ~= "number" or numel < 0 or numel % 1 ~= 0 then err("storage persistent id: bad element count") end
            local dtype = stype.storage_dtype
            if dtype ~= "bytes" and not DTYPES[dtype] then
                err("%s tensors (storage %s) are not supported by nemo", dtype, stype.global)
            end
            local st = storages[key]
            if st then
                if st.dtype ~= dtype then
                    err("storage '%s' is used as both %s and %s", key, st.dtype, dtype)
                end
                return st
            end
            local rec = zip.entries[dir .. "data/" .. key]
            if not rec then fail("missing storage record '%sdata/%s' (the zip lacks it)", dir, key) end
            local nbytes = dtype == "bytes" and numel or numel * DTYPES[dtype].size
            if rec.usize < nbytes then
                fail("storage record '%sdata/%s' holds %d bytes, but its storage has %d elements of %s (%d bytes)",
                    dir, key, rec.usize, numel, dtype, nbytes)
            end
            st = {key = key, dtype = dtype, nbytes = nbytes, rec = rec, location = location, views = {}}
            kind[st] = "storage"
            storages[key] = st
            return st
        end

        -- the bytes of a storage seen as elements of dtype: a nemo tensor (native dtypes) or raw bytes
        local function base_of(st, dtype)
            local b = st.views[dtype]
            if b then return b end
            local info = DTYPES[dtype]
            local numel = math.floor(st.nbytes / info.size)
            if info.ctype then
                local buf = ffi.new("uint8_t[?]", st.nbytes > 0 and st.nbytes or 1)
                if st.nbytes > 0 then zip:read_into(st.rec, buf, st.nbytes, opts.verify_crc) end
                b = {raw = buf, numel = numel}
            else
                local t = nemo.empty({numel}, {dtype = info.nemo})
                if st.nbytes > 0 then zip:read_into(st.rec, C.nemo_tensor_data(t._c), st.nbytes, opts.verify_crc) end
                b = {tensor = t, numel = numel}
            end
            st.views[dtype] = b
            return b
        end

        function ctx.tensor(st, offset, size, stride, dtype)
            local sdt = st.dtype
            if dtype == nil then
                if sdt == "bytes" then fail("a tensor of an untyped storage ('%s') without a dtype", st.key) end
                dtype = sdt
            elseif sdt ~= "bytes" and sdt ~= dtype then
                fail("a %s tensor of the %s storage '%s' is not supported", dtype, sdt, st.key)
            end
            if UNSUPPORTED[dtype] then fail("%s tensors are not supported by nemo", dtype) end
            local info = DTYPES[dtype]
            if not info then fail("unknown tensor dtype '%s'", tostring(dtype)) end
            if #size > 8 then fail("a tensor of %d dimensions %s: nemo tensors have at most 8", #size, shape_str(size)) end
            if sdt == "bytes" and st.nbytes % info.size ~= 0 then
                fail("untyped storage '%s' of %d bytes is not a whole number of %s elements", st.key, st.nbytes, dtype)
            end
            local cap = math.floor(st.nbytes / info.size)
            local numel, hi = 1, offset
            for i = 1, #size do
                numel = numel * size[i]
                if size[i] > 0 then hi = hi + stride[i] * (size[i] - 1) end
            end
            if numel > 0 and hi >= cap then
                fail("storage '%s' holds %d %s elements, too small for a tensor of size %s, stride %s and offset %d (needs %d)",
                    st.key, cap, dtype, shape_str(size), shape_str(stride), offset, hi + 1)
            end
            local b = base_of(st, dtype)
            local ndim = #size
            local t
            if b.tensor then
                t = Tensor.wrap(C.nemo_tensor_view(b.tensor._c, ndim, Tensor.int64s(size, ndim),
                    Tensor.int64s(stride, ndim), offset))
            else
                -- widen an 8/16-bit or uint32 integer tensor into a contiguous int32 / int64 copy
                t = nemo.empty(size, {dtype = info.nemo})
                if numel > 0 then
                    local src = ffi.cast(info.ctype, b.raw)
                    local dst = ffi.cast(info.nemo == "int64" and "int64_t *" or "int32_t *", C.nemo_tensor_data(t._c))
                    local idx = {}
                    for d = 1, ndim do idx[d] = 0 end
                    local at = offset
                    for k = 0, numel - 1 do
                        dst[k] = src[at]
                        local d = ndim
                        while d >= 1 do
                            idx[d] = idx[d] + 1
                            at = at + stride[d]
                            if idx[d] < size[d] then break end
                            at = at - stride[d] * size[d]
                            idx[d] = 0
                            d = d - 1
                        end
                    end
                end
            end
            stored[t] = dtype
            return t
        end

        local value, kind = unpickle(pkl, ctx)
        -- a storage left as a value (torch.save(storage)) becomes a 1-D tensor of its elements
        local seen = {}
        local function finish(v)
            if type(v) ~= "table" or seen[v] or Tensor.is_tensor(v) then return v end
            seen[v] = true
            if kind[v] == "storage" then
                local dt = v.dtype == "bytes" and "uint8" or v.dtype
                return ctx.tensor(v, 0, {math.floor(v.nbytes / DTYPES[dt].size)}, {1}, dt)
            end
            if kind[v] == "global" then return v end
            for k, x in pairs(v) do
                local y = finish(x)
                if y ~= x then v[k] = y end
            end
            return v
        end
        return finish(value)
    end)
    if holder.zip then holder.zip:close() end
    if not ok then
        res = tostring(res)
        if res:sub(1, #prefix_msg) ~= prefix_msg then res = prefix_msg .. "internal error: " .. res end
        error(res, 2)
    end
    return res
end

return M
