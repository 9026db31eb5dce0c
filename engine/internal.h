/*
 * internal.h: what engine/ and kernels/ share and users never see: error helpers, dtype
 * conversion, the strided iterator, the kernel registry and the allocator.
 *
 * Rule of the house: a front-end (engine/ops/<family>.c) checks arguments, allocates outputs and calls
 * a kernel found in the registry for the tensor's device; a kernel (kernels/<dev>/<family>.c) computes
 * and never allocates tensors or validates user input.
 */
#ifndef NEMO_INTERNAL_H
#define NEMO_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "nemo.h"

#define NEMO_UNUSED(x) (void)(x)

/* ==== Errors ==== */
/* Format the thread-local message "<text> (file:line)" and return code. */
int nemo_set_error(int code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define NEMO_ERR(code, ...) nemo_set_error((code), __FILE__, __LINE__, __VA_ARGS__)
/* Inside a function with `int rc` and a `fail:` label. */
#define NEMO_CHECK(cond, code, ...) do { if (!(cond)) {                                   \
    rc = nemo_set_error((code), __FILE__, __LINE__, __VA_ARGS__); goto fail; } } while (0)
/* Propagate a failing status (the callee already set the message). */
#define NEMO_TRY(expr) do { rc = (expr); if (rc < 0) goto fail; } while (0)
/* Propagate a NULL tensor (the callee already set the message). */
#define NEMO_TRYP(var, expr) do { (var) = (expr); if (!(var)) {                        \
        rc = nemo_last_status() < 0 ? nemo_last_status() : NEMO_EINTERNAL; goto fail; }  \
    } while (0)

/* ==== Half-precision conversion (round to nearest even) ==== */
static inline float nemo_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t nemo_f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;       /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float nemo_f16_to_f32(uint16_t h);
uint16_t nemo_f32_to_f16(float f);

/* Load / store one element of any dtype as double (slow path: copies, item, tolist). */
static inline double nemo_load_f64(const void *p, int dtype) {
    switch (dtype) {
    case NEMO_F32: return *(const float *)p;
    case NEMO_F64: return *(const double *)p;
    case NEMO_BF16: return nemo_bf16_to_f32(*(const uint16_t *)p);
    case NEMO_F16: return nemo_f16_to_f32(*(const uint16_t *)p);
    case NEMO_I64: return (double)*(const int64_t *)p;
    case NEMO_I32: return *(const int32_t *)p;
    case NEMO_BOOL: return *(const uint8_t *)p ? 1.0 : 0.0;
    default: return 0.0;
    }
}
static inline void nemo_store_f64(void *p, int dtype, double v) {
    switch (dtype) {
    case NEMO_F32: *(float *)p = (float)v; break;
    case NEMO_F64: *(double *)p = v; break;
    case NEMO_BF16: *(uint16_t *)p = nemo_f32_to_bf16((float)v); break;
    case NEMO_F16: *(uint16_t *)p = nemo_f32_to_f16((float)v); break;
    case NEMO_I64: *(int64_t *)p = (int64_t)v; break;
    case NEMO_I32: *(int32_t *)p = (int32_t)v; break;
    case NEMO_BOOL: *(uint8_t *)p = v != 0.0; break;
    default: break;
    }
}

/* The dtype a kernel computes in: float64 stays float64, integers and bool compute in float64,
 * every other float type computes in float32. */
static inline int nemo_compute_dtype(int dtype) {
    return (dtype == NEMO_F32 || dtype == NEMO_BF16 || dtype == NEMO_F16) ? NEMO_F32 : NEMO_F64;
}
/* PyTorch-style promotion of two tensor dtypes (bool < ints < floats; bf16+f16 -> f32). */
int nemo_promote(int a, int b);

/* ==== Tensor helpers ==== */
/* Contiguous CPU-or-same-device tensor of dtype dt with t's values: a new reference (t itself
 * when it already is). The workhorse of front-ends: kernels then see dense f32/f64 arrays. */
nemo_tensor *nemo_prep(const nemo_tensor *t, int dt);
/* Same device check for front-ends; sets an error naming op and returns < 0. */
int nemo_check_same_device(const char *op, const nemo_tensor *a, const nemo_tensor *b);
/* Format a shape as "(2, 3, 4)" into buf (returns buf). */
const char *nemo_shape_str(const nemo_tensor *t, char *buf, size_t n);
const char *nemo_shape_str_n(int ndim, const int64_t *shape, char *buf, size_t n);
/* Broadcast shapes a and b into out (PyTorch rules); returns ndim or < 0 with an error. */
int nemo_broadcast_shapes(const char *op, int na, const int64_t *sa, int nb, const int64_t *sb,
                          int64_t *out);
/* Strides that read t as if it had shape (ndim, shape) by broadcasting (0 where expanded). */
void nemo_broadcast_strides(const nemo_tensor *t, int ndim, const int64_t *shape, int64_t *stride);
static inline size_t nemo_numel_of(int ndim, const int64_t *shape) {
    size_t n = 1; for (int i = 0; i < ndim; i++) n *= (size_t)shape[i]; return n;
}

/* ==== Strided iteration over up to 4 operands ==== */
/* Coalesces adjacent dims that are contiguous in every operand. Rows are all dims but the
 * last; row r's element offsets come from nemo_iter_row. Parallel loops split over rows. */
