/*
 * kernels/cuda/fused.cu: the CUDA kernels of the fused DiT ops, with the signatures and formulas
 * of kernels/cpu/fused.c (front-end: engine/ops/fused.c):
 *
 *   "rope"               int (y, x, cos, sin, nb, S, nh, D, backward)
 *                        x, y (nb, S, nh, D), cos / sin (S, D); forward
 *                        y[2i] = x[2i] c[2i] - x[2i+1] s[2i], y[2i+1] = x[2i+1] c[2i+1] + x[2i] s[2i+1];
 *                        backward (x holds g) y[2i] = g[2i] c[2i] + g[2i+1] s[2i+1],
 *                        y[2i+1] = g[2i+1] c[2i+1] - g[2i] s[2i].
 *   "modulate"           int (y, x, scale, shift, B, S, D, sb)       y = x * (1 + scale) + shift
 *   "modulate_backward"  int (dx, dscale, dshift, g, x, scale, B, S, D, sb)
 *   "gated_add"          int (y, x, gate, a, B, S, D, gb)            y = x + gate * a
 *   "gated_add_backward" int (da, dgate, g, gate, a, B, S, D, gb)
 *       x, g, a, y, dx, da (B, S, D); scale, shift, gate and their gradients rows of D with row
 *       stride sb / gb = D (one row per sample: (B, D)) or 0 (one row shared: (1, D)).
 *
 * Every tensor is dense, on one CUDA device; shift, and each gradient output, may be NULL. The
 * small ones (cos, sin, scale, shift, gate and their gradients) are the compute dtype, float32
 * or float64. The large ones (x, g, a, y, dx, da) are the compute dtype too, or all bfloat16 or
 * all float16 with a float32 compute dtype: the kernels also register as "<name>.lp", which
 * tells the front-end that they read bf16 / f16 operands into float32 and round the result
 * once, the numbers of converting, computing in float32 and rounding, in one pass over memory
 * instead of three. Launchers return 0 or a negative status with the plugin's error text, run
 * on the device's stream and do not synchronize.
 *
 * Non-obvious rules
 * - The elementwise results use the CPU's operations in the CPU's order, never fused (rn_*),
 *   so y, dx and da equal the CPU bit for bit in float32 and float64 (the subtraction of rope
 *   is the CPU's addition of a negated product: the same bits).
 * - The per-sample vector gradients (dscale, dshift, dgate) sum compute-dtype products g*x
 *   (or g) in double over the rows of a group (one sample, or all samples when the vector is
 *   shared). Rows are cut into chunks (their number a function of the shapes only); one thread
 *   per (group, chunk, channel) adds its rows in order and a second kernel adds the chunks in
 *   order, so results are deterministic and agree with the CPU's sequential double sum to
 *   rounding, not bit for bit. No atomics.
 */
#include <algorithm>
#include "util.cuh"

/* ==== rope ==== */

/* One rotated pair (v0, v1) with table entries c0, c1, s0, s1 -> (r0, r1). */
template <typename T>
__device__ __forceinline__ void rope_pair(T v0, T v1, T c0, T c1, T s0, T s1, int backward, T &r0, T &r1) {
    if (!backward) {
        r0 = rn_add(rn_mul(v0, c0), rn_mul(-v1, s0));
        r1 = rn_add(rn_mul(v1, c1), rn_mul(v0, s1));
    } else {
        r0 = rn_add(rn_mul(v0, c0), rn_mul(v1, s1));
        r1 = rn_add(rn_mul(v1, c1), rn_mul(-v0, s0));
    }
}

/* Pair p: row q = p / half of the (nb S nh) rows, i = p % half; its table row is (q / nh) % S.
 * With vec (half a multiple of the pairs in 16 bytes, x and y aligned) a thread-step rotates the
 * pairs of one 16-byte vector, which share their row. */
