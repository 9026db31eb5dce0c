/*
 * nemo.h: the one public header of libnemo, the C engine of nemo-lua.
 *
 * The build runs this header through the C preprocessor with -DNEMO_CDEF and hands the result
 * to LuaJIT's ffi.cdef (lua/nemo/_cdef.lua), so the Lua side can never drift from it. Keep it
 * FFI-parseable: no macros inside prototypes, no inline functions, no system headers under
 * NEMO_CDEF.
 *
 * Conventions
 * - Errors: a function returns NULL (pointers) or a negative nemo_status (ints) and sets a
 *   thread-local message (nemo_last_error) naming the op, the argument and the values found.
 *   Nothing in the engine exits or aborts on bad input.
 * - Ownership: functions that return nemo_tensor* return a NEW reference (+1) unless the
 *   comment says "borrowed". Arguments are borrowed. nemo_tensor_release drops one reference;
 *   a storage is freed when its last tensor goes.
 * - Shapes are row-major; strides and offsets count elements, not bytes. Dimension arguments
 *   are already normalised (0 <= dim < ndim) by the caller unless stated otherwise.
 * - Compute: bfloat16 and float16 are computed in float32 and rounded once on output; float64
 *   is computed in float64; integer ops are computed in float64 (exact below 2^53).
 */
#ifndef NEMO_H
#define NEMO_H

#ifndef NEMO_CDEF
#include <stddef.h>
#include <stdint.h>
#define NEMO_API __attribute__((visibility("default")))
#else
#define NEMO_API
#endif

#define NEMO_MAXDIM 8
#define NEMO_ABI_VERSION 1
/* The same number as a constant the FFI can see (macros do not survive into the cdef). */
enum { NEMO_ABI_EXPECTED = NEMO_ABI_VERSION };

/* ==== Status codes ==== */
typedef enum {
    NEMO_OK = 0,
    NEMO_EINVAL = -1,       /* bad argument value */
    NEMO_ESHAPE = -2,       /* shapes do not fit */
    NEMO_EDTYPE = -3,       /* dtype not accepted */
    NEMO_EDEVICE = -4,      /* device not available or tensors on different devices */
    NEMO_ENOMEM = -5,       /* out of memory */
    NEMO_EIO = -6,          /* file system */
    NEMO_EFORMAT = -7,      /* malformed file */
    NEMO_EUNSUPPORTED = -8, /* no kernel for this device / feature not built */
    NEMO_EINTERNAL = -9,    /* a bug in nemo */
    NEMO_ECUDA = -10,       /* CUDA runtime or library error, with its text */
    NEMO_ECOMM = -11        /* collective library error (MPI / NCCL) */
} nemo_status;

/* ==== dtypes and devices ==== */
typedef enum {
    NEMO_F32 = 0, NEMO_F64 = 1, NEMO_BF16 = 2, NEMO_F16 = 3,
    NEMO_I64 = 4, NEMO_I32 = 5, NEMO_BOOL = 6, NEMO_NDTYPE = 7
} nemo_dtype;

typedef enum { NEMO_CPU = 0, NEMO_CUDA = 1, NEMO_NDEVTYPE = 2 } nemo_devtype;

/* A storage: one allocation, refcounted, with the function that frees it. Heap blocks,
 * caching-allocator blocks and mmap'd safetensors files are all storages. */
typedef struct nemo_storage {
    void *data;
    size_t nbytes;
    int refcount;
    int devtype, devindex;
    void (*free_fn)(void *ctx, void *data, size_t nbytes);
    void *ctx;
} nemo_storage;

/* A tensor: a refcounted view (shape, strides, offset in elements) over a storage.
 * Lua reads these fields directly (the struct comes from this header through ffi.cdef);
 * only the engine writes them. */
typedef struct nemo_tensor {
    int refcount;
    int dtype;
    int devtype, devindex;
    int ndim;
    int64_t shape[NEMO_MAXDIM];
    int64_t stride[NEMO_MAXDIM];
    int64_t offset;
    nemo_storage *storage;
} nemo_tensor;

