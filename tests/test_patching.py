"""Path patching against a brute-force forward pass that overwrites every attention head's output."""
from __future__ import annotations

import math

import pytest
import torch

from graphs.graph import NodeKind
from graphs.patching import Component, PathPatcher, graph_effects, parse_component, path_patch, rank_lorsa_heads
from replacement.errors import BadInputError
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama, tiny_neox


def _brute_force_head(adapter, ids, layer, head, pos, target, scale=0.0):
    return _brute_force_heads(adapter, ids, [(layer, head, pos)], target, scale)


def _brute_force_heads(adapter, ids, ablated, target, scale=0.0):
    """Every head's z is overwritten with its clean value, except the ablated (layer, head, pos) ones (times
    scale at pos, or at every position for pos None)."""
    with torch.no_grad():
        clean = adapter.run(ids, capture=[f"blocks.{L}.attn.z" for L in range(adapter.n_layers)]).cache
        hooks = {}
        for L in range(adapter.n_layers):
            z = clean[f"blocks.{L}.attn.z"].clone()
            for layer, head, pos in ablated:
                if L == layer:
                    z[0, slice(None) if pos is None else pos, head] *= scale
            hooks[f"blocks.{L}.attn.z"] = lambda t, n, z=z: z
            hooks[f"blocks.{L}.attn.pattern"] = lambda t, n: t  # (patterns do not matter once z is fixed)
        base = adapter.run(ids).logits[0, -1, target]
        patched = adapter.run(ids, hooks=hooks).logits[0, -1, target]
    return float(patched - base)


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama", "neox"])
@pytest.mark.parametrize("comp", ["head.0.1@8", "head.1.2", "head.0.3"])
def test_path_patching_equals_brute_force(make, comp):
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (1, 9))
    c = parse_component(comp)
    res = path_patch(model, ids, c, target=7)
    expected = _brute_force_head(adapter, ids, c.layer, c.index, c.pos, 7)
    assert res.effect == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-6  # the ablation does something


def test_demeaned_metric_is_the_target_logit_less_the_mean_logit():
    """With ``demean`` the metric is the target's logit minus the mean logit over the vocabulary (what the graph's
    logit nodes hold): the clean value from the adapter's own run, and an original head's effect from the brute
    force that overwrites every head's z (the ablated one zeroed), both demeaned here by hand."""
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = adapter.run(ids, capture=[f"blocks.{L}.attn.z" for L in range(adapter.n_layers)])
        hooks = {}
        for L in range(adapter.n_layers):
            z = clean.cache[f"blocks.{L}.attn.z"].clone()
            if L == 1:
                z[0, :, 2] = 0  # head.1.2 at every position
            hooks[f"blocks.{L}.attn.z"] = lambda t, n, z=z: z
        patched = adapter.run(ids, hooks=hooks).logits[0, -1]
    base = clean.logits[0, -1]
    p = PathPatcher(model, ids, target=7, demean=True)
    assert p.clean == pytest.approx(float(base[7] - base.mean()), abs=1e-5)
    res = p.effects(["head.1.2"])[0]
    expected = float((patched[7] - patched.mean()) - (base[7] - base.mean()))
    assert res.effect == pytest.approx(expected, abs=1e-5)
    assert abs(float(patched.mean() - base.mean())) > 1e-4  # the mean moves: demeaning matters here


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama", "neox"])
def test_replacement_nodes_equal_brute_force(make):
    """Zero-ablating a Lorsa head, a transcoder feature or an error node (each kind, each layer, at the last
    position, whose logits are read) equals a forward pass of the real model whose attention outputs are frozen at
    their clean values, less the node's write where it writes into attention, and whose MLP output less the write
    where it writes into an MLP; the write from the graph's node (activation x its output row) or the recorded error."""
    from graphs.attribution import attribute
    from tests.conftest import node_write

    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(6))
    graph, rec = attribute(model, ids, qk=False), model.record(ids)
    n, last, target = ids.shape[1], ids.shape[1] - 1, 7
    with torch.no_grad():
        clean = adapter.run(ids, capture=[f"blocks.{L}.attn.out" for L in range(adapter.n_layers)]).cache

    def brute(node) -> float:
        write = torch.zeros(1, n, adapter.d_model)
        write[0, node.pos] = node_write(graph, model, rec, node.id)
        attn_side = node.type in ("lorsa", "attn_error")
        hooks = {f"blocks.{L}.attn.out": lambda t, name, L=L: clean[f"blocks.{L}.attn.out"] - (
            write if attn_side and L == node.layer else 0) for L in range(adapter.n_layers)}
        if not attn_side:
            hooks[f"blocks.{node.layer}.mlp.out"] = lambda t, name: t - write
        with torch.no_grad():
            return float(adapter.run(ids, hooks=hooks).logits[0, -1, target] - adapter.run(ids).logits[0, -1, target])

    chosen = [max(graph.nodes(type=kind, layer=L, position=last), key=lambda x: abs(x.activation))
              for kind in ("lorsa", "transcoder", "attn_error", "mlp_error") for L in range(adapter.n_layers)]
    results = PathPatcher(model, ids, target=target).effects([parse_component(x.id) for x in chosen])
    for node, res in zip(chosen, results):
        expected = brute(node)
        assert res.effect == pytest.approx(expected, rel=1e-4, abs=1e-5), node.id
        assert abs(expected) > 1e-5, node.id  # the ablation does something


