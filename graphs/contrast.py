"""Contrastive QK attribution: why a Lorsa head's query looks at key position s rather than elsewhere.

The softmax sees only differences of scores across the keys of one query, so the raw split of score(t, s)
(graphs/qk.py) is dominated by terms that are the same for every key.  Explain instead

    score(t, s) - score_ref = q_t . (k_s - k_ref) / sqrt(d_qk),   k_ref = sum_p c_p k_p

with weights c over the key positions p <= t: ``mean``, the attention-weighted mean of the *other* keys,
c_p = A_{t,p} / sum_{p' != s} A_{t,p'} for p != s and c_s = 0 (their uniform mean where their attention
underflows); or ``runner_up``, one-hot at the strongest other key r.  (A mean that included s itself would
scale the difference by 1 - A_{t,s}, which vanishes exactly where the head is most decided.)  With
w_p = [p = s] - c_p (weights that sum to 0) and k_p = sum_{j at p} k_j + kb_p,

    difference = sum_i sum_u q_i . dK_u / sqrt(d_qk)      pairs_total: query node i x key unit u
               + q_bias . sum_u dK_u / sqrt(d_qk)          query_bias_x_keys
               + q_t . dkb / sqrt(d_qk)                    position

where dK_u = sum_p w_p k_{u@p} sums a unit (head, feature, token embedding, layer's error) over the key
positions and dkb = sum_p w_p kb_p is the difference of the key biases.  A unit written alike at s and the
reference cancels in dK_u, a constant key vector cancels in dkb (the weights sum to 0); what is left in dkb
is position (rotary turns the key bias by the key's position) and the norm scale of each key position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import CONTRAST_REFERENCES, QKContrast, QKPair


@dataclass
class ContrastSplit:
    """The exact split of k score differences of one query (k explained keys), tensors:
    dK [k, U, e] the key units' weighted sums, dkb [k, e], and per key pairs_total, query_bias_x_keys,
    position [k], query marginals [k, mq] (q_i . (sum_u dK_u + dkb)), key marginals [k, U] (dK_u . q_t)."""

    dK: torch.Tensor
    dkb: torch.Tensor
    pairs_total: torch.Tensor
    query_bias_x_keys: torch.Tensor
    position: torch.Tensor
    query_marginals: torch.Tensor
    key_marginals: torch.Tensor

    @property
    def difference(self) -> torch.Tensor:
        return self.pairs_total + self.query_bias_x_keys + self.position


def reference_weights(attention: torch.Tensor, keys: torch.Tensor, reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [k, t+1]: each explained key's contrast weights, the reference position per key [k], -1 for the
    mean) from one query's attention row ``attention`` [t+1] (t >= 1) and its explained keys ``keys`` [k].
    ``mean``: w = onehot(s) - (A off s, renormalised; uniform off s where it sums below 1e-6);
    ``runner_up``: w = onehot(s) - onehot(r), r the strongest key other than s."""
    if reference not in CONTRAST_REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(CONTRAST_REFERENCES)}, not {reference!r}")
    n = len(attention)
    onehot = torch.nn.functional.one_hot(keys, n).to(attention.dtype)  # [k, t+1]
    if reference == "mean":
        rest = attention[None] * (1 - onehot)  # [k, t+1]
        total = rest.sum(1, keepdim=True)
        c = torch.where(total > 1e-6, rest / total.clamp(min=1e-30), (1 - onehot) / (n - 1))
        return onehot - c, torch.full_like(keys, -1)
    others = attention[None].expand(len(keys), n).masked_fill(onehot.bool(), -1.0)
    runner = others.argmax(1)  # [k]
    return onehot - torch.nn.functional.one_hot(runner, n).to(attention.dtype), runner


def split_rows(Q: torch.Tensor, qb: torch.Tensor, K: torch.Tensor, row_pos: torch.Tensor, unit: torch.Tensor,
               n_units: int, kb: torch.Tensor, w: torch.Tensor, scale: float) -> ContrastSplit:
    """The exact split of the score differences of one query, for k contrasts at once.

    Q [mq, e]: the query nodes' vectors; qb [e]: the query's constant term.  K [R, e]: the key-side node
    vectors (any key position), row_pos [R] their positions (0..P-1), unit [R] their units (0..n_units-1).
    kb [P, e]: the key's constant term per position.  w [k, P]: the contrast weights per position."""
    w_rows = w[:, row_pos]  # [k, R]
    dK = K.new_zeros(len(w), n_units, K.shape[1]).index_add_(1, unit, w_rows[..., None] * K[None])  # [k, U, e]
    dkb = w @ kb  # [k, e]
    q_sum = Q.sum(0)  # [e]
    q_t = q_sum + qb
    dK_sum = dK.sum(1)  # [k, e]
    return ContrastSplit(
        dK=dK, dkb=dkb,
        pairs_total=dK_sum @ q_sum * scale, query_bias_x_keys=dK_sum @ qb * scale, position=dkb @ q_t * scale,
        query_marginals=(dK_sum + dkb) @ Q.t() * scale,  # [k, mq]
        key_marginals=dK @ q_t * scale)  # [k, U]


