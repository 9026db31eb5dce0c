/*
 * nemo_reduce.h: reductions (sum, mean, prod, amax/amin, var/std, norm, logsumexp), arg
 * reductions (max/min with a dim, argmax/argmin), cumsum and the fused softmax/log_softmax,
 * forward and backward (engine/ops/reduce.c, kernels/cpu/reduce.c).
 *
 * Conventions
 * - dims may be negative (counted from the end) and are checked here: a bad or repeated dim is
 *   an error naming the op and the valid range. ndims == 0 (or dims == NULL) reduces every dim.
 *   A 0-dim tensor accepts dim 0 or -1. keepdim keeps reduced dims with size 1.
 * - Accumulation is in float64 for every dtype (float32, bfloat16 and float16 inputs are read as
 *   float32 and the result is rounded once); sums over a row are cut into blocks of a fixed
 *   size whose totals are added in order, so results do not depend on the thread count.
 * - Output dtype (out_dtype < 0): sum/prod of integers or bool give int64, of floats the input
 *   dtype; amax/amin keep the input dtype; mean/var/std/norm need a floating input (error
 *   otherwise); logsumexp of integers gives float32. out_dtype >= 0 casts the input to that
 *   dtype first (PyTorch's dtype= argument).
 * - Backward functions return the gradient of the input in the input's dtype (float32 for
 *   non-float inputs), contiguous.
 */
#ifndef NEMO_REDUCE_H
#define NEMO_REDUCE_H

typedef enum {
    NEMO_RED_SUM = 0,
    NEMO_RED_MEAN,
    NEMO_RED_PROD,
    NEMO_RED_AMAX,        /* NaN propagates */
    NEMO_RED_AMIN,
    NEMO_RED_VAR,         /* param = correction (1 = unbiased, 0 = population) */
    NEMO_RED_STD,         /* param = correction */
    NEMO_RED_NORM,        /* param = p: any real number, INFINITY or -INFINITY (0 counts nonzeros) */
    NEMO_RED_LOGSUMEXP,
    NEMO_NRED
} nemo_redop;

/* y = op(x) over dims. Returns a new tensor, or NULL with an error. */
NEMO_API nemo_tensor *nemo_reduce(const nemo_tensor *x, int op, int ndims, const int64_t *dims,
                                  int keepdim, int out_dtype, double param);

/* dx = d op / dx * g, for an input of shape (ndim, shape) and dtype x_dtype; g has the output's
 * shape (keepdim or not, as in the forward). x holds the forward input's values; it may be NULL
 * for SUM and MEAN, which do not need them. Statistics (mean, max, norm...) are recomputed from
 * x in float64. Ties of AMAX/AMIN (and of NORM with p = +-inf) share the gradient evenly. */
NEMO_API nemo_tensor *nemo_reduce_backward(const nemo_tensor *g, const nemo_tensor *x, int ndim,
                                           const int64_t *shape, int x_dtype, int op, int ndims,
                                           const int64_t *dims, int keepdim, double param);

/* max / min along one dim (is_min selects min): values (x's dtype) and indices (int64) of the
 * first extreme element; NaN counts as the extreme. K == 0 is an error. values and indices
 * receive new references (either may be NULL when not wanted). */
NEMO_API int nemo_max_dim(const nemo_tensor *x, int64_t dim, int keepdim, int is_min,
                          nemo_tensor **values, nemo_tensor **indices);
/* argmax / argmin: has_dim == 0 reduces the flattened tensor (keepdim then gives all-ones
 * dims). An empty reduction is an error. */
NEMO_API nemo_tensor *nemo_argmax(const nemo_tensor *x, int has_dim, int64_t dim, int keepdim,
                                  int is_min);
/* Gradient of max_dim / min_dim: g scattered into zeros of shape (ndim, shape) at indices
 * along dim; dtype x_dtype. */
NEMO_API nemo_tensor *nemo_max_dim_backward(const nemo_tensor *g, const nemo_tensor *indices,
                                            int ndim, const int64_t *shape, int x_dtype,
                                            int64_t dim, int keepdim);

/* softmax (log = 0) or log_softmax (log = 1) along dim, numerically stable (the row max is
 * subtracted). out_dtype >= 0 casts x first; otherwise the output has x's dtype (float32 for
 * non-float x). */
NEMO_API nemo_tensor *nemo_softmax(const nemo_tensor *x, int64_t dim, int log, int out_dtype);
/* From the forward output y: softmax dx = y * (g - sum(g * y)); log_softmax
 * dx = g - exp(y) * sum(g). The result has y's dtype. */
NEMO_API nemo_tensor *nemo_softmax_backward(const nemo_tensor *g, const nemo_tensor *y,
                                            int64_t dim, int log);

/* Inclusive cumulative sum along dim (reverse = 1: from the end, the gradient of cumsum).
 * Output dtype as sum's. */
NEMO_API nemo_tensor *nemo_cumsum(const nemo_tensor *x, int64_t dim, int reverse, int out_dtype);

#endif /* NEMO_REDUCE_H */
