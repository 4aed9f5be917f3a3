/* tests/unit/test_parser.c — the IMAP response parser: every response kind
 * a client meets, canned sessions split at every byte offset, limits,
 * malformed input. */
#include "imap/imap.h"
#include "imap/parser.h"
#include "tests/unit/check.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* ---- a growable byte buffer for building input and dumping output ---- */

struct sbuf {
    char *data;
    size_t len, cap;
};

static void sbuf_add(struct sbuf *b, const void *bytes, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len + 1)
            cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data)
            abort();
        b->cap = cap;
    }
    memcpy(b->data + b->len, bytes, len);
    b->len += len;
    b->data[b->len] = '\0';
}

static void sbuf_str(struct sbuf *b, const char *s)
{
    sbuf_add(b, s, strlen(s));
}

__attribute__((format(printf, 2, 3)))
static void sbuf_printf(struct sbuf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp))
        abort();
    sbuf_add(b, tmp, (size_t)n);
}

/* "{n}\r\n" and the bytes of a literal */
static void sbuf_literal(struct sbuf *b, const void *bytes, size_t len)
{
    sbuf_printf(b, "{%zu}\r\n", len);
    sbuf_add(b, bytes, len);
}

/* a literal from a string constant, length counted by the compiler */
#define SBUF_LITERAL(b, s) sbuf_literal((b), (s), sizeof(s) - 1)

static void sbuf_free(struct sbuf *b)
{
    free(b->data);
    *b = (struct sbuf){ 0 };
}

/* ---- a canonical dump of responses, to compare parses ---- */

static void dump_value(struct sbuf *b, const struct imap_value *v)
{
    switch (v->kind) {
    case IMAP_VALUE_ATOM:
        sbuf_str(b, "a:");
        sbuf_add(b, v->str, v->len);
        break;
    case IMAP_VALUE_NUMBER:
        sbuf_printf(b, "n:%llu", (unsigned long long)v->number);
        break;
    case IMAP_VALUE_STRING:
        sbuf_printf(b, "%s%zu:", v->is_literal ? "L" : "Q", v->len);
        sbuf_add(b, v->str, v->len);
        break;
    case IMAP_VALUE_NIL:
        sbuf_str(b, "NIL");
        break;
    case IMAP_VALUE_LIST:
        sbuf_str(b, "(");
        for (size_t i = 0; i < v->count; i++) {
            if (i)
                sbuf_str(b, " ");
            dump_value(b, &v->items[i]);
        }
        sbuf_str(b, ")");
        break;
    }
}

static void dump_response(struct sbuf *b, const struct imap_response *r)
{
    static const char *const status[] = { "-", "OK", "NO", "BAD", "BYE", "PREAUTH" };
    sbuf_printf(b, "%s %s %s [%s] {%s}",
                r->kind == IMAP_RESP_UNTAGGED ? "*" : r->kind == IMAP_RESP_TAGGED ? "T" : "+",
                r->tag ? r->tag : "-", status[r->status], r->code ? r->code : "-",
                r->text ? r->text : "(null)");
    for (size_t i = 0; i < r->count; i++) {
        sbuf_str(b, " ");
        dump_value(b, &r->items[i]);
    }
    sbuf_str(b, "\n");
}

/* Feeds in[0, len) as a first piece of `first` bytes and then pieces of
 * `step` bytes, dumping every response.  Returns 0, or the parser's error
 * (then dump holds the responses before it).  *pending says whether the
 * parser was left inside a response. */
static int parse_split(const struct imap_parser_limits *limits, const char *in, size_t len,
                       size_t first, size_t step, struct sbuf *dump, int *pending)
{
    struct imap_parser *parser = imap_parser_new(limits);
    size_t pos = 0;
    int err = 0;

    if (!parser)
        abort();
    if (pending)
        *pending = 0;
    while (pos < len && !err) {
        size_t piece = pos == 0 ? first : step;
        if (piece > len - pos)
            piece = len - pos;
        if (piece == 0)
            piece = step < len - pos ? step : len - pos;
        const char *p = in + pos;
        size_t left = piece;
        while (left > 0) {
            struct imap_response *response = (struct imap_response *)1;
            ssize_t used = imap_parser_feed(parser, p, left, &response);
            if (used < 0) {
                CHECK(response == NULL);
                err = (int)used;
                break;
            }
            CHECK((size_t)used <= left);
            if (response) {
                dump_response(dump, response);
                imap_response_free(response);
            } else {
                CHECK_EQ_INT(used, left);  /* without a response all is consumed */
                if ((size_t)used != left)
                    break;
            }
            p += used;
            left -= (size_t)used;
        }
        pos += piece;
    }
    if (pending && !err) {
        /* a harmless probe: an untagged OK completes unless mid-response */
        struct imap_response *response = NULL;
        static const char probe[] = "* OK probe\r\n";
        ssize_t used = imap_parser_feed(parser, probe, sizeof(probe) - 1, &response);
        struct sbuf d = { 0 };
        if (response)
            dump_response(&d, response);
        *pending = !(used == (ssize_t)sizeof(probe) - 1 && response &&
                     strcmp(d.data, "* - OK [-] {probe}\n") == 0);
        sbuf_free(&d);
        imap_response_free(response);
    }
    imap_parser_free(parser);
    return err;
}

/* Parses exactly one complete response from in (all of it). */
static struct imap_response *parse_one_len(const char *in, size_t len)
{
    struct imap_parser *parser = imap_parser_new(NULL);
    struct imap_response *response = NULL;
    ssize_t used = imap_parser_feed(parser, in, len, &response);

    CHECK_EQ_INT(used, (ssize_t)len);
    CHECK(response != NULL);
    imap_parser_free(parser);
    if (response && used != (ssize_t)len) {
        imap_response_free(response);
        return NULL;
    }
    return response;
}

static struct imap_response *parse_one(const char *in)
{
    return parse_one_len(in, strlen(in));
}

/* The dump of one response, for compact expectations. */
static void check_dump(const char *in, const char *expected)
{
    struct sbuf d = { 0 };
    int pending = 0;
    int err = parse_split(NULL, in, strlen(in), strlen(in), 1, &d, &pending);

    CHECK_EQ_INT(err, 0);
    CHECK_EQ_INT(pending, 0);
    if (!d.data || strcmp(d.data, expected) != 0)
        fprintf(stderr, "  input:    %s  got:      %s  expected: %s",
                in, d.data ? d.data : "(nothing)\n", expected);
    CHECK(d.data && strcmp(d.data, expected) == 0);
    sbuf_free(&d);
}

