"""Attribution graphs against independent computations: the frozen replacement model run through the
adapter's own forward pass (ablate one node, recompute the target)."""
from __future__ import annotations

import random

import pytest
import torch

from graphs.attribution import attribute, reconstruction_errors
from replacement.assemble import transcoder_input
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama, tiny_neox

MODELS = {
    "llama": lambda: tiny_llama(attention_bias=True),
    "neox_parallel": lambda: tiny_neox(),
    "neox_sequential": lambda: tiny_neox(use_parallel_residual=False),
}


def _setup(arch, attention="lorsa", skip=False):
    adapter = ModelAdapter(MODELS[arch](), name=arch)
    model = random_replacements(adapter, attention=attention, skip=skip)
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (1, 9))
    return adapter, model, ids


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_errors_added_back_reproduce_the_model(arch):
    adapter, model, ids = _setup(arch)
    rec = model.record(ids)
    torch.testing.assert_close(model.run_with_errors(rec), rec.logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(rec.logits, adapter.hf_logits(ids)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("skip", [False, True], ids=["", "skip"])
@pytest.mark.parametrize("attention", ["lorsa", "frozen"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_target_is_reconstructed_exactly(arch, attention, skip):
    _, model, ids = _setup(arch, attention, skip)
    graph = attribute(model, ids, batch_size=7)  # small batches exercise the batching
    errs = reconstruction_errors(graph)
    n_targets = len(graph.nodes(type="transcoder")) + len(graph.nodes(type="lorsa")) + len(graph.nodes(type="logit"))
    assert len(errs) == n_targets > 20
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-4, (worst, errs[worst])
    if attention == "frozen":
        assert not graph.nodes(type="lorsa") and not graph.nodes(type="attn_error")


def _frozen_targets(model, rec, graph, ablate: str | None):
    """Target pre-activations in the frozen replacement model with one node's output removed: a direct
    recomputation through the adapter's forward pass (norm scales, patterns and every other node frozen)."""
    a = model.adapter
    n = rec.ids.shape[0]
    embed = rec.embed.clone()
    attn = [None] * a.n_layers
    mlp = [rec.layers[L].mlp_out.clone() for L in range(a.n_layers)]
    if model.attention == "lorsa":
        attn = [rec.layers[L].attn_out.clone() for L in range(a.n_layers)]
    if ablate is not None:
        node = graph.node(ablate)
        L, p = node.layer, node.pos
        if node.type == "embedding":
            embed[p] = 0
        elif node.type == "lorsa":
            attn[L][p] -= node.activation * model.lorsas[L].W_O[node.index]
        elif node.type == "attn_error":
            attn[L][p] -= rec.layers[L].attn_err[p]
        elif node.type == "transcoder":
            mlp[L][p] -= node.activation * model.transcoders[L].W_dec[node.index]
        elif node.type == "mlp_error":
            mlp[L][p] -= rec.layers[L].mlp_err[p]
    cache = model.frozen_run(rec, attn if model.attention == "lorsa" else None, mlp, embed)
    out = {}
    with torch.no_grad():
        for node in graph.node_list:
            L, p = node.layer, node.pos
            if node.type == "transcoder":
                x = transcoder_input(model.adapter, model.transcoders[L], L, cache)  # mlp.in, or circuit-tracer's reads
                out[node.id] = float(model.transcoders[L].pre_activations(x)[p, node.index])
            elif node.type == "lorsa":
                x = cache[f"blocks.{L}.attn.in"][None]
                z = model.lorsas[L].head_activations(x, rec.layers[L].lorsa_pattern[None])[0]
                out[node.id] = float(z[p, node.index])
            elif node.type == "logit":
                lg = cache["logits"][n - 1]
                out[node.id] = float(lg[node.index] - lg.mean())
    return out


@pytest.mark.parametrize("skip", [False, True], ids=["", "skip"])
@pytest.mark.parametrize("attention", ["lorsa", "frozen"])
@pytest.mark.parametrize("arch", ["llama", "neox_parallel"])
def test_edges_are_real_effects(arch, attention, skip):
    """With ``skip``, transcoder skip connections stay live in the frozen model (frozen_run)."""
    _, model, ids = _setup(arch, attention, skip)
    graph = attribute(model, ids)
    rec = model.record(ids)
    base = _frozen_targets(model, rec, graph, None)
    for node_id, value in base.items():  # the frozen model reproduces every pre-activation
        assert abs(value - graph.node(node_id).preact) <= 1e-4 * max(1.0, abs(value)), node_id
    edges = graph.edges
    rng = random.Random(0)
    for e in rng.sample(edges, 20):
        ablated = _frozen_targets(model, rec, graph, e.source)
        change = base[e.target] - ablated[e.target]
        assert abs(change - e.weight) <= 1e-4 * max(1.0, abs(e.weight)), (e, change)


@pytest.mark.parametrize("arch", ["llama", "neox_parallel"])
def test_z_patterns_are_each_heads_pattern_row_times_its_values(arch):
    """Each Lorsa node's z pattern against a brute force from the module's weights on what attention reads in the
    adapter's own run: its QK group's causal softmax(q_t . k_s / sqrt(d_qk)) row times its values w_v . x_s + b_v,
    s <= t; it sums to the node's pre-activation.  Heads of every group (h // heads_per_group is not h % n_qk for
    most of them)."""
    import math

    _, model, ids = _setup(arch)
    graph = attribute(model, ids, qk=False)
    with torch.no_grad():
        cache = model.adapter.run(ids, capture=True).cache
    heads = graph.nodes(type="lorsa")
    hpg, n_qk = model.lorsas[0].cfg.heads_per_group, model.lorsas[0].cfg.n_qk
    assert sum(h.index // hpg != h.index % n_qk for h in heads) > 10
    for h in heads:
        lorsa, x, t = model.lorsas[h.layer], cache[f"blocks.{h.layer}.attn.in"][0], h.pos
        with torch.no_grad():
            q, k = lorsa.qk(x[None])
            g = h.index // hpg
            A = (k[0, g, : t + 1] @ q[0, g, t] / math.sqrt(lorsa.cfg.d_qk)).softmax(-1)
            want = A * (x[: t + 1] @ lorsa.W_V[h.index] + lorsa.b_V[h.index])
        assert h.z_pattern == pytest.approx(want.tolist(), rel=1e-4, abs=2e-5), h.id
        assert sum(h.z_pattern) == pytest.approx(h.preact, rel=1e-4, abs=1e-4), h.id


def test_parallel_block_has_no_same_layer_attention_to_mlp_edge():
    _, model, ids = _setup("neox_parallel")
    graph = attribute(model, ids)
    for e in graph.edges:
        s, t = graph.node(e.source), graph.node(e.target)
        if t.type == "transcoder" and s.type in ("lorsa", "attn_error"):
            assert s.layer < t.layer
    _, model, ids = _setup("llama")
    graph = attribute(model, ids)
    assert any(graph.node(e.source).type == "lorsa" and graph.node(e.target).type == "transcoder"
               and graph.node(e.source).layer == graph.node(e.target).layer for e in graph.edges)


def test_error_nodes_are_honest():
    """Tracing the pure sparse model: every error is zero, and the logit reconstruction equals the sparse
    model's own (demeaned) logits."""
    _, model, ids = _setup("llama")
    graph = attribute(model, ids, sparse_record=True)
    sparse = model.run_sparse(ids)[-1]
    for e in graph.edges:
        if graph.node(e.source).type in ("attn_error", "mlp_error"):
            assert abs(e.weight) < 1e-4
    for node in graph.logits():
        total = sum(e.weight for e in graph.incoming(node)) + node.const
        assert abs(total - float(sparse[node.index] - sparse.mean())) < 1e-4


@pytest.mark.parametrize("budget", [None, 10])
def test_edges_per_target_keeps_the_identity(budget):
    """Each target keeps its 5 strongest incoming edges, the rest summed into its ``dropped``, with the node
    budget too (the budgeted path kept every edge while the settings recorded the cap)."""
    _, model, ids = _setup("llama")
    graph = attribute(model, ids, edges_per_target=5, max_feature_nodes=budget)
    assert graph.settings["budgeted"] == (budget is not None)
    assert max(reconstruction_errors(graph).values()) <= 1e-4
    counts = torch.bincount(graph.edge_arrays.tgt)
    assert counts.max() == 5


def _hand_graph():
    from graphs.graph import AttributionGraph, Edge, Node

    nodes = [Node("emb@0", "embedding", -1, 0, 5), Node("emb@1", "embedding", -1, 1, 6),
             Node("tc.0.3@1", "transcoder", 0, 1, 3, activation=1.0), Node("mlp_err.0@1", "mlp_error", 0, 1, -1),
             Node("logit.7@1", "logit", 1, 1, 7, prob=0.6), Node("logit.8@1", "logit", 1, 1, 8, prob=0.2)]
    edges = [Edge("emb@0", "tc.0.3@1", 2.0), Edge("emb@1", "tc.0.3@1", -2.0), Edge("tc.0.3@1", "logit.7@1", 1.0),
             Edge("emb@0", "logit.7@1", 3.0), Edge("mlp_err.0@1", "logit.8@1", 1.0)]
    return AttributionGraph("ab", ["a", "b"], [5, 6], nodes, edges)


def test_influence_and_scores_closed_form():
    from graphs.prune import influence, scores

    g = _hand_graph()
    inf = dict(zip([n.id for n in g.node_list], influence(g).tolist()))
    # logit weights 0.75 / 0.25; logit.7 reads tc 1/4, emb@0 3/4; tc reads emb@0 and emb@1 1/2 each
    assert inf["tc.0.3@1"] == pytest.approx(0.75 * 0.25)
    assert inf["emb@0"] == pytest.approx(0.75 * 0.75 + 0.75 * 0.25 * 0.5)
    assert inf["emb@1"] == pytest.approx(0.75 * 0.25 * 0.5)
    assert inf["mlp_err.0@1"] == pytest.approx(0.25)
    s = scores(g)
    assert s["replacement_score"] == pytest.approx(0.75 / 1.0)
    # completeness: targets tc (share 1), logit.7 (1), logit.8 (0), weighted by influence
    expected = (0.1875 * 1 + 0.75 * 1 + 0.25 * 0) / (0.1875 + 0.75 + 0.25)
    assert s["completeness_score"] == pytest.approx(expected)


def _random_dag(g: torch.Generator, n: int, n_edges: int, logit_weights: list[float], order: str):
    """(src, tgt, w, start): a random DAG on n nodes whose last nodes are logits of the given weights; in causal
    order (every edge from a lower index to a higher one) or with the nodes shuffled."""
    src, tgt = torch.randint(0, n, (2, n_edges), generator=g)
    src, tgt = torch.minimum(src, tgt), torch.maximum(src, tgt)
    keep = src < tgt
    src, tgt, w = src[keep], tgt[keep], torch.randn(int(keep.sum()), generator=g)
    start = torch.zeros(n)
    start[-len(logit_weights):] = torch.tensor(logit_weights)
    if order == "shuffled":
        perm = torch.randperm(n, generator=g)  # node i becomes perm[i]
        src, tgt, start = perm[src], perm[tgt], torch.zeros(n).index_put_((perm,), start)
        assert not bool((src < tgt).all())
    return src, tgt, w, start


@pytest.mark.parametrize("order", ["causal", "shuffled"])
def test_influence_of_equals_a_dense_solve(order):
    """On a random DAG: with nodes in causal order (every edge from a lower index to a higher one, as `attribute`
    makes them) influence is a triangular solve; shuffled, the power series; both equal w (I - M)^-1 in float64."""
    from graphs.prune import influence_of

    n = 60
    src, tgt, w, start = _random_dag(torch.Generator().manual_seed(0), n, 400, [0.5, 0.3, 0.2], order)
    M = torch.zeros(n, n, dtype=torch.float64).index_put_((tgt, src), w.double().abs(), accumulate=True)
    M = M / M.sum(1, keepdim=True).clamp_min(1e-300)
    x = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - M).t(), start.double())
    torch.testing.assert_close(influence_of(src, tgt, w, start).double(), x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("order", ["causal", "shuffled"])
def test_growing_influence_equals_influence_of_every_edge(order):
    """The budgeted attribution's influence, kept up to date as whole rows arrive, equals `influence_of` on all
    the edges so far after each batch (causal order: the matrix extended in place; shuffled: the series)."""
    from graphs.prune import GrowingInfluence, influence_of

    g = torch.Generator().manual_seed(1)
    n = 50
    src, tgt, w, start = _random_dag(g, n, 500, [0.7, 0.3], order)
    batches = torch.randint(0, 4, (n,), generator=g)  # the batch in which each target's whole row arrives
    grown = GrowingInfluence(start)
    for b in range(4):
        grown.add(src[batches[tgt] == b], tgt[batches[tgt] == b], w[batches[tgt] == b])
        so_far = batches[tgt] <= b
        expected = influence_of(src[so_far], tgt[so_far], w[so_far], start)
        torch.testing.assert_close(grown(), expected, atol=1e-6, rtol=1e-5)
    assert (grown.M is not None) == (order == "causal")
    assert int(((grown() > 0) & (start == 0)).sum()) > 10  # the influence reached well beyond the logits


def test_prune_keeps_logits_and_checks_thresholds():
    from graphs.prune import prune

    _, model, ids = _setup("llama")
    graph = attribute(model, ids)
    pruned = prune(graph, 0.5, 0.9)
    assert len(pruned) < len(graph) and len(pruned.edge_arrays) < len(graph.edge_arrays)
    assert {n.id for n in pruned.logits()} == {n.id for n in graph.logits()}
    assert 0 <= pruned.scores["replacement_score"] <= 1 and 0 <= pruned.scores["completeness_score"] <= 1
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            prune(graph, bad, 0.9)
    # every target of the pruned graph still adds up: what pruning took away is in its (copied) node's `dropped`
    from graphs.graph import TARGET_KINDS
    from graphs.prune import signed_inputs

    targets = [i for i, n in enumerate(pruned.node_list) if n.type in TARGET_KINDS]
    assert targets and any(pruned.node_list[i].dropped != 0 for i in targets)
    for i in targets:
        n = pruned.node_list[i]
        assert signed_inputs(pruned, i)["total"] == pytest.approx(n.preact, rel=1e-4, abs=1e-4), n.id
        assert graph.node(n.id).dropped == 0.0  # the full graph's node is not touched


@pytest.mark.parametrize("arch", ["llama", "neox_parallel"])
def test_logit_decomposition_sums_to_the_logit_and_its_margin(arch):
    from graphs.prune import logit_decomposition

    _, model, ids = _setup(arch)
    graph = attribute(model, ids, qk=False)
    dec = graph.scores["logit_decomposition"]
    logits = sorted(graph.nodes(type="logit"), key=lambda n: -n.prob)
    assert len(logits) >= 2 and dec["target"]["node"] == logits[0].id and dec["runner_up"]["node"] == logits[1].id
    for key, node in (("target", logits[0]), ("runner_up", logits[1])):
        d = dec[key]
        parts = {"features": 0.0, "errors": 0.0, "embeddings": 0.0}  # independently, from the Edge objects
        for e in graph.edges:
            if e.target == node.id:
                t = graph.node(e.source).type
                parts["features" if t in ("lorsa", "transcoder") else "errors" if "error" in t else "embeddings"] += e.weight
        for p, v in parts.items():
            assert d[p] == pytest.approx(v, rel=1e-5, abs=1e-6)
        assert d["total"] == pytest.approx(node.preact, rel=1e-4, abs=1e-4)  # exact: edges + constants
    m = dec["margin"]
    assert m["total"] == pytest.approx(logits[0].preact - logits[1].preact, rel=1e-4, abs=1e-4)
    from graphs.prune import SHARED_MARGIN

    assert dec["error_share"] == (pytest.approx(m["errors"] / m["total"]) if abs(m["total"]) >= SHARED_MARGIN else None)
    second = logit_decomposition(graph, logits[1].index)  # another target: the runner-up is then the top one
    assert second["target"]["node"] == logits[1].id and second["runner_up"]["node"] == logits[0].id


def test_a_target_asked_for_weighs_as_much_as_the_other_logits():
    """Influence starts from the logits' probabilities; a target asked for (not the top token) weighs at least as
    much as every other logit together (a brute-force solve with that start), so pruning keeps its inputs however
    unlikely it is; the top token as the target changes nothing."""
    from graphs.prune import influence, logit_start, prune

    _, model, ids = _setup("llama")
    plain = attribute(model, ids, qk=False)
    unlikely = min(plain.logits(), key=lambda nd: nd.prob)
    assert unlikely.prob < 0.5
    graph = attribute(model, ids, qk=False, target=unlikely.index)
    assert graph.target.index == unlikely.index
    p = torch.tensor([nd.prob if nd.type == "logit" else 0.0 for nd in graph.node_list], dtype=torch.float64)
    t = graph.index[graph.target.id]
    want = p.clone()
    want[t] = p.sum() - p[t]  # the rest's mass, as it is more than its own
    torch.testing.assert_close(logit_start(graph.node_list, unlikely.index).double(), want / want.sum())
    torch.testing.assert_close(logit_start(graph.node_list, None).double(), p / p.sum())
    top = graph.logits()[0]  # the model's top token as the target changes nothing
    torch.testing.assert_close(logit_start(graph.node_list, top.index).double(), p / p.sum())
    n, E = len(graph), graph.edge_arrays  # the influence with that start, by a dense solve
    M = torch.zeros(n, n, dtype=torch.float64)
    M.index_put_((E.tgt, E.src), E.w.double().abs(), accumulate=True)
    M = M / M.sum(1, keepdim=True).clamp_min(1e-300)
    x = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - M).t(), want / want.sum())
    torch.testing.assert_close(influence(graph).double(), x, atol=1e-6, rtol=1e-4)
    pruned = prune(graph)
    assert pruned.incoming(pruned.target)  # its inputs are kept


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "scatter"])
def test_prune_matches_brute_force_influence(dense, monkeypatch):
    """Influence is w (I - M)^-1 with M[t, s] the normalised |weight| of s -> t (a dense float64 solve, not
    the power series, whose steps are matrix products on small graphs and gather-scatters above
    ``DENSE_INFLUENCE_NODES``: both are checked); pruning keeps features only from the most influential ones covering the node
    threshold, edges only from the strongest influence-weighted ones among them covering the edge
    threshold, no kept node but a logit without an outgoing edge, and stores the full graph's scores."""
    import graphs.prune
    from graphs.prune import influence, prune

    if not dense:
        monkeypatch.setattr(graphs.prune, "DENSE_INFLUENCE_NODES", 0)
    _, model, ids = _setup("llama")
    graph = attribute(model, ids, qk=False)
    n, E = len(graph), graph.edge_arrays
    M = torch.zeros(n, n, dtype=torch.float64)
    M.index_put_((E.tgt, E.src), E.w.double().abs(), accumulate=True)
    M = M / M.sum(1, keepdim=True).clamp_min(1e-300)
    w = torch.tensor([nd.prob if nd.type == "logit" else 0.0 for nd in graph.node_list], dtype=torch.float64)
    x = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - M).t(), w / w.sum())
    torch.testing.assert_close(influence(graph).double(), x, atol=1e-6, rtol=1e-4)
    ids_ = [nd.id for nd in graph.node_list]
    feats = sorted((i for i, nd in enumerate(graph.node_list) if nd.type in ("lorsa", "transcoder")), key=lambda i: -x[i])
    total, top = float(x[feats].sum()), set()
    for i in feats:
        top.add(i)
        if float(x[list(top)].sum()) >= 0.6 * total:
            break
    allowed = {i for i, nd in enumerate(graph.node_list) if nd.type not in ("lorsa", "transcoder")} | top
    cand = [(float(M[t, s] * x[t]), s, t) for s, t in zip(E.src.tolist(), E.tgt.tolist()) if s in allowed and t in allowed]
    cand.sort(reverse=True)
    mass, edges, got = sum(c[0] for c in cand), set(), 0.0
    for m, s, t in cand:
        edges.add((ids_[s], ids_[t]))
        got += m
        if got >= 0.9 * mass:
            break
    nodes = {ids_[i] for i in allowed}
    while True:  # then nodes left without an outgoing edge go (logits stay), with their edges, until none is left
        has_out = {s for s, _ in edges}
        left = {i for i in nodes if i in has_out or graph.node(i).type == "logit"}
        kept_edges = {(s, t) for s, t in edges if s in left and t in left}
        if left == nodes and kept_edges == edges:
            break
        nodes, edges = left, kept_edges
    pruned = prune(graph, 0.6, 0.9)
    assert any(graph.node(i).type in ("lorsa", "transcoder") for i in nodes)
    assert {nd.id for nd in pruned.node_list} == nodes
    assert {(e.source, e.target) for e in pruned.edges} == edges
    emb = sum(float(x[i]) for i, nd in enumerate(graph.node_list) if nd.type == "embedding")
    err = sum(float(x[i]) for i, nd in enumerate(graph.node_list) if nd.type in ("attn_error", "mlp_error"))
    assert pruned.scores["replacement_score"] == pytest.approx(emb / (emb + err), rel=1e-4)
    for nd in pruned.node_list:
        assert nd.influence == pytest.approx(float(x[graph.index[nd.id]]), abs=1e-6, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "neox_parallel"])
def test_node_ids_are_their_keys(arch):
    """Every node's id is its NodeKey's string form, and parsing the id gives the key back; malformed ids
    are refused in one line."""
    from graphs.graph import NodeKey, NodeKind
    from replacement.errors import BadInputError

    _, model, ids = _setup(arch)
    graph = attribute(model, ids, qk=False)
    assert {n.type for n in graph.node_list} == set(NodeKind)
    for n in graph.node_list:
        assert str(n.key) == n.id and NodeKey.parse(n.id) == n.key
        assert (n.key.kind, n.key.pos) == (n.type, n.pos)
    for bad in ("emb.1@2", "lorsa.1@3", "tc.1.2", "logit.3.4@1", "mlp_err.1.2@0", "head.0.1@2", "", "tc.1.2@-1"):
        with pytest.raises(BadInputError, match="cannot parse node id"):
            NodeKey.parse(bad)
