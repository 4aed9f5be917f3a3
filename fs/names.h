/* fs/names.h — mapping between one component of a mailbox name (already
 * decoded to UTF-8) and one file name on the mount.
 *
 * The server is untrusted: a component may be ".", "..", contain '/', control
 * characters or '%'.  The mapping is reversible and always yields a single,
 * safe path component:
 *   '%' -> "%25", '/' -> "%2F", bytes 0x01-0x1F and 0x7F -> "%XX",
 *   a whole component "." -> "%2E", ".." -> "%2E%2E".
 * Everything else (including valid UTF-8) passes unchanged. */
#ifndef FS_NAMES_H
#define FS_NAMES_H

#include <stddef.h>

/* Returns a malloc'd file name, or NULL (errno EINVAL) if the component is
 * empty or not valid UTF-8.  Caller frees. */
char *fs_name_from_component(const char *component);

/* The inverse: returns the malloc'd component, or NULL (errno EINVAL) if name
 * is not something fs_name_from_component could have produced (bad %XX,
 * empty, contains '/' or a raw control byte, is "." or "..").
 * fs_name_to_component(fs_name_from_component(x)) == x for every valid x. */
char *fs_name_to_component(const char *name);

/* Message file names: "4321.eml" <-> 4321.  fs_name_to_uid returns 0 on
 * success, -ENOENT for anything else (leading zeros, 0, > 2^32-1, no ".eml"). */
int fs_name_to_uid(const char *name, unsigned int *uid);
void fs_name_from_uid(unsigned int uid, char *buf, size_t buflen);

/* Nonzero for the scratch files editors make beside the file they open
 * (vim's and nano's ".NAME.swp" to ".NAME.saa", kate's ".NAME.kate-swp",
 * emacs's "#NAME#", LibreOffice's ".~lock.NAME#"): not mail.  Viewing a
 * message in vim would otherwise store its swap file as a new message. */
int fs_name_is_scratch(const char *name);

/* Nonzero for the trash directories of the freedesktop.org trash spec at
 * the top of a mount (".Trash", ".Trash-UID"), where a file manager's "Move
 * to Trash" (GIO, KIO) makes its own folders: on the server they would be
 * mail folders holding the trashed messages and stray ".trashinfo" files. */
int fs_name_is_desktop_trash(const char *name);

#endif
