/* engine/fake_cuda.c: host-emulated CUDA devices for testing, enabled by NEMO_FAKE_CUDA=N
 * (1..8 devices) in the environment before the first CUDA query.
 *
 * What it is for: every path of the engine and of the Lua package that only runs on a CUDA
 * device (the copies between devices, device checks, the optimizer's and clipping's device
 * kernels, device memory statistics, FSDP2 and training on "cuda", checkpoints of device
 * tensors) can run in CI on a machine without a GPU. What it is not: a test of the CUDA
 * kernels. Device memory is host memory and every "cuda" kernel is the CPU kernel of the same
 * name (the device-only ones are written here on top of the CPU code), so results equal
 * the CPU's bit for bit, and code that reads device memory from the host by mistake is not
 * caught. The CUDA kernels themselves are checked on a GPU by tests/gpu/run.sh.
 *
 * Non-obvious rules:
 * - The fake plugin replaces libnemo_cuda.so entirely (it is not loaded), so it also works
 *   where libnemo_cuda.so exists but finds no GPU.
 * - NEMO_FAKE_CUDA_MEM=BYTES gives each device a capacity: an allocation past it fails as
 *   cudaMalloc would, which exercises the caching allocator's release-and-retry path.
 * - The device-only kernels run the CPU code on a copy of the tensor header marked as CPU:
 *   the data pointer is the same, and no reference is taken (the header lives on the stack
 *   for the duration of one call).
 * - Streams and events: work runs at once whatever the stream, but an event counts as complete
 *   only once something waited for it (event_synchronize, a synchronize of its stream or of its
 *   device). That is the slowest device CUDA allows, so the allocator's waits for other streams
 *   (engine/cuda_stream.c) are observable in tests: a block recorded on another stream stays
 *   out of the cache until then. Elapsed times are host wall-clock times between records.
 */
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "cuda_plugin.h"

#define FAKE_MAXDEV 8
#define FAKE_MAGIC ((size_t)0x6e656d6f66616b65ull)   /* "nemofake" */

static int ndev = 1;
static size_t capacity;                  /* bytes per device, 0: unlimited (NEMO_FAKE_CUDA_MEM) */
static size_t used[FAKE_MAXDEV];
static pthread_mutex_t used_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_error[160];

/* Blocks carry their size and a magic number in a 256-byte header: free() gives the size back to
 * the device, and a damaged header (a kernel that wrote before its buffer) ends the process
 * with a message instead of corrupting the heap. */
static int f_device_count(int *count) { *count = ndev; return 0; }
static int f_malloc(int dev, size_t nbytes, void **p) {
    *p = NULL;
    if (dev < 0 || dev >= ndev) return NEMO_EDEVICE;
    pthread_mutex_lock(&used_lock);
    int over = capacity && used[dev] + nbytes > capacity;
    if (!over) used[dev] += nbytes;
    pthread_mutex_unlock(&used_lock);
    if (over) {
        snprintf(last_error, sizeof last_error, "emulated cuda:%d has %zu of its %zu bytes in use (NEMO_FAKE_CUDA_MEM)",
                 dev, used[dev], capacity);
        return NEMO_ENOMEM;
    }
    void *block = NULL;
    if (posix_memalign(&block, 256, nbytes + 256) != 0) {
        pthread_mutex_lock(&used_lock);
        used[dev] -= nbytes;
        pthread_mutex_unlock(&used_lock);
        snprintf(last_error, sizeof last_error, "emulated cuda:%d: host memory exhausted", dev);
        return NEMO_ENOMEM;
    }
    ((size_t *)block)[0] = nbytes;
    ((size_t *)block)[1] = FAKE_MAGIC;
    *p = (char *)block + 256;
    return 0;
}
static int f_free(int dev, void *p) {
    if (!p) return 0;
    char *block = (char *)p - 256;
    if (((size_t *)block)[1] != FAKE_MAGIC) {   /* a write before the start of a device buffer */
        fprintf(stderr, "nemo: emulated cuda:%d: the header of device block %p was overwritten (a kernel wrote "
                "before the start of its buffer) or the block was not allocated here\n", dev, p);
        abort();
    }
    pthread_mutex_lock(&used_lock);
    if (dev >= 0 && dev < ndev) used[dev] -= *(size_t *)block;
    pthread_mutex_unlock(&used_lock);
    free(block);
    return 0;
}
static int f_memcpy(void *dst, const void *src, size_t nbytes, int kind, int dev) {
    (void)kind; (void)dev;
    if (nbytes) memmove(dst, src, nbytes);
    return 0;
}
static int f_memset(int dev, void *p, int value, size_t nbytes) {
    (void)dev;
    if (nbytes) memset(p, value, nbytes);
    return 0;
}
/* ==== streams and events ==== */

