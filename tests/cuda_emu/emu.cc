/*
 * tests/cuda_emu/emu.cc: a CUDA device emulated on the CPU, for running kernels/cuda unchanged
 * (see cuda_runtime.h for what it is for, what it catches and what it cannot).
 *
 * - Devices: NEMO_EMU_CUDA_DEVICES of them (default 1), NEMO_EMU_CUDA_MEM bytes each (default
 *   8 GiB); the limits of an sm_90 device for launches (1024 threads a block, 227 KiB of
 *   dynamic shared memory after cudaFuncSetAttribute, 48 KiB without).
 * - Memory: each cudaMalloc is its own mapping, filled with 0xff bytes (NaN in every float
 *   type) and placed between 64 MiB guard regions, so a read of memory nobody wrote shows up as
 *   NaN and an access past either end faults. Copies and memsets must stay inside one allocation and
 *   name the right direction. Device memory is closed to the host: its pages carry a memory
 *   protection key (x86 PKU) whose access is opened only while emulated device work runs (a
 *   launch, a copy, a memset, a cuBLAS call: `device_open` below), so host code that reads or
 *   writes device memory by mistake faults with a message naming the allocation, as it would
 *   on a GPU. Without PKU (pkey_alloc fails) memory stays open.
 * - Execution: deferred, per stream, until the host must see the result (see "deferred
 *   execution" below). A launch runs its blocks one after the other (dynamic shared memory
 *   ends at an inaccessible page; every other block and launch runs its threads last to
 *   first, so a read that misses a barrier is wrong in one of the two orders; odd launches
 *   run their blocks last to first, so a block that reads another's output is caught too); a
 *   block's threads are fibers, and each warp in turn runs until its lanes reach
 *   __syncthreads or their end, carrying out a warp collective (shuffle, mma, ldmatrix) when all
 *   32 lanes of the warp reached one; a barrier is passed when every thread of the block
 *   reached it. A cp.async lands at its thread's wait_group (warp_mma.h). Anything else (a barrier some threads skip or exit before, a
 *   shuffle with lanes missing) is a launch failure naming the kernel.
 * - cuBLAS / cuBLASLt: the products their documentation defines, with their argument checks.
 */
#include <cxxabi.h>
#include <signal.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <stdarg.h>
#include <ucontext.h>
#include <unistd.h>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <vector>
#include <mutex>
#include <set>
#include <string>

#include <cblas.h>

#include "cublasLt.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "warp_mma.h"

#define EXPORT __attribute__((visibility("default")))
#if defined(__x86_64__)
#define FAST_SWITCH 1   /* see nemo_emu_switch */
#endif

/* ==== devices, errors ==== */

static int n_devices = -1, cur_dev = 0;
/* NEMO_EMU_CUDA_NOEXEC=1: launches, cuBLAS products, memsets, sorts and device-to-device copies
 * are checked and queued but do nothing, and fresh memory is not filled: what is left is the
 * host's own cost of issuing a step's work (bench/gpu_block.lua on it measures that), at any
 * size that fits the address space. Copies to and from the host still run. The numbers
 * computed are garbage. */
static int noexec = -1;
/* NEMO_EMU_CUDA_LOG=FILE: every launch and copy in order (kernel, grid, block; copy kind and
 * bytes), for profiling what a step issues. */
static FILE *launch_log(void) {
    static FILE *log = NULL;
    static int done;
    if (!done) {
        done = 1;
        const char *f = getenv("NEMO_EMU_CUDA_LOG");
        if (f && *f) log = fopen(f, "w");
    }
    return log;
}
static bool no_exec(void) {
    if (noexec < 0) {
        const char *e = getenv("NEMO_EMU_CUDA_NOEXEC");
        noexec = e && strcmp(e, "1") == 0;
    }
    return noexec;
}
static size_t dev_capacity;
static size_t dev_used[64];
static cudaError_t last_error = cudaSuccess;

static void init(void) {
    if (n_devices >= 0) return;
    const char *e = getenv("NEMO_EMU_CUDA_DEVICES");
    n_devices = e && *e ? atoi(e) : 1;
    if (n_devices < 0) n_devices = 0;
    if (n_devices > 64) n_devices = 64;
    const char *m = getenv("NEMO_EMU_CUDA_MEM");
    dev_capacity = m && *m ? (size_t)strtoull(m, NULL, 10) : ((size_t)8 << 30);
}
static cudaError_t fail(cudaError_t e) {
    last_error = e;
    return e;
}
/* Prints what the emulator found wrong (the CUDA status alone would not say). */
namespace nemo_emu {
void report(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cuda emulator: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
}
using nemo_emu::report;

EXPORT const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}
EXPORT const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}
EXPORT cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
EXPORT cudaError_t cudaPeekAtLastError(void) { return last_error; }
EXPORT cudaError_t cudaGetDeviceCount(int *n) {
    init();
    *n = n_devices;
    return n_devices ? cudaSuccess : fail(cudaErrorNoDevice);
}
EXPORT cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
EXPORT cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int dev) {
    init();
    if (dev < 0 || dev >= n_devices) return fail(cudaErrorInvalidDevice);
    const char *e = getenv("NEMO_EMU_CUDA_CC");
    const int cc = e && atoi(e) > 0 ? atoi(e) : 90;
    if (attr == cudaDevAttrComputeCapabilityMajor) *value = cc / 10;
    else if (attr == cudaDevAttrComputeCapabilityMinor) *value = cc % 10;
    else return fail(cudaErrorInvalidValue);
    return cudaSuccess;
}
EXPORT cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
EXPORT cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int dev) {
    init();
    if (dev < 0 || dev >= n_devices) return fail(cudaErrorInvalidDevice);
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "CUDA emulator");
    prop->totalGlobalMem = (size_t)1 << 30;
    int cc = 0;
    cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev);
    prop->major = cc;
    cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMinor, dev);
    prop->minor = cc;
    prop->multiProcessorCount = 132;
    return cudaSuccess;
}
EXPORT cudaError_t cudaSetDevice(int dev) {
    init();
    if (dev < 0 || dev >= n_devices) return fail(cudaErrorInvalidDevice);
    cur_dev = dev;
    return cudaSuccess;
}
EXPORT cudaError_t cudaGetDevice(int *dev) { init(); *dev = cur_dev; return cudaSuccess; }

/* ==== memory ==== */

struct alloc {
    size_t n;          /* bytes asked for */
    int dev;           /* -1: pinned host memory */
    char *map;         /* the mapping (guard pages included) */
    size_t map_len;
};
static std::map<uintptr_t, alloc> allocs;   /* by start address */
static std::mutex alloc_lock;

static size_t page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

/* ---- device memory closed to the host (protection keys) ---- */

static int pkey = -2;        /* -2: not tried yet, -1: unavailable */
static int open_depth;

static void on_segv(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    char msg[256];
    int n;
    if (si->si_code == SEGV_PKUERR)
        n = snprintf(msg, sizeof msg, "cuda emulator: host code touched device memory at %p (device memory is only "
                     "reachable through kernels, copies and cuBLAS)\n", si->si_addr);
    else
        n = snprintf(msg, sizeof msg, "cuda emulator: segmentation fault at %p (a guard region: an access past a "
                     "device allocation, or past a block's dynamic shared memory?)\n", si->si_addr);
    if (n > 0) { ssize_t w = write(2, msg, (size_t)n); (void)w; }
    signal(sig, SIG_DFL);   /* the faulting access runs again and ends the process */
}
static void pkey_init(void) {
    if (pkey != -2) return;
    pkey = -1;
    const char *e = getenv("NEMO_EMU_CUDA_PKEY");
    if (e && strcmp(e, "0") == 0) return;
    int k = pkey_alloc(0, PKEY_DISABLE_ACCESS);
    if (k < 0) return;
    pkey = k;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
}
/* Device work starts (open) and ends (close); nests. */
static void device_open(void) {
    if (open_depth++ == 0 && pkey >= 0) pkey_set(pkey, 0);
}
static void device_close(void) {
    if (--open_depth == 0 && pkey >= 0) pkey_set(pkey, PKEY_DISABLE_ACCESS);
}
extern "C" EXPORT int nemo_emu_device_protected(void) { pkey_init(); return pkey >= 0; }

