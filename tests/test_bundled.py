"""End-to-end checks on the bundled models and their trained replacements (slow: python -m pytest -m slow)."""
from __future__ import annotations

import pytest
import torch

from replacement.presets import PRESETS

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
    """Next-token agreement of the pure sparse model (no error terms) with the real model (reported)."""
    from replacement.data import BatchMaker  # noqa: F401  (the mixture defines the bundled data)

    name, model = replaced
    ids = model.adapter.tokenize("It is a truth universally acknowledged, that a single man in possession of a good")
    sparse = model.run_sparse(ids).argmax(-1)
    real = model.adapter.run(ids).logits[0].argmax(-1)
    agreement = (sparse == real).float().mean().item()
    print(f"{name}: pure sparse model agrees with the real model on {agreement:.0%} of next tokens")
    assert agreement > 0.2
