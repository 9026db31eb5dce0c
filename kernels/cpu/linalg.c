/*
 * kernels/cpu/linalg.c: the CPU kernels of the linalg family on OpenBLAS: batched strided gemm,
 * column sums (the bias gradient of linear) and fused scaled-dot-product attention, forward and
 * backward, for dense float32 / float64 data.
 *
 * Threads. OpenBLAS's threaded sgemm gives different bits for different thread counts (it
 * splits a product per thread count and rounds edge tiles differently from inner ones; measured
 * on 0.3.21 with the Prescott, Haswell and SkylakeX kernels). So every gemm here runs
 * single-threaded on pieces whose size depends on the shapes only, and the OpenMP threads share
 * out whole pieces: output tiles of a product (gemm), (batch, head, query block) tasks
 * (attention forward), (batch, head, group of query blocks) tasks (attention backward, whose
 * groups add dK and dV into partial buffers summed in group order). OpenBLAS is set to one
 * thread for the duration of a call and restored after it, so its own threads never spin
 * against the OpenMP ones. Results are the same bits for any thread count.
 * NEMO_SDPA_PAR=blas (read once) runs attention the other way, one task at a time with
 * OpenBLAS threads inside each gemm, only to measure the two (not thread-count independent).
 *
 * Attention (per (batch, head), blocks of BQ query rows; S = scale*Q K^T in a per-thread
 * scratch of BQ x Sk):
 *   forward:  S -> P = softmax(S + mask) row by row (lse = max + log(sum)), O = P V;
 *   backward: P = exp(S + mask - lse) recomputed, dV += P^T dO, dP = dO V^T,
 *             dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK += scale dS^T Q.
 * Only O and lse (Sq values per head) live between forward and backward, unless the front-end
 * asks to keep P (sdpa_fwd_p / sdpa_bwd_p): then the forward also writes P = exp(S - max) / sum
 * (one pass over the block) and the backward reads it, which saves the S = Q K^T product and
 * the exponentials of backward. With is_causal a block only touches the keys j < its last row + 1.
 */
#include <cblas.h>
#include "amx.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "../../engine/internal.h"

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* OpenBLAS runs single-threaded between these two calls (see the file comment). */
static int blas_single_begin(void) {
    int n = openblas_get_num_threads();
    if (n != 1) openblas_set_num_threads(1);
    return n;
}
static void blas_single_end(int n) { if (n != 1) openblas_set_num_threads(n); }

/* ==== gemm ==== */

/* c = alpha * op(a) op(b) + beta * c, row-major, on the calling thread's BLAS; ta/tb nonzero:
 * the operand is stored transposed. Sizes were checked to fit BLAS's int by the front-end. */
static void gemm1(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                  const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {   /* c = beta * c, without trusting BLAS with an empty inner dimension */
        for (int64_t i = 0; i < m; i++) {
            if (dt == NEMO_F32) {
                float *r = (float *)c + i * ldc;
                for (int64_t j = 0; j < n; j++) r[j] = beta == 0.0 ? 0.0f : (float)beta * r[j];
            } else {
                double *r = (double *)c + i * ldc;
                for (int64_t j = 0; j < n; j++) r[j] = beta == 0.0 ? 0.0 : beta * r[j];
            }
        }
        return;
    }
    enum CBLAS_TRANSPOSE A = ta ? CblasTrans : CblasNoTrans, B = tb ? CblasTrans : CblasNoTrans;
    if (dt == NEMO_F32)
        cblas_sgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, (float)alpha, a, (int)lda, b, (int)ldb,
                    (float)beta, c, (int)ldc);
    else
        cblas_dgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb,
                    beta, c, (int)ldc);
}

/* Output tiles of a product. OpenBLAS's own threads split a product differently for each
 * thread count, and its kernels round edge tiles differently from inner ones, so a threaded
 * sgemm does not give the same bits on 1 and 2 threads. Here a product is cut into tiles, each
 * one single-threaded gemm, and the OpenMP threads share out whole tiles. The cut depends on
 * the shapes and on the number of processors (a constant of the machine, not the thread
 * count): about one tile per processor for a large product, the grid that packs the least
 * (every tile packs its rows of A and its columns of B: measured, 2 tiles of a 2048^3 product
 * run within 1-2% of OpenBLAS's threaded sgemm on 2 cores, 16 tiles 10-20% slower). */
#define GEMM_TILE_MIN (1 << 21)      /* multiply-adds a tile must keep (~20 us on one core) */
typedef struct { int64_t tm, tn, ntm, ntn; } tiling;

static int nprocs(void) {
    static int p = 0;
    if (!p) {
#ifdef _OPENMP
        p = omp_get_num_procs();
#endif
        if (p < 1) p = 1;
    }
    return p;
}

/* Tiles for one (m, n, k) product when nside products may run side by side. */
static tiling tile_plan(int64_t m, int64_t n, int64_t k, int64_t nside) {
    tiling best = {m > 0 ? m : 1, n > 0 ? n : 1, 1, 1};
    double work = (double)m * (double)n * (double)(k > 0 ? k : 1);
    int64_t want = (nprocs() + nside - 1) / nside;
    if ((double)want > work / GEMM_TILE_MIN) want = (int64_t)(work / GEMM_TILE_MIN);
    if (want <= 1) return best;
    double best_cost = -1;
    for (int64_t gm = 1; gm <= want; gm++) {
        int64_t gn = (want + gm - 1) / gm;
        tiling t;
        t.tm = (m + gm - 1) / gm;
        t.tm = gm > 1 ? (t.tm + 15) / 16 * 16 : t.tm;
        t.tn = (n + gn - 1) / gn;
        t.tn = gn > 1 ? (t.tn + 15) / 16 * 16 : t.tn;
        if (t.tm < 1 || t.tn < 1) continue;
        t.ntm = (m + t.tm - 1) / t.tm;
        t.ntn = (n + t.tn - 1) / t.tn;
        if (t.ntm * t.ntn < want) continue;
        double cost = (double)m * (double)t.ntn + (double)n * (double)t.ntm;   /* elements packed / k */
        if (best_cost < 0 || cost < best_cost) { best = t; best_cost = cost; }
    }
    return best;
}

/* Tile (i, j) of product c = op(a) op(b): pointers offset to the tile's rows / columns. */
static void gemm_tile(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                      const char *a, int64_t lda, const char *b, int64_t ldb, double beta, char *c, int64_t ldc,
                      const tiling *t, int64_t i, int64_t j) {
    int64_t esz = dt == NEMO_F32 ? 4 : 8;
    int64_t r0 = i * t->tm, c0 = j * t->tn;
    int64_t mm = m - r0 < t->tm ? m - r0 : t->tm, nn = n - c0 < t->tn ? n - c0 : t->tn;
    gemm1(dt, ta, tb, mm, nn, k, alpha, a + (ta ? r0 : r0 * lda) * esz, lda, b + (tb ? c0 * ldb : c0) * esz, ldb,
          beta, c + (r0 * ldc + c0) * esz, ldc);
}

