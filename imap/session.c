/* imap/session.c — one logged-in IMAP connection and the commands imapfs uses.
 *
 * A session is a strict request/response stream owned by one thread at a
 * time: send a tagged command, read responses until that tag completes.
 * Untagged responses that belong to the running command (LIST, FETCH of a
 * UID we asked for, SELECT data) go to the command's handler; everything else
 * (another client's EXPUNGE, unsolicited FETCH FLAGS, EXISTS) goes to the
 * unsolicited callback so the cache can learn from it.
 *
 * Only UID commands are used: sequence numbers shift under concurrent
 * expunges, UIDs do not.  Commands that name several messages (a batch of
 * bodies) send one UID FETCH with a compact set, so a scan costs one round
 * trip per batch, not per message.
 *
 * Credentials: LOGIN (or AUTHENTICATE PLAIN where LOGINDISABLED) is only ever
 * sent after TLS is up, unless the user chose -o tls=none; the debug trace
 * prints "<redacted>" in their place. */
#include "imap/imap.h"
#include "imap/imap_p.h"
#include "imap/log.h"
#include "imap/text.h"

#include <ctype.h>
#include <poll.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/evp.h>

#define READ_CHUNK (256 * 1024)

struct imap_session {
    struct imap_conn conn;
    struct imap_parser *parser;
    char *rbuf;                 /* READ_CHUNK bytes read but not yet parsed */
    size_t rpos, rlen;
    unsigned next_tag;
    char *capabilities;         /* " CAP1 CAP2 " upper-cased; owned */
    int broken;
    char *selected;             /* selected mailbox name, or NULL; owned */
    int selected_readonly;
    struct imap_mailbox_state state; /* of the selected mailbox */
    uint32_t view_uidnext;      /* every UID below is in this session's view of it */
    imap_unsolicited_fn *unsolicited;
    void *unsolicited_context;
    const char *host;           /* for messages; points into the config */
    char last_error[256];       /* text of the last tagged NO/BAD */
    char idle_tag[16];          /* the running IDLE command's tag; "" when not idling */
    int logging_out;            /* LOGOUT sent: its BYE is no news */
    int qresync;                /* ENABLE QRESYNC accepted (RFC 7162): expunges come as
                                   VANISHED, and a flags fetch can ask for them */
    struct timespec last_io;    /* when a command was sent or a response read */
};

/* A command being built: text with literals.  A synchronizing literal
 * "{n}\r\n" must wait for the server's "+" before its bytes; waits[] records
 * where those pauses fall.  With LITERAL+ the literals are "{n+}" and the
 * whole command goes in one write. */
struct command {
    char *buf;
    size_t len, cap;
    size_t waits[4];
    int nwaits;
    int redact_from;            /* trace shows the text up to here, then <redacted>; -1 none */
    const char *on_challenge;   /* AUTHENTICATE: what to answer a "+" that comes after the
                                   whole command was sent (a SASL error challenge) */
    int failed;                 /* -ENOMEM or -E2BIG while building */
};

typedef int response_handler(void *context, struct imap_response *response);

/* ---------------------------------------------------------------- helpers */

static void command_reserve(struct command *cmd, size_t more)
{
    if (cmd->failed)
        return;
    if (cmd->len + more + 1 > cmd->cap) {
        size_t cap = cmd->cap ? cmd->cap : 256;
        while (cap < cmd->len + more + 1)
            cap *= 2;
        char *grown = realloc(cmd->buf, cap);
        if (!grown) {
            cmd->failed = -ENOMEM;
            return;
        }
        cmd->buf = grown;
        cmd->cap = cap;
    }
}

static void command_add(struct command *cmd, const char *bytes, size_t len)
{
    command_reserve(cmd, len);
    if (cmd->failed)
        return;
    memcpy(cmd->buf + cmd->len, bytes, len);
    cmd->len += len;
    cmd->buf[cmd->len] = '\0';
}

