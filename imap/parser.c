/* imap/parser.c — incremental, resumable IMAP response parser.
 *
 * Why it is built this way
 * ------------------------
 * An IMAP response is a sequence of text lines glued together by literals: a
 * line may end in "{n}" (or "{n+}"), after the CRLF come exactly n raw bytes,
 * and then the text of the same response goes on.  The only place a literal
 * can be announced is the very end of a line, so the parser never needs to
 * understand the grammar while bytes are arriving: it only has to find line
 * ends and look at the last few bytes of each line.  That gives two phases.
 *
 * Phase 1, receiving (imap_parser_feed): bytes are appended to one text
 * buffer, memchr finds the LF, and a CR is accepted only right before it.
 * Only the input piece is ever scanned, never the accumulated text, so
 * feeding one byte at a time stays linear.  At a line end of an untagged data
 * response a trailing {n} switches to literal mode; literal bytes are memcpy'd
 * into a buffer of their own, grown geometrically as bytes actually arrive
 * (capped at n + 1, never allocated from the announced n alone), so a lying
 * "{4000000000}" costs nothing until the server really sends the bytes, and a
 * message body is received with a single copy.  In the text buffer the
 * line break after a "{n}" is kept as one '\n', a byte that cannot otherwise
 * occur in it; it marks where the literal goes.
 *
 * Phase 2, tokenizing (build_response): once a line ends without a literal,
 * the whole response is in memory, so the tokenizer is a plain loop over
 * bytes that cannot run out of input half-way.  Lists are built with an
 * explicit stack (depth capped, no recursion on server input), literals are
 * moved (not copied) into the values, and status responses keep their human
 * text raw: resp-text may contain anything, so it is never tokenized.
 *
 * Only untagged data responses can carry literals: status responses and
 * continuations are a single line of resp-text, where "{5}" at the end is
 * just text (a NO naming a mailbox called "{5}" must not make us wait for
 * five bytes that never come).
 *
 * Every error is sticky: after malformed input the stream position is
 * unknown, so the only safe thing is to drop the connection.
 */
#include "imap/parser.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* First allocation for a literal that does not arrive in one piece: large
 * enough that a typical message body needs few reallocations, small enough
 * that a literal announced but never sent costs little. */
#define LITERAL_FIRST_CHUNK ((size_t)64 * 1024)
/* The text buffer is kept between responses unless it grew beyond this. */
#define TEXT_KEEP_CAP ((size_t)256 * 1024)
/* Marks, in the text buffer, the line break that follows "{n}". */
#define LITERAL_BREAK '\n'

struct literal {
    char *data;         /* owned until moved into a response value */
    size_t len;         /* bytes received so far */
    size_t cap;         /* allocated bytes of data */
    uint64_t size;      /* announced size */
};

struct imap_parser {
    struct imap_parser_limits limits;
    int error;              /* sticky negative errno; 0 while healthy */

    char *text;             /* text of the current response, see above */
    size_t text_len, text_cap;
    size_t line_start;      /* offset in text of the line being received */
    int pending_cr;         /* the last piece ended in CR; LF must follow */
    int is_data;            /* untagged data response: literals allowed */

    struct literal *literals; /* of the current response, in order */
    size_t literal_count, literal_cap;
    int in_literal;         /* receiving literals[literal_count - 1] */
};

void imap_parser_default_limits(struct imap_parser_limits *limits)
{
    limits->max_line = (size_t)16 * 1024 * 1024;   /* a UID SEARCH of 1M messages fits */
    limits->max_literal = (uint64_t)2 * 1024 * 1024 * 1024;
    limits->max_depth = 32;
    limits->max_values = (size_t)512 * 1024;       /* bounds a hostile reply to ~50 MB;
                                                      a plain SEARCH of 500k UIDs fits */
}

struct imap_parser *imap_parser_new(const struct imap_parser_limits *limits)
{
    struct imap_parser *parser = calloc(1, sizeof(*parser));

    if (!parser)
        return NULL;
    if (limits)
        parser->limits = *limits;
    else
        imap_parser_default_limits(&parser->limits);
    return parser;
}

