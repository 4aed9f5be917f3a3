"""Writes: move, delete, new mail, immutability, folders, flags.

Every test acts on the mount with real tools (or plain system calls where
the errno matters) and then looks at the server through the independent
client (imaplib, ``imapserver.Checker``); expectations never come from
imapfs itself.  It also checks that the mount's own view is right at once.

The whole module runs twice, against two Dovecots:

* ``full``: Dovecot's own capabilities (MOVE, UIDPLUS, LITERAL+, CONDSTORE, ...)
  but NOTIFY, so the mount watches with IDLE and a poll;
* ``imap4rev1``: the capability list cut to plain ``IMAP4rev1``, so imapfs
  must fall back: UID COPY + STORE \\Deleted instead of MOVE, no UID EXPUNGE
  (without UIDPLUS a removed message stays on the server flagged \\Deleted and
  the mount hides every \\Deleted message), synchronizing literals, no
  CONDSTORE.  (Dovecot still sends APPENDUID/COPYUID codes it no longer
  advertises.)

Both Dovecots run without their mailbox list index (``list_index=False``),
and so without NOTIFY, which needs it: with NOTIFY on, Dovecot 2.3.19 can
corrupt that index while these tests rename folders, and its LIST then
answers from a stale tree (see imapserver.TestServer).  What is checked here
is what the server holds after each write, so its LIST must read the Maildir.
NOTIFY, renames included, is covered by test_sync.py.

Each variant has one server for the module (``server`` and ``checker`` are
overridden here; conftest's ``mount`` and ``mounter`` then use it) and one
shared mount.  The server starts empty and ``PREP`` gives every test folders
of its own, made with the checker before the mount starts, so the tests do
not disturb each other.  The last tests put tests/integration/faultproxy.py
between imapfs and Dovecot and cut the connection in the middle of an
APPEND and of a MOVE.
"""

import errno
import mmap
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import imapserver
from fsutil import errno_of, read_bytes
from faultproxy import FaultProxy
from imapserver import imap_quote

VARIANTS = {"full": None, "imap4rev1": "IMAP4rev1"}

FLAGS_XATTR = "user.imap.flags"

# A change made by another client shows on the mount within this time
# (the mount polls the folders in use every 2 s).
OTHER_CLIENT_DEADLINE = 6.0


def message(tag, extra=b""):
    """A small CRLF message with a unique subject and Message-ID."""
    return (f"From: Fixture Sender <sender@example.org>\r\n"
            f"To: Alice <alice@example.org>\r\n"
            f"Subject: {tag}\r\n"
            f"Message-ID: <{tag}@imapfs.test>\r\n"
            f"Date: Mon, 04 Mar 2024 09:15:00 +0100\r\n"
            f"\r\n"
            f"This is {tag}.\r\n").encode() + extra


# Folder (raw IMAP name; '/' is the rig's delimiter) -> (message tags, flags of each).
# Created and filled by the checker before the mount starts: UIDs are 1, 2, ...
PREP = {
    "same-uid-mv/src": (["smv1", "smv2", "smv3"], "\\Seen"),
    "same-uid-mv/dst": (["dmv1", "dmv2", "dmv3"], ""),
    "same-uid-rename/src": (["srn1", "srn2", "srn3"], "\\Seen $Work"),
    "same-uid-rename/dst": (["drn1", "drn2", "drn3"], ""),
    "move-new-name/src": (["mnn1", "mnn2"], "\\Flagged"),
    "move-new-name/dst": ([], ""),
    "bad-rename": (["br1", "br2"], ""),
    "ping": (["pi1", "pi2", "pi3"], ""),
    "pong": (["po1", "po2", "po3"], ""),
    "rm": (["rm1", "rm2", "rm3", "rm4"], "\\Seen"),
    "fresh/cp": ([], ""),
    "fresh/cp-p": ([], ""),
    "fresh/cat": ([], ""),
    "fresh/redirection": ([], ""),
    "fresh/rsync": ([], ""),
    "fresh/rsync-a": ([], ""),
    "fresh/mv": ([], ""),
    "fresh/touch": ([], ""),
    "fresh/redate": ([], ""),
    "scratch": (["sc1"], ""),
    "sed-i": (["sd1"], ""),
    "trash": (["tr1"], ""),
    "fresh/not-mail": ([], ""),
    "fresh/tempfile": ([], ""),
    "written-name/src": ([], ""),
    "written-name/dst": ([], ""),
    "fresh/written-name-uv": ([], ""),
    "just-stored/src": (["js1"], ""),
    "just-stored/dst": ([], ""),
    "fresh/alias-listed": ([], ""),
    "fresh/alias-unlisted": ([], ""),
    "cp-within/src": (["cw1", "cw2"], "\\Seen"),
    "cp-within/dst": (["cwd1"], ""),
    "fresh/gone": ([], ""),
    "immutable": (["im1", "im2"], "\\Seen"),
    "nonempty": (["ne1"], ""),
    "nonempty-parent/child": ([], ""),
    "rmdir-race": ([], ""),
    "merge-a": (["ma1"], ""),
    "loop0": ([], ""),
    "loop0/sub": (["lo1"], ""),
    "merge-b": (["mb1"], ""),
    "flags": (["fl1", "fl2"], "\\Seen"),
    "flags-other": (["fo1", "fo2"], ""),
    "race-one/src": (["ro1", "ro2", "ro3"], ""),
    "race-one/a": ([], ""),
    "race-one/b": ([], ""),
    "race-two/src": (["rt1", "rt2", "rt3"], ""),
    "race-two/a": ([], ""),
    "race-two/b": ([], ""),
    "trash-src": (["tr1", "tr2", "tr3"], "\\Seen"),
    "Trash": ([], ""),
    "fault-append": ([], ""),
    "fault-redate": ([], ""),
    "fault-rm-written": ([], ""),
    "fault-rm-written/listed": ([], ""),
    "fault-rm-written/unlisted": ([], ""),
    "fault-move-request/src": (["fmq1", "fmq2", "fmq3"], "\\Seen"),
    "fault-move-request/dst": ([], ""),
    "fault-move-answer/src": (["fma1", "fma2", "fma3"], "\\Seen"),
    "fault-move-answer/dst": ([], ""),
    "fault-move-select/src": (["fms1", "fms2", "fms3"], "\\Seen"),
    "fault-move-select/dst": ([], ""),
}


# --------------------------------------------------------------------------
# fixtures: one server (empty, then PREP) and one mount per variant

@pytest.fixture(scope="module", params=sorted(VARIANTS))
def server(request):
    srv = imapserver.TestServer(capabilities=VARIANTS[request.param], seed=False,
                                tied_to_parent=True, list_index=False)
    srv.variant = request.param
    srv.uidplus = VARIANTS[request.param] is None
    try:
        srv.start()
        with srv.checker() as c:
            for raw, (tags, flags) in PREP.items():
                c._ok(*c.imap.create(imap_quote(raw)), f"CREATE {raw}")
                for tag in tags:
                    c._ok(*c.imap.append(imap_quote(raw), f"({flags})", None, message(tag)),
                          f"APPEND {tag}")
        yield srv
    finally:
        srv.stop()
        if srv.dir:
            if request.session.testsfailed:
                sys.stderr.write(f"\nwrite test server ({request.param}) files kept in {srv.dir}\n")
            else:
                srv.remove()


@pytest.fixture(scope="module")
def checker(server):
    c = server.checker()
    yield c
    c.close()


# --------------------------------------------------------------------------
# helpers

def run(cmd, **kwargs):
    """A shell command (str) or argv (list); stdout+stderr together as text."""
    return subprocess.run(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60, **kwargs)


def ename(err):
    return errno.errorcode.get(err, str(err)) if err else "success"


def ls(path):
    return sorted(os.listdir(path))


def names(*uids):
    return sorted(f"{uid}.eml" for uid in uids)


