#!/usr/bin/env python3
"""tests/golden/wan_prompt/make_golden.py: diffusers' WanPipeline from prompts to video frames on a
tiny pipeline, for tests/lua/test_sampling.lua (nemo.sampling.wan).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

The pipeline (written here with save_pretrained, float32; the tokenizer is tests/golden/tokenizers/t5,
copied in by the test): WanTransformer3DModel (patch (1,2,2), 2 heads x 8, in/out 4, text_dim 32,
freq_dim 32, ffn 32, 2 layers, rope_max_seq_len 32), AutoencoderKLWan (base_dim 8, z_dim 4,
dim_mult [1,2,2,2], num_res_blocks 1, latents_mean / latents_std of length 4), UMT5EncoderModel
(vocab 610, d_model 32, d_kv 8, d_ff 48, 2 layers, 4 heads), UniPCMultistepScheduler with Wan 2.1's
flow settings (flow_prediction, use_flow_sigmas, flow_shift 3.0). Seeds 20..23; constant
parameters perturbed as the other cases do.

The run: WanPipeline(prompt=PROMPTS, negative_prompt=NEGATIVE, height=32, width=32, num_frames=5,
num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16, latents = randn of
torch.Generator(3) of shape (B, 4, 2, 4, 4)), output_type "latent" and "pt", and encode_prompt's
prompt_embeds / negative_prompt_embeds.

Files: transformer/, vae/, text_encoder/, scheduler/, model_index.json (no tokenizer folder),
case.safetensors (prompt_embeds, negative_prompt_embeds, input_ids, latents_init, latents_final,
video (decoded, [-1, 1], (B, 3, F, H, W)), video_pt (postprocessed, (B, F, 3, H, W) in [0, 1])),
case.json.

  /tmp/wanref/bin/python tests/golden/wan_prompt/make_golden.py
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json, sys
import torch, transformers, diffusers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.dirname(HERE)
PROMPTS = ["a cat walking on grass", "a red ball"]
NEGATIVE = ["blurry", "static"]
H, W, FRAMES, STEPS, GUIDANCE, MAXLEN = 32, 32, 5, 4, 5.0, 16

def perturb_constants(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() > 0 and torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

def main():
    torch.set_num_threads(1)
    torch.manual_seed(20)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                               rope_max_seq_len=32).eval()
    perturb_constants(tr, 24)
    torch.manual_seed(21)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0,
                           latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0]).eval()
    perturb_constants(vae, 25)
    torch.manual_seed(22)
    te = UMT5EncoderModel(UMT5Config(vocab_size=610, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    perturb_constants(te, 26)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                    flow_shift=3.0)
    tok = T5TokenizerFast.from_pretrained(os.path.join(GOLD, "tokenizers", "t5"))
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)
    pipe.save_pretrained(HERE)
    import shutil
    shutil.rmtree(os.path.join(HERE, "tokenizer"), ignore_errors=True)   # the test copies tokenizers/t5 in
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(PROMPTS, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=MAXLEN)
        ids = tok(PROMPTS, padding="max_length", max_length=MAXLEN, truncation=True, return_tensors="pt").input_ids
        B = len(PROMPTS)
        lat = torch.randn(B, 4, (FRAMES - 1) // 4 + 1, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
        out = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=MAXLEN,
                   latents=lat.clone(), output_type="latent").frames
        z = out.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
        video = vae.decode(z / std + mean, return_dict=False)[0]
        video_pt = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=MAXLEN,
                        latents=lat.clone(), output_type="pt").frames
    save_file({"prompt_embeds": pe.contiguous(), "negative_prompt_embeds": npe.contiguous(), "input_ids": ids.contiguous(),
               "latents_init": lat.contiguous(), "latents_final": out.contiguous(), "video": video.contiguous(),
               "video_pt": video_pt.contiguous()}, os.path.join(HERE, "case.safetensors"))
    json.dump({"name": "wan_prompt", "prompts": PROMPTS, "negative_prompts": NEGATIVE, "height": H, "width": W,
               "num_frames": FRAMES, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
               "max_sequence_length": MAXLEN, "timesteps": [float(t) for t in sched.timesteps],
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]}},
              open(os.path.join(HERE, "case.json"), "w"), indent=1)
    print("ok", pe.shape, out.shape, video.shape, video_pt.shape)

main()
