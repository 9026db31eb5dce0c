/*
 * kernels/cuda/common.cuh: what every CUDA kernel file of libnemo_cuda.so shares: error
 * statuses with the CUDA runtime's own text, kernel registration, launch sizes, a per-device
 * scratch buffer, dtype sizes, element conversions that equal libnemo's CPU conversions bit for
 * bit, and the strided-offset calculator of the elementwise kernels.
 *
 * Non-obvious rules:
 * - The plugin links no libnemo symbol. libnemo dlopens it with RTLD_LOCAL while libnemo itself
 *   was loaded RTLD_LOCAL by LuaJIT, so a reference to nemo_tensor_data or nemo_set_error
 *   would make the dlopen fail. Kernels read the public structs of nemo.h directly and report
 *   errors as a negative nemo_status plus a message that the plugin's error_text() returns
 *   (a thread-local buffer in plugin.cu); libnemo copies that text into its own error.
 * - Every registered kernel starts with NEMO_CUDA_ENTER, which empties that buffer: after a
 *   kernel call, a non-empty error_text() means this call failed (libnemo relies on it to
 *   report a failing kernel whose front-end only propagates the status).
 * - Nothing here exits, aborts or asserts: every failure is a status.
 * - A kernel file registers its kernels with NEMO_CUDA_KERNEL(name, fn) at file scope; the
 *   plugin hands the whole list to libnemo's registry when CUDA is first used, so adding a
 *   kernel family never touches plugin.cu.
 * - Conversions go through double exactly as libnemo's nemo_load_f64 / nemo_store_f64 do, and
 *   float -> integer conversions reproduce x86-64's cvttsd2si (NaN and out-of-range values give
 *   the "integer indefinite" INT_MIN pattern), so a CUDA copy equals the CPU copy bit for bit.
 */
#ifndef NEMO_CUDA_COMMON_CUH
#define NEMO_CUDA_COMMON_CUH

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cuda_runtime.h>

extern "C" {
#include "nemo.h"
#include "cuda_plugin.h"
}

/* ==== Errors ==== */

/* Format "<what>: <cuda text> (<cudaErrorName>)" into the thread-local error buffer, clear the
 * runtime's non-sticky last error, and return NEMO_ECUDA. what is printf-style. */
int nemo_cuda_fail(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Set the error text for a failure that is not a CUDA error (bad dtype, device...) and return
 * code. */
int nemo_cuda_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Empty the error text (the start of every registered kernel: see the rule at the top). */
void nemo_cuda_clear_error(void);

/* Inside a function returning int: run a CUDA call and return a status on failure. */
#define NEMO_CUDA_TRY(call, ...) do {                                                      \
        cudaError_t nemo_cuda_e_ = (call);                                                   \
        if (nemo_cuda_e_ != cudaSuccess) return nemo_cuda_fail(nemo_cuda_e_, __VA_ARGS__);   \
    } while (0)
/* After a <<<...>>> launch: a bad configuration shows up in cudaGetLastError. */
#define NEMO_CUDA_LAUNCHED(...) NEMO_CUDA_TRY(cudaGetLastError(), __VA_ARGS__)
/* Inside a function returning int: propagate a negative status. */
#define NEMO_CUDA_RC(expr) do { int nemo_cuda_rc_ = (expr); if (nemo_cuda_rc_ < 0) return nemo_cuda_rc_; } while (0)

/* First statement of every registered kernel: clears the error text, checks that tensor t
 * lives on a CUDA device and makes that device current. */
#define NEMO_CUDA_ENTER(op, t) do {                                                         \
        nemo_cuda_clear_error();                                                            \
        if ((t)->devtype != NEMO_CUDA)                                                      \
            return nemo_cuda_error(NEMO_EDEVICE, "%s: cuda kernel called on a %s tensor", (op), \
                                   (t)->devtype == NEMO_CPU ? "cpu" : "non-cuda");          \
        NEMO_CUDA_TRY(cudaSetDevice((t)->devindex), "%s: cudaSetDevice(%d)", (op), (t)->devindex); \
    } while (0)

/* ==== Kernel registration ==== */

