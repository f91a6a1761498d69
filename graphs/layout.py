"""The picture of a graph: which nodes to draw (a budget chosen by influence), where (a grid), and their labels.

Columns are token positions in prompt order, left to right; rows are the model's stages, bottom to top:
embeddings, then each layer's attention (Lorsa heads, attention error) and MLP (transcoder features, MLP
error), then the logits.  The nodes of one (row, column) cell sit side by side, wrapping onto more lines
when the cell is crowded, at the width that lets the whole grid be drawn largest in a ``VIEW`` (the HTML
page's graph area at 1600 x 1000).  A column where only an embedding is drawn is narrow (it and its box
``NARROW_W`` wide), one where nothing is drawn narrower still (``EMPTY_COL_W``): in a long prompt most columns
are such, and at full width they would shrink every node of the picture (the 37-token induction showcase on
pythia: 0.43 of full size, against 0.62 narrowed).  ``ELIDE_RUN`` or more positions in a row where nothing is
drawn share one such column, labelled with their span and "…" (a 127-token prompt drew 127 columns, most empty,
and stacked its last position's nodes into a column many times taller than wide).
DOT/SVG/PNG (graphs/export.py) and the HTML page (graphs/html.py) both draw these coordinates as they are.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .graph import (ERROR_KINDS, FEATURE_KINDS, AttributionGraph, Node, NodeKind, QKLink, QKPair, input_shares, stage,
                    unit_label)
from .lens import key_position, key_share

DEFAULT_DRAW_NODES = 80  # a 1600 x 1000 view of this many nodes stays readable
MAX_DRAWN_LOGITS = 5  # the likeliest logits drawn (the JSON and the page's list keep every one)
EDGES_PER_NODE = 3  # drawn edges per drawn node
NODE_W, NODE_H = 66.0, 40.0  # points (three lines of text)
GAP, COL_GAP, ROW_GAP = 6.0, 12.0, 18.0  # between the nodes of a cell, between columns, between rows
NARROW_W = 40.0  # a column where only an embedding is drawn, and its box
EMPTY_COL_W, EMPTY_ROW_H = 24.0, 16.0
ELIDE_RUN = 3  # this many empty positions in a row or more: one column
MAX_EMBED_CHARS = 6  # an embedding box's token, so that it fits a narrow column
LABEL_W, HEADER_H = 84.0, 34.0  # the row labels on the left, the token labels below and above
LABEL_STEP = 24.0  # how much further out every other column's token labels sit when the tokens do not fit
VIEW = (1160.0, 800.0)  # the HTML page's graph area at 1600 x 1000, in pixels
MAX_TOKEN_CHARS = 12
MAX_GIST_CHARS = 6  # the token on a head's or feature's third line
MEANING = {NodeKind.ATTN_ERROR: "an error node: what layer {L}'s Lorsa heads miss of the real attention output at this position",
           NodeKind.MLP_ERROR: "an error node: what layer {L}'s transcoder misses of the real MLP output at this position",
           NodeKind.LOGIT: "its value is the demeaned logit: the logit minus its mean over the vocabulary"}


# -- labels ---------------------------------------------------------------------------------------------------

def one_line(text: str, limit: int | None = None) -> str:
    """A token as one readable line: newlines, tabs and other control characters escaped (``\\n``), a backslash
    doubled (so that the two characters ``\\n`` never read as a newline)."""
    out = "".join({"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}.get(
        c, c if c.isprintable() or c == " " else f"\\x{ord(c):02x}") for c in text)
    return out if limit is None or len(out) <= limit else out[: limit - 1] + "…"


def prompt_tail(text: str, limit: int = 120) -> str:
    """A prompt as one readable line (`one_line`), a long one cut to its last ``limit`` characters (what the
    logits continue) after an ellipsis."""
    line = one_line(text)
    return line if len(line) <= limit else "…" + line[-(limit - 1):]


def quoted(text: str) -> str:
    """A token in double quotes, or in single quotes when it holds a double quote (``'"'``, not ``\"\"\"``)."""
    return f"'{text}'" if '"' in text else f'"{text}"'


def _token(graph: AttributionGraph, pos: int) -> str:
    return one_line(graph.tokens[pos]) if 0 <= pos < len(graph.tokens) else "?"


LABEL_CHAR_W = 7.0  # points a character of a column label takes (10-point bold; DejaVu Sans, which graphviz's
# PNGs use, is wider than Helvetica: at 6.5, byte tokens such as "<0xC3>" in narrow columns ran together)


def _label_room(width: float) -> int:
    """How many characters of a token fit a column label ``width`` points wide (``LABEL_CHAR_W`` points a
    character, 2 for the quotes)."""
    return max(2, int((width + COL_GAP) / LABEL_CHAR_W) - 2)


def _column_label(graph: AttributionGraph, span: tuple[int, int], width: float) -> str:
    """Two lines: the position, and its token in quotes, as much of it as ``width`` points take; for a column of
    elided positions (``span`` first to last), their span and an ellipsis."""
    pos, last = span
    if last > pos:
        return f"{pos}-{last}\n…"
    return f"{pos}\n" + quoted(one_line(graph.tokens[pos], _label_room(width)) if pos < len(graph.tokens) else "?")


def _column_labels(graph: AttributionGraph, spans: list[tuple[int, int]], col_x: list[float],
                   col_w: list[float]) -> list[tuple[float, str, float]]:
    """(x centre, label, dy) per column (``spans``: the positions each holds).  Where some token does not fit its
    own column (a long prompt's narrow columns), every other column's labels sit ``LABEL_STEP`` further from the
    grid (dy), so that each label may reach over its neighbours' columns, whose labels are on the other line."""
    n = len(col_w)
    tokens = [one_line(graph.tokens[a]) if a == b and a < len(graph.tokens) else "…" if a < b else "?"
              for a, b in spans]
    stagger = any(len(tokens[c]) > _label_room(col_w[c]) for c in range(n))
    out = []
    for c in range(n):
        width = col_w[c]
        if stagger:  # up to the nearer of the two same-line labels beside it, each half as far
            width += 2 * COL_GAP + min([col_w[j] for j in (c - 1, c + 1) if 0 <= j < n], default=0.0)
        out.append((col_x[c] + col_w[c] / 2, _column_label(graph, spans[c], width),
                    LABEL_STEP if stagger and c % 2 else 0.0))
    return out


def column_spans(n_positions: int, drawn_positions: set[int]) -> list[tuple[int, int]]:
    """The picture's columns, left to right, as (first, last) positions: one per position, but ``ELIDE_RUN`` or
    more positions in a row with nothing drawn share one."""
    spans, p = [], 0
    while p < n_positions:
        q = p
        while q < n_positions and q not in drawn_positions:
            q += 1
        if q - p >= ELIDE_RUN:
            spans.append((p, q - 1))
        else:
            spans += [(x, x) for x in range(p, q)]
        if q < n_positions:
            spans.append((q, q))
        p = q + 1
    return spans


def box_label(graph: AttributionGraph, n: Node) -> str:
    """The text inside a drawn node: what it is (its row says the layer, its column the token) and where, and for
    a head or feature a third line, its `gist`; distinct nodes get distinct labels."""
    if n.type == NodeKind.LOGIT:
        return quoted(one_line(n.label, MAX_TOKEN_CHARS)) + "\n" + (f"p={n.prob:.2f}" if n.prob >= 0.005 else "p<0.01")
    if n.type == NodeKind.EMBEDDING:
        return f"{one_line(n.label or graph.tokens[n.pos], MAX_EMBED_CHARS)}\n@{n.pos}"
    if n.type not in FEATURE_KINDS:  # an error node: "L1 MLP" over "error @4" over its influence, "infl 3.1%"
        share = 100 * n.influence
        return f"L{n.layer} {_error_part(n)}\nerror @{n.pos}\ninfl " + (f"{share:.2g}%" if share >= 0.1 else "<0.1%")
    if n.members:  # a family (graphs/families.py): "L1 x21 ←60" over "fam 0 @64" (its rank in the id)
        text = f"{n.label}\nfam {n.index} @{n.pos}"
    else:
        text = f"{unit_label(n.type, n.layer, n.index)}\n@{n.pos}"
    line = gist(graph, n)
    return f"{text}\n{line}" if line else text


def gist(graph: AttributionGraph, n: Node) -> str:
    """A head's or feature's meaning in a few characters (graphs/lens.py): for a Lorsa head (or family of heads)
    the token at the key position it takes most of its activation from, ``←"36"`` (``←"36"+`` when that key gives
    less than half of it); for a transcoder feature (or family) the token its output raises most through the
    unembedding, ``→" 98"``; '' when the graph does not say."""
    if n.type == NodeKind.LORSA:
        p = key_position(n)
        if p is None or p >= len(graph.tokens):
            return ""
        more = "+" if key_share(n) < 0.5 else ""  # other keys give more than that one
        return "\u2190" + quoted(one_line(graph.tokens[p], MAX_GIST_CHARS)) + more
    if n.type == NodeKind.TRANSCODER and n.lens:
        return "\u2192" + quoted(one_line(n.lens[0][0], MAX_GIST_CHARS))
    return ""


def gist_examples(graph: AttributionGraph) -> list[str]:
    """What a box's third line means (`gist`), each with the graph's most influential example: a head's
    key token, a feature's logit-lens token; none for a kind whose nodes have no gist (a graph.json from before)."""
    out = []
    for kind, meaning in ((NodeKind.LORSA, "the token {name} takes most of its activation from (its z pattern's "
                                           "largest key; + after it: less than half)"),
                          (NodeKind.TRANSCODER, "the token {name}'s output raises most (logit lens)")):
        best = max((n for n in graph.node_list if n.type == kind and gist(graph, n)), key=lambda n: n.influence,
                   default=None)
        if best is not None:
            what = "family" if best.members else "head" if kind == NodeKind.LORSA else "feature"
            name = f"{what} {box_label(graph, best).split(chr(10))[0]}"
            out.append(f"{gist(graph, best)} " + meaning.format(name=name))
    return out


def node_name(graph: AttributionGraph, n: Node) -> str:
    """One line naming a node for people: what it is, where, the token there and, for a head or feature, its
    `gist`.  Distinct nodes get distinct names (their ids differ in type, layer, index or position, and each of
    those is in the name)."""
    at = f'@{n.pos} "{_token(graph, n.pos)}"'
    if n.type == NodeKind.EMBEDDING:
        return f"emb {at}"
    if n.type == NodeKind.LOGIT:
        return f'logit "{one_line(n.label)}" (p={n.prob:.3f}) @{n.pos}'
    if n.type in ERROR_KINDS:
        return f"L{n.layer} {_error_part(n)} error {at}"
    line = gist(graph, n)
    if n.members:
        what = "heads" if n.type == NodeKind.LORSA else "features"
        return f'family {n.label} {what} {n.id} "{_token(graph, n.pos)}" {line}'.rstrip()  # the id holds @pos
    return f"{box_label(graph, n).splitlines()[0]} {at} {line}".rstrip()


def _error_part(n: Node) -> str:
    return "attn" if n.type == NodeKind.ATTN_ERROR else "MLP"


def meaning(n: Node) -> str:
    """What an error node stands for, what a logit's value is ('' for other nodes)."""
    return MEANING[n.type].format(L=n.layer) if n.type in MEANING else ""


# -- which nodes and edges ----------------------------------------------------------------------------------------

def draw_budget(graph: AttributionGraph, max_nodes: int = DEFAULT_DRAW_NODES, must: tuple[str, ...] = ()) -> list[Node]:
    """At most ``max_nodes`` nodes: the nodes ``must`` (e.g. the path a picture marks), the likeliest logits (at
    most ``MAX_DRAWN_LOGITS``, the target among them), then the other nodes in order of influence, each joining
    when it has an edge into a drawn node.  A node without one would hang loose in the picture (one that pruning
    keeps only for a head's QK pairs, or whose edges it dropped): it waits, and joins as soon as a node it feeds
    has joined (the most influential of those waiting first).  A budget of every node draws every node, in order
    of influence (the page's last slider step)."""
    E, nodes = graph.edge_arrays, graph.node_list
    if max_nodes >= len(nodes):
        logits = sorted((n for n in nodes if n.type == NodeKind.LOGIT), key=lambda n: -n.prob)
        return logits + sorted((n for n in nodes if n.type != NodeKind.LOGIT), key=lambda n: -n.influence)
    target = graph.target.id if graph.logits() else None
    logits = sorted((n for n in nodes if n.type == NodeKind.LOGIT), key=lambda n: (n.id != target, -n.prob))
    first = [graph.node(i) for i in must if i in graph.index] + logits[:MAX_DRAWN_LOGITS]
    first = list({n.id: n for n in first}.values())[:max_nodes]
    drawn = {graph.index[n.id] for n in first}
    order = [graph.index[n.id] for n in sorted(nodes, key=lambda n: -n.influence)
             if n.type != NodeKind.LOGIT and graph.index[n.id] not in drawn]
    rank = {i: r for r, i in enumerate(order)}
    feeds: dict[int, set[int]] = {}  # node -> the nodes it has a nonzero edge into
    live = E.w != 0
    for s, t in zip(E.src[live].tolist(), E.tgt[live].tolist()):
        feeds.setdefault(s, set()).add(t)
    waiting: dict[int, list[int]] = {}  # a drawn-to-be node -> the waiting nodes that feed it
    rest: list[int] = []
    for i in order:
        if len(drawn) >= max_nodes:
            break
        if not feeds.get(i, set()) & drawn:
            for t in feeds.get(i, ()):
                waiting.setdefault(t, []).append(i)
            continue
        ready = [(rank[i], i)]
        while ready and len(drawn) < max_nodes:  # i, then the waiting nodes it (or one joining after it) lets in
            _, j = heapq.heappop(ready)
            if j in drawn:
                continue
            drawn.add(j)
            rest.append(j)
            for w in waiting.pop(j, ()):
                heapq.heappush(ready, (rank[w], w))
    return first + [nodes[i] for i in sorted(rest, key=rank.__getitem__)]


def edge_flow(graph: AttributionGraph) -> torch.Tensor:
    """[E] How much of the logits' input flows along each edge of ``graph.edge_arrays``: its share of its target's
    absolute input times the target's influence (as pruning weighs edges).  Not |weight|, where a family's summed
    edges outweigh every single edge, nor the share alone, where an edge into a node of no influence whose other
    inputs were pruned counts as much as any."""
    E = graph.edge_arrays
    infl = torch.tensor([max(n.influence, 0.0) for n in graph.node_list], dtype=torch.float32)
    return input_shares(E.tgt, E.w, len(graph.node_list)).float() * infl[E.tgt]


def edge_order(graph: AttributionGraph) -> torch.Tensor:
    """Indices into ``graph.edge_arrays``, the edges a picture should show first: by their flow (`edge_flow`), so
    that one notion both picks the edges and sizes them; ties (edges into nodes of no influence) by |weight|."""
    by_weight = graph.edge_arrays.w.abs().argsort(descending=True, stable=True)
    return by_weight[edge_flow(graph)[by_weight].argsort(descending=True, stable=True)]


def drawn_edges(graph: AttributionGraph, node_ids: set[str], max_edges: int, order: torch.Tensor | None = None,
                must: list[int] = ()) -> list[int]:
    """Indices of the edges to draw among ``node_ids``: the edges ``must`` (a marked path's), each drawn source's
    strongest edge (so that no drawn node hangs loose), then the strongest others, ``max_edges`` in all."""
    E = graph.edge_arrays
    order = edge_order(graph) if order is None else order
    inside = torch.tensor([n.id in node_ids for n in graph.node_list], dtype=torch.bool)
    order = order[inside[E.src[order]] & inside[E.tgt[order]]]
    first, seen = [], set()
    for i, s in zip(order.tolist(), E.src[order].tolist()):
        if s not in seen:
            seen.add(s)
            first.append(i)
    chosen = dict.fromkeys([*must, *first][:max_edges])
    for i in order.tolist():
        if len(chosen) >= max_edges:
            break
        chosen.setdefault(i)
    return list(chosen)


def edge_widths(graph: AttributionGraph, chosen: list[int]) -> list[float]:
    """Pen widths (points) of the edges ``chosen``, by their flow (`edge_flow`) over the largest among ``chosen``:
    0.4 to 4 points on a square-root scale (a tenth of the largest: 1.5)."""
    if not chosen:
        return []
    flow = edge_flow(graph)[torch.tensor(chosen)]
    top = float(flow.max()) or 1.0
    return [round(0.4 + 3.6 * math.sqrt(float(v) / top), 2) for v in flow]


def marked_path(graph: AttributionGraph) -> tuple[float, list[str]] | None:
    """The path a picture marks: the strongest from a token's embedding through a head or feature into the target
    logit (as `trace` prints it), else the strongest direct one; None when the graph has none."""
    if not graph.logits():
        return None
    feature = graph.feature_path()
    if feature is not None:
        return feature
    direct = graph.top_paths(k=1, sources=(NodeKind.EMBEDDING,), min_len=2)
    return direct[0] if direct else None


def path_edges(graph: AttributionGraph, path: list[str]) -> list[int]:
    """Indices into ``graph.edge_arrays`` of the edges along ``path`` (node ids, in order)."""
    E = graph.edge_arrays
    out = []
    for a, b in zip(path, path[1:]):
        hit = ((E.src == graph.index[a]) & (E.tgt == graph.index[b])).nonzero()[:, 0]
        if len(hit):
            out.append(int(hit[E.w[hit].abs().argmax()]))
    return out


@dataclass
class Drawing:
    """What a picture of a graph draws: its nodes, its edges (indices into ``graph.edge_arrays``) with their pen
    widths, the edges on the marked path, and that path ((strength, node ids), or None)."""

    nodes: list[Node]
    edges: list[int]
    widths: list[float]
    on_path: set[int]
    marked: tuple[float, list[str]] | None


def drawing(graph: AttributionGraph, max_nodes: int = DEFAULT_DRAW_NODES, order: torch.Tensor | None = None,
            marked: tuple[float, list[str]] | None = None) -> Drawing:
    """The nodes (`draw_budget`) and edges (`drawn_edges`, `edge_widths`) of a picture of at most ``max_nodes``
    nodes, the marked path's (`marked_path`, unless given: one for every picture of a graph) among them."""
    marked = marked if marked is not None else marked_path(graph)
    nodes = draw_budget(graph, max_nodes, must=tuple(marked[1]) if marked else ())
    ids = {n.id for n in nodes}
    E = graph.edge_arrays
    on_path = [e for e in (path_edges(graph, marked[1]) if marked else [])  # a budget under the path's length
               if graph.node_list[int(E.src[e])].id in ids and graph.node_list[int(E.tgt[e])].id in ids]  # cuts it
    edges = drawn_edges(graph, ids, EDGES_PER_NODE * len(nodes), order, must=on_path)
    return Drawing(nodes, edges, edge_widths(graph, edges), set(on_path), marked)


def drawn_qk(graph: AttributionGraph, ids: set[str], per_head: int = 1, most: int = 24) -> list[QKLink]:
    """The QK pairs to draw: each drawn head's ``per_head`` strongest pairs of drawn nodes, those at the key its
    third line names first (`lens.key_position`: the key it takes most of its activation from), ``most`` in all.
    A family of heads (a collapsed graph's node) draws its members' strongest pairs, each end a drawn node or a
    member of a drawn family (`family_qk_pairs`)."""
    pairs = []
    for head in sorted(i for i in ids if graph.node(i).type == NodeKind.LORSA):
        mine = [p for p in _head_pairs(graph, head) if p.query in ids and p.key in ids]  # strongest first
        if mine:
            key = key_position(graph.node(head))
            pairs += sorted(mine, key=lambda p: p.key_pos != key)[:per_head]  # stable: strongest first within
    return sorted(pairs, key=lambda e: -abs(e.weight))[:most]


def _head_pairs(graph: AttributionGraph, head: str) -> list[QKLink]:
    n = graph.node(head)
    return family_qk_pairs(graph, n) if n.members and graph.expanded is not None else graph.qk_pairs(head)


def family_qk_pairs(graph: AttributionGraph, family: Node) -> list[QKLink]:
    """The QK pairs of a family of heads in collapsed ``graph``: every member's (in ``graph.expanded``), each as
    its member's weight with the family as its head and each end that is a member of a family named by that
    family, strongest first.  A picture's link between two families then says that a member of the one reads a
    member of the other, as the members' own pairs say; the weights are the members' and are not summed."""
    family_of = {m: n.id for n in graph.node_list if n.members for m in n.members}
    named = lambda node_id: family_of.get(node_id, node_id)  # noqa: E731
    links = [QKLink(family.id, link.entry, QKPair(named(link.query), named(link.key), link.weight))
             for m in family.members for link in graph.expanded.qk_pairs(m)]
    return sorted(links, key=lambda e: -abs(e.weight))


# -- where -------------------------------------------------------------------------------------------------------

def n_layers(graph: AttributionGraph) -> int:
    """The rows' layer count: the logits' layer, raised if a (malformed, read-in) graph has a node above it."""
    logits = [n.layer for n in graph.node_list if n.type == NodeKind.LOGIT]
    others = max([n.layer for n in graph.node_list if n.type != NodeKind.LOGIT], default=-1) + 1
    return max(logits[0], others) if logits else others


def row_of(n: Node, layers: int) -> int:
    """The picture's row of a node: its `stage`, the embeddings' row 0 and the logits' the top one."""
    return 2 * layers + 1 if n.type == NodeKind.LOGIT else 1 + int(stage(n.type, n.layer))


def row_names(layers: int) -> list[str]:
    return ["embeddings", *(f"L{L} {part}" for L in range(layers) for part in ("attention", "MLP")), "logits"]


@dataclass
class Grid:
    """Node centres in points, y up (graphviz's convention), the origin at the bottom left."""

    xy: dict[str, tuple[float, float]]
    node_w: dict[str, float]  # each node's box width, points (NODE_W, or NARROW_W in a narrow column)
    width: float
    height: float
    columns: list[tuple[float, str, float]]  # (x centre, 'pos\n"token"', dy) per column (`_column_labels`; a
    # run of positions where nothing is drawn shares one, `column_spans`)
    rows: list[tuple[float, str]]  # (y centre, name) per row, bottom to top
    header_y: tuple[float, float]  # y of the token labels below and above the grid (each column's dy further out)

    @property
    def aspect(self) -> float:
        return self.width / self.height


def grid(graph: AttributionGraph, nodes: list[Node], view: tuple[float, float] = VIEW) -> Grid:
    """Lay ``nodes`` out on the (token position, layer) grid, each column as many nodes wide as lets the whole
    picture be drawn largest in ``view`` (see `_per_line`)."""
    layers = n_layers(graph)
    n_rows = 2 * layers + 2
    spans = column_spans(max(len(graph.tokens), 1 + max([n.pos for n in nodes], default=0)), {n.pos for n in nodes})
    column = {a: c for c, (a, b) in enumerate(spans) if a == b}  # a drawn node's position -> its column
    cells: dict[tuple[int, int], list[Node]] = {}
    for n in nodes:
        cells.setdefault((row_of(n, layers), column[n.pos]), []).append(n)
    for ns in cells.values():
        ns.sort(key=lambda n: (n.type.endswith("error"), -n.influence, n.index))
    return _place(graph, spans, cells, _per_line(cells, n_rows, len(spans), view), n_rows, layers)


def _per_line(cells, n_rows: int, n_cols: int, view: tuple[float, float]) -> list[int]:
    """Nodes per line in each column (0: an empty column).  From one node per line, while the picture's height
    is what limits its scale in ``view``, widen by one node the column that lets it be drawn largest (of equals,
    the one with the tallest cell); the best seen wins."""
    widest = [max([len(ns) for (r, c), ns in cells.items() if c == col], default=0) for col in range(n_cols)]

    def fit(k: list[int]) -> tuple[float, bool]:  # the scale that fits the picture in view; is it the height's?
        w, h = _size(cells, k, n_rows)
        return min(view[0] / w, view[1] / h), view[1] / h < view[0] / w

    def widened(c: int) -> list[int]:
        return k[:c] + [k[c] + 1] + k[c + 1:]

    k = best = [min(1, m) for m in widest]
    while fit(k)[1] and k != widest:
        lines = _lines(cells, k)
        c = max((c for c in range(n_cols) if k[c] < widest[c]),
                key=lambda c: (fit(widened(c))[0], max(n for (r, cc), n in lines.items() if cc == c)))
        k = widened(c)
        if fit(k)[0] > fit(best)[0]:
            best = k
    return best


def _lines(cells, per_line: list[int]) -> dict[tuple[int, int], int]:
    return {(r, c): math.ceil(len(ns) / per_line[c]) for (r, c), ns in cells.items()}


def _narrow(cells, n_cols: int) -> list[bool]:
    """Per column: only embeddings (row 0) are drawn there, or nothing."""
    out = [True] * n_cols
    for r, c in cells:
        out[c] &= r == 0
    return out


def _col_widths(cells, per_line: list[int]) -> list[float]:
    narrow = _narrow(cells, len(per_line))
    return [(NARROW_W if narrow[c] else k * (NODE_W + GAP) - GAP) if k else EMPTY_COL_W for c, k in enumerate(per_line)]


def _row_heights(cells, per_line: list[int], n_rows: int) -> list[float]:
    lines = [0] * n_rows
    for (r, c), k in _lines(cells, per_line).items():
        lines[r] = max(lines[r], k)
    return [k * (NODE_H + GAP) - GAP if k else EMPTY_ROW_H for k in lines]


def _size(cells, per_line: list[int], n_rows: int) -> tuple[float, float]:
    w = LABEL_W + sum(_col_widths(cells, per_line)) + COL_GAP * len(per_line)
    h = 2 * HEADER_H + sum(_row_heights(cells, per_line, n_rows)) + ROW_GAP * (n_rows - 1)
    return w, h


def _place(graph, spans: list[tuple[int, int]], cells, per_line: list[int], n_rows: int, layers: int) -> Grid:
    col_w = _col_widths(cells, per_line)
    narrow = _narrow(cells, len(per_line))
    col_x, x = [], LABEL_W + COL_GAP / 2
    for w in col_w:
        col_x.append(x)  # left edge
        x += w + COL_GAP
    columns = _column_labels(graph, spans, col_x, col_w)
    header = HEADER_H + max(dy for _, _, dy in columns)  # room for the staggered labels too
    row_h = _row_heights(cells, per_line, n_rows)
    row_top, y = [], header
    for h in row_h:  # bottom to top
        row_top.append(y + h)
        y += h + ROW_GAP
    height = y - ROW_GAP + header
    xy, node_w = {}, {}
    for (r, c), ns in cells.items():
        w = NARROW_W if narrow[c] else NODE_W
        n_lines = math.ceil(len(ns) / per_line[c])
        for i, n in enumerate(ns):
            line, slot = divmod(i, per_line[c])
            on_line = min(per_line[c], len(ns) - line * per_line[c])
            if r == n_rows - 1:  # the logits: the likeliest on the lowest line, so no edge into it passes behind another
                line = n_lines - 1 - line
            left = col_x[c] + (col_w[c] - (on_line * (w + GAP) - GAP)) / 2  # centre each line in its column
            xy[n.id] = (left + slot * (w + GAP) + w / 2, row_top[r] - line * (NODE_H + GAP) - NODE_H / 2)
            node_w[n.id] = w
    rows = [(row_top[r] - row_h[r] / 2, name) for r, name in enumerate(row_names(layers))]
    inner = header - HEADER_H / 2  # the labels nearest the grid; a staggered one dy further out
    return Grid(xy, node_w, x - COL_GAP / 2, height, columns, rows, (inner, height - inner))


# -- edges ------------------------------------------------------------------------------------------------------

ROUTE_SAMPLES = 24  # points along a curve checked against the other nodes' boxes
ROUTE_CLEARANCE = 2.0  # points kept between a curve and a node it passes
MOST_BOWED = 64  # edges tried with bows a picture


def edge_routes(g: Grid, pairs: list[tuple[str, str]], strength: list[float] | None = None,
                most: int = MOST_BOWED, marked: set[int] | frozenset = frozenset()) -> list[tuple[float, ...]]:
    """Each edge (source id, target id) of the picture on grid ``g`` as a cubic Bezier curve (x0, y0, x1, y1, x2,
    y2, x3, y3), in grid coordinates (y up): from the top of the source's box to the bottom of the target's,
    leaving and arriving vertically (an S between columns, straight within one) where that passes no other drawn
    node; otherwise bowed sideways, by the least of 1-4 half node widths either way that passes no other node, one
    that stays within the grid's width first; where no bow does, it stays as it was (a bow past some nodes only
    tangles a dense column further).  An edge whose source is not below its target runs centre to centre.
    Checked on ``ROUTE_SAMPLES`` points of each curve; of the edges in another node's way, only the ``most``
    strongest (by ``strength``, default: in the order given) are tried with bows, so that a picture costs
    milliseconds whatever its size.  The edges of the marked path (``marked``: indices into ``pairs``) come first
    and may bow up to twice as far; where no bow within the grid clears them, they take the one within it that
    passes the fewest nodes, so that the highlighted band does not seem to run through a node that is not on it."""
    if not pairs:
        return []
    ids = list(g.xy)
    index = {k: i for i, k in enumerate(ids)}
    xy = torch.tensor([g.xy[k] for k in ids])  # [N, 2]
    half_w = torch.tensor([g.node_w[k] / 2 for k in ids]) + ROUTE_CLEARANCE  # [N]
    half_h = NODE_H / 2 + ROUTE_CLEARANCE
    bows = torch.tensor([0.0] + [s * k * (NODE_W + GAP) / 2 for k in (1, 2, 3, 4) for s in (1, -1)])  # [B], in
    # order of preference
    t = torch.linspace(0, 1, ROUTE_SAMPLES)  # [T]
    w0, w1, w2, w3 = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3  # Bernstein weights
    src = torch.tensor([index[a] for a, _ in pairs])
    tgt = torch.tensor([index[b] for _, b in pairs])
    (x1, y1), (x2, y2) = xy[src].T, xy[tgt].T  # [E] each
    up = y1 < y2
    y0, y3 = torch.where(up, y1 + NODE_H / 2, y1), torch.where(up, y2 - NODE_H / 2, y2)
    m = (y0 + y3) / 2

    def crossings(e: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For edges ``e`` [k] and bows ``b`` [B]: ([k, B] how many other nodes the curve passes, [k, B] it stays
        within the grid's width)."""
        cx1, cx2 = x1[e, None] + b * 4 / 3, x2[e, None] + b * 4 / 3  # [k, B]; 4/3: the middle lies `b` aside
        px = w0 * x1[e, None, None] + w1 * cx1[:, :, None] + w2 * cx2[:, :, None] + w3 * x2[e, None, None]  # [k,B,T]
        py = w0 * y0[e, None] + (w1 + w2) * m[e, None] + w3 * y3[e, None]  # [k, T]: both controls lie at height m,
        # so y does not depend on the bow
        level = (py[..., None] - xy[:, 1]).abs() < half_h  # [k, T, N]: at a node's height
        level[torch.arange(len(e)), :, src[e]] = False  # an edge leaves and enters its own two nodes
        level[torch.arange(len(e)), :, tgt[e]] = False
        near = level.any(1).any(0).nonzero().flatten()  # the nodes any of these curves comes level with
        inside = level[:, None, :, near] & ((px[..., None] - xy[near, 0]).abs() < half_w[near])  # [k, B, T, n]
        return inside.any(2).sum(-1), ((px >= LABEL_W) & (px <= g.width)).all(-1)

    bow = torch.zeros(len(pairs))
    straight, _ = crossings(torch.arange(len(pairs)), bows[:1])
    blocked = ((straight[:, 0] > 0) & up).nonzero().flatten()  # only these need a bow
    if strength is not None:
        blocked = blocked[torch.tensor(strength)[blocked].abs().argsort(descending=True, stable=True)]
    on_path = torch.tensor([int(i) in marked for i in blocked], dtype=torch.bool)
    path, rest = blocked[on_path], blocked[~on_path][: max(most - int(on_path.sum()), 0)]
    if len(rest):
        hits, within = crossings(rest, bows)  # [k, B]
        rank = (hits.clamp(max=1) * 2 + ~within) * len(bows) + torch.arange(len(bows))  # clear, within, least bow
        bow[rest] = torch.where((hits == 0).any(-1), bows[rank.argmin(-1)], 0.0)
    if len(path):  # within the grid (past its edge a curve is cut off), then the fewest nodes passed, the least bow
        wide = torch.cat([bows, torch.tensor([s * k * (NODE_W + GAP) / 2 for k in (5, 6, 7, 8) for s in (1, -1)])])
        hits, within = crossings(path, wide)
        rank = ((~within) * (len(g.xy) + 1) + hits) * len(wide) + torch.arange(len(wide))
        bow[path] = wide[rank.argmin(-1)]
    bow = bow * 4 / 3 * up  # an edge that does not go up stays straight
    c1y, c2y = torch.where(up, m, y0), torch.where(up, m, y3)
    cols = (x1, y0, x1 + bow, c1y, x2 + bow, c2y, x2, y3)
    return list(zip(*(c.tolist() for c in cols)))
