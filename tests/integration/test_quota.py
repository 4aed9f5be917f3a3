"""Quota in df: statfs reports the STORAGE resource of GETQUOTAROOT INBOX.

imapfs(1): "statfs (df): The STORAGE quota of GETQUOTAROOT INBOX, asked at
most once a minute; without QUOTA, made-up large figures."  So ``df -k``
shows size = the limit, used = the usage (both in KiB, the unit of IMAP's
STORAGE), available = limit - usage.  The expected figures come from the
independent client's own GETQUOTAROOT (imaplib).

A Dovecot of its own with the quota plugin (imapserver.py
``quota_storage_kib``), started empty: messages are added by the tests.
Because imapfs asks at most once a minute, a change is checked with a fresh
mount, and the old mount is checked not to ask again.

statfs never waits for the server: grep -r, find and du call it in every
directory they enter, and a scan's first read must not queue behind a new
connection (at a 50 ms round trip that was a quarter of a second before
grep read anything).  The quota is asked at mount; with every connection
busy (tests/integration/fakeimap.py holds them), df still answers at once,
with the quota from the mount, or the large figures without QUOTA.
"""

import os
import re
import subprocess
import sys
import time

import pytest

import imapserver

sys.path.insert(0, os.path.dirname(__file__))
from fakeimap import STALL, CRLF, Mailbox, simple_message  # noqa: E402
from test_hostile import rig  # noqa: E402,F401 (the fixture)

LIMIT_KIB = 4096


@pytest.fixture(scope="module")
def quota_server(request):
    srv = imapserver.FastServer(tied_to_parent=True, seed=False, quota_storage_kib=LIMIT_KIB)
    request.addfinalizer(lambda: (srv.stop(), srv.remove()))
    srv.start()
    for i in range(3):
        append(srv, message(f"quota-seed-{i}", 20000))
    return srv


def message(tag, size):
    return (f"From: Quota <quota@example.org>\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@imapfs.test>\r\n\r\n").encode() + \
        b"".join(b"%-76d\r\n" % i for i in range(size // 78 + 1))


def append(srv, data):
    with srv.checker() as c:
        c._ok(*c.imap.append("INBOX", "()", None, data), "APPEND")


def server_quota(srv):
    """(usage KiB, limit KiB) of STORAGE from GETQUOTAROOT INBOX."""
    with srv.checker() as c:
        typ, data = c.imap.getquotaroot("INBOX")
        assert typ == "OK", data
        quotas = data[1]
        assert len(quotas) == 1, f"one quota root expected: {data}"
        m = re.search(rb"\(.*STORAGE (\d+) (\d+)", quotas[0])
        assert m, data
        return int(m.group(1)), int(m.group(2))


def df_k(path):
    """(size, used, avail) in 1K blocks, as df -k prints them."""
    r = subprocess.run(["df", "-k", "--output=size,used,avail", path], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout
    return tuple(int(x) for x in lines[1].split())


def quota_asks(log):
    return len(re.findall(r"C: \S+ GETQUOTAROOT", log))


def test_df_shows_the_quota(mounter, quota_server):
    used, limit = server_quota(quota_server)
    assert limit == LIMIT_KIB and used > 50, (used, limit)
    m = mounter(server=quota_server, extra_args=["-d"])
    assert df_k(m.mountpoint) == (limit, used, limit - used)
    st = os.statvfs(m.mountpoint)
    assert st.f_blocks * st.f_frsize == limit * 1024
    assert (st.f_blocks - st.f_bfree) * st.f_frsize == used * 1024
    assert st.f_bavail * st.f_frsize == (limit - used) * 1024


def test_df_after_new_mail_fresh_mount_and_at_most_one_ask_a_minute(mounter, quota_server):
    m1 = mounter(server=quota_server, extra_args=["-d"])
    before = df_k(m1.mountpoint)
    used0, limit = server_quota(quota_server)
    assert before == (limit, used0, limit - used0)

    append(quota_server, message("quota-new", 100000))
    used1, limit1 = server_quota(quota_server)
    assert used1 >= used0 + 97, (used0, used1)

    # a fresh mount sees the new usage
    m2 = mounter(server=quota_server)
    assert df_k(m2.mountpoint) == (limit1, used1, limit1 - used1)

    # the first mount asked once, however often df is run within the minute
    for _ in range(5):
        df_k(m1.mountpoint)
    assert quota_asks(m1.log()) == 1, \
        f"GETQUOTAROOT sent {quota_asks(m1.log())} times within a minute"


def test_df_without_quota_large_and_no_error(mounter, server):
    """The shared test server has no quota: df works and shows large figures."""
    m = mounter()
    size, used, avail = df_k(m.mountpoint)
    assert size >= 1 << 30, f"df size {size} KiB: want a large made-up figure"
    assert avail >= 1 << 30 and used <= size
    st = os.statvfs(m.mountpoint)
    assert st.f_blocks >= st.f_bfree >= st.f_bavail > 0
    assert m.log().split("\n", 1)[1].strip() == "", f"imapfs said something:\n{m.log()}"
    r = subprocess.run(["df", "-h", m.mountpoint], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("quota", [True, False], ids=["QUOTA", "no QUOTA"])
def test_df_does_not_wait_for_a_busy_server(rig, quota):
    """Both connections of the mount are held by reads the fake never
    answers; df must answer within a second, not wait the timeout (10 s)
    for a connection."""
    srv = rig.server(mailboxes=[Mailbox("INBOX", messages=[simple_message(1)]),
                                Mailbox("Other", messages=[simple_message(1, folder="Other")])],
                     capabilities=("IMAP4rev1", "QUOTA") if quota else ("IMAP4rev1",))
    srv.on("GETQUOTAROOT", lambda conn, cmd: [
        b'* QUOTAROOT "INBOX" ""' + CRLF, b'* QUOTA "" (STORAGE 100 1000)' + CRLF,
        cmd.ok("GETQUOTAROOT completed")])
    m = rig.mounted(srv, connections=2, timeout=10)
    srv.on("UID FETCH", lambda conn, cmd: [STALL] if conn.is_body_fetch(cmd) else None)
    readers = [subprocess.Popen(["cat", m.path(folder, "1.eml")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for folder in ("INBOX", "Other")]
    try:
        deadline = time.monotonic() + 10
        while len({i for i, _, name, raw in srv.commands
                   if name == "UID FETCH" and b"BODY" in raw.upper()}) < 2:
            assert time.monotonic() < deadline, f"the reads did not reach the server:\n{m.log()}"
            time.sleep(0.05)
        t = time.monotonic()
        st = os.statvfs(m.mountpoint)
        elapsed = time.monotonic() - t
        assert elapsed < 1.0, f"statfs took {elapsed:.1f}s with every connection busy"
        if quota:   # asked once, at mount
            assert (st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize) == \
                (1000 * 1024, 900 * 1024), (st.f_blocks, st.f_bfree, st.f_frsize)
            assert [name for _, _, name, _ in srv.commands].count("GETQUOTAROOT") == 1
        else:
            assert st.f_blocks * st.f_frsize >= 1 << 40 and st.f_bavail > 0, st
            assert "GETQUOTAROOT" not in [name for _, _, name, _ in srv.commands]
    finally:
        srv.release_stalls()
        for p in readers:
            p.wait(30)
    m.finish()
