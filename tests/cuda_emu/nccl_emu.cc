/*
 * tests/cuda_emu/nccl_emu.cc: NCCL for the CUDA emulator, so that kernels/cuda/nccl.cu (the nccl
 * backend of libnemo's collectives) runs in CI: the ranks are processes (mpirun), each with its
 * own emulator, and a communicator is a POSIX shared-memory header that they all map.
 *
 * - ncclGetUniqueId names a shared-memory object; ncclCommInitRank maps it (creating it if it is
 *   not there yet, so the ranks may arrive in any order); the last rank to map it removes the
 *   name.
 * - A collective is queued on its stream like any device work (emu.cc's deferred execution) and
 *   runs when that stream runs. Then each rank writes what it sends into an object of its own
 *   (<id>.<k>.<rank> for the communicator's k-th collective) and its descriptor (operation,
 *   type, count, reduction, root) into the header, waits until every rank has (a barrier on a
 *   shared counter), checks that they all issued the same collective, computes its result from
 *   the others' objects in rank order (reductions in float for float16 / bfloat16 / float32,
 *   rounded once; in double for float64; in 64-bit integers for integers), waits for every rank
 *   again and removes its object.
 * - A rank that never arrives (dead, or issued something else) ends the wait after
 *   NEMO_EMU_NCCL_TIMEOUT seconds (default 300) with a message; the communicator's asynchronous
 *   error (ncclCommGetAsyncError) is then ncclSystemError, as a real NCCL reports a failed peer.
 *   Different collectives on the ranks are ncclInvalidUsage.
 * - Point-to-point: the ncclSend / ncclRecv calls between ncclGroupStart and ncclGroupEnd (or one
 *   such call outside a group) become one step of the communicator, queued on their stream at
 *   ncclGroupEnd and counted like a collective. Each rank writes every send into an object of
 *   its own (<id>.<k>.<from>.<to>.<j> for its j-th send to that rank in the step, with the type
 *   and count in front), waits for every rank, then fills each receive from the matching object
 *   of its peer (the j-th receive from a rank takes that rank's j-th send to it), and checks
 *   that types and counts agree and that no send to it went unreceived (ncclInvalidUsage
 *   otherwise, with a message). Unlike NCCL, every rank of the communicator must take part in
 *   the step (a group with nothing for a rank still needs that rank to issue a group), which
 *   holds for all-to-all; and the sends and receives of a group must use one communicator and
 *   one stream. Collectives issued inside a group are queued at once, not aggregated.
 * A collective runs only when its stream is made to run on that rank: on a GPU it would run
 * without the host. A program whose ranks wait for each other on the host while one of them
 * synchronizes a stream with a collective queued could block here where a GPU would not; the
 * timeout names it.
 */
#include <atomic>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "nccl.h"

#define EXPORT __attribute__((visibility("default")))
#define NMAX 64

enum { C_ALLREDUCE, C_REDUCESCATTER, C_ALLGATHER, C_BROADCAST, C_P2P, C_NKINDS };
static const char *coll_name[C_NKINDS] = {"ncclAllReduce", "ncclReduceScatter", "ncclAllGather", "ncclBroadcast",
                                          "ncclSend/ncclRecv group"};

struct desc { uint64_t k; int32_t op, type, redop, root; uint64_t count; };
struct header {
    std::atomic<uint64_t> joined;    /* ranks that mapped it: the last one removes its name */
    std::atomic<uint64_t> arrived;   /* barrier count: every rank adds 1 per barrier */
    desc slot[NMAX];
};
struct ncclComm {
    std::string name;
    int n, rank;
    header *h;
    uint64_t k;          /* collectives run so far */
    uint64_t barriers;   /* barriers passed so far */
    std::atomic<int> async;
};

using nemo_emu::report;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

