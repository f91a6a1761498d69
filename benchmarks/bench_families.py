"""Head families on the induction showcase (issue 25, part 2): over seeds of `examples/induction.py`'s natural-text
prompt (a held-out sentence recurs, cut in the middle; `replacement.evaluate.natural_copy_prompt`), for each
family rule asked for:

- whether the strongest path to the correct logit (`top_paths(k=1, families=True)` on the pruned graph, as the
  example prints it) runs through an *induction family* (`graphs.circuits.induction_families`): a family of
  Lorsa heads at the last position, of layers >= 1 (a layer-0 head cannot compose with a previous-token head),
  every member's z pattern peaking on the position right after the earlier occurrence of the current token
  (the family's key);
- whether an induction family is the logit's largest direct input (a path's strength multiplies each target's
  share of its input, so a short path from one source, such as the current token's embedding through layer 0,
  can outrank a larger family whose own input is spread over the positions it copies from);
- that family (the one on the path, else the induction family the graph predicts the largest drop for), path
  patched as one unit (every member ablated together, `PathPatcher.effects([tuple])`), against its predicted
  effect (the sum of its members' `graph_effects`); the issue's bar is patched / predicted >= 0.5.  Patched
  as the model runs, and with the norms' scales frozen at their clean values (`freeze_norms`), as the graph's
  linearisation freezes them; a prompt with no induction family counts as failing both.

One line per prompt and rule, flushed as it goes (the run is long on a busy machine), then a summary per rule.

    python benchmarks/bench_families.py [--model toy pythia] [--seeds 20] [--first-seed 1] [--cosine 0.0 ...]
                                        [--layer-span 0 ...]
                                        [--direction read weights target] [--replacements DIR]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _examples import example as example_module


def measure(model, full, ids, answer: int, peak: int, configs: list) -> list[dict]:
    """Per family rule: the strongest path, the induction family checked and its patched and predicted effects."""
    from graphs.circuits import induction_families
    from graphs.families import find_families
    from graphs.patching import PathPatcher, graph_effects, parse_component
    from graphs.prune import prune

    n = ids.shape[1]
    logit_id = full.logit(answer).id
    effects = graph_effects(full, logit_id)
    rows, groups = [], []
    graph = prune(full)  # once
    for cfg in configs:
        find_families(graph, model, cfg, also=full)  # on the pruned graph, as trace does; the full one marked too
        collapsed = graph.collapsed()  # each family one node, as top_paths(..., families=True) sees the graph
        paths = collapsed.top_paths(to=logit_id, k=1)
        strength, path = paths[0] if paths else (0.0, [])
        top = collapsed.incoming(logit_id, k=1)  # the largest |direct edge| into the logit
        top_input = top[0].source if top else None
        fams = induction_families(full, n - 1, peak)
        predicted = {f.id: sum(float(effects[full.index[m]]) for m in f.members) for f in fams}
        on_path = [f for f in fams if f.id in path]
        chosen = on_path[0] if on_path else min(fams, key=lambda f: predicted[f.id], default=None)
        rows.append({"cfg": cfg, "path": path, "strength": strength, "through": bool(on_path), "n_families": len(fams),
                     "top_input": top_input, "top_is_induction": top_input in {f.id for f in fams},
                     "family": chosen, "predicted": predicted.get(chosen.id) if chosen else None})
        groups.append(tuple(parse_component(m) for m in chosen.members) if chosen else None)
    todo = [g for g in groups if g is not None]
    for key, frozen in (("patched", False), ("patched_frozen", True)):  # the graph freezes the norms' scales
        patcher = PathPatcher(model, ids, answer, demean=True, freeze_norms=frozen)
        patched = iter(r.effect for r in patcher.effects(todo)) if todo else iter(())
        for row, g in zip(rows, groups):
            row[key] = next(patched) if g is not None else None
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["toy"])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--cosine", type=float, nargs="+", default=[0.0])  # graphs.families.FamilyConfig's defaults
    ap.add_argument("--layer-span", type=int, nargs="+", default=[0])
    ap.add_argument("--direction", nargs="+", default=["read"], choices=["read", "weights", "target"])
    ap.add_argument("--replacements", default=None, help="a replacements folder (one --model): instead of the bundled")
    args = ap.parse_args()
    if args.replacements is not None and len(args.model) != 1:
        ap.error("--replacements needs exactly one --model")
    from graphs.attribution import attribute
    from graphs.families import FamilyConfig
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    example = example_module("induction")
    configs = [FamilyConfig(cosine=c, layer_span=s, direction=d) for d in args.direction for c in args.cosine
               for s in args.layer_span]
    for name in args.model:
        adapter = load_model(name)
        model = ReplacementModel.load(adapter, args.replacements)
        tally = {cfg: {"through": 0, "top": 0, "ok": 0, "ok_frozen": 0, "ratios": [], "ratios_frozen": [], "prompts": 0,
                       "seconds": []} for cfg in configs}
        print(f"{name}: natural-text induction, seeds {args.first_seed}-{args.first_seed + args.seeds - 1}", flush=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.time()
            ids, answer, peak = example.showcase_prompt(adapter, "natural", seed)
            full = attribute(model, ids, target=adapter.tokenizer.decode([answer]), qk=False, families=None)
            p = full.logit(answer).prob
            for row in measure(model, full, ids, answer, peak, configs):
                t = tally[row["cfg"]]
                t["prompts"] += 1
                t["through"] += row["through"]
                t["top"] += row["top_is_induction"]
                f = row["family"]
                ratio = row["patched"] / row["predicted"] if f is not None and row["predicted"] else float("nan")
                frozen = row["patched_frozen"] / row["predicted"] if f is not None and row["predicted"] else float("nan")
                if f is not None:
                    t["ratios"].append(ratio)
                    t["ratios_frozen"].append(frozen)
                    t["ok"] += ratio >= 0.5
                    t["ok_frozen"] += frozen >= 0.5
                t["seconds"].append(time.time() - t0)
                print(f"{name} seed {seed:>2} p={p:.2f} {row['cfg'].direction} cos>={row['cfg'].cosine} span {row['cfg'].layer_span}: path "
                      f"{row['strength']:.3f} {' -> '.join(row['path'])} | through induction family: "
                      f"{'yes' if row['through'] else 'no'}; largest direct input {row['top_input']}"
                      f"{' (induction)' if row['top_is_induction'] else ''} ({row['n_families']} induction families"
                      + (f"; {f.id} x{len(f)} patched {row['patched']:+.2f} / predicted {row['predicted']:+.2f} = "
                         f"{ratio:.2f}; norms frozen {row['patched_frozen']:+.2f} = {frozen:.2f}" if f is not None
                         else "; none") + f") [{time.time() - t0:.0f}s]", flush=True)
        for cfg, t in tally.items():
            print(f"SUMMARY {name} {cfg.direction} cos>={cfg.cosine} span {cfg.layer_span}: strongest path through an "
                  f"induction family on {t['through']}/{t['prompts']}; the largest direct input to the logit is one on "
                  f"{t['top']}/{t['prompts']}; patched >= 50% of predicted on {t['ok']}/"
                  f"{t['prompts']}{_spread(t['ratios'])}, with the norms' scales frozen on {t['ok_frozen']}/"
                  f"{t['prompts']}{_spread(t['ratios_frozen'])}; median {statistics.median(t['seconds']):.0f} s a prompt",
                  flush=True)


def _spread(ratios: list[float]) -> str:
    return f" (median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f})" if ratios else ""


if __name__ == "__main__":
    torch.set_num_threads(1)
    from replacement.errors import run_script

    run_script(main)
