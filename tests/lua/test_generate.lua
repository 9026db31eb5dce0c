-- tests/lua/test_generate.lua: nemo.generate and recipes/generate.lua (Automodel's generate configs):
-- FLUX images equal to nemo.sampling.flux with Generator(seed + i) and Automodel's file names;
-- a training checkpoint's weights loaded into the transformer (model.checkpoint, a
-- checkpoint_dir), Wan 2.2's checkpoint_low_noise into transformer_2, a LoRA run's adapter
-- (model.lora_weights); animated PNGs for Wan; the config errors; the command line with
-- overrides (Python's None included). Tiny pipelines from tests/golden (flux_prompt, wan_prompt,
-- wan22_prompt).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local golden = require "golden"
local gen = require "nemo.generate"
local sampling = require "nemo.sampling"

local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp)
local quiet = {log = function() end}

-- ==== FLUX: the images are sampling.flux's, named as Automodel names them ====
local flux = golden.tiny_flux_pipeline(tmp .. "/flux")
local fcfg = {seed = 7, device = "cpu", model = {pretrained_model_name_or_path = flux},
    inference = {dtype = "float32", num_inference_steps = 2, guidance_scale = 3.5, height = 32, width = 32,
        prompts = {"A red fox, in snow!", "a lighthouse"}, pipeline_kwargs = {max_sequence_length = 16}},
    output = {output_dir = tmp .. "/out_flux"}}
local r = gen.run(fcfg, quiet)
T.ok(#r.files == 2 and r.files[1] == tmp .. "/out_flux/sample_000_A_red_fox_in_snow.png" and
    fs.isfile(r.files[2]), "one PNG per prompt, named sample_<iii>_<prompt> as Automodel", table.concat(r.files, " "))
local ref = sampling.flux{pipe = r.pipe, prompt = "a lighthouse", generator = nemo.Generator(7 + 1), num_inference_steps = 2,
    guidance_scale = 3.5, height = 32, width = 32, max_sequence_length = 16}
