"""How general a model's induction is: the probability it gives the repeated token of `BOS + prefix + r + r[:-1]`
(r: a random span of `span` tokens, prefix: random tokens), by span length and prefix length, averaged over
seeds, with each layer's strongest attention from the last position to the token after the earlier occurrence.
A model with real induction scores high everywhere; one with a positional shortcut only on some spans.

    python benchmarks/bench_induction.py [--model toy] [--spans 3,5,8,12,16,24] [--prefixes 0,10,40] [--seeds 4]
"""
from __future__ import annotations

import argparse

import torch


def probe(adapter, span: int, prefix: int, seed: int) -> tuple[float, list[float]]:
    """p(repeated token) and, per layer, the largest attention weight (over heads) from the last position to
    the token after the earlier occurrence."""
    from replacement.evaluate import repeated_span_prompt
    from replacement.hooks import layer_names

    ids, answer = repeated_span_prompt(adapter, span, seed, prefix)
    after = prefix + span  # r[-1]: the token after the earlier occurrence of the last token, r[-2]
    names = layer_names(range(adapter.n_layers), "attn.pattern")
    with torch.no_grad():
        run = adapter.run(ids.to(adapter.device), capture=names)
    p = float(run.logits[0, -1].float().softmax(-1)[answer])
    return p, [float(run.cache[nm][0, :, -1, after].max()) for nm in names]


def main():
    from replacement.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--spans", default="3,5,8,12,16,24")
    ap.add_argument("--prefixes", default="0,10,40")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = load_model(args.model)
    spans = [int(s) for s in args.spans.split(",")]
    print(f"{args.model}: p(repeated token) / per-layer max attention to the token after the earlier occurrence")
    w = 10 + 5 * adapter.n_layers
    print(f"{'prefix':>6} " + "".join(f"{'span ' + str(s):>{w}}" for s in spans))
    for prefix in (int(x) for x in args.prefixes.split(",")):
        cells = []
        for span in spans:
            runs = [probe(adapter, span, prefix, seed) for seed in range(1, args.seeds + 1)]
            p = sum(r[0] for r in runs) / len(runs)
            attn = [sum(r[1][L] for r in runs) / len(runs) for L in range(adapter.n_layers)]
            cells.append(f"{p:.2f} / " + " ".join(f"{a:.2f}" for a in attn))
        print(f"{prefix:>6} " + "".join(f"{c:>{w}}" for c in cells))


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