/* ==== Library, errors, memory ==== */
NEMO_API int nemo_abi_version(void);
NEMO_API const char *nemo_version(void);
NEMO_API const char *nemo_last_error(void);          /* borrowed; valid until the next failing call */
NEMO_API int nemo_last_status(void);
NEMO_API void nemo_clear_error(void);
NEMO_API int nemo_set_num_threads(int n);            /* elementwise threads and OpenBLAS threads */
NEMO_API int nemo_get_num_threads(void);
/* 1 when bfloat16 products run on AMX tiles here (CPU support, granted by the kernel, NEMO_AMX not "0"). */
NEMO_API int nemo_cpu_has_amx(void);
/* Bytes held by live storages on a device: current and peak (peak reset by reset_peak). */
NEMO_API int64_t nemo_memory_current(int devtype, int devindex);
NEMO_API int64_t nemo_memory_peak(int devtype, int devindex);
NEMO_API void nemo_memory_reset_peak(int devtype, int devindex);
NEMO_API int64_t nemo_memory_cached(int devtype, int devindex);  /* free blocks kept for reuse */
/* Signals a long job wants to end gracefully on (SIGTERM before a preemption): watch(sig)
 * installs a handler that only records the signal and then restores the default action (so a
 * second one ends the process); received(sig) is 1 once it came; unwatch(sig) puts back the
 * handler watch replaced. -1 with nemo_last_error on a bad signal number. */
NEMO_API int nemo_signal_watch(int sig);
NEMO_API int nemo_signal_received(int sig);
NEMO_API int nemo_signal_unwatch(int sig);
NEMO_API void nemo_memory_empty_cache(int devtype, int devindex);   /* CPU: also the pinned blocks */

/* ==== Devices ==== */
/* Number of devices of a type: CPU is 1; CUDA loads libnemo_cuda on first use (0 if absent). */
NEMO_API int nemo_device_count(int devtype);
/* Why CUDA is not available (borrowed string), or NULL if it is. */
NEMO_API const char *nemo_cuda_unavailable_reason(void);
/* What a CUDA device is (cudaGetDeviceProperties): versions are 1000 x major + 10 x minor
 * (13000 = 13.0; 0 when unknown); emulated 1 for NEMO_FAKE_CUDA's host-memory devices. */
typedef struct nemo_cuda_device_info {
    char name[256];
    int64_t total_memory;          /* bytes */
    int major, minor;              /* compute capability */
    int multi_processor_count;
    int runtime_version, driver_version;
    int emulated;
} nemo_cuda_device_info;
NEMO_API int nemo_cuda_get_device_info(int devindex, nemo_cuda_device_info *out);
NEMO_API int nemo_device_synchronize(int devtype, int devindex);

/* ==== CUDA streams and events (engine/cuda_stream.c) ====
 * A stream is an id per device: 0 the default stream, 1..32 a pool of streams that run
 * concurrently with it (order them with events). The current stream of a device receives every
 * kernel and copy on that device; the allocator caches blocks per stream. */
typedef struct nemo_cuda_event nemo_cuda_event;
NEMO_API int nemo_cuda_set_stream(int devindex, int sid);
NEMO_API int nemo_cuda_current_stream(int devindex);                /* its id, or < 0 */
NEMO_API int nemo_cuda_stream_synchronize(int devindex, int sid);
NEMO_API int nemo_cuda_stream_query(int devindex, int sid);         /* 1 idle, 0 busy, < 0 error */
NEMO_API nemo_cuda_event *nemo_cuda_event_new(int devindex, int timing);
NEMO_API void nemo_cuda_event_free(nemo_cuda_event *e);
NEMO_API int nemo_cuda_event_record(nemo_cuda_event *e, int devindex, int sid);
NEMO_API int nemo_cuda_event_wait(nemo_cuda_event *e, int devindex, int sid);   /* sid waits for e */
NEMO_API int nemo_cuda_event_query(nemo_cuda_event *e);             /* 1 done (or never recorded), 0 not yet */
NEMO_API int nemo_cuda_event_synchronize(nemo_cuda_event *e);
NEMO_API int nemo_cuda_event_elapsed(const nemo_cuda_event *start, const nemo_cuda_event *end, double *ms);
/* t's memory is also used by work on stream sid of its device: when t's storage is freed, the
 * block is reused only after that work (as queued at the time of the free) has finished. */
