#!/usr/bin/env python3
"""tests/golden/flux_configs/make_golden.py: diffusers reference cases for FluxTransformer2DModel
configurations other than flux_tiny / flux_tiny_guidance (batch 2 with a different timestep per
sample and 2 double + 3 single blocks; guidance with a different value per sample; head dim 32
with axes_dims_rope (8,12,12), single blocks only, nonzero fractional text ids; patch_size 2 with
out_channels != in_channels and a long text sequence; double blocks only with batch 3).

PROVENANCE ONLY: nothing in the build or the tests runs this script. tests/lua/test_flux_configs.lua
reads the files it wrote. It follows the recipe of the shared golden cases (../README.md, the
flux_tiny case), so the same loading code reads both:

  1. weights: torch.manual_seed(weights_seed); FluxTransformer2DModel(**init) with diffusers'
     default init; then every parameter that came out constant (RMSNorm weights 1) is set to
     const + 0.1*randn from torch.Generator(weights_seed + 1), drawn in named_parameters order;
  2. inputs: one torch.Generator(input_seed), drawn in order hidden_states (B, N, in_channels),
     encoder_hidden_states (B, T, joint_attention_dim), pooled_projections (B, pooled_projection_dim),
     then img_ids (N, 3) and txt_ids (T, 3) when they are random, then timestep U(0,1) (B), then
     guidance when random, then target (B, N, patch^2 * out_channels), all float32;
  3. forward model(**inputs, return_dict=False)[0] in train mode, loss = mean((output-target)^2),
     loss.backward().

Per case folder <case>/:
  config.json, diffusion_pytorch_model.safetensors   ModelMixin.save_pretrained (float32)
  case.safetensors          float32 run: input.<kwarg>, target, output, loss [1], grad.<param>
                            for every parameter, grad_input.hidden_states,
                            grad_input.encoder_hidden_states, grad_input.pooled_projections
  case_f64exact.safetensors the same keys, float64: model.double() with the float32 inputs
                            widened, run inside promote_float32_casts() so that diffusers'
                            internal float32 casts (.float(), .to(float32), arange(float32))
                            stay float64: the whole forward and backward is float64
  case.json                 what was run, the versions, f32-vs-f64exact errors, finite-difference
                            checks, the from_pretrained round trip, file sizes and sha256

(Unlike flux_tiny there is no case_f64.safetensors (the "as is" float64 run, which the README
says is not a tight reference), no activations.safetensors and no adamw.safetensors, to keep the
files small: run this script with --activations DIR to dump every submodule's float32 output.)

Usage (outside the repository's build; any venv with torch, diffusers, safetensors, accelerate):
  python3 -m venv /tmp/wanref && /tmp/wanref/bin/pip install torch diffusers==0.40.0 \
      safetensors accelerate
  /tmp/wanref/bin/python tests/golden/flux_configs/make_golden.py            # writes the cases
  /tmp/wanref/bin/python tests/golden/flux_configs/make_golden.py --check-flux-tiny
      # regenerates flux_tiny and flux_tiny_guidance with their recorded seeds in a temporary
      # folder and compares them with tests/golden/flux_tiny{,_guidance} (the harness check)
"""

import os

# bitwise reproducible CPU math from run to run (MKL picks code paths by memory alignment
# otherwise); set before torch loads MKL. One thread (main() sets it) for the same reason.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import contextlib
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time

import numpy
import torch
import diffusers
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_GOLDEN = os.path.dirname(HERE)

# ---- the cases ----------------------------------------------------------------------------------

