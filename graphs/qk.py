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

from .graph import Edge, Node


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

    def rows(self, p: int) -> list[int | None]:
        """Node row of each table index at position p (None for padding, 'bias' for the last)."""
        ids = self.node_ids[p]
        return ids + [None] * (self.M - 1 - len(ids)) + ["bias"]


def qk_attribution(lin, nodes: list[Node], sources: dict, head_rows: list[int], top_keys: int = 3,
                   top_pairs: int = 8) -> list[Edge]:
    """QK edges for the Lorsa head nodes ``head_rows``; also fills each head's ``extra['qk']``.

    The tables of one layer and query position are computed together, as one batched product over the
    (QK group, key position) combinations that its explained heads need."""
    by_layer_pos: dict[tuple[int, int], list[int]] = {}
    for r in head_rows:
        by_layer_pos.setdefault((nodes[r].layer, nodes[r].pos), []).append(r)
    edges: list[Edge] = []
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
        for r in rows:
            head = nodes[r]
            g = head.index // hpg
            explained = []
            for s in wanted[g]:
                info = dict(infos[(g, s)], key_pos=s, attention=float(pattern[g, t, s]))
                explained.append(info)
                for q_id, k_id, val in info["pairs"]:
                    edges.append(Edge(q_id, head.id, val, "qk", {"query": q_id, "key": k_id, "key_pos": s,
                                                               "attention": info["attention"]}))
            head.extra["qk"] = explained
    return edges


def _explain_batch(tabs: QKTables, nodes: list[Node], t: int, combos: list[tuple[int, int]], top_pairs: int) -> dict:
    """Pair tables for query position t and each (group, key position), with their top pairs and marginals."""
    gs = torch.tensor([g for g, _ in combos])
    ss = torch.tensor([s for _, s in combos])
    tab = torch.bmm(tabs.Q[gs, t], tabs.K[gs, ss].transpose(1, 2)) * tabs.scale  # [P, M, M]
    mq = len(tabs.node_ids[t])
    q_rows = tabs.rows(t)
    out = {}
    for i, (g, s) in enumerate(combos):
        mk = len(tabs.node_ids[s])
        k_rows = tabs.rows(s)
        T = tab[i]
        body = T[:mq, :mk]
        flat = body.reshape(-1)
        top = flat.abs().topk(min(top_pairs, flat.numel())).indices.tolist() if flat.numel() else []
        q_marg = body.sum(1) + T[:mq, -1]
        k_marg = body.sum(0) + T[-1, :mk]
        qi = q_marg.abs().topk(min(top_pairs, mq)).indices.tolist() if mq else []
        ki = k_marg.abs().topk(min(top_pairs, mk)).indices.tolist() if mk else []
        pairs_total = float(body.sum())
        q_bias_keys, queries_k_bias, bias_bias = float(T[-1, :mk].sum()), float(T[:mq, -1].sum()), float(T[-1, -1])
        out[(g, s)] = {
            "score": pairs_total + q_bias_keys + queries_k_bias + bias_bias,
            "pairs": [[nodes[q_rows[j // mk]].id, nodes[k_rows[j % mk]].id, float(flat[j])] for j in top],
            "pairs_total": pairs_total,
            "query_bias_x_keys": q_bias_keys,
            "queries_x_key_bias": queries_k_bias,
            "bias_x_bias": bias_bias,
            "query_marginals": [[nodes[q_rows[j]].id, float(q_marg[j])] for j in qi],
            "key_marginals": [[nodes[k_rows[j]].id, float(k_marg[j])] for j in ki],
        }
    return out
