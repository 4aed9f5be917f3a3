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
#include "fs/fs.h"
#include "fs/names.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define BATCH_MESSAGES 64
#define BATCH_BYTES (4u << 20)

struct inflight {
    struct { uint32_t folder_id, uid; } key;
    UT_hash_handle hh;
};

struct fs_account {
    struct imap_config config;      /* strings owned below */
    char *password;
    struct cache *cache;
    struct cache_bodies *bodies;
    double dir_cache_timeout;

    pthread_mutex_t pool_lock;
    pthread_cond_t pool_changed;
    struct imap_session **idle;     /* protected by pool_lock */
    size_t idle_count;              /* protected by pool_lock */
    unsigned open_count;            /* sessions idle + in use; protected by pool_lock */
    unsigned max_connections;

    struct fs_notifier *notifier;
    char *trash;                    /* -o trash: a mount path, "auto", or NULL */
    char *special_trash;            /* the \Trash mailbox from LIST; protected by cache lock */
    char delimiter;                 /* for new top-level folders; protected by cache lock */
    int hide_deleted;               /* no UIDPLUS: see fs_account_hides_deleted */

    pthread_mutex_t inflight_lock;
    pthread_cond_t inflight_done;
    struct inflight *inflight;      /* protected by inflight_lock */
};

static double now_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct fs_account *fs_account_new(const struct fs_options *options,
                                  const struct imap_config *config,
                                  struct imap_session *first)
{
    struct fs_account *account = calloc(1, sizeof(*account));

    if (!account)
        return NULL;
    account->config = *config;
    account->max_connections = options->connections;
    account->dir_cache_timeout = options->dir_cache_timeout;
    account->cache = cache_new();
    account->bodies = cache_bodies_new(options->cache_bytes);
    account->idle = calloc(options->connections, sizeof(*account->idle));
    account->notifier = fs_notifier_new();
    account->trash = options->trash ? strdup(options->trash) : NULL;
    account->delimiter = '/';
    if (!account->cache || !account->bodies || !account->idle || !account->notifier ||
        (options->trash && !account->trash)) {
        fs_account_free(account);
        return NULL;
    }
    pthread_mutex_init(&account->pool_lock, NULL);
    pthread_cond_init(&account->pool_changed, NULL);
    pthread_mutex_init(&account->inflight_lock, NULL);
    pthread_cond_init(&account->inflight_done, NULL);
    account->hide_deleted = !imap_session_has_capability(first, "UIDPLUS");
    account->idle[account->idle_count++] = first;
    account->open_count = 1;
    return account;
}

