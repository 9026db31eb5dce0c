/*
 * coll.c: collectives between processes (nemo_coll.h): Open MPI for CPU tensors, opened at run
 * time with dlopen; a one-process SELF backend; and the bridge to the NCCL backend that the
 * CUDA plugin carries (kernels/cuda/nccl.cu, contract in coll_nccl.h).
 *
 * Why dlopen and not a link: libnemo must load where Open MPI is not installed (a laptop, a
 * CPU-only container), and a separate libnemo_mpi.so plugin would need an mpicc build rule
 * and a second artefact to install and find. Open MPI keeps one ABI for libmpi.so.40 (3.x to
 * 5.x), and its handles are plain addresses of global objects (MPI_COMM_WORLD is
 * &ompi_mpi_comm_world), so the few types, constants and symbols used here are declared below
 * under Open MPI's own struct tags and taken with dlsym. `mpicc -fsyntax-only
 * -DNEMO_COLL_ABI_CHECK engine/coll.c` (run by tests/sh/test_mpi.sh) compiles this file
 * against the real mpi.h and checks every declaration, constant and function type.
 *
 * Non-obvious rules:
 * - libmpi is opened RTLD_GLOBAL: Open MPI's own components (mca_*.so) resolve libmpi's
 *   symbols through the global scope and fail to load otherwise.
 * - Every collective is non-blocking underneath (MPI_Iallreduce, ...), and waits poll MPI_Test
 *   against a deadline instead of blocking in MPI_Wait: a dead or stuck rank becomes a clear
 *   error on the others instead of a hang. The poll yields the CPU (sched_yield for the first
 *   millisecond, then short sleeps), which matters when ranks share cores (--oversubscribe).
 * - Non-blocking collectives progress only inside MPI calls; nemo_coll_progress() tests the
 *   works in flight so DDP can move bytes while backward still runs.
 * - After a timeout or an MPI error the group is marked failed: MPI may still write into the
 *   buffers of the stuck operation, so they are leaked on purpose, and the exit handler calls
 *   MPI_Abort (which ends every rank) rather than MPI_Finalize (which would wait for ranks
 *   that never come).
 * - Only the main thread calls MPI (MPI_THREAD_FUNNELED); OpenMP threads only convert buffers.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "coll_nccl.h"

#ifdef NEMO_COLL_ABI_CHECK
#include <mpi.h>
#endif

/* ==== Open MPI's ABI (the subset used here) ==== */

typedef struct ompi_communicator_t *ompi_comm;
typedef struct ompi_datatype_t *ompi_dtype;
typedef struct ompi_op_t *ompi_op;
typedef struct ompi_request_t *ompi_request;
typedef struct ompi_errhandler_t *ompi_errhandler;
typedef struct ompi_status_public_t ompi_status;
#define OMPI_SUCCESS 0
#define OMPI_THREAD_FUNNELED 1
#define OMPI_IN_PLACE ((void *)1)
#define OMPI_STATUS_IGNORE ((ompi_status *)0)
#define OMPI_MAX_ERROR_STRING 256
#define OMPI_MAX_LIBRARY_VERSION_STRING 256

/* return type, name, parameters */
#define MPI_FUNCS(X)                                                                              \
    X(int, Initialized, (int *flag))                                                              \
    X(int, Finalized, (int *flag))                                                                \
    X(int, Init_thread, (int *argc, char ***argv, int required, int *provided))                   \
    X(int, Finalize, (void))                                                                      \
    X(int, Abort, (ompi_comm comm, int code))                                                     \
    X(int, Comm_rank, (ompi_comm comm, int *rank))                                                \
    X(int, Comm_size, (ompi_comm comm, int *size))                                                \
    X(int, Comm_split, (ompi_comm comm, int color, int key, ompi_comm *out))                      \
    X(int, Comm_free, (ompi_comm *comm))                                                          \
    X(int, Comm_dup, (ompi_comm comm, ompi_comm *out))                                            \
    X(int, Comm_set_errhandler, (ompi_comm comm, ompi_errhandler eh))                             \
    X(int, Iallreduce, (const void *s, void *r, int n, ompi_dtype dt, ompi_op op, ompi_comm comm, \
                        ompi_request *req))                                                       \
    X(int, Ireduce_scatter_block, (const void *s, void *r, int n, ompi_dtype dt, ompi_op op,      \
                                   ompi_comm comm, ompi_request *req))                            \
    X(int, Iallgather, (const void *s, int sn, ompi_dtype sdt, void *r, int rn, ompi_dtype rdt,   \
                        ompi_comm comm, ompi_request *req))                                       \
    X(int, Ialltoall, (const void *s, int sn, ompi_dtype sdt, void *r, int rn, ompi_dtype rdt,    \
                       ompi_comm comm, ompi_request *req))                                        \
    X(int, Ibcast, (void *buf, int n, ompi_dtype dt, int root, ompi_comm comm, ompi_request *req)) \
    X(int, Ibarrier, (ompi_comm comm, ompi_request *req))                                         \
    X(int, Test, (ompi_request *req, int *flag, ompi_status *status))                             \
    X(int, Error_string, (int code, char *s, int *len))                                           \
    X(int, Get_library_version, (char *s, int *len))

/* field, libmpi symbol: predefined handles are the addresses of these objects */
#define MPI_OBJS(X)                                                                               \
    X(comm_world, ompi_mpi_comm_world)                                                            \
    X(errors_return, ompi_mpi_errors_return)                                                      \
    X(t_float, ompi_mpi_float)                                                                    \
    X(t_double, ompi_mpi_double)                                                                  \
    X(t_uint16, ompi_mpi_uint16_t)                                                                \
    X(t_int64, ompi_mpi_int64_t)                                                                  \
    X(t_int32, ompi_mpi_int32_t)                                                                  \
    X(t_uint8, ompi_mpi_uint8_t)                                                                  \
    X(op_sum, ompi_mpi_op_sum)                                                                    \
    X(op_max, ompi_mpi_op_max)                                                                    \
    X(op_min, ompi_mpi_op_min)

static struct {
#define X(ret, name, params) ret (*name) params;
    MPI_FUNCS(X)
#undef X
#define X(field, sym) void *field;
    MPI_OBJS(X)
#undef X
} mpi;

