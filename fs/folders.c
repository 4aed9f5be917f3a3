/* fs/folders.c — the folder tree (LIST) and each folder's UID table: listed
 * in full the first time, then refreshed with only what changed (CONDSTORE,
 * QRESYNC), kept on disk between mounts, and streamed to readdir while a
 * first listing arrives. */
#include "fs/account_p.h"
#include "fs/names.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------- folders */

/* Splits a mailbox name at its delimiter, decodes each level from modified
 * UTF-7 and maps it to a safe file name.  NULL (with a log line) for a name
 * that cannot be shown safely. */
static char **mailbox_components(const struct imap_mailbox *mailbox, const char *prefix,
                                 size_t *depth)
{
    /* "INBOX.Sent" under a personal namespace "INBOX." shows as Sent */
    size_t prefix_len = strlen(prefix);
    const char *shown = mailbox->name;
    if (prefix_len && strncmp(shown, prefix, prefix_len) == 0 && shown[prefix_len])
        shown += prefix_len;
    char *decoded = imap_utf7_decode(shown);
    char **components = NULL;
    size_t count = 0;

    if (!decoded) {
        log_warn("skipping mailbox with invalid modified UTF-7 name \"%s\"", mailbox->name);
        return NULL;
    }
    char *cursor = decoded;
    for (;;) {
        char *end = mailbox->delimiter ? strchr(cursor, mailbox->delimiter) : NULL;
        if (end)
            *end = '\0';
        char *name = fs_name_from_component(cursor);
        if (name && strlen(name) > 255) { /* escaping can triple a name's length */
            log_warn("skipping mailbox \"%s\": a level of its name is too long for a file name",
                     mailbox->name);
            free(name);
            goto fail;
        }
        char **grown = realloc(components, (count + 1) * sizeof(*components));
        if (!name || !grown) {
            log_warn("skipping mailbox \"%s\": a level of its name is empty or not UTF-8",
                     mailbox->name);
            free(name);
            if (grown)
                components = grown;
            goto fail;
        }
        components = grown;
        components[count++] = name;
        if (!end)
            break;
        cursor = end + 1;
    }
    free(decoded);
    *depth = count;
    return components;
fail:
    for (size_t i = 0; i < count; i++)
        free(components[i]);
    free(components);
    free(decoded);
    return NULL;
}

/* Where each folder sits, to tell the kernel what a new LIST changed. */
struct folder_place {
    uint32_t id, parent_id;
    char *name;
};

/* Caller holds the cache lock; NULL with *count 0 on out of memory (then
 * nothing is invalidated, and entries simply time out). */
static struct folder_place *folder_places(struct cache *cache, size_t *count)
{
    size_t n = HASH_CNT(hh, cache->by_id), i = 0;
    struct folder_place *places = calloc(n ? n : 1, sizeof(*places));

    *count = 0;
    if (!places)
        return NULL;
    for (struct cache_folder *folder = cache->by_id; folder; folder = folder->hh.next) {
        if (!folder->parent)
            continue;
        places[i].id = folder->id;
        places[i].parent_id = folder->parent->id;
        places[i].name = strdup(folder->name);
        if (places[i].name)
            i++;
    }
    *count = i;
    return places;
}

/* Folders gone or moved lose their kernel entries; new ones clear any
 * negative entry for their name.  Returns how many changed.  Caller holds
 * the cache lock (queueing a notice is fine under it; sending is the
 * notifier thread's job). */
static int notify_folder_changes(struct fs_account *account, const struct folder_place *before,
                                 size_t before_count)
{
    int changes = 0;

    for (size_t i = 0; i < before_count; i++) {
        struct cache_folder *folder = cache_folder_by_id(account->cache, before[i].id);
        if (!folder || !folder->parent || folder->parent->id != before[i].parent_id ||
            strcmp(folder->name, before[i].name) != 0) {
            fs_notify_entry(account->notifier, fs_ino_folder(before[i].parent_id), before[i].name);
            changes++;
        }
    }
    for (struct cache_folder *folder = account->cache->by_id; folder; folder = folder->hh.next) {
        size_t i;
        if (!folder->parent)
            continue;
        for (i = 0; i < before_count && before[i].id != folder->id; i++)
            ;
        if (i == before_count) {
            fs_notify_entry(account->notifier, fs_ino_folder(folder->parent->id), folder->name);
            changes++;
        }
    }
    return changes;
}

