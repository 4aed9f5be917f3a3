/* cache/cache.c — the folder tree and the per-folder UID tables.
 *
 * The tree mirrors the last complete LIST.  What matters to the rest of the
 * program is that a folder's id stays the same for as long as its path does:
 * the fs layer turns ids into inode numbers, and the kernel keeps those for
 * as long as it likes.  So cache_folders_sync() updates the tree in place
 * instead of rebuilding it, and ids are handed out from a counter that only
 * goes up, so a stale inode can never land on a different folder.
 *
 * Children are a singly linked list kept sorted by name (strcmp), which makes
 * readdir order stable without sorting at readdir time.  Lookup by name is a
 * linear walk; a directory with many thousands of mailboxes is rare, and the
 * id hash covers the hot path (inode -> folder).
 *
 * A UID table is a plain sorted array of 32-byte records.  Mail arrives in
 * ascending UID order (FETCH results, APPENDUID, new mail), so insertion is
 * nearly always an append; the array grows geometrically so that stays O(1)
 * amortised, and binary search serves lookups. */
/* uthash's default on out of memory is exit(); ours is -ENOMEM.  After a
 * failed HASH_ADD the item's hh.tbl is NULL. */
#define HASH_NONFATAL_OOM 1
#include "cache/cache.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

_Static_assert(sizeof(struct cache_message) == 32, "struct cache_message must stay 32 bytes");

/* ---------------------------------------------------------------- locking */

struct cache *cache_new(void)
{
    struct cache *cache = calloc(1, sizeof *cache);
    if (!cache)
        return NULL;

    /* Error-checking, so that taking the lock twice on one thread (a bug:
     * the lock is not recursive by design) aborts loudly instead of hanging. */
    pthread_mutexattr_t attr;
    if (pthread_mutexattr_init(&attr) != 0) {
        free(cache);
        return NULL;
    }
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    int rc = pthread_mutex_init(&cache->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        free(cache);
        return NULL;
    }

    struct cache_folder *root = calloc(1, sizeof *root);
    char *root_name = strdup("");
    if (!root || !root_name) {
        free(root);
        free(root_name);
        pthread_mutex_destroy(&cache->lock);
        free(cache);
        return NULL;
    }
    root->id = CACHE_ROOT_ID;
    root->name = root_name;
    HASH_ADD(hh, cache->by_id, id, sizeof root->id, root);
    if (!root->hh.tbl) {
        free(root_name);
        free(root);
        pthread_mutex_destroy(&cache->lock);
        free(cache);
        return NULL;
    }
    cache->root = root;
    cache->next_id = CACHE_ROOT_ID + 1;
    return cache;
}

void cache_lock(struct cache *cache)
{
    int rc = pthread_mutex_lock(&cache->lock);
    if (rc != 0) {
        /* Only EDEADLK (already held by this thread) is possible here: a
         * locking bug that would otherwise corrupt the tree. */
        fprintf(stderr, "imapfs: cache_lock: %s\n", strerror(rc));
        abort();
    }
}

void cache_unlock(struct cache *cache)
{
    int rc = pthread_mutex_unlock(&cache->lock);
    if (rc != 0) {
        fprintf(stderr, "imapfs: cache_unlock: %s\n", strerror(rc));
        abort();
    }
}

/* ------------------------------------------------------------- UID tables */

static void free_messages(struct cache_message *messages, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(messages[i].keywords);
    free(messages);
}

int cache_folder_set_messages(struct cache_folder *folder, struct cache_message *messages,
                              size_t count)
{
    for (size_t i = 1; i < count; i++)
        if (messages[i - 1].uid >= messages[i].uid)
            return -EINVAL;

    free_messages(folder->messages, folder->count);
    if (count == 0) {
        free(messages);     /* taken over even when empty */
        messages = NULL;
    }
    folder->messages = messages;
    folder->count = count;
    folder->capacity = count;
    return 0;
}

