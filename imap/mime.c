/* imap/mime.c — RFC 2047 encoded words ("=?UTF-8?B?...?=") in header text
 * (ENVELOPE subjects and names) to UTF-8, for the user.mail.* xattrs.
 *
 * Decoded text is converted from its charset with iconv; a word that does
 * not decode is left as it was (better raw than lost).  Whitespace between
 * two encoded words disappears, as RFC 2047 section 6.2 says.  Control
 * characters in the result become spaces: an xattr value is one line. */
#include "imap/text.h"

#include <ctype.h>
#include <errno.h>
#include <iconv.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct out {
    char *buf;
    size_t len, cap;
};

static int out_add(struct out *out, const char *bytes, size_t len)
{
    if (out->len + len + 1 > out->cap) {
        size_t cap = out->cap ? out->cap : 64;
        while (cap < out->len + len + 1)
            cap *= 2;
        char *grown = realloc(out->buf, cap);
        if (!grown)
            return -ENOMEM;
        out->buf = grown;
        out->cap = cap;
    }
    memcpy(out->buf + out->len, bytes, len);
    out->len += len;
    out->buf[out->len] = '\0';
    return 0;
}

static int hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static int base64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* Decodes the text of one encoded word into raw bytes; -EINVAL if bad. */
static int decode_word(char encoding, const char *text, size_t len, struct out *raw)
{
    if (encoding == 'Q' || encoding == 'q') {
        for (size_t i = 0; i < len; i++) {
            char c = text[i];
            if (c == '_') {
                c = ' ';
            } else if (c == '=') {
                if (i + 2 >= len) /* "=X" needs two hex digits after it */
                    return -EINVAL;
                int high = hex_value((unsigned char)text[i + 1]);
                int low = hex_value((unsigned char)text[i + 2]);
                if (high < 0 || low < 0)
                    return -EINVAL;
                c = (char)(high * 16 + low);
                i += 2;
            }
            if (out_add(raw, &c, 1) < 0)
                return -ENOMEM;
        }
        return 0;
    }
    if (encoding == 'B' || encoding == 'b') {
        unsigned bits = 0, count = 0;
        for (size_t i = 0; i < len; i++) {
            if (text[i] == '=')
                break;
            int v = base64_value((unsigned char)text[i]);
            if (v < 0)
                return -EINVAL;
            bits = bits << 6 | (unsigned)v;
            count += 6;
            if (count >= 8) {
                count -= 8;
                char c = (char)(bits >> count & 0xff);
                if (out_add(raw, &c, 1) < 0)
                    return -ENOMEM;
            }
        }
        return 0;
    }
    return -EINVAL;
}

/* Converts raw bytes in charset to UTF-8 and appends them. */
static int append_converted(struct out *out, const char *charset, const char *raw, size_t len)
{
    /* "UTF-8*lang" (RFC 2231 language suffix) */
    char name[64];
    size_t n = strcspn(charset, "*");
    if (n >= sizeof(name))
        return -EINVAL;
    memcpy(name, charset, n);
    name[n] = '\0';
    if (strcasecmp(name, "UTF-8") == 0 || strcasecmp(name, "US-ASCII") == 0)
        return out_add(out, raw, len);
    iconv_t cd = iconv_open("UTF-8", name);
    if (cd == (iconv_t)-1)
        return -EINVAL;
    size_t room = len * 4 + 16;
    char *converted = malloc(room), *dst = converted;
    char *src = (char *)raw;
    size_t in_left = len, out_left = room;
    int ret = 0;
    if (!converted)
        ret = -ENOMEM;
    else if (iconv(cd, &src, &in_left, &dst, &out_left) == (size_t)-1)
        ret = -EINVAL;
    else
        ret = out_add(out, converted, room - out_left);
    free(converted);
    iconv_close(cd);
    return ret;
}

/* Parses "=?charset?E?text?=" at p; on success appends the decoded text and
 * returns the length consumed, else 0. */
static size_t encoded_word(const char *p, struct out *out)
{
    if (p[0] != '=' || p[1] != '?')
        return 0;
    const char *charset = p + 2, *q1 = strchr(charset, '?');
    if (!q1 || q1 == charset || !q1[1] || q1[2] != '?')
        return 0;
    const char *text = q1 + 3, *end = strstr(text, "?=");
    if (!end)
        return 0;
    for (const char *c = p; c < end; c++)
        if (isspace((unsigned char)*c))
            return 0; /* encoded words contain no white space */
    char charset_name[64];
    size_t charset_len = (size_t)(q1 - charset);
    if (charset_len >= sizeof(charset_name))
        return 0;
    memcpy(charset_name, charset, charset_len);
    charset_name[charset_len] = '\0';
    struct out raw = { 0 };
    size_t saved = out->len;
    if (decode_word(q1[1], text, (size_t)(end - text), &raw) < 0 ||
        append_converted(out, charset_name, raw.buf ? raw.buf : "", raw.len) < 0) {
        free(raw.buf);
        out->len = saved;
        if (out->buf)
            out->buf[saved] = '\0';
        return 0;
    }
    free(raw.buf);
    return (size_t)(end + 2 - p);
}

char *imap_decode_header_text(const char *text)
{
    struct out out = { 0 };
    const char *p = text;
    int last_was_word = 0;

    if (out_add(&out, "", 0) < 0)
        return NULL;
    while (*p) {
        size_t used = encoded_word(p, &out);
        if (used) {
            p += used;
            last_was_word = 1;
            continue;
        }
        if (last_was_word && isspace((unsigned char)*p)) {
            /* white space between two encoded words is not text */
            const char *next = p;
            while (isspace((unsigned char)*next))
                next++;
            struct out probe = { 0 };
            size_t next_used = encoded_word(next, &probe);
            free(probe.buf);
            if (next_used) {
                p = next;
                continue;
            }
        }
        last_was_word = 0;
        char c = (unsigned char)*p < 0x20 || *p == 0x7f ? ' ' : *p;
        if (out_add(&out, &c, 1) < 0) {
            free(out.buf);
            return NULL;
        }
        p++;
    }
    for (size_t i = 0; i < out.len; i++)
        if ((unsigned char)out.buf[i] < 0x20 || out.buf[i] == 0x7f)
            out.buf[i] = ' ';
    return out.buf;
}
