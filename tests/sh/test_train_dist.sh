#!/usr/bin/env bash
# tests/sh/test_train_dist.sh: the training recipe (lua/nemo/train.lua, recipes/flux_finetune.yaml
# with its small demo model, float64) on several processes through mpirun, DDP and FSDP2:
#   - N ranks x local batch B give the per-step losses (metrics.jsonl: the mean over ranks) and the
#     final weights of one process with batch N x B, within 1e-6 relative, for ddp and fsdp (and
#     HSDP on 4 ranks), with gradient accumulation and activation checkpointing;
#   - only rank 0 prints step lines and writes metrics.jsonl; FSDP2 checkpoints hold one shard
#     file per rank; the consolidated diffusers export equals the checkpoint's weights;
#   - a stopped and resumed FSDP2 run continues bitwise; checkpoints load across world sizes and
#     managers (FSDP2 shards on 4 ranks, DDP's consolidated file into FSDP2);
#   - LoRA (a peft block) on DDP and FSDP2 equals one process; FSDP2 LoRA checkpoints hold the
#     adapters only and resume bitwise;
#   - context parallelism (fsdp.cp_size 2: cp x dp = 2 x 1 and 2 x 2) equals one process and
#     resumes bitwise;
#   - tensor parallelism (the Wan recipe, fsdp.tp_size 2: tp x dp = 2 x 1 and 2 x 2, tp 2 x cp 2;
#     FLUX tp x dp = 2 x 1 and 2 x 2) equals one process, resumes bitwise, resumes without tp, and
#     exports whole weights;
#   - ema: the averages are sharded with the weights (dp 2, tp 2; whole under ddp), equal one process's, resume
#     bitwise and load into one process;
#   - validation (a held-out loss at fixed sigmas and noise) on dp 2, cp 2 x dp 2, tp 2 x dp 2 with
#     the EMA weights, and Wan tp 2 x cp 2 equals one process's; validation samples (images) of dp 2
#     and tp 2 are one process's, byte for byte;
#   - a preemption signal sent to one rank stops both after the same step with a checkpoint;
#   - a bad dp_size, or several processes without an fsdp/ddp block, are clear errors.
# Prints TAP; skips when mpirun is absent. Every run is under `timeout`.
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
N="$ROOT/nemo-lua"
if ! command -v mpirun > /dev/null 2>&1; then
    echo "1..0 # SKIP mpirun not found (install openmpi-bin to run the multi-process tests)"
    exit 0
fi
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT WORLD_SIZE RANK LOCAL_RANK LOCAL_WORLD_SIZE SLURM_STEP_NUM_TASKS
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}"
export XDG_CACHE_HOME="$T/cache"          # the demo's pipeline and latent cache, made once
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

source tests/sh/lib/tap.sh
source tests/sh/lib/train.sh

# ==== the one-process references ====
train 1 0 r1 --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
if [ "$RC" = 0 ]; then pass "reference: 1 process, batch 8, 4 steps (float64)"; else fail "reference run" "$ERR"; fi
R1=$(losses r1)
train 1 0 racc --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
RACC=$(losses racc)
if [ "$RC" = 0 ]; then pass "reference: 1 process, 2 micro-batches of 4"; else fail "reference run (accumulation)" "$ERR"; fi

# ==== equivalence: (name, np, reference, args) ====
case_eq() {
    local name=$1 np=$2 ref=$3 dir=$4; shift 4
    train "$np" 0 "$dir" "$@"
    if [ "$RC" != 0 ]; then fail "$name: the run finished" "exit $RC" "$ERR"; return; fi
    local ref_losses; ref_losses=$(losses "$ref")
    if close "$(losses "$dir")" "$ref_losses" 1e-6; then
        pass "$name: the 4 per-step losses (mean over ranks) equal the 1-process run's within 1e-6 relative"
    else
        fail "$name: losses within 1e-6 relative" "got:" "$(losses "$dir")" "1 process:" "$ref_losses"
    fi
    local c; c=$(compare "$dir/epoch_0_step_3" "$ref/epoch_0_step_3")
    if le "$(maxrel "$c")" 1e-6; then pass "$name: final weights within 1e-6 relative of the 1-process run ($c)"
    else fail "$name: final weights within 1e-6 relative" "$c"; fi
}
case_eq "ddp, 2 ranks x batch 4" 2 r1 ddp2 --ddp.dp_size 2 --step_scheduler.local_batch_size 4 \
    --step_scheduler.global_batch_size 8
STEPLINES=$(grep -c '^step ' <<< "$OUT")
if [ "$STEPLINES" = 4 ] && [ "$(wc -l < "$T/ddp2/metrics.jsonl")" = 4 ] && grep -q "data parallel: 2 processes" <<< "$OUT"; then
    pass "only rank 0 prints the 4 step lines and writes the 4 metrics lines; the log names the 2 processes"
else
    fail "only rank 0 prints and writes metrics" "step lines: $STEPLINES" "$OUT"
