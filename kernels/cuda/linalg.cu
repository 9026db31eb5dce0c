/*
 * kernels/cuda/linalg.cu: the CUDA kernels of the linalg family (kernels/cpu/linalg.c has the
 * CPU twins and engine/ops/linalg.c the ABI):
 *
 *   "gemm"    int (int dtype, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
 *                  const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
 *                  void *c, int64_t ldc, int64_t nbatch, const int64_t *offs, int c_distinct)
 *             for i < nbatch: c_i = alpha op(a_i) op(b_i) + beta c_i, row-major, a_i = a +
 *             offs[3i], b_i = b + offs[3i+1], c_i = c + offs[3i+2] elements (offs NULL: one
 *             product); ta/tb: the operand is stored transposed. Device pointers; offs on the
 *             host. Through cuBLASLt.
 *   "colsum"  int (int dtype, int64_t m, int64_t n, const void *g, int64_t ldg, void *out)
 *             out[j] = sum_i g[i*ldg + j] (double accumulation), out (n) dense in g's compute
 *             dtype (float32 for bfloat16 / float16 rows, which are read as they are).
 *   "gemm_lp" gemm's signature with bfloat16 / float16 operands (dtype) and a float32 c: the
 *             tensor cores multiply the exact operand values and accumulate in float32
 *             (CUBLAS_COMPUTE_32F), as the CPU twin's float32 sums of widened operands do.
 *   "gemm_lp_out" int (int dtype, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
 *             const void *a, int64_t lda, const void *b, int64_t ldb, const void *bias, void *c,
 *             int64_t ldc, int64_t nbatch, const int64_t *offs): c_i = round(alpha op(a_i)
 *             op(b_i) + bias) with c in the operands' dtype, bias (n, dtype) or NULL broadcast
 *             over the rows, the c_i distinct: the float32 accumulators get the bias and are
 *             rounded once by cuBLASLt's epilogue (CUBLASLT_EPILOGUE_BIAS), so no float32
 *             result goes through memory.
 *
 * gemm takes float32 or float64. All find their device from the output pointer,
 * return 0 or a negative status with the plugin's error text (cuBLASLt's status name and
 * text included), launch on the device's stream and do not synchronize.
 *
 * Non-obvious rules
 * - Row-major products are computed as the column-major transposed product: C^T = op(B)^T
 *   op(A)^T, so b goes in cuBLASLt's A slot and a in its B slot, with no copies.
 * - float32 uses CUBLAS_COMPUTE_32F: true float32 arithmetic, no TF32 (results stay within
 *   float32 rounding of the CPU's sgemm). bf16 / f16 training reaches the tensor cores through
 *   gemm_lp: the front-end hands such operands over unconverted.
 * - A batch whose offsets are evenly spaced and whose outputs are distinct is one strided
 *   batched call; any other batch is a loop of calls on the stream, which keeps the batch
 *   order of an accumulating (beta = 1, shared output) batch, as on the CPU.
 * - cuBLASLt assumes 256-byte aligned operands unless told otherwise: the actual alignment of
 *   every pointer (views start anywhere) goes into the heuristic's preferences. Heuristic
 *   answers are cached by (device, dtype, shapes, strides, alignments).
 * - k == 0: c = beta c (zeros when beta == 0), as BLAS defines it.
 * - gemm_lp_out falls back to its contract written out (the bias widened into a float32
 *   scratch block, gemm_lp onto it, one rounding kernel) when cuBLASLt has no algorithm for the
 *   bf16 output (or k == 0, or a bias pointer not 16-byte aligned): slower, the same numbers.
 * - Handles are per device and the 32 MiB workspaces per device and stream, made on first use
 *   and kept (not counted in libnemo's memory statistics).
 */
#include <pthread.h>
#include <cublasLt.h>
#include "common.cuh"
#include "util.cuh"

/* ==== Kernels ==== */

/* c[i*ldc + j] = beta * c[...] over an (m, n) block (beta == 0 writes zeros). */
template <typename T>
__global__ void scale_rows(T *c, int64_t m, int64_t n, int64_t ldc, T beta) {
    NEMO_CUDA_LOOP(t, m * n) {
        int64_t i = t / n, j = t % n;
        T *p = c + i * ldc + j;
        *p = beta == (T)0 ? (T)0 : (T)(beta * *p);
    }
}

