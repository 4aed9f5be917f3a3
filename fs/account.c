/* fs/account.c — what the filesystem asks of the account, answered from the
 * cache or, on a miss, from the server.
 *
 * Connections: a pool of up to -o connections sessions.  A request takes an
 * idle session (preferring one that already has its folder selected, so a
 * scan does not re-SELECT), opens a new one while under the limit, or waits.
 * A session whose connection broke is closed when handed back; the next
 * request opens a fresh one, which is how we reconnect.
 *
 * Bodies: a read of a message that is not cached fetches it together with
 * the next uncached messages of its folder in UID order (up to
 * BATCH_MESSAGES or BATCH_BYTES) in one UID FETCH.  grep -r and find -exec
 * read a directory in listing order, so one round trip serves many files;
 * a random reader pays for a few extra small messages at most.  Messages
 * being fetched are recorded in an in-flight table so that two readers
 * never fetch the same message twice: the second waits for the first. */
#include "cache/disk.h"
#include "fs/fs.h"
#include "fs/names.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/crypto.h>

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

static void unsolicited(void *context, struct imap_session *session,
                        const struct imap_response *response);
static void *readahead_main(void *arg);
static void quota_ask(struct fs_account *account, struct imap_session *session);
static char *folder_mailbox(struct fs_account *account, uint32_t folder_id);

/* Timed waits count on the monotonic clock (timespec_of): a change of the
 * wall clock neither cuts a wait short nor stretches it. */
static void cond_init_monotonic(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
}

struct fs_account *fs_account_new(const struct fs_options *options,
                                  const struct imap_config *config,
                                  struct imap_session *first)
{
    struct fs_account *account = calloc(1, sizeof(*account));

    if (!account)
        return NULL;
    account->config = *config;
    account->secret = strdup(config->password);
    account->config.password = account->secret;
    account->token_cmd = options->oauth_token_cmd ? strdup(options->oauth_token_cmd) : NULL;
    account->max_connections = options->connections;
    account->dir_cache_timeout = options->dir_cache_timeout;
    account->idle_timeout = options->idle_timeout;
    account->cache = cache_new();
    account->bodies = cache_bodies_new(options->cache_bytes);
    /* read ahead no more than the body cache holds well: what it evicted
     * before the reader got there would be fetched twice */
    account->readahead_bytes = options->cache_bytes / 4 < READAHEAD_BYTES ? options->cache_bytes / 4
                                                                          : READAHEAD_BYTES;
    account->idle = calloc(options->connections, sizeof(*account->idle));
    account->notifier = fs_notifier_new();
    account->searches = fs_searches_new();
    account->mailinfo = fs_mailinfo_new();
    account->trash = options->trash ? strdup(options->trash) : NULL;
    account->delimiter = '/';
    if (!account->cache || !account->bodies || !account->idle || !account->notifier ||
        !account->searches || !account->mailinfo || !account->secret ||
        (options->trash && !account->trash)) {
        fs_account_free(account);
        return NULL;
    }
    pthread_mutex_init(&account->pool_lock, NULL);
    pthread_mutex_init(&account->token_lock, NULL);
    cond_init_monotonic(&account->pool_changed);
    pthread_mutex_init(&account->inflight_lock, NULL);
    pthread_cond_init(&account->inflight_done, NULL);
    pthread_mutex_init(&account->readahead_lock, NULL);
    pthread_mutex_init(&account->quota_lock, NULL);
    pthread_mutex_init(&account->writer_lock, NULL);
    cond_init_monotonic(&account->writer_wake);
    pthread_cond_init(&account->readahead_wake, NULL);
    pthread_mutex_init(&account->stream_lock, NULL);
    pthread_cond_init(&account->stream_grew, NULL);
    account->max_download = options->max_download_bytes;
    pthread_mutex_init(&account->budget_lock, NULL);
    if (options->cache_dir && strcmp(options->cache_dir, "none") != 0) {
        char err[512];
        account->disk = cache_disk_open(options->cache_dir, options->cache_max_bytes, err,
                                        sizeof(err));
        if (!account->disk)
            log_warn("persistent cache off: %s", err);
    }
    if (!first) {
        /* Offline: what we know comes from the disk cache; the namespace
         * prefix was saved with the folder list.  Requests fail fast with
         * EIO until a connection succeeds (then we are live again). */
        account->offline = 1;
        account->offline_since = now_monotonic() - config->timeout - 1;
        account->namespace_prefix = strdup("");
        account->hide_deleted = 1; /* unknown: the cautious choice */
    } else {
        account->hide_deleted = !imap_session_has_capability(first, "UIDPLUS");
        imap_session_capability_value(first, "APPENDLIMIT", &account->append_limit);
        char namespace_delimiter = 0;
        if (imap_namespace_personal(first, &account->namespace_prefix, &namespace_delimiter) < 0) {
            free(account->namespace_prefix);
            account->namespace_prefix = strdup("");
        }
    }
    if (!account->namespace_prefix) {
        fs_account_free(account);
        return NULL;
    }
    if (*account->namespace_prefix)
        log_info("personal namespace prefix \"%s\" is not shown on the mount",
                 account->namespace_prefix);
    if (first) {
        /* df right after mounting shows the quota; later asks never wait
         * for a connection (fs_account_quota) */
        quota_ask(account, first);
        imap_session_set_unsolicited(first, unsolicited, account);
        account->idle[account->idle_count++] = first;
        account->open_count = 1;
    }
    return account;
}

int fs_account_offline(struct fs_account *account)
{
    pthread_mutex_lock(&account->pool_lock);
    int offline = account->offline;
    pthread_mutex_unlock(&account->pool_lock);
    return offline;
}

void fs_account_free(struct fs_account *account)
{
    if (!account)
        return;
    if (account->readahead_running) {
        pthread_mutex_lock(&account->readahead_lock);
        account->readahead_stop = 1;
        pthread_cond_broadcast(&account->readahead_wake);
        pthread_mutex_unlock(&account->readahead_lock);
        for (int i = 0; i < account->readahead_running; i++)
            pthread_join(account->readahead_threads[i], NULL);
    }
    free(account->warm_mailbox);
    if (account->writer_running) {
        /* what is queued still gets written: it is a cache worth keeping */
        pthread_mutex_lock(&account->writer_lock);
        account->writer_stop = 1;
        pthread_cond_signal(&account->writer_wake);
        pthread_mutex_unlock(&account->writer_lock);
        pthread_join(account->writer_thread, NULL);
    }
    for (size_t i = 0; i < account->idle_count; i++)
        imap_session_close(account->idle[i]);
    free(account->idle);
    fs_notifier_free(account->notifier);
    fs_searches_free(account->searches);
    fs_mailinfo_free(account->mailinfo);
    cache_disk_close(account->disk);
    free(account->trash);
    free(account->special_trash);
    free(account->namespace_prefix);
    for (size_t i = 0; i < account->old_secret_count; i++) {
        OPENSSL_cleanse(account->old_secrets[i], strlen(account->old_secrets[i]));
        free(account->old_secrets[i]);
    }
    free(account->old_secrets);
    if (account->secret) {
        OPENSSL_cleanse(account->secret, strlen(account->secret));
        free(account->secret);
    }
    free(account->token_cmd);
    if (account->cache)
        cache_free(account->cache);
    if (account->bodies)
        cache_bodies_free(account->bodies);
    struct inflight *entry, *tmp;
    HASH_ITER(hh, account->inflight, entry, tmp) {
        HASH_DEL(account->inflight, entry);
        free(entry);
    }
    free(account);
}

/* Takes from the queue the oldest job and those after it of the same
 * mailbox and UIDVALIDITY, up to a pack's worth, in queue order.  Caller
 * holds writer_lock. */
static size_t writer_take(struct fs_account *account, struct disk_job **taken)
{
    struct disk_job *first = account->writer_queue, **link = &account->writer_queue;
    struct disk_job *last = NULL;
    size_t n = 0;
    uint64_t bytes = 0;

    while (*link) {
        struct disk_job *job = *link;
        if (n < PACK_MESSAGES && (n == 0 || bytes + job->body->len <= PACK_BYTES) &&
            job->body->uidvalidity == first->body->uidvalidity &&
            strcmp(job->mailbox, first->mailbox) == 0) {
            *link = job->next;
            taken[n++] = job;
            bytes += job->body->len;
        } else {
            last = job;
            link = &job->next;
        }
    }
    account->writer_tail = last;
    return n;
}

static void *writer_main(void *arg)
{
    struct fs_account *account = arg;
    struct disk_job *taken[PACK_MESSAGES];
    struct cache_disk_item items[PACK_MESSAGES];

    pthread_mutex_lock(&account->writer_lock);
    for (;;) {
        while (!account->writer_queue && !account->writer_stop)
            pthread_cond_wait(&account->writer_wake, &account->writer_lock);
        if (!account->writer_queue)
            break; /* stopping, and nothing left */
        /* a scan's next bodies are on their way: one file for all of them */
        while (!account->writer_stop && account->writer_count < PACK_MESSAGES &&
               account->writer_bytes < PACK_BYTES) {
            double until = account->writer_queue->queued_at + PACK_WAIT;
            if (now_monotonic() >= until)
                break;
            struct timespec deadline = timespec_of(until);
            pthread_cond_timedwait(&account->writer_wake, &account->writer_lock, &deadline);
        }
        size_t n = writer_take(account, taken);
        pthread_mutex_unlock(&account->writer_lock);

        uint64_t bytes = 0;
        for (size_t i = 0; i < n; i++) {
            items[i].uid = taken[i]->body->uid;
            items[i].data = taken[i]->body->data;
            items[i].len = taken[i]->body->len;
            bytes += taken[i]->body->len;
        }
        cache_disk_bodies_save(account->disk, taken[0]->mailbox, taken[0]->body->uidvalidity,
                               items, n);
        for (size_t i = 0; i < n; i++) {
            cache_body_release(account->bodies, taken[i]->body);
            free(taken[i]->mailbox);
            free(taken[i]);
        }
        pthread_mutex_lock(&account->writer_lock);
        account->writer_bytes -= bytes;
        account->writer_count -= n;
    }
    pthread_mutex_unlock(&account->writer_lock);
    return NULL;
}

/* Queues a fetched body for the disk cache; skipped when the queue is full
 * (the disk is slower than the network: better a message fetched again
 * next time than memory without bound). */
static void disk_save_later(struct fs_account *account, const char *mailbox, uint32_t folder_id,
                            uint32_t uidvalidity, uint32_t uid)
{
    if (!account->disk || !account->writer_running || !mailbox)
        return;
    pthread_mutex_lock(&account->writer_lock);
    int full = account->writer_bytes > WRITER_MAX_BYTES;
    pthread_mutex_unlock(&account->writer_lock);
    if (full)
        return;
    struct disk_job *job = calloc(1, sizeof(*job));
    if (!job || !(job->mailbox = strdup(mailbox)) ||
        !(job->body = cache_body_get(account->bodies, folder_id, uidvalidity, uid))) {
        if (job)
            free(job->mailbox);
        free(job);
        return;
    }
    job->queued_at = now_monotonic();
    pthread_mutex_lock(&account->writer_lock);
    int was_empty = !account->writer_queue;
    account->writer_bytes += job->body->len;
    account->writer_count++;
    if (account->writer_tail)
        account->writer_tail->next = job;
    else
        account->writer_queue = job;
    account->writer_tail = job;
    /* The writer waits for the first job, then for a pack's worth or its
     * deadline: waking it for every body would cost a switch each. */
    if (was_empty || account->writer_count >= PACK_MESSAGES || account->writer_bytes >= PACK_BYTES)
        pthread_cond_signal(&account->writer_wake);
    pthread_mutex_unlock(&account->writer_lock);
}

int fs_account_start(struct fs_account *account)
{
    if (account->disk) {
        int ret = pthread_create(&account->writer_thread, NULL, writer_main, account);
        if (ret != 0)
            return -ret;
        pthread_setname_np(account->writer_thread, "imapfs-diskwr");
        account->writer_running = 1;
    }
    for (int i = 0; i < READAHEAD_THREADS; i++) {
        int ret = pthread_create(&account->readahead_threads[i], NULL, readahead_main, account);
        if (ret != 0)
            return -ret;
        pthread_setname_np(account->readahead_threads[i], "imapfs-readahd");
        account->readahead_running++;
    }
    return 0;
}

struct cache *fs_account_cache(struct fs_account *account) { return account->cache; }
double fs_account_dir_timeout(const struct fs_account *account) { return account->dir_cache_timeout; }
struct fs_notifier *fs_account_notifier(struct fs_account *account) { return account->notifier; }
struct fs_searches *fs_account_searches(struct fs_account *account) { return account->searches; }
struct fs_mailinfo *fs_account_mailinfo(struct fs_account *account) { return account->mailinfo; }

/* ---------------------------------------------------------------- the pool */

/* Logs in a new session.  OAuth2 tokens expire: when the server rejects
 * one, the token command runs again, once per request (*refreshed). */
