/*
 * safetensors.c: read and write safetensors files.
 *
 * Format: 8-byte little-endian u64 N, N bytes of JSON header {"name": {"dtype": "F32",
 * "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}, then the
 * data; offsets count from the first byte after the header.
 *
 * Non-obvious rules
 * - Reading maps the whole file MAP_PRIVATE and never copies it: a tensor is a storage over its
 *   own byte range whose free_fn drops a reference to the file, so the mapping outlives
 *   nemo_st_close while tensors use it. Writable copy-on-write pages (MAP_NORESERVE, so no
 *   commit charge) mean an in-place op on a loaded tensor cannot crash and cannot change the
 *   file. Only a tensor misaligned for its element size is copied (the reference writer always
 *   aligns; other writers may not).
 * - The header is untrusted: the JSON parser below is strict (objects, arrays, strings with
 *   escapes, integers, true/false/null; depth-limited; UTF-8 checked) and every problem becomes
 *   an error naming the file, never a crash. Gaps between tensors and trailing bytes are
 *   accepted (nothing reads them); overlapping tensors are not.
 * - Writing follows the reference implementation (huggingface/safetensors, tensor.rs
 *   `prepare`): sort by dtype descending in its enum order (an alignment order), then by name
 *   bytewise; pack without gaps; "__metadata__" first; pad the header with spaces to a multiple
 *   of 8 so every tensor is aligned; then write to a temporary file, fsync and rename.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format is little-endian)"
#endif

#define ST_MAX_HEADER 100000000ull   /* as the reference: larger headers are refused */
#define ST_MAX_DEPTH 64

/* ==== dtypes ==== */

/* Every dtype the format knows, in the reference enum's order (the writer sorts by it). bits is
 * the element size in bits; nemo is the nemo dtype or -1 when nemo cannot hold it. */
static const struct { const char *name; int bits; int nemo; } st_dtypes[] = {
    {"BOOL", 8, NEMO_BOOL}, {"F4", 4, -1}, {"F6_E2M3", 6, -1}, {"F6_E3M2", 6, -1},
    {"U8", 8, -1}, {"I8", 8, -1}, {"F8_E5M2", 8, -1}, {"F8_E4M3", 8, -1}, {"F8_E8M0", 8, -1},
    {"F8_E4M3FNUZ", 8, -1}, {"F8_E5M2FNUZ", 8, -1}, {"I16", 16, -1}, {"U16", 16, -1},
    {"F16", 16, NEMO_F16}, {"BF16", 16, NEMO_BF16}, {"I32", 32, NEMO_I32}, {"U32", 32, -1},
    {"F32", 32, NEMO_F32}, {"C64", 64, -1}, {"F64", 64, NEMO_F64}, {"I64", 64, NEMO_I64},
    {"U64", 64, -1},
};
#define ST_NDTYPES ((int)(sizeof st_dtypes / sizeof st_dtypes[0]))

static int st_dtype_lookup(const char *s) {
    for (int i = 0; i < ST_NDTYPES; i++) if (!strcmp(st_dtypes[i].name, s)) return i;
    return -1;
}

static int st_dtype_of_nemo(int dtype) {
    for (int i = 0; i < ST_NDTYPES; i++) if (st_dtypes[i].nemo == dtype) return i;
    return -1;
}

/* ==== UTF-8 ==== */

/* Length of the valid UTF-8 sequence at p (at most n bytes), or 0 if it is invalid
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static int utf8_seq(const unsigned char *p, size_t n) {
    unsigned c = p[0];
    if (c < 0x80) return 1;
    int len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else return 0;
    if ((size_t)len > n) return 0;
    if (p[1] < lo || p[1] > hi) return 0;
    for (int k = 2; k < len; k++) if (p[k] < 0x80 || p[k] > 0xbf) return 0;
    return len;
}

static int utf8_valid(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    while (n) {
        int k = utf8_seq(p, n);
        if (!k) return 0;
        p += k; n -= (size_t)k;
    }
    return 1;
}

/* ==== A strict JSON parser for the header ==== */

enum { J_OBJ, J_ARR, J_STR, J_INT, J_TRUE, J_FALSE, J_NULL };
static const char *jtype_name[] = {"an object", "an array", "a string", "an integer", "true",
                                   "false", "null"};

/* Nodes live in one array and point at each other by index (the array grows). Strings are
 * decoded into one buffer that never moves (a decoded string is never longer than its text). */
typedef struct {
    int type;
    int first, next, count;     /* children (objects, arrays) as a list; sibling link */
    const char *key;            /* the member name when the parent is an object */
    const char *str;            /* J_STR: decoded, NUL-terminated */
    int64_t num;                /* J_INT */
} jnode;

typedef struct {
    const char *begin, *p, *end;
    jnode *nodes;
    int nn, cap;
    char *sbuf;
    size_t sused, scap;
    char err[256];
} jparser;

static int jfail(jparser *J, const char *what) {
    if (!J->err[0])
        snprintf(J->err, sizeof J->err, "invalid JSON at byte %zu: %s",
                 (size_t)(J->p - J->begin), what);
    return -1;
}

static void jws(jparser *J) {
    while (J->p < J->end && (*J->p == ' ' || *J->p == '\t' || *J->p == '\n' || *J->p == '\r')) J->p++;
}

