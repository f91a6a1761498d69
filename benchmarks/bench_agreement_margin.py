"""Why top-1 agreement lags the KL: the pure replacement model's agreement with the real one on the 2,032
held-out natural-text predictions of `circuits eval`, by how decided the real model is there (its top-1
probability minus its top-2's), beside a replacement for which both are known: the real logits plus Gaussian
noise scaled to the same mean KL.

    python benchmarks/bench_agreement_margin.py [--model toy pythia llama] [--replacements DIR]

Where the real model's two best tokens are near-tied, any small change of the logits swaps them; the noise
row says what top-1 agreement a model that errs uniformly at the replacement's KL would have.
"""
from __future__ import annotations

import argparse

import torch

EDGES = (0.0, 0.05, 0.1, 0.2, 0.4, 1.01)  # bins of the real model's top-1 minus top-2 probability
CURVE_KL = (0.005, 0.01, 0.02, 0.05, 0.1)  # where the noise model's agreement is printed


def real_and_pure(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, V], [N, V]) the real and the pure replacement model's logits at the held-out windows' predictions."""
    from replacement.evaluate import text_windows

    ids = text_windows(model.adapter, tokens, 128, 16)
    real, pure = [], []
    with torch.no_grad():
        for chunk in ids.split(8):
            real.append(model.adapter.run(chunk).logits[:, 1:].float().flatten(0, 1))
            pure.append(model.adapter.run(chunk, hooks=model.sparse_hooks()).logits[:, 1:].float().flatten(0, 1))
    return torch.cat(real), torch.cat(pure)


def noise_at_kl(real: torch.Tensor, kl: float, seed: int = 0) -> torch.Tensor:
    """The real logits plus i.i.d. Gaussian noise whose scale gives a mean KL(real || noisy) of ``kl`` (bisection)."""
    from replacement.evaluate import kl_per_token

    z = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed))
    lo, hi = 0.0, 10.0
    for _ in range(40):
        s = (lo + hi) / 2
        lo, hi = (s, hi) if float(kl_per_token(real, real + s * z).mean()) < kl else (lo, s)
    return real + (lo + hi) / 2 * z


def table(real: torch.Tensor, other: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """Per bin of the real model's top-1 margin: (bin, share of predictions, top-1 agreement, mean KL)."""
    from replacement.evaluate import kl_per_token

    top2 = real.softmax(-1).topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = (real.argmax(-1) == other.argmax(-1)).float()
    kl = kl_per_token(real, other)
    rows = []
    for lo, hi in zip(EDGES, EDGES[1:]):
        m = (margin >= lo) & (margin < hi)
        if m.any():
            rows.append((f"{lo:.2f}-{min(hi, 1.0):.2f}", float(m.float().mean()), float(agree[m].mean()), float(kl[m].mean())))
    rows.append(("all", 1.0, float(agree.mean()), float(kl.mean())))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="*", default=["toy", "pythia", "llama"])
    p.add_argument("--replacements", default=None, help="a replacements folder (one --model): instead of the bundled")
    args = p.parse_args()
    if args.replacements is not None and len(args.model) != 1:
        p.error("--replacements needs exactly one --model")

    from replacement.assemble import ReplacementModel
    from replacement.corpus import heldout_texts
    from replacement.data import tokenize_texts
    from replacement.models import load_model

    for name in args.model:
        adapter = load_model(name)
        model = ReplacementModel.load(adapter, args.replacements, "lorsa")
        real, pure = real_and_pure(model, tokenize_texts(adapter.tokenizer, heldout_texts(None)))
        pure_rows = table(real, pure)
        noise_rows = table(real, noise_at_kl(real, pure_rows[-1][3]))
        print(f"{name}: {len(real)} predictions; by the real model's top-1 minus top-2 probability")
        print(f"  {'margin':>10} {'share':>6}  {'pure: top-1 / KL':>17}  {'noise at the same KL: top-1 / KL':>33}")
        for (b, share, a, kl), (_, _, na, nkl) in zip(pure_rows, noise_rows):
            print(f"  {b:>10} {100 * share:5.1f}%  {100 * a:8.1f}% / {kl:.3f}  {100 * na:24.1f}% / {nkl:.3f}")
        curve = [(kl, table(real, noise_at_kl(real, kl))[-1][2]) for kl in CURVE_KL]
        print("  noise, top-1 agreement at a mean KL of " + ", ".join(f"{kl}: {100 * a:.1f}%" for kl, a in curve))


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
