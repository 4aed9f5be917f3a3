/* fs/options.c — the command line: one options struct, fuse_opt templates
 * with offsetof, defaults set before parsing, fstab noise dropped; named
 * accounts from a config file; and the password, which never comes from argv.
 *
 * Accounts.  `imapfs work ~/mail/work` names the section [work] of
 * $XDG_CONFIG_HOME/imapfs/config (or -o config=PATH), an INI file:
 *
 *     [work]
 *     url = imaps://alice%40example.org@imap.example.org
 *     password_cmd = pass show mail/work
 *     connections = 2
 *     ro
 *
 * Every key but url and mountpoint is an -o option, so the file is turned
 * into "-o key=value" arguments placed *before* the real command line and
 * the whole is parsed once more by the same fuse_opt table: what the command
 * line says comes later and wins, FUSE options such as allow_other end up in
 * args for libfuse like any other, and there is one parser, not two that
 * could drift apart.  A first pass over a copy of argv finds the account
 * and -o config= before the file is read.
 *
 * The file is checked harder than the command line, because it is written
 * once and read by mount(8) and systemd long after: a typo in a key is an
 * error with FILE:LINE (a FUSE option is accepted only from a known list,
 * since libfuse's own complaint could not say where it came from), and a file
 * that others may write is refused, since its password_cmd runs as the user. */
#include "fs/fs.h"
#include "imap/log.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pwd.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/crypto.h>

#define OPTION(template, field, value) { template, offsetof(struct fs_options, field), value }

enum { KEY_HELP, KEY_VERSION, KEY_FOREGROUND, KEY_DEBUG, KEY_READONLY, KEY_DISCARD };

static const struct fuse_opt option_specs[] = {
    OPTION("password_file=%s", password_file, 0),
    OPTION("password_cmd=%s", password_cmd, 0),
    OPTION("auth=%s", auth, 0),
    OPTION("oauth_token_cmd=%s", oauth_token_cmd, 0),
    OPTION("cafile=%s", cafile, 0),
    OPTION("tls_verify=%s", tls_verify, 0),
    OPTION("tls=%s", tls, 0),
    OPTION("connections=%u", connections, 0),
    OPTION("dir_cache_timeout=%lf", dir_cache_timeout, 0),
    OPTION("poll_interval=%u", poll_interval, 0),
    OPTION("idle_timeout=%u", idle_timeout, 0),
    OPTION("cache_size=%s", cache_size, 0),
    OPTION("timeout=%u", timeout, 0),
    OPTION("trash=%s", trash, 0),
    OPTION("max_download=%s", max_download, 0),
    OPTION("cache_dir=%s", cache_dir, 0),
    OPTION("cache_max=%s", cache_max, 0),
    OPTION("config=%s", config, 0),
    FUSE_OPT_KEY("-h", KEY_HELP),
    FUSE_OPT_KEY("--help", KEY_HELP),
    FUSE_OPT_KEY("-V", KEY_VERSION),
    FUSE_OPT_KEY("--version", KEY_VERSION),
    FUSE_OPT_KEY("-f", KEY_FOREGROUND),
    FUSE_OPT_KEY("-d", KEY_DEBUG),
    FUSE_OPT_KEY("debug", KEY_DEBUG),
    FUSE_OPT_KEY("ro", KEY_READONLY),
    /* fstab noise: meaningful to mount(8) and systemd, not to us (x-* is
     * dropped in option_proc) */
    FUSE_OPT_KEY("_netdev", KEY_DISCARD),
    FUSE_OPT_KEY("nofail", KEY_DISCARD),
    FUSE_OPT_KEY("noauto", KEY_DISCARD),
    FUSE_OPT_KEY("auto", KEY_DISCARD),
    FUSE_OPT_KEY("user", KEY_DISCARD),
    FUSE_OPT_KEY("nouser", KEY_DISCARD),
    FUSE_OPT_KEY("users", KEY_DISCARD),
    FUSE_OPT_KEY("owner", KEY_DISCARD),
    FUSE_OPT_KEY("group", KEY_DISCARD),
    FUSE_OPT_KEY("comment=", KEY_DISCARD),
    FUSE_OPT_KEY("defaults", KEY_DISCARD),
    FUSE_OPT_END
};

