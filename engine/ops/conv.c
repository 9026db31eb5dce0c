/*
 * engine/ops/conv.c: front-ends of convolution (1-D/2-D/3-D), embedding and nearest
 * interpolation, forward and backward.
 *
 * Convolutions are normalised to 3 spatial dims before the kernel runs: a 2-D conv is a 3-D
 * conv with depth 1 (kernel 1, stride 1, no padding, dilation 1) and a 1-D conv also has height
 * 1, so one kernel serves all three. The kernel sees contiguous 5-D arrays in the compute dtype
 * (float32 for f32/bf16/f16, float64 for f64) and the result is rounded once into the output
 * dtype. Only the "before" padding reaches the kernel: the "after" padding only changes the
 * output size, which the kernel reads from y's shape.
 */
#include "../internal.h"

typedef int (*conv_fwd_k)(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b,
                          const int64_t *stride, const int64_t *pad, const int64_t *dil, int64_t groups, int algo);
typedef int (*conv_bwd_k)(nemo_tensor *dx, nemo_tensor *dw, nemo_tensor *db, const nemo_tensor *g,
                          const nemo_tensor *x, const nemo_tensor *w, const int64_t *stride, const int64_t *pad,
                          const int64_t *dil, int64_t groups, int algo);
typedef int (*embed_fwd_k)(nemo_tensor *y, const nemo_tensor *idx, const nemo_tensor *w);
typedef int (*embed_bwd_k)(nemo_tensor *dw, const nemo_tensor *g, const nemo_tensor *idx, int64_t padding_idx);
typedef int (*interp_k)(nemo_tensor *out, const nemo_tensor *in, const double *scales, int mode);

/* ==== Helpers ==== */

/* A contiguous view of t (which must be contiguous) with another shape. */
static nemo_tensor *reshaped(const nemo_tensor *t, int ndim, const int64_t *shape) {
    return nemo_tensor_view(t, ndim, shape, NULL, t->offset);
}

/* Round a compute-dtype result into dtype dt and give it the shape (ndim, shape); tmp is consumed. */
static nemo_tensor *finish(nemo_tensor *tmp, int dt, int ndim, const int64_t *shape) {
    if (!tmp) return NULL;
    nemo_tensor *o = tmp->dtype == dt ? tmp : nemo_to(tmp, dt, tmp->devtype, tmp->devindex);
    if (o != tmp) nemo_tensor_release(tmp);
    if (!o) return NULL;
    nemo_tensor *v = reshaped(o, ndim, shape);
    nemo_tensor_release(o);
    return v;
}

