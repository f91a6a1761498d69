"""Induction, traced: a held-out English sentence that recurs (or a repeated random-token span) on `pythia` or `toy`.

    python examples/induction.py [--model pythia] [--prompt natural|random] [--seed N] [--out examples/out]

The natural prompt (`replacement.evaluate.natural_copy_prompt`): a sentence of the held-out text, what follows it,
then the sentence again, cut in the middle; the next token is the one that followed there in the first copy.

Prints the strongest paths to the correct logit, picks the last-position Lorsa head with the strongest edge into
that logit among those whose z pattern peaks on the token after the earlier occurrence, finds that head's
strongest QK pair (query side: the current token; key side: a node written at the earlier position by an
earlier layer's previous-token head), checks the head with path patching (alone, and together with every
other last-position head attending there), and renders the circuit to SVG.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


NATURAL_SEED = 5  # "And we ought to lay down our lives for the brothers. [...] And we ought to lay down" -> " our"


def analyse(model_name: str = "pythia", out: str | Path = "examples/out", seed: int | None = None, verbose: bool = True,
            prompt: str = "natural") -> dict:
    from graphs.attribution import attribute
    from graphs.export import RenderError, render, write_dot, write_json
    from graphs.patching import PathPatcher, graph_effects, parse_component
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.evaluate import natural_copy_prompt, repeated_span_prompt
    from replacement.models import load_model
    from replacement.tokenizer import token_text

    say = print if verbose else (lambda *a, **k: None)
    adapter = load_model(model_name)
    model = ReplacementModel.load(adapter)
    if prompt == "natural":
        ids, answer, expected_peak = natural_copy_prompt(adapter, NATURAL_SEED if seed is None else seed)
    else:
        ids, answer = repeated_span_prompt(adapter, span=8, seed=1 if seed is None else seed)  # BOS + r + r[:-1]
        expected_peak = ids.shape[1] - 8  # the answer r[-1] in the first copy, after the earlier r[-2]
    n = ids.shape[1]
    tok = adapter.tokenizer
    target = tok.decode([answer])
    full = attribute(model, ids, target=target)
    graph = prune(full, 0.8, 0.98)
    logit = graph.node(f"logit.{answer}@{n - 1}")
    say(f"prompt tokens: {[token_text(tok, i) for i in ids[0].tolist()]}; correct next token {token_text(tok, answer)!r} "
        f"(p={logit.prob:.3f})")
    # the last-position Lorsa head whose z pattern peaks there, with the strongest direct edge to the logit
    into_logit = {e.source: e.weight for e in full.incoming(logit.id)}

    def peak_of(h):
        return int(torch.tensor(h.extra["z_pattern"]).abs().argmax())

    heads = [h for h in full.nodes(type="lorsa", position=n - 1) if h.id in into_logit and peak_of(h) == expected_peak]
    if not heads:
        raise RuntimeError("no last-position Lorsa head attends to the token after the earlier occurrence")
    head = max(heads, key=lambda h: into_logit[h.id])
    peak = peak_of(head)
    for strength, path in graph.top_paths(to=logit.id, k=3):
        say(f"  path ({strength:.3f}): " + " -> ".join(path))
    say(f"induction head {head.id} (layer {head.layer}): edge into {token_text(tok, answer)!r} {into_logit[head.id]:+.3f}; "
        f"z pattern "
        f"peaks at position {peak} ({token_text(tok, int(ids[0, peak]))!r}), the token after the earlier occurrence")
    # the head's strongest QK pair at that key position: what makes it attend there
    pairs = sorted((e for e in full.qk_pairs(head.id) if e.extra["key_pos"] == peak), key=lambda e: -abs(e.weight))
    top = pairs[0] if pairs else None
    prev_head = query_reads_current = query_source = key_source = None
    if top is not None:
        for e in pairs[:3]:
            say(f"QK pair at key {peak}: query {e.extra['query']} x key {e.extra['key']} = {e.weight:+.3f}")
        # the query side carries the current token: a node written at the last position before the head's layer
        # that reads only that token (the embedding, a head attending to its own position, or a layer-0 MLP
        # node of a parallel-residual model, whose MLP reads the embedding alone)
        query = full.node(top.extra["query"])
        query_reads_current = query.pos == n - 1 and query.layer < head.layer and (
            query.type == "embedding" or (query.type == "lorsa" and peak_of(query) == n - 1)
            or (query.type in ("transcoder", "mlp_error") and query.layer == 0 and adapter.parallel_residual))
        if query.type == "lorsa" and query.pos == n - 1 and query.layer < head.layer:
            query_source = peak_of(query)  # the position whose token the query-side head reads
        say(f"  query side {query.id}: written at the last position in layer {query.layer}"
            + (", from the current token alone" if query_reads_current else "")
            + (f", a head reading position {query_source}" if query_source is not None else ""))
        key = full.node(top.extra["key"])
        if key.type == "lorsa" and key.layer < head.layer and "z_pattern" in key.extra:
            src = key_source = int(torch.tensor(key.extra["z_pattern"]).abs().argmax())
            if src == peak - 1:
                prev_head = key
            say(f"  key side {key.id}: an earlier-layer head whose z pattern peaks at position {src}"
                + (" (the previous token: a previous-token head)" if src == peak - 1 else ""))
    # path patching: the head alone, then every last-position head of a later layer whose z pattern peaks on the
    # same token, ablated together (Lorsa splits a layer's induction attention over many one-dimensional heads)
    family = [h for h in full.nodes(type="lorsa", position=n - 1) if h.layer >= 1 and peak_of(h) == expected_peak]
    comp = parse_component(head.id)
    patched, family_patched = (r.effect for r in PathPatcher(model, ids, answer, demean=True).effects(
        [comp, tuple(parse_component(h.id) for h in family)]))
    frozen = PathPatcher(model, ids, answer, demean=True, freeze_norms=True).effects([comp])[0].effect
    effects = graph_effects(full, logit.id)
    predicted = float(effects[full.index[head.id]])
    family_predicted = sum(float(effects[full.index[h.id]]) for h in family)
    say(f"path patching {head.id}: logit change {patched:+.3f} ({frozen:+.3f} with the norm scales frozen too, "
        f"as in the graph); the graph predicts {predicted:+.3f}")
    say(f"the {len(family)} last-position heads of layers >= 1 that attend there, ablated together: "
        f"{family_patched:+.3f}; the graph predicts {family_predicted:+.3f}")
    out = Path(out)
    write_json(graph, out / "induction.json")
    dot = write_dot(graph.subgraph(_circuit_nodes(graph, head, logit)), out / "induction.dot")
    try:
        svg = render(dot, "svg")
        say(f"wrote {svg}")
    except RenderError as e:
        say(f"note: {e}")
    return {"head": head, "peak": peak, "expected_peak": expected_peak, "top_pair": top, "prev_head": prev_head,
            "query_reads_current": query_reads_current, "query_source": query_source, "key_source": key_source,
            "graph": graph,
            "full": full, "patched": patched, "predicted": predicted, "patched_frozen_norms": frozen, "family": family,
            "family_patched": family_patched, "family_predicted": family_predicted, "ids": ids, "answer": answer}


def _circuit_nodes(graph, head, logit, k: int = 6) -> set[str]:
    keep = {head.id, logit.id}
    keep |= {e.source for e in graph.incoming(head, k=k)}
    keep |= {e.source for e in graph.incoming(logit, k=k)}
    for e in graph.qk_pairs(head)[:k]:
        keep |= {e.extra["query"], e.extra["key"]}
    keep |= {n.id for n in graph.nodes(type="embedding")}
    return keep


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pythia")
    ap.add_argument("--out", default="examples/out")
    ap.add_argument("--prompt", choices=["natural", "random"], default="natural")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    analyse(a.model, a.out, a.seed, prompt=a.prompt)
