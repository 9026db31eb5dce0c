/*
 * engine/ops/fused.c: front-ends of the fused DiT ops (rope, modulate, gated_add) and of the
 * vectorised float32 math entry point (kernels in kernels/cpu/fused.c and kernels/cpu/pointwise.c).
 *
 * Each front-end checks shapes, dtypes and devices, converts the inputs to dense arrays of the
 * compute dtype (float32 for f32/bf16/f16, float64 for f64) with nemo_prep, runs the kernel into a
 * compute-dtype result and rounds it once into the output dtype. Kernels see contiguous tensors
 * of the compute dtype plus the (B, S, D) sizes, never user input they must validate.
 *
 * bfloat16 / float16 operands: where the device's kernel is also registered as "<name>.lp"
 * (the CUDA ones), the large operands (x, a, g and the result) stay bfloat16 / float16 and the
 * kernel reads them into float32 and rounds its result once: the same numbers as converting
 * and rounding here, in one pass over memory instead of three, without the float32 copies.
 * The small per-sample vectors and rope tables are still converted. NEMO_LOWP_IO=0 turns this
 * off (for comparisons).
 */
#include "../internal.h"

typedef int (*fastmath_k)(int fn, float *y, const float *x, int64_t n);
typedef int (*rope_k)(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin,
                      int64_t nb, int64_t S, int64_t nh, int64_t D, int backward);
typedef int (*modulate_k)(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *scale,
                          const nemo_tensor *shift, int64_t B, int64_t S, int64_t D, int64_t sb);
typedef int (*modulate_bwd_k)(nemo_tensor *dx, nemo_tensor *dscale, nemo_tensor *dshift, const nemo_tensor *g,
                              const nemo_tensor *x, const nemo_tensor *scale, int64_t B, int64_t S, int64_t D,
                              int64_t sb);
typedef int (*gated_add_k)(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *gate, const nemo_tensor *a,
                           int64_t B, int64_t S, int64_t D, int64_t gb);
typedef int (*gated_add_bwd_k)(nemo_tensor *da, nemo_tensor *dgate, const nemo_tensor *g, const nemo_tensor *gate,
                               const nemo_tensor *a, int64_t B, int64_t S, int64_t D, int64_t gb);

/* ==== Helpers ==== */

/* Round a compute-dtype result into dtype dt (a new reference; tmp is consumed). */
static nemo_tensor *finish(nemo_tensor *tmp, int dt) {
    if (!tmp || tmp->dtype == dt) return tmp;
    nemo_tensor *o = nemo_to(tmp, dt, tmp->devtype, tmp->devindex);
    nemo_tensor_release(tmp);
    return o;
}

/* *out = *tmp rounded to dtype dt; *tmp is consumed (set to NULL) either way. */
static int take(nemo_tensor **out, nemo_tensor **tmp, int dt) {
    nemo_tensor *t = *tmp;
    *tmp = NULL;
    *out = finish(t, dt);
    if (*out) return 0;
    return nemo_last_status() < 0 ? nemo_last_status() : NEMO_EINTERNAL;
}

static int check_float(const char *op, const char *what, const nemo_tensor *t) {
    if (!nemo_dtype_is_float(t->dtype))
        return NEMO_ERR(NEMO_EDTYPE, "%s: expected a floating point %s, got %s", op, what, nemo_dtype_name(t->dtype));
    return 0;
}

static int same_shape(const nemo_tensor *a, const nemo_tensor *b) {
    return a->ndim == b->ndim && !memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim);
}

/* x (B, S, D) and a per-sample vector p (B, D) or (1, D): returns p's row stride in a dense
 * copy (D, or 0 when shared by the batch) or < 0 with an error naming op and what. */