/* Input must fail with err, the same way at every split, and stay failed. */
static void check_error_len(const struct imap_parser_limits *limits, const char *in, size_t len,
                            int expected)
{
    for (size_t first = 0; first <= len; first++) {
        struct sbuf d = { 0 };
        int err = parse_split(limits, in, len, first, len, &d, NULL);
        if (err != expected)
            fprintf(stderr, "  input %.60s split at %zu: error %d, expected %d\n",
                    in, first, err, expected);
        CHECK_EQ_INT(err, expected);
        sbuf_free(&d);
        if (err != expected)
            return;
    }
    /* sticky */
    struct imap_parser *parser = imap_parser_new(limits);
    struct imap_response *response = NULL;
    ssize_t used = 0;
    size_t pos = 0;
    while (pos < len) {
        used = imap_parser_feed(parser, in + pos, len - pos, &response);
        if (used < 0)
            break;
        imap_response_free(response);
        pos += (size_t)used;
    }
    CHECK_EQ_INT(used, expected);
    used = imap_parser_feed(parser, "A1 OK fine\r\n", 12, &response);
    CHECK_EQ_INT(used, expected);
    CHECK(response == NULL);
    uint64_t got = 1, total = 1;
    imap_parser_literal_progress(parser, &got, &total);
    CHECK(got == 0 && total == 0);
    imap_parser_free(parser);
}

static void check_error(const struct imap_parser_limits *limits, const char *in, int expected)
{
    check_error_len(limits, in, strlen(in), expected);
}

/* ------------------------------------------------------------------------ */

static void test_greeting(void)
{
    struct imap_response *r = parse_one(
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
        "AUTH=PLAIN] Dovecot ready.\r\n");
    CHECK(r != NULL);
    if (!r)
        return;
    CHECK_EQ_INT(r->kind, IMAP_RESP_UNTAGGED);
    CHECK_EQ_INT(r->status, IMAP_STATUS_OK);
    CHECK(r->tag == NULL);
    CHECK_EQ_STR(r->code, "CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE "
                          "LITERAL+ AUTH=PLAIN");
    CHECK_EQ_STR(r->text, "Dovecot ready.");
    CHECK_EQ_INT(r->count, 0);
    imap_response_free(r);

    check_dump("* PREAUTH [CAPABILITY IMAP4rev1] Logged in as joe\r\n",
               "* - PREAUTH [CAPABILITY IMAP4rev1] {Logged in as joe}\n");
    check_dump("* BYE Logging out\r\n", "* - BYE [-] {Logging out}\n");
    check_dump("* BYE\r\n", "* - BYE [-] {}\n");
    check_dump("* ok [ALERT] lower case status\r\n", "* - OK [ALERT] {lower case status}\n");
}

static void test_tagged(void)
{
    struct imap_response *r = parse_one("A12 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n");
    CHECK(r != NULL);
    if (r) {
        CHECK_EQ_INT(r->kind, IMAP_RESP_TAGGED);
        CHECK_EQ_STR(r->tag, "A12");
        CHECK_EQ_INT(r->status, IMAP_STATUS_OK);
        CHECK_EQ_STR(r->code, "READ-WRITE");
        CHECK_EQ_STR(r->text, "Select completed (0.001 + 0.000 secs).");
        imap_response_free(r);
    }
    check_dump("A2 NO [NONEXISTENT] Mailbox doesn't exist: Foo\r\n",
               "T A2 NO [NONEXISTENT] {Mailbox doesn't exist: Foo}\n");
    check_dump("A3 BAD Error in IMAP command: Unknown command.\r\n",
               "T A3 BAD [-] {Error in IMAP command: Unknown command.}\n");
    check_dump("a4 ok done\r\n", "T a4 OK [-] {done}\n");
    check_dump("A5 OK\r\n", "T A5 OK [-] {}\n");
    check_dump("A6 NO [ALERT]\r\n", "T A6 NO [ALERT] {}\n");
    check_dump("A6 NO [ALERT] \r\n", "T A6 NO [ALERT] {}\n");
    /* free text is not tokenized: quotes, parens, brackets, braces */
    check_dump("A7 OK \"quoted (paren) [bracket] \\ {3}\r\n",
               "T A7 OK [-] {\"quoted (paren) [bracket] \\ {3}}\n");
    /* a status text ending in "{5}" is text, not a literal */
    check_dump("A8 NO Mailbox doesn't exist: {5}\r\n",
               "T A8 NO [-] {Mailbox doesn't exist: {5}}\n");
    check_dump("* NO [TRYCREATE] No such mailbox {5}\r\n",
               "* - NO [TRYCREATE] {No such mailbox {5}}\n");
    check_dump("A9 OK [APPENDUID 38505 3955] APPEND completed\r\n",
               "T A9 OK [APPENDUID 38505 3955] {APPEND completed}\n");
    check_dump("A10 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n",
               "T A10 OK [COPYUID 38505 304,319:320 3956:3958] {Done}\n");
    check_dump("* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n",
               "* - OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] {Limited}\n");
    check_dump("* OK [UIDVALIDITY 3857529045] UIDs valid\r\n",
               "* - OK [UIDVALIDITY 3857529045] {UIDs valid}\n");
    check_dump("A11 OK [] empty code\r\n", "T A11 OK [] {empty code}\n");
    /* "[" without "]" is just text */
    check_dump("A12 OK [not a code\r\n", "T A12 OK [-] {[not a code}\n");
    /* 8-bit text and tabs are passed on */
    check_dump("A13 NO \xc3\xa4rger\ttab\r\n", "T A13 NO [-] {\xc3\xa4rger\ttab}\n");
}

static void test_continuation(void)
{
    check_dump("+ idling\r\n", "+ - - [-] {idling}\n");
    check_dump("+ \r\n", "+ - - [-] {}\n");
    check_dump("+\r\n", "+ - - [-] {}\n");
    check_dump("+ YGgGCSqGSIb3EgECAgIBAAD/////6jcyG4GE3KkTzBeBiVHeceP2CWY0SR0fAQAgAAQEBAQ=\r\n",
               "+ - - [-] {YGgGCSqGSIb3EgECAgIBAAD/////6jcyG4GE3KkTzBeBiVHeceP2CWY0SR0fAQAgAAQEBAQ=}\n");
    check_dump("+ Ready for literal data {5}\r\n", "+ - - [-] {Ready for literal data {5}}\n");
    struct imap_response *r = parse_one("+ idling\r\n");
    if (r) {
        CHECK_EQ_INT(r->kind, IMAP_RESP_CONTINUATION);
        CHECK_EQ_INT(r->status, IMAP_STATUS_NONE);
        CHECK(r->tag == NULL && r->code == NULL);
        imap_response_free(r);
    }
}

static void test_capability(void)
{
    check_dump("* CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 UIDPLUS MOVE\r\n",
               "* - - [-] {} a:CAPABILITY a:IMAP4rev1 a:LITERAL+ a:AUTH=PLAIN "
               "a:AUTH=XOAUTH2 a:UIDPLUS a:MOVE\n");
    check_dump("* ENABLED CONDSTORE QRESYNC\r\n", "* - - [-] {} a:ENABLED a:CONDSTORE a:QRESYNC\n");
    check_dump("* ID (\"name\" \"Dovecot\" \"version\" NIL)\r\n",
               "* - - [-] {} a:ID (Q4:name Q7:Dovecot Q7:version NIL)\n");
}