/* ==== thin products ==== */

/* float32 products with at most THIN_MAX rows (the AdaLN / timestep linears: M = batch) or
 * at most THIN_MAX inner terms (their weight gradient) do not use BLAS: OpenBLAS packs the
 * whole other operand for them and reaches 3-6 GFLOP/s; these loops stream it once. Every
 * element is summed in an order fixed by the code (16 lanes, then a fixed tree), and threads
 * take fixed column / row chunks, so the bits depend neither on -march nor on the threads. */
#define THIN_MAX 8
#define THIN_COLS 64

/* sum_i x[i] * y[i], 16 partial sums combined by a fixed tree */
static inline float dot_f32(const float *x, const float *y, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[i + l] * y[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += x[i] * y[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

static inline void thin_store(float *c, float s, float alpha, float beta) {
    s = alpha == 1.0f ? s : alpha * s;
    *c = beta == 0.0f ? s : (beta == 1.0f ? *c + s : beta * *c + s);
}

/* One thin float32 product (see above); returns 0 when it is not thin (BLAS does it). */
static int thin_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha,
                     const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    if (k <= 0 || (m > THIN_MAX && k > THIN_MAX)) return 0;
    if (m <= THIN_MAX) {
        /* op(a) packed as m contiguous rows of k */
        float *ap = malloc(sizeof(float) * (size_t)(m * k));
        if (!ap) return 0;
        for (int64_t i = 0; i < m; i++)
            for (int64_t p = 0; p < k; p++) ap[i * k + p] = ta ? a[p * lda + i] : a[i * lda + p];
        int64_t nch = (n + THIN_COLS - 1) / THIN_COLS;
        #pragma omp parallel for schedule(static) if (m * n * k > NEMO_PAR_MIN && nch > 1)
        for (int64_t ch = 0; ch < nch; ch++) {
            int64_t j0 = ch * THIN_COLS, j1 = j0 + THIN_COLS < n ? j0 + THIN_COLS : n;
            if (tb) {   /* column j of op(b) is row j of b: dot products */
                for (int64_t j = j0; j < j1; j++)
                    for (int64_t i = 0; i < m; i++)
                        thin_store(c + i * ldc + j, dot_f32(ap + i * k, b + j * ldb, k), alpha, beta);
            } else {    /* rows of b scaled and added, p in order */
                float acc[THIN_MAX][THIN_COLS];
                int64_t w = j1 - j0;
                for (int64_t i = 0; i < m; i++)
                    for (int64_t j = 0; j < w; j++) acc[i][j] = 0.0f;
                for (int64_t p = 0; p < k; p++) {
                    const float *br = b + p * ldb + j0;
                    for (int64_t i = 0; i < m; i++) {
                        float av = ap[i * k + p];
                        for (int64_t j = 0; j < w; j++) acc[i][j] += av * br[j];
                    }
                }
                for (int64_t i = 0; i < m; i++)
                    for (int64_t j = 0; j < w; j++) thin_store(c + i * ldc + j0 + j, acc[i][j], alpha, beta);
            }
        }
        free(ap);
        return 1;
    }
    /* k <= THIN_MAX: sums of k outer products; op(b) packed as k contiguous rows of n */
    float *bp = malloc(sizeof(float) * (size_t)(k * n));
    if (!bp) return 0;
    for (int64_t p = 0; p < k; p++)
        for (int64_t j = 0; j < n; j++) bp[p * n + j] = tb ? b[j * ldb + p] : b[p * ldb + j];
    #pragma omp parallel for schedule(static) if (m * n * k > NEMO_PAR_MIN)
    for (int64_t i = 0; i < m; i++) {
        float av[THIN_MAX];
        for (int64_t p = 0; p < k; p++) av[p] = ta ? a[p * lda + i] : a[i * lda + p];
        float *cr = c + i * ldc;
        for (int64_t j0 = 0; j0 < n; j0 += THIN_COLS) {
            int64_t w = n - j0 < THIN_COLS ? n - j0 : THIN_COLS;
            float acc[THIN_COLS];
            for (int64_t j = 0; j < w; j++) acc[j] = 0.0f;
            for (int64_t p = 0; p < k; p++) {
                const float *br = bp + p * n + j0;
                float x = av[p];
                for (int64_t j = 0; j < w; j++) acc[j] += x * br[j];
            }
            for (int64_t j = 0; j < w; j++) thin_store(cr + j0 + j, acc[j], alpha, beta);
        }
    }
    free(bp);
    return 1;
}

/* For i < nbatch: c_i = alpha * op(a_i) op(b_i) + beta * c_i with a_i = a + offs[3i],
 * b_i = b + offs[3i+1], c_i = c + offs[3i+2] (elements; offs NULL means one product).
 * c_distinct: no two c_i overlap, so products run side by side; otherwise every tile adds the
 * products up in batch order (the front-end sums a broadcast operand's gradient that way). */
static int gemm_cpu(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                    const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                    void *c, int64_t ldc, int64_t nbatch, const int64_t *offs, int c_distinct) {
    static const int64_t zero3[3] = {0, 0, 0};
    int64_t esz = dt == NEMO_F32 ? 4 : 8;
    const char *pa = a, *pb = b;
    char *pc = c;
    if (!offs) { offs = zero3; nbatch = 1; }
    if (m <= 0 || n <= 0 || nbatch <= 0) return 0;
    if (dt == NEMO_F32 && nbatch == 1 &&
        thin_gemm(ta, tb, m, n, k, (float)alpha, (const float *)a + offs[0], lda, (const float *)b + offs[1], ldb,
                  (float)beta, (float *)c + offs[2], ldc))
        return 0;
    int64_t par = c_distinct ? nbatch : 1;
    tiling t = tile_plan(m, n, k, par);
    int64_t ntiles = t.ntm * t.ntn, ntasks = par * ntiles;
    int parallel = max_threads() > 1 && ntasks > 1;
    int saved = blas_single_begin();
    #pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t task = 0; task < ntasks; task++) {
        int64_t tile = task % ntiles, i0 = task / ntiles, i1 = c_distinct ? i0 + 1 : nbatch;
        for (int64_t i = i0; i < i1; i++)
            gemm_tile(dt, ta, tb, m, n, k, alpha, pa + offs[3 * i] * esz, lda, pb + offs[3 * i + 1] * esz, ldb, beta,
                      pc + offs[3 * i + 2] * esz, ldc, &t, tile / t.ntn, tile % t.ntn);
    }
    blas_single_end(saved);
    return 0;
}
NEMO_REGISTER_KERNEL("gemm", NEMO_CPU, gemm_cpu)

/* ==== low-precision operands ==== */

/* The element range [lo, hi) that operand x (rows x cols with leading dimension ld, at the
 * batch offsets offs[3i + which]) touches. */
static void span_of(const int64_t *offs, int64_t nbatch, int which, int64_t rows, int64_t cols, int64_t ld,
                    int64_t *lo, int64_t *hi) {
    int64_t ext = (rows - 1) * ld + cols;
    *lo = offs[which];
    *hi = offs[which] + ext;
    for (int64_t i = 1; i < nbatch; i++) {
        int64_t o = offs[3 * i + which];
        if (o < *lo) *lo = o;
        if (o + ext > *hi) *hi = o + ext;
    }
}

/* "gemm_lp": gemm's contract with bf16 or f16 operands (dt) and a float32 c: products of the
 * exact operand values summed in float32. bf16 on a CPU with AMX: tile products (amx.c, several
 * times sgemm's rate; the float32 sums in another fixed order). Otherwise the spans of a and b
 * the batch touches are widened to float32 once and the float32 gemm runs on them (the same
 * offsets and leading dimensions): the results of gemm on operands converted by the caller. */
static int gemm_lp_cpu(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                       int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc, int64_t nbatch,
                       const int64_t *offs, int c_distinct) {
    static const int64_t zero3[3] = {0, 0, 0};
    if (dt != NEMO_BF16 && dt != NEMO_F16)
        return NEMO_ERR(NEMO_EDTYPE, "gemm_lp: expects bfloat16 or float16 operands, got %s", nemo_dtype_name(dt));
    if (!offs) { offs = zero3; nbatch = 1; }
    if (m <= 0 || n <= 0 || nbatch <= 0) return 0;
    if (k <= 0) return gemm_cpu(NEMO_F32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nbatch, offs,
                                c_distinct);
    if (dt == NEMO_BF16 && nemo_amx_gemm_bf16(ta, tb, m, n, k, (float)alpha, a, lda, b, ldb, (float)beta, c, ldc,
                                              nbatch, offs, c_distinct))
        return 0;
    int64_t alo, ahi, blo, bhi;
    span_of(offs, nbatch, 0, ta ? k : m, ta ? m : k, lda, &alo, &ahi);
    span_of(offs, nbatch, 1, tb ? n : k, tb ? k : n, ldb, &blo, &bhi);
    size_t na = (size_t)(ahi - alo), nb = (size_t)(bhi - blo);
    float *wa = nemo_dev_alloc(NEMO_CPU, 0, (na + nb) * sizeof(float));
    if (!wa) return nemo_last_status();
    float *wb = wa + na;
    nemo_convert_dense(wa, NEMO_F32, (const uint16_t *)a + alo, dt, (int64_t)na);
    nemo_convert_dense(wb, NEMO_F32, (const uint16_t *)b + blo, dt, (int64_t)nb);
    int64_t *o2 = NULL;
    if (nbatch > 1 || alo || blo) {
        o2 = malloc(sizeof(int64_t) * 3 * (size_t)nbatch);
        if (!o2) {
            nemo_dev_free(NEMO_CPU, 0, wa, (na + nb) * sizeof(float));
            return NEMO_ERR(NEMO_ENOMEM, "gemm_lp: out of memory for %lld batch offsets", (long long)nbatch);
        }
        for (int64_t i = 0; i < nbatch; i++) {
            o2[3 * i] = offs[3 * i] - alo;
            o2[3 * i + 1] = offs[3 * i + 1] - blo;
            o2[3 * i + 2] = offs[3 * i + 2];
        }
    }
    int rc = gemm_cpu(NEMO_F32, ta, tb, m, n, k, alpha, wa, lda, wb, ldb, beta, c, ldc, nbatch, o2 ? o2 : offs,
                      c_distinct);
    free(o2);
    nemo_dev_free(NEMO_CPU, 0, wa, (na + nb) * sizeof(float));
    return rc;
}
NEMO_REGISTER_KERNEL("gemm_lp", NEMO_CPU, gemm_lp_cpu)

/* "gemm_lp_out": c_i = round(alpha op(a_i) op(b_i) + bias) with bf16 or f16 operands and c in
 * that dtype too; bias (n, dt) broadcast over the rows, or NULL; the c_i must not overlap. The
 * contract is gemm_lp into float32 (onto the widened bias, beta = 1) rounded once to dt, and
 * that is how the CPU computes it: the same bits as gemm_lp followed by a conversion. The CUDA
 * twin writes dt straight from the tensor cores (bias epilogue), so the float32 result never
 * goes through memory. */
static int gemm_lp_out_cpu(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                           int64_t lda, const void *b, int64_t ldb, const void *bias, void *c, int64_t ldc,
                           int64_t nbatch, const int64_t *offs) {
    static const int64_t zero3[3] = {0, 0, 0};
    if (dt != NEMO_BF16 && dt != NEMO_F16)
        return NEMO_ERR(NEMO_EDTYPE, "gemm_lp_out: expects bfloat16 or float16 operands, got %s", nemo_dtype_name(dt));
    if (!offs) { offs = zero3; nbatch = 1; }
    if (m <= 0 || n <= 0 || nbatch <= 0) return 0;
    int64_t per = m * n, rows = m * nbatch;
    float *t = nemo_dev_alloc(NEMO_CPU, 0, (size_t)(per * nbatch) * sizeof(float));
    if (!t) return nemo_last_status();
    int64_t *o2 = malloc(sizeof(int64_t) * 3 * (size_t)nbatch);
    if (!o2) {
        nemo_dev_free(NEMO_CPU, 0, t, (size_t)(per * nbatch) * sizeof(float));
        return NEMO_ERR(NEMO_ENOMEM, "gemm_lp_out: out of memory for %lld batch offsets", (long long)nbatch);
    }
    for (int64_t i = 0; i < nbatch; i++) {
        o2[3 * i] = offs[3 * i];
        o2[3 * i + 1] = offs[3 * i + 1];
        o2[3 * i + 2] = i * per;
    }
    if (bias) {
        nemo_convert_dense(t, NEMO_F32, bias, dt, n);
        #pragma omp parallel for schedule(static) if (per * nbatch > NEMO_PAR_MIN)
        for (int64_t r = 1; r < rows; r++) memcpy(t + r * n, t, sizeof(float) * (size_t)n);
    }
    int rc = gemm_lp_cpu(dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, bias ? 1.0 : 0.0, t, n, nbatch, o2, 1);
    if (rc == 0) {
        #pragma omp parallel for schedule(static) if (per * nbatch > NEMO_PAR_MIN)
        for (int64_t r = 0; r < rows; r++)
            nemo_convert_dense((uint16_t *)c + offs[3 * (r / m) + 2] + (r % m) * ldc, dt, t + r * n, NEMO_F32, n);
    }
    free(o2);
    nemo_dev_free(NEMO_CPU, 0, t, (size_t)(per * nbatch) * sizeof(float));
    return rc;
}
NEMO_REGISTER_KERNEL("gemm_lp_out", NEMO_CPU, gemm_lp_out_cpu)

/* ==== column sums ==== */

/* out[j] = sum_i g[i*ldg + j] for a (m, n) row-major g; out has g's compute dtype (float32 for
 * bf16 / f16 rows, read as they are). Rows go in blocks whose size depends on m only, each block
 * summed into float64 partials in parallel, and the partials added in block order. */
static int colsum_cpu(int dt, int64_t m, int64_t n, const void *g, int64_t ldg, void *out) {
    if (!nemo_dtype_is_float(dt))
        return NEMO_ERR(NEMO_EDTYPE, "colsum: expects a floating-point dtype, got %s", nemo_dtype_name(dt));
    if (n <= 0) return 0;
    int64_t rb = 256;
    if (m / rb > 64) rb = (m + 63) / 64;
    int64_t nblk = m > 0 ? (m + rb - 1) / rb : 1;
    double *part = malloc((size_t)nblk * (size_t)n * sizeof(double));
    if (!part) return NEMO_ERR(NEMO_ENOMEM, "linear backward: out of memory for %lld column sums",
                               (long long)(nblk * n));
    #pragma omp parallel for schedule(static) if (m * n > NEMO_PAR_MIN)
    for (int64_t blk = 0; blk < nblk; blk++) {
        double *p = part + blk * n;
        for (int64_t j = 0; j < n; j++) p[j] = 0.0;
        int64_t i1 = (blk + 1) * rb < m ? (blk + 1) * rb : m;
        for (int64_t i = blk * rb; i < i1; i++) {
            if (dt == NEMO_F32) {
                const float *row = (const float *)g + i * ldg;
                #pragma omp simd
                for (int64_t j = 0; j < n; j++) p[j] += (double)row[j];
            } else if (dt == NEMO_BF16) {
                const uint16_t *row = (const uint16_t *)g + i * ldg;
                for (int64_t j = 0; j < n; j++) p[j] += (double)nemo_bf16_to_f32(row[j]);
            } else if (dt == NEMO_F16) {
                const uint16_t *row = (const uint16_t *)g + i * ldg;
                for (int64_t j = 0; j < n; j++) p[j] += (double)nemo_f16_to_f32(row[j]);
            } else {
                const double *row = (const double *)g + i * ldg;
                #pragma omp simd
                for (int64_t j = 0; j < n; j++) p[j] += row[j];
            }
        }
    }
    #pragma omp parallel for schedule(static) if (nblk * n > NEMO_PAR_MIN)
    for (int64_t j = 0; j < n; j++) {
        double s = 0.0;
        for (int64_t blk = 0; blk < nblk; blk++) s += part[blk * n + j];
        if (dt == NEMO_F64) ((double *)out)[j] = s;
        else ((float *)out)[j] = (float)s;
    }
    free(part);
    return 0;
}
NEMO_REGISTER_KERNEL("colsum", NEMO_CPU, colsum_cpu)

/* ==== attention: row operations ==== */

/* e^x in float32 that vectorizes: e^x = 2^n e^r with |r| <= ln2/2 and Cephes' polynomial for
 * e^r (relative error about 2e-7); below -87.3 (and for -inf) it gives 0. */
static inline float exp_f32(float x) {
    const float lo = -87.3365447504f, hi = 88.0f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, sizeof s);
    return x < lo ? 0.0f : y * s;
}
static inline double exp_f64(double x) { return exp(x); }

