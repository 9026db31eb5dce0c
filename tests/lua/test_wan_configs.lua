-- tests/lua/test_wan_configs.lua: WanTransformer3DModel against real diffusers output for
-- configurations other than wan_tiny (tests/golden/wan_configs, made by diffusers 0.40.0 with
-- tests/golden/wan_configs/make_golden.py; see its README.md):
--   wan_patch222            patch (2,2,2), 6 latent frames, non-square grid, head dim 16
--   wan_batch2              batch 2, a different timestep / latents / text per sample, 3 heads x 10
--   wan_no_cross_attn_norm  cross_attn_norm false (norm2 = Identity)
--   wan_out_ne_in           in_channels 3, out_channels 5
--   wan_ti2v_misc           per-token (B, L) timestep, batch 2, patch (2,1,2), out_channels null,
--                           qk_norm null, eps 1e-5
-- Each case folder is loaded with Wan.from_pretrained, then forward + mse + backward in float32
-- against case.safetensors and in float64 against case_f64exact.safetensors, comparing the output,
-- the loss, every parameter gradient and the input gradients, with test_wan.lua's wan_tiny
-- tolerances (../golden/README.md):
--   float32: output and grad_input rtol 2e-5, loss rel 5e-6, grads rtol 5e-5 (time embedder
--            linear_1.weight 2e-3), atol 1e-7
--   float64: output, loss, grads and grad_input 1e-9 (time embedder linear_1.weight 1e-8), atol 0
-- The cases are found through tests/lua/golden.lua ($NEMO_GOLDEN, else tests/golden, else
-- ../shared/golden); a missing case is a failure, never a skip.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local wan = require "nemo.models.wan"
local json = require "nemo.json"
local golden = require "golden"
local Wan = wan.WanTransformer3DModel

local CASES = {
    {"wan_patch222", "(1, 4, 6, 8, 12)"},
    {"wan_batch2", "(2, 4, 3, 6, 8)"},
    {"wan_no_cross_attn_norm", "(1, 4, 3, 8, 8)"},
    {"wan_out_ne_in", "(1, 5, 2, 6, 10)"},
    {"wan_ti2v_misc", "(2, 2, 4, 3, 4)"},
}

local TOL = {
    float32 = {file = "case.safetensors", output = 2e-5, loss = 5e-6, grads = 5e-5, w1 = 2e-3, grad_input = 2e-5,
               atol = 1e-7},
    float64 = {file = "case_f64exact.safetensors", output = 1e-9, loss = 1e-9, grads = 1e-9, w1 = 1e-8,
               grad_input = 1e-9, atol = 0},
}

local DIFF_INPUTS = {"hidden_states", "encoder_hidden_states"}

-- ==== helpers (as in test_wan.lua) ====

local function flat(t) return t:detach():double():contiguous():reshape{-1}:tolist() end



local function shape(t) return nemo.Tensor.shape_str(t.shape) end

local function is_embedder_w1(name) return name == "condition_embedder.time_embedder.linear_1.weight" end

-- every parameter gradient against ref's grad.<name>: one test line, naming the worst and every
-- parameter out of tolerance
local function check_grads(model, ref, tol, label)
    local worst, worst_name, bad, n = 0, "", {}, 0
    local seen = {}
    for name, p in model:named_parameters() do
        n = n + 1
        seen["grad." .. name] = true
        local g = ref["grad." .. name]
        if g == nil or p.grad == nil then
            bad[#bad + 1] = name .. (g == nil and " (no golden grad)" or " (no gradient)")
        else
            local rt = is_embedder_w1(name) and tol.w1 or tol.grads
            local d, r = T.maxdiff(p.grad, g)
            if not (d <= rt * r + tol.atol) then
                bad[#bad + 1] = string.format("%s: max_abs %.3g > %.3g (rel %.3g)", name, d, rt * r + tol.atol,
                    r > 0 and d / r or d)
            end
            if r > 0 and d / r > worst and not is_embedder_w1(name) then worst, worst_name = d / r, name end
        end
    end
    for k in pairs(ref) do
        if k:match("^grad%.") and not seen[k] then bad[#bad + 1] = k:sub(6) .. " (golden parameter missing here)" end
    end
    table.sort(bad)
    T.ok(#bad == 0 and n > 0, string.format("%s: all %d parameter gradients within rtol %g * max|ref| + atol %g " ..
        "(time embedder linear_1.weight rtol %g); worst other rel %.3g (%s)", label, n, tol.grads, tol.atol, tol.w1,
        worst, worst_name), table.concat(bad, "\n"))
end

local function inputs_of(case, dtype)
    local args = {}
    for k, v in pairs(case) do
        local name = k:match("^input%.(.+)$")
        if name then args[name] = v:to{dtype = dtype, copy = true} end
    end
    for _, k in ipairs(DIFF_INPUTS) do args[k]:requires_grad_(true) end
    return args
end

-- ==== one case ====

local function run_case(name, want_shape, dir)
    local meta = json.read_file(dir .. "/case.json")
    local ok_load, model = pcall(Wan.from_pretrained, dir)
    if not ok_load then
        T.ok(false, name .. ": Wan.from_pretrained loads the diffusers folder", model)
        return
    end
    local _, keys = model:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("%s: loads; %d parameter names in diffusers' state_dict order", name, #keys))
    T.ok(model:num_parameters() == meta.num_params and select(1, wan.count_parameters(model.config)) == meta.num_params,
        string.format("%s: %d parameters (diffusers %d), count_parameters(config) agrees", name, model:num_parameters(),
            meta.num_params))

    for _, dt in ipairs {"float32", "float64"} do
        local tol = TOL[dt]
        local label = name .. " " .. (dt == "float32" and "f32" or "f64")
        if dt == "float64" then
            model:zero_grad()
            model:to{dtype = "float64"}
        end
        local case = nemo.load_file(dir .. "/" .. tol.file)
        local args = inputs_of(case, dt)
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
            check_grads(model, case, tol, label)
            for _, k in ipairs(DIFF_INPUTS) do
                T.close(args[k].grad, case["grad_input." .. k], tol.grad_input, tol.atol, label .. " grad_input." .. k)
            end
        end
    end
end

-- ==== the cases ====

for _, c in ipairs(CASES) do
    local name = c[1]
    local dir, why = golden.case("wan_configs/" .. name, "case.json")
    if dir then
        run_case(name, c[2], dir)
    else
        T.ok(false, name .. " (diffusers golden case): " .. why)
    end
end

T.done()
