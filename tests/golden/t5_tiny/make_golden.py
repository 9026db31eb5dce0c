#!/usr/bin/env python3
"""tests/golden/t5_tiny/make_golden.py: Hugging Face transformers reference cases for the T5
text encoders (T5EncoderModel: FLUX's text_encoder_2, google/t5-v1_1-xxl; UMT5EncoderModel:
Wan's text_encoder, google/umt5-xxl), read by tests/lua/test_t5.lua (nemo.models.t5).

PROVENANCE ONLY: nothing in the build or the tests runs this script. It writes

  t5_tiny/            (python make_golden.py t5, the default)
  umt5_tiny/          (python make_golden.py umt5; ../umt5_tiny/make_golden.py runs this file so)

each holding one tiny random model and its variant subfolder:

  config.json, model.safetensors   T5EncoderModel / UMT5EncoderModel.save_pretrained (float32;
                                   the tied encoder.embed_tokens.weight is not written, only
                                   shared.weight, as transformers saves it)
  case.safetensors      float32: input_ids (2, 11) int64 with the second row padded (pad id 0),
                        attention_mask (2, 11) int64, last_hidden_state (the masked run),
                        last_hidden_state_nomask (the same ids, no mask), long_input_ids /
                        long_attention_mask (2, 40) and long_last_hidden_state (relative
                        distances up to 39, past relative_attention_max_distance 16: the
                        logarithmic buckets and their clamp), last_hidden_state_bf16 and
                        last_hidden_state_f16 (the model loaded by from_pretrained with
                        dtype=bfloat16 / float16, stored in that dtype; float16 keeps
                        _keep_in_fp32_modules = ["wo"] in float32), target (for the loss below),
                        and (t5 only) buckets.<num_buckets>_<max_distance> = transformers'
                        _relative_position_bucket(relative_position, bidirectional=True) of
                        relative_position = -600..600 for the production (32, 128) and a few
                        other settings
  case_f64exact.safetensors   the same outputs from model.double() run inside
                        promote_float32_casts(): T5LayerNorm's hidden_states.to(torch.float32)
                        leaves float64 in float64, so the whole forward is float64 (the
                        as-is float64 run would compute the RMS variance in float32 and agree
                        only to ~1e-7). Inputs are the same int64 ids and masks.
  grads.safetensors / grads_f64exact.safetensors   grad.<param> of
                        loss = mean((last_hidden_state - target)^2) (masked run) for every
                        parameter, float32 / float64 exact (the model in train mode: dropout_rate
                        is 0)
  case.json             what was run, state_dict_keys (transformers' order), versions, f32-vs-f64exact errors, file sizes and sha256
  <variant>/            t5: relu/ (original T5: feed_forward_proj "relu", DenseReluDense.wi / wo);
                        umt5: gated_silu/ (feed_forward_proj "gated-silu"): config.json,
                        model.safetensors, case.safetensors and case_f64exact.safetensors with
                        the main case's ids (last_hidden_state, last_hidden_state_nomask)

Weights: torch.manual_seed(seed); Cls(config) with transformers' own init; then every parameter
that came out constant (the T5LayerNorm weights, all ones) is set to 1 + 0.1*randn from
torch.Generator(seed + 1), in named_parameters order, so that each norm weight matters.
Inputs: torch.Generator(seed + 2): ids uniform in [2, vocab), each real row ends with the eos id
1, padded positions hold the pad id 0 and mask 0.

The attention implementation is transformers' default ("sdpa"): the position bias and the
padding mask are one additive float mask, where(mask, position_bias, finfo(dtype).min).

Run (torch 2.15, transformers 5.24, safetensors; CPU, one thread):
  /tmp/wanref/bin/python tests/golden/t5_tiny/make_golden.py t5
  /tmp/wanref/bin/python tests/golden/umt5_tiny/make_golden.py
"""

import os

# bitwise reproducible CPU math from run to run (MKL picks code paths by memory alignment
# otherwise); set before torch loads MKL. One thread for the same reason.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import contextlib
import hashlib
import json
import platform
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)

TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            layer_norm_epsilon=1e-6, dropout_rate=0.0, decoder_start_token_id=0)