CASES = [
    dict(
        name="flux_blocks23_batch2",
        note="2 double + 3 single blocks; batch 2, each sample its own latents, text, pooled and "
             "timestep; no guidance embedder; 2 heads x 8 (rope 2/2/4); in_channels 8; a non-square "
             "3x5 grid (15 tokens) with pipeline ids (img (0,row,col), txt zeros); 6 text tokens",
        init=dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                  guidance_embeds=False, axes_dims_rope=[2, 2, 4]),
        weights_seed=21, input_seed=1021,
        input_spec=dict(batch=2, grid=[3, 5], txt_len=6, img_ids="grid", txt_ids="zeros",
                        timestep="uniform01", guidance=None),
    ),
    dict(
        name="flux_guidance_batch2",
        note="guidance_embeds True with a different guidance per sample (1.0 and 4.5) and a different "
             "timestep per sample; 1 head x 16 (rope 4/6/6); a non-square 4x6 grid (24 tokens) with "
             "pipeline ids; 5 text tokens (fewer than image tokens)",
        init=dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=12,
                  guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
        weights_seed=22, input_seed=1022,
        input_spec=dict(batch=2, grid=[4, 6], txt_len=5, img_ids="grid", txt_ids="zeros",
                        timestep="uniform01", guidance=[1.0, 4.5]),
    ),
    dict(
        name="flux_rope8_12_12",
        note="head dim 32 with axes_dims_rope (8,12,12) (1 head); num_layers 0: single blocks only (2); "
             "a non-square 3x4 grid (12 tokens) with Kontext-style img ids (1,row,col) and nonzero "
             "text ids (randn*4: fractional and negative on every axis); 7 text tokens",
        init=dict(patch_size=1, in_channels=4, num_layers=0, num_single_layers=2, attention_head_dim=32,
                  num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=8,
                  guidance_embeds=False, axes_dims_rope=[8, 12, 12]),
        weights_seed=23, input_seed=1023,
        input_spec=dict(batch=1, grid=[3, 4], txt_len=7, img_ids="grid_axis0_1", txt_ids="randn4",
                        timestep="uniform01", guidance=None),
    ),
    dict(
        name="flux_patch2_out_ne_in",
        note="patch_size 2 with in_channels 8 and out_channels 3 (x_embedder reads 8 channels, "
             "proj_out writes 2*2*3 = 12); a long text sequence (80 tokens) against 6 image tokens "
             "(2x3 grid, pipeline ids); 2 heads x 8 (rope 4/2/2)",
        init=dict(patch_size=2, in_channels=8, out_channels=3, num_layers=1, num_single_layers=1,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                  pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=[4, 2, 2]),
        weights_seed=24, input_seed=1024,
        input_spec=dict(batch=1, grid=[2, 3], txt_len=80, img_ids="grid", txt_ids="zeros",
                        timestep="uniform01", guidance=None),
    ),
    dict(
        name="flux_double_only_batch3",
        note="num_single_layers 0: 2 double blocks only; batch 3 with timesteps and guidance drawn per "
             "sample (guidance U(1,4)); random (randn) img and txt ids; 2 heads x 8 (rope 2/4/2); "
             "a 2x5 grid (10 tokens), 9 text tokens",
        init=dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=0, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                  guidance_embeds=True, axes_dims_rope=[2, 4, 2]),
        weights_seed=25, input_seed=1025,
        input_spec=dict(batch=3, grid=[2, 5], txt_len=9, img_ids="randn", txt_ids="randn",
                        timestep="uniform01", guidance="uniform1_4"),
    ),
]

# the shared cases' recorded recipes (tests/golden/flux_tiny{,_guidance}/case.json), for
# --check-flux-tiny
FLUX_TINY = [
    dict(name="flux_tiny", note="regenerated flux_tiny (harness check)",
         init=dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8]),
         weights_seed=0, input_seed=1000,
         input_spec=dict(batch=1, grid=[4, 4], txt_len=48, img_ids="randn", txt_ids="randn",
                         timestep="uniform01", guidance=None)),
    dict(name="flux_tiny_guidance", note="regenerated flux_tiny_guidance (harness check)",
         init=dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8], guidance_embeds=True),
         weights_seed=1, input_seed=1001,
         input_spec=dict(batch=2, grid=[4, 4], txt_len=48, img_ids="grid", txt_ids="zeros",
                         timestep="uniform01", guidance=3.5)),
]

DIFF_INPUTS = ["hidden_states", "encoder_hidden_states", "pooled_projections"]
W1 = {"time_text_embed.timestep_embedder.linear_1.weight", "time_text_embed.guidance_embedder.linear_1.weight"}

