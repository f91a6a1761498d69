"""How many threads torch uses: no more than the cores left free by the other processes running now.

Attribution is thousands of small tensor operations; with more threads than free cores each of them waits for
a thread that another process has taken, and the whole slows down several-fold (measured on 2 cores beside
one busy torch job: 2.0 s with 2 threads against 1.1 s with 1).  A thread too few costs little on such
operations, so the count errs low: the busy cores are the other runnable tasks (/proc/loadavg's 4th field,
less this process's own running threads), the median of five readings in about 1.5 ms; a busy torch job is
runnable at nearly every one, a kernel task's blip at one.  This process's threads are counted out one by one
(/proc/self/task/*/stat): right after torch work its OpenMP workers spin for a while, runnable.  Each call starts
again from torch's own count as the process began, so one busy moment does not keep a warm process on fewer
threads for good.  (Before these three rules a warm process on an idle host read its own spinning workers, or a
blip, as a busy core and kept 1 thread from then on: a warm trace 0.30 s against 0.25 s on 2.)
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
MAX_THREADS_PER_CORE = 4  # CIRCUITS_THREADS above this many per core is refused
_TORCH_DEFAULT: int | None = None  # torch's thread count before `set_threads` first changed it


def busy_cores(loadavg: str | list[str] | None = None, readings: int = 5, own: list[int] | None = None) -> int:
    """Cores other processes keep busy now: the median over ``readings`` readings of /proc/loadavg's runnable
    tasks less this process's running threads (0 where it cannot be read); ``loadavg``: its text, or several
    texts, and ``own``: this process's running threads at each (default 1, the reader), instead."""
    texts = [loadavg] if isinstance(loadavg, str) else loadavg
    try:
        if texts is None:
            texts, own = [], []
            for i in range(readings):
                with open("/proc/loadavg") as f:
                    texts.append(f.read())
                own.append(own_running_threads())
                if i + 1 < readings:
                    time.sleep(0.0002)
        own = own or [1] * len(texts)
        others = sorted(max(int(t.split()[3].split("/")[0]) - n, 0) for t, n in zip(texts, own))
        return others[len(others) // 2]
    except (OSError, ValueError, IndexError):
        return 0


def own_running_threads() -> int:
    """This process's threads in the running state now (at least 1: the one asking)."""
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"  # the state follows the name in parentheses
        except OSError:  # the thread ended meanwhile
            pass
    return max(n, 1)


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
        if n > MAX_THREADS_PER_CORE * cores():  # 5,000 threads on 2 cores took 80 s; 100,000 exhaust the process
            raise BadInputError(f"{THREADS_ENV}={n} is more threads than this machine's {cores()} cores can use "
                                f"(at most {MAX_THREADS_PER_CORE} a core)")
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # torch has read it already
    else:
        global _TORCH_DEFAULT
        if _TORCH_DEFAULT is None:
            _TORCH_DEFAULT = torch.get_num_threads()  # before this module ever changed it
        n = thread_count(cores(), busy_cores(), _TORCH_DEFAULT)
    torch.set_num_threads(n)
    return n
