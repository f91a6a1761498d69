"""Linearised QK feature-pair attribution for Lorsa heads.

With the norm scales frozen, what a Lorsa QK group of layer L reads at position p is the sum of the writes
u_i of the nodes at p (slots <= 2L: embedding, earlier heads, features, errors) plus constant biases c_p,
normalised.  Q and K are affine in it, and the rotary map is linear, so

    q_t = sum_i q_i + q_bias,   q_i = R_t W_Q^T P(w_ln * u_i) / sigma_t,   q_bias = R_t (W_Q^T x_c + b_Q)
    k_s = sum_j k_j + k_bias    (likewise at the key position s)

and the pre-softmax score splits exactly into pairs:

    score(t, s) = sum_ij q_i . k_j / sqrt(d_qk) + sum_i q_i . k_bias / sqrt(d_qk)
                + sum_j q_bias . k_j / sqrt(d_qk) + q_bias . k_bias / sqrt(d_qk)

The pair table of one (group, query, key) is one product of two small matrices.  For each explained head
the strongest pairs of its top key positions become ``qk`` edges (query-side node, key-side node) -> head.
"""
from __future__ import annotations

import math

import torch

from .graph import Node


class QKTables:
    """Per layer: each position's query-side and key-side contributions of every node, per QK group."""

    def __init__(self, lin, nodes: list[Node], sources: dict, layer: int):
        self.lin, self.L = lin, layer
        lorsa = lin.model.lorsas[layer]
        self.lorsa = lorsa
        a = lin.adapter
        norm = a.attn_norm(layer)
        w_ln = lin._w(norm)
        b_ln = lin._b(norm)
        n, d = lin.n, lin.d
        index = {node.id: i for i, node in enumerate(nodes)}
        read_slot = 2 * layer
        const = torch.zeros(d)
        for w in range(read_slot + 1):
            b = lin.slot_bias(w)
            if b is not None:
                const = const + b
        self.node_ids: list[list[int]] = []  # per position: node rows (the last row of each table is the bias)
        rows_per_pos = []
        for p in range(n):
            ids = [index[nid] for nid, s in sources.items() if s.pos == p and s.slot <= read_slot]
            U = torch.stack([sources[nodes[i].id].vector for i in ids]) if ids else torch.zeros(0, d)
            sig = lin.rec.layers[layer].ln1_scale[p]
            X = w_ln * lin._p(U) / sig  # node parts of the normalised input (LayerNorm centres, then scales)
            xc = w_ln * lin._p(const) / sig + (0 if b_ln is None else b_ln)
            rows_per_pos.append((X, xc))
            self.node_ids.append(ids)
        M = max(len(x) for x, _ in rows_per_pos) + 1
        G, e = lorsa.cfg.n_qk, lorsa.cfg.d_qk
        self.Q = torch.zeros(G, n, M, e)
        self.K = torch.zeros(G, n, M, e)
        cos, sin = lorsa.rotary(n) if lorsa.cfg.rotary_dim else (None, None)
        from replacement.models import apply_rotary

        for p, (X, xc) in enumerate(rows_per_pos):
            m = len(X)
            for W, b, out in ((lorsa.W_Q, lorsa.b_Q, self.Q), (lorsa.W_K, lorsa.b_K, self.K)):
                parts = torch.einsum("md,gde->gme", X, W.float())
                bias = torch.einsum("d,gde->ge", xc, W.float()) + b.float()
                block = torch.cat([parts, bias[:, None]], dim=1)  # [G, m+1, e]
                if cos is not None:
                    block = apply_rotary(block, cos[p], sin[p])
                out[:, p, :m] = block[:, :m]
                out[:, p, M - 1] = block[:, m]  # the bias row is always the last
        self.M = M
        self.scale = 1 / math.sqrt(e)

    def rows(self, p: int) -> list[int]:
        """Node row of each table index < (number of nodes at p); higher indices are padding or the bias."""
        return self.node_ids[p]


def qk_attribution(lin, nodes: list[Node], sources: dict, head_rows: list[int], top_keys: int = 3,
                   top_pairs: int = 8) -> None:
    """Explain the Lorsa head nodes ``head_rows``: each gets ``extra['qk']``, one entry per explained key
    position (score, attention, top pairs, marginals, bias terms).  Heads of one QK group share their
    pattern, so at one query position they share these entries (one object, not copies).

    The tables of one layer and query position are computed together, as one batched product over the
    (QK group, key position) combinations that its explained heads need."""
    by_layer_pos: dict[tuple[int, int], list[int]] = {}
    for r in head_rows:
        by_layer_pos.setdefault((nodes[r].layer, nodes[r].pos), []).append(r)
    tables: dict[int, QKTables] = {}
    for (L, t), rows in sorted(by_layer_pos.items()):
        if L not in tables:
            tables[L] = QKTables(lin, nodes, sources, L)
        tabs = tables[L]
        hpg = tabs.lorsa.cfg.heads_per_group
        pattern = lin.rec.layers[L].lorsa_pattern  # [G, n, n]
        wanted: dict[int, list[int]] = {}  # group -> key positions
        for r in rows:
            g = nodes[r].index // hpg
            if g not in wanted:
                wanted[g] = pattern[g, t, : t + 1].topk(min(top_keys, t + 1)).indices.tolist()
        combos = [(g, s) for g, keys in wanted.items() for s in keys]
        infos = _explain_batch(tabs, nodes, t, combos, top_pairs)
        for (g, s), info in infos.items():
            info.update(key_pos=s, attention=float(pattern[g, t, s]))
        for r in rows:
            g = nodes[r].index // hpg
            nodes[r].extra["qk"] = [infos[(g, s)] for s in wanted[g]]