template <typename T, typename X>
__global__ void rope_k(typename X::S *y, const typename X::S *x, const T *cs, const T *sn, int64_t npairs,
                       nemo_cuda_fdiv S, nemo_cuda_fdiv nh, nemo_cuda_fdiv hf, int backward, int vec) {
    const int64_t half = hf.d;
    if (vec) {
        typedef typename X::S S_;
        constexpr int V_ = 16 / (int)sizeof(S_), P_ = V_ / 2;
        NEMO_CUDA_LOOP(k, npairs / P_) {
            const int64_t p = k * P_;
            const int64_t q = nemo_cuda_fdiv_q(hf, p), i = p - q * half, qh = nemo_cuda_fdiv_q(nh, q);
            const int64_t srow = qh - nemo_cuda_fdiv_q(S, qh) * S.d;
            const int64_t t = srow * (2 * half) + 2 * i;
            nemo_cuda_pack<S_> pi, po;
            pi.u = ((const uint4 *)x)[k];   /* elements 2p .. 2p + V_ - 1 */
            NEMO_UNROLL for (int j = 0; j < P_; j++) {
                T r0, r1;
                rope_pair<T>(X::ld(pi.s[2 * j]), X::ld(pi.s[2 * j + 1]), cs[t + 2 * j], cs[t + 2 * j + 1], sn[t + 2 * j],
                             sn[t + 2 * j + 1], backward, r0, r1);
                po.s[2 * j] = X::st(r0);
                po.s[2 * j + 1] = X::st(r1);
            }
            ((uint4 *)y)[k] = po.u;
        }
        return;
    }
    NEMO_CUDA_LOOP(p, npairs) {
        const int64_t q = nemo_cuda_fdiv_q(hf, p), i = p - q * half, qh = nemo_cuda_fdiv_q(nh, q);
        const int64_t srow = qh - nemo_cuda_fdiv_q(S, qh) * S.d;
        const int64_t o = q * (2 * half) + 2 * i, t = srow * (2 * half) + 2 * i;
        T r0, r1;
        rope_pair<T>(X::ld(x[o]), X::ld(x[o + 1]), cs[t], cs[t + 1], sn[t], sn[t + 1], backward, r0, r1);
        y[o] = X::st(r0);
        y[o + 1] = X::st(r1);
    }
}

/* ==== modulate / gated_add ==== */

/* The elementwise loop of the (B, S, D) kernels below: BODY(i, e, xv...) computes element i of
 * its row's vector index e (= (i / D / S) * stride + i % D). With vec (D a multiple of the vector
 * width and every large operand 16-byte aligned: the launcher's rows_vec) each thread-step loads
 * 16 bytes of every large operand (IN names them, OUT the output) and the V elements share a row;
 * otherwise one element at a time. */
#define ROWS_LOOP1(OUT, IN, BODY) {                                                            \
        typedef typename X::S S_;                                                              \
        constexpr int V_ = 16 / (int)sizeof(S_);                                               \
        if (vec) {                                                                             \
            NEMO_CUDA_LOOP(k_, total / V_) {                                                   \
                const int64_t i0 = k_ * V_, r = nemo_cuda_fdiv_q(D, i0), e0 = nemo_cuda_fdiv_q(S, r) * sb + (i0 - r * D.d); \
                nemo_cuda_pack<S_> p1_, po_;                                                   \
                p1_.u = ((const uint4 *)IN)[k_];                                               \
                NEMO_UNROLL for (int j_ = 0; j_ < V_; j_++) {                                  \
                    const int64_t e = e0 + j_; const T in1 = X::ld(p1_.s[j_]); po_.s[j_] = X::st(BODY); } \
                ((uint4 *)OUT)[k_] = po_.u;                                                    \
            }                                                                                  \
        } else NEMO_CUDA_LOOP(i, total) {                                                      \
            const int64_t r = nemo_cuda_fdiv_q(D, i), e = nemo_cuda_fdiv_q(S, r) * sb + (i - r * D.d); \
            const T in1 = X::ld(IN[i]); OUT[i] = X::st(BODY); } }

