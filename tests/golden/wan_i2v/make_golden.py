#!/usr/bin/env python3
"""tests/golden/wan_i2v/make_golden.py: diffusers' WanImageToVideoPipeline (Wan 2.1 I2V: a CLIP
image encoder, the transformer's image_dim / added K/V, the mask + first-frame condition channels)
on a tiny pipeline, for tests/lua/test_wan_i2v.lua (nemo.sampling.wan with image =).

PROVENANCE ONLY: nothing in the build or the tests runs this script.

  /tmp/wanref/bin/python tests/golden/wan_i2v/make_golden.py    (diffusers 0.40.0, transformers 5.24, torch 2.15, CPU)

Components: tests/golden/wan_prompt's vae (Wan 2.1 layout, z_dim 4), text_encoder and scheduler,
tests/golden/tokenizers/t5, tests/golden/clip_vision_tiny as image_encoder (image_size 28), an
image_processor (CLIPImageProcessor: shortest edge 28, center crop 28, bicubic, CLIP mean / std;
transformers' PIL backend, CLIPImageProcessorPil) and a new transformer (saved here):
WanTransformer3DModel(patch (1, 2, 2), 2 heads x 8, in_channels 12 = latents 4 + mask 4 +
condition 4, out_channels 4, text_dim 32, freq_dim 16, ffn_dim 24, 2 layers, image_dim 16,
added_kv_proj_dim 16, rope_max_seq_len 16), torch.manual_seed(31), constant parameters
perturbed with Generator(32).

Run: image.png (32 x 28, random RGB of numpy seed 7: the VAE's copy is resized to 32 x 32 by the
pipeline's Lanczos, the CLIP copy only cropped), two prompts with negative prompts, height 32,
width 32, 5 frames, 3 steps, guidance 4.0, max_sequence_length 512 (the transformer splits image
and text tokens at len - 512), latents = randn (2, 4, 2, 4, 4) of Generator(33), output_type
"latent"; the decoded video is the pipeline's own decode of those latents. Also PIL's bicubic
resizes of image.png (what CLIP's processor uses for other sizes): bicubic_<w>x<h>.raw.

FLF2V: a second transformer (transformer_flf2v/: the same config with pos_embed_seq_len 10, seeds
34 / 35) run with last_image = last_image.png (numpy seed 7's second draw): latents_final_flf2v.

Files: transformer/, transformer_flf2v/, image_processor/preprocessor_config.json, image.png,
last_image.png, case.safetensors (latents_init, latents_final, video, image_embeds, pixel_values,
latents_final_flf2v), bicubic_*.raw, case.json.
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json, shutil, sys
import numpy as np
import torch, transformers, diffusers
from PIL import Image
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.pipelines.wan import pipeline_wan_i2v
from transformers import CLIPImageProcessor, CLIPVisionModel, T5TokenizerFast, UMT5EncoderModel
from safetensors.torch import save_file

# pipeline_wan_i2v calls ftfy.fix_text unguarded; without ftfy the text is used as is (as nemo-lua)
if not hasattr(pipeline_wan_i2v, "ftfy"):
    pipeline_wan_i2v.ftfy = type("NoFtfy", (), {"fix_text": staticmethod(lambda text: text)})

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.dirname(HERE)
SRC = os.path.join(GOLD, "wan_prompt")
PROMPTS = ["a cat walking on grass", "a red ball"]
NEGATIVE = ["blurry", "static"]
H, W, FRAMES, STEPS, MAXLEN, G = 32, 32, 5, 3, 512, 4.0
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = [(28, 20), (50, 40), (20, 28)]


def main():
    torch.set_num_threads(1)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(SRC, "vae")).eval()
    te = UMT5EncoderModel.from_pretrained(os.path.join(SRC, "text_encoder")).eval()
    sched = UniPCMultistepScheduler.from_pretrained(os.path.join(SRC, "scheduler"))
    tok = T5TokenizerFast.from_pretrained(os.path.join(GOLD, "tokenizers", "t5"))
    ie = CLIPVisionModel.from_pretrained(os.path.join(GOLD, "clip_vision_tiny")).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_resize=True,
                            do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                            image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True)
    torch.manual_seed(31)
    tr = WanTransformer3DModel(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=12,
                               out_channels=4, text_dim=32, freq_dim=16, ffn_dim=24, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=16,
                               added_kv_proj_dim=16, rope_max_seq_len=16).eval()
    g = torch.Generator().manual_seed(32)
    with torch.no_grad():
        for _, p in tr.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    # FLF2V: the same with pos_embed_seq_len 10 (two images' 5 tokens), seeds 34 / 35
    torch.manual_seed(34)
    tr_flf = WanTransformer3DModel(**dict(tr.config, pos_embed_seq_len=10)).eval()
    g2 = torch.Generator().manual_seed(35)
    with torch.no_grad():
        for _, p in tr_flf.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g2))
    for sub in ("transformer", "transformer_flf2v", "image_processor"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    tr.save_pretrained(os.path.join(HERE, "transformer"))
    tr_flf.save_pretrained(os.path.join(HERE, "transformer_flf2v"))
    tr_flf = WanTransformer3DModel.from_pretrained(os.path.join(HERE, "transformer_flf2v")).eval()
    ip.save_pretrained(os.path.join(HERE, "image_processor"))
    tr = WanTransformer3DModel.from_pretrained(os.path.join(HERE, "transformer")).eval()

    rng = np.random.RandomState(7)
    Image.fromarray(rng.randint(0, 256, (28, 32, 3)).astype(np.uint8)).save(os.path.join(HERE, "image.png"))
    Image.fromarray(rng.randint(0, 256, (28, 32, 3)).astype(np.uint8)).save(os.path.join(HERE, "last_image.png"))
    last_image = Image.open(os.path.join(HERE, "last_image.png")).convert("RGB")
    image = Image.open(os.path.join(HERE, "image.png")).convert("RGB")
    for (w, h) in BICUBIC:
        open(os.path.join(HERE, "bicubic_%dx%d.raw" % (w, h)), "wb").write(
            np.asarray(image.resize((w, h), Image.BICUBIC)).tobytes())

    pipe = WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, image_processor=ip,
                                   image_encoder=ie, transformer=tr)
    lat = torch.randn(len(PROMPTS), 4, (FRAMES - 1) // 4 + 1, H // 8, W // 8, generator=torch.Generator().manual_seed(33))
    with torch.no_grad():
        px = ip(images=image, return_tensors="pt").pixel_values
        emb = pipe.encode_image(image, torch.device("cpu"))
        out = pipe(image=image, prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=G, max_sequence_length=MAXLEN, latents=lat.clone(),
                   output_type="latent").frames
        mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
        video = vae.decode(out / inv_std + mean, return_dict=False)[0]
        flf = WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, image_processor=ip,
                                      image_encoder=ie, transformer=tr_flf)
        out_flf = flf(image=image, last_image=last_image, prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W,
                      num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=G, max_sequence_length=MAXLEN,
                      latents=lat.clone(), output_type="latent").frames
    save_file({"latents_init": lat.contiguous(), "latents_final": out.contiguous(), "video": video.contiguous(),
               "image_embeds": emb.contiguous(), "pixel_values": px.contiguous(),
               "latents_final_flf2v": out_flf.contiguous()},
              os.path.join(HERE, "case.safetensors"))
    for root, _, files in os.walk(HERE):
        for n in files:
            os.chmod(os.path.join(root, n), 0o644)
    json.dump({"name": "wan_i2v", "prompts": PROMPTS, "negative_prompts": NEGATIVE, "height": H, "width": W,
               "num_frames": FRAMES, "num_inference_steps": STEPS, "max_sequence_length": MAXLEN,
               "guidance_scale": G, "bicubic": BICUBIC, "image_processor_class": type(ip).__name__,
               "timesteps": [float(t) for t in sched.timesteps],
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]}},
              open(os.path.join(HERE, "case.json"), "w"), indent=1)
    print("ok", out.shape, video.shape, emb.shape, px.shape, type(ip).__name__)


main()