def _explain_batch(tabs: QKTables, nodes: list[Node], t: int, combos: list[tuple[int, int]], top_pairs: int,
                   screen: int = 32) -> dict:
    """Pair tables for query position t and each (group, key position): exact sums, marginals and top pairs.

    Sums and marginals need no table: sum_ij q_i.k_j = (sum_i q_i).(sum_j k_j), and a query node's marginal
    is q_i.(sum_j k_j + k_bias).  The top pairs come from the sub-table of the ``screen`` largest query and
    key vectors, which is provably exact when its k-th largest |pair| is at least the largest bound
    |q_i||k_j| of any pair left out; combinations that fail the test get their full table."""
    gs = torch.tensor([g for g, _ in combos])
    ss = torch.tensor([s for _, s in combos])
    M = tabs.M
    Q, K = tabs.Q[gs, t], tabs.K[gs, ss]  # [P, M, e]; row M-1 is the bias
    Qn, Kn, qb, kb = Q[:, : M - 1], K[:, : M - 1], Q[:, M - 1], K[:, M - 1]
    c = tabs.scale
    qsum, ksum = Qn.sum(1), Kn.sum(1)
    pairs_total = (qsum * ksum).sum(-1) * c
    q_bias_keys, queries_k_bias, bias_bias = (qb * ksum).sum(-1) * c, (qsum * kb).sum(-1) * c, (qb * kb).sum(-1) * c
    q_marg = torch.einsum("pme,pe->pm", Qn, ksum + kb) * c
    k_marg = torch.einsum("pme,pe->pm", Kn, qsum + qb) * c
    # top pairs, screened
    qnorm, knorm = Qn.norm(dim=-1), Kn.norm(dim=-1)  # [P, M-1] (padding rows are 0)
    R = min(screen, M - 1)
    qv, qi = qnorm.topk(R, dim=1)
    kv, ki = knorm.topk(R, dim=1)
    sub = torch.bmm(torch.gather(Q, 1, qi[..., None].expand(-1, -1, Q.shape[-1])),
                    torch.gather(K, 1, ki[..., None].expand(-1, -1, K.shape[-1])).transpose(1, 2)) * c
    kk = min(top_pairs, R * R)
    top_abs, top_flat = sub.abs().flatten(1).topk(kk, dim=1)
    q_out = qnorm.topk(min(R + 1, M - 1), dim=1).values[:, -1] if M - 1 > R else torch.zeros(len(combos))
    k_out = knorm.topk(min(R + 1, M - 1), dim=1).values[:, -1] if M - 1 > R else torch.zeros(len(combos))
    bound = torch.maximum(q_out * kv[:, 0], qv[:, 0] * k_out) * c
    exact = (top_abs[:, -1] >= bound).tolist()
    q_idx = torch.gather(qi, 1, top_flat // R).tolist()
    k_idx = torch.gather(ki, 1, top_flat % R).tolist()
    vals = torch.gather(sub.flatten(1), 1, top_flat).tolist()
    km_ = min(top_pairs, M - 1)
    q_top = q_marg.abs().topk(km_, dim=1).indices
    k_top = k_marg.abs().topk(km_, dim=1).indices
    q_top_v, k_top_v = torch.gather(q_marg, 1, q_top).tolist(), torch.gather(k_marg, 1, k_top).tolist()
    q_top, k_top = q_top.tolist(), k_top.tolist()
    sums = torch.stack([pairs_total, q_bias_keys, queries_k_bias, bias_bias], 1).tolist()
    q_rows = tabs.rows(t)
    mq = len(tabs.node_ids[t])
    out = {}
    for i, (g, s) in enumerate(combos):
        mk = len(tabs.node_ids[s])
        k_rows = tabs.rows(s)
        if exact[i]:
            cand = zip(q_idx[i], k_idx[i], vals[i])
        else:  # the screen could not prove its top pairs: use the full table
            flat = ((Qn[i] @ Kn[i].t()) * c).flatten()
            top = flat.abs().topk(min(top_pairs, flat.numel())).indices
            cand = zip((top // (M - 1)).tolist(), (top % (M - 1)).tolist(), flat[top].tolist())
        pt, qbk, qkb, bb = sums[i]
        out[(g, s)] = {
            "score": pt + qbk + qkb + bb,
            "pairs": [[nodes[q_rows[a]].id, nodes[k_rows[b]].id, v] for a, b, v in cand if a < mq and b < mk and v != 0],
            "pairs_total": pt,
            "query_bias_x_keys": qbk,
            "queries_x_key_bias": qkb,
            "bias_x_bias": bb,
            "query_marginals": [[nodes[q_rows[j]].id, v] for j, v in zip(q_top[i], q_top_v[i]) if j < mq],
            "key_marginals": [[nodes[k_rows[j]].id, v] for j, v in zip(k_top[i], k_top_v[i]) if j < mk],
        }
    return out