static cudaError_t map_alloc(void **p, size_t n, int dev) {
    *p = NULL;
    if (n == 0) return cudaSuccess;
    /* guard regions of 64 MiB on both sides (address space only): an index that runs off an
     * allocation faults instead of landing in some other mapping (a LuaJIT heap, say) */
    const size_t pg = page_size(), guard = (size_t)64 << 20;
    const size_t body = (n + 255) & ~(size_t)255, rw = (body + pg - 1) / pg * pg;
    const size_t len = rw + 2 * guard;
    char *m = (char *)mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation);
    if (mprotect(m + guard, rw, PROT_READ | PROT_WRITE) != 0) { munmap(m, len); return fail(cudaErrorMemoryAllocation); }
    char *q = m + guard + rw - body;   /* 256-byte aligned: rw and body are multiples of 256 */
    if (!no_exec()) memset(q, 0xff, body);
    if (dev >= 0) {
        pkey_init();
        if (pkey >= 0) pkey_mprotect(m + guard, rw, PROT_READ | PROT_WRITE, pkey);
    }
    std::lock_guard<std::mutex> g(alloc_lock);
    allocs[(uintptr_t)q] = alloc{n, dev, m, len};
    *p = q;
    return cudaSuccess;
}
/* The allocation holding [p, p + n), or NULL. */
static const alloc *find(const void *p, size_t n, uintptr_t *base = NULL) {
    std::lock_guard<std::mutex> g(alloc_lock);
    auto it = allocs.upper_bound((uintptr_t)p);
    if (it == allocs.begin()) return NULL;
    --it;
    const uintptr_t a = (uintptr_t)p;
    if (a < it->first || a + n > it->first + it->second.n + (n == 0 ? 1 : 0)) return NULL;
    if (base) *base = it->first;
    return &it->second;
}
static bool is_device(const void *p, size_t n) {
    const alloc *a = find(p, n);
    return a && a->dev >= 0;
}

EXPORT cudaError_t cudaMalloc(void **p, size_t n) {
    init();
    if (!p) return fail(cudaErrorInvalidValue);
    if (n_devices == 0) return fail(cudaErrorNoDevice);
    if (n > dev_capacity || dev_used[cur_dev] > dev_capacity - n) { *p = NULL; return fail(cudaErrorMemoryAllocation); }
    cudaError_t e = map_alloc(p, n, cur_dev);
    if (e == cudaSuccess) dev_used[cur_dev] += n;
    return e;
}
static cudaError_t drain(int dev);
/* cudaFree and cudaFreeHost synchronize: the owner's device (pinned memory: every device)
 * finishes its queued work first. */
static cudaError_t free_map(void *p, bool host) {
    if (!p) return cudaSuccess;
    {
        const alloc *a = find(p, 0);
        cudaError_t e = drain(a && a->dev >= 0 ? a->dev : -1);
        if (e != cudaSuccess) return e;
    }
    alloc a;
    {
        std::lock_guard<std::mutex> g(alloc_lock);
        auto it = allocs.find((uintptr_t)p);
        if (it == allocs.end() || (it->second.dev < 0) != host) {
            report("%s(%p): not the start of a live %s allocation", host ? "cudaFreeHost" : "cudaFree", p,
                   host ? "pinned host" : "device");
            return fail(cudaErrorInvalidDevicePointer);
        }
        a = it->second;
        allocs.erase(it);
    }
    if (a.dev >= 0) dev_used[a.dev] -= a.n;
    munmap(a.map, a.map_len);
    return cudaSuccess;
}
EXPORT cudaError_t cudaFree(void *p) { return free_map(p, false); }
EXPORT cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags) {
    (void)flags;
    if (!p) return fail(cudaErrorInvalidValue);
    return map_alloc(p, n ? n : 1, -1);
}
EXPORT cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }
EXPORT cudaError_t cudaFreeHost(void *p) { return free_map(p, true); }
EXPORT cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    init();
    *total_bytes = dev_capacity;
    *free_bytes = dev_capacity - dev_used[cur_dev];
    return cudaSuccess;
}
EXPORT cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *at, const void *p) {
    if (!at) return fail(cudaErrorInvalidValue);
    memset(at, 0, sizeof *at);
    const alloc *a = find(p, 0);
    if (!a) { at->type = cudaMemoryTypeUnregistered; at->device = -2; return cudaSuccess; }
    at->type = a->dev >= 0 ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
    at->device = a->dev >= 0 ? a->dev : cur_dev;
    at->devicePointer = (void *)p;
    at->hostPointer = a->dev >= 0 ? NULL : (void *)p;
    return cudaSuccess;
}

/* ==== deferred execution: streams, events ====
 *
 * Device work (a launch, a copy, a memset, a cuBLAS product, cub's sort) is an op queued on
 * its stream and runs only when the host has to see it:
 * - cudaStreamSynchronize, cudaEventSynchronize, cudaDeviceSynchronize;
 * - a copy into pageable host memory (CUDA returns from it once the data is there), a
 *   synchronous cudaMemcpy, a host-to-host copy;
 * - cudaFree / cudaFreeHost (CUDA synchronizes the device there).
 * A stream runs its ops in order; an op runs the ops it depends on first: the record an
 * earlier cudaStreamWaitEvent named, and for the legacy default stream (NULL) and blocking
 * streams (cudaStreamCreate) the implicit order between them. Nothing else of another stream
 * runs, so a reader that forgot to wait sees what was there before (fresh memory: NaN).
 * cudaDeviceSynchronize drains the device's streams newest first (the stream whose last op
 * came last), which exposes both a reader that did not wait for a writer on another stream and
 * a writer that reused memory another stream still reads.
 * Queries (cudaStreamQuery, cudaEventQuery) answer "not ready" while work is queued, and let
 * the work run only after many asks, so a polling loop still ends.
 * What is read when: kernel arguments, cuBLAS scalars (host pointer mode) and a pageable
 * source of cudaMemcpyAsync are taken at the call, as CUDA takes them; device memory and
 * pinned host memory when the op runs. A failure while an op runs (a broken kernel) is
 * reported then and returned by the call that made it run.
 * NEMO_EMU_CUDA_DEFER=0 runs every op at once instead (the old in-order emulation). */

struct dep { nemo_emu_stream *s; uint64_t seq; };
struct op {
    uint64_t seq;
    std::vector<dep> deps;
    std::function<cudaError_t()> work;   /* empty for a record or a wait */
    nemo_emu_event *rec;                 /* cudaEventRecord's event */
};
struct nemo_emu_stream {
    int dev;
    unsigned flags;
    bool live;
    std::deque<op> q;
    uint64_t last;   /* seq of the newest op queued */
};
/* An event refers to its newest record: that op of that stream. */
struct nemo_emu_event { int dev; unsigned flags; nemo_emu_stream *rs; uint64_t rseq; double t; };
/* Streams and events are never deleted (a queued op or an event may still name them): a
 * destroyed one is marked dead. */
static std::vector<nemo_emu_stream *> all_streams;
static std::set<void *> streams, events;
static nemo_emu_stream *legacy[64];
static std::recursive_mutex q_lock;
static uint64_t next_seq = 1;
static int defer = -1;
static unsigned polls;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
static nemo_emu_stream *new_stream(int dev, unsigned flags) {
    nemo_emu_stream *s = new nemo_emu_stream{dev, flags, true, {}, 0};
    all_streams.push_back(s);
    return s;
}
/* The stream an API call means: NULL is the current device's legacy stream. */
static nemo_emu_stream *resolve(cudaStream_t st) {
    if (st) return st;
    if (!legacy[cur_dev]) legacy[cur_dev] = new_stream(cur_dev, cudaStreamDefault);
    return legacy[cur_dev];
}
/* A stream argument: the legacy default (NULL) or a live stream of the current device. */
static bool stream_ok(const char *what, cudaStream_t st) {
    if (!st) return true;
    if (!streams.count(st)) { report("%s: %p is not a live stream", what, (void *)st); return false; }
    if (st->dev != cur_dev) {
        report("%s: the stream belongs to device %d, the current device is %d", what, st->dev, cur_dev);
        return false;
    }
    return true;
}
static bool reached(const nemo_emu_stream *s, uint64_t seq) { return s->q.empty() || s->q.front().seq > seq; }

