"""Hostile and malformed server input (issue 5), against tests/integration/fakeimap.py.

Every case mounts imapfs for real (``imapfs -f``, log to a file, mount seen
in /proc/self/mountinfo as fuse.imapfs) against a fake server on 127.0.0.1
that misbehaves in one chosen way, then acts on the mount with real tools in
child processes (so a hung request can be killed) and requires:

* no crash: the daemon is alive after the hostile case and exits 0 after
  ``fusermount3 -u``;
* no hang: each operation returns within the network timeout (-o timeout=3)
  plus a margin;
* a clear outcome: EIO (or the right bytes), or for a failed mount a non-zero
  exit with one ``imapfs: ...`` line, never wrong bytes;
* no escape: directory entries are safe names, tree walks stay in the mount;
* bounded memory: VmHWM under 100 MB after absurd sizes.

Plus the security defaults: LOGIN never before STARTTLS completes, refusal
without STARTTLS unless -o tls=none, the password never in argv nor in the
``-d`` log.

Run: IMAPFS_BIN=build/imapfs /usr/bin/python3 -m pytest -v tests/integration/test_hostile.py
"""

import ast
import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fakeimap  # noqa: E402
from fakeimap import (CLOSE, CRLF, STALL, FakeIMAP, Mailbox, Message, Sleep,  # noqa: E402
                      literal, simple_message)

TIMEOUT = 3                 # -o timeout=
MARGIN = 4                  # seconds an operation may take beyond TIMEOUT
OP_LIMIT = TIMEOUT + MARGIN
HARD_LIMIT = 30             # a child still running after this is killed: a hang
MOUNT_LIMIT = 15
# Memory a hostile answer may cost the daemon.  Under AddressSanitizer (the
# second pass of scripts/test sets ASAN_OPTIONS) every allocation carries
# redzones and freed memory sits in quarantine, roughly tripling the
# footprint: that pass checks memory safety, the plain pass the bound.
RSS_LIMIT_KB = 100 * 1024 * (3 if "ASAN_OPTIONS" in os.environ else 1)
PASSWORD = "secret-pass"
ENV_C = dict(os.environ, LC_ALL="C")


# --------------------------------------------------------------------------
# processes with a deadline

class Result:
    def __init__(self, argv, rc, out, err, elapsed, hung):
        self.argv, self.rc, self.out, self.err = argv, rc, out, err
        self.elapsed, self.hung = elapsed, hung

    def __repr__(self):
        return (f"<{' '.join(map(str, self.argv))}: rc={self.rc} hung={self.hung} "
                f"{self.elapsed:.2f}s out={self.out[:200]!r} err={self.err[:300]!r}>")


def run(argv, limit=HARD_LIMIT):
    t = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV_C, start_new_session=True)
    try:
        out, err = p.communicate(timeout=limit)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        hung = True
    return Result(argv, p.returncode, out, err, time.monotonic() - t, hung)


_PROBE = r"""
import base64, json, os, sys
op, path = sys.argv[1], os.fsencode(sys.argv[2])
try:
    if op == "read":
        with open(path, "rb") as f:
            data = f.read()
        r = {"ok": True, "data": base64.b64encode(data).decode()}
    elif op == "stat":
        st = os.stat(path)
        r = {"ok": True, "size": st.st_size, "mode": st.st_mode}
    elif op == "readstat":
        st0 = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
        st1 = os.stat(path)
        r = {"ok": True, "data": base64.b64encode(data).decode(), "size0": st0.st_size,
             "size1": st1.st_size}
    else:
        raise SystemExit("bad op")
except OSError as e:
    r = {"ok": False, "errno": e.errno, "error": e.strerror}
print(json.dumps(r))
"""


class Probe:
    def __init__(self, res):
        self.res = res
        self.elapsed = res.elapsed
        self.hung = res.hung
        try:
            self.r = json.loads(res.out.decode()) if not res.hung else {}
        except ValueError:
            self.r = {}
        self.ok = self.r.get("ok", False)
        self.errno = self.r.get("errno")
        self.data = base64.b64decode(self.r["data"]) if "data" in self.r else None

    def __getitem__(self, key):
        return self.r[key]

    def __repr__(self):
        return f"<probe ok={self.ok} errno={self.errno} {self.res!r}>"


def probe(op, path, limit=HARD_LIMIT):
    """os-level operation in a child process: read, stat, readstat."""
    return Probe(run([sys.executable, "-S", "-c", _PROBE, op, path], limit))


def listing(path, limit=HARD_LIMIT):
    """Raw directory entries (bytes, with . and .., unsorted, duplicates kept)
    via ls -1af, or (None, result) if ls failed."""
    res = run(["ls", "-1af", "--quoting-style=c", path], limit)
    if res.rc != 0 or res.hung:
        return None, res
    names = [ast.literal_eval("b" + line) for line in res.out.decode("ascii").splitlines()]
    return names, res


EIO = 5


def assert_quick(res, limit=OP_LIMIT, what=""):
    assert not res.hung, f"{what}: hung (killed after {HARD_LIMIT}s): {res!r}"
    assert res.elapsed <= limit, f"{what}: took {res.elapsed:.1f}s > {limit}s: {res!r}"


# --------------------------------------------------------------------------
# mounts

def mount_entry(mountpoint):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields = left.split()
            mp = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                .replace("\\134", "\\")
            if mp == mountpoint:
                return right.split()[0]
    return None


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


class HMount:
    def __init__(self, binary, url, mountpoint, logfile, options, extra_args=(), env=None):
        self.binary, self.url = binary, url
        self.mountpoint = os.path.realpath(mountpoint)
        self.logfile = logfile
        self.options = list(options)
        self.extra_args = list(extra_args)
        self.env = env
        self.proc = None
        self.mounted = False

    @property
    def argv(self):
        argv = [self.binary, "-f"] + self.extra_args
        for o in self.options:
            argv += ["-o", o]
        return argv + [self.url, self.mountpoint]

    def log(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self, limit=MOUNT_LIMIT):
        """Starts imapfs; returns True once mounted, False if it exited
        first.  Fails the test on a hang or a crash before mounting."""
        os.makedirs(self.mountpoint, exist_ok=True)
        assert mount_entry(self.mountpoint) is None
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            fstype = mount_entry(self.mountpoint)
            if fstype is not None:
                assert fstype == "fuse.imapfs", fstype
                self.mounted = True
                self.mount_time = time.monotonic() - t0
                return True
            if self.proc.poll() is not None:
                self.mount_time = time.monotonic() - t0
                return False
            time.sleep(0.005)
        self.abort()
        raise AssertionError(f"imapfs neither mounted nor exited within {limit}s:\n{self.log()}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def memory_kb(self):
        st = proc_status(self.proc.pid)
        return int(st.get("VmRSS", "0 kB").split()[0]), int(st.get("VmHWM", "0 kB").split()[0])

    def path(self, *parts):
        return os.path.join(self.mountpoint, *parts)

    def check_alive(self, what=""):
        assert self.alive(), (f"imapfs died ({what}): status {self.proc.returncode}\n"
                              f"log:\n{self.log()[-5000:]}")

    def finish(self):
        """fusermount3 -u; the daemon must exit 0."""
        self.check_alive("before unmount")
        r = subprocess.run(["fusermount3", "-u", self.mountpoint], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=30)
        assert r.returncode == 0, f"fusermount3 -u failed: {r.stdout}\n{self.log()[-3000:]}"
        self.mounted = False
        try:
            status = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.abort()
            raise AssertionError(f"imapfs did not exit after unmount:\n{self.log()[-3000:]}")
        assert status == 0, f"imapfs exited {status} after unmount:\n{self.log()[-5000:]}"

    def wait_exit(self, limit=MOUNT_LIMIT):
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.abort()
            raise AssertionError(f"imapfs did not exit within {limit}s:\n{self.log()}")

    def abort(self):
        if mount_entry(self.mountpoint) is not None:
            if subprocess.run(["fusermount3", "-u", self.mountpoint],
                              stderr=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                               stderr=subprocess.DEVNULL)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if mount_entry(self.mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], stderr=subprocess.DEVNULL)
        self.mounted = False


