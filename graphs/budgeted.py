"""Budgeted attribution: the graph grows from the logits, expanding (computing the incoming row of) the
features of highest estimated influence first, and stops after ``max_feature_nodes`` features, instead of
computing every row and pruning afterwards.

The estimate of a feature's influence is its influence through the rows computed so far (the logits' rows,
then the expanded features'): a lower bound of its influence in the full graph, which it equals once every
target the feature reaches is expanded.  Each round expands, in one batch, the ``batch_size`` unexpanded
features of highest estimate.  Every computed row equals the full graph's row (the same products,
graphs/attribution.py's `target_rows`).  The graph kept has the expanded features, every embedding, error
node and logit, and the edges between them; the edges from features never expanded are summed into their
target's ``dropped``, so every row still adds up to its target's pre-activation.
"""
from __future__ import annotations

import torch

from .attribution import Target, emit_edges, source_groups, target_rows
from .graph import FEATURE_KINDS, EdgeArrays, Node, NodeKind
from .linear import Linearised
from .prune import GrowingInfluence, logit_start


def grow(lin: Linearised, nodes: list[Node], sources: dict, targets: list[Target], max_feature_nodes: int,
         batch_size: int = 256, progress: bool = False, target_token: int | None = None,
         edges_per_target: int | None = None) -> tuple[list[Node], EdgeArrays]:
    """The budgeted graph's nodes (the expanded features among the rest, in their order) and edges; influence
    starts from the logits as pruning's does (`prune.logit_start`, ``target_token``: the traced target);
    ``edges_per_target``: each target keeps its strongest incoming edges only, as `attribute` says."""
    from tqdm import tqdm

    groups = source_groups(nodes, sources)
    table = _target_table(targets)  # [T] node row, target group, unit, position
    edges = EdgeArrays()
    expanded = torch.zeros(len(nodes), dtype=torch.bool)
    is_logit = torch.tensor([n.type == NodeKind.LOGIT for n in nodes])
    start = logit_start(nodes, target_token)
    is_feature = torch.tensor([n.type in FEATURE_KINDS for n in nodes])
    bar = tqdm(total=max_feature_nodes, desc="attribution (budgeted)", disable=not progress)
    influence = GrowingInfluence(start)  # each expanded target's row arrives whole, in one `_expand`
    _expand(lin, groups, nodes, targets, table, is_logit, edges, expanded, batch_size, influence, edges_per_target)
    done = 0
    while done < max_feature_nodes:
        infl = influence()
        cand = (is_feature & ~expanded & (infl > 0)).nonzero()[:, 0]
        if not len(cand):
            break
        take = cand[infl[cand].argsort(descending=True)][: min(batch_size, max_feature_nodes - done)]
        chosen = torch.zeros(len(nodes), dtype=torch.bool)
        chosen[take] = True
        _expand(lin, groups, nodes, targets, table, chosen, edges, expanded, batch_size, influence, edges_per_target)
        done += len(take)
        bar.update(len(take))
    bar.close()
    return _restrict(nodes, edges, ~is_feature | expanded)


def _target_table(targets: list[Target]) -> torch.Tensor:
    """[T, 4]: node row, target group (index in ``targets``), unit index, position of every target."""
    parts = [torch.stack([rows, torch.full_like(rows, g), idx, pos], 1)
             for g, (_, _, rows, idx, pos) in enumerate(targets) if rows is not None]
    return torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.long)


def _expand(lin: Linearised, groups: dict, nodes: list[Node], targets: list[Target], table: torch.Tensor,
            chosen: torch.Tensor, edges: EdgeArrays, expanded: torch.Tensor, batch_size: int = 256,
            influence: GrowingInfluence | None = None, edges_per_target: int | None = None) -> None:
    """Compute the incoming rows of the chosen targets (``chosen`` [n_nodes] bool), by target group, into
    ``edges`` (and ``influence``)."""
    sel = table[chosen[table[:, 0]]]
    new = EdgeArrays()
    for g in sel[:, 1].unique().tolist():
        kind, L = targets[g][0], targets[g][1]
        part = sel[sel[:, 1] == g]
        for s in range(0, len(part), batch_size):
            rows, idx, pos = part[s : s + batch_size, 0], part[s : s + batch_size, 2], part[s : s + batch_size, 3]
            W, const = target_rows(lin, groups, len(nodes), kind, L, idx, pos)
            emit_edges(W, rows.tolist(), const, nodes, new, "ov" if kind == NodeKind.LORSA else "direct",
                       edges_per_target)
        expanded[part[:, 0]] = True
    if influence is not None:
        influence.add(new.src, new.tgt, new.w)  # merges new's parts first, so edges holds the same tensors
    edges.extend(new)


def _restrict(nodes: list[Node], edges: EdgeArrays, keep: torch.Tensor) -> tuple[list[Node], EdgeArrays]:
    """The kept nodes and the edges between them; the weight of every edge from a node not kept is added to
    its target's ``dropped``."""
    src, tgt, w = edges.src, edges.tgt, edges.w
    lost = ~keep[src]
    gone = lost.nonzero().squeeze(1)
    dropped = torch.zeros(len(nodes), dtype=torch.float64).index_add_(0, tgt.index_select(0, gone),
                                                                       w.index_select(0, gone).double())
    hit = dropped.nonzero()[:, 0]
    for i, v in zip(hit.tolist(), dropped[hit].tolist()):
        nodes[i].dropped += v
    kept = keep.nonzero()[:, 0]
    remap = torch.full((len(nodes),), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    return [nodes[i] for i in kept.tolist()], edges.select(~lost, remap)
