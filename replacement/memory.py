"""How much memory this process may use: ``$CIRCUITS_MEMORY_BUDGET``, or a share of what the machine has
available now. Every step that could outgrow the machine (an attribution graph, a dashboard sample, a training
run's modules) estimates its bytes first and is refused in one line above this, instead of being killed by the
kernel."""
from __future__ import annotations

import os

from .errors import BadInputError

BUDGET_ENV = "CIRCUITS_MEMORY_BUDGET"
AVAILABLE_SHARE = 0.8  # of the memory available now: the default budget leaves room for the rest of the machine


def available_bytes() -> int | None:
    """``$CIRCUITS_MEMORY_BUDGET`` (bytes; K/M/G suffixes) if set, else ``AVAILABLE_SHARE`` of the memory
    available now (Linux: MemAvailable, capped by a cgroup limit); None where neither can be read."""
    value = os.environ.get(BUDGET_ENV)
    if value:
        return parse_bytes(value)
    avail = _meminfo_available()
    limit = _cgroup_room()
    if avail is None or limit is None:
        room = avail if limit is None else limit
    else:
        room = min(avail, limit)
    return None if room is None else int(room * AVAILABLE_SHARE)


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise BadInputError(f"{BUDGET_ENV}={text!r} is not a size such as 8G or 500M") from None
    if not value > 0:
        raise BadInputError(f"{BUDGET_ENV}={text!r} must be positive")
    if not value < 2**63:  # inf, 1e999, 1e30: int() overflowed
        raise BadInputError(f"{BUDGET_ENV}={text!r} is not a size such as 8G or 500M (too large)")
    return int(value)


def check_fits(need: int, what: str, advice: str, detail: str = "") -> None:
    """Refuse in one line (BadInputError) ``what`` (e.g. "--n-seqs 5000"), which needs about ``need`` bytes, where
    that is more than the budget: "<what> needs about <need><detail>, more than the <budget> available; <advice>"."""
    room = available_bytes()
    if room is not None and need > room:
        raise BadInputError(f"{what} needs about {gb(need)}{detail}, more than the {gb(room)} available; {advice} "
                            f"(${BUDGET_ENV} sets the budget)")


def gb(b: int) -> str:
    """A byte count for a message: GB to one decimal from 0.1 GB up, else whole MB, KB or bytes."""
    if b >= 2**30 / 10:
        return f"{b / 2**30:.1f} GB"
    return f"{b / 2**20:.0f} MB" if b >= 2**20 else f"{b / 2**10:.0f} KB" if b >= 2**10 else f"{int(b)} bytes"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return int(limit) - int(f.read().strip())
    except (OSError, ValueError):
        return None


__all__ = ["AVAILABLE_SHARE", "BUDGET_ENV", "available_bytes", "check_fits", "gb", "parse_bytes"]