static int64_t per_sample(const char *op, const char *what, const nemo_tensor *x, const nemo_tensor *p) {
    char b1[128], b2[128];
    int rc = check_float(op, what, p);
    if (rc < 0) return rc;
    rc = nemo_check_same_device(op, x, p);
    if (rc < 0) return rc;
    if (p->ndim != 2 || p->shape[1] != x->shape[2] || (p->shape[0] != x->shape[0] && p->shape[0] != 1))
        return NEMO_ERR(NEMO_ESHAPE, "%s: %s must be (%lld, %lld) or (1, %lld) for an input of shape %s, got %s",
                        op, what, (long long)x->shape[0], (long long)x->shape[2], (long long)x->shape[2],
                        nemo_shape_str(x, b1, sizeof b1), nemo_shape_str(p, b2, sizeof b2));
    return p->shape[0] == x->shape[0] && x->shape[0] != 1 ? x->shape[2] : 0;
}

static int check_bsd(const char *op, const char *what, const nemo_tensor *x) {
    char b1[128];
    int rc = check_float(op, what, x);
    if (rc < 0) return rc;
    if (x->ndim != 3)
        return NEMO_ERR(NEMO_ESHAPE, "%s: %s must be (B, S, D), got shape %s", op, what,
                        nemo_shape_str(x, b1, sizeof b1));
    return 0;
}

/* ==== fastmath ==== */

NEMO_API int nemo_fastmath_f32(int fn, float *y, const float *x, int64_t n) {
    int rc = 0;
    fastmath_k k;
    NEMO_CHECK(fn >= 0 && fn < NEMO_NFM, NEMO_EINVAL, "fastmath: unknown function %d (0..%d)", fn, NEMO_NFM - 1);
    NEMO_CHECK(n >= 0 && (n == 0 || (x && y)), NEMO_EINVAL, "fastmath: bad array (n = %lld)", (long long)n);
    NEMO_GET_KERNEL(k, fastmath_k, "fastmath", NEMO_CPU);
    rc = k(fn, y, x, n);
fail:
    return rc;
}

/* ==== rope ==== */

static int rope_geometry(const char *op, const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin,
                         int seq_dim, int64_t *nb, int64_t *nh) {
    char b1[128], b2[128], b3[128];
    int rc;
    if ((rc = check_float(op, "input", x)) < 0 || (rc = check_float(op, "cos", cos)) < 0 ||
        (rc = check_float(op, "sin", sin)) < 0)
        return rc;
    if ((rc = nemo_check_same_device(op, x, cos)) < 0 || (rc = nemo_check_same_device(op, x, sin)) < 0) return rc;
    if (x->ndim < 2 || seq_dim < 0 || seq_dim >= x->ndim - 1)
        return NEMO_ERR(NEMO_ESHAPE, "%s: sequence dim %d must lie before the last dim of the input of shape %s",
                        op, seq_dim, nemo_shape_str(x, b1, sizeof b1));
    int64_t S = x->shape[seq_dim], D = x->shape[x->ndim - 1];
    if (D % 2 != 0)
        return NEMO_ERR(NEMO_ESHAPE, "%s: the last dim of the input of shape %s must be even (pairs rotate)", op,
                        nemo_shape_str(x, b1, sizeof b1));
    if (cos->ndim != 2 || cos->shape[0] != S || cos->shape[1] != D || !same_shape(cos, sin))
        return NEMO_ERR(NEMO_ESHAPE, "%s: cos %s and sin %s must both be (%lld, %lld) for the input of shape %s "
                        "(sequence dim %d)", op, nemo_shape_str(cos, b1, sizeof b1), nemo_shape_str(sin, b2, sizeof b2),
                        (long long)S, (long long)D, nemo_shape_str(x, b3, sizeof b3), seq_dim);
    *nb = (int64_t)nemo_numel_of(seq_dim, x->shape);
    *nh = (int64_t)nemo_numel_of(x->ndim - 2 - seq_dim, x->shape + seq_dim + 1);
    return 0;
}

