/* tests/unit/test_text.c — modified UTF-7 both ways, and quoting. */
#include "imap/text.h"
#include "tests/unit/check.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

static void check_pair(const char *mutf7, const char *utf8)
{
    char *decoded = imap_utf7_decode(mutf7);
    char *encoded = imap_utf7_encode(utf8);

    CHECK_EQ_STR(decoded, utf8);
    CHECK_EQ_STR(encoded, mutf7);
    free(decoded);
    free(encoded);
}

static void test_utf7_vectors(void)
{
    check_pair("", "");
    check_pair("INBOX", "INBOX");
    check_pair("Entw&APw-rfe", "Entw\xc3\xbcrfe");
    check_pair("&AMQ-rger", "\xc3\x84rger");
    check_pair("&-", "&");
    check_pair("a&-b&-", "a&b&");
    check_pair("~peter/mail/&U,BTFw-/&ZeVnLIqe-",
               "~peter/mail/\xe5\x8f\xb0\xe5\x8c\x97/\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e");
    check_pair("&2D3eAA-", "\xf0\x9f\x98\x80");                  /* U+1F600 */
    check_pair("x&2D3eANg93gA-y", "x\xf0\x9f\x98\x80\xf0\x9f\x98\x80y");
    check_pair("&AOQA5A-", "\xc3\xa4\xc3\xa4");                  /* one run, not two */
    check_pair("&AOQ-&-", "\xc3\xa4&");
    check_pair("&AAE-", "\x01");                                  /* controls are encoded */
    check_pair("&AH8-", "\x7f");
    check_pair("Sent &- Drafts", "Sent & Drafts");
    check_pair("&2,,f,w-", "\xf4\x8f\xbf\xbf");                  /* U+10FFFF */
    check_pair("&,,8-", "\xef\xbf\xbf");                          /* U+FFFF */
}

static void check_decode_fails(const char *mutf7)
{
    char *decoded = imap_utf7_decode(mutf7);
    if (decoded)
        fprintf(stderr, "  decoded \"%s\" though invalid\n", mutf7);
    CHECK(decoded == NULL);
    free(decoded);
}

static void test_utf7_rejects(void)
{
    check_decode_fails("&");
    check_decode_fails("a&");
    check_decode_fails("&Jjo!");
    check_decode_fails("&Jjo");              /* unterminated */
    check_decode_fails("&AGE-");             /* "a" must be itself */
    check_decode_fails("&ACA-");             /* so must SP */
    check_decode_fails("&ACY-");             /* "&" must be "&-" */
    check_decode_fails("&AH4-");             /* "~" */
    check_decode_fails("&AAA-");             /* NUL */
    check_decode_fails("&AOR-");             /* non-zero padding bits */
    check_decode_fails("&AOQA-");            /* a superfluous base64 char */
    check_decode_fails("&A-");               /* not even one unit */
    check_decode_fails("&2D0-");             /* lone high surrogate */
    check_decode_fails("&3gA-");             /* lone low surrogate */
    check_decode_fails("&2D0AQQ-");          /* high surrogate then "A" */
    check_decode_fails("&2D3YPQ-");          /* high surrogate then high */
    check_decode_fails("&AOQ-&AOQ-");        /* null shift "-&" */
    check_decode_fails("&AOQ/-");            /* "/" is "," here */
    check_decode_fails("&AOQ=-");            /* no padding */
    check_decode_fails("\xc3\xa4");          /* 8-bit is never raw */
    check_decode_fails("a\x01" "b");         /* nor are controls */
    check_decode_fails("a\tb");
    CHECK(imap_utf7_decode(NULL) == NULL);
}

static void check_encode_fails(const char *utf8)
{
    char *encoded = imap_utf7_encode(utf8);
    CHECK(encoded == NULL);
    free(encoded);
}

static void test_utf7_encode_rejects(void)
{
    check_encode_fails("\xff");
    check_encode_fails("a\x80");
    check_encode_fails("\xc3");                  /* truncated */
    check_encode_fails("\xe6\x97");
    check_encode_fails("\xc0\xaf");              /* overlong "/" */
    check_encode_fails("\xc1\xbf");
    check_encode_fails("\xe0\x80\xaf");
    check_encode_fails("\xf0\x80\x80\xaf");
    check_encode_fails("\xed\xa0\x80");          /* surrogate */
    check_encode_fails("\xed\xbf\xbf");
    check_encode_fails("\xf4\x90\x80\x80");      /* > U+10FFFF */
    check_encode_fails("\xf5\x80\x80\x80");
    CHECK(imap_utf7_encode(NULL) == NULL);
}

