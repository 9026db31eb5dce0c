/*
 * tests/c/test_flash_emu.cc: the flash-attention kernels of kernels/cuda/flash.cuh, compiled for
 * the CPU and run by a small SIMT emulator, against float64 attention on the same inputs.
 *
 * The emulator runs the 128 threads of a block as fibers (ucontext): each warp in turn runs
 * until all its lanes wait at a barrier (or are done), its lanes in lockstep from one warp
 * collective to the next; the barrier is passed when every thread of the block reached it.
 * The scheduler checks that the lanes of a warp reached the same collective, and the threads
 * of a block the same barrier (anything else is a test failure), and carries out each
 * collective: shuffles exchange the recorded values, ldmatrix
 * gathers the 8 x 8 matrices from the rows the lanes name, an mma assembles the 16x16 A and
 * 16x8 B tiles from the 32 lanes' fragments in the PTX ISA's m16n8k16 layout, multiplies in
 * float32 and hands each lane its accumulators back (tests/cuda_emu/warp_mma.h). A cp.async
 * lands when its thread waits for its group and reads as NaN until then. Shared memory starts
 * filled with NaN bit patterns, so a read before a write shows up in the results; every other
 * block runs its warps (and lanes) last to first, and a warp runs ahead to the next barrier
 * before the next warp starts, so a read of another warp's data that misses its barrier is
 * wrong in one of the two orders; a shared-memory address outside the launch's
 * dynamic shared memory or a misaligned one is a failure. Blocks run one after the other. What
 * this does not test: the PTX itself, timing, or the fragment layout (the emulator and the
 * kernels share the layout as documented; tests/gpu/check_ops.lua checks the real thing on a
 * GPU).
 *
 * Cases: bf16 and f16, head dims 64 and 128, both kernel families (16 and 32 rows a warp),
 * causal and not, Sq and Sk not multiples of the tiles (and smaller than one tile), Sq > Sk and Sq < Sk, a
 * query laid out as (S, H, D) and a key with padded rows. Tolerances (normwise, max|x - ref| <= tol * max|ref|): output and
 * gradients 1e-2 for bf16 and 3e-3 for f16 (P and dS are rounded to the input type before
 * their products, as on the GPU); lse 1e-4 absolute.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <vector>

extern "C" {
#include "tap.h"
}

/* ==== the emulated SIMT machine ==== */

#define FL_GLOBAL static
#define FL_DEV static inline
#define FL_UNROLL
#define FL_TID emu_tid
#define FL_BX emu_bx
#define FL_BY emu_by
#define FL_GX emu_gx
#define FL_GY emu_gy
#define FL_SMEM emu_smem

static int emu_tid;
static int64_t emu_bx, emu_by, emu_gx, emu_gy;
static char *emu_smem;

#include "../cuda_emu/warp_mma.h"

enum { OP_NONE, OP_SYNC, OP_SHFL, OP_MMA, OP_LDSM, OP_DONE };
struct emu_slot {
    int op, e, m;
    float f, out;
    uint32_t a[4], b[2];
    float d[4];
    const uint16_t *lrow;   /* ldmatrix */
    int ltrans;
    uint32_t lr[4];
};
#define EMU_T 128
#define EMU_STACK (256 * 1024)
static emu_slot slot[EMU_T];
static ucontext_t sched_ctx, fib_ctx[EMU_T];
static char *stacks;
static int divergent;   /* set when the threads of a block reached different operations */
static int bad_smem;    /* set by a shared-memory address outside the launch's or misaligned */
static size_t emu_smem_bytes;
static nemo_emu_cp_queue cpq[EMU_T];

