/* fs/options.c — the command line: one options struct, fuse_opt templates
 * with offsetof, defaults set before parsing, fstab noise dropped; and the
 * password, which never comes from argv. */
#include "fs/fs.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/crypto.h>

#define OPTION(template, field, value) { template, offsetof(struct fs_options, field), value }

enum { KEY_HELP, KEY_VERSION, KEY_FOREGROUND, KEY_DEBUG, KEY_READONLY, KEY_DISCARD };

static const struct fuse_opt option_specs[] = {
    OPTION("password_file=%s", password_file, 0),
    OPTION("password_cmd=%s", password_cmd, 0),
    OPTION("cafile=%s", cafile, 0),
    OPTION("tls_verify=%s", tls_verify, 0),
    OPTION("tls=%s", tls, 0),
    OPTION("connections=%u", connections, 0),
    OPTION("dir_cache_timeout=%lf", dir_cache_timeout, 0),
    OPTION("cache_size=%s", cache_size, 0),
    OPTION("timeout=%u", timeout, 0),
    OPTION("trash=%s", trash, 0),
    OPTION("max_download=%s", max_download, 0),
    FUSE_OPT_KEY("-h", KEY_HELP),
    FUSE_OPT_KEY("--help", KEY_HELP),
    FUSE_OPT_KEY("-V", KEY_VERSION),
    FUSE_OPT_KEY("--version", KEY_VERSION),
    FUSE_OPT_KEY("-f", KEY_FOREGROUND),
    FUSE_OPT_KEY("-d", KEY_DEBUG),
    FUSE_OPT_KEY("debug", KEY_DEBUG),
    FUSE_OPT_KEY("ro", KEY_READONLY),
    /* fstab noise: meaningful to mount(8) and systemd, not to us */
    FUSE_OPT_KEY("_netdev", KEY_DISCARD),
    FUSE_OPT_KEY("nofail", KEY_DISCARD),
    FUSE_OPT_KEY("noauto", KEY_DISCARD),
    FUSE_OPT_KEY("auto", KEY_DISCARD),
    FUSE_OPT_KEY("user", KEY_DISCARD),
    FUSE_OPT_KEY("users", KEY_DISCARD),
    FUSE_OPT_KEY("defaults", KEY_DISCARD),
    FUSE_OPT_END
};

static int option_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
    struct fs_options *options = data;

    switch (key) {
    case FUSE_OPT_KEY_NONOPT:
        if (!options->url) {
            options->url = strdup(arg);
            return 0;
        }
        if (!options->mountpoint) {
            options->mountpoint = strdup(arg);
            return 0;
        }
        fprintf(stderr, "imapfs: unexpected argument '%s' (see --help)\n", arg);
        return -1;
    case FUSE_OPT_KEY_OPT:
        if (strncmp(arg, "x-systemd.", 10) == 0 || strncmp(arg, "x-gvfs-", 7) == 0)
            return 0;
        return 1; /* a FUSE option: keep it for libfuse */
    case KEY_HELP:
        options->show_help = 1;
        return 0;
    case KEY_VERSION:
        options->show_version = 1;
        return 0;
    case KEY_FOREGROUND:
        options->foreground = 1;
        return 0;
    case KEY_DEBUG:
        options->debug = 1;
        options->foreground = 1;
        return fuse_opt_add_arg(outargs, "-odebug") == 0 ? 0 : -1;
    case KEY_READONLY:
        options->readonly = 1;
        return 1; /* the kernel enforces it too */
    case KEY_DISCARD:
        return 0;
    }
    return 1;
}

void fs_options_usage(const char *progname)
{
    printf("usage: %s [options] imaps://USER@HOST[:PORT] MOUNTPOINT\n"
           "       %s [options] imap://USER@HOST[:PORT] MOUNTPOINT   (STARTTLS)\n"
           "\n"
           "Mounts an IMAP account: folders are directories, messages are UID.eml files.\n"
           "%%40 in USER stands for @.  The password is read from -o password_file,\n"
           "-o password_cmd, the IMAPFS_PASSWORD variable, or asked on the terminal.\n"
           "\n"
           "options:\n"
           "    -h, --help                 this help\n"
           "    -V, --version              the version\n"
           "    -f                         stay in the foreground\n"
           "    -d                         debug: FUSE and IMAP traffic (passwords redacted); implies -f\n"
           "    -o password_file=PATH      first line of PATH is the password\n"
           "    -o password_cmd=CMD        first line of CMD's output is the password\n"
           "    -o cafile=PATH             also trust the CA certificates in PATH (PEM)\n"
           "    -o tls_verify=no           do not verify the certificate (unsafe)\n"
           "    -o tls=none                imap:// without STARTTLS (unsafe: password in clear)\n"
           "    -o connections=N           IMAP connections used in parallel (default 4)\n"
           "    -o dir_cache_timeout=SECS  how long a listing is served before a refresh (default 30)\n"
           "    -o cache_size=SIZE         memory for message bodies, e.g. 256M (default 256M)\n"
           "    -o timeout=SECS            network timeout (default 30)\n"
           "    -o trash=FOLDER|auto       rm moves messages to FOLDER (auto: the \\Trash folder)\n"
           "    -o max_download=SIZE       stop fetching mail after SIZE a day (UTC), e.g. 2G;\n"
           "                               for providers that lock accounts over a budget\n"
           "    -o ro                      read-only mount\n"
           "    -o allow_other             let other users in (needs user_allow_other in /etc/fuse.conf)\n"
           "    FUSE options (-o ...) are passed on; _netdev, nofail, noauto, user, x-systemd.* are ignored.\n",
           progname, progname);
}