typedef void (*nemo_cuda_kfn)(void);
/* Adds (name, fn) to the plugin's list; name must be a string literal (libnemo keeps the
 * pointer). Called from static constructors, before main. */
void nemo_cuda_add_kernel(const char *name, nemo_cuda_kfn fn);
#define NEMO_CUDA_KERNEL(name, fn)                                                          \
    static void __attribute__((constructor)) nemo_cuda_reg_##fn(void) {                     \
        nemo_cuda_add_kernel(name, (nemo_cuda_kfn)(fn)); }
/* A kernel that also takes bfloat16 / float16 operands where the front-end would otherwise
 * convert them to float32 (kernels/cuda/fused.cu says which): registered as name and as
 * name ".lp", which marks it for the front-end (nemo_io_dtype in engine/core.c). */
#define NEMO_CUDA_KERNEL_LP(name, fn)                                                       \
    static void __attribute__((constructor)) nemo_cuda_reg_##fn(void) {                     \
        nemo_cuda_add_kernel(name, (nemo_cuda_kfn)(fn));                                     \
        nemo_cuda_add_kernel(name ".lp", (nemo_cuda_kfn)(fn)); }

/* ==== Launch configuration ==== */

/* The stream kernels of device dev run on: the device's current stream (plugin.cu, set by
 * libnemo through the plugin's set_stream; the legacy default stream until then). Every kernel
 * launcher, cuBLAS / cuBLASLt call and NCCL collective takes its stream from here. */
cudaStream_t nemo_cuda_stream(int dev);
/* The current stream's id on dev (0 the default stream, 1..NEMO_CUDA_MAX_STREAMS the pool). */
int nemo_cuda_stream_id(int dev);

#define NEMO_CUDA_THREADS 256
/* Blocks for n work items with a grid-stride loop (the cap keeps the grid legal for any n). */
static inline unsigned nemo_cuda_blocks(int64_t n) {
    int64_t b = (n + NEMO_CUDA_THREADS - 1) / NEMO_CUDA_THREADS;
    if (b < 1) b = 1;
    if (b > 65535 * 8) b = 65535 * 8;
    return (unsigned)b;
}

/* A grid-stride loop over [0, n) in 64-bit indices. */
#define NEMO_CUDA_LOOP(i, n)                                                                \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);               \
         i += (int64_t)gridDim.x * blockDim.x)

/* A device buffer of at least nbytes for temporaries (partial sums, statistics), owned by the
 * plugin: one per device and stream, grown on demand and kept (not counted in libnemo's memory
 * statistics). Valid until the next call on the same device and stream: kernels of one op
 * share it, and the stream orders its reuse by the next op (ops on two streams have two
 * buffers). One host thread per device. */
int nemo_cuda_scratch(int dev, size_t nbytes, void **p);

/* ==== dtypes (the same table as engine/core.c) ==== */

static inline int nemo_cuda_dtype_size(int dtype) {
    static const int sizes[NEMO_NDTYPE] = {4, 8, 2, 2, 8, 4, 1};
    return (dtype >= 0 && dtype < NEMO_NDTYPE) ? sizes[dtype] : 0;
}
static inline const char *nemo_cuda_dtype_name(int dtype) {
    static const char *names[NEMO_NDTYPE] = {
        "float32", "float64", "bfloat16", "float16", "int64", "int32", "bool"};
    return (dtype >= 0 && dtype < NEMO_NDTYPE) ? names[dtype] : "?";
}
/* Address of element 0 of the view (nemo_tensor_data without linking libnemo). */
static inline void *nemo_cuda_data(const nemo_tensor *t) {
    return (char *)t->storage->data + t->offset * nemo_cuda_dtype_size(t->dtype);
}
static inline int64_t nemo_cuda_numel(const nemo_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}
/* A float32 / float64 compute tensor check for the float kernels (front-ends prepare them). */
static inline int nemo_cuda_check_compute(const char *op, const nemo_tensor *t) {
    if (t->dtype != NEMO_F32 && t->dtype != NEMO_F64)
        return nemo_cuda_error(NEMO_EDTYPE, "%s: cuda kernel expects float32 or float64, got %s", op,
                               nemo_cuda_dtype_name(t->dtype));
    return 0;
}
/* The same for a "<name>.lp" kernel's large operands, which may also be bfloat16 / float16. */
static inline int nemo_cuda_check_io(const char *op, const nemo_tensor *t) {
    if (t->dtype == NEMO_BF16 || t->dtype == NEMO_F16) return 0;
    return nemo_cuda_check_compute(op, t);
}

