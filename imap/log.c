/* imap/log.c — see log.h. */
#include "imap/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>
#include <time.h>

static enum imap_log_level current_level = IMAP_LOG_WARN;
static int to_syslog;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER; /* keeps lines whole */

void imap_log_set_level(enum imap_log_level level) { current_level = level; }
int imap_log_enabled(enum imap_log_level level) { return level <= current_level; }

void imap_log_use_syslog(void)
{
    openlog("imapfs", LOG_PID, LOG_DAEMON);
    to_syslog = 1;
}

void imap_log(enum imap_log_level level, const char *fmt, ...)
{
    static const char *const names[] = { "error", "warning", "info", "debug" };
    static const int priorities[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
    va_list ap;

    if (!imap_log_enabled(level))
        return;
    va_start(ap, fmt);
    if (to_syslog) {
        vsyslog(priorities[level], fmt, ap);
    } else {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        pthread_mutex_lock(&log_lock);
        fprintf(stderr, "imapfs[%ld.%03ld] %s: ", (long)now.tv_sec % 100000,
                now.tv_nsec / 1000000, names[level]);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        pthread_mutex_unlock(&log_lock);
    }
    va_end(ap);
}