static int same_shape(const nemo_tensor *t, int ndim, const int64_t *shape) {
    return t->ndim == ndim && !memcmp(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
}

/* ==== Convolution ==== */

typedef struct {
    const char *op;                  /* "conv2d", ... for messages */
    int nsp, batched;
    int64_t N, C, O, groups;
    int64_t S[3], K[3], So[3];       /* spatial sizes normalised to 3 dims (leading 1s) */
    int64_t stride[3], pad[3], dil[3];
    int64_t x5[5], w5[5], y5[5];     /* shapes the kernel sees */
    int yndim;
    int64_t yshape[NEMO_MAXDIM];     /* shape the caller sees */
} conv_geom;

static const char *conv_name(int nsp) {
    static const char *names[4] = {"conv", "conv1d", "conv2d", "conv3d"};
    return (nsp >= 1 && nsp <= 3) ? names[nsp] : names[0];
}

/* Check every argument and compute the output geometry. b may be NULL. */
static int conv_setup(conv_geom *G, const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b, int nsp,
                      const int64_t *stride, const int64_t *pad_lo, const int64_t *pad_hi,
                      const int64_t *dilation, int64_t groups) {
    int rc = 0;
    char b1[160], b2[160], b3[160], b4[160];
    memset(G, 0, sizeof *G);
    G->op = conv_name(nsp);
    const char *op = G->op;
    NEMO_CHECK(nsp >= 1 && nsp <= 3, NEMO_EINVAL, "conv: %d spatial dimensions, expected 1, 2 or 3", nsp);
    NEMO_CHECK(x && w, NEMO_EINVAL, "%s: input and weight are required", op);
    NEMO_CHECK(x->ndim == nsp + 1 || x->ndim == nsp + 2, NEMO_ESHAPE,
               "%s: expected a %dD (unbatched) or %dD (batched) input, got input of shape %s", op, nsp + 1, nsp + 2,
               nemo_shape_str(x, b1, sizeof b1));
    NEMO_CHECK(w->ndim == nsp + 2, NEMO_ESHAPE,
               "%s: expected a %dD weight (out_channels, in_channels/groups, kernel...), got weight of shape %s",
               op, nsp + 2, nemo_shape_str(w, b1, sizeof b1));
    NEMO_CHECK(nemo_dtype_is_float(x->dtype) && nemo_dtype_is_float(w->dtype) && (!b || nemo_dtype_is_float(b->dtype)),
               NEMO_EDTYPE, "%s: expected floating point tensors, got input %s, weight %s%s%s", op,
               nemo_dtype_name(x->dtype), nemo_dtype_name(w->dtype), b ? ", bias " : "", b ? nemo_dtype_name(b->dtype) : "");
    NEMO_TRY(nemo_check_same_device(op, x, w));
    if (b) NEMO_TRY(nemo_check_same_device(op, x, b));
    G->nsp = nsp;
    G->batched = x->ndim == nsp + 2;
    int xo = G->batched ? 1 : 0;   /* index of the channel dim in x */
    G->N = G->batched ? x->shape[0] : 1;
    G->C = x->shape[xo];
    G->O = w->shape[0];
    G->groups = groups;
    NEMO_CHECK(groups >= 1, NEMO_EINVAL, "%s: groups must be >= 1, got %lld", op, (long long)groups);
    NEMO_CHECK(G->O % groups == 0, NEMO_ESHAPE,
               "%s: out_channels %lld (weight of shape %s) is not divisible by groups %lld", op, (long long)G->O,
               nemo_shape_str(w, b1, sizeof b1), (long long)groups);
    NEMO_CHECK(w->shape[1] * groups == G->C, NEMO_ESHAPE,
               "%s: input of shape %s has %lld channels, but weight of shape %s with groups=%lld expects %lld "
               "(weight.shape[1] * groups)", op, nemo_shape_str(x, b1, sizeof b1), (long long)G->C,
               nemo_shape_str(w, b2, sizeof b2), (long long)groups, (long long)(w->shape[1] * groups));
    NEMO_CHECK(G->C > 0, NEMO_ESHAPE, "%s: input of shape %s has no channels", op, nemo_shape_str(x, b1, sizeof b1));
    if (b)
        NEMO_CHECK(b->ndim == 1 && b->shape[0] == G->O, NEMO_ESHAPE,
                   "%s: bias must have shape (%lld,) to match weight of shape %s, got %s", op, (long long)G->O,
                   nemo_shape_str(w, b1, sizeof b1), nemo_shape_str(b, b2, sizeof b2));
    for (int d = 0; d < nsp; d++) {
        NEMO_CHECK(stride[d] >= 1, NEMO_EINVAL, "%s: stride must be >= 1 in every dimension, got stride %s", op,
                   nemo_shape_str_n(nsp, stride, b1, sizeof b1));
        NEMO_CHECK(dilation[d] >= 1, NEMO_EINVAL, "%s: dilation must be >= 1 in every dimension, got dilation %s",
                   op, nemo_shape_str_n(nsp, dilation, b1, sizeof b1));
        NEMO_CHECK(pad_lo[d] >= 0 && pad_hi[d] >= 0, NEMO_EINVAL,
                   "%s: padding must be >= 0, got padding before %s and after %s", op,
                   nemo_shape_str_n(nsp, pad_lo, b1, sizeof b1), nemo_shape_str_n(nsp, pad_hi, b2, sizeof b2));
    }
    for (int d = 0; d < 3; d++) {
        G->S[d] = G->K[d] = G->So[d] = 1;
        G->stride[d] = G->dil[d] = 1;
        G->pad[d] = 0;
    }
    for (int d = 0; d < nsp; d++) {
        int k = 3 - nsp + d;
        int64_t in = x->shape[xo + 1 + d], kk = w->shape[2 + d];
        int64_t padded = in + pad_lo[d] + pad_hi[d], span = dilation[d] * (kk - 1) + 1;
        NEMO_CHECK(kk >= 1, NEMO_ESHAPE, "%s: weight of shape %s has an empty kernel", op, nemo_shape_str(w, b1, sizeof b1));
        NEMO_CHECK(padded >= span, NEMO_ESHAPE,
                   "%s: kernel size can't be greater than the padded input size: spatial dim %d of input %s is %lld "
                   "after padding %s/%s, but the (dilated) kernel of weight %s spans %lld", op, d,
                   nemo_shape_str(x, b1, sizeof b1), (long long)padded, nemo_shape_str_n(nsp, pad_lo, b2, sizeof b2),
                   nemo_shape_str_n(nsp, pad_hi, b3, sizeof b3), nemo_shape_str(w, b4, sizeof b4), (long long)span);
        G->S[k] = in;
        G->K[k] = kk;
        G->stride[k] = stride[d];
        G->pad[k] = pad_lo[d];
        G->dil[k] = dilation[d];
        G->So[k] = (padded - span) / stride[d] + 1;
    }
    G->x5[0] = G->N; G->x5[1] = G->C;
    G->w5[0] = G->O; G->w5[1] = w->shape[1];
    G->y5[0] = G->N; G->y5[1] = G->O;
    for (int d = 0; d < 3; d++) { G->x5[2 + d] = G->S[d]; G->w5[2 + d] = G->K[d]; G->y5[2 + d] = G->So[d]; }
    G->yndim = x->ndim;
    int k = 0;
    if (G->batched) G->yshape[k++] = G->N;
    G->yshape[k++] = G->O;
    for (int d = 0; d < nsp; d++) G->yshape[k++] = G->So[3 - nsp + d];
fail:
    return rc;
}

NEMO_API nemo_tensor *nemo_conv(const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b, int nsp,
                                const int64_t *stride, const int64_t *pad_lo, const int64_t *pad_hi,
                                const int64_t *dilation, int64_t groups, int algo) {
    int rc = 0;
    nemo_tensor *xc = NULL, *wc = NULL, *bc = NULL, *x5 = NULL, *w5 = NULL, *y5 = NULL;
    conv_geom G;
    NEMO_TRY(conv_setup(&G, x, w, b, nsp, stride, pad_lo, pad_hi, dilation, groups));
    int odt = nemo_promote(x->dtype, w->dtype);
    if (b) odt = nemo_promote(odt, b->dtype);
    int cdt = nemo_compute_dtype(odt);
    conv_fwd_k k;
    NEMO_GET_KERNEL(k, conv_fwd_k, "conv_fwd", x->devtype);
    NEMO_TRYP(xc, nemo_prep(x, cdt));
    NEMO_TRYP(wc, nemo_prep(w, cdt));
    if (b) NEMO_TRYP(bc, nemo_prep(b, cdt));
    NEMO_TRYP(x5, reshaped(xc, 5, G.x5));
    NEMO_TRYP(w5, reshaped(wc, 5, G.w5));
    NEMO_TRYP(y5, nemo_empty(5, G.y5, cdt, x->devtype, x->devindex));
    NEMO_TRY(k(y5, x5, w5, bc, G.stride, G.pad, G.dil, groups, algo));
    nemo_tensor_release(xc); nemo_tensor_release(wc); nemo_tensor_release(bc);
    nemo_tensor_release(x5); nemo_tensor_release(w5);
    return finish(y5, odt, G.yndim, G.yshape);
fail:
    nemo_tensor_release(xc); nemo_tensor_release(wc); nemo_tensor_release(bc);
    nemo_tensor_release(x5); nemo_tensor_release(w5); nemo_tensor_release(y5);
    return NULL;
}

NEMO_API int nemo_conv_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *w, int nsp,
                                const int64_t *stride, const int64_t *pad_lo, const int64_t *pad_hi,
                                const int64_t *dilation, int64_t groups, int algo,
                                nemo_tensor **dx, nemo_tensor **dw, nemo_tensor **db) {
    int rc = 0;
    nemo_tensor *gc = NULL, *xc = NULL, *wc = NULL, *g5 = NULL, *x5 = NULL, *w5 = NULL;
    nemo_tensor *dx5 = NULL, *dw5 = NULL, *db1 = NULL;
    char b1[160], b2[160];
    if (dx) *dx = NULL;
    if (dw) *dw = NULL;
    if (db) *db = NULL;
    conv_geom G;
    NEMO_TRY(conv_setup(&G, x, w, NULL, nsp, stride, pad_lo, pad_hi, dilation, groups));
    NEMO_CHECK(g, NEMO_EINVAL, "%s backward: no gradient given", G.op);
    NEMO_CHECK(same_shape(g, G.yndim, G.yshape), NEMO_ESHAPE,
               "%s backward: gradient of shape %s does not match the output shape %s", G.op,
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str_n(G.yndim, G.yshape, b2, sizeof b2));
    NEMO_TRY(nemo_check_same_device(G.op, g, x));
    if (!dx && !dw && !db) return 0;
    int cdt = nemo_compute_dtype(nemo_promote(nemo_promote(x->dtype, w->dtype), g->dtype));
    conv_bwd_k k;
    NEMO_GET_KERNEL(k, conv_bwd_k, "conv_bwd", x->devtype);
    NEMO_TRYP(gc, nemo_prep(g, cdt));
    NEMO_TRYP(g5, reshaped(gc, 5, G.y5));
    if (dx) {
        NEMO_TRYP(wc, nemo_prep(w, cdt));
        NEMO_TRYP(w5, reshaped(wc, 5, G.w5));
        NEMO_TRYP(dx5, nemo_empty(5, G.x5, cdt, x->devtype, x->devindex));
    }
    if (dw) {
        NEMO_TRYP(xc, nemo_prep(x, cdt));
        NEMO_TRYP(x5, reshaped(xc, 5, G.x5));
        NEMO_TRYP(dw5, nemo_empty(5, G.w5, cdt, x->devtype, x->devindex));
    }
    if (db) NEMO_TRYP(db1, nemo_empty(1, &G.O, cdt, x->devtype, x->devindex));
    NEMO_TRY(k(dx5, dw5, db1, g5, x5, w5, G.stride, G.pad, G.dil, groups, algo));
    if (dx) { NEMO_TRYP(*dx, finish(dx5, x->dtype, x->ndim, x->shape)); dx5 = NULL; }
    if (dw) { NEMO_TRYP(*dw, finish(dw5, w->dtype, w->ndim, w->shape)); dw5 = NULL; }
    if (db) { NEMO_TRYP(*db, finish(db1, w->dtype, 1, &G.O)); db1 = NULL; }
fail:
    nemo_tensor_release(gc); nemo_tensor_release(xc); nemo_tensor_release(wc);
    nemo_tensor_release(g5); nemo_tensor_release(x5); nemo_tensor_release(w5);
    nemo_tensor_release(dx5); nemo_tensor_release(dw5); nemo_tensor_release(db1);
    if (rc < 0) {
        if (dx && *dx) { nemo_tensor_release(*dx); *dx = NULL; }
        if (dw && *dw) { nemo_tensor_release(*dw); *dw = NULL; }
        if (db && *db) { nemo_tensor_release(*db); *db = NULL; }
    }
    return rc;
}