static int jnew(jparser *J, int type) {
    if (J->nn == J->cap) {
        int cap = J->cap ? J->cap * 2 : 64;
        jnode *nn = realloc(J->nodes, (size_t)cap * sizeof *nn);
        if (!nn) return jfail(J, "out of memory");
        J->nodes = nn; J->cap = cap;
    }
    jnode *n = &J->nodes[J->nn];
    n->type = type; n->first = n->next = -1; n->count = 0;
    n->key = NULL; n->str = NULL; n->num = 0;
    return J->nn++;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int jhex4(jparser *J, unsigned *out) {
    if (J->end - J->p < 4) return jfail(J, "truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(J->p[k]);
        if (h < 0) return jfail(J, "bad hex digit in \\u escape");
        v = v * 16 + (unsigned)h;
    }
    J->p += 4;
    *out = v;
    return 0;
}

/* Parse a string at J->p (on the opening quote); returns the decoded text in sbuf. */
static const char *jstring(jparser *J) {
    if (J->p >= J->end || *J->p != '"') { jfail(J, "expected a string"); return NULL; }
    J->p++;
    char *out = J->sbuf + J->sused, *o = out;
    for (;;) {
        if (J->p >= J->end) { jfail(J, "unterminated string"); return NULL; }
        unsigned char c = (unsigned char)*J->p;
        if (c == '"') { J->p++; break; }
        if (c < 0x20) { jfail(J, "control character in a string"); return NULL; }
        if (c == '\\') {
            J->p++;
            if (J->p >= J->end) { jfail(J, "unterminated escape"); return NULL; }
            char e = *J->p++;
            switch (e) {
            case '"': *o++ = '"'; break;
            case '\\': *o++ = '\\'; break;
            case '/': *o++ = '/'; break;
            case 'b': *o++ = '\b'; break;
            case 'f': *o++ = '\f'; break;
            case 'n': *o++ = '\n'; break;
            case 'r': *o++ = '\r'; break;
            case 't': *o++ = '\t'; break;
            case 'u': {
                unsigned cp;
                if (jhex4(J, &cp) < 0) return NULL;
                if (cp >= 0xdc00 && cp <= 0xdfff) { jfail(J, "lone low surrogate in \\u escape"); return NULL; }
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    unsigned lo;
                    if (J->end - J->p < 2 || J->p[0] != '\\' || J->p[1] != 'u') {
                        jfail(J, "high surrogate without a low surrogate"); return NULL;
                    }
                    J->p += 2;
                    if (jhex4(J, &lo) < 0) return NULL;
                    if (lo < 0xdc00 || lo > 0xdfff) { jfail(J, "high surrogate without a low surrogate"); return NULL; }
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                }
                if (cp == 0) { jfail(J, "\\u0000 is not accepted in names and values"); return NULL; }
                if (cp < 0x80) *o++ = (char)cp;
                else if (cp < 0x800) { *o++ = (char)(0xc0 | (cp >> 6)); *o++ = (char)(0x80 | (cp & 0x3f)); }
                else if (cp < 0x10000) {
                    *o++ = (char)(0xe0 | (cp >> 12)); *o++ = (char)(0x80 | ((cp >> 6) & 0x3f));
                    *o++ = (char)(0x80 | (cp & 0x3f));
                } else {
                    *o++ = (char)(0xf0 | (cp >> 18)); *o++ = (char)(0x80 | ((cp >> 12) & 0x3f));
                    *o++ = (char)(0x80 | ((cp >> 6) & 0x3f)); *o++ = (char)(0x80 | (cp & 0x3f));
                }
                break;
            }
            default: jfail(J, "unknown escape in a string"); return NULL;
            }
            continue;
        }
        int k = utf8_seq((const unsigned char *)J->p, (size_t)(J->end - J->p));
        if (!k) { jfail(J, "invalid UTF-8 in a string"); return NULL; }
        memcpy(o, J->p, (size_t)k);
        o += k; J->p += k;
    }
    *o++ = 0;
    J->sused += (size_t)(o - out);
    return out;
}

static int jvalue(jparser *J, int depth);

static int jnumber(jparser *J) {
    const char *s = J->p;
    int neg = 0;
    if (*J->p == '-') { neg = 1; J->p++; }
    if (J->p >= J->end || *J->p < '0' || *J->p > '9') return jfail(J, "bad number");
    if (*J->p == '0' && J->p + 1 < J->end && J->p[1] >= '0' && J->p[1] <= '9')
        return jfail(J, "number with a leading zero");
    uint64_t v = 0;
    while (J->p < J->end && *J->p >= '0' && *J->p <= '9') {
        unsigned d = (unsigned)(*J->p - '0');
        if (v > (UINT64_C(9223372036854775807) - d) / 10) return jfail(J, "integer out of range");
        v = v * 10 + d;
        J->p++;
    }
    if (J->p < J->end && (*J->p == '.' || *J->p == 'e' || *J->p == 'E')) {
        J->p = s;
        return jfail(J, "a non-integer number (shapes and offsets are integers)");
    }
    int i = jnew(J, J_INT);
    if (i < 0) return -1;
    J->nodes[i].num = neg ? -(int64_t)v : (int64_t)v;
    return i;
}

static int jliteral(jparser *J, const char *word, int type) {
    size_t n = strlen(word);
    if ((size_t)(J->end - J->p) < n || memcmp(J->p, word, n)) return jfail(J, "unexpected character");
    J->p += n;
    return jnew(J, type);
}

