/* tests/unit/test_disk.c — the persistent cache: round trips, torn and
 * hostile files, eviction order and the byte count, permissions, hash
 * collisions, and a multithreaded stress meant to be run under
 * -fsanitize=thread as well as -fsanitize=address,undefined.
 *
 * Everything happens in a mkdtemp directory under /tmp, removed at the end.
 * Some tests write cache files by hand (torn, hostile, a colliding name
 * file), so this file knows the on-disk format documented in cache/disk.c:
 * the 32-byte header, the word-wise checksum and FNV-1a directory names. */
#include "cache/disk.h"
#include "tests/unit/check.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char base[64];       /* the mkdtemp directory */
static int dir_serial;

/* A fresh, not yet existing cache directory path (static buffer). */
static const char *fresh_dir(void)
{
    static char path[128];
    snprintf(path, sizeof path, "%s/c%d", base, ++dir_serial);
    return path;
}

static struct cache_disk *open_ok(const char *dir, uint64_t max_bytes)
{
    char err[256] = "";
    struct cache_disk *disk = cache_disk_open(dir, max_bytes, err, sizeof err);
    if (!disk)
        fprintf(stderr, "cache_disk_open(%s): %s\n", dir, err);
    return disk;
}

/* ------------------------------------------------- the on-disk format */

static uint64_t fnv1a(const char *text)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t format_mix(uint64_t h, uint64_t word)
{
    h ^= word;
    h *= 0x100000001b3ull;
    return h ^ (h >> 32);
}

/* Little-endian word of n <= 8 bytes. */
static uint64_t format_word(const unsigned char *p, size_t n)
{
    uint64_t word = 0;
    for (size_t i = 0; i < n; i++)
        word |= (uint64_t)p[i] << (8 * i);
    return word;
}

/* The checksum as cache/disk.c documents it, written plainly. */
static uint64_t format_checksum(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t lanes[4];
    for (int i = 0; i < 4; i++)
        lanes[i] = 0xcbf29ce484222325ull ^ (uint64_t)i;
    size_t stripes = len / 32, words = len % 32 / 8, rest = len % 8;
    for (size_t s = 0; s < stripes; s++)
        for (int i = 0; i < 4; i++)
            lanes[i] = format_mix(lanes[i], format_word(p + 32 * s + 8 * i, 8));
    uint64_t h = lanes[0];
    for (int i = 1; i < 4; i++)
        h = format_mix(h, lanes[i]);
    p += 32 * stripes;
    for (size_t w = 0; w < words; w++)
        h = format_mix(h, format_word(p + 8 * w, 8));
    h = format_mix(h, format_word(p + 8 * words, rest));
    h ^= (uint64_t)len;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static void put_le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

enum { KIND_BODY = 1, KIND_LISTING = 2, KIND_FOLDERS = 3, KIND_NAME = 4 };

/* Writes a well-formed cache file (right header and checksum) with any
 * payload, as something other than the cache might. */
static void write_crafted(const char *path, uint32_t kind, const void *payload, size_t len)
{
    unsigned char header[32];
    memcpy(header, "IMFS", 4);
    put_le(header + 4, 1, 4);
    put_le(header + 8, kind, 4);
    put_le(header + 12, 0, 4);
    put_le(header + 16, len, 8);
    put_le(header + 24, format_checksum(payload, len), 8);
    FILE *file = fopen(path, "wb");
    if (!file) {
        perror(path);
        abort();
    }
    fwrite(header, 1, sizeof header, file);
    fwrite(payload, 1, len, file);
    fclose(file);
}

static void mailbox_path(char *path, size_t size, const char *dir, const char *mailbox)
{
    snprintf(path, size, "%s/m/%016" PRIx64, dir, fnv1a(mailbox));
}

static void body_path(char *path, size_t size, const char *dir, const char *mailbox,
                      uint32_t uidvalidity, uint32_t uid)
{
    snprintf(path, size, "%s/m/%016" PRIx64 "/%" PRIu32 "/%" PRIu32, dir, fnv1a(mailbox),
             uidvalidity, uid);
}

static bool exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

static off_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

static void flip_byte(const char *path, off_t offset)
{
    int fd = open(path, O_RDWR);
    unsigned char byte;
    if (fd < 0 || pread(fd, &byte, 1, offset) != 1)
        abort();
    byte ^= 0x40;
    if (pwrite(fd, &byte, 1, offset) != 1)
        abort();
    close(fd);
}

/* Sum of the sizes of the body files, found independently of the cache. */
static uint64_t walked_bytes;

static int add_body_file(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    if (type == FTW_F && ftw->level == 4 && strstr(path, "/m/"))
        walked_bytes += (uint64_t)st->st_size;
    return 0;
}

static uint64_t bytes_on_disk(const char *dir)
{
    walked_bytes = 0;
    char m[160];
    snprintf(m, sizeof m, "%s", dir);
    nftw(m, add_body_file, 16, FTW_PHYS);
    return walked_bytes;
}

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    remove(path);
    return 0;
}

static void remove_all(const char *path)
{
    nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A body whose bytes depend on a seed, NUL bytes included. */
static char *make_body(size_t len, unsigned seed)
{
    char *data = malloc(len ? len : 1);
    if (!data)
        abort();
    for (size_t i = 0; i < len; i++)
        data[i] = (char)((i * 131 + seed * 7) % 251);
    return data;
}

static bool body_matches(const char *data, size_t len, size_t want_len, unsigned seed)
{
    if (len != want_len)
        return false;
    for (size_t i = 0; i < len; i++)
        if (data[i] != (char)((i * 131 + seed * 7) % 251))
            return false;
    return true;
}

/* ------------------------------------------------------------------ tests */

static void test_body_round_trip(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *data;
    size_t len;

    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), -ENOENT);
    CHECK(data == NULL);
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 1));

    const char *text = "From: a@example.org\r\n\r\nhello\r\n";
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, text, strlen(text)), 0);
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 1));
    CHECK(!cache_disk_body_present(disk, "INBOX", 8, 1));
    CHECK(!cache_disk_body_present(disk, "Other", 7, 1));
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), 0);
    CHECK_EQ_INT(len, strlen(text));
    CHECK(data && memcmp(data, text, len) == 0);
    free(data);

    /* Empty body. */
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 2, "", 0), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), 0);
    CHECK_EQ_INT(len, 0);
    CHECK(data != NULL);
    free(data);

    /* 5 MB with NUL bytes, under a hostile-looking mailbox name. */
    size_t big = 5 * 1000 * 1000 + 3;
    char *body = make_body(big, 5);
    CHECK(memchr(body, '\0', big) != NULL);
    CHECK_EQ_INT(cache_disk_body_save(disk, "../../etc/passwd", 1, 4000000000u, body, big), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "../../etc/passwd", 1, 4000000000u, &data, &len), 0);
    CHECK(body_matches(data, len, big, 5));
    free(data);
    free(body);

    uint64_t expected = 32 + strlen(text) + 32 + 0 + 32 + big;
    CHECK_EQ_INT(cache_disk_usage(disk), expected);
    CHECK_EQ_INT(bytes_on_disk(dir), expected);

    /* Saving the same body again replaces it without counting it twice. */
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, text, strlen(text)), 0);
    CHECK_EQ_INT(cache_disk_usage(disk), expected);

    /* A remount finds everything again and counts it by walking. */
    cache_disk_close(disk);
    disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_usage(disk), expected);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), 0);
    CHECK(len == strlen(text) && memcmp(data, text, len) == 0);
    free(data);
    cache_disk_close(disk);
}

