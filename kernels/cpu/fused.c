/*
 * kernels/cpu/fused.c: CPU kernels of the fused DiT ops (rope, modulate, gated_add) and their
 * backward passes, on contiguous float32 / float64 arrays of the compute dtype.
 *
 * Non-obvious rules
 * - Every value is computed with the roundings of the unfused op sequence (products and sums
 *   written out, -ffp-contract=off), so float32 / float64 results equal diffusers' op sequence
 *   bit for bit.
 * - The gradients of per-sample vectors (dscale, dshift, dgate: (B, D) or (1, D), broadcast
 *   over the S tokens) sum the compute-dtype products in float64 over the rows (b, s) in order,
 *   exactly as mul followed by sum_to does. Tasks are (sample group, chunk of DCH channels):
 *   each task owns its channels and walks all its rows in order, writing dx / da on the way, so
 *   one pass reads g and x once and the result does not depend on the thread count.
 * Shapes: x, g, y (B, S, D) row-major; scale, shift, gate rows of D with row stride sb = D
 * (per sample) or 0 (shared by the batch). rope: x (nb, S, nh, D), cos / sin (S, D).
 */
#include "../../engine/internal.h"

#define DCH 64          /* channels per reduction task */
/* Size above which these memory-bound kernels use the thread pool (see kernels/cpu/pointwise.c). */
#define FU_PAR_MIN (4 * NEMO_PAR_MIN)

/* ==== rope ==== */

/* out[2i] = x[2i] c[2i] - x[2i+1] s[2i]; out[2i+1] = x[2i+1] c[2i+1] + x[2i] s[2i+1].
 * backward: dx[2i] = g[2i] c[2i] + g[2i+1] s[2i+1]; dx[2i+1] = g[2i+1] c[2i+1] - g[2i] s[2i].
 * The subtractions are written as additions of a negated product (the same bits): GCC 12's
 * vectoriser turns an alternating sub/add pair into vfmaddsub even under -ffp-contract=off. */
