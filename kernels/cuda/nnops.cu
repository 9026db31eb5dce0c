/*
 * kernels/cuda/nnops.cu: the CUDA kernels of the normalisation family, with the signatures and
 * formulas of kernels/cpu/nnops.c (front-end: engine/ops/nnops.c):
 *
 *   "norm_rows"           int (y, mean, rstd, x, w, b, rows, n, eps, center)
 *   "norm_rows_backward"  int (dx, dw, db, g, x, mean, rstd, w, rows, n)
 *       layer_norm (center = 1) and rms_norm (center = 0) over rows of n elements. With float32
 *       statistics x, y, g and dx may each be float32, bfloat16 or float16 (rows are read and
 *       written in their own dtype, computed in float32); with float64 statistics all are
 *       float64. mean, rstd (rows) and w, b, dw, db (n) are in the compute dtype; any of mean,
 *       rstd, w, b, dx, dw, db may be NULL (rstd is required by the backward).
 *   "group_norm"          int (y, mean, rstd, x, w, b, N, C, HW, G, eps)
 *   "group_norm_backward" int (dx, dw, db, g, x, mean, rstd, w, N, C, HW, G)
 *       x, y, g, dx (N, C, HW), mean / rstd (N, G), w / b / dw / db (C): dense, compute dtype.
 *
 * Every tensor is dense on one CUDA device. Each launcher returns 0 or a negative status with
 * the plugin's error text, runs on the device's stream and does not synchronize.
 *
 * Non-obvious rules
 * - Each value is formed with the CPU's operations in the CPU's order (products and sums of
 *   the compute dtype, rn_* so nothing is fused): mean = (T)sum / n, var = (T)sum((x - mean)^2)
 *   / n, rstd = 1 / (T)sqrt(var + eps), y = (x - mean) * rstd * w + b. Only the sums differ:
 *   here every lane accumulates in double and a fixed shuffle tree combines the lanes, where
 *   the CPU adds vector lanes in float inside 4096-element blocks. So results agree to
 *   rounding, not bit for bit, and do not depend on timing.
 * - A row is handled by a warp (n < 1024) or a 256-thread block (see ROW_TASKS in util.cuh);
 *   the rows are read three times (sum, squared deviations, output), from L2 after the first.
 * - Parameter gradients (dw, db) are column sums over rows: rows are cut into nk chunks (nk a
 *   function of rows and n only), one thread per (chunk, column) adds its rows in order in
 *   double, and a second kernel adds the chunk partials in chunk order. group_norm's
 *   statistics and gradients use the same scheme over segments and (sample, channel) planes.
 *   Partials live in the plugin's scratch buffer. No atomics anywhere.
 */
#include <algorithm>
#include "util.cuh"

/* ==== norm_rows: layer_norm / rms_norm forward ==== */

template <typename T, int G>
__global__ void norm_rows_fwd_k(void *y, int ydt, T *M, T *R, const void *x, int xdt, const T *W, const T *B,
                                int64_t rows, int64_t n, T eps, int center) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    const T tn = (T)n;
    ROW_TASKS(r, rows, G) {
        const bool ok = r < rows;
        const int64_t base = (ok ? r : 0) * n;
        T mu = (T)0;
        if (center) {
            double s = 0.0;
            if (ok) for (int64_t i = lane; i < n; i += G) s = __dadd_rn(s, (double)ld_as<T>(x, base + i, xdt));
            s = group_sum<G>(s, sm);
            mu = (T)s / tn;
        }
        double v = 0.0;
        if (ok)
            for (int64_t i = lane; i < n; i += G) {
                T d = rn_sub(ld_as<T>(x, base + i, xdt), mu);
                v = __dadd_rn(v, (double)rn_mul(d, d));
            }
        v = group_sum<G>(v, sm);
        const T var = (T)v / tn;
        const T rs = (T)1 / (T)sqrt((double)rn_add(var, eps));
        if (ok) {
            for (int64_t i = lane; i < n; i += G) {
                T xv = ld_as<T>(x, base + i, xdt), w = W ? W[i] : (T)1, yv;
                if (center) yv = rn_add(rn_mul(rn_mul(rn_sub(xv, mu), rs), w), B ? B[i] : (T)0);
                else yv = rn_mul(rn_mul(xv, rs), w);
                st_as<T>(y, base + i, ydt, yv);
            }
            if (lane == 0) {
                if (M) M[r] = mu;
                if (R) R[r] = rs;
            }
        }
    }
}

