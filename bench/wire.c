/*
 * bench/wire.c — the "physical limit" for scripts/bench: one IMAPS connection
 * that logs in, SELECTs (EXAMINEs) a folder and drains one command's answer as
 * fast as this machine can, counting bytes and literals and keeping nothing.
 *
 *   wire HOST PORT USER PASSWORD_FILE CAFILE FOLDER 'UID FETCH 1:* BODY.PEEK[]'
 *
 * Prints one line: "seconds=S bytes=B literals=N literal_bytes=L", where S is
 * the time from sending EXAMINE to the tagged OK of the command (the login is
 * not counted: a mount has logged in before anything is timed there either).
 * Exits non-zero on any error or a non-OK answer.
 *
 * Why C: a Python ssl read loop costs an interpreter round per TLS record and
 * could understate the wire; this loop is SSL_read into a 1 MiB buffer and a
 * byte scanner that skips literals without looking at them.  The certificate
 * is verified (cafile, host 127.0.0.1 or a name), like imapfs does.
 *
 * Build (scripts/bench does it): gcc -O2 -o wire bench/wire.c -lssl -lcrypto
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static SSL *ssl;
static char buf[1 << 20];
static size_t pos, len;             /* unread bytes are buf[pos..len) */
static uint64_t total_bytes, literals, literal_bytes;

static void die(const char *what)
{
    fprintf(stderr, "wire: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

static void fill(void)
{
    if (pos == len)
        pos = len = 0;
    else if (sizeof buf - len < 65536) {    /* compact the unconsumed part */
        if (pos == 0)
            die("line longer than 1 MiB");
        memmove(buf, buf + pos, len - pos);
        len -= pos;
        pos = 0;
    }
    int n = SSL_read(ssl, buf + len, (int)(sizeof buf - len));
    if (n <= 0)
        die("connection closed or TLS error");
    len += (size_t)n;
    total_bytes += (uint64_t)n;
}

static void send_line(const char *line)
{
    size_t n = strlen(line);
    if (SSL_write(ssl, line, (int)n) != (int)n || SSL_write(ssl, "\r\n", 2) != 2)
        die("write failed");
}

/*
 * Read responses until the tagged one for tag.  Literals {n} at line ends are
 * skipped without copying.  Returns 0 for OK, -1 otherwise.
 */
static int until_tagged(const char *tag)
{
    size_t taglen = strlen(tag);
    char head[64];                  /* start of the current logical line */
    size_t headlen = 0;
    for (;;) {
        /* one physical line: buf[pos..nl] */
        size_t scanned = 0;
        char *nl;
        while ((nl = memchr(buf + pos + scanned, '\n', len - pos - scanned)) == NULL) {
            scanned = len - pos;
            fill();                 /* may move buf[pos..len) to the front */
        }
        char *line = buf + pos;
        size_t linelen = (size_t)(nl - line) + 1;
        pos += linelen;
        if (headlen == 0) {
            headlen = linelen < sizeof head ? linelen : sizeof head;
            memcpy(head, line, headlen);
        }
        /* literal at the end?  "...{123}\r\n" */
        size_t e = linelen;
        if (e >= 2 && line[e - 2] == '\r')
            e -= 2;
        else
            e -= 1;
        if (e >= 3 && line[e - 1] == '}') {
            size_t i = e - 1;
            uint64_t n = 0, mul = 1;
            while (i > 0 && line[i - 1] >= '0' && line[i - 1] <= '9') {
                n += (uint64_t)(line[i - 1] - '0') * mul;
                mul *= 10;
                i--;
            }
            if (i > 0 && line[i - 1] == '{' && i < e - 1) {
                literals++;
                literal_bytes += n;
                while (n > 0) {
                    if (pos == len)
                        fill();
                    size_t take = len - pos < n ? len - pos : (size_t)n;
                    pos += take;
                    n -= take;
                }
                continue;           /* the logical line goes on */
            }
        }
        /* end of a logical line */
        if (headlen > taglen && memcmp(head, tag, taglen) == 0 && head[taglen] == ' ') {
            int ok = headlen >= taglen + 3 && memcmp(head + taglen + 1, "OK", 2) == 0;
            if (!ok)
                fprintf(stderr, "wire: %.*s\n", (int)headlen, head);
            return ok ? 0 : -1;
        }
        headlen = 0;
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: wire HOST PORT USER PASSWORD_FILE CAFILE FOLDER COMMAND\n");
        return 2;
    }
    const char *host = argv[1], *port = argv[2], *user = argv[3];
    char password[512];
    FILE *pf = fopen(argv[4], "r");
    if (!pf || !fgets(password, sizeof password, pf))
        die("cannot read the password file");
    fclose(pf);
    password[strcspn(password, "\r\n")] = 0;

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0)
        die("getaddrinfo");
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) != 0)
        die("connect");
    freeaddrinfo(ai);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx || SSL_CTX_load_verify_locations(ctx, argv[5], NULL) != 1)
        die("cannot load the CA file");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set1_host(ssl, host);
    if (SSL_connect(ssl) != 1)
        die("TLS handshake");

    if (until_tagged("*") != 0)     /* the greeting: "* OK ..." */
        die("no OK greeting");

    char cmd[4096];
    snprintf(cmd, sizeof cmd, "a1 LOGIN \"%s\" \"%s\"", user, password);
    send_line(cmd);
    if (until_tagged("a1") != 0)
        die("LOGIN failed");

    total_bytes = len - pos;        /* normally 0: nothing is pending after LOGIN */
    literals = literal_bytes = 0;
    double t0 = now();
    snprintf(cmd, sizeof cmd, "a2 EXAMINE \"%s\"", argv[6]);
    send_line(cmd);
    if (until_tagged("a2") != 0)
        die("EXAMINE failed");
    snprintf(cmd, sizeof cmd, "a3 %s", argv[7]);
    send_line(cmd);
    if (until_tagged("a3") != 0)
        die("command failed");
    double t1 = now();
    printf("seconds=%.6f bytes=%llu literals=%llu literal_bytes=%llu\n", t1 - t0,
           (unsigned long long)total_bytes, (unsigned long long)literals,
           (unsigned long long)literal_bytes);
    send_line("a4 LOGOUT");
    SSL_shutdown(ssl);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return 0;
}
