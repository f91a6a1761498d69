"""Loading presets, local folders and hub ids; bad input gives one clear line, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from replacement.errors import BadInputError, ModelLoadError
from replacement.models import load_model
from tests.conftest import tiny_llama, tiny_neox


@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_local_folder_loads_and_matches(saved_llama):
    model, path = saved_llama
    adapter = load_model(str(path))
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(adapter.run(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in adapter.model.parameters())
    # the hints a user is given name the model as --model must get it back: a local folder by its path
    assert load_model(adapter.model_arg).name == adapter.name and adapter.model_arg == str(path)
    assert load_model("toy").model_arg == "toy"


def test_a_local_folder_named_as_a_preset_is_not_the_preset(tmp_path, monkeypatch):
    """A local model in a folder called "llama" was taken for the bundled llama: training saved its replacements in
    ./replacements/llama and trace looked for them in the package's bundled set, then blamed another version."""
    from replacement.bundle import is_preset
    from replacement.store import default_folder, default_train_folder

    tiny_llama().save_pretrained(tmp_path / "llama")
    adapter = load_model(str(tmp_path / "llama"))
    assert not is_preset(adapter.name) and adapter.model_arg == str(tmp_path / "llama")
    assert default_folder(adapter) == default_train_folder(adapter) == tmp_path / "llama" / "replacements"
    assert load_model(adapter.model_arg).name == adapter.name
    monkeypatch.chdir(tmp_path)  # given as ./llama or llama/: the same folder, not the preset
    for name in ("./llama", "llama/"):
        a = load_model(name)
        assert not is_preset(a.name) and default_folder(a).resolve() == (tmp_path / "llama" / "replacements")