static int jcontainer(jparser *J, int depth, int obj) {
    int self = jnew(J, obj ? J_OBJ : J_ARR);
    if (self < 0) return -1;
    J->p++;
    jws(J);
    if (J->p < J->end && *J->p == (obj ? '}' : ']')) { J->p++; return self; }
    int last = -1;
    for (;;) {
        const char *key = NULL;
        jws(J);
        if (obj) {
            if (!(key = jstring(J))) return -1;
            jws(J);
            if (J->p >= J->end || *J->p != ':') return jfail(J, "expected ':' after a member name");
            J->p++;
        }
        int c = jvalue(J, depth + 1);
        if (c < 0) return -1;
        J->nodes[c].key = key;
        if (last < 0) J->nodes[self].first = c; else J->nodes[last].next = c;
        last = c;
        J->nodes[self].count++;
        jws(J);
        if (J->p >= J->end) return jfail(J, obj ? "unterminated object" : "unterminated array");
        if (*J->p == ',') { J->p++; continue; }
        if (*J->p == (obj ? '}' : ']')) { J->p++; return self; }
        return jfail(J, obj ? "expected ',' or '}' in an object" : "expected ',' or ']' in an array");
    }
}

static int jvalue(jparser *J, int depth) {
    if (depth > ST_MAX_DEPTH) return jfail(J, "nested too deeply");
    jws(J);
    if (J->p >= J->end) return jfail(J, "unexpected end of the header");
    switch (*J->p) {
    case '{': return jcontainer(J, depth, 1);
    case '[': return jcontainer(J, depth, 0);
    case '"': {
        const char *s = jstring(J);
        if (!s) return -1;
        int i = jnew(J, J_STR);
        if (i >= 0) J->nodes[i].str = s;
        return i;
    }
    case 't': return jliteral(J, "true", J_TRUE);
    case 'f': return jliteral(J, "false", J_FALSE);
    case 'n': return jliteral(J, "null", J_NULL);
    default:
        if (*J->p == '-' || (*J->p >= '0' && *J->p <= '9')) return jnumber(J);
        return jfail(J, "unexpected character");
    }
}

/* Parse text[0..n) as one JSON value followed only by whitespace. Returns the root index or -1
 * with J->err set. On success J->sbuf holds the strings (the caller may keep it). */
static int jparse(jparser *J, const char *text, size_t n) {
    memset(J, 0, sizeof *J);
    J->begin = J->p = text; J->end = text + n;
    J->scap = n + 16;
    J->sbuf = malloc(J->scap);
    if (!J->sbuf) { snprintf(J->err, sizeof J->err, "out of memory for a header of %zu bytes", n); return -1; }
    int root = jvalue(J, 0);
    if (root < 0) return -1;
    jws(J);
    if (J->p != J->end) return jfail(J, "unexpected text after the JSON value");
    return root;
}

static void jfree(jparser *J) {
    free(J->nodes);
    free(J->sbuf);
    J->nodes = NULL; J->sbuf = NULL;
}

/* ==== A growable byte buffer (header output) ==== */

typedef struct { char *p; size_t n, cap; int oom; } sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->n + n + 1 > cap) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) { b->oom = 1; return; }
        b->p = q; b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }
static void sb_fmt(sbuf *b, const char *fmt, long long v) {
    char tmp[32];
    int k = snprintf(tmp, sizeof tmp, fmt, v);
    sb_put(b, tmp, (size_t)k);
}

/* A JSON string literal as serde_json writes it: escape '"', '\\' and control characters. */
static void sb_json_str(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        char esc[8];
        const char *e = NULL;
        switch (c) {
        case '"': e = "\\\""; break;
        case '\\': e = "\\\\"; break;
        case '\b': e = "\\b"; break;
        case '\f': e = "\\f"; break;
        case '\n': e = "\\n"; break;
        case '\r': e = "\\r"; break;
        case '\t': e = "\\t"; break;
        default:
            if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); e = esc; }
        }
        if (e) sb_str(b, e); else sb_put(b, p, 1);
    }
    sb_put(b, "\"", 1);
}

/* ==== Metadata objects ==== */

typedef struct { const char *key, *val; } kv;

static int cmp_kv(const void *a, const void *b) {
    return strcmp(((const kv *)a)->key, ((const kv *)b)->key);
}

/* Check that node obj (called `what` in messages) is an object of string values with distinct
 * keys, and append it to out as compact JSON: keys in file order, or sorted bytewise when
 * sorted != 0. On a problem writes a message (without the file name) into err, returns -1. */
static int metadata_to_json(const jparser *J, int obj, const char *what, int sorted, sbuf *out,
                            char *err, size_t errn) {
    const jnode *o = &J->nodes[obj];
    if (o->type != J_OBJ) {
        snprintf(err, errn, "%s is %s, expected an object of strings", what, jtype_name[o->type]);
        return -1;
    }
    int n = o->count, rc = 0, k = 0;
    kv *items = malloc((size_t)(n ? n : 1) * 2 * sizeof *items), *byk = items + n;
    if (!items) { snprintf(err, errn, "out of memory"); return -1; }
    for (int c = o->first; c >= 0; c = J->nodes[c].next, k++) {
        const jnode *v = &J->nodes[c];
        if (v->type != J_STR) {
            snprintf(err, errn, "%s value for key '%s' is %s, expected a string", what, v->key,
                     jtype_name[v->type]);
            rc = -1; goto done;
        }
        items[k].key = byk[k].key = v->key;
        items[k].val = byk[k].val = v->str;
    }
    qsort(byk, (size_t)n, sizeof *byk, cmp_kv);
    for (int i = 1; i < n; i++)
        if (!strcmp(byk[i - 1].key, byk[i].key)) {
            snprintf(err, errn, "duplicate %s key '%s'", what, byk[i].key);
            rc = -1; goto done;
        }
    const kv *src = sorted ? byk : items;
    sb_put(out, "{", 1);
    for (int i = 0; i < n; i++) {
        if (i) sb_put(out, ",", 1);
        sb_json_str(out, src[i].key);
        sb_put(out, ":", 1);
        sb_json_str(out, src[i].val);
    }
    sb_put(out, "}", 1);
    if (out->oom) { snprintf(err, errn, "out of memory"); rc = -1; }
done:
    free(items);
    return rc;
}

