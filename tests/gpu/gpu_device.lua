-- tests/gpu/gpu_device.lua: the device a GPU script runs on, shared by check_golden.lua and
-- check_train.lua. NEMO_GPU_DEVICE picks it (default cuda:0; "cpu" runs the script as a dry
-- run). Without a usable CUDA device the script ends here: a SKIP plan and exit 0, or a
-- "Bail out!" and exit 1 when NEMO_EXPECT_CUDA=1 (as run.sh sets).
--   local DEV, ON_CUDA = require("gpu_device")(nemo)
return function(nemo)
    local dev = os.getenv("NEMO_GPU_DEVICE") or "cuda:0"
    local on_cuda = dev:match("^cuda") ~= nil
    if on_cuda and not (nemo.cuda and nemo.cuda.is_available()) then
        local why = tostring(nemo.cuda and nemo.cuda.unavailable_reason() or "no nemo.cuda")
        if os.getenv("NEMO_EXPECT_CUDA") == "1" then
            io.write("1..0\nBail out! no CUDA device: ", why, "\n")
            os.exit(1)
        end
        io.write("1..0 # SKIP no CUDA device: ", why, "\n")
        os.exit(0)
    end
    return dev, on_cuda
end
