"""Attribution graphs: direct linear effects between embeddings, Lorsa heads, transcoder features, error
nodes and logits, with the norm scales, the Lorsa patterns and the errors frozen.

The residual stream is a sum of writes.  Number its write slots: slot 0 holds the embedding; attention of
layer L writes slot 2L+1 and its MLP slot 2L+2.  Attention L reads slot 2L (everything written at slots
<= 2L); the MLP of a sequential block reads slot 2L+1 (it sees layer L's attention), the MLP of a parallel
block reads slot 2L (it does not); the logits read slot 2N.

Every target's pre-activation is a linear function of what it reads, so it has a *read gradient* R
([n, d], per position) at its read slot:

    transcoder feature f at t:  R[t] = P(w_ln2 * W_enc[f]) / sigma2[t]
    Lorsa head h at query t:    R[s] = A_{t,s} P(w_ln1 * w_v^h) / sigma1[s]   for s <= t   (the OV edge)
    logit v (demeaned) at T:    R[T] = P(w_lnf * (W_U[v] - mean W_U)) / sigmaf[T]

(P centres a vector for LayerNorm and is the identity for RMSNorm.)  In Lorsa mode no path runs through
another node, so a write at slot w <= r meets the same gradient: edge(i -> target) = R[pos_i] . u_i.
In frozen-attention mode (transcoders only) attention is a fixed linear map between slots 2L and 2L+1 and
the gradient is carried through it explicitly:  G_w = G_{w+1} + [w = 2L] VJP_attn_L(G_{2L+1}).
A transcoder skip connection (y += norm(x) W_skip) is such a fixed linear map too, from the MLP's read slot
r to its write slot:  G_r += VJP_skip_L(G_{2L+2}); its norm-bias term is a constant of slot 2L+2.

Edges come in batches of targets of one kind and layer, as matrix products; never one pass per edge.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass

import torch

from replacement.assemble import Record, ReplacementModel
from replacement.errors import BadInputError
from replacement.models import single_token
from replacement.tokenizer import token_text

from .graph import AttributionGraph, EdgeArrays, Node
from .prune import logit_decomposition


@dataclass
class Source:
    slot: int
    pos: int
    vector: torch.Tensor  # [d] what the node writes into the residual stream


class Linearised:
    """The frozen linear structure of one recorded prompt (read vectors, slot biases, attention VJPs)."""

    def __init__(self, model: ReplacementModel, rec: Record):
        self.model, self.rec, self.adapter = model, rec, model.adapter
        a = self.adapter
        self.N, self.n, self.d = a.n_layers, rec.ids.shape[0], a.d_model
        self.layernorm = isinstance(a.final_norm, torch.nn.LayerNorm)
        self.final_slot = 2 * self.N
        self.device = rec.embed.device  # every tensor built here lives with the record
        self.folded: dict = {}  # {(slot, pos): [d]} writes of nodes folded into constants (bos="zero")

    # -- small maps ---------------------------------------------------------------------------------------

    def _p(self, v: torch.Tensor) -> torch.Tensor:
        """P: centre the last dim for LayerNorm, identity for RMSNorm."""
        return v - v.mean(-1, keepdim=True) if self.layernorm else v

    def _w(self, norm) -> torch.Tensor:
        """The factor the norm multiplies by (1 + weight for Gemma-2)."""
        return self.adapter.norm_weight(norm).detach().float()

    @staticmethod
    def _b(norm) -> torch.Tensor | None:
        b = getattr(norm, "bias", None)
        return None if b is None else b.detach().float()

    def mlp_read_slot(self, L: int) -> int:
        return 2 * L if self.adapter.parallel_residual else 2 * L + 1

    # -- read gradients and intrinsic constants ------------------------------------------------------------

    def read_transcoder(self, L: int, feats: torch.Tensor, pos: torch.Tensor):
        """R [B, n, d] and intrinsic constants [B] for transcoder features (feats, pos: [B])."""
        tc = self.model.transcoders[L]
        norm = self.adapter.mlp_norm(L)
        W = tc.W_enc[feats].float()  # [B, d]
        R = torch.zeros(len(feats), self.n, self.d, device=self.device)
        sig = self.rec.layers[L].ln2_scale[pos]  # [B, 1]
        R[torch.arange(len(feats)), pos] = self._p(W * self._w(norm)) / sig
        const = tc.b_enc[feats].float()
        if self._b(norm) is not None:
            const = const + W @ self._b(norm)
        return R, const

    def read_lorsa(self, L: int, heads: torch.Tensor, pos: torch.Tensor):
        lorsa = self.model.lorsas[L]
        norm = self.adapter.attn_norm(L)
        lr = self.rec.layers[L]
        groups = heads // lorsa.cfg.heads_per_group
        A = lr.lorsa_pattern[groups, pos]  # [B, n] row t of each head's group pattern
        wv = lorsa.W_V[heads].float()  # [B, d]
        read = self._p(wv * self._w(norm))  # [B, d]
        R = A[:, :, None] * read[:, None, :] / lr.ln1_scale[None, :, :]  # [B, n, d]
        per_pos = lorsa.b_V[heads].float()
        if self._b(norm) is not None:
            per_pos = per_pos + wv @ self._b(norm)
        return R, A.sum(-1) * per_pos

    def read_logits(self, token_ids: torch.Tensor):
        a = self.adapter
        W_U = a.unembedding.weight.detach().float()
        Wd = W_U[token_ids] - W_U.mean(0)  # [B, d] demeaned
        R = torch.zeros(len(token_ids), self.n, self.d, device=self.device)
        T = self.n - 1
        R[:, T] = self._p(Wd * self._w(a.final_norm)) / self.rec.final_scale[T]
        const = torch.zeros(len(token_ids), device=self.device)
        if self._b(a.final_norm) is not None:
            const = const + Wd @ self._b(a.final_norm)
        b_U = getattr(a.unembedding, "bias", None)
        if b_U is not None:
            b = b_U.detach().float()
            const = const + b[token_ids] - b.mean()
        return R, const

    # -- what each slot's writes contain besides nodes -------------------------------------------------

    def slot_bias(self, slot: int) -> torch.Tensor | None:
        """The constant vector [d] written at every position at a slot (biases), or None."""
        if slot == 0:
            return None
        L, is_mlp = (slot - 1) // 2, slot % 2 == 0
        if is_mlp:
            tc = self.model.transcoders[L]
            b = tc.b_dec.detach().float()
            b_ln = self._b(self.adapter.mlp_norm(L))
            if tc.W_skip is not None and b_ln is not None:
                b = b + b_ln @ tc.W_skip.float()  # the skip of the norm's own bias
            return b
        if self.model.attention == "lorsa":
            return self.model.lorsas[L].b_O.detach().float()
        a = self.adapter
        (Wv, bv), (Wo, bo) = a.W_V(L), a.W_O(L)
        v_const = torch.zeros(a.n_heads, a.d_head, device=self.device) if bv is None else bv.float()
        if self._b(a.attn_norm(L)) is not None:
            v_const = v_const + torch.einsum("d,hde->he", self._b(a.attn_norm(L)), Wv.float())
        out = torch.einsum("he,hed->d", v_const, Wo.float())
        return out if bo is None else out + bo.float()

    def attn_vjp(self, L: int, g_out: torch.Tensor) -> torch.Tensor:
        """Frozen MHSA of layer L as a linear map slot 2L -> 2L+1; returns the gradient at its input [B, n, d]."""
        a = self.adapter
        (Wv, _), (Wo, _) = a.W_V(L), a.W_O(L)
        post = a.post_norm(L, "attn")
        if post is not None:  # Gemma-2: the output's own norm, its scale frozen
            g_out = g_out * self._w(post) / self.rec.cache[f"blocks.{L}.ln1_post.scale"][None]
        A = self.rec.layers[L].pattern  # [H, n, n]
        g_z = torch.einsum("btd,hed->bhte", g_out, Wo.float())
        g_v = torch.einsum("hts,bhte->bhse", A, g_z)
        g_x = torch.einsum("bhse,hde->bsd", g_v, Wv.float())
        return self._p(g_x * self._w(a.attn_norm(L))) / self.rec.layers[L].ln1_scale[None]

    # -- transcoder skip connections: linear maps from slot mlp_read_slot(L) to slot 2L+2 ---------------------

    def skip_layers(self, read_slot: int) -> list[int]:
        """The layers whose MLP has a skip connection that writes at or below ``read_slot``, in order."""
        return [L for L in range(self.N) if self.model.transcoders[L].W_skip is not None and 2 * L + 2 <= read_slot]

    def skip_map(self, L: int, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """The skip's linear part on residual vectors x [.., n, d] (or [R, d] at positions ``pos`` [R]):
        (w_ln2 * P(x)) / sigma2 @ W_skip (the norm's bias is a constant: see slot_bias)."""
        sig = self.rec.layers[L].ln2_scale  # [n, 1]
        sig = sig if pos is None else sig[pos]
        return (self._p(x) * self._w(self.adapter.mlp_norm(L)) / sig) @ self.model.transcoders[L].W_skip.float()

    def skip_vjp(self, L: int, g_out: torch.Tensor) -> torch.Tensor:
        """The transpose of skip_map: gradient [B, n, d] at the skip's output -> at its input."""
        W = self.model.transcoders[L].W_skip.float()
        return self._p((g_out @ W.t()) * self._w(self.adapter.mlp_norm(L))) / self.rec.layers[L].ln2_scale[None]

    def through_skips(self, vectors: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                      read_slot: int) -> torch.Tensor:
        """What writes ``vectors`` [R, d] (at ``slots``, ``pos`` [R]) add to the stream read at ``read_slot``:
        the write itself plus what every skip connection in between passes on (skips compose in order)."""
        out = vectors.clone()
        for L in self.skip_layers(read_slot):
            seen = slots <= self.mlp_read_slot(L)
            out[seen] += self.skip_map(L, out[seen], pos[seen])
        return out

    def read_constants(self, read_slot: int) -> torch.Tensor:
        """[n, d]: the constant part of the stream read at ``read_slot`` (every bias, through the skips)."""
        c = torch.zeros(self.n, self.d, device=self.device)
        skips = set(self.skip_layers(read_slot))
        at_read = {}
        for w in range(read_slot + 1):
            L = (w - 2) // 2
            if w >= 2 and w % 2 == 0 and L in skips:
                c = c + self.skip_map(L, at_read[L])
            b = self.slot_bias(w)
            if b is not None:
                c = c + b
            for (fw, fp), vec in self.folded.items():
                if fw == w:
                    c = c.index_add(0, torch.tensor([fp], device=c.device), vec[None].to(c.dtype))  # not in place
            for L in skips:
                if self.mlp_read_slot(L) == w:
                    at_read[L] = c
        return c

    def slot_gradients(self, R: torch.Tensor, read_slot: int) -> list[torch.Tensor | None]:
        """G_w [B, n, d] for w = 0..read_slot (None above it)."""
        G: list[torch.Tensor | None] = [None] * (self.final_slot + 1)
        G[read_slot] = R
        skip_read = {self.mlp_read_slot(L): L for L in self.skip_layers(read_slot)}
        for w in range(read_slot - 1, -1, -1):
            g = G[w + 1]
            if self.model.attention == "frozen" and w % 2 == 0 and w + 1 <= read_slot:
                g = g + self.attn_vjp(w // 2, G[w + 1])
            if w in skip_read:
                L = skip_read[w]
                g = g + self.skip_vjp(L, G[2 * L + 2])
            G[w] = g
        return G


def _select_logits(probs: torch.Tensor, coverage: float, max_logits: int, target: int | None) -> list[int]:
    order = probs.argsort(descending=True).tolist()
    chosen, total = [], 0.0
    for i in order[:max_logits]:
        chosen.append(i)
        total += probs[i].item()
        if total >= coverage and len(chosen) >= 2:  # the runner-up too, for the margin's decomposition
            break
    if target is not None and target not in chosen:
        chosen = chosen[: max_logits - 1] + [target]
    return chosen


Target = tuple  # (kind, layer, node rows [B], unit index [B], position [B])


@contextlib.contextmanager
def _gc_paused():
    """Building a graph allocates ~10^5 small lists and dicts (node ids, QK entries) and no reference cycles;
    Python's cyclic collector would rescan the whole heap many times over (a third of the QK time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@torch.no_grad()
@_gc_paused()
def attribute(model: ReplacementModel, prompt: str | torch.Tensor, *, target: str | None = None,
              logit_coverage: float = 0.95, max_logits: int = 10, batch_size: int = 256,
              edges_per_target: int | None = None, sparse_record: bool = False, progress: bool = False,
              qk: bool = True, qk_heads: int | None = None, qk_top_keys: int = 3, qk_top_pairs: int = 8,
              bos: str = "keep") -> AttributionGraph:
    """The full (unpruned) attribution graph of ``prompt`` under ``model``.

    ``target``: a token (string) whose logit must be among the logit nodes.  ``edges_per_target``: keep only
    the strongest incoming edges of each target (the rest is summed into the node's ``dropped``).
    ``sparse_record``: trace the pure sparse model itself (all errors are then zero).
    ``qk``: explain the attention scores of Lorsa heads (all of them, or the ``qk_heads`` most influential)
    by query-node x key-node pairs at their ``qk_top_keys`` strongest key positions (graphs/qk.py).
    ``bos``: "keep" makes nodes of every Lorsa head, transcoder feature and error at position 0 as anywhere;
    "zero" (circuit-tracer's convention) makes none there: what they write joins the targets' constants."""
    t0 = time.time()
    if bos not in ("keep", "zero"):
        raise BadInputError(f"bos must be 'keep' or 'zero', not {bos!r}")
    a = model.adapter
    ids = a.tokenize(prompt) if isinstance(prompt, str) else prompt.reshape(1, -1)
    rec = model.record(ids[0], sparse=sparse_record)
    lin = Linearised(model, rec)
    tok = a.tokenizer
    tokens = [token_text(tok, i) if tok is not None else str(i) for i in rec.ids.tolist()]
    nodes, sources, targets = _feature_nodes(model, rec, tokens)
    lin.folded = fold_position(nodes, sources, targets, 0) if bos == "zero" else {}
    target_id = None if target is None else single_token(tok, target)
    targets.append(_logit_nodes(rec, nodes, tok, target_id, logit_coverage, max_logits, lin.N))
    edges = _edges(lin, nodes, sources, targets, batch_size, edges_per_target, progress)
    settings = {"attention": model.attention, "model": a.name, "logit_coverage": logit_coverage, "bos": bos,
                "max_logits": max_logits, "edges_per_target": edges_per_target, "sparse_record": sparse_record}
    prompt_text = prompt if isinstance(prompt, str) else tok.decode(rec.ids[1:]) if tok is not None else ""
    graph = AttributionGraph(prompt_text, tokens, rec.ids.tolist(), nodes, edges, settings)
    graph.scores["logit_decomposition"] = logit_decomposition(graph, target_id)
    settings["seconds_ov"] = round(time.time() - t0, 3)
    if qk and model.attention == "lorsa":
        from .qk import qk_attribution

        t1 = time.time()
        heads = [i for i, node in enumerate(nodes) if node.type == "lorsa"]
        if qk_heads is not None:
            from .prune import influence

            infl = influence(graph)
            heads = sorted(heads, key=lambda i: -float(infl[i]))[:qk_heads]
        qk_attribution(lin, nodes, sources, heads, qk_top_keys, qk_top_pairs)
        settings.update(qk_heads=qk_heads, qk_top_keys=qk_top_keys, qk_top_pairs=qk_top_pairs,
                        seconds_qk=round(time.time() - t1, 3))
    settings["seconds"] = round(time.time() - t0, 3)
    return graph


def _feature_nodes(model: ReplacementModel, rec: Record, tokens: list[str]):
    """Embedding, Lorsa-head, transcoder-feature and error nodes, with what each writes (its source vector)
    and the target groups (one per kind and layer)."""
    n, N = rec.ids.shape[0], model.adapter.n_layers
    nodes: list[Node] = []
    sources: dict[str, Source] = {}
    targets: list[Target] = []

    def add(node: Node, slot: int, vec: torch.Tensor) -> int:
        nodes.append(node)
        sources[node.id] = Source(slot, node.pos, vec)
        return len(nodes) - 1

    def target_group(kind: str, L: int, rows: list[tuple[int, int, int]]) -> Target:
        return (kind, L, *map(torch.tensor, zip(*rows))) if rows else (kind, L, None, None, None)

    for p in range(n):
        add(Node(f"emb@{p}", "embedding", -1, p, int(rec.ids[p]), label=tokens[p]), 0, rec.embed[p])
    for L in range(N):
        lr = rec.layers[L]
        if model.attention == "lorsa":
            lorsa = model.lorsas[L]
            values = lr.attn_in @ lorsa.W_V.t().float() + lorsa.b_V.float()  # [n, H]: every head's v_s
            rows = []
            for p in range(n):
                for v, h in zip(lr.lorsa_code.values[p].tolist(), lr.lorsa_code.indices[p].tolist()):
                    if v > 0:
                        zp = lr.lorsa_pattern[h // lorsa.cfg.heads_per_group, p] * values[:, h]  # sums to z
                        node = Node(f"lorsa.{L}.{h}@{p}", "lorsa", L, p, h, activation=v, label=f"L{L}.H{h}",
                                    preact=float(lr.lorsa_z[p, h]),
                                    extra={"z_pattern": [round(float(x), 5) for x in zp[: p + 1]]})
                        rows.append((add(node, 2 * L + 1, v * lorsa.W_O[h].float()), h, p))
            targets.append(target_group("lorsa", L, rows))
            for p in range(n):
                add(Node(f"attn_err.{L}@{p}", "attn_error", L, p, -1, activation=float(lr.attn_err[p].norm()),
                         label=f"L{L} attn err"), 2 * L + 1, lr.attn_err[p])
        tc = model.transcoders[L]
        pre = tc.pre_activations(lr.mlp_in)
        rows = []
        for p in range(n):
            for v, f in zip(lr.tc_code.values[p].tolist(), lr.tc_code.indices[p].tolist()):
                if v > 0:
                    node = Node(f"tc.{L}.{f}@{p}", "transcoder", L, p, f, activation=v, label=f"L{L}.F{f}",
                                preact=float(pre[p, f]))
                    rows.append((add(node, 2 * L + 2, v * tc.W_dec[f].float()), f, p))
        targets.append(target_group("transcoder", L, rows))
        for p in range(n):
            add(Node(f"mlp_err.{L}@{p}", "mlp_error", L, p, -1, activation=float(lr.mlp_err[p].norm()),
                     label=f"L{L} mlp err"), 2 * L + 2, lr.mlp_err[p])
    return nodes, sources, targets


def fold_position(nodes: list[Node], sources: dict, targets: list[Target], pos: int) -> dict:
    """Remove every Lorsa-head, transcoder-feature and error node at ``pos`` (in place: from ``nodes``,
    ``sources`` and ``targets``); returns what they wrote, summed per slot: {(slot, pos): [d]}."""
    drop = [i for i, nd in enumerate(nodes) if nd.pos == pos and nd.type not in ("embedding", "logit")]
    folded: dict = {}
    for i in drop:
        s = sources.pop(nodes[i].id)
        folded[(s.slot, pos)] = folded.get((s.slot, pos), 0) + s.vector
    gone = set(drop)
    new_row = {old: new for new, old in enumerate(i for i in range(len(nodes)) if i not in gone)}
    nodes[:] = [nd for i, nd in enumerate(nodes) if i not in gone]
    for j, (kind, L, rows, idx, p) in enumerate(targets):
        if rows is None:
            continue
        keep = [r for r, q in enumerate(p.tolist()) if q != pos]
        rows = torch.tensor([new_row[int(rows[r])] for r in keep], dtype=torch.long)
        targets[j] = (kind, L, rows, idx[keep], p[keep]) if keep else (kind, L, None, None, None)
    return folded


def _logit_nodes(rec: Record, nodes: list[Node], tok, target_id: int | None, coverage: float, max_logits: int,
                 n_layers: int) -> Target:
    """Append the logit nodes (demeaned, the smallest set of at least two covering ``coverage``, at most
    ``max_logits``; with the token ``target_id`` among them)."""
    n = rec.ids.shape[0]
    probs = rec.logits[n - 1].softmax(-1)
    logits = (rec.logits if rec.logits_linear is None else rec.logits_linear)[n - 1]  # before soft-capping
    demeaned = logits - logits.mean()
    rows = []
    for v in _select_logits(probs, coverage, max_logits, target_id):
        label = token_text(tok, v) if tok is not None else str(v)
        nodes.append(Node(f"logit.{v}@{n - 1}", "logit", n_layers, n - 1, v, activation=float(demeaned[v]),
                          label=label, prob=float(probs[v]), preact=float(demeaned[v])))
        rows.append((len(nodes) - 1, v, n - 1))
    return ("logit", n_layers, *map(torch.tensor, zip(*rows)))


def _edges(lin: Linearised, nodes: list[Node], sources: dict, targets: list[Target], batch_size: int,
           edges_per_target: int | None, progress: bool) -> "EdgeArrays":
    """Every target's incoming edges, in batches of targets of one kind and layer (one product per source
    group per batch); also sets each target's constant terms (``lin.folded`` writes included)."""
    from tqdm import tqdm

    n = lin.n
    index = {node.id: i for i, node in enumerate(nodes)}
    grouped: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for nid, s in sources.items():
        grouped.setdefault((s.slot, s.pos), []).append((index[nid], s.vector))
    groups = {key: (torch.tensor([i for i, _ in items]), torch.stack([v for _, v in items]))
              for key, items in grouped.items()}
    edges = EdgeArrays()
    bar = tqdm(total=sum(0 if t[2] is None else len(t[2]) for t in targets), desc="attribution", disable=not progress)
    for kind, L, node_rows, idx, pos in targets:
        if node_rows is None:
            continue
        for start in range(0, len(node_rows), batch_size):
            sl = slice(start, start + batch_size)
            b_rows, b_idx, b_pos = node_rows[sl], idx[sl], pos[sl]
            if kind == "lorsa":
                (R, const), read_slot = lin.read_lorsa(L, b_idx, b_pos), 2 * L
            elif kind == "transcoder":
                (R, const), read_slot = lin.read_transcoder(L, b_idx, b_pos), lin.mlp_read_slot(L)
            else:
                (R, const), read_slot = lin.read_logits(b_idx), lin.final_slot
            G = lin.slot_gradients(R, read_slot)
            W = torch.zeros(len(b_rows), len(nodes), device=lin.device)
            for w in range(read_slot + 1):
                bias = lin.slot_bias(w)
                if bias is not None:
                    const = const + G[w].sum(1) @ bias
                for (fw, fp), vec in lin.folded.items():
                    if fw == w:
                        const = const + G[w][:, fp] @ vec
                for p in range(n):
                    if (w, p) not in groups:
                        continue
                    g = G[w][:, p]  # [B, d]
                    live = (g.abs().sum(-1) > 0).nonzero()[:, 0]
                    if len(live):
                        cols, U = groups[(w, p)]
                        W[live[:, None], cols[None]] = g[live] @ U.t()
            _emit_edges(W, b_rows.tolist(), const, nodes, edges, "ov" if kind == "lorsa" else "direct", edges_per_target)
            bar.update(len(b_rows))
    bar.close()
    return edges


def _emit_edges(W: torch.Tensor, target_rows: list[int], const: torch.Tensor, nodes: list[Node], store: "EdgeArrays",
                kind: str, keep: int | None) -> None:
    """Move a batch of dense rows W [B, n_nodes] into the sparse edge store (nonzero entries only; on the CPU)."""
    W, const = W.cpu(), const.cpu()
    for r, row in enumerate(target_rows):
        w = W[r]
        nz = w.nonzero()[:, 0]
        node = nodes[row]
        node.const = float(const[r])
        if keep is not None and len(nz) > keep:
            kept = nz[w[nz].abs().topk(keep).indices]
            node.dropped = float(w[nz].sum() - w[kept].sum())
            nz = kept
        store.add(nz, torch.full_like(nz, row), w[nz], kind)


def reconstruction_errors(graph: AttributionGraph) -> dict[str, float]:
    """For every target: |sum(incoming) + const + dropped - preact|, relative to the larger of |preact| and
    the terms' own size (sum |incoming| + |const| + |dropped|): a pre-activation near 0 made of large terms
    that cancel carries float32 rounding of the size of those terms."""
    E = graph.edge_arrays
    sums = torch.zeros(len(graph.node_list), dtype=torch.float64)
    sizes = torch.zeros(len(graph.node_list), dtype=torch.float64)
    mask = E.kind != EdgeArrays.KINDS.index("qk")
    sums.index_add_(0, E.tgt[mask], E.w[mask].double())
    sizes.index_add_(0, E.tgt[mask], E.w[mask].double().abs())
    out = {}
    for i, node in enumerate(graph.node_list):
        if node.type in ("lorsa", "transcoder", "logit"):
            total = float(sums[i]) + node.const + node.dropped
            size = float(sizes[i]) + abs(node.const) + abs(node.dropped)
            out[node.id] = abs(total - node.preact) / max(abs(node.preact), size, 1e-6)
    return out