template <typename T, typename X>
__global__ void modulate_k(typename X::S *y, const typename X::S *x, const T *sc, const T *sh, int64_t total,
                           nemo_cuda_fdiv S, nemo_cuda_fdiv D, int64_t sb, int vec) {
    if (sh) ROWS_LOOP1(y, x, rn_add(rn_mul(in1, rn_add((T)1, sc[e])), sh[e]))
    else ROWS_LOOP1(y, x, rn_mul(in1, rn_add((T)1, sc[e])))
}

template <typename T, typename X>
__global__ void gated_add_k(typename X::S *y, const typename X::S *x, const T *gate, const typename X::S *a,
                            int64_t total, nemo_cuda_fdiv S, nemo_cuda_fdiv D, int64_t gb, int vec) {
    typedef typename X::S S_;
    constexpr int V_ = 16 / (int)sizeof(S_);
    const int64_t sb = gb;
    if (vec) {
        NEMO_CUDA_LOOP(k_, total / V_) {
            const int64_t i0 = k_ * V_, r = nemo_cuda_fdiv_q(D, i0), e0 = nemo_cuda_fdiv_q(S, r) * sb + (i0 - r * D.d);
            nemo_cuda_pack<S_> px, pa, po;
            px.u = ((const uint4 *)x)[k_];
            pa.u = ((const uint4 *)a)[k_];
            NEMO_UNROLL for (int j = 0; j < V_; j++)
                po.s[j] = X::st(rn_add(X::ld(px.s[j]), rn_mul(gate[e0 + j], X::ld(pa.s[j]))));
            ((uint4 *)y)[k_] = po.u;
        }
    } else {
        NEMO_CUDA_LOOP(i, total) {
            const int64_t r = nemo_cuda_fdiv_q(D, i), d = i - r * D.d;
            y[i] = X::st(rn_add(X::ld(x[i]), rn_mul(gate[nemo_cuda_fdiv_q(S, r) * sb + d], X::ld(a[i]))));
        }
    }
}

/* out = g * (1 + v) (plus_one: dx of modulate) or g * v (da of gated_add). */
template <typename T, typename X>
__global__ void vec_out_k(typename X::S *out, const typename X::S *g, const T *v, int plus_one, int64_t total,
                          nemo_cuda_fdiv S, nemo_cuda_fdiv D, int64_t sb, int vec) {
    if (plus_one) ROWS_LOOP1(out, g, rn_mul(in1, rn_add((T)1, v[e])))
    else ROWS_LOOP1(out, g, rn_mul(in1, v[e]))
}
#undef ROWS_LOOP1

/* the (B, S, D) kernels' vector path: D a multiple of the vector width, the large operands aligned */
template <typename S> static int rows_vec(int64_t D, const void *a, const void *b, const void *c = NULL) {
    return D % (16 / (int)sizeof(S)) == 0 && nemo_cuda_vec_ok(a, b, c);
}

/* Group grp owns rows [grp*R, (grp+1)*R); chunk c of it rows [c*chunk, ...) of those.
 * part1[(grp*nk + c)*D + d] = sum (double)(g*x), part2[...] = sum (double)g, rows in order. */