EXPORT ncclResult_t ncclGetVersion(int *v) { *v = NCCL_VERSION_CODE; return ncclSuccess; }
EXPORT const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error (a peer did not arrive: see the emulator's message)";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage (the ranks issued different collectives)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    }
    return "unknown result code";
}
EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static unsigned counter;
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "/nemo-emu-nccl.%d.%lld.%u", (int)getpid(),
             (long long)(now_s() * 1e6), counter++);
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommInitRank(ncclComm_t *c, int n, ncclUniqueId id, int rank) {
    *c = NULL;
    if (n < 1 || n > NMAX || rank < 0 || rank >= n) {
        report("ncclCommInitRank: rank %d of %d (the emulator takes 1 to %d ranks)", rank, n, NMAX);
        return ncclInvalidArgument;
    }
    if (id.internal[0] != '/' || !memchr(id.internal, 0, sizeof id.internal)) {
        report("ncclCommInitRank: the unique id is not one ncclGetUniqueId made");
        return ncclInvalidArgument;
    }
    int fd = shm_open(id.internal, O_CREAT | O_RDWR, 0600);
    if (fd < 0) { report("ncclCommInitRank: shm_open(%s): %s", id.internal, strerror(errno)); return ncclSystemError; }
    if (ftruncate(fd, sizeof(header)) != 0) { close(fd); return ncclSystemError; }   /* same size: no change */
    void *m = mmap(NULL, sizeof(header), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return ncclSystemError;
    ncclComm *cm = new ncclComm;
    cm->name = id.internal;
    cm->n = n;
    cm->rank = rank;
    cm->h = (header *)m;
    cm->k = cm->barriers = 0;
    cm->async = ncclSuccess;
    /* once every rank has it mapped the name is not needed: removing it then leaves nothing
     * behind in /dev/shm, even when a process ends without ncclCommDestroy */
    if (cm->h->joined.fetch_add(1) + 1 == (uint64_t)n) shm_unlink(id.internal);
    *c = cm;
    return ncclSuccess;
}
static ncclResult_t comm_end(ncclComm_t c) {
    if (!c) return ncclInvalidArgument;
    munmap(c->h, sizeof(header));
    delete c;
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommDestroy(ncclComm_t c) { return comm_end(c); }
EXPORT ncclResult_t ncclCommAbort(ncclComm_t c) { return comm_end(c); }
EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *e) {
    if (!c) return ncclInvalidArgument;
    *e = (ncclResult_t)c->async.load();
    return ncclSuccess;
}

static size_t type_size(int t) {
    switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    default: return 8;
    }
}
static bool is_float(int t) { return t == ncclFloat16 || t == ncclBfloat16 || t == ncclFloat32 || t == ncclFloat64; }
static double load(const void *p, size_t i, int t) {
    switch (t) {
    case ncclInt8: return ((const int8_t *)p)[i];
    case ncclUint8: return ((const uint8_t *)p)[i];
    case ncclInt32: return ((const int32_t *)p)[i];
    case ncclUint32: return ((const uint32_t *)p)[i];
    case ncclFloat32: return ((const float *)p)[i];
    case ncclFloat64: return ((const double *)p)[i];
    case ncclBfloat16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    case ncclFloat16: return __half2float(((const __half *)p)[i]);
    default: return 0;
    }
}
static int64_t load_i(const void *p, size_t i, int t) {
    if (t == ncclInt64) return ((const int64_t *)p)[i];
    if (t == ncclUint64) return (int64_t)((const uint64_t *)p)[i];
    return (int64_t)load(p, i, t);
}
static void store(void *p, size_t i, int t, double v, int64_t iv) {
    switch (t) {
    case ncclInt8: ((int8_t *)p)[i] = (int8_t)iv; break;
    case ncclUint8: ((uint8_t *)p)[i] = (uint8_t)iv; break;
    case ncclInt32: ((int32_t *)p)[i] = (int32_t)iv; break;
    case ncclUint32: ((uint32_t *)p)[i] = (uint32_t)iv; break;
    case ncclInt64: ((int64_t *)p)[i] = iv; break;
    case ncclUint64: ((uint64_t *)p)[i] = (uint64_t)iv; break;
    case ncclFloat32: ((float *)p)[i] = (float)v; break;
    case ncclFloat64: ((double *)p)[i] = v; break;
    case ncclBfloat16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
    case ncclFloat16: ((__half *)p)[i] = __float2half_rn((float)v); break;
    }
}

