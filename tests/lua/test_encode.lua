-- tests/lua/test_encode.lua: nemo.data.encode and tools/encode_images.lua, a FLUX latent cache from
-- PNG / JPEG images and captions: Automodel's buckets (its documented 256p and Wan 512p sets and three
-- more, computed by its MultiTierBucketCalculator), the nearest-ratio choice, the Lanczos resize
-- against PIL's (tests/golden/png resize_*.raw: within one level, nearly all exact), caption
-- sources (.txt, JSONL, file name), and the whole job on a tiny FLUX pipeline (tests/golden
-- flux_sampling's VAE, flux_prompt's text encoders, the tokenizers cases): the cache opens, its
-- latents are the VAE's posterior mean of the resized image scaled as FLUX trains on it, its text
-- embeddings are encode_prompt's, other image files are skipped, bad input is a clear error.
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
            T.ok(#ref == n and worst <= 1 and exact >= 0.98 * n, string.format(
                "Lanczos %s %dx%d -> %dx%d vs PIL: max diff %d level (<= 1), %.2f%% exact (>= 98%%)", c[1], W, H, c[2], c[3],
                worst, 100 * exact / n))
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
T.done()
