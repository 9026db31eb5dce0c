/*
 * engine/cuda_stream.c: CUDA streams and events as libnemo exposes them (nemo.h, "CUDA streams
 * and events"), and the bookkeeping that keeps the caching allocators correct when more than
 * one stream touches memory (called from engine/core.c).
 *
 * Streams are ids per device: 0 the default (legacy) stream, 1..NEMO_CUDA_MAX_STREAMS the
 * plugin's pool of non-blocking streams. The current stream of each device is process-wide:
 * libnemo keeps its own copy (the allocator reads it on every allocation) and tells the plugin,
 * whose kernels launch there.
 *
 * Why the allocator needs this. engine/core.c caches freed device blocks and hands one to the
 * next request of its size class at once. That is safe while every user of the block queued
 * its work on one stream: the new owner's work is queued after the old owner's. With several
 * streams:
 * - A block belongs to the stream it was allocated on, and is cached for that stream only
 *   (core.c keys its bins by size class and stream). Blocks of stream 0 need no entry here;
 *   the others are in `side`, keyed by address.
 * - A block used on other streams too (nemo_record_stream, PyTorch's record_stream) is not
 *   cached when freed: an event is recorded on each of those streams and the block waits in
 *   `pending` until they have all completed; core.c sweeps `pending` before it looks in a bin,
 *   and synchronizes on them before it empties the cache.
 * - Page-locked host blocks that an asynchronous copy reads or writes get a guard event
 *   (nemo_pin_guard): freed before it completed, such a block waits in the pinned pending list
 *   instead of being handed to the next pin_memory.
 *
 * Non-obvious rules
 * - Lock order: core.c's mem_lock, then stream_lock. Every function named nemo_sblock_* and
 *   nemo_pin_* is called by core.c with mem_lock held.
 * - Events used internally come from a per-device free list and go back to it once complete.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"
#include "cuda_plugin.h"

#define SMAX_DEV 16          /* cuda:0..15, as libnemo's memory statistics */
#define NSID (NEMO_CUDA_MAX_STREAMS + 1)

static pthread_mutex_t stream_lock = PTHREAD_MUTEX_INITIALIZER;
static int cur_sid[SMAX_DEV];

struct nemo_cuda_event {
    void *h;          /* the plugin's event */
    int dev, timing, recorded;
};

/* ==== helpers ==== */

static const nemo_cuda_plugin *plug(const char *what, int devindex) {
    if (nemo_check_device(NEMO_CUDA, devindex) < 0) return NULL;
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    if (devindex >= SMAX_DEV) {
        NEMO_ERR(NEMO_EDEVICE, "%s: cuda:%d: streams are kept for cuda:0..%d", what, devindex, SMAX_DEV - 1);
        return NULL;
    }
    return p;
}

static int check_sid(const char *what, int sid) {
    if (sid < 0 || sid > NEMO_CUDA_MAX_STREAMS)
        return NEMO_ERR(NEMO_EINVAL, "%s: stream id %d out of range 0..%d", what, sid, NEMO_CUDA_MAX_STREAMS);
    return 0;
}

#define PLUG_TRY(call, ...) do {                                                             \
        if ((call) < 0) return NEMO_ERR(NEMO_ECUDA, __VA_ARGS__);                              \
    } while (0)

/* ==== streams ==== */

int nemo_cuda_cur_sid(int devindex) { return devindex >= 0 && devindex < SMAX_DEV ? cur_sid[devindex] : 0; }

NEMO_API int nemo_cuda_current_stream(int devindex) {
    if (!plug("current_stream", devindex)) return nemo_last_status();
    return cur_sid[devindex];
}

NEMO_API int nemo_cuda_set_stream(int devindex, int sid) {
    const nemo_cuda_plugin *p = plug("set_stream", devindex);
    if (!p) return nemo_last_status();
    if (check_sid("set_stream", sid) < 0) return nemo_last_status();
    PLUG_TRY(p->set_stream(devindex, sid), "set_stream: stream %d of cuda:%d: %s", sid, devindex, p->error_text());
    cur_sid[devindex] = sid;
    return 0;
}

NEMO_API int nemo_cuda_stream_synchronize(int devindex, int sid) {
    const nemo_cuda_plugin *p = plug("stream synchronize", devindex);
    if (!p) return nemo_last_status();
    if (check_sid("stream synchronize", sid) < 0) return nemo_last_status();
    PLUG_TRY(p->stream_synchronize(devindex, sid), "stream synchronize: %s", p->error_text());
    return 0;
}

