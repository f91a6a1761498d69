"""The words a picture puts under a node's id: what a head or feature writes, read by the unembedding (the
logit lens), and which token a head reads most.

* A unit's **lens**: the tokens whose logits its output direction w (a Lorsa head's W_O row, a feature's
  decoder into its own layer) raises most, through the final norm's gain (centred first for a LayerNorm) and the
  unembedding, demeaned over the vocabulary:  l = (W_U - mean_v W_U) (gamma * P w), per unit of activation.  The
  final norm's scale is left out: it is positive and the same for every token, so the order is exact.
* A family's lens (graphs/families.py): the lens of its members' output directions summed, each weighted by the
  member's activation on this prompt (what the family writes as one node, so its values are at those
  activations, not per unit), set on every member as ``Node.family_lens`` so that graph.json carries it and the
  family node of a collapsed graph reads it.
* A head's **key token**: the key position where its z pattern (A_{t,s} v_s) is largest, the position it takes
  most of its activation from on this prompt; its share of the pattern's positive entries says whether that key
  is the head's whole story (`key_share`; a picture marks a share under a half with a ``+``).
* Special tokens (padding, end of text) are never listed: their unembedding rows are often the longest.
"""
from __future__ import annotations

import torch

from .graph import FEATURE_KINDS, AttributionGraph, Node

LENS_TOKENS = 3  # tokens kept per node


def add_lens(graph: AttributionGraph, model, k: int = LENS_TOKENS) -> None:
    """Set ``Node.lens`` of every Lorsa head and transcoder feature of ``graph``: [[token text, demeaned logit per
    unit of activation], ...], the k tokens its output raises most; and ``Node.family_lens`` of every member of a
    family the graph holds (module docstring).  Call it after `find_families` for the families' part."""
    from replacement.dashboards import top_logits
    from replacement.norms import is_layernorm, norm_weight
    from replacement.tokenizer import special_ids, token_text

    from .families import families, output_directions

    nodes = [n for n in graph.node_list if n.type in FEATURE_KINDS and not n.members]
    a = model.adapter
    if not nodes or a.tokenizer is None:
        return
    W = output_directions(model, nodes)  # [m, d]
    row = {n.id: i for i, n in enumerate(nodes)}
    fams = families(graph)
    sums = [sum(nodes[row[m]].activation * W[row[m]] for m in f.members) for f in fams]  # [d] each
    with torch.no_grad():
        ids, vals = top_logits(torch.cat([W] + [s[None] for s in sums]), norm_weight(a.final_norm).cpu(),
                               a.unembedding.weight.detach().cpu(), is_layernorm(a.final_norm), k,
                               exclude=special_ids(a.tokenizer, len(a.unembedding.weight)), demean=True)
    texts = {t: token_text(a.tokenizer, t) for t in set(ids.flatten().tolist())}
    lens = [[[texts[t], round(v, 4)] for t, v in zip(r_ids, r_vals)]
            for r_ids, r_vals in zip(ids.tolist(), vals.tolist())]
    for n, entry in zip(nodes, lens):
        n.lens = entry
    for f, entry in zip(fams, lens[len(nodes):]):
        for m in f.members:
            nodes[row[m]].family_lens = entry


def key_position(n: Node) -> int | None:
    """The key position a Lorsa head (or a family of heads) takes most of its activation from (`families.z_key`:
    where its z pattern is largest); None for other nodes or an empty or all-zero pattern."""
    from .families import z_key

    p = z_key(n.z_pattern) if n.z_pattern else -1
    return None if p < 0 else p


def key_share(n: Node) -> float:
    """How much of a head's positive z pattern its key position (`key_position`) gives: 1 when it reads one key
    alone; 0 for a node without a pattern or with no positive entry."""
    p = key_position(n)
    positive = sum(x for x in n.z_pattern or () if x > 0)
    return n.z_pattern[p] / positive if p is not None and positive > 0 else 0.0
