/* imap/imap.h — the IMAP client's public door: sessions (one connection,
 * one command stream, logged in) and the commands the filesystem needs.
 * Knows nothing of FUSE or of the cache.  A session is used by one thread at
 * a time: its owner (see fs/account.c for the pool).
 *
 * Every function returns 0 or a negative errno.  Server NO/BAD answers are
 * mapped to errno in one place (imap_status_errno); a broken connection gives
 * -EIO and marks the session broken (imap_session_broken), after which the
 * owner closes it and opens another. */
#ifndef IMAP_IMAP_H
#define IMAP_IMAP_H

#include <stddef.h>
#include <stdint.h>

#include "imap/parser.h"

enum imap_tls_mode {
    IMAP_TLS_IMPLICIT,  /* imaps:// */
    IMAP_TLS_STARTTLS,  /* imap://, STARTTLS required */
    IMAP_TLS_NONE,      /* imap:// with -o tls=none: plaintext on purpose */
};

enum imap_auth {
    IMAP_AUTH_PASSWORD,     /* LOGIN, or AUTHENTICATE PLAIN where LOGINDISABLED */
    IMAP_AUTH_XOAUTH2,      /* Google's precursor of OAUTHBEARER */
    IMAP_AUTH_OAUTHBEARER,  /* RFC 7628 */
};

struct imap_config {
    const char *host;
    unsigned port;
    const char *user;
    const char *password;   /* the password or OAuth2 access token; never logged */
    enum imap_auth auth;
    enum imap_tls_mode tls;
    const char *cafile;     /* NULL: the system store */
    int tls_verify;         /* 0 only with -o tls_verify=no */
    int timeout;            /* seconds for connect and for any one wait */
};

struct imap_session;

/* Connects, sets up TLS, logs in.  On failure returns -errno and writes one
 * human sentence into err (what went wrong and what to do). */
int imap_session_open(const struct imap_config *config, struct imap_session **out,
                      char *err, size_t errlen);
/* Sends LOGOUT if the session still works, then frees it. */
void imap_session_close(struct imap_session *session);
/* Sends LOGOUT without waiting for the answer, then frees the session: for
 * a connection that may be dead without knowing it. */
void imap_session_drop(struct imap_session *session);
int imap_session_broken(const struct imap_session *session);
/* Seconds since the session last sent a command or read a response. */
double imap_session_idle_seconds(const struct imap_session *session);
/* For a session that sat idle in a pool: nonzero if it still looks usable.
 * An idle connection has nothing to say; if its socket is readable, the
 * server closed it, reset it or sent BYE (a restart, an idle timeout). */
int imap_session_idle_ok(const struct imap_session *session);
/* Nonzero if the server advertised the capability (case-insensitive). */
int imap_session_has_capability(const struct imap_session *session, const char *name);

/* The number after "NAME=" in the capability list (APPENDLIMIT=35651584),
 * 0 and *value set, or -ENOENT. */
int imap_session_capability_value(const struct imap_session *session, const char *name,
                                  uint64_t *value);

/* The personal namespace (RFC 2342): its prefix ("" or "INBOX.") and
 * delimiter.  *prefix is malloc'd; "" without NAMESPACE. */
int imap_namespace_personal(struct imap_session *session, char **prefix, char *delimiter);

/* Unsolicited data (EXISTS, EXPUNGE, FETCH, VANISHED ...) that arrives while
 * a command runs and is not that command's own answer. */
typedef void imap_unsolicited_fn(void *context, struct imap_session *session,
                                 const struct imap_response *response);
void imap_session_set_unsolicited(struct imap_session *session, imap_unsolicited_fn *fn,
                                  void *context);

/* Maps a tagged NO/BAD (with its response code) to an errno. */
int imap_status_errno(const struct imap_response *response);

/* --- LIST --- */
#define IMAP_MAILBOX_NOSELECT 0x1u   /* \Noselect or \NonExistent */
#define IMAP_MAILBOX_NOINFERIORS 0x2u
#define IMAP_MAILBOX_TRASH 0x4u      /* SPECIAL-USE \\Trash */

struct imap_mailbox {
    char *name;         /* as sent by the server (modified UTF-7) */
    char delimiter;     /* 0 if NIL */
    unsigned flags;     /* IMAP_MAILBOX_* */
};

/* LIST "" "*".  *out is a malloc'd array; free with imap_mailboxes_free. */
int imap_list(struct imap_session *session, struct imap_mailbox **out, size_t *count);
void imap_mailboxes_free(struct imap_mailbox *mailboxes, size_t count);

/* --- SELECT / EXAMINE --- */
struct imap_mailbox_state {
    uint32_t uidvalidity;
    uint32_t uidnext;
    uint32_t exists;
    uint64_t highestmodseq; /* 0 without CONDSTORE */
};

/* Selects (readonly: EXAMINE) the mailbox unless it already is, in a mode at
 * least as strong.  state may be NULL; it is filled from the last select. */