def test_a_unit_at_every_position_is_each_position_ablated_together():
    """A Lorsa head, transcoder feature or error node with no position ablates what it writes at every position,
    each position its own activation (0 where it is inactive; it wrote the summed activation everywhere): the same
    as its active positions ablated together (which the brute force above checks).  Names are taken too."""
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(6))
    rec = model.record(ids)
    p = PathPatcher(model, ids, target=7)
    for kind, code in (("lorsa", rec.layers[1].lorsa_code), ("tc", rec.layers[0].tc_code)):
        counts = torch.bincount(code.indices[code.values > 0].flatten(), minlength=code.indices.max() + 1)
        counts[counts >= ids.shape[1]] = 0
        last = torch.zeros_like(counts, dtype=torch.bool)
        last[code.indices[-1][code.values[-1] > 0]] = True  # (attention is frozen: only the last position's reach
        unit = int((counts * last).argmax())  # the logits) active there and at some, not all, earlier positions
        at = [q for q in range(ids.shape[1]) if bool(((code.indices[q] == unit) & (code.values[q] > 0)).any())]
        assert 2 <= len(at) < ids.shape[1], (kind, at)
        layer = 1 if kind == "lorsa" else 0
        every = Component(NodeKind.LORSA if kind == "lorsa" else NodeKind.TRANSCODER, layer, unit, None)
        together = tuple(parse_component(f"{kind}.{layer}.{unit}@{q}") for q in at)
        a, b = p.effects([every, together])
        assert a.effect == pytest.approx(b.effect, rel=1e-5, abs=1e-6) and abs(a.effect) > 1e-5
    err = p.effects([Component(NodeKind.MLP_ERROR, 0, -1, None),
                     tuple(parse_component(f"mlp_err.0@{q}") for q in range(ids.shape[1]))])
    assert err[0].effect == pytest.approx(err[1].effect, rel=1e-5, abs=1e-6)
    named, parsed = p.effects(["lorsa.1.0@8", ("tc.0.1@8", "mlp_err.1@8")]), p.effects(
        [parse_component("lorsa.1.0@8"), (parse_component("tc.0.1@8"), parse_component("mlp_err.1@8"))])
    assert [r.effect for r in named] == [r.effect for r in parsed]
    assert p.linear_effects(["lorsa.1.0@8"]) == p.linear_effects([parse_component("lorsa.1.0@8")])
    with pytest.raises(BadInputError, match="cannot parse component"):
        p.effects(["lorsa one"])
    with pytest.raises(BadInputError, match="not int"):
        p.effects([3])


