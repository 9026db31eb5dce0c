/* kernels/cpu/amx.c: bfloat16 products on Intel AMX tiles (Sapphire Rapids and later), for the
 * CPU "gemm_lp" kernel (kernels/cpu/linalg.c): c = alpha op(a) op(b) + beta c with bf16 a and b
 * and a float32 c. TDPBF16PS multiplies exact bf16 values and accumulates in float32, which is
 * gemm_lp's contract; only the order of the float32 sums differs from sgemm on widened
 * operands. The order is fixed by the code (k in ascending 32-element chunks, each chunk's
 * pairs as the instruction sums them), so results depend neither on the thread count nor on
 * the batch split.
 *
 * Layout: C is computed in 32 x 32 blocks held in four 16 x 16 float32 tiles (0-3); per chunk
 * of 32 k values two A tiles (4, 5: 16 rows x 32 bf16 each) and two B tiles (6, 7: 16 rows of
 * 16 column pairs, the "VNNI" layout: row r holds (B[2r][j], B[2r+1][j]) for 16 columns j)
 * are loaded and multiplied 2 x 2. A is packed per block of 32 rows (k padded with zeros to a
 * multiple of 32), B once per product into 16-column strips; rows and columns past m and n are
 * zeros, and the block goes to c through a float32 buffer that applies alpha and beta.
 *
 * Availability: the CPU must report AMX-BF16 and the kernel must grant the process its tile
 * state (arch_prctl ARCH_REQ_XCOMP_PERM); NEMO_AMX=0 in the environment turns it off. Each
 * thread loads the tile configuration before its first tile instruction and releases the tiles
 * when its share is done.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <omp.h>

#include "internal.h"
#include "amx.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(NEMO_NO_AMX)
#include <immintrin.h>
#include <cpuid.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static int amx_state = -1;   /* -1 unknown, 0 no, 1 yes */

static int amx_probe(void) {
    const char *env = getenv("NEMO_AMX");
    if (env && !strcmp(env, "0")) return 0;
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int bf16 = (d >> 22) & 1, tile = (d >> 24) & 1;   /* AMX-BF16, AMX-TILE */
    if (!bf16 || !tile) return 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    return 1;
}

int nemo_amx_available(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (s < 0) {
        s = amx_probe();
        __atomic_store_n(&amx_state, s, __ATOMIC_RELEASE);
    }
    return s;
}

__attribute__((target("amx-tile")))
static void tiles_begin(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    /* GCC's _tile_loadconfig tells the compiler it reads only a pointer's worth of the 64-byte
     * configuration, so without this barrier the other stores may be dropped (seen in the
     * -march-less build: a #GP on ldtilecfg) */
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}
__attribute__((target("amx-tile")))
static void tiles_end(void) { _tile_release(); }

/* op(a) rows [r0, r0 + 32) as 32 rows of kp bf16 (zeros past m and k); a element (i, p) is
 * a[i * lda + p], or a[p * lda + i] when ta */
static void pack_a(uint16_t *dst, const uint16_t *a, int64_t lda, int ta, int64_t r0, int64_t m, int64_t k,
                   int64_t kp) {
    int64_t rows = m - r0 < 32 ? m - r0 : 32;
    if (!ta) {
        for (int64_t r = 0; r < rows; r++) {
            memcpy(dst + r * kp, a + (r0 + r) * lda, (size_t)k * 2);
            if (kp > k) memset(dst + r * kp + k, 0, (size_t)(kp - k) * 2);
        }
    } else {   /* column i of the stored a: read 32 neighbours per k */
        for (int64_t p = 0; p < k; p++) {
            const uint16_t *src = a + p * lda + r0;
            for (int64_t r = 0; r < rows; r++) dst[r * kp + p] = src[r];
        }
        for (int64_t r = 0; r < rows; r++)
            if (kp > k) memset(dst + r * kp + k, 0, (size_t)(kp - k) * 2);
    }
    for (int64_t r = rows; r < 32; r++) memset(dst + r * kp, 0, (size_t)kp * 2);
}

/* op(b) (k x n) into strips of 16 columns: strip s, chunk q (32 k values) is a 16 x 32 bf16 tile
 * at dst + (s * nq + q) * 512, row r = pairs (k = 32q + 2r, 32q + 2r + 1) for 16 columns.
 * b element (p, j) is b[p * ldb + j], or b[j * ldb + p] when tb. */
