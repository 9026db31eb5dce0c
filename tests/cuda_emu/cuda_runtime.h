/*
 * tests/cuda_emu/cuda_runtime.h: the part of the CUDA runtime that kernels/cuda uses, for the
 * CUDA emulator (tests/cuda_emu/emu.cc). The plugin's sources compile unchanged with g++
 * against these headers (after `<<<` / `>>>` become `<< nemo_emu_cfg(` / `)`, see the Makefile)
 * into build/libnemo_cuda_emu.so, which libnemo loads as its CUDA plugin (NEMO_CUDA_LIB), so
 * every CUDA kernel, launcher and cuBLAS call runs on the CPU and can be checked against the
 * CPU kernels without a GPU.
 *
 * Device side: __global__ functions are plain functions; a launch runs each block's threads as
 * fibers, blocks one after the other: each warp runs ahead to its next __syncthreads, its lanes
 * in lockstep at every warp collective (__shfl_*_sync, the flash kernels' mma and ldmatrix);
 * a cp.async lands at its thread's wait_group. `__shared__` variables are static (one block runs
 * at a time); threadIdx / blockIdx / blockDim / gridDim name the running fiber's values.
 *
 * Host side: work is queued per stream and runs only when the host must see it (a
 * synchronize, a copy to pageable memory, a free), with other streams' work left queued as
 * long as CUDA allows (emu.cc, "deferred execution").
 *
 * What this catches: wrong indexing and launch geometry (the block and shared-memory limits
 * of an sm_90 device are checked), reductions that depend on lanes that did not take part,
 * divergent barriers and shuffles (a launch failure naming the kernel), reads that miss a
 * barrier (threads run in a different order every other block and launch), accesses past the
 * dynamic shared memory (a fault), reads of device
 * memory nobody wrote (cudaMalloc fills with NaN bytes), writes far past an allocation (guard
 * pages), wrong cuBLAS / cuBLASLt arguments (dimensions checked as the libraries document),
 * missing synchronization between streams and with the host (work runs late, so a reader
 * that does not wait sees what was there before).
 * What it cannot: timing, two streams' kernels interleaving (queued work runs one op at a
 * time), PTX.
 */
#ifndef NEMO_CUDA_EMU_RUNTIME_H
#define NEMO_CUDA_EMU_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NEMO_CUDA_EMU 1

/* ==== host API ==== */

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef struct nemo_emu_stream *cudaStream_t;
typedef struct nemo_emu_event *cudaEvent_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int device;
    void *devicePointer;
    void *hostPointer;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01

struct uint3 { unsigned x, y, z; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaRuntimeGetVersion(int *v);
/* The compute capability: 9.0, or NEMO_EMU_CUDA_CC (e.g. 80) to test the plugin's check */
cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int dev);
cudaError_t cudaDriverGetVersion(int *v);
/* The fields of cudaDeviceProp the plugin reads (name "CUDA emulator", 1 GiB a device,
 * compute capability as cudaDeviceGetAttribute, 132 multiprocessors as an H100/H200 SXM). */
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int major, minor;
    int multiProcessorCount;
};
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaMalloc(void **p, size_t n);
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc((void **)p, n); }
cudaError_t cudaFree(void *p);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t st = 0);
cudaError_t cudaMemset(void *p, int value, size_t n);
cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t st = 0);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *at, const void *p);
cudaError_t cudaStreamCreate(cudaStream_t *st);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *st, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t st);
cudaError_t cudaStreamSynchronize(cudaStream_t st);
cudaError_t cudaStreamQuery(cudaStream_t st);
cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t ev, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t *ev);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *ev, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t ev);
cudaError_t cudaEventRecord(cudaEvent_t ev, cudaStream_t st = 0);
cudaError_t cudaEventQuery(cudaEvent_t ev);
cudaError_t cudaEventSynchronize(cudaEvent_t ev);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t nemo_emu_func_set_attribute(const void *fn, enum cudaFuncAttribute attr, int value);
template <class F> static inline cudaError_t cudaFuncSetAttribute(F *fn, enum cudaFuncAttribute attr, int value) {
    return nemo_emu_func_set_attribute((const void *)fn, attr, value);
}

/* ==== device side ==== */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace nemo_emu {
extern uint3 tid, bid;
extern dim3 bdim, gdim;
void syncthreads();
/* A warp shuffle of 8 bytes: kind 0 = idx, 1 = up, 2 = down, 3 = xor (see emu.cc). */
uint64_t shfl(unsigned mask, uint64_t bits, int kind, int arg, int width);
/* One warp's mma.sync m16n8k16 (e: 0 bf16, 1 f16), float32 accumulators. */
void mma(int e, float d[4], const uint32_t a[4], const uint32_t b[2]);
/* One warp's ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (warp_mma.h): row is this lane's
 * row address in the launch's dynamic shared memory. */
void ldmatrix(uint32_t r[4], const uint16_t *row, int trans);
/* This thread's cp.async.cg of 16 bytes (n of them read from src, zeros after), commit_group
 * and wait_group n: the bytes land at the wait (warp_mma.h). */
void cp_async(void *dst, const void *src, int n);
void cp_commit();
void cp_wait(int n);
/* The launch's dynamic shared memory. */
char *dyn_smem();
}
#define threadIdx (nemo_emu::tid)
#define blockIdx (nemo_emu::bid)
#define blockDim (nemo_emu::bdim)
#define gridDim (nemo_emu::gdim)
#define warpSize 32