def crlf(data):
    """Bare LF -> CRLF, what IMAP stores."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def store(checker, raw, uid, how, flags):
    """Another client changes flags: UID STORE uid how (flags), read-write."""
    checker._ok(*checker.imap.select(imap_quote(raw)), f"SELECT {raw}")
    checker._ok(*checker.imap.uid("STORE", str(uid), how, f"({flags})"), f"STORE {raw} {uid}")


def live(checker, raw):
    """{uid: meta} of the messages in raw not flagged \\Deleted."""
    return {uid: meta for uid, meta in checker.messages(raw).items()
            if "\\Deleted" not in meta["flags"]}


def folder_names(checker):
    return {raw for _, _, raw, _ in checker.list_folders()}


def all_messages(checker):
    """{raw folder: set of UIDs} of every selectable folder."""
    return {raw: set(checker.messages(raw)) for flags, _, raw, _ in checker.list_folders()
            if not flags & {"\\Noselect", "\\NonExistent"}}


def assert_removed(server, checker, raw, uid):
    """A message imapfs removed from raw: expunged (UIDPLUS), or without
    UIDPLUS still there but flagged \\Deleted."""
    msgs = checker.messages(raw)
    if server.uidplus:
        assert uid not in msgs, f"{raw} UID {uid} still on the server: {msgs.get(uid)}"
    else:
        assert uid in msgs, f"{raw} UID {uid} expunged, but the server has no UIDPLUS"
        assert "\\Deleted" in msgs[uid]["flags"], f"{raw} UID {uid} not flagged \\Deleted: {msgs[uid]}"


# --------------------------------------------------------------------------
# move

@pytest.mark.parametrize("how", ["mv", "rename"])
def test_move_into_folder_holding_the_same_uid(how, mount, server, checker):
    """`mv src/2.eml dst/` (or rename() onto dst/2.eml) when dst/2.eml exists:
    the moved message gets a new UID in dst, the old dst/2.eml is untouched."""
    src, dst = f"same-uid-{how}/src", f"same-uid-{how}/dst"
    msrc, mdst = os.path.join(mount.mountpoint, src), os.path.join(mount.mountpoint, dst)
    src_bodies, dst_bodies = checker.bodies(src), checker.bodies(dst)
    src_meta = checker.messages(src)
    assert ls(msrc) == names(1, 2, 3) and ls(mdst) == names(1, 2, 3)
    assert read_bytes(os.path.join(mdst, "2.eml")) == dst_bodies[2]     # in the page cache now

    if how == "mv":
        r = run(["mv", os.path.join(msrc, "2.eml"), mdst + "/"])
        assert r.returncode == 0, f"mv failed: {r.stdout}"
    else:
        os.rename(os.path.join(msrc, "2.eml"), os.path.join(mdst, "2.eml"))

    # the mount, at once
    src_now, dst_now = ls(msrc), ls(mdst)
    dst_read = {n: read_bytes(os.path.join(mdst, n)) for n in dst_now}
    # the server
    after = checker.bodies(dst)
    new = sorted(set(after) - set(dst_bodies))
    assert len(new) == 1, f"{dst} on the server: UIDs {sorted(after)}, before {sorted(dst_bodies)}"
    new_uid = new[0]
    assert new_uid > 3
    assert after[new_uid] == src_bodies[2], "moved message's bytes differ"
    for uid, body in dst_bodies.items():
        assert after[uid] == body, f"{dst} UID {uid} changed on the server"
    meta = checker.messages(dst)[new_uid]
    assert meta["flags"] == src_meta[2]["flags"], "flags not kept by the move"
    assert meta["internaldate"] == src_meta[2]["internaldate"], "INTERNALDATE not kept by the move"
    assert_removed(server, checker, src, 2)
    assert set(live(checker, src)) == {1, 3}

    assert src_now == names(1, 3), f"mount's {src} right after the move"
    assert dst_now == names(1, 2, 3, new_uid), f"mount's {dst} right after the move"
    assert dst_read["2.eml"] == dst_bodies[2], f"{dst}/2.eml on the mount is not the old message"
    assert dst_read[f"{new_uid}.eml"] == src_bodies[2]
    assert os.stat(os.path.join(mdst, "2.eml")).st_size == len(dst_bodies[2])


def test_move_to_another_name_lists_under_the_new_uid(mount, server, checker):
    """rename(src/1.eml, dst/77.eml): the message moves and lists as its new
    UID; no 77.eml lingers."""
    src, dst = "move-new-name/src", "move-new-name/dst"
    msrc, mdst = os.path.join(mount.mountpoint, src), os.path.join(mount.mountpoint, dst)
    body = checker.body(src, 1)
    assert ls(msrc) == names(1, 2) and ls(mdst) == []
    os.rename(os.path.join(msrc, "1.eml"), os.path.join(mdst, "77.eml"))
    stale = os.path.exists(os.path.join(mdst, "77.eml"))
    dst_now = ls(mdst)
    after = checker.bodies(dst)
    assert list(after.values()) == [body], f"{dst} on the server: {sorted(after)}"
    new_uid = next(iter(after))
    assert checker.messages(dst)[new_uid]["flags"] == {"\\Flagged"}
    assert_removed(server, checker, src, 1)
    assert not stale, "77.eml still resolves on the mount after the move"
    assert dst_now == names(new_uid)
    assert ls(msrc) == names(2)
    assert read_bytes(os.path.join(mdst, f"{new_uid}.eml")) == body


def test_moved_message_is_usable_at_once(mount, server, checker):
    """A message moved back and forth between two folders (onto the name of
    a message already there, as `mv ping/N.eml pong/` does when pong/N.eml
    exists): right after each move, the listing shows it under its new UID,
    it reads back, and the old occupant of the name is still itself."""
    mp = mount.mountpoint
    body = checker.body("ping", 1)
    here, uid = "ping", 1
    wrong = []
    for i in range(6):
        there = "pong" if here == "ping" else "ping"
        occupant = checker.body(there, 2)
        before = set(ls(os.path.join(mp, there)))
        os.rename(os.path.join(mp, here, f"{uid}.eml"), os.path.join(mp, there, "2.eml"))
        step = f"ls {there}"
        try:
            after = set(ls(os.path.join(mp, there)))
            new = sorted(after - before)
            assert len(new) == 1, f"{there} listed {sorted(before)} before, {sorted(after)} after"
            step = f"ls {here}"
            assert f"{uid}.eml" not in ls(os.path.join(mp, here)), f"{here}/{uid}.eml still listed"
            step = f"read {there}/{new[0]} (the moved message)"
            assert read_bytes(os.path.join(mp, there, new[0])) == body, "wrong bytes"
            step = f"read {there}/2.eml (the old occupant of the name)"
            assert read_bytes(os.path.join(mp, there, "2.eml")) == occupant, "not its old message"
        except (OSError, AssertionError) as e:
            wrong.append(f"move {i + 1}, {here}/{uid}.eml -> {there}/2.eml: {step}: {e!r}")
        # where the server says it is, for the next round
        moved = [u for u, b in checker.bodies(there).items() if b == body
                 and "\\Deleted" not in checker.messages(there)[u]["flags"]]
        assert len(moved) == 1, f"move {i + 1}: the message is in {there} {len(moved)} times"
        here, uid = there, moved[0]
    assert not wrong, "\n".join(wrong)


def test_bad_renames_are_refused(mount, checker):
    """A message's name is its UID: no renames within a folder, no other
    names, no moves out of the mailbox tree."""
    f = "bad-rename"
    mf = os.path.join(mount.mountpoint, f)
    bodies = checker.bodies(f)
    meta = checker.messages(f)
    cases = [
        ("rename within the folder", errno.EPERM, os.path.join(mf, "1.eml"), os.path.join(mf, "9.eml")),
        ("rename onto a sibling", errno.EPERM, os.path.join(mf, "1.eml"), os.path.join(mf, "2.eml")),
        ("rename to a non-N.eml name elsewhere", errno.EINVAL, os.path.join(mf, "1.eml"),
         os.path.join(mount.mountpoint, "move-new-name", "dst", "note.txt")),
        ("rename to the root (no mailbox)", errno.EPERM, os.path.join(mf, "1.eml"),
         os.path.join(mount.mountpoint, "1.eml")),
    ]
    wrong = []
    for what, want, a, b in cases:
        got = errno_of(os.rename, a, b)
        if got != want:
            wrong.append(f"{what}: {ename(got)}, expected {ename(want)}")
    assert not wrong, "\n".join(wrong)
    assert checker.bodies(f) == bodies and checker.messages(f) == meta, f"{f} changed on the server"
    assert ls(mf) == names(1, 2)
    assert not os.path.exists(os.path.join(mount.mountpoint, "1.eml"))


# --------------------------------------------------------------------------
# delete

def test_rm_expunges_only_that_uid(mount, server, checker):
    """Another client flagged UID 2 \\Deleted; rm 3.eml must remove 3 only."""
    f = "rm"
    mf = os.path.join(mount.mountpoint, f)
    store(checker, f, 2, "+FLAGS", "\\Deleted")
    if server.uidplus:
        assert ls(mf) == names(1, 2, 3, 4)
    else:
        # without UIDPLUS the mount hides every \Deleted message
        assert ls(mf) == names(1, 3, 4)
    r = run(["rm", os.path.join(mf, "3.eml")])
    assert r.returncode == 0, f"rm failed: {r.stdout}"
    listing = ls(mf)
    msgs = checker.messages(f)
    assert 2 in msgs, "UID 2 (\\Deleted by another client) was expunged by rm of 3.eml"
    assert "\\Deleted" in msgs[2]["flags"]
    assert_removed(server, checker, f, 3)
    assert set(live(checker, f)) == {1, 4}
    if server.uidplus:
        assert set(msgs) == {1, 2, 4}
        assert listing == names(1, 2, 4)
    else:
        assert set(msgs) == {1, 2, 3, 4}
        assert listing == names(1, 4)
    assert not os.path.exists(os.path.join(mf, "3.eml"))


def test_trash_option_moves_to_the_trash_folder(mounter, server):
    """-o trash=Trash: rm moves the message to Trash; rm in Trash expunges."""
    m = mounter(server=server, options=mounter.default_options(server) + ["trash=Trash"])
    mf = os.path.join(m.mountpoint, "trash-src")
    mtrash = os.path.join(m.mountpoint, "Trash")
    with server.checker() as checker:
        body = checker.body("trash-src", 1)
        meta = checker.messages("trash-src")[1]
        assert ls(mf) == names(1, 2, 3) and ls(mtrash) == []
        r = run(["rm", os.path.join(mf, "1.eml")])
        assert r.returncode == 0, f"rm failed: {r.stdout}"
        src_now, trash_now = ls(mf), ls(mtrash)
        trash = checker.bodies("Trash")
        assert list(trash.values()) == [body], f"Trash on the server: {sorted(trash)}"
        trash_uid = next(iter(trash))
        assert checker.messages("Trash")[trash_uid]["flags"] == meta["flags"]
        assert_removed(server, checker, "trash-src", 1)
        assert src_now == names(2, 3)
        assert trash_now == names(trash_uid)
        assert read_bytes(os.path.join(mtrash, f"{trash_uid}.eml")) == body

        # rm inside the trash folder really deletes
        r = run(["rm", os.path.join(mtrash, f"{trash_uid}.eml")])
        assert r.returncode == 0, f"rm in Trash failed: {r.stdout}"
        assert ls(mtrash) == []
        assert live(checker, "Trash") == {}
        assert_removed(server, checker, "Trash", trash_uid)
        assert set(live(checker, "trash-src")) == {2, 3}
    m.unmount()


# --------------------------------------------------------------------------
# new mail

# 2024-03-05 10:00:00 +0100: the local file's mtime where a tool keeps it
LOCAL_MTIME = 1709629200


def local_message(tmp_path, tool, size=0):
    """A LF-only message file in tmp_path (8-bit UTF-8, optionally padded to
    about size bytes), mtime LOCAL_MTIME.  Returns (path, its bytes)."""
    head = (f"From: Local Writer <writer@example.org>\n"
            f"To: Alice <alice@example.org>\n"
            f"Subject: written with {tool}\n"
            f"Message-ID: <{tool}.{time.time_ns()}@imapfs.test>\n"
            f"Date: Tue, 05 Mar 2024 10:00:00 +0100\n"
            f"MIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=utf-8\n"
            f"Content-Transfer-Encoding: 8bit\n"
            f"\n"
            f"Grüße from {tool}.\n"
            f"A line that already ends in CRLF\r\n").encode()
    body = b""
    n = 0
    while len(head) + len(body) < size:
        body += f"line {n:07d} of the padding, to cross several writes\n".encode()
        n += 1
    data = head + body + b"-- \nend\n"
    path = tmp_path / f"{tool}-msg.eml"
    path.write_bytes(data)
    os.utime(path, (LOCAL_MTIME, LOCAL_MTIME))
    return str(path), data


def check_new_message(server, checker, mount, folder, data, name="msg.eml", internaldate=None):
    """folder was empty: now exactly one message, data with CRLF line ends,
    listed once under its UID on the mount (not under name).  Returns the UID."""
    mf = os.path.join(mount.mountpoint, folder)
    listing = ls(mf)
    bodies = checker.bodies(folder)
    assert len(bodies) == 1, f"{folder} on the server holds UIDs {sorted(bodies)}, expected one new message"
    uid, body = next(iter(bodies.items()))
    assert body == crlf(data), "stored message differs from the file (modulo LF -> CRLF)"
    meta = checker.messages(folder)[uid]
    assert "\\Deleted" not in meta["flags"]
    if internaldate is not None:
        assert meta["internaldate"] == internaldate, "INTERNALDATE is not the file's mtime"
    assert listing == names(uid), f"mount lists {listing}, expected only {uid}.eml"
    assert read_bytes(os.path.join(mf, f"{uid}.eml")) == body
    return uid


def test_cp_appends(mount, server, checker, tmp_path):
    src, data = local_message(tmp_path, "cp", size=1 << 20)        # ~1 MB: many writes, a big literal
    dst = os.path.join(mount.mountpoint, "fresh", "cp", "msg.eml")
    r = run(["cp", src, dst])
    assert r.returncode == 0, f"cp failed: {r.stdout}"
    uid = check_new_message(server, checker, mount, "fresh/cp", data)
    # the name it was written under resolves to the new message for a while
    assert os.stat(dst).st_size == len(crlf(data))
    assert os.stat(dst).st_ino == os.stat(os.path.join(mount.mountpoint, "fresh", "cp", f"{uid}.eml")).st_ino


def test_cp_p_appends_with_the_files_date(mount, server, checker, tmp_path):
    src, data = local_message(tmp_path, "cp-p")
    r = run(["cp", "-p", src, os.path.join(mount.mountpoint, "fresh", "cp-p") + "/"])
    assert r.returncode == 0, f"cp -p failed: {r.stdout}"
    check_new_message(server, checker, mount, "fresh/cp-p", data, internaldate=LOCAL_MTIME)


def test_cat_redirect_appends(mount, server, checker, tmp_path):
    src, data = local_message(tmp_path, "cat", size=200_000)
    dst = os.path.join(mount.mountpoint, "fresh", "cat", "msg.eml")
    r = run(f"cat '{src}' > '{dst}'")
    assert r.returncode == 0, f"cat > failed: {r.stdout}"
    check_new_message(server, checker, mount, "fresh/cat", data)


def test_shell_redirection_of_several_commands_appends_once(mount, server, checker, tmp_path):
    """`{ printf head; cat body; echo; } > file`: several processes write
    through one redirection; one message, stored when the shell closes it."""
    src, data = local_message(tmp_path, "redirection", size=50_000)
    head, rest = data.split(b"\n\n", 1)
    (tmp_path / "head").write_bytes(head + b"\n\n")
    (tmp_path / "rest").write_bytes(rest)
    dst = os.path.join(mount.mountpoint, "fresh", "redirection", "msg.eml")
    r = run(f"{{ cat '{tmp_path}/head'; cat '{tmp_path}/rest'; printf 'trailer\\n'; }} > '{dst}'")
    assert r.returncode == 0, f"shell redirection failed: {r.stdout}"
    check_new_message(server, checker, mount, "fresh/redirection", data + b"trailer\n")


@pytest.mark.parametrize("args", [[], ["-a"]], ids=["rsync", "rsync-a"])
def test_rsync_appends(args, mount, server, checker, tmp_path):
    """rsync writes a temporary file, closes it (the APPEND), sets its
    attributes and renames it into place.  With -a the time it sets comes
    after the APPEND: the message is dated again, and only that copy stays
    (without UIDPLUS the date stays: test_times_set_after_close_...)."""
    folder = "fresh/rsync" + ("-a" if args else "")
    src, data = local_message(tmp_path, folder.replace("/", "-"), size=100_000)
    r = run(["rsync"] + args + [src, os.path.join(mount.mountpoint, folder, "msg.eml")])
    assert r.returncode == 0, f"rsync {' '.join(args)} failed: {r.stdout}"
    check_new_message(server, checker, mount, folder, data,
                      internaldate=LOCAL_MTIME if args and server.uidplus else None)


def test_times_set_after_close_date_the_new_message(mount, server, checker):
    """A time set on mail this mount has just stored (by the name it was
    written under, as rsync does) becomes its INTERNALDATE: the message is
    stored again with that date and its flags, and the first copy expunged.
    Without UIDPLUS the first copy could only be flagged, so the time is
    accepted and changes nothing, as on any other message."""
    folder = "fresh/redate"
    mf = os.path.join(mount.mountpoint, folder)
    alias = os.path.join(mf, "draft.eml")
    data = message("redate")
    with open(alias, "wb") as f:
        f.write(data)
    (first, before), = checker.messages(folder).items()
    os.setxattr(os.path.join(mf, f"{first}.eml"), FLAGS_XATTR, b"\\Flagged")
    assert before["internaldate"] != LOCAL_MTIME

    os.utime(alias, (LOCAL_MTIME, LOCAL_MTIME))
    after = checker.messages(folder)
    assert len(after) == 1, f"{folder} on the server: {after}"
    (uid, meta), = after.items()
    assert checker.body(folder, uid) == data
    assert "\\Flagged" in meta["flags"] and "\\Deleted" not in meta["flags"]
    if server.uidplus:
        assert uid != first, "the message was not stored again"
        assert meta["internaldate"] == LOCAL_MTIME
        st = os.stat(alias)
        assert st.st_mtime == LOCAL_MTIME, "the name written under does not show the new date"
        assert st.st_ino == os.stat(os.path.join(mf, f"{uid}.eml")).st_ino
    else:
        assert uid == first and meta["internaldate"] == before["internaldate"]
    assert ls(mf) == names(uid)

    # the same time again, by its UID name: nothing to do
    os.utime(os.path.join(mf, f"{uid}.eml"), (LOCAL_MTIME, LOCAL_MTIME))
    assert checker.messages(folder) == after


def test_mail_just_stored_can_be_flagged_moved_and_removed(mount, checker):
    """Flags, mv and rm of a message right after it was written.  The
    connection that acts on it may have had the folder selected since before
    the APPEND (made on another connection), and a server acts only on the
    messages in a connection's view: Dovecot then answers OK and changes
    nothing.  (A message flagged \\Deleted counts as gone: without UIDPLUS
    that is all rm and mv can do.)"""
    src, dst = "just-stored/src", "just-stored/dst"
    msrc, mdst = os.path.join(mount.mountpoint, src), os.path.join(mount.mountpoint, dst)
    for i in range(4):
        for how in ("flags", "mv", "rm"):
            data = message(f"just-stored-{how}-{i}")
            with open(os.path.join(msrc, f"new-{how}-{i}.eml"), "wb") as f:
                f.write(data)
            uid = max(checker.messages(src))
            path = os.path.join(msrc, f"{uid}.eml")
            assert f"{uid}.eml" in ls(msrc)    # as a script finds the new name
            if how == "flags":
                os.setxattr(path, FLAGS_XATTR, b"\\Flagged")
                assert "\\Flagged" in checker.messages(src)[uid]["flags"], \
                    f"round {i}: the flag set on {uid}.eml right after it was written is not on the server"
            elif how == "mv":
                os.rename(path, os.path.join(mdst, f"{uid}.eml"))
                assert uid not in live(checker, src), f"round {i}: mv left {uid}.eml in {src}"
                assert data in [checker.body(dst, u) for u in live(checker, dst)], \
                    f"round {i}: mv did not bring {uid}.eml to {dst}"
            else:
                os.unlink(path)
                assert uid not in live(checker, src), f"round {i}: rm left {uid}.eml on the server"


def test_viewing_a_message_in_vim_stores_nothing(mount, checker, tmp_path):
    """vim keeps a swap file beside the file it shows (".1.eml.swp", written
    at once, closed and removed when vim quits): it would have been stored as
    new mail.  Editors' scratch names are refused (EPERM), and vim then keeps
    its swap file in its next directory."""
    folder = "scratch"
    mf = os.path.join(mount.mountpoint, folder)
    before = checker.messages(folder)
    r = run(["vim.tiny", "-u", "NONE", "-i", "NONE", "-es", "-c", "q", os.path.join(mf, "1.eml")],
            env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 0, f"vim: {r.stdout}"
    assert checker.messages(folder) == before, "viewing a message in vim stored new mail"
    for name in (".1.eml.swp", ".1.eml.swo", "#1.eml#", ".1.eml.kate-swp", ".~lock.1.eml#"):
        assert errno_of(open, os.path.join(mf, name), "wb") == errno.EPERM, name
    assert checker.messages(folder) == before
    assert ls(mf) == names(1)


def test_sed_in_place_on_a_message_is_refused_and_leaves_nothing(mount, checker):
    """sed -i writes the edited text to a temporary file beside the message,
    closes it (the APPEND) and renames it over the message: an overwrite,
    refused with EACCES like any other.  sed then removes its temporary file,
    and with it the new message: the folder is as it was."""
    folder = "sed-i"
    mf = os.path.join(mount.mountpoint, folder)
    body = checker.body(folder, 1)
    r = run(["sed", "-i", "s/This is/This was/", os.path.join(mf, "1.eml")])
    assert r.returncode != 0 and "Permission denied" in r.stdout, f"sed -i: {r.returncode} {r.stdout}"
    assert set(live(checker, folder)) == {1}, f"{folder} on the server: {checker.messages(folder)}"
    assert checker.body(folder, 1) == body
    assert ls(mf) == names(1)
    assert read_bytes(os.path.join(mf, "1.eml")) == body


def test_a_file_that_is_not_mail_is_not_stored(mount, checker):
    """Only what begins as mail does (a header field, or an mbox "From "
    line) becomes a message: a text note, a file manager's .directory or a
    picture copied into a folder fails at close() with EBADMSG, and nothing
    is stored."""
    folder = "fresh/not-mail"
    mf = os.path.join(mount.mountpoint, folder)
    for name, data in (("note.txt", b"hello, this is not a message\n"),
                       (".directory", b"[Dolphin]\nTimestamp=2026,12,7\nVersion=4\n"),
                       ("picture.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),
                       ("blank-first.eml", b"\nSubject: no header before the blank line\n\nx\n"),
                       ("colon-later.eml", b"Subject line without a colon first\nA: b\n\nx\n")):
        f = open(os.path.join(mf, name), "wb")
        f.write(data)
        assert errno_of(f.close) == errno.EBADMSG, name
        assert checker.messages(folder) == {}, f"{name} was stored"
    assert ls(mf) == []
    # a shell's redirection: the last close is dup2()'s, whose error the
    # shell never sees, but nothing is stored either
    run(f"echo hello > '{mf}/hello.txt'")
    assert checker.messages(folder) == {}, "echo hello > file was stored"
    # the forms mail takes are stored
    mbox = b"From sender@example.org Mon Mar  4 09:15:00 2024\nSubject: mbox\n\nx\n"
    for name, data in (("mbox.eml", mbox), ("header.eml", message("not-mail-header"))):
        with open(os.path.join(mf, name), "wb") as f:
            f.write(data)
    assert sorted(checker.bodies(folder).values()) == sorted([crlf(mbox), message("not-mail-header")])


def test_a_temporary_file_removed_after_close_leaves_no_mail(mount, server, checker):
    """Python's NamedTemporaryFile in a folder: written, closed (the APPEND),
    then removed by the name it was written under.  The file the program made
    is gone, so is the message."""
    import tempfile
    folder = "fresh/tempfile"
    mf = os.path.join(mount.mountpoint, folder)
    with tempfile.NamedTemporaryFile(dir=mf, suffix=".eml") as f:
        f.write(message("tempfile"))
        f.flush()
    assert live(checker, folder) == {}, "the removed temporary file is still a message"
    assert checker.messages(folder) == {} or not server.uidplus
    assert ls(mf) == []


def test_mv_of_new_mail_by_its_written_name_leaves_one_copy(mount, checker):
    """mv of the name new mail was written under to another folder: the
    rename of that name across folders is EXDEV, so mv copies and removes
    it; the message ends up in the target only."""
    src, dst = "written-name/src", "written-name/dst"
    msrc, mdst = os.path.join(mount.mountpoint, src), os.path.join(mount.mountpoint, dst)
    data = message("written-name")
    with open(os.path.join(msrc, "draft.eml"), "wb") as f:
        f.write(data)
    r = run(["mv", os.path.join(msrc, "draft.eml"), mdst + "/"])
    assert r.returncode == 0, f"mv failed: {r.stdout}"
    assert live(checker, src) == {}, f"mv left the message in {src}"
    copies = [uid for uid in live(checker, dst) if checker.body(dst, uid) == data]
    assert len(copies) == 1, f"{dst} holds the message {len(copies)} times"
    assert ls(msrc) == [] and ls(mdst) == names(*copies)


def test_rm_of_a_written_name_never_expunges_another_message(mount, server):
    """The name new mail was written under names that message only: when the
    folder is deleted and made again (a new UIDVALIDITY, UID 1 again, another
    message) before the rm, the rm removes the name and expunges nothing.
    (Its own sessions: a session whose selected mailbox is deleted is
    disconnected by Dovecot.)"""
    folder = "fresh/written-name-uv"
    mf = os.path.join(mount.mountpoint, folder)
    with open(os.path.join(mf, "draft.eml"), "wb") as f:
        f.write(message("written-name-uv-old"))
    with server.checker() as c:
        (uid, _), = c.messages(folder).items()
        old_uv = c.uidvalidity(folder)
    imapserver.wait_until_uidvalidity_can_change(old_uv)
    with server.checker() as c:
        c._ok(*c.imap.delete(imap_quote(folder)), "DELETE")
    with server.checker() as c:             # a new session: see test_sync
        c._ok(*c.imap.create(imap_quote(folder)), "CREATE")
        c._ok(*c.imap.append(imap_quote(folder), None, None, message("written-name-uv-new")),
              "APPEND")
    with server.checker() as c:
        new_uv = c.uidvalidity(folder)
        assert new_uv != old_uv and set(c.messages(folder)) == {uid}, "rig: UID and UIDVALIDITY"
    deadline = time.monotonic() + OTHER_CLIENT_DEADLINE
    while os.getxattr(os.path.join(mf, f"{uid}.eml"), "user.imap.uidvalidity").decode() != str(new_uv):
        assert time.monotonic() < deadline, "the mount never saw the new UIDVALIDITY"
        time.sleep(0.2)
    try:
        os.unlink(os.path.join(mf, "draft.eml"))
    except FileNotFoundError:
        pass                                 # the name went with the old folder: fine too
    with server.checker() as c:
        assert set(live(c, folder)) == {uid}, "rm of the old written name expunged the new UID 1"
        assert c.body(folder, uid) == message("written-name-uv-new")


def test_move_to_trash_in_a_file_manager_is_refused_and_changes_nothing(mount, checker):
    """A file manager's "Move to Trash" (GIO's, as Nautilus and Thunar do it;
    KDE's follows the same freedesktop.org spec) makes .Trash-UID/files and
    .Trash-UID/info at the top of the mount: on the server those would be
    three mail folders, the message moved into one of them.  The mount
    refuses that trash, so the file manager says it cannot trash here (and
    offers to delete); the message and the server's folders stay as they
    were."""
    mf = os.path.join(mount.mountpoint, "trash")
    before = folder_names(checker)
    (uid, meta), = checker.messages("trash").items()
    r = run(["gio", "trash", os.path.join(mf, f"{uid}.eml")])
    assert r.returncode != 0, f"gio trash said it trashed the message: {r.stdout}"
    assert "trash directory" in r.stdout, r.stdout
    assert folder_names(checker) == before, f"new folders: {sorted(folder_names(checker) - before)}"
    assert live(checker, "trash") == {uid: meta}
    assert checker.body("trash", uid) == message("tr1")
    assert ls(mf) == names(uid)
    with pytest.raises(PermissionError):    # the spec's shared trash, which gio never makes
        os.mkdir(os.path.join(mount.mountpoint, ".Trash"))
    assert folder_names(checker) == before
    assert not [n for n in ls(mount.mountpoint) if n.startswith(".Trash")]


def test_mv_from_local_disk_appends(mount, server, checker, tmp_path):
    """rename() across file systems is EXDEV; mv copies (keeping the date) and
    removes the source."""
    src, data = local_message(tmp_path, "mv", size=20_000)
    r = run(["mv", src, os.path.join(mount.mountpoint, "fresh", "mv") + "/"])
    assert r.returncode == 0, f"mv failed: {r.stdout}"
    assert not os.path.exists(src), "mv left the source behind"
    check_new_message(server, checker, mount, "fresh/mv", data, internaldate=LOCAL_MTIME)


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_name_written_under_resolves_at_once(listed, mount, checker):
    """After close(), the name a new message was written under is an alias
    of NEWUID.eml (rsync stats and renames it, cp -p may set its times):
    a lookup right away must find it, whether or not the folder was listed
    on the mount before."""
    folder = "fresh/alias-" + ("listed" if listed else "unlisted")
    mf = os.path.join(mount.mountpoint, folder)
    if listed:
        assert ls(mf) == []
    data = message(f"alias-{folder}")
    with open(os.path.join(mf, "draft.eml"), "wb") as f:
        f.write(data)
    try:
        st = os.stat(os.path.join(mf, "draft.eml"))
    except OSError as e:
        st = e
    bodies = checker.bodies(folder)
    assert list(bodies.values()) == [data], f"{folder} on the server: {sorted(bodies)}"
    uid = next(iter(bodies))
    assert not isinstance(st, OSError), f"stat of the name just written under, right after close(): {st}"
    assert st.st_size == len(data)
    assert st.st_ino == os.stat(os.path.join(mf, f"{uid}.eml")).st_ino
    assert ls(mf) == names(uid)


def test_cp_between_folders_on_the_mount_appends_a_copy(mount, checker):
    """cp src/2.eml dst/ appends a copy; cp src/1.eml dst/ while dst/1.eml
    exists is an overwrite, refused like any other."""
    src, dst = "cp-within/src", "cp-within/dst"
    msrc, mdst = os.path.join(mount.mountpoint, src), os.path.join(mount.mountpoint, dst)
    src_bodies, dst_body = checker.bodies(src), checker.body(dst, 1)
    r = run(["cp", os.path.join(msrc, "2.eml"), mdst + "/"])
    assert r.returncode == 0, f"cp failed: {r.stdout}"
    src_now, dst_now = ls(msrc), ls(mdst)
    after = checker.bodies(dst)
    assert len(after) == 2, f"{dst} on the server: {sorted(after)}"
    new_uid = max(after)
    assert after[new_uid] == src_bodies[2] and after[1] == dst_body
    assert src_now == names(1, 2)
    assert dst_now == names(1, new_uid)
    assert read_bytes(os.path.join(mdst, f"{new_uid}.eml")) == src_bodies[2]

    r = run(["cp", os.path.join(msrc, "1.eml"), mdst + "/"])
    assert r.returncode != 0 and "Permission denied" in r.stdout, \
        f"cp onto the existing dst/1.eml: status {r.returncode} {r.stdout}"
    assert checker.bodies(dst) == after, "the server changed"
    assert read_bytes(os.path.join(mdst, "1.eml")) == dst_body
    assert checker.bodies(src) == src_bodies, "cp changed the source folder"
    assert ls(mdst) == names(1, new_uid)


def test_empty_files_are_not_stored(mount, checker):
    """touch and `: >` create no message (servers refuse empty ones); the
    name does not stay behind."""
    mf = os.path.join(mount.mountpoint, "fresh", "touch")
    outcomes = {}
    for how, cmd in (("touch", f"touch '{mf}/empty.eml'"), (": >", f": > '{mf}/empty2.eml'")):
        r = run(cmd)
        outcomes[how] = (r.returncode, r.stdout.strip())
    listing = ls(mf)
    print("outcomes:", outcomes)
    assert checker.messages("fresh/touch") == {}, "an empty file was stored"
    assert listing == [], f"mount lists {listing} after creating empty files ({outcomes})"
    assert not os.path.exists(os.path.join(mf, "empty.eml"))


def test_failed_append_fails_close_and_stores_nothing(mount, checker, tmp_path):
    """The folder was deleted on the server behind the mount's back: the
    APPEND is refused, so close() (and cp) must fail, and nothing is stored
    (the folder is not created again)."""
    mf = os.path.join(mount.mountpoint, "fresh", "gone")
    assert ls(mf) == []
    checker._ok(*checker.imap.delete(imap_quote("fresh/gone")), "DELETE fresh/gone")
    before = all_messages(checker)

    failed_at = None
    f = None
    try:
        f = open(os.path.join(mf, "direct.eml"), "wb")
        f.write(message("direct"))
        f.close()
    except OSError as e:
        failed_at = e
    finally:
        if f is not None and not f.closed:
            try:
                f.close()
            except OSError:
                pass
    src, _ = local_message(tmp_path, "gone")
    r = run(["cp", src, mf + "/"])

    now = all_messages(checker)
    assert failed_at is not None, "writing a message into a folder gone from the server: close() succeeded"
    assert r.returncode != 0, f"cp into a folder gone from the server succeeded: {r.stdout}"
    assert "fresh/gone" not in now, "the deleted folder was created again"
    assert now == before, "something was stored on the server"


# --------------------------------------------------------------------------
# existing messages are immutable

def test_existing_messages_cannot_be_overwritten(mount, checker, tmp_path):
    f = "immutable"
    mf = os.path.join(mount.mountpoint, f)
    p = os.path.join(mf, "1.eml")
    bodies, meta = checker.bodies(f), checker.messages(f)
    st = os.stat(p)
    src, _ = local_message(tmp_path, "overwrite")

    def write_through(flags, at=0):
        # Where the kernel sends no OPEN (fs/ops.c, no-open mode) the open
        # itself succeeds and the write is refused; elsewhere the open is.
        fd = os.open(p, flags)
        try:
            os.pwrite(fd, b"overwritten", at) if not flags & os.O_APPEND else os.write(fd, b"x")
        finally:
            os.close(fd)

    def ftruncate_handle():
        with open(p, "r+b", buffering=0) as f:
            os.ftruncate(f.fileno(), 0)

    wrong = []
    for what, fn, *args in [
        ("open r+, write", write_through, os.O_RDWR),
        ("open r+, write past the end", write_through, os.O_RDWR, st.st_size),
        ("open a, write", write_through, os.O_WRONLY | os.O_APPEND),
        ("open O_WRONLY, write", write_through, os.O_WRONLY),
        ("open w (O_TRUNC)", lambda: open(p, "wb").close()),
        ("ftruncate of an r+ handle", ftruncate_handle),
        ("truncate", lambda: os.truncate(p, 0)),
        ("truncate to 10", lambda: os.truncate(p, 10)),
    ]:
        got = errno_of(fn, *args)
        if got != errno.EACCES:
            wrong.append(f"{what}: {ename(got)}, expected EACCES")
        if read_bytes(p) != bodies[1]:
            wrong.append(f"{what}: the file reads differently afterwards")
    # A shared writable mapping writes back after the fact; the refused
    # writeback must not leave its bytes readable as the message.
    try:
        with open(p, "r+b", buffering=0) as f, mmap.mmap(f.fileno(), 0) as mapped:
            mapped[0:11] = b"overwritten"
            mapped.flush()
        got = 0
    except OSError as e:
        got = e.errno
    if got not in (errno.EACCES, errno.EIO):
        wrong.append(f"writing through a shared mapping: {ename(got)}, expected EACCES or EIO")
    deadline = time.monotonic() + 5
    while read_bytes(p) != bodies[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    if read_bytes(p) != bodies[1]:
        wrong.append("after a write through a shared mapping the file reads differently")
    for cmd in (f"echo x > '{p}'", f"echo x >> '{p}'", f"cp '{src}' '{p}'",
                f"cp '{src}' '{os.path.join(mf, '2.eml')}'"):
        # bash: dash reports any failed write of its echo as "I/O error"
        r = run(cmd, executable="/bin/bash")
        if r.returncode == 0 or "Permission denied" not in r.stdout:
            wrong.append(f"{cmd} -> status {r.returncode}: {r.stdout.strip()}")
    assert not wrong, "\n".join(wrong)
    assert checker.bodies(f) == bodies and checker.messages(f) == meta, "the server copy changed"
    assert ls(mf) == names(1, 2)
    assert read_bytes(p) == bodies[1]
    st2 = os.stat(p)
    assert (st2.st_size, st2.st_mtime, st2.st_mode) == (st.st_size, st.st_mtime, st.st_mode)


def test_chmod_utime_are_accepted_chown_is_not(mount, checker):
    f = "immutable"
    p = os.path.join(mount.mountpoint, f, "2.eml")
    meta = checker.messages(f)
    st = os.stat(p)
    os.chmod(p, 0o644)
    os.utime(p, (LOCAL_MTIME, LOCAL_MTIME))
    os.utime(p)
    os.chown(p, os.getuid(), os.getgid())          # to oneself: fine
    assert errno_of(os.chown, p, os.getuid() + 12345, -1) == errno.EPERM
    assert errno_of(os.chown, p, -1, os.getgid() + 12345) == errno.EPERM
    st2 = os.stat(p)
    assert (st2.st_mode, st2.st_mtime, st2.st_uid, st2.st_gid, st2.st_size) == \
        (st.st_mode, st.st_mtime, st.st_uid, st.st_gid, st.st_size), "chmod/utime/chown changed the message"
    assert checker.messages(f) == meta
    r = run(["touch", p])
    assert r.returncode == 0, f"touch on an existing message: {r.stdout}"
    assert checker.messages(f) == meta


# --------------------------------------------------------------------------
# folders

def test_mkdir_rename_rmdir_with_non_ascii_names(mount, checker):
    mp = mount.mountpoint
    os.mkdir(os.path.join(mp, "Projekte"))
    os.mkdir(os.path.join(mp, "Projekte", "Ärger"))
    assert "Ärger" in ls(os.path.join(mp, "Projekte"))
    folders = folder_names(checker)
    assert {"Projekte", "Projekte/&AMQ-rger"} <= folders, sorted(folders)
    assert "Projekte/Ärger" not in folders and "Projekte/\u00c4rger" not in folders

    # a message in the subfolder travels with it
    checker._ok(*checker.imap.append(imap_quote("Projekte/&AMQ-rger"), "(\\Seen)", None,
                                     message("aerger")), "APPEND")
    assert ls(os.path.join(mp, "Projekte", "Ärger")) == names(1)

    os.rename(os.path.join(mp, "Projekte"), os.path.join(mp, "Projekte-Übersicht"))
    root = ls(mp)
    assert "Projekte-Übersicht" in root and "Projekte" not in root, root
    moved = os.path.join(mp, "Projekte-Übersicht", "Ärger")
    assert ls(moved) == names(1)
    assert read_bytes(os.path.join(moved, "1.eml")) == message("aerger")
    folders = folder_names(checker)
    assert {"Projekte-&ANw-bersicht", "Projekte-&ANw-bersicht/&AMQ-rger"} <= folders, sorted(folders)
    assert not {"Projekte", "Projekte/&AMQ-rger"} & folders, sorted(folders)
    assert set(checker.messages("Projekte-&ANw-bersicht/&AMQ-rger")) == {1}

    # up one level, to another non-ASCII name
    os.rename(moved, os.path.join(mp, "Ärger-oben"))
    assert ls(os.path.join(mp, "Projekte-Übersicht")) == []
    assert ls(os.path.join(mp, "Ärger-oben")) == names(1)
    folders = folder_names(checker)
    assert "&AMQ-rger-oben" in folders and "Projekte-&ANw-bersicht/&AMQ-rger" not in folders, sorted(folders)
    assert set(checker.messages("&AMQ-rger-oben")) == {1}

    os.rmdir(os.path.join(mp, "Projekte-Übersicht"))
    assert "Projekte-Übersicht" not in ls(mp)
    assert not os.path.exists(os.path.join(mp, "Projekte-Übersicht"))
    assert "Projekte-&ANw-bersicht" not in folder_names(checker)

    # mkdir of an existing folder
    assert errno_of(os.mkdir, os.path.join(mp, "Ärger-oben")) == errno.EEXIST


RENAMES = 25


def test_renamed_folder_is_usable_at_once(mount, checker):
    """A folder with a subfolder renamed again and again: right after each
    rename the new path lists and reads, the old one is gone."""
    mp = mount.mountpoint
    body = checker.body("loop0/sub", 1)
    wrong = []
    for i in range(RENAMES):
        old, new = f"loop{i}", f"loop{i + 1}"
        os.rename(os.path.join(mp, old), os.path.join(mp, new))
        step = f"ls {new}"
        try:
            assert ls(os.path.join(mp, new)) == ["sub"]
            step = f"ls {new}/sub"
            assert ls(os.path.join(mp, new, "sub")) == names(1)
            step = f"read {new}/sub/1.eml"
            assert read_bytes(os.path.join(mp, new, "sub", "1.eml")) == body
            step = f"{old} gone"
            assert not os.path.exists(os.path.join(mp, old))
        except (OSError, AssertionError) as e:
            wrong.append(f"rename {old} -> {new}: {step}: {e!r}")
    folders = folder_names(checker)
    last = f"loop{RENAMES}"
    assert {last, f"{last}/sub"} <= folders and not {"loop0", "loop0/sub"} & folders, sorted(folders)
    assert set(checker.messages(f"{last}/sub")) == {1}
    assert not wrong, f"{len(wrong)} of {RENAMES} renames:\n" + "\n".join(wrong)


def test_rmdir_refuses_folders_that_are_not_empty(mount, checker):
    mp = mount.mountpoint
    wrong = []
    for what, path in (("a folder with a message", os.path.join(mp, "nonempty")),
                       ("a folder with a subfolder", os.path.join(mp, "nonempty-parent"))):
        got = errno_of(os.rmdir, path)
        if got != errno.ENOTEMPTY:
            wrong.append(f"rmdir {what}: {ename(got)}, expected ENOTEMPTY")
    r = run(["rmdir", os.path.join(mp, "nonempty")])
    if r.returncode == 0 or "Directory not empty" not in r.stdout:
        wrong.append(f"shell rmdir: status {r.returncode}: {r.stdout.strip()}")
    assert not wrong, "\n".join(wrong)
    folders = folder_names(checker)
    assert {"nonempty", "nonempty-parent", "nonempty-parent/child"} <= folders
    assert set(checker.messages("nonempty")) == {1}
    assert "nonempty" in ls(mp) and ls(os.path.join(mp, "nonempty")) == names(1)


def test_folder_rename_onto_an_existing_folder_is_refused(mount, checker):
    """Folders are never merged or replaced."""
    mp = mount.mountpoint
    a, b = checker.bodies("merge-a"), checker.bodies("merge-b")
    got = errno_of(os.rename, os.path.join(mp, "merge-a"), os.path.join(mp, "merge-b"))
    assert got in (errno.EEXIST, errno.ENOTEMPTY), ename(got)
    assert {"merge-a", "merge-b"} <= folder_names(checker)
    assert checker.bodies("merge-a") == a and checker.bodies("merge-b") == b
    assert ls(os.path.join(mp, "merge-a")) == names(1) and ls(os.path.join(mp, "merge-b")) == names(1)


def test_rmdir_looks_at_the_server_first(mount, checker):
    """The mount saw the folder empty; another client then adds a message:
    rmdir must not delete it."""
    mf = os.path.join(mount.mountpoint, "rmdir-race")
    assert ls(mf) == []
    checker._ok(*checker.imap.append(imap_quote("rmdir-race"), "()", None, message("late")), "APPEND")
    got = errno_of(os.rmdir, mf)
    assert "rmdir-race" in folder_names(checker), "folder with a new message deleted"
    assert set(checker.messages("rmdir-race")) == {1}
    assert got == errno.ENOTEMPTY, ename(got)


def test_inbox_cannot_be_deleted_or_renamed(mount, checker):
    mp = mount.mountpoint
    inbox = os.path.join(mp, "INBOX")
    assert ls(inbox) == []                      # empty: only the INBOX rule can refuse
    wrong = []
    for what, want, fn, *args in [
        ("rmdir INBOX", {errno.EPERM}, os.rmdir, inbox),
        ("rename INBOX", {errno.EPERM}, os.rename, inbox, os.path.join(mp, "Eingang")),
        ("rename INBOX into a folder", {errno.EPERM}, os.rename, inbox,
         os.path.join(mp, "nonempty-parent", "INBOX")),
        ("rename a folder onto INBOX", {errno.EPERM, errno.EEXIST, errno.ENOTEMPTY}, os.rename,
         os.path.join(mp, "nonempty-parent", "child"), inbox),
        ("mkdir INBOX", {errno.EEXIST}, os.mkdir, inbox),
    ]:
        got = errno_of(fn, *args)
        if got not in want:
            wrong.append(f"{what}: {ename(got)}, expected {' or '.join(ename(w) for w in want)}")
    r = run(["rmdir", inbox])
    if r.returncode == 0:
        wrong.append(f"shell rmdir INBOX succeeded: {r.stdout}")
    assert not wrong, "\n".join(wrong)
    folders = folder_names(checker)
    assert "INBOX" in folders and "Eingang" not in folders and "nonempty-parent/child" in folders
    root = ls(mp)
    assert "INBOX" in root and "Eingang" not in root


# --------------------------------------------------------------------------
# flags

def get_flags(path):
    return set(os.getxattr(path, FLAGS_XATTR).decode().split())


def test_flags_xattr_round_trip(mount, checker):
    f = "flags"
    mf = os.path.join(mount.mountpoint, f)
    p = os.path.join(mf, "1.eml")
    other_before = checker.messages(f)[2]

    assert sorted(os.listxattr(p)) == sorted([FLAGS_XATTR, "user.imap.uid", "user.imap.uidvalidity",
                                              "user.mail.subject", "user.mail.from",
                                              "user.mail.date", "user.mime_type"])
    assert os.getxattr(p, "user.imap.uid") == b"1"
    assert int(os.getxattr(p, "user.imap.uidvalidity")) == checker.uidvalidity(f)
    assert get_flags(p) == {"\\Seen"}
    r = run(["getfattr", "--absolute-names", "-n", FLAGS_XATTR, "--only-values", p])
    assert r.returncode == 0 and r.stdout.split() == ["\\Seen"], r.stdout

    os.setxattr(p, FLAGS_XATTR, b"\\Seen \\Flagged $Work")
    assert checker.messages(f)[1]["flags"] == {"\\Seen", "\\Flagged", "$Work"}
    assert get_flags(p) == {"\\Seen", "\\Flagged", "$Work"}

    r = run(["setfattr", "-n", FLAGS_XATTR, "-v", "\\Answered $Label1", p])
    assert r.returncode == 0, r.stdout
    assert checker.messages(f)[1]["flags"] == {"\\Answered", "$Label1"}, "setfattr must replace the flags"
    assert get_flags(p) == {"\\Answered", "$Label1"}

    os.setxattr(p, FLAGS_XATTR, b"")
    assert checker.messages(f)[1]["flags"] == set()
    assert get_flags(p) == set()

    os.setxattr(p, FLAGS_XATTR, b"\\Seen")
    os.removexattr(p, FLAGS_XATTR)
    assert checker.messages(f)[1]["flags"] == set()
    assert get_flags(p) == set()

    os.setxattr(p, FLAGS_XATTR, b"\\Draft $Work")
    wrong = []
    for name in ("user.imap.uid", "user.imap.uidvalidity"):
        got = errno_of(os.setxattr, p, name, b"42")
        if got != errno.EPERM:
            wrong.append(f"setxattr {name}: {ename(got)}, expected EPERM")
    for bad in (b"\\Bogus", b"foo(bar", b'"quoted"', b"a\x00b", b"\\Seen {5}", b"a]b", b"%x", b"*"):
        got = errno_of(os.setxattr, p, FLAGS_XATTR, bad)
        if got != errno.EINVAL:
            wrong.append(f"setxattr flags {bad!r}: {ename(got)}, expected EINVAL")
    assert not wrong, "\n".join(wrong)
    assert checker.messages(f)[1]["flags"] == {"\\Draft", "$Work"}
    assert get_flags(p) == {"\\Draft", "$Work"}
    assert os.getxattr(p, "user.imap.uid") == b"1"
    assert checker.messages(f)[2] == other_before, "another message's flags changed"


def test_flags_set_by_another_client_show_up(mount, checker):
    f = "flags-other"
    p = os.path.join(mount.mountpoint, f, "1.eml")
    assert get_flags(p) == set()
    store(checker, f, 1, "FLAGS", "\\Flagged $Other")
    deadline = time.monotonic() + OTHER_CLIENT_DEADLINE
    seen = get_flags(p)
    while seen != {"\\Flagged", "$Other"} and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = get_flags(p)
    assert seen == {"\\Flagged", "$Other"}, \
        f"flags set by another client not seen on the mount within {OTHER_CLIENT_DEADLINE}s: {seen}"
    # and the mount's own change goes back
    os.setxattr(p, FLAGS_XATTR, b"\\Seen")
    assert checker.messages(f)[1]["flags"] == {"\\Seen"}


# --------------------------------------------------------------------------
# two moves of one message at once

def race(server, checker, mounts, base, uid, exclusive=True):
    """mv base/src/UID.eml to base/a (via mounts[0]) and base/b (via mounts[1])
    at the same moment.  Returns a description of what went wrong (or []).
    exclusive=False (two separate clients): the server alone decides whether
    both moves can happen, so only what imapfs can promise is checked: the
    message is never lost, and every mv that said it succeeded put it there."""
    raw_src, raw_a, raw_b = f"{base}/src", f"{base}/a", f"{base}/b"
    body = checker.body(raw_src, uid)
    before = {raw: set(checker.messages(raw)) for raw in (raw_a, raw_b)}
    for m in mounts:
        assert f"{uid}.eml" in ls(os.path.join(m.mountpoint, base, "src"))
    go = threading.Barrier(2)
    results = {}

    def mv(key, m, target):
        go.wait()
        results[key] = run(["mv", os.path.join(m.mountpoint, base, "src", f"{uid}.eml"),
                            os.path.join(m.mountpoint, base, target) + "/"])

    threads = [threading.Thread(target=mv, args=("a", mounts[0], "a")),
               threading.Thread(target=mv, args=("b", mounts[1], "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    wrong = []
    ok = sorted(k for k, r in results.items() if r.returncode == 0)
    where = {}
    for key, raw in (("a", raw_a), ("b", raw_b)):
        new = {u: m for u, m in live(checker, raw).items() if u not in before[raw]}
        if new:
            where[key] = new
    copies = sum(len(v) for v in where.values())
    status = ", ".join(f"mv to {k}: status {r.returncode} {r.stdout.strip()!r}" for k, r in sorted(results.items()))
    if not exclusive:
        # On a server without MOVE, UIDPLUS and CONDSTORE, one client may flag
        # the source \Deleted just before the other's COPY, which then copies
        # the flag too: that copy is on the server (nothing lost) but flagged.
        # So here "there" counts flagged copies as well.
        on_server = {}
        for key, raw in (("a", raw_a), ("b", raw_b)):
            new_any = {u for u in checker.messages(raw) if u not in before[raw]}
            if new_any:
                on_server[key] = new_any
        if not on_server and uid not in checker.messages(raw_src):
            wrong.append(f"UID {uid}: lost: in neither target nor the source ({status})")
        for key in ok:
            if key not in on_server:
                wrong.append(f"UID {uid}: mv to {key} succeeded but the message is not there "
                             f"({status})")
        return wrong
    if len(ok) != 1:
        wrong.append(f"UID {uid}: {len(ok)} mv succeeded ({status})")
    if copies != 1:
        wrong.append(f"UID {uid}: {copies} live copies on the server: "
                     f"{ {k: sorted(v) for k, v in where.items()} } ({status})")
    elif ok and list(where) != ok:
        wrong.append(f"UID {uid}: the message is in {list(where)} but the mv that succeeded went to {ok}")
    else:
        key = next(iter(where))
        new_uid = next(iter(where[key]))
        if checker.body(f"{base}/{key}", new_uid) != body:
            wrong.append(f"UID {uid}: the moved copy's bytes differ")
    if uid in live(checker, raw_src):
        wrong.append(f"UID {uid}: still live in {raw_src}")
    # the mount that succeeded shows it where it is, at once
    for key in where:
        if key in ok:
            m = mounts[0] if key == "a" else mounts[1]
            listing = ls(os.path.join(m.mountpoint, base, key))
            want = {f"{u}.eml" for u in where[key]}
            if not want <= set(listing):
                wrong.append(f"UID {uid}: the mount that moved it lists {base}/{key} as {listing}")
    return wrong


def test_two_moves_of_one_message_on_one_mount(mount, server, checker):
    wrong = []
    for uid in (1, 2, 3):
        wrong += race(server, checker, [mount, mount], "race-one", uid)
    assert not wrong, "\n".join(wrong)


def test_two_moves_of_one_message_on_two_mounts(mounter, server, checker):
    """Two imapfs processes are two IMAP clients: whether both UID MOVEs of
    one message can succeed is the server's doing (Dovecot 2.3 with Maildir
    lets both complete, leaving a copy in each target; without MOVE and
    CONDSTORE, IMAP has no test-and-set to prevent it).  What imapfs
    promises still holds: nothing is lost, and no mv reports a success that
    did not happen.  (Two processes on one mount: exactly one wins, above.)"""
    mounts = [mounter(server=server, extra_args=["-d"]) for _ in range(2)]
    wrong = []
    for uid in (1, 2, 3):
        wrong += race(server, checker, mounts, "race-two", uid, exclusive=False)
    assert not wrong, "\n".join(wrong)
    for m in mounts:
        m.unmount()


# --------------------------------------------------------------------------
# a connection killed in the middle of an APPEND or a MOVE
#
# tests/integration/faultproxy.py sits between imapfs and Dovecot's IMAPS
# port and cuts connections after a number of bytes (TLS passes through).
# Whatever happens, the outcome the tool reports must match the server.

FAULT_TIMEOUT = 5           # -o timeout
FAULT_LIMIT = 60            # no operation may take longer: no hang
RECOVERY = 15               # reconnect backoff is at most 10 s


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.host, server.imaps_port).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def faulty(mounter, server, proxy):
    """imapfs -d on imaps:// through the proxy (its log shows where the cut fell)."""
    return mounter(url=mounter.url(port=proxy.port, server=server),
                   options=mounter.default_options(server) + [f"timeout={FAULT_TIMEOUT}",
                                                              "connections=2"],
                   extra_args=["-d"])