NEMO_API int nemo_cuda_stream_query(int devindex, int sid) {
    const nemo_cuda_plugin *p = plug("stream query", devindex);
    if (!p) return nemo_last_status();
    if (check_sid("stream query", sid) < 0) return nemo_last_status();
    int done = 0;
    PLUG_TRY(p->stream_query(devindex, sid, &done), "stream query: %s", p->error_text());
    return done;
}

/* ==== events ==== */

NEMO_API nemo_cuda_event *nemo_cuda_event_new(int devindex, int timing) {
    const nemo_cuda_plugin *p = plug("Event", devindex);
    if (!p) return NULL;
    nemo_cuda_event *e = calloc(1, sizeof *e);
    if (!e) { NEMO_ERR(NEMO_ENOMEM, "Event: out of memory"); return NULL; }
    if (p->event_create(devindex, timing != 0, &e->h) < 0) {
        NEMO_ERR(NEMO_ECUDA, "Event: %s", p->error_text());
        free(e);
        return NULL;
    }
    e->dev = devindex;
    e->timing = timing != 0;
    return e;
}

NEMO_API void nemo_cuda_event_free(nemo_cuda_event *e) {
    if (!e) return;
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    if (p && e->h) p->event_destroy(e->h);
    free(e);
}

NEMO_API int nemo_cuda_event_record(nemo_cuda_event *e, int devindex, int sid) {
    if (!e) return NEMO_ERR(NEMO_EINVAL, "event record: event is NULL");
    const nemo_cuda_plugin *p = plug("event record", devindex);
    if (!p) return nemo_last_status();
    if (check_sid("event record", sid) < 0) return nemo_last_status();
    if (e->dev != devindex)
        return NEMO_ERR(NEMO_EDEVICE, "event record: the event was made for cuda:%d, the stream is on cuda:%d", e->dev,
                        devindex);
    PLUG_TRY(p->event_record(e->h, devindex, sid), "event record: %s", p->error_text());
    e->recorded = 1;
    return 0;
}

NEMO_API int nemo_cuda_event_wait(nemo_cuda_event *e, int devindex, int sid) {
    if (!e) return NEMO_ERR(NEMO_EINVAL, "event wait: event is NULL");
    const nemo_cuda_plugin *p = plug("event wait", devindex);
    if (!p) return nemo_last_status();
    if (check_sid("event wait", sid) < 0) return nemo_last_status();
    if (!e->recorded) return 0;   /* as CUDA: waiting for an event never recorded is a no-op */
    PLUG_TRY(p->event_wait(devindex, sid, e->h), "event wait: %s", p->error_text());
    return 0;
}

NEMO_API int nemo_cuda_event_query(nemo_cuda_event *e) {
    if (!e) return NEMO_ERR(NEMO_EINVAL, "event query: event is NULL");
    if (!e->recorded) return 1;
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    int done = 0;
    PLUG_TRY(p->event_query(e->h, &done), "event query: %s", p->error_text());
    return done;
}

NEMO_API int nemo_cuda_event_synchronize(nemo_cuda_event *e) {
    if (!e) return NEMO_ERR(NEMO_EINVAL, "event synchronize: event is NULL");
    if (!e->recorded) return 0;
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    PLUG_TRY(p->event_synchronize(e->h), "event synchronize: %s", p->error_text());
    return 0;
}

NEMO_API int nemo_cuda_event_elapsed(const nemo_cuda_event *start, const nemo_cuda_event *end, double *ms) {
    *ms = 0;
    if (!start || !end) return NEMO_ERR(NEMO_EINVAL, "elapsed_time: event is NULL");
    if (!start->timing || !end->timing)
        return NEMO_ERR(NEMO_EINVAL, "elapsed_time: both events need enable_timing = true");
    if (!start->recorded || !end->recorded)
        return NEMO_ERR(NEMO_EINVAL, "elapsed_time: both events must be recorded first");
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    float f = 0;
    PLUG_TRY(p->event_elapsed(start->h, end->h, &f), "elapsed_time: %s", p->error_text());
    *ms = f;
    return 0;
}

/* ==== internal events (a free list per device) ==== */

static void **ev_free[SMAX_DEV];
static int ev_nfree[SMAX_DEV], ev_cap[SMAX_DEV];