static int open_session(struct fs_account *account, struct imap_session **out, char *err,
                        size_t errlen, int *refreshed)
{
    pthread_mutex_lock(&account->pool_lock);
    struct imap_config config = account->config; /* the token may be replaced */
    pthread_mutex_unlock(&account->pool_lock);
    int ret = imap_session_open(&config, out, err, errlen);
    if (ret != -EACCES || !account->token_cmd || *refreshed)
        return ret;
    *refreshed = 1;
    /* One refresh at a time: a thread that finds the token already replaced
     * since it tried just tries the new one (the watcher and a reader
     * reconnecting together must not run the command twice). */
    pthread_mutex_lock(&account->token_lock);
    pthread_mutex_lock(&account->pool_lock);
    int replaced = account->secret != config.password;
    config.password = account->secret;
    pthread_mutex_unlock(&account->pool_lock);
    if (!replaced) {
        char why[256];
        char *fresh = fs_secret_from_command(account->token_cmd, "oauth_token_cmd", why,
                                             sizeof(why));
        if (!fresh) {
            pthread_mutex_unlock(&account->token_lock);
            log_error("%s", why);
            return ret;
        }
        pthread_mutex_lock(&account->pool_lock);
        char **grown = realloc(account->old_secrets,
                               (account->old_secret_count + 1) * sizeof(*grown));
        if (grown) {
            account->old_secrets = grown;
            account->old_secrets[account->old_secret_count++] = account->secret;
            account->secret = fresh;
            account->config.password = fresh;
            config.password = fresh;
        } else {
            free(fresh);
        }
        pthread_mutex_unlock(&account->pool_lock);
    }
    pthread_mutex_unlock(&account->token_lock);
    return imap_session_open(&config, out, err, errlen);
}

int fs_account_open_session(struct fs_account *account, struct imap_session **out, char *err,
                            size_t errlen)
{
    int refreshed = 0;
    return open_session(account, out, err, errlen, &refreshed);
}

/* Takes an idle session, preferring one with mailbox selected and in the
 * mode wanted (reads leave read-write selections to changes, which then
 * need no SELECT before their command).  Sessions the server closed while
 * idle, or unused so long that a NAT box may have dropped them, are closed
 * on the way.  Returns 1 with *out set, 0 when none is idle.  Caller holds
 * pool_lock, which is dropped while a dead session is closed. */
static int take_idle_locked(struct fs_account *account, const char *mailbox, int writable,
                            struct imap_session **out)
{
    while (account->idle_count > 0) {
        size_t pick = account->idle_count - 1;
        int pick_score = 0; /* 1: mailbox selected; 2: in the mode wanted */
        for (size_t i = 0; mailbox && i < account->idle_count && pick_score < 2; i++) {
            const char *selected = imap_session_selected(account->idle[i]);
            if (!selected || strcmp(selected, mailbox) != 0)
                continue;
            int score = imap_session_selected_readonly(account->idle[i]) == !writable ? 2 : 1;
            if (score > pick_score) {
                pick = i;
                pick_score = score;
            }
        }
        *out = account->idle[pick];
        account->idle[pick] = account->idle[--account->idle_count];
        int forgotten = imap_session_idle_seconds(*out) >= account->idle_timeout;
        if (!forgotten && imap_session_idle_ok(*out))
            return 1;
        account->open_count--;
        pthread_mutex_unlock(&account->pool_lock);
        log_debug("an idle connection was %s; dropping it",
                  forgotten ? "unused too long" : "closed by the server");
        imap_session_drop(*out);
        *out = NULL;
        pthread_mutex_lock(&account->pool_lock);
    }
    return 0;
}

/* An idle session, or a new one.
 * New connections back off after failures (0.25 s doubling to 10 s); a
 * request waits for the server at most the timeout, and once the server has
 * been gone longer than that, requests fail at once with EIO (cached data is
 * still served by the callers) while a connect is tried now and then. */
static int session_acquire_for(struct fs_account *account, const char *mailbox, int writable,
                               struct imap_session **out)
{
    double deadline = now_monotonic() + account->config.timeout;
    /* After this request's first failed connect, it waits only a short
     * grace for the server (enough to bridge a restart), not the whole
     * timeout: an unreachable server must give EIO quickly. */
    double grace = account->config.timeout * 0.5 < 2.0 ? account->config.timeout * 0.5 : 2.0;
    double first_failure = 0;
    char err[512];
    int refreshed = 0;

    pthread_mutex_lock(&account->pool_lock);
    for (;;) {
        double now = now_monotonic();
        if (take_idle_locked(account, mailbox, writable, out)) {
            pthread_mutex_unlock(&account->pool_lock);
            return 0;
        }
        int long_outage = account->offline_since &&
                          now - account->offline_since > account->config.timeout;
        /* Another request's connect failed already: this one, too, waits
         * only the grace, even if the backoff keeps it from trying itself. */
        if (!first_failure && account->offline_since)
            first_failure = now;
        if (first_failure && now - first_failure >= grace)
            break;
        double wait_until = deadline;
        if (account->open_count < account->max_connections) {
            if (now >= account->next_connect_at) {
                /* connect, without the lock */
                account->open_count++;
                pthread_mutex_unlock(&account->pool_lock);
                int ret = open_session(account, out, err, sizeof(err), &refreshed);
                pthread_mutex_lock(&account->pool_lock);
                if (ret == 0) {
                    if (account->offline)
                        log_warn("the server answers: the mount is live again");
                    else if (account->offline_since)
                        log_info("connected to the server again");
                    account->offline = 0;
                    account->offline_since = 0;
                    account->backoff = 0;
                    pthread_mutex_unlock(&account->pool_lock);
                    imap_session_set_unsolicited(*out, unsolicited, account);
                    return 0;
                }
                account->open_count--;
                if (!account->offline_since) {
                    account->offline_since = now_monotonic();
                    log_error("cannot reach the server: %s", err);
                }
                account->backoff = account->backoff ? account->backoff * 2 : 0.25;
                if (account->backoff > 10)
                    account->backoff = 10;
                account->next_connect_at = now_monotonic() + account->backoff;
                pthread_cond_broadcast(&account->pool_changed);
                if (!first_failure)
                    first_failure = now_monotonic();
                continue;
            }
            if (long_outage)
                break; /* fail fast; a later request tries again after the backoff */
            if (account->next_connect_at < wait_until)
                wait_until = account->next_connect_at;
        }
        if (now >= deadline)
            break;
        if (first_failure && first_failure + grace < wait_until)
            wait_until = first_failure + grace;
        struct timespec until = timespec_of(wait_until);
        pthread_cond_timedwait(&account->pool_changed, &account->pool_lock, &until);
    }
    pthread_mutex_unlock(&account->pool_lock);
    return -EIO;
}

static int session_acquire(struct fs_account *account, const char *mailbox,
                           struct imap_session **out)
{
    return session_acquire_for(account, mailbox, 0, out);
}

/* Another client changed the selected mailbox while we ran a command.
 * Flag updates carry a UID and go straight into the cache; EXISTS, EXPUNGE
 * and VANISHED only say "something changed" in sequence-number terms, so the
 * folder is marked stale and its next use (or the watcher) lists it again. */
static void unsolicited(void *context, struct imap_session *session,
                        const struct imap_response *response)
{
    struct fs_account *account = context;
    const char *mailbox = imap_session_selected(session);

    if (!mailbox || response->status != IMAP_STATUS_NONE || response->count < 2)
        return;
    const struct imap_value *kind = &response->items[1]; /* "* 5 EXPUNGE" */
    int is_fetch = response->count == 3 && imap_value_is_atom(kind, "FETCH") &&
                   response->items[2].kind == IMAP_VALUE_LIST;
    int is_change = imap_value_is_atom(kind, "EXPUNGE") || imap_value_is_atom(kind, "EXISTS") ||
                    imap_value_is_atom(&response->items[0], "VANISHED");
    if (!is_fetch && !is_change)
        return;

    cache_lock(account->cache);
    struct cache_folder *folder = NULL, *each;
    for (each = account->cache->by_id; each; each = each->hh.next)
        if (each->mailbox && strcmp(each->mailbox, mailbox) == 0) {
            folder = each;
            break;
        }
    if (folder && is_change) {
        folder->listed_at = 0;
    } else if (folder && is_fetch) {
        const struct imap_value *uid_value = imap_fetch_item(&response->items[2], "UID");
        const struct imap_value *flags = imap_fetch_item(&response->items[2], "FLAGS");
        uint32_t uid;
        struct cache_message *message;
        if (uid_value && flags && flags->kind == IMAP_VALUE_LIST &&
            imap_value_u32(uid_value, &uid) == 0 && (message = cache_folder_find(folder, uid))) {
            struct cache_message updated = *message;
            updated.flags = 0;
            updated.keywords = NULL;
            for (size_t i = 0; i < flags->count; i++)
                if (flags->items[i].kind == IMAP_VALUE_ATOM)
                    cache_flags_add(&updated.flags, &updated.keywords, flags->items[i].str);
            cache_folder_upsert(folder, &updated);
        }
    }
    cache_unlock(account->cache);
}

/* Closes pooled sessions unused for max_idle seconds: a NAT box or firewall
 * may drop an idle connection without a word, and a request that met such a
 * connection would wait out the whole timeout.  A new connection is cheap. */
void fs_account_prune_idle(struct fs_account *account, double max_idle)
{
    struct imap_session *stale[64];
    size_t count = 0;

    pthread_mutex_lock(&account->pool_lock);
    for (size_t i = 0; i < account->idle_count && count < 64;) {
        if (imap_session_idle_seconds(account->idle[i]) < max_idle) {
            i++;
            continue;
        }
        stale[count++] = account->idle[i];
        account->idle[i] = account->idle[--account->idle_count];
        account->open_count--;
    }
    if (count)
        pthread_cond_signal(&account->pool_changed);
    pthread_mutex_unlock(&account->pool_lock);
    for (size_t i = 0; i < count; i++)
        imap_session_drop(stale[i]);
    if (count)
        log_debug("closed %zu connection(s) idle for %.0f s or more", count, max_idle);
}

static void session_release(struct fs_account *account, struct imap_session *session)
{
    int broken = imap_session_broken(session);

    pthread_mutex_lock(&account->pool_lock);
    if (broken)
        account->open_count--;
    else
        account->idle[account->idle_count++] = session;
    pthread_cond_signal(&account->pool_changed);
    pthread_mutex_unlock(&account->pool_lock);
    if (broken) {
        imap_session_close(session);
        /* A connection died.  Those quiet at least as long as a request
         * waits before it calls one dead may have died with it unnoticed (a
         * NAT box forgets them all at once): the retry must not meet them
         * one after another, waiting out the timeout on each. */
        fs_account_prune_idle(account, account->config.timeout);
    }
}

/* Opens one more connection for read-ahead, if the pool may grow and the
 * server has been answering, and selects mailbox on it.  A folder's first
 * listing asks for these (fs_account_stream_begin): a scan (grep -r) that
 * follows then finds its read-ahead connections ready instead of waiting
 * for a connect, TLS, a login and a SELECT, six round trips (0.3 s at
 * 50 ms).  Never waits; a failure is left for the next real request. */
static void session_warm(struct fs_account *account, const char *mailbox)
{
    struct imap_session *session;
    char err[512];
    int refreshed = 0;

    pthread_mutex_lock(&account->pool_lock);
    int grow = !account->offline_since && account->open_count < account->max_connections;
    if (grow)
        account->open_count++;
    pthread_mutex_unlock(&account->pool_lock);
    if (!grow)
        return;
    if (open_session(account, &session, err, sizeof(err), &refreshed) < 0) {
        log_debug("no connection opened ahead of a scan: %s", err);
        pthread_mutex_lock(&account->pool_lock);
        account->open_count--;
        pthread_cond_broadcast(&account->pool_changed);
        pthread_mutex_unlock(&account->pool_lock);
        return;
    }
    imap_session_set_unsolicited(session, unsolicited, account);
    imap_select(session, mailbox, 1, NULL); /* a failure shows in the session's state */
    session_release(account, session);
}

/* ---------------------------------------------------------------- folders */

/* Splits a mailbox name at its delimiter, decodes each level from modified
 * UTF-7 and maps it to a safe file name.  NULL (with a log line) for a name
 * that cannot be shown safely. */
static char **mailbox_components(const struct imap_mailbox *mailbox, const char *prefix,
                                 size_t *depth)
{
    /* "INBOX.Sent" under a personal namespace "INBOX." shows as Sent */
    size_t prefix_len = strlen(prefix);
    const char *shown = mailbox->name;
    if (prefix_len && strncmp(shown, prefix, prefix_len) == 0 && shown[prefix_len])
        shown += prefix_len;
    char *decoded = imap_utf7_decode(shown);
    char **components = NULL;
    size_t count = 0;

    if (!decoded) {
        log_warn("skipping mailbox with invalid modified UTF-7 name \"%s\"", mailbox->name);
        return NULL;
    }
    char *cursor = decoded;
    for (;;) {
        char *end = mailbox->delimiter ? strchr(cursor, mailbox->delimiter) : NULL;
        if (end)
            *end = '\0';
        char *name = fs_name_from_component(cursor);
        if (name && strlen(name) > 255) { /* escaping can triple a name's length */
            log_warn("skipping mailbox \"%s\": a level of its name is too long for a file name",
                     mailbox->name);
            free(name);
            goto fail;
        }
        char **grown = realloc(components, (count + 1) * sizeof(*components));
        if (!name || !grown) {
            log_warn("skipping mailbox \"%s\": a level of its name is empty or not UTF-8",
                     mailbox->name);
            free(name);
            if (grown)
                components = grown;
            goto fail;
        }
        components = grown;
        components[count++] = name;
        if (!end)
            break;
        cursor = end + 1;
    }
    free(decoded);
    *depth = count;
    return components;
fail:
    for (size_t i = 0; i < count; i++)
        free(components[i]);
    free(components);
    free(decoded);
    return NULL;
}

