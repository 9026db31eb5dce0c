#!/usr/bin/env bash
# tests/sh/test_launcher.sh: the nemo-lua executable (engine/main.c) behaves as luajit does on
# the command line (-v, -e, -l, scripts and their arg table, stdin, -i, errors and exit codes),
# finds the nemo package from any folder, and its REPL continues multi-line input, prints
# expressions, survives errors and Ctrl-C. Prints TAP. Every command runs under `timeout`, and
# the interactive checks poll for output instead of sleeping blindly, so a bug cannot hang prove.
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
N="$ROOT/nemo-lua"
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi

T=$(mktemp -d)
trap 'exec 3>&- 2>/dev/null; rm -rf "$T"' EXIT
export HOME="$T/home"    # the REPL's history file goes here, not into the real home
mkdir -p "$HOME"
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT OMP_WAIT_POLICY

source tests/sh/lib/tap.sh   # pass, fail (diagnostics on stderr)
is() { if [ "$1" == "$2" ]; then pass "$3"; else fail "$3" "got:" "$1" "expected:" "$2" "stderr:" "$ERR"; fi; }
like() { if [[ "$1" =~ $2 ]]; then pass "$3"; else fail "$3" "got:" "$1" "expected to match: $2"; fi; }
unlike() { if [[ "$1" =~ $2 ]]; then fail "$3" "got:" "$1" "expected not to match: $2"; else pass "$3"; fi; }

# run INPUT CMD...: runs CMD with INPUT on stdin (a pipe); sets OUT, ERR, RC.
run() {
    local input=$1; shift
    printf '%s' "$input" | timeout 30 "$@" > "$T/out" 2> "$T/err"
    RC=$?
    OUT=$(cat "$T/out"); ERR=$(cat "$T/err")
}

VERSION=$(timeout 30 "$N" -e 'io.write(require("nemo").version)' 2>&1)

# ==== -v, -e, -l, -h ====
run "" "$N" -v
is "$RC" 0 "-v exits 0"
like "$OUT" "^nemo-lua [0-9]+\.[0-9]+[^ ]* \(LuaJIT 2\.[0-9]+[^)]*\)$" "-v prints 'nemo-lua <version> (LuaJIT x.y)'"
is "$OUT" "nemo-lua $VERSION ($(timeout 30 "$N" -e 'io.write(jit.version)'))" "-v shows nemo.version and jit.version"

run "" "$N" -e 'print(1 + 1)'
is "$OUT" "2" "-e runs a chunk"
run "" "$N" -e 'x = 20' -e'print(x + 1)'
is "$OUT" "21" "several -e run in order (also -echunk without a space)"
run "" "$N" -l nemo -e 'print(type(nemo), nemo.version)'
is "$OUT" "$(printf 'table\t%s' "$VERSION")" "-l nemo requires the module and sets the global"
run "" "$N" -l no_such_module_xyz
is "$RC" 1 "-l of a missing module exits 1"
like "$ERR" "^nemo-lua: module 'no_such_module_xyz' not found" "-l of a missing module says so"
run "" "$N" -h
is "$RC" 0 "-h exits 0"
like "$OUT" "^usage: nemo-lua \[options\]" "-h prints the usage"
run "" "$N" --help
like "$OUT" "--nproc-per-node" "--help lists --nproc-per-node"
like "$OUT" "--info" "--help lists --info"

# ==== --info: what nemo-lua finds here ====
run "" "$N" --info
is "$RC" 0 "--info exits 0"
like "$OUT" "^nemo-lua   $VERSION " "--info starts with the version"
like "$OUT" "libnemo    /.*libnemo\.so \(ABI [0-9]+\)" "--info names the libnemo it loaded and its ABI"
like "$OUT" "CPU        [0-9]+ threads" "--info gives the CPU threads"
like "$OUT" "CUDA       (no device: .+|[0-9]+ devices?;)" "--info says whether CUDA has devices, or why not"
like "$OUT" "MPI        (available|not available: .+)" "--info says whether MPI is linked"
like "$OUT" "launcher   none \(one process" "--info outside a launcher: one process"
run "" env NEMO_FAKE_CUDA=2 "$N" --info
like "$OUT" "CUDA       2 devices; emulated" "--info with 2 emulated devices: the count"
like "$OUT" "  cuda:1  emulated CUDA device" "--info lists each device"
run "" env OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_RANK=2 OMPI_COMM_WORLD_LOCAL_RANK=0 OMPI_COMM_WORLD_LOCAL_SIZE=2 \
    "$N" --info