/* The folder list on disk carries one extra record: the personal namespace
 * prefix, so an offline mount shows the same paths as a live one. */
#define NAMESPACE_RECORD 0x80000000u

static void folders_to_disk(struct fs_account *account, const struct imap_mailbox *mailboxes,
                            size_t count)
{
    struct cache_disk_folders folders = { 0 };

    if (!account->disk)
        return;
    folders.mailboxes = calloc(count + 1, sizeof(*folders.mailboxes));
    folders.delimiters = calloc(count + 1, 1);
    folders.flags = calloc(count + 1, sizeof(*folders.flags));
    if (folders.mailboxes && folders.delimiters && folders.flags) {
        for (size_t i = 0; i < count; i++) {
            folders.mailboxes[i] = mailboxes[i].name;
            folders.delimiters[i] = mailboxes[i].delimiter;
            folders.flags[i] = mailboxes[i].flags;
        }
        folders.mailboxes[count] = account->namespace_prefix;
        folders.flags[count] = NAMESPACE_RECORD;
        folders.count = count + 1;
        cache_disk_folders_save(account->disk, &folders);
    }
    free(folders.mailboxes); /* the strings belong to the caller */
    free(folders.delimiters);
    free(folders.flags);
}

static int apply_mailboxes(struct fs_account *account, const struct imap_mailbox *mailboxes,
                           size_t count);

int fs_account_load_folders(struct fs_account *account)
{
    struct imap_session *session;
    struct imap_mailbox *mailboxes = NULL;
    size_t count = 0;
    int ret = fs_session_acquire(account, NULL, &session);

    if (ret < 0)
        return ret;
    ret = imap_list(session, &mailboxes, &count);
    fs_session_release(account, session);
    if (ret < 0)
        return ret == -EIO ? ret : -EIO;
    folders_to_disk(account, mailboxes, count);
    ret = apply_mailboxes(account, mailboxes, count);
    imap_mailboxes_free(mailboxes, count);
    return ret;
}

int fs_account_load_folders_offline(struct fs_account *account)
{
    struct cache_disk_folders folders;
    struct imap_mailbox *mailboxes;
    size_t used = 0;

    if (!account->disk || cache_disk_folders_load(account->disk, &folders) < 0)
        return -ENOENT;
    mailboxes = calloc(folders.count ? folders.count : 1, sizeof(*mailboxes));
    if (!mailboxes) {
        cache_disk_folders_free(&folders);
        return -ENOMEM;
    }
    for (size_t i = 0; i < folders.count; i++) {
        if (folders.flags[i] & NAMESPACE_RECORD) {
            char *prefix = strdup(folders.mailboxes[i]);
            if (prefix) {
                free(account->namespace_prefix);
                account->namespace_prefix = prefix;
            }
            continue;
        }
        mailboxes[used].name = folders.mailboxes[i];
        mailboxes[used].delimiter = folders.delimiters[i];
        mailboxes[used].flags = folders.flags[i];
        used++;
    }
    int ret = apply_mailboxes(account, mailboxes, used);
    free(mailboxes); /* names belong to folders */
    cache_disk_folders_free(&folders);
    return ret;
}

/* Makes the folder tree match a LIST result; returns how many folders
 * came, went or moved. */