/* Where each folder sits, to tell the kernel what a new LIST changed. */
struct folder_place {
    uint32_t id, parent_id;
    char *name;
};

/* Caller holds the cache lock; NULL with *count 0 on out of memory (then
 * nothing is invalidated, and entries simply time out). */
static struct folder_place *folder_places(struct cache *cache, size_t *count)
{
    size_t n = HASH_CNT(hh, cache->by_id), i = 0;
    struct folder_place *places = calloc(n ? n : 1, sizeof(*places));

    *count = 0;
    if (!places)
        return NULL;
    for (struct cache_folder *folder = cache->by_id; folder; folder = folder->hh.next) {
        if (!folder->parent)
            continue;
        places[i].id = folder->id;
        places[i].parent_id = folder->parent->id;
        places[i].name = strdup(folder->name);
        if (places[i].name)
            i++;
    }
    *count = i;
    return places;
}

/* Folders gone or moved lose their kernel entries; new ones clear any
 * negative entry for their name.  Returns how many changed.  Caller holds
 * the cache lock (queueing a notice is fine under it; sending is the
 * notifier thread's job). */
static int notify_folder_changes(struct fs_account *account, const struct folder_place *before,
                                 size_t before_count)
{
    int changes = 0;

    for (size_t i = 0; i < before_count; i++) {
        struct cache_folder *folder = cache_folder_by_id(account->cache, before[i].id);
        if (!folder || !folder->parent || folder->parent->id != before[i].parent_id ||
            strcmp(folder->name, before[i].name) != 0) {
            fs_notify_entry(account->notifier, fs_ino_folder(before[i].parent_id), before[i].name);
            changes++;
        }
    }
    for (struct cache_folder *folder = account->cache->by_id; folder; folder = folder->hh.next) {
        size_t i;
        if (!folder->parent)
            continue;
        for (i = 0; i < before_count && before[i].id != folder->id; i++)
            ;
        if (i == before_count) {
            fs_notify_entry(account->notifier, fs_ino_folder(folder->parent->id), folder->name);
            changes++;
        }
    }
    return changes;
}

/* The folder list on disk carries one extra record: the personal namespace
 * prefix, so an offline mount shows the same paths as a live one. */
#define NAMESPACE_RECORD 0x80000000u

static void folders_to_disk(struct fs_account *account, const struct imap_mailbox *mailboxes,
                            size_t count)
{
    struct cache_disk_folders folders = { 0 };

    if (!account->disk)
        return;
    folders.mailboxes = calloc(count + 1, sizeof(*folders.mailboxes));
    folders.delimiters = calloc(count + 1, 1);
    folders.flags = calloc(count + 1, sizeof(*folders.flags));
    if (folders.mailboxes && folders.delimiters && folders.flags) {
        for (size_t i = 0; i < count; i++) {
            folders.mailboxes[i] = mailboxes[i].name;
            folders.delimiters[i] = mailboxes[i].delimiter;
            folders.flags[i] = mailboxes[i].flags;
        }
        folders.mailboxes[count] = account->namespace_prefix;
        folders.flags[count] = NAMESPACE_RECORD;
        folders.count = count + 1;
        cache_disk_folders_save(account->disk, &folders);
    }
    free(folders.mailboxes); /* the strings belong to the caller */
    free(folders.delimiters);
    free(folders.flags);
}

static int apply_mailboxes(struct fs_account *account, const struct imap_mailbox *mailboxes,
                           size_t count);

int fs_account_load_folders(struct fs_account *account)
{
    struct imap_session *session;
    struct imap_mailbox *mailboxes = NULL;
    size_t count = 0;
    int ret = session_acquire(account, NULL, &session);

    if (ret < 0)
        return ret;
    ret = imap_list(session, &mailboxes, &count);
    session_release(account, session);
    if (ret < 0)
        return ret == -EIO ? ret : -EIO;
    folders_to_disk(account, mailboxes, count);
    ret = apply_mailboxes(account, mailboxes, count);
    imap_mailboxes_free(mailboxes, count);
    return ret;
}

int fs_account_load_folders_offline(struct fs_account *account)
{
    struct cache_disk_folders folders;
    struct imap_mailbox *mailboxes;
    size_t used = 0;

    if (!account->disk || cache_disk_folders_load(account->disk, &folders) < 0)
        return -ENOENT;
    mailboxes = calloc(folders.count ? folders.count : 1, sizeof(*mailboxes));
    if (!mailboxes) {
        cache_disk_folders_free(&folders);
        return -ENOMEM;
    }
    for (size_t i = 0; i < folders.count; i++) {
        if (folders.flags[i] & NAMESPACE_RECORD) {
            char *prefix = strdup(folders.mailboxes[i]);
            if (prefix) {
                free(account->namespace_prefix);
                account->namespace_prefix = prefix;
            }
            continue;
        }
        mailboxes[used].name = folders.mailboxes[i];
        mailboxes[used].delimiter = folders.delimiters[i];
        mailboxes[used].flags = folders.flags[i];
        used++;
    }
    int ret = apply_mailboxes(account, mailboxes, used);
    free(mailboxes); /* names belong to folders */
    cache_disk_folders_free(&folders);
    return ret;
}

/* Makes the folder tree match a LIST result; returns how many folders
 * came, went or moved. */
static int apply_mailboxes(struct fs_account *account, const struct imap_mailbox *mailboxes,
                           size_t count)
{
    size_t used = 0;
    int ret = 0;
    struct cache_mailbox_entry *entries = calloc(count ? count : 1, sizeof(*entries));
    char ***paths = calloc(count ? count : 1, sizeof(*paths));
    if (!entries || !paths) {
        ret = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        size_t depth;
        char **components = mailbox_components(&mailboxes[i], account->namespace_prefix, &depth);
        if (!components)
            continue;
        paths[used] = components;
        entries[used].mailbox = mailboxes[i].name;
        entries[used].components = (const char *const *)components;
        entries[used].depth = depth;
        entries[used].delimiter = mailboxes[i].delimiter;
        entries[used].noselect = (mailboxes[i].flags & IMAP_MAILBOX_NOSELECT) != 0;
        used++;
    }
    cache_lock(account->cache);
    size_t before_count = 0;
    struct folder_place *before = folder_places(account->cache, &before_count);
    ret = cache_folders_sync(account->cache, entries, used, NULL, NULL);
    if (ret == 0)
        ret = notify_folder_changes(account, before, before_count);
    for (size_t i = 0; i < before_count; i++)
        free(before[i].name);
    free(before);
    for (size_t i = 0; i < count; i++) {
        if (mailboxes[i].delimiter && strcasecmp(mailboxes[i].name, "INBOX") == 0)
            account->delimiter = mailboxes[i].delimiter;
        if ((mailboxes[i].flags & IMAP_MAILBOX_TRASH) && !account->special_trash)
            account->special_trash = strdup(mailboxes[i].name);
    }
    cache_unlock(account->cache);
out:
    for (size_t i = 0; paths && i < used; i++) {
        for (size_t j = 0; j < entries[i].depth; j++)
            free(paths[i][j]);
        free(paths[i]);
    }
    free(paths);
    free(entries);
    return ret;
}

/* ---------------------------------------------------------------- UID tables */

struct table_builder {
    struct cache_message *messages;
    size_t count, cap;
    int unsorted;
    struct fs_account *account;     /* with stream: where readdir sees it grow */
    struct listing_stream *stream;
    size_t published;
};

#define STREAM_STEP 256             /* messages per publication to readdir */

/* Shows readdir what arrived since the last call. */
static void stream_publish(struct table_builder *table)
{
    struct listing_stream *stream = table->stream;
    size_t n = table->count - table->published;
    int ret = 0;

    pthread_mutex_lock(&table->account->stream_lock);
    if (table->unsorted)
        stream->unsorted = 1;
    if (!stream->unsorted && n) {
        if (stream->count + n > stream->cap) {
            size_t cap = stream->cap ? stream->cap * 2 : 4096;
            while (cap < stream->count + n)
                cap *= 2;
            struct cache_message *grown = realloc(stream->messages, cap * sizeof(*grown));
            if (!grown) {
                stream->unsorted = 1; /* readers wait for the whole table */
                ret = -ENOMEM;
            } else {
                stream->messages = grown;
                stream->cap = cap;
            }
        }
        for (size_t i = table->published; ret == 0 && i < table->count; i++) {
            /* a retried listing starts again from the first UID */
            if (stream->count && stream->messages[stream->count - 1].uid >= table->messages[i].uid)
                continue;
            stream->messages[stream->count] = table->messages[i];
            stream->messages[stream->count++].keywords = NULL;
        }
    }
    pthread_cond_broadcast(&table->account->stream_grew);
    pthread_mutex_unlock(&table->account->stream_lock);
    table->published = table->count;
}

static int collect_meta(void *context, uint32_t uid, uint64_t size, int64_t internaldate,
                        const struct imap_value *flags)
{
    struct table_builder *table = context;
    struct cache_message message = { .uid = uid, .size = size, .internaldate = internaldate };

    for (size_t i = 0; i < flags->count; i++)
        if (flags->items[i].kind == IMAP_VALUE_ATOM &&
            cache_flags_add(&message.flags, &message.keywords, flags->items[i].str) < 0) {
            free(message.keywords);
            return -ENOMEM;
        }
    if (table->count == table->cap) {
        size_t cap = table->cap ? table->cap * 2 : 256;
        struct cache_message *grown = realloc(table->messages, cap * sizeof(*grown));
        if (!grown) {
            free(message.keywords);
            return -ENOMEM;
        }
        table->messages = grown;
        table->cap = cap;
    }
    if (table->count && table->messages[table->count - 1].uid >= uid)
        table->unsorted = 1;
    table->messages[table->count++] = message;
    if (table->stream && table->count - table->published >= STREAM_STEP)
        stream_publish(table);
    return 0;
}

static int compare_messages(const void *a, const void *b)
{
    uint32_t x = ((const struct cache_message *)a)->uid, y = ((const struct cache_message *)b)->uid;
    return x < y ? -1 : x > y;
}

static void free_table(struct table_builder *table)
{
    for (size_t i = 0; i < table->count; i++)
        free(table->messages[i].keywords);
    free(table->messages);
}

/* Tells the kernel about every UID that is in one sorted table and not in
 * the other: removed files must go, new names may have negative entries.
 * New names are told only while the kernel may hold negative entries in
 * the folder (folder->negative_until): on a first listing, 100,000
 * invalidations would race with the readdirplus that is creating those
 * very entries, and make every file cost a lookup again. */
static void notify_table_changes(struct fs_account *account, const struct cache_folder *folder,
                                 const struct cache_message *old, size_t old_count,
                                 const struct cache_message *new, size_t new_count)
{
    uint32_t folder_id = folder->id;
    int negative = now_monotonic() < folder->negative_until;
    size_t i = 0, j = 0;
    char name[32];

    while (i < old_count || j < new_count) {
        uint32_t changed;
        if (j == new_count || (i < old_count && old[i].uid < new[j].uid)) {
            changed = old[i++].uid;
            cache_bodies_drop(account->bodies, folder_id, changed);
        } else if (i == old_count || new[j].uid < old[i].uid) {
            changed = new[j++].uid;
            if (!negative)
                continue;
        } else {
            i++;
            j++;
            continue;
        }
        fs_name_from_uid(changed, name, sizeof(name));
        fs_notify_entry(account->notifier, fs_ino_folder(folder_id), name);
    }
}

/* Flags-only answers (CHANGEDSINCE) go in a table of their own; size and
 * date there are 0 and never merged. */
static int collect_flags(void *context, uint32_t uid, const struct imap_value *flags)
{
    return collect_meta(context, uid, 0, 0, flags);
}

