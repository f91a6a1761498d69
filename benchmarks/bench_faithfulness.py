"""Where the pure replacement model loses the real model: top-1 agreement and KL on held-out natural text (the
2,032 predictions of `circuits eval`) with every module spliced in, with one kind only (all Lorsa, real MLPs; all
transcoders, real attention), with each module alone, and with every module but one.

    python benchmarks/bench_faithfulness.py [--model toy] [--replacements DIR] [--texts FILE ...]
        [--module FILE.safetensors ...] [--rows all|alone]

A module "alone" runs with every other block real; "all but" replaces every block except that one.  The KL of
"all" minus that of "all but M" is what splicing M in costs on top of the others.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--replacements", default=None, help="a replacements folder (default: the bundled one)")
    p.add_argument("--texts", nargs="*", default=None, help="text files (default: the shipped held-out sample)")
    p.add_argument("--module", nargs="*", default=[], help="saved modules (.safetensors) to use in place of those "
                   "of their kind and layer")
    p.add_argument("--rows", default="all", help="'all' or 'alone' (each module alone only)")
    args = p.parse_args()

    from replacement.assemble import ReplacementModel
    from replacement.corpus import heldout_texts
    from replacement.data import tokenize_texts
    from replacement.evaluate import agreement, modules_on_text
    from replacement.models import load_model

    torch.set_num_threads(2)
    adapter = load_model(args.model)
    model = ReplacementModel.load(adapter, args.replacements, "lorsa")
    for path in args.module:
        model.use_module(path)
    tokens = tokenize_texts(adapter.tokenizer, heldout_texts(args.texts))
    layers = range(adapter.n_layers)
    every = {(k, L) for L in layers for k in ("lorsa", "transcoder")}
    rows = [] if args.rows == "alone" else [("all", every), ("all Lorsa (real MLPs)", {m for m in every if m[0] == "lorsa"}),
            ("all transcoders (real attention)", {m for m in every if m[0] == "transcoder"})]
    rows += [] if args.rows == "alone" else [(f"all but {k} {L}", every - {(k, L)}) for L in layers for k in ("lorsa", "transcoder")]
    print(f"{args.model}: pure replacement on held-out natural text, top-1 agreement / KL (nats per token)")
    t = time.time()
    for name, f in modules_on_text(model, tokens).items():  # each alone, with its FVU and dead fraction, as `circuits eval`
        print(f"  {name + ' alone':36s} {100 * f['top1_agreement_alone']:5.1f}% / {f['kl_alone']:.3f}  FVU "
              f"{100 * f['fvu']:4.1f}%, dead {100 * f['dead_fraction']:3.0f}%, L0 {f['l0']:4.1f} of which {f['dense_l0']:4.1f} "
              f"from its {f['dense_units']} units active on > 50% of tokens", flush=True)
    print(f"  ({time.time() - t:.0f} s)")
    for name, keep in rows:
        t = time.time()
        r = agreement(adapter, tokens, lambda keep=keep: model.sparse_hooks(only=keep))
        print(f"  {name:36s} {100 * r['top1_agreement']:5.1f}% / {r['kl']:.3f}   ({r['tokens']} tokens, "
              f"{time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
