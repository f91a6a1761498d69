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
A cross-layer transcoder's feature of layer L is one node that writes a_f W_dec(L -> T)[f] at slot 2T+2 for every
T >= L; its edge into a target sums its writes:  sum over its slots w <= r of G_w[pos] . u_w.

Edges come in batches of targets of one kind and layer, as matrix products; never one pass per edge.  The
linear maps themselves (read gradients, slot gradients, slot biases) are graphs/linear.py's `Linearised`.
"""
from __future__ import annotations

import contextlib
import gc
import time

import torch

from replacement.assemble import Record, ReplacementModel
from replacement.checks import check_count
from replacement.errors import BadInputError
from replacement.tokenizer import token_text

from .graph import (CONTRAST_REFERENCES, ERROR_KINDS, FEATURE_KINDS, TARGET_KINDS, AttributionGraph, EdgeArrays, Node,
                    NodeKey, NodeKind, unit_label)
from .families import FamilyConfig, find_families
from .linear import Linearised, Source, attn_read_slot, attn_slot, mlp_slot
from .prune import logit_decomposition


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
def gc_paused():
    """Building, pruning and writing a graph allocate ~10^5 small lists and dicts (node ids, QK entries, JSON)
    and no reference cycles; Python's cyclic collector would rescan the whole heap many times over (a third of
    the QK time, half of writing graph.json)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@torch.no_grad()
