"""Graphs read from disk and graphs about to be written: one clear line for anything wrong, never a traceback.

A graph.json can come from anywhere (another tool, a truncated copy, a hostile file), so `load_graph_dict`
reads it strictly: UTF-8, strict JSON (no NaN/Infinity, no number too large for a float, bounded nesting),
the schema (graphs/schema/graph.schema.json), unique node ids, links between existing nodes and at least one
logit node.  `check_finite` refuses a traced graph holding NaN or infinite values (NaN weights in the model or
its replacements) before any file is written: strict JSON readers reject bare ``NaN``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from replacement.errors import BadInputError


class BadGraphError(BadInputError):
    """A graph file that cannot be read, or a graph that cannot be written faithfully."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number in strict JSON")


FLOAT32_MAX = 3.4028234663852886e38


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:20]} is too large for a float")
    return x


def _float_sized_int(text: str) -> int:
    """A JSON integer, refused beyond the float range: every number of a graph is read as a float somewhere
    (``1`` followed by 400 zeros passed the schema as a number, then `render` raised OverflowError)."""
    x = int(text)
    if abs(x) > _FLOAT_MAX_INT:
        raise ValueError(f"number {text[:20]}... is too large for a float")
    return x


_FLOAT_MAX_INT = int(sys.float_info.max)


def strict_loads(text: str):
    """``json.loads`` that rejects NaN, Infinity and overflowing numbers, written with or without a decimal point
    (raises ValueError or RecursionError)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_float_sized_int)


def strict_dumps(obj) -> str:
    """``json.dumps`` that refuses NaN and infinities instead of writing bare ``NaN`` (raises BadGraphError)."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        raise BadGraphError("the graph holds NaN or infinite values; not written") from None