/* Forgets the current response (literals not moved out are freed). */
static void parser_reset(struct imap_parser *parser)
{
    for (size_t i = 0; i < parser->literal_count; i++)
        free(parser->literals[i].data);
    parser->literal_count = 0;
    parser->in_literal = 0;
    parser->text_len = 0;
    parser->line_start = 0;
    parser->pending_cr = 0;
    parser->is_data = 0;
    /* one huge response should not pin its buffer for the connection's life */
    if (parser->text_cap > TEXT_KEEP_CAP) {
        free(parser->text);
        parser->text = NULL;
        parser->text_cap = 0;
    }
    if (parser->literal_cap > 64) {
        free(parser->literals);
        parser->literals = NULL;
        parser->literal_cap = 0;
    }
}

void imap_parser_free(struct imap_parser *parser)
{
    if (!parser)
        return;
    parser_reset(parser);
    free(parser->text);
    free(parser->literals);
    free(parser);
}

void imap_parser_literal_progress(const struct imap_parser *parser,
                                  uint64_t *received, uint64_t *total)
{
    uint64_t got = 0, size = 0;

    if (parser && parser->in_literal && !parser->error) {
        const struct literal *literal = &parser->literals[parser->literal_count - 1];
        got = literal->len;
        size = literal->size;
    }
    if (received)
        *received = got;
    if (total)
        *total = size;
}

/* ---------------------------------------------------------------------------
 * Values and responses
 */

static void value_clear(struct imap_value *value)
{
    free(value->str);
    for (size_t i = 0; i < value->count; i++)
        value_clear(&value->items[i]);
    free(value->items);
}

void imap_response_free(struct imap_response *response)
{
    if (!response)
        return;
    for (size_t i = 0; i < response->count; i++)
        value_clear(&response->items[i]);
    free(response->items);
    free(response->tag);
    free(response->code);
    free(response->text);
    free(response);
}

int imap_value_is_atom(const struct imap_value *value, const char *name)
{
    if (!value || !name || value->kind != IMAP_VALUE_ATOM || !value->str)
        return 0;
    return value->len == strlen(name) && strcasecmp(value->str, name) == 0;
}

int imap_value_u32(const struct imap_value *value, uint32_t *out)
{
    if (!value || value->kind != IMAP_VALUE_NUMBER || value->number > UINT32_MAX)
        return -EPROTO;
    *out = (uint32_t)value->number;
    return 0;
}

char *imap_value_steal(struct imap_value *value, size_t *len)
{
    char *str;

    if (!value || (value->kind != IMAP_VALUE_STRING && value->kind != IMAP_VALUE_ATOM) ||
        !value->str)
        return NULL;
    str = value->str;
    if (len)
        *len = value->len;
    value->str = NULL;
    value->len = 0;
    return str;
}

struct imap_value *imap_fetch_item(const struct imap_value *list, const char *name)
{
    if (!list || list->kind != IMAP_VALUE_LIST)
        return NULL;
    /* msg-att is "name SP value" pairs; a name is always an atom */
    for (size_t i = 0; i + 1 < list->count; i += 2)
        if (imap_value_is_atom(&list->items[i], name))
            return &list->items[i + 1];
    return NULL;
}

/* ---------------------------------------------------------------------------
 * Phase 1: receiving bytes
 */

/* Appends text of the current response, enforcing max_line. */
static int text_append(struct imap_parser *parser, const char *bytes, size_t len)
{
    if (len > parser->limits.max_line - parser->text_len)
        return -EMSGSIZE;
    if (len >= parser->text_cap - parser->text_len) {
        size_t cap = parser->text_cap ? parser->text_cap : 1024;
        /* text_len + len <= max_line; only max_line == SIZE_MAX could make
         * the + 1 below wrap */
        if (parser->text_len + len == SIZE_MAX)
            return -ENOMEM;
        size_t need = parser->text_len + len + 1;
        while (cap < need)
            cap = cap > SIZE_MAX / 2 ? need : cap * 2;
        char *text = realloc(parser->text, cap);
        if (!text)
            return -ENOMEM;
        parser->text = text;
        parser->text_cap = cap;
    }
    memcpy(parser->text + parser->text_len, bytes, len);
    parser->text_len += len;
    return 0;
}

