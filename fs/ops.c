/* fs/ops.c — the FUSE low-level operations.
 *
 * Every answer comes from the cache (fs/account.c and the files beside it fill it on a miss).
 * Inode numbers encode folder id and UID (fs.h), so there is no inode
 * table to keep in step with the kernel.  Messages are immutable per
 * (UIDVALIDITY, UID): files are opened with keep_cache, so the kernel's page
 * cache serves repeated reads; entries and attributes time out with the
 * listing (-o dir_cache_timeout).
 *
 * The operations that change the account live in fs/write.c. */
#include "fs/fs.h"
#include "fs/names.h"
#include "imap/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static struct fs_account *account_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static uint32_t ino_folder_id(fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? CACHE_ROOT_ID : (uint32_t)(ino >> 32);
}

static uint32_t ino_uid(fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? 0 : (uint32_t)ino;
}

/* Folders have no date of their own in IMAP; they show the mount's start. */
static time_t mounted_at;

/* The mount's owner, read once at INIT: an ls -l of 100,000 messages would
 * otherwise make 200,000 getuid and getgid system calls. */
static uid_t owner_uid;
static gid_t owner_gid;

/* No-open mode (fs_account_no_open).  On a read-only mount (-o ro) OPEN and
 * FLUSH answer ENOSYS: the kernel then opens every file of the mount
 * without asking and closes it without a FLUSH (and sends no RELEASE), so
 * a file already in the page cache costs no request at all.  A request
 * costs a wakeup of the other vCPU on this project's machine, 50-100 us
 * (bench/README.md), more than grep spends on the whole file; a warm grep
 * was an OPEN and a RELEASE per message.  On a writable mount FLUSH must
 * stay: close() of new mail is where its APPEND happens and a failure is
 * reported, and the kernel's switch for FLUSH is per connection.  Reads
 * arrive with fh 0 then, and a read from offset 0 stands for the open: it
 * fetches and tells the read-ahead where the reader is (fs/bodies.c keeps
 * some bodies of a scan out of the page cache, so that the reader's
 * progress still shows). */

/* In no-open mode a file the kernel believes empty is never read from the
 * daemon: a message listed with RFC822.SIZE 0 (a server's lie, or a broken
 * message) has a size to learn, which its GETATTR fetches the message for,
 * and gets no attribute caching, so that every read asks GETATTR. */
static int size_to_learn(const struct fs_account *account, const struct stat *st)
{
    return S_ISREG(st->st_mode) && st->st_size == 0 && fs_account_no_open(account);
}

static double attr_timeout_of(const struct fs_account *account, const struct stat *st,
                              double timeout)
{
    return size_to_learn(account, st) ? 0 : timeout;
}

void fs_attr_owner(struct stat *st)
{
    st->st_uid = owner_uid;
    st->st_gid = owner_gid;
}

static void folder_attr(const struct cache_folder *folder, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_mtim.tv_sec = st->st_atim.tv_sec = st->st_ctim.tv_sec = mounted_at;
    st->st_ino = fs_ino_folder(folder->id);
    st->st_mode = S_IFDIR | 0700;
    st->st_nlink = 2;
    fs_attr_owner(st);
    st->st_blksize = 65536;
}

static void message_attr(uint32_t folder_id, const struct cache_message *message, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = fs_ino_message(folder_id, message->uid);
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    fs_attr_owner(st);
    st->st_size = (off_t)message->size;
    st->st_blocks = (blkcnt_t)((message->size + 511) / 512);
    st->st_blksize = 65536;
    st->st_mtim.tv_sec = st->st_atim.tv_sec = st->st_ctim.tv_sec = (time_t)message->internaldate;
}

/* A message the mount shows: present, and not a \Deleted one that stays on
 * a server without UIDPLUS only because it cannot be expunged alone. */
static struct cache_message *visible_message(struct fs_account *account,
                                             struct cache_folder *folder, uint32_t uid)
{
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    if (message && (message->flags & CACHE_FLAG_DELETED) && fs_account_hides_deleted(account))
        return NULL;
    return message;
}

/* Makes sure a selectable folder's UID table is loaded and fresh. */
static int ensure_listed(struct fs_account *account, uint32_t folder_id)
{
    return fs_account_load_folder(account, folder_id, 0);
}