void fs_account_free(struct fs_account *account)
{
    if (!account)
        return;
    for (size_t i = 0; i < account->idle_count; i++)
        imap_session_close(account->idle[i]);
    free(account->idle);
    fs_notifier_free(account->notifier);
    free(account->trash);
    free(account->special_trash);
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

struct cache *fs_account_cache(struct fs_account *account) { return account->cache; }
double fs_account_dir_timeout(const struct fs_account *account) { return account->dir_cache_timeout; }
struct fs_notifier *fs_account_notifier(struct fs_account *account) { return account->notifier; }

/* ---------------------------------------------------------------- the pool */

static int session_acquire(struct fs_account *account, const char *mailbox,
                           struct imap_session **out)
{
    struct timespec deadline;
    int ret = 0;

    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += account->config.timeout;
    pthread_mutex_lock(&account->pool_lock);
    for (;;) {
        if (account->idle_count > 0) {
            size_t pick = account->idle_count - 1;
            for (size_t i = 0; mailbox && i < account->idle_count; i++) {
                const char *selected = imap_session_selected(account->idle[i]);
                if (selected && strcmp(selected, mailbox) == 0) {
                    pick = i;
                    break;
                }
            }
            *out = account->idle[pick];
            account->idle[pick] = account->idle[--account->idle_count];
            pthread_mutex_unlock(&account->pool_lock);
            return 0;
        }
        if (account->open_count < account->max_connections)
            break;
        ret = pthread_cond_timedwait(&account->pool_changed, &account->pool_lock, &deadline);
        if (ret == ETIMEDOUT) {
            pthread_mutex_unlock(&account->pool_lock);
            log_warn("no IMAP connection became free within %d s", account->config.timeout);
            return -EIO;
        }
    }
    account->open_count++;
    pthread_mutex_unlock(&account->pool_lock);

    char err[512];
    ret = imap_session_open(&account->config, out, err, sizeof(err));
    if (ret < 0) {
        log_error("cannot open another IMAP connection: %s", err);
        pthread_mutex_lock(&account->pool_lock);
        account->open_count--;
        pthread_cond_signal(&account->pool_changed);
        pthread_mutex_unlock(&account->pool_lock);
        return -EIO;
    }
    return 0;
}

static void session_release(struct fs_account *account, struct imap_session *session)
{
    pthread_mutex_lock(&account->pool_lock);
    if (imap_session_broken(session)) {
        account->open_count--;
        pthread_mutex_unlock(&account->pool_lock);
        imap_session_close(session);
        pthread_mutex_lock(&account->pool_lock);
    } else {
        account->idle[account->idle_count++] = session;
    }
    pthread_cond_signal(&account->pool_changed);
    pthread_mutex_unlock(&account->pool_lock);
}

/* ---------------------------------------------------------------- folders */

/* Splits a mailbox name at its delimiter, decodes each level from modified
 * UTF-7 and maps it to a safe file name.  NULL (with a log line) for a name
 * that cannot be shown safely. */
static char **mailbox_components(const struct imap_mailbox *mailbox, size_t *depth)
{
    char *decoded = imap_utf7_decode(mailbox->name);
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

int fs_account_load_folders(struct fs_account *account)
{
    struct imap_session *session;
    struct imap_mailbox *mailboxes = NULL;
    size_t count = 0, used = 0;
    int ret = session_acquire(account, NULL, &session);

    if (ret < 0)
        return ret;
    ret = imap_list(session, &mailboxes, &count);
    session_release(account, session);
    if (ret < 0)
        return ret == -EIO ? ret : -EIO;

    struct cache_mailbox_entry *entries = calloc(count ? count : 1, sizeof(*entries));
    char ***paths = calloc(count ? count : 1, sizeof(*paths));
    if (!entries || !paths) {
        ret = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        size_t depth;
        char **components = mailbox_components(&mailboxes[i], &depth);
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
    ret = cache_folders_sync(account->cache, entries, used, NULL, NULL);
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
    imap_mailboxes_free(mailboxes, count);
    return ret;
}

/* ---------------------------------------------------------------- UID tables */

struct table_builder {
    struct cache_message *messages;
    size_t count, cap;
    int unsorted;
};

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

int fs_account_load_folder(struct fs_account *account, uint32_t folder_id, int force)
{
    struct cache_folder *folder;
    struct imap_session *session;
    struct imap_mailbox_state state;
    struct table_builder table = { 0 };
    char *mailbox;
    int ret;

    cache_lock(account->cache);
    folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    if (!folder->selectable ||
        (!force && folder->listed_at > 0 &&
         now_monotonic() - folder->listed_at < account->dir_cache_timeout)) {
        cache_unlock(account->cache);
        return 0;
    }
    mailbox = strdup(folder->mailbox);
    cache_unlock(account->cache);
    if (!mailbox)
        return -ENOMEM;

    ret = session_acquire(account, mailbox, &session);
    if (ret < 0)
        goto out;
    ret = imap_select(session, mailbox, 1, &state);
    if (ret == 0)
        ret = imap_fetch_meta(session, 1, 0, collect_meta, &table);
    session_release(account, session);
    if (ret < 0) {
        log_warn("cannot list %s: %s", mailbox, strerror(-ret));
        goto out;
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
    folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder) {
        cache_unlock(account->cache);
        free_table(&table);
        ret = -ENOENT;
        goto out;
    }
    if (folder->uidvalidity && folder->uidvalidity != state.uidvalidity) {
        log_info("%s: UIDVALIDITY changed, dropping its cache", mailbox);
        cache_folder_reset(folder, state.uidvalidity);
        cache_bodies_drop_folder(account->bodies, folder_id);
    }
    folder->uidvalidity = state.uidvalidity;
    folder->uidnext = state.uidnext;
    folder->highestmodseq = state.highestmodseq;
    ret = cache_folder_set_messages(folder, table.messages, table.count);
    if (ret == 0)
        folder->listed_at = now_monotonic();
    cache_unlock(account->cache);
    if (ret < 0)
        free_table(&table);
out:
    free(mailbox);
    return ret;
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

struct body_batch {
    struct fs_account *account;
    uint32_t folder_id, uidvalidity, wanted_uid;
    struct cache_body *wanted;      /* referenced once it arrives */
};

static int store_body(void *context, uint32_t uid, char *body, size_t len)
{
    struct body_batch *batch = context;
    struct fs_account *account = batch->account;

    /* The size the listing promised must be the size reads deliver. */
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, batch->folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    if (message && message->size != len) {
        log_info("message %u: RFC822.SIZE %llu but %zu bytes fetched; using %zu", uid,
                 (unsigned long long)message->size, len, len);
        message->size = len;
    }
    cache_unlock(account->cache);

    if (uid == batch->wanted_uid && !batch->wanted) {
        batch->wanted = cache_body_insert(account->bodies, batch->folder_id, batch->uidvalidity,
                                          uid, body, len);
        return batch->wanted ? 0 : -ENOMEM;
    }
    cache_body_store(account->bodies, batch->folder_id, batch->uidvalidity, uid, body, len);
    return 0;
}

/* Picks uid and the uncached, not-in-flight messages after it, and marks
 * them in flight.  Caller holds inflight_lock; takes the cache lock. */
static int plan_batch(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                      uint32_t *uids, size_t *count, uint32_t *uidvalidity, char **mailbox)
{
    struct cache_folder *folder;
    uint64_t bytes = 0;
    size_t n = 0;

    cache_lock(account->cache);
    folder = cache_folder_by_id(account->cache, folder_id);
    struct cache_message *first = folder ? cache_folder_find(folder, uid) : NULL;
    if (!first) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    *uidvalidity = folder->uidvalidity;
    *mailbox = strdup(folder->mailbox);
    if (!*mailbox) {
        cache_unlock(account->cache);
        return -ENOMEM;
    }
    for (struct cache_message *message = first;
         message < folder->messages + folder->count && n < BATCH_MESSAGES; message++) {
        if (message != first) {
            if (bytes + message->size > BATCH_BYTES)
                break;
            if (cache_body_contains(account->bodies, folder_id, *uidvalidity, message->uid) ||
                inflight_find(account, folder_id, message->uid))
                continue;
        }
        bytes += message->size;
        uids[n++] = message->uid;
    }
    cache_unlock(account->cache);

    for (size_t i = 0; i < n; i++) {
        struct inflight *entry = calloc(1, sizeof(*entry));
        if (!entry) {
            *count = i;
            return -ENOMEM;
        }
        entry->key.folder_id = folder_id;
        entry->key.uid = uids[i];
        HASH_ADD(hh, account->inflight, key, sizeof(entry->key), entry);
    }
    *count = n;
    return 0;
}

int fs_account_body(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                    struct cache_body **out)
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
    cache_unlock(account->cache);

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
    ret = plan_batch(account, folder_id, uid, uids, &count, &uidvalidity, &mailbox);
    pthread_mutex_unlock(&account->inflight_lock);
    if (ret < 0)
        goto done;

    struct body_batch batch = { account, folder_id, uidvalidity, uid, NULL };
    struct imap_session *session;
    ret = session_acquire(account, mailbox, &session);
    if (ret == 0) {
        struct imap_mailbox_state state;
        ret = imap_select(session, mailbox, 1, &state);
        if (ret == 0 && state.uidvalidity != uidvalidity)
            ret = -ESTALE; /* the folder was rebuilt; its next listing resets the cache */
        if (ret == 0) {
            log_debug("fetching %zu message(s) from %s starting at UID %u", count, mailbox, uid);
            ret = imap_fetch_bodies(session, uids, count, store_body, &batch);
        }
        session_release(account, session);
    }
    if (ret == 0 && !batch.wanted)
        ret = -ENOENT; /* expunged by someone else meanwhile */
    if (ret < 0 && batch.wanted) {
        cache_body_release(account->bodies, batch.wanted);
        batch.wanted = NULL;
    }
    *out = batch.wanted;
done:
    pthread_mutex_lock(&account->inflight_lock);
    for (size_t i = 0; i < count; i++) {
        struct inflight *entry = inflight_find(account, folder_id, uids[i]);
        if (entry) {
            HASH_DEL(account->inflight, entry);
            free(entry);
        }
    }
    pthread_cond_broadcast(&account->inflight_done);
    pthread_mutex_unlock(&account->inflight_lock);
    free(mailbox);
    if (ret < 0 && ret != -ENOENT && ret != -ENOMEM)
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

int fs_account_hides_deleted(const struct fs_account *account)
{
    return account->hide_deleted;
}

/* Takes a session and selects mailbox read-write. */
static int writable_session(struct fs_account *account, const char *mailbox,
                            struct imap_session **out)
{
    int ret = session_acquire(account, mailbox, out);
    if (ret < 0)
        return ret;
    ret = imap_select(*out, mailbox, 0, NULL);
    if (ret < 0) {
        session_release(account, *out);
        *out = NULL;
    }
    return ret;
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

/* Does uid still exist in mailbox?  1, 0, or a negative errno. */
static int uid_exists(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    struct imap_session *session;
    struct table_builder table = { 0 };
    int ret = session_acquire(account, mailbox, &session);

    if (ret < 0)
        return ret;
    ret = imap_select(session, mailbox, 1, NULL);
    if (ret == 0)
        ret = imap_fetch_meta(session, uid, uid, collect_meta, &table);
    session_release(account, session);
    int found = table.count > 0;
    free_table(&table);
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
        if (message->uid && folder->listed_at > 0 && folder->uidvalidity == uidvalidity)
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

static int find_appended(struct fs_account *account, const char *mailbox, uint32_t first_uid,
                         const char *data, size_t len, uint32_t *uid)
{
    struct imap_session *session;
    struct table_builder table = { 0 };
    struct find_context find = { data, len, 0 };
    uint32_t candidates[BATCH_MESSAGES];
    size_t count = 0;
    int ret = session_acquire(account, mailbox, &session);

    *uid = 0;
    if (ret < 0)
        return ret;
    ret = imap_select(session, mailbox, 1, NULL);
    if (ret == 0)
        ret = imap_fetch_meta(session, first_uid, 0, collect_meta, &table);
    for (size_t i = 0; ret == 0 && i < table.count; i++) {
        if (table.messages[i].size == len)
            candidates[count++] = table.messages[i].uid;
        if (count == BATCH_MESSAGES || (i + 1 == table.count && count)) {
            ret = imap_fetch_bodies(session, candidates, count, match_body, &find);
            count = 0;
            if (find.found)
                break;
        }
    }
    session_release(account, session);
    free_table(&table);
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
    ret = writable_session(account, ref.mailbox, &session);
    if (ret == 0) {
        ret = imap_uid_move(session, uid, to_mailbox, &result);
        if (ret == -ENOTSUP)
            ret = move_by_copy(account, session, ref.mailbox, uid, to_mailbox, &result);
        session_release(account, session);
    }
    if (ret == -EIO) {
        /* The answer was lost.  MOVE is atomic on the server: if the source
         * is gone, it happened. */
        int exists = uid_exists(account, ref.mailbox, uid);
        if (exists == 0) {
            log_info("move of UID %u from %s: connection lost, but the server shows it moved",
                     uid, ref.mailbox);
            ret = 0;
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
    uint32_t uidnext = 0, uidvalidity = 0;
    char *mailbox = folder_mailbox(account, folder_id);
    int ret;

    *new_uid = 0;
    if (!mailbox)
        return -EPERM;
    ret = session_acquire(account, mailbox, &session);
    if (ret == 0) {
        /* UIDNEXT before: where to look if the answer gets lost */
        ret = imap_status_uidnext(session, mailbox, &uidnext, &uidvalidity);
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

/* The server name of a folder, also for a parent the server did not list
 * (built from its path).  Caller holds the cache lock; caller frees. */
static char *mailbox_of(struct fs_account *account, const struct cache_folder *folder)
{
    if (folder->mailbox)
        return strdup(folder->mailbox);
    if (!folder->parent)
        return strdup("");
    char *parent = mailbox_of(account, folder->parent);
    char *component = fs_name_to_component(folder->name);
    char *encoded = component ? imap_utf7_encode(component) : NULL;
    char *name = NULL;
    if (parent && encoded &&
        asprintf(&name, "%s%s%s", parent, *parent ? (char[]){ account->delimiter, 0 } : "",
                 encoded) < 0)
        name = NULL;
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
        char *encoded = imap_utf7_encode(component);
        if (!encoded ||
            asprintf(out, "%s%s%s", prefix, *prefix ? (char[]){ delimiter, 0 } : "", encoded) < 0) {
            *out = NULL;
            ret = -ENOMEM;
        }
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
    if (ret == 0)
        ret = folder_command(account, imap_rename, from, to);
    free(from);
    free(to);
    return ret;
}
