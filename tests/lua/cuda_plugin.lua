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
    int (*set_stream)(int dev, int sid);
    int (*stream_synchronize)(int dev, int sid);
    int (*stream_query)(int dev, int sid, int *done);
    int (*event_create)(int dev, int timing, void **e);
    int (*event_destroy)(void *e);
    int (*event_record)(void *e, int dev, int sid);
    int (*event_wait)(int dev, int sid, void *e);
    int (*event_query)(void *e, int *done);
    int (*event_synchronize)(void *e);
    int (*event_elapsed)(void *start, void *end, float *ms);
    int (*memcpy_async)(void *dst, const void *src, size_t nbytes, int kind, int dev);
    int (*device_info)(int dev, nemo_cuda_device_info *out);
} nemo_cuda_plugin;
const nemo_cuda_plugin *nemo_cuda_plugin_get(void);
]]
return {ABI = 4}
