/* fs/search.c — server-side search as directories.
 *
 * In every folder that holds messages, looking up `.search/CRITERIA` runs
 * `UID SEARCH CRITERIA` on the server (CHARSET UTF-8; nothing is
 * downloaded) and shows the matches as symlinks `UID.eml -> ../../UID.eml`.
 * Symlinks, so that `grep -r` over the mount (which does not follow them)
 * never reads a message twice, while cat of a result reads the message.
 * `.search` itself is not listed in its folder (find and grep -r would
 * otherwise walk every query); `ls FOLDER/.search/` lists the queries used
 * recently.  Results are searched again like any listing, after
 * -o dir_cache_timeout.
 *
 * Inodes: the .search directory of folder F is FS_INO_SEARCH | F << 32; a
 * query directory adds its query id in the low 32 bits; a result symlink is
 * FS_INO_RESULT | query id << 32 | UID.  A small table remembers the
 * MAX_QUERIES most recent queries; an evicted query's inodes give ENOENT
 * and a new lookup brings it back. */
#include "fs/fs.h"
#include "fs/names.h"
#include "imap/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_QUERIES 64
#define SEARCH_DIR ".search"

struct search_query {
    uint32_t id;            /* 1 .. 2^31-1, never reused */
    uint32_t folder_id;
    char *criteria;         /* its name under .search/ */
    uint32_t *uids;         /* sorted */
    size_t count;
    double searched_at;     /* monotonic; 0 = never */
    double used_at;
    struct search_query *next;
};

struct fs_searches {
    pthread_mutex_t lock;
    struct search_query *queries;   /* protected by lock; most recent first */
    uint32_t next_id;               /* protected by lock */
};

static double now_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct fs_searches *fs_searches_new(void)
{
    struct fs_searches *searches = calloc(1, sizeof(*searches));
    if (searches)
        pthread_mutex_init(&searches->lock, NULL);
    return searches;
}

static void query_free(struct search_query *query)
{
    free(query->criteria);
    free(query->uids);
    free(query);
}

void fs_searches_free(struct fs_searches *searches)
{
    if (!searches)
        return;
    while (searches->queries) {
        struct search_query *next = searches->queries->next;
        query_free(searches->queries);
        searches->queries = next;
    }
    pthread_mutex_destroy(&searches->lock);
    free(searches);
}

/* --- inode numbers --- */

static fuse_ino_t search_dir_ino(uint32_t folder_id) { return FS_INO_SEARCH | (fuse_ino_t)folder_id << 32; }
static fuse_ino_t query_ino(uint32_t folder_id, uint32_t id) { return search_dir_ino(folder_id) | id; }
static fuse_ino_t result_ino(uint32_t id, uint32_t uid) { return FS_INO_RESULT | (fuse_ino_t)id << 32 | uid; }
static uint32_t ino_folder(fuse_ino_t ino) { return (uint32_t)((ino & ~FS_INO_SEARCH) >> 32); }
static uint32_t ino_low(fuse_ino_t ino) { return (uint32_t)ino; }
static uint32_t result_query(fuse_ino_t ino) { return (uint32_t)((ino & ~FS_INO_RESULT) >> 32); }

static void dir_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = S_IFDIR | 0500;
    st->st_nlink = 2;
    st->st_uid = getuid();
    st->st_gid = getgid();
}

static void link_attr(uint32_t id, uint32_t uid, struct stat *st)
{
    char target[40];
    memset(st, 0, sizeof(*st));
    st->st_ino = result_ino(id, uid);
    st->st_mode = S_IFLNK | 0777;
    st->st_nlink = 1;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_size = snprintf(target, sizeof(target), "../../%u.eml", uid);
}

/* --- the query table (caller holds searches->lock) --- */

static struct search_query *query_by_id(struct fs_searches *searches, uint32_t id)
{
    for (struct search_query *query = searches->queries; query; query = query->next)
        if (query->id == id)
            return query;
    return NULL;
}

static struct search_query *query_by_name(struct fs_searches *searches, uint32_t folder_id,
                                          const char *criteria)
{
    for (struct search_query *query = searches->queries; query; query = query->next)
        if (query->folder_id == folder_id && strcmp(query->criteria, criteria) == 0)
            return query;
    return NULL;
}

