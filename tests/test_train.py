"""The training engine and checkpoint format for Lorsa and transcoders (tiny models, seconds each)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from replacement import checkpoint as ckpt
from replacement.activations import RandomTokenSource, hook_points
from replacement.hooks import hook_name
from replacement.lorsa import Lorsa, LorsaConfig
from replacement.models import ModelAdapter, model_fingerprint
from replacement.store import load_module, load_replacements, save_module
from replacement.train import TrainConfig, Trainer, TrainingDiverged, evaluate_modules, fit_replacements, fold_scales
from replacement.transcoder import Transcoder, TranscoderConfig
from tests.conftest import random_replacements, tiny_llama, tiny_neox

SMALL = dict(batch_size=4, seq_len=16, lorsa_heads_per_group=4, lorsa_qk_per_head=2, lorsa_top_k=4,
             tc_expansion=2, tc_top_k=4, checkpoint_every=5, warmup=2, norm_batches=1)


def _source(seed=0):
    return RandomTokenSource(97, 16, seed, bos=1)


def _lorsa(rd=4):
    torch.manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
    m = Lorsa(LorsaConfig(d_model=64, n_qk=2, d_qk=8, heads_per_group=3, top_k=2, rotary_dim=rd), inv_freq=inv)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _tc(skip=False):
    torch.manual_seed(0)
    m = Transcoder(TranscoderConfig(d_model=64, n_features=32, top_k=5, skip=skip))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("make", [_lorsa, lambda: _tc(skip=True)], ids=["lorsa", "transcoder_skip"])
def test_folding_the_normalisation_is_exact(make):
    m, c_x, c_y = make(), 3.7, 0.42
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        expected = m(x * c_x)[0] / c_y
        got = fold_scales(m, c_x, c_y)(x)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [_lorsa, _tc])
def test_checkpoint_round_trip_is_exact(make, tmp_path):
    m = make()
    path = save_module(m, "lorsa" if isinstance(m, Lorsa) else "transcoder", tmp_path, "fp1", "toy", {"fvu": 0.1},
                       dtype=torch.float32)
    loaded, meta = load_module(path, "fp1")
    for (n, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert meta["metrics"]["fvu"] == 0.1 and meta["config"]["top_k"] == m.cfg.top_k
    with pytest.raises(ckpt.CheckpointError, match="trained on model 'toy'"):
        load_module(path, "another-fingerprint")
    # bf16 storage (the default) reloads as float32 with bf16-rounded values
    loaded16, _ = load_module(save_module(m, "lorsa" if isinstance(m, Lorsa) else "transcoder", tmp_path / "b", "fp1", "toy"))
    first = next(iter(m.state_dict()))
    torch.testing.assert_close(loaded16.state_dict()[first], m.state_dict()[first].bfloat16().float())


def test_replacements_for_another_model_fail_clearly(tmp_path):
    a, b = ModelAdapter(tiny_llama(), name="a"), ModelAdapter(tiny_neox(), name="b")
    save_module(_tc(), "transcoder", tmp_path, model_fingerprint(a), "a")
    assert set(load_replacements(tmp_path, a)) == {("transcoder", 0)}
    with pytest.raises(ckpt.CheckpointError, match="trained on model 'a', not on 'b'"):
        load_replacements(tmp_path, b)
    with pytest.raises(ckpt.CheckpointError, match="circuits train --model a"):
        load_replacements(tmp_path / "none", a)


def test_cached_activations_replay_the_model_resume_and_fit_the_disk(tmp_path, monkeypatch):
    """--cache-activations: each shard is one step's batch as the model computes it (stored in bf16); a second run
    rewrites nothing; a cache the disk cannot hold is refused after its first shard, which is kept."""
    import shutil
    from types import SimpleNamespace

    from replacement.activations import ShardSource, cache_to_disk, collect
    from replacement.errors import BadInputError

    adapter = ModelAdapter(tiny_llama(), name="t")
    points = sorted(set(hook_points("lorsa", 0)) | set(hook_points("transcoder", 1)))
    src = _source()
    shards = ShardSource(cache_to_disk(adapter, src, points, tmp_path / "c", 3, 2, progress=False))
    for step in range(3):
        want, got = collect(adapter, src.batch(step, 2), points), shards.acts(step)
        assert sorted(got) == points
        for p in points:
            torch.testing.assert_close(got[p].float(), want[p].to(torch.bfloat16).float(), rtol=0, atol=0)
    written = [f.stat().st_mtime_ns for f in shards.files]
    cache_to_disk(adapter, src, points, tmp_path / "c", 3, 2, progress=False)
    assert [f.stat().st_mtime_ns for f in shards.files] == written
    size = shards.files[0].stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=2 * size))
    cache_to_disk(adapter, src, points, tmp_path / "d", 3, 2, progress=False)  # two more shards: just fits
    with pytest.raises(BadInputError, match=r"caching 5 steps of activations needs about .* more than the .* free"):
        cache_to_disk(adapter, src, points, tmp_path / "e", 5, 2, progress=False)
    assert sorted(f.name for f in (tmp_path / "e").iterdir()) == ["cache.json", "shard_000000.safetensors"]


def test_a_cache_made_from_other_inputs_is_refused_not_replayed(tmp_path):
    """--cache-activations reused any shards in its folder: another --text, --batch-size, --seq-len or model trained
    on the old activations (and recorded the new settings), a cache without the points a run needs ended in a
    KeyError.  Each is now one line naming what differs; the same inputs resume it, and fewer points reuse it."""
    from replacement.activations import RandomTokenSource, cache_to_disk
    from replacement.errors import BadInputError

    adapter = ModelAdapter(tiny_llama(), name="t")
    both = sorted(set(hook_points("lorsa", 0)) | set(hook_points("transcoder", 1)))
    cache = tmp_path / "c"
    cache_to_disk(adapter, _source(), both, cache, 2, 2, progress=False)
    cache_to_disk(adapter, _source(), both, cache, 3, 2, progress=False)  # the same inputs, one step more: resumes
    cache_to_disk(adapter, _source(), list(hook_points("lorsa", 0)), cache, 3, 2, progress=False)  # fewer points
    for args, says in [((_source(1), both, cache, 3, 2), "other text"),
                       ((_source(), both, cache, 3, 4), "another --batch-size"),
                       ((RandomTokenSource(97, 8, 0, bos=1), both, cache, 3, 2), "another --seq-len"),
                       ((_source(), both + [hook_name(0, "mlp.in")], cache, 3, 2), "other hook points")]:
        with pytest.raises(BadInputError, match=f"made from .*{says}"):
            cache_to_disk(adapter, *args, progress=False)
    with pytest.raises(BadInputError, match="made from another model"):
        cache_to_disk(ModelAdapter(tiny_neox(), name="t"), _source(), both, cache, 3, 2, progress=False)
    with pytest.raises(BadInputError, match="made from the model at another --dtype"):
        cache_to_disk(ModelAdapter(tiny_llama().to(torch.bfloat16), name="t"), _source(), both, cache, 3, 2,
                      progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = cache / f".shard_000003.safetensors.tmp{int(dead.stdout)}"  # what a killed caching run leaves
    left.write_bytes(b"x")
    cache_to_disk(adapter, _source(), both, cache, 4, 2, progress=False)
    assert not left.exists() and (cache / "shard_000003.safetensors").is_file()
    (cache / "cache.json").unlink()
    with pytest.raises(BadInputError, match="holds activation shards but no cache.json"):
        cache_to_disk(adapter, _source(), both, cache, 3, 2, progress=False)


def test_modules_beyond_memory_are_refused_before_any_data_is_read(monkeypatch):
    """check_units counts the parameters on the meta device; 16 bytes each (weight, gradient, Adam's moments)."""
    from replacement.errors import BadInputError
    from replacement.train import check_units

    adapter = ModelAdapter(tiny_llama(), name="t")
    cfg = TrainConfig(steps=1, **SMALL)
    units = Trainer(adapter, cfg, _source(), "/dev/null").units
    n = sum(p.numel() for u in units for p in u.module.parameters())
    monkeypatch.setenv("CIRCUITS_MEMORY_BUDGET", str(16 * n - 1))
    with pytest.raises(BadInputError, match=f"training 4 modules of {n:,} parameters needs about"):
        check_units(adapter, cfg)
    with pytest.raises(BadInputError, match="needs about"):
        Trainer(adapter, cfg, _source(), "/dev/null")
    # a step's activations: at least a float per token per unit (features, heads, queries and keys, residual points)
    units_wide = 4 * adapter.d_model * adapter.n_layers + sum(
        u.module.cfg.n_features if u.kind == "transcoder" else u.module.cfg.n_heads + 2 * u.module.cfg.n_qk * u.module.cfg.d_qk
        for u in units)
    need = 16 * n + 4 * cfg.batch_size * cfg.seq_len * units_wide
    monkeypatch.setenv("CIRCUITS_MEMORY_BUDGET", str(need))
    check_units(adapter, cfg)
    monkeypatch.setenv("CIRCUITS_MEMORY_BUDGET", str(need - 1))
    with pytest.raises(BadInputError, match=f"a step of --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} needs about"):
        check_units(adapter, cfg)


def test_one_model_pass_feeds_every_module():
    adapter = ModelAdapter(tiny_llama(), name="t")
    calls = []
    run = adapter.run
    adapter.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    trainer = Trainer(adapter, TrainConfig(steps=3, **SMALL), _source(), "/dev/null")
    trainer.estimate_norms()
    calls.clear()
    trainer.train_step(0)
    assert len(calls) == 1 and len(trainer.units) == 4  # 2 layers x (Lorsa + transcoder)


def test_evaluate_modules_counts_dead_and_dense_units():
    """Dead (never active) and dense (active on more than half of the tokens) units, and the dense units' share
    of the L0, against a count made here from the module's own pre-activations on the same batches: units 0-1
    always fire (bias +5), 2-3 never (bias -5), 4-7 read random directions."""
    from replacement.activations import hook_points

    adapter = ModelAdapter(tiny_llama(), name="t")
    d = adapter.d_model
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_model=d, n_features=8, top_k=0, layer=0))
    with torch.no_grad():
        tc.W_enc[:4] = 0
        tc.b_enc[:] = torch.tensor([5.0, 5.0, -5.0, -5.0, 0, 0, 0, 0])
    got = evaluate_modules(adapter, {("transcoder", 0): tc}, _source(1), n_batches=3, batch_size=4)["layer0.transcoder"]
    fires, n = torch.zeros(8), 0
    with torch.no_grad():
        for i in range(3):
            x = adapter.run(_source(1).batch(i, 4), capture=[hook_points("transcoder", 0)[0]]).cache
            x = x[hook_points("transcoder", 0)[0]].float()[:, 1:]  # BOS excluded
            pre = x @ tc.W_enc.t() + tc.b_enc
            fires += (pre > 0).reshape(-1, 8).sum(0)
            n += pre.shape[0] * pre.shape[1]
    dense = fires > n / 2
    assert fires[0] == fires[1] == n and fires[2] == fires[3] == 0
    assert got["dead_fraction"] == pytest.approx(float((fires == 0).float().mean()))
    assert got["dense_units"] == int(dense.sum()) >= 2
    assert got["dense_l0"] == pytest.approx(float(fires[dense].sum()) / n)
    assert got["dense_l0"] <= got["l0"] == pytest.approx(float(fires.sum()) / n)


