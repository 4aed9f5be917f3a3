/* fs/watch.c — keeps the mount in step with other clients.
 *
 * A thread with an IMAP connection of its own learns what others changed,
 * in the best way the server offers:
 *
 *   NOTIFY (RFC 5465)  The server pushes a STATUS for every personal mailbox
 *                      whose messages or flags changed and a LIST for every
 *                      mailbox created, deleted or renamed: changes show at
 *                      once, in every folder the mount has listed.
 *   IDLE (RFC 2177)    The connection idles in the most recently used folder,
 *                      so changes there show at once.  IDLE is renewed every
 *                      IDLE_RENEW_SECONDS, or at half of -o idle_timeout.
 *   neither            The poll below alone.
 *
 * Under every mode the folders used in the last ACTIVE_SECONDS (but the one
 * IDLE watches) get a STATUS every -o poll_interval seconds (default 2) and
 * the folder list a LIST every LIST_EVERY polls.  That poll keeps the promise
 * of "within 5 seconds" when a server's NOTIFY falls silent, covers the
 * folders IDLE does not watch, and is the keepalive that stops NAT boxes
 * dropping the connection (a NOOP when the mount is not in use and nothing
 * was heard for half of -o idle_timeout).  Pooled connections unused for
 * -o idle_timeout are closed at a tick (fs_account_prune_idle).  With the poll interval raised, NOTIFY
 * and IDLE still make changes show at once; the thread looks at what is in
 * use every TICK_MS all the same (no traffic), so IDLE follows the user.
 *
 * A changed folder is listed again through the account (fs_account_load_folder:
 * with CONDSTORE the cost is in proportion to the changes), which tells the
 * kernel exactly which names came and went.  Without CONDSTORE a STATUS says
 * nothing of flag changes: polled folders of up to SMALL_FOLDER messages are
 * then listed again at every poll, larger ones when their listing times out
 * (-o dir_cache_timeout). */
#include "fs/fs.h"
#include "imap/log.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define ACTIVE_SECONDS 600.0
#define LIST_EVERY 2
#define SMALL_FOLDER 5000       /* messages: re-listed each poll without CONDSTORE */
#define IDLE_RENEW_SECONDS 600.0
#define GATHER_MS 100           /* after a push, wait this long for its companions */
#define TICK_MS 2000            /* a look at what is in use (no traffic) at least this often */

enum push_mode { PUSH_NONE, PUSH_IDLE, PUSH_NOTIFY };

/* What pushed responses said, gathered by the unsolicited callback while the
 * session reads and acted on by the loop afterwards (not from inside it). */
struct pushed {
    char **mailboxes;       /* names as the server sent them, without repeats */
    size_t count, cap;
    int selected;           /* the idled folder changed */
    int folders;            /* the folder list changed */
    int overflow;           /* the server stopped notifying */
};

struct fs_watcher {
    struct fs_account *account;
    int poll_ms;                    /* -o poll_interval */
    int tick_ms;                    /* how often the thread looks at the cache */
    double idle_seconds;            /* -o idle_timeout: pooled connections unused this long
                                       are closed, and this one NOOPs at half of it */
    pthread_t thread;
    pthread_mutex_t lock;
    int stopping;                   /* protected by lock */
    int wake[2];                    /* a pipe: stop writes, the thread polls */
    /* only the watcher's thread touches the rest */
    struct imap_session *session;
    enum push_mode mode;
    int notifying;                  /* NOTIFY SET done on this session */
    uint32_t idle_folder;           /* folder id the session idles in; 0 none */
    double idle_since;
    double last_heard;              /* monotonic time of the last exchange */
    struct pushed pushed;
};

struct watched {
    uint32_t id;
    char *mailbox;
    struct imap_mailbox_state known;
};

static int stopping(struct fs_watcher *watcher)
{
    pthread_mutex_lock(&watcher->lock);
    int stop = watcher->stopping;
    pthread_mutex_unlock(&watcher->lock);
    return stop;
}

/* Sleeps up to ms, or until fs_watcher_stop. */
static void nap(struct fs_watcher *watcher, int ms)
{
    struct pollfd pfd = { .fd = watcher->wake[0], .events = POLLIN };
    poll(&pfd, 1, ms);
}

/* Folders used lately, with what the cache believes of them; the most
 * recently used first.  *in_use: whether the mount used any folder lately. */