/* ==== norm_rows_backward ==== */

/* dx = r*(g*w - a - xh*cc), xh = (x - mu)*r, a = mean(g*w) (0 without centring),
 * cc = mean(g*w*xh)... formed as the CPU does: a = (T)sum(g*w) / n, cc = (T)sum(g*w*(x-mu)) * r / n. */
template <typename T, int G>
__global__ void norm_rows_dx_k(void *dx, int dxdt, const void *g, int gdt, const void *x, int xdt, const T *M,
                               const T *R, const T *W, int64_t rows, int64_t n) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    const T tn = (T)n;
    ROW_TASKS(r, rows, G) {
        const bool ok = r < rows;
        const int64_t base = (ok ? r : 0) * n;
        const T mu = (ok && M) ? M[r] : (T)0, rs = ok ? R[r] : (T)0;
        double s1 = 0.0, s2 = 0.0;
        if (ok)
            for (int64_t i = lane; i < n; i += G) {
                T gw = rn_mul(ld_as<T>(g, base + i, gdt), W ? W[i] : (T)1), xv = ld_as<T>(x, base + i, xdt);
                if (M) {
                    s1 = __dadd_rn(s1, (double)gw);
                    s2 = __dadd_rn(s2, (double)rn_mul(gw, rn_sub(xv, mu)));
                } else {
                    s2 = __dadd_rn(s2, (double)rn_mul(gw, xv));
                }
            }
        if (M) s1 = group_sum<G>(s1, sm);
        s2 = group_sum<G>(s2, sm);
        const T a = (T)s1 / tn, cc = rn_mul((T)s2, rs) / tn;
        if (ok)
            for (int64_t i = lane; i < n; i += G) {
                T gv = ld_as<T>(g, base + i, gdt), xv = ld_as<T>(x, base + i, xdt), w = W ? W[i] : (T)1;
                T xh = rn_mul(rn_sub(xv, mu), rs);
                T t = rn_sub(rn_sub(rn_mul(gv, w), a), rn_mul(xh, cc));
                st_as<T>(dx, base + i, dxdt, rn_mul(rs, t));
            }
    }
}

/* part[(2c)*n + i] = sum over rows of chunk c of g*xh, part[(2c+1)*n + i] = sum of g. */
template <typename T>
__global__ void norm_rows_param_part_k(double *part, const void *g, int gdt, const void *x, int xdt, const T *M,
                                       const T *R, int64_t rows, int64_t n, int64_t nk, int64_t chunk) {
    NEMO_CUDA_LOOP(t, nk * n) {
        const int64_t i = t % n, c = t / n, r0 = c * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
        double sw = 0.0, sb = 0.0;
        for (int64_t r = r0; r < r1; r++) {
            T gv = ld_as<T>(g, r * n + i, gdt);
            T xh = rn_mul(rn_sub(ld_as<T>(x, r * n + i, xdt), M ? M[r] : (T)0), R[r]);
            sw = __dadd_rn(sw, (double)rn_mul(gv, xh));
            sb = __dadd_rn(sb, (double)gv);
        }
        part[2 * c * n + i] = sw;
        part[(2 * c + 1) * n + i] = sb;
    }
}
template <typename T>
__global__ void norm_rows_param_fold_k(T *DW, T *DB, const double *part, int64_t n, int64_t nk) {
    NEMO_CUDA_LOOP(i, n) {
        double sw = 0.0, sb = 0.0;
        for (int64_t c = 0; c < nk; c++) {
            sw = __dadd_rn(sw, part[2 * c * n + i]);
            sb = __dadd_rn(sb, part[(2 * c + 1) * n + i]);
        }
        if (DW) DW[i] = (T)sw;
        if (DB) DB[i] = (T)sb;
    }
}

/* ==== group_norm ==== */

/* part[s*nk + c] = sum over chunk c of segment s (len elements at x + s*len) of x, or of
 * (x - mean[s])^2 when mean is given. One block per (segment, chunk). */
template <typename T>
__global__ void seg_part_k(double *part, const T *x, const T *mean, int64_t nseg, int64_t len, int64_t nk,
                           int64_t chunk) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    ROW_TASKS(t, nseg * nk, NEMO_CUDA_THREADS) {
        const bool ok = t < nseg * nk;
        double v = 0.0;
        if (ok) {
            const int64_t s = t / nk, c = t % nk, i0 = c * chunk, i1 = i0 + chunk < len ? i0 + chunk : len;
            const T *xs = x + s * len;
            if (mean) {
                const T mu = mean[s];
                for (int64_t i = i0 + threadIdx.x; i < i1; i += NEMO_CUDA_THREADS) {
                    T d = rn_sub(xs[i], mu);
                    v = __dadd_rn(v, (double)rn_mul(d, d));
                }
            } else {
                for (int64_t i = i0 + threadIdx.x; i < i1; i += NEMO_CUDA_THREADS) v = __dadd_rn(v, (double)xs[i]);
            }
        }
        v = nemo_cuda_group_reduce<NEMO_CUDA_THREADS>(v, AddF64(), sm);
        if (ok && threadIdx.x == 0) part[t] = v;
    }
}
/* Per segment: the chunk partials in order; then mean (stage 0) or rstd (stage 1) as the CPU. */
template <typename T>
__global__ void seg_stat_k(T *M, T *R, const double *part, int64_t nseg, int64_t len, int64_t nk, double eps,
                           int stage) {
    NEMO_CUDA_LOOP(s, nseg) {
        double v = 0.0;
        for (int64_t c = 0; c < nk; c++) v = __dadd_rn(v, part[s * nk + c]);
        if (stage == 0) M[s] = (T)v / (T)len;
        else R[s] = (T)1 / (T)sqrt((double)rn_add((T)v / (T)len, (T)eps));
    }
}
/* y = (x - mean) * rstd * w[c] + b[c] elementwise. */
template <typename T>
__global__ void group_norm_out_k(T *y, const T *x, const T *M, const T *R, const T *W, const T *B, int64_t total,
                                 int64_t C, int64_t HW, int64_t G) {
    const int64_t D = C / G;
    NEMO_CUDA_LOOP(i, total) {
        const int64_t nc = i / HW, c = nc % C, s = (nc / C) * G + c / D;
        const T w = W ? W[c] : (T)1, b = B ? B[c] : (T)0;
        y[i] = rn_add(rn_mul(rn_mul(rn_sub(x[i], M[s]), R[s]), w), b);
    }
}

/* tab[2*(n*C + c)] = sum over the plane (n, c) of g, tab[... + 1] = sum of g*(x - mean). One
 * block per plane. */
template <typename T>
__global__ void gn_plane_k(double *tab, const T *g, const T *x, const T *M, int64_t NC, int64_t C, int64_t HW,
                           int64_t G) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    const int64_t D = C / G;
    ROW_TASKS(p, NC, NEMO_CUDA_THREADS) {
        const bool ok = p < NC;
        double a = 0.0, b = 0.0;
        if (ok) {
            const int64_t n = p / C, c = p % C;
            const T mu = M[n * G + c / D];
            const T *gp = g + p * HW, *xp = x + p * HW;
            for (int64_t i = threadIdx.x; i < HW; i += NEMO_CUDA_THREADS) {
                a = __dadd_rn(a, (double)gp[i]);
                b = __dadd_rn(b, (double)rn_mul(gp[i], rn_sub(xp[i], mu)));
            }
        }
        a = nemo_cuda_group_reduce<NEMO_CUDA_THREADS>(a, AddF64(), sm);
        b = nemo_cuda_group_reduce<NEMO_CUDA_THREADS>(b, AddF64(), sm);
        if (ok && threadIdx.x == 0) { tab[2 * p] = a; tab[2 * p + 1] = b; }
    }
}
/* Per segment s = (n, group): ma = sum_d w*a / len, mc = sum_d w*b * rstd / len (double, in d
 * order), as the CPU forms them. */
