/*
 * engine/ops/nnops.c: front-ends of the normalisation ops: layer_norm, rms_norm, group_norm and
 * their fused backward passes (kernels in kernels/<dev>/nnops.c).
 *
 * Non-obvious rules
 * - layer_norm and rms_norm share one kernel pair ("norm_rows", "norm_rows_backward") over
 *   rows of n = prod(normalized_shape) elements; rms_norm is layer_norm without centring and
 *   without bias. Their x, g, y and dx go to the kernel in their own dtype (made contiguous
 *   only), because the CPU kernel converts bf16/f16 rows on the fly: no whole-tensor f32 copy.
 * - group_norm hands its kernel dense compute-dtype arrays (float32 or float64) and rounds the
 *   result once into x's dtype.
 * - Statistics (mean, rstd) are in the compute dtype; parameter gradients are computed in the
 *   compute dtype and then rounded into the parameter's dtype.
 */
#include <float.h>
#include <stdio.h>
#include "../internal.h"

typedef int (*norm_rows_k)(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                           const nemo_tensor *w, const nemo_tensor *b, int64_t rows, int64_t n, double eps,
                           int center);
typedef int (*norm_rows_bwd_k)(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                               const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                               const nemo_tensor *w, int64_t rows, int64_t n);
typedef int (*group_norm_k)(nemo_tensor *y, nemo_tensor *mean, nemo_tensor *rstd, const nemo_tensor *x,
                            const nemo_tensor *w, const nemo_tensor *b, int64_t N, int64_t C, int64_t HW,
                            int64_t G, double eps);
typedef int (*group_norm_bwd_k)(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                                const nemo_tensor *x, const nemo_tensor *mean, const nemo_tensor *rstd,
                                const nemo_tensor *w, int64_t N, int64_t C, int64_t HW, int64_t G);

/* ==== Helpers ==== */

static void release_all(nemo_tensor **ts, int n) {
    for (int i = 0; i < n; i++) { nemo_tensor_release(ts[i]); ts[i] = NULL; }
}

static int same_shape(int na, const int64_t *a, int nb, const int64_t *b) {
    return na == nb && (na == 0 || !memcmp(a, b, sizeof(int64_t) * (size_t)na));
}

/* "(*, 3, 4)": the input shape that a normalized_shape asks for. */
static const char *star_shape(int nd, const int64_t *s, char *buf, size_t n) {
    size_t k = (size_t)snprintf(buf, n, "(*");
    for (int d = 0; d < nd && k < n; d++) k += (size_t)snprintf(buf + k, n - k, ", %lld", (long long)s[d]);
    if (k < n) snprintf(buf + k, n - k, ")");
    return buf;
}

static int check_float(const char *op, const char *what, const nemo_tensor *t) {
    if (!nemo_dtype_is_float(t->dtype))
        return NEMO_ERR(NEMO_EDTYPE, "%s: expected a floating point %s, got %s", op, what, nemo_dtype_name(t->dtype));
    return 0;
}

/* x must end with normalized_shape; rows = prod(leading dims), n = prod(normalized_shape). */
static int check_rows(const char *op, const nemo_tensor *x, int nnorm, const int64_t *ns, int64_t *rows,
                      int64_t *n) {
    char b1[160], b2[160], b3[160];
    int rc = check_float(op, "input", x);
    if (rc < 0) return rc;
    if (nnorm < 1 || !ns)
        return NEMO_ERR(NEMO_ESHAPE, "%s: normalized_shape must have at least one dimension, got %d", op, nnorm);
    if (nnorm > NEMO_MAXDIM)
        return NEMO_ERR(NEMO_ESHAPE, "%s: normalized_shape has %d dims, more than the %d a tensor can have", op,
                        nnorm, NEMO_MAXDIM);
    int ok = nnorm <= x->ndim;
    for (int d = 0; ok && d < nnorm; d++) ok = x->shape[x->ndim - nnorm + d] == ns[d];
    if (!ok)
        return NEMO_ERR(NEMO_ESHAPE, "%s: normalized_shape %s does not match the input of shape %s "
                        "(expected an input of shape %s)", op, nemo_shape_str_n(nnorm, ns, b1, sizeof b1),
                        nemo_shape_str(x, b2, sizeof b2), star_shape(nnorm, ns, b3, sizeof b3));
    *rows = (int64_t)nemo_numel_of(x->ndim - nnorm, x->shape);
    *n = (int64_t)nemo_numel_of(nnorm, ns);
    return 0;
}

