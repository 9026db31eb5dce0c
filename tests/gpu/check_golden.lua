-- tests/gpu/check_golden.lua: diffusers' / PyTorch's golden FLUX and Wan numbers reproduced with the model
-- and every input on a CUDA device (run by tests/gpu/run.sh; TAP).
--
--   1. flux_tiny and flux_tiny_guidance: FluxTransformer2DModel.from_pretrained on the device,
--      forward + mse loss + backward; output, loss, every parameter gradient and the three input
--      gradients against case.safetensors (float32) and case_f64exact.safetensors (float64). Also:
--      every result lies on the device, and the step allocated next to nothing on the host (an
--      op that silently computes on the CPU needs activation-sized host buffers).
--   2. flux_tiny/adamw.safetensors: two torch.optim.AdamW steps (from the stored gradients) on the
--      device, bit for bit; then the forward / backward at the step-1 parameters (grad2, loss2).
--   3. flow_flux_tiny/step.safetensors: Automodel's whole FLUX training step on the device,
--      replayed from its stored draws: flow matching, loss, model_pred, gradients, the gradient
--      norm, clipping and one AdamW step (optim.param.*).
--   4. flux_prompt: diffusers' FluxPipeline from prompts (tiny CLIP and T5, tokenizers on the
--      host) with true CFG off and on: the embeddings, final latents and image with the text
--      encoders, transformer and VAE on the device (float32, rtol 1e-4: cuBLAS sums in another
--      order over 4 denoising steps).
--   5. wan_prompt: diffusers' WanPipeline from prompts (tiny UMT5, transformer, UniPC and
--      AutoencoderKLWan on the device, the T5 tokenizer on the host) with classifier-free
--      guidance: the embeddings, final latents and video (float32, rtol 1e-4, as 4.).
--
-- Tolerances, normwise: max|got - ref| <= rtol * max|ref| (per tensor; NaN fails).
--   float32: output 5e-5, loss 2e-5 (relative), input gradients 5e-5, parameter gradients 1e-4,
--   the time / guidance embedders' linear_1.weight gradients 5e-3. These are 2-2.5x the CPU
--   test's (tests/lua/test_flux.lua: 2e-5, 5e-6, 2e-5, 5e-5, 2e-3). Why looser: the CPU engine
--   adds in much the same order as PyTorch's CPU kernels, so its error against the exact result
--   is correlated with diffusers'; on the GPU every product (cuBLAS tiles, split-K), reduction
--   (fixed trees in double) and the blocked attention sum in another order, so the two float32
--   errors are independent and the difference can reach their sum. The golden README measures
--   diffusers' own float32 error against float64 at <= 2.7e-6 (gradients) and 1.2e-4 (embedder
--   linear_1, a sum of nearly cancelling sinusoid products), so these bounds keep a >= 20x margin,
--   and stay 5-10x below what TF32 products (10-bit mantissa, ~5e-4) or a bf16 leak (~4e-3)
--   would give: both fail here.
--   float64: 1e-9 everywhere (embedder linear_1 1e-8), as on the CPU: reordering float64 sums
--   moves results by ~1e-15 relative, far inside.
--   AdamW from the stored gradients: bitwise (the CUDA kernel rounds operation by operation like
--   torch's single-tensor AdamW, fma where torch's vectorised code has one).
--   optim.param.* of the flow step: absolute lr (2e-5), as the README advises: AdamW's first
--   step is lr * g / (|g| + eps), so a float32-sized change of a gradient near eps moves it by
--   up to lr.
--
-- Where the golden cases are: tests/lua/golden.lua decides, as for the CPU tests: $NEMO_GOLDEN
-- (run.sh --staged points it at the unpacked golden.tar.gz), else tests/golden in the checkout,
-- else ../shared/golden beside it. Without them every case FAILS (a check that did not run must
-- not pass). Without a usable CUDA device: a SKIP plan and exit 0 (a
-- "Bail out!" and exit 1 when NEMO_EXPECT_CUDA=1, as run.sh sets). NEMO_GPU_DEVICE=cpu runs the
-- same script on the CPU (a dry run of the script itself; the host-memory check is skipped).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/?.lua;" .. here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local nemo = require "nemo"
local F = nemo.F
local C = require("nemo.ffi").C

local DEV, ON_CUDA = require("gpu_device")(nemo)

-- ==== where the golden cases are ====

