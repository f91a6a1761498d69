"""Wall time of the whole `trace` command, cold and warm, idle and beside a busy process, and the size of what
it writes.

    python benchmarks/bench_trace.py [--model llama] [--prompt "36 + 62 ="] [--runs 3] [--no-load]

cold: a fresh process running this checkout's `trace` (imports, model and replacement load, attribution,
pruning, export, dot); its own time line gives the attribution + pruning part.
warm: later `trace`s of the same prompt inside one Python process (the library calling the command's function):
imports done, the model and its replacements loaded once and kept (cli/trace.py's cache), code warm; each still
runs the model on the prompt, attributes, prunes and writes every file.  Per process: the second trace, and the
median of the five after it.
dependencies alone: a fresh process that imports only what the command needs from torch and transformers (torch,
the tokenizer classes, the model's modelling module) and does nothing: the part of the cold start that is not ours.
under load: the same cold runs while one competing torch process multiplies 512x512 matrices in a loop (as
a training run would), started before and stopped after each run; idle and loaded runs alternate.
"""
from __future__ import annotations

import argparse
import os
import resource
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
runs = []
for _ in range(6):
    t = time.time()
    c = time.process_time()
    r = runner.invoke(trace, args, catch_exceptions=False)
    runs.append((time.time() - t, time.process_time() - c))
later = sorted(w for w, _ in runs[1:])
print(runs[0][0], runs[0][1], later[len(later) // 2])
"""
DEPS = """
import importlib, os, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
importlib.import_module(f"transformers.models.{sys.argv[1]}.modeling_{sys.argv[1]}")
os._exit(0)  # as `trace` leaves: without the interpreter's teardown
"""
BUSY = "import torch\nx = torch.randn(512, 512)\nwhile True:\n    y = x @ x\n"


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cold_run(args: list[str]) -> tuple[float, float, float]:
    """(whole command, attribution + pruning, the command's CPU time) seconds of one fresh `trace` process."""
    t, c = time.time(), _child_cpu()
    out = _checked([sys.executable, "-c", COLD, *args])
    wall = time.time() - t
    m = re.search(r"attribution \+ pruning ([\d.]+)s", out.stdout)
    return wall, float(m.group(1)) if m else float("nan"), _child_cpu() - c


def _checked(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a `trace` process; one line (its own last) and no traceback where it fails."""
    out = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}").splitlines()[-1]
        raise SystemExit(f"error: trace failed: {last.removeprefix('error: ')}")
    return out


def deps_run(model_type: str) -> float:
    """Wall seconds of a fresh process importing the command's dependencies alone (`DEPS`)."""
    t = time.time()
    subprocess.run([sys.executable, "-c", DEPS, model_type], check=True, capture_output=True, env=ENV)
    return time.time() - t


def loaded(fn, *args):
    """``fn(*args)`` while one busy torch process competes for the CPU."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=ENV)
    try:
        time.sleep(1.5)  # let it start multiplying
        return fn(*args)
    finally:
        busy.kill()
        busy.wait()


def _model_type(model: str) -> str:
    """The transformers ``model_type`` of a preset or local folder (its config.json)."""
    import json

    from replacement.models import resolve_model_path

    return json.loads((Path(resolve_model_path(model)[0]) / "config.json").read_text())["model_type"]


def _med(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (best {min(xs):.2f}, runs {', '.join(f'{x:.2f}' for x in xs)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--prompt", default="36 + 62 =")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-load", action="store_true", help="skip the runs beside a busy process")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    model_type = _model_type(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        args = [a.prompt, "--model", a.model, "--out", tmp]
        idle, busy, deps = [], [], []
        for _ in range(a.runs):  # alternating, so that a change on the machine touches both alike
            deps.append(deps_run(model_type))
            idle.append(cold_run(args))
            if not a.no_load:
                busy.append(loaded(cold_run, args))
        warm = []
        for _ in range(a.runs):
            out = _checked([sys.executable, "-c", WARM, *args])
            warm.append(tuple(map(float, out.stdout.strip().splitlines()[-1].split())))
        sizes = {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir())}
    print(f"trace {a.prompt!r} --model {a.model} (json, dot, svg), {os.cpu_count()} cores, load average before "
          f"{load0:.2f}, after {os.getloadavg()[0]:.2f} (\"idle\" below: no competing process of ours)")
    print(f"  cold, idle: whole command {_med([x[0] for x in idle])}; attribution + pruning {_med([x[1] for x in idle])}; "
          f"CPU time {_med([x[2] for x in idle])}")
    if busy:
        print(f"  cold, beside a busy torch process: whole command {_med([x[0] for x in busy])}; attribution + "
              f"pruning {_med([x[1] for x in busy])}")
        for i, what in ((0, "whole command"), (1, "attribution + pruning")):
            r = statistics.median([b[i] for b in busy]) / statistics.median([x[i] for x in idle])
            print(f"  under load / idle, {what}: {r:.2f}x")
    print(f"  dependencies alone (import torch and transformers' {model_type} modules, nothing else): {_med(deps)}")
    print(f"  warm (second trace in one process, model cached): {_med([w[0] for w in warm])}; CPU time "
          f"{_med([w[1] for w in warm])}")
    print(f"  warm (median of the 5 traces after the second, per process): {_med([w[2] for w in warm])}")
    for name, size in sizes.items():
        print(f"  {name}: {size / 1024:.0f} KB")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
