/* fs/changes.c — what changes mail on the server: moves, deletes, appends,
 * flags, and folders created, deleted or renamed.
 *
 * Every change checks the server's answer before it touches the cache.
 * When the connection drops in the middle, the command is not blindly sent
 * again: a fresh connection looks at the server to learn whether it
 * happened, and the caller gets the answer that matches. */
#include "fs/account_p.h"
#include "fs/names.h"
#include "imap/log.h"
#include "imap/text.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Runs work(session, context) on a pooled session with mailbox selected
 * (EXAMINEd when readonly).  A connection dropped while idle shows only when
 * used, and an outage takes every pooled one at once: when the session turns
 * out broken, the selection and the work (which must be idempotent) are asked
 * again on another, at most max_connections times.  With out, the session is
 * handed to the caller on success instead of released. */
typedef int session_work_fn(struct imap_session *session, void *context);

static int on_selected_session(struct fs_account *account, const char *mailbox, int readonly,
                               session_work_fn *work, void *context, struct imap_session **out)
{
    for (unsigned attempt = 0;; attempt++) {
        struct imap_session *session;
        int ret = fs_session_acquire_for(account, mailbox, !readonly, &session);
        if (ret < 0)
            return ret;
        ret = imap_select(session, mailbox, readonly, NULL);
        if (ret == 0 && work)
            ret = work(session, context);
        if (ret == 0 && out) {
            *out = session;
            return 0;
        }
        int broke = imap_session_broken(session);
        fs_session_release(account, session);
        if (ret == 0 || !broke || attempt >= account->max_connections)
            return ret;
    }
}

static int writable_session(struct fs_account *account, const char *mailbox,
                            struct imap_session **out)
{
    *out = NULL;
    return on_selected_session(account, mailbox, 0, NULL, NULL, out);
}

/* Snapshot of one message and its folder, taken under the cache lock. */
struct message_ref {
    char *mailbox;
    uint32_t uidvalidity;
    struct cache_message message;   /* keywords not copied */
};

static int message_ref_get(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                           struct message_ref *ref)
{
    memset(ref, 0, sizeof(*ref));
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    if (!message) {
        cache_unlock(account->cache);
        return -ENOENT;
    }
    ref->mailbox = strdup(folder->mailbox);
    ref->uidvalidity = folder->uidvalidity;
    ref->message = *message;
    ref->message.keywords = NULL;
    cache_unlock(account->cache);
    return ref->mailbox ? 0 : -ENOMEM;
}

struct exists_probe {
    uint32_t uid;
    struct table_builder table;
};

static int probe_exists(struct imap_session *session, void *context)
{
    struct exists_probe *probe = context;
    fs_table_free(&probe->table); /* from an attempt on a connection that broke */
    memset(&probe->table, 0, sizeof(probe->table));
    return imap_fetch_meta(session, probe->uid, probe->uid, fs_table_collect_meta, &probe->table);
}

/* Does uid still exist in mailbox?  1, 0, or a negative errno.  Asked after
 * a lost answer, when the other pooled connections may have broken in the
 * same outage (on_selected_session asks again). */
static int uid_exists(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    struct exists_probe probe = { .uid = uid };
    int ret = on_selected_session(account, mailbox, 1, probe_exists, &probe, NULL);
    int found = probe.table.count > 0;
    fs_table_free(&probe.table);
    return ret < 0 ? ret : found;
}

static void forget_message(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    if (folder)
        cache_folder_remove(folder, uid);
    cache_unlock(account->cache);
    cache_bodies_drop(account->bodies, folder_id, uid);
}

/* The message now also lives in folder to_id under new_uid: record it when
 * the UIDVALIDITY matches what we know, else have the folder re-listed. */
static void learn_message(struct fs_account *account, uint32_t to_id, uint32_t uidvalidity,
                          const struct cache_message *message)
{
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, to_id);
    if (folder) {
        /* Known at once, so the name resolves right after the change; and
         * when we cannot tell where it went, the folder is listed again. */
        if (message->uid && folder->uidvalidity == uidvalidity)
            cache_folder_upsert(folder, message);
        else
            folder->listed_at = 0;
    }
    cache_unlock(account->cache);
}

/* Flags uid \Deleted and expunges exactly it (UIDPLUS); without UIDPLUS it
 * stays flagged and hidden.  Idempotent, so it is safe to repeat. */