static void pack_b(uint16_t *dst, const uint16_t *b, int64_t ldb, int tb, int64_t n, int64_t k, int64_t ns,
                   int64_t nq) {
    #pragma omp parallel for schedule(static) if (ns * nq > 64)
    for (int64_t s = 0; s < ns; s++) {
        int64_t j0 = s * 16, w = n - j0 < 16 ? n - j0 : 16;
        for (int64_t q = 0; q < nq; q++) {
            uint16_t *t = dst + (s * nq + q) * 512;
            int64_t p0 = q * 32;
            if (w == 16 && p0 + 32 <= k && !tb) {   /* a full tile: interleave row pairs */
                for (int64_t r = 0; r < 16; r++) {
                    const uint16_t *x0 = b + (p0 + 2 * r) * ldb + j0, *x1 = x0 + ldb;
                    uint16_t *o = t + r * 32;
                    for (int64_t c = 0; c < 16; c++) { o[2 * c] = x0[c]; o[2 * c + 1] = x1[c]; }
                }
            } else if (w == 16 && p0 + 32 <= k) {   /* transposed: column j of op(b) is row j of b */
                for (int64_t c = 0; c < 16; c++) {
                    const uint16_t *x = b + (j0 + c) * ldb + p0;
                    for (int64_t r = 0; r < 16; r++) { t[r * 32 + 2 * c] = x[2 * r]; t[r * 32 + 2 * c + 1] = x[2 * r + 1]; }
                }
            } else {
                for (int64_t r = 0; r < 16; r++)
                    for (int64_t c = 0; c < 16; c++) {
                        int64_t j = j0 + c;
                        for (int h = 0; h < 2; h++) {
                            int64_t p = p0 + 2 * r + h;
                            t[r * 32 + c * 2 + h] = (j < n && p < k) ? (tb ? b[j * ldb + p] : b[p * ldb + j]) : 0;
                        }
                    }
            }
        }
    }
}