/* The mask of one (batch, head): element (i, j) at base[i*sq + j*sk] (strides 0 where
 * broadcast). kind 0: none; 1: bool (uint8, nonzero = attend); 2: added (compute dtype). */
typedef struct { int kind; const void *base; int64_t sq, sk; } amask;

/* Typed row helpers, one set per compute dtype. Rows r < rows of a block hold query rows
 * row0 + r; only the first `cols` keys are present (the causal limit of the block), and with
 * is_causal row i stops at key i. */
#define ROW_OPS(T, SUF, EXP, LOG)                                                                  \
static int64_t ncols_##SUF(int64_t i, int64_t cols, int causal) {                                  \
    return causal ? (i + 1 < cols ? i + 1 : cols) : cols;                                          \
}                                                                                                  \
static void apply_mask_##SUF(T *x, int64_t nc, const amask *mk, int64_t i) {                       \
    if (mk->kind == 1) {                                                                           \
        const uint8_t *mb = (const uint8_t *)mk->base + i * mk->sq;                                \
        int64_t sk = mk->sk;                                                                       \
        for (int64_t j = 0; j < nc; j++) if (!mb[j * sk]) x[j] = -(T)INFINITY;                     \
    } else if (mk->kind == 2) {                                                                    \
        const T *mf = (const T *)mk->base + i * mk->sq;                                            \
        int64_t sk = mk->sk;                                                                       \
        if (sk == 1) { _Pragma("omp simd") for (int64_t j = 0; j < nc; j++) x[j] += mf[j]; }        \
        else for (int64_t j = 0; j < nc; j++) x[j] += mf[j * sk];                                  \
    }                                                                                              \
}                                                                                                  \
/* s (rows x cols, row stride ld): scores in, exp(s - rowmax) out, not yet normalised (the    \
 * output rows are scaled by rinv[r] = 1/rowsum after P V); lse[r] = logsumexp of row r. */     \