/* Runs s's ops up to seq (and what they wait for); the first failure. */
static cudaError_t run_to(nemo_emu_stream *s, uint64_t seq) {
    cudaError_t err = cudaSuccess;
    while (!s->q.empty() && s->q.front().seq <= seq) {
        op o = std::move(s->q.front());
        s->q.pop_front();
        for (const dep &d : o.deps) {
            cudaError_t e = run_to(d.s, d.seq);
            if (err == cudaSuccess) err = e;
        }
        if (o.work) {
            device_open();
            cudaError_t e = o.work();
            device_close();
            if (err == cudaSuccess) err = e;
        }
        if (o.rec && o.rec->rs == s && o.rec->rseq == o.seq) o.rec->t = now_ms();
    }
    return err == cudaSuccess ? cudaSuccess : fail(err);
}
static cudaError_t run_all(nemo_emu_stream *s) { return run_to(s, s->last); }
/* Drains every stream of dev (-1: of every device), newest first. */
static cudaError_t drain(int dev) {
    cudaError_t err = cudaSuccess;
    for (;;) {
        nemo_emu_stream *best = NULL;
        for (nemo_emu_stream *s : all_streams)
            if (!s->q.empty() && (dev < 0 || s->dev == dev) && (!best || s->last > best->last)) best = s;
        if (!best) return err;
        cudaError_t e = run_all(best);
        if (err == cudaSuccess) err = e;
    }
}
static bool deferring(void) {
    if (defer < 0) {
        const char *e = getenv("NEMO_EMU_CUDA_DEFER");
        defer = !(e && strcmp(e, "0") == 0);
    }
    return defer;
}
/* Queues an op on st (already checked); its seq. Ops of the legacy stream come after the
 * device's blocking streams' ops, and a blocking stream's after the legacy stream's. */
static uint64_t push(cudaStream_t st, std::function<cudaError_t()> work, std::vector<dep> deps = {},
                     nemo_emu_event *rec = NULL) {
    nemo_emu_stream *s = resolve(st);
    if (!st) {
        for (nemo_emu_stream *b : all_streams)
            if (b != s && b->live && b->dev == s->dev && !(b->flags & cudaStreamNonBlocking) && !reached(b, b->last))
                deps.push_back(dep{b, b->last});
    } else if (!(st->flags & cudaStreamNonBlocking)) {
        nemo_emu_stream *l = legacy[st->dev];
        if (l && !reached(l, l->last)) deps.push_back(dep{l, l->last});
    }
    const uint64_t seq = next_seq++;
    s->q.push_back(op{seq, std::move(deps), std::move(work), rec});
    s->last = seq;
    if (rec) { rec->rs = s; rec->rseq = seq; }
    return seq;
}
/* Queues work on st; runs it (and everything before it on st) at once when wait is set or
 * nothing is deferred. The launch's status, or the run's. */
static cudaError_t submit(cudaStream_t st, std::function<cudaError_t()> work, bool wait = false) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    const uint64_t seq = push(st, std::move(work));
    return wait || !deferring() ? run_to(resolve(st), seq) : cudaSuccess;
}
namespace nemo_emu {
cudaError_t enqueue(cudaStream_t st, const char *what, std::function<cudaError_t()> work) {
    init();
    if (!stream_ok(what, st)) return fail(cudaErrorInvalidResourceHandle);
    if (no_exec()) work = []() { return cudaSuccess; };
    return submit(st, std::move(work));
}
}
/* A query's answer for work not yet done: "not ready", except every 64th time, when the work
 * runs (so that a loop polling it ends). */
static cudaError_t not_ready(nemo_emu_stream *s, uint64_t seq) {
    if (++polls % 64) return cudaErrorNotReady;   /* not an error: not kept for cudaGetLastError */
    return run_to(s, seq);
}

EXPORT cudaError_t cudaDeviceSynchronize(void) {
    init();
    std::lock_guard<std::recursive_mutex> g(q_lock);
    return drain(cur_dev);
}
EXPORT cudaError_t cudaStreamCreateWithFlags(cudaStream_t *st, unsigned flags) {
    init();
    std::lock_guard<std::recursive_mutex> g(q_lock);
    *st = new_stream(cur_dev, flags);
    streams.insert(*st);
    return cudaSuccess;
}
EXPORT cudaError_t cudaStreamCreate(cudaStream_t *st) { return cudaStreamCreateWithFlags(st, 0); }
EXPORT cudaError_t cudaStreamDestroy(cudaStream_t st) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!streams.erase(st)) return fail(cudaErrorInvalidResourceHandle);
    st->live = false;
    return run_all(st);   /* CUDA lets queued work finish */
}
EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t st) {
    init();
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (st && !streams.count(st)) return fail(cudaErrorInvalidResourceHandle);
    return run_all(resolve(st));
}
EXPORT cudaError_t cudaStreamQuery(cudaStream_t st) {
    init();
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (st && !streams.count(st)) return fail(cudaErrorInvalidResourceHandle);
    nemo_emu_stream *s = resolve(st);
    return reached(s, s->last) ? cudaSuccess : not_ready(s, s->last);
}
EXPORT cudaError_t cudaEventCreateWithFlags(cudaEvent_t *ev, unsigned flags) {
    init();
    std::lock_guard<std::recursive_mutex> g(q_lock);
    *ev = new nemo_emu_event{cur_dev, flags, NULL, 0, 0};
    events.insert(*ev);
    return cudaSuccess;
}
EXPORT cudaError_t cudaEventCreate(cudaEvent_t *ev) { return cudaEventCreateWithFlags(ev, 0); }
EXPORT cudaError_t cudaEventDestroy(cudaEvent_t ev) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!events.erase(ev)) return fail(cudaErrorInvalidResourceHandle);
    return cudaSuccess;
}
EXPORT cudaError_t cudaEventRecord(cudaEvent_t ev, cudaStream_t st) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!events.count(ev)) return fail(cudaErrorInvalidResourceHandle);
    if (!stream_ok("cudaEventRecord", st)) return fail(cudaErrorInvalidResourceHandle);
    if (ev->dev != cur_dev) {   /* CUDA: the event and the stream must belong to the same device */
        report("cudaEventRecord: the event belongs to device %d, the current device is %d", ev->dev, cur_dev);
        return fail(cudaErrorInvalidResourceHandle);
    }
    const uint64_t seq = push(st, nullptr, {}, ev);
    return deferring() ? cudaSuccess : run_to(resolve(st), seq);
}
EXPORT cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t ev, unsigned flags) {
    (void)flags;
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!events.count(ev) || !stream_ok("cudaStreamWaitEvent", st)) return fail(cudaErrorInvalidResourceHandle);
    /* the event's newest record at this call (none: nothing to wait for) */
    if (ev->rs && !reached(ev->rs, ev->rseq)) push(st, nullptr, {dep{ev->rs, ev->rseq}});
    return cudaSuccess;
}
static bool event_done(cudaEvent_t ev) { return !ev->rs || reached(ev->rs, ev->rseq); }
EXPORT cudaError_t cudaEventQuery(cudaEvent_t ev) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!events.count(ev)) return fail(cudaErrorInvalidResourceHandle);
    return event_done(ev) ? cudaSuccess : not_ready(ev->rs, ev->rseq);
}
EXPORT cudaError_t cudaEventSynchronize(cudaEvent_t ev) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!events.count(ev)) return fail(cudaErrorInvalidResourceHandle);
    return ev->rs ? run_to(ev->rs, ev->rseq) : cudaSuccess;
}
EXPORT cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    std::lock_guard<std::recursive_mutex> g(q_lock);
    if (!events.count(a) || !events.count(b)) return fail(cudaErrorInvalidResourceHandle);
    if ((a->flags | b->flags) & cudaEventDisableTiming || !a->rs || !b->rs) return fail(cudaErrorInvalidResourceHandle);
    if (!event_done(a) || !event_done(b)) return fail(cudaErrorNotReady);
    *ms = (float)(b->t - a->t);
    return cudaSuccess;
}

/* ==== copies, memsets ==== */

/* A copy's side that claims to be device memory must be [p, p + n) of one device allocation;
 * a side that claims to be host memory must not be device memory. */
