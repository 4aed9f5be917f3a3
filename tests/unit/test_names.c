/* tests/unit/test_names.c — mailbox name components <-> file names, and
 * UID file names, against hostile input. */
#include "fs/names.h"
#include "tests/unit/check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

/* component -> expected name, and back */
static void check_map(const char *component, const char *name)
{
    char *got = fs_name_from_component(component);
    CHECK_EQ_STR(got, name);
    char *back = got ? fs_name_to_component(got) : NULL;
    CHECK_EQ_STR(back, component);
    free(got);
    free(back);
}

static void test_from_component(void)
{
    check_map("INBOX", "INBOX");
    check_map(".", "%2E");
    check_map("..", "%2E%2E");
    check_map("...", "...");
    check_map(".hidden", ".hidden");
    check_map("a.", "a.");
    check_map("a/b", "a%2Fb");
    check_map("/", "%2F");
    check_map("100%", "100%25");
    check_map("%2F", "%252F");
    check_map("%2E", "%252E");
    check_map("tab\there", "tab%09here");
    check_map("\x01\x1f\x7f", "%01%1F%7F");
    check_map("line\nbreak\r", "line%0Abreak%0D");
    check_map("Entw\xc3\xbcrfe", "Entw\xc3\xbcrfe");
    check_map("\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e");
    check_map("\xf0\x9f\x98\x80 mail", "\xf0\x9f\x98\x80 mail");
    check_map("\xf4\x8f\xbf\xbf", "\xf4\x8f\xbf\xbf");             /* U+10FFFF */
    check_map("\xef\xbf\xbf", "\xef\xbf\xbf");                     /* U+FFFF */
    check_map("spaces and [brackets] \\ \"quotes\" *?", "spaces and [brackets] \\ \"quotes\" *?");
}

static void check_component_rejected(const char *component)
{
    errno = 0;
    char *got = fs_name_from_component(component);
    CHECK(got == NULL);
    CHECK_EQ_INT(errno, EINVAL);
    free(got);
}

static void test_component_rejects(void)
{
    check_component_rejected("");
    check_component_rejected(NULL);
    check_component_rejected("\xff");
    check_component_rejected("a\x80" "b");
    check_component_rejected("\xc3");               /* truncated */
    check_component_rejected("\xe6\x97");
    check_component_rejected("\xc0\xaf");           /* overlong "/" */
    check_component_rejected("\xc0\xae\xc0\xae");   /* overlong ".." */
    check_component_rejected("\xe0\x80\xaf");
    check_component_rejected("\xf0\x80\x80\xaf");
    check_component_rejected("\xed\xa0\x80");       /* surrogates */
    check_component_rejected("\xed\xbf\xbf");
    check_component_rejected("\xf4\x90\x80\x80");   /* > U+10FFFF */
    check_component_rejected("\xf8\x88\x80\x80\x80");
}

static void check_name_rejected(const char *name)
{
    errno = 0;
    char *got = fs_name_to_component(name);
    if (got)
        fprintf(stderr, "  \"%s\" decoded to \"%s\"\n", name, got);
    CHECK(got == NULL);
    CHECK_EQ_INT(errno, EINVAL);
    free(got);
}

static void test_to_component_rejects(void)
{
    check_name_rejected("");
    check_name_rejected(NULL);
    check_name_rejected(".");
    check_name_rejected("..");
    check_name_rejected("a/b");
    check_name_rejected("/");
    check_name_rejected("%");
    check_name_rejected("%2");
    check_name_rejected("a%2");
    check_name_rejected("%zz");
    check_name_rejected("%g0");
    check_name_rejected("%00");
    check_name_rejected("%2f");          /* the encoder writes upper case */
    check_name_rejected("%41");          /* "A" is never escaped */
    check_name_rejected("%C3%A4");
    check_name_rejected("a%2E");         /* "." is escaped only as a whole */
    check_name_rejected("%2E.");
    check_name_rejected("%2E%2E%2E");
    check_name_rejected("%2E%2Ea");
    check_name_rejected("\x01");         /* raw control */
    check_name_rejected("a\tb");
    check_name_rejected("a\x7f");
    check_name_rejected("\xff");         /* invalid UTF-8 */
    check_name_rejected("\xc0\xaf");
}

