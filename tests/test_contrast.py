"""Contrastive QK attribution: score(t, s) - reference splits exactly into query-node x key-unit pairs,
checked against the module's own scores (brute force), and a pair that alone differs carries all of it."""
from __future__ import annotations

import math

import pytest
import torch

from graphs import contrast
from graphs.attribution import attribute
from graphs.graph import QKEntry
from graphs.qk import QKTables
from replacement.models import ModelAdapter
from tests.conftest import independent_qk, random_replacements, tiny_llama, tiny_neox


def _real_scores(model, rec, head) -> torch.Tensor:
    """[t+1]: the head's pre-softmax scores at every key, from the Lorsa module's own Q and K."""
    lorsa = model.lorsas[head.layer]
    q, k = lorsa.qk(rec.layers[head.layer].attn_in[None])
    g = head.index // lorsa.cfg.heads_per_group
    return (k[0, g, : head.pos + 1] @ q[0, g, head.pos]).detach() / math.sqrt(lorsa.cfg.d_qk)


@pytest.mark.parametrize("make", [lambda: tiny_llama(attention_bias=True), tiny_neox],
                         ids=["llama_rope_gqa", "neox_partial_rotary"])
@pytest.mark.parametrize("reference", ["mean", "runner_up"])
def test_contrast_sums_to_the_real_score_difference(make, reference):
    model = random_replacements(ModelAdapter(make(), name="m"))
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 10))
    graph = attribute(model, ids, qk_top_keys=3, qk_reference=reference)
    rec = model.record(ids)
    checked = 0
    for head in graph.nodes(type="lorsa"):
        scores = _real_scores(model, rec, head)
        q, k, qb, kb = independent_qk(model, rec, head.layer)
        g = head.index // model.lorsas[head.layer].cfg.heads_per_group
        A = rec.layers[head.layer].lorsa_pattern[g, head.pos, : head.pos + 1]
        for e in head.qk:
            c = e.contrast
            if head.pos == 0:
                assert c is None
                continue
            if reference == "mean":  # the other keys, weighted by their attention
                assert c.reference_pos == -1
                rest = A.clone()
                rest[e.key_pos] = 0
                ref = float(rest @ scores / rest.sum())
                ref_weight = lambda p: float(rest[p] / rest.sum())  # noqa: E731
            else:  # the strongest other key
                others = A.clone()
                others[e.key_pos] = -1
                assert c.reference_pos == int(others.argmax())
                ref = float(scores[c.reference_pos])
                ref_weight = lambda p: float(p == c.reference_pos)  # noqa: E731
            real = float(scores[e.key_pos]) - ref
            size = max(1.0, float(scores.abs().max()))
            assert c.difference == pytest.approx(real, abs=1e-4 * size), (head.id, e.key_pos)
            assert c.reference_score == pytest.approx(ref, abs=1e-4 * size)
            w = -torch.tensor([ref_weight(p) for p in range(head.pos + 1)])  # [p <= t]: +1 at the key, -c_p elsewhere
            w[e.key_pos] = 1.0
            t, scale = head.pos, 1 / math.sqrt(model.lorsas[head.layer].cfg.d_qk)
            dk_nodes, dkb = w @ (k[g, : t + 1] - kb[g, : t + 1]), w @ kb[g, : t + 1]  # [e] each
            for got, want in ((c.pairs_total, (q[g, t] - qb[g, t]) @ dk_nodes), (c.query_bias_x_keys, qb[g, t] @ dk_nodes),
                              (c.position, q[g, t] @ dkb)):  # each term, from the module's own Q/K (conftest)
                assert got == pytest.approx(float(want) * scale, rel=1e-5, abs=1e-4 * size), (head.id, e.key_pos)
            assert abs(c.pairs[0].weight) >= abs(c.pairs[-1].weight)
            checked += 1
    assert checked > 20


