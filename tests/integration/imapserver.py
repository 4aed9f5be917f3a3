"""A throwaway Dovecot for imapfs tests, and an independent IMAP client to check it.

Used two ways:

* by ``scripts/test-server`` (a thin command-line wrapper), and
* by ``tests/integration/conftest.py`` (imported as a module).

Everything lives in one directory: the Dovecot config written here (no system
config is included), its base_dir and state_dir, the log, a self-signed
certificate, the passwd-file, the Maildir and the client's password file.
Dovecot runs in the foreground (``dovecot -F``) as a child we started, in its
own session, and is stopped by the pid recorded in ``DIR/server.json``.

Two listeners on 127.0.0.1, each on a free port: IMAPS (implicit TLS) and IMAP
with STARTTLS.  ``disable_plaintext_auth = yes``.  Note one Dovecot rule we
cannot configure away: a connection whose remote IP equals its local IP counts
as "secured", so on 127.0.0.1 -> 127.0.0.1 Dovecot does NOT advertise
LOGINDISABLED and would accept LOGIN before STARTTLS.  The tests therefore
check from the server's log that imapfs's login on the STARTTLS port was made
over TLS (Dovecot writes ", TLS," in the Login line, ", secured," otherwise).
``--host 127.0.0.2`` makes clients connect from 127.0.0.1 to another address,
and then Dovecot refuses LOGIN before TLS (LOGINDISABLED).

Mail is seeded from tests/fixtures/mail with IMAP APPEND over TLS (what the
server really stores), keeping flags and INTERNALDATE from the manifest.

Standard library only; Python >= 3.9.
"""

import base64
import datetime as _dt
import email.utils
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import imaplib
import secrets

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIXTURE_DIR = os.path.join(REPO, "tests", "fixtures", "mail")
DOVECOT = os.environ.get("DOVECOT", "/usr/sbin/dovecot")
USER = "alice"
STATE_FILE = "server.json"


class ServerError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# modified UTF-7 (RFC 3501 5.1.3)

def mutf7_encode(name):
    out = []
    pending = []

    def flush():
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7e:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(name):
    out = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.index("-", i)
        chunk = name[i + 1:end]
        if chunk == "":
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            out.append(base64.b64decode(b64).decode("utf-16-be"))
        i = end + 1
    return "".join(out)


def imap_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------
# small helpers

def free_port(host="127.0.0.1"):
    """A TCP port on host nobody listens on right now (closed again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Shell lines for the start of a new private mount namespace (unshare -m):
# it begins with a copy of every mount there is, other tests' FUSE mounts
# among them, and a FUSE mount's daemon exits only once its last copy is
# gone, so an fusermount3 -u of that mount would leave its daemon waiting for
# this namespace to end (seen: 24 s, with two test processes at once).
# Detaching the copies here lets those mounts go when their tests unmount.
DETACH_COPIED_FUSE_MOUNTS = r"""
awk '$3 ~ /^fuse(\.|$)/ {print $2}' /proc/self/mounts | while read -r m; do
    umount -l "$(printf '%b' "$m")" || true
