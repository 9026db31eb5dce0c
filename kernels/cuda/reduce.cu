/*
 * kernels/cuda/reduce.cu: the CUDA kernels of the reduce family, with the CPU kernels'
 * signatures and statistics (kernels/cpu/reduce.c):
 *
 *   "reduce"           (y[A*M], x[A*K*M], A, K, M, op, param)
 *   "reduce_backward"  (dx[A*K*M], g[A*M], x[A*K*M] or NULL for sum/mean, A, K, M, op, param)
 *   "argreduce"        (values[A*M] or NULL, indices[A*M] int64, x, A, K, M, is_min)
 *   "max_dim_backward" (dx[A*K*M], g[A*M], indices[A*M] int64, A, K, M)
 *   "softmax"          (y, x, A, K, M, log)
 *   "softmax_backward" (dx, g, y, A, K, M, log)
 *   "cumsum"           (y, x, A, K, M, reverse)
 *
 * Every tensor is dense and on one CUDA device; float arrays share one dtype, float32 or
 * float64 (the front-end, engine/ops/reduce.c, converts and permutes). Each returns 0 or a
 * negative status with the plugin's error text, launches on the device's stream and does not
 * synchronize.
 *
 * Non-obvious rules
 * - Statistics accumulate in double, as on the CPU, and are composed the same way (mean then
 *   squared deviations for var/std, max then exp-sum for logsumexp, ...); only the order of
 *   the additions differs, so results agree to rounding, not bit for bit.
 * - A "pass" folds f(x) over K into one double per output. Rows (M == 1, K >= 32) are folded
 *   by a group of threads (a warp below 1024 elements, a 256-thread block above) with a fixed
 *   shuffle tree; columns (M > 1, or short rows) by one thread per output walking k in order.
 *   When there are few outputs for the work, K is cut into nk chunks whose partials land in
 *   the plugin's scratch buffer and are folded in chunk order by a second kernel. nk and the
 *   chunk size depend on (A, K, M) only, so a result does not depend on the device or timing.
 * - No fused multiply-add where the CPU does a separate multiply and add (nvcc contracts by
 *   default): __dmul_rn / __dadd_rn where a product is accumulated.
 * - argreduce: the first extreme element wins and a NaN is more extreme than anything (the
 *   first NaN wins), exactly as on the CPU, so indices are equal bit for bit; cumsum adds in
 *   k order in double, one thread per output, so it is equal bit for bit too (but a single
 *   very long row runs on one thread).
 * - max_dim_backward gathers (dx[i] = g[o] where k == indices[o], else 0), so an index out of
 *   range gives a zero gradient instead of the CPU's error.
 */
#include <math.h>
#include <algorithm>
#include "common.cuh"

/* ==== Passes (the CPU's table: f(x) and how it folds) ==== */

enum { P_ADD_ID, P_ADD_SQ, P_ADD_ABS, P_ADD_POW, P_ADD_NZ, P_ADD_CSQ, P_ADD_CEXP, P_ADD_EQC, P_ADD_ABSEQC,
       P_ADD_ISZ, P_MUL_ID, P_MUL_NZVAL, P_MAX_ID, P_MIN_ID, P_MAX_ABS, P_MIN_ABS };
enum { ACC_ADD, ACC_MUL, ACC_MAX, ACC_MIN };

static int pass_acc(int which) {
    switch (which) {
    case P_MUL_ID: case P_MUL_NZVAL: return ACC_MUL;
    case P_MAX_ID: case P_MAX_ABS: return ACC_MAX;
    case P_MIN_ID: case P_MIN_ABS: return ACC_MIN;
    default: return ACC_ADD;
    }
}

__host__ __device__ __forceinline__ double acc_init(int acc) {
    return acc == ACC_ADD ? 0.0 : acc == ACC_MUL ? 1.0 : acc == ACC_MAX ? -INFINITY : INFINITY;
}

/* The CPU's ACC_OP_*: max/min take v when it is more extreme or NaN (NaN sticks). */
__device__ __forceinline__ double acc_op(int acc, double a, double v) {
    switch (acc) {
    case ACC_ADD: return __dadd_rn(a, v);
    case ACC_MUL: return __dmul_rn(a, v);
    case ACC_MAX: return (v > a || v != v) ? v : a;
    default: return (v < a || v != v) ? v : a;
    }
}
struct AccF {
    int acc;
    __device__ double operator()(double a, double b) const { return acc_op(acc, a, b); }
};

__device__ __forceinline__ float t_exp(float v) { return expf(v); }
__device__ __forceinline__ double t_exp(double v) { return exp(v); }
__device__ __forceinline__ float t_log(float v) { return logf(v); }
__device__ __forceinline__ double t_log(double v) { return log(v); }

/* f(v) of a pass; cc is the output's centre (a mean, a max), p the norm's order. */
template <typename T>
__device__ __forceinline__ double pass_f(int which, T v, double cc, double p) {
    double d = (double)v;
    switch (which) {
    case P_ADD_ID: case P_MUL_ID: case P_MAX_ID: case P_MIN_ID: return d;
    case P_ADD_SQ: return __dmul_rn(d, d);
    case P_ADD_ABS: case P_MAX_ABS: case P_MIN_ABS: return fabs(d);
    case P_ADD_POW: return pow(fabs(d), p);
    case P_ADD_NZ: return (double)(v != 0);
    case P_ADD_CSQ: { double e = d - cc; return __dmul_rn(e, e); }
    case P_ADD_CEXP: return (double)t_exp((T)(v - (T)cc));
    case P_ADD_EQC: return (double)(d == cc);
    case P_ADD_ABSEQC: return (double)(fabs(d) == cc);
    case P_ADD_ISZ: return (double)(v == 0);
    default: return v == 0 ? 1.0 : d;   /* P_MUL_NZVAL */
    }
}

/* ==== Launch plans ==== */

/* Threads per row group: a warp, or a block for long rows. */
#define ROW_MIN 32         /* rows shorter than this go one thread per output */
#define ROW_BLOCK 1024     /* rows at least this long get a whole block */

