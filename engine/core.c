/*
 * core.c: errors, dtypes, devices, allocation, storages, tensors and views, copies and fills.
 *
 * Non-obvious rule: storages are freed when their refcount reaches zero, and every byte a
 * storage holds is counted in the per-device current/peak statistics, so memory_stats() shows
 * what live tensors really hold (mmap'd files are not counted: they are not our allocations).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "cuda_plugin.h"

const nemo_cuda_plugin *nemo_fake_cuda_plugin(void);   /* engine/fake_cuda.c */

/* ==== Errors ==== */

static _Thread_local char err_msg[2048];
static _Thread_local int err_status;
/* The CUDA kernel this thread looked up last (see cuda_pending_error). */
static _Thread_local const char *cuda_kernel_name;
static void cuda_pending_error(void);

int nemo_set_error(int code, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n < sizeof err_msg) {
        const char *base = strrchr(file, '/');
        snprintf(err_msg + n, sizeof err_msg - (size_t)n, " (%s:%d)", base ? base + 1 : file, line);
    }
    err_status = code;
    cuda_kernel_name = NULL;
    return code;
}

NEMO_API const char *nemo_last_error(void) { cuda_pending_error(); return err_msg[0] ? err_msg : "no error"; }
NEMO_API int nemo_last_status(void) { cuda_pending_error(); return err_status; }
NEMO_API void nemo_clear_error(void) { err_msg[0] = 0; err_status = 0; cuda_kernel_name = NULL; }
NEMO_API int nemo_abi_version(void) { return NEMO_ABI_VERSION; }
NEMO_API const char *nemo_version(void) { return "0.1.0"; }

/* ==== Threads ==== */

extern void openblas_set_num_threads(int) __attribute__((weak));

NEMO_API int nemo_set_num_threads(int n) {
    if (n < 1) return NEMO_ERR(NEMO_EINVAL, "set_num_threads: expected n >= 1, got %d", n);
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    if (openblas_set_num_threads) openblas_set_num_threads(n);
    return 0;
}

NEMO_API int nemo_get_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ==== dtypes ==== */

static const char *dtype_names[NEMO_NDTYPE] = {
    "float32", "float64", "bfloat16", "float16", "int64", "int32", "bool"};
static const int dtype_sizes[NEMO_NDTYPE] = {4, 8, 2, 2, 8, 4, 1};

NEMO_API const char *nemo_dtype_name(int dtype) {
    return (dtype >= 0 && dtype < NEMO_NDTYPE) ? dtype_names[dtype] : "?";
}
NEMO_API int nemo_dtype_size(int dtype) {
    return (dtype >= 0 && dtype < NEMO_NDTYPE) ? dtype_sizes[dtype] : 0;
}
NEMO_API int nemo_dtype_is_float(int dtype) { return dtype >= NEMO_F32 && dtype <= NEMO_F16; }

NEMO_API int nemo_dtype_from_name(const char *name) {
    static const struct { const char *name; int dtype; } alias[] = {
        {"float32", NEMO_F32}, {"float", NEMO_F32}, {"fp32", NEMO_F32}, {"F32", NEMO_F32},
        {"float64", NEMO_F64}, {"double", NEMO_F64}, {"fp64", NEMO_F64}, {"F64", NEMO_F64},
        {"bfloat16", NEMO_BF16}, {"bf16", NEMO_BF16}, {"BF16", NEMO_BF16},
        {"float16", NEMO_F16}, {"half", NEMO_F16}, {"fp16", NEMO_F16}, {"F16", NEMO_F16},
        {"int64", NEMO_I64}, {"long", NEMO_I64}, {"I64", NEMO_I64},
        {"int32", NEMO_I32}, {"int", NEMO_I32}, {"I32", NEMO_I32},
        {"bool", NEMO_BOOL}, {"BOOL", NEMO_BOOL}};
    if (!name) return -1;
    if (!strncmp(name, "torch.", 6)) name += 6;
    for (size_t i = 0; i < sizeof alias / sizeof alias[0]; i++)
        if (!strcmp(alias[i].name, name)) return alias[i].dtype;
    return -1;
}

int nemo_promote(int a, int b) {
    if (a == b) return a;
    int fa = nemo_dtype_is_float(a), fb = nemo_dtype_is_float(b);
    if (fa && fb) {
        if (a == NEMO_F64 || b == NEMO_F64) return NEMO_F64;
        return NEMO_F32;   /* f32 with a half type, or bf16 with f16 */
    }
    if (fa) return a;
    if (fb) return b;
    if (a == NEMO_BOOL) return b;
    if (b == NEMO_BOOL) return a;
    return NEMO_I64;       /* i32 with i64 */
}

/* IEEE half <-> float, round to nearest even. */
float nemo_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else {   /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &u, 4); return f;
}

uint16_t nemo_f32_to_f16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);              /* NaN */
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);             /* overflow -> inf */
    if (abs < 0x38800000u) {                                                /* subnormal / zero */
        if (abs < 0x33000000u) return (uint16_t)sign;
        uint32_t e = abs >> 23, m = (abs & 0x7fffffu) | 0x800000u;
        int shift = (int)(126 - e);   /* 113 + 13 - e, into a 10-bit subnormal mantissa */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = abs + 0xc8000fffu + ((abs >> 13) & 1u);   /* rebias exponent and round */
    return (uint16_t)(sign | (r >> 13));
}

/* ==== Devices and the CUDA plugin ==== */

static pthread_once_t cuda_once = PTHREAD_ONCE_INIT;
static const nemo_cuda_plugin *cuda;
static char cuda_reason[512] = "not probed";
static int cuda_count;
static int cuda_fake;   /* the devices are engine/fake_cuda.c's */

static void cuda_load(void) {
    const nemo_cuda_plugin *fake = nemo_fake_cuda_plugin();   /* NEMO_FAKE_CUDA: engine/fake_cuda.c */
    if (fake) {
        fake->device_count(&cuda_count);
        cuda = fake;
        cuda_fake = 1;
        fake->register_kernels((void (*)(const char *, int, void (*)(void)))nemo_kernel_register);
        cuda_reason[0] = 0;
        return;
    }
    const char *env = getenv("NEMO_CUDA_LIB");
    void *h = NULL;
    if (env && *env) h = dlopen(env, RTLD_NOW | RTLD_LOCAL);
    if (!h) {   /* beside libnemo.so */
        Dl_info info;
        if (dladdr((void *)&cuda_load, &info) && info.dli_fname) {
            char path[4096];
            snprintf(path, sizeof path, "%s", info.dli_fname);
            char *slash = strrchr(path, '/');
            if (slash) {
                snprintf(slash + 1, sizeof path - (size_t)(slash + 1 - path), "libnemo_cuda.so");
                h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            }
        }
    }
    if (!h) h = dlopen("libnemo_cuda.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(cuda_reason, sizeof cuda_reason,
                 "libnemo was built without CUDA or libnemo_cuda.so cannot be loaded (%s)",
                 e ? e : "not found");
        return;
    }
    const nemo_cuda_plugin *(*get)(void) =
        (const nemo_cuda_plugin *(*)(void))dlsym(h, "nemo_cuda_plugin_get");
    if (!get) { snprintf(cuda_reason, sizeof cuda_reason, "libnemo_cuda.so has no nemo_cuda_plugin_get"); return; }
    const nemo_cuda_plugin *p = get();
    if (!p || p->abi != NEMO_CUDA_PLUGIN_ABI) {
        snprintf(cuda_reason, sizeof cuda_reason, "libnemo_cuda.so has plugin ABI %d, expected %d",
                 p ? p->abi : -1, NEMO_CUDA_PLUGIN_ABI);
        return;
    }
    int n = 0;
    if (p->device_count(&n) < 0 || n <= 0) {
        snprintf(cuda_reason, sizeof cuda_reason, "no usable CUDA device (%s)",
                 p->error_text());
        return;
    }
    cuda = p;
    cuda_count = n;
    p->register_kernels((void (*)(const char *, int, void (*)(void)))nemo_kernel_register);
    cuda_reason[0] = 0;
}

NEMO_API int nemo_device_count(int devtype) {
    if (devtype == NEMO_CPU) return 1;
    if (devtype != NEMO_CUDA) return 0;
    pthread_once(&cuda_once, cuda_load);
    return cuda_count;
}