static bool side_ok(const char *what, const void *p, size_t n, bool device) {
    if (n == 0) return true;
    if (device ? is_device(p, n) : !is_device(p, 1)) return true;
    report("%s: %p (%zu bytes) is %s", what, p, n,
           device ? "not inside one device allocation" : "device memory, but the copy kind says host");
    return false;
}
static bool is_pinned(const void *p, size_t n) {
    const alloc *a = find(p, n);
    return a && a->dev < 0;
}
/* Checks a copy; the kind it is (cudaMemcpyDefault resolved), or -1. */
static int copy_kind(const char *fn, void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
    char d[64], s[64];
    snprintf(d, sizeof d, "%s dst", fn);
    snprintf(s, sizeof s, "%s src", fn);
    bool ok = true;
    switch (kind) {
    case cudaMemcpyHostToHost: ok = side_ok(d, dst, n, false) && side_ok(s, src, n, false); break;
    case cudaMemcpyHostToDevice: ok = side_ok(d, dst, n, true) && side_ok(s, src, n, false); break;
    case cudaMemcpyDeviceToHost: ok = side_ok(d, dst, n, false) && side_ok(s, src, n, true); break;
    case cudaMemcpyDeviceToDevice: ok = side_ok(d, dst, n, true) && side_ok(s, src, n, true); break;
    case cudaMemcpyDefault: {
        const bool dd = is_device(dst, 1), sd = is_device(src, 1);
        ok = (!dd || is_device(dst, n)) && (!sd || is_device(src, n));
        if (!ok) { report("%s (default kind): %zu bytes run past a device allocation", fn, n); break; }
        return dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                  : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    }
    default: fail(cudaErrorInvalidMemcpyDirection); return -1;
    }
    if (!ok) { fail(cudaErrorInvalidValue); return -1; }
    return kind;
}
/* The copy as CUDA orders it against the host (see "API synchronization behavior"): from
 * pageable memory the source is taken at the call; into pageable memory, or host to host, the
 * call returns once the data is there; device to device and pinned copies are queued. sync:
 * cudaMemcpy, which also returns once a copy from or to the host is done. */
static cudaError_t copy(const char *fn, void *dst, const void *src, size_t n, enum cudaMemcpyKind kind0,
                        cudaStream_t st, bool sync) {
    init();
    const int kind = copy_kind(fn, dst, src, n, kind0);
    if (kind < 0) return last_error;
    if (n == 0) return cudaSuccess;
    if (FILE *log = launch_log()) {
        static const char *kinds[] = {"host to host", "host to device", "device to host", "device to device"};
        fprintf(log, "%s %s %zu bytes\n", fn, kinds[kind], n);
    }
    if (kind == cudaMemcpyHostToDevice && !is_pinned(src, n)) {
        std::shared_ptr<std::vector<char>> snap = std::make_shared<std::vector<char>>((const char *)src, (const char *)src + n);
        auto w = [=]() { memcpy(dst, snap->data(), n); return cudaSuccess; };
        return submit(st, w, sync);
    }
    if (no_exec() && kind == cudaMemcpyDeviceToDevice) return submit(st, []() { return cudaSuccess; });
    auto w = [=]() { memmove(dst, src, n); return cudaSuccess; };
    const bool wait = kind == cudaMemcpyHostToHost || (kind == cudaMemcpyDeviceToHost && !is_pinned(dst, n)) ||
                      (sync && kind != cudaMemcpyDeviceToDevice);
    return submit(st, w, wait);
}
EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
    return copy("cudaMemcpy", dst, src, n, kind, NULL, true);
}
EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t st) {
    if (!stream_ok("cudaMemcpyAsync", st)) return fail(cudaErrorInvalidResourceHandle);
    return copy("cudaMemcpyAsync", dst, src, n, kind, st, false);
}
EXPORT cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t st) {
    init();
    if (!stream_ok("cudaMemsetAsync", st)) return fail(cudaErrorInvalidResourceHandle);
    if (!side_ok("cudaMemset", p, n, true)) return fail(cudaErrorInvalidValue);
    if (n == 0) return cudaSuccess;
    if (no_exec()) return submit(st, []() { return cudaSuccess; });
    return submit(st, [=]() { memset(p, value, n); return cudaSuccess; });
}
/* cudaMemset of device memory is asynchronous too, on the legacy stream */
EXPORT cudaError_t cudaMemset(void *p, int value, size_t n) { return cudaMemsetAsync(p, value, n, NULL); }

/* ==== launches ==== */

static std::map<const void *, int> max_dyn_smem;
EXPORT cudaError_t nemo_emu_func_set_attribute(const void *fn, enum cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 232448)
        return fail(cudaErrorInvalidValue);
    max_dyn_smem[fn] = value;
    return cudaSuccess;
}

static std::string kernel_name(const void *fn) {
    Dl_info di;
    if (!dladdr(fn, &di) || !di.dli_sname) return "an unnamed kernel";
    int st = 0;
    char *d = abi::__cxa_demangle(di.dli_sname, NULL, NULL, &st);
    std::string s = d && st == 0 ? d : di.dli_sname;
    free(d);
    return s;
}

namespace nemo_emu {
uint3 tid, bid;
dim3 bdim, gdim;

enum { S_RUN, S_BAR, S_WARP, S_DONE };
enum { W_SHFL, W_MMA, W_LDSM };
struct thread {
#ifdef FAST_SWITCH
    void *sp;
#else
    ucontext_t ctx;
#endif
    int state, wop;
    uint3 t;
    unsigned mask;
    int kind, arg, width, e;
    uint64_t v, out;
    uint32_t a[4], b[2];
    float d[4];
    const uint16_t *lrow;   /* ldmatrix: this lane's row, .trans, the registers it receives */
    int ltrans;
    uint32_t lr[4];
    nemo_emu_cp_queue cpq;  /* this thread's cp.async copies (warp_mma.h) */
};
/* Fibers switch with nemo_emu_switch on x86-64 (callee-saved registers, MXCSR and the x87
 * control word: no system call, unlike swapcontext's signal mask) and with ucontext
 * elsewhere. */
#ifdef FAST_SWITCH
extern "C" void nemo_emu_switch(void **save_sp, void *load_sp);
asm(".text\n"
    ".globl nemo_emu_switch\n"
    ".hidden nemo_emu_switch\n"
    ".type nemo_emu_switch,@function\n"
    "nemo_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size nemo_emu_switch, .-nemo_emu_switch\n");
#endif

static const size_t STACK = 256 * 1024;
static thread *th;          /* 1024 of them */
static char *stacks;
static int cur;
#ifdef FAST_SWITCH
static void *sched_sp;
#else
static ucontext_t sched;
#endif
static char *smem;
static size_t smem_size;
static std::string thread_fault;   /* what a thread did wrong outside a collective (cp.async) */
static void (*body)(void *);
static void *body_ctx;

static void yield(int state) {
    th[cur].state = state;
#ifdef FAST_SWITCH
    nemo_emu_switch(&th[cur].sp, sched_sp);
#else
    swapcontext(&th[cur].ctx, &sched);
#endif
}
void syncthreads() { yield(S_BAR); }
uint64_t shfl(unsigned mask, uint64_t bits, int kind, int arg, int width) {
    thread &t = th[cur];
    t.wop = W_SHFL;
    t.mask = mask;
    t.v = bits;
    t.kind = kind;
    t.arg = arg;
    t.width = width;
    yield(S_WARP);
    return th[cur].out;
}
void mma(int e, float d[4], const uint32_t a[4], const uint32_t b[2]) {
    thread &t = th[cur];
    t.wop = W_MMA;
    t.e = e;
    memcpy(t.a, a, sizeof t.a);
    memcpy(t.b, b, sizeof t.b);
    memcpy(t.d, d, sizeof t.d);
    yield(S_WARP);
    memcpy(d, th[cur].d, sizeof th[cur].d);
}
char *dyn_smem() { return smem; }
static bool in_dyn_smem(const void *p) {
    const char *c = (const char *)p;
    return c >= smem && c + 16 <= smem + smem_size && (uintptr_t)c % 16 == 0;
}
void ldmatrix(uint32_t r[4], const uint16_t *row, int trans) {
    thread &t = th[cur];
    t.wop = W_LDSM;
    t.mask = 0xffffffffu;
    t.lrow = row;
    t.ltrans = trans;
    yield(S_WARP);
    memcpy(r, th[cur].lr, sizeof th[cur].lr);
}
void cp_async(void *dst, const void *src, int n) {
    if (!in_dyn_smem(dst) || (uintptr_t)src % 16) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "cp.async of 16 bytes to %p from %p: the destination must lie in the launch's dynamic shared memory "
                 "and both be 16-byte aligned", dst, src);
        if (thread_fault.empty()) thread_fault = msg;
        return;
    }
    th[cur].cpq.issue(dst, src, n);
}
void cp_commit() { th[cur].cpq.commit(); }
void cp_wait(int n) { th[cur].cpq.wait(n); }

