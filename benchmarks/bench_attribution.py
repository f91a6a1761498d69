"""Time and peak memory of `attribute` on a bundled model, by prompt length (model load excluded).

    python benchmarks/bench_attribution.py [--model llama] [--lengths 8,16,32,64]

Each length runs in a fresh process (its peak RSS is its own).  The OV graph and the QK pair attribution
are timed separately.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from replacement.models import load_model
from replacement.assemble import ReplacementModel
from graphs.attribution import attribute
adapter = load_model(sys.argv[1])
model = ReplacementModel.load(adapter)
n = int(sys.argv[2])
words = ("36 + 62 = 98 The cat sat on the mat and the dog ran to the door because it was late . " * 20).split()
prompt = " ".join(words)
ids = adapter.tokenizer(prompt, return_tensors="pt").input_ids[:, :n]
attribute(model, ids[:, :8])  # warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
g = attribute(model, ids)
dt = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "seconds": dt, "seconds_ov": g.settings["seconds_ov"], "seconds_qk": g.settings.get("seconds_qk", 0),
                  "nodes": len(g), "edges": len(g.edge_arrays), "qk_pairs": len(g.qk), "peak_rss_mb": peak / 1024,
                  "added_rss_mb": (peak - base) / 1024}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--lengths", default="8,16,32,64")
    args = ap.parse_args()
    print(f"attribute() on {args.model}, full graph with QK pairs for every active Lorsa head, 2 threads")
    print(f"{'tokens':>6} {'total s':>8} {'OV s':>7} {'QK s':>7} {'QK/OV':>6} {'nodes':>7} {'edges':>10} {'peak MB':>8}")
    for n in [int(x) for x in args.lengths.split(",")]:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(n)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n:>6} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n']:>6} {r['seconds']:>8.2f} {r['seconds_ov']:>7.2f} {r['seconds_qk']:>7.2f} "
              f"{r['seconds_qk'] / max(r['seconds_ov'], 1e-9):>6.0%} {r['nodes']:>7} {r['edges']:>10} {r['peak_rss_mb']:>8.0f}")


if __name__ == "__main__":
    main()
