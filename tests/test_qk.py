"""QK feature-pair attribution: the pair table sums to the real pre-softmax score, rotary included."""
from __future__ import annotations

import math

import pytest
import torch

from graphs.attribution import attribute
from replacement.models import ModelAdapter
from tests.conftest import attn_norm_linear, independent_qk, node_write, random_replacements, tiny_llama, tiny_neox


@pytest.mark.parametrize("make", [lambda: tiny_llama(attention_bias=True), tiny_neox,
                                  lambda: tiny_neox(use_parallel_residual=False), "odd"],
                         ids=["llama_rope_gqa", "neox_partial_rotary", "neox_sequential", "llama_odd_d_qk"])
@pytest.mark.parametrize("skip", [False, True], ids=["", "skip"])
def test_pair_table_sums_to_the_real_score(make, skip):
    """With ``skip`` every transcoder has a skip connection: layer 1's heads read layer 0's skip output.  An odd
    QK width (``--lorsa-d-qk 17`` beside a rotary map of 16) raised a RuntimeError in the rotary step."""
    adapter = ModelAdapter(tiny_llama() if make == "odd" else make(), name="m")
    model = random_replacements(adapter, skip=skip, d_qk=adapter.d_head + 1 if make == "odd" else None)
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 10))
    graph = attribute(model, ids, qk_top_keys=3)
    rec = model.record(ids)
    heads = graph.nodes(type="lorsa")
    assert heads and graph.qk
    checked = 0
    for head in heads:
        lorsa = model.lorsas[head.layer]
        q, k = lorsa.qk(rec.layers[head.layer].attn_in[None])  # independent: the module's own Q/K
        g = head.index // lorsa.cfg.heads_per_group
        infos = head.qk
        assert len(infos) == min(3, head.pos + 1)
        for info in infos:
            s = info.key_pos
            qv, kv = q[0, g, head.pos].detach(), k[0, g, s].detach()
            real = float(qv @ kv) / math.sqrt(lorsa.cfg.d_qk)
            # with skips, random biases 10x the tiny model's stream cancel against error nodes twice over;
            # float32 rounding then scales with |q| |k| (>= |score|), not with the score
            size = max(1.0, abs(real), float(qv.norm() * kv.norm()) / math.sqrt(lorsa.cfg.d_qk) if skip else 0.0)
            assert abs(info.score - real) <= 1e-4 * size, (head.id, s)
            parts = info.pairs_total + info.query_bias_x_keys + info.queries_x_key_bias + info.bias_x_bias
            assert parts == pytest.approx(info.score, rel=1e-5, abs=1e-5)
            checked += 1
        # top keys are the strongest of the head's pattern row
        A = rec.layers[head.layer].lorsa_pattern[g, head.pos]
        assert infos[0].attention == pytest.approx(float(A.max()))
    assert checked > 20


@pytest.mark.parametrize("make", [lambda: tiny_llama(attention_bias=True), tiny_neox], ids=["llama", "neox"])
@torch.no_grad()
def test_score_parts_and_marginals_equal_an_independent_split(make):
    """Each of the four parts of a score, and each marginal listed, recomputed with the module's own Q/K: the
    stream's constant part is the replacements' output biases (no skips; the model's own biases land in the error
    nodes), normalised at the recorded scale; a node's query (key) is what Q (K) make of its write alone, minus the
    bias they add to nothing."""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)  # random biases everywhere: every part is non-zero
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    graph = attribute(model, ids, qk_top_keys=3)
    rec = model.record(ids)
    n, d = ids.shape[1], adapter.d_model
    parts = marginals = 0
    for head in graph.nodes(type="lorsa"):
        L, lorsa = head.layer, model.lorsas[head.layer]
        q, k, qb, kb = (x[None] for x in independent_qk(model, rec, L))
        q0, k0 = lorsa.qk(torch.zeros(1, n, d))  # the bias Q and K add to nothing
        g, t, c = head.index // lorsa.cfg.heads_per_group, head.pos, 1 / math.sqrt(lorsa.cfg.d_qk)

        def alone(node_id: str, side: int) -> torch.Tensor:  # [e]: a node's query (side 0) or key (1), alone
            at = graph.node(node_id).pos
            x = torch.zeros(n, d)  # its write alone, through the norm's linear part
            x[at] = attn_norm_linear(model, rec, L, node_write(graph, model, rec, node_id).expand(n, d))[at]
            return lorsa.qk(x[None])[side][0, g, at] - (q0, k0)[side][0, g, at]

        for e in head.qk:
            s = e.key_pos
            q_nodes, k_nodes = q[0, g, t] - qb[0, g, t], k[0, g, s] - kb[0, g, s]
            want = [q_nodes @ k_nodes, qb[0, g, t] @ k_nodes, q_nodes @ kb[0, g, s], qb[0, g, t] @ kb[0, g, s]]
            got = [e.pairs_total, e.query_bias_x_keys, e.queries_x_key_bias, e.bias_x_bias]
            size = float(q[0, g, t].norm() * k[0, g, s].norm()) * c
            for name, a, b in zip(("pairs", "query bias x keys", "queries x key bias", "bias x bias"), got, want):
                assert a == pytest.approx(float(b) * c, abs=1e-4 * size), (head.id, s, name)
                parts += 1
            for name, value in e.query_marginals:
                assert value == pytest.approx(float(alone(name, 0) @ k[0, g, s]) * c, abs=1e-4 * size), (head.id, name)
                marginals += 1
            for name, value in e.key_marginals:
                assert value == pytest.approx(float(alone(name, 1) @ q[0, g, t]) * c, abs=1e-4 * size), (head.id, name)
                marginals += 1
    assert parts > 40 and marginals > 40