static void entry() {
    body(body_ctx);
#ifdef FAST_SWITCH
    yield(S_DONE);            /* never resumed */
#else
    th[cur].state = S_DONE;   /* back to sched through uc_link */
#endif
}

/* One warp's m16n8k16 in the PTX ISA's fragment layout (warp_mma.h). */
static void warp_mma(thread *w) { nemo_emu_warp_mma(w); }
static void warp_shfl(thread *w) {
    for (int l = 0; l < 32; l++) {
        const int wd = w[l].width, seg = l / wd * wd, arg = w[l].arg;
        int src = l;
        switch (w[l].kind) {
        case 0: src = seg + (arg % wd + wd) % wd; break;
        case 1: src = l - seg >= arg ? l - arg : l; break;
        case 2: src = l - seg + arg < wd ? l + arg : l; break;
        default: src = (l ^ arg) < seg + wd ? l ^ arg : l; break;
        }
        w[l].out = w[src].v;
    }
}

/* Carries out warp w's collective when all its lanes reached one: true when it did; *why
 * says what is wrong when the lanes disagree. */
static bool warp_collective(int w, int nt, std::string *why) {
    thread *l = th + 32 * w;
    const int nl = nt - 32 * w < 32 ? nt - 32 * w : 32;
    int at = 0;
    for (int i = 0; i < nl; i++) at += l[i].state == S_WARP;
    if (at != 32) return false;   /* step says why, once nothing else can move */
    for (int i = 1; i < 32; i++)
        if (l[i].wop != l[0].wop || l[i].mask != l[0].mask || (l[0].wop == W_MMA && l[i].e != l[0].e) ||
            (l[0].wop == W_SHFL && (l[i].kind != l[0].kind || l[i].width != l[0].width)) ||
            (l[0].wop == W_LDSM && l[i].ltrans != l[0].ltrans)) {
            *why = "the lanes of warp " + std::to_string(w) + " reached different warp collectives";
            return false;
        }
    if (l[0].wop == W_SHFL) {
        if (l[0].mask != 0xffffffffu || l[0].width < 1 || l[0].width > 32 || (l[0].width & (l[0].width - 1))) {
            *why = "a shuffle with mask " + std::to_string(l[0].mask) + " and width " + std::to_string(l[0].width) +
                   " (the kernels use full warps)";
            return false;
        }
        warp_shfl(l);
    } else if (l[0].wop == W_LDSM) {
        for (int i = 0; i < 32; i++)
            if (!in_dyn_smem(l[i].lrow)) {
                *why = "ldmatrix in warp " + std::to_string(w) + ": lane " + std::to_string(i) +
                       "'s row address is outside the launch's dynamic shared memory or not 16-byte aligned";
                return false;
            }
        nemo_emu_warp_ldsm(l);
    } else {
        warp_mma(l);
    }
    for (int i = 0; i < 32; i++) l[i].state = S_RUN;
    return true;
}

/* Why the block at (bx, by, bz) cannot go on, or "" when it can (the barrier passed). Called
 * once every warp ran as far as it could, its complete collectives carried out. */
static std::string step(int nt) {
    int waiting_warp = 0, done = 0, bar = 0;
    for (int i = 0; i < nt; i++) {
        waiting_warp += th[i].state == S_WARP;
        bar += th[i].state == S_BAR;
        done += th[i].state == S_DONE;
    }
    if (waiting_warp) {
        for (int i = 0; i < nt; i++)
            if (th[i].state == S_WARP) {
                const int w = i / 32;
                int ex = 0, b = 0;
                for (int j = 32 * w; j < 32 * w + 32 && j < nt; j++) { ex += th[j].state == S_DONE; b += th[j].state == S_BAR; }
                return "a warp collective in warp " + std::to_string(w) + " that " + std::to_string(ex) +
                       " lanes exited before and " + std::to_string(b) + " lanes wait at a barrier" +
                       (nt - 32 * w < 32 ? " (the block ends inside this warp)" : "");
            }
    }
    if (bar == nt) {
        for (int i = 0; i < nt; i++) th[i].state = S_RUN;
        return "";
    }
    if (bar > 0 && bar + done == nt)
        return "__syncthreads reached by " + std::to_string(bar) + " threads after " + std::to_string(done) +
               " others exited (CUDA leaves that undefined: the whole block must reach a barrier)";
    return "no thread can go on";
}

/* Thread i of the block starts at entry() on its own stack (getcontext lives here, in a
 * function of its own: it "returns twice" for the compiler, which would otherwise worry
 * about the launch loop's variables). */
static void __attribute__((noinline)) start_fiber(uint64_t i, dim3 b) {
    thread &t = th[i];
#ifdef FAST_SWITCH
    /* the frame nemo_emu_switch pops: MXCSR / x87 control word, r15..rbp, then entry as the
     * return address, above it a null return address for entry (rsp = 8 mod 16 there) */
    uint64_t *top = (uint64_t *)(stacks + (i + 1) * STACK);
    uint64_t *sp = top - 9;
    uint32_t csr[2];
    __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    memcpy(&sp[0], csr, 8);
    for (int r = 1; r <= 6; r++) sp[r] = 0;
    sp[7] = (uint64_t)(uintptr_t)&entry;
    sp[8] = 0;
    t.sp = sp;
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks + i * STACK;
    t.ctx.uc_stack.ss_size = STACK;
    t.ctx.uc_link = &sched;
    makecontext(&t.ctx, entry, 0);
#endif
    t.state = S_RUN;
    t.cpq.clear();
    t.t = uint3{(unsigned)(i % b.x), (unsigned)(i / b.x % b.y), (unsigned)(i / ((uint64_t)b.x * b.y))};
}

static std::mutex launch_lock;

/* NEMO_EMU_CUDA_TRACE=FILE: the kernels launched, one "count name" line each, appended to FILE
 * at exit (tests/sh/test_cuda_emu.sh checks that every __global__ function ran). */
static std::map<const void *, uint64_t> *launched;
static void __attribute__((destructor)) write_trace(void) {
    const char *f = getenv("NEMO_EMU_CUDA_TRACE");
    if (!f || !*f || !launched) return;
    FILE *o = fopen(f, "a");
    if (!o) return;
    for (auto &kv : *launched) fprintf(o, "%llu %s\n", (unsigned long long)kv.second, kernel_name(kv.first).c_str());
    fclose(o);
}

static char *smem_region;
static const size_t SMEM_REGION = 256 * 1024;   /* page-aligned, above the 227 KiB a block may have */
static uint64_t n_launches;
/* NEMO_EMU_CUDA_ORDER=forward: every block's threads run first to last (0: alternate). */
static int order_mode = -1;

