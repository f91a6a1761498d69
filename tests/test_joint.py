"""The joint (faithfulness) stage and the pure replacement model's metrics, on tiny random models."""
from __future__ import annotations

import pytest
import torch

from replacement.activations import RandomTokenSource
from replacement.evaluate import agreement, kl_per_token
from replacement.joint import JointConfig, JointTrainer, fit_joint
from replacement.models import ModelAdapter, model_fingerprint
from replacement.store import load_replacements, save_module
from tests.conftest import random_replacements, tiny_llama, tiny_neox

SMALL = dict(batch_size=4, seq_len=16, warmup=2, checkpoint_every=5)


def _modules(rm):
    return {("lorsa", L): m for L, m in rm.lorsas.items()} | {("transcoder", L): m for L, m in rm.transcoders.items()}


def _trainer(tmp_path, adapter, modules_seed=0, **kw):
    rm = random_replacements(adapter, n_features=32, tc_k=4, seed=modules_seed)
    cfg = JointConfig(**(SMALL | dict(steps=10, lr=3e-3, resample_every=0) | kw))
    return JointTrainer(adapter, _modules(rm), cfg, RandomTokenSource(97, 16, 0, bos=1), tmp_path / "state.safetensors")


def test_kl_per_token_matches_its_definition():
    torch.manual_seed(0)
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(kl_per_token(a, b), expected)
    assert kl_per_token(a, a).abs().max() < 1e-6


