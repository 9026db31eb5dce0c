-- tests/lua/test_generate_dist.lua: generating on several processes (nemo.generate with a
-- `distributed:` block; nemo.sampling with a context-parallel transformer). Runs under mpirun
-- with 2 and 4 ranks (tests/sh/test_mpi.sh); on one process it checks nothing but the skip.
-- Every rank computes the one-process reference itself. The tiny pipelines have 2 heads, so
-- cp_size is 2 and the dp groups are world / 2.
--   - generate with parallel_scheme.transformer.cp_size 2: each dp group samples its share of 3
--     prompts (prompt i in group i mod dp), its first cp rank writes them; every file is the
--     one-process file within one level per pixel (float32; the attention's key order differs);
--   - the same with parallel_scheme.transformer.tp_size 2 (the transformer's layers split);
--   - sampling.wan (classifier-free guidance, 2 steps) with enable_context_parallel, and with
--     enable_tensor_parallel, equals the one-process video within 1e-5.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local dist = require "nemo.dist"
local fs = require "nemo.fs"
local golden = require "golden"
local gen = require "nemo.generate"
local sampling = require "nemo.sampling"

dist.init_process_group{timeout = 120}
local rank, world = dist.get_rank(), dist.get_world_size()
local R = require("dist_tap").new(T, dist)
local ok = R.ok

if world == 1 or world % 2 ~= 0 then
    R.skip("generating on several processes", "needs an even number of processes (tests/sh/test_mpi.sh runs 2 and 4)")
    R.done()
end

-- a folder name chosen by rank 0, the same on every rank
local function shared_dir()
    local t = nemo.zeros({256}, {dtype = "int32"})
    if rank == 0 then
        local name = os.tmpname()
        os.remove(name)
        for i = 1, #name do t[i - 1] = name:byte(i) end
    end
    dist.broadcast(t, 0)
    local chars = {}
    for i = 0, 255 do
        local b = t[i]:item()
        if b == 0 then break end
        chars[#chars + 1] = string.char(b)
    end
    return table.concat(chars)
end
local shared = shared_dir()
local mine = os.tmpname()
os.remove(mine)
fs.mkdirs(mine)
local quiet = {log = function() end}

-- ==== generate: prompts split over the dp groups, tokens over the cp ranks ====
do
    local flux = golden.tiny_flux_pipeline(mine .. "/flux")
    local prompts = {"A red fox, in snow!", "a lighthouse", "two cats"}
    local function cfg(dir)
        return {seed = 7, device = "cpu", model = {pretrained_model_name_or_path = flux},
            inference = {dtype = "float32", num_inference_steps = 2, guidance_scale = 3.5, height = 32, width = 32,
                prompts = prompts, pipeline_kwargs = {max_sequence_length = 16}},
            output = {output_dir = dir}}
    end
    local ref = gen.run(cfg(mine .. "/ref"), quiet)
    local c = cfg(shared)
    c.distributed = {backend = "mpi", parallel_scheme = {transformer = {cp_size = 2}}}
    local calls0 = dist.stats().calls
    local r = gen.run(c, quiet)
    local calls = dist.stats().calls - calls0
    local dp, dp_rank, cp_rank = world / 2, math.floor(rank / 2), rank % 2
    local want = {}
    if cp_rank == 0 then
        for i = 0, #prompts - 1 do
            if i % dp == dp_rank then want[#want + 1] = shared .. "/" .. gen.sample_name(i, prompts[i + 1], "png") end
        end
    end
    ok(#r.files == #want and table.concat(r.files, "|") == table.concat(want, "|"), string.format("generate with " ..
        "cp_size 2 on %d processes: each of the %d prompt groups' first rank writes its prompts (i mod %d), the " ..
        "others nothing", world, dp, dp), table.concat(r.files, " "))
    -- at least this group's prompts x 2 steps x 2 attentions (one double, one single block) x 2
    -- all-to-alls (q, k and v together; the output back)
    local mine_n = 0
    for i = 0, #prompts - 1 do if i % dp == dp_rank then mine_n = mine_n + 1 end end
    ok(calls >= mine_n * 2 * 2 * 2, string.format("the samples ran context-parallel (%d collectives on this rank " ..
        "for %d prompts)", calls, mine_n))
    -- the largest per-value difference of the samples in dir from the one-process ones, and how many differ
    local function compare_to_ref(dir)
        local worst, differing = 0, 0
        for i, p in ipairs(ref.files) do
            local a = nemo.image.read_png(p)
            local path = dir .. "/" .. gen.sample_name(i - 1, prompts[i], "png")
            local b = fs.isfile(path) and nemo.image.read_png(path)
            if not b or #b.pixels ~= #a.pixels then return math.huge, 0 end
            for k = 1, #a.pixels do
                local d = math.abs(a.pixels:byte(k) - b.pixels:byte(k))
                if d > 0 then differing = differing + 1 end
                if d > worst then worst = d end
            end
        end
        return worst, differing
    end
    local worst, differing = compare_to_ref(shared)
    ok(worst <= 1, string.format("all 3 samples are on disk when generate returns, each the one-process sample " ..
        "within one level per pixel (largest difference %s, %d values differ)", tostring(worst), differing))
    R.raises(function()
        local b = cfg(shared .. "_bad")
        b.distributed = {parallel_scheme = {transformer = {cp_size = 2, dp_size = world}}}
        gen.run(b, quiet)
    end, "dp_size " .. world .. " x cp_size 2 does not match the " .. world .. " processes",
        "distributed.parallel_scheme: dp_size x cp_size must be the number of processes")
    dist.barrier()
    if rank == 0 then fs.remove_tree(shared) end

    -- tensor parallel: the transformer's layers split over 2 ranks (read on the CPU, split, moved)
    local ct = cfg(shared .. "_tp")
    ct.distributed = {backend = "mpi", parallel_scheme = {transformer = {tp_size = 2}}}
    local rt = gen.run(ct, quiet)
    local tp_rank = rank % 2
    local want_tp = {}
    if tp_rank == 0 then
        for i = 0, #prompts - 1 do
            if i % dp == dp_rank then want_tp[#want_tp + 1] = shared .. "_tp/" .. gen.sample_name(i, prompts[i + 1], "png") end
        end
    end
    local tr = rt.pipe.components.transformer
    local q = tr.transformer_blocks:get(1).attn.to_q.weight
    ok(table.concat(rt.files, "|") == table.concat(want_tp, "|") and
       q.shape[1] * 2 == tr.config.num_attention_heads * tr.config.attention_head_dim, string.format("generate with tp_size 2 on " ..
        "%d processes: each prompt group's first rank writes its prompts; the transformer holds half of to_q (%d rows)",
        world, q.shape[1]), table.concat(rt.files, " "))
    worst, differing = compare_to_ref(shared .. "_tp")
    ok(worst <= 1, string.format("tp_size 2: all 3 samples are the one-process samples within one level per pixel " ..
        "(largest difference %s, %d values differ)", tostring(worst), differing))
    dist.barrier()
    if rank == 0 then fs.remove_tree(shared .. "_tp") end
end

-- ==== sampling.wan with a context-parallel transformer ====
do
    local wan = golden.tiny_wan_pipeline(mine .. "/wan")
    local pipe = sampling.open_pipeline(wan, {dtype = "float32", device = "cpu"})
    local function run()
        return sampling.wan{pipe = pipe, prompt = "a cat", negative_prompt = "blurry", generator = nemo.Generator(3),
            num_inference_steps = 2, guidance_scale = 5, height = 32, width = 32, num_frames = 5,
            max_sequence_length = 16}
    end
    local ref = run().video
    local mesh = require("nemo.parallel.mesh").DeviceMesh{cp_size = 2}
    pipe.components.transformer:enable_context_parallel(mesh:get_group("cp"))
    local calls0 = dist.stats().calls
    local got = run().video
    -- 2 steps x 2 guidance passes x 2 blocks x 2 all-to-alls at least
    ok(dist.stats().calls - calls0 >= 2 * 2 * 2 * 2, string.format("the transformer ran context-parallel (%d " ..
        "collectives)", dist.stats().calls - calls0))
    local d = R.rel_diff(got, ref)
    ok(d <= 1e-5, string.format("sampling.wan (CFG, 2 steps, 5 frames) with the transformer context-parallel " ..
        "over 2 ranks == one process within 1e-5 relative (%.1e)", d))
    mesh:destroy()
    -- the same with the transformer tensor-parallel instead (a fresh pipeline: the split is one way)
    local pipe2 = sampling.open_pipeline(wan, {dtype = "float32", device = "cpu"})
    local tmesh = require("nemo.parallel.mesh").DeviceMesh{tp_size = 2}
    pipe2.components.transformer:enable_tensor_parallel(tmesh:get_group("tp"))
    pipe = pipe2
    local got2 = run().video
    local d2 = R.rel_diff(got2, ref)
    ok(d2 <= 1e-5, string.format("sampling.wan with the transformer tensor-parallel over 2 ranks == one process " ..
        "within 1e-5 relative (%.1e)", d2))
    tmesh:destroy()
end

fs.remove_tree(mine)
R.done()
