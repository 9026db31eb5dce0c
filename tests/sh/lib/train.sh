# tests/sh/lib/train.sh: helpers for the shell tests that run the training recipe (sourced; bash;
# needs N = the nemo-lua path and T = a scratch folder).
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
