"""Read-ahead for a reader going through a folder in UID order (grep -r),
against tests/integration/fakeimap.py, which can hold an answer back.

* While one batch is still arriving, the next one is already asked for (on
  another connection): otherwise each batch costs a full round trip to the
  server after the last one, which on a real network (20-50 ms) is most of
  a cold grep.  The fake holds every read-ahead answer after its first
  message; with the reader blocked on the held batch, a second batch must
  be asked for.
* Read-ahead stays within its window and stops when the reader stops: after
  reading the first messages of a large folder, nothing is fetched more than
  a window and a batch beyond them (a batch starts inside the window of the
  read that asked for it), and nothing more once the reader has stopped.
  For large messages the window is counted in bytes: a folder of 1 MB
  messages is not read 512 messages ahead.  It never sets
  \\Seen: every body fetch is BODY.PEEK[].
* A folder's first listing opens the read-ahead connections, with the
  folder selected, before anything is read: a scan that follows finds them
  ready (a connect, TLS, a login and a SELECT are six round trips, 0.3 s at
  50 ms).  Nothing is fetched for it; with a download budget (no
  read-ahead) it opens none.  A server that refuses those connections, or
  their SELECT, costs the scan nothing: the reads are right, and the pool
  counts only the connections it has.
* On a read-only mount the kernel opens files without asking the daemon
  (fs/ops.c, no-open mode): a file already in the page cache costs no
  request at all, and a scan still reads ahead in batches, because one
  message in NO_OPEN_TRIPWIRE is left out of the page cache and its READ
  tells where the reader is.  The daemon's -d log counts the requests.

Run: IMAPFS_BIN=build/imapfs /usr/bin/python3 -m pytest -v tests/integration/test_readahead.py
"""

import errno
import os
import re
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fakeimap import CLOSE, Mailbox, Message, Sleep  # noqa: E402
from test_hostile import rig  # noqa: E402,F401 (the fixture)
from test_quirks import sized_message  # noqa: E402

# fs/account_p.h: READAHEAD_MESSAGES and READAHEAD_BYTES (the window ahead of
# the reader, for the default cache_size), BATCH_MESSAGES and BATCH_BYTES
# (one UID FETCH)
WINDOW = 512
WINDOW_BYTES = 32 << 20
BATCH = 256
BATCH_BYTES = 8 << 20
NO_OPEN_TRIPWIRE = 32     # fs/bodies.c


def folder_of(count, size=600):
    bodies = {uid: sized_message(uid, size) for uid in range(1, count + 1)}
    return bodies, Mailbox("INBOX", messages=[Message(uid, bodies[uid]) for uid in sorted(bodies)])


def body_fetches(srv):
    """Records the UID sets of the BODY[] fetches the fake answers: [(uids, raw line)]."""
    seen = []
    lock = threading.Lock()

    def hook(conn, cmd):
        if conn.is_body_fetch(cmd) and conn.selected is not None:
            with lock:
                seen.append(([m.uid for _, m in conn.matched(cmd)], cmd.raw))
        return None

    srv.on("UID FETCH", hook)
    return seen


def test_next_batch_is_asked_for_while_the_current_one_arrives(rig):
    bodies, box = folder_of(2000)
    srv = rig.server(mailboxes=[box])
    release = threading.Event()
    held = []

    def hold(conn, cmd):
        """Read-ahead batches (not the reader's own first fetches, of UIDs
        1 and 2): the first message now, the rest once released."""
        if not conn.is_body_fetch(cmd) or conn.selected is None:
            return None
        matched = conn.matched(cmd)
        if len(matched) < 2 or matched[0][1].uid < 3:
            return None
        script = conn.default(cmd)
        conn.send(script[0])
        held.append([m.uid for _, m in matched])
        release.wait(60)
        return script[1:]

    srv.on("UID FETCH", hold)
    # a network timeout longer than the hold: a timed-out batch is fetched
    # again on a fresh connection, which is not what this test looks for
    m = rig.mounted(srv, options=["cache_dir=none"], connections=3, timeout=90)
    read, errors = {}, []

    def reader():
        try:
            for uid in sorted(bodies):
                with open(m.path("INBOX", f"{uid}.eml"), "rb") as f:
                    read[uid] = f.read()
        except OSError as e:
            errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while len(held) < 2 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        held_at_once = [list(h) for h in held]
    finally:
        release.set()
        thread.join(120)
    assert not thread.is_alive(), "the reader is still blocked after the release"
    assert not errors, errors
    assert len(held_at_once) >= 2, \
        (f"while a read-ahead batch was arriving (UIDs {held_at_once[0][0]}-"
         f"{held_at_once[0][-1]}), the reader waited and no next batch was asked for")
    first, second = held_at_once[0], held_at_once[1]
    assert not set(first) & set(second), "the same message asked for twice"
    wrong = [uid for uid in bodies if read.get(uid) != bodies[uid]]
    assert not wrong, f"wrong bytes for {wrong[:10]}"
    m.finish()