MODELS = {
    "t5": dict(folder="t5_tiny", config_cls=T5Config, model_cls=T5EncoderModel, seed=1234,
               config=dict(TINY, feed_forward_proj="gated-gelu"),
               variant=dict(name="relu", seed=1240, config=dict(TINY, feed_forward_proj="relu"))),
    "umt5": dict(folder="umt5_tiny", config_cls=UMT5Config, model_cls=UMT5EncoderModel, seed=4321,
                 config=dict(TINY, feed_forward_proj="gated-gelu"),
                 variant=dict(name="gated_silu", seed=4330, config=dict(TINY, feed_forward_proj="gated-silu"))),
}

# (num_buckets, max_distance) settings whose buckets are recorded: the production one first
BUCKETS = [(32, 128), (8, 16), (16, 32), (32, 64), (64, 256)]


@contextlib.contextmanager
def promote_float32_casts():
    """Tensor.float() and Tensor.to(torch.float32) leave float64 in float64 while active (as in
    ../wan_configs/make_golden.py): T5LayerNorm's variance is then float64 in a float64 model.
    Integer tensors (the relative positions) still become float32, as in every run."""
    orig_float, orig_to = torch.Tensor.float, torch.Tensor.to

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

    torch.Tensor.float, torch.Tensor.to = float_, to_
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to = orig_float, orig_to