static void command_addf(struct command *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void command_addf(struct command *cmd, const char *fmt, ...)
{
    char small[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(small)) {
        cmd->failed = -E2BIG;
        return;
    }
    command_add(cmd, small, (size_t)n);
}

/* Adds s as a quoted string, or as a literal when it cannot be quoted. */
static void command_add_string(struct imap_session *session, struct command *cmd,
                               const char *s, size_t len)
{
    char quoted[2100];

    if (strlen(s) == len && imap_quote(quoted, sizeof(quoted), s) >= 0) {
        command_add(cmd, quoted, strlen(quoted));
        return;
    }
    int plus = imap_session_has_capability(session, "LITERAL+");
    command_addf(cmd, plus ? "{%zu+}\r\n" : "{%zu}\r\n", len);
    if (!plus) {
        if (cmd->nwaits == (int)(sizeof(cmd->waits) / sizeof(cmd->waits[0]))) {
            cmd->failed = -E2BIG;
            return;
        }
        cmd->waits[cmd->nwaits++] = cmd->len;
    }
    command_add(cmd, s, len);
}

static int fail(struct imap_session *session, int err)
{
    if (err == -EIO || err == -ETIMEDOUT || err == -EPROTO || err == -EMSGSIZE ||
        err == -ECONNRESET || err == -ENOMEM) {
        if (!session->broken && !session->logging_out)
            log_warn("connection to %s lost: %s", session->host, strerror(-err));
        session->broken = 1;
        return -EIO;
    }
    return err;
}

/* A short, safe rendering of a response for the -d trace: literals show as
 * their size only (message bodies do not belong in a log). */
static void describe_value(const struct imap_value *value, char *out, size_t outlen, size_t *pos)
{
    if (*pos + 8 >= outlen)
        return;
    switch (value->kind) {
    case IMAP_VALUE_LIST:
        out[(*pos)++] = '(';
        for (size_t i = 0; i < value->count; i++) {
            if (i)
                out[(*pos)++] = ' ';
            describe_value(&value->items[i], out, outlen, pos);
            if (*pos + 8 >= outlen)
                return;
        }
        out[(*pos)++] = ')';
        break;
    case IMAP_VALUE_NIL:
        *pos += (size_t)snprintf(out + *pos, outlen - *pos, "NIL");
        break;
    case IMAP_VALUE_STRING:
        if (value->is_literal || value->len > 80) {
            *pos += (size_t)snprintf(out + *pos, outlen - *pos, "{%zu bytes}", value->len);
            break;
        }
        /* fall through */
    default: {
        int n = snprintf(out + *pos, outlen - *pos,
                         value->kind == IMAP_VALUE_STRING ? "\"%s\"" : "%s", value->str);
        if (n > 0)
            *pos += (size_t)n;
    }
    }
    if (*pos >= outlen)
        *pos = outlen - 1;
}

static void trace_response(const struct imap_response *response)
{
    char line[400];
    size_t pos = 0;

    if (!imap_log_enabled(IMAP_LOG_DEBUG))
        return;
    if (response->kind == IMAP_RESP_CONTINUATION) {
        log_debug("S: + %.200s", response->text);
        return;
    }
    if (response->status != IMAP_STATUS_NONE) {
        static const char *const names[] = { "", "OK", "NO", "BAD", "BYE", "PREAUTH" };
        log_debug("S: %s %s %s%s%s%.200s", response->kind == IMAP_RESP_TAGGED ? response->tag : "*",
                  names[response->status], response->code ? "[" : "",
                  response->code ? response->code : "", response->code ? "] " : "",
                  response->text);
        return;
    }
    line[0] = '\0';
    for (size_t i = 0; i < response->count && pos + 8 < sizeof(line); i++) {
        if (i)
            line[pos++] = ' ';
        describe_value(&response->items[i], line, sizeof(line), &pos);
    }
    line[pos < sizeof(line) ? pos : sizeof(line) - 1] = '\0';
    log_debug("S: * %s", line);
}

static void trace_command(const struct command *cmd)
{
    if (!imap_log_enabled(IMAP_LOG_DEBUG))
        return;
    size_t shown = cmd->redact_from >= 0 ? (size_t)cmd->redact_from : cmd->len;
    if (shown > 300)
        shown = 300;
    while (shown > 0 && (cmd->buf[shown - 1] == '\n' || cmd->buf[shown - 1] == '\r'))
        shown--;
    /* never print literal bytes: stop at the first literal's CRLF */
    const char *crlf = memchr(cmd->buf, '\n', shown);
    if (crlf)
        shown = (size_t)(crlf - cmd->buf);
    log_debug("C: %.*s%s", (int)shown, cmd->buf,
              cmd->redact_from >= 0 ? " <redacted>" : (crlf ? " ..." : ""));
}

/* Reads the next complete response. */
static int read_response(struct imap_session *session, struct imap_response **out)
{
    *out = NULL;
    if (session->broken)
        return -EIO;
    for (;;) {
        if (session->rpos < session->rlen) {
            ssize_t used = imap_parser_feed(session->parser, session->rbuf + session->rpos,
                                            session->rlen - session->rpos, out);
            if (used < 0) {
                log_warn("malformed response from %s: %s", session->host, strerror((int)-used));
                return fail(session, (int)used);
            }
            session->rpos += (size_t)used;
            if (*out) {
                trace_response(*out);
                clock_gettime(CLOCK_MONOTONIC, &session->last_io);
                return 0;
            }
        }
        session->rpos = session->rlen = 0;
        ssize_t got = imap_conn_read(&session->conn, session->rbuf, READ_CHUNK);
        if (got == 0)
            return fail(session, -ECONNRESET);
        if (got < 0)
            return fail(session, (int)got);
        session->rlen = (size_t)got;
    }
}

static void set_capabilities(struct imap_session *session, const char *list)
{
    size_t len = strlen(list);
    char *caps = malloc(len + 3);

    if (!caps)
        return;
    caps[0] = ' ';
    for (size_t i = 0; i < len; i++)
        caps[i + 1] = (char)toupper((unsigned char)list[i]);
    caps[len + 1] = ' ';
    caps[len + 2] = '\0';
    free(session->capabilities);
    session->capabilities = caps;
}

/* Capabilities arrive as a CAPABILITY data response or a [CAPABILITY ...]
 * code; other session-wide facts (BYE) are handled here too. */
static int session_absorb(struct imap_session *session, const struct imap_response *response)
{
    if (response->code && strncasecmp(response->code, "CAPABILITY ", 11) == 0) {
        set_capabilities(session, response->code + 11);
    }
    if (response->status == IMAP_STATUS_NONE && response->count >= 1 &&
        imap_value_is_atom(&response->items[0], "CAPABILITY")) {
        struct command list = { .redact_from = -1 };
        for (size_t i = 1; i < response->count; i++) {
            if (response->items[i].kind != IMAP_VALUE_ATOM)
                continue;
            if (list.len)
                command_add(&list, " ", 1);
            command_add(&list, response->items[i].str, response->items[i].len);
        }
        if (!list.failed && list.buf)
            set_capabilities(session, list.buf);
        free(list.buf);
        return 1;
    }
    return 0;
}

/* Sends cmd under a fresh tag and reads until that tag completes.  handler
 * sees each untagged response first; returning 1 means it was its own. */
static int run_command(struct imap_session *session, struct command *cmd,
                       response_handler *handler, void *context,
                       struct imap_response **tagged_out)
{
    char tag[16];
    struct command full = { .redact_from = -1 };
    int ret, wait_index = 0;
    size_t sent = 0;

    if (tagged_out)
        *tagged_out = NULL;
    if (session->broken)
        return -EIO;
    if (cmd->failed)
        return cmd->failed;
    snprintf(tag, sizeof(tag), "A%u", ++session->next_tag);
    /* Prefix the tag; shift the recorded pauses and redaction point. */
    command_addf(&full, "%s ", tag);
    size_t shift = full.len;
    command_add(&full, cmd->buf, cmd->len);
    command_add(&full, "\r\n", 2);
    if (full.failed) {
        free(full.buf);
        return full.failed;
    }
    full.redact_from = cmd->redact_from >= 0 ? cmd->redact_from + (int)shift : -1;
    trace_command(&full);
    clock_gettime(CLOCK_MONOTONIC, &session->last_io);

    for (;;) {
        size_t until = wait_index < cmd->nwaits ? cmd->waits[wait_index] + shift : full.len;
        ret = imap_conn_write(&session->conn, full.buf + sent, until - sent);
        if (ret < 0) {
            free(full.buf);
            return fail(session, ret);
        }
        sent = until;
        if (sent == full.len)
            break;
        /* A synchronizing literal: the server must say "+" first. */
        struct imap_response *response;
        for (;;) {
            ret = read_response(session, &response);
            if (ret < 0) {
                free(full.buf);
                return ret;
            }
            if (response->kind == IMAP_RESP_CONTINUATION)
                break;
            if (response->kind == IMAP_RESP_TAGGED && strcmp(response->tag, tag) == 0) {
                /* refused before the literal was sent */
                ret = imap_status_errno(response);
                if (tagged_out)
                    *tagged_out = response;
                else
                    imap_response_free(response);
                free(full.buf);
                return ret;
            }
            if (!session_absorb(session, response) && session->unsolicited)
                session->unsolicited(session->unsolicited_context, session, response);
            imap_response_free(response);
        }
        imap_response_free(response);
        wait_index++;
    }
    free(full.buf);

    for (;;) {
        struct imap_response *response;
        ret = read_response(session, &response);
        if (ret < 0)
            return ret;
        if (response->kind == IMAP_RESP_TAGGED) {
            if (strcmp(response->tag, tag) != 0) {
                log_warn("unexpected tag %s from %s", response->tag, session->host);
                imap_response_free(response);
                return fail(session, -EPROTO);
            }
            session_absorb(session, response);
            ret = response->status == IMAP_STATUS_OK ? 0 : imap_status_errno(response);
            if (ret < 0 && response->status != IMAP_STATUS_OK) {
                snprintf(session->last_error, sizeof(session->last_error), "%s%s%s%s",
                         response->code ? "[" : "", response->code ? response->code : "",
                         response->code ? "] " : "", response->text);
                log_debug("%s failed: %s", tag, session->last_error);
            }
            if (tagged_out)
                *tagged_out = response;
            else
                imap_response_free(response);
            return ret;
        }
        if (response->kind == IMAP_RESP_CONTINUATION) {
            imap_response_free(response);
            if (!cmd->on_challenge)
                return fail(session, -EPROTO); /* nobody asked: a confused server */
            /* A SASL mechanism's error challenge: answer, then the NO follows. */
            ret = imap_conn_write(&session->conn, cmd->on_challenge, strlen(cmd->on_challenge));
            if (ret < 0)
                return fail(session, ret);
            cmd->on_challenge = NULL;
            continue;
        }
        if (response->status == IMAP_STATUS_BYE) {
            if (!session->logging_out)
                log_warn("%s closed the connection: %s", session->host, response->text);
            imap_response_free(response);
            return fail(session, -ECONNRESET);
        }
        int mine = handler ? handler(context, response) : 0;
        if (mine < 0) {
            /* keep reading to the tag; remember the first error */
            imap_response_free(response);
            struct imap_response *rest = NULL;
            int ret2;
            do {
                imap_response_free(rest);
                ret2 = read_response(session, &rest);
            } while (ret2 == 0 && !(rest->kind == IMAP_RESP_TAGGED && strcmp(rest->tag, tag) == 0));
            imap_response_free(rest);
            return ret2 < 0 ? ret2 : mine;
        }
        if (!mine && !session_absorb(session, response) && session->unsolicited)
            session->unsolicited(session->unsolicited_context, session, response);
        imap_response_free(response);
    }
}

static int simple_command_with(struct imap_session *session, const char *text,
                               response_handler *handler, void *context)
{
    struct command cmd = { .redact_from = -1 };
    command_add(&cmd, text, strlen(text));
    int ret = run_command(session, &cmd, handler, context, NULL);
    free(cmd.buf);
    return ret;
}

static int simple_command(struct imap_session *session, const char *text)
{
    return simple_command_with(session, text, NULL, NULL);
}

/* A server acts on the messages in the session's view of the selected
 * mailbox, which it brings up to date between commands (Dovecot: after
 * each).  A UID FETCH, STORE, EXPUNGE, COPY or MOVE of a message another
 * session added since then would match nothing and still answer OK; a NOOP
 * first brings it into view. */
static int bring_into_view(struct imap_session *session, uint32_t uid)
{
    if (!session->selected || uid < session->view_uidnext)
        return 0;
    int ret = simple_command(session, "NOOP");
    if (ret == 0 && uid < UINT32_MAX)
        session->view_uidnext = uid + 1;
    return ret;
}

/* "* ENABLED QRESYNC": the server turned it on for this session. */
static int enabled_handler(void *context, struct imap_response *response)
{
    struct imap_session *session = context;

    if (response->status != IMAP_STATUS_NONE || response->count < 1 ||
        !imap_value_is_atom(&response->items[0], "ENABLED"))
        return 0;
    for (size_t i = 1; i < response->count; i++)
        if (imap_value_is_atom(&response->items[i], "QRESYNC"))
            session->qresync = 1;
    return 1;
}

int imap_status_errno(const struct imap_response *response)
{
    static const struct { const char *code; int err; } codes[] = {
        { "NONEXISTENT", ENOENT },  { "TRYCREATE", ENOENT },
        { "ALREADYEXISTS", EEXIST }, { "OVERQUOTA", EDQUOT },
        { "NOPERM", EACCES },        { "AUTHENTICATIONFAILED", EACCES },
        { "AUTHORIZATIONFAILED", EACCES }, { "INUSE", EBUSY },
        { "LIMIT", EFBIG },          { "TOOBIG", EFBIG },
        { "CANNOT", EPERM },         { "HASCHILDREN", ENOTEMPTY },
        { "EXPUNGEISSUED", ENOENT }, { "UNAVAILABLE", EAGAIN },
        { "SERVERBUG", EIO },        { "READ-ONLY", EROFS },
    };

    if (response->status == IMAP_STATUS_OK)
        return 0;
    if (response->status == IMAP_STATUS_BAD)
        return -EINVAL;
    if (response->code) {
        for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
            size_t n = strlen(codes[i].code);
            if (strncasecmp(response->code, codes[i].code, n) == 0 &&
                (response->code[n] == '\0' || response->code[n] == ' '))
                return -codes[i].err;
        }
    }
    return -EIO;
}

/* ---------------------------------------------------------------- open */

static int read_greeting(struct imap_session *session, int *preauth, char *err, size_t errlen)
{
    struct imap_response *response;
    int ret = read_response(session, &response);

    if (ret < 0) {
        snprintf(err, errlen, "%s did not send an IMAP greeting (is this an IMAP port%s?)",
                 session->host, session->conn.ssl ? "" : ", or does it want imaps://");
        return ret;
    }
    if (response->kind != IMAP_RESP_UNTAGGED ||
        (response->status != IMAP_STATUS_OK && response->status != IMAP_STATUS_PREAUTH)) {
        snprintf(err, errlen, "%s refused the connection: %.200s", session->host,
                 response->text ? response->text : "");
        imap_response_free(response);
        return -ECONNREFUSED;
    }
    *preauth = response->status == IMAP_STATUS_PREAUTH;
    session_absorb(session, response);
    imap_response_free(response);
    return 0;
}

/* AUTHENTICATE XOAUTH2 / OAUTHBEARER with the token as initial response
 * (SASL-IR).  On a bad token the server sends an error challenge, which we
 * answer as the mechanisms require, and then NO. */
static int oauth_command(struct imap_session *session, const struct imap_config *config,
                         struct command *cmd, char *err, size_t errlen)
{
    int xoauth2 = config->auth == IMAP_AUTH_XOAUTH2;
    const char *mechanism = xoauth2 ? "XOAUTH2" : "OAUTHBEARER";
    char capability[32], *raw = NULL;
    int rawlen;

