#!/usr/bin/env python3
"""tests/golden/torch_save/make_fixtures.py: writes the torch.save() fixtures that
tests/lua/test_torchfile.lua reads with nemo.torchfile. Kept as a record of how they were made;
nothing in the project runs it (the Lua test needs no Python).

    /tmp/wanref/bin/python tests/golden/torch_save/make_fixtures.py   (torch 2.x, safetensors)

Good fixtures, each with two twins the test compares against:
  <name>.pt (or .meta)          what torch.save wrote
  <name>.expected.json          the value as a tagged tree (below)
  <name>.expected.safetensors   every tensor of the value, contiguous, under the key its
                                tensor node names ("t0", "t1", ...). uint8/int8/int16/uint16 are
                                stored as int32 and uint32 as int64: what nemo.torchfile gives
                                (nemo has no 8/16-bit integer dtypes).
Tagged tree: {"t": "dict", "items": [[key, value], ...]} | {"t": "list"|"tuple"|"set", "items": [...]}
  | {"t": "none"} | {"t": "bool"|"int"|"str", "v": ...} | {"t": "float", "v": number or "inf",
  "-inf", "nan", "-0.0"} | {"t": "bytes", "hex": "..."} | {"t": "dtype"|"device", "v": "..."}
  | {"t": "tensor", "key", "torch_dtype", "dtype" (nemo's), "shape", "stride", "offset",
     "storage" (a storage id: tensors with one id share one storage in torch)}

Error fixtures (err_*.pt): a forbidden global (os.system), a compressed data.pkl, a big-endian
byteorder record, a missing storage record, no data.pkl, a storage too small for a tensor's
size/stride/offset, a storage record shorter than its element count, an int beyond 2^53, a
float8 tensor, a persistent id that is not a storage, the legacy (pre-1.6) format.
"""
import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
WIDEN = {torch.uint8: torch.int32, torch.int8: torch.int32, torch.int16: torch.int32,
         torch.uint16: torch.int32, torch.uint32: torch.int64}
NEMO_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
               torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}


def dtype_name(dt):
    return str(dt).replace("torch.", "")


def describe(value):
    """The tagged tree of value, and the tensors it names."""
    tensors = {}
    storage_ids = {}

    def walk(v):
        if isinstance(v, torch.Tensor):
            key = "t%d" % len(tensors)
            out_dtype = WIDEN.get(v.dtype, v.dtype)
            tensors[key] = v.detach().to(out_dtype).contiguous().clone()
            ptr = v.untyped_storage().data_ptr()
            sid = storage_ids.setdefault(ptr, "s%d" % len(storage_ids))
            return {"t": "tensor", "key": key, "torch_dtype": dtype_name(v.dtype),
                    "dtype": NEMO_DTYPES[out_dtype], "shape": list(v.shape), "stride": list(v.stride()),
                    "offset": v.storage_offset(), "storage": sid}
        if v is None:
            return {"t": "none"}
        if isinstance(v, bool):
            return {"t": "bool", "v": v}
        if isinstance(v, int):
            return {"t": "int", "v": v}
        if isinstance(v, float):
            if math.isnan(v):
                return {"t": "float", "v": "nan"}
            if math.isinf(v):
                return {"t": "float", "v": "inf" if v > 0 else "-inf"}
            if v == 0 and math.copysign(1, v) < 0:
                return {"t": "float", "v": "-0.0"}
            return {"t": "float", "v": v}
        if isinstance(v, str):
            return {"t": "str", "v": v}
        if isinstance(v, (bytes, bytearray)):
            return {"t": "bytes", "hex": bytes(v).hex()}
        if isinstance(v, torch.dtype):
            return {"t": "dtype", "v": dtype_name(v)}
        if isinstance(v, torch.device):
            return {"t": "device", "v": str(v)}
        if isinstance(v, dict):
            return {"t": "dict", "items": [[walk(k), walk(x)] for k, x in v.items()]}
        if isinstance(v, torch.Size):
            return {"t": "tuple", "items": [walk(x) for x in v]}
        if isinstance(v, tuple):
            return {"t": "tuple", "items": [walk(x) for x in v]}
        if isinstance(v, list):
            return {"t": "list", "items": [walk(x) for x in v]}
        if isinstance(v, (set, frozenset)):
            return {"t": "set", "items": [walk(x) for x in sorted(v)]}
        raise TypeError(type(v))

    return walk(value), tensors


