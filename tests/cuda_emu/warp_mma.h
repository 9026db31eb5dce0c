/*
 * tests/cuda_emu/warp_mma.h: one warp's mma.sync.aligned.m16n8k16.row.col with float32
 * accumulators, carried out on the CPU for the two emulators (tests/cuda_emu/emu.cc and
 * tests/c/test_flash_emu.cc). Lane is any struct with the lane's registers as the PTX ISA lays
 * them out (lane = 4 g + t): `e` (0 bf16, 1 f16 operands), `a[4]` and `b[2]` (two 16-bit
 * elements per word, low half first) and `d[4]` (accumulators in, results out). The products
 * are summed in float32 in k order.
 */
#ifndef NEMO_CUDA_EMU_WARP_MMA_H
#define NEMO_CUDA_EMU_WARP_MMA_H
#include <stdint.h>
#include <string.h>

static inline float nemo_emu_half_elem(int e, uint32_t word, int hi) {
    const uint16_t h = (uint16_t)(word >> (hi ? 16 : 0));
    if (e == 0) {
        const uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

template <class Lane> static void nemo_emu_warp_mma(Lane *w) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4, e = w[l].e;
        for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = nemo_emu_half_elem(e, w[l].a[0], h);
            A[g + 8][2 * t + h] = nemo_emu_half_elem(e, w[l].a[1], h);
            A[g][2 * t + 8 + h] = nemo_emu_half_elem(e, w[l].a[2], h);
            A[g + 8][2 * t + 8 + h] = nemo_emu_half_elem(e, w[l].a[3], h);
            B[2 * t + h][g] = nemo_emu_half_elem(e, w[l].b[0], h);
            B[2 * t + 8 + h][g] = nemo_emu_half_elem(e, w[l].b[1], h);
            C[g][2 * t + h] = w[l].d[h];
            C[g + 8][2 * t + h] = w[l].d[2 + h];
        }
    }
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 8; j++) {
            float acc = C[i][j];
            for (int k = 0; k < 16; k++) acc += A[i][k] * B[k][j];
            C[i][j] = acc;
        }
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; h++) {
            w[l].d[h] = C[g][2 * t + h];
            w[l].d[2 + h] = C[g + 8][2 * t + h];
        }
    }
}
#endif
