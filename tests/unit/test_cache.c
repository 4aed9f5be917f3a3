/* tests/unit/test_cache.c — the folder tree, UID tables and flags. */
#include "cache/cache.h"
#include "tests/unit/check.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------- helpers */

struct listed {
    const char *mailbox;
    const char *path;       /* file names joined by '/' */
    int noselect;
};

/* Runs cache_folders_sync on a LIST given as paths. */
static int sync_list(struct cache *cache, const struct listed *list, size_t count,
                     uint32_t **removed_ids, size_t *removed_count)
{
    struct cache_mailbox_entry *entries = calloc(count ? count : 1, sizeof *entries);
    char **copies = calloc(count ? count : 1, sizeof *copies);
    const char ***components = calloc(count ? count : 1, sizeof *components);
    if (!entries || !copies || !components)
        abort();

    for (size_t i = 0; i < count; i++) {
        copies[i] = strdup(list[i].path);
        components[i] = calloc(strlen(list[i].path) + 1, sizeof *components[i]);
        if (!copies[i] || !components[i])
            abort();
        size_t depth = 0;
        char *saveptr = NULL;
        for (char *name = strtok_r(copies[i], "/", &saveptr); name;
             name = strtok_r(NULL, "/", &saveptr))
            components[i][depth++] = name;
        entries[i].mailbox = list[i].mailbox;
        entries[i].components = components[i];
        entries[i].depth = depth;
        entries[i].delimiter = '/';
        entries[i].noselect = list[i].noselect;
    }

    int rc = cache_folders_sync(cache, entries, count, removed_ids, removed_count);

    for (size_t i = 0; i < count; i++) {
        free(copies[i]);
        free(components[i]);
    }
    free(copies);
    free(components);
    free(entries);
    return rc;
}

#define SYNC(cache, list, removed, removed_count) \
    sync_list((cache), (list), sizeof(list) / sizeof((list)[0]), (removed), (removed_count))

static uint32_t id_of(struct cache *cache, const char *path)
{
    struct cache_folder *folder = cache_folder_by_path(cache, path);
    return folder ? folder->id : 0;
}

static int contains_id(const uint32_t *ids, size_t count, uint32_t id)
{
    for (size_t i = 0; i < count; i++)
        if (ids[i] == id)
            return 1;
    return 0;
}

static struct cache_message message(uint32_t uid, uint32_t flags, const char *keywords)
{
    struct cache_message m = { .uid = uid, .flags = flags, .size = uid * 10u,
                               .internaldate = 1700000000 + uid,
                               .keywords = keywords ? strdup(keywords) : NULL };
    return m;
}

/* A malloc'd table of the given uids, keywords "k<uid>". */
static struct cache_message *table_of(const uint32_t *uids, size_t count)
{
    struct cache_message *messages = calloc(count, sizeof *messages);
    if (!messages)
        abort();
    for (size_t i = 0; i < count; i++) {
        char keyword[32];
        snprintf(keyword, sizeof keyword, "k%u", uids[i]);
        messages[i] = message(uids[i], 0, keyword);
    }
    return messages;
}

static void free_table(struct cache_message *messages, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(messages[i].keywords);
    free(messages);
}

/* The uids of a folder's table as "1 2 3", for readable comparisons. */
static char *uids_of(const struct cache_folder *folder)
{
    static char text[1024];
    size_t used = 0;
    text[0] = '\0';
    for (size_t i = 0; i < folder->count && used < sizeof text - 16; i++)
        used += snprintf(text + used, sizeof text - used, "%s%u", i ? " " : "",
                         folder->messages[i].uid);
    return text;
}

/* Names of a folder's children in list order, joined by ','. */
static char *children_of(const struct cache_folder *folder)
{
    static char text[1024];
    size_t used = 0;
    text[0] = '\0';
    for (const struct cache_folder *child = folder->children; child; child = child->next)
        used += snprintf(text + used, sizeof text - used, "%s%s", used ? "," : "", child->name);
    return text;
}

/* --------------------------------------------------------------- folders */