static void softmax_rows_##SUF(void *sv, int64_t ld, int64_t rows, int64_t cols, int64_t row0,     \
                               int causal, const amask *mk, void *lsev, void *rinvv) {             \
    T *s = sv, *lse = lsev, *rinv = rinvv;                                                         \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        T *x = s + r * ld;                                                                         \
        int64_t i = row0 + r, nc = ncols_##SUF(i, cols, causal);                                   \
        apply_mask_##SUF(x, nc, mk, i);                                                            \
        T m = -(T)INFINITY;                                                                        \
        _Pragma("omp simd reduction(max:m)")                                                       \
        for (int64_t j = 0; j < nc; j++) m = x[j] > m ? x[j] : m;                                  \
        if (m == -(T)INFINITY) {                 /* attends to nothing: zeros */                   \
            for (int64_t j = 0; j < cols; j++) x[j] = 0;                                           \
            lse[r] = -(T)INFINITY;                                                                 \
            rinv[r] = 0;                                                                           \
            continue;                                                                              \
        }                                                                                          \
        T sum = 0;                                                                                 \
        _Pragma("omp simd reduction(+:sum)")                                                       \
        for (int64_t j = 0; j < nc; j++) { T e = EXP(x[j] - m); x[j] = e; sum += e; }              \
        for (int64_t j = nc; j < cols; j++) x[j] = 0;                                              \
        rinv[r] = (T)1 / sum;                                                                      \
        lse[r] = m + LOG(sum);                                                                     \
    }                                                                                              \
}                                                                                                  \
/* p rows (w values, row stride ldp) = s rows (row stride lds) * rinv[r]: the probabilities. */ \
static void norm_rows_##SUF(void *pv, int64_t ldp, const void *sv, int64_t lds, int64_t rows,      \
                            int64_t w, const void *rinvv) {                                        \
    T *p = pv;                                                                                     \
    const T *s = sv, *rinv = rinvv;                                                                \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        T f = rinv[r], *x = p + r * ldp;                                                           \
        const T *y = s + r * lds;                                                                  \
        _Pragma("omp simd")                                                                        \
        for (int64_t c = 0; c < w; c++) x[c] = y[c] * f;                                           \
    }                                                                                              \
}                                                                                                  \
/* o rows (w values, row stride ld) *= rinv[r]. */                                                \
static void scale_rows_##SUF(void *ov, int64_t ld, int64_t rows, int64_t w, const void *rinvv) {   \
    T *o = ov;                                                                                     \
    const T *rinv = rinvv;                                                                         \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        T f = rinv[r], *x = o + r * ld;                                                            \
        _Pragma("omp simd")                                                                        \
        for (int64_t c = 0; c < w; c++) x[c] *= f;                                                 \
    }                                                                                              \
}                                                                                                  \
/* s: scores in, P = exp(s + mask - lse) out (the forward's probabilities). */                    \
static void probs_rows_##SUF(void *sv, int64_t ld, int64_t rows, int64_t cols, int64_t row0,       \
                             int causal, const amask *mk, const void *lsev) {                      \
    T *s = sv;                                                                                     \
    const T *lse = lsev;                                                                           \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        T *x = s + r * ld, l = lse[r];                                                             \
        int64_t i = row0 + r, nc = ncols_##SUF(i, cols, causal);                                   \
        if (l == -(T)INFINITY) nc = 0;                                                             \
        apply_mask_##SUF(x, nc, mk, i);                                                            \
        _Pragma("omp simd")                                                                        \
        for (int64_t j = 0; j < nc; j++) x[j] = EXP(x[j] - l);                                     \
        for (int64_t j = nc; j < cols; j++) x[j] = 0;                                              \
    }                                                                                              \
}                                                                                                  \
/* p (out: dS = P * (dP - rowsum(dO * O))), pin: P (row stride ldin; may be p itself), dp: dP; \
 * g, o: dO and O rows (dv values). */                                                            \