    snprintf(capability, sizeof(capability), "AUTH=%s", mechanism);
    if (!imap_session_has_capability(session, capability)) {
        snprintf(err, errlen, "%s does not offer %s (try -o auth=%s)", session->host, mechanism,
                 xoauth2 ? "oauthbearer" : "xoauth2");
        return -EPROTONOSUPPORT;
    }
    if (!imap_session_has_capability(session, "SASL-IR")) {
        snprintf(err, errlen, "%s offers %s without SASL-IR; not supported", session->host,
                 mechanism);
        return -EPROTONOSUPPORT;
    }
    if (xoauth2)
        rawlen = asprintf(&raw, "user=%s\001auth=Bearer %s\001\001", config->user,
                          config->password);
    else
        rawlen = asprintf(&raw, "n,a=%s,\001host=%s\001port=%u\001auth=Bearer %s\001\001",
                          config->user, config->host, config->port, config->password);
    if (rawlen < 0)
        return -ENOMEM;
    char *b64 = malloc(4 * (((size_t)rawlen + 2) / 3) + 1);
    if (!b64) {
        OPENSSL_cleanse(raw, (size_t)rawlen);
        free(raw);
        return -ENOMEM;
    }
    EVP_EncodeBlock((unsigned char *)b64, (unsigned char *)raw, rawlen);
    OPENSSL_cleanse(raw, (size_t)rawlen);
    free(raw);
    command_addf(cmd, "AUTHENTICATE %s", mechanism);
    cmd->redact_from = (int)cmd->len;
    command_add(cmd, " ", 1);
    command_add(cmd, b64, strlen(b64));
    OPENSSL_cleanse(b64, strlen(b64));
    free(b64);
    /* XOAUTH2 wants an empty line; OAUTHBEARER a lone %x01 (RFC 7628 3.2.3) */
    cmd->on_challenge = xoauth2 ? "\r\n" : "AQ==\r\n";
    return 0;
}

static int login(struct imap_session *session, const struct imap_config *config,
                 char *err, size_t errlen)
{
    struct command cmd = { .redact_from = -1 };
    struct imap_response *tagged = NULL;
    int ret;

    if (config->auth != IMAP_AUTH_PASSWORD) {
        ret = oauth_command(session, config, &cmd, err, errlen);
        if (ret < 0)
            return ret;
    } else if (imap_session_has_capability(session, "LOGINDISABLED")) {
        /* AUTHENTICATE PLAIN with an initial response (base64 of
         * "\0user\0password"). */
        size_t ulen = strlen(config->user), plen = strlen(config->password);
        size_t rawlen = ulen + plen + 2;
        unsigned char *raw = malloc(rawlen);
        char *b64 = malloc(4 * ((rawlen + 2) / 3) + 1);
        if (!raw || !b64) {
            free(raw);
            free(b64);
            return -ENOMEM;
        }
        raw[0] = '\0';
        memcpy(raw + 1, config->user, ulen);
        raw[1 + ulen] = '\0';
        memcpy(raw + 2 + ulen, config->password, plen);
        EVP_EncodeBlock((unsigned char *)b64, raw, (int)rawlen);
        OPENSSL_cleanse(raw, rawlen);
        free(raw);
        if (!imap_session_has_capability(session, "SASL-IR") ||
            !imap_session_has_capability(session, "AUTH=PLAIN")) {
            OPENSSL_cleanse(b64, strlen(b64));
            free(b64);
            snprintf(err, errlen, "%s disables LOGIN and offers no AUTHENTICATE PLAIN with "
                     "SASL-IR; cannot log in", session->host);
            return -EPROTONOSUPPORT;
        }
        command_add(&cmd, "AUTHENTICATE PLAIN", 18);
        cmd.redact_from = (int)cmd.len;
        command_add(&cmd, " ", 1);
        command_add(&cmd, b64, strlen(b64));
        OPENSSL_cleanse(b64, strlen(b64));
        free(b64);
    } else {
        command_add(&cmd, "LOGIN ", 6);
        command_add_string(session, &cmd, config->user, strlen(config->user));
        cmd.redact_from = (int)cmd.len;
        command_add(&cmd, " ", 1);
        command_add_string(session, &cmd, config->password, strlen(config->password));
    }
    ret = run_command(session, &cmd, NULL, NULL, &tagged);
    if (cmd.buf)
        OPENSSL_cleanse(cmd.buf, cmd.len);
    free(cmd.buf);
    if (ret < 0) {
        if (tagged)
            snprintf(err, errlen, "login as %s at %s failed: %.200s (%s)", config->user,
                     session->host, tagged->text,
                     config->auth == IMAP_AUTH_PASSWORD
                         ? "check the password: -o password_file, -o password_cmd or IMAPFS_PASSWORD"
                         : "check the token printed by -o oauth_token_cmd");
        else
            snprintf(err, errlen, "connection to %s lost during login", session->host);
        imap_response_free(tagged);
        return ret == -EIO && tagged ? -EACCES : ret;
    }
    imap_response_free(tagged);
    return 0;
}

int imap_session_open(const struct imap_config *config, struct imap_session **out,
                      char *err, size_t errlen)
{
    struct imap_session *session = calloc(1, sizeof(*session));
    int ret, preauth = 0;

    *out = NULL;
    if (!session)
        return -ENOMEM;
    clock_gettime(CLOCK_MONOTONIC, &session->last_io);
    session->host = config->host;
    session->conn.fd = -1;
    session->parser = imap_parser_new(NULL);
    session->rbuf = malloc(READ_CHUNK);
    if (!session->parser || !session->rbuf) {
        ret = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    ret = imap_conn_connect(&session->conn, config, err, errlen);
    if (ret < 0)
        goto fail;
    if (config->tls == IMAP_TLS_IMPLICIT) {
        ret = imap_conn_start_tls(&session->conn, config, err, errlen);
        if (ret < 0)
            goto fail;
    }
    ret = read_greeting(session, &preauth, err, errlen);
    if (ret < 0)
        goto fail;
    if (config->tls == IMAP_TLS_STARTTLS) {
        if (!session->capabilities && (ret = simple_command(session, "CAPABILITY")) < 0) {
            snprintf(err, errlen, "CAPABILITY failed at %s", config->host);
            goto fail;
        }
        if (!imap_session_has_capability(session, "STARTTLS")) {
            snprintf(err, errlen, "%s does not offer STARTTLS; use imaps:// or, only on a "
                     "trusted network, -o tls=none", config->host);
            ret = -EPROTONOSUPPORT;
            goto fail;
        }
        ret = simple_command(session, "STARTTLS");
        if (ret < 0) {
            snprintf(err, errlen, "STARTTLS refused by %s", config->host);
            goto fail;
        }
        /* Anything already buffered was sent before TLS: an injection. */
        if (session->rpos != session->rlen) {
            snprintf(err, errlen, "%s sent data after STARTTLS before the handshake; refusing",
                     config->host);
            ret = -EPROTO;
            goto fail;
        }
        ret = imap_conn_start_tls(&session->conn, config, err, errlen);
        if (ret < 0)
            goto fail;
        free(session->capabilities); /* pre-TLS capabilities are not to be trusted */
        session->capabilities = NULL;
    }
    if (!preauth) {
        if (!session->capabilities && (ret = simple_command(session, "CAPABILITY")) < 0) {
            snprintf(err, errlen, "CAPABILITY failed at %s", config->host);
            goto fail;
        }
        ret = login(session, config, err, errlen);
        if (ret < 0)
            goto fail;
    }
    /* Capabilities may change after login; ask unless the OK carried them. */
    ret = simple_command(session, "CAPABILITY");
    if (ret < 0) {
        snprintf(err, errlen, "CAPABILITY failed at %s", config->host);
        goto fail;
    }
    /* optional; a refusal is no error.  QRESYNC implies CONDSTORE. */
    if (imap_session_has_capability(session, "ENABLE") &&
        imap_session_has_capability(session, "QRESYNC"))
        simple_command_with(session, "ENABLE QRESYNC", enabled_handler, session);
    if (!session->qresync && imap_session_has_capability(session, "ENABLE") &&
        imap_session_has_capability(session, "CONDSTORE"))
        simple_command(session, "ENABLE CONDSTORE");
    log_debug("logged in to %s as %s", config->host, config->user);
    *out = session;
    return 0;
fail:
    imap_conn_close(&session->conn);
    imap_parser_free(session->parser);
    free(session->rbuf);
    free(session->capabilities);
    free(session);
    return ret;
}

static void session_free(struct imap_session *session)
{
    imap_conn_close(&session->conn);
    imap_parser_free(session->parser);
    free(session->rbuf);
    free(session->capabilities);
    free(session->selected);
    free(session);
}

void imap_session_close(struct imap_session *session)
{
    if (!session)
        return;
    if (!session->broken) {
        int saved = session->conn.timeout_ms;
        session->conn.timeout_ms = saved < 2000 ? saved : 2000; /* don't linger */
        if (session->idle_tag[0])
            imap_idle_end(session);
        session->logging_out = 1;
        simple_command(session, "LOGOUT");
    }
    session_free(session);
}

void imap_session_drop(struct imap_session *session)
{
    if (!session)
        return;
    if (!session->broken && !session->idle_tag[0]) {
        char line[32];
        int len = snprintf(line, sizeof(line), "A%u LOGOUT\r\n", ++session->next_tag);
        session->conn.timeout_ms = 100;     /* a few bytes; never wait on a dead peer */
        imap_conn_write(&session->conn, line, (size_t)len);
    }
    session_free(session);
}

int imap_session_broken(const struct imap_session *session) { return session->broken; }

double imap_session_idle_seconds(const struct imap_session *session)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - session->last_io.tv_sec) +
           (double)(now.tv_nsec - session->last_io.tv_nsec) / 1e9;
}

int imap_session_idle_ok(const struct imap_session *session)
{
    struct pollfd pfd = { .fd = session->conn.fd, .events = POLLIN | POLLRDHUP };

    if (session->broken || session->rpos != session->rlen)
        return 0;
    if (session->conn.ssl && SSL_pending(session->conn.ssl) > 0)
        return 0;
    return poll(&pfd, 1, 0) == 0;
}