#ifdef NEMO_COLL_ABI_CHECK
/* Compiled only by the ABI check: every declaration above must equal mpi.h's. */
_Static_assert(__builtin_types_compatible_p(ompi_comm, MPI_Comm), "MPI_Comm");
_Static_assert(__builtin_types_compatible_p(ompi_dtype, MPI_Datatype), "MPI_Datatype");
_Static_assert(__builtin_types_compatible_p(ompi_op, MPI_Op), "MPI_Op");
_Static_assert(__builtin_types_compatible_p(ompi_request, MPI_Request), "MPI_Request");
_Static_assert(__builtin_types_compatible_p(ompi_errhandler, MPI_Errhandler), "MPI_Errhandler");
_Static_assert(__builtin_types_compatible_p(ompi_status, MPI_Status), "MPI_Status");
_Static_assert(MPI_SUCCESS == OMPI_SUCCESS, "MPI_SUCCESS");
_Static_assert(MPI_THREAD_FUNNELED == OMPI_THREAD_FUNNELED, "MPI_THREAD_FUNNELED");
_Static_assert(MPI_MAX_ERROR_STRING <= OMPI_MAX_ERROR_STRING, "MPI_MAX_ERROR_STRING");
_Static_assert(MPI_MAX_LIBRARY_VERSION_STRING <= OMPI_MAX_LIBRARY_VERSION_STRING, "MPI_MAX_LIBRARY_VERSION_STRING");
void nemo_coll_abi_check(void);
void nemo_coll_abi_check(void) {
#define X(ret, name, params) mpi.name = MPI_##name;
    MPI_FUNCS(X)
#undef X
#define X(field, sym) mpi.field = (void *)&sym;
    MPI_OBJS(X)
#undef X
    _Static_assert(__builtin_types_compatible_p(__typeof__(MPI_IN_PLACE), __typeof__(OMPI_IN_PLACE)), "MPI_IN_PLACE");
    _Static_assert(__builtin_types_compatible_p(__typeof__(MPI_STATUS_IGNORE), __typeof__(OMPI_STATUS_IGNORE)), "MPI_STATUS_IGNORE");
    /* the handles are the addresses of these objects (OMPI_PREDEFINED_GLOBAL) */
    mpi.comm_world = (void *)MPI_COMM_WORLD; mpi.errors_return = (void *)MPI_ERRORS_RETURN;
    mpi.t_float = (void *)MPI_FLOAT; mpi.t_double = (void *)MPI_DOUBLE; mpi.t_uint16 = (void *)MPI_UINT16_T;
    mpi.t_int64 = (void *)MPI_INT64_T; mpi.t_int32 = (void *)MPI_INT32_T; mpi.t_uint8 = (void *)MPI_UINT8_T;
    mpi.op_sum = (void *)MPI_SUM; mpi.op_max = (void *)MPI_MAX; mpi.op_min = (void *)MPI_MIN;
}
#endif

/* ==== State ==== */

struct nemo_comm {
    int backend;          /* NEMO_COLL_SELF or NEMO_COLL_MPI */
    ompi_comm mc;         /* MPI communicator (MPI backend) */
    int rank, size;
    int owned;            /* MPI_Comm_free on release */
    void *nccl;           /* ncclComm_t, or NULL */
    int nccl_dev;
    char name[48];
};

enum { FIN_NONE = 0, FIN_DIVIDE, FIN_UNSTAGE };
enum { W_MPI = 0, W_SELF, W_NCCL };

struct nemo_coll_work {
    const char *op;
    nemo_comm *comm;
    int kind;             /* W_MPI, W_SELF, W_NCCL */
    int state;            /* 0 running, 1 done, < 0 failed (the status) */
    ompi_request req;
    void *event;          /* NCCL: the CUDA event after the collective */
    nemo_tensor *keep[2]; /* references held until completion */
    int fin;              /* what completion does to the result */
    void *dst;            /* FIN_*: the result's memory */
    int dst_dtype;
    size_t count;         /* elements of the result */
    void *stage[2];       /* float32 staging (bfloat16/float16 reductions) */
    int divide;           /* AVG: divide by the group size */
    int64_t elements;     /* for messages */
    int dtype;
    struct nemo_coll_work *prev, *next;   /* the in-flight list */
};

static int g_backend = NEMO_COLL_NONE;
static int g_owns_mpi;            /* we called MPI_Init_thread */
static int g_finalized;
static int g_failed;
static double g_timeout = 1800.0; /* seconds; torch's default for CPU process groups */
static struct nemo_comm g_world;
static struct nemo_comm g_exit;   /* a duplicate of the world for the exit barrier only */
static char g_version[OMPI_MAX_LIBRARY_VERSION_STRING + 1];
static nemo_coll_work *g_inflight;
static nemo_coll_stats g_stats;
static int g_atexit_registered;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ==== Loading libmpi ==== */

static int mpi_probed, mpi_ok;
static char mpi_reason[768];

