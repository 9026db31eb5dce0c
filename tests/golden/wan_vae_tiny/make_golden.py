#!/usr/bin/env python3
"""tests/golden/wan_vae_tiny/make_golden.py: a tiny random AutoencoderKLWan (the Wan 2.1 video
VAE architecture) run by diffusers, for tests/lua/test_wan_vae.lua (nemo.models.wan_vae).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/wan_vae_tiny/make_golden.py    (diffusers 0.40.0, torch 2.15, CPU)

What it does:
  1. AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
     temperal_downsample=[False, True, True], dropout=0, latents_mean/std of 4 entries): the
     Wan 2.1 structure (3 spatial and 2 temporal downsamples, mid blocks with attention,
     upsample3d with the "Rep" first-chunk rule), narrow (odd channel counts: 3 and 6, the
     decoder's halving 6 -> 3). torch.manual_seed(0) then diffusers'
     default init; every RMS_norm gamma (constant 1) becomes 1 + 0.1 randn, drawn from
     torch.Generator(1) in named_parameters order. save_pretrained -> config.json and
     diffusion_pytorch_model.safetensors (float32).
  2. Inputs from torch.Generator(2), in this order: v5.input = 0.5 randn (1, 3, 5, 16, 16) (latent
     (1, 4, 2, 2, 2): the first frame alone, then one chunk of 4), v9.input = 0.5 randn
     (2, 3, 9, 8, 16) (batch 2, non-square, latent (2, 4, 3, 1, 2): two chunks of 4, so the
     third chunk sees the full 2-frame feature caches and the decoder's third frame the
     non-"Rep" upsample3d cache).
  3. For each: posterior = encode(input).latent_dist -> <v>.mean, <v>.logvar; <v>.decode =
     decode(mean).sample (clamped to [-1, 1] by diffusers). The decoder's conv_out weights are
     scaled by 2.5 before saving so that 0.5-2% of the decoded values reach the clamp (the
     fraction is in golden.json "fraction_clamped").
  4. case.safetensors: float32, the inputs and outputs above. case_f64exact.safetensors: float64
     <v>.mean, <v>.logvar, <v>.decode from model.double() on input.double(), with the one float32
     cast of the Wan VAE forward removed: WanUpsample.forward does
     `super().forward(x.float()).type_as(x)`, which rounds a float64 tensor to float32 before the
     nearest upsample; here it is run as `super().forward(x)` (nearest is a copy, so for
     float32 / bf16 / f16 the cast changes nothing). The decode of the f64 run is of the f64 mean.
     The as-is float64 run (with the cast) is measured against it (golden.json
     "f64_asis_vs_f64exact"). case_bf16.safetensors: <v>.mean, <v>.logvar, <v>.decode of
     from_pretrained(torch_dtype=bfloat16) on input.bfloat16(), the decode of the float32
     <v>.mean cast to bf16, run under sdpa_kernel(SDPBackend.MATH): torch's default CPU bf16 SDPA
     (its flash kernel) rounds differently from the float32-then-round attention nemo computes;
     with MATH every other op of the model rounds the same, so this is a close reference. The
     default-backend bf16 run is measured against float32 ("bf16_vs_f32", the error diffusers'
     own bf16 has) and against the MATH run ("bf16_flash_vs_math").
  5. golden.json: the config, init rule, shapes, state_dict_keys in order, the parameter names
     and shapes of the default config (the real Wan 2.1 VAE, "default_config_params"), measured
     errors, versions, each file's sha256.
attn_scales other than [] is not covered: diffusers' encoder then calls
WanAttentionBlock.forward(x, feat_cache=..., feat_idx=...), a TypeError (checked below).
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import contextlib
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
from torch.nn.attention import sdpa_kernel, SDPBackend

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = dict(base_dim=3, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
              temperal_downsample=[False, True, True], dropout=0.0,
              latents_mean=[-0.25, 0.5, 0.125, -1.0], latents_std=[1.5, 0.75, 2.0, 1.25])
CONV_OUT_SCALE = 2.5   # a few decoded values reach the clamp
CASES = [("v5", (1, 3, 5, 16, 16)), ("v9", (2, 3, 9, 8, 16))]


def build():
    torch.manual_seed(0)
    model = AutoencoderKLWan(**CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    perturbed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                assert torch.all(p == 1), name
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32))
                perturbed.append(name)
            assert not torch.all(p == p.flatten()[0]), name   # nothing constant is left
        model.decoder.conv_out.weight.mul_(CONV_OUT_SCALE)
    return model, perturbed


def run(model, inputs, dtype, means=None, math_sdpa=False):
    out = {}
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for name, x in inputs.items():
            post = model.encode(x.to(dtype)).latent_dist
            out[name + ".mean"] = post.mean
            out[name + ".logvar"] = post.logvar
            z = post.mean if means is None else means[name + ".mean"].to(dtype)
            out[name + ".decode"] = model.decode(z).sample
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
    # attn_scales non-empty: the encoder cannot run in diffusers
    m = AutoencoderKLWan(**dict(CONFIG, attn_scales=[1.0]))
    try:
        with torch.no_grad():
            m.encode(torch.zeros(1, 3, 1, 16, 16))
        raise SystemExit("attn_scales=[1.0] encoded; update the notes")
    except TypeError as e:
        attn_note = "attn_scales=[1.0]: encode raises TypeError: %s" % e

    default = AutoencoderKLWan()   # the Wan 2.1 VAE's structure (random weights)
    default_params = {k: "x".join(str(d) for d in v.shape) for k, v in default.state_dict().items()}
    default_params["_count"] = sum(p.numel() for p in default.parameters())
    del default

    model, perturbed = build()
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    for name in os.listdir(HERE):
        if name != "make_golden.py":
            os.remove(os.path.join(HERE, name))
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(tmp, name), os.path.join(HERE, name))
    shutil.rmtree(tmp)
    model = AutoencoderKLWan.from_pretrained(HERE).eval()   # what the tests load

    g = torch.Generator().manual_seed(2)
    inputs = {name: 0.5 * torch.randn(shape, generator=g, dtype=torch.float32) for name, shape in CASES}

    case32 = {name + ".input": x for name, x in inputs.items()}
    case32.update(run(model, inputs, torch.float32))

    model64 = AutoencoderKLWan.from_pretrained(HERE).eval().double()
    asis = run(model64, inputs, torch.float64)
    saved = wan_mod.WanUpsample.forward
    wan_mod.WanUpsample.forward = upsample_no_cast
    try:
        case64 = run(model64, inputs, torch.float64)
    finally:
        wan_mod.WanUpsample.forward = saved

    model16 = AutoencoderKLWan.from_pretrained(HERE, torch_dtype=torch.bfloat16).eval()
    bf16 = run(model16, inputs, torch.bfloat16, means=case32)
    case16 = run(model16, inputs, torch.bfloat16, means=case32, math_sdpa=True)

    save_file(case32, os.path.join(HERE, "case.safetensors"), metadata={"format": "pt"})
    save_file(case64, os.path.join(HERE, "case_f64exact.safetensors"), metadata={"format": "pt"})
    save_file(case16, os.path.join(HERE, "case_bf16.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(HERE):
        os.chmod(os.path.join(HERE, name), 0o644)

    observed = {"f32_vs_f64exact": {}, "f64_asis_vs_f64exact": {}, "bf16_vs_f32": {}, "bf16_math_vs_f32": {},
                "bf16_flash_vs_math": {}}
    for k, ref in case64.items():
        observed["f32_vs_f64exact"][k] = err(case32[k], ref)
        observed["f64_asis_vs_f64exact"][k] = err(asis[k], ref)
        observed["bf16_vs_f32"][k] = err(bf16[k], case32[k])
        observed["bf16_math_vs_f32"][k] = err(case16[k], case32[k])
        observed["bf16_flash_vs_math"][k] = err(bf16[k], case16[k])
    clamped = {k: float((case64[k].abs() >= 1).double().mean()) for k in case64 if k.endswith(".decode")}
    files = sorted(n for n in os.listdir(HERE) if n not in ("make_golden.py", "golden.json"))
    meta = {
        "name": "wan_vae_tiny",
        "model": "diffusers AutoencoderKLWan (Wan 2.1 VAE architecture)",
        "config": CONFIG,
        "init": "manual_seed(0), diffusers' default init; RMS_norm gammas 1 + 0.1 randn from Generator(1) in "
                "named_parameters order; decoder.conv_out.weight * %g" % CONV_OUT_SCALE,
        "perturbed": perturbed,
        "inputs": "Generator(2): " + ", ".join("%s.input = 0.5 randn %s" % (n, list(s)) for n, s in CASES),
        "outputs": "<v>.mean, <v>.logvar = encode(<v>.input).latent_dist; <v>.decode = decode(<v>.mean).sample",
        "f64exact": "model.double(), WanUpsample.forward without its x.float() / type_as round trip",
        "bf16": "from_pretrained(torch_dtype=bfloat16), bf16 inputs, decode of the f32 mean in bf16, "
                "sdpa_kernel(SDPBackend.MATH)",
        "shapes": {k: list(v.shape) for k, v in case32.items()},
        "fraction_clamped": clamped,
        "state_dict_keys": list(model.state_dict().keys()),
        "default_config_params": default_params,
        "num_params": sum(p.numel() for p in model.parameters()),
        "attn_scales_note": attn_note,
        "tolerances_observed": observed,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "files": {n: {"bytes": os.path.getsize(os.path.join(HERE, n)), "sha256": sha(os.path.join(HERE, n))}
                  for n in files},
    }
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for kind, o in observed.items():
        print(kind, {k: "%.3g" % v["rel_max"] for k, v in o.items()})
    print("clamped", clamped)
    print("wrote", files, "golden.json", sum(os.path.getsize(os.path.join(HERE, n)) for n in os.listdir(HERE)),
          "bytes in all")


if __name__ == "__main__":
    main()
