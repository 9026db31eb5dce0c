/*
 * engine/ops/reduce.c: front-ends of the reductions (sum, mean, prod, amax/amin, var/std, norm,
 * logsumexp), max/min along a dim, argmax/argmin, softmax/log_softmax and cumsum, with their
 * backward passes (kernels in kernels/<dev>/reduce.c).
 *
 * Non-obvious rules
 * - Kernels see every input as a dense (A, K, M) array reduced along K. A plan finds A, K, M
 *   from the reduced dims: size-1 dims are dropped and runs of reduced / kept dims merged;
 *   when the reduced dims form one run (sum over the last dims, over the leading dims as for
 *   a bias gradient, or over a middle block) the contiguous input is used as it is. Otherwise
 *   the input is copied with the kept dims first and the reduced ones last (M = 1), and the
 *   gradient is computed in that order and permuted back.
 * - Inputs are converted once to the compute dtype (float32 for f32/bf16/f16, float64
 *   otherwise) by nemo_prep; results are rounded once into the output dtype.
 */
#include "../internal.h"

typedef int (*reduce_k)(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int op,
                        double param);
typedef int (*reduce_bwd_k)(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int64_t A, int64_t K,
                            int64_t M, int op, double param);
typedef int (*argreduce_k)(nemo_tensor *vals, nemo_tensor *idx, const nemo_tensor *x, int64_t A, int64_t K,
                           int64_t M, int is_min);
typedef int (*max_dim_bwd_k)(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *idx, int64_t A, int64_t K,
                             int64_t M);
typedef int (*softmax_k)(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int log);
typedef int (*softmax_bwd_k)(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *y, int64_t A, int64_t K,
                             int64_t M, int log);
typedef int (*cumsum_k)(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int reverse);

static const char *red_name(int op) {
    static const char *names[NEMO_NRED] = {"sum", "mean", "prod", "amax", "amin", "var", "std", "norm",
                                           "logsumexp"};
    return (op >= 0 && op < NEMO_NRED) ? names[op] : "reduce";
}

/* Round a compute-dtype result into dtype dt (consumes tmp; returns a new reference). */
static nemo_tensor *finish(nemo_tensor *tmp, int dt) {
    if (!tmp || tmp->dtype == dt) return tmp;
    nemo_tensor *o = nemo_to(tmp, dt, tmp->devtype, tmp->devindex);
    nemo_tensor_release(tmp);
    return o;
}

static int same_shape(int na, const int64_t *a, int nb, const int64_t *b) {
    return na == nb && (na == 0 || !memcmp(a, b, sizeof(int64_t) * (size_t)na));
}

/* ==== Plans ==== */

typedef struct {
    int64_t A, K, M;
    int nperm;                    /* 0: use x as is; else x is read in the order perm[0..nperm) */
    int perm[NEMO_MAXDIM];
    int ond;                      /* output shape */
    int64_t oshape[NEMO_MAXDIM];
} rplan;

/* Normalise one dim against ndim (a 0-dim tensor takes 0 or -1). */
static int norm_dim(const char *op, int64_t d, int ndim, int *out) {
    int n = ndim == 0 ? 1 : ndim;
    if (d < -n || d >= n)
        return NEMO_ERR(NEMO_EINVAL, "%s: dimension %lld out of range (expected to be in range of [%d, %d])", op,
                        (long long)d, -n, n - 1);
    *out = (int)(d < 0 ? d + n : d);
    return 0;
}

