/*
 * random.c: counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
 *
 * Element i of a draw is a pure function of (seed, offset + i), so results are the same for
 * any thread count and any device; a generator advances its offset by the number of elements
 * drawn. Uniforms use 24 random bits (float32) or 53 (float64); normals use Box-Muller on two
 * uniforms of the same counter.
 */
#include "internal.h"

static void philox(uint64_t seed, uint64_t ctr, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
        /* (c0,c1,c2,c3) = (hi(p1)^c1^k0, lo(p1), hi(p0)^c3^k1, lo(p0)) */
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

static double u53(uint32_t a, uint32_t b) {   /* [0, 1) with 53 bits */
    return (double)(((uint64_t)a << 21) | (b >> 11)) / 9007199254740992.0;
}

static int draw(nemo_tensor *t, nemo_generator *g, int normal, double a, double b) {
    int rc = 0;
    nemo_tensor *h = NULL;
    NEMO_CHECK(g, NEMO_EINVAL, "random draw: no generator");
    NEMO_CHECK(nemo_dtype_is_float(t->dtype), NEMO_EDTYPE, "random draw: expected a floating tensor, got %s",
               nemo_dtype_name(t->dtype));
    int64_t n = nemo_tensor_numel(t);
    NEMO_TRYP(h, nemo_empty(t->ndim, t->shape, NEMO_F64, NEMO_CPU, 0));
    double *p = nemo_tensor_data(h);
    uint64_t seed = g->seed, off = g->offset;
    int wide = t->dtype == NEMO_F64;
    #pragma omp parallel for if (n > NEMO_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        uint32_t r[4];
        philox(seed, off + (uint64_t)i, r);
        double u1 = wide ? u53(r[0], r[1]) : (double)(r[0] >> 8) / 16777216.0;
        if (!normal) { p[i] = a + (b - a) * u1; continue; }
        double u2 = wide ? u53(r[2], r[3]) : (double)(r[2] >> 8) / 16777216.0;
        double rad = sqrt(-2.0 * log(1.0 - u1));   /* 1 - u1 is in (0, 1] */
        p[i] = a + b * rad * cos(6.283185307179586 * u2);
    }
    g->offset += (uint64_t)n;
    NEMO_TRY(nemo_copy_(t, h));
fail:
    nemo_tensor_release(h);
    return rc;
}

NEMO_API int nemo_rand_(nemo_tensor *t, nemo_generator *g, double lo, double hi) { return draw(t, g, 0, lo, hi); }
NEMO_API int nemo_randn_(nemo_tensor *t, nemo_generator *g, double mean, double std) { return draw(t, g, 1, mean, std); }
