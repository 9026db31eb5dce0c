/*
 * kernels/cuda/attention.cu: scaled dot-product attention on CUDA, forward and backward, with
 * the signatures and the algorithm of kernels/cpu/linalg.c (front-end: engine/ops/linalg.c):
 *
 *   "sdpa_fwd"  int (o, lse, q, k, v, mask, is_causal, scale)
 *   "sdpa_bwd"  int (dq, dk, dv, g, q, k, v, o, lse, mask, is_causal, scale)
 *       q (lead..., Sq, D), k (lead..., Sk, D), v (lead..., Sk, Dv), o / g (lead..., Sq, Dv),
 *       dq / dk / dv shaped like q / k / v: float32 or float64, last dim contiguous, any strides
 *       over the leading (batch, head) dims and rows (a permuted (B, S, H, D) buffer works as
 *       is); lse (lead..., Sq) dense; mask NULL or a (lead..., Sq, Sk) view (broadcast strides)
 *       of bool (nonzero = attend) or the compute dtype (added). A query row that attends to
 *       nothing gives zeros (lse = -inf) and no gradient. is_causal: query i sees keys j <= i.
 *
 * How (the CPU's blocked algorithm, with cuBLAS products over many heads at once):
 *   forward, per block of query rows of a chunk of (batch, head) pairs:
 *     S = scale Q K^T (batched gemm) -> per row: mask, max, P = exp(S - max) and its sum
 *     (lse = max + log sum, rinv = 1 / sum) -> O = P V (batched gemm) -> O rows *= rinv;
 *   backward, per block:
 *     P = exp(scale Q K^T + mask - lse), dV += P^T dO, dP = dO V^T,
 *     dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK += scale dS^T Q.
 * Only O and lse live between forward and backward. The score blocks live in the plugin's
 * scratch buffer: a block holds at most ATT_ELEMS scores (all query rows of several pairs when
 * they fit, else as many rows of one pair as fit), so memory stays bounded for any length.
 *
 * Non-obvious rules
 * - Deterministic: every reduction is a fixed tree or a cuBLAS product on one stream, and dK /
 *   dV accumulate over query blocks in block order (beta = 1), never with atomics. The block
 *   plan depends on the shapes only.
 * - Batches of pairs go to cuBLAS as device arrays of pointers (filled by a small kernel from
 *   each tensor's leading-dim strides), so no layout is copied.
 * - Differences from the CPU are rounding only: row sums in double here (float there), CUDA's
 *   expf instead of the CPU's polynomial, cuBLAS's summation order; with whole-length query
 *   blocks the dK / dV products are also summed in one piece instead of 256-row pieces.
 * - This is the general path (float32 / float64 CUDA-core products, O(Sq*Sk) score traffic per
 *   block, masks, any head dim). bf16 / f16 attention without a mask at head dim 64 or 128 runs
 *   the fused kernels of flash.cuh instead (at the end of this file; docs/cuda.md).
 */
#include <algorithm>
#include "util.cuh"

#define ATT_ELEMS ((int64_t)16 << 20)   /* scores per block (64 MiB in float32) */

/* ==== Leading (batch, head) dims ==== */

struct lead_t {
    int n;
    int64_t shape[NEMO_MAXDIM];
    int64_t stride[NEMO_MAXDIM];
};
/* Element offset of pair bh (a flat index over the leading dims). */
__host__ __device__ __forceinline__ int64_t lead_off(const lead_t &L, int64_t bh) {
    int64_t off = 0;
    for (int d = L.n - 1; d >= 0; d--) {
        int64_t i = bh % L.shape[d];
        bh /= L.shape[d];
        off += i * L.stride[d];
    }
    return off;
}
static lead_t lead_of(const nemo_tensor *t) {
    lead_t L;
    memset(&L, 0, sizeof L);
    L.n = t->ndim - 2;
    for (int d = 0; d < L.n; d++) {
        L.shape[d] = t->shape[d] > 0 ? t->shape[d] : 1;
        L.stride[d] = t->stride[d];
    }
    return L;
}
static int64_t row_ld(const nemo_tensor *t) { return t->stride[t->ndim - 2]; }

/* One gemm operand for a chunk of pairs: a tensor (pair p0 + j at lead_off) or the dense
 * scratch (pair j at j * pstride), plus a row offset; all in elements. */
struct opnd_t {
    char *base;
    lead_t lead;
    int64_t pstride, row0;
    int esz, rel;
};
__device__ __forceinline__ void *opnd_ptr(const opnd_t &o, int64_t p0, int64_t j) {
    int64_t e = o.rel ? j * o.pstride : lead_off(o.lead, p0 + j);
    return o.base + (e + o.row0) * o.esz;
}
__global__ void fill_ptrs_k(void **out, opnd_t a, opnd_t b, opnd_t c, int64_t p0, int64_t pc) {
    NEMO_CUDA_LOOP(j, pc) {
        out[j] = opnd_ptr(a, p0, j);
        out[pc + j] = opnd_ptr(b, p0, j);
        out[2 * pc + j] = opnd_ptr(c, p0, j);
    }
}
static opnd_t opnd_tensor(const nemo_tensor *t, int64_t row0) {
    opnd_t o;
    memset(&o, 0, sizeof o);
    o.base = (char *)nemo_cuda_data(t);
    o.lead = lead_of(t);
    o.row0 = row0;
    o.esz = nemo_cuda_dtype_size(t->dtype);
    return o;
}
static opnd_t opnd_scratch(void *p, int64_t pstride, int esz) {
    opnd_t o;
    memset(&o, 0, sizeof o);
    o.base = (char *)p;
    o.pstride = pstride;
    o.esz = esz;
    o.rel = 1;
    return o;
}