def test_bfloat16_load(tmp_path):
    tiny_neox().save_pretrained(tmp_path / "n")
    adapter = load_model(str(tmp_path / "n"), dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    with torch.no_grad():
        out = adapter.run(torch.randint(0, 97, (1, 7))).logits
    assert torch.isfinite(out.float()).all()


def test_bad_names_and_devices(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local HF cache"):
        load_model("EleutherAI/not-a-real-model-xyz")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA GPU"):
            load_model("llama", device="cuda")
        with pytest.raises(BadInputError, match="--device cuda:7 was asked for"):
            load_model("llama", device="cuda:7")
    from replacement.models import resolve_device

    assert resolve_device("cpu:0") == torch.device("cpu:0")
    for bad, says in (("cudax", "unknown device 'cudax'"), ("cpu:3", "the CPU is cpu"), ("mps", "unknown device")):
        with pytest.raises(BadInputError, match=says):
            resolve_device(bad)
    with pytest.raises(BadInputError, match="unknown dtype"):
        load_model("llama", dtype="float8")


def test_a_folder_without_a_tokenizer_or_with_a_broken_one(saved_model, tmp_path):
    """No tokenizer files: the adapter has none (token ids still work from Python), and every command that reads
    text says so in one line (it was an empty 2-token tokenizer that dropped the prompt, and a traceback in
    eval).  A tokenizer file that cannot be read is a one-line error naming it."""
    import shutil

    from replacement.models import NO_TOKENIZER, TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(saved_model, bare)
    for f in TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    adapter = load_model(str(bare))
    assert adapter.tokenizer is None
    ids = torch.tensor([[1, 5, 7]])
    assert adapter.run(ids).logits.shape[:2] == (1, 3)
    with pytest.raises(BadInputError, match="the model has no tokenizer"):
        adapter.tokenize("the cat")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 400)
    for args in (("trace", "the cat", "--model", str(bare)),
                 ("circuits", "train", "--model", str(bare), "--text", str(tmp_path / "t.txt"), "--steps", "2",
                  "--out", str(tmp_path / "o")),
                 ("circuits", "eval", "--model", str(bare), "--text", str(tmp_path / "t.txt"))):
        r = _cli(*args)
        assert r.returncode == 1 and r.stderr.strip().endswith(NO_TOKENIZER) and "\n" not in r.stderr.strip(), r.stderr
    r = _cli("circuits", "heads", "--model", str(bare), "--layer", "0", "--n-seqs", "2", "--top", "1", "--cache-dir",
             str(tmp_path / "cache"))  # goes on, on random token ids, and says so
    assert r.returncode == 0 and r.stdout.startswith("note: the model has no tokenizer"), (r.stdout, r.stderr)
    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    (broken / "tokenizer.json").write_text("{")
    with pytest.raises(ModelLoadError, match=f"cannot read the tokenizer in {broken}"):
        load_model(str(broken))


def test_a_prompt_the_tokenizer_has_no_tokens_for_is_refused():
    """A tokenizer that has no token for any of a prompt's text (it encodes to nothing) would leave BOS alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from replacement.models import encode_prompt

    tok = Tokenizer(models.BPE(vocab={"<s>": 0, "a": 1, "b": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    assert fast("hi there", add_special_tokens=False).input_ids == []
    with pytest.raises(BadInputError, match="the prompt 'hi there' has no tokens in this model's tokenizer"):
        encode_prompt(fast, "hi there", 64)
    assert encode_prompt(fast, "a b", 64)[0].tolist() == [0, 1, 2]


def test_train_never_replaces_trained_modules_unasked(saved_model, tmp_path):
    """A second `circuits train` into a folder holding the modules it would train is refused in one line (the
    files untouched) unless --overwrite; a folder with some modules only ends with a trace line that puts a complete
    set under it (it suggested this folder alone, which trace refuses)."""
    (tmp_path / "t.txt").write_text("the cat sat on the mat. 1 + 2 = 3\n" * 400)
    out = tmp_path / "o"
    args = ("circuits", "train", "--model", str(saved_model), "--what", "transcoder", "--layers", "0", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--text", str(tmp_path / "t.txt"), "--out", str(out))
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert (f"to trace with them: trace PROMPT --model {saved_model} --replacements {saved_model / 'replacements'} "
            f"--replacements {out} (this folder holds layer0.transcoder only)") in r.stdout, r.stdout
    before = (out / "layer0.transcoder.safetensors").read_bytes()
    r = _cli(*args)
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {out} already holds trained layer0.transcoder, which this "
                                                       "run would replace: add --overwrite, or --out another folder")
    assert (out / "layer0.transcoder.safetensors").read_bytes() == before
    r = _cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    r = _cli("trace", "the cat", "--model", str(saved_model), "--replacements", str(saved_model / "replacements"),
             "--replacements", str(out), "--out", str(tmp_path / "g"), "--format", "json")
    assert r.returncode == 0, r.stderr  # the suggested trace runs
    # a model with no set of its own, trained in part into its own folder: no trace to suggest (it suggested the
    # folder twice, under itself), but what is missing
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(saved_model, mine, ignore=shutil.ignore_patterns("replacements"))
    r = _cli(*args[:3], str(mine), *args[4:-2])
    assert r.returncode == 0, r.stderr
    assert (f"saved in {mine / 'replacements'}, which holds layer0.transcoder only: a trace needs every layer's Lorsa "
            "and transcoder") in r.stdout and "to trace with them" not in r.stdout, r.stdout


def test_mean_over_says_which_prompts_it_cut(saved_model, tmp_path):
    """--mean-over prompts longer than the context are cut to it (as a reference, not refused), and a line says so."""
    adapter = load_model(str(saved_model))
    (tmp_path / "ref.txt").write_text("the cat sat\n" + "the cat sat on the mat " * adapter.context + "\n")
    r = _cli("circuits", "patch", "the cat sat", "--model", str(saved_model), "--component", "mlp_err.0@1",
             "--mode", "mean", "--mean-over", str(tmp_path / "ref.txt"))
    assert r.returncode == 0, r.stderr
    assert (f"note: 1 of the 2 prompts of --mean-over are longer than the model's context; their first "
            f"{adapter.context} tokens are used") in r.stdout


def test_untrained_preset_says_how_to_train(monkeypatch, tmp_path):
    import replacement.bundle as bundle

    monkeypatch.setattr(bundle, "BUNDLE_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="circuits train-lm --model toy"):
        load_model("toy")


def test_prompt_checks(saved_llama):
    adapter = load_model(str(saved_llama[1]))
    with pytest.raises(BadInputError, match="empty"):
        adapter.tokenize("  ")
    with pytest.raises(BadInputError, match="longer than the model's context"):
        adapter.run(torch.zeros(1, adapter.context + 1, dtype=torch.long))


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from cli.main import circuits; from cli.trace import trace;"
                           "cmd = trace if sys.argv[1] == 'trace' else circuits; sys.argv = sys.argv[1:]; cmd()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (("circuits", "eval", "--model", "nope"), "unknown model"),
    (("circuits", "eval", "--model", "/no/such/dir"), "no such model folder"),
    (("trace", "36 + 62 =", "--model", "nope"), "unknown model"),
    (("trace", "hello", "--model", "./missing-folder"), "no such model folder"),
    (("circuits", "patch", "1 + 2 =", "--model", "llama", "--component", "mlp_err.0@1", "--mode", "mean"),
     "needs --mean-over"),
    (("circuits", "patch", "1 + 2 =", "--model", "llama", "--component", "mlp_err.0@1", "--mode", "mean",
      "--mean-over", "/no/such/file"), "cannot read --mean-over"),
])
def test_cli_bad_input_is_one_line(args, message):
    r = _cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_empty_prompt(saved_llama):
    r = _cli("trace", "", "--model", str(saved_llama[1]))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "the prompt is empty" in r.stderr


def test_models_command_lists_presets():
    r = _cli("circuits", "models")
    assert r.returncode == 0, r.stderr
    for name in ("toy", "pythia", "llama"):
        assert f"  {name} " in r.stdout


def test_local_checkpoints_are_hf_models_only(saved_llama, tmp_path, monkeypatch):
    """A folder with an HF model's config.json and weights is listed; a replacements folder (a config.json of
    its own, safetensors beside it) and a folder with a broken config.json are not, and both load as models
    would fail."""
    from replacement.models import local_checkpoints
    from replacement.store import save_module
    from tests.conftest import random_replacements

    _, model_folder = saved_llama
    adapter = load_model(str(model_folder))
    rm = random_replacements(adapter)
    save_module(rm.transcoders[0], "transcoder", tmp_path / "reps", "fp", adapter.name, dtype=torch.float32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[1, 2")
    (broken / "model.safetensors").write_bytes(b"")
    found = dict(local_checkpoints([tmp_path]))  # the replacements folder is no model; the broken one is said to be
    assert list(found) == [str(broken), str(model_folder)]
    assert found[str(broken)] == "local folder: config.json is not valid JSON; it does not load"
    for folder in (tmp_path / "reps", broken):
        with pytest.raises(ModelLoadError):
            load_model(str(folder))
    r = _cli("circuits", "models", "--search", str(tmp_path / "missing"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    # each folder described from its files: sizes, tokenizer, weights whole or truncated, replacements; a model
    # folder given itself is found
    import json
    import shutil

    cfg = json.loads((model_folder / "config.json").read_text())
    (name, where), = local_checkpoints([model_folder])
    assert name == str(model_folder) and where.startswith(
        f"local folder: llama, {cfg['num_hidden_layers']} layers, d={cfg['hidden_size']}, ")
    cut = tmp_path / "cut"
    shutil.copytree(model_folder, cut)
    weights = next(cut.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (cut / f).unlink(missing_ok=True)
    (_, where), = local_checkpoints([cut])
    assert f"truncated or corrupt weights ({weights.name})" in where and "no tokenizer" in where, where
    with pytest.raises(ModelLoadError):  # as the listing says: it does not load
        load_model(str(cut))
    monkeypatch.chdir(tmp_path)  # ./ is searched anyway: --search . lists each model once
    assert [name for name, _ in local_checkpoints([tmp_path])].count(str(cut)) == 1
    # a model whose weights are pickles only is listed, with why it does not load (not left out without a word)
    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copy(model_folder / "config.json", pick / "config.json")
    (pick / "pytorch_model.bin").write_bytes(b"not read")
    where = dict(local_checkpoints([pick]))[str(pick)]
    assert where == ("local folder: only pickle weights (pytorch_model.bin), which are never loaded: convert them "
                     "to safetensors"), where
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_model(str(pick))


@pytest.mark.slow
def test_cli_patch_prints_the_patcher_figures():
    """circuits patch on the bundled llama prints PathPatcher's effect and linear prediction, norms live or frozen,
    and with --together one effect for the components ablated at once."""
    from graphs.patching import PathPatcher, parse_component
    from replacement.assemble import ReplacementModel

    adapter = load_model("llama")
    model = ReplacementModel.load(adapter)
    ids = adapter.tokenize("36 + 62 =")
    target = adapter.tokenize(" 98")[0, -1].item()
    comp = parse_component("head.0.1@4")
    for flags, freeze in (((), False), (("--freeze-norms",), True)):
        r = _cli("circuits", "patch", "36 + 62 =", "--model", "llama", "--component", str(comp), "--target", " 98",
                 *flags)
        assert r.returncode == 0, r.stderr
        p = PathPatcher(model, ids, target, freeze_norms=freeze)
        effect, linear = p.effects([comp])[0].effect, p.linear_effects([comp])[0]
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(str(comp)))
        assert f"effect {effect:+.4f}" in line and f"linear {linear:+.4f}" in line, (line, effect, linear)
    group = (comp, parse_component("lorsa.0.1443@4"))  # --together: one line, the two ablated in one run
    r = _cli("circuits", "patch", "36 + 62 =", "--model", "llama", "--target", " 98", "--together",
             *(a for c in group for a in ("--component", str(c))))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " effect " in ln]
    effect = PathPatcher(model, ids, target).effects([group])[0].effect
    assert len(lines) == 1 and f"effect {effect:+.4f}" in lines[0], (lines, effect)
    # a head that does not fire on the prompt is patched (effect 0) and said to be idle; one that fires is not
    lr = PathPatcher(model, ids, target).rec.layers[0]
    fired = set(lr.lorsa_code.indices[4][lr.lorsa_code.values[4] != 0].tolist())
    idle = next(h for h in range(model.lorsas[0].cfg.n_heads) if h not in fired)
    r = _cli("circuits", "patch", "36 + 62 =", "--model", "llama", "--component", f"lorsa.0.{idle}@4", "--component",
             f"lorsa.0.{min(fired)}@4")
    assert r.returncode == 0, r.stderr
    first, second = [ln for ln in r.stdout.splitlines() if " effect " in ln]
    assert "effect +0.0000" in first and f"(lorsa.0.{idle}@4 not active on this prompt)" in first
    assert "not active" not in second


@pytest.mark.slow
def test_cli_patch_mean_ablation(tmp_path):
    """--mode mean --mean-over FILE: the CLI prints PathPatcher's mean-ablation effect; the means leave BOS out."""
    from graphs.patching import PathPatcher, parse_component
    from replacement.assemble import ReplacementModel

    adapter = load_model("llama")
    model = ReplacementModel.load(adapter)
    lines = ["12 + 34 = 46", "The cat sat on the mat."]
    (tmp_path / "ref.txt").write_text("\n".join(lines[:1]) + "\n\n" + lines[1] + "\n")
    refs = [adapter.tokenize(ln)[0] for ln in lines]
    ids = adapter.tokenize("36 + 62 =")
    target = adapter.tokenize(" 98")[0, -1].item()
    p = PathPatcher(model, ids, target, reference=refs)
    comps = [parse_component(c) for c in ("lorsa.0.1443@4", "mlp_err.1@4")]
    r = _cli("circuits", "patch", "36 + 62 =", "--model", "llama", "--target", " 98", "--mode", "mean",
             "--mean-over", str(tmp_path / "ref.txt"), *(a for c in comps for a in ("--component", str(c))))
    assert r.returncode == 0, r.stderr
    for comp, res in zip(comps, p.effects(comps, "mean")):
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(str(comp)))
        assert f"effect {res.effect:+.4f}" in line, (line, res.effect)
    assert all(int(x[0]) == adapter.tokenizer.bos_token_id for x in refs)
    errs = torch.cat([model.record(x).layers[1].mlp_err[1:] for x in refs]).float()  # every position but BOS
    torch.testing.assert_close(p.mean_write(comps[1])[4], errs.mean(0), rtol=1e-5, atol=1e-5)


