/*
 * kernels/cuda/flash.cuh: fused ("flash") attention on tensor cores for bfloat16 / float16 query,
 * key and value with head dim 64 or 128, forward and backward. Launched by
 * kernels/cuda/attention.cu ("sdpa_flash_fwd", "sdpa_flash_bwd"); the same source also runs on
 * the CPU under tests/c/test_flash_emu.cc, which executes the 128 threads of a block in lockstep
 * and carries out each warp's mma and shuffles itself, so that the indexing is tested in CI.
 *
 *   forward   one block per (64 query rows, batch-head pair); each warp owns 16 rows and walks
 *             the keys in tiles of 64: S = Q K^T (mma), online softmax in float32 (running max
 *             and sum per row, in log2 units), O = O * alpha + P V with P rounded to the input
 *             type; O and lse = log(sum exp(scale S)) written at the end.
 *   backward  three deterministic kernels, no atomics: Dv = rowsum(dO * O); one block per 64
 *             keys accumulates dV += P^T dO and dK += scale dS^T Q over all query tiles; one
 *             block per 64 query rows accumulates dQ += scale dS K over all key tiles, where
 *             P = exp(scale S - lse) and dS = P * (dO V^T - Dv) are recomputed in each.
 *
 * Layout (mma.m16n8k16, row.col, float32 accumulators): lane = 4 g + t. An A fragment (16 x 16)
 * holds rows g and g + 8 at columns 2t, 2t + 1 and 2t + 8, 2t + 9; a B fragment (16 x 8, k x n)
 * holds column g at rows 2t, 2t + 1, 2t + 8, 2t + 9; an accumulator (16 x 8) holds rows g and
 * g + 8 at columns 2t, 2t + 1. Two accumulator tiles side by side are therefore an A fragment
 * once rounded (P and dS never leave registers). A B operand is read from shared memory where
 * its k index is contiguous: K and dO row-major for Q K^T and dO V^T, V / Q / dO / K transposed
 * (d-major) where the product runs over keys or queries. Rows are padded by 8 elements, which
 * keeps the 32-bit fragment reads free of bank conflicts.
 *
 * Non-obvious rules
 * - Every thread of a block passes the same sequence of barriers, shuffles and mma: causal
 *   masking and the tails of Sq / Sk change values (-inf, zeros), never control flow inside a
 *   tile loop, and the loops' bounds are per block. The emulator checks this.
 * - The global operands must be 16-byte aligned with rows and (batch, head) strides that are
 *   multiples of 8 elements, last dim contiguous (the launcher checks; the front-end copies an
 *   operand that is not). Rows past Sq / Sk are read as zeros and never written.
 * - Queries see keys j <= i when causal (top-left aligned, as the CPU kernel and PyTorch).
 *   A row that sees no key would give zeros and lse = -inf; the front-end only sends Sk > 0.
 *
 * The includer defines: FL_GLOBAL and FL_DEV (qualifiers), FL_TID, FL_BX, FL_BY, FL_GY
 * (threadIdx.x, blockIdx.x, blockIdx.y, gridDim.y), FL_SMEM (the block's dynamic shared memory,
 * 16-byte aligned), FL_UNROLL, fl_sync(), fl_shfl_xor(float, int), fl_exp2, fl_log2,
 * fl_mma<E>(float d[4], const uint32_t a[4], const uint32_t b[2]) (d += a b),
 * fl_pack<E>(float lo, float hi) (two values rounded to E, lo in the low half) and
 * fl_f32<E>(uint16_t). E: FL_BF16 or FL_F16.
 */
#ifndef NEMO_FLASH_CUH
#define NEMO_FLASH_CUH

#define FL_BF16 0
#define FL_F16 1
#define FL_W 4                 /* warps per block */
#define FL_T (32 * FL_W)       /* threads per block */
#define FL_MAXLEAD 6           /* (batch, head...) dims: NEMO_MAXDIM - 2 */
#define FL_LOG2E 1.4426950408889634f
#define FL_LN2 0.6931471805599453f

/* One operand: element 0 of pair 0, row stride, strides of the leading dims (elements). */
struct fl_mat {
    uint16_t *p;
    int64_t ld;
    int64_t ls[FL_MAXLEAD];
};
struct fl_args {
    int nlead, causal;
    int64_t lshape[FL_MAXLEAD];
    int64_t nbh, sq, sk;
    float scale, scale_log2;   /* scale, scale * log2(e) */
    fl_mat q, k, v, o, g, dq, dk, dv;
    float *lse;                /* (nbh, sq) dense */
    float *dvec;               /* (nbh, sq) dense: rowsum(dO * O), backward only */
};

