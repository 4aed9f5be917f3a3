"""Server-side search: FOLDER/.search/CRITERIA.

What a user is promised (fs/search.c, the issue):

* every selectable folder has a hidden ``.search/``: not listed by readdir of
  the folder (so ``find``, ``grep -r``, ``ls -a`` never walk into it), but
  reachable by name; a \\Noselect folder has none;
* looking up ``FOLDER/.search/CRITERIA`` runs ``UID SEARCH CHARSET UTF-8
  CRITERIA`` on the server (8-bit words as literals); the directory lists the
  matches as symlinks ``UID.eml -> ../../UID.eml``, and ``cat`` through them
  reads the message;
* invalid criteria, and criteria with control characters, fail with EINVAL
  (the server's words in the ``-d`` log); writes inside ``.search`` fail with
  EPERM and change nothing on the server;
* ``ls FOLDER/.search/`` lists the queries used recently (up to 64);
* results are searched again after ``-o dir_cache_timeout``.

Every expected result comes from the independent client's own ``UID SEARCH
CHARSET UTF-8`` (imaplib) on the same server.
"""

import errno
import os
import re
import stat
import subprocess
import time

import pytest

import imapserver
from fsutil import errno_of, read_bytes

SEARCH = ".search"

# (folder as the fixtures name it, criteria)
CASES = [
    ("INBOX", "FROM bob"),
    ("INBOX", "FROM Beispiel"),
    ("INBOX", "SUBJECT zebracorn"),
    ("INBOX", "TEXT zebracorn"),
    ("INBOX", "SINCE 1-Jan-2024"),
    ("INBOX", "BEFORE 6-Mar-2024"),
    ("INBOX", "UNSEEN"),
    ("INBOX", "FLAGGED"),
    ("INBOX", "UNSEEN FLAGGED"),
    ("INBOX", "KEYWORD $Work"),
    ("INBOX", "LARGER 2000"),
    ("INBOX", "OR FROM carol FROM dave"),
    ("INBOX", "NOT OR FROM carol FROM dave"),
    ("INBOX", "SUBJECT Grüße"),            # raw 8-bit UTF-8 header (006)
    ("INBOX", "SUBJECT résumé"),           # RFC 2047 encoded-word subject (008)
    ("INBOX", 'SUBJECT "Café résumé"'),    # a quoted 8-bit phrase
    ("INBOX", 'SUBJECT "ever seen a"'),    # a quoted ASCII phrase
    ("INBOX", "FROM Jürgen"),
    ("INBOX", "subject lunch"),            # lower-case keyword
    ("INBOX", "TEXT nosuchwordanywhere"),  # no match: an empty directory
    ("Lists/notmuch", "ALL"),              # 300 results: readdir in pieces
    ("Lists/notmuch", "UNSEEN"),
    ("Lists/notmuch", "FLAGGED"),
    ("Lists/notmuch", "TEXT zebracorn"),
    ("Lists/notmuch", "OR FROM poster3 FROM poster12"),
    ("Lists/notmuch", "SUBJECT performance SINCE 1-Jan-2024"),
    ("Entwürfe", "SUBJECT Jürgen"),
    ("Entwürfe", "DRAFT"),
    ("Sent Items", "TEXT zebracorn"),
    ("Archive/2024", "SENTSINCE 1-May-2024"),
    ("Work/Projects", "KEYWORD $Work UNSEEN"),
]


@pytest.fixture(scope="module")
def own_server(request):
    """Seeded, for the tests that change the account (or try to)."""
    srv = imapserver.FastServer(tied_to_parent=True)
    request.addfinalizer(lambda: (srv.stop(), srv.remove()))
    srv.start()
    return srv


def raw(server, folder):
    return server.server_name(folder)


def server_search(checker, raw_folder, criteria):
    """UIDs matching criteria, from the independent client.  An 8-bit word
    may only be the last one (imaplib sends it as the command's literal)."""
    checker.examine(raw_folder)
    words = re.findall(r'"[^"]*"|\S+', criteria)
    last = words[-1]
    imap = checker.imap
    if any(ord(ch) > 127 for ch in criteria):
        assert not any(ord(ch) > 127 for ch in " ".join(words[:-1])), criteria
        imap.literal = last.strip('"').encode("utf-8")
        typ, data = imap.uid("SEARCH", "CHARSET", "UTF-8", *words[:-1])
    else:
        typ, data = imap.uid("SEARCH", "CHARSET", "UTF-8", criteria)
    assert typ == "OK", (criteria, data)
    return {int(u) for u in (data[0] or b"").split()}