def write_good(name, value, **save_kw):
    path = os.path.join(HERE, name)
    buffer = save_kw.pop("buffer", False)
    if buffer:   # saved through a file object: the archive prefix is "archive", not the stem
        b = io.BytesIO()
        torch.save(value, b, **save_kw)
        with open(path, "wb") as f:
            f.write(b.getvalue())
    else:
        torch.save(value, path, **save_kw)
    # what torch itself reads back must be what we describe
    back = torch.load(path, weights_only=False)
    tree, tensors = describe(back)
    if tree != describe(value)[0]:
        # storage ids may be numbered differently only if sharing differs: that would be a bug
        raise AssertionError("round trip differs for " + name)
    stem = name.rsplit(".", 1)[0]
    with zipfile.ZipFile(path) as z:
        prefix = z.namelist()[0].split("/")[0]
    with open(os.path.join(HERE, stem + ".expected.json"), "w", encoding="utf-8") as f:
        json.dump({"file": name, "archive_prefix": prefix, "value": tree}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    save_file(tensors if tensors else {"none": torch.zeros(0)},
              os.path.join(HERE, stem + ".expected.safetensors"))


def flux_sample():
    g = torch.Generator().manual_seed(1)
    return {
        "latent": torch.randn(16, 8, 12, generator=g).half(),
        "prompt_embeds": torch.randn(1, 20, 32, generator=g).bfloat16(),
        "pooled_prompt_embeds": torch.randn(1, 24, generator=g).bfloat16(),
        "clip_hidden": torch.randn(1, 7, 24, generator=g).bfloat16(),
        "clip_tokens": torch.randint(0, 49408, (1, 77), generator=g),
        "t5_tokens": torch.cat([torch.randint(0, 32128, (1, 19), generator=g),
                                torch.tensor([[2 ** 40 + 3]])], 1),
        "original_resolution": (1024, 768),
        "bucket_resolution": (96, 64),
        "crop_offset": [0, 16],
        "prompt": "A café in Zürich at night — 東京の夜景 🌃, \"quoted\"\nsecond line",
        "image_path": "/data/images/café/0001.jpg",
        "bucket_id": 7,
        "aspect_ratio": 1.3333333333333333,
        "model_type": "flux",
        "negative_prompt": None,
    }


def wan_sample():
    g = torch.Generator().manual_seed(2)
    return {
        "video_latents": torch.randn(1, 16, 3, 6, 8, generator=g).half(),
        "text_embeddings": torch.randn(1, 226, 8, generator=g).bfloat16(),
        "first_frame": torch.randint(0, 256, (6, 8, 3), generator=g, dtype=torch.uint8),
        "num_frames": 9,
        "deterministic_latents": True,
        "model_type": "wan",
        "prompt": "a cat surfing a wave, slow motion",
        "video_path": "/data/videos/cat.mp4",
        "original_resolution": [1280, 720],
        "bucket_resolution": [64, 48],
        "fps": 16.0,
        "mode": None,
    }


def edge_sample():
    g = torch.Generator().manual_seed(3)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shared = torch.randn(20, generator=g)
    f32 = torch.tensor([1.5, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -3.4e38])
    f16 = torch.tensor([1.0, -2.5, 65504.0, 6e-8, float("inf"), -0.0], dtype=torch.float16)
    bf16 = torch.tensor([1.0, -2.5, 3.0e38, 1e-40, float("-inf"), float("nan")], dtype=torch.bfloat16)
    big = torch.arange(60, dtype=torch.float64).reshape(3, 4, 5)
    d = collections.OrderedDict()
    d["transposed"] = base.t()                                  # stride (1, 4)
    d["shared_base"] = shared
    d["shared_a"] = shared[2:8].view(2, 3)                     # offset 2
    d["shared_b"] = shared[10:20:2]                            # offset 10, stride 2
    d["shared_c"] = shared.view(4, 5)[1:, 2:]                  # offset 7, stride (5, 1)
    d["f32"] = f32
    d["f64"] = torch.tensor([math.pi, -1e-300, 1e300, -0.0, float("nan")], dtype=torch.float64)
    d["f16"] = f16
    d["bf16"] = bf16
    d["f64_view"] = big.permute(2, 0, 1)[1:4, :, ::2]          # permuted, sliced, stepped
    d["i32"] = torch.tensor([[-2 ** 31, 2 ** 31 - 1], [0, -7]], dtype=torch.int32)
    d["i64"] = torch.tensor([-2 ** 63, 2 ** 63 - 1, 2 ** 53 + 1, -1], dtype=torch.int64)
    d["bool"] = torch.tensor([[True, False, True], [False, False, True]])
    d["u8"] = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    d["i8"] = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
    d["i16"] = torch.tensor([-32768, -1, 32767], dtype=torch.int16)[::2]
    d["u16"] = torch.tensor([0, 1, 65535], dtype=torch.uint16)      # saved with _rebuild_tensor_v3
    d["u32"] = torch.tensor([0, 4294967295, 7], dtype=torch.uint32)
    d["scalar"] = torch.tensor(3.5)
    d["scalar_int"] = torch.tensor(-7)
    d["empty"] = torch.zeros(0, 3)
    d["empty_bf16"] = torch.empty(0, dtype=torch.bfloat16)
    d["expanded"] = torch.arange(3).expand(4, 3)               # stride (0, 1)
    d["high_rank"] = torch.arange(2 ** 7, dtype=torch.int32).reshape(2, 2, 2, 2, 2, 2, 2)
    d["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    d["needs_grad"] = torch.randn(3, generator=g).requires_grad_(True)
    d["tensor_list"] = [torch.ones(2, dtype=torch.float16), base]        # base shared with transposed
    t_alias = torch.full((2,), 9.0)
    d["alias1"] = t_alias
    d["alias2"] = t_alias                                      # the same tensor twice (memo)
    d["nested"] = {"a": [1, 2.5, "x", None, True, False, (3, 4), []],
                   "b": {"c": {"d": [[], {}]}, "e": (), 0: "int key", -3: "negative key", 2 ** 40: "big key"},
                   "ordered": collections.OrderedDict([("x", 1), ("y", [2, 3])])}
    d["ints"] = [0, 1, -1, 255, 256, 65535, 65536, 2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 1,
                 2 ** 40 + 1, -(2 ** 45), 2 ** 53, -(2 ** 53)]
    d["floats"] = [-1.5, -1e-300, 1e300, 0.1, -0.0, float("inf"), float("-inf"), 5e-324]
    d["strings"] = ["", "x" * 300, "ünïcødé ✓ 𝄞", "tab\tnul\x00end"]
    d["bytes"] = b"\x00\x01\xfe\xff abc"
    d["a_set"] = {3}
    d["size"] = torch.Size([2, 3])
    d["dtype"] = torch.bfloat16
    d["device"] = torch.device("cpu")
    d["true"] = True
    d["none"] = None
    return d


def meta_sample():
    return {"prompt": "only metadata, no tensors", "bucket_resolution": (64, 64), "num_frames": 1,
            "aspect_ratio": 1.0, "extra": None}


# ==== error fixtures ====

def write_zip(name, entries, compress=()):
    """A zip as torch writes it (stored entries) from {name: bytes}; names in compress deflated."""
    with zipfile.ZipFile(os.path.join(HERE, name), "w") as z:
        for n, data in entries.items():
            info = zipfile.ZipInfo(n, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if n in compress else zipfile.ZIP_STORED
            z.writestr(info, data)


def entries_of(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


class FakeStorage:
    def __init__(self, pid):
        self.pid = pid


class PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, FakeStorage) else None


class Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    def __init__(self, pid, offset, size, stride):
        self.args = (FakeStorage(pid), offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def pid_pickle(obj):
    b = io.BytesIO()
    PidPickler(b, protocol=2).dump(obj)
    return b.getvalue()


def write_errors():
    little = b"little"
    # os.system through GLOBAL, written by hand (pickle itself would name it posix.system)
    evil = b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwned!\x85q\x01Rq\x02."
    write_zip("err_global.pt", {"err_global/data.pkl": evil, "err_global/byteorder": little})
    good = entries_of(os.path.join(HERE, "flux_sample.pt"))
    write_zip("err_compressed.pt", {n.replace("flux_sample/", "err_compressed/"): v for n, v in good.items()},
              compress={"err_compressed/data.pkl"})
    big = dict(good)
    big["flux_sample/byteorder"] = b"big"
    write_zip("err_bigendian.pt", big)
    missing = {n: v for n, v in good.items() if n != "flux_sample/data/3"}
    write_zip("err_missing_storage.pt", missing)
    nopkl = {n: v for n, v in good.items() if n != "flux_sample/data.pkl"}
    write_zip("err_no_pkl.pt", nopkl)
    # storage of 4 floats, tensor of size (2, 3): needs 6
    pkl = pid_pickle({"w": Rebuild(("storage", torch.FloatStorage, "0", "cpu", 4), 0, (2, 3), (3, 1))})
    write_zip("err_small_storage.pt", {"err_small_storage/data.pkl": pkl,
                                        "err_small_storage/data/0": struct.pack("<4f", 1, 2, 3, 4)})
    # storage of 4 floats with offset 3 and size (2,): needs elements 3 and 4
    pkl = pid_pickle({"w": Rebuild(("storage", torch.FloatStorage, "0", "cpu", 4), 3, (2,), (1,))})
    write_zip("err_offset.pt", {"err_offset/data.pkl": pkl, "err_offset/data/0": struct.pack("<4f", 1, 2, 3, 4)})
    # the storage claims 8 floats but the record has 16 bytes
    pkl = pid_pickle({"w": Rebuild(("storage", torch.FloatStorage, "0", "cpu", 8), 0, (8,), (1,))})
    write_zip("err_short_record.pt", {"err_short_record/data.pkl": pkl,
                                       "err_short_record/data/0": struct.pack("<4f", 1, 2, 3, 4)})
    # a persistent id that is not a storage
    pkl = pid_pickle({"w": FakeStorage(("module", "x"))})
    write_zip("err_pid.pt", {"err_pid/data.pkl": pkl})
    torch.save({"x": 2 ** 63 - 1}, os.path.join(HERE, "err_bigint.pt"))
    torch.save({"x": torch.zeros(4, dtype=torch.float8_e4m3fn)}, os.path.join(HERE, "err_float8.pt"))
    torch.save({"x": torch.zeros(2)}, os.path.join(HERE, "err_legacy.pt"), _use_new_zipfile_serialization=False)


def main():
    for f in os.listdir(HERE):
        if f.endswith((".pt", ".meta", ".expected.json", ".expected.safetensors")):
            os.remove(os.path.join(HERE, f))
    write_good("flux_sample.pt", flux_sample())
    write_good("flux_sample_p4.pt", flux_sample(), pickle_protocol=4, buffer=True)
    write_good("wan_sample.pt", wan_sample())
    write_good("edge.pt", edge_sample())
    write_good("edge_p4.pt", edge_sample(), pickle_protocol=4)
    write_good("sample.meta", meta_sample())
    write_errors()
    for f in os.listdir(HERE):
        if f != os.path.basename(__file__):
            os.chmod(os.path.join(HERE, f), 0o644)
    total = sum(os.path.getsize(os.path.join(HERE, f)) for f in os.listdir(HERE))
    print("fixtures: %d files, %d bytes" % (len(os.listdir(HERE)), total))


if __name__ == "__main__":
    main()