/* ==== Reading ==== */

typedef struct {
    const char *name;
    const char *dtype_name;    /* as in the file */
    int st_dtype;              /* index into st_dtypes */
    int ndim;
    int64_t shape[NEMO_MAXDIM];
    uint64_t begin, end;       /* relative to the data section */
} st_entry;

struct nemo_st_file {
    int refcount;
    char *path;
    unsigned char *map;
    size_t size;               /* bytes mapped: the whole file */
    size_t data_start;         /* 8 + N */
    int n;
    st_entry *e;               /* file order */
    int *by_name;              /* indices sorted by name, for nemo_st_find */
    char *strings;             /* the parser's string buffer: names and dtype strings */
    char *metadata;            /* compact JSON or NULL */
};

static void st_free(nemo_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->size);
    free(f->path); free(f->e); free(f->by_name); free(f->strings); free(f->metadata);
    free(f);
}

static void st_unref(nemo_st_file *f) {
    if (f && __atomic_sub_fetch(&f->refcount, 1, __ATOMIC_ACQ_REL) == 0) st_free(f);
}

/* free_fn of a tensor storage over the mapping: drop the file reference it holds. */
static void st_storage_free(void *ctx, void *data, size_t nbytes) {
    NEMO_UNUSED(data); NEMO_UNUSED(nbytes);
    st_unref(ctx);
}