static int option_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
    struct fs_options *options = data;

    switch (key) {
    case FUSE_OPT_KEY_NONOPT:
        if (!options->url && !options->account) {
            /* imaps://... or the name of an account in the config file */
            if (strstr(arg, "://"))
                options->url = strdup(arg);
            else
                options->account = strdup(arg);
            return 0;
        }
        if (!options->mountpoint) {
            options->mountpoint = strdup(arg);
            return 0;
        }
        fprintf(stderr, "imapfs: unexpected argument '%s' (see --help)\n", arg);
        return -1;
    case FUSE_OPT_KEY_OPT:
        /* x-systemd.*, x-gvfs-*, x-mount.*: for userspace tools, by definition */
        if (strncmp(arg, "x-", 2) == 0)
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
           "       %s [options] ACCOUNT [MOUNTPOINT]   (an account of the config file)\n"
           "\n"
           "Mounts an IMAP account: folders are directories, messages are UID.eml files.\n"
           "%%40 in USER stands for @.  The password is read from -o password_file,\n"
           "-o password_cmd, the IMAPFS_PASSWORD variable, or asked on the terminal.\n"
           "ACCOUNT is a [section] of $XDG_CONFIG_HOME/imapfs/config (~/.config/imapfs/config)\n"
           "with url = imaps://... and any -o option as key = value; -o on the command\n"
           "line overrides it (see imapfs(1)).\n"
           "\n"
           "options:\n"
           "    -h, --help                 this help\n"
           "    -V, --version              the version\n"
           "    -f                         stay in the foreground\n"
           "    -d                         debug: FUSE and IMAP traffic (passwords redacted); implies -f\n"
           "    -o password_file=PATH      first line of PATH is the password\n"
           "    -o password_cmd=CMD        first line of CMD's output is the password\n"
           "    -o auth=xoauth2|oauthbearer  log in with an OAuth2 access token (default: password)\n"
           "    -o oauth_token_cmd=CMD     first line of CMD's output is a fresh access token;\n"
           "                               run again once when the server rejects a token\n"
           "    -o cafile=PATH             also trust the CA certificates in PATH (PEM)\n"
           "    -o tls_verify=no           do not verify the certificate (unsafe)\n"
           "    -o tls=none                imap:// without STARTTLS (unsafe: password in clear)\n"
           "    -o connections=N           IMAP connections used in parallel (default 4)\n"
           "    -o dir_cache_timeout=SECS  how long a listing is served before a refresh (default 30)\n"
           "    -o poll_interval=SECS      how often folders in use are checked for others' changes,\n"
           "                               besides what NOTIFY or IDLE push (default 2)\n"
           "    -o idle_timeout=SECS       close connections unused this long, before a NAT box\n"
           "                               drops them unseen (default 240)\n"
           "    -o cache_size=SIZE         memory for message bodies, e.g. 256M (default 256M)\n"
           "    -o timeout=SECS            network timeout (default 30)\n"
           "    -o trash=FOLDER|auto       rm moves messages to FOLDER (auto: the \\Trash folder)\n"
           "    -o cache_dir=DIR|none      persistent cache of mail and listings (default\n"
           "                               $XDG_CACHE_HOME/imapfs/USER@HOST:PORT); none: off\n"
           "    -o cache_max=SIZE          bound of the persistent cache (default 1G)\n"
           "    -o max_download=SIZE       stop fetching mail after SIZE a day (UTC), e.g. 2G;\n"
           "                               for providers that lock accounts over a budget\n"
           "    -o ro                      read-only mount; files open without a request to\n"
           "                               the daemon, the fastest mount for grep -r\n"
           "    -o allow_other             let other users in (needs user_allow_other in /etc/fuse.conf)\n"
           "    -o config=PATH             read accounts from PATH instead of the default file\n"
           "    FUSE options (-o ...) are passed on; _netdev, nofail, noauto, user, x-systemd.* are ignored.\n",
           progname, progname, progname);
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
    if (strchr(user, ':')) {
        /* imap://user:password@host would put the password in argv and ps */
        free(user);
        fprintf(stderr, "imapfs: do not put a password in the URL; use -o password_file=, "
                        "-o password_cmd= or IMAPFS_PASSWORD (a ':' in the user name is %%3A)\n");
        return -1;
    }
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

/* ------------------------------------------------------------ config file */

/* Keys of the config file besides the -o options of option_specs. */
enum config_kind { CONFIG_TEXT, CONFIG_UNSIGNED, CONFIG_NUMBER, CONFIG_FLAG };

