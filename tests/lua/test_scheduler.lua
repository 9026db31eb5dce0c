-- FlowMatchEulerDiscreteScheduler (lua/nemo/schedulers/flow_match_euler.lua) against diffusers
-- 0.40: the sched_flowmatch golden case (3 configs x N in {4, 28} x default / FluxPipeline
-- sigmas: timesteps, sigmas, mu, three chained step()s), further diffusers references for the
-- options the case does not cover, the errors, and loading through NeMoAutoDiffusionPipeline.
-- A missing golden case FAILS.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local fs = require "nemo.fs"
local golden = require "golden"
local FM = require "nemo.schedulers.flow_match_euler"
local S = FM.FlowMatchEulerDiscreteScheduler

-- exact comparison of a Lua list / tensor with a list of numbers: the number of differing values
local function mismatches(got, ref)
    if type(got) == "table" and got._c ~= nil then   -- a tensor
        got = got:double():contiguous():reshape{-1}:tolist()
    end
    if #got ~= #ref then return math.huge end
    local bad = 0
    for i = 1, #ref do if got[i] ~= ref[i] then bad = bad + 1 end end
    return bad
end

-- ==== the golden case ====

local dir, why = golden.case("sched_flowmatch", "schedules.json")
if not dir then
    T.ok(false, "sched_flowmatch golden case: " .. tostring(why))
