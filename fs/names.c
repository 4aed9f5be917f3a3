/* fs/names.c — mailbox name components <-> file names, and UID file names.
 *
 * The mapping must be a bijection between valid components and the names it
 * produces, or two directory entries could reach one mailbox (or one entry
 * two).  The decoder therefore re-encodes what it decoded and insists on
 * getting the input back: that rejects every spelling the encoder would not
 * have produced ("%41", lower-case "%2f", "%2E" inside a name) without a
 * second list of rules to keep in step with the first.
 */
#include "fs/names.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Length of the valid UTF-8 sequence at s (no overlongs, no surrogates, at
 * most U+10FFFF), or 0. */
static size_t utf8_sequence(const unsigned char *s)
{
    uint32_t c = s[0], min;
    size_t len;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2; c &= 0x1f; min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3; c &= 0x0f; min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4; c &= 0x07; min = 0x10000;
    } else {
        return 0;
    }
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;  /* also stops at the NUL terminator */
        c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    return len;
}

static int needs_escape(unsigned char c)
{
    return c == '%' || c == '/' || c < 0x20 || c == 0x7f;
}

char *fs_name_from_component(const char *component)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *s = (const unsigned char *)component;
    size_t len, i;
    char *name, *o;

    if (!component || !*component) {
        errno = EINVAL;
        return NULL;
    }
    if (strcmp(component, ".") == 0 || strcmp(component, "..") == 0)
        return strdup(component[1] ? "%2E%2E" : "%2E");

    len = strlen(component);
    for (i = 0; i < len;) {
        size_t n = utf8_sequence(s + i);
        if (n == 0) {
            errno = EINVAL;
            return NULL;
        }
        i += n;
    }
    if (len > (SIZE_MAX - 1) / 3) {
        errno = ENOMEM;
        return NULL;
    }
    name = malloc(len * 3 + 1);
    if (!name)
        return NULL;
    for (o = name, i = 0; i < len; i++) {
        if (needs_escape(s[i])) {
            *o++ = '%';
            *o++ = hex[s[i] >> 4];
            *o++ = hex[s[i] & 0xf];
        } else {
            *o++ = (char)s[i];
        }
    }
    *o = '\0';
    return name;
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

char *fs_name_to_component(const char *name)
{
    const unsigned char *s = (const unsigned char *)name;
    char *component, *o, *again;

    if (!name || !*name) {
        errno = EINVAL;
        return NULL;
    }
    component = malloc(strlen(name) + 1);
    if (!component)
        return NULL;
    for (o = component; *s; s++) {
        if (*s == '%') {
            int high = hex_value(s[1]), low = high < 0 ? -1 : hex_value(s[2]);
            if (low < 0 || (high == 0 && low == 0))
                goto invalid;  /* bad %XX, or %00 */
            *o++ = (char)(high << 4 | low);
            s += 2;
        } else {
            /* '/' and raw controls are caught by the comparison below too;
             * saying it here keeps the intent readable */
            if (*s == '/' || *s < 0x20 || *s == 0x7f)
                goto invalid;
            *o++ = (char)*s;
        }
    }
    *o = '\0';

    again = fs_name_from_component(component);
    if (!again || strcmp(again, name) != 0) {
        free(again);
        goto invalid;  /* not something the encoder produces */
    }
    free(again);
    return component;

invalid:
    free(component);
    errno = EINVAL;
    return NULL;
}

int fs_name_to_uid(const char *name, unsigned int *uid)
{
    uint64_t value = 0;
    const char *s = name;

    if (!name || *s < '1' || *s > '9')
        return -ENOENT;  /* also rules out leading zeros and UID 0 */
    for (; *s >= '0' && *s <= '9'; s++) {
        value = value * 10 + (uint64_t)(*s - '0');
        if (value > UINT32_MAX)
            return -ENOENT;
    }
    if (strcmp(s, ".eml") != 0)
        return -ENOENT;
    if (uid)
        *uid = (unsigned int)value;
    return 0;
}

void fs_name_from_uid(unsigned int uid, char *buf, size_t buflen)
{
    if (buflen)
        snprintf(buf, buflen, "%u.eml", uid);
}

static int ends_with(const char *name, size_t len, const char *suffix)
{
    size_t n = strlen(suffix);
    return len >= n && memcmp(name + len - n, suffix, n) == 0;
}

int fs_name_is_scratch(const char *name)
{
    size_t len = name ? strlen(name) : 0;
    if (len < 3)
        return 0;
    if (name[0] == '#' && name[len - 1] == '#')
        return 1;                               /* emacs auto-save */
    if (name[0] != '.')
        return 0;
    if (strncmp(name, ".~lock.", 7) == 0 && name[len - 1] == '#')
        return 1;                               /* LibreOffice */
    if (ends_with(name, len, ".kate-swp"))
        return 1;
    /* vim (and nano's locks): ".swp", then ".swo" ... ".swa", ".svz" ... ".saa" */
    const char *ext = name + len - 4;
    return len >= 4 && ext[0] == '.' && ext[1] == 's' && ext[2] >= 'a' && ext[2] <= 'w' &&
           ext[3] >= 'a' && ext[3] <= 'z' && (ext == name || ext[-1] != '.');
}

int fs_name_is_desktop_trash(const char *name)
{
    if (!name || strncmp(name, ".Trash", 6) != 0)
        return 0;
    const char *s = name + 6;
    if (*s == '\0')
        return 1;
    if (*s++ != '-' || *s == '\0')
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}
