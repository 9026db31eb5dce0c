# tests/sh/lib/train.sh: helpers for the shell tests that run the training recipe (sourced; bash;
# needs N = the nemo-lua path and T = a scratch folder).
#   train NP STOP DIR ARGS...  recipes/flux_finetune.yaml through tests/sh/lib/train_run.lua
#                         (float64, 4 steps, a checkpoint every 2) with ARGS, into $T/DIR, on NP
#                         processes (mpirun above 1), ending after STOP steps (0: to the end);
#                         sets OUT, ERR, RC. With TRAIN_ON_FAKE_CUDA set, the ranks run on
#                         emulated CUDA devices (NEMO_FAKE_CUDA=NP, --device cuda).
#   losses DIR            the metrics.jsonl losses of $T/DIR, one per line
#   close A B TOL         every pair of lines of A and B within TOL relative (exit status)
#   compare D1 D2         tests/sh/lib/compare_ckpt.lua on $T/D1 and $T/D2 ("maxrel X n K")
#   maxrel TEXT           the X of compare's output
#   le A B                A <= B as numbers (exit status; A empty fails)
losses() { sed -n 's/.*"loss":\([-0-9.e+]*\).*/\1/p' "$T/$1/metrics.jsonl"; }
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
        else
            cmd=(mpirun -np "$np" --oversubscribe "${cmd[@]}")
        fi
    fi
    timeout 300 "${cmd[@]}" > "$T/out" 2> "$T/err"
    RC=$?
    OUT=$(cat "$T/out"); ERR=$(cat "$T/err")
}