def test_a_units_write_at_a_position_is_its_nodes_write_there_alone():
    """`write` of a Lorsa head or transcoder feature at position p, for a unit active at earlier positions too: the
    graph node's write there (activation x its W_O row or decoder row: tests/conftest.py's node_write) at p, zero at
    every other position.  (The path-patching effect alone cannot tell: with attention frozen, writes at earlier
    positions never reach the last position's logits.)"""
    from graphs.attribution import attribute
    from tests.conftest import node_write

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(6))
    graph = attribute(model, ids, qk=False)
    p = PathPatcher(model, ids, target=7)
    for kind in ("lorsa", "transcoder"):
        at: dict[tuple[int, int], list] = {}
        for n in graph.nodes(type=kind):
            at.setdefault((n.layer, n.index), []).append(n)
        node = max((ns for ns in at.values() if len(ns) > 1), key=len)[-1]  # a later one of its positions
        got = p.write(parse_component(node.id), p.rec)
        torch.testing.assert_close(got[node.pos], node_write(graph, model, p.rec, node.id), rtol=1e-5, atol=1e-6)
        assert not got[torch.arange(ids.shape[1]) != node.pos].any(), node.id


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama", "neox"])
def test_ablating_components_together_equals_brute_force(make):
    """A tuple of components is ablated in one run: the brute force with all of them overwritten; batched
    beside a single component, that one still gets its own effect; the linear prediction is additive.  (On
    the tiny llama the ablations interact, so the sum of single runs would miss; the tiny neox is nearly
    linear at the last position.)"""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (1, 9))
    group = tuple(parse_component(s) for s in ("head.0.1@8", "head.1.2", "head.0.3@8", "head.0.0@8"))
    p = PathPatcher(model, ids, target=7)
    together, alone = p.effects([group, group[1]])
    expected = _brute_force_heads(adapter, ids, [(c.layer, c.index, c.pos) for c in group], 7)
    assert together.component == group and together.effect == pytest.approx(expected, abs=1e-5)
    assert alone.effect == pytest.approx(_brute_force_head(adapter, ids, 1, 2, None, 7), abs=1e-5)
    singles = sum(r.effect for r in p.effects(list(group)))
    if make is tiny_llama:
        assert abs(together.effect - singles) > 1e-4
    assert p.linear_effects([group])[0] == pytest.approx(sum(p.linear_effects(list(group))), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama", "neox"])
def test_linear_effects_are_the_derivative_of_path_patching(make):
    """Zero-ablating a head's write w changes the logit by f(0) - f(1), f(s) = logit with the write scaled
    by s; its linear prediction is -f'(1), here a central difference of the brute-force run."""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 9))
    comps = [parse_component(s) for s in ("head.0.1@8", "head.1.2", "head.0.3")]
    linear = PathPatcher(model, ids, target=7).linear_effects(comps)
    eps = 1e-2
    for c, lin in zip(comps, linear):
        up = _brute_force_head(adapter, ids, c.layer, c.index, c.pos, 7, scale=1 + eps)
        down = _brute_force_head(adapter, ids, c.layer, c.index, c.pos, 7, scale=1 - eps)
        expected = -(up - down) / (2 * eps)
        assert abs(expected) > 1e-4
        assert lin == pytest.approx(expected, rel=2e-3, abs=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox])
def test_with_the_norms_frozen_the_last_errors_effect_is_its_linear_effect(make):
    """With every norm scale frozen (and attention frozen, as path patching has it), the last layer's MLP error at
    the last position reaches the logit through fixed linear maps only (the final norm's frozen scale, the
    unembedding): its patched effect and its linear effect are the same number.  The linear effect took the live
    norm's derivative (through its variance) instead, since a scale frozen at its own value ran the norm as it is."""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    last = f"mlp_err.{adapter.n_layers - 1}@8"
    frozen = PathPatcher(model, ids, target=7, freeze_norms=True)
    effect, = (r.effect for r in frozen.effects([last]))
    linear, = frozen.linear_effects([last])
    assert abs(effect) > 1e-4 and linear == pytest.approx(effect, rel=1e-4, abs=1e-6)
    live, = PathPatcher(model, ids, target=7).linear_effects([last])
    assert abs(live - linear) > 1e-3 * abs(linear)  # the norms' own response is what freezing them leaves out


def test_linear_effects_through_mlp_maps():
    """Replacing an MLP by its own Jacobian at the clean point changes no slope; replacing MLP 0 by zero
    changes the slopes of layer-0 writes and leaves those of layer-1 writes alone."""
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (1, 9))
    comps = [parse_component(s) for s in ("head.0.1@8", "head.0.2", "head.1.3")]
    p = PathPatcher(model, ids, target=7, freeze_norms=True)
    plain = p.linear_effects(comps)
    mlp, x0 = adapter.mlp(1), p.rec.layers[1].mlp_in
    own = p.linear_effects(comps, mlp_maps={1: lambda dx: torch.func.jvp(mlp, (x0,), (dx,))[1]})
    assert own == pytest.approx(plain, rel=1e-4, abs=1e-6)
    frozen = p.linear_effects(comps, mlp_maps={0: lambda dx: 0 * dx})
    assert frozen[2] == pytest.approx(plain[2], rel=1e-4, abs=1e-6)  # a layer-1 write never meets MLP 0
    assert abs(frozen[0] - plain[0]) > 1e-4 and abs(frozen[1] - plain[1]) > 1e-4