static int uid_in_results(const struct search_query *query, uint32_t uid)
{
    size_t lo = 0, hi = query->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (query->uids[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < query->count && query->uids[lo] == uid;
}

/* Runs the search (without the lock) when it never ran or is older than the
 * listing timeout, and stores the result.  0 or -errno. */
static int refresh_query(struct fs_account *account, uint32_t id)
{
    struct fs_searches *searches = fs_account_searches(account);
    uint32_t folder_id, *uids = NULL;
    size_t count = 0;
    char *criteria;

    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, id);
    if (!query) {
        pthread_mutex_unlock(&searches->lock);
        return -ENOENT;
    }
    query->used_at = now_monotonic();
    if (query->searched_at > 0 &&
        query->used_at - query->searched_at < fs_account_dir_timeout(account)) {
        pthread_mutex_unlock(&searches->lock);
        return 0;
    }
    folder_id = query->folder_id;
    criteria = strdup(query->criteria);
    pthread_mutex_unlock(&searches->lock);
    if (!criteria)
        return -ENOMEM;

    int ret = fs_account_search(account, folder_id, criteria, &uids, &count);
    free(criteria);
    if (ret < 0)
        return ret;
    pthread_mutex_lock(&searches->lock);
    query = query_by_id(searches, id);
    if (query) {
        free(query->uids);
        query->uids = uids;
        query->count = count;
        query->searched_at = now_monotonic();
        uids = NULL;
    }
    pthread_mutex_unlock(&searches->lock);
    free(uids);
    return query ? 0 : -ENOENT;
}

/* Finds or adds the query; evicts the least recently used beyond
 * MAX_QUERIES.  Returns its id, or 0 on out of memory. */
static uint32_t query_get(struct fs_searches *searches, uint32_t folder_id, const char *criteria)
{
    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_name(searches, folder_id, criteria);
    uint32_t id = 0;
    if (!query) {
        query = calloc(1, sizeof(*query));
        if (query && (query->criteria = strdup(criteria))) {
            query->id = ++searches->next_id & 0x7fffffffu;
            query->folder_id = folder_id;
            query->next = searches->queries;
            searches->queries = query;
        } else {
            free(query);
            query = NULL;
        }
        /* keep the table small */
        size_t n = 0;
        for (struct search_query **link = &searches->queries; *link;) {
            if (++n > MAX_QUERIES) {
                struct search_query *oldest = *link;
                *link = oldest->next;
                query_free(oldest);
            } else {
                link = &(*link)->next;
            }
        }
    }
    if (query) {
        query->used_at = now_monotonic();
        id = query->id;
    }
    pthread_mutex_unlock(&searches->lock);
    return id;
}

/* A criteria string must be one safe line of text. */
static int criteria_ok(const char *name)
{
    for (const unsigned char *c = (const unsigned char *)name; *c; c++)
        if (*c < 0x20 || *c == 0x7f)
            return 0;
    return *name != '\0';
}

static int folder_selectable(struct fs_account *account, uint32_t folder_id)
{
    struct cache *cache = fs_account_cache(account);
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, folder_id);
    int selectable = folder && folder->selectable;
    cache_unlock(cache);
    return selectable;
}

/* --- operations --- */

int fs_search_lookup(struct fs_account *account, fuse_ino_t parent, const char *name,
                     struct fuse_entry_param *entry)
{
    struct fs_searches *searches = fs_account_searches(account);
    double timeout = fs_account_dir_timeout(account);