static void test_list(void)
{
    struct imap_response *r = parse_one("* LIST (\\HasNoChildren \\Noselect) \"/\" \"INBOX/Sub Folder\"\r\n");
    CHECK(r != NULL);
    if (r) {
        CHECK_EQ_INT(r->count, 4);
        CHECK(imap_value_is_atom(&r->items[0], "LIST"));
        CHECK(imap_value_is_atom(&r->items[0], "list"));
        CHECK_EQ_INT(r->items[1].kind, IMAP_VALUE_LIST);
        CHECK_EQ_INT(r->items[1].count, 2);
        CHECK(imap_value_is_atom(&r->items[1].items[0], "\\HasNoChildren"));
        CHECK(imap_value_is_atom(&r->items[1].items[1], "\\noselect"));
        CHECK_EQ_INT(r->items[2].kind, IMAP_VALUE_STRING);
        CHECK_EQ_STR(r->items[2].str, "/");
        CHECK_EQ_STR(r->items[3].str, "INBOX/Sub Folder");
        CHECK_EQ_INT(r->items[3].is_literal, 0);
        CHECK_EQ_STR(r->text, "");
        imap_response_free(r);
    }
    check_dump("* LIST () NIL INBOX\r\n", "* - - [-] {} a:LIST () NIL a:INBOX\n");
    check_dump("* LIST () nil \"\"\r\n", "* - - [-] {} a:LIST () NIL Q0:\n");
    check_dump("* LIST (\\HasChildren) \".\" {11}\r\nfoo \"bar\" )\r\n",
               "* - - [-] {} a:LIST (a:\\HasChildren) Q1:. L11:foo \"bar\" )\n");
    check_dump("* LIST (\\Noinferiors) \"\\\\\" \"a\\\\b\\\"c\"\r\n",
               "* - - [-] {} a:LIST (a:\\Noinferiors) Q1:\\ Q5:a\\b\"c\n");
    check_dump("* LIST (\\HasNoChildren) {1}\r\n/ {5}\r\nINBOX\r\n",
               "* - - [-] {} a:LIST (a:\\HasNoChildren) L1:/ L5:INBOX\n");
    check_dump("* LIST (\\HasNoChildren) \"/\" Entw&APw-rfe\r\n",
               "* - - [-] {} a:LIST (a:\\HasNoChildren) Q1:/ a:Entw&APw-rfe\n");
    check_dump("* LIST (\\Subscribed) \"/\" \"x\" (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n",
               "* - - [-] {} a:LIST (a:\\Subscribed) Q1:/ Q1:x (Q9:CHILDINFO (Q10:SUBSCRIBED))\n");
    /* a mailbox called 2024 is a NUMBER that still has its digits */
    check_dump("* LIST () \"/\" 2024\r\n", "* - - [-] {} a:LIST () Q1:/ n:2024\n");
    check_dump("* LSUB () \"/\" \"\xe5\x8f\xb0\"\r\n", "* - - [-] {} a:LSUB () Q1:/ Q3:\xe5\x8f\xb0\n");
}

static void test_status_search(void)
{
    struct imap_response *r = parse_one(
        "* STATUS \"INBOX\" (MESSAGES 231 UIDNEXT 44292 UIDVALIDITY 4294967295 UNSEEN 0 "
        "HIGHESTMODSEQ 18446744073709551615 BIG 18446744073709551616)\r\n");
    CHECK(r != NULL);
    if (r) {
        struct imap_value *list = &r->items[2];
        uint32_t u = 0;
        CHECK_EQ_INT(list->kind, IMAP_VALUE_LIST);
        CHECK(imap_fetch_item(list, "MESSAGES") && imap_fetch_item(list, "MESSAGES")->number == 231);
        CHECK_EQ_INT(imap_value_u32(imap_fetch_item(list, "uidvalidity"), &u), 0);
        CHECK(u == 4294967295u);
        struct imap_value *modseq = imap_fetch_item(list, "HIGHESTMODSEQ");
        CHECK(modseq && modseq->kind == IMAP_VALUE_NUMBER && modseq->number == UINT64_MAX);
        CHECK_EQ_INT(imap_value_u32(modseq, &u), -EPROTO);
        struct imap_value *big = imap_fetch_item(list, "BIG");
        CHECK(big && big->kind == IMAP_VALUE_ATOM);
        CHECK_EQ_STR(big ? big->str : NULL, "18446744073709551616");
        CHECK_EQ_INT(imap_value_u32(big, &u), -EPROTO);
        CHECK_EQ_INT(imap_value_u32(&r->items[1], &u), -EPROTO);  /* a string */
        CHECK_EQ_INT(imap_value_u32(NULL, &u), -EPROTO);
        CHECK(imap_fetch_item(list, "RECENT") == NULL);
        CHECK(imap_fetch_item(&r->items[0], "MESSAGES") == NULL);  /* not a list */
        imap_response_free(r);
    }
    check_dump("* SEARCH 2 84 882\r\n", "* - - [-] {} a:SEARCH n:2 n:84 n:882\n");
    check_dump("* SEARCH\r\n", "* - - [-] {} a:SEARCH\n");
    check_dump("* SEARCH \r\n", "* - - [-] {} a:SEARCH\n");
    check_dump("* SEARCH 1 2 (MODSEQ 917162500)\r\n",
               "* - - [-] {} a:SEARCH n:1 n:2 (a:MODSEQ n:917162500)\n");
    check_dump("* ESEARCH (TAG \"A285\") UID MIN 7 MAX 3800 ALL 1:3,5,7:9\r\n",
               "* - - [-] {} a:ESEARCH (a:TAG Q4:A285) a:UID a:MIN n:7 a:MAX n:3800 a:ALL a:1:3,5,7:9\n");
    check_dump("* ESEARCH (TAG \"A1\") UID\r\n", "* - - [-] {} a:ESEARCH (a:TAG Q2:A1) a:UID\n");
}