def build(spec, cfg, seed):
    torch.manual_seed(seed)
    model = spec["model_cls"](spec["config_cls"](**cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    perturbed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                c = float(flat[0])
                p.copy_(c + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                perturbed.append(f"{name} (was all {c:g})")
    return model.eval(), perturbed


def make_ids(vocab, lengths, S, gen):
    ids = torch.zeros(len(lengths), S, dtype=torch.int64)
    mask = torch.zeros(len(lengths), S, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, :n - 1] = torch.randint(2, vocab, (n - 1,), generator=gen)
        ids[b, n - 1] = 1   # eos
        mask[b, :n] = 1
    return ids, mask


def forward(model, ids, mask, exact=False):
    ctx = promote_float32_casts() if exact else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.detach().clone()


def grads(model, ids, mask, target, exact):
    model.zero_grad(set_to_none=True)
    ctx = promote_float32_casts() if exact else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = ((out - target.to(out.dtype)) ** 2).mean()
        loss.backward()
    res = {"loss": loss.detach().reshape(1).clone()}
    for name, p in model.named_parameters():
        res[f"grad.{name}"] = p.grad.detach().clone()
    return res


def err(a, ref):
    a, ref = a.double(), ref.double()
    d = (a - ref).abs().max().item()
    r = ref.abs().max().item()
    return dict(max_abs=d, ref_absmax=r, rel_max=d / r if r > 0 else 0.0)


def file_info(path):
    with open(path, "rb") as f:
        b = f.read()
    return dict(bytes=len(b), sha256=hashlib.sha256(b).hexdigest())


def save(tensors, path, what):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"producer": "tests/golden/t5_tiny/make_golden.py", "what": what})


def make(kind):
    spec = MODELS[kind]
    d = os.path.join(GOLDEN, spec["folder"])
    for entry in os.listdir(d) if os.path.isdir(d) else []:
        p = os.path.join(d, entry)
        if entry != "make_golden.py":
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(d, exist_ok=True)
    seed = spec["seed"]
    model, perturbed = build(spec, spec["config"], seed)
    model.save_pretrained(d)

    gen = torch.Generator().manual_seed(seed + 2)
    ids, mask = make_ids(spec["config"]["vocab_size"], [11, 7], 11, gen)
    long_ids, long_mask = make_ids(spec["config"]["vocab_size"], [40, 29], 40, gen)
    target = torch.randn(2, 11, spec["config"]["d_model"], generator=gen)

    c32 = dict(input_ids=ids, attention_mask=mask, long_input_ids=long_ids, long_attention_mask=long_mask,
               target=target)
    c32["last_hidden_state"] = forward(model, ids, mask)
    c32["last_hidden_state_nomask"] = forward(model, ids, None)
    c32["long_last_hidden_state"] = forward(model, long_ids, long_mask)
    g32 = grads(model, ids, mask, target, False)

    # the folder through transformers' own from_pretrained: the same numbers; and the 16-bit loads
    m2 = spec["model_cls"].from_pretrained(d, dtype=torch.float32).eval()
    roundtrip = (forward(m2, ids, mask) - c32["last_hidden_state"]).abs().max().item()
    del m2
    low = {}
    for name, dt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        m = spec["model_cls"].from_pretrained(d, dtype=dt).eval()
        wo = {str(p.dtype) for n, p in m.named_parameters() if n.endswith(".wo.weight")}
        c32["last_hidden_state_" + name] = forward(m, ids, mask)
        low[name] = dict(wo_dtype=sorted(wo), output_dtype=str(c32["last_hidden_state_" + name].dtype),
                         vs_f32=err(c32["last_hidden_state_" + name], c32["last_hidden_state"]))
        del m

    if kind == "t5":
        rel = torch.arange(-600, 601, dtype=torch.int64)
        c32["relative_position"] = rel
        for nb, md in BUCKETS:
            c32[f"buckets.{nb}_{md}"] = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=True, num_buckets=nb, max_distance=md)

    model64 = model.double()
    c64 = {k: v for k, v in c32.items() if v.dtype == torch.int64}
    c64["target"] = target.double()
    c64["last_hidden_state"] = forward(model64, ids, mask, True)
    c64["last_hidden_state_nomask"] = forward(model64, ids, None, True)
    c64["long_last_hidden_state"] = forward(model64, long_ids, long_mask, True)
    g64 = grads(model64, ids, mask, target, True)

    save(c32, os.path.join(d, "case.safetensors"), "float32 run (+ bf16 / f16 loads)")
    save(c64, os.path.join(d, "case_f64exact.safetensors"), "float64 throughout")
    save(g32, os.path.join(d, "grads.safetensors"), "float32 gradients")
    save(g64, os.path.join(d, "grads_f64exact.safetensors"), "float64 gradients, float32 casts promoted")

    obs = {k: err(c32[k], c64[k]) for k in ("last_hidden_state", "last_hidden_state_nomask", "long_last_hidden_state")}
    obs["loss"] = err(g32["loss"], g64["loss"])
    obs["grads_worst"] = max((dict(err(g32[k], g64[k]), name=k) for k in g32 if k.startswith("grad.")),
                             key=lambda e: e["rel_max"])

    # the variant: another feed-forward type, same ids
    v = spec["variant"]
    vd = os.path.join(d, v["name"])
    os.makedirs(vd)
    vm, vpert = build(spec, v["config"], v["seed"])
    vm.save_pretrained(vd)
    v32 = dict(input_ids=ids, attention_mask=mask, last_hidden_state=forward(vm, ids, mask),
               last_hidden_state_nomask=forward(vm, ids, None))
    vm64 = vm.double()
    v64 = dict(input_ids=ids, attention_mask=mask, last_hidden_state=forward(vm64, ids, mask, True),
               last_hidden_state_nomask=forward(vm64, ids, None, True))
    save(v32, os.path.join(vd, "case.safetensors"), "float32 run")
    save(v64, os.path.join(vd, "case_f64exact.safetensors"), "float64 throughout")
    vobs = err(v32["last_hidden_state"], v64["last_hidden_state"])

    files = {}
    for root, _, names in os.walk(d):
        for n in sorted(names):
            if n != "make_golden.py" and n != "case.json":
                p = os.path.join(root, n)
                files[os.path.relpath(p, d)] = file_info(p)
    meta = dict(
        name=spec["folder"], model_class=spec["model_cls"].__name__, config_args=spec["config"],
        seed=seed, weights_init="torch.manual_seed(seed); Cls(Config(**config_args)) with transformers' init; every "
                                "constant parameter set to const + 0.1*randn (Generator(seed+1), named_parameters order)",
        perturbed_constant_params=perturbed,
        state_dict_keys=list(spec["model_cls"].from_pretrained(d).state_dict().keys()),
        inputs="Generator(seed+2): ids (2, 11) lengths 11 and 7, long ids (2, 40) lengths 40 and 29 "
               "(uniform in [2, vocab), eos 1 last, pad 0, mask 1/0), target randn (2, 11, d_model)",
        attn_implementation=model.config._attn_implementation,
        from_pretrained_roundtrip_max_abs=roundtrip,
        low_precision_loads=low,
        tolerances_observed_f32_vs_f64exact=obs,
        variant=dict(name=v["name"], config_args=v["config"], seed=v["seed"], perturbed_constant_params=vpert,
                     f32_vs_f64exact=vobs),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version()),
        files=files,
    )
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(dict(folder=d, roundtrip=roundtrip, obs=obs, low=low, variant=vobs), indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    make(sys.argv[1] if len(sys.argv) > 1 else "t5")