/* Appends message to table, taking over its keywords. */
static int table_append(struct table_builder *table, struct cache_message *message)
{
    if (table->count == table->cap) {
        size_t cap = table->cap ? table->cap * 2 : 256;
        struct cache_message *grown = realloc(table->messages, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        table->messages = grown;
        table->cap = cap;
    }
    table->messages[table->count++] = *message;
    message->keywords = NULL;
    return 0;
}

static struct cache_message *table_find(struct table_builder *table, uint32_t uid)
{
    size_t lo = cache_messages_lower_bound(table->messages, table->count, uid);
    return lo < table->count && table->messages[lo].uid == uid ? &table->messages[lo] : NULL;
}

static int uid_in(const uint32_t *uids, size_t count, uint32_t uid)
{
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (uids[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < count && uids[lo] == uid;
}

/* What we knew of a folder before a refresh. */
struct folder_snapshot {
    char *mailbox;
    uint32_t uidvalidity, uidnext;
    uint64_t highestmodseq;
    struct cache_message *messages;     /* copy, keywords not copied */
    size_t count;
    int listed;
};

/* Brings table (a copy of the old one, keywords copied) up to date with only
 * what changed, using CONDSTORE: new UIDs, flags changed since the old
 * HIGHESTMODSEQ, and UIDs gone.  The cost follows the changes, not the
 * folder's size.  -EAGAIN: fall back to a full listing. */
static int refresh_incremental(struct imap_session *session, const struct folder_snapshot *old,
                               const struct imap_mailbox_state *state,
                               struct table_builder *table)
{
    struct table_builder added = { 0 }, changed = { 0 };
    uint32_t *present = NULL, *vanished = NULL;
    size_t present_count = 0, vanished_count = 0, gone = 0;
    int ret = 0;

    if (old->uidnext && state->uidnext > old->uidnext)
        ret = imap_fetch_meta(session, old->uidnext, 0, collect_meta, &added);
    /* With QRESYNC the flags fetch also names the UIDs expunged since
     * (VANISHED (EARLIER)); without it, only the count tells whether any
     * were, and then every UID is asked for (UID SEARCH ALL). */
    if (ret == 0 && old->uidnext > 1 && imap_session_qresync(session))
        ret = imap_fetch_changes(session, 1, old->uidnext - 1, old->highestmodseq, collect_flags,
                                 &changed, &vanished, &vanished_count);
    else if (ret == 0 && old->uidnext > 1)
        ret = imap_fetch_flags(session, 1, old->uidnext - 1, old->highestmodseq, collect_flags,
                               &changed);
    for (size_t i = 0; ret == 0 && vanished && i < old->count; i++)
        gone += uid_in(vanished, vanished_count, old->messages[i].uid);
    /* a count that does not add up: ask for every UID (or VANISHED missed one) */
    if (ret == 0 && old->count - gone + added.count != state->exists)
        ret = imap_search_all(session, &present, &present_count);
    if (ret < 0)
        goto out;

    if (changed.unsorted)
        qsort(changed.messages, changed.count, sizeof(*changed.messages), compare_messages);
    /* old table, minus the UIDs gone, with the new flags, plus the new UIDs */
    for (size_t i = 0; i < old->count; i++) {
        struct cache_message message = old->messages[i];
        if (present ? !uid_in(present, present_count, message.uid)
                    : vanished && uid_in(vanished, vanished_count, message.uid))
            continue;
        struct cache_message *update = table_find(&changed, message.uid);
        if (update) {
            message.flags = update->flags;
            message.keywords = update->keywords;
            update->keywords = NULL;
        } else if (message.keywords && !(message.keywords = strdup(message.keywords))) {
            ret = -ENOMEM;
            goto out;
        }
        if ((ret = table_append(table, &message)) < 0) {
            free(message.keywords);
            goto out;
        }
    }
    for (size_t i = 0; i < added.count; i++) {
        if (table->count && table->messages[table->count - 1].uid >= added.messages[i].uid)
            continue;
        if ((ret = table_append(table, &added.messages[i])) < 0)
            goto out;
    }
    if (table->count != state->exists)
        ret = -EAGAIN; /* something did not add up: list in full */
out:
    free_table(&added);
    free_table(&changed);
    free(present);
    free(vanished);
    return ret;
}

static int snapshot_folder(struct fs_account *account, uint32_t folder_id, int force,
                           struct folder_snapshot *old)
{
    memset(old, 0, sizeof(*old));
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    if (force != FS_LOAD_WATCHER)
        folder->used_at = now_monotonic();
    if (!folder->selectable ||
        (!force && folder->listed_at > 0 &&
         now_monotonic() - folder->listed_at < account->dir_cache_timeout)) {
        cache_unlock(account->cache);
        return 1; /* fresh enough */
    }
    old->mailbox = strdup(folder->mailbox);
    old->uidvalidity = folder->uidvalidity;
    old->uidnext = folder->uidnext;
    old->highestmodseq = folder->highestmodseq;
    old->listed = folder->uidvalidity != 0; /* a table from this mount or from disk */
    if (old->listed && folder->count) {
        old->messages = malloc(folder->count * sizeof(*old->messages));
        if (old->messages) {
            memcpy(old->messages, folder->messages, folder->count * sizeof(*old->messages));
            for (size_t i = 0; i < folder->count; i++)
                old->messages[i].keywords = folder->messages[i].keywords ?
                                            strdup(folder->messages[i].keywords) : NULL;
            old->count = folder->count;
        } else {
            old->listed = 0; /* no copy: list in full */
        }
    }
    cache_unlock(account->cache);
    return old->mailbox ? 0 : -ENOMEM;
}

static void snapshot_free(struct folder_snapshot *old)
{
    for (size_t i = 0; i < old->count; i++)
        free(old->messages[i].keywords);
    free(old->messages);
    free(old->mailbox);
}

/* One refresh attempt on one session. */
static int refresh_folder(struct fs_account *account, const struct folder_snapshot *old,
                          struct imap_mailbox_state *state, struct table_builder *table)
{
    struct imap_session *session;
    int ret = session_acquire(account, old->mailbox, &session);

    if (ret < 0)
        return -ENOTCONN; /* not a broken session: no point in a retry */
    ret = imap_select_fresh(session, old->mailbox, 1, state);
    if (ret == 0 && old->listed && old->uidvalidity == state->uidvalidity &&
        old->highestmodseq && state->highestmodseq &&
        imap_session_has_capability(session, "CONDSTORE")) {
        if (state->highestmodseq == old->highestmodseq && state->uidnext == old->uidnext &&
            state->exists == old->count) {
            ret = 1; /* nothing changed */
        } else {
            ret = refresh_incremental(session, old, state, table);
            /* counts that do not add up, or an answer we could not read
             * (a malformed VANISHED, say; the command completed, so the
             * session is still in step): list in full instead */
            if (ret == -EAGAIN || ret == -EPROTO) {
                free_table(table);
                memset(table, 0, sizeof(*table));
                ret = 0;
                goto full;
            }
        }
        session_release(account, session);
        return ret;
    }
full:
    if (ret == 0)
        ret = imap_fetch_meta(session, 1, 0, collect_meta, table);
    session_release(account, session);
    return ret;
}

/* A folder this mount has not listed yet starts from the listing saved on
 * disk: it shows at once (also offline), and the refresh that follows asks
 * the server only for what changed since (CONDSTORE). */
static void listing_from_disk(struct fs_account *account, uint32_t folder_id)
{
    struct cache_disk_listing listing;
    char *mailbox = NULL;

    if (!account->disk)
        return;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->selectable && folder->uidvalidity == 0 && folder->listed_at == 0)
        mailbox = strdup(folder->mailbox);
    cache_unlock(account->cache);
    if (!mailbox)
        return;
    if (cache_disk_listing_load(account->disk, mailbox, &listing) == 0) {
        cache_lock(account->cache);
        folder = cache_folder_by_id(account->cache, folder_id);
        if (folder && folder->uidvalidity == 0 &&
            cache_folder_set_messages(folder, listing.messages, listing.count) == 0) {
            folder->uidvalidity = listing.uidvalidity;
            folder->uidnext = listing.uidnext;
            folder->highestmodseq = listing.highestmodseq;
            listing.messages = NULL;
            listing.count = 0;
        }
        cache_unlock(account->cache);
        for (size_t i = 0; i < listing.count; i++)
            free(listing.messages[i].keywords);
        free(listing.messages);
    }
    free(mailbox);
}

static void listing_to_disk(struct fs_account *account, uint32_t folder_id)
{
    struct cache_disk_listing listing = { 0 };
    char *mailbox = NULL;

    if (!account->disk)
        return;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->mailbox) {
        mailbox = strdup(folder->mailbox);
        listing.uidvalidity = folder->uidvalidity;
        listing.uidnext = folder->uidnext;
        listing.highestmodseq = folder->highestmodseq;
        listing.messages = malloc((folder->count ? folder->count : 1) * sizeof(*listing.messages));
        if (listing.messages) {
            /* keywords are shared with the cache's table, read outside the
             * lock: copy them too, the table may change meanwhile */
            if (folder->count) /* an empty folder has no array at all */
                memcpy(listing.messages, folder->messages,
                       folder->count * sizeof(*listing.messages));
            listing.count = folder->count;
            for (size_t i = 0; i < listing.count; i++)
                if (listing.messages[i].keywords)
                    listing.messages[i].keywords = strdup(listing.messages[i].keywords);
        }
    }
    cache_unlock(account->cache);
    if (mailbox && listing.messages)
        cache_disk_listing_save(account->disk, mailbox, &listing);
    for (size_t i = 0; i < listing.count; i++)
        free(listing.messages[i].keywords);
    free(listing.messages);
    free(mailbox);
}

int fs_account_load_folder(struct fs_account *account, uint32_t folder_id, int force)
{
    struct folder_snapshot old;
    struct imap_mailbox_state state;
    struct table_builder table = { 0 };

    /* A first listing streaming in another thread: its table, not a second
     * listing (readdir may have shown names the table does not have yet). */
    pthread_mutex_lock(&account->stream_lock);
    for (;;) {
        struct listing_stream *stream = account->streams;
        while (stream && (stream->folder_id != folder_id ||
                          pthread_equal(stream->owner, pthread_self())))
            stream = stream->next;
        if (!stream)
            break;
        pthread_cond_wait(&account->stream_grew, &account->stream_lock);
    }
    pthread_mutex_unlock(&account->stream_lock);
    listing_from_disk(account, folder_id);
    int ret = snapshot_folder(account, folder_id, force, &old);

    if (ret != 0)
        return ret > 0 ? 0 : ret;
    if (!old.listed) { /* a first listing: readdir may be waiting for it */
        pthread_mutex_lock(&account->stream_lock);
        for (struct listing_stream *stream = account->streams; stream; stream = stream->next)
            if (stream->folder_id == folder_id && pthread_equal(stream->owner, pthread_self()))
                table.stream = stream;
        pthread_mutex_unlock(&account->stream_lock);
        table.account = account;
    }
    ret = refresh_folder(account, &old, &state, &table);
    if (ret == -EIO) { /* a session broke while in use */
        /* Listing is idempotent: once more on a fresh connection (the pooled
         * one may have been closed by the server while idle). */
        struct listing_stream *stream = table.stream;
        free_table(&table);
        memset(&table, 0, sizeof(table));
        table.account = account;
        table.stream = stream; /* it skips what readdir was shown already */
        ret = refresh_folder(account, &old, &state, &table);
    }
    if (ret < 0 && ret != -ENOENT && ret != -ENOMEM)
        ret = -EIO; /* a protocol error or a refusal is an I/O error to the caller */
    if (ret < 0) {
        long second = (long)now_monotonic(), last = atomic_load(&account->stale_warned_at);
        if (!old.listed || ret == -ENOENT)
            log_warn("cannot list %s: %s", old.mailbox, strerror(-ret));
        else if ((last == 0 || second - last >= 60) &&
                 atomic_compare_exchange_strong(&account->stale_warned_at, &last, second))
            log_warn("cannot list %s: %s; serving what is cached (said at most once a minute)",
                     old.mailbox, strerror(-ret));
        free_table(&table);
        if (old.listed && ret != -ENOENT)
            ret = 0; /* offline: the last listing is better than an error */
        snapshot_free(&old);
        return ret;
    }
    if (table.unsorted) {
        qsort(table.messages, table.count, sizeof(*table.messages), compare_messages);
        size_t unique = 0;
        for (size_t i = 0; i < table.count; i++) {
            if (unique && table.messages[unique - 1].uid == table.messages[i].uid)
                free(table.messages[i].keywords);
            else
                table.messages[unique++] = table.messages[i];
        }
        table.count = unique;
    }

    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder) {
        cache_unlock(account->cache);
        free_table(&table);
        snapshot_free(&old);
        return -ENOENT;
    }
    if (ret == 1) { /* unchanged */
        folder->listed_at = now_monotonic();
        cache_unlock(account->cache);
        snapshot_free(&old);
        return 0;
    }
    int reset = folder->uidvalidity && folder->uidvalidity != state.uidvalidity;
    if (reset) {
        log_info("%s: UIDVALIDITY changed, dropping its cache", old.mailbox);
        /* The same names may now be other messages: the kernel must forget
         * every old one, its pages and attributes too, not just the names
         * that went away. */
        for (size_t i = 0; i < folder->count; i++) {
            char name[32];
            fs_name_from_uid(folder->messages[i].uid, name, sizeof(name));
            fs_notify_entry(account->notifier, fs_ino_folder(folder_id), name);
            fs_notify_inode(account->notifier, fs_ino_message(folder_id, folder->messages[i].uid));
        }
        cache_folder_reset(folder, state.uidvalidity);
        folder->reset_at = now_monotonic();
        cache_bodies_drop_folder(account->bodies, folder_id);
        if (account->disk)
            cache_disk_drop_mailbox(account->disk, old.mailbox);
    }
    /* The kernel learns what changed against the table it was shown. */
    notify_table_changes(account, folder, folder->messages, folder->count, table.messages,
                         table.count);
    folder->uidvalidity = state.uidvalidity;
    folder->uidnext = state.uidnext;
    folder->highestmodseq = state.highestmodseq;
    ret = cache_folder_set_messages(folder, table.messages, table.count);
    if (ret == 0)
        folder->listed_at = now_monotonic();
    cache_unlock(account->cache);
    if (ret < 0)
        free_table(&table);
    else
        listing_to_disk(account, folder_id);
    snapshot_free(&old);
    return ret;
}

/* ---------------------------------------------------------------- streamed listings
 *
 * ls -l of a folder of 100,000 messages would otherwise wait for the whole
 * UID FETCH before the first entry, and only then start making 100,000
 * kernel inodes: the two can overlap.  A first listing (nothing in memory,
 * nothing on disk) therefore lets opendir answer at once; the opendir
 * thread then lists, publishing every STREAM_STEP messages, and readdir
 * waits only for the entries it is about to return.  Offsets are UIDs, so
 * the readdir that follows the end reads on from the folder's table. */

