/*
 * kernels/cpu/nnops.c: fused forward and backward kernels of layer_norm, rms_norm and
 * group_norm on dense row-major arrays.
 *
 * Kernels (registered by name; the front-end is engine/ops/nnops.c):
 *   "norm_rows"          (y, mean, rstd, x, w, b, rows, n, eps, center)
 *   "norm_rows_backward" (dx, dw, db, g, x, mean, rstd, w, rows, n)
 *       layer_norm (center = 1) and rms_norm (center = 0, mean NULL) over rows of n elements.
 *       x, g (rows, n) and y, dx (rows, n) are dense; with float32 statistics each of them may
 *       be float32, bfloat16 or float16 (rows are converted through a per-thread float buffer,
 *       so a bf16 tensor is never copied whole); with float64 statistics all are float64.
 *       mean, rstd (rows), w, b, dw, db (n) are dense in the compute dtype; any may be NULL.
 *   "group_norm"          (y, mean, rstd, x, w, b, N, C, HW, G, eps)
 *   "group_norm_backward" (dx, dw, db, g, x, mean, rstd, w, N, C, HW, G)
 *       x, y, g, dx (N, C, HW), mean/rstd (N, G), w/b/dw/db (C): all dense, compute dtype.
 *
 * Non-obvious rules
 * - Sums over a row run on 64-byte vectors with several accumulators inside blocks of
 *   NN_BLOCK elements, and add the block totals in double: the order is fixed by n alone.
 * - Parameter gradients are sums over rows. Rows are cut into chunks whose size depends on
 *   the number of rows only (64, or more when there are over 256 chunks); each chunk sums its
 *   rows in order (in pairs) into a private partial, and partials are added in chunk order in
 *   double. The result is the same for any thread count.
 * - Rows are passed over more than once (statistics, then output), so each pass fetches the
 *   next row ahead with software prefetches: the hardware prefetcher stops at page ends.
 */
#include <stdlib.h>
#include <string.h>
#include "../../engine/internal.h"

#define NN_BLOCK 4096
#define NN_CHUNK 64
#define NN_MAXCHUNKS 256

/* Sums over a row with GCC/Clang vector extensions: target-width vectors (64 bytes with AVX-512: 16 floats or 8 doubles,
 * one AVX-512 register or two AVX2 ones), several independent accumulators, a fixed order.
 * EXPR is a macro taking a loader L: L(p) is element(s) jj of array p, a vector in the main
 * loop and a scalar in the tail, so one expression serves both (vector op scalar broadcasts). */
/* Vector width from the target: a vector wider than the machine's registers changes the
 * calling convention (-Wpsabi) and GCC may scalarise it. */
#if defined(__AVX512F__)
#define NN_VBYTES 64
#elif defined(__AVX__)
#define NN_VBYTES 32
#else
#define NN_VBYTES 16
#endif
typedef float vf32 __attribute__((vector_size(NN_VBYTES)));
typedef double vf64 __attribute__((vector_size(NN_VBYTES)));
#define VW_f32 (NN_VBYTES / 4)
#define VW_f64 (NN_VBYTES / 8)
static inline vf32 vload_f32(const float *p) { vf32 v; memcpy(&v, p, sizeof v); return v; }
static inline vf64 vload_f64(const double *p) { vf64 v; memcpy(&v, p, sizeof v); return v; }
#define VL_f32(p) vload_f32((p) + jj)
#define VL_f64(p) vload_f64((p) + jj)
#define SL(p) ((p)[jj])

/* out = sum over jj in [0, n) of EXPR, accumulated in T within blocks of NN_BLOCK elements,
 * block totals in double. */
