/*
 * tests/cuda_emu/warp_mma.h: the tensor-core instructions of the flash kernels, carried out on
 * the CPU for the two emulators (tests/cuda_emu/emu.cc and tests/c/test_flash_emu.cc), as the
 * PTX ISA defines them:
 *
 * - one warp's mma.sync.aligned.m16n8k16.row.col with float32 accumulators. Lane is any struct
 *   with the lane's registers as the PTX ISA lays them out (lane = 4 g + t): `e` (0 bf16, 1 f16
 *   operands), `a[4]` and `b[2]` (two 16-bit elements per word, low half first) and `d[4]`
 *   (accumulators in, results out). The products are summed in float32 in k order.
 * - one warp's ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives `lrow`, the
 *   address of row l % 8 of matrix l / 8 (16 bytes), and receives `lr[i]` of matrix i: row
 *   l / 4, columns 2 (l % 4) and 2 (l % 4) + 1, or with .trans (`ltrans`) column l / 4, rows
 *   2 (l % 4) and 2 (l % 4) + 1.
 * - one thread's cp.async of 16 bytes into shared memory with commit_group / wait_group
 *   (nemo_emu_cp_queue): the bytes land when the thread waits for their group, and the
 *   destination holds 0xff bytes (NaN) from the issue until then, so a read that does not wait,
 *   or that another thread makes before the barrier after the wait, sees NaN.
 */
#ifndef NEMO_CUDA_EMU_WARP_MMA_H
#define NEMO_CUDA_EMU_WARP_MMA_H
#include <stdint.h>
#include <string.h>

#include <deque>
#include <vector>

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

/* -1 when every row address is 16-byte aligned, else the first lane whose is not. */
template <class Lane> static int nemo_emu_warp_ldsm(Lane *w) {
    for (int l = 0; l < 32; l++)
        if ((uintptr_t)w[l].lrow % 16) return l;
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; i++) {
            uint16_t lo, hi;
            if (w[0].ltrans) {
                lo = w[8 * i + 2 * t].lrow[g];
                hi = w[8 * i + 2 * t + 1].lrow[g];
            } else {
                lo = w[8 * i + g].lrow[2 * t];
                hi = w[8 * i + g].lrow[2 * t + 1];
            }
            w[l].lr[i] = (uint32_t)lo | (uint32_t)hi << 16;
        }
    }
    return -1;
}

/* One thread's outstanding cp.async copies. */
struct nemo_emu_cp_queue {
    struct copy {
        void *dst;
        const void *src;
        int n;   /* bytes read from src; the rest of the 16 are zeros */
    };
    std::vector<copy> open;                 /* issued since the last commit */
    std::deque<std::vector<copy>> groups;   /* committed, oldest first */
    void issue(void *dst, const void *src, int n) {
        memset(dst, 0xff, 16);
        open.push_back(copy{dst, src, n});
    }
    void commit() {
        groups.push_back(open);
        open.clear();
    }
    /* cp.async.wait_group n: all but the n newest committed groups land */
    void wait(int n) {
        while ((int)groups.size() > n) {
            for (const copy &c : groups.front()) {
                memset(c.dst, 0, 16);
                if (c.n) memcpy(c.dst, c.src, (size_t)c.n);
            }
            groups.pop_front();
        }
    }
    void clear() {
        open.clear();
        groups.clear();
    }
};
#endif