def results(query_dir):
    """{name: readlink} of a query directory, every entry a symlink."""
    out = {}
    for entry in os.scandir(query_dir):
        assert entry.is_symlink(), f"{entry.path} is not a symlink"
        out[entry.name] = os.readlink(entry.path)
    return out


# --------------------------------------------------------------------------
# on the shared, seeded server (read-only use)


def test_search_dir_hidden_but_reachable(mount, server, server_state):
    delim = server_state["delimiter"]
    for flags, _, raw_name, _ in server_state["folders"]:
        path = mount.folder_path(raw_name, delim)
        names = os.listdir(path)
        assert SEARCH not in names, f"{path} lists {SEARCH}"
        search = os.path.join(path, SEARCH)
        if flags & {"\\Noselect", "\\NonExistent"}:
            assert errno_of(os.stat, search) == errno.ENOENT, \
                f"{search} exists in a folder that cannot hold mail"
        else:
            st = os.stat(search)
            assert stat.S_ISDIR(st.st_mode)
            assert st.st_uid == os.getuid()
    ls = subprocess.run(["ls", "-aR", mount.mountpoint], capture_output=True, text=True,
                        timeout=60)
    assert ls.returncode == 0, ls.stderr
    assert SEARCH not in ls.stdout
    find = subprocess.run(["find", mount.mountpoint], capture_output=True, text=True, timeout=60)
    assert find.returncode == 0, find.stderr
    assert f"/{SEARCH}" not in find.stdout


@pytest.mark.parametrize("folder,criteria", CASES, ids=[f"{f}:{c}" for f, c in CASES])
def test_search_matches_server(folder, criteria, mount, server, checker):
    raw_folder = raw(server, folder)
    want = server_search(checker, raw_folder, criteria)
    query_dir = os.path.join(mount.folder_path(raw_folder, "/"), SEARCH, criteria)
    st = os.stat(query_dir)
    assert stat.S_ISDIR(st.st_mode)
    got = results(query_dir)
    assert set(got) == {f"{u}.eml" for u in want}, \
        f"{folder}/.search/{criteria}: mount {sorted(got)}, server UID SEARCH {sorted(want)}"
    for name, target in got.items():
        assert target == f"../../{name}"
        assert os.path.realpath(os.path.join(query_dir, name)) == \
            os.path.realpath(os.path.join(mount.folder_path(raw_folder, "/"), name))


def test_cat_through_result_symlinks(mount, server, checker, server_state):
    """Every zebracorn message, read through TEXT zebracorn in its folder,
    is the message (BODY.PEEK[]), and the link resolves to the folder's file."""
    manifest = imapserver.load_manifest()
    by_folder = {}
    for rel in manifest["grep"]["zebracorn"]:
        seeded = server.seeded["messages"][rel]
        by_folder.setdefault(seeded["folder"], set()).add(seeded["uid"])
    for raw_folder, uids in by_folder.items():
        folder_dir = mount.folder_path(raw_folder, "/")
        query_dir = os.path.join(folder_dir, SEARCH, "TEXT zebracorn")
        assert set(os.listdir(query_dir)) == {f"{u}.eml" for u in uids}, raw_folder
        bodies = checker.bodies(raw_folder, ",".join(map(str, sorted(uids))))
        for uid in uids:
            link = os.path.join(query_dir, f"{uid}.eml")
            assert stat.S_ISLNK(os.lstat(link).st_mode)
            assert os.path.samefile(link, os.path.join(folder_dir, f"{uid}.eml"))
            assert read_bytes(link) == bodies[uid], f"{raw_folder}: {uid}.eml through the symlink"
            assert os.stat(link).st_size == len(bodies[uid])
            # the envelope xattrs follow the link like any file's
            assert os.getxattr(link, "user.mime_type") == b"message/rfc822"
    # \Seen untouched by all that reading
    for raw_folder in by_folder:
        assert checker.flags(raw_folder) == \
            {u: m["flags"] for u, m in server_state["messages"][raw_folder].items()}


