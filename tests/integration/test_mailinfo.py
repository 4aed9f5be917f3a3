"""Envelope xattrs: user.mail.subject, user.mail.from, user.mail.date, user.mime_type.

What a user is promised (fs/mailinfo.c, the issue):

* ``user.mail.subject``: the Subject, RFC 2047 encoded-words decoded to UTF-8;
* ``user.mail.from``: the first From address, ``Name <box@host>`` (the name
  decoded likewise), or ``box@host`` without a name;
* ``user.mail.date``: the Date header's text;
* ``user.mime_type``: ``message/rfc822``;
* ``listxattr`` names them all; reading them never sets \\Seen.

Expected values come from the independent client's ``UID FETCH (ENVELOPE)``
(imaplib), decoded with Python's email.header, and for a few fixtures also
from the fixture text itself.
"""

import email.header
import errno
import os
import re
import subprocess
import time

import pytest

import imapserver
from fsutil import errno_of

FIELDS = ("subject", "from", "date")

FIXTURES = ["INBOX/001.eml", "INBOX/006.eml", "INBOX/008.eml", "INBOX/009.eml", "INBOX/012.eml",
            "Entwürfe/001.eml", "Lists/notmuch/150.eml", "Sent Items/003.eml",
            "Archive/2023/002.eml", "Work/Projects/003.eml"]

# Known answers, straight from the fixture files
KNOWN = {
    "INBOX/006.eml": {"subject": "Grüße aus Köln – raw UTF-8 header",
                      "from": "Jürgen Beispiel <juergen@example.de>",
                      "date": "Thu, 07 Mar 2024 12:00:00 +0100"},
    "INBOX/008.eml": {"subject": "Café résumé ☕",
                      "from": "Dave Placeholder <dave@example.com>",
                      "date": "Sat, 09 Mar 2024 21:03:00 +0000"},
    "INBOX/009.eml": {"subject": "Have you ever seen a zebracorn?",
                      "from": "Bob Beispiel <bob@example.net>",
                      "date": "Sun, 10 Mar 2024 06:59:59 -0800"},
    "Entwürfe/001.eml": {"subject": "Entwurf: Antwort an Jürgen",
                         "from": "Alice Example <alice@example.org>"},
}

# Tricky headers appended to a server of our own: (headers, expected subject, expected from)
TRICKY = [
    ("Subject: =?ISO-8859-1?Q?Gr=FC=DFe?= =?ISO-8859-1?Q?_aus_K=F6ln?=\r\n"
     "From: =?ISO-8859-1?Q?J=F6rg_M=FCller?= <joerg@example.org>\r\n",
     "Grüße aus Köln", "Jörg Müller <joerg@example.org>"),
    ("Subject: =?utf-8?b?8J+QnyBGaXNo?=\r\nFrom: plain@example.org\r\n",
     "🐟 Fish", "plain@example.org"),
    ("Subject: Re: =?UTF-8?Q?caf=C3=A9?= time\r\nFrom: \"Doe, Jane\" <jane@example.org>\r\n",
     "Re: café time", "Doe, Jane <jane@example.org>"),
    ("Subject: =?windows-1252?Q?=93quoted=94_words?=\r\n"
     "From: =?UTF-8?B?w4Vzc2Egw5ZzdGVy?= <asa@example.se>, Other <o@example.org>\r\n",
     "“quoted” words", "Åssa Öster <asa@example.se>"),
    ("Subject: a subject that is long enough\r\n to be folded onto a second line\r\n"
     "From: Folded Name\r\n <folded@example.org>\r\n",
     "a subject that is long enough to be folded onto a second line",
     "Folded Name <folded@example.org>"),
]


# --------------------------------------------------------------------------
# ENVELOPE from the independent client

def _parse(buf, i):
    """One value of an IMAP response at buf[i:] -> (value, next index)."""
    while buf[i:i + 1] in (b" ", b"\r", b"\n"):
        i += 1
    c = buf[i:i + 1]
    if c == b"(":
        items, i = [], i + 1
        while True:
            while buf[i:i + 1] in (b" ", b"\r", b"\n"):
                i += 1
            if buf[i:i + 1] == b")":
                return items, i + 1
            value, i = _parse(buf, i)
            items.append(value)
    if c == b'"':
        out, i = bytearray(), i + 1
        while buf[i:i + 1] != b'"':
            if buf[i:i + 1] == b"\\":
                i += 1
            out += buf[i:i + 1]
            i += 1
        return bytes(out), i + 1
    if c == b"{":
        end = buf.index(b"}", i)
        n = int(buf[i + 1:end].rstrip(b"+"))
        start = end + 3                       # "}\r\n"
        assert buf[end + 1:start] == b"\r\n"
        return buf[start:start + n], start + n
    m = re.compile(rb"[^\s()\"]+").match(buf, i)
    atom = m.group(0)
    return (None if atom == b"NIL" else atom), m.end()