/* "256M", "1G", "1048576" */
static int parse_size(const char *text, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    uint64_t unit = 1;

    if (errno || end == text)
        return -EINVAL;
    switch (toupper((unsigned char)*end)) {
    case 'K': unit = 1ull << 10; end++; break;
    case 'M': unit = 1ull << 20; end++; break;
    case 'G': unit = 1ull << 30; end++; break;
    case '\0': break;
    default: return -EINVAL;
    }
    if (*end == 'i' || *end == 'B')
        end++;
    if (*end == 'B')
        end++;
    if (*end != '\0' || value > UINT64_MAX / unit)
        return -EINVAL;
    *out = value * unit;
    return 0;
}

/* Splits imaps://USER@HOST[:PORT] (or [v6]:PORT). */
static int parse_url(struct fs_options *options)
{
    const char *url = options->url, *rest, *at, *host_end;
    char *user;
    size_t i, j;

    if (strncasecmp(url, "imaps://", 8) == 0) {
        options->tls_mode = IMAP_TLS_IMPLICIT;
        options->port = 993;
        rest = url + 8;
    } else if (strncasecmp(url, "imap://", 7) == 0) {
        options->tls_mode = IMAP_TLS_STARTTLS;
        options->port = 143;
        rest = url + 7;
    } else {
        fprintf(stderr, "imapfs: '%s' is not an imaps:// or imap:// URL\n", url);
        return -1;
    }
    at = strrchr(rest, '@');
    if (!at || at == rest) {
        fprintf(stderr, "imapfs: the URL needs a user name: imaps://USER@HOST\n");
        return -1;
    }
    user = strndup(rest, (size_t)(at - rest));
    if (!user)
        return -1;
    /* %XX decoding (the common case is %40 for @) */
    for (i = j = 0; user[i]; i++, j++) {
        if (user[i] == '%' && isxdigit((unsigned char)user[i + 1]) &&
            isxdigit((unsigned char)user[i + 2])) {
            char hex[3] = { user[i + 1], user[i + 2], 0 };
            user[j] = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            user[j] = user[i];
        }
    }
    user[j] = '\0';
    if (strlen(user) != j || j == 0) {
        free(user);
        fprintf(stderr, "imapfs: bad user name in the URL\n");
        return -1;
    }
    options->user = user;
    rest = at + 1;
    if (*rest == '[') {
        host_end = strchr(rest, ']');
        if (!host_end) {
            fprintf(stderr, "imapfs: bad IPv6 address in the URL\n");
            return -1;
        }
        options->host = strndup(rest + 1, (size_t)(host_end - rest - 1));
        host_end++;
    } else {
        host_end = rest + strcspn(rest, ":/");
        options->host = strndup(rest, (size_t)(host_end - rest));
    }
    if (!options->host || !*options->host) {
        fprintf(stderr, "imapfs: the URL needs a host name\n");
        return -1;
    }
    if (*host_end == ':') {
        char *end;
        unsigned long port = strtoul(host_end + 1, &end, 10);
        if (end == host_end + 1 || port == 0 || port > 65535 || (*end && strcmp(end, "/"))) {
            fprintf(stderr, "imapfs: bad port in the URL\n");
            return -1;
        }
        options->port = (unsigned)port;
    } else if (*host_end && strcmp(host_end, "/") != 0) {
        fprintf(stderr, "imapfs: unexpected '%s' in the URL (mailbox paths are not supported)\n",
                host_end);
        return -1;
    }
    return 0;
}