/* part[c*n + j] = sum over rows [c*chunk, (c+1)*chunk) of g[i*ldg + j], in row order. */
/* part[c*n + j] = sum over rows [c*chunk, (c+1)*chunk) of g[i*ldg + j], in row order; g in
 * dtype dt (float64 read as double, the others widened to float first). */
__global__ void colsum_part(double *part, const void *g, int dt, int64_t m, int64_t n, int64_t ldg, int64_t nk,
                            int64_t chunk) {
    NEMO_CUDA_LOOP(t, nk * n) {
        int64_t j = t % n, c = t / n, i0 = c * chunk, i1 = i0 + chunk < m ? i0 + chunk : m;
        double s = 0.0;
        if (dt == NEMO_F64)
            for (int64_t i = i0; i < i1; i++) s = __dadd_rn(s, ((const double *)g)[i * ldg + j]);
        else
            for (int64_t i = i0; i < i1; i++) s = __dadd_rn(s, (double)ld_as<float>(g, i * ldg + j, dt));
        part[t] = s;
    }
}
template <typename T>
__global__ void colsum_fold(T *out, const double *part, int64_t n, int64_t nk) {
    NEMO_CUDA_LOOP(j, n) {
        double s = part[j];
        for (int64_t c = 1; c < nk; c++) s = __dadd_rn(s, part[c * n + j]);
        out[j] = (T)s;
    }
}

/* gemm_lp_out's written-out contract: s (rows of n floats) = the widened bias in every row;
 * then c rows (ldc apart, dtype dt) = s rows rounded. */
__global__ void bias_rows(float *s, int64_t rows, int64_t n, const void *bias, int dt) {
    NEMO_CUDA_LOOP(t, rows * n) s[t] = ld_as<float>(bias, t % n, dt);
}
__global__ void round_rows(void *c, int64_t ldc, const float *s, int64_t m, int64_t n, int dt) {
    NEMO_CUDA_LOOP(t, m * n) st_as<float>(c, (t / n) * ldc + t % n, dt, s[t]);
}

/* ==== cuBLASLt state ==== */

#define LT_MAXDEV 64
#define LT_WORKSPACE ((size_t)32 << 20)
/* a handle per device, a workspace per device and stream (two streams' products may run at once) */
static struct { cublasLtHandle_t h; void *ws[NEMO_CUDA_MAX_STREAMS + 1]; } lt[LT_MAXDEV];
static pthread_mutex_t lt_lock = PTHREAD_MUTEX_INITIALIZER;

static int lt_fail(cublasStatus_t s, const char *what) {
    return nemo_cuda_error(NEMO_ECUDA, "gemm: %s: %s (%s)", what, cublasLtGetStatusString(s), cublasLtGetStatusName(s));
}
#define LT_TRY(call, what) do {                                                                \
        cublasStatus_t lt_s_ = (call);                                                           \
        if (lt_s_ != CUBLAS_STATUS_SUCCESS) { rc = lt_fail(lt_s_, what); goto done; }            \
    } while (0)

/* The device that owns a device pointer (a kernel ABI with raw pointers names no tensor). */
static int pointer_device(const char *op, const void *p, int *dev) {
    cudaPointerAttributes at;
    NEMO_CUDA_TRY(cudaPointerGetAttributes(&at, p), "%s: cudaPointerGetAttributes", op);
    if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
        return nemo_cuda_error(NEMO_EDEVICE, "%s: cuda kernel called with memory that is not on a cuda device", op);
    if (at.device < 0 || at.device >= LT_MAXDEV)
        return nemo_cuda_error(NEMO_EDEVICE, "%s: device %d out of range 0..%d", op, at.device, LT_MAXDEV - 1);
    *dev = at.device;
    return 0;
}

static int lt_handle(int dev, cublasLtHandle_t *h, void **ws) {
    int rc = 0;
    const int sid = nemo_cuda_stream_id(dev);
    pthread_mutex_lock(&lt_lock);
    if (!lt[dev].ws[sid]) {
        void *w = NULL;
        cudaError_t e = cudaMalloc(&w, LT_WORKSPACE);
        if (e != cudaSuccess) {
            rc = nemo_cuda_fail(e, "gemm: cudaMalloc of the %zu-byte cuBLASLt workspace on cuda:%d", LT_WORKSPACE, dev);
            goto done;
        }
        lt[dev].ws[sid] = w;
    }
    if (!lt[dev].h) {
        cublasLtHandle_t nh = NULL;
        LT_TRY(cublasLtCreate(&nh), "cublasLtCreate");
        lt[dev].h = nh;
    }
done:
    *h = lt[dev].h;
    *ws = lt[dev].ws[sid];
    pthread_mutex_unlock(&lt_lock);
    return rc;
}