def fetch_envelopes(checker, raw_folder, uids):
    """{uid: envelope as nested lists of bytes/None}."""
    checker.examine(raw_folder)
    typ, data = checker.imap.uid("FETCH", ",".join(map(str, uids)), "(UID ENVELOPE)")
    assert typ == "OK", data
    buf = b""
    for item in data:
        if isinstance(item, tuple):
            buf += item[0] + b"\r\n" + item[1]
        elif item:
            buf += item + b"\r\n"
    out, i = {}, 0
    while buf[i:].strip():
        _, i = _parse(buf, i)               # message sequence number
        attrs, i = _parse(buf, i)
        d = dict(zip(attrs[::2], attrs[1::2]))
        out[int(d[b"UID"])] = d[b"ENVELOPE"]
    return out


def decode_text(value):
    if value is None:
        return ""
    text = value.decode("utf-8").replace("\r\n", "")
    return str(email.header.make_header(email.header.decode_header(text)))


def expected_fields(envelope):
    date, subject, from_list = envelope[0], envelope[1], envelope[2]
    sender = ""
    if from_list:
        name, _, box, host = from_list[0]
        addr = (box or b"").decode() + ("@" + host.decode() if host else "")
        name = decode_text(name)
        sender = f"{name} <{addr}>" if name else addr
    return {"subject": decode_text(subject), "from": sender,
            "date": (date or b"").decode("utf-8")}


def xattr(path, name):
    return os.getxattr(path, name).decode("utf-8")


# --------------------------------------------------------------------------
# the shared, seeded server


@pytest.fixture(scope="module")
def envelopes(server, checker):
    """{fixture rel path: (raw folder, uid, expected fields)}."""
    out = {}
    by_folder = {}
    for rel in FIXTURES:
        seeded = server.seeded["messages"][rel]
        by_folder.setdefault(seeded["folder"], []).append((rel, seeded["uid"]))
    for raw_folder, items in by_folder.items():
        envs = fetch_envelopes(checker, raw_folder, [uid for _, uid in items])
        for rel, uid in items:
            out[rel] = (raw_folder, uid, expected_fields(envs[uid]))
    return out


@pytest.mark.parametrize("rel", FIXTURES)
def test_envelope_xattrs_match_the_server(rel, mount, envelopes):
    raw_folder, uid, want = envelopes[rel]
    path = mount.message_path(raw_folder, "/", uid)
    got = {field: xattr(path, f"user.mail.{field}") for field in FIELDS}
    assert got == want, f"{rel} ({raw_folder}/{uid}.eml)"
    for field, value in KNOWN.get(rel, {}).items():
        assert got[field] == value, f"{rel}: user.mail.{field}"
    assert xattr(path, "user.mime_type") == "message/rfc822"


