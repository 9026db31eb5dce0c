/*
 * kernels/cuda/plugin.cu: libnemo_cuda.so's one exported symbol, nemo_cuda_plugin_get(), and
 * the device services behind it: device count, malloc/free, memcpy/memset, synchronize, streams
 * and events, the kernels' scratch buffers, and the list of CUDA kernels handed to libnemo's
 * registry (contract: engine/cuda_plugin.h).
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
 * - Streams: id 0 is the legacy default stream; ids 1..NEMO_CUDA_MAX_STREAMS are created on
 *   first use with cudaStreamNonBlocking (so they overlap with stream 0, as PyTorch's pool
 *   streams do) and live as long as the process. The current stream is per device and
 *   process-wide (libnemo drives a device from one host thread).
 * - Synchronous copies keep their old form on stream 0 (cudaMemcpy). On a pool stream they are
 *   cudaMemcpyAsync on it followed by a wait for that stream alone, so they are ordered after the
 *   kernels that produced their source there; device to device copies do not wait.
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
    for (int d = 0; d < n; d++) {   /* a build for other GPUs would fail at its first kernel */
        int major = 0, minor = 0;
        NEMO_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d), "compute capability of cuda:%d", d);
        NEMO_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d), "compute capability of cuda:%d", d);
        if (!nemo_cuda_arch_runs_on(NEMO_CUDA_ARCHS, 10 * major + minor)) {
            nemo_cuda_error(NEMO_EDEVICE,
                            "cuda:%d has compute capability %d.%d, and libnemo_cuda.so was built with code for "
                            "CUDA_ARCH=\"%s\" only (sm_80 or newer is needed): rebuild with `make CUDA_ARCH=%d%d` "
                            "(a list such as CUDA_ARCH=\"%d%d 90\" serves several kinds of GPU)",
                            d, major, minor, NEMO_CUDA_ARCHS, major, minor, major, minor);
            return 0;
        }
    }
    *count = n;
    return 0;
}

static int set_device(int dev) {
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    return 0;
}

/* ==== Streams ==== */

#define MAX_DEV 64
static cudaStream_t pool[MAX_DEV][NEMO_CUDA_MAX_STREAMS + 1];   /* [dev][0] stays 0: the legacy stream */
static int current_sid[MAX_DEV];

static int check_sid(const char *what, int dev, int sid) {
    if (dev < 0 || dev >= MAX_DEV)
        return nemo_cuda_error(NEMO_EDEVICE, "%s: device %d out of range 0..%d", what, dev, MAX_DEV - 1);
    if (sid < 0 || sid > NEMO_CUDA_MAX_STREAMS)
        return nemo_cuda_error(NEMO_EINVAL, "%s: stream id %d out of range 0..%d", what, sid, NEMO_CUDA_MAX_STREAMS);
    return 0;
}

/* The stream of (dev, sid), created on first use (dev selected). */
static int get_stream(const char *what, int dev, int sid, cudaStream_t *st) {
    *st = 0;
    NEMO_CUDA_RC(check_sid(what, dev, sid));
    NEMO_CUDA_RC(set_device(dev));
    if (sid > 0 && !pool[dev][sid])
        NEMO_CUDA_TRY(cudaStreamCreateWithFlags(&pool[dev][sid], cudaStreamNonBlocking),
                      "%s: cudaStreamCreate for stream %d of cuda:%d", what, sid, dev);
    *st = pool[dev][sid];
    return 0;
}

cudaStream_t nemo_cuda_stream(int dev) { return dev >= 0 && dev < MAX_DEV ? pool[dev][current_sid[dev]] : 0; }
int nemo_cuda_stream_id(int dev) { return dev >= 0 && dev < MAX_DEV ? current_sid[dev] : 0; }

