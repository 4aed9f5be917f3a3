"""The real server goes away and comes back under a live mount.

test_faults.py cuts and stalls connections with a proxy; here the Dovecot
itself is restarted, stopped, or has the processes behind imapfs's
connections killed (what an idle disconnect, a server upgrade or an OOM kill
does to a long-lived mount):

* Dovecot restarted (SIGTERM, then started again with the same config, so on
  the same ports) while ``grep -r`` runs: no crash, every count grep printed
  is right, files it could not read are reported as I/O errors and nothing
  else, and afterwards ``cat`` and ``ls`` work without remounting.
* Dovecot stopped: uncached data fails with EIO within -o timeout plus a
  margin (and at once once the outage is older than the timeout), cached
  bodies and listings are still served, and the unmount is clean and quick.
* The server-side imap processes of the mount's pooled connections killed
  (Dovecot's idle disconnect after 30 minutes, which the test cannot wait
  for): the next ``cat`` of an uncached file and the next listing succeed,
  because listings and fetches are retried on a fresh connection.

Each test has a Dovecot of its own (the session's stays as seeded) and every
mount must end with a clean unmount (daemon exit status 0).  Timings are
printed (``pytest -s``) and collected in one summary line at the end.
"""

import array
import errno
import fcntl
import os
import re
import signal
import subprocess
import tempfile
import termios
import threading
import time

import pytest

import imapserver
from fsutil import mount_server_processes, read_bytes

MARGIN = 4.0            # seconds over -o timeout an operation may take to fail
UNMOUNT_LIMIT = 5.0     # seconds: the daemon must be gone this soon after fusermount3 -u
DEBUG_ARGS = ["-d"] if os.environ.get("IMAPFS_TEST_DEBUG") else []
WORD = b"zebracorn"


# --------------------------------------------------------------------------
# timings report

class _Timings:
    def __init__(self):
        self.items = []

    def add(self, what, seconds):
        self.items.append((what, seconds))
        print(f"timing {what}: {seconds:.2f}s")

    def pytest_terminal_summary(self, terminalreporter):
        if self.items:
            terminalreporter.write_sep("-", "restart/outage timings")
            terminalreporter.write_line("imapfs outage timings: " + ", ".join(
                f"{what}={seconds:.2f}s" for what, seconds in self.items))


TIMINGS = _Timings()


@pytest.fixture(scope="module", autouse=True)
def _timings(request):
    pm = request.config.pluginmanager
    if not pm.is_registered(TIMINGS):
        pm.register(TIMINGS, "imapfs-outage-timings")
    yield


# --------------------------------------------------------------------------
# a server of the test's own, that can be stopped and started again

def _session_members(sid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(entry))
    return out


def stop_all(srv, timeout=10):
    """Stop Dovecot entirely: TestServer.stop() ends the master only, and
    Dovecot's client processes (imap, imap-login) and helpers live on,
    serving the connections already open, until their clients go.  A server
    that stops or restarts for real ends those too.  The master was started
    in a session of its own (start_new_session), so its session id names
    exactly this server's processes."""
    sid = srv.pid
    srv.stop()
    left = _session_members(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _session_members(sid):
        os.kill(pid, signal.SIGKILL)
    while _session_members(sid):
        time.sleep(0.05)


def start_again(srv, timeout=30):
    """Start the stopped Dovecot again with its config as written (the same
    ports, the same mail), as TestServer.start does, without re-seeding."""
    assert not srv.running()
    with open(srv.path("dovecot.stdout"), "ab") as log:
        srv.proc = subprocess.Popen(
            [imapserver.DOVECOT, "-F", "-c", srv.config_path],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, preexec_fn=imapserver.die_with_parent)
    srv.pid = srv.proc.pid
    srv._save_state()
    srv._wait_ready(timeout)


@pytest.fixture
def own_server(request):
    srv = imapserver.TestServer(tempfile.mkdtemp(prefix="imapfs-restart-server.", dir="/tmp"),
                                tied_to_parent=True)
    try:
        srv.start()
        yield srv
    finally:
        stop_all(srv)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"\nserver files kept in {srv.dir}")
        else:
            srv.remove()


@pytest.fixture
def mount_on(mounter, own_server):
    """mount_on(options): imapfs on own_server; after the test the daemon
    must still be alive and exit 0 at the unmount."""
    made = []

    def factory(options=()):
        m = mounter(server=own_server, options=mounter.default_options(own_server) + list(options),
                    extra_args=DEBUG_ARGS)
        made.append(m)
        return m
    yield factory
    for m in made:
        if m.exit_status is not None:
            continue
        if m.proc.poll() is not None:
            pytest.fail(f"imapfs died during the test with status {m.proc.returncode}; "
                        f"log:\n{m.log()[-5000:]}")
        m.unmount()


