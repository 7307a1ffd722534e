"""The control socket: this process's /sys/kernel/livepatch, for the
``hotpatch`` command of another process.

``serve()`` (or ``HOTPATCH_CONTROL=1`` at import) opens one Unix socket per
process, ``<directory>/<pid>.sock``, in a directory only this user can enter:
``$XDG_RUNTIME_DIR/hotpatch/``, else ``/run/hotpatch/`` for root, else
``/tmp/hotpatch-<uid>/``.  The socket file is mode 0600 and every connection's
peer credentials are checked: this process's user and root only.

The protocol is JSON lines.  A request is one object on one line,
``{"v": 1, "op": "...", ...arguments, "id": anything}``; the reply is one
line, ``{"v": 1, "id": ..., "ok": true, "result": ...}`` or ``{"v": 1, "id":
..., "ok": false, "error": "one line"}``.  Operations: ``status``, ``tree``,
``enable``/``disable``/``unregister`` (``patch``), ``load`` (``path``,
absolute), ``symbols`` (``object``, ``pattern``).

One daemon thread serves every connection with ``poll``, so a client that
stalls or floods cannot hold up another; it waits in ``poll`` with the GIL
released.  A request line longer than ``MAX_LINE``, or one left unfinished
for ``IDLE_TIMEOUT`` seconds, gets an error and the connection is closed.
A ``fork()``ed child of a serving process serves on its own socket (the
workers of a pre-forking service); the socket is removed at exit, and one
left by a process that died is recognized and replaced.
"""
from __future__ import annotations

import atexit
import errno
import fnmatch
import json
import os
import selectors
import socket
import stat
import struct
import sys
import threading
import time

from . import __version__, control, core, module, symbols
from ._native import lib
from .errors import HotpatchError

PROTOCOL = 1
MAX_LINE = 1 << 20          # bytes in one request line
IDLE_TIMEOUT = 10.0         # seconds a connection may stall mid-request or unread
MAX_CLIENTS = 32
SWEEP_INTERVAL = 60.0       # seconds between removals of dead processes' sockets
_RECV = 65536

_server: "_Server | None" = None
_serve_lock = threading.Lock()


# ---------------------------------------------------------------------------
# Where the socket lives


def default_directories() -> list[str]:
    """Where the socket goes, in order of preference:
    ``$XDG_RUNTIME_DIR/hotpatch``, else ``/run/hotpatch`` for root, else (or
    where those cannot be created, e.g. a read-only /run)
    ``/tmp/hotpatch-<uid>``."""
    places = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        places.append(os.path.join(runtime, "hotpatch"))
    elif os.geteuid() == 0 and os.path.isdir("/run"):
        places.append("/run/hotpatch")
    places.append(f"/tmp/hotpatch-{os.geteuid()}")
    return places


def _default_directory() -> str:
    """The first default directory that can be made private, or the error
    of the preferred one."""
    first_error = None
    for place in default_directories():
        try:
            _private_directory(place)
            return place
        except _CannotCreate as e:
            first_error = first_error or e
    raise first_error


class _CannotCreate(HotpatchError):
    """The directory could not be created (a read-only or foreign parent):
    the next place may do."""


def _private_directory(path: str) -> None:
    """Create ``path`` (mode 0700) or check that the one there is this
    user's own, private, real directory: in /tmp another user could have
    made it first."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise _CannotCreate(f"control socket: cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HotpatchError(f"control socket: {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise HotpatchError(f"control socket: {path} belongs to uid {st.st_uid}, not to "
                            f"this process's user ({os.geteuid()})")
    if st.st_mode & 0o077:
        raise HotpatchError(f"control socket: {path} is open to other users (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); it must be 0700")


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _remove_stale(directory: str) -> None:
    """Remove sockets of processes that are gone (killed before their exit
    handlers ran): nothing listens on them any more."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        stem, dot, ext = name.partition(".")
        path = os.path.join(directory, name)
        if ext != "sock" or not stem.isdigit():
            continue
        try:
            os.kill(int(stem), 0)
            alive = int(stem) != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        # A live pid may be a new process that reuses a dead one's number.
        if alive or not stat.S_ISSOCK(os.lstat(path).st_mode) or _socket_is_live(path):
            continue
        try:
            os.unlink(path)
        except OSError:
            pass


def _bind(path: str) -> socket.socket:
    if len(os.fsencode(path)) >= 108:
        raise HotpatchError(f"control socket: the path {path} is too long for a Unix socket")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise HotpatchError(f"control socket: {path} exists and is not a socket")
        if _socket_is_live(path):
            raise HotpatchError(f"control socket: another process listens on {path}")
        os.unlink(path)           # left by a process with this pid that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise HotpatchError(f"control socket: cannot listen on {path}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------
