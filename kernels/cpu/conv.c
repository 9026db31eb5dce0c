/*
 * kernels/cpu/conv.c: convolution, embedding and nearest-interpolation kernels on the CPU.
 *
 * Convolutions see 5-D dense arrays in the compute dtype (float32 or float64): x (N, C, D, H, W),
 * w (O, C/G, KD, KH, KW), y (N, O, OD, OH, OW); 1-D and 2-D convs arrive with leading spatial
 * sizes of 1. Three paths, all ending in one GEMM per (sample, group, chunk):
 *   direct  1x1 kernel, stride 1, no padding: the input slab (C/G, D*H*W) is the GEMM operand.
 *   patch   kernel == stride, every window inside the input (patchify embeddings): a branch-free
 *           gather into (C/G*KD*KH*KW, P) with P = OD*OH*OW, no chunking; backward scatters
 *           without accumulation because the windows do not overlap.
 *   im2col  everything else: vol2col of a chunk of output rows (bounded buffer) + GEMM;
 *           backward forms dcol = W^T dY and adds it back with col2vol.
 * The non-obvious rule: results never depend on the thread count. col2vol runs one thread per
 * input channel (each dx element is written by one thread, in a fixed order), dW accumulates
 * over samples and chunks in a fixed serial order through GEMM with beta = 1, db sums in double.
 *
 * Embedding rows are copied raw (any dtype); its backward groups the indices by row with a
 * counting sort so each dW row is summed by one thread in index order. Nearest interpolation
 * copies elements of any size; its backward sums per (n, c) plane, one thread per plane.
 */
#include <cblas.h>
#include <stdlib.h>
#include "../../engine/internal.h"

/* ==== GEMM on either float type ==== */

/* C (M x N) = op(A) (M x K) @ op(B) (K x N) + beta * C, all row-major. */
static void gemm(int f64, int ta, int tb, int64_t M, int64_t N, int64_t K, const void *A, int64_t lda,
                 const void *B, int64_t ldb, double beta, void *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {   /* BLAS may leave C alone when K == 0: make it beta * C explicitly */
        const size_t es = f64 ? 8 : 4;
        if (beta == 0.0)
            for (int64_t i = 0; i < M; i++) memset((char *)C + (size_t)(i * ldc) * es, 0, (size_t)N * es);
        return;
    }
    enum CBLAS_TRANSPOSE TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
    if (f64)
        cblas_dgemm(CblasRowMajor, TA, TB, (blasint)M, (blasint)N, (blasint)K, 1.0, A, (blasint)lda, B,
                    (blasint)ldb, beta, C, (blasint)ldc);
    else
        cblas_sgemm(CblasRowMajor, TA, TB, (blasint)M, (blasint)N, (blasint)K, 1.0f, A, (blasint)lda, B,
                    (blasint)ldb, (float)beta, C, (blasint)ldc);
}

/* ==== Row segments (one dtype switch per segment, never per element) ==== */

/* Run the statements with T = double when f64, else T = float. */
#define TYPED(f64, ...) do {                                                  \
        if (f64) { typedef double T; __VA_ARGS__ }                            \
        else { typedef float T; __VA_ARGS__ }                                 \
    } while (0)

/* dst[i] = src[i * stride] */
static inline void seg_gather(char *dst, const char *src, int64_t n, int64_t stride, int f64) {
    if (stride == 1) { memcpy(dst, src, (size_t)n * (f64 ? 8 : 4)); return; }
    TYPED(f64,
        T *d = (T *)dst;
        const T *s = (const T *)src;
        for (int64_t i = 0; i < n; i++) d[i] = s[i * stride];
    );
}
/* dst[i * stride] += src[i] */
static inline void seg_scatter_add(char *dst, const char *src, int64_t n, int64_t stride, int f64) {
    TYPED(f64,
        T *d = (T *)dst;
        const T *s = (const T *)src;
        for (int64_t i = 0; i < n; i++) d[i * stride] += s[i];
    );
}
/* dst[i * stride] = src[i] */
static inline void seg_scatter(char *dst, const char *src, int64_t n, int64_t stride, int f64) {
    if (stride == 1) { memcpy(dst, src, (size_t)n * (f64 ? 8 : 4)); return; }
    TYPED(f64,
        T *d = (T *)dst;
        const T *s = (const T *)src;
        for (int64_t i = 0; i < n; i++) d[i * stride] = s[i];
    );
}
/* dst[i] += src[i] */
static inline void seg_add(char *dst, const char *src, int64_t n, int f64) { seg_scatter_add(dst, src, n, 1, f64); }

