"""Provider quirks (issue 7), simulated with tests/integration/fakeimap.py.

* APPENDLIMIT: the server advertises ``APPENDLIMIT=1000``; copying a bigger
  file in fails in write() with EFBIG before anything is uploaded (the fake
  never sees an APPEND), a smaller one is stored with APPEND.
* ``-o max_download``: a daily budget of message bytes; once spent, reading
  a message that is not cached fails with EDQUOT and one log line says why,
  while messages already read (kept in memory: ``cache_dir=none``) still read.
* Gmail: one message in several label folders (``INBOX``, ``Work``,
  ``[Gmail]/All Mail``) under different UIDs shows in every place with the
  same bytes.  ``grep -rl`` therefore finds it three times: that is expected,
  IMAP gives no way to tell that three UIDs are one message.

* A server that refuses to expunge one message: a move by COPY and the
  redate of new mail (a time set on it) undo their second copy, so the
  message stays in one place, unflagged.

* A Courier-style namespace (``.``, ``INBOX.``) with a ``/`` inside a
  mailbox name: shown as ``%2F`` (Dovecot here refuses such a name, so
  test_shapes.py cannot make one).

Not here (covered elsewhere): an RFC822.SIZE that differs from the body
(test_hostile.py), servers that drop idle connections (test_restart.py).

fakeimap.py has no APPEND: the ``FakeIMAP.on("APPEND", ...)`` hook below
stores the literal in the mailbox and answers ``OK [APPENDUID v n]``; like
Dovecot and Gmail it refuses an empty message with NO.

Run: IMAPFS_BIN=build/imapfs /usr/bin/python3 -m pytest -v tests/integration/test_quirks.py
"""

import errno
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakeimap import CLOSE, CRLF, Mailbox, Message, simple_message  # noqa: E402
from test_hostile import assert_quick, probe, rig, run  # noqa: E402,F401 (rig: the fixture)


