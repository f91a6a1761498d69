"""Graph files: JSON (circuit-tracer / Neuronpedia layout plus our fields, schema-checked), DOT, SVG/PNG.

JSON layout (schema: graphs/schema/graph.schema.json, version 1):

    metadata  slug, scan (model), prompt, prompt_tokens, transcoder_list, node_threshold, schema_version,
              plus prompt_token_ids, settings, scores
    qParams   pinnedIds, supernodes, linkType, clickedId, sg_pos (the viewer's state)
    nodes     node_id, feature, layer ("E" for embeddings, "L" for layer L, n_layers+1 for logits), ctx_idx,
              feature_type, jsNodeId, clerp, influence, activation, token_prob, is_target_logit;
              ours: type, model_layer, index, preact, const, dropped, z_pattern (Lorsa heads), qk (Lorsa heads)
    links     source, target, weight; ours: kind (ov | direct)
    qk_links  ours: query, key, target (the Lorsa head), key_pos, attention, weight
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from replacement.data import atomic_write_text

from .graph import AttributionGraph, Edge, Node
from .validate import load_graph_dict, strict_dumps

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "graph.schema.json"
FEATURE_TYPES = {"embedding": "embedding", "transcoder": "cross layer transcoder", "mlp_error": "mlp reconstruction error",
                 "logit": "logit", "lorsa": "lorsa head", "attn_error": "attention reconstruction error"}
_NODE_FIELDS = ("id", "type", "layer", "pos", "index", "activation", "influence", "label", "prob", "const", "preact", "dropped")


def _viewer_layer(node: Node, n_layers: int) -> str:
    if node.type == "embedding":
        return "E"
    return str(n_layers + 1) if node.type == "logit" else str(node.layer)


def _clerp(node: Node) -> str:
    if node.type == "logit":
        return f'Output "{node.label}" (p={node.prob:.3f})'
    if node.type == "embedding":
        return f'Emb: "{node.label}"'
    return node.label


def to_dict(graph: AttributionGraph, slug: str | None = None) -> dict:
    n_layers = max([n.layer for n in graph.node_list if n.type == "logit"], default=0)
    target_ids = {n.id for n in graph.logits()[:1]}
    nodes = []
    for n in graph.node_list:
        d = {"node_id": n.id, "feature": n.index, "layer": _viewer_layer(n, n_layers), "ctx_idx": n.pos,
             "feature_type": FEATURE_TYPES[n.type], "jsNodeId": n.id, "clerp": _clerp(n), "influence": n.influence,
             "activation": n.activation, "token_prob": n.prob, "is_target_logit": n.id in target_ids,
             "run_idx": 0, "reverse_ctx_idx": 0, "type": n.type, "model_layer": n.layer, "index": n.index,
             "preact": n.preact, "const": n.const, "dropped": n.dropped, "label": n.label}
        if "z_pattern" in n.extra:
            d["z_pattern"] = n.extra["z_pattern"]
        if "qk" in n.extra:
            d["qk"] = n.extra["qk"]
        nodes.append(d)
    links = [{"source": e.source, "target": e.target, "weight": e.weight, "kind": e.kind} for e in graph.edges]
    qk_links = [{"query": e.extra["query"], "key": e.extra["key"], "target": e.target, "key_pos": e.extra["key_pos"],
                 "attention": e.extra.get("attention", 0.0), "weight": e.weight} for e in graph.qk]
    transcoders = sorted({f"layer{n.layer}.{'lorsa' if n.type == 'lorsa' else 'transcoder'}"
                          for n in graph.node_list if n.type in ("lorsa", "transcoder")})
    return {
        "metadata": {"slug": slug or _slug(graph.prompt), "scan": str(graph.settings.get("model", "")),
                     "prompt": graph.prompt, "prompt_tokens": graph.tokens, "prompt_token_ids": graph.token_ids,
                     "schema_version": SCHEMA_VERSION, "transcoder_list": transcoders,
                     "node_threshold": graph.settings.get("node_threshold"), "settings": graph.settings,
                     "scores": graph.scores},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes, "links": links, "qk_links": qk_links,
    }


def from_dict(d: dict) -> AttributionGraph:
    if d.get("metadata", {}).get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported graph schema version {d.get('metadata', {}).get('schema_version')!r}")
    nodes = []
    for x in d["nodes"]:
        extra = {k: x[k] for k in ("z_pattern", "qk") if k in x}
        nodes.append(Node(id=x["node_id"], type=x["type"], layer=x["model_layer"], pos=x["ctx_idx"], index=x["index"],
                          activation=x["activation"], influence=x["influence"], label=x.get("label", ""),
                          prob=x["token_prob"], const=x["const"], preact=x["preact"], dropped=x["dropped"], extra=extra))
    edges = [Edge(e["source"], e["target"], e["weight"], e["kind"]) for e in d["links"]]
    m = d["metadata"]  # qk_links are a flat view of the heads' "qk" fields, from which the graph derives them
    return AttributionGraph(m["prompt"], m["prompt_tokens"], m.get("prompt_token_ids", []), nodes, edges,
                            m.get("settings", {}), m.get("scores", {}))


def validate(d: dict) -> None:
    """Raise jsonschema.ValidationError if ``d`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(d, json.loads(SCHEMA_PATH.read_text()))


def write_json(graph: AttributionGraph, path: str | Path, slug: str | None = None) -> Path:
    path = Path(path)
    d = to_dict(graph, slug)
    validate(d)
    atomic_write_text(path, strict_dumps(d))
    return path


def read_json(path: str | Path) -> AttributionGraph:
    """A graph file, checked (graphs/validate.py): any malformed file raises BadGraphError (one line)."""
    return from_dict(load_graph_dict(path))


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.strip().lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:60] or "graph"


# ---------------------------------------------------------------------------------------------------------
# DOT and rendering
# ---------------------------------------------------------------------------------------------------------

STYLE = {  # fill colour, shape
    "embedding": ("#d9d9d9", "box"), "lorsa": ("#9ecae1", "ellipse"), "transcoder": ("#a1d99b", "ellipse"),
    "attn_error": ("#fdd0a2", "diamond"), "mlp_error": ("#fdae6b", "diamond"), "logit": ("#fcbba1", "box"),
}


def _q(s: str) -> str:
    """A DOT string literal that shows ``s`` as written: backslashes and quotes escaped, newlines as line
    breaks, ``&`` as ``&amp;`` (Graphviz decodes HTML entities in strings), and characters that XML forbids
    (control characters, lone surrogates, U+FFFE/U+FFFF) as visible escapes such as ``\\x01``."""
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return '"' + _XML_UNSAFE.sub(_visible_escape, s).replace("\n", "\\n") + '"'


_XML_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def _visible_escape(m: "re.Match") -> str:
    c = ord(m.group())
    return f"\\\\x{c:02x}" if c < 0x100 else f"\\\\u{c:04x}"


def _short_label(graph: AttributionGraph, n: Node) -> str:
    tok = graph.tokens[n.pos] if 0 <= n.pos < len(graph.tokens) else ""
    tok = repr(tok)[1:-1]
    if n.type == "embedding":
        return f"{tok}"
    if n.type == "logit":
        return f"{repr(n.label)[1:-1]}\np={n.prob:.2f}"
    kind = {"lorsa": f"L{n.layer}.H{n.index}", "transcoder": f"L{n.layer}.F{n.index}",
            "attn_error": f"L{n.layer} attn err", "mlp_error": f"L{n.layer} mlp err"}[n.type]
    return f"{tok}\n{kind}"


def to_dot(graph: AttributionGraph, max_edges: int = 300, qk_per_head: int = 2, max_qk: int = 120) -> str:
    """Nodes ranked by layer (embeddings at the bottom, logits on top), ordered by token position; node type
    by colour and shape; edge width by |weight|, colour by sign; QK edges dashed.

    A drawing of thousands of edges is neither readable nor quick to lay out, so the DOT keeps the
    ``max_edges`` strongest OV/direct edges (by |weight| x the target's influence), the ``qk_per_head``
    strongest QK pairs of the drawn heads (``max_qk`` at most), and the nodes they touch; the JSON keeps all."""
    graph = _drawable(graph, max_edges, qk_per_head, max_qk)
    lines = ["digraph attribution {", "  rankdir=BT; newrank=true; splines=true; nodesep=0.15; ranksep=0.5;",
             '  node [style=filled, fontname="Helvetica", fontsize=10, margin="0.05,0.03"];',
             f'  label={_q(graph.prompt + "  " + _score_line(graph))}; labelloc=t; fontname="Helvetica";']
    rows: dict[tuple, list[Node]] = {}
    for n in graph.node_list:
        sub = {"embedding": 0, "lorsa": 1, "attn_error": 1, "transcoder": 2, "mlp_error": 2, "logit": 3}[n.type]
        rows.setdefault((n.layer, sub), []).append(n)
    for (layer, sub), ns in sorted(rows.items()):
        lines.append("  { rank=same;")
        for n in sorted(ns, key=lambda x: (x.pos, x.index)):
            fill, shape = STYLE[n.type]
            tip = f"{n.id} act={n.activation:.3g} infl={n.influence:.3g}"
            lines.append(f"    {_q(n.id)} [label={_q(_short_label(graph, n))}, fillcolor={_q(fill)}, shape={shape}, "
                         f"tooltip={_q(tip)}];")
        lines.append("  }")
    edges = graph.edges
    wmax = max([abs(e.weight) for e in edges] + [abs(e.weight) for e in graph.qk] + [1e-12])
    for e in edges:
        width = 0.3 + 4.0 * abs(e.weight) / wmax
        color = "#2166ac" if e.weight > 0 else "#b2182b"
        lines.append(f"  {_q(e.source)} -> {_q(e.target)} [penwidth={width:.2f}, color={_q(color)}, arrowsize=0.4];")
    for e in graph.qk:
        width = 0.3 + 2.0 * abs(e.weight) / wmax
        color = "#6a51a3" if e.weight > 0 else "#e6550d"
        for side in ("query", "key"):
            src = e.extra[side]
            lines.append(f"  {_q(src)} -> {_q(e.target)} [style=dashed, penwidth={width:.2f}, color={_q(color)}, "
                         f"arrowsize=0.4, constraint=false, tooltip={_q('QK ' + side + ' side, key pos ' + str(e.extra['key_pos']))}];")
    lines += _legend()
    lines.append("}")
    return "\n".join(lines) + "\n"


def _drawable(graph: AttributionGraph, max_edges: int, qk_per_head: int, max_qk: int) -> AttributionGraph:
    E = graph.edge_arrays
    if len(E) <= max_edges and len(graph.qk) <= max_qk:
        return graph
    import torch

    infl = torch.tensor([max(n.influence, 0.0) for n in graph.node_list]) + 1e-12
    top = (E.w.abs() * infl[E.tgt]).argsort(descending=True)[:max_edges]
    keep = {graph.node_list[i].id for i in torch.cat([E.src[top], E.tgt[top]]).tolist()}
    keep |= {n.id for n in graph.node_list if n.type == "logit"}
    qk: list[Edge] = []
    for head in sorted({e.target for e in graph.qk if e.target in keep}):
        qk += graph.qk_pairs(head)[:qk_per_head]
    qk = sorted(qk, key=lambda e: -abs(e.weight))[:max_qk]
    keep |= {e.extra[side] for e in qk for side in ("query", "key")}
    sub = graph.subgraph(keep)
    mask = torch.zeros(len(sub.edge_arrays), dtype=torch.bool)
    chosen = {(int(E.src[i]), int(E.tgt[i])) for i in top.tolist()}
    for j, (a, b) in enumerate(zip(sub.edge_arrays.src.tolist(), sub.edge_arrays.tgt.tolist())):
        mask[j] = (graph.index[sub.node_list[a].id], graph.index[sub.node_list[b].id]) in chosen
    return AttributionGraph(sub.prompt, sub.tokens, sub.token_ids, sub.node_list, sub.edge_arrays.select(mask),
                            sub.settings, sub.scores, qk)


def _score_line(graph: AttributionGraph) -> str:
    s = graph.scores
    if "replacement_score" in s:
        return f"(replacement {s['replacement_score']:.2f}, completeness {s['completeness_score']:.2f})"
    return ""


def _legend() -> list[str]:
    out = ["  subgraph cluster_legend {", '    label="legend"; fontsize=10; style=dashed;']
    for t, (fill, shape) in STYLE.items():
        out.append(f'    "legend_{t}" [label={_q(t.replace("_", " "))}, fillcolor={_q(fill)}, shape={shape}];')
    out.append('    "legend_pos" [label="+ edge", shape=plaintext, style=""]; "legend_neg" [label="- edge", shape=plaintext, style=""];')
    out.append('    "legend_qk" [label="QK pair (dashed)", shape=plaintext, style=""];')
    out.append('    "legend_pos" -> "legend_neg" [color="#2166ac", penwidth=2]; "legend_neg" -> "legend_qk" [color="#b2182b", penwidth=2];')
    out.append("  }")
    return out


def write_dot(graph: AttributionGraph, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, to_dot(graph))
    return path


class RenderError(RuntimeError):
    pass


def render(dot_path: str | Path, fmt: str = "svg") -> Path:
    """Render a DOT file with graphviz's ``dot``; raises RenderError (one line) if dot is missing or fails."""
    dot_path = Path(dot_path)
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError("graphviz's `dot` is not installed (apt-get install graphviz); the DOT file was written")
    out = dot_path.with_suffix("." + fmt)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:  # on any exit (error, timeout, Ctrl-C, SIGTERM) subprocess.run kills dot; the except removes its file
        r = subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(tmp)], capture_output=True, text=True,
                           errors="replace", timeout=300, preexec_fn=_die_with_parent(os.getpid()))
        if r.returncode != 0:
            raise RenderError(f"dot failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise RenderError("dot took more than 300 s; the DOT file was written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _die_with_parent(parent: int):
    """A ``preexec_fn`` that has Linux send the child SIGKILL when this process dies, even by SIGKILL (which
    runs no cleanup here), so no ``dot`` outlives us; elsewhere it does nothing."""

    def arm() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm
