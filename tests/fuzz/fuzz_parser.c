/* tests/fuzz/fuzz_parser.c — libFuzzer target for the IMAP response parser.
 *
 * The first input byte chooses where the rest is split into two pieces
 * (low 7 bits, scaled to the length) and whether small limits are used (high
 * bit, to reach the -EMSGSIZE paths).  The input is parsed three ways — in
 * one piece, in the two pieces, and one byte at a time — and the three must
 * agree exactly, response by response and on whether it fails: resumability
 * is the property most likely to break and least likely to be noticed.
 * Every response is checked for the structural promises of parser.h and
 * freed.  Run it with tests/fuzz/run-fuzz.
 */
#include "imap/parser.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct digest {
    uint64_t hash;          /* over a canonical walk of every response */
    size_t responses;
    int error;
};

static void mix(struct digest *d, const void *bytes, size_t len)
{
    const unsigned char *p = bytes;
    for (size_t i = 0; i < len; i++)
        d->hash = (d->hash ^ p[i]) * 0x100000001b3ull;  /* FNV-1a */
}

static void mix_u64(struct digest *d, uint64_t v)
{
    mix(d, &v, sizeof(v));
}

static void check_value(struct digest *d, const struct imap_value *v,
                        const struct imap_parser_limits *limits, size_t depth, size_t *values)
{
    (*values)++;
    mix_u64(d, v->kind);
    switch (v->kind) {
    case IMAP_VALUE_ATOM:
    case IMAP_VALUE_NUMBER:
    case IMAP_VALUE_STRING:
        if (!v->str || v->str[v->len] != '\0' || v->items || v->count)
            abort();
        if (v->kind != IMAP_VALUE_STRING && (v->len == 0 || strlen(v->str) != v->len))
            abort();
        if (v->kind == IMAP_VALUE_NUMBER) {
            uint64_t n = 0;
            for (size_t i = 0; i < v->len; i++) {
                if (v->str[i] < '0' || v->str[i] > '9')
                    abort();
                n = n * 10 + (uint64_t)(v->str[i] - '0');
            }
            if (n != v->number)
                abort();
        }
        if (v->is_literal && v->kind != IMAP_VALUE_STRING)
            abort();
        mix_u64(d, v->len);
        mix_u64(d, (uint64_t)v->is_literal);
        mix(d, v->str, v->len);
        break;
    case IMAP_VALUE_NIL:
        if (v->str || v->items || v->count)
            abort();
        break;
    case IMAP_VALUE_LIST:
        if (v->str || (v->count && !v->items) || depth + 1 > limits->max_depth)
            abort();
        mix_u64(d, v->count);
        for (size_t i = 0; i < v->count; i++)
            check_value(d, &v->items[i], limits, depth + 1, values);
        break;
    default:
        abort();
    }
}

static void check_response(struct digest *d, struct imap_response *r,
                           const struct imap_parser_limits *limits)
{
    size_t values = 0;

    if (!r->text || (r->kind == IMAP_RESP_TAGGED) != (r->tag != NULL))
        abort();
    if (r->kind == IMAP_RESP_TAGGED && r->status == IMAP_STATUS_NONE)
        abort();
    if (r->kind == IMAP_RESP_CONTINUATION && (r->status != IMAP_STATUS_NONE || r->code))
        abort();
    if ((r->status != IMAP_STATUS_NONE || r->kind == IMAP_RESP_CONTINUATION) && r->count)
        abort();
    if (r->kind == IMAP_RESP_UNTAGGED && r->status == IMAP_STATUS_NONE && r->count == 0)
        abort();
    mix_u64(d, r->kind);
    mix_u64(d, r->status);
    if (r->tag)
        mix(d, r->tag, strlen(r->tag) + 1);
    if (r->code)
        mix(d, r->code, strlen(r->code) + 1);
    mix(d, r->text, strlen(r->text) + 1);
    mix_u64(d, r->count);
    for (size_t i = 0; i < r->count; i++)
        check_value(d, &r->items[i], limits, 0, &values);
    if (values > limits->max_values)
        abort();

    /* the helpers must cope with whatever came out */
    for (size_t i = 0; i < r->count; i++) {
        uint32_t u;
        (void)imap_value_u32(&r->items[i], &u);
        (void)imap_value_is_atom(&r->items[i], "FETCH");
        (void)imap_fetch_item(&r->items[i], "BODY[]");
    }
    if (r->count) {
        size_t len = 0;
        free(imap_value_steal(&r->items[r->count - 1], &len));
    }
    d->responses++;
    imap_response_free(r);
}

/* Parses data in pieces of the given sizes (the last repeats). */
static void parse(struct digest *d, const uint8_t *data, size_t size,
                  const struct imap_parser_limits *limits, size_t first, size_t step)
{
    struct imap_parser *parser = imap_parser_new(limits);
    size_t pos = 0;

    memset(d, 0, sizeof(*d));
    d->hash = 0xcbf29ce484222325ull;
    if (!parser)
        abort();
    while (pos < size && !d->error) {
        size_t piece = pos == 0 ? first : step;
        if (piece == 0)
            piece = step;
        if (piece > size - pos)
            piece = size - pos;
        size_t left = piece;
        while (left > 0) {
            struct imap_response *r = NULL;
            ssize_t used = imap_parser_feed(parser, (const char *)data + pos, left, &r);
            if (used < 0) {
                if (r)
                    abort();
                d->error = (int)used;
                /* sticky */
                if (imap_parser_feed(parser, "A OK\r\n", 6, &r) != used || r)
                    abort();
                break;
            }
            if ((size_t)used > left)
                abort();
            if (!r && (size_t)used != left)
                abort();
            uint64_t got, total;
            imap_parser_literal_progress(parser, &got, &total);
            if (got > total || (total && limits && total > limits->max_literal))
                abort();
            pos += (size_t)used;
            left -= (size_t)used;
            if (r)
                check_response(d, r, limits);
        }
    }
    imap_parser_free(parser);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct imap_parser_limits limits;
    struct digest whole, split, bytes;

    if (size == 0)
        return 0;
    imap_parser_default_limits(&limits);
    if (data[0] & 0x80) {
        limits.max_line = 200;
        limits.max_literal = 300;
        limits.max_depth = 4;
        limits.max_values = 40;
    } else {
        /* keep a single run's memory modest; the real 2 GiB limit only
         * matters for inputs libFuzzer would not produce anyway */
        limits.max_literal = 1 << 20;
    }
    size_t at = (size - 1) * (data[0] & 0x7f) / 127;
    data++;
    size--;

    parse(&whole, data, size, &limits, size, size);
    parse(&split, data, size, &limits, at, size);
    parse(&bytes, data, size, &limits, 1, 1);
    /* Which error is reported may depend on the pieces (a NUL beyond the
     * line limit is seen as -EPROTO when the whole line arrives at once,
     * -EMSGSIZE when it trickles in); whether there is one may not. */
    if (whole.hash != split.hash || whole.responses != split.responses ||
        !whole.error != !split.error || whole.hash != bytes.hash ||
        whole.responses != bytes.responses || !whole.error != !bytes.error) {
        fprintf(stderr, "split at %zu: whole %zu/%d, split %zu/%d, bytes %zu/%d\n", at,
                whole.responses, whole.error, split.responses, split.error,
                bytes.responses, bytes.error);
        abort();
    }
    return 0;
}