int imap_session_has_capability(const struct imap_session *session, const char *name)
{
    char needle[64];
    size_t n = strlen(name);

    if (!session->capabilities || n + 3 > sizeof(needle))
        return 0;
    needle[0] = ' ';
    for (size_t i = 0; i < n; i++)
        needle[i + 1] = (char)toupper((unsigned char)name[i]);
    needle[n + 1] = ' ';
    needle[n + 2] = '\0';
    return strstr(session->capabilities, needle) != NULL;
}

int imap_session_capability_value(const struct imap_session *session, const char *name,
                                  uint64_t *value)
{
    char needle[64];
    size_t n = strlen(name);

    if (!session->capabilities || n + 3 > sizeof(needle))
        return -ENOENT;
    needle[0] = ' ';
    for (size_t i = 0; i < n; i++)
        needle[i + 1] = (char)toupper((unsigned char)name[i]);
    needle[n + 1] = '=';
    needle[n + 2] = '\0';
    const char *found = strstr(session->capabilities, needle);
    if (!found || !isdigit((unsigned char)found[n + 2]))
        return -ENOENT;
    errno = 0;
    char *end;
    unsigned long long number = strtoull(found + n + 2, &end, 10);
    if (errno || *end != ' ')
        return -ENOENT;
    *value = number;
    return 0;
}

void imap_session_set_unsolicited(struct imap_session *session, imap_unsolicited_fn *fn,
                                  void *context)
{
    session->unsolicited = fn;
    session->unsolicited_context = context;
}

const char *imap_session_selected(const struct imap_session *session)
{
    return session->selected;
}

int imap_session_selected_readonly(const struct imap_session *session)
{
    return session->selected_readonly;
}


/* ---------------------------------------------------------------- LIST */

struct list_context {
    struct imap_mailbox *mailboxes;
    size_t count, cap;
};

