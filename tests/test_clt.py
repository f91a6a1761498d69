"""Cross-layer transcoders (CLTs) in circuit-tracer's layout: a feature of layer L writes into the MLP output of
every layer T >= L through its own decoder.  Checked against independent computations: the layout's formula
from the raw file tensors, the per-layer transcoder a CLT with zero later decoders must equal, the adapter's
own forward pass with one node ablated (edges), the Lorsa module's own Q.K (QK tables) and hand-built hook
runs (path patching)."""
from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import save_file

from replacement.errors import CircuitsError
from tests.conftest import ROOT, qk_entries_with_real_scores, random_replacements, tiny_llama

N_FEATURES = 40


def clt_tensors(n_layers: int, d: int, N: int = N_FEATURES, seed: int = 0, threshold: float | None = 0.2,
                later_scale: float = 0.7, enc_scale: float = 1.0) -> list[dict]:
    """Random CLT weights per layer L, named as circuit-tracer's CrossLayerTranscoder.to_safetensors names them:
    W_enc_L [N, d], b_enc_L [N], b_dec_L [d], threshold_L [N], W_dec_L [N, n_layers - L, d]; the decoders into
    later layers ``later_scale`` times the size of the own layer's.  Scaled like the tiny models' own MLPs (an
    input of norm ~sqrt(d), times ``enc_scale`` for smaller inputs; outputs of norm ~0.1), so that the
    replacement's errors stay small."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in range(n_layers):
        W_dec = torch.randn(N, n_layers - L, d, generator=g) * 0.01
        W_dec[:, 1:] *= later_scale
        t = {f"W_enc_{L}": torch.randn(N, d, generator=g) * enc_scale / math.sqrt(d),
             f"b_enc_{L}": torch.randn(N, generator=g) * 0.2 - 0.3,
             f"b_dec_{L}": torch.randn(d, generator=g) * 0.003, f"W_dec_{L}": W_dec}
        if threshold is not None:
            t[f"threshold_{L}"] = torch.rand(N, generator=g) * threshold
        out.append(t)
    return out


def write_clt_folder(folder, layers: list[dict], config: bool = True, hooks=("mlp.hook_in", "mlp.hook_out")):
    """circuit-tracer's CLT folder: W_enc_{L}.safetensors (encoder, biases, threshold), W_dec_{L}.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    for L, t in enumerate(layers):
        save_file({k: v.contiguous() for k, v in t.items() if not k.startswith("W_dec")},
                  str(folder / f"W_enc_{L}.safetensors"))
        save_file({f"W_dec_{L}": t[f"W_dec_{L}"].contiguous()}, str(folder / f"W_dec_{L}.safetensors"))
    if config:
        (folder / "config.yaml").write_text(f"model_kind: cross_layer_transcoder\nfeature_input_hook: {hooks[0]}\n"
                                            f"feature_output_hook: {hooks[1]}\n")
    return folder


def clt_formula(layers: list[dict], mlp_in: list[torch.Tensor]):
    """circuit-tracer's CLT from its raw tensors: per layer the activations [n, N] (JumpReLU: pre where pre >
    threshold; else ReLU), and per layer T the output sum_{L <= T} a_L @ W_dec_L[:, T - L] + b_dec_T [n, d]."""
    acts = []
    for L, t in enumerate(layers):
        pre = mlp_in[L] @ t[f"W_enc_{L}"].t() + t[f"b_enc_{L}"]
        theta = t.get(f"threshold_{L}")
        acts.append(torch.relu(pre) if theta is None else pre * (pre > theta))
    outs = [sum(acts[L] @ layers[L][f"W_dec_{L}"][:, T - L] for L in range(T + 1)) + layers[T][f"b_dec_{T}"]
            for T in range(len(layers))]
    return acts, outs


# where the CLT's encoders read: the MLP's normalised input, or the residual stream before its norm (circuit-tracer's
# default for CLTs), whose entries in the tiny models are ~40x smaller
READS = {"mlp.hook_in": 1.0, "hook_resid_mid": 40.0}


