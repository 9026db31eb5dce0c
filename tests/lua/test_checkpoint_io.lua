-- lua/nemo/checkpoint.lua on a small model: save/load round trip (weights, AdamW state, LR
-- schedule, trainer state), the folder layout, LATEST, latest() and resolve() rules, retention
-- (prune), leftover *.incomplete folders, and that a failed save publishes nothing.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local lrs = require "nemo.lr_scheduler"
local checkpoint = require "nemo.checkpoint"

local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp)

local function setup(seed)
    nemo.manual_seed(seed)
    local model = nemo.nn.Sequential(nemo.nn.Linear(5, 7), nemo.nn.Linear(7, 3))
    local opt = nemo.optim.AdamW(model:parameters(), {lr = 1e-2})
    local sched = lrs.build(opt, {lr_warmup_steps = 2, min_lr = 1e-3}, 20)
    return model, opt, sched
end

local function train_steps(model, opt, sched, n)
    for i = 1, n do
        opt:zero_grad()
        local x = nemo.randn({4, 5}, {generator = nemo.Generator(i)})
        local loss = (model(x) ^ 2):mean()
        loss:backward()
        opt:step()
        sched:step(1)
    end
end

local model, opt, sched = setup(1)
train_steps(model, opt, sched, 3)
local root = tmp .. "/ck"
local dir = checkpoint.save(root, {epoch = 0, step = 2, model = model, optimizer = opt, scheduler = sched,
    trainer = {sampler = {epoch = 0, batch_index = 3}, note = "x"}, config = {a = 1}, model_config = {width = 7}})
T.is(dir, root .. "/epoch_0_step_2", "save returns <root>/epoch_E_step_S")
for _, f in ipairs { "model/model.safetensors", "model/config.json", "optim/optim.safetensors", "optim/state.json",
                     "trainer.json", "config.yaml" } do
    T.ok(fs.isfile(dir .. "/" .. f), "layout: " .. f)
end
T.is(checkpoint.read_latest(root), "epoch_0_step_2", "LATEST names the new checkpoint")
T.ok(not fs.exists(dir .. ".incomplete"), "no *.incomplete folder left after a save")
T.ok(checkpoint.is_complete(dir), "is_complete")
T.is(checkpoint.model_config(dir).width, 7, "model_config")
local tr = checkpoint.trainer_state(dir)
T.ok(tr.step == 2 and tr.epoch == 0 and tr.sampler.batch_index == 3 and tr.note == "x", "trainer.json: step, epoch and the caller's fields")

-- load into a differently initialised model: everything equal
local m2, o2, s2 = setup(99)
local tr2 = checkpoint.load(dir, {model = m2, optimizer = o2, scheduler = s2})
T.is(tr2.step, 2, "load returns trainer.json")
local p1, p2 = model:parameters(), m2:parameters()
local same = #p1 == #p2
for i = 1, #p1 do if (p1[i] - p2[i]):abs():max():item() ~= 0 then same = false end end
T.ok(same, "load: weights bitwise equal")
local st_same = true
for i = 1, #p1 do
    local a, b = opt.state[p1[i]], o2.state[p2[i]]
    if not b or a.step ~= b.step or (a.exp_avg - b.exp_avg):abs():max():item() ~= 0 or
        (a.exp_avg_sq - b.exp_avg_sq):abs():max():item() ~= 0 then st_same = false end
end
T.ok(st_same, "load: AdamW moments and step counts bitwise equal")
T.ok(s2.num_steps == 3 and o2.param_groups[1].lr == opt.param_groups[1].lr, "load: LR schedule position and lr")
-- continuing both gives the same numbers
train_steps(model, opt, sched, 2)
train_steps(m2, o2, s2, 2)
same = true
for i = 1, #p1 do if (p1[i] - p2[i]):abs():max():item() ~= 0 then same = false end end
T.ok(same, "two more steps after load: bitwise equal to the uninterrupted model")

-- errors on load
local other = nemo.nn.Sequential(nemo.nn.Linear(5, 8), nemo.nn.Linear(8, 3))
T.raises(function() checkpoint.load(dir, {model = other, optimizer = nemo.optim.AdamW(other:parameters()), scheduler = nil}) end,
    "checkpoint " .. dir .. ": .*shape mismatch", "load into another architecture names the checkpoint and the shapes")

-- a failed save publishes nothing
local dir3 = checkpoint.save(root, {epoch = 0, step = 4, model = model, optimizer = opt, scheduler = sched})
T.raises(function()
    checkpoint.save(root, {epoch = 1, step = 9, model = model, optimizer = opt, scheduler = sched,
        extra = function() error("disk full") end})
end, "saving " .. root .. "/epoch_1_step_9 failed: .*disk full", "a failing save raises naming the checkpoint")
T.ok(not fs.exists(root .. "/epoch_1_step_9") and not fs.exists(root .. "/epoch_1_step_9.incomplete"),
    "a failed save leaves neither the checkpoint nor its *.incomplete folder")
