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

#include "nemo.h"

#define NEMO_CUDA_PLUGIN_ABI 4

/* Streams are small integers per device: 0 is the device's default stream (CUDA's legacy
 * stream, which orders itself with the synchronous copies), 1..NEMO_CUDA_MAX_STREAMS a pool of
 * non-blocking streams the plugin creates on first use (they run concurrently with stream 0:
 * ordering across streams is the caller's, through events). */
#define NEMO_CUDA_MAX_STREAMS 32

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
    /* Since ABI 3. The current stream of a device: every kernel, memset and copy of that
     * device goes to it (copies that must finish before returning wait for it alone). */
    int (*set_stream)(int dev, int sid);
    int (*stream_synchronize)(int dev, int sid);
    int (*stream_query)(int dev, int sid, int *done);      /* done: 1 when all its work finished */
    /* Events (cudaEvent_t): timing 0 makes a cheaper event that cannot be timed. */
    int (*event_create)(int dev, int timing, void **e);
    int (*event_destroy)(void *e);
    int (*event_record)(void *e, int dev, int sid);        /* captures the work queued on sid so far */
    int (*event_wait)(int dev, int sid, void *e);          /* work queued on sid later waits for e */
    int (*event_query)(void *e, int *done);
    int (*event_synchronize)(void *e);
    int (*event_elapsed)(void *start, void *end, float *ms);
    /* memcpy's kinds on dev's current stream without waiting: the host side must be page-locked
     * (host_alloc) and stay untouched until the copy has finished. */
    int (*memcpy_async)(void *dst, const void *src, size_t nbytes, int kind, int dev);
    /* Since ABI 4. The device's name, memory, compute capability and the CUDA versions. */
    int (*device_info)(int dev, nemo_cuda_device_info *out);
} nemo_cuda_plugin;

/* The one symbol libnemo_cuda.so exports. */
const nemo_cuda_plugin *nemo_cuda_plugin_get(void);

#endif
