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
    mean) from one query's attention row ``attention`` [t+1] (t >= 1) and its explained keys ``keys`` [k]
    (or for B queries at once: attention [B, t+1], keys [B, k] -> w [B, k, t+1], positions [B, k]).
    ``mean``: w = onehot(s) - (A off s, renormalised; uniform off s where it sums below 1e-6);
    ``runner_up``: w = onehot(s) - onehot(r), r the strongest key other than s."""
    if reference not in CONTRAST_REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(CONTRAST_REFERENCES)}, not {reference!r}")
    n = attention.shape[-1]
    onehot = torch.nn.functional.one_hot(keys, n).to(attention.dtype)  # [..., k, t+1]
    if reference == "mean":
        rest = attention[..., None, :] * (1 - onehot)  # [..., k, t+1]
        total = rest.sum(-1, keepdim=True)
        c = torch.where(total > 1e-6, rest / total.clamp(min=1e-30), (1 - onehot) / (n - 1))
        return onehot - c, torch.full_like(keys, -1)
    others = attention[..., None, :].expand(onehot.shape).masked_fill(onehot.bool(), -1.0)
    runner = others.argmax(-1)  # [..., k]
    return onehot - torch.nn.functional.one_hot(runner, n).to(attention.dtype), runner


def split_rows(Q: torch.Tensor, qb: torch.Tensor, K: torch.Tensor, row_pos: torch.Tensor, unit: torch.Tensor,
               n_units: int, kb: torch.Tensor, w: torch.Tensor, scale: float) -> ContrastSplit:
    """The exact split of the score differences of one query, for k contrasts at once.

    Q [mq, e]: the query nodes' vectors; qb [e]: the query's constant term.  K [R, e]: the key-side node
    vectors (any key position), row_pos [R] their positions (0..P-1), unit [R] their units (0..n_units-1).
    kb [P, e]: the key's constant term per position.  w [k, P]: the contrast weights per position.
    B queries whose key rows are the same nodes (one query position, several QK groups): a leading [B] on
    Q, qb, K, kb and w (row_pos and unit shared), and on every result."""
    w_rows = w[..., row_pos]  # [(B,) k, R]
    # [(B,) k, U, e]: each unit's rows, weighted, summed
    dK = K.new_zeros(*w.shape[:-1], n_units, K.shape[-1]).index_add_(-2, unit, w_rows[..., None] * K[..., None, :, :])
    dkb = w @ kb  # [(B,) k, e]
    q_sum = Q.sum(-2)  # [(B,) e]
    q_t = q_sum + qb
    dK_sum = dK.sum(-2)  # [(B,) k, e]
    dot = lambda a, b: (a * b[..., None, :]).sum(-1) * scale  # noqa: E731  [(B,) k, e] . [(B,) e] -> [(B,) k]
    return ContrastSplit(
        dK=dK, dkb=dkb,
        pairs_total=dot(dK_sum, q_sum), query_bias_x_keys=dot(dK_sum, qb), position=dot(dkb, q_t),
        query_marginals=(dK_sum + dkb) @ Q.transpose(-1, -2) * scale,  # [(B,) k, mq]
        key_marginals=(dK * q_t[..., None, None, :]).sum(-1) * scale)  # [(B,) k, U]


BATCH_BYTES = 32 << 20  # `explain_queries` takes as many groups at once as keep their weighted key rows under this


def explain_query(tabs, g: int, t: int, keys: list[int], attention: torch.Tensor, reference: str,
                  top_pairs: int, screen: int = 12) -> list[QKContrast | None]:
    """The `QKContrast` of each key position in ``keys`` for QK group ``g`` (the layer's numbering) at query
    ``t``; ``attention`` [t+1]: the group's pattern row.  None where the query has a single key."""
    return explain_queries(tabs, t, [g], [keys], attention[None], reference, top_pairs, screen)[0]


def explain_queries(tabs, t: int, groups: list[int], keys: list[list[int]], attention: torch.Tensor, reference: str,
                    top_pairs: int, screen: int = 12) -> list[list[QKContrast | None]]:
    """`explain_query` for several QK groups at one query position ``t``: ``keys`` [B][k] (k alike),
    ``attention`` [B, >= t+1] their pattern rows.  Groups whose contrasts involve the same key positions
    share the key rows (the nodes at a position are the same for every group) and are split in one batch."""
    if t == 0:
        return [[None] * len(k) for k in keys]
    dev = tabs.parts.device
    ks = torch.tensor(keys, device=dev)  # [B, k]
    w, ref_pos = reference_weights(attention[:, : t + 1].float(), ks, reference)  # [B, k, t+1]
    enters = (w != 0).any(1)  # [B, t+1]: the key positions each group's contrasts involve
    batches: dict[tuple, list[int]] = {}
    for b, row in enumerate(enters.tolist()):
        batches.setdefault(tuple(row), []).append(b)
    out: list = [None] * len(groups)
    for same in batches.values():
        used = enters[same[0]].nonzero().squeeze(1)  # [P]
        n_rows = int((tabs.groups[used] >= 0).sum())
        per_group = ks.shape[1] * n_rows * tabs.parts.shape[-1] * 4  # bytes of its weighted key rows [k, R, e]
        step = max(1, BATCH_BYTES // max(per_group, 1))
        for i in range(0, len(same), step):
            bs = same[i : i + step]
            idx = torch.tensor(bs, device=dev)
            for b, why in zip(bs, _contrast_batch(tabs, t, torch.tensor([groups[b] for b in bs], device=dev), ks[idx],
                                                  w[idx], ref_pos[idx], used, reference, top_pairs, screen)):
                out[b] = why
    return out


def _contrast_batch(tabs, t: int, gs: torch.Tensor, ks: torch.Tensor, w: torch.Tensor, ref_pos: torch.Tensor,
                    used: torch.Tensor, reference: str, top_pairs: int, screen: int) -> list[list[QKContrast]]:
    """The contrasts of B groups ``gs`` [B] at query t whose weights w [B, k, t+1] are nonzero at the same key
    positions ``used`` [P]; ks [B, k] their explained keys, ref_pos [B, k] their reference positions."""
    from .qk import _top_pairs

    B, k = ks.shape
    w = w[..., used]  # [B, k, P]
    mq = len(tabs.names[t])
    ts = gs.new_full((B,), t)
    Q = tabs.side(0, gs, ts, mq)  # [B, mq, e]
    qb = tabs.side_bias(0, gs, ts)  # [B, e]
    rows = tabs.G + tabs._row(gs)  # [B] the groups' key sides in the tables
    groups = tabs.groups[used]  # [P, M]: each row's unit, the same for every QK group
    real = groups >= 0
    p_idx, r_idx = real.nonzero(as_tuple=True)  # rows: position index into used, row within the position
    K = tabs.parts[rows[:, None], used[p_idx][None], r_idx[None]]  # [B, R, e], gathered without the groups' tables
    units, unit = torch.unique(groups[p_idx, r_idx], return_inverse=True)
    U = len(units)
    kb = tabs.bias[rows[:, None], used[None]]  # [B, P, e]
    split = split_rows(Q, qb, K, p_idx, unit, U, kb, w, tabs.scale)
    dK = split.dK.reshape(B * k, U, -1)  # [B k, U, e]
    top = _top_pairs(Q, dK, Q.norm(dim=-1), dK.norm(dim=-1), tabs.scale, min(top_pairs, mq * U), screen, per=k)
    names_q = tabs.names[t]
    q_t = Q.sum(1) + qb  # [B, e]
    # each row's part of its unit's key marginal, |w_p q_t . k_row| [B k, R]: a unit is named where it gives most
    strength = (w[..., p_idx] * (K @ q_t[:, :, None]).transpose(-1, -2)).abs().reshape(B * k, -1)
    rep = _representatives(unit, U, strength).tolist()
    pos_of, r_of = used[p_idx].tolist(), r_idx.tolist()
    sums = (split.pairs_total.flatten().tolist(), split.query_bias_x_keys.flatten().tolist(),
            split.position.flatten().tolist())
    qm, km = split.query_marginals.reshape(B * k, mq), split.key_marginals.reshape(B * k, U)
    q_top = qm.abs().topk(min(top_pairs, mq), dim=1).indices
    k_top = km.abs().topk(min(top_pairs, U), dim=1).indices
    q_top_v, k_top_v = qm.gather(1, q_top).tolist(), km.gather(1, k_top).tolist()
    # each key's raw score: the query (nodes and bias) . the key (its nodes and bias), [B k]
    key_vec = tabs.parts[rows[:, None], ks].sum(2) + tabs.bias[rows[:, None], ks]  # [B, k, e]
    scores = ((key_vec * q_t[:, None]).sum(-1) * tabs.scale).flatten().tolist()
    ref_pos = ref_pos.flatten().tolist()
    out = []
    for j, (q_j, k_j) in enumerate(zip(q_top.tolist(), k_top.tolist())):  # j = b k + key slot
        name = lambda u, j=j: tabs.names[pos_of[rep[j][u]]][r_of[rep[j][u]]]  # noqa: E731
        pt, qbk, pos = sums[0][j], sums[1][j], sums[2][j]
        diff = pt + qbk + pos
        out.append(QKContrast(
            reference=reference, reference_pos=ref_pos[j], reference_score=scores[j] - diff, difference=diff,
            pairs=[QKPair(names_q[a], name(b), v) for a, b, v in zip(*(x[j] for x in top)) if v != 0],
            pairs_total=pt, query_bias_x_keys=qbk, position=pos,
            query_marginals=list(zip((names_q[a] for a in q_j), q_top_v[j])),
            key_marginals=list(zip((name(b) for b in k_j), k_top_v[j]))))
    return [out[b * k: (b + 1) * k] for b in range(B)]


def _representatives(unit: torch.Tensor, n_units: int, strength: torch.Tensor) -> torch.Tensor:
    """[k, U]: the row that names each unit in contrast j: the row giving the largest part of the unit's key
    marginal (``strength`` [k, R], |w_p q_t . k_row|); unit [R] the rows' units.  A unit present at the explained
    key and at the reference is named at whichever gives more of its term: for a key that loses to the
    reference, often the reference's position (the unit adds there, so the key lacks it)."""
    idx = unit[None].expand_as(strength)
    best = strength.new_full((strength.shape[0], n_units), -1.0).scatter_reduce(1, idx, strength, "amax")
    rows = torch.arange(len(unit), device=unit.device)[None].expand_as(strength)
    hit = torch.where(strength == best.gather(1, idx), rows, -1)
    return torch.full_like(best, -1, dtype=torch.long).scatter_reduce(1, idx, hit, "amax")


def describe(entry, k: int = 3) -> list[str]:
    """Plain-text lines for one explained key (a `QKEntry`): its raw split, then why it wins (`QKContrast`)."""
    e, c = entry, entry.contrast
    lines = [f"key pos {e.key_pos}: attention {e.attention:.3f}, score {e.score:+.3f} = pairs {e.pairs_total:+.3f} "
             f"+ query bias x keys {e.query_bias_x_keys:+.3f} + queries x key bias {e.queries_x_key_bias:+.3f} "
             f"+ bias x bias {e.bias_x_bias:+.3f}"]
    if c is None:
        return lines + ["  (the only key: nothing to contrast)"]
    return lines + ["  " + line for line in describe_contrast(c, k)]


def describe_contrast(c: QKContrast, k: int = 3) -> list[str]:
    """Plain-text lines for why a key wins (a `QKContrast`: a head's, or a family's summed, `family_contrast`):
    the difference's split, then its top pairs, key units and query nodes."""
    ref = ("the other keys' attention-weighted mean" if c.reference == "mean" else
           f"runner-up key pos {c.reference_pos}" if c.reference_pos >= 0 else "the runner-up keys")
    # shares of the difference only where its terms do not cancel (else a pair would show as +700% of it)
    whole = abs(c.pairs_total) + abs(c.query_bias_x_keys) + abs(c.position)
    shared = c.difference != 0 and whole <= 2 * abs(c.difference)
    lines = [f"vs {ref} (score {c.reference_score:+.3f}): difference {c.difference:+.3f} = pairs "
             f"{c.pairs_total:+.3f} + query bias x keys {c.query_bias_x_keys:+.3f} + position {c.position:+.3f}"
             + ("" if shared or not c.difference else "; the terms cancel, so no shares of it are given")]
    share = lambda v: f" ({v / c.difference:+.0%})" if shared else ""  # noqa: E731
    lines.append("  top pairs: " + ", ".join(f"{p.query} x {p.key} {p.weight:+.4f}{share(p.weight)}" for p in c.pairs[:k]))
    lines.append("  key units (each summed over the keys with the contrast's weights, named where most of it comes "
                 "from): " + ", ".join(f"{u} {v:+.4f}{share(v)}" for u, v in c.key_marginals[:k]))
    lines.append("  query nodes: " + ", ".join(f"{u} {v:+.4f}{share(v)}" for u, v in c.query_marginals[:k]))
    return lines