static void test_new_cache_has_only_the_root(void)
{
    struct cache *cache = cache_new();
    CHECK(cache != NULL);
    cache_lock(cache);
    CHECK(cache->root != NULL);
    CHECK_EQ_INT(cache->root->id, CACHE_ROOT_ID);
    CHECK_EQ_STR(cache->root->name, "");
    CHECK_EQ_INT(cache->root->selectable, 0);
    CHECK(cache->root->parent == NULL);
    CHECK(cache->root->children == NULL);
    CHECK(cache_folder_by_id(cache, CACHE_ROOT_ID) == cache->root);
    CHECK(cache_folder_by_id(cache, 2) == NULL);
    CHECK(cache_folder_by_path(cache, "") == cache->root);
    char *path = cache_folder_path(cache->root);
    CHECK_EQ_STR(path, "");
    free(path);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_sync_builds_nested_tree_with_virtual_parents(void)
{
    struct cache *cache = cache_new();
    static const struct listed list[] = {
        { "INBOX", "INBOX", 0 },
        { "Lists.linux.kernel", "Lists/linux/kernel", 0 },
        { "Lists.notmuch", "Lists/notmuch", 0 },
        { "Archive", "Archive", 1 },
    };
    uint32_t *removed = NULL;
    size_t removed_count = 99;
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, list, &removed, &removed_count), 0);
    CHECK(removed == NULL);
    CHECK_EQ_INT(removed_count, 0);

    CHECK_EQ_STR(children_of(cache->root), "Archive,INBOX,Lists");

    struct cache_folder *lists = cache_folder_child(cache->root, "Lists");
    CHECK(lists != NULL);
    if (lists) {
        CHECK_EQ_INT(lists->listed, 0);
        CHECK_EQ_INT(lists->selectable, 0);
        CHECK(lists->mailbox == NULL);
        CHECK(lists->parent == cache->root);
        CHECK_EQ_STR(children_of(lists), "linux,notmuch");
        struct cache_folder *linux_folder = cache_folder_child(lists, "linux");
        CHECK(linux_folder && !linux_folder->listed && !linux_folder->selectable);
    }

    struct cache_folder *kernel = cache_folder_by_path(cache, "Lists/linux/kernel");
    CHECK(kernel != NULL);
    if (kernel) {
        CHECK_EQ_INT(kernel->listed, 1);
        CHECK_EQ_INT(kernel->selectable, 1);
        CHECK_EQ_STR(kernel->mailbox, "Lists.linux.kernel");
        CHECK_EQ_STR(kernel->name, "kernel");
        CHECK_EQ_INT(kernel->delimiter, '/');
        CHECK(cache_folder_by_id(cache, kernel->id) == kernel);
    }

    struct cache_folder *archive = cache_folder_by_path(cache, "Archive");
    CHECK(archive && archive->listed && !archive->selectable);

    /* Six folders besides the root, ids 2..7, all different. */
    uint32_t seen = 0;
    for (uint32_t id = 2; id <= 7; id++)
        if (cache_folder_by_id(cache, id))
            seen++;
    CHECK_EQ_INT(seen, 6);
    CHECK(cache_folder_by_id(cache, 8) == NULL);
    CHECK_EQ_INT(HASH_CNT(hh, cache->by_id), 7);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_children_sorted_with_strcmp(void)
{
    struct cache *cache = cache_new();
    static const struct listed list[] = {
        { "b", "b", 0 }, { "a", "a", 0 }, { "C", "C", 0 }, { "ab", "ab", 0 },
        { "a.z", "a/z", 0 }, { "a.m", "a/m", 0 }, { "\xc3\xa9", "\xc3\xa9", 0 },
    };
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, list, NULL, NULL), 0);
    CHECK_EQ_STR(children_of(cache->root), "C,a,ab,b,\xc3\xa9");
    CHECK_EQ_STR(children_of(cache_folder_by_path(cache, "a")), "m,z");
    cache_unlock(cache);
    cache_free(cache);
}