# Operations


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _registered(name) -> core.Patch:
    if not isinstance(name, str) or not name:
        raise ValueError('"patch" must be a patch name')
    for patch in core.patches():
        if patch.name == name:
            return patch
    names = ", ".join(p.name for p in core.patches()) or "none"
    raise HotpatchError(f"no patch named {name!r} is registered (registered: {names})")


def _patch_status(patch: core.Patch) -> dict:
    return {"name": patch.name, "enabled": patch.enabled, "enabled_at": patch.enabled_at,
            "replace": patch.replace, "stack_order": core.stack_order(patch),
            "consistency": patch.consistency, "forced": patch.forced,
            "module": patch.module_path}


def op_status(request: dict) -> dict:
    server = _server
    return {"pid": os.getpid(), "protocol": PROTOCOL, "hotpatch": __version__,
            "python": sys.version.split()[0], "argv": sys.argv, "uid": os.geteuid(),
            "socket": server.path if server else None,
            "serving_since": server.started if server else None,
            "tainted": core.tainted(), "patches": [_patch_status(p) for p in core.patches()]}


def _pool_ranges() -> list[tuple[int, int]]:
    """Where hotpatch's trampolines are (named "hotpatch" in the maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and ("[anon:hotpatch]" in fields[5] or "/memfd:hotpatch" in fields[5]):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def symbolize(address: int, objects=None, pool=()) -> str:
    """``name+0x10 [object]`` for a code address, as the kernel prints
    ``%pS``; ``[hotpatch trampoline]`` in the pool; ``?`` elsewhere."""
    if any(lo <= address < hi for lo, hi in pool):
        return "[hotpatch trampoline]"
    for obj in objects if objects is not None else symbols.loaded_objects():
        if any(lo <= address < hi for lo, hi in obj.exec_ranges):
            try:
                return f"{symbols.resolve_offset(obj, address - obj.base).name} [{obj.basename}]"
            except HotpatchError:
                return f"? [{obj.basename}]"
    return "?"


def op_tree(request: dict) -> dict:
    tree = control.tree()
    objects, pool = symbols.loaded_objects(), _pool_ranges()
    names = {}
    for patch in tree["livepatch"].values():
        for node in patch.values():
            if not isinstance(node, dict):
                continue
            for func in node.values():
                if isinstance(func, dict):
                    for key in ("old_addr", "new_addr", "original"):
                        if func.get(key):
                            names[hex(func[key])] = symbolize(func[key], objects, pool)
    return {"tree": tree, "names": names}


def _force(request: dict) -> bool:
    """``"force": true`` (optional): the stack model's force."""
    force = request.get("force", False)
    if not isinstance(force, bool):
        raise ValueError('"force" must be true or false')
    return force


def op_enable(request: dict) -> dict:
    patch = _registered(request.get("patch"))
    core.enable(patch, force=_force(request))
    return _patch_status(patch)


def op_disable(request: dict) -> dict:
    patch = _registered(request.get("patch"))
    core.disable(patch, force=_force(request))
    return _patch_status(patch)


def op_unregister(request: dict) -> dict:
    patch = _registered(request.get("patch"))
    core.unregister(patch)
    return {"name": patch.name, "registered": False}


