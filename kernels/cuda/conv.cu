/*
 * kernels/cuda/conv.cu: the CUDA kernels of the conv family, with the signatures of
 * kernels/cpu/conv.c (front-end: engine/ops/conv.c):
 *
 *   "conv_fwd"           int (y, x, w, b, stride[3], pad[3], dil[3], groups, algo)
 *   "conv_bwd"           int (dx, dw, db, g, x, w, stride[3], pad[3], dil[3], groups, algo)
 *       x (N, C, D, H, W), w (O, C/G, KD, KH, KW), y / g (N, O, OD, OH, OW), b / db (O): dense,
 *       compute dtype (float32 / float64); b, dx, dw, db may be NULL (x is needed only for dw,
 *       w only for dx). stride / pad / dil are host arrays of 3.
 *   "embedding_fwd"      int (y, idx, w)          y (n, D) = w[idx, :], any dtype, idx int64 (n)
 *   "embedding_bwd"      int (dw, g, idx, padding_idx)
 *       dw (V, D) = per row v the sum of g's rows whose index is v, in index order; row
 *       padding_idx stays zero. dw, g compute dtype.
 *   "interp_nearest_fwd" int (y, x, scales[3], mode)   any dtype, (N, C, D, H, W) 5-D
 *   "interp_nearest_bwd" int (dx, g, scales[3], mode)  compute dtype
 *
 * Launchers return 0 or a negative status with the plugin's error text and run on the
 * device's stream; only the embedding kernels synchronize (see below).
 *
 * Non-obvious rules
 * - Convolutions are one cuBLAS product per (sample, group[, chunk of output rows]): a 1x1
 *   stride-1 unpadded conv multiplies the input slab directly; every other conv (the CPU's
 *   patch and im2col paths alike) gathers a column buffer of at most COL_ELEMS elements
 *   (vol2col) first. The backward forms dcol = W^T dY and adds it back with a gather
 *   (col2vol): one thread per input element, adding its kernel taps in tap order, which is
 *   the CPU's order, so no atomics and no races. dW accumulates over samples and chunks with
 *   beta = 1 in a fixed serial order; db sums in double with a fixed tree per channel.
 * - The embedding kernels check every index against [0, V) on the device (an integer atomicMin
 *   finds the first bad position, which is order-independent) and copy that one word back,
 *   so a bad index is the CPU's error message rather than a device fault; that copy waits for
 *   the stream. The backward sorts (index, position) pairs with CUB's stable radix sort, so
 *   each dW row is summed by one thread per column in index order, from zero, exactly as the
 *   CPU's counting sort does: bit-for-bit the CPU result.
 * - Nearest interpolation computes PyTorch's source index on the device with the CPU's float
 *   operations (IEEE, uncontracted), so the maps agree exactly. Its backward has one thread
 *   per input element sum the output pixels that read it, found by binary search (the map is
 *   monotonic), in (od, oh, ow) order from zero: bit-for-bit the CPU result.
 */
#include <limits.h>
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include "util.cuh"

#define COL_ELEMS ((int64_t)16 << 20)   /* column buffer elements per chunk */

/* ==== Convolution geometry (kernels/cpu/conv.c's) ==== */

typedef struct {
    int64_t N, C, D, H, W;
    int64_t O, KD, KH, KW;
    int64_t OD, OH, OW;
    int64_t sd, sh, sw, pd, ph, pw, dd, dh, dw;
    int64_t G, Cg, Og, Kvol, Kg, S, P, R;
} cgeom;

