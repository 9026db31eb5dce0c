/*
 * nemo_nnops.h: normalisation ops with fused forward and backward kernels: layer_norm,
 * rms_norm, group_norm (engine/ops/nnops.c, kernels/cpu/nnops.c).
 *
 * Conventions shared by the three ops
 * - Statistics (mean, rstd = 1/sqrt(var + eps)) are computed in float32 for f32/bf16/f16 input
 *   and in float64 for f64 input; the output is rounded once to the input's dtype. The forward
 *   returns the statistics (new references, dtype float32 or float64 as above) for backward.
 * - weight / bias are optional (NULL) and independent. Parameter gradients come back in the
 *   parameter's dtype (dweight: weight's dtype; dbias: bias_dtype, or x's dtype when < 0), and
 *   are summed over rows in a fixed order: results do not depend on the thread count.
 * - Every nemo_tensor ** out-parameter that is not NULL receives a new reference (+1) on
 *   success and NULL on failure; pass NULL for a gradient you do not need.
 */
#ifndef NEMO_NNOPS_H
#define NEMO_NNOPS_H

/* ==== layer_norm: F.layer_norm(x, normalized_shape, weight, bias, eps) ==== */
/* Normalises over the trailing nnorm dims of x, which must equal normalized_shape.
 * weight, bias: NULL or of shape normalized_shape. mean, rstd: one value per row, with the
 * shape of x's leading dims. */
NEMO_API int nemo_layer_norm(const nemo_tensor *x, int nnorm, const int64_t *normalized_shape,
                             const nemo_tensor *weight, const nemo_tensor *bias, double eps,
                             nemo_tensor **y, nemo_tensor **mean, nemo_tensor **rstd);
/* g = dL/dy (x's shape); mean, rstd from the forward. dx = r*(gh - mean(gh) - xh*mean(gh*xh))
 * with gh = g*w, xh = (x - mean)*r; dweight = sum_rows g*xh; dbias = sum_rows g.
 * dweight needs weight. */
NEMO_API int nemo_layer_norm_backward(const nemo_tensor *g, const nemo_tensor *x, int nnorm,
                                      const nemo_tensor *mean, const nemo_tensor *rstd,
                                      const nemo_tensor *weight, int bias_dtype,
                                      nemo_tensor **dx, nemo_tensor **dweight, nemo_tensor **dbias);

/* ==== rms_norm: F.rms_norm(x, normalized_shape, weight, eps) ==== */
/* y = x * r * w with r = 1/sqrt(mean(x^2) + eps) over the trailing nnorm dims. eps < 0 means
 * PyTorch's default for eps=None: the machine epsilon of the compute dtype (FLT_EPSILON for
 * f32/bf16/f16, DBL_EPSILON for f64). rstd: one value per row (x's leading dims). */
NEMO_API int nemo_rms_norm(const nemo_tensor *x, int nnorm, const int64_t *normalized_shape,
                           const nemo_tensor *weight, double eps, nemo_tensor **y, nemo_tensor **rstd);
/* dx = r*(gh - xh*mean(gh*xh)) with gh = g*w, xh = x*r; dweight = sum_rows g*xh. */
NEMO_API int nemo_rms_norm_backward(const nemo_tensor *g, const nemo_tensor *x, int nnorm,
                                    const nemo_tensor *rstd, const nemo_tensor *weight,
                                    nemo_tensor **dx, nemo_tensor **dweight);

/* ==== group_norm: F.group_norm(x, num_groups, weight, bias, eps) ==== */
/* x is (N, C, *); statistics per (n, group) over C/num_groups channels times the spatial
 * dims; weight, bias: NULL or (C). mean, rstd: (N, num_groups). */
NEMO_API int nemo_group_norm(const nemo_tensor *x, int64_t num_groups, const nemo_tensor *weight,
                             const nemo_tensor *bias, double eps,
                             nemo_tensor **y, nemo_tensor **mean, nemo_tensor **rstd);
NEMO_API int nemo_group_norm_backward(const nemo_tensor *g, const nemo_tensor *x, int64_t num_groups,
                                      const nemo_tensor *mean, const nemo_tensor *rstd,
                                      const nemo_tensor *weight, int bias_dtype,
                                      nemo_tensor **dx, nemo_tensor **dweight, nemo_tensor **dbias);

#endif /* NEMO_NNOPS_H */