NEMO_API int nemo_cuda_get_device_info(int devindex, nemo_cuda_device_info *out) {
    int rc = nemo_check_device(NEMO_CUDA, devindex);
    if (rc) return rc;
    rc = cuda->device_info(devindex, out);
    if (rc < 0 && !cuda_fake) return NEMO_ERR(rc, "%s", cuda->error_text());
    return rc;
}

int nemo_cuda_emulated(void) {
    pthread_once(&cuda_once, cuda_load);
    return cuda_fake;
}

NEMO_API const char *nemo_cuda_unavailable_reason(void) {
    pthread_once(&cuda_once, cuda_load);
    return cuda ? NULL : cuda_reason;
}

int nemo_check_device(int devtype, int devindex) {
    if (devtype == NEMO_CPU) {
        if (devindex != 0) return NEMO_ERR(NEMO_EDEVICE, "device cpu:%d: only cpu:0 exists", devindex);
        return 0;
    }
    if (devtype == NEMO_CUDA) {
        int n = nemo_device_count(NEMO_CUDA);
        if (n == 0) return NEMO_ERR(NEMO_EDEVICE, "no CUDA device: %s", cuda_reason);
        if (devindex < 0 || devindex >= n)
            return NEMO_ERR(NEMO_EDEVICE, "device cuda:%d does not exist (%d CUDA devices)", devindex, n);
        return 0;
    }
    return NEMO_ERR(NEMO_EDEVICE, "unknown device type %d", devtype);
}

NEMO_API int nemo_device_synchronize(int devtype, int devindex) {
    int rc = nemo_check_device(devtype, devindex);
    if (rc < 0 || devtype == NEMO_CPU) return rc;
    if (cuda->synchronize(devindex) < 0)
        return NEMO_ERR(NEMO_ECUDA, "cuda synchronize: %s", cuda->error_text());
    return 0;
}

const char *nemo_cuda_error_text(void) { return cuda ? cuda->error_text() : cuda_reason; }

const struct nemo_cuda_plugin *nemo_cuda_plugin_ptr(void) {
    pthread_once(&cuda_once, cuda_load);
    return cuda;
}

/* A front-end that calls a CUDA kernel may only propagate its status (NEMO_TRY(k(...))): the
 * message then lives in the plugin's error text. nemo_kernel_get clears this thread's message
 * when it hands out a CUDA kernel and remembers the name; every CUDA kernel empties the
 * plugin's text when it starts. So when the message is still empty here and the plugin's text
 * is not, the kernel failed, and its text becomes the message. A message set after the lookup
 * (nemo_set_error) takes precedence. */
static void cuda_pending_error(void) {
    if (err_msg[0] || !cuda_kernel_name || !cuda) return;
    const char *t = cuda->error_text();
    if (!t || !t[0]) return;
    snprintf(err_msg, sizeof err_msg, "%s: cuda kernel failed: %s", cuda_kernel_name, t);
    err_status = NEMO_ECUDA;
    cuda_kernel_name = NULL;
}

int nemo_dev_memcpy(void *dst, const void *src, size_t n, int kind, int devindex) {
    if (!cuda) return NEMO_ERR(NEMO_EDEVICE, "no CUDA device: %s", cuda_reason);
    if (cuda->memcpy(dst, src, n, kind, devindex) < 0)
        return NEMO_ERR(NEMO_ECUDA, "cuda memcpy of %zu bytes: %s", n, cuda->error_text());
    return 0;
}

/* ==== Kernel registry ==== */

#define MAX_KERNELS 1024
/* lp[devtype]: the kernel was also registered as "<name>.lp" (see nemo_io_dtype). */
static struct { const char *name; nemo_kfn fn[NEMO_NDEVTYPE]; unsigned char lp[NEMO_NDEVTYPE]; } kernels[MAX_KERNELS];
static int nkernels;
static pthread_mutex_t kernel_lock = PTHREAD_MUTEX_INITIALIZER;

/* "<base>.lp" is not an entry of its own: it marks base's kernel on devtype as one that takes
 * bfloat16 / float16 operands (the name of a new entry is kept, so it must outlive the process:
 * a literal, or the copy made here for a ".lp" that comes before its base). */
void nemo_kernel_register(const char *name, int devtype, nemo_kfn fn) {
    if (devtype < 0 || devtype >= NEMO_NDEVTYPE) return;
    const size_t len = strlen(name);
    const int lp = len > 3 && !strcmp(name + len - 3, ".lp");
    const size_t blen = lp ? len - 3 : len;
    pthread_mutex_lock(&kernel_lock);
    int i;
    for (i = 0; i < nkernels; i++)
        if (!strncmp(kernels[i].name, name, blen) && kernels[i].name[blen] == 0) break;
    if (i == nkernels && nkernels < MAX_KERNELS) {
        kernels[i].name = lp ? strndup(name, blen) : name;
        if (kernels[i].name) nkernels++;
    }
    if (i < nkernels) {
        if (lp) kernels[i].lp[devtype] = 1;
        else kernels[i].fn[devtype] = fn;
    }
    pthread_mutex_unlock(&kernel_lock);
}

static int kernel_index(const char *name, int devtype) {
    for (int i = 0; i < nkernels; i++)
        if (!strcmp(kernels[i].name, name))
            return devtype >= 0 && devtype < NEMO_NDEVTYPE && kernels[i].fn[devtype] ? i : -1;
    return -1;
}

nemo_kfn nemo_kernel_get(const char *name, int devtype) {
    int i = kernel_index(name, devtype);
    if (i >= 0) {
        if (devtype == NEMO_CUDA) {   /* see cuda_pending_error */
            err_msg[0] = 0;
            err_status = 0;
            cuda_kernel_name = kernels[i].name;
        }
        return kernels[i].fn[devtype];
    }
    NEMO_ERR(NEMO_EUNSUPPORTED, "%s: no %s kernel", name, devtype == NEMO_CUDA ? "cuda" : "cpu");
    return NULL;
}

int nemo_kernel_has(const char *name, int devtype) { return kernel_index(name, devtype) >= 0; }

int nemo_io_dtype(const char *name, int devtype, int dt, int cdt) {
    static int off = -1;
    if (off < 0) {
        const char *e = getenv("NEMO_LOWP_IO");
        off = e && strcmp(e, "0") == 0;
    }
    if (off || cdt != NEMO_F32 || (dt != NEMO_BF16 && dt != NEMO_F16)) return cdt;
    int i = kernel_index(name, devtype);
    return i >= 0 && kernels[i].lp[devtype] ? dt : cdt;
}

void nemo_kernel_mirror_cpu(int devtype) {
    if (devtype <= NEMO_CPU || devtype >= NEMO_NDEVTYPE) return;
    pthread_mutex_lock(&kernel_lock);
    for (int i = 0; i < nkernels; i++)
        if (kernels[i].fn[NEMO_CPU] && !kernels[i].fn[devtype]) kernels[i].fn[devtype] = kernels[i].fn[NEMO_CPU];
    pthread_mutex_unlock(&kernel_lock);
}

/* ==== Allocation ==== */

/* Per-device statistics. Index 0 is the CPU, 1 + i is cuda:i. */
#define MAX_DEV 17
static int64_t mem_cur[MAX_DEV], mem_peak[MAX_DEV], mem_cached[MAX_DEV];
static pthread_mutex_t mem_lock = PTHREAD_MUTEX_INITIALIZER;

static int dev_slot(int devtype, int devindex) {
    int s = devtype == NEMO_CPU ? 0 : 1 + devindex;
    return (s >= 0 && s < MAX_DEV) ? s : MAX_DEV - 1;
}

/* CPU block cache: blocks of at least CACHE_MIN bytes are kept on free and reused for a
 * request of the same rounded size. A training step allocates the same sizes every iteration,
 * and giving them back to the kernel makes every step fault and zero its pages again. */
#define CACHE_MIN (1u << 20)
#define CACHE_SLOTS 256
typedef struct { void *p; size_t n; } host_block;
static host_block cpu_cache[CACHE_SLOTS];
static int cpu_ncache;
/* Host block caches (the CPU's, the pinned one), mem_lock held. take: a cached block of exactly
 * n bytes, or NULL. put: keep block p of n bytes when there is room (1) or not (0). Both keep
 * the CPU's cached-bytes statistic. */