/* The mask as the row kernels read it: kind 0 none, 1 bool bytes, 2 compute dtype. */
struct mask_t {
    int kind;
    const char *base;
    lead_t lead;
    int64_t sq, sk;
};

/* ==== Row kernels ==== */

template <typename T>
struct MaxOf {
    __device__ T operator()(T a, T b) const { return b > a ? b : a; }
};

/* Score (masked) of row element c: mask applied to v. */
template <typename T>
__device__ __forceinline__ T masked(T v, const mask_t &mk, const char *mrow, int64_t c) {
    if (mk.kind == 1) return ((const uint8_t *)mrow)[c * mk.sk] ? v : (T)-INFINITY;
    if (mk.kind == 2) return rn_add(v, ((const T *)mrow)[c * mk.sk]);
    return v;
}
__device__ __forceinline__ const char *mask_row(const mask_t &mk, int64_t bh, int64_t i, int esz) {
    if (!mk.kind) return NULL;
    return mk.base + (lead_off(mk.lead, bh) + i * mk.sq) * (mk.kind == 1 ? 1 : esz);
}

/* Forward: rows rho < rows of the block (pair p0 + rho / nb, query i0 + rho % nb), nk keys:
 * masked scores -> exp(s - max) (0 past the causal limit), lse, rinv = 1 / sum. */
