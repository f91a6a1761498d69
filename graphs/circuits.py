"""Circuit finding on an attribution graph: the queries behind the two showcases (induction, addition).

Everything here reads a graph only (node kinds, z patterns, edges, QK pairs); path patching, which needs the
model, is graphs/patching.py.

Induction: a Lorsa head at the last position whose z pattern peaks on the token after the earlier occurrence
of the current token, writing the logit of that token; its strongest QK pair at that key position pairs a
query-side node carrying the current token with a key-side node written at the key position by an earlier
head (a previous-token head when that head reads the position before).

Addition: operand movers are last-position Lorsa heads whose z pattern puts most of its mass on an operand
position; the transcoder features they write into are downstream of them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from replacement.errors import BadInputError

from .graph import AttributionGraph, Node, NodeKind, QKLink, check_k


def _z_pattern(head: Node) -> torch.Tensor:
    if not head.z_pattern:
        raise BadInputError(f"{head.id} is a {head.type.value} node with no z pattern; only Lorsa heads (and their "
                            "families) have one")
    return torch.tensor(head.z_pattern).abs()


def z_peak(head: Node) -> int:
    """The key position a Lorsa head takes most of its activation from (`families.z_key`, the rule every view
    shares)."""
    from .families import z_key

    _z_pattern(head)  # a node without a pattern: one line
    return max(z_key(head.z_pattern), 0)


def z_share(head: Node, pos: int) -> float:
    """The share of a Lorsa head's z pattern (in size) on key position ``pos``."""
    zp = _z_pattern(head)
    return float(zp[pos] / zp.sum().clamp_min(1e-9)) if pos < len(zp) else 0.0


# -- induction ----------------------------------------------------------------------------------------------


def induction_peak(graph: AttributionGraph, position: int | None = None) -> int | None:
    """Where an induction head at ``position`` (default: the last) would look: the position after the latest
    earlier occurrence of the token there (by token id), or None where that token occurs nowhere before it."""
    ids = graph.token_ids
    position = len(ids) - 1 if position is None else position
    if not 0 <= position < len(ids):
        raise BadInputError(f"position {position} is outside the prompt's {len(ids)} tokens")
    earlier = [p for p in range(position) if ids[p] == ids[position]]
    return earlier[-1] + 1 if earlier else None


def heads_attending(graph: AttributionGraph, position: int, peak: int, min_layer: int = 0) -> list[Node]:
    """The Lorsa heads at ``position`` (of layer >= ``min_layer``) whose z pattern peaks at ``peak``."""
    return [h for h in graph.nodes(type=NodeKind.LORSA, position=position) if h.layer >= min_layer and z_peak(h) == peak]


def induction_families(graph: AttributionGraph, position: int, peak: int, min_layer: int = 1) -> list:
    """The families (graphs/families.py) of Lorsa heads at ``position`` of layers >= ``min_layer`` whose key is
    ``peak`` (the token after the earlier occurrence): the induction heads as units."""
    return [f for f in graph.families() if f.kind == NodeKind.LORSA and f.pos == position
            and f.key_positions == (peak,) and f.layers[0] >= min_layer]


def induction_heads(graph: AttributionGraph, logit_id: str, peak: int) -> list[Node]:
    """The candidate induction heads for the logit ``logit_id``: Lorsa heads at the logit's position with a
    direct edge into it whose z pattern peaks at ``peak`` (the token after the earlier occurrence), the
    strongest (most positive) edge first."""
    logit = graph.node(logit_id)
    if logit.type != NodeKind.LOGIT:
        raise BadInputError(f"{logit.id} is a {logit.type.value} node, not a logit")
    into = {e.source: e.weight for e in graph.incoming(logit_id)}
    heads = [h for h in heads_attending(graph, logit.pos, peak) if h.id in into]
    return sorted(heads, key=lambda h: -into[h.id])


@dataclass
class InductionCircuit:
    head: Node  # the induction head
    peak: int  # where its z pattern peaks
    pairs: list[QKLink]  # the QK pairs that say why it attends there (`why_pairs`), strongest first
    query: Node | None  # the query side of the strongest pair
    key: Node | None  # the key side of the strongest pair
    query_reads_current: bool  # the query side carries the current token alone
    query_source: int | None  # the position a query-side head reads (z peak), if the query side is such a head
    key_source: int | None  # the position a key-side head reads (z peak), if the key side is an earlier head
    prev_head: Node | None  # the key side, if it is a previous-token head (it reads the position before the peak)


def induction_circuit(graph: AttributionGraph, logit_id: str, peak: int, parallel_residual: bool = False) -> InductionCircuit:
    """The strongest induction head for ``logit_id`` attending to ``peak`` and what the strongest QK pair that
    raises its attention there (`why_pairs`) is made of.  ``parallel_residual``: a layer-0 MLP node then reads
    the embedding alone (so it carries the current token).  Raises LookupError if no head qualifies."""
    heads = induction_heads(graph, logit_id, peak)
    if not heads:
        raise LookupError("no Lorsa head at the last position attends to the token after the earlier occurrence")
    head = heads[0]
    pairs = why_pairs(graph, head, peak)
    query = graph.node(pairs[0].query) if pairs else None
    key = graph.node(pairs[0].key) if pairs else None
    key_source = z_peak(key) if _earlier_head(key, head) else None
    query_source = z_peak(query) if _earlier_head(query, head) and query.pos == head.pos else None
    return InductionCircuit(head, z_peak(head), pairs, query, key, _carries_current_token(query, head, parallel_residual),
                            query_source, key_source, key if key_source is not None and key_source == peak - 1 else None)


