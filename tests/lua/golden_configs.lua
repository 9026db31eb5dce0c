-- tests/lua/golden_configs.lua: the driver of test_flux_configs.lua and test_wan_configs.lua.
-- Each case folder (tests/golden/<folder>/<case>, made by diffusers 0.40.0 with the folder's
-- make_golden.py) is loaded with the model class's from_pretrained, then forward + mse + backward
-- in float32 against case.safetensors and in float64 against case_f64exact.safetensors,
-- comparing the output, the loss, every parameter gradient and the input gradients, with the
-- tolerances of test_flux.lua / test_wan.lua (../golden/README.md):
--   float32: output and grad_input rtol 2e-5, loss rel 5e-6, grads rtol 5e-5 (the sinusoidal
--            embedders' linear_1.weight 2e-3), atol 1e-7
--   float64: output, loss, grads and grad_input 1e-9 (embedder linear_1.weight 1e-8), atol 0
-- A parameter diffusers leaves without a gradient (case.json params_without_grad) must get none
-- here either (not zeros: AdamW decays a parameter with a zero gradient and skips one without).
-- The cases are found through tests/lua/golden.lua; a missing case is a failure, never a skip.
--
--   require("golden_configs").run{T =, model = class, folder = "wan_configs",
--       cases = {{name, diffusers' output shape}, ...}, diff_inputs = {...},
--       embedder_w1 = {param name = true, ...}, w1_label = "time embedder",
--       count = function(config) -> parameter count (optional, checked too)}
local nemo = require "nemo"
local json = require "nemo.json"
local golden = require "golden"
local F = nemo.F

local M = {}

M.TOL = {
    float32 = {file = "case.safetensors", output = 2e-5, loss = 5e-6, grads = 5e-5, w1 = 2e-3, grad_input = 2e-5,
               atol = 1e-7},
    float64 = {file = "case_f64exact.safetensors", output = 1e-9, loss = 1e-9, grads = 1e-9, w1 = 1e-8,
               grad_input = 1e-9, atol = 0},
}

local function shape(t) return nemo.Tensor.shape_str(t.shape) end

local function all_zero(t)
    for _, v in ipairs(t:detach():double():contiguous():reshape{-1}:tolist()) do if v ~= 0 then return false end end
    return true
end

-- every parameter gradient against ref's grad.<name>: one test line, naming the worst and every
-- parameter out of tolerance; the parameters in no_grad must have no gradient
local function check_grads(S, model, ref, tol, label, no_grad)
    local T = S.T
    local worst, worst_name, bad, n, nz = 0, "", {}, 0, 0
    local seen = {}
    for name, p in model:named_parameters() do
        n = n + 1
        seen["grad." .. name] = true
        local g = ref["grad." .. name]
        local w1 = S.embedder_w1[name]
        if no_grad[name] then
            nz = nz + 1
            if g ~= nil then bad[#bad + 1] = name .. " (listed without a gradient, but the golden file has one)" end
            if p.grad ~= nil then
                bad[#bad + 1] = name .. " (diffusers gives it no gradient; here it has one" ..
                    (all_zero(p.grad) and ", all zeros)" or ")")
            end
        elseif g == nil or p.grad == nil then
            bad[#bad + 1] = name .. (g == nil and " (no golden grad)" or " (no gradient)")
        else
            local rt = w1 and tol.w1 or tol.grads
            local d, r = T.maxdiff(p.grad, g)
            if not (d <= rt * r + tol.atol) then
                bad[#bad + 1] = string.format("%s: max_abs %.3g > %.3g (rel %.3g)", name, d, rt * r + tol.atol,
                    r > 0 and d / r or d)
            end
            if r > 0 and d / r > worst and not w1 then worst, worst_name = d / r, name end
        end
    end
    for k in pairs(ref) do
        if k:match("^grad%.") and not seen[k] then bad[#bad + 1] = k:sub(6) .. " (golden parameter missing here)" end
    end
    table.sort(bad)
    T.ok(#bad == 0 and n > 0, string.format("%s: all %d parameter gradients within rtol %g * max|ref| + atol %g " ..
        "(%s linear_1.weight rtol %g)%s; worst other rel %.3g (%s)", label, n, tol.grads, tol.atol, S.w1_label, tol.w1,
        nz > 0 and string.format(", %d without a gradient as in diffusers", nz) or "", worst, worst_name),
        table.concat(bad, "\n"))
end

local function inputs_of(S, case, dtype)
    local args = {}
    for k, v in pairs(case) do
        local name = k:match("^input%.(.+)$")
        if name then args[name] = v:to{dtype = dtype, copy = true} end
    end
    for _, k in ipairs(S.diff_inputs) do args[k]:requires_grad_(true) end
    return args
end

local function run_case(S, name, want_shape, dir)
    local T, cls_name = S.T, S.model.__name:match("([^%.]+)$")
    local meta = json.read_file(dir .. "/case.json")
    local ok_load, model = pcall(S.model.from_pretrained, dir)
    if not ok_load then
        T.ok(false, name .. ": " .. cls_name .. ".from_pretrained loads the diffusers folder", model)
        return
    end
    local _, keys = model:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("%s: loads; %d parameter names in diffusers' state_dict order", name, #keys))
    T.ok(model:num_parameters() == meta.num_params and (S.count == nil or S.count(model.config) == meta.num_params),
        string.format("%s: %d parameters (diffusers %d)%s", name, model:num_parameters(), meta.num_params,
            S.count and ", count_parameters(config) agrees" or ""))
    local no_grad = {}
    for _, k in ipairs(meta.params_without_grad or {}) do no_grad[k] = true end

    for _, dt in ipairs {"float32", "float64"} do
        local tol = M.TOL[dt]
        local label = name .. " " .. (dt == "float32" and "f32" or "f64")
        if dt == "float64" then
            model:zero_grad()
            model:to{dtype = "float64"}
        end
        local case = nemo.load_file(dir .. "/" .. tol.file)
        local args = inputs_of(S, case, dt)
        local ok_run, out = pcall(model, args)
        if not ok_run then
            T.ok(false, label .. ": forward runs", out)
        else
            local loss = F.mse_loss(out, case.target)
            loss:backward()
            T.ok(shape(out) == want_shape and out.dtype == dt,
                string.format("%s: output %s %s (diffusers %s)", label, shape(out), out.dtype, want_shape))
            T.close(out, case.output, tol.output, tol.atol, label .. " output")
            local lv, lr = loss:item(), case.loss:reshape{-1}:tolist()[1]
            local rel = math.abs(lv - lr) / math.abs(lr)
            T.ok(rel <= tol.loss, string.format("%s loss %.12g vs %.12g: rel %.3g <= %g", label, lv, lr, rel, tol.loss))
            check_grads(S, model, case, tol, label, no_grad)
            for _, k in ipairs(S.diff_inputs) do
                T.close(args[k].grad, case["grad_input." .. k], tol.grad_input, tol.atol, label .. " grad_input." .. k)
            end
        end
    end
end

function M.run(S)
    for _, c in ipairs(S.cases) do
        local dir, why = golden.case(S.folder .. "/" .. c[1], "case.json")
        if dir then
            run_case(S, c[1], c[2], dir)
        else
            S.T.ok(false, c[1] .. " (diffusers golden case): " .. why)
        end
    end
    S.T.done()
end

return M
