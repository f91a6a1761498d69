"""Linearised QK feature-pair attribution for Lorsa heads.

With the norm scales frozen, what a Lorsa QK group of layer L reads at position p is the sum of the writes
u_i of the nodes at p (slots <= 2L: embedding, earlier heads, features, errors; a cross-layer transcoder
feature's u_i is the sum of its writes into the MLP outputs below layer L) plus constant biases c_p,
normalised (a transcoder skip connection in between passes on a linear map of what it reads: the writes
and constants are taken as they arrive at layer L).  Q and K are affine in it, and the rotary map is linear, so

    q_t = sum_i q_i + q_bias,   q_i = R_t W_Q^T (w_ln * P(u_i)) / sigma_t,   q_bias = R_t (W_Q^T x_c + b_Q)
    k_s = sum_j k_j + k_bias    (likewise at the key position s)

(P: LayerNorm's centring, the identity for RMSNorm; w_ln its weight; x_c what the constants c_p add, normalised)

and the pre-softmax score splits exactly into pairs:

    score(t, s) = sum_ij q_i . k_j / sqrt(d_qk) + sum_i q_i . k_bias / sqrt(d_qk)
                + sum_j q_bias . k_j / sqrt(d_qk) + q_bias . k_bias / sqrt(d_qk)

The pair table of one (group, query, key) is one product of two small matrices.  For each explained head
the strongest pairs of its top key positions become ``qk`` edges (query-side node, key-side node) -> head.
"""
from __future__ import annotations

import math

import torch

from replacement.norms import norm_bias, norm_weight

from .graph import FEATURE_KINDS, NODE_TYPES, Node, QKEntry, QKPair
from .linear import attn_read_slot


class Writes:
    """Every node that writes into the residual stream, as arrays (in node order): its slot and position, and
    its write split as activation x unit vector.  A Lorsa head or transcoder feature writes its activation
    times a fixed vector (w_o, a decoder row), and one unit is often active at several positions, so tables
    take its product with W_Q, W_K once; an embedding or error node is its own unit (activation 1)."""

    def __init__(self, nodes: list[Node], sources: dict):
        rows = [i for i, nd in enumerate(nodes) if nd.id in sources]
        self.names = [nodes[i].id for i in rows]
        srcs = [sources[nodes[i].id] for i in rows]
        dev = srcs[0].vector.device
        self.slot = torch.tensor([s.slot for s in srcs], device=dev)
        self.pos = torch.tensor([s.pos for s in srcs], device=dev)
        is_unit = [nodes[i].type in FEATURE_KINDS for i in rows]
        self.act = torch.tensor([nodes[i].activation if u else 1.0 for i, u in zip(rows, is_unit)], device=dev)
        # unit ids: (kind, layer, index) for Lorsa heads and features, a fresh negative id for the others
        self.unit = torch.tensor([(FEATURE_KINDS.index(nodes[i].type) + 1 << 40) + (nodes[i].layer << 24) + nodes[i].index
                                  if u else -1 - r for r, (i, u) in enumerate(zip(rows, is_unit))], device=dev)
        self.unit_vec = torch.stack([s.vector for s in srcs]).float() / self.act[:, None]  # [N, d]
        # what a node is apart from its position (graphs/contrast.py sums a key unit over positions)
        self.group = torch.tensor([unit_group(nodes[i]) for i in rows], device=dev)
        # a cross-layer transcoder feature's writes into later MLP outputs: [N, m, d] and their slots [N, m]
        m = max(len(s.later) for s in srcs)
        self.later_vec = self.later_slot = None
        if m:
            self.later_vec = torch.zeros(len(srcs), m, self.unit_vec.shape[1], device=dev)
            self.later_slot = torch.full((len(srcs), m), 1 << 30, device=dev)
            for r, s in enumerate(srcs):
                for j, (slot, vec) in enumerate(s.later):
                    self.later_vec[r, j], self.later_slot[r, j] = vec.float() / self.act[r], slot

    def seen_at(self, rows: torch.Tensor, read_slot: int) -> torch.Tensor:
        """[R, d]: the unit vectors of ``rows`` as a read at ``read_slot`` sees them: a cross-layer feature's
        own write plus its writes into the MLP outputs at or below that slot."""
        if self.later_vec is None:
            return self.unit_vec[rows]
        on = (self.later_slot[rows] <= read_slot).float()  # [R, m]
        return self.unit_vec[rows] + torch.einsum("rm,rmd->rd", on, self.later_vec[rows])