static int list_handler(void *context, struct imap_response *response)
{
    struct list_context *list = context;
    struct imap_mailbox mailbox = { 0 };

    if (response->status != IMAP_STATUS_NONE || response->count != 4 ||
        !imap_value_is_atom(&response->items[0], "LIST"))
        return 0;
    const struct imap_value *attrs = &response->items[1], *delim = &response->items[2],
                            *name = &response->items[3];
    if (attrs->kind != IMAP_VALUE_LIST)
        return 1; /* malformed entry: skip it, keep the rest */
    for (size_t i = 0; i < attrs->count; i++) {
        if (imap_value_is_atom(&attrs->items[i], "\\Noselect") ||
            imap_value_is_atom(&attrs->items[i], "\\NonExistent"))
            mailbox.flags |= IMAP_MAILBOX_NOSELECT;
        else if (imap_value_is_atom(&attrs->items[i], "\\Noinferiors"))
            mailbox.flags |= IMAP_MAILBOX_NOINFERIORS;
        else if (imap_value_is_atom(&attrs->items[i], "\\Trash"))
            mailbox.flags |= IMAP_MAILBOX_TRASH;
    }
    if (delim->kind == IMAP_VALUE_STRING && delim->len == 1)
        mailbox.delimiter = delim->str[0];
    else if (delim->kind != IMAP_VALUE_NIL)
        return 1;
    if ((name->kind != IMAP_VALUE_STRING && name->kind != IMAP_VALUE_ATOM &&
         name->kind != IMAP_VALUE_NUMBER) || name->len == 0 || strlen(name->str) != name->len) {
        log_warn("skipping a mailbox whose name is empty or contains NUL");
        return 1;
    }
    if (list->count == list->cap) {
        size_t cap = list->cap ? list->cap * 2 : 32;
        struct imap_mailbox *grown = realloc(list->mailboxes, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        list->mailboxes = grown;
        list->cap = cap;
    }
    mailbox.name = strdup(name->str);
    if (!mailbox.name)
        return -ENOMEM;
    list->mailboxes[list->count++] = mailbox;
    return 1;
}

int imap_list(struct imap_session *session, struct imap_mailbox **out, size_t *count)
{
    struct list_context list = { 0 };
    int ret = simple_command_with(session, "LIST \"\" \"*\"", list_handler, &list);
    if (ret < 0) {
        imap_mailboxes_free(list.mailboxes, list.count);
        return ret;
    }
    *out = list.mailboxes;
    *count = list.count;
    return 0;
}

void imap_mailboxes_free(struct imap_mailbox *mailboxes, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(mailboxes[i].name);
    free(mailboxes);
}

/* ---------------------------------------------------------------- SELECT */

static int code_number(const char *code, const char *name, uint64_t *out)
{
    size_t n = strlen(name);
    char *end;

    if (strncasecmp(code, name, n) != 0 || code[n] != ' ' || !isdigit((unsigned char)code[n + 1]))
        return 0;
    errno = 0;
    unsigned long long value = strtoull(code + n + 1, &end, 10);
    if (errno || (*end != '\0' && *end != ' '))
        return 0;
    *out = value;
    return 1;
}

static int select_handler(void *context, struct imap_response *response)
{
    struct imap_mailbox_state *state = context;
    uint64_t number;

    if (response->status == IMAP_STATUS_OK && response->code) {
        if (code_number(response->code, "UIDVALIDITY", &number) && number <= UINT32_MAX)
            state->uidvalidity = (uint32_t)number;
        else if (code_number(response->code, "UIDNEXT", &number) && number <= UINT32_MAX)
            state->uidnext = (uint32_t)number;
        else if (code_number(response->code, "HIGHESTMODSEQ", &number))
            state->highestmodseq = number;
        return 1;
    }
    if (response->status == IMAP_STATUS_NONE && response->count == 2 &&
        imap_value_is_atom(&response->items[1], "EXISTS")) {
        uint32_t exists;
        if (imap_value_u32(&response->items[0], &exists) == 0)
            state->exists = exists;
        return 1;
    }
    return 0;
}

int imap_select(struct imap_session *session, const char *mailbox, int readonly,
                struct imap_mailbox_state *state)
{
    if (session->selected && strcmp(session->selected, mailbox) == 0 &&
        (readonly || !session->selected_readonly)) {
        if (state)
            *state = session->state;
        return 0;
    }
    return imap_select_fresh(session, mailbox, readonly, state);
}

int imap_select_fresh(struct imap_session *session, const char *mailbox, int readonly,
                      struct imap_mailbox_state *state)
{
    struct command cmd = { .redact_from = -1 };
    struct imap_mailbox_state fresh = { 0 };
    int ret;

    free(session->selected);
    session->selected = NULL;
    command_add(&cmd, readonly ? "EXAMINE " : "SELECT ", readonly ? 8 : 7);
    command_add_string(session, &cmd, mailbox, strlen(mailbox));
    if (imap_session_has_capability(session, "CONDSTORE"))
        command_add(&cmd, " (CONDSTORE)", 12);
    ret = run_command(session, &cmd, select_handler, &fresh, NULL);
    free(cmd.buf);
    if (ret < 0)
        return ret;
    if (fresh.uidvalidity == 0) {
        log_warn("%s: SELECT of %s gave no UIDVALIDITY", session->host, mailbox);
        return -EPROTO;
    }
    session->selected = strdup(mailbox);
    if (!session->selected)
        return -ENOMEM;
    session->selected_readonly = readonly;
    session->state = fresh;
    session->view_uidnext = fresh.uidnext;
    if (state)
        *state = fresh;
    return 0;
}

/* ---------------------------------------------------------------- FETCH */

/* Reads 1 to max digits; the number, or -1. */
static int read_digits(const char **text, int min, int max)
{
    int value = 0, n = 0;
    while (n < max && **text >= '0' && **text <= '9') {
        value = value * 10 + (**text - '0');
        (*text)++;
        n++;
    }
    return n >= min ? value : -1;
}

/* Days from 1970-01-01 to year-month-day (proleptic Gregorian). */
static int64_t days_from_civil(int64_t year, int month, int day)
{
    year -= month <= 2;
    int64_t era = (year >= 0 ? year : year - 399) / 400;
    int64_t year_of_era = year - era * 400;
    int64_t day_of_year = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1;
    int64_t day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    return era * 146097 + day_of_era - 719468;
}

/* " 4-Jul-2023 02:44:25 +0200" (RFC 3501 date-time, without the quotes).
 * Parsed by hand: a listing of 100,000 messages parses 100,000 of them, and
 * sscanf was a tenth of that time. */
int imap_parse_internaldate(const char *text, int64_t *out)
{
    static const char months[] = "janfebmaraprmayjunjulaugsepoctnovdec";

    while (*text == ' ')
        text++;
    int day = read_digits(&text, 1, 2);
    if (day < 1 || day > 31 || *text++ != '-')
        return -EINVAL;
    char month[4] = { 0 };
    for (int i = 0; i < 3; i++) {
        if (!isalpha((unsigned char)text[i]))
            return -EINVAL;
        month[i] = (char)tolower((unsigned char)text[i]);
    }
    text += 3;
    const char *found = strstr(months, month);
    if (!found || (found - months) % 3 != 0 || *text++ != '-')
        return -EINVAL;
    int year = read_digits(&text, 4, 4);
    if (year < 1900 || *text++ != ' ')
        return -EINVAL;
    int hour = read_digits(&text, 1, 2);
    if (hour < 0 || hour > 23 || *text++ != ':')
        return -EINVAL;
    int minute = read_digits(&text, 1, 2);
    if (minute < 0 || minute > 59 || *text++ != ':')
        return -EINVAL;
    int second = read_digits(&text, 1, 2);
    if (second < 0 || second > 60 || *text++ != ' ')
        return -EINVAL;
    int sign = 1;
    if (*text == '+' || *text == '-')
        sign = *text++ == '-' ? -1 : 1;
    int zone = read_digits(&text, 1, 4);
    if (zone < 0 || *text != '\0' || zone % 100 > 59 || zone / 100 > 23)
        return -EINVAL;
    int64_t days = days_from_civil(year, (int)((found - months) / 3) + 1, day);
    *out = days * 86400 + hour * 3600 + minute * 60 + second -
           sign * ((zone / 100) * 3600 + (zone % 100) * 60);
    return 0;
}

int imap_format_uid_set(char *buf, size_t buflen, const uint32_t *uids, size_t count)
{
    size_t pos = 0;

    if (buflen == 0)
        return -ENOSPC;
    buf[0] = '\0';
    for (size_t i = 0; i < count;) {
        size_t j = i;
        while (j + 1 < count && uids[j + 1] == uids[j] + 1)
            j++;
        int n = j > i ? snprintf(buf + pos, buflen - pos, "%s%u:%u", pos ? "," : "", uids[i], uids[j])
                      : snprintf(buf + pos, buflen - pos, "%s%u", pos ? "," : "", uids[i]);
        if (n < 0 || (size_t)n >= buflen - pos)
            return -ENOSPC;
        pos += (size_t)n;
        i = j + 1;
    }
    return (int)pos;
}

/* The attribute list of "* n FETCH (...)", or NULL for other responses. */
static struct imap_value *fetch_attributes(struct imap_response *response)
{
    if (response->status != IMAP_STATUS_NONE || response->count != 3 ||
        response->items[0].kind != IMAP_VALUE_NUMBER ||
        !imap_value_is_atom(&response->items[1], "FETCH") ||
        response->items[2].kind != IMAP_VALUE_LIST)
        return NULL;
    return &response->items[2];
}

struct meta_context {
    uint32_t first, last;
    imap_meta_fn *fn;
    void *context;
};

static int meta_handler(void *context, struct imap_response *response)
{
    struct meta_context *meta = context;
    struct imap_value *attrs = fetch_attributes(response);
    const struct imap_value *uid_value, *size_value, *date_value, *flags_value;
    uint32_t uid;
    int64_t date = 0;

    if (!attrs)
        return 0;
    uid_value = imap_fetch_item(attrs, "UID");
    size_value = imap_fetch_item(attrs, "RFC822.SIZE");
    date_value = imap_fetch_item(attrs, "INTERNALDATE");
    flags_value = imap_fetch_item(attrs, "FLAGS");
    if (!uid_value || !size_value || !date_value || !flags_value)
        return 0; /* an unsolicited FLAGS update, say: not ours */
    if (imap_value_u32(uid_value, &uid) < 0 || uid == 0 ||
        size_value->kind != IMAP_VALUE_NUMBER || flags_value->kind != IMAP_VALUE_LIST ||
        date_value->kind != IMAP_VALUE_STRING ||
        imap_parse_internaldate(date_value->str, &date) < 0) {
        log_warn("skipping a malformed FETCH response");
        return 1;
    }
    /* "UID FETCH n:*" returns the last message even when its UID is < n. */
    if (uid < meta->first || (meta->last && uid > meta->last))
        return 1;
    int ret = meta->fn(meta->context, uid, size_value->number, date, flags_value);
    return ret < 0 ? ret : 1;
}

int imap_fetch_meta(struct imap_session *session, uint32_t first, uint32_t last,
                    imap_meta_fn *fn, void *context)
{
    struct meta_context meta = { first, last, fn, context };
    char text[96];
    int ret = last ? bring_into_view(session, last) : 0;
    if (ret < 0)
        return ret;

    if (last)
        snprintf(text, sizeof(text), "UID FETCH %u:%u (UID RFC822.SIZE INTERNALDATE FLAGS)",
                 first, last);
    else
        snprintf(text, sizeof(text), "UID FETCH %u:* (UID RFC822.SIZE INTERNALDATE FLAGS)",
                 first);
    return simple_command_with(session, text, meta_handler, &meta);
}

struct body_context {
    const uint32_t *uids;       /* sorted */
    size_t count;
    imap_body_fn *fn;
    void *context;
};

static int uid_wanted(const struct body_context *bodies, uint32_t uid)
{
    size_t lo = 0, hi = bodies->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (bodies->uids[mid] == uid)
            return 1;
        if (bodies->uids[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static int body_handler(void *context, struct imap_response *response)
{
    struct body_context *bodies = context;
    struct imap_value *attrs = fetch_attributes(response);
    struct imap_value *uid_value, *body_value;
    uint32_t uid;
    size_t len;

    if (!attrs)
        return 0;
    uid_value = imap_fetch_item(attrs, "UID");
    body_value = imap_fetch_item(attrs, "BODY[]");
    if (!uid_value || !body_value || imap_value_u32(uid_value, &uid) < 0 ||
        !uid_wanted(bodies, uid))
        return 0;
    if (body_value->kind == IMAP_VALUE_NIL)
        return 1; /* the server has no body for it: the caller sees it missing */
    if (body_value->kind != IMAP_VALUE_STRING)
        return 1;
    char *body = imap_value_steal(body_value, &len);
    if (!body)
        return -ENOMEM;
    int ret = bodies->fn(bodies->context, uid, body, len);
    return ret < 0 ? ret : 1;
}

static int compare_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

int imap_fetch_bodies(struct imap_session *session, const uint32_t *uids, size_t count,
                      imap_body_fn *fn, void *context)
{
    struct body_context bodies = { NULL, 0, fn, context };
    struct command cmd = { .redact_from = -1 };
    uint32_t *sorted;
    char *set;
    size_t setlen = count * 23 + 1;
    int ret;

    if (count == 0)
        return 0;
    sorted = malloc(count * sizeof(*sorted));
    set = malloc(setlen);
    if (!sorted || !set) {
        free(sorted);
        free(set);
        return -ENOMEM;
    }
    memcpy(sorted, uids, count * sizeof(*sorted));
    qsort(sorted, count, sizeof(*sorted), compare_u32);
    size_t unique = 0;
    for (size_t i = 0; i < count; i++)
        if (unique == 0 || sorted[unique - 1] != sorted[i])
            sorted[unique++] = sorted[i];
    if ((ret = bring_into_view(session, sorted[unique - 1])) < 0) {
        free(sorted);
        free(set);
        return ret;
    }
    bodies.uids = sorted;
    bodies.count = unique;
    ret = imap_format_uid_set(set, setlen, sorted, unique);
    if (ret >= 0) {
        command_addf(&cmd, "UID FETCH ");
        command_add(&cmd, set, (size_t)ret);
        command_addf(&cmd, " (UID BODY.PEEK[])");
        ret = run_command(session, &cmd, body_handler, &bodies, NULL);
    }
    free(cmd.buf);
    free(set);
    free(sorted);
    return ret;
}

/* ---------------------------------------------------------------- changes */

const char *imap_session_last_error(const struct imap_session *session)
{
    return session->last_error;
}

void imap_session_forget_selected(struct imap_session *session)
{
    /* Never CLOSE: on a read-write mailbox it expunges every \Deleted message,
     * including ones other clients flagged.  Without UNSELECT, an EXAMINE that
     * fails leaves no mailbox selected (RFC 3501 6.3.1). */
    if (session->selected && imap_session_has_capability(session, "UNSELECT"))
        simple_command(session, "UNSELECT");
    else if (session->selected)
        simple_command(session, "EXAMINE \"imapfs-no-such-mailbox-\"");
    free(session->selected);
    session->selected = NULL;
}

/* "COPYUID 38505 304 3956" -> uidvalidity and destination uid, for a single
 * source UID. */
static int parse_copyuid(const char *code, struct imap_copy_result *result)
{
    unsigned long validity, source, dest;
    int consumed = 0;

    if (!code || sscanf(code, "COPYUID %lu %lu %lu%n", &validity, &source, &dest, &consumed) != 3 ||
        code[consumed] != '\0' || validity == 0 || validity > UINT32_MAX || dest == 0 ||
        dest > UINT32_MAX)
        return 0;
    result->uidvalidity = (uint32_t)validity;
    result->uid = (uint32_t)dest;
    return 1;
}

struct copy_context {
    uint32_t uid;
    struct imap_copy_result *result;
};

/* MOVE reports COPYUID in an untagged OK before the EXPUNGE of the source. */
static int copy_handler(void *context, struct imap_response *response)
{
    struct copy_context *copy = context;

    if (response->status == IMAP_STATUS_OK && response->code &&
        strncasecmp(response->code, "COPYUID ", 8) == 0) {
        parse_copyuid(response->code, copy->result);
        return 1;
    }
    return 0;
}

static int copy_or_move(struct imap_session *session, const char *verb, uint32_t uid,
                        const char *mailbox, struct imap_copy_result *result)
{
    struct command cmd = { .redact_from = -1 };
    struct copy_context copy = { uid, result };
    struct imap_response *tagged = NULL;
    int ret;

    memset(result, 0, sizeof(*result));
    if ((ret = bring_into_view(session, uid)) < 0)
        return ret;
    command_addf(&cmd, "UID %s %u ", verb, uid);
    command_add_string(session, &cmd, mailbox, strlen(mailbox));
    ret = run_command(session, &cmd, copy_handler, &copy, &tagged);
    free(cmd.buf);
    if (tagged && tagged->status == IMAP_STATUS_OK)
        parse_copyuid(tagged->code, result);
    imap_response_free(tagged);
    if (ret < 0)
        return ret;
    /* OK without COPYUID from a UIDPLUS server: the source UID did not exist
     * (RFC 4315: COPYUID is sent whenever a message was copied). */
    if (result->uid == 0 && imap_session_has_capability(session, "UIDPLUS"))
        return -ENOENT;
    return 0;
}

int imap_uid_move(struct imap_session *session, uint32_t uid, const char *mailbox,
                  struct imap_copy_result *result)
{
    if (!imap_session_has_capability(session, "MOVE"))
        return -ENOTSUP;
    return copy_or_move(session, "MOVE", uid, mailbox, result);
}

int imap_uid_copy(struct imap_session *session, uint32_t uid, const char *mailbox,
                  struct imap_copy_result *result)
{
    return copy_or_move(session, "COPY", uid, mailbox, result);
}

int imap_uid_store(struct imap_session *session, uint32_t uid, const char *how,
                   const char *flags)
{
    int ret = bring_into_view(session, uid);
    if (ret < 0)
        return ret;
    struct command cmd = { .redact_from = -1 };
    command_addf(&cmd, "UID STORE %u %s.SILENT (", uid, how);
    command_add(&cmd, flags, strlen(flags));
    command_add(&cmd, ")", 1);
    ret = run_command(session, &cmd, NULL, NULL, NULL);
    free(cmd.buf);
    return ret;
}

int imap_uid_expunge(struct imap_session *session, uint32_t uid)
{
    char text[48];

    if (!imap_session_has_capability(session, "UIDPLUS"))
        return -ENOTSUP;
    int ret = bring_into_view(session, uid);
    if (ret < 0)
        return ret;
    snprintf(text, sizeof(text), "UID EXPUNGE %u", uid);
    return simple_command(session, text);
}

static void format_date(int64_t date, char *buf, size_t buflen)
{
    static const char months[][4] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                      "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
    time_t t = (time_t)date;
    struct tm tm;

    gmtime_r(&t, &tm);
    snprintf(buf, buflen, "\"%02d-%s-%04d %02d:%02d:%02d +0000\"", tm.tm_mday,
             months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

int imap_append(struct imap_session *session, const char *mailbox, const char *flags,
                int64_t date, const char *data, size_t len, struct imap_copy_result *result)
{
    struct command cmd = { .redact_from = -1 };
    struct imap_response *tagged = NULL;
    char when[48];
    int ret;

    memset(result, 0, sizeof(*result));
    command_add(&cmd, "APPEND ", 7);
    command_add_string(session, &cmd, mailbox, strlen(mailbox));
    if (flags && *flags) {
        command_add(&cmd, " (", 2);
        command_add(&cmd, flags, strlen(flags));
        command_add(&cmd, ")", 1);
    }
    if (date >= 0) {
        format_date(date, when, sizeof(when));
        command_addf(&cmd, " %s", when);
    }
    command_add(&cmd, " ", 1);
    /* The message always goes as a literal, even when it could be quoted. */
    int plus = imap_session_has_capability(session, "LITERAL+");
    command_addf(&cmd, plus ? "{%zu+}\r\n" : "{%zu}\r\n", len);
    if (!plus)
        cmd.waits[cmd.nwaits++] = cmd.len;
    command_add(&cmd, data, len);
    ret = run_command(session, &cmd, NULL, NULL, &tagged);
    free(cmd.buf);
    if (ret == 0 && tagged && tagged->code) {
        unsigned long validity, uid;
        int consumed = 0;
        if (sscanf(tagged->code, "APPENDUID %lu %lu%n", &validity, &uid, &consumed) == 2 &&
            tagged->code[consumed] == '\0' && validity && validity <= UINT32_MAX && uid &&
            uid <= UINT32_MAX) {
            result->uidvalidity = (uint32_t)validity;
            result->uid = (uint32_t)uid;
        }
    }
    imap_response_free(tagged);
    return ret;
}

static int mailbox_command(struct imap_session *session, const char *verb, const char *first,
                           const char *second)
{
    struct command cmd = { .redact_from = -1 };
    command_addf(&cmd, "%s ", verb);
    command_add_string(session, &cmd, first, strlen(first));
    if (second) {
        command_add(&cmd, " ", 1);
        command_add_string(session, &cmd, second, strlen(second));
    }
    int ret = run_command(session, &cmd, NULL, NULL, NULL);
    free(cmd.buf);
    return ret;
}

int imap_create(struct imap_session *session, const char *mailbox)
{
    return mailbox_command(session, "CREATE", mailbox, NULL);
}

int imap_delete(struct imap_session *session, const char *mailbox)
{
    if (session->selected && strcmp(session->selected, mailbox) == 0)
        imap_session_forget_selected(session);
    return mailbox_command(session, "DELETE", mailbox, NULL);
}

int imap_rename(struct imap_session *session, const char *from, const char *to)
{
    if (session->selected)
        imap_session_forget_selected(session);
    return mailbox_command(session, "RENAME", from, to);
}

static int status_handler(void *context, struct imap_response *response)
{
    struct imap_mailbox_state *state = context;

    if (response->status != IMAP_STATUS_NONE || response->count != 3 ||
        !imap_value_is_atom(&response->items[0], "STATUS") ||
        response->items[2].kind != IMAP_VALUE_LIST)
        return 0;
    const struct imap_value *attrs = &response->items[2];
    for (size_t i = 0; i + 1 < attrs->count; i += 2) {
        const struct imap_value *value = &attrs->items[i + 1];
        if (imap_value_is_atom(&attrs->items[i], "UIDNEXT"))
            imap_value_u32(value, &state->uidnext);
        else if (imap_value_is_atom(&attrs->items[i], "UIDVALIDITY"))
            imap_value_u32(value, &state->uidvalidity);
        else if (imap_value_is_atom(&attrs->items[i], "MESSAGES"))
            imap_value_u32(value, &state->exists);
        else if (imap_value_is_atom(&attrs->items[i], "HIGHESTMODSEQ") &&
                 value->kind == IMAP_VALUE_NUMBER)
            state->highestmodseq = value->number;
    }
    return 1;
}

int imap_status(struct imap_session *session, const char *mailbox,
                struct imap_mailbox_state *state)
{
    struct command cmd = { .redact_from = -1 };

    memset(state, 0, sizeof(*state));
    command_add(&cmd, "STATUS ", 7);
    command_add_string(session, &cmd, mailbox, strlen(mailbox));
    if (imap_session_has_capability(session, "CONDSTORE"))
        command_add(&cmd, " (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)", 45);
    else
        command_add(&cmd, " (MESSAGES UIDNEXT UIDVALIDITY)", 31);
    int ret = run_command(session, &cmd, status_handler, state, NULL);
    free(cmd.buf);
    if (ret == 0 && (state->uidnext == 0 || state->uidvalidity == 0))
        ret = -EPROTO;
    return ret;
}

/* ---------------------------------------------------------------- flags, search */

struct search_context {
    uint32_t *uids;
    size_t count, cap;
};

static int search_add(struct search_context *search, uint32_t uid)
{
    if (search->count == search->cap) {
        size_t cap = search->cap ? search->cap * 2 : 256;
        uint32_t *grown = realloc(search->uids, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        search->uids = grown;
        search->cap = cap;
    }
    search->uids[search->count++] = uid;
    return 0;
}

/* Hands the UIDs collected over, ascending; 0, or ret (< 0) after freeing
 * them when the command failed. */
static int search_finish(struct search_context *search, int ret, uint32_t **uids, size_t *count)
{
    if (ret < 0) {
        free(search->uids);
        return ret;
    }
    if (search->count)
        qsort(search->uids, search->count, sizeof(*search->uids), compare_u32);
    *uids = search->uids;
    *count = search->count;
    return 0;
}

/* Adds the UIDs of a sequence set ("1:3,5"); -EPROTO when it is none. */
static int search_add_set(struct search_context *search, const struct imap_value *set)
{
    uint32_t *uids;
    size_t count;

    if ((set->kind != IMAP_VALUE_ATOM && set->kind != IMAP_VALUE_NUMBER) ||
        imap_parse_uid_set(set->str, 1u << 26, &uids, &count) < 0)
        return -EPROTO;
    for (size_t i = 0; i < count; i++)
        if (search_add(search, uids[i]) < 0) {
            free(uids);
            return -ENOMEM;
        }
    free(uids);
    return 0;
}

/* "* VANISHED (EARLIER) 3:5,9": UIDs expunged since a CHANGEDSINCE.  A
 * VANISHED without EARLIER is news of now, not the answer: left to the
 * unsolicited handler. */
static int vanished_add(struct search_context *vanished, const struct imap_response *response)
{
    if (response->status != IMAP_STATUS_NONE || response->count != 3 ||
        !imap_value_is_atom(&response->items[0], "VANISHED") ||
        response->items[1].kind != IMAP_VALUE_LIST || response->items[1].count != 1 ||
        !imap_value_is_atom(&response->items[1].items[0], "EARLIER"))
        return 0;
    int ret = search_add_set(vanished, &response->items[2]);
    return ret < 0 ? ret : 1;
}

struct flags_context {
    uint32_t first, last;
    imap_flags_fn *fn;
    void *context;
    struct search_context *vanished;    /* collects VANISHED (EARLIER), or NULL */
};

static int flags_handler(void *context, struct imap_response *response)
{
    struct flags_context *flags = context;
    struct imap_value *attrs = fetch_attributes(response);
    const struct imap_value *uid_value, *flags_value;
    uint32_t uid;

    if (!attrs)
        return flags->vanished ? vanished_add(flags->vanished, response) : 0;
    uid_value = imap_fetch_item(attrs, "UID");
    flags_value = imap_fetch_item(attrs, "FLAGS");
    if (!uid_value || !flags_value || imap_value_u32(uid_value, &uid) < 0 || uid == 0 ||
        flags_value->kind != IMAP_VALUE_LIST)
        return 0;
    if (uid < flags->first || (flags->last && uid > flags->last))
        return 1;
    int ret = flags->fn(flags->context, uid, flags_value);
    return ret < 0 ? ret : 1;
}

/* UID FETCH first:last (UID FLAGS), with (CHANGEDSINCE n) when changedsince
 * is set, and VANISHED in it when vanished collects what the server names. */
static int fetch_flags(struct imap_session *session, uint32_t first, uint32_t last,
                       uint64_t changedsince, imap_flags_fn *fn, void *context,
                       struct search_context *vanished)
{
    struct flags_context flags = { first, last, fn, context, vanished };
    char text[160], range[32], modifier[64] = "";
    int ret = last ? bring_into_view(session, last) : 0;
    if (ret < 0)
        return ret;

    if (last)
        snprintf(range, sizeof(range), "%u:%u", first, last);
    else
        snprintf(range, sizeof(range), "%u:*", first);
    if (changedsince)
        snprintf(modifier, sizeof(modifier), " (CHANGEDSINCE %llu%s)",
                 (unsigned long long)changedsince, vanished ? " VANISHED" : "");
    snprintf(text, sizeof(text), "UID FETCH %s (UID FLAGS)%s", range, modifier);
    return simple_command_with(session, text, flags_handler, &flags);
}

int imap_fetch_flags(struct imap_session *session, uint32_t first, uint32_t last,
                     uint64_t changedsince, imap_flags_fn *fn, void *context)
{
    return fetch_flags(session, first, last, changedsince, fn, context, NULL);
}

int imap_fetch_changes(struct imap_session *session, uint32_t first, uint32_t last,
                       uint64_t changedsince, imap_flags_fn *fn, void *context,
                       uint32_t **vanished, size_t *vanished_count)
{
    struct search_context gone = { 0 };

    *vanished = NULL;
    *vanished_count = 0;
    if (!session->qresync || !changedsince || !first || (last && last < first))
        return -EINVAL;
    int ret = fetch_flags(session, first, last, changedsince, fn, context, &gone);
    return search_finish(&gone, ret, vanished, vanished_count);
}

int imap_session_qresync(const struct imap_session *session)
{
    return session->qresync;
}

int imap_parse_uid_set(const char *set, size_t max_count, uint32_t **uids, size_t *count)
{
    uint32_t *out = NULL;
    size_t n = 0, cap = 0;
    const char *cursor = set;

    *uids = NULL;
    *count = 0;
    while (*cursor) {
        char *end;
        errno = 0;
        unsigned long first = strtoul(cursor, &end, 10), last;
        if (errno || end == cursor || first == 0 || first > UINT32_MAX || *cursor == '-')
            goto bad;
        last = first;
        if (*end == ':') {
            cursor = end + 1;
            last = strtoul(cursor, &end, 10);
            if (errno || end == cursor || last == 0 || last > UINT32_MAX || *cursor == '-')
                goto bad;
            if (last < first) {
                unsigned long swap = first;
                first = last;
                last = swap;
            }
        }
        if (last - first + 1 > max_count - n)
            goto bad;
        if (n + (last - first + 1) > cap) {
            size_t want = n + (size_t)(last - first + 1);
            cap = cap ? cap : 64;
            while (cap < want)
                cap *= 2;
            uint32_t *grown = realloc(out, cap * sizeof(*out));
            if (!grown) {
                free(out);
                return -ENOMEM;
            }
            out = grown;
        }
        for (unsigned long uid = first; uid <= last; uid++)
            out[n++] = (uint32_t)uid;
        if (*end == ',')
            end++;
        else if (*end != '\0')
            goto bad;
        cursor = end;
    }
    if (n) /* qsort wants a valid pointer even for nothing */
        qsort(out, n, sizeof(*out), compare_u32);
    *uids = out;
    *count = n;
    return 0;
bad:
    free(out);
    return -EPROTO;
}

static int search_handler(void *context, struct imap_response *response)
{
    struct search_context *search = context;

    if (response->status != IMAP_STATUS_NONE || response->count < 1)
        return 0;
    if (imap_value_is_atom(&response->items[0], "SEARCH")) {
        for (size_t i = 1; i < response->count; i++) {
            uint32_t uid;
            if (imap_value_u32(&response->items[i], &uid) < 0 || uid == 0)
                return -EPROTO;
            if (search_add(search, uid) < 0)
                return -ENOMEM;
        }
        return 1;
    }
    if (imap_value_is_atom(&response->items[0], "ESEARCH")) {
        /* * ESEARCH (TAG "A5") UID ALL 1:3,5 */
        for (size_t i = 1; i + 1 < response->count; i++) {
            if (!imap_value_is_atom(&response->items[i], "ALL"))
                continue;
            int ret = search_add_set(search, &response->items[i + 1]);
            if (ret < 0)
                return ret;
        }
        return 1;
    }
    return 0;
}

int imap_search_all(struct imap_session *session, uint32_t **uids, size_t *count)
{
    struct search_context search = { 0 };
    int esearch = imap_session_has_capability(session, "ESEARCH");
    int ret = simple_command_with(session, esearch ? "UID SEARCH RETURN (ALL) ALL" : "UID SEARCH ALL",
                                  search_handler, &search);
    return search_finish(&search, ret, uids, count);
}

/* ---------------------------------------------------------------- quota */

struct quota_context {
    uint64_t used, limit;
    int found;
};

static int quota_handler(void *context, struct imap_response *response)
{
    struct quota_context *quota = context;

    if (response->status != IMAP_STATUS_NONE || response->count < 1)
        return 0;
    if (imap_value_is_atom(&response->items[0], "QUOTAROOT"))
        return 1;
    if (!imap_value_is_atom(&response->items[0], "QUOTA") || response->count != 3 ||
        response->items[2].kind != IMAP_VALUE_LIST)
        return 0;
    /* * QUOTA "" (STORAGE 10 512 MESSAGE 3 1000) */
    const struct imap_value *resources = &response->items[2];
    for (size_t i = 0; i + 2 < resources->count && !quota->found; i += 3) {
        if (imap_value_is_atom(&resources->items[i], "STORAGE") &&
            resources->items[i + 1].kind == IMAP_VALUE_NUMBER &&
            resources->items[i + 2].kind == IMAP_VALUE_NUMBER) {
            quota->used = resources->items[i + 1].number;
            quota->limit = resources->items[i + 2].number;
            quota->found = 1;
        }
    }
    return 1;
}

int imap_quota_storage(struct imap_session *session, const char *mailbox, uint64_t *used_kib,
                       uint64_t *limit_kib)
{
    struct command cmd = { .redact_from = -1 };
    struct quota_context quota = { 0, 0, 0 };

    if (!imap_session_has_capability(session, "QUOTA"))
        return -ENOTSUP;
    command_add(&cmd, "GETQUOTAROOT ", 13);
    command_add_string(session, &cmd, mailbox, strlen(mailbox));
    int ret = run_command(session, &cmd, quota_handler, &quota, NULL);
    free(cmd.buf);
    if (ret < 0)
        return ret;
    if (!quota.found || quota.limit == 0)
        return -ENOTSUP;
    *used_kib = quota.used;
    *limit_kib = quota.limit;
    return 0;
}

/* ---------------------------------------------------------------- NAMESPACE */

struct namespace_context {
    char *prefix;
    char delimiter;
};

static int namespace_handler(void *context, struct imap_response *response)
{
    struct namespace_context *ns = context;

    if (response->status != IMAP_STATUS_NONE || response->count != 4 ||
        !imap_value_is_atom(&response->items[0], "NAMESPACE"))
        return 0;
    /* * NAMESPACE (("INBOX." ".")) NIL NIL: the first personal one */
    const struct imap_value *personal = &response->items[1];
    if (personal->kind == IMAP_VALUE_LIST && personal->count >= 1 &&
        personal->items[0].kind == IMAP_VALUE_LIST && personal->items[0].count >= 2) {
        const struct imap_value *prefix = &personal->items[0].items[0];
        const struct imap_value *delim = &personal->items[0].items[1];
        if (prefix->kind == IMAP_VALUE_STRING && strlen(prefix->str) == prefix->len) {
            free(ns->prefix);
            ns->prefix = strdup(prefix->str);
        }
        if (delim->kind == IMAP_VALUE_STRING && delim->len == 1)
            ns->delimiter = delim->str[0];
    }
    return 1;
}

int imap_namespace_personal(struct imap_session *session, char **prefix, char *delimiter)
{
    struct namespace_context ns = { NULL, 0 };
    int ret = 0;

    if (imap_session_has_capability(session, "NAMESPACE"))
        ret = simple_command_with(session, "NAMESPACE", namespace_handler, &ns);
    if (ret < 0) {
        free(ns.prefix);
        return ret;
    }
    *prefix = ns.prefix ? ns.prefix : strdup("");
    *delimiter = ns.delimiter;
    return *prefix ? 0 : -ENOMEM;
}

/* ---------------------------------------------------------------- SEARCH */

/* Appends the user's criteria: ASCII words as they are (they are IMAP
 * search syntax), words with 8-bit bytes as literals, "quoted strings" kept
 * whole (as literals when they hold 8-bit bytes). */
static int add_criteria(struct imap_session *session, struct command *cmd, const char *criteria)
{
    const char *cursor = criteria;

    while (*cursor) {
        if (*cursor == ' ') {
            command_add(cmd, " ", 1);
            cursor++;
            continue;
        }
        const char *start = cursor, *end;
        int quoted = *cursor == '"', eight_bit = 0;
        if (quoted) {
            end = cursor + 1;
            while (*end && *end != '"') {
                if (*end == '\\' && end[1])
                    end++;
                end++;
            }
            if (*end != '"')
                return -EINVAL;
            end++;
        } else {
            end = cursor + strcspn(cursor, " ");
        }
        for (const char *c = start; c < end; c++)
            if ((unsigned char)*c >= 0x80)
                eight_bit = 1;
        if (!eight_bit) {
            command_add(cmd, start, (size_t)(end - start));
        } else {
            /* the word itself, unquoted and unescaped, as a literal */
            char *word = quoted ? strndup(start + 1, (size_t)(end - start - 2))
                                : strndup(start, (size_t)(end - start));
            if (!word)
                return -ENOMEM;
            if (quoted) {
                char *w = word;
                for (char *r = word; *r; r++) {
                    if (*r == '\\' && r[1])
                        r++;
                    *w++ = *r;
                }
                *w = '\0';
            }
            /* force a literal: command_add_string would quote plain ASCII */
            int plus = imap_session_has_capability(session, "LITERAL+");
            command_addf(cmd, plus ? "{%zu+}\r\n" : "{%zu}\r\n", strlen(word));
            if (!plus) {
                if (cmd->nwaits == (int)(sizeof(cmd->waits) / sizeof(cmd->waits[0]))) {
                    free(word);
                    return -E2BIG;
                }
                cmd->waits[cmd->nwaits++] = cmd->len;
            }
            command_add(cmd, word, strlen(word));
            free(word);
        }
        cursor = end;
    }
    return 0;
}

int imap_uid_search(struct imap_session *session, const char *criteria, uint32_t **uids,
                    size_t *count)
{
    struct command cmd = { .redact_from = -1 };
    struct search_context search = { 0 };
    int ret = 0;

    *uids = NULL;
    *count = 0;
    if (strpbrk(criteria, "\r\n") || !*criteria) {
        snprintf(session->last_error, sizeof(session->last_error),
                 "not sent: empty, or a line break in the criteria");
        return -EINVAL;
    }
    command_add(&cmd, "UID SEARCH ", 11);
    if (imap_session_has_capability(session, "ESEARCH"))
        command_add(&cmd, "RETURN (ALL) ", 13);
    if (strncmp(criteria, "gmail:", 6) == 0 && imap_session_has_capability(session, "X-GM-EXT-1")) {
        command_add(&cmd, "X-GM-RAW ", 9);
        command_add_string(session, &cmd, criteria + 6, strlen(criteria + 6));
    } else {
        command_add(&cmd, "CHARSET UTF-8 ", 14);
        ret = add_criteria(session, &cmd, criteria);
    }
    if (ret == -EINVAL)
        snprintf(session->last_error, sizeof(session->last_error),
                 "not sent: an unbalanced quote in the criteria");
    if (ret == 0)
        ret = run_command(session, &cmd, search_handler, &search, NULL);
    free(cmd.buf);
    if (ret == -EIO && !session->broken)
        ret = -EINVAL; /* the server refused the criteria */
    return search_finish(&search, ret, uids, count);
}

/* ---------------------------------------------------------------- ENVELOPE */

struct envelope_context {
    imap_envelope_fn *fn;
    void *context;
};

/* A decoded NSTRING, or "" (caller frees). */
static char *envelope_text(const struct imap_value *value)
{
    if (value->kind != IMAP_VALUE_STRING && value->kind != IMAP_VALUE_ATOM)
        return strdup("");
    return imap_decode_header_text(value->str);
}

/* The first address of an address list: "Name <box@host>" or "box@host". */
static char *envelope_address(const struct imap_value *list)
{
    if (list->kind != IMAP_VALUE_LIST || list->count == 0 ||
        list->items[0].kind != IMAP_VALUE_LIST || list->items[0].count != 4)
        return strdup("");
    const struct imap_value *address = list->items[0].items;
    char *name = envelope_text(&address[0]);
    const char *box = address[2].kind == IMAP_VALUE_STRING ? address[2].str : "";
    const char *host = address[3].kind == IMAP_VALUE_STRING ? address[3].str : "";
    char *out = NULL;
    int n;
    if (name && *name)
        n = asprintf(&out, "%s <%s%s%s>", name, box, *host ? "@" : "", host);
    else
        n = asprintf(&out, "%s%s%s", box, *host ? "@" : "", host);
    free(name);
    if (n < 0)
        return NULL;
    for (char *c = out; *c; c++) /* one line */
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = ' ';
    return out;
}

static int envelope_handler(void *context, struct imap_response *response)
{
    struct envelope_context *envelopes = context;
    struct imap_value *attrs = fetch_attributes(response);
    const struct imap_value *uid_value, *envelope;
    uint32_t uid;

    if (!attrs)
        return 0;
    uid_value = imap_fetch_item(attrs, "UID");
    envelope = imap_fetch_item(attrs, "ENVELOPE");
    if (!uid_value || !envelope || imap_value_u32(uid_value, &uid) < 0)
        return 0;
    if (envelope->kind != IMAP_VALUE_LIST || envelope->count < 3)
        return 1; /* malformed: that message simply has no envelope xattrs */
    char *date = envelope_text(&envelope->items[0]);
    char *subject = envelope_text(&envelope->items[1]);
    char *from = envelope_address(&envelope->items[2]);
    int ret = date && subject && from ? envelopes->fn(envelopes->context, uid, date, subject, from)
                                      : -ENOMEM;
    free(date);
    free(subject);
    free(from);
    return ret < 0 ? ret : 1;
}

int imap_fetch_envelopes(struct imap_session *session, uint32_t first, uint32_t last,
                         imap_envelope_fn *fn, void *context)
{
    struct envelope_context envelopes = { fn, context };
    char text[80];
    if (last)
        snprintf(text, sizeof(text), "UID FETCH %u:%u (UID ENVELOPE)", first, last);
    else
        snprintf(text, sizeof(text), "UID FETCH %u:* (UID ENVELOPE)", first);
    return simple_command_with(session, text, envelope_handler, &envelopes);
}


/* ---------------------------------------------------------------- push */

int imap_noop(struct imap_session *session)
{
    return simple_command(session, "NOOP");
}

int imap_notify_set(struct imap_session *session)
{
    /* Every personal mailbox: new and expunged messages and flag changes come
     * as STATUS, created/deleted/renamed mailboxes as LIST (RFC 5465). */
    return simple_command(session, "NOTIFY SET (personal (MessageNew MessageExpunge "
                                   "FlagChange MailboxName))");
}

/* An untagged response outside any command: BYE ends the session, the rest
 * goes where a running command's unsolicited data goes. */
static int deliver_untagged(struct imap_session *session, const struct imap_response *response)
{
    if (response->kind == IMAP_RESP_TAGGED) {
        log_warn("unexpected tag %s from %s", response->tag, session->host);
        return fail(session, -EPROTO);
    }
    if (response->kind == IMAP_RESP_CONTINUATION)
        return 0;   /* an IDLE server's reminder; nothing to answer */
    if (response->status == IMAP_STATUS_BYE) {
        log_warn("%s closed the connection: %s", session->host, response->text);
        return fail(session, -ECONNRESET);
    }
    if (!session_absorb(session, response) && session->unsolicited)
        session->unsolicited(session->unsolicited_context, session, response);
    return 0;
}

int imap_session_wait(struct imap_session *session, int wake_fd, int timeout_ms)
{
    int delivered = 0;

    for (;;) {
        if (session->broken)
            return -EIO;
        int buffered = session->rpos < session->rlen ||
                       (session->conn.ssl && SSL_pending(session->conn.ssl) > 0);
        if (!buffered) {
            struct pollfd fds[2] = {
                { .fd = session->conn.fd, .events = POLLIN },
                { .fd = wake_fd, .events = POLLIN },
            };
            int n = poll(fds, wake_fd >= 0 ? 2 : 1, delivered ? 0 : timeout_ms);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            if (n == 0 || (wake_fd >= 0 && (fds[1].revents & POLLIN)))
                return delivered;
        }
        struct imap_response *response;
        int ret = read_response(session, &response);
        if (ret < 0)
            return ret;
        ret = deliver_untagged(session, response);
        imap_response_free(response);
        if (ret < 0)
            return ret;
        delivered++;
    }
}

/* Reads what the server says during IDLE until "+ idling" (when
 * at_continuation) or the IDLE's tagged answer, which ends the IDLE. */
static int idle_read(struct imap_session *session, int at_continuation)
{
    for (;;) {
        struct imap_response *response;
        int ret = read_response(session, &response);
        if (ret < 0)
            return ret;
        if (at_continuation && response->kind == IMAP_RESP_CONTINUATION) {
            imap_response_free(response);
            return 0;
        }
        if (response->kind == IMAP_RESP_TAGGED && strcmp(response->tag, session->idle_tag) == 0) {
            /* DONE answered; or, before "+", a refusal (a server that lists
             * IDLE but will not do it now) */
            if (response->status == IMAP_STATUS_OK) {
                ret = at_continuation ? -EPROTO : 0;
            } else {
                ret = imap_status_errno(response);
                snprintf(session->last_error, sizeof(session->last_error), "%s",
                         response->text);
            }
            session->idle_tag[0] = '\0';
            imap_response_free(response);
            return ret;
        }
        ret = deliver_untagged(session, response);
        imap_response_free(response);
        if (ret < 0)
            return ret;
    }
}

int imap_idle_begin(struct imap_session *session)
{
    struct command cmd = { .redact_from = -1 };
    int ret;

    if (session->broken)
        return -EIO;
    if (session->idle_tag[0])
        return 0;
    snprintf(session->idle_tag, sizeof(session->idle_tag), "A%u", ++session->next_tag);
    command_addf(&cmd, "%s IDLE\r\n", session->idle_tag);
    if (cmd.failed) {
        session->idle_tag[0] = '\0';
        return cmd.failed;
    }
    trace_command(&cmd);
    ret = imap_conn_write(&session->conn, cmd.buf, cmd.len);
    free(cmd.buf);
    if (ret < 0)
        return fail(session, ret);
    return idle_read(session, 1);
}

int imap_idle_end(struct imap_session *session)
{
    if (!session->idle_tag[0])
        return 0;
    if (session->broken)
        return -EIO;
    log_debug("C: DONE");
    int ret = imap_conn_write(&session->conn, "DONE\r\n", 6);
    if (ret < 0)
        return fail(session, ret);
    return idle_read(session, 0);
}

enum imap_change imap_response_change(const struct imap_response *response,
                                      const char **mailbox)
{
    *mailbox = NULL;
    if (response->kind != IMAP_RESP_UNTAGGED)
        return IMAP_CHANGE_NONE;
    if (response->status == IMAP_STATUS_OK && response->code &&
        strncasecmp(response->code, "NOTIFICATIONOVERFLOW", 20) == 0)
        return IMAP_CHANGE_OVERFLOW;
    if (response->status != IMAP_STATUS_NONE || response->count < 2)
        return IMAP_CHANGE_NONE;
    const struct imap_value *first = &response->items[0];
    if (imap_value_is_atom(first, "STATUS")) {
        const struct imap_value *name = &response->items[1];
        if (name->kind != IMAP_VALUE_ATOM && name->kind != IMAP_VALUE_STRING &&
            name->kind != IMAP_VALUE_NUMBER)
            return IMAP_CHANGE_NONE;
        *mailbox = name->str;
        return IMAP_CHANGE_MAILBOX;
    }
    if (imap_value_is_atom(first, "LIST") || imap_value_is_atom(first, "LSUB"))
        return IMAP_CHANGE_FOLDERS;
    if (imap_value_is_atom(first, "VANISHED"))
        return IMAP_CHANGE_SELECTED;
    const struct imap_value *kind = &response->items[1];     /* "* 5 EXISTS" */
    if (first->kind == IMAP_VALUE_NUMBER &&
        (imap_value_is_atom(kind, "EXISTS") || imap_value_is_atom(kind, "EXPUNGE") ||
         imap_value_is_atom(kind, "FETCH")))
        return IMAP_CHANGE_SELECTED;
    return IMAP_CHANGE_NONE;
}