/* One 32 x 32 block of c: rows [i0, i0 + 32) from the packed rows ap, column strips s0, s0 + 1. */
__attribute__((target("amx-tile,amx-bf16")))
static void block(float *out, const uint16_t *ap, int64_t kp, const uint16_t *bp, int64_t s0, int64_t ns, int64_t nq) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const uint16_t *b0 = bp + s0 * nq * 512;
    const uint16_t *b1 = s0 + 1 < ns ? b0 + nq * 512 : NULL;
    if (b1) {   /* loads placed between products so that they overlap (tiles are not renamed) */
        for (int64_t q = 0; q < nq; q++) {
            _tile_loadd(4, ap + q * 32, kp * 2);
            _tile_loadd(6, b0 + q * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b1 + q * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, ap + 16 * kp + q * 32, kp * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    } else {
        for (int64_t q = 0; q < nq; q++) {
            _tile_loadd(4, ap + q * 32, kp * 2);
            _tile_loadd(6, b0 + q * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, ap + 16 * kp + q * 32, kp * 2);
            _tile_dpbf16ps(2, 5, 6);
        }
    }
    _tile_stored(0, out, 128);
    _tile_stored(2, out + 16 * 32, 128);
    if (b1) {
        _tile_stored(1, out + 16, 128);
        _tile_stored(3, out + 16 * 32 + 16, 128);
    }
}

/* c rows [i0, i0 + 32) x columns [j0, j0 + 32) (clipped to m, n) = alpha blk + beta c */
static void write_block(float *c, int64_t ldc, const float *blk, int64_t i0, int64_t j0, int64_t m, int64_t n,
                        float alpha, float beta) {
    int64_t rows = m - i0 < 32 ? m - i0 : 32, cols = n - j0 < 32 ? n - j0 : 32;
    for (int64_t r = 0; r < rows; r++) {
        float *cr = c + (i0 + r) * ldc + j0;
        const float *br = blk + r * 32;
        if (beta == 0.0f) {
            if (alpha == 1.0f) memcpy(cr, br, (size_t)cols * 4);
            else for (int64_t j = 0; j < cols; j++) cr[j] = alpha * br[j];
        } else {
            for (int64_t j = 0; j < cols; j++) cr[j] = alpha * br[j] + beta * cr[j];
        }
    }
}

/* Rows [i_begin, i_end) (multiples of 32 apart) of one product, on the calling thread. */
static void rows_range(const uint16_t *a, int64_t lda, int ta, const uint16_t *bp, int64_t ns, int64_t nq,
                       float *c, int64_t ldc, int64_t m, int64_t n, int64_t k, float alpha, float beta,
                       int64_t i_begin, int64_t i_end, uint16_t *ap, float *blk) {
    int64_t kp = nq * 32;
    for (int64_t i0 = i_begin; i0 < i_end; i0 += 32) {
        pack_a(ap, a, lda, ta, i0, m, k, kp);
        for (int64_t s0 = 0; s0 < ns; s0 += 2) {
            block(blk, ap, kp, bp, s0, ns, nq);
            write_block(c, ldc, blk, i0, s0 * 16, m, n, alpha, beta);
        }
    }
}

/* Thread t's share of the per-thread scratch thr (per bytes each): 32 packed rows of kp bf16,
 * then one 64-byte aligned 32 x 32 float32 block. */
static void thread_bufs(char *thr, size_t per, int t, int64_t kp, uint16_t **ap, float **blk) {
    *ap = (uint16_t *)(thr + (size_t)t * per);
    *blk = (float *)(((uintptr_t)((char *)*ap + (size_t)(32 * kp) * 2) + 63) & ~(uintptr_t)63);
}

int nemo_amx_gemm_bf16(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t *a,
                       int64_t lda, const uint16_t *b, int64_t ldb, float beta, float *c, int64_t ldc,
                       int64_t nbatch, const int64_t *offs, int c_distinct) {
    static const int64_t zero3[3] = {0, 0, 0};
    if (!nemo_amx_available()) return 0;
    if (!offs) { offs = zero3; nbatch = 1; }
    if (m <= 0 || n <= 0 || k <= 0 || nbatch <= 0) return 0;
    int64_t ns = (n + 15) / 16, nq = (k + 31) / 32, kp = nq * 32, mb = (m + 31) / 32;
    size_t bsz = (size_t)(ns * nq) * 512 * 2;
    int nthr = omp_get_max_threads();
    size_t per = (size_t)(32 * kp) * 2 + 32 * 32 * 4 + 64;   /* packed A rows + one C block, per thread */
    /* batches of independent outputs go side by side (B packed per item by its thread); one
     * product, or an accumulating batch (c_distinct 0: items in order), splits its rows */
    int side = c_distinct && nbatch > 1;
    size_t nb_bufs = side ? (size_t)nthr : 1;
    char *work = nemo_dev_alloc(NEMO_CPU, 0, nb_bufs * bsz + (size_t)nthr * per);
    if (!work) { nemo_clear_error(); return 0; }
    char *thr = work + nb_bufs * bsz;
    if (side) {
        #pragma omp parallel num_threads(nthr)
        {
            int t = omp_get_thread_num();
            uint16_t *bp = (uint16_t *)(work + (size_t)t * bsz);
            uint16_t *ap;
            float *blk;
            thread_bufs(thr, per, t, kp, &ap, &blk);
            tiles_begin();
            #pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < nbatch; i++) {
                const uint16_t *ai = a + offs[3 * i], *bi = b + offs[3 * i + 1];
                float *ci = c + offs[3 * i + 2];
                pack_b(bp, bi, ldb, tb, n, k, ns, nq);   /* this thread's own copy (no nested threads) */
                rows_range(ai, lda, ta, bp, ns, nq, ci, ldc, m, n, k, alpha, beta, 0, mb * 32, ap, blk);
            }
            tiles_end();
        }
    } else {
        uint16_t *bp = (uint16_t *)work;
        for (int64_t i = 0; i < nbatch; i++) {
            const uint16_t *ai = a + offs[3 * i], *bi = b + offs[3 * i + 1];
            float *ci = c + offs[3 * i + 2];
            pack_b(bp, bi, ldb, tb, n, k, ns, nq);
            int use = mb > 1 ? nthr : 1;
            #pragma omp parallel num_threads(use) if (use > 1)
            {
                uint16_t *ap;
                float *blk;
                thread_bufs(thr, per, omp_get_thread_num(), kp, &ap, &blk);
                tiles_begin();
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < mb; r++)
                    rows_range(ai, lda, ta, bp, ns, nq, ci, ldc, m, n, k, alpha, beta, r * 32, r * 32 + 32, ap, blk);
                tiles_end();
            }
        }
    }
    nemo_dev_free(NEMO_CPU, 0, work, nb_bufs * bsz + (size_t)nthr * per);
    return 1;
}

#else

int nemo_amx_available(void) { return 0; }
int nemo_amx_gemm_bf16(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t *a,
                       int64_t lda, const uint16_t *b, int64_t ldb, float beta, float *c, int64_t ldc,
                       int64_t nbatch, const int64_t *offs, int c_distinct) {
    (void)ta; (void)tb; (void)m; (void)n; (void)k; (void)alpha; (void)a; (void)lda; (void)b; (void)ldb;
    (void)beta; (void)c; (void)ldc; (void)nbatch; (void)offs; (void)c_distinct;
    return 0;
}

#endif

NEMO_API int nemo_cpu_has_amx(void) { return nemo_amx_available(); }