local golden = require "golden"
local GOLDEN, GOLDEN_WHY = golden.dir()
T.diag(string.format("device %s; golden cases %s", DEV, GOLDEN and (GOLDEN .. " (" .. GOLDEN_WHY .. ")") or
    "NOT FOUND (every case fails)"))

-- ==== comparisons ====

local function host(t) return t:detach():to{device = "cpu"} end

-- max|a - ref| / max|ref| over the whole tensor (float64 on the CPU); math.huge on NaN or a size mismatch
local function rel(a, ref)
    if a == nil then return math.huge end
    local x, r = host(a):double(), host(ref):double()
    if x:numel() ~= r:numel() then return math.huge end
    x, r = x:reshape{-1}, r:reshape{-1}
    local d = (x - r):abs():max():item()
    local m = r:abs():max():item()
    if d ~= d then return math.huge end
    return m > 0 and d / m or d
end

local function maxabs(a, ref)
    local d = (host(a):double():reshape{-1} - host(ref):double():reshape{-1}):abs():max():item()
    return d == d and d or math.huge
end

-- the same bytes (dtype, shape and every bit)
local function bitwise(a, b)
    local x, y = host(a):contiguous(), host(b):contiguous()
    if x.dtype ~= y.dtype or x:numel() ~= y:numel() then return false end
    local n = x:numel() * x:element_size()
    return ffi.string(C.nemo_tensor_data(x._c), n) == ffi.string(C.nemo_tensor_data(y._c), n)
end

local function scalar(t) return host(t):double():reshape{-1}:tolist()[1] end

local function is_embedder_w1(name)
    return name:match("^time_text_embed%.%a+_embedder%.linear_1%.weight$") ~= nil and not name:match("text_embedder")
end

local TOL = {
    float32 = {output = 5e-5, loss = 2e-5, input = 5e-5, grad = 1e-4, embedder = 5e-3},
    float64 = {output = 1e-9, loss = 1e-9, input = 1e-9, grad = 1e-9, embedder = 1e-8},
}

-- every parameter gradient of model against ref["<prefix><name>"]: one test naming the worst
local function check_grads(label, model, ref, prefix, tol)
    local worst, wname, bad, n, misplaced = 0, "-", {}, 0, 0
    for name, p in model:named_parameters() do
        n = n + 1
        local g = p.grad
        if g ~= nil and g.device ~= DEV then misplaced = misplaced + 1 end
        local r = rel(g, ref[prefix .. name])
        local lim = is_embedder_w1(name) and tol.embedder or tol.grad
        if not (r <= lim) then bad[#bad + 1] = string.format("%s: rel %.3g > %g", name, r, lim) end
        if r / lim > worst then worst, wname = r / lim, string.format("%s rel %.2e", name, r) end
    end
    T.ok(#bad == 0 and misplaced == 0 and n > 0, string.format("%s: all %d parameter gradients on %s within %g " ..
        "(embedder linear_1.weight %g); worst relative to its bound: %s", label, n, DEV, tol.grad, tol.embedder, wname),
        table.concat(bad, "\n") .. (misplaced > 0 and string.format("\n%d gradients are not on %s", misplaced, DEV) or ""))
end

-- host bytes allocated while fn runs (peak above the start), and the device's
local function memory_during(fn)
    collectgarbage(); collectgarbage()
    nemo.reset_peak_memory_stats("cpu")
    local h0 = nemo.memory_stats("cpu").current
    local d0 = 0
    if ON_CUDA then nemo.cuda.reset_peak_memory_stats(DEV); d0 = nemo.cuda.memory_stats(DEV).current end
    local r = {fn()}
    local hp = nemo.memory_stats("cpu").peak - h0
    local dp = ON_CUDA and (nemo.cuda.memory_stats(DEV).peak - d0) or 0
    return hp, dp, unpack(r)
end

local DIFF_INPUTS = {"hidden_states", "encoder_hidden_states", "pooled_projections"}

-- ==== 1. forward / loss / backward against diffusers ====

local Flux = require("nemo.models.flux").FluxTransformer2DModel

