"""Named accounts from the config file, fstab mounts through mount(8), the
man page.

* Config accounts: ``imapfs -f -o config=PATH ACCOUNT MOUNTPOINT`` through
  the rig's ``mounter`` (so the clean unmount and exit 0 are checked as for
  every mount), that the command line's -o overrides the file, that options
  of the file really apply, and the clear one-line failures (unknown account,
  a file others may write, bad lines named FILE:LINE).
* fstab: a test fstab mounted with ``mount -T FSTAB MOUNTPOINT``, which runs
  the real /sbin/mount.fuse3, which runs ``imapfs SOURCE MOUNTPOINT -o ...``
  found by the shell.  mount(8) clears PATH before it runs a helper, so a
  temp bin dir on PATH cannot work; the shell then searches its default path,
  whose first entry is /usr/local/sbin.  The test therefore runs in a private
  mount namespace of its own in which a temp dir holding an ``imapfs``
  symlink to the binary under test is bind-mounted over /usr/local/sbin:
  nothing outside that namespace changes, and when its last process ends
  every mount in it is gone too.  The daemon (which detaches) is reaped by
  this process, made a child subreaper for the time of the test, so its exit
  status is checked like the rig's.
* The man page: renders, and names every -o option of ``imapfs --help``.
"""

import ctypes
import errno
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import imapserver
from conftest import Mount, is_mounted, fusermount_u, _unescape_mountinfo

REPO = imapserver.REPO
MAN_PAGE = os.path.join(REPO, "fs", "imapfs.1")
EXIT_TIMEOUT = 30


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path, monkeypatch):
    """Any persistent cache of these mounts goes under the test's tmp dir,
    not the home directory of whoever runs the tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# --------------------------------------------------------------------------
# helpers

def write_config(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def account_text(server, name="work", **keys):
    """A config file section for the session server; keys override, None drops."""
    values = {"url": f"imaps://{server.user}@{server.host}:{server.imaps_port}",
              "password_file": server.password_file, "cafile": server.cafile}
    values.update(keys)
    lines = [f"[{name}]"] + [f"{k} = {v}" if v is not True else k
                             for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def wrong_cafile(tmp_path):
    """A real CA bundle that does not trust the test server's certificate."""
    system = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.exists(system):
        return system
    path = tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=other",
                    "-keyout", str(tmp_path / "other-key.pem"), "-out", str(path)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(path)


def run_imapfs(imapfs, args, tmp_path, env=None, timeout=20):
    """imapfs -f ARGS... expected to fail before mounting: (status, stderr lines).
    If it mounts after all, it is unmounted and the test fails."""
    mp = tmp_path / "failmnt"
    mp.mkdir(exist_ok=True)
    env = dict(os.environ if env is None else env)
    env.pop("IMAPFS_PASSWORD", None)
    p = subprocess.Popen([imapfs, "-f"] + args + [str(mp)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, preexec_fn=imapserver.die_with_parent)
    try:
        out, err = p.communicate(timeout=timeout)
        status = p.returncode
    except subprocess.TimeoutExpired:
        status = None
    finally:
        mounted = is_mounted(str(mp))
        if mounted and fusermount_u(str(mp)).returncode != 0:
            fusermount_u(str(mp), lazy=True)
        if p.poll() is None:
            p.kill()
            out, err = p.communicate()
    assert not mounted, "imapfs mounted although it should have failed"
    assert status is not None, "imapfs still running after 20 s"
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    return status, lines


def expect_one_line_failure(imapfs, args, tmp_path, *fragments, env=None):
    status, lines = run_imapfs(imapfs, args, tmp_path, env=env)
    assert status == 1, f"exit status {status}; stderr: {lines}"
    assert len(lines) == 1, f"want one line on stderr, got {lines}"
    assert lines[0].startswith("imapfs: "), lines
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------
# config accounts

def test_account_mounts_and_command_line_overrides_the_file(mounter, server, checker, tmp_path):
    """The file names a CA bundle that does not trust the server: mounting
    the account fails; the same account with -o cafile= on the command line
    mounts, and the file's other options (password_file, ro, noatime) apply."""
    config = write_config(tmp_path / "config", "# accounts\n; of the test\n\n" + account_text(
        server, cafile=wrong_cafile(tmp_path), ro=True, noatime="yes", connections=2,
        dir_cache_timeout="12.5", cache_size='"64M"'))
    # the file alone: its cafile is used, and TLS verification fails
    status, lines = run_imapfs(mounter.imapfs, ["-o", f"config={config}", "work"], tmp_path)
    assert status == 1 and len(lines) == 1 and lines[0].startswith("imapfs: "), (status, lines)

    m = mounter(url="work", options=[f"config={config}", f"cafile={server.cafile}"])
    options = _mount_options(m.mountpoint)
    assert "ro" in options, f"ro from the config file not applied: {options}"
    assert "noatime" in options, f"noatime (a FUSE option) from the config file not applied: {options}"
    path = m.message_path("INBOX", "/", 1)
    with open(path, "rb") as f:
        assert f.read() == checker.body("INBOX", 1)
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(m.mountpoint, "NewFolder"))
    assert e.value.errno == errno.EROFS
    m.unmount()


