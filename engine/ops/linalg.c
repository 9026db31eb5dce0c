/*
 * engine/ops/linalg.c: front-ends of matmul / mm / bmm / mv / dot, linear and
 * scaled_dot_product_attention, forward and backward.
 *
 * The rule of this file: operands reach the gemm kernel as matrix views of their own memory
 * (rows, cols, row stride, col stride, plus one stride per batch dim, 0 where broadcast). A view
 * BLAS can read (its last or second-to-last dim has stride 1) is never copied; only a view with
 * neither is. Batch dims that lie evenly in memory are folded into the matrix: into the rows
 * when the other operand is shared (x (B, S, K) @ W^T is one (B*S, K) x (K, N) gemm), into the
 * inner dimension when a gradient sums over them (dW = sum_b x_b^T g_b is one (K, B*S) x
 * (B*S, N) gemm). Batches that do not fold loop in the kernel; a gradient summed over a
 * broadcast dim accumulates there in batch order (beta = 1 on a zeroed output).
 * bf16/f16 operands go to the products as they are where the device has "gemm_lp" (float32
 * sums of the exact products), else are converted to float32 first; results are rounded once
 * to their dtype, by the kernel itself where the device has "gemm_lp_out" (then no float32
 * result is ever stored: on CUDA the tensor cores write bf16 with the bias added).
 */
#include <limits.h>
#include <stdlib.h>
#include "../internal.h"

/* ==== Kernel ABI (kernels/cpu/linalg.c) ==== */
/* For i < nbatch: c_i = alpha op(a_i) op(b_i) + beta c_i, row-major, a_i = a + offs[3i],
 * b_i = b + offs[3i+1], c_i = c + offs[3i+2] in elements (offs NULL: one product at a, b, c).
 * ta/tb: the operand is stored transposed. c_distinct: no two c_i overlap. */
typedef int (*gemm_k)(int dtype, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                      const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                      void *c, int64_t ldc, int64_t nbatch, const int64_t *offs, int c_distinct);
/* The same with bf16 / f16 operands and c in that dtype: c_i = round(alpha op(a_i) op(b_i) +
 * bias), the float32 result of gemm_lp onto the widened bias rounded once; bias (n) contiguous
 * in dtype or NULL; the c_i distinct ("gemm_lp_out"; optional per device). */
typedef int (*gemm_lp_out_k)(int dtype, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                             const void *a, int64_t lda, const void *b, int64_t ldb, const void *bias,
                             void *c, int64_t ldc, int64_t nbatch, const int64_t *offs);
/* out[j] = sum_i g[i*ldg + j] over a (m, n) g; out (n) contiguous in g's compute dtype. */
typedef int (*colsum_k)(int dtype, int64_t m, int64_t n, const void *g, int64_t ldg, void *out);
/* Attention over (lead..., S, D) tensors in the compute dtype with a contiguous last dim; mask
 * NULL or a (lead..., Sq, Sk) broadcast view (bool or compute dtype); lse contiguous. */
typedef int (*sdpa_fwd_k)(nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q, const nemo_tensor *k,
                          const nemo_tensor *v, const nemo_tensor *mask, int is_causal, double scale);
typedef int (*sdpa_bwd_k)(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                          const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                          const nemo_tensor *o, const nemo_tensor *lse, const nemo_tensor *mask,
                          int is_causal, double scale);
/* The same with the probabilities p ((lead..., Sq, Sk) contiguous) written by the forward and
 * read by the backward ("sdpa_fwd_p", "sdpa_bwd_p"; optional per device). */
typedef int (*sdpa_fwd_p_k)(nemo_tensor *o, nemo_tensor *lse, nemo_tensor *p, const nemo_tensor *q,
                            const nemo_tensor *k, const nemo_tensor *v, const nemo_tensor *mask, int is_causal,
                            double scale);
typedef int (*sdpa_bwd_p_k)(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                            const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                            const nemo_tensor *o, const nemo_tensor *lse, const nemo_tensor *p,
                            const nemo_tensor *mask, int is_causal, double scale);
/* Fused attention on bfloat16 / float16 operands and results with a float32 lse, no mask, head
 * dim 64 or 128 ("sdpa_flash_fwd", "sdpa_flash_bwd"; optional per device; see flash_applies). */
typedef int (*sdpa_flash_fwd_k)(nemo_tensor *o, nemo_tensor *lse, const nemo_tensor *q, const nemo_tensor *k,
                                const nemo_tensor *v, int is_causal, double scale);
typedef int (*sdpa_flash_bwd_k)(nemo_tensor *dq, nemo_tensor *dk, nemo_tensor *dv, const nemo_tensor *g,
                                const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                                const nemo_tensor *o, const nemo_tensor *lse, int is_causal, double scale);

/* ==== Matrix views ==== */

typedef struct {
    void *data;                 /* element (0, 0) of batch 0 */
    int64_t r, c, rs, cs;       /* rows, cols and their strides (elements) */
    int64_t bs[NEMO_MAXDIM];    /* stride of each batch dim; 0 where broadcast (or summed) */
} mat;

static mat mat_t(mat m) {
    int64_t t = m.r; m.r = m.c; m.c = t;
    t = m.rs; m.rs = m.cs; m.cs = t;
    return m;
}

/* How BLAS reads m: 0 row-major ((i, j) at i*ld + j), 1 stored transposed ((i, j) at i + j*ld),
 * -1 neither (the operand needs a copy). */
static int mat_layout(const mat *m, int64_t *ld) {
    int64_t r1 = m->r > 1 ? m->r : 1, c1 = m->c > 1 ? m->c : 1;
    if (m->c <= 1 || m->cs == 1) {
        int64_t l = m->r <= 1 ? c1 : m->rs;
        if (l >= c1) { *ld = l; return 0; }
    }
    if (m->r <= 1 || m->rs == 1) {
        int64_t l = m->c <= 1 ? r1 : m->cs;
        if (l >= r1) { *ld = l; return 1; }
    }
    return -1;
}

/* Matrix view of t. vec 0: its last two dims; 1: its last dim as a row (1, k); 2: its last dim
 * as a column (k, 1); 3: no matrix dims (1 x 1). The dims before the matrix broadcast against
 * bshape (nb dims, right-aligned). */
static mat mat_of(const nemo_tensor *t, int vec, int nb, const int64_t *bshape) {
    mat m;
    int nd = t->ndim, mdims = vec == 0 ? 2 : vec == 3 ? 0 : 1, tb = nd - mdims;
    m.data = nemo_tensor_data(t);
    if (vec == 0) {
        m.r = t->shape[nd - 2]; m.c = t->shape[nd - 1]; m.rs = t->stride[nd - 2]; m.cs = t->stride[nd - 1];
    } else if (vec == 1) {
        m.r = 1; m.c = t->shape[nd - 1]; m.cs = t->stride[nd - 1]; m.rs = m.c > 0 ? m.c : 1;
    } else if (vec == 2) {
        m.r = t->shape[nd - 1]; m.rs = t->stride[nd - 1]; m.c = 1; m.cs = m.r > 0 ? m.r : 1;
    } else {
        m.r = m.c = m.rs = m.cs = 1;
    }
    for (int d = 0; d < nb; d++) {
        int td = tb - nb + d;
        m.bs[d] = (td >= 0 && t->shape[td] != 1) ? t->stride[td] : 0;
    }
    (void)bshape;
    return m;
}