/* ==== Convolution geometry ==== */

typedef struct {
    int64_t N, C, D, H, W;          /* input */
    int64_t O, KD, KH, KW;          /* weight (O, Cg, KD, KH, KW) */
    int64_t OD, OH, OW;             /* output */
    int64_t sd, sh, sw, pd, ph, pw, dd, dh, dw;
    int64_t G, Cg, Og;              /* groups, channels per group in and out */
    int64_t Kvol, Kg;               /* KD*KH*KW, GEMM depth Cg*Kvol */
    int64_t S, P, R;                /* input plane D*H*W, output plane OD*OH*OW, output rows OD*OH */
} geom;

static void geom_init(geom *g, const int64_t *xs, const int64_t *ws, const int64_t *ys, const int64_t *stride,
                      const int64_t *pad, const int64_t *dil, int64_t groups) {
    g->N = xs[0]; g->C = xs[1]; g->D = xs[2]; g->H = xs[3]; g->W = xs[4];
    g->O = ws[0]; g->KD = ws[2]; g->KH = ws[3]; g->KW = ws[4];
    g->OD = ys[2]; g->OH = ys[3]; g->OW = ys[4];
    g->sd = stride[0]; g->sh = stride[1]; g->sw = stride[2];
    g->pd = pad[0]; g->ph = pad[1]; g->pw = pad[2];
    g->dd = dil[0]; g->dh = dil[1]; g->dw = dil[2];
    g->G = groups; g->Cg = g->C / groups; g->Og = g->O / groups;
    g->Kvol = g->KD * g->KH * g->KW; g->Kg = g->Cg * g->Kvol;
    g->S = g->D * g->H * g->W; g->P = g->OD * g->OH * g->OW; g->R = g->OD * g->OH;
}

enum { PATH_DIRECT, PATH_PATCH, PATH_IM2COL };

static int pick_path(const geom *g, int algo) {
    if (algo == NEMO_CONV_IM2COL) return PATH_IM2COL;
    int nopad = g->pd == 0 && g->ph == 0 && g->pw == 0;
    if (g->Kvol == 1 && g->sd == 1 && g->sh == 1 && g->sw == 1 && nopad &&
        g->OD == g->D && g->OH == g->H && g->OW == g->W)
        return PATH_DIRECT;
    int tiles = g->KD == g->sd && g->KH == g->sh && g->KW == g->sw &&
                (g->KD == 1 || g->dd == 1) && (g->KH == 1 || g->dh == 1) && (g->KW == 1 || g->dw == 1);
    if (tiles && nopad && g->OD * g->KD <= g->D && g->OH * g->KH <= g->H && g->OW * g->KW <= g->W)
        return PATH_PATCH;
    return PATH_IM2COL;
}

/* Output columns [lo, hi) whose input column ow*sw + off lies inside [0, W) for kernel column kw. */
static inline void w_range(const geom *g, int64_t kw, int64_t *lo, int64_t *hi, int64_t *off) {
    int64_t o = kw * g->dw - g->pw;
    int64_t l = o >= 0 ? 0 : (-o + g->sw - 1) / g->sw;
    int64_t h = (g->W - 1 - o) < 0 ? 0 : (g->W - 1 - o) / g->sw + 1;
    if (l > g->OW) l = g->OW;
    if (h > g->OW) h = g->OW;
    if (h < l) h = l;
    *lo = l; *hi = h; *off = o;
}

static inline void kr_split(const geom *g, int64_t kr, int64_t *c, int64_t *kd, int64_t *kh, int64_t *kw) {
    int64_t kk = kr % g->Kvol;
    *c = kr / g->Kvol;
    *kd = kk / (g->KH * g->KW);
    *kh = (kk / g->KW) % g->KH;
    *kw = kk % g->KW;
}