static enum imap_status status_word(const char *word, size_t len)
{
    static const struct { const char *name; size_t len; enum imap_status status; } words[] = {
        { "OK", 2, IMAP_STATUS_OK }, { "NO", 2, IMAP_STATUS_NO },
        { "BAD", 3, IMAP_STATUS_BAD }, { "BYE", 3, IMAP_STATUS_BYE },
        { "PREAUTH", 7, IMAP_STATUS_PREAUTH },
    };
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        if (len == words[i].len && strncasecmp(word, words[i].name, len) == 0)
            return words[i].status;
    return IMAP_STATUS_NONE;
}

/* tag = 1*<any ASTRING-CHAR except "+"> */
static int is_tag_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '(' && c != ')' && c != '{' && c != '%' &&
           c != '*' && c != '"' && c != '\\' && c != '+';
}

/* What the first line says about a response. */
struct head {
    enum imap_response_kind kind;
    size_t tag_len;         /* TAGGED: the tag is text[0, tag_len) */
    enum imap_status status;
    size_t rest;            /* offset of what follows: the resp-text of a
                               status or continuation, the first token of data */
};

static int parse_head(const char *text, size_t len, struct head *head)
{
    size_t pos, word;

    memset(head, 0, sizeof(*head));
    if (len == 0)
        return -EPROTO;
    if (text[0] == '+') {
        /* "+ text"; a bare "+" is common enough to accept */
        head->kind = IMAP_RESP_CONTINUATION;
        head->rest = len > 1 && text[1] == ' ' ? 2 : 1;
        return 0;
    }
    if (text[0] == '*') {
        head->kind = IMAP_RESP_UNTAGGED;
        pos = 1;
    } else {
        head->kind = IMAP_RESP_TAGGED;
        for (pos = 0; pos < len && text[pos] != ' '; pos++)
            if (!is_tag_char((unsigned char)text[pos]))
                return -EPROTO;
        head->tag_len = pos;
    }
    if (pos >= len || text[pos] != ' ')
        return -EPROTO;
    while (pos < len && text[pos] == ' ')
        pos++;
    if (pos >= len)
        return -EPROTO;
    for (word = pos; word < len && text[word] != ' ' && text[word] != LITERAL_BREAK; word++)
        ;
    head->status = status_word(text + pos, word - pos);
    if (head->status != IMAP_STATUS_NONE)
        head->rest = word;
    else if (head->kind == IMAP_RESP_TAGGED)
        return -EPROTO;  /* a tagged response is always a status */
    else
        head->rest = pos;
    return 0;
}

/* Looks for "{n}" or "{n+}" at the end of a line.  Returns 1 and *size if
 * found, 0 if the line does not end in a literal marker, -EPROTO if the
 * number does not fit. */
static int literal_marker(const char *line, size_t len, uint64_t *size)
{
    size_t end, start;
    uint64_t n = 0;

    if (len < 3 || line[len - 1] != '}')
        return 0;
    end = len - 1;
    if (line[end - 1] == '+')
        end--;
    start = end;
    while (start > 0 && line[start - 1] >= '0' && line[start - 1] <= '9')
        start--;
    if (start == end || start == 0 || line[start - 1] != '{')
        return 0;  /* "{}", "{abc}": not a literal; the tokenizer rejects it */
    for (size_t i = start; i < end; i++) {
        unsigned digit = (unsigned)(line[i] - '0');
        if (n > (UINT64_MAX - digit) / 10)
            return -EPROTO;
        n = n * 10 + digit;
    }
    *size = n;
    return 1;
}

/* A line of the current response is complete in text[line_start, text_len).
 * Either it announces a literal (switch to literal mode) or it ends the
 * response (*complete = 1). */