/* All dims but the last folded into rows: the (prod(shape[:-1]), shape[-1]) matrix of t, when
 * the leading dims merge into one stride and BLAS can read the result; returns -1 otherwise. */
static int flat_mat(const nemo_tensor *t, mat *m) {
    int nd = t->ndim;
    m->data = nemo_tensor_data(t);
    m->c = nd ? t->shape[nd - 1] : 1;
    m->cs = nd ? t->stride[nd - 1] : 1;
    m->r = 1;
    m->rs = m->c > 0 ? m->c : 1;
    int have = 0;
    for (int d = nd - 2; d >= 0; d--) {
        if (t->shape[d] == 1) continue;
        if (!have) { m->rs = t->stride[d]; m->r = t->shape[d]; have = 1; }
        else if (t->stride[d] == m->rs * m->r) m->r *= t->shape[d];
        else return -1;
    }
    int64_t ld;
    return mat_layout(m, &ld) >= 0 ? 0 : -1;
}

/* The dtype products read operands of dtype dt in on a device: bf16 / f16 as they are where
 * the device has a "gemm_lp" kernel (float32 sums of the exact products, a float32 result),
 * else converted to the compute dtype. */
static int operand_dtype(int dt, int devtype) {
    if ((dt == NEMO_BF16 || dt == NEMO_F16) && nemo_kernel_has("gemm_lp", devtype)) return dt;
    return nemo_compute_dtype(dt);
}

/* t in dtype cdt (a compute dtype, or operand_dtype's), readable by BLAS as mat_of(., vec)
 * (vec < 0: as flat_mat): t itself (a new reference) when it is, else a converted or
 * contiguous copy. */
static nemo_tensor *operand(const nemo_tensor *t, int cdt, int vec) {
    if (t->dtype != cdt) return nemo_prep(t, cdt);
    mat m;
    int64_t ld;
    int ok = vec < 0 ? flat_mat(t, &m) == 0 : (m = mat_of(t, vec, 0, NULL), mat_layout(&m, &ld) >= 0);
    if (ok) { nemo_tensor_retain((nemo_tensor *)t); return (nemo_tensor *)t; }
    return nemo_contiguous(t);
}

/* Whether products of dtype dt on devtype are written in dt by the kernel ("gemm_lp_out"):
 * then results are allocated in dt and gemm_run is told so. */
static int out_lp(int dt, int devtype) {
    return operand_dtype(dt, devtype) == dt && (dt == NEMO_BF16 || dt == NEMO_F16) &&
           nemo_kernel_has("gemm_lp_out", devtype);
}

/* Round a compute-dtype result to dtype dt (a new reference; tmp is consumed), contiguous. */
static nemo_tensor *finish(nemo_tensor *tmp, int dt) {
    if (!tmp || tmp->dtype == dt) return tmp;
    nemo_tensor *o = nemo_to(tmp, dt, tmp->devtype, tmp->devindex);
    nemo_tensor_release(tmp);
    return o;
}

/* o (=, +=) alpha * a @ b for every index of the batch shape (nb dims); a and b in dtype dt,
 * o in dt's compute dtype (bf16 / f16 operands: the "gemm_lp" kernel), or in dt itself when
 * lpo (out_lp: the "gemm_lp_out" kernel, beta 0, bias (o's columns, contiguous dt) or NULL).
 * beta = 1 adds onto o (which must then hold the values to add to, zeros for a gradient summed
 * over a batch dim where o's stride is 0). Folds what it can, then hands the rest of the batch
 * to the kernel. */
static int gemm_run(const char *op, int devtype, int dt, int nb, const int64_t *bshape_in,
                    mat o, mat a, mat b, double alpha, double beta, int lpo, const void *bias) {
    int rc = 0;
    int64_t *offs = NULL;
    int64_t bshape[NEMO_MAXDIM];
    int n = 0;
    for (int d = 0; d < nb; d++) {
        if (bshape_in[d] == 0) return 0;
        if (bshape_in[d] == 1) continue;
        bshape[n] = bshape_in[d];
        o.bs[n] = o.bs[d]; a.bs[n] = a.bs[d]; b.bs[n] = b.bs[d];
        n++;
    }
    if (o.r == 0 || o.c == 0) return 0;
    int64_t lda = 0, ldb = 0, ldc = 0;
    NEMO_CHECK(!lpo || beta == 0.0, NEMO_EINTERNAL, "%s: a product rounded by its kernel cannot accumulate", op);
    NEMO_CHECK(!bias || lpo, NEMO_EINTERNAL, "%s: a bias reached a gemm that has none", op);
    if (mat_layout(&o, &ldc) != 0) {   /* a column-major output: compute o^T = b^T a^T */
        NEMO_CHECK(!bias, NEMO_EINTERNAL, "%s: a bias reached a column-major product", op);
        mat t = a;
        a = mat_t(b); b = mat_t(t); o = mat_t(o);
    }
    while (n > 0) {
        int L = n - 1;
        int64_t s = bshape[L];
        mat o2 = o, a2 = a, b2 = b;
        if (b.bs[L] == 0 && a.bs[L] == a.r * a.rs && o.bs[L] == o.r * o.rs) { a2.r *= s; o2.r *= s; }
        else if (o.bs[L] == 0 && a.bs[L] == a.c * a.cs && b.bs[L] == b.r * b.rs) { a2.c *= s; b2.r *= s; }
        else if (a.bs[L] == 0 && b.bs[L] == b.c * b.cs && o.bs[L] == o.c * o.cs) { b2.c *= s; o2.c *= s; }
        else break;
        if (mat_layout(&o2, &ldc) != 0 || mat_layout(&a2, &lda) < 0 || mat_layout(&b2, &ldb) < 0) break;
        o = o2; a = a2; b = b2;
        n--;
    }
    int ta = mat_layout(&a, &lda), tb = mat_layout(&b, &ldb), tc = mat_layout(&o, &ldc);
    NEMO_CHECK(ta >= 0 && tb >= 0 && tc == 0, NEMO_EINTERNAL, "%s: an operand reached gemm in a layout BLAS cannot read", op);
    NEMO_CHECK(o.r <= INT_MAX && o.c <= INT_MAX && a.c <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
               ldc <= INT_MAX, NEMO_ESHAPE, "%s: a %lld x %lld x %lld product is too large for BLAS (32-bit sizes)",
               op, (long long)o.r, (long long)a.c, (long long)o.c);
    int64_t nbatch = 1;
    int distinct = 1;
    for (int d = 0; d < n; d++) { nbatch *= bshape[d]; if (o.bs[d] == 0) distinct = 0; }
    NEMO_CHECK(distinct || beta == 1.0, NEMO_EINTERNAL, "%s: summed batch dims need an accumulating gemm", op);
    gemm_k kern = NULL;
    gemm_lp_out_k kern_lpo = NULL;
    if (lpo) {
        NEMO_CHECK(distinct, NEMO_EINTERNAL, "%s: a product rounded by its kernel cannot sum over a batch dim", op);
        NEMO_GET_KERNEL(kern_lpo, gemm_lp_out_k, "gemm_lp_out", devtype);
    } else {
        NEMO_GET_KERNEL(kern, gemm_k, dt == NEMO_BF16 || dt == NEMO_F16 ? "gemm_lp" : "gemm", devtype);
    }
    if (n > 0) {
        offs = malloc(sizeof(int64_t) * 3 * (size_t)nbatch);
        NEMO_CHECK(offs, NEMO_ENOMEM, "%s: out of memory for %lld batch offsets", op, (long long)nbatch);
        int64_t idx[NEMO_MAXDIM] = {0}, oa = 0, ob = 0, oc = 0;
        for (int64_t i = 0; i < nbatch; i++) {
            offs[3 * i] = oa; offs[3 * i + 1] = ob; offs[3 * i + 2] = oc;
            for (int d = n - 1; d >= 0; d--) {
                idx[d]++; oa += a.bs[d]; ob += b.bs[d]; oc += o.bs[d];
                if (idx[d] < bshape[d]) break;
                oa -= a.bs[d] * bshape[d]; ob -= b.bs[d] * bshape[d]; oc -= o.bs[d] * bshape[d];
                idx[d] = 0;
            }
        }
    }
    if (lpo)
        NEMO_TRY(kern_lpo(dt, ta, tb, o.r, o.c, a.c, alpha, a.data, lda, b.data, ldb, bias, o.data, ldc,
                          n > 0 ? nbatch : 1, offs));
    else
        NEMO_TRY(kern(dt, ta, tb, o.r, o.c, a.c, alpha, a.data, lda, b.data, ldb, beta, o.data, ldc,
                      n > 0 ? nbatch : 1, offs, distinct));
fail:
    free(offs);
    return rc;
}

