"""The ``hotpatch`` command: patch running processes through their control
sockets (``hotpatch/server.py``), build patch modules, run the demo.

Every command that fails prints one line saying why on stderr (with
``--json``, ``{"ok": false, "error": ...}`` on stdout) and exits 1; a usage
error exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .errors import HotpatchError


class Failed(Exception):
    """The command failed: ``reason`` is its one line; ``details`` go into
    the --json output."""

    def __init__(self, reason: str, **details):
        super().__init__(reason)
        self.details = details


def _client():
    from . import client    # psutil: not needed by build and demo
    return client


def _request(args, pid: int, op: str, **arguments):
    client = _client()
    try:
        return client.request(pid, op, timeout=args.timeout, **arguments)
    except client.ControlError as e:
        raise Failed(str(e), pid=pid) from None


def _process_label(pid: int) -> str:
    import psutil
    try:
        process = psutil.Process(pid)
        argv = [os.path.basename(a) for a in process.cmdline()[:2]]
        return f"process {pid} ({' '.join(argv) or process.name()})"
    except psutil.Error:
        return f"process {pid}"


def _short(command: str, width: int = 32) -> str:
    """``python3 service.py --lib ...``: programs by their file names."""
    words = command.split()
    text = " ".join([os.path.basename(w) for w in words[:2]] + words[2:])
    return text if len(text) <= width else text[:width - 3] + "..."


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


# ---------------------------------------------------------------------------
# ps


def cmd_ps(args) -> tuple[object, str]:
    import psutil
    client = _client()
    rows = []
    for process, path in client.serving_processes():
        if process.pid == os.getpid():
            continue
        row = {"pid": process.pid, "socket": path}
        try:
            row["user"], row["command"] = process.username(), " ".join(process.cmdline())
            status = client.request(process.pid, "status", timeout=min(args.timeout, 5.0),
                                    socket_path=path)
            row["patches"], row["tainted"] = status["patches"], status["tainted"]
        except (client.ControlError, psutil.Error) as e:   # one process does not hide the others
            row["error"] = str(e)
        if args.only_patched and not any(p["enabled"] for p in row.get("patches", ())):
            continue
        rows.append(row)
    lines = [f"{'PID':>7}  {'USER':<10} {'COMMAND':<32} PATCHES"]
    for row in rows:
        if "error" in row:
            patches = f"(no reply: {row['error']})"
        else:
            patches = ", ".join(
                f"{p['name']} (enabled {_when(p['enabled_at'])})" if p["enabled"]
                else f"{p['name']} (disabled)" for p in row["patches"]) or "-"
        lines.append(f"{row['pid']:>7}  {row.get('user', '?'):<10} "
                     f"{_short(row.get('command', '?')):<32} {patches}")
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------
# ls: the tree, shaped like /sys/kernel/livepatch


def _sysfs_value(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


#: The entries of a func in the tree that are addresses (shown in hex with
#: the symbol they resolve to); the others are counts, flags or text.
_ADDRESSES = ("old_addr", "new_addr", "original")


def _ls_lines(tree: dict, names: dict) -> list[str]:
    lines = ["livepatch/"]
    for patch_name, patch in tree["livepatch"].items():
        lines.append(f"  {patch_name}/")
        for key, value in patch.items():
            if not isinstance(value, dict):
                lines.append(f"    {key:<12} {_sysfs_value(value)}")
        for obj_name, obj in patch.items():
            if not isinstance(obj, dict):
                continue
            lines.append(f"    {obj_name}/")
            lines.append(f"      {'patched':<12} {_sysfs_value(obj['patched'])}")
            for func_name, func in obj.items():
                if not isinstance(func, dict):
                    continue
                lines.append(f"      {func_name}/")
                for key, value in func.items():
                    if key in _ADDRESSES and isinstance(value, int):
                        text = f"{value:#x}  {names.get(hex(value), '?')}"
                    else:
                        text = _sysfs_value(value) if value is not None else "-"
                    lines.append(f"        {key:<10} {text}")
    core = tree.get("core", {})
    stopper = core.get("stopper", {})
    lines.append(f"tainted      {_sysfs_value(tree.get('tainted', False))}")
    if core:
        lines.append(f"core         {core.get('sites', 0)} sites redirected; code written through "
                     f"{core.get('code_writes')}, threads held by {stopper.get('method')}; "
                     f"{core.get('stops', {}).get('count', 0)} stops, "
                     f"{core.get('stops', {}).get('unstopped', 0)} writes without one")
    return lines


def cmd_ls(args) -> tuple[object, str]:
    result = _request(args, args.pid, "tree")
    text = "\n".join([f"# {_process_label(args.pid)}", *_ls_lines(result["tree"], result["names"])])
    return result, text


# ---------------------------------------------------------------------------
# enable, disable, load, unload: one process, or every process of a service


def _forced(args) -> dict:
    return {"force": True} if getattr(args, "force", False) else {}


def _enable(args, pid):
    _request(args, pid, "enable", patch=args.patch, **_forced(args))
    return f"patch {args.patch!r} enabled"


def _disable(args, pid):
    _request(args, pid, "disable", patch=args.patch, **_forced(args))
    return f"patch {args.patch!r} disabled"


def _load(args, pid):
    result = _request(args, pid, "load", path=os.path.abspath(args.file))
    return {"loaded": f"patch {result['name']!r} loaded and enabled",
            "already applied": f"patch {result['name']!r} already applied"}.get(
        result["state"], f"patch {result['name']!r} {result['state']}"), result


def _unload(args, pid):
    status = _request(args, pid, "status")
    patch = next((p for p in status["patches"] if p["name"] == args.patch), None)
    if patch is not None and patch["enabled"]:
        _request(args, pid, "disable", patch=args.patch)
    _request(args, pid, "unregister", patch=args.patch)
    return f"patch {args.patch!r} disabled and unregistered"


def _undo(args, pid, outcome) -> None:
    """Take back what ``args.command`` did in ``pid`` (a rollback of --all)."""
    if args.command == "enable":
        _request(args, pid, "disable", patch=args.patch)
    elif args.command == "disable":
        _request(args, pid, "enable", patch=args.patch)
    elif args.command == "load":
        state, name = outcome[1]["state"], outcome[1]["name"]
        if state != "already applied":
            _request(args, pid, "disable", patch=name)
        if state == "loaded":
            _request(args, pid, "unregister", patch=name)


STEPS = {"enable": _enable, "disable": _disable, "load": _load}


def _change_one(args) -> tuple[object, str]:
    outcome = (_unload if args.command == "unload" else STEPS[args.command])(args, args.pid)
    message, result = outcome if isinstance(outcome, tuple) else (outcome, None)
    return {"pid": args.pid, "message": message, "result": result}, f"process {args.pid}: {message}"


def _change_all(args, step) -> tuple[list, list[str]]:
    """Run ``step`` in every process of the service, in order; on a failure,
    undo it where it was done (newest first) and fail naming the process."""
    client = _client()
    processes = client.processes_named(args.all)
    if not processes:
        raise Failed(f"no process named {args.all!r} serves a hotpatch control socket")
    done, lines = [], []
    for process in processes:
        try:
            outcome = step(args, process.pid)
        except Failed as e:
            rolled_back, not_rolled_back = [], []
            for pid, earlier in reversed(done):
                try:
                    _undo(args, pid, earlier)
                    rolled_back.append(pid)
                except Failed as undo_error:
                    not_rolled_back.append({"pid": pid, "error": str(undo_error)})
            why = str(e).removeprefix(f"process {process.pid}: ")
            back = ", ".join(map(str, rolled_back))
            if not_rolled_back:
                after = (f"rolled back in {back or 'none'}, but NOT in " + "; ".join(
                    f"{f['pid']} ({f['error']})" for f in not_rolled_back))
            else:
                after = f"rolled back in {back}: no process is left changed" if back else \
                    "no process was changed"
            reason = f"{_process_label(process.pid)} failed: {why}; {after}"
            raise Failed(reason, failed={"pid": process.pid, "error": str(e)},
                         processes=[pid for pid, _ in done], rolled_back=rolled_back,
                         not_rolled_back=not_rolled_back) from None
        done.append((process.pid, outcome))
        message = outcome[0] if isinstance(outcome, tuple) else outcome
        lines.append(f"process {process.pid}: {message}")
    results = [{"pid": pid, "message": o[0] if isinstance(o, tuple) else o} for pid, o in done]
    return results, lines


def cmd_change(args) -> tuple[object, str]:
    if (args.pid is None) == (args.all is None):
        raise Failed("give either a PID or --all NAME")
    if args.all is None:
        return _change_one(args)
    if args.command != "unload":
        results, lines = _change_all(args, STEPS[args.command])
        return {"processes": results}, "\n".join(lines)
    # unload: disable everywhere (all or nothing), then unregister everywhere.
    args.command = "disable"
    results, lines = _change_all(args, _disable)
    args.command = "unload"
    for entry in results:
        _request(args, entry["pid"], "unregister", patch=args.patch)
        entry["message"] = f"patch {args.patch!r} disabled and unregistered"
    return {"processes": results}, "\n".join(f"process {r['pid']}: {r['message']}" for r in results)


# ---------------------------------------------------------------------------
# symbols


def cmd_symbols(args) -> tuple[object, str]:
    result = _request(args, args.pid, "symbols", object=args.object, pattern=args.pattern or "")
    lines = [f"# {result['object']} ({result['path']}) at {result['base']:#x}"]
    for f in result["functions"]:
        size = f["size"] if f["size"] is not None else "?"
        lines.append(f"{f['address']:#x}  {size:>6}  {f['name']},{f['sympos'] or 1}")
    return result, "\n".join(lines)


# ---------------------------------------------------------------------------
# build, demo


def cmd_build(args, cc_args) -> int:
    from .module import build as build_module
    try:
        build_module(args.source, args.output, cc_args)
    except HotpatchError as e:
        print(f"hotpatch build: {e}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


def cmd_demo(args) -> int:
    if args.in_process:
        from . import demo
        return demo.main()
    from .examples.service import driver
    return driver.main()


# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotpatch", description="Live patching of native functions in running Python processes.")
    parser.add_argument("--version", action="version", version=f"hotpatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, pid=True):
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                         help="how long to wait for each reply (default 30)")
        if pid:
            sub.add_argument("pid", type=int, metavar="PID")
        return sub

    ps = command("ps", "processes with a control socket, and what each has patched", pid=False)
    ps.add_argument("--only-patched", action="store_true",
                    help="only processes with an enabled patch")
    command("ls", "a process's patches, shaped like /sys/kernel/livepatch")
    for name, help, what in (("enable", "enable a registered patch", "patch"),
                             ("disable", "disable a patch (the most recently enabled)", "patch"),
                             ("unload", "disable and unregister a patch", "patch"),
                             ("load", "load a patch module (.so or .py) and enable it", "file")):
        sub = command(name, help, pid=False)
        sub.add_argument("pid", type=int, nargs="?", metavar="PID")
        sub.add_argument(what, metavar=what.upper())
        sub.add_argument("--all", metavar="NAME",
                         help="every process of a service (a process name, program or script, "
                              "or the master's PID and its children), all or nothing")
        if name in ("enable", "disable"):
            sub.add_argument("--force", action="store_true",
                             help='consistency="stack": switch even though a thread has code of '
                                  "the patch on its stack (the patch is marked forced)")
    symbols = command("symbols", "the functions of a loaded object")
    symbols.add_argument("object", metavar="OBJECT", help='file name, soname or path; "main" '
                                                            "for the main program")
    symbols.add_argument("pattern", nargs="?", metavar="PATTERN",
                         help="a glob; without wildcards, a substring")

    demo = commands.add_parser("demo", help="patch a live service under load (examples/service)")
    demo.add_argument("--in-process", action="store_true",
                      help="the smaller demo: patch a function inside this process")
    build = commands.add_parser("build", help="compile a C patch module against hotpatch.h")
    build.add_argument("source")
    build.add_argument("-o", "--output", required=True)
    return parser


COMMANDS = {"ps": cmd_ps, "ls": cmd_ls, "enable": cmd_change, "disable": cmd_change,
            "load": cmd_change, "unload": cmd_change, "symbols": cmd_symbols}


def main(argv=None) -> int:
    # HOTPATCH_CONTROL=1 exported in a shell must not make the command serve.
    if "hotpatch.server" in sys.modules:
        sys.modules["hotpatch.server"].stop()
    argv = sys.argv[1:] if argv is None else list(argv)
    # `hotpatch build fix.c -o fix.so -- -I...`: what follows -- goes to cc.
    cc_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:len(argv) - len(cc_args) - bool(cc_args or "--" in argv)])
    if args.command == "build":
        return cmd_build(args, cc_args)
    if args.command == "demo":
        return cmd_demo(args)
    try:
        result, text = COMMANDS[args.command](args)
    except Failed as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e), **e.details}))
        else:
            print(f"hotpatch {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:     # a bug of ours: still one line, never a traceback
        print(f"hotpatch {args.command}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"ok": True, "result": result}) if args.json else text)
        sys.stdout.flush()
    except BrokenPipeError:      # `hotpatch symbols ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