static void test_mailbox_data(void)
{
    check_dump("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)\r\n",
               "* - - [-] {} a:FLAGS (a:\\Answered a:\\Flagged a:\\Deleted a:\\Seen a:\\Draft a:$Forwarded)\n");
    check_dump("* 23 EXISTS\r\n", "* - - [-] {} n:23 a:EXISTS\n");
    check_dump("* 0 RECENT\r\n", "* - - [-] {} n:0 a:RECENT\n");
    check_dump("* 44 EXPUNGE\r\n", "* - - [-] {} n:44 a:EXPUNGE\n");
    check_dump("* VANISHED (EARLIER) 300:310,405,411\r\n",
               "* - - [-] {} a:VANISHED (a:EARLIER) a:300:310,405,411\n");
    check_dump("* VANISHED 405\r\n", "* - - [-] {} a:VANISHED n:405\n");
    check_dump("* QUOTAROOT INBOX \"\"\r\n", "* - - [-] {} a:QUOTAROOT a:INBOX Q0:\n");
    check_dump("* QUOTA \"\" (STORAGE 10 512 MESSAGE 4 1000)\r\n",
               "* - - [-] {} a:QUOTA Q0: (a:STORAGE n:10 n:512 a:MESSAGE n:4 n:1000)\n");
    check_dump("* NAMESPACE ((\"\" \"/\")) NIL ((\"Shared/\" \"/\")(\"#public/\" \"/\"))\r\n",
               "* - - [-] {} a:NAMESPACE ((Q0: Q1:/)) NIL ((Q7:Shared/ Q1:/) (Q8:#public/ Q1:/))\n");
    /* bare LF line ends are accepted */
    check_dump("* 5 EXISTS\n", "* - - [-] {} n:5 a:EXISTS\n");
    check_dump("A1 OK done\n", "T A1 OK [-] {done}\n");
}

static void test_fetch(void)
{
    static const char in[] =
        "* 12 FETCH (UID 4321 RFC822.SIZE 44827 INTERNALDATE \"17-Jul-1996 02:44:25 -0700\" "
        "FLAGS (\\Seen $Work) MODSEQ (12345) BODY[] {12}\r\nHello\r\nWorld)\r\n";
    struct imap_response *r = parse_one(in);
    CHECK(r != NULL);
    if (!r)
        return;
    CHECK_EQ_INT(r->count, 3);
    CHECK_EQ_INT(r->items[0].kind, IMAP_VALUE_NUMBER);
    CHECK(r->items[0].number == 12);
    CHECK_EQ_STR(r->items[0].str, "12");
    CHECK(imap_value_is_atom(&r->items[1], "fetch"));
    CHECK(!imap_value_is_atom(&r->items[1], "FETC"));
    CHECK(!imap_value_is_atom(&r->items[0], "12"));  /* a number is not an atom */
    struct imap_value *attrs = &r->items[2];
    uint32_t uid = 0, size = 0;
    CHECK_EQ_INT(imap_value_u32(imap_fetch_item(attrs, "UID"), &uid), 0);
    CHECK(uid == 4321);
    CHECK_EQ_INT(imap_value_u32(imap_fetch_item(attrs, "rfc822.size"), &size), 0);
    CHECK(size == 44827);
    struct imap_value *date = imap_fetch_item(attrs, "INTERNALDATE");
    CHECK(date && date->kind == IMAP_VALUE_STRING && !date->is_literal);
    CHECK_EQ_STR(date ? date->str : NULL, "17-Jul-1996 02:44:25 -0700");
    struct imap_value *flags = imap_fetch_item(attrs, "FLAGS");
    CHECK(flags && flags->kind == IMAP_VALUE_LIST && flags->count == 2);
    CHECK(flags && imap_value_is_atom(&flags->items[1], "$work"));
    struct imap_value *modseq = imap_fetch_item(attrs, "MODSEQ");
    CHECK(modseq && modseq->kind == IMAP_VALUE_LIST && modseq->count == 1 &&
          modseq->items[0].number == 12345);
    struct imap_value *body = imap_fetch_item(attrs, "BODY[]");
    CHECK(body && body->kind == IMAP_VALUE_STRING && body->is_literal && body->len == 12);
    size_t len = 0;
    char *bytes = imap_value_steal(body, &len);
    CHECK(bytes && len == 12 && memcmp(bytes, "Hello\r\nWorld", 13) == 0);
    CHECK(body && body->str == NULL);
    CHECK(imap_value_steal(body, &len) == NULL);
    CHECK(imap_value_steal(flags, &len) == NULL);  /* a list has no bytes */
    free(bytes);
    char *word = imap_value_steal(&r->items[1], NULL);
    CHECK_EQ_STR(word, "FETCH");
    free(word);
    imap_response_free(r);  /* frees around the stolen bytes */

    check_dump("* 1 FETCH (UID 5 BODY[]<0> {4}\r\nFrom)\r\n",
               "* - - [-] {} n:1 a:FETCH (a:UID n:5 a:BODY[]<0> L4:From)\n");
    check_dump("* 2 FETCH (BODY[HEADER.FIELDS (SUBJECT FROM)]<0> {9}\r\nSubject:x UID 9)\r\n",
               "* - - [-] {} n:2 a:FETCH (a:BODY[HEADER.FIELDS (SUBJECT FROM)]<0> L9:Subject:x a:UID n:9)\n");
    check_dump("* 3 FETCH (BODY[HEADER.FIELDS (\"X]\")] NIL)\r\n",
               "* - - [-] {} n:3 a:FETCH (a:BODY[HEADER.FIELDS (\"X]\")] NIL)\n");
    check_dump("* 4 FETCH (BINARY.SIZE[1] 1024 BODY[1.MIME] \"x\")\r\n",
               "* - - [-] {} n:4 a:FETCH (a:BINARY.SIZE[1] n:1024 a:BODY[1.MIME] Q1:x)\n");
    /* literal+ and an empty literal and a literal with NUL bytes */
    check_dump("* 5 FETCH (BODY[] {0+}\r\n UID 5)\r\n",
               "* - - [-] {} n:5 a:FETCH (a:BODY[] L0: a:UID n:5)\n");
    struct imap_response *nul = parse_one_len("* 6 FETCH (BODY[] {3}\r\na\0b)\r\n", 29);
    if (nul) {
        struct imap_value *v = imap_fetch_item(&nul->items[2], "BODY[]");
        CHECK(v && v->len == 3 && memcmp(v->str, "a\0b", 4) == 0);
        imap_response_free(nul);
    }
    /* unsolicited flag change */
    check_dump("* 3 FETCH (FLAGS (\\Seen \\*) UID 3 MODSEQ (9))\r\n",
               "* - - [-] {} n:3 a:FETCH (a:FLAGS (a:\\Seen a:\\*) a:UID n:3 a:MODSEQ (n:9))\n");
    /* an 8-bit quoted string (UTF8=ACCEPT) */
    check_dump("* 7 FETCH (X \"\xc3\xa4\")\r\n", "* - - [-] {} n:7 a:FETCH (a:X Q2:\xc3\xa4)\n");
    /* fetch_item on an odd list does not read past the end */
    struct imap_response *odd = parse_one("* 8 FETCH (UID)\r\n");
    if (odd) {
        CHECK(imap_fetch_item(&odd->items[2], "UID") == NULL);
        imap_response_free(odd);
    }
}