template <typename T, int G>
__global__ void att_softmax_k(T *S, T *lse, T *rinv, int64_t rows, int64_t nb, int64_t nk, int64_t p0, int64_t i0,
                              int64_t sq, int causal, mask_t mk) {
    __shared__ double smd[NEMO_CUDA_THREADS / 32];
    __shared__ T smt[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    ROW_TASKS(rho, rows, G) {
        const bool ok = rho < rows;
        const int64_t j = (ok ? rho : 0) / nb, i = i0 + (ok ? rho : 0) % nb, bh = p0 + j;
        T *x = S + (ok ? rho : 0) * nk;
        const int64_t nc = causal ? (i + 1 < nk ? i + 1 : nk) : nk;
        const char *mrow = ok ? mask_row(mk, bh, i, (int)sizeof(T)) : NULL;
        T m = (T)-INFINITY;
        if (ok)
            for (int64_t c = lane; c < nc; c += G) {
                T v = masked<T>(x[c], mk, mrow, c);
                x[c] = v;
                m = v > m ? v : m;
            }
        m = nemo_cuda_group_reduce<G>(m, MaxOf<T>(), smt);
        m = nemo_cuda_group_bcast<G>(m, smt);
        double s = 0.0;
        if (ok && m != (T)-INFINITY)
            for (int64_t c = lane; c < nk; c += G) {
                T e = c < nc ? k_exp(rn_sub(x[c], m)) : (T)0;
                x[c] = e;
                s = __dadd_rn(s, (double)e);
            }
        s = group_sum<G>(s, smd);
        if (ok) {
            if (m == (T)-INFINITY) {   /* attends to nothing: zeros */
                for (int64_t c = lane; c < nk; c += G) x[c] = (T)0;
                if (lane == 0) { lse[bh * sq + i] = (T)-INFINITY; rinv[rho] = (T)0; }
            } else if (lane == 0) {
                lse[bh * sq + i] = rn_add(m, k_log((T)s));
                rinv[rho] = (T)1 / (T)s;
            }
        }
    }
}

/* o rows of the block *= rinv (a warp per row). */
template <typename T>
__global__ void att_scale_rows_k(char *o, lead_t lo, int64_t ldo, const T *rinv, int64_t rows, int64_t nb, int64_t dv,
                                 int64_t p0, int64_t i0) {
    const int lane = threadIdx.x % 32;
    ROW_TASKS(rho, rows, 32) {
        if (rho < rows) {
            T *orow = (T *)o + lead_off(lo, p0 + rho / nb) + (i0 + rho % nb) * ldo;
            const T f = rinv[rho];
            for (int64_t c = lane; c < dv; c += 32) orow[c] = rn_mul(orow[c], f);
        }
    }
}

/* Backward: S -> P = exp(S + mask - lse) (0 past the causal limit and for empty rows); a
 * warp per row. */
template <typename T>
__global__ void att_probs_k(T *S, const T *lse, int64_t rows, int64_t nb, int64_t nk, int64_t p0, int64_t i0,
                            int64_t sq, int causal, mask_t mk) {
    const int lane = threadIdx.x % 32;
    ROW_TASKS(rho, rows, 32) {
        if (rho < rows) {
            const int64_t bh = p0 + rho / nb, i = i0 + rho % nb;
            const T l = lse[bh * sq + i];
            int64_t nc = causal ? (i + 1 < nk ? i + 1 : nk) : nk;
            if (l == (T)-INFINITY) nc = 0;
            const char *mrow = mask_row(mk, bh, i, (int)sizeof(T));
            T *x = S + rho * nk;
            for (int64_t c = lane; c < nk; c += 32) x[c] = c < nc ? k_exp(rn_sub(masked<T>(x[c], mk, mrow, c), l)) : (T)0;
        }
    }
}

/* Backward: P := dS = P * (dP - Di), Di = sum_c dO[c] * O[c] of the row. */
template <typename T, int G>
__global__ void att_dsoftmax_k(T *P, const T *dP, const char *g, lead_t lg, int64_t ldg, const char *o, lead_t lo,
                               int64_t ldo, int64_t rows, int64_t nb, int64_t nk, int64_t dv, int64_t p0, int64_t i0) {
    __shared__ double smd[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    ROW_TASKS(rho, rows, G) {
        const bool ok = rho < rows;
        const int64_t r = ok ? rho : 0, bh = p0 + r / nb, i = i0 + r % nb;
        double s = 0.0;
        if (ok) {
            const T *gr = (const T *)g + lead_off(lg, bh) + i * ldg, *orow = (const T *)o + lead_off(lo, bh) + i * ldo;
            for (int64_t c = lane; c < dv; c += G) s = __dadd_rn(s, (double)rn_mul(gr[c], orow[c]));
        }
        s = group_sum<G>(s, smd);
        if (ok) {
            const T di = (T)s;
            T *x = P + r * nk;
            const T *y = dP + r * nk;
            for (int64_t c = lane; c < nk; c += G) x[c] = rn_mul(x[c], rn_sub(y[c], di));
        }
    }
}

/* Zero a (lead..., rows, cols) view; lse-like fill of a dense array. */
template <typename T>
__global__ void att_zero_k(char *base, lead_t L, int64_t nbh, int64_t rows, int64_t cols, int64_t ld) {
    NEMO_CUDA_LOOP(e, nbh * rows * cols) {
        const int64_t bh = e / (rows * cols), rc = e % (rows * cols);
        ((T *)base)[lead_off(L, bh) + (rc / cols) * ld + rc % cols] = (T)0;
    }
}
template <typename T>
__global__ void att_fill_k(T *p, int64_t n, T v) {
    NEMO_CUDA_LOOP(i, n) p[i] = v;
}

/* ==== Geometry and checks ==== */

typedef struct {
    int dt, esz, causal;
    int64_t nbh, sq, sk, d, dv;
    double scale;
    mask_t mk;
    int64_t bq, pc;   /* query rows per block, pairs per chunk */
} att_geom;

static int att_tensor(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int nd,
                      const int64_t *lead, int64_t rows, int64_t cols) {
    NEMO_CUDA_RC(k_need(op, what, t));
    NEMO_CUDA_RC(k_check(op, what, t, ref, ref->dtype));
    int ok = t->ndim == nd && t->shape[nd - 2] == rows && t->shape[nd - 1] == cols;
    for (int d = 0; ok && d < nd - 2; d++) ok = t->shape[d] == lead[d];
    if (!ok)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: %s has %d dims, expected (lead, %lld, %lld) with the query's lead dims",
                               op, what, t->ndim, (long long)rows, (long long)cols);
    if (cols > 1 && t->stride[nd - 1] != 1)
        return nemo_cuda_error(NEMO_EINVAL, "%s: %s has last-dim stride %lld, expected 1 (the front-end makes it so)", op,
                               what, (long long)t->stride[nd - 1]);
    if (rows > 1 && t->stride[nd - 2] < cols)
        return nemo_cuda_error(NEMO_EINVAL, "%s: %s has row stride %lld for rows of %lld", op, what,
                               (long long)t->stride[nd - 2], (long long)cols);
    return 0;
}

static int att_setup(const char *op, att_geom *G, const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                     const nemo_tensor *lse, const nemo_tensor *mask, int causal, double scale) {
    memset(G, 0, sizeof *G);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, q));
    const int nd = q->ndim;
    if (nd < 2) return nemo_cuda_error(NEMO_ESHAPE, "%s: query has %d dims, expected at least 2", op, nd);
    NEMO_CUDA_RC(k_need(op, "key", k));
    NEMO_CUDA_RC(k_need(op, "value", v));
    G->dt = q->dtype;
    G->esz = nemo_cuda_dtype_size(q->dtype);
    G->causal = causal != 0;
    G->scale = scale;
    G->nbh = 1;
    for (int d = 0; d < nd - 2; d++) G->nbh *= q->shape[d];
    G->sq = q->shape[nd - 2];
    G->d = q->shape[nd - 1];
    G->sk = k->ndim == nd ? k->shape[nd - 2] : 0;
    G->dv = v->ndim == nd ? v->shape[nd - 1] : 0;
    NEMO_CUDA_RC(att_tensor(op, "query", q, q, nd, q->shape, G->sq, G->d));
    NEMO_CUDA_RC(att_tensor(op, "key", k, q, nd, q->shape, G->sk, G->d));
    NEMO_CUDA_RC(att_tensor(op, "value", v, q, nd, q->shape, G->sk, G->dv));
    NEMO_CUDA_RC(k_need(op, "logsumexp", lse));
    NEMO_CUDA_RC(k_check(op, "logsumexp", lse, q, q->dtype));
    if (nemo_cuda_numel(lse) != G->nbh * G->sq)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: logsumexp has %lld values, expected %lld", op,
                               (long long)nemo_cuda_numel(lse), (long long)(G->nbh * G->sq));
    if (mask) {
        NEMO_CUDA_RC(k_check(op, "mask", mask, q, mask->dtype == NEMO_BOOL ? NEMO_BOOL : q->dtype));
        if (causal) return nemo_cuda_error(NEMO_EINVAL, "%s: a mask and is_causal together", op);
        int ok = mask->ndim == nd && mask->shape[nd - 2] == G->sq && mask->shape[nd - 1] == G->sk;
        for (int d = 0; ok && d < nd - 2; d++) ok = mask->shape[d] == q->shape[d];
        if (!ok) return nemo_cuda_error(NEMO_ESHAPE, "%s: the mask view must be (lead, Sq, Sk) like the scores", op);
        G->mk.kind = mask->dtype == NEMO_BOOL ? 1 : 2;
        G->mk.base = (const char *)nemo_cuda_data(mask);
        G->mk.lead = lead_of(mask);
        G->mk.sq = mask->stride[nd - 2];
        G->mk.sk = mask->stride[nd - 1];
    }
    /* the block plan: whole query ranges of several pairs when they fit, else rows of one pair */
    const int64_t sk1 = G->sk > 0 ? G->sk : 1, sq1 = G->sq > 0 ? G->sq : 1;
    if (sq1 * sk1 <= ATT_ELEMS) {
        G->bq = sq1;
        G->pc = k_clamp(ATT_ELEMS / (sq1 * sk1), 1, G->nbh > 0 ? G->nbh : 1);
    } else {
        int64_t b = ATT_ELEMS / sk1;
        if (b >= 64) b = b / 64 * 64;
        G->bq = k_clamp(b, 1, sq1);
        G->pc = 1;
    }
    return 0;
}

