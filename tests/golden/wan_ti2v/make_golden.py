#!/usr/bin/env python3
"""tests/golden/wan_ti2v/make_golden.py: diffusers' WanImageToVideoPipeline in Wan 2.2 TI2V's mode
(expand_timesteps = true: the image's latent is frame 0, per-token timesteps with 0 on frame 0) on
a tiny pipeline, for tests/lua/test_wan22_vae.lua (nemo.sampling.wan with image =).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/wan_ti2v/make_golden.py    (diffusers 0.40.0, torch 2.15, CPU)

Components: tests/golden/wan_prompt's transformer (in_channels 4, patch (1, 2, 2)), text_encoder
and scheduler, tests/golden/tokenizers/t5, and tests/golden/wan22_vae_tiny's Wan 2.2-layout VAE
(z_dim 4, 16x spatial compression). No image encoder (TI2V has none). Inputs: the image, torch
rand (1, 3, 64, 32) of torch.Generator(5) in [0, 1] (diffusers' tensor convention; the
pipeline maps it to [-1, 1]); initial latents randn (2, 4, 2, 4, 2) of torch.Generator(6); two
prompts with negative prompts, guidance 4.0, 4 steps, 5 frames of 64 x 32, output_type "latent"
(the final latents, frame 0 replaced by the image's latent as the pipeline does). The decoded
video is the pipeline's own decode of those latents (latents / (1 / std) + mean, vae.decode).

Files: case.safetensors (image, latents_init, latents_final, video), case.json.
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json, sys
import torch, transformers, diffusers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from transformers import T5TokenizerFast, UMT5EncoderModel
from diffusers.pipelines.wan import pipeline_wan_i2v
from safetensors.torch import save_file

# pipeline_wan_i2v calls ftfy.fix_text without checking that ftfy is installed (pipeline_wan.py
# checks); ftfy is not installed here, so the text is used as is, as WanPipeline and nemo-lua do.
if not hasattr(pipeline_wan_i2v, "ftfy"):
    pipeline_wan_i2v.ftfy = type("NoFtfy", (), {"fix_text": staticmethod(lambda text: text)})

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.dirname(HERE)
SRC = os.path.join(GOLD, "wan_prompt")
PROMPTS = ["a cat walking on grass", "a red ball"]
NEGATIVE = ["blurry", "static"]
H, W, FRAMES, STEPS, MAXLEN, G = 64, 32, 5, 4, 16, 4.0


def main():
    torch.set_num_threads(1)
    tr = WanTransformer3DModel.from_pretrained(os.path.join(SRC, "transformer")).eval()
    vae = AutoencoderKLWan.from_pretrained(os.path.join(GOLD, "wan22_vae_tiny")).eval()
    te = UMT5EncoderModel.from_pretrained(os.path.join(SRC, "text_encoder")).eval()
    sched = UniPCMultistepScheduler.from_pretrained(os.path.join(SRC, "scheduler"))
    tok = T5TokenizerFast.from_pretrained(os.path.join(GOLD, "tokenizers", "t5"))
    pipe = WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=tr,
                                   expand_timesteps=True)
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(5))
    lat = torch.randn(len(PROMPTS), 4, (FRAMES - 1) // 4 + 1, H // 16, W // 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = pipe(image=image, prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=G, max_sequence_length=MAXLEN, latents=lat.clone(),
                   output_type="latent").frames
        mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
        video = vae.decode(out / inv_std + mean, return_dict=False)[0]
    save_file({"image": image.contiguous(), "latents_init": lat.contiguous(), "latents_final": out.contiguous(),
               "video": video.contiguous()}, os.path.join(HERE, "case.safetensors"))
    os.chmod(os.path.join(HERE, "case.safetensors"), 0o644)
    json.dump({"name": "wan_ti2v", "prompts": PROMPTS, "negative_prompts": NEGATIVE, "height": H, "width": W,
               "num_frames": FRAMES, "num_inference_steps": STEPS, "max_sequence_length": MAXLEN,
               "guidance_scale": G, "timesteps": [float(t) for t in sched.timesteps],
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]}},
              open(os.path.join(HERE, "case.json"), "w"), indent=1)
    print("ok", out.shape, video.shape, float(out.abs().max()))


main()