def sized_message(uid, size, folder="INBOX", word="filler"):
    """A CRLF message of exactly size bytes."""
    head = (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: message {uid}\r\n"
            f"Message-ID: <{uid}.{folder}@fake>\r\n\r\n").encode()
    line = (word + " " * 60)[:62].encode() + CRLF
    body = (line * (size // len(line) + 1))[:size - len(head) - 2] + CRLF
    data = head + body
    assert len(data) == size
    return data


def install_append(srv):
    """APPEND support for the fake: store the literal, answer APPENDUID."""
    appends = []

    def hook(conn, cmd):
        toks = cmd.tokens
        box = srv.mailbox(toks[0]) if toks else None
        if box is None:
            return [cmd.no("Mailbox doesn't exist", code="TRYCREATE")]
        data = toks[-1]
        if not data:    # as Dovecot and Gmail do
            appends.append((box.name, None, data))
            return [cmd.no("Can't save a zero byte message")]
        flags = []
        for t in toks[1:-1]:
            if isinstance(t, list):
                flags = [f.decode() for f in t]
        uid = box.uidnext
        box.messages.append(Message(uid, data, flags=flags))
        if box._uidnext is not None:
            box._uidnext = uid + 1
        appends.append((box.name, uid, data))
        return [cmd.ok("APPEND completed", code=f"APPENDUID {box.uidvalidity} {uid}")]

    srv.on("APPEND", hook)
    return appends


# --------------------------------------------------------------------------
# APPENDLIMIT

def test_appendlimit_refuses_big_files_before_upload(rig, tmp_path):
    box = Mailbox("INBOX", messages=[simple_message(1)])
    srv = rig.server(mailboxes=[box, Mailbox("Work", messages=[])],
                     capabilities=("IMAP4rev1", "UIDPLUS", "APPENDLIMIT=1000"))
    appends = install_append(srv)
    m = rig.mounted(srv)
    assert os.listdir(m.path("Work")) == []

    big = tmp_path / "big.eml"
    big.write_bytes(sized_message(100, 5000, word="big"))
    res = run(["cp", str(big), m.path("Work", "big.eml")])
    assert_quick(res, what="cp of 5000 bytes")
    assert res.rc != 0, f"cp of a 5000-byte file succeeded under APPENDLIMIT=1000: {res!r}"
    assert b"File too large" in res.err, res
    # the errno itself, from a plain write() of the same size
    p = run([sys.executable, "-S", "-c",
             "import os,sys\n"
             "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT,0o644)\n"
             "try:\n os.write(fd,b'x'*5000); print('ok')\n"
             "except OSError as e: print(e.errno)\n"
             "finally:\n"
             " try: os.close(fd)\n"
             " except OSError as e: print('close',e.errno)\n",
             m.path("Work", "big2.eml")])
    assert p.out.split()[0] == str(errno.EFBIG).encode(), p
    # Nothing of the file was uploaded.  imapfs does offer the file, now
    # empty, at release (fs/write.c: "a file closed without ever being
    # written is offered to the server at release; servers refuse empty
    # messages"): an APPEND of {0} is allowed, one carrying data is not.
    uploads = [raw for _, _, name, raw in srv.commands if name == "APPEND"]
    assert all(raw.endswith(b"{0}\r\n\r\n") or raw.endswith(b"{0+}\r\n\r\n")
               for raw in uploads), f"data was APPENDed despite APPENDLIMIT: {uploads}"
    assert all(not d for _, _, d in appends), appends
    assert srv.mailbox(b"Work").messages == []
    assert os.listdir(m.path("Work")) == []
    m.check_alive("after EFBIG")

    small = tmp_path / "small.eml"
    data = sized_message(101, 500, word="small")
    small.write_bytes(data)
    res = run(["cp", str(small), m.path("Work", "small.eml")])
    assert_quick(res, what="cp of 500 bytes")
    assert res.rc == 0, res
    stored = [(n, u, d) for n, u, d in appends if d]
    assert [(n, d) for n, _, d in stored] == [(b"Work", data)], appends
    uid = stored[0][1]
    assert run(["cat", m.path("Work", f"{uid}.eml")]).out == data
    m.finish()


# --------------------------------------------------------------------------
# max_download

BUDGET = 3000
MSG_SIZE = 1000


def body_bytes_served(srv):
    """Counts the message bytes the fake sends in BODY[] answers: [total]."""
    served = [0]

    def hook(conn, cmd):
        if conn.is_body_fetch(cmd) and conn.selected is not None:
            served[0] += sum(len(m.body) for _, m in conn.matched(cmd))
        return None

    srv.on("UID FETCH", hook)
    return served


def test_max_download_budget(rig):
    """One message per folder (imapfs reads ahead within a folder, see the
    next test): reads succeed until BUDGET bytes were fetched, then an
    uncached message fails with EDQUOT; what was read still reads."""
    uids = list(range(1, 11))
    bodies = {uid: sized_message(uid, MSG_SIZE, folder=f"F{uid:02d}") for uid in uids}
    boxes = [Mailbox("INBOX")] + [Mailbox(f"F{uid:02d}", messages=[Message(uid, bodies[uid])])
                                  for uid in uids]
    srv = rig.server(mailboxes=boxes)
    served = body_bytes_served(srv)
    m = rig.mounted(srv, options=[f"max_download={BUDGET}", "cache_dir=none"])
    path = lambda uid: m.path(f"F{uid:02d}", f"{uid}.eml")  # noqa: E731
    read_ok, failed = [], None
    for uid in uids:
        res = run(["cat", path(uid)])
        assert_quick(res, what=f"cat {path(uid)}")
        if res.rc == 0:
            assert res.out == bodies[uid], f"{path(uid)}: wrong bytes"
            read_ok.append(uid)
            continue
        failed = (uid, res)
        break
    assert failed is not None, f"all {len(uids)} messages ({len(uids) * MSG_SIZE} bytes) " \
                               f"read under max_download={BUDGET}: {served[0]} bytes fetched"
    uid, res = failed
    assert b"Disk quota exceeded" in res.err, res
    p = probe("read", path(uid))
    assert not p.ok and p.errno == errno.EDQUOT, p
    # the budget was used up, not (much) more: one message's worth of slack
    assert BUDGET <= len(read_ok) * MSG_SIZE <= BUDGET + MSG_SIZE, read_ok
    assert served[0] == len(read_ok) * MSG_SIZE, served[0]
    # what was read before still reads (cached), without fetching again
    for ok in read_ok:
        res = run(["cat", path(ok)])
        assert res.rc == 0 and res.out == bodies[ok], (ok, res)
    assert served[0] == len(read_ok) * MSG_SIZE, served[0]
    # listings and stat still work
    assert os.listdir(m.path(f"F{uids[-1]:02d}")) == [f"{uids[-1]}.eml"]
    assert os.stat(path(uids[-1])).st_size == MSG_SIZE
    # one clear log line, however many refused reads
    for later in uids[len(read_ok) + 1:]:
        assert run(["cat", path(later)]).rc != 0
    lines = [line for line in m.log().splitlines() if "max_download" in line]
    assert len(lines) == 1, m.log()
    assert "budget" in lines[0] and "used up" in lines[0], lines
    m.check_alive("after EDQUOT")
    m.finish()


def test_max_download_budget_bounds_read_ahead(rig):
    """With a budget, read-ahead must not spend it on mail nobody read."""
    bodies = {uid: sized_message(uid, MSG_SIZE) for uid in range(1, 31)}
    box = Mailbox("INBOX", messages=[Message(uid, bodies[uid]) for uid in sorted(bodies)])
    srv = rig.server(mailboxes=[box])
    served = body_bytes_served(srv)
    m = rig.mounted(srv, options=[f"max_download={BUDGET}", "cache_dir=none"])
    outcomes = []
    for uid in sorted(bodies):
        res = run(["cat", m.path("INBOX", f"{uid}.eml")])
        assert_quick(res, what=f"cat {uid}.eml")
        outcomes.append(res.rc)
        assert res.rc != 0 or res.out == bodies[uid]
    time.sleep(0.5)
    m.finish()
    assert served[0] <= BUDGET + MSG_SIZE, \
        f"{served[0]} message bytes fetched under max_download={BUDGET}"
    assert any(outcomes), "every message read under the budget"


# --------------------------------------------------------------------------
# Gmail labels

def test_gmail_labels_show_one_message_in_every_folder(rig):
    data = sized_message(1, 800, word="zebracorn gmail")
    other = simple_message(2, folder="INBOX").body
    boxes = [
        Mailbox("INBOX", messages=[Message(1, data), Message(2, other)], uidvalidity=11),
        Mailbox("Work", messages=[Message(7, data)], uidvalidity=12),
        Mailbox("[Gmail]", attrs=["\\HasChildren", "\\Noselect"]),
        Mailbox("[Gmail]/All Mail", attrs=["\\All", "\\HasNoChildren"],
                messages=[Message(2, other), Message(42, data)], uidvalidity=13),
    ]
    srv = rig.server(mailboxes=boxes)
    m = rig.mounted(srv)
    assert sorted(os.listdir(m.mountpoint)) == ["INBOX", "Work", "[Gmail]"]
    assert os.path.isdir(m.path("[Gmail]", "All Mail"))
    assert os.listdir(m.path("[Gmail]")) == ["All Mail"]
    assert sorted(os.listdir(m.path("INBOX"))) == ["1.eml", "2.eml"]
    assert os.listdir(m.path("Work")) == ["7.eml"]
    assert sorted(os.listdir(m.path("[Gmail]", "All Mail"))) == ["2.eml", "42.eml"]
    where = [m.path("INBOX", "1.eml"), m.path("Work", "7.eml"),
             m.path("[Gmail]", "All Mail", "42.eml")]
    for path in where:
        res = run(["cat", path])
        assert res.rc == 0 and res.out == data, (path, res)
        assert os.stat(path).st_size == len(data), path
    assert run(["cat", m.path("[Gmail]", "All Mail", "2.eml")]).out == other
    # the same message under three UIDs: grep finds it three times (expected)
    res = run(["grep", "-rl", "zebracorn", m.mountpoint])
    assert res.rc == 0, res
    assert sorted(res.out.decode().splitlines()) == sorted(where)
    m.finish()


# --------------------------------------------------------------------------
# Courier-style namespace: '.' delimiter, INBOX. prefix, '/' inside a name
# (Dovecot with Maildir LAYOUT=fs refuses '/' in a name, so test_shapes.py
# cannot make one; the fake can)

def test_courier_namespace_prefix_and_slash_in_name(rig):
    a, b, c = (sized_message(u, 300, word=f"courier{u}") for u in (1, 2, 3))
    boxes = [
        Mailbox("INBOX", delimiter=".", attrs=["\\HasChildren"], messages=[Message(1, a)]),
        Mailbox("INBOX.Sent", delimiter=".", messages=[Message(2, b)]),
        Mailbox("INBOX.a/b", delimiter=".", attrs=["\\HasChildren"], messages=[Message(3, c)]),
        Mailbox("INBOX.a/b.c", delimiter=".", messages=[]),
    ]
    srv = rig.server(mailboxes=boxes, capabilities=("IMAP4rev1", "NAMESPACE"))
    srv.on("NAMESPACE", lambda conn, cmd: [b'* NAMESPACE (("INBOX." ".")) NIL NIL' + CRLF,
                                            cmd.ok("NAMESPACE completed")])
    m = rig.mounted(srv)
    assert sorted(os.listdir(m.mountpoint)) == ["INBOX", "Sent", "a%2Fb"]
    assert sorted(os.listdir(m.path("a%2Fb"))) == ["3.eml", "c"]
    assert run(["cat", m.path("Sent", "2.eml")]).out == b
    assert run(["cat", m.path("a%2Fb", "3.eml")]).out == c
    assert run(["cat", m.path("INBOX", "1.eml")]).out == a
    assert os.listdir(m.path("a%2Fb", "c")) == []
    assert set(srv.selected_names()) >= {b"INBOX.Sent", b"INBOX.a/b"}
    m.finish()


# --------------------------------------------------------------------------
# A server that will not expunge one message (it says NO, as a server does
# for a message it holds locked, or when it is failing): a real server
# cannot be made to refuse just one, the fake can.  A move by COPY and the
# redate of new mail each make a second copy before the first goes; when the
# first cannot go, the second is removed again and the first loses the
# \Deleted its removal set, so the message is in one place, as it was.

def install_store_copy_expunge(srv, refuse, refuse_unflag=()):
    """UID STORE, UID COPY (COPYUID) and UID EXPUNGE for the fake, except
    that UID EXPUNGE of a (mailbox, UID) in refuse gets NO, and so does a
    STORE -FLAGS of one in refuse_unflag.  Records [(mailbox, uid, answer)]
    of every UID EXPUNGE."""
    expunges = []

    def message_of(conn, cmd):
        box = conn.selected
        return box, (box.find(int(cmd.tokens[0]))[1] if box and cmd.tokens else None)

    def store(conn, cmd):
        box, msg = message_of(conn, cmd)
        if msg is not None:
            how, flags = cmd.tokens[1].upper(), [f.decode() for f in cmd.tokens[2]]
            if how.startswith(b"-") and (box.name, msg.uid) in refuse_unflag:
                return [cmd.no("Cannot change that message now")]
            if how.startswith(b"+"):
                msg.flags += [f for f in flags if f not in msg.flags]
            elif how.startswith(b"-"):
                msg.flags = [f for f in msg.flags if f not in flags]
            else:
                msg.flags = flags
        return [cmd.ok("STORE completed")]

    def copy(conn, cmd):
        box, msg = message_of(conn, cmd)
        to = srv.mailbox(cmd.tokens[1])
        if msg is None or to is None:
            return [cmd.no("no such message or mailbox")]
        uid = to.uidnext
        to.messages.append(Message(uid, msg.body, flags=[f for f in msg.flags if f != "\\Deleted"]))
        return [cmd.ok("COPY completed", code=f"COPYUID {to.uidvalidity} {msg.uid} {uid}")]

    def expunge(conn, cmd):
        box, msg = message_of(conn, cmd)
        uid = int(cmd.tokens[0])
        if (box.name, uid) in refuse:
            expunges.append((box.name, uid, "NO"))
            return [cmd.no("Cannot expunge that message now")]
        expunges.append((box.name, uid, "OK"))
        out = []
        if msg is not None and "\\Deleted" in msg.flags:
            out.append(b"* %d EXPUNGE" % box.find(uid)[0] + CRLF)
            box.messages.remove(msg)
        return out + [cmd.ok("EXPUNGE completed")]

    srv.on("UID STORE", store)
    srv.on("UID COPY", copy)
    srv.on("UID EXPUNGE", expunge)
    return expunges


def test_redate_whose_first_copy_cannot_be_expunged_leaves_one_copy(rig, tmp_path):
    """rsync's order: cp, then a time set on the name written under.  The
    second APPEND (the new date) succeeds, the expunge of the first copy is
    refused: the time fails with an error, and the server holds the first
    copy alone, unflagged, as before the time was set."""
    srv = rig.server(mailboxes=[Mailbox("INBOX", messages=[simple_message(1)])],
                     capabilities=("IMAP4rev1", "UIDPLUS"))
    appends = install_append(srv)
    expunges = install_store_copy_expunge(srv, refuse={(b"INBOX", 2)})
    m = rig.mounted(srv)
    data = sized_message(2, 600, word="redate refused")
    src = tmp_path / "msg.eml"
    src.write_bytes(data)
    res = run(["cp", str(src), m.path("INBOX", "msg.eml")])
    assert_quick(res, what="cp")
    assert res.rc == 0, res
    assert [(n, u) for n, u, _ in appends] == [(b"INBOX", 2)], appends

    t = time.monotonic()
    try:
        os.utime(m.path("INBOX", "msg.eml"), (1709629200, 1709629200))
        error = None
    except OSError as e:
        error = e
    assert time.monotonic() - t < 20, "the time took too long to fail"
    assert error is not None, "the time was set, but the first copy is still on the server"
    assert [(n, u) for n, u, _ in appends] == [(b"INBOX", 2), (b"INBOX", 3)], \
        f"no second APPEND was made: {appends}"
    assert (b"INBOX", 2, "NO") in expunges and (b"INBOX", 3, "OK") in expunges, expunges
    box = srv.mailbox(b"INBOX")
    assert [(msg.uid, msg.body, msg.flags) for msg in box.messages] == \
        [(1, simple_message(1).body, []), (2, data, [])], \
        "the server does not hold the message once, unflagged, as before"
    assert sorted(os.listdir(m.path("INBOX"))) == ["1.eml", "2.eml"]
    assert run(["cat", m.path("INBOX", "2.eml")]).out == data
    log = m.log()
    assert "removing the new one" in log and "there twice" not in log, log[-3000:]
    m.check_alive("after the refused expunge")
    m.finish()


def test_move_by_copy_whose_original_cannot_be_expunged_changes_nothing(rig):
    """A server without MOVE: mv is COPY, then the original's expunge,
    which is refused.  mv fails; the copy is removed and the original stays
    where it was, without the \\Deleted its removal set (which another
    client's EXPUNGE would act on, leaving the message nowhere)."""
    data = sized_message(5, 700, word="move refused")
    srv = rig.server(mailboxes=[Mailbox("INBOX", messages=[Message(5, data)]),
                                Mailbox("Work", messages=[], uidvalidity=7)],
                     capabilities=("IMAP4rev1", "UIDPLUS"))
    expunges = install_store_copy_expunge(srv, refuse={(b"INBOX", 5)})
    m = rig.mounted(srv)
    assert os.listdir(m.path("Work")) == []
    res = run(["mv", m.path("INBOX", "5.eml"), m.path("Work", "5.eml")])
    assert_quick(res, what="mv")
    assert res.rc != 0, f"mv succeeded, but the original could not be removed: {res!r}"
    assert (b"INBOX", 5, "NO") in expunges and (b"Work", 1, "OK") in expunges, expunges
    assert [(msg.uid, msg.flags) for msg in srv.mailbox(b"INBOX").messages] == [(5, [])]
    assert srv.mailbox(b"Work").messages == [], "the copy was left in Work"
    assert os.listdir(m.path("INBOX")) == ["5.eml"]
    assert os.listdir(m.path("Work")) == []
    assert run(["cat", m.path("INBOX", "5.eml")]).out == data
    m.check_alive("after the refused expunge")
    m.finish()


def test_move_by_copy_keeps_the_copy_while_the_original_stays_flagged(rig):
    """As above, but the original's \\Deleted cannot be taken back either:
    the copy must then stay (the original may be expunged by any client),
    so the message is there twice, and the log says so."""
    data = sized_message(5, 700, word="move flagged")
    srv = rig.server(mailboxes=[Mailbox("INBOX", messages=[Message(5, data)]),
                                Mailbox("Work", messages=[], uidvalidity=7)],
                     capabilities=("IMAP4rev1", "UIDPLUS"))
    expunges = install_store_copy_expunge(srv, refuse={(b"INBOX", 5)},
                                          refuse_unflag={(b"INBOX", 5)})
    m = rig.mounted(srv)
    res = run(["mv", m.path("INBOX", "5.eml"), m.path("Work", "5.eml")])
    assert_quick(res, what="mv")
    assert res.rc != 0, f"mv succeeded, but the original could not be removed: {res!r}"
    assert (b"INBOX", 5, "NO") in expunges and all(b != b"Work" for b, _, _ in expunges), \
        f"the copy was expunged while the original is flagged \\Deleted: {expunges}"
    assert [(msg.uid, msg.flags) for msg in srv.mailbox(b"INBOX").messages] == \
        [(5, ["\\Deleted"])]
    assert [(msg.uid, msg.body) for msg in srv.mailbox(b"Work").messages] == [(1, data)]
    assert "the message is there twice" in m.log()
    m.check_alive("after the refused expunge")
    m.finish()


def test_redate_whose_expunge_answer_is_lost_keeps_the_new_copy(rig, tmp_path):
    """The expunge of the first copy happens, but its answer is lost, and
    so is the answer on the fresh connection that asks again: the first
    copy is gone, so the new one must stay (removing it would leave the
    message nowhere), and the time is set."""
    srv = rig.server(mailboxes=[Mailbox("INBOX", messages=[])],
                     capabilities=("IMAP4rev1", "UIDPLUS"))
    appends = install_append(srv)
    lost = []

    def expunge_then_drop(conn, cmd):
        if len(lost) < 2 and int(cmd.tokens[0]) == 1:
            box = conn.selected
            seq, msg = box.find(1)
            if msg is not None:
                box.messages.remove(msg)
            lost.append(seq)
            return [CLOSE]
        return None
    srv.on("UID EXPUNGE", expunge_then_drop)  # before the plain one: hooks go in order
    install_store_copy_expunge(srv, refuse=set())
    m = rig.mounted(srv)
    data = sized_message(1, 600, word="redate lost")
    src = tmp_path / "msg.eml"
    src.write_bytes(data)
    res = run(["cp", str(src), m.path("INBOX", "msg.eml")])
    assert res.rc == 0, res
    os.utime(m.path("INBOX", "msg.eml"), (1709629200, 1709629200))
    assert len(lost) == 2, f"the expunge's answer was not lost twice: {lost}"
    assert [(n, u) for n, u, _ in appends] == [(b"INBOX", 1), (b"INBOX", 2)], appends
    assert [(msg.uid, msg.body) for msg in srv.mailbox(b"INBOX").messages] == [(2, data)], \
        "the new copy did not stay alone"
    assert os.listdir(m.path("INBOX")) == ["2.eml"]
    assert run(["cat", m.path("INBOX", "2.eml")]).out == data
    m.check_alive("after the lost answers")
    m.finish()