def test_training_lowers_fvu_and_resume_is_exact(tmp_path):
    adapter = ModelAdapter(tiny_neox(), name="t")
    cfg = TrainConfig(steps=40, lr=3e-3, **SMALL)
    full = Trainer(adapter, cfg, _source(), tmp_path / "a.safetensors")
    full.estimate_norms()
    full.init_modules()
    before = evaluate_modules(adapter, full.folded_modules(), _source(1), n_batches=2, batch_size=4)
    full.train(resume=True, progress=False)  # a state written before a first step does not exist: fresh start
    after = evaluate_modules(adapter, full.folded_modules(), _source(1), n_batches=2, batch_size=4)
    for key in after:
        assert after[key]["fvu"] < 0.8 * before[key]["fvu"], (key, before[key]["fvu"], after[key]["fvu"])
    half = Trainer(adapter, cfg, _source(), tmp_path / "b.safetensors")
    half.train(resume=False, progress=False, stop_after=20)
    resumed = Trainer(adapter, cfg, _source(), tmp_path / "b.safetensors")
    resumed.train(resume=True, progress=False)
    assert resumed.step == 40
    for u, v in zip(full.units, resumed.units):
        for (n, p), q in zip(u.module.named_parameters(), v.module.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{u.name}.{n}")


def test_training_a_preset_never_writes_into_the_package(tmp_path, monkeypatch):
    """Without a folder, a bundled preset's modules go to ./replacements/<preset> (a local model's beside it): the
    shipped replacements change only by `train-replacements --install`."""
    from replacement.bundle import preset_folder
    from replacement.joint import JointConfig, fit_joint
    from replacement.launch import output_folder
    from replacement.store import default_train_folder

    shipped = preset_folder("toy") / "replacements"
    before = {f.name: f.stat().st_mtime_ns for f in shipped.iterdir()}
    monkeypatch.chdir(tmp_path)
    adapter = ModelAdapter(tiny_llama(), name="toy")  # a model that calls itself a preset
    assert default_train_folder(adapter) == Path("replacements") / "toy"
    fit_replacements(adapter, TrainConfig(steps=2, **SMALL), source=_source(), eval_source=_source(1), progress=False)
    saved = sorted(f.name for f in (tmp_path / "replacements" / "toy").glob("*.safetensors"))
    assert saved == ["layer0.lorsa.safetensors", "layer0.transcoder.safetensors", "layer1.lorsa.safetensors",
                     "layer1.transcoder.safetensors"]
    fit_joint(adapter, JointConfig(steps=1, batch_size=2, seq_len=16), tmp_path / "replacements" / "toy",
              progress=False, source=_source())  # refined in place, as asked
    assert {f.name: f.stat().st_mtime_ns for f in shipped.iterdir()} == before
    # `train --joint --init-from DIR` without --out refines DIR, unless DIR is the package's own
    assert output_folder(adapter, None, tmp_path / "replacements" / "toy") == tmp_path / "replacements" / "toy"
    assert output_folder(adapter, None, shipped) == Path("replacements") / "toy"
    assert output_folder(adapter, tmp_path / "x", shipped) == tmp_path / "x"
    from replacement.errors import BadInputError

    # an --out inside the package (its shipped replacements, or any folder of its bundle) is refused in one line
    for inside in (shipped, shipped.parent, shipped / "sub"):
        with pytest.raises(BadInputError, match="inside the package's bundled models"):
            output_folder(adapter, inside)
    assert {f.name: f.stat().st_mtime_ns for f in shipped.iterdir()} == before


def test_a_folder_holding_the_modules_is_replaced_only_when_asked_or_resumed(tmp_path):
    from replacement.errors import BadInputError
    from replacement.train import check_replaceable

    adapter = ModelAdapter(tiny_llama(), name="t")
    cfg = TrainConfig(what="transcoder", layers=[1], steps=2, **SMALL)
    assert check_replaceable(adapter, cfg, tmp_path, True, False) == tmp_path / ".train_state.transcoder.safetensors"
    (tmp_path / "layer0.transcoder.safetensors").write_bytes(b"x")  # another layer's: not in the way
    (tmp_path / "layer1.lorsa.safetensors").write_bytes(b"x")  # another kind's: not in the way
    check_replaceable(adapter, cfg, tmp_path, True, False)
    (tmp_path / "layer1.transcoder.safetensors").write_bytes(b"x")
    with pytest.raises(BadInputError, match="already holds trained layer1.transcoder"):
        check_replaceable(adapter, cfg, tmp_path, True, False)
    check_replaceable(adapter, cfg, tmp_path, True, True)  # --overwrite
    state = tmp_path / ".train_state.transcoder.safetensors"
    state.write_bytes(b"x")  # an interrupted run there, begun over the module (with --overwrite): it resumes
    module = tmp_path / "layer1.transcoder.safetensors"
    os.utime(module, ns=(state.stat().st_mtime_ns - 10**9,) * 2)
    check_replaceable(adapter, cfg, tmp_path, True, False)
    with pytest.raises(BadInputError, match="already holds"):  # --no-resume would start anew over it
        check_replaceable(adapter, cfg, tmp_path, False, False)
    # a module saved after that state was (another run's, into the same folder) is not replaced by resuming
    os.utime(module, ns=(state.stat().st_mtime_ns + 10**9,) * 2)
    with pytest.raises(BadInputError, match="layer1.transcoder, saved after the interrupted run"):
        check_replaceable(adapter, cfg, tmp_path, True, False)
    check_replaceable(adapter, cfg, tmp_path, True, True)


def test_a_folder_of_another_models_replacements_is_started_afresh_only_when_asked(tmp_path):
    """Training into a folder that holds another model's set starts its config.json afresh: the other modules no
    longer load.  That was done without a word when the run replaced none of them (and the refusal named only the
    one it replaced); it is now refused unless --overwrite, naming the other model."""
    import json

    from replacement.errors import BadInputError
    from replacement.models import model_fingerprint
    from replacement.store import load_replacements, save_modules
    from replacement.train import check_replaceable

    other = ModelAdapter(tiny_neox(), name="other")
    rm = random_replacements(other)
    save_modules([(m, "transcoder", None) for m in rm.transcoders.values()], tmp_path, model_fingerprint(other),
                 other.name)
    adapter = ModelAdapter(tiny_llama(), name="t")
    cfg = TrainConfig(what="lorsa", layers=[0], steps=2, **SMALL)  # replaces none of the folder's modules
    with pytest.raises(BadInputError, match=r"holds the replacements of another model \('other': 2 modules\)"):
        check_replaceable(adapter, cfg, tmp_path, True, False)
    assert sorted(json.loads((tmp_path / "config.json").read_text())["modules"]) == [
        "layer0.transcoder", "layer1.transcoder"]
    assert len(load_replacements(tmp_path, other)) == 2  # untouched
    check_replaceable(adapter, cfg, tmp_path, True, True)  # --overwrite: asked for
    check_replaceable(other, TrainConfig(what="lorsa", steps=2, **SMALL), tmp_path, True, False)  # its own model


def test_nan_stops_and_keeps_the_checkpoint(tmp_path):
    adapter = ModelAdapter(tiny_llama(), name="t")
    state = tmp_path / "s.safetensors"
    Trainer(adapter, TrainConfig(steps=10, **SMALL), _source(), state).train(progress=False, stop_after=5)
    before = state.read_bytes()
    bad = Trainer(adapter, TrainConfig(steps=10, **SMALL, lr=1e30), _source(), state)
    with pytest.raises(TrainingDiverged, match="last good checkpoint kept"):
        bad.train(resume=False, progress=False)  # (another lr cannot resume that state: see the test below)
    assert state.read_bytes() == before
    tensors, meta = ckpt.load(state)
    assert meta["step"] == 5 and all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_a_state_resumes_only_under_the_settings_it_was_saved_with(tmp_path):
    """Batches follow the step and the loss the settings: a state saved under one --lr or --tc-top-k must not
    silently continue under another. The error names each change and leaves the state as it was; how often states
    are saved may change."""
    adapter = ModelAdapter(tiny_llama(), name="t")
    state = tmp_path / "s.safetensors"
    Trainer(adapter, TrainConfig(steps=10, **SMALL), _source(), state).train(progress=False, stop_after=5)
    before = state.read_bytes()
    other = dict(SMALL, tc_top_k=3)
    with pytest.raises(ckpt.CheckpointError, match=r"other settings \(lr 0.002 -> 0.001, tc_top_k 4 -> 3\)"):
        Trainer(adapter, TrainConfig(steps=10, lr=1e-3, **other), _source(), state).train(progress=False)
    assert state.read_bytes() == before
    # nor from another text, or another model of the same shape (the state records their fingerprints)
    with pytest.raises(ckpt.CheckpointError, match=r"saved from other inputs \(the training text: "):
        Trainer(adapter, TrainConfig(steps=10, **SMALL), _source(seed=1), state).train(progress=False)
    with pytest.raises(ckpt.CheckpointError, match=r"saved from other inputs \(the model's weights: "):
        Trainer(ModelAdapter(tiny_llama(rope_theta=500.0, initializer_range=0.03), name="t"),
                TrainConfig(steps=10, **SMALL), _source(), state).train(progress=False)
    assert state.read_bytes() == before
    resumed = Trainer(adapter, TrainConfig(steps=10, **dict(SMALL, checkpoint_every=2)), _source(), state)
    resumed.train(progress=False)
    assert resumed.resumed_at == 5 and resumed.step == 10


KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.conftest import tiny_llama
from tests.test_train import SMALL, _source
from replacement.models import ModelAdapter
from replacement.train import TrainConfig, Trainer
adapter = ModelAdapter(tiny_llama(), name="t")
cfg = TrainConfig(steps={steps}, **SMALL)
t = Trainer(adapter, cfg, _source(), {state!r})
orig = t.train_step
def slow(step):
    time.sleep(0.05)
    return orig(step)
t.train_step = slow
t.train(resume=True, progress=False)
print("finished", t.step)
"""


def test_kill_minus_9_then_resume(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    state = str(tmp_path / "s.safetensors")
    script = KILL_SCRIPT.format(root=root, steps=60, state=state)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.exists(state) and ckpt.load(state)[1]["step"] >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = ckpt.load(state)[1]["step"]
    assert 10 <= saved < 60
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "finished 60" in done.stdout


DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.conftest import tiny_llama
from tests.test_train import SMALL, _source
from replacement.models import ModelAdapter
from replacement.train import TrainConfig, Trainer
from replacement.checkpoint import atomic_save
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{rdv}", rank=rank, world_size=2)
adapter = ModelAdapter(tiny_llama(), name="t")
t = Trainer(adapter, TrainConfig(steps=8, **SMALL), _source(), {state!r}, world=2, rank=rank)
t.train(resume=False, progress=False)
if rank == 0:
    atomic_save({{f"{{u.name}}.{{n}}": p for u in t.units for n, p in u.module.named_parameters()}}, {out!r})
dist.barrier()  # both ranks are done communicating before either tears the group down
dist.destroy_process_group()
"""


def test_two_process_gloo_equals_single_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = DIST_SCRIPT.format(root=root, rdv=str(tmp_path / "rdv"), state=str(tmp_path / "d.safetensors"),
                                out=str(tmp_path / "dist.safetensors"))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-2000:]
    adapter = ModelAdapter(tiny_llama(), name="t")
    single = Trainer(adapter, TrainConfig(steps=8, **SMALL), _source(), tmp_path / "s.safetensors")
    single.train(resume=False, progress=False)
    dist_params, _ = ckpt.load(tmp_path / "dist.safetensors")
    assert len(dist_params) == sum(1 for u in single.units for _ in u.module.parameters())
    for u in single.units:
        for n, p in u.module.named_parameters():
            torch.testing.assert_close(dist_params[f"{u.name}.{n}"], p.detach(), atol=1e-5, rtol=0)


