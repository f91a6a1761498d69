"""A memory estimate made before attribution, so that a prompt too long for this machine is refused in one
line instead of being killed by the kernel.

The estimate is an upper bound on the edges of the full graph, from the model's shape alone (every Lorsa head
and transcoder feature slot assumed active: top-K of each per position, plus one error node per block and
position).  A target reads the sources written before it: a Lorsa head at position t reads every earlier
block's nodes at positions 0..t (through its pattern); a transcoder feature and a logit read those at their
own position (through frozen attention, with ``attention="frozen"``, at positions 0..t too).  On the bundled
llama nearly every head and feature slot is active (K = 64 for both since its transcoders were widened), so the
bound is close: 26,963,802 edges at 31 tokens against 26,732,542 counted (2026-12-07), 95.8M at 60, 416.3M at 127
(33.3 GB at 80 bytes an edge; when every transcoder had K = 32 it was exact, 19,999,002 at 31 tokens).  Each edge costs ``BYTES_PER_EDGE`` at the peak (the edge store's index,
weight and kind tensors, merged once, plus pruning's per-edge temporaries): the peak resident memory of
attribution + pruning over the loaded model was 72 bytes per edge at 31 tokens (1.37 GB), 67 at 60 (4.6 GB), and
about 60 at 127 tokens (18.7 GB, the figure of issue 21); measured again with the jointly trained replacements,
72.006 at 31 tokens (1,440,055,296 bytes), and 71.5 with today's (1.91 GB for 26.7M edges, the whole process).
The attributing process's own peak (VmHWM, as tests/test_memory_estimate.py measures it) moves from run to run of
the same code: 72.5, 75.2 and 76.4 bytes an edge (2026-12-07, 27.0M edges), so 80 bounds it with a 5% margin over
the largest (76 did not, once).  With a node budget
(``max_feature_nodes``, graphs/budgeted.py) `estimate` bounds the budgeted graph: the logits' rows and that many of
the longest feature rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from replacement.memory import check_fits

BYTES_PER_EDGE = 80
DEFAULT_MAX_FEATURE_NODES = 1500  # `trace`'s node budget: 127 tokens on the bundled llama, <= 67.9M edges (5.4 GB)


@dataclass
class Estimate:
    edges: int
    bytes: int


def estimate(n_tokens: int, lorsa_k: list[int] | None, tc_k: list[int], max_logits: int = 10,
             max_feature_nodes: int | None = None, d_model: int | None = None, batch: int = 256) -> Estimate:
    """Upper bound on the edges and peak bytes of a graph of ``n_tokens`` positions: the full graph, or with
    ``max_feature_nodes`` a budgeted one (graphs/budgeted.py: the logits' rows and that many feature rows,
    bounded by the longest rows there can be).  With ``d_model``, the bytes also count the working memory
    that does not grow with the edges (`working_bytes`), which dominates on wide models.

    ``lorsa_k``: per layer, the Lorsa heads active per position (None: frozen real attention, no Lorsa nodes);
    ``tc_k``: per layer, the transcoder features active per position."""
    rows, logit_edges = _row_sizes(n_tokens, lorsa_k, tc_k)
    extra = 0 if d_model is None else working_bytes(n_tokens, lorsa_k, tc_k, d_model, batch)
    edges = logit_edges * max_logits
    budget = float("inf") if max_feature_nodes is None else max_feature_nodes
    for size, count in sorted(rows, reverse=True):
        take = int(min(count, budget))
        edges += size * take
        budget -= take
        if budget <= 0:
            break
    return Estimate(edges, edges * BYTES_PER_EDGE + extra)


def working_bytes(n_tokens: int, lorsa_k: list[int] | None, tc_k: list[int], d_model: int, batch: int = 256) -> int:
    """Float32 bytes of what every node writes [nodes, d], one batch's read gradients [B, n, d] at the write
    slots (one tensor shared by all slots but a new one below each frozen attention layer or skip
    connection: graphs/linear.py's `slot_gradients`) and its dense rows [B, nodes]."""
    nodes = n_tokens * (1 + sum(k + 1 for k in tc_k) + sum(k + 1 for k in (lorsa_k or [])))
    slots = 1 + len(tc_k) * (2 if lorsa_k is None else 1)
    return 4 * (nodes * d_model + slots * batch * n_tokens * d_model + batch * nodes)


def _row_sizes(n_tokens: int, lorsa_k: list[int] | None, tc_k: list[int]) -> tuple[list[tuple[int, int]], int]:
    """([(sources one feature row may read, how many such rows)], sources one logit row may read)."""
    n = n_tokens
    per_pos = 1  # sources written so far at one position: the embedding, then each block's nodes and error
    rows = []
    for L, k_tc in enumerate(tc_k):
        if lorsa_k is not None:
            rows += [(per_pos * (t + 1), lorsa_k[L]) for t in range(n)]
            per_pos += lorsa_k[L] + 1
        rows += [(per_pos * (1 if lorsa_k is not None else t + 1), k_tc) for t in range(n)]
        per_pos += k_tc + 1
    return rows, per_pos * (1 if lorsa_k is not None else n)


def check(est: Estimate, n_tokens: int) -> None:
    """Raise BadInputError (one line) if ``est`` does not fit the memory available."""
    check_fits(est.bytes, f"a graph of {n_tokens} tokens", "use a smaller --max-feature-nodes, a shorter prompt or a "
               "machine with more memory", detail=f" (up to {est.edges:,} edges)")


def check_graph(model, ids, max_feature_nodes: int | None = None) -> None:
    """Refuse in one line (BadInputError) the graph of ``ids`` [1, n] under ``model`` (a ReplacementModel) if its
    estimate exceeds the memory available: `attribute` checks it before building anything, `trace` as soon as
    the prompt is tokenised."""
    from replacement.foreign import feature_bound

    lorsa_k = [model.lorsas[L].cfg.top_k for L in sorted(model.lorsas)] if model.attention == "lorsa" else None
    est = estimate(ids.shape[1], lorsa_k, feature_bound(model, ids), max_feature_nodes=max_feature_nodes,
                   d_model=model.adapter.d_model)
    check(est, ids.shape[1])