static void test_envelope(void)
{
    static const char in[] =
        "* 12 FETCH (ENVELOPE (\"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\" "
        "\"IMAP4rev1 WG mtg summary and minutes\" "
        "((\"Terry Gray\" NIL \"gray\" \"cac.washington.edu\")) "
        "((\"Terry Gray\" NIL \"gray\" \"cac.washington.edu\")) "
        "((\"Terry Gray\" NIL \"gray\" \"cac.washington.edu\")) "
        "((NIL NIL \"imap\" \"cac.washington.edu\")) "
        "((NIL NIL \"minutes\" \"CNRI.Reston.VA.US\")(\"John Klensin\" NIL \"KLENSIN\" \"MIT.EDU\")) "
        "NIL NIL \"<B27397-0100000@cac.washington.edu>\"))\r\n";
    struct imap_response *r = parse_one(in);
    CHECK(r != NULL);
    if (!r)
        return;
    struct imap_value *env = imap_fetch_item(&r->items[2], "ENVELOPE");
    CHECK(env && env->kind == IMAP_VALUE_LIST && env->count == 10);
    if (env && env->count == 10) {
        CHECK_EQ_STR(env->items[1].str, "IMAP4rev1 WG mtg summary and minutes");
        CHECK_EQ_INT(env->items[6].count, 2);
        CHECK_EQ_INT(env->items[6].items[1].count, 4);
        CHECK_EQ_STR(env->items[6].items[1].items[0].str, "John Klensin");
        CHECK_EQ_INT(env->items[6].items[0].items[0].kind, IMAP_VALUE_NIL);
        CHECK_EQ_INT(env->items[7].kind, IMAP_VALUE_NIL);
        CHECK_EQ_STR(env->items[9].str, "<B27397-0100000@cac.washington.edu>");
    }
    imap_response_free(r);

    check_dump("* 1 FETCH (BODYSTRUCTURE ((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL "
               "\"7BIT\" 1152 23)(\"TEXT\" \"HTML\" NIL NIL NIL \"BASE64\" 4554 73) \"ALTERNATIVE\"))\r\n",
               "* - - [-] {} n:1 a:FETCH (a:BODYSTRUCTURE ((Q4:TEXT Q5:PLAIN (Q7:CHARSET Q8:US-ASCII) "
               "NIL NIL Q4:7BIT n:1152 n:23) (Q4:TEXT Q4:HTML NIL NIL NIL Q6:BASE64 n:4554 n:73) "
               "Q11:ALTERNATIVE))\n");
}

static void test_stops_after_response(void)
{
    static const char in[] = "* 1 EXISTS\r\nA1 OK done\r\n* 2 EXISTS\r\n";
    struct imap_parser *parser = imap_parser_new(NULL);
    struct imap_response *r = NULL;
    ssize_t used = imap_parser_feed(parser, in, strlen(in), &r);
    CHECK_EQ_INT(used, 12);
    CHECK(r && r->count == 2);
    imap_response_free(r);
    used = imap_parser_feed(parser, in + 12, strlen(in) - 12, &r);
    CHECK_EQ_INT(used, 12);
    CHECK(r && r->kind == IMAP_RESP_TAGGED);
    imap_response_free(r);
    used = imap_parser_feed(parser, in + 24, 5, &r);  /* half a response */
    CHECK_EQ_INT(used, 5);
    CHECK(r == NULL);
    used = imap_parser_feed(parser, in + 29, 0, &r);
    CHECK_EQ_INT(used, 0);
    CHECK(r == NULL);
    used = imap_parser_feed(parser, in + 29, strlen(in) - 29, &r);
    CHECK_EQ_INT(used, (ssize_t)strlen(in) - 29);
    CHECK(r && r->count == 2 && r->items[0].number == 2);
    imap_response_free(r);
    imap_parser_free(parser);
}

static void test_literal_progress(void)
{
    struct imap_parser *parser = imap_parser_new(NULL);
    struct imap_response *r = NULL;
    uint64_t got = 7, total = 7;

    imap_parser_literal_progress(parser, &got, &total);
    CHECK(got == 0 && total == 0);
    static const char head[] = "* 1 FETCH (BODY[] {10}\r\nabcd";
    CHECK_EQ_INT(imap_parser_feed(parser, head, strlen(head), &r), (ssize_t)strlen(head));
    imap_parser_literal_progress(parser, &got, &total);
    CHECK(got == 4 && total == 10);
    CHECK_EQ_INT(imap_parser_feed(parser, "efghij", 6, &r), 6);
    imap_parser_literal_progress(parser, &got, &total);
    CHECK(got == 0 && total == 0);  /* literal done, back in text */
    CHECK_EQ_INT(imap_parser_feed(parser, ")\r\n", 3, &r), 3);
    CHECK(r != NULL);
    imap_response_free(r);
    imap_parser_free(parser);
}

/* A literal announced huge but not sent must not be allocated: with a
 * limit that allows it, {10^15} (a petabyte, which no malloc grants)
 * followed by a few bytes works and reports progress. */
static void test_huge_literal_not_allocated(void)
{
    struct imap_parser_limits limits;
    imap_parser_default_limits(&limits);
    limits.max_literal = UINT64_MAX;
    struct imap_parser *parser = imap_parser_new(&limits);
    struct imap_response *r = NULL;
    static const char in[] = "* 1 FETCH (BODY[] {1000000000000000}\r\nsome bytes";
    ssize_t used = imap_parser_feed(parser, in, strlen(in), &r);
    CHECK_EQ_INT(used, (ssize_t)strlen(in));
    CHECK(r == NULL);
    uint64_t got = 0, total = 0;
    imap_parser_literal_progress(parser, &got, &total);
    CHECK(got == 10 && total == 1000000000000000ULL);
    imap_parser_free(parser);  /* frees the partial literal */

    /* the default limit refuses 3 GiB at once, before any byte of it */
    check_error(NULL, "* 1 FETCH (BODY[] {3221225472}\r\n", -EMSGSIZE);
    /* the largest uint64 and one more */
    check_error(&limits, "* 1 FETCH (BODY[] {18446744073709551615}\r\n", -EMSGSIZE);
    check_error(&limits, "* 1 FETCH (BODY[] {18446744073709551616}\r\n", -EPROTO);
}