/* ==== Embedding ==== */

/* Indices as a contiguous int64 tensor (every kernel checks the values against [0, V)). */
static nemo_tensor *int64_indices(const char *op, const nemo_tensor *idx) {
    int rc = 0;
    char b1[160];
    NEMO_CHECK(idx->dtype == NEMO_I64 || idx->dtype == NEMO_I32, NEMO_EDTYPE,
               "%s: indices must be int64 or int32, got %s (shape %s)", op, nemo_dtype_name(idx->dtype),
               nemo_shape_str(idx, b1, sizeof b1));
    return nemo_prep(idx, NEMO_I64);
fail:
    NEMO_UNUSED(rc);   /* the status travels in the thread-local error */
    return NULL;
}

NEMO_API nemo_tensor *nemo_embedding(const nemo_tensor *indices, const nemo_tensor *weight) {
    int rc = 0;
    nemo_tensor *ic = NULL, *wc = NULL, *y = NULL;
    char b1[160];
    NEMO_CHECK(weight->ndim == 2, NEMO_ESHAPE,
               "embedding: weight must be 2-D (num_embeddings, embedding_dim), got shape %s",
               nemo_shape_str(weight, b1, sizeof b1));
    NEMO_CHECK(indices->ndim < NEMO_MAXDIM, NEMO_ESHAPE, "embedding: indices have %d dimensions, at most %d allowed",
               indices->ndim, NEMO_MAXDIM - 1);
    NEMO_TRY(nemo_check_same_device("embedding", indices, weight));
    embed_fwd_k k;
    NEMO_GET_KERNEL(k, embed_fwd_k, "embedding_fwd", weight->devtype);
    NEMO_TRYP(ic, int64_indices("embedding", indices));
    NEMO_TRYP(wc, nemo_contiguous(weight));
    int64_t shape[NEMO_MAXDIM];
    for (int d = 0; d < indices->ndim; d++) shape[d] = indices->shape[d];
    shape[indices->ndim] = weight->shape[1];
    NEMO_TRYP(y, nemo_empty(indices->ndim + 1, shape, weight->dtype, weight->devtype, weight->devindex));
    NEMO_TRY(k(y, ic, wc));
    nemo_tensor_release(ic);
    nemo_tensor_release(wc);
    return y;
fail:
    nemo_tensor_release(ic);
    nemo_tensor_release(wc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_embedding_backward(const nemo_tensor *g, const nemo_tensor *indices,
                                              int64_t num_weights, int64_t padding_idx) {
    int rc = 0;
    nemo_tensor *ic = NULL, *gc = NULL, *dw = NULL;
    char b1[160], b2[160];
    NEMO_CHECK(num_weights >= 0, NEMO_EINVAL, "embedding backward: num_weights must be >= 0, got %lld",
               (long long)num_weights);
    NEMO_CHECK(g->ndim == indices->ndim + 1 &&
               !memcmp(g->shape, indices->shape, sizeof(int64_t) * (size_t)indices->ndim), NEMO_ESHAPE,
               "embedding backward: gradient of shape %s does not fit indices of shape %s (expected indices' shape + (D,))",
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str(indices, b2, sizeof b2));
    NEMO_CHECK(nemo_dtype_is_float(g->dtype), NEMO_EDTYPE, "embedding backward: gradient must be float, got %s",
               nemo_dtype_name(g->dtype));
    NEMO_TRY(nemo_check_same_device("embedding backward", g, indices));
    embed_bwd_k k;
    NEMO_GET_KERNEL(k, embed_bwd_k, "embedding_bwd", g->devtype);
    int cdt = nemo_compute_dtype(g->dtype);
    NEMO_TRYP(ic, int64_indices("embedding backward", indices));
    NEMO_TRYP(gc, nemo_prep(g, cdt));
    int64_t shape[2] = {num_weights, g->shape[g->ndim - 1]};
    NEMO_TRYP(dw, nemo_empty(2, shape, cdt, g->devtype, g->devindex));
    NEMO_TRY(k(dw, gc, ic, padding_idx));
    nemo_tensor_release(ic);
    nemo_tensor_release(gc);
    return finish(dw, g->dtype, 2, shape);
fail:
    nemo_tensor_release(ic);
    nemo_tensor_release(gc);
    nemo_tensor_release(dw);
    return NULL;
}

/* ==== Nearest interpolation ==== */

/* Spatial sizes and scales normalised to 3 dims (leading 1s and "no scale"). */
static void interp_norm(int nsp, const int64_t *shape, const int64_t *spatial, const double *scales,
                        int64_t *s5, double *sc3) {
    s5[0] = shape[0];
    s5[1] = shape[1];
    for (int d = 0; d < 3; d++) { s5[2 + d] = 1; sc3[d] = 0.0; }
    for (int d = 0; d < nsp; d++) {
        s5[2 + 3 - nsp + d] = spatial[d];
        sc3[3 - nsp + d] = scales ? scales[d] : 0.0;
    }
}

static int interp_check(const char *op, int nsp, const nemo_tensor *t, const int64_t *sizes, const double *scales,
                        int mode) {
    int rc = 0;
    char b1[160], b2[160];
    NEMO_CHECK(mode >= 0 && mode < NEMO_NINTERP, NEMO_EINVAL, "%s: unknown mode %d", op, mode);
    NEMO_CHECK(nsp >= 1 && nsp <= 3 && t->ndim == nsp + 2, NEMO_ESHAPE,
               "%s: expected a 3-D, 4-D or 5-D tensor (N, C, spatial...) with %d spatial dims, got shape %s", op, nsp,
               nemo_shape_str(t, b1, sizeof b1));
    for (int d = 0; d < nsp; d++) {
        NEMO_CHECK(sizes[d] > 0 && t->shape[2 + d] > 0, NEMO_ESHAPE,
                   "%s: input and output sizes should be greater than 0, got tensor of shape %s and size %s", op,
                   nemo_shape_str(t, b1, sizeof b1), nemo_shape_str_n(nsp, sizes, b2, sizeof b2));
        NEMO_CHECK(!scales || scales[d] >= 0.0, NEMO_EINVAL, "%s: scale factors must be positive, got %g", op,
                   scales ? scales[d] : 0.0);
    }
fail:
    return rc;
}

NEMO_API nemo_tensor *nemo_interpolate(const nemo_tensor *x, int nsp, const int64_t *out_size,
                                       const double *scales, int mode) {
    int rc = 0;
    nemo_tensor *xc = NULL, *x5 = NULL, *y5 = NULL;
    NEMO_TRY(interp_check("interpolate", nsp, x, out_size, scales, mode));
    interp_k k;
    NEMO_GET_KERNEL(k, interp_k, "interp_nearest_fwd", x->devtype);
    int64_t xs5[5], ys5[5], yshape[NEMO_MAXDIM];
    double sc3[3];
    interp_norm(nsp, x->shape, x->shape + 2, scales, xs5, sc3);
    interp_norm(nsp, x->shape, out_size, scales, ys5, sc3);
    yshape[0] = x->shape[0];
    yshape[1] = x->shape[1];
    for (int d = 0; d < nsp; d++) yshape[2 + d] = out_size[d];
    NEMO_TRYP(xc, nemo_contiguous(x));
    NEMO_TRYP(x5, reshaped(xc, 5, xs5));
    NEMO_TRYP(y5, nemo_empty(5, ys5, x->dtype, x->devtype, x->devindex));
    if (nemo_tensor_numel(y5) > 0) NEMO_TRY(k(y5, x5, sc3, mode));
    nemo_tensor_release(xc);
    nemo_tensor_release(x5);
    return finish(y5, x->dtype, nsp + 2, yshape);
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(x5);
    nemo_tensor_release(y5);
    return NULL;
}

NEMO_API nemo_tensor *nemo_interpolate_backward(const nemo_tensor *g, int nsp, const int64_t *in_shape,
                                                const double *scales, int mode) {
    int rc = 0;
    nemo_tensor *gc = NULL, *g5 = NULL, *dx5 = NULL;
    char b1[160], b2[160];
    NEMO_TRY(interp_check("interpolate backward", nsp, g, in_shape + 2, scales, mode));
    NEMO_CHECK(g->shape[0] == in_shape[0] && g->shape[1] == in_shape[1], NEMO_ESHAPE,
               "interpolate backward: gradient of shape %s does not fit input of shape %s",
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str_n(nsp + 2, in_shape, b2, sizeof b2));
    NEMO_CHECK(nemo_dtype_is_float(g->dtype), NEMO_EDTYPE, "interpolate backward: gradient must be float, got %s",
               nemo_dtype_name(g->dtype));
    interp_k k;
    NEMO_GET_KERNEL(k, interp_k, "interp_nearest_bwd", g->devtype);
    int cdt = nemo_compute_dtype(g->dtype);
    int64_t gs5[5], xs5[5];
    double sc3[3];
    interp_norm(nsp, g->shape, g->shape + 2, scales, gs5, sc3);
    interp_norm(nsp, in_shape, in_shape + 2, scales, xs5, sc3);
    NEMO_TRYP(gc, nemo_prep(g, cdt));
    NEMO_TRYP(g5, reshaped(gc, 5, gs5));
    NEMO_TRYP(dx5, nemo_empty(5, xs5, cdt, g->devtype, g->devindex));
    NEMO_TRY(k(dx5, g5, sc3, mode));
    nemo_tensor_release(gc);
    nemo_tensor_release(g5);
    return finish(dx5, g->dtype, nsp + 2, in_shape);
fail:
    nemo_tensor_release(gc);
    nemo_tensor_release(g5);
    nemo_tensor_release(dx5);
    return NULL;
}
