#!/usr/bin/env python
"""tests/golden/sched_unipc/make_golden.py: the golden case of diffusers' UniPCMultistepScheduler
(the sampler of WanPipeline), read by tests/lua/test_unipc.lua. A record of how the files here
were made; nothing in the build or the tests runs it.

Run with diffusers 0.40 / torch 2.15 / numpy 2.4 on the CPU (the venv /tmp/wanref):
    /tmp/wanref/bin/python tests/golden/sched_unipc/make_golden.py

For each config below (a folder <name>/scheduler_config.json, written first and then loaded by
diffusers' own UniPCMultistepScheduler.from_pretrained, as nemo-lua loads it):
  - the config diffusers holds after __init__ (every key, defaults filled in);
  - set_timesteps(N) for N in {1, 4, 10, 50}: timesteps (int64) and sigmas (float32);
  - sampling loops: set_timesteps(N) then step(model_output[i], timesteps[i], x) for every i,
    from one sample, with the model outputs drawn once (below) and shared by every loop;
    per step the state after it (step_index, this_order, lower_order_nums) and prev_sample.
Loops in float32 (sample and model outputs), float64, "mixed" (float32 sample, bfloat16 model
outputs: WanPipeline's dtypes) and bfloat16 (both). Most loops keep, per step, the first 32
values of prev_sample ("<loop>.steps", shape [N, 32]), some the whole last one too
("<loop>.final"); two keep every prev_sample whole ("<loop>.full", [N, 1, 4, 3, 8, 8]).
golden.json has every step's max |prev_sample| and the state after it.

Inputs, from torch.Generator().manual_seed(SEED), in this order: sample (1, 4, 3, 8, 8), then
model_outputs (10, 1, 4, 3, 8, 8), all randn float32. Loops of other dtypes cast them (.double(),
.bfloat16(): exact / round to nearest even).

Also: the training tables (alphas_cumprod and sigmas after __init__) of the configs with other
betas, add_noise for a few timesteps and dtypes, and "extras": schedules from explicit sigmas
(flow, Karras flow), a repeated timestep, "trailing" spacing with N = 61 (62 timesteps: numpy
arange's length), and a loop started by set_begin_index(3).

Files: <name>/scheduler_config.json (one per config), golden.json (everything but tensors),
golden.safetensors (inputs, tables, loop results, add_noise results).
"""
import json
import os
import platform
import sys

import numpy as np
import torch
import diffusers
from diffusers import UniPCMultistepScheduler as S
from safetensors.torch import save_file