class Rig:
    """Per-test factory of fake servers and mounts; all torn down at the end."""

    def __init__(self, binary, tmp_path):
        self.binary = binary
        self.tmp = tmp_path
        self.servers = []
        self.mounts = []
        self.made = 0
        self.password_file = str(tmp_path / "password")
        with open(self.password_file, "w") as f:
            f.write(PASSWORD + "\n")

    def server(self, *args, **kwargs):
        kwargs.setdefault("password", PASSWORD)
        srv = FakeIMAP(*args, **kwargs).start()
        self.servers.append(srv)
        return srv

    def mount(self, srv, options=(), scheme="imap", tls_none=True, extra_args=(), start=True,
              password_file=None, env=None, connections=2, timeout=TIMEOUT):
        n = self.made
        self.made += 1
        if env is None:
            # a persistent cache of its own: fake servers reuse ports and
            # UIDVALIDITY 1, so a shared one would serve another test's mail
            env = dict(os.environ, XDG_CACHE_HOME=str(self.tmp / f"cache{n}"))
        opts = [f"password_file={password_file or self.password_file}", f"timeout={timeout}",
                f"connections={connections}"]
        if tls_none:
            opts.append("tls=none")
        opts += list(options)
        m = HMount(self.binary, f"{scheme}://{srv.user}@127.0.0.1:{srv.port}",
                   str(self.tmp / f"mnt{n}"), str(self.tmp / f"mnt{n}.log"), opts,
                   extra_args, env)
        self.mounts.append(m)
        if start:
            m.start()
        return m

    def mounted(self, srv, **kwargs):
        m = self.mount(srv, **kwargs)
        assert m.mounted, (f"imapfs did not mount (status {m.proc.returncode}):\n{m.log()}")
        return m

    def cleanup(self):
        for m in self.mounts:
            m.abort()
        for s in self.servers:
            s.stop()


@pytest.fixture
def rig(imapfs, tmp_path, request):
    r = Rig(imapfs, tmp_path)
    try:
        yield r
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for m in r.mounts:
                sys.stderr.write(f"\n--- {m.logfile} ---\n{m.log()[-8000:]}\n")
        r.cleanup()


def assert_failed_cleanly(m, what=""):
    """imapfs exited before mounting: non-zero, not killed by a signal, and it
    said why on one 'imapfs: ...' line."""
    status = m.wait_exit()
    log = m.log()
    assert status > 0, f"{what}: imapfs exit status {status} (negative = signal):\n{log}"
    assert "imapfs: " in log, f"{what}: no 'imapfs: ...' error line:\n{log}"
    return log


def assert_memory_bounded(m, what=""):
    rss, hwm = m.memory_kb()
    assert hwm < RSS_LIMIT_KB, f"{what}: VmHWM {hwm} kB (VmRSS {rss} kB) >= {RSS_LIMIT_KB} kB"


# --------------------------------------------------------------------------
# mailbox names

HOSTILE_LIST = [
    b'* LIST () "/" INBOX',
    b'* LIST () "." ".."',                  # delimiter '.': three empty levels
    b'* LIST () "/" ".."',
    b'* LIST () "/" "."',
    b'* LIST () "." "a/b"',                 # '/' inside a level
    b'* LIST () "/" "../../etc"',
    b'* LIST () NIL "../nodelim"',
    b'* LIST () "/" "/abs"',
    b'* LIST () "/" "trailing/"',
    b'* LIST () "/" "dbl//slash"',
    b'* LIST () "/" ' + literal(b"ab\0cd"),  # NUL in a literal
    b'* LIST () "/" "ab"',
    b'* LIST () "/" "ab&AAA-cd"',            # NUL in modified UTF-7 (U+0000)
    b'* LIST () "/" ' + literal(b"bel\x07esc\x1bdel\x7f"),
    b'* LIST () "/" ' + literal(b"new\r\nline"),
    b'* LIST () "/" "tab\tin"',
    b'* LIST () "/" "ctl&AAc-u7"',           # U+0007 in modified UTF-7
    b'* LIST () "/" "&Jjo!"',
    b'* LIST () "/" "&"',
    b'* LIST () "/" "&AGE-"',                # 'a' needlessly encoded
    b'* LIST () "/" "a"',
    b'* LIST () "/" "x&AC8-y"',              # '/' encoded
    b'* LIST () "/" "x/y"',
    b'* LIST () "/" "&2D0-"',                # lone surrogate
    b'* LIST () "/" "Entw&APw-rfe"',
    b'* LIST () "/" ' + literal("Entwürfe".encode()),   # raw 8-bit spelling of the same
    b'* LIST () "/" "%2E%2E"',
    b'* LIST () "/" "pct%2Fslash"',
    b'* LIST () "\\\\" "back\\\\slash"',     # delimiter backslash
    b'* LIST () "/" ' + literal(b"\xff\xfe"),
    b'* LIST () "/" ""',
    b'* LIST () "/" ' + b'"' + b"L" * 1000 + b'"',
    b'* LIST () "/" "' + b"/".join([b"d"] * 150) + b'"',
    b'* LIST (\\Noselect) "/" "..&AC8-.."',
    b'* LIST () "//" "twochar"',             # delimiter of two characters
    b'* LIST "/" "noattrs"',                 # attributes not a list
    b'* LIST () "/"',                        # name missing
    b'* LIST () "/" "a" extra',
]

# raw names the fake knows (EXAMINE of anything else is a mapping bug)
HOSTILE_BOXES = [b"INBOX", b"..", b".", b"a/b", b"../../etc", b"../nodelim", b"ab\0cd", b"ab",
                 b"ab&AAA-cd", b"bel\x07esc\x1bdel\x7f", b"new\r\nline", b"tab\tin",
                 b"ctl&AAc-u7", b"a", b"x/y", b"Entw&APw-rfe", "Entwürfe".encode(), b"%2E%2E",
                 b"pct%2Fslash", b"back\\slash", b"L" * 1000, b"/".join([b"d"] * 150)]


def _walk(m):
    """Every directory reached from the mount root via ls -1af, with its raw
    entries; fails on duplicate, dot or slash entries."""
    seen = {}
    todo = [m.mountpoint.encode()]
    while todo:
        d = todo.pop()
        names, res = listing(d.decode("utf-8", "surrogateescape"))
        assert_quick(res, what=f"ls {d!r}")
        if names is None:
            # a directory whose name has no valid mapping may fail, but
            # not with a crash or hang; record it
            seen[d] = res
            continue
        assert names.count(b".") == 1 and names.count(b"..") == 1, \
            f"{d!r}: '.'/'..' entries {names.count(b'.')}/{names.count(b'..')}: {names}"
        rest = [n for n in names if n not in (b".", b"..")]
        assert len(rest) == len(set(rest)), f"{d!r}: duplicate entries {sorted(rest)}"
        for n in rest:
            assert b"/" not in n and b"\0" not in n and n, f"{d!r}: unsafe entry {n!r}"
            assert not any(c < 0x20 or c == 0x7f for c in n), f"{d!r}: control char in {n!r}"
            full = d + b"/" + n
            if os.path.isdir(full) and len(seen) < 500:
                todo.append(full)
        seen[d] = rest
    return seen


def test_hostile_mailbox_names(rig):
    srv = rig.server(mailboxes=[Mailbox(n, messages=[simple_message(1, folder=repr(n))])
                                for n in HOSTILE_BOXES])
    srv.list_lines = [line + CRLF for line in HOSTILE_LIST]
    m = rig.mounted(srv)
    tree = _walk(m)
    root = tree[m.mountpoint.encode()]
    # dot-names map to escaped names, never to '.' or '..'
    assert b"%2E%2E" in root and b"%2E" in root, sorted(root)
    # the NUL names must not stand in for "ab" (one entry "ab", and it is "ab")
    assert root.count(b"ab") == 1
    # '/' inside a level is escaped, never a path separator
    assert b"a%2Fb" in root, sorted(root)
    # walks with the real tools stay inside the mount
    for argv in (["find", m.mountpoint], ["find", "-L", m.mountpoint], ["ls", "-R", m.mountpoint]):
        res = run(argv)
        assert_quick(res, limit=30, what=" ".join(argv))
        assert res.rc in (0, 1), res   # 1: a failure on some entry, reported, is fine
        if argv[0] == "find":
            for line in res.out.splitlines():
                assert line.startswith(m.mountpoint.encode()), f"{argv}: {line!r} outside"
                real = os.path.realpath(line)
                assert real.startswith(m.mountpoint.encode()), f"{line!r} resolves to {real!r}"
    # every directory read EXAMINEs the mailbox it names, never another
    for d in (b"ab", b"%2E%2E", b"a%2Fb", b"x/y", b"Entw\xc3\xbcrfe"):
        before = len(srv.commands)
        res = run(["ls", "-la", os.path.join(m.mountpoint.encode(), d)])
        assert_quick(res, what=f"ls {d!r}")
        names = [raw for _, _, name, raw in srv.commands[before:] if name in ("EXAMINE", "SELECT")]
        expect = {b"ab": b'"ab"', b"%2E%2E": b'".."', b"a%2Fb": b'"a/b"', b"x/y": b'"x/y"',
                  b"Entw\xc3\xbcrfe": b'"Entw&APw-rfe"'}[d]
        for raw in names:
            assert raw.split(b" ", 2)[2].startswith(expect), f"ls {d!r} examined {raw!r}"
    for raw in srv.selected_names():
        assert raw in HOSTILE_BOXES, f"imapfs examined {raw!r}, which the server never listed"
    m.check_alive("after the hostile listing")
    # what is not shown is skipped with a log line
    log = m.log()
    for name in ("&Jjo!", "&AGE-", "x&AC8-y", "dbl//slash", "/abs", "&2D0-", "ab&AAA-cd"):
        assert any(name in line for line in log.splitlines() if "skip" in line), \
            f"no log line for the skipped mailbox {name!r}:\n{log}"
    assert sum("skip" in line for line in log.splitlines()) >= 15, log
    m.finish()


