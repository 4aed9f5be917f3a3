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
    /* Messages quote what servers send (mailbox names, BYE texts): control
     * characters are escaped, so a hostile server can neither forge log
     * lines nor send escape sequences to a terminal. */
    char message[2048], safe[4 * sizeof(message)];
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    size_t j = 0;
    for (const unsigned char *c = (const unsigned char *)message; *c; c++) {
        if (*c < 0x20 || *c == 0x7f)
            j += (size_t)snprintf(safe + j, sizeof(safe) - j, "\\x%02x", *c);
        else
            safe[j++] = (char)*c;
    }
    safe[j] = '\0';
    if (to_syslog) {
        syslog(priorities[level], "%s", safe);
    } else {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        pthread_mutex_lock(&log_lock);
        fprintf(stderr, "imapfs[%ld.%03ld] %s: %s\n", (long)now.tv_sec % 100000,
                now.tv_nsec / 1000000, names[level], safe);
        pthread_mutex_unlock(&log_lock);
    }
}
