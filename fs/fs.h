/* fs/fs.h — shared between the files of the fs room: the options, the
 * account (what fs asks of the cache and the IMAP client), and the FUSE
 * operations table. */
#ifndef FS_FS_H
#define FS_FS_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#include "cache/cache.h"
#include "imap/imap.h"

/* ---------------------------------------------------------------- options */

/* Every option in one place; defaults are set before parsing (fs/options.c). */
struct fs_options {
    char *url;                  /* imaps://USER@HOST[:PORT] */
    char *mountpoint;
    char *password_file;
    char *password_cmd;
    char *auth;                 /* "password" (default), "xoauth2" or "oauthbearer" */
    char *oauth_token_cmd;      /* prints a fresh OAuth2 access token */
    char *cafile;
    char *tls_verify;           /* "yes" (default) or "no" */
    char *tls;                  /* NULL, or "none" */
    unsigned connections;       /* pool size, default 4 */
    double dir_cache_timeout;   /* seconds a listing is served before a refresh */
    unsigned poll_interval;     /* seconds between the watcher's polls (fs/watch.c) */
    unsigned idle_timeout;      /* seconds an unused connection is kept (NAT) */
    char *cache_size;           /* body cache limit, "256M" style */
    unsigned timeout;           /* seconds for any one network wait */
    char *trash;                /* rm moves here: a folder path, or "auto" for \Trash */
    char *max_download;         /* bytes of mail fetched per UTC day, "2G" style */
    char *cache_dir;            /* persistent cache directory, or "none" */
    char *cache_max;            /* its size bound, "1G" style */
    char *config;               /* -o config=PATH: the accounts file to read */
    char *account;              /* ACCOUNT given instead of a URL: a [section] of
                                 * the config file, whose url and options apply
                                 * under the command line's (fs/options.c) */
    int readonly;               /* -o ro */
    int foreground;             /* -f */
    int debug;                  /* -d */
    int show_help;
    int show_version;

    /* derived from the above by fs_options_finish() */
    char *user;                 /* %40 decoded */
    char *host;
    unsigned port;
    enum imap_tls_mode tls_mode;
    uint64_t cache_bytes;
    uint64_t max_download_bytes; /* 0: no limit */
    uint64_t cache_max_bytes;
    enum imap_auth auth_mode;
};

/* Parses argv into options; FUSE's own options stay in args.  Returns 0, or
 * -1 after printing one line to stderr. */
int fs_options_parse(struct fuse_args *args, struct fs_options *options);
void fs_options_free(struct fs_options *options);
void fs_options_usage(const char *progname);
/* Reads the password from password_file, password_cmd, IMAPFS_PASSWORD or
 * the terminal.  Returns a malloc'd string or NULL after printing why. */
char *fs_password_get(const struct fs_options *options);
/* First line of a command's output (a password or token); NULL on failure
 * or empty output, with why in err.  Caller frees (after OPENSSL_cleanse). */
char *fs_secret_from_command(const char *command, const char *what, char *err, size_t errlen);

/* ---------------------------------------------------------------- account */

struct fs_account;

/* Takes a logged-in first session (used to list folders, then pooled), or
 * NULL to mount offline from the persistent cache. */
struct fs_account *fs_account_new(const struct fs_options *options,
                                  const struct imap_config *config,
                                  struct imap_session *first);
void fs_account_free(struct fs_account *account);
/* Mounted from the disk cache with no server yet: changes give EROFS. */
int fs_account_offline(struct fs_account *account);
/* Starts the account's threads (read-ahead); after daemonizing. */
int fs_account_start(struct fs_account *account);
struct cache *fs_account_cache(struct fs_account *account);
double fs_account_dir_timeout(const struct fs_account *account);

/* LIST and make the folder tree match: how many folders came, went or
 * moved, or -EIO. */
int fs_account_load_folders(struct fs_account *account);
/* The folder tree from the disk cache (an offline mount); -ENOENT if none. */
int fs_account_load_folders_offline(struct fs_account *account);
/* Makes sure the folder's UID table is no older than the listing timeout
 * (force: refresh now; FS_LOAD_WATCHER: now, and it does not count as the
 * mount using the folder).  0, -ENOENT (folder gone) or -EIO. */