def test_command_line_ro_and_file_flag_off(mounter, server, tmp_path):
    """`ro = no` in the file leaves ro off; -o ro on the command line adds it."""
    config = write_config(tmp_path / "config", account_text(server, ro="no"))
    m = mounter(url="work", options=[f"config={config}"], name="rw")
    assert "ro" not in _mount_options(m.mountpoint)
    m.unmount()
    m = mounter(url="work", options=[f"config={config}", "ro"], name="ro")
    assert "ro" in _mount_options(m.mountpoint)
    m.unmount()


def _mount_options(mountpoint):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape_mountinfo(fields[4]) == mountpoint:
                return fields[5].split(",")
    raise AssertionError(f"{mountpoint} not mounted")


def test_default_config_file_and_mountpoint_from_the_file(mounter, server, tmp_path):
    """$XDG_CONFIG_HOME/imapfs/config, with no -o config, and `mountpoint =`
    in the file when the command line names none."""
    xdg = tmp_path / "xdg"
    (xdg / "imapfs").mkdir(parents=True)
    mp = tmp_path / "from-file"
    write_config(xdg / "imapfs" / "config",
                 account_text(server, name="other", url="imaps://nobody@127.0.0.1:1") +
                 account_text(server, name="home", mountpoint=str(mp)))
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg))
    env.pop("IMAPFS_PASSWORD", None)

    class AccountOnly(Mount):
        @property
        def argv(self):
            return [self.binary, "-f", self.url]

    m = AccountOnly(mounter.imapfs, "home", str(mp), str(tmp_path / "home.log"), env=env)
    mounter.mounts.append(m)         # cleaned up by the fixture whatever happens
    m.start()
    assert "INBOX" in os.listdir(mp)
    m.unmount()


def test_unknown_account(imapfs, server, tmp_path):
    config = write_config(tmp_path / "config", account_text(server, name="work") +
                          account_text(server, name="home"))
    line = expect_one_line_failure(imapfs, ["-o", f"config={config}", "wrok"], tmp_path,
                                   "wrok", str(config))
    assert "work" in line and "home" in line, "the message should list the accounts there are"


def test_missing_config_file(imapfs, tmp_path):
    missing = tmp_path / "nothing" / "config"
    expect_one_line_failure(imapfs, ["-o", f"config={missing}", "work"], tmp_path,
                            str(missing), "work")
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "empty-xdg"))
    expect_one_line_failure(imapfs, ["work"], tmp_path,
                            str(tmp_path / "empty-xdg" / "imapfs" / "config"), env=env)