/* Fill the three pointer arrays (A at ptrs, B at ptrs + pc, C at ptrs + 2 pc) for pairs
 * [p0, p0 + pc). */
static int fill_ptrs(const char *op, int dev, void **ptrs, const opnd_t &a, const opnd_t &b, const opnd_t &c,
                     int64_t p0, int64_t pc, cudaStream_t st) {
    fill_ptrs_k<<<k_blocks(pc), NEMO_CUDA_THREADS, 0, st>>>(ptrs, a, b, c, p0, pc);
    NEMO_CUDA_LAUNCHED("%s: pointer kernel launch on cuda:%d", op, dev);
    return 0;
}
#define PA(ptrs) ((const void *const *)(ptrs))
#define PB(ptrs, pc) ((const void *const *)((ptrs) + (pc)))
#define PC(ptrs, pc) ((void *const *)((ptrs) + 2 * (pc)))

/* ==== Forward ==== */

template <typename T>
static int att_fwd(const char *op, const att_geom *G, nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q,
                   const nemo_tensor *k, const nemo_tensor *v, int dev, cudaStream_t st) {
    const int64_t nbh = G->nbh, sq = G->sq, sk = G->sk;
    if (sk == 0) {   /* nothing to attend to: zeros, lse = -inf */
        att_zero_k<T><<<k_blocks(nbh * sq * G->dv), NEMO_CUDA_THREADS, 0, st>>>((char *)nemo_cuda_data(o), lead_of(o),
                                                                                 nbh, sq, G->dv, row_ld(o));
        att_fill_k<T><<<k_blocks(nbh * sq), NEMO_CUDA_THREADS, 0, st>>>((T *)nemo_cuda_data(lse), nbh * sq,
                                                                         (T)-INFINITY);
        NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d", op, dev);
        return 0;
    }
    k_carve cv = {NULL, 0};
    k_take(&cv, (size_t)(G->pc * G->bq * sk) * sizeof(T));
    k_take(&cv, (size_t)(G->pc * G->bq) * sizeof(T));
    k_take(&cv, (size_t)(3 * G->pc) * sizeof(void *));
    void *base = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, cv.off, &base));
    cv.base = (char *)base;
    cv.off = 0;
    T *S = (T *)k_take(&cv, (size_t)(G->pc * G->bq * sk) * sizeof(T));
    T *rinv = (T *)k_take(&cv, (size_t)(G->pc * G->bq) * sizeof(T));
    void **ptrs = (void **)k_take(&cv, (size_t)(3 * G->pc) * sizeof(void *));
    const int64_t ldq = row_ld(q), ldk = row_ld(k), ldv = row_ld(v), ldo = row_ld(o);
    const lead_t lo = lead_of(o);
    for (int64_t p0 = 0; p0 < nbh; p0 += G->pc) {
        const int64_t pc = std::min(G->pc, nbh - p0);
        for (int64_t i0 = 0; i0 < sq; i0 += G->bq) {
            const int64_t i1 = std::min(i0 + G->bq, sq), nb = i1 - i0, nk = G->causal ? std::min(i1, sk) : sk;
            const int64_t rows = pc * nb;
            /* S = scale Q K^T */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, opnd_tensor(q, i0 * ldq), opnd_tensor(k, 0),
                                   opnd_scratch(S, nb * nk, (int)sizeof(T)), p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 0, 1, nb, nk, G->d, G->scale, PA(ptrs), ldq, PB(ptrs, pc),
                                             ldk, 0.0, PC(ptrs, pc), nk, pc));
            /* P (unnormalised), lse, rinv */
            const int grp = row_group(nk);
            if (grp == 32)
                att_softmax_k<T, 32><<<row_blocks(rows, 32), NEMO_CUDA_THREADS, 0, st>>>(
                    S, (T *)nemo_cuda_data(lse), rinv, rows, nb, nk, p0, i0, sq, G->causal, G->mk);
            else
                att_softmax_k<T, NEMO_CUDA_THREADS><<<row_blocks(rows, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
                    S, (T *)nemo_cuda_data(lse), rinv, rows, nb, nk, p0, i0, sq, G->causal, G->mk);
            NEMO_CUDA_LAUNCHED("%s: softmax kernel launch on cuda:%d", op, dev);
            /* O = P V, then O *= rinv */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, opnd_scratch(S, nb * nk, (int)sizeof(T)), opnd_tensor(v, 0),
                                   opnd_tensor(o, i0 * ldo), p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 0, 0, nb, G->dv, nk, 1.0, PA(ptrs), nk, PB(ptrs, pc), ldv,
                                             0.0, PC(ptrs, pc), ldo, pc));
            if (G->dv > 0) {
                att_scale_rows_k<T><<<row_blocks(rows, 32), NEMO_CUDA_THREADS, 0, st>>>(
                    (char *)nemo_cuda_data(o), lo, ldo, rinv, rows, nb, G->dv, p0, i0);
                NEMO_CUDA_LAUNCHED("%s: row scale kernel launch on cuda:%d", op, dev);
            }
        }
    }
    return 0;
}