static int expunge_uid(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    struct imap_session *session;
    int ret = writable_session(account, mailbox, &session);

    if (ret < 0)
        return ret;
    ret = imap_uid_store(session, uid, "+FLAGS", "\\Deleted");
    if (ret == 0 && imap_session_has_capability(session, "UIDPLUS"))
        ret = imap_uid_expunge(session, uid);
    fs_session_release(account, session);
    return ret;
}

static int expunge_uid_retrying(struct fs_account *account, const char *mailbox, uint32_t uid)
{
    int ret = expunge_uid(account, mailbox, uid);
    if (ret == -EIO)
        ret = expunge_uid(account, mailbox, uid); /* a fresh connection */
    return ret;
}

/* UID STORE uid how (flags) in mailbox; a STORE is idempotent, so once
 * more on a fresh connection when the first broke. */
static int store_uid(struct fs_account *account, const char *mailbox, uint32_t uid,
                     const char *how, const char *flags)
{
    for (int attempt = 0;; attempt++) {
        struct imap_session *session;
        int ret = writable_session(account, mailbox, &session);
        if (ret == 0) {
            ret = imap_uid_store(session, uid, how, flags);
            fs_session_release(account, session);
        }
        if (ret != -EIO || attempt > 0)
            return ret;
    }
}

/* Finds a message equal to data that appeared in mailbox at or after
 * first_uid: how we learn the UID of an APPEND without APPENDUID, and whether
 * an APPEND whose answer was lost was stored.  *uid = 0 if none. */
struct find_context {
    uint32_t first_uid;
    const char *data;
    size_t len;
    uint32_t found;
};

static int match_body(void *context, uint32_t uid, char *body, size_t len)
{
    struct find_context *find = context;
    if (!find->found && len == find->len && memcmp(body, find->data, len) == 0)
        find->found = uid;
    free(body);
    return 0;
}

/* Fetches the bodies of the UIDs from first_uid on that have the right
 * size, in batches, until one equals the data. */
static int search_appended(struct imap_session *session, void *context)
{
    struct find_context *find = context;
    struct table_builder table = { 0 };
    uint32_t candidates[BATCH_MESSAGES];
    size_t count = 0;

    find->found = 0;
    int ret = imap_fetch_meta(session, find->first_uid, 0, fs_table_collect_meta, &table);
    for (size_t i = 0; ret == 0 && i < table.count; i++) {
        if (table.messages[i].size == find->len)
            candidates[count++] = table.messages[i].uid;
        if (count == BATCH_MESSAGES || (i + 1 == table.count && count)) {
            ret = imap_fetch_bodies(session, candidates, count, match_body, find);
            count = 0;
            if (find->found)
                break;
        }
    }
    fs_table_free(&table);
    return ret;
}

/* Looks for the message data among mailbox's UIDs from first_uid on (after
 * a lost APPEND or COPY answer); asked again like uid_exists when the pooled
 * connection it got broke too. */
static int find_appended(struct fs_account *account, const char *mailbox, uint32_t first_uid,
                         const char *data, size_t len, uint32_t *uid)
{
    struct find_context find = { first_uid, data, len, 0 };
    int ret = on_selected_session(account, mailbox, 1, search_appended, &find, NULL);
    *uid = find.found;
    return ret;
}

struct flag_probe {
    int found, deleted;
};

static int probe_flags(void *context, uint32_t uid, const struct imap_value *flags)
{
    struct flag_probe *probe = context;
    (void)uid;
    probe->found = 1;
    for (size_t i = 0; i < flags->count; i++)
        if (imap_value_is_atom(&flags->items[i], "\\Deleted"))
            probe->deleted = 1;
    return 0;
}

struct flag_check {
    uint32_t uid;
    struct flag_probe probe;
};

static int check_flags(struct imap_session *session, void *context)
{
    struct flag_check *check = context;
    check->probe.found = check->probe.deleted = 0; /* from an attempt that broke */
    return imap_fetch_flags(session, check->uid, check->uid, 0, probe_flags, &check->probe);
}

/* A second copy of a message was made (a move by COPY, a redate) and the
 * original could not be removed.  The original first loses the \Deleted
 * its removal may have set (another client's EXPUNGE would take it, and
 * the copy going too would leave the message nowhere); then, once it is
 * seen there without it, the copy goes.  1: the original went after all
 * (the answer of its removal was lost), so the copy is the message now;
 * 0: the original is as it was and the copy is gone; <0: both stay
 * (logged). */