done
"""


def wait_until_uidvalidity_can_change(uidvalidity):
    """Before a folder is deleted and made again to give it a new
    UIDVALIDITY.  Dovecot's is the second the folder was made, or one more
    than the last it gave when that is later (folders made quickly run it
    ahead of the clock, by half a minute in test_write.py): only a folder made
    again within its own second could get the same one, so only then wait."""
    while uidvalidity - 2 < time.time() < uidvalidity + 1.05:
        time.sleep(0.05)


def die_with_parent():
    """preexec_fn: have the kernel send SIGTERM to the child when the process
    that started it dies (even by SIGKILL), so a killed test run leaves no
    server or mount behind.  Linux only; a no-op where prctl is missing."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still "exists"; treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return True


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def parse_internaldate(s):
    """'01-Mar-2024 09:15:00 +0100' -> seconds since the epoch (int)."""
    return int(_dt.datetime.strptime(s.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp())


def load_manifest(fixture_dir=FIXTURE_DIR):
    with open(os.path.join(fixture_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def fixture_messages(fixture_dir=FIXTURE_DIR):
    """[(folder, relpath)] of every *.eml under fixture_dir, folder '/'-separated."""
    found = []
    for root, dirs, files in os.walk(fixture_dir):
        dirs.sort()
        for fn in sorted(files):
            if fn.endswith(".eml"):
                rel = os.path.relpath(os.path.join(root, fn), fixture_dir).replace(os.sep, "/")
                found.append((rel.rsplit("/", 1)[0], rel))
    return found


# --------------------------------------------------------------------------
# the independent client

class Checker:
    """An imaplib connection (IMAPS, CA file trusted) to look at the server."""

    FETCH_META = re.compile(
        rb"\d+ \(.*?UID (\d+).*?RFC822\.SIZE (\d+).*?INTERNALDATE \"([^\"]+)\".*?FLAGS \(([^)]*)\)")

    def __init__(self, host, port, user, password, cafile, timeout=30):
        ctx = ssl.create_default_context(cafile=cafile)
        self.imap = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=timeout)
        self.imap.login(user, password)

    def close(self):
        try:
            self.imap.logout()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _ok(self, typ, data, what):
        if typ != "OK":
            raise ServerError(f"{what}: {typ} {data!r}")
        return data

    def delimiter(self):
        data = self._ok(*self.imap.list('""', '""'), "LIST delimiter")
        m = re.match(rb'\(.*?\) (?:"(.)"|NIL)', data[0])
        return m.group(1).decode() if m and m.group(1) else None

    def list_folders(self):
        """[(flags set, delimiter, raw name, decoded name)] for LIST "" "*"."""
        out = []
        for line in self._ok(*self.imap.list('""', '"*"'), "LIST"):
            if isinstance(line, tuple):      # name sent as a literal
                head, lit = line
                m = re.match(rb'\(([^)]*)\) (?:"((?:\\.|[^"\\])*)"|NIL) ', head)
                raw = lit.decode("utf-8", "replace")
            else:
                m = re.match(rb'\(([^)]*)\) (?:"((?:\\.|[^"\\])*)"|NIL) (.*)$', line)
                raw = m.group(3).decode("utf-8", "replace")
                if raw.startswith('"'):
                    raw = re.sub(r'\\(.)', r'\1', raw[1:-1])
            flags = set(m.group(1).decode().split())
            delim = m.group(2).decode() if m.group(2) is not None else None
            if delim and delim.startswith("\\"):
                delim = delim[1:]
            out.append((flags, delim, raw, mutf7_decode(raw)))
        return out

    def examine(self, raw_name):
        typ, data = self.imap.select(imap_quote(raw_name), readonly=True)
        self._ok(typ, data, f"EXAMINE {raw_name}")
        return int(data[0])

    def uidvalidity(self, raw_name):
        data = self._ok(*self.imap.status(imap_quote(raw_name), "(UIDVALIDITY)"), "STATUS")
        return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))

    def messages(self, raw_name):
        """{uid: {'size', 'internaldate' (epoch), 'flags' (set)}} of one folder."""
        if self.examine(raw_name) == 0:
            return {}
        data = self._ok(*self.imap.uid("FETCH", "1:*", "(UID RFC822.SIZE INTERNALDATE FLAGS)"),
                        "UID FETCH meta")
        out = {}
        for line in data:
            if isinstance(line, tuple):
                line = line[0]
            if not line:
                continue
            m = self.FETCH_META.match(line)
            if not m:
                raise ServerError(f"cannot parse FETCH line {line!r}")
            out[int(m.group(1))] = {
                "size": int(m.group(2)),
                "internaldate": parse_internaldate(m.group(3).decode()),
                "flags": set(m.group(4).decode().split()) - {"\\Recent"},
            }
        return out

    def bodies(self, raw_name, uids="1:*"):
        """{uid: bytes of BODY.PEEK[]} (never sets \\Seen)."""
        if self.examine(raw_name) == 0:
            return {}
        data = self._ok(*self.imap.uid("FETCH", uids, "(UID BODY.PEEK[])"), "UID FETCH body")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                m = re.search(rb"UID (\d+)", item[0])
                out[int(m.group(1))] = item[1]
        return out

    def body(self, raw_name, uid):
        return self.bodies(raw_name, str(uid))[uid]

    def flags(self, raw_name):
        return {uid: m["flags"] for uid, m in self.messages(raw_name).items()}