/* An optional parameter (weight / bias) must have exactly shape (nd, s) and live with x. */
static int check_param(const char *op, const char *what, const nemo_tensor *p, const nemo_tensor *x, int nd,
                       const int64_t *s, const char *expected_what) {
    if (!p) return 0;
    char b1[160], b2[160];
    int rc = check_float(op, what, p);
    if (rc < 0) return rc;
    if (!same_shape(p->ndim, p->shape, nd, s))
        return NEMO_ERR(NEMO_ESHAPE, "%s: %s of shape %s does not match %s %s", op, what,
                        nemo_shape_str(p, b1, sizeof b1), expected_what, nemo_shape_str_n(nd, s, b2, sizeof b2));
    return nemo_check_same_device(op, x, p);
}

/* A saved statistic (mean / rstd) must hold `count` values in the compute dtype. */
static int check_stat(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *x, int64_t count,
                      int cdt) {
    if (!t) return NEMO_ERR(NEMO_EINVAL, "%s: %s is required (pass the one the forward returned)", op, what);
    if (nemo_tensor_numel(t) != count || t->dtype != cdt)
        return NEMO_ERR(NEMO_ESHAPE, "%s: %s has %lld values of dtype %s, expected %lld of dtype %s "
                        "(the forward's statistics)", op, what, (long long)nemo_tensor_numel(t),
                        nemo_dtype_name(t->dtype), (long long)count, nemo_dtype_name(cdt));
    return nemo_check_same_device(op, x, t);
}

/* The gradient must have x's shape. */
static int check_grad(const char *op, const nemo_tensor *g, const nemo_tensor *x) {
    char b1[160], b2[160];
    int rc = check_float(op, "gradient", g);
    if (rc < 0) return rc;
    if (!same_shape(g->ndim, g->shape, x->ndim, x->shape))
        return NEMO_ERR(NEMO_ESHAPE, "%s: gradient of shape %s does not match the input of shape %s", op,
                        nemo_shape_str(g, b1, sizeof b1), nemo_shape_str(x, b2, sizeof b2));
    return nemo_check_same_device(op, x, g);
}

/* Contiguous rows for the norm_rows kernel: float32/bf16/f16 stay in their dtype when the
 * compute dtype is float32; anything else is converted to the compute dtype. */
static nemo_tensor *rows_input(const nemo_tensor *t, int cdt) {
    if (cdt == NEMO_F32 && (t->dtype == NEMO_F32 || t->dtype == NEMO_BF16 || t->dtype == NEMO_F16))
        return nemo_contiguous(t);
    return nemo_prep(t, cdt);
}

/* Round a compute-dtype result *slot into dtype dt and move it to *out: the slot is emptied
 * first, so a failing conversion leaves nothing to release twice. */
static int finish_into(nemo_tensor **slot, int dt, nemo_tensor **out) {
    nemo_tensor *tmp = *slot;
    *slot = NULL;
    if (tmp->dtype == dt) { *out = tmp; return 0; }
    *out = nemo_to(tmp, dt, tmp->devtype, tmp->devindex);
    nemo_tensor_release(tmp);
    return *out ? 0 : (nemo_last_status() < 0 ? nemo_last_status() : NEMO_EINTERNAL);
}

/* ==== layer_norm / rms_norm ==== */

static int norm_rows_forward(const char *op, int center, const nemo_tensor *x, int nnorm, const int64_t *ns,
                             const nemo_tensor *weight, const nemo_tensor *bias, double eps, nemo_tensor **y,
                             nemo_tensor **mean, nemo_tensor **rstd) {
    int rc = 0;
    nemo_tensor *t[6] = {NULL};   /* xc, wc, bc, y, mean, rstd */
    if (y) *y = NULL;
    if (mean) *mean = NULL;
    if (rstd) *rstd = NULL;
    NEMO_CHECK(x != NULL && y != NULL, NEMO_EINVAL, "%s: input and output pointer must not be NULL", op);
    int64_t rows = 0, n = 0;
    NEMO_TRY(check_rows(op, x, nnorm, ns, &rows, &n));
    NEMO_TRY(check_param(op, "weight", weight, x, nnorm, ns, "normalized_shape"));
    NEMO_TRY(check_param(op, "bias", bias, x, nnorm, ns, "normalized_shape"));
    norm_rows_k k;
    NEMO_GET_KERNEL(k, norm_rows_k, "norm_rows", x->devtype);
    int cdt = nemo_compute_dtype(x->dtype);
    if (eps < 0 || eps != eps) eps = cdt == NEMO_F32 ? (double)FLT_EPSILON : DBL_EPSILON;
    NEMO_TRYP(t[0], nemo_contiguous(x));
    if (weight) NEMO_TRYP(t[1], nemo_prep(weight, cdt));
    if (bias) NEMO_TRYP(t[2], nemo_prep(bias, cdt));
    NEMO_TRYP(t[3], nemo_empty(x->ndim, x->shape, x->dtype, x->devtype, x->devindex));
    int sd = x->ndim - nnorm;
    if (mean && center) NEMO_TRYP(t[4], nemo_empty(sd, x->shape, cdt, x->devtype, x->devindex));
    if (rstd) NEMO_TRYP(t[5], nemo_empty(sd, x->shape, cdt, x->devtype, x->devindex));
    if (rows > 0) NEMO_TRY(k(t[3], t[4], t[5], t[0], t[1], t[2], rows, n, eps, center));
    *y = t[3];
    if (mean) *mean = t[4];
    if (rstd) *rstd = t[5];
    t[3] = t[4] = t[5] = NULL;
    release_all(t, 3);
    return 0;
fail:
    release_all(t, 6);
    return rc;
}

