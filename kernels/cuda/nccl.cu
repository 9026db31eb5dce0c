/*
 * kernels/cuda/nccl.cu: the NCCL backend of libnemo's collectives (contract: engine/coll_nccl.h).
 * engine/coll.c finds the table through libnemo's kernel registry ("coll.nccl", NEMO_CUDA),
 * bootstraps a communicator by broadcasting ncclGetUniqueId's bytes over MPI, and polls query()
 * against its deadline, as it does for MPI.
 *
 * Non-obvious rules:
 * - NCCL's functions are declared weak here: the plugin loads (and CUDA kernels work) even when
 *   it was linked without -lnccl; version() then fails with "built without NCCL" and libnemo
 *   reports the nccl backend unavailable. With -lnccl they resolve to the real library.
 * - Collectives run on the device's stream (nemo_cuda_stream) and record an event there;
 *   query() reports the event and NCCL's asynchronous error (ncclCommGetAsyncError), so a
 *   failed peer shows up as an error instead of an event that never completes.
 * - bfloat16 and float16 reduce natively in NCCL (AVG is ncclAvg, NCCL >= 2.10).
 * - all_to_all is one group (ncclGroupStart / ncclGroupEnd) of an ncclSend and an ncclRecv with
 *   every rank, itself included (NCCL has no all-to-all collective; ncclSend / ncclRecv need
 *   NCCL >= 2.7, below the 2.10 version() requires). A failed call inside the group still ends
 *   the group, so the thread is not left inside one.
 */
#include <stdarg.h>
#include <stdio.h>
#include <nccl.h>

#include "common.cuh"
extern "C" {
#include "coll_nccl.h"
}

#pragma weak ncclGetVersion
#pragma weak ncclGetUniqueId
#pragma weak ncclCommInitRank
#pragma weak ncclCommDestroy
#pragma weak ncclCommAbort
#pragma weak ncclCommGetAsyncError
#pragma weak ncclGetErrorString
#pragma weak ncclAllReduce
#pragma weak ncclReduceScatter
#pragma weak ncclAllGather
#pragma weak ncclBroadcast
#pragma weak ncclCommCount
#pragma weak ncclGroupStart
#pragma weak ncclGroupEnd
#pragma weak ncclSend
#pragma weak ncclRecv

static thread_local char nccl_err[768] = "no NCCL error";

static int nccl_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(nccl_err, sizeof nccl_err, fmt, ap);
    va_end(ap);
    return code;
}

static const char *n_error_text(void) { return nccl_err; }

static int linked(void) { return ncclGetVersion != NULL && ncclAllReduce != NULL; }

#define NCCL_TRY(call, what) do {                                                            \
        ncclResult_t r_ = (call);                                                              \
        if (r_ != ncclSuccess)                                                                 \
            return nccl_error(NEMO_ECOMM, "%s: %s (ncclResult %d)", what, ncclGetErrorString(r_), (int)r_); \
    } while (0)

static int n_version(int *code) {
    *code = 0;
    if (!linked())
        return nccl_error(NEMO_EUNSUPPORTED, "libnemo_cuda.so was built without NCCL (link it with -lnccl; "
                          "headers were NCCL %d)", NCCL_VERSION_CODE);
    NCCL_TRY(ncclGetVersion(code), "ncclGetVersion");
    if (*code < 21000)
        return nccl_error(NEMO_EUNSUPPORTED, "NCCL %d is too old: bfloat16 and avg need NCCL >= 2.10", *code);
    return 0;
}

static int n_get_unique_id(void *id) {
    static_assert(sizeof(ncclUniqueId) == NEMO_NCCL_ID_BYTES, "ncclUniqueId size");
    ncclUniqueId u;
    NCCL_TRY(ncclGetUniqueId(&u), "ncclGetUniqueId");
    memcpy(id, &u, sizeof u);
    return 0;
}

static int n_comm_init(void **comm, int nranks, const void *id, int rank, int dev) {
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    ncclComm_t c = NULL;
    char what[96];
    snprintf(what, sizeof what, "ncclCommInitRank(rank %d of %d, cuda:%d)", rank, nranks, dev);
    NCCL_TRY(ncclCommInitRank(&c, nranks, u, rank), what);
    *comm = c;
    return 0;
}

static int n_comm_destroy(void *comm) {
    if (comm) NCCL_TRY(ncclCommDestroy((ncclComm_t)comm), "ncclCommDestroy");
    return 0;
}

static int n_comm_abort(void *comm) {
    if (comm) NCCL_TRY(ncclCommAbort((ncclComm_t)comm), "ncclCommAbort");
    return 0;
}

static int nccl_dtype(int dtype, ncclDataType_t *out) {
    switch (dtype) {
    case NEMO_F32: *out = ncclFloat32; return 0;
    case NEMO_F64: *out = ncclFloat64; return 0;
    case NEMO_BF16: *out = ncclBfloat16; return 0;
    case NEMO_F16: *out = ncclFloat16; return 0;
    case NEMO_I64: *out = ncclInt64; return 0;
    case NEMO_I32: *out = ncclInt32; return 0;
    case NEMO_BOOL: *out = ncclUint8; return 0;
    default: return nccl_error(NEMO_EDTYPE, "nccl: no NCCL type for dtype %d", dtype);
    }
}

static ncclRedOp_t nccl_op(int op) {
    switch (op) {
    case 1: return ncclAvg;
    case 2: return ncclMax;
    case 3: return ncclMin;
    default: return ncclSum;
    }
}