int imap_select(struct imap_session *session, const char *mailbox, int readonly,
                struct imap_mailbox_state *state);
/* Always sends EXAMINE/SELECT, so state is the server's current one. */
int imap_select_fresh(struct imap_session *session, const char *mailbox, int readonly,
                      struct imap_mailbox_state *state);
/* The selected mailbox's name, or NULL. */
const char *imap_session_selected(const struct imap_session *session);
/* 1 when the selected mailbox was opened read-only (EXAMINE). */
int imap_session_selected_readonly(const struct imap_session *session);

/* --- FETCH --- */

/* Called once per message of a metadata fetch.  flags is the FLAGS list
 * value (a LIST of atoms).  Return 0 to go on, a negative errno to stop
 * (the command still completes on the wire). */
typedef int imap_meta_fn(void *context, uint32_t uid, uint64_t size, int64_t internaldate,
                         const struct imap_value *flags);

/* UID FETCH first:last (UID RFC822.SIZE INTERNALDATE FLAGS); last 0 = "*". */
int imap_fetch_meta(struct imap_session *session, uint32_t first, uint32_t last,
                    imap_meta_fn *fn, void *context);

/* Called once per message of a flags fetch. */
typedef int imap_flags_fn(void *context, uint32_t uid, const struct imap_value *flags);

/* UID FETCH first:last (UID FLAGS), with (CHANGEDSINCE modseq) when
 * changedsince is not 0 (CONDSTORE): only what changed since then. */
int imap_fetch_flags(struct imap_session *session, uint32_t first, uint32_t last,
                     uint64_t changedsince, imap_flags_fn *fn, void *context);

/* The same with QRESYNC's VANISHED modifier: also the UIDs in first:last
 * expunged since changedsince (VANISHED (EARLIER)), as a sorted malloc'd
 * array, which may name UIDs this client never saw.  -EINVAL unless the
 * session has QRESYNC enabled (imap_session_qresync) and changedsince is
 * set. */
int imap_fetch_changes(struct imap_session *session, uint32_t first, uint32_t last,
                       uint64_t changedsince, imap_flags_fn *fn, void *context,
                       uint32_t **vanished, size_t *vanished_count);
/* Whether the server enabled QRESYNC for this session at login. */
int imap_session_qresync(const struct imap_session *session);

/* All UIDs of the selected mailbox, ascending (UID SEARCH ALL; the compact
 * ESEARCH form where offered).  *uids is malloc'd; caller frees. */
int imap_search_all(struct imap_session *session, uint32_t **uids, size_t *count);

/* UID SEARCH of the selected mailbox with user-given criteria in UTF-8
 * ("FROM carl SUBJECT notmuch").  Words with 8-bit bytes are sent as
 * literals with CHARSET UTF-8; "gmail:..." goes to X-GM-RAW where the server
 * offers X-GM-EXT-1.  -EINVAL when the server rejects the criteria (its text
 * is in imap_session_last_error); criteria with CR, LF or NUL are refused. */
int imap_uid_search(struct imap_session *session, const char *criteria, uint32_t **uids,
                    size_t *count);

/* Parses a sequence set of UIDs ("1:5,7,9:12") into a sorted malloc'd array.
 * -EPROTO for anything else (including "*"); at most max_count UIDs. */
int imap_parse_uid_set(const char *set, size_t max_count, uint32_t **uids, size_t *count);

/* Called once per message of an envelope fetch, with its Date: header,
 * subject and first From: address ("Name <box@host>"), decoded to UTF-8;
 * "" for what the message lacks. */
typedef int imap_envelope_fn(void *context, uint32_t uid, const char *date, const char *subject,
                             const char *from);

/* UID FETCH first:last (UID ENVELOPE) of the selected mailbox; last 0 = "*". */
int imap_fetch_envelopes(struct imap_session *session, uint32_t first, uint32_t last,
                         imap_envelope_fn *fn, void *context);

/* Called once per message body; the function takes over body (malloc'd).
 * Return 0, or a negative errno to stop. */
typedef int imap_body_fn(void *context, uint32_t uid, char *body, size_t len);

/* UID FETCH uid-set (UID BODY.PEEK[]) for the given UIDs (any order; sent as
 * a compact set).  Never sets \Seen. */
int imap_fetch_bodies(struct imap_session *session, const uint32_t *uids, size_t count,
                      imap_body_fn *fn, void *context);

/* Parses an INTERNALDATE ("17-Jul-1996 02:44:25 -0700") to seconds since
 * the epoch; 0 or -EINVAL. */
int imap_parse_internaldate(const char *text, int64_t *out);

/* Writes a compact UID set ("1:5,7,9:12") for sorted unique uids into buf;
 * returns the length, or -ENOSPC. */
int imap_format_uid_set(char *buf, size_t buflen, const uint32_t *uids, size_t count);


/* --- changes (the selected mailbox must be selected read-write) --- */

/* Result of a copy or move: where the message went.  uid 0 when the server
 * did not say (no UIDPLUS): the caller finds it by listing. */
