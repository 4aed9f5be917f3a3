"""A fault-injecting TCP proxy for imapfs's connection-drop tests.

``FaultProxy(target_host, target_port)`` listens on 127.0.0.1 (a free port,
``.port``) and forwards bytes both ways to the target.  It sees bytes only,
so TLS (imaps:// or STARTTLS) passes through untouched and the certificate
still names the target's host (use 127.0.0.1 for both).

What a test can tell it at runtime:

* ``cut_all()``: close every current connection now (both sides), and one
  being made at that moment as soon as it is.
* ``cut_after(c2s=None, s2c=None, scope="all", limit=None)``: close a
  connection once that many more bytes have been forwarded in that
  direction (client->server or server->client), counted from this call for
  existing connections and from their start for new ones; the chunk that
  crosses the limit is forwarded only up to it, so a cut can land in the
  middle of a literal.  ``scope``: "all", "new" or "existing"; ``limit``:
  at most that many connections are cut, then the rule disarms.
  ``clear_cuts()`` disarms.
* ``stall()`` / ``resume()``: stop forwarding (bytes wait in the kernel's
  buffers; connections stay open and new ones are accepted but get nothing)
  and carry on.
* ``blackhole_existing()``: the current connections forward nothing from
  now on and stay open (a NAT box that forgot them); new ones work.
* ``refuse(mode="reset")`` / ``accept()``: new connections are refused:
  "reset" accepts and resets at once (RST), "close" accepts and closes
  (FIN), "unbind" closes the listening socket so connect() gets
  ECONNREFUSED (``accept()`` binds the same port again).

Counters: ``connections_total``, ``connections_open()``, ``cuts``.

Standard library only: one thread accepts, one thread per connection pair
forwards with select().
"""

import errno
import select
import socket
import struct
import threading
import time


class _Pair:
    def __init__(self, proxy, client, server, index):
        self.proxy = proxy
        self.client = client
        self.server = server
        self.index = index
        self.closed = False
        self.blackholed = False     # forwards nothing, ever again, and stays open
        self.forwarded = {"c2s": 0, "s2c": 0}
        self.budget = {"c2s": None, "s2c": None}    # bytes left before a cut
        # skip_records: the budgets count only from the (skip+1)-th TLS record
        # the client sends (a record header is 5 clear bytes, so the proxy can
        # tell commands apart without decrypting: one SSL write, one record)
        self.skip_records = 0
        self.records = 0
        self.record_left = 0
        self.record_header = b""
        self.wake_r, self.wake_w = socket.socketpair()

    def _armed_from(self, data):
        """Walks client bytes through the TLS record framing; returns the
        offset in data from which the cut rule applies, or None if not yet."""
        armed = self.records > self.skip_records
        start = 0 if armed else None
        pos = 0
        while pos < len(data):
            if self.record_left == 0:
                if not self.record_header:
                    header_at = pos
                need = 5 - len(self.record_header)
                self.record_header += data[pos:pos + need]
                pos += min(need, len(data) - pos)
                if len(self.record_header) == 5:
                    self.records += 1
                    if start is None and self.records > self.skip_records:
                        start = header_at
                    self.record_left = int.from_bytes(self.record_header[3:5], "big")
                    self.record_header = b""
            else:
                n = min(self.record_left, len(data) - pos)
                pos += n
                self.record_left -= n
        return start

    def close(self, reset=False):
        if self.closed:
            return
        self.closed = True
        for s in (self.client, self.server):
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def run(self):
        p = self.proxy
        ends = {self.client: (self.server, "c2s"), self.server: (self.client, "s2c")}
        try:
            while not self.closed and not p._stopping.is_set():
                if p._stalled.is_set() or self.blackholed:
                    r, _, _ = select.select([self.wake_r], [], [], 0.05)
                    if r:
                        self.wake_r.recv(64)
                    continue
                try:
                    r, _, _ = select.select([self.client, self.server, self.wake_r], [], [], 0.2)
                except (OSError, ValueError):
                    if self.closed:     # closed by cut_all from another thread
                        break
                    raise
                for s in r:
                    if s is self.wake_r:
                        self.wake_r.recv(64)
                        continue
                    if self.closed or p._stalled.is_set():
                        break
                    dest, direction = ends[s]
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self.close()
                        break
                    with p._lock:
                        budget = self.budget[direction]
                        counted_from = 0
                        if direction == "c2s":
                            counted_from = self._armed_from(data)
                        elif self.records <= self.skip_records:
                            counted_from = None  # the server's bytes count once armed
                        if counted_from is None:
                            budget = None
                        cut = budget is not None and len(data) - counted_from >= budget
                        if cut:
                            data = data[:counted_from + budget]
                            self.budget = {"c2s": None, "s2c": None}
                            p.cuts += 1
                            p._cut_done()
                        elif budget is not None:
                            self.budget[direction] = budget - (len(data) - counted_from)
                    try:
                        if data:
                            dest.sendall(data)
                            self.forwarded[direction] += len(data)
                            p.last_forwarded = time.monotonic()
                    except OSError:
                        self.close()
                        break
                    if cut:
                        self.close()
                        break
        finally:
            self.close()
            self.wake_r.close()
            self.wake_w.close()
            with p._lock:
                if self in p._pairs:
                    p._pairs.remove(self)