def read_first_from_a_slow_server(rig, count, size, last_read, options=()):
    """A folder of count messages on a server 0.1 s away (the reader keeps
    meeting batches still in flight); its first last_read messages read in
    order, byte for byte.  Returns the mount and the fake's body fetches."""
    bodies, box = folder_of(count, size=size)
    srv = rig.server(mailboxes=[box])
    seen = body_fetches(srv)
    srv.on("UID FETCH", lambda conn, cmd: [Sleep(0.1)] + conn.default(cmd)
           if conn.is_body_fetch(cmd) else None)
    m = rig.mounted(srv, options=["cache_dir=none"] + list(options), connections=4)
    for uid in range(1, last_read + 1):
        with open(m.path("INBOX", f"{uid}.eml"), "rb") as f:
            assert f.read() == bodies[uid], uid
    return m, seen


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_read_ahead_stays_in_its_window_and_stops_with_the_reader(rig, mode):
    last_read = 600
    m, seen = read_first_from_a_slow_server(rig, 4000, 600, last_read,
                                            options=["ro"] if mode == "ro" else [])
    time.sleep(1.0)         # whatever was asked for arrives
    count = len(seen)
    fetched = sorted({uid for uids, _ in seen for uid in uids})
    time.sleep(1.0)
    assert len(seen) == count, f"fetches went on after the reader stopped: {seen[count:]}"
    # at most a window and a batch beyond the last message read
    assert fetched[-1] <= last_read + WINDOW + BATCH, \
        f"read-ahead went to UID {fetched[-1]} for a reader that stopped at {last_read}"
    assert fetched[-1] > last_read, "no read-ahead at all"
    not_peek = [raw for _, raw in seen if b"BODY.PEEK[]" not in raw.upper()]
    assert not not_peek, f"body fetches that set \\Seen: {not_peek[:3]}"
    m.finish()


def test_read_ahead_window_of_large_messages_is_counted_in_bytes(rig):
    size, last_read = 1_000_000, 30
    m, seen = read_first_from_a_slow_server(rig, 200, size, last_read)
    time.sleep(2.0)         # whatever was asked for arrives
    fetched = sorted({uid for uids, _ in seen for uid in uids})
    bound = last_read + WINDOW_BYTES // size + BATCH_BYTES // size
    assert fetched[-1] > last_read, "no read-ahead at all"
    assert fetched[-1] <= bound, \
        (f"read-ahead of {size}-byte messages went to UID {fetched[-1]} for a reader that "
         f"stopped at {last_read} ({(fetched[-1] - last_read) * size / 2**20:.0f} MiB ahead)")
    m.finish()


def connections_selecting(srv, name):
    """Indices of the fake's connections that selected or examined name."""
    return {i for i, _, command, raw in srv.commands
            if command in ("EXAMINE", "SELECT") and name.encode() in raw}


def test_first_listing_opens_the_read_ahead_connections(rig):
    bodies, box = folder_of(1000)
    srv = rig.server(mailboxes=[box])
    m = rig.mounted(srv, options=["cache_dir=none"], connections=4)
    seen = body_fetches(srv)
    os.listdir(m.path("INBOX"))
    deadline = time.monotonic() + 10
    while len(connections_selecting(srv, "INBOX")) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = connections_selecting(srv, "INBOX")
    assert len(ready) == 4, \
        f"after the first listing, {len(ready)} connection(s) have INBOX selected, not 4"
    assert seen == [], f"fetched before anything was read: {seen[:3]}"
    for uid in sorted(bodies):   # a scan: read-ahead on the connections made ready
        with open(m.path("INBOX", f"{uid}.eml"), "rb") as f:
            assert f.read() == bodies[uid], uid
    # (the watcher's own connection, which comes when it likes, never selects)
    assert connections_selecting(srv, "INBOX") == ready, "the scan opened connections of its own"
    assert {i for i, _, command, raw in srv.commands if command == "UID FETCH"
            and b"BODY" in raw} <= ready, "a body was fetched on a connection not made ready"
    m.finish()


