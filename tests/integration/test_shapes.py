"""The read and write suites, in brief, against every server shape (issue 7).

Shapes (the ``shape`` fixture's params, one server and one mount each):

* ``dovecot-dot-prefix``: Dovecot with ``separator = .`` and a Courier-style
  ``prefix = INBOX.`` namespace.  imapfs hides the prefix (``INBOX.Sent
  Items`` is ``Sent Items/``, ``mkdir X`` creates ``INBOX.X``).  A ``/``
  inside a mailbox name (shown as ``%2F``) cannot be made here: this
  Dovecot (Maildir, LAYOUT=fs) refuses it ("Character not allowed in
  mailbox name: '/'"), so test_quirks.py checks that with the fake server.
* ``dovecot-imap4rev1``: Dovecot's capabilities cut to plain ``IMAP4rev1``
  (no MOVE, no UIDPLUS: a removed message stays flagged \\Deleted, hidden).
* ``cyrus``: Cyrus IMAP 3.6 in its default shape (cyrusserver.py; Work is a
  selectable empty mailbox there, not \\Noselect).

For each: the tree equals what LIST and FETCH say (names mapped here, not
with imapfs's code), every message of two folders is byte-exact against
BODY.PEEK[] with size = RFC822.SIZE and mtime = INTERNALDATE, ``grep -rl
zebracorn`` finds exactly the manifest's set, reading leaves flags alone; then
a write round on folders the test creates: mkdir (server name checked), cp in
(one APPEND), mv to another folder (there exactly once), setfattr flags, rm,
rmdir (on IMAP4rev1 after another client expunged the hidden \\Deleted
messages: until then rmdir says ENOTEMPTY).  Expectations come from the independent client (``server.checker()``).

Run: IMAPFS_BIN=build/imapfs /usr/bin/python3 -m pytest -v tests/integration/test_shapes.py
"""

import errno
import os
import re
import subprocess
import sys
import time

import pytest

import imapserver
from fsutil import read_bytes
from conftest import Mounter, snapshot
from imapserver import imap_quote
from test_cyrus import expected_tree, start_cyrus, stop_cyrus

SHAPES = {
    "dovecot-dot-prefix": ("dovecot", {"separator": ".", "prefix": "INBOX."}),
    "dovecot-imap4rev1": ("dovecot", {"capabilities": "IMAP4rev1"}),
    "cyrus": ("cyrus", {}),
}
FLAGS_XATTR = "user.imap.flags"


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request, imapfs, tmp_path_factory):
    kind, kwargs = SHAPES[request.param]
    failed_before = request.session.testsfailed
    if kind == "cyrus":
        srv = start_cyrus(request, **kwargs)
    else:
        srv = imapserver.TestServer(tied_to_parent=True, **kwargs)
    srv.shape = request.param
    srv.uidplus = kwargs.get("capabilities") is None
    mt = Mounter(imapfs, srv, tmp_path_factory.mktemp(request.param))
    try:
        if kind != "cyrus":
            srv.start()
        checker = srv.checker()
        srv.checker_ = checker
        srv.state = snapshot(checker)
        srv.mount = mt()
        yield srv
        srv.mount.unmount()
    except BaseException:
        for m in mt.mounts:
            sys.stderr.write(f"\n--- imapfs log {m.logfile} ---\n{m.log()[-20000:]}\n")
        raise
    finally:
        mt.cleanup()
        if getattr(srv, "checker_", None):
            srv.checker_.close()
        failed = request.session.testsfailed > failed_before
        if kind == "cyrus":
            stop_cyrus(srv, failed)
        else:
            srv.stop()
            if failed:
                sys.stderr.write(f"\nserver files ({request.param}) kept in {srv.dir}\n")
            elif srv.dir:
                srv.remove()


# --------------------------------------------------------------------------
# names on the mount, mapped independently of imapfs

def mount_parts(server, raw):
    """Raw mailbox name -> path components: modified UTF-7 decoded, the
    personal namespace prefix stripped, the delimiter made '/', and '%' / a
    '/' inside a component escaped as %25 / %2F."""
    name = imapserver.mutf7_decode(raw)
    if server.prefix and name.startswith(server.prefix):
        name = name[len(server.prefix):]
    parts = name.split(server.separator)
    return [p.replace("%", "%25").replace("/", "%2F") for p in parts]


def mpath(server, raw, *rest):
    return os.path.join(server.mount.mountpoint, *mount_parts(server, raw), *rest)


def run(argv):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def folder_names(checker):
    return {raw for _, _, raw, _ in checker.list_folders()}


def live(checker, raw):
    return {uid: meta for uid, meta in checker.messages(raw).items()
            if "\\Deleted" not in meta["flags"]}


def wait_for(fn, what, within=8.0):
    deadline = time.monotonic() + within
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            assert got, what
            return got
        time.sleep(0.2)


# --------------------------------------------------------------------------
# read

def test_tree_equals_server(shape):
    tree = expected_tree(shape, shape.state)
    assert "INBOX" in tree[""] and "Lists" in tree[""] and "Entwürfe" in tree[""], tree[""]
    if shape.prefix:
        assert not any(n.startswith("INBOX.") for n in tree[""]), tree[""]
        assert "Sent Items" in tree[""]
    for rel, want in tree.items():
        got = set(os.listdir(os.path.join(shape.mount.mountpoint, rel)))
        assert got == want, f"listing of /{rel}"