static void fs_init(void *userdata, struct fuse_conn_info *conn)
{
    struct fs_account *account = userdata;

    if (fs_account_readonly(account) && (conn->capable & FUSE_CAP_NO_OPEN_SUPPORT))
        fs_account_set_no_open(account);
    mounted_at = time(NULL);
    owner_uid = getuid();
    owner_gid = getgid();
    if (conn->capable & FUSE_CAP_ASYNC_READ)
        conn->want |= FUSE_CAP_ASYNC_READ;
    /* Readdirplus saves one lookup per entry for ls -l. */
    if (conn->capable & FUSE_CAP_READDIRPLUS)
        conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~(unsigned)FUSE_CAP_READDIRPLUS_AUTO;
}

static void fs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fs_account *account = account_of(req);
    struct cache *cache = fs_account_cache(account);
    struct fuse_entry_param entry;
    uint32_t folder_id = ino_folder_id(parent), uid;
    double timeout = fs_account_dir_timeout(account);

    if (fs_is_search_ino(parent) || strcmp(name, ".search") == 0) {
        int ret = fs_search_lookup(account, parent, name, &entry);
        if (ret <= 0) {
            if (ret < 0)
                fuse_reply_err(req, -ret);
            else
                fuse_reply_entry(req, &entry);
            return;
        }
    }
    if (ino_uid(parent) != 0) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    memset(&entry, 0, sizeof(entry));
    entry.attr_timeout = entry.entry_timeout = timeout;
    int is_uid = fs_name_to_uid(name, &uid) == 0;
    if (is_uid) {
        int ret = ensure_listed(account, folder_id);
        if (ret < 0 && ret != -ENOENT) {
            fuse_reply_err(req, -ret);
            return;
        }
    }
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    if (!folder) {
        cache_unlock(cache);
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct cache_folder *child = cache_folder_child(folder, name);
    if (child) {
        folder_attr(child, &entry.attr);
        entry.ino = entry.attr.st_ino;
        cache_unlock(cache);
        fuse_reply_entry(req, &entry);
        return;
    }
    struct cache_message *message = is_uid ? visible_message(account, folder, uid) : NULL;
    if (message) {
        message_attr(folder_id, message, &entry.attr);
        entry.ino = entry.attr.st_ino;
        entry.attr_timeout = attr_timeout_of(account, &entry.attr, timeout);
        entry.generation = folder->uidvalidity;
        cache_unlock(cache);
        fuse_reply_entry(req, &entry);
        return;
    }
    cache_unlock(cache);
    /* A file being written, or the name new mail was written under (whose
     * folder may need listing: without the server that is an error, not a
     * name that is not there). */
    int ret = fs_newmail_lookup(account, folder_id, name, &entry.attr);
    if (ret == 0) {
        entry.ino = entry.attr.st_ino;
        entry.attr_timeout = entry.entry_timeout = 0;
        fuse_reply_entry(req, &entry);
        return;
    }
    if (ret != -ENOENT) {
        fuse_reply_err(req, -ret);
        return;
    }
    /* A negative entry, cached like the listing it was judged against; the
     * folder remembers it, so that a listing that adds the name says so. */
    if (is_uid && timeout > 0) {
        cache_lock(cache);
        folder = cache_folder_by_id(cache, folder_id);
        if (folder && folder->negative_until < now_monotonic() + timeout)
            folder->negative_until = now_monotonic() + timeout;
        cache_unlock(cache);
    }
    entry.ino = 0;
    fuse_reply_entry(req, &entry);
}

static void fs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs_account *account = account_of(req);
    struct cache *cache = fs_account_cache(account);
    uint32_t folder_id = ino_folder_id(ino), uid = ino_uid(ino);
    struct stat st;

    (void)fi;
    if (fs_is_newmail_ino(ino) || fs_is_search_ino(ino)) {
        int ret = fs_is_newmail_ino(ino) ? fs_newmail_getattr(ino, &st)
                                         : fs_search_getattr(account, ino, &st);
        if (ret < 0)
            fuse_reply_err(req, -ret);
        else
            fuse_reply_attr(req, &st, 0);
        return;
    }
    if (uid) {
        cache_lock(cache);
        struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
        int loaded = folder && folder->listed_at > 0;
        cache_unlock(cache);
        if (!loaded)
            ensure_listed(account, folder_id);
    }
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    struct cache_message *message = uid ? visible_message(account, folder, uid) : NULL;
    if (!folder || (uid && !message)) {
        cache_unlock(cache);
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (message)
        message_attr(folder_id, message, &st);
    else
        folder_attr(folder, &st);
    cache_unlock(cache);
    if (message && size_to_learn(account, &st)) {
        struct cache_body *body;
        if (fs_account_body_continued(account, folder_id, uid, &body) == 0) {
            st.st_size = (off_t)body->len;
            st.st_blocks = (blkcnt_t)((body->len + 511) / 512);
            fs_account_body_release(account, body);
        }
    }
    fuse_reply_attr(req, &st, attr_timeout_of(account, &st, fs_account_dir_timeout(account)));
}

