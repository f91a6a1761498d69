"""Graph files: JSON (circuit-tracer / Neuronpedia layout plus our fields, schema-checked), DOT, SVG/PNG.

JSON layout (schema: graphs/schema/graph.schema.json, version 1):

    metadata  slug, scan (model), prompt, prompt_tokens, transcoder_list, node_threshold, schema_version,
              plus prompt_token_ids, settings, scores
    qParams   pinnedIds, supernodes (the families: [family id, member ids...]), linkType, clickedId, sg_pos (the
              viewer's state)
    nodes     node_id, feature (`viewer_feature`: unique per layer, kind and index, as the viewer keys nodes),
              layer ("E" for embeddings, "L" for layer L, n_layers+1 for logits), ctx_idx,
              feature_type, jsNodeId, clerp, influence, activation, token_prob, is_target_logit;
              ours: type, model_layer, index, preact, const, dropped, z_pattern (Lorsa heads), qk (Lorsa heads:
              one object per explained key position, `graph.QKEntry`; pairs as [query, key, weight]),
              family and family_cosine (members of a head or feature family, graphs/families.py)
    links     source, target, weight; ours: kind (ov | direct)
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from replacement.errors import BadInputError
from replacement.io import atomic_write_text

from .graph import FEATURE_KINDS, AttributionGraph, Edge, EdgeArrays, Node, NodeKind, QKEntry
from .validate import load_graph_dict, strict_dumps
from .layout import (DEFAULT_DRAW_NODES, LABEL_W, NODE_H, NODE_W, Grid, box_label, drawing, drawn_qk, edge_routes, gist,
                     gist_examples, grid, meaning, node_name, one_line, prompt_tail, quoted)

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "graph.schema.json"
# the circuit-tracer viewer's name for each node kind (its "feature_type")
VIEWER_FEATURE_TYPE = {NodeKind.EMBEDDING: "embedding", NodeKind.TRANSCODER: "cross layer transcoder",
                       NodeKind.MLP_ERROR: "mlp reconstruction error", NodeKind.LOGIT: "logit",
                       NodeKind.LORSA: "lorsa head", NodeKind.ATTN_ERROR: "attention reconstruction error"}


def _viewer_layer(node: Node, n_layers: int) -> str:
    if node.type == NodeKind.EMBEDDING:
        return "E"
    return str(n_layers + 1) if node.type == NodeKind.LOGIT else str(node.layer)


def _clerp(graph: AttributionGraph, node: Node) -> str:
    """The viewer's label: a logit's token and probability, an embedding's token, a head's or feature's gist
    (graphs/layout.py: the token a head reads most, the one a feature's output raises most)."""
    if node.type == NodeKind.LOGIT:
        return f'Output "{node.label}" (p={node.prob:.3f})'
    if node.type == NodeKind.EMBEDDING:
        return f'Emb: "{node.label}"'
    return gist(graph, node) or node.label


def viewer_feature(n: Node) -> int:
    """The viewer's ``feature`` number, unique per (layer, kind, index): the circuit-tracer viewer keys nodes as
    layer_feature_position (errors add their position), so kinds must not share numbers.  As circuit-tracer writes
    it: a transcoder feature the Cantor pairing of (layer, index), an MLP error -1, an embedding its position, a
    logit its token; ours: an attention error -2, a Lorsa head -3 minus the Cantor pairing of (layer, index)."""
    if n.type == NodeKind.TRANSCODER:
        return _cantor(n.layer, n.index)
    if n.type == NodeKind.LORSA:
        return -3 - _cantor(n.layer, n.index)
    if n.type in (NodeKind.MLP_ERROR, NodeKind.ATTN_ERROR):
        return -1 if n.type == NodeKind.MLP_ERROR else -2
    return n.pos if n.type == NodeKind.EMBEDDING else n.index  # a logit: its token


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node_dict(graph: AttributionGraph, n: Node, n_layers: int, is_target: bool) -> dict:
    d = {"node_id": n.id, "feature": viewer_feature(n), "layer": _viewer_layer(n, n_layers), "ctx_idx": n.pos,
         "feature_type": VIEWER_FEATURE_TYPE[n.type], "jsNodeId": n.id, "clerp": _clerp(graph, n),
         "influence": n.influence,
         "activation": n.activation, "token_prob": n.prob, "is_target_logit": is_target,
         "run_idx": 0, "reverse_ctx_idx": 0, "type": n.type.value, "model_layer": n.layer, "index": n.index,
         "preact": n.preact, "const": n.const, "dropped": n.dropped, "label": n.label}
    if n.z_pattern is not None:
        d["z_pattern"] = n.z_pattern
    if n.qk:
        d["qk"] = [entry.to_json() for entry in n.qk]
    if n.lens:
        d["lens"] = n.lens
    if n.members is not None:
        d["members"] = n.members
    if n.family is not None:
        d["family"] = n.family
        if n.family_cosine is not None:
            d["family_cosine"] = n.family_cosine
        if n.family_lens:
            d["family_lens"] = n.family_lens
    return d


def _node_from_dict(x: dict) -> Node:
    return Node(id=x["node_id"], type=x["type"], layer=int(x["model_layer"]), pos=int(x["ctx_idx"]),
                index=int(x["index"]), activation=x["activation"], influence=x["influence"],
                label=x.get("label", ""), prob=x["token_prob"], const=x["const"], preact=x["preact"],
                dropped=x["dropped"], z_pattern=x.get("z_pattern"), qk=[QKEntry.from_json(e) for e in x.get("qk", ())],
                family=x.get("family"), family_cosine=x.get("family_cosine"), lens=x.get("lens"),
                family_lens=x.get("family_lens"), members=x.get("members"))


def to_dict(graph: AttributionGraph, slug: str | None = None) -> dict:
    n_layers = max([n.layer for n in graph.node_list if n.type == NodeKind.LOGIT], default=0)
    target_ids = {graph.target.id} if graph.logits() else set()
    nodes = [_node_dict(graph, n, n_layers, n.id in target_ids) for n in graph.node_list]
    ids, E = [n.id for n in graph.node_list], graph.edge_arrays  # the arrays straight, no `Edge` objects
    links = [{"source": ids[s], "target": ids[t], "weight": w, "kind": EdgeArrays.KINDS[k]}
             for s, t, w, k in zip(E.src.tolist(), E.tgt.tolist(), E.w.tolist(), E.kind.tolist())]
    transcoders = sorted({f"layer{n.layer}.{n.type.value}" for n in graph.node_list if n.type in FEATURE_KINDS})
    return {
        "metadata": {"slug": slug or prompt_slug(graph.prompt), "scan": str(graph.settings.get("model", "")),
                     "prompt": graph.prompt, "prompt_tokens": graph.tokens, "prompt_token_ids": graph.token_ids,
                     "schema_version": SCHEMA_VERSION, "transcoder_list": transcoders,
                     "node_threshold": graph.settings.get("node_threshold"),
                     "settings": copy.deepcopy(graph.settings), "scores": copy.deepcopy(graph.scores)},  # not the
                     # graph's own: a caller editing the dictionary would edit the graph
        "qParams": {"pinnedIds": [], "supernodes": [[f.id, *f.members] for f in graph.families()], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes, "links": links,
    }


def from_dict(d: dict) -> AttributionGraph:
    if d.get("metadata", {}).get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported graph schema version {d.get('metadata', {}).get('schema_version')!r}")
    nodes = [_node_from_dict(x) for x in d["nodes"]]
    edges = [Edge(e["source"], e["target"], e["weight"], e["kind"]) for e in d["links"]]
    m = d["metadata"]
    graph = AttributionGraph(m["prompt"], m["prompt_tokens"], m.get("prompt_token_ids", []), nodes, edges,
                             m.get("settings", {}), m.get("scores", {}))
    graph.marked_target = next((x["node_id"] for x in d["nodes"] if x.get("is_target_logit")), None)
    return graph


def validate(d: dict) -> None:
    """Raise jsonschema.ValidationError if ``d`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(d, json.loads(SCHEMA_PATH.read_text()))


def write_json(graph: AttributionGraph, path: str | Path, slug: str | None = None, check_schema: bool = False) -> Path:
    """Write the graph's JSON.  ``to_dict`` makes it in the schema's shape by construction (the tests check every
    file they write against the schema); ``check_schema`` checks it here too, at a cost of the order of the
    attribution itself (jsonschema walks every node and link in Python).  NaN and infinities are refused either
    way (`strict_dumps`), as is a graph with no logit node, which `read_json` would refuse."""
    path = Path(path)
    if not graph.logits():
        raise BadInputError("a graph file needs a logit node (the graph's target), and this graph holds none (a "
                            "subgraph without one?): keep a logit in it")
    if path.is_dir():  # os.replace named the temporary file: "Is a directory: '.g.tmp123' -> 'g'"
        raise BadInputError(f"{path} is a folder; name the graph's file, e.g. {path / 'graph.json'}")
    d = to_dict(graph, slug)
    if check_schema:
        validate(d)
    try:
        atomic_write_text(path, strict_dumps(d))
    except OSError as e:  # a read-only folder, a full disk: the error names the file asked for, not the temporary
        raise type(e)(e.errno, e.strerror, str(path)) from None
    return path


def read_json(path: str | Path) -> AttributionGraph:
    """A graph file, checked (graphs/validate.py): any malformed file raises BadGraphError (one line)."""
    return from_dict(load_graph_dict(path))


def prompt_slug(text: str) -> str:
    """A short name for a prompt, safe in file names: lower-case letters and digits, other runs as one dash."""
    out = "".join(c if c.isalnum() else "-" for c in text.strip().lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:60] or "graph"


# ---------------------------------------------------------------------------------------------------------
# DOT and rendering
# ---------------------------------------------------------------------------------------------------------

STYLE = {  # fill colour, shape, style
    NodeKind.EMBEDDING: ("#d9d9d9", "box", "filled"), NodeKind.LORSA: ("#9ecae1", "ellipse", "filled"),
    NodeKind.TRANSCODER: ("#a1d99b", "ellipse", "filled"), NodeKind.ATTN_ERROR: ("#fdd0a2", "octagon", "filled,dashed"),
    NodeKind.MLP_ERROR: ("#fdae6b", "octagon", "filled,dashed"), NodeKind.LOGIT: ("#fcbba1", "box", "filled"),
}
POSITIVE, NEGATIVE, QK_COLOURS = "#2166ac", "#b2182b", ("#6a51a3", "#e6550d")
HIGHLIGHT, HIGHLIGHT_WIDTH = "#ffc400c8", 12  # under the marked path's edges (graphs/layout.py's `marked_path`)
LEFT_LINE = "\\l"  # DOT: end a left-justified line


def _q(s: str, newline: str = "\\n") -> str:
    """A DOT string literal that shows ``s`` as written: backslashes and quotes escaped, line breaks as ``newline``
    (``\\l``: a left-justified line), ``&`` as ``&amp;`` (Graphviz decodes HTML entities in strings), and
    characters that XML forbids (control characters, lone surrogates, U+FFFE/U+FFFF) as visible escapes such as
    ``\\x01``."""
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return '"' + _XML_UNSAFE.sub(_visible_escape, s).replace("\n", newline) + '"'


_XML_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def _visible_escape(m: "re.Match") -> str:
    c = ord(m.group())
    return f"\\\\x{c:02x}" if c < 0x100 else f"\\\\u{c:04x}"


def to_dot(graph: AttributionGraph, draw_nodes: int = DEFAULT_DRAW_NODES, qk_per_head: int = 1, max_qk: int = 24,
           expand_families: bool = False) -> str:
    """The graph on its grid (graphs/layout.py: token positions left to right, layers bottom to top), nodes and
    edges pinned as laid out (``layout=nop2``; edges along `layout.edge_routes`' curves): the ``draw_nodes`` most
    influential nodes (and the logits), their strongest edges
    (``EDGES_PER_NODE`` per node, chosen and drawn as wide as the logits' input that flows along them,
    `layout.edge_flow`; colour by sign), the ``qk_per_head`` strongest QK pairs of
    each drawn head (dashed), the token under and over each column, each row's layer on the left, and a
    legend saying how many nodes were left out.  Each family of heads or features (graphs/families.py) is one
    node (a double outline, ``L1 x21 ←60``: its layers, member count and key position; its edges the sums of its
    members'), unless ``expand_families``.  The JSON keeps everything."""
    fams = [] if expand_families else graph.families()
    if fams:
        from .families import collapse

        graph = collapse(graph, fams)
    d = drawing(graph, draw_nodes)
    nodes, ids = d.nodes, {n.id for n in d.nodes}
    g = grid(graph, nodes)
    legend = _legend(graph, len(nodes), fams, d.marked)
    lines = ["digraph attribution {",
             "  layout=nop2; inputscale=72; splines=true; outputorder=edgesfirst; bgcolor=white;",
             '  node [style=filled, fontname="Helvetica", fontsize=9, fixedsize=true, '
             f'width={NODE_W / 72:.3f}, height={NODE_H / 72:.3f}];',
             f"  label={_q(legend, newline=LEFT_LINE)}; labelloc=t; labeljust=l;",
             '  fontname="Helvetica"; fontsize=11;']
    names = {n.id: node_name(graph, n) for n in nodes}  # each drawn node's, once: the tooltips of its edges repeat it
    for n in nodes:
        fill, shape, style = STYLE[n.type]
        x, y = g.xy[n.id]
        tip = f"{names[n.id]}: activation {n.activation:.3g}, influence {n.influence:.3g}"
        if meaning(n):
            tip += f" ({meaning(n)})"
        if n.members:
            tip += f"; a family of {len(n.members)}: {', '.join(n.members[:12])}" + (", ..." if len(n.members) > 12 else "")
        width = "" if g.node_w[n.id] == NODE_W else f", width={g.node_w[n.id] / 72:.3f}"
        marked = f", color={_q(HIGHLIGHT)}, penwidth=3" if d.marked and n.id in d.marked[1] else ""  # on the marked path
        lines.append(f"  {_q(n.id)} [label={_q(box_label(graph, n))}, pos=\"{x:.1f},{y:.1f}!\", fillcolor={_q(fill)}, "
                     f"shape={shape}, style={_q(style)}, tooltip={_q(tip)}{width}{marked}"
                     + (", peripheries=2" if n.members else "") + "];")
    lines += _frame(g)
    E = graph.edge_arrays
    chosen, widths, on_path = d.edges, d.widths, d.on_path
    qk = drawn_qk(graph, ids, qk_per_head, max_qk)
    node_ids = [n.id for n in graph.node_list]
    pairs = [(node_ids[int(E.src[i])], node_ids[int(E.tgt[i])]) for i in chosen]
    qk_pairs = [(node_id, e.head) for e in qk for node_id in (e.query, e.key)]
    routes = iter(edge_routes(g, pairs + qk_pairs, [float(E.w[i]) for i in chosen] + [0.0] * len(qk_pairs),
                              marked={j for j, i in enumerate(chosen) if i in on_path}))
    curves = [_spline(next(routes)) for _ in chosen]
    for i, (source, target), curve in zip(chosen, pairs, curves):  # the marked path first, under a highlighter
        if i in on_path:
            lines.append(f"  {_q(source)} -> {_q(target)} [penwidth={HIGHLIGHT_WIDTH}, color={_q(HIGHLIGHT)}, "
                         f"arrowhead=none, tooltip=\"the strongest path\", pos={_q(curve)}];")
    for i, (source, target), width, curve in zip(chosen, pairs, widths, curves):
        w = float(E.w[i])
        tip = f"{names[source]} -> {names[target]}: {w:+.3g}"
        colour = (POSITIVE if w > 0 else NEGATIVE) + ("" if i in on_path else "b0")  # the marked path opaque
        lines.append(f"  {_q(source)} -> {_q(target)} [penwidth={width:.2f}, color={_q(colour)}, arrowsize=0.4, "
                     f"tooltip={_q(tip)}, pos={_q(curve)}];")
    for e in qk:
        color = QK_COLOURS[0] if e.weight > 0 else QK_COLOURS[1]
        for side, node_id in (("query", e.query), ("key", e.key)):
            tip = f"QK {side} side, key position {e.key_pos}: {e.weight:+.3g}"
            lines.append(f"  {_q(node_id)} -> {_q(e.head)} [style=dashed, penwidth=1, color={_q(color)}, arrowsize=0.4, "
                         f"tooltip={_q(tip)}, pos={_q(_spline(next(routes)))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


ARROW_LEN = 4.0  # points: an arrowhead at arrowsize 0.4


def _spline(route: tuple[float, ...]) -> str:
    """An edge's ``pos`` for graphviz (`layout.edge_routes`' curve): the curve up to the arrowhead's base, then
    ``e,x,y``, the arrowhead's tip at the target."""
    x0, y0, x1, y1, x2, y2, x3, y3 = route
    dx, dy = x3 - x2, y3 - y2
    n = math.hypot(dx, dy) or 1.0
    bx, by = x3 - ARROW_LEN * dx / n, y3 - ARROW_LEN * dy / n  # the base, back along the last control leg
    return f"e,{x3:.1f},{y3:.1f} {x0:.1f},{y0:.1f} {x1:.1f},{y1:.1f} {x2:.1f},{y2:.1f} {bx:.1f},{by:.1f}"


def _frame(g: Grid) -> list[str]:
    """Plain-text nodes: each column's token below and above the grid, each row's name on the left."""
    out = []
    for c, (x, text, dy) in enumerate(g.columns):
        for side, y in zip(("below", "above"), (g.header_y[0] - dy, g.header_y[1] + dy)):
            out.append(f'  "column {c} {side}" [label={_q(text)}, pos="{x:.1f},{y:.1f}!", shape=plaintext, style="", '
                       f'fixedsize=false, fontsize=10, fontname="Helvetica-Bold"];')
    for r, (y, text) in enumerate(g.rows):
        out.append(f'  "row {r}" [label={_q(text)}, pos="{LABEL_W / 2:.1f},{y:.1f}!", shape=plaintext, style="", '
                   f'fixedsize=false, fontsize=10, fontcolor="#555555"];')
    return out


MAX_TITLE = 120  # characters of the prompt the legend's first line shows (its end)


def _score_line(graph: AttributionGraph) -> str:
    s = graph.scores
    parts = [f"{name} {s[f'{name}_score']:.2f}" for name in ("replacement", "completeness")
             if isinstance(s.get(f"{name}_score"), (int, float))]  # a graph file may hold null or nothing
    return f"({', '.join(parts)})" if parts else ""


def _legend(graph: AttributionGraph, drawn: int, families: list = (), marked: tuple | None = None) -> str:
    left = len(graph.node_list) - drawn
    prompt = prompt_tail(graph.prompt, MAX_TITLE)  # a long prompt's end (its whole line set the picture's width)
    lines = [f"{prompt}  {_score_line(graph)}".rstrip(),
             f"{drawn} of {len(graph.node_list)} nodes drawn: the most influential with an edge into the picture"
             + (f"; {left} left out (less influential, or joined only by QK pairs):" if left else "")]
    if left:
        lines.append(f"    draw every one with --draw-nodes {len(graph.node_list)} (trace, circuits render), or see each "
                     "in the HTML page (--format html)")
    lines += ["nodes: grey embedding, blue Lorsa head, green transcoder feature, pink logit (probability);",
              "    dashed orange octagon: error node, what the replacement misses of the real layer (light: attention, "
              "dark: MLP), with its influence (the share of the logits' input that flows through it)",
              "edges: blue excites, red inhibits, width by how much of the logits' input flows along it (its share of "
              "its target's input x the target's influence); dashed: a head's QK pair (query and key side; purple "
              "raises its score, orange lowers it)"]
    if marked:
        lines.append(f"yellow: the strongest path from a token to {quoted(one_line(graph.target.label))}, its nodes outlined (strength "
                     f"{marked[0]:.3f}: the product of its edges' shares)")
    gists = gist_examples(graph)
    if gists:
        lines.append("third line: " + "; ".join(gists))
    if families:
        lines.append(f"double outline: a family (graphs/families.py; {len(families)} in this graph), e.g. "
                     f"{_family_example(graph, max(families, key=len))}, one node whose edges are its members' sums;")
        lines.append("    \u2190P: the position a family of heads attends to; fam K: its rank in its id (fam.lorsa.L.K@P); "
                     "draw the members with --expand-families (trace, circuits render)")
    return "\n".join(lines) + "\n"


def _family_example(graph: AttributionGraph, f) -> str:
    """'L1 x21 ←60: 21 heads of layer 1 at " =" that attend to 60 " 36" and do not write against each other'."""
    from .families import family_label

    what = "heads" if f.kind == NodeKind.LORSA else "features"
    tok = lambda p: quoted(one_line(graph.tokens[p])) if 0 <= p < len(graph.tokens) else f"@{p}"  # noqa: E731
    reads = f"attend to {f.key_positions[0]} {tok(f.key_positions[0])}" if f.kind == NodeKind.LORSA else "read it"
    layers = "-".join(map(str, sorted({f.layers[0], f.layers[-1]})))
    return (f"{family_label(f)}: {len(f)} {what} of layer{'s' * ('-' in layers)} {layers} at {tok(f.pos)} "
            f"that {reads} and do not write against each other")


def write_dot(graph: AttributionGraph, path: str | Path, draw_nodes: int = DEFAULT_DRAW_NODES,
              expand_families: bool = False) -> Path:
    path = Path(path)
    atomic_write_text(path, to_dot(graph, draw_nodes, expand_families=expand_families))
    return path


class RenderError(RuntimeError):
    pass


def render(dot_path: str | Path, fmt: str = "svg") -> Path:
    """Render a DOT file with graphviz's ``dot`` (the file names its engine: nop2, which draws the nodes and edges
    where the file puts them); raises RenderError (one line) if dot is missing or fails."""
    return Rendering(dot_path, fmt).wait()


class Rendering:
    """A ``dot`` rendering started in the background (the caller writes its other files meanwhile): `wait`
    gives the rendered file, written atomically, or raises RenderError; `cancel` stops it.  On any exit from
    `wait` (error, timeout, Ctrl-C, SIGTERM) dot is killed and its partial file removed."""

    TIMEOUT = 300  # seconds

    def __init__(self, dot_path: str | Path, fmt: str = "svg"):
        dot_path = Path(dot_path)
        exe = shutil.which("dot")
        if exe is None:
            raise RenderError("graphviz's `dot` is not installed (apt-get install graphviz); the DOT file was written")
        self.out = dot_path.with_suffix("." + fmt)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")
        self.started = time.monotonic()
        argv, preexec = _dying_with_parent([exe, f"-T{fmt}", str(dot_path), "-o", str(self.tmp)])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     errors="replace", preexec_fn=preexec)

    def wait(self) -> Path:
        try:
            _, err = self.proc.communicate(timeout=max(0.0, self.TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.cancel()
            raise RenderError(f"dot took more than {self.TIMEOUT} s; the DOT file was written") from None
        except BaseException:
            self.cancel()
            raise
        if self.proc.returncode != 0:
            self.tmp.unlink(missing_ok=True)
            raise RenderError(f"dot failed: {err.strip().splitlines()[-1] if err.strip() else self.proc.returncode}")
        os.replace(self.tmp, self.out)
        return self.out

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.tmp.unlink(missing_ok=True)


def _dying_with_parent(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """(argv, preexec_fn) to start ``argv`` as a child that Linux kills when this process dies, even by SIGKILL
    (which runs no cleanup here), so that no ``dot`` outlives us.  Through util-linux's ``setpriv --pdeathsig``
    where it works: a ``preexec_fn`` makes Python fork the whole process (40 ms beside a loaded model) where
    it would otherwise spawn (3 ms)."""
    if _setpriv() is not None:
        return [_setpriv(), "--pdeathsig", "KILL", "--", *argv], None
    return argv, _die_with_parent(os.getpid())


@functools.cache
def _setpriv() -> str | None:
    """util-linux's ``setpriv`` if it is there and knows --pdeathsig (2.33 and later), else None."""
    exe = shutil.which("setpriv")
    try:
        ok = exe is not None and subprocess.run([exe, "--pdeathsig", "KILL", "--", "true"], capture_output=True,
                                                timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return exe if ok else None


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