def test_batched_effects_equal_one_at_a_time():
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 8))
    p = PathPatcher(model, ids, target=3, baseline=4)
    comps = [parse_component(s) for s in ("tc.0.3@2", "mlp_err.1@7", "attn_err.0@4", "head.1.0")]
    lr = p.rec.layers[1]
    comps.append(parse_component(f"lorsa.1.{int(lr.lorsa_code.indices[7, 0])}@7"))
    together = p.effects(comps, batch_size=3)
    for c, r in zip(comps, together):
        alone = p.effects([c])[0]
        assert r.effect == pytest.approx(alone.effect, abs=1e-5)
    ranked = rank_lorsa_heads(model, ids, 1, target=3)
    assert [abs(r.effect) for r in ranked] == sorted((abs(r.effect) for r in ranked), reverse=True)


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama", "neox"])
def test_mean_ablation_equals_brute_force(make):
    """Mean ablation of an original head equals a forward pass in which that head's z at the position is its
    mean over every position of the reference prompts (the tiny models have no BOS) and every other head's z
    is clean."""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(3)
    ids, refs = torch.randint(0, 97, (1, 9)), [torch.randint(0, 97, (n,)) for n in (5, 7)]
    with torch.no_grad():
        zs = [adapter.run(r[None], capture=["blocks.1.attn.z"]).cache["blocks.1.attn.z"][0, :, 2] for r in refs]
    mean_z = torch.cat(zs).mean(0)  # [dh]
    with torch.no_grad():
        clean = adapter.run(ids, capture=[f"blocks.{L}.attn.z" for L in range(adapter.n_layers)]).cache
        hooks = {}
        for L in range(adapter.n_layers):
            z = clean[f"blocks.{L}.attn.z"].clone()
            if L == 1:
                z[0, 8, 2] = mean_z
            hooks[f"blocks.{L}.attn.z"] = lambda t, n, z=z: z
        expected = float(adapter.run(ids, hooks=hooks).logits[0, -1, 7] - adapter.run(ids).logits[0, -1, 7])
    res = path_patch(model, ids, "head.1.2@8", target=7, mode="mean", reference=refs)
    assert res.effect == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-6


