/*
 * kernels/cuda/pointwise.cu: the CUDA kernels of the pointwise family, with the CPU kernels'
 * signatures (kernels/cpu/pointwise.c) and formulas:
 *
 *   "unary"           int (nemo_tensor *y, const nemo_tensor *x, int op, double a, double b)
 *   "unary_backward"  int (nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int op,
 *                          double a, double b)
 *   "binary"          int (nemo_tensor *y, const nemo_tensor *a, const nemo_tensor *b,
 *                          const int64_t *astride, const int64_t *bstride, int op, double alpha)
 *   "where"           int (nemo_tensor *y, const nemo_tensor *c, const nemo_tensor *a,
 *                          const nemo_tensor *b, const int64_t *const *strides)
 *
 * As on the CPU, the front-end (engine/ops/pointwise.c) hands over tensors in the compute
 * dtype (float32 or float64), unary inputs and every output dense; unary, unary_backward and
 * binary also take all-bfloat16 or all-float16 operands, read into float32 and rounded once
 * on store (registered as "<name>.lp" too: the front-end then skips its conversions, and the
 * numbers are those of converting first); binary and where read
 * their inputs through broadcast strides on the output's shape (where: strides[0..3] for y, c,
 * a, b). Each returns 0, or a negative status with the plugin's error text; launches on the
 * device's stream without synchronizing.
 *
 * Non-obvious rules:
 * - The op switch sits outside the element loops (one loop per op inside one kernel per dtype
 *   and index mode), so there is no per-element dispatch and few kernels to compile.
 * - No fused multiply-add: nvcc contracts a*b + c into one fma by default, the CPU build does
 *   not (-ffp-contract=off). Every product that feeds a sum goes through mul()/add() (the
 *   __fmul_rn/__dadd_rn family, which are never contracted), so add/sub/mul/div, affine,
 *   clamp, relu and friends equal the CPU bit for bit; only the libm functions (exp, tanh,
 *   erf, pow...) differ, by CUDA's documented ulp bounds.
 */
#include "common.cuh"

/* ==== Device math, one name per operation for float and double ==== */

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
#define MATH1(name, f32, f64)                                                                  \
    __device__ __forceinline__ float name(float v) { return f32(v); }                          \
    __device__ __forceinline__ double name(double v) { return f64(v); }
MATH1(m_abs, fabsf, fabs)
MATH1(m_exp, expf, exp)
MATH1(m_log, logf, log)
MATH1(m_sqrt, sqrtf, sqrt)
MATH1(m_sin, sinf, sin)
MATH1(m_cos, cosf, cos)
MATH1(m_tanh, tanhf, tanh)
MATH1(m_erf, erff, erf)
__device__ __forceinline__ float m_pow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double m_pow(double a, double b) { return pow(a, b); }

#define SQRT_2_PI 0.7978845608028654   /* sqrt(2/pi) */
#define INV_SQRT_2 0.7071067811865476
#define INV_SQRT_2PI 0.3989422804014327

/* ==== Kernels ==== */

/* y[i] = f(x[i]); LOOP runs expr with v = x[i]: with vec (16-byte aligned operands, the
 * launcher's nemo_cuda_vec_ok) one 16-byte vector per operand per thread-step, the tail one
 * element at a time; without, one element at a time. */
#define LOOP(expr) {                                                                          \
        typedef typename X::S S_;                                                             \
        constexpr int V_ = 16 / (int)sizeof(S_);                                              \
        int64_t i0_ = 0;                                                                      \
        if (vec) {                                                                            \
            NEMO_CUDA_LOOP(k_, n / V_) {                                                      \
                nemo_cuda_pack<S_> pi_, po_;                                                  \
                pi_.u = ((const uint4 *)x)[k_];                                               \
                NEMO_UNROLL for (int j_ = 0; j_ < V_; j_++) {                                 \
                    T v = X::ld(pi_.s[j_]); po_.s[j_] = X::st(expr); }                        \
                ((uint4 *)y)[k_] = po_.u;                                                     \
            }                                                                                 \
            i0_ = n / V_ * V_;                                                                \
        }                                                                                     \
        NEMO_CUDA_LOOP(t_, n - i0_) { const int64_t i = i0_ + t_; T v = X::ld(x[i]); y[i] = X::st(expr); } }