static int line_end(struct imap_parser *parser, int *complete)
{
    const char *line = parser->text + parser->line_start;
    size_t len = parser->text_len - parser->line_start;
    uint64_t size;
    int r;

    *complete = 0;
    if (parser->literal_count == 0) {
        struct head head;
        parser->is_data = parse_head(parser->text, parser->text_len, &head) == 0 &&
                          head.kind == IMAP_RESP_UNTAGGED &&
                          head.status == IMAP_STATUS_NONE;
    }
    if (!parser->is_data || (r = literal_marker(line, len, &size)) == 0) {
        *complete = 1;
        return 0;
    }
    if (r < 0)
        return r;
    if (size > parser->limits.max_literal || size >= SIZE_MAX)
        return -EMSGSIZE;
    /* each literal becomes a value; also bounds this array */
    if (parser->literal_count >= parser->limits.max_values)
        return -EMSGSIZE;
    if (parser->literal_count == parser->literal_cap) {
        size_t cap = parser->literal_cap ? parser->literal_cap * 2 : 8;
        if (cap > SIZE_MAX / sizeof(struct literal))
            return -ENOMEM;
        struct literal *literals = realloc(parser->literals, cap * sizeof(*literals));
        if (!literals)
            return -ENOMEM;
        parser->literals = literals;
        parser->literal_cap = cap;
    }
    r = text_append(parser, &(char){ LITERAL_BREAK }, 1);
    if (r < 0)
        return r;
    struct literal *literal = &parser->literals[parser->literal_count++];
    *literal = (struct literal){ .size = size };
    parser->line_start = parser->text_len;
    if (size == 0) {
        literal->data = malloc(1);
        if (!literal->data)
            return -ENOMEM;
        literal->data[0] = '\0';
        literal->cap = 1;
    } else {
        parser->in_literal = 1;
    }
    return 0;
}

/* Takes literal bytes from buf; returns how many were used, or -ENOMEM. */
static ssize_t literal_take(struct imap_parser *parser, const char *buf, size_t len)
{
    struct literal *literal = &parser->literals[parser->literal_count - 1];
    uint64_t remaining = literal->size - literal->len;
    size_t take = (uint64_t)len < remaining ? len : (size_t)remaining;
    size_t need = literal->len + take + 1;  /* <= size + 1, no wrap */

    if (need > literal->cap) {
        size_t cap;
        if (take == remaining) {
            cap = (size_t)literal->size + 1;  /* the rest is here: exact size */
        } else {
            cap = literal->cap ? literal->cap : LITERAL_FIRST_CHUNK;
            if (literal->cap)
                cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
            if (cap < need)
                cap = need;
            if (cap > literal->size + 1)
                cap = (size_t)literal->size + 1;
        }
        char *data = realloc(literal->data, cap);
        if (!data)
            return -ENOMEM;
        literal->data = data;
        literal->cap = cap;
    }
    memcpy(literal->data + literal->len, buf, take);
    literal->len += take;
    if (literal->len == literal->size) {
        literal->data[literal->len] = '\0';
        parser->in_literal = 0;
    }
    return (ssize_t)take;
}

/* ---------------------------------------------------------------------------
 * Phase 2: tokenizing a complete response
 */

/* A list under construction. */
struct builder {
    struct imap_value *items;
    size_t count, cap;
};

struct tokenizer {
    const char *pos, *end;
    struct literal *literals;
    size_t literal_count, next_literal;
    size_t values;          /* created so far, against limits->max_values */
    const struct imap_parser_limits *limits;
    struct builder *stack;  /* stack[0] is the response's top level */
    size_t depth, stack_cap;
};

static int builder_add(struct tokenizer *tok, struct builder *builder, struct imap_value *value)
{
    if (tok->values >= tok->limits->max_values)
        return -EMSGSIZE;
    if (builder->count == builder->cap) {
        size_t cap = builder->cap ? builder->cap * 2 : 8;
        if (cap > SIZE_MAX / sizeof(struct imap_value))
            return -ENOMEM;
        struct imap_value *items = realloc(builder->items, cap * sizeof(*items));
        if (!items)
            return -ENOMEM;
        builder->items = items;
        builder->cap = cap;
    }
    builder->items[builder->count++] = *value;
    tok->values++;
    return 0;
}

/* ATOM-CHAR as a client should accept it: liberal about '%', '*', '\\' and
 * ']' (flags are "\Seen", "\*"), and about 8-bit bytes. */
