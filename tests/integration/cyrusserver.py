"""A throwaway Cyrus IMAP 3.6 for imapfs tests: the second server shape.

The same public interface as ``imapserver.TestServer`` (Dovecot), so the same
tests and the same ``imapserver.Checker`` run against either:

    srv = CyrusServer(tied_to_parent=True).start()    # seeded from tests/fixtures/mail
    srv.host, srv.imaps_port, srv.imap_port, srv.user, srv.password,
    srv.password_file, srv.cafile, srv.separator, srv.prefix, srv.seeded,
    srv.checker(), srv.server_name("Lists/notmuch"), srv.env(),
    srv.logins_since(srv.log_size()), srv.stop(), srv.remove()

plus ``kind == "cyrus"`` (``TestServer`` has no such attribute: treat a missing
one as "dovecot"), ``version``, ``admin`` / ``admin_password``, and
``quirks`` (what this shape does differently, for tests to consult).

Where Cyrus comes from
----------------------
Debian's ``cyrus-imapd`` cannot be installed next to ``dovecot-imapd`` (both
Provide imap-server), so ``scripts/fetch-cyrus`` unpacks the .debs with
``dpkg -x`` into ``build-cyrus/root`` (override: env ``CYRUS_ROOT``).  The
programs run from there with LD_LIBRARY_PATH set; ``cyrus.conf`` names every
program by its absolute path in that tree.  If the tree is missing,
``start()`` raises ``ServerError`` saying so: a test using this server then
fails (it is not skipped), as a server shape that cannot start must.

How it is configured (all files in one temp directory)
------------------------------------------------------
* ``imapd.conf``: configdirectory, partition-default, proc/lock/socket paths,
  all inside the directory; ``servername: localhost``.
* Passwords are really checked: ``sasl_pwcheck_method: auxprop`` with the
  ``sasldb`` plugin (the system's libsasl2-modules-db) and a sasldb2 file made
  with the unpacked ``saslpasswd2 -f FILE -u localhost -p -c USER``.
  ``sasl_mech_list: PLAIN LOGIN``; ``allowplaintext: no``, so the STARTTLS
  port advertises LOGINDISABLED and refuses LOGIN / AUTHENTICATE before TLS
  (unlike Dovecot, Cyrus makes no exception for 127.0.0.1).
* Two users: ``alice`` (the account under test) and ``admin`` (``admins:``),
  who creates alice's INBOX (``CREATE user/alice``, or ``user.alice``); alice
  then creates her folders and APPENDs the fixture mail herself.
* Shapes: ``separator="/"`` -> ``unixhierarchysep: yes`` (the default in 3.x),
  ``separator="."`` -> ``unixhierarchysep: no``.  ``prefix=""`` ->
  ``altnamespace: yes`` (the 3.x default: folders beside INBOX, like Dovecot's
  namespace here, so the mount's root looks the same); ``prefix="INBOX/"`` or
  ``"INBOX."`` -> ``altnamespace: no`` (Cyrus's traditional layout: every
  folder is below INBOX).
* ``delete_mode: immediate``, ``expunge_mode: immediate`` (no hidden DELETED.*
  mailboxes or kept expunged messages: what tests see is what there is).
* ``idled`` runs (DAEMON section), so IDLE is pushed, not polled.
* ``capabilities=``: as for Dovecot a full list to advertise; done with
  Cyrus's ``suppress_capabilities`` (every known capability not listed is
  suppressed; nothing can be added).
* TLS: a self-signed certificate for localhost / 127.0.0.1 (``ca.pem``).
* Cyrus refuses to run as root ("must run as the Cyrus user"): as root it runs
  as ``nobody:nogroup`` (``cyrus_user``/``cyrus_group``; no system user is
  created), otherwise as the invoking user.

Logging
-------
Cyrus logs only to syslog (/dev/log), which this machine does not have.  As
root, ``master`` runs in a private mount namespace (``unshare -m``) whose
/dev is a copy of the needed device nodes plus a ``log`` socket that a small
supervisor (this module run as ``python3 cyrusserver.py _supervise DIR``)
reads into ``DIR/cyrus.log``.  Nothing is mounted outside that namespace.
Without root there is no syslog capture (``cyrus.log`` stays empty).

The supervisor is the process we start and whose pid we record; it starts
master, and on SIGTERM (or when its parent dies, if ``tied_to_parent``) stops
master and exits.  This matters because master drops root for ``nobody`` and
with that loses the kernel's parent-death signal.

``logins_since`` returns Cyrus's own ``login:`` lines rewritten to the shape of
Dovecot's, so the same checks work: ``imap-login: Info: Login: user=<alice>,
method=..., rip=..., lport=PORT, TLS, (cyrus: original line)``; ``lport`` is
taken from the service name in the syslog ident (``imap`` or ``imaps``), and
``TLS`` from Cyrus's ``+TLS`` (else ``secured`` is written, as Dovecot does).

By hand: ``python3 tests/integration/cyrusserver.py run [--separator .]
[--prefix INBOX.]`` starts a seeded one, prints the same variables as
``scripts/test-server`` and stops it on Ctrl-C.

Standard library only; Python >= 3.9.
"""