OUT = os.path.dirname(os.path.abspath(__file__))
SEED = 20250611
SHAPE = (1, 4, 3, 8, 8)
SLICE = 32

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (the 480p flow_shift 3.0; the
# 14B 720p model card sets flow_shift 5.0 through from_config)
WAN21 = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

# name -> (kind, dict, mu): "json" configs are written as given (a hub file); "kwargs" configs
# are S(**kwargs).save_config(folder). mu: passed to set_timesteps (dynamic shifting).
CONFIGS = {
    "wan21_480": ("json", WAN21, None),
    "wan21_720": ("json", dict(WAN21, flow_shift=5.0), None),
    "default": ("kwargs", {}, None),
    "sd15_leading": ("kwargs", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    timestep_spacing="leading", steps_offset=1), None),
    "bh1_sigma_min": ("kwargs", dict(solver_type="bh1", final_sigmas_type="sigma_min"), None),
    "bh1_zero": ("kwargs", dict(solver_type="bh1"), None),
    "order1_flow": ("kwargs", dict(FLOW, solver_order=1, flow_shift=3.0), None),
    "order3_eps": ("kwargs", dict(solver_order=3, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, timestep_spacing="trailing"), None),
    "order3_flow_bh1": ("kwargs", dict(FLOW, solver_order=3, solver_type="bh1", flow_shift=2.0,
                                       final_sigmas_type="sigma_min"), None),
    "karras": ("kwargs", dict(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012), None),
    "karras_flow": ("kwargs", dict(FLOW, use_karras_sigmas=True), None),
    "exponential": ("kwargs", dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), None),
    "flow_dynamic_terminal": ("kwargs", dict(FLOW, use_dynamic_shifting=True, shift_terminal=0.1,
                                             final_sigmas_type="sigma_min"), 1.2),
    "flow_dynamic_linear": ("kwargs", dict(FLOW, use_dynamic_shifting=True, time_shift_type="linear"), 2.5),
    "vpred_zsnr": ("kwargs", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing", beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012), None),
    "sample_x0false": ("kwargs", dict(prediction_type="sample", predict_x0=False, final_sigmas_type="sigma_min",
                                      beta_schedule="squaredcos_cap_v2"), None),
    "eps_x0false_bh1": ("kwargs", dict(predict_x0=False, solver_type="bh1", final_sigmas_type="sigma_min"), None),
    "vpred_x0false": ("kwargs", dict(prediction_type="v_prediction", predict_x0=False,
                                     final_sigmas_type="sigma_min", timestep_spacing="leading"), None),
    # lower_order_final False with a final sigma 0 divides by 0 in diffusers (rk = 0): sigma_min
    "wan_disable_corrector": ("kwargs", dict(FLOW, flow_shift=3.0, disable_corrector=[0, 2, 5],
                                             lower_order_final=False, final_sigmas_type="sigma_min"), None),
    "thresholding": ("kwargs", dict(prediction_type="sample", thresholding=True, sample_max_value=3.0,
                                    dynamic_thresholding_ratio=0.9), None),
    "midpoint_trained": ("kwargs", dict(solver_type="midpoint", num_train_timesteps=100,
                                        trained_betas=np.linspace(0.001, 0.05, 100).tolist()), None),
}
SCHEDULE_N = [1, 4, 10, 50]
TABLES = ["default", "sd15_leading", "vpred_zsnr", "sample_x0false"]   # linear, scaled_linear, rescaled, cosine

# the configs whose 10-step float32 loop keeps its whole last prev_sample (with the full ones,
# every element of those; the per-step slices check the others)
FINALS = {"default", "order3_eps", "vpred_zsnr", "karras", "thresholding"}
# loops: (config, N, kind, store); kind f32 / f64 / mixed (f32 sample, bf16 model output) / bf16
LOOPS = []
for name in CONFIGS:
    for n in (10, 4):
        store = ("full" if (name, n) in {("wan21_480", 10), ("wan21_720", 4)} else
                 "steps+final" if n == 10 and name in FINALS else "steps")
        LOOPS.append((name, n, "f32", store))
for name in ["wan21_480", "wan21_720", "default", "order3_eps", "vpred_zsnr", "order3_flow_bh1",
             "eps_x0false_bh1", "karras"]:
    LOOPS.append((name, 10, "f64", "steps+final" if name in ("wan21_480", "default") else "steps"))
LOOPS.append(("wan21_480", 10, "mixed", "steps"))
LOOPS.append(("wan21_480", 4, "bf16", "steps"))
LOOPS.append(("default", 4, "bf16", "steps"))
LOOPS.append(("wan21_480", 50, "f32", "final"))   # model_outputs[i % 10]

DTYPES = {"f32": (torch.float32, torch.float32), "f64": (torch.float64, torch.float64),
          "mixed": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16, torch.bfloat16)}


