/* fs/bodies.c — message bodies: fetched on a miss, read ahead for a scan,
 * saved to the disk cache in the background.
 *
 * A read of a message that is not cached fetches it together with
 * the next uncached messages of its folder in UID order (up to
 * BATCH_MESSAGES or BATCH_BYTES) in one UID FETCH.  grep -r and find -exec
 * read a directory in listing order, so one round trip serves many files;
 * a random reader pays for a few extra small messages at most.  Messages
 * being fetched are recorded in an in-flight table so that two readers
 * never fetch the same message twice: the second waits for the first. */
#include "fs/account_p.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void *readahead_main(void *arg);

/* ---------------------------------------------------------------- the disk writer */

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

/* Stops the threads fs_account_start started; what the writer has queued
 * is still written.  Then nothing is in flight any more. */
void fs_bodies_stop(struct fs_account *account)
{
    if (account->readahead_running) {
        pthread_mutex_lock(&account->readahead_lock);
        account->readahead_stop = 1;
        pthread_cond_broadcast(&account->readahead_wake);
        pthread_mutex_unlock(&account->readahead_lock);
        for (int i = 0; i < account->readahead_running; i++)
            pthread_join(account->readahead_threads[i], NULL);
    }
    free(account->warm_mailbox);
    account->warm_mailbox = NULL;
    if (account->writer_running) {
        /* what is queued still gets written: it is a cache worth keeping */
        pthread_mutex_lock(&account->writer_lock);
        account->writer_stop = 1;
        pthread_cond_signal(&account->writer_wake);
        pthread_mutex_unlock(&account->writer_lock);
        pthread_join(account->writer_thread, NULL);
    }
    struct inflight *entry, *tmp;
    HASH_ITER(hh, account->inflight, entry, tmp) {
        HASH_DEL(account->inflight, entry);
        free(entry);
    }
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

/* Clears one in-flight mark and wakes whoever waits for it.  Only a
 * message someone waits for wakes the waiters: a scan's batch lands one
 * body after another, and a reader waiting for one of them would otherwise
 * be woken, on the other vCPU, for each body before it.  Caller holds
 * inflight_lock. */
static void inflight_clear(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    struct inflight *entry = inflight_find(account, folder_id, uid);
    if (entry) {
        int waited = entry->waited;
        HASH_DEL(account->inflight, entry);
        free(entry);
        if (waited)
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

/* In no-open mode (fs/ops.c) a reader's reads of pushed bodies never reach
 * the daemon, and read-ahead would lose the reader: one message in every
 * NO_OPEN_TRIPWIRE of a folder is kept out of the page cache, so its READ
 * (served from the body cache) says where the reader is.  A scan costs one
 * request per NO_OPEN_TRIPWIRE messages, and a scan is recognised within
 * twice that distance. */
#define NO_OPEN_TRIPWIRE 32

/* A body fetched ahead of its reader goes into the body cache and, when
 * not larger than a batch, into the kernel's page cache as well: the
 * reader's open then finds its pages there and reads without a READ
 * round trip.  A body whose size differs from the listing's is pushed too:
 * its open bypasses the page cache (direct_io), and a size corrected from
 * the server was invalidated in the kernel before this store, in the same
 * queue.  position: the message's place in its folder (-1 if unknown), for
 * no-open mode's tripwires. */
static void push_to_kernel(struct fs_account *account, const struct body_batch *batch,
                           uint32_t uid, char *data, size_t len, long position)
{
    int tripwire = account->no_open && position >= 0 && position % NO_OPEN_TRIPWIRE == 0;
    if (len > BATCH_BYTES || tripwire) {
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

/* A body has arrived, from the server or the disk cache.  The size the
 * listing promised must be the size reads deliver: a body that differs
 * corrects it, and the kernel's copy is invalidated.  Not for the body a
 * reader is waiting for: its open or READ handler does that after
 * replying, since an invalidation that lands before a short READ's reply
 * stops the kernel from cutting the file at the real end.  Then the body
 * becomes the reader's (batch->wanted) or goes to the caches.  Takes data
 * over; -ENOMEM when the wanted body cannot be kept. */
static int take_body(struct fs_account *account, struct body_batch *batch, uint32_t uid,
                     char *data, size_t len)
{
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, batch->folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    long position = message ? (long)(message - folder->messages) : -1;
    int resized = message && message->size != len;
    if (resized) {
        log_info("message %u: RFC822.SIZE %llu but %zu bytes fetched; using %zu", uid,
                 (unsigned long long)message->size, len, len);
        message->size = len;
    }
    cache_unlock(account->cache);
    if (resized && uid != batch->wanted_uid) /* the kernel holds the old size */
        fs_notify_inode(account->notifier, fs_ino_message(batch->folder_id, uid));

    if (uid == batch->wanted_uid && !batch->wanted) {
        batch->wanted = cache_body_insert(account->bodies, batch->folder_id, batch->uidvalidity,
                                          uid, data, len);
        return batch->wanted ? 0 : -ENOMEM;
    }
    push_to_kernel(account, batch, uid, data, len, position);
    return 0;
}

/* Each body goes into the cache the moment its literal is complete, and its
 * in-flight mark is cleared at once: a reader waiting for one message of a
 * batch does not wait for the rest of the batch. */
static int store_body(void *context, uint32_t uid, char *body, size_t len)
{
    struct body_batch *batch = context;
    struct fs_account *account = batch->account;

    budget_spend(account, len);
    int ret = take_body(account, batch, uid, body, len);
    if (ret < 0)
        return ret;
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
    int ret = 0;
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
                take_body(account, batch, uids[i], data, len);
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
        ret = fs_session_acquire(account, mailbox, &session);
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
            fs_session_release(account, session);
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

static size_t scan_gap(const struct fs_account *account)
{
    return account->no_open ? 2 * NO_OPEN_TRIPWIRE : SCAN_GAP;
}

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
                fs_session_warm(account, mailbox);
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

/* A folder is listed for the first time: a reader may go through it next
 * (grep -r, find, rsync, tar list a folder before they read it), so the
 * read-ahead threads open their connections now, while the listing
 * arrives.  Not with a download budget, which turns read-ahead off. */
void fs_readahead_warm(struct fs_account *account, uint32_t folder_id)
{
    if (account->max_download)
        return;
    char *mailbox = fs_folder_mailbox(account, folder_id);
    if (!mailbox)
        return;
    pthread_mutex_lock(&account->readahead_lock);
    free(account->warm_mailbox);
    account->warm_mailbox = mailbox;
    account->warm_wanted = READAHEAD_THREADS;
    pthread_cond_broadcast(&account->readahead_wake);
    pthread_mutex_unlock(&account->readahead_lock);
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
        /* A reader was at one of the scan_gap() messages around this one. */
        size_t cursor = cursors, gap = scan_gap(account);
        for (size_t i = lo > gap ? lo - gap : 0;
             cursor == cursors && i < folder->count && i <= lo + gap; i++) {
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
                      int from_start, struct cache_body **out, int retried_stale);

int fs_account_body(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                    struct cache_body **out)
{
    return body_fetch(account, folder_id, uid, 1, out, 0);
}

int fs_account_body_continued(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                              struct cache_body **out)
{
    return body_fetch(account, folder_id, uid, 0, out, 0);
}

/* from_start: a read of the message from its start (an open), which tells
 * the read-ahead where a reader is; 0 for a read further on in it. */
static int body_fetch(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                      int from_start, struct cache_body **out, int retried_stale)
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

    int step = from_start ? note_read(account, folder_id, uid) : 0;
    pthread_mutex_lock(&account->inflight_lock);
    for (;;) {
        *out = cache_body_get(account->bodies, folder_id, uidvalidity, uid);
        if (*out) {
            pthread_mutex_unlock(&account->inflight_lock);
            return 0;
        }
        struct inflight *fetching = inflight_find(account, folder_id, uid);
        if (!fetching)
            break;
        fetching->waited = 1;
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
        return body_fetch(account, folder_id, uid, from_start, out, 1);
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