def test_qk_edges_link_query_and_key_positions():
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    graph = attribute(model, torch.randint(0, 97, (1, 8)), qk_heads=5, qk_top_pairs=4)
    heads = {e.head for e in graph.qk}
    assert 0 < len(heads) <= 5
    for e in graph.qk:
        head = graph.node(e.head)
        qn, kn = graph.node(e.query), graph.node(e.key)
        assert qn.pos == head.pos and kn.pos == e.key_pos
        assert qn.layer < head.layer and kn.layer < head.layer  # written before the head reads
    for h in heads:
        pairs = graph.qk_pairs(h)
        per_key = {}
        for e in pairs:
            per_key.setdefault(e.key_pos, []).append(e)
        assert all(len(v) <= 4 for v in per_key.values())
        assert abs(pairs[0].weight) >= abs(pairs[-1].weight)


def test_screened_top_pairs_equal_the_full_table():
    """The screened top pairs are exactly the top pairs of the full table (brute force)."""
    from graphs.linear import Linearised
    from graphs import qk as qkmod

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter, lorsa_k=8, heads_per_group=8, tc_k=8)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, 10))
    for screen in (2, 4, 64):
        orig = qkmod._explain_batch
        qkmod._explain_batch = lambda *a, **k: orig(*a, **{**k, "screen": screen})
        try:
            graph = attribute(model, ids, qk_top_pairs=5)
        finally:
            qkmod._explain_batch = orig
        rec = model.record(ids)
        for head in graph.nodes(type="lorsa", layer=1)[:6]:
            for info in head.qk:
                lorsa = model.lorsas[1]
                g = head.index // lorsa.cfg.heads_per_group
                # brute force: every node at the two positions, through the module's own projections
                lin = Linearised(model, rec)
                tabs = qkmod.QKTables(lin, qkmod.Writes(graph.node_list, _sources(graph, model, rec)), 1)
                s = info.key_pos
                Q = tabs.side(0, torch.tensor([g]), torch.tensor([head.pos]), len(tabs.names[head.pos]))[0]
                K = tabs.side(1, torch.tensor([g]), torch.tensor([s]), len(tabs.names[s]))[0]
                full = Q @ K.t() * tabs.scale
                best = full.flatten().abs().topk(len(info.pairs)).values
                got = torch.tensor([abs(p.weight) for p in info.pairs])
                torch.testing.assert_close(got, best, atol=1e-6, rtol=1e-5)


def _sources(graph, model, rec):
    from graphs.attribution import _graph_nodes

    return _graph_nodes(model, rec, graph.tokens).sources


def test_qk_heads_at_least_the_heads_is_the_default():
    """qk_heads = N explains at most N heads (the most influential), counting the ones explained later for being
    kept as pair nodes; N at least the heads kept gives what explaining every head (the default) gives."""
    from graphs.prune import prune

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    every = prune(attribute(model, ids, qk_defer=True), 0.6, 0.9)
    many = prune(attribute(model, ids, qk_heads=10_000, qk_defer=True), 0.6, 0.9)
    assert [n.id for n in many.node_list] == [n.id for n in every.node_list]
    assert [(e.head, e.query, e.key, e.weight) for e in many.qk] == [(e.head, e.query, e.key, e.weight) for e in every.qk]
    assert all(n.qk for n in many.nodes(type="lorsa"))
    for n in (1, 3):
        few = prune(attribute(model, ids, qk_heads=n, qk_defer=True), 0.6, 0.9)
        assert 0 < sum(bool(x.qk) for x in few.node_list) <= n


@pytest.mark.parametrize("qk_heads", [None, 3])
def test_deferred_explanations_equal_the_eager_ones_after_pruning(qk_heads):
    """`trace` explains only the heads pruning keeps (attribute(..., qk_defer=True)): its pruned graph holds the
    same heads, QK entries, pairs and kept pair nodes as a graph whose every head was explained first."""
    from graphs.prune import prune

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    eager = attribute(model, ids, qk_heads=qk_heads)
    assert sum(bool(n.qk) for n in eager.node_list) == (qk_heads or len(eager.nodes(type="lorsa")))
    eager = prune(eager, 0.6, 0.9)
    whole = attribute(model, ids, qk_heads=qk_heads, qk_defer=True)
    assert not any(n.qk for n in whole.node_list)  # nothing explained before pruning
    lazy = prune(whole, 0.6, 0.9)
    assert [n.id for n in lazy.node_list] == [n.id for n in eager.node_list]
    explained = [n for n in lazy.node_list if n.qk]
    assert explained and len(explained) < len(whole.nodes(type="lorsa"))  # the point: fewer heads explained
    if qk_heads is None:
        assert all(n.qk for n in lazy.nodes(type="lorsa"))
    for a, b in zip(eager.node_list, lazy.node_list):
        if b.qk:  # eager's qk_heads picks the most influential of the whole graph, lazy's of the kept heads
            assert a.qk == b.qk, a.id
    if qk_heads is None:  # the same pairs shown, in the same order
        assert [(e.head, e.query, e.key, e.weight) for e in lazy.qk] == [(e.head, e.query, e.key, e.weight) for e in eager.qk]
