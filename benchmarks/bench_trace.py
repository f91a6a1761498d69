"""Wall time of the whole `trace` command, cold and warm, and the size of what it writes.

    python benchmarks/bench_trace.py [--model llama] [--prompt "36 + 62 ="] [--runs 3]

cold: a fresh `trace` process (imports, model and replacement load, attribution, pruning, export, dot).
warm: the same work again inside one process that has already traced once (model loaded, code warm).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--prompt", default="36 + 62 =")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args = [a.prompt, "--model", a.model, "--out", tmp]
        cold = []
        for _ in range(a.runs):
            t = time.time()
            subprocess.run(["trace", *args], check=True, capture_output=True)
            cold.append(time.time() - t)
        warm = []
        for _ in range(a.runs):
            out = subprocess.run([sys.executable, "-c", WARM, *args], check=True, capture_output=True, text=True)
            warm.append(float(out.stdout.strip().splitlines()[-1]))
        sizes = {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir())}
    print(f"trace {a.prompt!r} --model {a.model} (json, dot, svg)")
    print(f"  cold (fresh process): best {min(cold):.2f} s, median {sorted(cold)[len(cold) // 2]:.2f} s")
    print(f"  warm (in-process, second trace): best {min(warm):.2f} s, median {sorted(warm)[len(warm) // 2]:.2f} s")
    for name, size in sizes.items():
        print(f"  {name}: {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