import contextlib
import fcntl
import grp
import os
import hashlib
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import secrets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imapserver  # noqa: E402
from imapserver import (Checker, LocalServer, ServerError, _cmdline, _pid_alive,  # noqa: E402
                        die_with_parent, imap_quote)

HERE = imapserver.HERE
REPO = imapserver.REPO
FIXTURE_DIR = imapserver.FIXTURE_DIR
CYRUS_ROOT = os.environ.get("CYRUS_ROOT", os.path.join(REPO, "build-cyrus", "root"))
USER = imapserver.USER
ADMIN = "admin"
STATE_FILE = "server.json"
SERVERNAME = "localhost"
SYSLOG_PREFIX = "imapfs-test"

# What Cyrus 3.6.1 (Debian) advertises after login with this config, for
# capabilities= (suppress_capabilities takes what is to be hidden).
KNOWN_CAPABILITIES = (
    "IMAP4rev1 LITERAL+ ID ENABLE ACL ANNOTATE-EXPERIMENT-1 BINARY CATENATE CHILDREN CONDSTORE "
    "CREATE-SPECIAL-USE ESEARCH ESORT LIST-EXTENDED LIST-MYRIGHTS LIST-STATUS MAILBOX-REFERRALS "
    "METADATA MOVE MULTIAPPEND NAMESPACE OBJECTID PREVIEW QRESYNC QUOTA RIGHTS=kxten SAVEDATE "
    "SEARCH=FUZZY SORT SORT=DISPLAY SPECIAL-USE STATUS=SIZE THREAD=ORDEREDSUBJECT THREAD=REFERENCES "
    "UIDPLUS UNSELECT URLAUTH URLAUTH=BINARY WITHIN DIGEST=SHA1 LIST-METADATA NO_ATOMIC_RENAME SCAN "
    "SORT=MODSEQ SORT=UID THREAD=REFS X-CREATEDMODSEQ X-REPLICATION X-SIEVE-MAILBOX XLIST XMOVE "
    "COMPRESS=DEFLATE X-QUOTA=STORAGE X-QUOTA=MESSAGE X-QUOTA=X-ANNOTATION-STORAGE "
    "X-QUOTA=X-NUM-FOLDERS IDLE APPENDLIMIT=4294967295").split()
# never suppressed: without them the client could not work at all
ESSENTIAL_CAPABILITIES = {"IMAP4REV1", "STARTTLS", "LOGINDISABLED", "AUTH=PLAIN", "AUTH=LOGIN", "SASL-IR"}