typedef struct fake_event {
    int dev, sid, timing, recorded, done;
    double t;
    struct fake_event *prev, *next;   /* the list of live events */
} fake_event;
static fake_event *events;
static pthread_mutex_t event_lock = PTHREAD_MUTEX_INITIALIZER;

static int bad_stream(const char *what, int dev, int sid) {
    if (dev < 0 || dev >= ndev) {
        snprintf(last_error, sizeof last_error, "%s: emulated cuda:%d does not exist", what, dev);
        return NEMO_EDEVICE;
    }
    if (sid < 0 || sid > NEMO_CUDA_MAX_STREAMS) {
        snprintf(last_error, sizeof last_error, "%s: stream id %d out of range", what, sid);
        return NEMO_EINVAL;
    }
    return 0;
}
/* Every recorded event of (dev, sid) (sid < 0: of any stream) is now complete. */
static void complete(int dev, int sid) {
    pthread_mutex_lock(&event_lock);
    for (fake_event *e = events; e; e = e->next)
        if (e->dev == dev && (sid < 0 || e->sid == sid)) e->done = 1;
    pthread_mutex_unlock(&event_lock);
}
static int f_synchronize(int dev) { complete(dev, -1); return 0; }
static int f_set_stream(int dev, int sid) {
    return bad_stream("set_stream", dev, sid);   /* work runs at once on any stream */
}
static int f_stream_synchronize(int dev, int sid) {
    int rc = bad_stream("stream synchronize", dev, sid);
    if (rc == 0) complete(dev, sid);
    return rc;
}
static int f_stream_query(int dev, int sid, int *done) {
    *done = 1;
    return bad_stream("stream query", dev, sid);
}
static int f_event_create(int dev, int timing, void **e) {
    *e = NULL;
    int rc = bad_stream("event create", dev, 0);
    if (rc < 0) return rc;
    fake_event *f = calloc(1, sizeof *f);
    if (!f) return NEMO_ENOMEM;
    f->dev = dev;
    f->timing = timing;
    pthread_mutex_lock(&event_lock);
    f->next = events;
    if (events) events->prev = f;
    events = f;
    pthread_mutex_unlock(&event_lock);
    *e = f;
    return 0;
}
static int f_event_destroy(void *e) {
    fake_event *f = e;
    if (!f) return 0;
    pthread_mutex_lock(&event_lock);
    if (f->prev) f->prev->next = f->next; else events = f->next;
    if (f->next) f->next->prev = f->prev;
    pthread_mutex_unlock(&event_lock);
    free(f);
    return 0;
}
static int f_event_record(void *e, int dev, int sid) {
    fake_event *f = e;
    int rc = bad_stream("event record", dev, sid);
    if (rc < 0) return rc;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    pthread_mutex_lock(&event_lock);
    f->sid = sid;
    f->recorded = 1;
    f->done = 0;
    f->t = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    pthread_mutex_unlock(&event_lock);
    return 0;
}
static int f_event_wait(int dev, int sid, void *e) {
    (void)e;
    return bad_stream("event wait", dev, sid);
}
static int f_event_query(void *e, int *done) {
    fake_event *f = e;
    pthread_mutex_lock(&event_lock);
    *done = !f->recorded || f->done;
    pthread_mutex_unlock(&event_lock);
    return 0;
}
static int f_event_synchronize(void *e) {
    fake_event *f = e;
    pthread_mutex_lock(&event_lock);
    f->done = 1;
    pthread_mutex_unlock(&event_lock);
    return 0;
}
static int f_event_elapsed(void *start, void *end, float *ms) {
    fake_event *a = start, *b = end;
    if (!a->timing || !b->timing || !a->recorded || !b->recorded) {
        snprintf(last_error, sizeof last_error, "emulated cudaEventElapsedTime: an event without timing or not recorded");
        return NEMO_ECUDA;
    }
    *ms = (float)((b->t - a->t) * 1e3);
    return 0;
}
static int f_memcpy_async(void *dst, const void *src, size_t nbytes, int kind, int dev) {
    return f_memcpy(dst, src, nbytes, kind, dev);
}
static const char *f_error_text(void) { return last_error[0] ? last_error : "emulated CUDA device"; }

