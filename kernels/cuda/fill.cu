/*
 * kernels/cuda/fill.cu: the "fill" kernel, t[...] = value, for every dtype on a CUDA tensor.
 *
 *   int fill_cuda(nemo_tensor *t, double value);      registered as ("fill", NEMO_CUDA)
 *
 *   t      [OUT] a tensor on cuda:N of any dtype (float32, bfloat16, float16, float64, int64,
 *          int32, bool) and any view: contiguous, strided, or expanded (stride 0 dims are
 *          written once). An empty tensor is a no-op.
 *   value  converted on the host exactly as libnemo's CPU fill converts it (double -> float ->
 *          bf16/f16 with round to nearest even, (int64_t)/(int32_t) truncation, bool = v != 0),
 *          so CPU and CUDA results are equal bit for bit.
 *   returns 0, NEMO_EDEVICE (t is not a CUDA tensor), NEMO_EDTYPE (unknown dtype) or NEMO_ECUDA;
 *          on failure the plugin's error_text() names the problem. Launches on the device's
 *          stream (nemo_cuda_stream) and does not synchronize.
 *
 * Non-obvious rule: the kernel works on bit patterns, not on numbers: it only knows the element
 * size (1, 2, 4 or 8 bytes). A value whose bytes are all equal (0 for every dtype, true, -1)
 * becomes a cudaMemset; a dense tensor whose data is 16-byte aligned is written 16 bytes per
 * store; anything else goes through the strided kernel, one element per store.
 */
#include "common.cuh"

/* ==== Kernels ==== */

/* A view after coalescing (size-1 and stride-0 dims dropped, contiguous dims merged). */
struct fill_view {
    int ndim;
    int64_t shape[NEMO_MAXDIM];
    int64_t stride[NEMO_MAXDIM];
};

/* p[0 .. nvec) = v16 (16 bytes per store), then the nt elements after them = v. */
template <typename W>
__global__ void fill_dense_vec(uint4 *p, uint4 v16, int64_t nvec, W *tail, W v, int nt) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < nt) tail[i] = v;
    for (; i < nvec; i += (int64_t)gridDim.x * blockDim.x) p[i] = v16;
}

/* p[0 .. n) = v, one element per store (unaligned dense data). */
template <typename W>
__global__ void fill_dense(W *p, W v, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        p[i] = v;
}

/* Element i of the view (row-major order) at base + sum(idx_d * stride_d). */
template <typename W>
__global__ void fill_strided(W *base, W v, fill_view s, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t rem = i, off = 0;
        for (int d = s.ndim - 1; d >= 0; d--) {
            off += (rem % s.shape[d]) * s.stride[d];
            rem /= s.shape[d];
        }
        base[off] = v;
    }
}

/* ==== kernel launchers ==== */

/* Drops size-1 dims and stride-0 dims (writing the same address again changes nothing),
 * merges dims contiguous with each other; returns the number of distinct elements. */
static int64_t coalesce(const nemo_tensor *t, fill_view *v) {
    int n = 0;
    int64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] == 0) return 0;
        if (t->shape[d] == 1 || t->stride[d] == 0) continue;
        if (n > 0 && v->stride[n - 1] == t->stride[d] * t->shape[d]) {
            v->shape[n - 1] *= t->shape[d];
            v->stride[n - 1] = t->stride[d];
        } else {
            v->shape[n] = t->shape[d];
            v->stride[n] = t->stride[d];
            n++;
        }
        numel *= t->shape[d];
    }
    if (n == 0) { v->shape[0] = 1; v->stride[0] = 1; n = 1; }   /* one element */
    v->ndim = n;
    return numel;
}

template <typename W>
static int launch(const nemo_tensor *t, uint64_t bits, const fill_view *v, int64_t n) {
    int dev = t->devindex;
    cudaStream_t st = nemo_cuda_stream(dev);
    W w;
    memcpy(&w, &bits, sizeof w);
    W *p = (W *)nemo_cuda_data(t);
    if (v->ndim == 1 && v->stride[0] == 1) {
        uintptr_t addr = (uintptr_t)p;
        int64_t per16 = 16 / (int64_t)sizeof(W);
        if (addr % 16 == 0 && n >= per16) {
            uint4 v16;
            W pat[16 / sizeof(W)];
            for (int64_t k = 0; k < per16; k++) pat[k] = w;
            memcpy(&v16, pat, 16);
            int64_t nvec = n / per16;
            int nt = (int)(n - nvec * per16);
            fill_dense_vec<W><<<nemo_cuda_blocks(nvec), NEMO_CUDA_THREADS, 0, st>>>(
                (uint4 *)p, v16, nvec, p + nvec * per16, w, nt);
        } else {
            fill_dense<W><<<nemo_cuda_blocks(n), NEMO_CUDA_THREADS, 0, st>>>(p, w, n);
        }
    } else {
        fill_strided<W><<<nemo_cuda_blocks(n), NEMO_CUDA_THREADS, 0, st>>>(p, w, *v, n);
    }
    NEMO_CUDA_LAUNCHED("fill: kernel launch on cuda:%d (%lld elements of %s)", dev, (long long)n,
                       nemo_cuda_dtype_name(t->dtype));
    return 0;
}

static int fill_cuda(nemo_tensor *t, double value) {
    nemo_cuda_clear_error();
    if (t->devtype != NEMO_CUDA)
        return nemo_cuda_error(NEMO_EDEVICE, "fill: cuda kernel called on a %s tensor",
                               t->devtype == NEMO_CPU ? "cpu" : "non-cuda");
    uint64_t bits;
    int sz = nemo_cuda_encode(value, t->dtype, &bits);
    if (sz == 0) return nemo_cuda_error(NEMO_EDTYPE, "fill: unknown dtype %d", t->dtype);
    fill_view v;
    int64_t n = coalesce(t, &v);
    if (n == 0) return 0;
    NEMO_CUDA_TRY(cudaSetDevice(t->devindex), "fill: cudaSetDevice(%d)", t->devindex);

    /* every byte of the pattern equal: a memset does it at full bandwidth */
    const unsigned char *b = (const unsigned char *)&bits;
    int same = 1;
    for (int k = 1; k < sz; k++) same &= b[k] == b[0];
    if (same && v.ndim == 1 && v.stride[0] == 1) {
        NEMO_CUDA_TRY(cudaMemsetAsync(nemo_cuda_data(t), b[0], (size_t)n * (size_t)sz,
                                      nemo_cuda_stream(t->devindex)),
                      "fill: cudaMemset of %lld bytes on cuda:%d", (long long)n * sz, t->devindex);
        return 0;
    }
    switch (sz) {
    case 1: return launch<uint8_t>(t, bits, &v, n);
    case 2: return launch<uint16_t>(t, bits, &v, n);
    case 4: return launch<uint32_t>(t, bits, &v, n);
    default: return launch<unsigned long long>(t, bits, &v, n);
    }
}

NEMO_CUDA_KERNEL("fill", fill_cuda)