/* ==== matmul / mm / bmm / mv / dot ==== */

static const char *mm_name(int kind) {
    switch (kind) {
    case NEMO_MM_MM: return "mm";
    case NEMO_MM_BMM: return "bmm";
    case NEMO_MM_MV: return "mv";
    case NEMO_MM_DOT: return "dot";
    default: return "matmul";
    }
}

/* Shapes of one product: a is (abatch..., n, k) or (k); b (bbatch..., k, m) or (k); the
 * result (batch..., n, m) without the dims of 1-D operands. */
typedef struct {
    int nb, va, vb, vo, ond;
    int64_t n, k, m;
    int64_t bshape[NEMO_MAXDIM], oshape[NEMO_MAXDIM];
} mm_geom;

static int check_floats(const char *op, const nemo_tensor *a, const nemo_tensor *b) {
    if (!nemo_dtype_is_float(a->dtype) || !nemo_dtype_is_float(b->dtype))
        return NEMO_ERR(NEMO_EDTYPE, "%s: integer dtypes are not supported (got %s and %s)", op,
                        nemo_dtype_name(a->dtype), nemo_dtype_name(b->dtype));
    if (a->dtype != b->dtype)
        return NEMO_ERR(NEMO_EDTYPE, "%s: expected both operands to have the same dtype, got %s and %s", op,
                        nemo_dtype_name(a->dtype), nemo_dtype_name(b->dtype));
    return nemo_check_same_device(op, a, b);
}

static int mm_check(int kind, const nemo_tensor *a, const nemo_tensor *b, mm_geom *G) {
    const char *op = mm_name(kind);
    char s1[128], s2[128];
    int na = a->ndim, nb = b->ndim;
    /* the shapes are formatted only for an error message */
#define SA nemo_shape_str(a, s1, sizeof s1)
#define SB nemo_shape_str(b, s2, sizeof s2)
    if (kind < NEMO_MM_MATMUL || kind > NEMO_MM_DOT)
        return NEMO_ERR(NEMO_EINVAL, "matmul: unknown kind %d", kind);
    if (na == 0 || nb == 0)
        return NEMO_ERR(NEMO_ESHAPE, "%s: both arguments need at least 1 dimension, got shapes %s and %s", op, SA,
                        SB);
    static const int want_a[] = {0, 2, 3, 2, 1}, want_b[] = {0, 2, 3, 1, 1};
    if (kind != NEMO_MM_MATMUL && (na != want_a[kind] || nb != want_b[kind]))
        return NEMO_ERR(NEMO_ESHAPE, "%s: expected a %d-D and a %d-D tensor, got shapes %s and %s", op,
                        want_a[kind], want_b[kind], SA, SB);
    if (kind == NEMO_MM_BMM && a->shape[0] != b->shape[0])
        return NEMO_ERR(NEMO_ESHAPE, "bmm: batch sizes differ: shapes %s and %s", SA, SB);
    int rc = check_floats(op, a, b);
    if (rc < 0) return rc;
    G->va = na == 1 ? 1 : 0;
    G->vb = nb == 1 ? 2 : 0;
    G->vo = na == 1 ? (nb == 1 ? 3 : 1) : (nb == 1 ? 2 : 0);
    G->n = na == 1 ? 1 : a->shape[na - 2];
    G->k = a->shape[na - 1];
    int64_t kb = nb == 1 ? b->shape[0] : b->shape[nb - 2];
    G->m = nb == 1 ? 1 : b->shape[nb - 1];
    if (G->k != kb)
        return NEMO_ERR(NEMO_ESHAPE, "%s: shapes %s and %s cannot be multiplied (%lld != %lld)", op, SA, SB,
                        (long long)G->k, (long long)kb);
    int ba = na > 2 ? na - 2 : 0, bb = nb > 2 ? nb - 2 : 0;
    G->nb = ba > bb ? ba : bb;
    for (int d = 0; d < G->nb; d++) {
        int ia = ba - G->nb + d, ib = bb - G->nb + d;
        int64_t x = ia >= 0 ? a->shape[ia] : 1, y = ib >= 0 ? b->shape[ib] : 1;
        if (x != y && x != 1 && y != 1)
            return NEMO_ERR(NEMO_ESHAPE, "%s: batch dims of shapes %s and %s cannot be broadcast (%lld vs %lld)",
                            op, SA, SB, (long long)x, (long long)y);
        G->bshape[d] = x == 1 ? y : x;
    }
    G->ond = 0;
    for (int d = 0; d < G->nb; d++) G->oshape[G->ond++] = G->bshape[d];
    if (na > 1) G->oshape[G->ond++] = G->n;
    if (nb > 1) G->oshape[G->ond++] = G->m;
    if (G->ond > NEMO_MAXDIM)
        return NEMO_ERR(NEMO_ESHAPE, "%s: result would have %d dims (at most %d)", op, G->ond, NEMO_MAXDIM);
    return 0;
#undef SA
#undef SB
}

NEMO_API nemo_tensor *nemo_matmul(const nemo_tensor *a, const nemo_tensor *b, int kind) {
    int rc = 0;
    nemo_tensor *ac = NULL, *bc = NULL, *oc = NULL;
    mm_geom G;
    NEMO_TRY(mm_check(kind, a, b, &G));
    int odt = operand_dtype(a->dtype, a->devtype), lpo = out_lp(a->dtype, a->devtype);
    int rdt = lpo ? a->dtype : nemo_compute_dtype(a->dtype);   /* the result's dtype as computed */
    NEMO_TRYP(ac, operand(a, odt, G.va));
    NEMO_TRYP(bc, operand(b, odt, G.vb));
    NEMO_TRYP(oc, (G.k == 0 ? nemo_zeros : nemo_empty)(G.ond, G.oshape, rdt, a->devtype, a->devindex));
    NEMO_TRY(gemm_run(mm_name(kind), a->devtype, odt, G.nb, G.bshape, mat_of(oc, G.vo, G.nb, G.bshape),
                      mat_of(ac, G.va, G.nb, G.bshape), mat_of(bc, G.vb, G.nb, G.bshape), 1.0, 0.0, lpo, NULL));
    nemo_tensor_release(ac);
    nemo_tensor_release(bc);
    return finish(oc, a->dtype);
fail:
    nemo_tensor_release(ac);
    nemo_tensor_release(bc);
    nemo_tensor_release(oc);
    return NULL;
}