template <typename T>
__global__ void gn_coef_k(T *coef, const double *tab, const T *R, const T *W, int64_t nseg, int64_t C, int64_t HW,
                          int64_t G) {
    const int64_t D = C / G, len = D * HW;
    NEMO_CUDA_LOOP(s, nseg) {
        const int64_t n = s / G, c0 = (s % G) * D;
        double sa = 0.0, sb = 0.0;
        for (int64_t d = 0; d < D; d++) {
            const double wc = W ? (double)W[c0 + d] : 1.0;
            sa = __dadd_rn(sa, __dmul_rn(wc, tab[2 * (n * C + c0 + d)]));
            sb = __dadd_rn(sb, __dmul_rn(wc, tab[2 * (n * C + c0 + d) + 1]));
        }
        coef[2 * s] = (T)(sa / (double)len);
        coef[2 * s + 1] = (T)(__dmul_rn(sb, (double)R[s]) / (double)len);
    }
}
/* dx = r*(g*w - ma - xh*mc), xh = (x - mean)*r. */
template <typename T>
__global__ void gn_dx_k(T *dx, const T *g, const T *x, const T *M, const T *R, const T *W, const T *coef,
                        int64_t total, int64_t C, int64_t HW, int64_t G) {
    const int64_t D = C / G;
    NEMO_CUDA_LOOP(i, total) {
        const int64_t nc = i / HW, c = nc % C, s = (nc / C) * G + c / D;
        const T rs = R[s], w = W ? W[c] : (T)1;
        const T xh = rn_mul(rn_sub(x[i], M[s]), rs);
        dx[i] = rn_mul(rs, rn_sub(rn_sub(rn_mul(g[i], w), coef[2 * s]), rn_mul(xh, coef[2 * s + 1])));
    }
}
/* dw[c] = sum_n tab_b(n, c) * rstd(n, c / D), db[c] = sum_n tab_a(n, c), n in order. */
template <typename T>
__global__ void gn_param_k(T *DW, T *DB, const double *tab, const T *R, int64_t N, int64_t C, int64_t G) {
    const int64_t D = C / G;
    NEMO_CUDA_LOOP(c, C) {
        double sw = 0.0, sb = 0.0;
        for (int64_t n = 0; n < N; n++) {
            sw = __dadd_rn(sw, __dmul_rn(tab[2 * (n * C + c) + 1], (double)R[n * G + c / D]));
            sb = __dadd_rn(sb, tab[2 * (n * C + c)]);
        }
        if (DW) DW[c] = (T)sw;
        if (DB) DB[c] = (T)sb;
    }
}

/* ==== launchers ==== */

static int half_family(int dt) { return dt == NEMO_F32 || dt == NEMO_BF16 || dt == NEMO_F16; }

/* A row tensor (x, y, g, dx): float64 with float64 statistics, else float32 / bf16 / f16, and
 * at least count elements. */