static void *host_cache_take(host_block *cache, int *count, size_t n) {
    for (int i = 0; i < *count; i++)
        if (cache[i].n == n) {
            void *p = cache[i].p;
            cache[i] = cache[--*count];
            mem_cached[0] -= (int64_t)n;
            return p;
        }
    return NULL;
}
static int host_cache_put(host_block *cache, int *count, int cap, void *p, size_t n) {
    if (*count >= cap) return 0;
    cache[*count].p = p;
    cache[*count].n = n;
    ++*count;
    mem_cached[0] += (int64_t)n;
    return 1;
}

static size_t round_size(size_t n) {
    if (n < CACHE_MIN) return (n + 63) & ~(size_t)63;
    /* 1/8 steps of the power of two below: at most 12.5% waste */
    size_t p = 1; while (p * 2 <= n) p *= 2;
    size_t step = p / 8;
    return (n + step - 1) / step * step;
}

static void malloc_tune(void) {
    /* Keep glibc from returning large blocks to the kernel on every free (see DESIGN.md). */
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
}
static pthread_once_t tune_once = PTHREAD_ONCE_INIT;

/* CUDA block cache: every CUDA block is cached on free and reused for a request of the same
 * size class on the same stream, per device (cudaMalloc and cudaFree cost 10 us to ms and
 * cudaFree synchronizes the device). Size classes: multiples of 512 bytes up to 1 MiB, of 2 MiB
 * above. A class's free blocks are a stack in a bin; bins live in an open-addressing table
 * keyed by class size + stream id (ids are below 512, so the key is the size with the id in
 * its low bits), per device. Reusing a block at once is safe because the new owner's work is
 * queued on the stream the old owner's was; blocks also used on other streams
 * (nemo_record_stream) wait until events on those streams completed (engine/cuda_stream.c).
 * When cudaMalloc fails, the device's whole cache is released (waiting for such blocks) and
 * the allocation tried once more. */
#define CUDA_SMALL_MAX ((size_t)1 << 20)
#define CUDA_SMALL_STEP ((size_t)512)
#define CUDA_LARGE_STEP ((size_t)2 << 20)
typedef struct { size_t size; int n, cap; void **p; } cuda_bin;   /* size: the key, class size | stream id */
#define BIN_BYTES(key) ((key) & ~(CUDA_SMALL_STEP - 1))
static struct { cuda_bin *bins; int cap, used; } cuda_cache[MAX_DEV];

static size_t cuda_round_size(size_t n) {
    if (n <= CUDA_SMALL_MAX) return (n + CUDA_SMALL_STEP - 1) / CUDA_SMALL_STEP * CUDA_SMALL_STEP;
    return (n + CUDA_LARGE_STEP - 1) / CUDA_LARGE_STEP * CUDA_LARGE_STEP;
}

static size_t cuda_hash(size_t size, int cap) {   /* splitmix64's finaliser: every bit mixes in */
    uint64_t x = (uint64_t)size;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return (size_t)x & (size_t)(cap - 1);
}

/* The bin of class size n on slot s (mem_lock held); create: add it when missing (NULL when
 * missing and not created, or out of host memory). */
static cuda_bin *cuda_bin_find(int s, size_t n, int create) {
    if (cuda_cache[s].cap) {
        for (size_t i = cuda_hash(n, cuda_cache[s].cap);; i = (i + 1) & (size_t)(cuda_cache[s].cap - 1)) {
            cuda_bin *b = &cuda_cache[s].bins[i];
            if (b->size == n) return b;
            if (b->size == 0) break;
        }
    }
    if (!create) return NULL;
    if (2 * (cuda_cache[s].used + 1) > cuda_cache[s].cap) {   /* grow to keep the load under 1/2 */
        int ncap = cuda_cache[s].cap ? 2 * cuda_cache[s].cap : 64;
        cuda_bin *nb = calloc((size_t)ncap, sizeof *nb);
        if (!nb) return NULL;
        for (int i = 0; i < cuda_cache[s].cap; i++) {
            cuda_bin *o = &cuda_cache[s].bins[i];
            if (!o->size) continue;
            size_t j = cuda_hash(o->size, ncap);
            while (nb[j].size) j = (j + 1) & (size_t)(ncap - 1);
            nb[j] = *o;
        }
        free(cuda_cache[s].bins);
        cuda_cache[s].bins = nb;
        cuda_cache[s].cap = ncap;
    }
    size_t i = cuda_hash(n, cuda_cache[s].cap);
    while (cuda_cache[s].bins[i].size) i = (i + 1) & (size_t)(cuda_cache[s].cap - 1);
    cuda_cache[s].bins[i].size = n;
    cuda_cache[s].used++;
    return &cuda_cache[s].bins[i];
}

static int cuda_cache_put(int s, void *p, size_t n, int sid);

/* A block that waited for other streams goes to its bin (mem_lock held; it already counts as
 * cached). */
static void pending_put(void *p, size_t n, int dev, int sid) {
    int s = dev_slot(NEMO_CUDA, dev);
    mem_cached[s] -= (int64_t)n;
    if (!cuda_cache_put(s, p, n, sid)) cuda->free(dev, p);
}

/* Gives every cached block of cuda:devindex back to the driver (after the blocks waiting for
 * other streams are done). */
static void cuda_empty_cache(int devindex) {
    int s = dev_slot(NEMO_CUDA, devindex);
    void **list = NULL;
    size_t nlist = 0, cap = 0;
    pthread_mutex_lock(&mem_lock);
    nemo_sblock_sweep(devindex, 1, pending_put);
    for (int i = 0; i < cuda_cache[s].cap; i++) {
        cuda_bin *b = &cuda_cache[s].bins[i];
        if (!b->n) continue;
        if (nlist + (size_t)b->n > cap) {
            size_t ncap = (nlist + (size_t)b->n) * 2;
            void **nl = realloc(list, ncap * sizeof *nl);
            if (!nl) break;   /* out of host memory: free what is listed so far */
            list = nl;
            cap = ncap;
        }
        for (int k = 0; k < b->n; k++) list[nlist++] = b->p[k];
        mem_cached[s] -= (int64_t)BIN_BYTES(b->size) * b->n;
        b->n = 0;
    }
    pthread_mutex_unlock(&mem_lock);
    for (size_t i = 0; i < nlist; i++) cuda->free(devindex, list[i]);
    free(list);
}

static void *cuda_alloc(int devindex, size_t n) {
    int s = dev_slot(NEMO_CUDA, devindex), sid = nemo_cuda_cur_sid(devindex);
    void *p = NULL;
    pthread_mutex_lock(&mem_lock);
    nemo_sblock_sweep(devindex, 0, pending_put);
    cuda_bin *b = cuda_bin_find(s, n | (size_t)sid, 0);
    if (b && b->n > 0) {
        p = b->p[--b->n];
        mem_cached[s] -= (int64_t)n;
    }
    pthread_mutex_unlock(&mem_lock);
    if (!p && cuda->malloc(devindex, n, &p) < 0) {
        cuda_empty_cache(devindex);
        if (cuda->malloc(devindex, n, &p) < 0) {
            NEMO_ERR(NEMO_ENOMEM, "out of memory on cuda:%d allocating %zu bytes (cache emptied and retried): %s",
                     devindex, n, cuda->error_text());
            return NULL;
        }
    }
    nemo_sblock_alloc(p, devindex, sid);
    return p;
}

/* Caches a CUDA block of class size n for stream sid; returns 0 when it could not (then the
 * caller frees it). */
static int cuda_cache_put(int s, void *p, size_t n, int sid) {
    cuda_bin *b = cuda_bin_find(s, n | (size_t)sid, 1);
    if (!b) return 0;
    if (b->n == b->cap) {
        int ncap = b->cap ? 2 * b->cap : 4;
        void **np = realloc(b->p, (size_t)ncap * sizeof *np);
        if (!np) return 0;
        b->p = np;
        b->cap = ncap;
    }
    b->p[b->n++] = p;
    mem_cached[s] += (int64_t)n;
    return 1;
}

/* n more bytes in use on slot's device (its peak follows). */
static void mem_charge(int slot, size_t n) {
    pthread_mutex_lock(&mem_lock);
    mem_cur[slot] += (int64_t)n;
    if (mem_cur[slot] > mem_peak[slot]) mem_peak[slot] = mem_cur[slot];
    pthread_mutex_unlock(&mem_lock);
}