static void test_resync_keeps_ids_and_uid_tables(void)
{
    struct cache *cache = cache_new();
    static const struct listed first[] = {
        { "INBOX", "INBOX", 0 },
        { "Lists/notmuch", "Lists/notmuch", 0 },
        { "Sent", "Sent", 0 },
    };
    /* Same paths in another order, one renamed on the server side only
     * (same file name), and a new folder. */
    static const struct listed second[] = {
        { "Sent Items", "Sent", 0 },
        { "New", "New", 0 },
        { "Lists/notmuch", "Lists/notmuch", 0 },
        { "INBOX", "INBOX", 0 },
    };
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, first, NULL, NULL), 0);
    uint32_t inbox = id_of(cache, "INBOX"), lists = id_of(cache, "Lists"),
             notmuch = id_of(cache, "Lists/notmuch"), sent = id_of(cache, "Sent");
    uint32_t highest = inbox;
    if (lists > highest) highest = lists;
    if (notmuch > highest) highest = notmuch;
    if (sent > highest) highest = sent;

    struct cache_folder *folder = cache_folder_by_id(cache, notmuch);
    static const uint32_t uids[] = { 3, 5, 8 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(uids, 3), 3), 0);
    folder->uidvalidity = 777;
    folder->uidnext = 9;

    uint32_t *removed = NULL;
    size_t removed_count = 42;
    CHECK_EQ_INT(SYNC(cache, second, &removed, &removed_count), 0);
    CHECK_EQ_INT(removed_count, 0);
    CHECK(removed == NULL);

    CHECK_EQ_INT(id_of(cache, "INBOX"), inbox);
    CHECK_EQ_INT(id_of(cache, "Lists"), lists);
    CHECK_EQ_INT(id_of(cache, "Lists/notmuch"), notmuch);
    CHECK_EQ_INT(id_of(cache, "Sent"), sent);
    CHECK(id_of(cache, "New") > highest);

    folder = cache_folder_by_id(cache, notmuch);
    CHECK_EQ_INT(folder->uidvalidity, 777);
    CHECK_EQ_INT(folder->uidnext, 9);
    CHECK_EQ_STR(uids_of(folder), "3 5 8");
    CHECK_EQ_STR(folder->messages[1].keywords, "k5");

    CHECK_EQ_STR(cache_folder_by_id(cache, sent)->mailbox, "Sent Items");
    cache_unlock(cache);
    cache_free(cache);
}

static void test_removed_folders_are_reported_and_ids_never_reused(void)
{
    struct cache *cache = cache_new();
    static const struct listed first[] = {
        { "A", "A", 0 }, { "A/B", "A/B", 0 }, { "A/B/C", "A/B/C", 0 }, { "D", "D", 0 },
    };
    static const struct listed second[] = { { "D", "D", 0 } };
    static const struct listed third[] = { { "D", "D", 0 }, { "A", "A", 0 } };

    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, first, NULL, NULL), 0);
    uint32_t a = id_of(cache, "A"), b = id_of(cache, "A/B"), c = id_of(cache, "A/B/C"),
             d = id_of(cache, "D");
    struct cache_folder *folder_c = cache_folder_by_id(cache, c);
    static const uint32_t uids[] = { 1, 2 };
    CHECK_EQ_INT(cache_folder_set_messages(folder_c, table_of(uids, 2), 2), 0);

    uint32_t *removed = NULL;
    size_t removed_count = 0;
    CHECK_EQ_INT(SYNC(cache, second, &removed, &removed_count), 0);
    CHECK_EQ_INT(removed_count, 3);
    CHECK(removed != NULL);
    if (removed && removed_count == 3) {
        CHECK(contains_id(removed, removed_count, a));
        CHECK(contains_id(removed, removed_count, b));
        CHECK(contains_id(removed, removed_count, c));
    }
    free(removed);

    CHECK(cache_folder_by_id(cache, a) == NULL);
    CHECK(cache_folder_by_id(cache, b) == NULL);
    CHECK(cache_folder_by_id(cache, c) == NULL);
    CHECK(cache_folder_by_path(cache, "A") == NULL);
    CHECK(cache_folder_by_path(cache, "A/B/C") == NULL);
    CHECK_EQ_INT(id_of(cache, "D"), d);
    CHECK_EQ_STR(children_of(cache->root), "D");
    CHECK_EQ_INT(HASH_CNT(hh, cache->by_id), 2);

    /* "A" comes back: a new folder, with an id never seen before. */
    CHECK_EQ_INT(SYNC(cache, third, &removed, &removed_count), 0);
    CHECK_EQ_INT(removed_count, 0);
    uint32_t a_again = id_of(cache, "A");
    CHECK(a_again != 0);
    CHECK(a_again != a && a_again != b && a_again != c && a_again != d);
    CHECK(a_again > c && a_again > d);
    CHECK_EQ_INT(cache_folder_by_id(cache, a_again)->count, 0);

    /* An empty LIST removes everything but the root. */
    CHECK_EQ_INT(sync_list(cache, NULL, 0, &removed, &removed_count), 0);
    CHECK_EQ_INT(removed_count, 2);
    free(removed);
    CHECK(cache->root->children == NULL);
    CHECK_EQ_INT(HASH_CNT(hh, cache->by_id), 1);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_listed_folder_becomes_virtual_parent(void)
{
    struct cache *cache = cache_new();
    static const struct listed first[] = { { "X", "X", 0 }, { "X/Y", "X/Y", 0 } };
    static const struct listed second[] = { { "X/Y", "X/Y", 0 } };
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, first, NULL, NULL), 0);
    uint32_t x = id_of(cache, "X"), y = id_of(cache, "X/Y");

    uint32_t *removed = NULL;
    size_t removed_count = 0;
    CHECK_EQ_INT(SYNC(cache, second, &removed, &removed_count), 0);
    CHECK_EQ_INT(removed_count, 0);
    free(removed);
    struct cache_folder *folder = cache_folder_by_path(cache, "X");
    CHECK(folder != NULL);
    if (folder) {
        CHECK_EQ_INT(folder->id, x);
        CHECK_EQ_INT(folder->listed, 0);
        CHECK_EQ_INT(folder->selectable, 0);
        CHECK(folder->mailbox == NULL);
    }
    CHECK_EQ_INT(id_of(cache, "X/Y"), y);

    /* And listed again later: the same folder once more. */
    CHECK_EQ_INT(SYNC(cache, first, NULL, NULL), 0);
    folder = cache_folder_by_path(cache, "X");
    CHECK(folder && folder->id == x && folder->listed && folder->selectable);
    CHECK_EQ_STR(folder ? folder->mailbox : NULL, "X");
    cache_unlock(cache);
    cache_free(cache);
}