/* The canned session: everything above in one stream. */
static void build_session(struct sbuf *in)
{
    sbuf_str(in, "* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] Dovecot ready.\r\n");
    sbuf_str(in, "A1 OK [CAPABILITY IMAP4rev1 MOVE] Logged in\r\n");
    sbuf_str(in, "* LIST (\\HasNoChildren) \"/\" ");
    SBUF_LITERAL(in, "foo)\"\r\n");
    sbuf_str(in, "\r\n");
    sbuf_str(in, "* LIST (\\Noselect \\HasChildren) NIL \"quoted \\\"name\\\\\"\r\n");
    sbuf_str(in, "A2 OK List completed\r\n");
    sbuf_str(in, "* 3 EXISTS\n");
    sbuf_str(in, "* OK [UIDVALIDITY 1700000000] UIDs valid\r\n");
    sbuf_str(in, "* 1 FETCH (UID 10 RFC822.SIZE 0 BODY[] ");
    SBUF_LITERAL(in, "");
    sbuf_str(in, ")\r\n");
    sbuf_str(in, "* 2 FETCH (UID 11 BODY[] ");
    SBUF_LITERAL(in, "line1\r\n(\")\r\n{3}\r\n\r\n");
    sbuf_str(in, " FLAGS (\\Seen))\r\n");
    sbuf_str(in, "* 3 FETCH (UID 12 BODY[HEADER.FIELDS (SUBJECT)]<0> {4+}\r\nSub: "
                 "INTERNALDATE \"01-Jan-2024 00:00:00 +0000\")\r\n");
    sbuf_str(in, "* 4 FETCH (BODY[1] ");
    sbuf_add(in, "{4}\r\n\0\r\n\0", 9);
    sbuf_str(in, " BODY[2] ");
    SBUF_LITERAL(in, "{1}\r\n");
    sbuf_str(in, " ENVELOPE (NIL \"s\" ((\"A\" NIL \"a\" \"x\")(NIL NIL \"b\" \"y\")) NIL NIL NIL NIL NIL NIL NIL))\r\n");
    sbuf_str(in, "A3 OK [APPENDUID 38505 3955] Append completed\r\n");
    sbuf_str(in, "+ idling\r\n");
    sbuf_str(in, "* 2 EXPUNGE\r\n* VANISHED (EARLIER) 1:3\r\n");
    sbuf_str(in, "+ \r\n");
    sbuf_str(in, "A4 NO [TRYCREATE] Mailbox doesn't exist: {5}\r\n");
    sbuf_str(in, "* ESEARCH (TAG \"A5\") UID ALL 1:3,5\r\n");
    sbuf_str(in, "* BYE Logging out\r\n");
}

/* strstr that does not stop at NUL bytes in the dump */
static int has(const struct sbuf *b, const char *s)
{
    return b->data && memmem(b->data, b->len, s, strlen(s)) != NULL;
}

static void test_split_everywhere(void)
{
    struct sbuf in = { 0 }, reference = { 0 };
    int pending = 1;

    build_session(&in);
    CHECK_EQ_INT(parse_split(NULL, in.data, in.len, in.len, in.len, &reference, &pending), 0);
    CHECK_EQ_INT(pending, 0);
    /* sanity: some of the content */
    CHECK(has(&reference, "* - - [-] {} a:LIST (a:\\HasNoChildren) Q1:/ L7:foo)\"\r\n\n"));
    CHECK(has(&reference, "L19:line1\r\n(\")\r\n{3}\r\n\r\n a:FLAGS (a:\\Seen))\n"));
    static const char nuls[] = "(a:BODY[1] L4:\0\r\n\0 a:BODY[2] L5:{1}\r\n a:ENVELOPE";
    CHECK(memmem(reference.data, reference.len, nuls, sizeof(nuls) - 1) != NULL);
    CHECK(has(&reference, "L4:Sub: a:INTERNALDATE"));
    CHECK(has(&reference, "+ - - [-] {idling}\n"));
    CHECK(has(&reference, "T A4 NO [TRYCREATE] {Mailbox doesn't exist: {5}}\n"));
    CHECK(has(&reference, "* - BYE [-] {Logging out}\n"));

    for (size_t first = 0; first <= in.len; first++) {
        struct sbuf d = { 0 };
        int err = parse_split(NULL, in.data, in.len, first, in.len, &d, &pending);
        CHECK_EQ_INT(err, 0);
        CHECK_EQ_INT(pending, 0);
        CHECK(d.len == reference.len && memcmp(d.data, reference.data, d.len) == 0);
        sbuf_free(&d);
        if (check_failures_in_test) {
            fprintf(stderr, "  split at %zu differs\n", first);
            break;
        }
    }
    for (size_t step = 1; step <= 7; step++) {
        struct sbuf d = { 0 };
        CHECK_EQ_INT(parse_split(NULL, in.data, in.len, step, step, &d, &pending), 0);
        CHECK_EQ_INT(pending, 0);
        CHECK(d.len == reference.len && memcmp(d.data, reference.data, d.len) == 0);
        sbuf_free(&d);
    }
    sbuf_free(&in);
    sbuf_free(&reference);
}

static void test_limits(void)
{
    struct imap_parser_limits limits = {
        .max_line = 64, .max_literal = 16, .max_depth = 3, .max_values = 10,
    };
    char line[200];

    /* line: 64 bytes of text (CRLF not counted) is the most */
    memset(line, 'x', sizeof(line));
    memcpy(line, "* OK ", 5);
    memcpy(line + 64, "\r\n", 3);
    {
        struct sbuf d = { 0 };
        CHECK_EQ_INT(parse_split(&limits, line, 66, 66, 1, &d, NULL), 0);
        CHECK(d.len > 0);
        sbuf_free(&d);
    }
    line[64] = 'x';
    memcpy(line + 65, "\r\n", 3);
    check_error(&limits, line, -EMSGSIZE);
    /* refused as soon as it is too long, without waiting for the LF */
    memset(line, 'x', sizeof(line));
    memcpy(line, "* OK ", 5);
    check_error_len(&limits, line, 100, -EMSGSIZE);
    /* the limit counts the whole response's text, not one line */
    {
        struct sbuf in = { 0 }, d = { 0 };
        sbuf_str(&in, "* LIST () \"/\" {3}\r\n");
        for (int i = 0; i < 2; i++)
            sbuf_str(&in, "abc LIST () \"/\" {3}\r\n");
        sbuf_str(&in, "abc\r\n");
        struct imap_parser_limits many = limits;
        many.max_values = 100;
        CHECK_EQ_INT(parse_split(&many, in.data, in.len, in.len, 1, &d, NULL), 0);
        sbuf_free(&d);
        in.len -= 5;
        for (int i = 0; i < 2; i++)
            sbuf_str(&in, "abc LIST () \"/\" {3}\r\n");
        sbuf_str(&in, "abc\r\n");
        check_error(&many, in.data, -EMSGSIZE);
        sbuf_free(&in);
    }
    /* and no more literals than values */
    check_error(&limits, "* {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n\r\n",
                -EMSGSIZE);

    /* literal */
    check_error(&limits, "* 1 FETCH (BODY[] {17}\r\n", -EMSGSIZE);
    check_error(&limits, "* 1 FETCH (BODY[] {17+}\r\n", -EMSGSIZE);
    {
        struct sbuf d = { 0 };
        static const char ok[] = "* 1 FETCH (BODY[] {16}\r\n0123456789abcdef)\r\n";
        CHECK_EQ_INT(parse_split(&limits, ok, strlen(ok), 0, 1, &d, NULL), 0);
        CHECK(strstr(d.data ? d.data : "", "L16:0123456789abcdef") != NULL);
        sbuf_free(&d);
    }

    /* depth */
    check_dump("* X (((a)))\r\n", "* - - [-] {} a:X (((a:a)))\n");
    {
        struct sbuf d = { 0 };
        CHECK_EQ_INT(parse_split(&limits, "* X (((a)))\r\n", 13, 13, 1, &d, NULL), 0);
        sbuf_free(&d);
    }
    check_error(&limits, "* X ((((a))))\r\n", -EMSGSIZE);
    check_error(&limits, "* X ((((\r\n", -EMSGSIZE);

    /* values: every token and every list counts */
    {
        struct sbuf d = { 0 };
        CHECK_EQ_INT(parse_split(&limits, "* SEARCH 1 2 3 4 5 6 7 8 9\r\n", 28, 28, 1, &d, NULL), 0);
        sbuf_free(&d);
    }
    check_error(&limits, "* SEARCH 1 2 3 4 5 6 7 8 9 10\r\n", -EMSGSIZE);
    check_error(&limits, "* X (1 2 3 4) (5 6 7 8)\r\n", -EMSGSIZE);
    check_error(&limits, "* X {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n {0}\r\n\r\n",
                -EMSGSIZE);

    /* max_depth 0: no lists at all */
    struct imap_parser_limits flat = { .max_line = 100, .max_literal = 10, .max_depth = 0, .max_values = 5 };
    check_error(&flat, "* FLAGS ()\r\n", -EMSGSIZE);

    /* a limit is not an error for the next response after a good one */
    {
        struct sbuf d = { 0 };
        static const char two[] = "* 1 EXISTS\r\n* 1 FETCH (BODY[] {17}\r\n";
        CHECK_EQ_INT(parse_split(&limits, two, strlen(two), strlen(two), 1, &d, NULL), -EMSGSIZE);
        CHECK_EQ_STR(d.data, "* - - [-] {} n:1 a:EXISTS\n");
        sbuf_free(&d);
    }
}