void *nemo_dev_alloc(int devtype, int devindex, size_t nbytes) {
    if (nemo_check_device(devtype, devindex) < 0) return NULL;
    size_t n = devtype == NEMO_CUDA ? cuda_round_size(nbytes ? nbytes : 1) : round_size(nbytes ? nbytes : 1);
    void *p = NULL;
    int slot = dev_slot(devtype, devindex);
    if (devtype == NEMO_CPU) {
        pthread_once(&tune_once, malloc_tune);
        if (n >= CACHE_MIN) {
            pthread_mutex_lock(&mem_lock);
            p = host_cache_take(cpu_cache, &cpu_ncache, n);
            pthread_mutex_unlock(&mem_lock);
        }
        if (!p && posix_memalign(&p, 64, n) != 0) p = NULL;
        if (!p) {
            nemo_memory_empty_cache(NEMO_CPU, 0);
            if (posix_memalign(&p, 64, n) != 0) p = NULL;
        }
        if (!p) { NEMO_ERR(NEMO_ENOMEM, "out of memory: cannot allocate %zu bytes on cpu", n); return NULL; }
    } else {
        p = cuda_alloc(devindex, n);
        if (!p) return NULL;
    }
    mem_charge(slot, n);
    return p;
}

void nemo_dev_free(int devtype, int devindex, void *p, size_t nbytes) {
    if (!p) return;
    size_t n = devtype == NEMO_CUDA ? cuda_round_size(nbytes ? nbytes : 1) : round_size(nbytes ? nbytes : 1);
    int slot = dev_slot(devtype, devindex);
    pthread_mutex_lock(&mem_lock);
    mem_cur[slot] -= (int64_t)n;
    int sid = 0;
    if (devtype == NEMO_CPU && n >= CACHE_MIN && host_cache_put(cpu_cache, &cpu_ncache, CACHE_SLOTS, p, n)) {
        p = NULL;
    } else if (devtype == NEMO_CUDA && nemo_sblock_free(p, devindex, n, &sid)) {
        mem_cached[slot] += (int64_t)n;   /* waits for other streams, then joins its bin */
        p = NULL;
    } else if (devtype == NEMO_CUDA && cuda_cache_put(slot, p, n, sid)) {
        p = NULL;
    }
    pthread_mutex_unlock(&mem_lock);
    if (!p) return;
    if (devtype == NEMO_CPU) free(p);
    else if (cuda) cuda->free(devindex, p);
}

NEMO_API int64_t nemo_memory_current(int devtype, int devindex) { return mem_cur[dev_slot(devtype, devindex)]; }
NEMO_API int64_t nemo_memory_peak(int devtype, int devindex) { return mem_peak[dev_slot(devtype, devindex)]; }
NEMO_API int64_t nemo_memory_cached(int devtype, int devindex) { return mem_cached[dev_slot(devtype, devindex)]; }
NEMO_API void nemo_memory_reset_peak(int devtype, int devindex) {
    int s = dev_slot(devtype, devindex);
    pthread_mutex_lock(&mem_lock);
    mem_peak[s] = mem_cur[s];
    pthread_mutex_unlock(&mem_lock);
}
static void pin_cache_empty(void);   /* below, with nemo_pin_memory */
NEMO_API void nemo_memory_empty_cache(int devtype, int devindex) {
    if (devtype == NEMO_CUDA) {
        if (cuda && devindex >= 0 && devindex < cuda_count) cuda_empty_cache(devindex);
        return;
    }
    if (devtype != NEMO_CPU) return;
    if (cuda) pin_cache_empty();
    pthread_mutex_lock(&mem_lock);
    for (int i = 0; i < cpu_ncache; i++) free(cpu_cache[i].p);
    cpu_ncache = 0;
    mem_cached[0] = 0;
    pthread_mutex_unlock(&mem_lock);
}

/* ==== Storages ==== */

static void dev_free_fn(void *ctx, void *data, size_t nbytes) {
    intptr_t dev = (intptr_t)ctx;
    nemo_dev_free((int)(dev >> 16), (int)(dev & 0xffff), data, nbytes);
}

int nemo_storage_is_engine(const nemo_storage *s) { return s && s->free_fn == dev_free_fn; }

nemo_storage *nemo_storage_new(size_t nbytes, int devtype, int devindex) {
    void *p = nemo_dev_alloc(devtype, devindex, nbytes);
    if (!p) return NULL;
    nemo_storage *s = nemo_storage_wrap(p, nbytes, devtype, devindex, dev_free_fn,
                                        (void *)(((intptr_t)devtype << 16) | devindex));
    if (!s) nemo_dev_free(devtype, devindex, p, nbytes);
    return s;
}

NEMO_API nemo_storage *nemo_storage_wrap(void *data, size_t nbytes, int devtype, int devindex,
                                         void (*free_fn)(void *, void *, size_t), void *ctx) {
    nemo_storage *s = calloc(1, sizeof *s);
    if (!s) { NEMO_ERR(NEMO_ENOMEM, "out of memory (storage header)"); return NULL; }
    s->data = data; s->nbytes = nbytes; s->refcount = 1;
    s->devtype = devtype; s->devindex = devindex; s->free_fn = free_fn; s->ctx = ctx;
    return s;
}

/* Free (nbytes 0) or allocate again (nbytes > 0) the memory of a storage the engine allocated,
 * keeping the storage and every view over it: FSDP gives unsharded parameters' memory back
 * between uses while the tensors (and autograd's saved handles of them) stay valid. */
NEMO_API int nemo_storage_resize_(nemo_storage *s, size_t nbytes) {
    if (s == NULL) return NEMO_ERR(NEMO_EINVAL, "storage_resize_: storage is NULL");
    if (s->free_fn != dev_free_fn)
        return NEMO_ERR(NEMO_EINVAL, "storage_resize_: only memory the engine allocated can be resized (this "
                        "storage wraps external memory, e.g. a memory-mapped file: copy the tensor first)");
    if (nbytes == s->nbytes && (s->data != NULL || nbytes == 0)) return 0;
    if (s->data) {
        s->free_fn(s->ctx, s->data, s->nbytes);
        s->data = NULL;
        s->nbytes = 0;
    }
    if (nbytes > 0) {
        void *p = nemo_dev_alloc(s->devtype, s->devindex, nbytes);
        if (!p) return nemo_last_status() < 0 ? nemo_last_status() : NEMO_ENOMEM;
        s->data = p;
        s->nbytes = nbytes;
        s->free_fn = dev_free_fn;
        s->ctx = (void *)(((intptr_t)s->devtype << 16) | s->devindex);
    }
    return 0;
}

/* An error when t's storage has no memory (released by nemo_storage_resize_). */
static int nemo_check_live(const char *op, const nemo_tensor *t) {
    if (t->storage->data == NULL && nemo_tensor_numel(t) > 0)
        return NEMO_ERR(NEMO_EINVAL, "%s: the tensor's memory was released (an FSDP2-sharded parameter is only "
                        "materialized during its unit's forward and backward; use the manager's "
                        "full_state_dict() / summon_full_params() to read it)", op);
    return 0;
}

NEMO_API void nemo_storage_retain(nemo_storage *s) { if (s) __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED); }

NEMO_API void nemo_storage_release(nemo_storage *s) {
    if (!s) return;
    if (__atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        if (s->free_fn) s->free_fn(s->ctx, s->data, s->nbytes);
        free(s);
    }
}

/* ==== Tensors ==== */

static void contiguous_strides(int ndim, const int64_t *shape, int64_t *stride) {
    int64_t st = 1;
    for (int d = ndim - 1; d >= 0; d--) { stride[d] = st; st *= shape[d] > 0 ? shape[d] : 1; }
}

static int check_shape(const char *op, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > NEMO_MAXDIM)
        return NEMO_ERR(NEMO_ESHAPE, "%s: %d dimensions, expected 0 to %d", op, ndim, NEMO_MAXDIM);
    double n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return NEMO_ERR(NEMO_ESHAPE, "%s: negative size %lld in dimension %d", op, (long long)shape[d], d);
        n *= (double)shape[d];
    }
    if (n > 9.0e18) return NEMO_ERR(NEMO_ESHAPE, "%s: %g elements is too many", op, n);
    return 0;
}

/* A contiguous tensor over the whole of storage s, taking over the caller's reference (released
 * on failure). */
static nemo_tensor *tensor_over(nemo_storage *s, int ndim, const int64_t *shape, int dtype) {
    nemo_tensor *t = calloc(1, sizeof *t);
    if (!t) { nemo_storage_release(s); NEMO_ERR(NEMO_ENOMEM, "out of memory (tensor header)"); return NULL; }
    t->refcount = 1; t->dtype = dtype; t->devtype = s->devtype; t->devindex = s->devindex; t->ndim = ndim;
    for (int d = 0; d < ndim; d++) t->shape[d] = shape[d];
    contiguous_strides(ndim, shape, t->stride);
    t->storage = s;
    return t;
}

