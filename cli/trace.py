"""`trace PROMPT --model NAME`: attribution graph of a prompt through the replacement model, exported."""
from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: the time line covers them too

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from graphs.memory_estimate import DEFAULT_MAX_FEATURE_NODES  # noqa: E402
from graphs.families import FamilyConfig  # noqa: E402
from graphs.files import FORMATS, RENDERED, parse_formats  # noqa: E402
from graphs.layout import DEFAULT_DRAW_NODES  # noqa: E402
from graphs.prune import EDGE_THRESHOLD, FILE_MAX_EDGES, FILE_MAX_FEATURES, NODE_THRESHOLD  # noqa: E402
from replacement.checks import check_count, check_fraction  # noqa: E402
from replacement.errors import BadInputError  # noqa: E402

from .common import (REPLACEMENTS_HELP, FiniteRange, FriendlyCommand, given, model_options,  # noqa: E402
                     not_empty, printable, spinner)
from .outputs import RunFolder, default_out_dir  # noqa: E402

DEFAULT_FORMATS = "json,dot,svg"


@click.command(cls=FriendlyCommand)
@click.argument("prompt")
@model_options
@click.option("--out", type=click.Path(), default=None, help="Output folder (default: ./traces/<slug>-<hash of prompt, model and settings>).")
@click.option("--attention", type=click.Choice(["lorsa", "frozen"]), default="lorsa", show_default=True,
              help="lorsa: attention replaced by Lorsa heads; frozen: real attention with frozen patterns (transcoders only).")
@click.option("--target", default=None, help="A token whose logit the graph must hold and explain (e.g. ' 98'): "
              "paths end there, and pruning weighs it (if it is not the top token) as much as all the other logits together.")
@click.option("--node-threshold", type=float, default=NODE_THRESHOLD, show_default=True)
@click.option("--edge-threshold", type=float, default=EDGE_THRESHOLD, show_default=True)
@click.option("--max-nodes", type=int, default=None, help="Keep at most this many features/heads (most influential).")
@click.option("--max-feature-nodes", type=int, default=DEFAULT_MAX_FEATURE_NODES, show_default=True,
              help="Attribute at most this many features/heads, the most influential first (saves time and memory).")
@click.option("--full", is_flag=True, help=f"Write the whole pruned graph (by default graph.json keeps at most "
              f"{FILE_MAX_FEATURES:,} features and {FILE_MAX_EDGES:,} edges, so it stays under 20 MB).")
@click.option("--qk/--no-qk", default=True, show_default=True, help="Explain Lorsa attention scores by QK feature pairs.")
@click.option("--qk-heads", type=int, default=None, help="Explain only the N most influential Lorsa heads.")
@click.option("--qk-reference", type=click.Choice(["mean", "runner_up", "none"]), default="mean", show_default=True,
              help="Explain each explained key's score minus the attention-weighted mean key's (mean) or the "
                   "strongest other key's (runner_up), by query-node x key-unit pairs; none: raw scores only.")
@click.option("--format", "fmt", default=None, show_default=DEFAULT_FORMATS,
              help="Comma-separated: json, dot, svg, png, html (by default, without graphviz's dot: json,dot, "
                   "with a note).")
@click.option("--draw-nodes", type=int, default=DEFAULT_DRAW_NODES, show_default=True,
              help="Draw at most this many nodes (the most influential) in the DOT/SVG/PNG and the page's first view.")
@click.option("--replacements", type=click.Path(), multiple=True, callback=not_empty, help=REPLACEMENTS_HELP)
@click.option("--bos", type=click.Choice(["keep", "zero"]), default="keep", show_default=True,
              help="keep: nodes at position 0 (BOS) as anywhere; zero: none there, their writes are constants "
                   "(circuit-tracer's convention).")
@click.option("--families/--no-families", default=True, show_default=True,
              help="Group the active heads (and features) into families: one position, one key, one layer, "
                   "output directions not opposed (graphs/families.py); the pictures draw each as one node.")
@click.option("--family-cosine", type=FiniteRange(-1.0, 1.0), default=None,
              help="The least cosine of a member's output direction with its family leader's (default: "
                   f"graphs.families.FamilyConfig's, {FamilyConfig.cosine}).")