/* Whether an operand with batch dims tshape[0..tb) is broadcast along a batch dim of size > 1
 * (its gradient then sums over that dim). */
static int summed_over(const nemo_tensor *t, int tb, int nb, const int64_t *bshape) {
    for (int d = 0; d < nb; d++) {
        int td = tb - nb + d;
        if (bshape[d] > 1 && (td < 0 || t->shape[td] == 1)) return 1;
    }
    return 0;
}

NEMO_API int nemo_matmul_backward(const nemo_tensor *g, const nemo_tensor *a, const nemo_tensor *b,
                                  nemo_tensor **da, nemo_tensor **db) {
    int rc = 0;
    nemo_tensor *gc = NULL, *ac = NULL, *bc = NULL, *dac = NULL, *dbc = NULL;
    if (da) *da = NULL;
    if (db) *db = NULL;
    mm_geom G;
    NEMO_TRY(mm_check(NEMO_MM_MATMUL, a, b, &G));
    char s1[128], s2[128];
    NEMO_CHECK(g->ndim == G.ond && !memcmp(g->shape, G.oshape, sizeof(int64_t) * (size_t)G.ond), NEMO_ESHAPE,
               "matmul backward: gradient of shape %s does not match the output shape %s",
               nemo_shape_str(g, s1, sizeof s1), nemo_shape_str_n(G.ond, G.oshape, s2, sizeof s2));
    NEMO_TRY(nemo_check_same_device("matmul backward", g, a));
    int cdt = nemo_compute_dtype(a->dtype), odt = operand_dtype(a->dtype, a->devtype);
    int lpo = out_lp(a->dtype, a->devtype);
    NEMO_TRYP(gc, operand(g, odt, G.vo));
    mat mg = mat_of(gc, G.vo, G.nb, G.bshape);
    if (da) {   /* da = g b^T, summed over a's broadcast batch dims (accumulated in cdt) */
        int sum = summed_over(a, a->ndim - (G.va ? 1 : 2), G.nb, G.bshape), lp = lpo && !sum;
        NEMO_TRYP(bc, operand(b, odt, G.vb));
        NEMO_TRYP(dac, (sum || G.m == 0 ? nemo_zeros : nemo_empty)(a->ndim, a->shape, lp ? a->dtype : cdt, a->devtype,
                                                                   a->devindex));
        NEMO_TRY(gemm_run("matmul backward", a->devtype, odt, G.nb, G.bshape, mat_of(dac, G.va, G.nb, G.bshape),
                          mg, mat_t(mat_of(bc, G.vb, G.nb, G.bshape)), 1.0, sum ? 1.0 : 0.0, lp, NULL));
    }
    if (db) {   /* db = a^T g, summed over b's broadcast batch dims */
        int sum = summed_over(b, b->ndim - (G.vb ? 1 : 2), G.nb, G.bshape), lp = lpo && !sum;
        NEMO_TRYP(ac, operand(a, odt, G.va));
        NEMO_TRYP(dbc, (sum || G.n == 0 ? nemo_zeros : nemo_empty)(b->ndim, b->shape, lp ? b->dtype : cdt, b->devtype,
                                                                   b->devindex));
        NEMO_TRY(gemm_run("matmul backward", a->devtype, odt, G.nb, G.bshape, mat_of(dbc, G.vb, G.nb, G.bshape),
                          mat_t(mat_of(ac, G.va, G.nb, G.bshape)), mg, 1.0, sum ? 1.0 : 0.0, lp, NULL));
    }
    if (da) { nemo_tensor *t = dac; dac = NULL; NEMO_TRYP(*da, finish(t, a->dtype)); }
    if (db) { nemo_tensor *t = dbc; dbc = NULL; NEMO_TRYP(*db, finish(t, b->dtype)); }
fail:
    nemo_tensor_release(gc); nemo_tensor_release(ac); nemo_tensor_release(bc);
    nemo_tensor_release(dac); nemo_tensor_release(dbc);
    if (rc < 0) {
        if (da && *da) { nemo_tensor_release(*da); *da = NULL; }
        if (db && *db) { nemo_tensor_release(*db); *db = NULL; }
    }
    return rc;
}

/* ==== linear ==== */

static int linear_check(const char *op, const nemo_tensor *x, const nemo_tensor *w) {
    char s1[128], s2[128];
    int rc = check_floats(op, x, w);
    if (rc < 0) return rc;
    if (w->ndim != 2)
        return NEMO_ERR(NEMO_ESHAPE, "%s: weight must be 2-D (out_features, in_features), got shape %s", op,
                        nemo_shape_str(w, s2, sizeof s2));
    if (x->ndim < 1)
        return NEMO_ERR(NEMO_ESHAPE, "%s: input must have at least 1 dimension, got shape %s", op,
                        nemo_shape_str(x, s1, sizeof s1));
    if (x->shape[x->ndim - 1] != w->shape[1])
        return NEMO_ERR(NEMO_ESHAPE, "%s: input of shape %s and weight of shape %s do not match (in_features %lld != %lld)",
                        op, nemo_shape_str(x, s1, sizeof s1), nemo_shape_str(w, s2, sizeof s2),
                        (long long)x->shape[x->ndim - 1], (long long)w->shape[1]);
    return 0;
}

NEMO_API nemo_tensor *nemo_linear(const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *bias) {
    int rc = 0;
    nemo_tensor *xc = NULL, *wc = NULL, *yc = NULL, *bc = NULL;
    char s1[128], s2[128];
    NEMO_TRY(linear_check("linear", x, w));
    int64_t nout = w->shape[0], kin = w->shape[1];
    if (bias) {
        NEMO_CHECK(bias->dtype == w->dtype, NEMO_EDTYPE, "linear: bias has dtype %s but weight has %s",
                   nemo_dtype_name(bias->dtype), nemo_dtype_name(w->dtype));
        NEMO_CHECK(bias->ndim == 1 && bias->shape[0] == nout, NEMO_ESHAPE,
                   "linear: bias of shape %s does not match weight of shape %s (expected (%lld,))",
                   nemo_shape_str(bias, s1, sizeof s1), nemo_shape_str(w, s2, sizeof s2), (long long)nout);
        NEMO_TRY(nemo_check_same_device("linear", x, bias));
    }
    int cdt = nemo_compute_dtype(x->dtype), odt = operand_dtype(x->dtype, x->devtype);
    int lpo = out_lp(x->dtype, x->devtype);
    int64_t yshape[NEMO_MAXDIM];
    for (int d = 0; d < x->ndim - 1; d++) yshape[d] = x->shape[d];
    yshape[x->ndim - 1] = nout;
    NEMO_TRYP(xc, operand(x, odt, -1));
    NEMO_TRYP(wc, operand(w, odt, 0));
    if (lpo) {   /* y = round(x W^T + bias) in the kernel */
        if (bias) NEMO_TRYP(bc, bias->stride[0] == 1 || nout <= 1 ? (nemo_tensor_retain((nemo_tensor *)bias),
                                                                      (nemo_tensor *)bias) : nemo_contiguous(bias));
        NEMO_TRYP(yc, nemo_empty(x->ndim, yshape, x->dtype, x->devtype, x->devindex));
    } else if (bias) {
        NEMO_TRYP(yc, nemo_empty(x->ndim, yshape, cdt, x->devtype, x->devindex));
        NEMO_TRY(nemo_copy_(yc, bias));
    } else {
        NEMO_TRYP(yc, (kin == 0 ? nemo_zeros : nemo_empty)(x->ndim, yshape, cdt, x->devtype, x->devindex));
    }
    mat my, mx;
    flat_mat(yc, &my);
    flat_mat(xc, &mx);
    NEMO_TRY(gemm_run("linear", x->devtype, odt, 0, NULL, my, mx, mat_t(mat_of(wc, 0, 0, NULL)), 1.0,
                      bias && !lpo ? 1.0 : 0.0, lpo, bc ? nemo_tensor_data(bc) : NULL));
    nemo_tensor_release(xc);
    nemo_tensor_release(wc);
    nemo_tensor_release(bc);
    return finish(yc, x->dtype);
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(wc);
    nemo_tensor_release(bc);
    nemo_tensor_release(yc);
    return NULL;
}

