/*
 * kernels/cuda/flash.cuh: fused ("flash") attention on tensor cores for bfloat16 / float16 query,
 * key and value with head dim 64 or 128, forward and backward. Launched by
 * kernels/cuda/attention.cu ("sdpa_flash_fwd", "sdpa_flash_bwd"); the same source also runs on
 * the CPU under tests/c/test_flash_emu.cc, which executes the 128 threads of a block in lockstep
 * and carries out each warp's mma, ldmatrix and shuffles itself, so that the indexing is tested
 * in CI.
 *
 *   forward   one block per (64 MT query rows, batch-head pair), MT = 1 or 2; each warp owns
 *             16 MT rows and walks the keys in tiles of 64: S = Q K^T (mma), online softmax in
 *             float32 (running max and sum per row, in log2 units), O = O * alpha + P V with P
 *             rounded to the input type; O and lse = log(sum exp(scale S)) written at the end.
 *             MT = 2 reads each K / V fragment once for two row tiles (half the shared-memory
 *             traffic per mma); MT = 1 keeps Q in registers.
 *   backward  three deterministic kernels, no atomics: Dv = rowsum(dO * O); one block per 64
 *             keys accumulates dV += P^T dO and dK += scale dS^T Q over all query tiles; one
 *             block per 64 query rows accumulates dQ += scale dS K over all key tiles, where
 *             P = exp(scale S - lse) and dS = P * (dO V^T - Dv) are recomputed in each. Two
 *             versions: 16 keys (queries) a warp with P and dS in registers, and 32 x 32 warp
 *             tiles with P and dS staged in shared memory (fl_bwd_dkdv32_k, fl_bwd_dq32_k).
 *   The launcher picks the family (MT = 2 and the 32-row backward by default).
 *
 * Layout (mma.m16n8k16, row.col, float32 accumulators): lane = 4 g + t. An A fragment (16 x 16)
 * holds rows g and g + 8 at columns 2t, 2t + 1 and 2t + 8, 2t + 9; a B fragment (16 x 8, k x n)
 * holds column g at rows 2t, 2t + 1, 2t + 8, 2t + 9; an accumulator (16 x 8) holds rows g and
 * g + 8 at columns 2t, 2t + 1. Two accumulator tiles side by side are therefore an A fragment
 * once rounded (P and dS never leave registers). Every operand sits in shared memory row-major
 * as it is in global memory (rows of D elements padded by 8, so the eight 16-byte rows of an
 * 8 x 8 matrix fall in different banks); fragments are read with ldmatrix.x4, transposing
 * (.trans) where the product runs over the rows: V in P V, dO and Q in P^T dO and dS^T Q, K in
 * dS K.
 *
 * Tiles move from global to shared memory with cp.async (16 bytes a thread, zero-filled past
 * Sq / Sk), overlapped with the products: the forward loads V_j during S = Q K_j^T and K_j+1
 * during P V_j (one buffer each); the 16-row backward kernels double-buffer the tiles they loop
 * over and load tile i + 1 while computing tile i; the 32-row ones keep one buffer each.
 *
 * Non-obvious rules
 * - Every thread of a block passes the same sequence of barriers, shuffles, ldmatrix and mma:
 *   causal masking and the tails of Sq / Sk change values (-inf, zeros), never control flow
 *   inside a tile loop, and the loops' bounds are per block. The emulator checks this.
 * - A thread's cp.async lands when the thread waits for its group; other threads see it only
 *   after the barrier that follows (fl_cp_wait<0>(); fl_sync();). A buffer is refilled only
 *   after a barrier that every reader of its previous contents has passed.
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
 * fl_ldsm<TRANS>(uint32_t r[4], const uint16_t *row) (ldmatrix.sync.aligned.m8n8.x4[.trans]
 * .shared.b16: lane l names row l % 8 of matrix l / 8 and receives r[i] of matrix i),
 * fl_cp16(uint16_t *dst, const uint16_t *src, bool full) (cp.async.cg of 16 bytes into shared
 * memory, zeros when !full), fl_cp_commit(), fl_cp_wait<N>() (cp.async.commit_group /
 * wait_group N), fl_pack<E>(float lo, float hi) (two values rounded to E, lo in the low half)
 * and fl_f32<E>(uint16_t). E: FL_BF16 or FL_F16.
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
template <int D, int MT> constexpr int fl_fwd_smem() { return 2 * (64 * MT + 2 * 64) * (D + 8); }   /* Q, K, V */
template <int D> struct fl_tile { static constexpr int bq = D > 64 ? 32 : 64; };   /* inner tile of the backward */
template <int D> constexpr int fl_dkdv_smem() {   /* K, V; two stages of Q, dO, lse, Dv */
    return 2 * (2 * 64 * (D + 8) + 2 * 2 * fl_tile<D>::bq * (D + 8)) + 2 * 2 * 4 * fl_tile<D>::bq;
}
template <int D> constexpr int fl_dq_smem() {   /* Q, dO; two stages of K, V */
    return 2 * (2 * 64 * (D + 8) + 2 * 2 * fl_tile<D>::bq * (D + 8));
}

