/*
 * optim.c: fused optimizer updates and gradient-norm helpers.
 *
 * AdamW follows torch.optim.AdamW's single-tensor path (the CPU default) operation by
 * operation, each rounded to the parameter dtype as PyTorch does, so a float32 step matches
 * PyTorch bit for bit:
 *   p = p * (1 - lr*wd);  m = fma(g, 1-b1, m*b1);  v = fma((1-b2)*g, g, v*b2)
 * (PyTorch's vectorised add-with-alpha is an explicit fused multiply-add, and its AVX2 build
 * contracts addcmul's a + (s*b)*c into one; hence the two fma)
 *   denom = sqrt(v) / sqrt(1 - b2^t) + eps;  p = p + ((-lr / (1 - b1^t)) * m) / denom
 * bf16 / f16 parameters are updated in float32 and rounded once (keep float32 master weights
 * for real training; see the mixed-precision policy).
 */
#include <stdlib.h>

#include "internal.h"

/* The update of n elements on the calling thread; nemo_adamw_step and nemo_adamw_step_many share
 * it out in chunks (an elementwise update: the chunking does not change a bit). */
#define ADAMW_RANGE(T)                                                                       \
    T decay = (T)(1.0 - lr * wd), b1f = (T)b1, b2f = (T)b2, omb1 = (T)(1.0 - b1), omb2 = (T)(1.0 - b2); \
    T step_size = (T)(-(lr / bc1)), bc2s = (T)sqrt(bc2), epsf = (T)eps;                       \
    for (int64_t i = 0; i < n; i++) {                                                        \
        T gi = g[i];                                                                         \
        T pi = p[i] * decay;                                                                 \
        T mi = FMA(gi, omb1, m[i] * b1f);                                                    \
        T vi = FMA(omb2 * gi, gi, v[i] * b2f);                                               \
        T denom = (T)(SQRT(vi) / bc2s); denom = denom + epsf;                                \
        pi = pi + step_size * mi / denom;                                                    \
        p[i] = pi; m[i] = mi; v[i] = vi;                                                     \
    }
static void adamw_f32_range(float *p, const float *g, float *m, float *v, int64_t n, double lr, double b1, double b2,
                            double eps, double wd, double bc1, double bc2) {
#define SQRT sqrtf
#define FMA fmaf
    ADAMW_RANGE(float)
#undef SQRT
#undef FMA
}
static void adamw_f64_range(double *p, const double *g, double *m, double *v, int64_t n, double lr, double b1,
                            double b2, double eps, double wd, double bc1, double bc2) {
#define SQRT sqrt
#define FMA fma
    ADAMW_RANGE(double)
#undef SQRT
#undef FMA
}
/* Elements [s, s + len) of dense float32 / float64 (dt) buffers, on the calling thread. */
static void adamw_range(int dt, void *p, const void *g, void *m, void *v, int64_t s, int64_t len, double lr,
                        double b1, double b2, double eps, double wd, double bc1, double bc2) {
    if (dt == NEMO_F32)
        adamw_f32_range((float *)p + s, (const float *)g + s, (float *)m + s, (float *)v + s, len, lr, b1, b2, eps, wd,
                        bc1, bc2);
    else
        adamw_f64_range((double *)p + s, (const double *)g + s, (double *)m + s, (double *)v + s, len, lr, b1, b2, eps,
                        wd, bc1, bc2);
}
enum { ADAMW_CHUNK = 16384 };   /* elements per parallel task */

/* The device kernels' signatures (registered by the CUDA plugin under these names). */
typedef int (*adamw_dev_k)(nemo_tensor *p, const nemo_tensor *g, nemo_tensor *m, nemo_tensor *v, double lr,
                           double beta1, double beta2, double eps, double weight_decay, int64_t step);
typedef int (*sum_squares_dev_k)(const nemo_tensor *t, double *out);

