/*
 * kernels/cpu/reduce.c: reduction, arg-reduction, softmax and cumsum kernels on dense
 * float32 / float64 arrays.
 *
 * Every kernel sees its input as a dense (A, K, M) array and works along K: A counts the
 * outer kept elements, M the inner kept ones. M == 1 is "row mode" (each output folds one
 * contiguous row of K elements); M > 1 is "column mode" (each output folds a column of stride
 * M; columns are processed in blocks so that every load is a contiguous vector). The
 * front-end (engine/ops/reduce.c) permutes inputs whose reduced dims are not one block.
 *
 * Kernels (registered by name):
 *   "reduce"           (y[A*M], x[A*K*M], A, K, M, op, param)
 *   "reduce_backward"  (dx[A*K*M], g[A*M], x[A*K*M] or NULL for sum/mean, A, K, M, op, param)
 *   "argreduce"        (values[A*M] or NULL, indices[A*M] int64, x, A, K, M, is_min)
 *   "max_dim_backward" (dx[A*K*M], g[A*M], indices[A*M] int64, A, K, M)
 *   "softmax"          (y, x, A, K, M, log)
 *   "softmax_backward" (dx, g, y, A, K, M, log)
 *   "cumsum"           (y, x, A, K, M, reverse)
 * All float arrays share one dtype, float32 or float64.
 *
 * Non-obvious rules
 * - Every statistic accumulates in double, in an order fixed by the shape alone, so nothing
 *   depends on the thread count:
 *   - a row is cut into blocks of RED_CH elements; a block folds in 4 x VW vector lanes
 *     combined as a fixed tree, and block totals fold in order. Rows go whole to one thread,
 *     or (few long rows) their blocks run in parallel: both give bit-identical results;
 *   - a column folds in k order. With few outputs (A*M <= RED_SMALL_OUT, a bias gradient)
 *     the K rows are cut into at most 16 chunks (sizes fixed by K) that are read row by row
 *     into full-width partials, folded in chunk order; otherwise each thread takes blocks of
 *     columns;
 *   - softmax, logsumexp over rows and arg-reductions give each row to one thread.
 * - float32 exponentials use a vectorisable Cephes-style expf (about 1 ulp) valid for x <= 88
 *   (arguments are x - max <= 0 here); float64 uses libm.
 */
#include <omp.h>
#include "../../engine/internal.h"

#define RED_CH 16384     /* elements per row block */
#define RED_MB 128       /* columns per task in column mode (softmax, argreduce, cumsum) */
#define RED_SMALL_OUT 32768  /* outputs up to which a column reduction reads whole rows */
#define RED_KROWS 32     /* least rows per chunk then */
#define RED_EW 8192      /* elements per task in elementwise passes */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Scratch doubles from the engine's caching allocator (large blocks are reused, not faulted in
 * again on every call). */
static double *scratch(int64_t n) { return nemo_dev_alloc(NEMO_CPU, 0, sizeof(double) * (size_t)(n > 0 ? n : 1)); }
static void scratch_free(double *p, int64_t n) { if (p) nemo_dev_free(NEMO_CPU, 0, p, sizeof(double) * (size_t)(n > 0 ? n : 1)); }

/* ==== Vectors (GCC/Clang vector extensions) ==== */

/* One vector is a machine register: VBYTES bytes (64 with AVX-512, 32 with AVX, else 16), so
 * GCC never has to split generic vectors (it scalarises comparisons of split ones). A double
 * vector vdw holds VW lanes and pairs with vfw, VW floats; vff is a full register of FW
 * floats for the softmax exponentials. */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
#define VW (VBYTES / 8)
#define FW (VBYTES / 4)
typedef float vfw __attribute__((vector_size(VBYTES / 2)));
typedef int32_t viw __attribute__((vector_size(VBYTES / 2)));
typedef double vdw __attribute__((vector_size(VBYTES)));
typedef int64_t vlw __attribute__((vector_size(VBYTES)));
typedef float vff __attribute__((vector_size(VBYTES)));
typedef int32_t vfi __attribute__((vector_size(VBYTES)));
#if VW == 8
#define LO_IDX 0, 1, 2, 3, 4, 5, 6, 7
#define HI_IDX 8, 9, 10, 11, 12, 13, 14, 15
#elif VW == 4
#define LO_IDX 0, 1, 2, 3
#define HI_IDX 4, 5, 6, 7
#else
#define LO_IDX 0, 1
#define HI_IDX 2, 3
#endif

static inline vfw ld_f32(const float *p) { vfw v; memcpy(&v, p, sizeof v); return v; }
static inline vdw ld_f64(const double *p) { vdw v; memcpy(&v, p, sizeof v); return v; }
static inline void st_f32(float *p, vfw v) { memcpy(p, &v, sizeof v); }
static inline void st_f64(double *p, vdw v) { memcpy(p, &v, sizeof v); }
static inline vdw cvt_f32(vfw v) { return __builtin_convertvector(v, vdw); }
static inline vdw cvt_f64(vdw v) { return v; }
static inline vdw bc_d(double c) { return (vdw){0} + c; }
static inline vfw bc_f32(float c) { return (vfw){0} + c; }
static inline vdw bc_f64(double c) { return (vdw){0} + c; }
/* m ? a : b lane by lane (m lanes are all ones or all zeros) */
static inline vdw sel_d(vlw m, vdw a, vdw b) { return (vdw)(((vlw)a & m) | ((vlw)b & ~m)); }
static inline vfw sel_f(viw m, vfw a, vfw b) { return (vfw)(((viw)a & m) | ((viw)b & ~m)); }
static inline vdw abs_d(vdw v) { return (vdw)((vlw)v & 0x7fffffffffffffffLL); }
static inline vdw b2d(vlw m) { return __builtin_convertvector(-m, vdw); }   /* all-ones -> 1.0 */

/* ==== exp for x <= 0 ==== */

/* Cephes expf: x = n ln2 + r with n = round(x / ln2) (by the 1.5 * 2^23 trick, the same in the
 * scalar and vector forms), exp(r) by a degree-6 polynomial, 2^n through the exponent bits.
 * About 1 ulp. Below -87.3 the result is 0; NaN passes. Valid up to x = 88. */
#define EXPF_BODY(X, SEL, BC, CVTI)                                                           \
    lo_ = (X) < -87.33654f;                                                                   \
    nan_ = (X) != (X);                                                                        \
    xs_ = SEL(lo_, BC(-87.33654f), (X));                                                      \
    xs_ = SEL(nan_, BC(0.0f), xs_);                                                           \
    n_ = (xs_ * 1.44269504088896341f + 12582912.0f) - 12582912.0f;                            \
    r_ = xs_ - n_ * 0.693359375f;                                                             \
    r_ = r_ + n_ * 2.12194440e-4f;                                                            \
    p_ = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                            \
    p_ = p_ * r_ + 8.3334519073e-3f;                                                          \
    p_ = p_ * r_ + 4.1665795894e-2f;                                                          \
    p_ = p_ * r_ + 1.6666665459e-1f;                                                          \
    p_ = p_ * r_ + 5.0000001201e-1f;                                                          \
    p_ = p_ * (r_ * r_) + r_ + 1.0f;                                                          \
    e_ = (CVTI(n_) + 127) << 23;