#define FS_LOAD_WATCHER 2
int fs_account_load_folder(struct fs_account *account, uint32_t folder_id, int force);
/* A folder's first listing, shown while it arrives (opendir, readdir).
 * begin: 1 when the caller is to reply and then run the listing with
 * fs_account_stream_run; 2 when another thread streams it already; 0 when
 * the folder is to be listed the usual way (listed before, or offline). */
int fs_account_stream_begin(struct fs_account *account, uint32_t folder_id);
void fs_account_stream_run(struct fs_account *account, uint32_t folder_id);
/* Up to max messages with UIDs above after (keywords NULL), waiting for them
 * while the first listing of the folder arrives; 0 once none is arriving
 * (the folder's table has the rest). */
size_t fs_account_stream_read(struct fs_account *account, uint32_t folder_id, uint32_t after,
                              struct cache_message *out, size_t max);
/* The body of one message, referenced: release with fs_account_body_release.
 * Fetches it, and the next messages of a sequential scan with it, on a miss. */
int fs_account_body(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                    struct cache_body **out);
/* The same for a read that goes on inside a message (a READ past offset 0
 * in no-open mode): it says nothing new of where a scan is. */
int fs_account_body_continued(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                              struct cache_body **out);
void fs_account_body_release(struct fs_account *account, struct cache_body *body);
struct fs_notifier *fs_account_notifier(struct fs_account *account);
/* Nonzero while folder_id still has this UIDVALIDITY. */
int fs_account_uidvalidity_current(struct fs_account *account, uint32_t folder_id,
                                   uint32_t uidvalidity);
/* Closes pooled connections unused for max_idle seconds (the watcher calls
 * it), before a NAT box drops them silently. */
void fs_account_prune_idle(struct fs_account *account, double max_idle);
/* Opens a new logged-in session outside the pool (the watcher's), with the
 * same token refresh as pooled ones.  err gets a sentence on failure. */
int fs_account_open_session(struct fs_account *account, struct imap_session **out, char *err,
                            size_t errlen);
/* Nonzero when the server lacks UIDPLUS: rm can only flag \Deleted, and the
 * mount hides \Deleted messages so rm still looks like rm. */
int fs_account_hides_deleted(const struct fs_account *account);
/* Mounted with -o ro. */
int fs_account_readonly(const struct fs_account *account);
/* The kernel opens this mount's files without an OPEN request (read-only
 * mounts, fs/ops.c): only reads show where a scan is.  Set at INIT. */
void fs_account_set_no_open(struct fs_account *account);
int fs_account_no_open(const struct fs_account *account);
/* The server's APPENDLIMIT in bytes, 0 if it set none. */
uint64_t fs_account_append_limit(const struct fs_account *account);

/* --- changes; each leaves the account as asked or as it was --- */

/* Moves a message to another folder; *new_uid is its UID there, 0 if the
 * server did not say (the target is then re-listed). */
int fs_account_move(struct fs_account *account, uint32_t from_id, uint32_t uid, uint32_t to_id,
                    uint32_t *new_uid);
/* Expunges exactly that message (or moves it to -o trash). */
int fs_account_delete(struct fs_account *account, uint32_t folder_id, uint32_t uid);
/* APPENDs a new message (line ends already CRLF) with flags ("\\Seen $Work",
 * or NULL); date < 0 for now.  *new_uid is its UID (0 if the server did not
 * say), *uidvalidity the folder's UIDVALIDITY it belongs to. */
int fs_account_append(struct fs_account *account, uint32_t folder_id, const char *flags,
                      const char *data, size_t len, int64_t date, uint32_t *new_uid,
                      uint32_t *uidvalidity);
/* Gives uid another INTERNALDATE: APPENDs the same bytes and flags with date,
 * then expunges uid.  *new_uid is the copy's UID (0 if the server did not
 * say).  On failure the first copy stays (an error after the APPEND leaves
 * both, and says so in the log).  -ENOTSUP without UIDPLUS. */
