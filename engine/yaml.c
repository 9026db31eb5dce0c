/*
 * yaml.c: YAML -> JSON text through libyaml, for lua/nemo/yaml.lua (which decodes the JSON with
 * lua-cjson). The FFI cannot build Lua tables from C, and JSON is a faithful carrier for what
 * configs hold: mappings, sequences and typed scalars.
 *
 * Scalars follow the YAML 1.2 core schema, plus what configs written for PyYAML use:
 * - null: ~, null, Null, NULL, or nothing;  bool: true/false in any of the three cases
 *   (and yes/no/on/off, which PyYAML also reads as booleans);
 * - int: [-+]?[0-9]+, 0x..., 0o...;  float: 1.5, 2e-5 (no dot needed), .inf, -.inf, .nan;
 * - everything else, and every quoted scalar, is a string; the tags !!int, !!float, !!bool
 *   and !!null force a type (a value that does not fit is an error); quote to force a string.
 * Anchors and aliases are resolved; merge keys (<<: *base or a list of them) merge mappings,
 * keys written in the mapping itself winning. Duplicate keys are an error naming the key.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "internal.h"

typedef struct { char *p; size_t n, cap; int oom; } sbuf;

static void put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }

static void put_json_string(sbuf *b, const char *s, size_t n) {
    put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"') put(b, "\\\"", 2);
        else if (c == '\\') put(b, "\\\\", 2);
        else if (c == '\n') put(b, "\\n", 2);
        else if (c == '\r') put(b, "\\r", 2);
        else if (c == '\t') put(b, "\\t", 2);
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); put(b, esc, 6); }
        else put(b, (const char *)&s[i], 1);
    }
    put(b, "\"", 1);
}

static int eq_any(const char *s, const char *const *list) {
    for (; *list; list++) if (!strcmp(s, *list)) return 1;
    return 0;
}

static int is_int(const char *s) {
    const char *p = s;
    if (*p == '-' || *p == '+') p++;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'o')) {
        int hex = p[1] == 'x';
        p += 2;
        if (!*p) return 0;
        for (; *p; p++) if (!(hex ? isxdigit((unsigned char)*p) : (*p >= '0' && *p <= '7'))) return 0;
        return 1;
    }
    if (!*p) return 0;
    for (; *p; p++) if (!isdigit((unsigned char)*p) && *p != '_') return 0;
    return 1;
}

static int is_float(const char *s) {
    const char *p = s;
    if (*p == '-' || *p == '+') p++;
    int digits = 0, dot = 0, exp = 0;
    for (; *p; p++) {
        if (isdigit((unsigned char)*p)) digits++;
        else if (*p == '.' && !dot && !exp) dot = 1;
        else if ((*p == 'e' || *p == 'E') && digits && !exp) {
            exp = 1;
            if (p[1] == '-' || p[1] == '+') p++;
            if (!isdigit((unsigned char)p[1])) return 0;
        } else if (*p == '_') continue;
        else return 0;
    }
    return digits > 0 && (dot || exp);
}

static void put_number(sbuf *b, double v) {
    char tmp[64];
    /* JSON has no NaN/Inf; lua-cjson reads these bare tokens (decode_invalid_numbers) */
    if (v != v) { puts_(b, "nan"); return; }
    if (v == 1.0 / 0.0) { puts_(b, "inf"); return; }
    if (v == -1.0 / 0.0) { puts_(b, "-inf"); return; }
    if (v == (double)(long long)v && v > -9e15 && v < 9e15) snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    else snprintf(tmp, sizeof tmp, "%.17g", v);
    puts_(b, tmp);
}

static char *strip_underscores(const char *s) {
    char *o = malloc(strlen(s) + 1), *q = o;
    if (!o) return NULL;
    for (; *s; s++) if (*s != '_') *q++ = *s;
    *q = 0;
    return o;
}