NEMO_API int nemo_linear_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *w,
                                  nemo_tensor **dx, nemo_tensor **dw, nemo_tensor **db) {
    int rc = 0;
    nemo_tensor *gc = NULL, *xc = NULL, *wc = NULL, *g2 = NULL, *dxc = NULL, *dwc = NULL, *dbc = NULL;
    if (dx) *dx = NULL;
    if (dw) *dw = NULL;
    if (db) *db = NULL;
    char s1[128], s2[128];
    NEMO_TRY(linear_check("linear backward", x, w));
    int64_t nout = w->shape[0];
    int ok = g->ndim == x->ndim && g->shape[g->ndim - 1] == nout;
    for (int d = 0; ok && d < x->ndim - 1; d++) ok = g->shape[d] == x->shape[d];
    NEMO_CHECK(ok, NEMO_ESHAPE, "linear backward: gradient of shape %s does not fit input %s and weight %s",
               nemo_shape_str(g, s1, sizeof s1), nemo_shape_str(x, s2, sizeof s2),
               nemo_shape_str(w, (char[128]){0}, 128));
    NEMO_TRY(nemo_check_same_device("linear backward", g, x));
    int cdt = nemo_compute_dtype(x->dtype), odt = operand_dtype(x->dtype, x->devtype);
    int lpo = out_lp(x->dtype, x->devtype), rdt = lpo ? x->dtype : cdt;   /* dx's and dw's dtype as computed */
    NEMO_TRYP(gc, operand(g, odt, -1));
    mat mg;
    flat_mat(gc, &mg);
    if (dx) {   /* dx = g W */
        NEMO_TRYP(wc, operand(w, odt, 0));
        NEMO_TRYP(dxc, (nout == 0 ? nemo_zeros : nemo_empty)(x->ndim, x->shape, rdt, x->devtype, x->devindex));
        mat mdx;
        flat_mat(dxc, &mdx);
        NEMO_TRY(gemm_run("linear backward", x->devtype, odt, 0, NULL, mdx, mg, mat_of(wc, 0, 0, NULL), 1.0, 0.0,
                          lpo, NULL));
    }
    if (dw) {   /* dW = g^T x over all leading dims: one gemm with inner dimension prod(leading) */
        NEMO_TRYP(xc, operand(x, odt, -1));
        mat mx;
        flat_mat(xc, &mx);
        NEMO_TRYP(dwc, (mg.r == 0 ? nemo_zeros : nemo_empty)(2, w->shape, rdt, w->devtype, w->devindex));
        NEMO_TRY(gemm_run("linear backward", x->devtype, odt, 0, NULL, mat_of(dwc, 0, 0, NULL), mat_t(mg), mx,
                          1.0, 0.0, lpo, NULL));
    }
    if (db) {   /* db = column sums of g, read in g's dtype (colsum widens bf16 / f16 rows itself) */
        mat m2 = mg;
        if (m2.cs != 1 && m2.c > 1) {   /* colsum reads rows with unit stride */
            NEMO_TRYP(g2, nemo_contiguous(gc));
            flat_mat(g2, &m2);
        }
        colsum_k ck;
        NEMO_GET_KERNEL(ck, colsum_k, "colsum", x->devtype);
        NEMO_TRYP(dbc, nemo_empty(1, &nout, cdt, x->devtype, x->devindex));
        NEMO_TRY(ck(gc->dtype, m2.r, m2.c, m2.data, m2.r > 1 ? m2.rs : m2.c, nemo_tensor_data(dbc)));
    }
    if (dx) { nemo_tensor *t = dxc; dxc = NULL; NEMO_TRYP(*dx, finish(t, x->dtype)); }
    if (dw) { nemo_tensor *t = dwc; dwc = NULL; NEMO_TRYP(*dw, finish(t, w->dtype)); }
    if (db) { nemo_tensor *t = dbc; dbc = NULL; NEMO_TRYP(*db, finish(t, w->dtype)); }
fail:
    nemo_tensor_release(gc); nemo_tensor_release(xc); nemo_tensor_release(wc); nemo_tensor_release(g2);
    nemo_tensor_release(dxc); nemo_tensor_release(dwc); nemo_tensor_release(dbc);
    if (rc < 0) {
        if (dx && *dx) { nemo_tensor_release(*dx); *dx = NULL; }
        if (dw && *dw) { nemo_tensor_release(*dw); *dw = NULL; }
        if (db && *db) { nemo_tensor_release(*db); *db = NULL; }
    }
    return rc;
}

/* ==== scaled_dot_product_attention ==== */

#define SDPA "scaled_dot_product_attention"

/* An uninitialised tensor of `shape` whose dims lie in memory in the order of ref's strides
 * (ref's last dim innermost; otherwise plain contiguous): attention outputs and gradients
 * follow their input's layout, so a (B, S, H, D) buffer seen as (B, H, S, D) stays one. */
static nemo_tensor *empty_like_order(const nemo_tensor *ref, const int64_t *shape, int dt) {
    int nd = ref->ndim, order[NEMO_MAXDIM], n = 0;
    int64_t key[NEMO_MAXDIM], st[NEMO_MAXDIM];
    for (int d = 0; d < nd - 1; d++) {
        key[d] = ref->shape[d] == 1 ? INT64_MAX : ref->stride[d];
        int j = n++;
        while (j > 0 && key[order[j - 1]] < key[d]) { order[j] = order[j - 1]; j--; }
        order[j] = d;
    }
    int64_t inner = ref->shape[nd - 1] == 1 ? 0 : ref->stride[nd - 1];
    for (int i = 0; i < n; i++)
        if (ref->shape[order[i]] != 1 && key[order[i]] <= inner)
            return nemo_empty(nd, shape, dt, ref->devtype, ref->devindex);
    int64_t run = 1, numel = (int64_t)nemo_numel_of(nd, shape);
    st[nd - 1] = 1;
    run = shape[nd - 1];
    for (int i = n - 1; i >= 0; i--) { st[order[i]] = run; run *= shape[order[i]]; }
    nemo_tensor *tmp = nemo_empty(1, &numel, dt, ref->devtype, ref->devindex);
    if (!tmp) return NULL;
    nemo_tensor *v = nemo_tensor_view(tmp, nd, shape, st, 0);
    nemo_tensor_release(tmp);
    return v;
}

