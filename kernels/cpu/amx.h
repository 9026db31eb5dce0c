/* kernels/cpu/amx.h: bfloat16 products on Intel AMX tiles (kernels/cpu/amx.c). */
#ifndef NEMO_AMX_H
#define NEMO_AMX_H
#include <stdint.h>

/* 1 when this CPU and kernel let the process use AMX-BF16 tiles (and NEMO_AMX is not "0"). */
int nemo_amx_available(void);

/* gemm_lp's contract for bf16 operands (offsets in elements, see kernels/cpu/linalg.c):
 * c_i = alpha op(a_i) op(b_i) + beta c_i in float32. Returns 1 when done, 0 when AMX is not
 * available (or scratch memory was short): the caller then computes the product itself. */
int nemo_amx_gemm_bf16(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t *a,
                       int64_t lda, const uint16_t *b, int64_t ldb, float beta, float *c, int64_t ldc,
                       int64_t nbatch, const int64_t *offs, int c_distinct);

#endif
