/*
 * kernels/cuda/util.cuh: what the kernel families nnops.cu, fused.cu, attention.cu, conv.cu and
 * optim.cu share on top of common.cuh: IEEE-rounded arithmetic that nvcc never contracts, float
 * rows stored as float32 / bfloat16 / float16 (or float64), row-group launch plans, the checks
 * every launcher repeats, scratch carving, and row-major cuBLAS products (blas.cu).
 *
 * Non-obvious rules
 * - rn_mul / rn_add / rn_sub (the __fmul_rn / __dadd_rn family) are what make a CUDA kernel
 *   equal to the CPU twin built with -ffp-contract=off: nvcc fuses a*b + c into an fma by
 *   default, these intrinsics are never fused. Every product that feeds a sum uses them.
 * - Row groups: G = 32 (one warp per row, 8 rows per 256-thread block) or G = 256 (a whole
 *   block per row). ROW_TASKS walks the rows with a grid-stride loop in which every thread of
 *   a block runs the same number of iterations and every thread of a group takes the same
 *   path, so group reductions (warp shuffles, __syncthreads for G = 256) are always legal;
 *   threads past the last row carry `ok = false` and only join the reductions.
 * - The gemm helpers take row-major operands (as kernels/cpu uses BLAS) and run on the
 *   device's stream; float32 computes with CUBLAS_COMPUTE_32F (true float32, no TF32 unless
 *   NVIDIA_TF32_OVERRIDE=1 is set in the environment), float64 with CUBLAS_COMPUTE_64F. cuBLAS
 *   gives the same bits run to run for the same shapes on one stream, so callers stay
 *   deterministic as long as their own reductions are.
 */
#ifndef NEMO_CUDA_UTIL_CUH
#define NEMO_CUDA_UTIL_CUH

#include "common.cuh"

/* ==== IEEE-rounded arithmetic, never contracted into fma ==== */

__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float k_exp(float v) { return expf(v); }
__device__ __forceinline__ double k_exp(double v) { return exp(v); }
__device__ __forceinline__ float k_log(float v) { return logf(v); }
__device__ __forceinline__ double k_log(double v) { return log(v); }

/* ==== Float rows in their storage dtype ==== */

/* Element i of a row array of dtype dt as the compute type T (float: dt is f32, bf16 or f16;
 * double: dt is f64). The switch is uniform over a launch, so it costs a predictable branch. */