/* the same tensor header, marked as a CPU tensor */
static nemo_tensor on_host(const nemo_tensor *t) {
    nemo_tensor h = *t;
    h.devtype = NEMO_CPU;
    h.devindex = 0;
    return h;
}

/* ==== the device-only kernels, through the CPU code ==== */

/* engine/core.c: dst = src read with strides sstride (broadcast to dst's shape) */
static int k_copy(nemo_tensor *dst, const nemo_tensor *src, const int64_t *sstride) {
    nemo_tensor d = on_host(dst), s = on_host(src);
    s.ndim = dst->ndim;
    memcpy(s.shape, dst->shape, sizeof(int64_t) * (size_t)dst->ndim);
    memcpy(s.stride, sstride, sizeof(int64_t) * (size_t)dst->ndim);
    return nemo_copy_(&d, &s);
}
static int k_fill(nemo_tensor *t, double value) {
    nemo_tensor h = on_host(t);
    return nemo_fill_(&h, value);
}
/* engine/optim.c */
static int k_adamw(nemo_tensor *p, const nemo_tensor *g, nemo_tensor *m, nemo_tensor *v, double lr, double beta1,
                   double beta2, double eps, double weight_decay, int64_t step) {
    nemo_tensor hp = on_host(p), hg = on_host(g), hm = on_host(m), hv = on_host(v);
    return nemo_adamw_step(&hp, &hg, &hm, &hv, lr, beta1, beta2, eps, weight_decay, step);
}
static int k_sum_squares(const nemo_tensor *t, double *out) {
    nemo_tensor h = on_host(t);
    return nemo_sum_squares(&h, out);
}

/* the multi-tensor forms: host-marked header copies, then the CPU path */
/* h[i] = on_host(ts[i]) and ptr[i] = &h[i] for i < n */
static void on_host_all(int n, const nemo_tensor *const *ts, nemo_tensor *h, nemo_tensor **ptr) {
    for (int i = 0; i < n; i++) { h[i] = on_host(ts[i]); ptr[i] = &h[i]; }
}
static int k_adamw_many(int n, nemo_tensor *const *p, const nemo_tensor *const *g, nemo_tensor *const *m,
                        nemo_tensor *const *v, double lr, double beta1, double beta2, double eps, double weight_decay,
                        const int64_t *steps) {
    nemo_tensor *h = malloc(sizeof(nemo_tensor) * 4 * (size_t)n);
    nemo_tensor **ptr = malloc(sizeof(nemo_tensor *) * 4 * (size_t)n);
    int rc = NEMO_ENOMEM;
    if (h && ptr) {
        const nemo_tensor *const *src[4] = {(const nemo_tensor *const *)p, g, (const nemo_tensor *const *)m,
                                            (const nemo_tensor *const *)v};
        for (int q = 0; q < 4; q++) on_host_all(n, src[q], h + q * n, ptr + q * n);
        rc = nemo_adamw_step_many(n, ptr, (const nemo_tensor *const *)(ptr + n), ptr + 2 * n, ptr + 3 * n, lr, beta1,
                                  beta2, eps, weight_decay, steps);
    }
    free(h);
    free(ptr);
    return rc;
}
static int k_sum_squares_many(int n, const nemo_tensor *const *ts, double *out) {
    nemo_tensor *h = malloc(sizeof(nemo_tensor) * (size_t)n);
    nemo_tensor **ptr = malloc(sizeof(nemo_tensor *) * (size_t)n);
    int rc = NEMO_ENOMEM;
    if (h && ptr) {
        on_host_all(n, ts, h, ptr);
        rc = nemo_sum_squares_many(n, (const nemo_tensor *const *)ptr, out);
    }
    free(h);
    free(ptr);
    return rc;
}

