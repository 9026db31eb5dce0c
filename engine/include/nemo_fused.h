/*
 * nemo_fused.h: fused elementwise ops of the diffusion-transformer blocks, each with a fused
 * backward (engine/ops/fused.c, kernels/cpu/fused.c), and the vectorised float32 math that the
 * CPU kernels use.
 *
 * Each op computes exactly the op sequence diffusers writes, with the same roundings in float32
 * and float64 (no fused multiply-add, the same association), in one pass over memory instead of
 * several: results equal the unfused sequence bit for bit in float32 / float64. bfloat16 and
 * float16 inputs are computed in float32 and rounded once (the unfused sequence rounds after
 * every op). The result has the promoted dtype of the inputs; gradients come back in each
 * input's own dtype. Broadcast gradients (dscale, dshift, dgate) sum the products, rounded to
 * the compute dtype, in float64 in a fixed order (rows in order), so they equal the unfused
 * mul + sum_to and do not depend on the thread count.
 *
 * Shapes: B batch, S tokens, D channels (the last dim), Dh head dim.
 * Every nemo_tensor ** out-parameter that is not NULL receives a new reference (+1) on success
 * and NULL on failure; pass NULL for a gradient you do not need.
 */
#ifndef NEMO_FUSED_H
#define NEMO_FUSED_H

/* ==== rotary position embedding ==== */
/* diffusers' apply_rotary_emb (use_real, interleaved pairs): out = x*cos + rot(x)*sin with
 * rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i], i.e. out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i],
 * out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]. x has ndim >= 2 with the sequence at seq_dim
 * (0 <= seq_dim < ndim - 1) and Dh (even) last; cos and sin are (S, Dh), broadcast over the
 * other dims (batch before seq_dim, heads between). Computed in the promoted compute dtype of
 * x and the tables, rounded once to x's dtype (diffusers' x.float() ... .to(x.dtype)). */
NEMO_API nemo_tensor *nemo_rope(const nemo_tensor *x, const nemo_tensor *cos, const nemo_tensor *sin, int seq_dim);
/* dx = g*cos + rot^T(g*sin): dx[2i] = g[2i] cos[2i] + g[2i+1] sin[2i+1],
 * dx[2i+1] = g[2i+1] cos[2i+1] - g[2i] sin[2i]; in x_dtype (the tables get no gradient). */
NEMO_API nemo_tensor *nemo_rope_backward(const nemo_tensor *g, const nemo_tensor *cos, const nemo_tensor *sin,
                                         int seq_dim, int x_dtype);

/* ==== AdaLN modulation ==== */
/* y = x * (1 + scale[:, None]) + shift[:, None]: x (B, S, D); scale and shift (B, D) or (1, D),
 * broadcast over the tokens; shift may be NULL (no shift). (1 + scale) is rounded first, then
 * the product, then the sum, as the three unfused ops do. */
NEMO_API nemo_tensor *nemo_modulate(const nemo_tensor *x, const nemo_tensor *scale, const nemo_tensor *shift);
/* dx = g * (1 + scale); dscale = sum over tokens (and over B when scale is (1, D)) of g*x;
 * dshift = the same sum of g (shift_dtype < 0: scale's dtype). */
NEMO_API int nemo_modulate_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *scale,
                                    int shift_dtype, nemo_tensor **dx, nemo_tensor **dscale,
                                    nemo_tensor **dshift);

/* ==== gated residual ==== */
/* y = x + gate[:, None] * a: x and a (B, S, D), gate (B, D) or (1, D); the product is rounded
 * before the sum (diffusers: hidden_states + gate.unsqueeze(1) * attn_output). */
NEMO_API nemo_tensor *nemo_gated_add(const nemo_tensor *x, const nemo_tensor *gate, const nemo_tensor *a);
/* dx = g (the caller passes g on); da = g * gate in a's dtype; dgate = sum over tokens of g*a in
 * gate's dtype. */
NEMO_API int nemo_gated_add_backward(const nemo_tensor *g, const nemo_tensor *gate, const nemo_tensor *a,
                                     nemo_tensor **da, nemo_tensor **dgate);

/* ==== vectorised float32 math ==== */
/* The branch-free float32 functions behind the CPU pointwise kernels (exp, tanh, sigmoid, silu,
 * gelu), applied to n contiguous floats (y may equal x). For accuracy tests and benchmarks. */
typedef enum { NEMO_FM_EXP = 0, NEMO_FM_TANH, NEMO_FM_SIGMOID, NEMO_FM_ERF, NEMO_NFM } nemo_fastmath_fn;
NEMO_API int nemo_fastmath_f32(int fn, float *y, const float *x, int64_t n);

#endif /* NEMO_FUSED_H */
