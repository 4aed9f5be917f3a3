/* fs/write.c — the operations that change the account.
 *
 * New mail.  A file created in a folder lives in memory until it is closed;
 * the first flush (every close() sends one) after data was written APPENDs
 * it, so a failed APPEND makes close() fail and nothing partial is stored.
 * (A flush before any write, or from another process than the one that
 * created the file, is a duplicated or inherited descriptor closing, as in
 * a shell's `{ cat a; cat b; } > file`, and is not the end of the file:
 * then the APPEND happens when the creator closes, or at release.)  A file
 * closed without ever being written is not stored (servers refuse empty
 * messages), nor is one that does not begin as mail does (close() gives
 * EBADMSG).  Line ends are made CRLF on the way.  The message then lists
 * as NEWUID.eml.  Its original name stays
 * an alias of the new message for a while, so tools that write a temporary
 * file and then rename it (rsync), or set its times after close (cp -p), keep
 * working; aliases never show in listings.  rm of an alias removes the
 * message: the file its writer made is gone.  Editors' swap files are not
 * mail and cannot be created (fs_name_is_scratch).
 *
 * Existing messages are immutable: open for writing and truncation give
 * EACCES.  chmod and utimes are accepted and change nothing (cp -p and rsync
 * -a set them; refusing would make every copy report errors); chown to
 * another user gives EPERM.  Except that a new mtime for mail stored here a
 * moment ago (rsync sets it after close) dates that mail again
 * (redate_new_mail).
 *
 * Inodes of files being written carry PENDING_BIT; they are not messages yet. */
#include "fs/fs.h"
#include "fs/names.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PENDING_BIT ((fuse_ino_t)1 << 63)
#define MAX_NEW_MESSAGE ((size_t)1 << 30)

enum newmail_state { NEWMAIL_WRITING, NEWMAIL_APPENDED, NEWMAIL_FAILED };

struct newmail {
    fuse_ino_t ino;             /* PENDING_BIT | serial */
    uint32_t folder_id;
    char *name;                 /* the name it was created under (later an alias) */
    char *data;                 /* protected by newmail_lock, like every field */
    size_t len, cap;
    int64_t date;               /* for APPEND; -1 = now */
    enum newmail_state state;
    int written;                /* a write arrived: a flush before that is a dup'd fd
                                   closing (a shell's `cmd > file`), not the end */
    pid_t creator;              /* its close() is the end; other processes' (children
                                   sharing the fd: `{ cat a; cat b; } > f`) are not */
    int error;                  /* NEWMAIL_FAILED: the errno close() reported */
    uint32_t uid;               /* NEWMAIL_APPENDED: the message it became */
    uint32_t uidvalidity;       /* ... in the folder as it was then (0: unknown) */
    unsigned opens;
    int redating;               /* NEWMAIL_APPENDED: a new date is on its way */
    double expires;             /* aliases: monotonic time they are forgotten */
    struct newmail *next;
};

/* Few files are written at once: a list is enough. */
static pthread_mutex_t newmail_lock = PTHREAD_MUTEX_INITIALIZER;
static struct newmail *newmail_list;    /* protected by newmail_lock */
static uint64_t newmail_serial;         /* protected by newmail_lock */

static struct fs_account *account_of(fuse_req_t req) { return fuse_req_userdata(req); }

/* While mounted from the disk cache without a server, nothing can change. */
static int refuse_offline(fuse_req_t req)
{
    if (!fs_account_offline(account_of(req)))
        return 0;
    fuse_reply_err(req, EROFS);
    return 1;
}

static uint32_t folder_of(fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? CACHE_ROOT_ID : (uint32_t)(ino >> 32);
}

static uint32_t uid_of(fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? 0 : (uint32_t)ino;
}

int fs_is_newmail_ino(fuse_ino_t ino) { return (ino & PENDING_BIT) != 0; }

static void newmail_free(struct newmail *mail)
{
    free(mail->name);
    free(mail->data);
    free(mail);
}

/* Drops expired aliases.  Caller holds newmail_lock. */
static void newmail_expire(void)
{
    double now = now_monotonic();
    for (struct newmail **link = &newmail_list; *link;) {
        struct newmail *mail = *link;
        if (mail->state != NEWMAIL_WRITING && mail->opens == 0 && !mail->redating &&
            mail->expires < now) {
            *link = mail->next;
            newmail_free(mail);
        } else {
            link = &mail->next;
        }
    }
}

