package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local ag = nemo.autograd
local function block(h, e, w)
  local a = (h * w):tanh() + e:sin()
  local b = (e * w):sigmoid() * h
  return {a * 2, b + a}
end
local function run(ck)
  local w = nemo.randn({5}, {generator = nemo.Generator(1), dtype="float64"}):requires_grad_()
  local x = nemo.randn({3, 5}, {generator = nemo.Generator(2), dtype="float64"}):requires_grad_()
  local t = (x * 1.5):exp()
  local h, e = x * 2, t + 1
  for i = 1, 3 do
    local r = ck and ag.checkpoint(block, h, e, w) or block(h, e, w)
    h, e = r[1], r[2]
  end
  local out = (h * e):sin() * t
  out:backward(nemo.ones(3, 5, {dtype="float64"}))
  return w.grad:tolist(), x.grad:tolist()
end
local w1, x1 = run(false)
local w2, x2 = run(true)
local same = true
for i = 1, 5 do if w1[i] ~= w2[i] then same = false end end
for i = 1, 3 do for j = 1, 5 do if x1[i][j] ~= x2[i][j] then same = false; print(x1[i][j] - x2[i][j]) end end end
T.ok(same, "gradients with checkpointing are bitwise equal to those without (3 chained segments, 2 outputs each)")

-- the checkpointed forward keeps only the segment inputs: peak memory during forward is lower
local function peak_of(ck)
    collectgarbage(); collectgarbage()
    local w = nemo.randn({256, 256}, {generator = nemo.Generator(3)}):requires_grad_()
    local function seg(h) return ((h * w):tanh() * w):sigmoid() * w end
    nemo.reset_peak_memory_stats()
    local base = nemo.memory_stats().current
    local h = w * 1
    for _ = 1, 4 do h = ck and ag.checkpoint(seg, h) or seg(h) end
    collectgarbage(); collectgarbage()
    local held = nemo.memory_stats().current - base
    h:backward(nemo.ones(256, 256))
    return held, w.grad
end
local full, g1 = peak_of(false)
local ck, g2 = peak_of(true)
T.ok(ck < full / 2, string.format("activations held after forward: %d bytes with checkpointing vs %d without", ck, full))
T.close(g2, g1, 0, 0, "same gradient with and without checkpointing (256x256, 4 segments)")

-- random draws inside a segment are replayed identically during recomputation
local wr = nemo.randn({50}, {dtype = "float64"}):requires_grad_()
local function noisy(h) return h * nemo.rand({50}, {dtype = "float64"}) end
nemo.manual_seed(11)
local y = ag.checkpoint(noisy, wr * 1)
y:backward(nemo.ones(50, {dtype = "float64"}))
nemo.manual_seed(11)
local mask = nemo.rand({50}, {dtype = "float64"})
T.close(wr.grad, mask, 0, 0, "RNG state is restored for the recomputation")
T.ok(nemo.rand({1}):numel() == 1, "default generator usable afterwards")

T.done()