/* Scalar to JSON; returns < 0 on a bad tagged value. */
static int put_scalar(sbuf *b, yaml_node_t *n, const char *name) {
    const char *v = (const char *)n->data.scalar.value;
    size_t len = n->data.scalar.length;
    const char *tag = (const char *)n->tag;
    int plain = n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    static const char *const nulls[] = {"~", "null", "Null", "NULL", "", NULL};
    static const char *const trues[] = {"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON", NULL};
    static const char *const falses[] = {"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF", NULL};
    static const char *const infs[] = {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", NULL};
    static const char *const ninfs[] = {"-.inf", "-.Inf", "-.INF", NULL};
    static const char *const nans[] = {".nan", ".NaN", ".NAN", NULL};
    /* libyaml gives untagged scalars the str tag, so only non-str tags are explicit types;
     * quote a value to keep it a string. */
    int explicit_tag = tag && strcmp(tag, YAML_STR_TAG) != 0;
    if (!plain && !explicit_tag) { put_json_string(b, v, len); return 0; }
    if (eq_any(v, nulls) && (!explicit_tag || !strcmp(tag, YAML_NULL_TAG))) { puts_(b, "null"); return 0; }
    if (eq_any(v, trues) && (!explicit_tag || !strcmp(tag, YAML_BOOL_TAG))) { puts_(b, "true"); return 0; }
    if (eq_any(v, falses) && (!explicit_tag || !strcmp(tag, YAML_BOOL_TAG))) { puts_(b, "false"); return 0; }
    if (eq_any(v, infs)) { put_number(b, 1.0 / 0.0); return 0; }
    if (eq_any(v, ninfs)) { put_number(b, -1.0 / 0.0); return 0; }
    if (eq_any(v, nans)) { put_number(b, 0.0 / 0.0); return 0; }
    if (is_int(v)) {
        char *s = strip_underscores(v);
        if (!s) return NEMO_ERR(NEMO_ENOMEM, "yaml: out of memory");
        const char *p = s;
        int neg = *p == '-';
        if (*p == '-' || *p == '+') p++;
        errno = 0;
        long long x;
        if (p[0] == '0' && p[1] == 'x') x = strtoll(p + 2, NULL, 16);
        else if (p[0] == '0' && p[1] == 'o') x = strtoll(p + 2, NULL, 8);
        else x = strtoll(p, NULL, 10);
        int overflow = errno == ERANGE;
        free(s);
        if (overflow) { put_json_string(b, v, len); return 0; }
        char tmp[32];
        snprintf(tmp, sizeof tmp, "%lld", neg ? -x : x);
        puts_(b, tmp);
        return 0;
    }
    if (is_float(v)) {
        char *s = strip_underscores(v);
        if (!s) return NEMO_ERR(NEMO_ENOMEM, "yaml: out of memory");
        put_number(b, strtod(s, NULL));
        free(s);
        return 0;
    }
    if (explicit_tag && strcmp(tag, YAML_STR_TAG) != 0)
        return NEMO_ERR(NEMO_EFORMAT, "%s: line %zu: value '%s' does not fit its tag %s", name,
                        n->start_mark.line + 1, v, tag);
    put_json_string(b, v, len);
    return 0;
}

static int emit(sbuf *b, yaml_document_t *doc, yaml_node_t *n, const char *name, int depth);

/* Mapping: merge keys first (in order), then the mapping's own keys, later ones overriding;
 * a duplicate of an own key is an error. Keys are emitted once each, in first-seen order. */
typedef struct { const char *key; size_t keylen; yaml_node_t *val; } kv;

static int collect_pairs(yaml_document_t *doc, yaml_node_t *n, kv **out, size_t *count, size_t *cap,
                         const char *name, int own, int depth) {
    if (depth > 64) return NEMO_ERR(NEMO_EFORMAT, "%s: merge keys nest too deeply", name);
    for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top; p++) {
        yaml_node_t *k = yaml_document_get_node(doc, p->key), *v = yaml_document_get_node(doc, p->value);
        if (!k || !v) return NEMO_ERR(NEMO_EFORMAT, "%s: broken mapping", name);
        if (k->type == YAML_SCALAR_NODE && !strcmp((const char *)k->data.scalar.value, "<<") &&
            k->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) {
            if (v->type == YAML_MAPPING_NODE) {
                int rc = collect_pairs(doc, v, out, count, cap, name, 0, depth + 1);
                if (rc < 0) return rc;
            } else if (v->type == YAML_SEQUENCE_NODE) {
                for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
                    yaml_node_t *m = yaml_document_get_node(doc, *it);
                    if (!m || m->type != YAML_MAPPING_NODE)
                        return NEMO_ERR(NEMO_EFORMAT, "%s: line %zu: a merge key (<<) takes mappings", name,
                                        v->start_mark.line + 1);
                    int rc = collect_pairs(doc, m, out, count, cap, name, 0, depth + 1);
                    if (rc < 0) return rc;
                }
            } else {
                return NEMO_ERR(NEMO_EFORMAT, "%s: line %zu: a merge key (<<) takes a mapping or a list of mappings",
                                name, v->start_mark.line + 1);
            }
            continue;
        }
        if (k->type != YAML_SCALAR_NODE)
            return NEMO_ERR(NEMO_EFORMAT, "%s: line %zu: only scalar mapping keys are supported", name,
                            k->start_mark.line + 1);
        const char *key = (const char *)k->data.scalar.value;
        size_t i;
        for (i = 0; i < *count; i++)
            if ((*out)[i].keylen == k->data.scalar.length && !memcmp((*out)[i].key, key, k->data.scalar.length)) break;
        if (i < *count) {
            if (own && depth == 0 && (*out)[i].val != NULL && (*out)[i].keylen != (size_t)-1) {
                /* own key seen twice in the same mapping */
                int dup = 0;
                for (yaml_node_pair_t *q = n->data.mapping.pairs.start; q < p; q++) {
                    yaml_node_t *k2 = yaml_document_get_node(doc, q->key);
                    if (k2 && k2->type == YAML_SCALAR_NODE && k2->data.scalar.length == k->data.scalar.length &&
                        !memcmp(k2->data.scalar.value, key, k->data.scalar.length)) dup = 1;
                }
                if (dup) return NEMO_ERR(NEMO_EFORMAT, "%s: line %zu: duplicate key '%s'", name, k->start_mark.line + 1, key);
            }
            if (own || depth == 0) (*out)[i].val = v;   /* own keys override merged ones */
            continue;
        }
        if (*count == *cap) {
            size_t nc = *cap ? *cap * 2 : 16;
            kv *q = realloc(*out, nc * sizeof *q);
            if (!q) return NEMO_ERR(NEMO_ENOMEM, "yaml: out of memory");
            *out = q; *cap = nc;
        }
        (*out)[*count].key = key;
        (*out)[*count].keylen = k->data.scalar.length;
        (*out)[*count].val = v;
        (*count)++;
    }
    return 0;
}