local function golden_case(name, dtype, file)
    local label = string.format("%s %s on %s", name, dtype, DEV)
    local dir = GOLDEN .. "/" .. name
    local tol = TOL[dtype]
    local model = Flux.from_pretrained(dir, {torch_dtype = dtype, device = DEV})
    local case = nemo.load_file(dir .. "/" .. file)
    local args = {}
    for k, v in pairs(case) do
        local n = k:match("^input%.(.+)$")
        if n then args[n] = v:to{dtype = dtype, device = DEV, copy = true} end
    end
    for _, k in ipairs(DIFF_INPUTS) do args[k]:requires_grad_(true) end
    local target = case.target:to{dtype = dtype, device = DEV}
    local hp, dp, out, loss = memory_during(function()
        local o = model(args)
        local l = F.mse_loss(o, target)
        l:backward()
        if ON_CUDA then nemo.cuda.synchronize(DEV) end
        return o, l
    end)
    T.ok(out.device == DEV and out.dtype == dtype and loss.device == DEV,
        string.format("%s: output and loss are %s tensors on %s (got %s on %s)", label, dtype, DEV, out.dtype, out.device))
    local r = rel(out, case.output)
    T.ok(r <= tol.output, string.format("%s: output within %g (rel %.2e)", label, tol.output, r))
    local lv, lref = loss:item(), scalar(case.loss)
    local lr = math.abs(lv - lref) / math.abs(lref)
    T.ok(lr <= tol.loss, string.format("%s: loss %.9g vs %.9g within %g (rel %.2e)", label, lv, lref, tol.loss, lr))
    for _, k in ipairs(DIFF_INPUTS) do
        r = rel(args[k].grad, case["grad_input." .. k])
        T.ok(r <= tol.input, string.format("%s: grad_input.%s within %g (rel %.2e)", label, k, tol.input, r))
    end
    check_grads(label, model, case, "grad.", tol)
    if ON_CUDA then
        -- the forward and backward of this model allocate ~0.5 MB on the device; the host side
        -- (rope frequency tables, arange, ids) stays a few KiB
        T.ok(hp <= 256 * 1024 and hp <= dp / 4, string.format("%s: the step allocated %d bytes on the host (<= 256 KiB " ..
            "and <= 1/4 of the device's %d): nothing activation-sized ran on the CPU", label, hp, dp))
    end
end

-- ==== 2. AdamW steps against torch ====

