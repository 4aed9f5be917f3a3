/* fs/notify.c — the notifier: the one thread that tells the kernel what
 * changed.
 *
 * fuse_lowlevel_notify_inval_entry() takes the kernel's lock on the parent
 * directory.  Called from inside a request handler for that directory (a
 * rename, an unlink) it would wait for the very request it is part of and
 * deadlock; called under our cache lock it could wait on a request that
 * waits for the cache.  So handlers and the sync code only queue
 * invalidations here, and this thread sends them, in order, with no lock of
 * ours held.  A queued invalidation that reaches the kernel after the request
 * that caused it has finished is exactly what we want.
 *
 * The same thread puts bodies fetched ahead of a scanning reader into the
 * kernel's page cache (fuse_lowlevel_notify_store), so the reader's open
 * finds the pages and no READ round trip is needed.  Sharing the one queue
 * orders a store before the invalidations of a UIDVALIDITY reset queued
 * after it; a store queued before a reset but reaching this thread after it
 * is dropped by the UIDVALIDITY check. */
#include "fs/fs.h"
#include "imap/log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

enum notice_kind { NOTICE_ENTRY, NOTICE_INODE, NOTICE_STORE, NOTICE_STOP };

struct notice {
    enum notice_kind kind;
    fuse_ino_t parent;      /* NOTICE_ENTRY: the directory */
    fuse_ino_t ino;         /* NOTICE_INODE, NOTICE_STORE */
    struct fs_account *account;     /* NOTICE_STORE: body is referenced from here */
    struct cache_body *body;
    uint32_t folder_id, uidvalidity;
    struct notice *next;
    char name[];            /* NOTICE_ENTRY: the name in parent */
};

struct fs_notifier {
    struct fuse_session *session;
    pthread_t thread;
    int running;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct notice *head, *tail;     /* protected by lock */
};

/* Frees a notice, giving back the body a store notice holds. */
static void notice_free(struct notice *notice)
{
    if (notice->kind == NOTICE_STORE)
        fs_account_body_release(notice->account, notice->body);
    free(notice);
}

static void *notifier_main(void *arg)
{
    struct fs_notifier *notifier = arg;

    for (;;) {
        pthread_mutex_lock(&notifier->lock);
        while (!notifier->head)
            pthread_cond_wait(&notifier->wake, &notifier->lock);
        struct notice *notice = notifier->head;
        notifier->head = notice->next;
        if (!notifier->head)
            notifier->tail = NULL;
        pthread_mutex_unlock(&notifier->lock);

        int ret = 0;
        if (notice->kind == NOTICE_STOP) {
            free(notice);
            return NULL;
        }
        if (notice->kind == NOTICE_ENTRY) {
            ret = fuse_lowlevel_notify_inval_entry(notifier->session, notice->parent,
                                                   notice->name, strlen(notice->name));
        } else if (notice->kind == NOTICE_STORE) {
            if (fs_account_uidvalidity_current(notice->account, notice->folder_id,
                                               notice->uidvalidity)) {
                struct fuse_bufvec data = FUSE_BUFVEC_INIT(notice->body->len);
                data.buf[0].mem = notice->body->data;
                ret = fuse_lowlevel_notify_store(notifier->session, notice->ino, 0, &data, 0);
                /* the tests tell a READ the push came too late for from one
                 * that should not have happened by this line's place in -d */
                if (ret == 0)
                    log_debug("page cache: stored node %llu", (unsigned long long)notice->ino);
            }
        } else {
            ret = fuse_lowlevel_notify_inval_inode(notifier->session, notice->ino, 0, 0);
        }
        /* ENOENT: the kernel did not know it; nothing to invalidate. */
        if (ret < 0 && ret != -ENOENT)
            log_debug("kernel %s failed: %s",
                      notice->kind == NOTICE_STORE ? "page cache store" : "invalidation",
                      strerror(-ret));
        notice_free(notice);
    }
}

