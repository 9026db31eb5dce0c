-- tests/lua/test_encode.lua: nemo.data.encode, tools/encode_images.lua and encode_videos.lua: a FLUX latent cache from
-- PNG / JPEG images and captions: Automodel's buckets (its documented 256p and Wan 512p sets and three
-- more, computed by its MultiTierBucketCalculator), the nearest-ratio choice, the Lanczos resize
-- against PIL's (tests/golden/png resize_*.raw: the same bytes), caption
-- sources (.txt, JSONL, file name), and the whole job on a tiny FLUX pipeline (tests/golden
-- flux_sampling's VAE, flux_prompt's text encoders, the tokenizers cases): the cache opens, its
-- latents are the VAE's posterior mean of the resized image scaled as FLUX trains on it, its text
-- embeddings are encode_prompt's, other image files are skipped, bad input is a clear error.
-- Wan: the bilinear resize against cv2's (tests/golden/cv2_resize), frame choice, and a Wan cache
-- from folders of frames on wan_prompt's tiny pipeline (latents and text bit for bit as computed
-- by hand, errors, tools/encode_videos.lua, LoRA steps of the Wan recipe on the cache).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local golden = require "golden"
local enc = require "nemo.data.encode"

local function bucket_str(bs)
    local t = {}
    for i, b in ipairs(bs) do t[i] = b[1] .. "x" .. b[2] end
    return table.concat(t, ",")
end
-- (w, h) lists from Automodel's MultiTierBucketCalculator (run in Python, see the header)
T.is(bucket_str(enc.buckets(65536, 64)), "192x320,192x256,256x256,256x192,320x192", "256p buckets (q 64)")
T.is(bucket_str(enc.buckets(512 * 512, 64)), "384x640,448x576,512x512,576x448,640x384,768x320", "512p buckets (q 64)")
T.is(bucket_str(enc.buckets(1024 * 1024, 64)),
    "768x1344,832x1216,896x1152,1024x1024,1152x896,1216x832,1280x768,1344x768,1408x704,1472x640", "1024p buckets (q 64)")
T.is(bucket_str(enc.buckets(512 * 512, 16)),
    "352x720,384x672,416x624,448x576,464x560,512x512,560x464,576x448,624x416,640x400,672x384,704x368,768x336",
    "Wan's 512p set (q 16): 13 buckets from 352x720 to 768x336")
local b256 = enc.buckets(65536, 64)
T.is(bucket_str{enc.bucket_for(b256, 1920, 1080)}, "320x192", "a 16:9 photo goes to 320x192 (nearest ratio)")
T.is(bucket_str{enc.bucket_for(b256, 500, 500)}, "256x256", "a square goes to 256x256")
T.is(bucket_str{enc.bucket_for(b256, 600, 1000)}, "192x320", "a tall one to 192x320")

-- ==== Lanczos resize vs PIL ====
local png = golden.case("png", "resize_rgb_64x40.raw")
if not png then
    T.ok(false, "png golden cases with resizes are missing")
else
    for _, c in ipairs{{"rgb", 64, 40}, {"noise", 20, 16}, {"rgb_fast", 100, 130}, {"rgb_fast", 48, 24, true}} do
        local rgb, W, H = enc.read_rgb(png .. "/" .. c[1] .. ".png")
        local out = enc.resize(rgb, W, H, c[2], c[3])
        local ref = fs.read(string.format("%s/resize_%s_%dx%d.raw", png, c[1], c[2], c[3]))
        local worst, exact, sum, n = 0, 0, 0, c[2] * c[3] * 3
        for k = 0, n - 1 do
            local d = math.abs(out[k] - ref:byte(k + 1))
            if d > worst then worst = d end
            if d == 0 then exact = exact + 1 end
            sum = sum + d
        end
        if c[4] then   -- a shape where PIL 13 runs its vertical pass first (see nemo.data.encode)
            T.ok(#ref == n and sum / n <= 2, string.format("Lanczos %s %dx%d -> %dx%d vs PIL (its passes in the other " ..
                "order): mean diff %.2f levels (<= 2), max %d", c[1], W, H, c[2], c[3], sum / n, worst))
        else
            T.ok(#ref == n and worst == 0, string.format(
                "Lanczos %s %dx%d -> %dx%d vs PIL: the same bytes (PIL's 22-bit fixed-point weights): max diff %d",
                c[1], W, H, c[2], c[3], worst))
        end
    end