static void test_folder_becomes_noselect(void)
{
    struct cache *cache = cache_new();
    static const struct listed selectable[] = { { "A", "A", 0 } };
    static const struct listed noselect[] = { { "A", "A", 1 } };
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, selectable, NULL, NULL), 0);
    struct cache_folder *folder = cache_folder_by_path(cache, "A");
    uint32_t id = folder->id;
    CHECK_EQ_INT(folder->selectable, 1);
    static const uint32_t uids[] = { 7 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(uids, 1), 1), 0);

    CHECK_EQ_INT(SYNC(cache, noselect, NULL, NULL), 0);
    folder = cache_folder_by_path(cache, "A");
    CHECK(folder != NULL);
    CHECK_EQ_INT(folder->id, id);
    CHECK_EQ_INT(folder->selectable, 0);
    CHECK_EQ_INT(folder->listed, 1);
    CHECK_EQ_STR(folder->mailbox, "A");
    CHECK_EQ_INT(folder->count, 1);     /* the table stays, as the header says */

    CHECK_EQ_INT(SYNC(cache, selectable, NULL, NULL), 0);
    CHECK_EQ_INT(cache_folder_by_path(cache, "A")->selectable, 1);
    CHECK_EQ_INT(cache_folder_by_path(cache, "A")->id, id);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_duplicate_paths_ignored(void)
{
    struct cache *cache = cache_new();
    /* Two server names mapping to one file name: the first one wins. */
    static const struct listed list[] = {
        { "first", "Same", 0 }, { "second", "Same", 1 }, { "A/B", "A/B", 0 },
        { "A", "A", 0 }, { "A/B again", "A/B", 1 },
    };
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, list, NULL, NULL), 0);
    CHECK_EQ_STR(children_of(cache->root), "A,Same");
    struct cache_folder *same = cache_folder_by_path(cache, "Same");
    CHECK_EQ_STR(same->mailbox, "first");
    CHECK_EQ_INT(same->selectable, 1);
    struct cache_folder *a = cache_folder_by_path(cache, "A");
    CHECK(a->listed && a->selectable);      /* an earlier parent is no duplicate */
    CHECK_EQ_STR(a->mailbox, "A");
    CHECK_EQ_STR(cache_folder_by_path(cache, "A/B")->mailbox, "A/B");
    CHECK_EQ_INT(HASH_CNT(hh, cache->by_id), 4);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_unsafe_entries_ignored(void)
{
    struct cache *cache = cache_new();
    const char *dotdot[] = { "..", "etc" };
    const char *slash[] = { "a/b" };
    const char *empty[] = { "" };
    const char *fine[] = { "ok" };
    struct cache_mailbox_entry entries[] = {
        { "..", dotdot, 2, '/', 0 },
        { "a/b", slash, 1, '.', 0 },
        { "", empty, 1, '/', 0 },
        { "nothing", fine, 0, '/', 0 },
        { "ok", fine, 1, '/', 0 },
    };
    cache_lock(cache);
    CHECK_EQ_INT(cache_folders_sync(cache, entries, 5, NULL, NULL), 0);
    CHECK_EQ_STR(children_of(cache->root), "ok");
    cache_unlock(cache);
    cache_free(cache);
}

