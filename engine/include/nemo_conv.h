/*
 * nemo_conv.h: convolutions (1-D, 2-D, 3-D with stride, zero padding, dilation and groups),
 * embedding lookup and nearest-neighbour interpolation, forward and backward
 * (front-ends in engine/ops/conv.c, CPU kernels in kernels/cpu/conv.c).
 *
 * Shapes (nsp = number of spatial dims, 1, 2 or 3):
 *   x (N, C, *S) or unbatched (C, *S); w (O, C/groups, *K); b (O) or NULL;
 *   y (N, O, *So), So[d] = (S[d] + pad_lo[d] + pad_hi[d] - dilation[d]*(K[d]-1) - 1) / stride[d] + 1.
 * stride, pad_lo, pad_hi and dilation point to nsp values each. Padding may be asymmetric
 * (PyTorch's padding="same" with an even kernel pads one more after than before).
 * Float dtypes only; x, w and b may differ (the result has their promoted dtype); bf16/f16 are
 * computed in float32 and rounded once.
 */
#ifndef NEMO_CONV_H
#define NEMO_CONV_H

/* How a convolution is computed. AUTO picks: a direct GEMM for 1x1 convs with stride 1 and no
 * padding, a patch gather + GEMM when kernel == stride and every window lies inside the input
 * (patchify embeddings), im2col/vol2col + GEMM otherwise. IM2COL forces the general path (used by
 * tests and benchmarks to compare against the fast paths). */
typedef enum { NEMO_CONV_AUTO = 0, NEMO_CONV_IM2COL = 1 } nemo_conv_algo;

NEMO_API nemo_tensor *nemo_conv(const nemo_tensor *x, const nemo_tensor *w, const nemo_tensor *b, int nsp,
                                const int64_t *stride, const int64_t *pad_lo, const int64_t *pad_hi,
                                const int64_t *dilation, int64_t groups, int algo);
/* Gradients of nemo_conv for upstream gradient g (y's shape). dx, dw, db receive new references
 * (dx in x's dtype, dw and db in w's dtype); pass NULL for a gradient that is not needed. On
 * failure every requested output is set to NULL. */
NEMO_API int nemo_conv_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *w, int nsp,
                                const int64_t *stride, const int64_t *pad_lo, const int64_t *pad_hi,
                                const int64_t *dilation, int64_t groups, int algo,
                                nemo_tensor **dx, nemo_tensor **dw, nemo_tensor **db);

/* out[..., :] = weight[indices[...], :]: indices int64 or int32 of any shape, weight (V, D);
 * out (*indices.shape, D) in weight's dtype. An index outside [0, V) is an error naming it. */
NEMO_API nemo_tensor *nemo_embedding(const nemo_tensor *indices, const nemo_tensor *weight);
/* dW (V, D) in g's dtype: row v is the sum of g's rows whose index is v, added in the order of
 * the indices (deterministic); row padding_idx stays zero (padding_idx < 0: none). */
NEMO_API nemo_tensor *nemo_embedding_backward(const nemo_tensor *g, const nemo_tensor *indices,
                                              int64_t num_weights, int64_t padding_idx);

/* Nearest-neighbour resampling of x (N, C, *S) with nsp = ndim - 2 spatial dims to out_size
 * (nsp values). scales (nsp values, or NULL) are the user's scale factors, 0 where not given:
 * as in PyTorch, a given scale s maps output index i to floor(i * (float)(1/s)), otherwise the
 * ratio in/out is used; NEAREST also copies when out == in and halves when out == 2 * in, as
 * PyTorch's CPU kernel does. NEAREST_EXACT uses floor((i + 0.5) * scale). Any dtype. */
typedef enum { NEMO_INTERP_NEAREST = 0, NEMO_INTERP_NEAREST_EXACT = 1, NEMO_NINTERP = 2 } nemo_interp_mode;
NEMO_API nemo_tensor *nemo_interpolate(const nemo_tensor *x, int nsp, const int64_t *out_size,
                                       const double *scales, int mode);
/* dx of in_shape (nsp + 2 values): each output pixel's gradient summed into its source pixel. */
NEMO_API nemo_tensor *nemo_interpolate_backward(const nemo_tensor *g, int nsp, const int64_t *in_shape,
                                                const double *scales, int mode);

#endif /* NEMO_CONV_H */