int fs_options_parse(struct fuse_args *args, struct fs_options *options)
{
    memset(options, 0, sizeof(*options));
    options->connections = 4;
    options->dir_cache_timeout = 30;
    options->timeout = 30;
    options->cache_bytes = 256ull << 20;

    if (fuse_opt_parse(args, options, option_specs, option_proc) < 0)
        return -1;
    if (options->show_help || options->show_version)
        return 0;
    if (!options->url || !options->mountpoint) {
        fprintf(stderr, "imapfs: usage: imapfs [options] imaps://USER@HOST[:PORT] MOUNTPOINT "
                        "(see --help)\n");
        return -1;
    }
    if (parse_url(options) < 0)
        return -1;
    if (options->tls) {
        if (strcmp(options->tls, "none") != 0) {
            fprintf(stderr, "imapfs: -o tls takes only 'none'\n");
            return -1;
        }
        if (options->tls_mode == IMAP_TLS_IMPLICIT) {
            fprintf(stderr, "imapfs: -o tls=none makes no sense with imaps://\n");
            return -1;
        }
        options->tls_mode = IMAP_TLS_NONE;
    }
    if (options->tls_verify && strcmp(options->tls_verify, "no") != 0 &&
        strcmp(options->tls_verify, "yes") != 0) {
        fprintf(stderr, "imapfs: -o tls_verify takes yes or no\n");
        return -1;
    }
    if (options->connections < 1 || options->connections > 64) {
        fprintf(stderr, "imapfs: -o connections must be 1 to 64\n");
        return -1;
    }
    if (options->dir_cache_timeout < 0) {
        fprintf(stderr, "imapfs: -o dir_cache_timeout must not be negative\n");
        return -1;
    }
    if (options->timeout < 1) {
        fprintf(stderr, "imapfs: -o timeout must be at least 1 second\n");
        return -1;
    }
    if (options->cache_size && parse_size(options->cache_size, &options->cache_bytes) < 0) {
        fprintf(stderr, "imapfs: bad -o cache_size '%s' (try 256M)\n", options->cache_size);
        return -1;
    }
    if (options->max_download &&
        (parse_size(options->max_download, &options->max_download_bytes) < 0 ||
         options->max_download_bytes == 0)) {
        fprintf(stderr, "imapfs: bad -o max_download '%s' (try 2G)\n", options->max_download);
        return -1;
    }
    return 0;
}

void fs_options_free(struct fs_options *options)
{
    free(options->url);
    free(options->mountpoint);
    free(options->password_file);
    free(options->password_cmd);
    free(options->cafile);
    free(options->tls_verify);
    free(options->tls);
    free(options->cache_size);
    free(options->trash);
    free(options->max_download);
    free(options->user);
    free(options->host);
}

/* First line of a stream, without its newline; NULL if none. */
static char *first_line(FILE *stream)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stream);

    if (n < 0) {
        free(line);
        return NULL;
    }
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    return line;
}

static char *prompt_password(const char *user, const char *host)
{
    FILE *tty = fopen("/dev/tty", "r+");
    struct termios saved, quiet;
    char *password;

    if (!tty)
        return NULL;
    fprintf(tty, "Password for %s at %s: ", user, host);
    fflush(tty);
    int restore = tcgetattr(fileno(tty), &saved) == 0;
    if (restore) {
        quiet = saved;
        quiet.c_lflag &= ~(tcflag_t)ECHO;
        tcsetattr(fileno(tty), TCSAFLUSH, &quiet);
    }
    password = first_line(tty);
    if (restore)
        tcsetattr(fileno(tty), TCSAFLUSH, &saved);
    fputc('\n', tty);
    fclose(tty);
    return password;
}

char *fs_password_get(const struct fs_options *options)
{
    char *password = NULL;

    if (options->password_file) {
        FILE *file = fopen(options->password_file, "re");
        if (!file) {
            fprintf(stderr, "imapfs: cannot read password file %s: %s\n",
                    options->password_file, strerror(errno));
            return NULL;
        }
        password = first_line(file);
        fclose(file);
        if (!password)
            fprintf(stderr, "imapfs: password file %s is empty\n", options->password_file);
        return password;
    }
    if (options->password_cmd) {
        FILE *pipe = popen(options->password_cmd, "r");
        if (!pipe) {
            fprintf(stderr, "imapfs: cannot run password_cmd: %s\n", strerror(errno));
            return NULL;
        }
        password = first_line(pipe);
        /* drain so the command does not die of SIGPIPE */
        char sink[256];
        while (fread(sink, 1, sizeof(sink), pipe) > 0)
            ;
        int status = pclose(pipe);
        if (status != 0 || !password) {
            if (password)
                OPENSSL_cleanse(password, strlen(password));
            free(password);
            fprintf(stderr, "imapfs: password_cmd failed (exit status %d) or printed nothing\n",
                    WIFEXITED(status) ? WEXITSTATUS(status) : -1);
            return NULL;
        }
        return password;
    }
    const char *env = getenv("IMAPFS_PASSWORD");
    if (env) {
        password = strdup(env);
        /* keep it out of the environment of anything we start later */
        OPENSSL_cleanse(getenv("IMAPFS_PASSWORD"), strlen(env));
        unsetenv("IMAPFS_PASSWORD");
        return password;
    }
    password = prompt_password(options->user, options->host);
    if (!password)
        fprintf(stderr, "imapfs: no password: use -o password_file=PATH, -o password_cmd=CMD, "
                        "IMAPFS_PASSWORD, or run on a terminal\n");
    return password;
}
