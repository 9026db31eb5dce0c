-- tests/lua/cuda_plugin.lua: engine/cuda_plugin.h's struct for the tests that load
-- libnemo_cuda.so themselves (test_cuda.lua, test_cuda_kernels.lua, tests/gpu/check_ops.lua).
-- Keep it equal to the header; returns {ABI = the header's NEMO_CUDA_PLUGIN_ABI}.
local ffi = require "ffi"
ffi.cdef [[
typedef struct nemo_cuda_plugin {
    int abi;
    int (*device_count)(int *count);
    int (*malloc)(int dev, size_t nbytes, void **p);
    int (*free)(int dev, void *p);
    int (*memcpy)(void *dst, const void *src, size_t nbytes, int kind, int dev);
    int (*memset)(int dev, void *p, int value, size_t nbytes);
    int (*synchronize)(int dev);
    const char *(*error_text)(void);
    void (*register_kernels)(void (*reg)(const char *name, int devtype, void (*fn)(void)));
    int (*host_alloc)(size_t nbytes, void **p);
    int (*host_free)(void *p);
} nemo_cuda_plugin;
const nemo_cuda_plugin *nemo_cuda_plugin_get(void);
]]
return {ABI = 2}