static int keep_original(struct fs_account *account, const char *mailbox, uint32_t uid,
                         int was_deleted, const char *copy_mailbox, uint32_t copy_uid)
{
    if (!was_deleted)
        store_uid(account, mailbox, uid, "-FLAGS", "\\Deleted"); /* its outcome is looked at next */
    struct flag_check check = { .uid = uid };
    int ret = on_selected_session(account, mailbox, 1, check_flags, &check, NULL);
    if (ret == 0 && !check.probe.found) {
        log_info("UID %u of %s went after all: its copy in %s (UID %u) stays", uid, mailbox,
                 copy_mailbox, copy_uid);
        return 1;
    }
    if (ret == 0 && check.probe.deleted && !was_deleted)
        ret = -EIO; /* still flagged: the copy must stay */
    if (ret == 0)
        ret = copy_uid ? expunge_uid_retrying(account, copy_mailbox, copy_uid) : -ENOENT;
    if (ret < 0)
        log_error("UID %u of %s stays, and so does its copy in %s (UID %u; 0: unknown): "
                  "the message is there twice", uid, mailbox, copy_mailbox, copy_uid);
    return ret;
}

/* MOVE by hand: COPY, then expunge the source only once the copy is known
 * to exist.  If the source cannot be removed, the copy is removed again, so
 * the message is never left in both folders. */
static int move_by_copy(struct fs_account *account, struct imap_session *session,
                        const char *from, uint32_t uid, const char *to,
                        struct imap_copy_result *result)
{
    int ret = imap_uid_copy(session, uid, to, result);
    if (ret < 0)
        return ret;
    ret = imap_uid_store(session, uid, "+FLAGS", "\\Deleted");
    if (ret == 0 && imap_session_has_capability(session, "UIDPLUS"))
        ret = imap_uid_expunge(session, uid);
    if (ret == -EIO)
        ret = expunge_uid_retrying(account, from, uid);
    if (ret < 0) {
        log_error("move of UID %u from %s: copied to %s but the original could not be "
                  "removed (%s); removing the copy", uid, from, to, strerror(-ret));
        if (keep_original(account, from, uid, 0, to, result->uid) == 1)
            ret = 0;
    }
    return ret;
}

/* Before a move by COPY: the source must still be there and not flagged
 * \Deleted (another client, or another mount, may be moving it right now:
 * without MOVE the server cannot make the two exclusive, but a flagged
 * source is the sign).  Also notes the target's UIDNEXT, where to look for
 * the copy should the COPY's answer be lost. */
static int copy_precheck(struct imap_session *session, uint32_t uid, const char *to,
                         uint32_t *to_uidnext)
{
    struct flag_probe probe = { 0, 0 };
    struct imap_mailbox_state state;
    int ret = imap_fetch_flags(session, uid, uid, 0, probe_flags, &probe);

    if (ret < 0)
        return ret;
    if (!probe.found || probe.deleted)
        return -ENOENT;
    *to_uidnext = imap_status(session, to, &state) == 0 ? state.uidnext : 0;
    return 0;
}