/* col (Kg, (r1-r0)*OW) from the group slab x (Cg, D, H, W), output rows [r0, r1). */
static void vol2col(char *col, const char *x, const geom *g, int64_t r0, int64_t r1, int f64) {
    const size_t es = f64 ? 8 : 4;
    const int64_t pc = (r1 - r0) * g->OW;
    #pragma omp parallel for if (g->Kg * pc > NEMO_PAR_MIN)
    for (int64_t kr = 0; kr < g->Kg; kr++) {
        int64_t c, kd, kh, kw, lo, hi, off;
        kr_split(g, kr, &c, &kd, &kh, &kw);
        w_range(g, kw, &lo, &hi, &off);
        const char *xc = x + (size_t)(c * g->S) * es;
        char *dst = col + (size_t)(kr * pc) * es;
        for (int64_t r = r0; r < r1; r++, dst += (size_t)g->OW * es) {
            int64_t od = r / g->OH, oh = r % g->OH;
            int64_t id = od * g->sd - g->pd + kd * g->dd, ih = oh * g->sh - g->ph + kh * g->dh;
            if (id < 0 || id >= g->D || ih < 0 || ih >= g->H) { memset(dst, 0, (size_t)g->OW * es); continue; }
            if (lo > 0) memset(dst, 0, (size_t)lo * es);
            if (hi > lo)
                seg_gather(dst + (size_t)lo * es, xc + (size_t)((id * g->H + ih) * g->W + lo * g->sw + off) * es,
                           hi - lo, g->sw, f64);
            if (hi < g->OW) memset(dst + (size_t)hi * es, 0, (size_t)(g->OW - hi) * es);
        }
    }
}

/* dx slab (Cg, D, H, W) += col2vol(col) for output rows [r0, r1); one thread per channel. */
static void col2vol(char *dx, const char *col, const geom *g, int64_t r0, int64_t r1, int f64) {
    const size_t es = f64 ? 8 : 4;
    const int64_t pc = (r1 - r0) * g->OW;
    #pragma omp parallel for if (g->Kg * pc > NEMO_PAR_MIN)
    for (int64_t c = 0; c < g->Cg; c++) {
        char *dxc = dx + (size_t)(c * g->S) * es;
        for (int64_t kk = 0; kk < g->Kvol; kk++) {
            int64_t kr = c * g->Kvol + kk, cc, kd, kh, kw, lo, hi, off;
            kr_split(g, kr, &cc, &kd, &kh, &kw);
            w_range(g, kw, &lo, &hi, &off);
            if (hi <= lo) continue;
            const char *src = col + (size_t)(kr * pc) * es;
            for (int64_t r = r0; r < r1; r++, src += (size_t)g->OW * es) {
                int64_t od = r / g->OH, oh = r % g->OH;
                int64_t id = od * g->sd - g->pd + kd * g->dd, ih = oh * g->sh - g->ph + kh * g->dh;
                if (id < 0 || id >= g->D || ih < 0 || ih >= g->H) continue;
                seg_scatter_add(dxc + (size_t)((id * g->H + ih) * g->W + lo * g->sw + off) * es,
                                src + (size_t)lo * es, hi - lo, g->sw, f64);
            }
        }
    }
}

/* Patch path: windows tile the input (stride == kernel, no padding), so every column is a plain
 * strided read and the backward is a plain strided write. */
static void patch_gather(char *col, const char *x, const geom *g, int f64) {
    const size_t es = f64 ? 8 : 4;
    #pragma omp parallel for if (g->Kg * g->P > NEMO_PAR_MIN)
    for (int64_t kr = 0; kr < g->Kg; kr++) {
        int64_t c, kd, kh, kw;
        kr_split(g, kr, &c, &kd, &kh, &kw);
        const char *xc = x + (size_t)(c * g->S) * es;
        char *dst = col + (size_t)(kr * g->P) * es;
        for (int64_t r = 0; r < g->R; r++, dst += (size_t)g->OW * es) {
            int64_t id = (r / g->OH) * g->KD + kd, ih = (r % g->OH) * g->KH + kh;
            seg_gather(dst, xc + (size_t)((id * g->H + ih) * g->W + kw) * es, g->OW, g->KW, f64);
        }
    }
}