def expected_bodies(srv):
    """{mount-relative path: body} of every message, read with imaplib."""
    out = {}
    with srv.checker() as c:
        delim = c.delimiter()
        for flags, _, raw, _ in c.list_folders():
            if flags & {"\\Noselect", "\\NonExistent"}:
                continue
            rel = "/".join(imapserver.mutf7_decode(raw).split(delim))
            for uid, body in c.bodies(raw).items():
                out[f"{rel}/{uid}.eml"] = body
    return out


def add_bulk(srv, folder, count, size):
    """A folder of count messages of about size bytes (so that reading it takes a while)."""
    with srv.checker() as c:
        c._ok(*c.imap.create(imapserver.imap_quote(folder)), "CREATE")
        line = b"bulk filler line to make the message larger than small ones are %06d\r\n"
        for i in range(count):
            body = b"".join(line % j for j in range(size // len(line % 0)))
            if i % 50 == 7:
                body += b"a zebracorn in the bulk\r\n"
            msg = (b"From: bulk@example.org\r\nTo: alice@example.org\r\nSubject: bulk %d\r\n"
                   b"Date: Mon, 04 Mar 2024 10:00:00 +0100\r\n\r\n" % i) + body
            c._ok(*c.imap.append(imapserver.imap_quote(folder), None,
                                 imapserver.imaplib.Time2Internaldate(time.time()), msg), "APPEND")


def pipe_bytes(pipe):
    """Bytes waiting in a pipe (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, buf)
    return buf[0]


def run(argv, limit=60):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=limit)


def timed(fn, *args):
    t0 = time.monotonic()
    try:
        result = fn(*args)
        error = None
    except OSError as e:
        result, error = None, e
    return result, error, time.monotonic() - t0


def listdir(path):
    return set(os.listdir(path))


# --------------------------------------------------------------------------
# Dovecot restarted during grep -r

def test_restart_during_grep(mount_on, own_server):
    """grep -rc over the mount; Dovecot is stopped while grep runs and
    started again a second later on the same ports."""
    add_bulk(own_server, "Bulk", 400, 40_000)     # ~16 MB: more than a few read-ahead batches
    expected = expected_bodies(own_server)
    m = mount_on()
    targets = ["Bulk", "Lists", "Archive"]          # INBOX stays uncached, for after
    grep = subprocess.Popen(["grep", "-rc", "zebracorn"] + [os.path.join(m.mountpoint, t) for t in targets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # grep must be mid-way when the server goes, however fast the mount is:
    # its output pipe is made small and not read, so grep blocks once it
    # has counted some 50 files (long absolute names fill the pipe sooner);
    # then the server stops, and grep goes on
    # (over mail not fetched yet) while the server is down and after.
    fcntl.fcntl(grep.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    deadline = time.monotonic() + 30
    while pipe_bytes(grep.stdout) < 4096 - 200:
        assert grep.poll() is None, "grep ended before its output filled 4 KiB"
        assert time.monotonic() < deadline, "grep did not get going within 30 s"
        time.sleep(0.02)
    t_stop = time.monotonic()
    stop_all(own_server)
    out_lines = []
    reader = threading.Thread(target=lambda: out_lines.extend(grep.stdout.read().splitlines()))
    reader.start()
    err_text = []
    err_reader = threading.Thread(target=lambda: err_text.append(grep.stderr.read()))
    err_reader.start()
    time.sleep(1.0)
    running_at_restart = grep.poll() is None
    start_again(own_server)
    TIMINGS.add("dovecot down (restart)", time.monotonic() - t_stop)
    try:
        grep.wait(120)
    except subprocess.TimeoutExpired:
        grep.kill()
        grep.wait()
        pytest.fail("grep -r did not finish within 120 s after the restart")
    reader.join()
    err_reader.join()
    TIMINGS.add("grep -r across the restart", time.monotonic() - t_stop)
    assert m.proc.poll() is None, f"imapfs died: status {m.proc.returncode}\n{m.log()[-5000:]}"

    # every printed count is right; unread files are I/O errors and nothing else
    counts = {}
    for line in out_lines:
        path, _, count = line.decode().rpartition(":")
        counts[os.path.relpath(path, m.mountpoint)] = int(count)
    errors = {}
    for line in err_text[0].decode(errors="replace").splitlines():
        mm = re.match(r"grep: (.*): ([^:]*)$", line)
        assert mm, f"unexpected grep stderr line: {line!r}"
        errors[os.path.relpath(mm.group(1), m.mountpoint)] = mm.group(2)
    wanted = {p: b for p, b in expected.items() if p.split("/")[0] in targets}
    wrong = {}
    for path, count in counts.items():
        assert path in wanted, f"grep printed a file the server does not have: {path}"
        want = sum(1 for line in wanted[path].split(b"\n") if WORD in line)
        if count != want:
            wrong[path] = (count, want)
    assert not wrong, f"wrong counts (got, want): {wrong}"
    assert set(errors.values()) <= {"Input/output error"}, errors
    missing = set(wanted) - set(counts) - set(errors)
    assert not missing, f"{len(missing)} files neither counted nor reported: {sorted(missing)[:10]}"
    print(f"grep across the restart: {len(counts)} files counted, {len(errors)} I/O errors")
    assert running_at_restart, "grep was done before the server came back: the test proved " \
                               "less than it should (make the Bulk folder larger)"

    # after the restart, without remounting: cat of uncached mail and ls work
    inbox = {p: b for p, b in expected.items() if p.startswith("INBOX/")}
    assert listdir(os.path.join(m.mountpoint, "INBOX")) == {p.split("/")[1] for p in inbox}
    t0 = time.monotonic()
    for path, body in sorted(inbox.items()):
        r = run(["cat", os.path.join(m.mountpoint, path)])
        assert r.returncode == 0 and r.stdout == body, f"cat {path} after the restart: {r.stderr!r}"
    TIMINGS.add("cat of all INBOX after the restart", time.monotonic() - t0)
    for path in errors:                            # what grep could not read, can be read now
        assert read_bytes(os.path.join(m.mountpoint, path)) == expected[path], path
    # and the server's changes are seen again (the watcher reconnected)
    with own_server.checker() as c:
        typ, resp = c.imap.append("INBOX", None, imapserver.imaplib.Time2Internaldate(time.time()),
                                  b"Subject: after the restart\r\n\r\nhello\r\n")
        uid = int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))
    t0 = time.monotonic()
    while f"{uid}.eml" not in listdir(os.path.join(m.mountpoint, "INBOX")):
        assert time.monotonic() - t0 < 15, "new mail after the restart not seen within 15 s"
        time.sleep(0.1)
    TIMINGS.add("new mail seen after the restart", time.monotonic() - t0)


def test_restart_while_idle(mount_on, own_server):
    """The mount has several pooled connections open and idle; Dovecot
    restarts (all its processes end, a new one listens on the same ports).
    Right after, without remounting: ls of a folder never listed, cat of mail
    never read, ls of a listed folder, all succeed at the first try."""
    expected = expected_bodies(own_server)
    m = mount_on()
    listed = ["Archive/2023", "Archive/2024", "Sent Items", "Lists/dovecot"]
    for folder in listed:
        listdir(os.path.join(m.mountpoint, folder))
    readers = [subprocess.Popen(["cat", os.path.join(m.mountpoint, folder, name)],
                                stdout=subprocess.DEVNULL)
               for folder in listed for name in sorted(os.listdir(os.path.join(m.mountpoint, folder)))[:2]]
    for r in readers:
        r.wait(60)
    time.sleep(2.5)
    _, count = mount_server_processes(own_server, m.proc.pid)
    print(f"{count} connections before the restart")
    assert count >= 2, "the mount should hold several connections"
    t0 = time.monotonic()
    stop_all(own_server)
    time.sleep(0.5)
    start_again(own_server)
    TIMINGS.add("dovecot down (idle restart)", time.monotonic() - t0)

    inbox = {p.split("/")[1]: b for p, b in expected.items() if p.startswith("INBOX/")}
    names, error, took = timed(listdir, os.path.join(m.mountpoint, "INBOX"))
    TIMINGS.add("first ls after an idle restart", took)
    assert error is None, f"ls INBOX (never listed) right after the restart: {error!r}"
    assert names == set(inbox)
    for name, body in sorted(inbox.items()):
        r = run(["cat", os.path.join(m.mountpoint, "INBOX", name)])
        assert r.returncode == 0 and r.stdout == body, f"cat INBOX/{name}: {r.stderr!r}"
    notmuch = {p: b for p, b in expected.items() if p.startswith("Lists/notmuch/")}
    path = sorted(notmuch)[0]
    r = run(["cat", os.path.join(m.mountpoint, path)])
    assert r.returncode == 0 and r.stdout == notmuch[path], f"cat {path}: {r.stderr!r}"


# --------------------------------------------------------------------------
# Dovecot stopped

def test_server_stopped(mount_on, own_server):
    timeout = 3
    expected = expected_bodies(own_server)
    m = mount_on([f"timeout={timeout}", "dir_cache_timeout=1"])
    inbox = os.path.join(m.mountpoint, "INBOX")
    archive = os.path.join(m.mountpoint, "Archive", "2023")
    inbox_names = listdir(inbox)
    archive_names = listdir(archive)
    cached = ["INBOX/1.eml", "INBOX/2.eml", "INBOX/3.eml"]
    for path in cached:
        assert read_bytes(os.path.join(m.mountpoint, path)) == expected[path]
    flags_before = os.getxattr(os.path.join(m.mountpoint, cached[0]), "user.imap.flags")
    uncached = [p for p in sorted(expected) if p.startswith("Lists/notmuch/")]

    stop_all(own_server)
    t_down = time.monotonic()
    time.sleep(1.5)     # the listings are now older than dir_cache_timeout

    # uncached: EIO, within the timeout plus a margin
    _, error, took = timed(read_bytes, os.path.join(m.mountpoint, uncached[0]))
    TIMINGS.add("uncached read, server down (timeout=3)", took)
    assert error is not None and error.errno == errno.EIO, f"got {error!r}"
    assert took <= timeout + MARGIN, f"EIO took {took:.1f}s with -o timeout={timeout}"

    # cached bodies, listings and flags are still served
    for path in cached:
        data, error, took = timed(read_bytes, os.path.join(m.mountpoint, path))
        assert error is None and data == expected[path], f"cached {path}: {error!r}"
        assert took <= timeout + MARGIN, f"cached read of {path} took {took:.1f}s"
    names, error, took = timed(listdir, inbox)
    TIMINGS.add("ls of a listed folder, server down", took)
    assert error is None and names == inbox_names, f"ls INBOX: {error!r}"
    assert took <= timeout + MARGIN
    names, error, took = timed(listdir, archive)
    assert error is None and names == archive_names, f"ls Archive/2023: {error!r}"
    assert os.getxattr(os.path.join(m.mountpoint, cached[0]), "user.imap.flags") == flags_before
    r = run(["cat"] + [os.path.join(m.mountpoint, p) for p in cached], limit=3 * (timeout + MARGIN))
    assert r.returncode == 0 and r.stdout == b"".join(expected[p] for p in cached)
    time.sleep(1.2)     # stale again: each listing fails again, and the log says so once
    assert listdir(inbox) == inbox_names and listdir(archive) == archive_names
    said = m.log().count("serving what is cached")
    assert said == 1, f"'serving what is cached' logged {said} times in one outage:\n{m.log()}"

    # once the outage is older than the timeout, uncached data fails at once
    while time.monotonic() - t_down <= timeout + 0.5:
        time.sleep(0.1)
    _, error, took = timed(read_bytes, os.path.join(m.mountpoint, uncached[1]))
    TIMINGS.add("uncached read, long outage", took)
    assert error is not None and error.errno == errno.EIO, f"got {error!r}"
    assert took <= 1.5, f"EIO after a long outage took {took:.1f}s; should be at once"
    r = run(["cat", os.path.join(m.mountpoint, uncached[2])], limit=timeout + MARGIN + 5)
    assert r.returncode != 0 and r.stdout == b"" and b"Input/output error" in r.stderr, r
    # a folder never listed cannot be listed; it fails, it does not hang
    _, error, took = timed(listdir, os.path.join(m.mountpoint, "Lists", "dovecot"))
    TIMINGS.add("ls of a never-listed folder, long outage", took)
    assert error is not None and error.errno == errno.EIO, f"got {error!r}"
    assert took <= timeout + MARGIN

    # unmount with the server gone: clean and quick
    t0 = time.monotonic()
    m.unmount()
    took = time.monotonic() - t0
    TIMINGS.add("unmount, server down", took)
    assert took <= UNMOUNT_LIMIT, f"imapfs took {took:.1f}s to exit after fusermount3 -u"


@pytest.mark.parametrize("when", ["idle", "after-failed-read"])
def test_unmount_with_server_gone(when, mount_on, own_server):
    """The server goes while the mount is idle (the watcher keeps failing to
    reconnect), or a read has just failed for want of a connection (the pool
    is in its reconnect backoff); fusermount3 -u then ends the daemon with
    status 0 within a few seconds."""
    m = mount_on(["timeout=3"])
    assert "INBOX" in listdir(m.mountpoint)
    listdir(os.path.join(m.mountpoint, "INBOX"))        # the mount is in use: the watcher polls
    stop_all(own_server)
    if when == "after-failed-read":
        # a reader waiting for the server; it fails within the timeout
        r = run(["cat", os.path.join(m.mountpoint, "INBOX", "5.eml")], limit=20)
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r
    else:
        time.sleep(5)       # several watcher polls fail meanwhile
    t0 = time.monotonic()
    m.unmount()
    took = time.monotonic() - t0
    TIMINGS.add(f"unmount, server gone ({when})", took)
    assert took <= UNMOUNT_LIMIT, f"imapfs took {took:.1f}s to exit after fusermount3 -u"


# --------------------------------------------------------------------------
# the server drops the mount's connections (idle disconnect)

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["bye", "killed"])
def test_pooled_connections_dropped_by_the_server(sig, mount_on, own_server):
    """Dovecot disconnects idle clients after 30 minutes.  Instead of waiting,
    the server processes behind every connection of the mount (the pool's and
    the watcher's) are killed: with SIGTERM Dovecot says BYE first, with
    SIGKILL the connection just ends.  Right after, the next cat of an
    uncached file in a listed folder (a fetch) and the next ls of a folder
    never listed (a listing) must succeed: both are retried on a fresh
    connection."""
    expected = expected_bodies(own_server)
    m = mount_on(["connections=4"])
    listed = ["Lists/notmuch", "Archive/2023", "Archive/2024", "Sent Items", "Lists/dovecot"]
    for folder in listed:
        listdir(os.path.join(m.mountpoint, folder))
    # several readers at once, so the pool holds several connections
    procs, count = [], 0
    read = set()
    for attempt in range(5):
        batch = [p for p in sorted(expected) if p.rsplit("/", 1)[0] in listed][attempt::60][:6]
        readers = [subprocess.Popen(["cat", os.path.join(m.mountpoint, p)], stdout=subprocess.DEVNULL)
                   for p in batch]
        read.update(batch)
        for r in readers:
            r.wait(60)
        time.sleep(2.5)          # the watcher has connected too
        procs, count = mount_server_processes(own_server, m.proc.pid)
        procs = [pid for pid, _ in procs]
        if len(procs) >= 3:
            break
    assert len(procs) >= 3, f"want several pooled connections and the watcher's; found {procs}"
    print(f"killing {len(procs)} server processes of {count} connections with {sig.name}")
    for pid in procs:
        os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(imapserver._pid_alive(p) for p in procs):
        time.sleep(0.02)
    assert not any(imapserver._pid_alive(p) for p in procs)

    # a fetch: the last message of Lists/notmuch is far from what was read
    # (read-ahead took at most a batch after each read message)
    path = max((p for p in expected if p.startswith("Lists/notmuch/")),
               key=lambda p: int(p.rsplit("/", 1)[1].split(".")[0]))
    t0 = time.monotonic()
    r = run(["cat", os.path.join(m.mountpoint, path)])
    TIMINGS.add(f"cat after the server dropped the connections ({sig.name})", time.monotonic() - t0)
    assert r.returncode == 0, f"cat {path} (not cached) after the connections dropped: {r.stderr!r}"
    assert r.stdout == expected[path]
    # a listing: INBOX was never listed
    inbox = {p.split("/")[1]: b for p, b in expected.items() if p.startswith("INBOX/")}
    names, error, took = timed(listdir, os.path.join(m.mountpoint, "INBOX"))
    assert error is None, f"ls INBOX (never listed) after the connections dropped: {error!r}"
    assert names == set(inbox)
    for name, body in sorted(inbox.items()):
        r = run(["cat", os.path.join(m.mountpoint, "INBOX", name)])
        assert r.returncode == 0 and r.stdout == body, f"cat INBOX/{name}: {r.stderr!r}"
    # and the watcher reconnected: new mail shows
    with own_server.checker() as c:
        typ, resp = c.imap.append("INBOX", None, imapserver.imaplib.Time2Internaldate(time.time()),
                                  b"Subject: after the drop\r\n\r\nhello\r\n")
        uid = int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))
    t0 = time.monotonic()
    while f"{uid}.eml" not in listdir(os.path.join(m.mountpoint, "INBOX")):
        assert time.monotonic() - t0 < 15, "new mail after the drop not seen within 15 s"
        time.sleep(0.1)
    TIMINGS.add(f"new mail seen after the drop ({sig.name})", time.monotonic() - t0)
