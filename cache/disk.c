/* cache/disk.c — the persistent cache: bodies, UID tables and the folder
 * list as files under one directory (layout in cache/disk.h).
 *
 * Files, not a database.  A body is written once and read many times, and a
 * file system is already a good store for immutable blobs: a file per body,
 * named by UIDVALIDITY and UID under a directory per mailbox, or a pack file
 * for the bodies a scan fetched together (see "pack files" below: one file
 * per body cost more than the fetch itself).  Dropping a mailbox is then one
 * directory, LRU order is the file mtime, and a crash can leave only whole
 * files or torn ones behind.
 *
 * Torn files are caught, not prevented.  Every file is written under DIR/tmp
 * and renamed into place, without fsync, so a crash can still leave a renamed
 * file whose blocks never reached the disk (zeroes, or short).  The 32-byte
 * header carries the payload length and a checksum of the payload; a file
 * failing either is removed and reported absent, and the caller fetches it
 * again.  The checksum only has to notice accidents (anyone who can write in
 * DIR, 0700 and ours, can do anything we can), but every length and count
 * read back is still checked against what is left of the payload, so a
 * corrupt file can make a load fail, never read past its end.
 *
 * Mailbox directories are named by a 64-bit FNV-1a of the mailbox name, so a
 * server's name (any bytes, "/", "..") never becomes a path.  FNV is easy to
 * collide on purpose, so DIR/m/HASH/name says whose directory it is: one that
 * names another mailbox is absent to loads and replaced by saves.  Who owns
 * each hash is remembered after the first look, so a load costs one open.
 *
 * The byte count is exact.  Every change to a body file in DIR/m (rename into
 * place, removal of a torn one, eviction) happens under the lock together
 * with a stat of the file it replaces or removes, checked to be the same
 * inode, so two threads saving the same body, or a load removing a torn file
 * another thread has just replaced, cannot make the count drift.  Those are
 * metadata calls of a few microseconds; the bodies themselves are written and
 * read outside the lock.  The lock is also held the first time a mailbox is
 * used in a mount, while its name file is read or written, so two threads
 * cannot claim one directory for two names.  Dropping a mailbox renames its
 * directory into DIR/tmp under the lock (after which no one can find its
 * files) and removes it outside.
 *
 * Eviction walks DIR/m without the lock, collecting (mtime, size, inode,
 * path) of every body, sorts oldest first, and removes them one at a time
 * under the lock until the total is at 80 % of max_bytes, skipping any whose
 * inode or mtime changed since the walk (replaced, or loaded meanwhile).
 * Only one thread evicts at a time, in the save that crossed the limit; the
 * 80 % hysteresis makes that once per fifth of max_bytes written, and the
 * whole eviction of 110,000 bodies took about 0.2 s (warm, ext4).
 *
 * One process per directory: opening empties DIR/tmp and counts the bodies,
 * which would break another process's writes and count, so DIR/lock is held
 * with flock for as long as the cache is open. */

/* uthash's default on out of memory is exit(); ours is failure. */
#define HASH_NONFATAL_OOM 1
#include "cache/disk.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------ file format */

/* Header, all integers little-endian:
 *   0  "IMFS"
 *   4  u32 format version
 *   8  u32 kind (enum file_kind)
 *  12  u32 zero
 *  16  u64 payload length (= file size - 32)
 *  24  u64 checksum of the payload */
#define HEADER_SIZE 32
#define FORMAT_VERSION 1u
static const char magic[4] = {'I', 'M', 'F', 'S'};

enum file_kind {
    KIND_BODY = 1,
    KIND_LISTING = 2,
    KIND_FOLDERS = 3,
    KIND_NAME = 4,      /* DIR/m/HASH/name: the owning mailbox's name */
    KIND_PACK = 5,      /* several bodies in one file (see "pack files") */
};

/* Relative paths below DIR: "m/" 16 hex "/" 10 digits "/" 10 digits, and
 * temporary names "tmp/" pid "." counter. */
#define REL_MAX 64

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

/* The smallest a listing entry (u32 uid, u32 flags, u64 size, i64 date, u32
 * keyword length) and a folder entry (u8 delimiter, u32 flags, u32 name
 * length) can be: a count larger than what is left / this is corrupt,
 * checked before anything is allocated for it. */
#define LISTING_HEAD 24
#define LISTING_ENTRY_MIN 28
#define FOLDERS_HEAD 8
#define FOLDER_ENTRY_MIN 9

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint64_t mix_word(uint64_t h, uint64_t word)
{
    h ^= word;
    h *= FNV_PRIME;
    return h ^ (h >> 32);
}

static uint64_t load_word(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, 8);
    return le64toh(word);
}

/* FNV-1a over 64-bit words instead of bytes: byte-wise FNV-1a is one
 * multiply per byte, 0.7 GB/s, slower than reading the file.  A multiply by
 * the FNV prime only carries bits upwards, so each step also folds the high
 * half back down.  Four lanes take every fourth word of each 32-byte stripe,
 * so four multiplies are in flight at once (2.1 GB/s with one lane, 4.1
 * with four, measured), and are then folded into one with the same step.
 *
 * Every step is a bijection of the state for a given word, and so is every
 * fold for a given lane, so any change confined to one word always changes
 * the result; the length is mixed in as well, and MurmurHash3's fmix64
 * spreads the last words over all bits.
 *
 * Payload layout: stripes of 32 bytes (words 0-3 to lanes 0-3), then the
 * lanes folded in order, then the remaining whole words, then the last 0-7
 * bytes as one word (always, even when empty), all little-endian. */
