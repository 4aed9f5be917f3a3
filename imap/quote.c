/* imap/quote.c — how a command argument goes on the wire: as an atom, a
 * quoted string, or (when neither fits) a literal the caller sends itself. */
#include "imap/text.h"

#include <errno.h>
#include <string.h>

/* Beyond this a quoted string is legal but impolite: servers limit command
 * line length, and a literal is as cheap. */
#define QUOTE_MAX 1000

int imap_quote(char *dst, size_t dstlen, const char *s)
{
    size_t len = 0, need = 2;  /* the quotes */
    const unsigned char *p;

    for (p = (const unsigned char *)s; *p; p++, len++) {
        /* TEXT-CHAR is 7-bit without CR and LF; NUL ends s anyway */
        if (*p == '\r' || *p == '\n' || *p >= 0x80 || len >= QUOTE_MAX)
            return -EINVAL;
        need += (*p == '"' || *p == '\\') ? 2 : 1;
    }
    if (!dst || dstlen <= need)
        return -ENOSPC;  /* room for the NUL too */

    char *o = dst;
    *o++ = '"';
    for (p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            *o++ = '\\';
        *o++ = (char)*p;
    }
    *o++ = '"';
    *o = '\0';
    return (int)need;
}

int imap_is_atom(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    if (!s || !*s)
        return 0;
    for (; *p; p++) {
        /* ATOM-CHAR: CHAR except atom-specials ( ) { SP CTL % * " \ ] */
        if (*p <= 0x20 || *p >= 0x7f || strchr("(){%*\"\\]", *p))
            return 0;
    }
    return 1;
}