struct config_key {
    const char *name;
    enum config_kind kind;
};

/* FUSE mount options that make sense in a config file and that libfuse
 * 3.14's low-level mount takes (each tried: nodiratime, relatime and
 * lazytime are refused, max_read breaks the session); any other key is
 * more likely a typo. */
static const struct config_key fuse_keys[] = {
    { "allow_other", CONFIG_FLAG },  { "allow_root", CONFIG_FLAG },
    { "auto_unmount", CONFIG_FLAG }, { "default_permissions", CONFIG_FLAG },
    { "rw", CONFIG_FLAG },           { "noatime", CONFIG_FLAG },
    { "atime", CONFIG_FLAG },        { "suid", CONFIG_FLAG },
    { "nosuid", CONFIG_FLAG },       { "dev", CONFIG_FLAG },
    { "nodev", CONFIG_FLAG },        { "exec", CONFIG_FLAG },
    { "noexec", CONFIG_FLAG },       { "sync", CONFIG_FLAG },
    { "async", CONFIG_FLAG },        { "dirsync", CONFIG_FLAG },
    { NULL, 0 }
};

/* Looks a key up: imapfs's own -o options (from option_specs, so the file
 * takes exactly what -o takes), then the FUSE list.  0 or -1. */
static int config_key_find(const char *key, enum config_kind *kind)
{
    size_t len = strlen(key);

    if (strcmp(key, "config") == 0)     /* one file does not name another */
        return -1;
    if (strcmp(key, "ro") == 0) {
        *kind = CONFIG_FLAG;
        return 0;
    }
    for (const struct fuse_opt *spec = option_specs; spec->templ; spec++) {
        const char *templ = spec->templ;
        if (spec->offset == -1U || strncmp(templ, key, len) != 0 || templ[len] != '=')
            continue;
        if (strcmp(templ + len + 1, "%u") == 0)
            *kind = CONFIG_UNSIGNED;
        else if (strcmp(templ + len + 1, "%lf") == 0)
            *kind = CONFIG_NUMBER;
        else
            *kind = CONFIG_TEXT;
        return 0;
    }
    for (const struct config_key *fk = fuse_keys; fk->name; fk++) {
        if (strcmp(fk->name, key) == 0) {
            *kind = fk->kind;
            return 0;
        }
    }
    return -1;
}

/* $HOME, unless it is not ours: mount(8) clears HOME and mount.fuse3 then
 * sets HOME=/root even for a user's fstab mount, so a HOME that belongs to
 * someone else yields to the passwd entry. */
static const char *home_dir(void)
{
    const char *home = getenv("HOME");
    struct passwd *pw;
    struct stat st;

    if (home && home[0] == '/' && stat(home, &st) == 0 && st.st_uid == getuid())
        return home;
    pw = getpwuid(getuid());
    if (pw && pw->pw_dir && pw->pw_dir[0] == '/')
        return pw->pw_dir;
    return home && home[0] == '/' ? home : NULL;
}

/* $XDG_CONFIG_HOME/imapfs/config, or ~/.config/imapfs/config; caller frees. */
static char *config_default_path(void)
{
    const char *xdg = getenv("XDG_CONFIG_HOME"), *home;
    char *path = NULL;

    /* the XDG spec: a relative value is invalid and to be ignored */
    if (xdg && xdg[0] == '/') {
        if (asprintf(&path, "%s/imapfs/config", xdg) < 0)
            return NULL;
        return path;
    }
    home = home_dir();
    if (!home) {
        fprintf(stderr, "imapfs: no home directory to find the config file in; "
                        "use -o config=PATH\n");
        return NULL;
    }
    if (asprintf(&path, "%s/.config/imapfs/config", home) < 0)
        return NULL;
    return path;
}

static char *trim(char *text)
{
    size_t len;

    while (isspace((unsigned char)*text))
        text++;
    len = strlen(text);
    while (len > 0 && isspace((unsigned char)text[len - 1]))
        text[--len] = '\0';
    return text;
}

/* "~" or "~/x" at the start of a path value means the home directory. */
static char *expand_home(const char *value)
{
    char *out = NULL;
    const char *home;

    if (value[0] != '~' || (value[1] != '\0' && value[1] != '/') || !(home = home_dir()))
        return strdup(value);
    if (asprintf(&out, "%s%s", home, value + 1) < 0)
        return NULL;
    return out;
}

