"""OAuth2 login: -o auth=xoauth2 / -o auth=oauthbearer with -o oauth_token_cmd.

The server is a throwaway Dovecot of this module's own (imapserver.TestServer
with ``oauth_introspection_url``): besides LOGIN/PLAIN with the password (the
independent checker uses that) it offers AUTHENTICATE XOAUTH2 and OAUTHBEARER
through Dovecot's ``oauth2`` passdb, which asks a token-introspection endpoint
(RFC 7662) about every token.  That endpoint is a tiny HTTP server in a thread
of this test process (``Introspection``): it answers
``{"active": true, "username": "alice"}`` for the tokens in a set the tests
control and ``{"active": false}`` for any other, and records every token it
was asked about, so a test can tell which tokens imapfs really presented.

The token commands are small shell scripts: ``cat TOKENFILE``, or one that
counts its runs in a file and prints line N of a list on run N (the last line
once the list is used up), so "a rejected token is fetched again once" can be
checked by counting runs.

Every mount here uses ``-o cache_dir=none``, so what is read comes from the
server, not from a persistent cache an earlier mount filled.  Dovecot answers
each rejected token after its 2 s auth_failure_delay; its per-IP auth penalty
is off in this rig (see imapserver.py), else rejected tokens would pile up
delays of up to 15 s per login across tests.

Nothing here comes from imapfs's own view: expectations come from the
checker (imaplib, password login) and from the introspection endpoint.
"""

import base64
import imaplib
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import imapserver
from conftest import Mounter, fusermount_u, is_mounted, snapshot


# --------------------------------------------------------------------------
# the token-introspection endpoint