int fs_account_move(struct fs_account *account, uint32_t from_id, uint32_t uid, uint32_t to_id,
                    uint32_t *new_uid)
{
    struct message_ref ref;
    struct imap_copy_result result = { 0 };
    struct imap_session *session;
    char *to_mailbox = fs_folder_mailbox(account, to_id);
    int ret;

    *new_uid = 0;
    if (!to_mailbox)
        return -EPERM; /* not a folder that holds messages */
    ret = message_ref_get(account, from_id, uid, &ref);
    if (ret < 0) {
        free(to_mailbox);
        return ret;
    }
    int by_copy = 0;
    uint32_t to_uidnext = 0;
    ret = writable_session(account, ref.mailbox, &session);
    if (ret == 0) {
        ret = imap_uid_move(session, uid, to_mailbox, &result);
        if (ret == -ENOTSUP) {
            by_copy = 1;
            ret = copy_precheck(session, uid, to_mailbox, &to_uidnext);
            if (ret == 0)
                ret = move_by_copy(account, session, ref.mailbox, uid, to_mailbox, &result);
        }
        fs_session_release(account, session);
    }
    if (ret == -EIO && !by_copy) {
        /* The answer was lost.  MOVE is atomic on the server: if the source
         * is gone, it happened. */
        int exists = uid_exists(account, ref.mailbox, uid);
        if (exists == 0) {
            log_info("move of UID %u from %s: connection lost, but the server shows it moved",
                     uid, ref.mailbox);
            ret = 0;
        }
    } else if (ret == -EIO && !result.uid && to_uidnext) {
        /* The COPY's answer was lost: is the copy there?  If so, finish the
         * move; if not, nothing happened.  Never both, never neither. */
        struct cache_body *body;
        uint32_t found = 0;
        if (fs_account_body(account, from_id, uid, &body) == 0) {
            find_appended(account, to_mailbox, to_uidnext, body->data, body->len, &found);
            fs_account_body_release(account, body);
        }
        if (found) {
            ret = expunge_uid_retrying(account, ref.mailbox, uid);
            if (ret == 0) {
                log_info("move of UID %u from %s: connection lost after the copy; finished",
                         uid, ref.mailbox);
                result.uid = found;
            } else if (keep_original(account, ref.mailbox, uid, 0, to_mailbox, found) == 1) {
                result.uid = found;
                ret = 0;
            }
        }
    }
    if (ret == 0) {
        forget_message(account, from_id, uid);
        struct cache_message moved = ref.message;
        moved.uid = result.uid;
        learn_message(account, to_id, result.uidvalidity, &moved);
        *new_uid = result.uid;
    } else if (ret == -ENOENT) {
        forget_message(account, from_id, uid); /* someone else moved or expunged it */
    }
    free(ref.mailbox);
    free(to_mailbox);
    return ret;
}

/* The folder rm moves to (its id), or 0 for a real expunge. */
static uint32_t trash_folder_id(struct fs_account *account)
{
    struct cache_folder *folder = NULL;
    uint32_t id = 0;

    if (!account->trash)
        return 0;
    cache_lock(account->cache);
    if (strcmp(account->trash, "auto") != 0)
        folder = cache_folder_by_path(account->cache, account->trash);
    else if (account->special_trash)
        for (struct cache_folder *each = account->cache->by_id; each; each = each->hh.next)
            if (each->mailbox && strcmp(each->mailbox, account->special_trash) == 0)
                folder = each;
    if (folder && folder->selectable)
        id = folder->id;
    cache_unlock(account->cache);
    if (!id)
        log_warn("-o trash=%s: no such folder; rm expunges instead", account->trash);
    return id;
}

int fs_account_delete(struct fs_account *account, uint32_t folder_id, uint32_t uid)
{
    struct message_ref ref;
    uint32_t trash_id = trash_folder_id(account), new_uid;

    if (trash_id && trash_id != folder_id)
        return fs_account_move(account, folder_id, uid, trash_id, &new_uid);
    int ret = message_ref_get(account, folder_id, uid, &ref);
    if (ret < 0)
        return ret;
    ret = expunge_uid_retrying(account, ref.mailbox, uid);
    if (ret == 0) {
        if (account->hide_deleted) {
            /* kept on the server, flagged; the listing hides it */
            cache_lock(account->cache);
            struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
            struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
            if (message)
                message->flags |= CACHE_FLAG_DELETED;
            cache_unlock(account->cache);
        } else {
            forget_message(account, folder_id, uid);
        }
    }
    free(ref.mailbox);
    return ret;
}

/* Reads the metadata of one new message into the cache. */
static int learn_uid(struct fs_account *account, uint32_t folder_id, const char *mailbox,
                     uint32_t uid)
{
    struct imap_session *session;
    struct table_builder table = { 0 };
    struct imap_mailbox_state state;
    int ret = fs_session_acquire(account, mailbox, &session);

    if (ret < 0)
        return ret;
    ret = imap_select(session, mailbox, 1, &state);
    if (ret == 0)
        ret = imap_fetch_meta(session, uid, uid, fs_table_collect_meta, &table);
    fs_session_release(account, session);
    if (ret == 0 && table.count == 1) {
        table.count = 0; /* its keywords now belong to the cache */
        learn_message(account, folder_id, state.uidvalidity, &table.messages[0]);
    }
    fs_table_free(&table);
    return ret;
}

