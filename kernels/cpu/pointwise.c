/*
 * kernels/cpu/pointwise.c: unary, binary and where kernels on dense float32 / float64 arrays,
 * and the vectorisable float32 math (exp, tanh, sigmoid, erf) they and the fused kernels use.
 *
 * The front-end (engine/ops/pointwise.c) hands these kernels contiguous inputs in the compute
 * dtype (float32 for f32/bf16/f16, float64 otherwise) and a contiguous output of the same
 * dtype; binary kernels also get broadcast strides for a and b.
 *
 * Non-obvious rule: float32 exp, tanh, sigmoid, silu and both GELUs do not call libm. glibc's
 * expf / tanhf / erff are scalar calls GCC cannot vectorise (a tanh-GELU over 655K elements took
 * 15 ms); fm_expf, fm_tanhf and fm_erff below are branch-free range reduction + polynomial
 * written so that GCC vectorises the loops that inline them (-O3 -march=native), with explicit
 * fmaf() (the build uses -ffp-contract=off, and fmaf rounds once on every machine, so results
 * do not depend on -march). Accuracy against double-precision libm over a dense sweep of all
 * floats (tests/lua/test_fastmath.lua): exp, tanh <= 1 ulp, erf <= 2 ulp, sigmoid <= 3 ulp.
 * float64 keeps libm. The op formulas (GELU, their derivatives) follow PyTorch's CPU kernels
 * term for term, so only the transcendental calls differ from PyTorch by those ulps.
 * Every kernel is elementwise: each output element is computed by one thread, so results do not
 * depend on the thread count.
 */
#include "../../engine/internal.h"

#define SQRT_2_PI 0.7978845608028654   /* sqrt(2/pi) */
#define INV_SQRT_2 0.7071067811865476
#define INV_SQRT_2PI 0.3989422804014327

/* Elements per task when a long row is cut into pieces for the thread pool. */
#define PW_CHUNK 16384
/* Size above which a memory-bound op (add, mul, affine, ...) runs on the thread pool: waking
 * the pool costs about 10 us on this kind of machine (OMP_WAIT_POLICY=passive), which an add
 * of fewer than ~120K floats does not win back on 2 cores. Ops that evaluate exp / tanh / erf
 * per element go parallel from NEMO_PAR_MIN. */
#define PW_PAR_CHEAP (4 * NEMO_PAR_MIN)

static int64_t unary_par_min(int op) {
    switch (op) {
    case NEMO_UOP_EXP: case NEMO_UOP_LOG: case NEMO_UOP_SIN: case NEMO_UOP_COS: case NEMO_UOP_TANH:
    case NEMO_UOP_SIGMOID: case NEMO_UOP_SILU: case NEMO_UOP_GELU: case NEMO_UOP_GELU_TANH:
    case NEMO_UOP_POW_SCALAR: case NEMO_UOP_RPOW_SCALAR:
        return NEMO_PAR_MIN;
    default: return PW_PAR_CHEAP;
    }
}

/* ==== Vectorisable float32 math ==== */

