"""`trace PROMPT --model NAME`: attribution graph of a prompt through the replacement model, exported."""
from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from .common import FriendlyCommand, model_options

FORMATS = ("json", "dot", "svg", "png", "html")


def _formats(value: str) -> list[str]:
    from replacement.errors import BadInputError

    fmts = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise BadInputError(f"unknown format(s) {', '.join(bad) or value!r}; choose from {', '.join(FORMATS)}")
    return fmts


@click.command(cls=FriendlyCommand)
@click.argument("prompt")
@model_options
@click.option("--out", type=click.Path(), default=None, help="Output folder (default: ./traces/<slug>).")
@click.option("--attention", type=click.Choice(["lorsa", "frozen"]), default="lorsa", show_default=True,
              help="lorsa: attention replaced by Lorsa heads; frozen: real attention with frozen patterns (transcoders only).")
@click.option("--target", default=None, help="A token whose logit must be in the graph (e.g. ' 98').")
@click.option("--node-threshold", type=float, default=0.8, show_default=True)
@click.option("--edge-threshold", type=float, default=0.98, show_default=True)
@click.option("--max-nodes", type=int, default=None, help="Keep at most this many features/heads (most influential).")
@click.option("--qk/--no-qk", default=True, show_default=True, help="Explain Lorsa attention scores by QK feature pairs.")
@click.option("--qk-heads", type=int, default=None, help="Explain only the N most influential Lorsa heads.")
@click.option("--format", "fmt", default="json,dot,svg", show_default=True, help="Comma-separated: json, dot, svg, png, html.")
@click.option("--replacements", type=click.Path(), default=None, help="Replacement folder (default: beside the model).")
def trace(prompt, model_name, device, dtype, out, attention, target, node_threshold, edge_threshold, max_nodes, qk,
          qk_heads, fmt, replacements):
    """Trace PROMPT through MODEL's replacement model and write its attribution graph."""
    from graphs.attribution import attribute
    from graphs.export import RenderError, _slug, render, write_dot, write_json
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.errors import BadInputError
    from replacement.models import load_model

    for name, t in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0 < t <= 1:
            raise BadInputError(f"{name} must be in (0, 1], not {t}")
    if max_nodes is not None and max_nodes < 1:
        raise BadInputError("--max-nodes must be at least 1")
    fmts = _formats(fmt)
    if not prompt.strip():
        raise BadInputError("the prompt is empty")
    out_dir = Path(out or Path("traces") / _slug(prompt))
    _check_writable(out_dir)

    t0 = time.time()
    adapter = load_model(model_name, device, dtype)
    ids = adapter.tokenize(prompt)
    model = ReplacementModel.load(adapter, replacements, attention)
    t_load = time.time() - t0
    with torch.no_grad():
        probs = adapter.run(ids).logits[0, -1].float().softmax(-1)
    tok = adapter.tokenizer
    toks = [tok.decode([i]) for i in ids[0].tolist()]
    click.echo(f"model {adapter.name} ({attention} attention), {len(toks)} tokens: {toks}")
    vals, idx = probs.topk(5)
    click.echo("top predictions: " + ", ".join(f"{tok.decode([i])!r} {p:.3f}" for p, i in zip(vals.tolist(), idx.tolist())))

    t1 = time.time()
    full = attribute(model, ids, target=target, qk=qk, qk_heads=qk_heads, progress=True)
    graph = prune(full, node_threshold, edge_threshold, max_nodes)
    t_graph = time.time() - t1
    s = graph.scores
    click.echo(f"graph: {s['full_nodes']} nodes / {s['full_edges']} edges -> pruned {s['pruned_nodes']} nodes / "
               f"{s['pruned_edges']} edges (+{len(graph.qk)} QK pairs)")
    click.echo(f"replacement score {s['replacement_score']:.3f}, completeness score {s['completeness_score']:.3f}")
    _print_decomposition(graph.scores.get("logit_decomposition", {}))
    with torch.no_grad():
        pure_top = int(model.run_sparse(ids)[-1].argmax()) if attention == "lorsa" else None
    if pure_top is not None and pure_top != int(probs.argmax()):
        click.echo(f"warning: the pure replacement model (no error nodes) predicts {tok.decode([pure_top])!r}, the real "
                   f"model {tok.decode([int(probs.argmax())])!r}: this graph's answer rests on its error nodes")
    paths = graph.top_paths(k=1)
    if paths:
        strength, path = paths[0]
        click.echo(f"strongest path to {graph.logits()[0].label!r}: " + " -> ".join(path) + f"  (strength {strength:.3f})")
    written = []
    base = out_dir / "graph"
    if "json" in fmts:
        written.append(write_json(graph, base.with_suffix(".json")))
    if {"dot", "svg", "png", "html"} & set(fmts):
        dot = write_dot(graph, base.with_suffix(".dot"))
        if "dot" in fmts:
            written.append(dot)
        for f in ("svg", "png"):
            if f in fmts or (f == "svg" and "html" in fmts):
                try:
                    out = render(dot, f)
                    if f in fmts:
                        written.append(out)
                except RenderError as e:
                    click.echo(f"note: {e}")
        svg = base.with_suffix(".svg")
        if "html" in fmts and svg.is_file():
            from graphs.html import write_html
            from replacement.dashboards import load_or_build

            dash = load_or_build(model)
            written.append(write_html(graph, svg, base.with_suffix(".html"), dash))
            if "svg" not in fmts:
                svg.unlink()
    click.echo("wrote " + ", ".join(str(p) for p in written))
    click.echo(f"time: load {t_load:.1f}s, attribution + pruning {t_graph:.1f}s")


def _print_decomposition(dec: dict) -> None:
    """The target logit's signed input (and its margin over the runner-up) by source: features, errors,
    embeddings, constants.  Logits are demeaned over the vocabulary, as in the graph."""
    parts = ("features", "errors", "embeddings", "constants")
    for key, what in (("target", "logit {token!r} (demeaned)"), ("margin", "margin over {runner!r}")):
        if key not in dec:
            continue
        d = dec[key]
        name = what.format(token=dec["target"]["token"], runner=dec.get("runner_up", {}).get("token"))
        terms = ", ".join(f"{p} {d[p]:+.2f}" for p in parts)
        click.echo(f"{name} {d['total']:+.2f} = {terms}" + (f", pruned-away {d['dropped']:+.2f}" if d["dropped"] else ""))
    if dec.get("error_share") is not None:
        click.echo(f"errors carry {dec['error_share']:.0%} of the margin")


def _check_writable(folder: Path) -> None:
    from replacement.errors import BadInputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInputError(f"cannot write to --out {folder}: {e.strerror or e}") from None


main = trace
