"""What the series share: options, child processes, statistics, symbol lists.

Everything that patches runs in a child Python process: a crash there fails
one series with its signal named, never the whole run, and every child
starts from an unpatched, unwarmed state.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Options:
    """How big a run is: ``quick`` is a smoke run of about a minute."""

    quick: bool = False

    @property
    def calls(self) -> int:
        """Calls per overhead measurement of a cheap variant."""
        return 2_000_000 if self.quick else 100_000_000

    @property
    def rounds(self) -> int:
        """Alternating rounds of the overhead series."""
        return 5 if self.quick else 15

    @property
    def counts(self) -> tuple[int, ...]:
        """Function counts of the apply series."""
        return (1, 10, 100, 1000) if self.quick else (1, 10, 100, 1000, 10000)

    @property
    def threads(self) -> tuple[int, ...]:
        """Busy caller threads of the apply series."""
        return (0, 2) if self.quick else (0, 2, 8)

    @property
    def repeats(self) -> int:
        """Fresh processes per apply setting (per tool)."""
        return 2 if self.quick else 5

    @property
    def reach_limit(self) -> int | None:
        """Functions tried per library in the reach series (None: all)."""
        return 300 if self.quick else None


class ChildFailed(RuntimeError):
    """A benchmark child process died or exited non-zero."""


def child_command(module: str, params: dict) -> list[str]:
    """The command that runs ``benchmarks.<module>``'s child part with ``params``."""
    return [sys.executable, "-X", "faulthandler", "-m", f"benchmarks.{module}", json.dumps(params)]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_child(module: str, params: dict, *, prefix: list[str] = ()) -> subprocess.Popen:
    """Start a child that talks JSON lines on stdin/stdout."""
    return subprocess.Popen([*prefix, *child_command(module, params)], cwd=REPO, env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)


def read_message(proc: subprocess.Popen) -> dict:
    """The next JSON line the child prints (other lines are passed over)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise ChildFailed(describe_exit(proc))


def send_message(proc: subprocess.Popen, message: dict) -> None:
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def finish_child(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait for the child; raise ChildFailed if it did not exit cleanly."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode:
        raise ChildFailed(describe_exit(proc))


def describe_exit(proc: subprocess.Popen) -> str:
    proc.wait()
    code = proc.returncode
    how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    err = proc.stderr.read() if proc.stderr else ""
    return f"benchmark child {how}\n{err[-3000:]}"


def run_child(module: str, params: dict, *, prefix: list[str] = (), timeout: float = 900) -> list[dict]:
    """Run a child to its end; returns every JSON message it printed."""
    proc = subprocess.run([*prefix, *child_command(module, params)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        code = proc.returncode
        how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        raise ChildFailed(f"benchmark child {how}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------
# In a child


def child_params() -> dict:
    return json.loads(sys.argv[1])


def emit(message: dict) -> None:
    """Send one JSON message to the parent."""
    print(json.dumps(message), flush=True)


def exit_after_frida() -> None:
    """End a child that Frida was attached to, skipping the interpreter's
    finalization: after Frida's agent has worked in a process and left,
    finalization sometimes crashes it (SIGSEGV or SIGTRAP at exit, seen with
    frida 17.26.2 here, with or without hotpatch loaded).  Its results are
    already sent."""
    sys.stdout.flush()
    os._exit(0)


def receive() -> dict:
    """Wait for one JSON message from the parent."""
    return json.loads(sys.stdin.readline())


# ---------------------------------------------------------------------------
# Statistics


def summary(values: list[float]) -> dict:
    """Median and spread (quartiles, min, max) of repeated measurements."""
    values = sorted(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1, q3 = values[0], values[-1]
    return {"median": statistics.median(values), "q1": q1, "q3": q3,
            "min": values[0], "max": values[-1], "n": len(values)}


# ---------------------------------------------------------------------------
# Symbols of an ELF file


def function_symbols(path: str) -> tuple[list[tuple[str, int, int]], int, str]:
    """``([(name, offset, size)], ifuncs, table)``: the sized function
    symbols of ``path`` from ``table`` (``.symtab``, else ``.dynsym`` of a
    stripped file), one per address, and how many IFUNC resolvers were left
    out (a resolver is not the function it selects)."""
    for table, extra in ((".symtab", []), (".dynsym", ["-D"])):
        out = subprocess.run(["nm", "-S", "--defined-only", *extra, path],
                             capture_output=True, text=True).stdout
        rows = [line.split() for line in out.splitlines()]
        rows = [r for r in rows if len(r) == 4]
        if rows:
            break
    seen, functions, ifuncs = set(), [], 0
    for value, size, kind, name in rows:
        if kind == "i":
            ifuncs += 1
        elif kind in "Tt" and int(size, 16) > 0 and value not in seen:
            seen.add(value)
            functions.append((name.split("@")[0], int(value, 16), int(size, 16)))
    return functions, ifuncs, table


def loaded_path(fragment: str) -> str:
    """The path of the object mapped in this process whose file name contains ``fragment``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and fragment in os.path.basename(parts[5]):
                return os.path.realpath(parts[5])
    raise LookupError(f"no mapped object named like {fragment!r}")


def load_base(path: str) -> int:
    """Load bias of the shared object ``path`` in this process: the start of
    its mapping at file offset 0 (its first PT_LOAD has vaddr 0)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == path and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise LookupError(f"{path} is not mapped")