template <typename T, typename X>
__global__ void unary_kernel(typename X::S *y, const typename X::S *x, int64_t n, int op, double a, double b,
                             int vec) {
    switch (op) {
    case NEMO_UOP_NEG: LOOP(-v); break;
    case NEMO_UOP_ABS: LOOP(m_abs(v)); break;
    case NEMO_UOP_EXP: LOOP(m_exp(v)); break;
    case NEMO_UOP_LOG: LOOP(m_log(v)); break;
    case NEMO_UOP_SQRT: LOOP(m_sqrt(v)); break;
    case NEMO_UOP_RSQRT: LOOP((T)1 / m_sqrt(v)); break;
    case NEMO_UOP_SIN: LOOP(m_sin(v)); break;
    case NEMO_UOP_COS: LOOP(m_cos(v)); break;
    case NEMO_UOP_TANH: LOOP(m_tanh(v)); break;
    case NEMO_UOP_SIGMOID: LOOP((T)1 / add((T)1, m_exp(-v))); break;
    case NEMO_UOP_SILU: LOOP(v / add((T)1, m_exp(-v))); break;
    case NEMO_UOP_GELU: LOOP(mul(mul((T)0.5, v), add((T)1, m_erf(mul(v, (T)INV_SQRT_2))))); break;
    case NEMO_UOP_GELU_TANH: {
        const T k = (T)SQRT_2_PI, c = (T)0.044715;
        LOOP(mul(mul((T)0.5, v), add((T)1, m_tanh(mul(k, add(v, mul(mul(mul(c, v), v), v)))))));
        break;
    }
    case NEMO_UOP_RELU: LOOP(v > 0 ? v : (v != v ? v : (T)0)); break;
    case NEMO_UOP_SIGN: LOOP((T)((v > 0) - (v < 0))); break;
    case NEMO_UOP_RECIPROCAL: LOOP((T)1 / v); break;
    case NEMO_UOP_SQUARE: LOOP(mul(v, v)); break;
    case NEMO_UOP_POW_SCALAR:
        if (a == 2.0) LOOP(mul(v, v))
        else if (a == 0.5) LOOP(m_sqrt(v))
        else if (a == 1.0) LOOP(v)
        else { const T e = (T)a; LOOP(m_pow(v, e)); }
        break;
    case NEMO_UOP_RPOW_SCALAR: { const T base = (T)a; LOOP(m_pow(base, v)); break; }
    case NEMO_UOP_CLAMP: {
        const T lo = (T)a, hi = (T)b;
        const bool hl = a == a, hh = b == b;
        LOOP(v != v ? v : (hl && v < lo) ? lo : (hh && v > hi) ? hi : v);
        break;
    }
    case NEMO_UOP_AFFINE: { const T sa = (T)a, sb = (T)b; LOOP(add(mul(sa, v), sb)); break; }
    case NEMO_UOP_LOGICAL_NOT: LOOP((T)(v == 0)); break;
    default: break;   /* rejected on the host */
    }
}
#undef LOOP

/* dx[i] = g[i] * d op / dx at x[i]: the formulas of kernels/cpu/pointwise.c's BWD_BODY term
 * for term (PyTorch's backward kernels), each transcendental evaluated once (BLOCK holds the
 * shared terms). */
#define LOOP(BLOCK, expr) {                                                                   \
        typedef typename X::S S_;                                                             \
        constexpr int V_ = 16 / (int)sizeof(S_);                                              \
        int64_t i0_ = 0;                                                                      \
        if (vec) {                                                                            \
            NEMO_CUDA_LOOP(k_, n / V_) {                                                      \
                nemo_cuda_pack<S_> pg_, px_, po_;                                             \
                pg_.u = ((const uint4 *)g)[k_];                                               \
                px_.u = ((const uint4 *)x)[k_];                                               \
                NEMO_UNROLL for (int j_ = 0; j_ < V_; j_++) {                                 \
                    T gv = X::ld(pg_.s[j_]), xv = X::ld(px_.s[j_]); (void)gv; (void)xv;       \
                    BLOCK; po_.s[j_] = X::st(expr); }                                         \
                ((uint4 *)dx)[k_] = po_.u;                                                    \
            }                                                                                 \
            i0_ = n / V_ * V_;                                                                \
        }                                                                                     \
        NEMO_CUDA_LOOP(t_, n - i0_) {                                                         \
            const int64_t i = i0_ + t_;                                                       \
            T gv = X::ld(g[i]), xv = X::ld(x[i]); (void)gv; (void)xv; BLOCK; dx[i] = X::st(expr); } }
