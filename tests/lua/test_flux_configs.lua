-- tests/lua/test_flux_configs.lua: FluxTransformer2DModel against real diffusers output for
-- configurations other than flux_tiny / flux_tiny_guidance (tests/golden/flux_configs, made by
-- diffusers 0.40.0 with tests/golden/flux_configs/make_golden.py; see its README.md):
--   flux_blocks23_batch2     2 double + 3 single blocks, batch 2 with two timesteps, no guidance,
--                            non-square 3x5 grid, in_channels 8
--   flux_guidance_batch2     guidance_embeds, batch 2 with guidance 1.0 / 4.5 and two timesteps,
--                            1 head x 16, non-square 4x6 grid, fewer text than image tokens
--   flux_rope8_12_12         head dim 32 with axes_dims_rope (8,12,12), num_layers 0 (single blocks
--                            only), img ids (1,row,col), fractional / negative text ids
--   flux_patch2_out_ne_in    patch_size 2, in_channels 8, out_channels 3 (proj_out 12 wide), 80
--                            text tokens against 6 image tokens
--   flux_double_only_batch3  num_single_layers 0 (the last double block's text branch gets no
--                            gradient), batch 3, per-sample guidance, random ids
-- Each case folder is loaded with FluxTransformer2DModel.from_pretrained, then forward + mse +
-- backward in float32 against case.safetensors and in float64 against case_f64exact.safetensors,
-- comparing the output, the loss, every parameter gradient and the input gradients, with
-- test_flux.lua's tolerances (../golden/README.md):
--   float32: output and grad_input rtol 2e-5, loss rel 5e-6, grads rtol 5e-5 (time / guidance
--            embedder linear_1.weight 2e-3), atol 1e-7
--   float64: output, loss, grads and grad_input 1e-9 (embedder linear_1.weight 1e-8), atol 0
-- A parameter diffusers leaves without a gradient (case.json params_without_grad: the last double
-- block's text branch when there are no single blocks) must get none here either (not zeros:
-- AdamW decays a parameter with a zero gradient and skips one without).
-- The cases are found through tests/lua/golden.lua ($NEMO_GOLDEN, else tests/golden, else
-- ../shared/golden) as flux_configs/<case>; a missing case is a failure, never a skip.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local flux = require "nemo.models.flux"
local json = require "nemo.json"
local golden = require "golden"
local Flux = flux.FluxTransformer2DModel

-- name, diffusers' output shape
local CASES = {
    {"flux_blocks23_batch2", "(2, 15, 8)"},
    {"flux_guidance_batch2", "(2, 24, 4)"},
    {"flux_rope8_12_12", "(1, 12, 4)"},
    {"flux_patch2_out_ne_in", "(1, 6, 12)"},
    {"flux_double_only_batch3", "(3, 10, 4)"},
}

local TOL = {
    float32 = {file = "case.safetensors", output = 2e-5, loss = 5e-6, grads = 5e-5, w1 = 2e-3, grad_input = 2e-5,
               atol = 1e-7},
    float64 = {file = "case_f64exact.safetensors", output = 1e-9, loss = 1e-9, grads = 1e-9, w1 = 1e-8,
               grad_input = 1e-9, atol = 0},
}

local DIFF_INPUTS = {"hidden_states", "encoder_hidden_states", "pooled_projections"}

-- ==== helpers (as in test_flux.lua) ====

local function flat(t) return t:detach():double():contiguous():reshape{-1}:tolist() end



local function shape(t) return nemo.Tensor.shape_str(t.shape) end

-- the sinusoidal embedders' first layers (timestep and guidance), whose float32 gradients carry
-- the phase error of the float32 frequencies (../golden/README.md)
local function is_embedder_w1(name)
    return name == "time_text_embed.timestep_embedder.linear_1.weight" or
        name == "time_text_embed.guidance_embedder.linear_1.weight"
end

local function all_zero(t)
    for _, v in ipairs(flat(t)) do if v ~= 0 then return false end end
    return true
end

-- every parameter gradient against ref's grad.<name>: one test line, naming the worst and every
-- parameter out of tolerance; the parameters in no_grad (diffusers' p.grad None) must have no
-- gradient
local function check_grads(model, ref, tol, label, no_grad)
    local worst, worst_name, bad, n, nz = 0, "", {}, 0, 0
    local seen = {}
    for name, p in model:named_parameters() do
        n = n + 1
        seen["grad." .. name] = true
        local g = ref["grad." .. name]
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
        "(embedder linear_1.weight rtol %g)%s; worst other rel %.3g (%s)", label, n, tol.grads, tol.atol, tol.w1,
        nz > 0 and string.format(", %d without a gradient as in diffusers", nz) or "", worst, worst_name),
        table.concat(bad, "\n"))
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
    local ok_load, model = pcall(Flux.from_pretrained, dir)
    if not ok_load then
        T.ok(false, name .. ": FluxTransformer2DModel.from_pretrained loads the diffusers folder", model)
        return
    end
    local _, keys = model:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("%s: loads; %d parameter names in diffusers' state_dict order", name, #keys))
    T.ok(model:num_parameters() == meta.num_params,
        string.format("%s: %d parameters (diffusers %d)", name, model:num_parameters(), meta.num_params))
    local no_grad = {}
    for _, k in ipairs(meta.params_without_grad or {}) do no_grad[k] = true end

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
            check_grads(model, case, tol, label, no_grad)
            for _, k in ipairs(DIFF_INPUTS) do
                T.close(args[k].grad, case["grad_input." .. k], tol.grad_input, tol.atol, label .. " grad_input." .. k)
            end
        end
    end
end

-- ==== the cases ====

for _, c in ipairs(CASES) do
    local name = c[1]
    local dir, why = golden.case("flux_configs/" .. name, "case.json")
    if dir then
        run_case(name, c[2], dir)
    else
        T.ok(false, name .. " (diffusers golden case): " .. why)
    end
end

T.done()