static void test_listing_round_trip(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    struct cache_disk_listing listing;
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), -ENOENT);

    struct cache_message messages[3] = {
        {.uid = 1, .flags = CACHE_FLAG_SEEN, .size = 1234, .internaldate = 1546300800,
         .keywords = NULL},
        {.uid = 17, .flags = CACHE_FLAG_FLAGGED | CACHE_FLAG_DRAFT, .size = UINT64_MAX,
         .internaldate = -86400, .keywords = "$Work Junk"},
        {.uid = UINT32_MAX, .flags = 0, .size = 0, .internaldate = INT64_MAX,
         .keywords = "$Label1"},
    };
    struct cache_disk_listing saved = {.uidvalidity = 1700000000, .uidnext = 4000000000u,
                                       .highestmodseq = UINT64_MAX - 1, .messages = messages,
                                       .count = 3};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &saved), 0);
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), 0);
    CHECK_EQ_INT(listing.uidvalidity, 1700000000);
    CHECK_EQ_INT(listing.uidnext, 4000000000u);
    CHECK(listing.highestmodseq == UINT64_MAX - 1);
    CHECK_EQ_INT(listing.count, 3);
    if (listing.count == 3) {
        for (size_t i = 0; i < 3; i++) {
            CHECK_EQ_INT(listing.messages[i].uid, messages[i].uid);
            CHECK_EQ_INT(listing.messages[i].flags, messages[i].flags);
            CHECK(listing.messages[i].size == messages[i].size);
            CHECK_EQ_INT(listing.messages[i].internaldate, messages[i].internaldate);
        }
        CHECK(listing.messages[0].keywords == NULL);
        CHECK_EQ_STR(listing.messages[1].keywords, "$Work Junk");
        CHECK_EQ_STR(listing.messages[2].keywords, "$Label1");
    }
    for (size_t i = 0; i < listing.count; i++)
        free(listing.messages[i].keywords);
    free(listing.messages);

    /* Another mailbox, empty; listings are not bodies. */
    struct cache_disk_listing empty = {.uidvalidity = 9, .uidnext = 1};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "Lists/notmuch", &empty), 0);
    CHECK_EQ_INT(cache_disk_listing_load(disk, "Lists/notmuch", &listing), 0);
    CHECK_EQ_INT(listing.uidvalidity, 9);
    CHECK_EQ_INT(listing.count, 0);
    free(listing.messages);
    CHECK_EQ_INT(cache_disk_usage(disk), 0);

    /* What cache_folder_set_messages would refuse is refused here too. */
    struct cache_message unsorted[2] = {{.uid = 5}, {.uid = 5}};
    struct cache_disk_listing bad = {.uidvalidity = 1, .messages = unsorted, .count = 2};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &bad), -EINVAL);
    cache_disk_close(disk);
}

static void test_folders_round_trip(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    struct cache_disk_folders folders;
    CHECK_EQ_INT(cache_disk_folders_load(disk, &folders), -ENOENT);
    CHECK_EQ_INT(folders.count, 0);

    char *names[] = {"INBOX", "Lists/notmuch", "R&AOk-sum&AOk-", ""};
    char delimiters[] = {'/', '/', 0, '.'};
    unsigned flags[] = {0, 3, 0xffffffffu, 8};
    struct cache_disk_folders saved = {.mailboxes = names, .delimiters = delimiters,
                                       .flags = flags, .count = 4};
    CHECK_EQ_INT(cache_disk_folders_save(disk, &saved), 0);
    CHECK_EQ_INT(cache_disk_folders_load(disk, &folders), 0);
    CHECK_EQ_INT(folders.count, 4);
    for (size_t i = 0; i < folders.count && i < 4; i++) {
        CHECK_EQ_STR(folders.mailboxes[i], names[i]);
        CHECK_EQ_INT(folders.delimiters[i], delimiters[i]);
        CHECK_EQ_INT(folders.flags[i], flags[i]);
    }
    cache_disk_folders_free(&folders);
    CHECK_EQ_INT(folders.count, 0);

    struct cache_disk_folders none = {0};
    CHECK_EQ_INT(cache_disk_folders_save(disk, &none), 0);
    CHECK_EQ_INT(cache_disk_folders_load(disk, &folders), 0);
    CHECK_EQ_INT(folders.count, 0);
    cache_disk_folders_free(&folders);
    cache_disk_close(disk);
}

/* Saves body uid in INBOX, damages its file with damage() while the cache
 * is closed (a crash, then a remount), and expects the load to fail, the
 * file to be gone and the count to drop with it. */
static void expect_damage_caught(struct cache_disk **disk, const char *dir, uint32_t uid,
                                 void (*damage)(const char *path))
{
    char *body = make_body(10000, uid);
    CHECK_EQ_INT(cache_disk_body_save(*disk, "INBOX", 7, uid, body, 10000), 0);
    free(body);
    char path[256];
    body_path(path, sizeof path, dir, "INBOX", 7, uid);
    CHECK(exists(path));
    cache_disk_close(*disk);
    damage(path);
    *disk = open_ok(dir, 64 << 20);
    if (!*disk)
        abort();
    uint64_t before = cache_disk_usage(*disk);
    CHECK_EQ_INT(before, bytes_on_disk(dir));
    char *data = (char *)"untouched";
    size_t len = 99;
    CHECK_EQ_INT(cache_disk_body_load(*disk, "INBOX", 7, uid, &data, &len), -ENOENT);
    CHECK(data == NULL);
    CHECK_EQ_INT(len, 0);
    CHECK(!exists(path));
    CHECK_EQ_INT(cache_disk_usage(*disk), bytes_on_disk(dir));
    CHECK(cache_disk_usage(*disk) < before || before == 0);
}

static void damage_truncate(const char *path) { CHECK_EQ_INT(truncate(path, file_size(path) - 1), 0); }
static void damage_extend(const char *path) { CHECK_EQ_INT(truncate(path, file_size(path) + 1), 0); }
static void damage_zero_length(const char *path) { CHECK_EQ_INT(truncate(path, 0), 0); }
static void damage_header_only(const char *path) { CHECK_EQ_INT(truncate(path, 32), 0); }
static void damage_flip_payload(const char *path) { flip_byte(path, 32 + 5000); }
static void damage_flip_last(const char *path) { flip_byte(path, file_size(path) - 1); }
static void damage_flip_checksum(const char *path) { flip_byte(path, 24); }
static void damage_flip_length(const char *path) { flip_byte(path, 16); }
static void damage_magic(const char *path) { flip_byte(path, 0); }
static void damage_version(const char *path) { flip_byte(path, 4); }
static void damage_kind(const char *path) { flip_byte(path, 8); }
static void damage_reserved(const char *path) { flip_byte(path, 12); }

