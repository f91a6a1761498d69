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
        lorsa = lin.model.lorsas[layer]
        self.lorsa = lorsa
        a = lin.adapter
        norm = a.attn_norm(layer)
        w_ln = lin._w(norm)
        b_ln = lin._b(norm)
        n, d = lin.n, lin.d
        index = {node.id: i for i, node in enumerate(nodes)}
        read_slot = 2 * layer
        const = torch.zeros(d, device=lorsa.W_Q.device)
        for w in range(read_slot + 1):
            b = lin.slot_bias(w)
            if b is not None:
                const = const + b
        by_pos: list[list[int]] = [[] for _ in range(n)]
        for nid, src in sources.items():
            if src.slot <= read_slot:
                by_pos[src.pos].append(index[nid])
        node_ids = [sorted(ids) for ids in by_pos]  # per position: node rows of the tables
        self.names = [[nodes[i].id for i in ids] for ids in node_ids]  # per position: the tables' node ids
        M = max(len(ids) for ids in node_ids) + 1  # the last row of each table is the bias
        # every node write that this layer reads, normalised (LayerNorm centres, then scales), packed by position
        U = torch.stack([sources[nodes[i].id].vector for ids in node_ids for i in ids]).float()  # [R, d]
        dev = U.device
        pos = torch.tensor([p for p, ids in enumerate(node_ids) for _ in ids], dtype=torch.long, device=dev)
        rank = torch.tensor([r for ids in node_ids for r in range(len(ids))], dtype=torch.long, device=dev)
        sig = lin.rec.layers[layer].ln1_scale.reshape(n, 1)
        X = w_ln * lin._p(U) / sig[pos]
        xc = w_ln * lin._p(const) / sig + (0 if b_ln is None else b_ln)  # [n, d] the constants
        G, e = lorsa.cfg.n_qk, lorsa.cfg.d_qk
        cos, sin = lorsa.rotary(n, dev) if lorsa.cfg.rotary_dim else (None, None)
        # one product for both sides, all groups and all positions: [R, d] x [d, 2 G e]
        W2 = torch.cat([W.float().permute(1, 0, 2).reshape(d, G * e) for W in (lorsa.W_Q, lorsa.W_K)], 1)
        parts = (X @ W2).view(-1, 2, G, e)
        bias = (xc @ W2).view(n, 2, G, e) + torch.stack([lorsa.b_Q, lorsa.b_K]).float()[None]
        if cos is not None:  # rotary is linear: rotate each part at its own position
            parts = _rotate(parts, cos[pos], sin[pos])
            bias = _rotate(bias, cos, sin)
        tables = []
        for side in (0, 1):
            table = torch.zeros(G, n, M, e, device=dev)  # rows past a position's nodes stay 0; the bias is row M-1
            table[:, pos, rank] = parts[:, side].transpose(0, 1)
            table[:, :, M - 1] = bias[:, side].transpose(0, 1)
            tables.append(table)
        self.Q, self.K = tables
        self.M = M
        self.scale = 1 / math.sqrt(e)



