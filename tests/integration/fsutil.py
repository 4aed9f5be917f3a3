"""Small helpers the integration tests share: the errno of a call, whole-file
reads, and which server processes serve a mount's connections (found
through /proc, so other clients of the same server never count).
Standard library only."""

import os


def errno_of(fn, *args):
    """0 if fn(*args) works, else the errno of its OSError."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _socket_inodes(pid):
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _tcp_established():
    """[(local port, remote port, inode)] of ESTABLISHED TCP sockets."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01":
                        rows.append((int(fields[1].rsplit(":", 1)[1], 16),
                                     int(fields[2].rsplit(":", 1)[1], 16), int(fields[9])))
        except OSError:
            pass
    return rows


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(entry)[1]) == pid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def mount_server_processes(srv, mount_pid):
    """The children of srv's master process that serve mount_pid's
    connections to srv's IMAPS port, oldest first, as [(pid, start time)];
    and how many such connections the mount holds."""
    port = srv.imaps_port
    rows = _tcp_established()
    mine = _socket_inodes(mount_pid)
    client_ports = {lport for lport, rport, inode in rows if inode in mine and rport == port}
    server_inodes = {inode for lport, rport, inode in rows if lport == port and rport in client_ports}
    found = []
    for pid in _children(srv.pid):
        try:
            if _socket_inodes(pid) & server_inodes:
                found.append((pid, int(_stat_fields(pid)[19])))
        except OSError:
            pass
    return sorted(found, key=lambda p: p[1]), len(client_ports)
