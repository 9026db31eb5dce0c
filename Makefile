# nemo-lua: C engine (libnemo.so), optional CUDA plugin (libnemo_cuda.so), the nemo-lua launcher.
#
#   make            build everything into build/ and ./nemo-lua (works from the build tree)
#   make test       install missing Debian packages, build, run every test under prove
#   make install    PREFIX=/usr/local (or LUADIR= LIBDIR= BINDIR= as luarocks passes them)
#   make bench      run the benchmarks under bench/
#   make print-config
#
# ==== FEATURES (uncomment or pass on the command line) ====
# No CUDA plugin even when nvcc exists:
#   NO_CUDA=1
# Debug build with sanitizers (slow):
#   DEBUG=1
# Portable code (no -march=native), for binaries copied to other machines:
#   PORTABLE=1
# CUDA architectures for the plugin, sm_80 or newer (the flash kernels use cp.async / ldmatrix):
# by default the first GPU's own (nvidia-smi), else 90 (H100/H200); a list builds code for each,
# plus PTX of the last for newer GPUs: CUDA_ARCH="80 86 90".
#   CUDA_ARCH=90

# ==== COMPILER OPTIONS ====
CC      ?= cc
NVCC    := $(if $(filter 1,$(NO_CUDA)),,$(shell command -v nvcc 2>/dev/null || (test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc)))
CUDA_HOME ?= /usr/local/cuda
LUAJIT_INC ?= $(shell pkg-config --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1)
LUAJIT_LIB ?= $(shell pkg-config --libs luajit 2>/dev/null || echo -lluajit-5.1)

# -fno-math-errno: sqrt and friends never set errno (nothing reads it), so loops calling them
# vectorise; the results are the same bits.
# -ffp-contract=off: no fused multiply-add contraction, so results do not depend on -march and
# elementwise updates (AdamW) round step by step as PyTorch does.
SANITIZE := -fsanitize=address,undefined
OPT     := $(if $(filter 1,$(DEBUG)),-O0 -g $(SANITIZE),-O3 -g $(if $(filter 1,$(PORTABLE)),,-march=native))
WARN    := -Wall -Wextra -Wshadow -Wno-unused-parameter $(if $(filter 1,$(WERROR)),-Werror)
NEMO_CFLAGS := -std=gnu11 $(OPT) -ffp-contract=off -fno-math-errno $(WARN) -fPIC -fvisibility=hidden -fopenmp -Iengine/include -Iengine -MMD -MP
LDLIBS_NEMO := -lopenblas -lyaml -lm -ldl -lpthread -fopenmp

# ==== INSTALL LOCATIONS (luarocks passes these) ====
PREFIX  ?= /usr/local
LUADIR  ?= $(PREFIX)/share/lua/5.1
LIBDIR  ?= $(PREFIX)/lib
BINDIR  ?= $(PREFIX)/bin