static int check_rows_t(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int cdt,
                        int64_t count) {
    if (!t) return 0;
    NEMO_CUDA_RC(k_check(op, what, t, ref, -1));
    if (cdt == NEMO_F64 ? t->dtype != NEMO_F64 : !half_family(t->dtype))
        return nemo_cuda_error(NEMO_EDTYPE, "%s: %s is %s, expected %s with %s statistics", op, what,
                               nemo_cuda_dtype_name(t->dtype), cdt == NEMO_F64 ? "float64" : "float32, bfloat16 or float16",
                               nemo_cuda_dtype_name(cdt));
    if (nemo_cuda_numel(t) < count)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: %s has %lld elements, expected %lld", op, what,
                               (long long)nemo_cuda_numel(t), (long long)count);
    return 0;
}
/* A compute-dtype vector (statistics, parameters) of at least count elements. */
static int check_vec(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int cdt,
                     int64_t count) {
    if (!t) return 0;
    NEMO_CUDA_RC(k_check(op, what, t, ref, cdt));
    if (nemo_cuda_numel(t) < count)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: %s has %lld elements, expected %lld", op, what,
                               (long long)nemo_cuda_numel(t), (long long)count);
    return 0;
}

template <typename T>
static void norm_rows_fwd_launch(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                                 const nemo_tensor *w, const nemo_tensor *b, int64_t rows, int64_t n, double eps,
                                 int center, cudaStream_t st) {
    T *M = (T *)k_data(mean), *R = (T *)k_data(rstd);
    const T *W = (const T *)k_data(w), *B = (const T *)k_data(b);
    if (row_group(n) == 32)
        norm_rows_fwd_k<T, 32><<<row_blocks(rows, 32), NEMO_CUDA_THREADS, 0, st>>>(
            nemo_cuda_data(y), y->dtype, M, R, nemo_cuda_data(x), x->dtype, W, B, rows, n, (T)eps, center);
    else
        norm_rows_fwd_k<T, NEMO_CUDA_THREADS><<<row_blocks(rows, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
            nemo_cuda_data(y), y->dtype, M, R, nemo_cuda_data(x), x->dtype, W, B, rows, n, (T)eps, center);
}

