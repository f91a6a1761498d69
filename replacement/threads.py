"""How many threads torch uses: no more than the cores left free by the other processes running now.

Attribution is thousands of small tensor operations; with more threads than free cores each of them waits for
a thread that another process has taken, and the whole slows down several-fold (measured on 2 cores beside
one busy torch job: 2.0 s with 2 threads against 1.1 s with 1).  A thread too few costs little on such
operations, so the count errs low: the busy cores are the larger of the other runnable tasks now
(/proc/loadavg's 4th field, less this process) and the 1-minute load average, whole.
An explicit ``OMP_NUM_THREADS`` or ``$CIRCUITS_THREADS`` wins.
"""
from __future__ import annotations

import math
import os

from .errors import BadInputError

THREADS_ENV = "CIRCUITS_THREADS"


def busy_cores(loadavg: str | None = None) -> int:
    """Cores other processes keep busy now (0 where /proc/loadavg cannot be read); ``loadavg``: its text."""
    try:
        text = loadavg if loadavg is not None else open("/proc/loadavg").read()
        fields = text.split()
        runnable = int(fields[3].split("/")[0]) - 1  # less this process
        return max(runnable, math.floor(float(fields[0])), 0)
    except (OSError, ValueError, IndexError):
        return 0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count(n_cores: int, busy: int, default: int) -> int:
    """At most ``default`` (torch's own choice), at most the free cores, at least 1."""
    return max(1, min(default, n_cores - busy))


def set_threads() -> int:
    """Set torch's intra-op threads by the policy above (unless the environment says otherwise); the count."""
    import torch

    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.strip().isdigit() or int(value) < 1:
            raise BadInputError(f"{THREADS_ENV}={value!r} must be a whole number of threads, at least 1")
        n = int(value)
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # torch has read it already
    else:
        n = thread_count(cores(), busy_cores(), torch.get_num_threads())
    torch.set_num_threads(n)
    return n