/* A folder is listed for the first time: a reader may go through it next
 * (grep -r, find, rsync, tar list a folder before they read it), so the
 * read-ahead threads open their connections now, while the listing
 * arrives.  Not with a download budget, which turns read-ahead off. */
static void warm_for_scan(struct fs_account *account, uint32_t folder_id)
{
    if (account->max_download)
        return;
    char *mailbox = folder_mailbox(account, folder_id);
    if (!mailbox)
        return;
    pthread_mutex_lock(&account->readahead_lock);
    free(account->warm_mailbox);
    account->warm_mailbox = mailbox;
    account->warm_wanted = READAHEAD_THREADS;
    pthread_cond_broadcast(&account->readahead_wake);
    pthread_mutex_unlock(&account->readahead_lock);
}

int fs_account_stream_begin(struct fs_account *account, uint32_t folder_id)
{
    if (fs_account_offline(account))
        return 0;
    listing_from_disk(account, folder_id);
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    int first = folder && folder->selectable && folder->listed_at == 0 && folder->uidvalidity == 0;
    cache_unlock(account->cache);
    if (!first)
        return 0;
    struct listing_stream *stream;
    pthread_mutex_lock(&account->stream_lock);
    for (stream = account->streams; stream; stream = stream->next)
        if (stream->folder_id == folder_id)
            break;
    int ret = 2;
    if (!stream) {
        stream = calloc(1, sizeof(*stream));
        ret = 0;
        if (stream) {
            stream->folder_id = folder_id;
            stream->owner = pthread_self();
            stream->next = account->streams;
            account->streams = stream;
            ret = 1;
        }
    }
    pthread_mutex_unlock(&account->stream_lock);
    if (ret == 1)
        warm_for_scan(account, folder_id);
    return ret;
}

void fs_account_stream_run(struct fs_account *account, uint32_t folder_id)
{
    int ret = fs_account_load_folder(account, folder_id, 0);
    if (ret < 0)
        log_debug("streamed listing of folder %u: %s", folder_id, strerror(-ret));
    /* the table is in place (or the listing failed, and readdir lists again) */
    pthread_mutex_lock(&account->stream_lock);
    struct listing_stream **link = &account->streams, *stream = NULL;
    for (; *link; link = &(*link)->next)
        if ((*link)->folder_id == folder_id && pthread_equal((*link)->owner, pthread_self())) {
            stream = *link;
            *link = stream->next;
            break;
        }
    pthread_cond_broadcast(&account->stream_grew);
    pthread_mutex_unlock(&account->stream_lock);
    if (stream)
        free(stream->messages);
    free(stream);
}

size_t fs_account_stream_read(struct fs_account *account, uint32_t folder_id, uint32_t after,
                              struct cache_message *out, size_t max)
{
    size_t n = 0;

    pthread_mutex_lock(&account->stream_lock);
    for (;;) {
        struct listing_stream *stream;
        for (stream = account->streams; stream; stream = stream->next)
            if (stream->folder_id == folder_id)
                break;
        if (!stream)
            break;
        if (!stream->unsorted) {
            size_t lo = after == UINT32_MAX ? stream->count
                        : cache_messages_lower_bound(stream->messages, stream->count, after + 1);
            n = stream->count - lo < max ? stream->count - lo : max;
            if (n) {
                memcpy(out, stream->messages + lo, n * sizeof(*out));
                break;
            }
        }
        /* the lister's own network timeout bounds this wait */
        pthread_cond_wait(&account->stream_grew, &account->stream_lock);
    }
    pthread_mutex_unlock(&account->stream_lock);
    return n;
}

/* ---------------------------------------------------------------- bodies */

static struct inflight *inflight_find(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    struct inflight probe, *found;
    memset(&probe, 0, sizeof(probe));
    probe.key.folder_id = folder_id;
    probe.key.uid = uid;
    HASH_FIND(hh, account->inflight, &probe.key, sizeof(probe.key), found);
    return found;
}

/* Marks one message in flight.  Caller holds inflight_lock. */
static int inflight_mark(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    struct inflight *entry = calloc(1, sizeof(*entry));
    if (!entry)
        return -ENOMEM;
    entry->key.folder_id = folder_id;
    entry->key.uid = uid;
    HASH_ADD(hh, account->inflight, key, sizeof(entry->key), entry);
    return 0;
}

/* Clears one in-flight mark and wakes whoever waits for it.  Caller holds
 * inflight_lock. */
static void inflight_clear(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    struct inflight *entry = inflight_find(account, folder_id, uid);
    if (entry) {
        HASH_DEL(account->inflight, entry);
        free(entry);
        pthread_cond_broadcast(&account->inflight_done);
    }
}

/* -o max_download: a daily budget for message bytes, for providers that
 * lock an account that downloads too much.  Over it, fetches fail with
 * EDQUOT and one log line says why; cached mail is still served. */
static int budget_check(struct fs_account *account)
{
    if (!account->max_download)
        return 0;
    pthread_mutex_lock(&account->budget_lock);
    long today = (long)(time(NULL) / 86400);
    if (today != account->download_day) {
        account->download_day = today;
        account->downloaded = 0;
        account->budget_warned = 0;
    }
    int over = account->downloaded >= account->max_download;
    if (over && !account->budget_warned) {
        log_error("the daily download budget (-o max_download=%llu bytes) is used up; "
                  "messages not yet cached cannot be read until 00:00 UTC",
                  (unsigned long long)account->max_download);
        account->budget_warned = 1;
    }
    pthread_mutex_unlock(&account->budget_lock);
    return over ? -EDQUOT : 0;
}

static void budget_spend(struct fs_account *account, size_t bytes)
{
    if (!account->max_download)
        return;
    pthread_mutex_lock(&account->budget_lock);
    account->downloaded += bytes;
    pthread_mutex_unlock(&account->budget_lock);
}

struct body_batch {
    struct fs_account *account;
    const char *mailbox;            /* for the disk cache */
    uint32_t folder_id, uidvalidity, wanted_uid;   /* wanted_uid 0: a prefetch */
    struct cache_body *wanted;      /* referenced once it arrives */
};

/* A body fetched ahead of its reader goes into the body cache and, when
 * not larger than a batch, into the kernel's page cache as well: the
 * reader's open then finds its pages there and reads without a READ
 * round trip.  A body whose size differs from the listing's is pushed too:
 * its open bypasses the page cache (direct_io), and a size corrected from
 * the server was invalidated in the kernel before this store, in the same
 * queue. */
static void push_to_kernel(struct fs_account *account, const struct body_batch *batch,
                           uint32_t uid, char *data, size_t len)
{
    if (len > BATCH_BYTES) {
        cache_body_store(account->bodies, batch->folder_id, batch->uidvalidity, uid, data, len);
        return;
    }
    struct cache_body *body = cache_body_insert(account->bodies, batch->folder_id,
                                                batch->uidvalidity, uid, data, len);
    if (body)
        fs_notify_store(account->notifier, account, batch->folder_id, batch->uidvalidity, uid,
                        body);
}

int fs_account_uidvalidity_current(struct fs_account *account, uint32_t folder_id,
                                   uint32_t uidvalidity)
{
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    int current = folder && folder->uidvalidity == uidvalidity;
    cache_unlock(account->cache);
    return current;
}

/* Each body goes into the cache the moment its literal is complete, and its
 * in-flight mark is cleared at once: a reader waiting for one message of a
 * batch does not wait for the rest of the batch. */
static int store_body(void *context, uint32_t uid, char *body, size_t len)
{
    struct body_batch *batch = context;
    struct fs_account *account = batch->account;

    budget_spend(account, len);
    /* The size the listing promised must be the size reads deliver. */
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, batch->folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    int resized = message && message->size != len;
    if (resized) {
        log_info("message %u: RFC822.SIZE %llu but %zu bytes fetched; using %zu", uid,
                 (unsigned long long)message->size, len, len);
        message->size = len;
    }
    cache_unlock(account->cache);
    if (resized) /* the kernel holds the old size */
        fs_notify_inode(account->notifier, fs_ino_message(batch->folder_id, uid));

    if (uid == batch->wanted_uid && !batch->wanted) {
        batch->wanted = cache_body_insert(account->bodies, batch->folder_id, batch->uidvalidity,
                                          uid, body, len);
        if (!batch->wanted)
            return -ENOMEM;
    } else {
        push_to_kernel(account, batch, uid, body, len);
    }
    disk_save_later(account, batch->mailbox, batch->folder_id, batch->uidvalidity, uid);
    pthread_mutex_lock(&account->inflight_lock);
    inflight_clear(account, batch->folder_id, uid);
    pthread_mutex_unlock(&account->inflight_lock);
    return 0;
}

/* Picks messages to fetch, from the one at first_uid on (step 1: upwards,
 * -1: downwards, for a reader going backwards), skipping what is
 * cached or already in flight, up to limit messages / BATCH_BYTES, and marks
 * them in flight.  With must_include, the message at first_uid is taken
 * whatever its state (the caller checked it is missing).  With window_end
 * (read-ahead), the batch must start at or before that UID: a request made
 * for a reader's window plans nothing once the window is planned, however
 * late it is taken, and read-ahead never goes further than a batch past the
 * window.  Caller holds inflight_lock; takes the cache lock. */
static int plan_batch(struct fs_account *account, uint32_t folder_id, uint32_t first_uid,
                      int step, size_t limit, int must_include, uint32_t window_end,
                      uint32_t *uids, size_t *count, uint32_t *uidvalidity, char **mailbox)
{
    struct cache_folder *folder;
    uint64_t bytes = 0;
    size_t n = 0;

    *count = 0;
    cache_lock(account->cache);
    folder = cache_folder_by_id(account->cache, folder_id);
    struct cache_message *first = NULL;
    if (folder) { /* the first message with uid >= first_uid */
        size_t at = cache_folder_lower_bound(folder, first_uid);
        first = at < folder->count ? &folder->messages[at] : NULL;
    }
    if (!first || (must_include && first->uid != first_uid)) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    *uidvalidity = folder->uidvalidity;
    *mailbox = strdup(folder->mailbox);
    if (!*mailbox) {
        cache_unlock(account->cache);
        return -ENOMEM;
    }
    /* Looks at no more than the read-ahead window: messages skipped because
     * they are cached count too, or a mostly cached folder would make every
     * read walk all the rest of it. */
    size_t examined = 0;
    for (struct cache_message *message = first;
         message >= folder->messages && message < folder->messages + folder->count && n < limit &&
         examined < (limit > 1 ? READAHEAD_MESSAGES + BATCH_MESSAGES : 1);
         message += step, examined++) {
        if (!(must_include && message == first)) {
            if (n && bytes + message->size > BATCH_BYTES)
                break;
            if (!n && window_end &&
                (step > 0 ? message->uid > window_end : message->uid < window_end))
                break;
            if (cache_body_contains(account->bodies, folder_id, *uidvalidity, message->uid) ||
                inflight_find(account, folder_id, message->uid))
                continue;
        }
        bytes += message->size;
        uids[n++] = message->uid;
    }
    cache_unlock(account->cache);

    for (size_t i = 0; i < n; i++)
        if (inflight_mark(account, folder_id, uids[i]) < 0) {
            *count = i;
            return -ENOMEM;
        }
    *count = n;
    return 0;
}

/* Fetches the planned batch (retrying once on a fresh connection: fetching
 * is idempotent) and clears whatever in-flight marks are left. */
static int fetch_batch(struct fs_account *account, struct body_batch *batch, const char *mailbox,
                       const uint32_t *uids, size_t count)
{
    int ret = 0, reselected = 0;
    uint32_t *from_server = NULL;

    /* What the disk cache has is read from there (outside every lock); the
     * server is asked only for the rest. */
    if (account->disk && count) {
        from_server = malloc(count * sizeof(*from_server));
        if (from_server) {
            size_t left = 0;
            for (size_t i = 0; i < count; i++) {
                char *data;
                size_t len;
                if (cache_disk_body_load(account->disk, mailbox, batch->uidvalidity, uids[i], &data,
                                         &len) < 0) {
                    from_server[left++] = uids[i];
                    continue;
                }
                if (uids[i] == batch->wanted_uid && !batch->wanted)
                    batch->wanted = cache_body_insert(account->bodies, batch->folder_id,
                                                      batch->uidvalidity, uids[i], data, len);
                else
                    push_to_kernel(account, batch, uids[i], data, len);
                pthread_mutex_lock(&account->inflight_lock);
                inflight_clear(account, batch->folder_id, uids[i]);
                pthread_mutex_unlock(&account->inflight_lock);
            }
            uids = from_server;
            count = left;
        }
    }
    if (count)
        ret = budget_check(account);

    for (int attempt = 0; ret == 0 && attempt < 2 && count; attempt++) {
        struct imap_session *session;
        ret = session_acquire(account, mailbox, &session);
        if (ret < 0)
            break; /* no connection to be had: retrying would wait again */
        if (ret == 0) {
            struct imap_mailbox_state state;
            ret = imap_select(session, mailbox, 1, &state);
            /* This session's selection may predate a delete and re-create of
             * the mailbox: only a fresh SELECT can say it really changed. */
            if (ret == 0 && state.uidvalidity != batch->uidvalidity)
                ret = imap_select_fresh(session, mailbox, 1, &state);
            if (ret == 0 && state.uidvalidity != batch->uidvalidity)
                ret = -ESTALE; /* the folder was rebuilt; its next listing resets the cache */
            if (ret == 0) {
                log_debug("fetching %zu message(s) from %s from UID %u%s", count, mailbox,
                          uids[0], batch->wanted_uid ? "" : " (read-ahead)");
                ret = imap_fetch_bodies(session, uids, count, store_body, batch);
            }
            session_release(account, session);
        }
        if (ret == 0 && batch->wanted_uid && !batch->wanted && !reselected) {
            /* The message is in our listing but this session had the folder
             * selected from before it arrived (a move into it, another
             * client's APPEND): select again and ask once more. */
            reselected = 1;
            if (session_acquire(account, mailbox, &session) == 0) {
                ret = imap_select_fresh(session, mailbox, 1, NULL);
                if (ret == 0)
                    ret = imap_fetch_bodies(session, &batch->wanted_uid, 1, store_body, batch);
                session_release(account, session);
            }
        }
        if (ret != -EIO || (batch->wanted_uid && batch->wanted))
            break;
    }
    pthread_mutex_lock(&account->inflight_lock);
    for (size_t i = 0; i < count; i++)
        inflight_clear(account, batch->folder_id, uids[i]);
    pthread_mutex_unlock(&account->inflight_lock);
    free(from_server);
    return ret;
}