def unit_group(node: Node) -> int:
    """One integer per (kind, layer, index): a Lorsa head, a transcoder feature, a token's embedding (its
    token id), a layer's attention or MLP error; equal for the node of one unit at two positions."""
    return (NODE_TYPES.index(node.type) << 40) + ((node.layer + 1) << 24) + (node.index + 1)


class QKTables:
    """One layer: the query-side and key-side contribution of every node it reads, per QK group.

    ``parts`` [2G, n, M, e] holds them (the G query sides, then the G key sides; M rows per position, zero
    after the position's nodes); ``bias`` [2G, n, e] holds the constant terms.  The e coordinates are
    reordered on both sides alike (rotary pairs side by side), which leaves every q . k unchanged and makes
    the rotary map one complex product.  ``groups`` [G] (default: all): the QK groups to tabulate; the
    methods take the layer's own group numbers."""

    def __init__(self, lin, writes: Writes, layer: int, groups: torch.Tensor | None = None):
        lorsa = lin.model.lorsas[layer]
        groups = torch.arange(lorsa.cfg.n_qk) if groups is None else groups.cpu()
        self.local = torch.full((lorsa.cfg.n_qk,), -1, dtype=torch.long)  # the layer's group -> its row here
        self.local[groups] = torch.arange(len(groups))
        self.lorsa = lorsa
        norm = lin.adapter.attn_norm(layer)
        w_ln, b_ln = norm_weight(norm), norm_bias(norm)
        n, d = lin.n, lin.d
        read_slot = attn_read_slot(layer)
        const = lin.read_constants(read_slot)  # [n, d]
        rows, pos, counts, starts = _packed_rows(writes, read_slot, n)
        names = [writes.names[i] for i in rows.tolist()]
        self.names = [names[a : a + m] for a, m in zip(starts, counts.tolist())]  # per position: each row's node
        M = max(1, int(counts.max()))
        # row p M + r of the tables is node r of position p; rows after a position's nodes are zero
        sig = lin.rec.layers[layer].ln1_scale.reshape(n)
        vec, act, row_unit = _row_units(lin, writes, rows, pos, read_slot)
        D = torch.cat([vec, vec.new_zeros(1, d)])  # [units + 1, d]; the last row is padding
        dev = D.device
        slots = pos * M + torch.arange(len(rows), device=dev) - torch.tensor(starts, device=dev)[pos]
        slot_row = torch.full((n * M,), len(D) - 1, device=dev)
        slot_row[slots] = row_unit
        self.groups = torch.full((n * M,), -1, dtype=torch.long, device=dev)  # [n, M] each row's unit_group; -1: none
        self.groups[slots] = writes.group[rows]
        self.groups = self.groups.view(n, M)
        slot_scale = torch.zeros(n * M, device=dev)
        slot_scale[slots] = act / sig[pos]
        xc = w_ln * lin.p(const) / sig[:, None] + (0 if b_ln is None else b_ln)  # [n, d] the constants
        G, e = len(groups), lorsa.cfg.d_qk
        rd = lorsa.cfg.rotary_dim
        perm = _pairs_side_by_side(e, rd)
        W = torch.cat([lorsa.W_Q[groups], lorsa.W_K[groups]]).float()[..., perm]  # [2G, d, e]: queries, then keys
        # both sides, all groups, laid out so that the rows of one (side, group, position) are one block
        per_unit = torch.einsum("ud,gde->gue", w_ln * lin.p(D), W)  # [2G, units + 1, e]
        self.parts = per_unit.index_select(1, slot_row).view(2 * G, n, M, e)
        self.bias = torch.einsum("nd,gde->gne", xc, W) + torch.cat([lorsa.b_Q[groups], lorsa.b_K[groups]]).float()[:, None, perm]
        # scale each row (activation / norm scale), and rotate it at its position: rotary is linear
        slot_scale = slot_scale.view(n, M)
        if rd:
            cos, sin = lorsa.rotary(n, dev)
            rot = torch.complex(cos[:, : rd // 2], sin[:, : rd // 2])  # [n, rd/2]
            _rotate_(self.parts, rot[:, None] * slot_scale[..., None])
            _rotate_(self.bias, rot)
        if rd < e:
            self.parts[..., rd:] *= slot_scale[..., None]
        self.norms = self.parts.norm(dim=-1)  # [2G, n, M], for the top-pair screen
        self.G = G
        self.scale = 1 / math.sqrt(e)

    def side(self, side: int, groups: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """[P, width, e]: the contributions of the nodes at ``positions`` [P] to group ``groups`` [P]."""
        return self.parts[side * self.G + self._row(groups), positions, :width]

    def side_norms(self, side: int, groups: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """[P, width]: the lengths of the vectors of ``side``."""
        return self.norms[side * self.G + self._row(groups), positions, :width]

    def side_bias(self, side: int, groups: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[P, e]: the constant term of group ``groups`` [P] at ``positions`` [P]."""
        return self.bias[side * self.G + self._row(groups), positions]

    def _row(self, groups: torch.Tensor) -> torch.Tensor:
        return self.local[groups.cpu()].to(groups.device)


def _packed_rows(writes: Writes, read_slot: int, n: int):
    """The write rows a layer reading ``read_slot`` sees, packed by position (node order within a position):
    (rows [R], their positions [R], rows per position [n], each position's first row)."""
    sel = (writes.slot <= read_slot).nonzero().squeeze(1)
    rows = sel[torch.argsort(writes.pos[sel], stable=True)]
    pos = writes.pos[rows]
    counts = torch.bincount(pos, minlength=n)
    return rows, pos, counts, (torch.cumsum(counts, 0) - counts).tolist()


def _row_units(lin, writes: Writes, rows: torch.Tensor, pos: torch.Tensor, read_slot: int):
    """(unit vectors [U, d], each row's activation [R], each row's unit [R]): a Lorsa head or feature active at
    several positions is one unit; with a skip connection below, which maps each write by its position's
    norm scale, every row is its own unit (its write as it arrives at ``read_slot``, activation 1)."""
    if lin.skip_layers(read_slot):
        if writes.later_vec is not None:  # foreign.load_specs refuses a CLT beside skip transcoders
            raise ValueError("skip connections with cross-layer transcoder features are not supported")
        vec = writes.unit_vec[rows] * writes.act[rows, None]
        return (lin.through_skips(vec, writes.slot[rows], pos, read_slot), torch.ones_like(writes.act[rows]),
                torch.arange(len(rows), device=rows.device))
    units, row_unit = torch.unique(writes.unit[rows], return_inverse=True)
    first = torch.full((len(units),), len(rows), device=rows.device).scatter_reduce_(
        0, row_unit, torch.arange(len(rows), device=rows.device), "amin")
    return writes.seen_at(rows[first], read_slot), writes.act[rows], row_unit


def _pairs_side_by_side(e: int, rd: int) -> list[int]:
    """A reordering of e coordinates that puts each rotate-half pair (i, i + rd/2) next to each other."""
    h = rd // 2
    return [j for i in range(h) for j in (i, i + h)] + list(range(rd, e))


def _rotate_(x: torch.Tensor, rot: torch.Tensor) -> None:
    """Rotary, in place, on x [..., e] (pairs side by side in the first rd coordinates); rot [..., rd/2] complex
    broadcasts against x's leading dims: each pair (a, b) becomes (a + ib) * rot, as rotate-half's
    (a cos - b sin, b cos + a sin)."""
    h = rot.shape[-1]
    pairs = x[..., : 2 * h].unflatten(-1, (h, 2))
    if x.shape[-1] % 2 == 0:  # a complex view of x itself
        torch.view_as_complex(pairs).mul_(rot)
    else:  # an odd d_qk: no complex view of x's rows, so rotate a copy and write it back
        x[..., : 2 * h] = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * rot).flatten(-2)


def qk_attribution(lin, nodes: list[Node], sources: dict, head_rows: list[int], top_keys: int = 3,
                   top_pairs: int = 8, chunk: int = 64, reference: str | None = "mean") -> None:
    """Explain the Lorsa head nodes ``head_rows``: each gets ``qk``, one `QKEntry` per explained key
    position (score, attention, top pairs, marginals, bias terms, and with ``reference`` ("mean" or
    "runner_up"; None: none) its `QKContrast`, graphs/contrast.py).  Heads of one QK group share their
    pattern, so at one query position they share these entries (one object, not copies).

    The (QK group, query position) pairs of one layer are explained together, ``chunk`` at a time, each
    with its ``top_keys`` strongest key positions, in batched products; their contrasts, the groups of one
    query position together (`graphs.contrast.explain_queries`)."""
    from .contrast import explain_queries

    by_layer: dict[int, list[int]] = {}
    for r in head_rows:
        by_layer.setdefault(nodes[r].layer, []).append(r)
    writes = Writes(nodes, sources)
    for L, rows in sorted(by_layer.items()):
        hpg = lin.model.lorsas[L].cfg.heads_per_group
        tabs = QKTables(lin, writes, L, torch.tensor(sorted({nodes[r].index // hpg for r in rows})))
        pattern = lin.rec.layers[L].lorsa_pattern  # [G, n, n], zero above the diagonal
        n = pattern.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=pattern.device).triu(1)
        best = pattern.masked_fill(future, -1.0).topk(min(top_keys, n), dim=-1)  # [G, n, k]; the first t+1 are real
        queries = sorted({(nodes[r].index // hpg, nodes[r].pos) for r in rows})
        infos: dict[tuple[int, int], list[QKEntry]] = {}
        for i in range(0, len(queries), chunk):
            infos.update(_explain_batch(tabs, queries[i : i + chunk], best.indices, best.values, top_pairs))
        if reference is not None:  # the groups of one query position together (as memory allows)
            by_pos: dict[int, list[int]] = {}
            for g, t in infos:
                by_pos.setdefault(t, []).append(g)
            for t, gs in by_pos.items():
                why = explain_queries(tabs, t, gs, [[e.key_pos for e in infos[(g, t)]] for g in gs], pattern[gs, t],
                                      reference, top_pairs)
                for g, contrasts in zip(gs, why):
                    for e, c in zip(infos[(g, t)], contrasts):
                        e.contrast = c
        for r in rows:
            nodes[r].qk = infos[(nodes[r].index // hpg, nodes[r].pos)]


def _explain_batch(tabs: QKTables, queries: list[tuple[int, int]], keys: torch.Tensor, attention: torch.Tensor,
                   top_pairs: int, screen: int = 12) -> dict[tuple[int, int], list[QKEntry]]:
    """For each (group g, query position t) and each of its key positions s = keys[g, t, :] (attention
    weights ``attention[g, t, :]``): the exact score split, marginals and top pairs of the (g, t, s) table.

    Sums and marginals need no table: sum_ij q_i.k_j = (sum_i q_i).(sum_j k_j), and a query node's marginal
    is q_i.(sum_j k_j + k_bias).  The top pairs: see ``_top_pairs``.  The k tables of one (g, t) share its
    query rows, which are gathered once."""
    dev = tabs.parts.device
    gq, tq = (torch.tensor(c, device=dev) for c in zip(*queries))  # [U]
    k = keys.shape[-1]
    real = torch.arange(k, device=dev)[None] <= tq[:, None]  # [U, k]: t < k-1 has only t+1 key positions
    ks = torch.where(real, keys[gq, tq], tq[:, None])  # the others stand in for a real one, then are dropped
    gp, sp = gq.repeat_interleave(k), ks.flatten()  # [P = U k] one table per (query, key slot)
    mq = max(len(tabs.names[t]) for _, t in queries)
    mk = max(len(tabs.names[s]) for s in sp.tolist())
    # [U, mq, e] and [P, mk, e], zero after a position's nodes
    Q, Kn = tabs.side(0, gq, tq, mq), tabs.side(1, gp, sp, mk)
    sums, q_marg, k_marg = _score_split(tabs, Q, Kn, gq, tq, gp, sp, k)
    top = _top_pairs(Q, Kn, tabs.side_norms(0, gq, tq, mq), tabs.side_norms(1, gp, sp, mk), tabs.scale,
                     min(top_pairs, mq * mk), screen, per=k)
    q_top = q_marg.abs().topk(min(top_pairs, mq), dim=1).indices
    k_top = k_marg.abs().topk(min(top_pairs, mk), dim=1).indices
    marginals = (q_top.tolist(), torch.gather(q_marg, 1, q_top).tolist(), k_top.tolist(),
                 torch.gather(k_marg, 1, k_top).tolist())
    tables = (ks.tolist(), attention[gq, tq].tolist(), real.tolist(), sums.tolist())
    return {(g, t): _entries(tabs.names[t], tabs.names, u * k, tables, top, marginals, u)
            for u, (g, t) in enumerate(queries)}


def _score_split(tabs: QKTables, Q: torch.Tensor, Kn: torch.Tensor, gq, tq, gp, sp, k: int):
    """The score of each table split four ways ([P, 4]: pairs, query bias x keys, queries x key bias, bias x
    bias) and the marginals of its query nodes [P, mq] and key nodes [P, mk]; Q [U, mq, e], Kn [P = U k, mk, e]."""
    c = tabs.scale
    qb, kb = tabs.side_bias(0, gq, tq), tabs.side_bias(1, gp, sp)  # [U, e], [P, e]
    qsum, ksum = Q.sum(1).repeat_interleave(k, 0), Kn.sum(1)  # [P, e]
    qb_p = qb.repeat_interleave(k, 0)
    sums = torch.stack([(qsum * ksum).sum(-1), (qb_p * ksum).sum(-1), (qsum * kb).sum(-1), (qb_p * kb).sum(-1)], 1) * c
    q_marg = torch.bmm(Q, (ksum + kb).view(len(Q), k, -1).transpose(1, 2)).transpose(1, 2).reshape(-1, Q.shape[1]) * c
    k_marg = torch.bmm(Kn, (qsum + qb_p)[..., None])[..., 0] * c  # [P, mk]
    return sums, q_marg, k_marg


def _entries(qn: list[str], names: list[list[str]], first: int, tables, top, marginals, u: int) -> list[QKEntry]:
    """The QKEntry of each real key slot of query ``u`` (its tables are rows first .. first + k - 1)."""
    key_pos, attn, real, sums = tables
    q_idx, k_idx, vals = top
    q_top, q_top_v, k_top, k_top_v = marginals
    entries = []
    for j, is_real in enumerate(real[u]):
        if not is_real:
            continue
        i, s = first + j, key_pos[u][j]
        kn = names[s]
        pt, qbk, qkb, bb = sums[i]
        entries.append(QKEntry(
            key_pos=s, attention=attn[u][j], score=pt + qbk + qkb + bb,
            pairs=[QKPair(qn[a], kn[b], v) for a, b, v in zip(q_idx[i], k_idx[i], vals[i])
                   if a < len(qn) and b < len(kn) and v != 0],
            pairs_total=pt, query_bias_x_keys=qbk, queries_x_key_bias=qkb, bias_x_bias=bb,
            query_marginals=[(qn[a], v) for a, v in zip(q_top[i], q_top_v[i]) if a < len(qn)],
            key_marginals=[(kn[b], v) for b, v in zip(k_top[i], k_top_v[i]) if b < len(kn)]))
    return entries


def _top_pairs(Q: torch.Tensor, Kn: torch.Tensor, q_len: torch.Tensor, k_len: torch.Tensor, c: float, k: int,
               screen: int, per: int = 1):
    """The k largest |q_i . k_j| c of each table, exactly, without building most of the tables.

    Kn [P, mk, e]; Q [P / per, mq, e]: table p pairs Q[p // per] with Kn[p]; q_len, k_len: their vectors'
    lengths.  The rows of the ``screen`` longest query vectors and the columns of the ``screen`` longest key
    vectors are computed in full; every pair left out has |q_i . k_j| <= |q_i| |k_j|, at most the product of
    the (screen+1)-th longest on each side.  Where the k-th best pair found reaches that bound the answer is
    exact; the other tables go again with a 2x wider screen (once the screen covers a side, the table is
    complete and the bound is 0).  Returns (query index, key index, value) lists per table."""
    P, mq, mk, e = Kn.shape[0], Q.shape[1], Kn.shape[1], Kn.shape[2]
    R, Rk = min(screen, mq), min(screen, mk)
    qv, qi = q_len.topk(min(R + 1, mq), dim=1)
    kv, ki = k_len.topk(min(Rk + 1, mk), dim=1)
    bound = (qv[:, R] if mq > R else qv.new_zeros(len(Q))).repeat_interleave(per) * c
    bound = bound * (kv[:, Rk] if mk > Rk else kv.new_zeros(P))
    qi = qi[:, :R].repeat_interleave(per, 0)  # [P, R]
    ki = ki[:, :Rk]
    Q_rows = torch.gather(Q, 1, qi[::per, :, None].expand(-1, -1, e)).repeat_interleave(per, 0)  # [P, R, e]
    rows = torch.bmm(Q_rows, Kn.transpose(1, 2)) * c  # [P, R, mk]
    K_cols = torch.gather(Kn, 1, ki[..., None].expand(-1, -1, e))  # [P, Rk, e]
    cols = torch.bmm(Q, K_cols.view(-1, per * Rk, e).transpose(1, 2)) * c  # [P / per, mq, per Rk]
    cols = cols.view(-1, mq, per, Rk).transpose(1, 2).reshape(P, mq, Rk)
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
        q2, k2, v2 = _top_pairs(Q[redo // per], Kn[redo], q_len[redo // per], k_len[redo], c, k, screen * 2)
        q_idx[redo], k_idx[redo] = q_idx.new_tensor(q2), k_idx.new_tensor(k2)
        vals[redo] = vals.new_tensor(v2)
    return q_idx.tolist(), k_idx.tolist(), vals.tolist()