static inline float ssel_f(int m, float a, float b) { return m ? a : b; }
static inline float sbc_f(float v) { return v; }
static inline int32_t scvti(float v) { return (int32_t)v; }
static inline float exp_np_f32(float x) {
    int lo_, nan_; float xs_, n_, r_, p_; int32_t e_;
    EXPF_BODY(x, ssel_f, sbc_f, scvti)
    float sc; memcpy(&sc, &e_, 4);
    float y = p_ * sc;
    y = lo_ ? 0.0f : y;
    return nan_ ? x : y;
}
static inline viw vcvti(vfw v) { return __builtin_convertvector(v, viw); }
static inline vfw vexp_np_f32(vfw x) {
    viw lo_, nan_, e_; vfw xs_, n_, r_, p_;
    EXPF_BODY(x, sel_f, bc_f32, vcvti)
    vfw y = p_ * (vfw)e_;
    y = sel_f(lo_, bc_f32(0.0f), y);
    return sel_f(nan_, x, y);
}
static inline vdw vexp_f64(vdw x) { vdw r = x; for (int k = 0; k < VW; k++) r[k] = exp(x[k]); return r; }
#define EXP_f32(v) exp_np_f32(v)
#define EXP_f64(v) exp(v)
#define VEXP_f32(v) vexp_np_f32(v)
#define VEXP_f64(v) vexp_f64(v)
typedef vfw vt_f32;
typedef vdw vt_f64;

/* ==== Reduction passes ==== */
/* A pass folds f(x) over K with an accumulator kind. f may use a per-output centre c (a mean,
 * a max) and the scalar p. Each f comes twice: on VW lanes (v is VW elements of the input
 * type, ccv / cTv the centre as double / input type) and on one element. */
enum { ACC_ADD, ACC_MUL, ACC_MAX, ACC_MIN };

#define ACC_OP_ADD(a, v) (a) += (v)
#define ACC_OP_MUL(a, v) (a) *= (v)
#define ACC_OP_MAX(a, v) (a) = ((v) > (a) || (v) != (v)) ? (v) : (a)
#define ACC_OP_MIN(a, v) (a) = ((v) < (a) || (v) != (v)) ? (v) : (a)
#define VACC_OP_ADD(a, v) (a) += (v)
#define VACC_OP_MUL(a, v) (a) *= (v)
#define VACC_OP_MAX(a, v) (a) = sel_d(((v) > (a)) | ((v) != (v)), (v), (a))
#define VACC_OP_MIN(a, v) (a) = sel_d(((v) < (a)) | ((v) != (v)), (v), (a))
#define ACC_INIT_ADD 0.0
#define ACC_INIT_MUL 1.0
#define ACC_INIT_MAX (-INFINITY)
#define ACC_INIT_MIN INFINITY

/* scalar f(v): v is the element (type T), cc the centre as double, cT as T */
#define F_ID(S) ((double)v)
#define F_SQ(S) ((double)v * (double)v)
#define F_ABS(S) fabs((double)v)
#define F_POW(S) pow(fabs((double)v), p)
#define F_NZ(S) ((double)(v != 0))
#define F_CSQ(S) (((double)v - cc) * ((double)v - cc))
#define F_CEXP(S) ((double)EXP_##S(v - cT))
#define F_EQC(S) ((double)((double)v == cc))
#define F_ABSEQC(S) ((double)(fabs((double)v) == cc))
#define F_ISZ(S) ((double)(v == 0))
#define F_NZVAL(S) (v == 0 ? 1.0 : (double)v)
/* vector f(v) -> vdw */
#define VF_ID(S) cvt_##S(v)
#define VF_SQ(S) (cvt_##S(v) * cvt_##S(v))
#define VF_ABS(S) abs_d(cvt_##S(v))
#define VF_NZ(S) b2d(cvt_##S(v) != 0)
#define VF_CSQ(S) ((cvt_##S(v) - ccv) * (cvt_##S(v) - ccv))
#define VF_CEXP(S) cvt_##S(VEXP_##S(v - cTv))
#define VF_EQC(S) b2d(cvt_##S(v) == ccv)
#define VF_ABSEQC(S) b2d(abs_d(cvt_##S(v)) == ccv)
#define VF_ISZ(S) b2d(cvt_##S(v) == 0)
#define VF_NZVAL(S) sel_d(cvt_##S(v) == 0, bc_d(1.0), cvt_##S(v))
#define VF_POW(S) ({ vdw a_ = abs_d(cvt_##S(v)); for (int q_ = 0; q_ < VW; q_++) a_[q_] = pow(a_[q_], p); a_; })

typedef double (*chunk_fn)(const void *x, int64_t n, double c, double p);
typedef void (*cols_fn)(double *acc, const void *x, int64_t K, int64_t M, int64_t mw, const double *c, double p);

/* NAME_chunk: fold of n contiguous elements (one row block) in 4 x VW lanes, combined as a
 * fixed tree, then the tail in order. NAME_cols: mw columns of stride M over K rows into
 * acc[0..mw), one fold per column in k order, VW columns per vector. UC: f uses the centre. */