class CyrusChecker(Checker):
    """imapserver.Checker with a FETCH parser that takes the items in any
    order: Cyrus answers ``FLAGS (...) UID n INTERNALDATE "..." RFC822.SIZE n``,
    while Checker.FETCH_META expects Dovecot's order (UID RFC822.SIZE
    INTERNALDATE FLAGS)."""

    ITEMS = {
        "uid": re.compile(rb"\bUID (\d+)"),
        "size": re.compile(rb"\bRFC822\.SIZE (\d+)"),
        "internaldate": re.compile(rb'\bINTERNALDATE "([^"]+)"'),
        "flags": re.compile(rb"\bFLAGS \(([^)]*)\)"),
    }

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
            found = {k: rx.search(line) for k, rx in self.ITEMS.items()}
            if not all(found.values()):
                raise ServerError(f"cannot parse FETCH line {line!r}")
            out[int(found["uid"].group(1))] = {
                "size": int(found["size"].group(1)),
                "internaldate": imapserver.parse_internaldate(found["internaldate"].group(1).decode()),
                "flags": set(found["flags"].group(1).decode().split()) - {"\\Recent"},
            }
        return out


def _reachable_by_others(path):
    """Every directory from / down to path lets others through (o+x)."""
    path = os.path.abspath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def cyrus_root():
    """The unpacked Cyrus, where Cyrus (running as nobody) can reach it.  A
    checkout under a private directory (mktemp -d makes 0700 ones) is not
    such a place: then the tree is mirrored once into /tmp."""
    if not os.path.isdir(CYRUS_ROOT) or _reachable_by_others(CYRUS_ROOT):
        return CYRUS_ROOT
    # The stamp scripts/fetch-cyrus writes last names the versions unpacked:
    # a tree without it is not finished (maybe being unpacked right now),
    # and a new one gets a mirror of its own.
    try:
        with open(os.path.join(CYRUS_ROOT, ".fetch-cyrus.done"), "rb") as f:
            tag = hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return CYRUS_ROOT
    mirror = f"/tmp/imapfs-cyrus-root-{os.getuid()}-{tag}"
    with one_at_a_time("imapfs-cyrus-root"):
        if not os.path.isfile(os.path.join(mirror, ".complete")):
            shutil.rmtree(mirror, ignore_errors=True)
            subprocess.run(["cp", "-a", CYRUS_ROOT, mirror], check=True)
            os.chmod(mirror, 0o755)
            open(os.path.join(mirror, ".complete"), "w").close()
    return mirror