#define VSUM(T, SFX, out, n, EXPR) do {                                                      \
        double tot_ = 0;                                                                     \
        for (int64_t b0_ = 0; b0_ < (n); b0_ += NN_BLOCK) {                                  \
            int64_t e_ = b0_ + NN_BLOCK < (n) ? b0_ + NN_BLOCK : (n);                        \
            v##SFX acc_[4] = {{0}};                                                          \
            int64_t j_ = b0_;                                                                \
            for (; j_ + 4 * VW_##SFX <= e_; j_ += 4 * VW_##SFX)                              \
                for (int u_ = 0; u_ < 4; u_++) {                                             \
                    int64_t jj = j_ + u_ * VW_##SFX; acc_[u_] += EXPR(VL_##SFX); }           \
            v##SFX v_ = (acc_[0] + acc_[1]) + (acc_[2] + acc_[3]);                           \
            T s_ = 0;                                                                        \
            for (int k_ = 0; k_ < VW_##SFX; k_++) s_ += v_[k_];                              \
            for (; j_ < e_; j_++) { int64_t jj = j_; s_ += EXPR(SL); }                       \
            tot_ += s_;                                                                      \
        }                                                                                    \
        (out) = tot_;                                                                        \
    } while (0)

/* Two sums in one pass: outA = sum EXPRA, outB = sum EXPRB. */
#define VSUM2(T, SFX, outA, outB, n, EXPRA, EXPRB) do {                                      \
        double ta_ = 0, tb_ = 0;                                                             \
        for (int64_t b0_ = 0; b0_ < (n); b0_ += NN_BLOCK) {                                  \
            int64_t e_ = b0_ + NN_BLOCK < (n) ? b0_ + NN_BLOCK : (n);                        \
            v##SFX aa_[2] = {{0}}, ab_[2] = {{0}};                                           \
            int64_t j_ = b0_;                                                                \
            for (; j_ + 2 * VW_##SFX <= e_; j_ += 2 * VW_##SFX)                              \
                for (int u_ = 0; u_ < 2; u_++) {                                             \
                    int64_t jj = j_ + u_ * VW_##SFX;                                         \
                    aa_[u_] += EXPRA(VL_##SFX); ab_[u_] += EXPRB(VL_##SFX); }                \
            v##SFX va_ = aa_[0] + aa_[1], vb_ = ab_[0] + ab_[1];                             \
            T sa_ = 0, sb_ = 0;                                                              \
            for (int k_ = 0; k_ < VW_##SFX; k_++) { sa_ += va_[k_]; sb_ += vb_[k_]; }        \
            for (; j_ < e_; j_++) { int64_t jj = j_; sa_ += EXPRA(SL); sb_ += EXPRB(SL); }   \
            ta_ += sa_; tb_ += sb_;                                                          \
        }                                                                                    \
        (outA) = ta_; (outB) = tb_;                                                          \
    } while (0)

/* The summed expressions (they name the kernels' local variables). */
#define E_X(L) L(xr)
#define E_SQDEV(L) ((L(xr) - mu) * (L(xr) - mu))
#define E_GW(L) (L(gr) * L(W))
#define E_GWXC(L) (L(gr) * L(W) * (L(xr) - mu))
#define E_GWX(L) (L(gr) * L(W) * L(xr))
#define E_G(L) L(gr)
#define E_GXC(L) (L(gr) * (L(xr) - mu))

/* ==== Row access: float rows may live in f32, bf16 or f16 storage ==== */

static inline const float *in_row_f32(const nemo_tensor *t, int64_t r, int64_t n, float *buf) {
    if (t->dtype == NEMO_F32) return (const float *)nemo_tensor_data(t) + r * n;
    const uint16_t *p = (const uint16_t *)nemo_tensor_data(t) + r * n;
    if (t->dtype == NEMO_BF16) for (int64_t i = 0; i < n; i++) buf[i] = nemo_bf16_to_f32(p[i]);
    else for (int64_t i = 0; i < n; i++) buf[i] = nemo_f16_to_f32(p[i]);
    return buf;
}
static inline float *out_row_f32(nemo_tensor *t, int64_t r, int64_t n, float *buf) {
    return t->dtype == NEMO_F32 ? (float *)nemo_tensor_data(t) + r * n : buf;
}
static inline void out_done_f32(nemo_tensor *t, int64_t r, int64_t n, const float *buf) {
    if (t->dtype == NEMO_F32) return;
    uint16_t *p = (uint16_t *)nemo_tensor_data(t) + r * n;
    if (t->dtype == NEMO_BF16) for (int64_t i = 0; i < n; i++) p[i] = nemo_f32_to_bf16(buf[i]);
    else for (int64_t i = 0; i < n; i++) p[i] = nemo_f32_to_f16(buf[i]);
}
static inline const double *in_row_f64(const nemo_tensor *t, int64_t r, int64_t n, double *buf) {
    (void)buf; return (const double *)nemo_tensor_data(t) + r * n;
}
static inline double *out_row_f64(nemo_tensor *t, int64_t r, int64_t n, double *buf) {
    (void)buf; return (double *)nemo_tensor_data(t) + r * n;
}
static inline void out_done_f64(nemo_tensor *t, int64_t r, int64_t n, const double *buf) {
    (void)t; (void)r; (void)n; (void)buf;
}

/* Software prefetch of the next row while the current one is written: the hardware
 * prefetcher stops at every 4 KiB page, and rows are passed over several times. */
#define NN_PF 64
static inline const char *row_ptr(const nemo_tensor *t, int64_t r, int64_t n) {
    return (const char *)nemo_tensor_data(t) + (size_t)(r * n) * (size_t)nemo_dtype_size(t->dtype);
}
/* Prefetch elements [i0, i0 + NN_PF) of a row starting at p. */
static inline void prefetch_span(const char *p, int64_t i0, int dtype) {
    int esz = dtype == NEMO_F64 ? 8 : dtype == NEMO_F32 ? 4 : 2;
    const char *a = p + i0 * esz;
    for (int k = 0; k < NN_PF * esz; k += 64) __builtin_prefetch(a + k, 0, 3);
}

/* Per-thread row buffers are needed only when some row tensor is not in the compute dtype. */
static int needs_buf(int cdt, const nemo_tensor *a, const nemo_tensor *b) {
    return (a && a->dtype != cdt) || (b && b->dtype != cdt);
}

/* Rows per chunk of the parameter-gradient sums: a function of rows only. */
static int64_t chunk_rows(int64_t rows) {
    int64_t c = NN_CHUNK;
    if (rows > (int64_t)NN_CHUNK * NN_MAXCHUNKS) c = (rows + NN_MAXCHUNKS - 1) / NN_MAXCHUNKS;
    return c;
}

/* ==== norm_rows: layer_norm / rms_norm forward ==== */

#define DEF_NORM_ROWS_FWD(T, SFX)                                                            \
static int norm_rows_fwd_##SFX(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd,          \
                               const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b, \
                               int64_t rows, int64_t n, double eps, int center) {            \
    T *ones = NULL, *zeros = NULL;                                                           \
    const T *W = w ? (const T *)nemo_tensor_data(w) : NULL;                                  \
    const T *B = b ? (const T *)nemo_tensor_data(b) : NULL;                                  \
    if (!W || !B) {                                                                          \
        ones = malloc(sizeof(T) * (size_t)(2 * n + 1));                                      \
        if (!ones) return NEMO_ERR(NEMO_ENOMEM, "layer_norm: out of memory for %lld floats", (long long)(2 * n)); \
        zeros = ones + n;                                                                    \
        for (int64_t i = 0; i < n; i++) { ones[i] = 1; zeros[i] = 0; }                       \
        if (!W) W = ones;                                                                    \
        if (!B) B = zeros;                                                                   \
    }                                                                                        \
    T *M = mean ? (T *)nemo_tensor_data(mean) : NULL, *R = rstd ? (T *)nemo_tensor_data(rstd) : NULL; \
    const int cdt = sizeof(T) == 4 ? NEMO_F32 : NEMO_F64;                                    \
    const int bufs = needs_buf(cdt, x, y);                                                   \
    const T teps = (T)eps, tn = (T)n;                                                        \
    int oom = 0;                                                                             \
    _Pragma("omp parallel if (rows * n > NEMO_PAR_MIN && rows > 1)")                        \
    {                                                                                        \
        T *xb = NULL, *yb = NULL;                                                            \
        if (bufs) { xb = malloc(sizeof(T) * (size_t)(2 * n + 1)); yb = xb ? xb + n : NULL; if (!xb) { _Pragma("omp atomic write") oom = 1; } } \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t r = 0; r < rows; r++) {                                                 \
            if (bufs && !xb) continue;                                                       \
            const T *xr = in_row_##SFX(x, r, n, xb);                                         \
            T *yr = out_row_##SFX(y, r, n, yb);                                              \
            T mu = 0, var;                                                                   \
            if (center) { T s; VSUM(T, SFX, s, n, E_X); mu = s / tn; }                      \
            VSUM(T, SFX, var, n, E_SQDEV);                                \
            var = var / tn;                                                                  \
            T rs = (T)1 / (T)sqrt(var + teps);                                               \
            const char *xn = r + 1 < rows ? row_ptr(x, r + 1, n) : NULL;                     \
            for (int64_t i0 = 0; i0 < n; i0 += NN_PF) {                                      \
                int64_t i1 = i0 + NN_PF < n ? i0 + NN_PF : n;                                \
                if (xn) prefetch_span(xn, i0, x->dtype);                                     \
                if (center) for (int64_t i = i0; i < i1; i++) yr[i] = (xr[i] - mu) * rs * W[i] + B[i]; \
                else for (int64_t i = i0; i < i1; i++) yr[i] = xr[i] * rs * W[i];            \
            }                                                                                \
            out_done_##SFX(y, r, n, yb);                                                     \
            if (M) M[r] = mu;                                                                \
            if (R) R[r] = rs;                                                                \
        }                                                                                    \
        free(xb);                                                                            \
    }                                                                                        \
    free(ones);                                                                              \
    if (oom) return NEMO_ERR(NEMO_ENOMEM, "layer_norm: out of memory for row buffers of %lld floats", (long long)n); \
    return 0;                                                                                \
}
DEF_NORM_ROWS_FWD(float, f32)
DEF_NORM_ROWS_FWD(double, f64)

static int norm_rows_cpu(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                         const nemo_tensor *w, const nemo_tensor *b, int64_t rows, int64_t n, double eps,
                         int center) {
    if (x->dtype == NEMO_F64) return norm_rows_fwd_f64(y, mean, rstd, x, w, b, rows, n, eps, center);
    return norm_rows_fwd_f32(y, mean, rstd, x, w, b, rows, n, eps, center);
}
NEMO_REGISTER_KERNEL("norm_rows", NEMO_CPU, norm_rows_cpu)

/* ==== norm_rows_backward ==== */
/* Per row: xh = (x - mu)*r, gh = g*w; a = mean(gh) (0 for rms), cc = mean(gh*xh);
 * dx = r*(gh - a - xh*cc). Per chunk: dwp += g*xh, dbp += g. Rows go in pairs through one
 * pass that writes both dx rows and adds both rows into the partials, (g0*xh0 + g1*xh1),
 * which halves the partials' traffic; an odd last row of a chunk goes alone. */

#define DEF_BWD_ROW(T, SFX)                                                                  \
typedef struct { const T *x, *g; T *dx; T mu, rs, a, cc; } bwd_row_##SFX;                     \
static inline void bwd_row_prep_##SFX(bwd_row_##SFX *s, nemo_tensor *dx, const nemo_tensor *g,  \
                                      const nemo_tensor *x, const T *W, const T *M, const T *R, \
                                      int64_t r, int64_t n, T *buf) {                        \
    const T *xr = in_row_##SFX(x, r, n, buf), *gr = in_row_##SFX(g, r, n, buf ? buf + n : NULL); \
    const T mu = M ? M[r] : (T)0, rs = R[r];                                                 \
    s->x = xr; s->g = gr; s->mu = mu; s->rs = rs; s->a = 0; s->cc = 0; s->dx = NULL;         \
    if (!dx) return;                                                                         \
    s->dx = out_row_##SFX(dx, r, n, buf ? buf + 2 * n : NULL);                               \
    T s1 = 0, s2;                                                                            \
    if (M) VSUM2(T, SFX, s1, s2, n, E_GW, E_GWXC);                                           \
    else VSUM(T, SFX, s2, n, E_GWX);                                                         \
    s->a = s1 / (T)n;                                                                        \
    s->cc = s2 * rs / (T)n;                                                                  \
}
DEF_BWD_ROW(float, f32)
DEF_BWD_ROW(double, f64)

/* Unpack a row state into locals the vectoriser can keep in registers. */
#define BWD_LOCALS(T, k, s) const T *x##k = (s).x, *g##k = (s).g; T *d##k = (s).dx;           \
    const T mu##k = (s).mu, rs##k = (s).rs, a##k = (s).a, cc##k = (s).cc;                    \
    (void)d##k; (void)a##k; (void)cc##k
#define DX_AT(k, i) (rs##k * (g##k[i] * W[i] - a##k - ((x##k[i] - mu##k) * rs##k) * cc##k))
#define XH_AT(k, i) ((x##k[i] - mu##k) * rs##k)

#define DEF_NORM_ROWS_BWD(T, SFX)                                                            \
static int norm_rows_bwd_##SFX(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db,             \
                               const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *mean, \
                               const nemo_tensor *rstd, const nemo_tensor *w, int64_t rows, int64_t n) { \
    T *ones = NULL, *parts = NULL;                                                           \
    const T *W = w ? (const T *)nemo_tensor_data(w) : NULL;                                  \
    const T *M = mean ? (const T *)nemo_tensor_data(mean) : NULL;                            \
    const T *R = (const T *)nemo_tensor_data(rstd);                                          \
    const int params = dw || db;                                                             \
    const int64_t crow = chunk_rows(rows), nch = (rows + crow - 1) / crow;                   \
    if (!W) {                                                                                \
        ones = malloc(sizeof(T) * (size_t)(n + 1));                                          \
        if (!ones) return NEMO_ERR(NEMO_ENOMEM, "layer_norm backward: out of memory for %lld floats", (long long)n); \
        for (int64_t i = 0; i < n; i++) ones[i] = 1;                                         \
        W = ones;                                                                            \
    }                                                                                        \
    if (params) {                                                                            \
        parts = malloc(sizeof(T) * (size_t)(2 * n * nch + 1));                               \
        if (!parts) {                                                                        \
            free(ones);                                                                      \
            return NEMO_ERR(NEMO_ENOMEM, "layer_norm backward: out of memory for %lld partial sums", \
                            (long long)(2 * n * nch));                                       \
        }                                                                                    \
    }                                                                                        \
    const int cdt = sizeof(T) == 4 ? NEMO_F32 : NEMO_F64;                                    \
    const int bufs = needs_buf(cdt, x, g) || needs_buf(cdt, dx, NULL);                       \
    int oom = 0;                                                                             \
    _Pragma("omp parallel if (rows * n > NEMO_PAR_MIN && nch > 1)")                         \
    {                                                                                        \
        T *buf = NULL;                                                                       \
        if (bufs && !(buf = malloc(sizeof(T) * (size_t)(6 * n + 1)))) {                      \
            _Pragma("omp atomic write") oom = 1;                                             \
        }                                                                                    \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t c = 0; c < nch; c++) {                                                  \
            if (bufs && !buf) continue;                                                      \
            T *dwp = params ? parts + 2 * n * c : NULL, *dbp = params ? dwp + n : NULL;      \
            if (params) for (int64_t i = 0; i < 2 * n; i++) dwp[i] = 0;                      \
            int64_t r1 = (c + 1) * crow < rows ? (c + 1) * crow : rows;                      \
            for (int64_t r = c * crow; r < r1; r += 2) {                                     \
                const int two = r + 1 < r1;                                                  \
                bwd_row_##SFX s0, s1;                                                        \
                bwd_row_prep_##SFX(&s0, dx, g, x, W, M, R, r, n, buf);                       \
                if (two) bwd_row_prep_##SFX(&s1, dx, g, x, W, M, R, r + 1, n, buf ? buf + 3 * n : NULL); \
                else s1 = s0;                                                                \
                BWD_LOCALS(T, 0, s0);                                                        \
                BWD_LOCALS(T, 1, s1);                                                        \
                /* the next pair's rows are fetched while this pair is written */            \
                const char *xn = r + 2 < rows ? row_ptr(x, r + 2, n) : NULL;                 \
                const char *gn = r + 2 < rows ? row_ptr(g, r + 2, n) : NULL;                 \
                const char *xn2 = r + 3 < rows ? row_ptr(x, r + 3, n) : NULL;                \
                const char *gn2 = r + 3 < rows ? row_ptr(g, r + 3, n) : NULL;                \
                for (int64_t i0 = 0; i0 < n; i0 += NN_PF) {                                  \
                    const int64_t i1 = i0 + NN_PF < n ? i0 + NN_PF : n;                      \
                    if (xn) { prefetch_span(xn, i0, x->dtype); prefetch_span(gn, i0, g->dtype); } \
                    if (xn2) { prefetch_span(xn2, i0, x->dtype); prefetch_span(gn2, i0, g->dtype); } \
                    if (two && dx && params) {                                               \
                        _Pragma("omp simd")                                                  \
                        for (int64_t i = i0; i < i1; i++) {                                  \
                            d0[i] = DX_AT(0, i);                                             \
                            d1[i] = DX_AT(1, i);                                             \
                            dwp[i] += g0[i] * XH_AT(0, i) + g1[i] * XH_AT(1, i);             \
                            dbp[i] += g0[i] + g1[i];                                         \
                        }                                                                    \
                    } else if (two && params) {                                              \
                        _Pragma("omp simd")                                                  \
                        for (int64_t i = i0; i < i1; i++) {                                  \
                            dwp[i] += g0[i] * XH_AT(0, i) + g1[i] * XH_AT(1, i);             \
                            dbp[i] += g0[i] + g1[i];                                         \
                        }                                                                    \
                    } else if (two) {                                                        \
                        _Pragma("omp simd")                                                  \
                        for (int64_t i = i0; i < i1; i++) { d0[i] = DX_AT(0, i); d1[i] = DX_AT(1, i); } \
                    } else {                                                                 \
                        if (dx) {                                                            \
                            _Pragma("omp simd")                                              \
                            for (int64_t i = i0; i < i1; i++) d0[i] = DX_AT(0, i);           \
                        }                                                                    \
                        if (params) {                                                        \
                            _Pragma("omp simd")                                              \
                            for (int64_t i = i0; i < i1; i++) {                              \
                                dwp[i] += g0[i] * XH_AT(0, i);                               \
                                dbp[i] += g0[i];                                             \
                            }                                                                \
                        }                                                                    \
                    }                                                                        \
                }                                                                            \
                if (dx) {                                                                    \
                    out_done_##SFX(dx, r, n, buf ? buf + 2 * n : NULL);                      \
                    if (two) out_done_##SFX(dx, r + 1, n, buf ? buf + 5 * n : NULL);         \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        free(buf);                                                                           \
    }                                                                                        \
    if (params && !oom) {                                                                    \
        T *DW = dw ? (T *)nemo_tensor_data(dw) : NULL, *DB = db ? (T *)nemo_tensor_data(db) : NULL; \
        _Pragma("omp parallel for if (n * nch > NEMO_PAR_MIN)")                              \
        for (int64_t i = 0; i < n; i++) {                                                    \
            double sw = 0, sb = 0;                                                           \
            for (int64_t c = 0; c < nch; c++) { sw += parts[2 * n * c + i]; sb += parts[2 * n * c + n + i]; } \
            if (DW) DW[i] = (T)sw;                                                           \
            if (DB) DB[i] = (T)sb;                                                           \
        }                                                                                    \
    }                                                                                        \
    free(ones);                                                                              \
    free(parts);                                                                             \
    if (oom) return NEMO_ERR(NEMO_ENOMEM, "layer_norm backward: out of memory for row buffers of %lld floats", (long long)n); \
    return 0;                                                                                \
}
DEF_NORM_ROWS_BWD(float, f32)
DEF_NORM_ROWS_BWD(double, f64)

static int norm_rows_backward_cpu(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                  const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                  const nemo_tensor *w, int64_t rows, int64_t n) {
    if (rstd->dtype == NEMO_F64) return norm_rows_bwd_f64(dx, dw, db, g, x, mean, rstd, w, rows, n);
    return norm_rows_bwd_f32(dx, dw, db, g, x, mean, rstd, w, rows, n);
}
NEMO_REGISTER_KERNEL("norm_rows_backward", NEMO_CPU, norm_rows_backward_cpu)

/* ==== group_norm ==== */
/* Segment s = n*G + g is contiguous: channels g*D .. g*D+D-1 of sample n, D*HW elements. */

#define DEF_GROUP_NORM_FWD(T, SFX)                                                           \
static void group_norm_fwd_##SFX(T *y, T *M, T *R, const T *x, const T *W, const T *B,        \
                                 int64_t N, int64_t C, int64_t HW, int64_t G, double eps) {  \
    const int64_t D = C / G, len = D * HW;                                                   \
    _Pragma("omp parallel for schedule(static) if (N * C * HW > NEMO_PAR_MIN)")              \
    for (int64_t s = 0; s < N * G; s++) {                                                    \
        const T *xs = x + s * len;                                                           \
        T *ys = y + s * len;                                                                 \
        T sum, var;                                                                          \
        { const T *xr = xs; VSUM(T, SFX, sum, len, E_X); }                                   \
        const T mu = sum / (T)len;                                                           \
        { const T *xr = xs; VSUM(T, SFX, var, len, E_SQDEV); }                              \
        const T rs = (T)1 / (T)sqrt(var / (T)len + (T)eps);                                  \
        const int64_t c0 = (s % G) * D;                                                      \
        for (int64_t d = 0; d < D; d++) {                                                    \
            const T wc = W ? W[c0 + d] : (T)1, bc = B ? B[c0 + d] : (T)0;                    \
            const T *xc = xs + d * HW;                                                       \
            T *yc = ys + d * HW;                                                             \
            for (int64_t i = 0; i < HW; i++) yc[i] = (xc[i] - mu) * rs * wc + bc;            \
        }                                                                                    \
        M[s] = mu;                                                                           \
        R[s] = rs;                                                                           \
    }                                                                                        \
}
DEF_GROUP_NORM_FWD(float, f32)
DEF_GROUP_NORM_FWD(double, f64)

static int group_norm_cpu(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                          const nemo_tensor *w, const nemo_tensor *b, int64_t N, int64_t C, int64_t HW,
                          int64_t G, double eps) {
    void *W = w ? nemo_tensor_data(w) : NULL, *B = b ? nemo_tensor_data(b) : NULL;
    if (x->dtype == NEMO_F64)
        group_norm_fwd_f64(nemo_tensor_data(y), nemo_tensor_data(mean), nemo_tensor_data(rstd),
                           nemo_tensor_data(x), W, B, N, C, HW, G, eps);
    else
        group_norm_fwd_f32(nemo_tensor_data(y), nemo_tensor_data(mean), nemo_tensor_data(rstd),
                           nemo_tensor_data(x), W, B, N, C, HW, G, eps);
    return 0;
}
NEMO_REGISTER_KERNEL("group_norm", NEMO_CPU, group_norm_cpu)

/* Per segment (n, group): A[c] = sum_hw g, Bc[c] = sum_hw g*(x - mu) for its channels;
 * with gh = g*w[c]: mean(gh) = sum_c w[c]*A[c] / len, mean(gh*xh) = r*sum_c w[c]*Bc[c] / len;
 * dx = r*(gh - mean(gh) - xh*mean(gh*xh)). dw[c] = sum_n r*Bc[n,c], db[c] = sum_n A[n,c],
 * summed over n in order from a per-(n, c) table. */
#define DEF_GROUP_NORM_BWD(T, SFX)                                                           \
static void group_norm_bwd_##SFX(T *dx, T *dW, T *dB, double *tab, const T *g, const T *x,    \
                                 const T *M, const T *R, const T *W,                          \
                                 int64_t N, int64_t C, int64_t HW, int64_t G) {              \
    const int64_t D = C / G, len = D * HW;                                                   \
    _Pragma("omp parallel for schedule(static) if (N * C * HW > NEMO_PAR_MIN)")              \
    for (int64_t s = 0; s < N * G; s++) {                                                    \
        const int64_t n = s / G, c0 = (s % G) * D;                                           \
        const T *xs = x + s * len, *gs = g + s * len;                                        \
        const T mu = M[s], rs = R[s];                                                        \
        double *A = tab + 2 * (n * C + c0), sa = 0, sb = 0;                                  \
        for (int64_t d = 0; d < D; d++) {                                                    \
            const T *xc = xs + d * HW, *gc = gs + d * HW;                                    \
            double a_, b_;                                                                   \
            { const T *xr = xc, *gr = gc; VSUM2(T, SFX, a_, b_, HW, E_G, E_GXC); }            \
            A[2 * d] = a_;                                                                   \
            A[2 * d + 1] = b_;                                                               \
            const double wc = W ? (double)W[c0 + d] : 1.0;                                   \
            sa += wc * a_;                                                                   \
            sb += wc * b_;                                                                   \
        }                                                                                    \
        if (!dx) continue;                                                                   \
        const T ma = (T)(sa / (double)len), mc = (T)(sb * (double)rs / (double)len);         \
        for (int64_t d = 0; d < D; d++) {                                                    \
            const T wc = W ? W[c0 + d] : (T)1;                                               \
            const T *xc = xs + d * HW, *gc = gs + d * HW;                                    \
            T *dc = dx + s * len + d * HW;                                                   \
            for (int64_t i = 0; i < HW; i++) {                                               \
                T xh = (xc[i] - mu) * rs;                                                    \
                dc[i] = rs * (gc[i] * wc - ma - xh * mc);                                    \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    if (!dW && !dB) return;                                                                  \
    for (int64_t c = 0; c < C; c++) {                                                        \
        double sw = 0, sb = 0;                                                               \
        for (int64_t n = 0; n < N; n++) {                                                    \
            sw += tab[2 * (n * C + c) + 1] * (double)R[n * G + c / D];                       \
            sb += tab[2 * (n * C + c)];                                                      \
        }                                                                                    \
        if (dW) dW[c] = (T)sw;                                                               \
        if (dB) dB[c] = (T)sb;                                                               \
    }                                                                                        \
}
DEF_GROUP_NORM_BWD(float, f32)
DEF_GROUP_NORM_BWD(double, f64)

static int group_norm_backward_cpu(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                   const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                   const nemo_tensor *w, int64_t N, int64_t C, int64_t HW, int64_t G) {
    double *tab = malloc(sizeof(double) * (size_t)(2 * N * C + 1));
    if (!tab) return NEMO_ERR(NEMO_ENOMEM, "group_norm backward: out of memory for %lld partial sums",
                              (long long)(2 * N * C));
    void *DX = dx ? nemo_tensor_data(dx) : NULL, *DW = dw ? nemo_tensor_data(dw) : NULL;
    void *DB = db ? nemo_tensor_data(db) : NULL, *W = w ? nemo_tensor_data(w) : NULL;
    if (x->dtype == NEMO_F64)
        group_norm_bwd_f64(DX, DW, DB, tab, nemo_tensor_data(g), nemo_tensor_data(x), nemo_tensor_data(mean),
                           nemo_tensor_data(rstd), W, N, C, HW, G);
    else
        group_norm_bwd_f32(DX, DW, DB, tab, nemo_tensor_data(g), nemo_tensor_data(x), nemo_tensor_data(mean),
                           nemo_tensor_data(rstd), W, N, C, HW, G);
    free(tab);
    return 0;
}
NEMO_REGISTER_KERNEL("group_norm_backward", NEMO_CPU, group_norm_backward_cpu)
