"""The read-only mount: what imapfs shows must be exactly what the server holds.

Every expectation is taken from the server through an independent client
(imaplib, see imapserver.Checker) or from the fixture manifest, never from
imapfs itself.  The tests of this module share one mount (``mount``) and do
not change the account; tests that need their own mount use ``mounter``, and
tests that try to write do it on a ``scratch_server`` of their own.
"""

import base64
import email.utils
import errno
import os
import re
import stat
import subprocess
import time

import pytest

import imapserver
from fsutil import errno_of
from conftest import is_mounted, mount_entry, fusermount_u, snapshot


# --------------------------------------------------------------------------
# helpers

def folder_parts(raw, delimiter):
    return imapserver.mutf7_decode(raw).split(delimiter)


def expected_tree(state):
    """{relative dir path ('' = root): set of entry names} from the server's LIST and FETCH."""
    tree = {"": set()}
    delim = state["delimiter"]
    for _, _, raw, _ in state["folders"]:
        parts = folder_parts(raw, delim)
        for i in range(len(parts)):
            parent = "/".join(parts[:i])
            tree.setdefault(parent, set()).add(parts[i])
            tree.setdefault("/".join(parts[:i + 1]), set())
    for raw, msgs in state["messages"].items():
        tree["/".join(folder_parts(raw, delim))].update(f"{uid}.eml" for uid in msgs)
    return tree


def all_messages(mount, state):
    """[(raw folder, uid, path on the mount, server meta)]"""
    out = []
    for raw, msgs in state["messages"].items():
        for uid, meta in sorted(msgs.items()):
            out.append((raw, uid, mount.message_path(raw, state["delimiter"], uid), meta))
    return out


def total_messages(state):
    return sum(len(m) for m in state["messages"].values())


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def server_changes(checker, state):
    """What differs on the server from an earlier snapshot, as readable lines."""
    changes = []
    before = {raw for _, _, raw, _ in state["folders"]}
    now = {raw for _, _, raw, _ in checker.list_folders()}
    changes += [f"folder {raw!r} appeared" for raw in sorted(now - before)]
    changes += [f"folder {raw!r} disappeared" for raw in sorted(before - now)]
    for raw, msgs in state["messages"].items():
        if raw not in now:
            continue
        uids = set(checker.messages(raw))
        changes += [f"{raw}: UID {uid} appeared" for uid in sorted(uids - set(msgs))]
        changes += [f"{raw}: UID {uid} disappeared" for uid in sorted(set(msgs) - uids)]
    return changes


# --------------------------------------------------------------------------
# the mount itself

def test_mount_is_fuse_imapfs(mount):
    entry = mount_entry(mount.mountpoint)
    assert entry is not None
    assert entry["fstype"] == "fuse.imapfs", entry


def test_threads_are_named_for_what_they_do(mount):
    """top -H and perf show which part of the daemon does the work."""
    names = set()
    for task in os.listdir(f"/proc/{mount.proc.pid}/task"):
        with open(f"/proc/{mount.proc.pid}/task/{task}/comm") as f:
            names.add(f.read().strip())
    for name in ("imapfs-readahd", "imapfs-diskwr", "imapfs-watcher", "imapfs-notify"):
        assert name in names, sorted(names)


def test_aborted_connection_ends_the_daemon_cleanly(mounter):
    """An administrator's abort (/sys/fs/fuse/connections/N/abort, what one
    does to a mount that hangs) ends the daemon with status 0 and no word of
    a failure.  As with any FUSE file system, the mount point then answers
    ENOTCONN until fusermount3 -u, which must succeed."""
    m = mounter()
    assert os.listdir(m.mountpoint)
    connections = "/sys/fs/fuse/connections"
    mounted_fusectl = not os.listdir(connections)   # systemd mounts it; a bare VM may not
    if mounted_fusectl:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", connections], check=True)
    try:
        abort = os.path.join(connections, str(os.minor(os.stat(m.mountpoint).st_dev)), "abort")
        with open(abort, "w") as f:
            f.write("1")
    finally:
        if mounted_fusectl:
            subprocess.run(["umount", connections], check=True)
    try:
        status = m.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"imapfs still running 10 s after the abort; log:\n{m.log()}")
    assert status == 0, f"exit status {status}; log:\n{m.log()}"
    assert "fuse:" not in m.log() and "error" not in m.log().lower(), m.log()
    assert errno_of(os.listdir, m.mountpoint) == errno.ENOTCONN
    r = fusermount_u(m.mountpoint)
    assert r.returncode == 0, r.stdout
    assert not is_mounted(m.mountpoint)


