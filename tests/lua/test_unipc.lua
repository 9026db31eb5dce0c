-- UniPCMultistepScheduler (lua/nemo/schedulers/unipc.lua) against diffusers 0.40: the
-- sched_unipc golden case (tests/golden/sched_unipc/make_golden.py: 21 configs, Wan 2.1's
-- scheduler_config.json among them; set_timesteps(N) for N in {1, 4, 10, 50}; 54 sampling loops
-- in float32, float64, bfloat16 and WanPipeline's float32 sample + bfloat16 model output;
-- add_noise; explicit sigmas, set_begin_index), then state handling and the errors. A missing
-- golden case FAILS.
--
-- Tolerances, and what was measured when they were set (CPU, diffusers run by torch 2.15 with MKL):
-- * timesteps: exact. Sigmas: bitwise, except configs whose training table went through torch's
--   CPU float32 sqrt (MKL, not correctly rounded: about 0.5% of values one ulp off; nemo rounds
--   correctly): at most ULPS_OK[config] ulps (measured: vpred_zsnr 2, vpred_x0false 1, others 0).
--   Training tables: at most 1 ulp, rescale_betas_zero_snr's cumprod 4 ulps.
-- * loops: every step's prev_sample within rtol * max|ref| of diffusers': float32 1e-6, float64
--   1e-12 (1e-6 for the order-3 loops and vpred_zsnr, where a float32 coefficient or sigma is an
--   ulp away: 3x3 solves, torch's sqrt), bfloat16 2^-7. Measured: 47 of the 54 loops bitwise (all the
--   Wan ones, every dtype); worst float32 5.2e-7 (sample_x0false N4: torch's expm1 one ulp off),
--   worst float64 1.1e-7 (vpred_zsnr). The Wan loops are also checked bitwise.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local fs = require "nemo.fs"
local ffi = require "ffi"
local golden = require "golden"
local U = require "nemo.schedulers.unipc"
local S = U.UniPCMultistepScheduler

local function null(v) if v == json.null then return nil end return v end

-- distance in float32 ulps of two float32 values (0 for equal, huge for NaN against a number)
local ulp_u = ffi.new("union { float f; int32_t i; }[2]")
local function ulps(a, b)
    if a == b or (a ~= a and b ~= b) then return 0 end
    if a ~= a or b ~= b then return math.huge end
    ulp_u[0].f, ulp_u[1].f = a, b
    local x, y = ulp_u[0].i, ulp_u[1].i
    if x < 0 then x = -2147483648 - x end
    if y < 0 then y = -2147483648 - y end
    return math.abs(x - y)
end
local function max_ulps(got, ref)
    if #got ~= #ref then return math.huge end
    local m = 0
    for i = 1, #ref do m = math.max(m, ulps(got[i], ref[i])) end
    return m
end

-- max|a - ref| / max|ref| over values, NaN where ref is NaN required at the same places
local function rel_err(a, ref)
    local x, y = a:double():contiguous():reshape{-1}:tolist(), ref:double():contiguous():reshape{-1}:tolist()
    if #x ~= #y then return math.huge end
    local md, mr = 0, 0
    for i = 1, #y do
        if y[i] ~= y[i] or x[i] ~= x[i] then
            if not (y[i] ~= y[i] and x[i] ~= x[i]) then return math.huge end
        else
            local d = math.abs(x[i] - y[i])
            if d > md then md = d end
            if math.abs(y[i]) > mr then mr = math.abs(y[i]) end
        end
    end
    if md == 0 then return 0 end
    return mr > 0 and md / mr or math.huge
end

local function same_list(a, b)
    if type(a) ~= "table" or type(b) ~= "table" or #a ~= #b then return false end
    for i = 1, #b do if a[i] ~= b[i] then return false end end
    return true
end

local dir, why = golden.case("sched_unipc", "golden.json")
local doc, st
if not dir then
    T.ok(false, "sched_unipc golden case: " .. tostring(why))
else
    doc = json.read_file(dir .. "/golden.json")
    st = nemo.load_file(dir .. "/golden.safetensors")
    T.ok(st.sample ~= nil and st.model_outputs ~= nil and doc.configs ~= nil and doc.loops ~= nil,
        "golden: golden.json and golden.safetensors hold the configs, loops, sample and model outputs")
end

local function sorted_keys(t)
    local out = {}
    for k in pairs(t) do out[#out + 1] = k end
    table.sort(out)
    return out
end

-- sigmas whose training table went through torch's float32 sqrt: allowed ulps
local ULPS_OK = {vpred_zsnr = 2, vpred_x0false = 1}
-- float64 loops with a float32 coefficient one ulp away from torch's
local F64_LOOSE = {["order3_eps.N10.f64"] = true, ["order3_flow_bh1.N10.f64"] = true, ["vpred_zsnr.N10.f64"] = true}
local DTYPES = {f32 = {"float32", "float32"}, f64 = {"float64", "float64"}, mixed = {"float32", "bfloat16"},
                bf16 = {"bfloat16", "bfloat16"}}
local RTOL = {f32 = 1e-6, mixed = 1e-6, f64 = 1e-12, bf16 = 2 ^ -7}

if doc then
    -- ==== configs and schedules ====
    local cnames = sorted_keys(doc.configs)
    T.is(#cnames, 21, "golden: 21 configs")
    for _, name in ipairs(cnames) do
        local c = doc.configs[name]
        local s = S.from_pretrained(dir .. "/" .. name)
        local diff = {}
        for _, k in ipairs(U.CONFIG_KEYS) do
            local a, b = s.config[k], null(c.config[k])
            local same = a == b or (type(a) == "table" and same_list(a, b))
            if not same then diff[#diff + 1] = k .. "=" .. tostring(a) end
        end
        T.ok(#diff == 0, name .. ": from_pretrained(folder): every config key as diffusers holds it", table.concat(diff, ", "))
        local mu = null(c.mu)
        for _, n in ipairs(sorted_keys(c.schedules)) do
            local sc = c.schedules[n]
            s:set_timesteps(tonumber(n), {mu = mu})
            local ts_ok = same_list(s._ts, sc.timesteps) and s.timesteps.dtype == "int64" and
                same_list(s.timesteps:tolist(), sc.timesteps) and s.num_inference_steps == #sc.timesteps
            T.ok(ts_ok, string.format("%s N=%s: timesteps (int64) exactly as diffusers", name, n))
            local u = max_ulps(s.sigmas:double():tolist(), sc.sigmas)
            local allowed = ULPS_OK[name] or 0
            T.ok(u <= allowed and s.sigmas.dtype == "float32", string.format(
                "%s N=%s: sigmas (float32, %d) within %d ulp of diffusers' (measured %s)", name, n, #sc.sigmas,
                allowed, tostring(u)))
        end
    end

    -- ==== training tables ====
    for _, name in ipairs {"default", "sd15_leading", "vpred_zsnr", "sample_x0false"} do
        local s = S.from_pretrained(dir .. "/" .. name)
        local u = max_ulps(s._train_sigmas, st[name .. ".init_sigmas"]:double():tolist())
        local before = s.sigmas:double():tolist()
        local allowed = name == "vpred_zsnr" and 4 or 1
        T.ok(u <= allowed and max_ulps(before, s._train_sigmas) == 0 and s.timesteps:numel() == 1000 and
            s.timesteps[0]:item() == 999, string.format("%s: training sigmas within %d ulp of diffusers' " ..
            "(measured %d); before set_timesteps sigmas are them and timesteps 999..0", name, allowed, u))
        if st[name .. ".alphas_cumprod"] then
            local ua = max_ulps(s.alphas_cumprod:double():tolist(), st[name .. ".alphas_cumprod"]:double():tolist())
            T.ok(ua <= allowed, string.format("%s: alphas_cumprod within %d ulp (measured %d)", name, allowed, ua))
        end
    end

    -- ==== sampling loops ====
    local mos = st.model_outputs
    local lnames = sorted_keys(doc.loops)
    T.is(#lnames, 54, "golden: 54 loops")
    local nbitwise, worst = 0, {}
    for _, key in ipairs(lnames) do
        local L = doc.loops[key]
        local s = S.from_pretrained(dir .. "/" .. L.config)
        local mu = null(L.mu)
        -- used before, as the generator did: set_timesteps resets the multistep state
        s:set_timesteps(7, {mu = mu})
        local x = st.sample
        for i = 0, 2 do x = s:step(mos[i], s.timesteps[i], x) end
        s:set_timesteps(L.N, {mu = mu})
        local sdt, mdt = DTYPES[L.dtype][1], DTYPES[L.dtype][2]
        x = st.sample:to{dtype = sdt}
        local state_ok, err, bits = true, 0, true
        for i = 0, L.N - 1 do
            x = s:step(mos[i % 10]:to{dtype = mdt}, s.timesteps[i], x)
            if s:step_index() ~= L.info.step_index[i + 1] or s.this_order ~= L.info.this_order[i + 1] or
                s.lower_order_nums ~= L.info.lower_order_nums[i + 1] or s.timesteps[i]:item() ~= L.info.t[i + 1] then
                state_ok = false
            end
            local refs = {}
            if L.store == "full" then refs[#refs + 1] = {x, st[key .. ".full"][i]} end
            if st[key .. ".steps"] then refs[#refs + 1] = {x:reshape{-1}:narrow(0, 0, doc.slice), st[key .. ".steps"][i]} end
            if i == L.N - 1 and st[key .. ".final"] then refs[#refs + 1] = {x, st[key .. ".final"]} end
            for _, r in ipairs(refs) do
                local e = rel_err(r[1], r[2])
                if e > err then err = e end
                if not T.same_bits(r[1]:to{dtype = r[2].dtype}, r[2]) then bits = false end
            end
        end
        if bits then nbitwise = nbitwise + 1 end
        worst[L.dtype] = math.max(worst[L.dtype] or 0, err)
        T.ok(state_ok and x.dtype == L.out_dtype, key .. ": step_index, this_order, lower_order_nums and the " ..
            "timesteps after every step as diffusers; prev_sample is " .. L.out_dtype)
        local rtol = (F64_LOOSE[key] and 1e-6) or RTOL[L.dtype]
        T.ok(err <= rtol, string.format("%s: every step's prev_sample within %.3g * max|ref| of diffusers' " ..
            "(measured %.3g%s)", key, rtol, err, bits and ", bitwise" or ""))
        if L.config:match("^wan21") then
            T.ok(bits, key .. ": bitwise as diffusers (Wan's config, " .. L.dtype .. ")")
        end
        if L.has_nan then
            local last = x:double():reshape{-1}:tolist()
            local allnan = true
            for _, v in ipairs(last) do if v == v then allnan = false end end
            T.ok(allnan and #L.nan_steps == 1 and L.nan_steps[1] == L.N - 1,
                key .. ": the last step is all NaN, as diffusers' (bh1 with a final sigma 0: B(h) = -inf times 0)")
        end
    end
    T.diag(string.format("loops bitwise as diffusers: %d of %d; worst rel error f32 %.3g, f64 %.3g, mixed %.3g, " ..
        "bf16 %.3g", nbitwise, #lnames, worst.f32 or 0, worst.f64 or 0, worst.mixed or 0, worst.bf16 or 0))
    T.ok(nbitwise >= 47, string.format("at least 47 of the 54 loops are bitwise as diffusers (%d)", nbitwise))

    -- ==== add_noise ====
    for _, cname in ipairs(sorted_keys(doc.add_noise)) do
        local A = doc.add_noise[cname]
        local s = S.from_pretrained(dir .. "/" .. A.config)
        if null(A.N) then s:set_timesteps(A.N, {mu = null(doc.configs[A.config].mu)}) end
        local x0 = st["add_noise.x0"]:to{dtype = A.dtype}
        local nz = st["add_noise.noise"]:to{dtype = A.dtype}
        local y = s:add_noise(x0, nz, nemo.tensor(A.timesteps, {dtype = "float32"}))
        local ref = st["add_noise." .. cname]
        local tol = A.dtype == "bfloat16" and 2 ^ -7 or A.dtype == "float64" and 1e-15 or 1e-6
        local e = rel_err(y, ref)
        T.ok(y.dtype == ref.dtype and e <= tol, string.format("add_noise %s (%s, %s): within %.3g (measured %.3g%s)",
            cname, A.config, A.dtype, tol, e, T.same_bits(y, ref) and ", bitwise" or ""))
    end
    do
        local s = S.from_pretrained(dir .. "/wan21_480")
        s:set_timesteps(10)
        local x0, nz = st["add_noise.x0"], st["add_noise.noise"]
        local t = s.timesteps[3]
        T.ok(T.same_bits(s:add_noise(x0, nz, t), s:add_noise(x0, nz, {t:item()})) and
            T.same_bits(s:add_noise(x0, nz, t:item()), s:add_noise(x0, nz, nemo.tensor({t:item(), t:item()}))),
            "add_noise takes a 0-dim tensor, a number, a list or a tensor of timesteps")
        s:set_begin_index(3)
        local ref = s:add_noise(x0, nz, t)
        T.ok(T.same_bits(s:add_noise(x0, nz, 12345), ref), "add_noise after set_begin_index uses the begin index")
        T.raises(function() S.from_pretrained(dir .. "/wan21_480"):set_timesteps(10):add_noise(x0, nz, 500) end,
            "timestep 500 is not in the schedule", "add_noise with a timestep not in the schedule")
    end

    -- ==== extras: explicit sigmas, a repeated timestep, trailing N = 61, set_begin_index ====
    local ex = doc.extras
    local function check_sched(s, e, name)
        T.ok(same_list(s._ts, e.timesteps) and max_ulps(s.sigmas:double():tolist(), e.sigmas) == 0 and
            s.num_inference_steps == e.num_inference_steps, name .. ": timesteps and sigmas bitwise as diffusers")
    end
    do
        local s = S.from_pretrained(dir .. "/wan21_480")
        s:set_timesteps(nil, {sigmas = ex.explicit_sigmas.sigmas_in})
        check_sched(s, ex.explicit_sigmas, "explicit flow sigmas (shifted by flow_shift, the first moved off 1)")
        s:set_timesteps{sigmas = nemo.tensor(ex.explicit_sigmas.sigmas_in, {dtype = "float64"})}
        check_sched(s, ex.explicit_sigmas, "explicit flow sigmas as a float64 tensor, set_timesteps{sigmas=}")
        s:set_timesteps(nil, {sigmas = ex.repeated.sigmas_in})
        check_sched(s, ex.repeated, "explicit sigmas with a repeated timestep")
        T.is(s:index_for_timestep(s.timesteps[0]), ex.repeated.index_of_first,
            "a repeated timestep takes its second match (index_for_timestep), as diffusers")
        local k = S.from_pretrained(dir .. "/karras_flow")
        k:set_timesteps(nil, {sigmas = ex.karras_flow_explicit.sigmas_in})
        check_sched(k, ex.karras_flow_explicit, "Karras flow sigmas from explicit sigmas")
        local tr = S.from_config(S.from_pretrained(dir .. "/default").config, {timestep_spacing = "trailing"})
        tr:set_timesteps(61)
        check_sched(tr, ex.trailing61, "from_config(config, {timestep_spacing = 'trailing'}) with N = 61")
        T.is(tr.num_inference_steps, 62, "'trailing' with N = 61 has 62 timesteps, as numpy's arange in diffusers")
        local w5 = S.from_config(S.from_pretrained(dir .. "/wan21_480").config, {flow_shift = 5.0})
        w5:set_timesteps(50)
        T.ok(same_list(w5._ts, doc.configs.wan21_720.schedules["50"].timesteps) and
            max_ulps(w5._sig, doc.configs.wan21_720.schedules["50"].sigmas) == 0,
            "from_config(Wan 480p config, {flow_shift = 5.0}) is the 720p schedule (the model card's recipe)")
    end
    do
        local b = ex.begin3
        local s = S.from_pretrained(dir .. "/" .. b.config)
        s:set_timesteps(b.N)
        s:set_begin_index(b.begin_index)
        T.is(s:begin_index(), 3, "set_begin_index(3)")
        local x = st.sample
        local err, bits = 0, true
        for i = b.first, b.N - 1 do
            x = s:step(mos[i], s.timesteps[i], x)
            local got, ref = x:reshape{-1}:narrow(0, 0, doc.slice), st["begin3.steps"][i - b.first]
            err = math.max(err, rel_err(got, ref))
            bits = bits and T.same_bits(got, ref)
        end
        T.ok(bits and T.same_bits(x, st["begin3.final"]) and s:step_index() == 10,
            string.format("a loop started by set_begin_index(3): bitwise as diffusers (rel %.3g)", err))
    end

    -- ==== state ====
    do
        local s = S.from_pretrained(dir .. "/wan21_480")
        T.ok(s:step_index() == nil and s:begin_index() == nil and s.num_inference_steps == nil and
            s.init_noise_sigma == 1.0 and s:__len() == 1000,
            "a new scheduler: no step index, no schedule, init_noise_sigma 1, length num_train_timesteps")
        s:set_timesteps(10)
        local x = st.sample
        T.ok(s:scale_model_input(x, s.timesteps[0]) == x, "scale_model_input returns the sample itself")
        for i = 0, 3 do x = s:step(mos[i], s.timesteps[i], x) end
        T.ok(s:step_index() == 4 and s.lower_order_nums == 2 and s.last_sample ~= nil and s.model_outputs[2] ~= nil,
            "after four steps: step index 4, the multistep history filled")
        s:set_timesteps(10)
        T.ok(s:step_index() == nil and s:begin_index() == nil and s.lower_order_nums == 0 and s.last_sample == nil and
            s.model_outputs[1] == nil and s.model_outputs[2] == nil,
            "a second set_timesteps resets step_index, begin_index, lower_order_nums, last_sample and model_outputs")
        x = st.sample
        for i = 0, 9 do x = s:step(mos[i], s.timesteps[i]:item(), x) end
        T.ok(T.same_bits(x, st["wan21_480.N10.f32.full"][9]), "after the reset the 10-step loop (Lua number " ..
            "timesteps) is again bitwise as diffusers")
        T.raises(function() s:step(mos[0], s.timesteps[9], x) end, "past the end of the schedule",
            "stepping past the last timestep")
        T.ok(tostring(s):find("UniPCMultistepScheduler(flow sigmas, flow_shift=3", 1, true) ~= nil, "tostring names the scheduler")
    end

    -- ==== save_pretrained ====
    do
        local tmp = os.tmpname()
        os.remove(tmp)
        local all_ok = true
        for _, name in ipairs {"default", "wan_disable_corrector", "midpoint_trained", "flow_dynamic_terminal"} do
            local s = S.from_pretrained(dir .. "/" .. name)
            s:save_pretrained(tmp .. "/" .. name)
            local a = json.read_file(tmp .. "/" .. name .. "/scheduler_config.json")
            local c = doc.configs[name].config
            for k, v in pairs(c) do
                local w = a[k]
                local same = w == v or (type(v) == "table" and type(w) == "table" and same_list(w, v))
                if not same then all_ok = false; T.diag(name .. "." .. k) end
            end
            for k in pairs(a) do if c[k] == nil and k:sub(1, 1) ~= "_" then all_ok = false; T.diag(name .. " extra " .. k) end end
            if a._class_name ~= "UniPCMultistepScheduler" then all_ok = false end
            local again = S.from_pretrained(tmp .. "/" .. name)
            local mu = null(doc.configs[name].mu)
            again:set_timesteps(10, {mu = mu})
            if not same_list(again._ts, doc.configs[name].schedules["10"].timesteps) then all_ok = false end
        end
        T.ok(all_ok, "save_pretrained writes diffusers' keys and values (null, [] and lists kept) and reloads")
        local text = T.read_bytes(tmp .. "/default/scheduler_config.json")
        T.ok(text:find('"disable_corrector": []', 1, true) ~= nil and text:find('"trained_betas": null', 1, true) ~= nil,
            "an empty disable_corrector is written as [], an unset trained_betas as null")
        fs.remove_tree(tmp)
    end
end

-- ==== errors ====
T.raises(function() S{solver_type = "bh3"} end, "solver_type 'bh3' is not implemented %(expected 'bh1' or 'bh2'",
    "an unknown solver_type")
T.is(S{solver_type = "midpoint"}.config.solver_type, "bh2", "solver_type 'midpoint' is registered as 'bh2', as diffusers")
T.raises(function() S{}:step(nemo.zeros(2), 999, nemo.zeros(2)) end, "you need to run 'set_timesteps'",
    "step before set_timesteps")
T.raises(function() S{num_train_timesteps = "1000"} end, "'num_train_timesteps' must be a positive integer, got string",
    "num_train_timesteps as a string")
T.raises(function() S{flow_shift = "3.0"} end, "'flow_shift' must be a number", "flow_shift as a string")
T.raises(function() S{use_flow_sigmas = 1} end, "'use_flow_sigmas' must be a boolean", "a boolean key as a number")
T.raises(function() S{disable_corrector = {1.5}} end, "'disable_corrector' must be a list of integers",
    "disable_corrector with a fraction")
T.raises(function() S{trained_betas = {}} end, "'trained_betas' must be a list of numbers or null", "empty trained_betas")
T.raises(function() S{solver_order = 0} end, "'solver_order' must be a positive integer", "solver_order 0")
T.raises(function() S{prediction_type = "x0"} end, "'prediction_type' must be one of 'epsilon', 'sample'",
    "an unknown prediction_type")
T.raises(function() S{timestep_spacing = "uniform"} end, "'timestep_spacing' must be one of", "an unknown timestep_spacing")
T.raises(function() S{final_sigmas_type = "min"} end, "'final_sigmas_type' must be one of", "an unknown final_sigmas_type")
T.raises(function() S{beta_schedule = "cosine"} end, "'beta_schedule' must be one of", "an unknown beta_schedule")
T.raises(function() S{use_beta_sigmas = true} end, "use_beta_sigmas = true .* is not supported yet", "beta sigmas")
T.raises(function() S{use_karras_sigmas = true, use_exponential_sigmas = true} end, "only one of",
    "Karras and exponential sigmas together")
T.raises(function() S{shift_terminal = 0.1} end, "shift_terminal is only supported when use_flow_sigmas", "shift_terminal without flow sigmas")
T.raises(function() S{prediction_type = "flow_prediction", predict_x0 = false} end, "needs predict_x0 = true",
    "flow_prediction with predict_x0 false")
T.raises(function() S{flow_shfit = 3.0} end, "unknown config key flow_shfit", "an unknown key is an error in the constructor")
T.raises(function() S{flow_shift = json.null} end, "'flow_shift' is null", "flow_shift null")
T.raises(function() S.from_config(5) end, "expected a config table", "from_config(5)")
T.ok(S{sigma_min = json.null, shift_terminal = json.null, solver_p = json.null, trained_betas = json.null}.config.sigma_min == nil,
    "null sigma_min / shift_terminal / solver_p / trained_betas are accepted")
do
    local flow = S{use_flow_sigmas = true, prediction_type = "flow_prediction"}
    T.raises(function() S{use_flow_sigmas = true, use_dynamic_shifting = true}:set_timesteps(4) end,
        "`mu` must be passed", "dynamic shifting without mu")
    T.raises(function() S{}:set_timesteps(nil, {sigmas = {1, 0.5}}) end, "only supported when `use_flow_sigmas=True`",
        "explicit sigmas without flow sigmas")
    T.raises(function() flow:set_timesteps(0) end, "positive integer", "num_inference_steps 0")
    T.raises(function() flow:set_timesteps() end, "positive integer", "set_timesteps()")
    T.raises(function() flow:set_timesteps(4, {sigma = {1}}) end, "unknown option 'sigma'", "an unknown set_timesteps option")
    flow:set_timesteps(4)
    local x = nemo.zeros(1, 2)
    T.raises(function() flow:convert_model_output(x, x) end, "the step index is not set", "convert_model_output before step")
    T.raises(function() flow:step(x, 123, x) end, "timestep 123 is not in the schedule .*pass one of scheduler.timesteps",
        "step with a timestep not in the schedule: a clear error (diffusers silently takes the last step)")
    T.ok(flow:step_index() == nil, "a failed first step leaves the step index unset")
    T.raises(function() flow:step(x, flow.timesteps, x) end, "expected one timestep", "step with the whole schedule as timestep")
    T.raises(function() flow:step(x, flow.timesteps[0], {1, 2}) end, "must be tensors", "step with a table sample")
    T.raises(function() flow:step(x, flow.timesteps[0], x, {gen = 1}) end, "unknown option 'gen'", "an unknown step option")
    T.raises(function() flow:set_begin_index(-1) end, "non%-negative integer", "set_begin_index(-1)")
end
do
    local tmp = os.tmpname()
    os.remove(tmp)
    fs.mkdirs(tmp .. "/other")
    json.write_file(tmp .. "/other/scheduler_config.json", {_class_name = "FlowMatchEulerDiscreteScheduler", shift = 3.0})
    T.raises(function() S.from_pretrained(tmp .. "/other") end, "describes a FlowMatchEulerDiscreteScheduler", "another class's config")
    T.raises(function() S.from_pretrained(tmp) end, "no scheduler_config.json; looked for", "a folder without the config")
    fs.mkdirs(tmp .. "/pipe/scheduler")
    json.write_file(tmp .. "/pipe/scheduler/scheduler_config.json", {_class_name = "UniPCMultistepScheduler",
        use_flow_sigmas = true, prediction_type = "flow_prediction", flow_shift = 5.0, some_future_key = 1})
    local s = S.from_pretrained(tmp .. "/pipe")
    T.ok(s.config.flow_shift == 5.0 and s.config.use_flow_sigmas,
        "from_pretrained(pipeline folder) reads scheduler/, skipping unknown keys with a warning, as diffusers")
    json.write_file(tmp .. "/pipe/scheduler/scheduler_config.json", {solver_order = -2})
    T.raises(function() S.from_pretrained(tmp .. "/pipe") end, "must be a positive integer, got number %(%-2%) %(in .*scheduler_config.json%)",
        "a bad value in a file names the file")
    fs.remove_tree(tmp)
end

T.done()