/* Runs a checked launch now: every block, each one's threads as fibers. */
static cudaError_t run_grid(const void *fn, dim3 g, dim3 b, size_t smem_bytes, void (*fbody)(void *), void *ctx) {
    std::lock_guard<std::mutex> lk(launch_lock);
    const uint64_t nt = (uint64_t)b.x * b.y * b.z;
    if (order_mode < 0) {
        const char *e = getenv("NEMO_EMU_CUDA_ORDER");
        order_mode = e && strcmp(e, "forward") == 0;
    }
    if (!th) {
        th = new thread[1024];
        stacks = (char *)mmap(NULL, STACK * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                              -1, 0);
        if (stacks == MAP_FAILED) { stacks = NULL; delete[] th; th = NULL; return fail(cudaErrorMemoryAllocation); }
    }
    /* dynamic shared memory ends where an inaccessible page starts, so a read or write past
     * it faults (CUDA leaves such an access undefined; it often reads another block's data) */
    if (!smem_region) {
        smem_region = (char *)mmap(NULL, SMEM_REGION + page_size(), PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (smem_region == MAP_FAILED) { smem_region = NULL; return fail(cudaErrorMemoryAllocation); }
        if (mprotect(smem_region + SMEM_REGION, page_size(), PROT_NONE) != 0) return fail(cudaErrorMemoryAllocation);
    }
    smem = smem_region + SMEM_REGION - (smem_bytes + 15) / 16 * 16;   /* 16-byte aligned, as CUDA's */
    smem_size = smem_bytes;
    thread_fault.clear();
    body = fbody;
    body_ctx = ctx;
    gdim = g;
    bdim = b;
    std::string why;
    /* odd launches run their blocks last to first: blocks are unordered on a GPU */
    const bool rev_blocks = order_mode == 0 && (n_launches & 1);
    for (unsigned bz0 = 0; bz0 < g.z && why.empty(); bz0++)
        for (unsigned by0 = 0; by0 < g.y && why.empty(); by0++)
            for (unsigned bx0 = 0; bx0 < g.x && why.empty(); bx0++) {
                const unsigned bx = rev_blocks ? g.x - 1 - bx0 : bx0, by = rev_blocks ? g.y - 1 - by0 : by0,
                               bz = rev_blocks ? g.z - 1 - bz0 : bz0;
                bid = uint3{bx, by, bz};
                memset(smem, 0xff, smem_bytes);
                for (uint64_t i = 0; i < nt; i++) start_fiber(i, b);
                /* every other block (and launch) runs its threads last to first between two
                 * barriers: a read that misses a barrier sees stale data in one of the orders */
                const bool rev = order_mode == 0 && ((bx0 + by0 + bz0 + n_launches) & 1);
                for (;;) {
                    /* each warp in turn runs ahead to its next barrier (or its end), carrying
                     * out its collectives as its lanes reach them: another warp's data read
                     * without a barrier is then missing in one of the two orders */
                    const uint64_t nw = (nt + 31) / 32;
                    for (uint64_t wj = 0; wj < nw && why.empty(); wj++) {
                        const uint64_t w = rev ? nw - 1 - wj : wj, lo = 32 * w, n = nt - lo < 32 ? nt - lo : 32;
                        do {
                            for (uint64_t j = 0; j < n; j++) {
                                const uint64_t i = lo + (rev ? n - 1 - j : j);
                                if (th[i].state == S_RUN) {
                                    cur = (int)i;
                                    tid = th[i].t;
#ifdef FAST_SWITCH
                                    nemo_emu_switch(&sched_sp, th[i].sp);
#else
                                    swapcontext(&sched, &th[i].ctx);
#endif
                                }
                            }
                            if (!thread_fault.empty()) why.swap(thread_fault);
                        } while (why.empty() && warp_collective((int)w, (int)nt, &why));
                    }
                    int done = 0;
                    for (uint64_t i = 0; i < nt; i++) done += th[i].state == S_DONE;
                    if (why.empty() && done == (int)nt) break;
                    if (why.empty()) why = step((int)nt);
                    if (!why.empty()) {
                        why = "block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) +
                              "): " + why;
                        break;
                    }
                }
            }
    smem = NULL;
    n_launches++;
    if (!why.empty()) {
        report("%s failed: %s", kernel_name(fn).c_str(), why.c_str());
        return fail(cudaErrorLaunchFailure);
    }
    return cudaSuccess;
}

cudaError_t launch(const void *fn, dim3 g, dim3 b, size_t smem_bytes, cudaStream_t st, void (*fbody)(void *),
                   void (*drop)(void *), void *ctx) {
    init();
    std::lock_guard<std::recursive_mutex> ql(q_lock);
    const uint64_t nt = (uint64_t)b.x * b.y * b.z;
    auto bad = [&](const std::string &why) {
        report("launch of %s: %s", kernel_name(fn).c_str(), why.c_str());
        drop(ctx);
        return fail(cudaErrorInvalidConfiguration);
    };
    if (n_devices == 0) { drop(ctx); return fail(cudaErrorNoDevice); }
    if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z) return bad("a zero grid or block dimension");
    if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
        return bad("grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " + std::to_string(g.z) +
                   ") exceeds (2^31 - 1, 65535, 65535)");
    if (nt > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
        return bad("block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) +
                   ") exceeds 1024 threads");
    auto ms = max_dyn_smem.find(fn);
    const size_t lim = ms == max_dyn_smem.end() ? 49152 : (size_t)ms->second;
    if (smem_bytes > lim)
        return bad(std::to_string(smem_bytes) + " bytes of dynamic shared memory, more than the " + std::to_string(lim) +
                   " allowed" + (ms == max_dyn_smem.end() ? " without cudaFuncSetAttribute" : ""));
    if (!stream_ok("kernel launch", st)) { drop(ctx); return fail(cudaErrorInvalidResourceHandle); }
    if (!launched) launched = new std::map<const void *, uint64_t>;
    (*launched)[fn]++;
    if (FILE *log = launch_log())
        fprintf(log, "%s grid(%u,%u,%u) block(%u,%u,%u)\n", kernel_name(fn).c_str(), g.x, g.y, g.z, b.x, b.y, b.z);
    std::shared_ptr<void> keep(ctx, drop);   /* dropped with the queued op */
    if (no_exec()) return submit(st, [keep]() { return cudaSuccess; });
    return submit(st, [=]() { return run_grid(fn, g, b, smem_bytes, fbody, keep.get()); });
}
}   /* namespace nemo_emu */

/* ==== cuBLAS ==== */

struct nemo_emu_cublas { cudaStream_t st; cublasPointerMode_t mode; };

static const char *status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
static const char *status_text(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    default: return "cuBLAS error";
    }
}
EXPORT const char *cublasGetStatusString(cublasStatus_t s) { return status_text(s); }
EXPORT const char *cublasGetStatusName(cublasStatus_t s) { return status_name(s); }
EXPORT const char *cublasLtGetStatusString(cublasStatus_t s) { return status_text(s); }
EXPORT const char *cublasLtGetStatusName(cublasStatus_t s) { return status_name(s); }
EXPORT cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = new nemo_emu_cublas{NULL, CUBLAS_POINTER_MODE_HOST}; return CUBLAS_STATUS_SUCCESS; }
EXPORT cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
EXPORT cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t st) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (st && !streams.count(st)) return CUBLAS_STATUS_INVALID_VALUE;
    h->st = st;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

static int type_size(cudaDataType_t t) {
    switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_64F: return 8;
    case CUDA_R_16F: case CUDA_R_16BF: return 2;
    }
    return 0;
}
static double load(const void *p, int64_t i, cudaDataType_t t) {
    switch (t) {
    case CUDA_R_32F: return ((const float *)p)[i];
    case CUDA_R_64F: return ((const double *)p)[i];
    case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    default: return __half2float(((const __half *)p)[i]);
    }
}
static void store(void *p, int64_t i, cudaDataType_t t, double v) {
    switch (t) {
    case CUDA_R_32F: ((float *)p)[i] = (float)v; break;
    case CUDA_R_64F: ((double *)p)[i] = v; break;
    case CUDA_R_16BF: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
    default: ((__half *)p)[i] = __float2half_rn((float)v); break;
    }
}

/* A column-major rows x cols operand with leading dimension ld at p: inside one device
 * allocation? */
static bool operand_ok(const char *fn, const char *what, const void *p, int64_t rows, int64_t cols, int64_t ld,
                       cudaDataType_t t) {
    if (rows == 0 || cols == 0) return true;
    const size_t n = (size_t)((cols - 1) * ld + rows) * (size_t)type_size(t);
    if (is_device(p, n)) return true;
    report("%s: %s (%lld x %lld, ld %lld) at %p is not inside one device allocation", fn, what, (long long)rows,
           (long long)cols, (long long)ld, p);
    return false;
}

/* D = alpha op(A) op(B) + beta C (+ bias per row), one matrix, computed in float (f32) or
 * double: the operands are widened exactly, multiplied by OpenBLAS (cuBLAS accumulates in
 * the compute type too, in its own order), then scaled, added and rounded once to D's type. */
static void blas(float *a, float *b, float *c, int64_t m, int64_t n, int64_t k) {
    cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, 1.0f, a, (blasint)m, b,
                (blasint)k, 0.0f, c, (blasint)m);
}
static void blas(double *a, double *b, double *c, int64_t m, int64_t n, int64_t k) {
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, 1.0, a, (blasint)m, b,
                (blasint)k, 0.0, c, (blasint)m);
}
template <typename Acc>
static void product(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const void *A, cudaDataType_t at,
                    int64_t lda, const void *B, cudaDataType_t bt, int64_t ldb, double beta, const void *C,
                    cudaDataType_t ct, int64_t ldc, void *D, cudaDataType_t dt, int64_t ldd, const void *bias,
                    cudaDataType_t biast) {
    if (m == 0 || n == 0) return;
    std::vector<Acc> a((size_t)(m * k)), b((size_t)(k * n)), c((size_t)(m * n), (Acc)0);
    for (int64_t l = 0; l < k; l++)
        for (int64_t i = 0; i < m; i++) a[(size_t)(i + l * m)] = (Acc)load(A, ta ? l + i * lda : i + l * lda, at);
    for (int64_t j = 0; j < n; j++)
        for (int64_t l = 0; l < k; l++) b[(size_t)(l + j * k)] = (Acc)load(B, tb ? j + l * ldb : l + j * ldb, bt);
    if (k > 0) blas(a.data(), b.data(), c.data(), m, n, k);
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < m; i++) {
            Acc r = (Acc)alpha * c[(size_t)(i + j * m)];
            if (beta != 0) r += (Acc)beta * (Acc)load(C, i + j * ldc, ct);
            if (bias) r += (Acc)load(bias, i, biast);
            store(D, i + j * ldd, dt, (double)r);
        }
}