static int emit(sbuf *b, yaml_document_t *doc, yaml_node_t *n, const char *name, int depth) {
    if (depth > 256) return NEMO_ERR(NEMO_EFORMAT, "%s: nesting deeper than 256 (recursive alias?)", name);
    int rc = 0;
    switch (n->type) {
    case YAML_SCALAR_NODE:
        return put_scalar(b, n, name);
    case YAML_SEQUENCE_NODE: {
        put(b, "[", 1);
        int first = 1;
        for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++) {
            yaml_node_t *c = yaml_document_get_node(doc, *it);
            if (!c) return NEMO_ERR(NEMO_EFORMAT, "%s: broken sequence", name);
            if (!first) put(b, ",", 1);
            first = 0;
            if ((rc = emit(b, doc, c, name, depth + 1)) < 0) return rc;
        }
        put(b, "]", 1);
        return 0;
    }
    case YAML_MAPPING_NODE: {
        kv *pairs = NULL;
        size_t count = 0, cap = 0;
        rc = collect_pairs(doc, n, &pairs, &count, &cap, name, 1, 0);
        if (rc < 0) { free(pairs); return rc; }
        put(b, "{", 1);
        for (size_t i = 0; i < count; i++) {
            if (i) put(b, ",", 1);
            put_json_string(b, pairs[i].key, pairs[i].keylen);
            put(b, ":", 1);
            if ((rc = emit(b, doc, pairs[i].val, name, depth + 1)) < 0) break;
        }
        put(b, "}", 1);
        free(pairs);
        return rc;
    }
    default:
        return NEMO_ERR(NEMO_EFORMAT, "%s: empty YAML node", name);
    }
}

NEMO_API char *nemo_yaml_to_json(const char *text, size_t len, const char *name) {
    yaml_parser_t parser;
    yaml_document_t doc;
    sbuf b = {0};
    if (!name) name = "<yaml>";
    if (!yaml_parser_initialize(&parser)) { NEMO_ERR(NEMO_ENOMEM, "yaml: cannot initialise libyaml"); return NULL; }
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        NEMO_ERR(NEMO_EFORMAT, "%s: line %zu, column %zu: %s%s%s", name, parser.problem_mark.line + 1,
                 parser.problem_mark.column + 1, parser.problem ? parser.problem : "invalid YAML",
                 parser.context ? " " : "", parser.context ? parser.context : "");
        yaml_parser_delete(&parser);
        return NULL;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    int rc = 0;
    if (!root) puts_(&b, "null");
    else rc = emit(&b, &doc, root, name, 0);
    /* a second document is not supported: say so rather than ignore it */
    if (rc >= 0) {
        yaml_document_t doc2;
        if (yaml_parser_load(&parser, &doc2)) {
            if (yaml_document_get_root_node(&doc2))
                rc = NEMO_ERR(NEMO_EFORMAT, "%s: holds more than one YAML document; expected one", name);
            yaml_document_delete(&doc2);
        }
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (rc >= 0 && b.oom) rc = NEMO_ERR(NEMO_ENOMEM, "yaml: out of memory");
    if (rc < 0) { free(b.p); return NULL; }
    if (!b.p) puts_(&b, "null");
    return b.p;
}

NEMO_API void nemo_free(void *p) { free(p); }