static void cgeom_init(cgeom *g, const int64_t *xs, const int64_t *ws, const int64_t *ys, const int64_t *stride,
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

static int cgeom_direct(const cgeom *g, int algo) {
    return algo != NEMO_CONV_IM2COL && g->Kvol == 1 && g->sd == 1 && g->sh == 1 && g->sw == 1 && g->pd == 0 &&
           g->ph == 0 && g->pw == 0 && g->OD == g->D && g->OH == g->H && g->OW == g->W;
}

/* Output rows per column chunk. */
static int64_t col_rows(const cgeom *g) {
    int64_t per = g->Kg * g->OW;
    int64_t rows = per > 0 ? COL_ELEMS / per : g->R;
    return k_clamp(rows, 1, g->R > 0 ? g->R : 1);
}

/* ==== Convolution kernels ==== */

/* col (Kg, (r1 - r0) * OW) of the slab x (Cg, D, H, W) for output rows [r0, r1). */
template <typename T>
__global__ void vol2col_k(T *col, const T *x, cgeom g, int64_t r0, int64_t pc) {
    NEMO_CUDA_LOOP(e, g.Kg * pc) {
        const int64_t kr = e / pc, p = e % pc;
        const int64_t c = kr / g.Kvol, kk = kr % g.Kvol;
        const int64_t kd = kk / (g.KH * g.KW), kh = (kk / g.KW) % g.KH, kw = kk % g.KW;
        const int64_t r = r0 + p / g.OW, ow = p % g.OW, od = r / g.OH, oh = r % g.OH;
        const int64_t id = od * g.sd - g.pd + kd * g.dd, ih = oh * g.sh - g.ph + kh * g.dh,
                      iw = ow * g.sw - g.pw + kw * g.dw;
        T v = (T)0;
        if (id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
            v = x[((c * g.D + id) * g.H + ih) * g.W + iw];
        col[e] = v;
    }
}

/* dx slab (Cg, D, H, W) += the column entries of output rows [r0, r1) that read each element,
 * taps in (kd, kh, kw) order. */
template <typename T>
__global__ void col2vol_k(T *dx, const T *col, cgeom g, int64_t r0, int64_t r1, int64_t pc) {
    NEMO_CUDA_LOOP(e, g.Cg * g.S) {
        const int64_t c = e / g.S, s = e % g.S, iw = s % g.W, ih = (s / g.W) % g.H, id = s / (g.W * g.H);
        T acc = dx[e];
        for (int64_t kd = 0; kd < g.KD; kd++) {
            const int64_t td = id + g.pd - kd * g.dd;
            if (td < 0 || td % g.sd != 0 || td / g.sd >= g.OD) continue;
            const int64_t od = td / g.sd;
            for (int64_t kh = 0; kh < g.KH; kh++) {
                const int64_t th = ih + g.ph - kh * g.dh;
                if (th < 0 || th % g.sh != 0 || th / g.sh >= g.OH) continue;
                const int64_t r = od * g.OH + th / g.sh;
                if (r < r0 || r >= r1) continue;
                for (int64_t kw = 0; kw < g.KW; kw++) {
                    const int64_t tw = iw + g.pw - kw * g.dw;
                    if (tw < 0 || tw % g.sw != 0 || tw / g.sw >= g.OW) continue;
                    const int64_t kk = (kd * g.KH + kh) * g.KW + kw;
                    acc = rn_add(acc, col[(c * g.Kvol + kk) * pc + (r - r0) * g.OW + tw / g.sw]);
                }
            }
        }
        dx[e] = acc;
    }
}

template <typename T>
__global__ void bias_fill_k(T *y, const T *b, int64_t NO, int64_t O, int64_t P) {
    NEMO_CUDA_LOOP(e, NO * P) y[e] = b[(e / P) % O];
}

/* db[o] = sum over n and the plane of g[(n*O + o)*P + i], double, one block per channel. */
template <typename T>
__global__ void conv_db_k(T *db, const T *g, int64_t N, int64_t O, int64_t P) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    ROW_TASKS(o, O, NEMO_CUDA_THREADS) {
        const bool ok = o < O;
        double s = 0.0;
        if (ok)
            for (int64_t n = 0; n < N; n++) {
                const T *r = g + (n * O + o) * P;
                for (int64_t i = threadIdx.x; i < P; i += NEMO_CUDA_THREADS) s = __dadd_rn(s, (double)r[i]);
            }
        s = nemo_cuda_group_reduce<NEMO_CUDA_THREADS>(s, AddF64(), sm);
        if (ok && threadIdx.x == 0) db[o] = (T)s;
    }
}

/* ==== Convolution launchers ==== */

static int conv_check5(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref) {
    if (!t) return 0;
    NEMO_CUDA_RC(k_check(op, what, t, ref, ref->dtype));
    if (t->ndim != 5) return nemo_cuda_error(NEMO_ESHAPE, "%s: %s has %d dims, expected 5", op, what, t->ndim);
    return 0;
}
static int conv_args(const char *op, const int64_t *stride, const int64_t *pad, const int64_t *dil, int64_t groups) {
    if (!stride || !pad || !dil) return nemo_cuda_error(NEMO_EINVAL, "%s: stride, padding and dilation are required", op);
    for (int d = 0; d < 3; d++)
        if (stride[d] < 1 || dil[d] < 1 || pad[d] < 0)
            return nemo_cuda_error(NEMO_EINVAL, "%s: stride %lld, dilation %lld, padding %lld in dim %d", op,
                                   (long long)stride[d], (long long)dil[d], (long long)pad[d], d);
    if (groups < 1) return nemo_cuda_error(NEMO_EINVAL, "%s: groups %lld", op, (long long)groups);
    return 0;
}

/* The shapes agree with each other (the front-end computed them). The gather kernels check
 * every input coordinate, so only these can read out of bounds. */
static int conv_fit(const char *op, const cgeom *g, int64_t wc, const int64_t *ys) {
    if (g->O % g->G != 0 || g->C % g->G != 0 || wc != g->Cg || ys[0] != g->N || ys[1] != g->O || g->Kvol < 1)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: input (%lld, %lld, ...), weight (%lld, %lld, ...) and output (%lld, %lld, "
                               "...) do not fit with %lld groups", op, (long long)g->N, (long long)g->C, (long long)g->O,
                               (long long)wc, (long long)ys[0], (long long)ys[1], (long long)g->G);
    return 0;
}

template <typename T>
static int conv_fwd_launch(const char *op, int dev, const cgeom *g, T *y, const T *x, const T *w, const T *b, int algo,
                           cudaStream_t st) {
    const int dt = sizeof(T) == 4 ? NEMO_F32 : NEMO_F64;
    double beta = 0.0;
    if (b) {   /* y starts as the bias; the products add into it */
        bias_fill_k<T><<<k_blocks(g->N * g->O * g->P), NEMO_CUDA_THREADS, 0, st>>>(y, b, g->N * g->O, g->O, g->P);
        NEMO_CUDA_LAUNCHED("%s: bias kernel launch on cuda:%d", op, dev);
        beta = 1.0;
    }
    if (g->N == 0 || g->P == 0 || g->O == 0) return 0;
    if (cgeom_direct(g, algo)) {
        for (int64_t n = 0; n < g->N; n++)
            for (int64_t gi = 0; gi < g->G; gi++)
                NEMO_CUDA_RC(nemo_cuda_gemm1(op, dev, dt, 0, 0, g->Og, g->P, g->Cg, 1.0, w + gi * g->Og * g->Kg, g->Kg,
                                             x + (n * g->C + gi * g->Cg) * g->S, g->P, beta,
                                             y + (n * g->O + gi * g->Og) * g->P, g->P));
        return 0;
    }
    const int64_t rows = col_rows(g);
    void *colv = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(T) * (size_t)(g->Kg * rows * g->OW), &colv));
    T *col = (T *)colv;
    for (int64_t n = 0; n < g->N; n++)
        for (int64_t gi = 0; gi < g->G; gi++) {
            const T *xs = x + (n * g->C + gi * g->Cg) * g->S;
            T *ys = y + (n * g->O + gi * g->Og) * g->P;
            for (int64_t r0 = 0; r0 < g->R; r0 += rows) {
                const int64_t r1 = std::min(r0 + rows, g->R), pc = (r1 - r0) * g->OW;
                vol2col_k<T><<<k_blocks(g->Kg * pc), NEMO_CUDA_THREADS, 0, st>>>(col, xs, *g, r0, pc);
                NEMO_CUDA_LAUNCHED("%s: vol2col kernel launch on cuda:%d", op, dev);
                NEMO_CUDA_RC(nemo_cuda_gemm1(op, dev, dt, 0, 0, g->Og, pc, g->Kg, 1.0, w + gi * g->Og * g->Kg, g->Kg,
                                             col, pc, beta, ys + r0 * g->OW, g->P));
            }
        }
    return 0;
}