/* The 32-row backward (fl_bwd_dkdv32_k, fl_bwd_dq32_k): 64-row operand tiles, P / dS staged
 * in shared memory (rows of 64 + 8). */
template <int D> constexpr int fl_dkdv32_smem() {   /* K, V, Q, dO; P^T, dS^T; lse, Dv */
    return 2 * (4 * 64 * (D + 8) + 2 * 64 * 72) + 2 * 4 * 64;
}
template <int D> constexpr int fl_dq32_smem() { return 2 * (4 * 64 * (D + 8) + 64 * 72); }   /* Q, dO, K, V; dS */

FL_DEV int64_t fl_min(int64_t a, int64_t b) { return a < b ? a : b; }
FL_DEV int64_t fl_max(int64_t a, int64_t b) { return a > b ? a : b; }
FL_DEV uint32_t fl_ld32(const uint16_t *p) { return *(const uint32_t *)p; }

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

/* Issues the cp.async of rows [r0, r0 + R) of an (n, D) operand (row stride ld) into s (row
 * stride D + 8), zeros past row n; the caller commits. Consecutive threads take consecutive
 * 16-byte chunks of a row. */
template <int R, int D>
FL_DEV void fl_load(uint16_t *s, const uint16_t *src, int64_t ld, int64_t r0, int64_t n) {
    constexpr int CH = D / 8;
    for (int c = FL_TID; c < R * CH; c += FL_T) {
        const int r = c / CH, cc = c % CH;
        const bool full = r0 + r < n;
        fl_cp16(s + r * (D + 8) + cc * 8, full ? src + (r0 + r) * ld + cc * 8 : src, full);
    }
}

/* A fragment: rows r0 .. r0 + 15, columns c0 .. c0 + 15 of s (row stride SD). */
template <int SD>
FL_DEV void fl_frag_a(uint32_t a[4], const uint16_t *s, int r0, int c0, int lane) {
    fl_ldsm<0>(a, s + (r0 + lane % 16) * SD + c0 + lane / 16 * 8);
}
/* B fragments of two n tiles, n0 .. n0 + 7 in b[0..1] and n0 + 8 .. n0 + 15 in b[2..3], over
 * k0 .. k0 + 15. TRANS 0: B[k][n] = s[(n0 + n) * SD + k0 + k] (k contiguous, as K in Q K^T);
 * TRANS 1: B[k][n] = s[(k0 + k) * SD + n0 + n] (n contiguous, as V in P V). */
template <int SD, int TRANS>
FL_DEV void fl_frag_b(uint32_t b[4], const uint16_t *s, int n0, int k0, int lane) {
    const int i = lane % 8, m = lane / 8;
    if (TRANS) fl_ldsm<1>(b, s + (k0 + i + m % 2 * 8) * SD + n0 + m / 2 * 8);
    else fl_ldsm<0>(b, s + (n0 + i + m / 2 * 8) * SD + k0 + m % 2 * 8);
}
/* A fragment from two accumulator tiles (columns 0-7 in c0, 8-15 in c1), rounded to E. */
template <int E>
FL_DEV void fl_frag_acc(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = fl_pack<E>(c0[0], c0[1]);
    a[1] = fl_pack<E>(c0[2], c0[3]);
    a[2] = fl_pack<E>(c1[0], c1[1]);
    a[3] = fl_pack<E>(c1[2], c1[3]);
}
/* acc[m][n] += a[m] B over k0 .. k0 + 15, for the M row tiles m and the 2 NP n tiles of B that
 * start at column n0 of the shared-memory operand s (read as fl_frag_b<SD, TRANS>): one ldmatrix
 * per pair of n tiles serves every row tile. */
template <int M, int NP, int SD, int TRANS, int E, int NA>
FL_DEV void fl_mma_b(float (*acc)[NA][4], const uint32_t (*a)[4], const uint16_t *s, int n0, int k0, int lane) {
    FL_UNROLL
    for (int j = 0; j < NP; j++) {
        uint32_t b[4];
        fl_frag_b<SD, TRANS>(b, s, n0 + 16 * j, k0, lane);
        FL_UNROLL
        for (int m = 0; m < M; m++) {
            fl_mma<E>(acc[m][2 * j], a[m], b);
            fl_mma<E>(acc[m][2 * j + 1], a[m], b + 2);
        }
    }
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

/* acc = A B^T (zeroed first) over the head dim, for MT 16-row tiles of A from row ar0 of a and
 * N rows of B from row br0 of b, both row-major with row stride D + 8: S and dP of the backward
 * (dK/dV kernels: K, V against Q, dO; dQ kernels: Q, dO against K, V). Each B fragment serves
 * the MT row tiles. */
template <int MT, int N, int D, int E>
FL_DEV void fl_product(float (*acc)[N / 8][4], const uint16_t *a, int ar0, const uint16_t *b, int br0, int lane) {
    constexpr int SD = D + 8;
    FL_UNROLL
    for (int m = 0; m < MT; m++)
        FL_UNROLL
        for (int j = 0; j < N / 8; j++)
            FL_UNROLL
            for (int e = 0; e < 4; e++) acc[m][j][e] = 0.f;
    FL_UNROLL
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t fa[MT][4];
        FL_UNROLL
        for (int m = 0; m < MT; m++) fl_frag_a<SD>(fa[m], a, ar0 + 16 * m, kk * 16, lane);
        fl_mma_b<MT, N / 16, SD, 0, E>(acc, fa, b, br0, kk * 16, lane);
    }
}