/* Round a compute-dtype result to dt keeping its memory order (tmp is consumed). */
static nemo_tensor *finish_like(nemo_tensor *tmp, int dt) {
    if (!tmp || tmp->dtype == dt) return tmp;
    nemo_tensor *o = empty_like_order(tmp, tmp->shape, dt);
    if (o && nemo_copy_(o, tmp) < 0) { nemo_tensor_release(o); o = NULL; }
    nemo_tensor_release(tmp);
    return o;
}

/* q/k/v/o/g for the kernel: compute dtype, contiguous last dim, rows BLAS can step through. */
static nemo_tensor *att_operand(const nemo_tensor *t, int cdt) {
    if (t->dtype != cdt) return nemo_prep(t, cdt);
    int nd = t->ndim;
    int64_t rows = t->shape[nd - 2], cols = t->shape[nd - 1];
    int ok = (cols <= 1 || t->stride[nd - 1] == 1) && (rows <= 1 || t->stride[nd - 2] >= cols);
    if (ok) { nemo_tensor_retain((nemo_tensor *)t); return (nemo_tensor *)t; }
    return nemo_contiguous(t);
}

static int sdpa_check(const char *op, const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                      const nemo_tensor *mask, int is_causal) {
    char s1[128], s2[128], s3[128];
    nemo_shape_str(q, s1, sizeof s1);
    nemo_shape_str(k, s2, sizeof s2);
    nemo_shape_str(v, s3, sizeof s3);
    if (!nemo_dtype_is_float(q->dtype) || !nemo_dtype_is_float(k->dtype) || !nemo_dtype_is_float(v->dtype))
        return NEMO_ERR(NEMO_EDTYPE, "%s: expected floating point query, key and value, got %s, %s and %s", op,
                        nemo_dtype_name(q->dtype), nemo_dtype_name(k->dtype), nemo_dtype_name(v->dtype));
    if (q->dtype != k->dtype || q->dtype != v->dtype)
        return NEMO_ERR(NEMO_EDTYPE, "%s: expected query, key and value of one dtype, got %s, %s and %s", op,
                        nemo_dtype_name(q->dtype), nemo_dtype_name(k->dtype), nemo_dtype_name(v->dtype));
    int rc = nemo_check_same_device(op, q, k);
    if (rc == 0) rc = nemo_check_same_device(op, q, v);
    if (rc == 0 && mask) rc = nemo_check_same_device(op, q, mask);
    if (rc < 0) return rc;
    int nd = q->ndim;
    if (nd < 2 || k->ndim != nd || v->ndim != nd)
        return NEMO_ERR(NEMO_ESHAPE, "%s: expected query, key and value of one rank >= 2, got shapes %s, %s and %s",
                        op, s1, s2, s3);
    for (int d = 0; d < nd - 2; d++)
        if (k->shape[d] != q->shape[d] || v->shape[d] != q->shape[d])
            return NEMO_ERR(NEMO_ESHAPE, "%s: query %s, key %s and value %s differ in their leading (batch, head) "
                            "dims", op, s1, s2, s3);
    if (k->shape[nd - 1] != q->shape[nd - 1])
        return NEMO_ERR(NEMO_ESHAPE, "%s: query of shape %s and key of shape %s have different head dims (%lld != %lld)",
                        op, s1, s2, (long long)q->shape[nd - 1], (long long)k->shape[nd - 1]);
    if (v->shape[nd - 2] != k->shape[nd - 2])
        return NEMO_ERR(NEMO_ESHAPE, "%s: key of shape %s and value of shape %s have different lengths (%lld != %lld)",
                        op, s2, s3, (long long)k->shape[nd - 2], (long long)v->shape[nd - 2]);
    for (int d = nd - 2; d < nd; d++)
        if (q->shape[d] > INT_MAX || k->shape[d] > INT_MAX || v->shape[d] > INT_MAX)
            return NEMO_ERR(NEMO_ESHAPE, "%s: shapes %s, %s, %s are too large for BLAS (32-bit sizes)", op, s1, s2, s3);
    if (mask) {
        if (is_causal)
            return NEMO_ERR(NEMO_EINVAL, "%s: attn_mask and is_causal cannot both be set", op);
        if (mask->dtype != NEMO_BOOL && !nemo_dtype_is_float(mask->dtype))
            return NEMO_ERR(NEMO_EDTYPE, "%s: attn_mask must be bool or floating point, got %s", op,
                            nemo_dtype_name(mask->dtype));
        int64_t full[NEMO_MAXDIM];
        for (int d = 0; d < nd - 1; d++) full[d] = q->shape[d];
        full[nd - 1] = k->shape[nd - 2];
        int fits = mask->ndim <= nd;
        for (int d = 0; fits && d < mask->ndim; d++) {
            int64_t ms = mask->shape[d], fs = full[nd - mask->ndim + d];
            fits = ms == fs || ms == 1;
        }
        if (!fits)
            return NEMO_ERR(NEMO_ESHAPE, "%s: attn_mask of shape %s cannot be broadcast to %s (query %s, key %s)", op,
                            nemo_shape_str(mask, s3, sizeof s3), nemo_shape_str_n(nd, full, (char[128]){0}, 128), s1, s2);
    }
    return 0;
}

/* The mask as the kernel reads it: a (lead..., Sq, Sk) view with stride 0 where it broadcasts,
 * bool as is, float in the compute dtype. */
static nemo_tensor *mask_view(const nemo_tensor *mask, const nemo_tensor *q, const nemo_tensor *k, int cdt) {
    if (!mask) return NULL;
    int nd = q->ndim;
    int64_t full[NEMO_MAXDIM], st[NEMO_MAXDIM];
    for (int d = 0; d < nd - 1; d++) full[d] = q->shape[d];
    full[nd - 1] = k->shape[nd - 2];
    nemo_tensor *mc = (mask->dtype == NEMO_BOOL) ? nemo_tensor_alias(mask) : nemo_prep(mask, cdt);
    if (!mc) return NULL;
    nemo_broadcast_strides(mc, nd, full, st);
    nemo_tensor *mv = nemo_tensor_view(mc, nd, full, st, mc->offset);
    nemo_tensor_release(mc);
    return mv;
}

/* Whether the fused kernels may be used: on unless nemo_sdpa_enable_flash(0) or NEMO_FLASH=0 in
 * the environment (read on first use), an escape hatch like torch.backends.cuda.enable_flash_sdp. */
static int flash_enabled = -1;
NEMO_API int nemo_sdpa_enable_flash(int on) {
    if (flash_enabled < 0) {
        const char *e = getenv("NEMO_FLASH");
        flash_enabled = !(e && !strcmp(e, "0"));
    }
    int was = flash_enabled;
    if (on >= 0) flash_enabled = on != 0;
    return was;
}

/* The fused low-precision kernels take the call: they are switched on (above), q, k, v are
 * bfloat16 or float16, no mask, head dim 64 or 128 for both products, non-empty, sizes the
 * kernels' grids hold, and the device has both kernels. Checked by the forward and again by the
 * backward (which also wants g in q's dtype), so a call runs one path in both directions. */