fi
case_eq "fsdp2, 2 ranks x batch 4 (+ consolidated export)" 2 r1 fsdp2 --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8 --checkpoint.save_consolidated final
if [ -f "$T/fsdp2/epoch_0_step_3/model/shard-00000-of-00002.safetensors" ] &&
   [ -f "$T/fsdp2/epoch_0_step_3/model/shard-00001-of-00002.safetensors" ] &&
   [ ! -e "$T/fsdp2/epoch_0_step_3/model/model.safetensors" ]; then
    pass "fsdp2: each of the 2 ranks wrote its model shard into the checkpoint"
else
    fail "fsdp2: one shard file per rank" "$(ls -R "$T/fsdp2/epoch_0_step_3" 2>&1)"
fi
# export_vs_shards EXPORT CKPT: "N WORST": the N parameters of the sharded checkpoint CKPT (any
# layout, assembled by load_full) against the diffusers export folder EXPORT, largest difference
export_vs_shards() {
    "$N" -e "
local nemo = require 'nemo'
local full = require('nemo.parallel.fsdp2').load_full('$2')
local fs = require 'nemo.fs'
local sd = {}
for _, f in ipairs(fs.list('$1')) do
    if f:match('%.safetensors\$') then for k, v in pairs(nemo.load_file('$1/' .. f)) do sd[k] = v end end
end
local worst, n = 0, 0
for k, t in pairs(full) do n = n + 1; local e = sd[k]; worst = e and math.max(worst, (e:double() - t:double()):abs():max():item()) or math.huge end
print(n, worst)" 2>&1
}
EXP="$T/fsdp2/epoch_0_step_3/diffusers/transformer"
C=$(export_vs_shards "$EXP" "$T/fsdp2/epoch_0_step_3")
if [[ "$C" =~ ^[1-9][0-9]*[[:space:]]0$ ]]; then
    pass "fsdp2: rank 0's consolidated diffusers export holds exactly the sharded checkpoint's weights ($C)"
else
    fail "fsdp2: the consolidated export equals the shards" "$C"
