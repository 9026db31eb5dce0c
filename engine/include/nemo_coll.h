/*
 * nemo_coll.h: collectives between processes (engine/coll.c): the process group, communicators
 * for device-mesh groups, and all_reduce / reduce_scatter / all_gather / all_to_all / broadcast /
 * barrier on tensors, blocking or asynchronous, with a deadline.
 *
 * Backends
 * - NEMO_COLL_MPI: Open MPI between CPU processes (and the bootstrap of NCCL). libmpi.so.40 is
 *   opened at run time (dlopen), never linked, so libnemo loads on machines without Open MPI;
 *   nemo_coll_mpi_available() says whether it can be used and why not.
 * - NEMO_COLL_SELF: one process, no MPI: every collective is the identity (all_gather,
 *   reduce_scatter and all_to_all copy), so single-process runs use the same code path.
 * - NCCL between GPUs comes from the CUDA plugin (kernels/cuda/nccl.cu): a communicator gets an
 *   NCCL communicator with nemo_comm_enable_nccl, and then CUDA tensors go through NCCL and CPU
 *   tensors through MPI.
 *
 * Conventions
 * - Tensors are contiguous. MPI moves CPU tensors; float32 and float64 reduce natively;
 *   bfloat16 and float16 are reduced in float32 (converted once in, rounded once out);
 *   int64 / int32 / bool reduce with SUM, MAX, MIN. AVG divides the sum by the group size.
 *   all_gather, all_to_all and broadcast copy bits, any dtype.
 * - Shapes: reduce_scatter's input holds size x the output's elements (rank r gets the r-th
 *   block); all_gather's output holds size x the input's elements, blocks in rank order;
 *   all_to_all's input and output hold the same number of elements N, a multiple of size:
 *   block j of the input (elements [j N/size, (j+1) N/size)) goes to rank j, and block i of
 *   the output is what rank i sent to this rank.
 * - Every rank of a communicator must issue the same collectives in the same order.
 * - Deadline: a wait that sees no completion within the timeout (nemo_coll_set_timeout) fails
 *   with NEMO_ECOMM and a message naming the operation, the group and the ranks; the process
 *   group is then marked failed, and the exit handler aborts the job (MPI_Abort) instead of
 *   waiting in MPI_Finalize for ranks that will never come.
 * - Errors carry MPI's or NCCL's own error string.
 */
#ifndef NEMO_COLL_H
#define NEMO_COLL_H

typedef struct nemo_comm nemo_comm;            /* the world or a group of it */
typedef struct nemo_coll_work nemo_coll_work;  /* a collective in flight */

typedef enum { NEMO_COLL_NONE = 0, NEMO_COLL_SELF = 1, NEMO_COLL_MPI = 2 } nemo_coll_backend_kind;
typedef enum { NEMO_COLL_SUM = 0, NEMO_COLL_AVG = 1, NEMO_COLL_MAX = 2, NEMO_COLL_MIN = 3 } nemo_coll_op;

/* ==== The process group ==== */
/* 1 when libmpi can be loaded (it is, once), 0 when not; the reason is then in
 * nemo_coll_mpi_reason() (borrowed; NULL when available). NEMO_MPI_LIB overrides the path. */
NEMO_API int nemo_coll_mpi_available(void);
NEMO_API const char *nemo_coll_mpi_reason(void);
/* Start the process group with a backend (MPI: MPI_Init_thread unless the program already
 * initialised MPI). timeout_s > 0 sets the deadline of every wait. Calling it again with the
 * same backend is a no-op; another backend is an error. */
NEMO_API int nemo_coll_init(int backend, double timeout_s);
NEMO_API int nemo_coll_backend(void);                 /* NEMO_COLL_NONE before init */
/* MPI's library version string, or "" before the MPI backend started (borrowed). */
NEMO_API const char *nemo_coll_library_version(void);
NEMO_API int nemo_coll_set_timeout(double timeout_s);
NEMO_API double nemo_coll_get_timeout(void);
/* 1 once a collective timed out or failed: the group cannot be used again. */
NEMO_API int nemo_coll_failed(void);
/* Leave the group: waits (with the deadline) until every rank arrives, then MPI_Finalize.
 * After a failure, or when a rank does not arrive, it aborts the job instead. Also runs from
 * an exit handler, so a script that ends without calling it still leaves MPI properly. */
NEMO_API int nemo_coll_finalize(void);
/* MPI_Abort on the world: ends every rank of the job (does nothing before init). */
NEMO_API void nemo_coll_abort(int code);

