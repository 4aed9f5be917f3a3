/* cache/cache.h — what is known about the account: the folder tree, one UID
 * table per folder, and message bodies.  Plain data structures (uthash), no
 * FUSE, no OpenSSL, no I/O; unit-tested on their own.
 *
 * Locking: struct cache has one mutex for the folder tree and all UID
 * tables.  Callers take it with cache_lock() around every use of a
 * cache_folder or cache_message pointer and never keep such a pointer after
 * cache_unlock(): keep the folder id and the uid instead.  Message bodies live
 * in struct cache_bodies with a lock of its own (taken inside its functions),
 * so reads never wait for a listing. */
#ifndef CACHE_CACHE_H
#define CACHE_CACHE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <uthash.h>

/* System flags as bits; keywords ($Work, Junk, ...) as a string. */
#define CACHE_FLAG_SEEN     0x01u
#define CACHE_FLAG_ANSWERED 0x02u
#define CACHE_FLAG_FLAGGED  0x04u
#define CACHE_FLAG_DELETED  0x08u
#define CACHE_FLAG_DRAFT    0x10u
#define CACHE_FLAG_RECENT   0x20u

/* One message: 32 bytes, so 100,000 of them cost about 3 MiB. */
struct cache_message {
    uint32_t uid;
    uint32_t flags;         /* CACHE_FLAG_* */
    uint64_t size;          /* RFC822.SIZE, corrected after a full fetch */
    int64_t internaldate;   /* seconds since the epoch, UTC */
    char *keywords;         /* NULL, or space-separated keywords; owned */
};

#define CACHE_ROOT_ID 1u    /* the mount's root directory */

struct cache_folder {
    uint32_t id;            /* stable for the cache's life, never reused */
    char *mailbox;          /* server name as sent (modified UTF-7); NULL for
                               the root and for parents the server did not list */
    char *name;             /* file name inside the parent ("" for the root) */
    char delimiter;         /* hierarchy delimiter, 0 if none */
    unsigned selectable:1;  /* holds messages: listed, and not \Noselect */
    unsigned listed:1;      /* present in the last LIST (0: a virtual parent) */

    struct cache_folder *parent;    /* NULL for the root */
    struct cache_folder *children;  /* first child, in name order */
    struct cache_folder *next;      /* next sibling */

    uint32_t uidvalidity;   /* 0 until the first SELECT/EXAMINE */
    uint32_t uidnext;
    uint64_t highestmodseq;
    struct cache_message *messages; /* sorted by uid, ascending; owned */
    size_t count;
    size_t capacity;
    double listed_at;       /* monotonic time of the last UID table refresh; 0 = never */
    double used_at;         /* monotonic time the mount last used it (fs/ sets it):
                               the watcher keeps recently used folders in sync */
    uint32_t scan_uids[4];  /* fs/: where recent readers were, to recognise scans */
    unsigned scan_next;     /* fs/: which of scan_uids to replace next */
    uint32_t scan_ahead[4]; /* fs/: per reader, how far ahead bodies were seen cached */
    double reset_at;        /* fs/: monotonic time of the last UIDVALIDITY change */
    double negative_until;  /* fs/: until then the kernel may cache negative entries
                               for UID names here (monotonic time) */

    UT_hash_handle hh;      /* in cache->by_id */
};

struct cache {
    pthread_mutex_t lock;
    struct cache_folder *root;
    struct cache_folder *by_id;     /* uthash on id */
    uint32_t next_id;
};

struct cache *cache_new(void);      /* NULL on out of memory */
void cache_free(struct cache *cache);
void cache_lock(struct cache *cache);
void cache_unlock(struct cache *cache);

/* --- folders (caller holds cache->lock) --- */

/* One mailbox from LIST, with its path on the mount already mapped to safe
 * file names (one per hierarchy level, see fs/names.h). */
struct cache_mailbox_entry {
    const char *mailbox;            /* server name, modified UTF-7 */
    const char *const *components;  /* file names from the root down */
    size_t depth;                   /* number of components, >= 1 */
    char delimiter;
    int noselect;                   /* \Noselect or \NonExistent */
};

/* Makes the tree match a complete LIST result.  Folders whose path is still
 * present keep their id and UID table (a changed mailbox name or noselect
 * state is updated in place); new paths get new folders; parents that were
 * not listed are created as virtual (listed = 0, not selectable); folders no
 * longer present anywhere are removed with their UID tables.  Entries whose
 * path repeats an earlier entry are ignored.  If removed_ids is not NULL, it
 * receives a malloc'd array of the ids removed (caller frees) and
 * *removed_count their number.  Returns 0 or -ENOMEM. */
int cache_folders_sync(struct cache *cache, const struct cache_mailbox_entry *entries,
                       size_t count, uint32_t **removed_ids, size_t *removed_count);

struct cache_folder *cache_folder_by_id(struct cache *cache, uint32_t id);
struct cache_folder *cache_folder_child(const struct cache_folder *parent, const char *name);
/* Path on the mount ("Lists/notmuch", "" for the root); caller frees. */
char *cache_folder_path(const struct cache_folder *folder);
/* A folder by path from the root ("Lists/notmuch"); NULL if absent. */
struct cache_folder *cache_folder_by_path(struct cache *cache, const char *path);