fi
# checkpoint.load_weights (recipes/generate.lua's model.checkpoint) assembles the shards too
C=$("$N" -e "
local nemo = require 'nemo'
local m = nemo.FluxTransformer2DModel.from_pretrained('$EXP')
local ref = {}
nemo.no_grad(function() for k, p in m:named_parameters() do ref[k] = p:clone(); p:zero_() end end)
require('nemo.checkpoint').load_weights('$T/fsdp2/epoch_0_step_3', m)
local worst, n = 0, 0
for k, p in m:named_parameters() do n = n + 1; worst = math.max(worst, (p:double() - ref[k]:double()):abs():max():item()) end
print(n, worst)" 2>&1)
if [[ "$C" =~ ^[1-9][0-9]*[[:space:]]0$ ]]; then
    pass "checkpoint.load_weights reads the 2-rank FSDP2 shards into a whole model, equal to the export ($C)"
else
    fail "checkpoint.load_weights of FSDP2 shards" "$C"
fi
case_eq "fsdp2, 2 ranks, 2 micro-batches of 2, activation checkpointing" 2 racc fsdp2acc --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 8 --fsdp.activation_checkpointing true
case_eq "ddp, 2 ranks, 2 micro-batches of 2, activation checkpointing" 2 racc ddp2acc --ddp.dp_size 2 \
    --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 8 --ddp.activation_checkpointing true
case_eq "HSDP (fsdp2 dp_size 4, dp_replicate_size 2), 4 ranks, 2 micro-batches of 1" 4 racc hsdp4 --fsdp.dp_size 4 \
    --fsdp.dp_replicate_size 2 --step_scheduler.local_batch_size 1 --step_scheduler.global_batch_size 8
case_eq "ddp, 4 ranks x batch 2" 4 r1 ddp4 --ddp.dp_size 4 --step_scheduler.local_batch_size 2 \
    --step_scheduler.global_batch_size 8
# context parallelism: the cp ranks share a batch and split its tokens (FSDP2 over dp_shard_cp)
case_eq "fsdp2 context parallel (cp_size 2, dp 1), 2 ranks x the whole batch 8" 2 r1 cp2 --fsdp.cp_size 2 \
    --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
STEPLINES=$(grep -c '^step ' <<< "$OUT")
if [ "$STEPLINES" = 4 ] && [ "$(wc -l < "$T/cp2/metrics.jsonl")" = 4 ] && grep -q "context parallel: 2" <<< "$OUT"; then
    pass "context parallel: only rank 0 prints the 4 step lines (both ranks are data-parallel rank 0); the log names cp"
else
    fail "context parallel: rank 0 alone prints" "step lines: $STEPLINES" "$OUT"
fi
case_eq "fsdp2 dp 2 x cp 2, 4 ranks, 2 micro-batches of 2, activation checkpointing" 4 racc cp2dp2 --fsdp.cp_size 2 \
    --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 8 --fsdp.activation_checkpointing true
# the Wan recipe (its demo: 192 patch tokens, 16 text tokens kept whole) with cp_size 2 == one process
WAN=(--step_scheduler.max_steps 3 --step_scheduler.log_remote_every_steps 1 --logging.progress false
     --checkpoint.save_consolidated false --model.torch_dtype float64 --model.compute_dtype float64
     --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 4)
WAN1=$(timeout 300 "$N" recipes/wan_finetune.lua "${WAN[@]}" --checkpoint.checkpoint_dir "$T/wan1" 2>&1 |
       sed -n 's/^step \([0-9]*\)\/3 epoch 0 loss \([0-9.]*\) .* grad_norm \([0-9.]*\) .*/\1 \2 \3/p')
WANCP=$(timeout 300 mpirun -np 2 --oversubscribe "$N" recipes/wan_finetune.lua "${WAN[@]}" --fsdp.cp_size 2 \
        --checkpoint.checkpoint_dir "$T/wancp" 2>&1 |
        sed -n 's/^step \([0-9]*\)\/3 epoch 0 loss \([0-9.]*\) .* grad_norm \([0-9.]*\) .*/\1 \2 \3/p')
if [ "$(wc -l <<< "$WAN1")" = 3 ] && [ "$WAN1" = "$WANCP" ]; then
    pass "recipes/wan_finetune.lua with --fsdp.cp_size 2 on 2 ranks prints the one-process losses and gradient norms"
else
    fail "Wan recipe, context parallel" "one process:" "$WAN1" "cp 2:" "$WANCP"
fi
train 2 0 cpbad --fsdp.cp_size 2 --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
if [ "$RC" != 0 ] && grep -q "fsdp.dp_size = 2 does not match the world size 2 / cp_size 2" <<< "$ERR"; then
    pass "fsdp.dp_size x cp_size above the world size is an error naming both"
else
    fail "dp_size x cp_size must be the world size" "exit $RC" "$ERR"
fi

# ==== resume ====
# resume_eq NAME DIR REF ARGS...: on 2 ranks, 2 steps, stop, then resume for the last 2: the
# weights and the logged losses equal the uninterrupted run REF's, bitwise
resume_eq() {
    local name=$1 dir=$2 ref=$3; shift 3
    train 2 2 "$dir" "$@"
    local a_rc=$RC
    train 2 0 "$dir" "$@"
    local c; c=$(compare "$dir/epoch_0_step_3" "$ref/epoch_0_step_3")
    if [ "$a_rc" = 0 ] && [ "$RC" = 0 ] && grep -q "resumed from" <<< "$OUT" && [ "$(maxrel "$c")" = "0.000e+00" ] &&
       [ "$(losses "$dir")" = "$(losses "$ref")" ]; then
        pass "$name: 2 steps, stop, resume, 2 steps == 4 steps bitwise (weights and logged losses; $c)"
    else
        fail "$name: resume is bitwise" "exit $a_rc / $RC" "$c" "$ERR"
    fi
}
resume_eq "fsdp2, 2 ranks" fsdp2stop fsdp2 --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 \
    --step_scheduler.global_batch_size 8
resume_eq "fsdp2 cp_size 2" cp2stop cp2 --fsdp.cp_size 2 --step_scheduler.local_batch_size 8 \
    --step_scheduler.global_batch_size 8
# checkpoint.is_async: each rank's shard files written by a background thread, published at the next save
resume_eq "fsdp2, 2 ranks, checkpoint.is_async" asyncstop fsdp2 --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 \
    --step_scheduler.global_batch_size 8 --checkpoint.is_async true
# resume_elsewhere NAME SRC DIR REF SUB NP ARGS...: SRC's step-1 checkpoint (copied into DIR, the
# later steps dropped, as a run stopped there leaves it) resumed on NP processes with ARGS; the
# weights (SUB "") or the averages (SUB "/ema") of step 3 end within 1e-6 of the run REF's
resume_elsewhere() {
    local name=$1 src=$2 dir=$3 ref=$4 sub=$5 np=$6; shift 6
    cp -r "$T/$src" "$T/$dir"
    rm -rf "$T/$dir/epoch_0_step_3"; printf 'epoch_0_step_1\n' > "$T/$dir/LATEST"
    sed -i '3,$d' "$T/$dir/metrics.jsonl"
    train "$np" 0 "$dir" "$@"
    local c; c=$(compare "$dir/epoch_0_step_3$sub" "$ref/epoch_0_step_3$sub")
    if [ "$RC" = 0 ] && grep -q "resumed from" <<< "$OUT" && le "$(maxrel "$c")" 1e-6; then
        pass "$name ends within 1e-6 of the 1-process run ($c)"
    else
        fail "$name ends within 1e-6 of the 1-process run" "exit $RC" "$c" "$ERR"
    fi
}
# FSDP2 shards of 2 ranks resumed on 4 ranks (HSDP 2 x 2 reads 2 shards; dp_shard 4 reshards)
resume_elsewhere "a 2-rank FSDP2 checkpoint resumed on 4 ranks (resharded on load)" fsdp2stop reshard4 r1 "" 4 \
    --fsdp.dp_size 4 --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 8
# DDP's consolidated checkpoint resumed under FSDP2, and FSDP2 shards resumed by one process
resume_elsewhere "a DDP checkpoint resumed under FSDP2 (2 ranks)" ddp2 ddp2fsdp r1 "" 2 --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
resume_elsewhere "a 2-rank FSDP2 checkpoint resumed by one process without a manager" fsdp2stop fsdp2one r1 "" 1 \
    --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
# a context-parallel checkpoint (shards over dp_shard x cp) resumed by plain FSDP2 data parallelism
resume_elsewhere "a cp_size 2 checkpoint resumed as 2-rank data parallelism (no cp)" cp2stop cp2dp r1 "" 2 \
    --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8

# ==== LoRA (peft block): DDP and FSDP2 equal one process; adapters only in the checkpoints ====
LORA=(--model.model_type flux --peft.dim 4 --peft.alpha 8 --optimizer.lr 1e-2
      --peft.target_modules '["*.attn.to_q", "*.attn.to_k", "*.attn.to_v", "*.ff.net.2", "*.ff_context.net.2"]')
train 1 0 lora1 "${LORA[@]}" --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
if [ "$RC" = 0 ] && grep -q "LoRA: .* Linear layers adapted" <<< "$OUT"; then
    pass "LoRA reference: 1 process, batch 8"
else
    fail "LoRA reference run" "exit $RC" "$ERR"
fi
case_eq "LoRA, ddp, 2 ranks x batch 4" 2 lora1 loraddp "${LORA[@]}" --ddp.dp_size 2 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
case_eq "LoRA, fsdp2, 2 ranks x batch 4" 2 lora1 lorafsdp "${LORA[@]}" --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
case_eq "LoRA, fsdp2 context parallel (cp_size 2), 2 ranks x the whole batch 8" 2 lora1 loracp "${LORA[@]}" \
    --fsdp.cp_size 2 --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
SHARD0="$T/lorafsdp/epoch_0_step_3/model/shard-00000-of-00002.safetensors"
K=$("$N" -e "local n, f = 0, 0
for k in pairs(require('nemo').load_file('$SHARD0')) do n = n + 1; if not k:find('lora_', 1, true) then f = f + 1 end end
print(n, f)" 2>&1)
if [ -f "$T/lorafsdp/epoch_0_step_3/model/adapter_model.safetensors" ] && [[ "$K" =~ ^[1-9][0-9]*[[:space:]]0$ ]]; then
    pass "LoRA fsdp2 checkpoint: adapter shards only (no frozen weight) plus the gathered adapter ($K)"
else
    fail "LoRA fsdp2 checkpoint holds the adapters only" "$K" "$(ls "$T/lorafsdp/epoch_0_step_3/model" 2>&1)"
fi
resume_eq "LoRA fsdp2, 2 ranks" lorastop lorafsdp "${LORA[@]}" --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 \
    --step_scheduler.global_batch_size 8

# dynamic_batch_size: a bucket's batch grows as its pixel area shrinks (base 256x256: 4x here)
DYN=(--data.dataloader.dynamic_batch_size true --data.dataloader.base_resolution '[256, 256]')
train 1 0 dyn1 "${DYN[@]}" --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
if [ "$RC" = 0 ] && grep -q "dynamic_batch_size: samples per micro-batch and rank by latent size (base 256x256 pixels for 8): 32 @" <<< "$OUT"; then
    pass "dynamic_batch_size reference: 1 process, 32 samples a step at 128x128 pixels (base 256x256, batch 8)"
else
    fail "dynamic_batch_size reference run" "exit $RC" "$OUT" "$ERR"
fi
case_eq "fsdp2, 2 ranks x batch 4, dynamic_batch_size (16 each)" 2 dyn1 dyn2 "${DYN[@]}" --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8

# timestep_sampling beta: every rank draws the global batch's Beta values and takes its slice
train 1 0 rbeta --flow_matching.timestep_sampling beta --step_scheduler.local_batch_size 8 \
    --step_scheduler.global_batch_size 8
if [ "$RC" = 0 ]; then pass "reference: 1 process, batch 8, timestep_sampling beta"; else fail "beta reference run" "$ERR"; fi
case_eq "fsdp2, 2 ranks x batch 4, timestep_sampling beta" 2 rbeta fbeta --fsdp.dp_size 2 \
    --flow_matching.timestep_sampling beta --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8

# ==== ema: the averages are sharded with the weights and equal one process's ====
EMA=(--ema.decay 0.9 --step_scheduler.global_batch_size 8)
train 1 0 ema1 "${EMA[@]}" --step_scheduler.local_batch_size 8
if [ "$RC" = 0 ] && [ -f "$T/ema1/epoch_0_step_3/ema/model/model.safetensors" ]; then
    pass "ema reference: 1 process, batch 8 (ema/model/model.safetensors)"
else
    fail "ema reference run" "exit $RC" "$ERR"
fi
# ema_eq NAME NP DIR ARGS...: the run's averages (ema/) equal the reference's within 1e-6
ema_eq() {
    local name=$1 np=$2 dir=$3; shift 3
    train "$np" 0 "$dir" "${EMA[@]}" "$@"
    local c; c=$(compare "$dir/epoch_0_step_3/ema" "ema1/epoch_0_step_3/ema")
    if [ "$RC" = 0 ] && le "$(maxrel "$c")" 1e-6 && [ -f "$T/$dir/epoch_0_step_3/ema/model/shard-00000-of-0000$np.safetensors" ]; then
        pass "$name: the averages, saved as $np shard files, equal one process's within 1e-6 ($c)"
    else
        fail "$name: averages within 1e-6 of one process" "exit $RC" "$c" "$(ls "$T/$dir/epoch_0_step_3/ema/model" 2>&1)" "$ERR"
    fi
}
ema_eq "ema, fsdp2 2 ranks x batch 4" 2 emadp --fsdp.dp_size 2 --step_scheduler.local_batch_size 4
ema_eq "ema, fsdp2 tensor parallel (tp_size 2) x the whole batch 8" 2 ematp --fsdp.tp_size 2 \
    --step_scheduler.local_batch_size 8
train 2 0 emaddp "${EMA[@]}" --ddp.dp_size 2 --step_scheduler.local_batch_size 4
C=$(compare emaddp/epoch_0_step_3/ema ema1/epoch_0_step_3/ema)
if [ "$RC" = 0 ] && le "$(maxrel "$C")" 1e-6 && [ -f "$T/emaddp/epoch_0_step_3/ema/model/model.safetensors" ]; then
    pass "ema, ddp 2 ranks x batch 4: rank 0 saves the averages whole, equal to one process's within 1e-6 ($C)"
else
    fail "ema with ddp" "exit $RC" "$C" "$ERR"
fi
train 2 2 emaddpstop "${EMA[@]}" --ddp.dp_size 2 --step_scheduler.local_batch_size 4
train 2 0 emaddpstop "${EMA[@]}" --ddp.dp_size 2 --step_scheduler.local_batch_size 4
C=$(compare emaddpstop/epoch_0_step_3/ema emaddp/epoch_0_step_3/ema)
if [ "$RC" = 0 ] && grep -q "resumed from" <<< "$OUT" && [ "$(maxrel "$C")" = "0.000e+00" ]; then
    pass "ema, ddp 2 ranks: 2 steps, stop, resume, 2 steps: the averages bitwise the uninterrupted run's"
else
    fail "ema with ddp: resume is bitwise" "exit $RC" "$C" "$ERR"
fi
resume_eq "ema, fsdp2 2 ranks" emastop emadp "${EMA[@]}" --fsdp.dp_size 2 --step_scheduler.local_batch_size 4
C=$(compare emastop/epoch_0_step_3/ema emadp/epoch_0_step_3/ema)
if [ "$(maxrel "$C")" = "0.000e+00" ]; then pass "ema, fsdp2 2 ranks: the resumed run's averages are bitwise the uninterrupted run's"
else fail "ema: resume keeps the averages bitwise" "$C"; fi
# the 2-rank averages resumed by one process (whole tensors assembled from the shards)
resume_elsewhere "ema: a 2-rank checkpoint's averages resumed by one process" emastop emaone ema1 /ema 1 \
    "${EMA[@]}" --step_scheduler.local_batch_size 8

# ema with LoRA: the adapters' averages, sharded, equal one process's; also written as an adapter
train 1 0 emalora1 "${EMA[@]}" "${LORA[@]}" --step_scheduler.local_batch_size 8
train 2 0 emalora2 "${EMA[@]}" "${LORA[@]}" --fsdp.dp_size 2 --step_scheduler.local_batch_size 4
C=$(compare emalora2/epoch_0_step_3/ema emalora1/epoch_0_step_3/ema)
if [ "$RC" = 0 ] && le "$(maxrel "$C")" 1e-6 && [ -f "$T/emalora2/epoch_0_step_3/ema/adapter_model.safetensors" ]; then
    pass "ema with LoRA, fsdp2 2 ranks: the adapters' averages equal one process's within 1e-6 ($C), and ema/ holds them as an adapter"
else
    fail "ema with LoRA on 2 ranks" "exit $RC" "$C" "$(ls "$T/emalora2/epoch_0_step_3/ema" 2>&1)" "$ERR"
fi

# ==== tensor parallelism: the Wan recipe (its demo) with fsdp.tp_size, Automodel's Wan plan ====
export TRAIN_RECIPE=recipes/wan_finetune.yaml
WB=(--step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 4)
train 1 0 w1 "${WB[@]}"
if [ "$RC" = 0 ]; then pass "Wan reference: 1 process, batch 4, 4 steps (float64)"; else fail "Wan reference run" "$ERR"; fi
case_eq "Wan fsdp2 tensor parallel (tp_size 2, dp 1), 2 ranks x the whole batch 4" 2 w1 wtp2 --fsdp.tp_size 2 "${WB[@]}"
if grep -q "tensor parallel: 2 ranks" <<< "$OUT" && [ "$(ls "$T/wtp2/epoch_0_step_3/model" | grep -c '^shard-0000[01]-of-00002')" = 2 ]; then
    pass "Wan tp 2: the log names tensor parallelism; each tp rank wrote its shard file"
else
    fail "Wan tp 2: log and shard files" "$OUT" "$(ls "$T/wtp2/epoch_0_step_3/model" 2>&1)"
fi
case_eq "Wan dp 2 x tp 2, 4 ranks x batch 2" 4 w1 wtp2dp2 --fsdp.tp_size 2 --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 2 \
    --step_scheduler.global_batch_size 4
case_eq "Wan tp 2 x cp 2, 4 ranks x the whole batch 4, activation checkpointing" 4 w1 wtpcp --fsdp.tp_size 2 \
    --fsdp.cp_size 2 --fsdp.activation_checkpointing true "${WB[@]}"
resume_eq "Wan tp 2" wtpstop wtp2 --fsdp.tp_size 2 "${WB[@]}"
# a tp 2 checkpoint resumed as plain 2-rank data parallelism (resharded: whole-parameter pieces)
resume_elsewhere "a tp 2 checkpoint resumed as 2-rank data parallelism (no tp)" wtpstop wtpdp w1 "" 2 \
    --fsdp.dp_size 2 --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 4
# the consolidated diffusers export of a tp run holds the whole weights
train 2 0 wtpexp --fsdp.tp_size 2 "${WB[@]}" --checkpoint.save_consolidated true
C=$(export_vs_shards "$T/wtpexp/epoch_0_step_3/diffusers/transformer" "$T/wtp2/epoch_0_step_3")
if [ "$RC" = 0 ] && [[ "$C" =~ ^[1-9][0-9]*[[:space:]]0$ ]]; then
    pass "Wan tp 2: rank 0's consolidated diffusers export holds the whole weights, equal to the tp checkpoint's ($C)"
else
    fail "Wan tp 2: the consolidated export is whole" "exit $RC" "$C" "$ERR"
fi
# tools/export_checkpoint.lua on the tp 2 shards: the recipe's own consolidated export, byte for byte
XO=$("$N" tools/export_checkpoint.lua --checkpoint "$T/wtp2/epoch_0_step_3" --out "$T/wtp2x" 2>&1)
if cmp -s "$T/wtp2x/transformer/diffusion_pytorch_model.safetensors" \
          "$T/wtpexp/epoch_0_step_3/diffusers/transformer/diffusion_pytorch_model.safetensors"; then
    pass "export_checkpoint of a tp 2 checkpoint (shard pieces): the recipe's consolidated export, byte for byte"
else
    fail "export_checkpoint of tp shards" "$XO"
fi
train 2 0 wtpddp --ddp.dp_size 1 --ddp.tp_size 2 "${WB[@]}"
if [ "$RC" != 0 ] && grep -q "unknown key 'ddp.tp_size'" <<< "$ERR"; then
    pass "ddp.tp_size is an error (not a ddp key: tensor parallelism runs under FSDP2, as in Automodel)"
else
    fail "ddp with tp_size is refused" "exit $RC" "$ERR"
fi
# Wan LoRA (to_q / to_v adapted: the attentions stay whole, the rest of the plan is split)
export TRAIN_RECIPE=recipes/wan_lora.yaml
train 1 0 wl1 "${WB[@]}"
if [ "$RC" = 0 ]; then pass "Wan LoRA reference: 1 process, batch 4"; else fail "Wan LoRA reference run" "$ERR"; fi
case_eq "Wan LoRA, fsdp2 tensor parallel (tp_size 2), 2 ranks x the whole batch 4" 2 wl1 wltp --fsdp.tp_size 2 "${WB[@]}"
export TRAIN_RECIPE=recipes/wan_finetune.yaml
train 2 0 wtpbf --fsdp.tp_size 2 --model.torch_dtype float32 --model.compute_dtype bfloat16 "${WB[@]}"
BF_RC=$RC
train 1 0 w32 --model.torch_dtype float32 --model.compute_dtype float32 "${WB[@]}"
if [ "$BF_RC" = 0 ] && [ "$RC" = 0 ] && close "$(losses wtpbf)" "$(losses w32)" 2e-2; then
    pass "Wan tp 2 with bfloat16 compute over float32 master weights: the 4 losses within 2e-2 of one float32 process"
else
    fail "Wan tensor parallel with mixed precision" "exit $BF_RC / $RC" "tp bf16:" "$(losses wtpbf)" "f32:" \
        "$(losses w32)" "$ERR"
fi
unset TRAIN_RECIPE
# FLUX: nemo-lua's plan (heads, MLPs, AdaLN linears, the single blocks' proj_out in two pieces)
case_eq "FLUX fsdp2 tensor parallel (tp_size 2, dp 1), 2 ranks x the whole batch 8" 2 r1 ftp2 --fsdp.tp_size 2 \
    --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
case_eq "FLUX dp 2 x tp 2, 4 ranks, 2 micro-batches of 2" 4 racc ftp2dp2 --fsdp.tp_size 2 --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 8
resume_eq "FLUX tp 2" ftpstop ftp2 --fsdp.tp_size 2 --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
# LoRA with tp: the adapted attentions and MLPs stay whole, the rest of the plan is split
case_eq "FLUX LoRA, fsdp2 tensor parallel (tp_size 2), 2 ranks x the whole batch 8" 2 lora1 ftplora "${LORA[@]}" \
    --fsdp.tp_size 2 --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8

# ==== validation: the held-out loss, its samples split over the data-parallel ranks ====
# (the demo's own cache as the validation cache; max_samples 5: the last global batch is padded)
# val_eq NAME NP DIR REF ARGS...: the run's validation losses equal REF's within 1e-9 relative
val_eq() {
    local name=$1 np=$2 dir=$3 ref=$4; shift 4
    train "$np" 0 "$dir" "$@"
    if [ "$RC" = 0 ] && [ "$(vals "$dir" | wc -l)" = "$(vals "$ref" | wc -l)" ] && close "$(vals "$dir")" "$(vals "$ref")" 1e-9; then
        pass "$name: the $(vals "$dir" | wc -l) validation losses equal one process's within 1e-9 relative"
    else
        fail "$name: validation losses within 1e-9 of one process" "exit $RC" "got:" "$(vals "$dir")" "1 process:" \
            "$(vals "$ref")" "$ERR"
    fi
}
FCACHE=$(ls -d "$XDG_CACHE_HOME"/nemo-lua/demo/flux-*/cache | head -1)
VAL=(--validation.cache_dir "$FCACHE" --validation.max_samples 5 --validation.every_steps 2 --validation.num_sigmas 3)
train 1 0 val1 "${VAL[@]}" --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
if [ "$RC" = 0 ] && [ "$(vals val1 | wc -l)" = 3 ] && [ "$(losses val1)" = "$R1" ]; then
    pass "validation reference: 1 process, 3 evaluations (before training, after steps 1 and 3); the training losses are the run's without validation"
else
    fail "validation reference run" "exit $RC" "$(vals val1)" "$ERR"
fi
val_eq "validation, fsdp2 2 ranks x batch 4 (5 samples: 3 + 2 and a padding repeat)" 2 valdp val1 "${VAL[@]}" \
    --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
val_eq "validation, fsdp2 cp 2 x dp 2, 4 ranks" 4 valcp val1 "${VAL[@]}" --fsdp.cp_size 2 --fsdp.dp_size 2 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
HOLD=(--validation.holdout 5 --validation.every_steps 2 --validation.num_sigmas 2 --step_scheduler.global_batch_size 8)
train 1 0 hold1 "${HOLD[@]}" --step_scheduler.local_batch_size 8
val_eq "validation.holdout (5 samples of the training cache), fsdp2 2 ranks x batch 4" 2 hold2 hold1 "${HOLD[@]}" \
    --fsdp.dp_size 2 --step_scheduler.local_batch_size 4
if [ "$(losses hold2)" = "$(losses hold1)" ] || close "$(losses hold2)" "$(losses hold1)" 1e-6; then
    pass "validation.holdout on 2 ranks: the training losses equal one process's (both train on the same rest)"
else
    fail "validation.holdout: training losses on 2 ranks" "$(losses hold2)" "$(losses hold1)"
fi
train 1 0 valema1 "${VAL[@]}" "${EMA[@]}" --validation.ema true --step_scheduler.local_batch_size 8
if [ "$RC" = 0 ] && [ "$(vals valema1 | wc -l)" = 6 ]; then pass "validation.ema reference: 1 process, the weights' and the averages' losses"
else fail "validation.ema reference run" "exit $RC" "$(vals valema1)" "$ERR"; fi
val_eq "validation.ema, fsdp2 tp 2 x dp 2, 4 ranks (the averages swapped into the slices)" 4 valematp valema1 \
    "${VAL[@]}" "${EMA[@]}" --validation.ema true --fsdp.tp_size 2 --fsdp.dp_size 2 --step_scheduler.local_batch_size 4
# validation samples: every rank runs the transformer, rank 0 decodes and writes; the images of
# dp 2 and of tp 2 are one process's, byte for byte (tests/golden/flux_sampling: transformer, VAE, scheduler)
"$N" tools/make_synthetic_cache.lua --out "$T/spcache" --samples 8 --model flux --resolutions 8x8 --text-len 4 \
    --text-dim 32 --pooled-dim 32 --channels 4 > /dev/null 2>&1
SP=(--demo.enabled false --model.pretrained_model_name_or_path tests/golden/flux_sampling --data.dataloader.cache_dir
    "$T/spcache" --validation.cache_dir "$T/spcache" --validation.max_samples 2 --validation.every_steps 2
    --validation.sampling.num_samples 2 --validation.sampling.num_inference_steps 2 --step_scheduler.global_batch_size 4)
train 1 0 sp1 "${SP[@]}" --step_scheduler.local_batch_size 4
if [ "$RC" = 0 ] && [ "$(ls "$T/sp1/samples/step_3" 2>/dev/null | grep -c '\.png$')" = 2 ] && grep -q "samples after step 3: 2 images" <<< "$OUT"; then
    pass "validation samples reference: 1 process, 2 PNGs before training and after steps 1 and 3"
else
    fail "validation samples reference run" "exit $RC" "$OUT" "$ERR"
fi
# same_samples NAME NP DIR ARGS...: the run's sample files are sp1's, byte for byte
same_samples() {
    local name=$1 np=$2 dir=$3; shift 3
    train "$np" 0 "$dir" "${SP[@]}" "$@"
    local a b; a=$(cd "$T/sp1/samples" && find . -type f | sort | xargs md5sum); b=$(cd "$T/$dir/samples" 2>/dev/null &&
        find . -type f | sort | xargs md5sum)
    if [ "$RC" = 0 ] && [ -n "$a" ] && [ "$a" = "$b" ] && [ "$(wc -l <<< "$a")" = 6 ]; then
        pass "$name: the 6 sample images are one process's, byte for byte"
    else
        fail "$name: sample images equal one process's" "exit $RC" "1 process:" "$a" "got:" "$b" "$ERR"
    fi
}
same_samples "validation samples, fsdp2 2 ranks x batch 2" 2 spdp --fsdp.dp_size 2 --step_scheduler.local_batch_size 2
same_samples "validation samples, fsdp2 tensor parallel (tp 2) x the whole batch 4" 2 sptp --fsdp.tp_size 2 \
    --step_scheduler.local_batch_size 4
export TRAIN_RECIPE=recipes/wan_finetune.yaml
WCACHE=$(ls -d "$XDG_CACHE_HOME"/nemo-lua/demo/wan-*/cache | head -1)
WVAL=(--validation.cache_dir "$WCACHE" --validation.max_samples 3 --validation.every_steps 2 "${WB[@]}")
train 1 0 wval1 "${WVAL[@]}"
if [ "$RC" = 0 ] && [ "$(vals wval1 | wc -l)" = 3 ]; then pass "Wan validation reference: 1 process"
else fail "Wan validation reference run" "exit $RC" "$ERR"; fi
val_eq "Wan validation, tp 2 x cp 2, 4 ranks" 4 wvaltpcp wval1 "${WVAL[@]}" --fsdp.tp_size 2 --fsdp.cp_size 2
unset TRAIN_RECIPE

# ==== preemption: a signal to one rank ends every rank after the same step, with a checkpoint ====
PRE=(--step_scheduler.max_steps 400 --step_scheduler.ckpt_every_steps 1000 --step_scheduler.preemption_signal SIGUSR1
     --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8)
( timeout 300 mpirun -np 2 --oversubscribe "$N" tests/sh/lib/train_run.lua 0 "${TRAIN_COMMON[@]}" \
    --checkpoint.checkpoint_dir "$T/pre" "${PRE[@]}" > "$T/pre.out" 2> "$T/pre.err"; echo $? > "$T/pre.rc" ) &
for _ in $(seq 1 600); do
    [ -f "$T/pre/metrics.jsonl" ] && [ "$(wc -l < "$T/pre/metrics.jsonl")" -ge 3 ] && break
    sleep 0.1
done
RANKS=$(pgrep -f "^$N tests/sh/lib/train_run.lua 0 .*$T/pre ")
kill -USR1 "$(tail -n 1 <<< "$RANKS")" 2> /dev/null   # one rank only
wait
PRE_STEP=$(sed -n 's/.*received SIGUSR1 after step \([0-9]*\): saved .*/\1/p' "$T/pre.out")
if [ "$(cat "$T/pre.rc")" = 0 ] && [ "$(wc -l <<< "$RANKS")" = 2 ] && [ -n "$PRE_STEP" ] && [ "$PRE_STEP" -lt 399 ] &&
   [ -f "$T/pre/epoch_0_step_$PRE_STEP/model/shard-00001-of-00002.safetensors" ] &&
   [ "$(wc -l < "$T/pre/metrics.jsonl")" = $((PRE_STEP + 1)) ]; then
    pass "SIGUSR1 (step_scheduler.preemption_signal) to one of 2 ranks: both stop after step $PRE_STEP with its checkpoint, exit 0"
else
    fail "preemption on 2 ranks" "exit $(cat "$T/pre.rc") ranks: $RANKS step: $PRE_STEP" "$(cat "$T/pre.out")" "$(cat "$T/pre.err")"
fi

# ==== mixed precision and errors ====
train 2 0 mixed --fsdp.dp_size 2 --model.torch_dtype float32 --model.compute_dtype bfloat16 \
    --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
if [ "$RC" = 0 ] && grep -q "mixed precision: bfloat16 compute, float32 master weights" <<< "$OUT" &&
   [ "$(losses mixed | wc -l)" = 4 ]; then
    pass "fsdp2 with compute_dtype bfloat16 over torch_dtype float32: mixed precision runs on 2 ranks"
else
    fail "fsdp2 mixed precision run" "exit $RC" "$OUT" "$ERR"
fi
train 2 0 mixedcp --fsdp.cp_size 2 --model.torch_dtype float32 --model.compute_dtype bfloat16 \
    --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
MIXED_RC=$RC
train 1 0 f32one --model.torch_dtype float32 --model.compute_dtype float32 --step_scheduler.local_batch_size 8 \
    --step_scheduler.global_batch_size 8
if [ "$MIXED_RC" = 0 ] && [ "$RC" = 0 ] && close "$(losses mixedcp)" "$(losses f32one)" 2e-2; then
    pass "fsdp2 context parallel with bfloat16 compute over float32 master weights: the 4 losses within 2e-2 of one float32 process"
else
    fail "fsdp2 context parallel with mixed precision" "exit $MIXED_RC / $RC" "cp bf16:" "$(losses mixedcp)" "f32:" \
        "$(losses f32one)" "$ERR"
fi
train 2 0 bad --fsdp.dp_size 3 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
if [ "$RC" != 0 ] && grep -q "fsdp.dp_size = 3 does not match the world size 2" <<< "$ERR"; then
    pass "a dp_size that does not match the world size is an error naming the key"
else
    fail "bad dp_size error" "exit $RC" "$ERR"
fi
train 2 0 noblock --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
if [ "$RC" != 0 ] && grep -q "no 'fsdp:' or 'ddp:' block" <<< "$ERR"; then
    pass "2 processes without an fsdp/ddp block: an error saying to add one"
else
    fail "no manager block error" "exit $RC" "$ERR"
fi

echo "1..$n"