static void damage_torn_page(const char *path)
{
    /* What a crash without fsync can leave: a block of zeroes. */
    int fd = open(path, O_RDWR);
    char zeroes[4096] = {0};
    CHECK(fd >= 0 && pwrite(fd, zeroes, sizeof zeroes, 4096) == (ssize_t)sizeof zeroes);
    close(fd);
}

static void test_torn_files(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    expect_damage_caught(&disk, dir, 1, damage_truncate);
    expect_damage_caught(&disk, dir, 2, damage_extend);
    expect_damage_caught(&disk, dir, 3, damage_zero_length);
    expect_damage_caught(&disk, dir, 4, damage_header_only);
    expect_damage_caught(&disk, dir, 5, damage_flip_payload);
    expect_damage_caught(&disk, dir, 6, damage_flip_last);
    expect_damage_caught(&disk, dir, 7, damage_flip_checksum);
    expect_damage_caught(&disk, dir, 8, damage_flip_length);
    expect_damage_caught(&disk, dir, 9, damage_torn_page);

    /* A torn listing and folder list go too. */
    struct cache_message message = {.uid = 3, .keywords = "$Work"};
    struct cache_disk_listing listing = {.uidvalidity = 7, .messages = &message, .count = 1};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &listing), 0);
    char path[256];
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/listing");
    CHECK_EQ_INT(truncate(path, file_size(path) - 1), 0);
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), -ENOENT);
    CHECK(!exists(path));

    char *names[] = {"INBOX"};
    char delimiters[] = {'/'};
    unsigned flags[] = {0};
    struct cache_disk_folders folders = {names, delimiters, flags, 1};
    CHECK_EQ_INT(cache_disk_folders_save(disk, &folders), 0);
    snprintf(path, sizeof path, "%s/folders", dir);
    flip_byte(path, 33);
    CHECK_EQ_INT(cache_disk_folders_load(disk, &folders), -ENOENT);
    CHECK(!exists(path));
    cache_disk_close(disk);
}

static void test_wrong_magic_version_kind(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    expect_damage_caught(&disk, dir, 1, damage_magic);
    expect_damage_caught(&disk, dir, 2, damage_version);
    expect_damage_caught(&disk, dir, 3, damage_kind);
    expect_damage_caught(&disk, dir, 4, damage_reserved);

    /* A well-formed file of another kind where a body should be. */
    char path[256];
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 5, "x", 1), 0);
    body_path(path, sizeof path, dir, "INBOX", 7, 5);
    write_crafted(path, KIND_LISTING, "x", 1);
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 5, &data, &len), -ENOENT);
    CHECK(!exists(path));
    CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));

    /* A symlink where a body should be is never followed: not while open
     * (the cache knows it wrote no body 6, and does not look), and not by
     * the next mount, which finds it in the directory and removes it. */
    body_path(path, sizeof path, dir, "INBOX", 7, 6);
    CHECK_EQ_INT(symlink("/etc/passwd", path), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 6, &data, &len), -ENOENT);
    cache_disk_close(disk);
    disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 6, &data, &len), -ENOENT);
    CHECK(!exists(path));
    cache_disk_close(disk);
}

/* Writes a crafted listing payload for INBOX and expects a clean refusal
 * that removes the file. */
static void expect_hostile_listing(struct cache_disk *disk, const char *dir,
                                   const unsigned char *payload, size_t len)
{
    char path[256];
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/listing");
    write_crafted(path, KIND_LISTING, payload, len);
    struct cache_disk_listing listing;
    memset(&listing, 0x55, sizeof listing);
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), -ENOENT);
    CHECK(listing.messages == NULL);
    CHECK_EQ_INT(listing.count, 0);
    CHECK(!exists(path));
}

static void expect_hostile_folders(struct cache_disk *disk, const char *dir,
                                   const unsigned char *payload, size_t len)
{
    char path[256];
    snprintf(path, sizeof path, "%s/folders", dir);
    write_crafted(path, KIND_FOLDERS, payload, len);
    struct cache_disk_folders folders;
    memset(&folders, 0x55, sizeof folders);
    CHECK_EQ_INT(cache_disk_folders_load(disk, &folders), -ENOENT);
    CHECK(folders.mailboxes == NULL);
    CHECK_EQ_INT(folders.count, 0);
    CHECK(!exists(path));
}

/* One listing entry at p: uid, flags, size, date, keyword length. */
static size_t put_entry(unsigned char *p, uint32_t uid, uint32_t keyword_len)
{
    put_le(p, uid, 4);
    put_le(p + 4, 1, 4);
    put_le(p + 8, 100, 8);
    put_le(p + 16, 0, 8);
    put_le(p + 24, keyword_len, 4);
    return 28;
}