static int conv_fwd_cuda(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b,
                         const int64_t *stride, const int64_t *pad, const int64_t *dil, int64_t groups, int algo) {
    static const char op[] = "conv";
    NEMO_CUDA_ENTER(op, x);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, x));
    NEMO_CUDA_RC(k_need(op, "output", y));
    NEMO_CUDA_RC(k_need(op, "weight", w));
    NEMO_CUDA_RC(conv_check5(op, "input", x, x));
    NEMO_CUDA_RC(conv_check5(op, "output", y, x));
    NEMO_CUDA_RC(conv_check5(op, "weight", w, x));
    NEMO_CUDA_RC(k_check(op, "bias", b, x, x->dtype));
    NEMO_CUDA_RC(conv_args(op, stride, pad, dil, groups));
    cgeom g;
    cgeom_init(&g, x->shape, w->shape, y->shape, stride, pad, dil, groups);
    NEMO_CUDA_RC(conv_fit(op, &g, w->shape[1], y->shape));
    if (b && nemo_cuda_numel(b) != g.O)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: bias has %lld values for %lld channels", op, (long long)nemo_cuda_numel(b),
                               (long long)g.O);
    cudaStream_t st = nemo_cuda_stream(x->devindex);
    if (x->dtype == NEMO_F32)
        NEMO_CUDA_RC(conv_fwd_launch<float>(op, x->devindex, &g, (float *)nemo_cuda_data(y),
                                            (const float *)nemo_cuda_data(x), (const float *)nemo_cuda_data(w),
                                            (const float *)k_data(b), algo, st));
    else
        NEMO_CUDA_RC(conv_fwd_launch<double>(op, x->devindex, &g, (double *)nemo_cuda_data(y),
                                             (const double *)nemo_cuda_data(x), (const double *)nemo_cuda_data(w),
                                             (const double *)k_data(b), algo, st));
    return 0;
}
NEMO_CUDA_KERNEL("conv_fwd", conv_fwd_cuda)

