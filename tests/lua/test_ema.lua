-- tests/lua/test_ema.lua: nemo.ema (diffusers' EMAModel): the decay schedule, the update, swap,
-- reset and the option checks. The recipe's `ema:` block is checked in test_train.lua (one
-- process: checkpoints, resume, the export) and test_train_dist.sh (FSDP2 shards).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local E = require "nemo.ema"

-- the schedule: diffusers' get_decay
do
    local e = E.EMAModel({nemo.zeros(2)}, {decay = 0.9})
    local got = {}
    for n = 1, 5 do got[n] = e:get_decay(n) end
    T.ok(got[1] == 0 and math.abs(got[2] - 2 / 11) < 1e-15 and math.abs(got[3] - 3 / 12) < 1e-15 and got[5] == 5 / 14,
        "decay of steps 1..5: 0 (a copy), then (1 + k) / (10 + k) with k = n - 1")
    T.is(e:get_decay(1000), 0.9, "the decay is clamped to `decay`")
    local w = E.EMAModel({nemo.zeros(2)}, {use_ema_warmup = true, inv_gamma = 1, power = 0.75, update_after_step = 2,
                                           min_decay = 0.1})
    T.ok(w:get_decay(3) == 0 and math.abs(w:get_decay(4) - math.max(0.1, 1 - 2 ^ -0.75)) < 1e-15 and
         math.abs(w:get_decay(13) - (1 - 11 ^ -0.75)) < 1e-15,
        "use_ema_warmup: 1 - (1 + k / inv_gamma)^-power with k = n - update_after_step - 1, at least min_decay")
end

-- the update: s <- s - (1 - d) (s - p), checked against float64 arithmetic
do
    local g = nemo.Generator(3)
    local p = nemo.randn({4, 3}, {generator = g, dtype = "float64"})
    p.requires_grad = true
    local frozen = nemo.randn({3}, {generator = g, dtype = "float64"})
    local e = E.EMAModel({p, frozen}, {decay = 0.99})
    local flat = function(t) return t:detach():contiguous():reshape{-1}:tolist() end
    local rp = flat(p)
    local rs = {}
    for i, v in ipairs(rp) do rs[i] = v end
    local worst = 0
    for n = 1, 6 do
        nemo.no_grad(function() p:add_(0.1 * n) ; frozen:add_(1) end)
        e:step({p, frozen})
        local d = e:get_decay(n)
        local cur = flat(p)
        for i = 1, #rs do rs[i] = rs[i] - (1 - d) * (rs[i] - cur[i]) end
        local got = flat(e.shadow[1])
        for i = 1, #rs do worst = math.max(worst, math.abs(got[i] - rs[i])) end
    end
    T.ok(worst < 1e-14 and e.optimization_step == 6, string.format("6 steps: the shadow follows s - (1 - d)(s - p) " ..
        "(float64, %.1e, tolerance 1e-14)", worst))
    T.ok(T.maxdiff(e.shadow[2], frozen) == 0, "a parameter that needs no grad is copied, not averaged")
    local before = flat(p)
    local inside = e:swap({p, frozen}, function() return flat(p) end)
    T.ok(T.maxdiff(nemo.tensor(inside, {dtype = "float64"}), e.shadow[1]:reshape{-1}) == 0 and T.maxdiff(p:reshape{-1},
        nemo.tensor(before, {dtype = "float64"})) == 0, "swap: the averages are in the parameters while fn runs, " ..
        "the parameters are back after")
    T.raises(function() e:swap({p, frozen}, function() error("boom") end) end, "boom", "swap passes fn's error on")
    T.ok(T.maxdiff(p:reshape{-1}, nemo.tensor(before, {dtype = "float64"})) == 0,
        "and restores the parameters when fn raises")
    e:reset({p, frozen})
    T.ok(e.optimization_step == 0 and T.maxdiff(e.shadow[1], p) == 0, "reset: copies of the parameters, step 0")
    T.raises(function() e:step({p}) end, "1 parameters, the average has 2", "step with another parameter count is an error")
end

-- options
T.raises(function() E.EMAModel({}, {decay = 1.5}) end, "decay must be in [0, 1]", "decay above 1 is an error")
T.raises(function() E.EMAModel({}, {decy = 0.9}) end, "unknown option 'decy'", "an unknown option is an error naming it")
T.raises(function() E.EMAModel({}, {update_after_step = 1.5}) end, "update_after_step must be an integer",
    "a fractional update_after_step is an error")
T.raises(function() E.EMAModel({}, {decay = 0.9, min_decay = 0.95}) end, "min_decay must be in [0, decay = 0.9]",
    "min_decay above decay is an error")

T.done()
