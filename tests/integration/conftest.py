"""pytest fixtures for imapfs integration tests.

* ``server``   (session): a throwaway Dovecot seeded with tests/fixtures/mail
                (see imapserver.py); stopped at the end, also after failures.
* ``checker``  (session): an independent imaplib client on that server.
* ``imapfs``   (session): path of the binary (env IMAPFS_BIN, default build/imapfs).
* ``mount``    (module):  imapfs mounted read-only-as-shipped on imaps://, shared
                by the tests of one module (they must not change the account).
* ``mounter``  (function): a factory for extra mounts (other URLs, -d, ...);
                each is unmounted and its daemon reaped when the test ends.

Mounting runs ``imapfs -f ... URL MOUNTPOINT`` as a child (stdout/stderr to a
log file kept under pytest's tmp dir and printed on failure), waits for the
mount in /proc/self/mountinfo, and on teardown runs ``fusermount3 -u`` and
requires the daemon to exit 0.  Whatever fails, the mount is lazily unmounted
(``fusermount3 -u -z``) and the daemon killed: nothing is left behind.

Run with Debian's interpreter: /usr/bin/python3 -m pytest -v tests/integration
"""

import atexit
import os
import signal
import subprocess
import sys
import shutil
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imapserver  # noqa: E402

REPO = imapserver.REPO
MOUNT_TIMEOUT = float(os.environ.get("IMAPFS_TEST_MOUNT_TIMEOUT", "30"))
EXIT_TIMEOUT = 30


# --------------------------------------------------------------------------
# mount table

def _unescape_mountinfo(field):
    # octal escapes for space, tab, newline, backslash
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint):
    """The /proc/self/mountinfo entry for mountpoint as a dict, or None."""
    mountpoint = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields = left.split()
            if _unescape_mountinfo(fields[4]) != mountpoint:
                continue
            rfields = right.split()
            return {"mountpoint": mountpoint, "options": fields[5], "fstype": rfields[0],
                    "source": _unescape_mountinfo(rfields[1]), "super_options": rfields[2]}
    return None


def is_mounted(mountpoint):
    return mount_entry(mountpoint) is not None


def fusermount_u(mountpoint, lazy=False):
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=EXIT_TIMEOUT)


def thread_stacks(pid):
    """Every thread's stack in a running process, from gdb when it is there,
    else each thread's kernel wait channel (gdb stops the process for about
    a second)."""
    if shutil.which("gdb"):
        try:
            r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 12"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=60)
            return "\n".join(line for line in r.stdout.splitlines()
                             if line.startswith(("Thread ", "#")))
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"gdb: {e}"
    lines = []
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f, open(f"/proc/{pid}/task/{task}/wchan") as w:
                lines.append(f"{task} {f.read().strip()}: {w.read().strip()}")
        except OSError:
            pass
    return "\n".join(lines)


# Last resort if the interpreter exits with something still mounted
_live_mounts = set()


@atexit.register
def _cleanup_leftovers():
    for mp in list(_live_mounts):
        if is_mounted(mp):
            fusermount_u(mp, lazy=True)


# --------------------------------------------------------------------------
# one mount