static inline void __syncthreads() { nemo_emu::syncthreads(); }
template <class T> static inline uint64_t nemo_emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    return u;
}
template <class T> static inline T nemo_emu_from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}
template <class T> static inline T __shfl_sync(unsigned m, T v, int src, int w = 32) {
    return nemo_emu_from_bits<T>(nemo_emu::shfl(m, nemo_emu_bits(v), 0, src, w));
}
template <class T> static inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
    return nemo_emu_from_bits<T>(nemo_emu::shfl(m, nemo_emu_bits(v), 1, (int)d, w));
}
template <class T> static inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
    return nemo_emu_from_bits<T>(nemo_emu::shfl(m, nemo_emu_bits(v), 2, (int)d, w));
}
template <class T> static inline T __shfl_xor_sync(unsigned m, T v, int x, int w = 32) {
    return nemo_emu_from_bits<T>(nemo_emu::shfl(m, nemo_emu_bits(v), 3, x, w));
}

/* IEEE-rounded arithmetic: the emulator is compiled with -ffp-contract=off. */
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

/* Atomics: fibers never run at the same time, so plain updates are atomic. */
template <class T> static inline T atomicAdd(T *p, T v) { T o = *p; *p = o + v; return o; }
template <class T> static inline T atomicMin(T *p, T v) { T o = *p; if (v < o) *p = v; return o; }
template <class T> static inline T atomicMax(T *p, T v) { T o = *p; if (v > o) *p = v; return o; }
template <class T> static inline T atomicExch(T *p, T v) { T o = *p; *p = v; return o; }
template <class T> static inline T atomicCAS(T *p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

/* ==== launches: `k<<<g, b, s, st>>>(args)` is rewritten to `k << nemo_emu_cfg(g, b, s, st)(args)` ==== */

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace nemo_emu {
/* Checks a launch and queues it on st: body(ctx) will run for every thread of the grid, then
 * drop(ctx). Returns the launch's status (also kept for cudaGetLastError); a failure while it
 * runs is returned by the call that made it run (a synchronize, say). fn names the kernel. */
cudaError_t launch(const void *fn, dim3 g, dim3 b, size_t smem, cudaStream_t st, void (*body)(void *),
                   void (*drop)(void *), void *ctx);
/* Prints what the emulator found wrong on stderr ("cuda emulator: ..."). */
void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Queues other emulated device work (cub's sort) on st, run with device memory open. */
cudaError_t enqueue(cudaStream_t st, const char *what, std::function<cudaError_t()> work);
/* A launch argument as captured: converts to the kernel's parameter type at the call, as nvcc
 * converts launch arguments (NULL, an integer, becomes a null pointer). */
template <class A> struct arg {
    A v;
    template <class P> operator P() const {
        if constexpr (std::is_convertible<const A &, P>::value) return (P)v;
        else {
            static_assert(std::is_pointer<P>::value && std::is_integral<A>::value, "launch argument type");
            return (P)(intptr_t)v;
        }
    }
};
template <class... A> struct pending {
    dim3 g, b;
    size_t smem;
    cudaStream_t st;
    std::tuple<arg<A>...> args;
};
template <class F, class Tup> struct call_ctx {
    F *fn;
    Tup args;   /* captured by value at the launch, as CUDA copies kernel parameters */
    static void run(void *p) {
        call_ctx *c = (call_ctx *)p;
        std::apply(*c->fn, c->args);
    }
    static void drop(void *p) { delete (call_ctx *)p; }
};
}
struct nemo_emu_cfg {
    dim3 g, b;
    size_t smem;
    cudaStream_t st;
    nemo_emu_cfg(dim3 g_, dim3 b_, size_t s = 0, cudaStream_t t = 0) : g(g_), b(b_), smem(s), st(t) {}
    template <class... A> nemo_emu::pending<A...> operator()(A... a) const {
        return nemo_emu::pending<A...>{g, b, smem, st, std::tuple<nemo_emu::arg<A>...>(nemo_emu::arg<A>{a}...)};
    }
};
template <class... P, class... A> static inline void operator<<(void (*fn)(P...), nemo_emu::pending<A...> p) {
    typedef void F(P...);
    typedef std::tuple<nemo_emu::arg<A>...> Tup;
    typedef nemo_emu::call_ctx<F, Tup> Ctx;
    nemo_emu::launch((const void *)fn, p.g, p.b, p.smem, p.st, &Ctx::run, &Ctx::drop, new Ctx{fn, std::move(p.args)});
}

#endif