template <typename T>
static int conv_bwd_launch(const char *op, int dev, const cgeom *g, T *dx, T *dw, const T *gy, const T *x, const T *w,
                           int algo, cudaStream_t st) {
    const int dt = sizeof(T) == 4 ? NEMO_F32 : NEMO_F64;
    const int direct = cgeom_direct(g, algo);
    if (dw) NEMO_CUDA_TRY(cudaMemsetAsync(dw, 0, sizeof(T) * (size_t)(g->O * g->Kg), st), "%s: clearing dw", op);
    if (dx && (!direct || g->O == 0))
        NEMO_CUDA_TRY(cudaMemsetAsync(dx, 0, sizeof(T) * (size_t)(g->N * g->C * g->S), st), "%s: clearing dx", op);
    if ((!dx && !dw) || g->N == 0 || g->P == 0 || g->O == 0) return 0;
    if (direct) {
        for (int64_t n = 0; n < g->N; n++)
            for (int64_t gi = 0; gi < g->G; gi++) {
                const T *gs = gy + (n * g->O + gi * g->Og) * g->P;
                const int64_t xoff = (n * g->C + gi * g->Cg) * g->S;
                if (dw)   /* dW_g (Og x Cg) += dY (Og x P) X^T */
                    NEMO_CUDA_RC(nemo_cuda_gemm1(op, dev, dt, 0, 1, g->Og, g->Cg, g->P, 1.0, gs, g->P, x + xoff, g->P, 1.0,
                                                 dw + gi * g->Og * g->Kg, g->Kg));
                if (dx)   /* dX (Cg x P) = W_g^T dY */
                    NEMO_CUDA_RC(nemo_cuda_gemm1(op, dev, dt, 1, 0, g->Cg, g->P, g->Og, 1.0, w + gi * g->Og * g->Kg, g->Kg,
                                                 gs, g->P, 0.0, dx + xoff, g->P));
            }
        return 0;
    }
    const int64_t rows = col_rows(g);
    void *colv = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(T) * (size_t)(g->Kg * rows * g->OW), &colv));
    T *col = (T *)colv;
    for (int64_t n = 0; n < g->N; n++)
        for (int64_t gi = 0; gi < g->G; gi++) {
            const T *gs = gy + (n * g->O + gi * g->Og) * g->P;
            const int64_t xoff = (n * g->C + gi * g->Cg) * g->S;
            for (int64_t r0 = 0; r0 < g->R; r0 += rows) {
                const int64_t r1 = std::min(r0 + rows, g->R), pc = (r1 - r0) * g->OW;
                if (dw) {   /* dW_g (Og x Kg) += dY (Og x pc) col^T */
                    vol2col_k<T><<<k_blocks(g->Kg * pc), NEMO_CUDA_THREADS, 0, st>>>(col, x + xoff, *g, r0, pc);
                    NEMO_CUDA_LAUNCHED("%s: vol2col kernel launch on cuda:%d", op, dev);
                    NEMO_CUDA_RC(nemo_cuda_gemm1(op, dev, dt, 0, 1, g->Og, g->Kg, pc, 1.0, gs + r0 * g->OW, g->P, col, pc,
                                                 1.0, dw + gi * g->Og * g->Kg, g->Kg));
                }
                if (dx) {   /* dcol (Kg x pc) = W_g^T dY, then back onto dx */
                    NEMO_CUDA_RC(nemo_cuda_gemm1(op, dev, dt, 1, 0, g->Kg, pc, g->Og, 1.0, w + gi * g->Og * g->Kg, g->Kg,
                                                 gs + r0 * g->OW, g->P, 0.0, col, pc));
                    col2vol_k<T><<<k_blocks(g->Cg * g->S), NEMO_CUDA_THREADS, 0, st>>>(dx + xoff, col, *g, r0, r1, pc);
                    NEMO_CUDA_LAUNCHED("%s: col2vol kernel launch on cuda:%d", op, dev);
                }
            }
        }
    return 0;
}