def test_top_pairs_are_those_of_the_full_unit_table():
    """Brute force: build every (query node, key unit) term of the difference from the per-node tables,
    grouping key nodes by their (type, layer, index) read off the graph's nodes; the table sums to
    pairs_total and its largest terms are the reported pairs."""
    from graphs.attribution import _graph_nodes
    from graphs.linear import Linearised
    from graphs.qk import Writes

    model = random_replacements(ModelAdapter(tiny_llama(), name="m"), lorsa_k=8, heads_per_group=8, tc_k=8)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, 9))
    graph = attribute(model, ids, qk_top_pairs=5, qk_reference="mean")
    rec = model.record(ids)
    made = _graph_nodes(model, rec, graph.tokens)
    by_id = {n.id: n for n in made.nodes}
    tabs = QKTables(Linearised(model, rec), Writes(made.nodes, made.sources), 1)
    hpg = model.lorsas[1].cfg.heads_per_group
    checked = 0
    for head in graph.nodes(type="lorsa", layer=1):
        if head.pos < 2:
            continue
        g, t = head.index // hpg, head.pos
        A = rec.layers[1].lorsa_pattern[g, t, : t + 1]
        Q = tabs.parts[g, t, : len(tabs.names[t])]
        for e in head.qk:
            w = -A.clone()
            w[e.key_pos] = 0
            w = w / -w.sum()
            w[e.key_pos] = 1
            table: dict[tuple[str, tuple], float] = {}
            part: dict[tuple, dict[str, float]] = {}  # unit -> {its node at a position: that node's part of its marginal}
            q_t = Q.sum(0) + tabs.side_bias(0, torch.tensor([g]), torch.tensor([t]))[0]
            for p in range(t + 1):
                K = tabs.parts[tabs.G + g, p, : len(tabs.names[p])]
                vals = Q @ K.t() * tabs.scale * w[p]  # [mq, mk]
                for a, qn in enumerate(tabs.names[t]):
                    for b, kn in enumerate(tabs.names[p]):
                        nd = by_id[kn]
                        unit = (nd.type, nd.layer, nd.index)
                        table[(qn, unit)] = table.get((qn, unit), 0.0) + float(vals[a, b])
                for b, kn in enumerate(tabs.names[p]):
                    nd = by_id[kn]
                    part.setdefault((nd.type, nd.layer, nd.index), {})[kn] = float(K[b] @ q_t * tabs.scale * w[p])
            c = e.contrast
            assert sum(table.values()) == pytest.approx(c.pairs_total, rel=1e-5, abs=1e-4)
            best = sorted(table.values(), key=abs, reverse=True)[: len(c.pairs)]
            torch.testing.assert_close(torch.tensor([p.weight for p in c.pairs]), torch.tensor(best),
                                       atol=1e-5, rtol=1e-4)
            for p in c.pairs:  # each pair's name: a query node at t, a key node of the unit
                kn = by_id[p.key]
                assert table[(p.query, (kn.type, kn.layer, kn.index))] == pytest.approx(p.weight, rel=1e-5, abs=1e-5)
            for name, value in c.query_marginals:  # a query node against every key's whole vector, weighted as w
                a = tabs.names[t].index(name)
                want = sum(float(Q[a] @ (tabs.parts[tabs.G + g, p, : len(tabs.names[p])].sum(0)
                                         + tabs.side_bias(1, torch.tensor([g]), torch.tensor([p]))[0])) * float(w[p])
                           for p in range(t + 1)) * tabs.scale
                assert value == pytest.approx(want, rel=1e-4, abs=1e-4), name
            for name, value in c.key_marginals:  # a unit's sum over the positions, named where most of it comes from
                nd = by_id[name]
                parts = part[(nd.type, nd.layer, nd.index)]
                assert sum(parts.values()) == pytest.approx(value, rel=1e-4, abs=1e-4)
                assert abs(parts[name]) >= max(abs(v) for v in parts.values()) - 1e-5, (name, parts)
            checked += 1
    assert checked > 5


def _tables(q_nodes, q_bias, keys, k_bias) -> QKTables:
    """QKTables of one QK group built by hand: q_nodes {name: [e]} at the query position (the last),
    keys per position [{name: (unit, [e])}], biases [e] and [n, e]."""
    n, e = len(keys), len(q_bias)
    M = max(max(len(k) for k in keys), len(q_nodes))
    tabs = object.__new__(QKTables)
    tabs.parts = torch.zeros(2, n, M, e)
    tabs.groups = torch.full((n, M), -1, dtype=torch.long)
    tabs.names = [list(k) for k in keys]
    for p, k in enumerate(keys):
        for r, (unit, vec) in enumerate(k.values()):
            tabs.parts[1, p, r], tabs.groups[p, r] = torch.tensor(vec), unit
    t = n - 1
    tabs.names[t] = list(q_nodes)
    for r, vec in enumerate(q_nodes.values()):
        tabs.parts[0, t, r] = torch.tensor(vec)
    tabs.bias = torch.stack([torch.zeros(n, e), torch.tensor(k_bias)])
    tabs.bias[0, t] = torch.tensor(q_bias)
    tabs.norms = tabs.parts.norm(dim=-1)
    tabs.local, tabs.G, tabs.scale = torch.tensor([0]), 1, 0.5
    return tabs