def test_spliced_hooks_are_the_pure_replacement_model(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    trainer = JointTrainer(adapter, _modules(rm), JointConfig(**SMALL), RandomTokenSource(97, 16, 0, bos=1),
                           tmp_path / "s.safetensors")
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        spliced = adapter.run(ids, hooks=trainer.spliced_hooks()).logits[0]
    torch.testing.assert_close(spliced, rm.run_sparse(ids), atol=1e-4, rtol=1e-4)


def test_the_kl_term_is_the_real_models_against_the_pure_one_after_bos(tmp_path):
    """The joint loss's KL: mean over the batch and positions 1.. of KL(real || pure replacement), the pure
    replacement run by `ReplacementModel.run_sparse` and the divergence written out."""
    adapter = ModelAdapter(tiny_llama())
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    trainer = JointTrainer(adapter, _modules(rm), JointConfig(**SMALL), RandomTokenSource(97, 16, 0, bos=1),
                           tmp_path / "s.safetensors")
    ids = torch.randint(2, 97, (3, 12), generator=torch.Generator().manual_seed(8))
    ids[:, 0] = 1
    with torch.no_grad():
        got = float(trainer.losses(ids)["kl"])
        kls = []
        for row in ids:
            p = adapter.run(row[None]).logits[0, 1:].double().softmax(-1)
            q = rm.run_sparse(row)[1:].double().softmax(-1)
            kls.append((p * (p.log() - q.log())).sum(-1))
    expected = float(torch.cat(kls).mean())
    assert expected > 1e-3 and got == pytest.approx(expected, rel=1e-4)


def test_agreement_of_a_model_with_itself_and_with_a_brute_force(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    adapter.tokenizer = type("T", (), {"bos_token_id": 1})()
    tokens = torch.randint(2, 97, (400,))
    same = agreement(adapter, tokens, lambda: {}, seq_len=16, n_seqs=4)
    assert same["top1_agreement"] == 1.0 and abs(same["kl"]) < 1e-6 and same["tokens"] == 4 * 15
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    got = agreement(adapter, tokens, rm.sparse_hooks, seq_len=16, n_seqs=4)
    starts = torch.linspace(0, len(tokens) - 16, 4).long().tolist()
    agree = kl = 0.0
    for s in starts:  # one window at a time, through run_sparse
        ids = torch.cat([torch.tensor([1]), tokens[s : s + 15]])
        real, pure = adapter.run(ids[None]).logits[0, 1:], rm.run_sparse(ids)[1:]
        agree += (real.argmax(-1) == pure.argmax(-1)).sum().item()
        p, q = real.softmax(-1), pure.softmax(-1)
        kl += (p * (p.log() - q.log())).sum().item()
    assert got["top1_agreement"] == pytest.approx(agree / 60)
    assert got["kl"] == pytest.approx(kl / 60, rel=1e-4)


@pytest.mark.parametrize("kind", ["lorsa", "transcoder"])
def test_one_module_alone_is_that_block_replaced_on_its_real_input(kind):
    """sparse_hooks(only={(kind, 1)}): layer 1's block output is its module's output computed from the real model's
    input to that block (layer 0 and the other block of layer 1 real), checked against a splice by hand."""
    from replacement.activations import hook_points

    adapter = ModelAdapter(tiny_llama())
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    ids = torch.randint(0, 97, (2, 12))
    x_name, y_name = hook_points(kind, 1)
    with torch.no_grad():
        x = adapter.run(ids, capture=[x_name]).cache[x_name].float()
        module = rm.lorsas[1] if kind == "lorsa" else rm.transcoders[1]
        y_hat = module(x)[0]
        by_hand = adapter.run(ids, hooks={y_name: lambda t, n: y_hat.to(t.dtype)}).logits
        alone = adapter.run(ids, hooks=rm.sparse_hooks(only={(kind, 1)})).logits
        none = adapter.run(ids, hooks=rm.sparse_hooks(only=set())).logits
        every = adapter.run(ids, hooks=rm.sparse_hooks(only={(k, L) for k in ("lorsa", "transcoder") for L in (0, 1)})).logits
    torch.testing.assert_close(alone, by_hand, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(none, adapter.run(ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every, adapter.run(ids, hooks=rm.sparse_hooks()).logits, atol=1e-5, rtol=1e-5)
    assert (alone - none).abs().max() > 1e-3  # the splice changes something: the comparison above is not vacuous


def test_token_normalised_fvu_closed_forms():
    """Equal to the plain FVU / (1 + floor) where every output has the same norm; otherwise each token's squared
    error over its own squared norm (plus the floor), over the variance per coordinate, computed by hand."""
    from replacement.train import fvu, token_normalised_fvu

    g = torch.Generator().manual_seed(0)
    y = torch.nn.functional.normalize(torch.randn(20, 6, generator=g), dim=-1) * 3.0
    y_hat = y + 0.3 * torch.randn(20, 6, generator=g)
    torch.testing.assert_close(token_normalised_fvu(y_hat, y), fvu(y_hat, y) / 1.01)  # the floor, 0.01
    torch.testing.assert_close(token_normalised_fvu(y_hat, y, floor=0.0), fvu(y_hat, y))
    y = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # |y|^2 = 25, 0.25, 0
    y_hat = y + torch.tensor([[1.0, 0.0], [0.0, 0.1], [0.2, 0.0]])
    m = (25 + 0.25 + 0) / 3
    mse = sum(e * m / (n2 + 0.01 * m) for e, n2 in [(1.0, 25), (0.01, 0.25), (0.04, 0.0)]) / 3 / 2
    var = float((y - y.mean(0)).pow(2).sum()) / 3 / 2
    assert float(token_normalised_fvu(y_hat, y)) == pytest.approx(mse / var, rel=1e-6)


@pytest.mark.parametrize("token_norm", [False, True])
def test_joint_reconstruction_term_per_module(tmp_path, token_norm):
    """Each module's term is its FVU at the real model's inputs, BOS left out; with tc_token_norm the
    transcoders' (and only theirs) is token-normalised; recon is their mean."""
    from replacement.activations import hook_points
    from replacement.train import fvu, token_normalised_fvu

    adapter = ModelAdapter(tiny_llama())
    trainer = _trainer(tmp_path, adapter, tc_token_norm=token_norm)
    ids = torch.randint(2, 97, (2, 12))
    ids[:, 0] = 1
    with torch.no_grad():
        out = trainer.losses(ids)
        cache = adapter.run(ids, capture=trainer.points).cache
    terms = []
    for key, m in trainer.mods.items():
        xn, yn = hook_points(*key)
        c_x, c_y = trainer.scales[key]
        x, y = cache[xn].float() * c_x, cache[yn].float() * c_y
        with torch.no_grad():
            y_hat = m(x)[0]
        error = token_normalised_fvu if token_norm and key[0] == "transcoder" else fvu
        expected = error(y_hat[:, 1:].reshape(-1, y.shape[-1]), y[:, 1:].reshape(-1, y.shape[-1]))
        torch.testing.assert_close(out["per"][key][0], expected)
        if key[0] == "transcoder":  # the two differ here: the tiny model's MLP outputs differ in norm
            other = fvu if token_norm else token_normalised_fvu
            assert abs(float(other(y_hat[:, 1:].reshape(-1, y.shape[-1]), y[:, 1:].reshape(-1, y.shape[-1])))
                       - float(expected)) > 1e-4
        terms.append(expected)
    torch.testing.assert_close(out["recon"], torch.stack(terms).mean())


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["rmsnorm", "layernorm"])
def test_readout_term_is_what_the_last_error_node_does_to_the_logits(tmp_path, make):
    """The readout term against the model itself: the demeaned logits with the last MLP's output replaced by the
    transcoder's (the final norm's scale frozen at its clean value), against the clean logits, summed over tokens
    (BOS left out); over the same with the MLP's output replaced by its mean over those tokens."""
    from replacement.activations import hook_points
    from replacement.hooks import FINAL_SCALE

    torch.manual_seed(0)
    adapter = ModelAdapter(make())
    trainer = _trainer(tmp_path, adapter, tc_readout_coef=1.0)
    ids = torch.randint(2, 97, (2, 12))
    ids[:, 0] = 1
    with torch.no_grad():
        out = trainer.losses(ids)
        _, yn = hook_points("transcoder", adapter.n_layers - 1)
        clean = adapter.run(ids, capture=[yn, FINAL_SCALE])
        y, scale = clean.cache[yn], clean.cache[FINAL_SCALE]
        y_hat = out["per"][trainer.last][4] / trainer.scales[trainer.last][1]  # back to raw units

        def moved(new_y):  # [B, n - 1] squared norm of the demeaned logits' change
            hooks = {yn: lambda t, n: new_y.to(t.dtype), FINAL_SCALE: lambda t, n: scale}
            d = adapter.run(ids, hooks=hooks).logits.float() - clean.logits.float()
            d = d - d.mean(-1, keepdim=True)
            return d[:, 1:].pow(2).sum(-1)

        expected = moved(y_hat).sum() / moved(y[:, 1:].mean((0, 1)).expand_as(y)).sum()
    assert float(out["readout"]) > 1e-3  # a random transcoder is far from its MLP
    torch.testing.assert_close(out["readout"], expected.to(out["readout"].dtype), rtol=1e-4, atol=1e-6)


def test_readout_term_is_off_by_default_and_in_the_loss_when_asked(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    ids = torch.randint(2, 97, (2, 12))
    ids[:, 0] = 1
    with torch.no_grad():
        assert float(_trainer(tmp_path / "a", adapter).losses(ids)["readout"]) == 0.0
    trainer = _trainer(tmp_path / "b", adapter, tc_readout_coef=2.0)
    m = trainer.train_step(0)
    assert m["readout"] > 0


def test_joint_stage_lowers_the_kl_of_the_pure_model(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    trainer = _trainer(tmp_path, adapter, steps=40, recon_coef=0.0, lr=1e-2)
    ids = RandomTokenSource(97, 16, 7, bos=1).batch(0, 8)
    before = trainer.losses(ids)["kl"].item()
    trainer.train(progress=False)
    after = trainer.losses(ids)["kl"].item()
    assert after < 0.75 * before
    for p in adapter.model.parameters():  # the model itself is not trained
        assert p.grad is None


def test_joint_stage_resumes_exactly(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    full = _trainer(tmp_path / "a", adapter)
    full.train(progress=False)
    part = _trainer(tmp_path / "b", adapter)
    part.train(progress=False, stop_after=5)
    resumed = _trainer(tmp_path / "b", adapter)
    resumed.train(progress=False)
    for n, p in full.named.items():
        torch.testing.assert_close(resumed.named[n], p, atol=1e-6, rtol=1e-6)


def test_an_interrupted_joint_stage_saves_the_step_and_resumes_exactly(tmp_path):
    """Ctrl-C in step 7 saves step 8 (checkpoints every 5) and stops; the rerun ends where an uninterrupted run does."""
    import signal

    from replacement import checkpoint as ckpt

    adapter = ModelAdapter(tiny_llama())
    full = _trainer(tmp_path / "a", adapter)
    full.train(progress=False)
    part = _trainer(tmp_path / "b", adapter)
    real = part.train_step

    def step(i):
        out = real(i)
        if i == 7:
            signal.raise_signal(signal.SIGINT)
        return out

    part.train_step = step
    with pytest.raises(ckpt.Interrupted, match="the state of step 8 of 10 is saved"):
        part.train(progress=False)
    resumed = _trainer(tmp_path / "b", adapter)
    resumed.train(progress=False)
    for n, p in full.named.items():
        torch.testing.assert_close(resumed.named[n], p, atol=1e-6, rtol=1e-6)


def test_joint_stage_refuses_to_resume_under_other_settings(tmp_path):
    """A state saved with one loss resumes under the same settings only; the error names what changed, and the
    state is left as it was."""
    from replacement.checkpoint import CheckpointError

    adapter = ModelAdapter(tiny_llama())
    _trainer(tmp_path, adapter).train(progress=False, stop_after=5)
    saved = (tmp_path / "state.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"other settings \(recon_coef 0.5 -> 2.0\)"):
        _trainer(tmp_path, adapter, recon_coef=2.0).train(progress=False)
    assert (tmp_path / "state.safetensors").read_bytes() == saved
    # nor when it starts from other modules (another --init-from)
    with pytest.raises(CheckpointError, match=r"saved from other inputs \(the starting modules: "):
        _trainer(tmp_path, adapter, modules_seed=1).train(progress=False)
    assert (tmp_path / "state.safetensors").read_bytes() == saved
    resumed = _trainer(tmp_path, adapter, checkpoint_every=2)  # how often it saves may change
    resumed.train(progress=False)
    assert resumed.step == 10


def test_resampling_revives_dead_units(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    trainer = _trainer(tmp_path, adapter, steps=12, resample_every=4, resample_stop=1.0)
    tc = trainer.mods[("transcoder", 0)]
    with torch.no_grad():  # kill half the features: they can never win the top-K
        tc.b_enc[:16] = -1e4
    trainer.train(progress=False)
    assert trainer.resampled >= 16
    assert (tc.b_enc[:16] > -1e3).all()
    ids = RandomTokenSource(97, 16, 3, bos=1).batch(0, 8)
    code = trainer.losses(ids)["per"][("transcoder", 0)][1]
    assert (code.indices[code.values > 0] < 16).any()  # some revived feature fires again


def test_every_resampled_unit_of_both_kinds_fires_at_its_token(tmp_path):
    """Units are ranked by pre-activation x decoder norm: a resampled unit must enter the top-K where it was
    drawn, Lorsa heads (shared patterns, 1-D values) as well as transcoder features."""
    adapter = ModelAdapter(tiny_llama())
    trainer = _trainer(tmp_path, adapter, resample_every=1, resample_stop=1.0)
    lorsa, tc = trainer.mods[("lorsa", 0)], trainer.mods[("transcoder", 0)]
    with torch.no_grad():  # kill a third of each: they can never win the top-K
        lorsa.b_V[: lorsa.cfg.n_heads // 3] = -1e4
        tc.b_enc[:10] = -1e4
    ids = RandomTokenSource(97, 16, 5, bos=1).batch(0, 4)
    per = trainer.losses(ids)["per"]
    for key, (_, code, *_rest) in per.items():
        trainer.fired[key][code.indices[:, 1:][code.values[:, 1:] > 0]] = True
    dead = {key: (~f).nonzero().flatten() for key, f in trainer.fired.items()}
    assert len(dead[("lorsa", 0)]) >= lorsa.cfg.n_heads // 3 and len(dead[("transcoder", 0)]) >= 10
    trainer.resample(per, step=0)
    for key in [("lorsa", 0), ("transcoder", 0)]:
        m = trainer.mods[key]
        with torch.no_grad():
            code = m.encode(per[key][2])  # the same inputs, the modules' own top-K
        active = code.indices[:, 1:][code.values[:, 1:] > 0]
        assert set(dead[key].tolist()) <= set(active.tolist()), key
        # and only on a few tokens each (the top fifth of K / N of the batch, the own token included), so that
        # they do not crowd out the live units elsewhere
        tokens = code.indices[:, 1:].shape[0] * code.indices.shape[1] - code.indices.shape[0]
        per_unit = torch.isin(active, dead[key]).sum().item() / len(dead[key])
        assert per_unit <= 0.2 * m.cfg.top_k / len(m.decoder()[0]) * tokens + 2, key


def test_fit_joint_saves_modules_for_the_model_and_starts_from_an_earlier_version(tmp_path):
    adapter = ModelAdapter(tiny_llama())
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    start = tmp_path / "start"
    for (kind, L), m in _modules(rm).items():  # saved under another fingerprint: an earlier version of the model
        save_module(m, kind, start, "0123456789abcdef", adapter.name, dtype=torch.float32)
    with pytest.raises(Exception, match="trained on another version of .* the model loaded now"):
        load_replacements(start, adapter)
    cfg = JointConfig(**(SMALL | dict(steps=3, resample_every=0)))
    metrics = fit_joint(adapter, cfg, start, tmp_path / "out", progress=False,
                        source=RandomTokenSource(97, 16, 0, bos=1))
    assert set(metrics) == {f"layer{L}.{k}" for k, L in _modules(rm)}
    saved = load_replacements(tmp_path / "out", adapter)  # now under this model's fingerprint
    assert set(saved) == set(_modules(rm))
    assert not (tmp_path / "out" / ".train_state.joint.safetensors").exists()
    assert model_fingerprint(adapter)


def test_joint_rounds_are_counted_and_the_per_layer_record_carried(tmp_path):
    """Each joint round records its number and what it trained on, and keeps what the per-layer stage trained on."""
    from replacement.store import saved_metrics

    adapter = ModelAdapter(tiny_llama())
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    start = tmp_path / "start"
    for (kind, L), m in _modules(rm).items():
        save_module(m, kind, start, model_fingerprint(adapter), adapter.name,
                    {"train_steps": 7, "train_source": "text: a.txt"}, dtype=torch.float32)
    cfg = JointConfig(**(SMALL | dict(steps=2, resample_every=0)))
    src = RandomTokenSource(97, 16, 0, bos=1)
    fit_joint(adapter, cfg, start, tmp_path / "r1", progress=False, source=src)
    fit_joint(adapter, cfg, tmp_path / "r1", tmp_path / "r2", progress=False, source=src)
    for folder, n in (("r1", 1), ("r2", 2)):
        for name, m in saved_metrics(tmp_path / folder).items():
            assert (m["joint_rounds"], m["train_steps"], m["train_source"]) == (n, 7, "text: a.txt"), (folder, name)
            assert m["joint_source"] == "RandomTokenSource"  # what the round itself trained on (a source's describe)


def test_joint_mixture_leaves_out_additions_for_models_never_trained_on_them():
    """toy and pythia were trained without arithmetic rows (every stage of their recipe), llama with them."""
    from types import SimpleNamespace

    from replacement.data import Mixture
    from replacement.joint import WITH_ADDITIONS, WITHOUT_ADDITIONS, joint_mixture
    from replacement.lm.recipe import RECIPE_LATER_STAGES, RECIPE_MIXTURE

    for name in ("toy", "pythia", "llama"):
        arith = RECIPE_MIXTURE[name].arith > 0 or any(s["mixture"].arith > 0 for s in RECIPE_LATER_STAGES.get(name, []))
        got = joint_mixture(SimpleNamespace(name=name), JointConfig())
        assert got == (WITH_ADDITIONS if arith else WITHOUT_ADDITIONS), name
        assert (got.arith > 0) == arith
    assert abs(sum(WITHOUT_ADDITIONS.weights()) - 1) < 1e-9 and abs(sum(WITH_ADDITIONS.weights()) - 1) < 1e-9
    mine = Mixture(1.0, 0.0, 0.0)
    assert joint_mixture(SimpleNamespace(name="toy"), JointConfig(mixture=mine)) is mine
    assert joint_mixture(SimpleNamespace(name="/some/local/folder"), JointConfig()) == WITH_ADDITIONS


def test_jacobian_term_is_each_transcoders_jacobian_error_at_the_real_inputs(tmp_path):
    """The joint Jacobian term, rebuilt apart: each transcoder's `jacobian_error` at the clean run's inputs (BOS
    left out, normalised by the trainer's scales, its own top-K code there), the random directions drawn in layer
    order from the step's generator, the last one along the logit directions; their mean.  Off by default."""
    from types import SimpleNamespace

    from replacement.activations import hook_points
    from replacement.train import jacobian_error, readout_directions

    torch.manual_seed(0)
    adapter = ModelAdapter(tiny_llama())
    ids = torch.randint(2, 97, (2, 12))
    ids[:, 0] = 1
    with torch.no_grad():
        assert float(_trainer(tmp_path / "off", adapter).losses(ids)["jacobian"]) == 0.0
    trainer = _trainer(tmp_path / "on", adapter, tc_jacobian=1.0, tc_jacobian_readout=True, tc_jacobian_tokens=7,
                       seed=3)
    with torch.no_grad():
        got = trainer.losses(ids, step=5)["jacobian"]
        layers = sorted(L for kind, L in trainer.keys if kind == "transcoder")
        points = [hook_points("transcoder", L)[0] for L in layers]
        clean = adapter.run(ids, capture=points)
        gen = torch.Generator().manual_seed(3 * 1_000_003 + 5)
        errors = []
        for L, point in zip(layers, points):
            m = trainer.mods[("transcoder", L)]
            c_x, c_y = trainer.scales[("transcoder", L)]
            x = clean.cache[point][:, 1:].reshape(-1, adapter.d_model).float() * c_x
            readout = readout_directions(adapter) if L == adapter.n_layers - 1 else None
            errors.append(jacobian_error(SimpleNamespace(module=m, c_x=c_x, c_y=c_y), adapter.mlp(L), x, m.encode(x),
                                         7, gen, readout))
    assert float(got) > 1e-3  # random transcoders are far from their MLPs
    torch.testing.assert_close(got, torch.stack(errors).mean(), rtol=1e-4, atol=1e-6)


def test_jacobian_term_is_trained_and_needs_its_weight(tmp_path):
    """Trained on the Jacobian term alone, the transcoders' Jacobian error falls; the readout variant without a
    weight is refused in one line."""
    from replacement.errors import CircuitsError

    adapter = ModelAdapter(tiny_llama())
    trainer = _trainer(tmp_path / "a", adapter, steps=30, kl_coef=0.0, recon_coef=0.0, tc_jacobian=1.0, lr=1e-2)
    errors = [trainer.train_step(step)["jac"] for step in range(30)]
    assert sum(errors[-5:]) < 0.7 * sum(errors[:5]), errors
    with pytest.raises(CircuitsError, match="--tc-jacobian-readout needs a Jacobian weight"):
        _trainer(tmp_path / "b", adapter, tc_jacobian_readout=True)


def test_a_joint_round_stopped_while_saving_in_place_leaves_the_set_and_resumes(tmp_path, monkeypatch):
    """Refining a folder in place (the default of `--joint --init-from DIR`), a Ctrl-C while the modules are being
    written left the first ones refined and the others not, and the rerun refused to resume (its starting
    modules had changed).  Now nothing moves into place until every module is written: the folder is as it was,
    and the rerun resumes and saves what an uninterrupted round saves."""
    import shutil

    from replacement import store

    adapter = ModelAdapter(tiny_llama())
    rm = random_replacements(adapter, n_features=32, tc_k=4)
    start = tmp_path / "start"
    for (kind, L), m in _modules(rm).items():
        save_module(m, kind, start, model_fingerprint(adapter), adapter.name, dtype=torch.float32)
    shutil.copytree(start, tmp_path / "whole")
    before = {f.name: f.read_bytes() for f in start.iterdir()}
    cfg = JointConfig(**(SMALL | dict(steps=6, resample_every=0)))
    src = RandomTokenSource(97, 16, 0, bos=1)
    fit_joint(adapter, cfg, tmp_path / "whole", progress=False, source=src)  # never stopped

    real, writes = store.atomic_save, []

    def stopped_at_the_third(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 3:
            raise KeyboardInterrupt
        return real(tensors, path, metadata)

    monkeypatch.setattr(store, "atomic_save", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        fit_joint(adapter, cfg, start, progress=False, source=src)
    assert {f.name: f.read_bytes() for f in start.iterdir() if not f.name.startswith(".")} == before
    monkeypatch.setattr(store, "atomic_save", real)
    fit_joint(adapter, cfg, start, progress=False, source=src)  # resumes from the saved state, the same inputs
    assert not [f for f in start.iterdir() if f.name.startswith(".")]  # no state, no staged files left
    done, whole = load_replacements(start, adapter), load_replacements(tmp_path / "whole", adapter)
    for key, m in whole.items():
        for (n, p), q in zip(m.named_parameters(), done[key].parameters()):
            torch.testing.assert_close(q, p, atol=0, rtol=0, msg=f"{key} {n}")


def test_a_joint_round_into_another_folder_holding_modules_is_refused_unless_overwrite(tmp_path):
    """--joint --out DIR replaced the modules DIR held (a finished per-layer set) without a word; it is refused
    in one line, as the per-layer stage refuses, unless --overwrite.  Refining the start folder in place (no --out)
    is what `--joint --init-from DIR` asks for, and goes on."""
    from replacement.errors import BadInputError

    adapter = ModelAdapter(tiny_llama())
    fp = model_fingerprint(adapter)
    for name, seed in (("start", 0), ("taken", 1)):
        for (kind, L), m in _modules(random_replacements(adapter, n_features=32, tc_k=4, seed=seed)).items():
            save_module(m, kind, tmp_path / name, fp, adapter.name)
    before = {f.name: f.read_bytes() for f in (tmp_path / "taken").iterdir()}
    cfg = JointConfig(**(SMALL | dict(steps=2, resample_every=0)))
    src = RandomTokenSource(97, 16, 0, bos=1)
    with pytest.raises(BadInputError, match="taken already holds trained layer0.lorsa.*add --overwrite"):
        fit_joint(adapter, cfg, tmp_path / "start", tmp_path / "taken", progress=False, source=src)
    assert {f.name: f.read_bytes() for f in (tmp_path / "taken").iterdir()} == before
    fit_joint(adapter, cfg, tmp_path / "start", tmp_path / "taken", progress=False, source=src, overwrite=True)
    assert {f.name: f.read_bytes() for f in (tmp_path / "taken").iterdir()} != before
    fit_joint(adapter, cfg, tmp_path / "start", progress=False, source=src)  # in place


def test_a_set_saved_halfway_is_named_and_a_full_disk_changes_nothing(tmp_path, monkeypatch):
    """config.json records each module file's CRC-32, and is written before the files move in: a full disk fails
    it before anything moved (the old set still loads), and a kill -9 between it and the renames leaves a folder
    whose load names the staged file to move, not "damaged" bytes."""
    import errno

    from replacement import store
    from replacement.errors import CheckpointError

    adapter = ModelAdapter(tiny_llama())
    fp = model_fingerprint(adapter)
    items = lambda seed: [(m, k, None) for (k, L), m in _modules(random_replacements(adapter, n_features=32, tc_k=4,  # noqa: E731
                                                                                     seed=seed)).items()]
    folder = tmp_path / "r"
    store.save_modules(items(0), folder, fp, adapter.name, dtype=torch.float32)
    old = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert set(load_replacements(folder, adapter))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "atomic_write_text", full)
    with pytest.raises(OSError):
        store.save_modules(items(1), folder, fp, adapter.name, dtype=torch.float32)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in folder.iterdir() if not f.name.startswith(".")} == old
    assert set(load_replacements(folder, adapter))

    real = store.os.replace

    def killed(src, dst):  # the process dies at its first module's rename, config.json written
        if str(src).rsplit("/", 1)[-1].startswith(store.STAGED):
            raise SystemExit("killed")
        return real(src, dst)

    monkeypatch.setattr(store.os, "replace", killed)
    with pytest.raises(SystemExit):
        store.save_modules(items(2), folder, fp, adapter.name, dtype=torch.float32)
    monkeypatch.setattr(store.os, "replace", real)
    with pytest.raises(CheckpointError, match=r"stopped before moving its new layer\d\.\w+\.safetensors in \(it waits as "
                                              r"\.staged-layer"):
        load_replacements(folder, adapter)
