/* fs/watch.c — keeps recently used folders in step with other clients.
 *
 * Every POLL_SECONDS the watcher asks the server, on a connection of its own,
 * for STATUS (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ) of each folder the
 * mount used in the last ACTIVE_SECONDS.  One STATUS per folder is cheap, it
 * needs no selected mailbox, and with CONDSTORE the HIGHESTMODSEQ catches
 * flag changes too.  A folder whose numbers moved is listed again, which
 * costs in proportion to the changes (fs_account_load_folder uses CONDSTORE)
 * and tells the kernel exactly which names came and went.  The folder list
 * itself is re-read every LIST_EVERY polls while the mount is in use.
 *
 * Why a poll and not IDLE: IDLE watches one mailbox per connection, and
 * NOTIFY (RFC 5465) is offered by few servers; a 2-second STATUS poll of the
 * folders in use meets the promise of "within 5 seconds" on every server,
 * and it doubles as the keepalive that stops NAT boxes dropping the
 * connection.  Without CONDSTORE, STATUS says nothing of flag changes:
 * folders of up to SMALL_FOLDER messages are then listed again at every
 * poll, larger ones when their listing times out (-o dir_cache_timeout). */
#include "fs/fs.h"
#include "imap/log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define POLL_SECONDS 2
#define ACTIVE_SECONDS 600.0
#define LIST_EVERY 2
#define SMALL_FOLDER 5000       /* messages: re-listed each poll without CONDSTORE */

struct fs_watcher {
    struct fs_account *account;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stopping;                   /* protected by lock */
    struct imap_session *session;   /* the watcher's own; only its thread uses it */
};

struct watched {
    uint32_t id;
    char *mailbox;
    struct imap_mailbox_state known;
};

static double now_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Folders used lately, with what the cache believes of them. */
static struct watched *active_folders(struct cache *cache, size_t *count, int *in_use)
{
    double now = now_monotonic();
    struct watched *list = NULL;
    size_t n = 0, cap = 0;

    *in_use = 0;
    cache_lock(cache);
    for (struct cache_folder *folder = cache->by_id; folder; folder = folder->hh.next) {
        if (folder->used_at <= 0 || now - folder->used_at > ACTIVE_SECONDS)
            continue;
        *in_use = 1;
        if (!folder->selectable || !folder->mailbox || folder->uidvalidity == 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            struct watched *grown = realloc(list, cap * sizeof(*grown));
            if (!grown)
                break;
            list = grown;
        }
        list[n].id = folder->id;
        list[n].mailbox = strdup(folder->mailbox);
        list[n].known.uidvalidity = folder->uidvalidity;
        list[n].known.uidnext = folder->uidnext;
        list[n].known.exists = (uint32_t)folder->count;
        list[n].known.highestmodseq = folder->highestmodseq;
        /* marked stale by an unsolicited EXPUNGE/EXISTS: refresh regardless */
        if (folder->listed_at == 0)
            list[n].known.uidnext = 0;
        if (list[n].mailbox)
            n++;
    }
    cache_unlock(cache);
    *count = n;
    return list;
}

static int changed(const struct imap_mailbox_state *known, const struct imap_mailbox_state *now)
{
    return known->uidvalidity != now->uidvalidity || known->uidnext != now->uidnext ||
           known->exists != now->exists ||
           (now->highestmodseq && known->highestmodseq != now->highestmodseq);
}

static void poll_once(struct fs_watcher *watcher, unsigned round)
{
    struct fs_account *account = watcher->account;
    size_t count;
    int in_use;
    struct watched *folders = active_folders(fs_account_cache(account), &count, &in_use);

    if (!in_use) {
        free(folders);
        return;
    }
    if (!watcher->session) {
        char err[512];
        if (fs_account_open_session(account, &watcher->session, err, sizeof(err)) < 0) {
            log_debug("watcher: %s", err);
            watcher->session = NULL;
        }
    }
    for (size_t i = 0; i < count; i++) {
        struct imap_mailbox_state now;
        if (watcher->session) {
            int ret = imap_status(watcher->session, folders[i].mailbox, &now);
            /* Without CONDSTORE nothing in STATUS tells of flag changes: a
             * small folder is listed again each time (a large one waits for
             * dir_cache_timeout, or costs too much). */
            int flags_unseen = ret == 0 && !now.highestmodseq &&
                               folders[i].known.exists <= SMALL_FOLDER;
            if (ret == 0 && !changed(&folders[i].known, &now) && !flags_unseen)
                continue;
            if (ret < 0 && imap_session_broken(watcher->session)) {
                imap_session_close(watcher->session);
                watcher->session = NULL;
                continue;
            }
        }
        if (watcher->session)
            fs_account_load_folder(account, folders[i].id, 1);
    }
    for (size_t i = 0; i < count; i++)
        free(folders[i].mailbox);
    free(folders);
    if (watcher->session && round % LIST_EVERY == 0)
        fs_account_load_folders(account);
}

static void *watcher_main(void *arg)
{
    struct fs_watcher *watcher = arg;
    unsigned round = 0;

    pthread_mutex_lock(&watcher->lock);
    while (!watcher->stopping) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += POLL_SECONDS;
        pthread_cond_timedwait(&watcher->wake, &watcher->lock, &until);
        if (watcher->stopping)
            break;
        pthread_mutex_unlock(&watcher->lock);
        poll_once(watcher, ++round);
        pthread_mutex_lock(&watcher->lock);
    }
    pthread_mutex_unlock(&watcher->lock);
    return NULL;
}

struct fs_watcher *fs_watcher_start(struct fs_account *account)
{
    struct fs_watcher *watcher = calloc(1, sizeof(*watcher));

    if (!watcher)
        return NULL;
    watcher->account = account;
    pthread_mutex_init(&watcher->lock, NULL);
    pthread_cond_init(&watcher->wake, NULL);
    if (pthread_create(&watcher->thread, NULL, watcher_main, watcher) != 0) {
        pthread_mutex_destroy(&watcher->lock);
        pthread_cond_destroy(&watcher->wake);
        free(watcher);
        return NULL;
    }
    return watcher;
}

void fs_watcher_stop(struct fs_watcher *watcher)
{
    if (!watcher)
        return;
    pthread_mutex_lock(&watcher->lock);
    watcher->stopping = 1;
    pthread_cond_signal(&watcher->wake);
    pthread_mutex_unlock(&watcher->lock);
    pthread_join(watcher->thread, NULL);
    imap_session_close(watcher->session);
    pthread_mutex_destroy(&watcher->lock);
    pthread_cond_destroy(&watcher->wake);
    free(watcher);
}