template <typename T, typename X>
__global__ void unary_backward_kernel(typename X::S *dx, const typename X::S *g, const typename X::S *x, int64_t n,
                                      int op, double a, double b, int vec) {
    switch (op) {
    case NEMO_UOP_NEG: LOOP(, -gv); break;
    case NEMO_UOP_ABS: LOOP(, mul(gv, (T)((xv > 0) - (xv < 0)))); break;
    case NEMO_UOP_EXP: LOOP(, mul(gv, m_exp(xv))); break;
    case NEMO_UOP_LOG: LOOP(, gv / xv); break;
    case NEMO_UOP_SQRT: LOOP(, gv / mul((T)2, m_sqrt(xv))); break;
    case NEMO_UOP_RSQRT: LOOP(, mul(gv, (T)-0.5) / mul(xv, m_sqrt(xv))); break;
    case NEMO_UOP_SIN: LOOP(, mul(gv, m_cos(xv))); break;
    case NEMO_UOP_COS: LOOP(, mul(-gv, m_sin(xv))); break;
    case NEMO_UOP_TANH: LOOP(T t = m_tanh(xv), mul(gv, sub((T)1, mul(t, t)))); break;
    case NEMO_UOP_SIGMOID:   /* g (1 - s) s */
        LOOP(T s = (T)1 / add((T)1, m_exp(-xv)), mul(mul(gv, sub((T)1, s)), s));
        break;
    case NEMO_UOP_SILU:      /* g s (1 + x (1 - s)) */
        LOOP(T s = (T)1 / add((T)1, m_exp(-xv)), mul(mul(gv, s), add((T)1, mul(xv, sub((T)1, s)))));
        break;
    case NEMO_UOP_GELU:      /* g (cdf + x pdf) */
        LOOP(T cdf = mul((T)0.5, add((T)1, m_erf(mul(xv, (T)INV_SQRT_2))));
             T pdf = mul((T)INV_SQRT_2PI, m_exp(mul(mul(xv, xv), (T)-0.5))),
             mul(gv, add(cdf, mul(xv, pdf))));
        break;
    case NEMO_UOP_GELU_TANH: {   /* g (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)) */
        const T k = (T)SQRT_2_PI, c = (T)0.044715, c3 = mul((T)3, c);
        LOOP(T x2 = mul(xv, xv); T t = m_tanh(mul(k, add(xv, mul(c, mul(x2, xv))))),
             mul(gv, add(mul((T)0.5, add((T)1, t)),
                         mul(mul(mul((T)0.5, xv), sub((T)1, mul(t, t))), mul(k, add((T)1, mul(c3, x2)))))));
        break;
    }
    case NEMO_UOP_RELU: LOOP(, xv > 0 ? gv : (T)0); break;
    case NEMO_UOP_SIGN: LOOP(, (T)0); break;
    case NEMO_UOP_RECIPROCAL: LOOP(, -gv / mul(xv, xv)); break;
    case NEMO_UOP_SQUARE: LOOP(, mul(mul((T)2, gv), xv)); break;
    case NEMO_UOP_POW_SCALAR:
        if (a == 0.0) LOOP(, (T)0)
        else if (a == 2.0) LOOP(, mul(mul((T)2, gv), xv))
        else { const T sa = (T)a, e = (T)(a - 1.0); LOOP(, mul(mul(gv, sa), m_pow(xv, e))); }
        break;
    case NEMO_UOP_RPOW_SCALAR: { const T base = (T)a; LOOP(, mul(mul(gv, m_pow(base, xv)), m_log(base))); break; }
    case NEMO_UOP_CLAMP: {
        const bool hl = a == a, hh = b == b;
        const T lo = (T)a, hi = (T)b;
        LOOP(, ((hl && xv < lo) || (hh && xv > hi)) ? (T)0 : gv);
        break;
    }
    case NEMO_UOP_AFFINE: { const T sa = (T)a; LOOP(, mul(sa, gv)); break; }
    default: break;   /* rejected on the host */
    }
}
#undef LOOP