static void test_hostile_listing_and_folders(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    /* The mailbox directory must be INBOX's for a listing to be read. */
    struct cache_disk_listing valid = {.uidvalidity = 7};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &valid), 0);

    unsigned char payload[256];
    memset(payload, 0, sizeof payload);
    put_le(payload, 7, 4);
    put_le(payload + 4, 100, 4);
    put_le(payload + 8, 5, 8);

    /* Shorter than the fixed part. */
    expect_hostile_listing(disk, dir, payload, 10);
    /* A count of 2^60: never allocated, never looped over. */
    put_le(payload + 16, 1ull << 60, 8);
    expect_hostile_listing(disk, dir, payload, 24);
    put_le(payload + 16, UINT64_MAX, 8);
    expect_hostile_listing(disk, dir, payload, 24 + 28);
    /* A count one more than what follows. */
    put_le(payload + 16, 2, 8);
    size_t len = 24 + put_entry(payload + 24, 1, 0);
    expect_hostile_listing(disk, dir, payload, len);
    /* A keyword length past the end, and one of 4 GiB - 1. */
    put_le(payload + 16, 1, 8);
    len = 24 + put_entry(payload + 24, 1, 6);
    memcpy(payload + len, "$Work", 5);
    expect_hostile_listing(disk, dir, payload, len + 5);
    put_entry(payload + 24, 1, UINT32_MAX);
    expect_hostile_listing(disk, dir, payload, len + 5);
    /* A keyword with a NUL in it. */
    put_entry(payload + 24, 1, 5);
    payload[len + 2] = '\0';
    expect_hostile_listing(disk, dir, payload, len + 5);
    /* Trailing bytes after the last entry. */
    memcpy(payload + len, "$Work", 5);
    expect_hostile_listing(disk, dir, payload, len + 6);
    /* UIDs out of order. */
    put_le(payload + 16, 2, 8);
    len = 24 + put_entry(payload + 24, 9, 0);
    len += put_entry(payload + len, 3, 0);
    expect_hostile_listing(disk, dir, payload, len);

    /* And a well-formed one still loads after all that. */
    put_le(payload + 16, 2, 8);
    len = 24 + put_entry(payload + 24, 3, 0);
    len += put_entry(payload + len, 9, 5);
    memcpy(payload + len, "$Work", 5);
    len += 5;
    char path[256];
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/listing");
    write_crafted(path, KIND_LISTING, payload, len);
    struct cache_disk_listing listing;
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), 0);
    CHECK_EQ_INT(listing.count, 2);
    if (listing.count == 2)
        CHECK_EQ_STR(listing.messages[1].keywords, "$Work");
    for (size_t i = 0; i < listing.count; i++)
        free(listing.messages[i].keywords);
    free(listing.messages);

    /* Folders: a huge count, a name past the end, a NUL in a name, trailing
     * bytes, too short. */
    memset(payload, 0, sizeof payload);
    put_le(payload, UINT64_MAX, 8);
    expect_hostile_folders(disk, dir, payload, 8 + 9);
    put_le(payload, 1, 8);
    payload[8] = '/';
    put_le(payload + 9, 0, 4);
    put_le(payload + 13, 100, 4);
    memcpy(payload + 17, "INBOX", 5);
    expect_hostile_folders(disk, dir, payload, 17 + 5);
    put_le(payload + 13, 5, 4);
    payload[19] = '\0';
    expect_hostile_folders(disk, dir, payload, 17 + 5);
    memcpy(payload + 17, "INBOX", 5);
    expect_hostile_folders(disk, dir, payload, 17 + 6);
    put_le(payload, 2, 8);
    expect_hostile_folders(disk, dir, payload, 17 + 5);
    expect_hostile_folders(disk, dir, payload, 4);
    put_le(payload, 1, 8);
    snprintf(path, sizeof path, "%s/folders", dir);
    write_crafted(path, KIND_FOLDERS, payload, 17 + 5);
    struct cache_disk_folders folders;
    CHECK_EQ_INT(cache_disk_folders_load(disk, &folders), 0);
    CHECK_EQ_INT(folders.count, 1);
    if (folders.count == 1)
        CHECK_EQ_STR(folders.mailboxes[0], "INBOX");
    cache_disk_folders_free(&folders);
    cache_disk_close(disk);
}

static void set_mtime(const char *path, time_t when)
{
    struct timespec times[2] = {{.tv_sec = when}, {.tv_sec = when}};
    CHECK_EQ_INT(utimensat(AT_FDCWD, path, times, AT_SYMLINK_NOFOLLOW), 0);
}

static void test_eviction_order(void)
{
    const char *dir = fresh_dir();
    /* Five bodies of 1032 bytes on disk fit under 5200; a sixth does not,
     * and eviction goes down to 80 %: 4160, i.e. four bodies. */
    struct cache_disk *disk = open_ok(dir, 5200);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *body = make_body(1000, 1);
    char path[256];
    time_t now = time(NULL);
    for (uint32_t uid = 1; uid <= 5; uid++) {
        CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, uid, body, 1000), 0);
        body_path(path, sizeof path, dir, "INBOX", 7, uid);
        set_mtime(path, now - 1000 + uid);     /* 1 oldest ... 5 newest */
    }
    CHECK_EQ_INT(cache_disk_usage(disk), 5 * 1032);

    /* Reading the oldest makes it the newest. */
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), 0);
    free(data);

    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 6, body, 1000), 0);
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 1));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 2));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 3));
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 4));
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 5));
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 6));
    CHECK_EQ_INT(cache_disk_usage(disk), 4 * 1032);
    CHECK_EQ_INT(bytes_on_disk(dir), 4 * 1032);

    /* Many more saves, of several sizes and mailboxes: never over. */
    for (uint32_t uid = 100; uid < 300; uid++) {
        size_t size = 10 + (uid * 97) % 1500;
        char *other = make_body(size, uid);
        CHECK_EQ_INT(cache_disk_body_save(disk, uid % 2 ? "INBOX" : "Sent", 7, uid, other, size), 0);
        free(other);
        CHECK(cache_disk_usage(disk) <= 5200);
    }
    CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));

    /* A body bigger than 80 % of the limit is not kept at all. */
    char *large = make_body(4200, 2);
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1000, large, 4200), 0);
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 1000));
    free(large);

    /* A smaller limit at the next open applies at once. */
    cache_disk_close(disk);
    disk = open_ok(dir, 2000);
    CHECK(disk != NULL);
    if (disk) {
        CHECK(cache_disk_usage(disk) <= 1600);
        CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));
        cache_disk_close(disk);
    }
    free(body);
}

static void test_max_bytes_zero(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, "hello", 5), 0);
    CHECK_EQ_INT(cache_disk_usage(disk), 37);
    cache_disk_close(disk);

    /* 0 keeps no bodies: the one left from before goes at open. */
    disk = open_ok(dir, 0);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_usage(disk), 0);
    CHECK_EQ_INT(bytes_on_disk(dir), 0);
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 2, "hello", 5), 0);
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 2));
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), -ENOENT);
    CHECK_EQ_INT(cache_disk_usage(disk), 0);
    CHECK_EQ_INT(bytes_on_disk(dir), 0);

    /* Listings are still kept. */
    struct cache_disk_listing listing = {.uidvalidity = 7, .uidnext = 3};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &listing), 0);
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), 0);
    CHECK_EQ_INT(listing.uidnext, 3);
    free(listing.messages);
    cache_disk_close(disk);
}

static void test_drop_mailbox(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, "one", 3), 0);
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 2, "two", 3), 0);
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 8, 1, "new one", 7), 0);
    CHECK_EQ_INT(cache_disk_body_save(disk, "Sent", 7, 1, "sent", 4), 0);
    struct cache_disk_listing listing = {.uidvalidity = 8, .uidnext = 2};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &listing), 0);
    CHECK_EQ_INT(cache_disk_usage(disk), 4 * 32 + 3 + 3 + 7 + 4);

    /* A symlink inside is removed, not followed. */
    char path[256], outside[128];
    snprintf(outside, sizeof outside, "%s/outside", base);
    CHECK(mkdir(outside, 0700) == 0 || errno == EEXIST);
    snprintf(path, sizeof path, "%s/keep", outside);
    FILE *file = fopen(path, "w");
    if (file)
        fclose(file);
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/7/link");
    CHECK_EQ_INT(symlink(outside, path), 0);

    cache_disk_drop_mailbox(disk, "INBOX");
    mailbox_path(path, sizeof path, dir, "INBOX");
    CHECK(!exists(path));
    snprintf(path, sizeof path, "%s/keep", outside);
    CHECK(exists(path));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 1));
    CHECK(!cache_disk_body_present(disk, "INBOX", 8, 1));
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), -ENOENT);
    CHECK(cache_disk_body_present(disk, "Sent", 7, 1));
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + 4);
    CHECK_EQ_INT(bytes_on_disk(dir), 32 + 4);

    /* Dropping what is not there is harmless; saving again works. */
    cache_disk_drop_mailbox(disk, "INBOX");
    cache_disk_drop_mailbox(disk, "Never");
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 8, 1, "again", 5), 0);
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 8, 1, &data, &len), 0);
    CHECK(len == 5 && memcmp(data, "again", 5) == 0);
    free(data);
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + 4 + 32 + 5);
    cache_disk_close(disk);
}

