/*
 * kernels/cuda/common.cuh: what every CUDA kernel file of libnemo_cuda.so shares: error
 * statuses with the CUDA runtime's own text, kernel registration, launch sizes, dtype sizes and
 * host-side conversions of a fill value into a dtype's bit pattern.
 *
 * Non-obvious rules:
 * - The plugin links no libnemo symbol. libnemo dlopens it with RTLD_LOCAL while libnemo itself
 *   was loaded RTLD_LOCAL by LuaJIT, so a reference to nemo_tensor_data or nemo_set_error
 *   would make the dlopen fail. Kernels read the public structs of nemo.h directly and report
 *   errors as a negative nemo_status plus a message that the plugin's error_text() returns
 *   (a thread-local buffer in plugin.cu); libnemo copies that text into its own error.
 * - Nothing here exits, aborts or asserts: every failure is a status.
 * - A kernel file registers its kernels with NEMO_CUDA_KERNEL(name, fn) at file scope; the
 *   plugin hands the whole list to libnemo's registry when CUDA is first used, so adding a
 *   kernel family never touches plugin.cu.
 */
#ifndef NEMO_CUDA_COMMON_CUH
#define NEMO_CUDA_COMMON_CUH

#include <stdint.h>
#include <string.h>
#include <cuda_runtime.h>

extern "C" {
#include "nemo.h"
#include "cuda_plugin.h"
}

/* ==== Errors ==== */

/* Format "<what>: <cuda text> (<cudaErrorName>)" into the thread-local error buffer, clear the
 * runtime's non-sticky last error, and return NEMO_ECUDA. what is printf-style. */
int nemo_cuda_fail(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Set the error text for a failure that is not a CUDA error (bad dtype, device...) and return
 * code. */
int nemo_cuda_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Inside a function returning int: run a CUDA call and return a status on failure. */
#define NEMO_CUDA_TRY(call, ...) do {                                                      \
        cudaError_t nemo_cuda_e_ = (call);                                                   \
        if (nemo_cuda_e_ != cudaSuccess) return nemo_cuda_fail(nemo_cuda_e_, __VA_ARGS__);   \
    } while (0)
/* After a <<<...>>> launch: a bad configuration shows up in cudaGetLastError. */
#define NEMO_CUDA_LAUNCHED(...) NEMO_CUDA_TRY(cudaGetLastError(), __VA_ARGS__)

/* ==== Kernel registration ==== */

typedef void (*nemo_cuda_kfn)(void);
/* Adds (name, fn) to the plugin's list; name must be a string literal (libnemo keeps the
 * pointer). Called from static constructors, before main. */
void nemo_cuda_add_kernel(const char *name, nemo_cuda_kfn fn);
#define NEMO_CUDA_KERNEL(name, fn)                                                          \
    static void __attribute__((constructor)) nemo_cuda_reg_##fn(void) {                     \
        nemo_cuda_add_kernel(name, (nemo_cuda_kfn)(fn)); }

/* ==== Launch configuration ==== */

/* The stream kernels run on. The legacy default stream for now, so kernels are ordered with
 * the synchronous cudaMemcpy that libnemo uses for host <-> device copies; a kernel takes it
 * from here so that per-device streams later change one line. */
static inline cudaStream_t nemo_cuda_stream(int dev) { (void)dev; return 0; }

#define NEMO_CUDA_THREADS 256
/* Blocks for n work items with a grid-stride loop (the cap keeps the grid legal for any n). */
static inline unsigned nemo_cuda_blocks(int64_t n) {
    int64_t b = (n + NEMO_CUDA_THREADS - 1) / NEMO_CUDA_THREADS;
    if (b < 1) b = 1;
    if (b > 65535 * 8) b = 65535 * 8;
    return (unsigned)b;
}

/* ==== dtypes (the same table as engine/core.c) ==== */

static inline int nemo_cuda_dtype_size(int dtype) {
    static const int sizes[NEMO_NDTYPE] = {4, 8, 2, 2, 8, 4, 1};
    return (dtype >= 0 && dtype < NEMO_NDTYPE) ? sizes[dtype] : 0;
}
static inline const char *nemo_cuda_dtype_name(int dtype) {
    static const char *names[NEMO_NDTYPE] = {
        "float32", "float64", "bfloat16", "float16", "int64", "int32", "bool"};
    return (dtype >= 0 && dtype < NEMO_NDTYPE) ? names[dtype] : "?";
}
/* Address of element 0 of the view (nemo_tensor_data without linking libnemo). */
static inline void *nemo_cuda_data(const nemo_tensor *t) {
    return (char *)t->storage->data + t->offset * nemo_cuda_dtype_size(t->dtype);
}

/* ==== Host conversions: the bit patterns libnemo's CPU code stores ==== */
/* These mirror nemo_f32_to_bf16 / nemo_f32_to_f16 / nemo_store_f64 in engine/internal.h and
 * engine/core.c bit for bit (NaN included), so a value written on the GPU equals the one the
 * CPU writes. They cannot call libnemo (see the rule at the top). */

static inline uint16_t nemo_cuda_f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;       /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint16_t nemo_cuda_f32_to_f16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);              /* NaN */
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);             /* overflow -> inf */
    if (abs < 0x38800000u) {                                                /* subnormal / zero */
        if (abs < 0x33000000u) return (uint16_t)sign;
        uint32_t e = abs >> 23, m = (abs & 0x7fffffu) | 0x800000u;
        int shift = (int)(126 - e);
        uint32_t r = m >> (shift + 1), rem = m & ((1u << (shift + 1)) - 1), half = 1u << shift;
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = abs + 0xc8000fffu + ((abs >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

/* v stored as one element of dtype, in the low bytes of the result (little endian); returns
 * the element size, or 0 for an unknown dtype. */
static inline int nemo_cuda_encode(double v, int dtype, uint64_t *bits) {
    *bits = 0;
    switch (dtype) {
    case NEMO_F32: { float f = (float)v; memcpy(bits, &f, 4); return 4; }
    case NEMO_F64: memcpy(bits, &v, 8); return 8;
    case NEMO_BF16: *bits = nemo_cuda_f32_to_bf16((float)v); return 2;
    case NEMO_F16: *bits = nemo_cuda_f32_to_f16((float)v); return 2;
    case NEMO_I64: { int64_t i = (int64_t)v; memcpy(bits, &i, 8); return 8; }
    case NEMO_I32: { int32_t i = (int32_t)v; uint32_t u; memcpy(&u, &i, 4); *bits = u; return 4; }
    case NEMO_BOOL: *bits = v != 0.0; return 1;
    default: return 0;
    }
}

#endif /* NEMO_CUDA_COMMON_CUH */