/* Adds "-o key=value" with the value escaped for fuse_opt, which splits
 * option groups at ',' and takes '\' as an escape. */
static int add_file_option(struct fuse_args *out, const char *key, const char *value)
{
    size_t len = strlen(key) + 1 + (value ? 2 * strlen(value) : 0) + 1;
    char *opt = malloc(len), *d;
    int ret;

    if (!opt)
        return -1;
    d = opt + sprintf(opt, "%s", key);
    if (value) {
        *d++ = '=';
        for (const char *c = value; *c; c++) {
            if (*c == ',' || *c == '\\')
                *d++ = '\\';
            *d++ = *c;
        }
    }
    *d = '\0';
    ret = fuse_opt_add_arg(out, "-o") < 0 || fuse_opt_add_arg(out, opt) < 0 ? -1 : 0;
    free(opt);
    return ret;
}

/* A value in double or single quotes loses them (password_cmd = "pass x"). */
static char *unquote(char *value)
{
    size_t len = strlen(value);

    if (len >= 2 && (value[0] == '"' || value[0] == '\'') && value[len - 1] == value[0] &&
        !memchr(value + 1, value[0], len - 2)) {
        value[len - 1] = '\0';
        return value + 1;
    }
    return value;
}

/* Checks one "key = value" line (of any section: a typo is an error wherever
 * it is) and, when emit is set, adds it to out.  0, or -1 after printing. */
static int config_line(const char *path, unsigned lineno, char *key, char *value, int emit,
                       struct fuse_args *out, char **url, char **mountpoint)
{
    enum config_kind kind;
    char *end;

    if (strcmp(key, "url") == 0 || strcmp(key, "mountpoint") == 0) {
        char **field = key[0] == 'u' ? url : mountpoint;
        if (!value || !*value) {
            fprintf(stderr, "imapfs: %s:%u: %s needs a value\n", path, lineno, key);
            return -1;
        }
        if (key[0] == 'u' && !strstr(value, "://")) {
            fprintf(stderr, "imapfs: %s:%u: url must look like imaps://USER@HOST[:PORT]\n",
                    path, lineno);
            return -1;
        }
        if (!emit)
            return 0;
        free(*field);
        *field = key[0] == 'm' ? expand_home(value) : strdup(value);
        return *field ? 0 : -1;
    }
    if (config_key_find(key, &kind) < 0) {
        fprintf(stderr, "imapfs: %s:%u: unknown option '%s' (see imapfs(1), FILES)\n", path,
                lineno, key);
        return -1;
    }
    if (kind == CONFIG_FLAG) {
        int on;
        if (!value || !strcasecmp(value, "yes") || !strcasecmp(value, "true") ||
            !strcasecmp(value, "on") || !strcmp(value, "1"))
            on = 1;
        else if (!strcasecmp(value, "no") || !strcasecmp(value, "false") ||
                 !strcasecmp(value, "off") || !strcmp(value, "0"))
            on = 0;
        else {
            fprintf(stderr, "imapfs: %s:%u: %s takes no value, or yes or no\n", path, lineno,
                    key);
            return -1;
        }
        return emit && on ? add_file_option(out, key, NULL) : 0;
    }
    if (!value || !*value) {
        fprintf(stderr, "imapfs: %s:%u: %s needs a value: %s = ...\n", path, lineno, key, key);
        return -1;
    }
    errno = 0;
    if (kind == CONFIG_UNSIGNED) {
        unsigned long number = strtoul(value, &end, 10);
        if (!isdigit((unsigned char)value[0]) || *end || errno || number > UINT32_MAX) {
            fprintf(stderr, "imapfs: %s:%u: %s takes a whole number, not '%s'\n", path, lineno,
                    key, value);
            return -1;
        }
    } else if (kind == CONFIG_NUMBER) {
        double number = strtod(value, &end);
        if (end == value || *end || errno || !isfinite(number)) {
            fprintf(stderr, "imapfs: %s:%u: %s takes a number, not '%s'\n", path, lineno, key,
                    value);
            return -1;
        }
    }
    if (!emit)
        return 0;
    if (strcmp(key, "password_file") == 0 || strcmp(key, "cafile") == 0) {
        char *expanded = expand_home(value);
        int ret = expanded ? add_file_option(out, key, expanded) : -1;
        free(expanded);
        return ret;
    }
    return add_file_option(out, key, value);
}