static struct watched *active_folders(struct cache *cache, size_t *count, int *in_use)
{
    double now = now_monotonic();
    struct watched *list = NULL;
    double *used = NULL;
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
            double *grown_used = grown ? realloc(used, cap * sizeof(*grown_used)) : NULL;
            if (grown)
                list = grown;
            if (!grown || !grown_used)
                break;
            used = grown_used;
        }
        struct watched entry = {
            .id = folder->id,
            .mailbox = strdup(folder->mailbox),
            .known = {
                .uidvalidity = folder->uidvalidity,
                .uidnext = folder->uidnext,
                .exists = (uint32_t)folder->count,
                .highestmodseq = folder->highestmodseq,
            },
        };
        /* marked stale by an unsolicited EXPUNGE/EXISTS: refresh regardless */
        if (folder->listed_at == 0)
            entry.known.uidnext = 0;
        if (!entry.mailbox)
            continue;
        /* insertion keeps the most recently used first */
        size_t at = n;
        while (at > 0 && used[at - 1] < folder->used_at) {
            list[at] = list[at - 1];
            used[at] = used[at - 1];
            at--;
        }
        list[at] = entry;
        used[at] = folder->used_at;
        n++;
    }
    cache_unlock(cache);
    free(used);
    *count = n;
    return list;
}

static void free_watched(struct watched *folders, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(folders[i].mailbox);
    free(folders);
}

static int changed(const struct imap_mailbox_state *known, const struct imap_mailbox_state *now)
{
    return known->uidvalidity != now->uidvalidity || known->uidnext != now->uidnext ||
           known->exists != now->exists ||
           (now->highestmodseq && known->highestmodseq != now->highestmodseq);
}

/* ---------------------------------------------------------------- pushed news */

static void on_pushed(void *context, struct imap_session *session,
                      const struct imap_response *response)
{
    struct pushed *pushed = context;
    const char *mailbox;

    (void)session;
    switch (imap_response_change(response, &mailbox)) {
    case IMAP_CHANGE_MAILBOX:
        for (size_t i = 0; i < pushed->count; i++)
            if (strcmp(pushed->mailboxes[i], mailbox) == 0)
                return;
        if (pushed->count == pushed->cap) {
            size_t cap = pushed->cap ? pushed->cap * 2 : 8;
            char **grown = realloc(pushed->mailboxes, cap * sizeof(*grown));
            if (!grown) {
                pushed->overflow = 1;   /* lost track: treat as "anything changed" */
                return;
            }
            pushed->mailboxes = grown;
            pushed->cap = cap;
        }
        if (!(pushed->mailboxes[pushed->count] = strdup(mailbox))) {
            pushed->overflow = 1;
            return;
        }
        pushed->count++;
        return;
    case IMAP_CHANGE_SELECTED:
        pushed->selected = 1;
        return;
    case IMAP_CHANGE_FOLDERS:
        pushed->folders = 1;
        return;
    case IMAP_CHANGE_OVERFLOW:
        pushed->overflow = 1;
        return;
    case IMAP_CHANGE_NONE:
        return;
    }
}

/* The id of the listed folder the server calls mailbox, or 0. */
static uint32_t listed_folder(struct cache *cache, const char *mailbox)
{
    uint32_t id = 0;

    cache_lock(cache);
    for (struct cache_folder *folder = cache->by_id; folder; folder = folder->hh.next) {
        if (!folder->mailbox || folder->uidvalidity == 0)
            continue;
        if (strcmp(folder->mailbox, mailbox) == 0 ||
            (strcasecmp(mailbox, "INBOX") == 0 && strcasecmp(folder->mailbox, "INBOX") == 0)) {
            id = folder->id;
            break;
        }
    }
    cache_unlock(cache);
    return id;
}

/* Lists again what the pushed responses named; returns whether there was any. */
static int apply_pushed(struct fs_watcher *watcher)
{
    struct fs_account *account = watcher->account;
    struct pushed *pushed = &watcher->pushed;
    int any = pushed->count || pushed->selected || pushed->folders || pushed->overflow;

    if (pushed->folders || pushed->overflow)
        fs_account_load_folders(account);
    for (size_t i = 0; i < pushed->count; i++) {
        uint32_t id = listed_folder(fs_account_cache(account), pushed->mailboxes[i]);
        if (id)
            fs_account_load_folder(account, id, FS_LOAD_WATCHER);
        free(pushed->mailboxes[i]);
    }
    pushed->count = 0;
    if (pushed->selected && watcher->idle_folder)
        fs_account_load_folder(account, watcher->idle_folder, FS_LOAD_WATCHER);
    pushed->selected = 0;
    pushed->folders = 0;
    return any;
}