static void test_malformed(void)
{
    check_error(NULL, "* LIST ((\\Noselect) \"/\" foo\r\n", -EPROTO);
    check_error(NULL, "* LIST (\\Noselect)) \"/\" foo\r\n", -EPROTO);
    check_error(NULL, "* SEARCH 1 2 )\r\n", -EPROTO);
    check_error(NULL, "* X (\r\n", -EPROTO);
    check_error(NULL, "* LIST () \"/\" \"a\\qb\"\r\n", -EPROTO);
    check_error(NULL, "* LIST () \"/\" \"a\\\r\n", -EPROTO);
    check_error(NULL, "* LIST () \"/\" \"abc\r\n", -EPROTO);
    check_error(NULL, "* LIST () \"/\" \"abc {3}\r\nabc\"\r\n", -EPROTO);
    check_error(NULL, "* LIST () \"/\" \"abc\"def\r\n", -EPROTO);
    check_error(NULL, "A1 FETCH (UID 1)\r\n", -EPROTO);
    check_error(NULL, "A1 OKAY done\r\n", -EPROTO);
    check_error(NULL, "A1\r\n", -EPROTO);
    check_error(NULL, "A1 \r\n", -EPROTO);
    check_error(NULL, "(A1 OK done\r\n", -EPROTO);
    check_error(NULL, "A+1 OK done\r\n", -EPROTO);
    check_error(NULL, "\r\n", -EPROTO);
    check_error(NULL, "\n", -EPROTO);
    check_error(NULL, "*\r\n", -EPROTO);
    check_error(NULL, "* \r\n", -EPROTO);
    check_error(NULL, "*OK hi\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {abc}\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {}\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {99999999999999999999999}\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {3} x)\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {3}\r\nabcX)\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {3}\r\nabc\"x\")\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] x{3}\r\nabc)\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[] {3}\r\nabc{2}\r\nxy)\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[HEADER.FIELDS ({7}\r\nSubject)] NIL)\r\n", -EPROTO);
    check_error(NULL, "* 1 FETCH (BODY[unclosed NIL)\r\n", -EPROTO);
    check_error(NULL, "* X a\x01" "b\r\n", -EPROTO);
    check_error(NULL, "* X a\tb\r\n", -EPROTO);
    check_error(NULL, "* OK a\rb\r\n", -EPROTO);
    check_error(NULL, "* OK a\r\r\n", -EPROTO);
    {
        /* a CR at the end of what arrived is not an error yet */
        struct sbuf d = { 0 };
        int pending = 0;
        CHECK_EQ_INT(parse_split(NULL, "* OK ab\r", 8, 8, 1, &d, NULL), 0);
        CHECK_EQ_INT(parse_split(NULL, "* OK ab\r\n", 9, 8, 1, &d, &pending), 0);
        CHECK_EQ_INT(pending, 0);
        CHECK_EQ_STR(d.data, "* - OK [-] {ab}\n");
        sbuf_free(&d);
    }
    check_error_len(NULL, "* OK hi\0there\r\n", 15, -EPROTO);
    check_error_len(NULL, "* X \"a\0b\"\r\n", 11, -EPROTO);
    check_error_len(NULL, "A1 OK\0\r\n", 8, -EPROTO);
    /* an error after good responses: those were delivered */
    {
        struct sbuf d = { 0 };
        static const char in[] = "* 1 EXISTS\r\n* X ((\r\n* 2 EXISTS\r\n";
        CHECK_EQ_INT(parse_split(NULL, in, strlen(in), strlen(in), 1, &d, NULL), -EPROTO);
        CHECK_EQ_STR(d.data, "* - - [-] {} n:1 a:EXISTS\n");
        sbuf_free(&d);
    }
}

/* A synthetic UID FETCH of many messages, to see that the literal path is
 * cheap.  Not a timed test: the rate is printed, not checked. */
