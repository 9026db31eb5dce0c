#!/usr/bin/env python3
"""tests/golden/wan22_prompt/make_golden.py: diffusers' WanPipeline in its Wan 2.2 modes on the tiny
pipeline of tests/golden/wan_prompt, for tests/lua/test_sampling.lua (nemo.sampling.wan).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

wan_prompt's transformer, vae, text_encoder and scheduler (loaded from that folder; the tokenizer is
tests/golden/tokenizers/t5) plus a second WanTransformer3DModel of the same config (seed 27,
constant parameters perturbed with seed 28), saved as transformer_2/. Two runs from wan_prompt's
prompts, negative prompts and initial latents (randn of torch.Generator(3)), output_type "latent":

- two_stage: WanPipeline(..., transformer_2=tr2, boundary_ratio=0.875): timesteps >= 875 use
  transformer with guidance_scale 5.0, the rest transformer_2 with guidance_scale_2 3.0
  (model_index_two_stage.json is that pipeline's model_index.json);
- expand: WanPipeline(..., expand_timesteps=True) (Wan 2.2 TI2V's per-token timesteps, one
  transformer), guidance_scale 4.0.

Files: transformer_2/, model_index_two_stage.json, case.safetensors (latents_init,
latents_final_two_stage, latents_final_expand), case.json.

  /tmp/wanref/bin/python tests/golden/wan22_prompt/make_golden.py
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json, shutil, sys, tempfile
import torch, transformers, diffusers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5TokenizerFast, UMT5EncoderModel
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.dirname(HERE)
SRC = os.path.join(GOLD, "wan_prompt")
PROMPTS = ["a cat walking on grass", "a red ball"]
NEGATIVE = ["blurry", "static"]
H, W, FRAMES, STEPS, MAXLEN = 32, 32, 5, 4, 16
BOUNDARY, G1, G2, G_EXPAND = 0.875, 5.0, 3.0, 4.0

def perturb_constants(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() > 0 and torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

def main():
    torch.set_num_threads(1)
    tr = WanTransformer3DModel.from_pretrained(os.path.join(SRC, "transformer")).eval()
    vae = AutoencoderKLWan.from_pretrained(os.path.join(SRC, "vae")).eval()
    te = UMT5EncoderModel.from_pretrained(os.path.join(SRC, "text_encoder")).eval()
    sched = UniPCMultistepScheduler.from_pretrained(os.path.join(SRC, "scheduler"))
    tok = T5TokenizerFast.from_pretrained(os.path.join(GOLD, "tokenizers", "t5"))
    torch.manual_seed(27)
    tr2 = WanTransformer3DModel(**tr.config).eval()
    perturb_constants(tr2, 28)
    two = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched, transformer_2=tr2,
                      boundary_ratio=BOUNDARY)
    tmp = tempfile.mkdtemp()
    two.save_pretrained(tmp)
    shutil.rmtree(os.path.join(HERE, "transformer_2"), ignore_errors=True)
    shutil.copytree(os.path.join(tmp, "transformer_2"), os.path.join(HERE, "transformer_2"))
    shutil.copy(os.path.join(tmp, "model_index.json"), os.path.join(HERE, "model_index_two_stage.json"))
    shutil.rmtree(tmp)
    exp = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched, expand_timesteps=True)
    B = len(PROMPTS)
    lat = torch.randn(B, 4, (FRAMES - 1) // 4 + 1, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    common = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                  num_inference_steps=STEPS, max_sequence_length=MAXLEN, output_type="latent")
    with torch.no_grad():
        l2 = two(latents=lat.clone(), guidance_scale=G1, guidance_scale_2=G2, **common).frames
        le = exp(latents=lat.clone(), guidance_scale=G_EXPAND, **common).frames
    save_file({"latents_init": lat.contiguous(), "latents_final_two_stage": l2.contiguous(),
               "latents_final_expand": le.contiguous()}, os.path.join(HERE, "case.safetensors"))
    json.dump({"name": "wan22_prompt", "prompts": PROMPTS, "negative_prompts": NEGATIVE, "height": H, "width": W,
               "num_frames": FRAMES, "num_inference_steps": STEPS, "max_sequence_length": MAXLEN,
               "boundary_ratio": BOUNDARY, "guidance_scale": G1, "guidance_scale_2": G2,
               "guidance_scale_expand": G_EXPAND, "timesteps": [float(t) for t in sched.timesteps],
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]}},
              open(os.path.join(HERE, "case.json"), "w"), indent=1)
    print("ok", l2.shape, le.shape, float((l2 - le).abs().max()))

main()