static inline float fm_bits_f(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
/* 2^k for k in [-126, 127] (out-of-range k, from NaN inputs, give garbage that is never used) */
static inline float fm_pow2i(int32_t k) { return fm_bits_f((int32_t)(((uint32_t)k + 127u) << 23)); }
static inline int32_t fm_f_bits(float f) { int32_t i; memcpy(&i, &f, 4); return i; }

/* exp(x) = 2^k p: x = k ln2 + r with |r| <= ln2/2 (Cody-Waite with a two-part ln2, fmaf) and
 * p = exp(r) = 1 + r + r^2 Q(r), Q of degree 5 (relative error 1.3e-10 on the interval). Valid
 * for |x| < 2^21 (the rounding trick); returns p and sets *k. */
static inline float fm_exp_reduce(float x, int32_t *k) {
    const float magic = 0x1.8p23f;   /* adding it rounds to an integer (|v| < 2^22) */
    float t = x * 0x1.715476p+0f + magic;
    float n = t - magic;
    *k = fm_f_bits(t) - fm_f_bits(magic);
    float r = fmaf(-n, 0x1.62e430p-1f, x);
    r = fmaf(-n, -0x1.05c610p-29f, r);
    float q = fmaf(1.957021886e-04f, r, 1.393541577e-03f);
    q = fmaf(q, r, 8.333895355e-03f);
    q = fmaf(q, r, 4.166645929e-02f);
    q = fmaf(q, r, 1.666666418e-01f);
    q = fmaf(q, r, 0.5f);
    return 1.0f + fmaf(r * r, q, r);
}

/* exp(x) for x in [-87, 88] (normal results): no clamp, no NaN test, one scaling. The same bits
 * as fm_expf there; tanh and erf only need this range. */
static inline float fm_exp_normal(float x) {
    int32_t k;
    float p = fm_exp_reduce(x, &k);
    return p * fm_pow2i(k);
}

/* exp(x) for every float: x is clamped to [-104, 89] (exp rounds to 0 / inf beyond) and 2^k is
 * applied in two halves, so that subnormal results and k = 128 need no branch; NaN passes. */
static inline float fm_expf(float x) {
    float xc = x > 89.0f ? 89.0f : x;
    xc = xc < -104.0f ? -104.0f : xc;
    int32_t k;
    float p = fm_exp_reduce(xc, &k);
    int32_t k1 = k >> 1, k2 = k - k1;
    float y = p * fm_pow2i(k1) * fm_pow2i(k2);
    return x != x ? x : y;
}

/* tanh(x): |x| < 0.9: x + x^3 P(x^2) with P of degree 6 (relative error 1.1e-9); otherwise
 * 1 - 2 / (exp(2|x|) + 1) with x's sign (|x| clamped to 40, where it is 1). NaN passes through. */
static inline float fm_tanhf(float x) {
    float a = fabsf(x);
    float z = x * x;
    float p = fmaf(-4.555951164e-04f, z, 2.583153779e-03f);
    p = fmaf(p, z, -8.265221491e-03f);
    p = fmaf(p, z, 2.166400664e-02f);
    p = fmaf(p, z, -5.392946303e-02f);
    p = fmaf(p, z, 1.333298087e-01f);
    p = fmaf(p, z, -3.333332241e-01f);
    float small = copysignf(fmaf(x * z, p, x), x);    /* copysign keeps tanh(-0) = -0 */
    float e = fm_exp_normal(2.0f * (a < 40.0f ? a : 40.0f));
    float big = copysignf(1.0f - 2.0f / (e + 1.0f), x);
    float y = a < 0.9f ? small : big;
    return x != x ? x : y;
}

/* erf(x): |x| < 1.25: x + x P(x^2), P of degree 7 (relative error 1.1e-9); otherwise
 * 1 - exp(-x^2) u G(u) with u = 1/|x|, |x| clamped to [1.25, 4] (erf rounds to 1 beyond 3.92),
 * G of degree 9 (relative error 5e-10 of erfc); exp(-x^2) is taken of the exact square
 * hi + lo (lo = fmaf(x, x, -hi)) as exp(-hi) (1 - lo). NaN passes through. */
static inline float fm_erff(float x) {
    float a = fabsf(x);
    float z = x * x;
    float p = fmaf(-7.643748177e-06f, z, 1.043441080e-04f);
    p = fmaf(p, z, -8.348767296e-04f);
    p = fmaf(p, z, 5.210062489e-03f);
    p = fmaf(p, z, -2.686086670e-02f);
    p = fmaf(p, z, 1.128369272e-01f);
    p = fmaf(p, z, -3.761263192e-01f);
    p = fmaf(p, z, 1.283791661e-01f);
    float small = fmaf(x, p, x);
    float ac = a < 4.0f ? a : 4.0f;
    ac = ac > 1.25f ? ac : 1.25f;
    float u = 1.0f / ac;
    float g = fmaf(-6.175166741e-02f, u, 3.954167664e-01f);
    g = fmaf(g, u, -1.131508112e+00f);
    g = fmaf(g, u, 1.881700277e+00f);
    g = fmaf(g, u, -1.943783998e+00f);
    g = fmaf(g, u, 1.157867551e+00f);
    g = fmaf(g, u, -1.773195863e-01f);
    g = fmaf(g, u, -2.548941374e-01f);
    g = fmaf(g, u, -2.431152388e-03f);
    g = fmaf(g, u, 5.642862916e-01f);
    float hi = ac * ac, lo = fmaf(ac, ac, -hi);
    float ex = fm_exp_normal(-hi) * (1.0f - lo);
    float big = copysignf(1.0f - ex * (u * g), x);
    float y = a < 1.25f ? small : big;
    return x != x ? x : y;
}

static inline float fm_sigmoidf(float x) { return 1.0f / (1.0f + fm_expf(-x)); }

/* The functions on raw arrays, for nemo_fastmath_f32 (accuracy tests and benchmarks). */
static int fastmath_cpu(int fn, float *y, const float *x, int64_t n) {
    switch (fn) {
    case NEMO_FM_EXP:
        _Pragma("omp parallel for if (n > NEMO_PAR_MIN)")
        for (int64_t i = 0; i < n; i++) y[i] = fm_expf(x[i]);
        break;
    case NEMO_FM_TANH:
        _Pragma("omp parallel for if (n > NEMO_PAR_MIN)")
        for (int64_t i = 0; i < n; i++) y[i] = fm_tanhf(x[i]);
        break;
    case NEMO_FM_SIGMOID:
        _Pragma("omp parallel for if (n > NEMO_PAR_MIN)")
        for (int64_t i = 0; i < n; i++) y[i] = fm_sigmoidf(x[i]);
        break;
    case NEMO_FM_ERF:
        _Pragma("omp parallel for if (n > NEMO_PAR_MIN)")
        for (int64_t i = 0; i < n; i++) y[i] = fm_erff(x[i]);
        break;
    default: return NEMO_ERR(NEMO_EINVAL, "fastmath: unknown function %d", fn);
    }
    return 0;
}
NEMO_REGISTER_KERNEL("fastmath", NEMO_CPU, fastmath_cpu)

/* ==== Unary ==== */

/* F(name) picks the function for the type: FD(exp) is libm's exp, FF(exp) the float32 version
 * (fm_* where one exists, else libm's float function). */
#define FD(name) name
#define FF(name) FF_##name
#define FF_fabs fabsf
#define FF_exp fm_expf
#define FF_log logf
#define FF_sqrt sqrtf
#define FF_sin sinf
#define FF_cos cosf
#define FF_tanh fm_tanhf
#define FF_erf fm_erff
#define FF_pow powf

/* One body per type: T is float or double. Formulas as PyTorch's CPU kernels write them. */
#define UNARY_BODY(T, F)                                                                     \
    switch (op) {                                                                            \
    case NEMO_UOP_NEG: LOOP(-v); break;                                                      \
    case NEMO_UOP_ABS: LOOP(F(fabs)(v)); break;                                              \
    case NEMO_UOP_EXP: LOOP(F(exp)(v)); break;                                               \
    case NEMO_UOP_LOG: LOOP(F(log)(v)); break;                                               \
    case NEMO_UOP_SQRT: LOOP(F(sqrt)(v)); break;                                             \
    case NEMO_UOP_RSQRT: LOOP((T)1 / F(sqrt)(v)); break;                                     \
    case NEMO_UOP_SIN: LOOP(F(sin)(v)); break;                                               \
    case NEMO_UOP_COS: LOOP(F(cos)(v)); break;                                               \
    case NEMO_UOP_TANH: LOOP(F(tanh)(v)); break;                                             \
    case NEMO_UOP_SIGMOID: LOOP((T)1 / ((T)1 + F(exp)(-v))); break;                          \
    case NEMO_UOP_SILU: LOOP(v / ((T)1 + F(exp)(-v))); break;                                \
    case NEMO_UOP_GELU: LOOP((T)0.5 * v * ((T)1 + F(erf)(v * (T)INV_SQRT_2))); break;        \
    case NEMO_UOP_GELU_TANH:                                                                 \
        LOOP((T)0.5 * v * ((T)1 + F(tanh)((T)SQRT_2_PI * (v + (T)0.044715 * v * v * v)))); break; \
    case NEMO_UOP_RELU: LOOP(v > 0 ? v : (v != v ? v : (T)0)); break;                        \
    case NEMO_UOP_SIGN: LOOP((T)((v > 0) - (v < 0))); break;                                 \
    case NEMO_UOP_RECIPROCAL: LOOP((T)1 / v); break;                                         \
    case NEMO_UOP_SQUARE: LOOP(v * v); break;                                                \
    case NEMO_UOP_POW_SCALAR:                                                                \
        if (a == 2.0) LOOP(v * v);                                                           \
        else if (a == 0.5) LOOP(F(sqrt)(v));                                                 \
        else if (a == 1.0) LOOP(v);                                                          \
        else LOOP(F(pow)(v, (T)a));                                                          \
        break;                                                                               \
    case NEMO_UOP_RPOW_SCALAR: LOOP(F(pow)((T)a, v)); break;                                 \
    case NEMO_UOP_CLAMP: {                                                                   \
        T lo = (T)a, hi = (T)b; int hl = a == a, hh = b == b;                                \
        LOOP(v != v ? v : (hl && v < lo) ? lo : (hh && v > hi) ? hi : v); break; }           \
    case NEMO_UOP_AFFINE: { T sa = (T)a, sb = (T)b; LOOP(sa * v + sb); break; }              \
    case NEMO_UOP_LOGICAL_NOT: LOOP((T)(v == 0)); break;                                     \
    default: return NEMO_ERR(NEMO_EINVAL, "unary: unknown op %d", op);                       \
    }

#define LOOP(expr) do {                                                                      \
        _Pragma("omp parallel for if (n > par)")                                             \
        for (int64_t i = 0; i < n; i++) { T v = x[i]; y[i] = (expr); }                      \
    } while (0)