static void mpi_load(void) {
    if (mpi_probed) return;
    mpi_probed = 1;
    const char *env = getenv("NEMO_MPI_LIB");   /* when set, the only candidate */
    int has_env = env && *env;
    const char *names[] = { has_env ? env : NULL, has_env ? NULL : "libmpi.so.40", has_env ? NULL : "libmpi.so" };
    void *h = NULL;
    char tried[512] = "";
    for (size_t i = 0; i < sizeof names / sizeof *names && !h; i++) {
        if (!names[i]) continue;
        h = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
        if (!h) {
            const char *e = dlerror();
            size_t n = strlen(tried);
            snprintf(tried + n, sizeof tried - n, "%s%s", n ? "; " : "", e ? e : names[i]);
        }
    }
    if (!h) {
        snprintf(mpi_reason, sizeof mpi_reason,
                 "Open MPI's libmpi.so.40 cannot be loaded (%s); install Open MPI (Debian/Ubuntu: "
                 "apt-get install openmpi-bin libopenmpi3) or set NEMO_MPI_LIB to its libmpi.so", tried);
        return;
    }
#define X(ret, name, params)                                                                     \
    *(void **)&mpi.name = dlsym(h, "MPI_" #name);                                                \
    if (!mpi.name) {                                                                             \
        snprintf(mpi_reason, sizeof mpi_reason, "the libmpi that was loaded has no MPI_" #name   \
                 " (it must be Open MPI >= 3.0, MPI-3)");                                        \
        return;                                                                                  \
    }
    MPI_FUNCS(X)
#undef X
#define X(field, sym)                                                                            \
    mpi.field = dlsym(h, #sym);                                                                  \
    if (!mpi.field) {                                                                            \
        snprintf(mpi_reason, sizeof mpi_reason, "the libmpi that was loaded has no " #sym        \
                 ": nemo-lua's MPI binding uses Open MPI's ABI (another MPI, e.g. MPICH, is not " \
                 "supported)");                                                                  \
        return;                                                                                  \
    }
    MPI_OBJS(X)
#undef X
    char v[OMPI_MAX_LIBRARY_VERSION_STRING + 1] = "";
    int len = 0;
    if (mpi.Get_library_version(v, &len) == OMPI_SUCCESS) {
        v[len > 0 && len <= OMPI_MAX_LIBRARY_VERSION_STRING ? len : 0] = 0;
        char *nl = strchr(v, '\n');
        if (nl) *nl = 0;
        char *comma = strchr(v, ',');
        if (comma) *comma = 0;
        snprintf(g_version, sizeof g_version, "%s", v);
    }
    if (!strstr(g_version, "Open MPI")) {
        snprintf(mpi_reason, sizeof mpi_reason, "the libmpi that was loaded is '%s', not Open MPI: "
                 "nemo-lua's MPI binding uses Open MPI's ABI", g_version);
        return;
    }
    mpi_ok = 1;
    mpi_reason[0] = 0;
}

NEMO_API int nemo_coll_mpi_available(void) { mpi_load(); return mpi_ok; }
NEMO_API const char *nemo_coll_mpi_reason(void) { mpi_load(); return mpi_ok ? NULL : mpi_reason; }
NEMO_API const char *nemo_coll_library_version(void) { return g_backend == NEMO_COLL_MPI ? g_version : ""; }

/* An MPI failure as a status with MPI's own text. */
static int mpi_fail(int code, const char *what, const nemo_comm *c) {
    char s[OMPI_MAX_ERROR_STRING + 1] = "";
    int len = 0;
    if (mpi.Error_string && mpi.Error_string(code, s, &len) == OMPI_SUCCESS && len >= 0 &&
        len <= OMPI_MAX_ERROR_STRING) s[len] = 0;
    else snprintf(s, sizeof s, "error code %d", code);
    if (c) return NEMO_ERR(NEMO_ECOMM, "%s on group '%s' (rank %d of %d): MPI error: %s", what, c->name,
                           c->rank, c->size, s);
    return NEMO_ERR(NEMO_ECOMM, "%s: MPI error: %s", what, s);
}

/* ==== The process group ==== */

static const char *backend_name(int b) {
    return b == NEMO_COLL_MPI ? "mpi" : b == NEMO_COLL_SELF ? "self" : "none";
}

static void at_exit(void) {
    if (g_backend == NEMO_COLL_MPI && !g_finalized) nemo_coll_finalize();
}

NEMO_API int nemo_coll_init(int backend, double timeout_s) {
    if (backend != NEMO_COLL_SELF && backend != NEMO_COLL_MPI)
        return NEMO_ERR(NEMO_EINVAL, "coll init: backend %d, expected %d (self) or %d (mpi)", backend,
                        NEMO_COLL_SELF, NEMO_COLL_MPI);
    if (timeout_s > 0) g_timeout = timeout_s;
    if (g_backend == backend) return 0;
    if (g_backend != NEMO_COLL_NONE)
        return NEMO_ERR(NEMO_EINVAL, "coll init: the process group already runs the '%s' backend; "
                        "'%s' was asked for", backend_name(g_backend), backend_name(backend));
    if (g_finalized)
        return NEMO_ERR(NEMO_EINVAL, "coll init: the process group was finalized; MPI cannot start twice "
                        "in one process");
    memset(&g_world, 0, sizeof g_world);
    snprintf(g_world.name, sizeof g_world.name, "world");
    if (backend == NEMO_COLL_SELF) {
        g_world.backend = NEMO_COLL_SELF;
        g_world.rank = 0;
        g_world.size = 1;
        g_backend = NEMO_COLL_SELF;
        return 0;
    }
    mpi_load();
    if (!mpi_ok) return NEMO_ERR(NEMO_EUNSUPPORTED, "coll init: the mpi backend is not available: %s", mpi_reason);
    int inited = 0, fin = 0, rc;
    mpi.Initialized(&inited);
    mpi.Finalized(&fin);
    if (fin) return NEMO_ERR(NEMO_EINVAL, "coll init: MPI was already finalized in this process");
    if (!inited) {
        int provided = 0;
        rc = mpi.Init_thread(NULL, NULL, OMPI_THREAD_FUNNELED, &provided);
        if (rc != OMPI_SUCCESS) return mpi_fail(rc, "MPI_Init_thread", NULL);
        g_owns_mpi = 1;
    }
    ompi_comm w = (ompi_comm)mpi.comm_world;
    rc = mpi.Comm_set_errhandler(w, (ompi_errhandler)mpi.errors_return);
    if (rc != OMPI_SUCCESS) return mpi_fail(rc, "MPI_Comm_set_errhandler", NULL);
    g_world.backend = NEMO_COLL_MPI;
    g_world.mc = w;
    mpi.Comm_rank(w, &g_world.rank);
    mpi.Comm_size(w, &g_world.size);
    /* The exit barrier runs on its own communicator: a rank that leaves early (a Lua error)
     * must not have its barrier matched against a collective the others are still in. */
    g_exit = g_world;
    snprintf(g_exit.name, sizeof g_exit.name, "exit");
    rc = mpi.Comm_dup(w, &g_exit.mc);
    if (rc != OMPI_SUCCESS) return mpi_fail(rc, "MPI_Comm_dup", NULL);
    g_backend = NEMO_COLL_MPI;
    if (!g_atexit_registered) { atexit(at_exit); g_atexit_registered = 1; }
    return 0;
}

NEMO_API int nemo_coll_backend(void) { return g_backend; }
NEMO_API int nemo_coll_failed(void) { return g_failed; }
NEMO_API double nemo_coll_get_timeout(void) { return g_timeout; }
NEMO_API int nemo_coll_set_timeout(double timeout_s) {
    if (!(timeout_s > 0)) return NEMO_ERR(NEMO_EINVAL, "coll set_timeout: expected seconds > 0, got %g", timeout_s);
    g_timeout = timeout_s;
    return 0;
}

NEMO_API nemo_comm *nemo_comm_world(void) { return g_backend == NEMO_COLL_NONE ? NULL : &g_world; }
NEMO_API int nemo_comm_rank(const nemo_comm *c) { return c ? c->rank : -1; }
NEMO_API int nemo_comm_size(const nemo_comm *c) { return c ? c->size : -1; }
NEMO_API const char *nemo_comm_name(const nemo_comm *c) { return c ? c->name : ""; }

NEMO_API void nemo_coll_abort(int code) {
    if (g_backend == NEMO_COLL_MPI && !g_finalized) {
        fflush(stdout);
        fflush(stderr);
        mpi.Abort((ompi_comm)mpi.comm_world, code);
    }
}

static int ready(const char *op, nemo_comm *c) {
    if (g_backend == NEMO_COLL_NONE)
        return NEMO_ERR(NEMO_EINVAL, "%s: the process group is not initialized (nemo.dist.init_process_group)", op);
    if (g_finalized) return NEMO_ERR(NEMO_EINVAL, "%s: the process group was finalized", op);
    if (g_failed)
        return NEMO_ERR(NEMO_ECOMM, "%s: an earlier collective failed or timed out; the process group cannot "
                        "be used any more", op);
    if (!c) return NEMO_ERR(NEMO_EINVAL, "%s: communicator is NULL", op);
    return 0;
}

NEMO_API nemo_comm *nemo_comm_split(nemo_comm *parent, int color, int key, const char *name) {
    int rc = ready("comm_split", parent);
    nemo_comm *c = NULL;
    if (rc < 0) return NULL;
    NEMO_CHECK(color >= 0, NEMO_EINVAL, "comm_split '%s': color must be >= 0, got %d", name ? name : "", color);
    c = calloc(1, sizeof *c);
    NEMO_CHECK(c, NEMO_ENOMEM, "comm_split: out of memory");
    snprintf(c->name, sizeof c->name, "%s", name && *name ? name : "group");
    c->backend = parent->backend;
    if (parent->backend == NEMO_COLL_SELF) {
        c->rank = 0;
        c->size = 1;
        return c;
    }
    int e = mpi.Comm_split(parent->mc, color, key, &c->mc);
    if (e != OMPI_SUCCESS) { rc = mpi_fail(e, "MPI_Comm_split", parent); goto fail; }
    c->owned = 1;
    mpi.Comm_rank(c->mc, &c->rank);
    mpi.Comm_size(c->mc, &c->size);
    return c;
fail:
    free(c);
    (void)rc;
    return NULL;
}

static const nemo_nccl_table *nccl_table(void);

NEMO_API void nemo_comm_free(nemo_comm *c) {
    if (!c || c == &g_world) return;
    if (c->nccl) {
        const nemo_nccl_table *t = nccl_table();
        if (t) t->comm_destroy(c->nccl);
    }
    if (c->owned && g_backend == NEMO_COLL_MPI && !g_finalized && !g_failed) mpi.Comm_free(&c->mc);
    free(c);
}

/* ==== Works: completion and waiting ==== */

static void list_add(nemo_coll_work *w) {
    w->next = g_inflight;
    w->prev = NULL;
    if (g_inflight) g_inflight->prev = w;
    g_inflight = w;
}

static void list_remove(nemo_coll_work *w) {
    if (w->prev) w->prev->next = w->next; else if (g_inflight == w) g_inflight = w->next;
    if (w->next) w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

static void release_refs(nemo_coll_work *w) {
    for (int i = 0; i < 2; i++) if (w->keep[i]) { nemo_tensor_release(w->keep[i]); w->keep[i] = NULL; }
    for (int i = 0; i < 2; i++) { free(w->stage[i]); w->stage[i] = NULL; }
}

/* The last step of a finished collective: average, or round the float32 staging back. */
static void complete(nemo_coll_work *w) {
    int64_t n = (int64_t)w->count;
    double div = w->divide ? (double)w->comm->size : 1.0;
    if (w->fin == FIN_DIVIDE && w->divide && w->comm->size > 1) {
        if (w->dst_dtype == NEMO_F64) {
            double *x = w->dst;
            #pragma omp parallel for if (n > NEMO_PAR_MIN)
            for (int64_t i = 0; i < n; i++) x[i] = x[i] / div;
        } else {
            float *x = w->dst;
            float d = (float)div;
            #pragma omp parallel for if (n > NEMO_PAR_MIN)
            for (int64_t i = 0; i < n; i++) x[i] = x[i] / d;
        }
    } else if (w->fin == FIN_UNSTAGE) {
        const float *s = w->stage[1] ? w->stage[1] : w->stage[0];
        uint16_t *x = w->dst;
        float d = (float)div;
        if (w->dst_dtype == NEMO_BF16) {
            #pragma omp parallel for if (n > NEMO_PAR_MIN)
            for (int64_t i = 0; i < n; i++) x[i] = nemo_f32_to_bf16(s[i] / d);
        } else {
            #pragma omp parallel for if (n > NEMO_PAR_MIN)
            for (int64_t i = 0; i < n; i++) x[i] = nemo_f32_to_f16(s[i] / d);
        }
    }
    w->state = 1;
    list_remove(w);
    release_refs(w);
}

static const char *comm_desc(const nemo_coll_work *w, char *buf, size_t n) {
    snprintf(buf, n, "%s on group '%s' (rank %d of %d, %lld %s elements)", w->op, w->comm->name,
             w->comm->rank, w->comm->size, (long long)w->elements, nemo_dtype_name(w->dtype));
    return buf;
}

/* A failed work stays in memory with its buffers (MPI may still write into them). */
static int fail_work(nemo_coll_work *w, int rc) {
    w->state = rc;
    g_failed = 1;
    list_remove(w);
    return rc;
}

/* 1 done, 0 running, < 0 failed. */
static int test_once(nemo_coll_work *w) {
    if (w->state != 0) return w->state;
    if (w->kind == W_SELF) { complete(w); return 1; }
    if (w->kind == W_NCCL) {
        const nemo_nccl_table *t = nccl_table();
        int r = t->query(w->comm->nccl, w->event);
        if (r < 0) {
            char d[256];
            return fail_work(w, NEMO_ERR(NEMO_ECOMM, "%s: NCCL: %s", comm_desc(w, d, sizeof d), t->error_text()));
        }
        if (r == 1) { t->event_free(w->event); w->event = NULL; complete(w); }
        return r;
    }
    int flag = 0;
    int e = mpi.Test(&w->req, &flag, OMPI_STATUS_IGNORE);
    if (e != OMPI_SUCCESS) {
        char d[256];
        return fail_work(w, mpi_fail(e, comm_desc(w, d, sizeof d), NULL));
    }
    if (flag) { complete(w); return 1; }
    return 0;
}

static void pause_poll(double waited) {
    if (waited < 1e-3) { sched_yield(); return; }
    struct timespec ts = {0, waited < 0.05 ? 20000 : 200000};
    nanosleep(&ts, NULL);
}

static int wait_work(nemo_coll_work *w) {
    if (w->state != 0) {
        if (w->state < 0) return NEMO_ERR(w->state, "%s: this collective failed earlier", w->op);
        return 0;
    }
    double t0 = now_s(), t = t0;
    int r;
    while ((r = test_once(w)) == 0) {
        t = now_s();
        if (t - t0 > g_timeout) {
            char d[256];
            comm_desc(w, d, sizeof d);
            if (w->kind == W_NCCL) { const nemo_nccl_table *nt = nccl_table(); nt->comm_abort(w->comm->nccl); w->comm->nccl = NULL; }
            g_stats.seconds += t - t0;
            return fail_work(w, NEMO_ERR(NEMO_ECOMM,
                "%s: no completion after %.1f s (timeout %.3g min, dist_env.timeout_minutes): another rank "
                "of the group has died, is stuck, or issued a different collective; the process group is "
                "unusable from here on", d, t - t0, g_timeout / 60.0));
        }
        pause_poll(t - t0);
    }
    g_stats.seconds += now_s() - t0;
    return r < 0 ? r : 0;
}

NEMO_API int nemo_coll_test(nemo_coll_work *w) {
    if (!w) return NEMO_ERR(NEMO_EINVAL, "coll test: work is NULL");
    double t0 = now_s();
    int r = test_once(w);
    g_stats.seconds += now_s() - t0;
    return r;
}

NEMO_API int nemo_coll_wait(nemo_coll_work *w) {
    if (!w) return NEMO_ERR(NEMO_EINVAL, "coll wait: work is NULL");
    return wait_work(w);
}

NEMO_API void nemo_coll_work_free(nemo_coll_work *w) {
    if (!w) return;
    if (w->state == 0) (void)wait_work(w);
    if (w->state < 0) return;   /* leaked on purpose: MPI may still own its buffers */
    free(w);
}

NEMO_API int nemo_coll_progress(void) {
    double t0 = now_s();
    int running = 0, rc = 0;
    nemo_coll_work *w = g_inflight;
    while (w) {
        nemo_coll_work *next = w->next;   /* completion unlinks w */
        int r = test_once(w);
        if (r < 0) rc = r;
        else if (r == 0) running++;
        w = next;
    }
    g_stats.seconds += now_s() - t0;
    return rc < 0 ? rc : running;
}

/* ==== Starting collectives ==== */

static int check_tensor(const char *op, const char *arg, const nemo_tensor *t, nemo_comm *c, int *nccl) {
    if (!t) return NEMO_ERR(NEMO_EINVAL, "%s: %s is NULL", op, arg);
    if (!nemo_tensor_is_contiguous(t))
        return NEMO_ERR(NEMO_EINVAL, "%s: %s must be contiguous (call :contiguous() first)", op, arg);
    *nccl = 0;
    if (t->devtype == NEMO_CUDA) {
        if (c->nccl) {
            if (t->devindex != c->nccl_dev)
                return NEMO_ERR(NEMO_EDEVICE, "%s: %s is on cuda:%d, group '%s' runs NCCL on cuda:%d", op, arg,
                                t->devindex, c->name, c->nccl_dev);
            *nccl = 1;
        } else if (c->backend != NEMO_COLL_SELF) {
            return NEMO_ERR(NEMO_EDEVICE, "%s: %s is on cuda:%d, but group '%s' has no NCCL communicator "
                            "(the mpi backend moves CPU tensors; init_process_group{backend='nccl'})", op, arg,
                            t->devindex, c->name);
        }
    }
    return 0;
}

static ompi_dtype wire_type(int dtype) {
    switch (dtype) {
    case NEMO_F32: return (ompi_dtype)mpi.t_float;
    case NEMO_F64: return (ompi_dtype)mpi.t_double;
    case NEMO_BF16: case NEMO_F16: return (ompi_dtype)mpi.t_uint16;
    case NEMO_I64: return (ompi_dtype)mpi.t_int64;
    case NEMO_I32: return (ompi_dtype)mpi.t_int32;
    case NEMO_BOOL: return (ompi_dtype)mpi.t_uint8;
    default: return NULL;
    }
}

/* Is (dtype, op) a reduction we run? */
static int check_reduction(const char *opn, int dtype, int op) {
    if (op < NEMO_COLL_SUM || op > NEMO_COLL_MIN)
        return NEMO_ERR(NEMO_EINVAL, "%s: op %d, expected sum (0), avg (1), max (2) or min (3)", opn, op);
    if (dtype == NEMO_I64 || dtype == NEMO_I32 || dtype == NEMO_BOOL) {
        if (op == NEMO_COLL_AVG)
            return NEMO_ERR(NEMO_EDTYPE, "%s: avg of %s values is not defined (use sum and divide)", opn,
                            nemo_dtype_name(dtype));
        if (dtype == NEMO_BOOL && op == NEMO_COLL_SUM)
            return NEMO_ERR(NEMO_EDTYPE, "%s: sum of bool values is not defined (max is 'any', min is 'all')", opn);
        return 0;
    }
    if (dtype < 0 || dtype >= NEMO_NDTYPE) return NEMO_ERR(NEMO_EDTYPE, "%s: unknown dtype %d", opn, dtype);
    return 0;
}

static ompi_op mpi_op(int op) {
    return (ompi_op)(op == NEMO_COLL_MAX ? mpi.op_max : op == NEMO_COLL_MIN ? mpi.op_min : mpi.op_sum);
}

static nemo_coll_work *new_work(const char *op, nemo_comm *c, int kind, int dtype, int64_t elements) {
    nemo_coll_work *w = calloc(1, sizeof *w);
    if (!w) { NEMO_ERR(NEMO_ENOMEM, "%s: out of memory", op); return NULL; }
    w->op = op;
    w->comm = c;
    w->kind = kind;
    w->dtype = dtype;
    w->elements = elements;
    return w;
}

static float *stage_from(const void *src, int dtype, int64_t n) {
    float *s = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!s) return NULL;
    const uint16_t *x = src;
    if (dtype == NEMO_BF16) {
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t i = 0; i < n; i++) s[i] = nemo_bf16_to_f32(x[i]);
    } else {
        #pragma omp parallel for if (n > NEMO_PAR_MIN)
        for (int64_t i = 0; i < n; i++) s[i] = nemo_f16_to_f32(x[i]);
    }
    return s;
}

/* Post an MPI start: on failure the work is freed and the status returned. */
static nemo_coll_work *started(nemo_coll_work *w, int e, int64_t bytes) {
    if (e != OMPI_SUCCESS) {
        char d[256];
        mpi_fail(e, comm_desc(w, d, sizeof d), NULL);
        g_failed = 1;
        release_refs(w);
        free(w);
        return NULL;
    }
    g_stats.calls++;
    g_stats.bytes += bytes;
    if (w->kind != W_SELF) list_add(w);
    return w;
}

static void keep(nemo_coll_work *w, int i, const nemo_tensor *t) {
    nemo_tensor_retain((nemo_tensor *)t);
    w->keep[i] = (nemo_tensor *)t;
}

#define COUNT_CHECK(op, n) do { if ((n) > INT_MAX) {                                              \
    NEMO_ERR(NEMO_EINVAL, "%s: %lld elements is more than MPI's int count allows (%d); split the " \
             "tensor", op, (long long)(n), INT_MAX); return NULL; } } while (0)