def test_the_one_pair_that_differs_carries_all_of_it():
    """Keys 0 (the runner-up) and 1 hold the same two units with the same vectors and the same key bias;
    key 1 also holds unit 9 (``tc.0.7@1``), orthogonal to every query vector (and the query bias) except
    ``tc.0.2@2``'s: that pair is the whole difference, every other term is zero (to float precision)."""
    e = 4
    rng = torch.Generator().manual_seed(0)
    shared = {5: torch.randn(e, generator=rng).tolist(), 6: torch.randn(e, generator=rng).tolist()}
    keys = [{"emb@0": (5, shared[5]), "tc.0.1@0": (6, shared[6])},
            {"emb@1": (5, shared[5]), "tc.0.1@1": (6, shared[6]), "tc.0.7@1": (9, [0.0, 3.0, 0.0, 0.0])},
            {}]
    kb = [[0.2, -0.1, 0.4, 0.0]] * 3
    q_nodes = {"emb@2": [1.0, 0.0, 0.5, 0.3], "tc.0.2@2": [0.0, 2.0, 0.0, 0.0], "tc.0.3@2": [0.7, 0.0, -1.0, 0.2]}
    keys[2] = {"emb@2": (7, [0.1, 0.0, 0.0, 0.1])}
    tabs = _tables(q_nodes, [0.3, 0.0, 0.1, -0.4], keys, kb)
    attention = torch.tensor([0.5, 0.3, 0.2])  # key 0 leads: the runner-up of key 1
    c = contrast.explain_query(tabs, 0, 2, [1], attention, "runner_up", top_pairs=4)[0]
    assert c.reference_pos == 0
    want = 2.0 * 3.0 * tabs.scale  # q(tc.0.2) . k(tc.0.7)
    assert c.difference == pytest.approx(want, abs=1e-6)
    assert c.pairs[0].query == "tc.0.2@2" and c.pairs[0].key == "tc.0.7@1"
    assert c.pairs[0].weight == pytest.approx(want, abs=1e-6)
    assert all(abs(p.weight) < 1e-6 for p in c.pairs[1:])
    assert c.position == pytest.approx(0.0, abs=1e-6) and c.query_bias_x_keys == pytest.approx(0.0, abs=1e-6)
    # the raw scores, by contrast, are dominated by the shared units and biases
    q_t = tabs.parts[0, 2].sum(0) + tabs.bias[0, 2]
    raw = [float(q_t @ (tabs.parts[1, p].sum(0) + tabs.bias[1, p]) * tabs.scale) for p in (0, 1)]
    assert c.reference_score == pytest.approx(raw[0], abs=1e-6)
    assert raw[1] - raw[0] == pytest.approx(want, abs=1e-6)


def test_mean_reference_cancels_a_constant_key_and_keeps_position():
    """w sums to 0: a key bias equal at every position contributes nothing; one that differs (rotary,
    norm scale) is the position term, q_t . (kb_s - sum_{p != s} A_p kb_p / sum_{p != s} A_p)."""
    A = torch.tensor([0.2, 0.5, 0.3])
    w, ref = contrast.reference_weights(A, torch.tensor([1, 2]), "mean")
    assert torch.allclose(w.sum(1), torch.zeros(2)) and ref.tolist() == [-1, -1]
    assert torch.allclose(w, torch.tensor([[-0.4, 1.0, -0.6], [-0.2 / 0.7, -0.5 / 0.7, 1.0]]))
    saturated, _ = contrast.reference_weights(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1]), "mean")
    assert torch.allclose(saturated, torch.tensor([[-0.5, 1.0, -0.5]]))  # the others' uniform mean
    Q, qb = torch.randn(2, 3), torch.randn(3)
    K, row_pos, unit = torch.randn(4, 3), torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 0, 2])
    flat = contrast.split_rows(Q, qb, K, row_pos, unit, 3, torch.ones(3, 3), w, 1.0)
    assert torch.allclose(flat.position, torch.zeros(2), atol=1e-6)
    kb = torch.randn(3, 3)
    split = contrast.split_rows(Q, qb, K, row_pos, unit, 3, kb, w, 1.0)
    q_t = Q.sum(0) + qb
    for j, s in enumerate([1, 2]):
        c = A.clone()
        c[s] = 0
        c = c / c.sum()
        assert float(split.position[j]) == pytest.approx(float(q_t @ (kb[s] - c @ kb)), abs=1e-6)
        scores = (torch.stack([K[row_pos == p].sum(0) for p in range(3)]) + kb) @ q_t
        assert float(split.difference[j]) == pytest.approx(float(scores[s] - c @ scores), abs=1e-5)
        assert float(split.key_marginals[j].sum()) == pytest.approx(
            float(split.pairs_total[j] + split.query_bias_x_keys[j]), abs=1e-5)
    with pytest.raises(ValueError, match="reference must be"):
        contrast.reference_weights(A, torch.tensor([1]), "median")