static void fs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs_account *account = account_of(req);
    uint32_t folder_id = ino_folder_id(ino);

    if (fs_is_search_ino(ino)) {
        int ret = fs_search_opendir(account, ino);
        if (ret < 0)
            fuse_reply_err(req, -ret);
        else
            fuse_reply_open(req, fi);
        return;
    }
    if (ino_uid(ino) != 0) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    /* Refresh once per listing, not once per readdir chunk.  A first
     * listing is streamed: readdir shows it as it arrives. */
    int streamed = fs_account_stream_begin(account, folder_id);
    if (!streamed) {
        int ret = ensure_listed(account, folder_id);
        if (ret < 0) {
            fuse_reply_err(req, -ret);
            return;
        }
    }
    fi->cache_readdir = 0;
    fuse_reply_open(req, fi);
    if (streamed == 1)
        fs_account_stream_run(account, folder_id);
}

/* Directory offsets: 1 and 2 after "." and "..", 3 + i after the i-th
 * subfolder, MESSAGE_OFFSET + uid after a message.  UID-based offsets keep a
 * listing in progress correct when messages come and go. */
#define MESSAGE_OFFSET ((off_t)1 << 33)

/* Adds one entry; 0 when the reply buffer is full. */
int fs_listing_add(struct fs_listing *listing, const char *name, const struct stat *st,
                   off_t next_offset)
{
    size_t room = listing->size - listing->used, entry_size;

    if (listing->plus) {
        struct fuse_entry_param entry = { .ino = st->st_ino, .attr = *st,
                                          .attr_timeout = attr_timeout_of(
                                              account_of(listing->req), st, listing->timeout),
                                          .entry_timeout = listing->timeout };
        entry_size = fuse_add_direntry_plus(listing->req, listing->buf + listing->used, room,
                                            name, &entry, next_offset);
    } else {
        entry_size = fuse_add_direntry(listing->req, listing->buf + listing->used, room, name,
                                       st, next_offset);
    }
    if (entry_size > room)
        return 0;
    listing->used += entry_size;
    return 1;
}

/* Adds the messages of a first listing that is still arriving, after
 * *after.  Returns 1 when the reply is full, 0 when the listing is over. */
static int add_streamed(struct fs_account *account, uint32_t folder_id, struct fs_listing *listing,
                        uint32_t *after)
{
    struct cache_message streamed[256];
    char name[32];
    struct stat st;
    size_t n;

    while (*after != UINT32_MAX &&
           (n = fs_account_stream_read(account, folder_id, *after, streamed, 256)) > 0) {
        for (size_t i = 0; i < n; i++) {
            if ((streamed[i].flags & CACHE_FLAG_DELETED) && fs_account_hides_deleted(account)) {
                *after = streamed[i].uid;
                continue;
            }
            fs_name_from_uid(streamed[i].uid, name, sizeof(name));
            message_attr(folder_id, &streamed[i], &st);
            if (!fs_listing_add(listing, name, &st, MESSAGE_OFFSET + streamed[i].uid))
                return 1;
            *after = streamed[i].uid;
        }
    }
    return 0;
}