@click.option("--expand-families", is_flag=True, help="Draw every member of a family rather than one node per family.")
def trace(prompt, model_name, device, dtype, out, attention, target, node_threshold, edge_threshold, max_nodes,
          max_feature_nodes, full, qk, qk_heads, qk_reference, fmt, draw_nodes, replacements, bos, families,
          family_cosine, expand_families):
    """Trace PROMPT through MODEL's replacement model and write its attribution graph."""
    from replacement.foreign import replacement_specs
    from replacement.threads import set_threads

    set_threads()
    replacements = replacement_specs(replacements)
    no_dot = fmt is None and shutil.which("dot") is None  # the default formats draw nothing, and say why
    fmt = fmt if fmt is not None else ",".join(f for f in DEFAULT_FORMATS.split(",") if not (no_dot and f in RENDERED))
    fmts = _check_options(prompt, node_threshold, edge_threshold, max_nodes, qk_heads, draw_nodes, fmt)
    check_count("--max-feature-nodes", max_feature_nodes)
    ctx = click.get_current_context()
    qk_given = [o for o, name in (("--qk-heads", "qk_heads"), ("--qk-reference", "qk_reference")) if given(ctx, name)]
    if attention == "frozen" and qk_given:  # no Lorsa heads: nothing they set is read
        raise BadInputError(f"{qk_given[0]} sets the Lorsa heads' QK explanations; --attention frozen has no Lorsa "
                            "heads: leave it out")
    if not qk and qk_given:
        raise BadInputError(f"{qk_given[0]} sets the QK explanations, which --no-qk leaves out: drop one of them")
    picture = [o for o, name in (("--draw-nodes", "draw_nodes"), ("--expand-families", "expand_families"))
               if given(ctx, name)]
    if picture and set(fmts) <= {"json"}:  # every other format draws the graph
        raise BadInputError(f"{picture[0]} sets what a picture draws, and --format {fmt} draws none: add dot, svg, "
                            "png or html, or leave it out")
    if expand_families and not families:
        raise BadInputError("--expand-families draws the members of families, which --no-families does not find")
    _check_prompt_and_target(model_name, prompt, target)
    family_cfg = _family_config(families, family_cosine)
    settings = {"attention": attention, "target": target, "node_threshold": node_threshold,
                "edge_threshold": edge_threshold, "max_nodes": max_nodes, "qk": qk, "qk_heads": qk_heads,
                "qk_reference": qk_reference,
                "replacements": replacements, "dtype": dtype, "bos": bos, "max_feature_nodes": max_feature_nodes,
                "full": full, "families": families, "family_cosine": family_cosine}
    if out is not None and not out.strip():
        raise BadInputError("--out is empty; name a folder, or leave it out for traces/<prompt>-<hash>")
    out_dir = Path(out) if out is not None else default_out_dir(prompt, model_name, settings)
    times = {"imports": time.time() - T_START}
    with RunFolder(out_dir) as run:
        t0 = time.time()
        with spinner(f"loading {model_name} and its replacements"):
            model, ids = _load(model_name, device, dtype, prompt, replacements, attention, max_feature_nodes)
        times["load"] = time.time() - t0
        from graphs.attribution import gc_paused

        with gc_paused():
            t1 = time.time()
            graph = _attribute(model, ids, target, qk, qk_heads, node_threshold, edge_threshold, max_nodes, bos,
                               max_feature_nodes, full, qk_reference, family_cfg)
            times["attribution + pruning"] = time.time() - t1
            written = _write(run, graph, model, fmts, draw_nodes, times, expand_families)
    if no_dot:
        click.echo("note: graphviz's `dot` is not installed, so no graph.svg was drawn (apt-get install graphviz); "
                   "graph.dot holds the picture and --format html needs no graphviz")
    click.echo("wrote " + ", ".join(printable(p) for p in written))  # a folder's name may hold a line break
    click.echo(f"time: {time.time() - T_START:.2f}s in all (" + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()) + ")")


_MODELS: dict = {}  # (model, device, dtype, replacements, attention) -> ReplacementModel, for later traces in one process


def _load(model_name, device, dtype, prompt, replacements, attention, max_feature_nodes=None):
    """(the replacement model, the prompt's ids [1, n]), refused in one line if its graph would not fit in memory.
    The model is loaded once per process: a second trace in the same process (the library or a test calling
    `trace`) reuses it ("warm" in docs/speed.md and benchmarks/bench_trace.py)."""
    from graphs.memory_estimate import check_graph
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    key = (model_name, str(device), str(dtype), repr(replacements), attention)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time: a second one would double the memory
        _MODELS[key] = ReplacementModel.load(load_model(model_name, device, dtype), replacements, attention)
    model = _MODELS[key]
    ids = model.adapter.tokenize(prompt)
    check_graph(model, ids, max_feature_nodes)  # before the top predictions print
    return model, ids