static int apply_mailboxes(struct fs_account *account, const struct imap_mailbox *mailboxes,
                           size_t count)
{
    size_t used = 0;
    int ret = 0;
    struct cache_mailbox_entry *entries = calloc(count ? count : 1, sizeof(*entries));
    char ***paths = calloc(count ? count : 1, sizeof(*paths));
    if (!entries || !paths) {
        ret = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        size_t depth;
        char **components = mailbox_components(&mailboxes[i], account->namespace_prefix, &depth);
        if (!components)
            continue;
        paths[used] = components;
        entries[used].mailbox = mailboxes[i].name;
        entries[used].components = (const char *const *)components;
        entries[used].depth = depth;
        entries[used].delimiter = mailboxes[i].delimiter;
        entries[used].noselect = (mailboxes[i].flags & IMAP_MAILBOX_NOSELECT) != 0;
        used++;
    }
    cache_lock(account->cache);
    size_t before_count = 0;
    struct folder_place *before = folder_places(account->cache, &before_count);
    ret = cache_folders_sync(account->cache, entries, used, NULL, NULL);
    if (ret == 0)
        ret = notify_folder_changes(account, before, before_count);
    for (size_t i = 0; i < before_count; i++)
        free(before[i].name);
    free(before);
    for (size_t i = 0; i < count; i++) {
        if (mailboxes[i].delimiter && strcasecmp(mailboxes[i].name, "INBOX") == 0)
            account->delimiter = mailboxes[i].delimiter;
        if ((mailboxes[i].flags & IMAP_MAILBOX_TRASH) && !account->special_trash)
            account->special_trash = strdup(mailboxes[i].name);
    }
    cache_unlock(account->cache);
out:
    for (size_t i = 0; paths && i < used; i++) {
        for (size_t j = 0; j < entries[i].depth; j++)
            free(paths[i][j]);
        free(paths[i]);
    }
    free(paths);
    free(entries);
    return ret;
}

/* ---------------------------------------------------------------- UID tables */

#define STREAM_STEP 256             /* messages per publication to readdir */

/* Shows readdir what arrived since the last call. */
static void stream_publish(struct table_builder *table)
{
    struct listing_stream *stream = table->stream;
    size_t n = table->count - table->published;
    int ret = 0;

    pthread_mutex_lock(&table->account->stream_lock);
    if (table->unsorted)
        stream->unsorted = 1;
    if (!stream->unsorted && n) {
        if (stream->count + n > stream->cap) {
            size_t cap = stream->cap ? stream->cap * 2 : 4096;
            while (cap < stream->count + n)
                cap *= 2;
            struct cache_message *grown = realloc(stream->messages, cap * sizeof(*grown));
            if (!grown) {
                stream->unsorted = 1; /* readers wait for the whole table */
                ret = -ENOMEM;
            } else {
                stream->messages = grown;
                stream->cap = cap;
            }
        }
        for (size_t i = table->published; ret == 0 && i < table->count; i++) {
            /* a retried listing starts again from the first UID */
            if (stream->count && stream->messages[stream->count - 1].uid >= table->messages[i].uid)
                continue;
            stream->messages[stream->count] = table->messages[i];
            stream->messages[stream->count++].keywords = NULL;
        }
    }
    pthread_cond_broadcast(&table->account->stream_grew);
    pthread_mutex_unlock(&table->account->stream_lock);
    table->published = table->count;
}

int fs_table_collect_meta(void *context, uint32_t uid, uint64_t size, int64_t internaldate,
                        const struct imap_value *flags)
{
    struct table_builder *table = context;
    struct cache_message message = { .uid = uid, .size = size, .internaldate = internaldate };

    for (size_t i = 0; i < flags->count; i++)
        if (flags->items[i].kind == IMAP_VALUE_ATOM &&
            cache_flags_add(&message.flags, &message.keywords, flags->items[i].str) < 0) {
            free(message.keywords);
            return -ENOMEM;
        }
    if (table->count == table->cap) {
        size_t cap = table->cap ? table->cap * 2 : 256;
        struct cache_message *grown = realloc(table->messages, cap * sizeof(*grown));
        if (!grown) {
            free(message.keywords);
            return -ENOMEM;
        }
        table->messages = grown;
        table->cap = cap;
    }
    if (table->count && table->messages[table->count - 1].uid >= uid)
        table->unsorted = 1;
    table->messages[table->count++] = message;
    if (table->stream && table->count - table->published >= STREAM_STEP)
        stream_publish(table);
    return 0;
}

static int compare_messages(const void *a, const void *b)
{
    uint32_t x = ((const struct cache_message *)a)->uid, y = ((const struct cache_message *)b)->uid;
    return x < y ? -1 : x > y;
}

void fs_table_free(struct table_builder *table)
{
    for (size_t i = 0; i < table->count; i++)
        free(table->messages[i].keywords);
    free(table->messages);
}

