"""The runner: ``python -m benchmarks [--quick] [--only NAME ...] [--report-only]``.

Runs each series, merges its result into ``benchmarks/results/results.json``
(a series not run keeps its last result, marked with the commit it ran on),
then regenerates ``results/results.md``, the plots and ``benchmarks/README.md``.

A series is a module with ``run(opts) -> dict`` (see ``report.py`` for how
each is shown).  Series written by others join through ``EXTERNAL``: when
``benchmarks/<name>.py`` exists its ``run()`` is called in a child process
(``external.py``) and its result shown as it describes itself (``"tables"``:
[{title, columns, rows, notes}], else its data); until then the report says
the series is not there yet.  The loader hook's cost on ``dlopen`` joins this way as ``loader``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

from . import external, machine, report
from .common import Options

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
#: Our series, in the order they run and are reported.
SERIES = ("overhead", "apply", "reach", "stop", "service")
#: Series owned by other modules: symbols resolution (benchmarks/symbols.py),
#: and the loader hook's cost on dlopen (benchmarks/loader.py, once the loader exists).
EXTERNAL = ("symbols", "loader")


def run_series(name: str, opts: Options) -> dict:
    """One series' result, with how long it took; a failure is reported, not raised."""
    start = time.monotonic()
    try:
        if name in EXTERNAL:
            result = external.run(name, opts)
        else:
            result = importlib.import_module(f"benchmarks.{name}").run(opts)
    except Exception:
        result = {"failed": traceback.format_exc(limit=8)}
    result["seconds"] = round(time.monotonic() - start, 1)
    result["quick"] = opts.quick
    return result


def _load_previous() -> dict:
    path = os.path.join(RESULTS, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"series": {}}


def keep_machines(results: dict) -> None:
    """A series not run now keeps the machine it ran on: the machine block
    describes only the latest run (results written before series carried
    their own machine ran on the last run's commit and machine)."""
    previous = results.get("machine")
    for result in results["series"].values():
        if "machine" not in result and previous and result.get("commit") == previous.get("commit"):
            result["machine"] = previous


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of about a minute: fewer calls, repeats and counts")
    parser.add_argument("--only", action="append", choices=SERIES + EXTERNAL, metavar="NAME",
                        help=f"run only this series (repeatable): {', '.join(SERIES + EXTERNAL)}")
    parser.add_argument("--report-only", action="store_true",
                        help="regenerate the tables, plots and README from results.json")
    args = parser.parse_args(argv)
    opts = Options(quick=args.quick)
    results = _load_previous()
    if not args.report_only:
        env = machine.describe()
        keep_machines(results)
        for name in args.only or SERIES + EXTERNAL:
            print(f"[benchmarks] {name}...", file=sys.stderr, flush=True)
            result = run_series(name, opts)
            result["commit"] = env["commit"]
            result["machine"] = env
            results["series"][name] = result
            print(f"[benchmarks] {name}: {result['seconds']} s"
                  + (" (failed)" if "failed" in result else ""), file=sys.stderr, flush=True)
        results["machine"] = env
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "results.json"), "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    report.write(results, RESULTS, os.path.join(HERE, "README.md"))
    failed = [n for n, r in results["series"].items() if "failed" in r]
    for name in failed:
        print(f"[benchmarks] {name} failed:\n{results['series'][name]['failed']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
