/* imap/utf7.c — modified UTF-7 mailbox names (RFC 3501 5.1.3).
 *
 * Printable ASCII except "&" stands for itself, "&-" is "&", and everything
 * else is UTF-16BE in base64 (with "," for "/", no padding) between "&" and
 * "-".  The decoder accepts only the one canonical spelling of each name:
 * no encoded printable ASCII, no zero padding bits left over, no empty or
 * adjacent base64 runs ("&AOQ-&AOQ-" must be "&AOQA5A-").  That makes
 * imap_utf7_encode(imap_utf7_decode(x)) == x for every accepted x, so a
 * folder shown on the mount always maps back to the exact name the server
 * listed; a sloppy spelling would otherwise show up as a folder that cannot
 * be opened.
 */
#include "imap/text.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char base64_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

static int base64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == ',')
        return 63;
    return -1;
}

/* Printable ASCII that represents itself ("&" does not). */
static int is_direct(uint32_t c)
{
    return c >= 0x20 && c <= 0x7e && c != '&';
}

static size_t utf8_put(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Decodes one UTF-8 sequence strictly (no overlongs, no surrogates, at most
 * U+10FFFF).  Returns its length, or 0 if invalid. */
static size_t utf8_get(const unsigned char *s, uint32_t *cp)
{
    uint32_t c = s[0];
    size_t len, i;
    uint32_t min;

    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2; c &= 0x1f; min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3; c &= 0x0f; min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4; c &= 0x07; min = 0x10000;
    } else {
        return 0;
    }
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;  /* also stops at the NUL terminator */
        c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

char *imap_utf7_decode(const char *mutf7)
{
    const unsigned char *s = (const unsigned char *)mutf7;
    size_t len;
    char *out, *o;
    int after_run = 0;  /* the previous thing was a base64 run */

    if (!mutf7)
        return NULL;
    len = strlen(mutf7);
    /* A run of k base64 chars yields at most 6k/16 UTF-16 units of at most
     * 3 UTF-8 bytes each (a surrogate pair: 2 units, 4 bytes): 9/8 output
     * bytes per input byte, so twice the input is always enough. */
    if (len > (SIZE_MAX - 1) / 2)
        return NULL;
    out = malloc(len * 2 + 1);
    if (!out)
        return NULL;
    o = out;

    while (*s) {
        if (*s != '&') {
            if (!is_direct(*s))
                goto invalid;  /* 8-bit or control bytes are never sent raw */
            *o++ = (char)*s++;
            after_run = 0;
            continue;
        }
        s++;
        if (*s == '-') {
            *o++ = '&';
            s++;
            after_run = 0;
            continue;
        }
        if (after_run)
            goto invalid;  /* "-&" null shift */

        uint32_t bits = 0, high = 0;
        int nbits = 0, units = 0;
        while (*s != '-') {
            int v = base64_value(*s);
            if (v < 0)
                goto invalid;  /* bad char, or unterminated at NUL */
            s++;
            bits = (bits << 6) | (uint32_t)v;
            nbits += 6;
            if (nbits < 16)
                continue;
            nbits -= 16;
            uint32_t unit = (bits >> nbits) & 0xffff;
            bits &= (1u << nbits) - 1;
            units++;
            if (high) {
                if (unit < 0xdc00 || unit > 0xdfff)
                    goto invalid;  /* high surrogate without a low one */
                o += utf8_put(o, 0x10000 + ((high - 0xd800) << 10) + (unit - 0xdc00));
                high = 0;
            } else if (unit >= 0xd800 && unit <= 0xdbff) {
                high = unit;
            } else if (unit >= 0xdc00 && unit <= 0xdfff) {
                goto invalid;  /* lone low surrogate */
            } else {
                if (unit == 0 || is_direct(unit) || unit == '&')
                    goto invalid;  /* NUL, or ASCII that has its own spelling */
                o += utf8_put(o, unit);
            }
        }
        s++;  /* the "-" */
        /* leftover bits must be padding of the last unit: fewer than a
         * whole base64 char, and zero */
        if (units == 0 || high || nbits >= 6 || bits != 0)
            goto invalid;
        after_run = 1;
    }
    *o = '\0';
    return out;

invalid:
    free(out);
    return NULL;
}

/* Appends the base64 of UTF-16BE units[0, count) to o; returns the end. */
static char *put_base64(char *o, const uint16_t *units, size_t count)
{
    uint32_t bits = 0;
    int nbits = 0;

    for (size_t i = 0; i < count; i++) {
        bits = (bits << 16) | units[i];
        nbits += 16;
        while (nbits >= 6) {
            nbits -= 6;
            *o++ = base64_chars[(bits >> nbits) & 0x3f];
        }
        bits &= (1u << nbits) - 1;
    }
    if (nbits > 0)
        *o++ = base64_chars[(bits << (6 - nbits)) & 0x3f];
    return o;
}

char *imap_utf7_encode(const char *utf8)
{
    const unsigned char *s = (const unsigned char *)utf8;
    size_t len;
    char *out, *o;
    uint16_t *units;
    size_t count = 0;

    if (!utf8)
        return NULL;
    len = strlen(utf8);
    /* Worst case per input byte is a lone control char between printable
     * ones: 1 byte -> "&AAE-", 5 bytes.  Everything else costs less. */
    if (len > (SIZE_MAX - 1) / 5)
        return NULL;
    out = malloc(len * 5 + 1);
    /* one UTF-16 unit per input byte at most (4 bytes -> 2 units) */
    units = malloc((len ? len : 1) * sizeof(*units));
    if (!out || !units) {
        free(out);
        free(units);
        return NULL;
    }
    o = out;

    for (;;) {
        uint32_t cp = 0;
        size_t n = 0;

        if (*s) {
            n = utf8_get(s, &cp);
            if (n == 0) {
                free(out);
                free(units);
                return NULL;
            }
        }
        if (*s && !is_direct(cp) && cp != '&') {
            /* part of a base64 run */
            if (cp >= 0x10000) {
                units[count++] = (uint16_t)(0xd800 + ((cp - 0x10000) >> 10));
                units[count++] = (uint16_t)(0xdc00 + ((cp - 0x10000) & 0x3ff));
            } else {
                units[count++] = (uint16_t)cp;
            }
            s += n;
            continue;
        }
        if (count) {
            *o++ = '&';
            o = put_base64(o, units, count);
            *o++ = '-';
            count = 0;
        }
        if (!*s)
            break;
        *o++ = (char)cp;
        if (cp == '&')
            *o++ = '-';
        s += n;
    }
    *o = '\0';
    free(units);
    return out;
}