/* ==== Element conversions: the bit patterns libnemo's CPU code stores ==== */
/* These mirror nemo_bf16_to_f32 / nemo_f32_to_bf16 / nemo_f16_to_f32 / nemo_f32_to_f16 and
 * nemo_load_f64 / nemo_store_f64 in engine/internal.h and engine/core.c bit for bit (NaN
 * included), on the host and on the device. They cannot call libnemo (see the rule at the
 * top), and the CUDA intrinsics (__float2bfloat16_rn...) write other NaN patterns. */

#define NEMO_HD __host__ __device__ __forceinline__
/* #pragma unroll inside functions that are also compiled for the host (gcc warns on it). */
#ifdef __CUDA_ARCH__
#define NEMO_UNROLL _Pragma("unroll")
#else
#define NEMO_UNROLL
#endif

NEMO_HD uint32_t nemo_cuda_f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}
NEMO_HD float nemo_cuda_bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f; memcpy(&f, &u, 4); return f;
#endif
}

NEMO_HD uint16_t nemo_cuda_f32_to_bf16(float f) {
    uint32_t u = nemo_cuda_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;       /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
NEMO_HD float nemo_cuda_bf16_to_f32(uint16_t h) { return nemo_cuda_bits_f32((uint32_t)h << 16); }

NEMO_HD uint16_t nemo_cuda_f32_to_f16(float f) {
    uint32_t u = nemo_cuda_f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);              /* NaN */
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);             /* overflow -> inf */
    if (abs < 0x38800000u) {                                                /* subnormal / zero */
        if (abs < 0x33000000u) return (uint16_t)sign;
        uint32_t e = abs >> 23, m = (abs & 0x7fffffu) | 0x800000u;
        int shift = (int)(126 - e);
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), hw = 1u << (shift - 1);
        if (rem > hw || (rem == hw && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = abs + 0xc8000fffu + ((abs >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}
NEMO_HD float nemo_cuda_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else {   /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    return nemo_cuda_bits_f32(u);
}

/* (int64_t)v and (int32_t)v as x86-64 computes them: truncation in range, INT_MIN for NaN and
 * out-of-range values (C leaves those undefined; libnemo's CPU build gets cvttsd2si's). */
NEMO_HD int64_t nemo_cuda_f64_to_i64(double v) {
    return (v >= -9223372036854775808.0 && v < 9223372036854775808.0) ? (int64_t)v : INT64_MIN;
}
NEMO_HD int32_t nemo_cuda_f64_to_i32(double v) {
    return (v > -2147483649.0 && v < 2147483648.0) ? (int32_t)v : INT32_MIN;
}

/* Element types by dtype: storage type, load as double, store from double (nemo_load_f64 /
 * nemo_store_f64 of engine/internal.h, one dtype per specialisation). */
template <int DT> struct nemo_dt;
template <> struct nemo_dt<NEMO_F32> {
    typedef float S;
    static NEMO_HD double load(S v) { return v; }
    static NEMO_HD S store(double v) { return (float)v; }
};
template <> struct nemo_dt<NEMO_F64> {
    typedef double S;
    static NEMO_HD double load(S v) { return v; }
    static NEMO_HD S store(double v) { return v; }
};
template <> struct nemo_dt<NEMO_BF16> {
    typedef uint16_t S;
    static NEMO_HD double load(S v) { return nemo_cuda_bf16_to_f32(v); }
    static NEMO_HD S store(double v) { return nemo_cuda_f32_to_bf16((float)v); }
};
template <> struct nemo_dt<NEMO_F16> {
    typedef uint16_t S;
    static NEMO_HD double load(S v) { return nemo_cuda_f16_to_f32(v); }
    static NEMO_HD S store(double v) { return nemo_cuda_f32_to_f16((float)v); }
};
template <> struct nemo_dt<NEMO_I64> {
    typedef int64_t S;
    static NEMO_HD double load(S v) { return (double)v; }
    static NEMO_HD S store(double v) { return nemo_cuda_f64_to_i64(v); }
};
template <> struct nemo_dt<NEMO_I32> {
    typedef int32_t S;
    static NEMO_HD double load(S v) { return v; }
    static NEMO_HD S store(double v) { return nemo_cuda_f64_to_i32(v); }
};
template <> struct nemo_dt<NEMO_BOOL> {
    typedef uint8_t S;
    static NEMO_HD double load(S v) { return v ? 1.0 : 0.0; }
    static NEMO_HD S store(double v) { return v != 0.0; }
};

/* Element storage of a kernel's large operands (engine's "<name>.lp" kernels, see
 * nemo_io_dtype in engine/internal.h): IO<T> stores T itself; IO_BF16 / IO_F16 store 16 bits,
 * read into float and rounded once on store, with the conversions above. */
template <typename T> struct IO {
    typedef T S;
    static __device__ __forceinline__ T ld(S v) { return v; }
    static __device__ __forceinline__ S st(T v) { return v; }
};
struct IO_BF16 {
    typedef uint16_t S;
    static __device__ __forceinline__ float ld(S v) { return nemo_cuda_bf16_to_f32(v); }
    static __device__ __forceinline__ S st(float v) { return nemo_cuda_f32_to_bf16(v); }
};
struct IO_F16 {
    typedef uint16_t S;
    static __device__ __forceinline__ float ld(S v) { return nemo_cuda_f16_to_f32(v); }
    static __device__ __forceinline__ S st(float v) { return nemo_cuda_f32_to_f16(v); }
};

/* The compute dtype for large operands of dtype dt. */
static inline int compute_of(int dt) { return dt == NEMO_F64 ? NEMO_F64 : NEMO_F32; }
/* Runs L::template go<T, X>(args...) for the (compute, storage) pair of dtype dt. */
template <typename L, typename... A> static void by_io(int dt, A... args) {
    switch (dt) {
    case NEMO_F64: L::template go<double, IO<double>>(args...); break;
    case NEMO_BF16: L::template go<float, IO_BF16>(args...); break;
    case NEMO_F16: L::template go<float, IO_F16>(args...); break;
    default: L::template go<float, IO<float>>(args...); break;
    }
}

/* Any dtype, chosen at run time (the slow generic path of the copy kernel). */
NEMO_HD double nemo_cuda_load_any(const void *p, int dt) {
    switch (dt) {
    case NEMO_F32: return nemo_dt<NEMO_F32>::load(*(const float *)p);
    case NEMO_F64: return *(const double *)p;
    case NEMO_BF16: return nemo_dt<NEMO_BF16>::load(*(const uint16_t *)p);
    case NEMO_F16: return nemo_dt<NEMO_F16>::load(*(const uint16_t *)p);
    case NEMO_I64: return nemo_dt<NEMO_I64>::load(*(const int64_t *)p);
    case NEMO_I32: return nemo_dt<NEMO_I32>::load(*(const int32_t *)p);
    default: return nemo_dt<NEMO_BOOL>::load(*(const uint8_t *)p);
    }
}
NEMO_HD void nemo_cuda_store_any(void *p, int dt, double v) {
    switch (dt) {
    case NEMO_F32: *(float *)p = nemo_dt<NEMO_F32>::store(v); break;
    case NEMO_F64: *(double *)p = v; break;
    case NEMO_BF16: *(uint16_t *)p = nemo_dt<NEMO_BF16>::store(v); break;
    case NEMO_F16: *(uint16_t *)p = nemo_dt<NEMO_F16>::store(v); break;
    case NEMO_I64: *(int64_t *)p = nemo_dt<NEMO_I64>::store(v); break;
    case NEMO_I32: *(int32_t *)p = nemo_dt<NEMO_I32>::store(v); break;
    default: *(uint8_t *)p = nemo_dt<NEMO_BOOL>::store(v); break;
    }
}

/* v stored as one element of dtype, in the low bytes of the result (little endian); returns
 * the element size, or 0 for an unknown dtype. */
static inline int nemo_cuda_encode(double v, int dtype, uint64_t *bits) {
    *bits = 0;
    switch (dtype) {
    case NEMO_F32: { float f = (float)v; memcpy(bits, &f, 4); return 4; }
    case NEMO_F64: memcpy(bits, &v, 8); return 8;
    case NEMO_BF16: *bits = nemo_cuda_f32_to_bf16((float)v); return 2;
    case NEMO_F16: *bits = nemo_cuda_f32_to_f16((float)v); return 2;
    case NEMO_I64: { int64_t i = (int64_t)v; memcpy(bits, &i, 8); return 8; }
    case NEMO_I32: { int32_t i = (int32_t)v; uint32_t u; memcpy(&u, &i, 4); *bits = u; return 4; }
    case NEMO_BOOL: *bits = v != 0.0; return 1;
    default: return 0;
    }
}

/* ==== Strided offsets for elementwise kernels ==== */

/* n / d and n % d for a fixed d by one multiply-high (Granlund-Montgomery, as PyTorch's
 * IntDivider): exact for n, d < 2^31, which is why the 32-bit path is only taken for fewer
 * than 2^31 elements. */
struct nemo_cuda_divmod {
    uint32_t d, m;
    int s;
};
static inline nemo_cuda_divmod nemo_cuda_divmod_make(uint32_t d) {
    nemo_cuda_divmod r;
    r.d = d ? d : 1;
    r.s = 0;
    while (r.s < 32 && (1ull << r.s) < r.d) r.s++;
    r.m = (uint32_t)(((1ull << 32) * ((1ull << r.s) - r.d)) / r.d + 1);
    return r;
}
NEMO_HD uint32_t nemo_cuda_div(const nemo_cuda_divmod &v, uint32_t n) {
#ifdef __CUDA_ARCH__
    uint32_t t = __umulhi(n, v.m);
#else
    uint32_t t = (uint32_t)(((uint64_t)n * v.m) >> 32);
#endif
    return (t + n) >> v.s;
}

/* ==== 16-byte vectors for elementwise kernels ====
 * An elementwise kernel over 16-bit data that loads one element per thread keeps too few bytes in
 * flight to reach the memory's bandwidth (by Little's law about a fifth of an H100 / H200's at
 * full occupancy); PyTorch's vectorized_elementwise_kernel moves 16 bytes per operand per step for
 * this reason. nemo_cuda_pack<S> is such a vector of 16 / sizeof(S) elements. A kernel takes its
 * vector path only when the launcher saw every operand 16-byte aligned (nemo_cuda_vec_ok); the
 * values are the same either way (the same per-element formula). */
template <typename S> union nemo_cuda_pack {
    uint4 u;
    S s[16 / sizeof(S)];
};
static inline int nemo_cuda_vec_ok(const void *a, const void *b = NULL, const void *c = NULL) {
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 15) == 0;
}
/* blocks for n elements, V of them per thread-step on the vector path */
static inline unsigned nemo_cuda_vec_blocks(int64_t n, int vec, int V) {
    return nemo_cuda_blocks(vec ? (n + V - 1) / V : n);
}

/* Division by a launch constant d for per-element index splits: the magic multiply above when
 * every dividend stays below 2^31 (nmax, which the launcher knows) and d fits, else 64-bit
 * division. 64-bit integer division is a long instruction sequence on NVIDIA GPUs: an
 * elementwise kernel that splits its index with it per element is compute-bound, several times
 * slower than its memory traffic. The branch is uniform across the grid. */
struct nemo_cuda_fdiv {
    nemo_cuda_divmod m;
    int64_t d;
    int fast;
};
static inline nemo_cuda_fdiv nemo_cuda_fdiv_make(int64_t d, int64_t nmax) {
    nemo_cuda_fdiv f;
    f.d = d > 0 ? d : 1;
    f.fast = f.d < 0x7fffffff && nmax < 0x7fffffff;
    f.m = nemo_cuda_divmod_make(f.fast ? (uint32_t)f.d : 1u);
    return f;
}
/* n / d for 0 <= n <= nmax */
NEMO_HD int64_t nemo_cuda_fdiv_q(const nemo_cuda_fdiv &f, int64_t n) {
    return f.fast ? (int64_t)nemo_cuda_div(f.m, (uint32_t)n) : n / f.d;
}

/* Up to N operands over one iteration shape, after coalescing (size-1 dims dropped, dims
 * contiguous in every operand merged), innermost dim first. Offsets are in elements of each
 * operand (negative strides allowed). */
template <int N> struct nemo_cuda_iter {
    int ndim;
    nemo_cuda_divmod div[NEMO_MAXDIM];
    int64_t shape[NEMO_MAXDIM];
    int64_t stride[N][NEMO_MAXDIM];
};

/* Builds it from (ndim, shape) and one stride array per operand (row-major order, outermost
 * first, as in nemo_tensor). Returns the number of elements. flat is set when every operand
 * is one dense run with stride 1 (offset == index for all of them). */
template <int N>
static int64_t nemo_cuda_iter_make(nemo_cuda_iter<N> *it, int ndim, const int64_t *shape,
                                   const int64_t *const *strides, int *flat) {
    int64_t sh[NEMO_MAXDIM], st[N][NEMO_MAXDIM], numel = 1;
    int n = 0;
    for (int d = 0; d < ndim; d++) numel *= shape[d];
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 1) continue;
        if (n > 0) {
            int ok = 1;
            for (int k = 0; k < N; k++)
                if (st[k][n - 1] != strides[k][d] * shape[d]) { ok = 0; break; }
            if (ok) {
                sh[n - 1] *= shape[d];
                for (int k = 0; k < N; k++) st[k][n - 1] = strides[k][d];
                continue;
            }
        }
        sh[n] = shape[d];
        for (int k = 0; k < N; k++) st[k][n] = strides[k][d];
        n++;
    }
    if (n == 0) { sh[0] = 1; for (int k = 0; k < N; k++) st[k][0] = 0; n = 1; }
    it->ndim = n;
    for (int j = 0; j < n; j++) {   /* innermost first */
        int d = n - 1 - j;
        it->shape[j] = sh[d];
        it->div[j] = nemo_cuda_divmod_make((uint32_t)(sh[d] < 0x7fffffff ? sh[d] : 1));
        for (int k = 0; k < N; k++) it->stride[k][j] = st[k][d];
    }
    for (int j = n; j < NEMO_MAXDIM; j++) {
        it->shape[j] = 1;
        it->div[j] = nemo_cuda_divmod_make(1);
        for (int k = 0; k < N; k++) it->stride[k][j] = 0;
    }
    int f = n == 1;
    for (int k = 0; k < N && f; k++) f = it->stride[k][0] == 1 || sh[0] == 1;
    *flat = f;
    return numel;
}