NEMO_API int nemo_record_stream(const nemo_tensor *t, int sid);

/* ==== dtypes ==== */
NEMO_API const char *nemo_dtype_name(int dtype);      /* "float32", ... */
NEMO_API int nemo_dtype_from_name(const char *name);  /* -1 if unknown; accepts torch aliases */
NEMO_API int nemo_dtype_size(int dtype);
NEMO_API int nemo_dtype_is_float(int dtype);

/* ==== Tensor lifecycle and views ==== */
/* Uninitialised tensor, contiguous. */
NEMO_API nemo_tensor *nemo_empty(int ndim, const int64_t *shape, int dtype, int devtype, int devindex);
NEMO_API nemo_tensor *nemo_zeros(int ndim, const int64_t *shape, int dtype, int devtype, int devindex);
/* Wrap external memory: the storage calls free_fn(ctx, data, nbytes) when the last tensor goes
 * (free_fn may be NULL for borrowed memory that outlives every tensor). */
NEMO_API nemo_storage *nemo_storage_wrap(void *data, size_t nbytes, int devtype, int devindex,
                                         void (*free_fn)(void *ctx, void *data, size_t nbytes),
                                         void *ctx);
NEMO_API void nemo_storage_retain(nemo_storage *s);
/* Free (nbytes 0) or allocate again (nbytes > 0; contents undefined) the memory of a storage the
 * engine allocated, keeping the storage and all views over it (FSDP's unsharded parameters
 * between uses). Copies and conversions of a tensor whose storage is freed are an error. */
NEMO_API int nemo_storage_resize_(nemo_storage *s, size_t nbytes);
NEMO_API void nemo_storage_release(nemo_storage *s);
/* A view over a storage (the tensor takes its own reference to s). Checks that every element
 * lies inside the storage. */
NEMO_API nemo_tensor *nemo_tensor_from_storage(nemo_storage *s, int dtype, int ndim,
                                               const int64_t *shape, const int64_t *stride,
                                               int64_t offset);
NEMO_API void nemo_tensor_retain(nemo_tensor *t);
NEMO_API void nemo_tensor_release(nemo_tensor *t);
/* A new handle on the same view (shares the storage). */
NEMO_API nemo_tensor *nemo_tensor_alias(const nemo_tensor *t);
/* A view of t with a new shape/stride/offset over the same storage (bounds checked). */
/* A contiguous copy of CPU tensor t in page-locked host memory (the CUDA plugin's cudaHostAlloc),
 * from which copies to a device are DMA transfers; t itself when it already is one. An error
 * without a CUDA device. Freed blocks are cached for reuse (nemo_memory_empty_cache(NEMO_CPU)
 * frees them). */
NEMO_API nemo_tensor *nemo_pin_memory(const nemo_tensor *t);
NEMO_API int nemo_is_pinned(const nemo_tensor *t);
/* An uninitialised contiguous CPU tensor in page-locked memory (as nemo_pin_memory's result). */
NEMO_API nemo_tensor *nemo_empty_pinned(int ndim, const int64_t *shape, int dtype);
/* nemo_copy_, asynchronous where it can be (non_blocking): a pinned CPU tensor and a CUDA tensor
 * of the same dtype and shape, both contiguous, are copied on the device's current stream and
 * the call returns at once (the host must not touch the CPU side until the stream reached the
 * copy); any other pair is copied synchronously. */
NEMO_API int nemo_copy_async_(nemo_tensor *dst, const nemo_tensor *src);
NEMO_API nemo_tensor *nemo_tensor_view(const nemo_tensor *t, int ndim, const int64_t *shape,
                                       const int64_t *stride, int64_t offset);