static void emu_yield(int op) {
    slot[emu_tid].op = op;
    swapcontext(&fib_ctx[emu_tid], &sched_ctx);
}
static void fl_sync() { emu_yield(OP_SYNC); }
static float fl_shfl_xor(float v, int m) {
    slot[emu_tid].f = v;
    slot[emu_tid].m = m;
    emu_yield(OP_SHFL);
    return slot[emu_tid].out;
}
template <int E>
static void fl_mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    emu_slot &s = slot[emu_tid];
    s.e = E;
    memcpy(s.a, a, sizeof s.a);
    memcpy(s.b, b, sizeof s.b);
    memcpy(s.d, d, sizeof s.d);
    emu_yield(OP_MMA);
    memcpy(d, slot[emu_tid].d, sizeof s.d);
}
static bool in_smem(const void *p, size_t n) {
    const char *c = (const char *)p;
    return c >= emu_smem && c + n <= emu_smem + emu_smem_bytes && (uintptr_t)c % 16 == 0;
}
template <int TRANS> static void fl_ldsm(uint32_t r[4], const uint16_t *row) {
    if (!in_smem(row, 16)) bad_smem++;
    slot[emu_tid].lrow = row;
    slot[emu_tid].ltrans = TRANS;
    emu_yield(OP_LDSM);
    memcpy(r, slot[emu_tid].lr, sizeof slot[emu_tid].lr);
}
static void fl_cp16(uint16_t *dst, const uint16_t *src, bool full) {
    if (!in_smem(dst, 16) || (uintptr_t)src % 16) {
        bad_smem++;
        return;
    }
    cpq[emu_tid].issue(dst, src, full ? 16 : 0);
}
static void fl_cp_commit() { cpq[emu_tid].commit(); }
template <int N> static void fl_cp_wait() { cpq[emu_tid].wait(N); }
static float fl_exp2(float x) { return exp2f(x); }
static float fl_log2(float x) { return log2f(x); }