NEMO_API nemo_tensor *nemo_empty(int ndim, const int64_t *shape, int dtype, int devtype, int devindex) {
    if (check_shape("empty", ndim, shape) < 0) return NULL;
    if (dtype < 0 || dtype >= NEMO_NDTYPE) { NEMO_ERR(NEMO_EDTYPE, "empty: unknown dtype %d", dtype); return NULL; }
    size_t nbytes = nemo_numel_of(ndim, shape) * (size_t)nemo_dtype_size(dtype);
    nemo_storage *s = nemo_storage_new(nbytes, devtype, devindex);
    return s ? tensor_over(s, ndim, shape, dtype) : NULL;
}

/* ==== Pinned (page-locked) host memory ====
 * CPU storages whose memory comes from the CUDA plugin's host_alloc: copies between them and a
 * device are DMA transfers without a staging copy. Freed blocks are kept for reuse at their
 * exact rounded size (PIN_SLOTS of them) because cudaHostAlloc is slow, as a data loader pinning
 * every batch would notice. They count in the CPU's memory statistics. */
#define PIN_SLOTS 64
static host_block pin_cache[PIN_SLOTS];
static int pin_ncache;
/* Freed pinned blocks that an asynchronous copy still reads or writes (nemo_copy_async_): they
 * join pin_cache once it completed (counted as cached meanwhile). */
static host_block pin_busy[PIN_SLOTS];
static int pin_nbusy;

/* Busy blocks whose copy completed (wait: wait for the copies) go to the cache (mem_lock held). */
static void pin_sweep(int wait) {
    int w = 0;
    for (int i = 0; i < pin_nbusy; i++) {
        host_block b = pin_busy[i];
        if (nemo_pin_busy(b.p, wait)) { pin_busy[w++] = b; continue; }
        mem_cached[0] -= (int64_t)b.n;
        if (!host_cache_put(pin_cache, &pin_ncache, PIN_SLOTS, b.p, b.n)) cuda->host_free(b.p);
    }
    pin_nbusy = w;
}

static void pinned_free_fn(void *ctx, void *data, size_t nbytes) {
    (void)ctx;
    if (!data) return;
    size_t n = round_size(nbytes ? nbytes : 1);
    pthread_mutex_lock(&mem_lock);
    mem_cur[0] -= (int64_t)n;
    if (nemo_pin_busy(data, pin_nbusy == PIN_SLOTS)) {
        pin_busy[pin_nbusy].p = data;
        pin_busy[pin_nbusy].n = n;
        pin_nbusy++;
        mem_cached[0] += (int64_t)n;
        data = NULL;
    } else if (host_cache_put(pin_cache, &pin_ncache, PIN_SLOTS, data, n)) {
        data = NULL;
    }
    pthread_mutex_unlock(&mem_lock);
    if (data) cuda->host_free(data);
}
static void pin_cache_empty(void) {
    pthread_mutex_lock(&mem_lock);
    pin_sweep(1);
    for (int i = 0; i < pin_ncache; i++) {
        cuda->host_free(pin_cache[i].p);
        mem_cached[0] -= (int64_t)pin_cache[i].n;
    }
    pin_ncache = 0;
    pthread_mutex_unlock(&mem_lock);
}
static void *pinned_alloc(size_t nbytes) {
    size_t n = round_size(nbytes ? nbytes : 1);
    void *p = NULL;
    pthread_mutex_lock(&mem_lock);
    pin_sweep(0);
    p = host_cache_take(pin_cache, &pin_ncache, n);
    pthread_mutex_unlock(&mem_lock);
    if (!p && cuda->host_alloc(n, &p) < 0) {
        pin_cache_empty();
        if (cuda->host_alloc(n, &p) < 0) {
            NEMO_ERR(NEMO_ENOMEM, "pin_memory: cannot allocate %zu bytes of page-locked memory: %s", n, cuda->error_text());
            return NULL;
        }
    }
    mem_charge(0, n);
    return p;
}

NEMO_API int nemo_is_pinned(const nemo_tensor *t) {
    return t && t->storage && t->storage->free_fn == pinned_free_fn;
}

NEMO_API nemo_tensor *nemo_pin_memory(const nemo_tensor *t) {
    if (!t) { NEMO_ERR(NEMO_EINVAL, "pin_memory: tensor is NULL"); return NULL; }
    if (t->devtype != NEMO_CPU) {
        NEMO_ERR(NEMO_EDEVICE, "pin_memory: the tensor is on cuda:%d; only CPU tensors can be pinned", t->devindex);
        return NULL;
    }
    if (nemo_is_pinned(t) && nemo_tensor_is_contiguous(t)) { nemo_tensor_retain((nemo_tensor *)t); return (nemo_tensor *)t; }
    if (nemo_check_live("pin_memory", t) < 0) return NULL;
    nemo_tensor *out = nemo_empty_pinned(t->ndim, t->shape, t->dtype);
    if (out && nemo_copy_(out, t) < 0) { nemo_tensor_release(out); out = NULL; }
    return out;
}

NEMO_API nemo_tensor *nemo_empty_pinned(int ndim, const int64_t *shape, int dtype) {
    if (check_shape("empty_pinned", ndim, shape) < 0) return NULL;
    if (dtype < 0 || dtype >= NEMO_NDTYPE) { NEMO_ERR(NEMO_EDTYPE, "empty_pinned: unknown dtype %d", dtype); return NULL; }
    pthread_once(&cuda_once, cuda_load);
    if (!cuda) { NEMO_ERR(NEMO_EDEVICE, "pin_memory: no CUDA device: %s", cuda_reason); return NULL; }
    size_t nbytes = nemo_numel_of(ndim, shape) * (size_t)nemo_dtype_size(dtype);
    void *p = pinned_alloc(nbytes);
    if (!p) return NULL;
    nemo_storage *s = nemo_storage_wrap(p, nbytes, NEMO_CPU, 0, pinned_free_fn, NULL);
    if (!s) { pinned_free_fn(NULL, p, nbytes); return NULL; }
    return tensor_over(s, ndim, shape, dtype);
}

NEMO_API nemo_tensor *nemo_zeros(int ndim, const int64_t *shape, int dtype, int devtype, int devindex) {
    nemo_tensor *t = nemo_empty(ndim, shape, dtype, devtype, devindex);
    if (t && nemo_fill_(t, 0.0) < 0) { nemo_tensor_release(t); return NULL; }
    return t;
}

NEMO_API nemo_tensor *nemo_tensor_from_storage(nemo_storage *s, int dtype, int ndim, const int64_t *shape,
                                               const int64_t *stride, int64_t offset) {
    if (!s) { NEMO_ERR(NEMO_EINVAL, "tensor_from_storage: no storage"); return NULL; }
    if (check_shape("view", ndim, shape) < 0) return NULL;
    if (dtype < 0 || dtype >= NEMO_NDTYPE) { NEMO_ERR(NEMO_EDTYPE, "view: unknown dtype %d", dtype); return NULL; }
    int64_t st[NEMO_MAXDIM];
    if (!stride) { contiguous_strides(ndim, shape, st); stride = st; }
    /* every element must lie inside the storage */
    int64_t lo = offset, hi = offset, numel = 1;
    for (int d = 0; d < ndim; d++) {
        numel *= shape[d];
        if (shape[d] == 0) continue;
        if (stride[d] >= 0) hi += stride[d] * (shape[d] - 1); else lo += stride[d] * (shape[d] - 1);
    }
    int64_t cap = (int64_t)(s->nbytes / (size_t)nemo_dtype_size(dtype));
    if (numel > 0 && (lo < 0 || hi >= cap)) {
        NEMO_ERR(NEMO_ESHAPE, "view: elements [%lld, %lld] fall outside the storage of %lld elements",
                 (long long)lo, (long long)hi, (long long)cap);
        return NULL;
    }
    nemo_tensor *t = calloc(1, sizeof *t);
    if (!t) { NEMO_ERR(NEMO_ENOMEM, "out of memory (tensor header)"); return NULL; }
    t->refcount = 1; t->dtype = dtype; t->devtype = s->devtype; t->devindex = s->devindex; t->ndim = ndim;
    for (int d = 0; d < ndim; d++) { t->shape[d] = shape[d]; t->stride[d] = stride[d]; }
    t->offset = offset;
    t->storage = s;
    nemo_storage_retain(s);
    return t;
}