static int conv_bwd_cuda(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *gy, const nemo_tensor *x,
                         const nemo_tensor *w, const int64_t *stride, const int64_t *pad, const int64_t *dil,
                         int64_t groups, int algo) {
    static const char op[] = "conv backward";
    NEMO_CUDA_ENTER(op, gy);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, gy));
    NEMO_CUDA_RC(conv_check5(op, "gradient", gy, gy));
    NEMO_CUDA_RC(conv_check5(op, "input gradient", dx, gy));
    NEMO_CUDA_RC(conv_check5(op, "weight gradient", dw, gy));
    NEMO_CUDA_RC(conv_check5(op, "input", x, gy));
    NEMO_CUDA_RC(conv_check5(op, "weight", w, gy));
    NEMO_CUDA_RC(k_check(op, "bias gradient", db, gy, gy->dtype));
    if (dw && !x) return nemo_cuda_error(NEMO_EINVAL, "%s: the weight gradient needs the input", op);
    if (dx && !w) return nemo_cuda_error(NEMO_EINVAL, "%s: the input gradient needs the weight", op);
    cudaStream_t st = nemo_cuda_stream(gy->devindex);
    const int dev = gy->devindex;
    if (db) {
        const int64_t N = gy->shape[0], O = gy->shape[1], P = gy->shape[2] * gy->shape[3] * gy->shape[4];
        if (nemo_cuda_numel(db) != O)
            return nemo_cuda_error(NEMO_ESHAPE, "%s: bias gradient has %lld values for %lld channels", op,
                                   (long long)nemo_cuda_numel(db), (long long)O);
        if (O > 0) {
            if (gy->dtype == NEMO_F32)
                conv_db_k<float><<<row_blocks(O, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
                    (float *)nemo_cuda_data(db), (const float *)nemo_cuda_data(gy), N, O, P);
            else
                conv_db_k<double><<<row_blocks(O, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
                    (double *)nemo_cuda_data(db), (const double *)nemo_cuda_data(gy), N, O, P);
            NEMO_CUDA_LAUNCHED("%s: bias gradient kernel launch on cuda:%d", op, dev);
        }
    }
    if (!dx && !dw) return 0;
    NEMO_CUDA_RC(conv_args(op, stride, pad, dil, groups));
    cgeom g;
    cgeom_init(&g, (dx ? dx : x)->shape, (dw ? dw : w)->shape, gy->shape, stride, pad, dil, groups);
    NEMO_CUDA_RC(conv_fit(op, &g, (dw ? dw : w)->shape[1], gy->shape));
    if (gy->dtype == NEMO_F32)
        NEMO_CUDA_RC(conv_bwd_launch<float>(op, dev, &g, (float *)k_data(dx), (float *)k_data(dw),
                                            (const float *)nemo_cuda_data(gy), (const float *)k_data(x),
                                            (const float *)k_data(w), algo, st));
    else
        NEMO_CUDA_RC(conv_bwd_launch<double>(op, dev, &g, (double *)k_data(dx), (double *)k_data(dw),
                                             (const double *)nemo_cuda_data(gy), (const double *)k_data(x),
                                             (const double *)k_data(w), algo, st));
    return 0;
}
NEMO_CUDA_KERNEL("conv_bwd", conv_bwd_cuda)

/* ==== Embedding ==== */

/* *first = the smallest position whose index is outside [0, V) (left at ULLONG_MAX if none). */
__global__ void index_check_k(unsigned long long *first, const int64_t *idx, int64_t n, int64_t V) {
    NEMO_CUDA_LOOP(i, n) {
        if (idx[i] < 0 || idx[i] >= V) atomicMin(first, (unsigned long long)i);
    }
}

/* Checks idx (n values) against [0, V) with flag (8 bytes of device scratch); a failure is
 * NEMO_EINVAL naming the first bad position and its value. Waits for the stream. */
static int check_indices(const char *op, int dev, const int64_t *idx, int64_t n, int64_t V, unsigned long long *flag,
                         cudaStream_t st) {
    if (n == 0) return 0;
    NEMO_CUDA_TRY(cudaMemsetAsync(flag, 0xff, sizeof *flag, st), "%s: index check", op);
    index_check_k<<<k_blocks(n), NEMO_CUDA_THREADS, 0, st>>>(flag, idx, n, V);
    NEMO_CUDA_LAUNCHED("%s: index check kernel launch on cuda:%d", op, dev);
    unsigned long long first = 0;
    NEMO_CUDA_TRY(cudaMemcpyAsync(&first, flag, sizeof first, cudaMemcpyDeviceToHost, st), "%s: index check copy", op);
    NEMO_CUDA_TRY(cudaStreamSynchronize(st), "%s: index check", op);
    if (first == ULLONG_MAX) return 0;
    int64_t bad = 0;
    NEMO_CUDA_TRY(cudaMemcpy(&bad, idx + first, sizeof bad, cudaMemcpyDeviceToHost), "%s: index check copy", op);
    return nemo_cuda_error(NEMO_EINVAL, "%s: index %lld (at flat position %llu of the indices) is out of range for a "
                           "weight with V = %lld rows (expected 0 <= index < %lld)", op, (long long)bad, first,
                           (long long)V, (long long)V);
}

template <typename U>
__global__ void embed_fwd_k(U *y, const U *w, const int64_t *idx, int64_t n, int64_t D) {
    NEMO_CUDA_LOOP(e, n * D) y[e] = w[idx[e / D] * D + e % D];
}

