/*
 * engine/ops/pointwise.c: front-ends of the elementwise ops (unary, binary, where).
 *
 * Each front-end checks devices and shapes, converts inputs to the compute dtype (float32 for
 * f32/bf16/f16, float64 for f64 and integers), runs the device kernel into a contiguous
 * compute-dtype result and rounds once into the output dtype, as PyTorch's "opmath" does.
 * Where every operand and the result are bfloat16 (or all float16) and the device's kernel
 * takes them directly (nemo_io_dtype: the CUDA kernels), the conversions are the kernel's own:
 * the same numbers, one pass over memory.
 */
#include "../internal.h"

typedef int (*unary_k)(nemo_tensor *y, const nemo_tensor *x, int op, double a, double b);
typedef int (*unary_bwd_k)(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int op, double a, double b);
typedef int (*binary_k)(nemo_tensor *y, const nemo_tensor *a, const nemo_tensor *b,
                        const int64_t *astride, const int64_t *bstride, int op, double alpha);
typedef int (*where_k)(nemo_tensor *y, const nemo_tensor *c, const nemo_tensor *a, const nemo_tensor *b,
                       const int64_t *const *strides);

/* Round a compute-dtype result into a tensor of dtype dt (a new reference; tmp is consumed). */
static nemo_tensor *finish(nemo_tensor *tmp, int dt) {
    if (!tmp || tmp->dtype == dt) return tmp;
    nemo_tensor *o = nemo_to(tmp, dt, tmp->devtype, tmp->devindex);
    nemo_tensor_release(tmp);
    return o;
}

static int unary_out_dtype(int op, int dt) {
    if (op == NEMO_UOP_LOGICAL_NOT) return NEMO_BOOL;
    if (nemo_dtype_is_float(dt)) return dt;
    switch (op) {   /* integer inputs: ops that stay integral keep the dtype */
    case NEMO_UOP_NEG: case NEMO_UOP_ABS: case NEMO_UOP_RELU: case NEMO_UOP_SIGN: case NEMO_UOP_SQUARE:
    case NEMO_UOP_CLAMP:
        return dt == NEMO_BOOL ? NEMO_I64 : dt;
    default: return NEMO_F32;
    }
}

NEMO_API nemo_tensor *nemo_unary(const nemo_tensor *x, int op, double a, double b) {
    int rc = 0;
    nemo_tensor *xc = NULL, *y = NULL;
    NEMO_CHECK(op >= 0 && op < NEMO_NUOP, NEMO_EINVAL, "unary: unknown op %d", op);
    unary_k k;
    NEMO_GET_KERNEL(k, unary_k, "unary", x->devtype);
    int cdt = nemo_compute_dtype(x->dtype), odt = unary_out_dtype(op, x->dtype);
    if (odt == x->dtype) cdt = nemo_io_dtype("unary", x->devtype, x->dtype, cdt);
    NEMO_TRYP(xc, nemo_prep(x, cdt));
    NEMO_TRYP(y, nemo_empty(x->ndim, x->shape, cdt, x->devtype, x->devindex));
    NEMO_TRY(k(y, xc, op, a, b));
    nemo_tensor_release(xc);
    return finish(y, odt);
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_unary_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *y,
                                          int op, double a, double b) {
    int rc = 0;
    nemo_tensor *gc = NULL, *xc = NULL, *dx = NULL;
    NEMO_UNUSED(y);
    char b1[128], b2[128];
    NEMO_CHECK(g->ndim == x->ndim && !memcmp(g->shape, x->shape, sizeof(int64_t) * (size_t)x->ndim), NEMO_ESHAPE,
               "unary backward: gradient shape %s does not match input shape %s",
               nemo_shape_str(g, b1, sizeof b1), nemo_shape_str(x, b2, sizeof b2));
    NEMO_TRY(nemo_check_same_device("unary backward", g, x));
    unary_bwd_k k;
    NEMO_GET_KERNEL(k, unary_bwd_k, "unary_backward", x->devtype);
    int cdt = nemo_compute_dtype(nemo_promote(g->dtype, x->dtype));
    if (g->dtype == x->dtype) cdt = nemo_io_dtype("unary_backward", x->devtype, x->dtype, cdt);
    NEMO_TRYP(gc, nemo_prep(g, cdt));
    NEMO_TRYP(xc, nemo_prep(x, cdt));
    NEMO_TRYP(dx, nemo_empty(x->ndim, x->shape, cdt, x->devtype, x->devindex));
    NEMO_TRY(k(dx, gc, xc, op, a, b));
    nemo_tensor_release(gc);
    nemo_tensor_release(xc);
    return finish(dx, nemo_dtype_is_float(x->dtype) ? x->dtype : NEMO_F32);
fail:
    nemo_tensor_release(gc);
    nemo_tensor_release(xc);
    nemo_tensor_release(dx);
    return NULL;
}