def test_grep_r_does_not_walk_into_search(mount, server):
    """After queries were used, grep -r over the whole mount finds each
    zebracorn message once, at its folder path; nothing under .search."""
    os.listdir(os.path.join(mount.mountpoint, SEARCH, "TEXT zebracorn"))
    for folder in ("INBOX", "Lists/notmuch", "Archive/2024"):
        os.listdir(os.path.join(mount.folder_path(raw(server, folder), "/"), SEARCH,
                                "TEXT zebracorn"))
    manifest = imapserver.load_manifest()
    want = set()
    for rel in manifest["grep"]["zebracorn"]:
        seeded = server.seeded["messages"][rel]
        want.add(os.path.join(mount.folder_path(seeded["folder"], "/"), f"{seeded['uid']}.eml"))
    r = subprocess.run(["grep", "-rl", "zebracorn", mount.mountpoint], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = r.stdout.decode().splitlines()
    assert sorted(got) == sorted(want), "grep -rl zebracorn over the mount"


def test_invalid_criteria_einval_with_server_message_in_log(mounter, server, checker):
    m = mounter(extra_args=["-d"])
    search = os.path.join(m.mountpoint, "INBOX", SEARCH)
    for bad in ("FOO bar", "SINCE notadate", "SUBJECT", 'SUBJECT "unbalanced', "OR FROM bob"):
        assert errno_of(os.listdir, os.path.join(search, bad)) == errno.EINVAL, bad
        assert errno_of(os.stat, os.path.join(search, bad)) == errno.EINVAL, bad
    log = m.log()
    assert re.search(r"FOO bar.*(Unknown argument|BAD|Error)", log, re.I), \
        "the server's answer to FOO bar is not in the -d log"
    # the connection survived: a valid search right after is right
    want = server_search(checker, "INBOX", "FROM bob")
    assert set(os.listdir(os.path.join(search, "FROM bob"))) == {f"{u}.eml" for u in want}
    listed = set(os.listdir(search))
    assert listed == {"FROM bob"}, \
        f"ls INBOX/.search lists refused queries (each gives EINVAL): {sorted(listed - {'FROM bob'})}"


def test_refused_criteria_log_names_their_own_error(mounter):
    """A criteria string imapfs itself rejects (an unbalanced quote: nothing
    is sent) must not be logged with the server's answer to an earlier one."""
    m = mounter(extra_args=["-d"])
    search = os.path.join(m.mountpoint, "INBOX", SEARCH)
    assert errno_of(os.stat, os.path.join(search, "SINCE notadate")) == errno.EINVAL
    assert errno_of(os.stat, os.path.join(search, 'SUBJECT "unbalanced')) == errno.EINVAL
    lines = [line for line in m.log().splitlines() if 'SUBJECT "unbalanced' in line]
    assert lines, "no log line about the refused criteria"
    stale = [line for line in lines if "date" in line.lower()]
    assert not stale, f"the log blames the server's answer to another search: {stale}"


def test_control_characters_einval_never_sent(mounter, server, checker):
    m = mounter(extra_args=["-d"])
    search = os.path.join(m.mountpoint, "INBOX", SEARCH)
    sent_before = m.log().count("UID SEARCH")
    for bad in ("TEXT a\tb", "TEXT \x01zebracorn", "TEXT a\x7fb", "TEXT a\nb",
                "TEXT a\r\nA1 LOGOUT", "TEXT \x1b[31m"):
        assert errno_of(os.listdir, os.path.join(search, bad)) == errno.EINVAL, repr(bad)
    log = m.log()
    assert log.count("UID SEARCH") == sent_before, \
        "criteria with control characters were sent to the server"
    assert "LOGOUT" not in log.split("\n", 1)[1]
    want = server_search(checker, "INBOX", "TEXT zebracorn")
    assert set(os.listdir(os.path.join(search, "TEXT zebracorn"))) == {f"{u}.eml" for u in want}


def test_ls_search_lists_recent_queries(mounter, server, checker):
    m = mounter()
    inbox = os.path.join(m.mountpoint, "INBOX", SEARCH)
    notmuch = os.path.join(m.mountpoint, "Lists", "notmuch", SEARCH)
    assert os.listdir(inbox) == []
    for q in ("FROM bob", "TEXT zebracorn", "UNSEEN"):
        os.listdir(os.path.join(inbox, q))
    os.stat(os.path.join(notmuch, "FLAGGED"))
    assert sorted(os.listdir(inbox)) == sorted(["FROM bob", "TEXT zebracorn", "UNSEEN"])
    assert os.listdir(notmuch) == ["FLAGGED"]
    for name in os.listdir(inbox):
        assert stat.S_ISDIR(os.lstat(os.path.join(inbox, name)).st_mode)

    queries = [f"TEXT w{i}" for i in range(70)]
    for q in queries:
        os.stat(os.path.join(inbox, q))
    listed = os.listdir(inbox)
    assert len(listed) <= 64, f"{len(listed)} queries listed, at most 64 promised"
    assert set(listed) == set(queries[-64:]), \
        f"not the 64 most recent queries: missing {sorted(set(queries[-64:]) - set(listed))}, " \
        f"extra {sorted(set(listed) - set(queries[-64:]))}"
    # a forgotten query still works by name
    want = server_search(checker, "INBOX", "FROM bob")
    assert set(os.listdir(os.path.join(inbox, "FROM bob"))) == {f"{u}.eml" for u in want}


ROOT_CASES = ["TEXT zebracorn", "FROM carol", "SUBJECT Jürgen", "FLAGGED"]


@pytest.mark.parametrize("criteria", ROOT_CASES)
def test_root_search_is_the_union_of_folder_searches(criteria, mount, checker, server_state):
    """MOUNT/.search/CRITERIA mirrors the folder tree: FOLDER/UID.eml for each
    match in every selectable folder, a symlink to MOUNT/FOLDER/UID.eml."""
    delim = server_state["delimiter"]
    want = set()
    for flags, _, raw_name, decoded in server_state["folders"]:
        if flags & {"\\Noselect", "\\NonExistent"}:
            continue
        path = "/".join(decoded.split(delim)) if delim else decoded
        want |= {f"{path}/{u}.eml" for u in server_search(checker, raw_name, criteria)}
    root = mount.mountpoint
    assert SEARCH not in os.listdir(root)
    query_dir = os.path.join(root, SEARCH, criteria)
    assert stat.S_ISDIR(os.stat(query_dir).st_mode)
    got, bad = {}, []
    for dirpath, dirs, files in os.walk(query_dir):
        rel_dir = os.path.relpath(dirpath, query_dir)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                bad.append(f"{rel} is not a symlink")
                continue
            got[rel] = os.readlink(p)
        for d in dirs:
            rel = os.path.normpath(os.path.join(rel_dir, d))
            if not any(w.startswith(rel + "/") for w in want):
                bad.append(f"{rel}/ is shown but holds no match")
    assert not bad, bad
    assert set(got) == want, \
        f".search/{criteria}: missing {sorted(want - set(got))}, extra {sorted(set(got) - want)}"
    for rel, target in got.items():
        depth = rel.count("/")                 # folder levels above UID.eml
        assert target == "../" * (depth + 2) + rel, (rel, target)
        link = os.path.join(query_dir, rel)
        assert os.path.realpath(link) == os.path.realpath(os.path.join(root, rel))
    if criteria == "TEXT zebracorn":
        for rel in sorted(got):
            folder, name = rel.rsplit("/", 1)
            raw_name = imapserver.mutf7_encode(folder) if folder != "INBOX" else folder
            assert read_bytes(os.path.join(query_dir, rel)) == \
                checker.body(raw_name, int(name.split(".")[0])), rel
    # and the root's .search lists root queries, not the folders' ones
    listed = os.listdir(os.path.join(root, SEARCH))
    assert criteria in listed
    assert not (set(listed) - set(ROOT_CASES)), listed


# --------------------------------------------------------------------------
# on a server of our own


def test_results_refresh_after_dir_cache_timeout(mounter, own_server):
    srv = own_server
    m = mounter(server=srv, options=mounter.default_options(srv) + ["dir_cache_timeout=2"])
    inbox = os.path.join(m.mountpoint, "INBOX")
    subject_dir = os.path.join(inbox, SEARCH, "SUBJECT refreshme")
    flagged_dir = os.path.join(inbox, SEARCH, "FLAGGED")
    with srv.checker() as c:
        assert os.listdir(subject_dir) == []
        want_flagged = server_search(c, "INBOX", "FLAGGED")
        assert set(os.listdir(flagged_dir)) == {f"{u}.eml" for u in want_flagged}
        body = (b"From: R <r@example.org>\r\nSubject: refreshme please\r\n"
                b"Message-ID: <refreshme@imapfs.test>\r\n\r\nbody\r\n")
        typ, resp = c.imap.append("INBOX", "()", None, body)
        new_uid = int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))
        unflagged = min(set(c.messages("INBOX")) - want_flagged)
        gone = min(want_flagged)
        c._ok(*c.imap.select("INBOX"), "SELECT")
        c._ok(*c.imap.uid("STORE", str(unflagged), "+FLAGS.SILENT", r"(\Flagged)"), "STORE")
        c._ok(*c.imap.uid("STORE", str(gone), "-FLAGS.SILENT", r"(\Flagged)"), "STORE")
        want_flagged = server_search(c, "INBOX", "FLAGGED")
        assert unflagged in want_flagged and gone not in want_flagged
    changed = time.monotonic()
    deadline = changed + 2 + 1.5      # dir_cache_timeout, and slack
    while True:
        got_subject = set(os.listdir(subject_dir))
        got_flagged = set(os.listdir(flagged_dir))
        if got_subject == {f"{new_uid}.eml"} and got_flagged == {f"{u}.eml" for u in want_flagged}:
            break
        assert time.monotonic() < deadline, \
            f"{time.monotonic() - changed:.1f}s after the change (dir_cache_timeout=2, results " \
            f"listed every 0.3s): " \
            f"SUBJECT refreshme {sorted(got_subject)} (want {new_uid}.eml), " \
            f"FLAGGED {sorted(got_flagged)} (want {sorted(want_flagged)})"
        time.sleep(0.3)
    with srv.checker() as c:
        assert read_bytes(os.path.join(subject_dir, f"{new_uid}.eml")) == c.body("INBOX", new_uid)
        for name in got_flagged:
            uid = int(name.split(".")[0])
            assert read_bytes(os.path.join(flagged_dir, name)) == c.body("INBOX", uid), name
    # a result gone from the listing is gone by name too (the kernel may keep
    # the old entry for at most another dir_cache_timeout)
    while errno_of(os.lstat, os.path.join(flagged_dir, f"{gone}.eml")) != errno.ENOENT:
        assert time.monotonic() < deadline + 2, \
            f"FLAGGED/{gone}.eml still there {time.monotonic() - changed:.1f}s after it was " \
            f"unflagged, though not listed: {sorted(os.listdir(flagged_dir))}"
        time.sleep(0.3)