static int flash_applies(const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v, const nemo_tensor *mask) {
    if (!nemo_sdpa_enable_flash(-1)) return 0;
    const int nd = q->ndim;
    if ((q->dtype != NEMO_BF16 && q->dtype != NEMO_F16) || mask || nd > NEMO_MAXDIM) return 0;
    const int64_t d = q->shape[nd - 1], sq = q->shape[nd - 2], sk = k->shape[nd - 2];
    if ((d != 64 && d != 128) || v->shape[nd - 1] != d || sq <= 0 || sk <= 0) return 0;
    int64_t nbh = 1;
    for (int i = 0; i < nd - 2; i++) nbh *= q->shape[i];
    if (nbh <= 0 || nbh > INT32_MAX || (sq + 63) / 64 > 65535 || (sk + 63) / 64 > 65535) return 0;
    return nemo_kernel_has("sdpa_flash_fwd", q->devtype) && nemo_kernel_has("sdpa_flash_bwd", q->devtype);
}
/* t as the flash kernels read it: last dim contiguous, 16-byte aligned rows, row and leading
 * strides multiples of 8 elements; a copy when it is not. */
static nemo_tensor *flash_operand(const nemo_tensor *t) {
    const int nd = t->ndim;
    int ok = t->stride[nd - 1] == 1 && t->stride[nd - 2] % 8 == 0 && ((uintptr_t)nemo_tensor_data(t) & 15) == 0;
    for (int i = 0; ok && i < nd - 2; i++) ok = t->stride[i] % 8 == 0 || t->shape[i] == 1;
    if (ok) { nemo_tensor_retain((nemo_tensor *)t); return (nemo_tensor *)t; }
    return nemo_contiguous(t);
}

static double sdpa_scale(double scale, const nemo_tensor *q) {
    return scale == scale ? scale : 1.0 / sqrt((double)q->shape[q->ndim - 1]);
}

NEMO_API int nemo_sdpa_uses_flash(const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                                  const nemo_tensor *mask) {
    if (!q || !k || !v || sdpa_check(SDPA, q, k, v, mask, 0) < 0) {
        nemo_clear_error();
        return 0;
    }
    return flash_applies(q, k, v, mask);
}

/* nemo_sdpa through the flash kernel: operands and output in q's dtype, lse float32. */
static int sdpa_flash(const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v, int is_causal, double scale,
                      nemo_tensor **out, nemo_tensor **lse) {
    int rc = 0;
    nemo_tensor *qc = NULL, *kc = NULL, *vc = NULL, *oc = NULL, *lc = NULL;
    sdpa_flash_fwd_k kern;
    NEMO_GET_KERNEL(kern, sdpa_flash_fwd_k, "sdpa_flash_fwd", q->devtype);
    NEMO_TRYP(qc, flash_operand(q));
    NEMO_TRYP(kc, flash_operand(k));
    NEMO_TRYP(vc, flash_operand(v));
    NEMO_TRYP(oc, empty_like_order(q, q->shape, q->dtype));
    NEMO_TRYP(lc, nemo_empty(q->ndim - 1, q->shape, NEMO_F32, q->devtype, q->devindex));
    NEMO_TRY(kern(oc, lc, qc, kc, vc, is_causal, sdpa_scale(scale, q)));
    *out = oc;
    oc = NULL;
    if (lse) { *lse = lc; lc = NULL; }
fail:
    nemo_tensor_release(qc); nemo_tensor_release(kc); nemo_tensor_release(vc);
    nemo_tensor_release(oc); nemo_tensor_release(lc);
    return rc;
}

NEMO_API int nemo_sdpa(const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                       const nemo_tensor *mask, int is_causal, double scale,
                       nemo_tensor **out, nemo_tensor **lse, nemo_tensor **probs) {
    int rc = 0;
    nemo_tensor *qc = NULL, *kc = NULL, *vc = NULL, *mv = NULL, *oc = NULL, *lc = NULL, *pc = NULL;
    if (out) *out = NULL;
    if (lse) *lse = NULL;
    if (probs) *probs = NULL;
    NEMO_CHECK(out, NEMO_EINVAL, SDPA ": no output pointer");
    NEMO_CHECK(!probs || lse, NEMO_EINVAL, SDPA ": keeping the probabilities needs the logsumexp output too");
    NEMO_TRY(sdpa_check(SDPA, q, k, v, mask, is_causal));
    int keep = probs && nemo_kernel_has("sdpa_fwd_p", q->devtype) && nemo_kernel_has("sdpa_bwd_p", q->devtype);
    if (!keep && flash_applies(q, k, v, mask)) return sdpa_flash(q, k, v, is_causal, scale, out, lse);
    sdpa_fwd_k kern = NULL;
    sdpa_fwd_p_k kern_p = NULL;
    if (keep) NEMO_GET_KERNEL(kern_p, sdpa_fwd_p_k, "sdpa_fwd_p", q->devtype);
    else NEMO_GET_KERNEL(kern, sdpa_fwd_k, "sdpa_fwd", q->devtype);
    int nd = q->ndim, cdt = nemo_compute_dtype(q->dtype);
    scale = sdpa_scale(scale, q);
    int64_t oshape[NEMO_MAXDIM];
    memcpy(oshape, q->shape, sizeof(int64_t) * (size_t)nd);
    oshape[nd - 1] = v->shape[nd - 1];
    NEMO_TRYP(qc, att_operand(q, cdt));
    NEMO_TRYP(kc, att_operand(k, cdt));
    NEMO_TRYP(vc, att_operand(v, cdt));
    if (mask) NEMO_TRYP(mv, mask_view(mask, q, k, cdt));
    NEMO_TRYP(oc, empty_like_order(q, oshape, cdt));
    NEMO_TRYP(lc, nemo_empty(nd - 1, q->shape, cdt, q->devtype, q->devindex));
    if (keep) {
        int64_t pshape[NEMO_MAXDIM];
        memcpy(pshape, q->shape, sizeof(int64_t) * (size_t)nd);
        pshape[nd - 1] = k->shape[nd - 2];
        NEMO_TRYP(pc, nemo_empty(nd, pshape, cdt, q->devtype, q->devindex));
        NEMO_TRY(kern_p(oc, lc, pc, qc, kc, vc, mv, is_causal, scale));
    } else {
        NEMO_TRY(kern(oc, lc, qc, kc, vc, mv, is_causal, scale));
    }
    nemo_tensor *t = oc;
    oc = NULL;
    NEMO_TRYP(*out, finish_like(t, q->dtype));
    if (lse) { *lse = lc; lc = NULL; }
    if (probs) { *probs = pc; pc = NULL; }
fail:
    nemo_tensor_release(qc); nemo_tensor_release(kc); nemo_tensor_release(vc);
    nemo_tensor_release(mv); nemo_tensor_release(oc); nemo_tensor_release(lc); nemo_tensor_release(pc);
    if (rc < 0 && out && *out) { nemo_tensor_release(*out); *out = NULL; }
    if (rc < 0 && lse && *lse) { nemo_tensor_release(*lse); *lse = NULL; }
    return rc;
}