static int unary_f32(float *y, const float *x, int64_t n, int op, double a, double b) {
    typedef float T;
    const int64_t par = unary_par_min(op);
    UNARY_BODY(T, FF)
    return 0;
}
static int unary_f64(double *y, const double *x, int64_t n, int op, double a, double b) {
    typedef double T;
    const int64_t par = unary_par_min(op);
    UNARY_BODY(T, FD)
    return 0;
}
#undef LOOP

static int unary_cpu(nemo_tensor *y, const nemo_tensor *x, int op, double a, double b) {
    int64_t n = nemo_tensor_numel(x);
    if (x->dtype == NEMO_F32) return unary_f32(nemo_tensor_data(y), nemo_tensor_data(x), n, op, a, b);
    return unary_f64(nemo_tensor_data(y), nemo_tensor_data(x), n, op, a, b);
}
NEMO_REGISTER_KERNEL("unary", NEMO_CPU, unary_cpu)

/* dx = g * dy/dx from the input x. Each transcendental is evaluated once per element (BLOCK
 * holds the shared terms); the formulas are PyTorch's backward kernels (tanh: g (1 - t^2);
 * sigmoid: g (1 - s) s; silu: g s (1 + x (1 - s)); gelu: g (cdf + x pdf); gelu tanh:
 * g (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2))). */
