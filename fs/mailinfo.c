/* fs/mailinfo.c — read-only xattrs user.mail.subject, user.mail.from and
 * user.mail.date from each message's ENVELOPE, so scripts and file managers
 * can show who and what without reading the file.
 *
 * The envelopes of a folder are fetched in one command (UID FETCH 1:*
 * (UID ENVELOPE)) the first time any of them is asked for, not with every
 * listing: ls, grep and find never pay for them, and the memory they take
 * (a subject and an address per message) is spent only on folders someone
 * looks at this way.  A message that came later than the last fetch is
 * fetched on its own when asked for. */
#include "fs/fs.h"
#include "imap/log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REFETCH_SECONDS 5.0

struct mail_info {
    struct {
        uint32_t folder_id, uidvalidity, uid;
    } key;
    char *date, *subject, *from;
    UT_hash_handle hh;
};

struct folder_fetch {
    uint32_t folder_id;
    double fetched_at;
    UT_hash_handle hh;
};

struct fs_mailinfo {
    pthread_mutex_t lock;
    struct mail_info *table;        /* protected by lock */
    struct folder_fetch *fetched;   /* protected by lock */
};

struct fs_mailinfo *fs_mailinfo_new(void)
{
    struct fs_mailinfo *info = calloc(1, sizeof(*info));
    if (info)
        pthread_mutex_init(&info->lock, NULL);
    return info;
}

static void entry_free(struct mail_info *entry)
{
    free(entry->date);
    free(entry->subject);
    free(entry->from);
    free(entry);
}

void fs_mailinfo_free(struct fs_mailinfo *info)
{
    struct mail_info *entry, *tmp;
    struct folder_fetch *fetch, *tmp_fetch;

    if (!info)
        return;
    HASH_ITER(hh, info->table, entry, tmp) {
        HASH_DEL(info->table, entry);
        entry_free(entry);
    }
    HASH_ITER(hh, info->fetched, fetch, tmp_fetch) {
        HASH_DEL(info->fetched, fetch);
        free(fetch);
    }
    pthread_mutex_destroy(&info->lock);
    free(info);
}

static struct mail_info *find(struct fs_mailinfo *info, uint32_t folder_id, uint32_t uidvalidity,
                              uint32_t uid)
{
    struct mail_info probe, *found;
    memset(&probe, 0, sizeof(probe));
    probe.key.folder_id = folder_id;
    probe.key.uidvalidity = uidvalidity;
    probe.key.uid = uid;
    HASH_FIND(hh, info->table, &probe.key, sizeof(probe.key), found);
    return found;
}

struct fill {
    struct fs_mailinfo *info;
    uint32_t folder_id, uidvalidity;
};

static int remember(void *context, uint32_t uid, const char *date, const char *subject,
                    const char *from)
{
    struct fill *fill = context;
    struct mail_info *entry = calloc(1, sizeof(*entry));

    if (!entry)
        return -ENOMEM;
    entry->key.folder_id = fill->folder_id;
    entry->key.uidvalidity = fill->uidvalidity;
    entry->key.uid = uid;
    entry->date = strdup(date);
    entry->subject = strdup(subject);
    entry->from = strdup(from);
    if (!entry->date || !entry->subject || !entry->from) {
        entry_free(entry);
        return -ENOMEM;
    }
    pthread_mutex_lock(&fill->info->lock);
    struct mail_info *old = find(fill->info, fill->folder_id, fill->uidvalidity, uid);
    if (old) {
        HASH_DEL(fill->info->table, old);
        entry_free(old);
    }
    HASH_ADD(hh, fill->info->table, key, sizeof(entry->key), entry);
    pthread_mutex_unlock(&fill->info->lock);
    return 0;
}

/* The value of one user.mail.* attribute ("subject", "from", "date");
 * malloc'd.  -ENODATA when the server gave no envelope for it. */
int fs_mailinfo_get(struct fs_account *account, uint32_t folder_id, uint32_t uidvalidity,
                    uint32_t uid, const char *field, char **value)
{
    struct fs_mailinfo *info = fs_account_mailinfo(account);

    *value = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        pthread_mutex_lock(&info->lock);
        struct mail_info *entry = find(info, folder_id, uidvalidity, uid);
        if (entry) {
            const char *text = strcmp(field, "subject") == 0 ? entry->subject
                               : strcmp(field, "from") == 0  ? entry->from
                                                             : entry->date;
            *value = strdup(text);
            pthread_mutex_unlock(&info->lock);
            return *value ? 0 : -ENOMEM;
        }
        struct folder_fetch *fetch;
        HASH_FIND(hh, info->fetched, &folder_id, sizeof(folder_id), fetch);
        double now = now_monotonic();
        /* The whole folder the first time (and again after a while); a
         * message that came since then, just itself. */
        int whole = !fetch || now - fetch->fetched_at > REFETCH_SECONDS;
        if (attempt == 0 && whole) {
            if (!fetch && (fetch = calloc(1, sizeof(*fetch)))) {
                fetch->folder_id = folder_id;
                HASH_ADD(hh, info->fetched, folder_id, sizeof(fetch->folder_id), fetch);
            }
            if (fetch)
                fetch->fetched_at = now;
        }
        pthread_mutex_unlock(&info->lock);
        if (attempt > 0)
            break;
        struct fill fill = { info, folder_id, uidvalidity };
        int ret = fs_account_fetch_envelopes(account, folder_id, uidvalidity, whole ? 1 : uid,
                                             whole ? 0 : uid, remember, &fill);
        if (ret < 0)
            return ret;
    }
    return -ENODATA;
}
