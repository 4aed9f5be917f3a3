/* fs/account.c — the account: what the filesystem asks of it is answered
 * from the cache or, on a miss, from the server.  This file holds its life
 * cycle and its connections; folders.c the folder tree and the UID tables,
 * bodies.c the message bodies (fetching, read-ahead, the disk writer),
 * changes.c what changes mail on the server.  They share fs/account_p.h.
 *
 * Connections: a pool of up to -o connections sessions.  A request takes an
 * idle session (preferring one that already has its folder selected, so a
 * scan does not re-SELECT), opens a new one while under the limit, or waits.
 * A session whose connection broke is closed when handed back; the next
 * request opens a fresh one, which is how we reconnect. */
#include "fs/account_p.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

static void unsolicited(void *context, struct imap_session *session,
                        const struct imap_response *response);
static void quota_ask(struct fs_account *account, struct imap_session *session);

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
    account->readonly = options->readonly;
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
    fs_bodies_stop(account); /* its threads use the pool: first */
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
    free(account);
}

struct cache *fs_account_cache(struct fs_account *account) { return account->cache; }
double fs_account_dir_timeout(const struct fs_account *account) { return account->dir_cache_timeout; }
struct fs_notifier *fs_account_notifier(struct fs_account *account) { return account->notifier; }
struct fs_searches *fs_account_searches(struct fs_account *account) { return account->searches; }
struct fs_mailinfo *fs_account_mailinfo(struct fs_account *account) { return account->mailinfo; }
uint64_t fs_account_append_limit(const struct fs_account *account)
{
    return account->append_limit;
}

int fs_account_hides_deleted(const struct fs_account *account)
{
    return account->hide_deleted;
}

int fs_account_readonly(const struct fs_account *account)
{
    return account->readonly;
}

void fs_account_set_no_open(struct fs_account *account)
{
    account->no_open = 1;
}

int fs_account_no_open(const struct fs_account *account)
{
    return account->no_open;
}

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
int fs_session_acquire_for(struct fs_account *account, const char *mailbox, int writable,
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

int fs_session_acquire(struct fs_account *account, const char *mailbox,
                           struct imap_session **out)
{
    return fs_session_acquire_for(account, mailbox, 0, out);
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

void fs_session_release(struct fs_account *account, struct imap_session *session)
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
void fs_session_warm(struct fs_account *account, const char *mailbox)
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
    fs_session_release(account, session);
}

char *fs_folder_mailbox(struct fs_account *account, uint32_t folder_id)
{
    char *mailbox = NULL;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->selectable && folder->mailbox)
        mailbox = strdup(folder->mailbox);
    cache_unlock(account->cache);
    return mailbox;
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
            fs_session_release(account, session);
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
    char *mailbox = fs_folder_mailbox(account, folder_id);
    int ret;

    *uids = NULL;
    *count = 0;
    if (!mailbox)
        return -ENOENT;
    for (int attempt = 0; attempt < 2; attempt++) { /* searching is idempotent */
        ret = fs_session_acquire(account, mailbox, &session);
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
        fs_session_release(account, session);
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
    char *mailbox = fs_folder_mailbox(account, folder_id);
    int ret;

    if (!mailbox)
        return -ENOENT;
    for (int attempt = 0; attempt < 2; attempt++) { /* idempotent */
        ret = fs_session_acquire(account, mailbox, &session);
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
        fs_session_release(account, session);
        if (ret != -EIO)
            break;
    }
    free(mailbox);
    return ret == -ESTALE ? -ENODATA : ret;
}
