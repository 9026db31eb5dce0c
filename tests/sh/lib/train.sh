# tests/sh/lib/train.sh: helpers for the shell tests that run the training recipe (sourced; bash;
# needs N = the nemo-lua path and T = a scratch folder).
#   train NP STOP DIR ARGS...  recipes/flux_finetune.yaml through tests/sh/lib/train_run.lua
#                         (float64, 4 steps, a checkpoint every 2) with ARGS, into $T/DIR, on NP
#                         processes (mpirun above 1), ending after STOP steps (0: to the end);
#                         sets OUT, ERR, RC. With TRAIN_ON_FAKE_CUDA set, the ranks run on
#                         emulated CUDA devices (NEMO_FAKE_CUDA=NP, --device cuda); with
#                         TRAIN_ON_CUDA_EMU=LIB, on the CUDA emulator LIB (NP devices a process,
#                         the plugin's kernels and its NCCL backend, --device cuda).
#   device_recipe_cases   the recipe on cuda over the nccl backend, in the mode above (pass /
#                         fail lines): FSDP2, DDP with accumulation and checkpointing, HSDP on 4
#                         ranks, FSDP2 context parallel (cp 2), Wan tensor parallel (tp 2), validation, FSDP2 with CPU offload, each against one CPU process; FSDP2
#                         mixed precision; a bitwise
#                         resume from device shards (needs tap.sh's pass / fail)
#   losses DIR            the metrics.jsonl losses of $T/DIR, one per line
#   vals DIR              its validation losses (val_loss, then val_loss_ema where present)
#   close A B TOL         every pair of lines of A and B within TOL relative (exit status)
#   compare D1 D2         tests/sh/lib/compare_ckpt.lua on $T/D1 and $T/D2 ("maxrel X n K")
#   maxrel TEXT           the X of compare's output
#   le A B                A <= B as numbers (exit status; A empty fails)
losses() { sed -n 's/.*"loss":\([-0-9.e+]*\).*/\1/p' "$T/$1/metrics.jsonl"; }
vals() { grep -o '"val_loss\(_ema\)\?":[-0-9.e+]*' "$T/$1/metrics.jsonl" | sed 's/.*://'; }
close() {
    paste <(printf '%s\n' "$1") <(printf '%s\n' "$2") | awk -v tol="$3" '
        { n++; d = $1 - $2; if (d < 0) d = -d; m = $2 < 0 ? -$2 : $2; if (NF < 2 || d > tol * m) bad++ }
        END { exit (n == 0 || bad > 0) }'
}
compare() { "$N" tests/sh/lib/compare_ckpt.lua "$T/$1" "$T/$2" 2>&1; }
maxrel() { sed -n 's/^maxrel \([^ ]*\) n \([0-9]*\)$/\1/p' <<< "$1"; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a + 0 <= b + 0) }'; }

TRAIN_COMMON=(--model.torch_dtype float64 --model.compute_dtype float64 --step_scheduler.max_steps 4
              --step_scheduler.ckpt_every_steps 2 --step_scheduler.log_remote_every_steps 1 --logging.progress false
              --checkpoint.save_consolidated false)
train() {
    local np=$1 stop=$2 dir=$3; shift 3
    local cmd=("$N" tests/sh/lib/train_run.lua "$stop" "${TRAIN_COMMON[@]}" --checkpoint.checkpoint_dir "$T/$dir" "$@")
    if [ "$np" -gt 1 ]; then
        if [ -n "${TRAIN_ON_FAKE_CUDA:-}" ]; then
            cmd=(env NEMO_FAKE_CUDA="$np" mpirun -np "$np" --oversubscribe -x NEMO_FAKE_CUDA "${cmd[@]}" --device cuda)
        elif [ -n "${TRAIN_ON_CUDA_EMU:-}" ]; then
            cmd=(env NEMO_CUDA_LIB="$TRAIN_ON_CUDA_EMU" NEMO_EMU_CUDA_DEVICES="$np" mpirun -np "$np" --oversubscribe
                 -x NEMO_CUDA_LIB -x NEMO_EMU_CUDA_DEVICES "${cmd[@]}" --device cuda)
        else
            cmd=(mpirun -np "$np" --oversubscribe "${cmd[@]}")
        fi
    fi
    timeout 300 "${cmd[@]}" > "$T/out" 2> "$T/err"
    RC=$?
    OUT=$(cat "$T/out"); ERR=$(cat "$T/err")
}