static int sdpa_fwd_cuda(nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q, const nemo_tensor *k,
                         const nemo_tensor *v, const nemo_tensor *mask, int is_causal, double scale) {
    static const char op[] = "scaled_dot_product_attention";
    NEMO_CUDA_ENTER(op, q);
    att_geom G;
    NEMO_CUDA_RC(att_setup(op, &G, q, k, v, lse, mask, is_causal, scale));
    NEMO_CUDA_RC(att_tensor(op, "output", o, q, q->ndim, q->shape, G.sq, G.dv));
    if (G.nbh == 0 || G.sq == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(q->devindex);
    if (G.dt == NEMO_F32) NEMO_CUDA_RC(att_fwd<float>(op, &G, o, lse, q, k, v, q->devindex, st));
    else NEMO_CUDA_RC(att_fwd<double>(op, &G, o, lse, q, k, v, q->devindex, st));
    return 0;
}
NEMO_CUDA_KERNEL("sdpa_fwd", sdpa_fwd_cuda)

/* ==== Backward ==== */

template <typename T>
static void zero_view(const nemo_tensor *t, int64_t nbh, cudaStream_t st) {
    const int nd = t->ndim;
    const int64_t rows = t->shape[nd - 2], cols = t->shape[nd - 1];
    att_zero_k<T><<<k_blocks(nbh * rows * cols), NEMO_CUDA_THREADS, 0, st>>>((char *)nemo_cuda_data(t), lead_of(t), nbh,
                                                                              rows, cols, row_ld(t));
}

template <typename T>
static int att_bwd(const char *op, const att_geom *G, nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv,
                   const nemo_tensor *g, const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                   const nemo_tensor *o, const nemo_tensor *lse, int dev, cudaStream_t st) {
    const int64_t nbh = G->nbh, sq = G->sq, sk = G->sk;
    zero_view<T>(dk, nbh, st);
    zero_view<T>(dv, nbh, st);
    if (sk == 0) zero_view<T>(dq, nbh, st);
    NEMO_CUDA_LAUNCHED("%s: zero kernel launch on cuda:%d", op, dev);
    if (sq == 0 || sk == 0) return 0;
    k_carve cv = {NULL, 0};
    k_take(&cv, (size_t)(G->pc * G->bq * sk) * sizeof(T));
    k_take(&cv, (size_t)(G->pc * G->bq * sk) * sizeof(T));
    k_take(&cv, (size_t)(3 * G->pc) * sizeof(void *));
    void *base = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, cv.off, &base));
    cv.base = (char *)base;
    cv.off = 0;
    T *P = (T *)k_take(&cv, (size_t)(G->pc * G->bq * sk) * sizeof(T));
    T *dP = (T *)k_take(&cv, (size_t)(G->pc * G->bq * sk) * sizeof(T));
    void **ptrs = (void **)k_take(&cv, (size_t)(3 * G->pc) * sizeof(void *));
    const int64_t ldq = row_ld(q), ldk = row_ld(k), ldv = row_ld(v), ldo = row_ld(o), ldg = row_ld(g);
    const int64_t lddq = row_ld(dq), lddk = row_ld(dk), lddv = row_ld(dv);
    const lead_t lg = lead_of(g), lo = lead_of(o);
    const T *L = (const T *)nemo_cuda_data(lse);
    for (int64_t p0 = 0; p0 < nbh; p0 += G->pc) {
        const int64_t pc = std::min(G->pc, nbh - p0);
        for (int64_t i0 = 0; i0 < sq; i0 += G->bq) {
            const int64_t i1 = std::min(i0 + G->bq, sq), nb = i1 - i0, nk = G->causal ? std::min(i1, sk) : sk;
            const int64_t rows = pc * nb;
            const opnd_t sP = opnd_scratch(P, nb * nk, (int)sizeof(T)), sdP = opnd_scratch(dP, nb * nk, (int)sizeof(T));
            /* P = exp(scale Q K^T + mask - lse) */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, opnd_tensor(q, i0 * ldq), opnd_tensor(k, 0), sP, p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 0, 1, nb, nk, G->d, G->scale, PA(ptrs), ldq, PB(ptrs, pc),
                                             ldk, 0.0, PC(ptrs, pc), nk, pc));
            att_probs_k<T><<<row_blocks(rows, 32), NEMO_CUDA_THREADS, 0, st>>>(P, L, rows, nb, nk, p0, i0, sq, G->causal,
                                                                               G->mk);
            NEMO_CUDA_LAUNCHED("%s: probabilities kernel launch on cuda:%d", op, dev);
            /* dV += P^T dO */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, sP, opnd_tensor(g, i0 * ldg), opnd_tensor(dv, 0), p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 1, 0, nk, G->dv, nb, 1.0, PA(ptrs), nk, PB(ptrs, pc), ldg,
                                             1.0, PC(ptrs, pc), lddv, pc));
            /* dP = dO V^T */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, opnd_tensor(g, i0 * ldg), opnd_tensor(v, 0), sdP, p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 0, 1, nb, nk, G->dv, 1.0, PA(ptrs), ldg, PB(ptrs, pc), ldv,
                                             0.0, PC(ptrs, pc), nk, pc));
            /* dS = P * (dP - rowsum(dO * O)) */
            if (row_group(std::max(nk, G->dv)) == 32)
                att_dsoftmax_k<T, 32><<<row_blocks(rows, 32), NEMO_CUDA_THREADS, 0, st>>>(
                    P, dP, (const char *)nemo_cuda_data(g), lg, ldg, (const char *)nemo_cuda_data(o), lo, ldo, rows, nb,
                    nk, G->dv, p0, i0);
            else
                att_dsoftmax_k<T, NEMO_CUDA_THREADS><<<row_blocks(rows, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
                    P, dP, (const char *)nemo_cuda_data(g), lg, ldg, (const char *)nemo_cuda_data(o), lo, ldo, rows, nb,
                    nk, G->dv, p0, i0);
            NEMO_CUDA_LAUNCHED("%s: softmax gradient kernel launch on cuda:%d", op, dev);
            /* dQ = scale dS K */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, sP, opnd_tensor(k, 0), opnd_tensor(dq, i0 * lddq), p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 0, 0, nb, G->d, nk, G->scale, PA(ptrs), nk, PB(ptrs, pc),
                                             ldk, 0.0, PC(ptrs, pc), lddq, pc));
            /* dK += scale dS^T Q */
            NEMO_CUDA_RC(fill_ptrs(op, dev, ptrs, sP, opnd_tensor(q, i0 * ldq), opnd_tensor(dk, 0), p0, pc, st));
            NEMO_CUDA_RC(nemo_cuda_gemm_ptrs(op, dev, G->dt, 1, 0, nk, G->d, nb, G->scale, PA(ptrs), nk, PB(ptrs, pc),
                                             ldq, 1.0, PC(ptrs, pc), lddk, pc));
        }
    }
    return 0;
}

