#!/usr/bin/env python3
"""tests/golden/wan22_vae_tiny/make_golden.py: a tiny random AutoencoderKLWan in the Wan 2.2 layout
(is_residual = true: residual down / up blocks with AvgDown3D / DupUp3D shortcuts, patch_size 2:
patchify / unpatchify around the encoder and decoder), run by diffusers, for
tests/lua/test_wan22_vae.lua (nemo.models.wan_vae).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/wan22_vae_tiny/make_golden.py    (diffusers 0.40.0, torch 2.15, CPU)

What it does:
  1. AutoencoderKLWan(base_dim=4, decoder_base_dim=6, z_dim=4, dim_mult=[1, 2, 2, 2],
     num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True], is_residual=True,
     in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
     scale_factor_temporal=4, latents_mean / latents_std of 4 entries): the Wan 2.2 (TI2V-5B)
     VAE's structure, narrow; the decoder's last up block halves its channels (12 -> 6), so
     DupUp3D repeats channels twice there. torch.manual_seed(0) then diffusers' default init;
     every RMS_norm gamma becomes 1 + 0.1 randn from torch.Generator(1) in named_parameters
     order (the residual shortcuts already put some decoded values past the clamp).
     save_pretrained -> config.json and diffusion_pytorch_model.safetensors (float32).
  2. Inputs from torch.Generator(2): v5.input = 0.5 randn (1, 3, 5, 32, 32) (latent
     (1, 4, 2, 2, 2)), v9.input = 0.5 randn (2, 3, 9, 16, 32) (batch 2, non-square, three
     chunks); tl.input = 0.5 randn (1, 3, 5, 48, 80) for the tiled run.
  3. For v5 and v9: <v>.mean, <v>.logvar = encode(input).latent_dist, <v>.decode =
     decode(mean).sample. Tiled (enable_tiling(32, 32, 16, 16): patch_size 2 changes the
     tile arithmetic): tl.mean / tl.logvar, tl.decode = decode(tl.mean).sample.
  4. case.safetensors (float32) and case_f64exact.safetensors (float64, with WanUpsample's float32
     round trip removed as in ../wan_vae_tiny/make_golden.py).
  5. golden.json: the config, shapes, state_dict_keys in order, the real Wan 2.2 VAE's parameter
     names and shapes ("default_config_params"), measured f32-vs-f64 errors, versions, sha256s.
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import hashlib
import json
import platform
import shutil
import tempfile

import torch
import diffusers
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan as wan_mod
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = dict(base_dim=4, decoder_base_dim=6, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
              temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12,
              out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
              latents_mean=[-0.25, 0.5, 0.125, -1.0], latents_std=[1.5, 0.75, 2.0, 1.25])
# the real Wan 2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json), for its parameter list
WAN22 = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12,
             out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
CONV_OUT_SCALE = 1.0
CASES = [("v5", (1, 3, 5, 32, 32)), ("v9", (2, 3, 9, 16, 32))]
TILED = ("tl", (1, 3, 5, 48, 80))
TILING = (32, 32, 16, 16)


def build():
    torch.manual_seed(0)
    model = AutoencoderKLWan(**CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32))
        model.decoder.conv_out.weight.mul_(CONV_OUT_SCALE)
    return model


def run(model, inputs, dtype):
    out = {}
    with torch.no_grad():
        for name, x in inputs.items():
            if name == TILED[0]:
                model.enable_tiling(*TILING)
            else:
                model.disable_tiling()
            post = model.encode(x.to(dtype)).latent_dist
            out[name + ".mean"] = post.mean
            out[name + ".logvar"] = post.logvar
            out[name + ".decode"] = model.decode(post.mean).sample
    model.disable_tiling()
    return {k: v.contiguous() for k, v in out.items()}


def upsample_no_cast(self, x):
    return torch.nn.Upsample.forward(self, x)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def err(a, ref):
    d = float((a.double() - ref.double()).abs().max())
    return {"max_abs": d, "rel_max": d / float(ref.double().abs().max())}


def main():
    default = AutoencoderKLWan(**WAN22)
    default_params = {k: "x".join(str(d) for d in v.shape) for k, v in default.state_dict().items()}
    default_params["_count"] = sum(p.numel() for p in default.parameters())
    del default

    model = build()
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    for name in os.listdir(HERE):
        if name != "make_golden.py":
            os.remove(os.path.join(HERE, name))
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(tmp, name), os.path.join(HERE, name))
    shutil.rmtree(tmp)
    model = AutoencoderKLWan.from_pretrained(HERE).eval()

    g = torch.Generator().manual_seed(2)
    inputs = {name: 0.5 * torch.randn(shape, generator=g, dtype=torch.float32) for name, shape in CASES + [TILED]}
    case32 = {name + ".input": x for name, x in inputs.items()}
    case32.update(run(model, inputs, torch.float32))

    model64 = AutoencoderKLWan.from_pretrained(HERE).eval().double()
    saved = wan_mod.WanUpsample.forward
    wan_mod.WanUpsample.forward = upsample_no_cast
    try:
        case64 = run(model64, {k: v.double() for k, v in inputs.items()}, torch.float64)
    finally:
        wan_mod.WanUpsample.forward = saved

    save_file(case32, os.path.join(HERE, "case.safetensors"), metadata={"format": "pt"})
    save_file(case64, os.path.join(HERE, "case_f64exact.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(HERE):
        os.chmod(os.path.join(HERE, name), 0o644)
    observed = {k: err(case32[k], ref) for k, ref in case64.items()}
    clamped = {k: float((case64[k].abs() >= 1).double().mean()) for k in case64 if k.endswith(".decode")}
    files = sorted(n for n in os.listdir(HERE) if n not in ("make_golden.py", "golden.json"))
    meta = {
        "name": "wan22_vae_tiny",
        "model": "diffusers AutoencoderKLWan, Wan 2.2 layout (is_residual, patch_size 2)",
        "config": CONFIG,
        "init": "manual_seed(0), diffusers' default init; RMS_norm gammas 1 + 0.1 randn from Generator(1) in "
                "named_parameters order; decoder.conv_out.weight * %g" % CONV_OUT_SCALE,
        "inputs": "Generator(2): " + ", ".join("%s.input = 0.5 randn %s" % (n, list(s)) for n, s in CASES + [TILED]),
        "outputs": "<v>.mean, <v>.logvar = encode(<v>.input).latent_dist; <v>.decode = decode(<v>.mean).sample; "
                   "tl.* with enable_tiling%s" % (TILING,),
        "tiling": list(TILING),
        "f64exact": "model.double(), WanUpsample.forward without its x.float() / type_as round trip",
        "shapes": {k: list(v.shape) for k, v in case32.items()},
        "fraction_clamped": clamped,
        "state_dict_keys": list(model.state_dict().keys()),
        "default_config_params": default_params,
        "num_params": sum(p.numel() for p in model.parameters()),
        "f32_vs_f64exact": observed,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "files": {n: {"bytes": os.path.getsize(os.path.join(HERE, n)), "sha256": sha(os.path.join(HERE, n))}
                  for n in files},
    }
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print({k: "%.3g" % v["rel_max"] for k, v in observed.items()})
    print("clamped", clamped, "shapes", meta["shapes"])
    print("wrote", files, sum(os.path.getsize(os.path.join(HERE, n)) for n in os.listdir(HERE)), "bytes")


if __name__ == "__main__":
    main()