static void readdir_common(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, int plus)
{
    struct fs_account *account = account_of(req);
    struct cache *cache = fs_account_cache(account);
    uint32_t folder_id = ino_folder_id(ino);
    struct fs_listing listing = { req, malloc(size), size, 0, plus, fs_account_dir_timeout(account) };
    char name[32];
    struct stat st;

    if (!listing.buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (fs_is_search_ino(ino)) {
        int ret = fs_search_readdir(account, ino, &listing, offset);
        if (ret < 0)
            fuse_reply_err(req, -ret);
        else
            fuse_reply_buf(req, listing.buf, listing.used);
        free(listing.buf);
        return;
    }
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    if (!folder) {
        cache_unlock(cache);
        free(listing.buf);
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (offset < 1) {
        folder_attr(folder, &st);
        if (!fs_listing_add(&listing, ".", &st, 1))
            goto full;
        offset = 1;
    }
    if (offset < 2) {
        /* ".." of the root lies outside the mount; the kernel resolves it */
        folder_attr(folder->parent ? folder->parent : folder, &st);
        if (!fs_listing_add(&listing, "..", &st, 2))
            goto full;
        offset = 2;
    }
    if (offset < MESSAGE_OFFSET) {
        off_t index = 0;
        for (struct cache_folder *child = folder->children; child; child = child->next, index++) {
            if (3 + index <= offset)
                continue;
            folder_attr(child, &st);
            if (!fs_listing_add(&listing, child->name, &st, 3 + index))
                goto full;
        }
        offset = MESSAGE_OFFSET;
    }
    /* from the first message after the one the last reply ended with */
    uint32_t after = (uint32_t)(offset - MESSAGE_OFFSET);
    if (folder->selectable && folder->listed_at == 0) {
        /* a first listing, maybe still arriving (fs_account_stream_begin) */
        cache_unlock(cache);
        int ret = add_streamed(account, folder_id, &listing, &after);
        if (ret == 0 && listing.used == 0) {
            ret = ensure_listed(account, folder_id); /* the stream failed: an error */
            if (ret < 0) {
                free(listing.buf);
                fuse_reply_err(req, -ret);
                return;
            }
        }
        cache_lock(cache);
        folder = cache_folder_by_id(cache, folder_id);
        if (ret || !folder)
            goto full;
    }
    size_t from = after == UINT32_MAX ? folder->count : cache_folder_lower_bound(folder, after + 1);
    for (size_t i = from; i < folder->count; i++) {
        const struct cache_message *message = &folder->messages[i];
        if ((message->flags & CACHE_FLAG_DELETED) && fs_account_hides_deleted(account))
            continue;
        fs_name_from_uid(message->uid, name, sizeof(name));
        message_attr(folder_id, message, &st);
        if (!fs_listing_add(&listing, name, &st, MESSAGE_OFFSET + message->uid))
            goto full;
    }
full:
    cache_unlock(cache);
    fuse_reply_buf(req, listing.buf, listing.used);
    free(listing.buf);
}

static void fs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
                       struct fuse_file_info *fi)
{
    (void)fi;
    readdir_common(req, ino, size, offset, 0);
}

static void fs_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
                           struct fuse_file_info *fi)
{
    (void)fi;
    readdir_common(req, ino, size, offset, 1);
}

/* The body of a message the mount shows, referenced; *listed_size is the
 * size the kernel was given (before a fetch corrects it) and
 * *recently_reset says the folder's UIDVALIDITY changed in the last minute.
 * from_start: an open, or a read from the first byte in no-open mode. */
static int message_body(struct fs_account *account, fuse_ino_t ino, int from_start,
                        struct cache_body **body, uint64_t *listed_size, int *recently_reset)
{
    struct cache *cache = fs_account_cache(account);
    uint32_t folder_id = ino_folder_id(ino), uid = ino_uid(ino);

    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    if (folder && folder->listed_at == 0 && folder->uidvalidity == 0) {
        /* the name may come from a first listing still arriving */
        cache_unlock(cache);
        ensure_listed(account, folder_id);
        cache_lock(cache);
        folder = cache_folder_by_id(cache, folder_id);
    }
    struct cache_message *message = visible_message(account, folder, uid);
    *listed_size = message ? message->size : 0;
    /* Right after a UIDVALIDITY change the kernel may still hold pages of the
     * message this name meant before: open without keep_cache drops them. */
    *recently_reset = folder && folder->reset_at > 0 && now_monotonic() - folder->reset_at < 60;
    cache_unlock(cache);
    if (!message)
        return -ENOENT;
    return from_start ? fs_account_body(account, folder_id, uid, body)
                      : fs_account_body_continued(account, folder_id, uid, body);
}

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs_account *account = account_of(req);
    uint32_t uid = ino_uid(ino);

    if (fs_is_newmail_ino(ino)) {
        int ret = fs_newmail_open(ino);
        if (ret < 0) {
            fuse_reply_err(req, -ret);
            return;
        }
        fi->fh = 0;
        fi->direct_io = 1;
        fuse_reply_open(req, fi);
        return;
    }
    if (!uid || fs_is_search_ino(ino)) {
        fuse_reply_err(req, fs_is_search_ino(ino) && (ino & FS_INO_RESULT) ? ELOOP : EISDIR);
        return;
    }
    if (fs_account_no_open(account)) {
        fuse_reply_err(req, ENOSYS); /* the kernel asks no more: see no-open mode */
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
        fuse_reply_err(req, EACCES); /* messages are immutable */
        return;
    }
    /* An open message file's fh is its body, referenced until release, so
     * the body cache never evicts what a reader is reading.
     * The body is fetched here, not at the first read: if the server's
     * RFC822.SIZE was wrong, the kernel would otherwise cut reads at the
     * wrong size.  Then this open bypasses the page cache (direct_io), so
     * reads go by the real length, and the attributes are corrected. */
    struct cache_body *body;
    uint64_t listed_size;
    int recently_reset;
    int ret = message_body(account, ino, 1, &body, &listed_size, &recently_reset);
    if (ret < 0) {
        fuse_reply_err(req, -ret);
        return;
    }
    if (body->len != listed_size) {
        fi->direct_io = 1;
        fs_notify_inode(fs_account_notifier(account), ino);
    } else {
        fi->keep_cache = !recently_reset; /* immutable: the page cache stays valid */
    }
    fi->fh = (uintptr_t)body;
    fi->noflush = 1; /* nothing to flush on a message: spare the round trip */
    if (fuse_reply_open(req, fi) == -ENOENT) /* interrupted: no release will come */
        fs_account_body_release(account, body);
}

