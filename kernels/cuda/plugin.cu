/*
 * kernels/cuda/plugin.cu: libnemo_cuda.so's one exported symbol, nemo_cuda_plugin_get(), and
 * the device services behind it: device count, malloc/free, memcpy/memset, synchronize, the
 * kernels' scratch buffer, and the list of CUDA kernels handed to libnemo's registry (contract:
 * engine/cuda_plugin.h).
 *
 * Non-obvious rules:
 * - Every function returns 0 or a negative nemo_status and never exits or aborts. The CUDA
 *   runtime's own text ("<call>: <message> (<cudaErrorName>)") goes to a thread-local buffer
 *   that error_text() returns; libnemo reads it right after the failing call on the same thread.
 *   Every registered kernel empties the buffer when it starts (nemo_cuda_clear_error), so an
 *   empty text after a kernel call means it succeeded.
 * - A failing cudaGetDeviceCount (no driver, no device, driver too old) is not a crash and not
 *   an exception: it reports 0 devices, and error_text() says why, with the runtime and driver
 *   versions, so "no CUDA device: <reason>" tells the user what to fix.
 * - Non-sticky errors (an out-of-memory cudaMalloc) are cleared with cudaGetLastError so the
 *   next call does not report them again; sticky ones (a kernel fault) keep failing, as the
 *   device is then unusable until the process ends.
 * - Every call selects its device first (cudaSetDevice is cheap when it is already current), so
 *   callers never depend on a per-thread current device.
 */
#include <stdarg.h>
#include <stdio.h>

#include "common.cuh"

/* ==== Errors ==== */

static thread_local char err_buf[1024];   /* empty: no failure since the last kernel began */

int nemo_cuda_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return code;
}

int nemo_cuda_fail(cudaError_t e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n < sizeof err_buf)
        snprintf(err_buf + n, sizeof err_buf - (size_t)n, ": %s (%s)", cudaGetErrorString(e),
                 cudaGetErrorName(e));
    (void)cudaGetLastError();   /* clear a non-sticky error; a sticky one stays */
    return NEMO_ECUDA;
}

void nemo_cuda_clear_error(void) { err_buf[0] = 0; }

static const char *p_error_text(void) { return err_buf; }

/* ==== Devices ==== */

static int p_device_count(int *count) {
    int n = 0;
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n <= 0) {
        int rt = 0, drv = 0;
        (void)cudaRuntimeGetVersion(&rt);
        (void)cudaDriverGetVersion(&drv);   /* 0 when no driver is installed */
        char drvs[64];
        if (drv > 0) snprintf(drvs, sizeof drvs, "driver %d.%d", drv / 1000, drv % 1000 / 10);
        else snprintf(drvs, sizeof drvs, "no NVIDIA driver found");
        if (e != cudaSuccess)
            return nemo_cuda_fail(e, "cudaGetDeviceCount (CUDA runtime %d.%d, %s)",
                                  rt / 1000, rt % 1000 / 10, drvs);
        nemo_cuda_error(NEMO_EDEVICE, "cudaGetDeviceCount found 0 devices (CUDA runtime %d.%d, %s)",
                        rt / 1000, rt % 1000 / 10, drvs);
        return 0;
    }
    *count = n;
    return 0;
}

static int set_device(int dev) {
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    return 0;
}

static int p_malloc(int dev, size_t nbytes, void **p) {
    *p = NULL;
    int rc = set_device(dev);
    if (rc < 0) return rc;
    NEMO_CUDA_TRY(cudaMalloc(p, nbytes), "cudaMalloc(%zu bytes) on cuda:%d", nbytes, dev);
    return 0;
}

static int p_free(int dev, void *p) {
    if (!p) return 0;
    int rc = set_device(dev);
    if (rc < 0) return rc;
    NEMO_CUDA_TRY(cudaFree(p), "cudaFree on cuda:%d", dev);
    return 0;
}

/* kind: 0 host to device, 1 device to host, 2 device to device. cudaMemcpy on the legacy
 * stream: when it returns, a host source may be reused or freed and a host destination holds
 * the data, and it is ordered after every kernel queued before it. Device to device uses
 * cudaMemcpyDefault so that a copy between two GPUs works through UVA. */
static int p_memcpy(void *dst, const void *src, size_t nbytes, int kind, int dev) {
    static const cudaMemcpyKind kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                            cudaMemcpyDefault};
    static const char *names[3] = {"host to device", "device to host", "device to device"};
    if (kind < 0 || kind > 2)
        return nemo_cuda_error(NEMO_EINVAL, "cuda memcpy: kind %d, expected 0 (h2d), 1 (d2h) or 2 (d2d)", kind);
    if (nbytes == 0) return 0;
    int rc = set_device(dev);
    if (rc < 0) return rc;
    NEMO_CUDA_TRY(cudaMemcpy(dst, src, nbytes, kinds[kind]), "cudaMemcpy(%zu bytes, %s) on cuda:%d",
                  nbytes, names[kind], dev);
    return 0;
}