typedef struct {
    int rows;              /* 1: row groups (M == 1); 0: one thread per (output, chunk) */
    int G;                 /* threads per row group */
    int64_t nk, chunk;     /* K is cut into nk chunks of chunk elements (the last may be shorter) */
} rplan;

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

static rplan make_plan(int64_t A, int64_t K, int64_t M, int split) {
    rplan P;
    P.rows = M == 1 && K >= ROW_MIN;
    P.G = K >= ROW_BLOCK ? NEMO_CUDA_THREADS : 32;
    P.nk = 1;
    if (split && K > 0) {
        if (P.rows) {   /* aim at 1024 blocks' worth of groups, at least 4 elements per lane */
            int64_t target = P.G == 32 ? 8192 : 1024;
            if (A < target) P.nk = clamp64(std::min(cdiv(target, A), K / (4 * P.G)), 1, 1024);
        } else {        /* aim at 256K threads, at least 32 rows per chunk */
            int64_t target = 262144, outs = A * M;
            if (outs < target) P.nk = clamp64(std::min(cdiv(target, outs), K / 32), 1, 1024);
        }
    }
    P.chunk = K > 0 ? cdiv(K, P.nk) : 0;
    P.nk = K > 0 ? cdiv(K, P.chunk) : 1;
    return P;
}

static unsigned group_blocks(int64_t ntask, int G) {
    int64_t per = NEMO_CUDA_THREADS / G, b = cdiv(ntask, per);
    return (unsigned)clamp64(b, 1, 65535 * 8);
}

/* For each task t (one per block for G = 256, eight per block for G = 32): body runs in the
 * G threads of the task's group, with lane = threadIdx.x % G. Every thread of a group takes
 * the same path, and for G = 256 every thread of the block does, so group reductions may use
 * __syncthreads. */
