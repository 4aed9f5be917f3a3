/* cache/disk.h — the persistent cache: message bodies and folder listings
 * on disk, so a remount lists at once, a warm grep -r after a remount
 * fetches nothing unchanged, and a mount without a server can still show
 * what was cached.
 *
 * Layout under DIR (0700, files 0600):
 *   DIR/m/HASH/name                the mailbox name (HASH = FNV-1a of it)
 *   DIR/m/HASH/listing             the UID table, UIDVALIDITY, HIGHESTMODSEQ
 *   DIR/m/HASH/UIDVALIDITY/UID     one message body
 *   DIR/m/HASH/UIDVALIDITY/pXXXX   a pack: bodies saved together (16 hex digits)
 *   DIR/folders                    the last LIST
 *   DIR/tmp/                       files being written (emptied at open)
 *   DIR/lock                       flock'd while open: one process per DIR
 * Every file is written to DIR/tmp and renamed into place, and starts with
 * a header holding its length and a checksum of its contents: a file torn
 * by a crash fails the check and is treated as absent (and removed), so no
 * fsync is needed per body and nothing torn is ever served.
 *
 * Bodies are bounded by max_bytes: past it, the least recently used (file
 * mtime, touched on every load) are removed down to 80 % of it.  A body
 * larger than 80 % of max_bytes is not kept; max_bytes 0 keeps no bodies.
 * Listings and the folder list are not counted and never evicted.
 * Thread-safe: one internal lock, held only for bookkeeping, never for I/O
 * of message data. */
#ifndef CACHE_DISK_H
#define CACHE_DISK_H

#include <stddef.h>
#include <stdint.h>

#include "cache/cache.h"

struct cache_disk;

/* Opens (creating 0700 directories) the cache in dir.  NULL with a sentence
 * in err when it cannot be used (a dir not owned by us, or group/world
 * accessible, is refused; so is one another process has open).  Counts the
 * bodies on disk, and evicts at once if they exceed max_bytes (a lower limit
 * than last time, or 0). */
struct cache_disk *cache_disk_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen);
void cache_disk_close(struct cache_disk *disk);

/* 0 and a malloc'd body (with a NUL after its len bytes, not counted), or
 * -ENOENT (absent or failed its check), or -ENOMEM / -EIO (not removed).
 * save: 0 also when the body is deliberately not kept (see max_bytes above);
 * otherwise -errno, with nothing left behind. */
int cache_disk_body_load(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                         uint32_t uid, char **data, size_t *len);
/* 0, or -errno with nothing kept; -ENOENT when a cache_disk_drop_mailbox of
 * the same mailbox ran at the same time (the drop wins). */
int cache_disk_body_save(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                         uint32_t uid, const char *data, size_t len);
/* Saves several bodies of one mailbox and UIDVALIDITY as one pack file:
 * one file to create instead of count, which is most of what writing a
 * scan's bodies costs.  The pack is evicted as a whole.  One body, or more
 * than a pack holds, is saved as cache_disk_body_save does.  0, or the
 * first -errno (-EINVAL: a uid 0). */
struct cache_disk_item {
    uint32_t uid;
    const char *data;
    size_t len;
};
int cache_disk_bodies_save(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                           const struct cache_disk_item *items, size_t count);
/* Nonzero if the body is on disk (no check of its contents; the mailbox
 * directory's name file is checked, as for a load). */
int cache_disk_body_present(struct cache_disk *disk, const char *mailbox, uint32_t uidvalidity,
                            uint32_t uid);
/* Forget everything about a mailbox (UIDVALIDITY changed, or deleted). */
void cache_disk_drop_mailbox(struct cache_disk *disk, const char *mailbox);

/* A folder's UID table.  load: *messages malloc'd (keywords too), sorted by
 * uid, ascending and unique, as cache_folder_set_messages wants them; on
 * failure *listing is zeroed.  save: -EINVAL if messages are not so sorted.
 * Empty keywords ("") come back as NULL. */
struct cache_disk_listing {
    uint32_t uidvalidity, uidnext;
    uint64_t highestmodseq;
    struct cache_message *messages;
    size_t count;
};
int cache_disk_listing_save(struct cache_disk *disk, const char *mailbox,
                            const struct cache_disk_listing *listing);
int cache_disk_listing_load(struct cache_disk *disk, const char *mailbox,
                            struct cache_disk_listing *listing);

/* The folder list: parallel arrays, as LIST gave them.  load: all malloc'd;
 * free with cache_disk_folders_free. */
struct cache_disk_folders {
    char **mailboxes;
    char *delimiters;
    unsigned *flags;
    size_t count;
};
int cache_disk_folders_save(struct cache_disk *disk, const struct cache_disk_folders *folders);
int cache_disk_folders_load(struct cache_disk *disk, struct cache_disk_folders *folders);
void cache_disk_folders_free(struct cache_disk_folders *folders);

/* Bytes of bodies on disk now: whole file sizes, 32-byte header included. */
uint64_t cache_disk_usage(struct cache_disk *disk);

#endif
