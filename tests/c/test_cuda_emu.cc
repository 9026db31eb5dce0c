/*
 * tests/c/test_cuda_emu.cc: the CUDA emulator (tests/cuda_emu) finds what it is there to find.
 * tests/sh/test_cuda_emu.sh runs the plugin's kernels on it and trusts a pass; this checks that
 * a pass means something: correct kernels give the right numbers (block reductions, the
 * shuffle variants with widths, atomics, dynamic shared memory), and broken ones fail the
 * way a GPU would fail, or more loudly: a barrier that part of the block skips, a shuffle
 * after some lanes exited, a block of 2048 threads, 64 KiB of shared memory without
 * cudaFuncSetAttribute, copies past an allocation, a double free, cuBLAS and cuBLASLt
 * calls with sizes that do not agree or pointers not aligned as promised; fresh device memory
 * reads as NaN, a write past an allocation faults, and so does host code reading device memory
 * (where the CPU has protection keys), and so does a read past a block's dynamic shared memory;
 * a read that misses its barrier gives a wrong result; ldmatrix gives the PTX ISA's fragments, and a
 * cp.async lands at its wait and is seen by other warps only after a barrier. Work is deferred as CUDA allows: a stream that does not
 * wait for another, or host code that does not wait for a copy, sees stale data.
 *
 * Launches are written as the Makefile rewrites them: k<<<g, b, s>>>(x) is
 * k << nemo_emu_cfg(g, b, s)(x).
 */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cublasLt.h>

#include "common.cuh"   /* kernels/cuda: nemo_cuda_fdiv, checked below on the host */

extern "C" int nemo_emu_device_protected(void);   /* emu.cc: 1 when device memory is closed to the host */

extern "C" {
#include "tap.h"
}

/* ==== kernels that are right ==== */

__global__ void block_sum(const float *x, float *out, int n) {
    __shared__ float part[8];
    float v = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0;
        for (int w = 0; w < 8; w++) s += part[w];
        atomicAdd(out, s);
    }
}

/* out[4 * lane + j]: xor 1, down 3 within 16, up 2, idx 5 within 8 */
__global__ void shuffles(int *out) {
    const int l = threadIdx.x;
    out[4 * l + 0] = __shfl_xor_sync(0xffffffffu, l, 1);
    out[4 * l + 1] = __shfl_down_sync(0xffffffffu, l, 3, 16);
    out[4 * l + 2] = __shfl_up_sync(0xffffffffu, l, 2);
    out[4 * l + 3] = __shfl_sync(0xffffffffu, l, 5, 8);
}

__global__ void reverse_smem(const int *x, int *y, int n) {
    int *buf = (int *)nemo_emu::dyn_smem();
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = buf[n - 1 - threadIdx.x];
}

