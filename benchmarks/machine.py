"""The machine and software a run measured, for the README."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess

from . import frida_peer
from .common import REPO


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _first_line(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    out = subprocess.run(command, capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip() if out.stdout or out.stderr else None


def _commit() -> str:
    """HEAD, with "+changes" when the working tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def describe() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "glibc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
        "cc": _first_line([os.environ.get("CC", "cc"), "--version"]),
        "valgrind": _first_line(["valgrind", "--version"]),
        "frida": frida_peer.version(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
