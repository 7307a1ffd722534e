"""``hotpatch demo``: a live service patched under load.

Builds libshop.so (with the rounding bug) and fix.so (the patch module,
with ``hotpatch build``), starts service.py, sends it load from another
process (load.py), applies the fix mid-load with ``hotpatch load PID
fix.so``, and prints the requests served, the wrong replies, the failed
requests and the latency percentiles before, during and after.  Exits 0
when no request failed and no reply after the fix was wrong.
"""
import http.client
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOAD_SECONDS = 9.0
PATCH_AFTER = 3.0
SAMPLE = (1999, 15)     # a total the bug gets wrong: 26986 instead of 26987


def hotpatch_command() -> list:
    """The ``hotpatch`` console script of this installation, else ``python -m
    hotpatch`` (run from a directory without a hotpatch source folder)."""
    script = os.path.join(os.path.dirname(sys.executable), "hotpatch")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "hotpatch"]


def run_hotpatch(args, cwd) -> tuple[str, float]:
    """Run ``hotpatch ARGS`` as a user would; its output and duration."""
    print(f"  $ hotpatch {' '.join(args)}")
    start = time.monotonic()
    done = subprocess.run(hotpatch_command() + args, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    took = time.monotonic() - start
    if done.returncode:
        raise RuntimeError(f"hotpatch {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.rstrip(), took


def held_ms(pid, cwd) -> float:
    """How long the code writes held the service's other threads (the tree's
    core.stops.held_ms)."""
    done = subprocess.run(hotpatch_command() + ["ls", str(pid), "--json"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout)["result"]["tree"]["core"]["stops"]["held_ms"]


def start_service(library, cwd):
    service = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "service.py"), "--lib", library, "--lifetime", "120"],
        cwd=cwd, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([service.stdout], [], [], 60)
    line = service.stdout.readline() if ready else ""
    if not line.startswith("READY "):
        service.kill()
        service.wait()
        raise RuntimeError("the service did not start")
    return service, int(line.split()[1])


def ask(port, unit, qty) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", f"/total?unit={unit}&qty={qty}")
        return json.loads(connection.getresponse().read())["total_cents"]
    finally:
        connection.close()


def percentile(values, fraction) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def phase_line(label, records) -> str:
    latencies = [r[1] * 1000 for r in records]
    counts = {k: sum(1 for r in records if r[2] == k) for k in ("wrong", "failed")}
    p50, p95, p99 = (percentile(latencies, f) for f in (0.5, 0.95, 0.99))
    peak = max(latencies, default=float("nan"))
    return (f"  {label:<18} {len(records):>8} {counts['wrong']:>7} {counts['failed']:>7}"
            f" {p50:>8.2f} {p95:>8.2f} {p99:>8.2f} {peak:>8.2f}")


def report(records, patch_start, patch_end) -> tuple[int, int, int]:
    before = [r for r in records if r[0] < patch_start]
    during = [r for r in records if patch_start <= r[0] <= patch_end]
    after = [r for r in records if r[0] > patch_end]
    print(f"\n  {'requests started':<18} {'served':>8} {'wrong':>7} {'failed':>7}"
          f" {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(phase_line("before the fix", before))
    print(phase_line(f"during ({(patch_end - patch_start):.2f} s)", during))
    print(phase_line("after the fix", after))
    failed = sum(1 for r in records if r[2] == "failed")
    wrong_before = sum(1 for r in before if r[2] == "wrong")
    wrong_after = sum(1 for r in after if r[2] == "wrong")
    return failed, wrong_before, wrong_after


def demo(tmp) -> int:
    from hotpatch.module import build
    print("hotpatch demo: fix a bug in a running service's native library, under load\n")
    library = build(os.path.join(HERE, "shop.c"), os.path.join(tmp, "libshop.so"))
    print("built libshop.so, the service's native library (total_cents() truncates "
          "instead of rounding)")
    shutil.copy(os.path.join(HERE, "fix.c"), tmp)
    run_hotpatch(["build", "fix.c", "-o", "fix.so"], tmp)
    print("  (the patch module: total_cents() rounded to the nearest cent)")

    service, port = start_service(library, tmp)
    load = None
    try:
        unit, qty = SAMPLE
        print(f"\nservice.py: pid {service.pid} on 127.0.0.1:{port}, a threaded HTTP server "
              f"calling libshop through ctypes")
        print(f"  GET /total?unit={unit}&qty={qty} -> {ask(port, unit, qty)}   "
              f"(right: {(unit * qty * 9 + 5) // 10})")
        load = subprocess.Popen([sys.executable, os.path.join(HERE, "load.py"), "--port",
                                 str(port), "--seconds", str(LOAD_SECONDS)],
                                cwd=tmp, stdout=subprocess.PIPE, text=True)
        print(f"load.py: pid {load.pid}, 4 client threads with keep-alive connections, "
              f"{LOAD_SECONDS:g} s\n")
        time.sleep(PATCH_AFTER)
        print(f"after {PATCH_AFTER:g} s of load:")
        patch_start = time.monotonic()
        output, took = run_hotpatch(["load", str(service.pid), "fix.so"], tmp)
        patch_end = time.monotonic()
        print(f"  {output}   ({took:.2f} s, most of it starting the command)")
        output, _ = run_hotpatch(["ls", str(service.pid)], tmp)
        print("\n".join(f"    {line}" for line in output.splitlines()))
        print(f"  the service's threads were held for {held_ms(service.pid, tmp):.2f} ms in all, "
              f"while the code was written")
        print(f"  GET /total?unit={unit}&qty={qty} -> {ask(port, unit, qty)}")
        out, _ = load.communicate(timeout=LOAD_SECONDS + 60)
        records = json.loads(out)["records"]
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()

    failed, wrong_before, wrong_after = report(records, patch_start, patch_end)
    print(f"\n{len(records)} requests, {failed} failed; wrong totals: {wrong_before} before "
          f"the fix, {wrong_after} after.  The service was patched under load and never stopped.")
    return 0 if failed == 0 and wrong_after == 0 else 1


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="hotpatch-demo-") as tmp:
        try:
            return demo(tmp)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            print(f"hotpatch demo: {e}", file=sys.stderr)
            return 1