static void expect_mode(const char *path, unsigned mode)
{
    struct stat st;
    CHECK_EQ_INT(lstat(path, &st), 0);
    if ((st.st_mode & 07777) != mode)
        fprintf(stderr, "%s: mode %04o, want %04o\n", path, st.st_mode & 07777, mode);
    CHECK_EQ_INT(st.st_mode & 07777, mode);
}

static void test_permissions(void)
{
    /* A permissive umask must not leak into the cache. */
    mode_t old_umask = umask(0);
    char dir[160];
    snprintf(dir, sizeof dir, "%s/parent%d/child/cache", base, ++dir_serial);
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk) {
        umask(old_umask);
        return;
    }
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, "x", 1), 0);
    struct cache_disk_listing listing = {.uidvalidity = 7};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &listing), 0);
    struct cache_disk_folders folders = {0};
    CHECK_EQ_INT(cache_disk_folders_save(disk, &folders), 0);
    umask(old_umask);

    char path[256];
    snprintf(path, sizeof path, "%s/parent%d", base, dir_serial);
    expect_mode(path, 0700);
    snprintf(path, sizeof path, "%s/parent%d/child", base, dir_serial);
    expect_mode(path, 0700);
    expect_mode(dir, 0700);
    snprintf(path, sizeof path, "%s/m", dir);
    expect_mode(path, 0700);
    snprintf(path, sizeof path, "%s/tmp", dir);
    expect_mode(path, 0700);
    mailbox_path(path, sizeof path, dir, "INBOX");
    expect_mode(path, 0700);
    strcat(path, "/7");
    expect_mode(path, 0700);
    strcat(path, "/1");
    expect_mode(path, 0600);
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/name");
    expect_mode(path, 0600);
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/listing");
    expect_mode(path, 0600);
    snprintf(path, sizeof path, "%s/folders", dir);
    expect_mode(path, 0600);
    snprintf(path, sizeof path, "%s/lock", dir);
    expect_mode(path, 0600);
    cache_disk_close(disk);
}

static void test_refuse_unsafe_dirs(void)
{
    char err[256];
    const char *dir = fresh_dir();
    CHECK_EQ_INT(mkdir(dir, 0700), 0);
    CHECK_EQ_INT(chmod(dir, 0770), 0);
    err[0] = '\0';
    CHECK(cache_disk_open(dir, 1 << 20, err, sizeof err) == NULL);
    CHECK(strstr(err, "group or others") != NULL);
    CHECK(strstr(err, dir) != NULL);
    fprintf(stderr, "     (message: %s)\n", err);
    CHECK_EQ_INT(chmod(dir, 0701), 0);
    CHECK(cache_disk_open(dir, 1 << 20, err, sizeof err) == NULL);

    /* Refused does not mean touched: nothing was created inside. */
    char path[256];
    snprintf(path, sizeof path, "%s/m", dir);
    CHECK(!exists(path));

    /* Someone else's directory. */
    if (geteuid() == 0) {
        CHECK_EQ_INT(chmod(dir, 0700), 0);
        CHECK_EQ_INT(chown(dir, 65534, 65534), 0);
        err[0] = '\0';
        CHECK(cache_disk_open(dir, 1 << 20, err, sizeof err) == NULL);
        CHECK(strstr(err, "belongs to uid 65534") != NULL);
        fprintf(stderr, "     (message: %s)\n", err);
        CHECK_EQ_INT(chown(dir, 0, 0), 0);
    } else {
        err[0] = '\0';
        CHECK(cache_disk_open("/", 1 << 20, err, sizeof err) == NULL);
        CHECK(strstr(err, "belongs to uid 0") != NULL);
    }

    /* Fixed, it opens; a second open of the same directory is refused
     * while the first is open. */
    CHECK_EQ_INT(chmod(dir, 0700), 0);
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    err[0] = '\0';
    CHECK(cache_disk_open(dir, 1 << 20, err, sizeof err) == NULL);
    CHECK(strstr(err, "in use") != NULL);
    cache_disk_close(disk);
    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    cache_disk_close(disk);

    /* A file where the directory should be. */
    snprintf(path, sizeof path, "%s/a-file", base);
    FILE *file = fopen(path, "w");
    if (file)
        fclose(file);
    err[0] = '\0';
    CHECK(cache_disk_open(path, 1 << 20, err, sizeof err) == NULL);
    CHECK(err[0] != '\0');
}

static void test_stale_tmp_cleaned(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    cache_disk_close(disk);
    char path[256];
    snprintf(path, sizeof path, "%s/tmp/12345.0", dir);
    write_crafted(path, KIND_BODY, "half", 4);
    snprintf(path, sizeof path, "%s/tmp/12345.1", dir);
    CHECK_EQ_INT(mkdir(path, 0700), 0);
    strcat(path, "/7");
    CHECK_EQ_INT(mkdir(path, 0700), 0);
    strcat(path, "/1");
    write_crafted(path, KIND_BODY, "x", 1);
    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    snprintf(path, sizeof path, "%s/tmp/12345.0", dir);
    CHECK(!exists(path));
    snprintf(path, sizeof path, "%s/tmp/12345.1", dir);
    CHECK(!exists(path));
    CHECK_EQ_INT(cache_disk_usage(disk), 0);
    cache_disk_close(disk);
}

static void test_hash_collision(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, "inbox body", 10), 0);
    struct cache_disk_listing listing = {.uidvalidity = 7, .uidnext = 2};
    CHECK_EQ_INT(cache_disk_listing_save(disk, "INBOX", &listing), 0);
    cache_disk_close(disk);

    /* INBOX's directory now says it is Colliding's: as if the two names
     * had the same hash and Colliding had been cached last. */
    char path[256], name_path[256];
    mailbox_path(name_path, sizeof name_path, dir, "INBOX");
    strcat(name_path, "/name");
    write_crafted(name_path, KIND_NAME, "Colliding", 9);

    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), -ENOENT);
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 1));
    CHECK_EQ_INT(cache_disk_listing_load(disk, "INBOX", &listing), -ENOENT);
    body_path(path, sizeof path, dir, "INBOX", 7, 1);
    CHECK(exists(path));        /* absent to INBOX, but not INBOX's to remove */

    /* Not INBOX's to drop either. */
    cache_disk_drop_mailbox(disk, "INBOX");
    CHECK(exists(path));
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + 10);

    /* A save overwrites: the other mailbox's contents go, the count too. */
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 2, "second", 6), 0);
    CHECK(!exists(path));
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 2));
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + 6);
    CHECK_EQ_INT(bytes_on_disk(dir), 32 + 6);
    cache_disk_close(disk);

    /* The name file says INBOX again, across a remount. */
    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), 0);
    CHECK(len == 6 && memcmp(data, "second", 6) == 0);
    free(data);
    cache_disk_close(disk);

    /* A torn or missing name file: the directory is nobody's. */
    write_crafted(name_path, KIND_NAME, "INBOX", 5);
    flip_byte(name_path, 33);
    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), -ENOENT);
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 3, "third", 5), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 3, &data, &len), 0);
    free(data);
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + 5);
    cache_disk_close(disk);
}

