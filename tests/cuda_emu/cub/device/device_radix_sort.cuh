/* tests/cuda_emu/cub/device/device_radix_sort.cuh: cub::DeviceRadixSort::SortPairs for the CUDA
 * emulator (see ../../cuda_runtime.h): a stable sort by the key bits [begin_bit, end_bit), as
 * the radix sort is. */
#ifndef NEMO_CUDA_EMU_CUB_SORT_H
#define NEMO_CUDA_EMU_CUB_SORT_H
#include <algorithm>
#include <vector>
#include "../../cuda_runtime.h"
namespace cub {
struct DeviceRadixSort {
    template <class K, class V>
    static cudaError_t SortPairs(void *temp, size_t &temp_bytes, const K *keys_in, K *keys_out, const V *vals_in,
                                 V *vals_out, int n, int begin_bit = 0, int end_bit = (int)(sizeof(K) * 8),
                                 cudaStream_t st = 0) {
        if (!temp) { temp_bytes = 256; return cudaSuccess; }
        if (n < 0 || begin_bit < 0 || end_bit > (int)(sizeof(K) * 8) || begin_bit > end_bit) return cudaErrorInvalidValue;
        /* queued on st like the real sort: the keys are read when it runs */
        return nemo_emu::enqueue(st, "cub::DeviceRadixSort::SortPairs", [=]() {
            const int nb = end_bit - begin_bit;
            auto bits = [&](K k) { return nb >= (int)(sizeof(K) * 8) ? k : (K)((k >> begin_bit) & (((K)1 << nb) - 1)); };
            std::vector<int> ix((size_t)n);
            for (int i = 0; i < n; i++) ix[(size_t)i] = i;
            std::stable_sort(ix.begin(), ix.end(), [&](int a, int b) { return bits(keys_in[a]) < bits(keys_in[b]); });
            std::vector<K> ko((size_t)n);
            std::vector<V> vo((size_t)n);
            for (int i = 0; i < n; i++) { ko[(size_t)i] = keys_in[ix[(size_t)i]]; if (vals_in) vo[(size_t)i] = vals_in[ix[(size_t)i]]; }
            if (keys_out) std::copy(ko.begin(), ko.end(), keys_out);
            if (vals_out) std::copy(vo.begin(), vo.end(), vals_out);
            return cudaSuccess;
        });
    }
};
}
#endif