/* Every single byte 0x01-0xFF, and every pair: valid ones map to a safe
 * name and back, invalid ones (by an independent rule) are refused. */
static int independent_valid(const unsigned char *s, size_t len)
{
    if (len == 1)
        return s[0] < 0x80;
    if (s[0] < 0x80)
        return s[1] < 0x80;
    return s[0] >= 0xc2 && s[0] <= 0xdf && s[1] >= 0x80 && s[1] <= 0xbf;
}

static void check_safe(const char *name)
{
    CHECK(strchr(name, '/') == NULL);
    CHECK(strcmp(name, ".") != 0 && strcmp(name, "..") != 0);
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        CHECK(*p >= 0x20 && *p != 0x7f);
}

static void test_every_byte(void)
{
    unsigned char s[3];
    size_t valid = 0;

    for (unsigned a = 1; a <= 0xff; a++) {
        for (unsigned b = 0; b <= 0xff; b++) {
            size_t len = b ? 2 : 1;
            s[0] = (unsigned char)a;
            s[1] = (unsigned char)b;
            s[2] = 0;
            char *name = fs_name_from_component((const char *)s);
            CHECK_EQ_INT(name != NULL, independent_valid(s, len));
            if (!name)
                continue;
            valid++;
            check_safe(name);
            char *back = fs_name_to_component(name);
            CHECK(back && strcmp(back, (const char *)s) == 0);
            free(back);
            free(name);
            if (check_failures_in_test) {
                fprintf(stderr, "  at %02x %02x\n", a, b);
                return;
            }
        }
    }
    /* 127 ASCII singles, 127*127 ASCII pairs, 30*64 two-byte sequences */
    CHECK_EQ_INT(valid, 127 + 127 * 127 + 30 * 64);
}

/* Three- and four-byte sequences at the edges of validity. */
static void test_multibyte_edges(void)
{
    unsigned char s[5] = { 0 };
    size_t valid = 0;

    for (unsigned a = 0xe0; a <= 0xef; a++)
        for (unsigned b = 0x80; b <= 0xbf; b++)
            for (unsigned c = 0x80; c <= 0xbf; c += 0x3f) {
                s[0] = (unsigned char)a, s[1] = (unsigned char)b, s[2] = (unsigned char)c, s[3] = 0;
                int expect = !(a == 0xe0 && b < 0xa0) && !(a == 0xed && b >= 0xa0);
                char *name = fs_name_from_component((const char *)s);
                CHECK_EQ_INT(name != NULL, expect);
                if (name) {
                    char *back = fs_name_to_component(name);
                    CHECK(back && strcmp(back, (const char *)s) == 0);
                    free(back);
                    valid++;
                }
                free(name);
            }
    for (unsigned a = 0xf0; a <= 0xf7; a++)
        for (unsigned b = 0x80; b <= 0xbf; b++) {
            s[0] = (unsigned char)a, s[1] = (unsigned char)b, s[2] = 0x80, s[3] = 0xbf, s[4] = 0;
            int expect = a <= 0xf4 && !(a == 0xf0 && b < 0x90) && !(a == 0xf4 && b >= 0x90);
            char *name = fs_name_from_component((const char *)s);
            CHECK_EQ_INT(name != NULL, expect);
            free(name);
        }
    CHECK(valid > 0);
}

static void check_uid(const char *name, int expected, unsigned int expected_uid)
{
    unsigned int uid = 12345;
    CHECK_EQ_INT(fs_name_to_uid(name, &uid), expected);
    if (expected == 0)
        CHECK(uid == expected_uid);
    else
        CHECK(uid == 12345);  /* untouched on failure */
}

