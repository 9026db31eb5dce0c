-- nemo-lua-scm-1.rockspec: `luarocks make` (from the repository root) builds libnemo, the CUDA
-- plugin when nvcc exists and the nemo-lua launcher with the Makefile, then installs the Lua
-- package into the tree's share/lua/5.1, libnemo*.so into lib/lua/5.1 and nemo-lua into bin.
-- nemo-lua finds both from its own location, so <tree>/bin/nemo-lua works from any folder.
-- Needs LuaJIT 2.1 (headers and library, found with pkg-config), libedit, OpenBLAS, libyaml.
rockspec_format = "3.0"
package = "nemo-lua"
version = "scm-1"

source = {
    url = "git+https://github.com/nemo-lua/nemo-lua.git",
    branch = "main",
}

description = {
    summary = "A training engine for diffusion transformers: a C engine driven from LuaJIT",
    detailed = [[
nemo-lua trains diffusion transformers (FLUX.1, Wan 2.x) with a C11 engine (libnemo, optional
CUDA plugin) driven from LuaJIT through the FFI, reproducing NeMo Automodel's diffusion
pipeline without Python. `nemo-lua recipe.lua` runs a recipe; `nemo-lua` alone opens a REPL.
]],
    license = "Apache-2.0",
    labels = { "machine-learning", "diffusion", "luajit", "ffi" },
}

dependencies = {
    "lua >= 5.1, < 5.2",   -- LuaJIT reports itself as Lua 5.1
}

build = {
    type = "make",
    -- "-O3" after luarocks' "-O2 -fPIC": the Makefile appends CFLAGS after its own flags, and the
    -- kernels are written for -O3 vectorisation.
    build_variables = {
        CFLAGS = "$(CFLAGS) -O3",
        LUA_INCDIR = "$(LUA_INCDIR)",
        LUADIR = "$(LUADIR)",
        LIBDIR = "$(LIBDIR)",
        BINDIR = "$(BINDIR)",
        PREFIX = "$(PREFIX)",
    },
    install_variables = {
        CFLAGS = "$(CFLAGS) -O3",
        LUA_INCDIR = "$(LUA_INCDIR)",
        LUADIR = "$(LUADIR)",
        LIBDIR = "$(LIBDIR)",
        BINDIR = "$(BINDIR)",
        PREFIX = "$(PREFIX)",
    },
    copy_directories = { "docs" },
}