@gc_paused()
def attribute(model: ReplacementModel, prompt: str | torch.Tensor, *, target: str | int | None = None,
              logit_coverage: float = 0.95, max_logits: int = 10, batch_size: int = 256,
              edges_per_target: int | None = None, sparse_record: bool = False, progress: bool = False,
              qk: bool = True, qk_heads: int | None = None, qk_top_keys: int = 3, qk_top_pairs: int = 8,
              qk_reference: str | None = "mean", qk_defer: bool = False,
              max_feature_nodes: int | None = None, bos: str = "keep",
              families: "FamilyConfig | None" = None, check_memory: bool = True) -> AttributionGraph:
    """The full (unpruned) attribution graph of ``prompt`` under ``model``.

    ``prompt``: text, or token ids ([n] or [1, n]).  ``target``: a token (its text or id) whose logit must be
    among the logit nodes.  ``edges_per_target``: keep only
    the strongest incoming edges of each target (the rest is summed into the node's ``dropped``).
    ``sparse_record``: trace the pure sparse model itself (all errors are then zero).
    ``qk``: explain the attention scores of Lorsa heads (all of them, or the ``qk_heads`` most influential)
    by query-node x key-node pairs at their ``qk_top_keys`` strongest key positions (graphs/qk.py), and each
    such key's score minus that of ``qk_reference`` ("mean": the attention-weighted mean key; "runner_up":
    the strongest other key; None: not) by query-node x key-unit pairs (graphs/contrast.py).
    ``qk_defer``: explain no head now; `prune` explains the heads it keeps (the ``qk_heads`` most influential of
    them, or all), with the same entries, before keeping their QK pairs' nodes (``graph.explain_heads``).
    ``max_feature_nodes``: where the prompt has more active features (Lorsa heads and transcoder features)
    than this, expand only this many, the most influential first (graphs/budgeted.py); the graph then holds
    those features only (the rest's edges summed into each target's ``dropped``).
    ``bos``: "keep" makes nodes of every Lorsa head, transcoder feature and error at position 0 as anywhere;
    "zero" (circuit-tracer's convention) makes none there: what they write joins the targets' constants.
    ``families``: group the active heads and features of this full graph into families by this rule
    (graphs/families.py), marking each member's node; None (the default): not.  `trace` groups those of the pruned
    graph instead (``find_families(prune(graph), model)``): on a full graph of 20M edges the read directions cost
    ~0.7 GB beyond the memory guard's estimate, and the families a picture draws are those of its nodes.
    ``check_memory``: first refuse in one line (BadInputError) a graph whose estimated size exceeds the memory
    available (graphs/memory_estimate.py; ``$CIRCUITS_MEMORY_BUDGET`` sets it), rather than be killed by the kernel."""
    t0 = time.time()
    if bos not in ("keep", "zero"):
        raise BadInputError(f"bos must be 'keep' or 'zero', not {bos!r}")
    if qk_reference not in CONTRAST_REFERENCES + (None,):
        raise BadInputError(f"qk_reference must be one of {', '.join(CONTRAST_REFERENCES)} or None, not {qk_reference!r}")
    if not hasattr(model, "adapter"):
        raise BadInputError(f"attribute needs a ReplacementModel (replacement.assemble), not {type(model).__name__}")
    if qk_top_keys < 1 or qk_top_pairs < 1 or max_logits < 1 or (edges_per_target is not None and edges_per_target < 1):
        raise BadInputError("qk_top_keys, qk_top_pairs, max_logits and edges_per_target must be at least 1")
    if not 0 < logit_coverage <= 1:
        raise BadInputError(f"logit_coverage must be in (0, 1], not {logit_coverage}")
    check_count("max_feature_nodes", max_feature_nodes)  # 0 or less made a graph of no features
    a = model.adapter
    ids = a.prompt_ids(prompt)
    if check_memory:
        from .memory_estimate import check_graph

        check_graph(model, ids, max_feature_nodes)
    rec = model.record(ids[0], sparse=sparse_record)
    lin = Linearised(model, rec)
    tok = a.tokenizer
    tokens = [token_text(tok, i) if tok is not None else str(i) for i in rec.ids.tolist()]
    made = _graph_nodes(model, rec, tokens)
    lin.folded = fold_position(made, 0) if bos == "zero" else {}
    target_id = None if target is None else a.token_id(target)
    _logit_nodes(made, rec, tok, target_id, logit_coverage, max_logits, lin.N)
    all_nodes, sources = made.nodes, made.sources
    nodes, edges, n_features, budgeted = _nodes_and_edges(lin, made, max_feature_nodes, batch_size, edges_per_target,
                                                          progress, target_id)
    settings = {"attention": model.attention, "model": a.name, "logit_coverage": logit_coverage, "bos": bos,
                "max_logits": max_logits, "edges_per_target": edges_per_target, "sparse_record": sparse_record,
                "max_feature_nodes": max_feature_nodes, "active_features": n_features, "budgeted": budgeted,
                "dtype": str(a.dtype).removeprefix("torch."), "device": a.device.type,  # the precision it ran at
                **model.provenance()}  # the model's fingerprint and the replacements' folders
    z_patterns(model, rec, nodes)
    prompt_text = prompt if isinstance(prompt, str) else tok.decode(rec.ids[1:]) if tok is not None else ""
    graph = AttributionGraph(prompt_text, tokens, rec.ids.tolist(), nodes, edges, settings)
    graph.scores["logit_decomposition"] = logit_decomposition(graph, target_id)
    settings["seconds_ov"] = round(time.time() - t0, 3)
    if qk and model.attention == "lorsa":
        settings.update(qk_heads=qk_heads, qk_top_keys=qk_top_keys, qk_top_pairs=qk_top_pairs, qk_reference=qk_reference)
        explain = HeadExplainer(lin, all_nodes, sources, qk_top_keys, qk_top_pairs, qk_reference)
        if qk_defer:
            graph.explain_heads = explain
        else:
            t1 = time.time()
            from .prune import influence

            explain.heads_of(nodes, range(len(nodes)), qk_heads, None if qk_heads is None else influence(graph))
            settings["seconds_qk"] = round(time.time() - t1, 3)
    if families is not None:
        find_families(graph, model, families)
    settings["seconds"] = round(time.time() - t0, 3)
    return graph


def _nodes_and_edges(lin: Linearised, made: "_Nodes", max_feature_nodes: int | None, batch_size: int,
                     edges_per_target: int | None, progress: bool, target_token: int | None = None):
    """(the graph's nodes, its edges, the active features, whether the node budget cut them)."""
    n_features = sum(len(t[2]) for t in made.targets if t[0] != NodeKind.LOGIT and t[2] is not None)
    if max_feature_nodes is not None and n_features > max_feature_nodes:
        from .budgeted import grow

        return (*grow(lin, made.nodes, made.sources, made.targets, max_feature_nodes, batch_size, progress,
                      target_token, edges_per_target), n_features, True)
    edges = _edges(lin, made.nodes, made.sources, made.targets, batch_size, edges_per_target, progress)
    return made.nodes, edges, n_features, False