struct alignas(16) fl_v4 {
    uint32_t x, y, z, w;
};

/* Shared memory of each kernel, in bytes (the launcher opts in above 48 KiB). */
template <int D> constexpr int fl_fwd_smem() { return 2 * (64 * (D + 8) * 2 + D * (64 + 8)); }
template <int D> struct fl_tile { static constexpr int bq = D > 64 ? 32 : 64; };   /* inner tile of the backward */
template <int D> constexpr int fl_dkdv_smem() {
    return 2 * (2 * 64 * (D + 8) + 2 * fl_tile<D>::bq * (D + 8) + 2 * D * (fl_tile<D>::bq + 8)) + 2 * 4 * fl_tile<D>::bq;
}
template <int D> constexpr int fl_dq_smem() {
    return 2 * (2 * 64 * (D + 8) + 2 * fl_tile<D>::bq * (D + 8) + D * (fl_tile<D>::bq + 8));
}

FL_DEV int64_t fl_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* Pair bh's element 0 of operand m. */
FL_DEV uint16_t *fl_pair(const fl_args &A, const fl_mat &m, int64_t bh) {
    int64_t off = 0;
    for (int d = A.nlead - 1; d >= 0; d--) {
        const int64_t i = bh % A.lshape[d];
        bh /= A.lshape[d];
        off += i * m.ls[d];
    }
    return m.p + off;
}

/* Rows [r0, r0 + R) of an (n, D) operand (row stride ld) into shared memory: row-major into s
 * (row stride SD) and / or transposed into st (st[d * ST + r]); zeros past row n. Consecutive
 * threads take consecutive rows, so the transposed 16-bit stores hit consecutive addresses. */
template <int R, int D, int SD, int ST>
FL_DEV void fl_load(uint16_t *s, uint16_t *st, const uint16_t *src, int64_t ld, int64_t r0, int64_t n) {
    constexpr int CH = D / 8;
    for (int c = FL_TID; c < R * CH; c += FL_T) {
        const int r = c % R, cc = c / R;
        fl_v4 v = {0u, 0u, 0u, 0u};
        if (r0 + r < n) v = *(const fl_v4 *)(src + (r0 + r) * ld + cc * 8);
        if (s) *(fl_v4 *)(s + r * SD + cc * 8) = v;
        if (st) {
            const uint32_t w4[4] = {v.x, v.y, v.z, v.w};
            FL_UNROLL
            for (int j = 0; j < 8; j++) st[(cc * 8 + j) * ST + r] = (uint16_t)(w4[j / 2] >> (16 * (j % 2)));
        }
    }
}

FL_DEV uint32_t fl_ld32(const uint16_t *p) { return *(const uint32_t *)p; }
/* A fragment: rows r0.. r0 + 15, columns c0 .. c0 + 15 of s (row stride SD). */
template <int SD>
FL_DEV void fl_frag_a(uint32_t a[4], const uint16_t *s, int r0, int c0, int g, int t) {
    a[0] = fl_ld32(s + (r0 + g) * SD + c0 + 2 * t);
    a[1] = fl_ld32(s + (r0 + g + 8) * SD + c0 + 2 * t);
    a[2] = fl_ld32(s + (r0 + g) * SD + c0 + 8 + 2 * t);
    a[3] = fl_ld32(s + (r0 + g + 8) * SD + c0 + 8 + 2 * t);
}
/* B fragment with B[k][n] = s[(n0 + n) * SD + k0 + k]. */
template <int SD>
FL_DEV void fl_frag_b(uint32_t b[2], const uint16_t *s, int n0, int k0, int g, int t) {
    b[0] = fl_ld32(s + (n0 + g) * SD + k0 + 2 * t);
    b[1] = fl_ld32(s + (n0 + g) * SD + k0 + 8 + 2 * t);
}
/* A fragment from two accumulator tiles (columns 0-7 in c0, 8-15 in c1), rounded to E. */
template <int E>
FL_DEV void fl_frag_acc(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = fl_pack<E>(c0[0], c0[1]);
    a[1] = fl_pack<E>(c0[2], c0[3]);
    a[2] = fl_pack<E>(c1[0], c1[1]);
    a[3] = fl_pack<E>(c1[2], c1[3]);
}
/* Rows r and r + 8 (accumulator layout) of an (n, D) operand: x scale, rounded, stored. */
template <int D, int E>
FL_DEV void fl_store_rows(uint16_t *dst, int64_t ld, int64_t n, int64_t r, int t, const float acc[][4], float s0,
                          float s1) {
    FL_UNROLL
    for (int dn = 0; dn < D / 8; dn++) {
        const int c = dn * 8 + 2 * t;
        if (r < n) *(uint32_t *)(dst + r * ld + c) = fl_pack<E>(acc[dn][0] * s0, acc[dn][1] * s0);
        if (r + 8 < n) *(uint32_t *)(dst + (r + 8) * ld + c) = fl_pack<E>(acc[dn][2] * s1, acc[dn][3] * s1);
    }
}