def test_server_text_is_escaped_in_log(rig):
    """Mailbox names and response texts come from the server: written to the
    log raw, a CR LF forges log lines and ESC drives the user's terminal."""
    forged = b"imapfs[0.000] error: FORGED by the server"
    srv = rig.server()
    srv.list_lines = [b'* LIST () "/" INBOX\r\n',
                      b'* LIST () "/" ' + literal(b"esc\x1b[2Jx\r\n" + forged) + CRLF,
                      b'* LIST () "/" ' + literal(b"bell\x07\x7f") + CRLF]
    # a BYE whose text carries ESC, in the middle of a body fetch
    srv.on("UID FETCH", lambda conn, cmd: [b"* BYE \x1b[31mred\x1b[0m\x07 bye" + CRLF, CLOSE]
           if conn.is_body_fetch(cmd) else None, once=True)
    m = rig.mounted(srv)
    probe("read", m.path("INBOX", "1.eml"))
    m.check_alive()
    m.finish()
    with open(m.logfile, "rb") as f:
        log = f.read()
    bad = sorted({bytes([c]) for c in log if (c < 0x20 and c not in (0x09, 0x0a)) or c == 0x7f})
    lines = [line for line in log.split(b"\n") if line.startswith(b"imapfs[0.000] error: FORGED")]
    assert not bad and not lines, (f"server-controlled bytes reached the log raw: control "
                                   f"characters {bad}, forged lines {lines}; log:\n{log!r}")


# --------------------------------------------------------------------------
# absurd sizes, numbers, structure

def body_fetch(fn):
    """A UID FETCH hook that only handles body fetches."""
    return lambda conn, cmd: fn(conn, cmd) if conn.is_body_fetch(cmd) else None


class Switch:
    """A hostile behaviour a test turns off to check that the mount recovers."""

    def __init__(self):
        self.on = True

    def body_fetch(self, fn):
        return lambda conn, cmd: fn(conn, cmd) if self.on and conn.is_body_fetch(cmd) else None


def inbox(n=3, **kw):
    return [Mailbox("INBOX", messages=[simple_message(u) for u in range(1, n + 1)], **kw)]


def assert_reads_right(m, srv, folder="INBOX", uids=(1, 2), what="read after recovery"):
    box = srv.mailbox(folder.encode())
    for uid in uids:
        p = probe("read", m.path(folder, f"{uid}.eml"))
        assert_quick(p.res, what=what)
        assert p.ok and p.data == box.find(uid)[1].body, f"{what}: {uid}.eml: {p}"


def eventually_reads_right(m, srv, folder, uids, within=13):
    """After failed connection attempts imapfs waits (backoff, at most 10 s)
    before it tries again, failing fast meanwhile: retry for that long."""
    deadline = time.monotonic() + within
    while True:
        p = probe("read", m.path(folder, f"{uids[0]}.eml"))
        assert_quick(p.res, what="read during the reconnect backoff")
        if p.ok or time.monotonic() > deadline:
            break
        assert p.errno == EIO, p
        time.sleep(0.25)
    assert_reads_right(m, srv, folder=folder, uids=uids, what=f"read {within}s after recovery")


ABSURD = [b"99999999999", b"18446744073709551615", b"18446744073709551616",
          b"99999999999999999999999999999999", b"4294967296", b"2147483648", b"-1"]


@pytest.mark.parametrize("size", ABSURD, ids=lambda s: s.decode())
def test_absurd_literal_in_list(rig, size):
    """LIST with a literal announcing an absurd size (then 64 KiB, then the
    server hangs up): the mount fails cleanly (or comes up without it)."""
    srv = rig.server()
    srv.on("LIST", lambda conn, cmd: [b'* LIST () "/" INBOX\r\n* LIST () "/" {' + size + b"}\r\n",
                                      b"y" * 65536, CLOSE])
    m = rig.mount(srv)
    if m.mounted:
        _walk(m)
        assert_memory_bounded(m)
        m.finish()
    else:
        assert_failed_cleanly(m, f"LIST {{{size.decode()}}}")


@pytest.mark.parametrize("size", ABSURD, ids=lambda s: s.decode())
def test_absurd_literal_in_body(rig, size):
    """Every body FETCH answered with a literal announcing an absurd size, then
    1 MiB, then the server hangs up: EIO within the timeout, bounded memory;
    once the server behaves, reads work (reconnect)."""
    srv = rig.server(mailboxes=inbox())
    hostile = Switch()

    def hook(conn, cmd):
        seq, msg = conn.matched(cmd)[0]
        return [b"* %d FETCH (UID %d BODY[] {" % (seq, msg.uid) + size + b"}\r\n",
                b"x" * (1 << 20), CLOSE]
    srv.on("UID FETCH", hostile.body_fetch(hook))
    m = rig.mounted(srv)
    p = probe("read", m.path("INBOX", "1.eml"))
    assert_quick(p.res, what="read")
    assert not p.ok and p.errno == EIO, p
    m.check_alive("after the absurd literal")
    assert_memory_bounded(m, "absurd literal")
    hostile.on = False
    assert_reads_right(m, srv)
    m.finish()


def test_endless_line_memory_bounded(rig):
    """A response line that never ends (200 MiB without CRLF): imapfs must
    give up with EIO without holding it all in memory."""
    srv = rig.server(mailboxes=inbox())
    hostile = Switch()
    chunk = b"z" * (1 << 20)
    srv.on("UID FETCH", hostile.body_fetch(lambda conn, cmd: [b'* 1 FETCH (UID 1 BODY[] "']
                                           + [chunk] * 200 + [CLOSE]))
    m = rig.mounted(srv)
    p = probe("read", m.path("INBOX", "1.eml"), limit=60)
    assert not p.hung, p
    assert not p.ok and p.errno == EIO, p
    m.check_alive("after the endless line")
    assert_memory_bounded(m, "endless line")
    hostile.on = False
    assert_reads_right(m, srv)
    m.finish()


def test_bad_numbers_in_fetch_listing(rig):
    """Negative, overflowing and out-of-range numbers in the metadata FETCH:
    those entries are skipped (or the listing fails), the sane ones shown."""
    good = simple_message(7)
    d = b'INTERNALDATE "17-Jul-2023 02:44:25 +0000" FLAGS ()'
    lines = [
        b"* 1 FETCH (UID 7 RFC822.SIZE %d " % good.size + d + b")",
        b"* 2 FETCH (UID -5 RFC822.SIZE 10 " + d + b")",
        b"* 3 FETCH (UID 99999999999999999999 RFC822.SIZE 10 " + d + b")",
        b"* 4 FETCH (UID 4294967296 RFC822.SIZE 10 " + d + b")",
        b"* 5 FETCH (UID 4294967297 RFC822.SIZE 10 " + d + b")",
        b"* 6 FETCH (UID 0 RFC822.SIZE 10 " + d + b")",
        b"* 7 FETCH (UID 11 RFC822.SIZE -1 " + d + b")",
        b"* 8 FETCH (UID 12 RFC822.SIZE 99999999999999999999 " + d + b")",
        b"* 9 FETCH (UID 13 RFC822.SIZE 18446744073709551615 " + d + b")",
        b"* 10 FETCH (UID 14 RFC822.SIZE 9223372036854775808 " + d + b")",
        b'* 11 FETCH (UID 15 RFC822.SIZE 10 INTERNALDATE "99-Foo-2023 99:99:99 +9999" FLAGS ())',
        b'* 12 FETCH (UID 16 RFC822.SIZE 10 INTERNALDATE "01-Jan-99999999999 00:00:00 +0000" '
        b'FLAGS ())',
        b"* -1 FETCH (UID 17 RFC822.SIZE 10 " + d + b")",
        b"* 99999999999999999999 FETCH (UID 18 RFC822.SIZE 10 " + d + b")",
        b"* 13 FETCH (UID 19.5 RFC822.SIZE 10 " + d + b")",
        b"* 14 FETCH (UID 20 RFC822.SIZE 1e3 " + d + b")",
        b"* 15 FETCH (UID 21 RFC822.SIZE 10 " + d + b" FLAGS (\\Seen))",
    ]
    # UIDs whose files would mean imapfs believed a broken number (wrapped,
    # truncated, negative)
    forbidden = {0, 5, 4294967291, 99999999999999999999 % 2**32, 1, 17, 18, 19, 20}
    srv = rig.server(mailboxes=[Mailbox("INBOX", messages=[good])])
    srv.on("UID FETCH", lambda conn, cmd: None if conn.is_body_fetch(cmd) else
           [line + CRLF for line in lines] + [cmd.ok()])
    m = rig.mounted(srv)
    names, res = listing(m.path("INBOX"))
    assert_quick(res, what="ls INBOX")
    m.check_alive("after the bad numbers")
    if names is None:
        assert b"Input/output error" in res.err, res      # the whole listing refused: EIO
    else:
        uids = {int(n[:-4]) for n in names if n.endswith(b".eml")}
        assert 7 in uids, names
        assert not uids & forbidden, f"entries from broken numbers: {sorted(uids & forbidden)}"
        for uid in uids:
            p = probe("stat", m.path("INBOX", f"{uid}.eml"))
            assert_quick(p.res)
            if p.ok:
                assert 0 <= p["size"] < 2**63, (uid, p)
                assert uid not in (11, 13, 14) or p["size"] <= 2**53, \
                    f"{uid}.eml: size {p['size']} from a broken RFC822.SIZE"
        p = probe("read", m.path("INBOX", "7.eml"))
        assert p.ok and p.data == good.body, p
    m.finish()