#define BWD_BODY(T, F)                                                                       \
    switch (op) {                                                                            \
    case NEMO_UOP_NEG: LOOP(, -gv); break;                                                   \
    case NEMO_UOP_ABS: LOOP(, gv * (T)((xv > 0) - (xv < 0))); break;                         \
    case NEMO_UOP_EXP: LOOP(, gv * F(exp)(xv)); break;                                       \
    case NEMO_UOP_LOG: LOOP(, gv / xv); break;                                               \
    case NEMO_UOP_SQRT: LOOP(, gv / ((T)2 * F(sqrt)(xv))); break;                            \
    case NEMO_UOP_RSQRT: LOOP(, gv * (T)-0.5 / (xv * F(sqrt)(xv))); break;                   \
    case NEMO_UOP_SIN: LOOP(, gv * F(cos)(xv)); break;                                       \
    case NEMO_UOP_COS: LOOP(, -gv * F(sin)(xv)); break;                                      \
    case NEMO_UOP_TANH: LOOP(T t = F(tanh)(xv), gv * ((T)1 - t * t)); break;                 \
    case NEMO_UOP_SIGMOID: LOOP(T s = (T)1 / ((T)1 + F(exp)(-xv)), gv * ((T)1 - s) * s); break; \
    case NEMO_UOP_SILU:                                                                      \
        LOOP(T s = (T)1 / ((T)1 + F(exp)(-xv)), gv * s * ((T)1 + xv * ((T)1 - s))); break;  \
    case NEMO_UOP_GELU:                                                                      \
        LOOP(T cdf = (T)0.5 * ((T)1 + F(erf)(xv * (T)INV_SQRT_2));                           \
             T pdf = (T)INV_SQRT_2PI * F(exp)(xv * xv * (T)-0.5),                            \
             gv * (cdf + xv * pdf)); break;                                                  \
    case NEMO_UOP_GELU_TANH: {                                                               \
        const T k = (T)SQRT_2_PI, c = (T)0.044715, c3 = (T)3 * c;                            \
        LOOP(T x2 = xv * xv; T t = F(tanh)(k * (xv + c * (x2 * xv))),                        \
             gv * ((T)0.5 * ((T)1 + t) + (T)0.5 * xv * ((T)1 - t * t) * (k * ((T)1 + c3 * x2)))); \
        break; }                                                                             \
    case NEMO_UOP_RELU: LOOP(, xv > 0 ? gv : (T)0); break;                                   \
    case NEMO_UOP_SIGN: LOOP(, (T)0); break;                                                 \
    case NEMO_UOP_RECIPROCAL: LOOP(, -gv / (xv * xv)); break;                                \
    case NEMO_UOP_SQUARE: LOOP(, (T)2 * gv * xv); break;                                     \
    case NEMO_UOP_POW_SCALAR:                                                                \
        if (a == 0.0) LOOP(, (T)0);                                                          \
        else if (a == 2.0) LOOP(, (T)2 * gv * xv);                                           \
        else LOOP(, gv * (T)a * F(pow)(xv, (T)(a - 1.0)));                                   \
        break;                                                                               \
    case NEMO_UOP_RPOW_SCALAR: LOOP(, gv * F(pow)((T)a, xv) * F(log)((T)a)); break;          \
    case NEMO_UOP_CLAMP: {                                                                   \
        int hl = a == a, hh = b == b;                                                        \
        LOOP(, ((hl && xv < (T)a) || (hh && xv > (T)b)) ? (T)0 : gv); break; }               \
    case NEMO_UOP_AFFINE: { T sa = (T)a; LOOP(, sa * gv); break; }                           \
    default: return NEMO_ERR(NEMO_EINVAL, "unary backward: op %d has no gradient", op);      \
    }

