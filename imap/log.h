/* imap/log.h — one small logger for the whole program.  Lives in imap/
 * because the client is the lowest room that logs; fs/ uses it too.
 * Messages go to stderr, or to syslog once the daemon has detached.
 * Never log a password or token: callers redact before they format. */
#ifndef IMAP_LOG_H
#define IMAP_LOG_H

enum imap_log_level { IMAP_LOG_ERROR, IMAP_LOG_WARN, IMAP_LOG_INFO, IMAP_LOG_DEBUG };

void imap_log_set_level(enum imap_log_level level);
int imap_log_enabled(enum imap_log_level level);
/* Switch to syslog (after daemonizing). */
void imap_log_use_syslog(void);
void imap_log(enum imap_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define log_error(...) imap_log(IMAP_LOG_ERROR, __VA_ARGS__)
#define log_warn(...)  imap_log(IMAP_LOG_WARN, __VA_ARGS__)
#define log_info(...)  imap_log(IMAP_LOG_INFO, __VA_ARGS__)
#define log_debug(...) do { if (imap_log_enabled(IMAP_LOG_DEBUG)) imap_log(IMAP_LOG_DEBUG, __VA_ARGS__); } while (0)

#endif
