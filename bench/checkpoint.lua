-- bench/checkpoint.lua: how long a checkpoint save stops training, synchronous against
-- checkpoint.is_async (nemo.safetensors.in_background). A state of float32 tensors like a
-- model's weights and AdamW's two moments is written as three safetensors files (fsync'ed, as
-- checkpoints are), and the table gives the seconds the training loop waits: the whole write
-- (sync), or the host copies (async), plus how long the background write took while the loop
-- went on (matrix products standing in for training steps). Prints a table; asserts nothing.
--   nemo-lua bench/checkpoint.lua [--quick] [--mib N] [--dir FOLDER]
-- Default: a 1 GiB state (weights 341 MiB); --quick: 48 MiB; --dir: where to write
-- (default a temporary folder, removed after).
local nemo = require "nemo"
local st = require "nemo.safetensors"
local fs = require "nemo.fs"
local clock = require("nemo.dist").wtime

local o = {mib = 1024}
local argv = arg or {}
local i = 1
while i <= #argv do
    local a = argv[i]
    if a == "--quick" then o.mib = 48
    elseif a == "--mib" then o.mib = tonumber(argv[i + 1]); i = i + 1
    elseif a == "--dir" then o.dir = argv[i + 1]; i = i + 1
    else error("checkpoint bench: unknown argument '" .. tostring(a) .. "' (--quick, --mib N, --dir D)", 0) end
    i = i + 1
end
local dir = o.dir or (os.tmpname() .. ".d")
fs.mkdirs(dir)

-- the state: 3 groups (weights, exp_avg, exp_avg_sq) of 16 tensors each
local per = math.floor(o.mib * 2^20 / 4 / 3 / 16)
local groups = {}
for gi, name in ipairs {"model", "exp_avg", "exp_avg_sq"} do
    local t = {}
    for k = 1, 16 do t[string.format("%s.%02d", name, k)] = nemo.randn({per}, {generator = nemo.Generator(gi * 100 + k)}) end
    groups[#groups + 1] = {name = name, tensors = t}
end
local function write_all()
    for _, g in ipairs(groups) do st.save_file(g.tensors, dir .. "/" .. g.name .. ".safetensors", {format = "pt"}) end
end
-- a stand-in for training: products until `secs` have passed, or `until_fn` says stop
local a, b = nemo.randn({256, 256}), nemo.randn({256, 256})
local function work(until_fn)
    local n = 0
    while not until_fn() do nemo.no_grad(function() return a:matmul(b) end); n = n + 1 end
    return n
end

write_all()   -- warm the page cache and the file system once
local t0 = clock()
write_all()
local sync_s = clock() - t0

t0 = clock()
local jobs = st.in_background(write_all)
local stall = clock() - t0
local bg_start = clock()
-- training goes on; the loop looks at the clock and stops the stand-in once the sync time passed,
-- then joins (the next save's settle)
work(function() return clock() - bg_start >= sync_s end)
local t1 = clock()
st.wait(jobs)
local join_wait = clock() - t1
local total = clock() - t0

io.write(string.format("checkpoint save of a %d MiB float32 state (3 files, fsync'ed) in %s\n", o.mib, dir))
io.write(string.format("%-34s %10s\n", "", "seconds"))
io.write(string.format("%-34s %10.3f\n", "sync: training waits", sync_s))
io.write(string.format("%-34s %10.3f\n", "async: training waits (copies)", stall))
io.write(string.format("%-34s %10.3f\n", "async: left to join after 1 save", join_wait))
io.write(string.format("%-34s %10.3f\n", "async: copies + write + join", total))
if not o.dir then fs.remove_tree(dir) end