static int p_set_stream(int dev, int sid) {
    cudaStream_t st;
    NEMO_CUDA_RC(get_stream("set_stream", dev, sid, &st));
    current_sid[dev] = sid;
    return 0;
}
static int p_stream_synchronize(int dev, int sid) {
    cudaStream_t st;
    NEMO_CUDA_RC(get_stream("stream synchronize", dev, sid, &st));
    NEMO_CUDA_TRY(cudaStreamSynchronize(st), "cudaStreamSynchronize(stream %d of cuda:%d)", sid, dev);
    return 0;
}
static int p_stream_query(int dev, int sid, int *done) {
    cudaStream_t st;
    *done = 0;
    NEMO_CUDA_RC(get_stream("stream query", dev, sid, &st));
    cudaError_t e = cudaStreamQuery(st);
    if (e == cudaErrorNotReady) { (void)cudaGetLastError(); return 0; }
    NEMO_CUDA_TRY(e, "cudaStreamQuery(stream %d of cuda:%d)", sid, dev);
    *done = 1;
    return 0;
}

/* ==== Events ==== */

static int p_event_create(int dev, int timing, void **e) {
    *e = NULL;
    NEMO_CUDA_RC(set_device(dev));
    cudaEvent_t ev;
    NEMO_CUDA_TRY(cudaEventCreateWithFlags(&ev, timing ? cudaEventDefault : cudaEventDisableTiming),
                  "cudaEventCreate on cuda:%d", dev);
    *e = (void *)ev;
    return 0;
}
static int p_event_destroy(void *e) {
    if (e) NEMO_CUDA_TRY(cudaEventDestroy((cudaEvent_t)e), "cudaEventDestroy");
    return 0;
}
static int p_event_record(void *e, int dev, int sid) {
    cudaStream_t st;
    NEMO_CUDA_RC(get_stream("event record", dev, sid, &st));
    NEMO_CUDA_TRY(cudaEventRecord((cudaEvent_t)e, st), "cudaEventRecord(stream %d of cuda:%d)", sid, dev);
    return 0;
}
static int p_event_wait(int dev, int sid, void *e) {
    cudaStream_t st;
    NEMO_CUDA_RC(get_stream("event wait", dev, sid, &st));
    NEMO_CUDA_TRY(cudaStreamWaitEvent(st, (cudaEvent_t)e, 0), "cudaStreamWaitEvent(stream %d of cuda:%d)", sid, dev);
    return 0;
}
static int p_event_query(void *e, int *done) {
    *done = 0;
    cudaError_t r = cudaEventQuery((cudaEvent_t)e);
    if (r == cudaErrorNotReady) { (void)cudaGetLastError(); return 0; }
    NEMO_CUDA_TRY(r, "cudaEventQuery");
    *done = 1;
    return 0;
}
static int p_event_synchronize(void *e) {
    NEMO_CUDA_TRY(cudaEventSynchronize((cudaEvent_t)e), "cudaEventSynchronize");
    return 0;
}
static int p_event_elapsed(void *start, void *end, float *ms) {
    *ms = 0;
    NEMO_CUDA_TRY(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end), "cudaEventElapsedTime");
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
static const cudaMemcpyKind copy_kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDefault};
static const char *copy_names[3] = {"host to device", "device to host", "device to device"};

static int p_memcpy(void *dst, const void *src, size_t nbytes, int kind, int dev) {
    if (kind < 0 || kind > 2)
        return nemo_cuda_error(NEMO_EINVAL, "cuda memcpy: kind %d, expected 0 (h2d), 1 (d2h) or 2 (d2d)", kind);
    if (nbytes == 0) return 0;
    int rc = set_device(dev);
    if (rc < 0) return rc;
    int sid = nemo_cuda_stream_id(dev);
    if (sid == 0) {
        NEMO_CUDA_TRY(cudaMemcpy(dst, src, nbytes, copy_kinds[kind]), "cudaMemcpy(%zu bytes, %s) on cuda:%d",
                      nbytes, copy_names[kind], dev);
        return 0;
    }
    cudaStream_t st = nemo_cuda_stream(dev);
    NEMO_CUDA_TRY(cudaMemcpyAsync(dst, src, nbytes, copy_kinds[kind], st),
                  "cudaMemcpyAsync(%zu bytes, %s) on stream %d of cuda:%d", nbytes, copy_names[kind], sid, dev);
    if (kind != 2)
        NEMO_CUDA_TRY(cudaStreamSynchronize(st), "cudaMemcpy (%s) waiting for stream %d of cuda:%d", copy_names[kind],
                      sid, dev);
    return 0;
}

