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
"""

import os
import re
import subprocess

import pytest

import imapserver

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