@pytest.mark.parametrize("mode", [0o666, 0o602, 0o620], ids=oct)
def test_config_writable_by_others_is_refused(mode, imapfs, server, tmp_path):
    """password_cmd runs a command: a file someone else may change is refused
    (and the command in it is not run)."""
    canary = tmp_path / "canary"
    config = write_config(tmp_path / "config", account_text(
        server, password_file=None, password_cmd=f"touch {canary}; cat {server.password_file}"),
        mode=mode)
    assert os.stat(config).st_mode & 0o777 == mode
    expect_one_line_failure(imapfs, ["-o", f"config={config}", "work"], tmp_path,
                            str(config), "writable")
    assert not canary.exists(), "password_cmd of a refused config file was run"


def test_config_password_cmd_is_used(mounter, server, tmp_path):
    """The control for the test above: the same file, 0600, mounts and runs
    its password_cmd."""
    canary = tmp_path / "canary"
    config = write_config(tmp_path / "config", account_text(
        server, password_file=None, password_cmd=f"touch {canary}; cat {server.password_file}"))
    m = mounter(url="work", options=[f"config={config}"])
    assert canary.exists()
    assert "INBOX" in os.listdir(m.mountpoint)
    m.unmount()


BAD_FILES = {
    "typo in a key": ("[work]\nurl = imaps://a@b\nconections = 2\n", 3, "conections"),
    "not a number": ("[work]\nurl = imaps://a@b\n\nconnections = many\n", 4, "connections"),
    "key before any section": ("# hi\nurl = imaps://a@b\n[work]\n", 2, "url"),
    "key twice": ("[work]\nurl = imaps://a@b\nro\nro = yes\n", 4, "ro"),
    "unclosed section": ("[work]\nurl = imaps://a@b\n[home\n", 3, "["),
    "value missing": ("[work]\nurl = imaps://a@b\npassword_file =\n", 3, "password_file"),
    "flag with a value": ("[work]\nurl = imaps://a@b\nallow_other = maybe\n", 3, "allow_other"),
    "typo in another account": ("[work]\nurl = imaps://a@b\n[home]\ntimeuot = 3\n", 4, "timeuot"),
    "config in a config": ("[work]\nurl = imaps://a@b\nconfig = /etc/x\n", 3, "config"),
    "url without scheme": ("[work]\nurl = a@b\n", 2, "url"),
    "no url": ("[work]\nro\n", 1, "url"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_lines_name_file_and_line(case, imapfs, tmp_path):
    text, lineno, fragment = BAD_FILES[case]
    config = write_config(tmp_path / "config", text)
    expect_one_line_failure(imapfs, ["-o", f"config={config}", "work"], tmp_path,
                            f"{config}:{lineno}:", fragment)


def test_fstab_noise_is_ignored(mounter, server):
    """Options that mean something to mount(8) and systemd only, passed
    straight to imapfs (libfuse would refuse them as unknown)."""
    noise = ["_netdev", "nofail", "noauto", "auto", "user", "nouser", "users", "owner", "group",
             "defaults", "comment=systemd.automount", "x-systemd.automount",
             "x-systemd.requires=network-online.target", "x-gvfs-show"]
    m = mounter(options=mounter.default_options() + [",".join(noise)])
    assert "INBOX" in os.listdir(m.mountpoint)
    m.unmount()


def test_url_form_ignores_the_config_file(mounter, server, tmp_path):
    """With a URL, no config file is read, even a refused one."""
    config = write_config(tmp_path / "config", "garbage\n", mode=0o666)
    m = mounter(options=mounter.default_options() + [f"config={config}"])
    m.unmount()


# --------------------------------------------------------------------------
# fstab through mount(8) and mount.fuse3

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on):
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0


class Namespace:
    """A private mount namespace, held open by a `sleep` (tied to us), with
    bindir bind-mounted over /usr/local/sbin.  run() runs a command in it."""

    def __init__(self, bindir):
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             imapserver.DETACH_COPIED_FUSE_MOUNTS +
             'mount --bind "$1" /usr/local/sbin && echo ready && exec sleep 3600', "sh", bindir],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=imapserver.die_with_parent)
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            self.proc.kill()
            _, err = self.proc.communicate()
            self.error = err.decode(errors="replace").strip()
            self.proc = None
        else:
            self.error = None

    def run(self, *cmd, env=None, timeout=60):
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "--"] + list(cmd),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, timeout=timeout)

    def mount_entry(self, mountpoint):
        text = self.run("cat", "/proc/self/mountinfo").stdout.decode()
        for line in text.splitlines():
            left, right = line.split(" - ", 1)
            fields = left.split()
            if _unescape_mountinfo(fields[4]) == mountpoint:
                rfields = right.split()
                return {"options": fields[5].split(","), "fstype": rfields[0],
                        "source": _unescape_mountinfo(rfields[1])}
        return None

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc:
            self.proc.stdout.close()
            self.proc.stderr.close()