def test_fit_replacements_writes_loadable_folder(tmp_path):
    adapter = ModelAdapter(tiny_llama(), name="t")
    metrics = fit_replacements(adapter, TrainConfig(steps=10, layers=[1], **SMALL), tmp_path, progress=False,
                               source=_source(), eval_source=_source(1))
    assert set(metrics) == {"layer1.lorsa", "layer1.transcoder"}
    for m in metrics.values():
        assert {"fvu", "l0", "dead_fraction", "spliced_loss", "clean_loss", "zero_ablation_loss"} <= set(m)
        assert m["l0"] <= 4
    mods = load_replacements(tmp_path, adapter)
    assert set(mods) == {("lorsa", 1), ("transcoder", 1)}
    folder_cfg = json.loads((tmp_path / "config.json").read_text())
    assert folder_cfg["fingerprint"] == model_fingerprint(adapter)
    assert not list(tmp_path.glob(".train_state*"))


def test_training_can_start_from_a_saved_folder(tmp_path):
    """--init-from: the modules start as the saved ones (after the round trip through the normalised units)."""
    from replacement.errors import CircuitsError

    adapter = ModelAdapter(tiny_llama(), name="t")
    fit_replacements(adapter, TrainConfig(steps=10, layers=[1], **SMALL), tmp_path / "a", progress=False,
                     source=_source(), eval_source=_source(1))
    saved = load_replacements(tmp_path / "a", adapter)
    t = Trainer(adapter, TrainConfig(steps=1, layers=[1], init_from=str(tmp_path / "a"), **SMALL), _source(3),
                tmp_path / "s.safetensors")
    t.estimate_norms()
    t.init_modules()
    folded = t.folded_modules()
    assert set(folded) == set(saved)
    for key, m in saved.items():
        for (n, p), q in zip(m.named_parameters(), folded[key].parameters()):
            torch.testing.assert_close(q, p.float(), rtol=1e-5, atol=1e-6, msg=f"{key} {n}")
    other = Trainer(adapter, TrainConfig(steps=1, layers=[1], init_from=str(tmp_path / "a"),
                                         **{**SMALL, "tc_expansion": 2 * SMALL["tc_expansion"]}),
                    _source(3), tmp_path / "o.safetensors")
    other.estimate_norms()
    with pytest.raises(CircuitsError, match="another configuration"):
        other.init_modules()
    # another K: the same weights, the new K
    k = SMALL["tc_top_k"] + 1
    wider_k = Trainer(adapter, TrainConfig(steps=1, layers=[1], init_from=str(tmp_path / "a"), what="transcoder",
                                           **{**SMALL, "tc_top_k": k}), _source(3), tmp_path / "w.safetensors")
    wider_k.estimate_norms()
    wider_k.init_modules()
    tc, plain = wider_k.folded_modules()[("transcoder", 1)], saved[("transcoder", 1)]
    assert tc.cfg.top_k == k and plain.cfg.top_k == SMALL["tc_top_k"]
    for n, p in plain.named_parameters():
        torch.testing.assert_close(getattr(tc, n), p.float(), rtol=1e-5, atol=1e-6, msg=n)
    # a plain transcoder can start a skip one: the same weights, and a skip at zero
    skip = Trainer(adapter, TrainConfig(steps=1, layers=[1], init_from=str(tmp_path / "a"), what="transcoder",
                                        tc_skip=True, **SMALL), _source(3), tmp_path / "k.safetensors")
    skip.estimate_norms()
    skip.init_modules()
    tc, plain = skip.folded_modules()[("transcoder", 1)], saved[("transcoder", 1)]
    assert tc.cfg.skip and not tc.W_skip.any()
    for n, p in plain.named_parameters():
        torch.testing.assert_close(getattr(tc, n), p.float(), rtol=1e-5, atol=1e-6, msg=n)


