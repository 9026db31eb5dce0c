/*
 * coll_nccl.h: the contract between engine/coll.c and the NCCL backend inside the CUDA plugin
 * (kernels/cuda/nccl.cu). The plugin registers a getter for this table in libnemo's kernel
 * registry under the name "coll.nccl" (device NEMO_CUDA), so no new plugin entry point is
 * needed: libnemo finds it once CUDA is loaded and a device exists.
 *
 * Every function returns 0 or a negative nemo_status; error_text() then holds NCCL's or CUDA's
 * own message. Collectives are enqueued on the device's stream and record an event; query()
 * reports 1 when the event has completed, 0 while it runs, < 0 on an asynchronous NCCL error
 * (ncclCommGetAsyncError). dtype is a nemo dtype; op is a nemo_coll_op.
 */
#ifndef NEMO_COLL_NCCL_H
#define NEMO_COLL_NCCL_H

#include <stddef.h>

#define NEMO_NCCL_ABI 2
#define NEMO_NCCL_ID_BYTES 128   /* sizeof(ncclUniqueId) */

typedef struct nemo_nccl_table {
    int abi;
    const char *(*error_text)(void);
    /* NCCL's version code (e.g. 22304), or < 0 when the plugin was linked without NCCL. */
    int (*version)(int *code);
    int (*get_unique_id)(void *id);                                  /* NEMO_NCCL_ID_BYTES */
    int (*comm_init)(void **comm, int nranks, const void *id, int rank, int dev);
    int (*comm_destroy)(void *comm);
    int (*comm_abort)(void *comm);
    int (*all_reduce)(void *comm, const void *send, void *recv, size_t count, int dtype, int op,
                      int dev, void **event);
    int (*reduce_scatter)(void *comm, const void *send, void *recv, size_t recvcount, int dtype,
                          int op, int dev, void **event);
    int (*all_gather)(void *comm, const void *send, void *recv, size_t sendcount, int dtype,
                      int dev, void **event);
    int (*broadcast)(void *comm, void *buf, size_t count, int dtype, int root, int dev, void **event);
    int (*query)(void *comm, void *event);
    void (*event_free)(void *event);
    /* ABI 2: send holds nranks blocks of count_per_rank elements, block j for rank j; recv gets
     * rank i's block for this rank at block i (ncclSend / ncclRecv to and from every rank, in a
     * group). */
    int (*all_to_all)(void *comm, const void *send, void *recv, size_t count_per_rank, int dtype, int dev,
                      void **event);
} nemo_nccl_table;

/* The registry entry "coll.nccl" is a function of this type. */
typedef const nemo_nccl_table *(*nemo_nccl_get_fn)(void);

#endif
