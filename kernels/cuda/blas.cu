/*
 * kernels/cuda/blas.cu: row-major matrix products through cuBLAS for the CUDA kernels that are
 * made of products and row operations (attention.cu, conv.cu): one product, or a batch given by
 * device arrays of pointers (any batch layout, e.g. attention heads of a permuted tensor).
 * Declared in util.cuh; registers no kernel of its own.
 *
 * Non-obvious rules
 * - Row-major c = op(a) op(b) is the column-major c^T = op(b)^T op(a)^T, so b goes in cuBLAS's
 *   A slot and a in its B slot, with m and n swapped, and no copies.
 * - float32 uses CUBLAS_COMPUTE_32F with the default math mode: true float32 products, no TF32
 *   (the CPU twins use OpenBLAS sgemm); float64 uses CUBLAS_COMPUTE_64F.
 * - A leading dimension is only checked when its operand has more than one stored row (a
 *   single row may carry any stride, as views do); cuBLAS's own minimum is then substituted.
 * - k == 0: cuBLAS may leave c untouched, BLAS defines c = beta c; a small kernel does that.
 * - One cuBLAS handle per device, made on first use (on the current device) and kept, bound to
 *   nemo_cuda_stream(dev) each time it is handed out; its workspace is cuBLAS's own, not
 *   counted by libnemo.
 */
#include <limits.h>
#include <pthread.h>
#include <cublas_v2.h>
#include "util.cuh"

#define BLAS_MAXDEV 64
static cublasHandle_t handles[BLAS_MAXDEV];
static pthread_mutex_t handle_lock = PTHREAD_MUTEX_INITIALIZER;

static int blas_fail(cublasStatus_t s, const char *op, const char *what) {
    return nemo_cuda_error(NEMO_ECUDA, "%s: %s: %s (%s)", op, what, cublasGetStatusString(s), cublasGetStatusName(s));
}

static int blas_handle(const char *op, int dev, cublasHandle_t *h) {
    *h = NULL;
    if (dev < 0 || dev >= BLAS_MAXDEV)
        return nemo_cuda_error(NEMO_EDEVICE, "%s: device %d out of range 0..%d", op, dev, BLAS_MAXDEV - 1);
    int rc = 0;
    pthread_mutex_lock(&handle_lock);
    if (!handles[dev]) {
        cudaError_t e = cudaSetDevice(dev);
        if (e != cudaSuccess) {
            rc = nemo_cuda_fail(e, "%s: cudaSetDevice(%d)", op, dev);
        } else {
            cublasHandle_t nh = NULL;
            cublasStatus_t s = cublasCreate(&nh);
            if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetStream(nh, nemo_cuda_stream(dev));
            if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetPointerMode(nh, CUBLAS_POINTER_MODE_HOST);
            if (s != CUBLAS_STATUS_SUCCESS) {
                rc = blas_fail(s, op, "creating the cuBLAS handle");
                if (nh) cublasDestroy(nh);
            } else {
                handles[dev] = nh;
            }
        }
    }
    *h = handles[dev];
    if (*h) {   /* bound to the device's current stream on every use */
        cublasStatus_t s = cublasSetStream(*h, nemo_cuda_stream(dev));
        if (s != CUBLAS_STATUS_SUCCESS) rc = blas_fail(s, op, "cublasSetStream");
    }
    pthread_mutex_unlock(&handle_lock);
    return rc;
}

/* ==== k == 0: c = beta c ==== */

template <typename T>
__global__ void scale_ptrs(void *const *C, int64_t m, int64_t n, int64_t ldc, int64_t batch, double beta) {
    NEMO_CUDA_LOOP(t, batch * m * n) {
        int64_t j = t / (m * n), r = t % (m * n), i = r / n, c = r % n;
        T *p = (T *)C[j] + i * ldc + c;
        *p = beta == 0.0 ? (T)0 : (T)((T)beta * *p);
    }
}
template <typename T>
__global__ void scale_one(T *c, int64_t m, int64_t n, int64_t ldc, double beta) {
    NEMO_CUDA_LOOP(t, m * n) {
        T *p = c + (t / n) * ldc + t % n;
        *p = beta == 0.0 ? (T)0 : (T)((T)beta * *p);
    }
}

/* ==== Argument checks ==== */

/* Leading dimension of a stored (rows, cols) row-major operand: any value for one row. */
static int fix_ld(const char *op, const char *what, int64_t rows, int64_t cols, int64_t *ld) {
    int64_t need = cols > 1 ? cols : 1;
    if (rows <= 1) { if (*ld < need) *ld = need; return 0; }
    if (*ld < need)
        return nemo_cuda_error(NEMO_EINVAL, "%s: operand %s has %lld rows of %lld elements but a row stride of %lld",
                               op, what, (long long)rows, (long long)cols, (long long)*ld);
    return 0;
}