static int embedding_fwd_cuda(nemo_tensor *y, const nemo_tensor *idx, const nemo_tensor *w) {
    static const char op[] = "embedding";
    NEMO_CUDA_ENTER(op, w);
    NEMO_CUDA_RC(k_need(op, "output", y));
    NEMO_CUDA_RC(k_need(op, "indices", idx));
    NEMO_CUDA_RC(k_check(op, "output", y, w, w->dtype));
    NEMO_CUDA_RC(k_check(op, "indices", idx, w, NEMO_I64));
    if (w->ndim != 2) return nemo_cuda_error(NEMO_ESHAPE, "%s: weight has %d dims, expected 2", op, w->ndim);
    const int64_t n = nemo_cuda_numel(idx), V = w->shape[0], D = w->shape[1];
    if (nemo_cuda_numel(y) != n * D)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: output has %lld elements, expected %lld", op,
                               (long long)nemo_cuda_numel(y), (long long)(n * D));
    if (n == 0 || D == 0) return 0;
    const int dev = w->devindex;
    cudaStream_t st = nemo_cuda_stream(dev);
    void *flag = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(unsigned long long), &flag));
    const int64_t *ip = (const int64_t *)nemo_cuda_data(idx);
    NEMO_CUDA_RC(check_indices(op, dev, ip, n, V, (unsigned long long *)flag, st));
    unsigned nb = k_blocks(n * D);
    void *yp = nemo_cuda_data(y);
    const void *wp = nemo_cuda_data(w);
    switch (nemo_cuda_dtype_size(w->dtype)) {
    case 1: embed_fwd_k<uint8_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint8_t *)yp, (const uint8_t *)wp, ip, n, D); break;
    case 2: embed_fwd_k<uint16_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint16_t *)yp, (const uint16_t *)wp, ip, n, D); break;
    case 4: embed_fwd_k<uint32_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint32_t *)yp, (const uint32_t *)wp, ip, n, D); break;
    default: embed_fwd_k<uint64_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint64_t *)yp, (const uint64_t *)wp, ip, n, D); break;
    }
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld rows of %lld)", op, dev, (long long)n, (long long)D);
    return 0;
}
NEMO_CUDA_KERNEL("embedding_fwd", embedding_fwd_cuda)

__global__ void iota_k(int64_t *p, int64_t n) {
    NEMO_CUDA_LOOP(i, n) p[i] = i;
}
/* start[v] = the first k with keys[k] >= v, for v <= V (keys sorted). */
__global__ void seg_starts_k(int64_t *start, const unsigned long long *keys, int64_t n, int64_t V) {
    NEMO_CUDA_LOOP(v, V + 1) {
        int64_t lo = 0, hi = n;
        while (lo < hi) {
            int64_t mid = lo + (hi - lo) / 2;
            if (keys[mid] < (unsigned long long)v) lo = mid + 1;
            else hi = mid;
        }
        start[v] = lo;
    }
}
/* dw[v, c] = sum over k in [start[v], start[v+1]) of g[pos[k], c], from zero, in order. */
template <typename T>
__global__ void embed_bwd_k(T *dw, const T *g, const int64_t *pos, const int64_t *start, int64_t V, int64_t D,
                            int64_t padding_idx) {
    NEMO_CUDA_LOOP(e, V * D) {
        const int64_t v = e / D, c = e % D;
        T acc = (T)0;
        if (v != padding_idx)
            for (int64_t k = start[v]; k < start[v + 1]; k++) acc = rn_add(acc, g[pos[k] * D + c]);
        dw[e] = acc;
    }
}

