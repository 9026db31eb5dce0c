#!/usr/bin/env python3
"""tests/golden/wan_configs/make_golden.py: diffusers reference cases for WanTransformer3DModel
configurations other than wan_tiny (patch (2,2,2) with 6 latent frames, batch 2 with a different
timestep per sample, cross_attn_norm False, out_channels != in_channels, per-token (B, L)
timesteps with a null out_channels / qk_norm and eps 1e-5).

PROVENANCE ONLY: nothing in the build or the tests runs this script. tests/lua/test_wan_configs.lua
reads the files it wrote. It follows the recipe of the shared golden cases (../README.md, the
wan_tiny case), so the same loading code reads both:

  1. weights: torch.manual_seed(weights_seed); WanTransformer3DModel(**init) with diffusers'
     default init; then every parameter that came out constant (RMSNorm / LayerNorm weights 1,
     biases 0) is set to const + 0.1*randn from torch.Generator(weights_seed + 1), drawn in
     named_parameters order;
  2. inputs: one torch.Generator(input_seed), drawn in order hidden_states (B,C,F,H,W),
     encoder_hidden_states (B,T,text_dim), timestep U(0,1000) ((B) or (B, L)), target
     (B,C_out,F,H,W), all float32;
  3. forward model(**inputs, return_dict=False)[0] in train mode, loss = mean((output-target)^2),
     loss.backward().

Per case folder <case>/:
  config.json, diffusion_pytorch_model.safetensors   ModelMixin.save_pretrained (float32)
  case.safetensors          float32 run: input.<kwarg>, target, output, loss [1], grad.<param>
                            for every parameter, grad_input.hidden_states,
                            grad_input.encoder_hidden_states
  case_f64exact.safetensors the same keys, float64: model.double() with the float32 inputs
                            widened, run inside promote_float32_casts() so that diffusers'
                            internal float32 casts (.float(), .to(float32), arange(float32))
                            stay float64: the whole forward and backward is float64
  case.json                 what was run, the versions, f32-vs-f64exact errors, finite-difference
                            checks, the from_pretrained round trip, file sizes and sha256

(Unlike wan_tiny there is no case_f64.safetensors (the "as is" float64 run, which the README
says is not a tight reference) and no activations.safetensors, to keep the files small: run
this script with --activations DIR to dump every submodule's float32 output for debugging.)

Usage (outside the repository's build; any venv with torch, diffusers, safetensors, accelerate):
  python3 -m venv /tmp/wanref && /tmp/wanref/bin/pip install torch diffusers==0.40.0 \
      safetensors accelerate
  /tmp/wanref/bin/python tests/golden/wan_configs/make_golden.py            # writes the cases
  /tmp/wanref/bin/python tests/golden/wan_configs/make_golden.py --check-wan-tiny
      # regenerates wan_tiny with its recorded seeds in a temporary folder and compares it with
      # tests/golden/wan_tiny (the harness check: same weights, inputs, outputs)
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
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_GOLDEN = os.path.dirname(HERE)

# ---- the cases ----------------------------------------------------------------------------------

BASE = dict(qk_norm="rms_norm_across_heads", eps=1e-6)

CASES = [
    dict(
        name="wan_patch222",
        note="patch_size (2,2,2) with 6 latent frames (3 after patching), a non-square 8x12 grid "
             "(4x6 patches, 72 tokens); head dim 16 (rope t/h/w dims 8/4/4, not wan_tiny's 4/4/4)",
        init=dict(patch_size=[2, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
                  out_channels=4, text_dim=8, freq_dim=32, ffn_dim=24, num_layers=2, cross_attn_norm=True,
                  rope_max_seq_len=16, **BASE),
        weights_seed=11, input_seed=1011,
        input_spec=dict(batch=1, frames=6, height=8, width=12, txt_len=5, timestep="uniform1000"),
    ),
    dict(
        name="wan_batch2",
        note="batch 2 with a different timestep, latents and text per sample; 3 heads x 10 (rope "
             "t/h/w dims 6/2/2), 3 frames on a 6x8 grid (36 tokens), 7 text tokens of width 12",
        init=dict(patch_size=[1, 2, 2], num_attention_heads=3, attention_head_dim=10, in_channels=4,
                  out_channels=4, text_dim=12, freq_dim=64, ffn_dim=40, num_layers=2, cross_attn_norm=True,
                  rope_max_seq_len=16, **BASE),
        weights_seed=12, input_seed=1012,
        input_spec=dict(batch=2, frames=3, height=6, width=8, txt_len=7, timestep="uniform1000"),
    ),
    dict(
        name="wan_no_cross_attn_norm",
        note="cross_attn_norm False (norm2 is Identity: no norm2 parameters, attn2 reads the raw "
             "residual stream); otherwise wan_tiny-like: 2 heads x 12, 3 frames on 8x8 (48 tokens)",
        init=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4,
                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=False,
                  rope_max_seq_len=32, **BASE),
        weights_seed=13, input_seed=1013,
        input_spec=dict(batch=1, frames=3, height=8, width=8, txt_len=6, timestep="uniform1000"),
    ),
    dict(
        name="wan_out_ne_in",
        note="in_channels 3, out_channels 5 (proj_out is 5*4 wide; the unpatchify splits it as "
             "(p_t, p_h, p_w, C_out)); 2 heads x 8 (rope t/h/w 4/2/2), 2 frames on 6x10 (30 tokens)",
        init=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=3,
                  out_channels=5, text_dim=8, freq_dim=16, ffn_dim=24, num_layers=2, cross_attn_norm=True,
                  rope_max_seq_len=16, **BASE),
        weights_seed=14, input_seed=1014,
        input_spec=dict(batch=1, frames=2, height=6, width=10, txt_len=4, timestep="uniform1000"),
    ),
    dict(
        name="wan_ti2v_misc",
        note="Wan 2.2 TI2V-style per-token timestep (B, L) = (2, 12), every token its own U(0,1000) "
             "value; batch 2; asymmetric patch (2,1,2); out_channels null in config.json (-> "
             "in_channels 2); qk_norm null (diffusers 0.40 ignores it: norm_q/norm_k exist "
             "anyway); eps 1e-5 (every LayerNorm and RMSNorm); 1 layer of 2 heads x 6 (rope t/h/w 2/2/2)",
        init=dict(patch_size=[2, 1, 2], num_attention_heads=2, attention_head_dim=6, in_channels=2,
                  out_channels=None, text_dim=8, freq_dim=32, ffn_dim=16, num_layers=1, cross_attn_norm=True,
                  qk_norm=None, eps=1e-5, rope_max_seq_len=8),
        weights_seed=15, input_seed=1015,
        input_spec=dict(batch=2, frames=4, height=3, width=4, txt_len=3, timestep="per_token_uniform1000"),
    ),
    dict(
        name="wan_i2v",
        note="Wan 2.1 I2V: image_dim 12 (condition_embedder.image_embedder: FP32LayerNorm, FeedForward "
             "with exact GELU and mult 1, FP32LayerNorm), added_kv_proj_dim 16 (every attn2 gets "
             "add_k_proj, add_v_proj, norm_added_k); 5 image tokens in front of 512 text tokens (the "
             "processor splits at len - 512); in_channels 12 (latents + mask + condition), out 4; batch 2",
        init=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=12,
                  out_channels=4, text_dim=8, freq_dim=16, ffn_dim=24, num_layers=2, cross_attn_norm=True,
                  rope_max_seq_len=16, image_dim=12, added_kv_proj_dim=16, **BASE),
        weights_seed=16, input_seed=1016,
        input_spec=dict(batch=2, frames=2, height=4, width=4, txt_len=512, img_len=5, img_sets=1,
                        timestep="uniform1000"),
    ),
    dict(
        name="wan_flf2v",
        note="Wan 2.1 FLF2V: pos_embed_seq_len 10 (image_embedder.pos_embed): the image tokens of the "
             "first and the last frame, (2B, 5, image_dim), are viewed as (B, 10, image_dim) and "
             "positioned before the embedder; otherwise as wan_i2v with one layer and batch 1",
        init=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=12,
                  out_channels=4, text_dim=8, freq_dim=16, ffn_dim=24, num_layers=1, cross_attn_norm=True,
                  rope_max_seq_len=16, image_dim=12, added_kv_proj_dim=16, pos_embed_seq_len=10, **BASE),
        weights_seed=17, input_seed=1017,
        input_spec=dict(batch=1, frames=2, height=4, width=6, txt_len=512, img_len=5, img_sets=2,
                        timestep="uniform1000"),
    ),
]

# wan_tiny's recorded recipe (tests/golden/wan_tiny/case.json), for --check-wan-tiny
WAN_TINY = dict(
    name="wan_tiny", note="regenerated wan_tiny (harness check)",
    init=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    weights_seed=2, input_seed=1002,
    input_spec=dict(batch=1, frames=2, height=16, width=16, txt_len=12, timestep="uniform1000"),
)

DIFF_INPUTS = ["hidden_states", "encoder_hidden_states"]
W1 = "condition_embedder.time_embedder.linear_1.weight"

# The tolerances tests/lua/test_wan.lua (and test_wan_configs.lua) apply: engine f32 vs case
# (output rtol, loss rel, grads rtol, time-embedder linear_1 rtol, grad_input rtol, atol) and
# engine f64 vs case_f64exact (atol 0). The f32 run's own error against f64exact is reported
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
    (FP32LayerNorm, the sinusoidal timestep frequencies, the blocks' hidden_states.float()) then
    keep a float64 model float64."""
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
    model = WanTransformer3DModel(**case["init"])
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