/* A folder renamed on the server (RENAME): moves it with its subtree under
 * new_parent as new_name, keeping ids and UID tables, and rewrites the
 * mailbox names of the subtree that start with old_prefix to start with
 * new_prefix.  -EEXIST if new_name is taken, -EINVAL for a move into its own
 * subtree, -ENOMEM (nothing changed). */
int cache_folder_move(struct cache *cache, struct cache_folder *folder,
                      struct cache_folder *new_parent, const char *new_name,
                      const char *old_prefix, const char *new_prefix);

/* --- UID tables (caller holds cache->lock) --- */

/* Replaces the whole UID table.  messages must be sorted by uid (ascending,
 * unique) and is taken over (freed by the cache; keywords too).  Returns 0,
 * or -EINVAL (and frees nothing, takes nothing) if not sorted and unique. */
int cache_folder_set_messages(struct cache_folder *folder, struct cache_message *messages,
                              size_t count);
/* Binary search; NULL if absent. */
struct cache_message *cache_folder_find(struct cache_folder *folder, uint32_t uid);
/* The index of the first message with a uid >= uid (folder->count if none). */
size_t cache_folder_lower_bound(const struct cache_folder *folder, uint32_t uid);
/* The same in any array of messages sorted by uid (count if none). */
size_t cache_messages_lower_bound(const struct cache_message *messages, size_t count,
                                  uint32_t uid);
/* Inserts in order, or updates flags, size, date and keywords of an existing
 * uid.  message->keywords is always taken over (freed on failure too).
 * 0 or -ENOMEM. */
int cache_folder_upsert(struct cache_folder *folder, const struct cache_message *message);
/* 0, or -ENOENT if absent. */
int cache_folder_remove(struct cache_folder *folder, uint32_t uid);
/* Forget every message (a UIDVALIDITY change); uidvalidity is set to the new
 * value, and uidnext, highestmodseq and listed_at to 0. */
void cache_folder_reset(struct cache_folder *folder, uint32_t uidvalidity);

/* Flags to and from their IMAP spelling.  cache_flags_parse takes the atoms
 * of a FLAGS list one at a time: a system flag sets its bit, \Recent too,
 * anything else is appended to *keywords (malloc'd, space-separated; other
 * backslash flags are kept as keywords too).  0, -ENOMEM, or -EINVAL for an
 * empty atom or one with a space or control character. */
int cache_flags_add(uint32_t *flags, char **keywords, const char *atom);
/* "\Seen \Flagged $Work" (system flags first, in a fixed order, then
 * keywords; \Recent omitted); malloc'd, "" if none.  Caller frees. */
char *cache_flags_format(uint32_t flags, const char *keywords);

/* --- message bodies: immutable per (folder id, UIDVALIDITY, UID) --- */

struct cache_body {
    char *data;             /* the message exactly as BODY.PEEK[] returned it */
    size_t len;
    /* the rest is private to cache/body.c */
    uint32_t folder_id, uidvalidity, uid;
    unsigned refs;          /* protected by the bodies lock */
    struct cache_body *lru_prev, *lru_next;
};

struct cache_bodies;

/* limit: bytes kept when not in use (0 = keep nothing once released). */
struct cache_bodies *cache_bodies_new(uint64_t limit);
void cache_bodies_free(struct cache_bodies *bodies); /* all bodies must be released */

/* A referenced body (marks it most recently used), or NULL.  Release it with
 * cache_body_release. */
struct cache_body *cache_body_get(struct cache_bodies *bodies, uint32_t folder_id,
                                  uint32_t uidvalidity, uint32_t uid);
/* Nonzero if present; does not touch LRU order or references. */
int cache_body_contains(struct cache_bodies *bodies, uint32_t folder_id,
                        uint32_t uidvalidity, uint32_t uid);
/* Stores data (malloc'd, taken over) and returns it referenced.  If that body
 * is already present, data is freed and the present one returned.  Evicts
 * least recently used unreferenced bodies while over the limit.  NULL (data
 * freed) on out of memory. */
struct cache_body *cache_body_insert(struct cache_bodies *bodies, uint32_t folder_id,
                                     uint32_t uidvalidity, uint32_t uid, char *data, size_t len);
/* Like cache_body_insert, without keeping a reference (for prefetch). */
void cache_body_store(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uidvalidity,
                      uint32_t uid, char *data, size_t len);
void cache_body_release(struct cache_bodies *bodies, struct cache_body *body);
/* Drop one body (under every UIDVALIDITY), or all of a folder; referenced
 * bodies are freed when released. */
void cache_bodies_drop(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uid);
void cache_bodies_drop_folder(struct cache_bodies *bodies, uint32_t folder_id);
/* Bytes and count held now. */
void cache_bodies_usage(struct cache_bodies *bodies, uint64_t *bytes, size_t *count);

#endif