static void dsoftmax_rows_##SUF(void *pv, const void *pinv, int64_t ldin, const void *dpv,         \
                                int64_t ld, int64_t rows, int64_t cols,                            \
                                const void *gv, int64_t ldg, const void *ov, int64_t ldo,          \
                                int64_t dv) {                                                      \
    T *p = pv;                                                                                     \
    const T *pin = pinv, *dp = dpv, *g = gv, *o = ov;                                              \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const T *gr = g + r * ldg, *orow = o + r * ldo;                                            \
        T di = 0;                                                                                  \
        _Pragma("omp simd reduction(+:di)")                                                        \
        for (int64_t c = 0; c < dv; c++) di += gr[c] * orow[c];                                    \
        T *x = p + r * ld;                                                                         \
        const T *xin = pin + r * ldin, *y = dp + r * ld;                                           \
        _Pragma("omp simd")                                                                        \
        for (int64_t j = 0; j < cols; j++) x[j] = xin[j] * (y[j] - di);                            \
    }                                                                                              \
}

ROW_OPS(float, f32, exp_f32, logf)
ROW_OPS(double, f64, exp_f64, log)
#undef ROW_OPS

typedef struct {
    void (*softmax)(void *s, int64_t ld, int64_t rows, int64_t cols, int64_t row0, int causal,
                    const amask *mk, void *lse, void *rinv);
    void (*scale_rows)(void *o, int64_t ld, int64_t rows, int64_t w, const void *rinv);
    void (*probs)(void *s, int64_t ld, int64_t rows, int64_t cols, int64_t row0, int causal,
                  const amask *mk, const void *lse);
    void (*dsoftmax)(void *p, const void *pin, int64_t ldin, const void *dp, int64_t ld, int64_t rows,
                     int64_t cols, const void *g, int64_t ldg, const void *o, int64_t ldo, int64_t dv);
    void (*norm_rows)(void *p, int64_t ldp, const void *s, int64_t lds, int64_t rows, int64_t w,
                      const void *rinv);
} row_ops;
static const row_ops ROWS_F32 = {softmax_rows_f32, scale_rows_f32, probs_rows_f32, dsoftmax_rows_f32,
                                 norm_rows_f32};
static const row_ops ROWS_F64 = {softmax_rows_f64, scale_rows_f64, probs_rows_f64, dsoftmax_rows_f64,
                                 norm_rows_f64};

/* ==== attention: blocks ==== */

/* One call's geometry. Every tensor is (lead..., rows, cols) with the same leading dims and a
 * contiguous last dim; a (batch, head) pair is a flat index over the leading dims. */
typedef struct {
    int dt, causal, nlead;
    size_t esz;
    int64_t nbh, sq, sk, d, dv, bq;
    double scale;
    const row_ops *ops;
    const nemo_tensor *mask;
    int mask_kind;
    int par_rows;       /* row operations of a block run on the OpenMP threads (blas mode) */
} sdpa_geom;

/* Rows per chunk when a block's row operations are split over threads. */
#define ROW_CHUNK 8

/* Element offset of the matrix of pair bh inside t (t's leading dims are the pair's index). */
static int64_t pair_off(const nemo_tensor *t, int nlead, int64_t bh) {
    int64_t off = 0;
    for (int d = nlead - 1; d >= 0; d--) {
        int64_t i = bh % t->shape[d];
        bh /= t->shape[d];
        off += i * t->stride[d];
    }
    return off;
}
static char *pair_ptr(const nemo_tensor *t, const sdpa_geom *G, int64_t bh) {
    return (char *)nemo_tensor_data(t) + pair_off(t, G->nlead, bh) * (int64_t)G->esz;
}
static int64_t row_stride(const nemo_tensor *t) { return t->stride[t->ndim - 2]; }
/* A leading dimension for BLAS: the row stride, or the row length when there is one row. */
static int64_t ld_of(const nemo_tensor *t) {
    int64_t cols = t->shape[t->ndim - 1], ld = row_stride(t);
    if (t->shape[t->ndim - 2] <= 1 || ld < cols) ld = cols > 0 ? cols : 1;
    return ld;
}
static amask pair_mask(const sdpa_geom *G, int64_t bh) {
    amask mk = {0, NULL, 0, 0};
    if (G->mask) {
        mk.kind = G->mask_kind;
        size_t msz = (size_t)nemo_dtype_size(G->mask->dtype);
        mk.base = (const char *)nemo_tensor_data(G->mask) + pair_off(G->mask, G->nlead, bh) * (int64_t)msz;
        mk.sq = row_stride(G->mask);
        mk.sk = G->mask->stride[G->mask->ndim - 1];
    }
    return mk;
}
/* The number of keys query block [i0, i1) looks at. */
static int64_t block_keys(const sdpa_geom *G, int64_t i1) {
    return G->causal ? (i1 < G->sk ? i1 : G->sk) : G->sk;
}
static void zero_rows(char *p, int64_t rows, int64_t cols, int64_t ld, size_t esz) {
    for (int64_t r = 0; r < rows; r++) memset(p + r * ld * (int64_t)esz, 0, (size_t)cols * esz);
}