device_recipe_cases() {
    train 1 0 r1 --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
    if [ "$RC" = 0 ]; then pass "reference: 1 CPU process, batch 8, 4 steps (float64)"; else fail "reference run" "$ERR"; fi
    train 1 0 racc --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
    if [ "$RC" = 0 ]; then pass "reference: 1 CPU process, 2 micro-batches of 4"; else fail "reference run (accumulation)" "$ERR"; fi
    case_eq() {
        local name=$1 np=$2 ref=$3 dir=$4; shift 4
        train "$np" 0 "$dir" "$@"
        if [ "$RC" != 0 ]; then fail "$name: the run finished" "exit $RC" "$ERR"; return; fi
        if grep -q "on cuda:0" <<< "$OUT" && grep -q "(nccl backend)" <<< "$OUT"; then
            pass "$name: trains on cuda:0 (rank 0) over the nccl backend"
        else
            fail "$name: trains on cuda over nccl" "$OUT"
        fi
        if close "$(losses "$dir")" "$(losses "$ref")" 1e-6; then
            pass "$name: the 4 per-step losses equal the CPU process's within 1e-6 relative"
        else
            fail "$name: losses within 1e-6 relative" "got:" "$(losses "$dir")" "1 process:" "$(losses "$ref")"
        fi
        local c; c=$(compare "$dir/epoch_0_step_3" "$ref/epoch_0_step_3")
        if le "$(maxrel "$c")" 1e-6; then pass "$name: final weights within 1e-6 relative of the CPU process's ($c)"
        else fail "$name: final weights within 1e-6 relative" "$c"; fi
    }
    case_eq "fsdp2 on cuda, 2 ranks x batch 4" 2 r1 fsdp2 --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 \
        --step_scheduler.global_batch_size 8
    case_eq "ddp on cuda, 2 ranks, 2 micro-batches of 2, activation checkpointing" 2 racc ddp2 --ddp.dp_size 2 \
        --step_scheduler.local_batch_size 2 --step_scheduler.global_batch_size 8 --ddp.activation_checkpointing true
    case_eq "HSDP on cuda (dp_size 4, dp_replicate_size 2), 4 ranks, 2 micro-batches of 1" 4 racc hsdp4 \
        --fsdp.dp_size 4 --fsdp.dp_replicate_size 2 --step_scheduler.local_batch_size 1 --step_scheduler.global_batch_size 8
    # context parallelism: the tokens split over 2 ranks, Ulysses all-to-alls through the nccl backend
    case_eq "fsdp2 context parallel (cp_size 2) on cuda, 2 ranks x the whole batch 8" 2 r1 cp2 --fsdp.cp_size 2 \
        --step_scheduler.local_batch_size 8 --step_scheduler.global_batch_size 8
    # tensor parallelism (the Wan recipe): its all-reduces and all-gathers through the nccl backend
    export TRAIN_RECIPE=recipes/wan_finetune.yaml
    train 1 0 w1 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 4
    case_eq "Wan fsdp2 tensor parallel (tp_size 2) on cuda, 2 ranks x the whole batch 4" 2 w1 wtp2 --fsdp.tp_size 2 \
        --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 4
    unset TRAIN_RECIPE
    # validation on the device: the held-out loss (the demo's cache) equals the CPU process's
    local VAL=(--validation.cache_dir "$(ls -d "$XDG_CACHE_HOME"/nemo-lua/demo/flux-*/cache | head -1)"
               --validation.max_samples 3 --validation.every_steps 2 --validation.num_sigmas 2
               --step_scheduler.global_batch_size 8)
    train 1 0 val1 "${VAL[@]}" --step_scheduler.local_batch_size 8
    train 2 0 valc "${VAL[@]}" --fsdp.dp_size 2 --step_scheduler.local_batch_size 4
    if [ "$RC" = 0 ] && [ "$(vals valc | wc -l)" = 3 ] && close "$(vals valc)" "$(vals val1)" 1e-9; then
        pass "validation on cuda, fsdp2 2 ranks: the 3 validation losses equal the CPU process's within 1e-9 relative"
    else
        fail "validation on cuda" "exit $RC" "got:" "$(vals valc)" "CPU:" "$(vals val1)" "$ERR"
    fi
    # FSDP2 with CPU offload: host shards, gradients and AdamW state; the same numbers
    case_eq "fsdp2 with cpu_offload on cuda, 2 ranks x batch 4" 2 r1 offl --fsdp.dp_size 2 --fsdp.cpu_offload true \
        --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
    if grep -q "CPU offload: shards, gradients and optimizer state in host memory" <<< "$OUT"; then
        pass "fsdp2 cpu_offload: the recipe says the shards live in host memory"
    else
        fail "fsdp2 cpu_offload is on" "$OUT"
    fi
    local OFF=(--fsdp.dp_size 2 --fsdp.cpu_offload true --step_scheduler.local_batch_size 4
               --step_scheduler.global_batch_size 8)
    train 2 2 stopo "${OFF[@]}"
    local O_RC=$RC
    train 2 0 stopo "${OFF[@]}"
    local CO; CO=$(compare stopo/epoch_0_step_3 offl/epoch_0_step_3)
    if [ "$O_RC" = 0 ] && [ "$RC" = 0 ] && grep -q "resumed from" <<< "$OUT" && [ "$(maxrel "$CO")" = "0.000e+00" ]; then
        pass "fsdp2 cpu_offload, 2 ranks: stop after 2 steps, resume from the host shards, == 4 steps bitwise"
    else
        fail "fsdp2 cpu_offload: resume is bitwise" "exit $O_RC / $RC" "$CO" "$ERR"
    fi
    # FSDP2 mixed precision across ranks: bf16 compute copies all-gathered, float32 master shards
    local MP=(--fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
              --model.torch_dtype float32)
    train 2 0 mp32 "${MP[@]}" --model.compute_dtype float32
    local RC32=$RC
    train 2 0 mpbf "${MP[@]}" --model.compute_dtype bfloat16
    if [ "$RC32" = 0 ] && [ "$RC" = 0 ] && grep -q "mixed precision: bfloat16 compute, float32 master weights" <<< "$OUT" &&
       close "$(losses mpbf)" "$(losses mp32)" 2e-2; then
        pass "fsdp2 mixed precision on cuda, 2 ranks: the 4 losses within 2e-2 of the float32 run"
    else
        fail "fsdp2 mixed precision on cuda, 2 ranks" "exit $RC32 / $RC" "bf16:" "$(losses mpbf)" "f32:" "$(losses mp32)" "$ERR"
    fi
    # checkpoint.is_async from device shards: host copies taken at the save, written by threads
    train 2 0 asyncd --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8 \
        --checkpoint.is_async true
    local CA; CA=$(compare asyncd/epoch_0_step_3 fsdp2/epoch_0_step_3)
    if [ "$RC" = 0 ] && [ "$(maxrel "$CA")" = "0.000e+00" ]; then
        pass "fsdp2 on cuda with checkpoint.is_async: the checkpoint equals the synchronous run's bitwise ($CA)"
    else
        fail "fsdp2 on cuda with checkpoint.is_async" "exit $RC" "$CA" "$ERR"
    fi
    train 2 2 stop --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
    local A_RC=$RC
    train 2 0 stop --fsdp.dp_size 2 --step_scheduler.local_batch_size 4 --step_scheduler.global_batch_size 8
    local C; C=$(compare stop/epoch_0_step_3 fsdp2/epoch_0_step_3)
    if [ "$A_RC" = 0 ] && [ "$RC" = 0 ] && grep -q "resumed from" <<< "$OUT" && [ "$(maxrel "$C")" = "0.000e+00" ]; then
        pass "fsdp2 on cuda, 2 ranks: 2 steps, stop, resume from the device shards, 2 steps == 4 steps bitwise"
    else
        fail "fsdp2 on cuda: resume is bitwise" "exit $A_RC / $RC" "$C" "$ERR"
    fi
}