static int p_memcpy_async(void *dst, const void *src, size_t nbytes, int kind, int dev) {
    if (kind < 0 || kind > 2)
        return nemo_cuda_error(NEMO_EINVAL, "cuda memcpy_async: kind %d, expected 0 (h2d), 1 (d2h) or 2 (d2d)", kind);
    if (nbytes == 0) return 0;
    NEMO_CUDA_RC(set_device(dev));
    NEMO_CUDA_TRY(cudaMemcpyAsync(dst, src, nbytes, copy_kinds[kind], nemo_cuda_stream(dev)),
                  "cudaMemcpyAsync(%zu bytes, %s) on stream %d of cuda:%d", nbytes, copy_names[kind],
                  nemo_cuda_stream_id(dev), dev);
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

/* One buffer per device and stream, grown to the largest request (rounded up to 1 MiB, at least
 * doubling) and never shrunk. Replacing it frees the old one with cudaFree, which waits for the
 * device, so no queued kernel still reads it. */
static struct { void *p; size_t n; } scratch_bufs[MAX_DEV][NEMO_CUDA_MAX_STREAMS + 1];

int nemo_cuda_scratch(int dev, size_t nbytes, void **p) {
    *p = NULL;
    if (dev < 0 || dev >= MAX_DEV)
        return nemo_cuda_error(NEMO_EDEVICE, "cuda scratch: device %d out of range 0..%d", dev, MAX_DEV - 1);
    if (nbytes == 0) nbytes = 1;
    const int sid = current_sid[dev];
    void **bp = &scratch_bufs[dev][sid].p;
    size_t *bn = &scratch_bufs[dev][sid].n;
    if (*bn < nbytes) {
        size_t want = *bn * 2 > nbytes ? *bn * 2 : nbytes;
        want = (want + (1u << 20) - 1) & ~(size_t)((1u << 20) - 1);
        int rc = set_device(dev);
        if (rc < 0) return rc;
        if (*bp) {
            NEMO_CUDA_TRY(cudaFree(*bp), "cuda scratch: cudaFree on cuda:%d", dev);
            *bp = NULL;
            *bn = 0;
        }
        void *q = NULL;
        cudaError_t e = cudaMalloc(&q, want);
        if (e != cudaSuccess && want > nbytes) { (void)cudaGetLastError(); want = nbytes; e = cudaMalloc(&q, want); }
        if (e != cudaSuccess)
            return nemo_cuda_fail(e, "cuda scratch: cudaMalloc(%zu bytes) on cuda:%d for temporaries", want, dev);
        *bp = q;
        *bn = want;
    }
    *p = *bp;
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

static int p_device_info(int dev, nemo_cuda_device_info *out) {
    memset(out, 0, sizeof *out);
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, dev);
    if (e != cudaSuccess) return nemo_cuda_fail(e, "cudaGetDeviceProperties(%d)", dev);
    snprintf(out->name, sizeof out->name, "%s", prop.name);
    out->total_memory = (int64_t)prop.totalGlobalMem;
    out->major = prop.major;
    out->minor = prop.minor;
    out->multi_processor_count = prop.multiProcessorCount;
    (void)cudaRuntimeGetVersion(&out->runtime_version);
    (void)cudaDriverGetVersion(&out->driver_version);
    return 0;
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
    p_set_stream,
    p_stream_synchronize,
    p_stream_query,
    p_event_create,
    p_event_destroy,
    p_event_record,
    p_event_wait,
    p_event_query,
    p_event_synchronize,
    p_event_elapsed,
    p_memcpy_async,
    p_device_info,
};

extern "C" __attribute__((visibility("default"))) const nemo_cuda_plugin *nemo_cuda_plugin_get(void) {
    return &plugin;
}
