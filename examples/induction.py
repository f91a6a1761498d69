"""Induction, traced: a held-out English sentence that recurs (or a repeated random-token span) on `pythia` or `toy`.

    python examples/induction.py [--model pythia] [--prompt natural|random] [--seed N] [--out examples/out]

The natural prompt (`replacement.evaluate.natural_copy_prompt`): a sentence of the held-out text, what follows it,
then the sentence again, cut in the middle; the next token is the one that followed there in the first copy.

Prints the strongest paths to the correct logit, picks the last-position Lorsa head with the strongest edge into
that logit among those whose z pattern peaks on the token after the earlier occurrence, finds that head's
strongest QK pair (query side: the current token; key side: a node written at the earlier position by an
earlier layer's previous-token head) -- `graphs.circuits.induction_circuit` --, checks the head with path
patching (alone, and together with every other last-position head attending there), and renders the circuit
to SVG and PNG (every node the report names drawn, each head apart).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


# the held-out case each model is shown on by default (--seed picks another; in these the model copies: the answer
# is its top token):
# pythia: "And we ought to lay down our lives for the brothers. [...] And we ought to lay down" -> " our"
# toy: "set comprehension A compact way to process all or part of the elements [...] all or part" -> " of"
NATURAL_SEEDS = {"pythia": 5, "toy": 4}


def showcase_prompt(adapter, prompt: str = "natural", seed: int | None = None) -> tuple[torch.Tensor, int, int]:
    """(ids [1, n], the answer token, the position the induction head should attend to)."""
    from replacement.evaluate import natural_copy_prompt, repeated_span_prompt

    if prompt == "natural":
        return natural_copy_prompt(adapter, NATURAL_SEEDS.get(adapter.name, 5) if seed is None else seed)
    ids, answer = repeated_span_prompt(adapter, span=8, seed=1 if seed is None else seed)  # BOS + r + r[:-1]
    return ids, answer, ids.shape[1] - 8  # the answer r[-1] in the first copy, after the earlier r[-2]


def patch_checks(model, ids, answer: int, full, circuit) -> dict:
    """Path patching the induction head alone (also with the norm scales frozen, as in the graph) and with
    every last-position head of layers >= 1 attending to the same token, against the graph's predictions."""
    from graphs.circuits import heads_attending
    from graphs.patching import PathPatcher, graph_effects, parse_component

    n, head = ids.shape[1], circuit.head
    family = heads_attending(full, n - 1, circuit.peak, min_layer=1)
    comp = parse_component(head.id)
    patched, family_patched = (r.effect for r in PathPatcher(model, ids, answer, demean=True).effects(
        [comp, tuple(parse_component(h.id) for h in family)]))
    frozen = PathPatcher(model, ids, answer, demean=True, freeze_norms=True).effects([comp])[0].effect
    effects = graph_effects(full, full.logit(answer).id)
    return {"answer": answer, "family": family, "patched": patched, "patched_frozen_norms": frozen,
            "predicted": float(effects[full.index[head.id]]), "family_patched": family_patched,
            "family_predicted": sum(float(effects[full.index[h.id]]) for h in family)}


def analyse(model_name: str = "pythia", out: str | Path = "examples/out", seed: int | None = None, verbose: bool = True,
            prompt: str = "natural", replacements: str | Path | None = None):
    """Trace the prompt, find the induction circuit (graphs/circuits.py), patch it, write the graph and its
    picture; returns (pruned graph, full graph, circuit, patching figures). ``replacements``: a replacements
    folder instead of the bundled set."""
    from graphs.attribution import attribute
    from graphs.circuits import circuit_nodes, induction_circuit
    from graphs.lens import add_lens
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    say = print if verbose else (lambda *a, **k: None)
    adapter = load_model(model_name)
    model = ReplacementModel.load(adapter, replacements)
    ids, answer, expected_peak = showcase_prompt(adapter, prompt, seed)
    full = attribute(model, ids, target=adapter.tokenizer.decode([answer]))
    graph = prune(full)
    add_lens(graph, model)  # the pictures' third lines: what each kept head reads, each feature writes
    logit = graph.logit(answer)
    circuit = induction_circuit(full, logit.id, expected_peak, adapter.parallel_residual)
    checks = patch_checks(model, ids, answer, full, circuit)
    _report(say, adapter.tokenizer, ids, graph, full, logit, circuit, checks)
    named = {n.id for n in (circuit.head, circuit.query, circuit.key, circuit.prev_head) if n is not None}
    picture = full.subgraph(circuit_nodes(full, circuit.head, full.logit(answer)) | named)
    add_lens(picture, model)
    _write(say, graph, picture, Path(out))
    return graph, full, circuit, checks


def _report(say, tok, ids, graph, full, logit, c, checks) -> None:
    from replacement.tokenizer import token_text

    head, into = c.head, {e.source: e.weight for e in full.incoming(logit.id)}
    say(f"prompt tokens: {[token_text(tok, i) for i in ids[0].tolist()]}; correct next token "
        f"{token_text(tok, logit.index)!r} (p={logit.prob:.3f})")
    for strength, path in graph.top_paths(to=logit.id, k=3):
        say(f"  path ({strength:.3f}): " + " -> ".join(path))
    say(f"induction head {head.id} (layer {head.layer}): edge into {token_text(tok, logit.index)!r} "
        f"{into[head.id]:+.3f}; z pattern peaks at position {c.peak} ({token_text(tok, int(ids[0, c.peak]))!r}), "
        "the token after the earlier occurrence")
    for e in c.pairs[:3]:
        say(f"QK pair raising key {c.peak} over the other keys: query {e.query} x key {e.key} = {e.weight:+.3f}")
    if c.query is not None:
        say(f"  query side {c.query.id}: written at position {c.query.pos} in layer {c.query.layer}"
            + (", from the current token alone" if c.query_reads_current else "")
            + (f", a head reading position {c.query_source}" if c.query_source is not None else ""))
    if c.key_source is not None:
        say(f"  key side {c.key.id}: an earlier-layer head whose z pattern peaks at position {c.key_source}"
            + (" (the previous token: a previous-token head)" if c.prev_head is not None else ""))
    say(f"path patching {head.id}: logit change {checks['patched']:+.3f} ({checks['patched_frozen_norms']:+.3f} with "
        f"the norm scales frozen too, as in the graph); the graph predicts {checks['predicted']:+.3f}")
    say(f"the {len(checks['family'])} last-position heads of layers >= 1 that attend there, ablated together: "
        f"{checks['family_patched']:+.3f}; the graph predicts {checks['family_predicted']:+.3f}")


def _write(say, graph, picture, out: Path) -> None:
    """The pruned graph as JSON; the circuit alone (``picture``: the head, the logit, their strongest inputs, the
    head's strongest QK pairs and the nodes the report names, from the full graph) as DOT, SVG and PNG."""
    from graphs.export import write_json
    from graphs.files import write_all
    from replacement.errors import BadInputError

    write_json(graph, out / "induction.json")
    try:
        written = write_all(picture, out / "induction", ["svg", "png"], expand_families=True)
        say(f"wrote {written['svg']} and {written['png']}")
    except BadInputError as e:  # no graphviz: the DOT is written all the same
        say(f"note: {e}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pythia")
    ap.add_argument("--out", default="examples/out", help="output folder (default: examples/out, relative to the current folder; git ignores it at the repository root)")
    ap.add_argument("--prompt", choices=["natural", "random"], default="natural")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    from replacement.errors import run_script

    run_script(lambda: analyse(a.model, a.out, a.seed, prompt=a.prompt))
