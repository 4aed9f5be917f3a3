"""The persistent cache: bodies and listings on disk, remounts, offline mounts.

What a user is promised (README, imapfs(1) ``-o cache_dir``, cache/disk.h):

* by default the cache lives in ``$XDG_CACHE_HOME/imapfs/USER@HOST:PORT``,
  directories 0700 and files 0600; ``-o cache_dir=DIR`` puts it elsewhere,
  ``-o cache_dir=none`` keeps nothing, ``-o cache_max=SIZE`` bounds it;
* what was read before an unmount is on disk after it (the writer thread may
  lag a read, never the daemon's exit);
* a remount lists from disk, re-syncs with the server (CONDSTORE), and a warm
  ``grep -r`` fetches no body again: the ``-d`` log shows no ``BODY.PEEK[]``;
* one daemon per cache directory;
* a torn body file is never served: the next mount fetches it again;
* without a server the mount comes up from the cache, read-only (EROFS),
  serving what was cached, EIO (quickly) for what was not, and becomes a
  normal mount again once the server answers.

Expectations come from the independent client (imaplib) and the fixtures,
never from imapfs.  The account is changed, so the module has servers of its
own (seeded from tests/fixtures/mail; the checker connections set
TCP_NODELAY, which makes seeding take ~2 s instead of ~9 s).
"""

import errno
import glob
import os
import re
import stat
import subprocess
import time

import pytest

import imapserver
from fsutil import errno_of, read_bytes
from conftest import Mount
from imapserver import imap_quote

BODY_FETCH = re.compile(r"C: \S+ UID FETCH (\S+) \((?:[^)]*)BODY\.PEEK\[\]")


def start_server(request, **kwargs):
    srv = imapserver.FastServer(tied_to_parent=True, **kwargs)
    request.addfinalizer(lambda: (srv.stop(), srv.remove()))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def cache_server(request):
    """Seeded; shared by the tests of this module that do not stop it."""
    return start_server(request)


@pytest.fixture
def own_server(request):
    """Seeded; for a test that stops and restarts it."""
    return start_server(request)


def mount_with(mounter, srv, name, cache_dir=None, debug=False, options=(), env=None):
    """A mount on srv (imaps) with its own log; cache_dir None = the default."""
    opts = mounter.default_options(srv) + list(options)
    if cache_dir is not None:
        opts.append(f"cache_dir={cache_dir}")
    m = Mount(mounter.imapfs, mounter.url(server=srv), str(mounter.tmp_path / name),
              str(mounter.tmp_path / f"{name}.log"), options=opts,
              extra_args=["-d"] if debug else [], env=env)
    mounter.mounts.append(m)
    return m.start()


EXIT_BOUND = 10         # seconds for a daemon to exit after fusermount3 -u


def unmount_timed(m):
    """Unmount; require exit 0 (conftest); return how long the daemon took
    (its threads' stacks are in m.slow_exit_stacks past EXIT_BOUND)."""
    t = time.monotonic()
    m.unmount(slow_after=EXIT_BOUND)
    return time.monotonic() - t


def fixture_uid(srv, rel):
    return srv.seeded["messages"][rel]["uid"]


def folder_of(srv, rel):
    return srv.seeded["messages"][rel]["folder"]


def timed_errno(fn, *args):
    t = time.monotonic()
    e = errno_of(fn, *args)
    return e, time.monotonic() - t


def body_fetches(log):
    """UID sets of every BODY.PEEK[] fetch in a -d log."""
    return [m.group(1) for m in BODY_FETCH.finditer(log)]


def uid_set_contains(uid_set, uid):
    for part in uid_set.split(","):
        if ":" in part:
            lo, hi = part.split(":")
            lo = int(lo)
            hi = 2**32 if hi == "*" else int(hi)
            if min(lo, hi) <= uid <= max(lo, hi):
                return True
        elif int(part) == uid:
            return True
    return False


def mailbox_dir(cache_dir, mailbox):
    """DIR/m/HASH whose name file names mailbox (the name is the file's tail)."""
    found = []
    for name_file in glob.glob(os.path.join(cache_dir, "m", "*", "name")):
        data = read_bytes(name_file)
        if len(data) >= 32 and data[32:] == mailbox.encode():
            found.append(os.path.dirname(name_file))
    assert len(found) == 1, f"{mailbox}: cache dirs {found} under {cache_dir}"
    return found[0]


