"""Runs a series owned by another module (``benchmarks/<name>.py``) in a
fresh child process, so that it measures a process like any user's and not
the runner (which has Frida and matplotlib loaded).

``python -m benchmarks.external PARAMS`` is the child: it calls the module's
``run()`` (with ``quick=`` when it takes it) and sends back the result.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json

from .common import Options, child_params, emit, run_child


def run(name: str, opts: Options) -> dict:
    """``{"external": result}``, or ``{"missing": why}`` while the module is not there."""
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        return {"missing": f"benchmarks/{name}.py is not there yet"}
    return {"external": run_child("external", {"name": name, "quick": opts.quick})[-1]["result"]}


def child() -> None:
    params = child_params()
    run_series = importlib.import_module(f"benchmarks.{params['name']}").run
    if "quick" in inspect.signature(run_series).parameters:
        result = run_series(quick=params["quick"])
    else:
        result = run_series()
    emit({"result": json.loads(json.dumps(result, default=str))})


if __name__ == "__main__":
    child()