def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on x [R, ..., e] with cos, sin [R, rd] (rotate-half layout, whose two halves of cos/sin are equal,
    as ``replacement.models.apply_rotary`` but without building rotate_half(x))."""
    rd = cos.shape[-1]
    h = rd // 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (h,)
    c, s = cos[:, :h].reshape(shape), sin[:, :h].reshape(shape)
    x1, x2 = x[..., :h], x[..., h:rd]
    out = x.clone() if rd < x.shape[-1] else torch.empty_like(x)
    out[..., :h] = x1 * c - x2 * s
    out[..., h:rd] = x2 * c + x1 * s
    return out


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
                   screen: int = 24) -> dict:
    """Pair tables for query position t and each (group, key position): exact sums, marginals and top pairs.

    Sums and marginals need no table: sum_ij q_i.k_j = (sum_i q_i).(sum_j k_j), and a query node's marginal
    is q_i.(sum_j k_j + k_bias).  The top pairs: see ``_top_pairs``."""
    gs = torch.tensor([g for g, _ in combos])
    ss = torch.tensor([s for _, s in combos])
    M = tabs.M
    mq = len(tabs.names[t])
    mk = max(len(tabs.names[s]) for _, s in combos)
    Q, K = tabs.Q[gs, t], tabs.K[gs, ss]  # [P, M, e]; row M-1 is the bias, rows past a position's nodes are 0
    Qn, Kn, qb, kb = Q[:, :mq], K[:, :mk], Q[:, M - 1], K[:, M - 1]
    c = tabs.scale
    qsum, ksum = Qn.sum(1), Kn.sum(1)
    pairs_total = (qsum * ksum).sum(-1) * c
    q_bias_keys, queries_k_bias, bias_bias = (qb * ksum).sum(-1) * c, (qsum * kb).sum(-1) * c, (qb * kb).sum(-1) * c
    q_marg = torch.einsum("pme,pe->pm", Qn, ksum + kb) * c
    k_marg = torch.einsum("pme,pe->pm", Kn, qsum + qb) * c
    q_idx, k_idx, vals = _top_pairs(Qn, Kn, c, min(top_pairs, mq * mk), screen)
    q_top = q_marg.abs().topk(min(top_pairs, mq), dim=1).indices
    k_top = k_marg.abs().topk(min(top_pairs, mk), dim=1).indices
    q_top_v, k_top_v = torch.gather(q_marg, 1, q_top).tolist(), torch.gather(k_marg, 1, k_top).tolist()
    q_top, k_top = q_top.tolist(), k_top.tolist()
    sums = torch.stack([pairs_total, q_bias_keys, queries_k_bias, bias_bias], 1).tolist()
    q_names, k_names = tabs.names[t], tabs.names
    out = {}
    for i, (g, s) in enumerate(combos):
        kn = k_names[s]
        pt, qbk, qkb, bb = sums[i]
        out[(g, s)] = {
            "score": pt + qbk + qkb + bb,
            "pairs": [[q_names[a], kn[b], v] for a, b, v in zip(q_idx[i], k_idx[i], vals[i]) if b < len(kn) and v != 0],
            "pairs_total": pt,
            "query_bias_x_keys": qbk,
            "queries_x_key_bias": qkb,
            "bias_x_bias": bb,
            "query_marginals": [[q_names[j], v] for j, v in zip(q_top[i], q_top_v[i])],
            "key_marginals": [[kn[j], v] for j, v in zip(k_top[i], k_top_v[i]) if j < len(kn)],
        }
    return out


def _top_pairs(Qn: torch.Tensor, Kn: torch.Tensor, c: float, k: int, screen: int):
    """The k largest |q_i . k_j| c of each table, exactly, without building most of the tables.

    Qn [P, mq, e], Kn [P, mk, e].  The rows of the ``screen`` longest query vectors and the columns of the
    ``screen`` longest key vectors are computed in full; every pair left out has |q_i . k_j| <= |q_i| |k_j|,
    at most the product of the (screen+1)-th longest on each side.  Where the k-th best pair found reaches
    that bound the answer is exact; the other tables go again with a 4x wider screen (once the screen covers
    a side, the table is complete and the bound is 0).  Returns (query index, key index, value) lists per table."""
    P, mq, mk = Qn.shape[0], Qn.shape[1], Kn.shape[1]
    R, Rk = min(screen, mq), min(screen, mk)
    qn, kn = Qn.norm(dim=-1), Kn.norm(dim=-1)
    qv, qi = qn.topk(min(R + 1, mq), dim=1)
    kv, ki = kn.topk(min(Rk + 1, mk), dim=1)
    bound = (qv[:, R] if mq > R else qv.new_zeros(P)) * (kv[:, Rk] if mk > Rk else kv.new_zeros(P)) * c
    qi, ki = qi[:, :R], ki[:, :Rk]
    e = Qn.shape[-1]
    rows = torch.bmm(torch.gather(Qn, 1, qi[..., None].expand(-1, -1, e)), Kn.transpose(1, 2)) * c  # [P, R, mk]
    cols = torch.bmm(Qn, torch.gather(Kn, 1, ki[..., None].expand(-1, -1, e)).transpose(1, 2)) * c  # [P, mq, Rk]
    cols.scatter_(1, qi[..., None].expand(-1, -1, Rk), 0.0)  # those pairs are already in rows
    cand = torch.cat([rows.flatten(1), cols.flatten(1)], 1)
    top = cand.abs().topk(k, dim=1)
    vals = torch.gather(cand, 1, top.indices)
    in_rows = top.indices < R * mk
    j = top.indices - R * mk
    q_idx = torch.where(in_rows, torch.gather(qi, 1, (top.indices // mk).clamp(max=R - 1)), j.clamp(min=0) // Rk)
    k_idx = torch.where(in_rows, top.indices % mk, torch.gather(ki, 1, (j.clamp(min=0) % Rk)))
    redo = (top.values[:, -1] < bound).nonzero().squeeze(1)
    if len(redo):  # tables the screen could not settle (so it covers neither side yet): a wider screen
        q2, k2, v2 = _top_pairs(Qn[redo], Kn[redo], c, k, screen * 4)
        q_idx[redo], k_idx[redo] = q_idx.new_tensor(q2), k_idx.new_tensor(k2)
        vals[redo] = vals.new_tensor(v2)
    return q_idx.tolist(), k_idx.tolist(), vals.tolist()