static int is_atom_char(unsigned char c)
{
    return c > 0x20 && c != 0x7f && c != '(' && c != ')' && c != '"' && c != '{';
}

static char *dup_bytes(const char *bytes, size_t len)
{
    char *copy = malloc(len + 1);

    if (copy) {
        memcpy(copy, bytes, len);
        copy[len] = '\0';
    }
    return copy;
}

/* An atom; "[...]" inside it runs to the matching "]" whatever it contains
 * (BODY[HEADER.FIELDS (SUBJECT FROM)]<0> is one atom), with quoted strings
 * in it honoured so a "]" inside quotes does not end it. */
static int read_atom(struct tokenizer *tok, struct imap_value *value)
{
    const char *start = tok->pos, *s = tok->pos, *end = tok->end;

    while (s < end) {
        unsigned char c = (unsigned char)*s;
        if (c == '[') {
            size_t depth = 1;
            int quoted = 0;
            for (s++; depth; s++) {
                if (s == end)
                    return -EPROTO;
                c = (unsigned char)*s;
                if (c < 0x20 || c == 0x7f)
                    return -EPROTO;  /* also the literal break: no literals here */
                if (quoted) {
                    if (c == '"')
                        quoted = 0;
                    else if (c == '\\' && s + 1 < end && (s[1] == '"' || s[1] == '\\'))
                        s++;
                } else if (c == '"') {
                    quoted = 1;
                } else if (c == '[') {
                    depth++;
                } else if (c == ']') {
                    depth--;
                }
            }
            continue;
        }
        if (!is_atom_char(c))
            break;
        s++;
    }
    if (s == start)
        return -EPROTO;
    tok->pos = s;

    size_t len = (size_t)(s - start);
    if (len == 3 && strncasecmp(start, "NIL", 3) == 0) {
        *value = (struct imap_value){ .kind = IMAP_VALUE_NIL };
        return 0;
    }
    *value = (struct imap_value){ .kind = IMAP_VALUE_ATOM };
    uint64_t number = 0;
    size_t i;
    for (i = 0; i < len; i++) {
        unsigned digit = (unsigned)((unsigned char)start[i] - '0');
        if (digit > 9 || number > (UINT64_MAX - digit) / 10)
            break;  /* not a number, or too big for one: stays an atom */
        number = number * 10 + digit;
    }
    if (i == len) {
        value->kind = IMAP_VALUE_NUMBER;
        value->number = number;
    }
    value->str = dup_bytes(start, len);
    if (!value->str)
        return -ENOMEM;
    value->len = len;
    return 0;
}

static int read_quoted(struct tokenizer *tok, struct imap_value *value)
{
    const char *start = tok->pos + 1, *s, *end = tok->end;
    size_t len = 0;

    /* first pass: validate and measure */
    for (s = start;; s++, len++) {
        if (s == end)
            return -EPROTO;
        if (*s == '"')
            break;
        if (*s == '\\') {
            if (++s == end || (*s != '\\' && *s != '"'))
                return -EPROTO;
        } else if (*s == '\r' || *s == '\n' || *s == '\0') {
            return -EPROTO;
        }
    }
    tok->pos = s + 1;

    char *str = malloc(len + 1);
    if (!str)
        return -ENOMEM;
    char *out = str;
    for (s = start; *s != '"'; s++) {
        if (*s == '\\')
            s++;
        *out++ = *s;
    }
    *out = '\0';
    *value = (struct imap_value){ .kind = IMAP_VALUE_STRING, .str = str, .len = len };
    return 0;
}