class Introspection:
    """RFC 7662-ish endpoint on 127.0.0.1:random.  Dovecot 2.3 with
    ``introspection_mode = post`` sends ``token=T&client_id=&client_secret=``
    as application/x-www-form-urlencoded; GET (``introspection_url`` + token)
    is answered too."""

    def __init__(self):
        self.good = set()          # tokens answered active for USER
        self.seen = []             # every token asked about, in order
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, token):
                with outer.lock:
                    outer.seen.append(token)
                    active = token in outer.good
                body = json.dumps({"active": True, "username": imapserver.USER} if active
                                  else {"active": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
                self._answer(form.get("token", [""])[0])

            def do_GET(self):
                self._answer(urllib.parse.unquote(self.path.rsplit("/", 1)[-1]))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def tokens_seen(self):
        with self.lock:
            return list(self.seen)

    def reset(self):
        with self.lock:
            self.seen.clear()
            self.good.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def introspection():
    endpoint = Introspection()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def oauth_server(introspection, request):
    srv = imapserver.TestServer(tied_to_parent=True, oauth_introspection_url=introspection.url)
    failed_before = request.session.testsfailed
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if srv.dir:
            if request.session.testsfailed > failed_before:
                sys.stderr.write(f"\noauth test server files kept in {srv.dir} (dovecot.log)\n")
            else:
                srv.remove()


@pytest.fixture(scope="module")
def oauth_state(oauth_server):
    with oauth_server.checker() as c:
        return snapshot(c), {raw: c.bodies(raw) for raw in
                             [raw for flags, _, raw, _ in c.list_folders()
                              if not flags & {"\\Noselect", "\\NonExistent"}]}


@pytest.fixture
def endpoint(introspection):
    introspection.reset()
    yield introspection
    introspection.reset()


# the rig's ``mounter``, on this module's server (conftest shows its logs on failure)
@pytest.fixture
def mounter(imapfs, oauth_server, tmp_path):
    mt = Mounter(imapfs, oauth_server, tmp_path)
    yield mt
    mt.cleanup()


# --------------------------------------------------------------------------
# helpers

def new_token(tag="tok"):
    return f"{tag}-{secrets.token_urlsafe(24)}"


def token_file(tmp_path, token, name="token"):
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def counting_token_cmd(tmp_path, tokens, name="token-cmd"):
    """A script printing tokens[n-1] on its n-th run (the last one after that);
    returns (command, function giving the number of runs so far)."""
    listing = tmp_path / f"{name}.tokens"
    listing.write_text("".join(t + "\n" for t in tokens))
    counter = tmp_path / f"{name}.runs"
    script = tmp_path / f"{name}.sh"
    script.write_text(f"""#!/bin/sh
n=$(cat '{counter}' 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > '{counter}'
total=$(wc -l < '{listing}')
[ "$n" -le "$total" ] || n=$total
sed -n "${{n}}p" '{listing}'
""")
    script.chmod(0o700)

    def runs():
        try:
            return int(counter.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
    return str(script), runs


def oauth_options(server, mechanism, command):
    # cache_dir=none: no persistent cache, so every mount reads from the server
    return [f"cafile={server.cafile}", f"auth={mechanism}", f"oauth_token_cmd={command}",
            "cache_dir=none"]


def url(server):
    return f"imaps://{server.user}@{server.host}:{server.imaps_port}"


def sasl_blobs(server, token):
    """Every form the token could leak in: raw, base64 of itself, the base64
    initial responses of both mechanisms."""
    xoauth2 = f"user={server.user}\x01auth=Bearer {token}\x01\x01"
    bearer = (f"n,a={server.user},\x01host={server.host}\x01port={server.imaps_port}"
              f"\x01auth=Bearer {token}\x01\x01")
    return {
        "raw": token,
        "base64": base64.b64encode(token.encode()).decode(),
        "XOAUTH2 base64": base64.b64encode(xoauth2.encode()).decode(),
        "OAUTHBEARER base64": base64.b64encode(bearer.encode()).decode(),
    }


def assert_no_token(text, server, tokens, where):
    for token in tokens:
        for what, secret in sasl_blobs(server, token).items():
            assert secret not in text, f"token ({what}) in {where}"
            if what != "raw":
                # a long base64 prefix (the token is at the end of the blobs,
                # so compare the part that encodes it: the last 24 chars)
                assert secret[-24:] not in text, f"part of the token ({what}) in {where}"
        assert token[-16:] not in text, f"the end of the token in {where}"


def check_reads_right(mount, state):
    """Every folder a directory, every message a UID.eml, byte for byte the
    server's BODY.PEEK[] (read through the checker)."""
    snap, bodies = state
    delim = snap["delimiter"]
    count = 0
    for raw, msgs in snap["messages"].items():
        folder = mount.folder_path(raw, delim)
        listed = sorted(n for n in os.listdir(folder) if n.endswith(".eml"))
        assert listed == sorted(f"{uid}.eml" for uid in msgs), f"listing of {raw!r}"
        for uid, meta in msgs.items():
            path = mount.message_path(raw, delim, uid)
            assert os.stat(path).st_size == meta["size"], path
            with open(path, "rb") as f:
                data = f.read()
            assert data == bodies[raw][uid], f"{path} differs from the server's BODY[]"
            count += 1
    assert count > 0
    return count


def run_failing(imapfs, server, options, tmp_path, extra_args=(), timeout=40):
    """imapfs -f [extra] -o... URL MP, expected to fail before mounting:
    (exit status, stderr lines, stderr text).  If it mounts after all it is
    unmounted (and the test fails)."""
    mp = tmp_path / "failmnt"
    mp.mkdir(exist_ok=True)
    argv = [imapfs, "-f"] + list(extra_args)
    for opt in options:
        argv += ["-o", opt]
    argv += [url(server), str(mp)]
    env = dict(os.environ)
    env.pop("IMAPFS_PASSWORD", None)
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, preexec_fn=imapserver.die_with_parent)
    status = None
    try:
        out, err = p.communicate(timeout=timeout)
        status = p.returncode
    except subprocess.TimeoutExpired:
        pass
    finally:
        mounted = is_mounted(str(mp))
        if mounted and fusermount_u(str(mp)).returncode != 0:
            fusermount_u(str(mp), lazy=True)
        if p.poll() is None:
            p.kill()
            out, err = p.communicate()
    text = err.decode("utf-8", "replace") + out.decode("utf-8", "replace")
    assert not mounted, f"imapfs mounted although it should have failed; output:\n{text}"
    assert status is not None, f"imapfs still running after {timeout} s; output:\n{text}"
    lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    return status, lines, text


def server_log_since(server, offset):
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------
# the rig itself

def test_rig_dovecot_checks_tokens_with_the_endpoint(oauth_server, endpoint):
    """Guards the rig: Dovecot offers both mechanisms, accepts a good token,
    refuses another one, and asked the endpoint about both."""
    good, bad = new_token("good"), new_token("bad")
    endpoint.good.add(good)
    results = {}
    for mechanism in ("XOAUTH2", "OAUTHBEARER"):
        for token in (good, bad):
            blob = sasl_blobs(oauth_server, token)[f"{mechanism} base64"]
            ctx = ssl.create_default_context(cafile=oauth_server.cafile)
            imap = imaplib.IMAP4_SSL(oauth_server.host, oauth_server.imaps_port, ssl_context=ctx,
                                     timeout=30)
            try:
                assert f"AUTH={mechanism}" in imap.capabilities, imap.capabilities
                tag = imap._new_tag().decode()
                imap.send(f"{tag} AUTHENTICATE {mechanism} {blob}\r\n".encode())
                while True:
                    line = imap.readline()
                    if line.startswith(b"+"):          # the SASL error challenge
                        imap.send(b"\r\n" if mechanism == "XOAUTH2" else b"AQ==\r\n")
                    elif line.startswith(tag.encode()) or not line:
                        break
                results[(mechanism, token == good)] = line.split()[1:2]
            finally:
                imap.shutdown()
    assert results == {("XOAUTH2", True): [b"OK"], ("XOAUTH2", False): [b"NO"],
                       ("OAUTHBEARER", True): [b"OK"], ("OAUTHBEARER", False): [b"NO"]}, results
    assert endpoint.tokens_seen() == [good, bad, good, bad]


# --------------------------------------------------------------------------
# mounting with a token

@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_mount_with_token_reads_byte_exact(mechanism, mounter, oauth_server, oauth_state,
                                           endpoint, tmp_path):
    token = new_token()
    endpoint.good.add(token)
    path = token_file(tmp_path, token)
    log_offset = oauth_server.log_size()
    m = mounter(options=oauth_options(oauth_server, mechanism, f"cat {path}"))
    count = check_reads_right(m, oauth_state)
    assert count == sum(len(v) for v in oauth_state[0]["messages"].values())
    m.unmount()
    seen = endpoint.tokens_seen()
    assert seen and set(seen) == {token}, "imapfs presented other tokens than the command's"
    logins = oauth_server.logins_since(log_offset)
    assert logins, "no login in Dovecot's log"
    assert all(f"method={mechanism.upper()}" in line for line in logins), logins


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_rejected_first_token_is_fetched_again_once(mechanism, mounter, oauth_server,
                                                     oauth_state, endpoint, tmp_path):
    """An expired token first: the server refuses it, imapfs runs the command
    again, and mounts with the fresh one; the command ran exactly twice."""
    expired, fresh = new_token("expired"), new_token("fresh")
    endpoint.good.add(fresh)
    command, runs = counting_token_cmd(tmp_path, [expired, fresh])
    m = mounter(options=oauth_options(oauth_server, mechanism, command))
    assert runs() == 2, f"token command ran {runs()} times"
    check_reads_right(m, oauth_state)
    assert runs() == 2, f"token command ran {runs()} times after the reads"
    m.unmount()
    assert runs() == 2
    seen = endpoint.tokens_seen()
    assert seen[:2] == [expired, fresh], seen[:4]
    assert set(seen[2:]) <= {fresh}, "a rejected token was presented again"


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_always_rejected_token_fails_clearly(mechanism, imapfs, oauth_server, endpoint,
                                             tmp_path):
    bad1, bad2 = new_token("bad1"), new_token("bad2")
    command, runs = counting_token_cmd(tmp_path, [bad1, bad2])
    status, lines, text = run_failing(imapfs, oauth_server,
                                      oauth_options(oauth_server, mechanism, command), tmp_path)
    assert status != 0, f"exit status 0; stderr: {lines}"
    assert len(lines) == 1, f"want one line on stderr, got {lines}"
    assert lines[0].startswith("imapfs: "), lines
    assert "oauth_token_cmd" in lines[0] or "token" in lines[0], lines
    assert runs() == 2, f"token command ran {runs()} times, want 2"
    assert endpoint.tokens_seen() == [bad1, bad2], endpoint.tokens_seen()
    assert_no_token(text, oauth_server, [bad1, bad2], "stderr")


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_token_not_in_debug_log_or_cmdline(mechanism, mounter, oauth_server, oauth_state,
                                           endpoint, tmp_path):
    """-f -d traces the IMAP traffic: neither the rejected nor the good token
    (raw, or in the base64 initial response) may show, nor in /proc/PID/cmdline."""
    expired, fresh = new_token("expired"), new_token("fresh")
    endpoint.good.add(fresh)
    command, runs = counting_token_cmd(tmp_path, [expired, fresh])
    m = mounter(options=oauth_options(oauth_server, mechanism, command), extra_args=["-d"])
    with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read().decode("utf-8", "replace")
    snap, _ = oauth_state
    some = next(iter(snap["messages"]["INBOX"]))
    with open(m.message_path("INBOX", snap["delimiter"], some), "rb") as f:
        f.read()
    m.unmount()
    assert runs() == 2
    log = m.log()
    assert "C: " in log or "AUTHENTICATE" in log, "the -d log shows no IMAP traffic"
    assert f"AUTHENTICATE {mechanism.upper()}" in log, \
        "the -d log does not show the (redacted) AUTHENTICATE command"
    assert_no_token(log, oauth_server, [expired, fresh], "the -d log")
    assert_no_token(cmdline, oauth_server, [expired, fresh], "/proc/PID/cmdline")


@pytest.mark.parametrize("case", ["exit-1", "prints-nothing"])
def test_failing_token_command(case, imapfs, oauth_server, endpoint, tmp_path):
    counter = tmp_path / "runs"
    script = tmp_path / "token-cmd.sh"
    body = "echo some-token; exit 1" if case == "exit-1" else "exit 0"
    script.write_text(f"#!/bin/sh\necho x >> '{counter}'\n{body}\n")
    script.chmod(0o700)
    status, lines, text = run_failing(imapfs, oauth_server,
                                      oauth_options(oauth_server, "xoauth2", str(script)),
                                      tmp_path)
    assert status != 0, f"exit status 0; stderr: {lines}"
    assert len(lines) == 1, f"want one line on stderr, got {lines}"
    assert "oauth_token_cmd" in lines[0], lines
    assert "some-token" not in text
    # like every other error before mounting (and password_cmd's before the
    # OAuth2 change): "imapfs: ...", not the timestamped log format
    assert lines[0].startswith("imapfs: "), \
        f"the error is not in imapfs's one-line 'imapfs: ...' form: {lines[0]!r}"
    runs = len(counter.read_text().splitlines()) if counter.exists() else 0
    assert runs == 1, f"token command ran {runs} times"
    assert endpoint.tokens_seen() == [], "a token was presented although the command failed"


def test_auth_oauth_without_token_cmd(imapfs, oauth_server, tmp_path):
    status, lines, _ = run_failing(imapfs, oauth_server,
                                   [f"cafile={oauth_server.cafile}", "auth=oauthbearer", "cache_dir=none"], tmp_path)
    assert status != 0
    assert len(lines) == 1 and lines[0].startswith("imapfs: "), lines
    assert "oauth_token_cmd" in lines[0], lines


def test_rejected_token_on_reconnect_is_fetched_again(mounter, oauth_server, oauth_state,
                                                      endpoint, tmp_path):
    """The server drops every connection (doveadm kick) and the token in use
    has meanwhile been revoked: the next operation reconnects, is refused,
    runs the command again and works with the fresh token."""
    first, second = new_token("first"), new_token("second")
    endpoint.good.add(first)
    command, runs = counting_token_cmd(tmp_path, [first, second])
    m = mounter(options=oauth_options(oauth_server, "xoauth2", command) + ["connections=1"],
                extra_args=["-d"])
    snap, bodies = oauth_state
    delim = snap["delimiter"]
    os.listdir(m.folder_path("INBOX", delim))
    assert runs() == 1
    # revoke the first token, allow the second; drop imapfs's connections
    with endpoint.lock:
        endpoint.good.discard(first)
        endpoint.good.add(second)
    r = subprocess.run(["doveadm", "-c", oauth_server.config_path, "kick", oauth_server.user],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    assert r.returncode == 0, f"doveadm kick: {r.stdout}"
    time.sleep(0.5)
    # a message not read yet: needs the server
    raw = next(raw for raw, msgs in snap["messages"].items() if raw != "INBOX" and msgs)
    uid = min(snap["messages"][raw])
    with open(m.message_path(raw, delim, uid), "rb") as f:
        assert f.read() == bodies[raw][uid]
    assert runs() == 2, f"token command ran {runs()} times, want 2"
    m.unmount()
    assert runs() == 2, f"token command ran {runs()} times by the end, want 2"
    assert second in endpoint.tokens_seen()
    assert_no_token(m.log(), oauth_server, [first, second], "the -d log")