def test_use_module_swaps_in_a_saved_module(tmp_path):
    from replacement.checkpoint import CheckpointError
    from replacement.models import ModelAdapter, model_fingerprint
    from replacement.store import save_module
    from tests.conftest import random_replacements

    adapter = ModelAdapter(tiny_llama(), name="m")
    model, other = random_replacements(adapter), random_replacements(adapter, seed=5)
    path = save_module(other.transcoders[1], "transcoder", tmp_path, model_fingerprint(adapter), "m", dtype=torch.float32)
    x = torch.randn(3, adapter.d_model)
    assert not torch.allclose(model.transcoders[1](x)[0], other.transcoders[1](x)[0])
    model.use_module(path)
    torch.testing.assert_close(model.transcoders[1](x)[0], other.transcoders[1](x)[0])
    neox = random_replacements(ModelAdapter(tiny_neox(), name="n"))
    with pytest.raises(CheckpointError, match="was trained on model 'm'"):
        neox.use_module(path)


def test_bundle_names_the_recipe_presets():
    """The generic engine finds bundled models by `replacement.bundle` alone: the same names as the recipe's presets,
    each at the folder the recipe exports to."""
    from replacement import bundle
    from replacement.lm.presets import PRESETS

    assert bundle.PRESET_NAMES == tuple(PRESETS)
    assert all(p.folder == bundle.BUNDLE_DIR / name for name, p in PRESETS.items())