# --------------------------------------------------------------------------
# the server

class LocalServer:
    """What a throwaway server on 127.0.0.1 is, whatever runs it (TestServer
    here: Dovecot; cyrusserver.CyrusServer: Cyrus): a directory of its own,
    a start on two free ports (IMAPS and IMAP with STARTTLS) retried when a
    port is taken meanwhile, a wait until it logs a user in, a stop by the
    pid we started, the fixture mail APPENDed over TLS, its state saved for
    from_dir().  A kind supplies NAME, LOG_NAME, CONFIG_NAME, TAIL_FILES,
    DIR_PREFIX, _write_files(), _spawn() (the Popen of what is to run),
    logins_since(), and may hook _check_available(), _probe(),
    _after_start(), _state_extra(), _init_kwargs() and _attach()."""

    NAME = "server"
    LOG_NAME = "server.log"
    CONFIG_NAME = "server.conf"
    TAIL_FILES = ()
    DIR_PREFIX = "imapfs-test-server."
    # Parents the manifest expects \Noselect that this kind makes real
    # mailboxes (Cyrus): recorded in seeded["selectable_parents"], not an error.
    SELECTABLE_PARENTS = False

    def __init__(self, directory, host, capabilities, separator, prefix, fixture_dir, seed,
                 tied_to_parent):
        self.dir = os.path.abspath(directory) if directory else None
        self.host = host
        self.capabilities = capabilities
        self.separator = separator
        self.prefix = prefix
        self.fixture_dir = fixture_dir
        self.do_seed = seed
        self.tied_to_parent = tied_to_parent
        self.user = USER
        self.password = None
        self.imaps_port = None
        self.imap_port = None
        self.pid = None
        self.proc = None
        self.seeded = None
        self.start_seconds = None   # up and answering (without seeding)
        self._own_dir = False

    # paths
    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    @property
    def cafile(self):
        return self.path("ca.pem")

    @property
    def password_file(self):
        return self.path("password")

    @property
    def log_path(self):
        return self.path(self.LOG_NAME)

    @property
    def config_path(self):
        return self.path(self.CONFIG_NAME)

    def env(self):
        """The shell variables scripts/test-server prints."""
        return {
            "IMAP_HOST": self.host,
            "IMAPS_PORT": str(self.imaps_port),
            "IMAP_PORT": str(self.imap_port),
            "IMAP_USER": self.user,
            "IMAP_PASSWORD_FILE": self.password_file,
            "IMAP_CAFILE": self.cafile,
            "IMAP_PID": str(self.pid),
            "IMAP_DIR": self.dir,
        }

    def checker(self):
        return Checker(self.host, self.imaps_port, self.user, self.password, self.cafile)

    def server_name(self, folder):
        """Fixture folder path ('Lists/notmuch') -> raw IMAP mailbox name."""
        if folder == "INBOX":
            return "INBOX"
        return mutf7_encode(self.prefix + folder.replace("/", self.separator))

    # state, for from_dir() ---------------------------------------------
    def _state_extra(self):
        return {}

    @classmethod
    def _init_kwargs(cls, state):
        return {}

    def _attach(self, state):
        pass

    def _save_state(self):
        state = dict(self.env(), config=self.config_path, separator=self.separator,
                     prefix=self.prefix, capabilities=self.capabilities, **self._state_extra())
        with open(self.path(STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)

    @classmethod
    def from_dir(cls, directory):
        """Re-attach to a server started earlier (scripts/test-server stop/env)."""
        directory = os.path.abspath(directory)
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
        srv = cls(directory, host=state["IMAP_HOST"], capabilities=state.get("capabilities"),
                  separator=state.get("separator", "/"), prefix=state.get("prefix", ""),
                  **cls._init_kwargs(state))
        srv.imaps_port = int(state["IMAPS_PORT"])
        srv.imap_port = int(state["IMAP_PORT"])
        srv.pid = int(state["IMAP_PID"])
        with open(srv.password_file) as f:
            srv.password = f.read().strip()
        srv._attach(state)
        seeded = os.path.join(directory, "seeded.json")
        if os.path.exists(seeded):
            with open(seeded, encoding="utf-8") as f:
                srv.seeded = json.load(f)
        return srv

    def running(self):
        """Our pid is alive and still runs our config (or our directory)."""
        if self.pid is None or not _pid_alive(self.pid):
            return False
        cmd = _cmdline(self.pid)
        return self.config_path.encode() in cmd or self.dir.encode() in cmd

    # life ----------------------------------------------------------------
    def _check_available(self):
        pass

    def _probe(self):
        return self.checker()

    def _after_start(self):
        pass

    def start(self, timeout=30):
        self._check_available()
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix=self.DIR_PREFIX)
            self._own_dir = True
        if os.path.exists(self.path(STATE_FILE)):
            old = type(self).from_dir(self.dir)
            if old.running():
                raise ServerError(f"a test server already runs from {self.dir} (pid {old.pid})")
        started = time.monotonic()
        last_error = None
        for attempt in range(5):          # a port can be taken between probe and bind
            self.imaps_port = free_port(self.host)
            self.imap_port = free_port(self.host)
            if self.imap_port == self.imaps_port:
                continue
            self._write_files()
            try:
                self._launch(timeout)
                break
            except ServerError as e:
                last_error = e
                self.stop()
                if "already in use" not in str(e):
                    raise
        else:
            raise last_error or ServerError(f"could not start {self.NAME}")
        self.start_seconds = time.monotonic() - started
        try:
            self._after_start()
            if self.do_seed:
                self.seed()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, timeout):
        """Run it from the files written, record its pid, wait until it answers."""
        self.proc = self._spawn()
        self.pid = self.proc.pid
        self._save_state()
        self._wait_ready(timeout)

    def _tail(self, n=20):
        text = ""
        for name in self.TAIL_FILES:
            try:
                with open(self.path(name), errors="replace") as f:
                    lines = f.readlines()[-n:]
                if lines:
                    text += f"--- {name}\n" + "".join(lines)
            except OSError:
                pass
        return text

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.NAME} exited with status {self.proc.returncode}:\n"
                                  f"{self._tail()}")
            try:
                self._probe().close()       # TLS handshake + LOGIN: auth is up too
                return
            except (OSError, imaplib.IMAP4.error, ssl.SSLError) as e:
                last = e
                time.sleep(0.1)
        raise ServerError(f"{self.NAME} did not answer within {timeout}s ({last}):\n{self._tail()}")

    def stop(self, timeout=20):
        """Stop the server we started (by its recorded pid).  Removes nothing."""
        if self.pid is None:
            return
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif self.running():
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.running():
                os.kill(self.pid, signal.SIGKILL)
                while self.running():
                    time.sleep(0.05)
        self.proc = None

    def remove(self):
        if self.dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------
    def seed(self):
        """APPEND the fixture mail as the user (flags and INTERNALDATE from the manifest)."""
        manifest = load_manifest(self.fixture_dir)
        msgs = fixture_messages(self.fixture_dir)
        folders = list(manifest.get("folders", []))
        for folder, _ in msgs:
            if folder not in folders:
                folders.append(folder)
        per_msg = manifest.get("messages", {})
        folder_flags = manifest.get("folder_flags", {})
        seeded = {"delimiter": self.separator, "prefix": self.prefix,
                  "folders": {}, "messages": {}, "noselect": {}, "selectable_parents": {}}
        with self.checker() as c:
            imap = c.imap
            # imaplib sends an APPEND's literal and its closing CRLF in two
            # writes; with Nagle on, the CRLF waits for the server's delayed
            # ACK (Cyrus: ~40 ms per message, 15 s for the fixtures).
            imap.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for folder in folders:
                raw = self.server_name(folder)
                seeded["folders"][folder] = raw
                if raw != "INBOX":
                    c._ok(*imap.create(imap_quote(raw)), f"CREATE {raw}")
            for folder, rel in msgs:
                raw = self.server_name(folder)
                meta = per_msg.get(rel, {})
                flags = meta.get("flags", folder_flags.get(folder, []))
                with open(os.path.join(self.fixture_dir, rel), "rb") as f:
                    data = f.read()
                if "internaldate" in meta:
                    when = _dt.datetime.fromisoformat(meta["internaldate"])
                else:
                    hdr = re.search(rb"^Date: (.*?)\r?$", data, re.M | re.I).group(1).decode()
                    when = email.utils.parsedate_to_datetime(hdr)
                # imaplib turns bare LF into CRLF, as IMAP requires
                typ, resp = imap.append(imap_quote(raw), "(" + " ".join(flags) + ")",
                                        imaplib.Time2Internaldate(when), data)
                c._ok(typ, resp, f"APPEND {rel}")
                m = re.search(rb"\[APPENDUID (\d+) (\d+)\]", resp[0] or b"")
                seeded["messages"][rel] = {
                    "folder": raw, "uid": int(m.group(2)) if m else None,
                    "uidvalidity": int(m.group(1)) if m else None,
                    "flags": sorted(flags), "internaldate": int(when.timestamp())}
            # check what the server made of it
            listed = {raw: flags for flags, _, raw, _ in c.list_folders()}
            for folder in manifest.get("noselect", []):
                raw = self.server_name(folder)
                if raw not in listed:
                    raise ServerError(f"{raw!r} is not listed on the server")
                if listed[raw] & {"\\Noselect", "\\NonExistent"}:
                    seeded["noselect"][folder] = raw
                elif self.SELECTABLE_PARENTS:
                    seeded["selectable_parents"][folder] = raw
                else:
                    raise ServerError(f"{raw!r} is not \\Noselect on the server: {listed[raw]}")
            for folder in folders:
                raw = self.server_name(folder)
                want = sum(1 for f, _ in msgs if f == folder)
                got = len(c.messages(raw))
                if got != want:
                    raise ServerError(f"{raw}: {got} messages on the server, {want} fixtures")
        self.seeded = seeded
        with open(self.path("seeded.json"), "w", encoding="utf-8") as f:
            json.dump(seeded, f, indent=1, ensure_ascii=False)
        return seeded

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0


