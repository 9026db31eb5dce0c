/*
 * kernels/cuda/optim.cu: CUDA kernels for engine/optim.c's optimizer update and gradient-norm
 * helper. engine/optim.c does not look them up yet (it refuses CUDA tensors); docs/cuda.md
 * gives the front-end change. Registered names and signatures:
 *
 *   "adamw"        int (p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
 *                  p, g, m, v dense, one compute dtype (float32 / float64), one CUDA device;
 *                  p, m, v updated in place; step >= 1.
 *   "sum_squares"  int (t, double *out)
 *                  *out (host memory) = sum of t's squares in double; t dense float32 /
 *                  float64. Waits for the stream (the caller needs the number).
 *
 * Non-obvious rules
 * - adamw is engine/optim.c's ADAMW_BODY operation by operation: the two explicit fused
 *   multiply-adds are fma (__fmaf_rn / __fma_rn), every other product, quotient and sum is
 *   rounded on its own (rn_*, IEEE division and square root), and the scalars (decay, bias
 *   corrections, step size) are formed on the host by the same expressions. So a step equals
 *   the CPU's bit for bit, NaN and inf included.
 * - sum_squares adds chunks of 65536 elements with a fixed tree per chunk and the chunk sums
 *   with a fixed tree: deterministic, equal to the CPU's sequential double sum to rounding.
 */
#include <math.h>
#include "util.cuh"

template <typename T> __device__ __forceinline__ T k_fma(T a, T b, T c);
template <> __device__ __forceinline__ float k_fma<float>(float a, float b, float c) { return __fmaf_rn(a, b, c); }
template <> __device__ __forceinline__ double k_fma<double>(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float k_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double k_sqrt(double v) { return sqrt(v); }

/* element i of one AdamW update (engine/optim.c's order of operations) */
template <typename T>
__device__ __forceinline__ void adamw_elem(T *p, const T *g, T *m, T *v, int64_t i, T decay, T b1f, T b2f, T omb1,
                                           T omb2, T step_size, T bc2s, T epsf) {
    const T gi = g[i];
    T pi = rn_mul(p[i], decay);
    const T mi = k_fma(gi, omb1, rn_mul(m[i], b1f));
    const T vi = k_fma(rn_mul(omb2, gi), gi, rn_mul(v[i], b2f));
    T denom = k_sqrt(vi) / bc2s;
    denom = rn_add(denom, epsf);
    pi = rn_add(pi, rn_mul(step_size, mi) / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
}

template <typename T>
__global__ void adamw_k(T *p, const T *g, T *m, T *v, int64_t n, T decay, T b1f, T b2f, T omb1, T omb2, T step_size,
                        T bc2s, T epsf) {
    NEMO_CUDA_LOOP(i, n) adamw_elem(p, g, m, v, i, decay, b1f, b2f, omb1, omb2, step_size, bc2s, epsf);
}

template <typename T>
static void adamw_launch(nemo_tensor *p, const nemo_tensor *g, nemo_tensor *m, nemo_tensor *v, int64_t n, double lr,
                         double b1, double b2, double eps, double wd, double bc1, double bc2, cudaStream_t st) {
    const T decay = (T)(1.0 - lr * wd), b1f = (T)b1, b2f = (T)b2, omb1 = (T)(1.0 - b1), omb2 = (T)(1.0 - b2);
    const T step_size = (T)(-(lr / bc1)), bc2s = (T)sqrt(bc2), epsf = (T)eps;
    adamw_k<T><<<k_blocks(n), NEMO_CUDA_THREADS, 0, st>>>((T *)nemo_cuda_data(p), (const T *)nemo_cuda_data(g),
                                                         (T *)nemo_cuda_data(m), (T *)nemo_cuda_data(v), n, decay, b1f,
                                                         b2f, omb1, omb2, step_size, bc2s, epsf);
}

static int adamw_cuda(nemo_tensor *p, const nemo_tensor *g, nemo_tensor *m, nemo_tensor *v, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step) {
    static const char op[] = "adamw";
    NEMO_CUDA_ENTER(op, p);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, p));
    NEMO_CUDA_RC(k_need(op, "gradient", g));
    NEMO_CUDA_RC(k_need(op, "exp_avg", m));
    NEMO_CUDA_RC(k_need(op, "exp_avg_sq", v));
    NEMO_CUDA_RC(k_check(op, "gradient", g, p, p->dtype));
    NEMO_CUDA_RC(k_check(op, "exp_avg", m, p, p->dtype));
    NEMO_CUDA_RC(k_check(op, "exp_avg_sq", v, p, p->dtype));
    const int64_t n = nemo_cuda_numel(p);
    if (nemo_cuda_numel(g) != n || nemo_cuda_numel(m) != n || nemo_cuda_numel(v) != n)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: parameter, gradient and states have %lld, %lld, %lld, %lld elements", op,
                               (long long)n, (long long)nemo_cuda_numel(g), (long long)nemo_cuda_numel(m),
                               (long long)nemo_cuda_numel(v));
    if (step < 1) return nemo_cuda_error(NEMO_EINVAL, "%s: step must be >= 1, got %lld", op, (long long)step);
    if (n == 0) return 0;
    const double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    cudaStream_t st = nemo_cuda_stream(p->devindex);
    if (p->dtype == NEMO_F32) adamw_launch<float>(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, st);
    else adamw_launch<double>(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, st);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, p->devindex, (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL("adamw", adamw_cuda)

#define SSQ_CHUNK 65536

/* part[c] = sum over chunk c of x^2 (double), one block per chunk, fixed tree. */
template <typename T>
__global__ void ssq_part_k(double *part, const T *x, int64_t n, int64_t nch) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    ROW_TASKS(c, nch, NEMO_CUDA_THREADS) {
        const bool ok = c < nch;
        double s = 0.0;
        if (ok) {
            const int64_t i1 = (c + 1) * SSQ_CHUNK < n ? (c + 1) * SSQ_CHUNK : n;
            for (int64_t i = c * SSQ_CHUNK + threadIdx.x; i < i1; i += NEMO_CUDA_THREADS) {
                const double d = (double)x[i];
                s = __dadd_rn(s, __dmul_rn(d, d));
            }
        }
        s = nemo_cuda_group_reduce<NEMO_CUDA_THREADS>(s, AddF64(), sm);
        if (ok && threadIdx.x == 0) part[c] = s;
    }
}
/* out[0] = sum of part[0..nch) with one block: strided per thread in order, then the tree. */
__global__ void ssq_fold_k(double *out, const double *part, int64_t nch) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < nch; c += NEMO_CUDA_THREADS) s = __dadd_rn(s, part[c]);
    s = nemo_cuda_group_reduce<NEMO_CUDA_THREADS>(s, AddF64(), sm);
    if (threadIdx.x == 0) out[0] = s;
}