def test_fixture_shape_on_server(server_state):
    """Guards the rig: the account looks like the tests below assume."""
    names = {dec for _, _, _, dec in server_state["folders"]}
    for want in ("INBOX", "Lists/notmuch", "Lists/dovecot", "Archive/2023", "Archive/2024",
                 "Work", "Work/Projects", "Entwürfe", "Sent Items"):
        assert want in names
    assert server_state["delimiter"] == "/"
    assert len(server_state["messages"]["Lists/notmuch"]) == 300
    assert total_messages(server_state) == 351


# --------------------------------------------------------------------------
# folders

def test_every_folder_is_a_directory(mount, server_state):
    for flags, delim, raw, _ in server_state["folders"]:
        path = mount.folder_path(raw, delim)
        assert os.path.isdir(path), f"folder {raw!r} missing at {path}"


def test_decoded_folder_names(mount):
    root = set(os.listdir(mount.mountpoint))
    assert "Entwürfe" in root
    assert "Entw&APw-rfe" not in root
    assert "Sent Items" in root
    assert os.path.isdir(os.path.join(mount.mountpoint, "Entwürfe"))
    assert os.path.isdir(os.path.join(mount.mountpoint, "Sent Items"))
    assert sorted(os.listdir(os.path.join(mount.mountpoint, "Entwürfe"))) == ["1.eml", "2.eml"]


def test_noselect_parent_holds_only_subdirectories(mount, server_state):
    noselect = [raw for flags, _, raw, _ in server_state["folders"] if "\\Noselect" in flags]
    assert "Work" in noselect
    for raw in noselect:
        path = mount.folder_path(raw, server_state["delimiter"])
        entries = os.listdir(path)
        assert entries, f"{path} is empty"
        for name in entries:
            assert stat.S_ISDIR(os.lstat(os.path.join(path, name)).st_mode), f"{name} in {path}"
    assert os.listdir(os.path.join(mount.mountpoint, "Work")) == ["Projects"]


def test_directory_listings_are_exact(mount, server_state):
    """Each directory holds exactly its child folders and UID.eml per message."""
    for rel, want in expected_tree(server_state).items():
        path = os.path.join(mount.mountpoint, rel)
        assert set(os.listdir(path)) == want, f"listing of /{rel}"


# --------------------------------------------------------------------------
# messages

def test_message_bytes_and_sizes_equal_the_server(mount, server_state, checker):
    checked = 0
    for raw, msgs in server_state["messages"].items():
        bodies = checker.bodies(raw) if msgs else {}
        assert set(bodies) == set(msgs)
        for uid, meta in msgs.items():
            path = mount.message_path(raw, server_state["delimiter"], uid)
            size = os.stat(path).st_size
            data = read_file(path)
            assert data == bodies[uid], f"{path}: bytes differ from BODY.PEEK[]"
            assert size == meta["size"] == len(data), f"{path}: st_size {size}, RFC822.SIZE {meta['size']}"
            checked += 1
    assert checked == total_messages(server_state)