class Mount:
    """imapfs -f [args] URL MOUNTPOINT as a child process."""

    def __init__(self, binary, url, mountpoint, logfile, options=(), extra_args=(), env=None):
        self.binary = binary
        self.url = url
        self.mountpoint = os.path.realpath(mountpoint)
        self.logfile = logfile
        self.options = list(options)
        self.extra_args = list(extra_args)
        self.env = env
        self.proc = None
        self.exit_status = None
        self.slow_exit_stacks = None    # set by unmount() when the daemon is slow to exit

    @property
    def argv(self):
        argv = [self.binary, "-f"] + self.extra_args
        for opt in self.options:
            argv += ["-o", opt]
        return argv + [self.url, self.mountpoint]

    def log(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self, timeout=MOUNT_TIMEOUT):
        os.makedirs(self.mountpoint, exist_ok=True)
        assert not is_mounted(self.mountpoint), f"{self.mountpoint} is already a mount point"
        with open(self.logfile, "ab") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            # die_with_parent: if pytest is killed, imapfs gets SIGTERM and unmounts
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         preexec_fn=imapserver.die_with_parent)
        _live_mounts.add(self.mountpoint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                return self
            if self.proc.poll() is not None:
                self.exit_status = self.proc.returncode
                raise AssertionError(
                    f"imapfs exited with status {self.proc.returncode} before mounting; log:\n{self.log()}")
            time.sleep(0.05)
        self.abort()
        raise AssertionError(f"{self.mountpoint} not mounted after {timeout}s; log:\n{self.log()}")

    def unmount(self, slow_after=EXIT_TIMEOUT):
        """fusermount3 -u, then require the daemon to exit with status 0 within
        EXIT_TIMEOUT.  A daemon still running slow_after seconds after the
        unmount has its threads' stacks taken (slow_exit_stacks)."""
        r = fusermount_u(self.mountpoint)
        if r.returncode != 0:
            self.abort()
            raise AssertionError(f"fusermount3 -u {self.mountpoint} failed: {r.stdout}\nlog:\n{self.log()}")
        try:
            try:
                self.exit_status = self.proc.wait(slow_after)
            except subprocess.TimeoutExpired:
                self.slow_exit_stacks = thread_stacks(self.proc.pid)
                self.exit_status = self.proc.wait(max(0.01, EXIT_TIMEOUT - slow_after))
        except subprocess.TimeoutExpired:
            self.abort()
            raise AssertionError(f"imapfs did not exit within {EXIT_TIMEOUT}s after fusermount3 -u; "
                                 f"log:\n{self.log()}\nits threads:\n{self.slow_exit_stacks}")
        _live_mounts.discard(self.mountpoint)
        assert not is_mounted(self.mountpoint)
        assert self.exit_status == 0, \
            f"imapfs exited with status {self.exit_status} after unmount; log:\n{self.log()}"

    def abort(self):
        """Whatever state we are in: nothing mounted, no process left."""
        if is_mounted(self.mountpoint):
            if fusermount_u(self.mountpoint).returncode != 0:
                fusermount_u(self.mountpoint, lazy=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.proc is not None:
            self.exit_status = self.proc.returncode
        if is_mounted(self.mountpoint):
            fusermount_u(self.mountpoint, lazy=True)
        _live_mounts.discard(self.mountpoint)

    # paths on the mount for server things
    def folder_path(self, raw_name, delimiter):
        parts = imapserver.mutf7_decode(raw_name).split(delimiter) if delimiter else [raw_name]
        return os.path.join(self.mountpoint, *parts)

    def message_path(self, raw_name, delimiter, uid):
        return os.path.join(self.folder_path(raw_name, delimiter), f"{uid}.eml")


# --------------------------------------------------------------------------
# fixtures

def pytest_configure(config):
    # imapfs keeps a persistent cache under $XDG_CACHE_HOME by default: give
    # every mount of this run a throwaway one, never the user's ~/.cache.
    if "IMAPFS_TEST_KEEP_XDG_CACHE" not in os.environ:
        cache_home = tempfile.mkdtemp(prefix="imapfs-test-cache.")
        os.environ["XDG_CACHE_HOME"] = cache_home
        atexit.register(shutil.rmtree, cache_home, True)
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so fixtures clean up.
    # Only the main thread may set a handler, and Debian 12's execnet (1.9)
    # sometimes runs an xdist worker in another thread: its first remote_exec
    # keeps the main thread marked busy for a moment after replying, so the
    # worker's own remote_exec can land on a new thread (CI saw it, and the
    # whole run stopped).  Such a worker keeps the default: SIGTERM
    # ends it at once, its servers follow (PR_SET_PDEATHSIG) and the atexit
    # unmount does not run.  The controller is on its main thread and unwinds.
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        def _terminate(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, _terminate)


@pytest.fixture(scope="session")
def imapfs():
    path = os.environ.get("IMAPFS_BIN", os.path.join(REPO, "build", "imapfs"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"imapfs binary not found at {path}: build it (ninja -C build) or set IMAPFS_BIN")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def server(request):
    # Its own temp dir, not pytest's: as root, Dovecot's unprivileged
    # processes must be able to reach it (pytest's base dir is 0700).
    srv = imapserver.TestServer(tied_to_parent=True)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if srv.dir:
            if request.session.testsfailed:
                sys.stderr.write(f"\ntest server files kept in {srv.dir} (dovecot.log)\n")
            else:
                srv.remove()


@pytest.fixture(scope="session")
def checker(server):
    c = server.checker()
    yield c
    c.close()


def snapshot(checker):
    """What a server holds, read with the independent client: folders (LIST),
    the delimiter, and per selectable folder {uid: size, internaldate, flags}."""
    folders = checker.list_folders()
    messages = {}
    for flags, _, raw, _ in folders:
        if flags & {"\\Noselect", "\\NonExistent"}:
            continue
        messages[raw] = checker.messages(raw)
    return {"folders": folders, "delimiter": checker.delimiter(), "messages": messages}


@pytest.fixture(scope="session")
def server_state(server, checker):
    return snapshot(checker)


@pytest.fixture
def scratch_server(request):
    """A server of its own for a test that may change the account (or that
    checks that it cannot), so a misbehaving imapfs cannot spoil the shared one."""
    srv = imapserver.TestServer(tied_to_parent=True)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if srv.dir:
            rep = getattr(request.node, "rep_call", None)
            if rep is not None and rep.failed:
                sys.stderr.write(f"\nscratch server files kept in {srv.dir}\n")
            else:
                srv.remove()


def _url(server, scheme, port=None, user=None):
    port = port or (server.imaps_port if scheme == "imaps" else server.imap_port)
    return f"{scheme}://{user or server.user}@{server.host}:{port}"


class Mounter:
    def __init__(self, imapfs, server, tmp_path):
        self.imapfs = imapfs
        self.server = server
        self.tmp_path = tmp_path
        self.mounts = []

    def url(self, scheme="imaps", port=None, user=None, server=None):
        return _url(server or self.server, scheme, port, user)

    def default_options(self, server=None):
        server = server or self.server
        return [f"cafile={server.cafile}", f"password_file={server.password_file}"]

    def __call__(self, url=None, options=None, extra_args=(), name=None, start=True, server=None):
        """Mount (by default imaps:// on the session server, or on server=)."""
        n = len(self.mounts)
        name = name or f"mnt{n}"
        m = Mount(self.imapfs, url or self.url(server=server), str(self.tmp_path / name),
                  str(self.tmp_path / f"{name}.log"),
                  options=self.default_options(server) if options is None else options,
                  extra_args=extra_args)
        self.mounts.append(m)
        if start:
            m.start()
        return m

    def cleanup(self):
        for m in self.mounts:
            m.abort()


@pytest.fixture
def mounter(imapfs, server, tmp_path):
    mt = Mounter(imapfs, server, tmp_path)
    yield mt
    mt.cleanup()


@pytest.fixture(scope="module")
def mount(imapfs, server, tmp_path_factory, request):
    """imapfs on imaps://, shared by one test module; clean unmount checked at the end."""
    mt = Mounter(imapfs, server, tmp_path_factory.mktemp("mount"))
    m = mt()
    try:
        yield m
        m.unmount()
    except BaseException:
        sys.stderr.write(f"\n--- imapfs log {m.logfile} ---\n{m.log()}\n")
        raise
    finally:
        mt.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item (item.rep_call), and on a
    failing test show the logs of the mounts it used."""
    if call.when == "call" and call.excinfo is not None:
        _add_mount_logs(item)
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _add_mount_logs(item):
    funcargs = getattr(item, "funcargs", {})
    mounts = []
    if isinstance(funcargs.get("mount"), Mount):
        mounts.append(funcargs["mount"])
    if isinstance(funcargs.get("mounter"), Mounter):
        mounts += funcargs["mounter"].mounts
    for m in mounts:
        item.add_report_section("call", f"imapfs log {os.path.basename(m.logfile)}", m.log()[-20000:])