NEMO_API int nemo_adamw_step(nemo_tensor *p, const nemo_tensor *g, nemo_tensor *m, nemo_tensor *v, double lr,
                             double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    int rc = 0;
    nemo_tensor *pc = NULL, *gc = NULL;
    char b1s[128], b2s[128];
    int64_t n = nemo_tensor_numel(p);
    NEMO_CHECK(step >= 1, NEMO_EINVAL, "adamw: step must be >= 1, got %lld", (long long)step);
    NEMO_CHECK(nemo_tensor_numel(g) == n && g->ndim == p->ndim && !memcmp(g->shape, p->shape, sizeof(int64_t) * (size_t)p->ndim),
               NEMO_ESHAPE, "adamw: gradient of shape %s does not match the parameter's %s",
               nemo_shape_str(g, b1s, sizeof b1s), nemo_shape_str(p, b2s, sizeof b2s));
    NEMO_CHECK(nemo_dtype_is_float(p->dtype), NEMO_EDTYPE, "adamw: parameter dtype %s is not floating point",
               nemo_dtype_name(p->dtype));
    int cdt = nemo_compute_dtype(p->dtype);
    NEMO_CHECK(m->dtype == cdt && v->dtype == cdt && nemo_tensor_is_contiguous(m) && nemo_tensor_is_contiguous(v) &&
               nemo_tensor_numel(m) == n && nemo_tensor_numel(v) == n, NEMO_EINVAL,
               "adamw: optimizer state must be contiguous %s tensors of %lld elements", nemo_dtype_name(cdt), (long long)n);
    NEMO_TRY(nemo_check_same_device("adamw", p, g));
    /* work on a contiguous compute-dtype copy when p is not one, then write back */
    NEMO_TRYP(pc, nemo_prep(p, cdt));
    NEMO_TRYP(gc, nemo_prep(g, cdt));
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    if (p->devtype != NEMO_CPU) {   /* the device's kernel (kernels/cuda/optim.cu), the same update */
        adamw_dev_k k;
        NEMO_GET_KERNEL(k, adamw_dev_k, "adamw", p->devtype);
        NEMO_TRY(k(pc, gc, m, v, lr, beta1, beta2, eps, weight_decay, step));
    } else {
        int64_t nch = (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
        #pragma omp parallel for schedule(static) if (n > NEMO_PAR_MIN)
        for (int64_t c = 0; c < nch; c++) {
            int64_t s = c * ADAMW_CHUNK, len = n - s < ADAMW_CHUNK ? n - s : ADAMW_CHUNK;
            adamw_range(cdt, nemo_tensor_data(pc), nemo_tensor_data(gc), nemo_tensor_data(m), nemo_tensor_data(v), s,
                        len, lr, beta1, beta2, eps, weight_decay, bc1, bc2);
        }
    }
    if (pc != p) NEMO_TRY(nemo_copy_(p, pc));
fail:
    nemo_tensor_release(pc);
    nemo_tensor_release(gc);
    return rc;
}

/* Sum of squares of all elements, accumulated in float64 (for the global gradient norm). */
NEMO_API int nemo_sum_squares(const nemo_tensor *t, double *out) {
    int rc = 0;
    nemo_tensor *c = NULL;
    int cdt = nemo_compute_dtype(t->dtype);
    NEMO_TRYP(c, nemo_prep(t, cdt));
    if (t->devtype != NEMO_CPU) {   /* the device's fixed-tree kernel (kernels/cuda/optim.cu) */
        sum_squares_dev_k k;
        NEMO_GET_KERNEL(k, sum_squares_dev_k, "sum_squares", t->devtype);
        NEMO_TRY(k(c, out));
        goto fail;
    }
    int64_t n = nemo_tensor_numel(c);
    /* fixed chunks summed in order: the result does not depend on the thread count */
    enum { CH = 65536 };
    int64_t nch = (n + CH - 1) / CH;
    double *part = calloc((size_t)(nch ? nch : 1), sizeof(double));
    NEMO_CHECK(part, NEMO_ENOMEM, "sum_squares: out of memory");
    if (cdt == NEMO_F32) {
        const float *x = nemo_tensor_data(c);
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t k = 0; k < nch; k++) {
            double s = 0;
            int64_t e = (k + 1) * CH < n ? (k + 1) * CH : n;
            for (int64_t i = k * CH; i < e; i++) s += (double)x[i] * x[i];
            part[k] = s;
        }
    } else {
        const double *x = nemo_tensor_data(c);
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t k = 0; k < nch; k++) {
            double s = 0;
            int64_t e = (k + 1) * CH < n ? (k + 1) * CH : n;
            for (int64_t i = k * CH; i < e; i++) s += x[i] * x[i];
            part[k] = s;
        }
    }
    double s = 0;
    for (int64_t k = 0; k < nch; k++) s += part[k];
    free(part);
    *out = s;