def _model(tmp_path, attention="frozen", n_layers=3, later_scale=0.7, threshold=0.2, hook="mlp.hook_in"):
    from replacement.assemble import ReplacementModel
    from replacement.foreign import load_specs
    from replacement.models import ModelAdapter

    adapter = ModelAdapter(tiny_llama(num_hidden_layers=n_layers, attention_bias=True), name="llama")
    layers = clt_tensors(n_layers, adapter.d_model, later_scale=later_scale, threshold=threshold,
                         enc_scale=READS[hook])
    folder = write_clt_folder(tmp_path / "clt", layers, hooks=(hook, "mlp.hook_out"))
    modules = load_specs(str(folder), adapter)
    if attention == "lorsa":
        lorsas = random_replacements(adapter).lorsas
        modules |= {("lorsa", L): m for L, m in lorsas.items()}
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    return ReplacementModel(adapter, modules, attention), layers, ids


@pytest.mark.parametrize("hook", sorted(READS))
@pytest.mark.parametrize("threshold", [0.2, None], ids=["jumprelu", "relu"])
def test_recorded_outputs_follow_the_layout_formula(tmp_path, threshold, hook):
    """Activations and every MLP output's replacement are circuit-tracer's formula on the raw file tensors, and
    (ReLU) adding the errors back in a live rerun reproduces the model."""
    from replacement.foreign import detect_format

    model, layers, ids = _model(tmp_path, threshold=threshold, hook=hook)
    assert detect_format(tmp_path / "clt") == "circuit-tracer-clt" and model.cross_layer
    assert [model.transcoders[L].cfg.n_later for L in range(3)] == [2, 1, 0]
    assert all(model.transcoders[L].cfg.jumprelu == (threshold is not None) for L in range(3))
    rec = model.record(ids)
    point = "resid_mid" if hook == "hook_resid_mid" else "mlp.in"
    acts, outs = clt_formula(layers, [rec.cache[f"blocks.{L}.{point}"] for L in range(3)])
    assert all(0 < (a > 0).sum() < a.numel() / 2 for a in acts)
    for L, lr in enumerate(rec.layers):
        torch.testing.assert_close(lr.tc_code.dense(N_FEATURES), acts[L], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lr.tc_out, outs[L], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lr.mlp_err, lr.mlp_out - outs[L], rtol=1e-5, atol=1e-5)
    assert (rec.layers[2].tc_out - rec.layers[2].tc_code.dense(N_FEATURES) @ layers[2]["W_dec_2"][:, 0]
            - layers[2]["b_dec_2"]).abs().max() > 0.1 * rec.layers[2].tc_out.abs().max()  # earlier layers' writes
    if threshold is None:  # JumpReLU is discontinuous: rounding in the rerun can switch a feature near its threshold
        torch.testing.assert_close(model.run_with_errors(rec), rec.logits, atol=1e-4, rtol=0)


def test_a_clt_without_later_decoders_is_the_per_layer_transcoder(tmp_path):
    """Closed form: zero decoders into later layers make the CLT the per-layer transcoder set of the same tensors
    (circuit-tracer's per-layer layout): the same nodes and the same edges."""
    from graphs.attribution import attribute
    from replacement.assemble import ReplacementModel
    from tests.test_foreign import write_ct_folder

    model, layers, ids = _model(tmp_path, later_scale=0.0)
    per_layer = {L: {"W_enc": t[f"W_enc_{L}"], "W_dec": t[f"W_dec_{L}"][:, 0], "b_enc": t[f"b_enc_{L}"],
                     "b_dec": t[f"b_dec_{L}"], "activation_function.threshold": t[f"threshold_{L}"]}
                 for L, t in enumerate(layers)}
    plt = ReplacementModel.load(model.adapter, str(write_ct_folder(tmp_path / "plt", per_layer)), "frozen")
    assert not plt.cross_layer
    g1, g2 = attribute(model, ids, bos="zero"), attribute(plt, ids, bos="zero")
    assert [n.id for n in g1.node_list] == [n.id for n in g2.node_list]
    e1 = {(e.source, e.target): e.weight for e in g1.edges}
    e2 = {(e.source, e.target): e.weight for e in g2.edges}
    assert e1.keys() == e2.keys() and len(e1) > 100
    assert max(abs(e1[k] - e2[k]) for k in e1) <= 1e-5 * max(abs(w) for w in e2.values())