def make_inputs(model, case):
    s = case["input_spec"]
    cfg = model.config
    B, Fr, H, W, T = s["batch"], s["frames"], s["height"], s["width"], s["txt_len"]
    pt, ph, pw = cfg.patch_size
    L = (Fr // pt) * (H // ph) * (W // pw)
    cout = cfg.out_channels or cfg.in_channels
    g = torch.Generator().manual_seed(case["input_seed"])
    inputs = {
        "hidden_states": torch.randn(B, cfg.in_channels, Fr, H, W, generator=g),
        "encoder_hidden_states": torch.randn(B, T, cfg.text_dim, generator=g),
    }
    if cfg.image_dim is not None:   # the image encoder's tokens (FLF2V: two images per sample)
        inputs["encoder_hidden_states_image"] = torch.randn(B * s["img_sets"], s["img_len"], cfg.image_dim,
                                                            generator=g)
    if s["timestep"] == "uniform1000":
        inputs["timestep"] = torch.rand(B, generator=g) * 1000
    elif s["timestep"] == "per_token_uniform1000":
        inputs["timestep"] = torch.rand(B, L, generator=g) * 1000
    else:
        raise ValueError(s["timestep"])
    target = torch.randn(B, cout, Fr, H, W, generator=g)
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
    for name, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"{name}: no gradient")
        res[f"grad.{name}"] = p.grad.detach().clone()
    for k in DIFF_INPUTS:
        res[f"grad_input.{k}"] = args[k].grad.detach().clone()
    return res, {k: sorted(v) for k, v in seen.items()}


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
        if n == W1:
            worst_w1 = e["rel_max"]
        elif e["rel_max"] > worst:
            worst, worst_name = e["rel_max"], n
    out["grad_worst_param_except_time_embedder_linear_1"] = dict(name=worst_name, rel_max=worst)
    out["grad_time_embedder_linear_1_weight_rel_max"] = worst_w1
    for k in DIFF_INPUTS:
        out[f"grad_input.{k}"] = err(c32[f"grad_input.{k}"], c64[f"grad_input.{k}"])
    out["per_param_rel_max"] = per
    return out