class FaultProxy:
    def __init__(self, target_host, target_port, host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.host = host
        self.port = None
        self.connections_total = 0
        self.cuts = 0
        self.last_forwarded = time.monotonic()  # when any pair last passed bytes on
        self._pairs = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stalled = threading.Event()
        self._refusing = None           # None, "reset", "close", "unbind"
        self._cut_epoch = 0             # cut_all() calls so far; under _lock
        self._cut_rule = None           # dict(c2s, s2c, scope, limit)
        self._listener = None
        self._thread = None
        self._threads = []

    # ------------------------------------------------------------ life
    def _listen(self, port=0):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s
        self.port = s.getsockname()[1]

    def start(self):
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept",
                                        daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self):
        while not self._stopping.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._refusing == "unbind" or self._listener is not listener:
                    continue
                if self._stopping.is_set():
                    break
                time.sleep(0.05)
                continue
            client.settimeout(None)
            if self._stopping.is_set():
                client.close()
                break
            with self._lock:
                epoch = self._cut_epoch
            mode = self._refusing
            if mode in ("reset", "close"):
                if mode == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                # accepted before a refuse() or cut_all() that came while
                # this connection was being made: it must not outlive them
                if self._refusing or self._cut_epoch != epoch:
                    for s in (client, server):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    continue
                pair = _Pair(self, client, server, self.connections_total)
                self.connections_total += 1
                rule = self._cut_rule
                if rule and rule["scope"] in ("all", "new"):
                    pair.budget = {"c2s": rule["c2s"], "s2c": rule["s2c"]}
                self._pairs.append(pair)
            t = threading.Thread(target=pair.run, name=f"faultproxy-{pair.index}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self):
        self._stopping.set()
        self._stalled.clear()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        self.cut_all()
        for t in self._threads:
            t.join(2)
        if self._thread:
            self._thread.join(2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ faults
    def connections_open(self):
        with self._lock:
            return len(self._pairs)

    def cut_all(self, reset=False):
        """Close every current connection now."""
        with self._lock:
            pairs = list(self._pairs)
            self.cuts += len(pairs)
            self._cut_epoch += 1
        for pair in pairs:
            pair.close(reset)

    def cut_after(self, c2s=None, s2c=None, scope="all", limit=None, skip_records=0):
        """Cut a connection after c2s client bytes or s2c server bytes; with
        skip_records=k (existing connections), counting starts at the
        (k+1)-th TLS record the client sends from now on: its (k+1)-th
        command."""
        with self._lock:
            self._cut_rule = {"c2s": c2s, "s2c": s2c, "scope": scope, "limit": limit}
            if scope in ("all", "existing"):
                for pair in self._pairs:
                    pair.budget = {"c2s": c2s, "s2c": s2c}
                    pair.skip_records = skip_records
                    pair.records = 0
                    pair.record_left = 0
                    pair.record_header = b""

    def _cut_done(self):
        # called with _lock held after a pair was cut by the rule
        rule = self._cut_rule
        if rule and rule["limit"] is not None:
            rule["limit"] -= 1
            if rule["limit"] <= 0:
                self._cut_rule = None
                for pair in self._pairs:
                    pair.budget = {"c2s": None, "s2c": None}

    def clear_cuts(self):
        with self._lock:
            self._cut_rule = None
            for pair in self._pairs:
                pair.budget = {"c2s": None, "s2c": None}

    def stall(self):
        self._stalled.set()

    def wait_quiet(self, quiet=1.0, within=20.0):
        """Returns once no bytes have passed, either way, for quiet seconds:
        what the client had under way is over."""
        deadline = time.monotonic() + within
        while time.monotonic() - self.last_forwarded < quiet:
            if time.monotonic() > deadline:
                raise AssertionError(f"the connections through the proxy never went quiet "
                                     f"for {quiet}s within {within}s")
            time.sleep(0.05)

    def blackhole_existing(self):
        """What a NAT box does when it forgets idle connections: the current
        ones forward nothing from now on, silently (no FIN, no RST); new
        connections work."""
        with self._lock:
            for pair in self._pairs:
                pair.blackholed = True

    def resume(self):
        self._stalled.clear()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            try:
                pair.wake_w.send(b"x")
            except OSError:
                pass

    def refuse(self, mode="reset"):
        if mode not in ("reset", "close", "unbind"):
            raise ValueError(mode)
        self._refusing = mode
        if mode == "unbind" and self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def accept(self):
        """Stop refusing new connections (rebinding the port after 'unbind')."""
        if self._refusing == "unbind":
            for _ in range(50):
                try:
                    self._listen(self.port)
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
                    time.sleep(0.1)
        self._refusing = None