NEMO_API void nemo_tensor_retain(nemo_tensor *t) { if (t) __atomic_add_fetch(&t->refcount, 1, __ATOMIC_RELAXED); }

NEMO_API void nemo_tensor_release(nemo_tensor *t) {
    if (!t) return;
    if (__atomic_sub_fetch(&t->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        nemo_storage_release(t->storage);
        free(t);
    }
}

NEMO_API nemo_tensor *nemo_tensor_view(const nemo_tensor *t, int ndim, const int64_t *shape,
                                       const int64_t *stride, int64_t offset) {
    nemo_tensor *v = nemo_tensor_from_storage(t->storage, t->dtype, ndim, shape, stride, offset);
    return v;
}

NEMO_API nemo_tensor *nemo_tensor_alias(const nemo_tensor *t) {
    return nemo_tensor_view(t, t->ndim, t->shape, t->stride, t->offset);
}

NEMO_API int64_t nemo_tensor_numel(const nemo_tensor *t) { return (int64_t)nemo_numel_of(t->ndim, t->shape); }

NEMO_API int nemo_tensor_is_contiguous(const nemo_tensor *t) {
    int64_t st = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->stride[d] != st) return 0;
        st *= t->shape[d];
    }
    return 1;
}

NEMO_API void *nemo_tensor_data(const nemo_tensor *t) {
    return (char *)t->storage->data + t->offset * nemo_dtype_size(t->dtype);
}

const char *nemo_shape_str_n(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "(");
    for (int d = 0; d < ndim && k < n; d++)
        k += (size_t)snprintf(buf + k, n - k, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (k < n) snprintf(buf + k, n - k, ndim == 1 ? ",)" : ")");
    return buf;
}
const char *nemo_shape_str(const nemo_tensor *t, char *buf, size_t n) {
    return nemo_shape_str_n(t->ndim, t->shape, buf, n);
}

int nemo_check_same_device(const char *op, const nemo_tensor *a, const nemo_tensor *b) {
    if (a->devtype != b->devtype || a->devindex != b->devindex)
        return NEMO_ERR(NEMO_EDEVICE, "%s: tensors on different devices (%s:%d and %s:%d)", op,
                        a->devtype ? "cuda" : "cpu", a->devindex, b->devtype ? "cuda" : "cpu", b->devindex);
    return 0;
}

int nemo_broadcast_shapes(const char *op, int na, const int64_t *sa, int nb, const int64_t *sb, int64_t *out) {
    int n = na > nb ? na : nb;
    for (int i = 0; i < n; i++) {
        int ia = na - n + i, ib = nb - n + i;
        int64_t a = ia >= 0 ? sa[ia] : 1, b = ib >= 0 ? sb[ib] : 1;
        if (a != b && a != 1 && b != 1) {
            char ba[128], bb[128];
            return NEMO_ERR(NEMO_ESHAPE, "%s: shapes %s and %s cannot be broadcast (dimension %d: %lld vs %lld)",
                            op, nemo_shape_str_n(na, sa, ba, sizeof ba), nemo_shape_str_n(nb, sb, bb, sizeof bb),
                            i, (long long)a, (long long)b);
        }
        out[i] = a == 1 ? b : a;
    }
    return n;
}

void nemo_broadcast_strides(const nemo_tensor *t, int ndim, const int64_t *shape, int64_t *stride) {
    for (int i = 0; i < ndim; i++) {
        int it = t->ndim - ndim + i;
        stride[i] = (it >= 0 && t->shape[it] == shape[i]) ? t->stride[it] : 0;
        if (it >= 0 && t->shape[it] == 1) stride[i] = 0;
    }
}

/* ==== Strided iteration ==== */

void nemo_iter_init(nemo_iter *it, int ndim, const int64_t *shape, int nops, const int64_t *const *strides) {
    it->nops = nops;
    int n = 0;
    /* drop size-1 dims, then merge dim d into d+1 when contiguous for every operand */
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 1) continue;
        it->shape[n] = shape[d];
        for (int k = 0; k < nops; k++) it->stride[k][n] = strides[k][d];
        n++;
    }
    int m = 0;
    for (int d = 0; d < n; d++) {
        if (m > 0) {
            int ok = 1;
            for (int k = 0; k < nops; k++)
                if (it->stride[k][m - 1] != it->stride[k][d] * it->shape[d]) { ok = 0; break; }
            if (ok) {
                it->shape[m - 1] *= it->shape[d];
                for (int k = 0; k < nops; k++) it->stride[k][m - 1] = it->stride[k][d];
                continue;
            }
        }
        it->shape[m] = it->shape[d];
        for (int k = 0; k < nops; k++) it->stride[k][m] = it->stride[k][d];
        m++;
    }
    if (m == 0) {   /* a scalar, or all dims of size 1 */
        int empty = 0;
        for (int d = 0; d < ndim; d++) if (shape[d] == 0) empty = 1;
        it->shape[0] = empty ? 0 : 1;
        for (int k = 0; k < nops; k++) it->stride[k][0] = 0;
        m = 1;
    }
    it->ndim = m;
    it->inner = it->shape[m - 1];
    it->nrows = 1;
    for (int d = 0; d < m - 1; d++) it->nrows *= it->shape[d];
    if (it->inner == 0) it->nrows = 0;
}

/* ==== Copy and conversion ==== */

/* Fast contiguous conversions on the hot path (parameters cast to bf16 and back, operands
 * widened for products). */
int nemo_convert_dense(void *dst, int ddt, const void *src, int sdt, int64_t n) {
    if (ddt == sdt) { memcpy(dst, src, (size_t)n * (size_t)nemo_dtype_size(ddt)); return 1; }
    if (ddt == NEMO_F32 && sdt == NEMO_BF16) {
        float *d = dst; const uint16_t *s = src;
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t i = 0; i < n; i++) d[i] = nemo_bf16_to_f32(s[i]);
        return 1;
    }
    if (ddt == NEMO_F32 && sdt == NEMO_F16) {
        float *d = dst; const uint16_t *s = src;
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t i = 0; i < n; i++) d[i] = nemo_f16_to_f32(s[i]);
        return 1;
    }
    if (ddt == NEMO_BF16 && sdt == NEMO_F32) {
        uint16_t *d = dst; const float *s = src;
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t i = 0; i < n; i++) d[i] = nemo_f32_to_bf16(s[i]);
        return 1;
    }
    if (ddt == NEMO_F16 && sdt == NEMO_F32) {
        uint16_t *d = dst; const float *s = src;
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t i = 0; i < n; i++) d[i] = nemo_f32_to_f16(s[i]);
        return 1;
    }
    if (ddt == NEMO_F64 && sdt == NEMO_F32) {
        double *d = dst; const float *s = src;
        for (int64_t i = 0; i < n; i++) d[i] = s[i];
        return 1;
    }
    if (ddt == NEMO_F32 && sdt == NEMO_F64) {
        float *d = dst; const double *s = src;
        for (int64_t i = 0; i < n; i++) d[i] = (float)s[i];
        return 1;
    }
    return 0;
}

static int copy_cpu(nemo_tensor *dst, const nemo_tensor *src, const int64_t *sstride) {
    const int64_t *strides[2] = {dst->stride, sstride};
    nemo_iter it;
    nemo_iter_init(&it, dst->ndim, dst->shape, 2, strides);
    int ddt = dst->dtype, sdt = src->dtype;
    int dsz = nemo_dtype_size(ddt), ssz = nemo_dtype_size(sdt);
    char *dp = nemo_tensor_data(dst);
    const char *sp = nemo_tensor_data(src);
    int64_t ds = nemo_iter_inner_stride(&it, 0), ss = nemo_iter_inner_stride(&it, 1);
    if (it.nrows == 1 && ds == 1 && ss == 1 && nemo_convert_dense(dp, ddt, sp, sdt, it.inner)) return 0;
    #pragma omp parallel for if (it.nrows * it.inner > NEMO_PAR_MIN)
    for (int64_t r = 0; r < it.nrows; r++) {
        int64_t off[2];
        nemo_iter_row(&it, r, off);
        char *d = dp + off[0] * dsz;
        const char *s = sp + off[1] * ssz;
        if (ds == 1 && ss == 1 && nemo_convert_dense(d, ddt, s, sdt, it.inner)) continue;
        if (ddt == sdt && dsz == 4) {
            for (int64_t i = 0; i < it.inner; i++) ((int32_t *)d)[i * ds] = ((const int32_t *)s)[i * ss];
        } else if (ddt == sdt && dsz == 2) {
            for (int64_t i = 0; i < it.inner; i++) ((int16_t *)d)[i * ds] = ((const int16_t *)s)[i * ss];
        } else if (ddt == sdt && dsz == 8) {
            for (int64_t i = 0; i < it.inner; i++) ((int64_t *)d)[i * ds] = ((const int64_t *)s)[i * ss];
        } else {
            for (int64_t i = 0; i < it.inner; i++)
                nemo_store_f64(d + i * ds * dsz, ddt, nemo_load_f64(s + i * ss * ssz, sdt));
        }
    }
    return 0;
}