def test_an_hf_id_takes_a_revision(tmp_path, monkeypatch):
    """``owner/name@revision`` loads that revision (a ref or a commit) from the hub's cache layout, built by hand;
    one that is not cached fails in one line naming it (it was passed whole to HF as a repo id)."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    commits = {"main": "0123abcd" * 5, "v2": "4567ef01" * 5}
    for shift, (ref, commit) in enumerate(commits.items()):
        (repo / "refs" / ref).write_text(commit)
        model = tiny_llama()
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(shift)
        model.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    main, v2, by_commit = (load_model(n) for n in ("someone/tiny", "someone/tiny@v2", f"someone/tiny@{commits['v2']}"))
    emb = [a.model.model.embed_tokens.weight for a in (main, v2, by_commit)]
    torch.testing.assert_close(emb[1], emb[0] + 1)
    torch.testing.assert_close(emb[2], emb[1])
    assert v2.name == v2.model_arg == "someone/tiny@v2"
    with pytest.raises(ModelLoadError, match=r"revision 'v3' is not in the local HF cache"):
        load_model("someone/tiny@v3")
    for bad in ("someone/tiny@", "someone@v2", "someone/tiny@v2@v3", "tiny@v2/x"):
        with pytest.raises(ModelLoadError, match="unknown model|no such model"):
            load_model(bad)


def test_a_seq_len_past_the_context_is_said(saved_model, tmp_path):
    """`circuits train --seq-len` longer than the model's context (64 here) trains on windows of the context, and
    says so in a line (it was cut without a word)."""
    (tmp_path / "t.txt").write_text("the cat sat on the mat. 1 + 2 = 3\n" * 400)
    r = _cli("circuits", "train", "--model", str(saved_model), "--what", "transcoder", "--layers", "0", "--steps", "2",
             "--batch-size", "2", "--seq-len", "1000", "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "note: --seq-len 1000 is longer than tiny-llama's context of 64 tokens; training on windows of 64" in r.stderr