static int make_plan(const char *op, int ndim, const int64_t *shape, int ndims, const int64_t *dims, int keepdim,
                     rplan *P) {
    int rc = 0;
    unsigned mask = 0;
    memset(P, 0, sizeof *P);
    if (ndim < 0 || ndim > NEMO_MAXDIM)
        return NEMO_ERR(NEMO_EINVAL, "%s: tensor has %d dims (expected 0 to %d)", op, ndim, NEMO_MAXDIM);
    if (ndims < 0 || ndims > NEMO_MAXDIM)
        return NEMO_ERR(NEMO_EINVAL, "%s: %d dims given (expected 0 to %d)", op, ndims, NEMO_MAXDIM);
    if (ndims == 0 || !dims) {
        mask = (1u << ndim) - 1u;
    } else {
        for (int i = 0; i < ndims; i++) {
            int d = 0;
            if ((rc = norm_dim(op, dims[i], ndim, &d)) < 0) return rc;
            if (mask & (1u << d))
                return NEMO_ERR(NEMO_EINVAL, "%s: dim %d appears multiple times in the list of dims", op, d);
            mask |= 1u << d;
        }
        if (ndim == 0) mask = 0;
    }
    /* output shape */
    for (int d = 0; d < ndim; d++) {
        if (mask & (1u << d)) { if (keepdim) P->oshape[P->ond++] = 1; }
        else P->oshape[P->ond++] = shape[d];
    }
    /* runs of reduced / kept dims, size-1 dims dropped */
    int nrun = 0, red[NEMO_MAXDIM];
    int64_t size[NEMO_MAXDIM];
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 1) continue;
        int r = (mask >> d) & 1u;
        if (nrun > 0 && red[nrun - 1] == r) size[nrun - 1] *= shape[d];
        else { red[nrun] = r; size[nrun] = shape[d]; nrun++; }
    }
    int nred = 0;
    for (int i = 0; i < nrun; i++) nred += red[i];
    P->A = 1; P->K = 1; P->M = 1;
    if (nred <= 1) {
        int seen = 0;
        for (int i = 0; i < nrun; i++) {
            if (red[i]) { P->K = size[i]; seen = 1; }
            else if (seen) P->M *= size[i];
            else P->A *= size[i];
        }
        return 0;
    }
    for (int d = 0; d < ndim; d++) if (!(mask & (1u << d))) { P->perm[P->nperm++] = d; P->A *= shape[d]; }
    for (int d = 0; d < ndim; d++) if (mask & (1u << d)) { P->perm[P->nperm++] = d; P->K *= shape[d]; }
    return 0;
}

/* x in the plan's order, contiguous, in dtype dt (a new reference). */
static nemo_tensor *prep_planned(const nemo_tensor *x, int dt, const rplan *P) {
    if (!P->nperm) return nemo_prep(x, dt);
    int64_t sh[NEMO_MAXDIM], st[NEMO_MAXDIM];
    for (int i = 0; i < P->nperm; i++) { sh[i] = x->shape[P->perm[i]]; st[i] = x->stride[P->perm[i]]; }
    nemo_tensor *v = nemo_tensor_view(x, P->nperm, sh, st, x->offset);
    if (!v) return NULL;
    nemo_tensor *r = nemo_prep(v, dt);
    nemo_tensor_release(v);
    return r;
}

/* A contiguous tensor laid out in the plan's order, read back in the original order as dtype dt
 * (consumes t). */
static nemo_tensor *unplan(nemo_tensor *t, int dt, const rplan *P, int ndim, const int64_t *shape) {
    if (!t || !P->nperm) return finish(t, dt);
    int64_t st[NEMO_MAXDIM], acc = 1;
    for (int i = P->nperm - 1; i >= 0; i--) { st[P->perm[i]] = acc; acc *= shape[P->perm[i]]; }
    nemo_tensor *v = nemo_tensor_view(t, ndim, shape, st, t->offset);
    nemo_tensor_release(t);
    if (!v) return NULL;
    nemo_tensor *r = nemo_to(v, dt, v->devtype, v->devindex);
    nemo_tensor_release(v);
    return r;
}

static int check_out_dtype(const char *op, int out_dtype) {
    if (out_dtype < -1 || out_dtype >= NEMO_NDTYPE)
        return NEMO_ERR(NEMO_EDTYPE, "%s: unknown dtype id %d", op, out_dtype);
    return 0;
}

static int float_dtype(int dt) { return nemo_dtype_is_float(dt) ? dt : NEMO_F32; }

/* ==== Reductions ==== */