# The tolerances tests/lua/test_flux.lua (and test_flux_configs.lua) apply: engine f32 vs case
# (output rtol, loss rel, grads rtol, time/guidance-embedder linear_1 rtol, grad_input rtol, atol)
# and engine f64 vs case_f64exact (atol 0). The f32 run's own error against f64exact is reported
# against them (an engine as exact as diffusers' f32 may be off by up to twice that).
TEST_TOL = {
    "f32": dict(output=2e-5, loss=5e-6, grads=5e-5, w1=2e-3, grad_input=2e-5, atol=1e-7),
    "f64": dict(output=1e-9, loss=1e-9, grads=1e-9, w1=1e-8, grad_input=1e-9, atol=0.0),
}


# ---- float64 throughout -------------------------------------------------------------------------

@contextlib.contextmanager
def promote_float32_casts():
    """Tensor.float(), Tensor.to(torch.float32) and torch.arange(dtype=torch.float32) leave
    float64 in float64 (arange makes float64) while active: diffusers' internal float32 casts
    (the sinusoidal timestep frequencies, FluxPosEmbed's ids.float() and its cos/sin .float())
    then keep a float64 model float64."""
    orig_float, orig_to, orig_arange = torch.Tensor.float, torch.Tensor.to, torch.arange

    def float_(self, *a, **k):
        if self.dtype == torch.float64:
            return self
        return orig_float(self, *a, **k)

    def to_(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return orig_to(self, *args, **kwargs)

    def arange(*args, **kwargs):
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return orig_arange(*args, **kwargs)

    torch.Tensor.float, torch.Tensor.to, torch.arange = float_, to_, arange
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to, torch.arange = orig_float, orig_to, orig_arange


# ---- building and running -----------------------------------------------------------------------

def build_model(case):
    torch.manual_seed(case["weights_seed"])
    model = FluxTransformer2DModel(**case["init"])
    gen = torch.Generator().manual_seed(case["weights_seed"] + 1)
    perturbed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                c = float(flat[0])
                p.copy_(c + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                perturbed.append(f"{name} (was all {c:g})")
    model.train()
    return model, perturbed


def grid_ids(h, w, axis0=0.0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = axis0
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(model, case):
    s = case["input_spec"]
    cfg = model.config
    B, (h, w), T = s["batch"], s["grid"], s["txt_len"]
    N = h * w
    cout = cfg.out_channels or cfg.in_channels
    g = torch.Generator().manual_seed(case["input_seed"])
    inputs = {
        "hidden_states": torch.randn(B, N, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(B, T, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(B, cfg.pooled_projection_dim, generator=g),
    }
    # ids: random ones are drawn img first, then txt
    if s["img_ids"] == "randn":
        inputs["img_ids"] = torch.randn(N, 3, generator=g)
    elif s["img_ids"] == "grid":
        inputs["img_ids"] = grid_ids(h, w)
    elif s["img_ids"] == "grid_axis0_1":
        inputs["img_ids"] = grid_ids(h, w, 1.0)
    else:
        raise ValueError(s["img_ids"])
    if s["txt_ids"] == "randn":
        inputs["txt_ids"] = torch.randn(T, 3, generator=g)
    elif s["txt_ids"] == "randn4":
        inputs["txt_ids"] = torch.randn(T, 3, generator=g) * 4
    elif s["txt_ids"] == "zeros":
        inputs["txt_ids"] = torch.zeros(T, 3)
    else:
        raise ValueError(s["txt_ids"])
    if s["timestep"] == "uniform01":
        inputs["timestep"] = torch.rand(B, generator=g)
    else:
        raise ValueError(s["timestep"])
    gd = s["guidance"]
    if gd is None:
        pass
    elif isinstance(gd, (int, float)):
        inputs["guidance"] = torch.full((B,), float(gd))
    elif isinstance(gd, list):
        inputs["guidance"] = torch.tensor(gd, dtype=torch.float32)
    elif gd == "uniform1_4":
        inputs["guidance"] = 1 + 3 * torch.rand(B, generator=g)
    else:
        raise ValueError(gd)
    p = cfg.patch_size
    target = torch.randn(B, N, p * p * cout, generator=g)
    return inputs, target


def run(model, inputs, target, dtype, exact):
    """forward + mse + backward; returns the case dict of tensors (in dtype) and the output
    dtypes seen by forward hooks."""
    model.zero_grad(set_to_none=True)
    args = {k: v.detach().to(dtype).clone() for k, v in inputs.items()}
    for k in DIFF_INPUTS:
        args[k].requires_grad_(True)
    tgt = target.to(dtype)
    seen = {}
    hooks = []
    for mname, mod in model.named_modules():
        if mname == "":
            continue

        def hook(m, i, o, mname=mname):
            outs = o if isinstance(o, (tuple, list)) else (o,)
            for t in outs:
                if torch.is_tensor(t) and t.is_floating_point():
                    seen.setdefault(str(t.dtype), set()).add(mname)
        hooks.append(mod.register_forward_hook(hook))
    ctx = promote_float32_casts() if exact else contextlib.nullcontext()
    try:
        with ctx:
            out = model(**args, return_dict=False)[0]
            loss = ((out - tgt) ** 2).mean()
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    res = {f"input.{k}": v.detach().clone() for k, v in args.items()}
    res["target"] = tgt.detach().clone()
    res["output"] = out.detach().clone()
    res["loss"] = loss.detach().reshape(1).clone()
    no_grad = []
    for name, p in model.named_parameters():
        if p.grad is None:      # not on the path to the loss (the last double block's text branch
            no_grad.append(name)    # when there are no single blocks): no grad.<name> key
            continue
        res[f"grad.{name}"] = p.grad.detach().clone()
    for k in DIFF_INPUTS:
        res[f"grad_input.{k}"] = args[k].grad.detach().clone()
    return res, {k: sorted(v) for k, v in seen.items()}, no_grad


def err(a, ref):
    a, ref = a.double(), ref.double()
    d = (a - ref).abs().max().item() if ref.numel() else 0.0
    r = ref.abs().max().item() if ref.numel() else 0.0
    l2 = ((a - ref).norm() / ref.norm()).item() if ref.norm() > 0 else 0.0
    return dict(max_abs=d, ref_absmax=r, rel_max=(d / r if r > 0 else 0.0), rel_l2=l2)


def compare(c32, c64, names):
    out = dict(output=err(c32["output"], c64["output"]))
    l32, l64 = c32["loss"].item(), c64["loss"].item()
    out["loss"] = dict(f32=l32, f64exact=l64, rel=abs(l32 - l64) / abs(l64))
    per, worst, worst_name = {}, 0.0, ""
    worst_w1 = 0.0
    for n in names:
        e = err(c32[f"grad.{n}"], c64[f"grad.{n}"])
        per[n] = float(f"{e['rel_max']:.3g}")
        if n in W1:
            worst_w1 = max(worst_w1, e["rel_max"])
        elif e["rel_max"] > worst:
            worst, worst_name = e["rel_max"], n
    out["grad_worst_param_except_embedder_linear_1"] = dict(name=worst_name, rel_max=worst)
    out["grad_embedder_linear_1_weight_rel_max"] = worst_w1
    for k in DIFF_INPUTS:
        out[f"grad_input.{k}"] = err(c32[f"grad_input.{k}"], c64[f"grad_input.{k}"])
    out["per_param_rel_max"] = per
    return out


def finite_differences(model64, inputs, target, names, seed, n_params=6, h=1e-6):
    """central differences of the float64 (exact) loss on a few random entries of a few
    parameters and of hidden_states; returns the entries and |fd - grad| / max|grad of tensor|."""
    g = torch.Generator().manual_seed(seed)
    model64.zero_grad(set_to_none=True)
    base, _, _ = run(model64, inputs, target, torch.float64, True)
    params = dict(model64.named_parameters())
    picks = [names[int(i)] for i in torch.randperm(len(names), generator=g)[:n_params]]
    rows = []

    def loss_now(args):
        with promote_float32_casts(), torch.no_grad():
            out = model64(**args, return_dict=False)[0]
            return ((out - target.double()) ** 2).mean().item()

    args0 = {k: v.detach().double() for k, v in inputs.items()}
    for n in picks:
        p = params[n]
        idx = int(torch.randint(p.numel(), (1,), generator=g))
        flat = p.data.view(-1)
        v0 = flat[idx].item()
        flat[idx] = v0 + h
        lp = loss_now(args0)
        flat[idx] = v0 - h
        lm = loss_now(args0)
        flat[idx] = v0
        fd = (lp - lm) / (2 * h)
        gt = base[f"grad.{n}"]
        an = gt.reshape(-1)[idx].item()
        scale = gt.abs().max().item()
        rows.append(dict(tensor=f"grad.{n}", index=idx, fd=fd, analytic=an,
                         err_over_scale=abs(fd - an) / scale if scale > 0 else abs(fd - an)))
    x = args0["hidden_states"]
    idx = int(torch.randint(x.numel(), (1,), generator=g))
    xv = x.view(-1)
    v0 = xv[idx].item()
    xv[idx] = v0 + h
    lp = loss_now(args0)
    xv[idx] = v0 - h
    lm = loss_now(args0)
    xv[idx] = v0
    gt = base["grad_input.hidden_states"]
    an = gt.reshape(-1)[idx].item()
    fd = (lp - lm) / (2 * h)
    rows.append(dict(tensor="grad_input.hidden_states", index=idx, fd=fd, analytic=an,
                     err_over_scale=abs(fd - an) / gt.abs().max().item()))
    return rows


def file_info(path):
    with open(path, "rb") as f:
        b = f.read()
    return dict(bytes=len(b), sha256=hashlib.sha256(b).hexdigest())


def save_case(tensors, path, name, dtype):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"case": name, "dtype": dtype, "producer": "make_golden.py"})


def make_case(case, out_root, activations_dir=None, fd=True):
    t0 = time.time()
    d = os.path.join(out_root, case["name"])
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model, perturbed = build_model(case)
    inputs, target = make_inputs(model, case)
    names = [n for n, _ in model.named_parameters()]

    # the model folder (float32), as from_pretrained reads it
    model.save_pretrained(d, safe_serialization=True)
    with safe_open(os.path.join(d, "diffusion_pytorch_model.safetensors"), "pt") as f:
        wmeta = f.metadata()

    c32, dt32, nog32 = run(model, inputs, target, torch.float32, False)

    if activations_dir:
        dump_activations(model, inputs, os.path.join(activations_dir, case["name"] + "_activations.safetensors"))

    # round trip: the saved folder through diffusers' own from_pretrained gives the same numbers
    m2 = FluxTransformer2DModel.from_pretrained(d, torch_dtype=torch.float32)
    m2.train()
    r32, _, _ = run(m2, inputs, target, torch.float32, False)
    rt = dict(loaded_with="FluxTransformer2DModel.from_pretrained(folder, torch_dtype=float32)",
              output_max_abs=(r32["output"] - c32["output"]).abs().max().item(),
              loss_abs=(r32["loss"] - c32["loss"]).abs().max().item(),
              grads_max_abs=max((r32[k] - c32[k]).abs().max().item() for k in c32 if k.startswith("grad")))
    del m2

    model64 = model.double()
    c64, dt64, nog64 = run(model64, inputs, target, torch.float64, True)
    if set(dt64.keys()) != {"torch.float64"}:
        raise RuntimeError(f"{case['name']}: the exact float64 run has non-float64 module outputs: {dt64}")
    if nog32 != nog64:
        raise RuntimeError(f"{case['name']}: parameters without a gradient differ: f32 {nog32}, f64 {nog64}")
    names = [n for n in names if n not in nog32]     # the parameters with a gradient
    fdrows = finite_differences(model64, inputs, target, names, case["weights_seed"] + 100) if fd else None

    save_case(c32, os.path.join(d, "case.safetensors"), case["name"], "float32")
    save_case(c64, os.path.join(d, "case_f64exact.safetensors"), case["name"], "float64")

    obs = compare(c32, c64, names)
    with open(os.path.join(d, "config.json")) as f:
        config_json = json.load(f)
    vals = dict(loss_f32=c32["loss"].item(), loss_f64exact=c64["loss"].item(),
                timestep=c32["input.timestep"].reshape(-1).tolist())
    if "input.guidance" in c32:
        vals["guidance"] = c32["input.guidance"].reshape(-1).tolist()
    meta = dict(
        name=case["name"],
        note=case["note"],
        model_class="FluxTransformer2DModel",
        dtype={"weights": "float32",
               "case.safetensors": "float32 (the golden run)",
               "case_f64exact.safetensors": "float64 throughout (float32 casts promoted; inputs are the float32 "
                                            "inputs widened, weights the float32 weights widened)"},
        init=case["init"],
        config_json=config_json,
        weights_seed=case["weights_seed"],
        weights_init="torch.manual_seed(weights_seed); Cls(**init) with diffusers' default init; then every "
                     "parameter that was a constant (all ones / all zeros) set to const + 0.1*randn "
                     "(torch.Generator seeded weights_seed+1, in named_parameters order)",
        perturbed_constant_params=perturbed,
        params_without_grad=nog32,
        params_without_grad_note="parameters whose p.grad stays None after backward (not on the path to the "
                                 "loss): no grad.<name> key in the case files; a consumer must give them no "
                                 "gradient or an all-zero one",
        input_seed=case["input_seed"],
        input_spec=case["input_spec"],
        input_spec_legend={"img_ids": "grid: (0,row,col) row-major; grid_axis0_1: (1,row,col); randn: drawn",
                           "txt_ids": "zeros; randn: drawn; randn4: drawn * 4",
                           "timestep": "uniform01: torch.rand(B)",
                           "guidance": "null: not passed; number: torch.full((B,), v); list: those values; "
                                       "uniform1_4: 1 + 3*torch.rand(B)"},
        input_order="one torch.Generator(input_seed), drawn in order: hidden_states, encoder_hidden_states, "
                    "pooled_projections, [img_ids if random], [txt_ids if random], timestep, "
                    "[guidance if random], target (all float32)",
        forward_call="model(**{k[len('input.'):]: v for k, v in case.items() if k.startswith('input.')}, "
                     "return_dict=False)[0] -> output (train mode; every dropout has p=0)",
        forward_notes=["Flux multiplies timestep (and guidance) by 1000 inside forward",
                       "img_ids/txt_ids are 2-D (seq, 3); rope = FluxPosEmbed(theta=10000, axes_dims_rope) on "
                       "cat(txt_ids, img_ids)",
                       "patch_size only sizes proj_out (patch^2 * out_channels); x_embedder reads in_channels"],
        loss="loss = mean((output - target)^2) over all elements, stored with shape [1]",
        shapes={k: list(v.shape) for k, v in c32.items() if not k.startswith("grad.")},
        num_params=sum(p.numel() for p in model.parameters()),
        state_dict_keys=list(model.state_dict().keys()),
        weights_file_metadata=wmeta,
        values=vals,
        roundtrip_from_pretrained=rt,
        tolerances_observed=dict(
            note="diffusers' own float32 run vs its float64 (exact) run; rel_max = max|f32 - f64| / max|f64| "
                 "per tensor. test_tolerances: what the nemo-lua test allows (engine f32 vs case, engine f64 "
                 "vs case_f64exact).",
            f32_vs_f64exact=obs,
            test_tolerances=TEST_TOL),
        finite_differences=dict(note="float64 exact loss, central differences h=1e-6; err_over_scale = "
                                     "|fd - analytic| / max|grad of that tensor|", entries=fdrows),
        activation_dtypes=dict(f32_run=dt32, f64exact_run=dt64),
        environment=dict(diffusers_version=diffusers.__version__, torch=torch.__version__,
                         numpy=numpy.__version__, python=platform.python_version(),
                         torch_num_threads=torch.get_num_threads(), device="cpu",
                         sdpa="torch.nn.functional.scaled_dot_product_attention (diffusers' native backend)"),
        seconds=round(time.time() - t0, 2),
    )
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)   # safetensors writes 0600
    meta["files"] = {f: file_info(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def dump_activations(model, inputs, path):
    acts, calls, hooks = {}, {}, []
    for mname, mod in model.named_modules():
        if mname == "" or isinstance(mod, (torch.nn.Dropout, torch.nn.Identity)):
            continue

        def hook(m, i, o, mname=mname):
            k = calls.get(mname, 0)
            calls[mname] = k + 1
            key = f"act.{mname}" + (f"@{k}" if k else "")
            outs = o if isinstance(o, (tuple, list)) else (o,)
            for j, t in enumerate(outs):
                if torch.is_tensor(t):
                    acts[key + (f":{j}" if len(outs) > 1 else "")] = t.detach().float().contiguous().clone()
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(**{k: v.float() for k, v in inputs.items()}, return_dict=False)
    for h in hooks:
        h.remove()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(acts, path)


def check_flux_tiny():
    """Regenerate flux_tiny and flux_tiny_guidance with their recorded recipes and compare them
    with tests/golden/flux_tiny{,_guidance}."""
    ok = True
    tmp = tempfile.mkdtemp(prefix="flux_tiny_check_")
    try:
        for case in FLUX_TINY:
            ref = os.path.join(REPO_GOLDEN, case["name"])
            make_case(case, tmp, fd=False)
            mine = os.path.join(tmp, case["name"])
            for fname in ["diffusion_pytorch_model.safetensors", "case.safetensors", "case_f64exact.safetensors"]:
                a, b = load_file(os.path.join(mine, fname)), load_file(os.path.join(ref, fname))
                if set(a) != set(b):
                    print(f"{case['name']}/{fname}: different keys: {sorted(set(a) ^ set(b))}")
                    ok = False
                    continue
                worst, wk, worst2, wk2 = 0.0, "", 0.0, ""
                for k in b:
                    r = b[k].double().abs().max().item()
                    e = (a[k].double() - b[k].double()).abs().max().item() / (r if r > 0 else 1)
                    if e > worst:
                        worst, wk = e, k
                    if k[len("grad."):] not in W1 and e > worst2:
                        worst2, wk2 = e, k
                print(f"{case['name']}/{fname}: {len(b)} tensors, worst rel_max {worst:.3g} ({wk}); without the "
                      f"embedders' linear_1 grads {worst2:.3g} ({wk2})")
                if fname == "diffusion_pytorch_model.safetensors" and worst != 0:
                    ok = False
                if fname != "diffusion_pytorch_model.safetensors":
                    for k in b:
                        if k.startswith("input.") or k == "target":
                            if not torch.equal(a[k], b[k]):
                                print(f"  {k}: inputs differ")
                                ok = False
            with open(os.path.join(ref, "case.json")) as f:
                rmeta = json.load(f)
            with open(os.path.join(mine, "case.json")) as f:
                mmeta = json.load(f)
            if rmeta["state_dict_keys"] != mmeta["state_dict_keys"] or rmeta["num_params"] != mmeta["num_params"]:
                print(f"{case['name']}: state_dict keys / parameter count differ")
                ok = False
        print("flux_tiny / flux_tiny_guidance regenerated:", "weights and inputs identical" if ok else "MISMATCH")
        return ok
    finally:
        shutil.rmtree(tmp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=HERE, help="folder for the case folders (default: beside this script)")
    ap.add_argument("--only", nargs="*", help="case names to make (default: all)")
    ap.add_argument("--activations", metavar="DIR", help="also dump each case's float32 activations into DIR")
    ap.add_argument("--check-flux-tiny", action="store_true",
                    help="regenerate flux_tiny and flux_tiny_guidance in a temporary folder and compare them "
                         "with tests/golden")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    if a.check_flux_tiny:
        sys.exit(0 if check_flux_tiny() else 1)
    total = 0
    for case in CASES:
        if a.only and case["name"] not in a.only:
            continue
        m = make_case(case, a.out, a.activations)
        size = sum(v["bytes"] for v in m["files"].values())
        total += size
        o = m["tolerances_observed"]["f32_vs_f64exact"]
        fdw = max(r["err_over_scale"] for r in m["finite_differences"]["entries"])
        print(f"{case['name']}: {m['num_params']} params, {size / 1e3:.1f} kB, loss {m['values']['loss_f64exact']:.6f}; "
              f"f32 vs f64exact: output {o['output']['rel_max']:.2g}, loss {o['loss']['rel']:.2g}, worst grad "
              f"{o['grad_worst_param_except_embedder_linear_1']['rel_max']:.2g} "
              f"({o['grad_worst_param_except_embedder_linear_1']['name']}), embedders' linear_1 "
              f"{o['grad_embedder_linear_1_weight_rel_max']:.2g}, grad_input "
              f"{max(o['grad_input.' + k]['rel_max'] for k in DIFF_INPUTS):.2g}; finite differences worst {fdw:.2g}; "
              f"round trip {m['roundtrip_from_pretrained']['output_max_abs']:.2g}")
    print(f"total {total / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