static struct newmail *newmail_by_ino(fuse_ino_t ino)
{
    for (struct newmail *mail = newmail_list; mail; mail = mail->next)
        if (mail->ino == ino)
            return mail;
    return NULL;
}

static struct newmail *newmail_by_name(uint32_t folder_id, const char *name)
{
    for (struct newmail *mail = newmail_list; mail; mail = mail->next)
        if (mail->folder_id == folder_id && strcmp(mail->name, name) == 0 &&
            mail->state != NEWMAIL_FAILED)
            return mail;
    return NULL;
}

static void newmail_attr(const struct newmail *mail, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = mail->ino;
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_size = (off_t)mail->len;
    st->st_blksize = 65536;
    st->st_mtim.tv_sec = mail->date >= 0 ? (time_t)mail->date : time(NULL);
    st->st_ctim = st->st_atim = st->st_mtim;
}

/* The attributes of a message, for an alias. */
static int message_stat(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                        struct stat *st)
{
    struct cache *cache = fs_account_cache(account);
    int ret = -ENOENT;

    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    if (message) {
        memset(st, 0, sizeof(*st));
        st->st_ino = fs_ino_message(folder_id, uid);
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        st->st_uid = getuid();
        st->st_gid = getgid();
        st->st_size = (off_t)message->size;
        st->st_blocks = (blkcnt_t)((message->size + 511) / 512);
        st->st_blksize = 65536;
        st->st_mtim.tv_sec = st->st_atim.tv_sec = st->st_ctim.tv_sec = (time_t)message->internaldate;
        ret = 0;
    }
    cache_unlock(cache);
    return ret;
}

int fs_newmail_lookup(struct fs_account *account, uint32_t folder_id, const char *name,
                      struct stat *st)
{
    uint32_t alias_uid = 0;

    pthread_mutex_lock(&newmail_lock);
    newmail_expire();
    struct newmail *mail = newmail_by_name(folder_id, name);
    if (mail && mail->state == NEWMAIL_WRITING) {
        newmail_attr(mail, st);
        pthread_mutex_unlock(&newmail_lock);
        return 0;
    }
    if (mail && mail->uid)
        alias_uid = mail->uid;
    pthread_mutex_unlock(&newmail_lock);
    if (!alias_uid)
        return -ENOENT;
    int ret = message_stat(account, folder_id, alias_uid, st);
    if (ret == -ENOENT) { /* a folder not listed yet */
        int loaded = fs_account_load_folder(account, folder_id, 0);
        ret = loaded < 0 ? loaded : message_stat(account, folder_id, alias_uid, st);
    }
    return ret;
}

int fs_newmail_getattr(fuse_ino_t ino, struct stat *st)
{
    int ret = -ENOENT;
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_ino(ino);
    if (mail && mail->state == NEWMAIL_WRITING) {
        newmail_attr(mail, st);
        ret = 0;
    }
    pthread_mutex_unlock(&newmail_lock);
    return ret;
}

/* Bare LF -> CRLF, as IMAP requires.  Returns a malloc'd copy. */
static char *to_crlf(const char *data, size_t len, size_t *out_len)
{
    size_t extra = 0;
    for (size_t i = 0; i < len; i++)
        if (data[i] == '\n' && (i == 0 || data[i - 1] != '\r'))
            extra++;
    char *out = malloc(len + extra + 1);
    if (!out)
        return NULL;
    size_t j = 0;
    for (size_t i = 0; i < len; i++) {
        if (data[i] == '\n' && (i == 0 || data[i - 1] != '\r'))
            out[j++] = '\r';
        out[j++] = data[i];
    }
    *out_len = j;
    return out;
}

/* The kernel must look uid's name in the folder up again. */
static void notify_uid_name(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    char uid_name[32];
    fs_name_from_uid(uid, uid_name, sizeof(uid_name));
    fs_notify_entry(fs_account_notifier(account), fs_ino_folder(folder_id), uid_name);
}

/* The folder's UIDVALIDITY as the cache knows it, 0 if not listed. */
static uint32_t folder_uidvalidity(struct fs_account *account, uint32_t folder_id)
{
    struct cache *cache = fs_account_cache(account);
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    uint32_t uidvalidity = folder ? folder->uidvalidity : 0;
    cache_unlock(cache);
    return uidvalidity;
}

