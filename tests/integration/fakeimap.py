"""A small scriptable fake IMAP server for imapfs's hostile-input tests.

It speaks just enough IMAP4rev1 to get imapfs mounted and reading:
greeting, CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN (SASL-IR),
ENABLE, LIST, EXAMINE/SELECT, UID FETCH (metadata and BODY.PEEK[]),
UID SEARCH, STATUS, NOOP, UNSELECT, IDLE, NOTIFY, LOGOUT.  Everything else
gets BAD.

What makes it useful is that a test can replace or splice any answer:

* ``FakeIMAP.on(command, fn, once=False)`` installs a hook.  For every
  command whose name matches (``"UID FETCH"``, ``"LIST"``, ``"EXAMINE"``,
  ``"*"`` for all...), ``fn(conn, cmd)`` is called first; it returns None
  (answer normally) or a *script*: a list of chunks sent in order, each
  either bytes, or ``CLOSE`` (drop the connection), ``STALL`` (never answer
  again: hold the connection open until the server stops or
  ``release_stalls()``), ``Sleep(seconds)``, or ``START_TLS`` (begin the
  server side of a TLS handshake now).  ``conn.default(cmd)`` gives the
  normal answer as such a list so a hook can splice into it;
  ``conn.fetch_item(...)``/``fetch_body(...)`` build single FETCH responses.
* ``s2c_budget(conn_index) -> int|None`` cuts a connection after that many
  bytes server -> client (the rest of the chunk is dropped and the socket
  closed), so a response can be truncated at any chosen byte.
* ``on_connect(conn) -> script|None`` replaces the greeting.

It records what it saw (``commands``: (conn index, TLS active?, name, raw
line)), so a test can check for instance that LOGIN never arrived over
plaintext, and per connection every byte received before TLS started.

TLS uses a throwaway self-signed certificate for 127.0.0.1/localhost made
with ``openssl req -x509`` (``make_certificate``); ``cafile`` is its path.

Standard library only; one thread per client connection; binds 127.0.0.1
on a free port.
"""

import atexit
import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time

CRLF = b"\r\n"


class _Marker:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


CLOSE = _Marker("CLOSE")
STALL = _Marker("STALL")
START_TLS = _Marker("START_TLS")


class Sleep:
    def __init__(self, seconds):
        self.seconds = seconds


class _Closed(Exception):
    """The connection is gone (closed by us, by a budget, or by the peer)."""


# --------------------------------------------------------------------------
# certificate

_cert_lock = threading.Lock()
_cert = None


def make_certificate():
    """(certfile, keyfile) of a self-signed cert for 127.0.0.1 and localhost.
    Made once per process in a temporary directory removed at exit."""
    global _cert
    with _cert_lock:
        if _cert:
            return _cert
        d = tempfile.mkdtemp(prefix="fakeimap-cert-")
        atexit.register(shutil.rmtree, d, True)
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _cert = (cert, key)
        return _cert


# --------------------------------------------------------------------------
# IMAP syntax helpers

_QUOTABLE = re.compile(rb'^[\x20-\x7e]*$')