static int norm_rows_cuda(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                          const nemo_tensor *w, const nemo_tensor *b, int64_t rows, int64_t n, double eps, int center) {
    static const char op[] = "layer_norm";
    NEMO_CUDA_ENTER(op, x);
    NEMO_CUDA_RC(k_need(op, "output", y));
    NEMO_CUDA_RC(k_sizes(op, rows, n, 0));
    const int cdt = x->dtype == NEMO_F64 ? NEMO_F64 : NEMO_F32;
    NEMO_CUDA_RC(check_rows_t(op, "input", x, x, cdt, rows * n));
    NEMO_CUDA_RC(check_rows_t(op, "output", y, x, cdt, rows * n));
    NEMO_CUDA_RC(check_vec(op, "weight", w, x, cdt, n));
    NEMO_CUDA_RC(check_vec(op, "bias", b, x, cdt, n));
    NEMO_CUDA_RC(check_vec(op, "mean", mean, x, cdt, rows));
    NEMO_CUDA_RC(check_vec(op, "rstd", rstd, x, cdt, rows));
    if (rows == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(x->devindex);
    if (cdt == NEMO_F64) norm_rows_fwd_launch<double>(y, mean, rstd, x, w, b, rows, n, eps, center, st);
    else norm_rows_fwd_launch<float>(y, mean, rstd, x, w, b, rows, n, eps, center, st);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld rows of %lld)", op, x->devindex, (long long)rows,
                       (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL("norm_rows", norm_rows_cuda)

/* Chunks of rows for the parameter sums: about 256K threads, at least 16 rows per chunk. */
static void param_chunks(int64_t rows, int64_t n, int64_t *nk, int64_t *chunk) {
    int64_t k = 1;
    if (n < 262144) k = k_clamp(std::min(k_cdiv(262144, n > 0 ? n : 1), rows / 16), 1, 1024);
    *chunk = rows > 0 ? k_cdiv(rows, k) : 1;
    *nk = rows > 0 ? k_cdiv(rows, *chunk) : 1;
}

template <typename T>
static int norm_rows_bwd_launch(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                const nemo_tensor *w, int64_t rows, int64_t n, cudaStream_t st) {
    const T *M = (const T *)k_data(mean), *R = (const T *)k_data(rstd), *W = (const T *)k_data(w);
    if (dx) {
        if (row_group(n) == 32)
            norm_rows_dx_k<T, 32><<<row_blocks(rows, 32), NEMO_CUDA_THREADS, 0, st>>>(
                nemo_cuda_data(dx), dx->dtype, nemo_cuda_data(g), g->dtype, nemo_cuda_data(x), x->dtype, M, R, W, rows, n);
        else
            norm_rows_dx_k<T, NEMO_CUDA_THREADS><<<row_blocks(rows, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
                nemo_cuda_data(dx), dx->dtype, nemo_cuda_data(g), g->dtype, nemo_cuda_data(x), x->dtype, M, R, W, rows, n);
    }
    if (dw || db) {
        int64_t nk, chunk;
        param_chunks(rows, n, &nk, &chunk);
        void *part = NULL;
        NEMO_CUDA_RC(nemo_cuda_scratch(x->devindex, sizeof(double) * (size_t)(2 * nk * n), &part));
        norm_rows_param_part_k<T><<<k_blocks(nk * n), NEMO_CUDA_THREADS, 0, st>>>(
            (double *)part, nemo_cuda_data(g), g->dtype, nemo_cuda_data(x), x->dtype, M, R, rows, n, nk, chunk);
        norm_rows_param_fold_k<T><<<k_blocks(n), NEMO_CUDA_THREADS, 0, st>>>((T *)k_data(dw), (T *)k_data(db),
                                                                             (const double *)part, n, nk);
    }
    return 0;
}

static int norm_rows_backward_cuda(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                   const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                   const nemo_tensor *w, int64_t rows, int64_t n) {
    static const char op[] = "layer_norm backward";
    NEMO_CUDA_ENTER(op, x);
    NEMO_CUDA_RC(k_need(op, "gradient", g));
    NEMO_CUDA_RC(k_need(op, "rstd", rstd));
    NEMO_CUDA_RC(k_sizes(op, rows, n, 0));
    const int cdt = rstd->dtype == NEMO_F64 ? NEMO_F64 : NEMO_F32;
    NEMO_CUDA_RC(check_vec(op, "rstd", rstd, x, cdt, rows));
    NEMO_CUDA_RC(check_vec(op, "mean", mean, x, cdt, rows));
    NEMO_CUDA_RC(check_rows_t(op, "input", x, x, cdt, rows * n));
    NEMO_CUDA_RC(check_rows_t(op, "gradient", g, x, cdt, rows * n));
    NEMO_CUDA_RC(check_rows_t(op, "input gradient", dx, x, cdt, rows * n));
    NEMO_CUDA_RC(check_vec(op, "weight", w, x, cdt, n));
    NEMO_CUDA_RC(check_vec(op, "weight gradient", dw, x, cdt, n));
    NEMO_CUDA_RC(check_vec(op, "bias gradient", db, x, cdt, n));
    if (rows == 0 || n == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(x->devindex);
    if (cdt == NEMO_F64) NEMO_CUDA_RC(norm_rows_bwd_launch<double>(dx, dw, db, g, x, mean, rstd, w, rows, n, st));
    else NEMO_CUDA_RC(norm_rows_bwd_launch<float>(dx, dw, db, g, x, mean, rstd, w, rows, n, st));
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld rows of %lld)", op, x->devindex, (long long)rows,
                       (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL("norm_rows_backward", norm_rows_backward_cuda)

/* group_norm: checks shared by forward and backward. */
static int gn_check(const char *op, const nemo_tensor *x, int64_t N, int64_t C, int64_t HW, int64_t G) {
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, x));
    NEMO_CUDA_RC(k_sizes(op, N, C, HW));
    if (G < 1 || C % G != 0)
        return nemo_cuda_error(NEMO_EINVAL, "%s: %lld channels in %lld groups", op, (long long)C, (long long)G);
    if (nemo_cuda_numel(x) < N * C * HW)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: input has %lld elements, expected %lld", op,
                               (long long)nemo_cuda_numel(x), (long long)(N * C * HW));
    return 0;
}

/* Chunks per segment for the statistics: about 1024 blocks in all, at least 2048 elements each. */
static void seg_chunks(int64_t nseg, int64_t len, int64_t *nk, int64_t *chunk) {
    int64_t k = k_clamp(std::min(k_cdiv(1024, nseg > 0 ? nseg : 1), len / 2048), 1, 1024);
    *chunk = len > 0 ? k_cdiv(len, k) : 1;
    *nk = len > 0 ? k_cdiv(len, *chunk) : 1;
}

template <typename T>
static void group_norm_launch(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                              const nemo_tensor *w, const nemo_tensor *b, int64_t N, int64_t C, int64_t HW,
                              int64_t G, double eps, double *part, int64_t nk, int64_t chunk, cudaStream_t st) {
    const int64_t nseg = N * G, len = (C / G) * HW;
    T *M = (T *)nemo_cuda_data(mean), *R = (T *)nemo_cuda_data(rstd);
    const T *X = (const T *)nemo_cuda_data(x);
    unsigned nb = row_blocks(nseg * nk, NEMO_CUDA_THREADS);
    seg_part_k<T><<<nb, NEMO_CUDA_THREADS, 0, st>>>(part, X, NULL, nseg, len, nk, chunk);
    seg_stat_k<T><<<k_blocks(nseg), NEMO_CUDA_THREADS, 0, st>>>(M, R, part, nseg, len, nk, eps, 0);
    seg_part_k<T><<<nb, NEMO_CUDA_THREADS, 0, st>>>(part, X, M, nseg, len, nk, chunk);
    seg_stat_k<T><<<k_blocks(nseg), NEMO_CUDA_THREADS, 0, st>>>(M, R, part, nseg, len, nk, eps, 1);
    group_norm_out_k<T><<<k_blocks(N * C * HW), NEMO_CUDA_THREADS, 0, st>>>(
        (T *)nemo_cuda_data(y), X, M, R, (const T *)k_data(w), (const T *)k_data(b), N * C * HW, C, HW, G);
}

static int group_norm_cuda(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                           const nemo_tensor *w, const nemo_tensor *b, int64_t N, int64_t C, int64_t HW, int64_t G,
                           double eps) {
    static const char op[] = "group_norm";
    NEMO_CUDA_ENTER(op, x);
    NEMO_CUDA_RC(k_need(op, "output", y));
    NEMO_CUDA_RC(k_need(op, "mean", mean));
    NEMO_CUDA_RC(k_need(op, "rstd", rstd));
    NEMO_CUDA_RC(gn_check(op, x, N, C, HW, G));
    const int cdt = x->dtype;
    NEMO_CUDA_RC(check_vec(op, "output", y, x, cdt, N * C * HW));
    NEMO_CUDA_RC(check_vec(op, "mean", mean, x, cdt, N * G));
    NEMO_CUDA_RC(check_vec(op, "rstd", rstd, x, cdt, N * G));
    NEMO_CUDA_RC(check_vec(op, "weight", w, x, cdt, C));
    NEMO_CUDA_RC(check_vec(op, "bias", b, x, cdt, C));
    if (N == 0 || C == 0) return 0;
    int64_t nk, chunk;
    seg_chunks(N * G, (C / G) * HW, &nk, &chunk);
    void *part = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(x->devindex, sizeof(double) * (size_t)(N * G * nk), &part));
    cudaStream_t st = nemo_cuda_stream(x->devindex);
    if (cdt == NEMO_F64) group_norm_launch<double>(y, mean, rstd, x, w, b, N, C, HW, G, eps, (double *)part, nk, chunk, st);
    else group_norm_launch<float>(y, mean, rstd, x, w, b, N, C, HW, G, eps, (double *)part, nk, chunk, st);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (N %lld C %lld HW %lld G %lld)", op, x->devindex, (long long)N,
                       (long long)C, (long long)HW, (long long)G);
    return 0;
}
NEMO_CUDA_KERNEL("group_norm", group_norm_cuda)