/* Tells the kernel about every UID that is in one sorted table and not in
 * the other: removed files must go, new names may have negative entries.
 * New names are told only while the kernel may hold negative entries in
 * the folder (folder->negative_until): on a first listing, 100,000
 * invalidations would race with the readdirplus that is creating those
 * very entries, and make every file cost a lookup again. */
static void notify_table_changes(struct fs_account *account, const struct cache_folder *folder,
                                 const struct cache_message *old, size_t old_count,
                                 const struct cache_message *new, size_t new_count)
{
    uint32_t folder_id = folder->id;
    int negative = now_monotonic() < folder->negative_until;
    size_t i = 0, j = 0;
    char name[32];

    while (i < old_count || j < new_count) {
        uint32_t changed;
        if (j == new_count || (i < old_count && old[i].uid < new[j].uid)) {
            changed = old[i++].uid;
            cache_bodies_drop(account->bodies, folder_id, changed);
        } else if (i == old_count || new[j].uid < old[i].uid) {
            changed = new[j++].uid;
            if (!negative)
                continue;
        } else {
            i++;
            j++;
            continue;
        }
        fs_name_from_uid(changed, name, sizeof(name));
        fs_notify_entry(account->notifier, fs_ino_folder(folder_id), name);
    }
}

/* Flags-only answers (CHANGEDSINCE) go in a table of their own; size and
 * date there are 0 and never merged. */
static int collect_flags(void *context, uint32_t uid, const struct imap_value *flags)
{
    return fs_table_collect_meta(context, uid, 0, 0, flags);
}