size_t cache_messages_lower_bound(const struct cache_message *messages, size_t count,
                                  uint32_t uid)
{
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (messages[mid].uid < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

size_t cache_folder_lower_bound(const struct cache_folder *folder, uint32_t uid)
{
    return cache_messages_lower_bound(folder->messages, folder->count, uid);
}

struct cache_message *cache_folder_find(struct cache_folder *folder, uint32_t uid)
{
    size_t index = cache_folder_lower_bound(folder, uid);
    if (index < folder->count && folder->messages[index].uid == uid)
        return &folder->messages[index];
    return NULL;
}

/* Room for one more message.  Doubling keeps a run of appends O(1) each on
 * average; for 100,000 messages the slack is at most as much again. */
static int reserve_one_more(struct cache_folder *folder)
{
    if (folder->count < folder->capacity)
        return 0;
    size_t capacity = folder->capacity ? folder->capacity * 2 : 16;
    if (capacity < folder->capacity || capacity > SIZE_MAX / sizeof(struct cache_message))
        return -ENOMEM;
    struct cache_message *messages = realloc(folder->messages, capacity * sizeof *messages);
    if (!messages)
        return -ENOMEM;
    folder->messages = messages;
    folder->capacity = capacity;
    return 0;
}

int cache_folder_upsert(struct cache_folder *folder, const struct cache_message *message)
{
    size_t index;
    /* The common case first: a uid above every known one is an append. */
    if (folder->count == 0 || folder->messages[folder->count - 1].uid < message->uid)
        index = folder->count;
    else
        index = cache_folder_lower_bound(folder, message->uid);

    if (index < folder->count && folder->messages[index].uid == message->uid) {
        struct cache_message *existing = &folder->messages[index];
        existing->flags = message->flags;
        existing->size = message->size;
        existing->internaldate = message->internaldate;
        if (existing->keywords != message->keywords) {
            free(existing->keywords);
            existing->keywords = message->keywords;
        }
        return 0;
    }

    int rc = reserve_one_more(folder);
    if (rc < 0) {
        /* Keywords are taken over whatever happens, so the caller never has
         * to guess whether it still owns them. */
        free(message->keywords);
        return rc;
    }
    memmove(&folder->messages[index + 1], &folder->messages[index],
            (folder->count - index) * sizeof *folder->messages);
    folder->messages[index] = *message;
    folder->count++;
    return 0;
}

int cache_folder_remove(struct cache_folder *folder, uint32_t uid)
{
    size_t index = cache_folder_lower_bound(folder, uid);
    if (index >= folder->count || folder->messages[index].uid != uid)
        return -ENOENT;

    free(folder->messages[index].keywords);
    memmove(&folder->messages[index], &folder->messages[index + 1],
            (folder->count - index - 1) * sizeof *folder->messages);
    folder->count--;

    /* Give memory back after a mass expunge; failure to shrink is harmless. */
    if (folder->capacity > 64 && folder->count < folder->capacity / 4) {
        size_t capacity = folder->capacity / 2;
        struct cache_message *messages = realloc(folder->messages, capacity * sizeof *messages);
        if (messages) {
            folder->messages = messages;
            folder->capacity = capacity;
        }
    }
    return 0;
}

void cache_folder_reset(struct cache_folder *folder, uint32_t uidvalidity)
{
    free_messages(folder->messages, folder->count);
    folder->messages = NULL;
    folder->count = 0;
    folder->capacity = 0;
    folder->uidvalidity = uidvalidity;
    /* Everything else learnt under the old UIDVALIDITY is meaningless now:
     * a stale HIGHESTMODSEQ would make a QRESYNC skip the new messages. */
    folder->uidnext = 0;
    folder->highestmodseq = 0;
    folder->listed_at = 0;
}

/* ---------------------------------------------------------------- folders */

struct cache_folder *cache_folder_by_id(struct cache *cache, uint32_t id)
{
    struct cache_folder *folder;
    HASH_FIND(hh, cache->by_id, &id, sizeof id, folder);
    return folder;
}

struct cache_folder *cache_folder_child(const struct cache_folder *parent, const char *name)
{
    for (struct cache_folder *child = parent->children; child; child = child->next) {
        int order = strcmp(child->name, name);
        if (order == 0)
            return child;
        if (order > 0)
            break;      /* sorted: it would have come before this one */
    }
    return NULL;
}

char *cache_folder_path(const struct cache_folder *folder)
{
    size_t length = 0;
    for (const struct cache_folder *f = folder; f->parent; f = f->parent)
        length += strlen(f->name) + 1;      /* the name and a '/' or the NUL */

    char *path = malloc(length ? length : 1);
    if (!path)
        return NULL;
    if (length == 0) {
        path[0] = '\0';
        return path;
    }

    /* Fill from the end, walking up towards the root. */
    size_t end = length - 1;
    path[end] = '\0';
    for (const struct cache_folder *f = folder; f->parent; f = f->parent) {
        size_t name_length = strlen(f->name);
        end -= name_length;
        memcpy(path + end, f->name, name_length);
        if (end > 0)
            path[--end] = '/';
    }
    return path;
}

struct cache_folder *cache_folder_by_path(struct cache *cache, const char *path)
{
    struct cache_folder *folder = cache->root;
    const char *component = path;

    while (folder && *component) {
        const char *slash = strchr(component, '/');
        size_t length = slash ? (size_t)(slash - component) : strlen(component);
        if (length > 0) {   /* "a//b" and a leading or trailing '/' are harmless */
            struct cache_folder *child = folder->children;
            for (; child; child = child->next)
                if (strncmp(child->name, component, length) == 0 && child->name[length] == '\0')
                    break;
            folder = child;
        }
        component += length;
        if (*component == '/')
            component++;
    }
    return folder;
}

/* Pre-order walk of top's subtree: the folder after each, or NULL. */
static struct cache_folder *next_in_subtree(struct cache_folder *top, struct cache_folder *each)
{
    if (each->children)
        return each->children;
    while (each != top) {
        if (each->next)
            return each->next;
        each = each->parent;
    }
    return NULL;
}

static void link_child_sorted(struct cache_folder *parent, struct cache_folder *child)
{
    struct cache_folder **link = &parent->children;
    while (*link && strcmp((*link)->name, child->name) < 0)
        link = &(*link)->next;
    child->next = *link;
    *link = child;
    child->parent = parent;
}

static void unlink_child(struct cache_folder *child)
{
    struct cache_folder **link = &child->parent->children;
    while (*link != child)
        link = &(*link)->next;
    *link = child->next;
    child->next = NULL;
}

int cache_folder_move(struct cache *cache, struct cache_folder *folder,
                      struct cache_folder *new_parent, const char *new_name,
                      const char *old_prefix, const char *new_prefix)
{
    (void)cache;
    if (!folder->parent || cache_folder_child(new_parent, new_name))
        return -EEXIST;
    for (struct cache_folder *up = new_parent; up; up = up->parent)
        if (up == folder)
            return -EINVAL; /* into itself */
    char *name = strdup(new_name);
    if (!name)
        return -ENOMEM;
    /* New mailbox names for the whole subtree first, so nothing changes
     * unless all of them could be made. */
    size_t old_len = strlen(old_prefix), count = 0;
    for (struct cache_folder *each = folder; each; each = next_in_subtree(folder, each))
        count++;
    char **renamed = calloc(count, sizeof(*renamed));
    size_t i = 0;
    int ret = renamed ? 0 : -ENOMEM;
    for (struct cache_folder *each = folder; ret == 0 && each;
         each = next_in_subtree(folder, each), i++) {
        if (!each->mailbox || strncmp(each->mailbox, old_prefix, old_len) != 0)
            continue;
        if (asprintf(&renamed[i], "%s%s", new_prefix, each->mailbox + old_len) < 0) {
            renamed[i] = NULL;
            ret = -ENOMEM;
        }
    }
    if (ret < 0) {
        for (size_t j = 0; renamed && j < count; j++)
            free(renamed[j]);
        free(renamed);
        free(name);
        return ret;
    }
    i = 0;
    for (struct cache_folder *each = folder; each; each = next_in_subtree(folder, each), i++)
        if (renamed[i]) {
            free(each->mailbox);
            each->mailbox = renamed[i];
        }
    free(renamed);
    unlink_child(folder);
    free(folder->name);
    folder->name = name;
    link_child_sorted(new_parent, folder);
    return 0;
}

/* A new, empty, unlisted folder under parent; NULL on out of memory. */
static struct cache_folder *add_folder(struct cache *cache, struct cache_folder *parent,
                                       const char *name, char delimiter)
{
    if (cache->next_id == UINT32_MAX)
        return NULL;    /* ids are never reused, and 4 billion is plenty */

    struct cache_folder *folder = calloc(1, sizeof *folder);
    if (!folder)
        return NULL;
    folder->name = strdup(name);
    if (!folder->name) {
        free(folder);
        return NULL;
    }
    folder->id = cache->next_id;
    folder->delimiter = delimiter;
    HASH_ADD(hh, cache->by_id, id, sizeof folder->id, folder);
    if (!folder->hh.tbl) {
        free(folder->name);
        free(folder);
        return NULL;
    }
    cache->next_id++;
    link_child_sorted(parent, folder);
    return folder;
}

static void destroy_folder(struct cache *cache, struct cache_folder *folder)
{
    HASH_DEL(cache->by_id, folder);
    free_messages(folder->messages, folder->count);
    free(folder->mailbox);
    free(folder->name);
    free(folder);
}

/* Frees top and everything under it, children before parents, without
 * recursion (a hostile server can nest mailboxes very deep).  Adds the
 * number freed to *removed_count and, if removed_ids is not NULL, their ids
 * (it must have room for all of them). */
static void destroy_subtree(struct cache *cache, struct cache_folder *top,
                            uint32_t *removed_ids, size_t *removed_count)
{
    if (top->parent)
        unlink_child(top);

    struct cache_folder *folder = top;
    while (folder) {
        if (folder->children) {
            folder = folder->children;
            continue;
        }
        bool is_top = folder == top;
        struct cache_folder *parent = folder->parent;
        if (!is_top)
            parent->children = folder->next;    /* it is always the first child */
        if (removed_ids)
            removed_ids[*removed_count] = folder->id;
        (*removed_count)++;
        destroy_folder(cache, folder);
        folder = is_top ? NULL : parent;
    }
}

void cache_free(struct cache *cache)
{
    if (!cache)
        return;
    size_t freed = 0;
    destroy_subtree(cache, cache->root, NULL, &freed);
    pthread_mutex_destroy(&cache->lock);
    free(cache);
}

/* What cache_folders_sync learnt about each folder id in this LIST. */
enum sync_mark {
    SYNC_ABSENT = 0,    /* not mentioned: to be removed */
    SYNC_PARENT,        /* on the path of a listed mailbox */
    SYNC_LISTED,        /* listed itself */
};

/* A byte per id ever handed out: ids only grow, but a sync touches every
 * folder anyway, and a byte each is less than any hash would cost. */
struct sync_marks {
    unsigned char *by_id;   /* enum sync_mark, indexed by folder id */
    size_t size;
};

static int mark_folder(struct sync_marks *marks, uint32_t id, enum sync_mark mark)
{
    if (id >= marks->size) {
        size_t size = marks->size ? marks->size : 64;
        while (size <= id)
            size *= 2;
        unsigned char *by_id = realloc(marks->by_id, size);
        if (!by_id)
            return -ENOMEM;
        memset(by_id + marks->size, SYNC_ABSENT, size - marks->size);
        marks->by_id = by_id;
        marks->size = size;
    }
    if (marks->by_id[id] < mark)
        marks->by_id[id] = mark;
    return 0;
}

static enum sync_mark folder_mark(const struct sync_marks *marks, uint32_t id)
{
    return id < marks->size ? marks->by_id[id] : SYNC_ABSENT;
}

/* A component that would break path walking or escape the tree.  fs/names.c
 * never produces one; this is the last line of defence. */
static bool component_is_safe(const char *name)
{
    return name && *name && strchr(name, '/') == NULL && strcmp(name, ".") != 0 &&
           strcmp(name, "..") != 0;
}

static int sync_entry(struct cache *cache, struct sync_marks *marks,
                      const struct cache_mailbox_entry *entry)
{
    if (entry->depth == 0 || !entry->components || !entry->mailbox)
        return 0;
    for (size_t level = 0; level < entry->depth; level++)
        if (!component_is_safe(entry->components[level]))
            return 0;

    struct cache_folder *folder = cache->root;
    for (size_t level = 0; level < entry->depth; level++) {
        const char *name = entry->components[level];
        struct cache_folder *child = cache_folder_child(folder, name);
        if (!child) {
            child = add_folder(cache, folder, name, entry->delimiter);
            if (!child)
                return -ENOMEM;
        }
        folder = child;
        if (level + 1 < entry->depth) {
            if (mark_folder(marks, folder->id, SYNC_PARENT) < 0)
                return -ENOMEM;
        }
    }

    if (folder_mark(marks, folder->id) == SYNC_LISTED)
        return 0;   /* the same path again: the first entry wins */

    if (!folder->mailbox || strcmp(folder->mailbox, entry->mailbox) != 0) {
        char *mailbox = strdup(entry->mailbox);
        if (!mailbox)
            return -ENOMEM;
        free(folder->mailbox);
        folder->mailbox = mailbox;
    }
    if (mark_folder(marks, folder->id, SYNC_LISTED) < 0)
        return -ENOMEM;
    folder->delimiter = entry->delimiter;
    folder->listed = 1;
    folder->selectable = !entry->noselect;
    return 0;
}

/* Folders (other than the root) that this LIST did not mention at all. */
static size_t count_absent(const struct cache *cache, const struct sync_marks *marks)
{
    size_t absent = 0;
    for (const struct cache_folder *folder = cache->by_id; folder; folder = folder->hh.next)
        if (folder->id != CACHE_ROOT_ID && folder_mark(marks, folder->id) == SYNC_ABSENT)
            absent++;
    return absent;
}

/* Removes every subtree this LIST did not mention and demotes folders that
 * are now only parents of listed ones to virtual parents.  A depth-first walk
 * without recursion: a folder that stays is descended into, a folder that
 * goes is removed whole (none of its descendants can have been mentioned,
 * or it would have been marked as their parent). */
static void prune(struct cache *cache, const struct sync_marks *marks,
                  uint32_t *removed_ids, size_t *removed_count)
{
    struct cache_folder *parent = cache->root;
    struct cache_folder *folder = parent->children;
    for (;;) {
        if (!folder) {
            /* Done with parent's children: on to parent's next sibling. */
            if (parent == cache->root)
                break;
            folder = parent->next;
            parent = parent->parent;
            continue;
        }
        enum sync_mark mark = folder_mark(marks, folder->id);
        if (mark == SYNC_ABSENT) {
            struct cache_folder *next = folder->next;
            destroy_subtree(cache, folder, removed_ids, removed_count);
            folder = next;
            continue;
        }
        if (mark == SYNC_PARENT && folder->listed) {
            /* Listed before; now only there to reach a listed child. */
            free(folder->mailbox);
            folder->mailbox = NULL;
            folder->listed = 0;
            folder->selectable = 0;
        }
        parent = folder;
        folder = folder->children;
    }
}

int cache_folders_sync(struct cache *cache, const struct cache_mailbox_entry *entries,
                       size_t count, uint32_t **removed_ids, size_t *removed_count)
{
    if (removed_ids)
        *removed_ids = NULL;
    if (removed_count)
        *removed_count = 0;

    struct sync_marks marks = { 0 };
    int rc = 0;

    /* First add and update, then remove: if memory runs out half way, the
     * tree is still whole and consistent (a later sync finishes the job),
     * and nothing has been removed that the caller was not told about. */
    for (size_t i = 0; i < count; i++) {
        rc = sync_entry(cache, &marks, &entries[i]);
        if (rc < 0)
            goto out;
    }

    size_t absent = count_absent(cache, &marks);
    uint32_t *ids = NULL;
    if (removed_ids && absent > 0) {
        ids = malloc(absent * sizeof *ids);
        if (!ids) {
            rc = -ENOMEM;
            goto out;
        }
    }
    size_t removed = 0;
    prune(cache, &marks, ids, &removed);
    if (removed_ids)
        *removed_ids = ids;
    if (removed_count)
        *removed_count = removed;
out:
    free(marks.by_id);
    return rc;
}

/* ------------------------------------------------------------------ flags */

static const struct {
    const char *name;
    uint32_t bit;
} system_flags[] = {
    /* The order in which cache_flags_format writes them. */
    { "\\Seen", CACHE_FLAG_SEEN },
    { "\\Answered", CACHE_FLAG_ANSWERED },
    { "\\Flagged", CACHE_FLAG_FLAGGED },
    { "\\Deleted", CACHE_FLAG_DELETED },
    { "\\Draft", CACHE_FLAG_DRAFT },
    { "\\Recent", CACHE_FLAG_RECENT },
};

#define SYSTEM_FLAG_COUNT (sizeof system_flags / sizeof system_flags[0])

/* Flag names are case-insensitive in IMAP, keywords included, so "$work"
 * and "$Work" are one keyword; the first spelling seen is kept. */
static bool has_keyword(const char *keywords, const char *atom, size_t atom_length)
{
    const char *word = keywords;
    while (word && *word) {
        const char *space = strchr(word, ' ');
        size_t word_length = space ? (size_t)(space - word) : strlen(word);
        if (word_length == atom_length && strncasecmp(word, atom, atom_length) == 0)
            return true;
        word = space ? space + 1 : NULL;
    }
    return false;
}

int cache_flags_add(uint32_t *flags, char **keywords, const char *atom)
{
    for (size_t i = 0; i < SYSTEM_FLAG_COUNT; i++) {
        if (strcasecmp(atom, system_flags[i].name) == 0) {
            *flags |= system_flags[i].bit;
            return 0;
        }
    }

    /* An atom never holds a space or a control character; one that did
     * would corrupt the space-separated list. */
    size_t atom_length = strlen(atom);
    if (atom_length == 0)
        return -EINVAL;
    for (const unsigned char *c = (const unsigned char *)atom; *c; c++)
        if (*c <= ' ' || *c == 0x7f)
            return -EINVAL;

    if (has_keyword(*keywords, atom, atom_length))
        return 0;

    size_t old_length = *keywords ? strlen(*keywords) : 0;
    size_t separator = old_length ? 1 : 0;
    char *grown = realloc(*keywords, old_length + separator + atom_length + 1);
    if (!grown)
        return -ENOMEM;
    if (separator)
        grown[old_length] = ' ';
    memcpy(grown + old_length + separator, atom, atom_length + 1);
    *keywords = grown;
    return 0;
}

char *cache_flags_format(uint32_t flags, const char *keywords)
{
    size_t length = keywords ? strlen(keywords) + 1 : 0;
    for (size_t i = 0; i < SYSTEM_FLAG_COUNT; i++)
        if (system_flags[i].bit != CACHE_FLAG_RECENT && (flags & system_flags[i].bit))
            length += strlen(system_flags[i].name) + 1;

    char *text = malloc(length + 1);
    if (!text)
        return NULL;

    size_t used = 0;
    for (size_t i = 0; i < SYSTEM_FLAG_COUNT; i++) {
        if (system_flags[i].bit == CACHE_FLAG_RECENT || !(flags & system_flags[i].bit))
            continue;
        if (used)
            text[used++] = ' ';
        size_t name_length = strlen(system_flags[i].name);
        memcpy(text + used, system_flags[i].name, name_length);
        used += name_length;
    }
    if (keywords && *keywords) {
        if (used)
            text[used++] = ' ';
        size_t keywords_length = strlen(keywords);
        memcpy(text + used, keywords, keywords_length);
        used += keywords_length;
    }
    text[used] = '\0';
    return text;
}