def quote(data):
    """An IMAP quoted string for printable ASCII data, else a literal."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if _QUOTABLE.match(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal(data)


def literal(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return b"{%d}\r\n" % len(data) + data


def _tokens(data):
    """Splits command arguments into tokens: bytes for atoms/strings, lists
    for parenthesised groups.  Good enough for what imapfs sends."""
    pos = 0
    stack = [[]]
    n = len(data)
    while pos < n:
        c = data[pos:pos + 1]
        if c == b" ":
            pos += 1
        elif c == b"(":
            stack.append([])
            pos += 1
        elif c == b")":
            if len(stack) > 1:
                done = stack.pop()
                stack[-1].append(done)
            pos += 1
        elif c == b'"':
            out = bytearray()
            pos += 1
            while pos < n and data[pos:pos + 1] != b'"':
                if data[pos:pos + 1] == b"\\" and pos + 1 < n:
                    pos += 1
                out += data[pos:pos + 1]
                pos += 1
            pos += 1
            stack[-1].append(bytes(out))
        elif c == b"{":
            m = re.match(rb"\{(\d+)\+?\}\r\n", data[pos:])
            if not m:
                stack[-1].append(data[pos:pos + 1])
                pos += 1
                continue
            size = int(m.group(1))
            start = pos + m.end()
            stack[-1].append(data[start:start + size])
            pos = start + size
        else:
            m = re.match(rb"[^ ()\"]+(?:\[[^\]]*\](?:<[0-9.]+>)?)?", data[pos:])
            tok = m.group(0) if m else data[pos:pos + 1]
            stack[-1].append(tok)
            pos += len(tok)
    while len(stack) > 1:
        done = stack.pop()
        stack[-1].append(done)
    return stack[0]


def parse_uid_set(text, max_uid):
    """The UIDs matched by an IMAP sequence set (as a predicate-ready set of
    ranges): returns a list of (lo, hi) with '*' as max_uid."""
    ranges = []
    for part in text.split(b","):
        if b":" in part:
            a, b = part.split(b":", 1)
        else:
            a = b = part
        lo = max_uid if a == b"*" else int(a)
        hi = max_uid if b == b"*" else int(b)
        if lo > hi:
            lo, hi = hi, lo
        ranges.append((lo, hi))
    return ranges


# --------------------------------------------------------------------------
# the account

class Message:
    def __init__(self, uid, body, size=None, internaldate="17-Jul-2023 02:44:25 +0000",
                 flags=()):
        self.uid = uid
        self.body = body if isinstance(body, bytes) else body.encode()
        self.size = len(self.body) if size is None else size
        self.internaldate = internaldate
        self.flags = list(flags)


class Mailbox:
    def __init__(self, name, delimiter="/", attrs=(), messages=(), uidvalidity=1,
                 uidnext=None):
        self.name = name.encode() if isinstance(name, str) else name
        self.delimiter = delimiter
        self.attrs = list(attrs)
        self.messages = list(messages)
        self.uidvalidity = uidvalidity
        self._uidnext = uidnext

    @property
    def uidnext(self):
        if self._uidnext is not None:
            return self._uidnext
        return max((m.uid for m in self.messages), default=0) + 1

    def list_line(self):
        attrs = " ".join(self.attrs).encode()
        delim = b"NIL" if self.delimiter is None else quote(self.delimiter)
        return b"* LIST (" + attrs + b") " + delim + b" " + quote(self.name) + CRLF

    def find(self, uid):
        for seq, m in enumerate(self.messages, 1):
            if m.uid == uid:
                return seq, m
        return None, None


def simple_message(uid, text=None, folder="INBOX"):
    """A small RFC 5322 message whose body names its folder and UID."""
    text = text or f"This is message {uid} in {folder}.\r\n"
    return Message(uid, (f"From: a@example.org\r\nTo: b@example.org\r\n"
                         f"Subject: message {uid}\r\nMessage-ID: <{uid}.{folder}@fake>\r\n"
                         f"\r\n{text}").encode())


# --------------------------------------------------------------------------
# one client command

class Command:
    def __init__(self, tag, name, args, raw):
        self.tag = tag              # bytes
        self.name = name            # "UID FETCH", "LOGIN", ... (upper-case str)
        self.args = args            # raw bytes after the name (literals inline)
        self.raw = raw              # the whole command as received
        self.tokens = _tokens(args)

    def ok(self, text="done", code=None):
        return self.tag + b" OK " + (b"[" + code.encode() + b"] " if code else b"") + \
            text.encode() + CRLF

    def no(self, text="no", code=None):
        return self.tag + b" NO " + (b"[" + code.encode() + b"] " if code else b"") + \
            text.encode() + CRLF

    def bad(self, text="unknown command"):
        return self.tag + b" BAD " + text.encode() + CRLF

    def __repr__(self):
        return f"<Command {self.tag!r} {self.name} {self.args[:80]!r}>"


# --------------------------------------------------------------------------
# one client connection

class Connection:
    def __init__(self, server, sock, index):
        self.server = server
        self.sock = sock
        self.index = index
        self.tls = False
        self.budget = None          # bytes server->client left before a cut
        self.sent = 0
        self.selected = None        # Mailbox
        self.authenticated = False
        self.plaintext_in = bytearray()   # everything received before TLS
        self.closed = False
        self._buf = b""

    # ---------------------------------------------------------- output
    def send(self, data):
        if self.closed:
            raise _Closed()
        if self.budget is not None and len(data) > self.budget:
            data = data[:self.budget]
            self.budget = 0
            self._sendall(data)
            self.close()
            raise _Closed()
        if self.budget is not None:
            self.budget -= len(data)
        self._sendall(data)

    def _sendall(self, data):
        if not data:
            return
        try:
            self.sock.sendall(data)
            self.sent += len(data)
        except (OSError, ssl.SSLError):
            self.closed = True
            raise _Closed()

    def run_script(self, script):
        for chunk in script:
            if chunk is CLOSE:
                self.close()
                raise _Closed()
            elif chunk is STALL:
                self.server._stall(self)
                self.close()
                raise _Closed()
            elif chunk is START_TLS:
                self.start_tls()
            elif isinstance(chunk, Sleep):
                time.sleep(chunk.seconds)
            elif isinstance(chunk, (bytes, bytearray)):
                self.send(bytes(chunk))
            else:
                raise TypeError(f"bad script chunk {chunk!r}")

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def start_tls(self):
        cert, key = make_certificate()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.sock.settimeout(10)
        try:
            self.sock = ctx.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError) as e:
            self.server.events.append((self.index, "tls-failed", str(e)))
            self.close()
            raise _Closed()
        self.sock.settimeout(None)
        self.tls = True
        self._buf = b""

    # ---------------------------------------------------------- input
    def _recv(self):
        try:
            data = self.sock.recv(65536)
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            raise _Closed()
        if not self.tls:
            self.plaintext_in += data
        self.server.received += data if len(self.server.received) < (1 << 20) else b""
        return data

    def _line(self):
        while b"\r\n" not in self._buf:
            if len(self._buf) > (1 << 20):
                raise _Closed()
            self._buf += self._recv()
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def _exact(self, n):
        while len(self._buf) < n:
            self._buf += self._recv()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_command(self):
        """A whole command, literals inline (and answered with '+' unless
        LITERAL+).  Returns Command, or None for an empty line."""
        raw = b""
        while True:
            line = self._line()
            raw += line
            m = re.search(rb"\{(\d+)(\+?)\}\r\n$", line)
            if not m:
                break
            if not m.group(2):
                self.send(b"+ go ahead" + CRLF)
            raw += self._exact(int(m.group(1)))
        body = raw[:-2]
        if not body.strip():
            return None
        parts = body.split(b" ", 2)
        tag = parts[0]
        name = parts[1].upper().decode("ascii", "replace") if len(parts) > 1 else ""
        args = parts[2] if len(parts) > 2 else b""
        if name == "UID" and args:
            sub = args.split(b" ", 1)
            name = "UID " + sub[0].upper().decode("ascii", "replace")
            args = sub[1] if len(sub) > 1 else b""
        return Command(tag, name, args, raw)

    # ---------------------------------------------------------- answers
    def capability_line(self):
        return b"* CAPABILITY " + " ".join(self.server.capabilities_for(self)).encode() + CRLF

    def fetch_meta(self, seq, message):
        flags = " ".join(message.flags).encode()
        return (b"* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE \"%s\" FLAGS (%s))\r\n"
                % (seq, message.uid, message.size, message.internaldate.encode(), flags))

    def fetch_body(self, seq, message, body=None):
        body = message.body if body is None else body
        return b"* %d FETCH (UID %d BODY[] " % (seq, message.uid) + literal(body) + b")" + CRLF

    def matched(self, cmd):
        """[(seq, Message)] of the selected mailbox for a UID FETCH/SEARCH set."""
        box = self.selected
        if box is None or not cmd.tokens:
            return []
        max_uid = max((m.uid for m in box.messages), default=0)
        try:
            ranges = parse_uid_set(cmd.tokens[0], max_uid)
        except ValueError:
            return []
        out = [(seq, m) for seq, m in enumerate(box.messages, 1)
               if any(lo <= m.uid <= hi for lo, hi in ranges)]
        # "n:*" always matches the last message (RFC 3501 6.4.8)
        if not out and box.messages and b"*" in cmd.tokens[0]:
            out = [(len(box.messages), box.messages[-1])]
        return out

    def is_body_fetch(self, cmd):
        return b"BODY.PEEK[]" in cmd.args.upper() or b"BODY[]" in cmd.args.upper()

    def default(self, cmd):
        """The normal answer to cmd, as a script."""
        srv = self.server
        name = cmd.name
        if name == "CAPABILITY":
            return [self.capability_line(), cmd.ok("CAPABILITY completed")]
        if name == "NOOP":
            return [cmd.ok("NOOP completed")]
        if name == "LOGOUT":
            return [b"* BYE logging out" + CRLF, cmd.ok("LOGOUT completed"), CLOSE]
        if name == "STARTTLS":
            if not srv.tls_available or self.tls:
                return [cmd.bad("STARTTLS not available")]
            return [cmd.ok("Begin TLS negotiation now"), START_TLS]
        if name == "LOGIN":
            if srv.login_disabled and not self.tls:
                return [cmd.no("LOGIN disabled", code="PRIVACYREQUIRED")]
            toks = cmd.tokens
            if len(toks) >= 2 and toks[0] == srv.user.encode() and \
                    toks[1] == srv.password.encode("utf-8"):
                self.authenticated = True
                return [cmd.ok("Logged in")]
            return [cmd.no("Authentication failed", code="AUTHENTICATIONFAILED")]
        if name == "AUTHENTICATE":
            toks = cmd.tokens
            if len(toks) >= 2 and toks[0].upper() == b"PLAIN":
                try:
                    raw = base64.b64decode(toks[1])
                except ValueError:
                    raw = b""
                want = b"\0" + srv.user.encode() + b"\0" + srv.password.encode("utf-8")
                if raw == want or raw == srv.user.encode() + want:
                    self.authenticated = True
                    return [cmd.ok("Logged in")]
            return [cmd.no("Authentication failed", code="AUTHENTICATIONFAILED")]
        if name == "ENABLE":
            return [b"* ENABLED" + CRLF, cmd.ok("ENABLE completed")]
        if not self.authenticated and srv.require_login:
            return [cmd.bad("log in first")]
        if name == "LIST":
            if srv.list_lines is not None:
                lines = list(srv.list_lines)
            else:
                lines = [box.list_line() for box in srv.mailboxes]
            return lines + [cmd.ok("LIST completed")]
        if name in ("EXAMINE", "SELECT"):
            self.selected = None
            box = srv.mailbox(cmd.tokens[0] if cmd.tokens else b"")
            if box is None:
                return [cmd.no("Mailbox doesn't exist", code="NONEXISTENT")]
            self.selected = box
            return [b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)" + CRLF,
                    b"* OK [PERMANENTFLAGS ()] No permanent flags permitted" + CRLF,
                    b"* %d EXISTS" % len(box.messages) + CRLF,
                    b"* 0 RECENT" + CRLF,
                    b"* OK [UIDVALIDITY %d] UIDs valid" % box.uidvalidity + CRLF,
                    b"* OK [UIDNEXT %d] Predicted next UID" % box.uidnext + CRLF,
                    cmd.ok("%s completed" % name,
                           code="READ-ONLY" if name == "EXAMINE" else "READ-WRITE")]
        if name == "UNSELECT":
            self.selected = None
            return [cmd.ok("UNSELECT completed")]
        if name == "STATUS":
            box = srv.mailbox(cmd.tokens[0] if cmd.tokens else b"")
            if box is None:
                return [cmd.no("Mailbox doesn't exist", code="NONEXISTENT")]
            return [b"* STATUS " + quote(box.name) + b" (UIDNEXT %d UIDVALIDITY %d MESSAGES %d)"
                    % (box.uidnext, box.uidvalidity, len(box.messages)) + CRLF,
                    cmd.ok("STATUS completed")]
        if name == "IDLE":      # wait for DONE; a hook can push data first
            self.send(b"+ idling" + CRLF)
            while self._line().strip().upper() != b"DONE":
                pass
            return [cmd.ok("IDLE terminated")]
        if name == "NOTIFY":    # accepted; a hook pushes what it likes
            return [cmd.ok("NOTIFY completed")]
        if name == "UID SEARCH":
            box = self.selected.messages if self.selected else []
            uids = b" ".join(b"%d" % m.uid for m in box)
            return [b"* SEARCH" + (b" " + uids if uids else b"") + CRLF, cmd.ok("SEARCH completed")]
        if name == "UID FETCH":
            if self.selected is None:
                return [cmd.bad("no mailbox selected")]
            out = []
            body = self.is_body_fetch(cmd)
            for seq, m in self.matched(cmd):
                out.append(self.fetch_body(seq, m) if body else self.fetch_meta(seq, m))
            return out + [cmd.ok("FETCH completed")]
        return [cmd.bad("unknown command")]

    # ---------------------------------------------------------- loop
    def serve(self):
        srv = self.server
        try:
            if srv.implicit_tls:
                self.start_tls()
            budget = srv.s2c_budget(self.index) if srv.s2c_budget else None
            self.budget = budget
            script = srv.on_connect(self) if srv.on_connect else None
            if script is None:
                script = [srv.greeting(self) if callable(srv.greeting) else srv.greeting]
            self.run_script(script)
            while not self.closed:
                cmd = self.read_command()
                if cmd is None:
                    continue
                srv.commands.append((self.index, self.tls, cmd.name, cmd.raw))
                script = srv._hook(self, cmd)
                if script is None:
                    script = self.default(cmd)
                self.run_script(script)
        except _Closed:
            pass
        except Exception as e:  # a bug in a hook: keep the server up, note it
            srv.events.append((self.index, "error", repr(e)))
        finally:
            self.close()


# --------------------------------------------------------------------------
# the server

class FakeIMAP:
    """A fake IMAP server on 127.0.0.1.

    tls: None (plaintext only), "starttls" (offers STARTTLS), or "implicit"
    (TLS from the first byte, like imaps).  advertise_starttls overrides
    whether STARTTLS appears in the pre-TLS CAPABILITY.
    """

    def __init__(self, mailboxes=None, tls=None, user="alice", password="secret-pass",
                 capabilities=("IMAP4rev1",), advertise_starttls=None,
                 login_disabled=False, auth_plain=False):
        self.mailboxes = list(mailboxes) if mailboxes is not None else [
            Mailbox("INBOX", messages=[simple_message(1), simple_message(2)])]
        self.tls_mode = tls
        self.tls_available = tls == "starttls"
        self.implicit_tls = tls == "implicit"
        self.advertise_starttls = self.tls_available if advertise_starttls is None \
            else advertise_starttls
        self.user = user
        self.password = password
        self.capabilities = list(capabilities)
        self.login_disabled = login_disabled
        self.auth_plain = auth_plain
        self.require_login = True
        self.list_lines = None          # raw "* LIST ..." lines instead of mailboxes
        self.greeting = b"* OK fake IMAP server ready" + CRLF
        self.on_connect = None
        self.s2c_budget = None
        self.hooks = []                 # [name, fn, once, used]
        self.commands = []              # (conn index, tls?, name, raw)
        self.events = []                # (conn index, kind, detail)
        self.received = bytearray()     # all bytes received (first MiB)
        self.connections = []
        self.port = None
        self.host = "127.0.0.1"
        self._listener = None
        self._thread = None
        self._stopping = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._threads = []

    # -------------------------------------------------------------- config
    @property
    def cafile(self):
        return make_certificate()[0]

    def capabilities_for(self, conn):
        caps = list(self.capabilities)
        if self.advertise_starttls and not conn.tls:
            caps.append("STARTTLS")
        if self.login_disabled and not conn.tls:
            caps.append("LOGINDISABLED")
        if self.auth_plain:
            caps += ["AUTH=PLAIN", "SASL-IR"]
        return caps

    def mailbox(self, name):
        for box in self.mailboxes:
            if box.name == name or (box.name.upper() == b"INBOX" and name.upper() == b"INBOX"):
                return box
        return None

    def on(self, name, fn, once=False):
        """Hook fn(conn, cmd) -> script|None for commands named name ('*': all)."""
        self.hooks.append([name.upper(), fn, once, False])

    def _hook(self, conn, cmd):
        for hook in list(self.hooks):
            name, fn, once, used = hook
            if used or (name != "*" and name != cmd.name):
                continue
            script = fn(conn, cmd)
            if script is not None:
                if once:
                    hook[3] = True
                return script
        return None

    def logins(self):
        """[(conn index, over TLS?)] of every LOGIN/AUTHENTICATE received."""
        return [(i, tls) for i, tls, name, _ in self.commands if name in ("LOGIN", "AUTHENTICATE")]

    def names(self, conn_index=None):
        return [name for i, _, name, _ in self.commands if conn_index in (None, i)]

    def selected_names(self):
        """The raw mailbox names of every EXAMINE/SELECT received."""
        out = []
        for _, _, name, raw in self.commands:
            if name in ("EXAMINE", "SELECT"):
                toks = _tokens(raw.split(b" ", 2)[2][:-2] if raw.count(b" ") >= 2 else b"")
                out.append(toks[0] if toks else b"")
        return out

    # -------------------------------------------------------------- life
    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, 0))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s
        self.port = s.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="fakeimap-accept",
                                        daemon=True)
        self._thread.start()
        if self.tls_mode:
            make_certificate()
        return self

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            sock.settimeout(None)
            if self._stopping.is_set():
                sock.close()
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = Connection(self, sock, len(self.connections))
                self.connections.append(conn)
            t = threading.Thread(target=conn.serve, name=f"fakeimap-{conn.index}", daemon=True)
            self._threads.append(t)
            t.start()

    def _stall(self, conn):
        # hold the connection open, reading nothing, until told otherwise
        while not self._release.wait(0.1):
            if self._stopping.is_set() or conn.closed:
                return

    def release_stalls(self):
        """Stalled connections are closed now (new stalls still stall)."""
        self._release.set()
        time.sleep(0.2)
        self._release.clear()

    def close_all(self):
        """Drop every client connection now."""
        with self._lock:
            conns = list(self.connections)
        for c in conns:
            c.close()

    def stop(self):
        self._stopping.set()
        self._release.set()
        if self._listener:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept() at once
            except OSError:
                pass
            try:
                self._listener.close()
            except OSError:
                pass
        self.close_all()
        for t in self._threads:
            t.join(2)
        if self._thread:
            self._thread.join(2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
