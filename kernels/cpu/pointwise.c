/*
 * kernels/cpu/pointwise.c: unary, binary and where kernels on dense float32 / float64 arrays.
 *
 * The front-end (engine/ops/pointwise.c) hands these kernels contiguous inputs in the compute
 * dtype (float32 for f32/bf16/f16, float64 otherwise) and a contiguous output of the same
 * dtype; binary kernels also get broadcast strides for a and b. float32 uses the float libm
 * functions (expf, tanhf, ...) as PyTorch's CPU kernels do.
 */
#include "../../engine/internal.h"

#define SQRT_2_PI 0.7978845608028654   /* sqrt(2/pi) */
#define INV_SQRT_2 0.7071067811865476
#define INV_SQRT_2PI 0.3989422804014327

/* One body per type: T is float or double, F(name) picks expf or exp. */
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
        _Pragma("omp parallel for if (n > NEMO_PAR_MIN)")                                    \
        for (int64_t i = 0; i < n; i++) { T v = x[i]; y[i] = (expr); }                      \
    } while (0)

#define FF(name) name##f
#define FD(name) name

static int unary_f32(float *y, const float *x, int64_t n, int op, double a, double b) {
    typedef float T;
    UNARY_BODY(T, FF)
    return 0;
}
static int unary_f64(double *y, const double *x, int64_t n, int op, double a, double b) {
    typedef double T;
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

/* dx = g * dy/dx. x is the input, y the forward output (given for exp, sigmoid, tanh...). */
#define BWD_BODY(T, F)                                                                       \
    switch (op) {                                                                            \
    case NEMO_UOP_NEG: LOOP(-gv); break;                                                     \
    case NEMO_UOP_ABS: LOOP(gv * (T)((xv > 0) - (xv < 0))); break;                           \
    case NEMO_UOP_EXP: LOOP(gv * F(exp)(xv)); break;                                         \
    case NEMO_UOP_LOG: LOOP(gv / xv); break;                                                 \
    case NEMO_UOP_SQRT: LOOP(gv / ((T)2 * F(sqrt)(xv))); break;                              \
    case NEMO_UOP_RSQRT: { LOOP(gv * (T)-0.5 / (xv * F(sqrt)(xv))); break; }                 \
    case NEMO_UOP_SIN: LOOP(gv * F(cos)(xv)); break;                                         \
    case NEMO_UOP_COS: LOOP(-gv * F(sin)(xv)); break;                                        \
    case NEMO_UOP_TANH: { LOOP(gv * ((T)1 - F(tanh)(xv) * F(tanh)(xv))); break; }            \
    case NEMO_UOP_SIGMOID: { LOOP(gv * ((T)1 / ((T)1 + F(exp)(-xv))) * ((T)1 - (T)1 / ((T)1 + F(exp)(-xv)))); break; } \
    case NEMO_UOP_SILU: {                                                                    \
        LOOP(gv * ((T)1 / ((T)1 + F(exp)(-xv))) * ((T)1 + xv * ((T)1 - (T)1 / ((T)1 + F(exp)(-xv))))); break; } \
    case NEMO_UOP_GELU:                                                                      \
        LOOP(gv * ((T)0.5 * ((T)1 + F(erf)(xv * (T)INV_SQRT_2)) + xv * (T)INV_SQRT_2PI * F(exp)((T)-0.5 * xv * xv))); break; \
    case NEMO_UOP_GELU_TANH: {                                                               \
        const T k = (T)SQRT_2_PI, c = (T)0.044715;                                           \
        LOOP(gv * ((T)0.5 * ((T)1 + F(tanh)(k * (xv + c * xv * xv * xv)))                    \
             + (T)0.5 * xv * ((T)1 - F(tanh)(k * (xv + c * xv * xv * xv)) * F(tanh)(k * (xv + c * xv * xv * xv))) \
               * k * ((T)1 + (T)3 * c * xv * xv))); break; }                                 \
    case NEMO_UOP_RELU: LOOP(xv > 0 ? gv : (T)0); break;                                     \
    case NEMO_UOP_SIGN: LOOP((T)0); break;                                                   \
    case NEMO_UOP_RECIPROCAL: LOOP(-gv / (xv * xv)); break;                                  \
    case NEMO_UOP_SQUARE: LOOP((T)2 * gv * xv); break;                                       \
    case NEMO_UOP_POW_SCALAR:                                                                \
        if (a == 0.0) LOOP((T)0);                                                            \
        else if (a == 2.0) LOOP((T)2 * gv * xv);                                             \
        else LOOP(gv * (T)a * F(pow)(xv, (T)(a - 1.0)));                                     \
        break;                                                                               \
    case NEMO_UOP_RPOW_SCALAR: LOOP(gv * F(pow)((T)a, xv) * F(log)((T)a)); break;            \
    case NEMO_UOP_CLAMP: {                                                                   \
        int hl = a == a, hh = b == b;                                                        \
        LOOP(((hl && xv < (T)a) || (hh && xv > (T)b)) ? (T)0 : gv); break; }                 \
    case NEMO_UOP_AFFINE: { T sa = (T)a; LOOP(sa * gv); break; }                            \
    default: return NEMO_ERR(NEMO_EINVAL, "unary backward: op %d has no gradient", op);      \
    }

#define LOOP(expr) do {                                                                      \
        _Pragma("omp parallel for if (n > NEMO_PAR_MIN)")                                    \
        for (int64_t i = 0; i < n; i++) { T gv = g[i], xv = x[i]; (void)gv; (void)xv; dx[i] = (expr); }         \
    } while (0)

static int ubwd_f32(float *dx, const float *g, const float *x, int64_t n, int op, double a, double b) {
    typedef float T;
    BWD_BODY(T, FF)
    return 0;
}
static int ubwd_f64(double *dx, const double *g, const double *x, int64_t n, int op, double a, double b) {
    typedef double T;
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

/* Rows of the broadcast iteration run in parallel; the inner loop has constant strides. */
#define LOOP(expr) do {                                                                      \
        _Pragma("omp parallel for if (it.nrows * it.inner > NEMO_PAR_MIN)")                  \
        for (int64_t r = 0; r < it.nrows; r++) {                                             \
            int64_t off[3]; nemo_iter_row(&it, r, off);                                      \
            T *o = y + off[0]; const T *pa = A + off[1], *pb = B + off[2];                   \
            if (sa == 1 && sb == 1) { for (int64_t i = 0; i < it.inner; i++) { T av = pa[i], bv = pb[i]; o[i] = (expr); } } \
            else if (sa == 1 && sb == 0) { T bv = pb[0]; for (int64_t i = 0; i < it.inner; i++) { T av = pa[i]; o[i] = (expr); } } \
            else if (sa == 0 && sb == 1) { T av = pa[0]; for (int64_t i = 0; i < it.inner; i++) { T bv = pb[i]; o[i] = (expr); } } \
            else { for (int64_t i = 0; i < it.inner; i++) { T av = pa[i * sa], bv = pb[i * sb]; o[i * so] = (expr); } } \
        }                                                                                    \
    } while (0)

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
    _Pragma("omp parallel for if (it.nrows * it.inner > NEMO_PAR_MIN)")                      \
    for (int64_t r = 0; r < it.nrows; r++) {                                                 \
        int64_t off[4]; nemo_iter_row(&it, r, off);                                          \
        for (int64_t i = 0; i < it.inner; i++)                                               \
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