static int check_dims(const char *op, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, int64_t *lda,
                      int64_t *ldb, int64_t *ldc, int64_t batch) {
    if (dt != NEMO_F32 && dt != NEMO_F64)
        return nemo_cuda_error(NEMO_EDTYPE, "%s: products compute in float32 or float64, got %s", op,
                               nemo_cuda_dtype_name(dt));
    if (m < 0 || n < 0 || k < 0 || batch < 0)
        return nemo_cuda_error(NEMO_EINVAL, "%s: negative product size %lld x %lld x %lld (batch %lld)", op,
                               (long long)m, (long long)n, (long long)k, (long long)batch);
    NEMO_CUDA_RC(fix_ld(op, "a", ta ? k : m, ta ? m : k, lda));
    NEMO_CUDA_RC(fix_ld(op, "b", tb ? n : k, tb ? k : n, ldb));
    NEMO_CUDA_RC(fix_ld(op, "c", m, n, ldc));
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX || *lda > INT_MAX || *ldb > INT_MAX || *ldc > INT_MAX ||
        batch > INT_MAX)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: product %lld x %lld x %lld (leading dims %lld, %lld, %lld, batch %lld) "
                               "exceeds cuBLAS's 32-bit sizes", op, (long long)m, (long long)n, (long long)k,
                               (long long)*lda, (long long)*ldb, (long long)*ldc, (long long)batch);
    return 0;
}

/* ==== Products ==== */

int nemo_cuda_gemm_ptrs(const char *op, int dev, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                        const void *const *A, int64_t lda, const void *const *B, int64_t ldb, double beta,
                        void *const *C, int64_t ldc, int64_t batch) {
    NEMO_CUDA_RC(check_dims(op, dt, ta, tb, m, n, k, &lda, &ldb, &ldc, batch));
    if (m == 0 || n == 0 || batch == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(dev);
    if (k == 0) {
        if (beta == 1.0) return 0;
        if (dt == NEMO_F32) scale_ptrs<float><<<k_blocks(batch * m * n), NEMO_CUDA_THREADS, 0, st>>>(C, m, n, ldc, batch, beta);
        else scale_ptrs<double><<<k_blocks(batch * m * n), NEMO_CUDA_THREADS, 0, st>>>(C, m, n, ldc, batch, beta);
        NEMO_CUDA_LAUNCHED("%s: k = 0 product scale kernel on cuda:%d", op, dev);
        return 0;
    }
    cublasHandle_t h;
    NEMO_CUDA_RC(blas_handle(op, dev, &h));
    cudaDataType_t ty = dt == NEMO_F32 ? CUDA_R_32F : CUDA_R_64F;
    cublasComputeType_t ct = dt == NEMO_F32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_64F;
    float af = (float)alpha, bf = (float)beta;
    const void *ap = dt == NEMO_F32 ? (const void *)&af : (const void *)&alpha;
    const void *bp = dt == NEMO_F32 ? (const void *)&bf : (const void *)&beta;
    cublasStatus_t s = cublasGemmBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n,
                                           (int)m, (int)k, ap, B, ty, (int)ldb, A, ty, (int)lda, bp, C, ty, (int)ldc,
                                           (int)batch, ct, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_fail(s, op, "cublasGemmBatchedEx");
    return 0;
}

int nemo_cuda_gemm1(const char *op, int dev, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                    const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
    NEMO_CUDA_RC(check_dims(op, dt, ta, tb, m, n, k, &lda, &ldb, &ldc, 1));
    if (m == 0 || n == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(dev);
    if (k == 0) {
        if (beta == 1.0) return 0;
        if (dt == NEMO_F32) scale_one<float><<<k_blocks(m * n), NEMO_CUDA_THREADS, 0, st>>>((float *)c, m, n, ldc, beta);
        else scale_one<double><<<k_blocks(m * n), NEMO_CUDA_THREADS, 0, st>>>((double *)c, m, n, ldc, beta);
        NEMO_CUDA_LAUNCHED("%s: k = 0 product scale kernel on cuda:%d", op, dev);
        return 0;
    }
    cublasHandle_t h;
    NEMO_CUDA_RC(blas_handle(op, dev, &h));
    cudaDataType_t ty = dt == NEMO_F32 ? CUDA_R_32F : CUDA_R_64F;
    cublasComputeType_t ct = dt == NEMO_F32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_64F;
    float af = (float)alpha, bf = (float)beta;
    const void *ap = dt == NEMO_F32 ? (const void *)&af : (const void *)&alpha;
    const void *bp = dt == NEMO_F32 ? (const void *)&bf : (const void *)&beta;
    cublasStatus_t s = cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m,
                                    (int)k, ap, b, ty, (int)ldb, a, ty, (int)lda, bp, c, ty, (int)ldc, ct,
                                    CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_fail(s, op, "cublasGemmEx");
    return 0;
}
