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

    def table(self, group: int, t: int, s: int) -> torch.Tensor:
        """[M, M] pair contributions (query rows x key columns; last row/column = bias)."""
        return self.Q[group, t] @ self.K[group, s].t() * self.scale

    def rows(self, p: int) -> list[int | None]:
        """Node row of each table index at position p (None for padding, 'bias' for the last)."""
        ids = self.node_ids[p]
        return ids + [None] * (self.M - 1 - len(ids)) + ["bias"]


def qk_attribution(lin, nodes: list[Node], sources: dict, head_rows: list[int], top_keys: int = 3,
                   top_pairs: int = 8) -> list[Edge]:
    """QK edges for the Lorsa head nodes ``head_rows``; also fills each head's ``extra['qk']``."""
    by_layer: dict[int, list[int]] = {}
    for r in head_rows:
        by_layer.setdefault(nodes[r].layer, []).append(r)
    edges: list[Edge] = []
    for L, rows in sorted(by_layer.items()):
        tabs = QKTables(lin, nodes, sources, L)
        hpg = tabs.lorsa.cfg.heads_per_group
        pattern = lin.rec.layers[L].lorsa_pattern  # [G, n, n]
        cache: dict[tuple[int, int, int], dict] = {}
        for r in rows:
            head = nodes[r]
            g, t = head.index // hpg, head.pos
            A = pattern[g, t, : t + 1]
            keys = A.topk(min(top_keys, t + 1)).indices.tolist()
            explained = []
            for s in keys:
                key = (g, t, s)
                if key not in cache:
                    cache[key] = _explain(tabs, nodes, g, t, s, top_pairs)
                info = dict(cache[key], key_pos=s, attention=float(A[s]))
                explained.append(info)
                for q_id, k_id, val in info["pairs"]:
                    edges.append(Edge(q_id, head.id, val, "qk", {"query": q_id, "key": k_id, "key_pos": s,
                                                               "attention": float(A[s])}))
            head.extra["qk"] = explained
    return edges


def _explain(tabs: QKTables, nodes: list[Node], g: int, t: int, s: int, top_pairs: int) -> dict:
    tab = tabs.table(g, t, s)
    q_rows, k_rows = tabs.rows(t), tabs.rows(s)
    mq = len(tabs.node_ids[t])
    mk = len(tabs.node_ids[s])
    body = tab[:mq, :mk]
    flat = body.flatten()
    top = flat.abs().topk(min(top_pairs, flat.numel())).indices if flat.numel() else torch.zeros(0, dtype=torch.long)
    pairs = [[nodes[q_rows[i // mk]].id, nodes[k_rows[i % mk]].id, float(flat[i])] for i in top.tolist()]
    q_marg = body.sum(1) + tab[:mq, -1]
    k_marg = body.sum(0) + tab[-1, :mk]
    qi = q_marg.abs().topk(min(top_pairs, mq)).indices.tolist() if mq else []
    ki = k_marg.abs().topk(min(top_pairs, mk)).indices.tolist() if mk else []
    return {
        "score": float(tab[:mq, :mk].sum() + tab[:mq, -1].sum() + tab[-1, :mk].sum() + tab[-1, -1]),
        "pairs": pairs,
        "pairs_total": float(body.sum()),
        "query_bias_x_keys": float(tab[-1, :mk].sum()),
        "queries_x_key_bias": float(tab[:mq, -1].sum()),
        "bias_x_bias": float(tab[-1, -1]),
        "query_marginals": [[nodes[q_rows[i]].id, float(q_marg[i])] for i in qi],
        "key_marginals": [[nodes[k_rows[i]].id, float(k_marg[i])] for i in ki],
    }
