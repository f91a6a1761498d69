"""Replacements written by other tools: circuit-tracer per-layer transcoders (ReLU, JumpReLU, TopK; with or
without skip), detected from their files, alone or mixed with our own folders."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from replacement.errors import CircuitsError
from replacement.transcoder import Transcoder


def _ct_tensors(d=8, N=16, seed=0, threshold=None, skip=False) -> dict:
    """Random weights in circuit-tracer's per-layer layout (what its ``to_safetensors`` writes)."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(N, d, generator=g), "W_dec": torch.randn(N, d, generator=g) * 0.3,
         "b_enc": torch.randn(N, generator=g) * 0.2, "b_dec": torch.randn(d, generator=g) * 0.1}
    if threshold is not None:
        t["activation_function.threshold"] = torch.full((N,), float(threshold))
    if skip:
        t["W_skip"] = torch.randn(d, d, generator=g) * 0.1
    return t


def write_ct_folder(folder, layers: dict, top_k=None, hooks=("mlp.hook_in", "mlp.hook_out")):
    """A circuit-tracer transcoder folder: ``config.yaml`` (no top_k unless given) and ``layer_{i}.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    for L, t in layers.items():
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / f"layer_{L}.safetensors"))
    conf = f"model_kind: transcoder_set\nfeature_input_hook: {hooks[0]}\nfeature_output_hook: {hooks[1]}\n"
    (folder / "config.yaml").write_text(conf + (f"top_k: {top_k}\n" if top_k is not None else ""))
    return folder


def circuit_tracer_formula(t: dict, x: torch.Tensor):
    """circuit-tracer's transcoder, written out independently: a = act(x W_enc^T + b_enc) with act = JumpReLU
    (pre * [pre > theta]) or ReLU; out = a W_dec + b_dec (+ x W_skip^T).  Returns (a [n, N], out [n, d])."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    theta = t.get("activation_function.threshold")
    a = torch.where(pre > theta, pre, torch.zeros_like(pre)) if theta is not None else pre.clamp(min=0)
    out = a @ t["W_dec"] + t["b_dec"]
    return a, out + (x @ t["W_skip"].T if "W_skip" in t else 0)


@pytest.mark.parametrize("threshold,skip", [(0.5, False), (0.5, True), (None, False), (None, True)],
                         ids=["jumprelu", "jumprelu-skip", "relu", "relu-skip"])
def test_circuit_tracer_transcoder_without_top_k_matches_its_formula(tmp_path, threshold, skip):
    t = _ct_tensors(threshold=threshold, skip=skip)
    write_ct_folder(tmp_path, {2: t})
    tc = Transcoder.from_circuit_tracer(tmp_path, 2)
    assert tc.cfg.top_k == 0 and tc.cfg.jumprelu == (threshold is not None) and tc.cfg.skip == skip
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    a, out = circuit_tracer_formula(t, x)
    with torch.no_grad():
        y, code = tc(x)
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(code.dense(16), a, rtol=0, atol=0)  # the same features, the same values
    assert (code.values > 0).sum(-1).tolist() == (a > 0).sum(-1).tolist()


def test_jumprelu_thresholds_change_the_active_set(tmp_path):
    """The threshold is honoured: some feature with 0 < pre <= theta is active under ReLU and not under JumpReLU."""
    t = _ct_tensors(threshold=0.5)
    write_ct_folder(tmp_path / "j", {0: t})
    write_ct_folder(tmp_path / "r", {0: {k: v for k, v in t.items() if k != "activation_function.threshold"}})
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        jump = (Transcoder.from_circuit_tracer(tmp_path / "j", 0)(x)[1].values > 0).sum()
        relu = (Transcoder.from_circuit_tracer(tmp_path / "r", 0)(x)[1].values > 0).sum()
    pre = x @ t["W_enc"].T + t["b_enc"]
    assert int(jump) == int((pre > 0.5).sum()) < int(relu) == int((pre > 0).sum())


def test_circuit_tracer_top_k_keeps_the_strongest_writes(tmp_path):
    t = _ct_tensors(threshold=0.2)
    write_ct_folder(tmp_path, {0: t}, top_k=3)
    tc = Transcoder.from_circuit_tracer(tmp_path, 0)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    a, _ = circuit_tracer_formula(t, x)
    ranked = a * t["W_dec"].norm(dim=-1)
    keep = torch.zeros_like(a).scatter(-1, ranked.topk(3, dim=-1).indices, 1.0)  # brute-force top-3
    with torch.no_grad():
        y, code = tc(x)
    torch.testing.assert_close(code.dense(16), a * keep)
    torch.testing.assert_close(y, (a * keep) @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("break_it,message", [
    (lambda t: t.pop("b_dec"), "lacks b_dec"),
    (lambda t: t.__setitem__("W_dec", torch.zeros(16, 9)), "W_dec has shape"),
    (lambda t: t.__setitem__("activation_function.threshold", -torch.ones(16)), "must be 16 values >= 0"),
    (lambda t: t["W_enc"].__setitem__((0, 0), float("nan")), "NaN"),
])
def test_bad_circuit_tracer_file_fails_in_one_line(tmp_path, break_it, message):
    t = _ct_tensors(threshold=0.5)
    break_it(t)
    write_ct_folder(tmp_path, {0: t})
    with pytest.raises(CircuitsError, match=message) as e:
        Transcoder.from_circuit_tracer(tmp_path, 0)
    assert "\n" not in str(e.value)


def test_jumprelu_transcoder_round_trips_through_our_format(tmp_path):
    from replacement.store import load_module, save_module

    write_ct_folder(tmp_path / "ct", {1: _ct_tensors(threshold=0.4, skip=True)})
    tc = Transcoder.from_circuit_tracer(tmp_path / "ct", 1)
    save_module(tc, "transcoder", tmp_path / "ours", "fp", "m", dtype=torch.float32)
    back, _ = load_module(tmp_path / "ours" / "layer1.transcoder.safetensors")
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], tc(x)[0])