static uint64_t checksum(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t lane0 = FNV_OFFSET, lane1 = FNV_OFFSET ^ 1, lane2 = FNV_OFFSET ^ 2,
             lane3 = FNV_OFFSET ^ 3;
    size_t left = len;

    while (left >= 32) {
        lane0 = mix_word(lane0, load_word(p));
        lane1 = mix_word(lane1, load_word(p + 8));
        lane2 = mix_word(lane2, load_word(p + 16));
        lane3 = mix_word(lane3, load_word(p + 24));
        p += 32;
        left -= 32;
    }
    uint64_t h = mix_word(mix_word(mix_word(lane0, lane1), lane2), lane3);
    while (left >= 8) {
        h = mix_word(h, load_word(p));
        p += 8;
        left -= 8;
    }
    uint64_t tail = 0;
    for (size_t i = 0; i < left; i++)
        tail |= (uint64_t)p[i] << (8 * i);
    h = mix_word(h, tail);

    h ^= (uint64_t)len;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

/* Plain byte-wise FNV-1a 64: the mailbox directory's name. */
static uint64_t mailbox_hash(const char *mailbox)
{
    uint64_t h = FNV_OFFSET;
    for (const unsigned char *p = (const unsigned char *)mailbox; *p; p++) {
        h ^= *p;
        h *= FNV_PRIME;
    }
    return h;
}

static void encode_header(unsigned char *header, uint32_t kind, const void *payload, size_t len)
{
    memcpy(header, magic, 4);
    put_u32(header + 4, FORMAT_VERSION);
    put_u32(header + 8, kind);
    put_u32(header + 12, 0);
    put_u64(header + 16, len);
    put_u64(header + 24, checksum(payload, len));
}

/* ------------------------------------------------------------- the state */

/* Who a DIR/m/HASH directory belongs to, as its name file said, or as we
 * wrote it. */
struct pack_group;

struct owner {
    uint64_t hash;
    char *mailbox;
    struct pack_group *groups;  /* where its packed bodies are, per UIDVALIDITY */
    UT_hash_handle hh;
};

struct cache_disk {
    int dir_fd;                 /* DIR; every path used is relative to it, so a
                                   chdir (fuse_daemonize) changes nothing */
    int lock_fd;                /* DIR/lock, flock'd while open */
    uint64_t max_bytes;         /* constant after open */
    long pid;                   /* in temporary names; getpid is a system call */
    uint64_t temp_counter;      /* atomic: makes temporary names unique */
    uint64_t pack_seed;         /* pack names: seed + counter, unique per open */
    pthread_mutex_t direct_lock;    /* protects direct_buffer */
    unsigned char *direct_buffer;   /* DIRECT_CHUNK, aligned, reused: see write_direct */

    pthread_mutex_t lock;       /* protects everything below */
    uint64_t usage;             /* sizes of the body files in DIR/m */
    bool evicting;              /* one thread is running evict() */
    struct owner *owners;       /* uthash on hash */
};

static void lock_disk(struct cache_disk *disk)
{
    int rc = pthread_mutex_lock(&disk->lock);
    if (rc != 0) {
        fprintf(stderr, "imapfs: disk cache lock: error %d\n", rc);
        abort();
    }
}

static void unlock_disk(struct cache_disk *disk)
{
    pthread_mutex_unlock(&disk->lock);
}

/* 80 % of max_bytes, without overflowing near UINT64_MAX. */
static uint64_t low_water(const struct cache_disk *disk)
{
    return disk->max_bytes / 10 * 8 + disk->max_bytes % 10 * 8 / 10;
}

static void usage_subtract_locked(struct cache_disk *disk, uint64_t bytes)
{
    disk->usage = bytes > disk->usage ? 0 : disk->usage - bytes;
}

static void mailbox_rel(char *rel, uint64_t hash)
{
    snprintf(rel, REL_MAX, "m/%016" PRIx64, hash);
}

static void body_rel(char *rel, uint64_t hash, uint32_t uidvalidity, uint32_t uid)
{
    snprintf(rel, REL_MAX, "m/%016" PRIx64 "/%" PRIu32 "/%" PRIu32, hash, uidvalidity, uid);
}

static void uidvalidity_rel(char *rel, uint64_t hash, uint32_t uidvalidity)
{
    snprintf(rel, REL_MAX, "m/%016" PRIx64 "/%" PRIu32, hash, uidvalidity);
}

static void temp_rel(struct cache_disk *disk, char *rel)
{
    uint64_t n = __atomic_fetch_add(&disk->temp_counter, 1, __ATOMIC_RELAXED);
    snprintf(rel, REL_MAX, "tmp/%ld.%" PRIu64, disk->pid, n);
}

/* Names we create in DIR/m: 16 lowercase hex digits (a mailbox), and 1 to 10
 * decimal digits (a UIDVALIDITY, a UID).  Anything else there is not ours
 * and is neither counted nor evicted. */
static bool is_hash_name(const char *name)
{
    size_t n = 0;
    for (; name[n]; n++)
        if (!((name[n] >= '0' && name[n] <= '9') || (name[n] >= 'a' && name[n] <= 'f')))
            return false;
    return n == 16;
}

static bool is_number_name(const char *name)
{
    size_t n = 0;
    for (; name[n]; n++)
        if (name[n] < '0' || name[n] > '9')
            return false;
    return n >= 1 && n <= 10;
}

/* A pack file: "p" and 16 lowercase hex digits. */
static bool is_pack_name(const char *name)
{
    return name[0] == 'p' && is_hash_name(name + 1);
}

/* What a UIDVALIDITY directory holds that counts as bodies. */
static bool is_body_name(const char *name)
{
    return is_number_name(name) || is_pack_name(name);
}

/* ----------------------------------------------------------------- file I/O */

/* Reads or writes all of iov, resuming after short transfers and EINTR.
 * 0, -errno, or -ENODATA when a read meets the end of the file first. */
static int transfer_all(int fd, struct iovec *iov, int iovcnt, bool writing)
{
    while (iovcnt > 0) {
        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        ssize_t n = writing ? writev(fd, iov, iovcnt) : readv(fd, iov, iovcnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return writing ? -EIO : -ENODATA;
        size_t done = (size_t)n;
        while (iovcnt > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

/* items with its capacity doubled (to first if it had none), or NULL with
 * items and *capacity unchanged. */
static void *grow(void *items, size_t *capacity, size_t item_size, size_t first)
{
    size_t want = *capacity ? *capacity * 2 : first;
    void *grown = reallocarray(items, want, item_size);
    if (grown)
        *capacity = want;
    return grown;
}

#define DIRECT_ALIGN 4096
#define DIRECT_CHUNK (1u << 20)
#define DIRECT_MIN (64u << 10)      /* smaller files: buffered (see below) */

/* Writes iov (size bytes in all) to fd, opened with O_DIRECT, through one
 * reused, aligned 1 MiB buffer, and cuts the file to size.
 * A buffered write would copy the bytes into page-cache pages allocated for
 * them, and on a VM whose host takes freed memory back (free page
 * reporting) every new page is a fault to the host: for a scan's bodies
 * that copy cost more CPU than everything else a cold grep does (perf: 34 %
 * of the daemon).  The buffer stays mapped, so filling it costs a memcpy.
 * -EINVAL: a write was refused, or there is no buffer. */
static int write_direct(struct cache_disk *disk, int fd, const struct iovec *iov, int iovcnt,
                        uint64_t size)
{
    pthread_mutex_lock(&disk->direct_lock);
    int r = 0;
    if (!disk->direct_buffer &&
        posix_memalign((void **)&disk->direct_buffer, DIRECT_ALIGN, DIRECT_CHUNK) != 0) {
        disk->direct_buffer = NULL;
        r = -EINVAL;
    }
    int i = 0;
    size_t in = 0;      /* bytes of iov[i] already taken */
    while (r == 0 && i < iovcnt) {
        size_t fill = 0;
        while (fill < DIRECT_CHUNK && i < iovcnt) {
            size_t take = iov[i].iov_len - in;
            if (take > DIRECT_CHUNK - fill)
                take = DIRECT_CHUNK - fill;
            memcpy(disk->direct_buffer + fill, (const char *)iov[i].iov_base + in, take);
            fill += take;
            in += take;
            if (in == iov[i].iov_len) {
                i++;
                in = 0;
            }
        }
        size_t out = (fill + DIRECT_ALIGN - 1) / DIRECT_ALIGN * DIRECT_ALIGN;
        memset(disk->direct_buffer + fill, 0, out - fill);
        struct iovec chunk = {.iov_base = disk->direct_buffer, .iov_len = out};
        if (out)
            r = transfer_all(fd, &chunk, 1, true);
    }
    pthread_mutex_unlock(&disk->direct_lock);
    if (r == 0 && ftruncate(fd, (off_t)size) < 0)
        r = -errno;
    return r;
}

/* Writes iov (size bytes in all) to fd, a new and empty file: with O_DIRECT
 * from DIRECT_MIN bytes on, buffered below that (for a file of a few KiB,
 * O_DIRECT costs more than it saves: one synchronous request each, measured
 * in session 5) and where the file system refuses O_DIRECT (ramfs; tmpfs
 * before Linux 6.6). */
static int write_contents(struct cache_disk *disk, int fd, struct iovec *iov, int iovcnt,
                          uint64_t size)
{
    int flags = size >= DIRECT_MIN ? fcntl(fd, F_GETFL) : -1;
    if (flags >= 0 && fcntl(fd, F_SETFL, flags | O_DIRECT) == 0) {
        int r = write_direct(disk, fd, iov, iovcnt, size);
        if (r != -EINVAL)
            return r;
        /* refused after all: from the start, buffered */
        if (fcntl(fd, F_SETFL, flags) < 0 || ftruncate(fd, 0) < 0 || lseek(fd, 0, SEEK_SET) < 0)
            return -errno;
    }
    return transfer_all(fd, iov, iovcnt, true);
}

/* Writes iov (size bytes in all) to a new file in DIR/tmp, its relative
 * path in temp.  0 or -errno (nothing left behind). */
static int write_temp_iov(struct cache_disk *disk, struct iovec *iov, int iovcnt, uint64_t size,
                          char *temp)
{
    int fd = -1;
    /* mkstemp would want a path from the cwd, which fuse_daemonize moves to
     * "/"; O_CREAT|O_EXCL with a per-process counter is the same guarantee
     * relative to our directory.  A leftover of the same name can only be
     * from a crashed process with our pid, so try a few counters. */
    for (int attempt = 0; attempt < 16 && fd < 0; attempt++) {
        temp_rel(disk, temp);
        fd = openat(disk->dir_fd, temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0 && errno != EEXIST)
            return -errno;
    }
    if (fd < 0)
        return -EEXIST;

    int r = 0;
    /* umask may have taken bits off 0600, never added any: fchmod makes it
     * exactly 0600 either way. */
    if (fchmod(fd, 0600) < 0)
        r = -errno;
    if (r == 0)
        r = write_contents(disk, fd, iov, iovcnt, size);
    if (close(fd) < 0 && r == 0)
        r = -errno;
    if (r != 0)
        unlinkat(disk->dir_fd, temp, 0);
    return r;
}

/* Writes header and payload to a new file in DIR/tmp, its relative path in
 * temp.  0 or -errno (nothing left behind). */
static int write_temp(struct cache_disk *disk, uint32_t kind, const void *payload, size_t len,
                      char *temp)
{
    unsigned char header[HEADER_SIZE];
    encode_header(header, kind, payload, len);
    struct iovec iov[2] = {
        {.iov_base = header, .iov_len = HEADER_SIZE},
        {.iov_base = (void *)payload, .iov_len = len},
    };
    return write_temp_iov(disk, iov, 2, HEADER_SIZE + (uint64_t)len, temp);
}

/* Writes a whole file that is not a body (no byte accounting): temp, then
 * rename over rel. */
static int write_file(struct cache_disk *disk, const char *rel, uint32_t kind, const void *payload,
                      size_t len)
{
    char temp[REL_MAX];
    int r = write_temp(disk, kind, payload, len, temp);
    if (r != 0)
        return r;
    if (renameat(disk->dir_fd, temp, disk->dir_fd, rel) < 0) {
        r = -errno;
        unlinkat(disk->dir_fd, temp, 0);
    }
    return r;
}

/* Removes rel if it is still the file that was read (same device and
 * inode), subtracting its size if it is a body.  locked: the caller holds
 * the lock already. */
static void discard(struct cache_disk *disk, const char *rel, const struct stat *read_st,
                    bool is_body, bool locked)
{
    if (!locked)
        lock_disk(disk);
    struct stat st;
    if (fstatat(disk->dir_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_dev == read_st->st_dev &&
        st.st_ino == read_st->st_ino && unlinkat(disk->dir_fd, rel, 0) == 0 && is_body &&
        S_ISREG(st.st_mode))
        usage_subtract_locked(disk, (uint64_t)st.st_size);
    if (!locked)
        unlock_disk(disk);
}

/* Reads and checks DIR/rel.  0 with *payload malloc'd (len bytes and a NUL
 * after them) and *st_out describing the file; -ENOENT if absent or failing
 * its check (then removed); another -errno if it could not be read.
 * touch: set its mtime to now (bodies: the LRU order). */
static int load_file(struct cache_disk *disk, const char *rel, uint32_t kind, bool touch,
                     bool locked, char **payload, size_t *len, struct stat *st_out)
{
    *payload = NULL;
    *len = 0;

    int fd = openat(disk->dir_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        if (errno == ELOOP) {
            /* Never ours: we only ever rename regular files into place. */
            struct stat st;
            if (fstatat(disk->dir_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0)
                discard(disk, rel, &st, false, locked);
            return -ENOENT;
        }
        return errno == ENOENT || errno == ENOTDIR ? -ENOENT : -errno;
    }

    struct stat st;
    if (fstat(fd, &st) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return -ENOENT;
    }

    unsigned char header[HEADER_SIZE];
    char *data = NULL;
    uint64_t size = (uint64_t)st.st_size;
    uint64_t length = 0;
    int r = 0;
    if (size < HEADER_SIZE || size - HEADER_SIZE > SIZE_MAX - 1)
        goto corrupt;
    length = size - HEADER_SIZE;
    data = malloc(length + 1);
    if (!data) {
        close(fd);
        return -ENOMEM;
    }
    struct iovec iov[2] = {
        {.iov_base = header, .iov_len = HEADER_SIZE},
        {.iov_base = data, .iov_len = length},
    };
    r = transfer_all(fd, iov, 2, false);
    if (r == -ENODATA)
        goto corrupt;
    if (r != 0) {
        free(data);
        close(fd);
        return r;
    }
    if (memcmp(header, magic, 4) != 0 || get_u32(header + 4) != FORMAT_VERSION ||
        get_u32(header + 8) != kind || get_u32(header + 12) != 0 ||
        get_u64(header + 16) != length || get_u64(header + 24) != checksum(data, length))
        goto corrupt;
    data[length] = '\0';

    if (touch)
        futimens(fd, NULL);     /* failure only costs LRU accuracy */
    close(fd);
    *payload = data;
    *len = length;
    if (st_out)
        *st_out = st;
    return 0;

corrupt:
    free(data);
    close(fd);
    discard(disk, rel, &st, kind == KIND_BODY, locked);
    return -ENOENT;
}

/* ------------------------------------------------------ directory walking */

static DIR *open_dir_at(int parent_fd, const char *name)
{
    int fd = openat(parent_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    DIR *dir = fdopendir(fd);
    if (!dir)
        close(fd);
    return dir;
}

/* Calls visit for every body file in DIR/m (regular files named by digits,
 * or pack files, in directories named by digits in directories named by
 * hashes), with its
 * path relative to DIR.  Never follows a symlink.  Directories vanishing
 * meanwhile (a drop) are skipped.  0, -errno if DIR/m cannot be read, or
 * what visit returned when nonzero (which stops the walk). */
static int walk_bodies(int dir_fd, int (*visit)(void *ctx, const char *rel, const struct stat *st),
                       void *ctx)
{
    DIR *m = open_dir_at(dir_fd, "m");
    if (!m)
        return -errno;
    int r = 0;
    struct dirent *mailbox_entry;
    while (r == 0 && (mailbox_entry = readdir(m))) {
        if (!is_hash_name(mailbox_entry->d_name))
            continue;
        DIR *mailbox = open_dir_at(dirfd(m), mailbox_entry->d_name);
        if (!mailbox)
            continue;
        struct dirent *uidvalidity_entry;
        while (r == 0 && (uidvalidity_entry = readdir(mailbox))) {
            if (!is_number_name(uidvalidity_entry->d_name))
                continue;
            DIR *uidvalidity = open_dir_at(dirfd(mailbox), uidvalidity_entry->d_name);
            if (!uidvalidity)
                continue;
            struct dirent *body_entry;
            while (r == 0 && (body_entry = readdir(uidvalidity))) {
                if (!is_body_name(body_entry->d_name))
                    continue;
                if (body_entry->d_type != DT_REG && body_entry->d_type != DT_UNKNOWN)
                    continue;
                struct stat st;
                if (fstatat(dirfd(uidvalidity), body_entry->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
                    !S_ISREG(st.st_mode))
                    continue;
                /* The names were checked: 16, at most 10 and 17 characters. */
                char rel[REL_MAX];
                snprintf(rel, sizeof rel, "m/%.16s/%.10s/%.17s", mailbox_entry->d_name,
                         uidvalidity_entry->d_name, body_entry->d_name);
                r = visit(ctx, rel, &st);
            }
            closedir(uidvalidity);
        }
        closedir(mailbox);
    }
    closedir(m);
    return r;
}

/* What a directory being removed is, for counting its bodies. */
enum tree_role {
    ROLE_PLAIN,         /* nothing counted */
    ROLE_MAILBOX,       /* a DIR/m/HASH: its digit-named directories hold bodies */
    ROLE_UIDVALIDITY,   /* digit-named regular files and packs are bodies */
};

/* Deep enough for anything we create (a mailbox is three levels); a deeper
 * tree is not ours and is left alone rather than risking the stack. */
#define REMOVE_DEPTH_MAX 8

/* Removes everything inside the directory fd (taken over and closed),
 * never following a symlink, adding body sizes to *body_bytes.  Entries are
 * read again until none are left, because whether a readdir in progress
 * sees past entries removed under it is unspecified. */
static void remove_contents(int fd, enum tree_role role, int depth, uint64_t *body_bytes)
{
    DIR *dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return;
    }
    for (int pass = 0; pass < 4; pass++) {
        bool found = false;
        struct dirent *entry;
        while ((entry = readdir(dir))) {
            const char *name = entry->d_name;
            if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                continue;
            found = true;
            struct stat st;
            if (fstatat(dirfd(dir), name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                continue;
            if (S_ISDIR(st.st_mode)) {
                if (depth >= REMOVE_DEPTH_MAX)
                    continue;
                int child = openat(dirfd(dir), name,
                                   O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (child < 0)
                    continue;
                enum tree_role child_role =
                    role == ROLE_MAILBOX && is_number_name(name) ? ROLE_UIDVALIDITY : ROLE_PLAIN;
                remove_contents(child, child_role, depth + 1, body_bytes);
                unlinkat(dirfd(dir), name, AT_REMOVEDIR);
            } else if (unlinkat(dirfd(dir), name, 0) == 0 && role == ROLE_UIDVALIDITY &&
                       S_ISREG(st.st_mode) && is_body_name(name) && body_bytes) {
                *body_bytes += (uint64_t)st.st_size;
            }
        }
        if (!found)
            break;
        rewinddir(dir);
    }
    closedir(dir);
}

/* Removes DIR/rel, a directory, and everything in it. */
static void remove_tree(struct cache_disk *disk, const char *rel, enum tree_role role,
                        uint64_t *body_bytes)
{
    int fd = openat(disk->dir_fd, rel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        unlinkat(disk->dir_fd, rel, 0);     /* a file or a symlink: just the name */
        return;
    }
    remove_contents(fd, role, 1, body_bytes);
    unlinkat(disk->dir_fd, rel, AT_REMOVEDIR);
}

/* Moves DIR/m/HASH out of the way into DIR/tmp, where no load, save or
 * eviction will look for its files.  Caller holds the lock.  1 and the new
 * name in detached, 0 if there was nothing, or -errno. */
static int detach_mailbox_locked(struct cache_disk *disk, uint64_t hash, char *detached)
{
    char rel[REL_MAX];
    mailbox_rel(rel, hash);
    temp_rel(disk, detached);
    if (renameat(disk->dir_fd, rel, disk->dir_fd, detached) == 0)
        return 1;
    return errno == ENOENT ? 0 : -errno;
}

/* Removes a detached mailbox directory and takes its bodies off the count.
 * Called without the lock. */
static void remove_detached(struct cache_disk *disk, const char *detached)
{
    uint64_t bytes = 0;
    remove_tree(disk, detached, ROLE_MAILBOX, &bytes);
    lock_disk(disk);
    usage_subtract_locked(disk, bytes);
    unlock_disk(disk);
}

/* ------------------------------------------------------------ ownership */

enum ownership { OWNED_BY_NOBODY, OWNED_BY_MAILBOX, OWNED_BY_OTHER };

static void groups_free(struct pack_group *group);

/* The owner of mailbox hash, if known.  Caller holds the lock. */
static struct owner *owner_locked(struct cache_disk *disk, uint64_t hash)
{
    struct owner *owner;
    HASH_FIND(hh, disk->owners, &hash, sizeof hash, owner);
    return owner;
}

static void forget_owner_locked(struct cache_disk *disk, uint64_t hash)
{
    struct owner *owner = owner_locked(disk, hash);
    if (owner) {
        HASH_DEL(disk->owners, owner);
        groups_free(owner->groups);
        free(owner->mailbox);
        free(owner);
    }
}

/* Records that DIR/m/HASH belongs to mailbox (taken over).  Out of memory
 * only means the name file is read again next time. */
static void remember_owner_locked(struct cache_disk *disk, uint64_t hash, char *mailbox)
{
    forget_owner_locked(disk, hash);
    struct owner *owner = malloc(sizeof *owner);
    if (!owner) {
        free(mailbox);
        return;
    }
    owner->hash = hash;
    owner->mailbox = mailbox;
    owner->groups = NULL;
    HASH_ADD(hh, disk->owners, hash, sizeof owner->hash, owner);
    if (!owner->hh.tbl) {
        free(owner->mailbox);
        free(owner);
    }
}

/* Whose DIR/m/HASH is: from memory, else from its name file (a directory
 * without a valid name file belongs to nobody).  Caller holds the lock: the
 * name file is only ever written under it, and only once per mailbox. */
static enum ownership ownership_locked(struct cache_disk *disk, uint64_t hash, const char *mailbox)
{
    struct owner *owner = owner_locked(disk, hash);
    if (owner)
        return strcmp(owner->mailbox, mailbox) == 0 ? OWNED_BY_MAILBOX : OWNED_BY_OTHER;

    char rel[REL_MAX];
    snprintf(rel, sizeof rel, "m/%016" PRIx64 "/name", hash);
    char *name;
    size_t len;
    if (load_file(disk, rel, KIND_NAME, false, true, &name, &len, NULL) != 0)
        return OWNED_BY_NOBODY;
    if (len == 0 || memchr(name, '\0', len)) {
        free(name);
        return OWNED_BY_NOBODY;
    }
    enum ownership result = strcmp(name, mailbox) == 0 ? OWNED_BY_MAILBOX : OWNED_BY_OTHER;
    remember_owner_locked(disk, hash, name);
    return result;
}

static bool owned(struct cache_disk *disk, uint64_t hash, const char *mailbox)
{
    lock_disk(disk);
    enum ownership result = ownership_locked(disk, hash, mailbox);
    unlock_disk(disk);
    return result == OWNED_BY_MAILBOX;
}

/* Makes DIR/m/HASH mailbox's directory: if it is someone else's (a hash
 * collision) or nobody's (a name file never written, or torn), what is in it
 * is removed and a new one made with mailbox's name file.  0 or -errno. */
static int claim_mailbox(struct cache_disk *disk, uint64_t hash, const char *mailbox)
{
    char rel[REL_MAX], name_rel[REL_MAX], detached[REL_MAX];
    mailbox_rel(rel, hash);
    snprintf(name_rel, sizeof name_rel, "m/%016" PRIx64 "/name", hash);

    lock_disk(disk);
    if (ownership_locked(disk, hash, mailbox) == OWNED_BY_MAILBOX) {
        unlock_disk(disk);
        return 0;
    }
    forget_owner_locked(disk, hash);
    int r = detach_mailbox_locked(disk, hash, detached);
    bool was_detached = r == 1;
    if (r >= 0) {
        r = 0;
        if (mkdirat(disk->dir_fd, rel, 0700) < 0 && errno != EEXIST)
            r = -errno;
    }
    if (r == 0)
        r = write_file(disk, name_rel, KIND_NAME, mailbox, strlen(mailbox));
    if (r == 0) {
        char *copy = strdup(mailbox);
        if (copy)
            remember_owner_locked(disk, hash, copy);
    }
    unlock_disk(disk);

    if (was_detached)
        remove_detached(disk, detached);
    return r;
}

/* ------------------------------------------------------------ pack files */

/* A scan fetches bodies 128 at a time, and one file per body cost more CPU
 * than the whole fetch: creating 10,000 inodes on ext4 (more still right
 * after deletes, when every new inode is checked against recently freed
 * ones).  So bodies saved together go into one pack file,
 * DIR/m/HASH/UIDVALIDITY/pXXXXXXXXXXXXXXXX (16 hex digits, never reused):
 *
 *   header   as every file, kind KIND_PACK; its length and checksum cover
 *            the table of contents only, so indexing a pack reads no body
 *   toc      u64 count, then count times: u32 uid, u32 length, u64 checksum
 *   bodies   one after another, in toc order, nothing between them
 *
 * The file's size must be exactly header + toc + the lengths, so a torn
 * tail is caught when the pack is indexed; a torn body is caught by its own
 * checksum when it is loaded.  Either way the whole pack goes (it was
 * written at once, so its neighbours are suspect too) and its bodies are
 * fetched again.
 *
 * A pack is evicted, touched and counted as one body file.  Where each
 * body is lives in memory, per mailbox and UIDVALIDITY: an open-addressed
 * table of uid -> (pack, offset, length, checksum), or uid -> LOOSE for a
 * body in a file of its own, read from the directory and the tables of
 * contents the first time the UIDVALIDITY is used in a mount and kept
 * current by saves, evictions and drops, all under the lock.  A body in
 * neither is a miss without an open: a scan's misses are most of its
 * loads, and each failed open left a negative dentry behind (10,000 per
 * cold grep), slowing every path lookup on the machine.  A UID recorded
 * twice (in two packs, or a pack and its own file) is found where it was
 * recorded last; bodies never change, so either is right.  A loose entry
 * stays when its file goes (eviction, a torn file): the load finds nothing
 * and the body is fetched again, as it is when memory for an entry runs
 * out. */

#define PACK_ENTRY_SIZE 16
#define PACK_MAX_ITEMS 512
#define LOOSE (UINT32_MAX - 1)  /* pack_entry.pack of a body in a file of its own */
#define NO_PACK UINT32_MAX      /* entries_rebuild: drop none */

struct pack_entry {
    uint32_t uid;       /* 0: a free slot (UIDs start at 1) */
    uint32_t pack;      /* index into group->packs */
    uint32_t offset, length;
    uint64_t sum;
};

struct pack_file {
    char name[18];      /* "p" + 16 hex digits; "" once removed */
    time_t touched;     /* monotonic second we last set its mtime, 0 never */
};

struct pack_group {
    uint32_t uidvalidity;
    struct pack_entry *slots;   /* capacity a power of two, at most half full */
    size_t capacity, count;
    struct pack_file *packs;
    size_t pack_count, pack_capacity;
    struct pack_group *next;
};

static void groups_free(struct pack_group *group)
{
    while (group) {
        struct pack_group *next = group->next;
        free(group->slots);
        free(group->packs);
        free(group);
        group = next;
    }
}

static size_t slot_index(const struct pack_group *group, uint32_t uid)
{
    return (size_t)((uid * 0x9e3779b97f4a7c15ull) >> 32) & (group->capacity - 1);
}

static struct pack_entry *entry_find(const struct pack_group *group, uint32_t uid)
{
    if (!group->capacity)
        return NULL;
    for (size_t i = slot_index(group, uid);; i = (i + 1) & (group->capacity - 1)) {
        if (group->slots[i].uid == uid)
            return &group->slots[i];
        if (group->slots[i].uid == 0)
            return NULL;
    }
}

/* Rebuilds the table with room for at least want entries, leaving out the
 * entries of pack drop_pack (NO_PACK: none).  0 or -ENOMEM (unchanged). */
static int entries_rebuild(struct pack_group *group, size_t want, uint32_t drop_pack)
{
    size_t capacity = 64;
    while (capacity < want * 2)
        capacity *= 2;
    struct pack_entry *slots = calloc(capacity, sizeof *slots);
    if (!slots)
        return -ENOMEM;
    struct pack_entry *old = group->slots;
    size_t old_capacity = group->capacity;
    group->slots = slots;
    group->capacity = capacity;
    group->count = 0;
    for (size_t i = 0; i < old_capacity; i++) {
        if (old[i].uid == 0 || old[i].pack == drop_pack)
            continue;
        size_t j = slot_index(group, old[i].uid);
        while (slots[j].uid != 0)
            j = (j + 1) & (capacity - 1);
        slots[j] = old[i];
        group->count++;
    }
    free(old);
    return 0;
}

/* Records where uid is, replacing what was known.  0 or -ENOMEM. */
static int entry_put(struct pack_group *group, const struct pack_entry *entry)
{
    struct pack_entry *found = entry_find(group, entry->uid);
    if (found) {
        *found = *entry;
        return 0;
    }
    if ((group->count + 1) * 2 > group->capacity &&
        entries_rebuild(group, group->count + 1, NO_PACK) < 0)
        return -ENOMEM;
    size_t i = slot_index(group, entry->uid);
    while (group->slots[i].uid != 0)
        i = (i + 1) & (group->capacity - 1);
    group->slots[i] = *entry;
    group->count++;
    return 0;
}

/* Appends a pack to the group; its index, or -ENOMEM. */
static int64_t pack_add(struct pack_group *group, const char *name)
{
    if (group->pack_count == LOOSE)
        return -ENOMEM;
    if (group->pack_count == group->pack_capacity) {
        struct pack_file *packs = grow(group->packs, &group->pack_capacity, sizeof *packs, 16);
        if (!packs)
            return -ENOMEM;
        group->packs = packs;
    }
    struct pack_file *pack = &group->packs[group->pack_count];
    snprintf(pack->name, sizeof pack->name, "%s", name);
    pack->touched = 0;
    return (int64_t)group->pack_count++;
}

/* Forgets a pack: its name, and the entries that point into it. */
static void pack_forget(struct pack_group *group, const char *name)
{
    for (size_t i = 0; i < group->pack_count; i++)
        if (strcmp(group->packs[i].name, name) == 0) {
            group->packs[i].name[0] = '\0';
            /* Out of memory: the entries stay, and a load of one finds the
             * file gone (-ENOENT), which is what a forgotten entry gives. */
            entries_rebuild(group, group->count, (uint32_t)i);
            return;
        }
}

/* One body of a pack, as its table of contents gives it. */
struct pack_item {
    uint32_t uid, length;
    uint64_t offset, sum;
};

/* Records that the pack name holds items.  Out of memory, some are left
 * out: those bodies are fetched again. */
static void pack_index_items(struct pack_group *group, const char *name,
                             const struct pack_item *items, size_t count)
{
    int64_t pack = pack_add(group, name);
    for (size_t i = 0; pack >= 0 && i < count; i++) {
        struct pack_entry entry = {.uid = items[i].uid, .pack = (uint32_t)pack,
                                   .offset = (uint32_t)items[i].offset,
                                   .length = items[i].length, .sum = items[i].sum};
        if (entry_put(group, &entry) < 0)
            break;
    }
}

/* Reads and checks the table of contents of the pack at DIR/rel (fd open
 * on it, st its stat).  0 with *items malloc'd, -ENOENT if it is not a
 * well-formed pack of exactly its size, another -errno if unreadable. */
static int pack_read_toc(int fd, const struct stat *st, struct pack_item **items, size_t *count)
{
    *items = NULL;
    *count = 0;
    unsigned char header[HEADER_SIZE];
    ssize_t n = pread(fd, header, HEADER_SIZE, 0);
    if (n < 0)
        return -errno;
    uint64_t size = (uint64_t)st->st_size;
    if (n != HEADER_SIZE || memcmp(header, magic, 4) != 0 ||
        get_u32(header + 4) != FORMAT_VERSION || get_u32(header + 8) != KIND_PACK ||
        get_u32(header + 12) != 0)
        return -ENOENT;
    uint64_t toc_len = get_u64(header + 16);
    if (toc_len < 8 || (toc_len - 8) % PACK_ENTRY_SIZE != 0 ||
        (toc_len - 8) / PACK_ENTRY_SIZE > PACK_MAX_ITEMS || toc_len > size - HEADER_SIZE)
        return -ENOENT;
    unsigned char *toc = malloc(toc_len);
    if (!toc)
        return -ENOMEM;
    n = pread(fd, toc, toc_len, HEADER_SIZE);
    if (n < 0) {
        int r = -errno;
        free(toc);
        return r;
    }
    size_t entries = (toc_len - 8) / PACK_ENTRY_SIZE;
    if ((uint64_t)n != toc_len || get_u64(header + 24) != checksum(toc, toc_len) ||
        get_u64(toc) != entries || entries == 0) {
        free(toc);
        return -ENOENT;
    }
    struct pack_item *list = calloc(entries, sizeof *list);
    if (!list) {
        free(toc);
        return -ENOMEM;
    }
    uint64_t offset = HEADER_SIZE + toc_len;
    for (size_t i = 0; i < entries; i++) {
        const unsigned char *e = toc + 8 + i * PACK_ENTRY_SIZE;
        list[i].uid = get_u32(e);
        list[i].length = get_u32(e + 4);
        list[i].sum = get_u64(e + 8);
        list[i].offset = offset;
        offset += list[i].length;
        if (list[i].uid == 0 || offset > size || offset > UINT32_MAX) {
            free(toc);
            free(list);
            return -ENOENT;
        }
    }
    free(toc);
    if (offset != size) {
        free(list);
        return -ENOENT;
    }
    *items = list;
    *count = entries;
    return 0;
}

/* Indexes the pack DIR/rel (named name) into group; a pack that fails its
 * checks is removed.  Caller holds the lock. */
static void pack_index_locked(struct cache_disk *disk, struct pack_group *group, const char *rel,
                              const char *name)
{
    int fd = openat(disk->dir_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (fd < 0) {
        if (errno == ELOOP && fstatat(disk->dir_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0)
            discard(disk, rel, &st, false, true);
        return;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return;
    }
    struct pack_item *items;
    size_t count;
    int r = pack_read_toc(fd, &st, &items, &count);
    close(fd);
    if (r == -ENOENT)
        discard(disk, rel, &st, true, true);
    if (r != 0)
        return;
    pack_index_items(group, name, items, count);
    free(items);
}

/* owner's index of a UIDVALIDITY if it has been read, else NULL. */
static struct pack_group *group_read(const struct owner *owner, uint32_t uidvalidity)
{
    for (struct pack_group *group = owner ? owner->groups : NULL; group; group = group->next)
        if (group->uidvalidity == uidvalidity)
            return group;
    return NULL;
}

/* The pack index of mailbox hash's UIDVALIDITY, read from disk the first
 * time.  NULL if the mailbox is not known to be ours (see ownership_locked)
 * or out of memory.  Caller holds the lock. */
static struct pack_group *group_locked(struct cache_disk *disk, uint64_t hash,
                                       uint32_t uidvalidity)
{
    struct owner *owner = owner_locked(disk, hash);
    if (!owner)
        return NULL;
    struct pack_group *group = group_read(owner, uidvalidity);
    if (group)
        return group;
    group = calloc(1, sizeof *group);
    if (!group)
        return NULL;
    group->uidvalidity = uidvalidity;
    char dir_rel[REL_MAX];
    uidvalidity_rel(dir_rel, hash, uidvalidity);
    DIR *dir = open_dir_at(disk->dir_fd, dir_rel);
    if (dir) {
        struct dirent *entry;
        while ((entry = readdir(dir)))
            if (is_pack_name(entry->d_name)) {
                char rel[REL_MAX];
                snprintf(rel, sizeof rel, "m/%016" PRIx64 "/%" PRIu32 "/%.17s", hash,
                         uidvalidity, entry->d_name);
                pack_index_locked(disk, group, rel, entry->d_name);
            } else if (is_number_name(entry->d_name)) {
                unsigned long long uid = strtoull(entry->d_name, NULL, 10);
                struct pack_entry loose = {.uid = (uint32_t)uid, .pack = LOOSE};
                if (uid > 0 && uid <= UINT32_MAX)
                    entry_put(group, &loose);
            }
        closedir(dir);
    }
    group->next = owner->groups;
    owner->groups = group;
    return group;
}

/* Where a body is: its entry, and the path of its pack or of its own file
 * (entry pack LOOSE).  For a pack, with touch, also whether the reader
 * should set the pack's mtime (the LRU order): once a second is enough,
 * where a scan reads up to 512 bodies of one pack.  Caller holds the lock
 * and has checked the mailbox is ours. */
static bool body_lookup_locked(struct cache_disk *disk, uint64_t hash, uint32_t uidvalidity,
                               uint32_t uid, char *rel, struct pack_entry *found, bool *touch)
{
    struct pack_group *group = group_locked(disk, hash, uidvalidity);
    struct pack_entry *entry = group ? entry_find(group, uid) : NULL;
    if (!entry)
        return false;
    *found = *entry;
    if (entry->pack == LOOSE) {
        body_rel(rel, hash, uidvalidity, uid);
        return true;
    }
    struct pack_file *pack = &group->packs[entry->pack];
    snprintf(rel, REL_MAX, "m/%016" PRIx64 "/%" PRIu32 "/%s", hash, uidvalidity, pack->name);
    if (touch) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
        *touch = pack->touched != now.tv_sec;
        pack->touched = now.tv_sec;
    }
    return true;
}

/* After DIR/rel, a pack, was removed: forget it.  Caller holds the lock. */
static void pack_removed_locked(struct cache_disk *disk, const char *rel)
{
    uint64_t hash;
    uint32_t uidvalidity;
    char name[18];
    if (sscanf(rel, "m/%16" SCNx64 "/%" SCNu32 "/%17s", &hash, &uidvalidity, name) != 3 ||
        !is_pack_name(name))
        return;
    struct pack_group *group = group_read(owner_locked(disk, hash), uidvalidity);
    if (group)
        pack_forget(group, name);
}

/* Reads one packed body (see cache_disk_body_load).  A body failing its
 * checksum, or a pack shorter than its index says, removes the pack. */
static int pack_load(struct cache_disk *disk, const char *rel, const struct pack_entry *entry,
                     bool touch, char **data, size_t *len)
{
    int fd = openat(disk->dir_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return errno == ENOENT || errno == ENOTDIR || errno == ELOOP ? -ENOENT : -errno;
    char *body = malloc((size_t)entry->length + 1);
    if (!body) {
        close(fd);
        return -ENOMEM;
    }
    ssize_t n = pread(fd, body, entry->length, entry->offset);
    if (n < 0) {
        int r = -errno;
        free(body);
        close(fd);
        return r;
    }
    if ((size_t)n != entry->length || checksum(body, entry->length) != entry->sum) {
        struct stat st;
        if (fstat(fd, &st) == 0) {
            lock_disk(disk);
            discard(disk, rel, &st, true, true);
            pack_removed_locked(disk, rel);
            unlock_disk(disk);
        }
        free(body);
        close(fd);
        return -ENOENT;
    }
    if (touch)
        futimens(fd, NULL);     /* the LRU order; failure only costs accuracy */
    close(fd);
    body[entry->length] = '\0';
    *data = body;
    *len = entry->length;
    return 0;
}

/* -------------------------------------------------------------- eviction */

struct victim {
    struct timespec mtime;
    uint64_t size;
    dev_t dev;
    ino_t ino;
    char rel[REL_MAX];
};

struct victims {
    struct victim *items;
    size_t count, capacity;
};

static int collect_victim(void *ctx, const char *rel, const struct stat *st)
{
    struct victims *victims = ctx;
    if (victims->count == victims->capacity) {
        struct victim *items = grow(victims->items, &victims->capacity, sizeof *items, 1024);
        if (!items)
            return -ENOMEM;
        victims->items = items;
    }
    struct victim *victim = &victims->items[victims->count++];
    victim->mtime = st->st_mtim;
    victim->size = (uint64_t)st->st_size;
    victim->dev = st->st_dev;
    victim->ino = st->st_ino;
    snprintf(victim->rel, sizeof victim->rel, "%s", rel);
    return 0;
}

static int compare_victims(const void *a, const void *b)
{
    const struct victim *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec)
        return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec)
        return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return strcmp(x->rel, y->rel);
}

/* One pass: removes least recently used bodies until the count is at 80 %
 * of max_bytes (all of them when max_bytes is 0).  Returns how many it
 * removed. */
static size_t evict_pass(struct cache_disk *disk)
{
    struct victims victims = {0};
    uint64_t target = low_water(disk);
    size_t removed = 0;

    /* On out of memory mid-walk, evict from what was collected. */
    walk_bodies(disk->dir_fd, collect_victim, &victims);
    if (victims.count > 1)
        qsort(victims.items, victims.count, sizeof *victims.items, compare_victims);

    for (size_t i = 0; i < victims.count; i++) {
        const struct victim *victim = &victims.items[i];
        lock_disk(disk);
        if (disk->usage <= target) {
            unlock_disk(disk);
            break;
        }
        struct stat st;
        if (fstatat(disk->dir_fd, victim->rel, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            S_ISREG(st.st_mode) && st.st_dev == victim->dev && st.st_ino == victim->ino &&
            st.st_mtim.tv_sec == victim->mtime.tv_sec &&
            st.st_mtim.tv_nsec == victim->mtime.tv_nsec &&
            unlinkat(disk->dir_fd, victim->rel, 0) == 0) {
            usage_subtract_locked(disk, (uint64_t)st.st_size);
            pack_removed_locked(disk, victim->rel);
            removed++;
        }
        unlock_disk(disk);
    }
    free(victims.items);
    return removed;
}

/* Evicts until the count is within max_bytes.  The caller has set
 * disk->evicting, and saves meanwhile leave the work to us; so the check
 * that clears the flag is made under the lock together with it, and if
 * those saves took the count over the limit again, another pass runs.  A
 * pass that removes nothing (every body in use, or unremovable) ends it;
 * the next save tries again. */
static void evict(struct cache_disk *disk)
{
    for (;;) {
        size_t removed = evict_pass(disk);
        lock_disk(disk);
        if (disk->usage <= disk->max_bytes || removed == 0) {
            disk->evicting = false;
            unlock_disk(disk);
            return;
        }
        unlock_disk(disk);
    }
}

/* ------------------------------------------------------------------ open */

static int add_usage(void *ctx, const char *rel, const struct stat *st)
{
    (void)rel;
    *(uint64_t *)ctx += (uint64_t)st->st_size;
    return 0;
}

/* mkdir -p with 0700 for whatever is missing; existing parents are left as
 * they are.  0 or -errno. */
static int make_dirs(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return -ENOMEM;
    int r = 0;
    for (char *p = copy + 1; ; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(copy, 0700) < 0 && errno != EEXIST) {
            r = -errno;
            break;
        }
        *p = saved;
        if (saved == '\0')
            break;
    }
    free(copy);
    return r;
}

static int make_subdir(int dir_fd, const char *name)
{
    if (mkdirat(dir_fd, name, 0700) < 0 && errno != EEXIST)
        return -errno;
    /* Must be a real directory, not a symlink left by someone. */
    int fd = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    close(fd);
    return 0;
}

struct cache_disk *cache_disk_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen)
{
    char scratch[1];
    if (!err || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    if (!dir || !*dir) {
        snprintf(err, errlen, "no cache directory given");
        return NULL;
    }

    int r = make_dirs(dir);
    if (r != 0) {
        snprintf(err, errlen, "cannot create the cache directory %s: %s", dir, strerror(-r));
        return NULL;
    }
    int dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd < 0) {
        snprintf(err, errlen, "cannot open the cache directory %s: %s", dir, strerror(errno));
        return NULL;
    }
    /* Checked on what was opened, so a symlink to a directory is judged by
     * the directory. */
    struct stat st;
    if (fstat(dir_fd, &st) < 0) {
        snprintf(err, errlen, "cannot examine the cache directory %s: %s", dir, strerror(errno));
        close(dir_fd);
        return NULL;
    }
    if (st.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "the cache directory %s belongs to uid %u, not to you (uid %u); "
                 "choose a directory of your own",
                 dir, (unsigned)st.st_uid, (unsigned)geteuid());
        close(dir_fd);
        return NULL;
    }
    if (st.st_mode & 077) {
        snprintf(err, errlen,
                 "the cache directory %s is open to group or others (mode %04o); "
                 "it holds your mail: chmod 700 it",
                 dir, (unsigned)(st.st_mode & 07777));
        close(dir_fd);
        return NULL;
    }

    int lock_fd = openat(dir_fd, "lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (lock_fd < 0) {
        snprintf(err, errlen, "cannot create %s/lock: %s", dir, strerror(errno));
        close(dir_fd);
        return NULL;
    }
    if (flock(lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK)
            snprintf(err, errlen, "the cache directory %s is in use by another imapfs", dir);
        else
            snprintf(err, errlen, "cannot lock %s/lock: %s", dir, strerror(errno));
        close(lock_fd);
        close(dir_fd);
        return NULL;
    }

    const char *subdir = "m";
    r = make_subdir(dir_fd, subdir);
    if (r == 0) {
        subdir = "tmp";
        r = make_subdir(dir_fd, subdir);
    }
    if (r != 0) {
        snprintf(err, errlen, "cannot create %s/%s: %s", dir, subdir, strerror(-r));
        close(lock_fd);
        close(dir_fd);
        return NULL;
    }

    struct cache_disk *disk = calloc(1, sizeof *disk);
    if (!disk || pthread_mutex_init(&disk->lock, NULL) != 0 ||
        pthread_mutex_init(&disk->direct_lock, NULL) != 0) {
        snprintf(err, errlen, "out of memory");
        free(disk);
        close(lock_fd);
        close(dir_fd);
        return NULL;
    }
    disk->dir_fd = dir_fd;
    disk->lock_fd = lock_fd;
    disk->max_bytes = max_bytes;
    disk->pid = (long)getpid();
    /* Pack names are this plus a counter: a later open starts far past
     * any name an earlier one used (and a clash is refused, not replaced). */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    disk->pack_seed = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;

    /* Temporary files and detached mailboxes of an earlier run that ended
     * before renaming or removing them. */
    int tmp_fd = openat(dir_fd, "tmp", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (tmp_fd >= 0)
        remove_contents(tmp_fd, ROLE_PLAIN, 1, NULL);

    uint64_t usage = 0;
    r = walk_bodies(dir_fd, add_usage, &usage);
    if (r != 0) {
        snprintf(err, errlen, "cannot read %s/m: %s", dir, strerror(-r));
        cache_disk_close(disk);
        return NULL;
    }
    disk->usage = usage;
    /* A smaller limit than last time, or 0: keep what the limit says now. */
    if (usage > max_bytes) {
        disk->evicting = true;
        evict(disk);
    }
    return disk;
}

void cache_disk_close(struct cache_disk *disk)
{
    if (!disk)
        return;
    struct owner *owner, *next;
    HASH_ITER(hh, disk->owners, owner, next) {
        HASH_DEL(disk->owners, owner);
        groups_free(owner->groups);
        free(owner->mailbox);
        free(owner);
    }
    pthread_mutex_destroy(&disk->lock);
    pthread_mutex_destroy(&disk->direct_lock);
    free(disk->direct_buffer);
    close(disk->lock_fd);   /* releases the flock */
    close(disk->dir_fd);
    free(disk);
}

/* ---------------------------------------------------------------- bodies */

int cache_disk_body_load(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                         uint32_t uid, char **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    if (disk->max_bytes == 0)
        return -ENOENT;
    uint64_t hash = mailbox_hash(mailbox);
    char rel[REL_MAX];
    struct pack_entry entry;
    bool touch = false;
    lock_disk(disk);
    bool found = ownership_locked(disk, hash, mailbox) == OWNED_BY_MAILBOX &&
                 body_lookup_locked(disk, hash, uidvalidity, uid, rel, &entry, &touch);
    unlock_disk(disk);
    if (!found)
        return -ENOENT;
    if (entry.pack != LOOSE)
        return pack_load(disk, rel, &entry, touch, data, len);
    return load_file(disk, rel, KIND_BODY, true, false, data, len, NULL);
}

/* Counts a body file just installed.  *evict_now: this took the count
 * over the limit and no one is evicting yet.  Caller holds the lock. */
static void count_body_locked(struct cache_disk *disk, uint64_t file_size, bool *evict_now)
{
    disk->usage += file_size;
    if (disk->usage > disk->max_bytes && !disk->evicting) {
        disk->evicting = true;
        *evict_now = true;
    }
}

/* Puts a finished temp file in place and counts it; called with the lock
 * held.  -ENOENT: its UIDVALIDITY directory is missing. */
typedef int install_fn(struct cache_disk *disk, const char *temp, const void *what,
                       bool *evict_now);

/* Installs temp, a body file or a pack of mailbox's uidvalidity, with
 * install; removes it if that fails.  0 or -errno; -ENOENT when a drop of
 * the same mailbox kept winning. */
static int install_temp(struct cache_disk *disk, const char *mailbox, uint64_t hash,
                        uint32_t uidvalidity, const char *temp, install_fn *install,
                        const void *what)
{
    char uidvalidity_dir[REL_MAX];
    uidvalidity_rel(uidvalidity_dir, hash, uidvalidity);
    bool evict_now = false;
    int r = 0;
    /* Usually the first attempt succeeds.  The first body of a UIDVALIDITY
     * needs its directory made; a drop of the same mailbox meanwhile needs
     * the mailbox claimed again, then the directory made. */
    for (int attempt = 0; attempt < 4; attempt++) {
        r = claim_mailbox(disk, hash, mailbox);
        if (r != 0)
            break;
        lock_disk(disk);
        r = install(disk, temp, what, &evict_now);
        unlock_disk(disk);
        if (r != -ENOENT)
            break;
        if (mkdirat(disk->dir_fd, uidvalidity_dir, 0700) < 0) {
            if (errno == ENOENT) {
                /* The mailbox directory is gone: claim it again. */
                lock_disk(disk);
                forget_owner_locked(disk, hash);
                unlock_disk(disk);
            } else if (errno != EEXIST) {
                r = -errno;
                break;
            }
        }
    }
    if (r != 0) {
        unlinkat(disk->dir_fd, temp, 0);
        return r;
    }
    if (evict_now)
        evict(disk);
    return 0;
}

struct body_install {
    const char *rel;
    uint64_t file_size;
    uint64_t hash;
    uint32_t uidvalidity, uid;
};

/* install_fn of a body file: renamed over DIR/rel, counted less whatever
 * body it replaced. */
static int install_body_locked(struct cache_disk *disk, const char *temp, const void *what,
                               bool *evict_now)
{
    const struct body_install *body = what;
    uint64_t replaced = 0;
    struct stat st;
    if (fstatat(disk->dir_fd, body->rel, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode))
        replaced = (uint64_t)st.st_size;
    if (renameat(disk->dir_fd, temp, disk->dir_fd, body->rel) < 0)
        return -errno;
    usage_subtract_locked(disk, replaced);
    count_body_locked(disk, body->file_size, evict_now);
    /* A group not read yet finds the file when it is; out of memory for
     * the entry, the body is fetched again. */
    struct pack_group *group = group_read(owner_locked(disk, body->hash), body->uidvalidity);
    struct pack_entry loose = {.uid = body->uid, .pack = LOOSE};
    if (group)
        entry_put(group, &loose);
    return 0;
}

int cache_disk_body_save(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                         uint32_t uid, const char *data, size_t len)
{
    /* A body bigger than 80 % of the limit would push out every other body,
     * then itself: keeping it costs more than fetching it again. */
    if (len > SIZE_MAX - HEADER_SIZE || HEADER_SIZE + (uint64_t)len > low_water(disk))
        return 0;

    uint64_t hash = mailbox_hash(mailbox);
    char rel[REL_MAX], temp[REL_MAX];
    body_rel(rel, hash, uidvalidity, uid);
    int r = write_temp(disk, KIND_BODY, data, len, temp);
    if (r != 0)
        return r;
    struct body_install body = {.rel = rel, .file_size = HEADER_SIZE + (uint64_t)len,
                                .hash = hash, .uidvalidity = uidvalidity, .uid = uid};
    return install_temp(disk, mailbox, hash, uidvalidity, temp, install_body_locked, &body);
}

struct pack_install {
    uint64_t hash;
    uint32_t uidvalidity;
    const struct pack_item *items;
    size_t count;
    uint64_t file_size;
};

/* install_fn of a pack: renamed into its UIDVALIDITY directory under a
 * name never used, counted, and its bodies indexed. */
static int install_pack_locked(struct cache_disk *disk, const char *temp, const void *what,
                               bool *evict_now)
{
    const struct pack_install *pack = what;
    /* Indexed before the rename, so the new pack is not read back in. */
    struct pack_group *group = group_locked(disk, pack->hash, pack->uidvalidity);
    char name[18], rel[REL_MAX];
    int r;
    do {
        uint64_t n = __atomic_fetch_add(&disk->temp_counter, 1, __ATOMIC_RELAXED);
        snprintf(name, sizeof name, "p%016" PRIx64, disk->pack_seed + n);
        snprintf(rel, sizeof rel, "m/%016" PRIx64 "/%" PRIu32 "/%s", pack->hash,
                 pack->uidvalidity, name);
        r = renameat2(disk->dir_fd, temp, disk->dir_fd, rel, RENAME_NOREPLACE) < 0 ? -errno : 0;
    } while (r == -EEXIST);
    if (r != 0)
        return r;
    count_body_locked(disk, pack->file_size, evict_now);
    /* Out of memory for the index: its bodies are fetched again this
     * mount, and the next one finds them. */
    if (group)
        pack_index_items(group, name, pack->items, pack->count);
    return 0;
}

int cache_disk_bodies_save(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                           const struct cache_disk_item *bodies, size_t count)
{
    uint64_t toc_len = 8 + (uint64_t)count * PACK_ENTRY_SIZE, size = HEADER_SIZE + toc_len;
    for (size_t i = 0; i < count; i++)
        size += bodies[i].len;
    int r = 0;
    /* One body, or more than a pack may hold (past what the table of
     * contents can address, or what the limit keeps): one file each. */
    if (count < 2 || count > PACK_MAX_ITEMS || size > UINT32_MAX || size > low_water(disk)) {
        for (size_t i = 0; i < count; i++) {
            int ri = cache_disk_body_save(disk, mailbox, uidvalidity, bodies[i].uid,
                                          bodies[i].data, bodies[i].len);
            if (r == 0)
                r = ri;
        }
        return r;
    }
    for (size_t i = 0; i < count; i++)
        if (bodies[i].uid == 0)
            return -EINVAL;

    /* The table of contents, on disk and (with the offsets) in the index. */
    struct pack_item *items = calloc(count, sizeof *items);
    unsigned char *toc = malloc(toc_len);
    struct iovec *iov = calloc(count + 2, sizeof *iov);
    if (!items || !toc || !iov) {
        free(items);
        free(toc);
        free(iov);
        return -ENOMEM;
    }
    put_u64(toc, count);
    uint64_t offset = HEADER_SIZE + toc_len;
    for (size_t i = 0; i < count; i++) {
        items[i] = (struct pack_item){.uid = bodies[i].uid, .length = (uint32_t)bodies[i].len,
                                      .offset = offset,
                                      .sum = checksum(bodies[i].data, bodies[i].len)};
        offset += bodies[i].len;
        unsigned char *e = toc + 8 + i * PACK_ENTRY_SIZE;
        put_u32(e, items[i].uid);
        put_u32(e + 4, items[i].length);
        put_u64(e + 8, items[i].sum);
        iov[i + 2] = (struct iovec){.iov_base = (void *)bodies[i].data, .iov_len = bodies[i].len};
    }
    unsigned char header[HEADER_SIZE];
    encode_header(header, KIND_PACK, toc, toc_len);
    iov[0] = (struct iovec){.iov_base = header, .iov_len = HEADER_SIZE};
    iov[1] = (struct iovec){.iov_base = toc, .iov_len = toc_len};

    uint64_t hash = mailbox_hash(mailbox);
    char temp[REL_MAX];
    r = write_temp_iov(disk, iov, (int)count + 2, size, temp);
    if (r == 0) {
        struct pack_install pack = {.hash = hash, .uidvalidity = uidvalidity, .items = items,
                                    .count = count, .file_size = size};
        r = install_temp(disk, mailbox, hash, uidvalidity, temp, install_pack_locked, &pack);
    }
    free(items);
    free(toc);
    free(iov);
    return r;
}

int cache_disk_body_present(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                            uint32_t uid)
{
    if (disk->max_bytes == 0)
        return 0;
    uint64_t hash = mailbox_hash(mailbox);
    char rel[REL_MAX];
    struct pack_entry entry;
    lock_disk(disk);
    bool found = ownership_locked(disk, hash, mailbox) == OWNED_BY_MAILBOX &&
                 body_lookup_locked(disk, hash, uidvalidity, uid, rel, &entry, NULL);
    unlock_disk(disk);
    if (!found)
        return 0;
    if (entry.pack != LOOSE)
        return 1;
    struct stat st;
    return fstatat(disk->dir_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode);
}

void cache_disk_drop_mailbox(struct cache_disk *disk, const char *mailbox)
{
    uint64_t hash = mailbox_hash(mailbox);
    char detached[REL_MAX];

    lock_disk(disk);
    /* A directory naming another mailbox is that one's cache, not ours to
     * drop; one naming nobody is debris and goes too. */
    if (ownership_locked(disk, hash, mailbox) == OWNED_BY_OTHER) {
        unlock_disk(disk);
        return;
    }
    forget_owner_locked(disk, hash);
    int detached_now = detach_mailbox_locked(disk, hash, detached);
    unlock_disk(disk);

    if (detached_now == 1)
        remove_detached(disk, detached);
}

uint64_t cache_disk_usage(struct cache_disk *disk)
{
    lock_disk(disk);
    uint64_t usage = disk->usage;
    unlock_disk(disk);
    return usage;
}

/* --------------------------------------------------------------- listings */

/* Payload: u32 uidvalidity, u32 uidnext, u64 highestmodseq, u64 count, then
 * count times: u32 uid, u32 flags, u64 size, i64 internaldate, u32 keyword
 * length, the keywords (no NUL; length 0 for none). */
int cache_disk_listing_save(struct cache_disk *disk, const char *mailbox,
                            const struct cache_disk_listing *listing)
{
    if (listing->count && !listing->messages)
        return -EINVAL;
    uint64_t total = LISTING_HEAD;
    for (size_t i = 0; i < listing->count; i++) {
        const struct cache_message *message = &listing->messages[i];
        /* What cache_folder_set_messages accepts, and load checks. */
        if (i > 0 && message->uid <= listing->messages[i - 1].uid)
            return -EINVAL;
        size_t keywords = message->keywords ? strlen(message->keywords) : 0;
        if (keywords > UINT32_MAX)
            return -E2BIG;
        total += LISTING_ENTRY_MIN + (uint64_t)keywords;
    }
    if (total > SIZE_MAX)
        return -E2BIG;

    unsigned char *payload = malloc((size_t)total);
    if (!payload)
        return -ENOMEM;
    unsigned char *p = payload;
    put_u32(p, listing->uidvalidity);
    put_u32(p + 4, listing->uidnext);
    put_u64(p + 8, listing->highestmodseq);
    put_u64(p + 16, listing->count);
    p += LISTING_HEAD;
    for (size_t i = 0; i < listing->count; i++) {
        const struct cache_message *message = &listing->messages[i];
        size_t keywords = message->keywords ? strlen(message->keywords) : 0;
        put_u32(p, message->uid);
        put_u32(p + 4, message->flags);
        put_u64(p + 8, message->size);
        put_u64(p + 16, (uint64_t)message->internaldate);
        put_u32(p + 24, (uint32_t)keywords);
        if (keywords)
            memcpy(p + LISTING_ENTRY_MIN, message->keywords, keywords);
        p += LISTING_ENTRY_MIN + keywords;
    }

    uint64_t hash = mailbox_hash(mailbox);
    char rel[REL_MAX];
    snprintf(rel, sizeof rel, "m/%016" PRIx64 "/listing", hash);
    int r = claim_mailbox(disk, hash, mailbox);
    if (r == 0)
        r = write_file(disk, rel, KIND_LISTING, payload, (size_t)total);
    free(payload);
    return r;
}

static void free_messages(struct cache_message *messages, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(messages[i].keywords);
    free(messages);
}

/* Parses a listing payload.  0, -EBADMSG if it is not one, -ENOMEM. */
static int parse_listing(const unsigned char *p, size_t left, struct cache_disk_listing *listing)
{
    if (left < LISTING_HEAD)
        return -EBADMSG;
    uint32_t uidvalidity = get_u32(p), uidnext = get_u32(p + 4);
    uint64_t highestmodseq = get_u64(p + 8), count = get_u64(p + 16);
    p += LISTING_HEAD;
    left -= LISTING_HEAD;
    if (count > left / LISTING_ENTRY_MIN)
        return -EBADMSG;

    struct cache_message *messages = calloc(count ? (size_t)count : 1, sizeof *messages);
    if (!messages)
        return -ENOMEM;
    int r = 0;
    size_t i;
    for (i = 0; i < count; i++) {
        if (left < LISTING_ENTRY_MIN) {
            r = -EBADMSG;
            break;
        }
        struct cache_message *message = &messages[i];
        message->uid = get_u32(p);
        message->flags = get_u32(p + 4);
        message->size = get_u64(p + 8);
        message->internaldate = (int64_t)get_u64(p + 16);
        uint32_t keywords = get_u32(p + 24);
        p += LISTING_ENTRY_MIN;
        left -= LISTING_ENTRY_MIN;
        if (keywords > left || (i > 0 && message->uid <= messages[i - 1].uid) ||
            memchr(p, '\0', keywords)) {
            r = -EBADMSG;
            break;
        }
        if (keywords) {
            message->keywords = strndup((const char *)p, keywords);
            if (!message->keywords) {
                r = -ENOMEM;
                break;
            }
        }
        p += keywords;
        left -= keywords;
    }
    if (r == 0 && left != 0)
        r = -EBADMSG;
    if (r != 0) {
        free_messages(messages, i);
        return r;
    }
    listing->uidvalidity = uidvalidity;
    listing->uidnext = uidnext;
    listing->highestmodseq = highestmodseq;
    listing->messages = messages;
    listing->count = (size_t)count;
    return 0;
}

int cache_disk_listing_load(struct cache_disk *disk, const char *mailbox,
                            struct cache_disk_listing *listing)
{
    memset(listing, 0, sizeof *listing);
    uint64_t hash = mailbox_hash(mailbox);
    if (!owned(disk, hash, mailbox))
        return -ENOENT;
    char rel[REL_MAX];
    snprintf(rel, sizeof rel, "m/%016" PRIx64 "/listing", hash);
    char *payload;
    size_t len;
    struct stat st;
    int r = load_file(disk, rel, KIND_LISTING, false, false, &payload, &len, &st);
    if (r != 0)
        return r;
    r = parse_listing((const unsigned char *)payload, len, listing);
    free(payload);
    if (r == -EBADMSG) {
        /* Checksum right, contents wrong: written by something else. */
        discard(disk, rel, &st, false, false);
        return -ENOENT;
    }
    return r;
}

/* ---------------------------------------------------------------- folders */

/* Payload: u64 count, then count times: u8 delimiter, u32 flags, u32 name
 * length, the name (no NUL). */
int cache_disk_folders_save(struct cache_disk *disk, const struct cache_disk_folders *folders)
{
    if (folders->count && (!folders->mailboxes || !folders->delimiters || !folders->flags))
        return -EINVAL;
    uint64_t total = FOLDERS_HEAD;
    for (size_t i = 0; i < folders->count; i++) {
        if (!folders->mailboxes[i])
            return -EINVAL;
        size_t name = strlen(folders->mailboxes[i]);
        if (name > UINT32_MAX)
            return -E2BIG;
        total += FOLDER_ENTRY_MIN + (uint64_t)name;
    }
    if (total > SIZE_MAX)
        return -E2BIG;

    unsigned char *payload = malloc((size_t)total);
    if (!payload)
        return -ENOMEM;
    unsigned char *p = payload;
    put_u64(p, folders->count);
    p += FOLDERS_HEAD;
    for (size_t i = 0; i < folders->count; i++) {
        size_t name = strlen(folders->mailboxes[i]);
        p[0] = (unsigned char)folders->delimiters[i];
        put_u32(p + 1, (uint32_t)folders->flags[i]);
        put_u32(p + 5, (uint32_t)name);
        memcpy(p + FOLDER_ENTRY_MIN, folders->mailboxes[i], name);
        p += FOLDER_ENTRY_MIN + name;
    }
    int r = write_file(disk, "folders", KIND_FOLDERS, payload, (size_t)total);
    free(payload);
    return r;
}

void cache_disk_folders_free(struct cache_disk_folders *folders)
{
    if (!folders)
        return;
    if (folders->mailboxes)
        for (size_t i = 0; i < folders->count; i++)
            free(folders->mailboxes[i]);
    free(folders->mailboxes);
    free(folders->delimiters);
    free(folders->flags);
    memset(folders, 0, sizeof *folders);
}

/* Parses a folders payload into folders.  0, -EBADMSG, -ENOMEM; on failure
 * folders is left empty. */
static int parse_folders(const unsigned char *p, size_t left, struct cache_disk_folders *folders)
{
    if (left < FOLDERS_HEAD)
        return -EBADMSG;
    uint64_t count = get_u64(p);
    p += FOLDERS_HEAD;
    left -= FOLDERS_HEAD;
    if (count > left / FOLDER_ENTRY_MIN)
        return -EBADMSG;

    size_t n = count ? (size_t)count : 1;
    folders->mailboxes = calloc(n, sizeof *folders->mailboxes);
    folders->delimiters = calloc(n, sizeof *folders->delimiters);
    folders->flags = calloc(n, sizeof *folders->flags);
    folders->count = 0;
    if (!folders->mailboxes || !folders->delimiters || !folders->flags) {
        cache_disk_folders_free(folders);
        return -ENOMEM;
    }
    for (size_t i = 0; i < count; i++) {
        if (left < FOLDER_ENTRY_MIN)
            goto bad;
        char delimiter = (char)p[0];
        uint32_t flags = get_u32(p + 1), name = get_u32(p + 5);
        p += FOLDER_ENTRY_MIN;
        left -= FOLDER_ENTRY_MIN;
        if (name > left || memchr(p, '\0', name))
            goto bad;
        char *mailbox = strndup((const char *)p, name);
        if (!mailbox) {
            cache_disk_folders_free(folders);
            return -ENOMEM;
        }
        folders->mailboxes[i] = mailbox;
        folders->delimiters[i] = delimiter;
        folders->flags[i] = flags;
        folders->count = i + 1;
        p += name;
        left -= name;
    }
    if (left != 0)
        goto bad;
    return 0;

bad:
    cache_disk_folders_free(folders);
    return -EBADMSG;
}

int cache_disk_folders_load(struct cache_disk *disk, struct cache_disk_folders *folders)
{
    memset(folders, 0, sizeof *folders);
    char *payload;
    size_t len;
    struct stat st;
    int r = load_file(disk, "folders", KIND_FOLDERS, false, false, &payload, &len, &st);
    if (r != 0)
        return r;
    r = parse_folders((const unsigned char *)payload, len, folders);
    free(payload);
    if (r == -EBADMSG) {
        discard(disk, "folders", &st, false, false);
        return -ENOENT;
    }
    return r;
}