/* ---------------------------------------------------------------- read-ahead
 *
 * A reader that goes through a folder in UID order (grep -r, rg, tar, find
 * -exec) is recognised by reading a message shortly after the one it read
 * before.  For such a scan the read-ahead threads keep the next
 * READAHEAD_MESSAGES messages fetched or in flight, so the network works
 * while the reader reads.  The next batch is asked for (on another
 * connection) while the one before is still arriving: one batch after the
 * other would cost a round trip to the server per batch, most of a cold grep
 * at 20-50 ms.  Read-ahead only ever acts on a read, so it stops when the
 * reader stops, and it never sets \Seen (BODY.PEEK). */

#define SCAN_GAP 8              /* "sequential": within 8 messages of the last read */

static void *readahead_main(void *arg)
{
    struct fs_account *account = arg;

    pthread_mutex_lock(&account->readahead_lock);
    for (;;) {
        while (!account->readahead_stop && !account->readahead_queued && !account->warm_wanted)
            pthread_cond_wait(&account->readahead_wake, &account->readahead_lock);
        if (account->readahead_stop)
            break;
        if (!account->readahead_queued) {
            account->warm_wanted--;
            char *mailbox = strdup(account->warm_mailbox);
            pthread_mutex_unlock(&account->readahead_lock);
            if (mailbox)
                session_warm(account, mailbox);
            free(mailbox);
            pthread_mutex_lock(&account->readahead_lock);
            continue;
        }
        struct readahead_request request = account->readahead_queue[--account->readahead_queued];
        pthread_mutex_unlock(&account->readahead_lock);

        uint32_t uids[BATCH_MESSAGES], uidvalidity = 0;
        size_t count = 0;
        char *mailbox = NULL;
        pthread_mutex_lock(&account->inflight_lock);
        int ret = plan_batch(account, request.folder_id, request.from_uid, request.step,
                             BATCH_MESSAGES, 0, request.window_end, uids, &count,
                             &uidvalidity, &mailbox);
        pthread_mutex_unlock(&account->inflight_lock);
        if (ret == 0 && count) {
            struct body_batch batch = { account, mailbox, request.folder_id, uidvalidity, 0, NULL };
            fetch_batch(account, &batch, mailbox, uids, count);
        }
        free(mailbox);
        pthread_mutex_lock(&account->readahead_lock);
    }
    pthread_mutex_unlock(&account->readahead_lock);
    return NULL;
}

/* Called on every read of a message's body: notes where readers are and,
 * for a scan, asks the read-ahead thread to fill the window after uid in the
 * scan's direction.  A folder keeps a few reader positions, because parallel
 * readers (rg -j4 walks from both ends) scan in several places at once.
 * Returns 0 for a lone read, else the scan's direction (1 or -1). */
static int note_read(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    const size_t cursors = sizeof(((struct cache_folder *)0)->scan_uids) / sizeof(uint32_t);
    uint32_t uidvalidity = 0, gap_uid = 0, window_end = 0;
    int step = 0, end_cached = 0;

    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->count) {
        size_t lo = cache_folder_lower_bound(folder, uid);
        /* A reader was at one of the SCAN_GAP messages around this one. */
        size_t cursor = cursors;
        for (size_t i = lo > SCAN_GAP ? lo - SCAN_GAP : 0;
             cursor == cursors && i < folder->count && i <= lo + SCAN_GAP; i++) {
            if (i == lo)
                continue;
            for (size_t c = 0; c < cursors; c++)
                if (folder->scan_uids[c] && folder->messages[i].uid == folder->scan_uids[c]) {
                    cursor = c;
                    step = i < lo ? 1 : -1;
                    break;
                }
        }
        if (cursor == cursors) { /* a new reader takes the oldest place */
            cursor = folder->scan_next++ % cursors;
            folder->scan_ahead[cursor] = 0;
        }
        folder->scan_uids[cursor] = uid;
        uidvalidity = folder->uidvalidity;
        /* The first message in the window that is not cached yet.  What this
         * reader's last call saw cached is not looked at again: a warm scan
         * would otherwise make READAHEAD_MESSAGES lookups per file. */
        uint32_t ahead = folder->scan_ahead[cursor];
        size_t k = 1;
        if (step > 0 && ahead > uid)
            k = cache_folder_lower_bound(folder, ahead) - lo + 1;
        else if (step < 0 && ahead && ahead < uid)
            k = lo - cache_folder_lower_bound(folder, ahead) + 1;
        for (; step && k <= READAHEAD_MESSAGES; k++) {
            size_t i = step > 0 ? lo + k : lo - k;
            if ((step < 0 && k > lo) || i >= folder->count)
                break;
            uint32_t next = folder->messages[i].uid;
            if (!cache_body_contains(account->bodies, folder_id, uidvalidity, next)) {
                gap_uid = next;
                break;
            }
            folder->scan_ahead[cursor] = next;
        }
        if (gap_uid) {
            /* The window: READAHEAD_MESSAGES after this one, fewer when they
             * add up to more than readahead_bytes (large messages), at least
             * one.  A gap past it waits until the reader comes closer. */
            uint64_t bytes = 0;
            for (size_t w = 1; w <= READAHEAD_MESSAGES; w++) {
                if (step > 0 ? lo + w >= folder->count : w > lo)
                    break;
                const struct cache_message *message = &folder->messages[step > 0 ? lo + w : lo - w];
                bytes += message->size;
                if (w > 1 && bytes > account->readahead_bytes)
                    break;
                window_end = message->uid;
            }
            if (step > 0 ? gap_uid > window_end : gap_uid < window_end)
                gap_uid = 0;
            else
                end_cached = cache_body_contains(account->bodies, folder_id, uidvalidity,
                                                 window_end);
        }
    }
    cache_unlock(account->cache);
    if (!gap_uid || account->max_download) /* no read-ahead on a budget */
        return step;
    /* The first message not cached may be in flight already; then the
     * window's far end says whether another batch is wanted, so that the
     * next batch is fetched while this one arrives and not after it. */
    pthread_mutex_lock(&account->inflight_lock);
    int planned = inflight_find(account, folder_id, gap_uid) &&
                  (end_cached || inflight_find(account, folder_id, window_end));
    pthread_mutex_unlock(&account->inflight_lock);
    if (planned)
        return step;
    struct readahead_request request = { folder_id, gap_uid, step, window_end };
    pthread_mutex_lock(&account->readahead_lock);
    size_t i;
    for (i = 0; i < account->readahead_queued; i++)
        if (account->readahead_queue[i].folder_id == folder_id &&
            account->readahead_queue[i].from_uid == gap_uid)
            break;
    if (i == account->readahead_queued) {
        if (account->readahead_queued == READAHEAD_QUEUE) { /* drop the oldest */
            memmove(account->readahead_queue, account->readahead_queue + 1,
                    (READAHEAD_QUEUE - 1) * sizeof(request));
            account->readahead_queued--;
        }
        account->readahead_queue[account->readahead_queued++] = request;
        pthread_cond_signal(&account->readahead_wake);
    }
    pthread_mutex_unlock(&account->readahead_lock);
    return step;
}

static int body_fetch(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                      struct cache_body **out, int retried_stale);

int fs_account_body(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                    struct cache_body **out)
{
    return body_fetch(account, folder_id, uid, out, 0);
}

static int body_fetch(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                      struct cache_body **out, int retried_stale)
{
    uint32_t uids[BATCH_MESSAGES], uidvalidity = 0;
    size_t count = 0;
    char *mailbox = NULL;
    int ret;

    *out = NULL;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder || !cache_folder_find(folder, uid)) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    uidvalidity = folder->uidvalidity;
    folder->used_at = now_monotonic();
    cache_unlock(account->cache);

    int step = note_read(account, folder_id, uid);
    pthread_mutex_lock(&account->inflight_lock);
    for (;;) {
        *out = cache_body_get(account->bodies, folder_id, uidvalidity, uid);
        if (*out) {
            pthread_mutex_unlock(&account->inflight_lock);
            return 0;
        }
        if (!inflight_find(account, folder_id, uid))
            break;
        pthread_cond_wait(&account->inflight_done, &account->inflight_lock);
    }
    /* A miss.  A scan fetches a batch; a lone read (a mail client opening
     * one message, cat) fetches just its message.  fetch_batch reads from the
     * disk cache whatever it has, the server only the rest. */
    /* With a download budget, only what is read is fetched: read-ahead
     * would spend the budget on mail nobody asked for. */
    size_t batch_limit = step && !account->max_download ? BATCH_MESSAGES : 1;
    ret = plan_batch(account, folder_id, uid, step ? step : 1, batch_limit, 1, 0, uids, &count,
                     &uidvalidity, &mailbox);
    pthread_mutex_unlock(&account->inflight_lock);
    if (ret < 0) {
        pthread_mutex_lock(&account->inflight_lock);
        for (size_t i = 0; i < count; i++)
            inflight_clear(account, folder_id, uids[i]);
        pthread_mutex_unlock(&account->inflight_lock);
        free(mailbox);
        return ret;
    }
    struct body_batch batch = { account, mailbox, folder_id, uidvalidity, uid, NULL };
    ret = fetch_batch(account, &batch, mailbox, uids, count);
    if (ret == -ESTALE && !retried_stale) {
        /* The folder's UIDVALIDITY changed under us: list it again (which
         * drops what was cached) and, if the name still exists, fetch the
         * message it now means. */
        free(mailbox);
        if (fs_account_load_folder(account, folder_id, 1) < 0)
            return -EIO;
        return body_fetch(account, folder_id, uid, out, 1);
    }
    if (ret == 0 && !batch.wanted)
        ret = -ENOENT; /* expunged by someone else meanwhile */
    if (ret < 0 && batch.wanted) {
        cache_body_release(account->bodies, batch.wanted);
        batch.wanted = NULL;
    }
    *out = batch.wanted;
    free(mailbox);
    if (ret < 0 && ret != -ENOENT && ret != -ENOMEM && ret != -EDQUOT)
        ret = -EIO;
    return ret;
}

void fs_account_body_release(struct fs_account *account, struct cache_body *body)
{
    if (body)
        cache_body_release(account->bodies, body);
}

/* ---------------------------------------------------------------- changes
 *
 * Every change checks the server's answer before it touches the cache.
 * When the connection drops in the middle, the command is not blindly sent
 * again: a fresh connection looks at the server to learn whether it
 * happened, and the caller gets the answer that matches. */

uint64_t fs_account_append_limit(const struct fs_account *account)
{
    return account->append_limit;
}

int fs_account_hides_deleted(const struct fs_account *account)
{
    return account->hide_deleted;
}

/* Runs work(session, context) on a pooled session with mailbox selected
 * (EXAMINEd when readonly).  A connection dropped while idle shows only when
 * used, and an outage takes every pooled one at once: when the session turns
 * out broken, the selection and the work (which must be idempotent) are asked
 * again on another, at most max_connections times.  With out, the session is
 * handed to the caller on success instead of released. */
typedef int session_work_fn(struct imap_session *session, void *context);

static int on_selected_session(struct fs_account *account, const char *mailbox, int readonly,
                               session_work_fn *work, void *context, struct imap_session **out)
{
    for (unsigned attempt = 0;; attempt++) {
        struct imap_session *session;
        int ret = session_acquire_for(account, mailbox, !readonly, &session);
        if (ret < 0)
            return ret;
        ret = imap_select(session, mailbox, readonly, NULL);
        if (ret == 0 && work)
            ret = work(session, context);
        if (ret == 0 && out) {
            *out = session;
            return 0;
        }
        int broke = imap_session_broken(session);
        session_release(account, session);
        if (ret == 0 || !broke || attempt >= account->max_connections)
            return ret;
    }
}

static int writable_session(struct fs_account *account, const char *mailbox,
                            struct imap_session **out)
{
    *out = NULL;
    return on_selected_session(account, mailbox, 0, NULL, NULL, out);
}

/* Snapshot of one message and its folder, taken under the cache lock. */
struct message_ref {
    char *mailbox;
    uint32_t uidvalidity;
    struct cache_message message;   /* keywords not copied */
};

static int message_ref_get(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                           struct message_ref *ref)
{
    memset(ref, 0, sizeof(*ref));
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    if (!message) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    ref->mailbox = strdup(folder->mailbox);
    ref->uidvalidity = folder->uidvalidity;
    ref->message = *message;
    ref->message.keywords = NULL;
    cache_unlock(account->cache);
    return ref->mailbox ? 0 : -ENOMEM;
}

