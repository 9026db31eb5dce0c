/*
 * kernels/cuda/copy.cu: the "copy" kernel, dst[...] = src[...] with any strides, broadcast and
 * dtype conversion, both tensors on the same CUDA device.
 *
 *   int copy_cuda(nemo_tensor *dst, const nemo_tensor *src, const int64_t *sstride);
 *                                                   registered as ("copy", NEMO_CUDA)
 *
 *   dst      [OUT] any view on cuda:N of any dtype (strided, offset, negative strides).
 *   src      [IN]  a tensor on the same device, any dtype; read through sstride.
 *   sstride  src's strides broadcast to dst's shape (dst->ndim entries, 0 where src is
 *            expanded), as libnemo's nemo_broadcast_strides gives them.
 *   returns  0, NEMO_EDEVICE (not both on the same CUDA device), NEMO_EDTYPE or NEMO_ECUDA;
 *            launches on the device's stream and does not synchronize. An empty dst is a no-op.
 *
 * Values convert exactly as libnemo's CPU copy converts them (load as double, store from
 * double: see common.cuh), so nemo_to / nemo_contiguous on CUDA equal the CPU bit for bit.
 *
 * Non-obvious rules: dst must not overlap src except when they are the same view (as on the
 * CPU). Paths, fastest first: a same-dtype copy of two dense runs is one cudaMemcpyAsync; a
 * same-dtype strided copy moves raw 1/2/4/8-byte words; a conversion between two of the float
 * dtypes (float32, float64, bfloat16, float16) is a kernel specialised on both; every other
 * conversion (integers, bool) goes through one generic kernel that switches on the dtypes.
 */
#include "common.cuh"

/* ==== Kernels ==== */

/* Raw words: same dtype, W is an unsigned type of the element size. */
template <typename W, int MODE>
__global__ void copy_words(W *dst, const W *src, nemo_cuda_iter<2> it, int64_t n) {
    NEMO_CUDA_LOOP(i, n) {
        int64_t off[2];
        nemo_cuda_offsets<MODE, 2>(it, i, off);
        dst[off[0]] = src[off[1]];
    }
}

/* A float-to-float conversion specialised on both dtypes. FLAT (two dense runs): each thread
 * converts CONVERT_U elements a block-width apart, loads first, so that a thread keeps CONVERT_U
 * loads in flight (PyTorch's unrolled_elementwise_kernel; the two dtypes' widths differ, so no
 * common vector type), still coalesced per load; the grid covers n / CONVERT_U threads. */
#define CONVERT_U 4
template <int SD, int DD, int MODE>
__global__ void copy_convert(typename nemo_dt<DD>::S *dst, const typename nemo_dt<SD>::S *src,
                             nemo_cuda_iter<2> it, int64_t n) {
    if constexpr (MODE == NEMO_CUDA_FLAT) {
        const int64_t span = (int64_t)blockDim.x * CONVERT_U;
        for (int64_t base = (int64_t)blockIdx.x * span; base < n; base += (int64_t)gridDim.x * span) {
            typename nemo_dt<SD>::S v[CONVERT_U];
            NEMO_UNROLL for (int j = 0; j < CONVERT_U; j++) {
                const int64_t i = base + threadIdx.x + (int64_t)j * blockDim.x;
                if (i < n) v[j] = src[i];
            }
            NEMO_UNROLL for (int j = 0; j < CONVERT_U; j++) {
                const int64_t i = base + threadIdx.x + (int64_t)j * blockDim.x;
                if (i < n) dst[i] = nemo_dt<DD>::store(nemo_dt<SD>::load(v[j]));
            }
        }
    } else {
        NEMO_CUDA_LOOP(i, n) {
            int64_t off[2];
            nemo_cuda_offsets<MODE, 2>(it, i, off);
            dst[off[0]] = nemo_dt<DD>::store(nemo_dt<SD>::load(src[off[1]]));
        }
    }
}

/* Any conversion, dtypes chosen at run time. */
template <int MODE>
__global__ void copy_generic(char *dst, int ddt, int dsz, const char *src, int sdt, int ssz,
                             nemo_cuda_iter<2> it, int64_t n) {
    NEMO_CUDA_LOOP(i, n) {
        int64_t off[2];
        nemo_cuda_offsets<MODE, 2>(it, i, off);
        nemo_cuda_store_any(dst + off[0] * dsz, ddt, nemo_cuda_load_any(src + off[1] * ssz, sdt));
    }
}

/* ==== kernel launchers ==== */

template <typename W>
static void launch_words(void *dst, const void *src, const nemo_cuda_iter<2> &it, int64_t n, int mode,
                         cudaStream_t st) {
    unsigned nb = nemo_cuda_blocks(n);
    if (mode == NEMO_CUDA_STR32)
        copy_words<W, NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>((W *)dst, (const W *)src, it, n);
    else
        copy_words<W, NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>((W *)dst, (const W *)src, it, n);
}

template <int SD, int DD>
static void launch_convert(void *dst, const void *src, const nemo_cuda_iter<2> &it, int64_t n, int mode,
                           cudaStream_t st) {
    typedef typename nemo_dt<DD>::S DS;
    typedef typename nemo_dt<SD>::S SS;
    unsigned nb = nemo_cuda_blocks(n);
    if (mode == NEMO_CUDA_FLAT)
        copy_convert<SD, DD, NEMO_CUDA_FLAT><<<nemo_cuda_blocks((n + CONVERT_U - 1) / CONVERT_U), NEMO_CUDA_THREADS, 0,
                                              st>>>((DS *)dst, (const SS *)src, it, n);
    else if (mode == NEMO_CUDA_STR32)
        copy_convert<SD, DD, NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>((DS *)dst, (const SS *)src, it, n);
    else
        copy_generic<NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>((char *)dst, DD, (int)sizeof(DS),
                                                                        (const char *)src, SD, (int)sizeof(SS), it, n);
}