template <typename T>
static void group_norm_bwd_launch(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                  const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                  const nemo_tensor *w, int64_t N, int64_t C, int64_t HW, int64_t G, double *tab,
                                  T *coef, cudaStream_t st) {
    const T *M = (const T *)nemo_cuda_data(mean), *R = (const T *)nemo_cuda_data(rstd), *W = (const T *)k_data(w);
    const T *X = (const T *)nemo_cuda_data(x), *Gp = (const T *)nemo_cuda_data(g);
    gn_plane_k<T><<<row_blocks(N * C, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(tab, Gp, X, M, N * C, C, HW, G);
    if (dx) {
        gn_coef_k<T><<<k_blocks(N * G), NEMO_CUDA_THREADS, 0, st>>>(coef, tab, R, W, N * G, C, HW, G);
        gn_dx_k<T><<<k_blocks(N * C * HW), NEMO_CUDA_THREADS, 0, st>>>((T *)nemo_cuda_data(dx), Gp, X, M, R, W, coef,
                                                                       N * C * HW, C, HW, G);
    }
    if (dw || db)
        gn_param_k<T><<<k_blocks(C), NEMO_CUDA_THREADS, 0, st>>>((T *)k_data(dw), (T *)k_data(db), tab, R, N, C, G);
}

static int group_norm_backward_cuda(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                    const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                    const nemo_tensor *w, int64_t N, int64_t C, int64_t HW, int64_t G) {
    static const char op[] = "group_norm backward";
    NEMO_CUDA_ENTER(op, x);
    NEMO_CUDA_RC(k_need(op, "gradient", g));
    NEMO_CUDA_RC(k_need(op, "mean", mean));
    NEMO_CUDA_RC(k_need(op, "rstd", rstd));
    NEMO_CUDA_RC(gn_check(op, x, N, C, HW, G));
    const int cdt = x->dtype;
    NEMO_CUDA_RC(check_vec(op, "gradient", g, x, cdt, N * C * HW));
    NEMO_CUDA_RC(check_vec(op, "input gradient", dx, x, cdt, N * C * HW));
    NEMO_CUDA_RC(check_vec(op, "mean", mean, x, cdt, N * G));
    NEMO_CUDA_RC(check_vec(op, "rstd", rstd, x, cdt, N * G));
    NEMO_CUDA_RC(check_vec(op, "weight", w, x, cdt, C));
    NEMO_CUDA_RC(check_vec(op, "weight gradient", dw, x, cdt, C));
    NEMO_CUDA_RC(check_vec(op, "bias gradient", db, x, cdt, C));
    if (N == 0 || C == 0) return 0;
    k_carve cv = {NULL, 0};
    k_take(&cv, sizeof(double) * (size_t)(2 * N * C));
    k_take(&cv, (size_t)nemo_cuda_dtype_size(cdt) * (size_t)(2 * N * G));
    void *base = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(x->devindex, cv.off, &base));
    cv.base = (char *)base;
    cv.off = 0;
    double *tab = (double *)k_take(&cv, sizeof(double) * (size_t)(2 * N * C));
    void *coef = k_take(&cv, (size_t)nemo_cuda_dtype_size(cdt) * (size_t)(2 * N * G));
    cudaStream_t st = nemo_cuda_stream(x->devindex);
    if (cdt == NEMO_F64)
        group_norm_bwd_launch<double>(dx, dw, db, g, x, mean, rstd, w, N, C, HW, G, tab, (double *)coef, st);
    else
        group_norm_bwd_launch<float>(dx, dw, db, g, x, mean, rstd, w, N, C, HW, G, tab, (float *)coef, st);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (N %lld C %lld HW %lld G %lld)", op, x->devindex, (long long)N,
                       (long long)C, (long long)HW, (long long)G);
    return 0;
}
NEMO_CUDA_KERNEL("group_norm_backward", group_norm_backward_cuda)