static cublasStatus_t gemm_check(const char *fn, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                 int n, int k, cudaDataType_t at, int lda, cudaDataType_t bt, int ldb, cudaDataType_t ct,
                                 int ldc, cublasComputeType_t compute) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T) || m < 0 || n < 0 || k < 0) {
        report("%s: bad operation or negative size (%d, %d, %d)", fn, m, n, k);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    const int arows = ta == CUBLAS_OP_N ? m : k, brows = tb == CUBLAS_OP_N ? k : n;
    if (lda < (arows > 1 ? arows : 1) || ldb < (brows > 1 ? brows : 1) || ldc < (m > 1 ? m : 1)) {
        report("%s: leading dimensions %d, %d, %d below the rows %d, %d, %d", fn, lda, ldb, ldc, arows, brows, m);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    const bool f32 = at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F && compute == CUBLAS_COMPUTE_32F;
    const bool f64 = at == CUDA_R_64F && bt == CUDA_R_64F && ct == CUDA_R_64F && compute == CUBLAS_COMPUTE_64F;
    if (!f32 && !f64) { report("%s: type combination not emulated", fn); return CUBLAS_STATUS_NOT_SUPPORTED; }
    if (h->st && h->st->dev != cur_dev) {
        report("%s: the handle's stream belongs to device %d, the current device is %d", fn, h->st->dev, cur_dev);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    return CUBLAS_STATUS_SUCCESS;
}
/* alpha or beta (host pointer mode) in the compute type's precision. */
static double scalar(const void *p, cublasComputeType_t compute) {
    return compute == CUBLAS_COMPUTE_64F ? *(const double *)p : *(const float *)p;
}
static bool gemm_operands_ok(const char *fn, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                             const void *A, cudaDataType_t at, int lda, const void *B, cudaDataType_t bt, int ldb,
                             const void *C, cudaDataType_t ct, int ldc) {
    const bool TA = ta == CUBLAS_OP_T, TB = tb == CUBLAS_OP_T;
    return operand_ok(fn, "A", A, TA ? k : m, TA ? m : k, lda, at) && operand_ok(fn, "B", B, TB ? n : k, TB ? k : n, ldb, bt) &&
           operand_ok(fn, "C", C, m, n, ldc, ct);
}
static void gemm_one(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, double alpha, const void *A,
                     cudaDataType_t at, int lda, const void *B, cudaDataType_t bt, int ldb, double beta, void *C,
                     cudaDataType_t ct, int ldc, cublasComputeType_t compute) {
    const bool TA = ta == CUBLAS_OP_T, TB = tb == CUBLAS_OP_T;
    if (compute == CUBLAS_COMPUTE_64F)
        product<double>(TA, TB, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, C, ct, ldc, NULL, ct);
    else
        product<float>(TA, TB, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, C, ct, ldc, NULL, ct);
}
/* Queues a checked product on the handle's stream: CUBLAS_STATUS_SUCCESS, or
 * CUBLAS_STATUS_EXECUTION_FAILED when it cannot be queued. */
static cublasStatus_t blas_submit(cublasHandle_t h, std::function<cudaError_t()> work) {
    if (no_exec()) work = []() { return cudaSuccess; };
    return submit(h->st, std::move(work)) == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
EXPORT cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                                   cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    (void)algo;
    static const char fn[] = "cublasGemmEx";
    cublasStatus_t s = gemm_check(fn, h, ta, tb, m, n, k, at, lda, bt, ldb, ct, ldc, compute);
    if (s != CUBLAS_STATUS_SUCCESS || m == 0 || n == 0) return s;
    if (!gemm_operands_ok(fn, ta, tb, m, n, k, A, at, lda, B, bt, ldb, C, ct, ldc)) return CUBLAS_STATUS_EXECUTION_FAILED;
    const double al = scalar(alpha, compute), be = scalar(beta, compute);   /* host pointer mode: read now */
    return blas_submit(h, [=]() {
        gemm_one(ta, tb, m, n, k, al, A, at, lda, B, bt, ldb, be, C, ct, ldc, compute);
        return cudaSuccess;
    });
}
EXPORT cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *const A[], cudaDataType_t at, int lda,
                                          const void *const B[], cudaDataType_t bt, int ldb, const void *beta,
                                          void *const C[], cudaDataType_t ct, int ldc, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    (void)algo;
    static const char fn[] = "cublasGemmBatchedEx";
    cublasStatus_t s = gemm_check(fn, h, ta, tb, m, n, k, at, lda, bt, ldb, ct, ldc, compute);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    const size_t pb = sizeof(void *) * (size_t)batch;
    if (!is_device(A, pb) || !is_device(B, pb) || !is_device(C, pb)) {
        report("%s: the arrays of %d pointers must live in device memory", fn, batch);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    const double al = scalar(alpha, compute), be = scalar(beta, compute);
    /* the pointer arrays are device memory: read when the product runs */
    return blas_submit(h, [=]() {
        for (int i = 0; i < batch; i++) {
            if (!gemm_operands_ok(fn, ta, tb, m, n, k, A[i], at, lda, B[i], bt, ldb, C[i], ct, ldc))
                return fail(cudaErrorLaunchFailure);
            gemm_one(ta, tb, m, n, k, al, A[i], at, lda, B[i], bt, ldb, be, C[i], ct, ldc, compute);
        }
        return cudaSuccess;
    });
}

/* ==== cuBLASLt ==== */

struct nemo_emu_lt { int dev; };
struct nemo_emu_lt_desc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    cublasOperation_t ta, tb;
    cublasLtEpilogue_t epi;
    const void *bias;
    int bias_type;   /* -1: D's type */
};
struct nemo_emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch;
    int64_t stride;
};
struct nemo_emu_lt_pref { uint64_t ws; uint32_t align[4]; };

