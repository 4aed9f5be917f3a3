/* imap/text.h — text conversions the IMAP client needs: modified UTF-7
 * mailbox names (RFC 3501 5.1.3) and quoting of command arguments. */
#ifndef IMAP_TEXT_H
#define IMAP_TEXT_H

#include <stddef.h>

/* Modified UTF-7 (as sent by the server) to UTF-8.  Returns a malloc'd,
 * NUL-terminated string, or NULL if the input is not valid modified UTF-7
 * (bad base64, unterminated &..., an encoded ASCII-printable char, bad
 * surrogates, non-zero padding bits) or decodes to NUL / invalid UTF-8.
 * Caller frees. */
char *imap_utf7_decode(const char *mutf7);

/* UTF-8 to modified UTF-7.  Returns a malloc'd string, or NULL if the input
 * is not valid UTF-8.  Caller frees. */
char *imap_utf7_encode(const char *utf8);

/* Writes s as an IMAP quoted string ("..." with \ and " escaped) into dst,
 * NUL-terminated.  Returns the length written (without NUL), -ENOSPC if dst
 * is too small, or -EINVAL if s cannot be quoted (contains CR, LF, NUL or a
 * byte >= 0x80, or is longer than 1000 bytes): send it as a literal then. */
int imap_quote(char *dst, size_t dstlen, const char *s);

/* Nonzero if s can be sent as a bare atom (non-empty, only ATOM-CHARs). */
int imap_is_atom(const char *s);

/* Header text with RFC 2047 encoded words ("=?ISO-8859-1?Q?J=F6rg?=") to
 * UTF-8; control characters become spaces.  malloc'd; NULL on out of
 * memory.  Words that do not decode are kept as they are. */
char *imap_decode_header_text(const char *text);

#endif
