"""The other end of the control socket: find the processes that serve one
(psutil) and send them requests.  Imports nothing of hotpatch's core, so the
``hotpatch`` command starts quickly and loads no native code of its own.
"""
from __future__ import annotations

import json
import os
import re
import socket

import psutil

from .errors import HotpatchError

PROTOCOL = 1      # the version this client speaks (server.PROTOCOL)
TIMEOUT = 30.0

# <pid>.sock in a directory named hotpatch or hotpatch-<uid> (server.default_directories)
_SOCKET_NAME = re.compile(r"/hotpatch(?:-\d+)?/(\d+)\.sock$")


class ControlError(HotpatchError):
    """A process could not be reached, or refused or failed a request."""


def _unix_sockets(process: psutil.Process):
    # psutil 6 renamed connections() to net_connections().
    listing = getattr(process, "net_connections", None) or process.connections
    return listing(kind="unix")


def _describe(process: psutil.Process) -> str:
    try:
        return f"process {process.pid} ({process.name()})"
    except psutil.Error:
        return f"process {process.pid}"


def socket_of(pid: int) -> str:
    """The control socket of process ``pid``: a listening Unix socket of its
    own named ``<pid>.sock``."""
    try:
        process = psutil.Process(pid)
        connections = _unix_sockets(process)
    except psutil.NoSuchProcess:
        raise ControlError(f"no process {pid}") from None
    except psutil.AccessDenied:
        raise ControlError(_access_denied(pid)) from None
    for connection in connections:
        match = _SOCKET_NAME.search(connection.laddr or "")
        if match and int(match.group(1)) == pid:
            return connection.laddr
    raise ControlError(f"{_describe(process)} has no hotpatch control socket (the service "
                       f"must import hotpatch with HOTPATCH_CONTROL=1 or call hotpatch.serve())")


def _access_denied(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        uid = process.uids().real
    except psutil.Error:
        return f"process {pid}: permission denied"
    if uid != os.geteuid() and os.geteuid() != 0:
        return (f"{_describe(process)} belongs to uid {uid}: run this as that user or "
                f"as root")
    return (f"{_describe(process)}: permission denied reading its open files "
            f"(/proc/{pid}/fd; a container without CAP_SYS_PTRACE?)")


def _listening_sockets() -> dict[int, str]:
    """pid -> socket path for every control socket in /proc/net/unix (one
    read for the whole system; each is checked against its process after)."""
    found = {}
    try:
        with open("/proc/net/unix") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                # Flags __SO_ACCEPTCON (0x10000): a listening socket.
                if len(fields) < 8 or not int(fields[3], 16) & 0x10000:
                    continue
                match = _SOCKET_NAME.search(fields[7])
                if match:
                    found[int(match.group(1))] = fields[7]
    except OSError:
        pass
    return found


def serving_processes() -> list[tuple[psutil.Process, str]]:
    """Every process this user may talk to that serves a control socket,
    by pid, with its socket's path."""
    found = []
    for pid, path in sorted(_listening_sockets().items()):
        try:
            process = psutil.Process(pid)
            if any(c.laddr == path for c in _unix_sockets(process)):
                found.append((process, path))
        except psutil.Error:
            continue    # gone, or another user's
    return found


def request(pid: int, op: str, *, timeout: float = TIMEOUT, socket_path: str | None = None,
            **arguments) -> object:
    """Send one request to process ``pid`` (through ``socket_path`` when it
    is known); its result, or ControlError with the process's one-line
    reason."""
    path = socket_path or socket_of(pid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
            message = {"v": PROTOCOL, "op": op, **arguments}
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = _read_line(sock)
        except socket.timeout:
            raise ControlError(f"process {pid}: no reply within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"process {pid}: control socket {path}: "
                               f"{e.strerror or e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(reply)
    except ValueError:
        raise ControlError(f"process {pid}: a reply that is not JSON: {reply[:80]!r}") from None
    if not reply.get("ok"):
        raise ControlError(f"process {pid}: {reply.get('error', 'failed, no reason given')}")
    return reply.get("result")


def _read_line(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise ControlError("the process closed the connection without a reply")
        end = data.find(b"\n")
        if end >= 0:
            chunks.append(data[:end])
            return b"".join(chunks)
        chunks.append(data)


def processes_named(name: str) -> list[psutil.Process]:
    """The serving processes of one service: the process ``name`` names (a
    pid) and its descendants, or every process whose name, program or Python
    script is called ``name``.  Parents before children."""
    serving = {process.pid: process for process, _ in serving_processes()}
    if name.isdigit():
        try:
            root = psutil.Process(int(name))
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            raise ControlError(f"no process {name}") from None
        chosen = [p for p in family if p.pid in serving]
    else:
        chosen = [p for p in serving.values() if name in _names_of(p)]
    return sorted(chosen, key=_depth_then_pid)


def _names_of(process: psutil.Process) -> set[str]:
    try:
        names = {process.name()}
        argv = process.cmdline()
    except psutil.Error:
        return set()
    names.update(os.path.basename(a) for a in argv[:1])
    # python3 service.py, python3 -m service: the script names the service.
    if argv and "python" in os.path.basename(argv[0]):
        rest = [a for a in argv[1:] if not a.startswith("-")]
        if "-m" in argv[1:] and argv.index("-m") + 1 < len(argv):
            names.add(argv[argv.index("-m") + 1])
        elif rest:
            names.update({os.path.basename(rest[0]), os.path.splitext(os.path.basename(rest[0]))[0]})
    return names


def _depth_then_pid(process: psutil.Process) -> tuple[int, int]:
    try:
        depth = len(process.parents())
    except psutil.Error:
        depth = 0
    return depth, process.pid