static void patch_scatter(char *dx, const char *col, const geom *g, int f64) {
    const size_t es = f64 ? 8 : 4;
    #pragma omp parallel for if (g->Kg * g->P > NEMO_PAR_MIN)
    for (int64_t c = 0; c < g->Cg; c++) {
        char *dxc = dx + (size_t)(c * g->S) * es;
        for (int64_t kk = 0; kk < g->Kvol; kk++) {
            int64_t kr = c * g->Kvol + kk, cc, kd, kh, kw;
            kr_split(g, kr, &cc, &kd, &kh, &kw);
            const char *src = col + (size_t)(kr * g->P) * es;
            for (int64_t r = 0; r < g->R; r++, src += (size_t)g->OW * es) {
                int64_t id = (r / g->OH) * g->KD + kd, ih = (r % g->OH) * g->KH + kh;
                seg_scatter(dxc + (size_t)((id * g->H + ih) * g->W + kw) * es, src, g->OW, g->KW, f64);
            }
        }
    }
}

/* Output rows per im2col chunk: the column buffer stays near COL_ELEMS elements. */
#define COL_ELEMS ((int64_t)4 << 20)
static int64_t chunk_rows(const geom *g, int path) {
    if (path == PATH_PATCH) return g->R;
    int64_t per_row = g->Kg * g->OW;
    int64_t rows = per_row > 0 ? COL_ELEMS / per_row : g->R;
    if (rows < 1) rows = 1;
    if (rows > g->R) rows = g->R;
    return rows;
}

static void fill_cols(char *buf, const char *xs, const geom *g, int path, int64_t r0, int64_t r1, int f64) {
    if (path == PATH_PATCH) patch_gather(buf, xs, g, f64);
    else vol2col(buf, xs, g, r0, r1, f64);
}

/* ==== Convolution forward ==== */

static int conv_fwd_cpu(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b,
                        const int64_t *stride, const int64_t *pad, const int64_t *dil, int64_t groups, int algo) {
    geom g;
    geom_init(&g, x->shape, w->shape, y->shape, stride, pad, dil, groups);
    const int f64 = x->dtype == NEMO_F64;
    const size_t es = f64 ? 8 : 4;
    char *yp = nemo_tensor_data(y);
    const char *xp = nemo_tensor_data(x), *wp = nemo_tensor_data(w);
    double beta = 0.0;
    if (b) {   /* y starts as the bias; the GEMMs add into it */
        const char *bp = nemo_tensor_data(b);
        #pragma omp parallel for if (g.N * g.O * g.P > NEMO_PAR_MIN)
        for (int64_t no = 0; no < g.N * g.O; no++) {
            int64_t o = no % g.O;
            TYPED(f64,
                T *d = (T *)yp + no * g.P;
                T v = ((const T *)bp)[o];
                for (int64_t i = 0; i < g.P; i++) d[i] = v;
            );
        }
        beta = 1.0;
    }
    if (g.N == 0 || g.P == 0 || g.O == 0) return 0;
    const int path = pick_path(&g, algo);
    if (path == PATH_DIRECT) {
        for (int64_t n = 0; n < g.N; n++)
            for (int64_t gi = 0; gi < g.G; gi++)
                gemm(f64, 0, 0, g.Og, g.P, g.Cg, wp + (size_t)(gi * g.Og * g.Kg) * es, g.Kg,
                     xp + (size_t)((n * g.C + gi * g.Cg) * g.S) * es, g.P, beta,
                     yp + (size_t)((n * g.O + gi * g.Og) * g.P) * es, g.P);
        return 0;
    }
    const int64_t rows = chunk_rows(&g, path);
    const size_t nbytes = (size_t)(g.Kg * rows * g.OW) * es;
    char *buf = nemo_dev_alloc(NEMO_CPU, 0, nbytes);
    if (!buf) return nemo_last_status();
    for (int64_t n = 0; n < g.N; n++)
        for (int64_t gi = 0; gi < g.G; gi++) {
            const char *xs = xp + (size_t)((n * g.C + gi * g.Cg) * g.S) * es;
            char *ys = yp + (size_t)((n * g.O + gi * g.Og) * g.P) * es;
            for (int64_t r0 = 0; r0 < g.R; r0 += rows) {
                int64_t r1 = r0 + rows < g.R ? r0 + rows : g.R, pc = (r1 - r0) * g.OW;
                fill_cols(buf, xs, &g, path, r0, r1, f64);
                gemm(f64, 0, 0, g.Og, pc, g.Kg, wp + (size_t)(gi * g.Og * g.Kg) * es, g.Kg, buf, pc, beta,
                     ys + (size_t)(r0 * g.OW) * es, g.P);
            }
        }
    nemo_dev_free(NEMO_CPU, 0, buf, nbytes);
    return 0;
}
NEMO_REGISTER_KERNEL("conv_fwd", NEMO_CPU, conv_fwd_cpu)