@pytest.mark.parametrize("variant", [
    "uidvalidity-0", "uidvalidity-huge", "uidvalidity-negative", "exists-huge",
    "exists-negative", "uidnext-huge", "no-uidvalidity"])
def test_bad_numbers_in_examine(rig, variant):
    """Broken numbers in the EXAMINE answer: the listing works or gets EIO,
    never a crash, and the mount stays usable."""
    srv = rig.server(mailboxes=inbox() + [Mailbox("Other", messages=[simple_message(1)])])
    data = {
        "uidvalidity-0": [b"* OK [UIDVALIDITY 0] x", b"* 3 EXISTS"],
        "uidvalidity-huge": [b"* OK [UIDVALIDITY 99999999999999999999] x", b"* 3 EXISTS"],
        "uidvalidity-negative": [b"* OK [UIDVALIDITY -1] x", b"* 3 EXISTS"],
        "exists-huge": [b"* OK [UIDVALIDITY 1] x", b"* 99999999999999999999 EXISTS"],
        "exists-negative": [b"* OK [UIDVALIDITY 1] x", b"* -3 EXISTS"],
        "uidnext-huge": [b"* OK [UIDVALIDITY 1] x", b"* 3 EXISTS",
                         b"* OK [UIDNEXT 99999999999999999999] x"],
        "no-uidvalidity": [b"* 3 EXISTS"],
    }[variant]
    srv.on("EXAMINE", lambda conn, cmd: (setattr(conn, "selected", srv.mailboxes[0]) or
                                         [line + CRLF for line in data] + [cmd.ok()])
           if cmd.tokens and cmd.tokens[0] == b"INBOX" else None)
    m = rig.mounted(srv)
    names, res = listing(m.path("INBOX"))
    assert_quick(res, what="ls INBOX")
    m.check_alive(f"after EXAMINE with {variant}")
    if names is None:
        assert b"Input/output error" in res.err, res
    else:
        for n in names:
            if n.endswith(b".eml"):
                p = probe("read", m.path("INBOX", n.decode()))
                assert_quick(p.res)
                if p.ok:
                    assert p.data == srv.mailboxes[0].messages[int(n[:-4]) - 1].body
    p = probe("read", m.path("Other", "1.eml"))
    assert p.ok and p.data == srv.mailboxes[1].messages[0].body, p
    m.finish()


# --------------------------------------------------------------------------
# unsolicited data, BYE, malformed answers

def _batch_box():
    msgs = [simple_message(uid, text=f"body of {uid} " + "x" * uid + "\r\n")
            for uid in (10, 20, 30, 40, 50)]
    return Mailbox("INBOX", messages=msgs)


def test_unsolicited_inside_body_fetch(rig):
    """EXPUNGE, FETCH FLAGS and a FETCH of another section interleaved with
    the answers to a batched body FETCH: every read gets its own bytes, and
    the expunge removes the right message (sequence numbers shift)."""
    box = _batch_box()
    originals = {m.uid: m.body for m in box.messages}
    srv = rig.server(mailboxes=[box])

    def hook(conn, cmd):
        out = [b"* 4 FETCH (FLAGS (\\Seen))" + CRLF,            # no UID: sequence only
               b"* 1 FETCH (UID 10 FLAGS (\\Flagged))" + CRLF]
        for _, msg in conn.matched(cmd):
            seq, _ = box.find(msg.uid)
            if seq is None:
                continue
            if msg.uid == 30:
                junk = b"Subject: NOT THE BODY\r\n\r\n"
                out.append(b"* %d FETCH (UID 30 FLAGS (\\Seen \\Flagged))" % seq + CRLF)
                out.append(b"* %d FETCH (UID 30 BODY[HEADER] " % seq + literal(junk) + b")" + CRLF)
                out.append(b"* %d FETCH (UID 30 BODY[TEXT] " % seq + literal(junk) + b")" + CRLF)
            out.append(conn.fetch_body(seq, msg))
            if msg.uid == 20:
                box.messages.remove(msg)            # the server expunges UID 20 now
                out.append(b"* %d EXPUNGE" % seq + CRLF)
                out.append(b"* %d EXISTS" % len(box.messages) + CRLF)
        return out + [cmd.ok()]
    srv.on("UID FETCH", body_fetch(hook))
    m = rig.mounted(srv)
    names, res = listing(m.path("INBOX"))
    assert names is not None, res
    for uid in (10, 30, 40, 50, 20):
        p = probe("read", m.path("INBOX", f"{uid}.eml"))
        assert_quick(p.res)
        if uid == 20 and not p.ok:
            assert p.errno == 2, p      # expunged: ENOENT is right too
            continue
        assert p.ok, (uid, p)
        assert p.data == originals[uid], (f"{uid}.eml: got {p.data[:200]!r}, "
                                          f"want {originals[uid][:200]!r}")
    m.check_alive()
    names, res = listing(m.path("INBOX"))
    assert names is not None, res
    for uid in (10, 30, 40, 50):
        assert f"{uid}.eml".encode() in names, \
            f"{uid}.eml vanished from the listing after '* 2 EXPUNGE' of UID 20: {names}"
    m.finish()


@pytest.mark.parametrize("where", ["before-data", "after-first-body", "mid-literal",
                                   "bye-no-close"])
def test_bye_mid_body_fetch(rig, where):
    """'* BYE' in the middle of a body FETCH: EIO (never wrong bytes, never a
    hang even when the server keeps the socket open), then the next
    operation reconnects and works."""
    srv = rig.server(mailboxes=inbox(4))
    hostile = Switch()
    bye = b"* BYE server shutting down" + CRLF

    def hook(conn, cmd):
        matched = conn.matched(cmd)
        seq, msg = matched[0]
        if where == "before-data":
            return [bye, CLOSE]
        if where == "after-first-body":
            return [conn.fetch_body(seq, msg), bye, CLOSE]
        if where == "mid-literal":
            whole = conn.fetch_body(seq, msg)
            return [whole[:len(whole) - 30], bye, CLOSE]
        return [bye, STALL]
    srv.on("UID FETCH", hostile.body_fetch(hook))
    m = rig.mounted(srv)
    p = probe("read", m.path("INBOX", "2.eml"))
    assert_quick(p.res, what="read during BYE")
    if where == "after-first-body" and p.ok:
        assert p.data == srv.mailboxes[0].messages[1].body, p
    else:
        assert not p.ok and p.errno == EIO, p
    m.check_alive(f"after BYE {where}")
    hostile.on = False
    srv.release_stalls()
    assert_reads_right(m, srv, uids=(2, 1, 3))
    m.finish()


HOSTILE_PUSHES = {
    # NOTIFY's news arrives as STATUS and LIST for any mailbox
    "NOTIFY": [b"* STATUS INBOX (MESSAGES 99999999999999999999999 UIDNEXT 4294967296 "
               b"UIDVALIDITY 0 HIGHESTMODSEQ 18446744073709551616)" + CRLF,
               b"* STATUS {5}" + CRLF + b"INBOX (MESSAGES 1)" + CRLF,
               b"* STATUS NoSuchFolder (MESSAGES 1)" + CRLF,
               b"* STATUS INBOX" + CRLF,
               b"* STATUS (INBOX) (MESSAGES 1)" + CRLF,
               b'* LIST () "/" "../../etc"' + CRLF,
               b"* OK [NOTIFICATIONOVERFLOW] too much" + CRLF],
    # IDLE's news is about the selected mailbox
    "IDLE": [b"* 4294967296 EXISTS" + CRLF,
             b"* 99 EXPUNGE" + CRLF,
             b"* 0 EXPUNGE" + CRLF,
             b"* 1 FETCH (UID 99999999999 FLAGS (\\Seen))" + CRLF,
             b"* VANISHED 1:*" + CRLF,
             b"+ still here" + CRLF],
}