static int cmp_entry_offset(const void *a, const void *b) {
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_index_name(const void *a, const void *b, void *base) {
    const st_entry *e = base;
    return strcmp(e[*(const int *)a].name, e[*(const int *)b].name);
}

/* Fill entry e from the tensor description node d; message into err on a problem. */
static int parse_entry(const jparser *J, int d, st_entry *e, uint64_t data_len, char *err, size_t errn) {
    const jnode *o = &J->nodes[d];
    e->name = o->key;
    if (o->type != J_OBJ) {
        snprintf(err, errn, "entry '%s' is %s, expected an object with dtype, shape and data_offsets",
                 e->name, jtype_name[o->type]);
        return -1;
    }
    int dt = -1, sh = -1, off = -1;
    for (int c = o->first; c >= 0; c = J->nodes[c].next) {
        const char *k = J->nodes[c].key;
        int *slot = !strcmp(k, "dtype") ? &dt : !strcmp(k, "shape") ? &sh : !strcmp(k, "data_offsets") ? &off : NULL;
        if (!slot) continue;   /* unknown fields are ignored, as the reference does */
        if (*slot >= 0) { snprintf(err, errn, "tensor '%s' has two '%s' fields", e->name, k); return -1; }
        *slot = c;
    }
    const char *missing = dt < 0 ? "dtype" : sh < 0 ? "shape" : off < 0 ? "data_offsets" : NULL;
    if (missing) { snprintf(err, errn, "tensor '%s' has no '%s'", e->name, missing); return -1; }
    /* dtype */
    if (J->nodes[dt].type != J_STR) {
        snprintf(err, errn, "tensor '%s': dtype is %s, expected a string", e->name, jtype_name[J->nodes[dt].type]);
        return -1;
    }
    e->dtype_name = J->nodes[dt].str;
    e->st_dtype = st_dtype_lookup(e->dtype_name);
    if (e->st_dtype < 0) {
        snprintf(err, errn, "tensor '%s' has unknown dtype '%.40s'", e->name, e->dtype_name);
        return -1;
    }
    /* shape */
    const jnode *s = &J->nodes[sh];
    if (s->type != J_ARR) {
        snprintf(err, errn, "tensor '%s': shape is %s, expected an array of integers", e->name, jtype_name[s->type]);
        return -1;
    }
    if (s->count > NEMO_MAXDIM) {
        snprintf(err, errn, "tensor '%s' has %d dimensions, nemo supports at most %d", e->name, s->count, NEMO_MAXDIM);
        return -1;
    }
    e->ndim = 0;
    uint64_t bits = (uint64_t)st_dtypes[e->st_dtype].bits;
    int overflow = 0;
    for (int c = s->first; c >= 0; c = J->nodes[c].next) {
        const jnode *v = &J->nodes[c];
        if (v->type != J_INT) {
            snprintf(err, errn, "tensor '%s': shape element %d is %s, expected an integer", e->name, e->ndim,
                     jtype_name[v->type]);
            return -1;
        }
        if (v->num < 0) {
            snprintf(err, errn, "tensor '%s' has a negative dimension %lld (dimension %d)", e->name,
                     (long long)v->num, e->ndim);
            return -1;
        }
        if (__builtin_mul_overflow(bits, (uint64_t)v->num, &bits)) overflow = 1;
        e->shape[e->ndim++] = v->num;
    }
    /* data_offsets */
    const jnode *a = &J->nodes[off];
    if (a->type != J_ARR || a->count != 2 || J->nodes[a->first].type != J_INT ||
        J->nodes[J->nodes[a->first].next].type != J_INT) {
        snprintf(err, errn, "tensor '%s': data_offsets must be an array of two integers [begin, end]", e->name);
        return -1;
    }
    int64_t b = J->nodes[a->first].num, en = J->nodes[J->nodes[a->first].next].num;
    if (b < 0 || en < b || (uint64_t)en > data_len) {
        snprintf(err, errn, "tensor '%s': data_offsets [%lld, %lld] out of range (the data section has %llu bytes)",
                 e->name, (long long)b, (long long)en, (unsigned long long)data_len);
        return -1;
    }
    e->begin = (uint64_t)b; e->end = (uint64_t)en;
    char sbuf_[160];
    nemo_shape_str_n(e->ndim, e->shape, sbuf_, sizeof sbuf_);
    if (overflow || bits % 8 || bits / 8 != e->end - e->begin) {
        if (overflow)
            snprintf(err, errn, "tensor '%s': shape %s is too large", e->name, sbuf_);
        else
            snprintf(err, errn, "tensor '%s': shape %s of dtype %s needs %llu bytes but data_offsets [%lld, %lld] hold %llu",
                     e->name, sbuf_, e->dtype_name, (unsigned long long)(bits / 8 + (bits % 8 != 0)),
                     (long long)b, (long long)en, (unsigned long long)(e->end - e->begin));
        return -1;
    }
    return 0;
}

NEMO_API nemo_st_file *nemo_st_open(const char *path) {
    int fd = -1;
    nemo_st_file *f = NULL;
    jparser J;
    memset(&J, 0, sizeof J);
    sbuf meta = {0};
    char err[768];
    err[0] = 0;
    if (!path) { NEMO_ERR(NEMO_EINVAL, "safetensors: open: path is NULL"); return NULL; }

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { NEMO_ERR(NEMO_EIO, "safetensors: cannot open '%s': %s", path, strerror(errno)); return NULL; }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        NEMO_ERR(NEMO_EIO, "safetensors: cannot stat '%s': %s", path, strerror(errno));
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) { NEMO_ERR(NEMO_EIO, "safetensors: '%s' is a directory, not a file", path); goto fail; }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s' has %zu bytes, too short for the 8-byte header length", path, size);
        goto fail;
    }
    f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) { NEMO_ERR(NEMO_ENOMEM, "safetensors: out of memory opening '%s'", path); goto fail; }
    f->refcount = 1;
    /* Writable private pages: an in-place op on a loaded tensor copies the page instead of
     * crashing; MAP_NORESERVE keeps a 24 GB file from counting against the commit limit. */
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    if (m == MAP_FAILED) m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) { NEMO_ERR(NEMO_EIO, "safetensors: cannot map '%s': %s", path, strerror(errno)); goto fail; }
    f->map = m;
    f->size = size;
    close(fd);
    fd = -1;

    uint64_t hlen = 0;
    for (int k = 7; k >= 0; k--) hlen = (hlen << 8) | f->map[k];
    if (hlen > ST_MAX_HEADER) {
        NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': header length %llu is larger than the %llu bytes accepted "
                 "(not a safetensors file?)", path, (unsigned long long)hlen, ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > size - 8) {
        NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': header length %llu runs past the end of the file (%zu bytes)",
                 path, (unsigned long long)hlen, size);
        goto fail;
    }
    f->data_start = 8 + (size_t)hlen;
    uint64_t data_len = size - f->data_start;

    int root = jparse(&J, (const char *)f->map + 8, (size_t)hlen);
    if (root < 0) { NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': header: %s", path, J.err); goto fail; }
    const jnode *r = &J.nodes[root];
    if (r->type != J_OBJ) {
        NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': the header is %s, expected a JSON object", path, jtype_name[r->type]);
        goto fail;
    }
    f->e = calloc((size_t)(r->count ? r->count : 1), sizeof *f->e);
    if (!f->e) { NEMO_ERR(NEMO_ENOMEM, "safetensors: out of memory opening '%s'", path); goto fail; }
    int nmeta = 0;
    for (int c = r->first; c >= 0; c = J.nodes[c].next) {
        if (!strcmp(J.nodes[c].key, "__metadata__")) {
            if (nmeta++) { NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': two \"__metadata__\" entries", path); goto fail; }
            if (metadata_to_json(&J, c, "\"__metadata__\"", 0, &meta, err, sizeof err) < 0) {
                NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': %s", path, err);
                goto fail;
            }
            continue;
        }
        if (parse_entry(&J, c, &f->e[f->n], data_len, err, sizeof err) < 0) {
            NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': %s", path, err);
            goto fail;
        }
        f->n++;
    }
    /* file order, then overlaps */
    qsort(f->e, (size_t)f->n, sizeof *f->e, cmp_entry_offset);
    int owner = -1;
    uint64_t max_end = 0;
    for (int i = 0; i < f->n; i++) {
        const st_entry *e = &f->e[i];
        if (e->begin == e->end) continue;   /* empty tensors occupy no bytes */
        if (owner >= 0 && e->begin < max_end) {
            NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap",
                     path, f->e[owner].name, (unsigned long long)f->e[owner].begin, (unsigned long long)f->e[owner].end,
                     e->name, (unsigned long long)e->begin, (unsigned long long)e->end);
            goto fail;
        }
        if (e->end > max_end) { max_end = e->end; owner = i; }
    }
    /* name index, then duplicates */
    f->by_name = malloc((size_t)(f->n > 0 ? f->n : 1) * sizeof *f->by_name);
    if (!f->by_name) { NEMO_ERR(NEMO_ENOMEM, "safetensors: out of memory opening '%s'", path); goto fail; }
    for (int i = 0; i < f->n; i++) f->by_name[i] = i;
    qsort_r(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_index_name, f->e);
    for (int i = 1; i < f->n; i++)
        if (!strcmp(f->e[f->by_name[i - 1]].name, f->e[f->by_name[i]].name)) {
            NEMO_ERR(NEMO_EFORMAT, "safetensors: '%s': duplicate tensor name '%s'", path, f->e[f->by_name[i]].name);
            goto fail;
        }
    if (nmeta) {
        if (meta.oom) { NEMO_ERR(NEMO_ENOMEM, "safetensors: out of memory opening '%s'", path); goto fail; }
        f->metadata = meta.p;
        meta.p = NULL;
    }
    f->strings = J.sbuf;
    J.sbuf = NULL;
    jfree(&J);
    return f;

fail:
    if (fd >= 0) close(fd);
    jfree(&J);
    free(meta.p);
    st_free(f);
    return NULL;
}