#define LOOP(BLOCK, expr) do {                                                               \
        _Pragma("omp parallel for if (n > par)")                                             \
        for (int64_t i = 0; i < n; i++) {                                                    \
            T gv = g[i], xv = x[i]; (void)gv; (void)xv;                                      \
            BLOCK;                                                                           \
            dx[i] = (expr);                                                                  \
        }                                                                                    \
    } while (0)

static int ubwd_f32(float *dx, const float *g, const float *x, int64_t n, int op, double a, double b) {
    typedef float T;
    const int64_t par = unary_par_min(op);
    BWD_BODY(T, FF)
    return 0;
}
static int ubwd_f64(double *dx, const double *g, const double *x, int64_t n, int op, double a, double b) {
    typedef double T;
    const int64_t par = unary_par_min(op);
    BWD_BODY(T, FD)
    return 0;
}
#undef LOOP

static int unary_backward_cpu(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int op, double a, double b) {
    int64_t n = nemo_tensor_numel(x);
    if (x->dtype == NEMO_F32)
        return ubwd_f32(nemo_tensor_data(dx), nemo_tensor_data(g), nemo_tensor_data(x), n, op, a, b);
    return ubwd_f64(nemo_tensor_data(dx), nemo_tensor_data(g), nemo_tensor_data(x), n, op, a, b);
}
NEMO_REGISTER_KERNEL("unary_backward", NEMO_CPU, unary_backward_cpu)