/* ---------------------------------------------------------------- the session */

static void drop_session(struct fs_watcher *watcher)
{
    imap_session_close(watcher->session);
    watcher->session = NULL;
    watcher->notifying = 0;
    watcher->idle_folder = 0;
}

static int ensure_session(struct fs_watcher *watcher)
{
    char err[512];

    if (watcher->session)
        return 0;
    if (fs_account_open_session(watcher->account, &watcher->session, err, sizeof(err)) < 0) {
        log_debug("watcher: %s", err);
        watcher->session = NULL;
        return -EIO;
    }
    imap_session_set_unsolicited(watcher->session, on_pushed, &watcher->pushed);
    if (imap_session_has_capability(watcher->session, "NOTIFY"))
        watcher->mode = PUSH_NOTIFY;
    else if (imap_session_has_capability(watcher->session, "IDLE"))
        watcher->mode = PUSH_IDLE;
    else
        watcher->mode = PUSH_NONE;
    static const char *const names[] = { "a STATUS poll", "IDLE", "NOTIFY" };
    log_debug("watcher: other clients' changes come by %s", names[watcher->mode]);
    watcher->last_heard = now_monotonic();
    return 0;
}

/* STATUS of each folder in the list (but skip); those that moved are listed
 * again.  Returns how many moved (a small folder listed again only because
 * the server cannot tell of flag changes does not count), or -EIO when the
 * session broke. */
static int poll_status(struct fs_watcher *watcher, const struct watched *folders, size_t count,
                       uint32_t skip)
{
    int moved = 0;

    for (size_t i = 0; i < count; i++) {
        if (folders[i].id == skip)
            continue;
        struct imap_mailbox_state now;
        int ret = imap_status(watcher->session, folders[i].mailbox, &now);
        if (ret < 0 && imap_session_broken(watcher->session))
            return -EIO;
        /* Without CONDSTORE nothing in STATUS tells of flag changes: a small
         * folder is listed again each time (a large one waits for
         * dir_cache_timeout, or costs too much). */
        int flags_unseen = ret == 0 && !now.highestmodseq &&
                           folders[i].known.exists <= SMALL_FOLDER;
        int differs = ret == 0 && changed(&folders[i].known, &now);
        if (ret == 0 && !differs && !flags_unseen)
            continue;
        if (differs && folders[i].known.uidnext != 0)
            moved++;
        fs_account_load_folder(watcher->account, folders[i].id, FS_LOAD_WATCHER);
    }
    watcher->last_heard = now_monotonic();
    return moved;
}

/* Waits up to one tick for what the server pushes and acts on it. */
static int wait_for_pushes(struct fs_watcher *watcher)
{
    int got = imap_session_wait(watcher->session, watcher->wake[0], watcher->tick_ms);
    if (got > 0) {
        watcher->last_heard = now_monotonic();
        got = imap_session_wait(watcher->session, watcher->wake[0], GATHER_MS);
    }
    if (got < 0)
        return -EIO;
    apply_pushed(watcher);
    return 0;
}

/* Lists again the folders in use that other connections' unsolicited data
 * marked stale (a look at the cache, no traffic). */
static void refresh_marked(struct fs_watcher *watcher, const struct watched *folders,
                           size_t count)
{
    for (size_t i = 0; i < count; i++)
        if (folders[i].known.uidnext == 0)
            fs_account_load_folder(watcher->account, folders[i].id, FS_LOAD_WATCHER);
}

static int keepalive(struct fs_watcher *watcher)
{
    if (now_monotonic() - watcher->last_heard <= watcher->idle_seconds / 2)
        return 0;
    if (imap_noop(watcher->session) < 0 && imap_session_broken(watcher->session))
        return -EIO;
    watcher->last_heard = now_monotonic();
    apply_pushed(watcher);
    return 0;
}

/* A tick with NOTIFY: act on pushes as they come, and poll the folders in
 * use all the same when the poll is due.  NOTIFY makes changes show at once;
 * the poll keeps the promise when a server's NOTIFY falls silent: Dovecot
 * 2.3 stops notifying for good after some sequences of mailbox creates,
 * appends and renames (it logs "Corrupted mailbox list index").  A change
 * that only the poll saw arms NOTIFY again. */