def explain_query(tabs, g: int, t: int, keys: list[int], attention: torch.Tensor, reference: str,
                  top_pairs: int, screen: int = 12) -> list[QKContrast | None]:
    """The `QKContrast` of each key position in ``keys`` for QK group ``g`` (the layer's numbering) at query
    ``t``; ``attention`` [t+1]: the group's pattern row.  None where the query has a single key."""
    from .qk import _top_pairs

    if t == 0:
        return [None] * len(keys)
    dev = tabs.parts.device
    gt = torch.tensor([g], device=dev)
    ks = torch.tensor(keys, device=dev)
    w, ref_pos = reference_weights(attention[: t + 1].float(), ks, reference)  # [k, t+1]
    used = (w != 0).any(0).nonzero().squeeze(1)  # [P] key positions that enter
    w = w[:, used]
    mq = len(tabs.names[t])
    Q = tabs.side(0, gt, gt.new_tensor([t]), mq)[0]  # [mq, e]
    qb = tabs.side_bias(0, gt, gt.new_tensor([t]))[0]  # [e]
    row = tabs.G + int(tabs._row(gt))
    groups = tabs.groups[used]  # [P, M]
    real = groups >= 0
    p_idx, r_idx = real.nonzero(as_tuple=True)  # rows: position index into used, row within the position
    K = tabs.parts[row][used][p_idx, r_idx]  # [R, e]
    units, unit = torch.unique(groups[p_idx, r_idx], return_inverse=True)
    kb = tabs.bias[row][used]  # [P, e]
    split = split_rows(Q, qb, K, p_idx, unit, len(units), kb, w, tabs.scale)
    k_len = split.dK.norm(dim=-1)  # [k, U]
    top = _top_pairs(Q[None], split.dK, Q.norm(dim=-1)[None], k_len, tabs.scale, min(top_pairs, mq * len(units)),
                     screen, per=len(keys))
    names_q = tabs.names[t]
    rep = _representatives(unit, len(units), used[p_idx], ks, w[:, p_idx].abs() * K.norm(dim=-1)[None]).tolist()
    pos_of, r_of = used[p_idx].tolist(), r_idx.tolist()
    sums = (split.pairs_total.tolist(), split.query_bias_x_keys.tolist(), split.position.tolist())
    q_top = split.query_marginals.abs().topk(min(top_pairs, mq), dim=1).indices
    k_top = split.key_marginals.abs().topk(min(top_pairs, len(units)), dim=1).indices
    q_top_v = split.query_marginals.gather(1, q_top).tolist()
    k_top_v = split.key_marginals.gather(1, k_top).tolist()
    # each key's raw score: the query (nodes and bias) . the key (its nodes and bias), [k]
    scores = ((tabs.parts[row, ks].sum(1) + tabs.bias[row, ks]) @ (Q.sum(0) + qb) * tabs.scale).tolist()
    ref_pos = ref_pos.tolist()
    out = []
    for j, (q_j, k_j) in enumerate(zip(q_top.tolist(), k_top.tolist())):
        name = lambda u, j=j: tabs.names[pos_of[rep[j][u]]][r_of[rep[j][u]]]  # noqa: E731
        pt, qbk, pos = sums[0][j], sums[1][j], sums[2][j]
        diff = pt + qbk + pos
        out.append(QKContrast(
            reference=reference, reference_pos=ref_pos[j], reference_score=scores[j] - diff, difference=diff,
            pairs=[QKPair(names_q[a], name(b), v) for a, b, v in zip(*(x[j] for x in top)) if v != 0],
            pairs_total=pt, query_bias_x_keys=qbk, position=pos,
            query_marginals=list(zip((names_q[a] for a in q_j), q_top_v[j])),
            key_marginals=list(zip((name(b) for b in k_j), k_top_v[j]))))
    return out


def _representatives(unit: torch.Tensor, n_units: int, pos: torch.Tensor, keys: torch.Tensor,
                     strength: torch.Tensor) -> torch.Tensor:
    """[k, U]: the row that names each unit in contrast j: its row at key position keys[j] if it has one
    there, else its row adding most to its sum (``strength`` [k, R]); unit [R], pos [R] the rows'."""
    rank = strength + (pos[None] == keys[:, None]) * (strength.max() + 1)  # [k, R]; rows at s first
    idx = unit[None].expand_as(rank)
    best = rank.new_full((len(keys), n_units), -1.0).scatter_reduce(1, idx, rank, "amax")
    rows = torch.arange(len(unit), device=unit.device)[None].expand_as(rank)
    hit = torch.where(rank == best.gather(1, idx), rows, -1)
    return torch.full_like(best, -1, dtype=torch.long).scatter_reduce(1, idx, hit, "amax")


def describe(entry, k: int = 3) -> list[str]:
    """Plain-text lines for one explained key (a `QKEntry`): its raw split, then why it wins (`QKContrast`)."""
    e, c = entry, entry.contrast
    lines = [f"key pos {e.key_pos}: attention {e.attention:.3f}, score {e.score:+.3f} = pairs {e.pairs_total:+.3f} "
             f"+ query bias x keys {e.query_bias_x_keys:+.3f} + queries x key bias {e.queries_x_key_bias:+.3f} "
             f"+ bias x bias {e.bias_x_bias:+.3f}"]
    if c is None:
        return lines + ["  (the only key: nothing to contrast)"]
    ref = "the other keys' attention-weighted mean" if c.reference == "mean" else f"runner-up key pos {c.reference_pos}"
    lines.append(f"  vs {ref} (score {c.reference_score:+.3f}): difference {c.difference:+.3f} = pairs "
                 f"{c.pairs_total:+.3f} + query bias x keys {c.query_bias_x_keys:+.3f} + position {c.position:+.3f}")
    share = lambda v: f" ({v / c.difference:+.0%})" if c.difference else ""  # noqa: E731
    lines.append("    top pairs: " + ", ".join(f"{p.query} x {p.key} {p.weight:+.4f}{share(p.weight)}" for p in c.pairs[:k]))
    lines.append("    key units: " + ", ".join(f"{u} {v:+.4f}{share(v)}" for u, v in c.key_marginals[:k]))
    lines.append("    query nodes: " + ", ".join(f"{u} {v:+.4f}{share(v)}" for u, v in c.query_marginals[:k]))
    return lines