/* ==== CUDA copies ==== */

typedef int (*cuda_copy_k)(nemo_tensor *dst, const nemo_tensor *src, const int64_t *sstride);

static size_t dense_bytes(const nemo_tensor *t) {
    return (size_t)nemo_tensor_numel(t) * (size_t)nemo_dtype_size(t->dtype);
}
static int same_shape(const nemo_tensor *a, const nemo_tensor *b) {
    return a->ndim == b->ndim && !memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim);
}

/* dst = src (broadcast to dst's shape) through the "copy" CUDA kernel; both on one device. */
static int cuda_copy(nemo_tensor *dst, const nemo_tensor *src) {
    int rc = 0;
    cuda_copy_k k;
    NEMO_GET_KERNEL(k, cuda_copy_k, "copy", NEMO_CUDA);
    int64_t sst[NEMO_MAXDIM];
    nemo_broadcast_strides(src, dst->ndim, dst->shape, sst);
    rc = k(dst, src, sst);
    if (rc < 0) {
        char b1[128];
        rc = NEMO_ERR(rc, "copy_ of %s %s to %s on cuda:%d: %s", nemo_shape_str(dst, b1, sizeof b1),
                      nemo_dtype_name(src->dtype), nemo_dtype_name(dst->dtype), dst->devindex, nemo_cuda_error_text());
    }
fail:
    return rc;
}

NEMO_API int nemo_copy_(nemo_tensor *dst, const nemo_tensor *src) {
    int rc = 0;
    nemo_tensor *tmp = NULL, *tmp2 = NULL;
    /* src broadcast to dst's shape */
    int64_t bshape[NEMO_MAXDIM];
    int n = nemo_broadcast_shapes("copy_", dst->ndim, dst->shape, src->ndim, src->shape, bshape);
    if (n < 0) return n;
    NEMO_TRY(nemo_check_live("copy_ (source)", src));
    NEMO_TRY(nemo_check_live("copy_ (destination)", dst));
    char b1[128], b2[128];
    NEMO_CHECK(n == dst->ndim && !memcmp(bshape, dst->shape, sizeof(int64_t) * (size_t)n), NEMO_ESHAPE,
               "copy_: source of shape %s does not fit destination of shape %s",
               nemo_shape_str(src, b1, sizeof b1), nemo_shape_str(dst, b2, sizeof b2));
    if (dst->devtype == NEMO_CPU && src->devtype == NEMO_CPU) {
        int64_t sst[NEMO_MAXDIM];
        nemo_broadcast_strides(src, dst->ndim, dst->shape, sst);
        return copy_cpu(dst, src, sst);
    }
    if (nemo_tensor_numel(dst) == 0) return 0;
    if (dst->devtype == NEMO_CUDA) NEMO_TRY(nemo_check_device(NEMO_CUDA, dst->devindex));
    if (src->devtype == NEMO_CUDA) NEMO_TRY(nemo_check_device(NEMO_CUDA, src->devindex));
    if (dst->devtype == NEMO_CUDA && src->devtype == NEMO_CPU) {
        /* converted and laid out on the host, one contiguous upload, then the strided cuda
         * copy when dst is not dense */
        if (src->dtype == dst->dtype && same_shape(src, dst) && nemo_tensor_is_contiguous(src) &&
            nemo_tensor_is_contiguous(dst)) {   /* dense bytes as they are */
            NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(dst), nemo_tensor_data(src), dense_bytes(dst), 0, dst->devindex));
            goto fail;
        }
        NEMO_TRYP(tmp, nemo_empty(dst->ndim, dst->shape, dst->dtype, NEMO_CPU, 0));
        NEMO_TRY(nemo_copy_(tmp, src));
        if (nemo_tensor_is_contiguous(dst)) {
            NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(dst), nemo_tensor_data(tmp), dense_bytes(dst), 0, dst->devindex));
        } else {
            NEMO_TRYP(tmp2, nemo_empty(dst->ndim, dst->shape, dst->dtype, NEMO_CUDA, dst->devindex));
            NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(tmp2), nemo_tensor_data(tmp), dense_bytes(tmp2), 0, dst->devindex));
            NEMO_TRY(cuda_copy(dst, tmp2));
        }
    } else if (dst->devtype == NEMO_CUDA) {
        /* cuda -> cuda. Same device: one memcpy for a dense same-dtype copy, the copy kernel
         * for anything else. Two devices: the kernel makes a dense dst-dtype copy on the source
         * device when needed, bytes cross with one memcpy, the kernel scatters them into a
         * strided dst. */
        int plain = src->dtype == dst->dtype && nemo_tensor_is_contiguous(src) && same_shape(src, dst);
        if (src->devindex == dst->devindex) {
            if (plain && nemo_tensor_is_contiguous(dst))
                NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(dst), nemo_tensor_data(src), dense_bytes(dst), 2, dst->devindex));
            else
                NEMO_TRY(cuda_copy(dst, src));
        } else {
            const nemo_tensor *from = src;
            if (!plain) {
                NEMO_TRYP(tmp, nemo_empty(dst->ndim, dst->shape, dst->dtype, NEMO_CUDA, src->devindex));
                NEMO_TRY(cuda_copy(tmp, src));
                from = tmp;
            }
            if (nemo_tensor_is_contiguous(dst)) {
                NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(dst), nemo_tensor_data(from), dense_bytes(dst), 2, dst->devindex));
            } else {
                NEMO_TRYP(tmp2, nemo_empty(dst->ndim, dst->shape, dst->dtype, NEMO_CUDA, dst->devindex));
                NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(tmp2), nemo_tensor_data(from), dense_bytes(tmp2), 2, dst->devindex));
                NEMO_TRY(cuda_copy(dst, tmp2));
            }
        }
    } else {
        /* cuda -> cpu: made dense on the device (its own shape and dtype) when it is not, one
         * download, then the CPU copy broadcasts and converts */
        const nemo_tensor *from = src;
        if (!nemo_tensor_is_contiguous(src)) {
            NEMO_TRYP(tmp2, nemo_empty(src->ndim, src->shape, src->dtype, NEMO_CUDA, src->devindex));
            NEMO_TRY(cuda_copy(tmp2, src));
            from = tmp2;
        }
        if (src->dtype == dst->dtype && same_shape(src, dst) && nemo_tensor_is_contiguous(dst)) {
            NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(dst), nemo_tensor_data(from), dense_bytes(dst), 1, src->devindex));
            goto fail;
        }
        NEMO_TRYP(tmp, nemo_empty(src->ndim, src->shape, src->dtype, NEMO_CPU, 0));
        NEMO_TRY(nemo_dev_memcpy(nemo_tensor_data(tmp), nemo_tensor_data(from), dense_bytes(tmp), 1, src->devindex));
        NEMO_TRY(nemo_copy_(dst, tmp));
    }
fail:
    nemo_tensor_release(tmp);
    nemo_tensor_release(tmp2);
    return rc;
}

/* An asynchronous copy (PyTorch's non_blocking=True) where one exists: between a page-locked
 * CPU tensor and a CUDA tensor of the same dtype and shape, both contiguous, the copy is queued
 * on the device's current stream and this returns at once; the pinned block is guarded
 * (engine/cuda_stream.c) so that freeing it early cannot hand it to someone else while the DMA
 * runs. The host must not touch the CPU side before the stream has reached the copy (an event
 * or a synchronize). Anything else is nemo_copy_, synchronous. */