struct fs_notifier *fs_notifier_new(void)
{
    struct fs_notifier *notifier = calloc(1, sizeof(*notifier));
    if (!notifier)
        return NULL;
    pthread_mutex_init(&notifier->lock, NULL);
    pthread_cond_init(&notifier->wake, NULL);
    return notifier;
}

static void enqueue(struct fs_notifier *notifier, struct notice *notice)
{
    pthread_mutex_lock(&notifier->lock);
    if (!notifier->running && notice->kind != NOTICE_STOP) {
        /* not mounted yet or already stopping: the kernel has nothing cached */
        pthread_mutex_unlock(&notifier->lock);
        notice_free(notice);
        return;
    }
    if (notifier->tail)
        notifier->tail->next = notice;
    else
        notifier->head = notice;
    notifier->tail = notice;
    pthread_cond_signal(&notifier->wake);
    pthread_mutex_unlock(&notifier->lock);
}

int fs_notifier_start(struct fs_notifier *notifier, struct fuse_session *session)
{
    notifier->session = session;
    notifier->running = 1;
    int ret = pthread_create(&notifier->thread, NULL, notifier_main, notifier);
    if (ret != 0)
        notifier->running = 0;
    else
        pthread_setname_np(notifier->thread, "imapfs-notify");
    return -ret;
}

void fs_notifier_free(struct fs_notifier *notifier)
{
    if (!notifier)
        return;
    if (notifier->running) {
        struct notice *stop = calloc(1, sizeof(*stop));
        if (stop) {
            stop->kind = NOTICE_STOP;
            enqueue(notifier, stop);
            pthread_join(notifier->thread, NULL);
        }
        notifier->running = 0;
    }
    while (notifier->head) {
        struct notice *next = notifier->head->next;
        notice_free(notifier->head);
        notifier->head = next;
    }
    pthread_mutex_destroy(&notifier->lock);
    pthread_cond_destroy(&notifier->wake);
    free(notifier);
}

void fs_notify_entry(struct fs_notifier *notifier, fuse_ino_t parent, const char *name)
{
    size_t len = strlen(name);
    struct notice *notice = calloc(1, sizeof(*notice) + len + 1);

    if (!notice)
        return;
    notice->kind = NOTICE_ENTRY;
    notice->parent = parent;
    memcpy(notice->name, name, len + 1);
    enqueue(notifier, notice);
}

void fs_notify_inode(struct fs_notifier *notifier, fuse_ino_t ino)
{
    struct notice *notice = calloc(1, sizeof(*notice));

    if (!notice)
        return;
    notice->kind = NOTICE_INODE;
    notice->ino = ino;
    enqueue(notifier, notice);
}

void fs_notify_store(struct fs_notifier *notifier, struct fs_account *account, uint32_t folder_id,
                     uint32_t uidvalidity, uint32_t uid, struct cache_body *body)
{
    struct notice *notice = calloc(1, sizeof(*notice));

    if (!notice) {
        fs_account_body_release(account, body);
        return;
    }
    notice->kind = NOTICE_STORE;
    notice->ino = fs_ino_message(folder_id, uid);
    notice->folder_id = folder_id;
    notice->uidvalidity = uidvalidity;
    notice->account = account;
    notice->body = body;
    enqueue(notifier, notice);
}

/* Attributes only (offset -1): the kernel touches no page, so this cannot
 * wait for the page the calling READ is filling, and it is safe inside a
 * READ handler.  Through the queue it could land after the reader's next
 * read, which would then take the old size for the end of the file. */
void fs_notify_attrs_now(struct fs_notifier *notifier, fuse_ino_t ino)
{
    int ret = fuse_lowlevel_notify_inval_inode(notifier->session, ino, -1, 0);
    if (ret < 0 && ret != -ENOENT)
        log_debug("kernel invalidation failed: %s", strerror(-ret));
}
