"""The two showcase circuits on the bundled models (slow; they also run the examples)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from replacement.presets import PRESETS

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _need(name: str):
    if not (PRESETS[name].folder / "replacements" / "config.json").is_file():
        pytest.fail(f"the bundled {name!r} model and its replacements are missing from the package")


@pytest.mark.parametrize("model", ["toy", "pythia"])
def test_induction_circuit(model, tmp_path):
    _need(model)
    r = _example("induction").analyse(model, tmp_path, verbose=False)
    head = r["head"]
    # a Lorsa head at the last position, whose z pattern peaks on the token after the earlier occurrence
    assert head.pos == r["ids"].shape[1] - 1 and head.layer >= 1
    assert r["peak"] == r["expected_peak"]
    # its strongest QK pair: the current token on the query side, a node written at the earlier position
    # by an earlier layer's head on the key side
    top = r["top_pair"]
    q, k = r["full"].node(top.extra["query"]), r["full"].node(top.extra["key"])
    assert q.pos == head.pos and top.extra["key_pos"] == r["expected_peak"]
    assert k.pos == r["expected_peak"] and k.type in ("lorsa", "attn_error") and k.layer < head.layer
    # path patching the head lowers the correct logit by at least half of what the graph predicts
    assert r["predicted"] < 0 and r["patched"] < 0
    assert r["patched"] <= 0.5 * r["predicted"]
    assert (tmp_path / "induction.svg").is_file() or (tmp_path / "induction.dot").is_file()


def test_addition_circuit(tmp_path):
    _need("llama")
    r = _example("arithmetic").analyse(tmp_path, verbose=False, plot=True)
    pos36, pos62, last = r["positions"]
    movers = r["movers"]
    assert {p for _, p, _ in movers} == {pos36, pos62}  # heads that move each operand to the last position
    assert r["logit"].label == " 98"
    downstream = [e for h, _, _ in movers[:4] for e in r["full"].outgoing(h.id) if e.target.startswith("tc.")]
    assert downstream
    assert len(r["checks"]) == 2
    for check in r["checks"]:  # path patching confirms the top two movers: ablating each lowers ' 98'
        assert check.effect < -0.1
    png = r["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_queries_example(tmp_path, monkeypatch):
    _need("llama")
    monkeypatch.chdir(tmp_path)
    _example("queries").main(None)
    assert (tmp_path / "traces" / "36-62" / "graph.json").is_file()