#define DEFPASS(NAME, T, S, ACC, F, UC)                                                         \
static double NAME##_chunk(const void *xv, int64_t n, double c, double p) {                   \
    const T *x = xv; const double cc = c; const T cT = (T)c; (void)cc; (void)cT; (void)p;     \
    const vdw ccv = bc_d(c); const vt_##S cTv = bc_##S((T)c); (void)ccv; (void)cTv;           \
    vdw acc[4];                                                                               \
    for (int u = 0; u < 4; u++) acc[u] = bc_d(ACC_INIT_##ACC);                                \
    int64_t i = 0;                                                                            \
    for (; i + 4 * VW <= n; i += 4 * VW)                                                      \
        for (int u = 0; u < 4; u++) { vt_##S v = ld_##S(x + i + VW * u); vdw f = V##F(S); VACC_OP_##ACC(acc[u], f); } \
    for (; i + VW <= n; i += VW) { vt_##S v = ld_##S(x + i); vdw f = V##F(S); VACC_OP_##ACC(acc[0], f); } \
    VACC_OP_##ACC(acc[0], acc[1]); VACC_OP_##ACC(acc[2], acc[3]); VACC_OP_##ACC(acc[0], acc[2]); \
    double h[VW];                                                                             \
    for (int j = 0; j < VW; j++) h[j] = acc[0][j];                                            \
    for (int w = VW / 2; w > 0; w /= 2) for (int j = 0; j < w; j++) ACC_OP_##ACC(h[j], h[j + w]); \
    double r = h[0];                                                                          \
    for (; i < n; i++) { T v = x[i]; double f = F(S); ACC_OP_##ACC(r, f); }                   \
    return r;                                                                                 \
}                                                                                             \
static void NAME##_cols(double *acc, const void *xv, int64_t K, int64_t M, int64_t mw,            \
                        const double *c, double p) {                                          \
    const T *x = xv; (void)p; (void)c;                                                        \
    int64_t nv = mw / VW * VW;                                                                \
    for (int64_t j = 0; j < mw; j++) acc[j] = ACC_INIT_##ACC;                                 \
    for (int64_t k = 0; k < K; k++) {                                                         \
        const T *row = x + k * M;                                                             \
        for (int64_t j = 0; j < nv; j += VW) {                                                 \
            vt_##S v = ld_##S(row + j); const vdw ccv = UC ? ld_f64(c + j) : bc_d(0.0);       \
            const vt_##S cTv = __builtin_convertvector(ccv, vt_##S); (void)cTv;               \
            vdw a = ld_f64(acc + j); vdw f = V##F(S); VACC_OP_##ACC(a, f); st_f64(acc + j, a); \
        }                                                                                     \
        for (int64_t j = nv; j < mw; j++) {                                                   \
            T v = row[j]; const double cc = UC ? c[j] : 0.0; const T cT = (T)cc; (void)cc; (void)cT; \
            double f = F(S); ACC_OP_##ACC(acc[j], f);                                         \
        }                                                                                     \
    }                                                                                         \
}

#define DEFPASS2(NAME, ACC, F, UC) DEFPASS(NAME##_f32, float, f32, ACC, F, UC) DEFPASS(NAME##_f64, double, f64, ACC, F, UC)
DEFPASS2(add_id, ADD, F_ID, 0)
DEFPASS2(add_sq, ADD, F_SQ, 0)
DEFPASS2(add_abs, ADD, F_ABS, 0)
DEFPASS2(add_pow, ADD, F_POW, 0)
DEFPASS2(add_nz, ADD, F_NZ, 0)
DEFPASS2(add_csq, ADD, F_CSQ, 1)
DEFPASS2(add_cexp, ADD, F_CEXP, 1)
DEFPASS2(add_eqc, ADD, F_EQC, 1)
DEFPASS2(add_abseqc, ADD, F_ABSEQC, 1)
DEFPASS2(add_isz, ADD, F_ISZ, 0)
DEFPASS2(mul_id, MUL, F_ID, 0)
DEFPASS2(mul_nzval, MUL, F_NZVAL, 0)
DEFPASS2(max_id, MAX, F_ID, 0)
DEFPASS2(min_id, MIN, F_ID, 0)
DEFPASS2(max_abs, MAX, F_ABS, 0)
DEFPASS2(min_abs, MIN, F_ABS, 0)

typedef struct { chunk_fn chunk[2]; cols_fn cols[2]; int acc; } pass;
#define PASS(NAME, ACC) {{NAME##_f32_chunk, NAME##_f64_chunk}, {NAME##_f32_cols, NAME##_f64_cols}, ACC}
enum { P_ADD_ID, P_ADD_SQ, P_ADD_ABS, P_ADD_POW, P_ADD_NZ, P_ADD_CSQ, P_ADD_CEXP, P_ADD_EQC, P_ADD_ABSEQC,
       P_ADD_ISZ, P_MUL_ID, P_MUL_NZVAL, P_MAX_ID, P_MIN_ID, P_MAX_ABS, P_MIN_ABS };
static const pass passes[] = {
    PASS(add_id, ACC_ADD), PASS(add_sq, ACC_ADD), PASS(add_abs, ACC_ADD), PASS(add_pow, ACC_ADD),
    PASS(add_nz, ACC_ADD), PASS(add_csq, ACC_ADD), PASS(add_cexp, ACC_ADD), PASS(add_eqc, ACC_ADD),
    PASS(add_abseqc, ACC_ADD), PASS(add_isz, ACC_ADD), PASS(mul_id, ACC_MUL), PASS(mul_nzval, ACC_MUL),
    PASS(max_id, ACC_MAX), PASS(min_id, ACC_MIN), PASS(max_abs, ACC_MAX), PASS(min_abs, ACC_MIN),
};

static inline double combine(int acc, double a, double b) {
    switch (acc) {
    case ACC_ADD: return a + b;
    case ACC_MUL: return a * b;
    case ACC_MAX: ACC_OP_MAX(a, b); return a;
    default: ACC_OP_MIN(a, b); return a;
    }
}

/* out[a*M + m] = fold over k of f(x[(a*K + k)*M + m]); centre[a*M + m] (or 0 when NULL).
 * f64 selects the float64 variant. Returns 0 or NEMO_ENOMEM. */
static int run_pass(double *out, const void *x, int f64, int64_t A, int64_t K, int64_t M, int which,
                    const double *centre, double p) {
    const pass *ps = &passes[which];
    chunk_fn chunk = ps->chunk[f64];
    size_t esz = f64 ? sizeof(double) : sizeof(float);
    const char *xb = x;
    int64_t total = A * K * M;
    if (M == 1) {
        int64_t nch = K <= RED_CH ? 1 : (K + RED_CH - 1) / RED_CH;
        int nth = omp_get_max_threads();
        if (nch == 1 || A >= 2 * nth || total <= NEMO_PAR_MIN) {
            #pragma omp parallel for schedule(static) if (total > NEMO_PAR_MIN && A > 1)
            for (int64_t a = 0; a < A; a++) {
                double c = centre ? centre[a] : 0.0;
                const char *row = xb + (size_t)(a * K) * esz;
                double r = chunk(row, min64(K, RED_CH), c, p);
                for (int64_t b = 1; b < nch; b++)
                    r = combine(ps->acc, r, chunk(row + (size_t)(b * RED_CH) * esz, min64(RED_CH, K - b * RED_CH), c, p));
                out[a] = r;
            }
            return 0;
        }
        /* few long rows: blocks in parallel, then their totals in order (same result) */
        double *part = scratch(A * nch);
        if (!part) return NEMO_ENOMEM;
        #pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < A * nch; t++) {
            int64_t a = t / nch, b = t % nch;
            part[t] = chunk(xb + (size_t)(a * K + b * RED_CH) * esz, min64(RED_CH, K - b * RED_CH),
                            centre ? centre[a] : 0.0, p);
        }
        for (int64_t a = 0; a < A; a++) {
            double r = part[a * nch];
            for (int64_t b = 1; b < nch; b++) r = combine(ps->acc, r, part[a * nch + b]);
            out[a] = r;
        }
        scratch_free(part, A * nch);
        return 0;
    }
    cols_fn cols = ps->cols[f64];
    if (A * M <= RED_SMALL_OUT && K >= 2 * RED_KROWS) {
        /* few outputs, many rows (a bias gradient): rows are read in order, in nk chunks of
         * kch rows (fixed by K) each folded into a full-width partial; partials fold in order */
        int64_t kch = (K + 15) / 16 > RED_KROWS ? (K + 15) / 16 : RED_KROWS;
        int64_t nk = (K + kch - 1) / kch;
        double *part = scratch(A * nk * M);
        if (!part) return NEMO_ENOMEM;
        #pragma omp parallel for schedule(static) if (total > NEMO_PAR_MIN)
        for (int64_t t = 0; t < A * nk; t++) {
            int64_t a = t / nk, k0 = (t % nk) * kch;
            cols(part + t * M, xb + (size_t)((a * K + k0) * M) * esz, min64(kch, K - k0), M, M,
                 centre ? centre + a * M : NULL, p);
        }
        for (int64_t a = 0; a < A; a++)
            for (int64_t m = 0; m < M; m++) {
                double r = part[a * nk * M + m];
                for (int64_t b = 1; b < nk; b++) r = combine(ps->acc, r, part[(a * nk + b) * M + m]);
                out[a * M + m] = r;
            }
        scratch_free(part, A * nk * M);
        return 0;
    }
    /* column blocks: wide enough that each row segment spans pages, narrow enough for tasks */
    int nth = omp_get_max_threads();
    int64_t want = (4 * nth + A - 1) / A;
    int64_t mbw = (M + want - 1) / want;
    mbw = (mbw + 63) / 64 * 64;
    if (mbw < 256) mbw = 256;
    if (mbw > 2048) mbw = 2048;
    int64_t nb = (M + mbw - 1) / mbw;
    #pragma omp parallel for schedule(static) if (total > NEMO_PAR_MIN && A * nb > 1)
    for (int64_t t = 0; t < A * nb; t++) {
        int64_t a = t / nb, m0 = (t % nb) * mbw;
        cols(out + a * M + m0, xb + (size_t)(a * K * M + m0) * esz, K, M, min64(mbw, M - m0),
             centre ? centre + a * M + m0 : NULL, p);
    }
    return 0;
}

/* Sum of the lanes as a fixed tree. */
static inline double hsum_d(vdw v) {
    double h[VW];
    for (int j = 0; j < VW; j++) h[j] = v[j];
    for (int w = VW / 2; w > 0; w /= 2) for (int j = 0; j < w; j++) h[j] += h[j + w];
    return h[0];
}

/* Softmax row helpers. float32 runs FW lanes (a full register) through the exponential,
 * float64 the generic VW lanes. rowmax: NaN-propagating max; expsum: sum of
 * exp(x - mx) in double (stored in y when y != NULL); lsm_bwd: d = g - exp(y) * s. */
static inline vff ldff(const float *p) { vff v; memcpy(&v, p, sizeof v); return v; }
static inline void stff(float *p, vff v) { memcpy(p, &v, sizeof v); }
static inline vff bcff(float c) { return (vff){0} + c; }
static inline vff selff(vfi m, vff a, vff b) { return (vff)(((vfi)a & m) | ((vfi)b & ~m)); }
static inline vfi vcvtiff(vff v) { return __builtin_convertvector(v, vfi); }
static inline vff vexpff_np_f32(vff x) {
    vfi lo_, nan_, e_; vff xs_, n_, r_, p_;
    EXPF_BODY(x, selff, bcff, vcvtiff)
    vff y = p_ * (vff)e_;
    y = selff(lo_, bcff(0.0f), y);
    return selff(nan_, x, y);
}
/* the two halves of a vff as doubles */
static inline vdw loff(vff v) { return cvt_f32(__builtin_shufflevector(v, v, LO_IDX)); }
static inline vdw hiff(vff v) { return cvt_f32(__builtin_shufflevector(v, v, HI_IDX)); }

static float rowmax_f32(const float *x, int64_t K) {
    vff m0 = bcff(-INFINITY), m1 = m0;
    int64_t i = 0;
    for (; i + 2 * FW <= K; i += 2 * FW) {
        vff a = ldff(x + i), b = ldff(x + i + FW);
        m0 = selff((a > m0) | (a != a), a, m0);
        m1 = selff((b > m1) | (b != b), b, m1);
    }
    m0 = selff((m1 > m0) | (m1 != m1), m1, m0);
    float r = -INFINITY;
    for (int j = 0; j < FW; j++) ACC_OP_MAX(r, m0[j]);
    for (; i < K; i++) ACC_OP_MAX(r, x[i]);
    return r;
}
static double rowmax_f64(const double *x, int64_t K) { return max_id_f64_chunk(x, K, 0, 0); }

static double expsum_f32(float *y, const float *x, int64_t K, float mx) {
    const vff mv = bcff(mx);
    vdw s0 = bc_d(0), s1 = bc_d(0), s2 = bc_d(0), s3 = bc_d(0);
    int64_t i = 0;
    for (; i + 2 * FW <= K; i += 2 * FW) {
        vff e0 = vexpff_np_f32(ldff(x + i) - mv), e1 = vexpff_np_f32(ldff(x + i + FW) - mv);
        if (y) { stff(y + i, e0); stff(y + i + FW, e1); }
        s0 += loff(e0); s1 += hiff(e0); s2 += loff(e1); s3 += hiff(e1);
    }
    double s = hsum_d((s0 + s1) + (s2 + s3));
    for (; i < K; i++) { float e = exp_np_f32(x[i] - mx); if (y) y[i] = e; s += (double)e; }
    return s;
}
static double expsum_f64(double *y, const double *x, int64_t K, double mx) {
    vdw s0 = bc_d(0), s1 = bc_d(0);
    int64_t i = 0;
    for (; i + 2 * VW <= K; i += 2 * VW) {
        vdw e0 = vexp_f64(ld_f64(x + i) - mx), e1 = vexp_f64(ld_f64(x + i + VW) - mx);
        if (y) { st_f64(y + i, e0); st_f64(y + i + VW, e1); }
        s0 += e0; s1 += e1;
    }
    double s = hsum_d(s0 + s1);
    for (; i < K; i++) { double e = exp(x[i] - mx); if (y) y[i] = e; s += e; }
    return s;
}
static void lsm_bwd_f32(float *d, const float *g, const float *y, int64_t K, float s) {
    const vff sv = bcff(s);
    int64_t k = 0;
    for (; k + FW <= K; k += FW) stff(d + k, ldff(g + k) - vexpff_np_f32(ldff(y + k)) * sv);
    for (; k < K; k++) d[k] = g[k] - exp_np_f32(y[k]) * s;
}
static void lsm_bwd_f64(double *d, const double *g, const double *y, int64_t K, double s) {
    for (int64_t k = 0; k < K; k++) d[k] = g[k] - exp(y[k]) * s;
}

/* ==== "reduce" ==== */

/* Which pass computes norm_p's inner fold, and the final transform. */
static int norm_pass(double p) {
    if (p == 2.0) return P_ADD_SQ;
    if (p == 1.0) return P_ADD_ABS;
    if (p == INFINITY) return P_MAX_ABS;
    if (p == -INFINITY) return P_MIN_ABS;
    if (p == 0.0) return P_ADD_NZ;
    return P_ADD_POW;
}
static inline double norm_finish(double s, double p) {
    if (p == 2.0) return sqrt(s);
    if (p == 1.0 || p == 0.0 || p == INFINITY || p == -INFINITY) return s;
    return pow(s, 1.0 / p);
}

/* The statistics op needs, into s0 (and s1): the mean (var/std), the max (logsumexp). */
static int reduce_stats(double *s0, double *s1, const void *x, int f64, int64_t A, int64_t K, int64_t M,
                        int op, double param) {
    int rc = 0;
    int64_t n = A * M;
    switch (op) {
    case NEMO_RED_SUM: return run_pass(s0, x, f64, A, K, M, P_ADD_ID, NULL, 0);
    case NEMO_RED_MEAN:
        if ((rc = run_pass(s0, x, f64, A, K, M, P_ADD_ID, NULL, 0)) < 0) return rc;
        for (int64_t i = 0; i < n; i++) s0[i] /= (double)K;
        return 0;
    case NEMO_RED_PROD: return run_pass(s0, x, f64, A, K, M, P_MUL_ID, NULL, 0);
    case NEMO_RED_AMAX: return run_pass(s0, x, f64, A, K, M, P_MAX_ID, NULL, 0);
    case NEMO_RED_AMIN: return run_pass(s0, x, f64, A, K, M, P_MIN_ID, NULL, 0);
    case NEMO_RED_VAR: case NEMO_RED_STD:   /* s0 = mean, s1 = sum of squared deviations */
        if ((rc = run_pass(s0, x, f64, A, K, M, P_ADD_ID, NULL, 0)) < 0) return rc;
        for (int64_t i = 0; i < n; i++) s0[i] /= (double)K;
        return run_pass(s1, x, f64, A, K, M, P_ADD_CSQ, s0, 0);
    case NEMO_RED_NORM: return run_pass(s0, x, f64, A, K, M, norm_pass(param), NULL, param);
    case NEMO_RED_LOGSUMEXP:   /* s0 = max, s1 = sum exp(x - max) (max taken as 0 when infinite) */
        if (M == 1) {   /* rows: the softmax helpers, one thread per row */
            #pragma omp parallel for schedule(static) if (A * K > NEMO_PAR_MIN && A > 1)
            for (int64_t a = 0; a < A; a++) {
                double m;
                if (f64) { const double *r = (const double *)x + a * K; m = rowmax_f64(r, K);
                           s1[a] = isfinite(m) ? expsum_f64(NULL, r, K, m) : 0.0; }
                else { const float *r = (const float *)x + a * K; m = rowmax_f32(r, K);
                       s1[a] = isfinite(m) ? expsum_f32(NULL, r, K, (float)m) : 0.0; }
                s0[a] = m;
            }
            return 0;
        }
        if ((rc = run_pass(s0, x, f64, A, K, M, P_MAX_ID, NULL, 0)) < 0) return rc;
        for (int64_t i = 0; i < n; i++) s1[i] = isfinite(s0[i]) ? s0[i] : 0.0;
        {
            double *c = scratch(n);
            if (!c) return NEMO_ENOMEM;
            memcpy(c, s1, sizeof(double) * (size_t)n);
            rc = run_pass(s1, x, f64, A, K, M, P_ADD_CEXP, c, 0);
            scratch_free(c, n);
        }
        return rc;
    default: return NEMO_ERR(NEMO_EINVAL, "reduce: unknown op %d", op);
    }
}

static inline double var_div(int64_t K, double correction) {
    double d = (double)K - correction;
    return d > 0 ? d : 0.0;
}

static double finish_one(int op, double s0, double s1, int64_t K, double param) {
    switch (op) {
    case NEMO_RED_VAR: return s1 / var_div(K, param);
    case NEMO_RED_STD: return sqrt(s1 / var_div(K, param));
    case NEMO_RED_NORM: return norm_finish(s0, param);
    case NEMO_RED_LOGSUMEXP: return isfinite(s0) ? s0 + log(s1) : s0;
    default: return s0;
    }
}

static int reduce_cpu(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int op,
                      double param) {
    int f64 = x->dtype == NEMO_F64;
    int64_t n = A * M;
    double *s = scratch(2 * n);
    if (!s) return NEMO_ENOMEM;
    int rc = reduce_stats(s, s + n, nemo_tensor_data(x), f64, A, K, M, op, param);
    if (rc >= 0) {
        void *yp = nemo_tensor_data(y);
        for (int64_t i = 0; i < n; i++) {
            double v = finish_one(op, s[i], s[n + i], K, param);
            if (f64) ((double *)yp)[i] = v; else ((float *)yp)[i] = (float)v;
        }
    }
    scratch_free(s, 2 * n);
    return rc;
}
NEMO_REGISTER_KERNEL("reduce", NEMO_CPU, reduce_cpu)

/* ==== "reduce_backward" ==== */

/* dx[i] = EXPR for every element i = (a*K + k)*M + m, with o = a*M + m its output. Blocks of
 * RED_EW elements run in parallel; inside a block the loop runs along stretches of constant o
 * (M == 1) or of consecutive o (M > 1). EXPR may read X[i], G[o], S0[o], S1[o] and C0..C1. */
#define EW(EXPR) do {                                                                          \
    int64_t N_ = A * K * M, nb_ = (N_ + RED_EW - 1) / RED_EW;                                  \
    _Pragma("omp parallel for schedule(static) if (N_ > NEMO_PAR_MIN)")                       \
    for (int64_t b_ = 0; b_ < nb_; b_++) {                                                     \
        int64_t i0 = b_ * RED_EW, end_ = min64(N_, i0 + RED_EW);                               \
        while (i0 < end_) {                                                                    \
            if (M == 1) {                                                                      \
                int64_t o = i0 / K, len_ = min64(end_ - i0, K - i0 % K);                       \
                for (int64_t i = i0; i < i0 + len_; i++) D[i] = (T)(EXPR);                     \
                i0 += len_;                                                                    \
            } else {                                                                           \
                int64_t m_ = i0 % M, ob_ = (i0 / (K * M)) * M + m_ - i0;                       \
                int64_t len_ = min64(end_ - i0, M - m_);                                       \
                for (int64_t i = i0; i < i0 + len_; i++) { int64_t o = ob_ + i; D[i] = (T)(EXPR); } \
                i0 += len_;                                                                    \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
} while (0)

static inline double sgn(double v) { return (double)((v > 0) - (v < 0)); }

#define REDUCE_BWD_FN(NAME, TT)                                                                \
static int NAME(TT *D, const TT *G, const TT *X, int64_t A, int64_t K, int64_t M, int op, double param, \
                double *S0, double *S1) {                                                      \
    typedef TT T;                                                                              \
    const double p = param;                                                                    \
    switch (op) {                                                                              \
    case NEMO_RED_SUM: EW(G[o]); break;                                                        \
    case NEMO_RED_MEAN: { const double inv = 1.0 / (double)K; EW((double)G[o] * inv); break; } \
    case NEMO_RED_PROD:   /* S0 = zero count, S1 = product of the nonzeros */                 \
        EW(S0[o] == 0 ? (double)G[o] * S1[o] / (double)X[i]                                    \
           : (S0[o] == 1 && X[i] == 0 ? (double)G[o] * S1[o] : 0.0)); break;                   \
    case NEMO_RED_AMAX: case NEMO_RED_AMIN:   /* S0 = extreme, S1 = its count */              \
        EW((double)X[i] == S0[o] ? (double)G[o] / S1[o] : 0.0); break;                         \
    case NEMO_RED_VAR: { const double d = var_div(K, p);                                       \
        EW((double)G[o] * 2.0 * ((double)X[i] - S0[o]) / d); break; }                          \
    case NEMO_RED_STD:   /* S0 = mean, S1 = (K - correction) * std */                          \
        EW(S1[o] == 0 ? 0.0 : (double)G[o] * ((double)X[i] - S0[o]) / S1[o]); break;           \
    case NEMO_RED_NORM:                                                                        \
        if (p == 0.0) EW(((void)o, 0.0));                                                               \
        else if (p == 1.0) EW((double)G[o] * sgn((double)X[i]));                               \
        else if (p == 2.0) EW(S0[o] == 0 ? 0.0 : (double)G[o] * (double)X[i] / S0[o]);          \
        else if (isinf(p)) EW(fabs((double)X[i]) == S0[o] ? (double)G[o] * sgn((double)X[i]) / S1[o] : 0.0); \
        else EW(S0[o] == 0 || X[i] == 0 ? 0.0 : (double)G[o] * sgn((double)X[i])                \
                * pow(fabs((double)X[i]) / S0[o], p - 1.0));                                   \
        break;                                                                                 \
    case NEMO_RED_LOGSUMEXP:   /* S0 = logsumexp */                                            \
        EW(isfinite(S0[o]) ? (double)G[o] * exp((double)X[i] - S0[o]) : 0.0); break;           \
    default: return NEMO_ERR(NEMO_EINVAL, "reduce backward: unknown op %d", op);               \
    }                                                                                          \
    return 0;                                                                                  \
}
REDUCE_BWD_FN(reduce_bwd_f32, float)
REDUCE_BWD_FN(reduce_bwd_f64, double)

static int reduce_backward_cpu(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int64_t A,
                               int64_t K, int64_t M, int op, double param) {
    int f64 = dx->dtype == NEMO_F64;
    int64_t n = A * M;
    int rc = 0;
    double *s = NULL;
    const void *xp = x ? nemo_tensor_data(x) : NULL;
    if (op != NEMO_RED_SUM && op != NEMO_RED_MEAN) {
        if (!xp) return NEMO_ERR(NEMO_EINVAL, "reduce backward: op %d needs the input's values", op);
        s = scratch(2 * n);
        if (!s) return NEMO_ENOMEM;
        double *s0 = s, *s1 = s + n;
        switch (op) {
        case NEMO_RED_PROD:
            if ((rc = run_pass(s0, xp, f64, A, K, M, P_ADD_ISZ, NULL, 0)) < 0) break;
            rc = run_pass(s1, xp, f64, A, K, M, P_MUL_NZVAL, NULL, 0);
            break;
        case NEMO_RED_AMAX: case NEMO_RED_AMIN:
            if ((rc = run_pass(s0, xp, f64, A, K, M, op == NEMO_RED_AMAX ? P_MAX_ID : P_MIN_ID, NULL, 0)) < 0) break;
            rc = run_pass(s1, xp, f64, A, K, M, P_ADD_EQC, s0, 0);
            break;
        case NEMO_RED_VAR: case NEMO_RED_STD:
            if ((rc = reduce_stats(s0, s1, xp, f64, A, K, M, op, param)) < 0) break;
            if (op == NEMO_RED_STD)
                for (int64_t i = 0; i < n; i++) s1[i] = var_div(K, param) * sqrt(s1[i] / var_div(K, param));
            break;
        case NEMO_RED_NORM:
            if ((rc = run_pass(s0, xp, f64, A, K, M, norm_pass(param), NULL, param)) < 0) break;
            for (int64_t i = 0; i < n; i++) s0[i] = norm_finish(s0[i], param);
            if (isinf(param)) rc = run_pass(s1, xp, f64, A, K, M, P_ADD_ABSEQC, s0, 0);
            break;
        case NEMO_RED_LOGSUMEXP:
            if ((rc = reduce_stats(s0, s1, xp, f64, A, K, M, op, param)) < 0) break;
            for (int64_t i = 0; i < n; i++) s0[i] = finish_one(op, s0[i], s1[i], K, param);
            break;
        default: rc = NEMO_ERR(NEMO_EINVAL, "reduce backward: unknown op %d", op);
        }
    }
    if (rc >= 0) {
        if (f64) rc = reduce_bwd_f64(nemo_tensor_data(dx), nemo_tensor_data(g), xp, A, K, M, op, param,
                                     s, s ? s + n : NULL);
        else rc = reduce_bwd_f32(nemo_tensor_data(dx), nemo_tensor_data(g), xp, A, K, M, op, param,
                                 s, s ? s + n : NULL);
    }
    scratch_free(s, 2 * n);
    return rc;
}
NEMO_REGISTER_KERNEL("reduce_backward", NEMO_CPU, reduce_backward_cpu)

/* ==== "argreduce" and "max_dim_backward" ==== */

/* The first extreme element wins; a NaN is more extreme than anything and stops the search. */
#define BETTER(v, best) (is_min ? ((v) < (best) || (v) != (v)) : ((v) > (best) || (v) != (v)))

#define ARGREDUCE_FN(NAME, TT, S)                                                               \
static void NAME(TT *V, int64_t *I, const TT *X, int64_t A, int64_t K, int64_t M, int is_min) { \
    typedef TT T;                                                                              \
    if (M == 1) {                                                                              \
        _Pragma("omp parallel for schedule(static) if (A * K > NEMO_PAR_MIN && A > 1)")        \
        for (int64_t a = 0; a < A; a++) {                                                      \
            const T *x = X + a * K;                                                            \
            double best = (is_min ? min_id_##S##_chunk : max_id_##S##_chunk)(x, K, 0, 0);      \
            int64_t bi = 0;                                                                    \
            if (best != best) { while (bi < K - 1 && x[bi] == x[bi]) bi++; }                   \
            else { while (bi < K - 1 && (double)x[bi] != best) bi++; }                         \
            if (V) V[a] = (T)best;                                                             \
            I[a] = bi;                                                                         \
        }                                                                                      \
        return;                                                                                \
    }                                                                                          \
    int64_t nb = (M + RED_MB - 1) / RED_MB;                                                    \
    _Pragma("omp parallel for schedule(static) if (A * K * M > NEMO_PAR_MIN && A * nb > 1)")   \
    for (int64_t t = 0; t < A * nb; t++) {                                                     \
        int64_t a = t / nb, m0 = (t % nb) * RED_MB;                                            \
        int mw = (int)min64(RED_MB, M - m0);                                                   \
        T best[RED_MB]; int64_t bi[RED_MB];                                                    \
        const T *x = X + a * K * M + m0;                                                       \
        for (int j = 0; j < mw; j++) { best[j] = x[j]; bi[j] = 0; }                            \
        for (int64_t k = 1; k < K; k++) {                                                      \
            const T *row = x + k * M;                                                          \
            for (int j = 0; j < mw; j++)                                                       \
                if (best[j] == best[j] && BETTER(row[j], best[j])) { best[j] = row[j]; bi[j] = k; } \
        }                                                                                      \
        for (int j = 0; j < mw; j++) { if (V) V[a * M + m0 + j] = best[j]; I[a * M + m0 + j] = bi[j]; } \
    }                                                                                          \
}
ARGREDUCE_FN(argreduce_f32, float, f32)
ARGREDUCE_FN(argreduce_f64, double, f64)

static int argreduce_cpu(nemo_tensor *vals, nemo_tensor *idx, const nemo_tensor *x, int64_t A, int64_t K,
                         int64_t M, int is_min) {
    if (K < 1) return NEMO_ERR(NEMO_EINVAL, "argreduce: empty reduction");
    if (x->dtype == NEMO_F64)
        argreduce_f64(vals ? nemo_tensor_data(vals) : NULL, nemo_tensor_data(idx), nemo_tensor_data(x), A, K, M, is_min);
    else
        argreduce_f32(vals ? nemo_tensor_data(vals) : NULL, nemo_tensor_data(idx), nemo_tensor_data(x), A, K, M, is_min);
    return 0;
}
NEMO_REGISTER_KERNEL("argreduce", NEMO_CPU, argreduce_cpu)

static int max_dim_backward_cpu(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *idx, int64_t A,
                                int64_t K, int64_t M) {
    size_t esz = (size_t)nemo_dtype_size(dx->dtype);
    char *d = nemo_tensor_data(dx);
    const char *gp = nemo_tensor_data(g);
    const int64_t *ip = nemo_tensor_data(idx);
    memset(d, 0, esz * (size_t)(A * K * M));
    for (int64_t o = 0; o < A * M; o++) {
        int64_t k = ip[o];
        if (k < 0 || k >= K)
            return NEMO_ERR(NEMO_EINVAL, "max backward: index %lld out of range for a dim of size %lld",
                            (long long)k, (long long)K);
        int64_t a = o / M, m = o % M;
        memcpy(d + esz * (size_t)((a * K + k) * M + m), gp + esz * (size_t)o, esz);
    }
    return 0;
}
NEMO_REGISTER_KERNEL("max_dim_backward", NEMO_CPU, max_dim_backward_cpu)

/* ==== "softmax" and "softmax_backward" ==== */

static inline vfw vmax_f32(vfw a, vfw v) { return sel_f((v > a) | (v != v), v, a); }
static inline vdw vmax_f64(vdw a, vdw v) { return sel_d((v > a) | (v != v), v, a); }

/* Row mode: the max (max pass), exponentials stored in y and summed in double (2 x VW lanes),
 * one scale; log mode writes (x - max) - log(sum). Column mode: VW columns per vector, RED_MB
 * columns per task. Backward: softmax dx = y * (g - sum(g*y)); log_softmax
 * dx = g - exp(y) * sum(g). */
#define SOFTMAX_FNS(S, T)                                                                      \
static void softmax_row_##S(T *y, const T *x, int64_t K, int lg) {                             \
    const T mx = (T)rowmax_##S(x, K);                                                          \
    double s = expsum_##S(lg ? NULL : y, x, K, mx);                                            \
    if (lg) { const T ls = (T)log(s); for (int64_t k = 0; k < K; k++) y[k] = (x[k] - mx) - ls; } \
    else { const T inv = (T)(1.0 / s); for (int64_t k = 0; k < K; k++) y[k] *= inv; }          \
}                                                                                              \
static void softmax_cols_##S(T *y, const T *x, int64_t K, int64_t M, int64_t mw, int lg) {     \
    T mx[RED_MB], f[RED_MB]; double s[RED_MB];                                                 \
    int64_t nv = mw / VW * VW;                                                                   \
    for (int64_t j = 0; j < mw; j++) { mx[j] = -INFINITY; s[j] = 0; }                          \
    for (int64_t k = 0; k < K; k++) {                                                          \
        const T *r = x + k * M;                                                                \
        for (int64_t j = 0; j < nv; j += VW) st_##S(mx + j, vmax_##S(ld_##S(mx + j), ld_##S(r + j))); \
        for (int64_t j = nv; j < mw; j++) ACC_OP_MAX(mx[j], r[j]);                             \
    }                                                                                          \
    for (int64_t k = 0; k < K; k++) {                                                          \
        const T *r = x + k * M; T *yr = y + k * M;                                             \
        for (int64_t j = 0; j < nv; j += VW) {                                                  \
            vt_##S e = VEXP_##S(ld_##S(r + j) - ld_##S(mx + j));                               \
            if (!lg) st_##S(yr + j, e);                                                        \
            st_f64(s + j, ld_f64(s + j) + cvt_##S(e));                                         \
        }                                                                                      \
        for (int64_t j = nv; j < mw; j++) { T e = EXP_##S(r[j] - mx[j]); if (!lg) yr[j] = e; s[j] += (double)e; } \
    }                                                                                          \
    for (int64_t j = 0; j < mw; j++) f[j] = lg ? (T)log(s[j]) : (T)(1.0 / s[j]);               \
    for (int64_t k = 0; k < K; k++) {                                                          \
        const T *r = x + k * M; T *yr = y + k * M;                                             \
        if (lg) for (int64_t j = 0; j < mw; j++) yr[j] = (r[j] - mx[j]) - f[j];                \
        else for (int64_t j = 0; j < mw; j++) yr[j] *= f[j];                                   \
    }                                                                                          \
}                                                                                              \
static void softmax_bwd_row_##S(T *d, const T *g, const T *y, int64_t K, int lg) {             \
    vdw s0 = bc_d(0), s1 = bc_d(0);                                                           \
    int64_t i = 0;                                                                             \
    if (lg) for (; i + 2 * VW <= K; i += 2 * VW) { s0 += cvt_##S(ld_##S(g + i)); s1 += cvt_##S(ld_##S(g + i + VW)); } \
    else for (; i + 2 * VW <= K; i += 2 * VW) {                                                        \
        s0 += cvt_##S(ld_##S(g + i)) * cvt_##S(ld_##S(y + i));                                 \
        s1 += cvt_##S(ld_##S(g + i + VW)) * cvt_##S(ld_##S(y + i + VW));                         \
    }                                                                                          \
    double s = hsum_d(s0 + s1);                                                                \
    for (; i < K; i++) s += lg ? (double)g[i] : (double)g[i] * (double)y[i];                   \
    const T sT = (T)s;                                                                         \
    if (lg) {                                                                                  \
        lsm_bwd_##S(d, g, y, K, sT);                                                           \
    } else {                                                                                   \
        for (int64_t k = 0; k < K; k++) d[k] = y[k] * (g[k] - sT);                             \
    }                                                                                          \
}                                                                                              \
static void softmax_bwd_cols_##S(T *d, const T *g, const T *y, int64_t K, int64_t M, int64_t mw, int lg) { \
    double s[RED_MB]; T sT[RED_MB];                                                            \
    int64_t nv = mw / VW * VW;                                                                   \
    for (int64_t j = 0; j < mw; j++) s[j] = 0;                                                 \
    for (int64_t k = 0; k < K; k++) {                                                          \
        const T *gr = g + k * M, *yr = y + k * M;                                              \
        for (int64_t j = 0; j < nv; j += VW)                                                    \
            st_f64(s + j, ld_f64(s + j) + (lg ? cvt_##S(ld_##S(gr + j))                        \
                                           : cvt_##S(ld_##S(gr + j)) * cvt_##S(ld_##S(yr + j)))); \
        for (int64_t j = nv; j < mw; j++) s[j] += lg ? (double)gr[j] : (double)gr[j] * (double)yr[j]; \
    }                                                                                          \
    for (int64_t j = 0; j < mw; j++) sT[j] = (T)s[j];                                          \
    for (int64_t k = 0; k < K; k++) {                                                          \
        const T *gr = g + k * M, *yr = y + k * M; T *dr = d + k * M;                           \
        if (lg) {                                                                              \
            for (int64_t j = 0; j < nv; j += VW)                                                \
                st_##S(dr + j, ld_##S(gr + j) - VEXP_##S(ld_##S(yr + j)) * ld_##S(sT + j));    \
            for (int64_t j = nv; j < mw; j++) dr[j] = gr[j] - EXP_##S(yr[j]) * sT[j];          \
        } else {                                                                               \
            for (int64_t j = 0; j < mw; j++) dr[j] = yr[j] * (gr[j] - sT[j]);                  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
static void softmax_##S(T *Y, const T *X, int64_t A, int64_t K, int64_t M, int lg) {           \
    if (M == 1) {                                                                              \
        _Pragma("omp parallel for schedule(static) if (A * K > NEMO_PAR_MIN && A > 1)")        \
        for (int64_t a = 0; a < A; a++) softmax_row_##S(Y + a * K, X + a * K, K, lg);          \
        return;                                                                                \
    }                                                                                          \
    int64_t nb = (M + RED_MB - 1) / RED_MB;                                                    \
    _Pragma("omp parallel for schedule(static) if (A * K * M > NEMO_PAR_MIN && A * nb > 1)")   \
    for (int64_t t = 0; t < A * nb; t++) {                                                     \
        int64_t a = t / nb, m0 = (t % nb) * RED_MB;                                            \
        softmax_cols_##S(Y + a * K * M + m0, X + a * K * M + m0, K, M, min64(RED_MB, M - m0), lg); \
    }                                                                                          \
}                                                                                              \
static void softmax_bwd_##S(T *D, const T *G, const T *Y, int64_t A, int64_t K, int64_t M, int lg) { \
    if (M == 1) {                                                                              \
        _Pragma("omp parallel for schedule(static) if (A * K > NEMO_PAR_MIN && A > 1)")        \
        for (int64_t a = 0; a < A; a++) softmax_bwd_row_##S(D + a * K, G + a * K, Y + a * K, K, lg); \
        return;                                                                                \
    }                                                                                          \
    int64_t nb = (M + RED_MB - 1) / RED_MB;                                                    \
    _Pragma("omp parallel for schedule(static) if (A * K * M > NEMO_PAR_MIN && A * nb > 1)")   \
    for (int64_t t = 0; t < A * nb; t++) {                                                     \
        int64_t a = t / nb, m0 = (t % nb) * RED_MB, base = a * K * M + m0;                     \
        softmax_bwd_cols_##S(D + base, G + base, Y + base, K, M, min64(RED_MB, M - m0), lg);   \
    }                                                                                          \
}
SOFTMAX_FNS(f32, float)
SOFTMAX_FNS(f64, double)

static int softmax_cpu(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int lg) {
    if (x->dtype == NEMO_F64) softmax_f64(nemo_tensor_data(y), nemo_tensor_data(x), A, K, M, lg);
    else softmax_f32(nemo_tensor_data(y), nemo_tensor_data(x), A, K, M, lg);
    return 0;
}
NEMO_REGISTER_KERNEL("softmax", NEMO_CPU, softmax_cpu)

static int softmax_backward_cpu(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *y, int64_t A,
                                int64_t K, int64_t M, int lg) {
    if (dx->dtype == NEMO_F64)
        softmax_bwd_f64(nemo_tensor_data(dx), nemo_tensor_data(g), nemo_tensor_data(y), A, K, M, lg);
    else
        softmax_bwd_f32(nemo_tensor_data(dx), nemo_tensor_data(g), nemo_tensor_data(y), A, K, M, lg);
    return 0;
}
NEMO_REGISTER_KERNEL("softmax_backward", NEMO_CPU, softmax_backward_cpu)

/* ==== "cumsum" ==== */

/* Running sums in double along K; reverse runs from the last element to the first. */
#define CUMSUM_FN(NAME, TT)                                                                    \
static void NAME(TT *Y, const TT *X, int64_t A, int64_t K, int64_t M, int rev) {               \
    typedef TT T;                                                                              \
    int64_t nb = (M + RED_MB - 1) / RED_MB;                                                    \
    _Pragma("omp parallel for schedule(static) if (A * K * M > NEMO_PAR_MIN && A * nb > 1)")   \
    for (int64_t t = 0; t < A * nb; t++) {                                                     \
        int64_t a = t / nb, m0 = (t % nb) * RED_MB;                                            \
        int mw = (int)min64(RED_MB, M - m0);                                                   \
        double s[RED_MB];                                                                      \
        for (int j = 0; j < mw; j++) s[j] = 0;                                                 \
        for (int64_t kk = 0; kk < K; kk++) {                                                   \
            int64_t q = (a * K + (rev ? K - 1 - kk : kk)) * M + m0;                            \
            for (int j = 0; j < mw; j++) { s[j] += (double)X[q + j]; Y[q + j] = (T)s[j]; }     \
        }                                                                                      \
    }                                                                                          \
}
CUMSUM_FN(cumsum_f32, float)
CUMSUM_FN(cumsum_f64, double)

static int cumsum_cpu(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int rev) {
    if (x->dtype == NEMO_F64) cumsum_f64(nemo_tensor_data(y), nemo_tensor_data(x), A, K, M, rev);
    else cumsum_f32(nemo_tensor_data(y), nemo_tensor_data(x), A, K, M, rev);
    return 0;
}
NEMO_REGISTER_KERNEL("cumsum", NEMO_CPU, cumsum_cpu)