local im = nemo.image.read_png(r.files[2])
local u8 = sampling.to_uint8(ref.image):reshape{-1}:tolist()
local same = #im.pixels == #u8
for i = 1, #u8 do if im.pixels:byte(i) ~= u8[i] then same = false; break end end
T.ok(same, "sample 1 is sampling.flux with nemo.Generator(seed + 1), pixel for pixel")
fcfg.inference.max_samples = 1
fcfg.output.output_dir = tmp .. "/out_flux1"
T.is(#gen.run(fcfg, quiet).files, 1, "inference.max_samples caps the prompts")
fcfg.inference.max_samples = nil

local function raises(cfg, pat, name)
    local ok, e = pcall(gen.run, cfg, quiet)
    T.ok(not ok and tostring(e):find(pat, 1, true) ~= nil, name, tostring(e))
end
local function with(base, path, value)
    local c = json.decode(json.encode(base))
    local node = c
    for i = 1, #path - 1 do node[path[i]] = node[path[i]] or {}; node = node[path[i]] end
    node[path[#path]] = value
    return c
end
local both = with(fcfg, {"model", "checkpoint"}, "a")
both.model.checkpoint_high_noise = "b"
raises(both, "mutually exclusive", "model.checkpoint with checkpoint_high_noise is an error")
raises(with(fcfg, {"model", "checkpoint_dir"}, "a"), "unknown key 'model.checkpoint_dir'", "an unknown key names itself")
raises(with(fcfg, {"inference", "input_images"}, {"a.png", "b.png"}), "needs an image-to-video pipeline",
    "inference.input_images on a FLUX pipeline (image-to-video is Wan 2.2 TI2V's; tests/lua/test_wan22_vae.lua)")
raises(with(fcfg, {"inference", "input_images"}, {"a.png", "b.png", "c.png"}), "3 images for 2 prompts",
    "inference.input_images: one image or one per prompt")
raises(with(fcfg, {"distributed", "parallel_scheme"}, {transformer = {pp_size = 2}}), "pp_size = 2: pipeline " ..
    "parallelism is not supported", "distributed.parallel_scheme: pp_size > 1 is an error naming it")
raises(with(fcfg, {"distributed", "parallel_scheme"}, {transformer = {cp_degree = 2}}),
    "unknown key 'distributed.parallel_scheme.transformer.cp_degree'", "distributed.parallel_scheme: an unknown key")
raises(with(fcfg, {"distributed", "parallel_scheme"}, {transformer = {cp_size = 2}}),
    "cp_size 2 does not divide the 1 processes", "distributed: a cp_size above the number of processes is an error")
raises(with(with(fcfg, {"distributed", "parallel_scheme"}, {vae = {cp_size = 1}, text_encoder = {cp_size = 1}}),
    {"distributed", "backend"}, "ucx"), "distributed.backend must be nccl, mpi or gloo", "distributed.backend is checked")
do   -- one process with Automodel's distributed block (its generate.py adds backend / world_size): as without it
    local d = with(fcfg, {"distributed", "parallel_scheme"}, {transformer = {cp_size = 1, backend = "nccl", world_size = 1}})
    d.inference.prompts = {"A red fox, in snow!"}
    d.output.output_dir = tmp .. "/out_flux_dist1"
    local rd = gen.run(d, quiet)
    T.ok(#rd.files == 1 and T.read_bytes(rd.files[1]) == T.read_bytes(tmp .. "/out_flux/sample_000_A_red_fox_in_snow.png"),
        "a distributed block on one process samples as without it (the same PNG bytes)")
end
do  -- vae.enable_tiling reaches the VAE (its numbers: tests/lua/test_vae_tiling.lua)
    local c = with(fcfg, {"vae", "enable_tiling"}, true)
    c.inference.max_samples = 1
    c.output.output_dir = tmp .. "/out_tiled"
    local rt = gen.run(c, quiet)
    T.ok(rt.pipe.components.vae.use_tiling == true and #rt.files == 1, "vae.enable_tiling turns the VAE's tiling on")
end
raises(with(fcfg, {"inference", "prompts"}, {}), "inference.prompts must be a non-empty list", "no prompts")
raises(with(fcfg, {"model", "checkpoint"}, tmp .. "/nope"), "no checkpoint at", "a checkpoint that does not exist")
raises(with(fcfg, {"inference", "pipeline_kwargs", "num_frames"}, 5), "unknown option 'num_frames'",
    "a pipeline_kwargs key FluxPipeline does not take")

-- ==== Wan: training checkpoints into transformer / transformer_2, a LoRA adapter, APNGs ====
local wan = golden.tiny_wan_pipeline(tmp .. "/wan22")
local g22 = golden.case("wan22_prompt", "case.json")
fs.copy_tree(g22 .. "/transformer_2", wan .. "/transformer_2")
fs.copy_file(g22 .. "/model_index_two_stage.json", wan .. "/model_index.json")
local train = require "nemo.train"
local function train_run(extra, dir)
    local cfg = {seed = 3, model = {pretrained_model_name_or_path = wan, mode = "finetune", torch_dtype = "float32"},
        optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-2},
        flow_matching = {adapter_type = "simple"},
        step_scheduler = {num_epochs = 1, local_batch_size = 2, global_batch_size = 2, max_steps = 2},
        data = {dataloader = {_target_ = "nemo.data.MockDataLoader", latent_shape = {4, 2, 4, 4}, text_len = 8,
            text_dim = 32, length = 4}},
        checkpoint = {enabled = true, checkpoint_dir = dir, save_consolidated = false}}
    for k, v in pairs(extra) do
        if type(v) == "table" and cfg[k] then for kk, vv in pairs(v) do cfg[k][kk] = vv end else cfg[k] = v end
    end
    return train.run(cfg, {log = function() end, progress = false})
end
local low = train_run({model = {stage = "low_noise"}}, tmp .. "/ck_low")
local wcfg = {seed = 1, device = "cpu", model = {pretrained_model_name_or_path = wan, checkpoint_low_noise = tmp .. "/ck_low"},
    inference = {dtype = "float32", num_inference_steps = 2, guidance_scale = 4, height = 32, width = 32,
        prompts = {"a cat walking"}, pipeline_kwargs = {num_frames = 5, max_sequence_length = 16, guidance_scale_2 = 3}},
    output = {output_dir = tmp .. "/out_wan", fps = 8}}
local wr = gen.run(wcfg, quiet)
local saved = nemo.load_file(low.checkpoint .. "/model/model.safetensors")
local base1 = nemo.load_file(wan .. "/transformer/diffusion_pytorch_model.safetensors")
local ok2, ok1 = true, true
for name, p in wr.pipe.components.transformer_2:named_parameters() do
    if not T.same_bits(p, saved[name]) then ok2 = false end
end
for name, p in wr.pipe.components.transformer:named_parameters() do
    if not T.same_bits(p, base1[name]) then ok1 = false end
end
T.ok(ok2 and ok1, "checkpoint_low_noise (a checkpoint_dir: its newest) loads into transformer_2; transformer keeps its weights")
local wb = T.read_bytes(wr.files[1])
T.ok(wr.files[1]:match("sample_000_a_cat_walking%.mp4$") and wb:sub(5, 12) == "ftypisom" and
    wb:find("avc1", 1, true) and wb:find("mdat", 1, true), "a WanPipeline sample is an MP4 (H.264), named as Automodel")
raises(with(wcfg, {"output", "video_format"}, "gif"), "output.video_format must be mp4", "output.video_format is checked")
raises(with(wcfg, {"output", "video_qp"}, 52), "output.video_qp must be an integer in 0..51", "output.video_qp is checked")
do   -- output.video_qp reaches the encoder: a lower quantizer writes more bytes
    local q = with(wcfg, {"output", "video_qp"}, 4)
    q.output.output_dir = tmp .. "/out_wan_qp4"
    local rq = gen.run(q, quiet)
    T.ok(#T.read_bytes(rq.files[1]) > #wb, string.format("output.video_qp 4 writes a larger MP4 than the default 20 " ..
        "(%d > %d bytes)", #T.read_bytes(rq.files[1]), #wb))
end
raises(with(wcfg, {"output", "video_keyint"}, 0), "output.video_keyint must be an integer >= 1",
    "output.video_keyint is checked")
do   -- output.video_keyint reaches the encoder: 1 makes every frame an IDR picture (no stss box)
    local k = with(wcfg, {"output", "video_keyint"}, 1)
    k.output.output_dir = tmp .. "/out_wan_k1"
    local kb = T.read_bytes(gen.run(k, quiet).files[1])
    T.ok(wb:find("stss", 1, true) and not kb:find("stss", 1, true) and kb ~= wb, "output.video_keyint 1: every frame " ..
        "an IDR picture (no sync sample table), where the default writes one IDR and P pictures (an stss box)")
end
local one = golden.tiny_wan_pipeline(tmp .. "/wan21")
local c21 = with(wcfg, {"model", "pretrained_model_name_or_path"}, one)
c21.inference.pipeline_kwargs.guidance_scale_2 = nil
raises(c21, "pipeline has no transformer_2", "checkpoint_low_noise on a one-transformer pipeline")
-- model.checkpoint on Wan 2.1 from a full finetune, through LATEST
local full = train_run({model = {pretrained_model_name_or_path = one}}, tmp .. "/ck_full")
local c1 = with(wcfg, {"model"}, {pretrained_model_name_or_path = one, checkpoint = tmp .. "/ck_full/LATEST"})
c1.inference.pipeline_kwargs.guidance_scale_2 = nil
c1.output.output_dir = tmp .. "/out_full"
c1.output.video_format = "apng"
local fr = gen.run(c1, quiet)
local v = nemo.image.read_png(fr.files[1])
T.ok(fr.files[1]:match("sample_000_a_cat_walking%.png$") and v.width == 32 and
    T.read_bytes(fr.files[1]):find("acTL", 1, true), "output.video_format apng: the sample is an animated PNG")
c1.output.video_format = nil
local fsaved = nemo.load_file(full.checkpoint .. "/model/model.safetensors")
local okf = true
for name, p in fr.pipe.transformer:named_parameters() do if not T.same_bits(p, fsaved[name]) then okf = false end end
T.ok(okf, "model.checkpoint (a LATEST file) loads the trained weights into the transformer")
-- LoRA: the adapter of a LoRA run; its checkpoint as model.checkpoint is an error saying so
local lora = train_run({model = {pretrained_model_name_or_path = one, model_type = "wan"},
    peft = {dim = 2, alpha = 2, target_modules = {"*.to_q", "*.to_v"}}}, tmp .. "/ck_lora")
local cl = with(c1, {"model"}, {pretrained_model_name_or_path = one, lora_weights = lora.checkpoint .. "/model", lora_scale = 0.5})
cl.output.output_dir = tmp .. "/out_lora"
local logs = {}
local lr = gen.run(cl, {log = function(m) logs[#logs + 1] = m end})
local nl = 0
for name in lr.pipe.transformer:named_parameters() do if name:find("lora_A", 1, true) then nl = nl + 1 end end
T.ok(nl == 8 and table.concat(logs, "\n"):find("applied the LoRA adapter", 1, true) and fs.isfile(lr.files[1]),
    "model.lora_weights applies the LoRA run's adapter (2 blocks x attn1, attn2 x to_q, to_v) and samples", table.concat(logs, "\n"))
-- the same adapter through tools/wan_sample.lua --lora (nemo.sampling.ready_pipeline, as gen.run)
local tlog, trc = T.sh("./nemo-lua tools/wan_sample.lua --model " .. one .. " --prompt 'a cat' --height 32 --width 32 " ..
    "--frames 5 --steps 2 --dtype float32 --device cpu --seed 1 --max-sequence-length 16 --lora " .. lora.checkpoint ..
    "/model --lora-scale 0.5 --out " .. tmp .. "/tool_lora.png 2>&1")
T.ok(trc == 0 and tlog:find("applied the LoRA adapter " .. lora.checkpoint .. "/model (scale 0.5)", 1, true) and
    fs.isfile(tmp .. "/tool_lora.png"), "tools/wan_sample.lua --lora applies the adapter and samples", tlog)
raises(with(c1, {"model", "checkpoint"}, lora.checkpoint), "holds LoRA adapters, not the model's weights",
    "a LoRA checkpoint given as model.checkpoint points at lora_weights")

-- ==== the command line ====
local yml = tmp .. "/gen.yaml"
T.write_bytes(yml, table.concat({
    "seed: 1", "device: cpu",
    "model:", "  pretrained_model_name_or_path: " .. one, "  checkpoint: null",
    "inference:", "  dtype: float32", "  num_inference_steps: 1", "  guidance_scale: 1.0", "  height: 16", "  width: 16",
    "  prompts: [\"a b\"]", "  pipeline_kwargs:", "    num_frames: 1", "    max_sequence_length: 8",
    "output:", "  output_dir: " .. tmp .. "/out_cli", ""}, "\n"))
local out, rc = T.sh("./nemo-lua recipes/generate.lua -c " .. yml ..
    " --model.checkpoint None --inference.prompts '[\"x y\", \"z\"]' 2>&1")
T.ok(rc == 0 and fs.isfile(tmp .. "/out_cli/sample_000_x_y.mp4") and fs.isfile(tmp .. "/out_cli/sample_001_z.mp4"),
    "recipes/generate.lua -c CONFIG with overrides (prompts, Python's None) writes the samples", out)
local _, brc = T.sh("./nemo-lua recipes/generate.lua -c " .. yml .. " --model.nope 1 2>&1")
T.ok(brc ~= 0, "an unknown key on the command line is an error")
-- the shipped configs are valid
for _, f in ipairs{"recipes/generate_flux.yaml", "recipes/generate_wan.yaml", "recipes/generate_wan22.yaml",
                   "recipes/generate_wan_i2v.yaml"} do
    local okc, e = pcall(gen.load_config, f)
    T.ok(okc, f .. " is a valid generate config", tostring(e))
end
fs.remove_tree(tmp)
T.done()
