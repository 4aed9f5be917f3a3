/* fs/main.c — imapfs: mount an IMAP account as a directory tree.
 *
 * Order matters for a clear failure: options, password, connect and log in,
 * list folders, mount, and only then detach from the terminal.  A wrong
 * password, an unreachable host or an untrusted certificate therefore print
 * one line on stderr and exit non-zero with nothing mounted. */
#include "fs/fs.h"
#include "imap/log.h"

#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/crypto.h>

/* The FUSE device, read and written as libfuse would, but for one answer.
 * libfuse 3.14 takes ENODEV from a read as "unmounted" and stops quietly,
 * and any other error as a failure of the daemon.  When the unmount's
 * abort of the connection races with a read that has just found a request,
 * the kernel answers ECONNABORTED instead: the connection is just as gone,
 * so it is read as ENODEV, and fusermount3 -u ends with status 0 every
 * time.  (An administrator's abort through /sys/fs/fuse/connections reads
 * as ENODEV already, since libfuse does not ask for FUSE_ABORT_ERROR;
 * test_aborted_connection_ends_the_daemon_cleanly walks that path.  The race
 * itself cannot be provoked on purpose.) */
static ssize_t device_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (n < 0 && errno == ECONNABORTED) {
        log_debug("the kernel aborted the FUSE connection");
        errno = ENODEV;
    }
    return n;
}

static ssize_t device_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    return writev(fd, iov, count);
}

static const struct fuse_custom_io device_io = { .writev = device_writev, .read = device_read };

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fs_options options;
    struct imap_session *first = NULL;
    struct fs_account *account = NULL;
    struct fs_watcher *watcher = NULL;
    struct fuse_session *se = NULL;
    char *password = NULL, err[512], fsname[512];
    int ret = 1;

    signal(SIGPIPE, SIG_IGN);
    /* Message bodies come and go in large blocks: serve every block of
     * 256 KiB or more with its own mapping (glibc's threshold would otherwise
     * creep up and leave freed bodies in the heap), and keep few arenas, so
     * memory given back by the body cache really leaves the process. */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    mallopt(M_ARENA_MAX, 4);
    if (fs_options_parse(&args, &options) < 0)
        goto out;
    if (options.show_help) {
        fs_options_usage(argv[0]);
        printf("\nFUSE options:\n");
        fuse_lowlevel_help();
        ret = 0;
        goto out;
    }
    if (options.show_version) {
        printf("imapfs %s\n", IMAPFS_VERSION);
        fuse_lowlevel_version();
        ret = 0;
        goto out;
    }
    imap_log_set_level(options.debug ? IMAP_LOG_DEBUG : IMAP_LOG_WARN);

    password = fs_password_get(&options);
    if (!password)
        goto out;
    struct imap_config config = {
        .host = options.host,
        .port = options.port,
        .user = options.user,
        .password = password,
        .tls = options.tls_mode,
        .cafile = options.cafile,
        .tls_verify = !(options.tls_verify && strcmp(options.tls_verify, "no") == 0),
        .timeout = (int)options.timeout,
        .auth = options.auth_mode,
    };
    if (!config.tls_verify)
        fprintf(stderr, "imapfs: warning: TLS certificate verification is off (-o tls_verify=no)\n");
    if (config.tls == IMAP_TLS_NONE)
        fprintf(stderr, "imapfs: warning: no TLS (-o tls=none); the password travels in clear\n");

    int login = imap_session_open(&config, &first, err, sizeof(err));
    if (login == -EACCES && config.auth != IMAP_AUTH_PASSWORD) {
        /* A rejected token: maybe expired.  Ask for a fresh one, once. */
        char why[256];
        char *fresh = fs_secret_from_command(options.oauth_token_cmd, "oauth_token_cmd", why,
                                             sizeof(why));
        if (!fresh)
            snprintf(err, sizeof(err), "%s", why);
        if (fresh) {
            OPENSSL_cleanse(password, strlen(password));
            free(password);
            password = fresh;
            config.password = password;
            login = imap_session_open(&config, &first, err, sizeof(err));
        }
    }
    /* Unreachable (not refused: a wrong password or certificate never
     * falls back) with a persistent cache: mount from it, read-only until
     * the server answers. */
    int unreachable = login == -ECONNREFUSED || login == -EHOSTUNREACH ||
                      login == -ENETUNREACH || login == -ETIMEDOUT || login == -ECONNRESET;
    if (login < 0 && !unreachable) {
        fprintf(stderr, "imapfs: %s\n", err);
        goto out;
    }
    account = fs_account_new(&options, &config, first);
    if (!account) {
        imap_session_close(first);
        fprintf(stderr, "imapfs: out of memory\n");
        goto out;
    }
    if (login < 0) {
        if (fs_account_load_folders_offline(account) < 0) {
            fprintf(stderr, "imapfs: %s\n", err);
            goto out;
        }
        fprintf(stderr, "imapfs: warning: %s; mounting what is cached, read-only, until the "
                        "server answers\n", err);
    } else if (fs_account_load_folders(account) < 0) {
        fprintf(stderr, "imapfs: cannot list the folders of %s\n", options.host);
        goto out;
    }

    /* Private by default: the kernel checks our 0600/0700 modes. */
    snprintf(fsname, sizeof(fsname), "-ofsname=imapfs#%s@%s,subtype=imapfs,default_permissions",
             options.user, options.host);
    for (char *c = fsname; *c; c++)
        if (*c == ' ')
            *c = '_';
    if (fuse_opt_add_arg(&args, fsname) < 0)
        goto out;
    se = fuse_session_new(&args, &fs_operations, sizeof(fs_operations), account);
    if (!se) {
        fprintf(stderr, "imapfs: bad FUSE options (see --help)\n");
        goto out;
    }
    if (fuse_set_signal_handlers(se) != 0)
        goto out;
    if (fuse_session_mount(se, options.mountpoint) != 0) {
        fprintf(stderr, "imapfs: cannot mount on %s\n", options.mountpoint);
        goto out_handlers;
    }
    if (fuse_session_custom_io(se, &device_io, fuse_session_fd(se)) != 0)
        goto out_unmount;
    if (fuse_daemonize(options.foreground) != 0)
        goto out_unmount;
    if (!options.foreground)
        imap_log_use_syslog();
    /* Threads start only now: fuse_daemonize forks, and threads do not follow. */
    if (fs_notifier_start(fs_account_notifier(account), se) < 0) {
        log_error("cannot start the notifier thread");
        goto out_unmount;
    }
    if (fs_account_start(account) < 0) {
        log_error("cannot start the read-ahead thread");
        goto out_unmount;
    }
    watcher = fs_watcher_start(account, options.poll_interval, options.idle_timeout);
    if (!watcher)
        log_warn("cannot start the watcher: changes by other clients show up only when "
                 "listings time out");

    struct fuse_loop_config *loop = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(loop, 32);
    fuse_loop_cfg_set_idle_threads(loop, 8);
    ret = fuse_session_loop_mt(se, loop) != 0;
    fuse_loop_cfg_destroy(loop);

out_unmount:
    fs_watcher_stop(watcher);
    fuse_session_unmount(se);
out_handlers:
    fuse_remove_signal_handlers(se);
out:
    /* The account (and its notifier thread) goes before the session it uses. */
    fs_account_free(account);
    if (se)
        fuse_session_destroy(se);
    if (password) {
        OPENSSL_cleanse(password, strlen(password));
        free(password);
    }
    fs_options_free(&options);
    fuse_opt_free_args(&args);
    return ret;
}