/* Offsets of element i (row-major order of the iteration shape), 32-bit index math: only for
 * fewer than 2^31 elements. */
template <int N>
NEMO_HD void nemo_cuda_offsets32(const nemo_cuda_iter<N> &it, uint32_t i, int64_t *off) {
NEMO_UNROLL
    for (int k = 0; k < N; k++) off[k] = 0;
NEMO_UNROLL
    for (int j = 0; j < NEMO_MAXDIM; j++) {
        if (j == it.ndim - 1) {
NEMO_UNROLL
            for (int k = 0; k < N; k++) off[k] += (int64_t)i * it.stride[k][j];
            break;
        }
        uint32_t q = nemo_cuda_div(it.div[j], i);
        uint32_t r = i - q * it.div[j].d;
NEMO_UNROLL
        for (int k = 0; k < N; k++) off[k] += (int64_t)r * it.stride[k][j];
        i = q;
    }
}
/* The same with 64-bit division (2^31 elements or more). */
template <int N>
NEMO_HD void nemo_cuda_offsets64(const nemo_cuda_iter<N> &it, uint64_t i, int64_t *off) {
NEMO_UNROLL
    for (int k = 0; k < N; k++) off[k] = 0;
NEMO_UNROLL
    for (int j = 0; j < NEMO_MAXDIM; j++) {
        if (j == it.ndim - 1) {
NEMO_UNROLL
            for (int k = 0; k < N; k++) off[k] += (int64_t)i * it.stride[k][j];
            break;
        }
        uint64_t sh = (uint64_t)it.shape[j];
        uint64_t q = i / sh, r = i - q * sh;
NEMO_UNROLL
        for (int k = 0; k < N; k++) off[k] += (int64_t)r * it.stride[k][j];
        i = q;
    }
}