/* ==== Binary ==== */

#define BINARY_BODY(T, F)                                                                    \
    switch (op) {                                                                            \
    case NEMO_BOP_ADD: { T al = (T)alpha; if (alpha == 1.0) LOOP(av + bv); else LOOP(av + al * bv); break; } \
    case NEMO_BOP_SUB: { T al = (T)alpha; if (alpha == 1.0) LOOP(av - bv); else LOOP(av - al * bv); break; } \
    case NEMO_BOP_MUL: LOOP(av * bv); break;                                                 \
    case NEMO_BOP_DIV: LOOP(av / bv); break;                                                 \
    case NEMO_BOP_POW: LOOP(F(pow)(av, bv)); break;                                          \
    case NEMO_BOP_MAX: LOOP((av != av || bv != bv) ? av + bv : (av > bv ? av : bv)); break;  \
    case NEMO_BOP_MIN: LOOP((av != av || bv != bv) ? av + bv : (av < bv ? av : bv)); break;  \
    case NEMO_BOP_EQ: LOOP((T)(av == bv)); break;                                            \
    case NEMO_BOP_NE: LOOP((T)(av != bv)); break;                                            \
    case NEMO_BOP_LT: LOOP((T)(av < bv)); break;                                             \
    case NEMO_BOP_LE: LOOP((T)(av <= bv)); break;                                            \
    case NEMO_BOP_GT: LOOP((T)(av > bv)); break;                                             \
    case NEMO_BOP_GE: LOOP((T)(av >= bv)); break;                                            \
    case NEMO_BOP_AND: LOOP((T)(av != 0 && bv != 0)); break;                                 \
    case NEMO_BOP_OR: LOOP((T)(av != 0 || bv != 0)); break;                                  \
    default: return NEMO_ERR(NEMO_EINVAL, "binary: unknown op %d", op);                      \
    }

/* Tasks are (row, piece of the row): a fully contiguous operation coalesces into one long row,
 * which is cut into pieces of about PW_CHUNK elements so that it still runs on every thread. */
#define LOOP(expr) do {                                                                      \
        _Pragma("omp parallel for if (it.nrows * it.inner > par)")                           \
        for (int64_t task = 0; task < it.nrows * npc; task++) {                              \
            int64_t r = task / npc, i0 = (task % npc) * pc, i1 = i0 + pc;                    \
            if (i1 > it.inner) i1 = it.inner;                                                \
            int64_t off[3]; nemo_iter_row(&it, r, off);                                      \
            T *o = y + off[0]; const T *pa = A + off[1], *pb = B + off[2];                   \
            if (sa == 1 && sb == 1) { for (int64_t i = i0; i < i1; i++) { T av = pa[i], bv = pb[i]; o[i] = (expr); } } \
            else if (sa == 1 && sb == 0) { T bv = pb[0]; for (int64_t i = i0; i < i1; i++) { T av = pa[i]; o[i] = (expr); } } \
            else if (sa == 0 && sb == 1) { T av = pa[0]; for (int64_t i = i0; i < i1; i++) { T bv = pb[i]; o[i] = (expr); } } \
            else { for (int64_t i = i0; i < i1; i++) { T av = pa[i * sa], bv = pb[i * sb]; o[i * so] = (expr); } } \
        }                                                                                    \
    } while (0)

/* Pieces per row: 1 unless there are too few rows to share out. */
static int64_t row_pieces(int64_t nrows, int64_t inner) {
    if (nrows >= 64 || nrows * inner <= NEMO_PAR_MIN) return 1;
    int64_t p = (inner + PW_CHUNK - 1) / PW_CHUNK;
    return p < 1 ? 1 : p;
}

