#!/usr/bin/env bash
# tests/sh/test_luarocks.sh: `luarocks make nemo-lua-scm-1.rockspec` installs nemo-lua into a
# fresh tree, and <tree>/bin/nemo-lua then finds its Lua package (share/lua/5.1) and libnemo.so
# (lib/lua/5.1) from any folder, also after the tree is moved. Prints TAP.
# luarocks builds in a copy of the working tree (build/ included, timestamps kept, so only what
# is out of date gets rebuilt) so that the test never writes into the tree others work in.
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
if ! command -v luarocks > /dev/null; then echo "1..0 # SKIP luarocks not installed"; exit 0; fi

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT
# a make above us (make test) must not hand its jobserver to the make that luarocks runs
unset MAKEFLAGS MFLAGS MAKELEVEL

source tests/sh/lib/tap.sh   # pass, fail (diagnostics on stderr)
is() { if [ "$1" == "$2" ]; then pass "$3"; else fail "$3" "got:" "$1" "expected:" "$2"; fi; }

# ==== copy the working tree (source files git knows of, plus the build outputs) ====
mkdir -p "$T/src"
{
    if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        git -C "$ROOT" ls-files -co --exclude-standard
    else
        find . -path ./.git -prune -o -path ./build -prune -o -type f -print
    fi
    echo nemo-lua
    echo lua/nemo/_cdef.lua
    [ -d build ] && find build -type f
} | sort -u | while IFS= read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done > "$T/files"
tar -cf - -T "$T/files" | tar -xpf - -C "$T/src"

# ==== luarocks make ====
TREE="$T/tree"
( cd "$T/src" && timeout 600 luarocks --lua-version 5.1 make --tree "$TREE" nemo-lua-scm-1.rockspec ) > "$T/log" 2>&1
RC=$?
if [ "$RC" = 0 ]; then pass "luarocks make installs into a fresh tree"
else fail "luarocks make installs into a fresh tree (exit $RC)" "$(tail -n 30 "$T/log")"; fi

missing=""
for f in bin/nemo-lua share/lua/5.1/nemo/init.lua share/lua/5.1/nemo/_cdef.lua lib/lua/5.1/libnemo.so; do
    [ -e "$TREE/$f" ] || missing="$missing $f"
done
is "$missing" "" "the tree holds bin/nemo-lua, share/lua/5.1/nemo/ and lib/lua/5.1/libnemo.so"

VERSION=$(timeout 30 "$ROOT/nemo-lua" -e 'io.write(require("nemo").version)' 2>&1)
OUT=$(cd / && timeout 30 "$TREE/bin/nemo-lua" -e 'print(require("nemo").version)' 2>&1)
is "$OUT" "$VERSION" "<tree>/bin/nemo-lua -e 'print(require(\"nemo\").version)' works from /"

OUT=$(cd / && timeout 30 "$TREE/bin/nemo-lua" -e '
    print(package.searchpath("nemo", package.path))
    print(os.getenv("NEMO_LIB"))' 2>&1)
is "$OUT" "$(printf '%s\n%s' "$TREE/share/lua/5.1/nemo/init.lua" "$TREE/lib/lua/5.1/libnemo.so")" \
    "the installed launcher uses the tree's package and libnemo, not the build tree's"

OUT=$(cd / && timeout 30 "$TREE/bin/nemo-lua" -e 'print(require("nemo").arange(4))' 2>&1)
is "$OUT" "$(timeout 30 "$ROOT/nemo-lua" -e 'print(require("nemo").arange(4))' 2>&1)" \
    "the installed engine computes and prints a tensor like the build tree"

OUT=$(cd / && timeout 30 "$TREE/bin/nemo-lua" -v 2>&1)
is "$OUT" "nemo-lua $VERSION ($(timeout 30 "$ROOT/nemo-lua" -e 'io.write(jit.version)'))" "the installed nemo-lua -v"

OUT=$(cd / && printf 'print(nemo.version)\n' | timeout 30 "$TREE/bin/nemo-lua" -i 2>&1)
is "$OUT" "$VERSION" "the installed REPL preloads nemo"

mv "$TREE" "$T/moved"
OUT=$(cd / && timeout 30 "$T/moved/bin/nemo-lua" -e 'print(require("nemo").version, os.getenv("NEMO_LIB"))' 2>&1)
is "$OUT" "$(printf '%s\t%s' "$VERSION" "$T/moved/lib/lua/5.1/libnemo.so")" \
    "a moved tree still works (paths come from the executable's location)"
mv "$T/moved" "$TREE"

( cd "$T/src" && timeout 120 luarocks --lua-version 5.1 remove --tree "$TREE" nemo-lua ) > "$T/log" 2>&1
RC=$?
left=""
for f in bin/nemo-lua share/lua/5.1/nemo/init.lua lib/lua/5.1/libnemo.so; do [ -e "$TREE/$f" ] && left="$left $f"; done
is "$RC:$left" "0:" "luarocks remove takes the files out of the tree again"

echo "1..$n"