typedef struct {
    int ndim, nops;
    int64_t shape[NEMO_MAXDIM];
    int64_t stride[4][NEMO_MAXDIM];
    int64_t nrows, inner;
} nemo_iter;
void nemo_iter_init(nemo_iter *it, int ndim, const int64_t *shape, int nops,
                    const int64_t *const *strides);
static inline void nemo_iter_row(const nemo_iter *it, int64_t row, int64_t *off) {
    for (int k = 0; k < it->nops; k++) off[k] = 0;
    for (int d = it->ndim - 2; d >= 0; d--) {
        int64_t i = row % it->shape[d]; row /= it->shape[d];
        for (int k = 0; k < it->nops; k++) off[k] += i * it->stride[k][d];
    }
}
static inline int64_t nemo_iter_inner_stride(const nemo_iter *it, int k) {
    return it->ndim ? it->stride[k][it->ndim - 1] : 0;
}

/* ==== Kernel registry ==== */
/* Kernels register by name and device type; front-ends look them up. A missing entry becomes
 * NEMO_EUNSUPPORTED "<name>: no <device> kernel". CPU kernels register from constructors
 * (NEMO_REGISTER_KERNEL); CUDA kernels register when libnemo_cuda loads. */
typedef void (*nemo_kfn)(void);
void nemo_kernel_register(const char *name, int devtype, nemo_kfn fn);
nemo_kfn nemo_kernel_get(const char *name, int devtype);
int nemo_kernel_has(const char *name, int devtype);   /* registered? (sets no error) */
/* The dtype the large operands of kernel `name` should reach it in: dt itself when dt is
 * bfloat16 / float16, cdt is float32 and the kernel on devtype also registered as "<name>.lp"
 * (it reads bf16 / f16 into float32 and rounds its result once: the numbers of converting
 * first, in one pass over memory); else cdt, the compute dtype. NEMO_LOWP_IO=0: always cdt. */
int nemo_io_dtype(const char *name, int devtype, int dt, int cdt);
/* Give every CPU kernel that devtype lacks to devtype as well (the emulated CUDA device). */
void nemo_kernel_mirror_cpu(int devtype);
int nemo_cuda_emulated(void);   /* are the CUDA devices NEMO_FAKE_CUDA's? (engine/core.c) */
/* Dense conversion of n elements between two dtypes where a fast loop exists (same dtype,
 * f32 <-> bf16, bf16 / f16 -> f32, f32 <-> f64); returns 0 for other pairs (engine/core.c). */
int nemo_convert_dense(void *dst, int ddt, const void *src, int sdt, int64_t n);
/* Look a kernel up inside a function with `int rc` and `fail:`; a miss is NEMO_EUNSUPPORTED. */
#define NEMO_GET_KERNEL(var, type, name, devtype) do {                                   \
    (var) = (type)nemo_kernel_get((name), (devtype));                                     \
    if (!(var)) { rc = NEMO_EUNSUPPORTED; goto fail; } } while (0)
#define NEMO_REGISTER_KERNEL(name, devtype, fn)                                    \
    static void __attribute__((constructor)) nemo_reg_##fn(void) {                \
        nemo_kernel_register(name, devtype, (nemo_kfn)(fn)); }

/* ==== Allocation ==== */
/* Raw device memory with accounting (current / peak per device). CPU blocks are 64-byte
 * aligned and large ones are cached by size so that a training step does not return them to
 * the kernel and fault them in again every iteration. */
void *nemo_dev_alloc(int devtype, int devindex, size_t nbytes);
void nemo_dev_free(int devtype, int devindex, void *p, size_t nbytes);
nemo_storage *nemo_storage_new(size_t nbytes, int devtype, int devindex);
/* Device memcpy through the CUDA plugin; kind 0 h2d, 1 d2h, 2 d2d. */
int nemo_dev_memcpy(void *dst, const void *src, size_t n, int kind, int devindex);
int nemo_check_device(int devtype, int devindex);
/* The CUDA library's text for the last failure (or why CUDA is unavailable). */
const char *nemo_cuda_error_text(void);
/* The loaded CUDA plugin (NULL when there is none); call after nemo_check_device succeeded. */
struct nemo_cuda_plugin;
const struct nemo_cuda_plugin *nemo_cuda_plugin_ptr(void);
/* Was the storage's memory allocated by nemo_dev_alloc (engine/core.c)? */
int nemo_storage_is_engine(const nemo_storage *s);

/* ==== Streams (engine/cuda_stream.c), for the allocators in engine/core.c ====
 * The caller holds core.c's mem_lock. */
int nemo_cuda_cur_sid(int devindex);                      /* current stream id of cuda:devindex */
void nemo_sblock_alloc(void *p, int dev, int sid);          /* block p handed out on stream sid */
/* Block p (n bytes) is being freed: 1 when it waits for other streams (kept, do not cache),
 * else 0 with *sid its allocation stream (cache it there). */
int nemo_sblock_free(void *p, int dev, size_t n, int *sid);
/* Hands every waiting block of cuda:dev (dev < 0: all) whose streams are done (wait: waits for
 * them) to put. */
void nemo_sblock_sweep(int dev, int wait, void (*put)(void *p, size_t n, int dev, int sid));
/* An asynchronous copy on (dev, sid) reads or writes pinned block p; nemo_pin_busy: does one
 * still (wait: wait for it)? */
int nemo_pin_guard(void *p, int dev, int sid);
int nemo_pin_busy(void *p, int wait);

/* ==== Threads ==== */
/* Elements above which an elementwise loop runs on the thread pool. */
#define NEMO_PAR_MIN 32768

#endif /* NEMO_INTERNAL_H */