/* Appends message to table, taking over its keywords. */
static int table_append(struct table_builder *table, struct cache_message *message)
{
    if (table->count == table->cap) {
        size_t cap = table->cap ? table->cap * 2 : 256;
        struct cache_message *grown = realloc(table->messages, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        table->messages = grown;
        table->cap = cap;
    }
    table->messages[table->count++] = *message;
    message->keywords = NULL;
    return 0;
}

static struct cache_message *table_find(struct table_builder *table, uint32_t uid)
{
    size_t lo = cache_messages_lower_bound(table->messages, table->count, uid);
    return lo < table->count && table->messages[lo].uid == uid ? &table->messages[lo] : NULL;
}

static int uid_in(const uint32_t *uids, size_t count, uint32_t uid)
{
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (uids[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < count && uids[lo] == uid;
}

/* What we knew of a folder before a refresh. */
struct folder_snapshot {
    char *mailbox;
    uint32_t uidvalidity, uidnext;
    uint64_t highestmodseq;
    struct cache_message *messages;     /* copy, keywords not copied */
    size_t count;
    int listed;
};

/* Brings table (a copy of the old one, keywords copied) up to date with only
 * what changed, using CONDSTORE: new UIDs, flags changed since the old
 * HIGHESTMODSEQ, and UIDs gone.  The cost follows the changes, not the
 * folder's size.  -EAGAIN: fall back to a full listing. */
static int refresh_incremental(struct imap_session *session, const struct folder_snapshot *old,
                               const struct imap_mailbox_state *state,
                               struct table_builder *table)
{
    struct table_builder added = { 0 }, changed = { 0 };
    uint32_t *present = NULL, *vanished = NULL;
    size_t present_count = 0, vanished_count = 0, gone = 0;
    int ret = 0;

    if (old->uidnext && state->uidnext > old->uidnext)
        ret = imap_fetch_meta(session, old->uidnext, 0, fs_table_collect_meta, &added);
    /* With QRESYNC the flags fetch also names the UIDs expunged since
     * (VANISHED (EARLIER)); without it, only the count tells whether any
     * were, and then every UID is asked for (UID SEARCH ALL). */
    if (ret == 0 && old->uidnext > 1 && imap_session_qresync(session))
        ret = imap_fetch_changes(session, 1, old->uidnext - 1, old->highestmodseq, collect_flags,
                                 &changed, &vanished, &vanished_count);
    else if (ret == 0 && old->uidnext > 1)
        ret = imap_fetch_flags(session, 1, old->uidnext - 1, old->highestmodseq, collect_flags,
                               &changed);
    for (size_t i = 0; ret == 0 && vanished && i < old->count; i++)
        gone += uid_in(vanished, vanished_count, old->messages[i].uid);
    /* a count that does not add up: ask for every UID (or VANISHED missed one) */
    if (ret == 0 && old->count - gone + added.count != state->exists)
        ret = imap_search_all(session, &present, &present_count);
    if (ret < 0)
        goto out;

    if (changed.unsorted)
        qsort(changed.messages, changed.count, sizeof(*changed.messages), compare_messages);
    /* old table, minus the UIDs gone, with the new flags, plus the new UIDs */
    for (size_t i = 0; i < old->count; i++) {
        struct cache_message message = old->messages[i];
        if (present ? !uid_in(present, present_count, message.uid)
                    : vanished && uid_in(vanished, vanished_count, message.uid))
            continue;
        struct cache_message *update = table_find(&changed, message.uid);
        if (update) {
            message.flags = update->flags;
            message.keywords = update->keywords;
            update->keywords = NULL;
        } else if (message.keywords && !(message.keywords = strdup(message.keywords))) {
            ret = -ENOMEM;
            goto out;
        }
        if ((ret = table_append(table, &message)) < 0) {
            free(message.keywords);
            goto out;
        }
    }
    for (size_t i = 0; i < added.count; i++) {
        if (table->count && table->messages[table->count - 1].uid >= added.messages[i].uid)
            continue;
        if ((ret = table_append(table, &added.messages[i])) < 0)
            goto out;
    }
    if (table->count != state->exists)
        ret = -EAGAIN; /* something did not add up: list in full */
out:
    fs_table_free(&added);
    fs_table_free(&changed);
    free(present);
    free(vanished);
    return ret;
}

static int snapshot_folder(struct fs_account *account, uint32_t folder_id, int force,
                           struct folder_snapshot *old)
{
    memset(old, 0, sizeof(*old));
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    if (force != FS_LOAD_WATCHER)
        folder->used_at = now_monotonic();
    if (!folder->selectable ||
        (!force && folder->listed_at > 0 &&
         now_monotonic() - folder->listed_at < account->dir_cache_timeout)) {
        cache_unlock(account->cache);
        return 1; /* fresh enough */
    }
    old->mailbox = strdup(folder->mailbox);
    old->uidvalidity = folder->uidvalidity;
    old->uidnext = folder->uidnext;
    old->highestmodseq = folder->highestmodseq;
    old->listed = folder->uidvalidity != 0; /* a table from this mount or from disk */
    if (old->listed && folder->count) {
        old->messages = malloc(folder->count * sizeof(*old->messages));
        if (old->messages) {
            memcpy(old->messages, folder->messages, folder->count * sizeof(*old->messages));
            for (size_t i = 0; i < folder->count; i++)
                old->messages[i].keywords = folder->messages[i].keywords ?
                                            strdup(folder->messages[i].keywords) : NULL;
            old->count = folder->count;
        } else {
            old->listed = 0; /* no copy: list in full */
        }
    }
    cache_unlock(account->cache);
    return old->mailbox ? 0 : -ENOMEM;
}

static void snapshot_free(struct folder_snapshot *old)
{
    for (size_t i = 0; i < old->count; i++)
        free(old->messages[i].keywords);
    free(old->messages);
    free(old->mailbox);
}

/* One refresh attempt on one session. */
static int refresh_folder(struct fs_account *account, const struct folder_snapshot *old,
                          struct imap_mailbox_state *state, struct table_builder *table)
{
    struct imap_session *session;
    int ret = fs_session_acquire(account, old->mailbox, &session);

    if (ret < 0)
        return -ENOTCONN; /* not a broken session: no point in a retry */
    ret = imap_select_fresh(session, old->mailbox, 1, state);
    if (ret == -EIO && !imap_session_broken(session))
        ret = -EREMOTEIO; /* refused with no code: see folder_left_the_server */
    if (ret == 0 && old->listed && old->uidvalidity == state->uidvalidity &&
        old->highestmodseq && state->highestmodseq &&
        imap_session_has_capability(session, "CONDSTORE")) {
        if (state->highestmodseq == old->highestmodseq && state->uidnext == old->uidnext &&
            state->exists == old->count) {
            ret = 1; /* nothing changed */
        } else {
            ret = refresh_incremental(session, old, state, table);
            /* counts that do not add up, or an answer we could not read
             * (a malformed VANISHED, say; the command completed, so the
             * session is still in step): list in full instead */
            if (ret == -EAGAIN || ret == -EPROTO) {
                fs_table_free(table);
                memset(table, 0, sizeof(*table));
                ret = 0;
                goto full;
            }
        }
        fs_session_release(account, session);
        return ret;
    }
full:
    if (ret == 0)
        ret = imap_fetch_meta(session, 1, 0, fs_table_collect_meta, table);
    fs_session_release(account, session);
    return ret;
}

/* A folder this mount has not listed yet starts from the listing saved on
 * disk: it shows at once (also offline), and the refresh that follows asks
 * the server only for what changed since (CONDSTORE). */
static void listing_from_disk(struct fs_account *account, uint32_t folder_id)
{
    struct cache_disk_listing listing;
    char *mailbox = NULL;

    if (!account->disk)
        return;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->selectable && folder->uidvalidity == 0 && folder->listed_at == 0)
        mailbox = strdup(folder->mailbox);
    cache_unlock(account->cache);
    if (!mailbox)
        return;
    if (cache_disk_listing_load(account->disk, mailbox, &listing) == 0) {
        cache_lock(account->cache);
        folder = cache_folder_by_id(account->cache, folder_id);
        if (folder && folder->uidvalidity == 0 &&
            cache_folder_set_messages(folder, listing.messages, listing.count) == 0) {
            folder->uidvalidity = listing.uidvalidity;
            folder->uidnext = listing.uidnext;
            folder->highestmodseq = listing.highestmodseq;
            listing.messages = NULL;
            listing.count = 0;
        }
        cache_unlock(account->cache);
        for (size_t i = 0; i < listing.count; i++)
            free(listing.messages[i].keywords);
        free(listing.messages);
    }
    free(mailbox);
}

static void listing_to_disk(struct fs_account *account, uint32_t folder_id)
{
    struct cache_disk_listing listing = { 0 };
    char *mailbox = NULL;

    if (!account->disk)
        return;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder && folder->mailbox) {
        mailbox = strdup(folder->mailbox);
        listing.uidvalidity = folder->uidvalidity;
        listing.uidnext = folder->uidnext;
        listing.highestmodseq = folder->highestmodseq;
        listing.messages = malloc((folder->count ? folder->count : 1) * sizeof(*listing.messages));
        if (listing.messages) {
            /* keywords are shared with the cache's table, read outside the
             * lock: copy them too, the table may change meanwhile */
            if (folder->count) /* an empty folder has no array at all */
                memcpy(listing.messages, folder->messages,
                       folder->count * sizeof(*listing.messages));
            listing.count = folder->count;
            for (size_t i = 0; i < listing.count; i++)
                if (listing.messages[i].keywords)
                    listing.messages[i].keywords = strdup(listing.messages[i].keywords);
        }
    }
    cache_unlock(account->cache);
    if (mailbox && listing.messages)
        cache_disk_listing_save(account->disk, mailbox, &listing);
    for (size_t i = 0; i < listing.count; i++)
        free(listing.messages[i].keywords);
    free(listing.messages);
    free(mailbox);
}

/* Whether a fresh LIST no longer has the folder, asked after the server
 * refused to open it with no response code (-EREMOTEIO from
 * refresh_folder; a broken session is not asked about).  Dovecot 2.3
 * answers an EXAMINE of a mailbox deleted by another client "NO Mailbox
 * doesn't exist" with no NONEXISTENT code, which reads as an I/O error, and
 * the mount would serve the gone folder from its cache as if the server
 * were down until the folder list was looked at again. */
static int folder_left_the_server(struct fs_account *account, uint32_t folder_id)
{
    if (fs_account_load_folders(account) < 0)
        return 0; /* no answer: it may well still be there */
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    int gone = !folder || !folder->selectable;
    cache_unlock(account->cache);
    return gone;
}

int fs_account_load_folder(struct fs_account *account, uint32_t folder_id, int force)
{
    struct folder_snapshot old;
    struct imap_mailbox_state state;
    struct table_builder table = { 0 };

    /* A first listing streaming in another thread: its table, not a second
     * listing (readdir may have shown names the table does not have yet). */
    pthread_mutex_lock(&account->stream_lock);
    for (;;) {
        struct listing_stream *stream = account->streams;
        while (stream && (stream->folder_id != folder_id ||
                          pthread_equal(stream->owner, pthread_self())))
            stream = stream->next;
        if (!stream)
            break;
        pthread_cond_wait(&account->stream_grew, &account->stream_lock);
    }
    pthread_mutex_unlock(&account->stream_lock);
    listing_from_disk(account, folder_id);
    int ret = snapshot_folder(account, folder_id, force, &old);

    if (ret != 0)
        return ret > 0 ? 0 : ret;
    if (!old.listed) { /* a first listing: readdir may be waiting for it */
        pthread_mutex_lock(&account->stream_lock);
        for (struct listing_stream *stream = account->streams; stream; stream = stream->next)
            if (stream->folder_id == folder_id && pthread_equal(stream->owner, pthread_self()))
                table.stream = stream;
        pthread_mutex_unlock(&account->stream_lock);
        table.account = account;
    }
    ret = refresh_folder(account, &old, &state, &table);
    if (ret == -EIO) { /* a session broke while in use */
        /* Listing is idempotent: once more on a fresh connection (the pooled
         * one may have been closed by the server while idle). */
        struct listing_stream *stream = table.stream;
        fs_table_free(&table);
        memset(&table, 0, sizeof(table));
        table.account = account;
        table.stream = stream; /* it skips what readdir was shown already */
        ret = refresh_folder(account, &old, &state, &table);
    }
    if (ret == -EREMOTEIO && folder_left_the_server(account, folder_id))
        ret = -ENOENT;
    if (ret < 0 && ret != -ENOENT && ret != -ENOMEM)
        ret = -EIO; /* a protocol error or a refusal is an I/O error to the caller */
    if (ret < 0) {
        long second = (long)now_monotonic(), last = atomic_load(&account->stale_warned_at);
        if (!old.listed || ret == -ENOENT)
            log_warn("cannot list %s: %s", old.mailbox, strerror(-ret));
        else if ((last == 0 || second - last >= 60) &&
                 atomic_compare_exchange_strong(&account->stale_warned_at, &last, second))
            log_warn("cannot list %s: %s; serving what is cached (said at most once a minute)",
                     old.mailbox, strerror(-ret));
        fs_table_free(&table);
        if (old.listed && ret != -ENOENT)
            ret = 0; /* offline: the last listing is better than an error */
        snapshot_free(&old);
        return ret;
    }
    if (table.unsorted) {
        qsort(table.messages, table.count, sizeof(*table.messages), compare_messages);
        size_t unique = 0;
        for (size_t i = 0; i < table.count; i++) {
            if (unique && table.messages[unique - 1].uid == table.messages[i].uid)
                free(table.messages[i].keywords);
            else
                table.messages[unique++] = table.messages[i];
        }
        table.count = unique;
    }

    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (!folder) {
        cache_unlock(account->cache);
        fs_table_free(&table);
        snapshot_free(&old);
        return -ENOENT;
    }
    if (ret == 1) { /* unchanged */
        folder->listed_at = now_monotonic();
        cache_unlock(account->cache);
        snapshot_free(&old);
        return 0;
    }
    int reset = folder->uidvalidity && folder->uidvalidity != state.uidvalidity;
    if (reset) {
        log_info("%s: UIDVALIDITY changed, dropping its cache", old.mailbox);
        /* The same names may now be other messages: the kernel must forget
         * every old one, its pages and attributes too, not just the names
         * that went away. */
        for (size_t i = 0; i < folder->count; i++) {
            char name[32];
            fs_name_from_uid(folder->messages[i].uid, name, sizeof(name));
            fs_notify_entry(account->notifier, fs_ino_folder(folder_id), name);
            fs_notify_inode(account->notifier, fs_ino_message(folder_id, folder->messages[i].uid));
        }
        cache_folder_reset(folder, state.uidvalidity);
        folder->reset_at = now_monotonic();
        cache_bodies_drop_folder(account->bodies, folder_id);
        if (account->disk)
            cache_disk_drop_mailbox(account->disk, old.mailbox);
    }
    /* The kernel learns what changed against the table it was shown. */
    notify_table_changes(account, folder, folder->messages, folder->count, table.messages,
                         table.count);
    folder->uidvalidity = state.uidvalidity;
    folder->uidnext = state.uidnext;
    folder->highestmodseq = state.highestmodseq;
    ret = cache_folder_set_messages(folder, table.messages, table.count);
    if (ret == 0)
        folder->listed_at = now_monotonic();
    cache_unlock(account->cache);
    if (ret < 0)
        fs_table_free(&table);
    else
        listing_to_disk(account, folder_id);
    snapshot_free(&old);
    return ret;
}

/* ---------------------------------------------------------------- streamed listings
 *
 * ls -l of a folder of 100,000 messages would otherwise wait for the whole
 * UID FETCH before the first entry, and only then start making 100,000
 * kernel inodes: the two can overlap.  A first listing (nothing in memory,
 * nothing on disk) therefore lets opendir answer at once; the opendir
 * thread then lists, publishing every STREAM_STEP messages, and readdir
 * waits only for the entries it is about to return.  Offsets are UIDs, so
 * the readdir that follows the end reads on from the folder's table. */

int fs_account_stream_begin(struct fs_account *account, uint32_t folder_id)
{
    if (fs_account_offline(account))
        return 0;
    listing_from_disk(account, folder_id);
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    int first = folder && folder->selectable && folder->listed_at == 0 && folder->uidvalidity == 0;
    cache_unlock(account->cache);
    if (!first)
        return 0;
    struct listing_stream *stream;
    pthread_mutex_lock(&account->stream_lock);
    for (stream = account->streams; stream; stream = stream->next)
        if (stream->folder_id == folder_id)
            break;
    int ret = 2;
    if (!stream) {
        stream = calloc(1, sizeof(*stream));
        ret = 0;
        if (stream) {
            stream->folder_id = folder_id;
            stream->owner = pthread_self();
            stream->next = account->streams;
            account->streams = stream;
            ret = 1;
        }
    }
    pthread_mutex_unlock(&account->stream_lock);
    if (ret == 1)
        fs_readahead_warm(account, folder_id);
    return ret;
}

void fs_account_stream_run(struct fs_account *account, uint32_t folder_id)
{
    int ret = fs_account_load_folder(account, folder_id, 0);
    if (ret < 0)
        log_debug("streamed listing of folder %u: %s", folder_id, strerror(-ret));
    /* the table is in place (or the listing failed, and readdir lists again) */
    pthread_mutex_lock(&account->stream_lock);
    struct listing_stream **link = &account->streams, *stream = NULL;
    for (; *link; link = &(*link)->next)
        if ((*link)->folder_id == folder_id && pthread_equal((*link)->owner, pthread_self())) {
            stream = *link;
            *link = stream->next;
            break;
        }
    pthread_cond_broadcast(&account->stream_grew);
    pthread_mutex_unlock(&account->stream_lock);
    if (stream)
        free(stream->messages);
    free(stream);
}

size_t fs_account_stream_read(struct fs_account *account, uint32_t folder_id, uint32_t after,
                              struct cache_message *out, size_t max)
{
    size_t n = 0;

    pthread_mutex_lock(&account->stream_lock);
    for (;;) {
        struct listing_stream *stream;
        for (stream = account->streams; stream; stream = stream->next)
            if (stream->folder_id == folder_id)
                break;
        if (!stream)
            break;
        if (!stream->unsorted) {
            size_t lo = after == UINT32_MAX ? stream->count
                        : cache_messages_lower_bound(stream->messages, stream->count, after + 1);
            n = stream->count - lo < max ? stream->count - lo : max;
            if (n) {
                memcpy(out, stream->messages + lo, n * sizeof(*out));
                break;
            }
        }
        /* the lister's own network timeout bounds this wait */
        pthread_cond_wait(&account->stream_grew, &account->stream_lock);
    }
    pthread_mutex_unlock(&account->stream_lock);
    return n;
}