like "$OUT" "launcher   openmpi: rank 2 of 4, local rank 0 of 2" "--info under mpirun: the rank it was given"
run "" "$N" --info -e 'print("after")'
like "$OUT" "after$" "--info, then -e runs"

run "" "$N" -x
is "$RC" 2 "an unknown option exits 2"
like "$ERR" "^nemo-lua: unrecognized option '-x'" "an unknown option is named"
run "" "$N" -e
is "$RC" 2 "-e without its chunk exits 2"

# ==== scripts: arg table, ..., exit status ====
cat > "$T/args.lua" <<'EOF'
local t = {}
for i = -3, #arg do t[#t + 1] = i .. "=" .. tostring(arg[i]) end
print(table.concat(t, " "))
print(select("#", ...), ...)
EOF
run "" "$N" -e 'y = 1' "$T/args.lua" a "b c"
is "$OUT" "$(printf '%s\n%s' "-3=$N -2=-e -1=y = 1 0=$T/args.lua 1=a 2=b c" "2	a	b c")" \
    "script sees arg (negative indices for the interpreter and options) and ... = its args"
if command -v luajit > /dev/null; then
    run "" luajit -e 'y = 1' "$T/args.lua" a "b c"
    LJ=$(printf '%s' "$OUT" | sed "s|^-3=[^ ]*|-3=$N|")
    run "" "$N" -e 'y = 1' "$T/args.lua" a "b c"
    is "$OUT" "$LJ" "arg and ... are exactly luajit's (interpreter name aside)"
else
    pass "# SKIP luajit not installed"
fi
run "" "$N" -- "$T/args.lua" -v
is "$(printf '%s' "$OUT" | tail -n 1)" "$(printf '1\t-v')" "-- stops option handling: later options are script args"
run "" "$N" "$T/args.lua"
is "$(printf '%s' "$OUT" | tail -n 1)" "0" "a script without args gets an empty ..."
run "" "$N" -e 'os.exit(3)'
is "$RC" 3 "os.exit(3) gives exit status 3"

cat > "$T/err.lua" <<'EOF'
local function inner() error("boom at depth") end
local function outer() inner() end
outer()
print("not reached")
EOF
run "" "$N" "$T/err.lua"
is "$RC" 1 "an uncaught error exits with status 1"
is "$OUT" "" "nothing runs after the error"
like "$ERR" "^nemo-lua: [^
]*err\.lua:1: boom at depth" "the error is printed as 'nemo-lua: <message>' on stderr"
like "$ERR" "stack traceback:.*err\.lua:2:.*err\.lua:3:" "a traceback through the callers follows"
run "" "$N" -e 'error(setmetatable({}, {__tostring = function() return "custom error" end}))'
like "$ERR" "^nemo-lua: custom error" "error objects print through __tostring"
run "" "$N" -e 'local t = nil; return t.x'
is "$RC" 1 "a runtime error in -e exits 1"
like "$ERR" "^nemo-lua: \(command line\):1: attempt to index" "a runtime error in -e names (command line):1"
run "" "$N" -e 'x = = 1'
is "$RC" 1 "a syntax error in -e exits 1"
like "$ERR" "^nemo-lua: \(command line\):1: unexpected symbol near '='" "a syntax error in -e is reported"
printf 'x = = 1\n' > "$T/syntax.lua"
run "" "$N" "$T/syntax.lua"
is "$RC" 1 "a syntax error in a script exits 1"
like "$ERR" "^nemo-lua: [^ ]*syntax\.lua:1: unexpected symbol" "a syntax error in a script names the file and line"
run "" "$N" "$T/no_such_script.lua"
is "$RC" 1 "a missing script exits 1"
like "$ERR" "^nemo-lua: cannot open [^ ]*no_such_script\.lua" "a missing script is named"