/* Is the folder (listed now if it never was) still the one new mail was
 * stored in, so that its UID still names that message?  1 or 0, or -errno
 * when it cannot be listed (the server gone). */
static int same_folder_as_stored(struct fs_account *account, uint32_t folder_id,
                                 uint32_t stored_uidvalidity)
{
    if (!stored_uidvalidity)
        return 0;
    uint32_t now = folder_uidvalidity(account, folder_id);
    if (!now) {
        int ret = fs_account_load_folder(account, folder_id, 0);
        if (ret < 0)
            return ret;
        now = folder_uidvalidity(account, folder_id);
    }
    return now == stored_uidvalidity;
}

/* Does data begin as mail does: with a header field ("Name:"), or with an
 * mbox "From " line?  Anything else (a text note, a file manager's
 * .directory, a picture) would be stored as a broken message. */
static int looks_like_mail(const char *data, size_t len)
{
    if (len >= 5 && memcmp(data, "From ", 5) == 0)
        return 1;
    size_t i = 0;
    while (i < len && data[i] > ' ' && data[i] < 127 && data[i] != ':')
        i++;
    return i > 0 && i < len && data[i] == ':';
}

/* APPENDs a file being written.  Called at its first flush (close), or at
 * release if no flush came.  Returns 0 or -errno; the state records it. */
static int newmail_commit(struct fs_account *account, struct newmail *mail)
{
    size_t len;
    char *message;
    uint32_t uid = 0;
    int ret;

    pthread_mutex_lock(&newmail_lock);
    if (mail->state != NEWMAIL_WRITING) {
        ret = mail->state == NEWMAIL_FAILED ? -mail->error : 0;
        pthread_mutex_unlock(&newmail_lock);
        return ret;
    }
    message = to_crlf(mail->data ? mail->data : "", mail->len, &len);
    int64_t date = mail->date;
    uint32_t folder_id = mail->folder_id;
    pthread_mutex_unlock(&newmail_lock);
    if (!message)
        return -ENOMEM;

    uint32_t uidvalidity = 0;
    if (looks_like_mail(message, len)) {
        ret = fs_account_append(account, folder_id, NULL, message, len, date, &uid, &uidvalidity);
    } else {
        log_warn("new file in folder %u not stored: it does not begin with a header field",
                 folder_id);
        ret = -EBADMSG;
    }
    free(message);

    pthread_mutex_lock(&newmail_lock);
    free(mail->data);
    mail->data = NULL;
    mail->len = mail->cap = 0;
    if (ret == 0) {
        mail->state = NEWMAIL_APPENDED;
        mail->uid = uid;
        mail->uidvalidity = uidvalidity;
    } else {
        mail->state = NEWMAIL_FAILED;
        mail->error = ret == -ENOMEM ? ENOMEM : -ret;
    }
    mail->expires = now_monotonic() + (fs_account_dir_timeout(account) > 60 ?
                                       fs_account_dir_timeout(account) : 60);
    char *name = strdup(mail->name);
    pthread_mutex_unlock(&newmail_lock);

    /* The kernel must look both names up again: the created name is now an
     * alias (or gone), the new UID name is new. */
    if (name) {
        fs_notify_entry(fs_account_notifier(account), fs_ino_folder(folder_id), name);
        free(name);
    }
    if (uid)
        notify_uid_name(account, folder_id, uid);
    if (ret < 0 && ret != -EBADMSG)
        log_warn("new message in folder %u not stored: %s", folder_id, strerror(-ret));
    return ret;
}

/* ---------------------------------------------------------------- new files */

static int folder_is_selectable(struct fs_account *account, uint32_t folder_id)
{
    struct cache *cache = fs_account_cache(account);
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    int selectable = folder && folder->selectable;
    cache_unlock(cache);
    return selectable;
}

