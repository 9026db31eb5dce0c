#!/usr/bin/env python3
"""tests/golden/clip_vision_tiny/make_golden.py: a tiny random CLIPVisionModel (the image tower
Wan 2.1 I2V uses as its image_encoder) run by transformers, for tests/lua/test_clip_vision.lua.

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/clip_vision_tiny/make_golden.py    (transformers 5.24, torch 2.15, CPU)

CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
image_size=28, patch_size=14, hidden_act="gelu" (Wan's image encoder's), layer_norm_eps=1e-5,
projection_dim=8): torch.manual_seed(0), transformers' init, then every parameter that came out
constant (LayerNorm weights 1, biases 0) set to const + 0.1 randn from Generator(1) in
named_parameters order. save_pretrained -> config.json, model.safetensors (transformers 5 names:
no vision_model. prefix). Input: pixel_values = randn (2, 3, 28, 28) of Generator(2). Outputs of
model(pixel_values, output_hidden_states=True): last_hidden_state, pooler_output, hidden_states.<i>
(i = 0..3: after pre_layrnorm, then each layer), in float32 (case.safetensors) and float64
(case_f64.safetensors: model.double() on the widened input).
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json, platform, shutil, tempfile
import torch, transformers
from transformers import CLIPVisionConfig, CLIPVisionModel
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def run(model, x):
    with torch.no_grad():
        o = model(pixel_values=x, output_hidden_states=True)
    out = {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}
    for i, h in enumerate(o.hidden_states):
        out["hidden_states.%d" % i] = h
    return {k: v.clone().contiguous() for k, v in out.items()}


def main():
    torch.set_num_threads(1)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                           image_size=28, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                p.copy_(float(flat[0]) + 0.1 * torch.randn(p.shape, generator=g))
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    for n in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tmp, n), os.path.join(HERE, n))
    shutil.rmtree(tmp)
    model = CLIPVisionModel.from_pretrained(HERE).eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    c32 = {"pixel_values": x}
    c32.update(run(model, x))
    c64 = run(model.double(), x.double())
    save_file(c32, os.path.join(HERE, "case.safetensors"))
    save_file(c64, os.path.join(HERE, "case_f64.safetensors"))
    for n in os.listdir(HERE):
        os.chmod(os.path.join(HERE, n), 0o644)
    err = {k: float((c32[k].double() - v).abs().max() / v.abs().max()) for k, v in c64.items()}
    json.dump({"name": "clip_vision_tiny", "config": cfg.to_dict(), "keys": list(model.state_dict().keys()),
               "f32_vs_f64_rel": err, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}}, open(os.path.join(HERE, "case.json"), "w"), indent=1)
    print(err)


main()