static void test_paths(void)
{
    struct cache *cache = cache_new();
    static const struct listed list[] = {
        { "Lists.linux.kernel", "Lists/linux/kernel", 0 }, { "INBOX", "INBOX", 0 },
    };
    cache_lock(cache);
    CHECK_EQ_INT(SYNC(cache, list, NULL, NULL), 0);
    struct cache_folder *kernel = cache_folder_by_path(cache, "Lists/linux/kernel");
    CHECK(kernel != NULL);
    char *path = cache_folder_path(kernel);
    CHECK_EQ_STR(path, "Lists/linux/kernel");
    free(path);
    path = cache_folder_path(cache_folder_by_path(cache, "INBOX"));
    CHECK_EQ_STR(path, "INBOX");
    free(path);
    path = cache_folder_path(cache_folder_by_path(cache, "Lists"));
    CHECK_EQ_STR(path, "Lists");
    free(path);

    CHECK(cache_folder_by_path(cache, "Lists/linux") == kernel->parent);
    CHECK(cache_folder_by_path(cache, "Lists/linux/kernel/") == kernel);
    CHECK(cache_folder_by_path(cache, "/Lists//linux/kernel") == kernel);
    CHECK(cache_folder_by_path(cache, "Lists/linux/kernel/more") == NULL);
    CHECK(cache_folder_by_path(cache, "Lists/nope") == NULL);
    CHECK(cache_folder_by_path(cache, "Lis") == NULL);
    CHECK(cache_folder_by_path(cache, "Lists/linu") == NULL);
    CHECK(cache_folder_by_path(cache, "INBOXX") == NULL);
    CHECK(cache_folder_by_path(cache, "inbox") == NULL);    /* names are exact */
    CHECK(cache_folder_child(cache->root, "Lists") == kernel->parent->parent);
    CHECK(cache_folder_child(cache->root, "kernel") == NULL);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_deep_tree_freed_without_recursion(void)
{
    /* A hostile server nesting 20,000 levels deep must not blow the stack. */
    enum { DEPTH = 20000 };
    const char **components = malloc(DEPTH * sizeof *components);
    for (size_t i = 0; i < DEPTH; i++)
        components[i] = "d";
    struct cache_mailbox_entry entry = { "deep", components, DEPTH, '/', 0 };
    struct cache *cache = cache_new();
    cache_lock(cache);
    CHECK_EQ_INT(cache_folders_sync(cache, &entry, 1, NULL, NULL), 0);
    CHECK_EQ_INT(HASH_CNT(hh, cache->by_id), DEPTH + 1);
    uint32_t *removed = NULL;
    size_t removed_count = 0;
    CHECK_EQ_INT(cache_folders_sync(cache, NULL, 0, &removed, &removed_count), 0);
    CHECK_EQ_INT(removed_count, DEPTH);
    free(removed);
    CHECK_EQ_INT(cache_folders_sync(cache, &entry, 1, NULL, NULL), 0);
    cache_unlock(cache);
    cache_free(cache);      /* with the deep tree still in it */
    free(components);
}

/* ------------------------------------------------------------ UID tables */

static struct cache *cache_with_folder(struct cache_folder **folder)
{
    static const struct listed list[] = { { "INBOX", "INBOX", 0 } };
    struct cache *cache = cache_new();
    cache_lock(cache);
    if (SYNC(cache, list, NULL, NULL) != 0)
        abort();
    *folder = cache_folder_by_path(cache, "INBOX");
    return cache;
}

static void test_set_messages(void)
{
    struct cache_folder *folder;
    struct cache *cache = cache_with_folder(&folder);

    static const uint32_t sorted[] = { 2, 4, 6, 8 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(sorted, 4), 4), 0);
    CHECK_EQ_STR(uids_of(folder), "2 4 6 8");
    CHECK_EQ_STR(folder->messages[3].keywords, "k8");

    static const uint32_t unsorted[] = { 1, 3, 2 };
    struct cache_message *bad = table_of(unsorted, 3);
    CHECK_EQ_INT(cache_folder_set_messages(folder, bad, 3), -EINVAL);
    free_table(bad, 3);     /* still ours */
    static const uint32_t duplicate[] = { 1, 5, 5, 9 };
    bad = table_of(duplicate, 4);
    CHECK_EQ_INT(cache_folder_set_messages(folder, bad, 4), -EINVAL);
    free_table(bad, 4);
    CHECK_EQ_STR(uids_of(folder), "2 4 6 8");

    /* Replacing frees the old table and its keywords (the sanitizer checks). */
    static const uint32_t other[] = { 10 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(other, 1), 1), 0);
    CHECK_EQ_STR(uids_of(folder), "10");
    CHECK_EQ_INT(cache_folder_set_messages(folder, NULL, 0), 0);
    CHECK_EQ_INT(folder->count, 0);
    CHECK(cache_folder_find(folder, 10) == NULL);

    /* After set_messages, upsert can still grow the table. */
    static const uint32_t one[] = { 5 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(one, 1), 1), 0);
    struct cache_message m = message(6, 0, NULL);
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);
    m = message(1, 0, NULL);
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);
    CHECK_EQ_STR(uids_of(folder), "1 5 6");

    cache_unlock(cache);
    cache_free(cache);
}

