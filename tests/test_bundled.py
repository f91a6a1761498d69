"""End-to-end checks on the bundled models and their trained replacements (slow: python -m pytest -m slow)."""
from __future__ import annotations

import pytest
import torch

from replacement.lm.presets import PRESETS

pytestmark = pytest.mark.slow


def _have(name: str, replacements: bool = False) -> bool:
    folder = PRESETS[name].folder
    return (folder / "config.json").is_file() and (not replacements or (folder / "replacements" / "config.json").is_file())


def _need(name: str, replacements: bool = False):
    if not _have(name, replacements):
        pytest.fail(f"the bundled {name!r} model{' replacements' if replacements else ''} are missing from the package")


@pytest.fixture(scope="module", params=list(PRESETS))
def bundled(request):
    from replacement.models import load_model

    _need(request.param)
    return load_model(request.param)


def test_bundled_model_loads_and_matches_hf(bundled):
    ids = bundled.tokenize("It is a truth universally acknowledged")
    with torch.no_grad():
        torch.testing.assert_close(bundled.run(ids).logits, bundled.hf_logits(ids), atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=list(PRESETS))
def replaced(request):
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    _need(request.param, replacements=True)
    adapter = load_model(request.param)
    return request.param, ReplacementModel.load(adapter)


def test_replacement_model_is_exact_with_errors(replaced):
    name, model = replaced
    ids = model.adapter.tokenize("36 + 62 =" if name == "llama" else "The cat sat on the mat. The cat")
    rec = model.record(ids)
    torch.testing.assert_close(model.run_with_errors(rec), rec.logits, atol=1e-4, rtol=0)


def test_graph_reconstruction_on_bundled(replaced):
    from graphs.attribution import attribute, reconstruction_errors

    name, model = replaced
    prompt = "36 + 62 =" if name == "llama" else "Mr and Mrs Dursley said that Mr and Mrs"
    graph = attribute(model, prompt, qk=False)
    errs = reconstruction_errors(graph)
    assert max(errs.values()) <= 1e-4


def test_pure_sparse_model_agreement(replaced):
    """Next-token agreement of the pure sparse model (no error terms) with the real model (reported), on a
    sentence none of them trained on: the bundled sets of 2026-12-06 agree on 76-84% of its 25 tokens (their
    held-out figures: 79-87%, README); a set for another model, a wrong layer or a broken load agrees on few."""

    name, model = replaced
    ids = model.adapter.tokenize("It is a truth universally acknowledged, that a single man in possession of a good")
    sparse = model.run_sparse(ids).argmax(-1)
    real = model.adapter.run(ids).logits[0].argmax(-1)
    agreement = (sparse == real).float().mean().item()
    print(f"{name}: pure sparse model agrees with the real model on {agreement:.0%} of next tokens")
    assert agreement >= 0.6


def test_graph_effects_equal_small_patches_in_the_replacement_model():
    """On the bundled llama: the graph's linear prediction of removing a little of a Lorsa head equals
    patching the replacement model itself (transcoders in place of the MLPs, errors and norm scales
    frozen, attention frozen).  The real MLPs can respond differently (see the closing notes)."""
    from graphs.attribution import attribute
    from graphs.patching import PathPatcher, graph_effects, parse_component
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    _need("llama", replacements=True)
    a = load_model("llama")
    m = ReplacementModel.load(a)
    ids = a.tokenize("36 + 62 =")
    g = attribute(m, ids, qk=False, target=" 98")
    logit = [n for n in g.logits() if n.label == " 98"][0]
    eff = graph_effects(g, logit.id)
    rec = m.record(ids)
    p = PathPatcher(m, ids, logit.index, demean=True)

    def run(c, eps):
        """(the demeaned ' 98' logit, every transcoder's active set) with eps x the head's write removed."""
        d = -eps * p.write(c, rec)
        store, active = {}, {}

        def mlp_out(t, n, L):
            y, code = m.transcoders[L](store[L][0])
            active[L] = code.indices.sort(-1).values
            return (y + rec.layers[L].mlp_err)[None]

        hooks = {k: (lambda t, n, v=v: v[None]) for k, v in rec.cache.items() if k.endswith(".scale")}
        for L in range(a.n_layers):
            hooks[f"blocks.{L}.attn.out"] = lambda t, n, L=L: (rec.layers[L].attn_out + (d if L == c.layer else 0))[None]
            hooks[f"blocks.{L}.mlp.in"] = lambda t, n, L=L: store.__setitem__(L, t)
            hooks[f"blocks.{L}.mlp.out"] = lambda t, n, L=L: mlp_out(t, n, L)
        with torch.no_grad():
            lg = a.run(ids, hooks=hooks).logits[0, -1]
        return float(lg[logit.index] - lg.mean()), active

    heads = sorted(g.nodes(type="lorsa", position=4), key=lambda n: -abs(float(eff[g.index[n.id]])))[:5]
    base, base_active = run(parse_component(heads[0].id), 0.0)
    for h in heads:
        # the slope of a patch small enough that no transcoder's Top-K set changes (the graph's regime; a set
        # that flips is a jump, not a slope): the largest such step of a few
        for eps in (1e-3, 3e-4, 1e-4):
            value, active = run(parse_component(h.id), eps)
            if all(torch.equal(active[L], base_active[L]) for L in base_active):
                break
        else:
            raise AssertionError(f"{h.id}: every step down to {eps} changes a transcoder's Top-K set")
        got = (value - base) / eps
        want = float(eff[g.index[h.id]])
        assert abs(got - want) <= 0.02 * max(1.0, abs(want)), (h.id, eps, got, want)