static int norm_rows_backward(const char *op, int center, const nemo_tensor *g, const nemo_tensor *x, int nnorm,
                              const nemo_tensor *mean, const nemo_tensor *rstd, const nemo_tensor *weight,
                              int bias_dtype, nemo_tensor **dx, nemo_tensor **dw, nemo_tensor **db) {
    int rc = 0;
    nemo_tensor *t[7] = {NULL};   /* xc, gc, mean, rstd, wc, dx, dw; db kept apart */
    nemo_tensor *dbo = NULL;
    if (dx) *dx = NULL;
    if (dw) *dw = NULL;
    if (db) *db = NULL;
    NEMO_CHECK(g != NULL && x != NULL, NEMO_EINVAL, "%s: gradient and input must not be NULL", op);
    NEMO_CHECK(nnorm >= 1 && nnorm <= x->ndim, NEMO_ESHAPE,
               "%s: normalized_shape has %d dims but the input has %d", op, nnorm, x->ndim);
    NEMO_TRY(check_float(op, "input", x));
    NEMO_TRY(check_grad(op, g, x));
    const int64_t *ns = x->shape + (x->ndim - nnorm);
    int64_t rows = (int64_t)nemo_numel_of(x->ndim - nnorm, x->shape), n = (int64_t)nemo_numel_of(nnorm, ns);
    int cdt = nemo_compute_dtype(x->dtype);
    if (center) NEMO_TRY(check_stat(op, "mean", mean, x, rows, cdt));
    NEMO_TRY(check_stat(op, "rstd", rstd, x, rows, cdt));
    NEMO_TRY(check_param(op, "weight", weight, x, nnorm, ns, "normalized_shape"));
    NEMO_CHECK(!dw || weight, NEMO_EINVAL, "%s: the weight gradient was asked for without a weight", op);
    NEMO_CHECK(!db || center, NEMO_EINVAL, "%s: no bias gradient (the op has no bias)", op);
    norm_rows_bwd_k k;
    NEMO_GET_KERNEL(k, norm_rows_bwd_k, "norm_rows_backward", x->devtype);
    NEMO_TRYP(t[0], rows_input(x, cdt));
    NEMO_TRYP(t[1], rows_input(g, cdt));
    if (center) NEMO_TRYP(t[2], nemo_contiguous(mean));
    NEMO_TRYP(t[3], nemo_contiguous(rstd));
    if (weight) NEMO_TRYP(t[4], nemo_prep(weight, cdt));
    if (dx) NEMO_TRYP(t[5], nemo_empty(x->ndim, x->shape, x->dtype, x->devtype, x->devindex));
    if (dw) NEMO_TRYP(t[6], nemo_zeros(nnorm, ns, cdt, x->devtype, x->devindex));
    if (db) NEMO_TRYP(dbo, nemo_zeros(nnorm, ns, cdt, x->devtype, x->devindex));
    if (rows > 0 && n > 0) NEMO_TRY(k(t[5], t[6], dbo, t[1], t[0], t[2], t[3], t[4], rows, n));
    if (dw) NEMO_TRY(finish_into(&t[6], weight->dtype, dw));
    if (db) NEMO_TRY(finish_into(&dbo, bias_dtype >= 0 ? bias_dtype : x->dtype, db));
    if (dx) { *dx = t[5]; t[5] = NULL; }
    release_all(t, 7);
    return 0;
fail:
    release_all(t, 7);
    nemo_tensor_release(dbo);
    if (dw) { nemo_tensor_release(*dw); *dw = NULL; }
    if (db) { nemo_tensor_release(*db); *db = NULL; }
    return rc;
}