static void test_find(void)
{
    struct cache_folder *folder;
    struct cache *cache = cache_with_folder(&folder);
    CHECK(cache_folder_find(folder, 1) == NULL);    /* empty table */

    static const uint32_t uids[] = { 3, 9, 27, 81, 243, 4294967295u };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(uids, 6), 6), 0);
    for (size_t i = 0; i < 6; i++) {
        struct cache_message *found = cache_folder_find(folder, uids[i]);
        CHECK(found != NULL);
        CHECK(found == &folder->messages[i]);
    }
    CHECK(cache_folder_find(folder, 0) == NULL);
    CHECK(cache_folder_find(folder, 1) == NULL);
    CHECK(cache_folder_find(folder, 10) == NULL);
    CHECK(cache_folder_find(folder, 244) == NULL);
    CHECK(cache_folder_find(folder, 4294967294u) == NULL);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_upsert(void)
{
    struct cache_folder *folder;
    struct cache *cache = cache_with_folder(&folder);
    struct cache_message m;

    m = message(50, 0, NULL);
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);          /* into an empty table */
    m = message(100, 0, "$end");
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);          /* end */
    m = message(10, 0, "$front");
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);          /* front */
    m = message(70, 0, NULL);
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);          /* middle */
    m = message(60, 0, "$middle");
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);          /* middle */
    CHECK_EQ_STR(uids_of(folder), "10 50 60 70 100");
    CHECK_EQ_STR(cache_folder_find(folder, 10)->keywords, "$front");
    CHECK_EQ_STR(cache_folder_find(folder, 60)->keywords, "$middle");
    CHECK_EQ_INT(cache_folder_find(folder, 70)->size, 700);

    /* Update an existing uid: everything but the uid changes, old keywords freed. */
    m = (struct cache_message){ .uid = 60, .flags = CACHE_FLAG_SEEN, .size = 1234,
                                .internaldate = 42, .keywords = strdup("$new") };
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);
    CHECK_EQ_INT(folder->count, 5);
    struct cache_message *found = cache_folder_find(folder, 60);
    CHECK_EQ_INT(found->flags, CACHE_FLAG_SEEN);
    CHECK_EQ_INT(found->size, 1234);
    CHECK_EQ_INT(found->internaldate, 42);
    CHECK_EQ_STR(found->keywords, "$new");

    m = (struct cache_message){ .uid = 10, .flags = 0, .keywords = NULL };
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);          /* keywords cleared */
    CHECK(cache_folder_find(folder, 10)->keywords == NULL);

    /* Many inserts at the front, to move the whole table each time. */
    for (uint32_t uid = 9; uid >= 1; uid--) {
        m = message(uid, 0, NULL);
        CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);
    }
    CHECK_EQ_INT(folder->count, 14);
    for (size_t i = 1; i < folder->count; i++)
        CHECK(folder->messages[i - 1].uid < folder->messages[i].uid);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_remove(void)
{
    struct cache_folder *folder;
    struct cache *cache = cache_with_folder(&folder);
    static const uint32_t uids[] = { 1, 2, 3, 4, 5 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(uids, 5), 5), 0);

    CHECK_EQ_INT(cache_folder_remove(folder, 3), 0);
    CHECK_EQ_STR(uids_of(folder), "1 2 4 5");
    CHECK_EQ_INT(cache_folder_remove(folder, 3), -ENOENT);
    CHECK_EQ_INT(cache_folder_remove(folder, 1), 0);
    CHECK_EQ_INT(cache_folder_remove(folder, 5), 0);
    CHECK_EQ_STR(uids_of(folder), "2 4");
    CHECK_EQ_STR(cache_folder_find(folder, 4)->keywords, "k4");
    CHECK_EQ_INT(cache_folder_remove(folder, 99), -ENOENT);
    CHECK_EQ_INT(cache_folder_remove(folder, 2), 0);
    CHECK_EQ_INT(cache_folder_remove(folder, 4), 0);
    CHECK_EQ_INT(folder->count, 0);
    CHECK_EQ_INT(cache_folder_remove(folder, 4), -ENOENT);

    /* A mass expunge gives memory back, and the table still works. */
    for (uint32_t uid = 1; uid <= 1000; uid++) {
        struct cache_message m = message(uid, 0, NULL);
        CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);
    }
    size_t full_capacity = folder->capacity;
    for (uint32_t uid = 1; uid <= 990; uid++)
        CHECK_EQ_INT(cache_folder_remove(folder, uid), 0);
    CHECK(folder->capacity < full_capacity);
    CHECK(folder->capacity >= folder->count);
    CHECK_EQ_INT(folder->count, 10);
    CHECK(cache_folder_find(folder, 995) != NULL);
    cache_unlock(cache);
    cache_free(cache);
}