/* Reads the section [account] of the config file at path into "-o" options
 * appended to out, and its url and mountpoint.  0, or -1 after one line. */
static int config_read(const char *path, const char *account, struct fuse_args *out, char **url,
                       char **mountpoint)
{
    FILE *file = fopen(path, "re");
    struct stat st;
    struct fuse_args seen = FUSE_ARGS_INIT(0, NULL);   /* keys of [account] */
    char *line = NULL, *names = NULL;
    size_t cap = 0, names_len = 0;
    int i;
    unsigned lineno = 0, found = 0;
    int in_section = -1;        /* -1: before any section */
    int ret = -1;

    if (!file) {
        fprintf(stderr, "imapfs: cannot read the config file %s: %s (needed for the account "
                        "'%s'; or give an imaps:// URL)\n", path, strerror(errno), account);
        return -1;
    }
    if (fstat(fileno(file), &st) < 0 || !S_ISREG(st.st_mode)) {
        fprintf(stderr, "imapfs: the config file %s is not a regular file\n", path);
        goto out;
    }
    /* password_cmd runs a command: a file others may change is a way in */
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        fprintf(stderr, "imapfs: refusing the config file %s: it is writable by %s, and its "
                        "password_cmd would run as you (chmod go-w %s)\n", path,
                st.st_mode & S_IWOTH ? "everyone" : "its group", path);
        goto out;
    }
    if (st.st_uid != getuid() && st.st_uid != 0) {
        fprintf(stderr, "imapfs: refusing the config file %s: it belongs to another user "
                        "(uid %u)\n", path, (unsigned)st.st_uid);
        goto out;
    }

    for (;;) {
        ssize_t n = getline(&line, &cap, file);
        char *text, *key, *value, *eq;

        if (n < 0)
            break;
        lineno++;
        if ((size_t)n != strlen(line)) {
            fprintf(stderr, "imapfs: %s:%u: NUL byte in the line\n", path, lineno);
            goto out;
        }
        text = trim(line);
        if (!*text || *text == '#' || *text == ';')
            continue;
        if (*text == '[') {
            size_t len = strlen(text);
            char *name;
            if (text[len - 1] != ']') {
                fprintf(stderr, "imapfs: %s:%u: a section is written [NAME]\n", path, lineno);
                goto out;
            }
            text[len - 1] = '\0';
            name = trim(text + 1);
            if (!*name || strpbrk(name, "[]")) {
                fprintf(stderr, "imapfs: %s:%u: bad account name in [%s]\n", path, lineno,
                        name);
                goto out;
            }
            in_section = strcmp(name, account) == 0;
            if (in_section && found) {
                fprintf(stderr, "imapfs: %s:%u: account [%s] again (first on line %u)\n", path,
                        lineno, name, found);
                goto out;
            }
            if (in_section)
                found = lineno;
            /* remember the names for the "no such account" message */
            size_t add = strlen(name) + 2;
            char *grown = realloc(names, names_len + add + 1);
            if (!grown)
                goto out;
            names = grown;
            names_len += (size_t)sprintf(names + names_len, "%s%s", names_len ? ", " : "", name);
            continue;
        }
        eq = strchr(text, '=');
        if (eq) {
            *eq = '\0';
            value = unquote(trim(eq + 1));
        } else {
            value = NULL;
        }
        key = trim(text);
        if (!*key || strpbrk(key, " \t,[]")) {
            fprintf(stderr, "imapfs: %s:%u: expected 'key = value', '[ACCOUNT]' or a comment\n",
                    path, lineno);
            goto out;
        }
        if (in_section < 0) {
            fprintf(stderr, "imapfs: %s:%u: '%s' before any [ACCOUNT] section\n", path, lineno,
                    key);
            goto out;
        }
        if (in_section == 1) {
            /* a key twice in one account is a mistake, not an override */
            for (i = 0; i < seen.argc; i++) {
                if (strcmp(seen.argv[i], key) == 0) {
                    fprintf(stderr, "imapfs: %s:%u: '%s' is set twice in [%s]\n", path, lineno,
                            key, account);
                    goto out;
                }
            }
            if (fuse_opt_add_arg(&seen, key) < 0)
                goto out;
        }
        if (config_line(path, lineno, key, value, in_section == 1, out, url, mountpoint) < 0)
            goto out;
    }
    if (ferror(file)) {
        fprintf(stderr, "imapfs: cannot read the config file %s: %s\n", path, strerror(errno));
        goto out;
    }
    if (!found) {
        fprintf(stderr, "imapfs: no account [%s] in %s (%s%s); a URL starts with imaps:// "
                        "or imap://\n", account, path, names ? "it has: " : "it has none",
                names ? names : "");
        goto out;
    }
    if (!*url) {
        fprintf(stderr, "imapfs: %s:%u: account [%s] has no 'url = imaps://USER@HOST'\n", path,
                found, account);
        goto out;
    }
    ret = 0;
