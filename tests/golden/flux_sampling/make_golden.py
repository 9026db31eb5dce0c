#!/usr/bin/env python3
"""tests/golden/flux_sampling/make_golden.py: diffusers' FluxPipeline sampling loop on a tiny,
random-but-seeded pipeline, for tests/lua/test_sampling.lua (nemo.sampling.flux).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

What it does:
  1. torch.manual_seed(0); FluxTransformer2DModel (in_channels 16 = 4 latent channels * 4,
     1 double + 1 single block, 2 heads x 16, axes_dims_rope (4, 6, 6), joint 32, pooled 32,
     guidance_embeds True) with diffusers' default init; every parameter that came out constant
     (norm weights 1, zero biases) becomes const + 0.1*randn (torch.Generator(1)), so nothing is
     trivially zero; the same for a tiny AutoencoderKL (block_out_channels [4, 8], latent 4,
     norm groups 2, FLUX.1's no quant convs, scaling 0.3611 / shift 0.1159) with Generator(2).
  2. FlowMatchEulerDiscreteScheduler with FLUX.1-dev's scheduler_config (dynamic shifting,
     base/max shift 0.5/1.15, seq lens 256/4096, shift 3.0).
  3. FluxPipeline(scheduler, vae, transformer, text_encoder=None, tokenizer=None,
     text_encoder_2=None, tokenizer_2=None): the pipeline is constructed with the text encoders
     left out (diffusers allows None components); __call__ is run with prompt_embeds and
     pooled_prompt_embeds, so encode_prompt only builds text_ids = zeros(L, 3) (transformer dtype).
  4. Inputs from torch.Generator(3): prompt_embeds (B, L, 32), pooled (B, 32), then the initial
     latents (B, C, h, w) randn, packed with FluxPipeline._pack_latents and passed as latents=.
     B = 2, L = 8, height = width = 32 pixels; vae_scale_factor = 2 ** (len(block_out) - 1) = 2,
     so the latents are 2 * (32 // 4) = 16 x 16, packed to 64 tokens of 16 channels.
  5. pipe(..., num_inference_steps=4, guidance_scale=3.5, output_type="latent"), recording the
     latents after every step with callback_on_step_end; then the decode exactly as __call__ does
     for output_type != "latent": _unpack_latents, / scaling_factor + shift_factor, vae.decode;
     and also pipe(..., output_type="pt") (postprocessed to [0, 1]) for the uint8 conversion.

Files: transformer/, vae/, scheduler/, model_index.json (pipe.save_pretrained, float32),
case.safetensors (prompt_embeds, pooled_prompt_embeds, latents_init (packed), latents_init_unpacked,
latents_step1..4, latents_final, latents_unpacked (scaled, the VAE input), image (decoded, [-1, 1]),
image_pt (postprocessed [0, 1]), timesteps, sigmas), case.json (the settings and versions).

  /tmp/wanref/bin/python tests/golden/flux_sampling/make_golden.py
"""
import os
os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json
import platform
import shutil
import sys

import numpy as np
import torch
import diffusers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[4, 8], layers_per_block=1,
           latent_channels=4, norm_num_groups=2, sample_size=32, use_quant_conv=False,
           use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
B, L, HEIGHT, WIDTH, STEPS, GUIDANCE = 2, 8, 32, 32, 4, 3.5


def perturb_constants(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() > 0 and torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TRANSFORMER).eval()
    perturb_constants(transformer, 1)
    vae = AutoencoderKL(**VAE).eval()
    perturb_constants(vae, 2)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    vsf = pipe.vae_scale_factor
    assert vsf == 2, vsf
    C = TRANSFORMER["in_channels"] // 4
    h = 2 * (HEIGHT // (vsf * 2))
    w = 2 * (WIDTH // (vsf * 2))

    g = torch.Generator().manual_seed(3)
    prompt_embeds = torch.randn(B, L, TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(B, TRANSFORMER["pooled_projection_dim"], generator=g)
    lat_unpacked = torch.randn(B, C, h, w, generator=g)
    lat_packed = FluxPipeline._pack_latents(lat_unpacked, B, C, h, w)

    steps = []

    def cb(p, i, t, kw):
        steps.append(kw["latents"].detach().clone())
        return {}

    common = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=HEIGHT, width=WIDTH,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat_packed.clone())
    with torch.no_grad():
        final = pipe(**common, output_type="latent", callback_on_step_end=cb,
                     callback_on_step_end_tensor_inputs=["latents"]).images
        timesteps = pipe.scheduler.timesteps.clone()
        sigmas = pipe.scheduler.sigmas.clone()
        # the decode, as __call__ does it for output_type != "latent"
        unp = FluxPipeline._unpack_latents(final, HEIGHT, WIDTH, vsf)
        unp = (unp / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(unp, return_dict=False)[0]
        image_pt = pipe(**common, output_type="pt").images
    assert len(steps) == STEPS
    assert torch.equal(steps[-1], final)
    # the same pipeline's postprocess of our decoded image must be image_pt
    assert torch.allclose(pipe.image_processor.postprocess(image, output_type="pt"), image_pt, atol=0, rtol=0)

    out = os.path.join(HERE)
    for sub in ("transformer", "vae", "scheduler"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    pipe.save_pretrained(out)
    tensors = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "latents_init": lat_packed,
               "latents_init_unpacked": lat_unpacked, "latents_final": final, "latents_unpacked": unp,
               "image": image, "image_pt": image_pt, "timesteps": timesteps.float(), "sigmas": sigmas.float()}
    for i, s in enumerate(steps):
        tensors["latents_step%d" % (i + 1)] = s
    tensors = {k: v.contiguous().float() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "case.safetensors"))
    image_seq_len = lat_packed.shape[1]
    m = (SCHEDULER["max_shift"] - SCHEDULER["base_shift"]) / (SCHEDULER["max_image_seq_len"] - SCHEDULER["base_image_seq_len"])
    mu = image_seq_len * m + (SCHEDULER["base_shift"] - m * SCHEDULER["base_image_seq_len"])
    meta = {
        "name": "flux_sampling",
        "pipeline": "FluxPipeline.__call__ with prompt_embeds / pooled_prompt_embeds and packed latents=, no true CFG",
        "batch": B, "text_len": L, "height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE, "vae_scale_factor": vsf, "latent_height": h, "latent_width": w,
        "latent_channels": C, "image_seq_len": image_seq_len, "mu": mu,
        "sigmas_in": np.linspace(1.0, 1 / STEPS, STEPS).tolist(),
        "timesteps": timesteps.tolist(), "sigmas": sigmas.tolist(),
        "transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in TRANSFORMER.items()},
        "vae": VAE, "scheduler": SCHEDULER,
        "seeds": {"weights": 0, "transformer_constants": 1, "vae_constants": 2, "inputs": 3},
        "keys": sorted(tensors),
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "note": "float32 on the CPU, one thread; FluxPipeline constructed with text encoders/tokenizers None",
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", out, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main()
