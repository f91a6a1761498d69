"""A long prompt through the whole `trace` command: wall time, peak memory and the files' sizes.

    python benchmarks/bench_long_prompt.py [--model llama] [--tokens 127]

The prompt: the opening of the first held-out text the package carries (`replacement.corpus.heldout_texts`),
cut to ``--tokens`` tokens with BOS, so that anyone's clone traces the same one.  Peak memory is the largest
resident set of the `trace` process (getrusage of the children).  Issue 23's bar for 127 tokens on llama: within
6 GB, or a one-line refusal.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def long_prompt(model: str, n_tokens: int) -> str:
    """Text whose encoding (BOS included) is ``n_tokens`` long: the opening of the first held-out text."""
    from replacement.corpus import heldout_texts
    from replacement.models import load_tokenizer

    tok, _ = load_tokenizer(model)
    text = " ".join(heldout_texts()[0].split())  # one line: a shell-safe argument, the same words
    ids = tok(text, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    prompt = tok.decode(ids)
    while len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1 > n_tokens:  # decoding may merge tokens anew
        prompt = prompt[:-1]
    return prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--tokens", type=int, default=127)
    args = ap.parse_args()
    prompt = long_prompt(args.model, args.tokens)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", "from cli.trace import main; main()", prompt, "--model", args.model,
                            "--out", out], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KB -> GB
        if r.returncode != 0:
            print(f"trace ended with {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
            return
        tokens = re.search(r"(\d+) tokens", r.stdout).group(1)
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MB" for p in sorted(Path(out).iterdir()))
    print(f"trace of a {tokens}-token prompt on {args.model} (the opening of the first held-out text): whole command "
          f"{wall:.1f} s, peak memory {peak:.2f} GB; {sizes}")
    print("  " + next(line for line in r.stdout.splitlines() if line.startswith("graph:")))
    print("  " + next(line for line in r.stdout.splitlines() if line.startswith("time:")))


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
