/*
 * nemo_linalg.h: matrix products and attention, forward and backward: matmul / mm / bmm / mv /
 * dot (torch.matmul semantics), linear (y = x W^T + b) and scaled_dot_product_attention
 * (engine/ops/linalg.c, kernels/cpu/linalg.c on OpenBLAS).
 *
 * Conventions shared by the family
 * - Float dtypes only, and both (all) operands of one dtype, as in PyTorch: an integer matmul is
 *   an error ("matmul: integer dtypes are not supported"). float32 and float64 run sgemm /
 *   dgemm directly on the operands' memory: a view whose last or second-to-last dim has stride
 *   1 (transposes, x:transpose(-1, -2), permuted heads) is handed to BLAS with a transpose flag
 *   and a leading dimension, never copied; only a view with neither is copied first.
 *   bfloat16 / float16 are converted to float32, multiplied in float32 and rounded once.
 * - Results do not depend on the number of threads: the CPU kernels run single-threaded gemms
 *   on pieces (output tiles, attention blocks) whose size depends on the shapes only, shared
 *   out over the OpenMP threads, and every sum over a batch, rows or blocks runs in a fixed
 *   order. (OpenBLAS's own threading does not give the same bits on 1 and 2 threads.)
 * - Every nemo_tensor ** out-parameter that is not NULL receives a new reference (+1) on
 *   success and NULL on failure; pass NULL for a gradient you do not need.
 */
#ifndef NEMO_LINALG_H
#define NEMO_LINALG_H

/* ==== matmul family ==== */
/* Which PyTorch function a product is checked as (the rank rules and the op name in errors):
 *   MATMUL: torch.matmul, 1-D operands get a dim prepended (left) / appended (right) that the
 *           result drops; batch dims broadcast.   MM: (n,k) x (k,m) only.
 *   BMM: (b,n,k) x (b,k,m), equal batches, no broadcast.   MV: (n,k) x (k).   DOT: (k) x (k). */
typedef enum {
    NEMO_MM_MATMUL = 0, NEMO_MM_MM = 1, NEMO_MM_BMM = 2, NEMO_MM_MV = 3, NEMO_MM_DOT = 4
} nemo_mm_kind;

/* The product of a and b under the rules of `kind` (a new, contiguous tensor of their dtype). */
NEMO_API nemo_tensor *nemo_matmul(const nemo_tensor *a, const nemo_tensor *b, int kind);
/* Gradients of c = matmul(a, b) for upstream g (c's shape): da = g b^T and db = a^T g, each
 * summed over the batch dims its operand was broadcast along, in a's / b's shape and dtype. */
NEMO_API int nemo_matmul_backward(const nemo_tensor *g, const nemo_tensor *a, const nemo_tensor *b,
                                  nemo_tensor **da, nemo_tensor **db);

/* ==== linear: F.linear(x, weight, bias) ==== */
/* x (*, K) (any leading dims, or 1-D), weight (N, K), bias (N) or NULL -> y (*, N).
 * One gemm over all leading dims (they are folded into rows without a copy when their strides
 * allow), with the bias broadcast into the output before the gemm accumulates onto it. */
NEMO_API nemo_tensor *nemo_linear(const nemo_tensor *x, const nemo_tensor *weight, const nemo_tensor *bias);
/* g (*, N): dx = g W (x's shape), dweight = g^T x summed over all leading dims as one gemm,
 * dbias = column sums of g over the leading dims (accumulated in float64). */
NEMO_API int nemo_linear_backward(const nemo_tensor *g, const nemo_tensor *x, const nemo_tensor *weight,
                                  nemo_tensor **dx, nemo_tensor **dweight, nemo_tensor **dbias);

/* ==== scaled_dot_product_attention ==== */
/* q (*, Sq, D), k (*, Sk, D), v (*, Sk, Dv) with equal leading dims * (batch, heads, ...);
 * out (*, Sq, Dv) = softmax(scale * q k^T + mask) v, laid out in memory like q (a q that is a
 * permuted (B, S, H, D) buffer gives an out whose transpose back to (B, S, H, Dv) is
 * contiguous). scale: NaN means 1/sqrt(D). mask: NULL, bool (true = attend) or float (added),
 * broadcastable to (*, Sq, Sk). is_causal: query i attends keys j <= i (PyTorch's top-left
 * tril); it cannot be combined with a mask. A row that attends to nothing gives zeros.
 * lse (may be NULL): the row logsumexp (*, Sq) in float32 (float64 for f64 inputs), which is
 * all the backward needs besides q, k, v and out.
 * probs (may be NULL; needs lse): asks to keep the probabilities for the backward. Where the
 * device has such a kernel (the CPU), *probs gets P (*, Sq, Sk) contiguous in lse's dtype
 * (with is_causal, the entries of a row past the keys its query block reaches are left
 * unwritten and are never read); elsewhere *probs is NULL. Keeping P costs Sq x Sk values per
 * (batch, head) and saves the backward the q k^T product and its exponentials. */
NEMO_API int nemo_sdpa(const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                       const nemo_tensor *mask, int is_causal, double scale,
                       nemo_tensor **out, nemo_tensor **lse, nemo_tensor **probs);
/* Gradients for upstream g (out's shape). probs: NULL (the probabilities are recomputed block
 * by block from q, k and lse, FlashAttention-style) or the forward's *probs. dq, dk, dv come
 * in q's, k's, v's dtype and layout. */
NEMO_API int nemo_sdpa_backward(const nemo_tensor *g, const nemo_tensor *q, const nemo_tensor *k,
                                const nemo_tensor *v, const nemo_tensor *mask, const nemo_tensor *out,
                                const nemo_tensor *lse, const nemo_tensor *probs, int is_causal, double scale,
                                nemo_tensor **dq, nemo_tensor **dk, nemo_tensor **dv);
/* 1 when nemo_sdpa / nemo_sdpa_backward with these arguments, and no kept probabilities, run
 * the fused low-precision kernels ("sdpa_flash_fwd" / "sdpa_flash_bwd"): q, k, v bfloat16 or
 * float16, no mask, head dim 64 or 128 (Dv too), Sq and Sk > 0, on a device that has them. On
 * CUDA they are flash attention on tensor cores; the CPU's twins compute as the float32 path
 * does. 0 otherwise, also for arguments nemo_sdpa would refuse. */
NEMO_API int nemo_sdpa_uses_flash(const nemo_tensor *q, const nemo_tensor *k, const nemo_tensor *v,
                                  const nemo_tensor *mask);
/* Allow (on = 1) or forbid (0) the fused kernels; -1 only asks. Returns the previous setting.
 * Initially on, unless NEMO_FLASH=0 is in the environment. */
NEMO_API int nemo_sdpa_enable_flash(int on);

#endif /* NEMO_LINALG_H */
