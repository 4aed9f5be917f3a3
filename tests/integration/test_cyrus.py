"""imapfs against a second server: Cyrus IMAP 3.6 (see cyrusserver.py).

A smoke test of the shape: the throwaway Cyrus starts, is seeded through
APPEND, imapfs mounts it, lists its folders, and reads every message byte for
byte as the server's BODY.PEEK[] (size = RFC822.SIZE, mtime = INTERNALDATE),
over imaps:// and imap:// + STARTTLS, and a wrong password is refused.  One
small write round (APPEND, MOVE, STORE, EXPUNGE, CREATE, RENAME, DELETE) runs
on a Cyrus of its own.

Shapes (the ``cyrus`` fixture's params):
  * ``slash``        unixhierarchysep: yes, altnamespace: yes (3.x defaults):
                     delimiter '/', folders beside INBOX;
  * ``dot``          unixhierarchysep: no: delimiter '.';
  * ``inbox-prefix`` unixhierarchysep: no, altnamespace: no: every folder is
                     INBOX.something; imapfs hides the personal namespace
                     prefix, so the mount looks the same.

Cyrus comes from ``scripts/fetch-cyrus`` (Debian's packages unpacked in
build-cyrus/, not installed).  When it is missing the fixture runs that script
once (set IMAPFS_TEST_FETCH_CYRUS=0 not to); a Cyrus that still cannot start
FAILS the tests that need it: a server shape that cannot start is an error to
see, not a skip.

Every expectation comes from the server through the independent client
(cyrusserver.CyrusChecker), never from imapfs.
"""

import errno
import imaplib
import os
import ssl
import stat
import subprocess
import sys
import time

import pytest

import cyrusserver
import imapserver
from fsutil import read_bytes
from conftest import Mounter, fusermount_u, is_mounted, snapshot

SHAPES = {
    "slash": {"separator": "/", "prefix": ""},
    "dot": {"separator": ".", "prefix": ""},
    "inbox-prefix": {"separator": ".", "prefix": "INBOX."},
}

_fetch_tried = []


def ensure_cyrus():
    """None when an unpacked Cyrus is there (fetching it once if allowed), else why not."""
    why = cyrusserver.available()
    if why is None or _fetch_tried or os.environ.get("IMAPFS_TEST_FETCH_CYRUS", "1") == "0":
        return why
    _fetch_tried.append(True)
    script = os.path.join(imapserver.REPO, "scripts", "fetch-cyrus")
    with cyrusserver.one_at_a_time("imapfs-fetch-cyrus"):  # another worker may be at it
        r = subprocess.run([script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=900)
    why = cyrusserver.available()
    if why is not None:
        return f"{why}\nscripts/fetch-cyrus exited {r.returncode}:\n{r.stdout[-4000:]}"
    return None


def start_cyrus(request, **kwargs):
    """A started CyrusServer, or pytest.fail (never skip) saying why it cannot start."""
    why = ensure_cyrus()
    if why is not None:
        pytest.fail(f"Cyrus IMAP cannot start on this machine: {why}", pytrace=False)
    srv = cyrusserver.CyrusServer(tied_to_parent=True, **kwargs)
    error = None
    try:
        srv.start()
    except cyrusserver.ServerError as e:
        srv.stop()
        error = str(e)
    if error is not None:
        pytest.fail(f"Cyrus IMAP did not start ({kwargs}): {error}\nfiles kept in {srv.dir}", pytrace=False)
    return srv


def stop_cyrus(srv, failed):
    srv.stop()
    # nothing of it may be left running: neither the supervisor nor master
    assert not srv.running(), f"Cyrus supervisor {srv.pid} still running"
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and srv.config_path.encode() in cyrusserver._cmdline(int(pid))
                 and cyrusserver._pid_alive(int(pid))]
    assert not leftovers, f"Cyrus processes left running: {leftovers}"
    if failed:
        sys.stderr.write(f"\nCyrus files kept in {srv.dir} (cyrus.log, master.log)\n")
    else:
        srv.remove()


@pytest.fixture(scope="module", params=sorted(SHAPES))
def cyrus(request):
    srv = start_cyrus(request, **SHAPES[request.param])
    failed_before = request.session.testsfailed
    try:
        yield srv
    finally:
        stop_cyrus(srv, request.session.testsfailed > failed_before)


@pytest.fixture(scope="module")
def cyrus_checker(cyrus):
    c = cyrus.checker()
    yield c
    c.close()


@pytest.fixture(scope="module")
def cyrus_state(cyrus_checker):
    return snapshot(cyrus_checker)


