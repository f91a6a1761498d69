"""Graph vs path patching on addition prompts: for the 20 most influential Lorsa heads of each graph, the
correlation between the graph's predicted effect of removing a head (through transcoder paths, attention
frozen) and path patching it on the real model, and how many of the top 5 agree in sign: the 5 most
influential heads (the graph's ranking), and the 5 with the largest predicted effects.

Two more comparisons separate the replacement's error from the linearisation's:
  frozen norms   the graph against path patching with the norm scales frozen too (the graph's own regime);
  real linear    the real model's first-order prediction (PathPatcher.linear_effects) against path patching,
                 with and without frozen norms: what a perfect replacement's linear graph could reach.

    python benchmarks/bench_agreement.py [--model llama] [--pairs 36+62,23+45,51+38,17+64,72+19,44+33]
        [--random N]                      (N random pairs a, b in 10..89 with a + b < 100 instead, seed 0)
        [--replacements DIR]              (a replacement set's folder instead of the bundled one)
        [--module FILE.safetensors ...]   (use these saved modules instead of those of their layers)
"""
from __future__ import annotations

import argparse
import random

import torch


def load(model_name: str, modules: list[str], replacements: str | None = None):
    """The preset's replacement model (its bundled replacements, or the set in ``replacements``), with the saved
    ``modules`` in place of those of their layers."""
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    torch.set_num_threads(2)
    model = ReplacementModel.load(load_model(model_name), replacements)
    for path in modules:
        model.use_module(path)
    return model


def addition_heads(model, a: int, b: int, n_heads: int = 20):
    """The graph of `a + b =` (OV only) and its ``n_heads`` most influential Lorsa heads: (ids, logit node,
    components, the graph's predicted effect of removing each [n_heads])."""
    from graphs.attribution import attribute
    from graphs.patching import graph_effects, parse_component
    from graphs.prune import influence

    ids = model.adapter.tokenize(f"{a} + {b} =")
    graph = attribute(model, ids, qk=False, target=f" {a + b}")
    logit = next(n for n in graph.logits() if n.label == f" {a + b}")
    infl, effects = influence(graph), graph_effects(graph, logit.id)
    heads = sorted(graph.nodes(type="lorsa"), key=lambda n: -float(infl[graph.index[n.id]]))[:n_heads]
    predicted = torch.tensor([float(effects[graph.index[h.id]]) for h in heads])
    return ids, logit, [parse_component(h.id) for h in heads], predicted


def random_pairs(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n distinct pairs (a, b), both in 10..89 with a + b < 100 (two-digit operands and answer)."""
    rng, pairs = random.Random(seed), []
    while len(pairs) < n:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        if a + b < 100 and (a, b) not in pairs:
            pairs.append((a, b))
    return pairs


def main():
    from graphs.patching import PathPatcher, agreement

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--pairs", default="36+62,23+45,51+38,17+64,72+19,44+33")
    ap.add_argument("--random", type=int, default=0, help="use this many random pairs instead of --pairs")
    ap.add_argument("--replacements", default=None, help="a replacements folder (default: the bundled one)")
    ap.add_argument("--module", action="append", default=[], help="a saved module to use instead (repeatable)")
    args = ap.parse_args()
    model = load(args.model, args.module, args.replacements)
    rows = {k: [] for k in ("graph", "graph_fn", "real", "real_fn")}
    columns = ("graph", "graph, frozen", "real linear", "real, frozen")
    print(f"{'vs patching':<10} " + "".join(f"{h:>20}" for h in columns))
    pairs = random_pairs(args.random) if args.random else [tuple(map(int, p.split("+"))) for p in args.pairs.split(",")]
    for a, b in pairs:
        ids, logit, comps, predicted = addition_heads(model, a, b)
        for freeze in (False, True):
            patcher = PathPatcher(model, ids, logit.index, demean=True, freeze_norms=freeze)
            patched = torch.tensor([r.effect for r in patcher.effects(comps)])
            real = patcher.linear_effects(comps)
            for key, p in (("graph", predicted), ("real", real)):
                rows[key + ("_fn" if freeze else "")].append(agreement(p, patched))
        cells = "".join(f"{c:+10.2f} {i}/5 {s}/5  " for c, i, s in (rows[k][-1] for k in rows))
        print(f"{f'{a} + {b} =':<10} {cells}")
    means = "".join(f"{sum(r[0] for r in v) / len(v):+10.2f} " + " ".join(
        f"{sum(r[j] for r in v) / len(v):.1f}" for j in (1, 2)) + "  " for v in rows.values())
    print(f"{'mean':<10} {means}")
    print("(each cell: correlation over the 20 heads, then how many of the top 5 agree in sign: the 5 most\n"
          " influential heads, and the 5 with the largest predicted effects)")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
