"""Connection faults between imapfs and a real Dovecot (issue 5).

The session's throwaway Dovecot (conftest ``server``) is reached through
tests/integration/faultproxy.py, a TCP proxy on 127.0.0.1 that the test
tells to cut connections (all at once, or after N bytes so the cut lands in
the middle of a TLS record and of a message literal), to stall, or to refuse
new connections.  imapfs runs on imaps:// through the proxy (TLS passes
through: the proxy only sees bytes) with -o timeout=3.

Each case requires: no crash (the daemon is alive, and exits 0 after
fusermount3 -u), no hang (operations end within the timeout plus a margin),
no wrong bytes (whatever is read is what the server holds, checked with an
independent imaplib client), and recovery (once the network behaves, reads
work again, allowing for imapfs's reconnect backoff of at most 10 s).
"""

import os
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faultproxy import FaultProxy  # noqa: E402

TIMEOUT = 3
OP_LIMIT = TIMEOUT + 4
HARD_LIMIT = 60
BACKOFF_MAX = 10
WORD = b"zebracorn"


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.host, server.imaps_port).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def faulty(mounter, proxy, tmp_path):
    """imapfs on imaps:// through the proxy, with a persistent cache of its
    own: the default one is named by the port, and a proxy of an earlier
    test may have had this one (a body found there reads while the server
    is unreachable)."""
    m = mounter(url=mounter.url(port=proxy.port),
                options=mounter.default_options() + [f"timeout={TIMEOUT}", "connections=2",
                                                     f"cache_dir={tmp_path / 'cache'}"])
    return m


@pytest.fixture(scope="module")
def expected(server, checker):
    """Per folder path on the mount: {uid: body}, for the folders used here."""
    out = {}
    for path in ("INBOX", "Lists/notmuch", "Archive/2023", "Archive/2024", "Sent Items"):
        raw = server.server_name(path) if path != "INBOX" else "INBOX"
        out[path] = checker.bodies(raw)
    return out


def run(argv, limit=HARD_LIMIT):
    t = time.monotonic()
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=limit)
        return r.returncode, r.stdout, r.stderr, time.monotonic() - t, False
    except subprocess.TimeoutExpired as e:
        return None, e.stdout or b"", e.stderr or b"", time.monotonic() - t, True


def cat(m, folder, uid, limit=HARD_LIMIT):
    return run(["cat", os.path.join(m.mountpoint, folder, f"{uid}.eml")], limit)


def assert_cat_right(m, expected, folder, uid, what=""):
    rc, out, err, elapsed, hung = cat(m, folder, uid)
    assert not hung, f"{what}: cat {folder}/{uid}.eml hung"
    assert rc == 0, f"{what}: cat {folder}/{uid}.eml failed after {elapsed:.1f}s: {err!r}"
    assert out == expected[folder][uid], f"{what}: {folder}/{uid}.eml: wrong bytes"


def eventually_right(m, expected, folder, uid, within=BACKOFF_MAX + 3):
    deadline = time.monotonic() + within
    while True:
        rc, out, err, elapsed, hung = cat(m, folder, uid, limit=OP_LIMIT + 5)
        assert not hung and elapsed <= OP_LIMIT, f"cat took {elapsed:.1f}s during recovery"
        if rc == 0 or time.monotonic() > deadline:
            break
        assert b"Input/output error" in err, err
        time.sleep(0.25)
    assert rc == 0, \
        f"{folder}/{uid}.eml still failing {within}s after the network recovered: {err!r}"
    assert out == expected[folder][uid], f"{folder}/{uid}.eml: wrong bytes after recovery"


def grep_files(m, folder):
    return run(["grep", "-rl", WORD, os.path.join(m.mountpoint, folder)])


def holders(expected, folder):
    return {uid for uid, body in expected[folder].items() if WORD in body}


