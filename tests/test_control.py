"""The control plane: the control socket (hotpatch/server.py) and the
``hotpatch`` command (cli.py) against real service processes -- the example
service, a pre-forking one, a hardened one -- and requests that are wrong
on purpose.  Every process that patches is a child of the test."""
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import HERE, compile_library

ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, "examples", "service")
INCLUDE = os.path.join(ROOT, "hotpatch", "include")
SCRIPT = os.path.join(os.path.dirname(sys.executable), "hotpatch")
COMMAND = [SCRIPT] if os.access(SCRIPT, os.X_OK) else [sys.executable, "-m", "hotpatch"]

VETO_MODULE = r"""
#include <stdlib.h>
#include <hotpatch.h>
static long total_fixed(long unit, long qty) { return qty >= 10 ? (unit * qty * 9 + 5) / 10 : unit * qty; }
/* Vetoes in a process whose environment says so: one worker of the test's service. */
static int veto(struct hp_object *obj) { return getenv("SHOP_VETO") ? -1 : 0; }
static struct hp_func funcs[] = { { .old_name = "total_cents", .new_func = total_fixed }, { } };
static struct hp_object objs[] = { { .name = "libshop.so", .funcs = funcs, .callbacks = { .pre_patch = veto } }, { } };
static struct hp_patch patch = { .name = "round-total-veto", .objs = objs };
HP_PATCH(patch);
"""

PREFORK_SERVICE = r"""
import ctypes, os, sys, time
import hotpatch
lib = ctypes.CDLL(sys.argv[1])
hotpatch.serve()
workers = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        if i == 1:
            os.environ["SHOP_VETO"] = "1"     # this worker's pre_patch vetoes
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    workers.append(pid)
print("READY", os.getpid(), *workers, flush=True)
for pid in workers:
    os.waitpid(pid, 0)
"""


def hotpatch_cmd(*args, cwd=None, timeout=60):
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def read_ready(proc, timeout=60):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    assert line.startswith("READY "), f"the service did not start: {line!r}"
    return line.split()[1:]


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("control")
    os.chmod(out, 0o755)
    paths = {"lib": compile_library(out / "libshop.so", [os.path.join(EXAMPLE, "shop.c")]),
             "fix": compile_library(out / "fix.so", [os.path.join(EXAMPLE, "fix.c")],
                                    flags=["-I", INCLUDE])}
    (out / "veto.c").write_text(VETO_MODULE)
    paths["veto"] = compile_library(out / "veto.so", [str(out / "veto.c")], flags=["-I", INCLUDE])
    paths["dir"] = str(out)
    return paths


@pytest.fixture(scope="module")
def service(built):
    """The example service, with its control socket."""
    proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLE, "service.py"), "--lib",
                             built["lib"], "--lifetime", "240"], stdout=subprocess.PIPE, text=True)
    try:
        port, pid = map(int, read_ready(proc))
        yield {"pid": pid, "port": port, "proc": proc}
    finally:
        stop(proc)


def total(service, unit=1999, qty=15):
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", service["port"], timeout=10)
    connection.request("GET", f"/total?unit={unit}&qty={qty}")
    return json.loads(connection.getresponse().read())["total_cents"]