template <class T> static T reduce(T a, T b, int redop) {
    switch (redop) {
    case ncclProd: return a * b;
    case ncclMax: return a > b ? a : b;
    case ncclMin: return a < b ? a : b;
    default: return a + b;   /* sum, and avg before its division */
    }
}

/* Every rank reached this point (the communicator's next barrier), or false after the timeout. */
static bool barrier(ncclComm *c, const char *what) {
    const uint64_t target = (uint64_t)c->n * ++c->barriers;
    c->h->arrived.fetch_add(1);
    static double limit = -1;
    if (limit < 0) {
        const char *e = getenv("NEMO_EMU_NCCL_TIMEOUT");
        limit = e && *e ? atof(e) : 300;
    }
    const double t0 = now_s();
    for (unsigned spins = 0; c->h->arrived.load() < target; spins++) {
        if (spins > 1000) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
            if (now_s() - t0 > limit) {
                report("%s on rank %d of %d: the other ranks did not arrive within %g s (NEMO_EMU_NCCL_TIMEOUT): one "
                       "died, issued a different collective, or waits on the host for this one (the emulator runs a "
                       "collective only when its stream runs)", what, c->rank, c->n, limit);
                c->async = ncclSystemError;
                return false;
            }
        }
    }
    return true;
}

/* One rank's part of a collective, run when its stream runs. */
static cudaError_t run(ncclComm *c, int op, const void *send, void *recv, size_t count, int type, int redop, int root) {
    if (c->async.load() != ncclSuccess) return cudaErrorLaunchFailure;
    const uint64_t k = c->k++;
    const size_t es = type_size(type), n = (size_t)c->n;
    size_t sbytes = count * es;   /* what this rank sends */
    if (op == C_REDUCESCATTER) sbytes *= n;
    if (op == C_BROADCAST && c->rank != root) sbytes = 0;
    char mine[160];
    snprintf(mine, sizeof mine, "%s.%llu.%d", c->name.c_str(), (unsigned long long)k, c->rank);
    int fd = shm_open(mine, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) { report("%s: shm_open(%s): %s", coll_name[op], mine, strerror(errno)); return cudaErrorLaunchFailure; }
    bool ok = sbytes == 0 || ftruncate(fd, (off_t)sbytes) == 0;
    if (ok && sbytes) {
        void *m = mmap(NULL, sbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ok = m != MAP_FAILED;
        if (ok) { memcpy(m, send, sbytes); munmap(m, sbytes); }
    }
    close(fd);
    if (!ok) { shm_unlink(mine); report("%s: writing %zu bytes to shared memory failed", coll_name[op], sbytes); return cudaErrorLaunchFailure; }
    c->h->slot[c->rank] = desc{k, op, type, redop, root, count};
    cudaError_t err = cudaSuccess;
    std::vector<const char *> peer(n, NULL);
    std::vector<size_t> plen(n, 0);
    if (!barrier(c, coll_name[op])) { shm_unlink(mine); return cudaErrorLaunchFailure; }
    for (size_t r = 0; r < n && err == cudaSuccess; r++) {
        const desc &d = c->h->slot[r];
        if (d.k != k || d.op != op || d.type != type || d.count != count || (op != C_ALLGATHER && d.redop != redop) ||
            (op == C_BROADCAST && d.root != root)) {
            report("%s (collective %llu of the communicator, %zu elements) on rank %d: rank %zu issued %s (collective "
                   "%llu, %llu elements, type %d): the ranks must issue the same collectives in the same order",
                   coll_name[op], (unsigned long long)k, count, c->rank, r, d.op >= 0 && d.op < C_NKINDS ? coll_name[d.op] : "?",
                   (unsigned long long)d.k, (unsigned long long)d.count, d.type);
            c->async = ncclInvalidUsage;
            err = cudaErrorLaunchFailure;
            break;
        }
        const size_t bytes = op == C_BROADCAST ? (r == (size_t)root ? count * es : 0)
                                               : count * es * (op == C_REDUCESCATTER ? n : 1);
        if (!bytes) continue;
        char name[160];
        snprintf(name, sizeof name, "%s.%llu.%zu", c->name.c_str(), (unsigned long long)k, r);
        int pfd = shm_open(name, O_RDONLY, 0);
        void *m = pfd < 0 ? MAP_FAILED : mmap(NULL, bytes, PROT_READ, MAP_SHARED, pfd, 0);
        if (pfd >= 0) close(pfd);
        if (m == MAP_FAILED) { report("%s: rank %zu's data (%s) is not readable", coll_name[op], r, name); err = cudaErrorLaunchFailure; break; }
        peer[r] = (const char *)m;
        plen[r] = bytes;
    }
    if (err == cudaSuccess) {
        if (op == C_ALLGATHER) {
            for (size_t r = 0; r < n; r++) memcpy((char *)recv + r * count * es, peer[r], count * es);
        } else if (op == C_BROADCAST) {
            memcpy(recv, peer[root], count * es);
        } else {
            const size_t off = op == C_REDUCESCATTER ? (size_t)c->rank * count : 0;
            for (size_t i = 0; i < count; i++) {
                double v = 0;   /* float64 in double; the other float types in float, as NCCL's kernels */
                float f = 0;
                int64_t iv = 0;
                for (size_t r = 0; r < n; r++) {
                    if (type == ncclFloat64) v = r ? reduce(v, load(peer[r], off + i, type), redop) : load(peer[r], off + i, type);
                    else if (is_float(type)) f = r ? reduce(f, (float)load(peer[r], off + i, type), redop) : (float)load(peer[r], off + i, type);
                    else iv = r ? reduce(iv, load_i(peer[r], off + i, type), redop) : load_i(peer[r], off + i, type);
                }
                if (redop == ncclAvg) { v /= (double)n; f /= (float)n; iv /= (int64_t)n; }
                store(recv, i, type, type == ncclFloat64 ? v : (double)f, iv);
            }
        }
    }
    for (size_t r = 0; r < n; r++)
        if (peer[r]) munmap((void *)peer[r], plen[r]);
    const bool ok2 = barrier(c, coll_name[op]);   /* nobody reads this rank's object any more */
    shm_unlink(mine);
    return err == cudaSuccess && ok2 ? cudaSuccess : cudaErrorLaunchFailure;
}

static ncclResult_t submit(int op, const void *send, void *recv, size_t count, ncclDataType_t t, ncclRedOp_t redop,
                           int root, ncclComm_t c, cudaStream_t st) {
    if (!c) return ncclInvalidArgument;
    if ((int)t < 0 || (int)t > ncclBfloat16 || (int)redop < 0 || (int)redop > ncclAvg || root < 0 || root >= c->n) {
        report("%s: type %d, reduction %d, root %d: not valid", coll_name[op], (int)t, (int)redop, root);
        return ncclInvalidArgument;
    }
    if (c->async.load() != ncclSuccess) return (ncclResult_t)c->async.load();
    if (nemo_emu::enqueue(st, coll_name[op], [=]() { return run(c, op, send, recv, count, (int)t, (int)redop, root); }) !=
        cudaSuccess)
        return ncclUnhandledCudaError;
    return ncclSuccess;
}
EXPORT ncclResult_t ncclAllReduce(const void *s, void *r, size_t n, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c,
                                  cudaStream_t st) {
    return submit(C_ALLREDUCE, s, r, n, t, op, 0, c, st);
}
EXPORT ncclResult_t ncclReduceScatter(const void *s, void *r, size_t n, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c,
                                      cudaStream_t st) {
    return submit(C_REDUCESCATTER, s, r, n, t, op, 0, c, st);
}
EXPORT ncclResult_t ncclAllGather(const void *s, void *r, size_t n, ncclDataType_t t, ncclComm_t c, cudaStream_t st) {
    return submit(C_ALLGATHER, s, r, n, t, ncclSum, 0, c, st);
}
EXPORT ncclResult_t ncclBroadcast(const void *s, void *r, size_t n, ncclDataType_t t, int root, ncclComm_t c,
                                  cudaStream_t st) {
    return submit(C_BROADCAST, s, r, n, t, ncclSum, root, c, st);
}

EXPORT ncclResult_t ncclCommCount(const ncclComm_t c, int *count) {
    if (!c || !count) return ncclInvalidArgument;
    *count = c->n;
    return ncclSuccess;
}

/* ==== point-to-point: ncclSend / ncclRecv, grouped ==== */

struct p2p_op { bool send; const void *sbuf; void *rbuf; size_t count; int type; int peer; };
struct p2p_hdr { int32_t type, pad; uint64_t count; };   /* in front of each send's bytes */
struct p2p_group {
    int depth = 0;
    ncclComm *comm = NULL;
    cudaStream_t st = NULL;
    bool bad = false;            /* a call of the group failed: ncclGroupEnd drops it */
    std::vector<p2p_op> ops;
};
static thread_local p2p_group grp;

static std::string p2p_name(const ncclComm *c, uint64_t k, int from, int to, int j) {
    char b[192];
    snprintf(b, sizeof b, "%s.%llu.%d.%d.%d", c->name.c_str(), (unsigned long long)k, from, to, j);
    return b;
}

/* One rank's part of a step of sends and receives, run when its stream runs. */
static cudaError_t run_p2p(ncclComm *c, const std::vector<p2p_op> &ops) {
    if (c->async.load() != ncclSuccess) return cudaErrorLaunchFailure;
    const char *what = coll_name[C_P2P];
    const uint64_t k = c->k++;
    const int n = c->n;
    std::vector<std::string> mine;
    std::vector<int> sent(n, 0), received(n, 0);
    bool ok = true;
    for (const p2p_op &o : ops) {
        if (!o.send || !ok) continue;
        const size_t bytes = o.count * type_size(o.type), len = sizeof(p2p_hdr) + bytes;
        std::string name = p2p_name(c, k, c->rank, o.peer, sent[o.peer]++);
        int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) { report("ncclSend: shm_open(%s): %s", name.c_str(), strerror(errno)); ok = false; break; }
        mine.push_back(name);
        void *m = ftruncate(fd, (off_t)len) == 0 ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
        close(fd);
        if (m == MAP_FAILED) { report("ncclSend: writing %zu bytes to shared memory failed", len); ok = false; break; }
        p2p_hdr h = {o.type, 0, (uint64_t)o.count};
        memcpy(m, &h, sizeof h);
        if (bytes) memcpy((char *)m + sizeof h, o.sbuf, bytes);
        munmap(m, len);
    }
    c->h->slot[c->rank] = desc{k, ok ? C_P2P : -1, 0, 0, 0, (uint64_t)ops.size()};
    cudaError_t err = ok ? cudaSuccess : cudaErrorLaunchFailure;
    if (!barrier(c, what)) {
        for (const std::string &m : mine) shm_unlink(m.c_str());
        return cudaErrorLaunchFailure;
    }
    for (int r = 0; r < n && err == cudaSuccess; r++) {
        const desc &d = c->h->slot[r];
        if (d.k != k || d.op != C_P2P) {
            report("%s (step %llu of the communicator) on rank %d: rank %d issued %s (step %llu): the ranks must issue "
                   "the same collectives in the same order", what, (unsigned long long)k, c->rank, r,
                   d.op >= 0 && d.op < C_NKINDS ? coll_name[d.op] : "?", (unsigned long long)d.k);
            err = cudaErrorLaunchFailure;
        }
    }
    for (size_t i = 0; i < ops.size() && err == cudaSuccess; i++) {
        const p2p_op &o = ops[i];
        if (o.send) continue;
        std::string name = p2p_name(c, k, o.peer, c->rank, received[o.peer]++);
        int fd = shm_open(name.c_str(), O_RDONLY, 0);
        if (fd < 0) {
            report("ncclRecv of %zu elements from rank %d on rank %d: rank %d has no ncclSend to rank %d left to match it",
                   o.count, o.peer, c->rank, o.peer, c->rank);
            err = cudaErrorLaunchFailure;
            break;
        }
        struct stat sb;
        const size_t bytes = o.count * type_size(o.type), len = sizeof(p2p_hdr) + bytes;
        void *m = fstat(fd, &sb) == 0 && (size_t)sb.st_size >= sizeof(p2p_hdr)
                      ? mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        close(fd);
        if (m == MAP_FAILED) { report("ncclRecv: rank %d's data (%s) is not readable", o.peer, name.c_str()); err = cudaErrorLaunchFailure; break; }
        p2p_hdr h;
        memcpy(&h, m, sizeof h);
        if (h.type != o.type || h.count != (uint64_t)o.count || (size_t)sb.st_size != len) {
            report("ncclRecv of %zu elements of type %d from rank %d on rank %d: the matching ncclSend has %llu elements "
                   "of type %d", o.count, o.type, o.peer, c->rank, (unsigned long long)h.count, h.type);
            err = cudaErrorLaunchFailure;
        } else if (bytes) {
            memcpy(o.rbuf, (const char *)m + sizeof h, bytes);
        }
        munmap(m, (size_t)sb.st_size);
    }
    for (int p = 0; p < n && err == cudaSuccess; p++) {   /* a send to this rank that nothing received */
        std::string name = p2p_name(c, k, p, c->rank, received[p]);
        int fd = shm_open(name.c_str(), O_RDONLY, 0);
        if (fd >= 0) {
            close(fd);
            report("ncclSend from rank %d to rank %d (its send #%d to it in step %llu) has no matching ncclRecv on rank %d",
                   p, c->rank, received[p] + 1, (unsigned long long)k, c->rank);
            err = cudaErrorLaunchFailure;
        }
    }
    if (err != cudaSuccess) c->async = ncclInvalidUsage;
    const bool ok2 = barrier(c, what);   /* nobody reads this rank's objects any more */
    for (const std::string &m : mine) shm_unlink(m.c_str());
    return err == cudaSuccess && ok2 ? cudaSuccess : cudaErrorLaunchFailure;
}