/* Heuristic results by problem. */
typedef struct {
    int dev, dt, odt, bias, ta, tb;
    int64_t m, n, k, lda, ldb, ldc, batch, sa, sb, sc;
    uint32_t align[3];
} algo_key;
#define NALGO 256
static struct { algo_key key; cublasLtMatmulAlgo_t algo; int valid; } algos[NALGO];
static int algo_next;

static int algo_find(const algo_key *k, cublasLtMatmulAlgo_t *algo) {
    int hit = 0;
    pthread_mutex_lock(&lt_lock);
    for (int i = 0; i < NALGO && !hit; i++)
        if (algos[i].valid && !memcmp(&algos[i].key, k, sizeof *k)) { *algo = algos[i].algo; hit = 1; }
    pthread_mutex_unlock(&lt_lock);
    return hit;
}
static void algo_put(const algo_key *k, const cublasLtMatmulAlgo_t *algo) {
    pthread_mutex_lock(&lt_lock);
    algos[algo_next].key = *k;
    algos[algo_next].algo = *algo;
    algos[algo_next].valid = 1;
    algo_next = (algo_next + 1) % NALGO;
    pthread_mutex_unlock(&lt_lock);
}

/* The largest power of two (<= 256) dividing the address. */
static uint32_t align_of(const void *p, int64_t extra_bytes) {
    uint64_t v = (uint64_t)(uintptr_t)p | (uint64_t)extra_bytes | 256u;
    return (uint32_t)(v & (~v + 1));
}

/* ==== kernel launchers ==== */

static int gemm_lt(const char *name, int dt, int odt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                   const void *a, int64_t lda, const void *b, int64_t ldb, double beta, const void *bias, void *c,
                   int64_t ldc, int64_t nbatch, const int64_t *offs, int c_distinct);

/* gemm_lp_out as its contract says: s = bias in every row (float32 scratch, one dense block
 * per product), gemm_lp onto s, then each block rounded into its c_i. */
static int gemm_lp_staged(const char *name, int dev, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k,
                          double alpha, const void *a, int64_t lda, const void *b, int64_t ldb, const void *bias,
                          void *c, int64_t ldc, int64_t nbatch, const int64_t *offs) {
    cudaStream_t st = nemo_cuda_stream(dev);
    int64_t per = m * n;
    void *sp = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(float) * (size_t)(per * nbatch), &sp));
    float *s = (float *)sp;
    int64_t *o2 = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)nbatch);
    if (!o2) return nemo_cuda_error(NEMO_ENOMEM, "%s: out of memory for %lld batch offsets", name, (long long)nbatch);
    for (int64_t i = 0; i < nbatch; i++) {
        o2[3 * i] = offs[3 * i];
        o2[3 * i + 1] = offs[3 * i + 1];
        o2[3 * i + 2] = i * per;
    }
    int rc = 0;
    if (bias) {
        bias_rows<<<k_blocks(per * nbatch), NEMO_CUDA_THREADS, 0, st>>>(s, m * nbatch, n, bias, dt);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) rc = nemo_cuda_fail(e, "%s: bias kernel on cuda:%d", name, dev);
    }
    if (rc == 0)
        rc = gemm_lt(name, dt, NEMO_F32, ta, tb, m, n, k, alpha, a, lda, b, ldb, bias ? 1.0 : 0.0, NULL, s, n, nbatch, o2,
                     1);
    free(o2);
    if (rc < 0) return rc;
    for (int64_t i = 0; i < nbatch; i++)
        round_rows<<<k_blocks(per), NEMO_CUDA_THREADS, 0, st>>>((uint16_t *)c + offs[3 * i + 2], ldc, s + i * per, m, n,
                                                                dt);
    NEMO_CUDA_LAUNCHED("%s: rounding kernel on cuda:%d", name, dev);
    return 0;
}

/* "gemm" (dt float32 / float64: operands and c in dt), "gemm_lp" (dt bfloat16 / float16
 * operands, c float32, float32 accumulation on the tensor cores) and "gemm_lp_out" (the same
 * with c in dt and an optional bias, beta 0): one implementation; odt is c's dtype, and the
 * registered wrappers below check dt. */