def test_no_connections_ahead_with_a_download_budget(rig):
    bodies, box = folder_of(100)
    srv = rig.server(mailboxes=[box])
    m = rig.mounted(srv, options=["cache_dir=none", "max_download=100M"], connections=4)
    os.listdir(m.path("INBOX"))
    time.sleep(1.5)     # what a warm-up takes on 127.0.0.1, many times over
    # (the watcher's own connection comes when it likes; it does not select)
    ready = connections_selecting(srv, "INBOX")
    assert len(ready) == 1, \
        f"{len(ready)} connections have INBOX selected with read-ahead off: the lister's only"
    m.finish()


def warm_up_refused(rig, refuse_connect, refuse_examine, count):
    """A folder of count messages listed while the fake refuses what the
    warm-ups do (their connections, or their EXAMINE); then read through,
    byte for byte, from a server a little away (so that read-ahead wants
    every connection it may have).  Returns the connections that fetched."""
    bodies, box = folder_of(count)
    srv = rig.server(mailboxes=[box])
    m = rig.mounted(srv, options=["cache_dir=none"], connections=4, timeout=5)
    refusing = [True]
    before = len(srv.connections)
    if refuse_connect:
        srv.on_connect = lambda conn: [CLOSE] if refusing[0] else None
    if refuse_examine:
        srv.on("EXAMINE", lambda conn, cmd: [cmd.no("not now")]
               if refusing[0] and conn.index >= before else None)
    os.listdir(m.path("INBOX"))
    deadline = time.monotonic() + 10
    while len(srv.connections) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(srv.connections) >= before + 3, "no connections were tried ahead of a scan"
    time.sleep(0.5)          # the warm-ups finish failing
    refusing[0] = False
    srv.on("UID FETCH", lambda conn, cmd: [Sleep(0.05)] + conn.default(cmd)
           if conn.is_body_fetch(cmd) else None)
    for uid in sorted(bodies):
        with open(m.path("INBOX", f"{uid}.eml"), "rb") as f:
            assert f.read() == bodies[uid], uid
    assert "cannot reach the server" not in m.log(), m.log()[-2000:]
    m.finish()
    return {i for i, _, command, raw in srv.commands if command == "UID FETCH" and b"BODY" in raw}


def test_refused_warm_up_connections_are_not_counted(rig):
    fetching = warm_up_refused(rig, refuse_connect=True, refuse_examine=False, count=3000)
    # A pool still counting the three refused ones would be full (4) and stay
    # at the lister's connection.  How far it grows past that depends on how
    # fast the reader goes: 2 of 4 under a loaded machine (seen with two test
    # processes), 3 or 4 on a quiet one.
    assert len(fetching) >= 2, f"bodies fetched on {len(fetching)} connection(s): the pool " \
                               "did not grow after the refused warm-ups"


def test_refused_warm_up_select_is_harmless(rig):
    warm_up_refused(rig, refuse_connect=False, refuse_examine=True, count=600)


FUSE_REQUEST = re.compile(rb"opcode: ([A-Z_]+) \(")     # libfuse's -d line for each request
FUSE_READ = re.compile(r"opcode: READ \(\d+\), nodeid: (\d+)")
PAGE_STORED = re.compile(r"page cache: stored node (\d+)")   # fs/notify.c, -d


def reads_and_stores(log):
    """The -d log's READs, in order, each as (uid, whether the daemon had
    already put that message's pages into the page cache).  A store waits
    for the page lock a READ of that page holds, so a READ's line comes
    after its message's store line only if the kernel asked for pages it
    had been given."""
    stored, reads = set(), []
    for line in log.splitlines():
        read = FUSE_READ.search(line)
        if read:
            node = int(read.group(1))
            reads.append((node & 0xFFFFFFFF, node in stored))
            continue
        store = PAGE_STORED.search(line)
        if store:
            stored.add(int(store.group(1)))
    return reads


def fuse_requests(m):
    """How many requests of each kind the daemon's -d log shows so far."""
    counts = {}
    for kind in FUSE_REQUEST.findall(m.log().encode()):
        counts[kind.decode()] = counts.get(kind.decode(), 0) + 1
    return counts