static void test_uid_names(void)
{
    check_uid("1.eml", 0, 1);
    check_uid("4321.eml", 0, 4321);
    check_uid("4294967295.eml", 0, 4294967295u);
    check_uid("0.eml", -ENOENT, 0);
    check_uid("01.eml", -ENOENT, 0);
    check_uid("00.eml", -ENOENT, 0);
    check_uid("4294967296.eml", -ENOENT, 0);
    check_uid("99999999999999999999999.eml", -ENOENT, 0);
    check_uid("1.EML", -ENOENT, 0);
    check_uid(".eml", -ENOENT, 0);
    check_uid("1.eml.swp", -ENOENT, 0);
    check_uid(".1.eml.swp", -ENOENT, 0);
    check_uid("1.em", -ENOENT, 0);
    check_uid("1.emlx", -ENOENT, 0);
    check_uid("1", -ENOENT, 0);
    check_uid("", -ENOENT, 0);
    check_uid("-1.eml", -ENOENT, 0);
    check_uid("+1.eml", -ENOENT, 0);
    check_uid(" 1.eml", -ENOENT, 0);
    check_uid("1 .eml", -ENOENT, 0);
    check_uid("1a.eml", -ENOENT, 0);
    check_uid("0x1.eml", -ENOENT, 0);
    check_uid("%31.eml", -ENOENT, 0);
    CHECK_EQ_INT(fs_name_to_uid(NULL, NULL), -ENOENT);

    char buf[32];
    fs_name_from_uid(4321, buf, sizeof(buf));
    CHECK_EQ_STR(buf, "4321.eml");
    fs_name_from_uid(4294967295u, buf, sizeof(buf));
    CHECK_EQ_STR(buf, "4294967295.eml");
    unsigned int uid = 0;
    CHECK_EQ_INT(fs_name_to_uid(buf, &uid), 0);
    CHECK(uid == 4294967295u);
    /* a short buffer is truncated, not overrun */
    memset(buf, '#', sizeof(buf));
    fs_name_from_uid(4321, buf, 4);
    CHECK_EQ_STR(buf, "432");
    CHECK(buf[4] == '#');
    fs_name_from_uid(1, buf, 0);
    CHECK(buf[0] == '4');
    /* round trip over a spread of UIDs */
    for (unsigned long long u = 1; u <= 0xffffffffull; u = u * 3 + 1) {
        fs_name_from_uid((unsigned int)u, buf, sizeof(buf));
        CHECK_EQ_INT(fs_name_to_uid(buf, &uid), 0);
        CHECK(uid == u);
    }
}

/* Each of names[] is (expected 1) or is not (0) of the class is() tells. */
static void check_class(int (*is)(const char *), const char *class, const char *const *names,
                        size_t count, int expected)
{
    for (size_t i = 0; i < count; i++) {
        int got = is(names[i]) != 0;
        CHECK(got == expected);
        if (got != expected)
            fprintf(stderr, "  %s seen as %s%s\n", names[i] ? names[i] : "(null)",
                    expected ? "not " : "", class);
    }
}

static void test_scratch_names(void)
{
    const char *scratch[] = { ".1.eml.swp", ".1.eml.swo", ".1.eml.swa", ".1.eml.svz",
                              ".1.eml.saa", ".swp", ".draft.eml.swn", ".1.eml.kate-swp",
                              "#1.eml#", ".~lock.1.eml#" };
    const char *mail[] = { "1.eml", "new.eml", ".msg.eml.hBoC2z", ".swp.eml", "1.eml.swp",
                           ".1.eml.sxa", ".1.eml.s1a", ".1.eml.SWP", "..swp", "#", "##x",
                           "1701234.M12P3.host,S=1234:2,S", ".~lock.1.eml", "", NULL };
    check_class(fs_name_is_scratch, "scratch", scratch, sizeof(scratch) / sizeof(*scratch), 1);
    check_class(fs_name_is_scratch, "scratch", mail, sizeof(mail) / sizeof(*mail), 0);
}

static void test_desktop_trash_names(void)
{
    const char *trash[] = { ".Trash", ".Trash-0", ".Trash-1000" };
    const char *folders[] = { "Trash", ".Trash-", ".Trash-1000x", ".Trash-a", ".Trashy",
                              ".trash-0", "Trash-0", ".Trash-0/files", "", NULL };
    check_class(fs_name_is_desktop_trash, "a desktop trash", trash,
                sizeof(trash) / sizeof(*trash), 1);
    check_class(fs_name_is_desktop_trash, "a desktop trash", folders,
                sizeof(folders) / sizeof(*folders), 0);
}

int main(void)
{
    RUN(test_from_component);
    RUN(test_component_rejects);
    RUN(test_to_component_rejects);
    RUN(test_every_byte);
    RUN(test_multibyte_edges);
    RUN(test_uid_names);
    RUN(test_scratch_names);
    RUN(test_desktop_trash_names);
    return check_summary();
}
