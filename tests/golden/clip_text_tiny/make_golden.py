#!/usr/bin/env python3
"""tests/golden/clip_text_tiny/make_golden.py: a tiny random CLIPTextModel (FLUX's text_encoder
architecture, openai/clip-vit-large-patch14's CLIPTextModel) run by Hugging Face transformers,
for tests/lua/test_clip.lua (nemo.models.clip).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/clip_text_tiny/make_golden.py     (transformers 5.24, torch 2.15, CPU)

What it does:
  1. CLIPTextConfig(vocab 99, hidden 32, intermediate 37, 2 layers, 4 heads (head dim 8),
     max_position_embeddings 20, quick_gelu, layer_norm_eps 1e-5, bos 0 / eos 2 / pad 1 (the
     legacy values FLUX.1's text_encoder/config.json has), projection_dim 32), default attention
     implementation (sdpa). torch.manual_seed(0), then every parameter is redrawn from
     torch.Generator(1) in named_parameters order so that every weight matters and attention is
     not near-uniform: embeddings randn, Linear weights randn / sqrt(in), Linear biases
     0.1 randn, LayerNorm weights 1 + 0.1 randn, biases 0.1 randn.
  2. save_pretrained -> config.json. transformers 5 saves CLIPTextModel WITHOUT the
     `text_model.` prefix (embeddings.*, encoder.*, final_layer_norm.*); FLUX's checkpoints (saved
     by transformers 4) have `text_model.*` and, in older files, the buffer
     `text_model.embeddings.position_ids` (int64 (1, max_pos)). model.safetensors is rewritten in
     that legacy layout (same tensors, `text_model.` prefix, position_ids added) and the script
     checks that transformers' own from_pretrained of the rewritten folder gives bitwise the same
     outputs.
  3. Inputs (batch 2, length 12): ids in [0, 99); 95 plays bos, 96 the real end-of-text token,
     98 an "added token" with an id above it (what breaks the legacy argmax pooling):
       row 0: 95 13  2 98 45 98 96 96 96 96 96 96   mask 1 x 7, 0 x 5 (padded with eos, as
              FLUX's CLIP tokenizer pads)
       row 1: 95 31 64  2  8 77 50 23 96  0  0  0   mask 1 x 9, 0 x 3 (padded with 0)
     eos_token_id 2 (legacy): pooler_output at input_ids.argmax(-1) (first maximum) = 3, 8;
     (the "first id == 2" rule would give 2, 3). attention_mask_left: row 0 masks positions 0..1
     (left padding: query rows 0 and 1 attend to nothing; torch's sdpa gives them zeros), row 1
     all ones.
  4. Outputs (case.safetensors float32, case_f64.safetensors from model.double() with the same
     inputs, same keys): for the plain call (no mask) last_hidden_state, pooler_output,
     hidden_states.0..2 (embeddings, then each layer's output; the last is before
     final_layer_norm); masked.* the same with attention_mask (masked.hidden_states.1..2 only:
     the embeddings do not depend on the mask); left.last_hidden_state with
     attention_mask_left; and two variants of the same weights with other configs (written as
     config_<name>.json): eos96_gelu (eos_token_id 96, the new-style config: pooler_output at the
     first id == 96 = 6, 8; hidden_act gelu) and gelu_new (eos 2, hidden_act gelu_new), each
     <name>.last_hidden_state, <name>.pooler_output without mask and <name>.masked.last_hidden_state.
  5. golden.json: the settings, versions, the measured f32-vs-f64 max errors and each file's sha256.
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import hashlib
import json
import platform
import shutil
import tempfile

import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=20, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
              eos_token_id=2, pad_token_id=1, projection_dim=32)
VARIANTS = {
    "eos96_gelu": dict(eos_token_id=96, hidden_act="gelu"),
    "gelu_new": dict(hidden_act="gelu_new"),
}

IDS = torch.tensor([[95, 13, 2, 98, 45, 98, 96, 96, 96, 96, 96, 96],
                    [95, 31, 64, 2, 8, 77, 50, 23, 96, 0, 0, 0]], dtype=torch.int64)
MASK = torch.tensor([[1] * 7 + [0] * 5, [1] * 9 + [0] * 3], dtype=torch.int64)
MASK_LEFT = torch.tensor([[0, 0] + [1] * 10, [1] * 12], dtype=torch.int64)


def build(cfg_kwargs):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**cfg_kwargs)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embedding" in name:
                p.copy_(r)
            elif "layer_norm" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif name.endswith("weight"):
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * r)
    return model


def run(model, dtype, prefix=""):
    out = {}
    with torch.no_grad():
        o = model(input_ids=IDS, output_hidden_states=not prefix)
        out[prefix + "last_hidden_state"] = o.last_hidden_state
        out[prefix + "pooler_output"] = o.pooler_output
        if not prefix:
            for i, h in enumerate(o.hidden_states):
                out["hidden_states.%d" % i] = h
        o = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=not prefix)
        out[prefix + "masked.last_hidden_state"] = o.last_hidden_state
        if not prefix:
            out["masked.pooler_output"] = o.pooler_output
            for i, h in enumerate(o.hidden_states):
                if i > 0:   # hidden_states.0 (the embeddings) does not depend on the mask
                    out["masked.hidden_states.%d" % i] = h
            o = model(input_ids=IDS, attention_mask=MASK_LEFT)
            out["left.last_hidden_state"] = o.last_hidden_state
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    model = build(CONFIG)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    sd5 = load_file(os.path.join(tmp, "model.safetensors"))
    assert all(not k.startswith("text_model.") for k in sd5), "transformers saved text_model.* keys"
    legacy = {"text_model." + k: v.contiguous() for k, v in sd5.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(CONFIG["max_position_embeddings"],
                                                                dtype=torch.int64).unsqueeze(0)
    for name in os.listdir(HERE):
        if name != "make_golden.py":
            os.remove(os.path.join(HERE, name))
    shutil.copy(os.path.join(tmp, "config.json"), os.path.join(HERE, "config.json"))
    save_file(legacy, os.path.join(HERE, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(tmp)

    # transformers reads the legacy layout back to the same model
    reloaded = CLIPTextModel.from_pretrained(HERE).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k

    case32 = {"input_ids": IDS, "attention_mask": MASK, "attention_mask_left": MASK_LEFT}
    case64 = dict(case32)
    case32.update(run(reloaded, torch.float32))
    model64 = build(CONFIG).double()
    case64.update(run(model64, torch.float64))
    for name, changes in VARIANTS.items():
        cfg = dict(CONFIG, **changes)
        m = build(cfg)
        with torch.no_grad():
            for k, v in m.state_dict().items():
                assert torch.equal(v, model.state_dict()[k]), (name, k)
        m.config.to_json_file(os.path.join(HERE, "config_%s.json" % name))
        case32.update(run(m, torch.float32, name + "."))
        case64.update(run(m.double(), torch.float64, name + "."))

    # the pooling rules, checked on the reference itself
    lhs = case64["last_hidden_state"]
    assert torch.equal(case64["pooler_output"], lhs[[0, 1], [3, 8]])
    assert torch.equal(case64["eos96_gelu.pooler_output"], case64["eos96_gelu.last_hidden_state"][[0, 1], [6, 8]])
    assert not torch.equal(case64["pooler_output"], lhs[[0, 1], [2, 3]])

    save_file(case32, os.path.join(HERE, "case.safetensors"), metadata={"format": "pt"})
    save_file(case64, os.path.join(HERE, "case_f64.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(HERE):
        os.chmod(os.path.join(HERE, name), 0o644)

    observed = {}
    for k, v in case32.items():
        if v.is_floating_point():
            ref = case64[k]
            observed[k] = {"max_abs": float((v.double() - ref).abs().max()),
                           "rel_max": float((v.double() - ref).abs().max() / ref.abs().max())}
    files = sorted(n for n in os.listdir(HERE) if n not in ("make_golden.py", "golden.json"))
    meta = {
        "name": "clip_text_tiny",
        "model": "transformers CLIPTextModel (FLUX.1's text_encoder architecture)",
        "config": CONFIG,
        "variants": VARIANTS,
        "attn_implementation": "sdpa",
        "init": "manual_seed(0) then Generator(1) in named_parameters order: embeddings randn, Linear weight "
                "randn/sqrt(in), Linear bias 0.1 randn, LayerNorm weight 1+0.1 randn, bias 0.1 randn",
        "weights_layout": "legacy: text_model.* keys plus text_model.embeddings.position_ids (transformers 5 "
                          "saves without the prefix)",
        "input_ids": IDS.tolist(), "attention_mask": MASK.tolist(), "attention_mask_left": MASK_LEFT.tolist(),
        "pooled_positions": {"eos_token_id 2 (argmax)": [3, 8], "eos96_gelu (first id == 96)": [6, 8]},
        "num_params": sum(p.numel() for p in model.parameters()),
        "tolerances_observed": {"f32_vs_f64": observed},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "files": {n: {"bytes": os.path.getsize(os.path.join(HERE, n)), "sha256": sha(os.path.join(HERE, n))}
                  for n in files},
    }
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    worst = max(o["rel_max"] for o in observed.values())
    print("wrote", files, "golden.json; worst f32 vs f64 rel_max %.3g" % worst)


if __name__ == "__main__":
    main()