/* "{n}" or "{n+}" followed by the literal break: the next literal. */
static int read_literal(struct tokenizer *tok, struct imap_value *value)
{
    const char *s = tok->pos + 1, *end = tok->end;
    uint64_t n = 0;
    size_t digits = 0;

    for (; s < end && *s >= '0' && *s <= '9'; s++, digits++) {
        unsigned digit = (unsigned)(*s - '0');
        if (n > (UINT64_MAX - digit) / 10)
            return -EPROTO;
        n = n * 10 + digit;
    }
    if (digits == 0)
        return -EPROTO;
    if (s < end && *s == '+')
        s++;
    if (s + 1 >= end || s[0] != '}' || s[1] != LITERAL_BREAK)
        return -EPROTO;  /* a "{n}" that did not end its line */
    if (tok->next_literal >= tok->literal_count)
        return -EPROTO;
    struct literal *literal = &tok->literals[tok->next_literal++];
    if (literal->size != n || literal->len != n || !literal->data)
        return -EPROTO;  /* cannot happen: same bytes that phase 1 read */
    *value = (struct imap_value){ .kind = IMAP_VALUE_STRING, .str = literal->data,
                                  .len = literal->len, .is_literal = 1 };
    literal->data = NULL;  /* moved */
    tok->pos = s + 2;
    return 0;
}

static void builder_clear(struct builder *builder)
{
    for (size_t i = 0; i < builder->count; i++)
        value_clear(&builder->items[i]);
    free(builder->items);
    *builder = (struct builder){ 0 };
}

/* Tokenizes the data of an untagged response into stack[0]. */
static int tokenize(struct tokenizer *tok)
{
    struct imap_value value;
    int r;

    for (;;) {
        while (tok->pos < tok->end && *tok->pos == ' ')
            tok->pos++;
        if (tok->pos == tok->end)
            break;

        struct builder *top = &tok->stack[tok->depth];
        char c = *tok->pos;
        if (c == '(') {
            if (tok->depth >= tok->limits->max_depth)
                return -EMSGSIZE;
            if (tok->values >= tok->limits->max_values)
                return -EMSGSIZE;  /* the list itself will be one value */
            if (tok->depth + 1 == tok->stack_cap) {
                size_t cap = tok->stack_cap * 2;
                struct builder *stack = realloc(tok->stack, cap * sizeof(*stack));
                if (!stack)
                    return -ENOMEM;
                tok->stack = stack;
                tok->stack_cap = cap;
            }
            tok->depth++;
            tok->stack[tok->depth] = (struct builder){ 0 };
            tok->pos++;
            continue;  /* anything may follow "(" */
        }
        if (c == ')') {
            if (tok->depth == 0)
                return -EPROTO;
            value = (struct imap_value){ .kind = IMAP_VALUE_LIST, .items = top->items,
                                         .count = top->count };
            *top = (struct builder){ 0 };
            tok->depth--;
            tok->pos++;
        } else if (c == '"') {
            r = read_quoted(tok, &value);
            if (r < 0)
                return r;
        } else if (c == '{') {
            r = read_literal(tok, &value);
            if (r < 0)
                return r;
        } else {
            r = read_atom(tok, &value);
            if (r < 0)
                return r;
        }
        r = builder_add(tok, &tok->stack[tok->depth], &value);
        if (r < 0) {
            value_clear(&value);
            return r;
        }
        /* tokens are separated by SP; "(" and ")" need none: BODYSTRUCTURE
         * and address lists write ")(" */
        if (tok->pos < tok->end && *tok->pos != ' ' && *tok->pos != '(' && *tok->pos != ')')
            return -EPROTO;
    }
    if (tok->depth != 0)
        return -EPROTO;
    if (tok->next_literal != tok->literal_count)
        return -EPROTO;
    return 0;
}

static int tokenize_data(struct imap_parser *parser, size_t offset, struct imap_response *response)
{
    struct tokenizer tok = {
        .pos = parser->text + offset, .end = parser->text + parser->text_len,
        .literals = parser->literals, .literal_count = parser->literal_count,
        .limits = &parser->limits,
    };
    int r;

    tok.stack_cap = 8;
    tok.stack = calloc(tok.stack_cap, sizeof(*tok.stack));
    if (!tok.stack)
        return -ENOMEM;
    r = tokenize(&tok);
    if (r == 0) {
        response->items = tok.stack[0].items;
        response->count = tok.stack[0].count;
        tok.stack[0] = (struct builder){ 0 };
        if (response->count == 0)
            r = -EPROTO;  /* "* " and nothing else */
    }
    for (size_t i = 0; i <= tok.depth; i++)
        builder_clear(&tok.stack[i]);
    free(tok.stack);
    return r;
}