static const char *bop_name(int op) {
    static const char *names[NEMO_NBOP] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum",
                                           "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"};
    return (op >= 0 && op < NEMO_NBOP) ? names[op] : "binary";
}

/* PyTorch promotion, except that a 0-dim tensor of the same category does not promote a
 * dimensioned one (bf16 tensor * f32 scalar tensor -> bf16). */
static int result_dtype(const nemo_tensor *a, const nemo_tensor *b) {
    int fa = nemo_dtype_is_float(a->dtype), fb = nemo_dtype_is_float(b->dtype);
    if (a->ndim == 0 && b->ndim > 0 && fa == fb) return b->dtype;
    if (b->ndim == 0 && a->ndim > 0 && fa == fb) return a->dtype;
    return nemo_promote(a->dtype, b->dtype);
}

static nemo_tensor *binary_into(nemo_tensor *dst, const nemo_tensor *a, const nemo_tensor *b, int op,
                                double alpha, int out_dtype) {
    int rc = 0;
    nemo_tensor *ac = NULL, *bc = NULL, *y = NULL;
    const char *name = bop_name(op);
    NEMO_CHECK(op >= 0 && op < NEMO_NBOP, NEMO_EINVAL, "binary: unknown op %d", op);
    NEMO_TRY(nemo_check_same_device(name, a, b));
    int64_t shape[NEMO_MAXDIM];
    int nd;
    NEMO_TRY(nd = nemo_broadcast_shapes(name, a->ndim, a->shape, b->ndim, b->shape, shape));
    int rdt = result_dtype(a, b);
    int cmp = op >= NEMO_BOP_EQ;
    if (out_dtype < 0) out_dtype = cmp ? NEMO_BOOL : (op == NEMO_BOP_DIV && !nemo_dtype_is_float(rdt) ? NEMO_F32 : rdt);
    int cdt = nemo_compute_dtype(cmp ? rdt : (dst ? nemo_promote(rdt, dst->dtype) : out_dtype));
    if (!cmp && a->dtype == out_dtype && b->dtype == out_dtype && (!dst || dst->dtype == out_dtype))
        cdt = nemo_io_dtype("binary", a->devtype, out_dtype, cdt);
    binary_k k;
    NEMO_GET_KERNEL(k, binary_k, "binary", a->devtype);
    NEMO_TRYP(ac, nemo_prep(a, cdt));
    NEMO_TRYP(bc, nemo_prep(b, cdt));
    int64_t as[NEMO_MAXDIM], bs[NEMO_MAXDIM];
    nemo_broadcast_strides(ac, nd, shape, as);
    nemo_broadcast_strides(bc, nd, shape, bs);
    NEMO_TRYP(y, nemo_empty(nd, shape, cdt, a->devtype, a->devindex));
    NEMO_TRY(k(y, ac, bc, as, bs, op, alpha));
    nemo_tensor_release(ac);
    nemo_tensor_release(bc);
    return finish(y, out_dtype);
fail:
    nemo_tensor_release(ac);
    nemo_tensor_release(bc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_binary(const nemo_tensor *a, const nemo_tensor *b, int op, double alpha, int out_dtype) {
    return binary_into(NULL, a, b, op, alpha, out_dtype);
}

/* a = a op b straight into a's memory: a is a contiguous CPU tensor of its own compute dtype,
 * b does not share a's storage (so no element is read after it is written) and broadcasts to
 * a's shape. Returns 1 when done, 0 when the general path must run, < 0 on error. */
static int binary_inplace_fast(nemo_tensor *a, const nemo_tensor *b, int op, double alpha) {
    int rc = 0;
    nemo_tensor *bc = NULL;
    if (a->devtype != NEMO_CPU || b->devtype != NEMO_CPU || op >= NEMO_BOP_EQ || a->storage == b->storage ||
        !nemo_tensor_is_contiguous(a) || b->ndim > a->ndim)
        return 0;
    int cdt = nemo_compute_dtype(nemo_promote(result_dtype(a, b), a->dtype));
    if (cdt != a->dtype) return 0;
    for (int i = 0; i < b->ndim; i++) {
        int64_t s = b->shape[b->ndim - 1 - i];
        if (s != 1 && s != a->shape[a->ndim - 1 - i]) return 0;
    }
    binary_k k;
    NEMO_GET_KERNEL(k, binary_k, "binary", NEMO_CPU);
    NEMO_TRYP(bc, nemo_prep(b, cdt));
    int64_t as[NEMO_MAXDIM], bs[NEMO_MAXDIM];
    nemo_broadcast_strides(a, a->ndim, a->shape, as);
    nemo_broadcast_strides(bc, a->ndim, a->shape, bs);
    NEMO_TRY(k(a, a, bc, as, bs, op, alpha));
    rc = 1;
fail:
    nemo_tensor_release(bc);
    return rc;
}

NEMO_API int nemo_binary_(nemo_tensor *a, const nemo_tensor *b, int op, double alpha) {
    int rc = 0;
    nemo_tensor *y = NULL;
    NEMO_CHECK(op >= 0 && op < NEMO_NBOP, NEMO_EINVAL, "binary: unknown op %d", op);
    NEMO_TRY(nemo_check_same_device(bop_name(op), a, b));
    rc = binary_inplace_fast(a, b, op, alpha);
    if (rc != 0) return rc < 0 ? rc : 0;
    NEMO_TRYP(y, binary_into(a, a, b, op, alpha, a->dtype));
    char b1[128], b2[128];
    NEMO_CHECK(y->ndim == a->ndim && !memcmp(y->shape, a->shape, sizeof(int64_t) * (size_t)a->ndim), NEMO_ESHAPE,
               "%s_: in-place result of shape %s does not fit the tensor of shape %s", bop_name(op),
               nemo_shape_str(y, b1, sizeof b1), nemo_shape_str(a, b2, sizeof b2));
    NEMO_TRY(nemo_copy_(a, y));
fail:
    nemo_tensor_release(y);
    return rc;
}

NEMO_API nemo_tensor *nemo_where(const nemo_tensor *cond, const nemo_tensor *a, const nemo_tensor *b) {
    int rc = 0;
    nemo_tensor *cc = NULL, *ac = NULL, *bc = NULL, *y = NULL;
    NEMO_TRY(nemo_check_same_device("where", cond, a));
    NEMO_TRY(nemo_check_same_device("where", a, b));
    int64_t s1[NEMO_MAXDIM], shape[NEMO_MAXDIM];
    int n1, nd;
    NEMO_TRY(n1 = nemo_broadcast_shapes("where", cond->ndim, cond->shape, a->ndim, a->shape, s1));
    NEMO_TRY(nd = nemo_broadcast_shapes("where", n1, s1, b->ndim, b->shape, shape));
    int odt = result_dtype(a, b), cdt = nemo_compute_dtype(odt);
    where_k k;
    NEMO_GET_KERNEL(k, where_k, "where", a->devtype);
    NEMO_TRYP(cc, nemo_prep(cond, cdt));
    NEMO_TRYP(ac, nemo_prep(a, cdt));
    NEMO_TRYP(bc, nemo_prep(b, cdt));
    NEMO_TRYP(y, nemo_empty(nd, shape, cdt, a->devtype, a->devindex));
    int64_t cs[NEMO_MAXDIM], as[NEMO_MAXDIM], bs[NEMO_MAXDIM];
    nemo_broadcast_strides(cc, nd, shape, cs);
    nemo_broadcast_strides(ac, nd, shape, as);
    nemo_broadcast_strides(bc, nd, shape, bs);
    const int64_t *strides[4] = {y->stride, cs, as, bs};
    NEMO_TRY(k(y, cc, ac, bc, strides));
    nemo_tensor_release(cc); nemo_tensor_release(ac); nemo_tensor_release(bc);
    return finish(y, odt);
fail:
    nemo_tensor_release(cc); nemo_tensor_release(ac); nemo_tensor_release(bc);
    nemo_tensor_release(y);
    return NULL;
}

NEMO_API nemo_tensor *nemo_sum_to(const nemo_tensor *x, int ndim, const int64_t *shape) {
    int rc = 0;
    nemo_tensor *xc = NULL, *acc = NULL, *y = NULL;
    int64_t bshape[NEMO_MAXDIM];
    int nd;
    NEMO_TRY(nd = nemo_broadcast_shapes("sum_to", ndim, shape, x->ndim, x->shape, bshape));
    char b1[128], b2[128];
    NEMO_CHECK(nd == x->ndim && !memcmp(bshape, x->shape, sizeof(int64_t) * (size_t)nd), NEMO_ESHAPE,
               "sum_to: shape %s does not broadcast to %s", nemo_shape_str_n(ndim, shape, b1, sizeof b1),
               nemo_shape_str(x, b2, sizeof b2));
    if (x->devtype != NEMO_CPU) {
        /* on a device: a keepdim sum over the broadcast dims through the device's reduction
         * kernel, then viewed with the target shape (leading dims dropped) */
        int64_t dims[NEMO_MAXDIM];
        int nr = 0, lead = nd - ndim;
        for (int d = 0; d < nd; d++)
            if (d < lead || (shape[d - lead] == 1 && x->shape[d] != 1)) dims[nr++] = d;
        if (nr == 0) NEMO_TRYP(acc, nemo_clone(x));
        else NEMO_TRYP(acc, nemo_reduce(x, NEMO_RED_SUM, nr, dims, 1, x->dtype, 0.0));
        NEMO_TRYP(y, nemo_tensor_view(acc, ndim, shape, NULL, acc->offset));
        goto fail;
    }
    NEMO_TRYP(xc, nemo_prep(x, NEMO_F64));
    NEMO_TRYP(acc, nemo_zeros(ndim, shape, NEMO_F64, NEMO_CPU, 0));
    int64_t ostr[NEMO_MAXDIM];
    nemo_broadcast_strides(acc, nd, x->shape, ostr);
    const int64_t *strides[2] = {ostr, xc->stride};
    nemo_iter it;
    nemo_iter_init(&it, nd, x->shape, 2, strides);
    double *o = nemo_tensor_data(acc);
    const double *p = nemo_tensor_data(xc);
    int64_t so = nemo_iter_inner_stride(&it, 0), sx = nemo_iter_inner_stride(&it, 1);
    if (so != 0 && it.nrows * it.inner > NEMO_PAR_MIN && it.inner >= 64) {
        /* The inner dim is kept: threads share out pieces of it, and each output element is
         * summed over the rows in order by one thread (the same bits on any thread count). */
        int64_t npc = (it.inner + 255) / 256;
        #pragma omp parallel for schedule(static)
        for (int64_t pc = 0; pc < npc; pc++) {
            int64_t i0 = pc * 256, i1 = i0 + 256 < it.inner ? i0 + 256 : it.inner;
            for (int64_t r = 0; r < it.nrows; r++) {
                int64_t off[2];
                nemo_iter_row(&it, r, off);
                for (int64_t i = i0; i < i1; i++) o[off[0] + i * so] += p[off[1] + i * sx];
            }
        }
    } else {
        for (int64_t r = 0; r < it.nrows; r++) {
            int64_t off[2];
            nemo_iter_row(&it, r, off);
            if (so == 0) { double s = 0; for (int64_t i = 0; i < it.inner; i++) s += p[off[1] + i * sx]; o[off[0]] += s; }
            else for (int64_t i = 0; i < it.inner; i++) o[off[0] + i * so] += p[off[1] + i * sx];
        }
    }
    NEMO_TRYP(y, nemo_to(acc, x->dtype, NEMO_CPU, 0));
fail:
    nemo_tensor_release(xc);
    nemo_tensor_release(acc);
    if (rc < 0) { nemo_tensor_release(y); return NULL; }
    return y;
}