def read_every_message(m, bodies):
    # unbuffered: a buffered open asks isatty(), an IOCTL request per file
    for uid in sorted(bodies):
        with open(m.path("INBOX", f"{uid}.eml"), "rb", buffering=0) as f:
            assert f.read() == bodies[uid], uid


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_read_only_mount_opens_without_requests(rig, mode):
    """Read every message of a folder twice.  On a read-only mount the first
    OPEN and FLUSH are answered ENOSYS and the kernel sends neither again,
    nor any RELEASE; the first pass reads ahead in batches and reaches the
    daemon about once per NO_OPEN_TRIPWIRE messages; the second pass sends
    no request at all.  'rw' is the control: an OPEN for every file."""
    count = 2000
    bodies, box = folder_of(count)
    srv = rig.server(mailboxes=[box])
    seen = body_fetches(srv)
    m = rig.mounted(srv, options=["cache_dir=none"] + (["ro"] if mode == "ro" else []),
                    connections=4, extra_args=["-d"])
    os.listdir(m.path("INBOX"))
    before = fuse_requests(m)
    read_every_message(m, bodies)
    first, first_log = fuse_requests(m), m.log()
    read_every_message(m, bodies)
    second = fuse_requests(m)

    def new(after, since, kind):
        return after.get(kind, 0) - since.get(kind, 0)

    if mode == "rw":
        assert new(first, before, "OPEN") == count, (before, first)
        assert new(second, first, "OPEN") == count, (first, second)
        m.finish()
        return
    assert first.get("OPEN", 0) <= 1 and second.get("OPEN", 0) <= 1, (first, second)
    assert second.get("FLUSH", 0) <= 1, second
    assert second.get("RELEASE", 0) == 0, second
    reads = new(first, before, "READ")
    # Each READ is a tripwire (one message in NO_OPEN_TRIPWIRE, kept out of
    # the page cache), or one for a message whose pages were still queued
    # for the notifier: the reader caught up with read-ahead.  On a quiet
    # machine that is a handful (64 READs for 2000); under the sanitizers
    # in the whole suite 219 were seen.  A READ of pages already stored
    # means the kernel did not keep them.  This VM's kernel does drop page
    # cache with no memory pressure (a 100 MiB file read once lost 5 % of
    # its pages within a minute; /proc/vmstat's drop_pagecache counts up),
    # so a few such READs are the machine; a kernel that kept none of the
    # stored pages would show about 2000.
    evicted_at_most = count // 100
    trail = reads_and_stores(first_log)
    late = [uid for uid, was_stored in trail if was_stored]
    tripwires = [uid for uid, _ in trail if (uid - 1) % NO_OPEN_TRIPWIRE == 0]
    fetches = [uids for uids, _ in seen]
    print(f"{reads} READs ({len(tripwires)} tripwires, {reads - len(tripwires)} before their "
          f"store, {len(late)} after it); body fetches of {[len(f) for f in fetches]} messages")
    assert len(late) <= evicted_at_most, f"READs of messages whose pages had been stored: {late[:20]}"
    assert reads <= count // 4, \
        f"{reads} READs reached the daemon for {count} messages: read-ahead's pages were not used"
    assert len(tripwires) >= count // NO_OPEN_TRIPWIRE, f"only {len(tripwires)} tripwire READs"
    assert len(fetches) <= 2 * count // BATCH + 10 and max(map(len, fetches)) >= BATCH // 2, \
        f"read-ahead lost the reader: {len(fetches)} body fetches, sizes {[len(f) for f in fetches][:20]}"
    assert sorted(uid for f in fetches for uid in f) == sorted(bodies), "a message fetched twice"
    # only the very first read is a lone one: the reader never outran what
    # read-ahead knew of it (without the tripwires it does at every window's
    # end, and each time the next read fetches one message alone)
    lone = [f for f in fetches if len(f) == 1]
    assert len(lone) == 1, f"read-ahead lost the reader {len(lone) - 1} time(s): lone fetches {lone}"
    # reading it all again: every page is in the page cache but those the
    # machine dropped (above), which come back as READs
    quiet = {kind: new(second, first, kind) for kind in second if new(second, first, kind)}
    assert quiet.pop("READ", 0) <= evicted_at_most and not quiet, \
        f"reading it all again sent requests: {new(second, first, 'READ')} READs, {quiet}"
    p = subprocess.run(["cat", m.path("INBOX", "1.eml")], capture_output=True)
    assert p.returncode == 0 and p.stdout == bodies[1]
    try:
        with open(m.path("INBOX", "1.eml"), "r+b"):
            pass
        raise AssertionError("a message of a read-only mount opened for writing")
    except OSError as e:
        assert e.errno == errno.EROFS, e
    m.finish()