static int sdpa_bwd_cuda(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g, const nemo_tensor *q,
                         const nemo_tensor *k, const nemo_tensor *v, const nemo_tensor *o, const nemo_tensor *lse,
                         const nemo_tensor *mask, int is_causal, double scale) {
    static const char op[] = "scaled_dot_product_attention backward";
    NEMO_CUDA_ENTER(op, q);
    att_geom G;
    NEMO_CUDA_RC(att_setup(op, &G, q, k, v, lse, mask, is_causal, scale));
    const int nd = q->ndim;
    NEMO_CUDA_RC(att_tensor(op, "gradient", g, q, nd, q->shape, G.sq, G.dv));
    NEMO_CUDA_RC(att_tensor(op, "output", o, q, nd, q->shape, G.sq, G.dv));
    NEMO_CUDA_RC(att_tensor(op, "query gradient", dq, q, nd, q->shape, G.sq, G.d));
    NEMO_CUDA_RC(att_tensor(op, "key gradient", dk, q, nd, q->shape, G.sk, G.d));
    NEMO_CUDA_RC(att_tensor(op, "value gradient", dv, q, nd, q->shape, G.sk, G.dv));
    if (G.nbh == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(q->devindex);
    if (G.dt == NEMO_F32) NEMO_CUDA_RC(att_bwd<float>(op, &G, dq, dk, dv, g, q, k, v, o, lse, q->devindex, st));
    else NEMO_CUDA_RC(att_bwd<double>(op, &G, dq, dk, dv, g, q, k, v, o, lse, q->devindex, st));
    return 0;
}
NEMO_CUDA_KERNEL("sdpa_bwd", sdpa_bwd_cuda)

/* ==== Fused attention for bfloat16 / float16 (flash.cuh) ====
 *
 *   "sdpa_flash_fwd"  int (o, lse, q, k, v, is_causal, scale)
 *   "sdpa_flash_bwd"  int (dq, dk, dv, g, q, k, v, o, lse, is_causal, scale)
 *       q, k, v, o, g, dq, dk, dv: one dtype, bfloat16 or float16, head dim 64 or 128 (Dv = D),
 *       last dim contiguous, 16-byte aligned rows, row and leading strides multiples of 8
 *       elements (the front-end copies an operand that is not so); lse float32 (lead..., Sq)
 *       dense. No mask: the front-end sends masked attention to "sdpa_fwd".
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef NEMO_CUDA_EMU   /* tests/cuda_emu: the launch's dynamic shared memory, an emulated warp's mma */
#define fl_smem_ (nemo_emu::dyn_smem())
#else
extern __shared__ __align__(16) char fl_smem_[];
#endif
#define FL_GLOBAL __global__ __launch_bounds__(FL_T)
#define FL_DEV __device__ __forceinline__
#define FL_UNROLL _Pragma("unroll")
#define FL_TID ((int)threadIdx.x)
#define FL_BX ((int64_t)blockIdx.x)
#define FL_BY ((int64_t)blockIdx.y)
#define FL_GX ((int64_t)gridDim.x)
#define FL_GY ((int64_t)gridDim.y)
#define FL_SMEM fl_smem_
__device__ __forceinline__ void fl_sync() { __syncthreads(); }
__device__ __forceinline__ float fl_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ float fl_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ float fl_log2(float x) { return log2f(x); }
template <int E> __device__ __forceinline__ void fl_mma(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <int TRANS> __device__ __forceinline__ void fl_ldsm(uint32_t r[4], const uint16_t *row);
#ifdef NEMO_CUDA_EMU
template <int E> void fl_mma(float d[4], const uint32_t a[4], const uint32_t b[2]) { nemo_emu::mma(E, d, a, b); }
template <int TRANS> void fl_ldsm(uint32_t r[4], const uint16_t *row) { nemo_emu::ldmatrix(r, row, TRANS); }
static inline void fl_cp16(uint16_t *dst, const uint16_t *src, bool full) { nemo_emu::cp_async(dst, src, full ? 16 : 0); }
static inline void fl_cp_commit() { nemo_emu::cp_commit(); }
template <int N> void fl_cp_wait() { nemo_emu::cp_wait(N); }
#else
template <> __device__ __forceinline__ void fl_mma<0>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void fl_mma<1>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
/* Shared-memory operands as 32-bit shared-window addresses. The ldmatrix / cp.async asm is
 * volatile and the waits clobber memory, so the compiler keeps them in program order with the
 * barriers around them. */
__device__ __forceinline__ uint32_t fl_saddr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
template <> __device__ __forceinline__ void fl_ldsm<0>(uint32_t r[4], const uint16_t *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fl_saddr(row)));
}
template <> __device__ __forceinline__ void fl_ldsm<1>(uint32_t r[4], const uint16_t *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fl_saddr(row)));
}
__device__ __forceinline__ void fl_cp16(uint16_t *dst, const uint16_t *src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fl_saddr(dst)), "l"(src), "r"(full ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void fl_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void fl_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif
template <int E> __device__ __forceinline__ uint32_t fl_pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t fl_pack<0>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&h;
}
template <> __device__ __forceinline__ uint32_t fl_pack<1>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
}
template <int E> __device__ __forceinline__ float fl_f32(uint16_t h) {
    return E == 0 ? nemo_cuda_bf16_to_f32(h) : __half2float(__ushort_as_half(h));
}

