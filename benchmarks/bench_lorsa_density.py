"""How sparse a model's Lorsa really is on held-out natural text: per attention layer, how many dimensions the real
attention output spans, how many heads fire on more than half of the tokens ("dense" heads), how many of a token's
K active heads they are, and how many heads never fire.

    python benchmarks/bench_lorsa_density.py [--model llama] [--replacements DIR] [--batches 32]

A Lorsa head writes one direction.  Where the attention output needs D directions at every token to reach the
Lorsa's FVU, about D heads must fire at every token whatever K is: those are the dense heads, and they take
most of the K = 64 slots, which leaves the rest of the heads with few tokens to fire on (dead).
"""
from __future__ import annotations

import argparse
import time

import torch

from replacement.activations import TextSource, hook_points
from replacement.assemble import ReplacementModel
from replacement.corpus import heldout_texts
from replacement.data import tokenize_texts
from replacement.models import load_model
from replacement.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--replacements", default=None, help="A replacements folder (default: the bundled ones).")
    ap.add_argument("--batches", type=int, default=32, help="Batches of 16 x 128 held-out tokens.")
    args = ap.parse_args()
    set_threads()
    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter, args.replacements, "lorsa")
    ids = tokenize_texts(adapter.tokenizer, heldout_texts(None))
    source = TextSource(adapter.tokenizer, ids, min(128, adapter.context), seed=1)
    layers = sorted(model.lorsas)
    fires = {L: torch.zeros(model.lorsas[L].cfg.n_heads) for L in layers}  # [H] tokens each head fired on
    outputs = {L: [] for L in layers}  # the real attention outputs of the first 4 batches, for their spectrum
    n, t0 = 0, time.time()
    with torch.no_grad():
        for i in range(args.batches):
            batch = source.batch(i, 16).to(adapter.device)
            cache = adapter.run(batch, capture=sorted({p for L in layers for p in hook_points("lorsa", L)})).cache
            for L in layers:
                x_name, y_name = hook_points("lorsa", L)
                lorsa = model.lorsas[L]
                active = lorsa.encode(cache[x_name].float()).dense(lorsa.cfg.n_heads)[:, 1:] > 0  # BOS left out
                fires[L] += active.reshape(-1, lorsa.cfg.n_heads).sum(0).cpu()
                if i < 4:
                    outputs[L].append(cache[y_name].float()[:, 1:].reshape(-1, adapter.d_model).cpu())
            n += batch.shape[0] * (batch.shape[1] - 1)
    print(f"{args.model}: {n} held-out natural-text tokens ({time.time() - t0:.0f} s)")
    for L in layers:
        y = torch.cat(outputs[L])
        var = torch.linalg.svdvals(y - y.mean(0)) ** 2
        cum = var.cumsum(0) / var.sum()
        dims = [int((cum < q).sum()) + 1 for q in (0.9, 0.95, 0.98)]
        f = fires[L] / n
        dense = f > 0.5
        print(f"  L{L}: attention output spans {dims[0]} / {dims[1]} / {dims[2]} of {adapter.d_model} dims (90 / 95 / 98% "
              f"of its variance); heads firing on > 50% of tokens {int(dense.sum())}, on > 1% {int((f > 0.01).sum())}, "
              f"ever {int((f > 0).sum())} of {len(f)} (dead {float((f == 0).float().mean()):.0%}); a token's L0 "
              f"{float(f.sum()):.1f}, of which dense heads {float(f[dense].sum()):.1f}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