@pytest.mark.parametrize("hook", sorted(READS))
@pytest.mark.parametrize("bos", ["keep", "zero"])
@pytest.mark.parametrize("attention", ["lorsa", "frozen"])
def test_every_target_is_reconstructed_exactly(tmp_path, attention, bos, hook):
    from graphs.attribution import attribute, reconstruction_errors
    from graphs.prune import scores

    model, _, ids = _model(tmp_path, attention, hook=hook)
    graph = attribute(model, ids, batch_size=7, bos=bos)
    errs = reconstruction_errors(graph)
    assert len(errs) > 30 and max(errs.values()) <= 1e-4, max(errs.items(), key=lambda kv: kv[1])
    # an edge from a layer-0 feature straight into a layer-2 feature: only its later decoders carry it (frozen
    # attention also passes it through layer 1's attention; Lorsa mode has no such path)
    skips = [e for e in graph.edges if e.source.startswith("tc.0.") and e.target.startswith("tc.2.")]
    assert skips
    s = scores(graph)
    assert 0 < s["completeness_score"] <= 1 and 0 < s["replacement_score"] <= 1


def _ablated_targets(model, rec, graph, ablate: str | None) -> dict[str, float]:
    """Every target's pre-activation in the frozen replacement model run through the adapter's forward pass
    with one node's output removed; a CLT feature's from every MLP output its decoders reach."""
    from tests.test_attribution import _frozen_targets

    if ablate is None or graph.node(ablate).type != "transcoder":
        return _frozen_targets(model, rec, graph, ablate)
    node = graph.node(ablate)
    tc = model.transcoders[node.layer]
    a = model.adapter
    saved = [lr.mlp_out.clone() for lr in rec.layers]
    for T in range(node.layer, a.n_layers):  # written out by hand: decoder slice T - L of the file's W_dec_L
        rec.layers[T].mlp_out[node.pos] -= node.activation * (tc.W_dec if T == node.layer
                                                              else tc.W_dec_later[:, T - node.layer - 1])[node.index]
    try:
        return _frozen_targets(model, rec, graph, None)
    finally:
        for lr, v in zip(rec.layers, saved):
            lr.mlp_out.copy_(v)


@pytest.mark.parametrize("hook", sorted(READS))
@pytest.mark.parametrize("attention", ["lorsa", "frozen"])
def test_edges_are_real_effects(tmp_path, attention, hook):
    from graphs.attribution import attribute

    model, _, ids = _model(tmp_path, attention, hook=hook)
    graph = attribute(model, ids)
    rec = model.record(ids)
    base = _ablated_targets(model, rec, graph, None)
    for node_id, value in base.items():
        assert abs(value - graph.node(node_id).preact) <= 1e-4 * max(1.0, abs(value)), node_id
    edges = [e for e in graph.edges if e.source.startswith("tc.")]
    rng = random.Random(0)
    crossing = [e for e in edges if graph.node(e.target).layer > graph.node(e.source).layer + 1]
    for e in rng.sample(edges, 12) + rng.sample(crossing, 8):
        change = base[e.target] - _ablated_targets(model, rec, graph, e.source)[e.target]
        assert abs(change - e.weight) <= 1e-4 * max(1.0, abs(e.weight)), (e, change)


def test_qk_tables_include_the_later_writes(tmp_path):
    """Lorsa heads of layer 2 read layer-0 features' decoders into layers 0 and 1: the pair table still sums to
    the module's own score."""
    from graphs.attribution import attribute

    model, _, ids = _model(tmp_path, "lorsa")
    graph = attribute(model, ids, qk_top_keys=3)
    checked = 0
    for head, info, real in qk_entries_with_real_scores(model, graph, ids):
        assert abs(info.score - real) <= 1e-4 * max(1.0, abs(real)), (head.id, info.key_pos)
        checked += head.layer == 2
    assert checked > 10