def eventually_ls(path):
    """The listing once the mount has reconnected."""
    deadline = time.monotonic() + RECOVERY
    while True:
        try:
            return ls(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_connection_cut_in_the_middle_of_an_append(faulty, proxy, server, checker, tmp_path):
    """cp of a ~1 MB message; the connection carrying it is cut after 400 KB
    (inside the literal).  cp fails and nothing is stored, or cp succeeds
    and the message is there exactly once."""
    m = faulty
    folder = "fault-append"
    mf = os.path.join(m.mountpoint, folder)
    src, data = local_message(tmp_path, "fault-append", size=1 << 20)
    assert ls(mf) == []
    offset = len(m.log())
    proxy.cut_after(c2s=400_000, scope="all", limit=1)
    t = time.monotonic()
    r = run(["cp", src, mf + "/"], )
    elapsed = time.monotonic() - t
    proxy.clear_cuts()
    assert proxy.cuts >= 1, "the cut never happened"
    assert re.search(r"C: \S+ APPEND ", m.log()[offset:]), "no APPEND was sent"
    assert elapsed < FAULT_LIMIT
    stored = [uid for uid, body in checker.bodies(folder).items() if body == crlf(data)]
    print(f"cp status {r.returncode} {r.stdout.strip()!r} after {elapsed:.1f}s; stored as {stored}")
    others = set(checker.messages(folder)) - set(stored)
    assert not others, f"something else was stored in {folder}: UIDs {sorted(others)}"
    if r.returncode == 0:
        assert len(stored) == 1, f"cp succeeded, but the server holds the message {len(stored)} times"
    else:
        assert stored == [], f"cp failed ({r.stdout.strip()}), but the server holds the message as {stored}"
    assert m.proc.poll() is None, "imapfs died"
    assert eventually_ls(mf) == names(*stored)
    m.unmount()


def test_connection_cut_while_new_mail_is_dated_again(faulty, proxy, server, checker, tmp_path):
    """cp of a ~1 MB message, then a time set on it (rsync's order), with the
    connection cut inside the second APPEND that dates it again: the time
    fails and the first copy stays, or it succeeds and only the new copy
    is there.  Never both, never neither."""
    m = faulty
    folder = "fault-redate"
    mf = os.path.join(m.mountpoint, folder)
    src, data = local_message(tmp_path, "fault-redate", size=1 << 20)
    r = run(["cp", src, os.path.join(mf, "msg.eml")])
    assert r.returncode == 0, f"cp failed: {r.stdout}"
    (first, before), = checker.messages(folder).items()
    offset = len(m.log())
    proxy.cut_after(c2s=400_000, scope="all", limit=1)
    t = time.monotonic()
    try:
        os.utime(os.path.join(mf, "msg.eml"), (LOCAL_MTIME, LOCAL_MTIME))
        error = None
    except OSError as e:
        error = e
    elapsed = time.monotonic() - t
    proxy.clear_cuts()
    assert elapsed < FAULT_LIMIT
    live = {uid: meta for uid, meta in checker.messages(folder).items()
            if "\\Deleted" not in meta["flags"]}
    print(f"utime: {error} after {elapsed:.1f}s; live copies {sorted(live)}")
    if not server.uidplus:
        assert error is None and proxy.cuts == 0, "without UIDPLUS nothing is sent"
        assert live == {first: before}
        return
    assert proxy.cuts >= 1, "the cut never happened"
    assert re.search(r"C: \S+ APPEND ", m.log()[offset:]), "no second APPEND was sent"
    assert len(live) == 1, f"the message is live {len(live)} times: {sorted(live)}"
    (uid, meta), = live.items()
    assert checker.body(folder, uid) == crlf(data)
    if error is None:
        assert uid != first and meta["internaldate"] == LOCAL_MTIME
    else:
        assert (uid, meta["internaldate"]) == (first, before["internaldate"]), \
            f"utime failed ({error}), but the message changed"
    assert m.proc.poll() is None, "imapfs died"
    assert eventually_ls(mf) == names(uid)
    m.unmount()


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_rm_of_a_written_name_while_the_server_is_gone(listed, faulty, proxy, server, checker):
    """rm of the name new mail was written under needs the server: with
    every connection cut and new ones refused, rm fails (no hang) and the
    message stays; once the server is back the same rm removes it.
    'listed': the name resolves from the listing, and the expunge fails;
    'unlisted': resolving it needs the folder's listing, which fails (not a
    name that is not there)."""
    m = faulty
    folder = f"fault-rm-written/{'listed' if listed else 'unlisted'}"
    mf = os.path.join(m.mountpoint, folder)
    data = message(f"fault-rm-written-{listed}")
    with open(os.path.join(mf, "draft.eml"), "wb") as f:
        f.write(data)
    (uid, _), = checker.messages(folder).items()
    if listed:
        assert ls(mf) == names(uid)
    proxy.refuse("reset")
    proxy.cut_all()
    t = time.monotonic()
    err = errno_of(os.unlink, os.path.join(mf, "draft.eml"))
    elapsed = time.monotonic() - t
    proxy.accept()
    assert elapsed < FAULT_LIMIT
    assert err not in (0, errno.ENOENT), f"rm with the server gone: {ename(err)}"
    assert uid in live(checker, folder), "the failed rm removed the message"
    deadline = time.monotonic() + RECOVERY
    while (err := errno_of(os.unlink, os.path.join(mf, "draft.eml"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert err == 0, f"rm once the server is back: {ename(err)}"
    assert uid not in live(checker, folder), "rm once the server is back left the message"
    assert m.proc.poll() is None, "imapfs died"
    m.unmount()


def mv_under_cut(m, proxy, cut, path, target_dir, offset):
    """mv path target_dir/ with the proxy's cut armed (cut: cut_after's
    arguments); (mv's result, seconds, the mount's log from offset on)."""
    proxy.cut_after(**cut)
    t = time.monotonic()
    r = run(["mv", path, target_dir + "/"])
    elapsed = time.monotonic() - t
    proxy.clear_cuts()
    assert proxy.cuts >= 1, "the cut never happened"
    return r, elapsed, m.log()[offset:]


@pytest.mark.parametrize("where", ["request", "answer"])
def test_connection_cut_in_the_middle_of_a_move(where, faulty, proxy, server, checker):
    """mv src/2.eml dst/ while the connection is cut: in the command itself
    ("request": the server never gets all of it) or right after it
    ("answer": the server acts, the answer is lost).  Afterwards the message
    is live in exactly one folder, and mv's status says which."""
    m = faulty
    base = f"fault-move-{where}"
    src, dst = f"{base}/src", f"{base}/dst"
    msrc, mdst = os.path.join(m.mountpoint, src), os.path.join(m.mountpoint, dst)
    body = checker.body(src, 2)
    assert ls(msrc) == names(1, 2, 3) and ls(mdst) == []
    # A flag change on src/3.eml leaves a connection with src selected
    # read-write, so the move sends UID MOVE (or UID COPY) first, with no
    # SELECT before it.  Twice: the first changes the flags (and the
    # watcher's poll lists src again, EXAMINE), the second changes nothing.
    os.setxattr(os.path.join(msrc, "3.eml"), FLAGS_XATTR, b"\\Seen \\Flagged")
    time.sleep(2.5)
    os.stat(os.path.join(msrc, "2.eml"))
    os.setxattr(os.path.join(msrc, "3.eml"), FLAGS_XATTR, b"\\Seen \\Flagged")
    offset = len(m.log())
    # Without MOVE, imapfs first checks the source's flags and the target's
    # UIDNEXT (two commands), then sends UID COPY: cut at that third one.
    commands_before = 2 if server.variant == "imap4rev1" else 0
    if where == "request":
        cut = dict(c2s=8, scope="existing", skip_records=commands_before)
    else:
        cut = dict(s2c=1, scope="existing", skip_records=commands_before)
    r, elapsed, log = mv_under_cut(m, proxy, cut, os.path.join(msrc, "2.eml"), mdst, offset)
    assert re.search(r"C: \S+ UID (MOVE|COPY) 2 ", log), \
        f"the move's command was not sent after the cut was armed; log:\n{log[-5000:]}"
    assert elapsed < FAULT_LIMIT
    in_src = 2 in live(checker, src)
    in_dst = [uid for uid, meta in live(checker, dst).items() if checker.body(dst, uid) == body]
    where_now = (["src"] if in_src else []) + [f"dst UID {uid}" for uid in in_dst]
    status = f"mv status {r.returncode} {r.stdout.strip()!r}"
    print(f"{status} after {elapsed:.1f}s; live in {where_now}")
    assert len(where_now) == 1, f"after the cut the message is live in {where_now or 'no folder'} ({status})"
    if r.returncode == 0:
        assert in_dst, f"mv succeeded but the message is still in src ({status})"
    else:
        assert in_src, f"mv failed but the message moved to dst ({status})"
    assert m.proc.poll() is None, "imapfs died"
    assert eventually_ls(msrc) == (names(1, 2, 3) if in_src else names(1, 3))
    assert eventually_ls(mdst) == names(*in_dst)
    m.unmount()


def test_connection_broken_before_a_move_is_not_an_error(mounter, server, proxy, checker):
    """mv src/2.eml dst/ when every pooled connection breaks at its first
    command (a server restart, a NAT box): the move's SELECT changes nothing,
    so it is asked again on a new connection and mv succeeds; the message is
    live in dst only."""
    # No poll during the test: the cut must fall on the move, not on the
    # watcher's listing.
    m = mounter(url=mounter.url(port=proxy.port, server=server),
                options=mounter.default_options(server) + [f"timeout={FAULT_TIMEOUT}",
                                                           "connections=2", "poll_interval=3600"],
                extra_args=["-d"])
    src, dst = "fault-move-select/src", "fault-move-select/dst"
    msrc, mdst = os.path.join(m.mountpoint, src), os.path.join(m.mountpoint, dst)
    body = checker.body(src, 2)
    # Listing leaves the pooled connections with the folders EXAMINEd only,
    # so the move starts with SELECT.
    assert ls(msrc) == names(1, 2, 3) and ls(mdst) == []
    # The watcher's first poll may be running (it starts with the mount):
    # wait until the log has been quiet for half a second.
    offset, quiet_since = len(m.log()), time.monotonic()
    while time.monotonic() - quiet_since < 0.5:
        time.sleep(0.1)
        if len(m.log()) != offset:
            offset, quiet_since = len(m.log()), time.monotonic()
    r, elapsed, log = mv_under_cut(m, proxy, dict(c2s=8, scope="existing"),
                                   os.path.join(msrc, "2.eml"), mdst, offset)
    # The watcher's connection may be cut too; the move's SELECT must have
    # had no answer before its connection was lost.
    after_select = log.partition('SELECT "fault-move-select/src"')[2].splitlines()
    answer = next((line for line in after_select if " lost: " in line or "S: " in line), "")
    assert " lost: " in answer, f"the cut did not fall on the move's SELECT; log:\n{log[-5000:]}"
    assert r.returncode == 0, f"mv failed after a connection broke before the move: {r.stdout}"
    assert elapsed < FAULT_LIMIT
    moved = [uid for uid, meta in live(checker, dst).items() if checker.body(dst, uid) == body]
    assert 2 not in live(checker, src) and len(moved) == 1, \
        f"after mv: in src {2 in live(checker, src)}, in dst {moved}"
    assert eventually_ls(msrc) == names(1, 3)
    assert eventually_ls(mdst) == names(*moved)
    m.unmount()