int fs_account_redate(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                      int64_t date, uint32_t *new_uid, uint32_t *new_uidvalidity);
/* Replaces the flags ("\\Seen $Work", validated by the caller). */
int fs_account_store_flags(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                           const char *flags);
/* The account's storage quota in bytes (asked at most once a minute);
 * -ENOTSUP when the server has none. */
int fs_account_quota(struct fs_account *account, uint64_t *used, uint64_t *limit);
/* UID SEARCH in a folder with the user's criteria; *uids malloc'd, sorted.
 * -EINVAL for criteria the server rejects (logged with its answer). */
int fs_account_search(struct fs_account *account, uint32_t folder_id, const char *criteria,
                      uint32_t **uids, size_t *count);
struct fs_searches *fs_account_searches(struct fs_account *account);
/* UID FETCH first:last (UID ENVELOPE) of a folder (last 0: to the end);
 * -ENODATA if its UIDVALIDITY is no longer uidvalidity. */
int fs_account_fetch_envelopes(struct fs_account *account, uint32_t folder_id,
                               uint32_t uidvalidity, uint32_t first, uint32_t last,
                               imap_envelope_fn *fn, void *context);
struct fs_mailinfo *fs_account_mailinfo(struct fs_account *account);

/* fs/mailinfo.c: user.mail.subject / from / date from the ENVELOPE. */
struct fs_mailinfo;
struct fs_mailinfo *fs_mailinfo_new(void);
void fs_mailinfo_free(struct fs_mailinfo *info);
int fs_mailinfo_get(struct fs_account *account, uint32_t folder_id, uint32_t uidvalidity,
                    uint32_t uid, const char *field, char **value);
int fs_account_create_folder(struct fs_account *account, uint32_t parent_id, const char *name);
int fs_account_delete_folder(struct fs_account *account, uint32_t parent_id, const char *name);
int fs_account_rename_folder(struct fs_account *account, uint32_t parent_id, const char *name,
                             uint32_t new_parent_id, const char *new_name);

/* ---------------------------------------------------------------- notifier */

/* Queues kernel cache invalidations for a thread of their own (fs/notify.c):
 * safe to call from request handlers, never under the cache lock's
 * obligations.  Before fs_notifier_start and after stopping, they are
 * dropped (nothing is cached in the kernel then). */
struct fs_notifier;
struct fs_notifier *fs_notifier_new(void);
int fs_notifier_start(struct fs_notifier *notifier, struct fuse_session *session);
void fs_notifier_free(struct fs_notifier *notifier);   /* stops the thread */
void fs_notify_entry(struct fs_notifier *notifier, fuse_ino_t parent, const char *name);
void fs_notify_inode(struct fs_notifier *notifier, fuse_ino_t ino);
/* Puts a message's body (referenced; released once sent) into the kernel's
 * page cache, so a reader that opens it reads without a READ round trip.
 * Sent only if the folder still has that UIDVALIDITY: a reset queues its
 * invalidations after it, so stale pages never outlive it. */
void fs_notify_store(struct fs_notifier *notifier, struct fs_account *account, uint32_t folder_id,
                     uint32_t uidvalidity, uint32_t uid, struct cache_body *body);
/* Invalidates a file's attributes at once, not through the queue: for a
 * READ handler whose reply the kernel will cut at a size it holds too small.
 * The reader's next read then asks for the size (GETATTR) and reads on. */
void fs_notify_attrs_now(struct fs_notifier *notifier, fuse_ino_t ino);

/* ---------------------------------------------------------------- watcher */

/* A thread that keeps recently used folders in step with other clients
 * (fs/watch.c).  Start after daemonizing; stop before freeing the account. */
struct fs_watcher;
struct fs_watcher *fs_watcher_start(struct fs_account *account, unsigned poll_seconds,
                                    unsigned idle_seconds);
void fs_watcher_stop(struct fs_watcher *watcher);

/* ---------------------------------------------------------------- FUSE ops */

/* Inode numbers carry their meaning, so no per-message inode table exists:
 *   FUSE_ROOT_ID (1)            the root folder (cache id CACHE_ROOT_ID)
 *   folder id << 32             a folder
 *   folder id << 32 | uid       a message (uid >= 1)
 * The kernel's lookup counts therefore need no bookkeeping; forget is a
 * no-op. */