struct imap_copy_result {
    uint32_t uidvalidity;
    uint32_t uid;
};

/* UID MOVE uid mailbox (RFC 6851).  -ENOTSUP without MOVE.  -ENOENT when the
 * source UID no longer exists (someone else moved or expunged it). */
int imap_uid_move(struct imap_session *session, uint32_t uid, const char *mailbox,
                  struct imap_copy_result *result);
/* UID COPY uid mailbox.  -ENOENT when the source UID no longer exists. */
int imap_uid_copy(struct imap_session *session, uint32_t uid, const char *mailbox,
                  struct imap_copy_result *result);
/* UID STORE uid FLAGS.SILENT / +FLAGS.SILENT / -FLAGS.SILENT (flag list);
 * how is "FLAGS", "+FLAGS" or "-FLAGS"; flags is e.g. "\\Seen $Work" (atoms
 * separated by single spaces, already validated). */
int imap_uid_store(struct imap_session *session, uint32_t uid, const char *how,
                   const char *flags);
/* UID EXPUNGE uid (UIDPLUS): expunges that message only.  -ENOTSUP without
 * UIDPLUS: a plain EXPUNGE would also purge what other clients flagged. */
int imap_uid_expunge(struct imap_session *session, uint32_t uid);

/* APPEND mailbox (flags) "date" {len}: data must already use CRLF line ends.
 * date < 0: let the server use now.  result->uid from APPENDUID, 0 without
 * UIDPLUS. */
int imap_append(struct imap_session *session, const char *mailbox, const char *flags,
                int64_t date, const char *data, size_t len, struct imap_copy_result *result);

int imap_create(struct imap_session *session, const char *mailbox);
int imap_delete(struct imap_session *session, const char *mailbox);
int imap_rename(struct imap_session *session, const char *from, const char *to);
/* Forget the selection (UNSELECT or CLOSE-free EXAMINE trick not needed):
 * used before DELETE/RENAME of the selected mailbox. */
void imap_session_forget_selected(struct imap_session *session);

/* STATUS mailbox (MESSAGES UIDNEXT UIDVALIDITY [HIGHESTMODSEQ]): a cheap
 * look at a mailbox without selecting it.  exists = MESSAGES. */
int imap_status(struct imap_session *session, const char *mailbox,
                struct imap_mailbox_state *state);

/* GETQUOTAROOT mailbox: the STORAGE resource of its first quota root, in
 * KiB (RFC 9208 units of 1024 octets).  -ENOTSUP without QUOTA or when no
 * STORAGE limit is set. */
int imap_quota_storage(struct imap_session *session, const char *mailbox, uint64_t *used_kib,
                       uint64_t *limit_kib);

/* The text of the last tagged NO/BAD this session received ("" if none), for
 * error messages in the log. */
const char *imap_session_last_error(const struct imap_session *session);

/* --- push: NOTIFY (RFC 5465) and IDLE (RFC 2177) ---
 * A session used for push belongs to one watcher thread.  What the server
 * pushes reaches the unsolicited callback (imap_session_set_unsolicited);
 * imap_response_change says what it means. */

/* NOOP: a keepalive, and a chance for the server to speak. */
int imap_noop(struct imap_session *session);
/* NOTIFY SET for every personal mailbox: message and flag changes, and
 * mailboxes created, deleted or renamed.  Only where the server offers NOTIFY. */
int imap_notify_set(struct imap_session *session);
/* IDLE on the selected mailbox: returns once the server said "+ idling".
 * No other command may run on the session until imap_idle_end. */
int imap_idle_begin(struct imap_session *session);
/* DONE, and reads to the IDLE's tagged answer (0 if not idling). */
int imap_idle_end(struct imap_session *session);
/* Waits up to timeout_ms (-1: no limit) for data the server sends of its own
 * accord, hands each response to the unsolicited callback, and returns how
 * many there were once nothing more is waiting: 0 when the time ran out or
 * wake_fd (ignored if < 0) became readable, which this never reads.  A
 * negative errno when the connection broke or the server said BYE. */
int imap_session_wait(struct imap_session *session, int wake_fd, int timeout_ms);

enum imap_change {
    IMAP_CHANGE_NONE,
    IMAP_CHANGE_MAILBOX,    /* NOTIFY's STATUS for a named, not selected mailbox */
    IMAP_CHANGE_SELECTED,   /* EXISTS, EXPUNGE, FETCH or VANISHED: the selected mailbox */
    IMAP_CHANGE_FOLDERS,    /* LIST: a mailbox was created, deleted or renamed */
    IMAP_CHANGE_OVERFLOW,   /* NOTIFICATIONOVERFLOW: notifications stopped; anything may have changed */
};
/* What an unsolicited response says changed.  For IMAP_CHANGE_MAILBOX,
 * *mailbox is its name as the server sent it (pointing into response). */
enum imap_change imap_response_change(const struct imap_response *response,
                                      const char **mailbox);

#endif