template <typename T, typename X>
__global__ void vec_part_k(double *part1, double *part2, const typename X::S *g, const typename X::S *x,
                           int64_t ngroups, int64_t R, int64_t D, int64_t nk, int64_t chunk) {
    NEMO_CUDA_LOOP(t, ngroups * nk * D) {
        const int64_t d = t % D, gc = t / D, c = gc % nk, grp = gc / nk;
        const int64_t r0 = c * chunk, r1 = r0 + chunk < R ? r0 + chunk : R;
        double s1 = 0.0, s2 = 0.0;
        for (int64_t r = r0; r < r1; r++) {
            const int64_t o = (grp * R + r) * D + d;
            const T go = X::ld(g[o]);
            if (part1) s1 = __dadd_rn(s1, (double)rn_mul(go, X::ld(x[o])));
            if (part2) s2 = __dadd_rn(s2, (double)go);
        }
        if (part1) part1[t] = s1;
        if (part2) part2[t] = s2;
    }
}
template <typename T>
__global__ void vec_fold_k(T *d1, T *d2, const double *part1, const double *part2, int64_t ngroups, int64_t D,
                           int64_t nk) {
    NEMO_CUDA_LOOP(t, ngroups * D) {
        const int64_t d = t % D, grp = t / D;
        double s1 = 0.0, s2 = 0.0;
        for (int64_t c = 0; c < nk; c++) {
            const int64_t q = (grp * nk + c) * D + d;
            if (part1) s1 = __dadd_rn(s1, part1[q]);
            if (part2) s2 = __dadd_rn(s2, part2[q]);
        }
        if (d1) d1[t] = (T)s1;
        if (d2) d2[t] = (T)s2;
    }
}

/* ==== launchers ==== */

/* t on ref's device, of dtype dt, with at least count elements (NULL passes). */
static int check_dt(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int dt,
                    int64_t count) {
    if (!t) return 0;
    NEMO_CUDA_RC(k_check(op, what, t, ref, dt));
    if (nemo_cuda_numel(t) < count)
        return nemo_cuda_error(NEMO_ESHAPE, "%s: %s has %lld elements, expected %lld", op, what,
                               (long long)nemo_cuda_numel(t), (long long)count);
    return 0;
}
/* A large operand: ref's dtype. */
static int check_t(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int64_t count) {
    return check_dt(op, what, t, ref, ref->dtype, count);
}
/* A small one: the compute dtype of ref's. */
static int check_v(const char *op, const char *what, const nemo_tensor *t, const nemo_tensor *ref, int64_t count) {
    return check_dt(op, what, t, ref, compute_of(ref->dtype), count);
}
/* Rows of a per-sample vector: B when its row stride is D, 1 when it is 0. */
static int vec_rows(const char *op, int64_t B, int64_t D, int64_t sb, int64_t *rows) {
    if (sb != 0 && sb != D)
        return nemo_cuda_error(NEMO_EINVAL, "%s: vector row stride %lld, expected 0 or D = %lld", op, (long long)sb,
                               (long long)D);
    *rows = sb ? B : 1;
    return 0;
}

