#!/usr/bin/env python3
"""tests/golden/flux_prompt/make_golden.py: diffusers' FluxPipeline from prompts to images, text
encoders and tokenizers included, on a tiny pipeline, for tests/lua/test_sampling.lua
(nemo.sampling.flux with prompt=).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

The pipeline: transformer/, vae/ and scheduler/ of tests/golden/flux_sampling (joint_attention_dim
and pooled_projection_dim 32), the tokenizers of tests/golden/tokenizers (clip/ -> tokenizer,
t5/ -> tokenizer_2), and two tiny random text encoders written here:
  text_encoder    CLIPTextModel: vocab 4514 (the CLIP tokenizer's), hidden 32, intermediate 37,
                  2 layers, 4 heads, 77 positions, quick_gelu, eos_token_id 2 (FLUX's convention:
                  the pooled output is taken at argmax(input_ids)); torch.manual_seed(10)
  text_encoder_2  T5EncoderModel: vocab 610 (the T5 tokenizer's), d_model 32, d_kv 8, d_ff 48,
                  2 layers, 4 heads, gated-gelu; torch.manual_seed(11)
(constant parameters perturbed as in flux_sampling). The run: FluxPipeline(...)(prompt=PROMPTS,
max_sequence_length=16, height=width=32, num_inference_steps=4, guidance_scale=3.5, latents = the
packed randn of torch.Generator(3)), output_type "latent" and "pt"; encode_prompt's outputs too;
and once more with negative_prompt=NEGATIVE, true_cfg_scale=2.5 (true CFG) -> latents_final_true_cfg.

Files: text_encoder/, text_encoder_2/ (save_pretrained, float32), case.safetensors (prompt_embeds,
pooled_prompt_embeds, clip_input_ids, t5_input_ids, latents_init, latents_final, image (the
decoded [-1, 1] image) and image_pt ([0, 1])), case.json.

  /tmp/wanref/bin/python tests/golden/flux_prompt/make_golden.py
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json, shutil, sys, tempfile
import torch, transformers, diffusers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, CLIPTokenizer, T5TokenizerFast
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.dirname(HERE)
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars, highly detailed"]
NEGATIVE, TRUE_CFG = ["blurry", "low quality, ugly"], 2.5
MAXLEN, HEIGHT, WIDTH, STEPS, GUIDANCE = 16, 32, 32, 4, 3.5

def perturb_constants(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() > 0 and torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

def main():
    torch.set_num_threads(1)
    src = os.path.join(GOLD, "flux_sampling")
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(src, "transformer")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae")).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(src, "scheduler"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(GOLD, "tokenizers", "clip"))
    tok.model_max_length = 77
    tok2 = T5TokenizerFast.from_pretrained(os.path.join(GOLD, "tokenizers", "t5"))
    torch.manual_seed(10)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=4514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      eos_token_id=2, bos_token_id=0, pad_token_id=1, projection_dim=32)).eval()
    perturb_constants(te, 12)
    torch.manual_seed(11)
    te2 = T5EncoderModel(T5Config(vocab_size=610, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                  relative_attention_max_distance=16, is_encoder_decoder=False)).eval()
    perturb_constants(te2, 13)
    te.save_pretrained(os.path.join(HERE, "text_encoder"))
    te2.save_pretrained(os.path.join(HERE, "text_encoder_2"))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2)
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=MAXLEN)
        ids1 = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = tok2(PROMPTS, padding="max_length", max_length=MAXLEN, truncation=True, return_tensors="pt").input_ids
        B, C = len(PROMPTS), transformer.config.in_channels // 4
        vsf = 2 ** (len(vae.config.block_out_channels) - 1)
        h, w = 2 * (HEIGHT // (vsf * 2)), 2 * (WIDTH // (vsf * 2))
        x = torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(3))
        lat = FluxPipeline._pack_latents(x, B, C, h, w)
        out = pipe(prompt=PROMPTS, max_sequence_length=MAXLEN, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=lat.clone(), output_type="latent").images
        unpacked = FluxPipeline._unpack_latents(out, HEIGHT, WIDTH, vsf)
        z = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z).sample
        image_pt = pipe(prompt=PROMPTS, max_sequence_length=MAXLEN, height=HEIGHT, width=WIDTH,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat.clone(), output_type="pt").images
        # true CFG (negative prompts, true_cfg_scale > 1): a second transformer pass per step
        out_cfg = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG, max_sequence_length=MAXLEN,
                       height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       latents=lat.clone(), output_type="latent").images
    save_file({"latents_final_true_cfg": out_cfg.contiguous(), "prompt_embeds": pe.contiguous(), "pooled_prompt_embeds": pooled.contiguous(),
               "clip_input_ids": ids1.contiguous(), "t5_input_ids": ids2.contiguous(), "latents_init": lat.contiguous(),
               "latents_final": out.contiguous(), "image": image.contiguous(), "image_pt": image_pt.contiguous()},
              os.path.join(HERE, "case.safetensors"))
    json.dump({"name": "flux_prompt", "prompts": PROMPTS, "negative_prompts": NEGATIVE, "true_cfg_scale": TRUE_CFG, "max_sequence_length": MAXLEN, "height": HEIGHT,
               "width": WIDTH, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]}},
              open(os.path.join(HERE, "case.json"), "w"), indent=1)
    print("ok", pe.shape, pooled.shape, image.shape)

main()