int fs_account_append(struct fs_account *account, uint32_t folder_id, const char *flags,
                      const char *data, size_t len, int64_t date, uint32_t *new_uid,
                      uint32_t *uidvalidity)
{
    struct imap_copy_result result = { 0 };
    struct imap_session *session;
    uint32_t uidnext = 0, uidvalidity_before = 0;
    char *mailbox = fs_folder_mailbox(account, folder_id);
    int ret;

    *new_uid = 0;
    *uidvalidity = 0;
    if (!mailbox)
        return -EPERM;
    ret = fs_session_acquire(account, mailbox, &session);
    if (ret == 0) {
        /* UIDNEXT before: where to look if the answer gets lost */
        struct imap_mailbox_state before;
        ret = imap_status(session, mailbox, &before);
        uidnext = before.uidnext;
        uidvalidity_before = before.uidvalidity;
        if (ret == 0) {
            ret = imap_append(session, mailbox, flags, date, data, len, &result);
            if (ret < 0 && ret != -EIO)
                log_warn("APPEND to %s refused: %s", mailbox, imap_session_last_error(session));
        }
        fs_session_release(account, session);
    }
    if (ret == 0 && result.uid == 0) {
        /* no APPENDUID: find it */
        ret = find_appended(account, mailbox, uidnext, data, len, &result.uid);
    } else if (ret == -EIO && uidnext) {
        uint32_t found = 0;
        if (find_appended(account, mailbox, uidnext, data, len, &found) == 0 && found) {
            log_info("APPEND to %s: connection lost, but the server has it as UID %u",
                     mailbox, found);
            result.uid = found;
            ret = 0;
        }
    }
    if (ret == 0) {
        *new_uid = result.uid;
        *uidvalidity = result.uidvalidity ? result.uidvalidity : uidvalidity_before;
        if (!result.uid || learn_uid(account, folder_id, mailbox, result.uid) < 0) {
            cache_lock(account->cache);
            struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
            if (folder)
                folder->listed_at = 0;
            cache_unlock(account->cache);
        }
    }
    free(mailbox);
    return ret;
}

int fs_account_redate(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                      int64_t date, uint32_t *new_uid, uint32_t *new_uidvalidity)
{
    *new_uid = 0;
    *new_uidvalidity = 0;
    if (account->hide_deleted)
        return -ENOTSUP; /* no UIDPLUS: the first copy could only be flagged */

    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
    struct cache_message *message = folder ? cache_folder_find(folder, uid) : NULL;
    char *flags = message ? cache_flags_format(message->flags & ~CACHE_FLAG_DELETED,
                                               message->keywords) : NULL;
    int was_deleted = message && (message->flags & CACHE_FLAG_DELETED);
    cache_unlock(account->cache);
    if (!message)
        return -ENOENT;
    if (!flags)
        return -ENOMEM;

    struct cache_body *body;
    int ret = fs_account_body_continued(account, folder_id, uid, &body);
    if (ret == 0) {
        ret = fs_account_append(account, folder_id, flags, body->data, body->len, date, new_uid,
                                new_uidvalidity);
        fs_account_body_release(account, body);
    }
    free(flags);
    if (ret < 0)
        return ret; /* the first copy stays as it was */

    /* The new copy exists: only now may the first go. */
    struct message_ref ref;
    ret = message_ref_get(account, folder_id, uid, &ref);
    if (ret == 0) {
        ret = expunge_uid_retrying(account, ref.mailbox, uid);
        if (ret < 0) {
            log_warn("%s: UID %u dated again as UID %u, but the first copy could not be "
                     "expunged (%s); removing the new one", ref.mailbox, uid, *new_uid,
                     strerror(-ret));
            int kept = keep_original(account, ref.mailbox, uid, was_deleted, ref.mailbox,
                                     *new_uid);
            if (kept == 1) {
                ret = 0;
            } else if (kept == 0) {
                forget_message(account, folder_id, *new_uid);
                *new_uid = 0;
            }
        }
        if (ret == 0)
            forget_message(account, folder_id, uid);
        free(ref.mailbox);
    } else if (ret == -ENOENT) {
        ret = 0; /* the first copy went meanwhile (another client): one copy is left */
    }
    return ret;
}