static inline fuse_ino_t fs_ino_folder(uint32_t folder_id)
{
    return folder_id == CACHE_ROOT_ID ? FUSE_ROOT_ID : (fuse_ino_t)folder_id << 32;
}
static inline fuse_ino_t fs_ino_message(uint32_t folder_id, uint32_t uid)
{
    return (fuse_ino_t)folder_id << 32 | uid;
}

extern const struct fuse_lowlevel_ops fs_operations;

/* Sets st_uid and st_gid to the mount's owner (read once, at INIT). */
void fs_attr_owner(struct stat *st);

/* One directory listing reply being filled (readdir and readdirplus). */
struct fs_listing {
    fuse_req_t req;
    char *buf;
    size_t size, used;
    int plus;               /* readdirplus: entries carry attributes */
    double timeout;
};
/* Adds one entry; 0 when the reply buffer is full. */
int fs_listing_add(struct fs_listing *listing, const char *name, const struct stat *st,
                   off_t next_offset);

/* fs/search.c: FOLDER/.search/CRITERIA/ directories.  Their inodes carry
 * FS_INO_SEARCH (the .search directory and one per query) or FS_INO_RESULT
 * (a result symlink). */
#define FS_INO_SEARCH ((fuse_ino_t)1 << 62)
#define FS_INO_RESULT ((fuse_ino_t)1 << 61)
static inline int fs_is_search_ino(fuse_ino_t ino)
{
    return ino != FUSE_ROOT_ID && (ino & (FS_INO_SEARCH | FS_INO_RESULT)) != 0 &&
           !(ino & ((fuse_ino_t)1 << 63));
}
struct fs_searches;
struct fs_searches *fs_searches_new(void);
void fs_searches_free(struct fs_searches *searches);
/* lookup of name in parent when parent is a folder (name ".search") or a
 * search inode: 0 and *entry, a negative errno, or 1 when not ours. */
int fs_search_lookup(struct fs_account *account, fuse_ino_t parent, const char *name,
                     struct fuse_entry_param *entry);
int fs_search_getattr(struct fs_account *account, fuse_ino_t ino, struct stat *st);
int fs_search_opendir(struct fs_account *account, fuse_ino_t ino);
int fs_search_readdir(struct fs_account *account, fuse_ino_t ino, struct fs_listing *listing,
                      off_t offset);
int fs_search_readlink(struct fs_account *account, fuse_ino_t ino, char *buf, size_t size);

/* fs/write.c: the operations that change the account, and files being
 * written (new mail, inode numbers with the top bit set). */
int fs_is_newmail_ino(fuse_ino_t ino);
/* A file being written or a fresh alias of new mail named name: 0 and *st,
 * -ENOENT, or -errno when the alias's folder cannot be listed. */
int fs_newmail_lookup(struct fs_account *account, uint32_t folder_id, const char *name,
                      struct stat *st);
int fs_newmail_getattr(fuse_ino_t ino, struct stat *st);
int fs_newmail_open(fuse_ino_t ino);
void fs_newmail_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset);
void fs_newmail_flush(fuse_req_t req, fuse_ino_t ino);
void fs_newmail_release(fuse_req_t req, fuse_ino_t ino);
void fs_write_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                     struct fuse_file_info *fi);
void fs_write_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t offset,
                    struct fuse_file_info *fi);
void fs_write_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                      struct fuse_file_info *fi);
void fs_write_unlink(fuse_req_t req, fuse_ino_t parent, const char *name);
void fs_write_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                     const char *newname, unsigned int flags);
void fs_write_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode);
void fs_write_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name);
void fs_write_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                       size_t size, int flags);
void fs_write_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name);
void fs_write_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name);

/* Seconds on the monotonic clock: timeouts and ages, immune to clock jumps. */
static inline double now_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A monotonic time in seconds as a timespec, for pthread_cond_timedwait on
 * a condition made with cond_init_monotonic (fs/account.c). */
static inline struct timespec timespec_of(double seconds)
{
    struct timespec ts = {.tv_sec = (time_t)seconds};
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    return ts;
}

#endif