fail:
    nemo_tensor_release(c);
    return rc;
}

/* ==== several tensors at once ==== */

typedef int (*adamw_many_dev_k)(int n, nemo_tensor *const *p, const nemo_tensor *const *g, nemo_tensor *const *m,
                                nemo_tensor *const *v, double lr, double beta1, double beta2, double eps,
                                double weight_decay, const int64_t *steps);
typedef int (*sum_squares_many_dev_k)(int n, const nemo_tensor *const *ts, double *out);

/* Do the n tensors all live on one device (ts[0]'s)? */
static int one_device(int n, const nemo_tensor *const *ts) {
    for (int i = 1; i < n; i++)
        if (ts[i]->devtype != ts[0]->devtype || ts[i]->devindex != ts[0]->devindex) return 0;
    return 1;
}

/* Can parameter i go into the fused CPU loop (contiguous float32 / float64 p and g, checked
 * state)? Anything else takes nemo_adamw_step, which converts and checks. */
static int adamw_plain(const nemo_tensor *p, const nemo_tensor *g, const nemo_tensor *m, const nemo_tensor *v) {
    int64_t n = nemo_tensor_numel(p);
    return p->devtype == NEMO_CPU && (p->dtype == NEMO_F32 || p->dtype == NEMO_F64) && g->dtype == p->dtype &&
           m->dtype == p->dtype && v->dtype == p->dtype && g->devtype == NEMO_CPU && nemo_tensor_is_contiguous(p) &&
           nemo_tensor_is_contiguous(g) && nemo_tensor_is_contiguous(m) && nemo_tensor_is_contiguous(v) &&
           nemo_tensor_numel(g) == n && nemo_tensor_numel(m) == n && nemo_tensor_numel(v) == n &&
           g->ndim == p->ndim && !memcmp(g->shape, p->shape, sizeof(int64_t) * (size_t)p->ndim);
}

