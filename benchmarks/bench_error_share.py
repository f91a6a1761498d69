"""How much of each addition's answer the graph's error nodes carry: on every ``--every``-th held-out pair of
`replacement.data.addition_split` (20 prompts by default), `trace`'s signed decomposition of the full graph
(`graphs.prune.logit_decomposition`): the correct answer's logit minus the next most probable logit's, split into
features, errors, embeddings and constants; the errors' share is errors / that margin.  The faithfulness issue's bar
is 30% on `36 + 62 =` (the first held-out pair); over many prompts the median of the share's size says more.

    python benchmarks/bench_error_share.py [--model llama] [--replacements DIR] [--every 25]
"""
from __future__ import annotations

import argparse
import statistics


def main():
    from graphs.attribution import attribute
    from graphs.prune import logit_decomposition
    from replacement.assemble import ReplacementModel
    from replacement.data import addition_split
    from replacement.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--replacements", default=None, help="a replacements folder (default: the bundled one)")
    ap.add_argument("--every", type=int, default=25, help="take every N-th held-out pair (500 pairs)")
    args = ap.parse_args()
    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter, args.replacements)
    shares = []
    for a, b in addition_split()[1][::args.every]:
        answer = adapter.tokenizer.encode(f" {a + b}")[-1]
        d = logit_decomposition(attribute(model, f"{a} + {b} =", qk=False), target=answer)
        m = d["margin"]
        share = d["error_share"]  # None: a margin too near 0 for a share
        shares.append(share)
        print(f"{a} + {b} = {d['target']['token']!r} over {d['runner_up']['token']!r}: margin {m['total']:+.2f} = "
              f"features {m['features']:+.2f}, errors {m['errors']:+.2f}, embeddings {m['embeddings']:+.2f}, "
              f"constants {m['constants']:+.2f}; errors' share " + ("none" if share is None else f"{share:+.2f}"),
              flush=True)
    given = [s for s in shares if s is not None]
    if not given:
        print(f"{len(shares)} prompts, every margin too near 0 for a share")
        return
    sizes = [abs(s) for s in given]
    print(f"{len(shares)} prompts ({len(shares) - len(given)} with a margin too near 0 for a share): errors' share "
          f"median {statistics.median(given):+.3f}, median size {statistics.median(sizes):.3f}, at most 0.3 in size "
          f"on {sum(s <= 0.3 for s in sizes)}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