static ncclResult_t submit_p2p(ncclComm *c, cudaStream_t st, std::vector<p2p_op> ops) {
    if (nemo_emu::enqueue(st, coll_name[C_P2P], [=]() { return run_p2p(c, ops); }) != cudaSuccess)
        return ncclUnhandledCudaError;
    return ncclSuccess;
}

static ncclResult_t add_p2p(const p2p_op &o, ncclComm_t c, cudaStream_t st) {
    const char *fn = o.send ? "ncclSend" : "ncclRecv";
    if (!c) { if (grp.depth) grp.bad = true; return ncclInvalidArgument; }
    if ((int)o.type < 0 || (int)o.type > ncclBfloat16 || o.peer < 0 || o.peer >= c->n) {
        report("%s: type %d, peer %d of %d ranks: not valid", fn, o.type, o.peer, c->n);
        if (grp.depth) grp.bad = true;
        return ncclInvalidArgument;
    }
    if (c->async.load() != ncclSuccess) { if (grp.depth) grp.bad = true; return (ncclResult_t)c->async.load(); }
    if (grp.depth == 0) return submit_p2p(c, st, std::vector<p2p_op>{o});
    if (!grp.ops.empty() && (grp.comm != c || grp.st != st)) {
        report("%s in a group: the emulator runs a group's sends and receives on one communicator and one stream", fn);
        grp.bad = true;
        return ncclInvalidUsage;
    }
    grp.comm = c;
    grp.st = st;
    grp.ops.push_back(o);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclGroupStart(void) { grp.depth++; return ncclSuccess; }
EXPORT ncclResult_t ncclGroupEnd(void) {
    if (grp.depth == 0) { report("ncclGroupEnd without ncclGroupStart"); return ncclInvalidUsage; }
    if (--grp.depth > 0) return ncclSuccess;
    std::vector<p2p_op> ops;
    ops.swap(grp.ops);
    const bool bad = grp.bad;
    grp.bad = false;
    if (bad) return ncclInvalidUsage;   /* a call of the group failed (and said why): nothing runs */
    if (ops.empty()) return ncclSuccess;
    return submit_p2p(grp.comm, grp.st, std::move(ops));
}
EXPORT ncclResult_t ncclSend(const void *s, size_t n, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t st) {
    return add_p2p(p2p_op{true, s, NULL, n, (int)t, peer}, c, st);
}
EXPORT ncclResult_t ncclRecv(void *r, size_t n, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t st) {
    return add_p2p(p2p_op{false, NULL, r, n, (int)t, peer}, c, st);
}