def test_a_result_name_never_leads_to_another_message(mounter, own_server):
    """When a refresh drops a match, its name (which the kernel may still
    know) must give ENOENT or its own message, never another one."""
    srv = own_server
    m = mounter(server=srv, options=mounter.default_options(srv) + ["dir_cache_timeout=2"])
    inbox = os.path.join(m.mountpoint, "INBOX")
    with srv.checker() as c:
        c._ok(*c.imap.select("INBOX"), "SELECT")
        c._ok(*c.imap.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Flagged)"), "STORE")
        before = server_search(c, "INBOX", "FLAGGED")
    flagged_dir = os.path.join(inbox, SEARCH, "FLAGGED")
    seen = set(os.listdir(flagged_dir))
    assert seen == {f"{u}.eml" for u in before} and len(before) >= 3
    for name in seen:                           # the kernel meets every name
        assert os.readlink(os.path.join(flagged_dir, name)) == f"../../{name}"
    dropped = min(before)
    with srv.checker() as c:
        c._ok(*c.imap.select("INBOX"), "SELECT")
        c._ok(*c.imap.uid("STORE", str(dropped), "-FLAGS.SILENT", r"(\Flagged)"), "STORE")
        after = server_search(c, "INBOX", "FLAGGED")
        bodies = c.bodies("INBOX")
    deadline = time.monotonic() + 10
    while set(os.listdir(flagged_dir)) != {f"{u}.eml" for u in after}:
        assert time.monotonic() < deadline, "FLAGGED never refreshed"
        time.sleep(0.3)
    wrong = {}
    for name in sorted(seen):
        path = os.path.join(flagged_dir, name)
        try:
            target = os.readlink(path)
            data = read_bytes(path)
        except FileNotFoundError:
            continue
        uid = int(name.split(".")[0])
        if target != f"../../{name}" or data != bodies[uid]:
            wrong[name] = f"-> {target}" + ("" if data == bodies[uid] else " (other bytes)")
    assert not wrong, f"after {dropped}.eml left FLAGGED: {wrong}"