static int gemm_lt(const char *name, int dt, int odt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                   const void *a, int64_t lda, const void *b, int64_t ldb, double beta, const void *bias, void *c,
                   int64_t ldc, int64_t nbatch, const int64_t *offs, int c_distinct) {
    nemo_cuda_clear_error();
    static const int64_t zero3[3] = {0, 0, 0};
    const int lp = dt == NEMO_BF16 || dt == NEMO_F16, lpo = lp && odt == dt;
    if (!offs) { offs = zero3; nbatch = 1; }
    if (m <= 0 || n <= 0 || nbatch <= 0) return 0;
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: %lld x %lld x %lld is too large", name, (long long)m, (long long)n,
                               (long long)k);
    int dev = 0;
    NEMO_CUDA_RC(pointer_device(name, c, &dev));
    NEMO_CUDA_TRY(cudaSetDevice(dev), "%s: cudaSetDevice(%d)", name, dev);
    cudaStream_t st = nemo_cuda_stream(dev);
    const int64_t esz = lp ? 2 : (dt == NEMO_F32 ? 4 : 8);                  /* a's and b's element size */
    const int64_t csz = lpo ? 2 : (odt == NEMO_F32 ? 4 : 8);                /* c's */
    const char *pa = (const char *)a, *pb = (const char *)b;
    char *pc = (char *)c;

    if (lpo && (k == 0 || (bias && ((uintptr_t)bias & 15))))
        return gemm_lp_staged(name, dev, dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, bias, c, ldc, nbatch, offs);
    if (k == 0) {   /* c = beta c */
        if (beta == 1.0) return 0;
        for (int64_t i = 0; i < nbatch; i++) {
            char *ci = pc + offs[3 * i + 2] * csz;
            if (odt == NEMO_F32)
                scale_rows<float><<<nemo_cuda_blocks(m * n), NEMO_CUDA_THREADS, 0, st>>>((float *)ci, m, n, ldc, (float)beta);
            else
                scale_rows<double><<<nemo_cuda_blocks(m * n), NEMO_CUDA_THREADS, 0, st>>>((double *)ci, m, n, ldc, beta);
        }
        NEMO_CUDA_LAUNCHED("%s: k = 0 scale kernel on cuda:%d", name, dev);
        return 0;
    }

    /* one strided batched call when the offsets are evenly spaced and the outputs distinct */
    int strided = nbatch > 1 && c_distinct && nbatch <= INT32_MAX;
    int64_t sa = 0, sb = 0, sc = 0;
    if (strided) {
        sa = offs[3] - offs[0]; sb = offs[4] - offs[1]; sc = offs[5] - offs[2];
        for (int64_t i = 2; i < nbatch && strided; i++)
            strided = offs[3 * i] - offs[0] == i * sa && offs[3 * i + 1] - offs[1] == i * sb &&
                      offs[3 * i + 2] - offs[2] == i * sc;
    }
    int64_t calls = strided || nbatch == 1 ? 1 : nbatch;

    /* alignments of every pointer used */
    uint32_t al[3] = {256, 256, 256};
    for (int64_t i = 0; i < calls; i++) {
        uint32_t x;
        x = align_of(pb + offs[3 * i + 1] * esz, strided ? sb * esz : 0); if (x < al[0]) al[0] = x;
        x = align_of(pa + offs[3 * i] * esz, strided ? sa * esz : 0); if (x < al[1]) al[1] = x;
        x = align_of(pc + offs[3 * i + 2] * csz, strided ? sc * csz : 0); if (x < al[2]) al[2] = x;
    }

    int rc = 0, staged = 0;
    cublasLtHandle_t h = NULL;
    void *ws = NULL;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulAlgo_t algo;
    algo_key key;
    NEMO_CUDA_RC(lt_handle(dev, &h, &ws));
    {
        cudaDataType_t ty = dt == NEMO_F32 ? CUDA_R_32F : dt == NEMO_F64 ? CUDA_R_64F : dt == NEMO_BF16 ? CUDA_R_16BF
                                                                                                  : CUDA_R_16F;
        cudaDataType_t tyc = lpo ? ty : odt == NEMO_F32 ? CUDA_R_32F : CUDA_R_64F;
        cudaDataType_t tys = odt == NEMO_F64 ? CUDA_R_64F : CUDA_R_32F;   /* alpha / beta and the accumulators */
        cublasComputeType_t ct = odt == NEMO_F64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
        cublasOperation_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        LT_TRY(cublasLtMatmulDescCreate(&op, ct, tys), "cublasLtMatmulDescCreate");
        LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa), "set TRANSA");
        LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb), "set TRANSB");
        if (bias) {   /* D = acc + bias per row of cuBLASLt's column-major D, i.e. per column of c */
            cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
            LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), "set EPILOGUE");
            LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias),
                   "set BIAS_POINTER");
            LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ty, sizeof ty),
                   "set BIAS_DATA_TYPE");
        }
        /* cuBLASLt's A = our b (stored (k, n) row-major: (n, k) column-major), B = our a, C = c^T */
        LT_TRY(cublasLtMatrixLayoutCreate(&la, ty, (uint64_t)(tb ? k : n), (uint64_t)(tb ? n : k), ldb), "layout of b");
        LT_TRY(cublasLtMatrixLayoutCreate(&lb, ty, (uint64_t)(ta ? m : k), (uint64_t)(ta ? k : m), lda), "layout of a");
        LT_TRY(cublasLtMatrixLayoutCreate(&lc, tyc, (uint64_t)n, (uint64_t)m, ldc), "layout of c");
        if (strided) {
            int32_t cnt = (int32_t)nbatch;
            cublasLtMatrixLayout_t ls[3] = {la, lb, lc};
            int64_t ss[3] = {sb, sa, sc};
            for (int q = 0; q < 3; q++) {
                LT_TRY(cublasLtMatrixLayoutSetAttribute(ls[q], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &cnt, sizeof cnt),
                       "set BATCH_COUNT");
                LT_TRY(cublasLtMatrixLayoutSetAttribute(ls[q], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &ss[q],
                                                        sizeof ss[q]), "set STRIDED_BATCH_OFFSET");
            }
        }
        memset(&key, 0, sizeof key);
        key.dev = dev; key.dt = dt; key.odt = odt; key.bias = bias != NULL; key.ta = ta; key.tb = tb;
        key.m = m; key.n = n; key.k = k; key.lda = lda; key.ldb = ldb; key.ldc = ldc;
        key.batch = strided ? nbatch : 1; key.sa = sa; key.sb = sb; key.sc = sc;
        memcpy(key.align, al, sizeof al);
        if (!algo_find(&key, &algo)) {
            size_t wsn = LT_WORKSPACE;
            LT_TRY(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
            LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsn, sizeof wsn),
                   "set MAX_WORKSPACE_BYTES");
            cublasLtMatmulPreferenceAttributes_t pa_[4] = {
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
            uint32_t av[4] = {al[0], al[1], al[2], al[2]};
            for (int q = 0; q < 4; q++)
                LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, pa_[q], &av[q], sizeof av[q]), "set MIN_ALIGNMENT");
            cublasLtMatmulHeuristicResult_t res;
            int nres = 0;
            cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &res, &nres);
            if (lpo && (hs != CUBLAS_STATUS_SUCCESS || nres < 1)) { staged = 1; goto done; }
            LT_TRY(hs, "cublasLtMatmulAlgoGetHeuristic");
            if (nres < 1) { rc = lt_fail(CUBLAS_STATUS_NOT_SUPPORTED, "no cuBLASLt algorithm for this product"); goto done; }
            algo = res.algo;
            algo_put(&key, &algo);
        }
        float af = (float)alpha, bf = (float)beta;
        const void *alp = odt == NEMO_F64 ? (const void *)&alpha : (const void *)&af;
        const void *bep = odt == NEMO_F64 ? (const void *)&beta : (const void *)&bf;
        for (int64_t i = 0; i < calls; i++) {
            const void *ai = pa + offs[3 * i] * esz, *bi = pb + offs[3 * i + 1] * esz;
            void *ci = pc + offs[3 * i + 2] * csz;
            LT_TRY(cublasLtMatmul(h, op, alp, bi, la, ai, lb, bep, ci, lc, ci, lc, &algo, ws, LT_WORKSPACE, st),
                   "cublasLtMatmul");
        }
    }
done:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    if (staged)
        return gemm_lp_staged(name, dev, dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, bias, c, ldc, nbatch, offs);
    return rc;
}
static int gemm_cuda(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                     const void *b, int64_t ldb, double beta, void *c, int64_t ldc, int64_t nbatch, const int64_t *offs,
                     int c_distinct) {
    if (dt != NEMO_F32 && dt != NEMO_F64) {
        nemo_cuda_clear_error();
        return nemo_cuda_error(NEMO_EDTYPE, "gemm: cuda kernel expects float32 or float64, got %s", nemo_cuda_dtype_name(dt));
    }
    return gemm_lt("gemm", dt, dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, NULL, c, ldc, nbatch, offs, c_distinct);
}
NEMO_CUDA_KERNEL("gemm", gemm_cuda)

static int lp_dtype(const char *name, int dt) {
    if (dt == NEMO_BF16 || dt == NEMO_F16) return 0;
    nemo_cuda_clear_error();
    return nemo_cuda_error(NEMO_EDTYPE, "%s: cuda kernel expects bfloat16 or float16, got %s", name,
                           nemo_cuda_dtype_name(dt));
}

static int gemm_lp_cuda(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                        int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc, int64_t nbatch,
                        const int64_t *offs, int c_distinct) {
    NEMO_CUDA_RC(lp_dtype("gemm_lp", dt));
    return gemm_lt("gemm_lp", dt, NEMO_F32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, NULL, c, ldc, nbatch, offs,
                   c_distinct);
}
NEMO_CUDA_KERNEL("gemm_lp", gemm_lp_cuda)