static void test_reset(void)
{
    struct cache_folder *folder;
    struct cache *cache = cache_with_folder(&folder);
    static const uint32_t uids[] = { 1, 2, 3 };
    CHECK_EQ_INT(cache_folder_set_messages(folder, table_of(uids, 3), 3), 0);
    folder->uidvalidity = 1;
    folder->uidnext = 4;
    folder->highestmodseq = 99;
    folder->listed_at = 12.5;

    cache_folder_reset(folder, 2);
    CHECK_EQ_INT(folder->uidvalidity, 2);
    CHECK_EQ_INT(folder->count, 0);
    CHECK(folder->messages == NULL);
    CHECK_EQ_INT(folder->uidnext, 0);
    CHECK_EQ_INT(folder->highestmodseq, 0);
    CHECK(folder->listed_at == 0);
    CHECK(cache_folder_find(folder, 1) == NULL);

    struct cache_message m = message(1, 0, "$again");
    CHECK_EQ_INT(cache_folder_upsert(folder, &m), 0);
    CHECK_EQ_STR(uids_of(folder), "1");
    cache_unlock(cache);
    cache_free(cache);
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_100k_appends_fast_and_compact(void)
{
    enum { COUNT = 100000 };
    CHECK_EQ_INT(sizeof(struct cache_message), 32);

    struct cache_folder *folder;
    struct cache *cache = cache_with_folder(&folder);
    double start = now_seconds();
    for (uint32_t uid = 1; uid <= COUNT; uid++) {
        struct cache_message m = { .uid = uid * 3, .size = uid };
        if (cache_folder_upsert(folder, &m) != 0) {
            CHECK(!"upsert failed");
            break;
        }
    }
    double elapsed = now_seconds() - start;
    CHECK_EQ_INT(folder->count, COUNT);

    /* Quadratic insertion (a memmove or a realloc per append) would take
     * seconds here; amortised O(1) takes milliseconds, even sanitized. */
    CHECK(elapsed < 1.0);

    /* The table is the only allocation: capacity records of 32 bytes. */
    double bytes_per_message = (double)folder->capacity * sizeof(struct cache_message) / COUNT;
    CHECK(bytes_per_message >= 32.0);
    CHECK(bytes_per_message <= 64.0);
    printf("100k appends: %.1f ms, %.2f bytes per message (capacity %zu)\n",
           elapsed * 1000, bytes_per_message, folder->capacity);

    size_t misses = 0;
    for (uint32_t uid = 1; uid <= COUNT; uid++) {
        struct cache_message *found = cache_folder_find(folder, uid * 3);
        if (!found || found->size != uid)
            misses++;
        if (cache_folder_find(folder, uid * 3 - 1))
            misses++;
    }
    CHECK_EQ_INT(misses, 0);
    cache_unlock(cache);
    cache_free(cache);
}

/* ------------------------------------------------------------------ flags */

static void test_flags_parse(void)
{
    uint32_t flags = 0;
    char *keywords = NULL;
    const char *atoms[] = { "\\Seen", "\\FLAGGED", "\\recent", "$Work", "Junk",
                            "$work", "\\Junk", "\\answered", "\\Deleted", "\\DRAFT",
                            "\\Seen", "NonJunk", "junk" };
    for (size_t i = 0; i < sizeof atoms / sizeof atoms[0]; i++)
        CHECK_EQ_INT(cache_flags_add(&flags, &keywords, atoms[i]), 0);
    CHECK_EQ_INT(flags, CACHE_FLAG_SEEN | CACHE_FLAG_FLAGGED | CACHE_FLAG_RECENT |
                        CACHE_FLAG_ANSWERED | CACHE_FLAG_DELETED | CACHE_FLAG_DRAFT);
    CHECK_EQ_STR(keywords, "$Work Junk \\Junk NonJunk");

    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, ""), -EINVAL);
    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, "two words"), -EINVAL);
    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, "bad\r\n"), -EINVAL);
    CHECK_EQ_STR(keywords, "$Work Junk \\Junk NonJunk");
    free(keywords);

    /* System flags alone leave keywords NULL. */
    flags = 0;
    keywords = NULL;
    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, "\\sEEN"), 0);
    CHECK_EQ_INT(flags, CACHE_FLAG_SEEN);
    CHECK(keywords == NULL);

    /* A keyword that is a prefix of another is still a keyword of its own. */
    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, "$WorkItem"), 0);
    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, "$Work"), 0);
    CHECK_EQ_INT(cache_flags_add(&flags, &keywords, "$Work"), 0);
    CHECK_EQ_STR(keywords, "$WorkItem $Work");
    free(keywords);
}