def graph_file(path: str | Path) -> Path:
    """``path`` as given, or the graph.json inside it when it names a trace's output folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "graph.json").is_file():
            raise BadGraphError(f"{path} is a folder with no graph.json in it; name a graph file")
        return path / "graph.json"
    return path


def load_graph_dict(path: str | Path) -> dict:
    """The checked contents of a graph JSON file (or of a trace's folder's graph.json); raises BadGraphError (one
    line) for any malformed file."""
    path = graph_file(path)
    if path.exists() and not (path.is_file() or path.is_dir()):  # a pipe would block, a device never end
        raise BadGraphError(f"{path} is not a graph file: not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadGraphError(f"{path} is not a graph file: not UTF-8 text (byte {e.start})") from None
    try:
        d = strict_loads(text)
    except RecursionError:
        raise BadGraphError(f"{path} is not a graph file: JSON nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise BadGraphError(f"{path} is not a graph file: invalid JSON ({str(e).splitlines()[0]})") from None
    check_graph_dict(d, path)
    return d


def check_graph_dict(d, where: str | Path = "graph") -> None:
    """Schema and references of a graph dictionary; raises BadGraphError with the first problem."""
    import jsonschema

    from .export import SCHEMA_PATH

    if not isinstance(d, dict):
        raise BadGraphError(f"{where} is not a graph file: the top level is a {type(d).__name__}, not an object")
    version = d.get("metadata", {}).get("schema_version") if isinstance(d.get("metadata"), dict) else None
    if "metadata" in d and version != 1:
        raise BadGraphError(f"{where}: unsupported graph schema version {_short(version)} (this version reads 1)")
    nodes = d.get("nodes")
    if (isinstance(nodes, list) and nodes and all(isinstance(n, dict) for n in nodes)
            and all("feature_type" in n and "type" not in n for n in nodes)):
        raise BadGraphError(f"{where} is a graph in circuit-tracer's (Neuronpedia's) own layout, without the fields "
                            "this tool's graphs add (type, index, model_layer, ...): `circuits` reads the graph files "
                            "`trace` writes; open this one in circuit-tracer's viewer")
    try:
        jsonschema.validate(d, json.loads(SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as e:
        at = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise BadGraphError(f"{where} does not follow the graph schema at {at}: {_short(e.message)}") from None
    except RecursionError:
        raise BadGraphError(f"{where} is not a graph file: nested too deeply") from None
    scores = d["metadata"].get("scores", {})
    for key in ("replacement_score", "completeness_score"):  # drawn in the DOT title
        if key in scores and (isinstance(scores[key], bool) or not isinstance(scores[key], (int, float))):
            raise BadGraphError(f"{where}: metadata.scores.{key} is {_short(scores[key])}, not a number")
    ids = [n["node_id"] for n in d["nodes"]]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise BadGraphError(f"{where}: node id {_short(i)} appears twice")
        seen.add(i)
    into: dict[str, float] = {}  # each target's absolute input, which shares and influence divide by
    for e in d["links"]:
        for end in ("source", "target"):
            if e[end] not in seen:
                raise BadGraphError(f"{where}: a link's {end} {_short(e[end])} is not a node of the graph")
        if abs(e["weight"]) > FLOAT32_MAX:  # edges are float32 in memory: it would turn into inf, then NaN paths
            raise BadGraphError(f"{where}: a link's weight {_short(e['weight'])} is too large (beyond float32)")
        into[e["target"]] = into.get(e["target"], 0.0) + abs(e["weight"])
    big = next((t for t, v in into.items() if v > FLOAT32_MAX), None)
    if big is not None:
        raise BadGraphError(f"{where}: the links into {_short(big)} sum beyond float32 (their weights are too large)")
    n_tokens = len(d["metadata"]["prompt_tokens"])
    for n in d["nodes"]:
        for field in ("activation", "influence"):
            if n[field] is None:
                raise BadGraphError(f"{where}: node {_short(n['node_id'])} has no {field} (null)")
        _check_grid_place(n, n_tokens, where)
    if not any(n["type"] == "logit" for n in d["nodes"]):
        raise BadGraphError(f"{where}: the graph has no logit node")
    marks = [n for n in d["nodes"] if n.get("is_target_logit")]
    marked = [n["node_id"] for n in marks]
    decomposition = scores.get("logit_decomposition")
    target = decomposition.get("target") if isinstance(decomposition, dict) else None
    traced = target.get("node") if isinstance(target, dict) else None
    traced = traced if traced in seen else None  # a subgraph without the traced logit marks the likeliest it holds
    not_logit = next((n["node_id"] for n in marks if n["type"] != "logit"), None)
    if not_logit is not None:
        raise BadGraphError(f"{where}: is_target_logit marks {_short(not_logit)}, which is not a logit node")
    if len(marked) > 1 or (marked and traced is not None and marked[0] != traced):
        what = f"{_short(marked[0])} and {_short(marked[1])}" if len(marked) > 1 else _short(marked[0])
        raise BadGraphError(f"{where}: is_target_logit marks {what}, but a graph has one target"
                            + (f" (metadata.scores.logit_decomposition's: {_short(traced)})" if traced else ""))
    _check_families(d, where)
    _check_ids_and_causality(d, where)


MAX_LAYERS = 4096  # far above any real model; a graph's rows are drawn per layer, so the bound keeps a hostile
# file from asking the layout for billions of rows


def _check_grid_place(n: dict, n_tokens: int, where) -> None:
    """A node's layer, position and index are whole numbers (JSON Schema's ``integer`` admits ``1.0``) and its
    layer and position lie on the graph's grid: layer -1 (embeddings) up to MAX_LAYERS, position a prompt token."""
    bounds = {"model_layer": (-1, MAX_LAYERS), "ctx_idx": (0, n_tokens - 1), "index": (-1, 2**53)}
    for field, (lo, hi) in bounds.items():
        v = n[field]
        if not lo <= v <= hi or not float(v).is_integer():  # the bound first: float() of a huge int overflows
            raise BadGraphError(f"{where}: node {_short(n['node_id'])} has {field} {_short(v)}, not a whole number "
                                f"from {lo} to {hi}")