NEMO_API nemo_tensor *nemo_reduce(const nemo_tensor *x, int op, int ndims, const int64_t *dims, int keepdim,
                                  int out_dtype, double param) {
    int rc = 0;
    nemo_tensor *xc = NULL, *y = NULL;
    const char *name = red_name(op);
    char b1[128];
    NEMO_CHECK(op >= 0 && op < NEMO_NRED, NEMO_EINVAL, "reduce: unknown op %d", op);
    NEMO_TRY(check_out_dtype(name, out_dtype));
    int isf = nemo_dtype_is_float(x->dtype), odt;
    if (out_dtype >= 0) {
        odt = out_dtype;
    } else if (op == NEMO_RED_SUM || op == NEMO_RED_PROD) {
        odt = isf ? x->dtype : NEMO_I64;
    } else if (op == NEMO_RED_AMAX || op == NEMO_RED_AMIN) {
        odt = x->dtype;
    } else if (op == NEMO_RED_LOGSUMEXP) {
        odt = float_dtype(x->dtype);
    } else {
        NEMO_CHECK(isf, NEMO_EDTYPE, "%s: expected a floating point input, got %s (pass dtype= to choose one)", name,
                   nemo_dtype_name(x->dtype));
        odt = x->dtype;
    }
    if (op != NEMO_RED_SUM && op != NEMO_RED_PROD && op != NEMO_RED_AMAX && op != NEMO_RED_AMIN)
        NEMO_CHECK(nemo_dtype_is_float(odt), NEMO_EDTYPE, "%s: dtype must be a floating point type, got %s", name,
                   nemo_dtype_name(odt));
    NEMO_CHECK(op != NEMO_RED_NORM || param == param, NEMO_EINVAL, "norm: p must be a number, got nan");
    rplan P;
    NEMO_TRY(make_plan(name, x->ndim, x->shape, ndims, dims, keepdim, &P));
    int64_t nout = P.A * P.M;
    int needs_elems = op == NEMO_RED_AMAX || op == NEMO_RED_AMIN ||
                      (op == NEMO_RED_NORM && (param == INFINITY || param == -INFINITY));
    NEMO_CHECK(!(needs_elems && P.K == 0 && nout > 0), NEMO_EINVAL,
               "%s: expected a non-empty reduction, but the reduced dims of the input of shape %s have no elements "
               "(the result would have no identity)", name, nemo_shape_str(x, b1, sizeof b1));
    reduce_k k;
    NEMO_GET_KERNEL(k, reduce_k, "reduce", x->devtype);
    int cdt = nemo_compute_dtype(odt);
    NEMO_TRYP(y, nemo_empty(P.ond, P.oshape, cdt, x->devtype, x->devindex));
    if (nout > 0) {
        NEMO_TRYP(xc, prep_planned(x, cdt, &P));
        NEMO_TRY(k(y, xc, P.A, P.K, P.M, op, param));
    }
    nemo_tensor_release(xc);
    return finish(y, odt);
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_reduce_backward(const nemo_tensor *g, const nemo_tensor *x, int ndim,
                                           const int64_t *shape, int x_dtype, int op, int ndims,
                                           const int64_t *dims, int keepdim, double param) {
    int rc = 0;
    nemo_tensor *gc = NULL, *xc = NULL, *dx = NULL;
    char b1[128], b2[128];
    const char *name = red_name(op);
    NEMO_CHECK(op >= 0 && op < NEMO_NRED, NEMO_EINVAL, "reduce backward: unknown op %d", op);
    NEMO_CHECK(x_dtype >= 0 && x_dtype < NEMO_NDTYPE, NEMO_EDTYPE, "%s backward: unknown dtype id %d", name, x_dtype);
    NEMO_CHECK(x || op == NEMO_RED_SUM || op == NEMO_RED_MEAN, NEMO_EINVAL,
               "%s backward: the forward input is needed (got NULL)", name);
    rplan P;
    NEMO_TRY(make_plan(name, ndim, shape, ndims, dims, keepdim, &P));
    if (x) {
        NEMO_CHECK(same_shape(x->ndim, x->shape, ndim, shape), NEMO_ESHAPE,
                   "%s backward: input of shape %s does not match the shape %s", name,
                   nemo_shape_str(x, b1, sizeof b1), nemo_shape_str_n(ndim, shape, b2, sizeof b2));
        NEMO_TRY(nemo_check_same_device(name, g, x));
    }
    NEMO_CHECK(same_shape(g->ndim, g->shape, P.ond, P.oshape), NEMO_ESHAPE,
               "%s backward: gradient of shape %s does not match the output shape %s", name,
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str_n(P.ond, P.oshape, b2, sizeof b2));
    reduce_bwd_k k;
    NEMO_GET_KERNEL(k, reduce_bwd_k, "reduce_backward", g->devtype);
    int odt = float_dtype(x_dtype);
    int cdt = nemo_compute_dtype(nemo_promote(g->dtype, odt));
    int64_t psh[NEMO_MAXDIM];
    for (int i = 0; i < ndim; i++) psh[i] = P.nperm ? shape[P.perm[i]] : shape[i];
    NEMO_TRYP(dx, nemo_empty(ndim, psh, cdt, g->devtype, g->devindex));
    if (P.A * P.K * P.M > 0) {
        NEMO_TRYP(gc, nemo_prep(g, cdt));
        if (x && op != NEMO_RED_SUM && op != NEMO_RED_MEAN) NEMO_TRYP(xc, prep_planned(x, cdt, &P));
        NEMO_TRY(k(dx, gc, xc, P.A, P.K, P.M, op, param));
    }
    nemo_tensor_release(gc);
    nemo_tensor_release(xc);
    return unplan(dx, odt, &P, ndim, shape);
fail:
    nemo_tensor_release(gc);
    nemo_tensor_release(xc);
    nemo_tensor_release(dx);
    return NULL;
}

/* ==== max / min along a dim, argmax / argmin ==== */

/* A, K, M and the output shape for a reduction along one (normalised) dim d. */
static void dim_plan(const nemo_tensor *x, int d, int keepdim, rplan *P) {
    memset(P, 0, sizeof *P);
    P->A = 1; P->K = 1; P->M = 1;
    for (int i = 0; i < x->ndim; i++) {
        if (i < d) P->A *= x->shape[i];
        else if (i == d) P->K = x->shape[i];
        else P->M *= x->shape[i];
        if (i != d || keepdim) P->oshape[P->ond++] = i == d ? 1 : x->shape[i];
    }
}

static int arg_common(const char *name, const nemo_tensor *x, const rplan *P, int is_min, nemo_tensor **values,
                      nemo_tensor **indices) {
    int rc = 0;
    nemo_tensor *xc = NULL, *v = NULL, *ix = NULL;
    argreduce_k k;
    NEMO_GET_KERNEL(k, argreduce_k, "argreduce", x->devtype);
    int cdt = nemo_compute_dtype(x->dtype);
    if (values) NEMO_TRYP(v, nemo_empty(P->ond, P->oshape, cdt, x->devtype, x->devindex));
    NEMO_TRYP(ix, nemo_empty(P->ond, P->oshape, NEMO_I64, x->devtype, x->devindex));
    if (P->A * P->M > 0) {
        NEMO_TRYP(xc, nemo_prep(x, cdt));
        NEMO_TRY(k(v, ix, xc, P->A, P->K, P->M, is_min));
    }
    nemo_tensor_release(xc);
    xc = NULL;
    if (values) { nemo_tensor *vv = v; v = NULL; NEMO_TRYP(*values, finish(vv, x->dtype)); }
    if (indices) { *indices = ix; ix = NULL; }
fail:
    NEMO_UNUSED(name);
    nemo_tensor_release(xc);
    nemo_tensor_release(v);
    nemo_tensor_release(ix);
    return rc;
}

NEMO_API int nemo_max_dim(const nemo_tensor *x, int64_t dim, int keepdim, int is_min, nemo_tensor **values,
                          nemo_tensor **indices) {
    int rc = 0;
    const char *name = is_min ? "min" : "max";
    char b1[128];
    if (values) *values = NULL;
    if (indices) *indices = NULL;
    int d = 0;
    NEMO_TRY(norm_dim(name, dim, x->ndim, &d));
    rplan P;
    dim_plan(x, x->ndim ? d : -1, keepdim, &P);
    NEMO_CHECK(P.K > 0, NEMO_EINVAL, "%s: expected reduction dim %d to have non-zero size (input of shape %s)", name,
               d, nemo_shape_str(x, b1, sizeof b1));
    NEMO_TRY(arg_common(name, x, &P, is_min, values, indices));
fail:
    return rc;
}

NEMO_API nemo_tensor *nemo_argmax(const nemo_tensor *x, int has_dim, int64_t dim, int keepdim, int is_min) {
    int rc = 0;
    const char *name = is_min ? "argmin" : "argmax";
    char b1[128];
    nemo_tensor *ix = NULL;
    rplan P;
    if (has_dim) {
        int d = 0;
        NEMO_TRY(norm_dim(name, dim, x->ndim, &d));
        dim_plan(x, x->ndim ? d : -1, keepdim, &P);
        NEMO_CHECK(P.K > 0, NEMO_EINVAL, "%s: expected reduction dim %d to have non-zero size (input of shape %s)",
                   name, d, nemo_shape_str(x, b1, sizeof b1));
    } else {
        memset(&P, 0, sizeof P);
        P.A = 1; P.M = 1; P.K = nemo_tensor_numel(x);
        if (keepdim) { P.ond = x->ndim; for (int i = 0; i < x->ndim; i++) P.oshape[i] = 1; }
        NEMO_CHECK(P.K > 0, NEMO_EINVAL, "%s: cannot reduce an empty tensor (shape %s) without a dim", name,
                   nemo_shape_str(x, b1, sizeof b1));
    }
    NEMO_TRY(arg_common(name, x, &P, is_min, NULL, &ix));
    return ix;
fail:
    return NULL;
}

NEMO_API nemo_tensor *nemo_max_dim_backward(const nemo_tensor *g, const nemo_tensor *indices, int ndim,
                                            const int64_t *shape, int x_dtype, int64_t dim, int keepdim) {
    int rc = 0;
    nemo_tensor *gc = NULL, *ic = NULL, *dx = NULL;
    char b1[128], b2[128];
    NEMO_CHECK(ndim >= 0 && ndim <= NEMO_MAXDIM, NEMO_EINVAL, "max backward: %d dims (expected 0 to %d)", ndim,
               NEMO_MAXDIM);
    NEMO_CHECK(x_dtype >= 0 && x_dtype < NEMO_NDTYPE, NEMO_EDTYPE, "max backward: unknown dtype id %d", x_dtype);
    int d = 0;
    NEMO_TRY(norm_dim("max backward", dim, ndim, &d));
    nemo_tensor shp;   /* only shape and ndim are read by dim_plan */
    memset(&shp, 0, sizeof shp);
    shp.ndim = ndim;
    memcpy(shp.shape, shape, sizeof(int64_t) * (size_t)ndim);
    rplan P;
    dim_plan(&shp, ndim ? d : -1, keepdim, &P);
    NEMO_CHECK(same_shape(g->ndim, g->shape, P.ond, P.oshape), NEMO_ESHAPE,
               "max backward: gradient of shape %s does not match the output shape %s",
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str_n(P.ond, P.oshape, b2, sizeof b2));
    NEMO_CHECK(same_shape(indices->ndim, indices->shape, P.ond, P.oshape) && indices->dtype == NEMO_I64, NEMO_ESHAPE,
               "max backward: indices (shape %s, %s) must be int64 of the output shape %s",
               nemo_shape_str(indices, b1, sizeof b1), nemo_dtype_name(indices->dtype),
               nemo_shape_str_n(P.ond, P.oshape, b2, sizeof b2));
    NEMO_TRY(nemo_check_same_device("max backward", g, indices));
    max_dim_bwd_k k;
    NEMO_GET_KERNEL(k, max_dim_bwd_k, "max_dim_backward", g->devtype);
    int odt = float_dtype(x_dtype);
    int cdt = nemo_compute_dtype(nemo_promote(g->dtype, odt));
    NEMO_TRYP(gc, nemo_prep(g, cdt));
    NEMO_TRYP(ic, nemo_prep(indices, NEMO_I64));
    NEMO_TRYP(dx, nemo_empty(ndim, shape, cdt, g->devtype, g->devindex));
    if (P.A * P.K * P.M > 0) NEMO_TRY(k(dx, gc, ic, P.A, P.K, P.M));
    nemo_tensor_release(gc);
    nemo_tensor_release(ic);
    return finish(dx, odt);
fail:
    nemo_tensor_release(gc);
    nemo_tensor_release(ic);
    nemo_tensor_release(dx);
    return NULL;
}

/* ==== softmax / log_softmax ==== */

NEMO_API nemo_tensor *nemo_softmax(const nemo_tensor *x, int64_t dim, int log, int out_dtype) {
    int rc = 0;
    nemo_tensor *xc = NULL, *y = NULL;
    const char *name = log ? "log_softmax" : "softmax";
    NEMO_TRY(check_out_dtype(name, out_dtype));
    int odt = out_dtype >= 0 ? out_dtype : float_dtype(x->dtype);
    NEMO_CHECK(nemo_dtype_is_float(odt), NEMO_EDTYPE, "%s: dtype must be a floating point type, got %s", name,
               nemo_dtype_name(odt));
    int d = 0;
    NEMO_TRY(norm_dim(name, dim, x->ndim, &d));
    rplan P;
    dim_plan(x, x->ndim ? d : -1, 1, &P);
    softmax_k k;
    NEMO_GET_KERNEL(k, softmax_k, "softmax", x->devtype);
    int cdt = nemo_compute_dtype(odt);
    NEMO_TRYP(y, nemo_empty(x->ndim, x->shape, cdt, x->devtype, x->devindex));
    if (P.A * P.K * P.M > 0) {
        NEMO_TRYP(xc, nemo_prep(x, cdt));
        NEMO_TRY(k(y, xc, P.A, P.K, P.M, log));
    }
    nemo_tensor_release(xc);
    return finish(y, odt);
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_softmax_backward(const nemo_tensor *g, const nemo_tensor *y, int64_t dim, int log) {
    int rc = 0;
    nemo_tensor *gc = NULL, *yc = NULL, *dx = NULL;
    const char *name = log ? "log_softmax backward" : "softmax backward";
    char b1[128], b2[128];
    NEMO_CHECK(same_shape(g->ndim, g->shape, y->ndim, y->shape), NEMO_ESHAPE,
               "%s: gradient of shape %s does not match the output shape %s", name,
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str(y, b2, sizeof b2));
    NEMO_CHECK(nemo_dtype_is_float(y->dtype), NEMO_EDTYPE, "%s: expected a floating point output, got %s", name,
               nemo_dtype_name(y->dtype));
    NEMO_TRY(nemo_check_same_device(name, g, y));
    int d = 0;
    NEMO_TRY(norm_dim(name, dim, y->ndim, &d));
    rplan P;
    dim_plan(y, y->ndim ? d : -1, 1, &P);
    softmax_bwd_k k;
    NEMO_GET_KERNEL(k, softmax_bwd_k, "softmax_backward", y->devtype);
    int cdt = nemo_compute_dtype(nemo_promote(g->dtype, y->dtype));
    NEMO_TRYP(dx, nemo_empty(y->ndim, y->shape, cdt, y->devtype, y->devindex));
    if (P.A * P.K * P.M > 0) {
        NEMO_TRYP(gc, nemo_prep(g, cdt));
        NEMO_TRYP(yc, nemo_prep(y, cdt));
        NEMO_TRY(k(dx, gc, yc, P.A, P.K, P.M, log));
    }
    nemo_tensor_release(gc);
    nemo_tensor_release(yc);
    return finish(dx, y->dtype);
fail:
    nemo_tensor_release(gc);
    nemo_tensor_release(yc);
    nemo_tensor_release(dx);
    return NULL;
}

/* ==== cumsum ==== */

NEMO_API nemo_tensor *nemo_cumsum(const nemo_tensor *x, int64_t dim, int reverse, int out_dtype) {
    int rc = 0;
    nemo_tensor *xc = NULL, *y = NULL;
    NEMO_TRY(check_out_dtype("cumsum", out_dtype));
    int odt = out_dtype >= 0 ? out_dtype : (nemo_dtype_is_float(x->dtype) ? x->dtype : NEMO_I64);
    int d = 0;
    NEMO_TRY(norm_dim("cumsum", dim, x->ndim, &d));
    rplan P;
    dim_plan(x, x->ndim ? d : -1, 1, &P);
    cumsum_k k;
    NEMO_GET_KERNEL(k, cumsum_k, "cumsum", x->devtype);
    int cdt = nemo_compute_dtype(odt);
    NEMO_TRYP(y, nemo_empty(x->ndim, x->shape, cdt, x->devtype, x->devindex));
    if (P.A * P.K * P.M > 0) {
        NEMO_TRYP(xc, nemo_prep(x, cdt));
        NEMO_TRY(k(y, xc, P.A, P.K, P.M, reverse));
    }
    nemo_tensor_release(xc);
    return finish(y, odt);
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(y);
    return NULL;
}