/* y[o0] = a[o1] op b[o2] over the broadcast shape; offsets from the index mode (FLAT with vec:
 * 16-byte vectors, as the unary LOOP). */
#define LOOP(expr) {                                                                          \
        if (MODE == NEMO_CUDA_FLAT && vec) {                                                  \
            typedef typename X::S S_;                                                         \
            constexpr int V_ = 16 / (int)sizeof(S_);                                          \
            NEMO_CUDA_LOOP(k_, n / V_) {                                                      \
                nemo_cuda_pack<S_> pa_, pb_, po_;                                             \
                pa_.u = ((const uint4 *)A)[k_];                                               \
                pb_.u = ((const uint4 *)B)[k_];                                               \
                NEMO_UNROLL for (int j_ = 0; j_ < V_; j_++) {                                 \
                    T av = X::ld(pa_.s[j_]), bv = X::ld(pb_.s[j_]); po_.s[j_] = X::st(expr); } \
                ((uint4 *)y)[k_] = po_.u;                                                     \
            }                                                                                 \
            const int64_t i0_ = n / V_ * V_;                                                  \
            NEMO_CUDA_LOOP(t_, n - i0_) {                                                     \
                const int64_t i = i0_ + t_; T av = X::ld(A[i]), bv = X::ld(B[i]); y[i] = X::st(expr); } \
        } else NEMO_CUDA_LOOP(i, n) {                                                         \
            int64_t off[3]; nemo_cuda_offsets<MODE, 3>(it, i, off);                          \
            T av = X::ld(A[off[1]]), bv = X::ld(B[off[2]]); y[off[0]] = X::st(expr); } }
template <typename T, typename X, int MODE>
__global__ void binary_kernel(typename X::S *y, const typename X::S *A, const typename X::S *B, nemo_cuda_iter<3> it,
                              int64_t n, int op, double alpha, int vec) {
    switch (op) {
    case NEMO_BOP_ADD: { const T al = (T)alpha; if (alpha == 1.0) LOOP(add(av, bv)) else LOOP(add(av, mul(al, bv))) break; }
    case NEMO_BOP_SUB: { const T al = (T)alpha; if (alpha == 1.0) LOOP(sub(av, bv)) else LOOP(sub(av, mul(al, bv))) break; }
    case NEMO_BOP_MUL: LOOP(mul(av, bv)); break;
    case NEMO_BOP_DIV: LOOP(av / bv); break;
    case NEMO_BOP_POW: LOOP(m_pow(av, bv)); break;
    case NEMO_BOP_MAX: LOOP((av != av || bv != bv) ? add(av, bv) : (av > bv ? av : bv)); break;
    case NEMO_BOP_MIN: LOOP((av != av || bv != bv) ? add(av, bv) : (av < bv ? av : bv)); break;
    case NEMO_BOP_EQ: LOOP((T)(av == bv)); break;
    case NEMO_BOP_NE: LOOP((T)(av != bv)); break;
    case NEMO_BOP_LT: LOOP((T)(av < bv)); break;
    case NEMO_BOP_LE: LOOP((T)(av <= bv)); break;
    case NEMO_BOP_GT: LOOP((T)(av > bv)); break;
    case NEMO_BOP_GE: LOOP((T)(av >= bv)); break;
    case NEMO_BOP_AND: LOOP((T)(av != 0 && bv != 0)); break;
    case NEMO_BOP_OR: LOOP((T)(av != 0 || bv != 0)); break;
    default: break;   /* rejected on the host */
    }
}
#undef LOOP

template <typename T, int MODE>
__global__ void where_kernel(T *y, const T *C, const T *A, const T *B, nemo_cuda_iter<4> it, int64_t n) {
    NEMO_CUDA_LOOP(i, n) {
        int64_t off[4];
        nemo_cuda_offsets<MODE, 4>(it, i, off);
        y[off[0]] = C[off[1]] != 0 ? A[off[2]] : B[off[3]];
    }
}

/* ==== kernel launchers ==== */