local function adamw_case()
    local dir = GOLDEN .. "/flux_tiny"
    local label = "flux_tiny AdamW on " .. DEV
    local start = nemo.load_file(dir .. "/diffusion_pytorch_model.safetensors")
    local case = nemo.load_file(dir .. "/case.safetensors")
    local ref = nemo.load_file(dir .. "/adamw.safetensors")
    local names = {}
    for k in pairs(start) do names[#names + 1] = k end
    table.sort(names)
    local params = {}
    for i, k in ipairs(names) do
        params[i] = start[k]:to{device = DEV, copy = true}:requires_grad_()
        params[i].grad = case["grad." .. k]:to{device = DEV, copy = true}
    end
    local opt = nemo.optim.AdamW(params, {lr = 0.001, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.01})
    opt:step()
    local badp, badm = {}, {}
    for i, k in ipairs(names) do
        local st = opt.state[params[i]]
        if not bitwise(params[i], ref["adamw." .. k]) then badp[#badp + 1] = k end
        if not (bitwise(st.exp_avg, ref["exp_avg." .. k]) and bitwise(st.exp_avg_sq, ref["exp_avg_sq." .. k])) then
            badm[#badm + 1] = k
        end
    end
    T.ok(#badp == 0 and params[1].device == DEV, string.format("%s: step 1 parameters equal torch's bit for bit " ..
        "(%d tensors, %d differ)", label, #names, #badp), table.concat(badp, "\n"))
    T.ok(#badm == 0 and opt.state[params[1]].exp_avg.device == DEV, string.format("%s: step 1 exp_avg / exp_avg_sq " ..
        "equal torch's bit for bit, on the device (%d differ)", label, #badm), table.concat(badm, "\n"))
    for i, k in ipairs(names) do params[i].grad = ref["grad2." .. k]:to{device = DEV, copy = true} end
    opt:step()
    local bad2 = {}
    for i, k in ipairs(names) do if not bitwise(params[i], ref["adamw2." .. k]) then bad2[#bad2 + 1] = k end end
    T.ok(#bad2 == 0, string.format("%s: step 2 equals torch's bit for bit (%d differ)", label, #bad2),
        table.concat(bad2, "\n"))

    -- the model at the step-1 parameters: forward / backward gives torch's grad2 and loss2
    local model = Flux.from_pretrained(dir, {torch_dtype = "float32", device = DEV})
    nemo.no_grad(function()
        for _, k in ipairs(names) do model:get_parameter(k):copy_(ref["adamw." .. k]:to{device = DEV}) end
    end)
    local args = {}
    for k, v in pairs(case) do
        local n = k:match("^input%.(.+)$")
        if n then args[n] = v:to{device = DEV, copy = true} end
    end
    local loss = F.mse_loss(model(args), case.target:to{device = DEV})
    loss:backward()
    local lv, lref = loss:item(), scalar(ref.loss2)
    local lr = math.abs(lv - lref) / math.abs(lref)
    T.ok(lr <= TOL.float32.loss, string.format("%s: loss at the step-1 parameters %.9g vs torch %.9g within %g " ..
        "(rel %.2e)", label, lv, lref, TOL.float32.loss, lr))
    check_grads(label .. ", gradients at the step-1 parameters", model, ref, "grad2.", TOL.float32)
end

-- ==== 3. Automodel's training step (flow matching, clipping, AdamW) ====

local FLOW_CFG = {adapter_type = "flux", adapter_kwargs = {guidance_scale = 1.0, use_guidance_embeds = false},
                  timestep_sampling = "logit_normal", logit_mean = 0.0, logit_std = 1.0, flow_shift = 1.0,
                  mix_uniform_ratio = 0.0, sigma_min = 0.0, sigma_max = 1.0, num_train_timesteps = 1000,
                  i2v_prob = 0.0, use_loss_weighting = false, cfg_dropout_prob = 0.0}

local function flow_case()
    local dir = GOLDEN .. "/flow_flux_tiny"
    local label = "flow_flux_tiny training step on " .. DEV
    local FM = require "nemo.flow_matching"
    local st = nemo.load_file(dir .. "/step.safetensors")
    local model = Flux.from_pretrained(dir, {torch_dtype = "float32", device = DEV})
    local fm = FM.FlowMatching(FLOW_CFG)
    local function d(t) return t and t:to{device = DEV} end
    local batch = {data_type = "image", image_latents = d(st["batch.image_latents"]),
                   text_embeddings = d(st["batch.text_embeddings"]), pooled_prompt_embeds = d(st["batch.pooled_prompt_embeds"])}
    local loss, out = fm:step(model, batch, {compute_dtype = "float32",
        draws = {normal = st["rng.normal"], noise = st["rng.noise"]}})
    local tol = TOL.float32
    T.ok(loss.device == DEV and out.pred.device == DEV, label .. ": loss and prediction on the device")
    local r = rel(out.pred, st.model_pred)
    T.ok(r <= tol.output, string.format("%s: model_pred within %g (rel %.2e)", label, tol.output, r))
    local lv, lref = loss:item(), scalar(st.loss)
    local lr = math.abs(lv - lref) / math.abs(lref)
    T.ok(lr <= tol.loss, string.format("%s: loss %.9g vs %.9g within %g (rel %.2e)", label, lv, lref, tol.loss, lr))
    loss:backward()
    check_grads(label, model, st, "grad.", tol)
    local params = model:parameters()
    local norm = nemo.optim.clip_grad_norm_(params, 1.0)
    local nref = scalar(st["optim.grad_norm"])
    local nr = math.abs(norm - nref) / nref
    T.ok(nr <= 1e-5, string.format("%s: gradient norm %.9g vs %.9g within 1e-5 (rel %.2e)", label, norm, nref, nr))
    local opt = nemo.optim.AdamW(params, {lr = 2e-5, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.01})
    opt:step()
    local worst, wname, n = 0, "-", 0
    for name, p in model:named_parameters() do
        n = n + 1
        local e = maxabs(p, st["optim.param." .. name])
        if e > worst then worst, wname = e, name end
    end
    T.ok(worst <= 2e-5, string.format("%s: the %d parameters after clipping and AdamW within 2e-5 absolute (lr) of " ..
        "Automodel's (worst %.2e: %s)", label, n, worst, wname))
end

-- ==== FLUX from prompts ====

local function prompt_case()
    local json = require "nemo.json"
    local dir = golden.case("flux_prompt", "case.safetensors")
    local root = os.tmpname()
    os.remove(root)
    golden.tiny_flux_pipeline(root)
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = DEV})
    local gc = nemo.load_file(dir .. "/case.safetensors")
    local cj = json.read_file(dir .. "/case.json")
    local common = {pipe = pipe, prompt = cj.prompts, max_sequence_length = cj.max_sequence_length, height = cj.height,
        width = cj.width, num_inference_steps = cj.num_inference_steps, guidance_scale = cj.guidance_scale,
        latents = gc.latents_init:to{device = DEV}}
    local out = nemo.sampling.flux(common)
    T.ok(out.image.device == DEV, "flux_prompt: the image is computed on " .. DEV)
    T.close(host(out.latents), gc.latents_final, 1e-4, 0, "flux_prompt on " .. DEV .. ": final latents vs diffusers (rtol 1e-4)")
    T.close(host(out.image), gc.image, 1e-4, 0, "flux_prompt on " .. DEV .. ": decoded image vs diffusers (rtol 1e-4)")
    common.negative_prompt, common.true_cfg_scale, common.output_type = cj.negative_prompts, cj.true_cfg_scale, "latent"
    local cfg_out = nemo.sampling.flux(common)
    T.close(host(cfg_out.latents), gc.latents_final_true_cfg, 1e-4, 0,
        "flux_prompt true CFG on " .. DEV .. ": final latents vs diffusers (rtol 1e-4)")
    require("nemo.fs").remove_tree(root)
end

-- ==== Wan from prompts ====

local function wan_prompt_case()
    local json = require "nemo.json"
    local dir = golden.case("wan_prompt", "case.safetensors")
    local root = os.tmpname()
    os.remove(root)
    golden.tiny_wan_pipeline(root)
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = DEV})
    local gc = nemo.load_file(dir .. "/case.safetensors")
    local cj = json.read_file(dir .. "/case.json")
    local out = nemo.sampling.wan{pipe = pipe, prompt = cj.prompts, negative_prompt = cj.negative_prompts,
        height = cj.height, width = cj.width, num_frames = cj.num_frames, num_inference_steps = cj.num_inference_steps,
        guidance_scale = cj.guidance_scale, max_sequence_length = cj.max_sequence_length,
        latents = gc.latents_init:to{device = DEV}}
    T.ok(out.video.device == DEV, "wan_prompt: the video is computed on " .. DEV)
    T.close(host(out.prompt_embeds), gc.prompt_embeds, 1e-4, 0, "wan_prompt on " .. DEV .. ": UMT5 prompt_embeds vs diffusers (rtol 1e-4)")
    T.close(host(out.latents), gc.latents_final, 1e-4, 0, "wan_prompt on " .. DEV .. ": final latents vs diffusers (rtol 1e-4)")
    T.close(host(out.video), gc.video, 1e-4, 0, "wan_prompt on " .. DEV .. ": decoded video vs diffusers (rtol 1e-4)")
    require("nemo.fs").remove_tree(root)
end

-- ==== run ====

local function guarded(label, fn, ...)
    local ok, err = pcall(fn, ...)
    if not ok then T.ok(false, label .. ": raised an error", tostring(err)) end
end

if not GOLDEN then
    T.ok(false, "golden FLUX cases on " .. DEV .. ": " .. GOLDEN_WHY)
else
    for _, name in ipairs {"flux_tiny", "flux_tiny_guidance"} do
        local dir, why = golden.case(name, "config.json")
        if dir then
            guarded(name .. " float32 on " .. DEV, golden_case, name, "float32", "case.safetensors")
            guarded(name .. " float64 on " .. DEV, golden_case, name, "float64", "case_f64exact.safetensors")
        else
            T.ok(false, name .. " on " .. DEV .. ": " .. why)
        end
    end
    local dir, why = golden.case("flux_tiny", "adamw.safetensors")
    if dir then guarded("flux_tiny AdamW on " .. DEV, adamw_case)
    else T.ok(false, "flux_tiny AdamW on " .. DEV .. ": " .. why) end
    dir, why = golden.case("flow_flux_tiny", "step.safetensors")
    if dir then guarded("flow_flux_tiny on " .. DEV, flow_case)
    else T.ok(false, "flow_flux_tiny training step on " .. DEV .. ": " .. why) end
    dir, why = golden.case("flux_prompt", "case.safetensors")
    if dir then guarded("flux_prompt on " .. DEV, prompt_case)
    else T.ok(false, "flux_prompt on " .. DEV .. ": " .. why) end
    dir, why = golden.case("wan_prompt", "case.safetensors")
    if dir then guarded("wan_prompt on " .. DEV, wan_prompt_case)
    else T.ok(false, "wan_prompt on " .. DEV .. ": " .. why) end
end

T.done()