def _check_families(d: dict, where) -> None:
    """Each family's members are heads (``fam.lorsa``) or transcoder features (``fam.tc``) at the position its id
    names (graphs/families.py), so that a family collapses into one node of one kind at one position."""
    from .graph import FAMILY_ID

    tags = {"lorsa": "lorsa", "transcoder": "tc"}
    for n in d["nodes"]:
        fid = n.get("family")
        if fid is None:
            continue
        m = FAMILY_ID.fullmatch(fid) if isinstance(fid, str) else None
        if m is None or tags.get(n["type"]) != m[1] or n["ctx_idx"] != int(m[4]):
            raise BadGraphError(f"{where}: node {_short(n['node_id'])} ({n['type']} at position {n['ctx_idx']}) "
                                f"cannot belong to family {_short(fid)}")


def _check_ids_and_causality(d: dict, where) -> None:
    """Each node's id is the one its fields give (`NodeKey`; a family node's, ``fam.<kind>.L.K@P`` at its own
    position): the reader rebuilds nodes from their fields and links name ids, so a mismatch would put a node in
    two places.  Each link runs forward: from a node to another, never to an earlier position, and (but for a
    family node, whose members may span layers) from an earlier stage of the forward pass to a later one; and
    appears once (of its kind)."""
    from .graph import FAMILY_ID, NodeKey, stage

    nodes = {}
    family = lambda n: "members" in n or n["node_id"].startswith("fam.")  # noqa: E731 - (files before 2026-12-07 kept no members)
    for n in d["nodes"]:
        if family(n):
            m = FAMILY_ID.fullmatch(n["node_id"])
            ok = m is not None and int(m[4]) == n["ctx_idx"]
        else:
            ok = n["node_id"] == str(NodeKey(n["type"], int(n["model_layer"]), int(n["index"]), int(n["ctx_idx"])))
        if not ok:
            raise BadGraphError(f"{where}: node id {_short(n['node_id'])} does not match its fields (type {n['type']}, "
                                f"layer {n['model_layer']}, index {n['index']}, position {n['ctx_idx']})")
        nodes[n["node_id"]] = n
    at = {i: stage(n["type"], n["model_layer"]) for i, n in nodes.items() if not family(n)}  # a family spans layers
    pairs: set[tuple] = set()
    for e in d["links"]:
        a, b = nodes[e["source"]], nodes[e["target"]]
        pair = (e["source"], e["target"], e.get("kind"))
        if pair in pairs:  # its weight would be counted twice in the target's input
            raise BadGraphError(f"{where}: the link {_short(e['source'], 30)} -> {_short(e['target'], 30)} appears twice")
        pairs.add(pair)
        if a is b or a["ctx_idx"] > b["ctx_idx"] or at.get(e["source"], -math.inf) >= at.get(e["target"], math.inf):
            raise BadGraphError(f"{where}: the link {_short(e['source'], 30)} -> {_short(e['target'], 30)} runs backwards "
                                "(into an earlier position or layer, or into itself)")


def check_finite(graph) -> None:
    """Raise BadGraphError if any node value, edge weight or score of ``graph`` is NaN or infinite."""
    import torch

    for n in graph.node_list:
        for field in ("activation", "influence", "prob", "const", "preact", "dropped"):
            if not math.isfinite(getattr(n, field)):
                raise BadGraphError(f"node {n.id} has {field} {getattr(n, field)}: the model or its replacements "
                                    "hold NaN or infinite weights; no graph written")
    if len(graph.edge_arrays) and not bool(torch.isfinite(graph.edge_arrays.w).all()):
        raise BadGraphError("edge weights are NaN or infinite: the model or its replacements hold NaN or infinite "
                            "weights; no graph written")
    for k, v in graph.scores.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise BadGraphError(f"the {k.replace('_', ' ')} is {v}: the model or its replacements hold NaN or "
                                "infinite weights; no graph written")


def _short(value, width: int = 60) -> str:
    """A value for an error message: repr (so control characters are escaped), cut to ``width`` characters."""
    r = repr(value)
    return r if len(r) <= width else r[: width - 3] + "..."
