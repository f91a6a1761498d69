"""Wall time of the whole `trace` command, cold and warm, idle and beside a busy process, and the size of what
it writes.

    python benchmarks/bench_trace.py [--model llama] [--prompt "36 + 62 ="] [--runs 3] [--no-load]

cold: a fresh process running this checkout's `trace` (imports, model and replacement load, attribution,
pruning, export, dot); its own time line gives the attribution + pruning part.
warm: the same work again inside one process that has already traced once (model loaded, code warm).
under load: the same cold runs while one competing torch process multiplies 512x512 matrices in a loop (as
a training run would), started before and stopped after each run; idle and loaded runs alternate.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
COLD = "from cli.trace import main; main()"
WARM = r"""
import sys, time
from click.testing import CliRunner
from cli.trace import trace
args = sys.argv[1:]
runner = CliRunner()
runner.invoke(trace, args, catch_exceptions=False)
t = time.time()
r = runner.invoke(trace, args, catch_exceptions=False)
print(time.time() - t)
"""
BUSY = "import torch\nx = torch.randn(512, 512)\nwhile True:\n    y = x @ x\n"


def cold_run(args: list[str]) -> tuple[float, float]:
    """(whole command, attribution + pruning) seconds of one fresh `trace` process."""
    t = time.time()
    out = subprocess.run([sys.executable, "-c", COLD, *args], check=True, capture_output=True, text=True, env=ENV)
    wall = time.time() - t
    m = re.search(r"attribution \+ pruning ([\d.]+)s", out.stdout)
    return wall, float(m.group(1)) if m else float("nan")


def loaded(fn, *args):
    """``fn(*args)`` while one busy torch process competes for the CPU."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=ENV)
    try:
        time.sleep(1.5)  # let it start multiplying
        return fn(*args)
    finally:
        busy.kill()
        busy.wait()


def _med(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (best {min(xs):.2f}, runs {', '.join(f'{x:.2f}' for x in xs)})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--prompt", default="36 + 62 =")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-load", action="store_true", help="skip the runs beside a busy process")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args = [a.prompt, "--model", a.model, "--out", tmp]
        idle, busy = [], []
        for _ in range(a.runs):  # alternating, so that a change on the machine touches both alike
            idle.append(cold_run(args))
            if not a.no_load:
                busy.append(loaded(cold_run, args))
        warm = []
        for _ in range(a.runs):
            out = subprocess.run([sys.executable, "-c", WARM, *args], check=True, capture_output=True, text=True, env=ENV)
            warm.append(float(out.stdout.strip().splitlines()[-1]))
        sizes = {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir())}
    print(f"trace {a.prompt!r} --model {a.model} (json, dot, svg), {os.cpu_count()} cores, load average before "
          f"{os.getloadavg()[0]:.2f}")
    print(f"  cold, idle: whole command {_med([w for w, _ in idle])}; attribution + pruning {_med([t for _, t in idle])}")
    if busy:
        print(f"  cold, beside a busy torch process: whole command {_med([w for w, _ in busy])}; attribution + "
              f"pruning {_med([t for _, t in busy])}")
        for i, what in ((0, "whole command"), (1, "attribution + pruning")):
            r = statistics.median([b[i] for b in busy]) / statistics.median([x[i] for x in idle])
            print(f"  under load / idle, {what}: {r:.2f}x")
    print(f"  warm (in-process, second trace): {_med(warm)}")
    for name, size in sizes.items():
        print(f"  {name}: {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