def _held_active_set(tc, code):
    """The transcoder as a function of its input with the active set ``code`` held (what attribution linearises)."""
    from replacement.sparse import SparseCode

    return lambda z: tc.decode(SparseCode(torch.relu(tc.pre_activations(z).gather(-1, code.indices)), code.indices), z)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_jvp_equals_autograd(skip):
    tc = _tc(skip=skip)
    with torch.no_grad():
        if skip:
            tc.W_skip.normal_(0, 0.1)
    x, v = torch.randn(7, 64), torch.randn(7, 64)
    code = tc.encode(x)
    _, want = torch.func.jvp(_held_active_set(tc, code), (x,), (v,))
    torch.testing.assert_close(tc.jvp(code, v), want, atol=1e-5, rtol=1e-5)
    _, vjp = torch.func.vjp(_held_active_set(tc, code), x)
    torch.testing.assert_close(tc.vjp(code, v), vjp(v)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_jvp_holds_a_selected_but_inactive_feature_at_zero(skip):
    """Where fewer than K features have a positive pre-activation, top-K still selects K, some of them at value 0;
    those are inactive and carry no derivative: `jvp` and `vjp` against autograd through the held active set
    (ReLU of the selected pre-activations), on an encoder bias that leaves most tokens with under K active."""
    tc = _tc(skip=skip)
    with torch.no_grad():
        tc.b_enc.sub_(1.5)  # most pre-activations below 0
        if skip:
            tc.W_skip.normal_(0, 0.1)
    x, v = torch.randn(7, 64), torch.randn(7, 64)
    code = tc.encode(x)
    assert (code.values == 0).any() and (code.values > 0).any()  # selected-but-inactive features exist
    _, want = torch.func.jvp(_held_active_set(tc, code), (x,), (v,))
    torch.testing.assert_close(tc.jvp(code, v), want, atol=1e-5, rtol=1e-5)
    _, vjp = torch.func.vjp(_held_active_set(tc, code), x)
    torch.testing.assert_close(tc.vjp(code, v), vjp(v)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_later", [0, 2], ids=["per_layer", "cross_layer"])
def test_transcoder_topk_ranks_features_by_what_they_write(n_later):
    """Brute force: the K features kept at a token are the K largest ReLU(pre) x the size of everything the feature
    writes per unit of activation, sqrt(|W_dec[f]|^2 + sum_T |W_dec_later[f, T]|^2) (a cross-layer feature writes
    into later layers too), each with value ReLU(pre).  Decoder sizes spread over 100x, so that ranking by the
    pre-activation alone, or by the own-layer decoder alone, keeps other features."""
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_model=16, n_features=24, top_k=4, n_later=n_later))
    spread = lambda: torch.logspace(-1, 1, 24)[torch.randperm(24)]  # noqa: E731
    with torch.no_grad():
        tc.W_dec.mul_(spread()[:, None])
        if n_later:
            tc.W_dec_later.normal_(0, 0.25).mul_(spread()[:, None, None])
    x = torch.randn(12, 16)
    with torch.no_grad():
        code = tc.encode(x)
        pre = x @ tc.W_enc.t() + tc.b_enc
    dec, later = tc.W_dec.detach().tolist(), tc.W_dec_later.detach().flatten(1).tolist() if n_later else [[]] * 24
    size = torch.tensor([math.sqrt(sum(w * w for w in dec[f]) + sum(w * w for w in later[f])) for f in range(24)])
    others = 0
    for t in range(12):
        want = (torch.relu(pre[t]) * size).topk(4).indices
        assert set(code.indices[t].tolist()) == set(want.tolist()), t
        torch.testing.assert_close(code.dense(24)[t, want], torch.relu(pre[t, want]))
        others += set(torch.relu(pre[t]).topk(4).indices.tolist()) != set(want.tolist())
        if n_later:
            own = torch.tensor([math.sqrt(sum(w * w for w in dec[f])) for f in range(24)])
            others += set((torch.relu(pre[t]) * own).topk(4).indices.tolist()) != set(want.tolist())
    assert others >= 6  # the sizes decide the kept set at many tokens