/* ==== Convolution backward ==== */

/* dx, dw, db may each be NULL (not needed); x is needed only for dw, w only for dx. */
static int conv_bwd_cpu(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *gy,
                        const nemo_tensor *x, const nemo_tensor *w, const int64_t *stride, const int64_t *pad,
                        const int64_t *dil, int64_t groups, int algo) {
    const int f64 = gy->dtype == NEMO_F64;
    const size_t es = f64 ? 8 : 4;
    const char *gp = nemo_tensor_data(gy);
    if (db) {   /* needs only dY: (N, O, P) */
        const int64_t N = gy->shape[0], O = gy->shape[1], P = gy->shape[2] * gy->shape[3] * gy->shape[4];
        char *dbp = nemo_tensor_data(db);
        #pragma omp parallel for if (N * O * P > NEMO_PAR_MIN)
        for (int64_t o = 0; o < O; o++) {
            double s = 0;
            for (int64_t n = 0; n < N; n++) {
                TYPED(f64,
                    const T *r = (const T *)(gp + (size_t)((n * O + o) * P) * es);
                    for (int64_t i = 0; i < P; i++) s += r[i];
                );
            }
            TYPED(f64, ((T *)dbp)[o] = (T)s;);
        }
    }
    if (!dx && !dw) return 0;
    geom g;
    geom_init(&g, (dx ? dx : x)->shape, (dw ? dw : w)->shape, gy->shape, stride, pad, dil, groups);
    const int path = pick_path(&g, algo);
    char *dwp = dw ? nemo_tensor_data(dw) : NULL, *dxp = dx ? nemo_tensor_data(dx) : NULL;
    const char *xp = x ? nemo_tensor_data(x) : NULL, *wp = w ? nemo_tensor_data(w) : NULL;
    if (dwp) memset(dwp, 0, (size_t)(g.O * g.Kg) * es);
    if (dxp && (path != PATH_DIRECT || g.O == 0)) memset(dxp, 0, (size_t)(g.N * g.C * g.S) * es);
    if ((!dxp && !dwp) || g.N == 0 || g.P == 0 || g.O == 0) return 0;
    if (path == PATH_DIRECT) {
        for (int64_t n = 0; n < g.N; n++)
            for (int64_t gi = 0; gi < g.G; gi++) {
                const char *gs = gp + (size_t)((n * g.O + gi * g.Og) * g.P) * es;
                size_t xoff = (size_t)((n * g.C + gi * g.Cg) * g.S) * es;
                if (dwp)   /* dW_g (Og x Cg) += dY (Og x P) @ X^T (P x Cg) */
                    gemm(f64, 0, 1, g.Og, g.Cg, g.P, gs, g.P, xp + xoff, g.P, 1.0,
                         dwp + (size_t)(gi * g.Og * g.Kg) * es, g.Kg);
                if (dxp)   /* dX (Cg x P) = W_g^T (Cg x Og) @ dY (Og x P) */
                    gemm(f64, 1, 0, g.Cg, g.P, g.Og, wp + (size_t)(gi * g.Og * g.Kg) * es, g.Kg, gs, g.P, 0.0,
                         dxp + xoff, g.P);
            }
        return 0;
    }
    const int64_t rows = chunk_rows(&g, path);
    const size_t nbytes = (size_t)(g.Kg * rows * g.OW) * es;
    char *buf = nemo_dev_alloc(NEMO_CPU, 0, nbytes);
    if (!buf) return nemo_last_status();
    for (int64_t n = 0; n < g.N; n++)
        for (int64_t gi = 0; gi < g.G; gi++) {
            const char *gs = gp + (size_t)((n * g.O + gi * g.Og) * g.P) * es;
            size_t xoff = (size_t)((n * g.C + gi * g.Cg) * g.S) * es;
            for (int64_t r0 = 0; r0 < g.R; r0 += rows) {
                int64_t r1 = r0 + rows < g.R ? r0 + rows : g.R, pc = (r1 - r0) * g.OW;
                const char *gc = gs + (size_t)(r0 * g.OW) * es;
                if (dwp) {   /* dW_g (Og x Kg) += dY (Og x pc) @ col^T (pc x Kg) */
                    fill_cols(buf, xp + xoff, &g, path, r0, r1, f64);
                    gemm(f64, 0, 1, g.Og, g.Kg, pc, gc, g.P, buf, pc, 1.0, dwp + (size_t)(gi * g.Og * g.Kg) * es, g.Kg);
                }
                if (dxp) {   /* dcol (Kg x pc) = W_g^T (Kg x Og) @ dY (Og x pc), then back onto dx */
                    gemm(f64, 1, 0, g.Kg, pc, g.Og, wp + (size_t)(gi * g.Og * g.Kg) * es, g.Kg, gc, g.P, 0.0, buf, pc);
                    if (path == PATH_PATCH) patch_scatter(dxp + xoff, buf, &g, f64);
                    else col2vol(dxp + xoff, buf, &g, r0, r1, f64);
                }
            }
        }
    nemo_dev_free(NEMO_CPU, 0, buf, nbytes);
    return 0;
}
NEMO_REGISTER_KERNEL("conv_bwd", NEMO_CPU, conv_bwd_cpu)

