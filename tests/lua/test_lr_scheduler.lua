-- LR schedules (Megatron-style, as Automodel's OptimizerParamScheduler).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local lrs = require "nemo.lr_scheduler"

local function opt(lr, wd) return nemo.optim.AdamW({nemo.zeros(1):requires_grad_()}, {lr = lr, weight_decay = wd or 0.01}) end

local o = opt(1e-3)
local s = lrs.build(o, {lr_decay_style = "cosine", lr_warmup_steps = 10, min_lr = 1e-5}, 110)
T.near(o.param_groups[1].lr, 1e-4, 1e-15, "step 0: init_lr defaults to 0.1*lr")
s:step(5)
T.near(o.param_groups[1].lr, 1e-4 + (1e-3 - 1e-4) * 0.5, 1e-15, "warmup is linear")
s:step(5)
T.near(o.param_groups[1].lr, 1e-3, 1e-15, "end of warmup: max_lr")
s:step(50)
T.near(o.param_groups[1].lr, 1e-5 + 0.5 * (1e-3 - 1e-5), 1e-15, "cosine halfway")
s:step(50)
T.near(o.param_groups[1].lr, 1e-5, 1e-15, "cosine ends at min_lr")
s:step(5)
T.near(o.param_groups[1].lr, 1e-5, 1e-15, "after decay: min_lr")

local o2 = opt(2e-4)
local s2 = lrs.build(o2, {lr_decay_style = "linear", lr_warmup_steps = 0}, 100)
T.near(o2.param_groups[1].lr, 2e-4, 1e-15, "no warmup: starts at max_lr")
s2:step(50)
T.near(o2.param_groups[1].lr, 2e-6 + 0.5 * (2e-4 - 2e-6), 1e-15, "linear halfway (min_lr defaults to 0.01*lr)")
local o3 = opt(1e-3)
local s3 = lrs.build(o3, {lr_decay_style = "constant", lr_warmup_steps = 4}, 100)
s3:step(50)
T.near(o3.param_groups[1].lr, 1e-3, 1e-15, "constant after warmup")
local o4 = opt(1e-3)
lrs.build(o4, {}, 200)
T.near(o4.param_groups[1].lr, 1e-4, 1e-15, "defaults: warmup min(1000, total/10) starting at 0.1*lr")

-- state round trip
local o5 = opt(1e-3)
local s5 = lrs.build(o5, {lr_warmup_steps = 3}, 50)
s5:step(7)
local o6 = opt(1e-3)
local s6 = lrs.build(o6, {lr_warmup_steps = 3}, 50)
s6:load_state_dict(s5:state_dict())
T.near(o6.param_groups[1].lr, o5.param_groups[1].lr, 0, "state_dict round trip restores the lr")

T.raises(function() lrs.build(opt(1e-3), {lr_warmup_steps = 0.5}, 100) end, "whole number of steps", "fractional warmup refused")
T.raises(function() lrs.build(opt(1e-3), {lr_decay_style = "cosin"}, 100) end, "is not one of", "unknown style")
T.raises(function() lrs.build(opt(1e-3), {warmup = 3}, 100) end, "unknown key 'warmup'", "unknown key")
T.raises(function() lrs.build(opt(1e-3), {lr_warmup_steps = 100}, 100) end, "must be below lr_decay_steps", "warmup >= decay")
T.raises(function() lrs.build(opt(1e-3), {min_lr = "1e-5"}, 100) end, "expected a number", "string value")
T.done()