/* ------------------------------------------------------------- packs */

#define PATH_SIZE 512

/* The pack files in DIR/m/HASH(mailbox)/uidvalidity, the first max of them
 * into paths: how many there are, or -1 if anything else is there too (or
 * there is no such directory). */
static int pack_files(char (*paths)[PATH_SIZE], int max, const char *dir, const char *mailbox,
                      uint32_t uidvalidity)
{
    char sub[PATH_SIZE];
    mailbox_path(sub, sizeof sub, dir, mailbox);
    snprintf(sub + strlen(sub), sizeof sub - strlen(sub), "/%" PRIu32, uidvalidity);
    DIR *d = opendir(sub);
    if (!d)
        return -1;
    int packs = 0, others = 0;
    struct dirent *entry;
    while ((entry = readdir(d))) {
        if (entry->d_name[0] == '.')
            continue;
        if (entry->d_name[0] == 'p' && strlen(entry->d_name) == 17) {
            if (packs < max)
                snprintf(paths[packs], PATH_SIZE, "%s/%s", sub, entry->d_name);
            packs++;
        } else {
            others++;
        }
    }
    closedir(d);
    return others ? -1 : packs;
}

/* The one pack file of mailbox/uidvalidity, into path; false if there is not
 * exactly one, or anything else is there. */
static bool only_pack(char *path, size_t size, const char *dir, const char *mailbox,
                      uint32_t uidvalidity)
{
    char paths[1][PATH_SIZE];
    if (pack_files(paths, 1, dir, mailbox, uidvalidity) != 1)
        return false;
    snprintf(path, size, "%s", paths[0]);
    return true;
}

static uint64_t get_le(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static unsigned char *read_whole(const char *path, size_t *len)
{
    FILE *file = fopen(path, "rb");
    if (!file)
        return NULL;
    fseek(file, 0, SEEK_END);
    long n = ftell(file);
    fseek(file, 0, SEEK_SET);
    unsigned char *data = malloc((size_t)n + 1);
    if (data && fread(data, 1, (size_t)n, file) != (size_t)n) {
        free(data);
        data = NULL;
    }
    fclose(file);
    *len = (size_t)n;
    return data;
}

static void test_pack_round_trip(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    /* Out of UID order, with NUL bytes, and one empty body. */
    char *b5 = make_body(3000, 5), *b9 = make_body(70, 9);
    struct cache_disk_item items[] = {{5, b5, 3000}, {3, "", 0}, {9, b9, 70}};
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 3), 0);

    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 5, &data, &len), 0);
    CHECK(body_matches(data, len, 3000, 5));
    free(data);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 3, &data, &len), 0);
    CHECK(len == 0 && data[0] == '\0');
    free(data);
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 9));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 4));
    CHECK(!cache_disk_body_present(disk, "INBOX", 8, 5));
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 4, &data, &len), -ENOENT);

    /* One file, in the documented format: header (kind 5) over the table of
     * contents, then the bodies in its order. */
    char path[PATH_SIZE];
    CHECK(only_pack(path, sizeof path, dir, "INBOX", 7));
    size_t size;
    unsigned char *file = read_whole(path, &size);
    CHECK(file != NULL);
    size_t toc_len = 8 + 3 * 16;
    CHECK_EQ_INT(size, 32 + toc_len + 3070);
    if (file && size == 32 + toc_len + 3070) {
        CHECK(memcmp(file, "IMFS", 4) == 0);
        CHECK_EQ_INT(get_le(file + 8, 4), 5);
        CHECK_EQ_INT(get_le(file + 16, 8), toc_len);
        CHECK(get_le(file + 24, 8) == format_checksum(file + 32, toc_len));
        CHECK_EQ_INT(get_le(file + 32, 8), 3);
        const unsigned char *toc = file + 40;
        CHECK_EQ_INT(get_le(toc, 4), 5);
        CHECK_EQ_INT(get_le(toc + 4, 4), 3000);
        CHECK(get_le(toc + 8, 8) == format_checksum(b5, 3000));
        CHECK_EQ_INT(get_le(toc + 16, 4), 3);
        CHECK_EQ_INT(get_le(toc + 32, 4), 9);
        CHECK(memcmp(file + 32 + toc_len, b5, 3000) == 0);
        CHECK(memcmp(file + 32 + toc_len + 3000, b9, 70) == 0);
    }
    free(file);
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + toc_len + 3070);

    /* A new open finds the bodies from the table of contents, and counts
     * the pack. */
    cache_disk_close(disk);
    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_usage(disk), 32 + toc_len + 3070);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 9, &data, &len), 0);
    CHECK(body_matches(data, len, 70, 9));
    free(data);
    CHECK(!cache_disk_body_present(disk, "Other", 7, 9));

    /* One item is a plain body file; a uid 0 is refused with nothing kept. */
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items + 2, 1), 0);
    body_path(path, sizeof path, dir, "INBOX", 7, 9);
    CHECK(exists(path));
    struct cache_disk_item zero[] = {{1, "a", 1}, {0, "b", 1}};
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "Sent", 7, zero, 2), -EINVAL);
    CHECK(!cache_disk_body_present(disk, "Sent", 7, 1));
    CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));
    cache_disk_close(disk);
    free(b5);
    free(b9);
}

/* Saves a pack of three 2000-byte bodies (uids 1-3) in INBOX/7, damages it
 * with damage(path) with the cache closed, reopens, and checks that no body
 * of it is served and that it is gone and uncounted. */