/* ==== Embedding ==== */

/* Every index in [0, V): the kernels check, as the CUDA ones do, so that a kernel never reads or
 * writes outside its tensors whatever the front-end passes. */
static int check_rows(const char *op, const nemo_tensor *idx, int64_t V) {
    const int64_t *p = nemo_tensor_data(idx);
    const int64_t n = nemo_tensor_numel(idx);
    for (int64_t i = 0; i < n; i++)
        if (p[i] < 0 || p[i] >= V) {
            char b[160];
            return NEMO_ERR(NEMO_EINVAL, "%s: index %lld (at flat position %lld of indices %s) is out of range for a "
                            "weight with V = %lld rows (expected 0 <= index < %lld)", op, (long long)p[i], (long long)i,
                            nemo_shape_str(idx, b, sizeof b), (long long)V, (long long)V);
        }
    return 0;
}

/* y (n, D) = w[idx[i], :] for the n int64 indices; any dtype. */
static int embedding_fwd_cpu(nemo_tensor *y, const nemo_tensor *idx, const nemo_tensor *w) {
    int rc = check_rows("embedding", idx, w->shape[0]);
    if (rc < 0) return rc;
    const int64_t n = nemo_tensor_numel(idx), D = w->shape[1];
    const size_t row = (size_t)D * (size_t)nemo_dtype_size(w->dtype);
    const int64_t *ip = nemo_tensor_data(idx);
    const char *wp = nemo_tensor_data(w);
    char *yp = nemo_tensor_data(y);
    #pragma omp parallel for if (n * D > NEMO_PAR_MIN)
    for (int64_t i = 0; i < n; i++) memcpy(yp + (size_t)i * row, wp + (size_t)ip[i] * row, row);
    return 0;
}
NEMO_REGISTER_KERNEL("embedding_fwd", NEMO_CPU, embedding_fwd_cpu)

/* dw (V, D) = sum of g's rows per index. A counting sort lists each row's occurrences in index
 * order, so each dw row is summed by one thread in a fixed order (no atomics, no races). */