/* Page-locked host memory, usable from every device (cudaHostAllocPortable). */
static int p_host_alloc(size_t nbytes, void **p) {
    *p = NULL;
    NEMO_CUDA_TRY(cudaHostAlloc(p, nbytes ? nbytes : 1, cudaHostAllocPortable), "cudaHostAlloc(%zu bytes)", nbytes);
    return 0;
}
static int p_host_free(void *p) {
    NEMO_CUDA_TRY(cudaFreeHost(p), "cudaFreeHost");
    return 0;
}

static int p_memset(int dev, void *p, int value, size_t nbytes) {
    if (nbytes == 0) return 0;
    int rc = set_device(dev);
    if (rc < 0) return rc;
    NEMO_CUDA_TRY(cudaMemsetAsync(p, value, nbytes, nemo_cuda_stream(dev)),
                  "cudaMemset(%zu bytes) on cuda:%d", nbytes, dev);
    return 0;
}

static int p_synchronize(int dev) {
    int rc = set_device(dev);
    if (rc < 0) return rc;
    NEMO_CUDA_TRY(cudaDeviceSynchronize(), "cudaDeviceSynchronize on cuda:%d", dev);
    return 0;
}

/* ==== Scratch ==== */

/* One buffer per device, grown to the largest request (rounded up to 1 MiB, at least doubling)
 * and never shrunk. Replacing it frees the old one with cudaFree, which waits for the device,
 * so no queued kernel still reads it. */
#define MAX_SCRATCH_DEV 64
static struct { void *p; size_t n; } scratch[MAX_SCRATCH_DEV];

int nemo_cuda_scratch(int dev, size_t nbytes, void **p) {
    *p = NULL;
    if (dev < 0 || dev >= MAX_SCRATCH_DEV)
        return nemo_cuda_error(NEMO_EDEVICE, "cuda scratch: device %d out of range 0..%d", dev, MAX_SCRATCH_DEV - 1);
    if (nbytes == 0) nbytes = 1;
    if (scratch[dev].n < nbytes) {
        size_t want = scratch[dev].n * 2 > nbytes ? scratch[dev].n * 2 : nbytes;
        want = (want + (1u << 20) - 1) & ~(size_t)((1u << 20) - 1);
        int rc = set_device(dev);
        if (rc < 0) return rc;
        if (scratch[dev].p) {
            NEMO_CUDA_TRY(cudaFree(scratch[dev].p), "cuda scratch: cudaFree on cuda:%d", dev);
            scratch[dev].p = NULL;
            scratch[dev].n = 0;
        }
        void *q = NULL;
        cudaError_t e = cudaMalloc(&q, want);
        if (e != cudaSuccess && want > nbytes) { (void)cudaGetLastError(); want = nbytes; e = cudaMalloc(&q, want); }
        if (e != cudaSuccess)
            return nemo_cuda_fail(e, "cuda scratch: cudaMalloc(%zu bytes) on cuda:%d for temporaries", want, dev);
        scratch[dev].p = q;
        scratch[dev].n = want;
    }
    *p = scratch[dev].p;
    return 0;
}

/* ==== Kernels ==== */

/* Filled by NEMO_CUDA_KERNEL constructors in each kernel file at load time. Plain static
 * storage (no constructor of its own), so it is ready before any of them runs. */
#define MAX_CUDA_KERNELS 512
static struct { const char *name; nemo_cuda_kfn fn; } kernel_list[MAX_CUDA_KERNELS];
static int nkernel_list;

void nemo_cuda_add_kernel(const char *name, nemo_cuda_kfn fn) {
    if (nkernel_list < MAX_CUDA_KERNELS) {
        kernel_list[nkernel_list].name = name;
        kernel_list[nkernel_list].fn = fn;
        nkernel_list++;
    }
}

static void p_register_kernels(void (*reg)(const char *name, int devtype, void (*fn)(void))) {
    for (int i = 0; i < nkernel_list; i++) reg(kernel_list[i].name, NEMO_CUDA, kernel_list[i].fn);
}

/* ==== The plugin ==== */

static const nemo_cuda_plugin plugin = {
    NEMO_CUDA_PLUGIN_ABI,
    p_device_count,
    p_malloc,
    p_free,
    p_memcpy,
    p_memset,
    p_synchronize,
    p_error_text,
    p_register_kernels,
    p_host_alloc,
    p_host_free,
};

extern "C" __attribute__((visibility("default"))) const nemo_cuda_plugin *nemo_cuda_plugin_get(void) {
    return &plugin;
}