SRC := $(wildcard engine/*.c engine/ops/*.c kernels/cpu/*.c)
SRC := $(filter-out engine/main.c,$(SRC))
OBJ := $(patsubst %.c,build/obj/%.o,$(SRC))
CU  := $(wildcard kernels/cuda/*.cu)
CU_OBJ := $(patsubst %.cu,build/obj/%.o,$(CU))
LIBNEMO := build/libnemo.so
LIBCUDA := $(if $(NVCC),build/libnemo_cuda.so)
CDEF := lua/nemo/_cdef.lua
HEADERS := $(wildcard engine/include/*.h)

ifeq ($(origin CUDA_ARCH),undefined)
CUDA_ARCH := $(if $(NVCC),$(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. '))
CUDA_ARCH := $(if $(filter 8% 9% 1%,$(CUDA_ARCH)),$(CUDA_ARCH),90)
endif
NVCC_ARCH := $(foreach a,$(CUDA_ARCH),-gencode arch=compute_$(a),code=sm_$(a)) \
             -gencode arch=compute_$(lastword $(CUDA_ARCH)),code=compute_$(lastword $(CUDA_ARCH)) \
             -DNEMO_CUDA_ARCHS='"$(CUDA_ARCH)"'

$(info [$(if $(NVCC),+,-)] CUDA plugin $(if $(NVCC),with $(NVCC) (CUDA_ARCH $(CUDA_ARCH)),off: no nvcc or NO_CUDA=1))

.PHONY: all test test-only deps install uninstall clean bench print-config demo
all: $(LIBNEMO) $(LIBCUDA) nemo-lua $(CDEF)

build/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(NEMO_CFLAGS) $(CFLAGS) -c $< -o $@

# -z nodelete: LuaJIT may dlclose libnemo at exit while OpenMP worker threads still run in it.
$(LIBNEMO): $(OBJ)
	$(CC) -shared -Wl,-z,nodelete -o $@ $(OBJ) $(LDFLAGS) $(LDLIBS_NEMO)

# The CUDA plugin: compiled whenever nvcc exists, loaded by libnemo only when CUDA is asked for.
# build/cuda_arch holds the CUDA_ARCH the objects were built for: another value rebuilds them.
CUDA_ARCH_STAMP := build/cuda_arch
ifneq ($(NVCC),)
ifneq ($(strip $(file < $(CUDA_ARCH_STAMP))),$(strip $(CUDA_ARCH)))
$(shell mkdir -p build && echo '$(strip $(CUDA_ARCH))' > $(CUDA_ARCH_STAMP))
endif
endif
build/obj/%.o: %.cu $(CUDA_ARCH_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(NVCC_ARCH) -MMD -MP -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra,-Wshadow $(if $(filter 1,$(WERROR)),-Werror all-warnings) -Iengine/include -Iengine -c $< -o $@

# NCCL: every NCCL reference in the plugin is weak, so --no-as-needed keeps libnccl linked.
NCCL_LIB := $(if $(filter 1,$(NO_NCCL)),,$(firstword $(wildcard $(CUDA_HOME)/lib64/libnccl.so /usr/lib/x86_64-linux-gnu/libnccl.so)))
NCCL_LDFLAGS := -Wl,--no-as-needed -lnccl -Wl,--as-needed
$(info [$(if $(NCCL_LIB),+,-)] NCCL $(if $(NCCL_LIB),$(NCCL_LIB),off: no libnccl.so or NO_NCCL=1))
build/libnemo_cuda.so: $(CU_OBJ)
	$(CC) -shared -o $@ $(CU_OBJ) -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublasLt -lcublas $(if $(NCCL_LIB),$(NCCL_LDFLAGS)) -lstdc++

# The CUDA emulator (tests/cuda_emu): the plugin's own sources compiled for the CPU against an
# emulated runtime, cuBLAS and cuBLASLt, so `make test` runs every CUDA kernel without a GPU
# (tests/sh/test_cuda_emu.sh). A launch `k<<<g, b>>>(x)` becomes `k << nemo_emu_cfg(g, b)(x)`.
EMU_OBJ := $(patsubst kernels/cuda/%.cu,build/emu/%.o,$(CU)) build/emu/emu.o build/emu/nccl_emu.o
LIBCUDA_EMU := build/libnemo_cuda_emu.so
EMU_CXXFLAGS := -std=c++17 -O1 -g -fPIC -ffp-contract=off -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas \
                $(if $(filter 1,$(WERROR)),-Werror) -Itests/cuda_emu -Ikernels/cuda -Iengine/include -Iengine -MMD -MP
build/emu/%.cc: kernels/cuda/%.cu
	@mkdir -p $(dir $@)
	sed -e 's/<<</ << nemo_emu_cfg(/g' -e 's/>>>/)/g' $< > $@
build/emu/%.o: build/emu/%.cc
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
build/emu/emu.o: tests/cuda_emu/emu.cc
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
build/emu/nccl_emu.o: tests/cuda_emu/nccl_emu.cc
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
$(LIBCUDA_EMU): $(EMU_OBJ)
	$(CXX) -shared -o $@ $(EMU_OBJ) -lopenblas -ldl -lpthread -lrt
.PRECIOUS: build/emu/%.cc

# The FFI declarations, generated from the one public header (no hand-copied layouts).
$(CDEF): $(HEADERS)
	@mkdir -p $(dir $@)
	{ echo '-- generated by make from engine/include/nemo.h: do not edit'; \
	  echo 'return [=['; $(CC) -E -P -DNEMO_CDEF -Iengine/include engine/include/nemo.h; echo ']=]'; } > $@.tmp && mv $@.tmp $@

build/obj/engine/main.o: engine/main.c
	@mkdir -p $(dir $@)
	$(CC) $(NEMO_CFLAGS) $(LUAJIT_INC) -DNEMO_LUADIR='"$(LUADIR)"' -DNEMO_LIBDIR='"$(LIBDIR)"' $(CFLAGS) -c $< -o $@

nemo-lua: build/obj/engine/main.o
	$(CC) -o $@ $< $(LDFLAGS) $(LUAJIT_LIB) -ledit -ldl -lm -Wl,-E

# ==== TESTS ====
# Debian packages the build and the tests need; `make deps` installs the missing ones.
DEB_PKGS := g++ luajit libluajit-5.1-dev lua-cjson libyaml-dev luarocks libopenblas-dev libedit-dev \
            libopenmpi-dev openmpi-bin pkg-config
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi

test: deps
	$(MAKE) all
	$(MAKE) test-only

TESTS_C := $(patsubst tests/c/%.c,build/tests/%,$(wildcard tests/c/test_*.c))
build/tests/%: tests/c/%.c $(LIBNEMO)
	@mkdir -p $(dir $@)
	$(CC) $(NEMO_CFLAGS) -Itests -o $@ $< -Lbuild -lnemo -Wl,-rpath,'$$ORIGIN/..' -lm
# C++ tests of device code compiled for the host (test_flash_emu: kernels/cuda/flash.cuh on an emulated warp)
TESTS_C += $(patsubst tests/c/%.cc,build/tests/%,$(wildcard tests/c/test_*.cc))
build/tests/%: tests/c/%.cc $(wildcard kernels/cuda/*.cuh) tests/cuda_emu/warp_mma.h
	@mkdir -p $(dir $@)
	$(CXX) -std=c++17 -O2 -Wall -Wextra -Wshadow $(if $(filter 1,$(WERROR)),-Werror) -Itests -o $@ $<

# The emulator's own test (tests/c/test_cuda_emu.cc), built against it
build/tests/test_cuda_emu: tests/c/test_cuda_emu.cc build/emu/emu.o $(wildcard tests/cuda_emu/*.h)
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -Itests -o $@ $< build/emu/emu.o -lopenblas -ldl -lpthread

# One prove run over the C test binaries, the Lua tests (run by ./nemo-lua) and the shell tests.
test-only: $(TESTS_C) $(LIBCUDA_EMU)
	prove -f --exec tests/run-one $(TESTS_C) $(wildcard tests/lua/test_*.lua) $(wildcard tests/sh/*.sh)

bench: all
	./nemo-lua bench/ops.lua

# The README's main job: train the small FLUX-architecture demo on CPU (recipes/flux_finetune.yaml).
demo: all
	./nemo-lua recipes/flux_finetune.lua

# ==== INSTALL ====
install: all
	mkdir -p $(DESTDIR)$(LUADIR)/nemo $(DESTDIR)$(LIBDIR) $(DESTDIR)$(BINDIR)
	cp -R lua/nemo/. $(DESTDIR)$(LUADIR)/nemo/
	cp $(LIBNEMO) $(LIBCUDA) $(DESTDIR)$(LIBDIR)/
	cp nemo-lua $(DESTDIR)$(BINDIR)/

uninstall:
	rm -rf $(DESTDIR)$(LUADIR)/nemo
	rm -f $(DESTDIR)$(LIBDIR)/libnemo.so $(DESTDIR)$(LIBDIR)/libnemo_cuda.so $(DESTDIR)$(BINDIR)/nemo-lua

print-config:
	@echo "CC=$(CC) NVCC=$(NVCC) CUDA_ARCH=$(CUDA_ARCH)"; echo "CFLAGS=$(NEMO_CFLAGS) $(CFLAGS)"
	@echo "LUAJIT_INC=$(LUAJIT_INC) LUAJIT_LIB=$(LUAJIT_LIB)"; echo "PREFIX=$(PREFIX) LUADIR=$(LUADIR) LIBDIR=$(LIBDIR) BINDIR=$(BINDIR)"

clean:
	rm -rf build nemo-lua $(CDEF)

-include $(OBJ:.o=.d) $(CU_OBJ:.o=.d) $(EMU_OBJ:.o=.d) build/obj/engine/main.d
