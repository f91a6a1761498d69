"""Which original attention head does each Lorsa head come from?  One model, one or more sets of replacements.

    python examples/correspond.py [--model toy] [--n-seqs 16] [--out examples/out]
                                  [--compare NAME=FOLDER ...]   e.g. --compare random=runs/toy_lorsa_random

For every Lorsa layer: how many Lorsa heads one original head explains (R^2 >= 0.5), how many a few (<= 3) do,
how many are spread, and how many are dead (replacement/correspond.py), then the best-matched heads; with
--compare, the same for other Lorsa (e.g. trained from a random initialisation: `circuits train --what lorsa
--lorsa-init random --out FOLDER`), the transcoders staying the bundled ones.  Writes one bar chart of all of
them (correspond.png, drawn from correspond.dot by graphviz) and the per-head table (correspond.json) into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--out", default="examples/out", help="output folder (default: examples/out, relative to the current folder; git ignores it at the repository root)")
    ap.add_argument("--compare", action="append", default=[], help="NAME=FOLDER: other Lorsa checkpoints of the model.")
    args = ap.parse_args()

    from graphs.export import RenderError, render
    from replacement.assemble import ReplacementModel
    from replacement.correspond import CorrespondConfig, correspond, histogram_dot
    from replacement.io import atomic_write_text
    from replacement.models import load_model

    adapter = load_model(args.model)
    sets = {"bundled (init from the model's heads)": None}
    for spec in args.compare:
        name, _, folder = spec.partition("=")
        sets[name] = sorted(Path(folder).glob("layer*.lorsa.safetensors"))
        if not sets[name]:
            raise SystemExit(f"error: no layer*.lorsa.safetensors in {folder}")
    cfg = CorrespondConfig(n_seqs=args.n_seqs)
    series, table = {}, []
    for name, lorsas in sets.items():
        model = ReplacementModel.load(adapter)  # the bundled replacements, then the compared Lorsa in their place
        for path in lorsas or []:
            model.use_module(path)
        for L in sorted(model.lorsas):
            res = correspond(model, L, cfg)
            s = res.summary()
            series[f"{name}, layer {L}"] = res.counts()
            table.append({"set": name, **res.to_json()})
            best = max((h for h in res.heads if h.kind != "dead"), key=lambda h: h.r2[0])
            print(f"{name}, layer {L}: {s['counts']}; best single head > 50% for {s['best_r2_over_half']:.0%} of live "
                  f"heads; pattern overlap {s['mean_best_overlap']:.2f} (original heads among themselves "
                  f"{s['mean_original_overlap']:.2f}); best: L{L}.H{best.head} <- head {best.heads[0]} "
                  f"R^2 {best.r2[0]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "correspond.json", json.dumps(table, indent=1))
    dot = out / "correspond.dot"
    atomic_write_text(dot, histogram_dot(series, f"{args.model}: which original heads each Lorsa head comes from"))
    try:
        print(f"wrote {out / 'correspond.json'}, {render(dot, 'png')} (drawn from {dot.name})")
    except RenderError as e:  # no graphviz: the JSON and the DOT are written all the same
        print(f"wrote {out / 'correspond.json'}, {dot}; note: {e}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