def _word_tokenizer(vocab_size: int, bos: int):
    """A word-level tokenizer ("t0" .. "tN") whose BOS is token ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token=f"t{bos}")


def test_mean_ablation_leaves_out_each_reference_prompts_bos():
    """With a tokenizer that has a BOS, each reference prompt's BOS (position 0) is left out of the means: an
    original head's mean ablation equals a forward pass whose z at the position is the head's mean z over positions
    1.. of the reference prompts (brute force), and a Lorsa head's mean write is its activation summed by hand over
    those positions, divided by their count."""
    adapter = ModelAdapter(tiny_llama(), tokenizer=_word_tokenizer(97, 96), name="m")
    model = random_replacements(adapter)
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.tensor([96]), torch.randint(0, 96, (8,), generator=g)])
    refs = [torch.cat([torch.tensor([96]), torch.randint(0, 96, (n,), generator=g)]) for n in (4, 6)]
    with torch.no_grad():
        zs = [adapter.run(r[None], capture=["blocks.1.attn.z"]).cache["blocks.1.attn.z"][0, 1:, 2] for r in refs]
        clean = adapter.run(ids[None], capture=[f"blocks.{L}.attn.z" for L in range(adapter.n_layers)]).cache
        hooks = {}
        for L in range(adapter.n_layers):
            z = clean[f"blocks.{L}.attn.z"].clone()
            if L == 1:
                z[0, 8, 2] = torch.cat(zs).mean(0)
            hooks[f"blocks.{L}.attn.z"] = lambda t, n, z=z: z
        expected = float(adapter.run(ids[None], hooks=hooks).logits[0, -1, 7] - adapter.run(ids[None]).logits[0, -1, 7])
    res = path_patch(model, ids, "head.1.2@8", target=7, mode="mean", reference=refs)
    assert res.effect == pytest.approx(expected, abs=1e-5) and abs(expected) > 1e-6
    recs = [model.record(r) for r in refs]
    code0 = recs[0].layers[1].lorsa_code
    h = int(code0.indices[1, 0])  # a head active after BOS
    total = sum(float(v) for rec in recs for p in range(1, rec.ids.shape[0])
                for v, i in zip(rec.layers[1].lorsa_code.values[p].tolist(), rec.layers[1].lorsa_code.indices[p].tolist())
                if i == h)
    want = total / sum(rec.ids.shape[0] - 1 for rec in recs) * model.lorsas[1].W_O[h].float()
    got = PathPatcher(model, ids, target=7, reference=refs).mean_write(parse_component(f"lorsa.1.{h}@5"))
    torch.testing.assert_close(got[5], want, rtol=1e-5, atol=1e-6)


def test_mean_writes_of_heads_features_and_errors():
    """The mean output of a Lorsa head / transcoder feature is its mean activation over the reference positions
    (counted by hand from the sparse codes) times its output vector; an error node's is its mean error vector."""
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(4)
    ids, refs = torch.randint(0, 97, (1, 8)), [torch.randint(0, 97, (n,)) for n in (6, 4)]
    p = PathPatcher(model, ids, target=3, reference=refs)
    recs = [model.record(r) for r in refs]
    lr0 = recs[0].layers[1]
    h, f = int(lr0.lorsa_code.indices[2, 0]), int(lr0.tc_code.indices[2, 0])

    def mean_act(code_of, unit):
        acts = [float(v) for rec in recs for p_ in range(rec.ids.shape[0])
                for v, i in zip(code_of(rec).values[p_].tolist(), code_of(rec).indices[p_].tolist()) if i == unit]
        return sum(acts) / sum(rec.ids.shape[0] for rec in recs)

    want = {
        f"lorsa.1.{h}@5": mean_act(lambda r: r.layers[1].lorsa_code, h) * model.lorsas[1].W_O[h].float(),
        f"tc.1.{f}@5": mean_act(lambda r: r.layers[1].tc_code, f) * model.transcoders[1].W_dec[f].float(),
        "mlp_err.0@5": torch.cat([r.layers[0].mlp_err for r in recs]).float().mean(0),
        "attn_err.1@5": torch.cat([r.layers[1].attn_err for r in recs]).float().mean(0),
    }
    for comp, vec in want.items():
        got = p.mean_write(parse_component(comp))
        torch.testing.assert_close(got[5], vec, rtol=1e-5, atol=1e-6, msg=comp)
        assert not got[torch.arange(8) != 5].any()
        torch.testing.assert_close(p.delta(parse_component(comp), "mean"), got - p.write(parse_component(comp), p.rec))
    with pytest.raises(BadInputError, match="reference prompts"):
        PathPatcher(model, ids, target=3).effects([parse_component("mlp_err.0@5")], "mean")


def test_graph_effects_closed_form():
    """e(t) = w(t -> logit) + sum over transcoder features u of w(t -> u) e(u) / a(u)."""
    from graphs.graph import AttributionGraph, Edge, Node

    nodes = [Node("emb@0", "embedding", -1, 0, 1), Node("lorsa.0.4@0", "lorsa", 0, 0, 4, activation=2.0),
             Node("tc.0.1@0", "transcoder", 0, 0, 1, activation=4.0), Node("tc.1.2@0", "transcoder", 1, 0, 2, activation=0.5),
             Node("logit.9@0", "logit", 2, 0, 9, prob=1.0)]
    edges = [Edge("emb@0", "lorsa.0.4@0", 1.0), Edge("lorsa.0.4@0", "tc.0.1@0", 2.0), Edge("tc.0.1@0", "tc.1.2@0", 1.0),
             Edge("tc.1.2@0", "logit.9@0", 3.0), Edge("lorsa.0.4@0", "logit.9@0", -1.0), Edge("tc.0.1@0", "logit.9@0", 0.5),
             Edge("emb@0", "tc.1.2@0", 0.25)]
    g = AttributionGraph("x", ["x"], [1], nodes, edges)
    e = dict(zip([n.id for n in nodes], (-graph_effects(g, "logit.9@0")).tolist()))
    assert e["tc.1.2@0"] == pytest.approx(3.0)
    assert e["tc.0.1@0"] == pytest.approx(0.5 + 1.0 * 3.0 / 0.5)
    assert e["lorsa.0.4@0"] == pytest.approx(-1.0 + 2.0 * e["tc.0.1@0"] / 4.0)
    # the embedding's path through the Lorsa head is not followed (attention is frozen in path patching)
    assert e["emb@0"] == pytest.approx(0.25 * 3.0 / 0.5)


