"""Head families on the induction showcase: many Lorsa heads, one behaviour, one node.

    python examples/families.py [--model toy|pythia] [--seed N] [--cosine C] [--out examples/out] [--why]

On `examples/induction.py`'s natural-text prompt (a held-out sentence recurs, cut in the middle), groups the graph's
active heads into families (graphs/families.py: one position, one key, one layer, output directions not
opposed), lists the induction families (last position, keyed on the token after the earlier occurrence),
prints the strongest path to the correct logit with and without families, path-patches the induction family as
one unit against the graph's prediction (its members' sum), and draws the graph with each family as one node.
With ``--why`` it also traces the prompt as `trace` does (with QK) and prints why the largest induction family
looks at its key: its heads' contrastive QK splits summed, each end named by its family (`family_contrast`).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def _induction_example():
    spec = importlib.util.spec_from_file_location("induction_example", Path(__file__).with_name("induction.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def analyse(model_name: str = "toy", seed: int | None = None, cosine: float | None = None,
            out: str | Path = "examples/out", verbose: bool = True, why: bool = False) -> dict:
    """Trace, group, patch and draw (module docstring); returns the figures printed."""
    from graphs.attribution import attribute
    from graphs.circuits import induction_families
    from graphs.families import DEFAULT_FAMILIES, FamilyConfig, family_components, find_families, predicted_effect
    from graphs.files import write_all
    from graphs.lens import add_lens
    from graphs.patching import PathPatcher
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.errors import BadInputError
    from replacement.models import load_model
    from replacement.tokenizer import token_text

    say = print if verbose else (lambda *a, **k: None)
    adapter = load_model(model_name)
    model = ReplacementModel.load(adapter)
    ids, answer, peak = _induction_example().showcase_prompt(adapter, "natural", seed)
    cfg = DEFAULT_FAMILIES if cosine is None else FamilyConfig(cosine=cosine)
    full = attribute(model, ids, target=adapter.tokenizer.decode([answer]), qk=False)
    graph = prune(full)
    find_families(graph, model, cfg, also=full)  # on the pruned graph, as trace does; the full one's nodes marked too
    add_lens(graph, model)  # the pictures' third lines: what each kept head reads, each feature and family writes
    n, tok = ids.shape[1], adapter.tokenizer
    logit = full.logit(answer)
    say(f"{model_name}: next token {token_text(tok, answer)!r} (p={logit.prob:.2f}); the earlier occurrence is followed "
        f"by position {peak} ({token_text(tok, int(ids[0, peak]))!r}); family rule {cfg}")
    fams = induction_families(full, n - 1, peak)
    say(f"{len(full.families())} families in the graph; {len(fams)} induction families at the last position: "
        + ", ".join(f"{f.id} ({len(f)} heads, mean cosine {f.mean_cosine:.2f})" for f in fams))
    plain = graph.top_paths(to=logit.id, k=1)
    grouped = graph.top_paths(to=logit.id, k=1, families=True)
    for name, paths in (("without families", plain), ("with families", grouped)):
        for strength, path in paths:
            say(f"strongest path {name} ({strength:.3f}): {' -> '.join(path)}")
    path = grouped[0][1] if grouped else []
    on_path = [f for f in fams if f.id in path]
    effects = {f.id: predicted_effect(full, f, logit.id) for f in fams}
    chosen = on_path[0] if on_path else min(fams, key=lambda f: effects[f.id], default=None)
    result = {"graph": graph, "full": full, "families": fams, "path": path, "through": bool(on_path), "family": chosen}
    if chosen is not None:
        patched = PathPatcher(model, ids, answer, demean=True).effects([family_components(chosen)])[0].effect
        result.update(patched=patched, predicted=effects[chosen.id])
        say(f"path patching {chosen.id} ({len(chosen)} heads together): {patched:+.3f}; the graph predicts "
            f"{effects[chosen.id]:+.3f} ({patched / effects[chosen.id]:.2f} of it)")
    if why:
        result["why"] = _why(model, ids, answer, peak, cfg, say)
    try:
        written = write_all(graph, Path(out) / f"families-{model_name}", ["json", "svg"])
        say("wrote " + ", ".join(str(p) for p in written.values()))
    except BadInputError as e:  # no graphviz
        written = write_all(graph, Path(out) / f"families-{model_name}", ["json", "dot"])
        say(f"note: {e}; wrote " + ", ".join(str(p) for p in written.values()))
    return result


def _why(model, ids, answer, peak, cfg, say):
    """Why the largest induction family of the prompt traced as `trace` traces it (with QK) looks at its key: the
    summed contrast (`graphs.families.family_contrast`), printed; returns (family, contrast, heads explained) or
    None."""
    from graphs.circuits import induction_families
    from graphs.contrast import describe_contrast
    from graphs.families import family_contrast
    from graphs.pipeline import trace_graphs

    _, traced = trace_graphs(model, ids, target=answer, families=cfg)
    fams = induction_families(traced, ids.shape[1] - 1, peak)
    found = family_contrast(traced, max(fams, key=len)) if fams else None
    if found is None:
        say("traced with QK: no induction family with a QK contrast at its key")
        return None
    f = max(fams, key=len)
    say(f"traced again as `trace` traces (with QK; its own families), why its induction family {f.id} ({len(f)} heads) "
        f"looks at key {peak}: its heads' contrasts summed ({found[1]} of them)")
    for line in describe_contrast(found[0], 3):
        say("  " + line)
    return f, found[0], found[1], traced


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cosine", type=float, default=None)
    ap.add_argument("--out", default="examples/out", help="output folder (default: examples/out, relative to the current folder; git ignores it at the repository root)")
    ap.add_argument("--why", action="store_true", help="also why the largest induction family looks at its key (QK)")
    a = ap.parse_args()
    from replacement.errors import run_script

    run_script(lambda: analyse(a.model, a.seed, a.cosine, a.out, why=a.why))