def test_contrast_round_trips_through_json(tmp_path):
    model = random_replacements(ModelAdapter(tiny_llama(), name="m"))
    graph = attribute(model, torch.randint(0, 97, (1, 6)), qk_reference="runner_up")
    entries = [e for n in graph.nodes(type="lorsa") for e in n.qk if e.contrast is not None]
    assert entries
    for e in entries[:20]:
        back = QKEntry.from_json(e.to_json())
        assert back == e
    path = graph.save(tmp_path / "g.json")  # validates against the schema on write
    assert type(graph).load(path) == graph


@pytest.mark.parametrize("reference", ["mean", "runner_up"])
def test_groups_explained_together_equal_one_at_a_time(monkeypatch, reference):
    """`qk_attribution` explains the QK groups of one query position in one batch (`explain_queries`); every
    contrast (difference, terms, pairs, marginals) equals the one each group gets on its own."""
    model = random_replacements(ModelAdapter(tiny_llama(attention_bias=True), name="m"))
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (1, 9))
    batched = contrast.explain_queries
    sizes = []

    def counted(tabs, t, groups, *a, **k):
        sizes.append(len(groups))
        return batched(tabs, t, groups, *a, **k)

    def alone(tabs, t, groups, keys, attention, *a, **k):
        return [batched(tabs, t, [g], [ks], att[None], *a, **k)[0] for g, ks, att in zip(groups, keys, attention)]

    monkeypatch.setattr(contrast, "explain_queries", counted)
    together = attribute(model, ids, qk_top_keys=3, qk_reference=reference)
    assert max(sizes) > 1  # some position had several groups to explain
    monkeypatch.setattr(contrast, "explain_queries", alone)
    single = attribute(model, ids, qk_top_keys=3, qk_reference=reference)
    monkeypatch.setattr(contrast, "explain_queries", batched)
    monkeypatch.setattr(contrast, "BATCH_BYTES", 1)  # the memory cap: one group at a time, through the batch's path
    capped = attribute(model, ids, qk_top_keys=3, qk_reference=reference)
    for head in capped.nodes(type="lorsa"):
        assert [e.contrast for e in head.qk] == [e.contrast for e in single.node(head.id).qk]
    compared = 0
    for head in together.nodes(type="lorsa"):
        for e1, e2 in zip(head.qk, single.node(head.id).qk, strict=True):
            c1, c2 = e1.contrast, e2.contrast
            if c1 is None:
                assert c2 is None
                continue
            assert (c1.reference, c1.reference_pos) == (c2.reference, c2.reference_pos)
            for f in ("difference", "reference_score", "pairs_total", "query_bias_x_keys", "position"):
                assert getattr(c1, f) == pytest.approx(getattr(c2, f), abs=1e-5), f
            assert [(p.query, p.key) for p in c1.pairs] == [(p.query, p.key) for p in c2.pairs]
            assert [p.weight for p in c1.pairs] == pytest.approx([p.weight for p in c2.pairs], abs=1e-5)
            assert [u for u, _ in c1.key_marginals] == [u for u, _ in c2.key_marginals]
            assert [u for u, _ in c1.query_marginals] == [u for u, _ in c2.query_marginals]
            compared += 1
    assert compared > 20


def test_describe_gives_shares_of_the_difference_only_where_its_terms_do_not_cancel():
    """+2.0 = pairs +1.5 + bias +0.3 + position +0.2: each value also as a share of the difference; +1.44 = pairs
    +17.87 - 19.36 + 2.93 (llama's `lorsa.1.719@21`): shares of it would read +185%, so none are given."""
    from graphs.graph import QKContrast, QKEntry, QKPair

    def lines(diff, pt, qbk, pos):
        c = QKContrast("mean", -1, 10.0 - diff, diff, [QKPair("emb@3", "tc.0.1@1", 0.8)], pt, qbk, pos,
                       [("emb@3", 0.9)], [("tc.0.1@1", 1.2)])
        return contrast.describe(QKEntry(1, 0.9, 10.0, contrast=c))

    plain = "\n".join(lines(2.0, 1.5, 0.3, 0.2))
    assert "emb@3 x tc.0.1@1 +0.8000 (+40%)" in plain and "tc.0.1@1 +1.2000 (+60%)" in plain and "cancel" not in plain
    cancelling = "\n".join(lines(1.44, 17.87, -19.36, 2.93))
    assert "%" not in cancelling and "the terms cancel, so no shares of it are given" in cancelling
    assert "emb@3 x tc.0.1@1 +0.8000" in cancelling