/* *sum (device) = t's sum of squares: the chunk sums into part (nch doubles), then their tree */
static void ssq_launch(double *sum, double *part, const nemo_tensor *t, int64_t n, int64_t nch, cudaStream_t st) {
    if (t->dtype == NEMO_F32)
        ssq_part_k<float><<<row_blocks(nch, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
            part, (const float *)nemo_cuda_data(t), n, nch);
    else
        ssq_part_k<double><<<row_blocks(nch, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
            part, (const double *)nemo_cuda_data(t), n, nch);
    ssq_fold_k<<<1, NEMO_CUDA_THREADS, 0, st>>>(sum, part, nch);
}

static int sum_squares_cuda(const nemo_tensor *t, double *out) {
    static const char op[] = "sum_squares";
    NEMO_CUDA_ENTER(op, t);
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, t));
    if (!out) return nemo_cuda_error(NEMO_EINVAL, "%s: no output pointer", op);
    *out = 0.0;
    const int64_t n = nemo_cuda_numel(t);
    if (n == 0) return 0;
    const int64_t nch = k_cdiv(n, SSQ_CHUNK);
    const int dev = t->devindex;
    void *part = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(double) * (size_t)(nch + 1), &part));
    double *P = (double *)part;
    cudaStream_t st = nemo_cuda_stream(dev);
    ssq_launch(P, P + 1, t, n, nch, st);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, dev, (long long)n);
    NEMO_CUDA_TRY(cudaMemcpyAsync(out, P, sizeof(double), cudaMemcpyDeviceToHost, st), "%s: copying the sum", op);
    NEMO_CUDA_TRY(cudaStreamSynchronize(st), "%s: waiting for the sum", op);
    return 0;
}
NEMO_CUDA_KERNEL("sum_squares", sum_squares_cuda)