NEMO_API void nemo_st_close(nemo_st_file *f) { st_unref(f); }

NEMO_API int nemo_st_count(const nemo_st_file *f) {
    if (!f) return NEMO_ERR(NEMO_EINVAL, "safetensors: count: file is NULL (closed?)");
    return f->n;
}

NEMO_API const char *nemo_st_name(const nemo_st_file *f, int i) {
    if (!f || i < 0 || i >= f->n) return NULL;
    return f->e[i].name;
}

NEMO_API const char *nemo_st_dtype_name(const nemo_st_file *f, int i) {
    if (!f || i < 0 || i >= f->n) return NULL;
    return f->e[i].dtype_name;
}

NEMO_API int nemo_st_find(const nemo_st_file *f, const char *name) {
    if (!f || !name) return -1;
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(f->e[f->by_name[mid]].name, name);
        if (c == 0) return f->by_name[mid];
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

NEMO_API const char *nemo_st_metadata(const nemo_st_file *f) { return f ? f->metadata : NULL; }

NEMO_API nemo_tensor *nemo_st_tensor(nemo_st_file *f, int i) {
    if (!f) { NEMO_ERR(NEMO_EINVAL, "safetensors: tensor: file is NULL (closed?)"); return NULL; }
    if (i < 0 || i >= f->n) {
        NEMO_ERR(NEMO_EINVAL, "safetensors: '%s': tensor index %d out of range (%d tensors)", f->path, i, f->n);
        return NULL;
    }
    const st_entry *e = &f->e[i];
    int dtype = st_dtypes[e->st_dtype].nemo;
    if (dtype < 0) {
        NEMO_ERR(NEMO_EDTYPE, "safetensors: unsupported dtype %s for tensor '%s' in file '%s' "
                 "(nemo reads F64, F32, F16, BF16, I64, I32 and BOOL)", e->dtype_name, e->name, f->path);
        return NULL;
    }
    unsigned char *p = f->map + f->data_start + e->begin;
    size_t nbytes = (size_t)(e->end - e->begin);
    if (nbytes && (uintptr_t)p % (uintptr_t)nemo_dtype_size(dtype)) {
        /* misaligned for its element type (not from the reference writer): copy */
        nemo_tensor *t = nemo_empty(e->ndim, e->shape, dtype, NEMO_CPU, 0);
        if (t) memcpy(nemo_tensor_data(t), p, nbytes);
        return t;
    }
    __atomic_add_fetch(&f->refcount, 1, __ATOMIC_RELAXED);
    nemo_storage *s = nemo_storage_wrap(p, nbytes, NEMO_CPU, 0, st_storage_free, f);
    if (!s) { st_unref(f); return NULL; }
    nemo_tensor *t = nemo_tensor_from_storage(s, dtype, e->ndim, e->shape, NULL, 0);
    nemo_storage_release(s);   /* the tensor holds its own reference (or, on failure, none) */
    return t;
}

/* ==== Writing ==== */

static int write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t k = write(fd, p, chunk);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += k; n -= (size_t)k;
    }
    return 0;
}

typedef struct { const char *const *names; nemo_tensor *const *tensors; } save_ctx;
/* The reference order: dtype descending in st_dtypes order, then name bytewise. */
static int cmp_save_order(const void *a, const void *b, void *ctx) {
    const save_ctx *S = ctx;
    int i = *(const int *)a, j = *(const int *)b;
    int di = st_dtype_of_nemo(S->tensors[i]->dtype), dj = st_dtype_of_nemo(S->tensors[j]->dtype);
    if (di != dj) return di > dj ? -1 : 1;
    return strcmp(S->names[i], S->names[j]);
}
static int cmp_save_name(const void *a, const void *b, void *ctx) {
    const save_ctx *S = ctx;
    return strcmp(S->names[*(const int *)a], S->names[*(const int *)b]);
}