@pytest.fixture(scope="module")
def cyrus_mount(imapfs, cyrus, tmp_path_factory):
    """imapfs on imaps:// of this shape's Cyrus, shared by the module's read tests."""
    mt = Mounter(imapfs, cyrus, tmp_path_factory.mktemp("cyrus-mount"))
    m = mt()
    try:
        yield m
        m.unmount()
    except BaseException:
        sys.stderr.write(f"\n--- imapfs log {m.logfile} ---\n{m.log()[-20000:]}\n")
        raise
    finally:
        mt.cleanup()


def _show_logs_on_failure(request, mt):
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for m in mt.mounts:
            sys.stderr.write(f"\n--- imapfs log {m.logfile} ---\n{m.log()[-20000:]}\n")


@pytest.fixture
def cyrus_mounter(request, imapfs, cyrus, tmp_path):
    mt = Mounter(imapfs, cyrus, tmp_path)
    yield mt
    _show_logs_on_failure(request, mt)
    mt.cleanup()


# --------------------------------------------------------------------------
# where things are on the mount: the delimiter becomes '/', and the personal
# namespace prefix (INBOX. when altnamespace is off) is not shown

def mount_parts(server, raw):
    name = imapserver.mutf7_decode(raw)
    if server.prefix and name.startswith(server.prefix):
        name = name[len(server.prefix):]
    return name.split(server.separator)


def message_path(mount, server, raw, uid):
    return os.path.join(mount.mountpoint, *mount_parts(server, raw), f"{uid}.eml")


def expected_tree(server, state):
    """{relative dir ('' = root): set of entry names}, from LIST and FETCH."""
    tree = {"": set()}
    for _, _, raw, _ in state["folders"]:
        parts = mount_parts(server, raw)
        for i in range(len(parts)):
            tree.setdefault("/".join(parts[:i]), set()).add(parts[i])
            tree.setdefault("/".join(parts[:i + 1]), set())
    for raw, msgs in state["messages"].items():
        tree["/".join(mount_parts(server, raw))].update(f"{uid}.eml" for uid in msgs)
    return tree


# --------------------------------------------------------------------------
# the server itself

def test_cyrus_is_up_and_seeded(cyrus, cyrus_state):
    """Guards the rig: a real Cyrus 3.6 answers, with the fixture account."""
    ctx = ssl.create_default_context(cafile=cyrus.cafile)
    imap = imaplib.IMAP4_SSL(cyrus.host, cyrus.imaps_port, ssl_context=ctx, timeout=10)
    try:
        assert b"Cyrus IMAP 3.6" in imap.welcome, imap.welcome
    finally:
        imap.logout()
    assert cyrus.version and cyrus.version.startswith("3.6"), cyrus.version
    assert cyrus.start_seconds < 15, f"master took {cyrus.start_seconds:.1f} s to answer"
    assert cyrus_state["delimiter"] == cyrus.separator
    names = {"/".join(mount_parts(cyrus, raw)) for _, _, raw, _ in cyrus_state["folders"]}
    for want in ("INBOX", "Lists/notmuch", "Lists/dovecot", "Archive/2023", "Archive/2024",
                 "Work", "Work/Projects", "Entwürfe", "Sent Items", "Trash"):
        assert want in names, sorted(names)
    assert len(cyrus_state["messages"][cyrus.server_name("Lists/notmuch")]) == 300
    assert sum(len(m) for m in cyrus_state["messages"].values()) == 351
    # what makes this shape different from the Dovecot one
    assert cyrus.seeded["selectable_parents"] == {"Work": cyrus.server_name("Work")}
    assert cyrus.seeded["noselect"] == {}