def test_jacobian_error_against_full_jacobians():
    """The relative JVP error (normalised units) equals one built from full Jacobian matrices, token by token."""
    from types import SimpleNamespace

    from replacement.sparse import SparseCode
    from replacement.train import jacobian_error

    adapter = ModelAdapter(tiny_llama(), name="t")
    mlp = adapter.mlp(0)
    tc = _tc()
    unit = SimpleNamespace(module=tc, c_x=1.7, c_y=0.6)
    x = torch.randn(12, 64)
    code = tc.encode(x)
    got = jacobian_error(unit, mlp, x, code, 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the draws
    sub, v = torch.randperm(12, generator=g)[:5], torch.randn(5, 64, generator=g)
    num = den = 0.0
    for i, t in enumerate(sub.tolist()):
        J_mlp = torch.autograd.functional.jacobian(lambda z: unit.c_y * mlp(z / unit.c_x), x[t])  # [d, d]
        code_t = SparseCode(code.values[t], code.indices[t])
        J_tc = torch.autograd.functional.jacobian(_held_active_set(tc, code_t), x[t])
        num += float(((J_tc - J_mlp) @ v[i]).pow(2).sum())
        den += float((J_mlp @ v[i]).pow(2).sum())
    assert got.item() == pytest.approx(num / den, rel=1e-4)

    # along the readout: u J with u = xi @ D for output directions D [R, d]
    D = torch.randn(9, 64)
    got = jacobian_error(unit, mlp, x, code, 5, torch.Generator().manual_seed(4), readout=D)
    g = torch.Generator().manual_seed(4)
    sub, xi = torch.randperm(12, generator=g)[:5], torch.randn(5, 9, generator=g)
    num = den = 0.0
    for i, t in enumerate(sub.tolist()):
        J_mlp = torch.autograd.functional.jacobian(lambda z: unit.c_y * mlp(z / unit.c_x), x[t])
        code_t = SparseCode(code.values[t], code.indices[t])
        J_tc = torch.autograd.functional.jacobian(_held_active_set(tc, code_t), x[t])
        u = xi[i] @ D
        num += float((u @ (J_tc - J_mlp)).pow(2).sum())
        den += float((u @ J_mlp).pow(2).sum())
    assert got.item() == pytest.approx(num / den, rel=1e-4)


def test_readout_directions_give_the_demeaned_logits():
    """d(logit_v - mean logit) / d(residual) with the final norm's scale frozen is readout[v] / sigma."""
    from replacement.train import readout_directions

    for make in (tiny_llama, tiny_neox):
        adapter = ModelAdapter(make(), name="t")
        D = readout_directions(adapter)
        x = torch.randn(1, 1, adapter.d_model)
        norm = adapter.final_norm
        if isinstance(norm, torch.nn.LayerNorm):
            sigma = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt().detach()
            frozen = lambda z: (z - z.mean(-1, keepdim=True)) / sigma * norm.weight + norm.bias  # noqa: E731
        else:
            sigma = x.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt().detach()
            frozen = lambda z: z / sigma * norm.weight  # noqa: E731
        logits = lambda z: adapter.unembedding(frozen(z))[0, 0]  # noqa: E731
        J = torch.autograd.functional.jacobian(lambda z: logits(z) - logits(z).mean(), x)[:, 0, 0]  # [V, d]
        torch.testing.assert_close(J, D / sigma[0, 0], atol=1e-5, rtol=1e-4)


def test_the_jacobian_term_is_trained(tmp_path):
    """The trainer adds the term (and reports it) only when asked; the term itself is a usable objective:
    descending it on a batch lowers it."""
    from types import SimpleNamespace

    from replacement.errors import CircuitsError
    from replacement.train import jacobian_error

    adapter = ModelAdapter(tiny_llama(), name="t")
    for weight in (0.0, 1.0):
        cfg = TrainConfig(steps=3, what="transcoder", layers=[0], tc_jacobian=weight, **SMALL)
        t = Trainer(adapter, cfg, _source(), tmp_path / f"{weight}.safetensors")
        t.train(resume=False, progress=False)
        assert bool(t.jacobian_errors) == (weight > 0)
    last = adapter.n_layers - 1  # along the logit directions: used for the last layer only
    cfg = TrainConfig(steps=2, what="transcoder", layers=[0, last], tc_jacobian=1.0, tc_jacobian_readout=True, **SMALL)
    t = Trainer(adapter, cfg, _source(), tmp_path / "readout.safetensors")
    t.train(resume=False, progress=False)
    assert len(t.jacobian_errors) == 2 and t.readout.shape == (adapter.unembedding.weight.shape[0], adapter.d_model)
    with pytest.raises(CircuitsError, match="needs a Jacobian weight"):
        Trainer(adapter, TrainConfig(tc_jacobian_readout=True, **SMALL), _source(), tmp_path / "x.safetensors")
    tc = _tc()
    unit = SimpleNamespace(module=tc, c_x=1.0, c_y=1.0)
    x = torch.randn(64, 64)
    opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
    errors = []
    for _ in range(60):
        err = jacobian_error(unit, adapter.mlp(0), x, tc.encode(x), 64, torch.Generator().manual_seed(0))
        errors.append(err.item())
        opt.zero_grad()
        err.backward()
        opt.step()
    assert errors[-1] < 0.7 * errors[0], (errors[0], errors[-1])


def test_token_normalised_mse_closed_form_and_use(tmp_path):
    """Each token's squared error divided by its own output's squared norm (plus the floor), token by token;
    a token 10x smaller counts 100x more than in the plain MSE; the trainer uses it only when asked."""
    from replacement.train import token_normalised_mse

    y = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # |y|^2 = 25, 0.25, 0
    y_hat = y + torch.tensor([[1.0, 0.0], [0.0, 0.1], [0.2, 0.0]])
    m = (25 + 0.25 + 0) / 3
    by_hand = sum(e * m / (n2 + 0.01 * m) for e, n2 in [(1.0, 25), (0.01, 0.25), (0.04, 0.0)]) / 3 / 2
    assert float(token_normalised_mse(y_hat, y)) == pytest.approx(by_hand, rel=1e-6)
    plain_ratio = 0.01 / 1.0
    weighted_ratio = (0.01 * m / (0.25 + 0.01 * m)) / (1.0 * m / (25 + 0.01 * m))
    assert weighted_ratio > 50 * plain_ratio

    adapter = ModelAdapter(tiny_llama(), name="t")
    finals = {}
    for flag in (False, True):
        cfg = TrainConfig(steps=4, what="transcoder", layers=[0], tc_token_norm=flag, **SMALL)
        t = Trainer(adapter, cfg, _source(), tmp_path / f"{flag}.safetensors")
        t.train(resume=False, progress=False)
        finals[flag] = t.units[0].module.W_dec.detach().clone()
    assert not torch.equal(finals[False], finals[True])  # same seed and data: only the loss differs


def test_lorsa_bos_loss_closed_form_and_use(tmp_path):
    """Weight 0: the plain MSE over positions 1.. (position 0 gets no gradient); weight w: plus w x position 0's
    squared error relative to its own size, in units of the other positions' mean square; the trainer uses it
    (for Lorsa and, with its own flag, transcoders) only when asked."""
    from replacement.train import lorsa_loss

    y = torch.tensor([[[30.0, 40.0], [1.0, 0.0], [0.0, 2.0]]])  # [B=1, n=3, d=2]; |y_0|^2 = 2500
    err = torch.tensor([[[5.0, 0.0], [0.5, 0.0], [0.0, -1.0]]])
    y_hat = (y + err).requires_grad_()
    rest = (0.25 + 0 + 0 + 1.0) / 4  # mean over positions 1, 2 and both coordinates
    assert float(lorsa_loss(y_hat, y).detach()) == pytest.approx(rest)
    lorsa_loss(y_hat, y).backward()
    assert torch.all(y_hat.grad[:, 0] == 0) and torch.any(y_hat.grad[:, 1:] != 0)
    scale = (1.0 + 0 + 0 + 4.0) / 4  # the other positions' mean square
    by_hand = rest + 0.5 * (25.0 / 2500.0) * scale
    assert float(lorsa_loss(y_hat, y, 0.5).detach()) == pytest.approx(by_hand, rel=1e-6)

    adapter = ModelAdapter(tiny_llama(), name="t")
    for what, flag in (("lorsa", "lorsa_bos_weight"), ("transcoder", "tc_bos_weight")):
        finals = {}
        for w in (0.0, 1.0):
            cfg = TrainConfig(steps=4, what=what, layers=[0], **{flag: w}, **SMALL)
            t = Trainer(adapter, cfg, _source(), tmp_path / f"{what}{w}.safetensors")
            t.train(resume=False, progress=False)
            finals[w] = {k: v.clone() for k, v in t.units[0].module.state_dict().items()}
        assert any(not torch.equal(finals[0.0][k], finals[1.0][k]) for k in finals[0.0]), what  # only the loss differs


def test_bos_term_closed_form():
    """Position 0's squared error over its own squared norm (means over the batch), times the scale."""
    from replacement.train import bos_term

    y0 = torch.tensor([[3.0, 4.0], [0.0, 10.0]])  # |y|^2 = 25, 100
    y_hat0 = y0 + torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # |e|^2 = 1, 4
    assert float(bos_term(y_hat0, y0, torch.tensor(2.0))) == pytest.approx((2.5 / 62.5) * 2.0, rel=1e-6)


def test_the_joint_stage_measures_its_modules_where_asked(tmp_path):
    """With --text the joint stage's saved metrics are those of the modules on that text's held-out part (they
    were measured on the package's held-out data whatever the text, so a user saw another text's FVU)."""
    from replacement.joint import JointConfig, fit_joint

    adapter = ModelAdapter(tiny_llama(), name="t")
    folder = tmp_path / "r"
    fit_replacements(adapter, TrainConfig(steps=2, **SMALL), folder, source=_source(), eval_source=_source(1),
                     progress=False)
    held = RandomTokenSource(97, 32, 7, bos=1)
    metrics = fit_joint(adapter, JointConfig(steps=1, batch_size=2, seq_len=16), folder, progress=False,
                        source=_source(), eval_source=held)
    again = evaluate_modules(adapter, load_replacements(folder, adapter), held)
    assert set(metrics) == set(again)
    for name, m in metrics.items():
        assert m["fvu"] == pytest.approx(again[name]["fvu"], rel=1e-3, abs=1e-5), name


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    """Two trainings into one folder would mix their modules and states: while one holds it, the other is refused
    in one line; a folder a failed run created and left empty is removed."""
    from replacement.errors import BadInputError
    from replacement.io import exclusive_folder

    out = tmp_path / "out"
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from replacement.io import exclusive_folder\n"
              "with exclusive_folder(sys.argv[2], 'the output folder'):\n"
              "    print('locked', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).resolve().parents[1]), str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BadInputError, match="another run is writing to the output folder"):
            with exclusive_folder(out, "the output folder"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_folder(out, "the output folder"):  # free again once the holder is gone
        (out / "x").write_text("kept")
    fresh = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with exclusive_folder(fresh, "the output folder"):
            raise RuntimeError("the run failed")
    assert not fresh.exists() and (out / "x").read_text() == "kept"
    deep = tmp_path / "a" / "b" / "toy"  # its parents too (`./replacements/` was left behind)
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with exclusive_folder(deep, "the output folder"):
            raise RuntimeError("the run failed")
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()


def test_a_locked_folder_loses_what_killed_runs_left_and_a_read_only_one_is_refused_at_once(tmp_path, monkeypatch):
    """kill -9 during a save leaves ``.NAME.tmp<pid>`` (a whole training state's size): the next training into the
    folder removes those whose process is gone, and keeps a live one's.  A read-only folder was found only at the
    first checkpoint, after 100 steps; it is refused before any work."""
    import os

    from replacement.errors import BadInputError
    from replacement.io import exclusive_folder, make_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    left = out / f"..train_state.all.safetensors.tmp{int(dead.stdout)}"
    mine = out / f".layer0.lorsa.safetensors.tmp{os.getpid()}"
    for f in (left, mine, out / "layer0.lorsa.safetensors"):
        f.write_bytes(b"x")
    with exclusive_folder(out, "the output folder"):
        assert sorted(f.name for f in out.iterdir()) == sorted([mine.name, "layer0.lorsa.safetensors"])
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out else real(path, mode))
    with pytest.raises(BadInputError, match="cannot write into the output folder .*: it is read-only"):
        make_folder(out, "the output folder")


@pytest.mark.parametrize("stop, says", [(7, "the state of step 5 of 10 is saved in"), (2, "no state saved yet")])
def test_an_interrupted_training_says_what_is_saved(tmp_path, stop, says):
    """Ctrl-C (or SIGTERM) ends a training with where its last saved state is, and a rerun resumes from it."""
    adapter = ModelAdapter(tiny_llama(), name="t")
    state = tmp_path / "s.safetensors"
    t = Trainer(adapter, TrainConfig(steps=10, **SMALL), _source(), state)
    real = t.train_step

    def step(i):
        if i == stop:
            raise KeyboardInterrupt
        return real(i)

    t.train_step = step
    with pytest.raises(ckpt.Interrupted, match=says):
        t.train(progress=False)
    again = Trainer(adapter, TrainConfig(steps=10, **SMALL), _source(), state)
    again.train(progress=False)
    assert again.resumed_at == (5 if stop == 7 else None) and again.step == 10


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_it_interrupts_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, sig):
    """A first Ctrl-C (or SIGTERM) lets the step finish, saves it (step 8, not the checkpoint of step 5) and stops;
    the rerun resumes there and ends with the weights of a run never interrupted.  A second signal during the same
    step stops at once, from the last checkpoint."""
    handler = signal.getsignal(sig)
    adapter = ModelAdapter(tiny_llama(), name="t")
    cfg = TrainConfig(steps=10, **SMALL)
    full = Trainer(adapter, cfg, _source(), tmp_path / "full.safetensors")
    full.train(progress=False)

    def interrupted(state, times):
        t = Trainer(adapter, cfg, _source(), state)
        real = t.train_step

        def step(i):
            out = real(i)
            if i == 7:
                for _ in range(times):
                    signal.raise_signal(sig)
            return out

        t.train_step = step
        return t

    with pytest.raises(ckpt.Interrupted, match="the state of step 8 of 10 is saved"):
        interrupted(tmp_path / "s.safetensors", 1).train(progress=False)
    again = Trainer(adapter, cfg, _source(), tmp_path / "s.safetensors")
    again.train(progress=False)
    assert again.resumed_at == 8 and again.step == 10
    for u, v in zip(full.units, again.units):
        for (n, p), q in zip(u.module.named_parameters(), v.module.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{u.name}.{n}")
    with pytest.raises(ckpt.Interrupted, match="the state of step 5 of 10 is saved"):
        interrupted(tmp_path / "twice.safetensors", 2).train(progress=False)
    assert signal.getsignal(sig) == handler  # the training's handler is gone


def test_progress_into_a_log_is_drawn_rarely(tmp_path, capsys):
    """Into a file (not a terminal) the bar is drawn at its start and end, not at every step (its figures, set
    each step, wait for a draw): 30 KB of log for 200 steps before."""
    adapter = ModelAdapter(tiny_llama(), name="t")
    Trainer(adapter, TrainConfig(steps=30, **SMALL), _source(), tmp_path / "s.safetensors").train(progress=True)
    err = capsys.readouterr().err
    assert 1 <= err.count("train replacements") <= 3 and "30/30" in err, err


def test_saved_modules_record_every_training_setting(tmp_path):
    """Each saved module's metrics hold the run's whole TrainConfig (lr, batch, sequence length, BOS weights, ...),
    as the joint stage records its own, so a set can be told apart and trained again."""
    import json
    from dataclasses import asdict

    from safetensors import safe_open

    adapter = ModelAdapter(tiny_llama(), name="t")
    cfg = TrainConfig(what="transcoder", steps=2, lr=3e-4, tc_bos_weight=0.5, **SMALL)
    fit_replacements(adapter, cfg, tmp_path, source=_source(), eval_source=_source(1), progress=False)
    for L in range(adapter.n_layers):
        meta = json.loads(safe_open(str(tmp_path / f"layer{L}.transcoder.safetensors"), "pt").metadata()["metrics"])
        assert meta["train_config"] == json.loads(json.dumps(asdict(cfg)))
    folder = json.loads((tmp_path / "config.json").read_text())
    assert folder["modules"]["layer0.transcoder"]["metrics"]["train_config"]["tc_bos_weight"] == 0.5


def test_a_module_worse_than_its_mean_is_flagged_when_the_metrics_print(capsys):
    """A run at too high a learning rate can end with FVUs of 870 and no NaN; the table the run ends with says so
    instead of going straight to "to trace with them"."""
    from cli.main import _print_replacement_metrics

    row = dict(l0=4.0, dense_l0=0.0, dead_fraction=0.1, clean_loss=4.0, spliced_loss=4.1, zero_ablation_loss=5.0)
    _print_replacement_metrics({"layer0.lorsa": row | {"fvu": 870.0}, "layer0.transcoder": row | {"fvu": 0.04}})
    out = capsys.readouterr().out
    assert "warning: layer0.lorsa has an FVU of 1 or more" in out and "layer0.transcoder has" not in out
    _print_replacement_metrics({"layer0.transcoder": row | {"fvu": 0.04}})
    assert "warning" not in capsys.readouterr().out


def test_non_finite_activations_of_the_model_itself_are_named_as_such(tmp_path):
    """A model whose own activations are NaN on a batch (one embedding row at 3e38 in a NeoX did it on batches
    holding that token): training said "lorsa0: loss is nan", blaming the replacement, and every resume stopped at
    the same step.  Here a NaN weight of layer 1's MLP."""
    from replacement.errors import TrainingDiverged

    adapter = ModelAdapter(tiny_llama(), name="t")
    with torch.no_grad():
        adapter.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    t = Trainer(adapter, TrainConfig(steps=2, **SMALL), _source(), tmp_path / "s.safetensors")
    with pytest.raises(TrainingDiverged, match=r"the model's own blocks\.1\.mlp\.out is not finite on step 0's batch"):
        t.train(progress=False)
    from replacement.joint import JointConfig, JointTrainer  # the joint stage, too (it said "joint loss is nan")

    mods = {key: m for key, m in t.folded_modules().items()}
    joint = JointTrainer(adapter, mods, JointConfig(steps=2, batch_size=4, seq_len=16), _source(),
                         tmp_path / "j.safetensors")
    with pytest.raises(TrainingDiverged, match=r"the model's own .* is not finite on step 0's batch"):
        joint.train(progress=False)


def test_a_state_resumes_for_the_same_weights_under_another_folder_name(tmp_path):
    """A model folder copied or renamed (same weights) resumes its training state; it was refused as "a training
    state for 'neox', not 'neox_renamed'".  Another model of the state's name still is refused (its weights differ)."""
    state = tmp_path / "s.safetensors"
    cfg = TrainConfig(steps=10, **SMALL)
    Trainer(ModelAdapter(tiny_llama(), name="neox"), cfg, _source(), state).train(progress=False, stop_after=5)
    again = Trainer(ModelAdapter(tiny_llama(), name="neox_renamed"), cfg, _source(), state)
    again.train(progress=False)
    assert again.resumed_at == 5 and again.step == 10
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    with pytest.raises(ckpt.CheckpointError, match="is a training state for 'neox_renamed', not 'other'"):
        Trainer(ModelAdapter(other, name="other"), cfg, _source(), state).train(progress=False)


def test_signals_are_held_until_the_renames_end():
    """A Ctrl-C sent from another thread (Python runs handlers in the main thread whichever thread the signal
    reaches: a thread's signal mask did not hold it) waits for the block's end, then reaches the handler in place
    (here one that records when it ran; Python's own raises KeyboardInterrupt)."""
    import os
    import threading

    done, seen = [], []

    def record(signum, frame):
        seen.append(len(done))

    before = signal.signal(signal.SIGINT, record)
    try:
        with ckpt.signals_held():
            t = threading.Thread(target=lambda: os.kill(os.getpid(), signal.SIGINT))
            t.start()
            t.join()
            time.sleep(0.05)  # a handler would have run by now
            done.append("the block ran to its end")
        assert seen == [1]  # once, after the block
        handler = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert handler is record  # put back after the block

def test_frequency_penalty_in_closed_form():
    """Two tokens, K = 2, three heads: only the head over the target frequency counts, by how far over it is,
    times what it writes (activation x decoder norm), over the targets' mean norm."""
    from replacement.sparse import SparseCode
    from replacement.train import frequency_penalty

    code = SparseCode(torch.tensor([[2.0, 1.0], [0.5, 3.0]]), torch.tensor([[0, 1], [1, 2]]))
    w_norm = torch.tensor([1.0, 2.0, 4.0])
    freq = torch.tensor([0.1, 0.6, 0.2])  # target 0.2: head 1 is over it by 0.6 / 0.2 - 1 = 2, heads 0 and 2 are not
    y = torch.tensor([[3.0, 4.0], [0.0, 5.0]])  # norms 5 and 5
    want = 2 * (1.0 * 2.0 + 0.5 * 2.0) / 2 / 5.0
    assert frequency_penalty(code, w_norm, freq, 0.2, y).item() == pytest.approx(want)
    # its gradient reaches the over-frequent head's decoder norm only
    w = w_norm.clone().requires_grad_()
    frequency_penalty(code, w, freq, 0.2, y).backward()
    assert w.grad[0] == w.grad[2] == 0 < w.grad[1]


def test_the_frequency_penalty_lowers_dense_heads_and_resumes_exactly(tmp_path):
    """With the penalty, the Lorsa's most frequent heads fire less often than without it (same data, same
    steps), and the running frequencies it reads are saved with the state: a resumed run ends where an
    uninterrupted one does."""
    adapter = ModelAdapter(tiny_neox(), name="t")
    cfgs = {c: TrainConfig(what="lorsa", steps=60, lr=3e-3, lorsa_freq_penalty=c, lorsa_freq_target=0.05, **SMALL)
            for c in (0.0, 1.0)}
    runs = {}
    for c, cfg in cfgs.items():
        runs[c] = Trainer(adapter, cfg, _source(), tmp_path / f"{c}.safetensors")
        runs[c].train(resume=False, progress=False)
    for plain, penalised in zip(runs[0.0].units, runs[1.0].units):
        top = plain.freq.topk(3).values.sum()
        assert penalised.freq.topk(3).values.sum() < top, (plain.name, top, penalised.freq.topk(3).values)
    half = Trainer(adapter, cfgs[1.0], _source(), tmp_path / "h.safetensors")
    half.train(resume=False, progress=False, stop_after=30)
    resumed = Trainer(adapter, cfgs[1.0], _source(), tmp_path / "h.safetensors")
    resumed.train(resume=True, progress=False)
    for u, v in zip(runs[1.0].units, resumed.units):
        torch.testing.assert_close(u.freq, v.freq, atol=1e-6, rtol=0)
        for (n, p), q in zip(u.module.named_parameters(), v.module.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{u.name}.{n}")


def test_the_train_command_defaults_are_the_configs():
    """`circuits train`'s option defaults are TrainConfig's (per-layer) and JointConfig's (--joint): written twice
    (the command must not import torch to list its options), they must not drift apart."""
    from cli.main import _JOINT_ONLY, train_cmd
    from replacement.joint import JointConfig

    per_layer, joint = TrainConfig(), JointConfig()
    checked = 0
    for param in train_cmd.params:
        flag = getattr(param, "is_flag", False) and not isinstance(param.default, bool)
        default = False if flag else param.default  # click keeps an unset flag's default as a sentinel
        if default is None:
            continue  # each kind's own (seq_len, lr)
        for cfg in ((joint,) if param.name in _JOINT_ONLY else (per_layer, joint)):
            if hasattr(cfg, param.name):
                assert getattr(cfg, param.name) == default, (param.name, type(cfg).__name__)
                checked += 1
    assert checked >= 15


def test_a_tokenizer_without_bos_trains_from_text(saved_model, tmp_path):
    """A tokenizer with no BOS token (Qwen2's): training windows start with the stand-in traced prompts start with
    (`start_token`), as the docs say; TextSource read ``bos_token_id`` and every command that trains or scans text
    (train, the joint stage, eval, heads, correspond) failed with a TypeError."""
    from transformers import AutoTokenizer

    from replacement.activations import TextSource
    from replacement.models import load_model, start_token

    tok = AutoTokenizer.from_pretrained(saved_model)
    tok.bos_token = None
    assert tok.bos_token_id is None and start_token(tok) is not None
    src = TextSource(tok, torch.arange(5, 400) % 90 + 5, seq_len=16, seed=0)
    rows = src.batch(0, 4)
    assert rows.shape == (4, 16) and (rows[:, 0] == start_token(tok)).all()
    adapter = load_model(str(saved_model))
    adapter.tokenizer = tok
    metrics = evaluate_modules(adapter, {("transcoder", 0): _tc_for(adapter)}, src, n_batches=1, batch_size=4)
    assert math.isfinite(metrics["layer0.transcoder"]["fvu"])


def _tc_for(adapter):
    torch.manual_seed(0)
    return Transcoder(TranscoderConfig(d_model=adapter.d_model, n_features=16, top_k=4))


def test_text_metadata_reads_back_as_text(tmp_path):
    """A model fingerprint such as 6942162248e30930 (about 1 in 850 of them) was written bare and read back as the
    number inf, so that model's replacements never loaded: text metadata is written quoted, and files written before
    (bare) still read as text."""
    from safetensors.torch import save_file

    fp = "6942162248e30930"
    save_module(_tc(), "transcoder", tmp_path / "new", fp, "m")
    module, meta = load_module(tmp_path / "new" / "layer0.transcoder.safetensors", fingerprint=fp)
    assert meta["fingerprint"] == fp and module.cfg.n_features == 32
    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"),
              metadata={"fingerprint": fp, "model": "123", "kind": "lorsa", "step": "7", "config": '{"a": 1}'})
    _, meta = ckpt.load(tmp_path / "old.safetensors")
    assert meta == {"fingerprint": fp, "model": "123", "kind": "lorsa", "step": 7, "config": {"a": 1}}
    ckpt.atomic_save({"x": torch.zeros(1)}, tmp_path / "quoted.safetensors", {"fingerprint": "1234", "step": 7})
    assert ckpt.load(tmp_path / "quoted.safetensors")[1] == {"fingerprint": "1234", "step": 7}
