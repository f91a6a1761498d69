"""Why does a Lorsa head look where it looks?  Raw QK pairs against contrastive QK pairs, on a bundled model.

    python examples/contrastive_qk.py [--model llama] [--prompt "36 + 62 ="] [--head lorsa.0.136@4]
                                      [--reference mean|runner_up]

A head's raw score at a key splits exactly into query-node x key-node pairs plus bias terms (graphs/qk.py), but
most of it is the same for every key and does not move the attention.  The contrastive split
(graphs/contrast.py) explains the score of the key minus the reference's (the attention-weighted mean key, or
the strongest other key): pairs of a query node x a key unit, plus query bias x keys, plus position.

Prints the chosen head's raw and contrastive splits for its top keys, then, over every explained head at the
last position, how much of the raw score the best raw pair explains against how much of the difference the
best contrastive pair explains (medians).
"""
from __future__ import annotations

import argparse
import statistics


def shares(graph, pos: int) -> dict:
    """Over the top key of every explained Lorsa head at ``pos``: |best pair| / |raw score|, bias-only /
    raw score, |best contrastive pair| / |difference|, the top 8 pairs' sum / difference, position / difference."""
    rows = []
    for n in graph.nodes(type="lorsa", position=pos):
        if not n.qk or n.qk[0].contrast is None:
            continue
        e, c = n.qk[0], n.qk[0].contrast
        best_raw = max((abs(p.weight) for p in e.pairs), default=0.0)
        rows.append({"raw_top_pair": best_raw / abs(e.score), "raw_bias_x_bias": e.bias_x_bias / e.score,
                     "top_pair": abs(c.pairs[0].weight) / abs(c.difference) if c.pairs else 0.0,
                     "top_8_pairs": sum(p.weight for p in c.pairs[:8]) / c.difference,
                     "top_key_unit": abs(c.key_marginals[0][1]) / abs(c.difference),
                     "top_query_node": abs(c.query_marginals[0][1]) / abs(c.difference),
                     "position": c.position / c.difference})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"heads": len(rows)} if rows else {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--prompt", default="36 + 62 =")
    ap.add_argument("--head", default=None, help="A Lorsa node id (default: the most influential at the last position).")
    ap.add_argument("--reference", choices=["mean", "runner_up"], default="mean")
    args = ap.parse_args()

    from graphs.attribution import attribute
    from graphs.contrast import describe
    from graphs.prune import influence
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter)
    graph = attribute(model, adapter.tokenize(args.prompt), qk_reference=args.reference)
    last = len(graph.tokens) - 1
    if args.head:
        heads = {n.id: n for n in graph.nodes(type="lorsa") if n.qk}
        if args.head not in heads:
            near = [i for i in heads if i.endswith(f"@{last}")][:5]
            raise SystemExit(f"error: {args.head} is not an explained Lorsa head of this graph; try one of "
                             f"{', '.join(near) or ', '.join(list(heads)[:5])}")
        head = heads[args.head]
    else:
        infl = influence(graph)
        head = max(graph.nodes(type="lorsa", position=last), key=lambda n: float(infl[graph.index[n.id]]))
    print(f"{args.model} {graph.tokens}: {head.id}, reference {args.reference}")
    for e in head.qk:
        print(f"  raw best pairs at key {e.key_pos} ({graph.tokens[e.key_pos]!r}): " +
              ", ".join(f"{p.query} x {p.key} {p.weight:+.3f}" for p in e.pairs[:2]))
        for line in describe(e):
            print("  " + line)
    s = shares(graph, last)
    if s:
        print(f"over the top key of the {s['heads']} explained heads at position {last} (medians): best raw pair "
              f"{s['raw_top_pair']:.1%} of the raw score (bias x bias {s['raw_bias_x_bias']:.0%}); best contrastive "
              f"pair {s['top_pair']:.1%} of the difference, the top 8 {s['top_8_pairs']:.0%}, position "
              f"{s['position']:.0%}; best key unit (its column) {s['top_key_unit']:.0%}, best query node (its row) "
              f"{s['top_query_node']:.0%}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