@contextlib.contextmanager
def one_at_a_time(name):
    """Holds a lock shared by every test process of this user: parallel
    workers (pytest -n) must not unpack or mirror Cyrus into the same place
    at once."""
    with open(f"/tmp/{name}-{os.getuid()}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def multiarch():
    return "x86_64-linux-gnu" if os.uname().machine == "x86_64" else f"{os.uname().machine}-linux-gnu"


def cyrus_paths(root=None):
    root = root or cyrus_root()
    return {
        "root": root,
        "bin": os.path.join(root, "usr", "lib", "cyrus", "bin"),
        "master": os.path.join(root, "usr", "lib", "cyrus", "bin", "master"),
        "imapd": os.path.join(root, "usr", "lib", "cyrus", "bin", "imapd"),
        "idled": os.path.join(root, "usr", "lib", "cyrus", "bin", "idled"),
        "ctl_cyrusdb": os.path.join(root, "usr", "lib", "cyrus", "bin", "ctl_cyrusdb"),
        "saslpasswd2": os.path.join(root, "usr", "sbin", "saslpasswd2"),
        "libdir": os.path.join(root, "usr", "lib", multiarch()),
        "stamp": os.path.join(root, ".fetch-cyrus.done"),
    }


def available(root=None):
    """None if an unpacked Cyrus is ready, else why not (one line)."""
    p = cyrus_paths(root)
    for key in ("master", "imapd", "idled", "saslpasswd2"):
        if not os.access(p[key], os.X_OK):
            return f"{p[key]} not found: run scripts/fetch-cyrus"
    if not os.path.exists(p["stamp"]):
        return f"{p['root']} is incomplete (no .fetch-cyrus.done): run scripts/fetch-cyrus"
    return None


def cyrus_env(root=None):
    p = cyrus_paths(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYRUS_", "SASL_"))}
    env["LD_LIBRARY_PATH"] = p["libdir"] + (":" + os.environ["LD_LIBRARY_PATH"]
                                            if os.environ.get("LD_LIBRARY_PATH") else "")
    sasl = os.path.join(p["libdir"], "sasl2")
    if os.path.isdir(sasl) and any(f.endswith(".so") for f in os.listdir(sasl)):
        env["SASL_PATH"] = sasl       # libsasl2-modules unpacked (not installed)
    return env


def cyrus_version(root=None):
    p = cyrus_paths(root)
    try:
        with open(p["stamp"]) as f:
            for line in f:
                if line.startswith("cyrus-imapd "):
                    return line.split()[1]
    except OSError:
        pass
    return None


class CyrusServer(LocalServer):
    """One throwaway Cyrus.  start() / stop(); attributes describe it."""

    kind = "cyrus"
    NAME = "Cyrus"
    LOG_NAME = "cyrus.log"
    CONFIG_NAME = "imapd.conf"
    TAIL_FILES = ("supervisor.out", "master.log", "cyrus.log")
    DIR_PREFIX = "imapfs-test-cyrus."
    SELECTABLE_PARENTS = True   # see quirks["intermediate_folders_selectable"]

    def __init__(self, directory=None, host="127.0.0.1", capabilities=None,
                 separator="/", prefix="", fixture_dir=FIXTURE_DIR, seed=True,
                 tied_to_parent=False, root=None):
        if separator not in ("/", "."):
            raise ValueError("Cyrus knows only '/' (unixhierarchysep: yes) and '.' as separator")
        if prefix not in ("", "INBOX" + separator):
            raise ValueError(f"Cyrus's prefix is '' (altnamespace: yes) or 'INBOX{separator}'")
        super().__init__(directory, host, capabilities, separator, prefix, fixture_dir, seed,
                         tied_to_parent)
        self.root = os.path.abspath(root) if root else cyrus_root()
        self.admin = ADMIN
        self.admin_password = None
        # self.pid is the supervisor's (it starts and stops master)
        self.version = cyrus_version(self.root)
        self.quirks = {
            # Cyrus 3.x creates a missing parent as a real (selectable,
            # empty) mailbox: CREATE Work/Projects makes Work too
            "intermediate_folders_selectable": True,
            # on the STARTTLS port: LOGINDISABLED until STARTTLS (also on 127.0.0.1)
            "logindisabled_before_starttls": True,
            "syslog_captured": os.geteuid() == 0,
            # capabilities=: these are added by Cyrus outside the list that
            # suppress_capabilities filters, so they stay advertised
            "unsuppressible_capabilities": ["COMPRESS=DEFLATE", "IDLE", "APPENDLIMIT=4294967295",
                                            "X-QUOTA=STORAGE", "X-QUOTA=MESSAGE",
                                            "X-QUOTA=X-ANNOTATION-STORAGE", "X-QUOTA=X-NUM-FOLDERS"],
            # after LOGIN on imaps, Cyrus 3.6 still lists LOGINDISABLED
            "logindisabled_after_login": True,
        }

    @property
    def cyrus_conf_path(self):
        return self.path("cyrus.conf")

    def env(self):
        return dict(super().env(), IMAP_SERVER="cyrus")

    def checker(self):
        return CyrusChecker(self.host, self.imaps_port, self.user, self.password, self.cafile)

    def admin_checker(self):
        return CyrusChecker(self.host, self.imaps_port, self.admin, self.admin_password, self.cafile)

    def user_mailbox(self):
        """alice's INBOX as the admin names it."""
        return f"user{self.separator}{self.user}"

    # -----------------------------------------------------------------
    def _run_as(self):
        """(user, group) Cyrus runs as: it refuses root."""
        if os.geteuid() != 0:
            return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        nobody = pwd.getpwnam("nobody")
        return "nobody", grp.getgrgid(nobody.pw_gid).gr_name

    def _secret(self, name):
        path = self.path(name)
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        value = secrets.token_hex(12)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        return value

    def _write_files(self):
        p = cyrus_paths(self.root)
        os.makedirs(self.dir, exist_ok=True)
        run_user, run_group = self._run_as()
        uid, gid = pwd.getpwnam(run_user).pw_uid, grp.getgrnam(run_group).gr_gid
        if os.geteuid() == 0:
            os.chmod(self.dir, 0o711)
            parent = os.path.dirname(self.dir)
            while parent != "/":
                if not os.stat(parent).st_mode & 0o001:
                    raise ServerError(
                        f"{parent} is not searchable by others, but Cyrus (running as {run_user}) "
                        f"needs to reach {self.dir}: use a directory under /tmp")
                parent = os.path.dirname(parent)
            # and the unpacked programs must be reachable by that user too
            d = self.root
            while d != "/":
                if not os.stat(d).st_mode & 0o001:
                    raise ServerError(f"{d} is not searchable by others; Cyrus runs as {run_user} "
                                      f"and must reach {self.root}")
                d = os.path.dirname(d)
        # what Debian's cyrus-makedirs would make in configdirectory
        owned = ("config", "config/db", "config/socket", "config/log", "config/msg",
                 "config/proc", "config/lock", "config/user", "config/quota", "config/ptclient",
                 "config/sync", "spool", "run", "run/socket", "run/proc", "run/lock", "sieve")
        for sub in owned:
            os.makedirs(self.path(sub), exist_ok=True)
        os.makedirs(self.path("dev"), exist_ok=True)
        os.chmod(self.path("dev"), 0o755)

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

        self.password = self._secret("password")
        self.admin_password = self._secret("admin-password")

        # the sasldb: made anew each time from the two password files
        sasldb = self.path("sasldb2")
        if os.path.exists(sasldb):
            os.unlink(sasldb)
        for user, password in ((self.user, self.password), (self.admin, self.admin_password)):
            r = subprocess.run([p["saslpasswd2"], "-f", sasldb, "-u", SERVERNAME, "-p", "-c", user],
                               input=password + "\n", text=True, env=cyrus_env(self.root),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if r.returncode != 0 or not os.path.exists(sasldb):
                raise ServerError(f"saslpasswd2 failed ({r.returncode}): {r.stdout.strip()}")

        if os.geteuid() == 0:
            for item in owned + ("sasldb2", "key.pem"):
                os.chown(self.path(item), uid, gid)

        suppress = ""
        if self.capabilities:
            wanted = {c.upper() for c in self.capabilities.replace("+", " ").split()}
            hidden = [c for c in KNOWN_CAPABILITIES
                      if c.upper() not in wanted and c.upper() not in ESSENTIAL_CAPABILITIES]
            suppress = "suppress_capabilities: " + " ".join(hidden) + "\n"

        conf = f"""# Generated by tests/integration/cyrusserver.py -- a throwaway test server.
configdirectory: {self.path('config')}
partition-default: {self.path('spool')}
defaultpartition: default
proc_path: {self.path('run', 'proc')}
mboxname_lockpath: {self.path('run', 'lock')}
lmtpsocket: {self.path('run', 'socket', 'lmtp')}
idlesocket: {self.path('run', 'socket', 'idle')}
notifysocket: {self.path('run', 'socket', 'notify')}
sievedir: {self.path('sieve')}
servername: {SERVERNAME}
syslog_prefix: {SYSLOG_PREFIX}
cyrus_user: {run_user}
cyrus_group: {run_group}
admins: {self.admin}
virtdomains: off
unixhierarchysep: {'yes' if self.separator == '/' else 'no'}
altnamespace: {'yes' if self.prefix == '' else 'no'}
hashimapspool: no
delete_mode: immediate
expunge_mode: immediate
umask: 077
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {sasldb}
sasl_mech_list: PLAIN LOGIN
allowplaintext: no
allowanonymouslogin: no
tls_server_cert: {self.path('cert.pem')}
tls_server_key: {self.path('key.pem')}
tls_session_timeout: 0
imapidlepoll: 2
{suppress}"""
        with open(self.config_path, "w") as f:
            f.write(conf)

        c = f"-C {self.config_path}"
        cyrus_conf = f"""# Generated by tests/integration/cyrusserver.py -- a throwaway test server.
START {{
  recover cmd="{p['ctl_cyrusdb']} {c} -r"
}}
SERVICES {{
  imap  cmd="{p['imapd']} {c}" listen="{self.host}:{self.imap_port}" prefork=0 maxchild=200
  imaps cmd="{p['imapd']} {c} -s" listen="{self.host}:{self.imaps_port}" prefork=0 maxchild=200
}}
EVENTS {{
}}
DAEMON {{
  idled cmd="{p['idled']} {c}"
}}
"""
        with open(self.cyrus_conf_path, "w") as f:
            f.write(cyrus_conf)

    def master_argv(self):
        p = cyrus_paths(self.root)
        return [p["master"], "-C", self.config_path, "-M", self.cyrus_conf_path,
                "-p", self.path("run", "master.pid"), "-D", "-L", self.path("master.log")]

    def _state_extra(self):
        return dict(kind=self.kind, root=self.root)

    @classmethod
    def _init_kwargs(cls, state):
        return dict(root=state.get("root"))

    def _attach(self, state):
        with open(self.path("admin-password")) as f:
            self.admin_password = f.read().strip()

    # -----------------------------------------------------------------
    def _check_available(self):
        why = available(self.root)
        if why:
            raise ServerError(f"Cyrus IMAP is not available: {why}")

    def _spawn(self):
        for name in ("cyrus.log", "master.log"):
            open(self.path(name), "ab").close()
        log = open(self.path("supervisor.out"), "ab")
        try:
            return subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "_supervise", self.dir],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, env=cyrus_env(self.root),
                preexec_fn=die_with_parent if self.tied_to_parent else None)
        finally:
            log.close()

    def _probe(self):
        return self.admin_checker()     # the admin logs in: SASL works

    def _after_start(self):
        """The admin creates alice's INBOX (Cyrus has no autocreate here)."""
        with self.admin_checker() as admin:
            typ, data = admin.imap.create(imap_quote(self.user_mailbox()))
            if typ != "OK" and b"already exists" not in b" ".join(d or b"" for d in data).lower():
                raise ServerError(f"CREATE {self.user_mailbox()} as admin: {typ} {data!r}")

    def stop(self, timeout=20):
        """Stop the server we started (by its recorded pid).  Removes nothing."""
        super().stop(timeout)
        # the supervisor stops master; should it have been killed first, stop
        # master by the pid it recorded (only if it is still our master)
        _stop_master_by_pidfile(self.path("run", "master.pid"), self.config_path, timeout)

    # -----------------------------------------------------------------
    LOGIN_LINE = re.compile(
        r"(?P<ident>[\w.-]+)/(?P<service>[\w-]+)\[\d+\]: login: (?P<host>\S+) \[(?P<rip>[^\]]*)\] "
        r"(?P<user>\S+) (?P<mech>[^\s+]+)(?P<tls>\+TLS)?")

    def logins_since(self, offset):
        """Cyrus's 'login:' lines after byte offset, rewritten to the shape of
        Dovecot's (see the module doc); the original line is kept at the end."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        ports = {"imap": self.imap_port, "imaps": self.imaps_port}
        out = []
        for line in text.splitlines():
            m = self.LOGIN_LINE.search(line)
            if not m:
                continue
            lport = ports.get(m.group("service"), "?")
            security = "TLS" if m.group("tls") else "secured"
            out.append(f"imap-login: Info: Login: user=<{m.group('user')}>, method={m.group('mech')}, "
                       f"rip={m.group('rip')}, lport={lport}, {security}, (cyrus: {line.strip()})")
        return out


# --------------------------------------------------------------------------
# master's pid file, as a last resort

def _stop_master_by_pidfile(pidfile, config_path, timeout=20):
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if not _pid_alive(pid) or config_path.encode() not in _cmdline(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# the supervisor: python3 cyrusserver.py _supervise DIR

# device nodes Cyrus and OpenSSL use; bound into the namespace's private /dev
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")

NAMESPACE_SCRIPT = imapserver.DETACH_COPIED_FUSE_MOUNTS + r"""
set -e
dev=$1; shift
for n in {nodes}; do
    [ -e "/dev/$n" ] || continue
    : > "$dev/$n"
    mount --bind "/dev/$n" "$dev/$n"
done
for l in fd stdin stdout stderr; do
    [ -L "$dev/$l" ] || ln -s "$(readlink /dev/$l)" "$dev/$l"
done
mkdir -p "$dev/shm"
mount --rbind /dev/shm "$dev/shm"
mount --rbind "$dev" /dev
exec "$@"
""".format(nodes=" ".join(DEV_NODES))


def _supervise(directory):
    """Start master (in a private mount namespace with our own /dev/log when
    root), copy syslog datagrams into DIR/cyrus.log, stop master on SIGTERM."""
    srv = CyrusServer.from_dir(directory)
    argv = srv.master_argv()
    logfile = open(srv.log_path, "ab", buffering=0)
    sock = None
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("mount"):
        devdir = srv.path("dev")
        for name in os.listdir(devdir):
            p = os.path.join(devdir, name)
            if os.path.islink(p) or not os.path.isdir(p):
                os.unlink(p)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(devdir, "log"))
        os.chmod(os.path.join(devdir, "log"), 0o666)
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", NAMESPACE_SCRIPT, "sh", devdir] + argv
    stopping = []

    def on_term(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_term)
    master = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
    print(f"supervisor {os.getpid()}: master pid {master.pid}: {' '.join(argv[-9:])}", flush=True)

    def drain(wait):
        if sock is None:
            time.sleep(wait)
            return
        r, _, _ = select.select([sock], [], [], wait)
        while r:
            data = sock.recv(65536)
            # "<PRI>Mmm dd hh:mm:ss ident[pid]: message"
            line = re.sub(rb"^<\d+>", b"", data).rstrip(b"\0\n")
            logfile.write(line + b"\n")
            r, _, _ = select.select([sock], [], [], 0)

    status = None
    while status is None:
        if stopping:
            master.terminate()
            try:
                status = master.wait(15)
            except subprocess.TimeoutExpired:
                master.kill()
                status = master.wait()
            status = 0
            break
        try:
            drain(0.2)
        except InterruptedError:
            pass
        status = master.poll()
    try:
        drain(0)
    except OSError:
        pass
    if status:
        print(f"supervisor: master exited with status {status}", flush=True)
    return 0 if stopping else (status if status else 1)


def main(argv):
    """python3 cyrusserver.py run [--dir D] [--separator /|.] [--prefix P] [--capabilities C] [--no-seed]:
    start a seeded Cyrus, print its shell variables, stop it on Ctrl-C."""
    import argparse
    ap = argparse.ArgumentParser(prog="cyrusserver.py", description=main.__doc__)
    ap.add_argument("cmd", choices=["run"])
    ap.add_argument("--dir")
    ap.add_argument("--separator", default="/", choices=["/", "."])
    ap.add_argument("--prefix", default="")
    ap.add_argument("--capabilities")
    ap.add_argument("--no-seed", action="store_true")
    args = ap.parse_args(argv)
    srv = CyrusServer(args.dir, separator=args.separator, prefix=args.prefix,
                      capabilities=args.capabilities, seed=not args.no_seed, tied_to_parent=True)
    try:
        srv.start()
        for key, value in srv.env().items():
            print(f"{key}={value}")
        print(f"# Cyrus up in {srv.start_seconds:.2f} s; log: {srv.log_path}; Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        while srv.running():
            time.sleep(0.5)
        print("Cyrus stopped by itself:\n" + srv._tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        srv.stop()
        if not args.dir:
            srv.remove()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_supervise":
        sys.exit(_supervise(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