end

-- ==== captions ====
local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp .. "/imgs")
local function write(p, s) local f = assert(io.open(p, "wb")); f:write(s); f:close() end
write(tmp .. "/imgs/cat_on_mat.txt", "  a cat on a mat\n")
write(tmp .. "/caps.jsonl", '{"file_name": "dog.png", "internvl": "a dog in the park"}\n\n' ..
    '{"file_name": "other/bird.png", "caption": "a bird"}\n')
local caps, how = enc.captions(tmp .. "/imgs", {"cat_on_mat.png", "dog.png", "big_red_ball.png"}, {captions = tmp .. "/caps.jsonl"})
T.ok(caps[1] == "a cat on a mat" and caps[2] == "a dog in the park" and caps[3] == "big red ball" and how.txt == 1 and
    how.jsonl == 1 and how.stem == 1, "captions: a .txt file (trimmed), a JSONL line, else the file name with _ -> space")
write(tmp .. "/bad.jsonl", "{not json\n")
T.raises(function() enc.captions(tmp .. "/imgs", {"a.png"}, {captions = tmp .. "/bad.jsonl"}) end, "line 1 is not a JSON object",
    "a broken captions file names the line")

-- ==== the whole job on a tiny pipeline ====
if not (golden.case("flux_sampling") and golden.case("flux_prompt") and golden.case("tokenizers")) then
    T.ok(false, "the tiny pipeline's golden folders are missing")