static nemo_coll_work *nccl_start(const char *op, nemo_comm *c, int dtype, int64_t n, int64_t bytes,
                                  nemo_tensor *a, const nemo_tensor *b, int rc, void *ev) {
    if (rc < 0) {
        const nemo_nccl_table *t = nccl_table();
        NEMO_ERR(NEMO_ECOMM, "%s on group '%s': NCCL: %s", op, c->name, t ? t->error_text() : "?");
        return NULL;
    }
    nemo_coll_work *w = new_work(op, c, W_NCCL, dtype, n);
    if (!w) return NULL;
    w->event = ev;
    if (a) keep(w, 0, a);
    if (b) keep(w, 1, b);
    g_stats.calls++;
    g_stats.bytes += bytes;
    list_add(w);
    return w;
}

NEMO_API nemo_coll_work *nemo_coll_all_reduce_async(nemo_comm *c, nemo_tensor *t, int op) {
    const char *opn = "all_reduce";
    int nccl, rc = ready(opn, c);
    if (rc < 0 || check_tensor(opn, "tensor", t, c, &nccl) < 0) return NULL;
    if (check_reduction(opn, t->dtype, op) < 0) return NULL;
    int64_t n = nemo_tensor_numel(t);
    double t0 = now_s();
    nemo_coll_work *w = NULL;
    if (nccl) {
        void *ev = NULL;
        const nemo_nccl_table *nt = nccl_table();
        int r = nt->all_reduce(c->nccl, nemo_tensor_data(t), nemo_tensor_data(t), (size_t)n, t->dtype, op,
                               c->nccl_dev, &ev);
        w = nccl_start(opn, c, t->dtype, n, n * nemo_dtype_size(t->dtype), t, NULL, r, ev);
    } else if (c->backend == NEMO_COLL_SELF || c->size == 1) {
        w = new_work(opn, c, W_SELF, t->dtype, n);
        if (w) w = started(w, OMPI_SUCCESS, n * nemo_dtype_size(t->dtype));
    } else {
        COUNT_CHECK(opn, n);
        w = new_work(opn, c, W_MPI, t->dtype, n);
        if (!w) return NULL;
        keep(w, 0, t);
        w->dst = nemo_tensor_data(t);
        w->dst_dtype = t->dtype;
        w->count = (size_t)n;
        w->divide = op == NEMO_COLL_AVG;
        int e;
        int64_t bytes;
        if (t->dtype == NEMO_BF16 || t->dtype == NEMO_F16) {
            w->stage[0] = stage_from(w->dst, t->dtype, n);
            if (!w->stage[0]) { release_refs(w); free(w); NEMO_ERR(NEMO_ENOMEM, "%s: out of memory", opn); return NULL; }
            w->fin = FIN_UNSTAGE;
            e = mpi.Iallreduce(OMPI_IN_PLACE, w->stage[0], (int)n, (ompi_dtype)mpi.t_float, mpi_op(op), c->mc, &w->req);
            bytes = n * 4;
        } else {
            w->fin = FIN_DIVIDE;
            e = mpi.Iallreduce(OMPI_IN_PLACE, w->dst, (int)n, wire_type(t->dtype), mpi_op(op), c->mc, &w->req);
            bytes = n * nemo_dtype_size(t->dtype);
        }
        w = started(w, e, bytes);
    }
    g_stats.seconds += now_s() - t0;
    return w;
}

