"""One pass over the data for every module (`--what all`) against training each module separately.

    python benchmarks/bench_train_all.py [--model llama] [--steps 20] [--text FILE ...]

It trains on the recipe's corpora ($CIRCUITS_DATA; `circuits fetch-data` downloads them), or on text files given
with --text.

Both variants train the same modules on the same batches; the figure is tokens of text processed per second
per module trained (higher is better), and the wall time to give every module `steps` updates.
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    from replacement.models import load_model
    from replacement.train import TrainConfig, Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--text", nargs="+", default=None, help="text files to train on (default: the recipe's corpora)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = load_model(args.model)
    base = dict(steps=args.steps, batch_size=16, seq_len=128, checkpoint_every=10**9, norm_batches=1)
    from replacement.activations import default_source
    from replacement.errors import CircuitsError
    from replacement.launch import text_sources

    try:
        source = (text_sources(adapter, args.text, TrainConfig(**base))[0] if args.text
                  else default_source(adapter, 128))
    except CircuitsError as e:  # no corpora: say so in a line (and how to get them)
        raise SystemExit(f"error: {e}") from None

    def timed(cfg):
        tr = Trainer(adapter, cfg, source, "/dev/null")
        tr.estimate_norms()
        tr.init_modules()
        t = time.time()
        for s in range(cfg.steps):
            tr.train_step(s)
        return time.time() - t, len(tr.units)

    t_all, n_units = timed(TrainConfig(what="all", **base))
    t_sep = 0.0
    for L in range(adapter.n_layers):
        for kind in ("lorsa", "transcoder"):
            t_sep += timed(TrainConfig(what=kind, layers=[L], **base))[0]
    tokens = args.steps * 16 * 128
    print(f"{args.model}: {n_units} modules, {args.steps} steps of 16 x 128 tokens each")
    print(f"  one pass for all modules : {t_all:7.1f} s  ({tokens / t_all:8.0f} tokens/s, every module updated)")
    print(f"  each module separately   : {t_sep:7.1f} s  ({tokens / t_sep:8.0f} tokens/s)")
    print(f"  speed-up                 : {t_sep / t_all:.2f}x")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