def test_writes_inside_search_eperm(mounter, own_server):
    srv = own_server
    with srv.checker() as c:
        before = {f: c.messages(srv.server_name(f)) for f in ("INBOX", "Archive")}
        folders_before = sorted(r for _, _, r, _ in c.list_folders())
    m = mounter(server=srv)
    inbox = os.path.join(m.mountpoint, "INBOX")
    search = os.path.join(inbox, SEARCH)
    query = os.path.join(search, "TEXT zebracorn")
    hits = sorted(os.listdir(query))
    assert hits
    link = os.path.join(query, hits[0])
    msg = b"From: x <x@example.org>\r\nSubject: into search\r\n\r\nx\r\n"

    def create(path):
        with open(path, "wb") as f:
            f.write(msg)

    inside = {
        "create a file in a query dir": (create, os.path.join(query, "new.eml")),
        "mkdir in a query dir": (os.mkdir, os.path.join(query, "sub")),
        "unlink a result": (os.unlink, link),
        "rmdir a query dir": (os.rmdir, query),
        "rename a message into a query dir": (os.rename, os.path.join(inbox, "1.eml"),
                                              os.path.join(query, "1.eml")),
        "rename a result out": (os.rename, link, os.path.join(inbox, "x.eml")),
        "rename a result to another folder": (os.rename, link,
                                              os.path.join(m.mountpoint, "Archive", hits[0])),
        "symlink in a query dir": (os.symlink, "../../1.eml", os.path.join(query, "1.eml")),
        "hard link into a query dir": (os.link, os.path.join(inbox, "1.eml"),
                                       os.path.join(query, "1.eml")),
        "rename a query dir": (os.rename, query, os.path.join(search, "TEXT unicorn")),
        "chmod a query dir": (os.chmod, query, 0o777),
    }
    wrong = {}
    for what, (fn, *args) in inside.items():
        e = errno_of(fn, *args)
        if e != errno.EPERM:
            wrong[what] = errno.errorcode.get(e, e)
    # at the .search level a new name is first a query: EINVAL for a bad one is fine too
    level = {
        "create a file in .search": (create, os.path.join(search, "new.eml")),
        "rename a message into .search": (os.rename, os.path.join(inbox, "2.eml"),
                                          os.path.join(search, "2.eml")),
        "mkdir a folder in .search": (os.mkdir, os.path.join(search, "sub")),
    }
    for what, (fn, *args) in level.items():
        e = errno_of(fn, *args)
        if e not in (errno.EPERM, errno.EINVAL):
            wrong[what] = errno.errorcode.get(e, e)
    with srv.checker() as c:
        after = {f: c.messages(srv.server_name(f)) for f in ("INBOX", "Archive")}
        folders_after = sorted(r for _, _, r, _ in c.list_folders())
    assert after == before, "a write inside .search changed messages on the server"
    assert folders_after == folders_before, "a write inside .search changed the folders"
    assert not wrong, f"writes inside .search, want EPERM: {wrong}"
    assert sorted(os.listdir(query)) == hits


