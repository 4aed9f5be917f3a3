/* imap/parser.h — incremental, resumable IMAP response parser.
 *
 * Bytes from the wire are fed in arbitrary pieces; the parser returns one
 * complete response at a time.  A response is the text lines of one server
 * reply joined by the literals between them: a literal {n} or {n+} is only
 * recognised at the very end of a line, and its n bytes follow the CRLF.
 * Every length and count is capped (struct imap_parser_limits) and checked
 * for overflow; everything the server sends is untrusted.
 *
 * Literal bytes are kept in one malloc'd buffer per literal, grown as the
 * bytes actually arrive (a lying {4000000000} costs nothing until sent), so a
 * message body can be handed to the cache without another copy
 * (imap_value_steal).
 */
#ifndef IMAP_PARSER_H
#define IMAP_PARSER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

enum imap_value_kind {
    IMAP_VALUE_ATOM,    /* OK, FETCH, \Seen, BODY[HEADER.FIELDS (FROM)]<0> */
    IMAP_VALUE_NUMBER,  /* all digits and fits uint64 (str holds the digits too) */
    IMAP_VALUE_STRING,  /* quoted string (unescaped) or literal */
    IMAP_VALUE_NIL,
    IMAP_VALUE_LIST,    /* ( ... ) */
};

struct imap_value {
    enum imap_value_kind kind;
    char *str;          /* ATOM/NUMBER/STRING: bytes + NUL terminator; owned.
                           A literal may contain NUL bytes: use len. */
    size_t len;
    uint64_t number;    /* NUMBER only */
    int is_literal;     /* STRING came from a literal */
    struct imap_value *items; /* LIST only; owned */
    size_t count;
};

enum imap_response_kind {
    IMAP_RESP_UNTAGGED,     /* "* ..." */
    IMAP_RESP_TAGGED,       /* "A12 OK ..." */
    IMAP_RESP_CONTINUATION, /* "+ ..." */
};

enum imap_status {
    IMAP_STATUS_NONE,       /* a data response (* 5 FETCH, * LIST ...) */
    IMAP_STATUS_OK, IMAP_STATUS_NO, IMAP_STATUS_BAD,
    IMAP_STATUS_BYE, IMAP_STATUS_PREAUTH,
};

struct imap_response {
    enum imap_response_kind kind;
    char *tag;              /* TAGGED only; owned */
    enum imap_status status;/* status responses, tagged or untagged */
    char *code;             /* resp-text-code without the brackets, e.g.
                               "APPENDUID 38505 3955", or NULL; owned */
    char *text;             /* human text of a status or continuation, never
                               NULL ("" if none); owned */
    struct imap_value *items; /* data responses: every token after "*",
                                 e.g. [5, FETCH, (UID 7 BODY[] {..})],
                                 [LIST, (\HasNoChildren), "/", INBOX]; owned */
    size_t count;
};

struct imap_parser_limits {
    size_t max_line;        /* bytes of text in one response, literals excluded */
    uint64_t max_literal;   /* bytes of one literal */
    size_t max_depth;       /* nesting of ( ) */
    size_t max_values;      /* values in one response, all levels */
};

/* Defaults: 16 MiB line text, 2 GiB literal, depth 32, 512k values. */
void imap_parser_default_limits(struct imap_parser_limits *limits);

struct imap_parser;

/* limits may be NULL for the defaults.  Returns NULL on out of memory. */
struct imap_parser *imap_parser_new(const struct imap_parser_limits *limits);
void imap_parser_free(struct imap_parser *parser);

/* Feed up to len bytes.  Returns the number of bytes consumed (>= 0) or a
 * negative errno: -EPROTO for malformed input, -EMSGSIZE when a limit is
 * exceeded, -ENOMEM.  When a response is complete it stops right after it,
 * sets *out (caller frees with imap_response_free) and returns the bytes
 * consumed so far; feed the rest again.  Otherwise *out is NULL and all
 * bytes are consumed.  After an error the parser stays failed (every later
 * call returns the same error): drop the connection. */
ssize_t imap_parser_feed(struct imap_parser *parser, const char *buf, size_t len,
                         struct imap_response **out);

/* Bytes of the literal currently being received and its announced size, so a
 * caller can show progress; both 0 when not inside a literal. */
void imap_parser_literal_progress(const struct imap_parser *parser,
                                  uint64_t *received, uint64_t *total);

void imap_response_free(struct imap_response *response);

/* Helpers for reading responses. */
int imap_value_is_atom(const struct imap_value *value, const char *name); /* case-insensitive */
/* A number that fits in 32 bits, as UIDs, sequence numbers and UIDVALIDITY must. */
int imap_value_u32(const struct imap_value *value, uint32_t *out);      /* 0 or -EPROTO */
/* Takes the bytes of a STRING/ATOM out of the value (value->str becomes NULL);
 * caller frees. */
char *imap_value_steal(struct imap_value *value, size_t *len);
/* In a FETCH attribute list (name value name value ...), the value after the
 * attribute named name (case-insensitive, e.g. "RFC822.SIZE", "BODY[]"), or NULL. */
struct imap_value *imap_fetch_item(const struct imap_value *list, const char *name);

#endif