def ok(*args, **kwargs):
    done = hotpatch_cmd(*args, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["result"] if "--json" in args else done.stdout


def fails(*args, **kwargs):
    """A failure: exit 1 and one line, no traceback (or JSON with --json)."""
    done = hotpatch_cmd(*args, **kwargs)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    if "--json" in args:
        reply = json.loads(done.stdout)
        assert reply["ok"] is False
        return reply
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr.strip()


# ---------------------------------------------------------------------------
# The command


def test_version_and_usage():
    done = hotpatch_cmd("--version")
    assert (done.returncode, done.stdout.strip()) == (0, "hotpatch 0.1.0")
    for args in (["ls", "notapid"], ["frobnicate"], ["load", "fix.so"]):
        done = hotpatch_cmd(*args)
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr, (args, done.stderr)
    assert "PID or --all" in fails("load", "fix.so")


def test_every_subcommand_against_a_live_service(service, built, tmp_path):
    pid = service["pid"]
    assert total(service) == 26986                          # the bug

    assert str(pid) in ok("ps")
    listed = {p["pid"]: p for p in ok("ps", "--json")}
    assert listed[pid]["patches"] == []
    assert pid not in {p["pid"] for p in ok("ps", "--only-patched", "--json")}
    assert ok("ls", pid).splitlines()[1] == "livepatch/"
    assert ok("ls", pid, "--json")["tree"]["livepatch"] == {}

    assert "total_cents,1" in ok("symbols", pid, "libshop.so", "total")
    found = ok("symbols", pid, "libshop.so", "total_*", "--json")
    assert [f["name"] for f in found["functions"]] == ["total_cents"]

    # load, from another directory with a relative path, as a user would
    shutil.copy(built["fix"], tmp_path / "fix.so")
    assert "patch 'round-total' loaded and enabled" in ok("load", pid, "fix.so", cwd=tmp_path)
    assert total(service) == 26987
    assert "already applied" in ok("load", pid, built["fix"])
    assert ok("load", pid, built["fix"], "--json")["result"]["state"] == "already applied"

    text = ok("ls", pid)
    assert "round-total/" in text and "enabled      1" in text
    assert "total_cents [libshop.so]" in text and "total_cents_fixed [fix.so]" in text
    assert "[hotpatch trampoline]" in text
    tree = ok("ls", pid, "--json")
    func = tree["tree"]["livepatch"]["round-total"]["libshop.so"]["total_cents,1"]
    assert tree["names"][hex(func["old_addr"])] == "total_cents [libshop.so]"
    patched = {p["pid"]: p for p in ok("ps", "--only-patched", "--json")}
    assert patched[pid]["patches"][0]["name"] == "round-total"
    assert patched[pid]["patches"][0]["enabled_at"] > time.time() - 300
    assert "round-total (enabled 20" in ok("ps", "--only-patched")

    assert "disabled" in ok("disable", pid, "round-total")
    assert total(service) == 26986
    assert ok("enable", pid, "round-total", "--json")["message"] == "patch 'round-total' enabled"
    assert total(service) == 26987
    assert ok("disable", pid, "round-total", "--json")["message"] == "patch 'round-total' disabled"
    assert "enabled (it was loaded, disabled)" in ok("load", pid, built["fix"])
    assert "disabled and unregistered" in ok("unload", pid, "round-total")
    assert total(service) == 26986
    assert ok("load", pid, built["fix"], "--json")["result"]["state"] == "loaded"
    assert ok("unload", pid, "round-total", "--json")["pid"] == pid
    assert ok("ps", "--json") and {p["pid"]: p for p in ok("ps", "--json")}[pid]["patches"] == []

    # failures: one line, exit 1, nothing changed
    assert "no patch named 'nope' is registered" in fails("enable", pid, "nope")
    assert "no patch named" in fails("disable", pid, "nope", "--json")["error"]
    assert "not loaded in this process" in fails("symbols", pid, "libnothere.so")
    assert "No such file or directory" in fails("load", pid, tmp_path / "missing.so")
    assert "not a hotpatch patch module" in fails("load", pid, built["lib"])
    assert "no process" in fails("ls", 999999999)
    assert "has no hotpatch control socket" in fails("ls", os.getpid())
    assert total(service) == 26986


def test_a_patch_module_others_could_write_is_refused(service, built, tmp_path):
    pid = service["pid"]
    os.chmod(tmp_path, 0o755)
    module = tmp_path / "fix.so"
    shutil.copy(built["fix"], module)
    os.chmod(module, 0o666)
    assert "writable by other users (mode 0666)" in fails("load", pid, module)
    os.chmod(module, 0o644)
    os.chmod(tmp_path, 0o777)
    assert f"directory {tmp_path} is writable by other users" in fails("load", pid, module)
    assert "writable by other users (mode 0777)" in fails("load", pid, module, "--json")["error"]
    os.chmod(tmp_path, 0o755)
    if os.geteuid() == 0:
        os.chown(module, 65534, 65534)
        assert "belongs to uid 65534" in fails("load", pid, module)
    assert {p["pid"]: p for p in ok("ps", "--json")}[pid]["patches"] == []
    assert total(service) == 26986


def test_all_is_all_or_nothing_across_a_master_and_its_workers(built, tmp_path):
    script = tmp_path / "prefork_shop.py"
    script.write_text(PREFORK_SERVICE)
    proc = subprocess.Popen([sys.executable, str(script), built["lib"], "60"],
                            stdout=subprocess.PIPE, text=True)
    try:
        master, *workers = map(int, read_ready(proc))
        family = [master, *workers]
        deadline = time.time() + 30           # every worker serves its own socket
        while {p["pid"] for p in ok("ps", "--json")} & set(family) != set(family):
            assert time.time() < deadline, "the workers did not serve"
            time.sleep(0.2)

        # worker 1 vetoes: the master and worker 0 took the patch and are rolled back
        reply = fails("load", "--all", master, built["veto"], "--json")
        assert reply["failed"]["pid"] == workers[1]
        assert "pre_patch vetoed" in reply["failed"]["error"]
        assert reply["rolled_back"] == [workers[0], master]
        line = fails("load", "--all", "prefork_shop.py", built["veto"])
        assert f"process {workers[1]} " in line and "vetoed" in line
        assert line.endswith(f"rolled back in {workers[0]}, {master}: no process is left changed")
        for pid in family:
            assert ok("ls", pid, "--json")["tree"]["livepatch"] == {}, pid

        # without a veto: every process, then unloaded everywhere
        done = ok("load", "--all", "prefork_shop.py", built["fix"], "--json")
        assert [p["pid"] for p in done["processes"]] == family
        assert all(ok("ls", pid, "--json")["tree"]["livepatch"]["round-total"]["enabled"]
                   for pid in family)
        assert "disabled and unregistered" in ok("unload", "--all", master, "round-total")
        for pid in family:
            assert ok("ls", pid, "--json")["tree"]["livepatch"] == {}, pid
        assert "no process named 'no-such-service'" in fails("enable", "--all", "no-such-service", "x")
    finally:
        for pid in (locals().get("workers") or []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop(proc)


# ---------------------------------------------------------------------------
# The socket


def connect(service_or_path):
    path = service_or_path if isinstance(service_or_path, str) else \
        f"{socket_dir(service_or_path['pid'])}/{service_or_path['pid']}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    return sock


def socket_dir(pid):
    from hotpatch import client
    return os.path.dirname(client.socket_of(pid))


def exchange(sock, data: bytes) -> dict:
    if data:
        sock.sendall(data)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "closed without a reply"
        reply += chunk
    return json.loads(reply)


STATUS = b'{"v": 1, "op": "status", "id": 7}\n'


IDLE_TIMEOUT = 10.0      # hotpatch.server.IDLE_TIMEOUT


def test_malformed_requests_get_errors_and_others_are_served(service):
    stalled = connect(service)
    stalled.sendall(b'{"v": 1, "op": "sta')                # and nothing more
    stalled_since = time.monotonic()

    sock = connect(service)
    assert "not JSON" in exchange(sock, b"{nope\n")["error"]
    assert "a request is a JSON object" in exchange(sock, b"[1, 2]\n")["error"]
    assert "unknown operation 'frob'" in exchange(sock, b'{"v": 1, "op": "frob"}\n')["error"]
    assert "protocol version 99" in exchange(sock, b'{"v": 99, "op": "status"}\n')["error"]
    assert "protocol version None" in exchange(sock, b'{"op": "status"}\n')["error"]
    assert '"path" must be an absolute path' in exchange(
        sock, b'{"v": 1, "op": "load", "path": "fix.so"}\n')["error"]
    reply = exchange(sock, b"\n" + STATUS)                 # same connection, still served
    assert reply["ok"] and reply["id"] == 7 and reply["result"]["pid"] == service["pid"]

    pipelined = connect(service)                           # many requests in one write
    pipelined.sendall(b"{}\n" * 20000 + STATUS)
    replies = b""
    while replies.count(b"\n") < 20001:
        chunk = pipelined.recv(1 << 20)
        assert chunk
        replies += chunk
    lines = replies.splitlines()
    assert all(b"protocol version None" in line for line in lines[:20000])
    assert json.loads(lines[20000])["result"]["pid"] == service["pid"]

    flood = connect(service)
    flood.sendall(b"x" * (10 << 20))
    flood.shutdown(socket.SHUT_WR)
    assert "longer than" in exchange(flood, b"")["error"]

    for _ in range(3):                                     # gone mid-line, gone before the reply
        gone = connect(service)
        gone.sendall(b'{"v": 1, "op": "tr')
        gone.close()
        gone = connect(service)
        gone.sendall(b'{"v": 1, "op": "symbols", "object": "libc.so.6"}\n')
        gone.close()
    assert exchange(connect(service), STATUS)["ok"]
    assert time.monotonic() - stalled_since < IDLE_TIMEOUT

    stalled.settimeout(IDLE_TIMEOUT + 20)
    assert "no end of line within" in exchange(stalled, b"")["error"]
    assert exchange(connect(service), STATUS)["ok"]


SERVE_IN = """
import os, time, hotpatch
from hotpatch import server
path = hotpatch.serve(P["dir"])
os.chmod(path, P["mode"])
print("READY", path, flush=True)
time.sleep(P["seconds"])
"""


def serving_child(directory, mode=0o600, seconds=60):
    prelude = "import json, sys\nP = json.loads(sys.argv[1])\n"
    proc = subprocess.Popen([sys.executable, "-c", prelude + SERVE_IN,
                             json.dumps({"dir": directory, "mode": mode, "seconds": seconds})],
                            stdout=subprocess.PIPE, text=True)
    return proc, read_ready(proc)[0]


def as_other_user(function):
    """Run ``function`` in a forked child switched to uid 65534; what it returns."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = function()
        except BaseException as e:
            result = f"{type(e).__name__}: {e}"
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result = json.loads(pipe.read() or "null")
    os.waitpid(pid, 0)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_connection_from_another_uid_is_refused(service):
    directory = tempfile.mkdtemp(prefix="hotpatch-uid-test-")
    try:
        os.chmod(directory, 0o755)
        closed, closed_path = serving_child(directory)
        opened, opened_path = serving_child(directory, mode=0o666)
        try:
            def attempt(path):
                def connect_and_ask():
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(10)
                    try:
                        sock.connect(path)
                    except OSError as e:
                        return f"connect: {e.strerror}"
                    return exchange(sock, STATUS)
                return connect_and_ask

            assert stat.S_IMODE(os.stat(closed_path).st_mode) == 0o600
            assert as_other_user(attempt(closed_path)) == "connect: Permission denied"
            refused = as_other_user(attempt(opened_path))      # past the file mode: peer credentials
            assert refused["ok"] is False
            assert refused["error"].startswith("permission denied: uid 65534 is neither")

            def through_the_command():
                from hotpatch import cli
                return cli.main(["ls", str(service["pid"])])
            assert as_other_user(through_the_command) == 1
            assert exchange(connect(opened_path), STATUS)["ok"]  # and root is served
        finally:
            stop(closed)
            stop(opened)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_socket_place_lifetime_and_stale_sockets(child, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    r = child("""
import os, socket, stat
import hotpatch
from hotpatch import server
path = server.serving()
st, dir_st = os.stat(path), os.stat(os.path.dirname(path))
report({"path": path, "mode": stat.S_IMODE(st.st_mode), "dir_mode": stat.S_IMODE(dir_st.st_mode),
        "again": hotpatch.serve() == path})
""", env={"HOTPATCH_CONTROL": "1", "XDG_RUNTIME_DIR": str(runtime)})[0]
    assert r["path"].startswith(f"{runtime}/hotpatch/") and r["path"].endswith(".sock")
    assert (r["mode"], r["dir_mode"], r["again"]) == (0o600, 0o700, True)
    assert os.listdir(runtime / "hotpatch") == []           # removed at exit

    # Killed: its socket stays, and the next server in the directory removes it.
    directory = str(tmp_path / "sockets")
    os.mkdir(directory, 0o700)
    proc, path = serving_child(directory)
    proc.kill()
    proc.wait()
    assert os.path.exists(path)
    assert "no hotpatch control socket" in fails("ls", proc.pid) or "no process" in fails("ls", proc.pid)
    r = child("""
import os, socket
from hotpatch import server
# a socket left by a dead process that had this pid
mine = os.path.join(P["dir"], f"{os.getpid()}.sock")
s = socket.socket(socket.AF_UNIX); s.bind(mine); s.close()
path = server.serve(P["dir"])
report({"path": path == mine, "listing": sorted(os.listdir(P["dir"]))})
""", dir=directory)[0]
    assert r["path"] and len(r["listing"]) == 1 and os.path.basename(path) not in r["listing"]
    assert os.listdir(directory) == []

    # A forked worker serves on its own socket; ended with os._exit() (no exit
    # handlers), its socket is swept by the parent's server.
    r = child("""
import os, time
from hotpatch import server
server.SWEEP_INTERVAL = 0.3
path = server.serve(P["dir"])
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, (server.serving() or "").encode())
    os._exit(0)
os.waitpid(pid, 0)
worker_path = os.read(read, 4096).decode()
left = os.path.exists(worker_path)
time.sleep(1.5)
report({"worker": worker_path == os.path.join(P["dir"], f"{pid}.sock"), "left": left,
        "listing": os.listdir(P["dir"]), "mine": os.path.basename(path)})
""", dir=directory)[0]
    assert r["worker"] and r["left"] and r["listing"] == [r["mine"]]

    # A directory someone else could use is refused, with the reason, and the import goes on.
    shared = tmp_path / "shared"
    (shared / "hotpatch").mkdir(parents=True)
    os.chmod(shared / "hotpatch", 0o777)
    done = subprocess.run([sys.executable, "-c", "import hotpatch; print(hotpatch.server.serving())"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOTPATCH_CONTROL": "1", "XDG_RUNTIME_DIR": str(shared)})
    assert (done.returncode, done.stdout.strip()) == (0, "None")
    assert done.stderr.strip() == (f"hotpatch: HOTPATCH_CONTROL=1: control socket: {shared}/hotpatch "
                                   f"is open to other users (mode 0777); it must be 0700")


# ---------------------------------------------------------------------------
# Hardened processes


def test_a_process_with_mdwe_is_patched_like_any_other(child, built):
    r = child("""
import ctypes, mmap, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    report({"skip": os.strerror(ctypes.get_errno())}); raise SystemExit
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
page = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
wx_refused = libc.mprotect(ctypes.c_void_p(page), 4096, 7) != 0      # W+X: MDWE is on

import hotpatch
shop = ctypes.CDLL(P["lib"])
shop.total_cents.restype = ctypes.c_long
shop.total_cents.argtypes = [ctypes.c_long, ctypes.c_long]
hotpatch.serve()
before = shop.total_cents(1999, 15)
done = subprocess.run([*P["command"], "load", str(os.getpid()), P["fix"]], capture_output=True, text=True)
after = shop.total_cents(1999, 15)
try:
    hotpatch.register(hotpatch.Patch("py", [hotpatch.Object("libshop.so", [
        hotpatch.Func("total_cents", lambda u, q: 0, signature="long(long, long)")])]))
    python_callable = "patched"
except hotpatch.HotpatchError as e:
    python_callable = str(e)
subprocess.run([*P["command"], "unload", str(os.getpid()), "round-total"], check=True, capture_output=True)
report({"wx_refused": wx_refused, "before": before, "after": after, "command": done.stdout,
        "restored": shop.total_cents(1999, 15), "python_callable": python_callable,
        "tree": hotpatch.tree()["core"]["code_writes"]})
""", lib=built["lib"], fix=built["fix"], command=COMMAND)[0]
    if "skip" in r:
        pytest.skip(f"PR_SET_MDWE: {r['skip']}")
    assert r["wx_refused"]
    assert (r["before"], r["after"], r["restored"]) == (26986, 26987, 26986)
    assert "loaded and enabled" in r["command"]
    assert "refuses writable and executable memory (PR_SET_MDWE" in r["python_callable"]