/* An event recorded on (dev, sid) now, or NULL (the error is set). stream_lock held. */
static void *ev_record(int dev, int sid) {
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    void *h = NULL;
    if (ev_nfree[dev] > 0) h = ev_free[dev][--ev_nfree[dev]];
    else if (p->event_create(dev, 0, &h) < 0) { NEMO_ERR(NEMO_ECUDA, "allocator event: %s", p->error_text()); return NULL; }
    if (p->event_record(h, dev, sid) < 0) {
        NEMO_ERR(NEMO_ECUDA, "allocator event record: %s", p->error_text());
        p->event_destroy(h);
        return NULL;
    }
    return h;
}
static void ev_put(int dev, void *h) {
    if (ev_nfree[dev] == ev_cap[dev]) {
        int nc = ev_cap[dev] ? 2 * ev_cap[dev] : 16;
        void **nl = realloc(ev_free[dev], sizeof(void *) * (size_t)nc);
        if (!nl) { nemo_cuda_plugin_ptr()->event_destroy(h); return; }
        ev_free[dev] = nl;
        ev_cap[dev] = nc;
    }
    ev_free[dev][ev_nfree[dev]++] = h;
}
/* Has h completed? wait: block until it has. An error counts as complete (the device is then
 * unusable anyway, and the block must not stay pending forever). */
static int ev_done(void *h, int wait) {
    const nemo_cuda_plugin *p = nemo_cuda_plugin_ptr();
    if (wait) {
        (void)p->event_synchronize(h);
        return 1;
    }
    int done = 0;
    if (p->event_query(h, &done) < 0) return 1;
    return done;
}

/* ==== device blocks used by streams other than 0 ==== */

typedef struct sblock {
    void *p;
    int dev, sid;          /* allocation stream */
    uint64_t used;         /* other streams that used it (bit per id) */
    struct sblock *next;
} sblock;
#define SBUCKETS 4096
static sblock *side[SBUCKETS];
static int nside;

static size_t sb_hash(const void *p) { return ((uintptr_t)p >> 9) & (SBUCKETS - 1); }
static sblock **sb_slot(const void *p) {
    sblock **s = &side[sb_hash(p)];
    while (*s && (*s)->p != p) s = &(*s)->next;
    return s;
}

void nemo_sblock_alloc(void *p, int dev, int sid) {
    if (sid == 0) return;
    sblock *b = calloc(1, sizeof *b);
    if (!b) return;   /* out of host memory: the block is then treated as stream 0's */
    b->p = p; b->dev = dev; b->sid = sid;
    pthread_mutex_lock(&stream_lock);
    sblock **s = &side[sb_hash(p)];
    b->next = *s;
    *s = b;
    nside++;
    pthread_mutex_unlock(&stream_lock);
}

typedef struct { void *p; size_t n; int dev, sid, nev; void *ev[NSID]; } pending_block;
static pending_block *pend;
static int npend, pend_cap;

int nemo_sblock_free(void *p, int dev, size_t n, int *sid) {
    *sid = 0;
    if (!nside) return 0;
    int rc = 0;
    pthread_mutex_lock(&stream_lock);
    sblock **s = sb_slot(p), *b = *s;
    if (b) {
        *s = b->next;
        nside--;
        *sid = b->sid;
        uint64_t used = b->used & ~((uint64_t)1 << b->sid);
        if (used && npend == pend_cap) {
            int nc = pend_cap ? 2 * pend_cap : 16;
            pending_block *np = realloc(pend, sizeof *np * (size_t)nc);
            if (np) { pend = np; pend_cap = nc; }
            else used = 0;   /* out of host memory: wait for the streams here instead */
            if (!used) (void)nemo_cuda_plugin_ptr()->synchronize(dev);
        }
        if (used) {
            pending_block *q = &pend[npend];
            q->p = p; q->n = n; q->dev = dev; q->sid = b->sid; q->nev = 0;
            for (int k = 0; k < NSID; k++)
                if (used & ((uint64_t)1 << k)) {
                    void *h = ev_record(dev, k);
                    if (h) q->ev[q->nev++] = h;
                }
            npend++;
            rc = 1;
        }
        free(b);
    }
    pthread_mutex_unlock(&stream_lock);
    return rc;
}