@pytest.mark.parametrize("push", sorted(HOSTILE_PUSHES))
def test_hostile_pushes(rig, push):
    """What the server pushes to the watcher (NOTIFY's STATUS and LIST,
    IDLE's EXISTS, EXPUNGE, FETCH) is untrusted too: absurd numbers, names
    that match no folder or are lists, a literal for a name, an overflow,
    then BYE.  The mount keeps serving the right bytes and listing, and the
    watcher connects again and asks for its news again."""
    srv = rig.server(mailboxes=inbox(3), capabilities=("IMAP4rev1", push))
    WANT = {b".", b"..", b"1.eml", b"2.eml", b"3.eml"}
    asked = []

    def hook(conn, cmd):
        asked.append(conn.index)
        if len(asked) > 1:
            return None         # the normal answer: OK (NOTIFY) or idle until DONE (IDLE)
        head = [cmd.ok("NOTIFY completed")] if push == "NOTIFY" else [b"+ idling" + CRLF]
        return head + HOSTILE_PUSHES[push] + [Sleep(0.3), b"* BYE going away" + CRLF, CLOSE]
    srv.on(push, hook)
    m = rig.mounted(srv)
    deadline = time.monotonic() + 15
    while len(asked) < 2 and time.monotonic() < deadline:
        names, res = listing(m.path("INBOX"))     # keeps INBOX in use: the watcher's target
        assert names and set(names) == WANT, res
        time.sleep(0.3)
    m.check_alive(f"after hostile {push} pushes")
    assert len(asked) >= 2, f"the watcher did not ask for {push} again after BYE: {srv.names()}"
    assert asked[1] != asked[0], "the second request came on the connection the server closed"
    assert_reads_right(m, srv, uids=(1, 2, 3), what=f"read after hostile {push} pushes")
    names, res = listing(m.path("INBOX"))
    assert names and sorted(names) == sorted(WANT), res
    m.finish()


@pytest.mark.parametrize("push", ["NOTIFY", "IDLE"])
def test_refused_push_falls_back_to_the_poll(rig, push):
    """A server that lists NOTIFY or IDLE but refuses it: the watcher says so
    in the log and keeps the mount in step with the STATUS poll instead."""
    srv = rig.server(mailboxes=inbox(2), capabilities=("IMAP4rev1", push))
    srv.on(push, lambda conn, cmd: [cmd.no("not today")])
    m = rig.mounted(srv)
    names, res = listing(m.path("INBOX"))
    assert names and set(names) == {b".", b"..", b"1.eml", b"2.eml"}, res
    deadline = time.monotonic() + 10
    while push not in srv.names():      # the watcher tries once INBOX is in use
        assert time.monotonic() < deadline, f"the watcher never tried {push}: {srv.names()}"
        time.sleep(0.1)
    srv.mailbox(b"INBOX").messages.append(simple_message(3))
    deadline = time.monotonic() + 10
    while True:
        names, res = listing(m.path("INBOX"))
        if names and b"3.eml" in names:
            break
        assert time.monotonic() < deadline, f"new mail never showed after {push} was refused"
        time.sleep(0.3)
    assert "STATUS" in srv.names(), "the new mail came without the poll?"
    assert f"the server refused {push} (not today)" in m.log(), m.log()[-2000:]
    m.check_alive()
    m.finish()


def test_silent_notify_is_asked_again_when_the_poll_finds_a_change(rig):
    """A server that accepts NOTIFY and then never notifies (Dovecot 2.3 can
    fall silent so): the poll still brings new mail and new folders, and each
    change only the poll found makes the watcher ask for NOTIFY again.  Only
    changes count: polls that find nothing new do not ask again."""
    srv = rig.server(mailboxes=inbox(2), capabilities=("IMAP4rev1", "NOTIFY"))
    m = rig.mounted(srv, options=["poll_interval=1"])

    def notifies():
        return srv.names().count("NOTIFY")

    def after_last_notify():
        names = srv.names()
        return names[len(names) - names[::-1].index("NOTIFY"):]

    def wait(what, done, limit=10):
        deadline = time.monotonic() + limit
        while not done():
            assert time.monotonic() < deadline, f"{what}: {srv.names()}\n{m.log()[-2000:]}"
            m.check_alive(what)
            time.sleep(0.2)

    names, res = listing(m.path("INBOX"))       # INBOX in use: the poll covers it
    assert names and set(names) == {b".", b"..", b"1.eml", b"2.eml"}, res
    wait("the watcher never asked for NOTIFY", lambda: notifies() >= 1)
    time.sleep(3.5)                             # three polls and a LIST, nothing new
    assert notifies() == 1, f"NOTIFY asked again with nothing missed: {srv.names()}"

    srv.mailbox(b"INBOX").messages.append(simple_message(3))
    wait("new mail never showed", lambda: b"3.eml" in (listing(m.path("INBOX"))[0] or ()))
    wait("NOTIFY not asked again after the STATUS poll found new mail", lambda: notifies() >= 2)
    # Asking again, the watcher catches up with a poll and a LIST of its own,
    # which does not count what it finds (NOTIFY was not yet there to tell).
    # A folder made before that LIST would be found by it, never to count.
    wait("no LIST after NOTIFY was asked again", lambda: "LIST" in after_last_notify())

    asked = notifies()
    srv.mailboxes.append(Mailbox("Later", messages=[simple_message(1, folder="Later")]))
    wait("a new folder never showed", lambda: b"Later" in (listing(m.mountpoint)[0] or ()))
    wait("NOTIFY not asked again after the LIST poll found a folder",
         lambda: notifies() > asked)
    assert_reads_right(m, srv, uids=(1, 2, 3), what="read after the polls")
    m.finish()


VANISHED_ANSWERS = {
    # what the server says vanished since the last HIGHESTMODSEQ, when 2 went
    "right": b"* VANISHED (EARLIER) 2",
    "short": b"* VANISHED (EARLIER) 9",          # misses 2: the count shows it
    "malformed": b"* VANISHED (EARLIER) 2:abc",
    "absurd": b"* VANISHED (EARLIER) 1:4294967296",
}


@pytest.mark.parametrize("answer", sorted(VANISHED_ANSWERS))
def test_vanished_answers_to_a_resync(rig, answer):
    """A QRESYNC server (the fake's ENABLE says ENABLED QRESYNC, its EXAMINE
    gives a HIGHESTMODSEQ) from which 2.eml went: the resync's flags fetch
    asks for VANISHED, and whatever the answer, the listing ends as the
    server's.  A right answer is used as it is; one that misses the expunge
    makes the count disagree and every UID is asked for; one that cannot be
    read makes the folder listed in full."""
    srv = rig.server(mailboxes=inbox(3), capabilities=("IMAP4rev1", "ENABLE", "CONDSTORE",
                                                       "QRESYNC"))
    modseq = {"n": 10}
    srv.on("ENABLE", lambda conn, cmd: [b"* ENABLED QRESYNC" + CRLF, cmd.ok("enabled")])

    def examine(conn, cmd):
        answer_lines = conn.default(cmd)
        return answer_lines[:-1] + [b"* OK [HIGHESTMODSEQ %d] modseq" % modseq["n"] + CRLF,
                                    answer_lines[-1]]
    srv.on("EXAMINE", examine)
    srv.on("SELECT", examine)

    def fetch(conn, cmd):
        if b"VANISHED" not in cmd.args:
            return None
        return [VANISHED_ANSWERS[answer] + CRLF] + conn.default(cmd)
    srv.on("UID FETCH", fetch)
    m = rig.mounted(srv, options=["dir_cache_timeout=1", "poll_interval=3600"])
    names, res = listing(m.path("INBOX"))
    assert names and set(names) == {b".", b"..", b"1.eml", b"2.eml", b"3.eml"}, res

    box = srv.mailbox(b"INBOX")
    box.messages = [msg for msg in box.messages if msg.uid != 2]
    modseq["n"] += 1
    seen = len(srv.commands)
    time.sleep(1.2)                             # the listing is now older than the timeout
    names, res = listing(m.path("INBOX"))
    assert names and set(names) == {b".", b"..", b"1.eml", b"3.eml"}, (answer, res)
    later = [raw for _, _, _, raw in srv.commands[seen:]]
    assert any(b"VANISHED" in raw for raw in later), f"no VANISHED fetch: {later}"
    searched = any(b"UID SEARCH" in raw for raw in later)
    full = any(b"UID FETCH 1:* (UID RFC822.SIZE" in raw for raw in later)
    if answer == "right":
        assert not searched and not full, later
    elif answer == "short":
        assert searched and not full, later
    else:
        assert full, later
    m.check_alive(f"after a {answer} VANISHED")
    assert_reads_right(m, srv, uids=(1, 3), what=f"read after a {answer} VANISHED")
    m.finish()