def jsonable(v):
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(SEED)
    sample = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    mos = torch.randn((10,) + SHAPE, generator=g, dtype=torch.float32)
    tensors = {"sample": sample, "model_outputs": mos}
    doc = {
        "name": "sched_unipc",
        "note": "diffusers UniPCMultistepScheduler: configs, set_timesteps schedules, sampling loops, add_noise",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "seed": SEED, "shape": list(SHAPE), "slice": SLICE,
        "inputs": "sample then model_outputs, randn float32 from torch.Generator().manual_seed(seed)",
        "configs": {}, "loops": {}, "add_noise": {},
    }
    scheds = {}
    for name, (kind, cfg, mu) in CONFIGS.items():
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        if kind == "json":
            with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
                json.dump(cfg, f, indent=2, sort_keys=True)
                f.write("\n")
        else:
            S(**cfg).save_config(folder)
        s = S.from_pretrained(folder)
        scheds[name] = s
        conf = {k: jsonable(v) for k, v in s.config.items() if not k.startswith("_")}
        entry = {"kind": kind, "config": conf, "mu": mu, "schedules": {}}
        for n in SCHEDULE_N:
            if n == 1 and cfg.get("shift_terminal"):
                continue   # one sigma stretched to shift_terminal: 0/0, NaN sigmas (not JSON)
            s.set_timesteps(n, mu=mu)
            entry["schedules"][str(n)] = {"timesteps": s.timesteps.tolist(),
                                          "sigmas": [float(x) for x in s.sigmas.tolist()]}
            assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float32
        doc["configs"][name] = entry
    for name in TABLES:
        s = S.from_pretrained(os.path.join(OUT, name))
        if name in ("default", "vpred_zsnr"):
            tensors[name + ".alphas_cumprod"] = s.alphas_cumprod.clone()
        tensors[name + ".init_sigmas"] = s.sigmas.clone()

    for (name, n, kind, store) in LOOPS:
        s = S.from_pretrained(os.path.join(OUT, name))
        mu = CONFIGS[name][2]
        # a scheduler used before: set_timesteps resets the multistep state
        s.set_timesteps(7, mu=mu)
        x = sample.clone()
        for i in range(3):
            x = s.step(mos[i], s.timesteps[i], x).prev_sample
        s.set_timesteps(n, mu=mu)
        sdt, mdt = DTYPES[kind]
        x = sample.to(sdt)
        outs = []
        info = {"t": [], "step_index": [], "this_order": [], "lower_order_nums": []}
        for i, t in enumerate(s.timesteps):
            x = s.step(mos[i % 10].to(mdt), t, x).prev_sample
            outs.append(x.clone())
            for k, v in (("t", int(t)), ("step_index", s.step_index), ("this_order", s.this_order),
                         ("lower_order_nums", s.lower_order_nums)):
                info[k].append(v)
        key = f"{name}.N{n}.{kind}"
        out = torch.stack(outs)
        entry = {"config": name, "N": n, "dtype": kind, "store": store, "mu": mu, "info": info,
                 "out_dtype": str(out.dtype).replace("torch.", ""),
                 "has_nan": bool(torch.isnan(out.float()).any()),
                 "nan_steps": [i for i in range(n) if bool(torch.isnan(outs[i].float()).any())],
                 "max_abs": [float(o.double().abs().max()) if bool(torch.isfinite(o.float()).all()) else None
                             for o in outs]}   # null: NaN or infinity in it
        if store == "full":
            tensors[key + ".full"] = out
        elif store.startswith("steps"):
            tensors[key + ".steps"] = out.reshape(n, -1)[:, :SLICE].clone()
            if store == "steps+final":
                tensors[key + ".final"] = outs[-1]
        else:
            tensors[key + ".final"] = outs[-1]
        doc["loops"][key] = entry

    # add_noise: (2, 3, 4) samples, one timestep per sample
    g2 = torch.Generator().manual_seed(SEED + 1)
    x0 = torch.randn((2, 3, 4), generator=g2)
    nz = torch.randn((2, 3, 4), generator=g2)
    tensors["add_noise.x0"], tensors["add_noise.noise"] = x0, nz
    cases = {
        # before set_timesteps: the 1000 training timesteps 999..0 (float32) and the training
        # sigmas in training order (diffusers indexes one with the other's position)
        "default_train": ("default", None, [999, 10], torch.float32),
        "default_inf": ("default", 10, "schedule[1,3]", torch.float32),
        "wan_inf": ("wan21_480", 10, "schedule[1,3]", torch.float32),
        "wan_inf_bf16": ("wan21_480", 10, "schedule[1,3]", torch.bfloat16),
        "wan_inf_f64": ("wan21_480", 10, "schedule[1,3]", torch.float64),
        "vpred_inf_bf16": ("vpred_zsnr", 4, "schedule[0,3]", torch.bfloat16),
    }
    for cname, (conf, n, ts, dt) in cases.items():
        s = S.from_pretrained(os.path.join(OUT, conf))
        if n is not None:
            s.set_timesteps(n, mu=CONFIGS[conf][2])
        if ts == "schedule[1,3]":
            t = s.timesteps[[1, 3]]
        elif ts == "schedule[0,3]":
            t = s.timesteps[[0, 3]]
        else:
            t = torch.tensor(ts, dtype=torch.float32)
        y = s.add_noise(x0.to(dt), nz.to(dt), t)
        tensors["add_noise." + cname] = y
        doc["add_noise"][cname] = {"config": conf, "N": n, "timesteps": [float(v) for v in t.tolist()],
                                   "dtype": str(dt).replace("torch.", "")}

    # extras: schedules from explicit sigmas, a spacing quirk, a repeated timestep, set_begin_index
    ex = {}
    def sched_of(s):
        return {"timesteps": s.timesteps.tolist(), "sigmas": [float(x) for x in s.sigmas.tolist()],
                "num_inference_steps": s.num_inference_steps}
    s = S.from_pretrained(os.path.join(OUT, "wan21_480"))
    s.set_timesteps(sigmas=np.array([1.0, 0.75, 0.5, 0.25]))      # diffusers needs a numpy array
    ex["explicit_sigmas"] = dict(sched_of(s), config="wan21_480", sigmas_in=[1.0, 0.75, 0.5, 0.25])
    s.set_timesteps(sigmas=np.array([0.9, 0.9, 0.5]))
    ex["repeated"] = dict(sched_of(s), config="wan21_480", sigmas_in=[0.9, 0.9, 0.5],
                          index_of_first=s.index_for_timestep(s.timesteps[0]))
    s = S.from_pretrained(os.path.join(OUT, "karras_flow"))
    s.set_timesteps(sigmas=np.array([0.9, 0.6, 0.3, 0.1, 0.05]))
    ex["karras_flow_explicit"] = dict(sched_of(s), config="karras_flow", sigmas_in=[0.9, 0.6, 0.3, 0.1, 0.05])
    # np.arange(1000, 0, -1000/61) has 62 values: "trailing" gives 62 timesteps for N = 61
    s = S.from_config(S.from_pretrained(os.path.join(OUT, "default")).config, timestep_spacing="trailing")
    s.set_timesteps(61)
    ex["trailing61"] = dict(sched_of(s), config="default", overrides={"timestep_spacing": "trailing"}, N=61)
    # set_begin_index(3): the loop starts at the fourth timestep (model_outputs[3..9])
    s = S.from_pretrained(os.path.join(OUT, "wan21_480"))
    s.set_timesteps(10)
    s.set_begin_index(3)
    x = sample.clone()
    outs = []
    for i in range(3, 10):
        x = s.step(mos[i], s.timesteps[i], x).prev_sample
        outs.append(x.clone())
    tensors["begin3.steps"] = torch.stack(outs).reshape(7, -1)[:, :SLICE].clone()
    tensors["begin3.final"] = outs[-1]
    ex["begin3"] = {"config": "wan21_480", "N": 10, "begin_index": 3, "first": 3}
    doc["extras"] = ex

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "golden.safetensors"))
    os.chmod(os.path.join(OUT, "golden.safetensors"), 0o644)
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(doc, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"wrote {OUT}: {len(CONFIGS)} configs, {len(LOOPS)} loops, {size} bytes in all", file=sys.stderr)


if __name__ == "__main__":
    main()