class TestServer(LocalServer):
    """One throwaway Dovecot.  start() / stop(); attributes describe it."""

    NAME = "dovecot"
    LOG_NAME = "dovecot.log"
    CONFIG_NAME = "dovecot.conf"
    TAIL_FILES = ("dovecot.stdout", "dovecot.log")

    def __init__(self, directory=None, host="127.0.0.1", capabilities=None,
                 separator="/", prefix="", fixture_dir=FIXTURE_DIR, seed=True,
                 tied_to_parent=False, oauth_introspection_url=None, quota_storage_kib=None,
                 list_index=True):
        """tied_to_parent: stop Dovecot when this process dies (for pytest);
        scripts/test-server start leaves it running, so it does not.

        oauth_introspection_url: also offer AUTHENTICATE XOAUTH2 and
        OAUTHBEARER, checked by Dovecot's oauth2 passdb against this RFC 7662
        token-introspection endpoint (POST token=...; the reply must say
        {"active": true, "username": USER}).  Passwords still work for
        LOGIN/PLAIN (the checker).

        quota_storage_kib: enable Dovecot's quota plugin (count driver) with a
        STORAGE limit of that many KiB, and the QUOTA extension (GETQUOTAROOT)
        in IMAP.  None (the default): no quota.

        list_index=False: Dovecot without its mailbox list index, so LIST reads
        the Maildir itself (and NOTIFY, which needs the index, is neither
        offered nor accepted).  Dovecot 2.3.19's NOTIFY can corrupt that index
        while another client renames folders: it logs "Corrupted mailbox list
        index", imap processes die of SIGSEGV, and from then on every
        session's LIST answers from a stale tree -- the checker's and the
        mount's alike.  Seen in test_write, which renames folders again and
        again with a NOTIFY watcher running; a NOTIFY session that sends NOOP
        while another session renames reproduces it every time."""
        super().__init__(directory, host, capabilities, separator, prefix, fixture_dir, seed,
                         tied_to_parent)
        self.oauth_introspection_url = oauth_introspection_url
        self.quota_storage_kib = quota_storage_kib
        self.list_index = list_index

    def _state_extra(self):
        return dict(oauth_introspection_url=self.oauth_introspection_url,
                    quota_storage_kib=self.quota_storage_kib, list_index=self.list_index)

    @classmethod
    def _init_kwargs(cls, state):
        return dict(oauth_introspection_url=state.get("oauth_introspection_url"),
                    quota_storage_kib=state.get("quota_storage_kib"),
                    list_index=state.get("list_index", True))

    def _check_available(self):
        if not os.path.exists(DOVECOT):
            raise ServerError(f"{DOVECOT} not found: apt-get install dovecot-imapd")

    # ------------------------------------------------------------------
    def _accounts(self):
        """(internal user, internal group, login user, mail user, mail group)."""
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            return me, group, me, me, group
        # Root: Dovecot refuses to run login processes as root and refuses
        # mail access as root.  Auth and the other internal services may run
        # as root (they read our 0600 passwd-file).
        def exists(name):
            try:
                pwd.getpwnam(name)
                return True
            except KeyError:
                return False
        login = "dovenull" if exists("dovenull") else "nobody"
        mail = pwd.getpwnam("nobody")
        return "root", "root", login, mail.pw_name, grp.getgrgid(mail.pw_gid).gr_name

    def _write_files(self):
        os.makedirs(self.dir, exist_ok=True)
        if os.geteuid() == 0:
            # the login and mail users (not root) must be able to pass through
            os.chmod(self.dir, 0o711)
            parent = os.path.dirname(self.dir)
            while parent != "/":
                if not os.stat(parent).st_mode & 0o001:
                    raise ServerError(
                        f"{parent} is not searchable by others, but Dovecot's unprivileged "
                        f"processes need to reach {self.dir}: use a directory under /tmp")
                parent = os.path.dirname(parent)
        for sub in ("run", "state", "home"):
            os.makedirs(self.path(sub), exist_ok=True)
        os.chmod(self.path("home"), 0o711)
        internal, internal_group, login, mail_user, mail_group = self._accounts()
        home = self.path("home", self.user)
        os.makedirs(home, exist_ok=True)
        os.chmod(home, 0o700)
        if os.geteuid() == 0:
            os.chown(home, pwd.getpwnam(mail_user).pw_uid, grp.getgrnam(mail_group).gr_gid)

        # certificate: self-signed, CN/SAN localhost + the listening IP
        if not os.path.exists(self.path("cert.pem")):
            san = "DNS:localhost,IP:127.0.0.1"
            if self.host != "127.0.0.1":
                san += f",IP:{self.host}"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-days", "30", "-subj", "/CN=localhost",
                 "-keyout", self.path("key.pem"), "-out", self.path("cert.pem"),
                 "-addext", f"subjectAltName={san}",
                 "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                 "-addext", "extendedKeyUsage=serverAuth"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            os.chmod(self.path("key.pem"), 0o600)
            shutil.copyfile(self.path("cert.pem"), self.cafile)

        # the user's password: random, in a 0600 file for the client
        if os.path.exists(self.password_file):
            with open(self.password_file) as f:
                self.password = f.read().strip()
        else:
            self.password = secrets.token_hex(12)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
        fd = os.open(self.path("users"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            # user:password:uid:gid:gecos:home:shell:extra (uid/gid from mail_uid/gid)
            f.write(f"{self.user}:{{PLAIN}}{self.password}::::{home}::\n")

        mechanisms = "plain login"
        oauth_passdb = passwd_mechanisms = anvil_extra = ""
        if self.oauth_introspection_url:
            mechanisms += " xoauth2 oauthbearer"
            with open(self.path("dovecot-oauth2.conf.ext"), "w") as f:
                f.write(f"""introspection_mode = post
introspection_url = {self.oauth_introspection_url}
username_attribute = username
active_attribute = active
active_value = true
""")
            # tokens go to the oauth2 passdb only, never to the passwd-file
            passwd_mechanisms = "  mechanisms = plain login\n"
            oauth_passdb = f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.path('dovecot-oauth2.conf.ext')}
}}
"""
            # no anvil auth penalty (a delay of 2, 4, 8, then 15 s before every
            # login from an IP with recent failures, for 30 s after the last):
            # tests of rejected tokens would pile it up past their timeouts.
            # The 2 s delay of each failure reply stays.  (Dovecot 2.3's login
            # processes do not skip it for login_trusted_networks.)
            anvil_extra = "  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n"
        quota_imap = quota_conf = ""
        if self.quota_storage_kib is not None:
            # before "protocol imap": $mail_plugins is expanded where it is
            # read.  The count driver keeps usage in the index; it needs vsizes.
            quota_imap = "  mail_plugins = $mail_plugins imap_quota\n"
            quota_conf = f"""mail_plugins = $mail_plugins quota