else
    local root = golden.tiny_flux_pipeline(tmp .. "/pipe", {scheduler = false})
    -- three images: 40x24 (-> 32x16 with 32 x 32 pixels, q 16), 30x30 (-> 32x32), a gray 20x44 (-> 16x32)
    local function img(name, w, h, c, seed)
        local t = {}
        for k = 1, w * h * c do t[k] = string.char((k * 13 + seed * 7 + math.floor(k / w) * 5) % 256) end
        nemo.image.write_png(tmp .. "/imgs/" .. name, table.concat(t), w, h, c)
    end
    img("cat_on_mat.png", 40, 24, 3, 1)
    img("dog.png", 30, 30, 4, 2)
    img("big_red_ball.png", 20, 44, 1, 3)
    fs.copy_file(golden.case("jpeg") .. "/b420_q85_50x40.jpg", tmp .. "/imgs/photo.jpg")   -- 50x40 (5:4) -> 32x32
    write(tmp .. "/imgs/anim.webp", "not decoded")
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = "cpu",
        components_to_load = {"vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}})
    local logs = {}
    local r = enc.flux_cache{images = tmp .. "/imgs", out = tmp .. "/cache", pipe = pipe, max_pixels = 32 * 32,
        quantization = 16, captions = tmp .. "/caps.jsonl", mean = true, max_sequence_length = 16,
        log = function(m) logs[#logs + 1] = m end}
    T.ok(r.samples == 4 and #r.skipped == 1 and r.buckets["32x16"] == 1 and r.buckets["32x32"] == 2 and
        r.buckets["16x32"] == 1, "3 PNGs and a JPEG encoded into their buckets, the WebP skipped", table.concat(logs, "\n"))
    T.ok(table.concat(logs, "\n"):find("neither PNG nor JPEG are skipped", 1, true) ~= nil, "the skip is said")
    local ds = nemo.data.Dataset(tmp .. "/cache", {model_type = "flux"})
    T.is(#ds.samples, 4, "the cache opens as a FLUX dataset with 4 samples")
    -- sample 0 (big_red_ball.png, sorted first): latents = mean of the resized image, scaled
    local s = ds:get(1)
    local rgb, W, H = enc.read_rgb(tmp .. "/imgs/big_red_ball.png")
    local crop = enc.resize_crop(rgb, W, H, 16, 32)
    local x = enc.to_tensor(crop, 16, 32)
    local vae = pipe.components.vae
    local z = nemo.no_grad(function()
        return ((vae:encode(x).latent_dist:mode() - vae.config.shift_factor) * vae.config.scaling_factor):to{dtype = "float16"}
    end)
    T.ok(s.caption == "big red ball" and T.same_bits(s.latents, z[0]), "latents: (mean - shift) * scale of the resized, " ..
        "cropped image, float16, bit for bit")
    local e = require("nemo.sampling").flux_encode_prompt{prompt = "big red ball", tokenizer = pipe.components.tokenizer,
        text_encoder = pipe.components.text_encoder, tokenizer_2 = pipe.components.tokenizer_2,
        text_encoder_2 = pipe.components.text_encoder_2, max_sequence_length = 16}
    T.ok(T.same_bits(s.text_embeddings, e.prompt_embeds[0]:to{dtype = "bfloat16"}) and
        T.same_bits(s.pooled, e.pooled_prompt_embeds[0]:to{dtype = "bfloat16"}),
        "text embeddings and pooled: encode_prompt's, bfloat16, bit for bit")
    T.is(ds:get(2).caption, "a cat on a mat", "the .txt caption is stored")
    T.raises(function() enc.flux_cache{images = tmp .. "/imgs", out = tmp .. "/cache", pipe = pipe} end,
        "refusing to overwrite", "an existing cache is not overwritten without force")
    T.raises(function() enc.flux_cache{images = tmp .. "/nope", out = tmp .. "/c2", pipe = pipe} end,
        "must be a folder", "a missing images folder")
    fs.mkdirs(tmp .. "/webps")
    write(tmp .. "/webps/a.webp", "x")
    T.raises(function() enc.flux_cache{images = tmp .. "/webps", out = tmp .. "/c3", pipe = pipe} end,
        "reads PNG and JPEG", "a folder of WebP images only: the error says to convert them")
    T.raises(function() enc.flux_cache{images = tmp .. "/imgs", out = tmp .. "/c4", pipe = {components = {}}} end,
        "no loadable vae", "a pipeline without a VAE")
    T.ok(not fs.exists(tmp .. "/c3") and not fs.exists(tmp .. "/c4"), "failed jobs leave no cache behind")
    -- the command line, then a LoRA training run on the cache it wrote
    local out, rc = T.sh("./nemo-lua tools/encode_images.lua --images " .. tmp .. "/imgs --model " .. root .. " --out " ..
        tmp .. "/cache_cli --resolution 32 --quantization 16 --dtype float32 --device cpu --max-sequence-length 16")
    T.ok(rc == 0 and out:find("wrote " .. tmp .. "/cache_cli: 4 samples", 1, true), "tools/encode_images.lua writes the cache", out)
    -- and the cache trains: a LoRA run of the recipe on it (the tiny pipeline as the pretrained model)
    local train = require "nemo.train"
    local sum = train.run({seed = 1, model = {pretrained_model_name_or_path = root, mode = "finetune", model_type = "flux",
            torch_dtype = "float32", compute_dtype = "float32"},
        peft = {dim = 2, alpha = 2, target_modules = {"*.attn.to_q", "*.attn.to_v"}},
        optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3},
        flow_matching = {adapter_type = "flux", adapter_kwargs = {guidance_scale = 1}},
        step_scheduler = {num_epochs = 2, local_batch_size = 1, global_batch_size = 1, max_steps = 3},
        data = {dataloader = {_target_ = "nemo.data.build_dataloader", cache_dir = tmp .. "/cache_cli"}},
        checkpoint = {enabled = false, checkpoint_dir = tmp .. "/ck"}}, {log = function() end, progress = false})
    T.ok(sum.steps == 3 and sum.last_loss == sum.last_loss, "the encoded cache trains: 3 LoRA steps of the recipe run on it")
    local _, brc = T.sh("./nemo-lua tools/encode_images.lua --images " .. tmp .. "/imgs")
    T.ok(brc ~= 0, "tools/encode_images.lua without --model / --out is an error")
end
fs.remove_tree(tmp)
-- ==== Wan: cv2's bilinear resize, frames, a Wan cache from folders of frames ====
do
    local d = golden.case("cv2_resize", "cases.json")
    if not d then
        T.ok(false, "cv2_resize golden case is missing")
    else
        local cj = json.read_file(d .. "/cases.json")
        local src, W, H = enc.read_rgb(d .. "/src.png")
        for _, s in ipairs(cj.sizes) do
            local out = enc.resize_bilinear(src, W, H, s[1], s[2])
            local ref = T.read_bytes(string.format("%s/bilinear_%dx%d.raw", d, s[1], s[2]))
            local maxd, nd = 0, 0
            for i = 0, #ref - 1 do
                local df = math.abs(out[i] - ref:byte(i + 1))
                if df > 0 then nd = nd + 1 end
                if df > maxd then maxd = df end
            end
            local down = s[1] <= W and s[2] <= H
            T.ok(maxd <= 1 and nd <= 0.02 * #ref and (not down or nd == 0), string.format(
                "resize_bilinear %dx%d -> %dx%d vs cv2 INTER_LINEAR: %d of %d values differ, by at most %d " ..
                "(bound: downscales exact, else 1 level on <= 2%%)", W, H, s[1], s[2], nd, #ref, maxd))
        end
    end
    T.is(table.concat(enc.frame_indices(7, 5), ","), "0,2,3,4,6", "frame_indices(7, 5): linspace rounded half to even")
    T.is(table.concat(enc.frame_indices(81, 1), ","), "0", "one frame: the first")

    local tmp = os.tmpname()
    os.remove(tmp)
    local root = golden.tiny_wan_pipeline(tmp .. "/pipe")
    local function frame(path, w, h, seed)
        local t = {}
        for i = 1, w * h * 3 do t[i] = string.char((i * 37 + seed * 11 + math.floor(i / (w * 3)) * 5) % 256) end
        nemo.image.write_png(path, table.concat(t), w, h, 3)
    end
    fs.mkdirs(tmp .. "/vids/cat_walk")
    fs.mkdirs(tmp .. "/vids/ball")
    for k = 0, 6 do frame(string.format("%s/vids/cat_walk/%03d.png", tmp, k), 40, 24, k) end
    for k = 0, 4 do frame(string.format("%s/vids/ball/%03d.png", tmp, k), 20, 36, k + 10) end
    local f = io.open(tmp .. "/vids/ball.txt", "wb"); f:write("a red ball bouncing\n"); f:close()
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = "cpu",
        components_to_load = {"vae", "text_encoder", "tokenizer"}})
    local logs = {}
    local r = enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/cache", pipe = pipe, max_pixels = 32 * 32,
        quantization = 16, max_sequence_length = 16, log = function(m) logs[#logs + 1] = m end}
    T.ok(r.samples == 2 and r.buckets["16x32"] == 1 and r.buckets["32x16"] == 1,
        "2 videos encoded into their buckets (20x36 -> 16x32, 40x24 -> 32x16)", table.concat(logs, "\n"))
    local ds = nemo.data.Dataset(tmp .. "/cache", {model_type = "wan"})
    local s1, s2 = ds:get(1), ds:get(2)
    T.ok(s1.caption == "a red ball bouncing" and s2.caption == "cat walk", "captions: the .txt beside the folder, the folder name")
    -- cat_walk: 7 frames -> the largest 4k + 1 = 5, frames 0, 2, 3, 4, 6; its latents by hand
    local vae = pipe.components.vae
    local per = {}
    for k, i in ipairs{0, 2, 3, 4, 6} do
        local rgb, w, h = enc.read_rgb(string.format("%s/vids/cat_walk/%03d.png", tmp, i))
        per[k] = enc.to_tensor((enc.resize_crop(rgb, w, h, 32, 16, enc.resize_bilinear)), 32, 16)
    end
    local z = nemo.no_grad(function()
        local m = vae:encode(nemo.stack(per, 2)).latent_dist:mode()
        local mean = nemo.tensor(vae.config.latents_mean):view(1, 4, 1, 1, 1)
        local std = nemo.tensor(vae.config.latents_std):view(1, 4, 1, 1, 1)
        return ((m - mean) / std):to{dtype = "float16"}
    end)
    T.ok(T.same_bits(s2.latents, z[0]) and nemo.Tensor.shape_str(s2.latents.shape) == "(4, 2, 2, 4)",
        "latents: (posterior mean - latents_mean) / latents_std of frames 0,2,3,4,6 resized and cropped, float16, bit for bit")
    local pe = require("nemo.sampling").wan_encode_prompt{prompt = "cat walk", tokenizer = pipe.components.tokenizer,
        text_encoder = pipe.components.text_encoder, max_sequence_length = 16}
    T.ok(T.same_bits(s2.text_embeddings, pe[0]:to{dtype = "bfloat16"}), "text embeddings: wan_encode_prompt's (masked UMT5, padding zeroed), bfloat16")
    T.raises(function() enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/c1", pipe = pipe, num_frames = 6} end,
        "num_frames must be 4k + 1", "num_frames not 4k + 1")
    T.raises(function() enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/c2", pipe = pipe, num_frames = 9} end,
        "has 5 frames, fewer than num_frames 9", "more frames asked than a video has")
    frame(tmp .. "/vids/ball/005.png", 22, 36, 1)
    T.raises(function() enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/c3", pipe = pipe, num_frames = 5,
        max_sequence_length = 16} end, "the video's first frame 20 x 36", "frames of different sizes")
    os.remove(tmp .. "/vids/ball/005.png")
    fs.mkdirs(tmp .. "/vids/empty")
    T.raises(function() enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/c4", pipe = pipe} end,
        "has no PNG or JPEG frames", "a video folder without frames")
    fs.remove_tree(tmp .. "/vids/empty")
    T.raises(function() enc.wan_cache{videos = tmp .. "/nope", out = tmp .. "/c5", pipe = pipe} end,
        "folder of frame folders", "a missing videos folder")
    T.ok(not fs.exists(tmp .. "/c1") and not fs.exists(tmp .. "/c3") and not fs.exists(tmp .. "/c4"),
        "failed jobs leave no cache behind")
    -- the command line, then LoRA steps of the Wan recipe on the cache it wrote
    local out, rc = T.sh("./nemo-lua tools/encode_videos.lua --videos " .. tmp .. "/vids --model " .. root .. " --out " ..
        tmp .. "/cache_cli --resolution 32 --dtype float32 --device cpu --max-sequence-length 16 2>&1")
    T.ok(rc == 0 and out:find("wrote " .. tmp .. "/cache_cli: 2 videos", 1, true), "tools/encode_videos.lua writes the cache", out)
    local sum = require("nemo.train").run({seed = 1, model = {pretrained_model_name_or_path = root, mode = "finetune",
            model_type = "wan", torch_dtype = "float32", compute_dtype = "float32"},
        peft = {dim = 2, alpha = 2, target_modules = {"*.to_q", "*.to_v"}},
        optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3},
        flow_matching = {adapter_type = "simple"},
        step_scheduler = {num_epochs = 2, local_batch_size = 1, global_batch_size = 1, max_steps = 3},
        data = {dataloader = {_target_ = "nemo.data.build_dataloader", cache_dir = tmp .. "/cache_cli"}},
        checkpoint = {enabled = false, checkpoint_dir = tmp .. "/ck"}}, {log = function() end, progress = false})
    T.ok(sum.steps == 3 and sum.last_loss == sum.last_loss, "the encoded Wan cache trains: 3 LoRA steps of the recipe run on it")
    fs.remove_tree(tmp)
end
-- ==== the tools' option parser (nemo.cliargs) ====
do
    local cli = require "nemo.cliargs"
    local spec = {name = "t", usage = {"usage"}, defaults = {prompts = {}, steps = 4, out = "a.png"},
        strings = {["--out"] = "out"}, lists = {["--prompt"] = "prompts"}, numbers = {["--seed"] = "seed"},
        counts = {["--steps"] = "steps"}, flags = {["--force"] = "force"}}
    local o = cli.parse({"--prompt", "a cat", "--seed", "-3", "--force", "--prompt", "b", "--steps", "7"}, spec)
    T.ok(o.prompts[1] == "a cat" and o.prompts[2] == "b" and o.seed == -3 and o.force == true and o.steps == 7 and
        o.out == "a.png" and #spec.defaults.prompts == 0, "cliargs.parse: lists, numbers, counts, flags, defaults (not modified)")
    local _, rc = T.sh("./nemo-lua tools/encode_videos.lua --videos x --model y --out z --num-frames 2.5 2>&1")
    local out2, rc2 = T.sh("./nemo-lua tools/encode_videos.lua --videos 2>&1")
    T.ok(rc == 2 and rc2 == 2 and out2:find("option --videos needs a value", 1, true),
        "a bad count or a missing value exits 2 with the reason and the usage", out2)
end
T.done()