template <typename T> __device__ __forceinline__ T ld_as(const void *p, int64_t i, int dt);
template <> __device__ __forceinline__ float ld_as<float>(const void *p, int64_t i, int dt) {
    if (dt == NEMO_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == NEMO_BF16 ? nemo_cuda_bf16_to_f32(h) : nemo_cuda_f16_to_f32(h);
}
template <> __device__ __forceinline__ double ld_as<double>(const void *p, int64_t i, int dt) {
    (void)dt;
    return ((const double *)p)[i];
}
template <typename T> __device__ __forceinline__ void st_as(void *p, int64_t i, int dt, T v);
template <> __device__ __forceinline__ void st_as<float>(void *p, int64_t i, int dt, float v) {
    if (dt == NEMO_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = dt == NEMO_BF16 ? nemo_cuda_f32_to_bf16(v) : nemo_cuda_f32_to_f16(v);
}
template <> __device__ __forceinline__ void st_as<double>(void *p, int64_t i, int dt, double v) {
    (void)dt;
    ((double *)p)[i] = v;
}

/* ==== Reductions ==== */

struct AddF64 {
    __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
/* The double sum of one value per thread over a group of G threads, in every thread of the
 * group (fixed shuffle tree; sm: NEMO_CUDA_THREADS / 32 doubles of shared memory). */
template <int G>
__device__ __forceinline__ double group_sum(double v, double *sm) {
    v = nemo_cuda_group_reduce<G>(v, AddF64(), sm);
    return nemo_cuda_group_bcast<G>(v, sm);
}

/* ==== Launch plans ==== */

static inline int64_t k_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t k_clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Group size for rows of n elements: a warp below 1024 elements, a whole block above. */
static inline int row_group(int64_t n) { return n >= 1024 ? NEMO_CUDA_THREADS : 32; }
/* Blocks for ntask row tasks of groups of G threads. */
static inline unsigned row_blocks(int64_t ntask, int G) {
    int64_t per = NEMO_CUDA_THREADS / G;
    return (unsigned)k_clamp(k_cdiv(ntask, per), 1, 65535 * 8);
}
/* Blocks for a grid-stride loop over n items (nemo_cuda_blocks with n = 0 allowed). */
static inline unsigned k_blocks(int64_t n) { return nemo_cuda_blocks(n > 0 ? n : 1); }

/* for each row task t < ntask: runs in the G threads of t's group, lane = threadIdx.x % G,
 * with `bool ok = t < ntask` for threads past the end (see the rule at the top). */
#define ROW_TASKS(t, ntask, G)                                                                  \
    for (int64_t t##_0 = (int64_t)blockIdx.x * (NEMO_CUDA_THREADS / (G)); t##_0 < (ntask);        \
         t##_0 += (int64_t)gridDim.x * (NEMO_CUDA_THREADS / (G)))                                 \
        for (int64_t t = t##_0 + threadIdx.x / (G), t##_once = 0; t##_once < 1; t##_once++)

/* ==== Launcher checks ==== */

/* t (may be NULL when optional) lives on ref's device and has dtype dt (dt < 0: any). */
static inline int k_check(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int dt) {
    if (!t) return 0;
    if (t->devtype != NEMO_CUDA || t->devindex != ref->devindex)
        return nemo_cuda_error(NEMO_EDEVICE, "%s: %s is on %s:%d, expected cuda:%d", op, what,
                               t->devtype == NEMO_CUDA ? "cuda" : "cpu", t->devindex, ref->devindex);
    if (dt >= 0 && t->dtype != dt)
        return nemo_cuda_error(NEMO_EDTYPE, "%s: %s is %s, expected %s (the front-end converts)", op, what,
                               nemo_cuda_dtype_name(t->dtype), nemo_cuda_dtype_name(dt));
    return 0;
}
/* A required tensor argument. */
static inline int k_need(const char *op, const char *what, const nemo_tensor *t) {
    if (!t) return nemo_cuda_error(NEMO_EINVAL, "%s: %s is required", op, what);
    return 0;
}
static inline int k_sizes(const char *op, int64_t a, int64_t b, int64_t c) {
    if (a < 0 || b < 0 || c < 0)
        return nemo_cuda_error(NEMO_EINVAL, "%s: negative sizes %lld, %lld, %lld", op, (long long)a, (long long)b,
                               (long long)c);
    return 0;
}
static inline void *k_data(const nemo_tensor *t) { return t ? nemo_cuda_data(t) : NULL; }

/* ==== Scratch carving ==== */

/* Pieces of one scratch buffer, each 256-byte aligned. Carve once with base NULL to learn the
 * total size (off), get the scratch, then carve again with the same calls and the real base. */
struct k_carve {
    char *base;
    size_t off;
};
static inline void *k_take(k_carve *c, size_t nbytes) {
    size_t at = (c->off + 255) & ~(size_t)255;
    c->off = at + nbytes;
    return c->base ? (void *)(c->base + at) : NULL;
}

/* ==== Row-major products through cuBLAS (blas.cu) ==== */

/* c_j = alpha op(a_j) op(b_j) + beta c_j for j < batch, all row-major, op(x) = x^T when the
 * flag is set (the operand is stored transposed); A, B, C are arrays of batch device pointers
 * that live in device memory. k == 0 gives c = beta c (zeros when beta == 0). A leading
 * dimension only matters when the operand has more than one stored row. op names the caller
 * in error messages. Runs on nemo_cuda_stream(dev) without synchronizing. */
int nemo_cuda_gemm_ptrs(const char *op, int dev, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                        const void *const *A, int64_t lda, const void *const *B, int64_t ldb, double beta,
                        void *const *C, int64_t ldc, int64_t batch);
/* The same for one product of plain device pointers. */
int nemo_cuda_gemm1(const char *op, int dev, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                    const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc);

#endif /* NEMO_CUDA_UTIL_CUH */