/* The server name of a selectable folder; NULL if absent or not selectable. */
static char *folder_mailbox(struct fs_account *account, uint32_t folder_id)
{
    char *mailbox = NULL;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->selectable && folder->mailbox)
        mailbox = strdup(folder->mailbox);
    cache_unlock(account->cache);
    return mailbox;
}

struct exists_probe {
    uint32_t uid;
    struct table_builder table;
};

static int probe_exists(struct imap_session *session, void *context)
{
    struct exists_probe *probe = context;
    free_table(&probe->table); /* from an attempt on a connection that broke */
    memset(&probe->table, 0, sizeof(probe->table));
    return imap_fetch_meta(session, probe->uid, probe->uid, collect_meta, &probe->table);
}

/* Does uid still exist in mailbox?  1, 0, or a negative errno.  Asked after
 * a lost answer, when the other pooled connections may have broken in the
 * same outage (on_selected_session asks again). */
static int uid_exists(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    struct exists_probe probe = { .uid = uid };
    int ret = on_selected_session(account, mailbox, 1, probe_exists, &probe, NULL);
    int found = probe.table.count > 0;
    free_table(&probe.table);
    return ret < 0 ? ret : found;
}

static void forget_message(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder)
        cache_folder_remove(folder, uid);
    cache_unlock(account->cache);
    cache_bodies_drop(account->bodies, folder_id, uid);
}

/* The message now also lives in folder to_id under new_uid: record it when
 * the UIDVALIDITY matches what we know, else have the folder re-listed. */
static void learn_message(struct fs_account *account, uint32_t to_id, uint32_t uidvalidity,
                          const struct cache_message *message)
{
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, to_id);
    if (folder) {
        /* Known at once, so the name resolves right after the change; and
         * when we cannot tell where it went, the folder is listed again. */
        if (message->uid && folder->uidvalidity == uidvalidity)
            cache_folder_upsert(folder, message);
        else
            folder->listed_at = 0;
    }
    cache_unlock(account->cache);
}

/* Flags uid \Deleted and expunges exactly it (UIDPLUS); without UIDPLUS it
 * stays flagged and hidden.  Idempotent, so it is safe to repeat. */
static int expunge_uid(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    struct imap_session *session;
    int ret = writable_session(account, mailbox, &session);

    if (ret < 0)
        return ret;
    ret = imap_uid_store(session, uid, "+FLAGS", "\\Deleted");
    if (ret == 0 && imap_session_has_capability(session, "UIDPLUS"))
        ret = imap_uid_expunge(session, uid);
    session_release(account, session);
    return ret;
}

static int expunge_uid_retrying(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    int ret = expunge_uid(account, mailbox, uid);
    if (ret == -EIO)
        ret = expunge_uid(account, mailbox, uid); /* a fresh connection */
    return ret;
}

/* Finds a message equal to data that appeared in mailbox at or after
 * first_uid: how we learn the UID of an APPEND without APPENDUID, and whether
 * an APPEND whose answer was lost was stored.  *uid = 0 if none. */
struct find_context {
    uint32_t first_uid;
    const char *data;
    size_t len;
    uint32_t found;
};

static int match_body(void *context, uint32_t uid, char *body, size_t len)
{
    struct find_context *find = context;
    if (!find->found && len == find->len && memcmp(body, find->data, len) == 0)
        find->found = uid;
    free(body);
    return 0;
}

/* Fetches the bodies of the UIDs from first_uid on that have the right
 * size, in batches, until one equals the data. */
static int search_appended(struct imap_session *session, void *context)
{
    struct find_context *find = context;
    struct table_builder table = { 0 };
    uint32_t candidates[BATCH_MESSAGES];
    size_t count = 0;

    find->found = 0;
    int ret = imap_fetch_meta(session, find->first_uid, 0, collect_meta, &table);
    for (size_t i = 0; ret == 0 && i < table.count; i++) {
        if (table.messages[i].size == find->len)
            candidates[count++] = table.messages[i].uid;
        if (count == BATCH_MESSAGES || (i + 1 == table.count && count)) {
            ret = imap_fetch_bodies(session, candidates, count, match_body, find);
            count = 0;
            if (find->found)
                break;
        }
    }
    free_table(&table);
    return ret;
}

/* Looks for the message data among mailbox's UIDs from first_uid on (after
 * a lost APPEND or COPY answer); asked again like uid_exists when the pooled
 * connection it got broke too. */
static int find_appended(struct fs_account *account, const char *mailbox, uint32_t first_uid,
                         const char *data, size_t len, uint32_t *uid)
{
    struct find_context find = { first_uid, data, len, 0 };
    int ret = on_selected_session(account, mailbox, 1, search_appended, &find, NULL);
    *uid = find.found;
    return ret;
}

/* MOVE by hand: COPY, then expunge the source only once the copy is known
 * to exist.  If the source cannot be removed, the copy is removed again, so
 * the message is never left in both folders. */
static int move_by_copy(struct fs_account *account, struct imap_session *session,
                        const char *from, uint32_t uid, const char *to,
                        struct imap_copy_result *result)
{
    int ret = imap_uid_copy(session, uid, to, result);
    if (ret < 0)
        return ret;
    ret = imap_uid_store(session, uid, "+FLAGS", "\\Deleted");
    if (ret == 0 && imap_session_has_capability(session, "UIDPLUS"))
        ret = imap_uid_expunge(session, uid);
    if (ret == -EIO)
        ret = expunge_uid_retrying(account, from, uid);
    if (ret < 0 && result->uid) {
        log_error("move of UID %u from %s: copied to %s but the original could not be "
                  "removed (%s); removing the copy", uid, from, to, strerror(-ret));
        if (expunge_uid_retrying(account, to, result->uid) < 0)
            log_error("could not remove the copy UID %u in %s either: the message is in both "
                      "folders", result->uid, to);
    }
    return ret;
}

struct flag_probe {
    int found, deleted;
};

static int probe_flags(void *context, uint32_t uid, const struct imap_value *flags)
{
    struct flag_probe *probe = context;
    (void)uid;
    probe->found = 1;
    for (size_t i = 0; i < flags->count; i++)
        if (imap_value_is_atom(&flags->items[i], "\\Deleted"))
            probe->deleted = 1;
    return 0;
}

/* Before a move by COPY: the source must still be there and not flagged
 * \Deleted (another client, or another mount, may be moving it right now:
 * without MOVE the server cannot make the two exclusive, but a flagged
 * source is the sign).  Also notes the target's UIDNEXT, where to look for
 * the copy should the COPY's answer be lost. */
static int copy_precheck(struct imap_session *session, uint32_t uid, const char *to,
                         uint32_t *to_uidnext)
{
    struct flag_probe probe = { 0, 0 };
    struct imap_mailbox_state state;
    int ret = imap_fetch_flags(session, uid, uid, 0, probe_flags, &probe);

    if (ret < 0)
        return ret;
    if (!probe.found || probe.deleted)
        return -ENOENT;
    *to_uidnext = imap_status(session, to, &state) == 0 ? state.uidnext : 0;
    return 0;
}

int fs_account_move(struct fs_account *account, uint32_t from_id, uint32_t uid, uint32_t to_id,
                    uint32_t *new_uid)
{
    struct message_ref ref;
    struct imap_copy_result result = { 0 };
    struct imap_session *session;
    char *to_mailbox = folder_mailbox(account, to_id);
    int ret;

    *new_uid = 0;
    if (!to_mailbox)
        return -EPERM; /* not a folder that holds messages */
    ret = message_ref_get(account, from_id, uid, &ref);
    if (ret < 0) {
        free(to_mailbox);
        return ret;
    }
    int by_copy = 0;
    uint32_t to_uidnext = 0;
    ret = writable_session(account, ref.mailbox, &session);
    if (ret == 0) {
        ret = imap_uid_move(session, uid, to_mailbox, &result);
        if (ret == -ENOTSUP) {
            by_copy = 1;
            ret = copy_precheck(session, uid, to_mailbox, &to_uidnext);
            if (ret == 0)
                ret = move_by_copy(account, session, ref.mailbox, uid, to_mailbox, &result);
        }
        session_release(account, session);
    }
    if (ret == -EIO && !by_copy) {
        /* The answer was lost.  MOVE is atomic on the server: if the source
         * is gone, it happened. */
        int exists = uid_exists(account, ref.mailbox, uid);
        if (exists == 0) {
            log_info("move of UID %u from %s: connection lost, but the server shows it moved",
                     uid, ref.mailbox);
            ret = 0;
        }
    } else if (ret == -EIO && !result.uid && to_uidnext) {
        /* The COPY's answer was lost: is the copy there?  If so, finish the
         * move; if not, nothing happened.  Never both, never neither. */
        struct cache_body *body;
        uint32_t found = 0;
        if (fs_account_body(account, from_id, uid, &body) == 0) {
            find_appended(account, to_mailbox, to_uidnext, body->data, body->len, &found);
            fs_account_body_release(account, body);
        }
        if (found) {
            ret = expunge_uid_retrying(account, ref.mailbox, uid);
            if (ret == 0) {
                log_info("move of UID %u from %s: connection lost after the copy; finished",
                         uid, ref.mailbox);
                result.uid = found;
            } else if (expunge_uid_retrying(account, to_mailbox, found) < 0) {
                log_error("move of UID %u from %s: the message is in both folders", uid,
                          ref.mailbox);
            }
        }
    }
    if (ret == 0) {
        forget_message(account, from_id, uid);
        struct cache_message moved = ref.message;
        moved.uid = result.uid;
        learn_message(account, to_id, result.uidvalidity, &moved);
        *new_uid = result.uid;
    } else if (ret == -ENOENT) {
        forget_message(account, from_id, uid); /* someone else moved or expunged it */
    }
    free(ref.mailbox);
    free(to_mailbox);
    return ret;
}

/* The folder rm moves to (its id), or 0 for a real expunge. */
static uint32_t trash_folder_id(struct fs_account *account)
{
    struct cache_folder *folder = NULL;
    uint32_t id = 0;

    if (!account->trash)
        return 0;
    cache_lock(account->cache);
    if (strcmp(account->trash, "auto") != 0)
        folder = cache_folder_by_path(account->cache, account->trash);
    else if (account->special_trash)
        for (struct cache_folder *each = account->cache->by_id; each; each = each->hh.next)
            if (each->mailbox && strcmp(each->mailbox, account->special_trash) == 0)
                folder = each;
    if (folder && folder->selectable)
        id = folder->id;
    cache_unlock(account->cache);
    if (!id)
        log_warn("-o trash=%s: no such folder; rm expunges instead", account->trash);
    return id;
}

int fs_account_delete(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    struct message_ref ref;
    uint32_t trash_id = trash_folder_id(account), new_uid;

    if (trash_id && trash_id != folder_id)
        return fs_account_move(account, folder_id, uid, trash_id, &new_uid);
    int ret = message_ref_get(account, folder_id, uid, &ref);
    if (ret < 0)
        return ret;
    ret = expunge_uid_retrying(account, ref.mailbox, uid);
    if (ret == 0) {
        if (account->hide_deleted) {
            /* kept on the server, flagged; the listing hides it */
            cache_lock(account->cache);
            struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
            struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
            if (message)
                message->flags |= CACHE_FLAG_DELETED;
            cache_unlock(account->cache);
        } else {
            forget_message(account, folder_id, uid);
        }
    }
    free(ref.mailbox);
    return ret;
}

/* Reads the metadata of one new message into the cache. */
static int learn_uid(struct fs_account *account, uint32_t folder_id, const char *mailbox,
                     uint32_t uid)
{
    struct imap_session *session;
    struct table_builder table = { 0 };
    struct imap_mailbox_state state;
    int ret = session_acquire(account, mailbox, &session);

    if (ret < 0)
        return ret;
    ret = imap_select(session, mailbox, 1, &state);
    if (ret == 0)
        ret = imap_fetch_meta(session, uid, uid, collect_meta, &table);
    session_release(account, session);
    if (ret == 0 && table.count == 1) {
        table.count = 0; /* its keywords now belong to the cache */
        learn_message(account, folder_id, state.uidvalidity, &table.messages[0]);
    }
    free_table(&table);
    return ret;
}

int fs_account_append(struct fs_account *account, uint32_t folder_id, const char *data,
                      size_t len, int64_t date, uint32_t *new_uid)
{
    struct imap_copy_result result = { 0 };
    struct imap_session *session;
    uint32_t uidnext = 0;
    char *mailbox = folder_mailbox(account, folder_id);
    int ret;

    *new_uid = 0;
    if (!mailbox)
        return -EPERM;
    ret = session_acquire(account, mailbox, &session);
    if (ret == 0) {
        /* UIDNEXT before: where to look if the answer gets lost */
        struct imap_mailbox_state before;
        ret = imap_status(session, mailbox, &before);
        uidnext = before.uidnext;
        if (ret == 0) {
            ret = imap_append(session, mailbox, NULL, date, data, len, &result);
            if (ret < 0 && ret != -EIO)
                log_warn("APPEND to %s refused: %s", mailbox, imap_session_last_error(session));
        }
        session_release(account, session);
    }
    if (ret == 0 && result.uid == 0) {
        /* no APPENDUID: find it */
        ret = find_appended(account, mailbox, uidnext, data, len, &result.uid);
    } else if (ret == -EIO && uidnext) {
        uint32_t found = 0;
        if (find_appended(account, mailbox, uidnext, data, len, &found) == 0 && found) {
            log_info("APPEND to %s: connection lost, but the server has it as UID %u",
                     mailbox, found);
            result.uid = found;
            ret = 0;
        }
    }
    if (ret == 0) {
        *new_uid = result.uid;
        if (!result.uid || learn_uid(account, folder_id, mailbox, result.uid) < 0) {
            cache_lock(account->cache);
            struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
            if (folder)
                folder->listed_at = 0;
            cache_unlock(account->cache);
        }
    }
    free(mailbox);
    return ret;
}

