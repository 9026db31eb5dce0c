-- tests/sh/lib/compare_ckpt.lua A B: prints "maxrel X n N" where X is the largest over trainable
-- tensors of max|a - b| / max|b| between the weights of checkpoints A and B (each consolidated
-- model/model.safetensors, FSDP2 shards of any number of ranks, or a LoRA checkpoint's
-- model/adapter_model.safetensors), and N the tensors compared;
-- "missing NAME" for a tensor only B has. For test_train_dist.sh.
local nemo = require "nemo"
local fs = require "nemo.fs"
local fsdp2 = require "nemo.parallel.fsdp2"
local function weights(dir)
    if fs.isfile(dir .. "/model/model.safetensors") then return nemo.load_file(dir .. "/model/model.safetensors") end
    if fs.isfile(dir .. "/model/adapter_model.safetensors") then   -- a LoRA checkpoint: its adapters
        return nemo.load_file(dir .. "/model/adapter_model.safetensors")
    end
    return (fsdp2.load_full(dir))
end
local a, b = weights(arg[1]), weights(arg[2])
local worst, n = 0, 0
for k, tb in pairs(b) do
    local ta = a[k]
    if not ta then print("missing " .. k) else
        n = n + 1
        local m = tb:double():abs():max():item()
        local d = (ta:double() - tb:double()):abs():max():item()
        local r = m > 0 and d / m or d
        if r ~= r then r = math.huge end
        if r > worst then worst = r end
    end
end
print(string.format("maxrel %.3e n %d", worst, n))