NEMO_API int64_t nemo_tensor_numel(const nemo_tensor *t);
NEMO_API int nemo_tensor_is_contiguous(const nemo_tensor *t);
/* Address of element 0 of the view (CPU or device pointer). */
NEMO_API void *nemo_tensor_data(const nemo_tensor *t);

/* ==== Copy, conversion, fill ==== */
/* dst[...] = src[...], same shape (src may have stride-0 dims for broadcast), any dtypes, any
 * devices (cross-device goes through the device's copy kernel). */
NEMO_API int nemo_copy_(nemo_tensor *dst, const nemo_tensor *src);
/* New contiguous tensor with dtype and device (returns a new reference to t itself when it is
 * already contiguous with that dtype and device). */
NEMO_API nemo_tensor *nemo_to(const nemo_tensor *t, int dtype, int devtype, int devindex);
NEMO_API nemo_tensor *nemo_contiguous(const nemo_tensor *t);
NEMO_API nemo_tensor *nemo_clone(const nemo_tensor *t);
NEMO_API int nemo_fill_(nemo_tensor *t, double value);
/* Read element i (in row-major order of the view) as double; for item() and tolist(). */
NEMO_API int nemo_get_flat(const nemo_tensor *t, int64_t i, double *out);
/* Read / write the whole view as a contiguous double array of numel() elements (CPU). */
NEMO_API int nemo_read_f64(const nemo_tensor *t, double *out);
NEMO_API int nemo_write_f64(nemo_tensor *t, const double *in);
/* arange: start + i*step for i < n. linspace: n points from a to b inclusive. */
NEMO_API nemo_tensor *nemo_arange(double start, double step, int64_t n, int dtype, int devtype, int devindex);
NEMO_API nemo_tensor *nemo_linspace(double a, double b, int64_t n, int dtype, int devtype, int devindex);

/* ==== Random numbers ==== */
/* Counter-based (Philox4x32-10): element i of a draw uses counter (offset + i), so results do
 * not depend on threads or devices. A generator is {seed, offset}; each draw advances offset. */
typedef struct nemo_generator { uint64_t seed; uint64_t offset; } nemo_generator;
NEMO_API int nemo_rand_(nemo_tensor *t, nemo_generator *g, double lo, double hi);  /* U[lo, hi) */
NEMO_API int nemo_randn_(nemo_tensor *t, nemo_generator *g, double mean, double std);

/* ==== Pointwise ops (engine/ops/pointwise.c) ==== */
typedef enum {
    NEMO_UOP_NEG = 0, NEMO_UOP_ABS, NEMO_UOP_EXP, NEMO_UOP_LOG, NEMO_UOP_SQRT, NEMO_UOP_RSQRT,
    NEMO_UOP_SIN, NEMO_UOP_COS, NEMO_UOP_TANH, NEMO_UOP_SIGMOID, NEMO_UOP_SILU,
    NEMO_UOP_GELU, NEMO_UOP_GELU_TANH, NEMO_UOP_RELU, NEMO_UOP_SIGN, NEMO_UOP_RECIPROCAL,
    NEMO_UOP_SQUARE, NEMO_UOP_POW_SCALAR,   /* x^a */
    NEMO_UOP_CLAMP,                          /* clamp(x, a, b); NaN bounds mean "none" */
    NEMO_UOP_AFFINE,                         /* a*x + b */
    NEMO_UOP_RPOW_SCALAR,                    /* a^x */
    NEMO_UOP_LOGICAL_NOT,
    NEMO_NUOP
} nemo_uop;

typedef enum {
    NEMO_BOP_ADD = 0,   /* a + alpha*b */
    NEMO_BOP_SUB,       /* a - alpha*b */
    NEMO_BOP_MUL, NEMO_BOP_DIV, NEMO_BOP_POW, NEMO_BOP_MAX, NEMO_BOP_MIN,
    NEMO_BOP_EQ, NEMO_BOP_NE, NEMO_BOP_LT, NEMO_BOP_LE, NEMO_BOP_GT, NEMO_BOP_GE,  /* -> bool */
    NEMO_BOP_AND, NEMO_BOP_OR,                                                      /* -> bool */
    NEMO_NBOP
} nemo_bop;