/* The checks every collective with an output and an input makes: the group is ready, both
 * tensors are usable on it, of one dtype and on one device; *nccl: whether they go through NCCL. */
static int check_io(const char *opn, nemo_comm *c, const nemo_tensor *out, const nemo_tensor *in, int *nccl) {
    int nccl_i, rc = ready(opn, c);
    if (rc < 0) return rc;
    if ((rc = check_tensor(opn, "output", out, c, nccl)) < 0 || (rc = check_tensor(opn, "input", in, c, &nccl_i)) < 0)
        return rc;
    if (out->dtype != in->dtype)
        return NEMO_ERR(NEMO_EDTYPE, "%s: output is %s, input %s (they must match)", opn, nemo_dtype_name(out->dtype),
                        nemo_dtype_name(in->dtype));
    if (*nccl != nccl_i || out->devtype != in->devtype)
        return NEMO_ERR(NEMO_EDEVICE, "%s: output and input are on different devices", opn);
    return 0;
}

/* A view of `big` with small's shape at element offset 0 (both contiguous). */
static int copy_flat(nemo_tensor *dst, const nemo_tensor *src) {
    int64_t stride[NEMO_MAXDIM];
    int64_t s = 1;
    for (int d = src->ndim - 1; d >= 0; d--) { stride[d] = s; s *= src->shape[d]; }
    nemo_tensor *v = nemo_tensor_view(dst, src->ndim, src->shape, stride, dst->offset);
    if (!v) return nemo_last_status() < 0 ? nemo_last_status() : NEMO_EINTERNAL;
    int rc = nemo_copy_(v, src);
    nemo_tensor_release(v);
    return rc;
}