def test_bye_mid_listing(rig):
    srv = rig.server(mailboxes=inbox(3))
    hostile = Switch()
    srv.on("UID FETCH", lambda conn, cmd: [conn.fetch_meta(1, srv.mailboxes[0].messages[0]),
                                           b"* BYE going away" + CRLF, CLOSE]
           if hostile.on and not conn.is_body_fetch(cmd) else None)
    m = rig.mounted(srv)
    names, res = listing(m.path("INBOX"))
    assert_quick(res, what="ls during BYE")
    assert names is None and b"Input/output error" in res.err, res
    m.check_alive("after BYE in a listing")
    hostile.on = False
    names, res = listing(m.path("INBOX"))
    assert_quick(res, what="ls after BYE")
    assert names is not None and {b"1.eml", b"2.eml", b"3.eml"} <= set(names), res
    assert_reads_right(m, srv)
    m.finish()


def _malformed(variant, conn, cmd):
    seq, msg = conn.matched(cmd)[0]
    good = [conn.fetch_body(s, mm) for s, mm in conn.matched(cmd)] + [cmd.ok()]
    head = b"* %d FETCH (UID %d BODY[] " % (seq, msg.uid)
    return {
        "deep-nesting": [head + b"(" * 100000 + CRLF, cmd.ok()],
        "unclosed-list": [head + literal(msg.body) + CRLF, cmd.ok()],
        "stray-continuation": [b"+ more please" + CRLF] + good,
        "wrong-tag": good[:-1] + [b"ZZZ9 OK done" + CRLF],
        "nul-in-quoted": [head + b'"ab\0cd")' + CRLF, cmd.ok()],
        "binary-garbage": [b"\xff\xfe\x00\x01garbage\x80\r\n"] + good,
        "many-atoms": [b"* %d FETCH (" % seq + b"A " * 5_000_000 + b")" + CRLF] + good,
        "literal-mid-line": [head + b"{%d}" % len(msg.body) + msg.body + b")" + CRLF, cmd.ok()],
        "body-nil": [head + b"NIL)" + CRLF, cmd.ok()],
        "other-uid": [b"* %d FETCH (UID 999 BODY[] " % seq + literal(b"999 " * 20) + b")" + CRLF,
                      cmd.ok()],
        "no-uid": [b"* %d FETCH (BODY[] " % seq + literal(b"no uid " * 10) + b")" + CRLF, cmd.ok()],
        # UID 2^32 + uid: a client that wraps it files these bytes as uid's body
        "uid-wraps": [b"* %d FETCH (UID %d BODY[] " % (seq, msg.uid + 2**32)
                      + literal(b"WRAPPED " * 10) + b")" + CRLF, cmd.ok()],
        "uid-negative": [b"* %d FETCH (UID -%d BODY[] " % (seq, msg.uid)
                         + literal(b"NEGATIVE " * 10) + b")" + CRLF, cmd.ok()],
        "uid-20-digits": [b"* %d FETCH (UID %d BODY[] " % (seq, msg.uid + 5 * 2**64)
                          + literal(b"OVERFLOW " * 10) + b")" + CRLF, cmd.ok()],
        "empty-lines": [CRLF, b"*" + CRLF, b"* " + CRLF] + good,
        "tagged-bad-after-body": good[:-1] + [cmd.bad("sorry")],
        "huge-tag-line": [b"A" * (2 << 20) + b" OK" + CRLF] + good,
        "legal-uid-after-body": [b"* %d FETCH (BODY[] " % seq + literal(msg.body) + b" UID %d)"
                                 % msg.uid + CRLF, cmd.ok()],
    }[variant]


# outcome allowed besides EIO: "right" = the right bytes, "enoent" = no such file
MALFORMED = {
    "deep-nesting": (), "unclosed-list": (), "stray-continuation": ("right",),
    "wrong-tag": ("right",), "nul-in-quoted": ("enoent",), "binary-garbage": ("right",),
    "many-atoms": ("right",), "literal-mid-line": ("enoent",), "body-nil": ("enoent",),
    "other-uid": ("enoent",), "no-uid": ("enoent",), "uid-wraps": ("enoent",),
    "uid-negative": ("enoent",), "uid-20-digits": ("enoent",), "empty-lines": ("right",),
    "tagged-bad-after-body": ("right",), "huge-tag-line": ("right",),
    "legal-uid-after-body": ("right", "only"),
}


@pytest.mark.parametrize("variant", sorted(MALFORMED))
def test_malformed_body_fetch(rig, variant):
    """Malformed answers to a body FETCH: a clean error (EIO; ENOENT where
    the server simply gave no body), never wrong bytes, no crash, no hang,
    bounded memory; once the server behaves, reads work."""
    srv = rig.server(mailboxes=inbox(3))
    hostile = Switch()
    srv.on("UID FETCH", hostile.body_fetch(lambda conn, cmd: _malformed(variant, conn, cmd)))
    m = rig.mounted(srv)
    want = srv.mailboxes[0].messages[0].body
    p = probe("read", m.path("INBOX", "1.eml"))
    assert_quick(p.res, what=f"read ({variant})")
    allowed = MALFORMED[variant]
    if p.ok:
        assert "right" in allowed and p.data == want, f"{variant}: read gave {p.data[:300]!r}"
    else:
        assert "only" not in allowed, f"{variant}: a legal answer, yet the read failed: {p}"
        assert p.errno == EIO or (p.errno == 2 and "enoent" in allowed), p
    m.check_alive(f"after {variant}")
    assert_memory_bounded(m, variant)
    hostile.on = False
    assert_reads_right(m, srv, uids=(1, 2))
    m.finish()


# --------------------------------------------------------------------------
# RFC822.SIZE that lies