/* Index modes of the elementwise kernels: every operand dense (offset == index), strided with
 * 32-bit index math, strided with 64-bit index math. */
enum { NEMO_CUDA_FLAT = 0, NEMO_CUDA_STR32 = 1, NEMO_CUDA_STR64 = 2 };
template <int MODE, int N>
NEMO_HD void nemo_cuda_offsets(const nemo_cuda_iter<N> &it, int64_t i, int64_t *off) {
    if (MODE == NEMO_CUDA_FLAT) {
NEMO_UNROLL
        for (int k = 0; k < N; k++) off[k] = i;
    } else if (MODE == NEMO_CUDA_STR32) {
        nemo_cuda_offsets32<N>(it, (uint32_t)i, off);
    } else {
        nemo_cuda_offsets64<N>(it, (uint64_t)i, off);
    }
}
static inline int nemo_cuda_mode(int flat, int64_t n) {
    return flat ? NEMO_CUDA_FLAT : n < 0x7fffffff ? NEMO_CUDA_STR32 : NEMO_CUDA_STR64;
}

/* ==== Block reductions ==== */

/* Combine G lanes' values (G = 32: one warp; G = 64..1024: a whole block of G threads, using
 * the shared array sm of G / 32 entries) with the associative op f; the result is valid in
 * lane 0 of the group (and, for a block, in thread 0). The tree is fixed by G, so results do
 * not depend on timing. */