#define GROUP_TASKS(t, ntask)                                                                   \
    for (int64_t t##_0 = (int64_t)blockIdx.x * (NEMO_CUDA_THREADS / G); t##_0 < (ntask);          \
         t##_0 += (int64_t)gridDim.x * (NEMO_CUDA_THREADS / G))                                   \
        for (int64_t t = t##_0 + threadIdx.x / G, t##_once = 0; t##_once < 1; t##_once++)

/* ==== Kernels: passes ==== */

/* part[a*nk + c] = fold of f over chunk c of row a (M == 1). */
template <typename T, int G>
__global__ void pass_rows(double *part, const T *x, int64_t A, int64_t K, int64_t nk, int64_t chunk, int which,
                          int acc, const double *centre, double p) {
    __shared__ double sm[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    const AccF f{acc};
    GROUP_TASKS(t, A * nk) {
        double r = acc_init(acc);
        bool ok = t < A * nk;
        if (ok) {
            int64_t a = t / nk, c = t % nk, k0 = c * chunk, k1 = k0 + chunk < K ? k0 + chunk : K;
            const T *row = x + a * K;
            double cc = centre ? centre[a] : 0.0;
            for (int64_t k = k0 + lane; k < k1; k += G) r = acc_op(acc, r, pass_f<T>(which, row[k], cc, p));
        }
        r = nemo_cuda_group_reduce<G>(r, f, sm);
        if (ok && lane == 0) part[t] = r;
    }
}

/* part[(a*nk + c)*M + m] = fold of f over chunk c of column (a, m), k in order. */
template <typename T>
__global__ void pass_cols(double *part, const T *x, int64_t A, int64_t K, int64_t M, int64_t nk, int64_t chunk,
                          int which, int acc, const double *centre, double p) {
    NEMO_CUDA_LOOP(t, A * nk * M) {
        int64_t m = t % M, r = t / M, c = r % nk, a = r / nk;
        int64_t k0 = c * chunk, k1 = k0 + chunk < K ? k0 + chunk : K;
        double cc = centre ? centre[a * M + m] : 0.0, s = acc_init(acc);
        const T *px = x + (a * K + k0) * M + m;
        for (int64_t k = k0; k < k1; k++, px += M) s = acc_op(acc, s, pass_f<T>(which, *px, cc, p));
        part[t] = s;
    }
}

/* out[a*M + m] = fold over c of part[(a*nk + c)*M + m], c in order. */
__global__ void fold_parts(double *out, const double *part, int64_t A, int64_t nk, int64_t M, int acc) {
    NEMO_CUDA_LOOP(o, A * M) {
        int64_t a = o / M, m = o % M;
        const double *q = part + a * nk * M + m;
        double r = q[0];
        for (int64_t c = 1; c < nk; c++) r = acc_op(acc, r, q[c * M]);
        out[o] = r;
    }
}

/* ==== Kernels: statistics and results ==== */

enum { MAP_MEAN, MAP_LSE_CENTRE, MAP_STD_BWD, MAP_NORM_FINISH, MAP_LSE_FINISH };

__device__ __forceinline__ double var_div(int64_t K, double correction) {
    double d = (double)K - correction;
    return d > 0 ? d : 0.0;
}
__device__ __forceinline__ double norm_finish(double s, double p) {
    if (p == 2.0) return sqrt(s);
    if (p == 1.0 || p == 0.0 || p == INFINITY || p == -INFINITY) return s;
    return pow(s, 1.0 / p);
}
__device__ __forceinline__ double finish_one(int op, double s0, double s1, int64_t K, double p) {
    switch (op) {
    case NEMO_RED_VAR: return s1 / var_div(K, p);
    case NEMO_RED_STD: return sqrt(s1 / var_div(K, p));
    case NEMO_RED_NORM: return norm_finish(s0, p);
    case NEMO_RED_LOGSUMEXP: return isfinite(s0) ? s0 + log(s1) : s0;
    default: return s0;
    }
}

__global__ void stats_map(int mode, double *s0, double *s1, double *c, int64_t n, int64_t K, double p) {
    NEMO_CUDA_LOOP(i, n) {
        switch (mode) {
        case MAP_MEAN: s0[i] = s0[i] / (double)K; break;
        case MAP_LSE_CENTRE: c[i] = isfinite(s0[i]) ? s0[i] : 0.0; break;
        case MAP_STD_BWD: { double d = var_div(K, p); s1[i] = d * sqrt(s1[i] / d); break; }
        case MAP_NORM_FINISH: s0[i] = norm_finish(s0[i], p); break;
        default: s0[i] = finish_one(NEMO_RED_LOGSUMEXP, s0[i], s1[i], K, p); break;
        }
    }
}

template <typename T>
__global__ void reduce_finish(T *y, const double *s0, const double *s1, int64_t n, int64_t K, int op, double p) {
    NEMO_CUDA_LOOP(i, n) y[i] = (T)finish_one(op, s0[i], s1[i], K, p);
}

/* dx[i] for i = (a*K + k)*M + m, o = a*M + m: the CPU's REDUCE_BWD_FN formulas. The index map
 * is a 3-operand iteration over (A, K, M): dx dense, o with strides (M, 0, 1), k with (0, 1, 0). */
__device__ __forceinline__ double sgn(double v) { return (double)((v > 0) - (v < 0)); }
#define EW(expr) NEMO_CUDA_LOOP(j, N) {                                                       \
        int64_t off[3]; nemo_cuda_offsets<MODE, 3>(it, j, off);                              \
        int64_t i = off[0], o = off[1]; (void)o; D[i] = (T)(expr); }
template <typename T, int MODE>
__global__ void reduce_bwd_kernel(T *D, const T *G, const T *X, const double *S0, const double *S1,
                                  nemo_cuda_iter<3> it, int64_t N, int64_t K, int op, double p) {
    switch (op) {
    case NEMO_RED_SUM: EW(G[o]); break;
    case NEMO_RED_MEAN: { const double inv = 1.0 / (double)K; EW(__dmul_rn((double)G[o], inv)); break; }
    case NEMO_RED_PROD:
        EW(S0[o] == 0 ? (double)G[o] * S1[o] / (double)X[i]
           : (S0[o] == 1 && X[i] == 0 ? (double)G[o] * S1[o] : 0.0));
        break;
    case NEMO_RED_AMAX: case NEMO_RED_AMIN: EW((double)X[i] == S0[o] ? (double)G[o] / S1[o] : 0.0); break;
    case NEMO_RED_VAR: { const double d = var_div(K, p); EW((double)G[o] * 2.0 * ((double)X[i] - S0[o]) / d); break; }
    case NEMO_RED_STD: EW(S1[o] == 0 ? 0.0 : (double)G[o] * ((double)X[i] - S0[o]) / S1[o]); break;
    case NEMO_RED_NORM:
        if (p == 0.0) EW(0.0)
        else if (p == 1.0) EW((double)G[o] * sgn((double)X[i]))
        else if (p == 2.0) EW(S0[o] == 0 ? 0.0 : (double)G[o] * (double)X[i] / S0[o])
        else if (isinf(p)) EW(fabs((double)X[i]) == S0[o] ? (double)G[o] * sgn((double)X[i]) / S1[o] : 0.0)
        else EW(S0[o] == 0 || X[i] == 0 ? 0.0
                : (double)G[o] * sgn((double)X[i]) * pow(fabs((double)X[i]) / S0[o], p - 1.0))
        break;
    case NEMO_RED_LOGSUMEXP: EW(isfinite(S0[o]) ? (double)G[o] * exp((double)X[i] - S0[o]) : 0.0); break;
    default: break;   /* rejected on the host */
    }
}

/* dx[i] = g[o] where k == indices[o], else 0. */
template <typename T, int MODE>
__global__ void max_dim_bwd_kernel(T *D, const T *G, const int64_t *I, nemo_cuda_iter<3> it, int64_t N) {
    NEMO_CUDA_LOOP(j, N) {
        int64_t off[3];
        nemo_cuda_offsets<MODE, 3>(it, j, off);
        D[off[0]] = off[2] == I[off[1]] ? G[off[1]] : (T)0;
    }
}
#undef EW

/* ==== Kernels: argreduce ==== */

template <typename T> struct ArgBest { T v; int64_t i; };   /* i < 0: nothing seen */

template <typename T>
__device__ __forceinline__ bool better(T v, T best, int is_min) {
    return is_min ? (v < best || v != v) : (v > best || v != v);
}
/* The winner of two candidates: the first NaN, else the most extreme, ties to the lower index.
 * Associative and commutative, so any tree gives the sequential scan's answer. */
template <typename T>
__device__ __forceinline__ ArgBest<T> arg_combine(ArgBest<T> a, ArgBest<T> b, int is_min) {
    if (a.i < 0) return b;
    if (b.i < 0) return a;
    bool na = a.v != a.v, nb = b.v != b.v;
    if (na || nb) { if (na && nb) return a.i < b.i ? a : b; return na ? a : b; }
    if (is_min ? b.v < a.v : b.v > a.v) return b;
    if (is_min ? a.v < b.v : a.v > b.v) return a;
    return a.i < b.i ? a : b;
}

/* One thread per output, k in order (the CPU's loop). */
template <typename T>
__global__ void argreduce_cols(T *V, int64_t *I, const T *x, int64_t A, int64_t K, int64_t M, int is_min) {
    NEMO_CUDA_LOOP(o, A * M) {
        int64_t a = o / M, m = o % M;
        const T *px = x + a * K * M + m;
        T best = px[0];
        int64_t bi = 0;
        for (int64_t k = 1; k < K && best == best; k++) {
            T v = px[k * M];
            if (better(v, best, is_min)) { best = v; bi = k; }
        }
        if (V) V[o] = best;
        I[o] = bi;
    }
}

/* A group of G threads per row (M == 1): each lane scans its elements in order, then the
 * candidates combine. */
template <typename T, int G>
__global__ void argreduce_rows(T *V, int64_t *I, const T *x, int64_t A, int64_t K, int is_min) {
    __shared__ T smv[NEMO_CUDA_THREADS / 32];
    __shared__ int64_t smi[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    GROUP_TASKS(a, A) {
        ArgBest<T> b;
        b.v = 0;
        b.i = -1;
        bool ok = a < A;
        if (ok) {
            const T *row = x + a * K;
            for (int64_t k = lane; k < K; k += G) {
                T v = row[k];
                if (b.i < 0 || better(v, b.v, is_min)) { b.v = v; b.i = k; }
                if (b.v != b.v) break;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            ArgBest<T> u;
            u.v = __shfl_down_sync(0xffffffffu, b.v, o);
            u.i = __shfl_down_sync(0xffffffffu, b.i, o);
            b = arg_combine(b, u, is_min);
        }
        if (G > 32) {
            int wl = threadIdx.x & 31, warp = threadIdx.x >> 5;
            __syncthreads();
            if (wl == 0) { smv[warp] = b.v; smi[warp] = b.i; }
            __syncthreads();
            if (warp == 0) {
                b.v = wl < G / 32 ? smv[wl] : smv[0];
                b.i = wl < G / 32 ? smi[wl] : -1;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    ArgBest<T> u;
                    u.v = __shfl_down_sync(0xffffffffu, b.v, o);
                    u.i = __shfl_down_sync(0xffffffffu, b.i, o);
                    b = arg_combine(b, u, is_min);
                }
            }
        }
        if (ok && lane == 0) {
            if (V) V[a] = b.v;
            I[a] = b.i;
        }
    }
}

/* ==== Kernels: softmax ==== */

template <typename T>
struct MaxT {
    __device__ T operator()(T a, T v) const { return (v > a || v != v) ? v : a; }
};
struct AddD {
    __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};

/* Rows (M == 1) by groups of G threads: max, exp and its double sum, one scale. */
template <typename T, int G>
__global__ void softmax_rows(T *y, const T *x, int64_t A, int64_t K, int lg) {
    __shared__ T smt[NEMO_CUDA_THREADS / 32];
    __shared__ double smd[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    GROUP_TASKS(a, A) {
        bool ok = a < A;
        const T *xr = x + (ok ? a : 0) * K;
        T *yr = y + (ok ? a : 0) * K;
        T mx = -INFINITY;
        if (ok) for (int64_t k = lane; k < K; k += G) mx = MaxT<T>()(mx, xr[k]);
        mx = nemo_cuda_group_reduce<G>(mx, MaxT<T>(), smt);
        mx = nemo_cuda_group_bcast<G>(mx, smt);
        double s = 0.0;
        if (ok) for (int64_t k = lane; k < K; k += G) {
            T e = t_exp((T)(xr[k] - mx));
            if (!lg) yr[k] = e;
            s = __dadd_rn(s, (double)e);
        }
        s = nemo_cuda_group_reduce<G>(s, AddD(), smd);
        s = nemo_cuda_group_bcast<G>(s, smd);
        if (ok) {
            if (lg) { const T ls = (T)log(s); for (int64_t k = lane; k < K; k += G) yr[k] = (T)(xr[k] - mx) - ls; }
            else { const T inv = (T)(1.0 / s); for (int64_t k = lane; k < K; k += G) yr[k] = yr[k] * inv; }
        }
    }
}

/* One thread per (a, m), k in order (the CPU's column loop). */
template <typename T>
__global__ void softmax_cols(T *y, const T *x, int64_t A, int64_t K, int64_t M, int lg) {
    NEMO_CUDA_LOOP(o, A * M) {
        int64_t a = o / M, m = o % M, base = a * K * M + m;
        T mx = -INFINITY;
        for (int64_t k = 0; k < K; k++) mx = MaxT<T>()(mx, x[base + k * M]);
        double s = 0.0;
        for (int64_t k = 0; k < K; k++) {
            T e = t_exp((T)(x[base + k * M] - mx));
            if (!lg) y[base + k * M] = e;
            s = __dadd_rn(s, (double)e);
        }
        if (lg) { const T f = (T)log(s); for (int64_t k = 0; k < K; k++) y[base + k * M] = (T)(x[base + k * M] - mx) - f; }
        else { const T f = (T)(1.0 / s); for (int64_t k = 0; k < K; k++) y[base + k * M] = y[base + k * M] * f; }
    }
}

/* softmax: dx = y (g - sum(g y)); log_softmax: dx = g - exp(y) sum(g); sums in double. */
template <typename T>
__device__ __forceinline__ double sm_term(T g, T y, int lg) {
    return lg ? (double)g : __dmul_rn((double)g, (double)y);
}
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
template <typename T>
__device__ __forceinline__ T sm_grad(T g, T y, T s, int lg) {
    return lg ? (T)(g - mul_rn(t_exp(y), s)) : (T)(y * (T)(g - s));
}
template <typename T, int G>
__global__ void softmax_bwd_rows(T *dx, const T *g, const T *y, int64_t A, int64_t K, int lg) {
    __shared__ double smd[NEMO_CUDA_THREADS / 32];
    const int lane = threadIdx.x % G;
    GROUP_TASKS(a, A) {
        bool ok = a < A;
        int64_t base = (ok ? a : 0) * K;
        double s = 0.0;
        if (ok) for (int64_t k = lane; k < K; k += G) s = __dadd_rn(s, sm_term(g[base + k], y[base + k], lg));
        s = nemo_cuda_group_reduce<G>(s, AddD(), smd);
        s = nemo_cuda_group_bcast<G>(s, smd);
        if (ok) {
            const T sT = (T)s;
            for (int64_t k = lane; k < K; k += G) dx[base + k] = sm_grad(g[base + k], y[base + k], sT, lg);
        }
    }
}
template <typename T>
__global__ void softmax_bwd_cols(T *dx, const T *g, const T *y, int64_t A, int64_t K, int64_t M, int lg) {
    NEMO_CUDA_LOOP(o, A * M) {
        int64_t a = o / M, m = o % M, base = a * K * M + m;
        double s = 0.0;
        for (int64_t k = 0; k < K; k++) s = __dadd_rn(s, sm_term(g[base + k * M], y[base + k * M], lg));
        const T sT = (T)s;
        for (int64_t k = 0; k < K; k++) dx[base + k * M] = sm_grad(g[base + k * M], y[base + k * M], sT, lg);
    }
}

/* ==== Kernels: cumsum ==== */

template <typename T>
__global__ void cumsum_kernel(T *y, const T *x, int64_t A, int64_t K, int64_t M, int rev) {
    NEMO_CUDA_LOOP(o, A * M) {
        int64_t a = o / M, m = o % M;
        double s = 0.0;
        for (int64_t kk = 0; kk < K; kk++) {
            int64_t q = (a * K + (rev ? K - 1 - kk : kk)) * M + m;
            s = __dadd_rn(s, (double)x[q]);
            y[q] = (T)s;
        }
    }
}

/* ==== kernel launchers ==== */

/* Every tensor on y's device with y's dtype (float32 / float64). */
static int check_same(const char *op, const nemo_tensor *y, const nemo_tensor *const *ins, int nin) {
    NEMO_CUDA_RC(nemo_cuda_check_compute(op, y));
    for (int k = 0; k < nin; k++) {
        const nemo_tensor *t = ins[k];
        if (!t) continue;
        if (t->devtype != NEMO_CUDA || t->devindex != y->devindex)
            return nemo_cuda_error(NEMO_EDEVICE, "%s: input %d is on %s:%d, the output on cuda:%d", op, k,
                                   t->devtype == NEMO_CUDA ? "cuda" : "cpu", t->devindex, y->devindex);
        if (t->dtype != y->dtype)
            return nemo_cuda_error(NEMO_EDTYPE, "%s: input %d is %s, the output %s", op, k,
                                   nemo_cuda_dtype_name(t->dtype), nemo_cuda_dtype_name(y->dtype));
    }
    return 0;
}
static int check_sizes(const char *op, int64_t A, int64_t K, int64_t M) {
    if (A < 0 || K < 0 || M < 0)
        return nemo_cuda_error(NEMO_EINVAL, "%s: negative sizes A %lld K %lld M %lld", op, (long long)A, (long long)K,
                               (long long)M);
    return 0;
}

/* Statistics scratch: s0, s1, c (n doubles each) and the partials of a split pass. */
typedef struct { double *s0, *s1, *c, *part; } stats_buf;

static int stats_alloc(int dev, int64_t A, int64_t K, int64_t M, stats_buf *S) {
    rplan P = make_plan(A, K, M, 1);
    int64_t n = A * M, np = P.nk > 1 ? A * P.nk * M : 0;
    void *p = NULL;
    NEMO_CUDA_RC(nemo_cuda_scratch(dev, sizeof(double) * (size_t)(3 * n + np), &p));
    S->s0 = (double *)p;
    S->s1 = S->s0 + n;
    S->c = S->s1 + n;
    S->part = S->c + n;
    return 0;
}

/* out[a*M + m] = fold over k of f(x[(a*K + k)*M + m]) (centre per output, or NULL). */
template <typename T>
static void run_pass(double *out, double *part, const T *x, int64_t A, int64_t K, int64_t M, int which,
                     const double *centre, double p, cudaStream_t st) {
    rplan P = make_plan(A, K, M, 1);
    int acc = pass_acc(which);
    double *dst = P.nk > 1 ? part : out;
    if (P.rows) {
        if (P.G == 32)
            pass_rows<T, 32><<<group_blocks(A * P.nk, 32), NEMO_CUDA_THREADS, 0, st>>>(dst, x, A, K, P.nk, P.chunk,
                                                                                        which, acc, centre, p);
        else
            pass_rows<T, NEMO_CUDA_THREADS><<<group_blocks(A * P.nk, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
                dst, x, A, K, P.nk, P.chunk, which, acc, centre, p);
    } else {
        pass_cols<T><<<nemo_cuda_blocks(A * P.nk * M), NEMO_CUDA_THREADS, 0, st>>>(dst, x, A, K, M, P.nk, P.chunk,
                                                                                    which, acc, centre, p);
    }
    if (P.nk > 1) fold_parts<<<nemo_cuda_blocks(A * M), NEMO_CUDA_THREADS, 0, st>>>(out, part, A, P.nk, M, acc);
}

static void map_stats(int mode, const stats_buf *S, int64_t n, int64_t K, double p, cudaStream_t st) {
    stats_map<<<nemo_cuda_blocks(n), NEMO_CUDA_THREADS, 0, st>>>(mode, S->s0, S->s1, S->c, n, K, p);
}

static int norm_pass(double p) {
    if (p == 2.0) return P_ADD_SQ;
    if (p == 1.0) return P_ADD_ABS;
    if (p == INFINITY) return P_MAX_ABS;
    if (p == -INFINITY) return P_MIN_ABS;
    if (p == 0.0) return P_ADD_NZ;
    return P_ADD_POW;
}

/* The statistics of reduce_stats in kernels/cpu/reduce.c: s0 (and s1) per output. */
template <typename T>
static void reduce_stats(const stats_buf *S, const T *x, int64_t A, int64_t K, int64_t M, int op, double param,
                         cudaStream_t st) {
    int64_t n = A * M;
    switch (op) {
    case NEMO_RED_SUM: run_pass<T>(S->s0, S->part, x, A, K, M, P_ADD_ID, NULL, 0, st); break;
    case NEMO_RED_MEAN:
        run_pass<T>(S->s0, S->part, x, A, K, M, P_ADD_ID, NULL, 0, st);
        map_stats(MAP_MEAN, S, n, K, 0, st);
        break;
    case NEMO_RED_PROD: run_pass<T>(S->s0, S->part, x, A, K, M, P_MUL_ID, NULL, 0, st); break;
    case NEMO_RED_AMAX: run_pass<T>(S->s0, S->part, x, A, K, M, P_MAX_ID, NULL, 0, st); break;
    case NEMO_RED_AMIN: run_pass<T>(S->s0, S->part, x, A, K, M, P_MIN_ID, NULL, 0, st); break;
    case NEMO_RED_VAR: case NEMO_RED_STD:   /* s0 = mean, s1 = sum of squared deviations */
        run_pass<T>(S->s0, S->part, x, A, K, M, P_ADD_ID, NULL, 0, st);
        map_stats(MAP_MEAN, S, n, K, 0, st);
        run_pass<T>(S->s1, S->part, x, A, K, M, P_ADD_CSQ, S->s0, 0, st);
        break;
    case NEMO_RED_NORM: run_pass<T>(S->s0, S->part, x, A, K, M, norm_pass(param), NULL, param, st); break;
    default:   /* logsumexp: s0 = max, s1 = sum exp(x - max), max taken as 0 when infinite */
        run_pass<T>(S->s0, S->part, x, A, K, M, P_MAX_ID, NULL, 0, st);
        map_stats(MAP_LSE_CENTRE, S, n, K, 0, st);
        run_pass<T>(S->s1, S->part, x, A, K, M, P_ADD_CEXP, S->c, 0, st);
        break;
    }
}

template <typename T>
static void reduce_launch(nemo_tensor *y, const nemo_tensor *x, const stats_buf *S, int64_t A, int64_t K, int64_t M,
                          int op, double param, cudaStream_t st) {
    reduce_stats<T>(S, (const T *)nemo_cuda_data(x), A, K, M, op, param, st);
    reduce_finish<T><<<nemo_cuda_blocks(A * M), NEMO_CUDA_THREADS, 0, st>>>((T *)nemo_cuda_data(y), S->s0, S->s1,
                                                                             A * M, K, op, param);
}

static int reduce_cuda(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int op, double param) {
    NEMO_CUDA_ENTER("reduce", y);
    const nemo_tensor *ins[1] = {x};
    NEMO_CUDA_RC(check_same("reduce", y, ins, 1));
    NEMO_CUDA_RC(check_sizes("reduce", A, K, M));
    if (op < 0 || op >= NEMO_NRED) return nemo_cuda_error(NEMO_EINVAL, "reduce: unknown op %d", op);
    if (A * M == 0) return 0;
    stats_buf S;
    NEMO_CUDA_RC(stats_alloc(y->devindex, A, K, M, &S));
    cudaStream_t st = nemo_cuda_stream(y->devindex);
    if (y->dtype == NEMO_F32) reduce_launch<float>(y, x, &S, A, K, M, op, param, st);
    else reduce_launch<double>(y, x, &S, A, K, M, op, param, st);
    NEMO_CUDA_LAUNCHED("reduce op %d: kernel launch on cuda:%d (A %lld K %lld M %lld)", op, y->devindex, (long long)A,
                       (long long)K, (long long)M);
    return 0;
}
NEMO_CUDA_KERNEL("reduce", reduce_cuda)

/* The (A, K, M) index map of the elementwise backward kernels: operand 0 the dense element,
 * 1 its output o = a*M + m, 2 its k. Returns the index mode. */
static int akm_iter(nemo_cuda_iter<3> *it, int64_t A, int64_t K, int64_t M, int64_t *N) {
    int64_t shape[3] = {A, K, M}, sd[3] = {K * M, M, 1}, so[3] = {M, 0, 1}, sk[3] = {0, 1, 0};
    const int64_t *strides[3] = {sd, so, sk};
    int flat = 0;
    *N = nemo_cuda_iter_make<3>(it, 3, shape, strides, &flat);
    return *N < 0x7fffffff ? NEMO_CUDA_STR32 : NEMO_CUDA_STR64;
}

template <typename T>
static void reduce_bwd_launch(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, const stats_buf *S,
                              int64_t A, int64_t K, int64_t M, int op, double param, cudaStream_t st) {
    const T *xp = x ? (const T *)nemo_cuda_data(x) : NULL;
    int64_t n = A * M;
    if (op != NEMO_RED_SUM && op != NEMO_RED_MEAN) {
        switch (op) {
        case NEMO_RED_PROD:   /* s0 = zero count, s1 = product of the nonzeros */
            run_pass<T>(S->s0, S->part, xp, A, K, M, P_ADD_ISZ, NULL, 0, st);
            run_pass<T>(S->s1, S->part, xp, A, K, M, P_MUL_NZVAL, NULL, 0, st);
            break;
        case NEMO_RED_AMAX: case NEMO_RED_AMIN:   /* s0 = extreme, s1 = its count */
            run_pass<T>(S->s0, S->part, xp, A, K, M, op == NEMO_RED_AMAX ? P_MAX_ID : P_MIN_ID, NULL, 0, st);
            run_pass<T>(S->s1, S->part, xp, A, K, M, P_ADD_EQC, S->s0, 0, st);
            break;
        case NEMO_RED_VAR: case NEMO_RED_STD:
            reduce_stats<T>(S, xp, A, K, M, op, param, st);
            if (op == NEMO_RED_STD) map_stats(MAP_STD_BWD, S, n, K, param, st);
            break;
        case NEMO_RED_NORM:
            run_pass<T>(S->s0, S->part, xp, A, K, M, norm_pass(param), NULL, param, st);
            map_stats(MAP_NORM_FINISH, S, n, K, param, st);
            if (isinf(param)) run_pass<T>(S->s1, S->part, xp, A, K, M, P_ADD_ABSEQC, S->s0, 0, st);
            break;
        default:   /* logsumexp: s0 = the result */
            reduce_stats<T>(S, xp, A, K, M, op, param, st);
            map_stats(MAP_LSE_FINISH, S, n, K, param, st);
            break;
        }
    }
    nemo_cuda_iter<3> it;
    int64_t N = 0;
    int mode = akm_iter(&it, A, K, M, &N);
    T *dp = (T *)nemo_cuda_data(dx);
    const T *gp = (const T *)nemo_cuda_data(g);
    const double *s0 = S ? S->s0 : NULL, *s1 = S ? S->s1 : NULL;
    if (mode == NEMO_CUDA_STR32)
        reduce_bwd_kernel<T, NEMO_CUDA_STR32><<<nemo_cuda_blocks(N), NEMO_CUDA_THREADS, 0, st>>>(dp, gp, xp, s0, s1, it,
                                                                                                  N, K, op, param);
    else
        reduce_bwd_kernel<T, NEMO_CUDA_STR64><<<nemo_cuda_blocks(N), NEMO_CUDA_THREADS, 0, st>>>(dp, gp, xp, s0, s1, it,
                                                                                                  N, K, op, param);
}

static int reduce_backward_cuda(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *x, int64_t A, int64_t K,
                                int64_t M, int op, double param) {
    NEMO_CUDA_ENTER("reduce backward", dx);
    const nemo_tensor *ins[2] = {g, x};
    NEMO_CUDA_RC(check_same("reduce backward", dx, ins, 2));
    NEMO_CUDA_RC(check_sizes("reduce backward", A, K, M));
    if (op < 0 || op >= NEMO_NRED) return nemo_cuda_error(NEMO_EINVAL, "reduce backward: unknown op %d", op);
    if (op != NEMO_RED_SUM && op != NEMO_RED_MEAN && !x)
        return nemo_cuda_error(NEMO_EINVAL, "reduce backward: op %d needs the input's values", op);
    if (A * K * M == 0) return 0;
    stats_buf S, *Sp = NULL;
    if (op != NEMO_RED_SUM && op != NEMO_RED_MEAN) {
        NEMO_CUDA_RC(stats_alloc(dx->devindex, A, K, M, &S));
        Sp = &S;
    }
    cudaStream_t st = nemo_cuda_stream(dx->devindex);
    if (dx->dtype == NEMO_F32) reduce_bwd_launch<float>(dx, g, x, Sp, A, K, M, op, param, st);
    else reduce_bwd_launch<double>(dx, g, x, Sp, A, K, M, op, param, st);
    NEMO_CUDA_LAUNCHED("reduce backward op %d: kernel launch on cuda:%d (A %lld K %lld M %lld)", op, dx->devindex,
                       (long long)A, (long long)K, (long long)M);
    return 0;
}
NEMO_CUDA_KERNEL("reduce_backward", reduce_backward_cuda)

template <typename T>
static void argreduce_launch(nemo_tensor *vals, nemo_tensor *idx, const nemo_tensor *x, int64_t A, int64_t K,
                             int64_t M, int is_min, cudaStream_t st) {
    T *vp = vals ? (T *)nemo_cuda_data(vals) : NULL;
    int64_t *ip = (int64_t *)nemo_cuda_data(idx);
    const T *xp = (const T *)nemo_cuda_data(x);
    rplan P = make_plan(A, K, M, 0);
    if (!P.rows)
        argreduce_cols<T><<<nemo_cuda_blocks(A * M), NEMO_CUDA_THREADS, 0, st>>>(vp, ip, xp, A, K, M, is_min);
    else if (P.G == 32)
        argreduce_rows<T, 32><<<group_blocks(A, 32), NEMO_CUDA_THREADS, 0, st>>>(vp, ip, xp, A, K, is_min);
    else
        argreduce_rows<T, NEMO_CUDA_THREADS><<<group_blocks(A, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
            vp, ip, xp, A, K, is_min);
}

static int argreduce_cuda(nemo_tensor *vals, nemo_tensor *idx, const nemo_tensor *x, int64_t A, int64_t K, int64_t M,
                          int is_min) {
    NEMO_CUDA_ENTER("argreduce", x);
    const nemo_tensor *ins[1] = {vals};
    NEMO_CUDA_RC(nemo_cuda_check_compute("argreduce", x));
    NEMO_CUDA_RC(check_same("argreduce", x, ins, 1));
    if (idx->devtype != NEMO_CUDA || idx->devindex != x->devindex || idx->dtype != NEMO_I64)
        return nemo_cuda_error(NEMO_EINVAL, "argreduce: indices must be int64 on cuda:%d, got %s on %s:%d", x->devindex,
                               nemo_cuda_dtype_name(idx->dtype), idx->devtype == NEMO_CUDA ? "cuda" : "cpu", idx->devindex);
    NEMO_CUDA_RC(check_sizes("argreduce", A, K, M));
    if (K < 1) return nemo_cuda_error(NEMO_EINVAL, "argreduce: empty reduction");
    if (A * M == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(x->devindex);
    if (x->dtype == NEMO_F32) argreduce_launch<float>(vals, idx, x, A, K, M, is_min, st);
    else argreduce_launch<double>(vals, idx, x, A, K, M, is_min, st);
    NEMO_CUDA_LAUNCHED("argreduce: kernel launch on cuda:%d (A %lld K %lld M %lld)", x->devindex, (long long)A,
                       (long long)K, (long long)M);
    return 0;
}
NEMO_CUDA_KERNEL("argreduce", argreduce_cuda)

static int max_dim_backward_cuda(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *idx, int64_t A, int64_t K,
                                 int64_t M) {
    NEMO_CUDA_ENTER("max backward", dx);
    const nemo_tensor *ins[1] = {g};
    NEMO_CUDA_RC(check_same("max backward", dx, ins, 1));
    if (idx->devtype != NEMO_CUDA || idx->devindex != dx->devindex || idx->dtype != NEMO_I64)
        return nemo_cuda_error(NEMO_EINVAL, "max backward: indices must be int64 on cuda:%d", dx->devindex);
    NEMO_CUDA_RC(check_sizes("max backward", A, K, M));
    if (A * K * M == 0) return 0;
    nemo_cuda_iter<3> it;
    int64_t N = 0;
    int mode = akm_iter(&it, A, K, M, &N);
    cudaStream_t st = nemo_cuda_stream(dx->devindex);
    unsigned nb = nemo_cuda_blocks(N);
    const int64_t *ip = (const int64_t *)nemo_cuda_data(idx);
    if (dx->dtype == NEMO_F32) {
        float *dp = (float *)nemo_cuda_data(dx);
        const float *gp = (const float *)nemo_cuda_data(g);
        if (mode == NEMO_CUDA_STR32) max_dim_bwd_kernel<float, NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>(dp, gp, ip, it, N);
        else max_dim_bwd_kernel<float, NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>(dp, gp, ip, it, N);
    } else {
        double *dp = (double *)nemo_cuda_data(dx);
        const double *gp = (const double *)nemo_cuda_data(g);
        if (mode == NEMO_CUDA_STR32) max_dim_bwd_kernel<double, NEMO_CUDA_STR32><<<nb, NEMO_CUDA_THREADS, 0, st>>>(dp, gp, ip, it, N);
        else max_dim_bwd_kernel<double, NEMO_CUDA_STR64><<<nb, NEMO_CUDA_THREADS, 0, st>>>(dp, gp, ip, it, N);
    }
    NEMO_CUDA_LAUNCHED("max backward: kernel launch on cuda:%d (%lld elements)", dx->devindex, (long long)N);
    return 0;
}
NEMO_CUDA_KERNEL("max_dim_backward", max_dim_backward_cuda)

template <typename T>
static void softmax_launch(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int lg,
                           cudaStream_t st) {
    T *yp = (T *)nemo_cuda_data(y);
    const T *xp = (const T *)nemo_cuda_data(x);
    rplan P = make_plan(A, K, M, 0);
    if (!P.rows)
        softmax_cols<T><<<nemo_cuda_blocks(A * M), NEMO_CUDA_THREADS, 0, st>>>(yp, xp, A, K, M, lg);
    else if (P.G == 32)
        softmax_rows<T, 32><<<group_blocks(A, 32), NEMO_CUDA_THREADS, 0, st>>>(yp, xp, A, K, lg);
    else
        softmax_rows<T, NEMO_CUDA_THREADS><<<group_blocks(A, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(yp, xp, A,
                                                                                                          K, lg);
}

static int softmax_cuda(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int lg) {
    NEMO_CUDA_ENTER("softmax", y);
    const nemo_tensor *ins[1] = {x};
    NEMO_CUDA_RC(check_same("softmax", y, ins, 1));
    NEMO_CUDA_RC(check_sizes("softmax", A, K, M));
    if (A * K * M == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(y->devindex);
    if (y->dtype == NEMO_F32) softmax_launch<float>(y, x, A, K, M, lg, st);
    else softmax_launch<double>(y, x, A, K, M, lg, st);
    NEMO_CUDA_LAUNCHED("softmax: kernel launch on cuda:%d (A %lld K %lld M %lld)", y->devindex, (long long)A,
                       (long long)K, (long long)M);
    return 0;
}
NEMO_CUDA_KERNEL("softmax", softmax_cuda)

template <typename T>
static void softmax_bwd_launch(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *y, int64_t A, int64_t K,
                               int64_t M, int lg, cudaStream_t st) {
    T *dp = (T *)nemo_cuda_data(dx);
    const T *gp = (const T *)nemo_cuda_data(g), *yp = (const T *)nemo_cuda_data(y);
    rplan P = make_plan(A, K, M, 0);
    if (!P.rows)
        softmax_bwd_cols<T><<<nemo_cuda_blocks(A * M), NEMO_CUDA_THREADS, 0, st>>>(dp, gp, yp, A, K, M, lg);
    else if (P.G == 32)
        softmax_bwd_rows<T, 32><<<group_blocks(A, 32), NEMO_CUDA_THREADS, 0, st>>>(dp, gp, yp, A, K, lg);
    else
        softmax_bwd_rows<T, NEMO_CUDA_THREADS><<<group_blocks(A, NEMO_CUDA_THREADS), NEMO_CUDA_THREADS, 0, st>>>(
            dp, gp, yp, A, K, lg);
}

static int softmax_backward_cuda(nemo_tensor *dx, const nemo_tensor *g, const nemo_tensor *y, int64_t A, int64_t K,
                                 int64_t M, int lg) {
    NEMO_CUDA_ENTER("softmax backward", dx);
    const nemo_tensor *ins[2] = {g, y};
    NEMO_CUDA_RC(check_same("softmax backward", dx, ins, 2));
    NEMO_CUDA_RC(check_sizes("softmax backward", A, K, M));
    if (A * K * M == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(dx->devindex);
    if (dx->dtype == NEMO_F32) softmax_bwd_launch<float>(dx, g, y, A, K, M, lg, st);
    else softmax_bwd_launch<double>(dx, g, y, A, K, M, lg, st);
    NEMO_CUDA_LAUNCHED("softmax backward: kernel launch on cuda:%d (A %lld K %lld M %lld)", dx->devindex, (long long)A,
                       (long long)K, (long long)M);
    return 0;
}
NEMO_CUDA_KERNEL("softmax_backward", softmax_backward_cuda)

static int cumsum_cuda(nemo_tensor *y, const nemo_tensor *x, int64_t A, int64_t K, int64_t M, int rev) {
    NEMO_CUDA_ENTER("cumsum", y);
    const nemo_tensor *ins[1] = {x};
    NEMO_CUDA_RC(check_same("cumsum", y, ins, 1));
    NEMO_CUDA_RC(check_sizes("cumsum", A, K, M));
    if (A * K * M == 0) return 0;
    cudaStream_t st = nemo_cuda_stream(y->devindex);
    unsigned nb = nemo_cuda_blocks(A * M);
    if (y->dtype == NEMO_F32)
        cumsum_kernel<float><<<nb, NEMO_CUDA_THREADS, 0, st>>>((float *)nemo_cuda_data(y),
                                                               (const float *)nemo_cuda_data(x), A, K, M, rev);
    else
        cumsum_kernel<double><<<nb, NEMO_CUDA_THREADS, 0, st>>>((double *)nemo_cuda_data(y),
                                                                (const double *)nemo_cuda_data(x), A, K, M, rev);
    NEMO_CUDA_LAUNCHED("cumsum: kernel launch on cuda:%d (A %lld K %lld M %lld)", y->devindex, (long long)A,
                       (long long)K, (long long)M);
    return 0;
}
NEMO_CUDA_KERNEL("cumsum", cumsum_cuda)
