/* fs/account_p.h — private to the account's files (account.c, folders.c,
 * bodies.c, changes.c): the account's state and the few functions they
 * share.  The rest of fs/ sees only fs/fs.h. */
#ifndef FS_ACCOUNT_P_H
#define FS_ACCOUNT_P_H

#include "cache/disk.h"
#include "fs/fs.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define BATCH_MESSAGES 256
#define READAHEAD_MESSAGES 512    /* how far ahead of a scanning reader */
#define READAHEAD_BYTES (32u << 20) /* ... or fewer messages when they add up to
                                       more (a quarter of -o cache_size at most) */
#define BATCH_BYTES (8u << 20)

struct readahead_request {
    uint32_t folder_id, from_uid;
    int step;                       /* 1 or -1: the reader's direction */
    uint32_t window_end;            /* the reader's window ends there: a batch
                                       starts at or before it */
};

/* Read-ahead threads, each fetching one batch on a connection of its own:
 * a scan keeps up to three batches in flight, which hides a round trip of
 * 20-50 ms to the server, and rg -j4 and the like keep several scan
 * positions busy.  A short queue, newest first, since the newest gap is the
 * one a reader will hit next. */
#define READAHEAD_THREADS 3
#define READAHEAD_QUEUE 8

/* A body on its way to the disk cache. */
struct disk_job {
    struct cache_body *body;        /* referenced */
    char *mailbox;
    double queued_at;               /* monotonic seconds */
    struct disk_job *next;
};
#define WRITER_MAX_BYTES (64u << 20)
/* The writer saves a scan's bodies as packs (see cache/disk.c): it waits
 * up to PACK_WAIT seconds after a body is queued for more of its folder,
 * and writes at once when a pack's worth is queued. */
#define PACK_MESSAGES 256
#define PACK_BYTES (4u << 20)
#define PACK_WAIT 0.05

struct inflight {
    struct { uint32_t folder_id, uid; } key;
    int waited;                     /* a reader waits for it: wake them when it lands */
    UT_hash_handle hh;
};

/* A first listing being streamed to readdir (fs_account_stream_begin). */
struct listing_stream {
    uint32_t folder_id;
    pthread_t owner;                /* the thread listing; only it publishes */
    struct cache_message *messages; /* ascending UIDs, keywords NULL */
    size_t count, cap;
    int unsorted;                   /* the server broke UID order: readers wait for the end */
    struct listing_stream *next;
};

struct fs_account {
    struct imap_config config;      /* its password points at secret */
    char *secret;                   /* password or OAuth2 token; replaced on refresh */
    char *token_cmd;                /* -o oauth_token_cmd, or NULL */
    pthread_mutex_t token_lock;     /* one token refresh at a time */
    char **old_secrets;             /* replaced tokens, kept until the end: another
                                       thread may be logging in with one; pool_lock */
    size_t old_secret_count;
    struct cache *cache;
    struct cache_bodies *bodies;
    double dir_cache_timeout;
    double idle_timeout;            /* -o idle_timeout: pooled sessions unused longer are dropped */
    uint64_t readahead_bytes;       /* READAHEAD_BYTES, or less for a small cache_size */

    pthread_mutex_t pool_lock;
    pthread_cond_t pool_changed;
    struct imap_session **idle;     /* protected by pool_lock */
    size_t idle_count;              /* protected by pool_lock */
    unsigned open_count;            /* sessions idle + in use; protected by pool_lock */
    unsigned max_connections;
    double next_connect_at;         /* backoff: no new connection before; protected by pool_lock */
    double backoff;                 /* seconds; protected by pool_lock */
    double offline_since;           /* first failed connect of a streak, 0 when online */

    struct fs_notifier *notifier;
    struct fs_searches *searches;   /* FOLDER/.search/ queries */
    struct fs_mailinfo *mailinfo;   /* user.mail.* xattrs */
    struct cache_disk *disk;        /* the persistent cache, or NULL (-o cache_dir=none) */