static int embedding_bwd_cuda(nemo_tensor *dw, const nemo_tensor *g, const nemo_tensor *idx, int64_t padding_idx) {
    static const char op[] = "embedding backward";
    NEMO_CUDA_ENTER(op, dw);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, dw));
    NEMO_CUDA_RC(k_need(op, "gradient", g));
    NEMO_CUDA_RC(k_need(op, "indices", idx));
    NEMO_CUDA_RC(k_check(op, "gradient", g, dw, dw->dtype));
    NEMO_CUDA_RC(k_check(op, "indices", idx, dw, NEMO_I64));
    if (dw->ndim != 2) return nemo_cuda_error(NEMO_ESHAPE, "%s: weight gradient has %d dims, expected 2", op, dw->ndim);
    const int64_t n = nemo_cuda_numel(idx), V = dw->shape[0], D = dw->shape[1];
    if (nemo_cuda_numel(g) != n * D)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: gradient has %lld elements, expected %lld", op,
                               (long long)nemo_cuda_numel(g), (long long)(n * D));
    if (n > INT_MAX) return nemo_cuda_error(NEMO_ESHAPE, "%s: %lld indices, at most %d", op, (long long)n, INT_MAX);
    if (V * D == 0) return 0;
    const int dev = dw->devindex;
    cudaStream_t st = nemo_cuda_stream(dev);
    const unsigned long long *keys = (const unsigned long long *)nemo_cuda_data(idx);
    int end_bit = 1;
    while (end_bit < 63 && ((int64_t)1 << end_bit) < V) end_bit++;
    size_t temp_bytes = 0;
    if (n > 0)
        NEMO_CUDA_TRY(cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, keys, (unsigned long long *)NULL,
                                                      (const int64_t *)NULL, (int64_t *)NULL, (int)n, 0, end_bit, st),
                      "%s: sizing the index sort", op);
    k_carve cv = {NULL, 0};
    k_take(&cv, sizeof(unsigned long long));
    k_take(&cv, sizeof(unsigned long long) * (size_t)n);
    k_take(&cv, sizeof(int64_t) * (size_t)n);
    k_take(&cv, sizeof(int64_t) * (size_t)n);
    k_take(&cv, sizeof(int64_t) * (size_t)(V + 1));
    k_take(&cv, temp_bytes);
    void *base = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, cv.off, &base));
    cv.base = (char *)base;
    cv.off = 0;
    unsigned long long *flag = (unsigned long long *)k_take(&cv, sizeof(unsigned long long));
    unsigned long long *sorted = (unsigned long long *)k_take(&cv, sizeof(unsigned long long) * (size_t)n);
    int64_t *pos_in = (int64_t *)k_take(&cv, sizeof(int64_t) * (size_t)n);
    int64_t *pos = (int64_t *)k_take(&cv, sizeof(int64_t) * (size_t)n);
    int64_t *start = (int64_t *)k_take(&cv, sizeof(int64_t) * (size_t)(V + 1));
    void *temp = k_take(&cv, temp_bytes);
    NEMO_CUDA_RC(check_indices(op, dev, (const int64_t *)keys, n, V, flag, st));
    if (n > 0) {
        iota_k<<<k_blocks(n), NEMO_CUDA_THREADS, 0, st>>>(pos_in, n);
        NEMO_CUDA_LAUNCHED("%s: iota kernel launch on cuda:%d", op, dev);
        NEMO_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, sorted, (const int64_t *)pos_in, pos, (int)n,
                                                      0, end_bit, st),
                      "%s: sorting the indices", op);
    }
    seg_starts_k<<<k_blocks(V + 1), NEMO_CUDA_THREADS, 0, st>>>(start, sorted, n, V);
    if (dw->dtype == NEMO_F32)
        embed_bwd_k<float><<<k_blocks(V * D), NEMO_CUDA_THREADS, 0, st>>>(
            (float *)nemo_cuda_data(dw), (const float *)nemo_cuda_data(g), pos, start, V, D, padding_idx);
    else
        embed_bwd_k<double><<<k_blocks(V * D), NEMO_CUDA_THREADS, 0, st>>>(
            (double *)nemo_cuda_data(dw), (const double *)nemo_cuda_data(g), pos, start, V, D, padding_idx);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld indices, V %lld, D %lld)", op, dev, (long long)n,
                       (long long)V, (long long)D);
    return 0;
}
NEMO_CUDA_KERNEL("embedding_bwd", embedding_bwd_cuda)

/* ==== Nearest interpolation ==== */

struct interp_t {
    int64_t in[5], out[5];
    double scale[3];
    int mode;
};