T.is(checkpoint.read_latest(root), "epoch_0_step_4", "a failed save leaves LATEST on the previous checkpoint")
-- saving the same step again replaces it
local again = checkpoint.save(root, {epoch = 0, step = 4, model = model, optimizer = opt, scheduler = sched,
    trainer = {again = true}})
T.ok(again == dir3 and checkpoint.trainer_state(again).again == true and not fs.exists(dir3 .. ".old.incomplete"),
    "saving an existing step replaces it")

-- latest(): LATEST when it names a complete folder, else the highest complete step
fs.copy_tree(dir3, root .. "/epoch_2_step_20.incomplete")
T.is(checkpoint.latest(root), root .. "/epoch_0_step_4", "latest: LATEST")
local f = assert(io.open(root .. "/LATEST", "wb")); f:write("epoch_0_step_2\n"); f:close()
T.is(checkpoint.latest(root), root .. "/epoch_0_step_2", "latest: LATEST wins even over a higher step")
os.remove(root .. "/LATEST")
T.is(checkpoint.latest(root), root .. "/epoch_0_step_4", "latest without LATEST: the highest complete step, never *.incomplete")
fs.mkdirs(root .. "/epoch_3_step_30")
T.is(checkpoint.latest(root), root .. "/epoch_0_step_4", "latest: a folder without its files is not a checkpoint")
T.is(#checkpoint.list(root), 2, "list: the complete checkpoints only")
T.is(checkpoint.latest(tmp .. "/nowhere"), nil, "latest of a missing folder is nil")

-- resolve()
T.is(checkpoint.resolve(nil, root), nil, "resolve(nil)")
T.is(checkpoint.resolve("LATEST", root), root .. "/epoch_0_step_4", "resolve('LATEST')")
T.is(checkpoint.resolve("LATEST", tmp .. "/empty"), nil, "resolve('LATEST') with no checkpoint: nil")
T.is(checkpoint.resolve("epoch_0_step_2", root), root .. "/epoch_0_step_2", "resolve(name)")
T.is(checkpoint.resolve(root .. "/epoch_0_step_2/", "elsewhere"), root .. "/epoch_0_step_2", "resolve(path)")
T.is(checkpoint.resolve(root, "elsewhere"), root .. "/epoch_0_step_4", "resolve(a checkpoint_dir): its newest")
checkpoint.save(root, {epoch = 0, step = 5, model = model, optimizer = opt})
T.is(checkpoint.resolve(root .. "/LATEST", nil), root .. "/epoch_0_step_5", "resolve(<dir>/LATEST): the checkpoint it names")
T.raises(function() checkpoint.resolve("epoch_2_step_20.incomplete", root) end, "is an incomplete checkpoint",
    "resolve(*.incomplete) is an error")
T.raises(function() checkpoint.resolve("epoch_3_step_30", root) end, "is not a complete checkpoint (missing: model/model.safetensors",
    "resolve(a folder without its files) names what is missing")
T.raises(function() checkpoint.resolve("epoch_9_step_99", root) end, "no checkpoint at 'epoch_9_step_99'",
    "resolve(a missing name) is an error")

-- clean_incomplete and prune
local removed = checkpoint.clean_incomplete(root)
T.ok(#removed == 1 and removed[1] == "epoch_2_step_20.incomplete" and not fs.exists(root .. "/epoch_2_step_20.incomplete"),
    "clean_incomplete removes leftover *.incomplete folders")
f = assert(io.open(root .. "/LATEST", "wb")); f:write("epoch_0_step_2\n"); f:close()
local pr = checkpoint.prune(root, 1)
T.is(table.concat(pr, ","), "epoch_0_step_4", "prune(1): removes the older ones but keeps the one LATEST names")
T.ok(fs.isdir(root .. "/epoch_0_step_2") and fs.isdir(root .. "/epoch_0_step_5"), "prune keeps the newest and LATEST's")
T.raises(function() checkpoint.prune(root, 0) end, "keep must be a positive integer", "prune(0) is an error")
T.is(#checkpoint.prune(root, nil), 0, "prune(nil) keeps everything")
T.ok(checkpoint.parse("epoch_3_step_41") == 3 and select(2, checkpoint.parse("epoch_3_step_41")) == 41 and
    checkpoint.parse("epoch_3_step_41.incomplete") == nil, "parse(name)")
local _ = json

fs.remove_tree(tmp)
T.done()
