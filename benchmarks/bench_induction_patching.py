"""How often the induction showcase's path-patching check holds: over seeds of `examples/induction.py`'s prompt
(BOS + r + r[:-1], r a random 8-token span), the patched / predicted ratio of the head the example picks (norms
live, then norm scales frozen as in the graph), and of every last-position head of a later layer attending to
the token after the earlier occurrence, ablated together.  The issue's bar is a ratio >= 0.5.

    python benchmarks/bench_induction_patching.py [--model toy] [--seeds 20] [--prompt natural] [--replacements DIR]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from _examples import example as example_module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--prompt", choices=["natural", "random"], default="random",
                    help="held-out English sentences that recur, or repeated random-token spans")
    ap.add_argument("--replacements", default=None, help="a replacements folder (default: the bundled one)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    example = example_module("induction")
    ratios = {"head": [], "head, norms frozen": [], "heads together": []}
    print(f"{args.model}: patched / predicted logit change (correct token, demeaned)")
    with tempfile.TemporaryDirectory() as out:
        for seed in range(1, args.seeds + 1):
            try:
                graph, _, c, r = example.analyse(args.model, out, seed=seed, verbose=False, prompt=args.prompt,
                                                 replacements=args.replacements)
            except LookupError as e:  # no last-position head attends to the earlier occurrence
                print(f"seed {seed:>2} {e}")
                continue
            row = {"head": r["patched"] / r["predicted"],
                   "head, norms frozen": r["patched_frozen_norms"] / r["predicted"],
                   "heads together": r["family_patched"] / r["family_predicted"]}
            for k, v in row.items():
                ratios[k].append(v)
            p = graph.logit(r["answer"]).prob
            print(f"seed {seed:>2} p={p:.2f} {c.head.id:<18} {r['patched']:+6.2f} / {r['predicted']:+6.2f} = "
                  f"{row['head']:5.2f}   norms frozen {row['head, norms frozen']:5.2f}   {len(r['family'])} heads "
                  f"together {r['family_patched']:+6.2f} / {r['family_predicted']:+6.2f} = {row['heads together']:.2f}")
    for k, v in ratios.items():
        print(f"{k:<20} median {statistics.median(v):.2f}, min {min(v):+.2f}, >= 0.5 on {sum(x >= 0.5 for x in v)}"
              f"/{len(v)}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