/* ==== Communicators ==== */
NEMO_API nemo_comm *nemo_comm_world(void);            /* borrowed; NULL before init */
NEMO_API int nemo_comm_rank(const nemo_comm *c);
NEMO_API int nemo_comm_size(const nemo_comm *c);
NEMO_API const char *nemo_comm_name(const nemo_comm *c);   /* borrowed */
/* A new communicator of the ranks of parent that pass the same color (>= 0), ordered by key:
 * MPI_Comm_split, so every rank of parent must call it. name labels errors ("dp_shard"). */
NEMO_API nemo_comm *nemo_comm_split(nemo_comm *parent, int color, int key, const char *name);
NEMO_API void nemo_comm_free(nemo_comm *c);           /* not the world; NULL is fine */
/* Attach an NCCL communicator for CUDA tensors on device dev (bootstrapped by an MPI
 * broadcast of the ncclUniqueId over c, so every rank of c must call it). NEMO_EUNSUPPORTED
 * with the reason when CUDA or NCCL is not available. */
NEMO_API int nemo_comm_enable_nccl(nemo_comm *c, int dev);
NEMO_API int nemo_comm_has_nccl(const nemo_comm *c);
/* Why the NCCL backend cannot be used here (borrowed), or NULL when it can. */
NEMO_API const char *nemo_coll_nccl_unavailable_reason(void);

/* ==== Collectives ==== */
/* Asynchronous: start the collective and return a work handle (NULL with an error). The
 * tensors must stay alive and untouched until the work completes (the work holds a
 * reference). Results are in place when test returns 1 or wait returns 0. */
NEMO_API nemo_coll_work *nemo_coll_all_reduce_async(nemo_comm *c, nemo_tensor *t, int op);
NEMO_API nemo_coll_work *nemo_coll_reduce_scatter_async(nemo_comm *c, nemo_tensor *out,
                                                        const nemo_tensor *in, int op);
NEMO_API nemo_coll_work *nemo_coll_all_gather_async(nemo_comm *c, nemo_tensor *out,
                                                    const nemo_tensor *in);
NEMO_API nemo_coll_work *nemo_coll_all_to_all_async(nemo_comm *c, nemo_tensor *out,
                                                    const nemo_tensor *in);
NEMO_API nemo_coll_work *nemo_coll_broadcast_async(nemo_comm *c, nemo_tensor *t, int root);
NEMO_API nemo_coll_work *nemo_coll_barrier_async(nemo_comm *c);
/* 1 done, 0 still running, < 0 failed. Drives MPI's progress. */
NEMO_API int nemo_coll_test(nemo_coll_work *w);
/* Block until done (0) or failed / past the deadline (< 0). */
NEMO_API int nemo_coll_wait(nemo_coll_work *w);
/* Release a work; one still running is waited for first (a failed one keeps its buffers,
 * since MPI may still write into them). */
NEMO_API void nemo_coll_work_free(nemo_coll_work *w);
/* Test every work in flight once (progress for non-blocking collectives while compute runs);
 * returns how many are still running, or < 0 when one failed. */
NEMO_API int nemo_coll_progress(void);

/* Blocking forms: start, then wait. */
NEMO_API int nemo_coll_all_reduce(nemo_comm *c, nemo_tensor *t, int op);
NEMO_API int nemo_coll_reduce_scatter(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in, int op);
NEMO_API int nemo_coll_all_gather(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in);
NEMO_API int nemo_coll_all_to_all(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in);
NEMO_API int nemo_coll_broadcast(nemo_comm *c, nemo_tensor *t, int root);
NEMO_API int nemo_coll_barrier(nemo_comm *c);

/* ==== Statistics ==== */
/* calls: collectives started; bytes: their payload (the tensor bytes each rank hands in,
 * float32 for staged bfloat16/float16 reductions); seconds: time spent inside the collective
 * calls (starting, testing, waiting), i.e. communication that compute did not hide. */
typedef struct nemo_coll_stats { int64_t calls; int64_t bytes; double seconds; } nemo_coll_stats;
NEMO_API void nemo_coll_get_stats(nemo_coll_stats *out);
NEMO_API void nemo_coll_reset_stats(void);
/* Seconds on a monotonic clock (MPI_Wtime's role), for timing steps against communication. */
NEMO_API double nemo_coll_wtime(void);

#endif /* NEMO_COLL_H */