    memset(entry, 0, sizeof(*entry));
    entry->attr_timeout = entry->entry_timeout = timeout;
    if (!fs_is_search_ino(parent)) {
        /* FOLDER/.search */
        uint32_t folder_id = parent == FUSE_ROOT_ID ? CACHE_ROOT_ID : (uint32_t)(parent >> 32);
        if (strcmp(name, SEARCH_DIR) != 0 || (uint32_t)parent != 0 ||
            !folder_selectable(account, folder_id))
            return 1;
        dir_attr(search_dir_ino(folder_id), &entry->attr);
        entry->ino = entry->attr.st_ino;
        return 0;
    }
    if (parent & FS_INO_RESULT)
        return -ENOTDIR;
    uint32_t folder_id = ino_folder(parent);
    if (ino_low(parent) == 0) {
        /* FOLDER/.search/CRITERIA: search now, so bad criteria fail here */
        if (!criteria_ok(name))
            return -EINVAL;
        uint32_t id = query_get(searches, folder_id, name);
        if (!id)
            return -ENOMEM;
        int ret = refresh_query(account, id);
        if (ret < 0)
            return ret;
        dir_attr(query_ino(folder_id, id), &entry->attr);
        entry->ino = entry->attr.st_ino;
        entry->attr_timeout = entry->entry_timeout = 0; /* results change */
        return 0;
    }
    /* FOLDER/.search/CRITERIA/UID.eml */
    uint32_t id = ino_low(parent), uid;
    if (fs_name_to_uid(name, &uid) < 0)
        return -ENOENT;
    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, id);
    int found = query && uid_in_results(query, uid);
    pthread_mutex_unlock(&searches->lock);
    if (!found)
        return -ENOENT;
    link_attr(id, uid, &entry->attr);
    entry->ino = entry->attr.st_ino;
    return 0;
}

int fs_search_getattr(struct fs_account *account, fuse_ino_t ino, struct stat *st)
{
    struct fs_searches *searches = fs_account_searches(account);

    if (ino & FS_INO_RESULT) {
        uint32_t id = result_query(ino);
        pthread_mutex_lock(&searches->lock);
        int known = query_by_id(searches, id) != NULL;
        pthread_mutex_unlock(&searches->lock);
        if (!known)
            return -ENOENT;
        link_attr(id, ino_low(ino), st);
        return 0;
    }
    if (ino_low(ino) != 0) {
        pthread_mutex_lock(&searches->lock);
        int known = query_by_id(searches, ino_low(ino)) != NULL;
        pthread_mutex_unlock(&searches->lock);
        if (!known)
            return -ENOENT;
    } else if (!folder_selectable(account, ino_folder(ino))) {
        return -ENOENT;
    }
    dir_attr(ino, st);
    return 0;
}

int fs_search_opendir(struct fs_account *account, fuse_ino_t ino)
{
    if (ino & FS_INO_RESULT)
        return -ENOTDIR;
    return ino_low(ino) ? refresh_query(account, ino_low(ino)) : 0;
}

int fs_search_readdir(struct fs_account *account, fuse_ino_t ino, struct fs_listing *listing,
                      off_t offset)
{
    struct fs_searches *searches = fs_account_searches(account);
    uint32_t folder_id = ino_folder(ino), id = ino_low(ino);
    struct stat st;
    char name[32];

    if (ino & FS_INO_RESULT)
        return -ENOTDIR;
    /* "." and "..": the kernel only needs their types here */
    dir_attr(ino, &st);
    if (offset < 1 && !fs_listing_add(listing, ".", &st, 1))
        return 0;
    dir_attr(id ? search_dir_ino(folder_id) : fs_ino_folder(folder_id), &st);
    if (offset < 2 && !fs_listing_add(listing, "..", &st, 2))
        return 0;
    /* entry k of the list sits at position 2 + k; its next offset is 3 + k */
    pthread_mutex_lock(&searches->lock);
    if (id == 0) {
        /* the queries of this folder, most recent first */
        off_t k = 0;
        for (struct search_query *query = searches->queries; query; query = query->next) {
            if (query->folder_id != folder_id)
                continue;
            if (2 + k >= offset) {
                dir_attr(query_ino(folder_id, query->id), &st);
                if (!fs_listing_add(listing, query->criteria, &st, 3 + k))
                    break;
            }
            k++;
        }
    } else {
        struct search_query *query = query_by_id(searches, id);
        for (size_t k = 0; query && k < query->count; k++) {
            if (2 + (off_t)k < offset)
                continue;
            fs_name_from_uid(query->uids[k], name, sizeof(name));
            link_attr(id, query->uids[k], &st);
            if (!fs_listing_add(listing, name, &st, 3 + (off_t)k))
                break;
        }
    }
    pthread_mutex_unlock(&searches->lock);
    return 0;
}

int fs_search_readlink(struct fs_account *account, fuse_ino_t ino, char *buf, size_t size)
{
    (void)account;
    if (!(ino & FS_INO_RESULT))
        return -EINVAL;
    snprintf(buf, size, "../../%u.eml", ino_low(ino));
    return 0;
}