static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
template <int E> static float fl_f32(uint16_t h);
template <> float fl_f32<0>(uint16_t h) { return bits_f32((uint32_t)h << 16); }
template <> float fl_f32<1>(uint16_t h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
template <int E> static uint16_t to_e(float f);
template <> uint16_t to_e<0>(float f) {   /* round to nearest even; finite inputs here */
    uint32_t u = f32_bits(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
template <> uint16_t to_e<1>(float f) { _Float16 x = (_Float16)f; uint16_t h; memcpy(&h, &x, 2); return h; }
template <int E> static uint32_t fl_pack(float lo, float hi) { return (uint32_t)to_e<E>(lo) | ((uint32_t)to_e<E>(hi) << 16); }

#include "../../kernels/cuda/flash.cuh"

/* One warp's m16n8k16: fragments in the PTX ISA layout (lane = 4 g + t). */
static void emu_mma(emu_slot *w) { nemo_emu_warp_mma(w); }

static void (*emu_kernel)(const fl_args);
static fl_args emu_args;
static void emu_trampoline() {
    emu_kernel(emu_args);
    slot[emu_tid].op = OP_DONE;   /* returns to sched_ctx through uc_link */
}

/* Runs kernel on a gx x gy grid of 128-thread blocks with smem bytes of shared memory. */
static void emu_launch(void (*kernel)(const fl_args), const fl_args &args, int64_t gx, int64_t gy, size_t smem) {
    std::vector<char> shared(smem + 16);
    emu_kernel = kernel;
    emu_args = args;
    emu_gx = gx;
    emu_gy = gy;
    emu_smem = (char *)(((uintptr_t)shared.data() + 15) & ~(uintptr_t)15);
    emu_smem_bytes = smem;
    int64_t nblock = 0;
    for (emu_by = 0; emu_by < gy; emu_by++)
        for (emu_bx = 0; emu_bx < gx; emu_bx++) {
            const bool reverse = nblock++ % 2;   /* threads last to first between collectives */
            memset(emu_smem, 0xff, smem);   /* NaN in both bf16 and f16 */
            for (int i = 0; i < EMU_T; i++) {
                getcontext(&fib_ctx[i]);
                fib_ctx[i].uc_stack.ss_sp = stacks + (size_t)i * EMU_STACK;
                fib_ctx[i].uc_stack.ss_size = EMU_STACK;
                fib_ctx[i].uc_link = &sched_ctx;
                makecontext(&fib_ctx[i], emu_trampoline, 0);
                slot[i].op = OP_NONE;
                cpq[i].clear();
            }
            for (;;) {
                /* each warp in turn runs until all its lanes wait at a barrier or are done,
                 * carrying out its collectives as its 32 lanes reach them */
                for (int wk = 0; wk < EMU_T / 32 && !divergent; wk++) {
                    emu_slot *s = slot + 32 * (reverse ? EMU_T / 32 - 1 - wk : wk);
                    for (;;) {
                        for (int k = 0; k < 32; k++) {
                            const int l = reverse ? 31 - k : k;
                            if (s[l].op != OP_NONE) continue;
                            emu_tid = (int)(s - slot) + l;
                            swapcontext(&sched_ctx, &fib_ctx[emu_tid]);
                        }
                        const int op = s[0].op;
                        if (op == OP_SYNC || op == OP_DONE) break;   /* the block-level check below */
                        for (int l = 1; l < 32; l++)
                            if (s[l].op != op) divergent++;
                        if (divergent) break;
                        if (op == OP_SHFL) {
                            for (int l = 0; l < 32; l++) {
                                if (s[l].m != s[0].m) divergent++;
                                s[l].out = s[l ^ s[l].m].f;
                            }
                        } else if (op == OP_MMA) {
                            for (int l = 1; l < 32; l++)
                                if (s[l].e != s[0].e) divergent++;
                            emu_mma(s);
                        } else {
                            for (int l = 1; l < 32; l++)
                                if (s[l].ltrans != s[0].ltrans) divergent++;
                            if (nemo_emu_warp_ldsm(s) >= 0) bad_smem++;
                        }
                        for (int l = 0; l < 32; l++) s[l].op = OP_NONE;
                    }
                }
                const int op = slot[0].op;
                for (int i = 1; i < EMU_T; i++)
                    if (slot[i].op != op) divergent++;
                if (op == OP_DONE || divergent) break;
                for (int i = 0; i < EMU_T; i++) slot[i].op = OP_NONE;   /* the barrier is passed */
            }
            if (divergent) return;
        }
}

/* ==== a case ==== */

/* An operand of pairs (H of them, B = 1) with its own layout: element (h, i, d) at
 * h * hs + i * ld + d. */
struct operand {
    int64_t n, d, hs, ld;
    uint16_t *p;
    std::vector<double> x;   /* the same values, (h, i, d) dense */
};
static void *alloc16(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 16, bytes ? bytes : 16) != 0) abort();
    memset(p, 0, bytes);
    return p;
}
static uint64_t rng = 88172645463325252ull;
static double urand() {   /* xorshift, uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}
template <int E>
static operand make(int H, int64_t n, int64_t d, bool interleaved, int64_t pad, double amp) {
    operand o;
    o.n = n;
    o.d = d;
    if (interleaved) { o.ld = H * d; o.hs = d; }   /* (S, H, D) storage */
    else { o.ld = d + pad; o.hs = n * o.ld; }
    o.p = (uint16_t *)alloc16(sizeof(uint16_t) * (size_t)(interleaved ? n * H * d : H * n * o.ld));
    o.x.resize((size_t)(H * n * d));
    for (int h = 0; h < H; h++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < d; c++) {
                const uint16_t v = to_e<E>((float)(amp * urand()));
                o.p[h * o.hs + i * o.ld + c] = v;
                o.x[(size_t)((h * n + i) * d + c)] = fl_f32<E>(v);
            }
    return o;
}
static fl_mat mat_of(const operand &o) {
    fl_mat m;
    memset(&m, 0, sizeof m);
    m.p = o.p;
    m.ld = o.ld;
    m.ls[0] = o.hs;
    return m;
}
template <int E>
static double get(const operand &o, int h, int64_t i, int64_t c) { return fl_f32<E>(o.p[h * o.hs + i * o.ld + c]); }

/* max |x - ref| / max |ref| over an operand's values against a dense (h, i, d) reference */
template <int E>
static double normwise(const operand &o, int H, const std::vector<double> &ref) {
    double num = 0, den = 0;
    for (int h = 0; h < H; h++)
        for (int64_t i = 0; i < o.n; i++)
            for (int64_t c = 0; c < o.d; c++) {
                const double r = ref[(size_t)((h * o.n + i) * o.d + c)], x = get<E>(o, h, i, c);
                const double diff = fabs(x - r);
                num = (diff > num || diff != diff) ? diff : num;
                den = fabs(r) > den ? fabs(r) : den;
            }
    return num / (den > 0 ? den : 1);
}

template <int D, int E, int MT>
static void run_case(int64_t sq, int64_t sk, int causal, const char *label) {
    char name[160];
    snprintf(name, sizeof name, "%s, %d-row kernels", label, 16 * MT);
    const int H = 2;
    const double tol = E == 0 ? 1e-2 : 3e-3;
    const double scale = 1.0 / sqrt((double)D);
    operand q = make<E>(H, sq, D, true, 0, 2.0), k = make<E>(H, sk, D, false, 8, 2.0), v = make<E>(H, sk, D, false, 0, 1.0);
    operand g = make<E>(H, sq, D, false, 0, 1.0);
    operand o = make<E>(H, sq, D, false, 0, 0.0), dq = make<E>(H, sq, D, true, 0, 0.0);
    operand dk = make<E>(H, sk, D, false, 8, 0.0), dv = make<E>(H, sk, D, false, 0, 0.0);
    std::vector<float> lse((size_t)(H * sq), NAN), dvec((size_t)(H * sq), NAN);

    fl_args A;
    memset(&A, 0, sizeof A);
    A.nlead = 1;
    A.lshape[0] = H;
    A.causal = causal;
    A.nbh = H;
    A.sq = sq;
    A.sk = sk;
    A.scale = (float)scale;
    A.scale_log2 = (float)(scale * 1.4426950408889634);
    A.q = mat_of(q); A.k = mat_of(k); A.v = mat_of(v); A.o = mat_of(o); A.g = mat_of(g);
    A.dq = mat_of(dq); A.dk = mat_of(dk); A.dv = mat_of(dv);
    A.lse = lse.data();
    A.dvec = dvec.data();

    divergent = bad_smem = 0;
    emu_launch(fl_fwd_k<D, E, MT>, A, H, (sq + 64 * MT - 1) / (64 * MT), fl_fwd_smem<D, MT>());
    emu_launch(fl_bwd_pre_k<D, E>, A, (H * sq + 3) / 4, 1, 0);
    if (MT == 2) {   /* the 32-row family */
        emu_launch(fl_bwd_dkdv32_k<D, E>, A, H, (sk + 63) / 64, fl_dkdv32_smem<D>());
        emu_launch(fl_bwd_dq32_k<D, E>, A, H, (sq + 63) / 64, fl_dq32_smem<D>());
    } else {
        emu_launch(fl_bwd_dkdv_k<D, E>, A, H, (sk + 63) / 64, fl_dkdv_smem<D>());
        emu_launch(fl_bwd_dq_k<D, E>, A, H, (sq + 63) / 64, fl_dq_smem<D>());
    }
    TAP_OK(!divergent, "%s: every thread of a block passes the same barriers, shuffles, ldmatrix and mma", name);
    TAP_OK(!bad_smem, "%s: ldmatrix and cp.async stay inside the launch's shared memory, 16-byte aligned", name);

    /* float64 reference on the same (rounded) inputs */
    std::vector<double> ro((size_t)(H * sq * D), 0), rlse((size_t)(H * sq)), rdq((size_t)(H * sq * D), 0);
    std::vector<double> rdk((size_t)(H * sk * D), 0), rdv((size_t)(H * sk * D), 0), p((size_t)sk), ds((size_t)sk);
    double lse_err = 0;
    for (int h = 0; h < H; h++)
        for (int64_t i = 0; i < sq; i++) {
            const double *qi = &q.x[(size_t)((h * sq + i) * D)];
            double mx = -INFINITY;
            for (int64_t j = 0; j < sk; j++) {
                double s = 0;
                for (int c = 0; c < D; c++) s += qi[c] * k.x[(size_t)((h * sk + j) * D + c)];
                p[(size_t)j] = (causal && j > i) ? -INFINITY : s * scale;
                mx = p[(size_t)j] > mx ? p[(size_t)j] : mx;
            }
            double sum = 0;
            for (int64_t j = 0; j < sk; j++) sum += (p[(size_t)j] = exp(p[(size_t)j] - mx));
            for (int64_t j = 0; j < sk; j++) p[(size_t)j] /= sum;
            rlse[(size_t)(h * sq + i)] = mx + log(sum);
            const double le = fabs(lse[(size_t)(h * sq + i)] - rlse[(size_t)(h * sq + i)]);
            lse_err = (le > lse_err || le != le) ? le : lse_err;
            double *oi = &ro[(size_t)((h * sq + i) * D)];
            for (int64_t j = 0; j < sk; j++)
                for (int c = 0; c < D; c++) oi[c] += p[(size_t)j] * v.x[(size_t)((h * sk + j) * D + c)];
            /* backward of row i: dP = dO V^T, dS = P (dP - dO . O) */
            const double *gi = &g.x[(size_t)((h * sq + i) * D)];
            double dot = 0;
            for (int c = 0; c < D; c++) dot += gi[c] * oi[c];
            for (int64_t j = 0; j < sk; j++) {
                double dp = 0;
                for (int c = 0; c < D; c++) dp += gi[c] * v.x[(size_t)((h * sk + j) * D + c)];
                ds[(size_t)j] = p[(size_t)j] * (dp - dot);
            }
            for (int64_t j = 0; j < sk; j++)
                for (int c = 0; c < D; c++) {
                    rdq[(size_t)((h * sq + i) * D + c)] += scale * ds[(size_t)j] * k.x[(size_t)((h * sk + j) * D + c)];
                    rdk[(size_t)((h * sk + j) * D + c)] += scale * ds[(size_t)j] * qi[c];
                    rdv[(size_t)((h * sk + j) * D + c)] += p[(size_t)j] * gi[c];
                }
        }
    double e;
    e = normwise<E>(o, H, ro);
    TAP_OK(e <= tol, "%s: output (normwise error %.2e <= %.0e)", name, e, tol);
    TAP_OK(lse_err <= 1e-4, "%s: logsumexp (max error %.2e <= 1e-4)", name, lse_err);
    e = normwise<E>(dq, H, rdq);
    TAP_OK(e <= tol, "%s: query gradient (normwise error %.2e <= %.0e)", name, e, tol);
    e = normwise<E>(dk, H, rdk);
    TAP_OK(e <= tol, "%s: key gradient (normwise error %.2e <= %.0e)", name, e, tol);
    e = normwise<E>(dv, H, rdv);
    TAP_OK(e <= tol, "%s: value gradient (normwise error %.2e <= %.0e)", name, e, tol);
    /* the padding of the key gradient's rows is never written */
    int pad_ok = 1;
    for (int h = 0; h < H; h++)
        for (int64_t i = 0; i < sk; i++)
            for (int c = D; c < D + 8; c++) pad_ok &= dk.p[h * dk.hs + i * dk.ld + c] == 0;
    TAP_OK(pad_ok, "%s: nothing is written between rows", name);
    for (operand *x : {&q, &k, &v, &g, &o, &dq, &dk, &dv}) free(x->p);
}

int main(void) {
    stacks = (char *)malloc((size_t)EMU_T * EMU_STACK);
    if (!stacks) return 1;
    run_case<64, FL_BF16, 2>(77, 45, 0, "bf16 D 64, Sq 77, Sk 45");
    run_case<64, FL_BF16, 1>(77, 45, 0, "bf16 D 64, Sq 77, Sk 45");
    run_case<128, FL_BF16, 2>(70, 130, 1, "bf16 D 128, Sq 70, Sk 130, causal");
    run_case<128, FL_BF16, 1>(70, 130, 1, "bf16 D 128, Sq 70, Sk 130, causal");
    run_case<128, FL_F16, 2>(100, 66, 0, "f16 D 128, Sq 100, Sk 66");
    run_case<128, FL_F16, 1>(100, 66, 0, "f16 D 128, Sq 100, Sk 66");
    run_case<64, FL_F16, 2>(130, 70, 1, "f16 D 64, Sq 130, Sk 70, causal");
    run_case<64, FL_F16, 1>(130, 70, 1, "f16 D 64, Sq 130, Sk 70, causal");
    run_case<128, FL_BF16, 2>(9, 3, 1, "bf16 D 128, Sq 9, Sk 3, causal");
    run_case<128, FL_BF16, 2>(300, 200, 1, "bf16 D 128, Sq 300, Sk 200, causal");
    run_case<128, FL_F16, 1>(200, 300, 0, "f16 D 128, Sq 200, Sk 300");
    free(stacks);
    return TAP_DONE();
}