static void reply_from_body(fuse_req_t req, const struct cache_body *body, size_t size,
                            off_t offset)
{
    if (offset < 0 || (uint64_t)offset >= body->len) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    size_t available = body->len - (size_t)offset;
    fuse_reply_buf(req, body->data + offset, size < available ? size : available);
}

/* A READ in no-open mode: no open fetched the body, so this does. */
static void read_unopened(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset)
{
    struct fs_account *account = account_of(req);
    struct cache_body *body;
    uint64_t listed_size;
    int recently_reset;

    int ret = message_body(account, ino, offset == 0, &body, &listed_size, &recently_reset);
    if (ret < 0) {
        fuse_reply_err(req, -ret);
        return;
    }
    /* The server's RFC822.SIZE was short: the kernel cuts this read at the
     * size it holds, and the reader's next read must ask for the real one,
     * so the attributes are stale before the reply.  One too long is cut by
     * the kernel at this short reply, and the invalidation must come after
     * it (see take_body in fs/bodies.c). */
    if (body->len > listed_size)
        fs_notify_attrs_now(fs_account_notifier(account), ino);
    reply_from_body(req, body, size, offset);
    if (body->len < listed_size)
        fs_notify_inode(fs_account_notifier(account), ino);
    fs_account_body_release(account, body);
}

static void fs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
                    struct fuse_file_info *fi)
{
    if (fs_is_newmail_ino(ino)) {
        fs_newmail_read(req, ino, size, offset);
        return;
    }
    if (!fi->fh) {
        read_unopened(req, ino, size, offset);
        return;
    }
    reply_from_body(req, (const struct cache_body *)(uintptr_t)fi->fh, size, offset);
}

static void fs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    if (fs_is_newmail_ino(ino))
        fs_newmail_flush(req, ino); /* close() of new mail: APPEND now */
    else
        fuse_reply_err(req, fs_account_no_open(account_of(req)) ? ENOSYS : 0); /* no FLUSH again */
}

static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fs_is_newmail_ino(ino)) {
        fs_newmail_release(req, ino);
        return;
    }
    fs_account_body_release(account_of(req), (struct cache_body *)(uintptr_t)fi->fh);
    fuse_reply_err(req, 0);
}

static void fs_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct statvfs st;
    uint64_t used, limit;

    (void)ino;
    memset(&st, 0, sizeof(st));
    st.f_bsize = st.f_frsize = 1024;
    st.f_namemax = 255;
    st.f_files = st.f_ffree = st.f_favail = 1ull << 32;
    if (fs_account_quota(account_of(req), &used, &limit) == 0) {
        /* df shows the quota: size, used, available */
        st.f_blocks = limit / 1024;
        st.f_bfree = st.f_bavail = used < limit ? (limit - used) / 1024 : 0;
    } else {
        /* no quota known: large numbers, never an error */
        st.f_blocks = st.f_bfree = st.f_bavail = 1ull << 40;
    }
    fuse_reply_statfs(req, &st);
}

/* ---------------------------------------------------------------- xattrs */

#define XATTR_FLAGS "user.imap.flags"
#define XATTR_UID "user.imap.uid"
#define XATTR_UIDVALIDITY "user.imap.uidvalidity"
#define XATTR_MIME "user.mime_type"
#define XATTR_MAIL "user.mail."

