"""Shared test fixtures: C targets compiled at test time, and child processes.

Code that patches runs in a child process (`run_child`): a crash there is a
failed test that names the signal, never a dead test run.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_library(path, sources, flags=(), per_source_flags=None):
    """Compile C sources (paths relative to tests/) into the shared library
    ``path`` with the system ``cc``; ``flags`` go to every step, as to one
    ``cc`` call, and each translation unit gets ``-fPIC`` unless
    ``per_source_flags`` gives its own flags.  Returns ``path``."""
    per_source_flags = per_source_flags or {}
    objects = []
    for source in sources:
        obj = f"{path}.{os.path.basename(source)}.o"
        extra = per_source_flags.get(source, ["-fPIC"])
        subprocess.run(["cc", "-O2", "-c", os.path.join(HERE, source), "-o", obj, *flags, *extra],
                       check=True, capture_output=True)
        objects.append(obj)
    subprocess.run(["cc", "-shared", "-o", str(path), *objects, *flags], check=True,
                   capture_output=True)
    return str(path)


def symbol_sizes(path):
    """``{symbol: size}`` of the symbols ``path`` defines (``nm -S``)."""
    sizes = {}
    for line in subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[parts[3]] = int(parts[1], 16)
    return sizes


def run_child(code, timeout=120, env=None, **params):
    """Run ``code`` in a fresh Python; ``params`` are visible to it as the
    dict ``P``.  The code reports with ``report(obj)``; returns the list of
    reported objects.  A crash or non-zero exit fails the calling test.

    Like a real service, the child has a thread that blocks every signal
    before the test code runs: faulthandler's watchdog (never cancelled
    here; a test that needs the signal stop to work cancels it)."""
    prelude = textwrap.dedent("""
        import faulthandler, json, sys
        def _watchdog_blocks_signals():
            import os, time
            faulthandler.dump_traceback_later(3600, exit=False)
            for _ in range(2000):
                for tid in os.listdir("/proc/self/task"):
                    try:
                        with open(f"/proc/self/task/{tid}/status") as status:
                            if int(tid) != os.getpid() and any(
                                    line.startswith("SigBlk:") and int(line.split()[1], 16)
                                    for line in status):
                                return
                    except FileNotFoundError:
                        pass
                time.sleep(0.0005)
        _watchdog_blocks_signals()
        P = json.loads(sys.argv[1])
        def report(obj):
            print("REPORT " + json.dumps(obj), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), json.dumps(params)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:      # a real-time signal has no name
            name = f"signal {-proc.returncode}"
        pytest.fail(f"child died of {name}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    if proc.returncode:
        pytest.fail(f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("REPORT ")]


@pytest.fixture(scope="session")
def child():
    return run_child