NEMO_API nemo_coll_work *nemo_coll_reduce_scatter_async(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in,
                                                        int op) {
    const char *opn = "reduce_scatter";
    int nccl_o;
    if (check_io(opn, c, out, in, &nccl_o) < 0 || check_reduction(opn, in->dtype, op) < 0) return NULL;
    int64_t n = nemo_tensor_numel(out), nin = nemo_tensor_numel(in);
    if (nin != n * c->size) {
        char a[96], b[96];
        NEMO_ERR(NEMO_ESHAPE, "%s: input %s has %lld elements, expected group size %d x output %s = %lld", opn,
                 nemo_shape_str(in, a, sizeof a), (long long)nin, c->size, nemo_shape_str(out, b, sizeof b),
                 (long long)(n * c->size));
        return NULL;
    }
    double t0 = now_s();
    nemo_coll_work *w = NULL;
    if (nccl_o) {
        void *ev = NULL;
        const nemo_nccl_table *nt = nccl_table();
        int r = nt->reduce_scatter(c->nccl, nemo_tensor_data(in), nemo_tensor_data(out), (size_t)n, in->dtype, op,
                                   c->nccl_dev, &ev);
        w = nccl_start(opn, c, in->dtype, nin, nin * nemo_dtype_size(in->dtype), out, in, r, ev);
    } else if (c->backend == NEMO_COLL_SELF || c->size == 1) {
        if (copy_flat(out, in) < 0) return NULL;
        w = new_work(opn, c, W_SELF, in->dtype, nin);
        if (w) w = started(w, OMPI_SUCCESS, nin * nemo_dtype_size(in->dtype));
    } else {
        COUNT_CHECK(opn, nin);
        w = new_work(opn, c, W_MPI, in->dtype, nin);
        if (!w) return NULL;
        keep(w, 0, out);
        keep(w, 1, in);
        w->dst = nemo_tensor_data(out);
        w->dst_dtype = out->dtype;
        w->count = (size_t)n;
        w->divide = op == NEMO_COLL_AVG;
        int e;
        int64_t bytes;
        if (in->dtype == NEMO_BF16 || in->dtype == NEMO_F16) {
            w->stage[0] = stage_from(nemo_tensor_data(in), in->dtype, nin);
            w->stage[1] = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
            if (!w->stage[0] || !w->stage[1]) {
                release_refs(w); free(w); NEMO_ERR(NEMO_ENOMEM, "%s: out of memory", opn); return NULL;
            }
            w->fin = FIN_UNSTAGE;
            e = mpi.Ireduce_scatter_block(w->stage[0], w->stage[1], (int)n, (ompi_dtype)mpi.t_float, mpi_op(op),
                                          c->mc, &w->req);
            bytes = nin * 4;
        } else {
            w->fin = FIN_DIVIDE;
            e = mpi.Ireduce_scatter_block(nemo_tensor_data(in), w->dst, (int)n, wire_type(in->dtype), mpi_op(op),
                                          c->mc, &w->req);
            bytes = nin * nemo_dtype_size(in->dtype);
        }
        w = started(w, e, bytes);
    }
    g_stats.seconds += now_s() - t0;
    return w;
}

NEMO_API nemo_coll_work *nemo_coll_all_gather_async(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in) {
    const char *opn = "all_gather";
    int nccl_o;
    if (check_io(opn, c, out, in, &nccl_o) < 0) return NULL;
    int64_t n = nemo_tensor_numel(in), nout = nemo_tensor_numel(out);
    if (nout != n * c->size) {
        char a[96], b[96];
        NEMO_ERR(NEMO_ESHAPE, "%s: output %s has %lld elements, expected group size %d x input %s = %lld", opn,
                 nemo_shape_str(out, a, sizeof a), (long long)nout, c->size, nemo_shape_str(in, b, sizeof b),
                 (long long)(n * c->size));
        return NULL;
    }
    double t0 = now_s();
    nemo_coll_work *w = NULL;
    int64_t bytes = nout * nemo_dtype_size(in->dtype);
    if (nccl_o) {
        void *ev = NULL;
        const nemo_nccl_table *nt = nccl_table();
        int r = nt->all_gather(c->nccl, nemo_tensor_data(in), nemo_tensor_data(out), (size_t)n, in->dtype,
                               c->nccl_dev, &ev);
        w = nccl_start(opn, c, in->dtype, nout, bytes, out, in, r, ev);
    } else if (c->backend == NEMO_COLL_SELF || c->size == 1) {
        if (copy_flat(out, in) < 0) return NULL;
        w = new_work(opn, c, W_SELF, in->dtype, nout);
        if (w) w = started(w, OMPI_SUCCESS, bytes);
    } else {
        COUNT_CHECK(opn, nout);
        w = new_work(opn, c, W_MPI, in->dtype, nout);
        if (!w) return NULL;
        keep(w, 0, out);
        keep(w, 1, in);
        ompi_dtype dt = wire_type(in->dtype);
        int e = mpi.Iallgather(nemo_tensor_data(in), (int)n, dt, nemo_tensor_data(out), (int)n, dt, c->mc, &w->req);
        w = started(w, e, bytes);
    }
    g_stats.seconds += now_s() - t0;
    return w;
}

NEMO_API nemo_coll_work *nemo_coll_all_to_all_async(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in) {
    const char *opn = "all_to_all";
    int nccl_o;
    if (check_io(opn, c, out, in, &nccl_o) < 0) return NULL;
    int64_t n = nemo_tensor_numel(in), nout = nemo_tensor_numel(out);
    if (nout != n) {
        char a[96], b[96];
        NEMO_ERR(NEMO_ESHAPE, "%s: output %s has %lld elements, input %s has %lld (they must have the same number)",
                 opn, nemo_shape_str(out, a, sizeof a), (long long)nout, nemo_shape_str(in, b, sizeof b), (long long)n);
        return NULL;
    }
    if (n % c->size != 0) {
        char a[96];
        NEMO_ERR(NEMO_ESHAPE, "%s: input %s has %lld elements, not divisible by group size %d (every rank sends "
                 "every rank an equal chunk)", opn, nemo_shape_str(in, a, sizeof a), (long long)n, c->size);
        return NULL;
    }
    int64_t chunk = n / c->size;   /* elements to and from each rank */
    double t0 = now_s();
    nemo_coll_work *w = NULL;
    int64_t bytes = n * nemo_dtype_size(in->dtype);
    if (nccl_o) {
        void *ev = NULL;
        const nemo_nccl_table *nt = nccl_table();
        int r = nt->all_to_all(c->nccl, nemo_tensor_data(in), nemo_tensor_data(out), (size_t)chunk, in->dtype,
                               c->nccl_dev, &ev);
        w = nccl_start(opn, c, in->dtype, n, bytes, out, in, r, ev);
    } else if (c->backend == NEMO_COLL_SELF || c->size == 1) {
        if (copy_flat(out, in) < 0) return NULL;
        w = new_work(opn, c, W_SELF, in->dtype, n);
        if (w) w = started(w, OMPI_SUCCESS, bytes);
    } else {
        COUNT_CHECK(opn, n);
        w = new_work(opn, c, W_MPI, in->dtype, n);
        if (!w) return NULL;
        keep(w, 0, out);
        keep(w, 1, in);
        ompi_dtype dt = wire_type(in->dtype);
        int e = mpi.Ialltoall(nemo_tensor_data(in), (int)chunk, dt, nemo_tensor_data(out), (int)chunk, dt, c->mc,
                              &w->req);
        w = started(w, e, bytes);
    }
    g_stats.seconds += now_s() - t0;
    return w;
}