/* Status responses: ["[" code "]" SP] text, none of it tokenized. */
static int parse_status_text(const char *text, size_t len, struct imap_response *response)
{
    size_t pos = 0;

    while (pos < len && text[pos] == ' ')
        pos++;
    if (pos < len && text[pos] == '[') {
        /* resp-text-code cannot contain "]", so the first one closes it; if
         * there is none, the server wrote plain text starting with "[" */
        const char *close = memchr(text + pos + 1, ']', len - pos - 1);
        if (close) {
            size_t code_len = (size_t)(close - (text + pos + 1));
            response->code = dup_bytes(text + pos + 1, code_len);
            if (!response->code)
                return -ENOMEM;
            pos = (size_t)(close - text) + 1;
            if (pos < len && text[pos] == ' ')
                pos++;
        }
    }
    response->text = dup_bytes(text + pos, len - pos);
    return response->text ? 0 : -ENOMEM;
}

static int build_response(struct imap_parser *parser, struct imap_response **out)
{
    struct imap_response *response;
    struct head head;
    int r;

    r = parse_head(parser->text, parser->text_len, &head);
    if (r < 0)
        return r;
    response = calloc(1, sizeof(*response));
    if (!response)
        return -ENOMEM;
    response->kind = head.kind;
    response->status = head.status;
    if (head.kind == IMAP_RESP_TAGGED) {
        response->tag = dup_bytes(parser->text, head.tag_len);
        if (!response->tag) {
            r = -ENOMEM;
            goto fail;
        }
    }
    if (head.kind == IMAP_RESP_CONTINUATION) {
        response->text = dup_bytes(parser->text + head.rest, parser->text_len - head.rest);
        r = response->text ? 0 : -ENOMEM;
    } else if (head.status != IMAP_STATUS_NONE) {
        r = parse_status_text(parser->text + head.rest, parser->text_len - head.rest, response);
    } else {
        r = tokenize_data(parser, head.rest, response);
        if (r == 0) {
            response->text = dup_bytes("", 0);
            r = response->text ? 0 : -ENOMEM;
        }
    }
    if (r < 0)
        goto fail;
    *out = response;
    return 0;

fail:
    imap_response_free(response);
    return r;
}

ssize_t imap_parser_feed(struct imap_parser *parser, const char *buf, size_t len,
                         struct imap_response **out)
{
    size_t pos = 0;
    int r = 0;

    *out = NULL;
    if (parser->error)
        return parser->error;
    if (len > SSIZE_MAX)
        len = SSIZE_MAX;  /* the return value must be able to say it */

    while (pos < len) {
        const char *piece = buf + pos;
        size_t avail = len - pos;
        int line_done = 0;

        if (parser->in_literal) {
            ssize_t used = literal_take(parser, piece, avail);
            if (used < 0) {
                r = (int)used;
                goto fail;
            }
            pos += (size_t)used;
            continue;
        }

        if (parser->pending_cr) {
            /* the previous piece ended in CR: only LF may follow */
            if (*piece != '\n') {
                r = -EPROTO;
                goto fail;
            }
            parser->pending_cr = 0;
            pos++;
            line_done = 1;
        } else {
            const char *lf = memchr(piece, '\n', avail);
            size_t segment = lf ? (size_t)(lf - piece) : avail;
            size_t content = segment;

            if (content > 0 && piece[content - 1] == '\r') {
                content--;
                if (!lf)
                    parser->pending_cr = 1;
            }
            if (memchr(piece, '\r', content) || memchr(piece, '\0', content)) {
                r = -EPROTO;
                goto fail;
            }
            r = text_append(parser, piece, content);
            if (r < 0)
                goto fail;
            pos += segment + (lf ? 1 : 0);
            line_done = lf != NULL;
        }

        if (line_done) {
            int complete;
            r = line_end(parser, &complete);
            if (r < 0)
                goto fail;
            if (complete) {
                r = build_response(parser, out);
                parser_reset(parser);
                if (r < 0)
                    goto fail;
                return (ssize_t)pos;
            }
        }
    }
    return (ssize_t)pos;

fail:
    parser->error = r;
    parser_reset(parser);
    return r;
}