static void check_damaged_pack(void (*damage)(const char *path), bool damages_toc)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *bodies[3];
    struct cache_disk_item items[3];
    for (int i = 0; i < 3; i++) {
        bodies[i] = make_body(2000, 20 + (unsigned)i);
        items[i] = (struct cache_disk_item){(uint32_t)i + 1, bodies[i], 2000};
    }
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 3), 0);
    cache_disk_close(disk);
    char path[PATH_SIZE];
    CHECK(only_pack(path, sizeof path, dir, "INBOX", 7));
    damage(path);

    disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *data;
    size_t len;
    /* The damage is in body 2 when it is not in the table of contents:
     * body 1 may still be served, whole; body 2 never. */
    int r1 = cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len);
    if (r1 == 0) {
        CHECK(!damages_toc);
        CHECK(body_matches(data, len, 2000, 20));
        free(data);
    } else {
        CHECK_EQ_INT(r1, -ENOENT);
    }
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), -ENOENT);
    CHECK(!exists(path));
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 3, &data, &len), -ENOENT);
    CHECK_EQ_INT(cache_disk_usage(disk), 0);
    CHECK_EQ_INT(bytes_on_disk(dir), 0);
    /* and it can be saved again */
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 3), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), 0);
    CHECK(body_matches(data, len, 2000, 21));
    free(data);
    cache_disk_close(disk);
    for (int i = 0; i < 3; i++)
        free(bodies[i]);
}

static void flip_in_second_body(const char *path)
{
    flip_byte(path, 32 + 8 + 3 * 16 + 2000 + 1000);
}

static void flip_in_toc(const char *path)
{
    flip_byte(path, 32 + 8 + 16 + 4);   /* body 2's length */
}

static void zero_the_end(const char *path)
{
    /* a crash after the rename, before the last blocks reached the disk */
    int fd = open(path, O_WRONLY);
    char zeroes[2500] = {0};
    CHECK(fd >= 0 && pwrite(fd, zeroes, sizeof zeroes, file_size(path) - 2500) == 2500);
    close(fd);
}

static void test_damaged_packs(void)
{
    check_damaged_pack(damage_truncate, true);
    check_damaged_pack(flip_in_second_body, false);
    check_damaged_pack(flip_in_toc, true);
    check_damaged_pack(zero_the_end, false);

    /* A symlink named like a pack is never followed, and goes. */
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 1 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, "x", 1), 0);
    char path[256], target[200];
    snprintf(target, sizeof target, "%s/outside-pack", base);
    struct cache_disk_item items[] = {{2, "two", 3}, {3, "three", 5}};
    write_crafted(target, 5, "", 0);
    mailbox_path(path, sizeof path, dir, "INBOX");
    strcat(path, "/7/p0123456789abcdef");
    CHECK_EQ_INT(symlink(target, path), 0);
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), -ENOENT);
    CHECK(!exists(path));
    CHECK(exists(target));
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 2), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 3, &data, &len), 0);
    CHECK(len == 5 && memcmp(data, "three", 5) == 0);
    free(data);
    CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));
    cache_disk_close(disk);
}

/* Which UIDs have a body file of their own is kept in memory (read from the
 * directory the first time, then kept by saves), so that a miss costs no
 * open: each failed one left a negative dentry behind, 10,000 per cold
 * grep.  A body file appearing behind the cache's back is therefore not
 * looked for until the next open. */
static void test_loose_bodies_indexed(void)
{
    const char *dir = fresh_dir();
    struct cache_disk *disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *data = NULL;
    size_t len = 0;
    /* saved before anything read the directory: found by reading it */
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 1, "one", 3), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), 0);
    CHECK(len == 3 && memcmp(data, "one", 3) == 0);
    free(data);
    /* saved after: found through what the save recorded */
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 2, "two", 3), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), 0);
    CHECK(len == 3 && memcmp(data, "two", 3) == 0);
    free(data);
    CHECK_EQ_INT(cache_disk_body_present(disk, "INBOX", 7, 2), 1);
    /* indexed, then its file gone (removed by hand or by another mount's
     * eviction): a miss, not an error or a wrong body */
    char path[256];
    body_path(path, sizeof path, dir, "INBOX", 7, 2);
    CHECK_EQ_INT(unlink(path), 0);
    data = NULL;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), -ENOENT);
    CHECK(data == NULL);
    CHECK_EQ_INT(cache_disk_body_present(disk, "INBOX", 7, 2), 0);
    /* saved again, it is found again */
    CHECK_EQ_INT(cache_disk_body_save(disk, "INBOX", 7, 2, "two", 3), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), 0);
    CHECK(len == 3 && memcmp(data, "two", 3) == 0);
    free(data);
    /* planted behind its back: not looked for while open */
    body_path(path, sizeof path, dir, "INBOX", 7, 3);
    write_crafted(path, KIND_BODY, "three", 5);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 3, &data, &len), -ENOENT);
    CHECK_EQ_INT(cache_disk_body_present(disk, "INBOX", 7, 3), 0);
    CHECK(exists(path));
    cache_disk_close(disk);
    /* the next open reads the directory and finds it */
    disk = open_ok(dir, 64 << 20);
    CHECK(disk != NULL);
    if (!disk)
        return;
    CHECK_EQ_INT(cache_disk_body_present(disk, "INBOX", 7, 3), 1);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 3, &data, &len), 0);
    CHECK(len == 5 && memcmp(data, "three", 5) == 0);
    free(data);
    cache_disk_close(disk);
}

static void test_pack_eviction_and_drop(void)
{
    const char *dir = fresh_dir();
    /* Packs of two 500-byte bodies take 32 + 8 + 32 + 1000 = 1072 bytes;
     * four fit under 5200, a fifth does not, and eviction goes down to
     * 4160: two packs go. */
    struct cache_disk *disk = open_ok(dir, 5200);
    CHECK(disk != NULL);
    if (!disk)
        return;
    char *body = make_body(500, 3);
    time_t now = time(NULL);
    char paths[4][PATH_SIZE];
    for (uint32_t pack = 0; pack < 4; pack++) {
        struct cache_disk_item items[] = {{10 * pack + 1, body, 500}, {10 * pack + 2, body, 500}};
        CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 2), 0);
    }
    /* Name each pack by what it holds, and age them: pack 0 oldest. */
    char found[4][PATH_SIZE];
    CHECK_EQ_INT(pack_files(found, 4, dir, "INBOX", 7), 4);
    for (int i = 0; i < 4; i++) {
        size_t size;
        unsigned char *file = read_whole(found[i], &size);
        CHECK(file != NULL);
        if (!file)
            continue;
        uint32_t first = (uint32_t)get_le(file + 40, 4);
        free(file);
        CHECK(first % 10 == 1 && first / 10 < 4);
        if (first / 10 < 4)
            memcpy(paths[first / 10], found[i], PATH_SIZE);
        set_mtime(found[i], now - 1000 + first);
    }
    CHECK_EQ_INT(cache_disk_usage(disk), 4 * 1072);

    /* Reading a body of the oldest makes its whole pack the newest. */
    char *data;
    size_t len;
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 2, &data, &len), 0);
    free(data);
    struct cache_disk_item items[] = {{41, body, 500}, {42, body, 500}};
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 2), 0);
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 1));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 11));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 12));
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 22));
    CHECK(!exists(paths[1]) && !exists(paths[2]));
    CHECK(exists(paths[0]) && exists(paths[3]));
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 21, &data, &len), -ENOENT);
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 32));
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 41));
    CHECK_EQ_INT(cache_disk_usage(disk), 3 * 1072);
    CHECK_EQ_INT(bytes_on_disk(dir), 3 * 1072);

    /* A pack that would not fit under 80 % of the limit is saved body by
     * body, each kept or not by the rule for one body. */
    char *big = make_body(2500, 4);
    struct cache_disk_item large[] = {{50, big, 2500}, {51, big, 2500}};
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, large, 2), 0);
    CHECK(cache_disk_body_present(disk, "INBOX", 7, 51));
    char path[PATH_SIZE];
    body_path(path, sizeof path, dir, "INBOX", 7, 51);
    CHECK(exists(path));
    CHECK(cache_disk_usage(disk) <= 5200);
    CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));
    free(big);

    /* A drop forgets the packs with the directory. */
    cache_disk_drop_mailbox(disk, "INBOX");
    CHECK(!cache_disk_body_present(disk, "INBOX", 7, 41));
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 1, &data, &len), -ENOENT);
    CHECK_EQ_INT(cache_disk_usage(disk), 0);
    CHECK_EQ_INT(cache_disk_bodies_save(disk, "INBOX", 7, items, 2), 0);
    CHECK_EQ_INT(cache_disk_body_load(disk, "INBOX", 7, 42, &data, &len), 0);
    CHECK(body_matches(data, len, 500, 3));
    free(data);
    CHECK_EQ_INT(cache_disk_usage(disk), 1072);
    cache_disk_close(disk);
    free(body);
}