@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_body_size_differs_from_rfc822_size(rig, mode):
    """RFC822.SIZE larger and smaller than the body the server then sends:
    cat gets exactly the body (no padding, nothing cut off), reads past the
    real end return nothing, and the size stat reports after reading equals
    the bytes read.  Many messages, first touched by different tools,
    because how the kernel's cached size meets the read is timing-dependent.
    'ro': a read-only mount, where no open reaches the daemon, so the first
    read is where the body is fetched and its real size learnt."""
    bodies, declared = {}, {}
    for uid in range(1, 17):
        bodies[uid] = simple_message(uid, text="line of text\r\n" * (3 + uid * 7)).body
        n = len(bodies[uid])
        declared[uid] = [n * 10 + 1000, n // 3, 0, n + 1, n - 1, 4096, 1, n][uid % 8]
    box = Mailbox("INBOX", messages=[Message(uid, bodies[uid], size=declared[uid])
                                     for uid in sorted(bodies)])
    srv = rig.server(mailboxes=[box])
    m = rig.mounted(srv, options=["ro"] if mode == "ro" else [])
    res = run(["ls", "-l", m.path("INBOX")])       # the kernel now holds the declared sizes
    assert res.rc == 0, res
    problems = []
    for uid in sorted(bodies):
        path, body = m.path("INBOX", f"{uid}.eml"), bodies[uid]
        what = f"{uid}.eml (RFC822.SIZE {declared[uid]}, body {len(body)} bytes)"
        if uid % 2:
            res = run(["cat", path])
            assert_quick(res, what=what)
            if res.rc != 0 or res.out != body:
                problems.append(f"{what}: first cat gave {len(res.out)} bytes, rc {res.rc}")
        p = probe("readstat", path)
        assert_quick(p.res, what=what)
        assert p.ok, (what, p)
        if p.data != body:
            problems.append(f"{what}: read {len(p.data)} bytes "
                            f"({'padded' if p.data[:len(body)] == body else 'cut/wrong'})")
        if p["size1"] != len(p.data):
            problems.append(f"{what}: stat says {p['size1']} after reading {len(p.data)} bytes")
        res = run(["cat", path])
        if res.rc != 0 or res.out != body:
            problems.append(f"{what}: cat gave {len(res.out)} bytes, rc {res.rc}")
        res = run(["dd", f"if={path}", "bs=1", f"skip={len(body)}", "count=100", "status=none"])
        if res.rc != 0 or res.out != b"":
            problems.append(f"{what}: {len(res.out)} bytes past the end of the body")
        p = probe("stat", path)
        if not p.ok or p["size"] != len(body):
            problems.append(f"{what}: stat after reading: {p.r}")
    assert not problems, "\n".join(problems)
    m.finish()


# --------------------------------------------------------------------------
# a server that stops answering

@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_stalled_server(rig, mode):
    """The server stops answering (mid-literal, then entirely, even new
    connections get no greeting): uncached operations fail with EIO within
    timeout + margin; cached listings and bodies stay readable; once the
    server answers again the mount works.  'ro': a read-only mount, where
    the READ with no open before it is what fetches and fails."""
    srv = rig.server(mailboxes=inbox(3) + [Mailbox("Other", messages=[simple_message(1),
                                                                      simple_message(2)]),
                                           Mailbox("Third", messages=[simple_message(1)])])
    m = rig.mounted(srv, options=["ro"] if mode == "ro" else [])
    assert_reads_right(m, srv, uids=(1, 2, 3), what="warm-up read")
    names, res = listing(m.path("Other"))
    assert names is not None, res
    # 1. stall in the middle of a body literal
    hostile = Switch()
    srv.on("UID FETCH", hostile.body_fetch(
        lambda conn, cmd: [conn.fetch_body(*conn.matched(cmd)[0])[:60], STALL]))
    p = probe("read", m.path("Other", "1.eml"))
    assert not p.hung and not p.ok and p.errno == EIO, p
    assert p.elapsed <= OP_LIMIT, f"stall mid-literal: EIO after {p.elapsed:.1f}s > {OP_LIMIT}s"
    # 2. nothing answers any more, not even a greeting
    srv.on("*", lambda conn, cmd: [STALL] if hostile.on else None)
    srv.on_connect = lambda conn: [STALL] if hostile.on else None
    p = probe("read", m.path("Third", "1.eml"))
    assert not p.hung and not p.ok and p.errno == EIO, p
    assert p.elapsed <= OP_LIMIT, f"stalled server: EIO after {p.elapsed:.1f}s > {OP_LIMIT}s"
    # cached data is still served, fast
    for uid in (1, 2, 3):
        p = probe("read", m.path("INBOX", f"{uid}.eml"), limit=OP_LIMIT + 5)
        assert p.ok and p.data == srv.mailboxes[0].messages[uid - 1].body, p
        assert p.elapsed < 2, \
            f"cached INBOX/{uid}.eml took {p.elapsed:.1f}s with the server stalled"
    names, res = listing(m.path("INBOX"))
    assert names is not None and b"1.eml" in names, res
    assert res.elapsed < 2, f"cached listing took {res.elapsed:.1f}s"
    m.check_alive("while stalled")
    # 3. the server recovers
    hostile.on = False
    srv.release_stalls()
    time.sleep(0.1)
    eventually_reads_right(m, srv, "Other", (1, 2))
    assert_reads_right(m, srv, folder="Third", uids=(1,), what="read after the stall")
    m.finish()


def test_stalled_greeting_at_mount(rig):
    """A server that accepts the connection but never greets: imapfs gives
    up after the timeout with a clear message."""
    srv = rig.server()
    srv.on_connect = lambda conn: [STALL]
    t = time.monotonic()
    m = rig.mount(srv)
    assert not m.mounted
    assert_failed_cleanly(m, "no greeting")
    assert time.monotonic() - t <= OP_LIMIT, f"gave up after {time.monotonic() - t:.1f}s"


# --------------------------------------------------------------------------
# a session cut at every byte

def _short_box():
    return [Mailbox("INBOX", messages=[Message(1, b"Subject: one\r\n\r\nfirst\r\n"),
                                       Message(2, b"Subject: two\r\n\r\nsecond body\r\n")])]


def _cat_outcome(path, want):
    """'right', 'EIO', or a description of what went wrong."""
    res = run(["cat", path], limit=HARD_LIMIT)
    if res.hung or res.elapsed > OP_LIMIT:
        return f"hang ({res.elapsed:.1f}s): {res!r}"
    if res.rc == 0:
        return "right" if res.out == want else f"WRONG BYTES {res.out!r}"
    if b"Input/output error" in res.err:
        return "EIO"
    return f"other error {res.err!r}"


@pytest.mark.parametrize("mode", ["plain", "starttls"])
def test_truncated_at_every_offset(rig, mode):
    """A canned session (greeting, CAPABILITY, LOGIN, LIST, EXAMINE, FETCH
    metadata, FETCH bodies, LOGOUT) cut at every byte offset of the server's
    output, the fake closing the connection there.  Each attempt ends in a
    clean failure to mount, or a mount whose first read gives the right bytes
    or EIO (then, on a new connection, the right bytes on retry);
    the daemon never crashes or hangs and exits 0 on unmount.  Over STARTTLS
    (the cut then also lands inside TLS records) every 3rd offset is tried."""
    want = {m.uid: m.body for m in _short_box()[0].messages}
    tls = mode == "starttls"
    step = 3 if tls else 1

    def attempt(budget):
        srv = FakeIMAP(mailboxes=_short_box(), password=PASSWORD,
                       tls="starttls" if tls else None).start()
        try:
            srv.s2c_budget = lambda index: budget if index == 0 else None
            if tls:
                m = rig.mount(srv, connections=1, tls_none=False, options=[f"cafile={srv.cafile}"])
            else:
                m = rig.mount(srv, connections=1)
            try:
                if not m.mounted:
                    status = m.wait_exit()
                    log = m.log()
                    if status <= 0 or "imapfs: " not in log:
                        return f"mount failed uncleanly: status {status}: {log[-500:]!r}"
                    return "nomount"
                # the cut lands in whichever command the budget runs out:
                # that read may fail (EIO), the same read again, on a new
                # connection, must not; there is only one cut
                eio = 0
                for uid in (1, 2, 1, 2):
                    outcome = _cat_outcome(m.path("INBOX", f"{uid}.eml"), want[uid])
                    if outcome == "EIO" and not eio:
                        eio += 1
                        outcome = _cat_outcome(m.path("INBOX", f"{uid}.eml"), want[uid])
                        if outcome != "right":
                            return f"{uid}.eml: EIO, then {outcome}"
                    elif outcome != "right":
                        return f"{uid}.eml: {outcome}" + (" (after one EIO)" if eio else "")
                first = "EIO" if eio else "right"
                if not m.alive():
                    return f"daemon died: {m.proc.returncode}"
                try:
                    m.finish()
                except AssertionError as e:
                    return f"unmount: {str(e)[:500]}"
                return first
            finally:
                m.abort()
        finally:
            total = srv.connections[0].sent if srv.connections else 0
            attempt.log = rig.mounts[-1].log() if rig.mounts else ""
            srv.stop()
            rig.mounts.clear()
            attempt.total = total

    t0 = time.monotonic()
    assert attempt(None) == "right"
    total = attempt.total
    assert 300 < total < 3000, total
    outcomes, failures = {}, []
    for budget in range(0, total + 1, step):
        outcome = attempt(budget)
        if outcome not in ("nomount", "right", "EIO"):
            outcome += "\n    log: " + attempt.log[-1500:].replace("\n", "\n    ")
        outcomes[outcome.split("\n")[0]] = outcomes.get(outcome.split("\n")[0], 0) + 1
        if outcome not in ("nomount", "right", "EIO"):
            failures.append((budget, outcome))
            if len(failures) >= 8:
                break
        assert time.monotonic() - t0 < 150, f"too slow: at offset {budget} of {total}"
    sys.stderr.write(f"\n{mode}: {total + 1} bytes, every {step}. offset, "
                     f"{time.monotonic() - t0:.1f}s: {outcomes}\n")
    assert not failures, "\n".join(f"cut after {b} bytes: {o}" for b, o in failures)
    assert outcomes.get("nomount") and outcomes.get("right"), outcomes


# --------------------------------------------------------------------------
# security defaults

def _no_plaintext_login(srv):
    plain = [(i, name) for i, tls, name, _ in srv.commands
             if not tls and name in ("LOGIN", "AUTHENTICATE")]
    assert not plain, f"credentials sent before TLS: {plain}; commands {srv.commands}"
    for conn in srv.connections:
        assert PASSWORD.encode() not in conn.plaintext_in, \
            f"the password crossed connection {conn.index} in clear"


def test_login_only_after_starttls(rig):
    """imap:// against a server that offers STARTTLS but would also accept a
    plaintext LOGIN: LOGIN comes only after the TLS handshake, on every
    connection imapfs opens."""
    srv = rig.server(mailboxes=inbox(3) + [Mailbox("Other", messages=[simple_message(1)])],
                     tls="starttls")
    m = rig.mounted(srv, tls_none=False, options=[f"cafile={srv.cafile}"], connections=3)
    procs = [subprocess.Popen(["cat", m.path(f, "1.eml")], stdout=subprocess.DEVNULL)
             for f in ("INBOX", "Other", "INBOX")]
    for p in procs:
        p.wait(HARD_LIMIT)
    assert_reads_right(m, srv, uids=(1, 2, 3))
    m.finish()
    assert srv.logins() and all(tls for _, tls in srv.logins()), srv.commands
    _no_plaintext_login(srv)
    for i, tls, name, _ in srv.commands:
        assert tls or name in ("CAPABILITY", "STARTTLS"), \
            f"{name} on connection {i} before STARTTLS"


@pytest.mark.parametrize("server", ["not-offered", "offered-but-bad", "refused-no"])
def test_no_starttls_is_refused(rig, server):
    """imap:// when STARTTLS is not offered, or offered and then refused:
    imapfs refuses to log in, says why, and mounts nothing (unless -o
    tls=none, checked last for the not-offered server)."""
    if server == "not-offered":
        srv = rig.server(tls=None)
    elif server == "offered-but-bad":
        srv = rig.server(tls=None, advertise_starttls=True)       # STARTTLS -> BAD
    else:
        srv = rig.server(tls="starttls")
        srv.on("STARTTLS", lambda conn, cmd: [cmd.no("TLS is broken today")])
    t = time.monotonic()
    m = rig.mount(srv, tls_none=False, options=[f"cafile={make_cafile()}"])
    assert not m.mounted, "mounted without TLS and without -o tls=none"
    log = assert_failed_cleanly(m, "no STARTTLS")
    assert time.monotonic() - t < OP_LIMIT
    assert "STARTTLS" in log or "TLS" in log, log
    assert srv.logins() == [], srv.commands
    assert PASSWORD.encode() not in bytes(srv.received)
    if server == "not-offered":
        m2 = rig.mounted(srv)               # -o tls=none: the explicit opt-in works
        assert_reads_right(m2, srv)
        m2.finish()


def make_cafile():
    return fakeimap.make_certificate()[0]


def test_starttls_response_injection(rig):
    """Plaintext bytes after 'OK Begin TLS' in the same packet (CVE-2011-0411
    style): never processed as if they came over TLS; no LOGIN in clear."""
    srv = rig.server(tls="starttls")
    srv.on("STARTTLS", lambda conn, cmd: [
        cmd.ok("Begin TLS") + b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] injected" + CRLF
        + b"* BYE injected" + CRLF, fakeimap.START_TLS])
    m = rig.mount(srv, tls_none=False, options=[f"cafile={srv.cafile}"])
    if m.mounted:
        assert all(tls for _, tls in srv.logins())
        m.finish()
    else:
        assert_failed_cleanly(m, "STARTTLS injection")
    _no_plaintext_login(srv)
    assert not any(name == "AUTHENTICATE" for _, _, name, _ in srv.commands), \
        "acted on capabilities injected before the TLS handshake"


