/* imap/imap_p.h — private to the imap room: the byte stream under a session. */
#ifndef IMAP_IMAP_P_H
#define IMAP_IMAP_P_H

#include <stddef.h>
#include <sys/types.h>
#include <openssl/ssl.h>

#include "imap/imap.h"

/* A TCP connection, optionally wrapped in TLS.  The socket is non-blocking;
 * every wait goes through poll() with the configured timeout, so nothing
 * hangs on a stalled server. */
struct imap_conn {
    int fd;
    SSL_CTX *ssl_ctx;   /* owned; NULL until TLS starts */
    SSL *ssl;           /* owned; NULL for plaintext */
    int timeout_ms;
};

/* TCP connect to host:port within the timeout.  err gets one sentence. */
int imap_conn_connect(struct imap_conn *conn, const struct imap_config *config,
                      char *err, size_t errlen);
/* TLS handshake on the connected socket, verifying the certificate and the
 * host name unless config->tls_verify is 0. */
int imap_conn_start_tls(struct imap_conn *conn, const struct imap_config *config,
                        char *err, size_t errlen);
/* Reads what is available (at least 1 byte), waiting up to the timeout.
 * Returns bytes read, 0 at end of stream, -ETIMEDOUT or -EIO. */
ssize_t imap_conn_read(struct imap_conn *conn, char *buf, size_t len);
/* Writes everything or fails: 0, -ETIMEDOUT or -EIO. */
int imap_conn_write(struct imap_conn *conn, const char *buf, size_t len);
void imap_conn_close(struct imap_conn *conn);

#endif