/* ==== several tensors at once ====
 *
 *   "adamw_many"        int (n, p[], g[], m[], v[], lr, beta1, beta2, eps, weight_decay, steps[])
 *                       adamw on n parameters of one device in one launch: a table of the
 *                       tensors (pointers, sizes, per-parameter step size and bias correction,
 *                       formed on the host as adamw does) goes to the device, and each block
 *                       takes chunks of AMW_CHUNK elements, finding its parameter by binary
 *                       search; every element's update is adamw_k's, so the bits are the same.
 *   "sum_squares_many"  int (n, ts[], double *out)   out[i] (host) = sum_squares(ts[i]): the same
 *                       per-tensor kernels, their n results copied back with one wait.
 */
#define AMW_CHUNK 16384

struct amw_item {
    void *p;
    const void *g;
    void *m, *v;
    int64_t n, c0;          /* elements; first chunk */
    double step_size, bc2s; /* -(lr / bc1), sqrt(bc2): as adamw_launch forms them */
    int f64;
};

template <typename T>
__device__ __forceinline__ void amw_range(const amw_item &it, int64_t s, int64_t e, T decay, T b1f, T b2f, T omb1,
                                          T omb2, T epsf) {
    T *p = (T *)it.p, *m = (T *)it.m, *v = (T *)it.v;
    const T *g = (const T *)it.g;
    const T step_size = (T)it.step_size, bc2s = (T)it.bc2s;
    for (int64_t i = s + threadIdx.x; i < e; i += blockDim.x)
        adamw_elem(p, g, m, v, i, decay, b1f, b2f, omb1, omb2, step_size, bc2s, epsf);
}

/* decay = 1 - lr wd, omb1 = 1 - b1, omb2 = 1 - b2: formed on the host (device code could contract
 * 1 - lr wd into an fma), rounded to float here as adamw_launch rounds its double expressions */
__global__ void adamw_many_k(const amw_item *items, int nitems, int64_t nchunks, double decay, double b1, double b2,
                             double omb1, double omb2, double eps) {
    for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
        int lo = 0, hi = nitems;   /* the last item whose first chunk is <= c */
        while (hi - lo > 1) {
            const int mid = (lo + hi) / 2;
            if (items[mid].c0 <= c) lo = mid; else hi = mid;
        }
        const amw_item &it = items[lo];
        const int64_t s = (c - it.c0) * AMW_CHUNK, e = s + AMW_CHUNK < it.n ? s + AMW_CHUNK : it.n;
        if (it.f64)
            amw_range<double>(it, s, e, decay, b1, b2, omb1, omb2, eps);
        else
            amw_range<float>(it, s, e, (float)decay, (float)b1, (float)b2, (float)omb1, (float)omb2, (float)eps);
    }
}