def test_special_messages_with_cat_and_cmp(mount, server_state, checker, tmp_path):
    """cat and cmp over the interesting fixtures: attachment, LF-only, CRLF, 8-bit header."""
    for uid in (3, 4, 5, 6, 10, 11):
        path = mount.message_path("INBOX", "/", uid)
        want = checker.body("INBOX", uid)
        got = subprocess.run(["cat", path], stdout=subprocess.PIPE, check=True).stdout
        assert got == want, f"cat {path}"
        ref = tmp_path / f"{uid}.server"
        ref.write_bytes(want)
        r = subprocess.run(["cmp", str(ref), path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert r.returncode == 0, r.stdout
    big = checker.body("INBOX", 3)
    assert len(big) > 50000 and b"Content-Transfer-Encoding: base64" in big
    assert b"\r\n" in checker.body("INBOX", 4)          # LF-only fixture, CRLF on the wire
    assert "Grüße".encode() in read_file(mount.message_path("INBOX", "/", 6))


def test_partial_and_offset_reads(mount, checker):
    path = mount.message_path("INBOX", "/", 3)
    want = checker.body("INBOX", 3)
    with open(path, "rb", buffering=0) as f:
        assert f.read(10) == want[:10]
        f.seek(40000)
        assert f.read(4096) == want[40000:44096]
        f.seek(len(want) - 5)
        assert f.read(100) == want[-5:]
        assert f.read(100) == b""
        assert os.pread(f.fileno(), 1000, len(want) + 10) == b""


def test_mtime_is_internaldate(mount, server_state):
    for raw, uid, path, meta in all_messages(mount, server_state):
        assert int(os.stat(path).st_mtime) == meta["internaldate"], path


def test_mtime_is_not_the_date_header(mount, server):
    """INBOX/009.eml has an INTERNALDATE different from its Date: header."""
    seeded = server.seeded["messages"]["INBOX/009.eml"]
    with open(os.path.join(imapserver.FIXTURE_DIR, "INBOX", "009.eml"), "rb") as f:
        date = re.search(rb"^Date: (.*?)\r?$", f.read(), re.M).group(1).decode()
    header_time = int(email.utils.parsedate_to_datetime(date).timestamp())
    st = os.stat(mount.message_path("INBOX", "/", seeded["uid"]))
    assert header_time != seeded["internaldate"]
    assert int(st.st_mtime) == seeded["internaldate"]


def test_modes_and_owner(mount, server_state):
    uid, gid = os.getuid(), os.getgid()
    for rel in expected_tree(server_state):
        st = os.stat(os.path.join(mount.mountpoint, rel))
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700, f"/{rel}: {oct(st.st_mode)}"
        assert (st.st_uid, st.st_gid) == (uid, gid), f"/{rel}"
    for raw, _, path, _ in all_messages(mount, server_state):
        st = os.stat(path)
        assert stat.S_ISREG(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{path}: {oct(st.st_mode)}"
        assert (st.st_uid, st.st_gid) == (uid, gid), path


def test_flags_xattr_matches_the_server(mount, server_state, checker):
    """getfattr user.imap.flags (read side only; setting flags is a later issue)."""
    for raw in ("INBOX", "Work/Projects", "Archive/2024"):
        flags = checker.flags(raw)
        for uid, want in flags.items():
            path = mount.message_path(raw, "/", uid)
            got = os.getxattr(path, "user.imap.flags").decode()
            assert set(got.split()) == want, f"{path}: {got!r}, server {want}"
            assert os.getxattr(path, "user.imap.uid").decode() == str(uid)
    assert "user.imap.flags" in os.listxattr(mount.message_path("INBOX", "/", 1))
    r = subprocess.run(["getfattr", "-d", "-m", "-", mount.message_path("INBOX", "/", 12)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0 and "$Label1" in r.stdout, r.stdout


def test_unknown_names_are_enoent(mount):
    for rel in ("INBOX/99999.eml", "INBOX/foo", "foo", "NoSuchFolder/1.eml", "Work/1.eml"):
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(mount.mountpoint, rel))
    with pytest.raises(FileNotFoundError):
        open(os.path.join(mount.mountpoint, "INBOX", "99999.eml"), "rb")


# --------------------------------------------------------------------------
# shell tools

def test_ls_lR(mount, server_state):
    r = subprocess.run(["ls", "-lR", mount.mountpoint], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    files = [line for line in r.stdout.splitlines() if re.match(r"^-rw------- .* \d+\.eml$", line)]
    assert len(files) == total_messages(server_state)


def test_find_counts_every_message(mount, server_state):
    r = subprocess.run(f"find '{mount.mountpoint}' -name '*.eml' | wc -l", shell=True,
                       stdout=subprocess.PIPE, text=True, check=True, timeout=120)
    assert int(r.stdout) == total_messages(server_state)


def test_grep_finds_exactly_the_zebracorns(mount, server, server_state, checker):
    r = subprocess.run(["grep", "-rl", "zebracorn", mount.mountpoint], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = set(r.stdout.splitlines())
    # expected from the manifest ...
    manifest = imapserver.load_manifest()
    by_manifest = set()
    for rel in manifest["grep"]["zebracorn"]:
        m = server.seeded["messages"][rel]
        by_manifest.add(mount.message_path(m["folder"], "/", m["uid"]))
    # ... and from the server's bytes
    by_server = set()
    for raw, msgs in server_state["messages"].items():
        if msgs:
            for uid, body in checker.bodies(raw).items():
                if b"zebracorn" in body:
                    by_server.add(mount.message_path(raw, "/", uid))
    assert by_manifest == by_server
    assert found == by_server


# --------------------------------------------------------------------------
# reading leaves the server alone

def test_reading_does_not_change_flags(mount, server, server_state, checker):
    before = {raw: checker.flags(raw) for raw in server_state["messages"]}
    for _, _, path, _ in all_messages(mount, server_state):
        read_file(path)
    after = {raw: checker.flags(raw) for raw in server_state["messages"]}
    assert after == before
    # and still what the fixtures set: unseen messages stay unseen
    unseen = 0
    for rel, m in server.seeded["messages"].items():
        assert after[m["folder"]][m["uid"]] == set(m["flags"]), rel
        unseen += "\\Seen" not in m["flags"]
    assert unseen > 10


def test_second_read_served_from_cache(mounter, server):
    """A re-read must not FETCH again.  Observed through the -d log; the page
    cache is dropped with posix_fadvise so the read reaches imapfs."""
    m = mounter(extra_args=["-d"])
    path = m.message_path("INBOX", "/", 3)
    body_fetch = re.compile(r"UID FETCH 3 .*BODY\.PEEK\[\]")   # the command imapfs sends
    fuse_read = re.compile(r"opcode: READ \(")                   # libfuse's debug line
    read_file(path)
    time.sleep(0.5)
    assert body_fetch.search(m.log()), "the first read did not fetch the body"
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    offset = len(m.log())
    read_file(path)
    time.sleep(0.5)
    later = m.log()[offset:]
    assert fuse_read.search(later), "the second read did not reach imapfs: nothing observed"
    assert not body_fetch.search(later), later[-3000:]
    m.unmount()


# --------------------------------------------------------------------------
# writes: -o ro refuses them


def _create(path):
    with open(path, "wb") as f:
        f.write(b"Subject: x\r\n\r\nx\r\n")


# -o ro must refuse every write.  (A default mount writes: see test_write.py.)
WRITE_MODES = {"ro": ["ro"]}


@pytest.mark.parametrize("mode", sorted(WRITE_MODES))
def test_writes_are_refused_with_erofs(mode, mounter, scratch_server):
    m = mounter(server=scratch_server, options=mounter.default_options(scratch_server) + WRITE_MODES[mode])
    mp = m.mountpoint
    with scratch_server.checker() as checker:
        state = snapshot(checker)
    p = lambda *parts: os.path.join(mp, *parts)  # noqa: E731
    attempts = [
        ("create INBOX/new.eml", _create, p("INBOX", "new.eml")),
        ("open INBOX/1.eml r+", lambda x: open(x, "r+b").close(), p("INBOX", "1.eml")),
        ("open INBOX/1.eml append", lambda x: open(x, "ab").close(), p("INBOX", "1.eml")),
        ("truncate INBOX/1.eml", os.truncate, p("INBOX", "1.eml"), 0),
        ("mkdir NewFolder", os.mkdir, p("NewFolder")),
        ("mkdir Lists/newlist", os.mkdir, p("Lists", "newlist")),
        ("rename INBOX/1.eml Archive/1.eml", os.rename, p("INBOX", "1.eml"), p("Archive", "1.eml")),
        ("rename INBOX/1.eml INBOX/x.eml", os.rename, p("INBOX", "1.eml"), p("INBOX", "x.eml")),
        ("rename Trash Bin", os.rename, p("Trash"), p("Bin")),
        ("setxattr user.imap.flags", os.setxattr, p("INBOX", "1.eml"), "user.imap.flags", b"\\Seen"),
        # last: if these wrongly succeed, the targets above would be gone
        ("unlink INBOX/1.eml", os.unlink, p("INBOX", "1.eml")),
        ("rmdir Trash", os.rmdir, p("Trash")),
    ]
    wrong = []
    for what, fn, *args in attempts:
        err = errno_of(fn, *args)
        if err != errno.EROFS:
            wrong.append(f"{what}: {os.strerror(err) if err else 'succeeded'}")
    with scratch_server.checker() as checker:
        changes = server_changes(checker, state)
    assert not wrong and not changes, \
        "not refused with EROFS:\n  " + "\n  ".join(wrong) + "\nchanged on the server:\n  " + "\n  ".join(changes)
    m.unmount()


@pytest.mark.parametrize("mode", sorted(WRITE_MODES))
def test_shell_writes_fail(mode, mounter, scratch_server):
    m = mounter(server=scratch_server, options=mounter.default_options(scratch_server) + WRITE_MODES[mode])
    mp = m.mountpoint
    with scratch_server.checker() as checker:
        state = snapshot(checker)
    wrong = []
    for cmd in (f"echo hi > '{mp}/INBOX/hi.eml'", f"mkdir '{mp}/Neu'",
                f"cp '{mp}/INBOX/2.eml' '{mp}/Trash/'", f"mv '{mp}/INBOX/2.eml' '{mp}/Trash/'",
                f"rm '{mp}/INBOX/3.eml'"):
        r = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode == 0 or "Read-only file system" not in r.stdout:
            wrong.append(f"{cmd} -> status {r.returncode}: {r.stdout.strip()}")
    with scratch_server.checker() as checker:
        changes = server_changes(checker, state)
    assert not wrong and not changes, \
        "not refused with EROFS:\n  " + "\n  ".join(wrong) + "\nchanged on the server:\n  " + "\n  ".join(changes)
    m.unmount()


# --------------------------------------------------------------------------
# other URLs and failures

def test_starttls_url_mounts(mounter, server, checker):
    offset = server.log_size()
    m = mounter(url=mounter.url("imap"))
    assert "INBOX" in os.listdir(m.mountpoint)
    assert read_file(m.message_path("INBOX", "/", 1)) == checker.body("INBOX", 1)
    m.unmount()
    # Dovecot on 127.0.0.1 would accept a login before STARTTLS (remote IP ==
    # local IP counts as secured), so check in its log that imapfs used TLS:
    logins = [line for line in server.logins_since(offset) if f"lport={server.imap_port}," in line]
    assert logins, "no login on the STARTTLS port in the server log"
    not_tls = [line for line in logins if ", TLS," not in line]
    assert not not_tls, not_tls


def test_imaps_url_uses_tls(server):
    """Sanity of the rig: the IMAPS logins of the checker show up as TLS."""
    offset = server.log_size()
    server.checker().close()
    time.sleep(0.2)
    logins = server.logins_since(offset)
    assert any(f"lport={server.imaps_port}," in line and ", TLS," in line for line in logins), logins


def _run_daemon(imapfs, argv_tail, tmp_path, timeout=20):
    """imapfs without -f.  Returns (status, stderr lines, seconds)."""
    mp = tmp_path / "mnt"
    mp.mkdir(exist_ok=True)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "IMAPFS_PASSWORD"}
    start = time.monotonic()
    with open(out, "wb") as o, open(err, "wb") as e:
        p = subprocess.Popen([imapfs] + argv_tail + [str(mp)], stdin=subprocess.DEVNULL,
                             stdout=o, stderr=e, env=env)
        try:
            status = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            status = None
    elapsed = time.monotonic() - start
    mounted = is_mounted(str(mp))
    if mounted:                      # it should not have; leave nothing behind
        if fusermount_u(str(mp)).returncode != 0:
            fusermount_u(str(mp), lazy=True)
    lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
    return status, lines, elapsed, mounted


@pytest.mark.parametrize("case", ["wrong-password", "untrusted-certificate", "closed-port"])
def test_mount_failure_is_quick_and_clear(case, imapfs, server, tmp_path):
    url = f"imaps://{server.user}@{server.host}:{server.imaps_port}"
    opts = ["-o", f"cafile={server.cafile}", "-o", f"password_file={server.password_file}"]
    if case == "wrong-password":
        bad = tmp_path / "wrong"
        bad.write_text("not-" + server.password + "\n")
        bad.chmod(0o600)
        opts = ["-o", f"cafile={server.cafile}", "-o", f"password_file={bad}"]
    elif case == "untrusted-certificate":
        opts = ["-o", f"password_file={server.password_file}"]
    elif case == "closed-port":
        url = f"imaps://{server.user}@{server.host}:{imapserver.free_port(server.host)}"
    status, lines, elapsed, mounted = _run_daemon(imapfs, opts + [url], tmp_path)
    assert not mounted, "imapfs mounted although it should have failed"
    assert status is not None, f"imapfs still running after 20 s; stderr: {lines}"
    assert status != 0
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert len(lines) == 1, f"want one line on stderr, got {lines}"
    assert lines[0].startswith("imapfs: "), lines
    assert server.password not in lines[0]


def test_password_not_in_debug_log(mounter, server):
    m = mounter(extra_args=["-d"])
    os.listdir(m.mountpoint)
    read_file(m.message_path("INBOX", "/", 1))
    os.listdir(os.path.join(m.mountpoint, "Lists", "notmuch"))
    m.unmount()
    log = m.log()
    assert re.search(r"LIST|FETCH|SELECT|EXAMINE", log), "-d log shows no IMAP traffic"
    login = re.compile(r'LOGIN +"?' + re.escape(server.user) + r'|AUTHENTICATE +[A-Z]')
    assert login.search(log), "-d log does not show the login command (redacted)"
    pw = server.password
    assert pw not in log
    for secret in (f"\0{server.user}\0{pw}", f"{server.user}\0{pw}"):
        assert base64.b64encode(secret.encode()).decode() not in log
    assert base64.b64encode(pw.encode()).decode() not in log


def test_help_and_version(imapfs):
    r = subprocess.run([imapfs, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stdout
    assert "imaps://" in r.stdout and "password_file" in r.stdout
    r = subprocess.run([imapfs, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stdout
    with open(os.path.join(imapserver.REPO, "meson.build")) as f:
        version = re.search(r"version\s*:\s*'([^']+)'", f.read()).group(1)
    assert version in r.stdout