plugin {{
  quota = count:User quota
  quota_rule = *:storage={int(self.quota_storage_kib)}k
  quota_vsizes = yes
}}
"""
        capability = ""
        if self.capabilities:
            capability = f"  imap_capability = {self.capabilities}\n"
        conf = f"""# Generated by tests/integration/imapserver.py -- a throwaway test server.
# No system configuration is included.
base_dir = {self.path('run')}
state_dir = {self.path('state')}
log_path = {self.log_path}
instance_name = imapfs-test-{os.path.basename(self.dir)}
protocols = imap
listen = {self.host}
ssl = yes
ssl_cert = <{self.path('cert.pem')}
ssl_key = <{self.path('key.pem')}
# STARTTLS offered; LOGIN/AUTHENTICATE PLAIN refused before TLS
# (except for Dovecot's remote IP == local IP rule, see imapserver.py)
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
# the default plus lport, so tests can tell the STARTTLS port's logins apart;
# %c says "TLS" (or "secured" for a plaintext connection from 127.0.0.1)
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l lport=%{{lport}} mpid=%e %c session=<%{{session}}>
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}
mail_uid = {mail_user}
mail_gid = {mail_group}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir:LAYOUT=fs
mailbox_list_index = {'yes' if self.list_index else 'no'}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.path('users')}
{passwd_mechanisms}}}
{oauth_passdb}userdb {{
  driver = passwd-file
  args = username_format=%u {self.path('users')}
}}
namespace inbox {{
  inbox = yes
  separator = {self.separator}
  prefix = {self.prefix}
}}
{quota_conf}protocol imap {{
  mail_max_userip_connections = 200
{capability}{quota_imap}}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
# no chroot: it needs root, and nothing here is worth jailing
service anvil {{
  chroot =
{anvil_extra}}}
service imap-urlauth-login {{
  chroot =
}}
"""
        with open(self.config_path, "w") as f:
            f.write(conf)

    def _spawn(self):
        log = open(self.path("dovecot.stdout"), "ab")
        try:
            return subprocess.Popen(
                [DOVECOT, "-F", "-c", self.config_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
                preexec_fn=die_with_parent if self.tied_to_parent else None)
        finally:
            log.close()

    def restart(self, timeout=30):
        """Run Dovecot again from the same directory, config, ports and mail
        (nothing is seeded again), after stop() or to bounce a running
        server: clients find the same account at the same address."""
        if self.dir is None or self.imaps_port is None or not os.path.exists(self.config_path):
            raise ServerError("restart(): this server was never started")
        self.stop()
        try:
            self._launch(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def logins_since(self, offset):
        """Dovecot 'Login:' lines written to the log after byte offset."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if "imap-login: Info: Login:" in line]



class FastServer(TestServer):
    """A TestServer whose checker connections do not wait for Nagle (tests
    that make many small changes through the checker)."""

    def checker(self):
        c = super().checker()
        c.imap.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c
