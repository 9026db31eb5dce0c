-- tests/fake/device_basics.lua: the engine's device paths on emulated CUDA devices (run by
-- tests/sh/test_fake_cuda.sh with NEMO_FAKE_CUDA=2; TAP). Device memory is host memory there
-- and every kernel is the CPU one, so results must equal the CPU's bit for bit: what is checked
-- is the plumbing (device placement, copies within and between devices, views, dtype
-- conversion, memory accounting, errors), not the CUDA kernels (tests/gpu/run.sh does those).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F

if os.getenv("NEMO_FAKE_CUDA") ~= "2" then
    io.write("1..0 # SKIP run with NEMO_FAKE_CUDA=2 (tests/sh/test_fake_cuda.sh)\n")
    os.exit(0)
end

local bitwise = T.same_bits
local function rnd(shape, seed, dtype)
    return nemo.randn(shape, {dtype = dtype or "float32", generator = nemo.Generator(seed)})
end

T.ok(nemo.cuda.is_available(), "emulated CUDA is available")
T.is(nemo.cuda.device_count(), 2, "NEMO_FAKE_CUDA=2 gives 2 devices")
T.raises(function() return nemo.zeros({2}, {device = "cuda:2"}) end, "device cuda:2 does not exist %(2 CUDA devices%)",
    "cuda:2 is a clear error")

-- placement and copies
local a = rnd({5, 7}, 1)
local a0, a1 = a:to("cuda:0"), a:to("cuda:1")
T.is(a0.device, "cuda:0", "to('cuda:0') places the tensor on cuda:0")
T.is(a1.device, "cuda:1", "to('cuda:1') places the tensor on cuda:1")
T.ok(bitwise(a1, a), "host -> cuda:1 -> host keeps the bits")
local t01 = a0:t():to("cuda:1")
T.is(t01.device, "cuda:1", "a transposed view copied cuda:0 -> cuda:1 lands on cuda:1")
T.ok(t01:is_contiguous() and bitwise(t01, a:t():contiguous()), "and holds the transposed values, contiguous")
local h = a1:to{dtype = "bfloat16"}
T.ok(h.device == "cuda:1" and h.dtype == "bfloat16" and bitwise(h, a:to{dtype = "bfloat16"}),
    "a dtype conversion on the device rounds as on the CPU")
local dst = nemo.zeros({7, 5}, {device = "cuda:1"})
dst:copy_(a0:t())
T.ok(bitwise(dst, a:t()), "copy_ of a cuda:0 view into a cuda:1 tensor")
local strided = nemo.zeros({5, 14}, {device = "cuda:1"})
strided:narrow(1, 0, 7):copy_(a0)
T.ok(bitwise(strided:narrow(1, 0, 7), a) and strided:narrow(1, 7, 7):abs():sum():item() == 0,
    "copy_ across devices into a strided destination writes only the view")
local f = nemo.empty({3, 4}, {device = "cuda:0"}):fill_(2.5)
T.ok(bitwise(f, nemo.full({3, 4}, 2.5)), "fill_ on the device")

-- memory accounting follows device allocations
nemo.reset_peak_memory_stats("cuda:1")
local before = nemo.memory_stats("cuda:1").current
local other = nemo.memory_stats("cuda:0").current
local big = nemo.empty({1024, 1024}, {device = "cuda:1"})
local during = nemo.memory_stats("cuda:1").current
T.ok(during - before >= 4 * 1024 * 1024, string.format("a 4 MiB tensor on cuda:1 counts in its memory stats (+%d bytes)",
    during - before))
T.is(nemo.memory_stats("cuda:0").current, other, "cuda:0 keeps its own count")
big:free()
T.ok(nemo.memory_stats("cuda:1").current <= before, "freeing it gives the bytes back")
T.ok(nemo.memory_stats("cuda:1").peak >= during, "the peak remembers it")

-- mixing devices in one op is an error naming both
T.raises(function() return a0 + a1 end, "cuda:0.*cuda:1", "an op on cuda:0 and cuda:1 tensors is a clear error")
T.raises(function() return a0 + a end, "cuda:0.*cpu", "an op on cuda:0 and cpu tensors is a clear error")

-- a small training step (linear, attention, norms, AdamW, clipping) on cuda:1 equals the CPU's
local function step(dev)
    local q = rnd({2, 3, 9, 8}, 10):to(dev):requires_grad_()
    local w = rnd({8, 8}, 11):to(dev):requires_grad_()
    local x = F.linear(q, w)
    local o = F.scaled_dot_product_attention(x, x, q, {is_causal = true})
    local y = F.layer_norm(o, {8})
    local loss = (y * y):mean()
    loss:backward()
    local opt = nemo.optim.AdamW({q, w}, {lr = 1e-2, weight_decay = 0.01})
    local norm = nemo.optim.clip_grad_norm_({q, w}, 0.5)
    opt:step()
    return loss, norm, q, w, opt