#include "flash.cuh"

/* t as a flash operand (checks what the kernels rely on; see the header above). */
static int fl_mat_of(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int64_t rows,
                     int64_t d, fl_mat *m) {
    NEMO_CUDA_RC(k_need(op, what, t));
    NEMO_CUDA_RC(k_check(op, what, t, ref, ref->dtype));
    const int nd = ref->ndim;
    int ok = t->ndim == nd && t->shape[nd - 2] == rows && t->shape[nd - 1] == d;
    for (int i = 0; ok && i < nd - 2; i++) ok = t->shape[i] == ref->shape[i];
    if (!ok)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: %s has %d dims, expected (lead, %lld, %lld) with the query's lead dims",
                               op, what, t->ndim, (long long)rows, (long long)d);
    memset(m, 0, sizeof *m);
    m->p = (uint16_t *)nemo_cuda_data(t);
    m->ld = t->stride[nd - 2];
    int aligned = t->stride[nd - 1] == 1 && m->ld % 8 == 0 && ((uintptr_t)m->p & 15) == 0;
    for (int i = 0; i < nd - 2; i++) {
        m->ls[i] = t->stride[i];
        aligned = aligned && (t->stride[i] % 8 == 0 || t->shape[i] == 1);
    }
    if (!aligned)
        return nemo_cuda_error(NEMO_EINVAL, "%s: %s must have a contiguous last dim, 16-byte aligned rows and strides "
                               "that are multiples of 8 elements (the front-end copies it)", op, what);
    return 0;
}

/* Geometry and q / k / v / o of both directions. */
static int fl_setup(const char *op, fl_args *A, const nemo_tensor *o, const nemo_tensor *q, const nemo_tensor *k,
                    const nemo_tensor *v, const nemo_tensor *lse, int causal, double scale) {
    memset(A, 0, sizeof *A);
    const int nd = q->ndim;
    if (q->dtype != NEMO_BF16 && q->dtype != NEMO_F16)
        return nemo_cuda_error(NEMO_EDTYPE, "%s: expects bfloat16 or float16, got %s", op, nemo_cuda_dtype_name(q->dtype));
    if (nd < 2 || nd - 2 > FL_MAXLEAD)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: query has %d dims, expected 2 to %d", op, nd, FL_MAXLEAD + 2);
    const int64_t d = q->shape[nd - 1];
    if (d != 64 && d != 128) return nemo_cuda_error(NEMO_ESHAPE, "%s: head dim %lld, expected 64 or 128", op, (long long)d);
    NEMO_CUDA_RC(k_need(op, "key", k));
    A->nlead = nd - 2;
    A->causal = causal != 0;
    A->nbh = 1;
    for (int i = 0; i < nd - 2; i++) A->nbh *= (A->lshape[i] = q->shape[i]);
    A->sq = q->shape[nd - 2];
    A->sk = k->ndim == nd ? k->shape[nd - 2] : 0;
    A->scale = (float)scale;
    A->scale_log2 = (float)(scale * 1.4426950408889634);
    NEMO_CUDA_RC(fl_mat_of(op, "query", q, q, A->sq, d, &A->q));
    NEMO_CUDA_RC(fl_mat_of(op, "key", k, q, A->sk, d, &A->k));
    NEMO_CUDA_RC(fl_mat_of(op, "value", v, q, A->sk, d, &A->v));
    NEMO_CUDA_RC(fl_mat_of(op, "output", o, q, A->sq, d, &A->o));
    NEMO_CUDA_RC(k_need(op, "logsumexp", lse));
    NEMO_CUDA_RC(k_check(op, "logsumexp", lse, q, NEMO_F32));
    int dense = nemo_cuda_numel(lse) == A->nbh * A->sq;
    int64_t want = 1;
    for (int i = lse->ndim - 1; dense && i >= 0; want *= lse->shape[i], i--)
        dense = lse->shape[i] == 1 || lse->stride[i] == want;
    if (!dense)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: logsumexp must be dense with %lld values", op, (long long)(A->nbh * A->sq));
    A->lse = (float *)nemo_cuda_data(lse);
    if (A->sq <= 0 || A->sk <= 0 || A->nbh > INT32_MAX || (A->sq + 63) / 64 > 65535 || (A->sk + 63) / 64 > 65535)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: sizes (pairs %lld, Sq %lld, Sk %lld) outside 1..2^31 pairs and "
                               "1..4194240 rows", op, (long long)A->nbh, (long long)A->sq, (long long)A->sk);
    return 0;
}

