"""`circuits train-replacements`: the recipe chains, checked against what the bundled sets record of their own
training, and the stage runner (order, carried modules, resume) on a tiny saved model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from cli.main import train_cmd
from replacement.bundle import preset_folder
from replacement.recipe import RECIPES, Stage, run_stages, stage_folders


def _options(stage: Stage) -> dict:
    """The `circuits train` parameters a stage runs with, defaults filled in, as click parses them."""
    return train_cmd.make_context("train", ["--model", "x", *stage.args]).params


def _saved(model: str) -> dict[str, tuple[dict, dict]]:
    """{module name: (its config, its metrics)} from the bundled files' own metadata."""
    folder = preset_folder(model) / "replacements"
    out = {}
    for name, entry in json.loads((folder / "config.json").read_text())["modules"].items():
        meta = safe_open(str(folder / entry["file"]), "pt").metadata()
        out[name] = json.loads(meta["config"]), json.loads(meta["metrics"])
    return out


def _trains(stage: Stage, kind: str, layer: int, n_layers: int) -> bool:
    p = _options(stage)
    if p["joint"]:
        return False
    layers = [int(x) for x in p["layers"].split(",")] if p["layers"] else range(n_layers)
    return p["what"] in ("all", kind) and layer in layers


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_each_recipe_is_what_the_bundled_modules_record(model):
    """For every bundled module: the last per-layer stage that trained it set its shape, K, skip, steps and data,
    the joint rounds after that stage are its round count, and the last stage's settings are its joint config."""
    stages, saved = RECIPES[model], _saved(model)
    n_layers = 1 + max(int(n.split(".")[0][5:]) for n in saved)
    last = _options(stages[-1])
    assert last["joint"]
    for name, (cfg, metrics) in saved.items():
        kind, layer = name.split(".")[1], int(name.split(".")[0][5:])
        i = max(i for i, s in enumerate(stages) if _trains(s, kind, layer, n_layers))
        p = _options(stages[i])
        if kind == "transcoder":
            assert (cfg["n_features"], cfg["top_k"], cfg["skip"]) == (
                p["tc_expansion"] * cfg["d_model"], p["tc_top_k"], p["tc_skip"]), name
        else:
            assert (cfg["n_qk"], cfg["heads_per_group"], cfg["top_k"]) == (
                p["lorsa_qk_per_head"] * cfg["model_heads"], p["lorsa_heads_per_group"], p["lorsa_top_k"]), name
        assert metrics["train_steps"] == p["steps"], name
        if metrics.get("train_source") is not None:  # recorded since 2026-12-04's transcoders
            assert metrics["train_source"].startswith("text:" if p["corpora_only"] else "mixture:"), name
        if metrics.get("joint_rounds") is not None:  # counted since 2026-12-04
            assert metrics["joint_rounds"] == sum(_options(s)["joint"] for s in stages[i + 1:]), name
        jc = metrics["joint_config"]
        assert (jc["steps"], jc["batch_size"], jc["seq_len"], jc["lr"], jc["resample_every"]) == (
            last["steps"], last["batch_size"], last["seq_len"], last["lr"], last["resample_every"]), name
        # recorded since the options came (a default then)
        assert (jc["recon_coef"], jc.get("tc_token_norm", False), jc.get("tc_readout_coef", 0.0)) == (
            last["recon_coef"], last["tc_token_norm"], last["tc_readout_coef"]), name
        assert (jc.get("tc_jacobian", 0.0), jc.get("tc_jacobian_readout", False)) == (
            last["tc_jacobian"], last["tc_jacobian_readout"]), name


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_each_recipe_can_run(model):
    """A stage that starts from the stage before's modules (`--init-from`) must keep their widths (K and a skip
    connection may change; `Trainer._init_from_saved` refuses any other change): one that widens is ``fresh``.
    Joint stages and partial stages need a stage before them."""
    stages = RECIPES[model]
    n_layers = 1 + max(int(n.split(".")[0][5:]) for n in _saved(model))
    width = {}
    for i, stage in enumerate(stages):
        p = _options(stage)
        assert i > 0 or not (p["joint"] or stage.partial or stage.fresh), stage.name
        for kind in ("lorsa", "transcoder"):
            w = (p["lorsa_qk_per_head"], p["lorsa_heads_per_group"]) if kind == "lorsa" else p["tc_expansion"]
            for layer in range(n_layers):
                if _trains(stage, kind, layer, n_layers):
                    if i > 0 and not stage.fresh:
                        assert width[kind, layer] == w, f"{stage.name} starts layer {layer}'s {kind} from another width"
                    width[kind, layer] = w
        if p["joint"]:
            assert not stage.fresh and len(width) == 2 * n_layers, stage.name


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stages_chain_carry_the_untouched_modules_and_resume(saved_model, tmp_path):
    from replacement.models import load_model
    from replacement.store import load_replacements

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. 1 + 2 = 3\n" * 200)
    tc = ("--text", str(text), "--batch-size", "2", "--seq-len", "16", "--tc-top-k", "4")  # a transcoder stage's
    small = (*tc, "--lorsa-qk-per-head", "1", "--lorsa-heads-per-group", "4", "--lorsa-top-k", "2", "--tc-expansion", "1")
    stages = [Stage("per-layer", ("--what", "all", "--steps", "3", *small)),
              Stage("joint1", ("--joint", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--text", str(text))),
              Stage("tc1", ("--what", "transcoder", "--layers", "1", "--steps", "3", "--tc-skip", *tc, "--tc-expansion",
                            "1"), partial=True),
              Stage("tc0", ("--what", "transcoder", "--layers", "0", "--steps", "3", *tc, "--tc-expansion", "2"),
                    partial=True, fresh=True)]
    calls = []

    def train(argv):
        calls.append(argv)
        train_cmd.main(args=argv, prog_name="circuits train", standalone_mode=False)

    model = str(saved_model)
    final = run_stages(model, stages, tmp_path / "w", train, echo=lambda s: None)
    folders = stage_folders(model, stages, tmp_path / "w")
    assert final == folders[-1] and len(calls) == 4
    assert "--init-from" not in calls[0] and "--init-from" not in calls[3]  # the first stage, and the fresh one
    for argv, prev in zip(calls[1:3], folders):  # the others start from the stage before
        assert argv[argv.index("--init-from") + 1] == str(prev)
    adapter = load_model(model)
    every = {(k, L) for k in ("lorsa", "transcoder") for L in range(adapter.n_layers)}
    for f in folders:
        assert set(load_replacements(f, adapter, earlier_version=True)) == every, f
    mods = load_replacements(final, adapter, earlier_version=True)
    assert mods[("transcoder", 1)].cfg.skip and not mods[("transcoder", 0)].cfg.skip
    assert mods[("transcoder", 0)].cfg.n_features == 2 * mods[("transcoder", 1)].cfg.n_features
    carried = {2: ("layer0.lorsa", "layer1.lorsa", "layer0.transcoder"), 3: ("layer0.lorsa", "layer1.lorsa", "layer1.transcoder")}
    for i, names in carried.items():  # a partial stage carries the modules it leaves alone byte for byte
        for name in names:
            assert _digest(folders[i] / f"{name}.safetensors") == _digest(folders[i - 1] / f"{name}.safetensors"), (i, name)
        (trained,) = {f"layer{L}.transcoder" for L in (0, 1)} - set(names)
        assert _digest(folders[i] / f"{trained}.safetensors") != _digest(folders[i - 1] / f"{trained}.safetensors")

    before = {f: _digest(f) for f in final.glob("*.safetensors")}
    run_stages(model, stages, tmp_path / "w", train, echo=lambda s: None)
    assert len(calls) == 4  # every stage done: nothing runs again
    (final / "stage.json").unlink()  # the last stage interrupted after its copy: it runs again, in that folder
    run_stages(model, stages, tmp_path / "w", train, echo=lambda s: None)
    assert len(calls) == 5 and calls[4] == calls[3]
    for name in carried[3]:
        assert _digest(final / f"{name}.safetensors") == before[final / f"{name}.safetensors"]


def test_a_partial_first_stage_is_refused(tmp_path):
    from replacement.errors import BadInputError

    with pytest.raises(BadInputError, match="needs a stage before it"):
        run_stages("toy", [Stage("tc", ("--what", "transcoder"), partial=True)], tmp_path, lambda argv: None)


def test_every_bundled_model_has_a_recipe():
    from replacement.bundle import PRESET_NAMES

    assert set(RECIPES) == set(PRESET_NAMES)