def _attribute(model, ids, target, qk, qk_heads, node_threshold, edge_threshold, max_nodes, bos="keep",
               max_feature_nodes=None, full=True, qk_reference="mean", families=None):
    """The pruned graph, with what it says printed: the prompt's tokens and top predictions, the graph's size and
    scores, its strongest paths and the target logit's decomposition."""
    from graphs.pipeline import trace_graphs
    from replacement.evaluate import pure_model_disagrees
    from replacement.models import single_token
    from replacement.tokenizer import token_text

    adapter, tok = model.adapter, model.adapter.tokenizer
    probs = adapter.next_token_probs(ids)
    toks = [token_text(tok, i) for i in ids[0].tolist()]
    click.echo(f"model {adapter.name} ({model.attention} attention), {len(toks)} tokens: {toks}")
    vals, idx = probs.topk(5)
    click.echo("top predictions: " + ", ".join(f"{token_text(tok, i)!r} {p:.3f}" for p, i in zip(vals.tolist(), idx.tolist())))
    _, graph = trace_graphs(model, ids, target, qk, qk_heads, node_threshold, edge_threshold, max_nodes, bos,
                            max_feature_nodes, full, qk_reference, families, progress=sys.stderr.isatty(),
                            check_memory=False)  # the memory was checked by _load
    s = graph.scores
    E = graph.edge_arrays
    linked = set(E.src.tolist()) | set(E.tgt.tolist())
    qk_only = sum(i not in linked for i in range(len(graph.node_list)))  # kept as the ends of a head's QK pairs
    click.echo(f"graph: {s['full_nodes']} nodes / {s['full_edges']} edges -> pruned {s['pruned_nodes']} nodes"
               + (f" ({qk_only} only as QK pair ends)" if qk_only else "") + f" / {s['pruned_edges']} edges "
               f"(+{len(graph.qk)} QK pairs)")
    click.echo(f"replacement score {s['replacement_score']:.3f}, completeness score {s['completeness_score']:.3f}")
    _print_paths(graph, None if target is None else single_token(tok, target, "--target"), int(probs.argmax()))
    _print_decomposition(graph.scores)
    pure = pure_model_disagrees(model, ids, probs)
    if pure is not None:
        click.echo(f"warning: the pure replacement model (no error nodes) predicts {token_text(tok, pure)!r}, the real "
                   f"model {token_text(tok, int(probs.argmax()))!r}: this graph's answer rests on its error nodes")
    return graph


def _family_config(on: bool, cosine: float | None):
    """The family rule `trace` groups by (None: no families)."""
    from graphs.families import DEFAULT_FAMILIES

    if not on:
        if cosine is not None:
            raise BadInputError("--family-cosine is used only with families (drop --no-families)")
        return None
    return DEFAULT_FAMILIES if cosine is None else FamilyConfig(cosine=cosine)


def _write(run, graph, model, fmts, draw_nodes, times, expand_families=False) -> list[Path]:
    """Write the asked formats into the run's folder and commit them (a DOT written only to render from stays
    behind); the time spent on dashboards and on files goes into ``times``."""
    from graphs.files import write_all

    def dashboards():
        from replacement.dashboards import load_or_build

        t = time.time()
        dash = load_or_build(model)
        times["dashboards"] = time.time() - t
        return dash

    t0 = time.time()
    written = write_all(graph, run.path("graph"), fmts, draw_nodes, dashboards, expand_families)
    times["files"] = time.time() - t0 - times.get("dashboards", 0.0)
    paths = run.commit([written[f].name for f in FORMATS if f in fmts])
    others = [f"graph.{f}" for f in FORMATS if f not in fmts and (run.out / f"graph.{f}").is_file()]
    if others:  # another run's files, left as they are (runs never delete each other's), may show another graph
        click.echo(f"note: {run.out} also holds {', '.join(others)}, which this trace did not write")
    return paths