NEMO_API int nemo_layer_norm(const nemo_tensor *x, int nnorm, const int64_t *normalized_shape,
                             const nemo_tensor *weight, const nemo_tensor *bias, double eps,
                             nemo_tensor **y, nemo_tensor **mean, nemo_tensor **rstd) {
    return norm_rows_forward("layer_norm", 1, x, nnorm, normalized_shape, weight, bias, eps, y, mean, rstd);
}

NEMO_API int nemo_layer_norm_backward(const nemo_tensor *g, const nemo_tensor *x, int nnorm,
                                      const nemo_tensor *mean, const nemo_tensor *rstd,
                                      const nemo_tensor *weight, int bias_dtype,
                                      nemo_tensor **dx, nemo_tensor **dweight, nemo_tensor **dbias) {
    return norm_rows_backward("layer_norm backward", 1, g, x, nnorm, mean, rstd, weight, bias_dtype, dx, dweight,
                              dbias);
}

NEMO_API int nemo_rms_norm(const nemo_tensor *x, int nnorm, const int64_t *normalized_shape,
                           const nemo_tensor *weight, double eps, nemo_tensor **y, nemo_tensor **rstd) {
    return norm_rows_forward("rms_norm", 0, x, nnorm, normalized_shape, weight, NULL, eps, y, NULL, rstd);
}

NEMO_API int nemo_rms_norm_backward(const nemo_tensor *g, const nemo_tensor *x, int nnorm,
                                    const nemo_tensor *rstd, const nemo_tensor *weight,
                                    nemo_tensor **dx, nemo_tensor **dweight) {
    return norm_rows_backward("rms_norm backward", 0, g, x, nnorm, NULL, rstd, weight, -1, dx, dweight, NULL);
}

/* ==== group_norm ==== */

/* x (N, C, *) with C divisible by G; returns N, C and HW = prod(spatial dims). */
static int check_groups(const char *op, const nemo_tensor *x, int64_t G, int64_t *N, int64_t *C, int64_t *HW) {
    char b1[160];
    int rc = check_float(op, "input", x);
    if (rc < 0) return rc;
    if (x->ndim < 2)
        return NEMO_ERR(NEMO_ESHAPE, "%s: expected an input of shape (N, C, *) with at least 2 dims, got shape %s",
                        op, nemo_shape_str(x, b1, sizeof b1));
    if (G < 1)
        return NEMO_ERR(NEMO_EINVAL, "%s: num_groups must be positive, got %lld", op, (long long)G);
    if (x->shape[1] % G != 0)
        return NEMO_ERR(NEMO_ESHAPE, "%s: the number of channels C = %lld of the input of shape %s is not "
                        "divisible by num_groups = %lld", op, (long long)x->shape[1],
                        nemo_shape_str(x, b1, sizeof b1), (long long)G);
    *N = x->shape[0];
    *C = x->shape[1];
    *HW = (int64_t)nemo_numel_of(x->ndim - 2, x->shape + 2);
    return 0;
}

static int check_channel_param(const char *op, const char *what, const nemo_tensor *p, const nemo_tensor *x) {
    if (!p) return 0;
    char b1[160], b2[160];
    int rc = check_float(op, what, p);
    if (rc < 0) return rc;
    if (p->ndim != 1 || p->shape[0] != x->shape[1])
        return NEMO_ERR(NEMO_ESHAPE, "%s: %s of shape %s does not match the %lld channels of the input of shape %s "
                        "(expected (%lld,))", op, what, nemo_shape_str(p, b1, sizeof b1), (long long)x->shape[1],
                        nemo_shape_str(x, b2, sizeof b2), (long long)x->shape[1]);
    return nemo_check_same_device(op, x, p);
}

