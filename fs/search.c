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
 * The mount's root has a `.search/` too: there CRITERIA is searched in every
 * folder (one UID SEARCH each; few servers offer MULTISEARCH), and the query
 * directory mirrors the folder tree, so a match reads as FOLDER/UID.eml:
 * `.search/TEXT invoice/Lists/notmuch/5.eml -> ../../../../Lists/notmuch/5.eml`.
 *
 * Inodes: the .search directory of folder F is FS_INO_SEARCH | F << 32; a
 * query directory adds its query id in the low 32 bits; inside a root query,
 * the view of folder G is FS_INO_SEARCH | G << 32 | query id (G is not the
 * query's own folder, which tells the two apart); a result symlink is
 * FS_INO_RESULT | query id << 32 | its index among the query's hits.  A
 * small table remembers the MAX_QUERIES most recent queries; an evicted
 * query's inodes give ENOENT and a new lookup brings it back. */
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

/* One match: folder id << 32 | UID, so sorting groups a folder's matches. */
typedef uint64_t search_hit;
#define HIT(folder_id, uid) ((search_hit)(folder_id) << 32 | (uid))
#define HIT_FOLDER(hit) ((uint32_t)((hit) >> 32))
#define HIT_UID(hit) ((uint32_t)(hit))

struct search_query {
    uint32_t id;            /* 1 .. 2^31-1, never reused */
    uint32_t folder_id;     /* CACHE_ROOT_ID: every folder */
    char *criteria;         /* its name under .search/ */
    search_hit *hits;       /* sorted */
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
    free(query->hits);
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
/* A result's low 32 bits: its UID in a folder's query (stable across
 * refreshes: a name never comes to mean another message), its index among
 * the hits in a root query (whose entries are never cached by the kernel). */
static fuse_ino_t result_ino(uint32_t id, uint32_t low) { return FS_INO_RESULT | (fuse_ino_t)id << 32 | low; }
static uint32_t ino_folder(fuse_ino_t ino) { return (uint32_t)((ino & ~FS_INO_SEARCH) >> 32); }
static uint32_t ino_low(fuse_ino_t ino) { return (uint32_t)ino; }
static uint32_t result_query(fuse_ino_t ino) { return (uint32_t)((ino & ~FS_INO_RESULT) >> 32); }

static void dir_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = S_IFDIR | 0500;
    st->st_nlink = 2;
    fs_attr_owner(st);
}

/* Where the symlink of a hit points, relative to it.  malloc'd. */
static char *hit_target(struct fs_account *account, const struct search_query *query,
                        search_hit hit)
{
    char *target = NULL;
    if (query->folder_id != CACHE_ROOT_ID)
        return asprintf(&target, "../../%u.eml", HIT_UID(hit)) < 0 ? NULL : target;
    /* .search/CRITERIA/PATH/UID.eml: up past PATH, CRITERIA and .search */
    struct cache *cache = fs_account_cache(account);
    cache_lock(cache);
    struct cache_folder *folder = cache_folder_by_id(cache, HIT_FOLDER(hit));
    char *path = folder ? cache_folder_path(folder) : NULL;
    cache_unlock(cache);
    if (!path)
        return NULL;
    size_t depth = 1;
    for (const char *c = path; *c; c++)
        depth += *c == '/';
    size_t len = 3 * (depth + 2) + strlen(path) + 16;
    target = malloc(len);
    if (target) {
        target[0] = '\0';
        for (size_t i = 0; i < depth + 2; i++)
            strcat(target, "../");
        snprintf(target + strlen(target), len - strlen(target), "%s/%u.eml", path, HIT_UID(hit));
    }
    free(path);
    return target;
}

static void link_attr(fuse_ino_t ino, size_t target_len, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = S_IFLNK | 0777;
    st->st_nlink = 1;
    fs_attr_owner(st);
    st->st_size = (off_t)target_len;
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

/* The index of the first hit >= hit. */
static size_t hit_position(const struct search_query *query, search_hit hit)
{
    size_t lo = 0, hi = query->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (query->hits[mid] < hit)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int compare_hits(const void *a, const void *b)
{
    search_hit x = *(const search_hit *)a, y = *(const search_hit *)b;
    return x < y ? -1 : x > y;
}

/* Searches one folder, or every selectable folder for a root query. */
static int run_search(struct fs_account *account, uint32_t folder_id, const char *criteria,
                      search_hit **hits, size_t *count)
{
    uint32_t *folders = NULL;
    size_t folder_count = 0;
    int ret = 0;

    *hits = NULL;
    *count = 0;
    if (folder_id == CACHE_ROOT_ID) {
        struct cache *cache = fs_account_cache(account);
        cache_lock(cache);
        folders = calloc(HASH_CNT(hh, cache->by_id) + 1, sizeof(*folders));
        for (struct cache_folder *folder = cache->by_id; folders && folder;
             folder = folder->hh.next)
            if (folder->selectable)
                folders[folder_count++] = folder->id;
        cache_unlock(cache);
        if (!folders)
            return -ENOMEM;
    } else {
        folders = malloc(sizeof(*folders));
        if (!folders)
            return -ENOMEM;
        folders[folder_count++] = folder_id;
    }
    for (size_t f = 0; f < folder_count && ret == 0; f++) {
        uint32_t *uids;
        size_t n;
        ret = fs_account_search(account, folders[f], criteria, &uids, &n);
        if (ret == -ENOENT && folder_id == CACHE_ROOT_ID) {
            ret = 0; /* a folder that went away meanwhile */
            continue;
        }
        if (ret < 0)
            break;
        search_hit *grown = realloc(*hits, (*count + n + 1) * sizeof(*grown));
        if (!grown) {
            free(uids);
            ret = -ENOMEM;
            break;
        }
        *hits = grown;
        for (size_t i = 0; i < n; i++)
            (*hits)[(*count)++] = HIT(folders[f], uids[i]);
        free(uids);
    }
    free(folders);
    if (ret < 0) {
        free(*hits);
        *hits = NULL;
        *count = 0;
        return ret;
    }
    if (*count)
        qsort(*hits, *count, sizeof(**hits), compare_hits);
    return 0;
}

/* Runs the search (without the lock) when it never ran or is older than the
 * listing timeout, and stores the result.  0 or -errno. */
static int refresh_query(struct fs_account *account, uint32_t id)
{
    struct fs_searches *searches = fs_account_searches(account);
    uint32_t folder_id;
    search_hit *hits = NULL;
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

    int ret = run_search(account, folder_id, criteria, &hits, &count);
    free(criteria);
    if (ret < 0)
        return ret;
    pthread_mutex_lock(&searches->lock);
    query = query_by_id(searches, id);
    if (query) {
        free(query->hits);
        query->hits = hits;
        query->count = count;
        query->searched_at = now_monotonic();
        hits = NULL;
    }
    pthread_mutex_unlock(&searches->lock);
    free(hits);
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

static void query_forget(struct fs_searches *searches, uint32_t id)
{
    pthread_mutex_lock(&searches->lock);
    for (struct search_query **link = &searches->queries; *link; link = &(*link)->next)
        if ((*link)->id == id) {
            struct search_query *gone = *link;
            *link = gone->next;
            query_free(gone);
            break;
        }
    pthread_mutex_unlock(&searches->lock);
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

/* What a search inode is, with its query (copied out of the table). */
struct search_node {
    enum { NODE_SEARCH_DIR, NODE_VIEW, NODE_RESULT } kind;
    uint32_t folder_id;         /* SEARCH_DIR, VIEW: the folder shown */
    uint32_t query_id;          /* VIEW, RESULT */
    uint32_t query_folder;      /* VIEW, RESULT: the query's own folder */
    size_t index;               /* RESULT */
    search_hit hit;             /* RESULT */
};

static int decode(struct fs_searches *searches, fuse_ino_t ino, struct search_node *node)
{
    memset(node, 0, sizeof(*node));
    if (ino & FS_INO_RESULT) {
        node->kind = NODE_RESULT;
        node->query_id = result_query(ino);
        node->index = ino_low(ino);
    } else if (ino_low(ino) == 0) {
        node->kind = NODE_SEARCH_DIR;
        node->folder_id = ino_folder(ino);
        return 0;
    } else {
        node->kind = NODE_VIEW;
        node->folder_id = ino_folder(ino);
        node->query_id = ino_low(ino);
    }
    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, node->query_id);
    int ret = 0;
    if (!query)
        ret = -ENOENT;
    else {
        node->query_folder = query->folder_id;
        if (node->kind == NODE_RESULT) {
            if (query->folder_id != CACHE_ROOT_ID) { /* the low bits are a UID */
                search_hit wanted = HIT(query->folder_id, (uint32_t)node->index);
                node->index = hit_position(query, wanted);
                if (node->index >= query->count || query->hits[node->index] != wanted)
                    ret = -ENOENT;
            } else if (node->index >= query->count) {
                ret = -ENOENT;
            }
            if (ret == 0)
                node->hit = query->hits[node->index];
        } else if (node->folder_id != query->folder_id && query->folder_id != CACHE_ROOT_ID) {
            ret = -ENOENT; /* only root queries have folder views */
        }
    }
    pthread_mutex_unlock(&searches->lock);
    return ret;
}

/* Does a root query have hits in folder_id or below it? */
static int has_hits_below(struct fs_account *account, struct fs_searches *searches,
                          uint32_t query_id, uint32_t folder_id)
{
    struct cache *cache = fs_account_cache(account);
    int found = 0;

    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, query_id);
    cache_lock(cache);
    for (size_t i = 0; query && i < query->count && !found; i++) {
        struct cache_folder *folder = cache_folder_by_id(cache, HIT_FOLDER(query->hits[i]));
        for (; folder; folder = folder->parent)
            if (folder->id == folder_id) {
                found = 1;
                break;
            }
    }
    cache_unlock(cache);
    pthread_mutex_unlock(&searches->lock);
    return found;
}

static int result_stat(struct fs_account *account, struct fs_searches *searches,
                       uint32_t query_id, size_t index, struct stat *st)
{
    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, query_id);
    struct search_query copy = { 0 };
    search_hit hit = 0;
    int ok = query && index < query->count;
    if (ok) {
        copy.folder_id = query->folder_id;
        hit = query->hits[index];
    }
    pthread_mutex_unlock(&searches->lock);
    if (!ok)
        return -ENOENT;
    char *target = hit_target(account, &copy, hit);
    if (!target)
        return -ENOENT;
    link_attr(result_ino(query_id, copy.folder_id == CACHE_ROOT_ID ? (uint32_t)index : HIT_UID(hit)),
              strlen(target), st);
    free(target);
    return 0;
}

int fs_search_lookup(struct fs_account *account, fuse_ino_t parent, const char *name,
                     struct fuse_entry_param *entry)
{
    struct fs_searches *searches = fs_account_searches(account);
    struct search_node node;

    memset(entry, 0, sizeof(*entry));
    entry->attr_timeout = entry->entry_timeout = 0; /* see fs_search_readdir */
    if (!fs_is_search_ino(parent)) {
        /* FOLDER/.search, or the root's */
        uint32_t folder_id = parent == FUSE_ROOT_ID ? CACHE_ROOT_ID : (uint32_t)(parent >> 32);
        if (strcmp(name, SEARCH_DIR) != 0 || (parent != FUSE_ROOT_ID && (uint32_t)parent != 0) ||
            (folder_id != CACHE_ROOT_ID && !folder_selectable(account, folder_id)))
            return 1;
        dir_attr(search_dir_ino(folder_id), &entry->attr);
        entry->ino = entry->attr.st_ino;
        entry->attr_timeout = entry->entry_timeout = fs_account_dir_timeout(account);
        return 0;
    }
    int ret = decode(searches, parent, &node);
    if (ret < 0)
        return ret;
    if (node.kind == NODE_RESULT)
        return -ENOTDIR;
    if (node.kind == NODE_SEARCH_DIR) {
        /* .search/CRITERIA: search now, so bad criteria fail here */
        if (!criteria_ok(name))
            return -EINVAL;
        uint32_t id = query_get(searches, node.folder_id, name);
        if (!id)
            return -ENOMEM;
        ret = refresh_query(account, id);
        if (ret < 0) {
            query_forget(searches, id); /* a refused query is not listed */
            return ret;
        }
        dir_attr(query_ino(node.folder_id, id), &entry->attr);
        entry->ino = entry->attr.st_ino;
        entry->attr_timeout = entry->entry_timeout = 0; /* results change */
        return 0;
    }
    /* inside a query: a subfolder's view (root queries), or a match */
    if (node.query_folder == CACHE_ROOT_ID) {
        struct cache *cache = fs_account_cache(account);
        cache_lock(cache);
        struct cache_folder *folder = cache_folder_by_id(cache, node.folder_id);
        struct cache_folder *child = folder ? cache_folder_child(folder, name) : NULL;
        uint32_t child_id = child ? child->id : 0;
        cache_unlock(cache);
        if (child_id && has_hits_below(account, searches, node.query_id, child_id)) {
            dir_attr(query_ino(child_id, node.query_id), &entry->attr);
            entry->ino = entry->attr.st_ino;
            entry->attr_timeout = entry->entry_timeout = 0;
            return 0;
        }
    }
    uint32_t uid;
    if (fs_name_to_uid(name, &uid) < 0 || node.folder_id == CACHE_ROOT_ID)
        return -ENOENT;
    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, node.query_id);
    size_t index = query ? hit_position(query, HIT(node.folder_id, uid)) : 0;
    int found = query && index < query->count && query->hits[index] == HIT(node.folder_id, uid);
    pthread_mutex_unlock(&searches->lock);
    if (!found)
        return -ENOENT;
    ret = result_stat(account, searches, node.query_id, index, &entry->attr);
    if (ret < 0)
        return ret;
    entry->ino = entry->attr.st_ino;
    return 0;
}

int fs_search_getattr(struct fs_account *account, fuse_ino_t ino, struct stat *st)
{
    struct fs_searches *searches = fs_account_searches(account);
    struct search_node node;
    int ret = decode(searches, ino, &node);

    if (ret < 0)
        return ret;
    if (node.kind == NODE_RESULT)
        return result_stat(account, searches, node.query_id, node.index, st);
    if (node.kind == NODE_SEARCH_DIR && node.folder_id != CACHE_ROOT_ID &&
        !folder_selectable(account, node.folder_id))
        return -ENOENT;
    dir_attr(ino, st);
    return 0;
}

int fs_search_opendir(struct fs_account *account, fuse_ino_t ino)
{
    struct search_node node;
    int ret = decode(fs_account_searches(account), ino, &node);

    if (ret < 0)
        return ret;
    if (node.kind == NODE_RESULT)
        return -ENOTDIR;
    /* the query's own directory searches again when stale; its folder
     * views show the same results */
    if (node.kind == NODE_VIEW && node.folder_id == node.query_folder)
        return refresh_query(account, node.query_id);
    return 0;
}

int fs_search_readdir(struct fs_account *account, fuse_ino_t ino, struct fs_listing *listing,
                      off_t offset)
{
    struct fs_searches *searches = fs_account_searches(account);
    struct search_node node;
    struct stat st;
    char name[32];
    off_t k = 0;
    int ret = decode(searches, ino, &node);

    if (ret < 0)
        return ret;
    if (node.kind == NODE_RESULT)
        return -ENOTDIR;
    /* Queries come and go and results change: the kernel keeps none of
     * these entries, every use looks them up again. */
    listing->timeout = 0;
    /* "." and ".." (the kernel only needs their types here); entry k of
     * the list sits at position 2 + k and its next offset is 3 + k */
    dir_attr(ino, &st);
    if (offset < 1 && !fs_listing_add(listing, ".", &st, 1))
        return 0;
    if (offset < 2 && !fs_listing_add(listing, "..", &st, 2))
        return 0;

    if (node.kind == NODE_SEARCH_DIR) {
        /* the queries of this folder, most recent first */
        pthread_mutex_lock(&searches->lock);
        for (struct search_query *query = searches->queries; query; query = query->next) {
            if (query->folder_id != node.folder_id)
                continue;
            if (2 + k >= offset) {
                dir_attr(query_ino(node.folder_id, query->id), &st);
                if (!fs_listing_add(listing, query->criteria, &st, 3 + k))
                    break;
            }
            k++;
        }
        pthread_mutex_unlock(&searches->lock);
        return 0;
    }
    if (node.query_folder == CACHE_ROOT_ID) {
        /* a root query's view of a folder: its subfolders that hold matches */
        struct cache *cache = fs_account_cache(account);
        uint32_t children[256];
        char *names[256];
        size_t n = 0;
        cache_lock(cache);
        struct cache_folder *folder = cache_folder_by_id(cache, node.folder_id);
        for (struct cache_folder *child = folder ? folder->children : NULL; child && n < 256;
             child = child->next) {
            children[n] = child->id;
            names[n] = strdup(child->name);
            if (names[n])
                n++;
        }
        cache_unlock(cache);
        int full = 0;
        for (size_t i = 0; i < n; i++) {
            if (!full && has_hits_below(account, searches, node.query_id, children[i])) {
                if (2 + k >= offset) {
                    dir_attr(query_ino(children[i], node.query_id), &st);
                    full = !fs_listing_add(listing, names[i], &st, 3 + k);
                }
                k++;
            }
            free(names[i]);
        }
        if (full || node.folder_id == CACHE_ROOT_ID)
            return 0;
    }
    /* the matches in this folder */
    pthread_mutex_lock(&searches->lock);
    struct search_query *query = query_by_id(searches, node.query_id);
    size_t first = query ? hit_position(query, HIT(node.folder_id, 0)) : 0;
    struct search_query shape = { .folder_id = node.query_folder };
    for (size_t i = first; query && i < query->count &&
                           HIT_FOLDER(query->hits[i]) == node.folder_id; i++, k++) {
        if (2 + k < offset)
            continue;
        fs_name_from_uid(HIT_UID(query->hits[i]), name, sizeof(name));
        /* the target's length: computed without the lock held on the cache */
        search_hit hit = query->hits[i];
        pthread_mutex_unlock(&searches->lock);
        char *target = hit_target(account, &shape, hit);
        link_attr(result_ino(node.query_id, node.query_folder == CACHE_ROOT_ID ? (uint32_t)i
                                                                              : HIT_UID(hit)),
                  target ? strlen(target) : 0, &st);
        free(target);
        int added = fs_listing_add(listing, name, &st, 3 + k);
        pthread_mutex_lock(&searches->lock);
        query = query_by_id(searches, node.query_id);
        if (!added)
            break;
    }
    pthread_mutex_unlock(&searches->lock);
    return 0;
}

int fs_search_readlink(struct fs_account *account, fuse_ino_t ino, char *buf, size_t size)
{
    struct search_node node;
    int ret = decode(fs_account_searches(account), ino, &node);

    if (ret < 0)
        return ret;
    if (node.kind != NODE_RESULT)
        return -EINVAL;
    struct search_query shape = { .folder_id = node.query_folder };
    char *target = hit_target(account, &shape, node.hit);
    if (!target)
        return -ENOENT;
    snprintf(buf, size, "%s", target);
    free(target);
    return strlen(buf) + 1 < size ? 0 : -ENAMETOOLONG;
}