int fs_account_store_flags(struct fs_account *account, uint32_t folder_id, uint32_t uid,
                           const char *flags)
{
    struct message_ref ref;
    int ret = message_ref_get(account, folder_id, uid, &ref);

    if (ret < 0)
        return ret;
    ret = store_uid(account, ref.mailbox, uid, "FLAGS", flags);
    if (ret == 0) {
        struct cache_message updated = ref.message;
        updated.flags = 0;
        updated.keywords = NULL;
        char *copy = strdup(flags), *save = NULL;
        for (char *atom = copy ? strtok_r(copy, " ", &save) : NULL; atom;
             atom = strtok_r(NULL, " ", &save))
            cache_flags_add(&updated.flags, &updated.keywords, atom);
        free(copy);
        updated.flags |= ref.message.flags & CACHE_FLAG_RECENT;
        cache_lock(account->cache);
        struct cache_folder *folder = cache_folder_by_id(account->cache, folder_id);
        if (folder && folder->uidvalidity == ref.uidvalidity)
            cache_folder_upsert(folder, &updated);
        else
            free(updated.keywords);
        cache_unlock(account->cache);
    }
    free(ref.mailbox);
    return ret;
}

/* parent's server name + delimiter + child; at the root, the namespace
 * prefix (which ends in its delimiter) + child.  Caller frees. */
static char *join_mailbox(struct fs_account *account, const struct cache_folder *parent,
                          const char *parent_name, const char *child)
{
    char *name = NULL;
    char delimiter = parent->delimiter ? parent->delimiter : account->delimiter;
    if (!parent->parent)
        return asprintf(&name, "%s%s", parent_name, child) < 0 ? NULL : name;
    return asprintf(&name, "%s%c%s", parent_name, delimiter, child) < 0 ? NULL : name;
}

/* The server name of a folder, also for a parent the server did not list
 * (built from its path).  Caller holds the cache lock; caller frees. */
static char *mailbox_of(struct fs_account *account, const struct cache_folder *folder)
{
    if (folder->mailbox)
        return strdup(folder->mailbox);
    if (!folder->parent)
        return strdup(account->namespace_prefix);
    char *parent = mailbox_of(account, folder->parent);
    char *component = fs_name_to_component(folder->name);
    char *encoded = component ? imap_utf7_encode(component) : NULL;
    char *name = parent && encoded ? join_mailbox(account, folder->parent, parent, encoded) : NULL;
    free(parent);
    free(component);
    free(encoded);
    return name;
}

/* The server name for a new child `name` of parent_id.  -EINVAL for a name
 * that cannot be a mailbox level (it holds the delimiter). */
static int child_mailbox(struct fs_account *account, uint32_t parent_id, const char *name,
                         char **out)
{
    int ret = 0;

    *out = NULL;
    char *component = fs_name_to_component(name);
    if (!component)
        return -EINVAL;
    cache_lock(account->cache);
    struct cache_folder *parent = cache_folder_by_id(account->cache, parent_id);
    char delimiter = parent && parent->delimiter ? parent->delimiter : account->delimiter;
    char *prefix = parent ? mailbox_of(account, parent) : NULL;
    cache_unlock(account->cache);
    if (!parent)
        ret = -ENOENT;
    else if (!prefix)
        ret = -ENOMEM;
    else if (strchr(component, delimiter))
        ret = -EINVAL;
    else {
        cache_lock(account->cache);
        parent = cache_folder_by_id(account->cache, parent_id);
        char *encoded = imap_utf7_encode(component);
        *out = parent && encoded ? join_mailbox(account, parent, prefix, encoded) : NULL;
        cache_unlock(account->cache);
        if (!*out)
            ret = parent ? -ENOMEM : -ENOENT;
        free(encoded);
    }
    free(prefix);
    free(component);
    return ret;
}

static int folder_command(struct fs_account *account,
                          int (*command)(struct imap_session *, const char *, const char *),
                          const char *first, const char *second)
{
    struct imap_session *session;
    int ret = fs_session_acquire(account, NULL, &session);
    if (ret < 0)
        return ret;
    ret = command(session, first, second);
    if (ret < 0 && ret != -EIO)
        log_warn("%s: %s", first, imap_session_last_error(session));
    fs_session_release(account, session);
    if (ret == 0 || ret == -EIO) {
        int reload = fs_account_load_folders(account);
        if (ret == 0 && reload < 0)
            ret = reload;
    }
    return ret;
}