/* The float-to-float kernels by source dtype; returns 0 when the pair has none. */
template <int SD>
static int convert_from(int ddt, void *dst, const void *src, const nemo_cuda_iter<2> &it, int64_t n, int mode,
                        cudaStream_t st) {
    switch (ddt) {
    case NEMO_F32: launch_convert<SD, NEMO_F32>(dst, src, it, n, mode, st); return 1;
    case NEMO_F64: launch_convert<SD, NEMO_F64>(dst, src, it, n, mode, st); return 1;
    case NEMO_BF16: launch_convert<SD, NEMO_BF16>(dst, src, it, n, mode, st); return 1;
    case NEMO_F16: launch_convert<SD, NEMO_F16>(dst, src, it, n, mode, st); return 1;
    default: return 0;
    }
}

static int copy_cuda(nemo_tensor *dst, const nemo_tensor *src, const int64_t *sstride) {
    NEMO_CUDA_ENTER("copy", dst);
    if (src->devtype != NEMO_CUDA || src->devindex != dst->devindex)
        return nemo_cuda_error(NEMO_EDEVICE, "copy: cuda kernel needs both tensors on cuda:%d, source is on %s:%d",
                               dst->devindex, src->devtype == NEMO_CUDA ? "cuda" : "cpu", src->devindex);
    int ddt = dst->dtype, sdt = src->dtype;
    int dsz = nemo_cuda_dtype_size(ddt), ssz = nemo_cuda_dtype_size(sdt);
    if (!dsz || !ssz) return nemo_cuda_error(NEMO_EDTYPE, "copy: unknown dtype %d or %d", ddt, sdt);
    if (dst->ndim < 0 || dst->ndim > NEMO_MAXDIM)
        return nemo_cuda_error(NEMO_EINVAL, "copy: %d dims, expected 0 to %d", dst->ndim, NEMO_MAXDIM);

    const int64_t *strides[2] = {dst->stride, sstride};
    nemo_cuda_iter<2> it;
    int flat = 0;
    int64_t n = nemo_cuda_iter_make<2>(&it, dst->ndim, dst->shape, strides, &flat);
    if (n <= 0) return 0;
    int mode = nemo_cuda_mode(flat, n);
    void *dp = nemo_cuda_data(dst);
    const void *sp = nemo_cuda_data(src);
    int dev = dst->devindex;
    cudaStream_t st = nemo_cuda_stream(dev);

    if (ddt == sdt) {
        int same = dp == sp;   /* the same view: nothing to move */
        for (int j = 0; j < it.ndim && same; j++) same = it.stride[0][j] == it.stride[1][j];
        if (same) return 0;
        if (flat) {
            NEMO_CUDA_TRY(cudaMemcpyAsync(dp, sp, (size_t)n * (size_t)dsz, cudaMemcpyDeviceToDevice, st),
                          "copy: cudaMemcpyAsync of %lld bytes on cuda:%d", (long long)n * dsz, dev);
            return 0;
        }
        if (mode == NEMO_CUDA_FLAT) mode = NEMO_CUDA_STR32;
        switch (dsz) {
        case 1: launch_words<uint8_t>(dp, sp, it, n, mode, st); break;
        case 2: launch_words<uint16_t>(dp, sp, it, n, mode, st); break;
        case 4: launch_words<uint32_t>(dp, sp, it, n, mode, st); break;
        default: launch_words<unsigned long long>(dp, sp, it, n, mode, st); break;
        }
    } else {
        int done = 0;
        switch (sdt) {
        case NEMO_F32: done = convert_from<NEMO_F32>(ddt, dp, sp, it, n, mode, st); break;
        case NEMO_F64: done = convert_from<NEMO_F64>(ddt, dp, sp, it, n, mode, st); break;
        case NEMO_BF16: done = convert_from<NEMO_BF16>(ddt, dp, sp, it, n, mode, st); break;
        case NEMO_F16: done = convert_from<NEMO_F16>(ddt, dp, sp, it, n, mode, st); break;
        default: break;
        }
        if (!done) {
            unsigned nb = nemo_cuda_blocks(n);
            if (mode == NEMO_CUDA_STR64)
                copy_generic<NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>((char *)dp, ddt, dsz, (const char *)sp,
                                                                                sdt, ssz, it, n);
            else if (mode == NEMO_CUDA_STR32)
                copy_generic<NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>((char *)dp, ddt, dsz, (const char *)sp,
                                                                                sdt, ssz, it, n);
            else
                copy_generic<NEMO_CUDA_FLAT><<<nb, NEMO_CUDA_THREADS, 0, st>>>((char *)dp, ddt, dsz, (const char *)sp,
                                                                               sdt, ssz, it, n);
        }
    }
    NEMO_CUDA_LAUNCHED("copy: kernel launch on cuda:%d (%lld elements, %s to %s)", dev, (long long)n,
                       nemo_cuda_dtype_name(sdt), nemo_cuda_dtype_name(ddt));
    return 0;
}

NEMO_CUDA_KERNEL("copy", copy_cuda)