out:
    free(line);
    free(names);
    fuse_opt_free_args(&seen);
    fclose(file);
    return ret;
}

/* ---------------------------------------------------------------- parsing */

static void options_defaults(struct fs_options *options)
{
    memset(options, 0, sizeof(*options));
    options->connections = 4;
    options->dir_cache_timeout = 30;
    options->poll_interval = 2;
    options->idle_timeout = 240;
    options->timeout = 30;
    options->cache_bytes = 256ull << 20;
}

/* What the options mean together; 0 or -1 after one line. */
static int options_check(struct fs_options *options)
{
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
    if (options->poll_interval < 1 || options->poll_interval > 3600) {
        fprintf(stderr, "imapfs: -o poll_interval must be 1 to 3600 seconds\n");
        return -1;
    }
    if (options->idle_timeout < 2 || options->idle_timeout > 86400) {
        fprintf(stderr, "imapfs: -o idle_timeout must be 2 to 86400 seconds\n");
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
    options->auth_mode = IMAP_AUTH_PASSWORD;
    if (options->auth) {
        if (strcmp(options->auth, "xoauth2") == 0)
            options->auth_mode = IMAP_AUTH_XOAUTH2;
        else if (strcmp(options->auth, "oauthbearer") == 0)
            options->auth_mode = IMAP_AUTH_OAUTHBEARER;
        else if (strcmp(options->auth, "password") != 0) {
            fprintf(stderr, "imapfs: -o auth takes password, xoauth2 or oauthbearer\n");
            return -1;
        }
    }
    options->cache_max_bytes = 1ull << 30;
    if (options->cache_max && parse_size(options->cache_max, &options->cache_max_bytes) < 0) {
        fprintf(stderr, "imapfs: bad -o cache_max '%s' (try 1G)\n", options->cache_max);
        return -1;
    }
    if (!options->cache_dir) {
        /* $XDG_CACHE_HOME/imapfs/USER@HOST:PORT, one per account */
        const char *base = getenv("XDG_CACHE_HOME"), *home = home_dir();
        char *dir = NULL;
        int n = base && *base ? asprintf(&dir, "%s/imapfs/%s@%s:%u", base, options->user,
                                         options->host, options->port)
                : home    ? asprintf(&dir, "%s/.cache/imapfs/%s@%s:%u", home, options->user,
                                     options->host, options->port)
                          : asprintf(&dir, "none");
        if (n < 0)
            return -1;
        char *leaf = strstr(dir, "/imapfs/");
        for (char *c = leaf ? leaf + 8 : dir + strlen(dir); *c; c++)
            if (*c == '/')
                *c = '_'; /* a user name with a slash stays one directory */
        options->cache_dir = dir;
    }
    if (options->max_download &&
        (parse_size(options->max_download, &options->max_download_bytes) < 0 ||
         options->max_download_bytes == 0)) {
        fprintf(stderr, "imapfs: bad -o max_download '%s' (try 2G)\n", options->max_download);
        return -1;
    }
    return 0;
}

int fs_options_parse(struct fuse_args *args, struct fs_options *options)
{
    struct fuse_args scan = FUSE_ARGS_INIT(0, NULL), merged = FUSE_ARGS_INIT(0, NULL);
    struct fs_options first;
    char *file_url = NULL, *file_mountpoint = NULL, *config_path = NULL;
    int ret = -1, i;

    options_defaults(options);
    options_defaults(&first);
    if (args->argc < 1)
        goto out;

    /* Pass 1, on a copy: an ACCOUNT instead of a URL?  Which config file? */
    for (i = 0; i < args->argc; i++)
        if (fuse_opt_add_arg(&scan, args->argv[i]) < 0)
            goto out;
    if (fuse_opt_parse(&scan, &first, option_specs, option_proc) < 0)
        goto out;

    /* Pass 2: argv[0], the account's options from the file, then the
     * command line, which thus overrides the file. */
    if (fuse_opt_add_arg(&merged, args->argv[0]) < 0)
        goto out;
    if (first.account && !first.show_help && !first.show_version) {
        /* "imapfs:NAME" is NAME: in fstab, a bare NAME that exists as a
         * file in mount(8)'s working directory (/ at boot: "home", "srv")
         * would be turned into its path before imapfs sees it */
        const char *name = first.account;
        if (strncmp(name, "imapfs:", 7) == 0)
            name += 7;
        if (!*name) {
            fprintf(stderr, "imapfs: an empty account name\n");
            goto out;
        }
        config_path = first.config ? strdup(first.config) : config_default_path();
        if (!config_path)
            goto out;
        if (config_read(config_path, name, &merged, &file_url, &file_mountpoint) < 0)
            goto out;
    }
    for (i = 1; i < args->argc; i++)
        if (fuse_opt_add_arg(&merged, args->argv[i]) < 0)
            goto out;
    if (fuse_opt_parse(&merged, options, option_specs, option_proc) < 0)
        goto out;
    /* args now holds what is left for libfuse (args->argv may be main's) */
    fuse_opt_free_args(args);
    *args = merged;
    merged = (struct fuse_args)FUSE_ARGS_INIT(0, NULL);

    if (options->show_help || options->show_version) {
        ret = 0;
        goto out;
    }
    if (options->account) {
        free(options->url);
        options->url = file_url;
        file_url = NULL;
        if (!options->mountpoint) {
            options->mountpoint = file_mountpoint;
            file_mountpoint = NULL;
        }
    }
    if (!options->url || !options->mountpoint) {
        fprintf(stderr, "imapfs: usage: imapfs [options] imaps://USER@HOST[:PORT]|ACCOUNT "
                        "MOUNTPOINT (see --help)\n");
        goto out;
    }
    ret = options_check(options);
out:
    fuse_opt_free_args(&scan);
    fuse_opt_free_args(&merged);
    fs_options_free(&first);
    free(config_path);
    free(file_url);
    free(file_mountpoint);
    return ret;
}

void fs_options_free(struct fs_options *options)
{
    free(options->url);
    free(options->mountpoint);
    free(options->password_file);
    free(options->password_cmd);
    free(options->auth);
    free(options->oauth_token_cmd);
    free(options->cafile);
    free(options->tls_verify);
    free(options->tls);
    free(options->cache_size);
    free(options->trash);
    free(options->max_download);
    free(options->cache_dir);
    free(options->cache_max);
    free(options->config);
    free(options->account);
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

char *fs_secret_from_command(const char *command, const char *what, char *err, size_t errlen)
{
    FILE *pipe = popen(command, "r");
    if (!pipe) {
        snprintf(err, errlen, "cannot run %s: %s", what, strerror(errno));
        return NULL;
    }
    char *secret = first_line(pipe);
    /* drain so the command does not die of SIGPIPE */
    char sink[256];
    while (fread(sink, 1, sizeof(sink), pipe) > 0)
        ;
    int status = pclose(pipe);
    if (status != 0 || !secret || !*secret) {
        if (secret)
            OPENSSL_cleanse(secret, strlen(secret));
        free(secret);
        if (status != 0)
            snprintf(err, errlen, "%s failed (exit status %d)", what,
                     WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        else
            snprintf(err, errlen, "%s printed nothing", what);
        return NULL;
    }
    return secret;
}

/* At mount time, a command's failure is the one line the user sees. */
static char *secret_or_say_why(const char *command, const char *what)
{
    char err[256];
    char *secret = fs_secret_from_command(command, what, err, sizeof(err));
    if (!secret)
        fprintf(stderr, "imapfs: %s\n", err);
    return secret;
}

char *fs_password_get(const struct fs_options *options)
{
    char *password = NULL;

    if (options->auth_mode != IMAP_AUTH_PASSWORD) {
        if (!options->oauth_token_cmd) {
            fprintf(stderr, "imapfs: -o auth=%s needs -o oauth_token_cmd=CMD (a command that "
                            "prints a fresh access token)\n", options->auth);
            return NULL;
        }
        return secret_or_say_why(options->oauth_token_cmd, "oauth_token_cmd");
    }

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
    if (options->password_cmd)
        return secret_or_say_why(options->password_cmd, "password_cmd");
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
