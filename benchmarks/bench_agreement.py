"""Graph vs path patching on addition prompts: for the 20 most influential Lorsa heads of each graph, the
correlation between the graph's predicted effect of removing a head (through transcoder paths, attention
frozen) and path patching it on the real model, and how many of the top 5 agree in sign.

Two more comparisons separate the replacement's error from the linearisation's:
  frozen norms   the graph against path patching with the norm scales frozen too (the graph's own regime);
  real linear    the real model's first-order prediction (PathPatcher.linear_effects) against path patching,
                 with and without frozen norms: what a perfect replacement's linear graph could reach.

    python benchmarks/bench_agreement.py [--model llama] [--pairs 36+62,23+45,51+38,17+64,72+19,44+33]
        [--module FILE.safetensors ...]   (use these saved modules instead of the bundled ones of their layers)
"""
from __future__ import annotations

import argparse

import torch


def main():
    from graphs.attribution import attribute
    from graphs.patching import PathPatcher, graph_effects, parse_component
    from graphs.prune import influence
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--pairs", default="36+62,23+45,51+38,17+64,72+19,44+33")
    ap.add_argument("--module", action="append", default=[], help="a saved module to use instead (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter)
    for path in args.module:
        model.use_module(path)
    rows = {k: [] for k in ("graph", "graph_fn", "real", "real_fn")}

    def agreement(predicted: torch.Tensor, patched: torch.Tensor) -> tuple[float, int]:
        top5 = predicted.abs().argsort(descending=True)[:5]
        corr = float(torch.corrcoef(torch.stack([predicted, patched]))[0, 1])
        return corr, int((predicted[top5].sign() == patched[top5].sign()).sum())

    columns = ("graph", "graph, frozen", "real linear", "real, frozen")
    print(f"{'vs patching':<10} " + "".join(f"{h:>16}" for h in columns))
    for pair in args.pairs.split(","):
        a, b = (int(x) for x in pair.split("+"))
        prompt, target = f"{a} + {b} =", f" {a + b}"
        ids = adapter.tokenize(prompt)
        graph = attribute(model, ids, qk=False, target=target)
        logit = next(n for n in graph.logits() if n.label == target)
        predicted_all = graph_effects(graph, logit.id)
        infl = influence(graph)
        heads = sorted(graph.nodes(type="lorsa"), key=lambda n: -float(infl[graph.index[n.id]]))[:20]
        comps = [parse_component(h.id) for h in heads]
        predicted = torch.tensor([float(predicted_all[graph.index[h.id]]) for h in heads])
        for freeze in (False, True):
            patcher = PathPatcher(model, ids, logit.index, demean=True, freeze_norms=freeze)
            patched = torch.tensor([r.effect for r in patcher.effects(comps)])
            rows["graph_fn" if freeze else "graph"].append(agreement(predicted, patched))
            linear = torch.tensor(patcher.linear_effects(comps))
            rows["real_fn" if freeze else "real"].append(agreement(linear, patched))
        cells = "".join(f"{c:+10.2f} {s}/5  " for c, s in (rows[k][-1] for k in rows))
        print(f"{prompt:<10} {cells}")
    means = "".join(f"{sum(c for c, _ in v) / len(v):+10.2f} {sum(s for _, s in v) / len(v):.1f}/5"
                    for v in rows.values())
    print(f"{'mean':<10} {means}")
    print("(each cell: correlation over the 20 heads, then how many of the top 5 agree in sign)")

if __name__ == "__main__":
    main()