/* The launches by (compute, storage) type, for by_io. */
struct RopeL {
    template <typename T, typename X>
    static void go(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin, int64_t np,
                   int64_t S, int64_t nh, int64_t half, int backward) {
        const int P = 8 / (int)sizeof(typename X::S);   /* pairs per 16-byte vector */
        const int vec = half % P == 0 && nemo_cuda_vec_ok(nemo_cuda_data(y), nemo_cuda_data(x));
        rope_k<T, X><<<nemo_cuda_vec_blocks(np, vec, P), NEMO_CUDA_THREADS, 0, nemo_cuda_stream(y->devindex)>>>(
            (typename X::S *)nemo_cuda_data(y), (const typename X::S *)nemo_cuda_data(x),
            (const T *)nemo_cuda_data(cos), (const T *)nemo_cuda_data(sin), np, nemo_cuda_fdiv_make(S, np / half),
            nemo_cuda_fdiv_make(nh, np / half), nemo_cuda_fdiv_make(half, np), backward, vec);
    }
};
struct ModulateL {
    template <typename T, typename X>
    static void go(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *scale, const nemo_tensor *shift,
                   int64_t total, int64_t S, int64_t D, int64_t sb) {
        typedef typename X::S St;
        const int vec = rows_vec<St>(D, nemo_cuda_data(y), nemo_cuda_data(x));
        modulate_k<T, X><<<nemo_cuda_vec_blocks(total, vec, 16 / (int)sizeof(St)), NEMO_CUDA_THREADS, 0,
                           nemo_cuda_stream(y->devindex)>>>(
            (St *)nemo_cuda_data(y), (const St *)nemo_cuda_data(x),
            (const T *)nemo_cuda_data(scale), (const T *)k_data(shift), total, nemo_cuda_fdiv_make(S, total / D),
            nemo_cuda_fdiv_make(D, total), sb, vec);
    }
};
struct GatedAddL {
    template <typename T, typename X>
    static void go(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *gate, const nemo_tensor *a,
                   int64_t total, int64_t S, int64_t D, int64_t gb) {
        typedef typename X::S St;
        const int vec = rows_vec<St>(D, nemo_cuda_data(y), nemo_cuda_data(x), nemo_cuda_data(a));
        gated_add_k<T, X><<<nemo_cuda_vec_blocks(total, vec, 16 / (int)sizeof(St)), NEMO_CUDA_THREADS, 0,
                            nemo_cuda_stream(y->devindex)>>>(
            (St *)nemo_cuda_data(y), (const St *)nemo_cuda_data(x),
            (const T *)nemo_cuda_data(gate), (const St *)nemo_cuda_data(a), total,
            nemo_cuda_fdiv_make(S, total / D), nemo_cuda_fdiv_make(D, total), gb, vec);
    }
};