def test_path_patching_removes_every_write_of_a_clt_feature(tmp_path):
    """Zero-ablating a layer-0 CLT feature equals a hand-built run that subtracts its decoder into each later MLP
    output (attention outputs frozen at their clean values), and differs from removing its own layer's only."""
    from graphs.patching import Component, PathPatcher
    from graphs.graph import NodeKind

    model, _, ids = _model(tmp_path)
    a = model.adapter
    p = PathPatcher(model, ids, target=5)
    rec = p.rec
    lr = rec.layers[0]
    pos = ids.shape[1] - 1  # attention outputs stay clean: only writes at the last position reach its logits
    f = int(lr.tc_code.indices[pos][lr.tc_code.values[pos].argmax()])
    act = float(lr.tc_code.dense(N_FEATURES)[pos, f])
    tc = model.transcoders[0]

    def run(layers, removed: float = 1.0):  # the metric's change with `removed` x the feature's writes taken out
        hooks = {}
        for L in range(a.n_layers):
            hooks[f"blocks.{L}.attn.out"] = lambda t, n, L=L: rec.layers[L].attn_out[None].to(t.dtype)
            if L in layers:
                dec = tc.W_dec if L == 0 else tc.W_dec_later[:, L - 1]
                hooks[f"blocks.{L}.mlp.out"] = lambda t, n, d=dec: t - removed * act * torch.nn.functional.one_hot(
                    torch.tensor(pos), ids.shape[1])[None, :, None].float() * d[f]
        with torch.no_grad():
            return float(p.metric(a.run(ids, hooks=hooks).logits)[0]) - p.clean

    res = p.effects([Component(NodeKind.TRANSCODER, 0, f, pos)])[0]
    assert res.effect == pytest.approx(run({0, 1, 2}), rel=1e-4, abs=1e-5)
    assert abs(run({0, 1, 2}) - run({0})) > 1e-3
    lin = p.linear_effects([Component(NodeKind.TRANSCODER, 0, f, pos)])[0]  # -d metric / d(scale of every write) at 1
    eps = 1e-3
    expected = (run({0, 1, 2}, eps) - run({0, 1, 2}, -eps)) / (2 * eps)  # central difference: error O(eps^2)
    assert abs(expected) > 1e-4 and lin == pytest.approx(expected, rel=2e-3, abs=1e-5)


def _broken_clts(tmp_path, adapter) -> dict:
    """CLT folders that must each fail in one line, with what the line must say."""
    n, d = adapter.n_layers, adapter.d_model
    out = {}
    f = write_clt_folder(tmp_path / "truncated", clt_tensors(n, d))
    p = f / "W_dec_1.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    out["truncated"] = (f, "corrupt or truncated")
    f = write_clt_folder(tmp_path / "no-decoder", clt_tensors(n, d))
    (f / "W_dec_1.safetensors").unlink()
    out["no-decoder"] = (f, "partial CLT")
    bad = clt_tensors(n, d)
    bad[0]["W_dec_0"] = bad[0]["W_dec_0"][:, :1]  # writes into its own layer only: not the layout
    out["dec-shape"] = (write_clt_folder(tmp_path / "dec-shape", bad), "W_dec_0 has shape")
    bad = clt_tensors(n, d)
    del bad[0]["b_enc_0"]
    out["missing"] = (write_clt_folder(tmp_path / "missing", bad), "lacks b_enc_0")
    f = write_clt_folder(tmp_path / "gap", clt_tensors(n, d))
    for k in ("enc", "dec"):
        (f / f"W_{k}_1.safetensors").rename(f / f"W_{k}_5.safetensors")
    out["gap"] = (f, "no gap")
    bad = clt_tensors(n, d)
    bad[1]["W_enc_1"][3, 2] = float("nan")
    out["nan"] = (write_clt_folder(tmp_path / "nan", bad), "NaN")
    out["layers"] = (write_clt_folder(tmp_path / "layers", clt_tensors(n + 1, d)), f"has {n} layers")
    out["width"] = (write_clt_folder(tmp_path / "width", clt_tensors(n, d + 4)), f"has d_model {d}")
    bad = clt_tensors(n, d)
    del bad[1]["threshold_1"]
    out["mixed-activation"] = (write_clt_folder(tmp_path / "mixed", bad), "differs from layer 0")
    out["hook"] = (write_clt_folder(tmp_path / "hook", clt_tensors(n, d), hooks=("hook_resid_pre", "hook_mlp_out")),
                   "only those that read")
    return out


def test_broken_clt_folders_fail_in_one_line(tmp_path):
    from replacement.assemble import ReplacementModel
    from replacement.models import ModelAdapter

    adapter = ModelAdapter(tiny_llama(), name="llama")
    for name, (folder, message) in _broken_clts(tmp_path, adapter).items():
        with pytest.raises(CircuitsError) as e:
            ReplacementModel.load(adapter, str(folder), "frozen")
            pytest.fail(f"{name} loaded")
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