@pytest.mark.parametrize("scheme", ["imaps", "imap"])
def test_untrusted_certificate_is_refused(rig, scheme):
    """A self-signed certificate not in the trust store: no login, a clear
    message about the certificate."""
    srv = rig.server(tls="implicit" if scheme == "imaps" else "starttls")
    m = rig.mount(srv, scheme=scheme, tls_none=False)
    assert not m.mounted
    log = assert_failed_cleanly(m, "untrusted certificate")
    assert "certificate" in log.lower(), log
    assert srv.logins() == [], srv.commands


def test_tls_handshake_garbage_after_starttls(rig):
    srv = rig.server(tls="starttls")
    srv.on("STARTTLS", lambda conn, cmd: [cmd.ok("Begin TLS"), b"this is no TLS\r\n" * 20, CLOSE])
    t = time.monotonic()
    m = rig.mount(srv, tls_none=False, options=[f"cafile={srv.cafile}"])
    assert not m.mounted
    assert_failed_cleanly(m, "garbage handshake")
    assert time.monotonic() - t < OP_LIMIT
    _no_plaintext_login(srv)
    assert srv.logins() == []


PASSWORDS = {
    "plain": "Correct-Horse-Battery-Staple-42",
    "quoted": 'pa"ss\\word with spaces',
    "8bit": "pässwörd-ünïcödé-ß",
}


@pytest.mark.parametrize("auth", ["login", "authenticate"])
@pytest.mark.parametrize("kind", sorted(PASSWORDS))
def test_password_not_in_argv_or_debug_log(rig, kind, auth, tmp_path):
    """With -d the trace shows the IMAP traffic: the password (raw, quoted,
    or inside AUTHENTICATE PLAIN's base64) must appear in none of it, nor in
    the daemon's command line."""
    password = PASSWORDS[kind]
    caps = ("IMAP4rev1",) if auth == "login" else ("IMAP4rev1", "LOGINDISABLED")
    srv = rig.server(mailboxes=inbox(2), tls="starttls", password=password, capabilities=caps,
                     auth_plain=(auth == "authenticate"))
    pwfile = tmp_path / f"pw-{kind}"
    pwfile.write_bytes(password.encode() + b"\n")
    m = rig.mounted(srv, tls_none=False, extra_args=["-d"],
                    options=[f"cafile={srv.cafile}"], password_file=str(pwfile))
    assert_reads_right(m, srv)
    used = [name for _, _, name, _ in srv.commands if name in ("LOGIN", "AUTHENTICATE")]
    assert used and used[0] == auth.upper(), used
    with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    m.finish()
    pw = password.encode()
    secrets = {
        "raw": pw,
        "quoted": b'"' + pw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"',
        "base64 PLAIN": base64.b64encode(b"\0" + srv.user.encode() + b"\0" + pw),
        "base64": base64.b64encode(pw),
    }
    with open(m.logfile, "rb") as f:
        log = f.read()
    assert b"C: " in log, "the -d trace shows no client traffic at all"
    for what, secret in secrets.items():
        assert secret not in cmdline, f"password ({what}) in /proc/PID/cmdline"
        assert secret not in log, f"password ({what}) in the -d log"
        assert secret[:12] not in log, f"the start of the password ({what}) in the -d log"


def test_password_cmd_keeps_password_out_of_argv(rig, tmp_path):
    srv = rig.server(mailboxes=inbox(1), tls="starttls")
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD + "\n")
    m = rig.mounted(srv, tls_none=False, extra_args=["-d"],
                    options=[f"cafile={srv.cafile}", f"password_cmd=cat {pwfile}"],
                    password_file=str(pwfile))
    with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
        assert PASSWORD.encode() not in f.read()
    m.finish()
    assert PASSWORD.encode() not in open(m.logfile, "rb").read()


def test_password_in_url_is_refused(rig):
    """imap://alice:secret@host puts a password on the command line (and
    would send 'alice:secret' as the user name, into logs): refuse it."""
    srv = rig.server(mailboxes=inbox(1))
    m = rig.mount(srv, start=False)
    m.url = f"imap://alice:{PASSWORD}@127.0.0.1:{srv.port}"
    m.start()
    if m.mounted:
        m.finish()
    else:
        assert_failed_cleanly(m, "password in URL")
    assert srv.logins() == [], \
        f"logged in with a user name taken from 'alice:password': {srv.commands}"
    assert PASSWORD.encode() not in open(m.logfile, "rb").read(), "the URL's password is in the log"


@pytest.mark.parametrize("listed", ["gone", "still-listed"])
def test_folder_deleted_elsewhere_refused_without_a_code(rig, listed):
    """Dovecot 2.3 answers EXAMINE and STATUS of a mailbox another client
    deleted with "NO Mailbox doesn't exist", no NONEXISTENT code.  A refusal
    without a code is an I/O error, and the mount serves a folder's cached
    listing when the server cannot be asked; but here the server answers,
    and its LIST no longer has the folder: the next look at the folder must
    say it is gone (ENOENT) and the parent must stop showing it, not go on
    showing the old messages.  'still-listed': LIST still has it, so the
    refusal is only a refusal and the cached listing is served.  The
    watcher's poll is off (poll_interval), so only the look itself can find
    out."""
    srv = rig.server(mailboxes=inbox() + [Mailbox("Gone", messages=[simple_message(1, folder="Gone")])])
    deleted = Switch()
    deleted.on = False

    def refuse(conn, cmd):
        if deleted.on and cmd.tokens and cmd.tokens[0] == b"Gone":
            return [cmd.no("Mailbox doesn't exist: Gone")]
        return None
    srv.on("EXAMINE", refuse)
    srv.on("SELECT", refuse)
    srv.on("STATUS", refuse)
    m = rig.mounted(srv, options=["dir_cache_timeout=1", "poll_interval=3600"])
    assert b"Gone" in set(listing(m.mountpoint)[0] or ())
    names, res = listing(m.path("Gone"))
    assert names and b"1.eml" in names, res

    if listed == "gone":
        srv.mailboxes = [box for box in srv.mailboxes if box.name != b"Gone"]
    deleted.on = True
    seen = len(srv.commands)
    time.sleep(1.2)                             # the listings are now older than the timeout
    names, res = listing(m.path("Gone"))
    assert_quick(res, what="ls of the refused folder")
    assert any(command == "LIST" for _, _, command, _ in srv.commands[seen:]), \
        "the refusal did not make the mount ask LIST"
    root, res_root = listing(m.mountpoint)
    if listed == "gone":
        assert names is None and b"No such file or directory" in res.err, \
            f"a folder gone from the server still lists: {names} {res}"
        assert root is not None and b"Gone" not in root, f"the root still shows it: {root} {res_root}"
    else:
        assert names and b"1.eml" in names, f"a refused folder still listed by LIST: {res}"
        assert root is not None and b"Gone" in root, f"the root lost it: {root} {res_root}"
    m.check_alive("after a folder was refused without a code")
    assert_reads_right(m, srv)
    m.finish()