int fs_account_store_flags(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                           const char *flags)
{
    struct message_ref ref;
    struct imap_session *session;
    int ret = message_ref_get(account, folder_id, uid, &ref);

    if (ret < 0)
        return ret;
    ret = writable_session(account, ref.mailbox, &session);
    if (ret == 0) {
        ret = imap_uid_store(session, uid, "FLAGS", flags);
        session_release(account, session);
    }
    if (ret == -EIO) /* setting flags is idempotent: once more on a fresh connection */
        if ((ret = writable_session(account, ref.mailbox, &session)) == 0) {
            ret = imap_uid_store(session, uid, "FLAGS", flags);
            session_release(account, session);
        }
    if (ret == 0) {
        struct cache_message updated = ref.message;
        updated.flags = 0;
        updated.keywords = NULL;
        char *copy = strdup(flags), *save = NULL;
        for (char *atom = copy ? strtok_r(copy, " ", &save) : NULL; atom;
             atom = strtok_r(NULL, " ", &save))
            cache_flags_add(&updated.flags, &updated.keywords, atom);
        free(copy);
        updated.flags |= ref.message.flags & CACHE_FLAG_RECENT;
        cache_lock(account->cache);
        struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
        if (folder && folder->uidvalidity == ref.uidvalidity)
            cache_folder_upsert(folder, &updated);
        else
            free(updated.keywords);
        cache_unlock(account->cache);
    }
    free(ref.mailbox);
    return ret;
}

/* parent's server name + delimiter + child; at the root, the namespace
 * prefix (which ends in its delimiter) + child.  Caller frees. */
static char *join_mailbox(struct fs_account *account, const struct cache_folder *parent,
                          const char *parent_name, const char *child)
{
    char *name = NULL;
    char delimiter = parent->delimiter ? parent->delimiter : account->delimiter;
    if (!parent->parent)
        return asprintf(&name, "%s%s", parent_name, child) < 0 ? NULL : name;
    return asprintf(&name, "%s%c%s", parent_name, delimiter, child) < 0 ? NULL : name;
}

/* The server name of a folder, also for a parent the server did not list
 * (built from its path).  Caller holds the cache lock; caller frees. */
static char *mailbox_of(struct fs_account *account, const struct cache_folder *folder)
{
    if (folder->mailbox)
        return strdup(folder->mailbox);
    if (!folder->parent)
        return strdup(account->namespace_prefix);
    char *parent = mailbox_of(account, folder->parent);
    char *component = fs_name_to_component(folder->name);
    char *encoded = component ? imap_utf7_encode(component) : NULL;
    char *name = parent && encoded ? join_mailbox(account, folder->parent, parent, encoded) : NULL;
    free(parent);
    free(component);
    free(encoded);
    return name;
}

/* The server name for a new child `name` of parent_id.  -EINVAL for a name
 * that cannot be a mailbox level (it holds the delimiter). */
static int child_mailbox(struct fs_account *account, uint32_t parent_id, const char *name,
                         char **out)
{
    int ret = 0;

    *out = NULL;
    char *component = fs_name_to_component(name);
    if (!component)
        return -EINVAL;
    cache_lock(account->cache);
    struct cache_folder *parent = cache_folder_by_id(account->cache, parent_id);
    char delimiter = parent && parent->delimiter ? parent->delimiter : account->delimiter;
    char *prefix = parent ? mailbox_of(account, parent) : NULL;
    cache_unlock(account->cache);
    if (!parent)
        ret = -ENOENT;
    else if (!prefix)
        ret = -ENOMEM;
    else if (strchr(component, delimiter))
        ret = -EINVAL;
    else {
        cache_lock(account->cache);
        parent = cache_folder_by_id(account->cache, parent_id);
        char *encoded = imap_utf7_encode(component);
        *out = parent && encoded ? join_mailbox(account, parent, prefix, encoded) : NULL;
        cache_unlock(account->cache);
        if (!*out)
            ret = parent ? -ENOMEM : -ENOENT;
        free(encoded);
    }
    free(prefix);
    free(component);
    return ret;
}

static int folder_command(struct fs_account *account,
                          int (*command)(struct imap_session *, const char *, const char *),
                          const char *first, const char *second)
{
    struct imap_session *session;
    int ret = session_acquire(account, NULL, &session);
    if (ret < 0)
        return ret;
    ret = command(session, first, second);
    if (ret < 0 && ret != -EIO)
        log_warn("%s: %s", first, imap_session_last_error(session));
    session_release(account, session);
    if (ret == 0 || ret == -EIO) {
        int reload = fs_account_load_folders(account);
        if (ret == 0 && reload < 0)
            ret = reload;
    }
    return ret;
}

static int create_command(struct imap_session *session, const char *mailbox, const char *unused)
{
    (void)unused;
    return imap_create(session, mailbox);
}

static int delete_command(struct imap_session *session, const char *mailbox, const char *unused)
{
    (void)unused;
    return imap_delete(session, mailbox);
}

static int is_inbox(const char *mailbox)
{
    return strcasecmp(mailbox, "INBOX") == 0;
}

int fs_account_create_folder(struct fs_account *account, uint32_t parent_id, const char *name)
{
    char *mailbox;
    int ret = child_mailbox(account, parent_id, name, &mailbox);
    if (ret < 0)
        return ret;
    ret = folder_command(account, create_command, mailbox, NULL);
    free(mailbox);
    return ret;
}

/* The folder `name` in parent_id: its id and whether it has subfolders. */
static int child_folder(struct fs_account *account, uint32_t parent_id, const char *name,
                        uint32_t *id, char **mailbox, int *has_children)
{
    int ret = 0;
    cache_lock(account->cache);
    struct cache_folder *parent = cache_folder_by_id(account->cache, parent_id);
    struct cache_folder *folder = parent ? cache_folder_child(parent, name) : NULL;
    if (!folder) {
        ret = -ENOENT;
    } else {
        *id = folder->id;
        *has_children = folder->children != NULL;
        *mailbox = mailbox_of(account, folder);
        if (!*mailbox)
            ret = -ENOMEM;
    }
    cache_unlock(account->cache);
    return ret;
}

int fs_account_delete_folder(struct fs_account *account, uint32_t parent_id, const char *name)
{
    uint32_t id;
    char *mailbox = NULL;
    int has_children, ret;

    ret = child_folder(account, parent_id, name, &id, &mailbox, &has_children);
    if (ret < 0)
        return ret;
    if (is_inbox(mailbox)) {
        ret = -EPERM;
        goto out;
    }
    if (has_children) {
        ret = -ENOTEMPTY;
        goto out;
    }
    /* Never delete mail: look at the server's current contents first. */
    ret = fs_account_load_folder(account, id, 1);
    if (ret < 0)
        goto out;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, id);
    int listed = folder && folder->listed;
    size_t count = folder ? folder->count : 0;
    cache_unlock(account->cache);
    if (count > 0) {
        ret = -ENOTEMPTY;
        goto out;
    }
    if (!listed) {
        /* a parent the server never listed: it goes when its children go */
        ret = 0;
        goto out;
    }
    ret = folder_command(account, delete_command, mailbox, NULL);
out:
    free(mailbox);
    return ret;
}

int fs_account_rename_folder(struct fs_account *account, uint32_t parent_id, const char *name,
                             uint32_t new_parent_id, const char *new_name)
{
    uint32_t id;
    char *from = NULL, *to = NULL;
    int has_children, ret;

    ret = child_folder(account, parent_id, name, &id, &from, &has_children);
    if (ret == 0)
        ret = child_mailbox(account, new_parent_id, new_name, &to);
    if (ret == 0 && (is_inbox(from) || is_inbox(to)))
        ret = -EPERM;
    if (ret == 0) {
        struct imap_session *session;
        ret = session_acquire(account, NULL, &session);
        if (ret == 0) {
            ret = imap_rename(session, from, to);
            if (ret < 0 && ret != -EIO)
                log_warn("RENAME %s: %s", from, imap_session_last_error(session));
            session_release(account, session);
        }
    }
    if (ret == 0) {
        /* Move it in the cache first, so the LIST that follows finds it at
         * its new path and it keeps its id: the kernel's inode for it (and
         * any process inside it) stays valid. */
        cache_lock(account->cache);
        struct cache_folder *folder = cache_folder_by_id(account->cache, id);
        struct cache_folder *new_parent = cache_folder_by_id(account->cache, new_parent_id);
        if (folder && new_parent)
            cache_folder_move(account->cache, folder, new_parent, new_name, from, to);
        cache_unlock(account->cache);
    }
    if (ret == 0 || ret == -EIO) {
        int reload = fs_account_load_folders(account);
        if (ret == 0 && reload < 0)
            ret = reload;
    }
    free(from);
    free(to);
    return ret;
}

/* ---------------------------------------------------------------- quota */

#define QUOTA_SECONDS 60.0

/* Asks the server for the STORAGE quota on session (nothing is sent
 * without QUOTA).  Caller holds quota_lock, or is the constructor. */
static void quota_ask(struct fs_account *account, struct imap_session *session)
{
    uint64_t used_kib, limit_kib;

    account->quota_at = now_monotonic(); /* also after a failure: df must stay quick */
    int ret = imap_quota_storage(session, "INBOX", &used_kib, &limit_kib);
    account->quota_known = ret == 0;
    if (ret == 0) {
        account->quota_used = used_kib * 1024;
        account->quota_limit = limit_kib * 1024;
    }
}

/* statfs comes from every directory walk (grep -r, find and du call it in
 * each directory they enter), so it never waits for the server: the quota
 * is asked at mount, and again at most once a minute, and only on a
 * connection that is idle right then.  Without one, df shows what was
 * last known. */
int fs_account_quota(struct fs_account *account, uint64_t *used, uint64_t *limit)
{
    pthread_mutex_lock(&account->quota_lock);
    if (account->quota_at == 0 || now_monotonic() - account->quota_at > QUOTA_SECONDS) {
        struct imap_session *session = NULL;
        pthread_mutex_lock(&account->pool_lock);
        int idle = take_idle_locked(account, NULL, 0, &session);
        pthread_mutex_unlock(&account->pool_lock);
        if (idle) {
            quota_ask(account, session);
            session_release(account, session);
        }
    }
    int known = account->quota_known;
    *used = account->quota_used;
    *limit = account->quota_limit;
    pthread_mutex_unlock(&account->quota_lock);
    return known ? 0 : -ENOTSUP;
}

/* ---------------------------------------------------------------- search */

int fs_account_search(struct fs_account *account, uint32_t folder_id, const char *criteria,
                      uint32_t **uids, size_t *count)
{
    struct imap_session *session;
    char *mailbox = folder_mailbox(account, folder_id);
    int ret;

    *uids = NULL;
    *count = 0;
    if (!mailbox)
        return -ENOENT;
    for (int attempt = 0; attempt < 2; attempt++) { /* searching is idempotent */
        ret = session_acquire(account, mailbox, &session);
        if (ret < 0)
            break; /* no connection: no retry */
        /* EXAMINE again: a session selected earlier would answer from the
         * view it had then, without mail that came since */
        ret = imap_select_fresh(session, mailbox, 1, NULL);
        if (ret == 0)
            ret = imap_uid_search(session, criteria, uids, count);
        if (ret == -EINVAL)
            log_warn("search \"%s\" in %s refused: %s", criteria, mailbox,
                     imap_session_last_error(session));
        session_release(account, session);
        if (ret != -EIO)
            break;
    }
    free(mailbox);
    return ret;
}

/* ---------------------------------------------------------------- envelopes */

int fs_account_fetch_envelopes(struct fs_account *account, uint32_t folder_id,
                               uint32_t uidvalidity, uint32_t first, uint32_t last,
                               imap_envelope_fn *fn, void *context)
{
    struct imap_session *session;
    struct imap_mailbox_state state;
    char *mailbox = folder_mailbox(account, folder_id);
    int ret;

    if (!mailbox)
        return -ENOENT;
    for (int attempt = 0; attempt < 2; attempt++) { /* idempotent */
        ret = session_acquire(account, mailbox, &session);
        if (ret < 0)
            break;
        ret = imap_select(session, mailbox, 1, &state);
        /* maybe a stale selection: from before a delete and re-create, or
         * from before the message asked for arrived (the server would not
         * show it to this session yet) */
        if (ret == 0 && (state.uidvalidity != uidvalidity || (last && state.uidnext <= last)))
            ret = imap_select_fresh(session, mailbox, 1, &state);
        if (ret == 0 && state.uidvalidity != uidvalidity)
            ret = -ESTALE;
        if (ret == 0)
            ret = imap_fetch_envelopes(session, first, last, fn, context);
        session_release(account, session);
        if (ret != -EIO)
            break;
    }
    free(mailbox);
    return ret == -ESTALE ? -ENODATA : ret;
}