def finite_differences(model64, inputs, target, names, seed, n_params=6, h=1e-6):
    """central differences of the float64 (exact) loss on a few random entries of a few
    parameters and of hidden_states; returns the entries and |fd - grad| / max|grad of tensor|."""
    g = torch.Generator().manual_seed(seed)
    model64.zero_grad(set_to_none=True)
    base, _ = run(model64, inputs, target, torch.float64, True)
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

    c32, dt32 = run(model, inputs, target, torch.float32, False)

    if activations_dir:
        dump_activations(model, inputs, os.path.join(activations_dir, case["name"] + "_activations.safetensors"))

    # round trip: the saved folder through diffusers' own from_pretrained gives the same numbers
    m2 = WanTransformer3DModel.from_pretrained(d, torch_dtype=torch.float32)
    m2.train()
    r32, _ = run(m2, inputs, target, torch.float32, False)
    rt = dict(loaded_with="WanTransformer3DModel.from_pretrained(folder, torch_dtype=float32)",
              output_max_abs=(r32["output"] - c32["output"]).abs().max().item(),
              loss_abs=(r32["loss"] - c32["loss"]).abs().max().item(),
              grads_max_abs=max((r32[k] - c32[k]).abs().max().item() for k in c32 if k.startswith("grad")))
    del m2

    model64 = model.double()
    c64, dt64 = run(model64, inputs, target, torch.float64, True)
    if set(dt64.keys()) != {"torch.float64"}:
        raise RuntimeError(f"{case['name']}: the exact float64 run has non-float64 module outputs: {dt64}")
    fdrows = finite_differences(model64, inputs, target, names, case["weights_seed"] + 100) if fd else None

    save_case(c32, os.path.join(d, "case.safetensors"), case["name"], "float32")
    save_case(c64, os.path.join(d, "case_f64exact.safetensors"), case["name"], "float64")

    obs = compare(c32, c64, names)
    with open(os.path.join(d, "config.json")) as f:
        config_json = json.load(f)
    meta = dict(
        name=case["name"],
        note=case["note"],
        model_class="WanTransformer3DModel",
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
        input_seed=case["input_seed"],
        input_spec=case["input_spec"],
        input_order="one torch.Generator(input_seed), drawn in order: hidden_states, encoder_hidden_states, "
                    "timestep, target (all float32)",
        forward_call="model(**{k[len('input.'):]: v for k, v in case.items() if k.startswith('input.')}, "
                     "return_dict=False)[0] -> output (train mode; every dropout has p=0)",
        forward_notes=["timestep is used as is (0..1000 range) by Timesteps(freq_dim, flip_sin_to_cos=True, "
                       "downscale_freq_shift=0)",
                       "a (B, L) timestep is one value per latent token (Wan 2.2 TI2V, expand_timesteps): "
                       "temb (B, L, D), timestep_proj (B, L, 6, D)",
                       "output has the input's (B, C_out, F, H, W) layout"],
        loss="loss = mean((output - target)^2) over all elements, stored with shape [1]",
        shapes={k: list(v.shape) for k, v in c32.items() if not k.startswith("grad.")},
        num_params=sum(p.numel() for p in model.parameters()),
        state_dict_keys=list(model.state_dict().keys()),
        weights_file_metadata=wmeta,
        values=dict(loss_f32=c32["loss"].item(), loss_f64exact=c64["loss"].item(),
                    timestep=c32["input.timestep"].reshape(-1).tolist()),
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


def check_wan_tiny():
    """Regenerate wan_tiny with its recorded recipe and compare it with tests/golden/wan_tiny."""
    ref = os.path.join(REPO_GOLDEN, "wan_tiny")
    tmp = tempfile.mkdtemp(prefix="wan_tiny_check_")
    try:
        make_case(WAN_TINY, tmp, fd=False)
        mine = os.path.join(tmp, "wan_tiny")
        ok = True
        for fname in ["diffusion_pytorch_model.safetensors", "case.safetensors", "case_f64exact.safetensors"]:
            a, b = load_file(os.path.join(mine, fname)), load_file(os.path.join(ref, fname))
            if set(a) != set(b):
                print(f"{fname}: different keys: {sorted(set(a) ^ set(b))}")
                ok = False
                continue
            worst, wk, worst2, wk2 = 0.0, "", 0.0, ""
            for k in b:
                r = b[k].double().abs().max().item()
                e = (a[k].double() - b[k].double()).abs().max().item() / (r if r > 0 else 1)
                if e > worst:
                    worst, wk = e, k
                if k != "grad." + W1 and e > worst2:
                    worst2, wk2 = e, k
            print(f"{fname}: {len(b)} tensors, worst rel_max {worst:.3g} ({wk}); without the time embedder's "
                  f"linear_1 grad {worst2:.3g} ({wk2})")
            if fname == "diffusion_pytorch_model.safetensors" and worst != 0:
                ok = False
        print("wan_tiny regenerated:", "weights identical" if ok else "MISMATCH")
        return ok
    finally:
        shutil.rmtree(tmp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=HERE, help="folder for the case folders (default: beside this script)")
    ap.add_argument("--only", nargs="*", help="case names to make (default: all)")
    ap.add_argument("--activations", metavar="DIR", help="also dump each case's float32 activations into DIR")
    ap.add_argument("--check-wan-tiny", action="store_true",
                    help="regenerate wan_tiny in a temporary folder and compare it with tests/golden/wan_tiny")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    if a.check_wan_tiny:
        sys.exit(0 if check_wan_tiny() else 1)
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
              f"{o['grad_worst_param_except_time_embedder_linear_1']['rel_max']:.2g} "
              f"({o['grad_worst_param_except_time_embedder_linear_1']['name']}), time_embedder.linear_1 "
              f"{o['grad_time_embedder_linear_1_weight_rel_max']:.2g}, grad_input.hidden_states "
              f"{o['grad_input.hidden_states']['rel_max']:.2g}; finite differences worst {fdw:.2g}; "
              f"round trip {m['roundtrip_from_pretrained']['output_max_abs']:.2g}")
    print(f"total {total / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