/* y is contiguous with the broadcast shape; a and b are read through broadcast strides. */
#define BINARY_FN(name, TT, F)                                                                \
static int name(TT *y, const TT *A, const TT *B, int ndim, const int64_t *shape,             \
                const int64_t *ystride, const int64_t *astride, const int64_t *bstride,       \
                int op, double alpha) {                                                      \
    typedef TT T;                                                                            \
    const int64_t *strides[3] = {ystride, astride, bstride};                                 \
    nemo_iter it; nemo_iter_init(&it, ndim, shape, 3, strides);                              \
    int64_t so = nemo_iter_inner_stride(&it, 0), sa = nemo_iter_inner_stride(&it, 1),       \
            sb = nemo_iter_inner_stride(&it, 2);                                             \
    int64_t npc = row_pieces(it.nrows, it.inner);                                            \
    int64_t pc = npc > 1 ? (it.inner + npc - 1) / npc : it.inner;                            \
    const int64_t par = op == NEMO_BOP_POW ? NEMO_PAR_MIN : PW_PAR_CHEAP;                    \
    BINARY_BODY(T, F)                                                                        \
    return 0;                                                                                \
}
BINARY_FN(binary_f32, float, FF)
BINARY_FN(binary_f64, double, FD)
#undef LOOP

/* y (contiguous, compute dtype) = a op b; astride/bstride broadcast a and b to y's shape. */
static int binary_cpu(nemo_tensor *y, const nemo_tensor *a, const nemo_tensor *b,
                      const int64_t *astride, const int64_t *bstride, int op, double alpha) {
    if (y->dtype == NEMO_F32)
        return binary_f32(nemo_tensor_data(y), nemo_tensor_data(a), nemo_tensor_data(b), y->ndim, y->shape,
                          y->stride, astride, bstride, op, alpha);
    return binary_f64(nemo_tensor_data(y), nemo_tensor_data(a), nemo_tensor_data(b), y->ndim, y->shape,
                      y->stride, astride, bstride, op, alpha);
}
NEMO_REGISTER_KERNEL("binary", NEMO_CPU, binary_cpu)

/* y = c ? a : b with broadcast strides for all three inputs (c is compute dtype, nonzero = true). */
#define WHERE_FN(name, T)                                                                    \
static void name(T *y, const T *C, const T *A, const T *B, int ndim, const int64_t *shape,    \
                 const int64_t *const *st) {                                                 \
    const int64_t *strides[4] = {st[0], st[1], st[2], st[3]};                                \
    nemo_iter it; nemo_iter_init(&it, ndim, shape, 4, strides);                              \
    int64_t s0 = nemo_iter_inner_stride(&it, 0), s1 = nemo_iter_inner_stride(&it, 1),       \
            s2 = nemo_iter_inner_stride(&it, 2), s3 = nemo_iter_inner_stride(&it, 3);       \
    int64_t npc = row_pieces(it.nrows, it.inner);                                            \
    int64_t pc = npc > 1 ? (it.inner + npc - 1) / npc : it.inner;                            \
    _Pragma("omp parallel for if (it.nrows * it.inner > PW_PAR_CHEAP)")                      \
    for (int64_t task = 0; task < it.nrows * npc; task++) {                                  \
        int64_t r = task / npc, i0 = (task % npc) * pc, i1 = i0 + pc;                        \
        if (i1 > it.inner) i1 = it.inner;                                                    \
        int64_t off[4]; nemo_iter_row(&it, r, off);                                          \
        for (int64_t i = i0; i < i1; i++)                                                    \
            y[off[0] + i * s0] = C[off[1] + i * s1] != 0 ? A[off[2] + i * s2] : B[off[3] + i * s3]; \
    }                                                                                        \
}
WHERE_FN(where_f32, float)
WHERE_FN(where_f64, double)

static int where_cpu(nemo_tensor *y, const nemo_tensor *c, const nemo_tensor *a, const nemo_tensor *b,
                     const int64_t *const *strides) {
    if (y->dtype == NEMO_F32)
        where_f32(nemo_tensor_data(y), nemo_tensor_data(c), nemo_tensor_data(a), nemo_tensor_data(b),
                  y->ndim, y->shape, strides);
    else
        where_f64(nemo_tensor_data(y), nemo_tensor_data(c), nemo_tensor_data(a), nemo_tensor_data(b),
                  y->ndim, y->shape, strides);
    return 0;
}
NEMO_REGISTER_KERNEL("where", NEMO_CPU, where_cpu)