/* An event recorded on the stream after the collective. */
static int record(int dev, void **event) {
    cudaEvent_t ev;
    NEMO_CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate on cuda:%d", dev);
    cudaError_t e = cudaEventRecord(ev, nemo_cuda_stream(dev));
    if (e != cudaSuccess) {
        cudaEventDestroy(ev);
        return nccl_error(NEMO_ECUDA, "cudaEventRecord on cuda:%d: %s", dev, cudaGetErrorString(e));
    }
    *event = ev;
    return 0;
}

static int n_all_reduce(void *comm, const void *send, void *recv, size_t count, int dtype, int op, int dev,
                        void **event) {
    ncclDataType_t t = ncclFloat32;
    if (nccl_dtype(dtype, &t) < 0) return NEMO_EDTYPE;
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    NCCL_TRY(ncclAllReduce(send, recv, count, t, nccl_op(op), (ncclComm_t)comm, nemo_cuda_stream(dev)),
             "ncclAllReduce");
    return record(dev, event);
}

static int n_reduce_scatter(void *comm, const void *send, void *recv, size_t recvcount, int dtype, int op, int dev,
                            void **event) {
    ncclDataType_t t = ncclFloat32;
    if (nccl_dtype(dtype, &t) < 0) return NEMO_EDTYPE;
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    NCCL_TRY(ncclReduceScatter(send, recv, recvcount, t, nccl_op(op), (ncclComm_t)comm, nemo_cuda_stream(dev)),
             "ncclReduceScatter");
    return record(dev, event);
}

static int n_all_gather(void *comm, const void *send, void *recv, size_t sendcount, int dtype, int dev,
                        void **event) {
    ncclDataType_t t = ncclFloat32;
    if (nccl_dtype(dtype, &t) < 0) return NEMO_EDTYPE;
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    NCCL_TRY(ncclAllGather(send, recv, sendcount, t, (ncclComm_t)comm, nemo_cuda_stream(dev)), "ncclAllGather");
    return record(dev, event);
}

static int n_broadcast(void *comm, void *buf, size_t count, int dtype, int root, int dev, void **event) {
    ncclDataType_t t = ncclFloat32;
    if (nccl_dtype(dtype, &t) < 0) return NEMO_EDTYPE;
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    NCCL_TRY(ncclBroadcast(buf, buf, count, t, root, (ncclComm_t)comm, nemo_cuda_stream(dev)), "ncclBroadcast");
    return record(dev, event);
}

static int n_all_to_all(void *comm, const void *send, void *recv, size_t count_per_rank, int dtype, int dev,
                        void **event) {
    ncclDataType_t t = ncclFloat32;
    if (nccl_dtype(dtype, &t) < 0) return NEMO_EDTYPE;
    NEMO_CUDA_TRY(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
    int nranks = 0;
    NCCL_TRY(ncclCommCount((ncclComm_t)comm, &nranks), "ncclCommCount");
    const size_t block = count_per_rank * (size_t)nemo_cuda_dtype_size(dtype);
    cudaStream_t st = nemo_cuda_stream(dev);
    NCCL_TRY(ncclGroupStart(), "ncclGroupStart");
    ncclResult_t r = ncclSuccess;
    const char *what = "ncclSend";
    for (int p = 0; p < nranks && r == ncclSuccess; p++) {
        what = "ncclSend";
        r = ncclSend((const char *)send + (size_t)p * block, count_per_rank, t, p, (ncclComm_t)comm, st);
        if (r != ncclSuccess) break;
        what = "ncclRecv";
        r = ncclRecv((char *)recv + (size_t)p * block, count_per_rank, t, p, (ncclComm_t)comm, st);
    }
    ncclResult_t e = ncclGroupEnd();   /* always: the group must be closed */
    if (r != ncclSuccess)
        return nccl_error(NEMO_ECOMM, "%s (all_to_all): %s (ncclResult %d)", what, ncclGetErrorString(r), (int)r);
    NCCL_TRY(e, "ncclGroupEnd (all_to_all)");
    return record(dev, event);
}

static int n_query(void *comm, void *event) {
    ncclResult_t async = ncclSuccess;
    if (comm) NCCL_TRY(ncclCommGetAsyncError((ncclComm_t)comm, &async), "ncclCommGetAsyncError");
    if (async != ncclSuccess && async != ncclInProgress)
        return nccl_error(NEMO_ECOMM, "NCCL asynchronous error: %s", ncclGetErrorString(async));
    cudaError_t e = cudaEventQuery((cudaEvent_t)event);
    if (e == cudaSuccess) return 1;
    if (e == cudaErrorNotReady) return 0;
    /* the stream failed: NCCL's own error, when it has one by now, says why */
    if (comm && ncclCommGetAsyncError((ncclComm_t)comm, &async) == ncclSuccess && async != ncclSuccess &&
        async != ncclInProgress)
        return nccl_error(NEMO_ECOMM, "NCCL asynchronous error: %s (then cudaEventQuery: %s)", ncclGetErrorString(async),
                          cudaGetErrorString(e));
    return nccl_error(NEMO_ECUDA, "cudaEventQuery: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
}

static void n_event_free(void *event) {
    if (event) cudaEventDestroy((cudaEvent_t)event);
}

static const nemo_nccl_table table = {
    NEMO_NCCL_ABI,
    n_error_text,
    n_version,
    n_get_unique_id,
    n_comm_init,
    n_comm_destroy,
    n_comm_abort,
    n_all_reduce,
    n_reduce_scatter,
    n_all_gather,
    n_broadcast,
    n_query,
    n_event_free,
    n_all_to_all,
};

static const nemo_nccl_table *nemo_nccl_get(void) { return &table; }
NEMO_CUDA_KERNEL("coll.nccl", nemo_nccl_get)