/* The backward's two products over the head dim, for this warp's 16 rows (w): acc1 = A1 B1^T and
 * acc2 = A2 B2^T (zeroed first), A1 / A2 16 rows of a1 / a2 and B1 / B2 N rows of b1 / b2, all
 * row-major with row stride SD: S and dP (dK/dV kernel: K, V against Q, dO; dQ kernel: Q, dO
 * against K, V). */
template <int N, int D, int E, int SD>
FL_DEV void fl_two_products(float (*acc1)[4], float (*acc2)[4], const uint16_t *a1, const uint16_t *a2,
                            const uint16_t *b1, const uint16_t *b2, int w, int g, int t) {
    FL_UNROLL
    for (int j = 0; j < N / 8; j++)
        FL_UNROLL
        for (int e = 0; e < 4; e++) acc1[j][e] = acc2[j][e] = 0.f;
    FL_UNROLL
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t fa1[4], fa2[4];
        fl_frag_a<SD>(fa1, a1, w * 16, kk * 16, g, t);
        fl_frag_a<SD>(fa2, a2, w * 16, kk * 16, g, t);
        FL_UNROLL
        for (int j = 0; j < N / 8; j++) {
            uint32_t fb[2];
            fl_frag_b<SD>(fb, b1, j * 8, kk * 16, g, t);
            fl_mma<E>(acc1[j], fa1, fb);
            fl_frag_b<SD>(fb, b2, j * 8, kk * 16, g, t);
            fl_mma<E>(acc2[j], fa2, fb);
        }
    }
}

/* ==== Forward ==== */