# ==== stdin ====
run 'print(1 + 1, select("#", ...))' "$N"
is "$OUT" "$(printf '2\t0')" "stdin not a terminal and no args: stdin runs as a script"
run 'print(arg[0], ...)' "$N" - a b
is "$OUT" "$(printf -- '-\ta\tb')" "'-' runs stdin as the script with the following args"
run 'error("from stdin")' "$N"
is "$RC" 1 "an error in a stdin script exits 1"
like "$ERR" "^nemo-lua: stdin:1: from stdin" "an error in a stdin script is reported"

# ==== REPL on piped input (-i) ====
run $'print(x * 2)\n' "$N" -e 'x = 21' -i
is "$OUT" "42" "-i reads statements from stdin after -e"
run $'1 + 2\n=x\n"s", nil, 3\nlocal y = 5\n' "$N" -e 'x = 21' -i
is "$OUT" "$(printf '3\n21\ns\tnil\t3')" "expressions and =expr print their values; statements print nothing"
run $'function f(a)\n    return a * 3\nend\nf(7)\nt = {\n  1,\n  2,\n}\n#t\nfor i = 1, 3 do\n  io.write(i)\nend\nprint()\n{10,\n 20}\n' "$N" -i
is "$(printf '%s' "$OUT" | head -n 3)" "$(printf '21\n2\n123')" "multi-line statements continue until complete"
like "$(printf '%s' "$OUT" | sed -n 4p)" "^table: " "a multi-line expression is printed"
is "$ERR" "" "multi-line input gives no errors"
run $'error("e1")\nprint("still here")\nx = = 1\nprint("and here")\nno_such.field\n' "$N" -i
is "$OUT" "$(printf 'still here\nand here')" "errors in the REPL do not end the session"
like "$ERR" "^stdin:1: e1" "a runtime error in the REPL keeps its position (no tail call)"
like "$ERR" "stdin:1: unexpected symbol near '='" "a syntax error in the REPL is reported"
like "$ERR" "stdin:1: attempt to index global 'no_such'" "a runtime error in an expression names its line"
is "$RC" 0 "the REPL exits 0 at end of input"
run $'print(type(nemo), nemo.version)\n' "$N" -i
is "$OUT" "$(printf 'table\t%s' "$VERSION")" "the REPL preloads the global nemo"
run $'nemo.arange(3)\n' "$N" -i
is "$OUT" "$(timeout 30 "$N" -e 'print(require("nemo").arange(3))')" "the REPL prints a tensor with tostring"
run $'print(nemo)\n' "$N" -i "$T/args.lua"
like "$(printf '%s' "$OUT" | tail -n 1)" "^table: " "-i after a script also preloads nemo"
mkdir -p "$T/broken/nemo"
printf 'error("broken nemo for the test")\n' > "$T/broken/nemo/init.lua"
run $'print("repl runs", nemo)\n' "$N" -e "package.path = '$T/broken/?.lua;$T/broken/?/init.lua;' .. package.path" -i
like "$ERR" "broken nemo for the test" "a failing require 'nemo' is reported"
is "$OUT" "$(printf 'repl runs\tnil')" "and the REPL still starts"

# ==== --nproc-per-node ====
run "" env NEMO_MPIRUN=/nonexistent/mpirun "$N" --nproc-per-node 2 "$T/args.lua"
is "$RC" 1 "--nproc-per-node 2 without mpirun exits 1"
like "$ERR" "starts the processes with Open MPI's mpirun, but '/nonexistent/mpirun' cannot be run" "--nproc-per-node without mpirun says what to install"
run "" env OMPI_COMM_WORLD_SIZE=3 "$N" --nproc-per-node=4 "$T/args.lua"
is "$RC" 2 "--nproc-per-node=4 inside an MPI job of 3 exits 2"
run "" "$N" --nproc-per-node 1 "$T/args.lua" a
is "$RC" 0 "--nproc-per-node 1 runs the script"
is "$(printf '%s' "$OUT" | tail -n 1)" "$(printf '1\ta')" "--nproc-per-node 1 passes the script its args"
run "" "$N" --nproc-per-node zero "$T/args.lua"
is "$RC" 2 "--nproc-per-node with a non-number exits 2"
like "$ERR" "positive integer, got 'zero'" "--nproc-per-node with a non-number says what it expects"

