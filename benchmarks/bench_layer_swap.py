"""Which transcoders spoil the graph's linear effects: for the 20 most influential Lorsa heads of an addition
graph, the real model's first-order effect on the target logit (attention and norm scales frozen, as in the
graph) with the MLPs of a subset of layers swapped for their transcoders' linearisations (active sets held),
against the same with no swap (the real model's own slopes) and against path patching with frozen norms.
Swapping every layer reproduces the graph's own prediction (printed as a check).

    python benchmarks/bench_layer_swap.py [--model llama] [--pair 36+62] [--module FILE.safetensors ...]
"""
from __future__ import annotations

import argparse
import itertools

import torch


def agreement(predicted: list[float], reference: list[float]) -> str:
    p, r = torch.tensor(predicted), torch.tensor(reference)
    top5 = p.abs().argsort(descending=True)[:5]
    corr = float(torch.corrcoef(torch.stack([p, r]))[0, 1])
    return f"correlation {corr:+.2f}, top-5 signs {int((p[top5].sign() == r[top5].sign()).sum())}/5"


def main():
    from graphs.attribution import attribute
    from graphs.patching import PathPatcher, graph_effects, parse_component
    from graphs.prune import influence
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--pair", default="36+62")
    ap.add_argument("--module", action="append", default=[], help="a saved module to use instead (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter)
    for path in args.module:
        model.use_module(path)
    a, b = (int(x) for x in args.pair.split("+"))
    ids = adapter.tokenize(f"{a} + {b} =")
    graph = attribute(model, ids, qk=False, target=f" {a + b}")
    logit = next(n for n in graph.logits() if n.label == f" {a + b}")
    infl = influence(graph)
    heads = sorted(graph.nodes(type="lorsa"), key=lambda n: -float(infl[graph.index[n.id]]))[:20]
    comps = [parse_component(h.id) for h in heads]
    patcher = PathPatcher(model, ids, logit.index, demean=True, freeze_norms=True)
    N, rec = adapter.n_layers, patcher.rec

    def slopes(swapped: set[int]) -> list[float]:
        """Gradient x ablation for each head, with the MLPs of ``swapped`` layers replaced by their transcoders'
        linear maps around the clean point: mlp.out = clean out + J_tc (mlp.in - clean in)."""
        deltas = [torch.zeros_like(rec.layers[L].attn_out, requires_grad=True) for L in range(N)]
        hooks = {name: (lambda t, n, v=v: v[None]) for name, v in rec.cache.items() if name.endswith(".scale")}
        live = {}
        for L in range(N):
            lr = rec.layers[L]
            hooks[f"blocks.{L}.attn.out"] = lambda t, n, v=lr.attn_out, d=deltas[L]: (v + d)[None]
            if L in swapped:
                tc = model.transcoders[L]
                hooks[f"blocks.{L}.mlp.in"] = lambda t, n, L=L: live.__setitem__(L, t[0])
                hooks[f"blocks.{L}.mlp.out"] = (lambda t, n, L=L, lr=lr, tc=tc:
                                                (lr.mlp_out + tc.jvp(lr.tc_code, live[L] - lr.mlp_in))[None])
        with torch.enable_grad():
            metric = patcher.metric(adapter.run(patcher.ids[None], hooks=hooks).logits)[0]
            grads = torch.autograd.grad(metric, deltas)
        return [float((grads[c.layer] * patcher.delta(c, "zero")).sum()) for c in comps]

    real = slopes(set())
    patched = [r.effect for r in patcher.effects(comps)]
    effects = graph_effects(graph, logit.id)
    predicted = [float(effects[graph.index[h.id]]) for h in heads]
    gap = max(abs(x - y) for x, y in zip(slopes(set(range(N))), predicted))
    print(f"{a} + {b} =: real slopes vs path patching (frozen norms): {agreement(real, patched)}")
    print(f"every layer swapped vs the graph's own prediction: largest difference {gap:.1e}")
    for r in range(1, N + 1):
        for S in itertools.combinations(range(N), r):
            swapped = slopes(set(S))
            print(f"transcoders at {str(S):<13} vs real slopes: {agreement(swapped, real)}   "
                  f"vs patching: {agreement(swapped, patched)}")


if __name__ == "__main__":
    main()
