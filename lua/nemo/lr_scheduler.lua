-- lua/nemo/lr_scheduler.lua: Megatron-style learning-rate (and weight-decay) schedule, as
-- Automodel's OptimizerParamScheduler: linear warmup from init_lr to max_lr over
-- lr_warmup_steps, then cosine / linear / constant / inverse-square-root / WSD decay to min_lr
-- at lr_decay_steps, min_lr after that. Automodel's YAML keys (lr_scheduler: block):
--   lr_decay_style (cosine), lr_warmup_steps (min(1000, total/10)), lr_decay_steps (total),
--   init_lr (0.1*lr), max_lr (lr), min_lr (0.01*lr), start_wd / end_wd (the optimizer's),
--   wd_incr_steps (total), wd_incr_style (constant), wsd_decay_steps, lr_wsd_decay_style.
-- step(k) advances k steps and writes lr / weight_decay into the optimizer's param groups.
local M = {}

local Scheduler = {}
Scheduler.__index = Scheduler
M.Scheduler = Scheduler

local KEYS = {lr_warmup_steps = "number", lr_decay_steps = "number", lr_decay_style = "string",
              init_lr = "number", max_lr = "number", min_lr = "number", start_wd = "number", end_wd = "number",
              wd_incr_steps = "number", wd_incr_style = "string", use_checkpoint_opt_param_scheduler = "boolean",
              override_opt_param_scheduler = "boolean", wsd_decay_steps = "number", lr_wsd_decay_style = "string"}
M.KEYS = KEYS
local STYLES = {cosine = true, linear = true, constant = true, ["inverse-square-root"] = true, WSD = true}

-- build(optimizer, cfg, total_steps): cfg is the lr_scheduler YAML block (nil fields take the
-- defaults above). Bad values are errors naming the key.
function M.build(optimizer, cfg, total_steps)
    cfg = cfg or {}
    for k, v in pairs(cfg) do
        if not KEYS[k] then
            local names = {}
            for n in pairs(KEYS) do names[#names + 1] = n end
            table.sort(names)
            error("lr_scheduler: unknown key '" .. tostring(k) .. "' (known keys: " .. table.concat(names, ", ") .. ")", 2)
        end
        if type(v) ~= KEYS[k] then
            error(string.format("lr_scheduler.%s: expected a %s, got %s", k, KEYS[k], tostring(v)), 2)
        end
    end
    if type(total_steps) ~= "number" or total_steps < 1 then
        error("lr_scheduler: the total number of steps must be known and positive (set step_scheduler.max_steps)", 2)
    end
    local w = cfg.lr_warmup_steps
    if w ~= nil and (w < 0 or w % 1 ~= 0) then
        error(string.format("lr_scheduler.lr_warmup_steps must be a whole number of steps, got %s " ..
            "(fractional warmup is not supported)", tostring(w)), 2)
    end
    local g = optimizer.param_groups[1]
    local base_lr, base_wd = g.lr, g.weight_decay or 0
    local s = setmetatable({
        optimizer = optimizer,
        init_lr = cfg.init_lr or base_lr * 0.1,
        max_lr = cfg.max_lr or base_lr,
        min_lr = cfg.min_lr or base_lr * 0.01,
        lr_warmup_steps = w or math.min(1000, math.floor(total_steps / 10)),
        lr_decay_steps = cfg.lr_decay_steps or total_steps,
        lr_decay_style = cfg.lr_decay_style or "cosine",
        start_wd = cfg.start_wd or base_wd,
        end_wd = cfg.end_wd or base_wd,
        wd_incr_steps = cfg.wd_incr_steps or total_steps,
        wd_incr_style = cfg.wd_incr_style or "constant",
        wsd_decay_steps = cfg.wsd_decay_steps,
        lr_wsd_decay_style = cfg.lr_wsd_decay_style,
        num_steps = 0,
    }, Scheduler)
    if not STYLES[s.lr_decay_style] then
        error("lr_scheduler.lr_decay_style: '" .. s.lr_decay_style .. "' is not one of cosine, linear, constant, inverse-square-root, WSD", 2)
    end
    if s.min_lr < 0 then error("lr_scheduler.min_lr must be >= 0", 2) end
    if s.max_lr < s.min_lr then error(string.format("lr_scheduler: max_lr (%g) is below min_lr (%g)", s.max_lr, s.min_lr), 2) end
    if s.init_lr > s.max_lr then error(string.format("lr_scheduler: init_lr (%g) is above max_lr (%g)", s.init_lr, s.max_lr), 2) end
    if s.lr_decay_steps <= 0 then error("lr_scheduler.lr_decay_steps must be positive", 2) end
    if s.lr_warmup_steps >= s.lr_decay_steps then   -- Automodel's OptimizerParamScheduler asserts this too
        local warm, decay = s.lr_warmup_steps, s.lr_decay_steps
        local wtext = w and tostring(w) or string.format("%d, its default min(1000, steps / 10)", warm)
        local suggest = math.floor(decay / 10)
        if cfg.lr_decay_steps then
            error(string.format("lr_scheduler.lr_warmup_steps (%s) must be below lr_scheduler.lr_decay_steps (%d): " ..
                "lower it (e.g. --lr_scheduler.lr_warmup_steps %d) or raise --lr_scheduler.lr_decay_steps above %d " ..
                "(Automodel's OptimizerParamScheduler requires warmup < decay steps too)", wtext, decay, suggest, warm), 2)
        end
        error(string.format("lr_scheduler.lr_warmup_steps (%s) must be below lr_decay_steps, which is not set and so " ..
            "is this run's %d steps: lower it (e.g. --lr_scheduler.lr_warmup_steps %d) or train more than %d steps " ..
            "(Automodel's OptimizerParamScheduler requires warmup < decay steps too)", wtext, decay, suggest, warm), 2)
    end
    if s.lr_decay_style == "WSD" and not s.wsd_decay_steps then error("lr_scheduler: WSD needs wsd_decay_steps", 2) end
    if s.end_wd < s.start_wd then error("lr_scheduler: end_wd must be >= start_wd", 2) end
    if s.wd_incr_style == "constant" and s.start_wd ~= s.end_wd then
        error("lr_scheduler: wd_incr_style constant needs start_wd == end_wd", 2)
    end
    s:step(0)
    return s
end

function Scheduler:get_wd()
    if self.num_steps > self.wd_incr_steps then return self.end_wd end
    if self.wd_incr_style == "constant" then return self.end_wd end
    local r = self.num_steps / self.wd_incr_steps
    local coeff
    if self.wd_incr_style == "linear" then coeff = r
    elseif self.wd_incr_style == "cosine" then coeff = 0.5 * (math.cos(math.pi * (1 - r)) + 1)
    else error("lr_scheduler.wd_incr_style: '" .. self.wd_incr_style .. "' is not one of constant, linear, cosine", 2) end
    return self.start_wd + coeff * (self.end_wd - self.start_wd)
end

function Scheduler:get_lr(group)
    local max_lr = group and group.max_lr or self.max_lr
    local min_lr = group and group.min_lr or self.min_lr
    local n = self.num_steps
    if self.lr_warmup_steps > 0 and n <= self.lr_warmup_steps then
        return self.init_lr + (max_lr - self.init_lr) * n / self.lr_warmup_steps
    end
    if self.lr_decay_style == "constant" then return max_lr end
    if n > self.lr_decay_steps then return min_lr end
    if self.lr_decay_style == "inverse-square-root" then
        local w = math.max(self.lr_warmup_steps, 1)
        return math.max(min_lr, max_lr * math.sqrt(w) / math.sqrt(math.max(n, 1)))
    end
    local ratio = (n - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
    local coeff
    if self.lr_decay_style == "linear" then coeff = 1 - ratio
    elseif self.lr_decay_style == "cosine" then coeff = 0.5 * (math.cos(math.pi * ratio) + 1)
    else -- WSD
        local start = self.lr_decay_steps - self.wsd_decay_steps
        if n <= start then coeff = 1
        else
            local r = (n - start) / self.wsd_decay_steps
            local st = self.lr_wsd_decay_style or "linear"
            if st == "linear" then coeff = 1 - r
            elseif st == "cosine" then coeff = 0.5 * (math.cos(math.pi * r) + 1)
            elseif st == "exponential" then coeff = 2 * 0.5 ^ r - 1
            elseif st == "minus_sqrt" then coeff = 1 - math.sqrt(r)
            else error("lr_scheduler.lr_wsd_decay_style: '" .. st .. "' is not supported", 2) end
        end
    end
    return min_lr + coeff * (max_lr - min_lr)
end

function Scheduler:step(k)
    self.num_steps = self.num_steps + (k or 1)
    local wd = self:get_wd()
    for _, g in ipairs(self.optimizer.param_groups) do
        g.lr = self:get_lr(g) * (g.lr_mult or 1)
        g.weight_decay = wd * (g.wd_mult or 1)
    end
end

function Scheduler:get_last_lr() return self.optimizer.param_groups[1].lr end

function Scheduler:state_dict()
    return {max_lr = self.max_lr, min_lr = self.min_lr, init_lr = self.init_lr, lr_warmup_steps = self.lr_warmup_steps,
            num_steps = self.num_steps, lr_decay_style = self.lr_decay_style, lr_decay_steps = self.lr_decay_steps,
            start_wd = self.start_wd, end_wd = self.end_wd, wd_incr_style = self.wd_incr_style,
            wd_incr_steps = self.wd_incr_steps}
end

function Scheduler:load_state_dict(sd)
    for k, v in pairs(sd) do self[k] = v end
    self:step(0)
end

-- A constant schedule (no lr_scheduler block): lr stays at the optimizer's.
function M.constant(optimizer)
    local s = setmetatable({optimizer = optimizer, num_steps = 0}, {__index = {
        step = function(self, k) self.num_steps = self.num_steps + (k or 1) end,
        get_last_lr = function(self) return self.optimizer.param_groups[1].lr end,
        state_dict = function(self) return {num_steps = self.num_steps, constant = true} end,
        load_state_dict = function(self, sd) self.num_steps = sd.num_steps or 0 end,
    }})
    return s
end

return M