/* y = op(x); the output dtype is x's (bool for LOGICAL_NOT; float32 for SQRT.. on ints). */
NEMO_API nemo_tensor *nemo_unary(const nemo_tensor *x, int op, double a, double b);
/* dx = g * d op(x)/dx, given x (and y = op(x) when the kernel prefers it; may be NULL). */
NEMO_API nemo_tensor *nemo_unary_backward(const nemo_tensor *g, const nemo_tensor *x,
                                          const nemo_tensor *y, int op, double a, double b);
/* Broadcasting binary op with PyTorch type promotion (out_dtype < 0: promote a and b). */
NEMO_API nemo_tensor *nemo_binary(const nemo_tensor *a, const nemo_tensor *b, int op, double alpha,
                                  int out_dtype);
/* In place: a = a op b (b broadcast to a's shape), result cast to a's dtype. */
NEMO_API int nemo_binary_(nemo_tensor *a, const nemo_tensor *b, int op, double alpha);
/* y = cond ? a : b, broadcasting all three. */
NEMO_API nemo_tensor *nemo_where(const nemo_tensor *cond, const nemo_tensor *a, const nemo_tensor *b);

/* Sum x down to shape (ndim, shape), which must broadcast to x's shape: the gradient of a
 * broadcast. Accumulates in float64; deterministic. */
NEMO_API nemo_tensor *nemo_sum_to(const nemo_tensor *x, int ndim, const int64_t *shape);

/* ==== Config files ==== */
/* YAML text -> JSON text (typed scalars, anchors, merge keys; see engine/yaml.c). Returns a
 * malloc'd string to give back with nemo_free, or NULL with an error naming `name` and the line. */
NEMO_API char *nemo_yaml_to_json(const char *text, size_t len, const char *name);
NEMO_API void nemo_free(void *p);

/* ==== Optimizers (engine/optim.c) ==== */
/* One AdamW step in place on p, with state m (exp_avg) and v (exp_avg_sq) in p's compute dtype;
 * step counts from 1. Matches torch.optim.AdamW's single-tensor update bit for bit in float32. */
NEMO_API int nemo_adamw_step(nemo_tensor *p, const nemo_tensor *g, nemo_tensor *m, nemo_tensor *v, double lr,
                             double beta1, double beta2, double eps, double weight_decay, int64_t step);
NEMO_API int nemo_sum_squares(const nemo_tensor *t, double *out);
/* AdamW on n parameters at once (the update of nemo_adamw_step, bit for bit): steps[i] is
 * parameter i's step count. On a device with a multi-tensor kernel one launch updates them all;
 * on the CPU one parallel region does. */
NEMO_API int nemo_adamw_step_many(int n, nemo_tensor *const *p, const nemo_tensor *const *g, nemo_tensor *const *m,
                                  nemo_tensor *const *v, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, const int64_t *steps);
/* out[i] = nemo_sum_squares(ts[i]) for n tensors of one device: on CUDA one wait for all. */
NEMO_API int nemo_sum_squares_many(int n, const nemo_tensor *const *ts, double *out);
NEMO_API int nemo_has_nonfinite(const nemo_tensor *t);   /* 1 if any NaN/Inf, 0 if none, < 0 on error */

/* ==== Files and folders (engine/fs.c) ==== */
NEMO_API int nemo_fs_kind(const char *path);                 /* 0 missing, 1 file, 2 folder */
NEMO_API int64_t nemo_fs_size(const char *path);
NEMO_API char *nemo_fs_list(const char *path);               /* names separated by '\n'; nemo_free */
NEMO_API int nemo_fs_mkdirs(const char *path);
NEMO_API int nemo_fs_copy_file(const char *src, const char *dst);
NEMO_API int nemo_fs_rename(const char *src, const char *dst);
NEMO_API int nemo_fs_remove_tree(const char *path);
NEMO_API int nemo_fs_sync_dir(const char *path);

/* Everything the op families declare lives in their own headers, pulled in here so that the
 * one ffi.cdef sees all of it. */
#include "nemo_ops.h"

#endif /* NEMO_H */
