"""Reading graphviz's SVG back: where each node was drawn, and each edge's colour."""
from __future__ import annotations

import xml.etree.ElementTree as ET

NS = "{http://www.w3.org/2000/svg}"


def _box(shape) -> tuple[float, float, float, float]:
    if shape.tag == NS + "ellipse":
        cx, cy, rx, ry = (float(shape.get(k)) for k in ("cx", "cy", "rx", "ry"))
        return cx - rx, cy - ry, cx + rx, cy + ry
    xs, ys = zip(*(tuple(map(float, p.split(","))) for p in shape.get("points").split()))
    return min(xs), min(ys), max(xs), max(ys)


def parse(svg_text: str) -> ET.Element:
    return ET.fromstring(svg_text.encode())


def node_boxes(root: ET.Element) -> dict[str, dict]:
    """{title: {"box": (x0, y0, x1, y1) in SVG coordinates (y down), "shape": element, "text": its text}}."""
    out = {}
    for g in root.iter(NS + "g"):
        if g.get("class") != "node":
            continue
        shape = next((c for c in g.iter() if c.tag in (NS + "ellipse", NS + "polygon")), None)
        text = "\n".join(t.text or "" for t in g.iter(NS + "text"))
        out[g.find(NS + "title").text] = {"box": _box(shape) if shape is not None else None, "shape": shape, "text": text}
    return out


def edges(root: ET.Element) -> list[dict]:
    """[{"source", "target", "stroke", "dashed", "tooltip"}] for every drawn edge (tooltip: its link's title)."""
    out = []
    for g in root.iter(NS + "g"):
        if g.get("class") == "edge":
            a, b = g.find(NS + "title").text.split("->")
            path = next(g.iter(NS + "path"))
            link = next(g.iter(NS + "a"), None)
            out.append({"source": a, "target": b, "stroke": path.get("stroke"), "dashed": bool(path.get("stroke-dasharray")),
                        "tooltip": link.get("{http://www.w3.org/1999/xlink}title") if link is not None else None,
                        "width": float(path.get("stroke-width", 1)), "highlight": path.get("stroke") == HIGHLIGHT})
    return out


HIGHLIGHT = "#ffc400"  # the marker under the strongest path's edges


def drawn_by_rule(graph, budget: int, must=(), max_logits: int = 5) -> set[str]:
    """The nodes a picture of ``budget`` nodes should draw, by the rule written out plainly: ``must`` and the
    likeliest logits (the target first) first; then, in order of influence, each node with an edge into the drawn
    set, a node without one set aside; after each node drawn, the most influential set-aside node that now has an
    edge into the drawn set, again and again, until none has or the budget is spent; every node when the budget
    covers them all.  (Rescans everything each time; graphs.layout keeps a queue.)"""
    if budget >= len(graph.node_list):
        return {n.id for n in graph.node_list}
    logits = sorted(graph.logits(), key=lambda n: (n.id != graph.target.id, -n.prob))[:max_logits]
    drawn = list(dict.fromkeys([*must, *(n.id for n in logits)]))[:budget]
    others = [n.id for n in sorted(graph.node_list, key=lambda n: -n.influence) if n.type != "logit" and n.id not in drawn]
    into: dict[str, set] = {}
    for e in graph.edges:
        if e.weight != 0:
            into.setdefault(e.source, set()).add(e.target)
    aside: list[str] = []
    for i in others:
        if len(drawn) >= budget:
            break
        if not into.get(i, set()) & set(drawn):
            aside.append(i)
            continue
        drawn.append(i)
        while len(drawn) < budget:
            back = [a for a in aside if into.get(a, set()) & set(drawn)]
            if not back:
                break
            drawn.append(back[0])
            aside.remove(back[0])
    return set(drawn)


def size(root: ET.Element) -> tuple[float, float]:
    """The drawing's width and height in points."""
    return tuple(float(root.get(k).removesuffix("pt")) for k in ("width", "height"))


def stage(node) -> float:
    """Where a node's layer sits, bottom to top: embeddings, then each layer's attention and MLP, then logits."""
    if node.type == "embedding":
        return -1
    if node.type == "logit":
        return float("inf")
    return 2 * node.layer + (node.type in ("transcoder", "mlp_error"))


def assert_grid(graph, boxes: dict) -> None:
    """Boxes (x0, y0, x1, y1), y down, of drawn nodes of ``graph``: every node of an earlier token position lies
    wholly left of every node of a later one, and every node of an earlier stage wholly below every later one."""
    drawn = [graph.node(i) for i in boxes]
    for key, lo, hi, what in ((lambda n: n.pos, 2, 0, "x follows token position"), (stage, 1, 3, "y follows layer")):
        groups: dict = {}
        for n in drawn:
            groups.setdefault(key(n), []).append(boxes[n.id])
        keys = sorted(groups)
        for a, b in zip(keys, keys[1:]):
            if what.startswith("x"):  # right edge of column a < left edge of column b
                assert max(x[lo] for x in groups[a]) < min(x[hi] for x in groups[b]), (what, a, b)
            else:  # the top of stage a is below the bottom of stage b (y grows downwards)
                assert min(x[lo] for x in groups[a]) > max(x[hi] for x in groups[b]), (what, a, b)