# ==== paths: any folder, symlinks, LUA_PATH, environment ====
mkdir -p "$T/elsewhere" "$T/bin"
ln -s "$N" "$T/bin/nemo-link"
( cd "$T/elsewhere" && run "" "$N" -e 'print(require("nemo").version)'; printf '%s\n%s\n' "$RC" "$OUT" > "$T/res" )
is "$(cat "$T/res")" "$(printf '0\n%s' "$VERSION")" "require 'nemo' works from another folder"
( cd / && run "" "$T/bin/nemo-link" -e 'print(require("nemo").version, os.getenv("NEMO_LIB"))'; printf '%s' "$OUT" > "$T/res" )
is "$(cat "$T/res")" "$(printf '%s\t%s' "$VERSION" "$ROOT/build/libnemo.so")" \
    "through a symlink from / it finds the build tree (NEMO_LIB = build/libnemo.so)"
run "" "$N" -e 'print(package.path:match("^[^;]*"), package.searchpath("nemo", package.path))'
is "$OUT" "$(printf '%s\t%s' "$ROOT/lua/?.lua" "$ROOT/lua/nemo/init.lua")" "the build tree's lua/ comes first on package.path"
mkdir -p "$T/mods/nemo"
printf 'return "fake nemo"\n' > "$T/mods/nemo/init.lua"
printf 'return "mymod"\n' > "$T/mods/mymod.lua"
LUA_PATH="$T/mods/?.lua;$T/mods/?/init.lua;;" run "" "$N" -e 'print(require("mymod"), type(require("nemo")), package.searchpath("nemo.tensor", package.path) ~= nil)'
is "$OUT" "$(printf 'mymod\ttable\ttrue')" "LUA_PATH (with ;;) is searched after the nemo package"
LUA_PATH="$T/mods/?.lua;;" run "" "$N" -E -e 'print(pcall(require, "mymod"))'
like "$OUT" "^false" "-E ignores LUA_PATH"
NEMO_LIB=/nonexistent/libnemo.so run "" "$N" -e 'print(os.getenv("NEMO_LIB"))'
is "$OUT" "/nonexistent/libnemo.so" "an existing NEMO_LIB is left alone"
run "" "$N" -e 'print(os.getenv("OMP_WAIT_POLICY"))'
is "$OUT" "PASSIVE" "OMP_WAIT_POLICY defaults to PASSIVE"
OMP_WAIT_POLICY=ACTIVE run "" "$N" -e 'print(os.getenv("OMP_WAIT_POLICY"))'
is "$OUT" "ACTIVE" "an existing OMP_WAIT_POLICY is kept"
LUA_INIT='init_ran = 42' run "" "$N" -e 'print(init_ran)'
is "$OUT" "42" "LUA_INIT runs first, as in luajit"

# ==== Ctrl-C while a statement runs (piped REPL, SIGINT sent to the process) ====
# --foreground: otherwise timeout(1) passes a SIGINT on to the command and then to its whole
# process group, and the second one arriving after the first was handled ends the REPL, as a
# second Ctrl-C is meant to.
mkfifo "$T/in"
timeout --foreground 30 "$N" -i < "$T/in" > "$T/sig_out" 2> "$T/sig_err" &
pid=$!
exec 3> "$T/in"
echo 'print("ready") io.stdout:flush() while true do end' >&3
for _ in $(seq 150); do grep -q ready "$T/sig_out" && break; sleep 0.1; done
sleep 0.3
kill -INT "$pid" 2> /dev/null
echo 'print("after interrupt")' >&3
exec 3>&-
wait "$pid"
RC=$?
ERR=$(cat "$T/sig_err")
like "$ERR" "stdin:1: interrupted!" "SIGINT during 'while true do end' raises 'interrupted!'"
is "$(cat "$T/sig_out")" "$(printf 'ready\nafter interrupt')" "the session continues after the interrupt"
is "$RC" 0 "and exits 0 at the end of input"

# Ctrl-C in a script (interpreted with -joff, since hooks never run inside compiled loops)
timeout --foreground 30 "$N" -joff -e 'print("ready") io.stdout:flush() while true do end' > "$T/sig_out" 2> "$T/sig_err" &
pid=$!
for _ in $(seq 150); do grep -q ready "$T/sig_out" && break; sleep 0.1; done
sleep 0.2
kill -INT "$pid" 2> /dev/null
wait "$pid"
is "$?" 1 "SIGINT in a script (-joff) ends it with status 1"
like "$(cat "$T/sig_err")" "^nemo-lua: \(command line\):1: interrupted!" "and reports 'nemo-lua: ...: interrupted!'"