/* ---------------------------------------------------------- threads */

#define STRESS_MAILBOXES 3
#define STRESS_UIDS 40

static const char *const stress_mailboxes[STRESS_MAILBOXES] = {"INBOX", "Sent", "Lists/notmuch"};

struct stress {
    struct cache_disk *disk;
    unsigned seed;
    double seconds;
    unsigned long saves, loads, hits, drops;
    unsigned long errors;       /* checked by main after join, not racy CHECKs */
};

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t stress_size(unsigned mailbox, uint32_t uid)
{
    return (uid * 389u + mailbox * 1201u) % 6000u;
}

static void *stress_thread(void *arg)
{
    struct stress *stress = arg;
    double end = now_seconds() + stress->seconds;
    while (now_seconds() < end) {
        for (int i = 0; i < 50; i++) {
            unsigned op = (unsigned)rand_r(&stress->seed) % 100;
            unsigned mailbox = (unsigned)rand_r(&stress->seed) % STRESS_MAILBOXES;
            uint32_t uid = 1 + (uint32_t)rand_r(&stress->seed) % STRESS_UIDS;
            const char *name = stress_mailboxes[mailbox];
            unsigned seed = mailbox * 1000 + uid;
            size_t size = stress_size(mailbox, uid);
            if (op < 20 && uid + 2 <= STRESS_UIDS) {
                /* uid and the two after it, as one pack */
                char *bodies[3];
                struct cache_disk_item items[3];
                for (uint32_t k = 0; k < 3; k++) {
                    bodies[k] = make_body(stress_size(mailbox, uid + k), mailbox * 1000 + uid + k);
                    items[k] = (struct cache_disk_item){uid + k, bodies[k],
                                                        stress_size(mailbox, uid + k)};
                }
                int r = cache_disk_bodies_save(stress->disk, name, 7, items, 3);
                if (r != 0 && r != -ENOENT)
                    stress->errors++;
                for (int k = 0; k < 3; k++)
                    free(bodies[k]);
                stress->saves++;
            } else if (op < 45) {
                char *body = make_body(size, seed);
                /* -ENOENT: raced a drop of the same mailbox, which cache/disk.h
                 * allows (nothing is kept then); anything else is a fault */
                int r = cache_disk_body_save(stress->disk, name, 7, uid, body, size);
                if (r != 0 && r != -ENOENT)
                    stress->errors++;
                free(body);
                stress->saves++;
            } else if (op < 90) {
                char *data;
                size_t len;
                int r = cache_disk_body_load(stress->disk, name, 7, uid, &data, &len);
                if (r == 0) {
                    if (!body_matches(data, len, size, seed))
                        stress->errors++;
                    free(data);
                    stress->hits++;
                } else if (r != -ENOENT) {
                    stress->errors++;
                }
                stress->loads++;
            } else if (op < 98) {
                cache_disk_body_present(stress->disk, name, 7, uid);
                cache_disk_usage(stress->disk);
            } else {
                cache_disk_drop_mailbox(stress->disk, name);
                stress->drops++;
            }
        }
    }
    return NULL;
}

static void test_multithreaded_stress(void)
{
    const char *dir = fresh_dir();
    /* Small enough that eviction runs often, concurrently with everything. */
    struct cache_disk *disk = open_ok(dir, 64 * 1024);
    CHECK(disk != NULL);
    if (!disk)
        return;
    struct stress stress[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        stress[i] = (struct stress){.disk = disk, .seed = 17u + (unsigned)i, .seconds = 1.0};
        CHECK_EQ_INT(pthread_create(&threads[i], NULL, stress_thread, &stress[i]), 0);
    }
    unsigned long saves = 0, loads = 0, hits = 0, drops = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        CHECK_EQ_INT(stress[i].errors, 0);
        saves += stress[i].saves;
        loads += stress[i].loads;
        hits += stress[i].hits;
        drops += stress[i].drops;
    }
    fprintf(stderr, "     (%lu saves, %lu loads, %lu hits, %lu drops)\n", saves, loads, hits,
            drops);
    CHECK(hits > 0);
    /* The count is exact after all that, and below the limit. */
    CHECK_EQ_INT(cache_disk_usage(disk), bytes_on_disk(dir));
    CHECK(cache_disk_usage(disk) <= 64 * 1024);
    cache_disk_close(disk);

    /* And a remount agrees. */
    uint64_t on_disk = bytes_on_disk(dir);
    disk = open_ok(dir, 64 * 1024);
    CHECK(disk != NULL);
    if (disk) {
        CHECK_EQ_INT(cache_disk_usage(disk), on_disk);
        cache_disk_close(disk);
    }
}

int main(void)
{
    snprintf(base, sizeof base, "/tmp/imapfs-test-disk-XXXXXX");
    if (!mkdtemp(base)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(test_body_round_trip);
    RUN(test_listing_round_trip);
    RUN(test_folders_round_trip);
    RUN(test_torn_files);
    RUN(test_wrong_magic_version_kind);
    RUN(test_hostile_listing_and_folders);
    RUN(test_eviction_order);
    RUN(test_max_bytes_zero);
    RUN(test_drop_mailbox);
    RUN(test_permissions);
    RUN(test_refuse_unsafe_dirs);
    RUN(test_stale_tmp_cleaned);
    RUN(test_hash_collision);
    RUN(test_pack_round_trip);
    RUN(test_damaged_packs);
    RUN(test_pack_eviction_and_drop);
    RUN(test_loose_bodies_indexed);
    RUN(test_multithreaded_stress);
    remove_all(base);
    return check_summary();
}