/* Checks shared by the launchers: every tensor on y's device, in y's dtype. */
static int check_operands(const char *op, const nemo_tensor *y, const nemo_tensor *const *ins, int nin, int lowp) {
    NEMO_CUDA_RC(lowp ? nemo_cuda_check_io(op, y) : nemo_cuda_check_compute(op, y));
    if (y->ndim < 0 || y->ndim > NEMO_MAXDIM)
        return nemo_cuda_error(NEMO_EINVAL, "%s: %d dims, expected 0 to %d", op, y->ndim, NEMO_MAXDIM);
    for (int k = 0; k < nin; k++) {
        const nemo_tensor *t = ins[k];
        if (t->devtype != NEMO_CUDA || t->devindex != y->devindex)
            return nemo_cuda_error(NEMO_EDEVICE, "%s: input %d is on %s:%d, the output on cuda:%d", op, k,
                                   t->devtype == NEMO_CUDA ? "cuda" : "cpu", t->devindex, y->devindex);
        if (t->dtype != y->dtype)
            return nemo_cuda_error(NEMO_EDTYPE, "%s: input %d is %s, the output %s (the front-end converts)", op, k,
                                   nemo_cuda_dtype_name(t->dtype), nemo_cuda_dtype_name(y->dtype));
    }
    return 0;
}

struct UnaryL {
    template <typename T, typename X>
    static void go(nemo_tensor *y, const nemo_tensor *x, int64_t n, int op, double a, double b) {
        const int vec = nemo_cuda_vec_ok(nemo_cuda_data(y), nemo_cuda_data(x));
        unary_kernel<T, X><<<nemo_cuda_vec_blocks(n, vec, 16 / (int)sizeof(typename X::S)), NEMO_CUDA_THREADS, 0,
                             nemo_cuda_stream(y->devindex)>>>(
            (typename X::S *)nemo_cuda_data(y), (const typename X::S *)nemo_cuda_data(x), n, op, a, b, vec);
    }
};
struct UnaryBwdL {
    template <typename T, typename X>
    static void go(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int64_t n, int op, double a, double b) {
        const int vec = nemo_cuda_vec_ok(nemo_cuda_data(dx), nemo_cuda_data(g), nemo_cuda_data(x));
        unary_backward_kernel<T, X><<<nemo_cuda_vec_blocks(n, vec, 16 / (int)sizeof(typename X::S)), NEMO_CUDA_THREADS,
                                      0, nemo_cuda_stream(dx->devindex)>>>(
            (typename X::S *)nemo_cuda_data(dx), (const typename X::S *)nemo_cuda_data(g),
            (const typename X::S *)nemo_cuda_data(x), n, op, a, b, vec);
    }
};