static size_t put_utf8(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Random valid UTF-8 strings survive encode + decode, and the encoding is
 * the canonical one (decode + encode gives it back). */
static void test_utf7_round_trip(void)
{
    uint32_t seed = 12345;
    char in[256];

    for (int n = 0; n < 20000; n++) {
        size_t len = 0;
        int chars = (int)(seed % 12);
        for (int i = 0; i < chars; i++) {
            seed = seed * 1103515245u + 12345u;
            uint32_t r = seed >> 8, cp;
            switch (r % 6) {
            case 0: cp = 0x20 + r / 6 % 0x5f; break;        /* printable ASCII */
            case 1: cp = '&'; break;
            case 2: cp = 1 + r / 6 % 0x1f; break;           /* controls */
            case 3: cp = 0x80 + r / 6 % 0x780; break;        /* 2-byte */
            case 4: cp = 0x800 + r / 6 % 0xf800; break;      /* 3-byte */
            default: cp = 0x10000 + r / 6 % 0x100000; break; /* astral */
            }
            if (cp >= 0xd800 && cp <= 0xdfff)
                cp = 0xe000;
            len += put_utf8(in + len, cp);
        }
        in[len] = '\0';
        seed = seed * 1103515245u + 12345u;

        char *encoded = imap_utf7_encode(in);
        CHECK(encoded != NULL);
        if (!encoded)
            return;
        for (char *p = encoded; *p; p++)
            CHECK(*p >= 0x20 && *p <= 0x7e);
        char *decoded = imap_utf7_decode(encoded);
        CHECK_EQ_STR(decoded, in);
        char *again = decoded ? imap_utf7_encode(decoded) : NULL;
        CHECK_EQ_STR(again, encoded);
        free(encoded);
        free(decoded);
        free(again);
        if (check_failures_in_test)
            return;
    }
}

/* Every accepted spelling is the canonical one: for all short strings over
 * an alphabet with the tricky characters, decode succeeding implies encode
 * of the result gives the input back. */
static void test_utf7_canonical(void)
{
    static const char alphabet[] = "&-A,+/a0QO2D3g";
    const size_t k = sizeof(alphabet) - 1;
    char s[8];
    size_t accepted = 0;

    for (size_t len = 1; len <= 5; len++) {
        size_t total = 1;
        for (size_t i = 0; i < len; i++)
            total *= k;
        for (size_t n = 0; n < total; n++) {
            size_t v = n;
            for (size_t i = 0; i < len; i++, v /= k)
                s[i] = alphabet[v % k];
            s[len] = '\0';
            char *decoded = imap_utf7_decode(s);
            if (!decoded)
                continue;
            accepted++;
            char *encoded = imap_utf7_encode(decoded);
            if (!encoded || strcmp(encoded, s) != 0)
                fprintf(stderr, "  \"%s\" decodes but re-encodes as \"%s\"\n", s,
                        encoded ? encoded : "(null)");
            CHECK_EQ_STR(encoded, s);
            free(decoded);
            free(encoded);
            if (check_failures_in_test)
                return;
        }
    }
    CHECK(accepted > 1000);
}

static void test_quote(void)
{
    char buf[2100];

    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "INBOX"), 7);
    CHECK_EQ_STR(buf, "\"INBOX\"");
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), ""), 2);
    CHECK_EQ_STR(buf, "\"\"");
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "a\"b\\c"), 9);
    CHECK_EQ_STR(buf, "\"a\\\"b\\\\c\"");
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "with space (and) {5} %*"), 25);
    CHECK_EQ_STR(buf, "\"with space (and) {5} %*\"");
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "tab\there\x01"), 11);  /* TEXT-CHAR */

    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "a\rb"), -EINVAL);
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "a\nb"), -EINVAL);
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "\xc3\xa4"), -EINVAL);
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), "\x80"), -EINVAL);

    char long_string[1002];
    memset(long_string, 'x', 1001);
    long_string[1001] = '\0';
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), long_string), -EINVAL);
    long_string[1000] = '\0';
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), long_string), 1002);
    memset(long_string, '"', 1000);
    CHECK_EQ_INT(imap_quote(buf, sizeof(buf), long_string), 2002);
    /* invalid beats small: it cannot be quoted at any size */
    CHECK_EQ_INT(imap_quote(buf, 1, "a\rb"), -EINVAL);

    /* -ENOSPC: the NUL needs room too, and dst is not overrun */
    memset(buf, '#', sizeof(buf));
    CHECK_EQ_INT(imap_quote(buf, 7, "INBOX"), -ENOSPC);
    CHECK(buf[0] == '#');
    CHECK_EQ_INT(imap_quote(buf, 8, "INBOX"), 7);
    CHECK(buf[8] == '#');
    CHECK_EQ_INT(imap_quote(buf, 5, "a\"b"), -ENOSPC);
    CHECK_EQ_INT(imap_quote(buf, 6, "a\"b"), -ENOSPC);
    CHECK_EQ_INT(imap_quote(buf, 7, "a\"b"), 6);
    CHECK_EQ_INT(imap_quote(NULL, 0, "x"), -ENOSPC);
    CHECK_EQ_INT(imap_quote(buf, 0, ""), -ENOSPC);
}

