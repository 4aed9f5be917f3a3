/* imap/conn.c — TCP and TLS under an IMAP session.
 *
 * TLS rules (DESIGN.md): OpenSSL >= 3, TLS 1.2 at least, SSL_VERIFY_PEER
 * against the system store or -o cafile, the server's name checked with
 * SSL_set1_host (or its IP address with X509_VERIFY_PARAM_set1_ip_asc), SNI
 * for names.  Verification is off only with -o tls_verify=no.
 *
 * The socket is non-blocking and every wait is a poll() bounded by the
 * configured timeout, so a stalled server costs at most that long. */
#include "imap/imap_p.h"
#include "imap/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

static int wait_fd(int fd, short events, int timeout_ms)
{
    struct pollfd pfd = { .fd = fd, .events = events };
    int ret;

    do {
        ret = poll(&pfd, 1, timeout_ms);
    } while (ret < 0 && errno == EINTR);
    if (ret < 0)
        return -errno;
    if (ret == 0)
        return -ETIMEDOUT;
    return 0;
}

static int connect_one(const struct addrinfo *ai, int timeout_ms)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                    ai->ai_protocol);
    int ret, soerr = 0, one = 1;
    socklen_t len = sizeof(soerr);

    if (fd < 0)
        return -errno;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
        goto connected;
    if (errno != EINPROGRESS) {
        ret = -errno;
        goto fail;
    }
    ret = wait_fd(fd, POLLOUT, timeout_ms);
    if (ret < 0)
        goto fail;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0 || soerr) {
        ret = soerr ? -soerr : -errno;
        goto fail;
    }
connected:
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    return fd;
fail:
    close(fd);
    return ret;
}

int imap_conn_connect(struct imap_conn *conn, const struct imap_config *config,
                      char *err, size_t errlen)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
    struct addrinfo *list = NULL, *ai;
    char port[16];
    int ret = -EHOSTUNREACH, gai;

    memset(conn, 0, sizeof(*conn));
    conn->fd = -1;
    conn->timeout_ms = config->timeout > 0 ? config->timeout * 1000 : 30000;
    snprintf(port, sizeof(port), "%u", config->port);
    gai = getaddrinfo(config->host, port, &hints, &list);
    if (gai != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", config->host, gai_strerror(gai));
        return -EHOSTUNREACH;
    }
    for (ai = list; ai; ai = ai->ai_next) {
        ret = connect_one(ai, conn->timeout_ms);
        if (ret >= 0) {
            conn->fd = ret;
            ret = 0;
            break;
        }
    }
    freeaddrinfo(list);
    if (ret < 0)
        snprintf(err, errlen, "cannot connect to %s port %u: %s", config->host, config->port,
                 ret == -ETIMEDOUT ? "timed out" : strerror(-ret));
    return ret;
}