static int adamw_many_cuda(int n, nemo_tensor *const *p, const nemo_tensor *const *g, nemo_tensor *const *m,
                           nemo_tensor *const *v, double lr, double beta1, double beta2, double eps, double weight_decay,
                           const int64_t *steps) {
    static const char op[] = "adamw_many";
    if (n <= 0) return 0;
    NEMO_CUDA_ENTER(op, p[0]);
    const int dev = p[0]->devindex;
    amw_item *items = (amw_item *)malloc(sizeof(amw_item) * (size_t)n);
    if (!items) return nemo_cuda_error(NEMO_ENOMEM, "%s: out of host memory for %d parameters", op, n);
    int64_t chunks = 0;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const nemo_tensor *t[4] = {p[i], g[i], m[i], v[i]};
        static const char *what[4] = {"parameter", "gradient", "exp_avg", "exp_avg_sq"};
        const int64_t ne = nemo_cuda_numel(p[i]);
        for (int q = 0; q < 4 && rc == 0; q++) {
            if (t[q]->devtype != NEMO_CUDA || t[q]->devindex != dev)
                rc = nemo_cuda_error(NEMO_EDEVICE, "%s: %s %d is not on cuda:%d", op, what[q], i, dev);
            else if (t[q]->dtype != p[i]->dtype || (p[i]->dtype != NEMO_F32 && p[i]->dtype != NEMO_F64))
                rc = nemo_cuda_error(NEMO_EDTYPE, "%s: %s %d is %s, expected float32 or float64 like its parameter", op,
                                     what[q], i, nemo_cuda_dtype_name(t[q]->dtype));
            else if (nemo_cuda_numel(t[q]) != ne)
                rc = nemo_cuda_error(NEMO_ESHAPE, "%s: %s %d has %lld elements, its parameter %lld", op, what[q], i,
                                     (long long)nemo_cuda_numel(t[q]), (long long)ne);
        }
        if (rc == 0 && steps[i] < 1)
            rc = nemo_cuda_error(NEMO_EINVAL, "%s: parameter %d: step must be >= 1, got %lld", op, i, (long long)steps[i]);
        if (rc) break;
        const double bc1 = 1.0 - pow(beta1, (double)steps[i]), bc2 = 1.0 - pow(beta2, (double)steps[i]);
        amw_item it;
        it.p = nemo_cuda_data(p[i]);
        it.g = nemo_cuda_data(g[i]);
        it.m = nemo_cuda_data(m[i]);
        it.v = nemo_cuda_data(v[i]);
        it.n = ne;
        it.c0 = chunks;
        it.step_size = -(lr / bc1);
        it.bc2s = sqrt(bc2);
        it.f64 = p[i]->dtype == NEMO_F64;
        if (!it.f64) { it.step_size = (float)it.step_size; it.bc2s = (float)sqrt(bc2); }
        items[i] = it;
        chunks += k_cdiv(ne, AMW_CHUNK);
    }
    if (rc == 0 && chunks > 0) {
        void *dt = NULL;
        rc = nemo_cuda_scratch(dev, sizeof(amw_item) * (size_t)n, &dt);
        if (rc == 0) {
            cudaStream_t st = nemo_cuda_stream(dev);
            cudaError_t e = cudaMemcpyAsync(dt, items, sizeof(amw_item) * (size_t)n, cudaMemcpyHostToDevice, st);
            if (e != cudaSuccess) {
                rc = nemo_cuda_fail(e, "%s: copying the table of %d parameters to cuda:%d", op, n, dev);
            } else {
                const unsigned blocks = (unsigned)(chunks < 65535 * 8 ? chunks : 65535 * 8);
                const double decay = 1.0 - lr * weight_decay, omb1 = 1.0 - beta1, omb2 = 1.0 - beta2;
                adamw_many_k<<<blocks, NEMO_CUDA_THREADS, 0, st>>>((const amw_item *)dt, n, chunks, decay, beta1, beta2,
                                                                  omb1, omb2, eps);
                e = cudaGetLastError();
                if (e != cudaSuccess) rc = nemo_cuda_fail(e, "%s: kernel launch on cuda:%d (%d parameters)", op, dev, n);
            }
        }
    }
    free(items);
    return rc;
}
NEMO_CUDA_KERNEL("adamw_many", adamw_many_cuda)

static int sum_squares_many_cuda(int n, const nemo_tensor *const *ts, double *out) {
    static const char op[] = "sum_squares_many";
    if (n <= 0) return 0;
    NEMO_CUDA_ENTER(op, ts[0]);
    if (!out) return nemo_cuda_error(NEMO_EINVAL, "%s: no output pointer", op);
    const int dev = ts[0]->devindex;
    int64_t parts = 0;
    for (int i = 0; i < n; i++) {
        if (ts[i]->devtype != NEMO_CUDA || ts[i]->devindex != dev)
            return nemo_cuda_error(NEMO_EDEVICE, "%s: tensor %d is not on cuda:%d", op, i, dev);
        NEMO_CUDA_RC(nemo_cuda_check_compute(op, ts[i]));
        parts += k_cdiv(nemo_cuda_numel(ts[i]), SSQ_CHUNK);
    }
    void *scratch = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(double) * (size_t)(n + parts + 1), &scratch));
    double *sums = (double *)scratch, *part = sums + n;
    cudaStream_t st = nemo_cuda_stream(dev);
    NEMO_CUDA_TRY(cudaMemsetAsync(sums, 0, sizeof(double) * (size_t)n, st), "%s: clearing the sums", op);
    for (int i = 0; i < n; i++) {
        const int64_t ne = nemo_cuda_numel(ts[i]);
        if (ne == 0) continue;
        const int64_t nch = k_cdiv(ne, SSQ_CHUNK);
        ssq_launch(sums + i, part, ts[i], ne, nch, st);
        part += nch;
    }
    NEMO_CUDA_LAUNCHED("%s: kernel launches on cuda:%d (%d tensors)", op, dev, n);
    NEMO_CUDA_TRY(cudaMemcpyAsync(out, sums, sizeof(double) * (size_t)n, cudaMemcpyDeviceToHost, st),
                  "%s: copying the %d sums", op, n);
    NEMO_CUDA_TRY(cudaStreamSynchronize(st), "%s: waiting for the sums", op);
    return 0;
}
NEMO_CUDA_KERNEL("sum_squares_many", sum_squares_many_cuda)