template <typename T, typename F>
__device__ __forceinline__ T nemo_cuda_warp_reduce(T v, F f) {
NEMO_UNROLL
    for (int o = 16; o > 0; o >>= 1) v = f(v, __shfl_down_sync(0xffffffffu, v, o));
    return v;
}
template <int G, typename T, typename F>
__device__ __forceinline__ T nemo_cuda_group_reduce(T v, F f, T *sm) {
    v = nemo_cuda_warp_reduce(v, f);
    if (G == 32) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();                       /* sm may still be read by a previous reduction */
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < G / 32 ? sm[lane] : sm[0];   /* lanes past G / 32 are never combined */
NEMO_UNROLL
        for (int o = 16; o > 0; o >>= 1) {
            T u = __shfl_down_sync(0xffffffffu, v, o);
            if (lane + o < G / 32) v = f(v, u);
        }
    }
    return v;
}
/* The value of lane / thread 0 of the group, in every thread of it (sm: one entry). */
template <int G, typename T>
__device__ __forceinline__ T nemo_cuda_group_bcast(T v, T *sm) {
    if (G == 32) return __shfl_sync(0xffffffffu, v, 0);
    __syncthreads();
    if (threadIdx.x == 0) sm[0] = v;
    __syncthreads();
    return sm[0];
}

/* ==== Which GPUs this build runs on ==== */

/* The CUDA_ARCH list the Makefile compiled for ("80 90"); the emulator is an sm_90 device. */
#ifndef NEMO_CUDA_ARCHS
#define NEMO_CUDA_ARCHS "90"
#endif
/* Whether code built for archs (space-separated compute capabilities, as 80 or 120) runs on a
 * device of compute capability cc (10 major + minor): a cubin of the same major version and no
 * newer minor one, or the PTX of the last arch (the Makefile embeds it) no newer than the
 * device, which the driver compiles at load. */
static inline int nemo_cuda_arch_runs_on(const char *archs, int cc) {
    int last = 0, ok = 0;
    for (const char *s = archs; *s;) {
        char *end = NULL;
        const long a = strtol(s, &end, 10);
        if (end == s) { s++; continue; }
        if (a / 10 == cc / 10 && a % 10 <= cc % 10) ok = 1;
        last = (int)a;
        s = end;
    }
    return ok || (last > 0 && last <= cc);
}

#endif /* NEMO_CUDA_COMMON_CUH */