def test_getfattr_tool_and_listxattr(mount, envelopes):
    raw_folder, uid, want = envelopes["INBOX/008.eml"]
    path = mount.message_path(raw_folder, "/", uid)
    names = set(os.listxattr(path))
    assert {"user.mail.subject", "user.mail.from", "user.mail.date",
            "user.mime_type"} <= names, names
    for name in names:
        os.getxattr(path, name)            # every listed name can be read
    r = subprocess.run(["getfattr", "--only-values", "-n", "user.mail.subject", path],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode("utf-8") == "Café résumé ☕"
    r = subprocess.run(["getfattr", "-d", "-m", "-", "-e", "text", path], capture_output=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    dump = r.stdout.decode("utf-8")
    assert 'user.mail.from="Dave Placeholder <dave@example.com>"' in dump, dump
    assert 'user.mime_type="message/rfc822"' in dump, dump


def test_no_envelope_xattrs_on_folders_and_unknown_names(mount):
    inbox = os.path.join(mount.mountpoint, "INBOX")
    for name in ("user.mail.subject", "user.mail.from", "user.mail.date"):
        assert errno_of(os.getxattr, inbox, name) == errno.ENODATA, name
    msg = os.path.join(inbox, "1.eml")
    assert errno_of(os.getxattr, msg, "user.mail.to") == errno.ENODATA
    assert errno_of(os.getxattr, msg, "user.mail.") == errno.ENODATA
    # a buffer too small: ERANGE, as for any xattr
    r = subprocess.run(["python3", "-c", "import ctypes,sys,errno;"
                        "libc=ctypes.CDLL(None,use_errno=True);"
                        "b=ctypes.create_string_buffer(3);"
                        "n=libc.getxattr(sys.argv[1].encode(),b'user.mail.subject',b,3);"
                        "print(n, ctypes.get_errno())", msg], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.split() == ["-1", str(errno.ERANGE)], r.stdout + r.stderr


def test_reading_xattrs_leaves_flags_alone(mount, server, checker, server_state):
    for rel in ("INBOX/006.eml", "Lists/notmuch/290.eml", "Archive/2023/005.eml"):
        seeded = server.seeded["messages"][rel]
        path = mount.message_path(seeded["folder"], "/", seeded["uid"])
        for field in FIELDS:
            xattr(path, f"user.mail.{field}")
    for raw_folder in ("INBOX", "Lists/notmuch", "Archive/2023"):
        assert checker.flags(raw_folder) == \
            {u: m["flags"] for u, m in server_state["messages"][raw_folder].items()}, raw_folder


# --------------------------------------------------------------------------
# a server of our own: tricky headers, new mail, writes


@pytest.fixture(scope="module")
def own_server(request):
    """Folder Tricky: 1.eml plain, then one message per TRICKY entry."""
    srv = imapserver.FastServer(tied_to_parent=True, seed=False)
    request.addfinalizer(lambda: (srv.stop(), srv.remove()))
    srv.start()
    with srv.checker() as c:
        c._ok(*c.imap.create("Tricky"), "CREATE")
        append(c, "Tricky", b"From: First <first@example.org>\r\nSubject: first\r\n"
                            b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\nx\r\n")
        srv.tricky_uids = []
        for i, (headers, _, _) in enumerate(TRICKY):
            data = (headers + f"Date: Tue, 0{i + 1} Apr 2024 10:00:00 +0200\r\n"
                    f"Message-ID: <tricky{i}@imapfs.test>\r\n\r\nbody {i}\r\n").encode()
            srv.tricky_uids.append(append(c, "Tricky", data))
    return srv


def append(c, folder, data):
    resp = c._ok(*c.imap.append(folder, "()", None, data), "APPEND")
    return int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))


def test_tricky_headers(mounter, own_server):
    """ISO-8859-1 and windows-1252 encoded-words, adjacent encoded-words,
    lower-case base64, no display name, a quoted name with a comma, a second
    From address, folded headers."""
    srv = own_server
    m = mounter(server=srv)
    folder = os.path.join(m.mountpoint, "Tricky")
    with srv.checker() as c:
        envs = fetch_envelopes(c, "Tricky", srv.tricky_uids)
    problems = []
    for (headers, subject, sender), uid in zip(TRICKY, srv.tricky_uids):
        path = os.path.join(folder, f"{uid}.eml")
        want = expected_fields(envs[uid])
        assert want["subject"] == subject and want["from"] == sender, \
            f"the checker's own decoding disagrees with the test: {want}"
        got = {}
        for field in FIELDS:
            try:
                got[field] = xattr(path, f"user.mail.{field}")
            except OSError as e:
                got[field] = f"<{errno.errorcode.get(e.errno, e.errno)}>"
        if got != want:
            problems.append(f"{uid}.eml ({headers.splitlines()[0]!r}): got {got}, want {want}")
    assert not problems, "\n".join(problems)


def test_mail_that_came_later_has_its_xattrs_at_once(mounter, own_server):
    """After the folder's envelopes were fetched, a new message: as soon as
    it is listed, getfattr gives its subject (not ENODATA)."""
    srv = own_server
    m = mounter(server=srv, options=mounter.default_options(srv) + ["dir_cache_timeout=1"])
    folder = os.path.join(m.mountpoint, "Tricky")
    assert xattr(os.path.join(folder, "1.eml"), "user.mail.subject") == "first"
    with srv.checker() as c:
        uid = append(c, "Tricky", b"From: Late <late@example.org>\r\nSubject: came later\r\n"
                                  b"Date: Wed, 01 May 2024 10:00:00 +0000\r\n\r\nx\r\n")
    listed = time.monotonic()
    deadline = listed + 10
    while f"{uid}.eml" not in os.listdir(folder):
        assert time.monotonic() < deadline, "the new message is not listed"
        time.sleep(0.1)
    path = os.path.join(folder, f"{uid}.eml")
    e = errno_of(os.getxattr, path, "user.mail.subject")
    if e == 0:
        assert xattr(path, "user.mail.subject") == "came later"
        return
    # how long until it shows, for the report
    while errno_of(os.getxattr, path, "user.mail.subject") and time.monotonic() < deadline:
        time.sleep(0.2)
    raise AssertionError(
        f"getfattr user.mail.subject on a listed new message: {errno.errorcode.get(e, e)}; "
        f"it worked {time.monotonic() - listed:.1f}s later")


def test_envelope_xattrs_are_read_only(mounter, own_server):
    srv = own_server
    m = mounter(server=srv)
    path = os.path.join(m.mountpoint, "Tricky", "1.eml")
    before = xattr(path, "user.mail.subject")
    results = {}
    for name in ("user.mail.subject", "user.mail.from", "user.mail.date", "user.mime_type"):
        results[f"set {name}"] = errno_of(os.setxattr, path, name, b"changed")
        results[f"remove {name}"] = errno_of(os.removexattr, path, name)
    assert xattr(path, "user.mail.subject") == before
    with srv.checker() as c:
        assert fetch_envelopes(c, "Tricky", [1])[1][1] == b"first"
    wrong = {k: errno.errorcode.get(v, v) for k, v in results.items() if v != errno.EPERM}
    assert not wrong, f"want EPERM (read-only, like user.imap.uid): {wrong}"