class HeadExplainer:
    """Explains Lorsa heads of one attributed prompt on demand (graphs/qk.py): ``explainer(node_ids)`` sets the
    ``qk`` entries of those heads not explained yet.  Every node that writes (``all_nodes``, with the features
    a budgeted graph left out) enters the exact score split, so an entry does not depend on which heads are
    explained or when.  It holds the prompt's linearised model, so it lives as long as its graph."""

    def __init__(self, lin: Linearised, all_nodes: list[Node], sources: dict, top_keys: int, top_pairs: int,
                 reference: str | None):
        self.lin, self.nodes, self.sources = lin, all_nodes, sources
        self.top_keys, self.top_pairs, self.reference = top_keys, top_pairs, reference
        self.row = {node.id: i for i, node in enumerate(all_nodes)}
        self.done: set[str] = set()

    def __call__(self, node_ids: list[str]) -> None:
        from .qk import qk_attribution

        todo = [nid for nid in node_ids if nid not in self.done]
        if todo:
            qk_attribution(self.lin, self.nodes, self.sources, [self.row[nid] for nid in todo], self.top_keys,
                           self.top_pairs, reference=self.reference)
            self.done.update(todo)

    def heads_of(self, nodes: list[Node], rows, n: int | None = None, infl: torch.Tensor | None = None) -> None:
        """Explain the Lorsa heads among ``nodes[rows]`` (a graph's nodes): all of them, or with ``n`` those with the
        largest ``infl`` (one influence per node of ``nodes``) until ``n`` heads in all are explained."""
        heads = [i for i in rows if nodes[i].type == NodeKind.LORSA and nodes[i].id not in self.done]
        if n is not None:
            heads = sorted(heads, key=lambda i: -float(infl[i]))[: max(n - len(self.done), 0)]
        self([nodes[i].id for i in heads])


class _Nodes:
    """The nodes of a graph as they are made, each with what it writes (its `Source`), and the target groups
    (one per kind and layer: node rows, unit indices, positions)."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.sources: dict[str, Source] = {}
        self.targets: list[Target] = []

    def add(self, node: Node, slot: int, vec: torch.Tensor | None, later: tuple = ()) -> int:
        """Append ``node`` (writing ``vec`` [d] at ``slot``, and the ``later`` (slot, [d]) writes of a cross-layer
        feature; None: it writes nothing, a logit); its row."""
        self.nodes.append(node)
        if vec is not None:
            self.sources[node.id] = Source(slot, node.pos, vec, later)
        return len(self.nodes) - 1

    def add_targets(self, kind: NodeKind, L: int, rows: list[tuple[int, int, int]]) -> None:
        """A target group from (node row, unit index, position) triples."""
        self.targets.append((kind, L, *map(torch.tensor, zip(*rows))) if rows else (kind, L, None, None, None))


def _graph_nodes(model: ReplacementModel, rec: Record, tokens: list[str]) -> _Nodes:
    """Every node but the logits, in order: embeddings, then per layer its Lorsa heads and attention errors
    (Lorsa mode), its transcoder features and MLP errors."""
    out = _Nodes()
    for p in range(rec.ids.shape[0]):
        out.add(Node.make(NodeKind.EMBEDDING, -1, int(rec.ids[p]), p, label=tokens[p]), 0, rec.embed[p])
    for L in range(model.adapter.n_layers):
        if model.attention == "lorsa":
            _lorsa_nodes(out, model, rec, L)
            _error_nodes(out, NodeKind.ATTN_ERROR, L, rec.layers[L].attn_err, attn_slot(L))
        _transcoder_nodes(out, model, rec, L)
        _error_nodes(out, NodeKind.MLP_ERROR, L, rec.layers[L].mlp_err, mlp_slot(L))
    return out


def _lorsa_nodes(out: _Nodes, model: ReplacementModel, rec: Record, L: int) -> None:
    """The active Lorsa heads of layer L, and their target group (z patterns: `z_patterns`, for the heads a
    graph keeps)."""
    lr, lorsa = rec.layers[L], model.lorsas[L]
    pos, heads, vals, preacts = _active(lr.lorsa_code, lr.lorsa_z.gather(1, lr.lorsa_code.indices))
    writes = vals[:, None] * lorsa.W_O.float()[heads]  # [N, d]: each active head's output, in one product
    rows, pos, heads = [], pos.tolist(), heads.tolist()
    ids = NodeKey.ids(NodeKind.LORSA, L, heads, pos)  # one string each, without a key object per node
    for i, (nid, p, h, v, z) in enumerate(zip(ids, pos, heads, vals.tolist(), preacts.tolist())):
        node = Node(nid, NodeKind.LORSA, L, p, h, activation=v, label=unit_label(NodeKind.LORSA, L, h), preact=z)
        rows.append((out.add(node, attn_slot(L), writes[i]), h, p))
    out.add_targets(NodeKind.LORSA, L, rows)


def _active(code, preacts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(positions, units, activations, pre-activations) [N] of the active entries (value > 0) of a top-K code
    (values, indices [n, k]; preacts [n, k] alongside), position by position in the code's order."""
    p, j = (code.values > 0).nonzero(as_tuple=True)
    return p, code.indices[p, j], code.values[p, j], preacts[p, j]