/* kernel<<<(nbh, tiles), 128, smem>>> after opting in to its shared memory. */
static int fl_launch(const char *op, int dev, void (*kernel)(const fl_args), const fl_args &A, int64_t gx, int64_t gy,
                     int smem, cudaStream_t st) {
    NEMO_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                  "%s: %d bytes of shared memory on cuda:%d", op, smem, dev);
    kernel<<<dim3((unsigned)gx, (unsigned)gy), FL_T, (size_t)smem, st>>>(A);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d", op, dev);
    return 0;
}

/* The kernel family: rows a warp owns, 32 (the default: 128-row forward blocks, 32 x 32 warp
 * tiles in the backward) or 16 when NEMO_FLASH_WARP_ROWS=16 (64-row forward blocks with Q in
 * registers, 16-key / 16-query warps in the backward), read at each call; tests/gpu/check_ops.lua
 * checks and times both. */
static int fl_warp_rows(void) {
    const char *e = getenv("NEMO_FLASH_WARP_ROWS");
    return e && atoi(e) == 16 ? 16 : 32;
}
template <int D, int E>
static int fl_fwd(const char *op, const fl_args &A, int dev, cudaStream_t st) {
    if (fl_warp_rows() == 16)
        return fl_launch(op, dev, fl_fwd_k<D, E, 1>, A, A.nbh, (A.sq + 63) / 64, fl_fwd_smem<D, 1>(), st);
    return fl_launch(op, dev, fl_fwd_k<D, E, 2>, A, A.nbh, (A.sq + 127) / 128, fl_fwd_smem<D, 2>(), st);
}
template <int D, int E>
static int fl_bwd(const char *op, const fl_args &A, int dev, cudaStream_t st) {
    const int64_t pre = k_clamp(k_cdiv(A.nbh * A.sq, FL_W), 1, 1 << 20);
    NEMO_CUDA_RC(fl_launch(op, dev, fl_bwd_pre_k<D, E>, A, pre, 1, 0, st));
    if (fl_warp_rows() == 16) {
        NEMO_CUDA_RC(fl_launch(op, dev, fl_bwd_dkdv_k<D, E>, A, A.nbh, (A.sk + 63) / 64, fl_dkdv_smem<D>(), st));
        return fl_launch(op, dev, fl_bwd_dq_k<D, E>, A, A.nbh, (A.sq + 63) / 64, fl_dq_smem<D>(), st);
    }
    NEMO_CUDA_RC(fl_launch(op, dev, fl_bwd_dkdv32_k<D, E>, A, A.nbh, (A.sk + 63) / 64, fl_dkdv32_smem<D>(), st));
    return fl_launch(op, dev, fl_bwd_dq32_k<D, E>, A, A.nbh, (A.sq + 63) / 64, fl_dq32_smem<D>(), st);
}
/* fn<head dim, element type>(op, A, dev, st) */
#define FL_DISPATCH(fn, op, A, d, dt, dev, st)                                                   \
    ((d) == 64 ? ((dt) == NEMO_BF16 ? fn<64, FL_BF16>(op, A, dev, st) : fn<64, FL_F16>(op, A, dev, st)) \
               : ((dt) == NEMO_BF16 ? fn<128, FL_BF16>(op, A, dev, st) : fn<128, FL_F16>(op, A, dev, st)))

static int sdpa_flash_fwd_cuda(nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q, const nemo_tensor *k,
                               const nemo_tensor *v, int is_causal, double scale) {
    static const char op[] = "scaled_dot_product_attention (flash)";
    NEMO_CUDA_ENTER(op, q);
    fl_args A;
    NEMO_CUDA_RC(fl_setup(op, &A, o, q, k, v, lse, is_causal, scale));
    const int64_t d = q->shape[q->ndim - 1];
    return FL_DISPATCH(fl_fwd, op, A, d, q->dtype, q->devindex, nemo_cuda_stream(q->devindex));
}
NEMO_CUDA_KERNEL("sdpa_flash_fwd", sdpa_flash_fwd_cuda)

static int sdpa_flash_bwd_cuda(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                               const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v, const nemo_tensor *o,
                               const nemo_tensor *lse, int is_causal, double scale) {
    static const char op[] = "scaled_dot_product_attention backward (flash)";
    NEMO_CUDA_ENTER(op, q);
    fl_args A;
    NEMO_CUDA_RC(fl_setup(op, &A, o, q, k, v, lse, is_causal, scale));
    const int64_t d = q->shape[q->ndim - 1];
    NEMO_CUDA_RC(fl_mat_of(op, "gradient", g, q, A.sq, d, &A.g));
    NEMO_CUDA_RC(fl_mat_of(op, "query gradient", dq, q, A.sq, d, &A.dq));
    NEMO_CUDA_RC(fl_mat_of(op, "key gradient", dk, q, A.sk, d, &A.dk));
    NEMO_CUDA_RC(fl_mat_of(op, "value gradient", dv, q, A.sk, d, &A.dv));
    void *scratch = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(q->devindex, sizeof(float) * (size_t)(A.nbh * A.sq), &scratch));
    A.dvec = (float *)scratch;
    return FL_DISPATCH(fl_bwd, op, A, d, q->dtype, q->devindex, nemo_cuda_stream(q->devindex));
}
NEMO_CUDA_KERNEL("sdpa_flash_bwd", sdpa_flash_bwd_cuda)
