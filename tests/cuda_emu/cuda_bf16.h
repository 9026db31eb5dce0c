/* tests/cuda_emu/cuda_bf16.h: the bfloat16 types and conversions kernels/cuda uses, for the
 * CUDA emulator (see cuda_runtime.h). Rounding: to nearest even, as the intrinsics do. */
#ifndef NEMO_CUDA_EMU_BF16_H
#define NEMO_CUDA_EMU_BF16_H
#include "cuda_runtime.h"
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) h.x = (uint16_t)((u >> 16) | 0x40u);   /* quiet NaN */
    else h.x = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return h;
}
static inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.x << 16); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    __nv_bfloat162 r = {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
    return r;
}
#endif