def check_module_file(path) -> str:
    """The real path of a patch module this process may load, or an error:
    code that others could have written must not run here."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError('"path" must be an absolute path to a patch module')
    real = os.path.realpath(path)
    try:
        st_file, st_dir = os.stat(real), os.stat(os.path.dirname(real))
    except OSError as e:
        raise HotpatchError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st_file.st_mode):
        raise HotpatchError(f"{path}: not a regular file")
    for what, where, st in (("file", real, st_file), ("directory", os.path.dirname(real), st_dir)):
        if st.st_uid not in (os.geteuid(), 0):
            raise HotpatchError(f"refused: the patch module's {what} {where} belongs to uid "
                                f"{st.st_uid}, neither this process's user ({os.geteuid()}) nor root")
        # A sticky directory (/tmp) lets nobody rename or remove a file he does not own.
        sticky = what == "directory" and st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            raise HotpatchError(f"refused: the patch module's {what} {where} is writable by "
                                f"other users (mode {stat.S_IMODE(st.st_mode):04o})")
    return real


def op_load(request: dict) -> dict:
    """Load and enable a patch module.  The same file (by content) loaded
    again is "already applied", or enabled again if it was disabled."""
    path = check_module_file(request.get("path"))
    digest = module.digest(path)
    for patch in core.patches():
        if patch.module_digest == digest:
            if patch.enabled:
                return {**_patch_status(patch), "state": "already applied"}
            core.enable(patch)
            return {**_patch_status(patch), "state": "enabled (it was loaded, disabled)"}
    patch = module.load(path)
    return {**_patch_status(patch), "state": "loaded"}


def op_symbols(request: dict) -> dict:
    """Functions of a loaded object whose names match ``pattern`` (a glob;
    without wildcards, a substring)."""
    name, pattern = request.get("object"), request.get("pattern") or "*"
    if not isinstance(name, str) or not name or not isinstance(pattern, str):
        raise ValueError('"object" must be an object name ("main" for the main program) '
                         'and "pattern" a string')
    obj = symbols.find_object(None if name == "main" else name)
    if obj is None:
        raise HotpatchError(f"object {name} is not loaded in this process")
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    listing = [{"name": s.name, "sympos": s.sympos, "address": s.address, "size": s.size}
               for s in symbols.functions(obj) if fnmatch.fnmatchcase(s.name, pattern)]
    return {"object": str(obj), "path": obj.path, "base": obj.base, "functions": listing}


OPERATIONS = {"status": op_status, "tree": op_tree, "enable": op_enable, "disable": op_disable,
              "unregister": op_unregister, "load": op_load, "symbols": op_symbols}


def handle(line: bytes) -> dict:
    """The reply to one request line; never raises."""
    request_id = None
    try:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"bad request: not JSON ({e})") from None
        if not isinstance(request, dict):
            raise ValueError("bad request: a request is a JSON object")
        request_id = request.get("id")
        if type(request.get("v")) is not int or request["v"] != PROTOCOL:
            raise ValueError(f"protocol version {request.get('v')!r} is not spoken here "
                             f"(this process speaks {PROTOCOL}; put \"v\": {PROTOCOL} in the request)")
        operation = OPERATIONS.get(request.get("op"))
        if operation is None:
            raise ValueError(f"unknown operation {request.get('op')!r} (known: "
                             f"{', '.join(sorted(OPERATIONS))})")
        return {"v": PROTOCOL, "id": request_id, "ok": True, "result": operation(request)}
    except OSError as e:
        error = _one_line(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except (HotpatchError, ValueError, TypeError) as e:
        error = _one_line(e)
    except Exception as e:    # a bug here must not end the server
        error = f"internal error: {type(e).__name__}: {_one_line(e)}"
    return {"v": PROTOCOL, "id": request_id, "ok": False, "error": error}


# ---------------------------------------------------------------------------
# The server


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.closing = False          # reply sent last, then close
        self.deadline = time.monotonic() + IDLE_TIMEOUT

    def reply(self, message: dict) -> None:
        self.outbox += json.dumps(message, separators=(",", ":")).encode() + b"\n"


class _Server:
    def __init__(self, directory: str):
        self.directory = directory
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"{self.pid}.sock")
        self.started = time.time()
        self.listener = _bind(self.path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._connections: dict[int, _Connection] = {}
        self._selector = selectors.PollSelector()    # no kernel object a fork would share
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, name="hotpatch-control", daemon=True)
        self.thread.start()

    # the loop ---------------------------------------------------------------

    def _run(self) -> None:
        # Whatever mask it inherited, the signal stop must be able to park it.
        lib.hp_unblock_park_signal()
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while not self._stopping:
            wake = min([next_sweep, *(c.deadline for c in self._connections.values())])
            timeout = max(0.0, wake - time.monotonic())
            try:
                events = self._selector.select(timeout)
            except OSError:
                return    # the selector was closed under us (stop, exit)
            for key, mask in events:
                try:
                    self._dispatch(key.fileobj, mask)
                except Exception:
                    if key.fileobj in (self.listener, self._wake_r):
                        continue
                    self._close(key.fileobj)
            self._expire()
            if time.monotonic() >= next_sweep:
                # Workers that end with os._exit() (multiprocessing's do) run no
                # exit handler: their sockets are removed here.
                _remove_stale(self.directory)
                next_sweep = time.monotonic() + SWEEP_INTERVAL

    def _dispatch(self, fileobj, mask: int) -> None:
        if fileobj is self._wake_r:
            os.read(self._wake_r, 64)
        elif fileobj is self.listener:
            self._accept()
        else:
            connection = self._connections.get(fileobj.fileno())
            if connection is None:
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(connection)
                # The reply is out: the next request already received is served.
                if self._connections.get(fileobj.fileno()) is connection and connection.inbox:
                    self._serve_lines(connection)
            if mask & selectors.EVENT_READ and fileobj.fileno() in self._connections:
                self._read(connection)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(False)
        connection = _Connection(sock)
        self._connections[sock.fileno()] = connection
        self._selector.register(sock, selectors.EVENT_READ)
        uid = _peer_uid(sock)
        if uid not in (os.geteuid(), 0):
            self._refuse(connection, f"permission denied: uid {uid} is neither this process's "
                                     f"user ({os.geteuid()}) nor root")
        elif len(self._connections) > MAX_CLIENTS:
            self._refuse(connection, f"busy: {MAX_CLIENTS} connections already open")

    def _refuse(self, connection: _Connection, error: str) -> None:
        connection.reply({"v": PROTOCOL, "id": None, "ok": False, "error": error})
        connection.closing = True
        self._flush(connection)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                 # the client is gone (or done)
            self._close(connection.sock)
            return
        if connection.closing:       # draining what a refused client still sends
            return
        connection.deadline = time.monotonic() + IDLE_TIMEOUT
        connection.inbox += data
        self._serve_lines(connection)

    def _serve_lines(self, connection: _Connection) -> None:
        # One request at a time: the next line waits until this reply is sent.
        while not connection.outbox and not connection.closing:
            end = connection.inbox.find(b"\n")
            if end < 0:
                if len(connection.inbox) > MAX_LINE:
                    connection.inbox.clear()
                    self._refuse(connection, f"bad request: longer than {MAX_LINE} bytes "
                                             f"without an end of line")
                return
            line = bytes(connection.inbox[:end])
            del connection.inbox[:end + 1]
            if line.strip():
                connection.reply(handle(line))
                self._flush(connection)

    def _flush(self, connection: _Connection) -> None:
        try:
            while connection.outbox:
                sent = connection.sock.send(connection.outbox)
                del connection.outbox[:sent]
                connection.deadline = time.monotonic() + IDLE_TIMEOUT
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(connection.sock)
            return
        if connection.outbox:
            self._selector.modify(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        self._selector.modify(connection.sock, selectors.EVENT_READ)
        if connection.closing:
            # Shut the writing side, then read what the client still sends
            # until it closes: closing with unread data would reset the
            # connection and could destroy the reply before it is read.
            try:
                connection.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(connection.sock)

    def _expire(self) -> None:
        now = time.monotonic()
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            if connection.inbox and not connection.closing:
                connection.reply({"v": PROTOCOL, "id": None, "ok": False,
                                  "error": f"bad request: no end of line within {IDLE_TIMEOUT:g} s"})
                try:
                    connection.sock.send(connection.outbox)
                except OSError:
                    pass
            self._close(connection.sock)

    def _close(self, sock: socket.socket) -> None:
        self._connections.pop(sock.fileno(), None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # life -----------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving and remove the socket."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.thread is not threading.current_thread():
            self.thread.join(1.0)
        self._remove_socket()
        for connection in list(self._connections.values()):
            self._close(connection.sock)
        self.listener.close()

    def _remove_socket(self) -> None:
        # Only the process that made it: a forked child has its own.
        if os.getpid() == self.pid:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def abandon(self) -> None:
        """In a fork()ed child: drop the parent's server, whose thread is not
        here.  Closing a descriptor here closes this process's copy only;
        nothing is shut down or unregistered under the parent."""
        for sock in [self.listener, *(c.sock for c in self._connections.values())]:
            sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def serve(directory: str | None = None) -> str:
    """Open this process's control socket (once; later calls return the
    same path) and serve it from a daemon thread.  ``directory`` overrides
    the default places (see :func:`default_directories`).  Returns the socket's
    path."""
    global _server
    with _serve_lock:
        if _server is not None and _server.pid == os.getpid():
            return _server.path
        directory = os.path.abspath(directory) if directory else _default_directory()
        _remove_stale(directory)
        _server = _Server(directory)
        return _server.path


def serving() -> str | None:
    """The control socket's path while this process serves, else None."""
    server = _server
    return server.path if server is not None and server.pid == os.getpid() else None


def stop() -> None:
    """Close the control socket and remove it."""
    global _server
    with _serve_lock:
        server, _server = _server, None
    if server is not None and server.pid == os.getpid():
        server.stop()


def serve_from_environment() -> None:
    """``HOTPATCH_CONTROL=1`` at import: serve, or say in one line why not
    (the service goes on)."""
    try:
        serve()
    except (HotpatchError, OSError) as e:
        print(f"hotpatch: HOTPATCH_CONTROL=1: {_one_line(e)}", file=sys.stderr)


def _after_fork_in_child() -> None:
    global _server, _serve_lock
    _serve_lock = threading.Lock()
    parent = _server
    if parent is None:
        return
    _server = None
    parent.abandon()
    try:
        serve(parent.directory)
    except (HotpatchError, OSError) as e:
        print(f"hotpatch: no control socket in forked process {os.getpid()}: {_one_line(e)}",
              file=sys.stderr)


atexit.register(stop)
os.register_at_fork(after_in_child=_after_fork_in_child)