#define ROPE_FN(name, T)                                                                       \
static void name(T *y, const T *x, const T *cs, const T *sn, int64_t nb, int64_t S, int64_t nh, \
                 int64_t D, int backward) {                                                    \
    int64_t rows = nb * S, half = D / 2;                                                       \
    _Pragma("omp parallel for if (rows * nh * D > FU_PAR_MIN)")                                \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const T *c = cs + (r % S) * D, *s = sn + (r % S) * D;                                  \
        for (int64_t h = 0; h < nh; h++) {                                                     \
            const T *xp = x + (r * nh + h) * D;                                                \
            T *yp = y + (r * nh + h) * D;                                                      \
            if (!backward) {                                                                   \
                for (int64_t i = 0; i < half; i++) {                                           \
                    T x0 = xp[2 * i], x1 = xp[2 * i + 1], r0 = -x1;                            \
                    yp[2 * i] = x0 * c[2 * i] + r0 * s[2 * i];                                 \
                    yp[2 * i + 1] = x1 * c[2 * i + 1] + x0 * s[2 * i + 1];                     \
                }                                                                              \
            } else {                                                                           \
                for (int64_t i = 0; i < half; i++) {                                           \
                    T g0 = xp[2 * i], g1 = xp[2 * i + 1], r1 = -g0;                            \
                    yp[2 * i] = g0 * c[2 * i] + g1 * s[2 * i + 1];                             \
                    yp[2 * i + 1] = g1 * c[2 * i + 1] + r1 * s[2 * i];                         \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}
ROPE_FN(rope_f32, float)
ROPE_FN(rope_f64, double)

static int rope_cpu(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin,
                    int64_t nb, int64_t S, int64_t nh, int64_t D, int backward) {
    if (y->dtype == NEMO_F32)
        rope_f32(nemo_tensor_data(y), nemo_tensor_data(x), nemo_tensor_data(cos), nemo_tensor_data(sin),
                 nb, S, nh, D, backward);
    else
        rope_f64(nemo_tensor_data(y), nemo_tensor_data(x), nemo_tensor_data(cos), nemo_tensor_data(sin),
                 nb, S, nh, D, backward);
    return 0;
}
NEMO_REGISTER_KERNEL("rope", NEMO_CPU, rope_cpu)

/* ==== modulate ==== */

#define MODULATE_FN(name, T)                                                                   \
static void name(T *y, const T *x, const T *sc, const T *sh, int64_t B, int64_t S, int64_t D,   \
                 int64_t sb) {                                                                 \
    int64_t rows = B * S;                                                                      \
    _Pragma("omp parallel for if (rows * D > FU_PAR_MIN)")                                     \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const T *xp = x + r * D, *s = sc + (r / S) * sb;                                       \
        T *yp = y + r * D;                                                                     \
        if (sh) {                                                                              \
            const T *h = sh + (r / S) * sb;                                                    \
            for (int64_t d = 0; d < D; d++) yp[d] = xp[d] * ((T)1 + s[d]) + h[d];              \
        } else {                                                                               \
            for (int64_t d = 0; d < D; d++) yp[d] = xp[d] * ((T)1 + s[d]);                     \
        }                                                                                      \
    }                                                                                          \
}
MODULATE_FN(modulate_f32, float)
MODULATE_FN(modulate_f64, double)

static int modulate_cpu(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *scale, const nemo_tensor *shift,
                        int64_t B, int64_t S, int64_t D, int64_t sb) {
    if (y->dtype == NEMO_F32)
        modulate_f32(nemo_tensor_data(y), nemo_tensor_data(x), nemo_tensor_data(scale),
                     shift ? nemo_tensor_data(shift) : NULL, B, S, D, sb);
    else
        modulate_f64(nemo_tensor_data(y), nemo_tensor_data(x), nemo_tensor_data(scale),
                     shift ? nemo_tensor_data(shift) : NULL, B, S, D, sb);
    return 0;
}
NEMO_REGISTER_KERNEL("modulate", NEMO_CPU, modulate_cpu)

/* One backward for modulate and gated_add, per task (group of samples, chunk of channels):
 *   out[r, d] = g[r, d] * (1 + v[b, d])   (dx of modulate, plus_one)  or  g[r, d] * v[b, d]  (da of gated)
 *   acc1[b, d] = sum_r (double)(g[r, d] * x[r, d]),  acc2[b, d] = sum_r (double)g[r, d]
 * out, acc1 (d1) and acc2 (d2) may each be NULL. */
#define VEC_BWD_FN(name, T)                                                                    \
static void name(T *out, T *d1, T *d2, const T *g, const T *x, const T *v, int plus_one,        \
                 int64_t B, int64_t S, int64_t D, int64_t sb) {                                \
    int64_t ngroups = sb ? B : 1, bper = sb ? 1 : B;                                           \
    if (!d1 && !d2) {                                                                          \
        int64_t rows = B * S;                                                                  \
        _Pragma("omp parallel for if (rows * D > FU_PAR_MIN)")                                 \
        for (int64_t r = 0; r < rows; r++) {                                                   \
            const T *gp = g + r * D, *vp = v + (r / S) * sb;                                   \
            T *op = out + r * D;                                                               \
            if (plus_one) for (int64_t d = 0; d < D; d++) op[d] = gp[d] * ((T)1 + vp[d]);      \
            else for (int64_t d = 0; d < D; d++) op[d] = gp[d] * vp[d];                        \
        }                                                                                      \
        return;                                                                                \
    }                                                                                          \
    int64_t nch = (D + DCH - 1) / DCH;                                                         \
    _Pragma("omp parallel for schedule(static) if (B * S * D > FU_PAR_MIN)")                   \
    for (int64_t task = 0; task < ngroups * nch; task++) {                                     \
        int64_t grp = task / nch, d0 = (task % nch) * DCH, d1e = d0 + DCH;                     \
        if (d1e > D) d1e = D;                                                                  \
        int64_t w = d1e - d0;                                                                  \
        double a1[DCH], a2[DCH];                                                               \
        for (int64_t j = 0; j < w; j++) { a1[j] = 0; a2[j] = 0; }                              \
        for (int64_t b = grp * bper; b < (grp + 1) * bper; b++) {                              \
            const T *vp = v + b * sb + d0;                                                     \
            for (int64_t s = 0; s < S; s++) {                                                  \
                int64_t r = b * S + s;                                                         \
                const T *gp = g + r * D + d0, *xp = x + r * D + d0;                            \
                if (out) {                                                                     \
                    T *op = out + r * D + d0;                                                  \
                    if (plus_one) for (int64_t j = 0; j < w; j++) op[j] = gp[j] * ((T)1 + vp[j]); \
                    else for (int64_t j = 0; j < w; j++) op[j] = gp[j] * vp[j];               \
                }                                                                              \
                if (d1) for (int64_t j = 0; j < w; j++) a1[j] += (double)(gp[j] * xp[j]);      \
                if (d2) for (int64_t j = 0; j < w; j++) a2[j] += (double)gp[j];                \
            }                                                                                  \
        }                                                                                      \
        if (d1) for (int64_t j = 0; j < w; j++) d1[grp * D + d0 + j] = (T)a1[j];               \
        if (d2) for (int64_t j = 0; j < w; j++) d2[grp * D + d0 + j] = (T)a2[j];               \
    }                                                                                          \
}
VEC_BWD_FN(vec_bwd_f32, float)
VEC_BWD_FN(vec_bwd_f64, double)

static void *data_or_null(nemo_tensor *t) { return t ? nemo_tensor_data(t) : NULL; }

static int modulate_backward_cpu(nemo_tensor *dx, nemo_tensor *dscale, nemo_tensor *dshift, const nemo_tensor *g,
                                 const nemo_tensor *x, const nemo_tensor *scale, int64_t B, int64_t S, int64_t D,
                                 int64_t sb) {
    if (g->dtype == NEMO_F32)
        vec_bwd_f32(data_or_null(dx), data_or_null(dscale), data_or_null(dshift), nemo_tensor_data(g),
                    nemo_tensor_data(x), nemo_tensor_data(scale), 1, B, S, D, sb);
    else
        vec_bwd_f64(data_or_null(dx), data_or_null(dscale), data_or_null(dshift), nemo_tensor_data(g),
                    nemo_tensor_data(x), nemo_tensor_data(scale), 1, B, S, D, sb);
    return 0;
}
NEMO_REGISTER_KERNEL("modulate_backward", NEMO_CPU, modulate_backward_cpu)

/* ==== gated_add ==== */

#define GATED_FN(name, T)                                                                      \
static void name(T *y, const T *x, const T *gate, const T *a, int64_t B, int64_t S, int64_t D,  \
                 int64_t gb) {                                                                 \
    int64_t rows = B * S;                                                                      \
    _Pragma("omp parallel for if (rows * D > FU_PAR_MIN)")                                     \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const T *xp = x + r * D, *ap = a + r * D, *gp = gate + (r / S) * gb;                   \
        T *yp = y + r * D;                                                                     \
        for (int64_t d = 0; d < D; d++) yp[d] = xp[d] + gp[d] * ap[d];                         \
    }                                                                                          \
}
GATED_FN(gated_f32, float)
GATED_FN(gated_f64, double)

static int gated_add_cpu(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *gate, const nemo_tensor *a,
                         int64_t B, int64_t S, int64_t D, int64_t gb) {
    if (y->dtype == NEMO_F32)
        gated_f32(nemo_tensor_data(y), nemo_tensor_data(x), nemo_tensor_data(gate), nemo_tensor_data(a), B, S, D, gb);
    else
        gated_f64(nemo_tensor_data(y), nemo_tensor_data(x), nemo_tensor_data(gate), nemo_tensor_data(a), B, S, D, gb);
    return 0;
}
NEMO_REGISTER_KERNEL("gated_add", NEMO_CPU, gated_add_cpu)

/* da = g * gate; dgate = sum_rows g * a (the gate's product order: gate * a forward, g * a back). */
static int gated_add_backward_cpu(nemo_tensor *da, nemo_tensor *dgate, const nemo_tensor *g, const nemo_tensor *gate,
                                  const nemo_tensor *a, int64_t B, int64_t S, int64_t D, int64_t gb) {
    if (g->dtype == NEMO_F32)
        vec_bwd_f32(data_or_null(da), data_or_null(dgate), NULL, nemo_tensor_data(g), nemo_tensor_data(a),
                    nemo_tensor_data(gate), 0, B, S, D, gb);
    else
        vec_bwd_f64(data_or_null(da), data_or_null(dgate), NULL, nemo_tensor_data(g), nemo_tensor_data(a),
                    nemo_tensor_data(gate), 0, B, S, D, gb);
    return 0;
}
NEMO_REGISTER_KERNEL("gated_add_backward", NEMO_CPU, gated_add_backward_cpu)
