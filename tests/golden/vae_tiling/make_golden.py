#!/usr/bin/env python3
"""tests/golden/vae_tiling/make_golden.py: diffusers' tiled VAE encode and decode (enable_tiling)
on the two tiny VAEs of tests/golden (vae_tiny: AutoencoderKL, wan_vae_tiny: AutoencoderKLWan),
for tests/lua/test_vae_tiling.lua.

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/vae_tiling/make_golden.py    (diffusers 0.40.0, torch 2.15, CPU)

What it does:
  1. Loads ../vae_tiny and ../wan_vae_tiny with from_pretrained (float32) and turns tiling on:
     AutoencoderKL.enable_tiling() (its tiles come from config.sample_size = 32: 32-pixel image
     tiles, 16-latent tiles, overlap factor 0.25); AutoencoderKLWan.enable_tiling(32, 32, 24, 16):
     32x32-pixel tiles, strides 24 (height) and 16 (width), so the blend widths differ per axis.
  2. Inputs from torch.Generator(3), in this order:
       kl.image  0.5 randn (2, 3, 56, 80): tiles at 0/24/48 x 0/24/48/72 (edge tiles 8 pixels)
       kl.latent     randn (1, 4, 40, 30): tiles at 0/12/24/36 x 0/12/24, an odd width
       wan.video 0.5 randn (1, 3, 5, 40, 72): latent (1, 4, 2, 5, 9)
       wan.latent    randn (1, 4, 2, 7, 6): decoded as 5 frames, 56 x 48
  3. Outputs: kl.image.mean / .logvar (encode(kl.image).latent_dist), kl.latent.decode
     (decode(kl.latent).sample), wan.video.mean / .logvar, wan.latent.decode. The same without
     tiling is computed too: golden.json records how far the tiled results are from it (the
     tiles are blended, so they differ), and its float32-vs-float64 error.
  4. case.safetensors: float32 inputs and outputs. case_f64.safetensors: the outputs of the models
     in float64 on the float64 inputs; for the Wan VAE with WanUpsample's float32 cast removed, as
     in ../wan_vae_tiny/make_golden.py (a float64 run without it rounds to float32 once per
     upsample). Exact float64 references check the tiling's slicing and blend weights tightly.
  5. golden.json: the tile settings, shapes, measured f32-vs-f64 errors, versions, each file's sha256.
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import hashlib
import json
import platform

import torch
import diffusers
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan as wan_mod
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
WAN_TILING = dict(tile_sample_min_height=32, tile_sample_min_width=32,
                  tile_sample_stride_height=24, tile_sample_stride_width=16)


def upsample_no_cast(self, x):
    return torch.nn.Upsample.forward(self, x)


def load(dtype):
    kl = AutoencoderKL.from_pretrained(os.path.join(GOLDEN, "vae_tiny")).eval().to(dtype)
    wan = AutoencoderKLWan.from_pretrained(os.path.join(GOLDEN, "wan_vae_tiny")).eval().to(dtype)
    return kl, wan


def run(kl, wan, inputs, dtype):
    out = {}
    with torch.no_grad():
        for tiled in (True, False):
            sfx = "" if tiled else ".untiled"
            if tiled:
                kl.enable_tiling()
                wan.enable_tiling(**WAN_TILING)
            else:
                kl.disable_tiling()
                wan.disable_tiling()
            post = kl.encode(inputs["kl.image"].to(dtype)).latent_dist
            out["kl.image.mean" + sfx] = post.mean
            out["kl.image.logvar" + sfx] = post.logvar
            out["kl.latent.decode" + sfx] = kl.decode(inputs["kl.latent"].to(dtype)).sample
            post = wan.encode(inputs["wan.video"].to(dtype)).latent_dist
            out["wan.video.mean" + sfx] = post.mean
            out["wan.video.logvar" + sfx] = post.logvar
            out["wan.latent.decode" + sfx] = wan.decode(inputs["wan.latent"].to(dtype)).sample
    return {k: v.contiguous() for k, v in out.items()}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    g = torch.Generator().manual_seed(3)
    inputs = {
        "kl.image": 0.5 * torch.randn((2, 3, 56, 80), generator=g),
        "kl.latent": torch.randn((1, 4, 40, 30), generator=g),
        "wan.video": 0.5 * torch.randn((1, 3, 5, 40, 72), generator=g),
        "wan.latent": torch.randn((1, 4, 2, 7, 6), generator=g),
    }
    kl, wan = load(torch.float32)
    assert kl.tile_sample_min_size == 32 and kl.tile_latent_min_size == 16
    out32 = run(kl, wan, inputs, torch.float32)

    kl64, wan64 = load(torch.float64)
    saved = wan_mod.WanUpsample.forward
    wan_mod.WanUpsample.forward = upsample_no_cast
    try:
        out64 = run(kl64, wan64, {k: v.double() for k, v in inputs.items()}, torch.float64)
    finally:
        wan_mod.WanUpsample.forward = saved

    errors, tiling_effect = {}, {}
    for k, ref in out64.items():
        d = float((out32[k].double() - ref).abs().max())
        errors[k] = {"max_abs": d, "rel_max": d / float(ref.abs().max())}
        if not k.endswith(".untiled"):
            u = out64[k + ".untiled"]
            if u.shape == ref.shape:
                tiling_effect[k] = float((u - ref).abs().max())
            else:
                tiling_effect[k] = "shape %s vs untiled %s" % (list(ref.shape), list(u.shape))

    case = dict(inputs)
    case.update({k: v for k, v in out32.items() if not k.endswith(".untiled")})
    save_file({k: v.contiguous() for k, v in case.items()}, os.path.join(HERE, "case.safetensors"))
    save_file({k: v for k, v in out64.items() if not k.endswith(".untiled")}, os.path.join(HERE, "case_f64.safetensors"))
    for n in ("case.safetensors", "case_f64.safetensors"):
        os.chmod(os.path.join(HERE, n), 0o644)

    meta = {
        "name": "vae_tiling",
        "note": "diffusers' enable_tiling on vae_tiny (AutoencoderKL) and wan_vae_tiny (AutoencoderKLWan)",
        "models": {"kl": "../vae_tiny", "wan": "../wan_vae_tiny"},
        "kl_tiling": {"tile_sample_min_size": kl.tile_sample_min_size,
                      "tile_latent_min_size": kl.tile_latent_min_size,
                      "tile_overlap_factor": kl.tile_overlap_factor},
        "wan_tiling": WAN_TILING,
        "shapes": {k: list(v.shape) for k, v in case.items()},
        "f32_vs_f64": errors,
        "max_abs_tiled_minus_untiled_f64": tiling_effect,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "sha256": {n: sha(os.path.join(HERE, n)) for n in ("case.safetensors", "case_f64.safetensors")},
    }
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({"f32_vs_f64": errors, "tiling_effect": tiling_effect}, indent=1))


if __name__ == "__main__":
    main()