/* PyTorch's source index (kernels/cpu/conv.c nearest_src), with the same float operations. */
__device__ __forceinline__ int64_t nearest_src_d(int64_t i, int64_t in, int64_t out, double user_scale, int mode) {
    if (mode == NEMO_INTERP_NEAREST) {
        if (out == in) return i;
        if (out == 2 * in) return i >> 1;
    }
    const float s = user_scale > 0 ? (float)__ddiv_rn(1.0, user_scale) : __fdiv_rn((float)in, (float)out);
    const int64_t k = mode == NEMO_INTERP_NEAREST
                          ? (int64_t)floorf(__fmul_rn((float)i, s))
                          : (int64_t)floorf((float)__dmul_rn(__dadd_rn((double)i, 0.5), (double)s));
    return k < in - 1 ? k : in - 1;
}
/* The first output index of dim d whose source is >= k (the map is non-decreasing). */
__device__ __forceinline__ int64_t first_out(const interp_t &P, int d, int64_t k) {
    int64_t lo = 0, hi = P.out[2 + d];
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (nearest_src_d(mid, P.in[2 + d], P.out[2 + d], P.scale[d], P.mode) < k) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

template <typename U>
__global__ void interp_fwd_k(U *y, const U *x, interp_t P, int64_t total) {
    NEMO_CUDA_LOOP(e, total) {
        const int64_t ow = e % P.out[4], oh = (e / P.out[4]) % P.out[3], od = (e / (P.out[4] * P.out[3])) % P.out[2];
        const int64_t nc = e / (P.out[4] * P.out[3] * P.out[2]);
        const int64_t id = nearest_src_d(od, P.in[2], P.out[2], P.scale[0], P.mode);
        const int64_t ih = nearest_src_d(oh, P.in[3], P.out[3], P.scale[1], P.mode);
        const int64_t iw = nearest_src_d(ow, P.in[4], P.out[4], P.scale[2], P.mode);
        y[e] = x[((nc * P.in[2] + id) * P.in[3] + ih) * P.in[4] + iw];
    }
}

template <typename T>
__global__ void interp_bwd_k(T *dx, const T *g, interp_t P, int64_t total) {
    NEMO_CUDA_LOOP(e, total) {
        const int64_t iw = e % P.in[4], ih = (e / P.in[4]) % P.in[3], id = (e / (P.in[4] * P.in[3])) % P.in[2];
        const int64_t nc = e / (P.in[4] * P.in[3] * P.in[2]);
        const int64_t d0 = first_out(P, 0, id), d1 = first_out(P, 0, id + 1);
        const int64_t h0 = first_out(P, 1, ih), h1 = first_out(P, 1, ih + 1);
        const int64_t w0 = first_out(P, 2, iw), w1 = first_out(P, 2, iw + 1);
        T acc = (T)0;
        for (int64_t od = d0; od < d1; od++)
            for (int64_t oh = h0; oh < h1; oh++) {
                const T *grow = g + ((nc * P.out[2] + od) * P.out[3] + oh) * P.out[4];
                for (int64_t ow = w0; ow < w1; ow++) acc = rn_add(acc, grow[ow]);
            }
        dx[e] = acc;
    }
}

static int interp_setup(const char *op, interp_t *P, const nemo_tensor *in, const nemo_tensor *out,
                        const double *scales, int mode) {
    memset(P, 0, sizeof *P);
    if (in->ndim != 5 || out->ndim != 5)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: expected 5-D tensors, got %d and %d dims", op, in->ndim, out->ndim);
    if (mode != NEMO_INTERP_NEAREST && mode != NEMO_INTERP_NEAREST_EXACT)
        return nemo_cuda_error(NEMO_EINVAL, "%s: unknown mode %d", op, mode);
    if (!scales) return nemo_cuda_error(NEMO_EINVAL, "%s: no scales array", op);
    for (int d = 0; d < 5; d++) { P->in[d] = in->shape[d]; P->out[d] = out->shape[d]; }
    if (P->in[0] != P->out[0] || P->in[1] != P->out[1])
        return nemo_cuda_error(NEMO_ESHAPE, "%s: batch and channel dims differ", op);
    for (int d = 0; d < 3; d++) {
        if (P->in[2 + d] <= 0 || P->out[2 + d] <= 0)
            return nemo_cuda_error(NEMO_ESHAPE, "%s: empty spatial dim %d", op, d);
        P->scale[d] = scales[d];
    }
    P->mode = mode;
    return 0;
}

static int interp_fwd_cuda(nemo_tensor *y, const nemo_tensor *x, const double *scales, int mode) {
    static const char op[] = "interpolate";
    NEMO_CUDA_ENTER(op, y);
    NEMO_CUDA_RC(k_need(op, "input", x));
    NEMO_CUDA_RC(k_check(op, "input", x, y, y->dtype));
    interp_t P;
    NEMO_CUDA_RC(interp_setup(op, &P, x, y, scales, mode));
    const int64_t total = nemo_cuda_numel(y);
    if (total == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(y->devindex);
    unsigned nb = k_blocks(total);
    void *yp = nemo_cuda_data(y);
    const void *xp = nemo_cuda_data(x);
    switch (nemo_cuda_dtype_size(y->dtype)) {
    case 1: interp_fwd_k<uint8_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint8_t *)yp, (const uint8_t *)xp, P, total); break;
    case 2: interp_fwd_k<uint16_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint16_t *)yp, (const uint16_t *)xp, P, total); break;
    case 4: interp_fwd_k<uint32_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint32_t *)yp, (const uint32_t *)xp, P, total); break;
    default: interp_fwd_k<uint64_t><<<nb, NEMO_CUDA_THREADS, 0, st>>>((uint64_t *)yp, (const uint64_t *)xp, P, total); break;
    }
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, y->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL("interp_nearest_fwd", interp_fwd_cuda)

static int interp_bwd_cuda(nemo_tensor *dx, const nemo_tensor *g, const double *scales, int mode) {
    static const char op[] = "interpolate backward";
    NEMO_CUDA_ENTER(op, dx);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, dx));
    NEMO_CUDA_RC(k_need(op, "gradient", g));
    NEMO_CUDA_RC(k_check(op, "gradient", g, dx, dx->dtype));
    interp_t P;
    NEMO_CUDA_RC(interp_setup(op, &P, dx, g, scales, mode));
    const int64_t total = nemo_cuda_numel(dx);
    if (total == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(dx->devindex);
    if (dx->dtype == NEMO_F32)
        interp_bwd_k<float><<<k_blocks(total), NEMO_CUDA_THREADS, 0, st>>>(
            (float *)nemo_cuda_data(dx), (const float *)nemo_cuda_data(g), P, total);
    else
        interp_bwd_k<double><<<k_blocks(total), NEMO_CUDA_THREADS, 0, st>>>(
            (double *)nemo_cuda_data(dx), (const double *)nemo_cuda_data(g), P, total);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, dx->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL("interp_nearest_bwd", interp_bwd_cuda)