static void reply_xattr_value(fuse_req_t req, const char *value, size_t size)
{
    size_t len = strlen(value);
    if (size == 0)
        fuse_reply_xattr(req, len);
    else if (size < len)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, value, len);
}

static void fs_readlink(fuse_req_t req, fuse_ino_t ino)
{
    char target[4096];
    int ret = fs_search_readlink(account_of(req), ino, target, sizeof(target));
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_readlink(req, target);
}

static void fs_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    struct cache *cache = fs_account_cache(account_of(req));
    uint32_t folder_id = ino_folder_id(ino), uid = ino_uid(ino);
    char number[24], *value = NULL;

    /* Only user.* attributes exist here.  EOPNOTSUPP (not ENODATA) for
     * security.selinux, system.posix_acl_access and the like makes ls -l
     * stop asking for every file of the mount: 200,000 round trips fewer
     * for a folder of 100,000 messages. */
    if (strncmp(name, "user.", 5) != 0) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }

    if (!uid || fs_is_search_ino(ino) || fs_is_newmail_ino(ino)) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    if (!message) {
        cache_unlock(cache);
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (strcmp(name, XATTR_FLAGS) == 0) {
        value = cache_flags_format(message->flags, message->keywords);
    } else if (strcmp(name, XATTR_UID) == 0) {
        snprintf(number, sizeof(number), "%u", uid);
        value = strdup(number);
    } else if (strcmp(name, XATTR_UIDVALIDITY) == 0) {
        snprintf(number, sizeof(number), "%u", folder->uidvalidity);
        value = strdup(number);
    } else if (strcmp(name, XATTR_MIME) == 0) {
        value = strdup("message/rfc822"); /* the shared MIME-info xattr */
    } else if (strncmp(name, XATTR_MAIL, strlen(XATTR_MAIL)) == 0) {
        /* from the envelope, fetched for the folder at the first ask */
        const char *field = name + strlen(XATTR_MAIL);
        uint32_t uidvalidity = folder->uidvalidity;
        cache_unlock(cache);
        if (strcmp(field, "subject") && strcmp(field, "from") && strcmp(field, "date")) {
            fuse_reply_err(req, ENODATA);
            return;
        }
        int ret = fs_mailinfo_get(account_of(req), folder_id, uidvalidity, uid, field, &value);
        if (ret < 0) {
            fuse_reply_err(req, ret == -ENODATA || ret == -ENOENT ? ENODATA : -ret);
            return;
        }
        reply_xattr_value(req, value, size);
        free(value);
        return;
    } else {
        cache_unlock(cache);
        fuse_reply_err(req, ENODATA);
        return;
    }
    cache_unlock(cache);
    if (!value) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    reply_xattr_value(req, value, size);
    free(value);
}

static void fs_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    static const char names[] = XATTR_FLAGS "\0" XATTR_UID "\0" XATTR_UIDVALIDITY "\0"
                                XATTR_MAIL "subject\0" XATTR_MAIL "from\0" XATTR_MAIL "date\0"
                                XATTR_MIME "\0";

    if (!ino_uid(ino) || fs_is_search_ino(ino) || fs_is_newmail_ino(ino)) {
        fuse_reply_xattr(req, 0);
        return;
    }
    if (size == 0)
        fuse_reply_xattr(req, sizeof(names) - 1);
    else if (size < sizeof(names) - 1)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, names, sizeof(names) - 1);
}

const struct fuse_lowlevel_ops fs_operations = {
    .init = fs_init,
    .lookup = fs_lookup,
    .getattr = fs_getattr,
    .opendir = fs_opendir,
    .readdir = fs_readdir,
    .readdirplus = fs_readdirplus,
    .readlink = fs_readlink,
    .open = fs_open,
    .read = fs_read,
    .release = fs_release,
    .statfs = fs_statfs,
    .getxattr = fs_getxattr,
    .listxattr = fs_listxattr,
    .flush = fs_flush,
    .create = fs_write_create,
    .write = fs_write_write,
    .setattr = fs_write_setattr,
    .unlink = fs_write_unlink,
    .rename = fs_write_rename,
    .mkdir = fs_write_mkdir,
    .rmdir = fs_write_rmdir,
    .setxattr = fs_write_setxattr,
    .removexattr = fs_write_removexattr,
    .symlink = fs_write_symlink,
    /* mknod, link, symlink: not implemented, so ENOSYS -> EPERM-like refusals */
};