static int tick_notify(struct fs_watcher *watcher, int poll_due, int list_due)
{
    if (!watcher->notifying) {
        int ret = imap_notify_set(watcher->session);
        if (ret < 0) {
            if (imap_session_broken(watcher->session))
                return -EIO;
            int idle = imap_session_has_capability(watcher->session, "IDLE");
            log_warn("the server refused NOTIFY (%s); watching with %s instead",
                     imap_session_last_error(watcher->session), idle ? "IDLE" : "a poll");
            watcher->mode = idle ? PUSH_IDLE : PUSH_NONE;
            return 0;
        }
        watcher->notifying = 1;
        /* what changed before the server began to tell */
        poll_due = list_due = 1;
    } else if (poll_due) {
        poll_due = 2;   /* a change found now is one NOTIFY missed */
    }

    size_t count;
    int in_use;
    struct watched *folders = active_folders(fs_account_cache(watcher->account), &count, &in_use);
    int moved = in_use && poll_due ? poll_status(watcher, folders, count, 0) : 0;
    if (moved >= 0)
        refresh_marked(watcher, folders, count);
    free_watched(folders, count);
    if (moved < 0)
        return -EIO;
    int refolded = in_use && list_due ? fs_account_load_folders(watcher->account) : 0;
    /* folders created, deleted or renamed that no push told of (one that
     * came during the poll and waits in pushed does not count) */
    int missed_folders = refolded > 0 && !watcher->pushed.folders;
    if (poll_due == 2 && (moved > 0 || missed_folders)) {
        log_info("NOTIFY missed a change the poll found; asking the server again");
        watcher->notifying = 0;
    }
    apply_pushed(watcher);      /* what came during the poll */
    if (keepalive(watcher) < 0 || wait_for_pushes(watcher) < 0)
        return -EIO;
    if (watcher->pushed.overflow) {
        log_info("the server stopped notifying (NOTIFICATIONOVERFLOW); asking again");
        watcher->notifying = 0;
        watcher->pushed.overflow = 0;
    }
    return 0;
}

/* Leaves IDLE and EXAMINEs target unless it already idles there. */
static int idle_in(struct fs_watcher *watcher, const struct watched *target)
{
    if (watcher->idle_folder && imap_idle_end(watcher->session) < 0)
        return -EIO;
    watcher->idle_folder = 0;
    if (!target)
        return 0;
    const char *selected = imap_session_selected(watcher->session);
    if (!selected || strcmp(selected, target->mailbox) != 0) {
        /* somewhere new: what changed before counts too */
        struct imap_mailbox_state now;
        int ret = imap_select_fresh(watcher->session, target->mailbox, 1, &now);
        if (ret < 0)
            return imap_session_broken(watcher->session) ? -EIO : 0;
        if (changed(&target->known, &now))
            fs_account_load_folder(watcher->account, target->id, FS_LOAD_WATCHER);
    }
    int ret = imap_idle_begin(watcher->session);
    if (ret < 0 && imap_session_broken(watcher->session))
        return -EIO;
    if (ret < 0) {
        log_warn("the server refused IDLE (%s); watching with a poll instead",
                 imap_session_last_error(watcher->session));
        watcher->mode = PUSH_NONE;
        return 0;
    }
    watcher->idle_folder = target->id;
    watcher->idle_since = now_monotonic();
    return 0;
}

/* A tick with IDLE: idle in the most recently used folder; pause to poll
 * the other folders in use when the poll is due. */
static int tick_idle(struct fs_watcher *watcher, int poll_due, int list_due)
{
    struct fs_account *account = watcher->account;
    size_t count;
    int in_use;
    struct watched *folders = active_folders(fs_account_cache(account), &count, &in_use);
    const struct watched *target = count ? &folders[0] : NULL;
    int ret = 0;

    if (!in_use) {
        /* nothing in use: no need to hold a mailbox open on the server */
        if (idle_in(watcher, NULL) < 0 || keepalive(watcher) < 0)
            ret = -EIO;
        free_watched(folders, count);
        if (ret == 0)
            nap(watcher, watcher->tick_ms);
        return ret;
    }
    /* renewed before a NAT box would forget the connection, too */
    double renew_after = watcher->idle_seconds / 2 < IDLE_RENEW_SECONDS ? watcher->idle_seconds / 2
                                                                        : IDLE_RENEW_SECONDS;
    int renew = now_monotonic() - watcher->idle_since > renew_after;
    int poll_others = poll_due && count > 1;
    if (!target || watcher->idle_folder != target->id || poll_others || renew) {
        if (watcher->idle_folder && imap_idle_end(watcher->session) < 0)
            goto broken;
        watcher->idle_folder = 0;
        if (poll_others && poll_status(watcher, folders, count, target->id) < 0)
            goto broken;
        if (idle_in(watcher, target) < 0)
            goto broken;
    }
    refresh_marked(watcher, folders, count);
    apply_pushed(watcher);      /* what came during the poll and the select */
    free_watched(folders, count);

    if (watcher->idle_folder) {
        if (wait_for_pushes(watcher) < 0)
            return -EIO;
    } else {
        nap(watcher, watcher->tick_ms);
    }
    if (list_due)
        fs_account_load_folders(account);   /* on a pooled connection: IDLE goes on */
    return 0;
broken:
    free_watched(folders, count);
    return -EIO;
}