static void test_flags_format(void)
{
    char *text = cache_flags_format(0, NULL);
    CHECK_EQ_STR(text, "");
    free(text);
    text = cache_flags_format(CACHE_FLAG_RECENT, "");
    CHECK_EQ_STR(text, "");
    free(text);
    text = cache_flags_format(0, "$Work");
    CHECK_EQ_STR(text, "$Work");
    free(text);
    text = cache_flags_format(CACHE_FLAG_FLAGGED | CACHE_FLAG_SEEN, "$Work");
    CHECK_EQ_STR(text, "\\Seen \\Flagged $Work");
    free(text);
    text = cache_flags_format(CACHE_FLAG_DRAFT | CACHE_FLAG_DELETED | CACHE_FLAG_FLAGGED |
                              CACHE_FLAG_ANSWERED | CACHE_FLAG_SEEN | CACHE_FLAG_RECENT, NULL);
    CHECK_EQ_STR(text, "\\Seen \\Answered \\Flagged \\Deleted \\Draft");
    free(text);
}

static void test_flags_round_trip(void)
{
    uint32_t flags = 0;
    char *keywords = NULL;
    const char *atoms[] = { "$Work", "\\draft", "\\Seen", "$label1", "\\Recent", "Junk" };
    for (size_t i = 0; i < sizeof atoms / sizeof atoms[0]; i++)
        CHECK_EQ_INT(cache_flags_add(&flags, &keywords, atoms[i]), 0);
    char *text = cache_flags_format(flags, keywords);
    CHECK_EQ_STR(text, "\\Seen \\Draft $Work $label1 Junk");

    /* Parse the formatted text again, atom by atom: the same flags minus
     * \Recent, the same keywords, the same text. */
    uint32_t flags_again = 0;
    char *keywords_again = NULL;
    char *copy = strdup(text), *saveptr = NULL;
    for (char *atom = strtok_r(copy, " ", &saveptr); atom; atom = strtok_r(NULL, " ", &saveptr))
        CHECK_EQ_INT(cache_flags_add(&flags_again, &keywords_again, atom), 0);
    CHECK_EQ_INT(flags_again, flags & ~CACHE_FLAG_RECENT);
    CHECK_EQ_STR(keywords_again, keywords);
    char *text_again = cache_flags_format(flags_again, keywords_again);
    CHECK_EQ_STR(text_again, text);

    free(copy);
    free(text);
    free(text_again);
    free(keywords);
    free(keywords_again);
}

int main(void)
{
    RUN(test_new_cache_has_only_the_root);
    RUN(test_sync_builds_nested_tree_with_virtual_parents);
    RUN(test_children_sorted_with_strcmp);
    RUN(test_resync_keeps_ids_and_uid_tables);
    RUN(test_removed_folders_are_reported_and_ids_never_reused);
    RUN(test_listed_folder_becomes_virtual_parent);
    RUN(test_folder_becomes_noselect);
    RUN(test_duplicate_paths_ignored);
    RUN(test_unsafe_entries_ignored);
    RUN(test_paths);
    RUN(test_deep_tree_freed_without_recursion);
    RUN(test_set_messages);
    RUN(test_find);
    RUN(test_upsert);
    RUN(test_remove);
    RUN(test_reset);
    RUN(test_100k_appends_fast_and_compact);
    RUN(test_flags_parse);
    RUN(test_flags_format);
    RUN(test_flags_round_trip);
    return check_summary();
}