static int embedding_bwd_cpu(nemo_tensor *dw, const nemo_tensor *g, const nemo_tensor *idx, int64_t padding_idx) {
    int rc = check_rows("embedding backward", idx, dw->shape[0]);
    if (rc < 0) return rc;
    const int64_t n = nemo_tensor_numel(idx), V = dw->shape[0], D = dw->shape[1];
    const int f64 = dw->dtype == NEMO_F64;
    const int64_t *ip = nemo_tensor_data(idx);
    const char *gp = nemo_tensor_data(g);
    char *dp = nemo_tensor_data(dw);
    const size_t es = f64 ? 8 : 4;
    int64_t *start = calloc((size_t)V + 1, sizeof *start);
    int64_t *order = malloc((size_t)(n > 0 ? n : 1) * sizeof *order);
    if (!start || !order) {
        free(start); free(order);
        return NEMO_ERR(NEMO_ENOMEM, "embedding backward: out of memory for %lld indices", (long long)n);
    }
    for (int64_t i = 0; i < n; i++) start[ip[i] + 1]++;
    for (int64_t v = 0; v < V; v++) start[v + 1] += start[v];
    {
        int64_t *cur = malloc((size_t)(V > 0 ? V : 1) * sizeof *cur);
        if (!cur) { free(start); free(order); return NEMO_ERR(NEMO_ENOMEM, "embedding backward: out of memory"); }
        memcpy(cur, start, (size_t)V * sizeof *cur);
        for (int64_t i = 0; i < n; i++) order[cur[ip[i]]++] = i;
        free(cur);
    }
    #pragma omp parallel for if (V * D > NEMO_PAR_MIN || n * D > NEMO_PAR_MIN)
    for (int64_t v = 0; v < V; v++) {
        char *drow = dp + (size_t)(v * D) * es;
        memset(drow, 0, (size_t)D * es);
        if (v == padding_idx) continue;
        for (int64_t k = start[v]; k < start[v + 1]; k++) {
            seg_add(drow, gp + (size_t)(order[k] * D) * es, D, f64);
        }
    }
    free(start);
    free(order);
    return 0;
}
NEMO_REGISTER_KERNEL("embedding_bwd", NEMO_CPU, embedding_bwd_cpu)

/* ==== Nearest interpolation ==== */

/* PyTorch's CPU index rule (UpSample.h / UpSampleKernel.cpp): the scale is float32, 1/s when the
 * user gave s, else in/out; "nearest" copies when out == in and halves when out == 2*in. */
static int64_t nearest_src(int64_t i, int64_t in, int64_t out, double user_scale, int mode) {
    if (mode == NEMO_INTERP_NEAREST) {
        if (out == in) return i;
        if (out == 2 * in) return i >> 1;
    }
    float s = user_scale > 0 ? (float)(1.0 / user_scale) : (float)in / (float)out;
    int64_t k = mode == NEMO_INTERP_NEAREST ? (int64_t)floorf((float)i * s)
                                            : (int64_t)floorf((float)(((double)i + 0.5) * (double)s));
    return k < in - 1 ? k : in - 1;
}

/* Maps of output index -> input index for the 3 spatial dims, in one allocation. */
static int64_t *nearest_maps(const int64_t *in5, const int64_t *out5, const double *scales, int mode) {
    int64_t *m = malloc((size_t)(out5[2] + out5[3] + out5[4] + 1) * sizeof *m);
    if (!m) { NEMO_ERR(NEMO_ENOMEM, "interpolate: out of memory"); return NULL; }
    int64_t *p = m;
    for (int d = 0; d < 3; d++)
        for (int64_t i = 0; i < out5[2 + d]; i++) *p++ = nearest_src(i, in5[2 + d], out5[2 + d], scales[d], mode);
    return m;
}

static inline void gather_idx(char *dst, const char *src, const int64_t *map, int64_t n, int es) {
    switch (es) {
    case 1: for (int64_t i = 0; i < n; i++) dst[i] = src[map[i]]; break;
    case 2: for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = ((const uint16_t *)src)[map[i]]; break;
    case 4: for (int64_t i = 0; i < n; i++) ((uint32_t *)dst)[i] = ((const uint32_t *)src)[map[i]]; break;
    default: for (int64_t i = 0; i < n; i++) ((uint64_t *)dst)[i] = ((const uint64_t *)src)[map[i]]; break;
    }
}