def test_bad_components():
    """Malformed names, and components of kinds that cannot be patched: one line each.  A `Component` built in
    Python is checked too (one of an unknown kind, an embedding or a logit ran as an original head, silently), and
    takes an id's prefix ("tc") as its kind."""
    from graphs.patching import HEAD

    for bad in ("lorsa.1.3", "foo.1.2@3", "tc.1@2", "attn_err.1.2@3", "emb@3", "logit.5@2"):
        with pytest.raises(BadInputError):
            parse_component(bad)
    for kind in ("embedding", NodeKind.LOGIT, "logit", "foo", None):
        with pytest.raises(BadInputError, match="cannot be patched"):
            Component(kind, 0, 1, 2)
    assert Component("tc", 1, 3, 2) == Component(NodeKind.TRANSCODER, 1, 3, 2) == parse_component("tc.1.3@2")
    assert Component("mlp_err", 1, -1, 2) == parse_component("mlp_err.1@2") and Component(HEAD, 0, 1).kind == HEAD


def test_agreement_by_hand():
    from graphs.patching import agreement

    predicted = [1.0, -2.0, 0.5, 4.0, -0.1, 3.0, -5.0]
    patched = [2.0, 1.0, 0.5, 3.0, 0.2, -1.0, -4.0]
    corr, first, largest = agreement(predicted, patched)
    # signs agree at entries 0, 2, 3, 6; first five: 0, 2, 3 -> 3; five largest |predicted|: 6, 3, 5, 1, 0 -> 3
    assert (first, largest) == (3, 3)
    p, r = torch.tensor(predicted), torch.tensor(patched)
    p, r = p - p.mean(), r - r.mean()
    assert corr == pytest.approx(float((p * r).sum() / (p.norm() * r.norm())), abs=1e-6)
    assert agreement([1.0, -1.0], [1.0, 1.0], k=2)[1:] == (1, 1)
    assert math.isnan(agreement([1.0, 2.0], [2.0, 1.0])[0])  # no correlation from under 3 entries


def test_a_component_at_every_position_predicts_the_sum_of_its_nodes():
    """`set_effect` of a head, feature or error node with no position is the sum of its nodes' predicted effects
    at every position (its id, ``lorsa.L.H@None``, named no node, so it predicted nothing)."""
    from graphs.attribution import attribute
    from graphs.patching import set_effect

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    g = attribute(model, torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(3)), qk=False)
    effects = graph_effects(g, g.target.id)
    for kind in (NodeKind.LORSA, NodeKind.TRANSCODER, NodeKind.MLP_ERROR):
        counts = {}
        for n in g.nodes(type=kind):
            counts.setdefault((n.layer, n.index), []).append(n)
        last = len(g.tokens) - 1  # only the last position's nodes reach its logit through the MLPs
        (layer, index), nodes = max(((k, v) for k, v in counts.items() if any(n.pos == last for n in v)),
                                    key=lambda kv: len(kv[1]))
        assert len(nodes) > 1
        by_hand = sum(float(effects[g.index[n.id]]) for n in nodes)
        assert set_effect(g, effects, [Component(kind, layer, index, None)]) == pytest.approx(by_hand, rel=1e-9)
        assert by_hand != 0


def test_a_unit_not_active_has_no_effect_exactly_even_batched_with_others():
    """Zero-ablating a Lorsa head that does not fire changes no write: its effect is exactly 0 (the clean run itself),
    also when it shares a batch with a head that fires, whose batched run rounds apart from the clean one (the
    bundled llama printed "effect -0.0000" for an idle head beside an active one)."""
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    p = PathPatcher(model, ids, target=7)
    code = p.rec.layers[0].lorsa_code
    fired = set(code.indices[8][code.values[8] != 0].tolist())
    idle = next(h for h in range(model.lorsas[0].cfg.n_heads) if h not in fired)
    idle_res, active_res = p.effects([f"lorsa.0.{idle}@8", f"lorsa.0.{min(fired)}@8"])
    assert idle_res.effect == 0.0 and idle_res.patched == p.clean
    assert abs(active_res.effect) > 0