else
    local doc = json.read_file(dir .. "/schedules.json")
    local st = nemo.load_file(dir .. "/sched.safetensors")
    local seq = doc.image_seq_len
    T.ok(type(seq) == "number" and st.sample ~= nil and st.model_output ~= nil,
        "golden: schedules.json and sched.safetensors hold image_seq_len, sample and model_output")

    -- the three configs: from_pretrained(folder), their config, init sigmas and mu
    local scheds = {}
    local cnames = {}
    for name in pairs(doc.configs) do cnames[#cnames + 1] = name end
    table.sort(cnames)
    T.is(#cnames, 3, "golden: three configs")
    for _, cname in ipairs(cnames) do
        local c = doc.configs[cname]
        local s = S.from_pretrained(dir .. "/" .. cname)
        scheds[cname] = s
        local same = true
        for _, k in ipairs(FM.CONFIG_KEYS) do
            local want = c.config[k]
            if want == json.null then want = nil end
            if s.config[k] ~= want then same = false; T.diag(cname .. "." .. k .. ": " .. tostring(s.config[k])) end
        end
        T.ok(same, cname .. ": from_pretrained(folder) reads scheduler_config.json, every key as diffusers' config")
        T.ok(s.sigma_min == c.init_sigma_min and s.sigma_max == c.init_sigma_max,
            string.format("%s: init sigma_min %.17g sigma_max %.17g (diffusers %.17g, %.17g)", cname, s.sigma_min,
                s.sigma_max, c.init_sigma_min, c.init_sigma_max))
        local mu = FM.calculate_shift(seq, s.config.base_image_seq_len, s.config.max_image_seq_len, s.config.base_shift,
            s.config.max_shift)
        T.ok(mu == c.mu and s:calculate_shift(seq) == c.mu,
            string.format("%s: calculate_shift(%d, ...) = %.17g (diffusers %.17g)", cname, seq, mu, c.mu))
    end
    T.ok(S.from_pretrained(dir .. "/shift3/scheduler_config.json").config.shift == 3,
        "from_pretrained also takes the scheduler_config.json path")

    -- the twelve runs
    local rnames = {}
    for name in pairs(doc.runs) do rnames[#rnames + 1] = name end
    table.sort(rnames)
    T.is(#rnames, 12, "golden: 12 runs")
    for _, rname in ipairs(rnames) do
        local run = doc.runs[rname]
        local s = scheds[run.config]
        local N = run.num_inference_steps
        local mu = run.mu_passed ~= json.null and run.mu_passed or nil
        if run.mode == "default" then
            s:set_timesteps(N, {mu = mu})
        else
            T.is(run.mode, "flux_sigmas", rname .. ": mode")
            local sin = FM.flux_sigmas(N)
            T.is(mismatches(sin, run.sigmas_in), 0, rname .. ": flux_sigmas(N) = np.linspace(1, 1/N, N), bitwise")
            local ts, n = FM.retrieve_timesteps(s, N, {sigmas = sin, mu = mu})
            T.ok(ts == s.timesteps and n == N, rname .. ": retrieve_timesteps returns the timesteps and N")
        end
        T.ok(s.timesteps.dtype == "float32" and s.timesteps:numel() == N and s.sigmas.dtype == "float32" and
            s.sigmas:numel() == N + 1, rname .. ": float32 timesteps [N] and sigmas [N+1]")
        T.is(mismatches(s.timesteps, run.timesteps), 0, rname .. ": timesteps bitwise as diffusers (schedules.json)")
        T.is(mismatches(s.sigmas, run.sigmas), 0, rname .. ": sigmas bitwise as diffusers, with the appended 0")
        T.ok(T.same_bits(s.timesteps, st[rname .. ".timesteps"]) and T.same_bits(s.sigmas, st[rname .. ".sigmas"]),
            rname .. ": timesteps and sigmas bitwise as sched.safetensors")
        -- three chained steps from the same model_output
        local x = st.sample
        for k = 1, 3 do
            local t = s.timesteps[k - 1]
            T.ok(t:item() == run.step_timesteps[k], rname .. ": step " .. k .. " timestep")
            x = s:step(st.model_output, t, x)
            T.ok(s:step_index() == k, rname .. ": step index " .. k)
            T.close(x, st[rname .. ".prev_sample." .. k], 1e-6, 0, rname .. ": prev_sample." .. k)
        end
    end

    -- step() with a Lua number timestep, and set_begin_index
    do
        local s = scheds.shift1
        s:set_timesteps(4)
        local r = s:step(st.model_output, 1000, st.sample)
        T.close(r, st["shift1.default.N4.prev_sample.1"], 0, 0, "step(model_output, 1000 (a Lua number), sample)")
        s:set_timesteps(4)
        s:set_begin_index(1)
        r = s:step(st.model_output, s.timesteps[0], st.sample)
        T.ok(s:step_index() == 2, "set_begin_index(1): the step starts at index 1 whatever the timestep")
        local ref = st.sample + (s._sig[3] - s._sig[2]) * st.model_output
        T.close(r, ref, 0, 0, "set_begin_index(1): the step uses sigmas[1] -> sigmas[2]")
    end

    -- save_pretrained writes what diffusers wrote
    do
        local tmp = os.tmpname()
        os.remove(tmp)
        scheds.flux_dynamic:save_pretrained(tmp)
        local a = json.read_file(tmp .. "/scheduler_config.json")
        local b = json.read_file(dir .. "/flux_dynamic/scheduler_config.json")
        local same = true
        for k, v in pairs(b) do if k ~= "_diffusers_version" and a[k] ~= v then same = false; T.diag(k) end end
        for k in pairs(a) do if b[k] == nil then same = false; T.diag(k) end end
        T.ok(same, "save_pretrained writes scheduler_config.json with diffusers' keys and values (shift_terminal null)")
        local again = S.from_pretrained(tmp)
        again:set_timesteps(28, {mu = 0.63})
        T.is(mismatches(again.sigmas, doc.runs["flux_dynamic.default.N28"].sigmas), 0,
            "a saved scheduler reloads to the same schedule")
        fs.remove_tree(tmp)
    end
end

-- ==== options the golden case does not cover: references from diffusers 0.40 ====
-- Computed with diffusers 0.40.0, numpy 2.4.6, torch 2.15 (values printed with json.dumps):
--   S = FlowMatchEulerDiscreteScheduler
--   terminal:     S(shift=3.0, shift_terminal=0.1).set_timesteps(5)
--   terminal_f32: S(shift=3.0, shift_terminal=0.1).set_timesteps(sigmas=np.linspace(1, 1/5, 5))
--   linear_f64:   S(use_dynamic_shifting=True, time_shift_type="linear").set_timesteps(5, mu=2.05)
--   linear_f32:   S(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.02)
--                     .set_timesteps(sigmas=np.linspace(1, 1/5, 5), mu=2.05)
--   invert:       S(shift=2.0, invert_sigmas=True).set_timesteps(4)
--   explicit_ts:  S(shift=3.0).set_timesteps(timesteps=[1000.0, 750.5, 500.25, 250.125])
--   x0 = arange(12, f32).reshape(2,2,3)/7 - 0.5; nz = arange(12, f32).reshape(2,2,3).flip(-1)/5 - 1.1
--   scale_noise_train: s = S(shift=3.0); s.scale_noise(x0, stack([s.timesteps[10], s.timesteps[700]]), nz)
--   scale_noise_inf:   s.set_timesteps(4); s.scale_noise(x0, s.timesteps[1:2], nz)
--   stochastic: s = S(shift=3.0, stochastic_sampling=True); s.set_timesteps(4)
--               s.step(nz, s.timesteps[0], x0, generator=Generator().manual_seed(5)); noise is that draw
--   bf16:       s = S(shift=3.0); s.set_timesteps(4); s.step(nz.to(bfloat16), s.timesteps[0], x0)
--   repeated:   s = S(); s.set_timesteps(sigmas=[1.0, 1.0, 0.5]); s.index_for_timestep(s.timesteps[0])
local REF = {
    terminal = {timesteps = {1000.0, 909.5152587890625, 773.9910278320312, 548.6566772460938, 100.0}, sigmas = {1.0, 0.9095152616500854, 0.773991048336029, 0.548656702041626, 0.10000000149011612, 0.0}},
    terminal_f32 = {timesteps = {1000.0, 878.8462524414062, 713.6363525390625, 475.0000305175781, 100.0000228881836}, sigmas = {1.0, 0.8788462281227112, 0.7136363387107849, 0.4750000238418579, 0.10000002384185791, 0.0}},
    linear_f64 = {timesteps = {1000.0, 860.3002319335938, 672.5717163085938, 406.90460205078125, 2.0478498935699463}, sigmas = {1.0, 0.8603002429008484, 0.6725717186927795, 0.4069046080112457, 0.0020478498190641403, 0.0}},
    linear_f32 = {timesteps = {1000.0, 838.8859252929688, 636.257568359375, 373.6971130371094, 19.999980926513672}, sigmas = {1.0, 0.8388859033584595, 0.6362575888633728, 0.37369710206985474, 0.019999980926513672, 0.0}},
    invert = {timesteps = {0.0, 199.52064514160156, 498.5029602050781, 996.011962890625}, sigmas = {0.0, 0.19952064752578735, 0.4985029697418213, 0.9960119724273682, 1.0}},
    explicit_ts = {timesteps = {1000.0, 900.239990234375, 750.1874389648438, 500.1666564941406}, sigmas = {1.0, 0.9002400040626526, 0.7501874566078186, 0.500166654586792, 0.0}},
    scale_noise_train = {t = {996.6443481445312, 562.5}, out = {-0.6993288993835449, -0.8981783986091614, -1.0970278978347778, -0.0999041497707367, -0.29875361919403076, -0.49760308861732483, 0.4375, 0.38749998807907104, 0.33750003576278687, 0.9625000357627869, 0.9124999642372131, 0.8624999523162842}},
    scale_noise_inf = {t = {857.6923217773438}, out = {-0.6715384721755981, -0.8227472901344299, -0.9739560484886169, -0.09593408554792404, -0.24714286625385284, -0.39835163950920105, 0.47967034578323364, 0.32846149802207947, 0.17725276947021484, 1.0552747249603271, 0.9040659666061401, 0.7528570890426636}},
    stochastic = {noise = {-0.4867807626724243, -0.6038215756416321, -0.5580962300300598, 0.6675242781639099, -0.19741509854793549, 1.9427834749221802, -1.4017020463943481, -0.7625571489334106, 0.6312134265899658, -0.899135172367096, -0.5577934384346008, 0.6907187700271606}, out = {-0.3890465795993805, -0.440640389919281, -0.3526308536529541, 0.5765963792800903, -0.11646425724029541, 1.7679587602615356, -1.2225587368011475, -0.6255778074264526, 0.6186396479606628, -0.8159065842628479, -0.4743492007255554, 0.6452813148498535}},
    bf16 = {out = {-0.400390625, -0.2294921875, -0.05712890625, -0.05712890625, 0.1142578125, 0.28515625, 0.28515625, 0.45703125, 0.62890625, 0.62890625, 0.80078125, 0.97265625}},
    repeated = {index = 1},
    x0 = {-0.5, -0.3571428656578064, -0.2142857015132904, -0.0714285671710968, 0.07142859697341919, 0.2142857313156128, 0.3571428656578064, 0.5, 0.6428571939468384, 0.7857142686843872, 0.9285714626312256, 1.0714285373687744},
    nz = {-0.7000000476837158, -0.9000000357627869, -1.100000023841858, -0.10000002384185791, -0.30000001192092896, -0.5, 0.5, 0.2999999523162842, 0.10000002384185791, 1.100000023841858, 0.8999999761581421, 0.6999999284744263},
}

local function check_schedule(name, s)
    T.ok(mismatches(s.timesteps, REF[name].timesteps) == 0 and mismatches(s.sigmas, REF[name].sigmas) == 0,
        name .. ": timesteps and sigmas bitwise as diffusers")
end
check_schedule("terminal", S{shift = 3.0, shift_terminal = 0.1}:set_timesteps(5))
check_schedule("terminal_f32", S{shift = 3.0, shift_terminal = 0.1}:set_timesteps(nil, {sigmas = FM.flux_sigmas(5)}))
check_schedule("linear_f64", S{use_dynamic_shifting = true, time_shift_type = "linear"}:set_timesteps(5, {mu = 2.05}))
check_schedule("linear_f32", S{use_dynamic_shifting = true, time_shift_type = "linear", shift_terminal = 0.02}
    :set_timesteps(nil, {sigmas = FM.flux_sigmas(5), mu = 2.05}))
check_schedule("invert", S{shift = 2.0, invert_sigmas = true}:set_timesteps(4))
check_schedule("explicit_ts", S{shift = 3.0}:set_timesteps(nil, {timesteps = {1000.0, 750.5, 500.25, 250.125}}))
check_schedule("explicit_ts", S{shift = 3.0}:set_timesteps(4, {timesteps = nemo.tensor({1000.0, 750.5, 500.25, 250.125},
    {dtype = "float64"})}))

local x0 = nemo.tensor(REF.x0, {dtype = "float32"}):reshape{2, 2, 3}
local nz = nemo.tensor(REF.nz, {dtype = "float32"}):reshape{2, 2, 3}
do
    local s = S{shift = 3.0}
    T.ok(s.timesteps:numel() == 1000 and s.sigmas:numel() == 1000, "before set_timesteps: the 1000 training timesteps")
    local t = nemo.tensor(REF.scale_noise_train.t, {dtype = "float32"})
    T.close(s:scale_noise(x0, t, nz), REF.scale_noise_train.out, 0, 0,
        "scale_noise at the training timesteps (one sigma per sample), bitwise as diffusers")
    s:set_timesteps(4)
    T.close(s:scale_noise(x0, s.timesteps[{{1, 2}}], nz), REF.scale_noise_inf.out, 0, 0,
        "scale_noise after set_timesteps (one timestep for the batch), bitwise as diffusers")
    T.close(s:scale_noise(x0, REF.scale_noise_inf.t[1], nz), REF.scale_noise_inf.out, 0, 0,
        "scale_noise with a Lua number timestep")
    T.raises(function() s:scale_noise(x0, 123.0, nz) end, "timestep 123 is not in the schedule",
        "scale_noise with a timestep not in the schedule")
    T.raises(function() s:scale_noise(x0, s.timesteps[0]) end, "noise must be a tensor", "scale_noise without noise")
end
do
    local s = S{shift = 3.0, stochastic_sampling = true}
    s:set_timesteps(4)
    local y = s:step(nz, s.timesteps[0], x0, {noise = nemo.tensor(REF.stochastic.noise):reshape{2, 2, 3}})
    T.close(y, REF.stochastic.out, 0, 0, "stochastic_sampling with torch's noise passed in: bitwise as diffusers")
    local y2 = s:step(nz, s.timesteps[1], y, {generator = nemo.Generator(3)})
    T.ok(y2.dtype == "float32" and y2:numel() == 12, "stochastic_sampling draws from nemo's generator without noise=")
end
do
    local s = S{shift = 3.0}
    s:set_timesteps(4)
    local y = s:step(nz:bfloat16(), s.timesteps[0], x0)
    T.is(y.dtype, "bfloat16", "step with a bfloat16 model_output returns bfloat16, as diffusers")
    T.close(y, REF.bf16.out, 0, 0, "step with a bfloat16 model_output: values as diffusers")
    local y64 = s:step(nz:double(), s.timesteps[1], x0:double())
    T.is(y64.dtype, "float64", "a float64 model_output gives a float64 prev_sample")
end
do
    local s = S{}
    s:set_timesteps(nil, {sigmas = {1.0, 1.0, 0.5}})
    T.is(s:index_for_timestep(s.timesteps[0]), REF.repeated.index,
        "a repeated timestep takes its second match (index_for_timestep), as diffusers")
end
do
    local sig = FM.flux_sigmas(3)
    T.ok(sig[1] == 1 and sig[3] == 1 / 3 and #sig == 3, "flux_sigmas(3) = {1, 2/3, 1/3}")
    T.ok(FM.calculate_shift(256) == 0.5 and FM.calculate_shift(4096) == 1.15, "calculate_shift's defaults: 0.5 at 256, 1.15 at 4096")
    T.ok(math.abs(S{use_dynamic_shifting = true}:time_shift(0.63, 1.0, 0.5) - math.exp(0.63) / (math.exp(0.63) + 1)) < 1e-15,
        "time_shift(mu, 1, 0.5) = e^mu / (e^mu + 1)")
    local s = S{shift = 3.0}
    s:set_shift(1.0)
    s:set_timesteps(4)
    T.ok(s:shift() == 1.0 and s.config.shift == 3.0, "set_shift changes the shift set_timesteps uses, not the config")
    T.ok(tostring(s):find("FlowMatchEulerDiscreteScheduler", 1, true) ~= nil, "tostring names the class")
    T.ok(S.from_config({shift = 2.0, _class_name = "FlowMatchEulerDiscreteScheduler"}).config.shift == 2.0,
        "from_config skips _-metadata keys")
end

-- ==== errors ====

T.raises(function() S{shift = -1} end, "'shift' must be a positive number", "shift <= 0")
T.raises(function() S{shift = "3"} end, "'shift' must be a number", "shift as a string")
T.raises(function() S{num_train_timesteps = 0} end, "'num_train_timesteps' must be a positive integer", "num_train_timesteps 0")
T.raises(function() S{num_train_timesteps = 10.5} end, "'num_train_timesteps' must be a positive integer",
    "num_train_timesteps not an integer")
T.raises(function() S{use_dynamic_shifting = "yes"} end, "'use_dynamic_shifting' must be a boolean", "a boolean key as a string")
T.raises(function() S{time_shift_type = "cosine"} end, "must either be 'exponential' or 'linear'", "unknown time_shift_type")
T.raises(function() S{shift_terminal = 1.0} end, "'shift_terminal' must be in %[0, 1%)", "shift_terminal 1")
T.raises(function() S{shift = json.null} end, "'shift' is null", "shift null")
T.raises(function() S{shfit = 3.0} end, "unknown config key shfit", "an unknown key is an error in from_config")
T.raises(function() S.from_config({base_image_seq_len = 0}) end, "'base_image_seq_len' must be positive", "base_image_seq_len 0")
for _, k in ipairs {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"} do
    T.raises(function() S{[k] = true} end, k .. "' = true .* is not supported yet", k .. " = true: not supported yet")
end
T.ok(S{base_shift = json.null, shift_terminal = json.null}.config.base_shift == nil, "null base_shift / shift_terminal are accepted")
T.raises(function() S{base_shift = json.null}:calculate_shift(1024) end, "no base_shift", "calculate_shift without base_shift")
T.raises(function() FM.calculate_shift(1024, 256, 256) end, "max_seq_len and base_seq_len are both 256",
    "calculate_shift with equal sequence lengths")
T.raises(function() FM.flux_sigmas(0) end, "positive integer", "flux_sigmas(0)")
do
    local dyn = S{use_dynamic_shifting = true}
    T.raises(function() dyn:set_timesteps(4) end, "`mu` must be passed", "dynamic shifting without mu")
    local s = S{}
    T.raises(function() s:set_timesteps(4, {sigmas = {1, 0.5}}) end, "same length as num_inference_steps", "sigmas of the wrong length")
    T.raises(function() s:set_timesteps(nil, {sigmas = {1, 0.5}, timesteps = {1000}}) end,
        "should have the same length", "sigmas and timesteps of different lengths")
    T.raises(function() s:set_timesteps(0) end, "positive integer", "num_inference_steps 0")
    T.raises(function() s:set_timesteps() end, "pass num_inference_steps, sigmas or timesteps", "set_timesteps()")
    T.raises(function() s:set_timesteps(4, {sigma = {1}}) end, "unknown option 'sigma'", "an unknown set_timesteps option")
    T.raises(function() FM.retrieve_timesteps(s, 4, {sigmas = {1}, timesteps = {1}}) end, "only one of",
        "retrieve_timesteps with sigmas and timesteps")
    s:set_timesteps(4)
    local x = nemo.zeros(1, 2)
    T.raises(function() s:step(x, 500.0, x) end, "timestep 500 is not in the schedule .*pass one of scheduler.timesteps",
        "step with a timestep not in the schedule: a clear error")
    T.ok(s:step_index() == nil, "a failed first step leaves the step index unset")
    T.raises(function() s:step(x, nemo.tensor({1000}, {dtype = "int64"}), x) end, "integer indices",
        "step with an integer tensor timestep")
    T.raises(function() s:step(x, s.timesteps, x) end, "expected one timestep", "step with the whole schedule as timestep")
    T.raises(function() s:step(x, s.timesteps[0], x, {per_token_timesteps = x}) end, "per_token_timesteps is not supported yet",
        "per_token_timesteps")
    T.raises(function() s:step(x, s.timesteps[0], x, {gen = 1}) end, "unknown option 'gen'", "an unknown step option")
    for i = 0, 3 do s:step(x, s.timesteps[i], x) end
    T.raises(function() s:step(x, s.timesteps[3], x) end, "past the end of the schedule", "stepping past the last sigma")
end
do
    local tmp = os.tmpname()
    os.remove(tmp)
    fs.mkdirs(tmp .. "/other")
    json.write_file(tmp .. "/other/scheduler_config.json", {_class_name = "UniPCMultistepScheduler", shift = 1.0})
    T.raises(function() S.from_pretrained(tmp .. "/other") end, "describes a UniPCMultistepScheduler", "another class's config")
    T.raises(function() S.from_pretrained(tmp) end, "no scheduler_config.json; looked for", "a folder without the config")
    fs.mkdirs(tmp .. "/extra")
    json.write_file(tmp .. "/extra/scheduler_config.json", {_class_name = "FlowMatchEulerDiscreteScheduler", shift = 5.0,
        some_future_key = 1})
    T.ok(S.from_pretrained(tmp .. "/extra").config.shift == 5.0,
        "from_pretrained skips keys diffusers 0.40 does not know (with a warning), as diffusers does")
    json.write_file(tmp .. "/extra/scheduler_config.json", {shift = -2.0})
    T.raises(function() S.from_pretrained(tmp .. "/extra") end, "must be a positive number, got %-2 %(in .*scheduler_config.json%)",
        "a bad value in a file names the file")
    fs.remove_tree(tmp)
end

-- ==== the pipeline loads a FlowMatchEulerDiscreteScheduler component ====

do
    local pipeline = require "nemo.pipeline"
    local P = pipeline.NeMoAutoDiffusionPipeline
    T.is(pipeline._import_diffusers_class("FlowMatchEulerDiscreteScheduler"), S, "the registry resolves the scheduler class")
    local tmp = os.tmpname()
    os.remove(tmp)
    fs.mkdirs(tmp .. "/pipe/scheduler")
    json.write_file(tmp .. "/pipe/scheduler/scheduler_config.json", {_class_name = "FlowMatchEulerDiscreteScheduler",
        _diffusers_version = "0.30.0.dev0", base_image_seq_len = 256, base_shift = 0.5, max_image_seq_len = 4096,
        max_shift = 1.15, num_train_timesteps = 1000, shift = 3.0, use_dynamic_shifting = true})
    fs.copy_tree(require("golden").case("tokenizers") .. "/clip", tmp .. "/pipe/tokenizer")   -- a CLIP tokenizer
    json.write_file(tmp .. "/pipe/model_index.json", {_class_name = "FluxPipeline", _diffusers_version = "0.30.0.dev0",
        scheduler = {"diffusers", "FlowMatchEulerDiscreteScheduler"}, tokenizer = {"transformers", "CLIPTokenizer"}})
    local pipe = P.from_pretrained(tmp .. "/pipe", {torch_dtype = "float32", device = "cpu"})
    T.ok(getmetatable(pipe.scheduler) == S and pipe.skipped.scheduler == nil and pipe.scheduler.config.use_dynamic_shifting,
        "NeMoAutoDiffusionPipeline.from_pretrained loads the scheduler component (FLUX.1-dev's config)")
    T.ok(getmetatable(pipe.components.tokenizer) == require("nemo.tokenizers").CLIPTokenizer,
        "the tokenizer loads too (nemo.tokenizers.CLIPTokenizer)")
    T.ok(tostring(pipe):find("scheduler: FlowMatchEulerDiscreteScheduler", 1, true) ~= nil, "the pipeline prints the scheduler")
    pipe.scheduler:set_timesteps(nil, {sigmas = FM.flux_sigmas(4), mu = pipe.scheduler:calculate_shift(1024)})
    T.ok(pipe.scheduler.timesteps:numel() == 4, "the loaded scheduler sets FluxPipeline's timesteps")
    local only = P.from_pretrained(tmp .. "/pipe", {components_to_load = {"scheduler"}})
    T.ok(only.scheduler ~= nil, "components_to_load = {'scheduler'}")
    pipe:save_pretrained(tmp .. "/saved")
    local idx = json.read_file(tmp .. "/saved/model_index.json")
    T.ok(idx.scheduler[2] == "FlowMatchEulerDiscreteScheduler" and idx.tokenizer[2] == "CLIPTokenizer" and
        json.read_file(tmp .. "/saved/scheduler/scheduler_config.json").use_dynamic_shifting == true and
        fs.isfile(tmp .. "/saved/tokenizer/tokenizer_config.json") and fs.isfile(tmp .. "/saved/tokenizer/merges.txt"),
        "pipeline save_pretrained writes the scheduler's scheduler_config.json and copies the tokenizer's folder")
    local back = P.from_pretrained(tmp .. "/saved", {torch_dtype = "float32", device = "cpu"})
    T.ok(back.scheduler.config.max_shift == 1.15 and back.scheduler.config.shift == 3.0, "and it loads again")
    fs.remove_tree(tmp)
end

T.done()