/* nemo_sdpa_backward through the flash kernel (arguments already checked). */
static int sdpa_flash_backward(const nemo_tensor *g, const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                               const nemo_tensor *out, const nemo_tensor *lse, int is_causal, double scale,
                               nemo_tensor **dq, nemo_tensor **dk, nemo_tensor **dv) {
    int rc = 0;
    nemo_tensor *gc = NULL, *qc = NULL, *kc = NULL, *vc = NULL, *oc = NULL, *lc = NULL;
    nemo_tensor *dqc = NULL, *dkc = NULL, *dvc = NULL;
    sdpa_flash_bwd_k kern;
    NEMO_GET_KERNEL(kern, sdpa_flash_bwd_k, "sdpa_flash_bwd", q->devtype);
    NEMO_TRYP(gc, flash_operand(g));
    NEMO_TRYP(qc, flash_operand(q));
    NEMO_TRYP(kc, flash_operand(k));
    NEMO_TRYP(vc, flash_operand(v));
    NEMO_TRYP(oc, flash_operand(out));
    NEMO_TRYP(lc, nemo_contiguous(lse));
    NEMO_TRYP(dqc, empty_like_order(q, q->shape, q->dtype));
    NEMO_TRYP(dkc, empty_like_order(k, k->shape, q->dtype));
    NEMO_TRYP(dvc, empty_like_order(v, v->shape, q->dtype));
    NEMO_TRY(kern(dqc, dkc, dvc, gc, qc, kc, vc, oc, lc, is_causal, sdpa_scale(scale, q)));
    if (dq) { *dq = dqc; dqc = NULL; }
    if (dk) { *dk = dkc; dkc = NULL; }
    if (dv) { *dv = dvc; dvc = NULL; }
fail:
    nemo_tensor_release(gc); nemo_tensor_release(qc); nemo_tensor_release(kc); nemo_tensor_release(vc);
    nemo_tensor_release(oc); nemo_tensor_release(lc);
    nemo_tensor_release(dqc); nemo_tensor_release(dkc); nemo_tensor_release(dvc);
    return rc;
}

NEMO_API int nemo_sdpa_backward(const nemo_tensor *g, const nemo_tensor *q, const nemo_tensor *k,
                                const nemo_tensor *v, const nemo_tensor *mask, const nemo_tensor *out,
                                const nemo_tensor *lse, const nemo_tensor *probs, int is_causal, double scale,
                                nemo_tensor **dq, nemo_tensor **dk, nemo_tensor **dv) {
    int rc = 0;
    nemo_tensor *gc = NULL, *qc = NULL, *kc = NULL, *vc = NULL, *oc = NULL, *lc = NULL, *mv = NULL;
    nemo_tensor *dqc = NULL, *dkc = NULL, *dvc = NULL;
    if (dq) *dq = NULL;
    if (dk) *dk = NULL;
    if (dv) *dv = NULL;
    const char *op = SDPA " backward";
    NEMO_TRY(sdpa_check(op, q, k, v, mask, is_causal));
    int nd = q->ndim, cdt = nemo_compute_dtype(q->dtype);
    int64_t oshape[NEMO_MAXDIM];
    memcpy(oshape, q->shape, sizeof(int64_t) * (size_t)nd);
    oshape[nd - 1] = v->shape[nd - 1];
    char s1[128], s2[128];
    NEMO_CHECK(g->ndim == nd && !memcmp(g->shape, oshape, sizeof(int64_t) * (size_t)nd) && out->ndim == nd &&
               !memcmp(out->shape, oshape, sizeof(int64_t) * (size_t)nd), NEMO_ESHAPE,
               "%s: gradient of shape %s and output of shape %s must both be %s", op,
               nemo_shape_str(g, s1, sizeof s1), nemo_shape_str(out, s2, sizeof s2),
               nemo_shape_str_n(nd, oshape, (char[128]){0}, 128));
    NEMO_CHECK(lse->ndim == nd - 1 && !memcmp(lse->shape, q->shape, sizeof(int64_t) * (size_t)(nd - 1)), NEMO_ESHAPE,
               "%s: logsumexp of shape %s does not match query of shape %s", op,
               nemo_shape_str(lse, s1, sizeof s1), nemo_shape_str(q, s2, sizeof s2));
    NEMO_TRY(nemo_check_same_device(op, g, q));
    if (probs) {
        int64_t pshape[NEMO_MAXDIM];
        memcpy(pshape, q->shape, sizeof(int64_t) * (size_t)nd);
        pshape[nd - 1] = k->shape[nd - 2];
        NEMO_CHECK(probs->ndim == nd && !memcmp(probs->shape, pshape, sizeof(int64_t) * (size_t)nd) &&
                   probs->dtype == cdt && nemo_tensor_is_contiguous(probs), NEMO_ESHAPE,
                   "%s: kept probabilities must be a contiguous %s tensor of shape %s, got %s %s", op,
                   nemo_dtype_name(cdt), nemo_shape_str_n(nd, pshape, (char[128]){0}, 128),
                   nemo_dtype_name(probs->dtype), nemo_shape_str(probs, s1, sizeof s1));
        NEMO_TRY(nemo_check_same_device(op, probs, q));
    }
    if (!probs && flash_applies(q, k, v, mask) && g->dtype == q->dtype && out->dtype == q->dtype &&
        lse->dtype == NEMO_F32)
        return sdpa_flash_backward(g, q, k, v, out, lse, is_causal, scale, dq, dk, dv);
    sdpa_bwd_k kern = NULL;
    sdpa_bwd_p_k kern_p = NULL;
    if (probs) NEMO_GET_KERNEL(kern_p, sdpa_bwd_p_k, "sdpa_bwd_p", q->devtype);
    else NEMO_GET_KERNEL(kern, sdpa_bwd_k, "sdpa_bwd", q->devtype);
    scale = sdpa_scale(scale, q);
    NEMO_TRYP(gc, att_operand(g, cdt));
    NEMO_TRYP(qc, att_operand(q, cdt));
    NEMO_TRYP(kc, att_operand(k, cdt));
    NEMO_TRYP(vc, att_operand(v, cdt));
    NEMO_TRYP(oc, att_operand(out, cdt));
    NEMO_TRYP(lc, nemo_prep(lse, cdt));
    if (mask) NEMO_TRYP(mv, mask_view(mask, q, k, cdt));
    NEMO_TRYP(dqc, empty_like_order(q, q->shape, cdt));
    NEMO_TRYP(dkc, empty_like_order(k, k->shape, cdt));
    NEMO_TRYP(dvc, empty_like_order(v, v->shape, cdt));
    if (probs) NEMO_TRY(kern_p(dqc, dkc, dvc, gc, qc, kc, vc, oc, lc, probs, mv, is_causal, scale));
    else NEMO_TRY(kern(dqc, dkc, dvc, gc, qc, kc, vc, oc, lc, mv, is_causal, scale));
    if (dq) { nemo_tensor *t = dqc; dqc = NULL; NEMO_TRYP(*dq, finish_like(t, q->dtype)); }
    if (dk) { nemo_tensor *t = dkc; dkc = NULL; NEMO_TRYP(*dk, finish_like(t, k->dtype)); }
    if (dv) { nemo_tensor *t = dvc; dvc = NULL; NEMO_TRYP(*dv, finish_like(t, v->dtype)); }
fail:
    nemo_tensor_release(gc); nemo_tensor_release(qc); nemo_tensor_release(kc); nemo_tensor_release(vc);
    nemo_tensor_release(oc); nemo_tensor_release(lc); nemo_tensor_release(mv);
    nemo_tensor_release(dqc); nemo_tensor_release(dkc); nemo_tensor_release(dvc);
    if (rc < 0) {
        if (dq && *dq) { nemo_tensor_release(*dq); *dq = NULL; }
        if (dk && *dk) { nemo_tensor_release(*dk); *dk = NULL; }
        if (dv && *dv) { nemo_tensor_release(*dv); *dv = NULL; }
    }
    return rc;
}