NEMO_API int nemo_st_save(const char *path, int n, const char *const *names, nemo_tensor *const *tensors,
                          const char *metadata_json) {
    int rc = 0, fd = -1;
    int *order = NULL, *byname = NULL;
    char *tmp = NULL;
    sbuf h = {0};
    jparser J;
    memset(&J, 0, sizeof J);
    nemo_tensor *c = NULL;

    NEMO_CHECK(path && *path, NEMO_EINVAL, "save_file: path is empty");
    NEMO_CHECK(n >= 0, NEMO_EINVAL, "save_file '%s': tensor count %d is negative", path, n);
    NEMO_CHECK(n == 0 || (names && tensors), NEMO_EINVAL, "save_file '%s': names or tensors is NULL", path);
    for (int i = 0; i < n; i++) {
        NEMO_CHECK(names[i], NEMO_EINVAL, "save_file '%s': name %d is NULL", path, i);
        NEMO_CHECK(tensors[i], NEMO_EINVAL, "save_file '%s': tensor '%s' is NULL", path, names[i]);
        NEMO_CHECK(strcmp(names[i], "__metadata__"), NEMO_EINVAL,
                   "save_file '%s': '__metadata__' is reserved and cannot name a tensor", path);
        NEMO_CHECK(utf8_valid(names[i]), NEMO_EINVAL, "save_file '%s': tensor name '%s' is not valid UTF-8", path, names[i]);
        NEMO_CHECK(st_dtype_of_nemo(tensors[i]->dtype) >= 0, NEMO_EDTYPE, "save_file '%s': tensor '%s' has unknown dtype %d",
                   path, names[i], tensors[i]->dtype);
    }
    order = malloc((size_t)(n ? n : 1) * sizeof *order);
    byname = malloc((size_t)(n ? n : 1) * sizeof *byname);
    NEMO_CHECK(order && byname, NEMO_ENOMEM, "save_file '%s': out of memory", path);
    for (int i = 0; i < n; i++) order[i] = byname[i] = i;
    save_ctx S = {names, tensors};
    qsort_r(byname, (size_t)n, sizeof *byname, cmp_save_name, &S);
    for (int i = 1; i < n; i++)
        NEMO_CHECK(strcmp(names[byname[i - 1]], names[byname[i]]), NEMO_EINVAL,
                   "save_file '%s': duplicate tensor name '%s'", path, names[byname[i]]);
    qsort_r(order, (size_t)n, sizeof *order, cmp_save_order, &S);

    /* header */
    sb_put(&h, "{", 1);
    if (metadata_json) {
        char err[512];
        int root = jparse(&J, metadata_json, strlen(metadata_json));
        NEMO_CHECK(root >= 0, NEMO_EINVAL, "save_file '%s': metadata: %s", path, J.err);
        sb_str(&h, "\"__metadata__\":");
        NEMO_CHECK(metadata_to_json(&J, root, "metadata", 1, &h, err, sizeof err) == 0, NEMO_EINVAL,
                   "save_file '%s': %s", path, err);
        if (n) sb_put(&h, ",", 1);
    }
    uint64_t offset = 0;
    for (int k = 0; k < n; k++) {
        const nemo_tensor *t = tensors[order[k]];
        uint64_t nb = (uint64_t)nemo_tensor_numel(t) * (uint64_t)nemo_dtype_size(t->dtype);
        if (k) sb_put(&h, ",", 1);
        sb_json_str(&h, names[order[k]]);
        sb_str(&h, ":{\"dtype\":\"");
        sb_str(&h, st_dtypes[st_dtype_of_nemo(t->dtype)].name);
        sb_str(&h, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) sb_fmt(&h, d ? ",%lld" : "%lld", (long long)t->shape[d]);
        sb_str(&h, "],\"data_offsets\":[");
        sb_fmt(&h, "%lld", (long long)offset);
        sb_fmt(&h, ",%lld]}", (long long)(offset + nb));
        offset += nb;
    }
    sb_put(&h, "}", 1);
    while (h.n % 8) sb_put(&h, " ", 1);
    NEMO_CHECK(!h.oom, NEMO_ENOMEM, "save_file '%s': out of memory building the header", path);
    NEMO_CHECK(h.n <= ST_MAX_HEADER, NEMO_EINVAL, "save_file '%s': the header would have %zu bytes, more than the %llu readers accept",
               path, h.n, ST_MAX_HEADER);

    /* bytes: to a temporary file beside path, then rename over it */
    size_t tl = strlen(path) + 32;
    tmp = malloc(tl);
    NEMO_CHECK(tmp, NEMO_ENOMEM, "save_file '%s': out of memory", path);
    snprintf(tmp, tl, "%s.tmp.%ld", path, (long)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    NEMO_CHECK(fd >= 0, NEMO_EIO, "save_file '%s': cannot create '%s': %s", path, tmp, strerror(errno));
    unsigned char len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)((uint64_t)h.n >> (8 * k));
    NEMO_CHECK(write_all(fd, len8, 8) == 0 && write_all(fd, h.p, h.n) == 0, NEMO_EIO,
               "save_file '%s': writing '%s': %s", path, tmp, strerror(errno));
    for (int k = 0; k < n; k++) {
        const nemo_tensor *t = tensors[order[k]];
        NEMO_TRYP(c, nemo_to(t, t->dtype, NEMO_CPU, 0));   /* contiguous CPU: t itself when it is */
        size_t nb = (size_t)nemo_tensor_numel(c) * (size_t)nemo_dtype_size(c->dtype);
        NEMO_CHECK(write_all(fd, nemo_tensor_data(c), nb) == 0, NEMO_EIO,
                   "save_file '%s': writing tensor '%s' to '%s': %s", path, names[order[k]], tmp, strerror(errno));
        nemo_tensor_release(c);
        c = NULL;
    }
    NEMO_CHECK(fsync(fd) == 0, NEMO_EIO, "save_file '%s': fsync of '%s': %s", path, tmp, strerror(errno));
    int cr = close(fd);
    fd = -1;
    NEMO_CHECK(cr == 0, NEMO_EIO, "save_file '%s': closing '%s': %s", path, tmp, strerror(errno));
    NEMO_CHECK(rename(tmp, path) == 0, NEMO_EIO, "save_file '%s': renaming '%s' over it: %s", path, tmp, strerror(errno));
    /* make the rename itself durable (best effort: some file systems refuse fsync on a dir) */
    {
        char *dir = strdup(path);
        if (dir) {
            char *slash = strrchr(dir, '/');
            const char *dname = slash ? (slash == dir ? "/" : (*slash = 0, dir)) : ".";
            int dfd = open(dname, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dfd >= 0) { (void)fsync(dfd); close(dfd); }
            free(dir);
        }
    }
    free(tmp);
    tmp = NULL;

fail:
    if (fd >= 0) close(fd);
    if (tmp) { unlink(tmp); free(tmp); }
    nemo_tensor_release(c);
    jfree(&J);
    free(h.p);
    free(order);
    free(byname);
    return rc;
}