PACK_NAME = re.compile(r"p[0-9a-f]{16}$")


def pack_toc(path):
    """[(uid, offset, length)] of a pack file, read by the format cache/disk.c
    documents: a 32-byte header, then u64 count and count times (u32 uid,
    u32 length, u64 checksum), then the bodies in that order."""
    data = read_bytes(path)
    assert data[:4] == b"IMFS" and int.from_bytes(data[8:12], "little") == 5, path
    toc_len = int.from_bytes(data[16:24], "little")
    count = int.from_bytes(data[32:40], "little")
    offset = 32 + toc_len
    items = []
    for i in range(count):
        entry = data[40 + 16 * i:56 + 16 * i]
        uid, length = int.from_bytes(entry[:4], "little"), int.from_bytes(entry[4:8], "little")
        items.append((uid, offset, length))
        offset += length
    return items


def body_place(cache_dir, mailbox, uidvalidity, uid):
    """(path, offset, length) of the bytes of body uid on disk: a file of
    its own (after its 32-byte header) or a place in a pack; None if
    neither."""
    directory = os.path.join(mailbox_dir(cache_dir, mailbox), str(uidvalidity))
    own = os.path.join(directory, str(uid))
    if os.path.exists(own):
        return own, 32, os.path.getsize(own) - 32
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if PACK_NAME.match(name):
            for item_uid, offset, length in pack_toc(os.path.join(directory, name)):
                if item_uid == uid:
                    return os.path.join(directory, name), offset, length
    return None


def body_on_disk(cache_dir, mailbox, uidvalidity, uid):
    """The bytes of body uid as the cache holds them, or None."""
    place = body_place(cache_dir, mailbox, uidvalidity, uid)
    if place is None:
        return None
    path, offset, length = place
    return read_bytes(path)[offset:offset + length]


def is_body_file(path):
    return path.is_file() and (path.name.isdigit() or PACK_NAME.match(path.name) is not None)


def check_modes(top):
    """Every directory under top (top too) 0700, every file 0600, owned by us."""
    bad = []
    for root, dirs, files in os.walk(top):
        for d in [root] + [os.path.join(root, x) for x in dirs]:
            st = os.lstat(d)
            if stat.S_IMODE(st.st_mode) != 0o700 or st.st_uid != os.getuid():
                bad.append((d, oct(stat.S_IMODE(st.st_mode))))
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600 \
                    or st.st_uid != os.getuid():
                bad.append((os.path.join(root, f), oct(st.st_mode)))
    assert not bad, f"wrong modes (want dirs 0700, files 0600): {bad}"


def message(tag, size=0):
    return (f"From: Cache Test <cache@example.org>\r\nTo: Alice <alice@example.org>\r\n"
            f"Subject: {tag}\r\nMessage-ID: <{tag}@imapfs.test>\r\n"
            f"Date: Mon, 04 Mar 2024 09:15:00 +0100\r\n\r\nThis is {tag}.\r\n"
            + "x" * size + "\r\n").encode()


def append(srv, folder, data, flags=""):
    with srv.checker() as c:
        typ, resp = c.imap.append(imap_quote(folder), f"({flags})", None, data)
        assert typ == "OK", resp
        return int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))


# --------------------------------------------------------------------------