def test_a_clt_does_not_mix_with_other_transcoders(tmp_path):
    from replacement.assemble import ReplacementModel
    from replacement.models import ModelAdapter
    from tests.test_foreign import _ct_set

    adapter = ModelAdapter(tiny_llama(), name="llama")
    clt = write_clt_folder(tmp_path / "clt", clt_tensors(adapter.n_layers, adapter.d_model))
    plt = _ct_set(tmp_path / "plt", adapter, layers=[1])
    with pytest.raises(CircuitsError, match="cannot be mixed") as e:
        ReplacementModel.load(adapter, [str(clt), str(plt)], "frozen")
    assert "\n" not in str(e.value)
    model = ReplacementModel.load(adapter, [str(plt), str(clt)], "frozen")  # the CLT replaces every layer
    assert model.cross_layer


@pytest.mark.slow
def test_trace_and_patch_take_a_clt_folder(tmp_path, saved_model):
    """The command line: `trace` (Lorsa mode beside our Lorsa folder, and frozen with --bos zero) and `circuits
    patch` of a CLT feature."""
    import json

    from replacement.models import load_model
    from tests.test_foreign import _cli

    adapter = load_model(str(saved_model))
    clt = write_clt_folder(tmp_path / "clt", clt_tensors(adapter.n_layers, adapter.d_model))
    repo = str(ROOT)
    r = _cli("trace", "the cat sat", "--model", str(saved_model), "--replacements", str(saved_model / "replacements"),
             "--replacements", str(clt), "--format", "json", "--out", str(tmp_path / "g"), cwd=repo)
    assert r.returncode == 0, r.stderr
    g = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert any(n["node_id"].startswith("tc.0.") for n in g["nodes"])
    r = _cli("trace", "the cat sat", "--model", str(saved_model), "--replacements", str(clt), "--attention", "frozen",
             "--bos", "zero", "--format", "json", "--out", str(tmp_path / "f"), cwd=repo)
    assert r.returncode == 0, r.stderr
    feature = next(n["node_id"] for n in json.loads((tmp_path / "f" / "graph.json").read_text())["nodes"]
                   if n["node_id"].startswith("tc.0."))
    r = _cli("patch", "the cat sat", "--model", str(saved_model), "--replacements", str(clt), "--attention", "frozen",
             "--component", feature, cwd=repo)
    assert r.returncode == 0 and feature in r.stdout, r.stderr


def test_ln2_hook_normalized_reads_the_norm_before_its_gain(tmp_path):
    """circuit-tracer's ln2.hook_normalized (Gemma Scope's input) is the MLP norm's output before its gain and
    bias: on a sequential GPT-NeoX with random LayerNorm weights and biases, the recorded input is F.layer_norm of
    the residual stream without them, and the graph is still exact."""
    from graphs.attribution import attribute, reconstruction_errors
    from replacement.assemble import ReplacementModel
    from replacement.models import ModelAdapter
    from tests.conftest import tiny_neox

    adapter = ModelAdapter(tiny_neox(use_parallel_residual=False), name="neox")
    folder = write_clt_folder(tmp_path / "clt", clt_tensors(adapter.n_layers, adapter.d_model),
                              hooks=("ln2.hook_normalized", "hook_mlp_out"))
    model = ReplacementModel.load(adapter, str(folder), "frozen")
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    rec = model.record(ids)
    for L, lr in enumerate(rec.layers):
        norm = adapter.mlp_norm(L)
        want = torch.nn.functional.layer_norm(rec.cache[f"blocks.{L}.resid_mid"], (adapter.d_model,), eps=norm.eps)
        torch.testing.assert_close(lr.tc_in, want, rtol=1e-4, atol=1e-5)
        assert (lr.tc_in - lr.mlp_in).abs().max() > 0.05  # the gain and bias matter here
    graph = attribute(model, ids)
    errs = reconstruction_errors(graph)
    assert len(errs) > 20 and max(errs.values()) <= 1e-4
    base = _ablated_targets(model, rec, graph, None)
    for e in random.Random(1).sample([e for e in graph.edges if e.source.startswith(("tc.", "emb"))], 10):
        change = base[e.target] - _ablated_targets(model, rec, graph, e.source)[e.target]
        assert abs(change - e.weight) <= 1e-4 * max(1.0, abs(e.weight)), (e, change)