/* ==== background saves (checkpoint.is_async) ==== */

struct nemo_st_job {
    pthread_t thread;
    char *path, *meta;
    int n;
    char **names;
    nemo_tensor **copies;
    int rc;
    char err[1024];
};

static void *st_job_run(void *arg) {
    nemo_st_job *j = arg;
    j->rc = nemo_st_save(j->path, j->n, (const char *const *)j->names, j->copies, j->meta);
    if (j->rc < 0) {
        snprintf(j->err, sizeof j->err, "%s", nemo_last_error());
        char *pos = strrchr(j->err, '(');   /* drop the " (file.c:N)" the wait adds again */
        if (pos && pos > j->err && pos[-1] == ' ' && strchr(pos, ')')) pos[-1] = 0;
    }
    return NULL;
}

static void st_job_free(nemo_st_job *j) {
    if (!j) return;
    for (int i = 0; i < j->n; i++) {
        if (j->names) free(j->names[i]);
        if (j->copies) nemo_tensor_release(j->copies[i]);
    }
    free(j->names);
    free(j->copies);
    free(j->path);
    free(j->meta);
    free(j);
}

NEMO_API nemo_st_job *nemo_st_save_async(const char *path, int n, const char *const *names,
                                         nemo_tensor *const *tensors, const char *metadata_json) {
    if (!path || !*path || n < 0 || (n > 0 && (!names || !tensors))) {
        NEMO_ERR(NEMO_EINVAL, "save_file_async: bad arguments (path '%s', %d tensors)", path ? path : "(null)", n);
        return NULL;
    }
    nemo_st_job *j = calloc(1, sizeof *j);
    if (!j) { NEMO_ERR(NEMO_ENOMEM, "save_file_async '%s': out of memory", path); return NULL; }
    j->n = n;
    j->path = strdup(path);
    j->meta = metadata_json ? strdup(metadata_json) : NULL;
    j->names = calloc((size_t)(n ? n : 1), sizeof *j->names);
    j->copies = calloc((size_t)(n ? n : 1), sizeof *j->copies);
    if (!j->path || (metadata_json && !j->meta) || !j->names || !j->copies) {
        NEMO_ERR(NEMO_ENOMEM, "save_file_async '%s': out of memory", path);
        st_job_free(j);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        const nemo_tensor *t = tensors[i];
        if (!names[i] || !t) {
            NEMO_ERR(NEMO_EINVAL, "save_file_async '%s': name or tensor %d is NULL", path, i);
            st_job_free(j);
            return NULL;
        }
        j->names[i] = strdup(names[i]);
        /* a private host copy: a CPU tensor is cloned, a device tensor copied to the host */
        j->copies[i] = t->storage && t->storage->devtype == NEMO_CPU ? nemo_clone(t)
                                                                  : nemo_to(t, t->dtype, NEMO_CPU, 0);
        if (!j->names[i] || !j->copies[i]) {
            if (!j->names[i]) NEMO_ERR(NEMO_ENOMEM, "save_file_async '%s': out of memory", path);
            st_job_free(j);
            return NULL;
        }
    }
    int e = pthread_create(&j->thread, NULL, st_job_run, j);
    if (e != 0) {
        NEMO_ERR(NEMO_EIO, "save_file_async '%s': cannot start a thread: %s", path, strerror(e));
        st_job_free(j);
        return NULL;
    }
    return j;
}

NEMO_API int nemo_st_job_wait(nemo_st_job *j) {
    if (!j) return NEMO_ERR(NEMO_EINVAL, "nemo_st_job_wait: no job");
    pthread_join(j->thread, NULL);
    int rc = j->rc;
    if (rc < 0) NEMO_ERR(rc, "%s", j->err);
    st_job_free(j);
    return rc;
}
