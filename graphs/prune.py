"""Influence, pruning, and the replacement / completeness scores.

With A the normalised absolute adjacency (each target's incoming |weights| sum to 1), the influence of every
node on the logits is  w + w A + w A^2 + ... = w (I - A)^-1,  where w holds the logit nodes' probabilities
(renormalised; zero elsewhere, so a logit's influence is its own weight).  The graph is a DAG, so the power series ends after at most (depth) terms.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from replacement.checks import check_count, check_fraction

from .graph import ERROR_KINDS, FEATURE_KINDS, TARGET_KINDS, AttributionGraph, NodeKind, input_shares


def normalised_weights(graph: AttributionGraph) -> torch.Tensor:
    """[n_edges] |w| / (sum of |w| into the same target), per OV/direct edge (`graph.edge_arrays`' order)."""
    E = graph.edge_arrays
    return input_shares(E.tgt, E.w, len(graph))


def logit_weights(graph: AttributionGraph) -> torch.Tensor:
    """[n_nodes] the weight of each logit node in the influence (`logit_start`, with the graph's `target`)."""
    return logit_start(graph.node_list, graph.target.index if graph.logits() else None)


def logit_start(nodes: list, target_token: int | None = None) -> torch.Tensor:
    """[n_nodes] what influence starts from: each logit node's probability, normalised to sum 1 (zero elsewhere).
    A target asked for (``target_token``, `trace --target`) other than the most probable logit weighs at least as
    much as all the other logits together, so that pruning and the feature budget keep what it needs even when the
    model gives it little probability; the model's own top token as a target changes nothing."""
    w = torch.tensor([n.prob if n.type == NodeKind.LOGIT else 0.0 for n in nodes])
    if target_token is not None and len(w):
        top = int(w.argmax())
        for i, n in enumerate(nodes):
            if n.type == NodeKind.LOGIT and n.index == target_token and i != top:
                w[i] = max(float(w[i]), float(w.sum() - w[i]), 1e-30)
    return w / w.sum().clamp_min(1e-30)


def influence(graph: AttributionGraph, max_steps: int = 1000) -> torch.Tensor:
    """[n_nodes] influence of each node on the logits (logit nodes: their own weight)."""
    E = graph.edge_arrays
    return influence_of(E.src, E.tgt, E.w, logit_weights(graph), max_steps)


def influence_of(src: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, start: torch.Tensor,
                 max_steps: int = 1000) -> torch.Tensor:
    """[n_nodes] influence on the logits from edges src -> tgt of weights w [E] and the logits' weights
    ``start`` [n_nodes] (zero elsewhere): start A + start A^2 + ... plus start itself, where A[s, t] is the
    edge's |w| as a share of all |w| into t."""
    n = len(start)
    a = input_shares(tgt, w, n)
    if n <= DENSE_INFLUENCE_NODES and len(a) > n:
        if bool((src < tgt).all()):  # nodes in causal order (as `attribute` makes them): A is strictly upper
            # triangular, so the series is (I - A)^-1 start, one triangular solve
            M = torch.zeros(n, n).index_put_((src, tgt), -a, accumulate=True)  # [n, n] I - A, diagonal implied
            return _solve_causal(M, start)
        A = torch.zeros(n, n).index_put_((src, tgt), a, accumulate=True)  # [n, n] A[source, target]
        step = lambda v: A @ v  # noqa: E731  one matrix-vector product a step instead of a gather-scatter
    else:
        step = lambda v: torch.zeros(n).index_add_(0, src, v[tgt] * a)  # noqa: E731
    v, total = start.clone(), start.clone()
    for _ in range(max_steps):
        v = step(v)
        if v.abs().sum() < 1e-12:
            break
        total += v
    return total


DENSE_INFLUENCE_NODES = 4096  # `influence_of` builds the [n, n] matrix (64 MB at most) up to this many nodes


def _solve_causal(M: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """[n] (I - A)^-1 start, from M [n, n] holding -A above its diagonal (A strictly upper triangular: nodes in
    causal order; the unit diagonal is implied)."""
    return torch.linalg.solve_triangular(M, start[:, None].float(), upper=True, unitriangular=True)[:, 0]


class GrowingInfluence:
    """`influence_of` for a graph that grows by whole rows, as the budgeted attribution's does: each batch of
    edges given to `add` is every edge into its targets, and no later batch has edges into them.  A target's
    shares of its input are then final when its row arrives, so the matrix I - A is extended in place rather
    than rebuilt from every edge at every step (with nodes in causal order and up to DENSE_INFLUENCE_NODES
    nodes; otherwise the edges are kept and `influence_of` runs on them all)."""

    def __init__(self, start: torch.Tensor):
        self.start = start  # [n] the logits' weights, zero elsewhere
        n = len(start)
        self.M = torch.zeros(n, n) if n <= DENSE_INFLUENCE_NODES else None  # [n, n] I - A, diagonal implied
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, src: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor) -> None:
        """Edges src -> tgt of weights w [E]: every edge into each of their targets."""
        self.parts.append((src, tgt, w))
        if self.M is not None and not bool((src < tgt).all()):
            self.M = None  # not in causal order: the series over every edge instead
        if self.M is not None and len(w):
            self.M.index_put_((src, tgt), -input_shares(tgt, w, len(self.start)), accumulate=True)

    def __call__(self) -> torch.Tensor:
        """[n] each node's influence on the logits through the edges added so far."""
        if self.M is not None:
            return _solve_causal(self.M, self.start)
        if not self.parts:
            return self.start.clone()  # no edges yet: the logits alone
        src, tgt, w = (torch.cat(x) for x in zip(*self.parts))
        return influence_of(src, tgt, w.float(), self.start)


def scores(graph: AttributionGraph, infl: torch.Tensor | None = None) -> dict[str, float]:
    """Replacement score: the share of the logits' influence that ends in embeddings rather than error
    nodes.  Completeness: the influence-weighted share of each node's input that comes from non-error nodes.
    ``infl`` [n_nodes]: each node's influence on the logits (`influence`, computed when not given)."""
    infl = influence(graph) if infl is None else infl
    types = [n.type for n in graph.node_list]
    emb = sum(float(infl[i]) for i, t in enumerate(types) if t == NodeKind.EMBEDDING)
    err = sum(float(infl[i]) for i, t in enumerate(types) if t in ERROR_KINDS)
    E = graph.edge_arrays
    from_err = torch.tensor([t in ERROR_KINDS for t in types])[E.src]
    total_in = torch.zeros(len(graph)).index_add_(0, E.tgt, E.w.abs())
    err_in = torch.zeros(len(graph)).index_add_(0, E.tgt[from_err], E.w[from_err].abs())
    is_target = torch.tensor([t in TARGET_KINDS for t in types]) & (total_in > 0)
    share = 1 - err_in / total_in.clamp_min(1e-30)
    weight = infl * is_target
    completeness = float((weight * share).sum() / weight.sum().clamp_min(1e-30))
    return {"replacement_score": emb / max(emb + err, 1e-30), "completeness_score": completeness}


# a default trace's file caps (graph.json <= 20 MB at any prompt length): a link is ~105 bytes of JSON, a
# Lorsa head's node ~3.3 KB at 31 tokens (its z pattern and QK entries; ~4.5 KB at 127), any other ~450 bytes:
# 1500 x 4.5 KB + 80,000 x 105 B + ~1,200 error and embedding nodes is ~16 MB.  `trace --full` lifts them.
FILE_MAX_FEATURES = 1500
FILE_MAX_EDGES = 80_000


def file_caps(max_nodes: int | None, full: bool) -> tuple[int | None, int | None]:
    """(max_nodes, max_edges) for `prune` in a command: the file caps unless ``full``; ``max_nodes`` (the
    user's) wins where it is smaller (at least 1: 0 read as the file cap before)."""
    check_count("max_nodes", max_nodes)
    if full:
        return max_nodes, None
    return min(FILE_MAX_FEATURES if max_nodes is None else max_nodes, FILE_MAX_FEATURES), FILE_MAX_EDGES


NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98  # the default pruning: `trace`'s, and every picture's in the README


def prune(graph: AttributionGraph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD,
          max_nodes: int | None = None, max_edges: int | None = None) -> AttributionGraph:
    """Keep the features covering ``node_threshold`` of the features' total influence and the edges covering
    ``edge_threshold`` of the influence-weighted edge mass, then drop nodes left without outgoing edges until
    nothing changes.  Embeddings, error nodes and logits are always kept (while they have edges); a kept
    Lorsa head keeps the nodes of its QK pairs that the graph holds (a budgeted graph holds only
    the features it expanded).  Scores are computed on the full graph and stored with the
    pruned one, with each node's influence (set on the full graph's nodes too).  The pruned graph's nodes are
    copies: a target's ``dropped`` there also holds the weight of the incoming edges pruning took away.
    ``max_nodes`` caps the kept features at the most influential ones, ``max_edges`` the kept edges at the
    strongest (by the same influence-weighted score)."""
    check_fraction("node_threshold", node_threshold)
    check_fraction("edge_threshold", edge_threshold)
    check_count("max_nodes", max_nodes)
    check_count("max_edges", max_edges)
    infl = influence(graph)
    full_scores = scores(graph, infl)
    for i, n in enumerate(graph.node_list):
        n.influence = float(infl[i])
    E = graph.edge_arrays
    keep = _kept_nodes(graph, infl, node_threshold, max_nodes)
    edge_keep = _kept_edges(graph, infl, keep, edge_threshold, max_edges)
    keep, edge_keep = _drop_dead_ends(graph, keep, edge_keep)
    seconds_qk = _explain_kept_heads(graph, keep, infl)
    _keep_qk_nodes(graph, keep)
    if seconds_qk is not None:  # heads kept as pair nodes: theirs too (up to qk_heads in all)
        seconds_qk += _explain_kept_heads(graph, keep, infl)
    kept = keep.nonzero()[:, 0]
    remap = torch.full((len(graph),), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    # the pruned graph's nodes are copies whose `dropped` adds the weight of the incoming edges pruning took away, so
    # that incoming edges + const + dropped = preact holds in it as in the full graph
    lost = torch.zeros(len(graph), dtype=torch.float64).index_add_(
        0, E.tgt[~edge_keep], E.w[~edge_keep].double())
    nodes = [replace(graph.node_list[i], dropped=graph.node_list[i].dropped + float(lost[i])) for i in kept.tolist()]
    pruned = AttributionGraph(graph.prompt, graph.tokens, graph.token_ids, nodes,
                              E.select(edge_keep, remap), dict(graph.settings), dict(graph.scores))
    pruned.settings.update(node_threshold=node_threshold, edge_threshold=edge_threshold, max_nodes=max_nodes,
                           max_edges=max_edges)
    if seconds_qk is not None:
        pruned.settings["seconds_qk"] = seconds_qk
    pruned.scores.update({k: v for k, v in full_scores.items()},
                         full_nodes=len(graph), full_edges=len(E), pruned_nodes=len(pruned), pruned_edges=len(pruned.edge_arrays))
    pruned.scores.update({f"pruned_{k}": v for k, v in scores(pruned).items()})
    if graph.logits():
        pruned.scores["pruned_logit_decomposition"] = logit_decomposition(pruned)  # of its target, the full graph's
    return pruned


def _kept_nodes(graph: AttributionGraph, infl: torch.Tensor, node_threshold: float, max_nodes: int | None) -> torch.Tensor:
    """[n_nodes] bool: every non-feature node, and the most influential features covering ``node_threshold``
    of the features' total influence (at most ``max_nodes``)."""
    feat = torch.tensor([n.type in FEATURE_KINDS for n in graph.node_list], dtype=torch.bool)
    keep = ~feat
    f_idx = feat.nonzero()[:, 0]
    if len(f_idx):
        order = f_idx[infl[f_idx].argsort(descending=True)]
        cum = infl[order].cumsum(0)
        n_keep = int((cum < node_threshold * cum[-1]).sum()) + 1
        if max_nodes is not None:
            n_keep = min(n_keep, max_nodes)
        keep[order[:n_keep]] = True
    return keep


def _kept_edges(graph: AttributionGraph, infl: torch.Tensor, keep: torch.Tensor, edge_threshold: float,
                max_edges: int | None = None) -> torch.Tensor:
    """[n_edges] bool: among the edges between kept nodes, the smallest set covering ``edge_threshold`` of the
    influence-weighted mass (normalised |weight| x the target's influence), at most ``max_edges``."""
    E = graph.edge_arrays
    edge_keep = keep[E.src] & keep[E.tgt]
    score = normalised_weights(graph) * infl[E.tgt] * edge_keep
    order = score.argsort(descending=True)
    cum = score[order].cumsum(0)
    n_keep = int((cum < edge_threshold * cum[-1]).sum()) + 1 if len(cum) and cum[-1] > 0 else 0
    if max_edges is not None:
        n_keep = min(n_keep, max_edges)
    chosen = torch.zeros_like(edge_keep)
    chosen[order[:n_keep]] = True
    return edge_keep & chosen


def _drop_dead_ends(graph: AttributionGraph, keep: torch.Tensor, edge_keep: torch.Tensor):
    """Drop, until nothing changes, the nodes left without an outgoing edge (logits stay) and their edges."""
    E = graph.edge_arrays
    is_logit = torch.tensor([n.type == NodeKind.LOGIT for n in graph.node_list], dtype=torch.bool)
    while True:
        has_out = torch.zeros(len(graph), dtype=torch.bool)
        has_out[E.src[edge_keep]] = True
        new_keep = keep & (has_out | is_logit)
        new_edges = edge_keep & new_keep[E.src] & new_keep[E.tgt]
        if torch.equal(new_keep, keep) and torch.equal(new_edges, edge_keep):
            return keep, edge_keep
        keep, edge_keep = new_keep, new_edges


def _explain_kept_heads(graph: AttributionGraph, keep: torch.Tensor, infl: torch.Tensor) -> float | None:
    """Where the graph's QK explanations were deferred (``graph.explain_heads``), explain its kept Lorsa heads
    (the settings' ``qk_heads`` most influential of them, or all) before their pairs' nodes are kept: what the
    pruned graph shows is what explaining every head would have shown.  Returns the seconds it took."""
    if graph.explain_heads is None:
        return None
    t0 = time.time()
    graph.explain_heads.heads_of(graph.node_list, keep.nonzero()[:, 0].tolist(), graph.settings.get("qk_heads"), infl)
    graph.invalidate_qk()
    return round(time.time() - t0, 3)


def _keep_qk_nodes(graph: AttributionGraph, keep: torch.Tensor) -> None:
    """A kept head keeps the nodes of its QK pairs (in place; those in the graph: a budgeted graph leaves out
    the features it did not expand, which still enter the QK split)."""
    index = graph.index
    for i in keep.nonzero()[:, 0].tolist():
        for entry in graph.node_list[i].qk:
            for p in entry.pairs:
                for nid in (p.query, p.key):
                    if nid in index:
                        keep[index[nid]] = True


# which part of a logit's input each source type is (constants: the biases and the demeaning, `Node.const`)
DECOMPOSITION_PARTS = {NodeKind.EMBEDDING: "embeddings", **{k: "features" for k in FEATURE_KINDS},
                       **{k: "errors" for k in ERROR_KINDS}}


def signed_inputs(graph: AttributionGraph, node_index: int) -> dict[str, float]:
    """The signed input of one target node, summed by what sends it: features (Lorsa heads and transcoder
    features), errors, embeddings, constants, and ``dropped`` (the weight of incoming edges the graph does not
    hold: past edges_per_target, the feature budget or pruning); ``total`` equals the node's pre-activation."""
    E = graph.edge_arrays
    into = E.tgt == node_index
    out = {"features": 0.0, "errors": 0.0, "embeddings": 0.0}
    for s, w in zip(E.src[into].tolist(), E.w[into].tolist()):
        out[DECOMPOSITION_PARTS[graph.node_list[s].type]] += w
    node = graph.node_list[node_index]
    out["constants"] = node.const
    out["dropped"] = node.dropped
    out["total"] = sum(out.values())
    return out


def logit_decomposition(graph: AttributionGraph, target: int | None = None) -> dict:
    """The signed decomposition of the target logit (token id ``target``, default the graph's `target`: the one it
    was traced for, else the most probable logit node) and of its margin over the runner-up logit node: {"target": {...}, "runner_up": {...}, "margin":
    {...}, "error_share": errors / margin, None for a margin under `SHARED_MARGIN` in size}.  Unsigned scores
    (replacement, completeness) miss cancellation between features and errors; this does not."""
    logits = sorted((i for i, n in enumerate(graph.node_list) if n.type == NodeKind.LOGIT),
                    key=lambda i: -graph.node_list[i].prob)
    if not logits:
        return {}
    target = graph.target.index if target is None else target  # the traced target (else the top logit)
    first = next((i for i in logits if graph.node_list[i].index == target), logits[0])
    out = {"target": dict(signed_inputs(graph, first), token=graph.node_list[first].label,
                          node=graph.node_list[first].id)}
    rest = [i for i in logits if i != first]
    if rest:
        out["runner_up"] = dict(signed_inputs(graph, rest[0]), token=graph.node_list[rest[0]].label,
                                node=graph.node_list[rest[0]].id)
        margin = {k: out["target"][k] - out["runner_up"][k] for k in ("features", "errors", "embeddings", "constants",
                                                                     "dropped", "total")}
        out["margin"] = margin
        out["error_share"] = margin["errors"] / margin["total"] if abs(margin["total"]) >= SHARED_MARGIN else None
    return out


SHARED_MARGIN = 0.1  # a margin (in logits) from which the errors' share of it is given: nearer 0 it reads as 1000s of %
