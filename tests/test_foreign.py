"""Replacements written by other tools: circuit-tracer per-layer transcoders (ReLU, JumpReLU, TopK; with or
without skip) and Llamascopium Lorsa, detected from their files, alone or mixed with our own folders (CLTs:
tests/test_clt.py)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from replacement import checkpoint as ckpt
from replacement.errors import CircuitsError, ForeignFormatError
from replacement.foreign import (lorsa_from_llamascope, transcoder_from_circuit_tracer,
                                transcoder_from_circuit_tracer_file, transcoder_from_llamascope, write_circuit_tracer)
from replacement.transcoder import Transcoder, TranscoderConfig
from tests.conftest import ROOT
from tests.test_train import _lorsa, _tc


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
    tc = transcoder_from_circuit_tracer(tmp_path, 2)
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
        jump = (transcoder_from_circuit_tracer(tmp_path / "j", 0)(x)[1].values > 0).sum()
        relu = (transcoder_from_circuit_tracer(tmp_path / "r", 0)(x)[1].values > 0).sum()
    pre = x @ t["W_enc"].T + t["b_enc"]
    assert int(jump) == int((pre > 0.5).sum()) < int(relu) == int((pre > 0).sum())


def test_circuit_tracer_top_k_keeps_the_strongest_writes(tmp_path):
    t = _ct_tensors(threshold=0.2)
    write_ct_folder(tmp_path, {0: t}, top_k=3)
    tc = transcoder_from_circuit_tracer(tmp_path, 0)
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
        transcoder_from_circuit_tracer(tmp_path, 0)
    assert "\n" not in str(e.value)


def test_jumprelu_transcoder_round_trips_through_our_format(tmp_path):
    from replacement.store import load_module, save_module

    write_ct_folder(tmp_path / "ct", {1: _ct_tensors(threshold=0.4, skip=True)})
    tc = transcoder_from_circuit_tracer(tmp_path / "ct", 1)
    save_module(tc, "transcoder", tmp_path / "ours", "fp", "m", dtype=torch.float32)
    back, _ = load_module(tmp_path / "ours" / "layer1.transcoder.safetensors")
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], tc(x)[0])


# -- whole folders: detection, loading, mixing, the graph, the command line --------------------------------


@pytest.mark.filterwarnings("ignore:circuit-tracer has no top-K")  # checked in the next test
def test_a_circuit_tracer_set_written_layer_by_layer_keeps_one_config(tmp_path):
    """circuit-tracer reads one config.yaml for every layer of a set: a layer with another K or another input is
    refused (it was written beside a config that read it back with the first layer's K), the input hook follows
    what the transcoder reads, and a threshold stored as [1, N] (circuit-tracer loads it) reads as [N]."""
    tc = _tc()
    write_circuit_tracer(tc, tmp_path / "ct", layer=0)
    write_circuit_tracer(tc, tmp_path / "ct", layer=1)  # the same settings: fine
    other = Transcoder(TranscoderConfig(d_model=64, n_features=32, top_k=tc.cfg.top_k + 1))
    with pytest.raises(ForeignFormatError, match="top_k"):
        write_circuit_tracer(other, tmp_path / "ct", layer=2)
    assert not (tmp_path / "ct" / "layer_2.safetensors").exists()
    mid = Transcoder(TranscoderConfig(d_model=64, n_features=32, top_k=tc.cfg.top_k, reads="resid_mid"))
    with pytest.raises(ForeignFormatError, match="feature_input_hook"):
        write_circuit_tracer(mid, tmp_path / "ct", layer=2)
    write_circuit_tracer(mid, tmp_path / "mid", layer=0)
    assert "feature_input_hook: hook_resid_mid" in (tmp_path / "mid" / "config.yaml").read_text()
    assert transcoder_from_circuit_tracer(tmp_path / "mid", 0).cfg.reads == "resid_mid"  # read back as written
    skip = Transcoder(TranscoderConfig(d_model=64, n_features=32, top_k=5, reads="resid_mid", skip=True))
    with pytest.raises(ForeignFormatError, match="with a skip connection has no circuit-tracer form"):
        write_circuit_tracer(skip, tmp_path / "skip", layer=0)
    # a JumpReLU threshold as [1, N]
    t, _ = ckpt.load(tmp_path / "ct" / "layer_0.safetensors")
    theta = torch.rand(1, 32) * 0.1
    ckpt.atomic_save(t | {"activation_function.threshold": theta}, tmp_path / "j.safetensors")
    jump = transcoder_from_circuit_tracer_file(tmp_path / "j.safetensors", 0)
    assert jump.cfg.jumprelu and torch.equal(jump.threshold, theta[0])


def test_circuit_tracer_and_llamascope_transcoders(tmp_path):
    tc = _tc()
    x = torch.randn(5, 64)
    with pytest.warns(UserWarning, match="circuit-tracer has no top-K"):
        path = write_circuit_tracer(tc, tmp_path / "ct", layer=3)
    t, _ = ckpt.load(path)
    assert t["W_enc"].shape == (32, 64) and t["W_dec"].shape == (32, 64)
    conf = (tmp_path / "ct" / "config.yaml").read_text()
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        assert key in conf
    back = transcoder_from_circuit_tracer(tmp_path / "ct", 3)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], tc(x)[0])
    # a Llamascopium file written in its own layout: W_E [d, d_tc], W_D [d_tc, d]
    ckpt.atomic_save({"W_E": tc.W_enc.detach().t().contiguous(), "b_E": tc.b_enc.detach(), "W_D": tc.W_dec.detach(),
                      "b_D": tc.b_dec.detach()}, tmp_path / "ls.safetensors")
    ls = transcoder_from_llamascope(tmp_path / "ls.safetensors", top_k=5)
    with torch.no_grad():
        torch.testing.assert_close(ls(x)[0], tc(x)[0])


def test_llamascope_lorsa_loader(tmp_path):
    m = _lorsa(rd=4)
    t = {k: v.detach().clone() for k, v in m.named_parameters()}
    t["b_D"] = t.pop("b_O")
    ckpt.atomic_save(t, tmp_path / "sae_weights.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "n_qk_heads": 2, "d_qk_head": 8, "top_k": 2, "rotary_dim": 4, "rotary_base": 10000,
        "norm_activation": "none", "hook_point_in": "blocks.0.ln1.hook_normalized",
        "hook_point_out": "blocks.0.hook_attn_out"}))
    loaded = lorsa_from_llamascope(tmp_path)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], m(x)[0])


def test_llamascope_lorsa_it_cannot_read_is_a_foreign_format_error(tmp_path):
    """What `lorsa_from_llamascope` cannot read (q/k norms, a rotary base that is no number, a config that disagrees
    with the weights) is a ForeignFormatError, as the module says of every foreign file (it was CheckpointError)."""
    m = _lorsa(rd=4)
    for name, edit, match in (("qk-norm", lambda t, c: t.update({"ln_q.w": torch.ones(8)}), "q/k layer norms"),
                              ("base", lambda t, c: c.update(rotary_base="x"), "rotary_base 'x' is not a positive"),
                              ("shape", lambda t, c: c.update(d_qk_head=4), "disagree on the QK shape")):
        folder = write_llamascope_lorsa(tmp_path / name, m, 0)
        t = dict(ckpt.load(folder / "sae_weights.safetensors")[0])
        c = json.loads((folder / "config.json").read_text())
        edit(t, c)
        save_file(t, str(folder / "sae_weights.safetensors"))
        (folder / "config.json").write_text(json.dumps(c))
        with pytest.raises(ForeignFormatError, match=match):
            lorsa_from_llamascope(folder)


def _ct_set(folder, adapter, threshold=0.3, skip=False, top_k=None, layers=None):
    """circuit-tracer transcoders for every layer of ``adapter`` (or ``layers``), written in its layout."""
    d = adapter.d_model
    layers = range(adapter.n_layers) if layers is None else layers
    return write_ct_folder(folder, {L: _ct_tensors(d, 48, seed=L, threshold=threshold, skip=skip) for L in layers},
                           top_k=top_k)


@pytest.mark.parametrize("threshold,skip,top_k", [(0.3, False, None), (None, True, None), (0.3, False, 5)],
                         ids=["jumprelu", "relu-skip", "topk"])
def test_circuit_tracer_folder_gives_an_exact_graph(tmp_path, threshold, skip, top_k):
    from graphs.attribution import attribute, reconstruction_errors
    from replacement.assemble import ReplacementModel
    from replacement.foreign import detect_format
    from replacement.models import ModelAdapter
    from tests.conftest import tiny_llama

    adapter = ModelAdapter(tiny_llama(), name="llama")
    folder = _ct_set(tmp_path / "ct", adapter, threshold, skip, top_k)
    assert detect_format(folder) == "circuit-tracer"
    model = ReplacementModel.load(adapter, str(folder), "frozen")
    assert all(model.transcoders[L].cfg.jumprelu == (threshold is not None) for L in range(adapter.n_layers))
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    rec = model.record(ids)
    for L in range(adapter.n_layers):  # the recorded activations are circuit-tracer's, feature by feature
        t = {k: v for k, v in _ct_tensors(adapter.d_model, 48, seed=L, threshold=threshold, skip=skip).items()}
        a, _ = circuit_tracer_formula(t, rec.layers[L].mlp_in)
        if top_k:
            a = a * torch.zeros_like(a).scatter(-1, (a * t["W_dec"].norm(dim=-1)).topk(top_k, -1).indices, 1.0)
        torch.testing.assert_close(rec.layers[L].tc_code.dense(48), a, rtol=1e-5, atol=1e-6)
    graph = attribute(model, ids)
    errs = reconstruction_errors(graph)
    assert len(errs) > 10 and max(errs.values()) <= 1e-4


def test_lorsa_from_ours_and_transcoders_from_circuit_tracer_mix(tmp_path, saved_model):
    from graphs.attribution import attribute, reconstruction_errors
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model
    from replacement.store import load_replacements

    adapter = load_model(str(saved_model))
    ct = _ct_set(tmp_path / "ct", adapter)
    model = ReplacementModel.load(adapter, [str(saved_model / "replacements"), str(ct)], "lorsa")
    ours = load_replacements(saved_model / "replacements", adapter)
    for L in range(adapter.n_layers):
        assert model.transcoders[L].cfg.jumprelu and not ours[("transcoder", L)].cfg.jumprelu
        torch.testing.assert_close(model.lorsas[L].W_Q, ours[("lorsa", L)].W_Q)
    graph = attribute(model, adapter.tokenize("the cat sat on the mat"))
    assert max(reconstruction_errors(graph).values()) <= 1e-4


def test_a_graph_records_which_folder_each_module_came_from(tmp_path, saved_model):
    """graph.json's settings name the model's fingerprint and, per folder, the modules taken from it: here the
    layer-1 transcoder from a circuit-tracer folder given second, everything else from the model's own set."""
    from graphs.attribution import attribute
    from graphs.export import write_json
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model, model_fingerprint

    adapter = load_model(str(saved_model))
    ct = _ct_set(tmp_path / "ct", adapter, layers=[1])
    own = saved_model / "replacements"
    model = ReplacementModel.load(adapter, [str(own), str(ct)], "lorsa")
    assert model.transcoders[1].cfg.jumprelu and not model.transcoders[0].cfg.jumprelu  # the mix as recorded below
    graph = attribute(model, adapter.tokenize("the cat sat"), qk=False)
    write_json(graph, tmp_path / "g.json")
    settings = json.loads((tmp_path / "g.json").read_text())["metadata"]["settings"]
    assert settings["model_fingerprint"] == model_fingerprint(adapter)
    mine = [f"layer{L}.{k}" for L in range(adapter.n_layers) for k in ("lorsa", "transcoder")]
    mine.remove("layer1.transcoder")
    assert settings["replacements"] == {str(own.resolve()): mine, str(ct.resolve()): ["layer1.transcoder"]}
    bundled = ReplacementModel.load(load_model("toy"))
    assert bundled.provenance()["replacements"] == {"bundled:toy": ["layer0.lorsa", "layer0.transcoder",
                                                                    "layer1.lorsa", "layer1.transcoder"]}


def _cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", *args] if args[0] != "trace"
                          else [sys.executable, "-c", "from cli.trace import main; main()", *args[1:]],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_trace_and_patch_take_circuit_tracer_folders(tmp_path, saved_model):
    import json

    from replacement.models import load_model

    adapter = load_model(str(saved_model))
    ct = _ct_set(tmp_path / "ct", adapter)
    repo = str(ROOT)
    r = _cli("trace", "the cat sat", "--model", str(saved_model), "--replacements", str(ct), "--attention", "frozen",
             "--format", "json", "--out", str(tmp_path / "g1"), "--bos", "zero", cwd=repo)
    assert r.returncode == 0, r.stderr
    g = json.loads((tmp_path / "g1" / "graph.json").read_text())
    assert any(n["feature_type"] == "cross layer transcoder" for n in g["nodes"])
    assert {n["feature_type"] for n in g["nodes"] if n["ctx_idx"] == 0} == {"embedding"}  # --bos zero
    r = _cli("trace", "the cat sat", "--model", str(saved_model), "--replacements", str(saved_model / "replacements"),
             "--replacements", str(ct), "--format", "json", "--out", str(tmp_path / "g2"), cwd=repo)
    assert r.returncode == 0, r.stderr
    r = _cli("patch", "the cat sat", "--model", str(saved_model), "--replacements", str(ct), "--attention", "frozen",
             "--component", "mlp_err.0@1", cwd=repo)
    assert r.returncode == 0, r.stderr


def _broken_sets(tmp_path, adapter) -> dict:
    """Foreign folders that must each fail in one line, with what the line must say."""
    from safetensors.torch import save_file

    out = {}
    f = _ct_set(tmp_path / "truncated", adapter)
    p = f / "layer_1.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    out["truncated"] = (f, "corrupt or truncated")
    out["partial"] = (_ct_set(tmp_path / "partial", adapter, layers=[0]), "missing trained replacements layer1.transcoder")
    wide = {L: _ct_tensors(adapter.d_model + 8, 48, seed=L) for L in range(adapter.n_layers)}
    out["width"] = (write_ct_folder(tmp_path / "width", wide), f"has d_model {adapter.d_model}")
    deep = _ct_set(tmp_path / "deep", adapter, layers=range(adapter.n_layers + 1))
    out["layers"] = (deep, f"has {adapter.n_layers} layers")
    hooks = write_ct_folder(tmp_path / "hooks", {0: _ct_tensors(adapter.d_model, 48)}, hooks=("hook_resid_pre", "hook_mlp_out"))
    out["hooks"] = (hooks, "only those that read the MLP's normalised input")
    clt = tmp_path / "clt"
    clt.mkdir()
    (clt / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n")
    out["clt"] = (clt, "no W_enc_<L>.safetensors files")  # a CLT config.yaml without the CLT
    clt_files = tmp_path / "clt-files"  # the layout of circuit-tracer's CrossLayerTranscoder.to_safetensors
    clt_files.mkdir()
    for L in range(adapter.n_layers):
        save_file({f"W_enc_{L}": torch.zeros(4, adapter.d_model), f"b_enc_{L}": torch.zeros(4),
                   f"b_dec_{L}": torch.zeros(adapter.d_model)}, str(clt_files / f"W_enc_{L}.safetensors"))
        save_file({f"W_dec_{L}": torch.zeros(4, adapter.n_layers - L, adapter.d_model)},
                  str(clt_files / f"W_dec_{L}.safetensors"))
    (clt_files / f"W_dec_{adapter.n_layers - 1}.safetensors").unlink()  # no config.yaml, and the last decoder gone
    out["clt-files"] = (clt_files, "partial CLT")
    bad_yaml = _ct_set(tmp_path / "yaml", adapter)
    (bad_yaml / "config.yaml").write_text("model_kind: [unclosed\n")
    out["yaml"] = (bad_yaml, "not valid YAML")
    lorsa = tmp_path / "ls"
    lorsa.mkdir()
    save_file({"W_Q": torch.zeros(1, adapter.d_model, 4)}, str(lorsa / "sae_weights.safetensors"))
    (lorsa / "config.json").write_text('{"hook_point_in": "blocks.0.ln1.hook_normalized", "top_k": 2}')
    out["llamascope-partial"] = (lorsa, "not a complete Llamascopium checkpoint")
    return out


def test_corrupt_partial_or_mismatched_foreign_folders_fail_in_one_line(tmp_path):
    from replacement.assemble import ReplacementModel
    from replacement.checkpoint import CheckpointError
    from replacement.models import ModelAdapter
    from tests.conftest import tiny_llama

    adapter = ModelAdapter(tiny_llama(), name="llama")
    for name, (folder, message) in _broken_sets(tmp_path, adapter).items():
        with pytest.raises((CircuitsError, CheckpointError)) as e:
            ReplacementModel.load(adapter, str(folder), "frozen")
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


@pytest.mark.slow
def test_trace_refuses_a_broken_foreign_folder_in_one_line(tmp_path, saved_model):
    from replacement.models import load_model

    adapter = load_model(str(saved_model))
    repo = str(ROOT)
    for name in ("width", "clt"):
        folder, message = _broken_sets(tmp_path / name, adapter)[name]
        r = _cli("trace", "the cat", "--model", str(saved_model), "--replacements", str(folder), "--attention",
                 "frozen", "--format", "json", "--out", str(tmp_path / "out"), cwd=repo)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_an_uncached_hf_repo_id_fails_in_one_line(tmp_path, monkeypatch):
    from replacement.foreign import resolve_spec

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CircuitsError, match="not .*in the local HF cache|no HF repo"):
        resolve_spec("someone/transcoders-nowhere")


def test_a_cached_hf_repo_id_resolves_to_its_snapshot(tmp_path, monkeypatch):
    """The hub's cache layout (refs/main naming a snapshot), built by hand: ``owner/name/sub`` loads from it."""
    import huggingface_hub.constants as hub

    from replacement.assemble import ReplacementModel
    from replacement.models import ModelAdapter
    from tests.conftest import tiny_llama

    commit = "0123abcd" * 5  # a commit hash, as the hub names snapshots
    repo = tmp_path / "hub" / "models--someone--transcoders"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    adapter = ModelAdapter(tiny_llama(), name="llama")
    _ct_set(repo / "snapshots" / commit / "relu", adapter, threshold=None)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = ReplacementModel.load(adapter, "someone/transcoders/relu", "frozen")
    assert sorted(model.transcoders) == list(range(adapter.n_layers))
    assert not model.transcoders[0].cfg.jumprelu and model.transcoders[0].cfg.top_k == 0
    # circuit-tracer's hf:// form, and a revision (the snapshot's commit), name the same folder
    from replacement.foreign import resolve_spec

    want = repo / "snapshots" / commit / "relu"
    assert resolve_spec("hf://someone/transcoders/relu") == resolve_spec(f"someone/transcoders/relu@{commit}") == want
    with pytest.raises(CircuitsError, match=r"no HF repo someone/transcoders@ffff in the local HF cache .*--revision ffff"):
        resolve_spec("hf://someone/transcoders/relu@ffff")


@pytest.mark.slow
def test_eval_and_heads_take_a_mix(tmp_path, saved_model):
    import json

    from replacement.models import load_model

    adapter = load_model(str(saved_model))
    ct = _ct_set(tmp_path / "ct", adapter)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. 1 + 2 = 3\n" * 400)
    repo = str(ROOT)
    mix = ["--replacements", str(saved_model / "replacements"), "--replacements", str(ct)]
    r = _cli("eval", "--model", str(saved_model), *mix, "--json", "--no-samples", "--text", str(text), cwd=repo)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "replacements" in d and "skipped" not in d["pure_replacement"]  # the mix made a whole replacement model
    assert "top1_agreement" in json.dumps(d["pure_replacement"])
    r = _cli("heads", "--model", str(saved_model), "--layer", "1", *mix, "--n-seqs", "2", "--text", str(text),
             "--cache-dir", str(tmp_path / "cache"), cwd=repo)
    assert r.returncode == 0, r.stderr


def write_llamascope_lorsa(folder, lorsa, layer: int, rotary_base: float = 10000.0):
    """One Lorsa in Llamascopium's layout: config.json + sae_weights.safetensors (W_Q/W_K [n_qk, d, d_qk], b_Q/b_K,
    W_V/W_O [H, d], b_V [H], b_D [d])."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    t = {k: v.detach().clone().contiguous() for k, v in lorsa.named_parameters()}
    t["b_D"] = t.pop("b_O")
    save_file(t, str(folder / "sae_weights.safetensors"))
    c = lorsa.cfg
    (folder / "config.json").write_text(json.dumps({
        "n_qk_heads": c.n_qk, "d_qk_head": c.d_qk, "top_k": c.top_k, "rotary_dim": c.rotary_dim,
        "rotary_base": rotary_base, "norm_activation": "none", "hook_point_in": f"blocks.{layer}.ln1.hook_normalized",
        "hook_point_out": f"blocks.{layer}.hook_attn_out"}))
    return folder


@pytest.mark.parametrize("transcoders", ["plt", "clt"])
def test_llamascope_lorsa_with_circuit_tracer_transcoders_gives_a_complete_graph(tmp_path, saved_model, transcoders):
    """Lorsa mode end to end from foreign folders only: Llamascopium Lorsa (one subfolder per layer) plus
    circuit-tracer transcoders (per-layer JumpReLU, or a CLT): the loaded heads are the ones written, and every
    target of the graph (QK tables included) is reconstructed."""
    import math

    from graphs.attribution import attribute, reconstruction_errors
    from replacement.assemble import ReplacementModel
    from replacement.foreign import detect_format
    from replacement.models import load_model
    from tests.conftest import random_replacements
    from tests.test_clt import clt_tensors, write_clt_folder

    adapter = load_model(str(saved_model))
    written = random_replacements(adapter, seed=3).lorsas
    ls = tmp_path / "llamascope"
    for L, lorsa in written.items():
        write_llamascope_lorsa(ls / f"L{L}A", lorsa, L)
    assert detect_format(ls) == "llamascope"
    tc = (_ct_set(tmp_path / "ct", adapter) if transcoders == "plt"
          else write_clt_folder(tmp_path / "clt", clt_tensors(adapter.n_layers, adapter.d_model)))
    model = ReplacementModel.load(adapter, [str(ls), str(tc)], "lorsa")
    assert model.cross_layer == (transcoders == "clt")
    x = torch.randn(1, 7, adapter.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for L, lorsa in written.items():
            torch.testing.assert_close(model.lorsas[L](x)[0], lorsa(x)[0], rtol=1e-5, atol=1e-6)
    ids = adapter.tokenize("the cat sat on the mat. 1 + 2 = 3")
    graph = attribute(model, ids)
    errs = reconstruction_errors(graph)
    assert len(graph.nodes(type="lorsa")) > 10 and len(errs) > 30 and max(errs.values()) <= 1e-4
    rec = model.record(ids)
    for head in graph.nodes(type="lorsa")[:20]:  # the QK split sums to the loaded module's own score
        lorsa = model.lorsas[head.layer]
        q, k = lorsa.qk(rec.layers[head.layer].attn_in[None])
        g = head.index // lorsa.cfg.heads_per_group
        for info in head.qk:
            real = float(q[0, g, head.pos] @ k[0, g, info.key_pos]) / math.sqrt(lorsa.cfg.d_qk)
            assert abs(info.score - real) <= 1e-4 * max(1.0, abs(real))


def test_llamascope_configs_that_leave_out_rotary_or_replace_no_layer(tmp_path):
    """A Llamascopium Lorsa config without rotary_dim ran with no rotary at all, and without rotary_base at 10,000
    whatever the model's: what the config leaves out is now the model's own map (the written Lorsa, which has it,
    comes back exactly).  Hook points that are not a layer's attention or MLP (a residual-stream SAE, an
    attention-output transcoder) were read by their layer number alone; they are refused in one line."""
    import json

    from replacement.foreign import load_llamascope
    from replacement.models import ModelAdapter
    from tests.conftest import random_replacements, tiny_llama

    adapter = ModelAdapter(tiny_llama(rope_theta=500000.0), name="m")
    lorsa = random_replacements(adapter, seed=2).lorsas[1]
    folder = write_llamascope_lorsa(tmp_path / "L1A", lorsa, 1, rotary_base=500000.0)
    conf = json.loads((folder / "config.json").read_text())
    x = torch.randn(1, 9, adapter.d_model, generator=torch.Generator().manual_seed(0))
    for drop in (("rotary_dim",), ("rotary_base",), ("rotary_dim", "rotary_base")):
        (folder / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if k not in drop}))
        back = load_llamascope(folder, adapter)[("lorsa", 1)]
        with torch.no_grad():
            torch.testing.assert_close(back(x)[0], lorsa(x)[0], msg=str(drop))
    for hooks, says in ((("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"), "do not replace an attention layer"),
                        (("blocks.1.ln1.hook_normalized", "blocks.1.hook_mlp_out"), "do not replace an attention layer")):
        (folder / "config.json").write_text(json.dumps(conf | dict(zip(("hook_point_in", "hook_point_out"), hooks))))
        with pytest.raises(CircuitsError, match=says):
            load_llamascope(folder, adapter)