static int create_command(struct imap_session *session, const char *mailbox, const char *unused)
{
    (void)unused;
    return imap_create(session, mailbox);
}

static int delete_command(struct imap_session *session, const char *mailbox, const char *unused)
{
    (void)unused;
    return imap_delete(session, mailbox);
}

static int is_inbox(const char *mailbox)
{
    return strcasecmp(mailbox, "INBOX") == 0;
}

int fs_account_create_folder(struct fs_account *account, uint32_t parent_id, const char *name)
{
    char *mailbox;
    int ret = child_mailbox(account, parent_id, name, &mailbox);
    if (ret < 0)
        return ret;
    ret = folder_command(account, create_command, mailbox, NULL);
    free(mailbox);
    return ret;
}

/* The folder `name` in parent_id: its id and whether it has subfolders. */
static int child_folder(struct fs_account *account, uint32_t parent_id, const char *name,
                        uint32_t *id, char **mailbox, int *has_children)
{
    int ret = 0;
    cache_lock(account->cache);
    struct cache_folder *parent = cache_folder_by_id(account->cache, parent_id);
    struct cache_folder *folder = parent ? cache_folder_child(parent, name) : NULL;
    if (!folder) {
        ret = -ENOENT;
    } else {
        *id = folder->id;
        *has_children = folder->children != NULL;
        *mailbox = mailbox_of(account, folder);
        if (!*mailbox)
            ret = -ENOMEM;
    }
    cache_unlock(account->cache);
    return ret;
}

int fs_account_delete_folder(struct fs_account *account, uint32_t parent_id, const char *name)
{
    uint32_t id;
    char *mailbox = NULL;
    int has_children, ret;

    ret = child_folder(account, parent_id, name, &id, &mailbox, &has_children);
    if (ret < 0)
        return ret;
    if (is_inbox(mailbox)) {
        ret = -EPERM;
        goto out;
    }
    if (has_children) {
        ret = -ENOTEMPTY;
        goto out;
    }
    /* Never delete mail: look at the server's current contents first. */
    ret = fs_account_load_folder(account, id, 1);
    if (ret < 0)
        goto out;
    cache_lock(account->cache);
    struct cache_folder *folder = cache_folder_by_id(account->cache, id);
    int listed = folder && folder->listed;
    size_t count = folder ? folder->count : 0;
    cache_unlock(account->cache);
    if (count > 0) {
        ret = -ENOTEMPTY;
        goto out;
    }
    if (!listed) {
        /* a parent the server never listed: it goes when its children go */
        ret = 0;
        goto out;
    }
    ret = folder_command(account, delete_command, mailbox, NULL);
out:
    free(mailbox);
    return ret;
}

int fs_account_rename_folder(struct fs_account *account, uint32_t parent_id, const char *name,
                             uint32_t new_parent_id, const char *new_name)
{
    uint32_t id;
    char *from = NULL, *to = NULL;
    int has_children, ret;

    ret = child_folder(account, parent_id, name, &id, &from, &has_children);
    if (ret == 0)
        ret = child_mailbox(account, new_parent_id, new_name, &to);
    if (ret == 0 && (is_inbox(from) || is_inbox(to)))
        ret = -EPERM;
    if (ret == 0) {
        struct imap_session *session;
        ret = fs_session_acquire(account, NULL, &session);
        if (ret == 0) {
            ret = imap_rename(session, from, to);
            if (ret < 0 && ret != -EIO)
                log_warn("RENAME %s: %s", from, imap_session_last_error(session));
            fs_session_release(account, session);
        }
    }
    if (ret == 0) {
        /* Move it in the cache first, so the LIST that follows finds it at
         * its new path and it keeps its id: the kernel's inode for it (and
         * any process inside it) stays valid. */
        cache_lock(account->cache);
        struct cache_folder *folder = cache_folder_by_id(account->cache, id);
        struct cache_folder *new_parent = cache_folder_by_id(account->cache, new_parent_id);
        if (folder && new_parent)
            cache_folder_move(account->cache, folder, new_parent, new_name, from, to);
        cache_unlock(account->cache);
    }
    if (ret == 0 || ret == -EIO) {
        int reload = fs_account_load_folders(account);
        if (ret == 0 && reload < 0)
            ret = reload;
    }
    free(from);
    free(to);
    return ret;
}