/* ==== Forward ==== */

template <int D, int E, int MT>
FL_GLOBAL void fl_fwd_k(const fl_args A) {
    constexpr int BR = 64 * MT, BC = 64, SD = D + 8;
    uint16_t *sQ = (uint16_t *)FL_SMEM, *sK = sQ + BR * SD, *sV = sK + BC * SD;
    const int tid = FL_TID, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t bh = FL_BX, q0 = (A.causal ? FL_GY - 1 - FL_BY : FL_BY) * BR;   /* causal: long rows first */
    const uint16_t *K = fl_pair(A, A.k, bh), *V = fl_pair(A, A.v, bh);
    const int64_t kend = A.causal ? fl_min(A.sk, q0 + BR) : A.sk;
    fl_load<BR, D>(sQ, fl_pair(A, A.q, bh), A.q.ld, q0, A.sq);
    fl_load<BC, D>(sK, K, A.k.ld, 0, A.sk);
    fl_cp_commit();
    uint32_t qa[MT == 1 ? D / 16 : 1][4];   /* MT = 1: this warp's Q fragments stay in registers */
    if (MT == 1) {
        fl_cp_wait<0>();
        fl_sync();
        FL_UNROLL
        for (int kk = 0; kk < (MT == 1 ? D / 16 : 0); kk++) fl_frag_a<SD>(qa[kk], sQ, w * 16, kk * 16, lane);
    }
    float o[MT][D / 8][4], m[MT][2], l[MT][2];
    FL_UNROLL
    for (int mt = 0; mt < MT; mt++) {
        FL_UNROLL
        for (int dn = 0; dn < D / 8; dn++) o[mt][dn][0] = o[mt][dn][1] = o[mt][dn][2] = o[mt][dn][3] = 0.f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const int64_t rw = q0 + w * 16 * MT + g;   /* row of m[0][0]; m[mt][h] is row rw + 16 mt + 8 h */
    for (int64_t k0 = 0; k0 < kend; k0 += BC) {
        fl_cp_wait<0>();
        fl_sync();   /* K_j is in; every warp is done with V_j-1 */
        fl_load<BC, D>(sV, V, A.v.ld, k0, A.sk);
        fl_cp_commit();
        float s[MT][BC / 8][4];
        FL_UNROLL
        for (int mt = 0; mt < MT; mt++)
            FL_UNROLL
            for (int j = 0; j < BC / 8; j++) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
        FL_UNROLL
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t qf[MT][4];
            FL_UNROLL
            for (int mt = 0; mt < MT; mt++) {
                if (MT == 1) {
                    FL_UNROLL
                    for (int e = 0; e < 4; e++) qf[mt][e] = qa[MT == 1 ? kk : 0][e];
                } else {
                    fl_frag_a<SD>(qf[mt], sQ, (w * MT + mt) * 16, kk * 16, lane);
                }
            }
            fl_mma_b<MT, BC / 16, SD, 0, E>(s, qf, sK, 0, kk * 16, lane);
        }
        /* columns c of the tile (key k0 + c) are kept when c < ncol and, causal, c <= diag +
         * (row - rw); small ints, so the masks below need no 64-bit registers */
        const int ncol = (int)fl_min(A.sk - k0, BC);
        const int diag = A.causal ? (int)fl_min(rw - k0, 2 * BC) : 2 * BC;   /* rw - k0 >= 64 - BR here */
        FL_UNROLL
        for (int mt = 0; mt < MT; mt++) {
            /* scaled scores in log2 units, masked, and the tile's row maxima */
            float x[2] = {-INFINITY, -INFINITY};
            FL_UNROLL
            for (int j = 0; j < BC / 8; j++) {
                FL_UNROLL
                for (int e = 0; e < 4; e++) {
                    const int c = j * 8 + 2 * t + (e & 1);
                    float v = s[mt][j][e] * A.scale_log2;
                    if (c >= ncol || c > diag + 16 * mt + 8 * (e >> 1)) v = -INFINITY;
                    s[mt][j][e] = v;
                    x[e >> 1] = fmaxf(x[e >> 1], v);
                }
            }
            float al[2];
            FL_UNROLL
            for (int h = 0; h < 2; h++) {
                x[h] = fmaxf(x[h], fl_shfl_xor(x[h], 1));
                x[h] = fmaxf(x[h], fl_shfl_xor(x[h], 2));
                const float n = fmaxf(m[mt][h], x[h]), base = n == -INFINITY ? 0.f : n;
                al[h] = fl_exp2(m[mt][h] - base);
                m[mt][h] = n;
                x[h] = base;
            }
            float rs[2] = {0.f, 0.f};
            FL_UNROLL
            for (int j = 0; j < BC / 8; j++) {
                FL_UNROLL
                for (int e = 0; e < 4; e++) {
                    s[mt][j][e] = fl_exp2(s[mt][j][e] - x[e >> 1]);
                    rs[e >> 1] += s[mt][j][e];
                }
            }
            FL_UNROLL
            for (int h = 0; h < 2; h++) l[mt][h] = l[mt][h] * al[h] + rs[h];   /* this thread's part; summed over the 4 at the end */
            FL_UNROLL
            for (int dn = 0; dn < D / 8; dn++) {
                o[mt][dn][0] *= al[0];
                o[mt][dn][1] *= al[0];
                o[mt][dn][2] *= al[1];
                o[mt][dn][3] *= al[1];
            }
        }
        fl_cp_wait<0>();
        fl_sync();   /* V_j is in; every warp is done with K_j */
        if (k0 + BC < kend) fl_load<BC, D>(sK, K, A.k.ld, k0 + BC, A.sk);
        fl_cp_commit();
        FL_UNROLL
        for (int kq = 0; kq < BC / 16; kq++) {
            uint32_t pa[MT][4];
            FL_UNROLL
            for (int mt = 0; mt < MT; mt++) fl_frag_acc<E>(pa[mt], s[mt][2 * kq], s[mt][2 * kq + 1]);
            fl_mma_b<MT, D / 16, SD, 1, E>(o, pa, sV, 0, kq * 16, lane);
        }
    }
    FL_UNROLL
    for (int mt = 0; mt < MT; mt++) {
        float inv[2];
        FL_UNROLL
        for (int h = 0; h < 2; h++) {
            l[mt][h] += fl_shfl_xor(l[mt][h], 1);
            l[mt][h] += fl_shfl_xor(l[mt][h], 2);
            inv[h] = l[mt][h] > 0.f ? 1.f / l[mt][h] : 0.f;
        }
        const int64_t r = rw + 16 * mt;
        fl_store_rows<D, E>(fl_pair(A, A.o, bh), A.o.ld, A.sq, r, t, o[mt], inv[0], inv[1]);
        if (t == 0) {
            FL_UNROLL
            for (int h = 0; h < 2; h++)
                if (r + 8 * h < A.sq)
                    A.lse[bh * A.sq + r + 8 * h] =
                        l[mt][h] > 0.f ? (m[mt][h] + fl_log2(l[mt][h])) * FL_LN2 : -INFINITY;
        }
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

/* dK and dV for 64 keys of one pair (each warp: 16 keys), over the query tiles that see them;
 * query tile i + 1 (Q, dO, lse, Dv) loads into the other stage while tile i is used. */
template <int D, int E>
FL_GLOBAL void fl_bwd_dkdv_k(const fl_args A) {
    constexpr int BC = 64, BQ = fl_tile<D>::bq, SD = D + 8;
    uint16_t *sK = (uint16_t *)FL_SMEM, *sV = sK + BC * SD, *sQ0 = sV + BC * SD;   /* stage s: sQ0 + 2 s BQ SD */
    float *sL0 = (float *)(sQ0 + 4 * BQ * SD);                                   /* stage s: lse at sL0 + 2 s BQ, Dv after */
    const int tid = FL_TID, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t bh = FL_BX, k0 = FL_BY * BC;
    const uint16_t *Q = fl_pair(A, A.q, bh), *G = fl_pair(A, A.g, bh);
    const int64_t qfirst = A.causal ? k0 / BQ * BQ : 0;
    fl_load<BC, D>(sK, fl_pair(A, A.k, bh), A.k.ld, k0, A.sk);
    fl_load<BC, D>(sV, fl_pair(A, A.v, bh), A.v.ld, k0, A.sk);
    float dk[D / 8][4], dv[D / 8][4];
    FL_UNROLL
    for (int dn = 0; dn < D / 8; dn++)
        FL_UNROLL
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.f;
    const int64_t kr0 = k0 + w * 16 + g;   /* this thread's first key (dK, dV rows kr0, kr0 + 8) */
    int st = 0;
    for (int64_t q0 = qfirst; q0 < A.sq + BQ; q0 += BQ, st ^= 1) {
        /* tile q0 into stage st (the pass with q0 = qfirst loads only; the others use stage st ^ 1) */
        if (q0 < A.sq) {
            uint16_t *sQ = sQ0 + 2 * st * BQ * SD;
            float *sL = sL0 + 2 * st * BQ;
            fl_load<BQ, D>(sQ, Q, A.q.ld, q0, A.sq);
            fl_load<BQ, D>(sQ + BQ * SD, G, A.g.ld, q0, A.sq);
            for (int i = tid; i < BQ; i += FL_T) {
                const int64_t q = q0 + i;
                sL[i] = q < A.sq ? A.lse[bh * A.sq + q] * FL_LOG2E : INFINITY;   /* +inf: P = 0 past Sq */
                sL[BQ + i] = q < A.sq ? A.dvec[bh * A.sq + q] : 0.f;
            }
        }
        fl_cp_commit();
        if (q0 == qfirst) {
            fl_cp_wait<0>();
            fl_sync();
            continue;
        }
        const int64_t qc = q0 - BQ;   /* the tile in stage st ^ 1 */
        const uint16_t *sQ = sQ0 + 2 * (st ^ 1) * BQ * SD, *sdO = sQ + BQ * SD;
        const float *sL = sL0 + 2 * (st ^ 1) * BQ, *sDv = sL + BQ;
        /* S^T = K Q^T and dP^T = V dO^T, then P^T and dS^T */
        float sp[1][BQ / 8][4], dp[1][BQ / 8][4];
        fl_product<1, BQ, D, E>(sp, sK, w * 16, sQ, 0, lane);
        fl_product<1, BQ, D, E>(dp, sV, w * 16, sdO, 0, lane);
        /* key k0 + kr (kr < 64) is kept when kr < nkey and, causal, kr + off <= qi: small ints */
        const int nkey = (int)fl_min(A.sk - k0, BC), off = A.causal ? (int)fl_max(k0 - qc, -2 * BC) : -2 * BC;
        FL_UNROLL
        for (int j = 0; j < BQ / 8; j++) {
            FL_UNROLL
            for (int e = 0; e < 4; e++) {
                const int qi = j * 8 + 2 * t + (e & 1), kr = w * 16 + g + 8 * (e >> 1);
                float p = fl_exp2(sp[0][j][e] * A.scale_log2 - sL[qi]);
                if (kr >= nkey || kr + off > qi) p = 0.f;   /* rows past Sk: never stored */
                sp[0][j][e] = p;
                dp[0][j][e] = p * (dp[0][j][e] - sDv[qi]);   /* dS^T */
            }
        }
        FL_UNROLL
        for (int kq = 0; kq < BQ / 16; kq++) {
            uint32_t pa[4], da[4];
            fl_frag_acc<E>(pa, sp[0][2 * kq], sp[0][2 * kq + 1]);
            fl_frag_acc<E>(da, dp[0][2 * kq], dp[0][2 * kq + 1]);
            fl_mma_b<1, D / 16, SD, 1, E>(&dv, &pa, sdO, 0, kq * 16, lane);   /* dV += P^T dO */
            fl_mma_b<1, D / 16, SD, 1, E>(&dk, &da, sQ, 0, kq * 16, lane);    /* dK += dS^T Q */
        }
        fl_cp_wait<0>();
        fl_sync();   /* tile q0 is in; every warp is done with stage st ^ 1 */
    }
    fl_store_rows<D, E>(fl_pair(A, A.dk, bh), A.dk.ld, A.sk, kr0, t, dk, A.scale, A.scale);
    fl_store_rows<D, E>(fl_pair(A, A.dv, bh), A.dv.ld, A.sk, kr0, t, dv, 1.f, 1.f);
}

/* dQ for 64 query rows of one pair (each warp: 16 rows), over the key tiles they see; key tile
 * i + 1 (K, V) loads into the other stage while tile i is used. */
template <int D, int E>
FL_GLOBAL void fl_bwd_dq_k(const fl_args A) {
    constexpr int BR = 64, BK = fl_tile<D>::bq, SD = D + 8;
    uint16_t *sQ = (uint16_t *)FL_SMEM, *sdO = sQ + BR * SD, *sK0 = sdO + BR * SD;   /* stage s: sK0 + 2 s BK SD */
    const int tid = FL_TID, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t bh = FL_BX, q0 = (A.causal ? FL_GY - 1 - FL_BY : FL_BY) * BR;
    const uint16_t *K = fl_pair(A, A.k, bh), *V = fl_pair(A, A.v, bh);
    fl_load<BR, D>(sQ, fl_pair(A, A.q, bh), A.q.ld, q0, A.sq);
    fl_load<BR, D>(sdO, fl_pair(A, A.g, bh), A.g.ld, q0, A.sq);
    const int64_t r0 = q0 + w * 16 + g, r1 = r0 + 8;
    const float L0 = r0 < A.sq ? A.lse[bh * A.sq + r0] * FL_LOG2E : INFINITY;
    const float L1 = r1 < A.sq ? A.lse[bh * A.sq + r1] * FL_LOG2E : INFINITY;
    const float D0 = r0 < A.sq ? A.dvec[bh * A.sq + r0] : 0.f, D1 = r1 < A.sq ? A.dvec[bh * A.sq + r1] : 0.f;
    float dq[D / 8][4];
    FL_UNROLL
    for (int dn = 0; dn < D / 8; dn++) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;
    const int64_t kend = A.causal ? fl_min(A.sk, q0 + BR) : A.sk;
    int st = 0;
    for (int64_t k0 = 0; k0 < kend + BK; k0 += BK, st ^= 1) {
        /* tile k0 into stage st (the pass with k0 = 0 loads only; the others use stage st ^ 1) */
        if (k0 < kend) {
            uint16_t *sK = sK0 + 2 * st * BK * SD;
            fl_load<BK, D>(sK, K, A.k.ld, k0, A.sk);
            fl_load<BK, D>(sK + BK * SD, V, A.v.ld, k0, A.sk);
        }
        fl_cp_commit();
        if (k0 == 0) {
            fl_cp_wait<0>();
            fl_sync();
            continue;
        }
        const int64_t kc = k0 - BK;   /* the tile in stage st ^ 1 */
        const uint16_t *sK = sK0 + 2 * (st ^ 1) * BK * SD, *sV = sK + BK * SD;
        float s[1][BK / 8][4], dp[1][BK / 8][4];
        fl_product<1, BK, D, E>(s, sQ, w * 16, sK, 0, lane);    /* S = Q K^T */
        fl_product<1, BK, D, E>(dp, sdO, w * 16, sV, 0, lane);  /* dP = dO V^T */
        FL_UNROLL
        for (int j = 0; j < BK / 8; j++) {
            FL_UNROLL
            for (int e = 0; e < 4; e++) {
                const int64_t key = kc + j * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                const float p = (key >= A.sk || (A.causal && key > row))
                                    ? 0.f : fl_exp2(s[0][j][e] * A.scale_log2 - (e < 2 ? L0 : L1));
                s[0][j][e] = p * (dp[0][j][e] - (e < 2 ? D0 : D1));   /* dS */
            }
        }
        FL_UNROLL
        for (int kq = 0; kq < BK / 16; kq++) {
            uint32_t da[4];
            fl_frag_acc<E>(da, s[0][2 * kq], s[0][2 * kq + 1]);
            fl_mma_b<1, D / 16, SD, 1, E>(&dq, &da, sK, 0, kq * 16, lane);   /* dQ += dS K */
        }
        fl_cp_wait<0>();
        fl_sync();   /* tile k0 is in; every warp is done with stage st ^ 1 */
    }
    fl_store_rows<D, E>(fl_pair(A, A.dq, bh), A.dq.ld, A.sq, r0, t, dq, A.scale, A.scale);
}

/* ==== Backward with 32 x 32 warp tiles (FlashAttention-2's layout) ====
 *
 * The kernels above give each warp 16 keys (dK dV) or 16 queries (dQ) and every operand
 * fragment serves one 16-row tile. These walk tiles of 64 and split each product 2 x 2 over the
 * warps, 32 x 32 (or 32 x D / 2) each, so each fragment read from shared memory serves two
 * row tiles: S and dP are computed per (32 rows, 32 columns), rounded P and dS go through
 * shared memory, and the products into dK, dV (dQ) take them back as A operands. About a
 * quarter fewer shared-memory bytes per mma; one buffer per operand (two blocks an SM). */

/* Rows [r, r + 16) of a 16 x N accumulator block (tiles of 8 columns from column c0), rounded to
 * E, into s (row stride SP). */
template <int N, int SP, int E>
FL_DEV void fl_stage(uint16_t *s, int r, int c0, int g, int t, const float (*acc)[4]) {
    FL_UNROLL
    for (int j = 0; j < N / 8; j++) {
        *(uint32_t *)(s + (r + g) * SP + c0 + j * 8 + 2 * t) = fl_pack<E>(acc[j][0], acc[j][1]);
        *(uint32_t *)(s + (r + g + 8) * SP + c0 + j * 8 + 2 * t) = fl_pack<E>(acc[j][2], acc[j][3]);
    }
}

/* dK and dV for 64 keys of one pair over query tiles of 64. Warp w: keys kh .. kh + 31
 * (kh = 32 (w / 2)); queries qh .. qh + 31 of the tile for S^T, dP^T (qh = 32 (w % 2)); head-dim
 * columns dh .. dh + D / 2 - 1 of dK, dV (dh = D / 2 (w % 2)). */
template <int D, int E>
FL_GLOBAL void fl_bwd_dkdv32_k(const fl_args A) {
    constexpr int BC = 64, BQ = 64, SD = D + 8, SP = BQ + 8, DH = D / 2;
    uint16_t *sK = (uint16_t *)FL_SMEM, *sV = sK + BC * SD, *sQ = sV + BC * SD, *sdO = sQ + BQ * SD;
    uint16_t *sP = sdO + BQ * SD, *sdS = sP + BC * SP;
    float *sL = (float *)(sdS + BC * SP), *sDv = sL + BQ;
    const int tid = FL_TID, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int kh = w / 2 * 32, qh = w % 2 * 32, dh = w % 2 * DH;
    const int64_t bh = FL_BX, k0 = FL_BY * BC;
    const uint16_t *Q = fl_pair(A, A.q, bh), *G = fl_pair(A, A.g, bh);
    fl_load<BC, D>(sK, fl_pair(A, A.k, bh), A.k.ld, k0, A.sk);
    fl_load<BC, D>(sV, fl_pair(A, A.v, bh), A.v.ld, k0, A.sk);
    float dk[2][DH / 8][4], dv[2][DH / 8][4];
    FL_UNROLL
    for (int m = 0; m < 2; m++)
        FL_UNROLL
        for (int dn = 0; dn < DH / 8; dn++)
            FL_UNROLL
            for (int e = 0; e < 4; e++) dk[m][dn][e] = dv[m][dn][e] = 0.f;
    for (int64_t q0 = A.causal ? k0 : 0; q0 < A.sq; q0 += BQ) {
        fl_sync();   /* every warp is done with the previous tile */
        fl_load<BQ, D>(sQ, Q, A.q.ld, q0, A.sq);
        fl_load<BQ, D>(sdO, G, A.g.ld, q0, A.sq);
        fl_cp_commit();
        for (int i = tid; i < BQ; i += FL_T) {
            const int64_t q = q0 + i;
            sL[i] = q < A.sq ? A.lse[bh * A.sq + q] * FL_LOG2E : INFINITY;   /* +inf: P = 0 past Sq */
            sDv[i] = q < A.sq ? A.dvec[bh * A.sq + q] : 0.f;
        }
        fl_cp_wait<0>();
        fl_sync();
        /* S^T = K Q^T and dP^T = V dO^T for this warp's 32 x 32, then P^T and dS^T, staged */
        float sp[2][4][4], dp[2][4][4];
        fl_product<2, 32, D, E>(sp, sK, kh, sQ, qh, lane);
        fl_product<2, 32, D, E>(dp, sV, kh, sdO, qh, lane);
        /* key k0 + kr (kr < 64) is kept when kr < nkey and, causal, kr + off <= qi: small ints */
        const int nkey = (int)fl_min(A.sk - k0, BC), off = A.causal ? (int)fl_max(k0 - q0, -2 * BQ) : -2 * BQ;
        FL_UNROLL
        for (int m = 0; m < 2; m++) {
            FL_UNROLL
            for (int j = 0; j < 4; j++) {
                FL_UNROLL
                for (int e = 0; e < 4; e++) {
                    const int qi = qh + j * 8 + 2 * t + (e & 1), kr = kh + 16 * m + g + 8 * (e >> 1);
                    float p = fl_exp2(sp[m][j][e] * A.scale_log2 - sL[qi]);
                    if (kr >= nkey || kr + off > qi) p = 0.f;   /* rows past Sk: never stored */
                    sp[m][j][e] = p;
                    dp[m][j][e] = p * (dp[m][j][e] - sDv[qi]);   /* dS^T */
                }
            }
            fl_stage<32, SP, E>(sP, kh + 16 * m, qh, g, t, sp[m]);
            fl_stage<32, SP, E>(sdS, kh + 16 * m, qh, g, t, dp[m]);
        }
        fl_sync();   /* P^T and dS^T of the whole tile are staged */
        FL_UNROLL
        for (int kq = 0; kq < BQ / 16; kq++) {
            uint32_t pa[2][4], da[2][4];
            FL_UNROLL
            for (int m = 0; m < 2; m++) {
                fl_frag_a<SP>(pa[m], sP, kh + 16 * m, kq * 16, lane);
                fl_frag_a<SP>(da[m], sdS, kh + 16 * m, kq * 16, lane);
            }
            fl_mma_b<2, DH / 16, SD, 1, E>(dv, pa, sdO, dh, kq * 16, lane);   /* dV += P^T dO */
            fl_mma_b<2, DH / 16, SD, 1, E>(dk, da, sQ, dh, kq * 16, lane);    /* dK += dS^T Q */
        }
    }
    FL_UNROLL
    for (int m = 0; m < 2; m++) {
        const int64_t r = k0 + kh + 16 * m + g;
        fl_store_rows<DH, E>(fl_pair(A, A.dk, bh) + dh, A.dk.ld, A.sk, r, t, dk[m], A.scale, A.scale);
        fl_store_rows<DH, E>(fl_pair(A, A.dv, bh) + dh, A.dv.ld, A.sk, r, t, dv[m], 1.f, 1.f);
    }
}

/* dQ for 64 query rows of one pair over key tiles of 64. Warp w: queries qh .. qh + 31
 * (qh = 32 (w / 2)); keys kh .. kh + 31 of the tile for S, dP (kh = 32 (w % 2)); head-dim
 * columns dh .. dh + D / 2 - 1 of dQ (dh = D / 2 (w % 2)). */
template <int D, int E>
FL_GLOBAL void fl_bwd_dq32_k(const fl_args A) {
    constexpr int BR = 64, BK = 64, SD = D + 8, SP = BK + 8, DH = D / 2;
    uint16_t *sQ = (uint16_t *)FL_SMEM, *sdO = sQ + BR * SD, *sK = sdO + BR * SD, *sV = sK + BK * SD;
    uint16_t *sdS = sV + BK * SD;
    const int tid = FL_TID, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int qh = w / 2 * 32, kh = w % 2 * 32, dh = w % 2 * DH;
    const int64_t bh = FL_BX, q0 = (A.causal ? FL_GY - 1 - FL_BY : FL_BY) * BR;
    const uint16_t *K = fl_pair(A, A.k, bh), *V = fl_pair(A, A.v, bh);
    fl_load<BR, D>(sQ, fl_pair(A, A.q, bh), A.q.ld, q0, A.sq);
    fl_load<BR, D>(sdO, fl_pair(A, A.g, bh), A.g.ld, q0, A.sq);
    float L[2][2], Dv[2][2];   /* rows qh + 16 m + g + 8 h */
    FL_UNROLL
    for (int m = 0; m < 2; m++)
        FL_UNROLL
        for (int h = 0; h < 2; h++) {
            const int64_t r = q0 + qh + 16 * m + g + 8 * h;
            L[m][h] = r < A.sq ? A.lse[bh * A.sq + r] * FL_LOG2E : INFINITY;
            Dv[m][h] = r < A.sq ? A.dvec[bh * A.sq + r] : 0.f;
        }
    float dq[2][DH / 8][4];
    FL_UNROLL
    for (int m = 0; m < 2; m++)
        FL_UNROLL
        for (int dn = 0; dn < DH / 8; dn++) dq[m][dn][0] = dq[m][dn][1] = dq[m][dn][2] = dq[m][dn][3] = 0.f;
    const int64_t kend = A.causal ? fl_min(A.sk, q0 + BR) : A.sk;
    for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        fl_sync();   /* every warp is done with the previous tile */
        fl_load<BK, D>(sK, K, A.k.ld, k0, A.sk);
        fl_load<BK, D>(sV, V, A.v.ld, k0, A.sk);
        fl_cp_commit();
        fl_cp_wait<0>();
        fl_sync();
        float s[2][4][4], dp[2][4][4];
        fl_product<2, 32, D, E>(s, sQ, qh, sK, kh, lane);    /* S = Q K^T */
        fl_product<2, 32, D, E>(dp, sdO, qh, sV, kh, lane);  /* dP = dO V^T */
        /* key k0 + kc (kc < 64) is kept when kc < nkey and, causal, kc <= qr + diag: small ints */
        const int nkey = (int)fl_min(A.sk - k0, BK), diag = A.causal ? (int)fl_min(q0 - k0, 2 * BK) : 2 * BK;
        FL_UNROLL
        for (int m = 0; m < 2; m++) {
            FL_UNROLL
            for (int j = 0; j < 4; j++) {
                FL_UNROLL
                for (int e = 0; e < 4; e++) {
                    const int h = e >> 1, kc = kh + j * 8 + 2 * t + (e & 1), qr = qh + 16 * m + g + 8 * h;
                    const float p = (kc >= nkey || kc > qr + diag) ? 0.f : fl_exp2(s[m][j][e] * A.scale_log2 - L[m][h]);
                    s[m][j][e] = p * (dp[m][j][e] - Dv[m][h]);   /* dS */
                }
            }
            fl_stage<32, SP, E>(sdS, qh + 16 * m, kh, g, t, s[m]);
        }
        fl_sync();   /* dS of the whole tile is staged */
        FL_UNROLL
        for (int kq = 0; kq < BK / 16; kq++) {
            uint32_t da[2][4];
            FL_UNROLL
            for (int m = 0; m < 2; m++) fl_frag_a<SP>(da[m], sdS, qh + 16 * m, kq * 16, lane);
            fl_mma_b<2, DH / 16, SD, 1, E>(dq, da, sK, dh, kq * 16, lane);   /* dQ += dS K */
        }
    }
    FL_UNROLL
    for (int m = 0; m < 2; m++)
        fl_store_rows<DH, E>(fl_pair(A, A.dq, bh) + dh, A.dq.ld, A.sq, q0 + qh + 16 * m + g, t, dq[m], A.scale,
                             A.scale);
}

#endif