NEMO_API int nemo_group_norm(const nemo_tensor *x, int64_t num_groups, const nemo_tensor *weight,
                             const nemo_tensor *bias, double eps,
                             nemo_tensor **y, nemo_tensor **mean, nemo_tensor **rstd) {
    static const char op[] = "group_norm";
    int rc = 0;
    nemo_tensor *t[6] = {NULL};   /* xc, wc, bc, y, mean, rstd */
    if (y) *y = NULL;
    if (mean) *mean = NULL;
    if (rstd) *rstd = NULL;
    NEMO_CHECK(x != NULL && y != NULL, NEMO_EINVAL, "%s: input and output pointer must not be NULL", op);
    int64_t N = 0, C = 0, HW = 0;
    NEMO_TRY(check_groups(op, x, num_groups, &N, &C, &HW));
    NEMO_TRY(check_channel_param(op, "weight", weight, x));
    NEMO_TRY(check_channel_param(op, "bias", bias, x));
    group_norm_k k;
    NEMO_GET_KERNEL(k, group_norm_k, "group_norm", x->devtype);
    int cdt = nemo_compute_dtype(x->dtype);
    NEMO_TRYP(t[0], nemo_prep(x, cdt));
    if (weight) NEMO_TRYP(t[1], nemo_prep(weight, cdt));
    if (bias) NEMO_TRYP(t[2], nemo_prep(bias, cdt));
    NEMO_TRYP(t[3], nemo_empty(x->ndim, x->shape, cdt, x->devtype, x->devindex));
    int64_t sshape[2] = {N, num_groups};
    NEMO_TRYP(t[4], nemo_empty(2, sshape, cdt, x->devtype, x->devindex));
    NEMO_TRYP(t[5], nemo_empty(2, sshape, cdt, x->devtype, x->devindex));
    if (N > 0) NEMO_TRY(k(t[3], t[4], t[5], t[0], t[1], t[2], N, C, HW, num_groups, eps));
    NEMO_TRY(finish_into(&t[3], x->dtype, y));
    if (mean) { *mean = t[4]; t[4] = NULL; }
    if (rstd) { *rstd = t[5]; t[5] = NULL; }
    release_all(t, 6);
    return 0;
fail:
    release_all(t, 6);
    return rc;
}

NEMO_API int nemo_group_norm_backward(const nemo_tensor *g, const nemo_tensor *x, int64_t num_groups,
                                      const nemo_tensor *mean, const nemo_tensor *rstd,
                                      const nemo_tensor *weight, int bias_dtype,
                                      nemo_tensor **dx, nemo_tensor **dweight, nemo_tensor **dbias) {
    static const char op[] = "group_norm backward";
    int rc = 0;
    nemo_tensor *t[8] = {NULL};   /* xc, gc, mean, rstd, wc, dx, dw, db */
    if (dx) *dx = NULL;
    if (dweight) *dweight = NULL;
    if (dbias) *dbias = NULL;
    NEMO_CHECK(g != NULL && x != NULL, NEMO_EINVAL, "%s: gradient and input must not be NULL", op);
    int64_t N = 0, C = 0, HW = 0;
    NEMO_TRY(check_groups(op, x, num_groups, &N, &C, &HW));
    NEMO_TRY(check_grad(op, g, x));
    int cdt = nemo_compute_dtype(x->dtype);
    NEMO_TRY(check_stat(op, "mean", mean, x, N * num_groups, cdt));
    NEMO_TRY(check_stat(op, "rstd", rstd, x, N * num_groups, cdt));
    NEMO_TRY(check_channel_param(op, "weight", weight, x));
    NEMO_CHECK(!dweight || weight, NEMO_EINVAL, "%s: the weight gradient was asked for without a weight", op);
    group_norm_bwd_k k;
    NEMO_GET_KERNEL(k, group_norm_bwd_k, "group_norm_backward", x->devtype);
    NEMO_TRYP(t[0], nemo_prep(x, cdt));
    NEMO_TRYP(t[1], nemo_prep(g, cdt));
    NEMO_TRYP(t[2], nemo_contiguous(mean));
    NEMO_TRYP(t[3], nemo_contiguous(rstd));
    if (weight) NEMO_TRYP(t[4], nemo_prep(weight, cdt));
    if (dx) NEMO_TRYP(t[5], nemo_empty(x->ndim, x->shape, cdt, x->devtype, x->devindex));
    int64_t cshape[1] = {C};
    if (dweight) NEMO_TRYP(t[6], nemo_zeros(1, cshape, cdt, x->devtype, x->devindex));
    if (dbias) NEMO_TRYP(t[7], nemo_zeros(1, cshape, cdt, x->devtype, x->devindex));
    if (N > 0) NEMO_TRY(k(t[5], t[6], t[7], t[1], t[0], t[2], t[3], t[4], N, C, HW, num_groups));
    if (dx) NEMO_TRY(finish_into(&t[5], x->dtype, dx));
    if (dweight) NEMO_TRY(finish_into(&t[6], weight->dtype, dweight));
    if (dbias) NEMO_TRY(finish_into(&t[7], bias_dtype >= 0 ? bias_dtype : x->dtype, dbias));
    release_all(t, 8);
    return 0;
fail:
    release_all(t, 8);
    if (dx) { nemo_tensor_release(*dx); *dx = NULL; }
    if (dweight) { nemo_tensor_release(*dweight); *dweight = NULL; }
    if (dbias) { nemo_tensor_release(*dbias); *dbias = NULL; }
    return rc;
}
