#!/usr/bin/python3
"""bench/wire.py — the Python twin of bench/wire.c (same arguments, same output).

  wire.py HOST PORT USER PASSWORD_FILE CAFILE FOLDER 'UID FETCH 1:* BODY.PEEK[]'

One IMAPS connection: LOGIN, then time EXAMINE FOLDER + COMMAND up to its
tagged OK, draining the answer (literals skipped, nothing kept).  Prints
"seconds=S bytes=B literals=N literal_bytes=L".

scripts/bench uses the C drainer when gcc and OpenSSL's headers are there and
this one otherwise; `scripts/bench --compare-wire` runs both side by side, to
show which one is the faster drain (the one that is nearer the physical limit).
Standard library only.
"""

import re
import socket
import ssl
import sys
import time

LITERAL = re.compile(rb"\{(\d+)\}\r?\n$")


class Drain:
    def __init__(self, host, port, cafile):
        ctx = ssl.create_default_context(cafile=cafile)
        raw = socket.create_connection((host, int(port)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.buf = bytearray()
        self.chunk = bytearray(1 << 20)
        self.view = memoryview(self.chunk)
        self.bytes = 0
        self.literals = 0
        self.literal_bytes = 0

    def _recv(self):
        n = self.sock.recv_into(self.view)
        if n <= 0:
            raise OSError("connection closed")
        self.bytes += n
        return n

    def _line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            n = self._recv()
            self.buf += self.view[:n]

    def _skip(self, n):
        have = min(n, len(self.buf))
        del self.buf[:have]
        n -= have
        while n > 0:
            got = self._recv()
            if got > n:                     # the rest belongs to the next line
                self.buf += self.view[n:got]
                n = 0
            else:
                n -= got

    def until_tagged(self, tag):
        tag = tag.encode() + b" "
        head = None
        while True:
            line = self._line()
            if head is None:
                head = line
            m = LITERAL.search(line)
            if m:
                n = int(m.group(1))
                self.literals += 1
                self.literal_bytes += n
                self._skip(n)
                continue
            if head.startswith(tag):
                if head[len(tag):len(tag) + 2] != b"OK":
                    raise OSError(head.decode("utf-8", "replace").strip())
                return
            head = None

    def send(self, line):
        self.sock.sendall(line.encode() + b"\r\n")


def run(host, port, user, password, cafile, folder, command):
    d = Drain(host, port, cafile)
    d.until_tagged("*")
    d.send(f'a1 LOGIN "{user}" "{password}"')
    d.until_tagged("a1")
    d.bytes = len(d.buf)
    d.literals = d.literal_bytes = 0
    t0 = time.monotonic()
    d.send(f'a2 EXAMINE "{folder}"')
    d.until_tagged("a2")
    d.send(f"a3 {command}")
    d.until_tagged("a3")
    t1 = time.monotonic()
    d.send("a4 LOGOUT")
    d.sock.close()
    return dict(seconds=t1 - t0, bytes=d.bytes, literals=d.literals,
                literal_bytes=d.literal_bytes)


def main():
    if len(sys.argv) != 8:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, user, pwfile, cafile, folder, command = sys.argv[1:]
    with open(pwfile) as f:
        password = f.readline().strip()
    try:
        r = run(host, port, user, password, cafile, folder, command)
    except (OSError, ssl.SSLError) as e:
        print(f"wire.py: {e}", file=sys.stderr)
        return 2
    print(f"seconds={r['seconds']:.6f} bytes={r['bytes']} literals={r['literals']} "
          f"literal_bytes={r['literal_bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