static void f_register_kernels(void (*reg)(const char *name, int devtype, void (*fn)(void))) {
    nemo_kernel_mirror_cpu(NEMO_CUDA);
    reg("copy", NEMO_CUDA, (nemo_kfn)k_copy);
    reg("fill", NEMO_CUDA, (nemo_kfn)k_fill);
    reg("adamw", NEMO_CUDA, (nemo_kfn)k_adamw);
    reg("sum_squares", NEMO_CUDA, (nemo_kfn)k_sum_squares);
    reg("adamw_many", NEMO_CUDA, (nemo_kfn)k_adamw_many);
    reg("sum_squares_many", NEMO_CUDA, (nemo_kfn)k_sum_squares_many);
}

/* "Page-locked" host memory: ordinary host memory (the copies are host copies anyway). */
static int f_host_alloc(size_t nbytes, void **p) {
    *p = NULL;
    if (posix_memalign(p, 256, nbytes ? nbytes : 1) != 0) {
        snprintf(last_error, sizeof last_error, "emulated cudaHostAlloc(%zu bytes): host memory exhausted", nbytes);
        return NEMO_ENOMEM;
    }
    return 0;
}
static int f_host_free(void *p) {
    free(p);
    return 0;
}

static int f_device_info(int dev, nemo_cuda_device_info *out) {
    memset(out, 0, sizeof *out);
    if (dev < 0 || dev >= ndev) return NEMO_ERR(NEMO_EDEVICE, "fake CUDA: no device %d", dev);
    snprintf(out->name, sizeof out->name, "emulated CUDA device (NEMO_FAKE_CUDA: host memory, CPU kernels)");
    const char *cap = getenv("NEMO_FAKE_CUDA_MEM");
    out->total_memory = cap && atoll(cap) > 0 ? (int64_t)atoll(cap) : 0;
    out->emulated = 1;
    return 0;
}

static const nemo_cuda_plugin fake_plugin = {
    NEMO_CUDA_PLUGIN_ABI,
    f_device_count,
    f_malloc,
    f_free,
    f_memcpy,
    f_memset,
    f_synchronize,
    f_error_text,
    f_register_kernels,
    f_host_alloc,
    f_host_free,
    f_set_stream,
    f_stream_synchronize,
    f_stream_query,
    f_event_create,
    f_event_destroy,
    f_event_record,
    f_event_wait,
    f_event_query,
    f_event_synchronize,
    f_event_elapsed,
    f_memcpy_async,
    f_device_info,
};

/* The fake plugin when NEMO_FAKE_CUDA asks for one (value: device count, 1 to 8), else NULL.
 * NEMO_FAKE_CUDA_MEM: each device's capacity in bytes (unset: unlimited), so that running out
 * of device memory can be tested. */
const nemo_cuda_plugin *nemo_fake_cuda_plugin(void) {
    const char *env = getenv("NEMO_FAKE_CUDA");
    if (!env || !*env || !strcmp(env, "0")) return NULL;
    int n = atoi(env);
    ndev = n >= 1 && n <= FAKE_MAXDEV ? n : 1;
    const char *mem = getenv("NEMO_FAKE_CUDA_MEM");
    capacity = mem && *mem ? (size_t)strtoull(mem, NULL, 10) : 0;
    return &fake_plugin;
}