static void test_throughput(void)
{
    const char *env = getenv("IMAPFS_BENCH_MB");
    size_t megabytes = env ? strtoul(env, NULL, 10) : 4;
    size_t body_len = 8000, messages = megabytes * 1000 * 1000 / body_len;
    struct sbuf in = { 0 };
    char *body = malloc(body_len);

    if (!body || messages == 0) {
        free(body);
        return;
    }
    for (size_t i = 0; i < body_len; i++)
        body[i] = (i % 78 == 77) ? '\n' : (char)('a' + i % 26);
    for (size_t i = 1; i <= messages; i++) {
        sbuf_printf(&in, "* %zu FETCH (UID %zu RFC822.SIZE %zu FLAGS (\\Seen) BODY[] ", i, i + 1000, body_len);
        sbuf_literal(&in, body, body_len);
        sbuf_str(&in, ")\r\n");
    }
    sbuf_str(&in, "A1 OK Fetch completed\r\n");

    struct imap_parser *parser = imap_parser_new(NULL);
    struct timespec t0, t1;
    size_t pos = 0, responses = 0, bodies = 0;
    const size_t piece = 64 * 1024;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (pos < in.len) {
        size_t end = pos + piece < in.len ? pos + piece : in.len;
        while (pos < end) {
            struct imap_response *r = NULL;
            ssize_t used = imap_parser_feed(parser, in.data + pos, end - pos, &r);
            if (used < 0) {
                CHECK_EQ_INT(used, 0);
                pos = in.len;
                break;
            }
            pos += (size_t)used;
            if (r) {
                responses++;
                if (r->count == 3) {
                    struct imap_value *v = imap_fetch_item(&r->items[2], "BODY[]");
                    bodies += v && v->len == body_len ? 1 : 0;
                }
                imap_response_free(r);
            }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    CHECK_EQ_INT(responses, messages + 1);
    CHECK_EQ_INT(bodies, messages);
    fprintf(stderr, "     %zu messages, %.1f MB in 64 KiB pieces: %.3f s, %.0f MB/s\n",
            messages, (double)in.len / 1e6, seconds, seconds > 0 ? (double)in.len / 1e6 / seconds : 0.0);
    imap_parser_free(parser);
    sbuf_free(&in);
    free(body);
}

static void test_defaults(void)
{
    struct imap_parser_limits limits;
    imap_parser_default_limits(&limits);
    CHECK(limits.max_line == 16u * 1024 * 1024);
    CHECK(limits.max_literal == 2ull * 1024 * 1024 * 1024);
    CHECK(limits.max_depth == 32);
    CHECK(limits.max_values == 512u * 1024);
    imap_parser_free(NULL);
    imap_response_free(NULL);
}

/* What the watcher makes of pushed responses (imap_response_change). */
static void check_change(const char *in, enum imap_change want, const char *want_mailbox)
{
    struct imap_response *r = parse_one(in);
    const char *mailbox = "unset";
    CHECK(r != NULL);
    if (!r)
        return;
    enum imap_change got = imap_response_change(r, &mailbox);
    if (got != want)
        fprintf(stderr, "  for %s", in);
    CHECK_EQ_INT(got, want);
    if (want_mailbox)
        CHECK_EQ_STR(mailbox, want_mailbox);
    else
        CHECK(mailbox == NULL);
    imap_response_free(r);
}

static void test_push_classification(void)
{
    check_change("* STATUS INBOX (MESSAGES 13 UIDNEXT 14)\r\n", IMAP_CHANGE_MAILBOX, "INBOX");
    check_change("* STATUS \"Sent Items\" (HIGHESTMODSEQ 19)\r\n", IMAP_CHANGE_MAILBOX,
                 "Sent Items");
    check_change("* STATUS {5}\r\nLists (MESSAGES 1)\r\n", IMAP_CHANGE_MAILBOX, "Lists");
    check_change("* STATUS 2024 (MESSAGES 1)\r\n", IMAP_CHANGE_MAILBOX, "2024");
    check_change("* STATUS (INBOX) (MESSAGES 1)\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("* STATUS NIL (MESSAGES 1)\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("* STATUS\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("* LIST () \"/\" PB/Sub (\"OLDNAME\" (PA/Sub))\r\n", IMAP_CHANGE_FOLDERS, NULL);
    check_change("* LIST (\\NonExistent) \"/\" X1\r\n", IMAP_CHANGE_FOLDERS, NULL);
    check_change("* 5 EXISTS\r\n", IMAP_CHANGE_SELECTED, NULL);
    check_change("* 3 EXPUNGE\r\n", IMAP_CHANGE_SELECTED, NULL);
    check_change("* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n", IMAP_CHANGE_SELECTED, NULL);
    check_change("* VANISHED 1:3\r\n", IMAP_CHANGE_SELECTED, NULL);
    check_change("* 2 RECENT\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("* EXISTS 5\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("* OK [NOTIFICATIONOVERFLOW] too much\r\n", IMAP_CHANGE_OVERFLOW, NULL);
    check_change("* OK Still here\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("* SEARCH 1 2\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("A1 OK [NOTIFICATIONOVERFLOW] done\r\n", IMAP_CHANGE_NONE, NULL);
    check_change("+ idling\r\n", IMAP_CHANGE_NONE, NULL);
}

/* INTERNALDATE, parsed by hand for speed: checked against Python's datetime. */
static void check_date(const char *text, int want_ret, int64_t want)
{
    int64_t got = 0;
    int ret = imap_parse_internaldate(text, &got);
    if (ret != want_ret || (ret == 0 && got != want))
        fprintf(stderr, "  for \"%s\": %d %lld\n", text, ret, (long long)got);
    CHECK_EQ_INT(ret, want_ret);
    if (want_ret == 0)
        CHECK_EQ_INT(got, want);
}

static void test_internaldate(void)
{
    check_date("17-Jul-1996 02:44:25 -0700", 0, 837596665);
    check_date(" 4-Jul-2023 02:44:25 +0200", 0, 1688431465);
    check_date("04-jul-2023 02:44:25 +0200", 0, 1688431465);
    check_date("29-Feb-2024 23:59:60 +0000", 0, 1709251200);    /* a leap second */
    check_date("01-Jan-1900 00:00:00 +0000", 0, -2208988800LL);
    check_date("31-Dec-2100 23:59:59 -0530", 0, 4134000599LL);
    check_date("32-Jan-2020 00:00:00 +0000", -EINVAL, 0);
    check_date("01-Foo-2020 00:00:00 +0000", -EINVAL, 0);
    check_date("01-Janu-2020 00:00:00 +0000", -EINVAL, 0);
    check_date("01-anF-2020 00:00:00 +0000", -EINVAL, 0);
    check_date("01-Jan-20 00:00:00 +0000", -EINVAL, 0);
    check_date("01-Jan-2020 24:00:00 +0000", -EINVAL, 0);
    check_date("01-Jan-2020 00:60:00 +0000", -EINVAL, 0);
    check_date("01-Jan-2020 00:00:00 +0060", -EINVAL, 0);
    check_date("01-Jan-2020 00:00:00 +2400", -EINVAL, 0);
    check_date("01-Jan-2020 00:00:00 +0000x", -EINVAL, 0);
    check_date("01-Jan-2020 00:00:00", -EINVAL, 0);
    check_date("", -EINVAL, 0);
    check_date("99999999999-Jan-2020 00:00:00 +0000", -EINVAL, 0);
}

int main(void)
{
    RUN(test_defaults);
    RUN(test_greeting);
    RUN(test_tagged);
    RUN(test_continuation);
    RUN(test_capability);
    RUN(test_list);
    RUN(test_status_search);
    RUN(test_mailbox_data);
    RUN(test_fetch);
    RUN(test_envelope);
    RUN(test_stops_after_response);
    RUN(test_literal_progress);
    RUN(test_huge_literal_not_allocated);
    RUN(test_split_everywhere);
    RUN(test_limits);
    RUN(test_malformed);
    RUN(test_push_classification);
    RUN(test_internaldate);
    RUN(test_throughput);
    return check_summary();
}
