"""Graph vs path patching on addition prompts: for the 20 most influential Lorsa heads of each graph, the
correlation between the graph's predicted effect of removing a head (through transcoder paths, attention
frozen) and path patching it on the real model, and how many of the top 5 agree in sign.

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
    from replacement.models import load_model, model_fingerprint
    from replacement.store import load_module

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--pairs", default="36+62,23+45,51+38,17+64,72+19,44+33")
    ap.add_argument("--module", action="append", default=[], help="a saved module to use instead (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter)
    for path in args.module:
        module, meta = load_module(path, model_fingerprint(adapter), adapter.device)
        module.requires_grad_(False)
        (model.lorsas if meta["kind"] == "lorsa" else model.transcoders)[module.cfg.layer] = module.eval()
    corrs, signs = [], []
    for pair in args.pairs.split(","):
        a, b = (int(x) for x in pair.split("+"))
        prompt, target = f"{a} + {b} =", f" {a + b}"
        ids = adapter.tokenize(prompt)
        graph = attribute(model, ids, qk=False, target=target)
        logit = next(n for n in graph.logits() if n.label == target)
        predicted_all = graph_effects(graph, logit.id)
        infl = influence(graph)
        heads = sorted(graph.nodes(type="lorsa"), key=lambda n: -float(infl[graph.index[n.id]]))[:20]
        patcher = PathPatcher(model, ids, logit.index, demean=True)
        patched = torch.tensor([r.effect for r in patcher.effects([parse_component(h.id) for h in heads])])
        predicted = torch.tensor([float(predicted_all[graph.index[h.id]]) for h in heads])
        top5 = predicted.abs().argsort(descending=True)[:5]
        corrs.append(float(torch.corrcoef(torch.stack([predicted, patched]))[0, 1]))
        signs.append(int((predicted[top5].sign() == patched[top5].sign()).sum()))
        print(f"{prompt:<10} correlation {corrs[-1]:+.2f}   top-5 signs agree {signs[-1]}/5")
    print(f"mean       correlation {sum(corrs) / len(corrs):+.2f}   top-5 signs agree {sum(signs) / len(signs):.1f}/5")


if __name__ == "__main__":
    main()