static int gemm_lp_out_cuda(int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                            int64_t lda, const void *b, int64_t ldb, const void *bias, void *c, int64_t ldc,
                            int64_t nbatch, const int64_t *offs) {
    NEMO_CUDA_RC(lp_dtype("gemm_lp_out", dt));
    return gemm_lt("gemm_lp_out", dt, dt, ta, tb, m, n, k, alpha, a, lda, b, ldb, 0.0, bias, c, ldc, nbatch, offs, 1);
}
NEMO_CUDA_KERNEL("gemm_lp_out", gemm_lp_out_cuda)

static int colsum_cuda(int dt, int64_t m, int64_t n, const void *g, int64_t ldg, void *out) {
    nemo_cuda_clear_error();
    if (dt != NEMO_F32 && dt != NEMO_F64 && dt != NEMO_BF16 && dt != NEMO_F16)
        return nemo_cuda_error(NEMO_EDTYPE, "colsum: cuda kernel expects a floating-point dtype, got %s",
                               nemo_cuda_dtype_name(dt));
    if (n <= 0) return 0;
    if (m < 0) return nemo_cuda_error(NEMO_EINVAL, "colsum: negative row count %lld", (long long)m);
    int dev = 0;
    NEMO_CUDA_RC(pointer_device("colsum", out, &dev));
    NEMO_CUDA_TRY(cudaSetDevice(dev), "colsum: cudaSetDevice(%d)", dev);
    cudaStream_t st = nemo_cuda_stream(dev);
    /* rows cut into nk chunks (fixed by m and n) so that about 256K threads run */
    int64_t nk = 1;
    if (n < 262144 && m >= 64) {
        nk = (262144 + n - 1) / n;
        if (nk > m / 32) nk = m / 32;
        if (nk > 1024) nk = 1024;
        if (nk < 1) nk = 1;
    }
    int64_t chunk = m > 0 ? (m + nk - 1) / nk : 0;
    if (m > 0) nk = (m + chunk - 1) / chunk;
    void *part = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(double) * (size_t)(nk * n), &part));
    colsum_part<<<nemo_cuda_blocks(nk * n), NEMO_CUDA_THREADS, 0, st>>>((double *)part, g, dt, m, n, ldg, nk, chunk);
    if (dt == NEMO_F64)
        colsum_fold<double><<<nemo_cuda_blocks(n), NEMO_CUDA_THREADS, 0, st>>>((double *)out, (const double *)part, n, nk);
    else   /* float32 out for float32, bfloat16 and float16 rows */
        colsum_fold<float><<<nemo_cuda_blocks(n), NEMO_CUDA_THREADS, 0, st>>>((float *)out, (const double *)part, n, nk);
    NEMO_CUDA_LAUNCHED("colsum: kernel launch on cuda:%d (%lld x %lld)", dev, (long long)m, (long long)n);
    return 0;
}
NEMO_CUDA_KERNEL("colsum", colsum_cuda)