NEMO_API nemo_coll_work *nemo_coll_broadcast_async(nemo_comm *c, nemo_tensor *t, int root) {
    const char *opn = "broadcast";
    int nccl, rc = ready(opn, c);
    if (rc < 0 || check_tensor(opn, "tensor", t, c, &nccl) < 0) return NULL;
    if (root < 0 || root >= c->size) {
        NEMO_ERR(NEMO_EINVAL, "%s: root %d is not a rank of group '%s' (size %d)", opn, root, c->name, c->size);
        return NULL;
    }
    int64_t n = nemo_tensor_numel(t);
    int64_t bytes = n * nemo_dtype_size(t->dtype);
    double t0 = now_s();
    nemo_coll_work *w = NULL;
    if (nccl) {
        void *ev = NULL;
        const nemo_nccl_table *nt = nccl_table();
        int r = nt->broadcast(c->nccl, nemo_tensor_data(t), (size_t)n, t->dtype, root, c->nccl_dev, &ev);
        w = nccl_start(opn, c, t->dtype, n, bytes, t, NULL, r, ev);
    } else if (c->backend == NEMO_COLL_SELF || c->size == 1) {
        w = new_work(opn, c, W_SELF, t->dtype, n);
        if (w) w = started(w, OMPI_SUCCESS, bytes);
    } else {
        COUNT_CHECK(opn, n);
        w = new_work(opn, c, W_MPI, t->dtype, n);
        if (!w) return NULL;
        keep(w, 0, t);
        int e = mpi.Ibcast(nemo_tensor_data(t), (int)n, wire_type(t->dtype), root, c->mc, &w->req);
        w = started(w, e, bytes);
    }
    g_stats.seconds += now_s() - t0;
    return w;
}

NEMO_API nemo_coll_work *nemo_coll_barrier_async(nemo_comm *c) {
    const char *opn = "barrier";
    if (ready(opn, c) < 0) return NULL;
    double t0 = now_s();
    nemo_coll_work *w;
    if (c->backend == NEMO_COLL_SELF || c->size == 1) {
        w = new_work(opn, c, W_SELF, NEMO_BOOL, 0);
        if (w) w = started(w, OMPI_SUCCESS, 0);
    } else {
        w = new_work(opn, c, W_MPI, NEMO_BOOL, 0);
        if (!w) return NULL;
        int e = mpi.Ibarrier(c->mc, &w->req);
        w = started(w, e, 0);
    }
    g_stats.seconds += now_s() - t0;
    return w;
}

static int run_blocking(nemo_coll_work *w) {
    if (!w) return nemo_last_status() < 0 ? nemo_last_status() : NEMO_EINTERNAL;
    int rc = wait_work(w);
    nemo_coll_work_free(w);
    return rc;
}

NEMO_API int nemo_coll_all_reduce(nemo_comm *c, nemo_tensor *t, int op) {
    return run_blocking(nemo_coll_all_reduce_async(c, t, op));
}
NEMO_API int nemo_coll_reduce_scatter(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in, int op) {
    return run_blocking(nemo_coll_reduce_scatter_async(c, out, in, op));
}
NEMO_API int nemo_coll_all_gather(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in) {
    return run_blocking(nemo_coll_all_gather_async(c, out, in));
}
NEMO_API int nemo_coll_all_to_all(nemo_comm *c, nemo_tensor *out, const nemo_tensor *in) {
    return run_blocking(nemo_coll_all_to_all_async(c, out, in));
}
NEMO_API int nemo_coll_broadcast(nemo_comm *c, nemo_tensor *t, int root) {
    return run_blocking(nemo_coll_broadcast_async(c, t, root));
}
NEMO_API int nemo_coll_barrier(nemo_comm *c) { return run_blocking(nemo_coll_barrier_async(c)); }

/* ==== Finalize ==== */

NEMO_API int nemo_coll_finalize(void) {
    if (g_backend == NEMO_COLL_NONE || g_finalized) return 0;
    if (g_backend == NEMO_COLL_SELF) {
        g_backend = NEMO_COLL_NONE;
        return 0;
    }
    if (g_failed) {
        fprintf(stderr, "nemo: rank %d: a collective failed or timed out earlier; aborting the job "
                "(MPI_Abort) instead of waiting for the other ranks in MPI_Finalize\n", g_world.rank);
        nemo_coll_abort(1);
        return NEMO_ERR(NEMO_ECOMM, "coll finalize: the process group had failed; MPI_Abort was called");
    }
    /* every rank must arrive: a bounded barrier first, since MPI_Finalize itself waits forever */
    nemo_coll_work *w = nemo_coll_barrier_async(&g_exit);
    int rc = w ? wait_work(w) : NEMO_ECOMM;
    if (rc < 0) {
        fprintf(stderr, "nemo: rank %d: at exit, the other ranks did not arrive within the timeout "
                "(%.3g min): aborting the job\n%s\n", g_world.rank, g_timeout / 60.0, nemo_last_error());
        nemo_coll_abort(1);
        return rc;
    }
    free(w);
    g_finalized = 1;
    if (g_world.nccl) {
        const nemo_nccl_table *t = nccl_table();
        if (t) t->comm_destroy(g_world.nccl);
        g_world.nccl = NULL;
    }
    if (g_owns_mpi) {
        int e = mpi.Finalize();
        if (e != OMPI_SUCCESS) return mpi_fail(e, "MPI_Finalize", NULL);
    }
    return 0;
}

/* ==== Statistics ==== */

NEMO_API void nemo_coll_get_stats(nemo_coll_stats *out) { if (out) *out = g_stats; }
NEMO_API void nemo_coll_reset_stats(void) { memset(&g_stats, 0, sizeof g_stats); }
NEMO_API double nemo_coll_wtime(void) { return now_s(); }

/* ==== NCCL (from the CUDA plugin) ==== */

/* A 1-D CPU tensor of count elements over borrowed host memory p (p outlives it). */
static nemo_tensor *host_view(const void *p, size_t count, int dtype) {
    nemo_storage *st = nemo_storage_wrap((void *)p, count * (size_t)nemo_dtype_size(dtype), NEMO_CPU, 0, NULL, NULL);
    if (!st) return NULL;
    int64_t shape[1] = {(int64_t)count}, stride[1] = {1};
    nemo_tensor *t = nemo_tensor_from_storage(st, dtype, 1, shape, stride, 0);
    nemo_storage_release(st);
    return t;
}

static int nccl_probed;
static const nemo_nccl_table *nccl_tab;
static char nccl_reason[768] = "not probed";

/* ==== Emulated NCCL (NEMO_FAKE_CUDA) ====
 * On emulated CUDA devices (engine/fake_cuda.c) device memory is host memory, so the nccl
 * backend runs each collective as the group's blocking MPI collective over the same bytes,
 * wrapped as CPU tensors. Everything else of the NCCL path (communicator setup, device checks,
 * works that complete through events, the parallel managers on "cuda") runs as with NCCL.
 * The inner MPI call's statistics are not counted twice. */
static nemo_comm *fake_enabling;   /* the group nemo_comm_enable_nccl is setting up */

