"""`trace PROMPT --model NAME`: attribution graph of a prompt through the replacement model, exported."""
from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: the time line covers them too

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402

from graphs.layout import DEFAULT_DRAW_NODES  # noqa: E402
from replacement.errors import BadInputError  # noqa: E402

from .common import REPLACEMENTS_HELP, FriendlyCommand, model_options, spinner  # noqa: E402
from .outputs import RunFolder, default_out_dir  # noqa: E402

FORMATS = ("json", "dot", "svg", "png", "html")


def _formats(value: str) -> list[str]:
    fmts = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise BadInputError(f"unknown format(s) {', '.join(bad) or value!r}; choose from {', '.join(FORMATS)}")
    return fmts


@click.command(cls=FriendlyCommand)
@click.argument("prompt")
@model_options
@click.option("--out", type=click.Path(), default=None, help="Output folder (default: ./traces/<slug>-<hash of prompt, model and settings>).")
@click.option("--attention", type=click.Choice(["lorsa", "frozen"]), default="lorsa", show_default=True,
              help="lorsa: attention replaced by Lorsa heads; frozen: real attention with frozen patterns (transcoders only).")
@click.option("--target", default=None, help="A token whose logit must be in the graph (e.g. ' 98').")
@click.option("--node-threshold", type=float, default=0.8, show_default=True)
@click.option("--edge-threshold", type=float, default=0.98, show_default=True)
@click.option("--max-nodes", type=int, default=None, help="Keep at most this many features/heads (most influential).")
@click.option("--qk/--no-qk", default=True, show_default=True, help="Explain Lorsa attention scores by QK feature pairs.")
@click.option("--qk-heads", type=int, default=None, help="Explain only the N most influential Lorsa heads.")
@click.option("--format", "fmt", default="json,dot,svg", show_default=True, help="Comma-separated: json, dot, svg, png, html.")
@click.option("--draw-nodes", type=int, default=DEFAULT_DRAW_NODES, show_default=True,
              help="Draw at most this many nodes (the most influential) in the DOT/SVG/PNG and the page's first view.")
@click.option("--replacements", type=click.Path(), multiple=True, help=REPLACEMENTS_HELP)
@click.option("--bos", type=click.Choice(["keep", "zero"]), default="keep", show_default=True,
              help="keep: nodes at position 0 (BOS) as anywhere; zero: none there, their writes are constants "
                   "(circuit-tracer's convention).")
def trace(prompt, model_name, device, dtype, out, attention, target, node_threshold, edge_threshold, max_nodes, qk,
          qk_heads, fmt, draw_nodes, replacements, bos):
    """Trace PROMPT through MODEL's replacement model and write its attribution graph."""
    from graphs.attribution import attribute
    from graphs.export import RenderError, render, write_dot, write_json
    from graphs.prune import prune
    from graphs.validate import check_finite
    from replacement.assemble import ReplacementModel
    from replacement.foreign import replacement_specs
    from replacement.models import load_model
    from replacement.tokenizer import token_text

    replacements = replacement_specs(replacements)
    fmts = _check_options(prompt, node_threshold, edge_threshold, max_nodes, qk_heads, draw_nodes, fmt)
    _check_prompt_and_target(model_name, prompt, target)
    settings = {"attention": attention, "target": target, "node_threshold": node_threshold,
                "edge_threshold": edge_threshold, "max_nodes": max_nodes, "qk": qk, "qk_heads": qk_heads,
                "replacements": replacements, "dtype": dtype, "bos": bos}
    out_dir = Path(out) if out else default_out_dir(prompt, model_name, settings)
    times = {"imports": time.time() - T_START}
    with RunFolder(out_dir) as run:
        t0 = time.time()
        with spinner(f"loading {model_name} and its replacements"):
            adapter = load_model(model_name, device, dtype)
            ids = adapter.tokenize(prompt)
            model = ReplacementModel.load(adapter, replacements, attention)
        _check_memory(model, ids)
        times["load"] = time.time() - t0
        t1 = time.time()
        with torch.no_grad():
            logits = adapter.run(ids).logits[0, -1].float()
        if not bool(torch.isfinite(logits).all()):
            raise BadInputError(f"the model {adapter.name} outputs NaN or infinite logits (NaN weights?); no graph written")
        probs = logits.softmax(-1)
        tok = adapter.tokenizer
        toks = [token_text(tok, i) for i in ids[0].tolist()]
        click.echo(f"model {adapter.name} ({attention} attention), {len(toks)} tokens: {toks}")
        vals, idx = probs.topk(5)
        click.echo("top predictions: " + ", ".join(f"{token_text(tok, i)!r} {p:.3f}" for p, i in zip(vals.tolist(), idx.tolist())))

        full = attribute(model, ids, target=target, qk=qk, qk_heads=qk_heads, progress=sys.stderr.isatty(), bos=bos)
        graph = prune(full, node_threshold, edge_threshold, max_nodes)
        check_finite(graph)
        s = graph.scores
        click.echo(f"graph: {s['full_nodes']} nodes / {s['full_edges']} edges -> pruned {s['pruned_nodes']} nodes / "
                   f"{s['pruned_edges']} edges (+{len(graph.qk)} QK pairs)")
        click.echo(f"replacement score {s['replacement_score']:.3f}, completeness score {s['completeness_score']:.3f}")
        _print_paths(graph)
        _print_decomposition(graph.scores.get("logit_decomposition", {}))
        _warn_if_pure_model_disagrees(model, ids, probs)
        times["attribution + pruning"] = time.time() - t1
        written = []
        base = run.path("graph")
        t2 = time.time()
        if "json" in fmts:
            written.append(write_json(graph, base.with_suffix(".json")))
        if {"dot", "svg", "png"} & set(fmts):
            dot = write_dot(graph, base.with_suffix(".dot"), draw_nodes)
            if "dot" in fmts:
                written.append(dot)
            for f in ("svg", "png"):
                if f in fmts:
                    try:
                        written.append(render(dot, f))
                    except RenderError as e:
                        raise BadInputError(f"{e}; nothing was written") from None
        times["files"] = time.time() - t2
        if "html" in fmts:
            from graphs.html import write_html
            from replacement.dashboards import load_or_build

            t3 = time.time()
            dash = load_or_build(model)
            times["dashboards"] = time.time() - t3
            t4 = time.time()
            written.append(write_html(graph, base.with_suffix(".html"), dash, draw_nodes))
            times["files"] += time.time() - t4
        written = run.commit([p.name for p in written])  # a DOT written only to render from stays behind
    click.echo("wrote " + ", ".join(str(p) for p in written))
    click.echo(f"time: {time.time() - T_START:.1f}s in all (" + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + ")")


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