template <int D, int E>
FL_GLOBAL void fl_fwd_k(const fl_args A) {
    constexpr int BR = 64, BC = 64, SD = D + 8, SV = BC + 8;
    uint16_t *sQ = (uint16_t *)FL_SMEM, *sK = sQ + BR * SD, *sVt = sK + BC * SD;
    const int tid = FL_TID, w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
    const int64_t bh = FL_BX, q0 = (A.causal ? FL_GY - 1 - FL_BY : FL_BY) * BR;   /* causal: long rows first */
    const uint16_t *K = fl_pair(A, A.k, bh), *V = fl_pair(A, A.v, bh);
    fl_load<BR, D, SD, 1>(sQ, nullptr, fl_pair(A, A.q, bh), A.q.ld, q0, A.sq);
    fl_sync();
    uint32_t qa[D / 16][4];
    FL_UNROLL
    for (int kk = 0; kk < D / 16; kk++) fl_frag_a<SD>(qa[kk], sQ, w * 16, kk * 16, g, t);
    float o[D / 8][4];
    FL_UNROLL
    for (int dn = 0; dn < D / 8; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const int64_t r0 = q0 + w * 16 + g, r1 = r0 + 8;
    const int64_t kend = A.causal ? fl_min(A.sk, q0 + BR) : A.sk;
    for (int64_t k0 = 0; k0 < kend; k0 += BC) {
        fl_sync();   /* every warp is done with the previous tile */
        fl_load<BC, D, SD, 1>(sK, nullptr, K, A.k.ld, k0, A.sk);
        fl_load<BC, D, 1, SV>(nullptr, sVt, V, A.v.ld, k0, A.sk);
        fl_sync();
        float s[BC / 8][4];
        FL_UNROLL
        for (int j = 0; j < BC / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        FL_UNROLL
        for (int kk = 0; kk < D / 16; kk++) {
            FL_UNROLL
            for (int j = 0; j < BC / 8; j++) {
                uint32_t b[2];
                fl_frag_b<SD>(b, sK, j * 8, kk * 16, g, t);
                fl_mma<E>(s[j], qa[kk], b);
            }
        }
        /* scaled scores in log2 units, masked, and the tile's row maxima */
        float x0 = -INFINITY, x1 = -INFINITY;
        FL_UNROLL
        for (int j = 0; j < BC / 8; j++) {
            FL_UNROLL
            for (int e = 0; e < 4; e++) {
                const int64_t col = k0 + j * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                float x = s[j][e] * A.scale_log2;
                if (col >= A.sk || (A.causal && col > row)) x = -INFINITY;
                s[j][e] = x;
                if (e < 2) x0 = fmaxf(x0, x);
                else x1 = fmaxf(x1, x);
            }
        }
        x0 = fmaxf(x0, fl_shfl_xor(x0, 1));
        x0 = fmaxf(x0, fl_shfl_xor(x0, 2));
        x1 = fmaxf(x1, fl_shfl_xor(x1, 1));
        x1 = fmaxf(x1, fl_shfl_xor(x1, 2));
        const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
        const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
        const float al0 = fl_exp2(m0 - b0), al1 = fl_exp2(m1 - b1);
        m0 = n0;
        m1 = n1;
        float rs0 = 0.f, rs1 = 0.f;
        FL_UNROLL
        for (int j = 0; j < BC / 8; j++) {
            s[j][0] = fl_exp2(s[j][0] - b0);
            s[j][1] = fl_exp2(s[j][1] - b0);
            s[j][2] = fl_exp2(s[j][2] - b1);
            s[j][3] = fl_exp2(s[j][3] - b1);
            rs0 += s[j][0] + s[j][1];
            rs1 += s[j][2] + s[j][3];
        }
        l0 = l0 * al0 + rs0;   /* this thread's part of the row sums; added across the 4 at the end */
        l1 = l1 * al1 + rs1;
        FL_UNROLL
        for (int dn = 0; dn < D / 8; dn++) {
            o[dn][0] *= al0;
            o[dn][1] *= al0;
            o[dn][2] *= al1;
            o[dn][3] *= al1;
        }
        FL_UNROLL
        for (int kq = 0; kq < BC / 16; kq++) {
            uint32_t pa[4];
            fl_frag_acc<E>(pa, s[2 * kq], s[2 * kq + 1]);
            FL_UNROLL
            for (int dn = 0; dn < D / 8; dn++) {
                uint32_t b[2];
                fl_frag_b<SV>(b, sVt, dn * 8, kq * 16, g, t);
                fl_mma<E>(o[dn], pa, b);
            }
        }
    }
    l0 += fl_shfl_xor(l0, 1);
    l0 += fl_shfl_xor(l0, 2);
    l1 += fl_shfl_xor(l1, 1);
    l1 += fl_shfl_xor(l1, 2);
    fl_store_rows<D, E>(fl_pair(A, A.o, bh), A.o.ld, A.sq, r0, t, o, l0 > 0.f ? 1.f / l0 : 0.f,
                        l1 > 0.f ? 1.f / l1 : 0.f);
    if (t == 0) {
        if (r0 < A.sq) A.lse[bh * A.sq + r0] = l0 > 0.f ? (m0 + fl_log2(l0)) * FL_LN2 : -INFINITY;
        if (r1 < A.sq) A.lse[bh * A.sq + r1] = l1 > 0.f ? (m1 + fl_log2(l1)) * FL_LN2 : -INFINITY;
    }
}

/* ==== Backward ==== */

/* dvec = rowsum(dO * O) in float32, one warp per row (fixed per-lane order, then a butterfly).
 * Every warp of a block runs the same number of iterations; past the last row it only shuffles. */
template <int D, int E>
FL_GLOBAL void fl_bwd_pre_k(const fl_args A) {
    const int w = FL_TID / 32, lane = FL_TID % 32;
    const int64_t rows = A.nbh * A.sq;
    for (int64_t row0 = FL_BX * FL_W; row0 < rows; row0 += FL_GX * FL_W) {
        const int64_t row = row0 + w;
        float acc = 0.f;
        if (row < rows) {
            const int64_t bh = row / A.sq, i = row % A.sq;
            const uint16_t *go = fl_pair(A, A.g, bh) + i * A.g.ld, *oo = fl_pair(A, A.o, bh) + i * A.o.ld;
            for (int c = 2 * lane; c < D; c += 64) {
                const uint32_t gv = fl_ld32(go + c), ov = fl_ld32(oo + c);
                acc += fl_f32<E>((uint16_t)gv) * fl_f32<E>((uint16_t)ov);
                acc += fl_f32<E>((uint16_t)(gv >> 16)) * fl_f32<E>((uint16_t)(ov >> 16));
            }
        }
        FL_UNROLL
        for (int m = 16; m >= 1; m /= 2) acc += fl_shfl_xor(acc, m);
        if (lane == 0 && row < rows) A.dvec[row] = acc;
    }
}

/* dK and dV for 64 keys of one pair (each warp: 16 keys), over the query tiles that see them. */
template <int D, int E>
FL_GLOBAL void fl_bwd_dkdv_k(const fl_args A) {
    constexpr int BC = 64, BQ = fl_tile<D>::bq, SD = D + 8, ST = BQ + 8;
    uint16_t *sK = (uint16_t *)FL_SMEM, *sV = sK + BC * SD, *sQ = sV + BC * SD, *sdO = sQ + BQ * SD;
    uint16_t *sQt = sdO + BQ * SD, *sdOt = sQt + D * ST;
    float *sL = (float *)(sdOt + D * ST), *sDv = sL + BQ;
    const int tid = FL_TID, w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
    const int64_t bh = FL_BX, k0 = FL_BY * BC;
    const uint16_t *Q = fl_pair(A, A.q, bh), *G = fl_pair(A, A.g, bh);
    fl_load<BC, D, SD, 1>(sK, nullptr, fl_pair(A, A.k, bh), A.k.ld, k0, A.sk);
    fl_load<BC, D, SD, 1>(sV, nullptr, fl_pair(A, A.v, bh), A.v.ld, k0, A.sk);
    float dk[D / 8][4], dv[D / 8][4];
    FL_UNROLL
    for (int dn = 0; dn < D / 8; dn++)
        FL_UNROLL
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.f;
    const int64_t kr0 = k0 + w * 16 + g, kr1 = kr0 + 8;
    for (int64_t q0 = A.causal ? k0 / BQ * BQ : 0; q0 < A.sq; q0 += BQ) {
        fl_sync();
        fl_load<BQ, D, SD, ST>(sQ, sQt, Q, A.q.ld, q0, A.sq);
        fl_load<BQ, D, SD, ST>(sdO, sdOt, G, A.g.ld, q0, A.sq);
        for (int i = tid; i < BQ; i += FL_T) {
            const int64_t q = q0 + i;
            sL[i] = q < A.sq ? A.lse[bh * A.sq + q] * FL_LOG2E : INFINITY;   /* +inf: P = 0 past Sq */
            sDv[i] = q < A.sq ? A.dvec[bh * A.sq + q] : 0.f;
        }
        fl_sync();
        /* S^T = K Q^T and dP^T = V dO^T, then P^T and dS^T */
        float st[BQ / 8][4], dp[BQ / 8][4];
        fl_two_products<BQ, D, E, SD>(st, dp, sK, sV, sQ, sdO, w, g, t);
        FL_UNROLL
        for (int j = 0; j < BQ / 8; j++) {
            FL_UNROLL
            for (int e = 0; e < 4; e++) {
                const int qi = j * 8 + 2 * t + (e & 1);
                const int64_t key = e < 2 ? kr0 : kr1;
                float p = fl_exp2(st[j][e] * A.scale_log2 - sL[qi]);
                if (key >= A.sk || (A.causal && key > q0 + qi)) p = 0.f;   /* rows past Sk: never stored */
                st[j][e] = p;
                dp[j][e] = p * (dp[j][e] - sDv[qi]);   /* dS^T */
            }
        }
        FL_UNROLL
        for (int kq = 0; kq < BQ / 16; kq++) {
            uint32_t pa[4], da[4];
            fl_frag_acc<E>(pa, st[2 * kq], st[2 * kq + 1]);
            fl_frag_acc<E>(da, dp[2 * kq], dp[2 * kq + 1]);
            FL_UNROLL
            for (int dn = 0; dn < D / 8; dn++) {
                uint32_t b[2];
                fl_frag_b<ST>(b, sdOt, dn * 8, kq * 16, g, t);
                fl_mma<E>(dv[dn], pa, b);   /* dV += P^T dO */
                fl_frag_b<ST>(b, sQt, dn * 8, kq * 16, g, t);
                fl_mma<E>(dk[dn], da, b);   /* dK += dS^T Q */
            }
        }
    }
    fl_store_rows<D, E>(fl_pair(A, A.dk, bh), A.dk.ld, A.sk, kr0, t, dk, A.scale, A.scale);
    fl_store_rows<D, E>(fl_pair(A, A.dv, bh), A.dv.ld, A.sk, kr0, t, dv, 1.f, 1.f);
}

/* dQ for 64 query rows of one pair (each warp: 16 rows), over the key tiles they see. */
template <int D, int E>
FL_GLOBAL void fl_bwd_dq_k(const fl_args A) {
    constexpr int BR = 64, BK = fl_tile<D>::bq, SD = D + 8, ST = BK + 8;
    uint16_t *sQ = (uint16_t *)FL_SMEM, *sdO = sQ + BR * SD, *sK = sdO + BR * SD, *sV = sK + BK * SD;
    uint16_t *sKt = sV + BK * SD;
    const int tid = FL_TID, w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
    const int64_t bh = FL_BX, q0 = (A.causal ? FL_GY - 1 - FL_BY : FL_BY) * BR;
    const uint16_t *K = fl_pair(A, A.k, bh), *V = fl_pair(A, A.v, bh);
    fl_load<BR, D, SD, 1>(sQ, nullptr, fl_pair(A, A.q, bh), A.q.ld, q0, A.sq);
    fl_load<BR, D, SD, 1>(sdO, nullptr, fl_pair(A, A.g, bh), A.g.ld, q0, A.sq);
    const int64_t r0 = q0 + w * 16 + g, r1 = r0 + 8;
    const float L0 = r0 < A.sq ? A.lse[bh * A.sq + r0] * FL_LOG2E : INFINITY;
    const float L1 = r1 < A.sq ? A.lse[bh * A.sq + r1] * FL_LOG2E : INFINITY;
    const float D0 = r0 < A.sq ? A.dvec[bh * A.sq + r0] : 0.f, D1 = r1 < A.sq ? A.dvec[bh * A.sq + r1] : 0.f;
    float dq[D / 8][4];
    FL_UNROLL
    for (int dn = 0; dn < D / 8; dn++) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;
    const int64_t kend = A.causal ? fl_min(A.sk, q0 + BR) : A.sk;
    for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        fl_sync();
        fl_load<BK, D, SD, ST>(sK, sKt, K, A.k.ld, k0, A.sk);
        fl_load<BK, D, SD, 1>(sV, nullptr, V, A.v.ld, k0, A.sk);
        fl_sync();
        float s[BK / 8][4], dp[BK / 8][4];
        fl_two_products<BK, D, E, SD>(s, dp, sQ, sdO, sK, sV, w, g, t);   /* S = Q K^T, dP = dO V^T */
        FL_UNROLL
        for (int j = 0; j < BK / 8; j++) {
            FL_UNROLL
            for (int e = 0; e < 4; e++) {
                const int64_t key = k0 + j * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                const float p = (key >= A.sk || (A.causal && key > row))
                                    ? 0.f : fl_exp2(s[j][e] * A.scale_log2 - (e < 2 ? L0 : L1));
                s[j][e] = p * (dp[j][e] - (e < 2 ? D0 : D1));   /* dS */
            }
        }
        FL_UNROLL
        for (int kq = 0; kq < BK / 16; kq++) {
            uint32_t da[4];
            fl_frag_acc<E>(da, s[2 * kq], s[2 * kq + 1]);
            FL_UNROLL
            for (int dn = 0; dn < D / 8; dn++) {
                uint32_t b[2];
                fl_frag_b<ST>(b, sKt, dn * 8, kq * 16, g, t);
                fl_mma<E>(dq[dn], da, b);   /* dQ += dS K */
            }
        }
    }
    fl_store_rows<D, E>(fl_pair(A, A.dq, bh), A.dq.ld, A.sq, r0, t, dq, A.scale, A.scale);
}

#endif