static const char *fk_error_text(void) { return "emulated NCCL (NEMO_FAKE_CUDA): the MPI collective failed"; }
static int fk_version(int *code) { *code = 0; return 0; }
static int fk_get_unique_id(void *id) { memset(id, 0x5a, NEMO_NCCL_ID_BYTES); return 0; }
static int fk_comm_init(void **comm, int nranks, const void *id, int rank, int dev) {
    (void)nranks; (void)id; (void)rank; (void)dev;
    *comm = fake_enabling;
    return fake_enabling ? 0 : NEMO_EINTERNAL;
}
static int fk_comm_noop(void *comm) { (void)comm; return 0; }
/* kind 0 all_reduce, 1 reduce_scatter, 2 all_gather, 3 broadcast, 4 all_to_all; n: the count NCCL
 * was given (all_to_all: the elements to and from each rank) */
static int fk_run(int kind, nemo_comm *c, const void *send, void *recv, size_t n, int dtype, int op_or_root,
                  void **event) {
    *event = NULL;
    size_t nin = kind == 1 || kind == 4 ? n * (size_t)c->size : n;
    size_t nout = kind == 2 || kind == 4 ? n * (size_t)c->size : n;
    nemo_coll_stats saved = g_stats;
    int rc = 0;
    nemo_tensor *in = NULL, *out = NULL;
    if ((kind == 0 || kind == 3) && send && send != recv)
        memcpy(recv, send, n * (size_t)nemo_dtype_size(dtype));
    out = host_view(recv, nout, dtype);
    if (!out) { rc = nemo_last_status(); goto done; }
    if (kind == 1 || kind == 2 || kind == 4) {
        in = host_view(send, nin, dtype);
        if (!in) { rc = nemo_last_status(); goto done; }
    }
    switch (kind) {
    case 0: rc = nemo_coll_all_reduce(c, out, op_or_root); break;
    case 1: rc = nemo_coll_reduce_scatter(c, out, in, op_or_root); break;
    case 2: rc = nemo_coll_all_gather(c, out, in); break;
    case 4: rc = nemo_coll_all_to_all(c, out, in); break;
    default: rc = nemo_coll_broadcast(c, out, op_or_root); break;
    }
done:
    nemo_tensor_release(in);
    nemo_tensor_release(out);
    g_stats = saved;
    return rc < 0 ? rc : 0;
}
static int fk_all_reduce(void *comm, const void *send, void *recv, size_t count, int dtype, int op, int dev,
                         void **event) {
    (void)dev;
    return fk_run(0, comm, send, recv, count, dtype, op, event);
}
static int fk_reduce_scatter(void *comm, const void *send, void *recv, size_t recvcount, int dtype, int op, int dev,
                             void **event) {
    (void)dev;
    return fk_run(1, comm, send, recv, recvcount, dtype, op, event);
}
static int fk_all_gather(void *comm, const void *send, void *recv, size_t sendcount, int dtype, int dev,
                         void **event) {
    (void)dev;
    return fk_run(2, comm, send, recv, sendcount, dtype, 0, event);
}
static int fk_broadcast(void *comm, void *buf, size_t count, int dtype, int root, int dev, void **event) {
    (void)dev;
    return fk_run(3, comm, buf, buf, count, dtype, root, event);
}
static int fk_all_to_all(void *comm, const void *send, void *recv, size_t count_per_rank, int dtype, int dev,
                         void **event) {
    (void)dev;
    return fk_run(4, comm, send, recv, count_per_rank, dtype, 0, event);
}
static int fk_query(void *comm, void *event) { (void)comm; (void)event; return 1; }
static void fk_event_free(void *event) { (void)event; }

static const nemo_nccl_table fake_nccl = {
    NEMO_NCCL_ABI, fk_error_text, fk_version, fk_get_unique_id, fk_comm_init, fk_comm_noop, fk_comm_noop,
    fk_all_reduce, fk_reduce_scatter, fk_all_gather, fk_broadcast, fk_query, fk_event_free, fk_all_to_all,
};

static const nemo_nccl_table *nccl_table(void) {
    if (nccl_probed) return nccl_tab;
    nccl_probed = 1;
    if (nemo_device_count(NEMO_CUDA) <= 0) {
        const char *why = nemo_cuda_unavailable_reason();
        snprintf(nccl_reason, sizeof nccl_reason, "the nccl backend needs a CUDA device: %s", why ? why : "none found");
        return NULL;
    }
    if (nemo_cuda_emulated()) {
        nccl_tab = &fake_nccl;
        nccl_reason[0] = 0;
        return nccl_tab;
    }
    nemo_nccl_get_fn get = (nemo_nccl_get_fn)nemo_kernel_get("coll.nccl", NEMO_CUDA);
    nemo_clear_error();
    if (!get) {
        snprintf(nccl_reason, sizeof nccl_reason, "libnemo_cuda.so has no NCCL backend (rebuild it: make)");
        return NULL;
    }
    const nemo_nccl_table *t = get();
    if (!t || t->abi != NEMO_NCCL_ABI) {
        snprintf(nccl_reason, sizeof nccl_reason, "libnemo_cuda.so's NCCL backend has ABI %d, expected %d",
                 t ? t->abi : -1, NEMO_NCCL_ABI);
        return NULL;
    }
    int v = 0;
    if (t->version(&v) < 0) {
        snprintf(nccl_reason, sizeof nccl_reason, "%s", t->error_text());
        return NULL;
    }
    nccl_tab = t;
    nccl_reason[0] = 0;
    return t;
}

NEMO_API const char *nemo_coll_nccl_unavailable_reason(void) {
    return nccl_table() ? NULL : nccl_reason;
}

NEMO_API int nemo_comm_has_nccl(const nemo_comm *c) { return c && c->nccl ? 1 : 0; }

NEMO_API int nemo_comm_enable_nccl(nemo_comm *c, int dev) {
    int rc = ready("enable_nccl", c);
    if (rc < 0) return rc;
    if (c->nccl) {
        if (c->nccl_dev == dev) return 0;
        return NEMO_ERR(NEMO_EINVAL, "enable_nccl: group '%s' already runs NCCL on cuda:%d, not cuda:%d", c->name,
                        c->nccl_dev, dev);
    }
    const nemo_nccl_table *t = nccl_table();
    if (!t) return NEMO_ERR(NEMO_EUNSUPPORTED, "enable_nccl: %s", nccl_reason);
    unsigned char id[NEMO_NCCL_ID_BYTES];
    memset(id, 0, sizeof id);
    if (c->rank == 0 && t->get_unique_id(id) < 0)
        return NEMO_ERR(NEMO_ECOMM, "enable_nccl on group '%s': ncclGetUniqueId: %s", c->name, t->error_text());
    if (c->size > 1) {
        /* the id travels over MPI, as a uint8 tensor over borrowed memory */
        nemo_tensor *tid = host_view(id, NEMO_NCCL_ID_BYTES, NEMO_BOOL);
        if (!tid) return nemo_last_status();
        rc = nemo_coll_broadcast(c, tid, 0);
        nemo_tensor_release(tid);
        if (rc < 0) return rc;
    }
    void *comm = NULL;
    fake_enabling = c;
    int irc = t->comm_init(&comm, c->size, id, c->rank, dev);
    fake_enabling = NULL;
    if (irc < 0)
        return NEMO_ERR(NEMO_ECOMM, "enable_nccl on group '%s' (rank %d of %d, cuda:%d): %s", c->name, c->rank,
                        c->size, dev, t->error_text());
    c->nccl = comm;
    c->nccl_dev = dev;
    return 0;
}
