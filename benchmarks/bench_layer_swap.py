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

from bench_agreement import addition_heads, load

from graphs.patching import agreement


def _agreement(predicted: list[float], reference: list[float]) -> str:
    corr, _, signs = agreement(predicted, reference)  # the 5 largest |predicted|
    return f"correlation {corr:+.2f}, top-5 signs {signs}/5"


def main():
    from graphs.patching import PathPatcher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--pair", default="36+62")
    ap.add_argument("--module", action="append", default=[], help="a saved module to use instead (repeatable)")
    args = ap.parse_args()
    model = load(args.model, args.module)
    a, b = (int(x) for x in args.pair.split("+"))
    ids, logit, comps, predicted = addition_heads(model, a, b)
    patcher = PathPatcher(model, ids, logit.index, demean=True, freeze_norms=True)
    N, rec = model.adapter.n_layers, patcher.rec

    def slopes(swapped) -> list[float]:
        """The heads' linear effects with the MLPs of ``swapped`` layers replaced by their transcoders'
        Jacobians (active sets held) around the clean point."""
        maps = {L: (lambda dx, tc=model.transcoders[L], code=rec.layers[L].tc_code: tc.jvp(code, dx)) for L in swapped}
        return patcher.linear_effects(comps, mlp_maps=maps)

    real = slopes(())
    patched = [r.effect for r in patcher.effects(comps)]
    gap = max(abs(x - y) for x, y in zip(slopes(range(N)), predicted.tolist()))
    print(f"{a} + {b} =: real slopes vs path patching (frozen norms): {_agreement(real, patched)}")
    print(f"every layer swapped vs the graph's own prediction: largest difference {gap:.1e}")
    for r in range(1, N + 1):
        for S in itertools.combinations(range(N), r):
            swapped = slopes(S)
            print(f"transcoders at {str(S):<13} vs real slopes: {_agreement(swapped, real)}   "
                  f"vs patching: {_agreement(swapped, patched)}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