typedef struct {
    const nemo_tensor *q, *k, *v, *o, *lse, *g, *dq, *dk, *dv;
    const nemo_tensor *p;   /* kept probabilities (nbh, Sq, Sk) contiguous, or NULL */
} sdpa_io;
/* Row i0 of pair bh in the kept probabilities (row stride Sk). */
static char *probs_ptr(const sdpa_geom *G, const sdpa_io *io, int64_t bh, int64_t i0) {
    return (char *)nemo_tensor_data(io->p) + ((bh * G->sq + i0) * G->sk) * (int64_t)G->esz;
}

/* Forward of query rows [i0, i1) of pair bh; s: scratch of (i1-i0) x Sk, then i1-i0 values. */
static void fwd_block(const sdpa_geom *G, const sdpa_io *io, int64_t bh, int64_t i0, int64_t i1, char *s) {
    size_t esz = G->esz;
    int64_t bq = i1 - i0, nk = block_keys(G, i1);
    int64_t ldq = ld_of(io->q), ldk = ld_of(io->k), ldv = ld_of(io->v), ldo = ld_of(io->o);
    const char *q = pair_ptr(io->q, G, bh) + i0 * ldq * (int64_t)esz;
    const char *k = pair_ptr(io->k, G, bh), *v = pair_ptr(io->v, G, bh);
    char *o = pair_ptr(io->o, G, bh) + i0 * ldo * (int64_t)esz;
    char *lse = (char *)nemo_tensor_data(io->lse) + (bh * G->sq + i0) * (int64_t)esz;
    amask mk = pair_mask(G, bh);
    int64_t lds = nk > 0 ? nk : 1;
    char *rinv = s + (size_t)G->bq * (size_t)(G->sk > 0 ? G->sk : 1) * esz;
    gemm1(G->dt, 0, 1, bq, nk, G->d, G->scale, q, ldq, k, ldk, 0.0, s, lds);
    if (G->par_rows) {
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < bq; r += ROW_CHUNK)
            G->ops->softmax(s + r * lds * (int64_t)esz, lds, bq - r < ROW_CHUNK ? bq - r : ROW_CHUNK, nk,
                            i0 + r, G->causal, &mk, lse + r * (int64_t)esz, rinv + r * (int64_t)esz);
    } else {
        G->ops->softmax(s, lds, bq, nk, i0, G->causal, &mk, lse, rinv);
    }
    if (io->p) G->ops->norm_rows(probs_ptr(G, io, bh, i0), G->sk, s, lds, bq, nk, rinv);
    gemm1(G->dt, 0, 0, bq, G->dv, nk, 1.0, s, lds, v, ldv, 0.0, o, ldo);
    G->ops->scale_rows(o, ldo, bq, G->dv, rinv);
}

/* Where one task of the backward adds its dK and dV: the tensors themselves (group 0) or a
 * dense partial buffer of its own (ld = D or Dv). */
typedef struct { char *dk, *dv; int64_t lddk, lddv; } kv_sink;

/* Backward of query rows [i0, i1) of pair bh: writes dQ rows, adds into the sink's dK and dV.
 * p, dp: scratch of (i1-i0) x Sk each. */
static void bwd_block(const sdpa_geom *G, const sdpa_io *io, int64_t bh, int64_t i0, int64_t i1,
                      const kv_sink *kv, char *p, char *dp) {
    size_t esz = G->esz;
    int64_t bq = i1 - i0, nk = block_keys(G, i1);
    int64_t ldq = ld_of(io->q), ldk = ld_of(io->k), ldv = ld_of(io->v), ldo = ld_of(io->o);
    int64_t ldg = ld_of(io->g), lddq = ld_of(io->dq);
    const char *q = pair_ptr(io->q, G, bh) + i0 * ldq * (int64_t)esz;
    const char *k = pair_ptr(io->k, G, bh), *v = pair_ptr(io->v, G, bh);
    const char *o = pair_ptr(io->o, G, bh) + i0 * ldo * (int64_t)esz;
    const char *g = pair_ptr(io->g, G, bh) + i0 * ldg * (int64_t)esz;
    const char *lse = (const char *)nemo_tensor_data(io->lse) + (bh * G->sq + i0) * (int64_t)esz;
    char *dq = pair_ptr(io->dq, G, bh) + i0 * lddq * (int64_t)esz;
    amask mk = pair_mask(G, bh);
    int64_t lds = nk > 0 ? nk : 1;
    if (nk == 0) { zero_rows(dq, bq, G->d, lddq, esz); return; }
    const char *pin = p;        /* P: kept by the forward, or recomputed into p */
    int64_t ldin = lds;
    if (io->p) {
        pin = probs_ptr(G, io, bh, i0);
        ldin = G->sk;
    } else {
        gemm1(G->dt, 0, 1, bq, nk, G->d, G->scale, q, ldq, k, ldk, 0.0, p, lds);          /* S */
        if (G->par_rows) {                                                                  /* P */
            #pragma omp parallel for schedule(static)
            for (int64_t r = 0; r < bq; r += ROW_CHUNK)
                G->ops->probs(p + r * lds * (int64_t)esz, lds, bq - r < ROW_CHUNK ? bq - r : ROW_CHUNK, nk,
                              i0 + r, G->causal, &mk, lse + r * (int64_t)esz);
        } else {
            G->ops->probs(p, lds, bq, nk, i0, G->causal, &mk, lse);
        }
    }
    gemm1(G->dt, 1, 0, nk, G->dv, bq, 1.0, pin, ldin, g, ldg, 1.0, kv->dv, kv->lddv);     /* dV += P^T dO */
    gemm1(G->dt, 0, 1, bq, nk, G->dv, 1.0, g, ldg, v, ldv, 0.0, dp, lds);                  /* dP = dO V^T */
    if (G->par_rows) {                                                                      /* dS */
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < bq; r += ROW_CHUNK)
            G->ops->dsoftmax(p + r * lds * (int64_t)esz, pin + r * ldin * (int64_t)esz, ldin,
                             dp + r * lds * (int64_t)esz, lds,
                             bq - r < ROW_CHUNK ? bq - r : ROW_CHUNK, nk, g + r * ldg * (int64_t)esz, ldg,
                             o + r * ldo * (int64_t)esz, ldo, G->dv);
    } else {
        G->ops->dsoftmax(p, pin, ldin, dp, lds, bq, nk, g, ldg, o, ldo, G->dv);
    }
    gemm1(G->dt, 0, 0, bq, G->d, nk, G->scale, p, lds, k, ldk, 0.0, dq, lddq);             /* dQ = s dS K */
    gemm1(G->dt, 1, 0, nk, G->d, bq, G->scale, p, lds, q, ldq, 1.0, kv->dk, kv->lddk);     /* dK += s dS^T Q */
}

/* Query rows per block: 256 (measured fastest against 64 and 128 at S = 1152, D = 128: the
 * keys are packed once per block), fewer when a block's scores would pass 16 MiB. */