def test_two_folders_byte_exact(shape):
    c = shape.checker_
    checked = 0
    for folder in ("INBOX", "Entwürfe"):
        raw = shape.server_name(folder)
        msgs = shape.state["messages"][raw]
        bodies = c.bodies(raw)
        assert set(bodies) == set(msgs) and msgs, raw
        for uid, meta in msgs.items():
            path = mpath(shape, raw, f"{uid}.eml")
            st = os.stat(path)
            data = read_bytes(path)
            assert data == bodies[uid], f"{path}: bytes differ from BODY.PEEK[]"
            assert st.st_size == meta["size"] == len(data), path
            assert int(st.st_mtime) == meta["internaldate"], path
            checked += 1
    assert checked == 14


def test_grep_finds_the_manifest_set(shape):
    r = subprocess.run(["grep", "-rl", "zebracorn", shape.mount.mountpoint],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = set()
    for rel in imapserver.load_manifest()["grep"]["zebracorn"]:
        m = shape.seeded["messages"][rel]
        want.add(mpath(shape, m["folder"], f"{m['uid']}.eml"))
    assert set(r.stdout.splitlines()) == want


def test_reading_left_flags_alone(shape):
    """After the reads above (every message, by grep): flags as seeded."""
    before = {raw: {uid: m["flags"] for uid, m in msgs.items()}
              for raw, msgs in shape.state["messages"].items()}
    after = {raw: shape.checker_.flags(raw) for raw in shape.state["messages"]}
    assert after == before


# --------------------------------------------------------------------------
# write

def test_write_round(shape, tmp_path):
    c = shape.checker_
    a_raw, b_raw = shape.server_name("ShapeA"), shape.server_name("ShapeB")
    if shape.shape == "dovecot-dot-prefix":
        assert (a_raw, b_raw) == ("INBOX.ShapeA", "INBOX.ShapeB")
    a, b = mpath(shape, a_raw), mpath(shape, b_raw)
    assert a == os.path.join(shape.mount.mountpoint, "ShapeA")

    # mkdir = CREATE, under the prefix
    os.mkdir(a)
    os.mkdir(b)
    names = folder_names(c)
    assert a_raw in names and b_raw in names, sorted(names)

    # cp = one APPEND
    data = (b"From: Shape <shape@example.org>\r\nTo: alice@example.org\r\n"
            b"Subject: shape " + shape.shape.encode() + b"\r\n"
            b"Message-ID: <shape-" + shape.shape.encode() + b"@imapfs.test>\r\n\r\n"
            b"written through imapfs\r\n")
    src = tmp_path / "msg.eml"
    src.write_bytes(data)
    r = run(["cp", str(src), os.path.join(a, "msg.eml")])
    assert r.returncode == 0, r.stderr
    msgs = c.messages(a_raw)
    assert len(msgs) == 1, msgs
    uid = next(iter(msgs))
    assert c.body(a_raw, uid) == data
    wait_for(lambda: f"{uid}.eml" in os.listdir(a), f"{uid}.eml not listed in {a}")
    assert read_bytes(os.path.join(a, f"{uid}.eml")) == data

    # mv to another folder: there exactly once, gone (or \Deleted) here
    r = run(["mv", os.path.join(a, f"{uid}.eml"), b + "/"])
    assert r.returncode == 0, r.stderr
    there = live(c, b_raw)
    assert len(there) == 1, there
    new_uid = next(iter(there))
    assert c.body(b_raw, new_uid) == data
    left = c.messages(a_raw)
    if shape.uidplus:
        assert left == {}, left
    else:
        assert set(left) == {uid} and "\\Deleted" in left[uid]["flags"], left
    assert os.listdir(a) == []
    wait_for(lambda: os.listdir(b) == [f"{new_uid}.eml"], f"{b}: {os.listdir(b)}")

    # setfattr = STORE
    path = os.path.join(b, f"{new_uid}.eml")
    r = run(["setfattr", "-n", FLAGS_XATTR, "-v", "\\Seen \\Flagged $Shape", path])
    assert r.returncode == 0, r.stderr
    assert c.flags(b_raw)[new_uid] == {"\\Seen", "\\Flagged", "$Shape"}
    assert set(os.getxattr(path, FLAGS_XATTR).decode().split()) == \
        {"\\Seen", "\\Flagged", "$Shape"}

    # rm = expunged, or without UIDPLUS flagged \Deleted and hidden
    os.unlink(path)
    left = c.messages(b_raw)
    if shape.uidplus:
        assert left == {}, left
    else:
        assert set(left) == {new_uid} and "\\Deleted" in left[new_uid]["flags"], left
    assert os.listdir(b) == []

    # rmdir = DELETE.  Without UIDPLUS the folders still hold the hidden
    # \Deleted messages on the server: ls shows them empty, but rmdir says
    # ENOTEMPTY (README: "ENOTEMPTY while it holds messages"; \Deleted ones
    # "stay on the server until a client expunges") until someone expunges.
    if not shape.uidplus:
        for path in (a, b):
            with pytest.raises(OSError) as e:
                os.rmdir(path)
            assert e.value.errno == errno.ENOTEMPTY, path
        for raw in (a_raw, b_raw):
            c._ok(*c.imap.select(imap_quote(raw)), f"SELECT {raw}")
            c._ok(*c.imap.expunge(), f"EXPUNGE {raw}")
            assert c.messages(raw) == {}
    c.examine("INBOX")       # Cyrus drops a session whose selected folder is deleted
    os.rmdir(a)
    os.rmdir(b)
    names = folder_names(c)
    assert a_raw not in names and b_raw not in names, sorted(names)
    assert not os.path.exists(a) and not os.path.exists(b)
    assert "INBOX" in os.listdir(shape.mount.mountpoint)
    assert not any(re.match(r"Shape[AB]$", n) for n in os.listdir(shape.mount.mountpoint))