def why_pairs(graph: AttributionGraph, head: Node, key_pos: int) -> list[QKLink]:
    """The QK pairs that say why ``head`` attends to ``key_pos``: those of its contrast there (its score minus the
    reference's, graphs/contrast.py) that raise it, with their key node at ``key_pos`` and both nodes in the graph,
    strongest first.  A pair of the raw score can be large and the same at every key (or lower the attention);
    where the head has no contrast at ``key_pos`` (one key, or none computed), the raw pairs there, largest first."""
    entry = next((e for e in head.qk if e.key_pos == key_pos), None)
    if entry is not None and entry.contrast is not None:
        links = [QKLink(head.id, entry, p) for p in entry.contrast.pairs if p.weight > 0 and p.query in graph.index
                 and p.key in graph.index and graph.node(p.key).pos == key_pos]
        if links:
            return sorted(links, key=lambda e: -e.weight)
    return sorted((e for e in graph.qk_pairs(head) if e.key_pos == key_pos), key=lambda e: -abs(e.weight))


def _earlier_head(node: Node | None, head: Node) -> bool:
    return node is not None and node.type == NodeKind.LORSA and node.layer < head.layer and node.z_pattern is not None


def _carries_current_token(query: Node | None, head: Node, parallel_residual: bool) -> bool:
    """A node written at the head's position before its layer that reads only the token there: the embedding,
    a head attending to its own position, or a layer-0 MLP node of a parallel-residual model."""
    if query is None or query.pos != head.pos or query.layer >= head.layer:
        return False
    return (query.type == NodeKind.EMBEDDING or (query.type == NodeKind.LORSA and z_peak(query) == head.pos)
            or (query.type in (NodeKind.TRANSCODER, NodeKind.MLP_ERROR) and query.layer == 0 and parallel_residual))


def circuit_nodes(graph: AttributionGraph, head: Node, logit: Node, k: int = 6) -> set[str]:
    """A small picture of a head's circuit: the head, the logit, the ``k`` strongest sources of each, the
    nodes of the head's ``k`` strongest QK pairs, and the embeddings where these sit or where a head among them
    attends most (its z pattern's peak): the tokens the circuit reads, not every token of a long prompt."""
    keep = {head.id, logit.id}
    keep |= {e.source for e in graph.incoming(head, k=k)} | {e.source for e in graph.incoming(logit, k=k)}
    for e in graph.qk_pairs(head)[:k]:
        keep |= {e.query, e.key}
    nodes = [graph.node(i) for i in keep]
    at = {n.pos for n in nodes} | {z_peak(n) for n in nodes if n.type == NodeKind.LORSA and n.z_pattern}
    return keep | {n.id for n in graph.nodes(type=NodeKind.EMBEDDING) if n.pos in at}


# -- addition -----------------------------------------------------------------------------------------------


@dataclass
class OperandMover:
    head: Node
    pos: int  # the operand position it reads
    share: float  # the share of its z pattern there


def operand_movers(graph: AttributionGraph, operands: list[int], position: int, min_share: float = 0.5) -> list[OperandMover]:
    """The Lorsa heads at ``position`` that put more than ``min_share`` of their z pattern on one of the
    ``operands`` positions, in graph order."""
    n = len(graph.tokens)
    if isinstance(operands, numbers.Integral) or not all(isinstance(p, numbers.Integral) for p in operands):
        raise BadInputError("operands is a list of positions (whole numbers)")
    bad = next((p for p in [*operands, position] if not 0 <= p < n), None)
    if bad is not None:
        raise BadInputError(f"position {bad} is outside the prompt's {n} tokens")
    return [OperandMover(h, p, z_share(h, p)) for h in graph.nodes(type=NodeKind.LORSA, position=position)
            for p in operands if z_share(h, p) > min_share]


def downstream_features(graph: AttributionGraph, heads: list[Node]) -> list[str]:
    """The transcoder features that ``heads`` have an edge into, sorted by id."""
    return sorted({e.target for h in heads for e in graph.outgoing(h)
                   if graph.node(e.target).type == NodeKind.TRANSCODER})


def most_influential(graph: AttributionGraph, kind: NodeKind, k: int, influence: torch.Tensor | None = None) -> list[Node]:
    """The ``k`` nodes of ``kind`` with the largest influence on the logits, largest first: ``influence`` [n_nodes]
    if given, else the influence each node holds (`prune` sets it from the full graph: what `circuits query`, the
    pictures and `compare` show), else, on a graph never pruned, computed on this graph (graphs/prune.py)."""
    from .prune import influence as influence_of

    check_k(k)
    if influence is None and any(n.influence for n in graph.node_list):
        influence = torch.tensor([n.influence for n in graph.node_list])
    infl = influence_of(graph) if influence is None else influence
    return sorted(graph.nodes(type=kind), key=lambda n: -float(infl[graph.index[n.id]]))[:k]