static int64_t block_rows(int64_t sq, int64_t sk, size_t esz) {
    int64_t b = (int64_t)((16u << 20) / ((size_t)(sk > 0 ? sk : 1) * esz));
    if (b > 256) b = 256;
    if (b < 16) b = 16;
    b = b / 16 * 16;
    return b < sq ? b : (sq > 0 ? sq : 1);
}

/* Backward work per pair is split into this many groups of query blocks when there are few
 * pairs, so that few heads still keep every thread busy; each group past the first adds its dK
 * and dV into a partial buffer, summed in group order afterwards. Like the block size, this
 * depends on the shapes only (at most 8 tasks' worth of groups, 64 Mi partial elements). */
static int64_t bwd_groups(const sdpa_geom *G, int64_t nblk) {
    int64_t ng = G->nbh >= 8 ? 1 : (8 + G->nbh - 1) / G->nbh;
    if (ng > nblk) ng = nblk;
    while (ng > 1 && (double)(ng - 1) * (double)G->nbh * (double)G->sk * (double)(G->d + G->dv) > (double)(1 << 26))
        ng--;
    return ng > 0 ? ng : 1;
}

/* NEMO_SDPA_PAR: 0 auto (OpenMP over tasks, single-threaded gemm); 2 blas (one task at a time,
 * OpenBLAS threads inside each gemm, row operations on OpenMP): kept to measure the two, it
 * does not give the same bits for every thread count. */
static int sdpa_blas_mode(void) {
    static int mode = -1;
    if (mode < 0) {
        const char *e = getenv("NEMO_SDPA_PAR");
        mode = (e && !strcmp(e, "blas")) ? 1 : 0;
    }
    return mode;
}

static void sdpa_geom_init(sdpa_geom *G, const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                           const nemo_tensor *mask, int causal, double scale) {
    memset(G, 0, sizeof *G);
    G->dt = q->dtype;
    G->esz = (size_t)nemo_dtype_size(q->dtype);
    G->ops = q->dtype == NEMO_F32 ? &ROWS_F32 : &ROWS_F64;
    G->causal = causal;
    G->scale = scale;
    G->nlead = q->ndim - 2;
    G->nbh = 1;
    for (int d = 0; d < G->nlead; d++) G->nbh *= q->shape[d];
    G->sq = q->shape[q->ndim - 2];
    G->d = q->shape[q->ndim - 1];
    G->sk = k->shape[k->ndim - 2];
    G->dv = v->shape[v->ndim - 1];
    G->bq = block_rows(G->sq, G->sk, G->esz);
    G->mask = mask;
    G->mask_kind = mask ? (mask->dtype == NEMO_BOOL ? 1 : 2) : 0;
}

/* o (lead, Sq, Dv), lse (nbh * Sq contiguous) = attention of q, k, v (compute dtype, last dim
 * contiguous). mask: NULL or a (lead, Sq, Sk) view (broadcast strides), bool or compute dtype.
 * Tasks are (pair, query block), all independent. */
static int sdpa_fwd_probs_cpu(nemo_tensor *o, nemo_tensor *lse, nemo_tensor *probs, const nemo_tensor *q,
                              const nemo_tensor *k, const nemo_tensor *v, const nemo_tensor *mask, int is_causal,
                              double scale) {
    sdpa_geom G;
    sdpa_geom_init(&G, q, k, v, mask, is_causal, scale);
    sdpa_io io = {q, k, v, o, lse, NULL, NULL, NULL, NULL, probs};
    if (G.nbh == 0 || G.sq == 0) return 0;
    int64_t nblk = (G.sq + G.bq - 1) / G.bq, ntasks = G.nbh * nblk;
    int blas = sdpa_blas_mode();
    int nthr = blas ? 1 : max_threads();
    G.par_rows = blas && max_threads() > 1;
    size_t per = ((size_t)G.bq * (size_t)(G.sk > 0 ? G.sk : 1) + (size_t)G.bq) * G.esz;
    per = (per + 63) / 64 * 64;
    char *scratch = nemo_dev_alloc(NEMO_CPU, 0, per * (size_t)nthr);
    if (!scratch) return nemo_last_status();
    int saved = blas ? 1 : blas_single_begin();
    #pragma omp parallel num_threads(nthr) if (nthr > 1 && ntasks > 1)
    {
        char *s = scratch + per * (size_t)thread_id();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntasks; t++) {
            int64_t bh = t / nblk, i0 = (t % nblk) * G.bq, i1 = i0 + G.bq < G.sq ? i0 + G.bq : G.sq;
            fwd_block(&G, &io, bh, i0, i1, s);
        }
    }
    if (!blas) blas_single_end(saved);
    nemo_dev_free(NEMO_CPU, 0, scratch, per * (size_t)nthr);
    return 0;
}
static int sdpa_fwd_cpu(nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q, const nemo_tensor *k,
                        const nemo_tensor *v, const nemo_tensor *mask, int is_causal, double scale) {
    return sdpa_fwd_probs_cpu(o, lse, NULL, q, k, v, mask, is_causal, scale);
}
NEMO_REGISTER_KERNEL("sdpa_fwd", NEMO_CPU, sdpa_fwd_cpu)
/* sdpa_fwd that also writes the probabilities P into p ((nbh, Sq, Sk) contiguous; a causal
 * row's columns past its block's last key are left unwritten and never read). */
NEMO_REGISTER_KERNEL("sdpa_fwd_p", NEMO_CPU, sdpa_fwd_probs_cpu)

/* dq, dk, dv (shapes of q, k, v; last dim contiguous; fully written) from g = dL/do (o's shape)
 * and the forward's o and lse. Tasks are (pair, group of query blocks). */