static void test_is_atom(void)
{
    CHECK(imap_is_atom("INBOX"));
    CHECK(imap_is_atom("Entw&APw-rfe"));
    CHECK(imap_is_atom("a[b"));
    CHECK(imap_is_atom("+"));
    CHECK(imap_is_atom("$Forwarded"));
    CHECK(imap_is_atom("1:3,5"));
    CHECK(!imap_is_atom(""));
    CHECK(!imap_is_atom(NULL));
    CHECK(!imap_is_atom("a b"));
    CHECK(!imap_is_atom("a(b"));
    CHECK(!imap_is_atom("a)b"));
    CHECK(!imap_is_atom("a{b"));
    CHECK(!imap_is_atom("a%"));
    CHECK(!imap_is_atom("a*"));
    CHECK(!imap_is_atom("\"a\""));
    CHECK(!imap_is_atom("\\Seen"));
    CHECK(!imap_is_atom("a]"));
    CHECK(!imap_is_atom("a\x01"));
    CHECK(!imap_is_atom("a\x7f"));
    CHECK(!imap_is_atom("\xc3\xa4"));
    CHECK(!imap_is_atom("a\r\n"));
}

static void check_decoded(const char *in, const char *want)
{
    char *got = imap_decode_header_text(in);
    CHECK_EQ_STR(got, want);
    free(got);
}

static void test_header_words(void)
{
    check_decoded("=?ISO-8859-1?Q?J=F6rg_M=FCller?=", "J\xc3\xb6rg M\xc3\xbcller");
    check_decoded("=?UTF-8?B?w4RyZ2Vy?= im =?UTF-8?Q?B=C3=BCro?=",
                  "\xc3\x84rger im B\xc3\xbcro");
    /* white space between two encoded words is dropped (RFC 2047 6.2) */
    check_decoded("=?UTF-8?B?YQ==?= \t =?UTF-8?B?Yg==?=", "ab");
    check_decoded("=?utf-8?q?lower_case?=", "lower case");
    check_decoded("=?UTF-8*en?Q?lang?=", "lang");
    check_decoded("plain text", "plain text");
    /* what does not decode stays as it was */
    check_decoded("=?no-such-charset?Q?x?=", "=?no-such-charset?Q?x?=");
    check_decoded("=?UTF-8?Q?bad=Z?=", "=?UTF-8?Q?bad=Z?=");
    check_decoded("=?UTF-8?Q?cut=?=", "=?UTF-8?Q?cut=?=");
    check_decoded("=?UTF-8?X?x?=", "=?UTF-8?X?x?=");
    check_decoded("=?UTF-8?B?!!?=", "=?UTF-8?B?!!?=");
    check_decoded("=?UTF-8?Q?has space?=", "=?UTF-8?Q?has space?=");
    /* one line: control characters, also decoded ones, become spaces */
    check_decoded("a\tb\nc", "a b c");
    check_decoded("=?UTF-8?Q?x=0Ay?=", "x y");
    check_decoded("", "");
}

int main(void)
{
    RUN(test_utf7_vectors);
    RUN(test_utf7_rejects);
    RUN(test_utf7_encode_rejects);
    RUN(test_utf7_round_trip);
    RUN(test_utf7_canonical);
    RUN(test_quote);
    RUN(test_is_atom);
    RUN(test_header_words);
    return check_summary();
}