static int host_is_ip(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Drives one SSL call that may want to read or write, with the timeout. */
static int ssl_wait(struct imap_conn *conn, int ssl_ret)
{
    switch (SSL_get_error(conn->ssl, ssl_ret)) {
    case SSL_ERROR_WANT_READ:
        return wait_fd(conn->fd, POLLIN, conn->timeout_ms);
    case SSL_ERROR_WANT_WRITE:
        return wait_fd(conn->fd, POLLOUT, conn->timeout_ms);
    case SSL_ERROR_ZERO_RETURN:
        return -ECONNRESET;
    default:
        return -EIO;
    }
}

int imap_conn_start_tls(struct imap_conn *conn, const struct imap_config *config,
                        char *err, size_t errlen)
{
    int ret;

    conn->ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (!conn->ssl_ctx)
        goto ssl_error;
    SSL_CTX_set_min_proto_version(conn->ssl_ctx, TLS1_2_VERSION);
    if (config->tls_verify) {
        SSL_CTX_set_verify(conn->ssl_ctx, SSL_VERIFY_PEER, NULL);
        if (config->cafile) {
            if (SSL_CTX_load_verify_locations(conn->ssl_ctx, config->cafile, NULL) != 1) {
                snprintf(err, errlen, "cannot load CA file %s (is it a PEM certificate?)",
                         config->cafile);
                return -EINVAL;
            }
        } else if (SSL_CTX_set_default_verify_paths(conn->ssl_ctx) != 1) {
            goto ssl_error;
        }
    } else {
        SSL_CTX_set_verify(conn->ssl_ctx, SSL_VERIFY_NONE, NULL);
    }
    conn->ssl = SSL_new(conn->ssl_ctx);
    if (!conn->ssl || SSL_set_fd(conn->ssl, conn->fd) != 1)
        goto ssl_error;
    if (host_is_ip(config->host)) {
        X509_VERIFY_PARAM *param = SSL_get0_param(conn->ssl);
        if (X509_VERIFY_PARAM_set1_ip_asc(param, config->host) != 1)
            goto ssl_error;
    } else {
        if (SSL_set_tlsext_host_name(conn->ssl, config->host) != 1 ||
            SSL_set1_host(conn->ssl, config->host) != 1)
            goto ssl_error;
    }
    for (;;) {
        ERR_clear_error();
        ret = SSL_connect(conn->ssl);
        if (ret == 1)
            break;
        ret = ssl_wait(conn, ret);
        if (ret == 0)
            continue;
        long verify = SSL_get_verify_result(conn->ssl);
        if (verify != X509_V_OK) {
            snprintf(err, errlen,
                     "the TLS certificate of %s is not trusted: %s (use -o cafile=PATH to "
                     "trust its CA)", config->host, X509_verify_cert_error_string(verify));
            return -EACCES;
        }
        if (ret == -ETIMEDOUT) {
            snprintf(err, errlen, "TLS handshake with %s timed out", config->host);
            return ret;
        }
        unsigned long e = ERR_peek_last_error();
        snprintf(err, errlen, "TLS handshake with %s failed: %s (is this a TLS port?)",
                 config->host, e ? ERR_reason_error_string(e) : "connection closed");
        return -EPROTO;
    }
    return 0;
ssl_error:
    snprintf(err, errlen, "TLS setup failed: %s",
             ERR_reason_error_string(ERR_get_error()) ?: "unknown OpenSSL error");
    return -EIO;
}

ssize_t imap_conn_read(struct imap_conn *conn, char *buf, size_t len)
{
    int ret;

    if (!conn->ssl) {
        for (;;) {
            ssize_t n = recv(conn->fd, buf, len, 0);
            if (n >= 0)
                return n;
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -EIO;
            ret = wait_fd(conn->fd, POLLIN, conn->timeout_ms);
            if (ret < 0)
                return ret;
        }
    }
    for (;;) {
        size_t got = 0;
        ERR_clear_error();
        ret = SSL_read_ex(conn->ssl, buf, len, &got);
        if (ret == 1)
            return (ssize_t)got;
        ret = ssl_wait(conn, ret);
        if (ret == -ECONNRESET)
            return 0;
        if (ret < 0)
            return ret;
    }
}

int imap_conn_write(struct imap_conn *conn, const char *buf, size_t len)
{
    int ret;

    while (len > 0) {
        size_t done = 0;
        if (!conn->ssl) {
            ssize_t n = send(conn->fd, buf, len, MSG_NOSIGNAL);
            if (n >= 0) {
                done = (size_t)n;
            } else if (errno == EINTR) {
                continue;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                ret = wait_fd(conn->fd, POLLOUT, conn->timeout_ms);
                if (ret < 0)
                    return ret;
                continue;
            } else {
                return -EIO;
            }
        } else {
            ERR_clear_error();
            ret = SSL_write_ex(conn->ssl, buf, len, &done);
            if (ret != 1) {
                ret = ssl_wait(conn, ret);
                if (ret < 0)
                    return ret == -ECONNRESET ? -EIO : ret;
                continue;
            }
        }
        buf += done;
        len -= done;
    }
    return 0;
}

void imap_conn_close(struct imap_conn *conn)
{
    if (conn->ssl) {
        SSL_shutdown(conn->ssl); /* best effort, non-blocking */
        SSL_free(conn->ssl);
        conn->ssl = NULL;
    }
    if (conn->ssl_ctx) {
        SSL_CTX_free(conn->ssl_ctx);
        conn->ssl_ctx = NULL;
    }
    if (conn->fd >= 0) {
        close(conn->fd);
        conn->fd = -1;
    }
}