void fs_write_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    if (refuse_offline(req))
        return;
    struct fs_account *account = account_of(req);
    uint32_t folder_id = folder_of(parent), uid;
    struct fuse_entry_param entry;

    if (!S_ISREG(mode) || fs_is_search_ino(parent)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (!folder_is_selectable(account, folder_id)) {
        fuse_reply_err(req, EPERM); /* a parent that holds no messages */
        return;
    }
    /* An editor's swap or lock file beside a message it shows is not mail
     * (vim then keeps its swap file in another directory). */
    if (fs_name_is_scratch(name)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    /* An existing message of that name is immutable. */
    if (fs_name_to_uid(name, &uid) == 0) {
        struct stat st;
        if (message_stat(account, folder_id, uid, &st) == 0) {
            fuse_reply_err(req, EACCES);
            return;
        }
    }
    struct newmail *mail = calloc(1, sizeof(*mail));
    if (!mail || !(mail->name = strdup(name))) {
        free(mail);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    mail->folder_id = folder_id;
    mail->date = -1;
    mail->opens = 1;
    mail->creator = fuse_req_ctx(req)->pid;
    pthread_mutex_lock(&newmail_lock);
    newmail_expire();
    struct newmail *old = newmail_by_name(folder_id, name);
    if (old && old->state == NEWMAIL_WRITING) {
        pthread_mutex_unlock(&newmail_lock);
        newmail_free(mail);
        fuse_reply_err(req, EBUSY); /* being written by someone else */
        return;
    }
    if (old)
        old->state = NEWMAIL_FAILED; /* an old alias: the new file takes the name */
    mail->ino = PENDING_BIT | ++newmail_serial;
    mail->next = newmail_list;
    newmail_list = mail;
    memset(&entry, 0, sizeof(entry));
    newmail_attr(mail, &entry.attr);
    pthread_mutex_unlock(&newmail_lock);

    entry.ino = entry.attr.st_ino;
    entry.attr_timeout = entry.entry_timeout = 0; /* it changes while written */
    fi->fh = 0;
    fi->direct_io = 1;
    fuse_reply_create(req, &entry, fi);
}

void fs_write_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t offset,
                     struct fuse_file_info *fi)
{
    (void)fi;
    if (!fs_is_newmail_ino(ino)) {
        fuse_reply_err(req, EACCES);
        return;
    }
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_ino(ino);
    int err = 0;
    if (!mail)
        err = ENOENT;
    else if (mail->state != NEWMAIL_WRITING)
        err = EBADF; /* already stored: a message cannot change */
    else if (offset < 0 || (size_t)offset > MAX_NEW_MESSAGE ||
             size > MAX_NEW_MESSAGE - (size_t)offset)
        err = EFBIG;
    else if (fs_account_append_limit(account_of(req)) &&
             (uint64_t)offset + size > fs_account_append_limit(account_of(req)))
        err = EFBIG; /* the server's APPENDLIMIT: refuse before uploading anything */
    else if ((size_t)offset + size > mail->cap) {
        size_t cap = mail->cap ? mail->cap : 65536;
        while (cap < (size_t)offset + size)
            cap *= 2;
        char *grown = realloc(mail->data, cap);
        if (!grown)
            err = ENOMEM;
        else {
            mail->data = grown;
            mail->cap = cap;
        }
    }
    if (!err && size) {
        if ((size_t)offset > mail->len) /* a hole reads as zeros */
            memset(mail->data + mail->len, 0, (size_t)offset - mail->len);
        memcpy(mail->data + offset, buf, size);
        mail->written = 1;
        if ((size_t)offset + size > mail->len)
            mail->len = (size_t)offset + size;
    }
    pthread_mutex_unlock(&newmail_lock);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_write(req, size);
}

void fs_newmail_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset)
{
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_ino(ino);
    if (!mail || mail->state != NEWMAIL_WRITING) {
        pthread_mutex_unlock(&newmail_lock);
        fuse_reply_err(req, EBADF);
        return;
    }
    if (offset < 0 || (size_t)offset >= mail->len) {
        pthread_mutex_unlock(&newmail_lock);
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    size_t available = mail->len - (size_t)offset;
    fuse_reply_buf(req, mail->data + offset, size < available ? size : available);
    pthread_mutex_unlock(&newmail_lock);
}

void fs_newmail_flush(fuse_req_t req, fuse_ino_t ino)
{
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_ino(ino);
    pid_t closer = fuse_req_ctx(req)->pid;
    int pending = mail && (mail->state != NEWMAIL_WRITING ||
                           (mail->written && closer == mail->creator));
    pthread_mutex_unlock(&newmail_lock);
    int ret = pending ? newmail_commit(account_of(req), mail) : 0;
    fuse_reply_err(req, -ret);
}

void fs_newmail_release(fuse_req_t req, fuse_ino_t ino)
{
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_ino(ino);
    int last = mail && --mail->opens == 0 && mail->state == NEWMAIL_WRITING;
    int commit = last && mail->written;
    if (last && !mail->written) {
        /* Never written (touch, or every write refused): there is no message
         * to store, and servers refuse empty ones anyway.  The name goes. */
        mail->state = NEWMAIL_FAILED;
        mail->expires = 0;
    }
    pthread_mutex_unlock(&newmail_lock);
    if (commit) /* closed without a flush (killed writer): store what arrived */
        newmail_commit(account_of(req), mail);
    fuse_reply_err(req, 0);
}

/* Reopening a file still being written (cp opens it again for times). */
int fs_newmail_open(fuse_ino_t ino)
{
    int ret = -ENOENT;
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_ino(ino);
    if (mail && mail->state == NEWMAIL_WRITING) {
        mail->opens++;
        ret = 0;
    }
    pthread_mutex_unlock(&newmail_lock);
    return ret;
}

/* ---------------------------------------------------------------- attributes */

/* The times of mail this mount stored a moment ago (its alias still lives):
 * rsync sets them on its temporary file after close(), when the APPEND is
 * done, and cp -p might.  A new modification time is given to the server by
 * dating the message again (fs_account_redate: a second APPEND, then the
 * first copy expunged), so a copy keeps its date as with cp -p.  Returns 1
 * with st the attributes it now has, 0 when there was nothing to do (not
 * such mail, the same date, or a server without UIDPLUS, where the first
 * copy could not go), or -errno, the message then being as it was. */
static int redate_new_mail(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                           int64_t date, struct stat *st)
{
    pthread_mutex_lock(&newmail_lock);
    newmail_expire();
    struct newmail *mail = newmail_list;
    while (mail && !(mail->state == NEWMAIL_APPENDED && mail->folder_id == folder_id &&
                     mail->uid == uid))
        mail = mail->next;
    if (!mail || mail->redating) {
        pthread_mutex_unlock(&newmail_lock);
        return 0;
    }
    mail->redating = 1;
    uint32_t uidvalidity = mail->uidvalidity;
    pthread_mutex_unlock(&newmail_lock);

    uint32_t new_uid = 0, new_uidvalidity = 0;
    int ret = same_folder_as_stored(account, folder_id, uidvalidity);
    if (ret == 0) {
        ret = -ENOTSUP; /* the folder was made again: the UID is another message */
    } else if (ret > 0) {
        ret = message_stat(account, folder_id, uid, st);
        if (ret == 0 && st->st_mtim.tv_sec == date)
            ret = -EALREADY;
        else if (ret == 0)
            ret = fs_account_redate(account, folder_id, uid, date, &new_uid, &new_uidvalidity);
    }

    pthread_mutex_lock(&newmail_lock);
    mail->redating = 0;
    if (ret == 0) {
        mail->uid = new_uid; /* 0 if the server did not say: the alias then ends */
        mail->uidvalidity = new_uidvalidity;
    }
    char *name = ret == 0 ? strdup(mail->name) : NULL;
    pthread_mutex_unlock(&newmail_lock);
    if (ret == -EALREADY || ret == -ENOTSUP)
        return 0;
    if (ret < 0) {
        log_warn("new message %u in folder %u keeps its date: %s", uid, folder_id, strerror(-ret));
        return ret;
    }

    /* The alias and both UID names must be looked up again. */
    if (name)
        fs_notify_entry(fs_account_notifier(account), fs_ino_folder(folder_id), name);
    free(name);
    notify_uid_name(account, folder_id, uid);
    if (new_uid)
        notify_uid_name(account, folder_id, new_uid);
    if (!new_uid || message_stat(account, folder_id, new_uid, st) < 0)
        st->st_mtim.tv_sec = st->st_atim.tv_sec = st->st_ctim.tv_sec = (time_t)date;
    return 1;
}

void fs_write_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct fs_account *account = account_of(req);
    struct stat st;

    (void)fi;
    if (fs_is_search_ino(ino)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if ((to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) &&
        (((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != getuid()) ||
         ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != getgid()))) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (fs_is_newmail_ino(ino)) {
        pthread_mutex_lock(&newmail_lock);
        struct newmail *mail = newmail_by_ino(ino);
        int err = 0;
        if (!mail || mail->state != NEWMAIL_WRITING)
            err = ENOENT;
        else if (to_set & FUSE_SET_ATTR_SIZE) {
            if ((size_t)attr->st_size > MAX_NEW_MESSAGE)
                err = EFBIG;
            else if ((size_t)attr->st_size <= mail->len)
                mail->len = (size_t)attr->st_size;
            else
                err = EINVAL; /* growing by truncate: nobody needs it for mail */
        }
        if (!err && mail && (to_set & FUSE_SET_ATTR_MTIME))
            mail->date = attr->st_mtim.tv_sec; /* becomes the INTERNALDATE */
        if (!err)
            newmail_attr(mail, &st);
        pthread_mutex_unlock(&newmail_lock);
        if (err)
            fuse_reply_err(req, err);
        else
            fuse_reply_attr(req, &st, 0);
        return;
    }
    uint32_t folder_id = folder_of(ino), uid = uid_of(ino);
    if (uid == 0) {
        /* directories: mode and times are accepted and not kept */
        if (to_set & FUSE_SET_ATTR_SIZE) {
            fuse_reply_err(req, EISDIR);
            return;
        }
        memset(&st, 0, sizeof(st));
        st.st_ino = ino;
        st.st_mode = S_IFDIR | 0700;
        st.st_nlink = 2;
        st.st_uid = getuid();
        st.st_gid = getgid();
        fuse_reply_attr(req, &st, 0);
        return;
    }
    if (to_set & FUSE_SET_ATTR_SIZE) {
        fuse_reply_err(req, EACCES); /* messages are immutable */
        return;
    }
    if ((to_set & FUSE_SET_ATTR_MTIME) && !(to_set & FUSE_SET_ATTR_MTIME_NOW)) {
        int redated = redate_new_mail(account, folder_id, uid, attr->st_mtim.tv_sec, &st);
        if (redated < 0) {
            fuse_reply_err(req, -redated);
            return;
        }
        if (redated) {
            st.st_ino = ino; /* the kernel's inode, now a name that is gone */
            fuse_reply_attr(req, &st, 0);
            return;
        }
    }
    int ret = message_stat(account, folder_id, uid, &st);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_attr(req, &st, fs_account_dir_timeout(account));
}

/* ---------------------------------------------------------------- names */

/* The alias name of mail stored as uid is gone (0: whatever it meant). */
static void forget_alias(uint32_t folder_id, const char *name, uint32_t uid)
{
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_name(folder_id, name);
    if (mail && mail->state != NEWMAIL_WRITING && (!uid || mail->uid == uid)) {
        mail->state = NEWMAIL_FAILED;
        mail->error = ENOENT;
    }
    pthread_mutex_unlock(&newmail_lock);
}

void fs_write_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (refuse_offline(req))
        return;
    struct fs_account *account = account_of(req);
    uint32_t folder_id = folder_of(parent), uid;

    if (fs_is_search_ino(parent)) {
        fuse_reply_err(req, EPERM); /* search results are views, not mail */
        return;
    }
    /* The name new mail is being written under: it is never stored.  The
     * name it was stored under (an alias for a while): the file the writer
     * made is deleted, so the message goes.  A temporary file removed after
     * close() (Python's NamedTemporaryFile, an editor's backup) leaves no
     * mail behind, and mv of it to another folder (copy, then unlink) leaves
     * no copy behind. */
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_name(folder_id, name);
    int is_new_mail = mail != NULL;
    uint32_t stored_uid = 0, stored_uidvalidity = 0;
    if (mail && mail->state == NEWMAIL_WRITING) {
        mail->state = NEWMAIL_FAILED;
        mail->error = ENOENT;
    } else if (mail) {
        stored_uid = mail->uid;
        stored_uidvalidity = mail->uidvalidity;
    }
    pthread_mutex_unlock(&newmail_lock);
    if (is_new_mail) {
        /* The UID must still mean that message: never expunge another one.
         * Else (or stored where the server did not say) only the name goes. */
        int ret = stored_uid ? same_folder_as_stored(account, folder_id, stored_uidvalidity) : 0;
        if (ret > 0)
            ret = fs_account_delete(account, folder_id, stored_uid);
        else if (ret == 0)
            stored_uid = 0;
        if (ret == 0 && stored_uid)
            notify_uid_name(account, folder_id, stored_uid);
        if (ret == -ENOENT)
            ret = 0; /* gone already: so is the name */
        if (ret == 0)
            forget_alias(folder_id, name, stored_uid);
        fuse_reply_err(req, -ret);
        return;
    }
    if (fs_name_to_uid(name, &uid) < 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    int ret = fs_account_delete(account, folder_id, uid);
    fuse_reply_err(req, -ret);
}

void fs_write_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
    if (refuse_offline(req))
        return;
    struct fs_account *account = account_of(req);
    struct cache *cache = fs_account_cache(account);
    uint32_t from_id = folder_of(parent), to_id = folder_of(newparent), uid, target_uid;

    if (flags & RENAME_EXCHANGE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (fs_is_search_ino(parent) || fs_is_search_ino(newparent)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    /* A directory: RENAME the mailbox. */
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, from_id);
    int is_folder = folder && cache_folder_child(folder, name) != NULL;
    struct cache_folder *target = cache_folder_by_id(cache, to_id);
    int target_exists = target && (cache_folder_child(target, newname) != NULL ||
                                   (fs_name_to_uid(newname, &target_uid) == 0 &&
                                    cache_folder_find(target, target_uid)));
    cache_unlock(cache);
    if (is_folder) {
        if (target_exists) {
            fuse_reply_err(req, EEXIST); /* never merge or replace folders */
            return;
        }
        int ret = fs_account_rename_folder(account, from_id, name, to_id, newname);
        if (ret == 0)
            fs_notify_entry(fs_account_notifier(account), newparent, newname);
        fuse_reply_err(req, -ret);
        return;
    }

    /* New mail renamed in its folder (rsync's temporary file): move the alias.
     * Onto an existing message it would be an overwrite (sed -i, rsync
     * updating a message): refused like any, and the tool's removal of its
     * temporary file then removes the new message. */
    pthread_mutex_lock(&newmail_lock);
    struct newmail *mail = newmail_by_name(from_id, name);
    if (mail) {
        int err = 0;
        if (to_id != from_id)
            err = EXDEV; /* mv falls back to copy + unlink */
        else if (target_exists)
            err = EACCES; /* messages are immutable */
        else {
            char *renamed = strdup(newname);
            if (renamed) {
                free(mail->name);
                mail->name = renamed;
            } else {
                err = ENOMEM;
            }
        }
        pthread_mutex_unlock(&newmail_lock);
        if (!err)
            fs_notify_entry(fs_account_notifier(account), newparent, newname);
        fuse_reply_err(req, err);
        return;
    }
    pthread_mutex_unlock(&newmail_lock);

    if (fs_name_to_uid(name, &uid) < 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (from_id == to_id) {
        fuse_reply_err(req, EPERM); /* a message's name is its UID */
        return;
    }
    if (fs_name_to_uid(newname, &target_uid) < 0) {
        fuse_reply_err(req, EINVAL); /* only NNN.eml names make sense in a folder */
        return;
    }
    if ((flags & RENAME_NOREPLACE) && target_exists) {
        fuse_reply_err(req, EEXIST);
        return;
    }
    uint32_t new_uid = 0;
    int ret = fs_account_move(account, from_id, uid, to_id, &new_uid);
    if (ret == 0) {
        /* The kernel now thinks newname is the moved file.  The message there,
         * if any, was never touched: make the kernel look again. */
        fs_notify_entry(fs_account_notifier(account), newparent, newname);
        if (new_uid)
            notify_uid_name(account, to_id, new_uid);
    }
    fuse_reply_err(req, -ret);
}

void fs_write_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    if (refuse_offline(req))
        return;
    struct fs_account *account = account_of(req);
    struct cache *cache = fs_account_cache(account);
    struct fuse_entry_param entry;

    (void)mode;
    if (fs_is_search_ino(parent)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    /* A file manager asked to trash a message: refused, it says it cannot
     * trash here and offers to delete (see fs_name_is_desktop_trash). */
    if (parent == FUSE_ROOT_ID && fs_name_is_desktop_trash(name)) {
        log_info("mkdir %s refused: a desktop trash is not kept on the server", name);
        fuse_reply_err(req, EPERM);
        return;
    }
    int ret = fs_account_create_folder(account, folder_of(parent), name);
    if (ret < 0) {
        fuse_reply_err(req, -ret);
        return;
    }
    memset(&entry, 0, sizeof(entry));
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_of(parent));
    struct cache_folder *child = folder ? cache_folder_child(folder, name) : NULL;
    if (child) {
        entry.ino = fs_ino_folder(child->id);
        entry.attr.st_ino = entry.ino;
        entry.attr.st_mode = S_IFDIR | 0700;
        entry.attr.st_nlink = 2;
        entry.attr.st_uid = getuid();
        entry.attr.st_gid = getgid();
        entry.attr_timeout = entry.entry_timeout = fs_account_dir_timeout(account);
    }
    cache_unlock(cache);
    if (!child) {
        /* created, but the server lists it elsewhere (a namespace rule) */
        fuse_reply_err(req, EIO);
        return;
    }
    fuse_reply_entry(req, &entry);
}

void fs_write_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (refuse_offline(req))
        return;
    if (fs_is_search_ino(parent)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    int ret = fs_account_delete_folder(account_of(req), folder_of(parent), name);
    fuse_reply_err(req, -ret);
}

/* ---------------------------------------------------------------- flags */

/* Checks a user.imap.flags value and brings it to the form STORE takes:
 * atoms separated by single spaces.  \Recent is the server's to set and is
 * dropped.  Returns a malloc'd string or NULL (EINVAL). */
static char *normalise_flags(const char *value, size_t size)
{
    static const char *const system_flags[] = { "\\Seen", "\\Answered", "\\Flagged",
                                                "\\Deleted", "\\Draft" };
    char *copy = strndup(value, size), *save = NULL;
    char *out = calloc(1, size + 1);
    size_t used = 0;

    if (!copy || !out || strlen(copy) != size)
        goto invalid;
    for (char *atom = strtok_r(copy, " \t\n", &save); atom; atom = strtok_r(NULL, " \t\n", &save)) {
        if (strcasecmp(atom, "\\Recent") == 0)
            continue;
        if (atom[0] == '\\') {
            size_t i;
            for (i = 0; i < sizeof(system_flags) / sizeof(system_flags[0]); i++)
                if (strcasecmp(atom, system_flags[i]) == 0)
                    break;
            if (i == sizeof(system_flags) / sizeof(system_flags[0]))
                goto invalid;
        } else if (!imap_is_atom(atom) || strchr(atom, ']')) {
            goto invalid;
        }
        used += (size_t)sprintf(out + used, "%s%s", used ? " " : "", atom);
    }
    free(copy);
    return out;
invalid:
    free(copy);
    free(out);
    return NULL;
}

void fs_write_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags)
{
    if (refuse_offline(req))
        return;
    struct fs_account *account = account_of(req);
    uint32_t uid = uid_of(ino);

    (void)flags;
    if (fs_is_newmail_ino(ino) || fs_is_search_ino(ino) || uid == 0) {
        fuse_reply_err(req, ENOTSUP);
        return;
    }
    if (strcmp(name, "user.imap.uid") == 0 || strcmp(name, "user.imap.uidvalidity") == 0 ||
        strncmp(name, "user.mail.", 10) == 0 || strcmp(name, "user.mime_type") == 0) {
        fuse_reply_err(req, EPERM); /* read-only facts */
        return;
    }
    if (strcmp(name, "user.imap.flags") != 0) {
        fuse_reply_err(req, ENOTSUP);
        return;
    }
    char *normal = normalise_flags(value, size);
    if (!normal) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    int ret = fs_account_store_flags(account, folder_of(ino), uid, normal);
    free(normal);
    if (ret == 0)
        fs_notify_inode(fs_account_notifier(account), ino); /* ctime/xattr views */
    fuse_reply_err(req, -ret);
}

void fs_write_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    if (refuse_offline(req))
        return;
    if (uid_of(ino) && !fs_is_newmail_ino(ino) && !fs_is_search_ino(ino) &&
        strcmp(name, "user.imap.flags") == 0) {
        int ret = fs_account_store_flags(account_of(req), folder_of(ino), uid_of(ino), "");
        fuse_reply_err(req, -ret);
        return;
    }
    fuse_reply_err(req, uid_of(ino) ? EPERM : ENODATA);
}

/* Symlinks are not mail: nothing on the server could hold one. */
void fs_write_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
    (void)link;
    (void)parent;
    (void)name;
    fuse_reply_err(req, EPERM);
}