static int unary_cuda(nemo_tensor *y, const nemo_tensor *x, int op, double a, double b) {
    NEMO_CUDA_ENTER("unary", y);
    const nemo_tensor *ins[1] = {x};
    NEMO_CUDA_RC(check_operands("unary", y, ins, 1, 1));
    if (op < 0 || op >= NEMO_NUOP) return nemo_cuda_error(NEMO_EINVAL, "unary: unknown op %d", op);
    int64_t n = nemo_cuda_numel(x);
    if (n <= 0) return 0;
    by_io<UnaryL>(y->dtype, y, x, n, op, a, b);
    NEMO_CUDA_LAUNCHED("unary op %d: kernel launch on cuda:%d (%lld elements)", op, y->devindex, (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL_LP("unary", unary_cuda)

static int unary_backward_cuda(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int op, double a,
                               double b) {
    NEMO_CUDA_ENTER("unary backward", dx);
    const nemo_tensor *ins[2] = {g, x};
    NEMO_CUDA_RC(check_operands("unary backward", dx, ins, 2, 1));
    if (op < 0 || op >= NEMO_NUOP || op == NEMO_UOP_LOGICAL_NOT)
        return nemo_cuda_error(NEMO_EINVAL, "unary backward: op %d has no gradient", op);
    int64_t n = nemo_cuda_numel(x);
    if (n <= 0) return 0;
    by_io<UnaryBwdL>(dx->dtype, dx, g, x, n, op, a, b);
    NEMO_CUDA_LAUNCHED("unary backward op %d: kernel launch on cuda:%d (%lld elements)", op, dx->devindex,
                       (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL_LP("unary_backward", unary_backward_cuda)

struct BinaryL {
    template <typename T, typename X>
    static void go(nemo_tensor *y, const nemo_tensor *a, const nemo_tensor *b, const nemo_cuda_iter<3> *it, int64_t n,
                   int mode, int op, double alpha) {
        cudaStream_t st = nemo_cuda_stream(y->devindex);
        typedef typename X::S S;
        S *yp = (S *)nemo_cuda_data(y);
        const S *ap = (const S *)nemo_cuda_data(a), *bp = (const S *)nemo_cuda_data(b);
        const int vec = mode == NEMO_CUDA_FLAT && nemo_cuda_vec_ok(yp, ap, bp);
        const unsigned nb = nemo_cuda_vec_blocks(n, vec, 16 / (int)sizeof(S));
        if (mode == NEMO_CUDA_FLAT)
            binary_kernel<T, X, NEMO_CUDA_FLAT><<<nb, NEMO_CUDA_THREADS, 0, st>>>(yp, ap, bp, *it, n, op, alpha, vec);
        else if (mode == NEMO_CUDA_STR32)
            binary_kernel<T, X, NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>(yp, ap, bp, *it, n, op, alpha, 0);
        else
            binary_kernel<T, X, NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>(yp, ap, bp, *it, n, op, alpha, 0);
    }
};

static int binary_cuda(nemo_tensor *y, const nemo_tensor *a, const nemo_tensor *b, const int64_t *astride,
                       const int64_t *bstride, int op, double alpha) {
    NEMO_CUDA_ENTER("binary", y);
    const nemo_tensor *ins[2] = {a, b};
    NEMO_CUDA_RC(check_operands("binary", y, ins, 2, 1));
    if (op < 0 || op >= NEMO_NBOP) return nemo_cuda_error(NEMO_EINVAL, "binary: unknown op %d", op);
    const int64_t *strides[3] = {y->stride, astride, bstride};
    nemo_cuda_iter<3> it;
    int flat = 0;
    int64_t n = nemo_cuda_iter_make<3>(&it, y->ndim, y->shape, strides, &flat);
    if (n <= 0) return 0;
    int mode = nemo_cuda_mode(flat, n);
    by_io<BinaryL>(y->dtype, y, a, b, (const nemo_cuda_iter<3> *)&it, n, mode, op, alpha);
    NEMO_CUDA_LAUNCHED("binary op %d: kernel launch on cuda:%d (%lld elements)", op, y->devindex, (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL_LP("binary", binary_cuda)

template <typename T>
static void launch_where(nemo_tensor *y, const nemo_tensor *c, const nemo_tensor *a, const nemo_tensor *b,
                         const nemo_cuda_iter<4> &it, int64_t n, int mode) {
    unsigned nb = nemo_cuda_blocks(n);
    cudaStream_t st = nemo_cuda_stream(y->devindex);
    T *yp = (T *)nemo_cuda_data(y);
    const T *cp = (const T *)nemo_cuda_data(c), *ap = (const T *)nemo_cuda_data(a), *bp = (const T *)nemo_cuda_data(b);
    if (mode == NEMO_CUDA_FLAT)
        where_kernel<T, NEMO_CUDA_FLAT><<<nb, NEMO_CUDA_THREADS, 0, st>>>(yp, cp, ap, bp, it, n);
    else if (mode == NEMO_CUDA_STR32)
        where_kernel<T, NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>(yp, cp, ap, bp, it, n);
    else
        where_kernel<T, NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>(yp, cp, ap, bp, it, n);
}

static int where_cuda(nemo_tensor *y, const nemo_tensor *c, const nemo_tensor *a, const nemo_tensor *b,
                      const int64_t *const *strides) {
    NEMO_CUDA_ENTER("where", y);
    const nemo_tensor *ins[3] = {c, a, b};
    NEMO_CUDA_RC(check_operands("where", y, ins, 3, 0));
    nemo_cuda_iter<4> it;
    int flat = 0;
    int64_t n = nemo_cuda_iter_make<4>(&it, y->ndim, y->shape, strides, &flat);
    if (n <= 0) return 0;
    int mode = nemo_cuda_mode(flat, n);
    if (y->dtype == NEMO_F32) launch_where<float>(y, c, a, b, it, n, mode);
    else launch_where<double>(y, c, a, b, it, n, mode);
    NEMO_CUDA_LAUNCHED("where: kernel launch on cuda:%d (%lld elements)", y->devindex, (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL("where", where_cuda)