NEMO_API int nemo_copy_async_(nemo_tensor *dst, const nemo_tensor *src) {
    int rc = 0;
    const nemo_tensor *pinned = NULL, *dev = NULL;
    int kind = -1;
    if (dst->devtype == NEMO_CUDA && src->devtype == NEMO_CPU && nemo_is_pinned(src)) { pinned = src; dev = dst; kind = 0; }
    if (dst->devtype == NEMO_CPU && src->devtype == NEMO_CUDA && nemo_is_pinned(dst)) { pinned = dst; dev = src; kind = 1; }
    if (kind < 0 || src->dtype != dst->dtype || !same_shape(src, dst) || !nemo_tensor_is_contiguous(src) ||
        !nemo_tensor_is_contiguous(dst) || nemo_tensor_numel(dst) == 0)
        return nemo_copy_(dst, src);
    NEMO_TRY(nemo_check_live("copy_ (source)", src));
    NEMO_TRY(nemo_check_live("copy_ (destination)", dst));
    NEMO_TRY(nemo_check_device(NEMO_CUDA, dev->devindex));
    if (cuda->memcpy_async(nemo_tensor_data(dst), nemo_tensor_data(src), dense_bytes(dst), kind, dev->devindex) < 0)
        return NEMO_ERR(NEMO_ECUDA, "non_blocking copy of %zu bytes: %s", dense_bytes(dst), cuda->error_text());
    pthread_mutex_lock(&mem_lock);
    rc = nemo_pin_guard(pinned->storage->data, dev->devindex, nemo_cuda_cur_sid(dev->devindex));
    pthread_mutex_unlock(&mem_lock);
fail:
    return rc;
}

NEMO_API nemo_tensor *nemo_to(const nemo_tensor *t, int dtype, int devtype, int devindex) {
    if (t->dtype == dtype && t->devtype == devtype && t->devindex == devindex && nemo_tensor_is_contiguous(t)) {
        nemo_tensor_retain((nemo_tensor *)t);
        return (nemo_tensor *)t;
    }
    nemo_tensor *o = nemo_empty(t->ndim, t->shape, dtype, devtype, devindex);
    if (!o) return NULL;
    if (nemo_copy_(o, t) < 0) { nemo_tensor_release(o); return NULL; }
    return o;
}

NEMO_API nemo_tensor *nemo_contiguous(const nemo_tensor *t) { return nemo_to(t, t->dtype, t->devtype, t->devindex); }

NEMO_API nemo_tensor *nemo_clone(const nemo_tensor *t) {
    nemo_tensor *o = nemo_empty(t->ndim, t->shape, t->dtype, t->devtype, t->devindex);
    if (!o) return NULL;
    if (nemo_copy_(o, t) < 0) { nemo_tensor_release(o); return NULL; }
    return o;
}

nemo_tensor *nemo_prep(const nemo_tensor *t, int dt) { return nemo_to(t, dt, t->devtype, t->devindex); }

NEMO_API int nemo_fill_(nemo_tensor *t, double value) {
    int rc = 0;
    if (t->devtype != NEMO_CPU) {
        int (*k)(nemo_tensor *, double);
        NEMO_TRY(nemo_check_device(t->devtype, t->devindex));
        NEMO_GET_KERNEL(k, int (*)(nemo_tensor *, double), "fill", NEMO_CUDA);
        rc = k(t, value);
        if (rc < 0) rc = NEMO_ERR(rc, "fill_ on cuda:%d: %s", t->devindex, nemo_cuda_error_text());
        goto fail;
    }
    char val[8];
    nemo_store_f64(val, t->dtype, value);
    int sz = nemo_dtype_size(t->dtype);
    const int64_t *strides[1] = {t->stride};
    nemo_iter it;
    nemo_iter_init(&it, t->ndim, t->shape, 1, strides);
    char *base = nemo_tensor_data(t);
    int64_t st = nemo_iter_inner_stride(&it, 0);
    #pragma omp parallel for if (it.nrows * it.inner > NEMO_PAR_MIN)
    for (int64_t r = 0; r < it.nrows; r++) {
        int64_t off[1];
        nemo_iter_row(&it, r, off);
        char *p = base + off[0] * sz;
        if (sz == 4) { int32_t v; memcpy(&v, val, 4); for (int64_t i = 0; i < it.inner; i++) ((int32_t *)p)[i * st] = v; }
        else if (sz == 8) { int64_t v; memcpy(&v, val, 8); for (int64_t i = 0; i < it.inner; i++) ((int64_t *)p)[i * st] = v; }
        else if (sz == 2) { int16_t v; memcpy(&v, val, 2); for (int64_t i = 0; i < it.inner; i++) ((int16_t *)p)[i * st] = v; }
        else { for (int64_t i = 0; i < it.inner; i++) p[i * st] = val[0]; }
    }
fail:
    return rc;
}

static int64_t flat_offset(const nemo_tensor *t, int64_t i) {
    int64_t off = t->offset;
    for (int d = t->ndim - 1; d >= 0; d--) {
        int64_t k = i % t->shape[d]; i /= t->shape[d];
        off += k * t->stride[d];
    }
    return off;
}

NEMO_API int nemo_get_flat(const nemo_tensor *t, int64_t i, double *out) {
    int rc = 0;
    nemo_tensor *h = NULL;
    int64_t n = nemo_tensor_numel(t);
    NEMO_CHECK(i >= 0 && i < n, NEMO_EINVAL, "element %lld out of range for a tensor of %lld elements",
               (long long)i, (long long)n);
    if (t->devtype != NEMO_CPU) {
        NEMO_TRYP(h, nemo_to(t, t->dtype, NEMO_CPU, 0));
        t = h;
    }
    *out = nemo_load_f64((const char *)t->storage->data + flat_offset(t, i) * nemo_dtype_size(t->dtype), t->dtype);
fail:
    nemo_tensor_release(h);
    return rc;
}

NEMO_API int nemo_read_f64(const nemo_tensor *t, double *out) {
    int rc = 0;
    nemo_tensor *h = NULL;
    NEMO_TRYP(h, nemo_to(t, NEMO_F64, NEMO_CPU, 0));
    memcpy(out, nemo_tensor_data(h), (size_t)nemo_tensor_numel(h) * sizeof(double));
fail:
    nemo_tensor_release(h);
    return rc;
}

NEMO_API int nemo_write_f64(nemo_tensor *t, const double *in) {
    int rc = 0;
    nemo_storage *s = NULL;
    nemo_tensor *src = NULL;
    NEMO_TRYP(s, nemo_storage_wrap((void *)in, (size_t)nemo_tensor_numel(t) * sizeof(double), NEMO_CPU, 0, NULL, NULL));
    NEMO_TRYP(src, nemo_tensor_from_storage(s, NEMO_F64, t->ndim, t->shape, NULL, 0));
    NEMO_TRY(nemo_copy_(t, src));
fail:
    nemo_tensor_release(src);
    nemo_storage_release(s);
    return rc;
}

NEMO_API nemo_tensor *nemo_arange(double start, double step, int64_t n, int dtype, int devtype, int devindex) {
    if (n < 0) { NEMO_ERR(NEMO_EINVAL, "arange: negative length %lld", (long long)n); return NULL; }
    nemo_tensor *h = nemo_empty(1, &n, dtype, NEMO_CPU, 0);
    if (!h) return NULL;
    char *p = nemo_tensor_data(h);
    int sz = nemo_dtype_size(dtype);
    for (int64_t i = 0; i < n; i++) nemo_store_f64(p + i * sz, dtype, start + (double)i * step);
    if (devtype == NEMO_CPU) return h;
    nemo_tensor *o = nemo_to(h, dtype, devtype, devindex);
    nemo_tensor_release(h);
    return o;
}

NEMO_API nemo_tensor *nemo_linspace(double a, double b, int64_t n, int dtype, int devtype, int devindex) {
    if (n < 0) { NEMO_ERR(NEMO_EINVAL, "linspace: negative steps %lld", (long long)n); return NULL; }
    nemo_tensor *h = nemo_empty(1, &n, dtype, NEMO_CPU, 0);
    if (!h) return NULL;
    char *p = nemo_tensor_data(h);
    int sz = nemo_dtype_size(dtype);
    double step = n > 1 ? (b - a) / (double)(n - 1) : 0.0;
    /* as torch: the first half counts up from a, the second half down from b */
    for (int64_t i = 0; i < n; i++)
        nemo_store_f64(p + i * sz, dtype, i < n / 2 ? a + step * (double)i : b - step * (double)(n - 1 - i));
    if (devtype == NEMO_CPU) return h;
    nemo_tensor *o = nemo_to(h, dtype, devtype, devindex);
    nemo_tensor_release(h);
    return o;
}