static int rope_cuda(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin, int64_t nb,
                     int64_t S, int64_t nh, int64_t D, int backward) {
    static const char op[] = "rope";
    NEMO_CUDA_ENTER(op, y);
    NEMO_CUDA_RC(nemo_cuda_check_io(op, y));
    NEMO_CUDA_RC(k_need(op, "input", x));
    NEMO_CUDA_RC(k_need(op, "cos", cos));
    NEMO_CUDA_RC(k_need(op, "sin", sin));
    NEMO_CUDA_RC(k_sizes(op, nb, S, nh));
    if (D < 0 || D % 2 != 0) return nemo_cuda_error(NEMO_EINVAL, "%s: head dim %lld is not even", op, (long long)D);
    const int64_t total = nb * S * nh * D;
    NEMO_CUDA_RC(check_t(op, "output", y, y, total));
    NEMO_CUDA_RC(check_t(op, "input", x, y, total));
    NEMO_CUDA_RC(check_v(op, "cos", cos, y, S * D));
    NEMO_CUDA_RC(check_v(op, "sin", sin, y, S * D));
    if (total == 0) return 0;
    by_io<RopeL>(y->dtype, y, x, cos, sin, total / 2, S, nh, D / 2, backward);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, y->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL_LP("rope", rope_cuda)

static int modulate_cuda(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *scale, const nemo_tensor *shift,
                         int64_t B, int64_t S, int64_t D, int64_t sb) {
    static const char op[] = "modulate";
    NEMO_CUDA_ENTER(op, y);
    NEMO_CUDA_RC(nemo_cuda_check_io(op, y));
    NEMO_CUDA_RC(k_need(op, "input", x));
    NEMO_CUDA_RC(k_need(op, "scale", scale));
    NEMO_CUDA_RC(k_sizes(op, B, S, D));
    int64_t vr = 0;
    NEMO_CUDA_RC(vec_rows(op, B, D, sb, &vr));
    const int64_t total = B * S * D;
    NEMO_CUDA_RC(check_t(op, "output", y, y, total));
    NEMO_CUDA_RC(check_t(op, "input", x, y, total));
    NEMO_CUDA_RC(check_v(op, "scale", scale, y, vr * D));
    NEMO_CUDA_RC(check_v(op, "shift", shift, y, vr * D));
    if (total == 0) return 0;
    by_io<ModulateL>(y->dtype, y, x, scale, shift, total, S, D, sb);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, y->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL_LP("modulate", modulate_cuda)

/* The backward shared by modulate and gated_add (through by_io, for g's dtype): out
 * (elementwise), d1 = sums of g*x, d2 = sums of g, each optional; *rc receives the status. */
struct VecBwd {
    template <typename T, typename X>
    static void go(int *rc, nemo_tensor *out_t, nemo_tensor *d1_t, nemo_tensor *d2_t, const nemo_tensor *g_t,
                   const nemo_tensor *x_t, const nemo_tensor *v_t, int plus_one, int64_t B, int64_t S, int64_t D,
                   int64_t sb) {
        *rc = run<T, X>(g_t->devindex, (typename X::S *)k_data(out_t), (T *)k_data(d1_t), (T *)k_data(d2_t),
                        (const typename X::S *)nemo_cuda_data(g_t), (const typename X::S *)nemo_cuda_data(x_t),
                        (const T *)nemo_cuda_data(v_t), plus_one, B, S, D, sb, nemo_cuda_stream(g_t->devindex));
    }
    template <typename T, typename X>
    static int run(int dev, typename X::S *out, T *d1, T *d2, const typename X::S *g, const typename X::S *x,
                   const T *v, int plus_one, int64_t B, int64_t S, int64_t D, int64_t sb, cudaStream_t st) {
        const int64_t total = B * S * D;
        if (out && total > 0) {
            const int vec = rows_vec<typename X::S>(D, out, g);
            vec_out_k<T, X><<<nemo_cuda_vec_blocks(total, vec, 16 / (int)sizeof(typename X::S)), NEMO_CUDA_THREADS, 0,
                              st>>>(out, g, v, plus_one, total, nemo_cuda_fdiv_make(S, D ? total / D : 0),
                                    nemo_cuda_fdiv_make(D, total), sb, vec);
        }
        if (!d1 && !d2) return 0;
        const int64_t ngroups = sb ? B : 1, R = (sb ? 1 : B) * S;
        /* chunks of rows: about 256K threads in all, at least 32 rows per chunk */
        int64_t nk = k_clamp(std::min(k_cdiv(262144, ngroups * (D > 0 ? D : 1)), R / 32), 1, 1024);
        const int64_t chunk = R > 0 ? k_cdiv(R, nk) : 1;
        nk = R > 0 ? k_cdiv(R, chunk) : 1;
        const size_t np = (size_t)(ngroups * nk * D);
        void *part = NULL;
        NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(double) * np * 2, &part));
        double *p1 = d1 ? (double *)part : NULL, *p2 = d2 ? (double *)part + np : NULL;
        vec_part_k<T, X><<<k_blocks(ngroups * nk * D), NEMO_CUDA_THREADS, 0, st>>>(p1, p2, g, x, ngroups, R, D, nk,
                                                                                   chunk);
        vec_fold_k<T><<<k_blocks(ngroups * D), NEMO_CUDA_THREADS, 0, st>>>(d1, d2, p1, p2, ngroups, D, nk);
        return 0;
    }
};