def z_patterns(model: ReplacementModel, rec: Record, nodes: list[Node]) -> None:
    """Set each Lorsa head node's ``z_pattern``: A_{t,s} v_s for s <= t (sums to its z), rounded to 5 decimals;
    one product per layer for the heads in ``nodes``."""
    by_layer: dict[int, list[Node]] = {}
    for node in nodes:
        if node.type == NodeKind.LORSA:
            by_layer.setdefault(node.layer, []).append(node)
    for L, heads in by_layer.items():
        lr, lorsa = rec.layers[L], model.lorsas[L]
        h = torch.tensor([n.index for n in heads], device=lr.attn_in.device)
        pos = torch.tensor([n.pos for n in heads], device=lr.attn_in.device)
        values = lr.attn_in @ lorsa.W_V[h].t().float() + lorsa.b_V[h].float()  # [n, B]: each head's v_s
        zp = lr.lorsa_pattern[h // lorsa.cfg.heads_per_group, pos] * values.t()  # [B, n]
        for node, row in zip(heads, zp.double().round(decimals=5).tolist()):
            node.z_pattern = row[: node.pos + 1]


def _transcoder_nodes(out: _Nodes, model: ReplacementModel, rec: Record, L: int) -> None:
    """The active transcoder features of layer L, and their target group.  A cross-layer transcoder's feature is
    one node that writes into every MLP output its decoders reach (its `Source`'s ``later`` writes)."""
    lr, tc = rec.layers[L], model.transcoders[L]
    code = lr.tc_code
    pos, feats, vals, preacts = _active(code, tc.pre_activations(lr.tc_in).gather(1, code.indices))
    # [(slot, [N, d])]: what each active feature writes into each MLP output it reaches, one product per output
    (slot, first), *later = [(mlp_slot(T), vals[:, None] * tc.decoder_into(T).float()[feats]) for T in tc.writes_into()]
    rows, pos, feats = [], pos.tolist(), feats.tolist()
    ids = NodeKey.ids(NodeKind.TRANSCODER, L, feats, pos)
    for i, (nid, p, f, v, pre) in enumerate(zip(ids, pos, feats, vals.tolist(), preacts.tolist())):
        node = Node(nid, NodeKind.TRANSCODER, L, p, f, activation=v, label=unit_label(NodeKind.TRANSCODER, L, f),
                    preact=pre)
        rows.append((out.add(node, slot, first[i], tuple((w, W[i]) for w, W in later)), f, p))
    out.add_targets(NodeKind.TRANSCODER, L, rows)


def _error_nodes(out: _Nodes, kind: NodeKind, L: int, err: torch.Tensor, slot: int) -> None:
    """One error node per position (err [n, d]: what the replacement misses of the real layer's output)."""
    what = "attn" if kind == NodeKind.ATTN_ERROR else "mlp"
    for p in range(err.shape[0]):
        out.add(Node.make(kind, L, -1, p, activation=float(err[p].norm()), label=f"L{L} {what} err"), slot, err[p])


def fold_position(made: _Nodes, pos: int) -> dict:
    """Remove every Lorsa-head, transcoder-feature and error node at ``pos`` from ``made`` (its nodes, sources
    and target groups); returns what they wrote, summed per slot: {(slot, pos): [d]} (bos="zero")."""
    drop = [i for i, nd in enumerate(made.nodes) if nd.pos == pos and nd.type in (*FEATURE_KINDS, *ERROR_KINDS)]
    folded: dict = {}
    for i in drop:
        for slot, vec in made.sources.pop(made.nodes[i].id).writes():
            folded[(slot, pos)] = folded.get((slot, pos), 0) + vec
    gone = set(drop)
    new_row = {old: new for new, old in enumerate(i for i in range(len(made.nodes)) if i not in gone)}
    made.nodes[:] = [nd for i, nd in enumerate(made.nodes) if i not in gone]
    for j, (kind, L, rows, idx, p) in enumerate(made.targets):
        if rows is None:
            continue
        keep = [r for r, q in enumerate(p.tolist()) if q != pos]
        rows = torch.tensor([new_row[int(rows[r])] for r in keep], dtype=torch.long)
        made.targets[j] = (kind, L, rows, idx[keep], p[keep]) if keep else (kind, L, None, None, None)
    return folded


def _logit_nodes(out: _Nodes, rec: Record, tok, target_id: int | None, coverage: float, max_logits: int,
                 n_layers: int) -> None:
    """Append the logit nodes (demeaned, the smallest set of at least two covering ``coverage``, at most
    ``max_logits``; with the token ``target_id`` among them) and their target group."""
    n = rec.ids.shape[0]
    probs = rec.logits[n - 1].softmax(-1)
    logits = (rec.logits if rec.logits_linear is None else rec.logits_linear)[n - 1]  # before soft-capping
    demeaned = logits - logits.mean()
    rows = []
    for v in _select_logits(probs, coverage, max_logits, target_id):
        label = token_text(tok, v) if tok is not None else str(v)
        node = Node.make(NodeKind.LOGIT, n_layers, v, n - 1, activation=float(demeaned[v]), label=label,
                         prob=float(probs[v]), preact=float(demeaned[v]))
        rows.append((out.add(node, -1, None), v, n - 1))
    out.add_targets(NodeKind.LOGIT, n_layers, rows)


def _edges(lin: Linearised, nodes: list[Node], sources: dict, targets: list[Target], batch_size: int,
           edges_per_target: int | None, progress: bool) -> "EdgeArrays":
    """Every target's incoming edges, in batches of targets of one kind and layer (one product per source
    group per batch); also sets each target's constant terms (``lin.folded`` writes included)."""
    from tqdm import tqdm

    groups = source_groups(nodes, sources)
    edges = EdgeArrays()
    bar = tqdm(total=sum(0 if t[2] is None else len(t[2]) for t in targets), desc="attribution", disable=not progress)
    for kind, L, node_rows, idx, pos in targets:
        if node_rows is None:
            continue
        for start in range(0, len(node_rows), batch_size):
            sl = slice(start, start + batch_size)
            W, const = target_rows(lin, groups, len(nodes), kind, L, idx[sl], pos[sl])
            emit_edges(W, node_rows[sl].tolist(), const, nodes, edges, "ov" if kind == NodeKind.LORSA else "direct",
                        edges_per_target)
            bar.update(len(node_rows[sl]))
    bar.close()
    return edges


def source_groups(nodes: list[Node], sources: dict) -> dict:
    """slot -> (positions [P], node rows [P, S], written vectors [P, S, d]) of every write into that slot, packed
    by position (zero-padded to the most writes at one position; a padded entry adds zero to column 0); a
    cross-layer feature's node is in the group of each slot it writes."""
    index = {node.id: i for i, node in enumerate(nodes)}
    grouped: dict[int, dict[int, list[tuple[int, torch.Tensor]]]] = {}
    for nid, s in sources.items():
        for slot, vec in s.writes():
            grouped.setdefault(slot, {}).setdefault(s.pos, []).append((index[nid], vec))
    packed = {}
    for slot, by_pos in grouped.items():
        positions = sorted(by_pos)
        width = max(len(items) for items in by_pos.values())
        vec = by_pos[positions[0]][0][1]
        cols = torch.zeros(len(positions), width, dtype=torch.long)
        U = torch.zeros(len(positions), width, vec.shape[-1], dtype=vec.dtype, device=vec.device)
        for j, p in enumerate(positions):
            items = by_pos[p]
            cols[j, : len(items)] = torch.tensor([i for i, _ in items])
            U[j, : len(items)] = torch.stack([v for _, v in items])
        packed[slot] = (torch.tensor(positions), cols.to(vec.device), U)
    return packed


def target_rows(lin: Linearised, groups: dict, n_nodes: int, kind: NodeKind, L: int, idx: torch.Tensor,
                pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense incoming rows W [B, n_nodes] and constant terms [B] of B targets of one kind and layer
    (units ``idx``, positions ``pos``: [B])."""
    if kind == NodeKind.LORSA:
        (R, const), read_slot = lin.read_lorsa(L, idx, pos), attn_read_slot(L)
    elif kind == NodeKind.TRANSCODER:
        (R, const), read_slot = lin.read_transcoder(L, idx, pos), lin.mlp_read_slot(L)
    else:
        (R, const), read_slot = lin.read_logits(idx), lin.final_slot
    G = lin.slot_gradients(R, read_slot)
    W = torch.zeros(len(idx), n_nodes, device=lin.device)
    for w in range(read_slot + 1):
        bias = lin.slot_bias(w)
        if bias is not None:
            const = const + G[w].sum(1) @ bias
        for (fw, fp), vec in lin.folded.items():  # writes folded into the constants (bos="zero")
            if fw == w:
                const = const + G[w][:, fp] @ vec
        if w in groups:
            positions, cols, U = groups[w]  # [P], [P, S], [P, S, d]
            g = G[w][:, positions.to(G[w].device)].transpose(0, 1)  # [P, B, d]
            part = torch.bmm(g, U.transpose(1, 2))  # [P, B, S]
            W.index_add_(1, cols.flatten(), part.transpose(0, 1).reshape(len(idx), -1))  # each write into its column
    return W, const


def emit_edges(W: torch.Tensor, rows: list[int], const: torch.Tensor, nodes: list[Node], store: "EdgeArrays",
                kind: str, keep: int | None) -> None:
    """Move a batch of dense rows W [B, n_nodes] into the sparse edge store (nonzero entries only, row by row;
    on the CPU); ``rows`` [B]: the targets' node rows, ``const`` [B] their constant terms; ``keep``: at most this
    many edges per target (None: all)."""
    W, const = W.cpu(), const.cpu()
    for row, c in zip(rows, const.tolist()):
        nodes[row].const = c
    if keep is None:
        r, cols = W.nonzero(as_tuple=True)  # row-major: each target's edges together, in source order
        store.add(cols, torch.tensor(rows)[r], W[r, cols], kind)
        return
    for r, row in enumerate(rows):
        w = W[r]
        nz = w.nonzero()[:, 0]
        if len(nz) > keep:
            kept = nz[w[nz].abs().topk(keep).indices]
            nodes[row].dropped = float(w[nz].sum() - w[kept].sum())
            nz = kept
        store.add(nz, torch.full_like(nz, row), w[nz], kind)


def reconstruction_errors(graph: AttributionGraph) -> dict[str, float]:
    """For every target: |sum(incoming) + const + dropped - preact|, relative to the larger of |preact| and
    the terms' own size (sum |incoming| + |const| + |dropped|): a pre-activation near 0 made of large terms
    that cancel carries float32 rounding of the size of those terms."""
    E = graph.edge_arrays
    sums = torch.zeros(len(graph.node_list), dtype=torch.float64)
    sizes = torch.zeros(len(graph.node_list), dtype=torch.float64)
    sums.index_add_(0, E.tgt, E.w.double())
    sizes.index_add_(0, E.tgt, E.w.double().abs())
    out = {}
    for i, node in enumerate(graph.node_list):
        if node.type in TARGET_KINDS:
            total = float(sums[i]) + node.const + node.dropped
            size = float(sizes[i]) + abs(node.const) + abs(node.dropped)
            out[node.id] = abs(total - node.preact) / max(abs(node.preact), size, 1e-6)
    return out