def _warn_if_pure_model_disagrees(model, ids, probs) -> None:
    """One line when the pure replacement model (no error nodes) predicts another token than the real model."""
    if model.attention != "lorsa":
        return
    with torch.no_grad():
        pure, real = int(model.run_sparse(ids)[-1].argmax()), int(probs.argmax())
    if pure != real:
        tok = model.adapter.tokenizer
        click.echo(f"warning: the pure replacement model (no error nodes) predicts {tok.decode([pure])!r}, the real "
                   f"model {tok.decode([real])!r}: this graph's answer rests on its error nodes")


def _check_options(prompt, node_threshold, edge_threshold, max_nodes, qk_heads, draw_nodes, fmt) -> list[str]:
    """Everything that can be checked before loading anything; returns the formats."""
    for name, t in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0 < t <= 1:
            raise BadInputError(f"{name} must be in (0, 1], not {t}")
    for name, v in (("--max-nodes", max_nodes), ("--qk-heads", qk_heads), ("--draw-nodes", draw_nodes)):
        if v is not None and v < 1:
            raise BadInputError(f"{name} must be at least 1, not {v}")
    fmts = _formats(fmt)
    if not prompt.strip():
        raise BadInputError("the prompt is empty")
    if {"svg", "png"} & set(fmts) and shutil.which("dot") is None:
        raise BadInputError(f"--format {','.join(fmts)} needs graphviz's `dot`, which is not installed "
                            "(apt-get install graphviz); --format json,dot,html needs none")
    return fmts


def _check_prompt_and_target(model_name: str, prompt: str, target: str | None) -> None:
    """Prompt length and --target, with the tokenizer alone (seconds before the model would have loaded)."""
    from replacement.models import encode_prompt, load_tokenizer, single_token

    tok, context = load_tokenizer(model_name)
    if tok is not None:
        encode_prompt(tok, prompt, context)
        if target is not None:
            single_token(tok, target, "--target")


def _check_memory(model, ids) -> None:
    """Refuse in one line a graph whose estimated size exceeds the memory available (graphs/budget.py)."""
    from graphs.budget import check, estimate
    from replacement.foreign import feature_bound

    lorsa_k = [model.lorsas[L].cfg.top_k for L in sorted(model.lorsas)] if model.attention == "lorsa" else None
    check(estimate(ids.shape[1], lorsa_k, feature_bound(model, ids)), ids.shape[1])


def _print_paths(graph) -> None:
    """The strongest path from an embedding through features to the top logit, and the strongest from an error
    node on its own line (an error node stands for what the replacement misses, so it explains nothing)."""
    from graphs.layout import node_name

    top = graph.logits()[0]
    click.echo(f"top logit {top.label!r}: {top.activation:.2f} demeaned (the logit minus its mean over the vocabulary; "
               f"p={top.prob:.3f})")
    for kind, sources in (("feature", ("embedding",)), ("error", ("attn_error", "mlp_error"))):
        paths = graph.top_paths(k=1, sources=sources)
        if not paths:
            click.echo(f"strongest {kind} path: none in the pruned graph")
            continue
        strength, path = paths[0]
        names = " -> ".join(node_name(graph, graph.node(i)) for i in path)
        click.echo(f"strongest {kind} path (strength {strength:.3f}): {names}")
        click.echo(f"  ids: {' -> '.join(path)}")


def main() -> None:
    """The `trace` console script.  It leaves without the interpreter's teardown (freeing torch and the graph
    takes 1-2 s more), so that the time line it prints is the command's whole time."""
    import os
    import sys

    try:
        trace()
        code = 0
    except SystemExit as e:  # click always ends this way
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            click.echo(e.code, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