def test_default_cache_dir_modes_and_bodies_on_disk_after_unmount(mounter, cache_server, tmp_path):
    """No -o cache_dir: $XDG_CACHE_HOME/imapfs/alice@127.0.0.1:PORT, 0700/0600,
    holding the bodies read just before the unmount, byte for byte."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o755)
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg))
    m = mount_with(mounter, cache_server, "def", env=env)
    rels = ["INBOX/006.eml", "Archive/2024/003.eml", "Entwürfe/002.eml"]
    expected = {}
    with cache_server.checker() as c:
        for rel in rels:
            folder, uid = folder_of(cache_server, rel), fixture_uid(cache_server, rel)
            expected[rel] = (folder, c.uidvalidity(folder), uid, c.body(folder, uid))
    for rel in rels:
        folder, _, uid, body = expected[rel]
        assert read_bytes(m.message_path(folder, "/", uid)) == body
    unmount_timed(m)     # at once: the writer thread must not lose them

    top = xdg / "imapfs"
    cache_dir = top / f"alice@127.0.0.1:{cache_server.imaps_port}"
    assert cache_dir.is_dir(), f"no default cache dir; {xdg} holds {list(xdg.rglob('*'))}"
    check_modes(str(top))
    for rel, (folder, uidvalidity, uid, body) in expected.items():
        on_disk = body_on_disk(str(cache_dir), folder, uidvalidity, uid)
        assert on_disk is not None, f"{rel}: UID {uid} not on disk after the unmount"
        assert on_disk == body, f"{rel}: the cache does not hold the message"


def test_cache_dir_none_writes_nothing(mounter, cache_server, tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg))
    m = mount_with(mounter, cache_server, "none", cache_dir="none", env=env)
    os.listdir(os.path.join(m.mountpoint, "INBOX"))
    with cache_server.checker() as c:
        assert read_bytes(os.path.join(m.mountpoint, "INBOX", "1.eml")) == c.body("INBOX", 1)
    unmount_timed(m)
    assert list(xdg.rglob("*")) == [], "-o cache_dir=none wrote to $XDG_CACHE_HOME"


def test_cache_dir_open_to_others_is_refused(mounter, cache_server, tmp_path):
    """A cache dir that others can read is not used (imapfs(1)); the mount
    works without it and says why."""
    cache_dir = tmp_path / "shared"
    cache_dir.mkdir()
    os.chmod(cache_dir, 0o755)
    m = mount_with(mounter, cache_server, "open", cache_dir=str(cache_dir))
    with cache_server.checker() as c:
        assert read_bytes(os.path.join(m.mountpoint, "INBOX", "2.eml")) == c.body("INBOX", 2)
    unmount_timed(m)
    assert list(cache_dir.rglob("*")) == [], "imapfs used a cache dir open to others"
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o755, "imapfs changed the dir's mode"
    assert re.search(r"warning.*cache", m.log()), f"no warning about the cache dir:\n{m.log()}"


def test_remount_lists_from_disk_resyncs_and_warm_grep_fetches_nothing(mounter, cache_server,
                                                                      tmp_path):
    """grep -r over everything, unmount; meanwhile another client adds a
    message, expunges one and changes flags; the remount's grep -r fetches
    only the new message, and the listing and flags are the server's."""
    srv = cache_server
    cache_dir = str(tmp_path / "cache")
    m1 = mount_with(mounter, srv, "warm1", cache_dir=cache_dir, debug=True)
    grep = ["grep", "-rl", "zebracorn", "."]
    first = subprocess.run(grep, cwd=m1.mountpoint, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert body_fetches(m1.log()), "the cold grep -r fetched nothing?"
    exit_seconds = unmount_timed(m1)

    # another client changes Archive/2024 while nothing is mounted
    folder = "Archive/2024"
    expunged = fixture_uid(srv, "Archive/2024/001.eml")
    flagged = fixture_uid(srv, "Archive/2024/004.eml")
    new_uid = append(srv, folder, message("cache-new-zebracorn"))
    with srv.checker() as c:
        c._ok(*c.imap.select(imap_quote(folder)), "SELECT")
        c._ok(*c.imap.uid("STORE", str(expunged), "+FLAGS.SILENT", r"(\Deleted)"), "STORE")
        c._ok(*c.imap.uid("STORE", str(flagged), "+FLAGS.SILENT", r"(\Flagged $Cached)"), "STORE")
        c._ok(*c.imap.expunge(), "EXPUNGE")
        server_msgs = c.messages(folder)
        new_body = c.body(folder, new_uid)

    m2 = mount_with(mounter, srv, "warm2", cache_dir=cache_dir, debug=True)
    second = subprocess.run(grep, cwd=m2.mountpoint, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    want = set(first.stdout.split()) - {f"./{folder}/{expunged}.eml"} | {f"./{folder}/{new_uid}.eml"}
    assert set(second.stdout.split()) == want

    names = sorted(os.listdir(m2.folder_path(folder, "/")))
    assert names == sorted(f"{u}.eml" for u in server_msgs)
    got_flags = os.getxattr(m2.message_path(folder, "/", flagged), "user.imap.flags").decode()
    assert set(got_flags.split()) == server_msgs[flagged]["flags"]
    assert read_bytes(m2.message_path(folder, "/", new_uid)) == new_body

    log = m2.log()
    fetches = body_fetches(log)
    # only the new message may be fetched: every other body is on disk
    assert fetches and all(uid_set_contains(s, new_uid) for s in fetches), \
        f"BODY.PEEK[] fetches on the warm mount: {fetches}"
    assert not any(uid_set_contains(s, u) for s in fetches for u in server_msgs if u != new_uid), \
        f"already cached bodies fetched again: {fetches}"
    # re-synced with CONDSTORE: only what changed since the cached HIGHESTMODSEQ
    assert "CHANGEDSINCE" in log or "QRESYNC" in log, \
        "the remount did not re-sync with CHANGEDSINCE/QRESYNC"
    unmount_timed(m2)
    assert exit_seconds < EXIT_BOUND, f"imapfs took {exit_seconds:.1f}s to exit after fusermount3 -u; " \
                              f"its threads then:\n{m1.slow_exit_stacks}"


def test_remount_lists_from_disk_at_once(mounter, cache_server, tmp_path):
    """A second mount shows a folder listed by the first from disk: its first
    readdir sends no UID FETCH 1:* listing before answering."""
    cache_dir = str(tmp_path / "cache")
    m1 = mount_with(mounter, cache_server, "l1", cache_dir=cache_dir)
    names = sorted(os.listdir(os.path.join(m1.mountpoint, "Lists", "dovecot")))
    unmount_timed(m1)
    m2 = mount_with(mounter, cache_server, "l2", cache_dir=cache_dir, debug=True)
    assert sorted(os.listdir(os.path.join(m2.mountpoint, "Lists", "dovecot"))) == names
    log = m2.log()
    full = re.findall(r"C: \S+ UID FETCH 1:\* \(UID RFC822\.SIZE INTERNALDATE FLAGS\)\r?$",
                      log, re.M)
    assert not full, "the remount listed Lists/dovecot from scratch instead of from disk " \
                     "+ CHANGEDSINCE"


def test_one_daemon_per_cache_dir(mounter, cache_server, tmp_path):
    """A second daemon on a cache dir in use must not share it: it says so
    and still serves the right bytes; the first keeps working."""
    cache_dir = str(tmp_path / "cache")
    m1 = mount_with(mounter, cache_server, "a", cache_dir=cache_dir)
    m2 = mount_with(mounter, cache_server, "b", cache_dir=cache_dir)
    with cache_server.checker() as c:
        body = c.body("INBOX", 3)
    assert read_bytes(os.path.join(m2.mountpoint, "INBOX", "3.eml")) == body
    assert read_bytes(os.path.join(m1.mountpoint, "INBOX", "3.eml")) == body
    assert re.search(r"cache.*in use|in use.*cache", m2.log()), \
        f"no word about the cache dir being in use:\n{m2.log()}"
    unmount_timed(m2)
    unmount_timed(m1)
    check_modes(cache_dir)


def test_cache_max_bounds_the_bodies(mounter, cache_server, tmp_path):
    """-o cache_max=64K: after reading ~200 KB of mail the bodies on disk take
    at most 64 KiB, and the mount still serves the right bytes."""
    cache_dir = tmp_path / "cache"
    m = mount_with(mounter, cache_server, "max", cache_dir=str(cache_dir),
                   options=["cache_max=64K"])
    folder = os.path.join(m.mountpoint, "Lists", "notmuch")
    with cache_server.checker() as c:
        bodies = c.bodies("Lists/notmuch")
    for uid, body in bodies.items():
        assert read_bytes(os.path.join(folder, f"{uid}.eml")) == body, uid
    unmount_timed(m)
    body_files = [p for p in cache_dir.rglob("*") if is_body_file(p)]
    total = sum(p.stat().st_size for p in body_files)
    assert body_files, "no bodies kept at all with cache_max=64K"
    assert total <= 64 * 1024, f"{len(body_files)} body files take {total} bytes > cache_max 64K"
    # and a remount serves them right
    m2 = mount_with(mounter, cache_server, "max2", cache_dir=str(cache_dir),
                    options=["cache_max=64K"])
    for uid in (1, 150, 300):
        assert read_bytes(os.path.join(m2.mountpoint, "Lists", "notmuch", f"{uid}.eml")) == bodies[uid]
    unmount_timed(m2)


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte"])
def test_torn_body_is_fetched_again(damage, mounter, cache_server, tmp_path):
    srv = cache_server
    cache_dir = str(tmp_path / "cache")
    rel = "INBOX/005.eml"
    uid = fixture_uid(srv, rel)
    with srv.checker() as c:
        body = c.body("INBOX", uid)
        uidvalidity = c.uidvalidity("INBOX")
    m1 = mount_with(mounter, srv, "t1", cache_dir=cache_dir)
    assert read_bytes(m1.message_path("INBOX", "/", uid)) == body
    unmount_timed(m1)

    path, offset, length = body_place(cache_dir, "INBOX", uidvalidity, uid)
    data = read_bytes(path)
    assert data[offset:offset + length] == body
    if damage == "truncated":
        torn = data[:-5]
    else:
        i = offset + length // 2
        torn = data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(torn)

    m2 = mount_with(mounter, srv, "t2", cache_dir=cache_dir, debug=True)
    path_on_mount = m2.message_path("INBOX", "/", uid)
    assert os.stat(path_on_mount).st_size == len(body)
    assert read_bytes(path_on_mount) == body, f"the {damage} cache file was served"
    fetches = body_fetches(m2.log())
    assert any(uid_set_contains(s, uid) for s in fetches), \
        f"UID {uid} not fetched again after its cache file was {damage}: {fetches}"
    unmount_timed(m2)
    # what is on disk now is whole again
    assert body_on_disk(cache_dir, "INBOX", uidvalidity, uid) == body


def test_offline_mount_from_cache_then_live_again(mounter, own_server, tmp_path):
    srv = own_server
    cache_dir = str(tmp_path / "cache")
    with srv.checker() as c:
        inbox_msgs = c.messages("INBOX")
        inbox_bodies = c.bodies("INBOX", "1:3")
        a2024 = c.messages("Archive/2024")
    m1 = mount_with(mounter, srv, "on", cache_dir=cache_dir)
    inbox = os.path.join(m1.mountpoint, "INBOX")
    top_names = sorted(os.listdir(m1.mountpoint))
    inbox_names = sorted(os.listdir(inbox))
    assert inbox_names == sorted(f"{u}.eml" for u in inbox_msgs)
    for uid, body in inbox_bodies.items():
        assert read_bytes(os.path.join(inbox, f"{uid}.eml")) == body
    # listed, but nothing read from it
    a2024_names = sorted(os.listdir(m1.folder_path("Archive/2024", "/")))
    unmount_timed(m1)

    srv.stop()
    m2 = mount_with(mounter, srv, "off", cache_dir=cache_dir, options=["dir_cache_timeout=2"])
    startup = m2.log().split("\n", 1)[1]          # after the "$ imapfs ..." line
    warnings = [line for line in startup.splitlines() if line.strip()]
    assert len(warnings) == 1 and "warning" in warnings[0], \
        f"want one warning line on stderr when mounting offline, got: {warnings}"
    root = m2.mountpoint
    inbox = os.path.join(root, "INBOX")
    assert sorted(os.listdir(root)) == top_names
    assert sorted(os.listdir(inbox)) == inbox_names
    assert sorted(os.listdir(m2.folder_path("Archive/2024", "/"))) == a2024_names
    for uid, body in inbox_bodies.items():
        assert read_bytes(os.path.join(inbox, f"{uid}.eml")) == body, f"offline INBOX/{uid}.eml"
        assert os.stat(os.path.join(inbox, f"{uid}.eml")).st_size == len(body)

    with_flags = min(u for u in inbox_bodies if inbox_msgs[u]["flags"])
    flags = os.getxattr(os.path.join(inbox, f"{with_flags}.eml"), "user.imap.flags").decode()
    assert set(flags.split()) == inbox_msgs[with_flags]["flags"]

    # read-only
    assert errno_of(lambda: open(os.path.join(inbox, "new.eml"), "wb").close()) == errno.EROFS
    assert errno_of(os.mkdir, os.path.join(root, "NewFolder")) == errno.EROFS
    assert errno_of(os.unlink, os.path.join(inbox, "1.eml")) == errno.EROFS
    assert errno_of(os.rename, os.path.join(inbox, "1.eml"),
                    os.path.join(m2.folder_path("Archive/2024", "/"), "1.eml")) == errno.EROFS
    assert errno_of(os.setxattr, os.path.join(inbox, "1.eml"), "user.imap.flags",
                    b"\\Seen \\Flagged") == errno.EROFS

    # never fetched / never listed: EIO, quickly
    never_read = os.path.join(m2.folder_path("Archive/2024", "/"), f"{min(a2024)}.eml")
    e, took = timed_errno(read_bytes, never_read)
    assert e == errno.EIO and took < 5, f"cat of a never-fetched file: errno {e} after {took:.1f}s"
    e, took = timed_errno(os.listdir, m2.folder_path("Lists/notmuch", "/"))
    assert e == errno.EIO and took < 5, f"ls of a never-listed folder: errno {e} after {took:.1f}s"

    # the server comes back on the same port: the mount becomes live
    srv.restart()
    back = time.monotonic()
    new = message("offline-write-back")
    deadline = back + 15
    while True:
        try:
            with open(os.path.join(inbox, "new.eml"), "wb") as f:
                f.write(new)
            break
        except OSError as e:
            if e.errno != errno.EROFS or time.monotonic() > deadline:
                raise AssertionError(f"write {time.monotonic() - back:.1f}s after the server "
                                     f"came back: {e}") from e
            time.sleep(0.5)
    write_after = time.monotonic() - back
    with srv.checker() as c:
        c.examine("INBOX")
        typ, data = c.imap.uid("SEARCH", "HEADER", "Message-ID", "offline-write-back@imapfs.test")
        assert data[0].split(), "the message written after reconnecting is not on the server"
    # new mail from another client appears
    uid = append(srv, "INBOX", message("offline-new-mail"))
    deadline = time.monotonic() + 15
    while f"{uid}.eml" not in os.listdir(inbox):
        assert time.monotonic() < deadline, \
            f"new mail {uid}.eml not on the mount {time.monotonic() - back:.1f}s after the " \
            f"server came back: {sorted(os.listdir(inbox))}"
        time.sleep(0.5)
    with srv.checker() as c:
        assert read_bytes(os.path.join(inbox, f"{uid}.eml")) == c.body("INBOX", uid)
        # and what was never fetched is fetched now
        assert read_bytes(never_read) == c.body("Archive/2024", min(a2024))
    assert write_after < 12, f"writes failed for {write_after:.1f}s after the server came back"
    unmount_timed(m2)
    check_modes(cache_dir)


# --------------------------------------------------------------------------
# the kernel's page cache


FUSE_READ = re.compile(r"opcode: READ \(")          # libfuse's -d line for each READ request
SCAN_MESSAGES = 300


def test_scanned_messages_are_read_from_pages_the_daemon_stored(mounter, own_server, tmp_path):
    """A reader going through a folder in UID order (grep -r): read-ahead puts
    each body it fetches into the kernel's page cache, so the reader's reads
    of those messages never reach the daemon (no FUSE READ); the bytes are the
    server's.  The same after a remount, for bodies loaded from the disk
    cache.  Without the store every message costs one READ."""
    srv = own_server
    with srv.checker() as c:
        c._ok(*c.imap.create("scan"), "CREATE")
        for i in range(SCAN_MESSAGES):
            typ, resp = c.imap.append("scan", "(\\Seen)", None, message(f"scan{i}", 2000 + 37 * i))
            assert typ == "OK", resp
        expected = c.bodies("scan")
    assert len(expected) == SCAN_MESSAGES
    cache_dir = str(tmp_path / "cache")
    for round_ in ("fetched from the server", "loaded from the disk cache"):
        m = mount_with(mounter, srv, "mnt-" + round_.split()[-1], cache_dir=cache_dir, debug=True)
        folder = os.path.join(m.mountpoint, "scan")
        names = sorted(os.listdir(folder), key=lambda n: int(n.split(".")[0]))
        offset = len(m.log())
        wrong = [n for n in names if read_bytes(os.path.join(folder, n))
                 != expected[int(n.split(".")[0])]]
        log = m.log()[offset:]
        reads = len(FUSE_READ.findall(log))
        fetched = body_fetches(log)
        print(f"{round_}: {reads} FUSE READs for {len(names)} messages; body fetches {fetched}")
        assert len(names) == SCAN_MESSAGES and not wrong, f"{round_}: wrong bytes in {wrong[:5]}"
        # the first message and the first of each batch may be read before
        # their pages arrive, and a slow notifier (55 of 300 once under ASan
        # on a busy machine; 2-3 otherwise) lets the reader overtake more;
        # without the store every message is a READ
        assert reads <= SCAN_MESSAGES // 3, \
            f"{round_}: {reads} FUSE READs for {SCAN_MESSAGES} messages read in UID order"
        if round_ == "loaded from the disk cache":
            assert not fetched, f"bodies fetched again although on disk: {fetched}"
        unmount_timed(m)
        if round_ == "fetched from the server":
            # a scan's bodies are written as a few pack files, not one file each
            with srv.checker() as c:
                uidvalidity = c.uidvalidity("scan")
            files = os.listdir(os.path.join(mailbox_dir(cache_dir, "scan"), str(uidvalidity)))
            assert len(files) <= SCAN_MESSAGES // 30, \
                f"{len(files)} files for {SCAN_MESSAGES} bodies scanned: {sorted(files)[:10]}"
            wrong = [uid for uid, body in expected.items()
                     if body_on_disk(cache_dir, "scan", uidvalidity, uid) != body]
            assert not wrong, f"bodies not on disk, or wrong, after the unmount: {wrong[:10]}"


def test_cache_on_a_file_system_that_refuses_o_direct(request, mounter, own_server, tmp_path):
    """Packs and bodies of 64 KiB or more are written with O_DIRECT; on a file
    system that refuses it (ramfs here) they are written buffered instead:
    everything read is on disk after the unmount, byte for byte, and a
    remount fetches none of it again."""
    srv = own_server
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "ramfs", str(ramfs)], check=True)
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(ramfs)]))
    with pytest.raises(OSError) as refused:     # the precondition: no O_DIRECT there
        os.close(os.open(ramfs / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    assert refused.value.errno == errno.EINVAL
    os.unlink(ramfs / "probe")

    with srv.checker() as c:
        c._ok(*c.imap.create("direct"), "CREATE")
    large = append(srv, "direct", message("large", 200_000))
    for i in range(40):     # one pack of about 120 KB
        append(srv, "direct", message(f"small{i}", 2500))
    with srv.checker() as c:
        expected = c.bodies("direct")
        uidvalidity = c.uidvalidity("direct")
    assert len(expected[large]) > 200_000

    cache_dir = str(ramfs / "cache")
    m1 = mount_with(mounter, srv, "ram1", cache_dir=cache_dir)
    folder = os.path.join(m1.mountpoint, "direct")
    for uid, body in sorted(expected.items()):
        assert read_bytes(os.path.join(folder, f"{uid}.eml")) == body, uid
    unmount_timed(m1)
    wrong = [uid for uid, body in expected.items()
             if body_on_disk(cache_dir, "direct", uidvalidity, uid) != body]
    assert not wrong, f"not on disk, or wrong, after the unmount: {wrong}"
    files = os.listdir(os.path.join(mailbox_dir(cache_dir, "direct"), str(uidvalidity)))
    assert any(PACK_NAME.match(f) for f in files), f"no pack written: {files}"

    m2 = mount_with(mounter, srv, "ram2", cache_dir=cache_dir, debug=True)
    folder = os.path.join(m2.mountpoint, "direct")
    for uid, body in sorted(expected.items()):
        assert read_bytes(os.path.join(folder, f"{uid}.eml")) == body, uid
    fetched = body_fetches(m2.log())
    assert not fetched, f"bodies fetched again although on disk: {fetched}"
    unmount_timed(m2)