EXPORT cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) { init(); *h = new nemo_emu_lt{cur_dev}; return CUBLAS_STATUS_SUCCESS; }
EXPORT cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
EXPORT cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    if ((compute == CUBLAS_COMPUTE_32F && scale != CUDA_R_32F) || (compute == CUBLAS_COMPUTE_64F && scale != CUDA_R_64F) ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_64F))
        return CUBLAS_STATUS_INVALID_VALUE;
    *d = new nemo_emu_lt_desc{compute, scale, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT, NULL, -1};
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return CUBLAS_STATUS_SUCCESS; }
template <class T> static cublasStatus_t get_attr(T *dst, const void *buf, size_t n) {
    if (n != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(dst, buf, n);
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                                     const void *buf, size_t n) {
    switch (a) {
    case CUBLASLT_MATMUL_DESC_TRANSA: { int32_t v; if (get_attr(&v, buf, n)) return CUBLAS_STATUS_INVALID_VALUE; d->ta = (cublasOperation_t)v; break; }
    case CUBLASLT_MATMUL_DESC_TRANSB: { int32_t v; if (get_attr(&v, buf, n)) return CUBLAS_STATUS_INVALID_VALUE; d->tb = (cublasOperation_t)v; break; }
    case CUBLASLT_MATMUL_DESC_EPILOGUE: { uint32_t v; if (get_attr(&v, buf, n)) return CUBLAS_STATUS_INVALID_VALUE; d->epi = (cublasLtEpilogue_t)v; break; }
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return get_attr(&d->bias, buf, n);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: { int32_t v; if (get_attr(&v, buf, n)) return CUBLAS_STATUS_INVALID_VALUE; d->bias_type = v; break; }
    default: return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
    if (!type_size(type)) return CUBLAS_STATUS_INVALID_VALUE;
    /* cuBLASLt: ld >= rows (its minimum for a one-row matrix is 1) */
    if (ld < (int64_t)(rows > 1 ? rows : 1)) {
        report("cublasLtMatrixLayoutCreate: ld %lld below the %llu rows", (long long)ld, (unsigned long long)rows);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *l = new nemo_emu_lt_layout{type, rows, cols, ld, 1, 0};
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return CUBLAS_STATUS_SUCCESS; }
EXPORT cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t a,
                                                       const void *buf, size_t n) {
    if (a == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT) return get_attr(&l->batch, buf, n);
    if (a == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET) return get_attr(&l->stride, buf, n);
    return CUBLAS_STATUS_INVALID_VALUE;
}
EXPORT cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new nemo_emu_lt_pref{0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete p; return CUBLAS_STATUS_SUCCESS; }
EXPORT cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t a, const void *buf, size_t n) {
    switch (a) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return get_attr(&p->ws, buf, n);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return get_attr(&p->align[0], buf, n);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return get_attr(&p->align[1], buf, n);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return get_attr(&p->align[2], buf, n);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return get_attr(&p->align[3], buf, n);
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

/* The checks cuBLASLt makes of a problem: sizes that agree, types it supports. */
static cublasStatus_t lt_check(const char *fn, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                               cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl) {
    const uint64_t m = d->ta == CUBLAS_OP_N ? a->rows : a->cols, ka = d->ta == CUBLAS_OP_N ? a->cols : a->rows;
    const uint64_t kb = d->tb == CUBLAS_OP_N ? b->rows : b->cols, n = d->tb == CUBLAS_OP_N ? b->cols : b->rows;
    if (ka != kb || c->rows != m || c->cols != n || dl->rows != m || dl->cols != n) {
        report("%s: op(A) is %llu x %llu, op(B) %llu x %llu, C %llu x %llu, D %llu x %llu: the sizes do not agree", fn,
               (unsigned long long)m, (unsigned long long)ka, (unsigned long long)kb, (unsigned long long)n,
               (unsigned long long)c->rows, (unsigned long long)c->cols, (unsigned long long)dl->rows,
               (unsigned long long)dl->cols);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (a->batch != b->batch || a->batch != c->batch || a->batch != dl->batch || a->batch < 1) {
        report("%s: batch counts %d, %d, %d, %d differ", fn, a->batch, b->batch, c->batch, dl->batch);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (c->type != dl->type || a->type != b->type) {
        report("%s: A / B or C / D types differ", fn);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    bool ok;
    if (d->compute == CUBLAS_COMPUTE_64F) ok = a->type == CUDA_R_64F && c->type == CUDA_R_64F;
    else if (a->type == CUDA_R_32F) ok = c->type == CUDA_R_32F;
    else ok = (a->type == CUDA_R_16BF || a->type == CUDA_R_16F) && (c->type == a->type || c->type == CUDA_R_32F);
    if (!ok) { report("%s: type combination not supported", fn); return CUBLAS_STATUS_NOT_SUPPORTED; }
    if (d->epi != CUBLASLT_EPILOGUE_DEFAULT && d->epi != CUBLASLT_EPILOGUE_BIAS) return CUBLAS_STATUS_NOT_SUPPORTED;
    /* cuBLASLt: "bias vector elements are the same type as the elements of the output matrix
     * (Dtype)", with exceptions for integer and FP8 kernels only */
    if (d->epi == CUBLASLT_EPILOGUE_BIAS && d->bias_type != -1 && d->bias_type != (int)c->type) {
        report("%s: bias type %d is not D's type %d", fn, d->bias_type, (int)c->type);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a,
                                                     cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                                     cublasLtMatrixLayout_t dl, cublasLtMatmulPreference_t p,
                                                     int requested, cublasLtMatmulHeuristicResult_t *res, int *nres) {
    (void)h;
    *nres = 0;
    if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    cublasStatus_t s = lt_check("cublasLtMatmulAlgoGetHeuristic", d, a, b, c, dl);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    memset(res, 0, sizeof *res);
    for (int i = 0; i < 4; i++) {
        if (!p->align[i] || (p->align[i] & (p->align[i] - 1))) return CUBLAS_STATUS_INVALID_VALUE;
        res->algo.data[i] = p->align[i];   /* the algorithm relies on these alignments */
    }
    res->algo.data[7] = 0x6e656d6f;   /* marks an algorithm from this heuristic */
    res->state = CUBLAS_STATUS_SUCCESS;
    res->wavesCount = 1;
    *nres = 1;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                                     cublasLtMatrixLayout_t al, const void *B, cublasLtMatrixLayout_t bl, const void *beta,
                                     const void *C, cublasLtMatrixLayout_t cl, void *D, cublasLtMatrixLayout_t dl,
                                     const cublasLtMatmulAlgo_t *algo, void *ws, size_t wsn, cudaStream_t st) {
    static const char fn[] = "cublasLtMatmul";
    (void)ws;
    (void)wsn;
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t s = lt_check(fn, d, al, bl, cl, dl);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!algo || algo->data[7] != 0x6e656d6f) { report("%s: no algorithm from cublasLtMatmulAlgoGetHeuristic", fn); return CUBLAS_STATUS_INVALID_VALUE; }
    if (!stream_ok(fn, st) || h->dev != cur_dev) {
        report("%s: handle of device %d used on device %d", fn, h->dev, cur_dev);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    const void *ptr[4] = {A, B, C, D};
    const cublasLtMatrixLayout_t lay[4] = {al, bl, cl, dl};
    static const char *names[4] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++) {
        if ((uintptr_t)ptr[i] % algo->data[i]) {
            report("%s: %s at %p is not aligned to the %llu bytes the algorithm was chosen for", fn, names[i], ptr[i],
                   (unsigned long long)algo->data[i]);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
        const cublasLtMatrixLayout_t l = lay[i];
        const int64_t per = (int64_t)(algo->data[i] / (uint64_t)type_size(l->type));   /* elements per alignment */
        if (l->batch > 1 && per > 1 && l->stride % per) {
            report("%s: the batch stride of %s breaks the %llu-byte alignment", fn, names[i], (unsigned long long)algo->data[i]);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
        for (int32_t q = 0; q < l->batch; q++)
            if (!operand_ok(fn, names[i], (const char *)ptr[i] + q * l->stride * type_size(l->type), (int64_t)l->rows,
                            (int64_t)l->cols, l->ld, l->type))
                return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    const uint64_t m = dl->rows, n = dl->cols, k = d->ta == CUBLAS_OP_N ? al->cols : al->rows;
    const bool bias = d->epi == CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t biast = d->bias_type < 0 ? dl->type : (cudaDataType_t)d->bias_type;
    if (bias && (!d->bias || !is_device(d->bias, m * (size_t)type_size(biast)))) {
        report("%s: the bias (%llu elements) is not inside one device allocation", fn, (unsigned long long)m);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    /* queued on st: the descriptor and layouts as they are now, alpha and beta read now */
    const nemo_emu_lt_desc dd = *d;
    const nemo_emu_lt_layout A_ = *al, B_ = *bl, C_ = *cl, D_ = *dl;
    const double a_ = scalar(alpha, d->compute), b_ = scalar(beta, d->compute);
    const cudaError_t e = no_exec() ? submit(st, []() { return cudaSuccess; }) : submit(st, [=]() {
        for (int32_t q = 0; q < D_.batch; q++) {
            const char *Aq = (const char *)A + q * A_.stride * type_size(A_.type);
            const char *Bq = (const char *)B + q * B_.stride * type_size(B_.type);
            const char *Cq = (const char *)C + q * C_.stride * type_size(C_.type);
            char *Dq = (char *)D + q * D_.stride * type_size(D_.type);
            if (dd.compute == CUBLAS_COMPUTE_64F)
                product<double>(dd.ta == CUBLAS_OP_T, dd.tb == CUBLAS_OP_T, m, n, k, a_, Aq, A_.type, A_.ld, Bq, B_.type,
                                B_.ld, b_, Cq, C_.type, C_.ld, Dq, D_.type, D_.ld, bias ? dd.bias : NULL, biast);
            else
                product<float>(dd.ta == CUBLAS_OP_T, dd.tb == CUBLAS_OP_T, m, n, k, a_, Aq, A_.type, A_.ld, Bq, B_.type,
                               B_.ld, b_, Cq, C_.type, C_.ld, Dq, D_.type, D_.ld, bias ? dd.bias : NULL, biast);
        }
        return cudaSuccess;
    });
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