def test_cyrus_checks_passwords(cyrus):
    ctx = ssl.create_default_context(cafile=cyrus.cafile)
    imap = imaplib.IMAP4_SSL(cyrus.host, cyrus.imaps_port, ssl_context=ctx, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(cyrus.user, "not-" + cyrus.password)
    finally:
        imap.shutdown()


def test_cyrus_refuses_login_before_starttls(cyrus):
    imap = imaplib.IMAP4(cyrus.host, cyrus.imap_port, timeout=10)
    try:
        caps = imap.capabilities
        assert "STARTTLS" in caps and "LOGINDISABLED" in caps, caps
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(cyrus.user, cyrus.password)
    finally:
        imap.shutdown()


# --------------------------------------------------------------------------
# the mount

def test_mounts_and_lists_folders(cyrus, cyrus_mount, cyrus_state):
    root = set(os.listdir(cyrus_mount.mountpoint))
    want = expected_tree(cyrus, cyrus_state)[""]
    assert root == want
    assert {"INBOX", "Entwürfe", "Sent Items", "Lists", "Archive", "Work", "Trash"} <= root
    for _, _, raw, _ in cyrus_state["folders"]:
        path = os.path.join(cyrus_mount.mountpoint, *mount_parts(cyrus, raw))
        assert os.path.isdir(path), f"folder {raw!r} missing at {path}"


def test_directory_listings_are_exact(cyrus, cyrus_mount, cyrus_state):
    for rel, want in expected_tree(cyrus, cyrus_state).items():
        path = os.path.join(cyrus_mount.mountpoint, rel)
        assert set(os.listdir(path)) == want, f"listing of /{rel}"
        for name in want:
            mode = os.lstat(os.path.join(path, name)).st_mode
            assert stat.S_ISREG(mode) if name.endswith(".eml") else stat.S_ISDIR(mode), f"/{rel}/{name}"


def test_selectable_parent_is_a_directory(cyrus, cyrus_mount):
    """Cyrus made Work a real (empty) mailbox: a directory holding Projects."""
    assert os.listdir(os.path.join(cyrus_mount.mountpoint, "Work")) == ["Projects"]


def test_every_message_byte_exact(cyrus, cyrus_mount, cyrus_state, cyrus_checker):
    checked = 0
    for raw, msgs in cyrus_state["messages"].items():
        bodies = cyrus_checker.bodies(raw) if msgs else {}
        assert set(bodies) == set(msgs)
        for uid, meta in msgs.items():
            path = message_path(cyrus_mount, cyrus, raw, uid)
            st = os.stat(path)
            data = read_bytes(path)
            assert data == bodies[uid], f"{path}: bytes differ from BODY.PEEK[]"
            assert st.st_size == meta["size"] == len(data), f"{path}: st_size {st.st_size}, RFC822.SIZE {meta['size']}"
            assert int(st.st_mtime) == meta["internaldate"], path
            checked += 1
    assert checked == 351


def test_special_messages_and_flags(cyrus, cyrus_mount, cyrus_checker):
    """The large base64 one, LF-only, 8-bit header; flags and keywords as xattr."""
    inbox = {rel: m for rel, m in cyrus.seeded["messages"].items() if m["folder"] == "INBOX"}
    for rel in ("INBOX/003.eml", "INBOX/004.eml", "INBOX/006.eml", "INBOX/011.eml"):
        uid = inbox[rel]["uid"]
        path = message_path(cyrus_mount, cyrus, "INBOX", uid)
        got = subprocess.run(["cat", path], stdout=subprocess.PIPE, check=True).stdout
        assert got == cyrus_checker.body("INBOX", uid), f"cat {path}"
    m = inbox["INBOX/012.eml"]
    path = message_path(cyrus_mount, cyrus, "INBOX", m["uid"])
    got = set(os.getxattr(path, "user.imap.flags").decode().split())
    assert got == set(m["flags"]) == cyrus_checker.flags("INBOX")[m["uid"]]
    m = inbox["INBOX/009.eml"]     # INTERNALDATE differs from its Date: header
    assert int(os.stat(message_path(cyrus_mount, cyrus, "INBOX", m["uid"])).st_mtime) == m["internaldate"]


def test_grep_and_find(cyrus, cyrus_mount, cyrus_state):
    mp = cyrus_mount.mountpoint
    r = subprocess.run(["grep", "-rl", "zebracorn", mp], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = set()
    for rel in imapserver.load_manifest()["grep"]["zebracorn"]:
        m = cyrus.seeded["messages"][rel]
        want.add(message_path(cyrus_mount, cyrus, m["folder"], m["uid"]))
    assert set(r.stdout.splitlines()) == want
    r = subprocess.run(["find", mp, "-name", "*.eml"], stdout=subprocess.PIPE, text=True,
                       check=True, timeout=120)
    assert len(r.stdout.splitlines()) == 351


def test_reading_leaves_flags_alone(cyrus, cyrus_mount, cyrus_state, cyrus_checker):
    before = {raw: cyrus_checker.flags(raw) for raw in cyrus_state["messages"]}
    for raw, msgs in cyrus_state["messages"].items():
        for uid in msgs:
            read_bytes(message_path(cyrus_mount, cyrus, raw, uid))
    assert {raw: cyrus_checker.flags(raw) for raw in cyrus_state["messages"]} == before


def test_starttls_url_mounts(cyrus, cyrus_mounter, cyrus_checker):
    offset = cyrus.log_size()
    m = cyrus_mounter(url=cyrus_mounter.url("imap"))
    assert "INBOX" in os.listdir(m.mountpoint)
    uid = cyrus.seeded["messages"]["INBOX/001.eml"]["uid"]
    assert read_bytes(message_path(m, cyrus, "INBOX", uid)) == cyrus_checker.body("INBOX", uid)
    m.unmount()
    if not cyrus.quirks["syslog_captured"]:
        return      # Cyrus refuses LOGIN before STARTTLS anyway (see above)
    time.sleep(0.2)
    logins = [line for line in cyrus.logins_since(offset) if f"lport={cyrus.imap_port}," in line]
    assert logins, "no login on the STARTTLS port in Cyrus's log"
    assert all(", TLS," in line for line in logins), logins


def test_wrong_password_is_refused(imapfs, cyrus, tmp_path):
    bad = tmp_path / "wrong"
    bad.write_text("not-" + cyrus.password + "\n")
    bad.chmod(0o600)
    mp = tmp_path / "mnt"
    mp.mkdir()
    start = time.monotonic()
    r = subprocess.run([imapfs, "-o", f"cafile={cyrus.cafile}", "-o", f"password_file={bad}",
                        f"imaps://{cyrus.user}@{cyrus.host}:{cyrus.imaps_port}", str(mp)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=30)
    elapsed = time.monotonic() - start
    if is_mounted(str(mp)):
        fusermount_u(str(mp))
        pytest.fail("imapfs mounted with a wrong password")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("imapfs: "), lines
    assert cyrus.password not in r.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"


# --------------------------------------------------------------------------
# a small write round, on a Cyrus of its own (the shared one stays as seeded)

@pytest.fixture
def scratch_cyrus(request):
    srv = start_cyrus(request)
    failed_before = request.session.testsfailed
    try:
        yield srv
    finally:
        rep = getattr(request.node, "rep_call", None)
        stop_cyrus(srv, (rep is not None and rep.failed) or request.session.testsfailed > failed_before)


def test_write_round(request, imapfs, scratch_cyrus, tmp_path):
    srv = scratch_cyrus
    mt = Mounter(imapfs, srv, tmp_path)
    request.addfinalizer(lambda: _show_logs_on_failure(request, mt))
    try:
        m = mt()
        mp = m.mountpoint
        p = lambda *parts: os.path.join(mp, *parts)  # noqa: E731
        with srv.checker() as c:
            inbox = set(c.messages("INBOX"))
            # create + write + close = APPEND
            new = b"From: bob@example.org\r\nSubject: written through imapfs\r\n\r\nhello cyrus\r\n"
            with open(p("INBOX", "new.eml"), "wb") as f:
                f.write(new)
            added = set(c.messages("INBOX")) - inbox
            assert len(added) == 1, added
            uid = added.pop()
            assert c.body("INBOX", uid) == new
            deadline = time.monotonic() + 10
            while f"{uid}.eml" not in os.listdir(p("INBOX")) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert read_bytes(p("INBOX", f"{uid}.eml")) == new
            # rename to another folder = MOVE
            one = srv.seeded["messages"]["INBOX/001.eml"]["uid"]
            body = c.body("INBOX", one)
            os.rename(p("INBOX", f"{one}.eml"), p("Trash", f"{one}.eml"))
            assert one not in c.messages("INBOX")
            assert list(c.bodies("Trash").values()) == [body]
            # flags xattr = STORE
            two = srv.seeded["messages"]["INBOX/002.eml"]["uid"]
            os.setxattr(p("INBOX", f"{two}.eml"), "user.imap.flags", b"\\Seen $Cyrus")
            assert c.flags("INBOX")[two] == {"\\Seen", "$Cyrus"}
            # unlink = \Deleted + UID EXPUNGE of that UID only
            three = srv.seeded["messages"]["INBOX/003.eml"]["uid"]
            os.unlink(p("INBOX", f"{three}.eml"))
            left = set(c.messages("INBOX"))
            assert three not in left and two in left and uid in left
            # directories = CREATE / RENAME / DELETE
            os.mkdir(p("Lists", "cyrus"))
            raw = lambda name: srv.server_name(name)  # noqa: E731
            names = lambda: {r for _, _, r, _ in c.list_folders()}  # noqa: E731
            assert raw("Lists/cyrus") in names()
            os.rename(p("Lists", "cyrus"), p("Work", "cyrus"))
            assert raw("Work/cyrus") in names() and raw("Lists/cyrus") not in names()
            os.rmdir(p("Work", "cyrus"))
            assert raw("Work/cyrus") not in names()
            with pytest.raises(OSError) as e:
                os.rmdir(p("Work"))
            assert e.value.errno == errno.ENOTEMPTY
        m.unmount()
    finally:
        mt.cleanup()