    /* Bodies wait here to be written to disk by the writer thread, so that a
     * fetch never waits for the disk.  Each holds a body reference. */
    pthread_t writer_thread;
    int writer_running;
    pthread_mutex_t writer_lock;
    pthread_cond_t writer_wake;
    struct disk_job *writer_queue;  /* protected by writer_lock; oldest first */
    struct disk_job *writer_tail;   /* protected by writer_lock */
    uint64_t writer_bytes;          /* protected by writer_lock */
    size_t writer_count;            /* protected by writer_lock */
    int writer_stop;                /* protected by writer_lock */
    int offline;                    /* mounted from the disk cache without a server;
                                       protected by pool_lock; cleared at the first login */
    char *trash;                    /* -o trash: a mount path, "auto", or NULL */
    char *special_trash;            /* the \Trash mailbox from LIST; protected by cache lock */
    char delimiter;                 /* for new top-level folders; protected by cache lock */
    int hide_deleted;               /* no UIDPLUS: see fs_account_hides_deleted */
    int readonly;                   /* -o ro */
    atomic_int no_open;             /* the kernel opens files without asking (fs/ops.c);
                                       set at INIT, read by the read-ahead threads,
                                       which may be running already */
    char *namespace_prefix;         /* personal namespace ("INBOX." on Courier-style
                                       servers), not shown on the mount; "" if none */
    uint64_t append_limit;          /* APPENDLIMIT=, 0 if none */

    pthread_mutex_t budget_lock;
    uint64_t max_download;          /* -o max_download per UTC day, 0 = no limit */
    uint64_t downloaded;            /* bytes today; protected by budget_lock */
    long download_day;              /* protected by budget_lock */
    int budget_warned;              /* protected by budget_lock */

    atomic_long stale_warned_at;    /* monotonic second of the last "serving what is
                                       cached" warning: one a minute, not one a listing */

    pthread_mutex_t quota_lock;
    double quota_at;                /* when last asked; protected by quota_lock */
    int quota_known;                /* protected by quota_lock */
    uint64_t quota_used, quota_limit; /* bytes; protected by quota_lock */

    pthread_mutex_t inflight_lock;
    pthread_cond_t inflight_done;
    struct inflight *inflight;      /* protected by inflight_lock */

    pthread_t readahead_threads[READAHEAD_THREADS];
    int readahead_running;                      /* threads started */
    pthread_mutex_t readahead_lock;
    pthread_cond_t readahead_wake;
    struct readahead_request readahead_queue[READAHEAD_QUEUE]; /* protected by readahead_lock */
    size_t readahead_queued;                    /* protected by readahead_lock */
    int readahead_stop;                         /* protected by readahead_lock */
    int warm_wanted;                            /* connections to open ahead of a scan, and */
    char *warm_mailbox;                         /* the folder to select on them; both
                                                   protected by readahead_lock */

    pthread_mutex_t stream_lock;
    pthread_cond_t stream_grew;
    struct listing_stream *streams;             /* protected by stream_lock */
};

/* A UID table being built from a listing (imap_fetch_meta with
 * fs_table_collect_meta). */
struct table_builder {
    struct cache_message *messages;
    size_t count, cap;
    int unsorted;
    struct fs_account *account;     /* with stream: where readdir sees it grow */
    struct listing_stream *stream;
    size_t published;
};

/* account.c: the connection pool.  A session is taken for one operation and
 * handed back with fs_session_release (a broken one is closed then). */
int fs_session_acquire_for(struct fs_account *account, const char *mailbox, int writable,
                           struct imap_session **out);
int fs_session_acquire(struct fs_account *account, const char *mailbox,
                       struct imap_session **out);
void fs_session_release(struct fs_account *account, struct imap_session *session);
void fs_session_warm(struct fs_account *account, const char *mailbox);
/* The server name of a selectable folder; NULL if absent or not selectable.
 * Caller frees. */
char *fs_folder_mailbox(struct fs_account *account, uint32_t folder_id);

/* folders.c: building UID tables. */
int fs_table_collect_meta(void *context, uint32_t uid, uint64_t size, int64_t internaldate,
                          const struct imap_value *flags);
void fs_table_free(struct table_builder *table);

/* bodies.c: the read-ahead and writer threads. */
void fs_readahead_warm(struct fs_account *account, uint32_t folder_id);
void fs_bodies_stop(struct fs_account *account);

#endif
