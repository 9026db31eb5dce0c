/*
 * cuda_plugin.h: the contract between libnemo (which never links CUDA) and libnemo_cuda.so
 * (built from kernels/cuda when nvcc exists). libnemo dlopens the plugin the first time a CUDA
 * device is asked for, so a CPU-only machine never needs the CUDA runtime.
 *
 * Every function returns 0 or a negative nemo_status; on failure error_text() gives the CUDA
 * library's own message.
 */
#ifndef NEMO_CUDA_PLUGIN_H
#define NEMO_CUDA_PLUGIN_H

#include <stddef.h>

#define NEMO_CUDA_PLUGIN_ABI 2

typedef struct nemo_cuda_plugin {
    int abi;
    int (*device_count)(int *count);
    int (*malloc)(int dev, size_t nbytes, void **p);
    int (*free)(int dev, void *p);
    int (*memcpy)(void *dst, const void *src, size_t nbytes, int kind, int dev); /* 0 h2d 1 d2h 2 d2d */
    int (*memset)(int dev, void *p, int value, size_t nbytes);
    int (*synchronize)(int dev);
    const char *(*error_text)(void);
    /* Registers the plugin's kernels with libnemo's registry. */
    void (*register_kernels)(void (*reg)(const char *name, int devtype, void (*fn)(void)));
    /* Page-locked host memory (cudaHostAlloc / cudaFreeHost): copies from and to it are DMA
     * transfers without a staging copy. Since ABI 2. */
    int (*host_alloc)(size_t nbytes, void **p);
    int (*host_free)(void *p);
} nemo_cuda_plugin;

/* The one symbol libnemo_cuda.so exports. */
const nemo_cuda_plugin *nemo_cuda_plugin_get(void);

#endif