def test_search_without_esearch_or_literal_plus(mounter, request):
    """On a plain IMAP4rev1 server: no RETURN (ALL), and an 8-bit word as a
    synchronizing literal; results still right.  With ESEARCH and LITERAL+
    (the shared server) the -d log shows RETURN (ALL) and a {n+} literal."""
    srv = imapserver.FastServer(tied_to_parent=True, seed=False, capabilities="IMAP4rev1")
    request.addfinalizer(lambda: (srv.stop(), srv.remove()))
    srv.start()
    with srv.checker() as c:
        for subject, sender in (("Grüße aus Köln", "bob@example.net"), ("plain", "carol@example.com"),
                                ("Grüße again", "carol@example.com")):
            data = (f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n").encode()
            c._ok(*c.imap.append("INBOX", "()", None, data), "APPEND")
        want_8bit = server_search(c, "INBOX", "SUBJECT Grüße")
        want_or = server_search(c, "INBOX", "OR FROM bob SUBJECT plain")
    assert want_8bit == {1, 3} and want_or == {1, 2}
    m = mounter(server=srv, extra_args=["-d"])
    search = os.path.join(m.mountpoint, "INBOX", SEARCH)
    assert set(os.listdir(os.path.join(search, "SUBJECT Grüße"))) == {"1.eml", "3.eml"}
    assert set(os.listdir(os.path.join(search, "OR FROM bob SUBJECT plain"))) == {"1.eml", "2.eml"}
    sent = re.findall(r"C: \S+ (UID SEARCH .*)", m.log())
    assert sent and not any("RETURN" in line for line in sent), sent
    assert any(re.search(r"CHARSET UTF-8 SUBJECT \{7\}", line) for line in sent), sent

    m2 = mounter(extra_args=["-d"])            # the shared server: ESEARCH, LITERAL+
    os.listdir(os.path.join(m2.mountpoint, "INBOX", SEARCH, "SUBJECT Grüße"))
    sent = re.findall(r"C: \S+ (UID SEARCH .*)", m2.log())
    assert any(re.search(r"RETURN \(ALL\) CHARSET UTF-8 SUBJECT \{7\+\}", line) for line in sent), sent