/* A tick without push: when due, STATUS of the folders in use and LIST. */
static int tick_poll(struct fs_watcher *watcher, int poll_due, int list_due)
{
    size_t count;
    int in_use;
    struct watched *folders = active_folders(fs_account_cache(watcher->account), &count, &in_use);
    int ret = 0;

    if (in_use && poll_due)
        ret = poll_status(watcher, folders, count, 0);
    if (ret >= 0)
        refresh_marked(watcher, folders, count);
    free_watched(folders, count);
    if (ret < 0)
        return ret;
    apply_pushed(watcher);
    if (in_use && list_due)
        fs_account_load_folders(watcher->account);
    nap(watcher, watcher->tick_ms);
    return 0;
}

static void *watcher_main(void *arg)
{
    struct fs_watcher *watcher = arg;
    unsigned polls = 0;
    double next_poll = 0;
    int first = 1;

    while (!stopping(watcher)) {
        fs_account_prune_idle(watcher->account, watcher->idle_seconds);
        if (!watcher->session) {
            /* at once at mount (NOTIFY then covers the first minutes too);
             * after a lost connection, once the mount is used again */
            size_t count;
            int in_use;
            struct watched *folders = active_folders(fs_account_cache(watcher->account),
                                                     &count, &in_use);
            free_watched(folders, count);
            if ((!first && !in_use) || ensure_session(watcher) < 0) {
                first = 0;
                nap(watcher, watcher->tick_ms);
                continue;
            }
            first = 0;
        }
        double now = now_monotonic();
        int poll_due = now >= next_poll;
        if (poll_due) {
            next_poll = now + watcher->poll_ms / 1000.0;
            polls++;
        }
        int list_due = poll_due && polls % LIST_EVERY == 0;
        int ret;
        switch (watcher->mode) {
        case PUSH_NOTIFY: ret = tick_notify(watcher, poll_due, list_due); break;
        case PUSH_IDLE: ret = tick_idle(watcher, poll_due, list_due); break;
        default: ret = tick_poll(watcher, poll_due, list_due); break;
        }
        if (ret < 0 || imap_session_broken(watcher->session)) {
            log_debug("watcher: connection lost; reconnecting");
            drop_session(watcher);
        }
    }
    return NULL;
}

struct fs_watcher *fs_watcher_start(struct fs_account *account, unsigned poll_seconds,
                                    unsigned idle_seconds)
{
    struct fs_watcher *watcher = calloc(1, sizeof(*watcher));

    if (!watcher)
        return NULL;
    watcher->account = account;
    watcher->poll_ms = (int)poll_seconds * 1000;
    watcher->idle_seconds = idle_seconds;
    watcher->tick_ms = watcher->poll_ms < TICK_MS ? watcher->poll_ms : TICK_MS;
    if (pipe2(watcher->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(watcher);
        return NULL;
    }
    pthread_mutex_init(&watcher->lock, NULL);
    if (pthread_create(&watcher->thread, NULL, watcher_main, watcher) != 0) {
        pthread_mutex_destroy(&watcher->lock);
        close(watcher->wake[0]);
        close(watcher->wake[1]);
        free(watcher);
        return NULL;
    }
    pthread_setname_np(watcher->thread, "imapfs-watcher");
    return watcher;
}

void fs_watcher_stop(struct fs_watcher *watcher)
{
    if (!watcher)
        return;
    pthread_mutex_lock(&watcher->lock);
    watcher->stopping = 1;
    pthread_mutex_unlock(&watcher->lock);
    if (write(watcher->wake[1], "x", 1) < 0)
        log_debug("watcher: wake: %s", strerror(errno));
    pthread_join(watcher->thread, NULL);
    imap_session_close(watcher->session);
    for (size_t i = 0; i < watcher->pushed.count; i++)
        free(watcher->pushed.mailboxes[i]);
    free(watcher->pushed.mailboxes);
    pthread_mutex_destroy(&watcher->lock);
    close(watcher->wake[0]);
    close(watcher->wake[1]);
    free(watcher);
}
