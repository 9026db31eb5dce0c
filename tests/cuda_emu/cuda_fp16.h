/* tests/cuda_emu/cuda_fp16.h: the float16 types and conversions kernels/cuda uses, for the
 * CUDA emulator (see cuda_runtime.h), through the compiler's _Float16 (round to nearest even). */
#ifndef NEMO_CUDA_EMU_FP16_H
#define NEMO_CUDA_EMU_FP16_H
#include "cuda_runtime.h"
struct __half { uint16_t x; };
struct __half2 { __half x, y; };
static inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    memcpy(&h.x, &v, 2);
    return h;
}
static inline float __half2float(__half h) {
    _Float16 v;
    memcpy(&v, &h.x, 2);
    return (float)v;
}
static inline __half __ushort_as_half(unsigned short u) { __half h = {u}; return h; }
static inline __half2 __floats2half2_rn(float lo, float hi) {
    __half2 r = {__float2half_rn(lo), __float2half_rn(hi)};
    return r;
}
#endif