static nemo_tensor *rope_common(const char *op, const nemo_tensor *x, const nemo_tensor *cos,
                                const nemo_tensor *sin, int seq_dim, int out_dtype, int backward) {
    int rc = 0;
    nemo_tensor *xc = NULL, *cc = NULL, *sc = NULL, *y = NULL;
    int64_t nb, nh;
    NEMO_TRY(rope_geometry(op, x, cos, sin, seq_dim, &nb, &nh));
    rope_k k;
    NEMO_GET_KERNEL(k, rope_k, "rope", x->devtype);
    int cdt = nemo_compute_dtype(nemo_promote(nemo_promote(x->dtype, cos->dtype), sin->dtype));
    int xdt = x->dtype == out_dtype ? nemo_io_dtype("rope", x->devtype, x->dtype, cdt) : cdt;
    NEMO_TRYP(xc, nemo_prep(x, xdt));
    NEMO_TRYP(cc, nemo_prep(cos, cdt));
    NEMO_TRYP(sc, nemo_prep(sin, cdt));
    NEMO_TRYP(y, nemo_empty(x->ndim, x->shape, xdt, x->devtype, x->devindex));
    NEMO_TRY(k(y, xc, cc, sc, nb, x->shape[seq_dim], nh, x->shape[x->ndim - 1], backward));
    nemo_tensor_release(xc); nemo_tensor_release(cc); nemo_tensor_release(sc);
    return finish(y, out_dtype);
fail:
    nemo_tensor_release(xc); nemo_tensor_release(cc); nemo_tensor_release(sc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_rope(const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin, int seq_dim) {
    return rope_common("rope", x, cos, sin, seq_dim, x->dtype, 0);
}

NEMO_API nemo_tensor *nemo_rope_backward(const nemo_tensor *g, const nemo_tensor *cos, const nemo_tensor *sin,
                                         int seq_dim, int x_dtype) {
    if (!nemo_dtype_is_float(x_dtype)) {
        NEMO_ERR(NEMO_EDTYPE, "rope backward: the input dtype must be floating point, got %s", nemo_dtype_name(x_dtype));
        return NULL;
    }
    return rope_common("rope backward", g, cos, sin, seq_dim, x_dtype, 1);
}

/* ==== modulate ==== */

NEMO_API nemo_tensor *nemo_modulate(const nemo_tensor *x, const nemo_tensor *scale, const nemo_tensor *shift) {
    int rc = 0;
    nemo_tensor *xc = NULL, *sc = NULL, *hc = NULL, *y = NULL;
    int64_t sb, hb = 0;
    NEMO_TRY(check_bsd("modulate", "input", x));
    NEMO_TRY(sb = per_sample("modulate", "scale", x, scale));
    if (shift) {
        char b1[128], b2[128];
        NEMO_TRY(hb = per_sample("modulate", "shift", x, shift));
        NEMO_CHECK(same_shape(scale, shift), NEMO_ESHAPE, "modulate: scale %s and shift %s must have one shape",
                   nemo_shape_str(scale, b1, sizeof b1), nemo_shape_str(shift, b2, sizeof b2));
    }
    (void)hb;
    modulate_k k;
    NEMO_GET_KERNEL(k, modulate_k, "modulate", x->devtype);
    int odt = nemo_promote(x->dtype, scale->dtype);
    if (shift) odt = nemo_promote(odt, shift->dtype);
    int cdt = nemo_compute_dtype(odt);
    int xdt = x->dtype == odt ? nemo_io_dtype("modulate", x->devtype, odt, cdt) : cdt;
    NEMO_TRYP(xc, nemo_prep(x, xdt));
    NEMO_TRYP(sc, nemo_prep(scale, cdt));
    if (shift) NEMO_TRYP(hc, nemo_prep(shift, cdt));
    NEMO_TRYP(y, nemo_empty(3, x->shape, xdt, x->devtype, x->devindex));
    NEMO_TRY(k(y, xc, sc, hc, x->shape[0], x->shape[1], x->shape[2], sb));
    nemo_tensor_release(xc); nemo_tensor_release(sc); nemo_tensor_release(hc);
    return finish(y, odt);
fail:
    nemo_tensor_release(xc); nemo_tensor_release(sc); nemo_tensor_release(hc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API int nemo_modulate_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *scale,
                                    int shift_dtype, nemo_tensor **dx, nemo_tensor **dscale,
                                    nemo_tensor **dshift) {
    int rc = 0;
    nemo_tensor *gc = NULL, *xc = NULL, *sc = NULL, *tdx = NULL, *tds = NULL, *tdh = NULL;
    if (dx) *dx = NULL;
    if (dscale) *dscale = NULL;
    if (dshift) *dshift = NULL;
    int64_t sb;
    char b1[128], b2[128];
    NEMO_TRY(check_bsd("modulate backward", "input", x));
    NEMO_TRY(check_float("modulate backward", "gradient", g));
    NEMO_CHECK(same_shape(g, x), NEMO_ESHAPE, "modulate backward: gradient shape %s does not match input shape %s",
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str(x, b2, sizeof b2));
    NEMO_TRY(nemo_check_same_device("modulate backward", g, x));
    NEMO_TRY(sb = per_sample("modulate backward", "scale", x, scale));
    if (shift_dtype < 0) shift_dtype = scale->dtype;
    NEMO_CHECK(nemo_dtype_is_float(shift_dtype), NEMO_EDTYPE, "modulate backward: shift dtype %s is not floating point",
               nemo_dtype_name(shift_dtype));
    modulate_bwd_k k;
    NEMO_GET_KERNEL(k, modulate_bwd_k, "modulate_backward", x->devtype);
    int cdt = nemo_compute_dtype(nemo_promote(nemo_promote(g->dtype, x->dtype), scale->dtype));
    int xdt = g->dtype == x->dtype ? nemo_io_dtype("modulate_backward", x->devtype, x->dtype, cdt) : cdt;
    NEMO_TRYP(gc, nemo_prep(g, xdt));
    NEMO_TRYP(xc, nemo_prep(x, xdt));
    NEMO_TRYP(sc, nemo_prep(scale, cdt));
    if (dx) NEMO_TRYP(tdx, nemo_empty(3, x->shape, xdt, x->devtype, x->devindex));
    if (dscale) NEMO_TRYP(tds, nemo_empty(2, scale->shape, cdt, x->devtype, x->devindex));
    if (dshift) NEMO_TRYP(tdh, nemo_empty(2, scale->shape, cdt, x->devtype, x->devindex));
    NEMO_TRY(k(tdx, tds, tdh, gc, xc, sc, x->shape[0], x->shape[1], x->shape[2], sb));
    if (dx) NEMO_TRY(take(dx, &tdx, x->dtype));
    if (dscale) NEMO_TRY(take(dscale, &tds, scale->dtype));
    if (dshift) NEMO_TRY(take(dshift, &tdh, shift_dtype));
fail:
    nemo_tensor_release(gc); nemo_tensor_release(xc); nemo_tensor_release(sc);
    nemo_tensor_release(tdx); nemo_tensor_release(tds); nemo_tensor_release(tdh);
    if (rc < 0) {
        if (dx) { nemo_tensor_release(*dx); *dx = NULL; }
        if (dscale) { nemo_tensor_release(*dscale); *dscale = NULL; }
        if (dshift) { nemo_tensor_release(*dshift); *dshift = NULL; }
    }
    return rc;
}

/* ==== gated_add ==== */

NEMO_API nemo_tensor *nemo_gated_add(const nemo_tensor *x, const nemo_tensor *gate, const nemo_tensor *a) {
    int rc = 0;
    nemo_tensor *xc = NULL, *gc = NULL, *ac = NULL, *y = NULL;
    int64_t gb;
    char b1[128], b2[128];
    NEMO_TRY(check_bsd("gated_add", "input", x));
    NEMO_TRY(check_bsd("gated_add", "addend", a));
    NEMO_CHECK(same_shape(x, a), NEMO_ESHAPE, "gated_add: input %s and addend %s must have one shape",
               nemo_shape_str(x, b1, sizeof b1), nemo_shape_str(a, b2, sizeof b2));
    NEMO_TRY(nemo_check_same_device("gated_add", x, a));
    NEMO_TRY(gb = per_sample("gated_add", "gate", x, gate));
    gated_add_k k;
    NEMO_GET_KERNEL(k, gated_add_k, "gated_add", x->devtype);
    int odt = nemo_promote(nemo_promote(x->dtype, gate->dtype), a->dtype);
    int cdt = nemo_compute_dtype(odt);
    int xdt = x->dtype == odt && a->dtype == odt ? nemo_io_dtype("gated_add", x->devtype, odt, cdt) : cdt;
    NEMO_TRYP(xc, nemo_prep(x, xdt));
    NEMO_TRYP(gc, nemo_prep(gate, cdt));
    NEMO_TRYP(ac, nemo_prep(a, xdt));
    NEMO_TRYP(y, nemo_empty(3, x->shape, xdt, x->devtype, x->devindex));
    NEMO_TRY(k(y, xc, gc, ac, x->shape[0], x->shape[1], x->shape[2], gb));
    nemo_tensor_release(xc); nemo_tensor_release(gc); nemo_tensor_release(ac);
    return finish(y, odt);
fail:
    nemo_tensor_release(xc); nemo_tensor_release(gc); nemo_tensor_release(ac);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API int nemo_gated_add_backward(const nemo_tensor *g, const nemo_tensor *gate, const nemo_tensor *a,
                                     nemo_tensor **da, nemo_tensor **dgate) {
    int rc = 0;
    nemo_tensor *gc = NULL, *tc = NULL, *ac = NULL, *tda = NULL, *tdg = NULL;
    if (da) *da = NULL;
    if (dgate) *dgate = NULL;
    int64_t gb;
    char b1[128], b2[128];
    NEMO_TRY(check_bsd("gated_add backward", "addend", a));
    NEMO_TRY(check_float("gated_add backward", "gradient", g));
    NEMO_CHECK(same_shape(g, a), NEMO_ESHAPE, "gated_add backward: gradient shape %s does not match addend shape %s",
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str(a, b2, sizeof b2));
    NEMO_TRY(nemo_check_same_device("gated_add backward", g, a));
    NEMO_TRY(gb = per_sample("gated_add backward", "gate", a, gate));
    gated_add_bwd_k k;
    NEMO_GET_KERNEL(k, gated_add_bwd_k, "gated_add_backward", a->devtype);
    int cdt = nemo_compute_dtype(nemo_promote(nemo_promote(g->dtype, gate->dtype), a->dtype));
    int xdt = g->dtype == a->dtype ? nemo_io_dtype("gated_add_backward", a->devtype, a->dtype, cdt) : cdt;
    NEMO_TRYP(gc, nemo_prep(g, xdt));
    NEMO_TRYP(tc, nemo_prep(gate, cdt));
    NEMO_TRYP(ac, nemo_prep(a, xdt));
    if (da) NEMO_TRYP(tda, nemo_empty(3, a->shape, xdt, a->devtype, a->devindex));
    if (dgate) NEMO_TRYP(tdg, nemo_empty(2, gate->shape, cdt, a->devtype, a->devindex));
    NEMO_TRY(k(tda, tdg, gc, tc, ac, a->shape[0], a->shape[1], a->shape[2], gb));
    if (da) NEMO_TRY(take(da, &tda, a->dtype));
    if (dgate) NEMO_TRY(take(dgate, &tdg, gate->dtype));
fail:
    nemo_tensor_release(gc); nemo_tensor_release(tc); nemo_tensor_release(ac);
    nemo_tensor_release(tda); nemo_tensor_release(tdg);
    if (rc < 0) {
        if (da) { nemo_tensor_release(*da); *da = NULL; }
        if (dgate) { nemo_tensor_release(*dgate); *dgate = NULL; }
    }
    return rc;
}