__global__ void copy_k(const float *x, float *y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

/* ==== kernels that are wrong ==== */

__global__ void half_barrier(float *x) {
    if (threadIdx.x < 128) __syncthreads();   /* the other half never arrives */
    x[threadIdx.x] = 1;
}

__global__ void early_exit_shuffle(float *x) {
    if (threadIdx.x % 32 >= 16) return;       /* half of each warp leaves */
    x[threadIdx.x] = __shfl_down_sync(0xffffffffu, x[threadIdx.x], 1);
}

__global__ void nothing(float *x) { (void)x; }

/* y[t] = x[t + 1 (mod n)] through shared memory, without the barrier between the write and
 * the read */
__global__ void rotate_no_barrier(const int *x, int *y, int n) {
    __shared__ int buf[256];
    buf[threadIdx.x] = x[threadIdx.x];
    y[threadIdx.x] = buf[(threadIdx.x + 1) % n];
}

/* block b reads what block b - 1 wrote: blocks have no order on a GPU */
__global__ void chain_blocks(int *x) {
    if (threadIdx.x == 0) x[blockIdx.x + 1] = x[blockIdx.x] + 1;
}

__global__ void past_dyn_smem(float *out, int n) {
    float *buf = (float *)nemo_emu::dyn_smem();
    out[threadIdx.x] = buf[n + threadIdx.x];   /* n floats were asked for */
}

/* one warp: 32 rows of 8 16-bit values (row r, column c holds 8 r + c) in dynamic shared
 * memory, read back with ldmatrix.x4 (lane l names row l); out[4 l + i] = register i */
__global__ void ldsm_k(uint32_t *out, int trans, int offset) {
    uint16_t *s = (uint16_t *)nemo_emu::dyn_smem();
    for (int c = 0; c < 8; c++) s[8 * threadIdx.x + c] = (uint16_t)(8 * threadIdx.x + c);
    __syncthreads();
    uint32_t r[4];
    nemo_emu::ldmatrix(r, s + 8 * threadIdx.x + offset, trans);
    for (int i = 0; i < 4; i++) out[4 * threadIdx.x + i] = r[i];
}

/* two warps: thread t copies 16 bytes of x into chunk t of shared memory with cp.async, waits,
 * then reads chunk (t + shift) % 64, with or without a barrier in between */
__global__ void cp_async_k(const uint16_t *x, uint16_t *y, int shift, int barrier) {
    uint16_t *s = (uint16_t *)nemo_emu::dyn_smem();
    nemo_emu::cp_async(s + 8 * threadIdx.x, x + 8 * threadIdx.x, threadIdx.x % 2 ? 16 : 0);   /* odd: zeros */
    nemo_emu::cp_commit();
    nemo_emu::cp_wait(0);
    if (barrier) __syncthreads();
    for (int c = 0; c < 8; c++) y[8 * threadIdx.x + c] = s[8 * ((threadIdx.x + shift) % 64) + c];
}
/* reads its own chunk before waiting for it */
__global__ void cp_async_nowait(const uint16_t *x, uint16_t *y) {
    uint16_t *s = (uint16_t *)nemo_emu::dyn_smem();
    nemo_emu::cp_async(s + 8 * threadIdx.x, x + 8 * threadIdx.x, 16);
    nemo_emu::cp_commit();
    y[threadIdx.x] = s[8 * threadIdx.x];
    nemo_emu::cp_wait(0);
}

__global__ void fill_k(float *y, float v, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = v;
}

/* ==== helpers ==== */

static float *dev_floats(const float *h, int n) {
    float *d = NULL;
    cudaMalloc((void **)&d, sizeof(float) * (size_t)n);
    if (h) cudaMemcpy(d, h, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice);
    return d;
}

/* nemo_cuda_fdiv (the kernels' per-element index splits) against 64-bit division: divisors from
 * 1 to 2^31 - 2, dividends up to the 2^31 - 1 that the fast path allows (and its 64-bit
 * fallback beyond). */
/* nemo_cuda_arch_runs_on: which builds run on which GPUs (the plugin refuses the others) */
static void check_arch(void) {
    struct { const char *archs; int cc, runs; } c[] = {
        {"90", 90, 1}, {"90", 80, 0}, {"90", 86, 0}, {"90", 100, 1} /* the PTX of 90, compiled at load */,
        {"80", 86, 1} /* sm_80 code runs on 8.6 */, {"86", 80, 0}, {"80 90", 89, 1}, {"80 90", 75, 0},
        {"80 86 90", 120, 1}, {"89", 90, 1}, {"120", 90, 0}, {"", 90, 0},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        if (nemo_cuda_arch_runs_on(c[i].archs, c[i].cc) != c[i].runs) {
            bad++;
            printf("# CUDA_ARCH \"%s\" on compute capability %d: expected %d\n", c[i].archs, c[i].cc, c[i].runs);
        }
    TAP_OK(bad == 0, "a build for CUDA_ARCH runs on the same major version with no older minor, or newer GPUs through PTX "
           "(%d of 12 wrong)", bad);
}

static void check_fdiv(void) {
    const int64_t ds[] = {1, 2, 3, 7, 24, 64, 100, 3071, 3072, 4096, 12288, 65537, 1000003, 0x40000000, 0x7ffffffe};
    uint64_t z = 88172645463325252ull;
    long bad = 0, checked = 0;
    for (int64_t d : ds) {
        const nemo_cuda_fdiv f = nemo_cuda_fdiv_make(d, 0x7ffffffe);
        const nemo_cuda_fdiv slow = nemo_cuda_fdiv_make(d, (int64_t)1 << 40);
        for (int k = 0; k < 20000; k++) {
            z ^= z << 13; z ^= z >> 7; z ^= z << 17;
            int64_t n = k < 8 ? (int64_t[]){0, 1, d - 1, d, d + 1, 2 * d - 1, 0x7ffffffe, 0x7fffffff - d}[k]
                              : (int64_t)(z % 0x7fffffff);
            if (n < 0 || n > 0x7ffffffe) continue;
            checked++;
            if (nemo_cuda_fdiv_q(f, n) != n / d) bad++;
            const int64_t big = n * 1024 + (int64_t)(z % 1024);
            if (nemo_cuda_fdiv_q(slow, big) != big / d) bad++;
        }
        if (!f.fast || slow.fast) bad++;
    }
    TAP_OK(bad == 0, "nemo_cuda_fdiv: %ld dividends by 15 divisors equal 64-bit division (fast path below 2^31, "
           "64-bit beyond): %ld wrong", checked, bad);
}

int main(void) {
    check_fdiv();
    check_arch();
    setenv("NEMO_EMU_CUDA_DEVICES", "2", 1);
    int n = 0;
    TAP_OK(cudaGetDeviceCount(&n) == cudaSuccess && n == 2, "NEMO_EMU_CUDA_DEVICES=2 gives two devices");
    TAP_OK(cudaSetDevice(2) == cudaErrorInvalidDevice, "cudaSetDevice(2) of 2 devices is cudaErrorInvalidDevice");
    (void)cudaGetLastError();
    cudaSetDevice(0);

    /* ---- right kernels ---- */
    {
        const int N = 5000;
        float *h = (float *)malloc(sizeof(float) * N);
        double ref = 0;
        for (int i = 0; i < N; i++) { h[i] = (float)((i % 7) - 3) * 0.25f; ref += h[i]; }
        float *x = dev_floats(h, N), *out = dev_floats(NULL, 1), zero = 0, got = -1;
        cudaMemcpy(out, &zero, 4, cudaMemcpyHostToDevice);
        block_sum << nemo_emu_cfg(dim3(3), dim3(256))(x, out, N);
        TAP_OK(cudaGetLastError() == cudaSuccess, "block_sum launches (3 blocks of 256)");
        cudaMemcpy(&got, out, 4, cudaMemcpyDeviceToHost);
        TAP_OK(fabs(got - ref) < 1e-3, "block sum with shuffles, shared memory and atomicAdd: %g, expected %g", got, ref);
        cudaFree(x);
        cudaFree(out);
        free(h);
    }
    {
        int *d = NULL, h[128];
        cudaMalloc((void **)&d, sizeof h);
        shuffles << nemo_emu_cfg(dim3(1), dim3(32))(d);
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        int bad = 0;
        for (int l = 0; l < 32; l++) {
            const int xr = l ^ 1, dn = (l % 16) + 3 < 16 ? l + 3 : l, up = l >= 2 ? l - 2 : l, ix = l / 8 * 8 + 5;
            bad += h[4 * l] != xr || h[4 * l + 1] != dn || h[4 * l + 2] != up || h[4 * l + 3] != ix;
        }
        TAP_OK(bad == 0, "__shfl_xor / down (width 16) / up / idx (width 8) give CUDA's lanes (%d lanes wrong)", bad);
        cudaFree(d);
    }
    {
        int h[64], back[64], *x = NULL, *y = NULL;
        for (int i = 0; i < 64; i++) h[i] = i * 3;
        cudaMalloc((void **)&x, sizeof h);
        cudaMalloc((void **)&y, sizeof h);
        cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice);
        reverse_smem << nemo_emu_cfg(dim3(1), dim3(64), 64 * sizeof(int))(x, y, 64);
        cudaMemcpy(back, y, sizeof back, cudaMemcpyDeviceToHost);
        int bad = 0;
        for (int i = 0; i < 64; i++) bad += back[i] != h[63 - i];
        TAP_OK(cudaGetLastError() == cudaSuccess && bad == 0, "dynamic shared memory reverses 64 ints across a barrier");
        cudaFree(x);
        cudaFree(y);
    }

    /* ---- wrong kernels fail ---- */
    float *buf = dev_floats(NULL, 1024);
    half_barrier << nemo_emu_cfg(dim3(2), dim3(256))(buf);
    TAP_OK(cudaGetLastError() == cudaSuccess && cudaDeviceSynchronize() == cudaErrorLaunchFailure,
           "a barrier half of the block never reaches: launch failure, returned by the synchronize that ran it");
    (void)cudaGetLastError();
    early_exit_shuffle << nemo_emu_cfg(dim3(1), dim3(64))(buf);
    TAP_OK(cudaStreamSynchronize(0) == cudaErrorLaunchFailure, "a full-warp shuffle after half the lanes exited: launch failure");
    (void)cudaGetLastError();
    nothing << nemo_emu_cfg(dim3(1), dim3(2048))(buf);
    TAP_OK(cudaGetLastError() == cudaErrorInvalidConfiguration, "a block of 2048 threads: invalid configuration");
    nothing << nemo_emu_cfg(dim3(1), dim3(32), 65536)(buf);
    TAP_OK(cudaGetLastError() == cudaErrorInvalidConfiguration, "64 KiB of dynamic shared memory without cudaFuncSetAttribute");
    TAP_OK(cudaFuncSetAttribute(nothing, cudaFuncAttributeMaxDynamicSharedMemorySize, 65536) == cudaSuccess,
       "cudaFuncSetAttribute allows 64 KiB");
    nothing << nemo_emu_cfg(dim3(1), dim3(32), 65536)(buf);
    TAP_OK(cudaGetLastError() == cudaSuccess, "... and then the launch goes");
    nothing << nemo_emu_cfg(dim3(1, 70000), dim3(32))(buf);
    TAP_OK(cudaGetLastError() == cudaErrorInvalidConfiguration, "gridDim.y of 70000: invalid configuration");

    /* a missing barrier: the threads of a block run first to last in one launch and last to
     * first in the next, so the rotation is wrong in one of them */
    {
        int h[256], back[2][256], *x = NULL, *y = NULL;
        for (int i = 0; i < 256; i++) h[i] = i;
        cudaMalloc((void **)&x, sizeof h);
        cudaMalloc((void **)&y, sizeof h);
        cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice);
        for (int k = 0; k < 2; k++) {
            rotate_no_barrier << nemo_emu_cfg(dim3(1), dim3(256))(x, y, 256);
            cudaMemcpy(back[k], y, sizeof h, cudaMemcpyDeviceToHost);
        }
        int bad[2] = {0, 0};
        for (int k = 0; k < 2; k++)
            for (int i = 0; i < 256; i++) bad[k] += back[k][i] != (i + 1) % 256;
        TAP_OK((bad[0] > 0) != (bad[1] > 0), "a read of shared memory that misses its barrier is wrong in one of two "
               "launches (%d and %d of 256 wrong)", bad[0], bad[1]);
        cudaFree(x);
        cudaFree(y);
    }
    {
        int *x = NULL, zero = 0, got[2] = {0, 0};
        cudaMalloc((void **)&x, 9 * sizeof(int));
        for (int k = 0; k < 2; k++) {
            cudaMemcpy(x, &zero, sizeof zero, cudaMemcpyHostToDevice);
            cudaMemset(x + 1, 0xff, 8 * sizeof(int));
            chain_blocks << nemo_emu_cfg(dim3(8), dim3(32))(x);
            cudaMemcpy(&got[k], x + 8, sizeof(int), cudaMemcpyDeviceToHost);
        }
        TAP_OK((got[0] == 8) != (got[1] == 8), "a block that reads another block's output is wrong in one of two "
               "launches (blocks run last to first in every other one): %d, %d", got[0], got[1]);
        cudaFree(x);
    }
    /* ldmatrix: the registers of the PTX ISA's m8n8.x4 layout; a row outside the launch's
     * shared memory is a launch failure */
    {
        uint32_t *o = NULL, h[128];
        cudaMalloc((void **)&o, sizeof h);
        for (int trans = 0; trans < 2; trans++) {
            ldsm_k << nemo_emu_cfg(dim3(1), dim3(32), 512)(o, trans, 0);
            cudaMemcpy(h, o, sizeof h, cudaMemcpyDeviceToHost);
            int bad = 0;
            for (int l = 0; l < 32; l++)
                for (int i = 0; i < 4; i++) {
                    const int g = l / 4, t = l % 4;
                    /* matrix i is rows 8 i .. 8 i + 7; (row, col) holds 8 row + col */
                    const uint32_t lo = trans ? 8 * (8 * i + 2 * t) + g : 8 * (8 * i + g) + 2 * t;
                    const uint32_t hi = trans ? lo + 8 : lo + 1;
                    bad += h[4 * l + i] != (lo | hi << 16);
                }
            TAP_OK(cudaGetLastError() == cudaSuccess && bad == 0, "ldmatrix.x4%s gives the PTX ISA's fragments (%d wrong)",
                   trans ? ".trans" : "", bad);
        }
        ldsm_k << nemo_emu_cfg(dim3(1), dim3(32), 512)(o, 0, 8);   /* lane 31 names row 32: past the 512 bytes */
        TAP_OK(cudaDeviceSynchronize() == cudaErrorLaunchFailure, "ldmatrix of a row past the launch's shared memory: launch failure");
        ldsm_k << nemo_emu_cfg(dim3(1), dim3(32), 512)(o, 1, 4);   /* 8-byte aligned rows */
        TAP_OK(cudaDeviceSynchronize() == cudaErrorLaunchFailure, "ldmatrix of rows not 16-byte aligned: launch failure");
        cudaFree(o);
    }
    /* cp.async: lands at the wait, zeros for a source size of 0; another warp's copy needs the
     * barrier after the wait, and the thread's own copy needs the wait */
    {
        uint16_t hx[512], hy[512], *x = NULL, *y = NULL;
        for (int i = 0; i < 512; i++) hx[i] = (uint16_t)(i + 1);
        cudaMalloc((void **)&x, sizeof hx);
        cudaMalloc((void **)&y, sizeof hy);
        cudaMemcpy(x, hx, sizeof hx, cudaMemcpyHostToDevice);
        int bad[3] = {0, 0, 0};
        for (int k = 0; k < 3; k++) {   /* barrier twice (both thread orders), then without */
            cp_async_k << nemo_emu_cfg(dim3(1), dim3(64), 1024)(x, y, 32, k < 2);
            cudaMemcpy(hy, y, sizeof hy, cudaMemcpyDeviceToHost);
            for (int t = 0; t < 64; t++)
                for (int c = 0; c < 8; c++) {
                    const int src = (t + 32) % 64;
                    bad[k] += hy[8 * t + c] != (src % 2 ? hx[8 * src + c] : 0);
                }
        }
        TAP_OK(bad[0] == 0 && bad[1] == 0, "cp.async then wait_group and a barrier: every thread reads the other warp's "
               "bytes, zeros where the source size was 0 (%d, %d wrong)", bad[0], bad[1]);
        TAP_OK(bad[2] > 0, "cp.async without the barrier: another warp's bytes are missing (%d wrong)", bad[2]);
        cp_async_nowait << nemo_emu_cfg(dim3(1), dim3(64), 1024)(x, y);
        cudaMemcpy(hy, y, 64 * sizeof(uint16_t), cudaMemcpyDeviceToHost);
        int stale = 0;
        for (int t = 0; t < 64; t++) stale += hy[t] == 0xffff;
        TAP_OK(stale == 64, "cp.async read before its wait_group: NaN bytes (%d of 64)", stale);
        cp_async_k << nemo_emu_cfg(dim3(1), dim3(64), 512)(x, y, 0, 1);   /* 1024 bytes into 512 */
        TAP_OK(cudaDeviceSynchronize() == cudaErrorLaunchFailure, "cp.async past the launch's shared memory: launch failure");
        cudaFree(x);
        cudaFree(y);
    }
    {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            float *o = dev_floats(NULL, 64);
            past_dyn_smem << nemo_emu_cfg(dim3(1), dim3(64), 64 * sizeof(float))(o, 64);
            cudaDeviceSynchronize();
            _exit(0);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        TAP_OK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "a read past the dynamic shared memory a launch asked for faults");
    }

    /* streams belong to a device */
    {
        cudaStream_t s1 = NULL;
        cudaSetDevice(1);
        cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking);
        cudaSetDevice(0);
        nothing << nemo_emu_cfg(dim3(1), dim3(32), 0, s1)(buf);
        TAP_OK(cudaGetLastError() == cudaErrorInvalidResourceHandle, "a launch on device 1's stream while device 0 is current fails");
        cudaStreamDestroy(s1);
    }

    /* ---- memory ---- */
    {
        float *f = dev_floats(NULL, 16), h[16];
        cudaMemcpy(h, f, sizeof h, cudaMemcpyDeviceToHost);
        int nans = 0;
        for (int i = 0; i < 16; i++) nans += isnan(h[i]);
        TAP_OK(nans == 16, "fresh device memory reads as NaN (%d of 16)", nans);
        TAP_OK(cudaMemcpy(f, h, sizeof h + 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
           "a copy 4 bytes past the end of an allocation is refused");
        (void)cudaGetLastError();
        TAP_OK(cudaMemcpy(h, f, sizeof h, cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
           "a copy whose kind says host to device but whose destination is host memory is refused");
        (void)cudaGetLastError();
        TAP_OK(cudaMemset(f + 8, 0, 33 * sizeof(float)) == cudaErrorInvalidValue, "a memset past the end is refused");
        (void)cudaGetLastError();
        TAP_OK(cudaFree(f) == cudaSuccess && cudaFree(f) == cudaErrorInvalidDevicePointer, "a second cudaFree is refused");
        (void)cudaGetLastError();
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            float *g = dev_floats(NULL, 1000);
            copy_k << nemo_emu_cfg(dim3(8), dim3(256))(g, g + 1000 + 1024, 2048);   /* writes ~1 page past the end */
            cudaDeviceSynchronize();
            _exit(0);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        TAP_OK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "a kernel writing a page past its allocation faults");
        if (nemo_emu_device_protected()) {
            fflush(stdout);
            pid = fork();
            if (pid == 0) {
                float *g = dev_floats(NULL, 16);
                volatile float v = g[3];   /* host code reading device memory */
                (void)v;
                _exit(0);
            }
            waitpid(pid, &st, 0);
            TAP_OK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "host code reading device memory faults (protection keys)");
            float *g = dev_floats(NULL, 16), h[16];
            TAP_OK(cudaMemcpy(h, g, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess && isnan(h[0]),
                   "... while copies still reach it");
            cudaFree(g);
        } else {
            printf("ok %d - host reads of device memory fault # SKIP no memory protection keys (PKU) here\n", ++tap_n);
            printf("ok %d - ... while copies still reach it # SKIP no PKU\n", ++tap_n);
        }
    }

    /* ---- cuBLAS / cuBLASLt argument checks ---- */
    {
        cublasHandle_t h = NULL;
        cublasCreate(&h);
        float *a = dev_floats(NULL, 64), *b = dev_floats(NULL, 64), *c = dev_floats(NULL, 64), one = 1, zero = 0;
        TAP_OK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, &one, a, CUDA_R_32F, 4, b, CUDA_R_32F, 8, &zero, c,
                        CUDA_R_32F, 8, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE,
           "cublasGemmEx with lda 4 < m 8: CUBLAS_STATUS_INVALID_VALUE");
        TAP_OK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 9, &one, a, CUDA_R_32F, 8, b, CUDA_R_32F, 9, &zero, c,
                        CUDA_R_32F, 8, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_EXECUTION_FAILED,
           "cublasGemmEx reading past an allocation (k 9 of 8): execution failed");
        /* a known product: A = 2 I (8 x 8), B = ones -> C = 2 everywhere; C not read with beta 0 */
        float ha[64], hb[64], hc[64];
        for (int i = 0; i < 64; i++) { ha[i] = i % 9 == 0 ? 2.0f : 0.0f; hb[i] = 1; }
        cudaMemcpy(a, ha, sizeof ha, cudaMemcpyHostToDevice);
        cudaMemcpy(b, hb, sizeof hb, cudaMemcpyHostToDevice);
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, 8, 8, 8, &one, a, CUDA_R_32F, 8, b, CUDA_R_32F, 8, &zero, c, CUDA_R_32F,
                     8, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        cudaMemcpy(hc, c, sizeof hc, cudaMemcpyDeviceToHost);
        int bad = 0;
        for (int i = 0; i < 64; i++) bad += hc[i] != 2.0f;
        TAP_OK(bad == 0, "cublasGemmEx: 2 I x ones = 2 with beta 0 over NaN-filled C (%d wrong)", bad);

        cublasLtHandle_t lt = NULL;
        cublasLtCreate(&lt);
        cublasLtMatmulDesc_t d = NULL;
        cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F);
        cublasLtMatrixLayout_t la, lb, lc;
        cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, 8, 4, 8);   /* A 8 x 4 */
        cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, 8, 8, 8);   /* B 8 x 8: k disagrees */
        cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, 8, 8, 8);
        cublasLtMatmulPreference_t p = NULL;
        cublasLtMatmulPreferenceCreate(&p);
        cublasLtMatmulHeuristicResult_t res;
        int nres = 0;
        TAP_OK(cublasLtMatmulAlgoGetHeuristic(lt, d, la, lb, lc, lc, p, 1, &res, &nres) == CUBLAS_STATUS_INVALID_VALUE,
           "cuBLASLt: op(A) 8 x 4 times op(B) 8 x 8 is refused");
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, 8, 8, 8);
        TAP_OK(cublasLtMatmulAlgoGetHeuristic(lt, d, la, lb, lc, lc, p, 1, &res, &nres) == CUBLAS_STATUS_SUCCESS && nres == 1,
           "cuBLASLt: an 8 x 8 x 8 product gets an algorithm (256-byte alignment by default)");
        TAP_OK(cublasLtMatmul(lt, d, &one, a + 1, la, b, lb, &zero, c, lc, c, lc, &res.algo, NULL, 0, 0) ==
               CUBLAS_STATUS_EXECUTION_FAILED,
           "cuBLASLt: A 4 bytes off the alignment the algorithm was chosen for fails");
        TAP_OK(cublasLtMatmul(lt, d, &one, a, la, b, lb, &zero, c, lc, c, lc, &res.algo, NULL, 0, 0) == CUBLAS_STATUS_SUCCESS,
           "cuBLASLt: the aligned product runs");
        cublasLtMatmulPreferenceDestroy(p);
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(d);
        cublasLtDestroy(lt);
        cublasDestroy(h);
        cudaFree(a);
        cudaFree(b);
        cudaFree(c);
    }
    cudaFree(buf);

    /* ---- deferred execution: work runs when the host must see it, other streams stay queued ---- */
    {
        const int N = 256;
        cudaStream_t s1, s2, blk;
        cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking);
        cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking);
        cudaStreamCreate(&blk);
        float *x = dev_floats(NULL, N), *y = dev_floats(NULL, N), h[256];
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(x, 1.0f, N);
        copy_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s2)(x, y, N);
        cudaStreamSynchronize(s2);
        cudaMemcpy(h, y, sizeof h, cudaMemcpyDeviceToHost);
        TAP_OK(isnan(h[0]) && isnan(h[N - 1]), "a stream that reads without waiting for another's write sees the old bytes (NaN)");
        cudaEvent_t ev;
        cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(x, 2.0f, N);
        cudaEventRecord(ev, s1);
        TAP_OK(cudaEventQuery(ev) == cudaErrorNotReady && cudaStreamQuery(s1) == cudaErrorNotReady,
               "queued work: cudaEventQuery and cudaStreamQuery answer cudaErrorNotReady");
        cudaStreamWaitEvent(s2, ev, 0);
        copy_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s2)(x, y, N);
        cudaStreamSynchronize(s2);
        cudaMemcpy(h, y, sizeof h, cudaMemcpyDeviceToHost);
        TAP_OK(h[0] == 2.0f && h[N - 1] == 2.0f, "after cudaStreamWaitEvent it sees the write (%g)", h[0]);
        TAP_OK(cudaEventQuery(ev) == cudaSuccess, "... and the event is complete");
        int polls = 0;
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(x, 3.0f, N);
        while (cudaStreamQuery(s1) == cudaErrorNotReady && polls < 1000) polls++;
        TAP_OK(polls > 0 && polls < 100, "a loop polling cudaStreamQuery ends (%d polls)", polls);

        /* the legacy stream waits for blocking streams, not for non-blocking ones */
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, blk)(x, 4.0f, N);
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(y, 5.0f, N);
        float hx = 0, hy = 0;
        cudaMemcpy(&hx, x, 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(&hy, y, 4, cudaMemcpyDeviceToHost);
        TAP_OK(hx == 4.0f && hy == 2.0f, "cudaMemcpy on the legacy stream waits for a blocking stream (%g), not for a "
               "non-blocking one (%g)", hx, hy);
        cudaStreamSynchronize(s1);

        /* copies against the host */
        float *pin = NULL, src[256];
        cudaMallocHost((void **)&pin, sizeof h);
        for (int i = 0; i < N; i++) { pin[i] = -1; src[i] = 7; }
        cudaMemcpyAsync(pin, y, sizeof h, cudaMemcpyDeviceToHost, s1);
        TAP_OK(pin[0] == -1, "an async copy into pinned memory has not landed before its stream is synchronized");
        cudaStreamSynchronize(s1);
        TAP_OK(pin[0] == 5.0f, "... and has after (%g)", pin[0]);
        cudaMemcpyAsync(x, src, sizeof src, cudaMemcpyHostToDevice, s1);
        src[0] = 8;
        for (int i = 0; i < N; i++) pin[i] = 9;
        cudaMemcpyAsync(y, pin, sizeof h, cudaMemcpyHostToDevice, s1);
        pin[0] = 10;
        cudaMemcpyAsync(&hx, x, 4, cudaMemcpyDeviceToHost, s1);
        TAP_OK(hx == 7.0f, "an async copy from pageable memory takes the source at the call; one into pageable "
               "memory returns with the data (%g)", hx);
        cudaMemcpyAsync(&hy, y, 4, cudaMemcpyDeviceToHost, s1);
        TAP_OK(hy == 10.0f, "an async copy from pinned memory reads it when it runs: a change made after the call "
               "shows (%g)", hy);

        /* cudaDeviceSynchronize runs the newest stream first: a write on s2 to memory that s1
         * still reads lands before s1's read */
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(y, 11.0f, N);
        cudaStreamSynchronize(s1);
        copy_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(y, x, N);   /* s1 reads y */
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s2)(y, 12.0f, N);   /* s2 overwrites it without waiting */
        cudaDeviceSynchronize();
        cudaMemcpy(&hx, x, 4, cudaMemcpyDeviceToHost);
        TAP_OK(hx == 12.0f, "cudaDeviceSynchronize drains the newest stream first: an unordered overwrite wins (%g)", hx);

        /* cudaFree lets queued work finish */
        float *z = dev_floats(NULL, N);
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(z, 13.0f, N);
        copy_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(z, x, N);
        TAP_OK(cudaFree(z) == cudaSuccess, "cudaFree of memory that queued kernels use runs them first");
        cudaMemcpy(&hx, x, 4, cudaMemcpyDeviceToHost);
        TAP_OK(hx == 13.0f, "... which finished before it was unmapped (%g)", hx);

        /* timing events: elapsed time needs both complete */
        cudaEvent_t t0, t1;
        cudaEventCreate(&t0);
        cudaEventCreate(&t1);
        cudaEventRecord(t0, s1);
        fill_k << nemo_emu_cfg(dim3(1), dim3(N), 0, s1)(x, 1.0f, N);
        cudaEventRecord(t1, s1);
        float ms = -1;
        TAP_OK(cudaEventElapsedTime(&ms, t0, t1) == cudaErrorNotReady, "cudaEventElapsedTime of queued events: not ready");
        (void)cudaGetLastError();
        cudaEventSynchronize(t1);
        TAP_OK(cudaEventElapsedTime(&ms, t0, t1) == cudaSuccess && ms >= 0, "... and a time once synchronized (%g ms)", ms);
        cudaEventDestroy(t0);
        cudaEventDestroy(t1);
        cudaEventDestroy(ev);
        cudaFreeHost(pin);
        cudaFree(x);
        cudaFree(y);
        cudaStreamDestroy(s1);
        cudaStreamDestroy(s2);
        cudaStreamDestroy(blk);
    }
    return TAP_DONE();
}
