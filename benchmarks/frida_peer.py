"""Frida, the peer: its Interceptor driven inside the very process that hotpatch
measures (``frida.attach(pid)``), through one script.

Frida is optional (the ``bench`` extra).  Without it every series says so
and goes on.  The script uses the Frida 17 API (``Process.getModuleByName``,
``Module.getGlobalExportByName``); its installs are timed inside the target
process with the library's own monotonic clock, so that the RPC round trip
is not counted.  frida is imported only when a peer is started: the
children (which may run under valgrind) never load it.
"""
from __future__ import annotations

import functools
import os
import re
import time

MISSING = "frida is not installed (pip install 'hotpatch[bench]'): Frida's figures are left out"

SCRIPT = r"""
'use strict';
function clock(moduleName, name) {
  const f = new NativeFunction(Process.getModuleByName(moduleName).getExportByName(name),
                               'double', []);
  return () => f();
}
function addresses(moduleName, offsets) {
  const base = Process.getModuleByName(moduleName).base;
  return offsets.map(o => base.add(o));
}
function install(method, target, replacement) {
  if (method === 'replace')
    Interceptor.replace(target, replacement);
  else
    Interceptor.replaceFast(target, replacement);
}
rpc.exports = {
  // Redirect one function for the whole life of the session.
  redirect(method, target, replacement) {
    install(method, ptr(target), ptr(replacement));
    Interceptor.flush();
  },
  // Install `method` on every function, then revert them all: ns for each
  // step, and how many functions Frida refused (with the first reason).
  installmany(method, moduleName, offsets, replacementOffset, clockName) {
    const now = clock(moduleName, clockName);
    const targets = addresses(moduleName, offsets);
    const replacement = Process.getModuleByName(moduleName).base.add(replacementOffset);
    const installed = [];
    let refused = 0, reason = null;
    const t0 = now();
    for (const t of targets) {
      try {
        install(method, t, replacement);
        installed.push(t);
      } catch (e) {
        refused++;
        reason = reason || String(e.message || e);
      }
    }
    Interceptor.flush();
    const t1 = now();
    for (const t of installed)
      Interceptor.revert(t);
    Interceptor.flush();
    const t2 = now();
    return { install_ns: t1 - t0, revert_ns: t2 - t1, refused: refused, reason: reason };
  },
  // For each function: null if `method` takes it (reverted at once), else the error.
  reach(method, moduleName, offsets) {
    const replacement = Module.getGlobalExportByName('getpid');
    return addresses(moduleName, offsets).map(t => {
      try {
        install(method, t, replacement);
        Interceptor.revert(t);
        Interceptor.flush();
        return null;
      } catch (e) {
        return String(e.message || e);
      }
    });
  },
};
"""


#: Frida's messages name an address: bucket them without it.
_ADDRESS = re.compile(r"0x[0-9a-f]+")


def frida_reason(message: str, size: int) -> str:
    """Frida's message without the address; its generic refusal says nothing
    more, so the function's size (replaceFast wants 16 bytes) is added."""
    reason = _ADDRESS.sub("ADDR", message)
    if "please file a bug" in reason:
        reason += " (function of 16 bytes or more)" if size >= 16 else " (function < 16 bytes)"
    return reason


class Peer:
    """A Frida session on process ``pid`` with the benchmark script loaded."""

    def __init__(self, pid: int):
        self.pid = pid
        self.threads = _thread_count(pid)
        self.session = _frida().attach(pid)
        self.script = self.session.create_script(SCRIPT)
        self.script.load()
        self.rpc = self.script.exports_sync

    def close(self) -> None:
        """Detach, and wait until the agent has left the process: it unloads
        after detach() returns, and a process that exits meanwhile may crash
        (seen here as SIGSEGV or SIGTRAP at exit).  Gone = its mappings and
        its threads."""
        try:
            self.script.unload()
        finally:
            self.session.detach()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_agent_mapped(self.pid)
                                               or _thread_count(self.pid) > self.threads):
            time.sleep(0.05)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _agent_mapped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "frida" in maps.read()
    except OSError:     # the process is gone
        return False


@functools.lru_cache(maxsize=None)
def _frida():
    try:
        import frida
    except ImportError:     # the optional bench extra is not installed
        return None
    return frida


def _thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:     # the process is gone
        return 0


def available() -> bool:
    return _frida() is not None


def version() -> str | None:
    return _frida().__version__ if available() else None