@pytest.mark.parametrize("fault", ["cut-all", "cut-mid-literal", "cut-client-side"])
def test_cut_during_grep(faulty, proxy, expected, fault):
    """Connections cut while grep -r reads a 300-message folder: grep either
    completes with exactly the right files, or reports errors (EIO) and
    lists only files that really hold the word; afterwards cat and a second
    grep -r work (imapfs reconnected)."""
    m = faulty
    folder = "Lists/notmuch"
    want = holders(expected, folder)
    assert len(want) >= 3
    if fault == "cut-mid-literal":
        proxy.cut_after(s2c=120_000, limit=2)      # lands inside message bodies
    elif fault == "cut-client-side":
        proxy.cut_after(c2s=250, limit=2)          # inside a command (TLS record)
    before = proxy.connections_total
    p = subprocess.Popen(["grep", "-rl", WORD, os.path.join(m.mountpoint, folder)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if fault == "cut-all":
        for delay in (0.15, 0.3, 0.3):
            time.sleep(delay)
            proxy.cut_all()
    try:
        out, err = p.communicate(timeout=HARD_LIMIT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"grep -r hung after the cut ({fault}); stderr {err[-2000:]!r}")
    proxy.clear_cuts()
    assert proxy.cuts > 0, "the fault never happened (test too slow to inject it?)"
    found = {int(os.path.basename(line)[:-4])
             for line in out.splitlines() if line.endswith(b".eml")}
    assert found <= want, f"grep matched files without the word: {sorted(found - want)}"
    if p.returncode == 0:
        assert found == want, f"grep succeeded but missed {sorted(want - found)}"
    else:
        assert p.returncode == 2 and b"Input/output error" in err, (p.returncode, err[-2000:])
    assert m.proc.poll() is None, f"imapfs died after the cut:\n{m.log()[-5000:]}"
    # recovery: a new connection, right bytes, and a full grep
    uid = sorted(want)[0]
    eventually_right(m, expected, folder, uid)
    assert proxy.connections_total > before
    rc, out, err, elapsed, hung = grep_files(m, folder)
    assert not hung and rc == 0, (rc, err[-2000:])
    assert {int(os.path.basename(line)[:-4]) for line in out.splitlines()} == want
    m.unmount()


def test_stall_gives_eio_then_recovers(faulty, proxy, expected):
    """The network stops forwarding: an uncached read fails with EIO within
    the timeout plus a margin, cached files and listings are still served,
    and after the stall reads work again."""
    m = faulty
    for uid in sorted(expected["INBOX"])[:3]:
        assert_cat_right(m, expected, "INBOX", uid, "warm-up")
    rc, out, err, elapsed, hung = run(["ls", os.path.join(m.mountpoint, "INBOX")])
    assert rc == 0
    proxy.stall()
    try:
        uid = sorted(expected["Archive/2023"])[0]
        rc, out, err, elapsed, hung = cat(m, "Archive/2023", uid)
        assert not hung, "cat hung while the network stalled"
        assert rc != 0 and b"Input/output error" in err, (rc, err)
        assert elapsed <= OP_LIMIT, f"EIO only after {elapsed:.1f}s (timeout={TIMEOUT})"
        t = time.monotonic()
        for uid in sorted(expected["INBOX"])[:3]:
            assert_cat_right(m, expected, "INBOX", uid, "cached read during the stall")
        rc, out, err, elapsed, hung = run(["ls", os.path.join(m.mountpoint, "INBOX")])
        assert rc == 0 and not hung, err
        assert time.monotonic() - t < 3, "cached data was slow to come while the network stalled"
        assert m.proc.poll() is None
    finally:
        proxy.resume()
    eventually_right(m, expected, "Archive/2023", sorted(expected["Archive/2023"])[0])
    m.unmount()


@pytest.mark.parametrize("idle_timeout", [3, None])
def test_connections_forgotten_by_nat(mounter, proxy, expected, idle_timeout):
    """A NAT box forgets idle connections without a word.  With -o
    idle_timeout=3 the mount closes pooled connections unused that long, so a
    read after the idle spell goes out on a new connection at once.  The
    control (default idle_timeout, 240 s) shows what that prevents: the read
    meets a dead connection and waits out the timeout before its retry, which
    goes out on a new connection, not on the other one as long forgotten.  The
    watcher's poll is turned down: its folder-list poll goes out on a pooled
    connection, and had it met the dead one first, the control's read would
    have found the pool empty and opened a new connection at once."""
    timeout = 6
    options = mounter.default_options() + [f"timeout={timeout}", "connections=2",
                                           "poll_interval=3600"]
    if idle_timeout:
        options.append(f"idle_timeout={idle_timeout}")
    m = mounter(url=mounter.url(port=proxy.port), options=options)
    # Two reads at once, held back by the proxy so that they overlap: the pool
    # then holds two connections, and the NAT box forgets both.
    failed = []

    def read_first(folder):
        try:
            assert_cat_right(m, expected, folder, sorted(expected[folder])[0],
                             "before the idle spell")
        except AssertionError as e:
            failed.append(str(e))

    proxy.stall()
    readers = [threading.Thread(target=read_first, args=(folder,))
               for folder in ("INBOX", "Archive/2024")]
    for reader in readers:
        reader.start()
    time.sleep(1)
    proxy.resume()
    for reader in readers:
        reader.join()
    assert not failed, failed
    # The watcher's first poll lists the folders on a pooled connection right
    # after it starts.  Under ASan that can come after the reads above; had it
    # met the black hole it would time out and leave the pool empty, and the
    # control's read would open a new connection at once.  So the black hole
    # comes only once the mount's traffic is over.
    proxy.wait_quiet()
    assert proxy.connections_open() >= 3, "the pool should hold two connections, the watcher one"
    proxy.blackhole_existing()
    time.sleep(6)       # idle longer than idle_timeout, plus the watcher's tick
    t = time.monotonic()
    assert_cat_right(m, expected, "Archive/2023", sorted(expected["Archive/2023"])[0],
                     "first read after the idle spell")
    took = time.monotonic() - t
    if idle_timeout:
        assert took < timeout / 2, (f"the read took {took:.1f}s: it met a connection the "
                                    f"NAT box had forgotten")
    else:
        assert took >= timeout - 1, (f"control: the read took only {took:.1f}s, so the test "
                                     f"does not show what idle_timeout prevents")
    m.unmount()


@pytest.mark.parametrize("mode", ["unbind", "reset", "close"])
def test_refused_connections(faulty, proxy, expected, mode):
    """All connections dropped and new ones refused: an uncached read fails
    with EIO quickly (well within the timeout), cached files and listings
    are still readable; when the server takes connections again, reads
    work."""
    m = faulty
    for uid in sorted(expected["INBOX"])[:3]:
        assert_cat_right(m, expected, "INBOX", uid, "warm-up")
    proxy.refuse(mode)
    proxy.cut_all()
    try:
        uid = sorted(expected["Archive/2024"])[0]
        rc, out, err, elapsed, hung = cat(m, "Archive/2024", uid)
        assert not hung and rc != 0 and b"Input/output error" in err, (rc, err)
        assert elapsed < TIMEOUT, f"refused connections: EIO only after {elapsed:.1f}s"
        # and again (a second request must not wait either)
        rc, out, err, elapsed, hung = cat(m, "Sent Items", sorted(expected["Sent Items"])[0])
        assert not hung and rc != 0 and elapsed < TIMEOUT, (rc, err, elapsed)
        for uid in sorted(expected["INBOX"])[:3]:
            assert_cat_right(m, expected, "INBOX", uid, "cached read while refused")
        rc, out, err, elapsed, hung = run(["ls", "-l", os.path.join(m.mountpoint, "INBOX")])
        assert rc == 0 and elapsed < TIMEOUT, (rc, err, elapsed)
        assert m.proc.poll() is None
    finally:
        proxy.accept()
    eventually_right(m, expected, "Archive/2024", sorted(expected["Archive/2024"])[0])
    m.unmount()
