-- YAML configs through libyaml: typed scalars, anchors, merge keys, errors naming file and line.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local yaml = require "nemo.yaml"

local doc = yaml.load([[
model:
  pretrained_model_name_or_path: black-forest-labs/FLUX.1-dev
  mode: finetune
optimizer:
  _target_: torch.optim.AdamW
  lr: 2e-5
  betas: [0.9, 0.999]
  eps: 1.0e-8
  weight_decay: 0.01
step_scheduler:
  max_steps: 1000
  ckpt_every_steps: 500
flags:
  on: yes
  off: false
  none: ~
  empty:
hex: 0x1F
octal: 0o17
neg: -3
inf: .inf
ninf: -.inf
nan: .nan
quoted: "123"
single: '2e-5'
version: 1.10
text: hello world
multi: |
  line one
  line two
list:
  - 1
  - null
  - x
]], "config.yaml")
T.is(doc.model.mode, "finetune", "nested mapping string")
T.is(doc.optimizer.lr, 2e-5, "2e-5 is a float (no dot needed)")
T.is(type(doc.optimizer.lr), "number", "lr is a number")
T.is(doc.optimizer.betas[2], 0.999, "flow sequence of floats")
T.is(doc.optimizer.eps, 1e-8, "1.0e-8")
T.is(doc.step_scheduler.max_steps, 1000, "int")
T.is(doc.flags.on, true, "yes is true")
T.is(doc.flags.off, false, "false")
T.is(doc.flags.none, nil, "~ is null (absent in a mapping)")
T.is(doc.flags.empty, nil, "empty value is null")
T.is(doc.hex, 31, "hex int")
T.is(doc.octal, 15, "octal int")
T.is(doc.neg, -3, "negative int")
T.is(doc.inf, math.huge, ".inf")
T.is(doc.ninf, -math.huge, "-.inf")
T.ok(doc.nan ~= doc.nan, ".nan")
T.is(doc.quoted, "123", "double-quoted number stays a string")
T.is(doc.single, "2e-5", "single-quoted stays a string")
T.is(doc.version, 1.1, "1.10 is a float")
T.is(doc.text, "hello world", "plain string")
T.is(doc.multi, "line one\nline two\n", "literal block")
T.is(doc.list[2], yaml.null, "null inside a list keeps its place")
T.is(doc.list[3], "x", "list after a null")

local merged = yaml.load([[
base: &base
  lr: 1.0e-4
  warmup: 10
  nested: {a: 1}
run:
  <<: *base
  lr: 3.0e-4
alias: *base
]])
T.is(merged.run.lr, 3e-4, "merge key: own key wins")
T.is(merged.run.warmup, 10, "merge key: merged key present")
T.is(merged.alias.nested.a, 1, "alias")

T.raises(function() yaml.load("a: [1, 2\nb: 3\n", "bad.yaml") end, "bad.yaml: line", "syntax error names file and line")
T.raises(function() yaml.load("a: 1\na: 2\n", "dup.yaml") end, "duplicate key 'a'", "duplicate key is an error")
T.raises(function() yaml.load("a: 1\n---\nb: 2\n", "two.yaml") end, "more than one YAML document", "two documents is an error")
T.raises(function() yaml.load("a: !!int abc\n", "tag.yaml") end, "does not fit its tag", "bad tagged value")
T.raises(function() yaml.load_file("/nonexistent/x.yaml") end, "cannot open '/nonexistent/x.yaml'", "missing file")
T.is(yaml.load(""), nil, "empty document is nil")
T.is(yaml.load("- 1\n- 2\n")[2], 2, "top-level list")

local path = os.tmpname()
local f = io.open(path, "w")
f:write("seed: 42\nflow_matching:\n  timestep_sampling: logit_normal\n  logit_std: 1.0\n")
f:close()
local cfg = yaml.load_file(path)
os.remove(path)
T.is(cfg.seed, 42, "load_file")
T.is(cfg.flow_matching.logit_std, 1, "load_file nested float")
T.ok(nemo.yaml == nil or nemo.yaml == yaml, "nemo.yaml is this module")
T.done()