def _print_decomposition(scores: dict) -> None:
    """The target logit's signed input (and its margin over the runner-up) by source: features, errors,
    embeddings, constants, in the graph attributed (``unattributed``: the input from features past
    --max-feature-nodes); then what the pruned graph that graph.json holds leaves out.  Logits are demeaned over
    the vocabulary, as in the graph."""
    from graphs.prune import SHARED_MARGIN

    dec, kept = scores.get("logit_decomposition", {}), scores.get("pruned_logit_decomposition", {})
    parts = ("features", "errors", "embeddings", "constants")
    for key, what in (("target", "logit {token!r} (demeaned)"), ("margin", "margin over {runner!r}")):
        if key not in dec:
            continue
        d = dec[key]
        name = what.format(token=dec["target"]["token"], runner=dec.get("runner_up", {}).get("token"))
        terms = ", ".join(f"{p} {d[p]:+.2f}" for p in parts)
        click.echo(f"{name} {d['total']:+.2f} = {terms}" + (f", unattributed {d['dropped']:+.2f}"
                                                            if round(d["dropped"], 2) else ""))
    margin = dec.get("margin", {}).get("total", 0.0)
    shares = abs(margin) >= SHARED_MARGIN  # a share of a margin near 0 reads as thousands of percent
    if "margin" in dec:
        m = dec["margin"]
        unattributed = m["dropped"] / margin if shares else 0.0
        click.echo((f"errors carry {dec['error_share']:.0%} of the margin" if shares else
                    f"errors carry {m['errors']:+.2f} of the margin, too near 0 for a share") +
                   (f"; features past --max-feature-nodes {unattributed:.0%}" if abs(unattributed) >= 0.05 else ""))
    if "target" in kept:
        lost = [(what, kept[key]["dropped"] - dec[key]["dropped"])
                for key, what in (("target", "the logit"), ("margin", "the margin")) if key in kept and key in dec]
        click.echo("the pruned graph (graph.json's) leaves out " + " and ".join(
            f"{x:+.2f} of {what}" + (f" ({x / margin:.0%})" if what == "the margin" and shares else "")
            for what, x in lost) + " (edges below --edge-threshold, features below --node-threshold)")


def _check_options(prompt, node_threshold, edge_threshold, max_nodes, qk_heads, draw_nodes, fmt) -> list[str]:
    """Everything that can be checked before loading anything; returns the formats."""
    check_fraction("--node-threshold", node_threshold)
    check_fraction("--edge-threshold", edge_threshold)
    for name, v in (("--max-nodes", max_nodes), ("--qk-heads", qk_heads), ("--draw-nodes", draw_nodes)):
        check_count(name, v)
    fmts = parse_formats(fmt)
    if not prompt.strip():
        raise BadInputError("the prompt is empty")
    return fmts


def _check_prompt_and_target(model_name: str, prompt: str, target: str | None) -> None:
    """Prompt length and --target, with the tokenizer alone (seconds before the model would have loaded), or with
    the kept model's own when an earlier trace in this process loaded it."""
    from replacement.models import encode_prompt, load_tokenizer, single_token

    kept = next((m.adapter for key, m in _MODELS.items() if key[0] == model_name), None)
    tok, context = (kept.tokenizer, kept.context) if kept is not None else load_tokenizer(model_name)
    if tok is not None:
        encode_prompt(tok, prompt, context)
        if target is not None:
            single_token(tok, target, "--target")


def _print_paths(graph, target: int | None = None, top_id: int | None = None) -> None:
    """The strongest path from an embedding through heads or features (one at least) to the target logit (``target``,
    a token id; default: the top one), and the strongest from an error node on its own line (an error node stands
    for what the replacement misses, so it explains nothing)."""
    from graphs.graph import ERROR_KINDS
    from graphs.layout import node_name

    top = graph.target
    click.echo(f"{'top' if target is None else 'target'} logit {top.label!r}: {top.activation:.2f} demeaned (the logit "
               f"minus its mean over the vocabulary; p={top.prob:.3f})")
    if target is not None and top_id is not None and target != top_id:
        best = next((n for n in graph.logits() if n.index == top_id), None)
        click.echo(f"  the model's top token is another: {best.label!r} (p={best.prob:.3f})" if best is not None else
                   "  the model's top token is another")
    errors = graph.top_paths(k=1, sources=ERROR_KINDS)
    for kind, found in (("feature", graph.feature_path()), ("error", errors[0] if errors else None)):
        if found is None:
            click.echo(f"strongest {kind} path: none in the pruned graph (--node-threshold, --edge-threshold and "
                       f"--full keep more)")
            continue
        strength, path = found
        names = " -> ".join(node_name(graph, graph.node(i)) for i in path)
        click.echo(f"strongest {kind} path (strength {strength:.3f}): {names}")
        click.echo(f"  ids: {' -> '.join(path)}")
    fams = graph.families()
    if fams:
        collapsed = graph.collapsed()
        found = graph.feature_path(families=True)
        best = (f"(strength {found[0]:.3f}): " + " -> ".join(node_name(collapsed, collapsed.node(i)) for i in found[1])
                if found else "none in the pruned graph")
        click.echo(f"{len(fams)} families (heads or features at one position and key, not writing against each other; "
                   "graphs/families.py), "
                   f"the largest {max(fams, key=len).id} of {len(max(fams, key=len))}; strongest feature path with each "
                   f"family as one node: {best}")


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


if __name__ == "__main__":  # `python -m cli.trace` runs the command, as the `trace` script does
    main()
