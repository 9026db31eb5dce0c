/* tests/c/test_core.c: the engine's C API without Lua: lifecycle, views, copies, conversion,
 * errors, the block cache and the kernel registry. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "nemo.h"
#include "tap.h"

int main(void) {
    int64_t shape[2] = {3, 5};
    nemo_tensor *t = nemo_empty(2, shape, NEMO_F32, NEMO_CPU, 0);
    TAP_OK(t && t->ndim == 2 && t->stride[0] == 5 && t->stride[1] == 1, "empty (3,5) f32 is contiguous");
    TAP_OK(nemo_fill_(t, 2.5) == 0, "fill_");
    double v = 0;
    TAP_OK(nemo_get_flat(t, 14, &v) == 0 && v == 2.5, "get_flat reads the filled value");
    TAP_OK(nemo_get_flat(t, 15, &v) < 0 && strstr(nemo_last_error(), "out of range"), "get_flat past the end is an error: %s", nemo_last_error());

    /* a transposed view and a strided copy */
    int64_t tsh[2] = {5, 3}, tst[2] = {1, 5};
    nemo_tensor *tv = nemo_tensor_view(t, 2, tsh, tst, 0);
    TAP_OK(tv && !nemo_tensor_is_contiguous(tv), "transposed view is not contiguous");
    TAP_OK(t->storage->refcount == 2, "the view holds a storage reference");
    float *p = nemo_tensor_data(t);
    for (int i = 0; i < 15; i++) p[i] = (float)i;
    nemo_tensor *c = nemo_contiguous(tv);
    float *q = nemo_tensor_data(c);
    TAP_OK(c && q[1] == 5.0f && q[3] == 1.0f, "contiguous() of the transpose reorders elements");

    /* out-of-bounds views are refused */
    int64_t bad[2] = {4, 5};
    TAP_OK(nemo_tensor_view(t, 2, bad, NULL, 0) == NULL && strstr(nemo_last_error(), "outside the storage"),
           "a view past the storage is refused: %s", nemo_last_error());

    /* dtype conversion: bf16 rounds to nearest even, f16 round trip */
    nemo_tensor *b = nemo_to(t, NEMO_BF16, NEMO_CPU, 0);
    nemo_tensor *back = nemo_to(b, NEMO_F32, NEMO_CPU, 0);
    TAP_OK(b && back && ((float *)nemo_tensor_data(back))[7] == 7.0f, "f32 -> bf16 -> f32 keeps small integers");
    nemo_tensor *h = nemo_to(t, NEMO_F16, NEMO_CPU, 0);
    double hv = 0;
    TAP_OK(h && nemo_get_flat(h, 9, &hv) == 0 && hv == 9.0, "f16 conversion");
    int64_t one = 1;
    nemo_tensor *r = nemo_empty(1, &one, NEMO_F32, NEMO_CPU, 0);
    *(float *)nemo_tensor_data(r) = 1.00390625f;       /* 1 + 2^-8: a tie in bf16 */
    nemo_tensor *rb = nemo_to(r, NEMO_BF16, NEMO_CPU, 0);
    double rv = 0;
    nemo_get_flat(rb, 0, &rv);
    TAP_OK(rv == 1.0, "bf16 tie rounds to even (1 + 2^-8 -> 1)");
    *(float *)nemo_tensor_data(r) = 1.01171875f;       /* 1 + 3*2^-8: a tie that rounds up */
    nemo_tensor *rb2 = nemo_to(r, NEMO_BF16, NEMO_CPU, 0);
    nemo_get_flat(rb2, 0, &rv);
    TAP_OK(rv == 1.015625, "bf16 tie rounds to even (1 + 3*2^-8 -> 1 + 2^-6)");

    /* errors carry the op, the values and file:line */
    int64_t neg = -2;
    TAP_OK(nemo_empty(1, &neg, NEMO_F32, NEMO_CPU, 0) == NULL && strstr(nemo_last_error(), "negative size -2")
           && strstr(nemo_last_error(), "core.c:"), "negative size: %s", nemo_last_error());
    TAP_OK(nemo_empty(1, &one, NEMO_F32, NEMO_CUDA, 0) == NULL && strstr(nemo_last_error(), "no CUDA device"),
           "cuda without a GPU: %s", nemo_last_error());
    TAP_OK(nemo_dtype_from_name("torch.bfloat16") == NEMO_BF16 && nemo_dtype_from_name("fp8") == -1, "dtype names");

    /* binary op with broadcasting through the registry */
    int64_t s1[1] = {5};
    nemo_tensor *row = nemo_arange(0, 1, 5, NEMO_F32, NEMO_CPU, 0);
    nemo_tensor *sum = nemo_binary(t, row, NEMO_BOP_ADD, 1.0, -1);
    double sv = 0;
    nemo_get_flat(sum, 7, &sv);
    TAP_OK(sum && sv == 7.0 + 2.0, "broadcast add (3,5) + (5,)");
    (void)s1;

    /* memory accounting and the CPU block cache */
    int64_t big[1] = {1 << 20};
    int64_t before = nemo_memory_current(NEMO_CPU, 0);
    nemo_tensor *m = nemo_empty(1, big, NEMO_F32, NEMO_CPU, 0);
    TAP_OK(nemo_memory_current(NEMO_CPU, 0) - before >= (4 << 20), "4 MiB tensor counted");
    void *addr = nemo_tensor_data(m);
    nemo_tensor_release(m);
    TAP_OK(nemo_memory_current(NEMO_CPU, 0) == before, "released tensor uncounted");
    TAP_OK(nemo_memory_cached(NEMO_CPU, 0) >= (4 << 20), "its block is cached");
    nemo_tensor *m2 = nemo_empty(1, big, NEMO_F32, NEMO_CPU, 0);
    TAP_OK(nemo_tensor_data(m2) == addr, "the same size reuses the cached block");
    nemo_tensor_release(m2);
    nemo_memory_empty_cache(NEMO_CPU, 0);
    TAP_OK(nemo_memory_cached(NEMO_CPU, 0) == 0, "empty_cache frees cached blocks");

    nemo_tensor *list[] = {t, tv, c, b, back, h, r, rb, rb2, row, sum};
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) nemo_tensor_release(list[i]);
    return TAP_DONE();
}