def _daemons(binary, mountpoint):
    """pids of processes running binary whose argv names mountpoint."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.path.realpath(f"/proc/{entry}/exe") != binary:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if mountpoint.encode() in argv:
            found.append(int(entry))
    return found


def _reap(pid, timeout):
    """Exit status of our child pid, or None if it is still running after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


@pytest.fixture
def namespace(imapfs, tmp_path):
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("unshare/nsenter (util-linux) not installed")
    bindir = tmp_path / "sbin"
    bindir.mkdir()
    os.symlink(imapfs, bindir / "imapfs")
    ns = Namespace(str(bindir))
    if ns.error is not None:
        pytest.skip(f"cannot make a private mount namespace here: {ns.error}")
    if not _set_subreaper(True):
        ns.close()
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) not available")
    try:
        yield ns
    finally:
        _set_subreaper(False)
        ns.close()


def _fstab_escape(value):
    return value.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


@pytest.mark.parametrize("form", ["url", "account"])
def test_fstab_mount_and_umount(form, namespace, imapfs, server, checker, tmp_path):
    binary = os.path.realpath(imapfs)
    mp = str(tmp_path / "mail")
    os.mkdir(mp)
    # a password file whose path has a space: written \040 in fstab
    spaced = tmp_path / "pass word"
    spaced.mkdir()
    password_file = spaced / "password"
    shutil.copyfile(server.password_file, password_file)
    password_file.chmod(0o600)
    if form == "url":
        source = f"imaps://{server.user}@{server.host}:{server.imaps_port}"
        options = f"password_file={_fstab_escape(str(password_file))},cafile={server.cafile}"
    else:
        config = write_config(tmp_path / "imapfs.conf",
                              account_text(server, password_file=str(password_file)))
        # imapfs:NAME, since mount(8) turns a bare NAME into a path when a
        # file of that name exists where it runs (here: /work)
        source = "imapfs:work"
        options = f"config={config}"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# test fstab\n"
        f"{source} {_fstab_escape(mp)} fuse.imapfs "
        f"noauto,user,_netdev,nofail,x-systemd.automount,{options} 0 0\n")
    env = {k: v for k, v in os.environ.items() if k != "IMAPFS_PASSWORD"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")     # any persistent cache stays here
    daemons = []
    try:
        r = namespace.run("mount", "-T", str(fstab), mp, env=env)
        assert r.returncode == 0, f"mount -T failed ({r.returncode}): {r.stderr.decode()}"
        # mount(8) returned: imapfs has detached after logging in and mounting
        entry = namespace.mount_entry(mp)
        assert entry is not None, "mount -T returned 0 but nothing is mounted"
        assert entry["fstype"] == "fuse.imapfs", entry
        assert not is_mounted(mp), "the mount leaked out of the private namespace"
        daemons = _daemons(binary, mp)
        assert len(daemons) == 1, f"want one imapfs daemon for {mp}, found {daemons}"
        with open(f"/proc/{daemons[0]}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert argv[:3] == ["imapfs", source, mp], f"not started by mount.fuse3 as expected: {argv}"
        with open(f"/proc/{daemons[0]}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid == os.getpid(), "the detached daemon was not reparented to this subreaper"

        listing = namespace.run("ls", "-1", mp).stdout.decode().split("\n")
        assert "INBOX" in listing and "Lists" in listing, listing
        body = namespace.run("cat", os.path.join(mp, "INBOX", "1.eml"))
        assert body.returncode == 0, body.stderr
        assert body.stdout == checker.body("INBOX", 1)

        r = namespace.run("umount", mp)
        assert r.returncode == 0, f"umount failed: {r.stderr.decode()}"
        assert namespace.mount_entry(mp) is None
        status = _reap(daemons[0], EXIT_TIMEOUT)
        assert status is not None, f"imapfs daemon {daemons[0]} still running after umount"
        daemons = []
        assert status == 0, f"imapfs daemon exited with status {status} after umount"
        assert not _daemons(binary, mp)
    finally:
        if namespace.mount_entry(mp) is not None:
            namespace.run("umount", "-l", mp)
        for pid in daemons:
            if _reap(pid, 5) is None:
                os.kill(pid, signal.SIGTERM)
                if _reap(pid, 5) is None:
                    os.kill(pid, signal.SIGKILL)
                    _reap(pid, 5)


def test_fstab_mount_failure_is_reported(namespace, imapfs, server, tmp_path):
    """Without the CA, the login fails: mount(8) fails with imapfs's one
    line, and nothing is mounted or left running."""
    binary = os.path.realpath(imapfs)
    mp = str(tmp_path / "mail")
    os.mkdir(mp)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"imaps://{server.user}@{server.host}:{server.imaps_port} {mp} fuse.imapfs "
                     f"noauto,_netdev,password_file={server.password_file} 0 0\n")
    try:
        r = namespace.run("mount", "-T", str(fstab), mp)
        assert r.returncode != 0, "mount succeeded without the CA file"
        err = r.stderr.decode()
        assert re.search(r"^imapfs: .*(certificate|verify|TLS)", err, re.M | re.I), err
        assert namespace.mount_entry(mp) is None
        time.sleep(0.2)
        assert not _daemons(binary, mp)
    finally:
        if namespace.mount_entry(mp) is not None:
            namespace.run("umount", "-l", mp)


# --------------------------------------------------------------------------
# the man page

def _help_options(imapfs):
    r = subprocess.run([imapfs, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stdout
    usage = r.stdout.split("FUSE options:")[0]
    names = set(re.findall(r"^\s+-o ([a-z_]+)", usage, re.M))
    assert {"password_file", "cafile", "connections", "ro", "config"} <= names, names
    return names


def test_man_page_covers_every_option(imapfs):
    with open(MAN_PAGE, encoding="utf-8") as f:
        page = f.read()
    missing = [name for name in sorted(_help_options(imapfs))
               if not re.search(r'\\-o ' + re.escape(name) + r'\b', page)]
    assert not missing, f"options of --help not in {MAN_PAGE} (as .B \"\\-o NAME...\"): {missing}"
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILE OPERATIONS",
                    "SYNCHRONISATION", "FILES", "ENVIRONMENT", "EXIT STATUS", "EXAMPLES",
                    "SECURITY", "SEE ALSO"):
        assert re.search(r"^\.SH \"?" + section + r"\"?$", page, re.M), f"no section {section}"


def test_man_page_renders(tmp_path):
    groff = shutil.which("groff")
    if not groff:
        pytest.skip("groff not installed")
    r = subprocess.run([groff, "-man", "-ww", "-z", MAN_PAGE], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = subprocess.run([groff, "-man", "-Tutf8", MAN_PAGE], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    text = re.sub(r".\x08", "", r.stdout.decode("utf-8", "replace"))
    assert "mount an IMAP account as a directory tree" in text
    assert "BODY.PEEK[]" in text and "fuse.imapfs" in text