static int sdpa_bwd_probs_cpu(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                              const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                              const nemo_tensor *o, const nemo_tensor *lse, const nemo_tensor *probs,
                              const nemo_tensor *mask, int is_causal, double scale) {
    sdpa_geom G;
    sdpa_geom_init(&G, q, k, v, mask, is_causal, scale);
    sdpa_io io = {q, k, v, o, lse, g, dq, dk, dv, probs};
    if (G.nbh == 0) return 0;
    size_t esz = G.esz;
    int64_t nblk = G.sq > 0 ? (G.sq + G.bq - 1) / G.bq : 0;
    int64_t ng = nblk > 0 ? bwd_groups(&G, nblk) : 1, bpg = nblk > 0 ? (nblk + ng - 1) / ng : 0;
    int64_t ntasks = G.nbh * ng;
    int blas = sdpa_blas_mode();
    int nthr = blas ? 1 : max_threads();
    G.par_rows = blas && max_threads() > 1;
    size_t per = 2 * (size_t)G.bq * (size_t)(G.sk > 0 ? G.sk : 1) * esz;
    size_t kvsz = (size_t)G.sk * (size_t)(G.d + G.dv) * esz;        /* one partial dK + dV */
    size_t npart = (size_t)(ng - 1) * (size_t)G.nbh;
    char *scratch = nemo_dev_alloc(NEMO_CPU, 0, per * (size_t)nthr + npart * kvsz);
    if (!scratch) return nemo_last_status();
    char *part = scratch + per * (size_t)nthr;
    int saved = blas ? 1 : blas_single_begin();
    #pragma omp parallel num_threads(nthr) if (nthr > 1 && ntasks > 1)
    {
        char *p = scratch + per * (size_t)thread_id();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntasks; t++) {
            int64_t bh = t / ng, grp = t % ng;
            kv_sink kv;
            if (grp == 0) {
                kv.dk = pair_ptr(dk, &G, bh); kv.lddk = ld_of(dk);
                kv.dv = pair_ptr(dv, &G, bh); kv.lddv = ld_of(dv);
            } else {
                kv.dk = part + ((size_t)bh * (size_t)(ng - 1) + (size_t)(grp - 1)) * kvsz;
                kv.dv = kv.dk + (size_t)G.sk * (size_t)G.d * esz;
                kv.lddk = G.d > 0 ? G.d : 1; kv.lddv = G.dv > 0 ? G.dv : 1;
            }
            zero_rows(kv.dk, G.sk, G.d, kv.lddk, esz);
            zero_rows(kv.dv, G.sk, G.dv, kv.lddv, esz);
            int64_t b1 = (grp + 1) * bpg < nblk ? (grp + 1) * bpg : nblk;
            for (int64_t b = grp * bpg; b < b1; b++) {
                int64_t i0 = b * G.bq, i1 = i0 + G.bq < G.sq ? i0 + G.bq : G.sq;
                bwd_block(&G, &io, bh, i0, i1, &kv, p, p + per / 2);
            }
        }
        /* add the partials into dK and dV in group order, row by row */
        if (ng > 1) {
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < G.nbh * G.sk; r++) {
                int64_t bh = r / G.sk, j = r % G.sk;
                for (int which = 0; which < 2; which++) {
                    const nemo_tensor *dst = which ? dv : dk;
                    int64_t w = which ? G.dv : G.d;
                    char *row = pair_ptr(dst, &G, bh) + j * ld_of(dst) * (int64_t)esz;
                    for (int64_t grp = 1; grp < ng; grp++) {
                        const char *src = part + ((size_t)bh * (size_t)(ng - 1) + (size_t)(grp - 1)) * kvsz
                                          + (which ? (size_t)G.sk * (size_t)G.d * esz : 0) + (size_t)(j * w) * esz;
                        if (G.dt == NEMO_F32) {
                            float *x = (float *)row;
                            const float *y = (const float *)src;
                            for (int64_t c = 0; c < w; c++) x[c] += y[c];
                        } else {
                            double *x = (double *)row;
                            const double *y = (const double *)src;
                            for (int64_t c = 0; c < w; c++) x[c] += y[c];
                        }
                    }
                }
            }
        }
    }
    if (!blas) blas_single_end(saved);
    nemo_dev_free(NEMO_CPU, 0, scratch, per * (size_t)nthr + npart * kvsz);
    return 0;
}
static int sdpa_bwd_cpu(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                        const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                        const nemo_tensor *o, const nemo_tensor *lse, const nemo_tensor *mask,
                        int is_causal, double scale) {
    return sdpa_bwd_probs_cpu(dq, dk, dv, g, q, k, v, o, lse, NULL, mask, is_causal, scale);
}
NEMO_REGISTER_KERNEL("sdpa_bwd", NEMO_CPU, sdpa_bwd_cpu)
/* sdpa_bwd reading the forward's kept probabilities p (sdpa_fwd_p) instead of recomputing them. */
NEMO_REGISTER_KERNEL("sdpa_bwd_p", NEMO_CPU, sdpa_bwd_probs_cpu)

/* The twins of the CUDA flash kernels ("sdpa_flash_fwd" / "sdpa_flash_bwd": bfloat16 / float16
 * operands and results, float32 lse, no mask). They widen the operands to float32, run the
 * kernels above into float32 results and round those once, which is what the front-end's float32
 * path does, so the CPU gives the same bits whichever path the front-end takes. */
static nemo_tensor *f32_like(const nemo_tensor *t) { return nemo_empty(t->ndim, t->shape, NEMO_F32, t->devtype, t->devindex); }
static int sdpa_flash_fwd_cpu(nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q, const nemo_tensor *k,
                              const nemo_tensor *v, int is_causal, double scale) {
    int rc = 0;
    nemo_tensor *qw = NULL, *kw = NULL, *vw = NULL, *ow = NULL;
    NEMO_TRYP(qw, nemo_prep(q, NEMO_F32));
    NEMO_TRYP(kw, nemo_prep(k, NEMO_F32));
    NEMO_TRYP(vw, nemo_prep(v, NEMO_F32));
    NEMO_TRYP(ow, f32_like(o));
    NEMO_TRY(sdpa_fwd_cpu(ow, lse, qw, kw, vw, NULL, is_causal, scale));
    NEMO_TRY(nemo_copy_(o, ow));
fail:
    nemo_tensor_release(qw); nemo_tensor_release(kw); nemo_tensor_release(vw); nemo_tensor_release(ow);
    return rc;
}
NEMO_REGISTER_KERNEL("sdpa_flash_fwd", NEMO_CPU, sdpa_flash_fwd_cpu)
static int sdpa_flash_bwd_cpu(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                              const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                              const nemo_tensor *o, const nemo_tensor *lse, int is_causal, double scale) {
    int rc = 0;
    nemo_tensor *gw = NULL, *qw = NULL, *kw = NULL, *vw = NULL, *ow = NULL, *dqw = NULL, *dkw = NULL, *dvw = NULL;
    NEMO_TRYP(gw, nemo_prep(g, NEMO_F32));
    NEMO_TRYP(qw, nemo_prep(q, NEMO_F32));
    NEMO_TRYP(kw, nemo_prep(k, NEMO_F32));
    NEMO_TRYP(vw, nemo_prep(v, NEMO_F32));
    NEMO_TRYP(ow, nemo_prep(o, NEMO_F32));
    NEMO_TRYP(dqw, f32_like(dq));
    NEMO_TRYP(dkw, f32_like(dk));
    NEMO_TRYP(dvw, f32_like(dv));
    NEMO_TRY(sdpa_bwd_cpu(dqw, dkw, dvw, gw, qw, kw, vw, ow, lse, NULL, is_causal, scale));
    NEMO_TRY(nemo_copy_(dq, dqw));
    NEMO_TRY(nemo_copy_(dk, dkw));
    NEMO_TRY(nemo_copy_(dv, dvw));
fail:
    nemo_tensor_release(gw); nemo_tensor_release(qw); nemo_tensor_release(kw); nemo_tensor_release(vw);
    nemo_tensor_release(ow); nemo_tensor_release(dqw); nemo_tensor_release(dkw); nemo_tensor_release(dvw);
    return rc;
}
NEMO_REGISTER_KERNEL("sdpa_flash_bwd", NEMO_CPU, sdpa_flash_bwd_cpu)