NEMO_API int nemo_adamw_step_many(int n, nemo_tensor *const *p, const nemo_tensor *const *g, nemo_tensor *const *m,
                                  nemo_tensor *const *v, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, const int64_t *steps) {
    int rc = 0;
    int *plain = NULL;
    int64_t *chunk = NULL;
    if (n <= 0) return 0;
    NEMO_CHECK(p && g && m && v && steps, NEMO_EINVAL, "adamw_many: NULL array");
    for (int i = 0; i < n; i++)
        NEMO_CHECK(steps[i] >= 1, NEMO_EINVAL, "adamw_many: parameter %d: step must be >= 1, got %lld", i,
                   (long long)steps[i]);
    /* one device kernel for all when every parameter lives on that device */
    int dev = p[0]->devtype;
    if (dev != NEMO_CPU && one_device(n, (const nemo_tensor *const *)p) && nemo_kernel_has("adamw_many", dev)) {
        int ok = 1;
        for (int i = 0; i < n && ok; i++)
            ok = nemo_tensor_is_contiguous(p[i]) && nemo_tensor_is_contiguous(g[i]) && g[i]->dtype == p[i]->dtype &&
                 (p[i]->dtype == NEMO_F32 || p[i]->dtype == NEMO_F64);
        if (ok) {
            adamw_many_dev_k k;
            NEMO_GET_KERNEL(k, adamw_many_dev_k, "adamw_many", dev);
            NEMO_TRY(k(n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, steps));
            return 0;
        }
    }
    /* CPU: the plain parameters in one parallel region over fixed chunks (each element's update is
     * that of nemo_adamw_step), the rest one by one */
    plain = malloc(sizeof(int) * (size_t)n);
    chunk = malloc(sizeof(int64_t) * ((size_t)n + 1));
    NEMO_CHECK(plain && chunk, NEMO_ENOMEM, "adamw_many: out of memory for %d parameters", n);
    chunk[0] = 0;
    for (int i = 0; i < n; i++) {
        plain[i] = adamw_plain(p[i], g[i], m[i], v[i]);
        int64_t len = plain[i] ? nemo_tensor_numel(p[i]) : 0;
        chunk[i + 1] = chunk[i] + (len + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
    }
    int64_t total = chunk[n];
    #pragma omp parallel for schedule(static) if (total > 1)
    for (int64_t c = 0; c < total; c++) {
        int lo = 0, hi = n;   /* the parameter whose chunks hold c: chunk[i] <= c < chunk[i + 1] */
        while (hi - lo > 1) { int mid = (lo + hi) / 2; if (chunk[mid] <= c) lo = mid; else hi = mid; }
        int i = lo;
        int64_t ne = nemo_tensor_numel(p[i]), s = (c - chunk[i]) * ADAMW_CHUNK;
        int64_t len = ne - s < ADAMW_CHUNK ? ne - s : ADAMW_CHUNK;
        double bc1 = 1.0 - pow(beta1, (double)steps[i]), bc2 = 1.0 - pow(beta2, (double)steps[i]);
        adamw_range(p[i]->dtype, nemo_tensor_data(p[i]), nemo_tensor_data(g[i]), nemo_tensor_data(m[i]),
                    nemo_tensor_data(v[i]), s, len, lr, beta1, beta2, eps, weight_decay, bc1, bc2);
    }
    for (int i = 0; i < n; i++)
        if (!plain[i]) NEMO_TRY(nemo_adamw_step(p[i], g[i], m[i], v[i], lr, beta1, beta2, eps, weight_decay, steps[i]));
fail:
    free(plain);
    free(chunk);
    return rc;
}

NEMO_API int nemo_sum_squares_many(int n, const nemo_tensor *const *ts, double *out) {
    int rc = 0;
    if (n <= 0) return 0;
    NEMO_CHECK(ts && out, NEMO_EINVAL, "sum_squares_many: NULL array");
    int dev = ts[0]->devtype;
    if (dev != NEMO_CPU && one_device(n, ts) && nemo_kernel_has("sum_squares_many", dev)) {
        int ok = 1;
        for (int i = 0; i < n && ok; i++)
            ok = nemo_tensor_is_contiguous(ts[i]) && (ts[i]->dtype == NEMO_F32 || ts[i]->dtype == NEMO_F64);
        if (ok) {
            sum_squares_many_dev_k k;
            NEMO_GET_KERNEL(k, sum_squares_many_dev_k, "sum_squares_many", dev);
            NEMO_TRY(k(n, ts, out));
            return 0;
        }
    }
    for (int i = 0; i < n; i++) NEMO_TRY(nemo_sum_squares(ts[i], &out[i]));
fail:
    return rc;
}

/* Any NaN or Inf among the elements? (loss and gradient guards) */
NEMO_API int nemo_has_nonfinite(const nemo_tensor *t) {
    double s = 0;
    if (nemo_sum_squares(t, &s) < 0) return nemo_last_status();
    return !(s == s && s < 1.0 / 0.0) ? 1 : 0;
}