static int modulate_backward_cuda(nemo_tensor *dx, nemo_tensor *dscale, nemo_tensor *dshift, const nemo_tensor *g,
                                  const nemo_tensor *x, const nemo_tensor *scale, int64_t B, int64_t S, int64_t D,
                                  int64_t sb) {
    static const char op[] = "modulate backward";
    NEMO_CUDA_ENTER(op, g);
    NEMO_CUDA_RC(nemo_cuda_check_io(op, g));
    NEMO_CUDA_RC(k_need(op, "input", x));
    NEMO_CUDA_RC(k_need(op, "scale", scale));
    NEMO_CUDA_RC(k_sizes(op, B, S, D));
    int64_t vr = 0;
    NEMO_CUDA_RC(vec_rows(op, B, D, sb, &vr));
    const int64_t total = B * S * D;
    NEMO_CUDA_RC(check_t(op, "gradient", g, g, total));
    NEMO_CUDA_RC(check_t(op, "input", x, g, total));
    NEMO_CUDA_RC(check_v(op, "scale", scale, g, vr * D));
    NEMO_CUDA_RC(check_t(op, "input gradient", dx, g, total));
    NEMO_CUDA_RC(check_v(op, "scale gradient", dscale, g, vr * D));
    NEMO_CUDA_RC(check_v(op, "shift gradient", dshift, g, vr * D));
    if (vr * D == 0) return 0;
    int rc = 0;
    by_io<VecBwd>(g->dtype, &rc, dx, dscale, dshift, g, x, scale, 1, B, S, D, sb);
    NEMO_CUDA_RC(rc);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, g->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL_LP("modulate_backward", modulate_backward_cuda)

static int gated_add_cuda(nemo_tensor *y, const nemo_tensor *x, const nemo_tensor *gate, const nemo_tensor *a,
                          int64_t B, int64_t S, int64_t D, int64_t gb) {
    static const char op[] = "gated_add";
    NEMO_CUDA_ENTER(op, y);
    NEMO_CUDA_RC(nemo_cuda_check_io(op, y));
    NEMO_CUDA_RC(k_need(op, "input", x));
    NEMO_CUDA_RC(k_need(op, "gate", gate));
    NEMO_CUDA_RC(k_need(op, "addend", a));
    NEMO_CUDA_RC(k_sizes(op, B, S, D));
    int64_t vr = 0;
    NEMO_CUDA_RC(vec_rows(op, B, D, gb, &vr));
    const int64_t total = B * S * D;
    NEMO_CUDA_RC(check_t(op, "output", y, y, total));
    NEMO_CUDA_RC(check_t(op, "input", x, y, total));
    NEMO_CUDA_RC(check_t(op, "addend", a, y, total));
    NEMO_CUDA_RC(check_v(op, "gate", gate, y, vr * D));
    if (total == 0) return 0;
    by_io<GatedAddL>(y->dtype, y, x, gate, a, total, S, D, gb);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, y->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL_LP("gated_add", gated_add_cuda)

static int gated_add_backward_cuda(nemo_tensor *da, nemo_tensor *dgate, const nemo_tensor *g, const nemo_tensor *gate,
                                   const nemo_tensor *a, int64_t B, int64_t S, int64_t D, int64_t gb) {
    static const char op[] = "gated_add backward";
    NEMO_CUDA_ENTER(op, g);
    NEMO_CUDA_RC(nemo_cuda_check_io(op, g));
    NEMO_CUDA_RC(k_need(op, "gate", gate));
    NEMO_CUDA_RC(k_need(op, "addend", a));
    NEMO_CUDA_RC(k_sizes(op, B, S, D));
    int64_t vr = 0;
    NEMO_CUDA_RC(vec_rows(op, B, D, gb, &vr));
    const int64_t total = B * S * D;
    NEMO_CUDA_RC(check_t(op, "gradient", g, g, total));
    NEMO_CUDA_RC(check_t(op, "addend", a, g, total));
    NEMO_CUDA_RC(check_v(op, "gate", gate, g, vr * D));
    NEMO_CUDA_RC(check_t(op, "addend gradient", da, g, total));
    NEMO_CUDA_RC(check_v(op, "gate gradient", dgate, g, vr * D));
    if (vr * D == 0) return 0;
    int rc = 0;
    by_io<VecBwd>(g->dtype, &rc, da, dgate, (nemo_tensor *)NULL, g, a, gate, 0, B, S, D, gb);
    NEMO_CUDA_RC(rc);
    NEMO_CUDA_LAUNCHED("%s: kernel launch on cuda:%d (%lld elements)", op, g->devindex, (long long)total);
    return 0;
}
NEMO_CUDA_KERNEL_LP("gated_add_backward", gated_add_backward_cuda)