void nemo_sblock_sweep(int dev, int wait, void (*put)(void *p, size_t n, int dev, int sid)) {
    if (!npend) return;
    pthread_mutex_lock(&stream_lock);
    int w = 0;
    for (int i = 0; i < npend; i++) {
        pending_block *q = &pend[i];
        int done = dev < 0 || q->dev == dev ? 1 : 0;
        if (done) {
            int k = 0;
            while (k < q->nev && ev_done(q->ev[k], wait)) k++;
            done = k == q->nev;
        }
        if (done) {
            for (int k = 0; k < q->nev; k++) ev_put(q->dev, q->ev[k]);
            put(q->p, q->n, q->dev, q->sid);
        } else {
            pend[w++] = *q;
        }
    }
    npend = w;
    pthread_mutex_unlock(&stream_lock);
}

/* Marks block p (allocated on cuda:dev) as used on stream sid. */
static int sblock_use(void *p, int dev, int sid) {
    int rc = 0;
    pthread_mutex_lock(&stream_lock);
    sblock **s = sb_slot(p), *b = *s;
    if (!b && sid != 0) {   /* a stream 0 block used elsewhere */
        b = calloc(1, sizeof *b);
        if (!b) rc = NEMO_ERR(NEMO_ENOMEM, "record_stream: out of memory");
        else { b->p = p; b->dev = dev; b->sid = 0; b->next = side[sb_hash(p)]; side[sb_hash(p)] = b; nside++; }
    }
    if (b && b->sid != sid) b->used |= (uint64_t)1 << sid;
    pthread_mutex_unlock(&stream_lock);
    return rc;
}

NEMO_API int nemo_record_stream(const nemo_tensor *t, int sid) {
    if (!t) return NEMO_ERR(NEMO_EINVAL, "record_stream: tensor is NULL");
    if (t->devtype != NEMO_CUDA) return NEMO_ERR(NEMO_EDEVICE, "record_stream: the tensor is on the cpu, not a CUDA device");
    if (!plug("record_stream", t->devindex)) return nemo_last_status();
    if (check_sid("record_stream", sid) < 0) return nemo_last_status();
    if (!t->storage || !t->storage->data) return 0;   /* no memory (a freed FSDP buffer): nothing to protect */
    if (!nemo_storage_is_engine(t->storage))
        return NEMO_ERR(NEMO_EINVAL, "record_stream: the tensor's memory was not allocated by nemo");
    return sblock_use(t->storage->data, t->devindex, sid);
}

/* ==== page-locked blocks read or written by asynchronous copies ==== */

typedef struct { void *p; int dev; void *ev; } pin_guard;
static pin_guard *guards;
static int nguards, guard_cap;

int nemo_pin_guard(void *p, int dev, int sid) {
    int rc = 0;
    pthread_mutex_lock(&stream_lock);
    int i = 0;
    while (i < nguards && guards[i].p != p) i++;
    if (i < nguards) {   /* a copy is already in flight: wait for it before re-arming the guard */
        ev_done(guards[i].ev, 1);
        ev_put(guards[i].dev, guards[i].ev);
    } else if (nguards == guard_cap) {
        int nc = guard_cap ? 2 * guard_cap : 16;
        pin_guard *ng = realloc(guards, sizeof *ng * (size_t)nc);
        if (!ng) { rc = NEMO_ERR(NEMO_ENOMEM, "non_blocking copy: out of memory"); goto done; }
        guards = ng;
        guard_cap = nc;
    }
    guards[i].p = p;
    guards[i].dev = dev;
    guards[i].ev = ev_record(dev, sid);
    if (!guards[i].ev) { rc = nemo_last_status(); goto done; }
    if (i == nguards) nguards++;
done:
    if (rc < 0 && i < nguards) guards[i] = guards[--nguards];
    pthread_mutex_unlock(&stream_lock);
    return rc;
}

/* 1 when the pinned block p still has a copy in flight (wait: block until it has not). The
 * guard is dropped once its copy completed. */
int nemo_pin_busy(void *p, int wait) {
    if (!nguards) return 0;
    int busy = 0;
    pthread_mutex_lock(&stream_lock);
    for (int i = 0; i < nguards; i++) {
        if (guards[i].p != p) continue;
        if (ev_done(guards[i].ev, wait)) {
            ev_put(guards[i].dev, guards[i].ev);
            guards[i] = guards[--nguards];
        } else {
            busy = 1;
        }
        break;
    }
    pthread_mutex_unlock(&stream_lock);
    return busy;
}
