# tests/sh/lib/tap.sh: TAP helpers shared by the shell tests (sourced; bash).
#   pass NAME / fail NAME DIAG... / skip NAME WHY: one numbered line each (n counts them)
#   relay PREFIX LABEL RC OUT: copies OUT's "ok N - ..." lines into this stream renumbered and
#     prefixed with [PREFIX], passes "#" lines on, then one summary line for LABEL that passes
#     when RC is 0, OUT's plan matches its lines and none failed; a "1..0 # SKIP why" plan
#     passes as a SKIP. ERR_TAIL, when set, goes into the diagnostics of a failed summary.
n=0
pass() { n=$((n + 1)); echo "ok $n - $1"; }
fail() {
    n=$((n + 1)); echo "not ok $n - $1"; shift
    for l in "$@"; do printf '%s\n' "$l" | sed 's/^/#   /'; done >&2   # on stderr: prove shows it
}
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }

relay() {
    local prefix=$1 label=$2 rc=$3 out=$4
    local plan count=0 bad=0 why
    plan=$(printf '%s\n' "$out" | sed -n 's/^1\.\.\([0-9][0-9]*\).*$/\1/p' | head -n 1)
    why=$(printf '%s\n' "$out" | sed -n 's/^1\.\.0 # SKIP \(.*\)$/\1/p' | head -n 1)
    while IFS= read -r line; do
        if [[ "$line" =~ ^(not\ )?ok\ [0-9]+\ -\ (.*)$ ]]; then
            count=$((count + 1))
            n=$((n + 1))
            if [ -n "${BASH_REMATCH[1]}" ]; then echo "not ok $n - [$prefix] ${BASH_REMATCH[2]}"; bad=$((bad + 1))
            else echo "ok $n - [$prefix] ${BASH_REMATCH[2]}"; fi
        elif [[ "$line" =~ ^# ]]; then
            echo "$line"
        fi
    done <<< "$out"
    if [ -n "$why" ] && [ "$rc" = 0 ]; then
        skip "$label" "$why"
    elif [ "$rc" = 0 ] && [ -n "$plan" ] && [ "$plan" = "$count" ] && [ "$bad" = 0 ]; then
        pass "$label: the whole run passed ($count checks, exit 0)"
    else
        fail "$label: the whole run passed (exit $rc, plan '${plan}', $count lines, $bad failed)" \
            "stderr:" "${ERR_TAIL:-}"
    fi
}
