"""This process under /proc, read right from any thread.

``/proc/self`` is the thread-group leader: the main thread.  A program may
end its main thread with ``pthread_exit`` while other threads go on; the
leader then stays a zombie until the last thread exits, and ``/proc/self/exe``
fails with ENOENT, ``/proc/self/maps`` reads empty, ``/proc/self/mem`` cannot
be opened.  ``/proc/thread-self`` names the calling thread, alive by
definition, and shows the same process-wide files.
"""
from __future__ import annotations

import os

#: Where this process's exe and maps are read (Linux 3.17 and later have
#: /proc/thread-self; before that only /proc/self).
SELF = "/proc/thread-self" if os.path.isdir("/proc/thread-self") else "/proc/self"


def main_thread_exited() -> bool:
    """True when the main thread has exited while other threads run."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def exited_main_thread_note() -> str:
    """A sentence for an error message when the main thread has exited (a
    likely cause of a failure), else ''."""
    if not main_thread_exited():
        return ""
    return (f" (note: the main thread of this process, thread {os.getpid()}, has exited "
            f"(pthread_exit) and is a zombie until the process ends: /proc/self/ no longer "
            f"shows this process's memory)")