end
local l1, n1, q1, w1, opt1 = step("cuda:1")
local lc, nc, qc, wc = step("cpu")
T.ok(bitwise(l1, lc), "loss on cuda:1 equals the CPU's bit for bit")
T.is(n1, nc, "clip_grad_norm_ on cuda:1 equals the CPU's")
T.ok(bitwise(q1, qc) and bitwise(w1, wc), "AdamW on cuda:1 updates the parameters as on the CPU, bit for bit")
T.ok(q1.device == "cuda:1" and q1.grad.device == "cuda:1", "parameters and gradients stay on cuda:1")
local st = opt1.state[w1]
T.ok(st and st.exp_avg.device == "cuda:1" and st.exp_avg_sq.device == "cuda:1", "AdamW's state lives on cuda:1")

-- pinned (page-locked) host memory: a contiguous copy, counted and cached like other CPU memory
do
    local x = rnd({5, 7}, 20):t()   -- not contiguous
    T.ok(not x:is_pinned(), "an ordinary CPU tensor is not pinned")
    nemo.empty_cache("cpu")
    local before = nemo.memory_stats("cpu").current
    local p = x:pin_memory()
    T.ok(p:is_pinned() and p:is_contiguous() and p.device == "cpu", "pin_memory gives a contiguous pinned CPU tensor")
    T.ok(bitwise(p, x), "with the same values")
    T.ok(p:pin_memory() == p, "pinning a pinned tensor gives it back")
    T.ok(nemo.memory_stats("cpu").current >= before + 5 * 7 * 4, "pinned memory counts in the CPU's memory statistics")
    local d = p:to{device = "cuda:1"}
    T.ok(bitwise(d:cpu(), x), "a pinned tensor copies to a device")
    p = nil
    collectgarbage(); collectgarbage()
    local cached = nemo.memory_stats("cpu").cached
    T.ok(cached >= 5 * 7 * 4, "a freed pinned block is kept for reuse")
    local p2 = rnd({7, 5}, 21):pin_memory()
    T.ok(p2:is_pinned() and nemo.memory_stats("cpu").cached < cached, "a pin of the same size reuses it")
    T.raises(function() return d:pin_memory() end, "only CPU tensors can be pinned", "pinning a device tensor is an error")
    T.ok(not d:is_pinned(), "a device tensor is not pinned")
end

-- FLUX from prompts on a device: tokenizers on the host, text encoders, transformer and VAE on
-- cuda:1, true CFG; the same image as on the CPU
do
    local golden = require "golden"
    local fs = require "nemo.fs"
    local root = os.tmpname()
    os.remove(root)
    local ok, err = pcall(golden.tiny_flux_pipeline, root)
    if not ok then
        T.ok(false, "the tiny FLUX pipeline's golden cases: " .. tostring(err))
    else
        local function run(device)
            local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = device})
            return nemo.sampling.flux{pipe = pipe, prompt = {"a cat", "a dog"}, negative_prompt = {"blurry", "dark"},
                true_cfg_scale = 2, height = 32, width = 32, num_inference_steps = 2, max_sequence_length = 16,
                generator = nemo.Generator(5)}.image
        end
        local on_dev, on_cpu = run("cuda:1"), run("cpu")
        T.ok(on_dev.device == "cuda:1" and bitwise(on_dev:cpu(), on_cpu),
            "FLUX sampling from prompts (text encoders, true CFG) on cuda:1 equals the CPU's image")
        fs.remove_tree(root)
    end
end

-- Wan from prompts on a device: the T5 tokenizer on the host, UMT5, transformer, UniPC and the
-- video VAE on cuda:1 with classifier-free guidance; the same video as on the CPU
do
    local golden = require "golden"
    local fs = require "nemo.fs"
    local root = os.tmpname()
    os.remove(root)
    local ok, err = pcall(golden.tiny_wan_pipeline, root)
    if not ok then
        T.ok(false, "the tiny Wan pipeline's golden cases: " .. tostring(err))
    else
        local function run(device)
            local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = device})
            return nemo.sampling.wan{pipe = pipe, prompt = {"a cat", "a dog"}, negative_prompt = "blurry",
                height = 32, width = 32, num_frames = 5, num_inference_steps = 2, max_sequence_length = 16,
                generator = nemo.Generator(5)}.video
        end
        local on_dev, on_cpu = run("cuda:1"), run("cpu")
        T.ok(on_dev.device == "cuda:1" and bitwise(on_dev:cpu(), on_cpu),
            "Wan sampling from prompts (UMT5, UniPC, CFG, the video VAE) on cuda:1 equals the CPU's video")
        fs.remove_tree(root)
    end
end

T.done()