/* y (N, C, OD, OH, OW) from x (N, C, D, H, W), any dtype. One thread per (n, c) plane; a row
 * or plane that repeats the previous one's source is copied from the output. */
static int interp_fwd_cpu(nemo_tensor *y, const nemo_tensor *x, const double *scales, int mode) {
    const int64_t *is = x->shape, *os = y->shape;
    int64_t *maps = nearest_maps(is, os, scales, mode);
    if (!maps) return nemo_last_status();
    const int64_t *md = maps, *mh = maps + os[2], *mw = maps + os[2] + os[3];
    const int es = nemo_dtype_size(x->dtype);
    const int64_t NC = os[0] * os[1], iplane = is[2] * is[3] * is[4], orow = os[4], oplane = os[3] * os[4];
    const char *xp = nemo_tensor_data(x);
    char *yp = nemo_tensor_data(y);
    #pragma omp parallel for if (NC * os[2] * oplane > NEMO_PAR_MIN)
    for (int64_t nc = 0; nc < NC; nc++) {
        const char *xs = xp + (size_t)(nc * iplane) * (size_t)es;
        char *ys = yp + (size_t)(nc * os[2] * oplane) * (size_t)es;
        for (int64_t od = 0; od < os[2]; od++) {
            char *yd = ys + (size_t)(od * oplane) * (size_t)es;
            if (od > 0 && md[od] == md[od - 1]) {   /* same source plane as the previous one */
                memcpy(yd, yd - (size_t)oplane * (size_t)es, (size_t)oplane * (size_t)es);
                continue;
            }
            for (int64_t oh = 0; oh < os[3]; oh++) {
                char *yr = yd + (size_t)(oh * orow) * (size_t)es;
                if (oh > 0 && mh[oh] == mh[oh - 1]) {
                    memcpy(yr, yr - (size_t)orow * (size_t)es, (size_t)orow * (size_t)es);
                    continue;
                }
                gather_idx(yr, xs + (size_t)((md[od] * is[3] + mh[oh]) * is[4]) * (size_t)es, mw, orow, es);
            }
        }
    }
    free(maps);
    return 0;
}
NEMO_REGISTER_KERNEL("interp_nearest_fwd", NEMO_CPU, interp_fwd_cpu)

/* dx (N, C, D, H, W) = sum of g (N, C, OD, OH, OW) over the output pixels that read each input
 * pixel; float32 or float64; one thread per (n, c) plane, fixed order. */
static int interp_bwd_cpu(nemo_tensor *dx, const nemo_tensor *g, const double *scales, int mode) {
    const int64_t *is = dx->shape, *os = g->shape;
    int64_t *maps = nearest_maps(is, os, scales, mode);
    if (!maps) return nemo_last_status();
    const int64_t *md = maps, *mh = maps + os[2], *mw = maps + os[2] + os[3];
    const int f64 = dx->dtype == NEMO_F64;
    const size_t es = f64 ? 8 : 4;
    const int64_t NC = os[0] * os[1], iplane = is[2] * is[3] * is[4], oplane = os[2] * os[3] * os[4];
    const char *gp = nemo_tensor_data(g);
    char *dp = nemo_tensor_data(dx);
    memset(dp, 0, (size_t)(NC * iplane) * es);
    #pragma omp parallel for if (NC * oplane > NEMO_PAR_MIN)
    for (int64_t nc = 0; nc < NC; nc++) {
        const char *gs = gp + (size_t)(nc * oplane) * es;
        char *ds = dp + (size_t)(nc * iplane) * es;
        for (int64_t od = 0; od < os[2]; od++)
            for (int64_t oh = 0; oh < os[3]; oh++) {
                const char *grow = gs + (size_t)((od * os[3] + oh) * os[4]) * es;
                char *drow = ds + (size_t)((md[od] * is[3] + mh[oh]) * is[4]) * es;
                TYPED(f64,
                    T *d = (T *)drow;
                    const T *s = (const T *)grow;
                    for (int64_t i = 0; i < os[4]; i++) d[mw[i]] += s[i];
                );
            }
    }
    free(maps);
    return 0;
}
NEMO_REGISTER_KERNEL("interp_nearest_bwd", NEMO_CPU, interp_bwd_cpu)