# ==== the terminal REPL, driven through a pseudo-terminal by script(1) ====
if command -v script > /dev/null && script --help 2>&1 | grep -q -- '--flush'; then
    rm -f "$T/in" "$T/ts"
    mkfifo "$T/in"
    # script(1) runs its command through $SHELL -c; `exec` makes the REPL that shell's
    # replacement. Without it a shell that does not exec a lone command (dash, Debian's /bin/sh)
    # stays in the terminal's foreground group, dies of the Ctrl-C meant for the REPL, and
    # script -e reports its 130 instead of the REPL's status: the CI failures of this check.
    # SHELL is pinned to /bin/sh so that this case runs wherever the test does.
    ( SHELL=/bin/sh timeout 60 script -q -f -e -c "exec '$N'" "$T/ts" < "$T/in" > /dev/null 2>&1; echo $? > "$T/tty_rc" ) &
    spid=$!
    exec 3> "$T/in"
    # wait_for TEXT: poll the transcript (10 s at most). Output to wait for is built with ..
    # so that the echo of the typed line does not match it.
    wait_for() { for _ in $(seq 200); do grep -qF -- "$1" "$T/ts" 2> /dev/null && return 0; sleep 0.05; done; return 1; }
    wait_for '> ' && printf 'x = 40 +\n' >&3
    wait_for '>> ' && printf '2\n' >&3
    wait_for '>> 2' && printf 'x\n' >&3
    wait_for '42' && printf 'print("NOT" .. "RUN")' >&3
    wait_for '"RUN")' && printf '\003' >&3
    sleep 0.3; printf 'print("after" .. " ctrl-c")\n' >&3
    wait_for 'after ctrl-c' && printf 'function spin() print("spin" .. "ning") while true do end end spin()\n' >&3
    wait_for 'spinning' && sleep 0.2 && printf '\003' >&3
    wait_for 'interrupted!' && printf 'print("al" .. "ive")\n' >&3
    # Ctrl-D only once the prompt is back: typed while a statement still runs, the terminal is
    # in cooked mode, where Ctrl-D becomes an end-of-line mark that reads as a NUL byte once
    # line editing switches the terminal to raw mode (type-ahead Ctrl-D is lost, as in bash).
    wait_prompt() { for _ in $(seq 200); do [[ "$(tr -d '\r' < "$T/ts")" == *"$1"$'\n> ' ]] && return 0; sleep 0.05; done; return 1; }
    wait_prompt 'alive'
    printf '\004' >&3
    # keep our end of the fifo open until the REPL has exited: closing it sends EOF to
    # script(1), which may hang up the terminal before the REPL has read the Ctrl-D.
    for _ in $(seq 400); do [ -s "$T/tty_rc" ] && break; sleep 0.05; done
    exec 3>&-
    wait "$spid"
    TS=$(tr -d '\r' < "$T/ts")
    like "$TS" "nemo-lua $VERSION \(LuaJIT" "the terminal REPL starts with a banner"
    like "$TS" $'\n> x = 40 \\+\n>> 2\n> x\n42\n' "a continuation line gets the '>> ' prompt and completes the statement"
    unlike "$TS" "NOTRUN" "Ctrl-C at the prompt drops the typed line"
    like "$TS" $'after ctrl-c\n' "the session continues after Ctrl-C at the prompt"
    like "$TS" $'stdin:1: interrupted!.*\nalive\n' "Ctrl-C in a loop of a function defined at the prompt interrupts it; the session continues"
    RC=$(cat "$T/tty_rc" 2> /dev/null)
    if [ "$RC" = 0 ]; then pass "Ctrl-D exits with status 0"
    else fail "Ctrl-D exits with status 0" "exit status (script -e): '$RC'" \
        "transcript (last 12 lines):" "$(printf '%s\n' "$TS" | tail -n 12 | cat -v)"; fi
    like "$(cat "$HOME/.nemo_lua_history" 2> /dev/null)" 'print\("al"' "history is saved to ~/.nemo_lua_history"
else
    pass "# SKIP script(1) with --flush not available"
fi

echo "1..$n"
