"""How many threads torch uses: no more than the cores left free by the other processes running now.

Attribution is thousands of small tensor operations; with more threads than free cores each of them waits for
a thread that another process has taken, and the whole slows down several-fold (measured on 2 cores beside
one busy torch job: 2.0 s with 2 threads against 1.1 s with 1).  A thread too few costs little on such
operations, so the count errs low: the busy cores are the most other runnable tasks (/proc/loadavg's 4th
field, less this process) over five readings in about 1.5 ms; a busy torch job is runnable at nearly every one.
The 1-minute load average is not used: it counts this process's own recent work, so after a few traces in a row
(or in a warm process) it read 1 on an idle 2-core host and halved the threads (a warm `trace "36 + 62 ="
--model llama` 0.33 s on 1 thread against 0.29 s on 2).
An explicit ``OMP_NUM_THREADS`` or ``$CIRCUITS_THREADS`` wins.
"""
from __future__ import annotations

import os
import time

from .errors import BadInputError

THREADS_ENV = "CIRCUITS_THREADS"


def busy_cores(loadavg: str | list[str] | None = None, readings: int = 5) -> int:
    """Cores other processes keep busy now: the most other runnable tasks over ``readings`` readings of
    /proc/loadavg (0 where it cannot be read); ``loadavg``: its text, or several texts, instead."""
    texts = [loadavg] if isinstance(loadavg, str) else loadavg
    try:
        if texts is None:
            texts = []
            for i in range(readings):
                with open("/proc/loadavg") as f:
                    texts.append(f.read())
                if i + 1 < readings:
                    time.sleep(0.0002)
        return max(max(int(t.split()[3].split("/")[0]) - 1, 0) for t in texts)  # less this process
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
