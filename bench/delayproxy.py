"""A TCP proxy that delays every byte by a fixed one-way latency.

scripts/bench uses it for the figures "at 20 ms round trip": a real IMAP
server is 20-50 ms away, not 0.05 ms as on 127.0.0.1, and what a mount does
per round trip (one batch of bodies after another, or several at once) only
shows with a real round trip.  There is no bandwidth limit: bytes are
forwarded in the chunks they arrived in, each one `delay` seconds after it
arrived.  Two threads per direction per connection; standard library only.
This machine's kernel has no netem (tc qdisc ... netem), hence a proxy.
"""

import collections
import socket
import threading
import time


class DelayProxy:
    def __init__(self, target_host, target_port, one_way_seconds):
        self.target = (target_host, target_port)
        self.delay = one_way_seconds
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        threading.Thread(target=self._accept, name="delay-accept", daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return          # closed by stop()
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, server), (server, client)):
                line = collections.deque()      # (due, bytes); b"" = the end
                ready = threading.Condition()
                threading.Thread(target=self._read, args=(src, line, ready), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, line, ready), daemon=True).start()

    def _read(self, src, line, ready):
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            with ready:
                line.append((time.monotonic() + self.delay, data))
                ready.notify()
            if not data:
                return

    @staticmethod
    def _write(dst, line, ready):
        while True:
            with ready:
                while not line:
                    ready.wait()
                due, data = line.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def stop(self):
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
