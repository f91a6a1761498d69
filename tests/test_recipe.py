"""The bundled-model recipe at tiny scale: tokenizer, data, training, checkpoints, resume, NaN."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from replacement import checkpoint as ckpt
from replacement.lm import presets
from replacement.data import BatchMaker, Mixture, addition_split, read_text_sources, tokenize_texts
from replacement.lm.recipe import LMTrainConfig, TrainingDiverged, prepare_data, train_lm
from replacement.lm.tokenizer import train_tokenizer
from replacement.tokenizer import number_token_ids

TEXT = ["The cat sat on the mat. The dog sat on the log. It was 1985 and the year was good.\n" * 40,
        "Alice said to Bob: we will meet at 12 or 7. Bob agreed, and they met at 36 past 9.\n" * 40,
        "1 + 2 = 3\n4 + 5 = 9\n" * 40]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=2400, number_copies=3)


@pytest.fixture
def tiny_preset(monkeypatch):
    p = presets.Preset("tiny", "llama", 1, 32, 2, 1, 64, "test model")
    monkeypatch.setitem(presets.PRESETS, "tiny", p)
    return p


def test_numbers_are_single_tokens(tokenizer):
    bare, spaced = number_token_ids(tokenizer)
    assert len(set(bare)) == len(set(spaced)) == 1000
    ids = tokenizer("36 + 62 =").input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 5
    assert tokenizer.decode(ids[1:]) == "36 + 62 ="
    assert tokenizer.encode(" 98", add_special_tokens=False) == [spaced[98]]
    assert len(tokenizer.encode("12345", add_special_tokens=False)) == 2  # digit runs split in threes


def test_addition_split_is_fixed_and_disjoint():
    train, held = addition_split()
    train2, held2 = addition_split()
    assert held == held2 and len(held) == 500 and (36, 62) in held
    assert not set(train) & set(held)
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in held)


def test_text_sources_hold_out_the_end_and_refuse_binary_files(tmp_path):
    """The last 2% of each file (cut at a line break within the last 1% before that, else there) is held out; a
    stray undecodable byte is kept as U+FFFD, a binary file (NUL bytes) or a non-UTF-8 one (over 1% undecodable)
    is refused, not read as garbage text."""
    from replacement.errors import BadInputError

    lines = [f"line {i} of the text" for i in range(500)]
    good = tmp_path / "good.txt"
    good.write_bytes(("\n".join(lines) + "\n").encode() + b"caf\xe9\n")
    (train,), (held,) = read_text_sources([str(good)])
    assert train + held == good.read_bytes().decode("utf-8", errors="replace") and train.endswith("\n")
    assert 0.015 < len(held) / (len(train) + len(held)) < 0.025 and held.endswith("caf\ufffd\n")
    # a file of three long paragraphs, or one long line after a title: 2% still (it held out a whole paragraph,
    # 33% of the file, or everything after the title)
    for name, text in (("paragraphs.txt", "\n".join(" ".join(["word"] * 3000) for _ in range(3))),
                       ("title.txt", "A title\n" + " ".join(["word"] * 20000))):
        (tmp_path / name).write_text(text)
        (train,), (held,) = read_text_sources([str(tmp_path / name)])
        assert train + held == text and 0.015 < len(held) / len(text) < 0.025, (name, len(held) / len(text))
    for name, data, why in (("model.safetensors", b"\x08\x00\x00\x00{}" + bytes(range(256)), "NUL bytes"),
                            ("latin1.txt", "é".encode("latin-1") * 50 + b" text " * 50, "could not be decoded")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadInputError, match=f"is not UTF-8 text .*{why}"):
            read_text_sources([str(tmp_path / name)])


def test_hf_text_sources_fail_in_one_line(monkeypatch):
    """--text hf:NAME without the optional `datasets` package, or with it but no network (or no such dataset):
    one line naming the source and what to do, not a traceback."""
    import sys
    import types

    from replacement.errors import BadInputError

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(BadInputError, match=r"--text hf:wikitext needs the optional `datasets` package: pip install"):
        read_text_sources(["hf:wikitext"])

    def offline(name, split, streaming):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(BadInputError) as e:
        read_text_sources(["hf:wikitext:test"])
    assert str(e.value) == "cannot read --text hf:wikitext:test: Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)"


def test_batches_are_deterministic_and_hold_no_heldout_pair(tokenizer):
    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 3, add_special_tokens=False), dtype=torch.int32)
    train, held = addition_split()
    maker = BatchMaker(tokenizer, tokens, train, Mixture(0.2, 0.5, 0.3), 48, seed=3)
    b1, b2 = maker.batch(7, 16), maker.batch(7, 16)
    assert torch.equal(b1, b2) and not torch.equal(b1, maker.batch(8, 16))
    assert (b1[:, 0] == tokenizer.bos_token_id).all()
    held = set(held)
    n_eq = 0
    for step in range(5):
        for row in maker.batch(step, 16):
            text = tokenizer.decode(row[1:])
            for line in text.split("\n")[:-1]:
                parts = line.split()
                if len(parts) == 5 and parts[1] == "+" and parts[3] == "=":
                    a, b, c = int(parts[0]), int(parts[2]), int(parts[4])
                    assert a + b == c and (a, b) not in held
                    n_eq += 1
    assert n_eq > 50


def test_prepare_data_keeps_a_tokenizer_already_in_the_work_folder(tokenizer, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT[0] * 5)
    tokenizer.save_pretrained(str(tmp_path / "work" / "tokenizer"))  # e.g. the bundled models' tokenizer
    tok, train, val = prepare_data(tmp_path / "work", [str(src)])  # would train a 6,144-token one otherwise
    assert len(tok) == len(tokenizer) and tok.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(train, tokenize_texts(tokenizer, read_text_sources([str(src)])[0]))  # tokenised with it
    tok2, train2, _ = prepare_data(tmp_path / "work", [str(src)])  # the second call reuses the tokenised corpus
    assert torch.equal(train, train2) and tok2.get_vocab() == tok.get_vocab()


def _copy_offsets(row: list[int]) -> tuple[float, list[int]]:
    """Over the tokens seen before: the share whose next token is the one after their earlier occurrence
    (induction's guess), and for those, the distance back to that occurrence."""
    last, n_seen, offsets = {}, 0, []
    for t, x in enumerate(row[:-1]):
        if x in last:
            n_seen += 1
            if row[t + 1] == row[last[x] + 1]:
                offsets.append(t - last[x])
        last[x] = t
    return len(offsets) / max(n_seen, 1), offsets


def test_repeat_gap_varies_the_offset_between_copies(tokenizer):
    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 3, add_special_tokens=False), dtype=torch.int32)
    train, _ = addition_split()
    for gap in (0, 12):
        rows = BatchMaker(tokenizer, tokens, train, Mixture(0.0, 0.0, 1.0, repeat_gap=gap), 128, seed=1).batch(0, 32)
        assert rows.shape == (32, 128) and (rows[:, 0] == tokenizer.bos_token_id).all()
        offsets = []
        for row in rows.tolist():
            right, found = _copy_offsets(row[1:])
            assert right > 0.75  # copies follow their span: induction predicts most repeated tokens
            offsets += found
        # contiguous copies sit one span (3-30 tokens) apart; a gap of 0-12 random tokens before a copy adds to it
        assert min(offsets) >= 3 and max(offsets) <= 30 + gap
        assert (max(offsets) > 30) == bool(gap)


def _cfg(**kw):
    base = dict(preset="tiny", steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup=2, checkpoint_every=5, seed=0)
    base.update(kw)
    return LMTrainConfig(**base)


def test_training_reduces_loss_and_resume_is_exact(tokenizer, tiny_preset, tmp_path):
    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 5, add_special_tokens=False), dtype=torch.int32)
    cfg = _cfg()
    full, _ = train_lm(cfg, tmp_path / "a", tokenizer, tokens, progress=False)
    # interrupted after 10 steps (as a kill between checkpoints would leave it), then resumed
    train_lm(cfg, tmp_path / "b", tokenizer, tokens, progress=False, stop_after=10)
    resumed, info = train_lm(cfg, tmp_path / "b", tokenizer, tokens, progress=False)
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    assert info["steps"] == 20
    # the loss went down
    from replacement.lm.recipe import build_model, lm_loss

    maker = BatchMaker(tokenizer, tokens, addition_split()[0], cfg.mixture, cfg.seq_len, 99)
    batch = maker.batch(0, 16)
    with torch.no_grad():
        start = lm_loss(build_model(tiny_preset, tokenizer, 0), batch).item()
        end = lm_loss(full, batch).item()
    assert end < start - 0.5, (start, end)
    # the state file reloads with its step and config
    tensors, meta = ckpt.load(tmp_path / "a" / "tiny" / "state.safetensors")
    assert meta["step"] == 20 and meta["config"]["preset"] == "tiny"
    assert any(k.startswith("opt.") for k in tensors)


@pytest.mark.parametrize("stop, says", [(7, "the state of step 5 of 20 is saved in"), (2, "no state saved yet")])
def test_an_interrupted_train_lm_says_what_is_saved(tokenizer, tiny_preset, tmp_path, monkeypatch, capsys, stop, says):
    """Ctrl-C (or SIGTERM) ends `train-lm` with where its last state is, as `train` does; a rerun says it resumes."""
    import replacement.lm.recipe as recipe

    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 5, add_special_tokens=False), dtype=torch.int32)
    real, calls = recipe.lm_loss, []

    def loss(model, ids):
        calls.append(1)
        if len(calls) == stop + 1:  # the call of step `stop`
            raise KeyboardInterrupt
        return real(model, ids)

    monkeypatch.setattr(recipe, "lm_loss", loss)
    with pytest.raises(ckpt.Interrupted, match=says):
        train_lm(_cfg(), tmp_path, tokenizer, tokens, progress=False)
    monkeypatch.setattr(recipe, "lm_loss", real)
    _, info = train_lm(_cfg(), tmp_path, tokenizer, tokens, progress=True)
    resumed = "resuming " in capsys.readouterr().err
    assert info["steps"] == 20 and resumed == (stop == 7)


def test_an_interrupted_train_lm_saves_the_step_and_resumes_exactly(tokenizer, tiny_preset, tmp_path, monkeypatch):
    """Ctrl-C in step 7 lets it finish, saves step 8 (checkpoints every 5) and stops; the rerun ends with the
    weights of an uninterrupted run."""
    import signal

    import replacement.lm.recipe as recipe

    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 5, add_special_tokens=False), dtype=torch.int32)
    full, _ = train_lm(_cfg(), tmp_path / "a", tokenizer, tokens, progress=False)
    real, calls = recipe.lm_loss, []

    def loss(model, ids):
        calls.append(1)
        if len(calls) == 8:  # the call of step 7
            signal.raise_signal(signal.SIGINT)
        return real(model, ids)

    monkeypatch.setattr(recipe, "lm_loss", loss)
    with pytest.raises(ckpt.Interrupted, match="the state of step 8 of 20 is saved"):
        train_lm(_cfg(), tmp_path / "b", tokenizer, tokens, progress=False)
    monkeypatch.setattr(recipe, "lm_loss", real)
    resumed, info = train_lm(_cfg(), tmp_path / "b", tokenizer, tokens, progress=False)
    assert info["steps"] == 20
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_nan_stops_and_keeps_last_good_checkpoint(tokenizer, tiny_preset, tmp_path):
    tokens = torch.tensor(tokenizer.encode(TEXT[1] * 5, add_special_tokens=False), dtype=torch.int32)
    train_lm(_cfg(), tmp_path, tokenizer, tokens, progress=False, stop_after=5)
    state = tmp_path / "tiny" / "state.safetensors"
    before = state.read_bytes()
    with pytest.raises(TrainingDiverged, match="last good checkpoint kept"):
        train_lm(dataclasses.replace(_cfg(), lr=1e30), tmp_path, tokenizer, tokens, resume=False, progress=False)
    assert state.read_bytes() == before
    tensors, meta = ckpt.load(state)
    assert meta["step"] == 5 and all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_a_state_resumes_only_under_its_own_settings(tokenizer, tiny_preset, tmp_path):
    """Another --lr (or any other setting but the number of steps and how often states are saved) would mix two
    trainings: refused in one line naming it, the state left as it was."""
    tokens = torch.tensor(tokenizer.encode(TEXT[1] * 5, add_special_tokens=False), dtype=torch.int32)
    train_lm(_cfg(), tmp_path, tokenizer, tokens, progress=False, stop_after=5)
    state = tmp_path / "tiny" / "state.safetensors"
    before = state.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match=r"other settings \(lr 0.003 -> 0.001\)"):
        train_lm(dataclasses.replace(_cfg(), lr=1e-3), tmp_path, tokenizer, tokens, progress=False)
    assert state.read_bytes() == before
    _, info = train_lm(_cfg(checkpoint_every=3), tmp_path, tokenizer, tokens, progress=False)
    assert info["steps"] == 20


def test_a_state_holding_nan_is_refused_as_corrupt(tokenizer, tiny_preset, tmp_path):
    tokens = torch.tensor(tokenizer.encode(TEXT[1] * 5, add_special_tokens=False), dtype=torch.int32)
    train_lm(_cfg(), tmp_path, tokenizer, tokens, progress=False, stop_after=5)
    state = tmp_path / "tiny" / "state.safetensors"
    tensors, meta = ckpt.load(state)
    key = next(k for k in tensors if k.startswith("model.") and tensors[k].ndim == 2)
    tensors[key][0, 0] = float("nan")
    ckpt.atomic_save(tensors, state, meta)
    before = state.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="holds NaN or infinite values"):
        train_lm(_cfg(), tmp_path, tokenizer, tokens, progress=False)
    assert state.read_bytes() == before


def test_export_bundle_loads_with_from_pretrained(tokenizer, tiny_preset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replacement.lm.recipe import build_model, export_bundle

    model = build_model(tiny_preset, tokenizer)
    out = export_bundle(model, tokenizer, tiny_preset, {"steps": 0}, out=tmp_path / "tiny")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert tok("36 + 62 =").input_ids == tokenizer("36 + 62 =").input_ids
    assert (out / "addition_heldout.json").is_file()
    # the flat rotary keys transformers 4.x reads (it ignores rope_parameters), equal to those 5.x reads
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == tiny_preset.rope_theta
    assert loaded.config.rope_parameters["rope_theta"] == tiny_preset.rope_theta
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    f = tmp_path / "x.safetensors"
    ckpt.atomic_save({"a": torch.ones(3)}, f, {"k": 1})
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(f)


def test_later_stage_starts_from_the_exported_earlier_stage(tokenizer, tiny_preset, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from replacement.lm import recipe

    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 5, add_special_tokens=False), dtype=torch.int32)
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    ckpt.atomic_save({"train": tokens, "val": tokens[:200].clone()}, tmp_path / "tokens.safetensors", {})
    monkeypatch.setitem(recipe.RECIPE_STEPS, "tiny", 10)
    monkeypatch.setitem(recipe.RECIPE_MIXTURE, "tiny", Mixture(0.5, 0.25, 0.25))
    # lr 0: the second stage must end exactly where the first one's bf16 export starts it
    monkeypatch.setitem(recipe.RECIPE_LATER_STAGES, "tiny", [dict(stage="ft", steps=4, lr=0.0, seed=5, batch_size=4,
                                                                 seq_len=32)])
    monkeypatch.setattr(recipe, "LMTrainConfig", lambda **kw: _cfg(**{**dict(batch_size=8, seq_len=32), **kw}))
    recipe.run_recipe(["tiny"], tmp_path, compile=False)
    first = load_file(tmp_path / "tiny" / "hf" / "model.safetensors")
    assert json.loads((tmp_path / "tiny" / "hf" / "training_info.json").read_text())["steps"] == 10
    tensors, meta = ckpt.load(tmp_path / "tiny-ft" / "state.safetensors")
    assert meta["step"] == 4 and meta["config"]["init_from"] == str(tmp_path / "tiny" / "hf")
    assert first["model.embed_tokens.weight"].dtype == torch.bfloat16
    for k, v in first.items():
        torch.testing.assert_close(tensors[f"model.{k}"], v.float(), atol=0, rtol=0, msg=k)
    # a finished stage is not run again
    mtime = (tmp_path / "tiny" / "hf" / "model.safetensors").stat().st_mtime_ns
    recipe.run_recipe(["tiny"], tmp_path, compile=False)
    assert (tmp_path / "tiny" / "hf" / "model.safetensors").stat().st_mtime_ns == mtime
    # a longer first stage trains on (resuming its own state), and the second stage then starts afresh from it
    monkeypatch.setitem(recipe.RECIPE_STEPS, "tiny", 12)
    recipe.run_recipe(["tiny"], tmp_path, compile=False)
    first = load_file(tmp_path / "tiny" / "hf" / "model.safetensors")
    assert json.loads((tmp_path / "tiny" / "hf" / "training_info.json").read_text())["steps"] == 12
    tensors, meta = ckpt.load(tmp_path / "tiny-ft" / "state.safetensors")
    assert meta["step"] == 4
    for k, v in first.items():
        torch.testing.assert_close(tensors[f"model.{k}"], v.float(), atol=0, rtol=0, msg=k)


def test_train_lm_writes_the_package_only_when_asked(tokenizer, tiny_preset, tmp_path, monkeypatch):
    """The last stage's model is saved in the work folder; the bundled one is replaced only with install=True,
    by a copy of that folder (its replacements kept), without training again."""
    from replacement import bundle
    from replacement.lm import recipe

    monkeypatch.setattr(bundle, "BUNDLE_DIR", tmp_path / "package")
    shipped = tmp_path / "package" / "tiny"
    (shipped / "replacements").mkdir(parents=True)
    (shipped / "replacements" / "kept.txt").write_text("trained for the old model")
    (shipped / "config.json").write_text("{}")
    tokens = torch.tensor(tokenizer.encode(TEXT[0] * 5, add_special_tokens=False), dtype=torch.int32)
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    ckpt.atomic_save({"train": tokens, "val": tokens[:200].clone()}, tmp_path / "tokens.safetensors", {})
    monkeypatch.setitem(recipe.RECIPE_STEPS, "tiny", 3)
    monkeypatch.setitem(recipe.RECIPE_MIXTURE, "tiny", Mixture(0.5, 0.25, 0.25))
    monkeypatch.setitem(recipe.RECIPE_LATER_STAGES, "tiny", [dict(stage="ft", steps=2, lr=1e-3, seed=5, batch_size=4,
                                                                 seq_len=32)])
    monkeypatch.setattr(recipe, "LMTrainConfig", lambda **kw: _cfg(**{**dict(batch_size=8, seq_len=32), **kw}))
    (out,) = recipe.run_recipe(["tiny"], tmp_path, compile=False)
    assert out == tmp_path / "tiny-ft" / "hf"
    assert json.loads((out / "training_info.json").read_text())["config"]["stage"] == "ft"
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "replacements"]
    assert (shipped / "config.json").read_text() == "{}"
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    (installed,) = recipe.run_recipe(["tiny"], tmp_path, compile=False, install=True)
    assert installed == shipped and (out / "model.safetensors").stat().st_mtime_ns == mtime  # not trained again
    for f in out.iterdir():
        assert (shipped / f.name).read_bytes() == f.read_bytes(), f.name
    assert (shipped / "replacements" / "kept.txt").read_text() == "trained for the old model"


def _occurs_at(row: list[int], piece: list[int]) -> list[int]:
    return [i for i in range(len(row) - len(piece) + 1) if row[i : i + len(piece)] == piece]


def test_natural_rows_hold_later_copies_of_their_own_text(tokenizer):
    """Each natural row is corpus text with one or two of its passages copied again later: remove the copies
    and what is left is one contiguous window of the corpus."""
    tokens = torch.tensor(tokenizer.encode(" ".join(TEXT) * 20, add_special_tokens=False), dtype=torch.int32)
    train, _ = addition_split()
    maker = BatchMaker(tokenizer, tokens, train, Mixture(0.0, 0.0, 0.0, natural=1.0), 64, seed=2)
    rows = maker.batch(0, 24)
    assert rows.shape == (24, 64) and (rows[:, 0] == tokenizer.bos_token_id).all()
    corpus = tokens.tolist()
    n_far = 0
    for row in rows.tolist():
        body = row[1:]
        # the row's first tokens are corpus text, and its last repeated passage recurs somewhere before it
        assert _occurs_at(corpus, body[:3])
        right, offsets = _copy_offsets(body)
        assert offsets, "no passage of the row recurs in it"
        n_far += max(offsets) > 20
    assert n_far > 0  # some copies come far after their first occurrence
    # mixtures without the natural kind draw exactly the rows they drew before it existed
    old = BatchMaker(tokenizer, tokens, train, Mixture(0.4, 0.3, 0.3), 64, seed=2).batch(3, 8)
    same = BatchMaker(tokenizer, tokens, train, Mixture(0.4, 0.3, 0.3, natural=0.0), 64, seed=2).batch(3, 8)
    assert torch.equal(old, same)
    assert Mixture(0.4, 0.3, 0.3).weights() == [0.4, 0.3, 0.3]


def test_natural_rows_short_share_sets_how_many_copies_are_names(tokenizer):
    """Mixture.short: on a corpus of distinct tokens every repeated token is a copied one.  With short=1 each of
    a row's one or two copies is a 1-4 token name or phrase (at most 8 repeated tokens); with short=0 they are
    passages of 5-40 tokens (cut only by the row's end)."""
    tokens = torch.arange(tokenizer.bos_token_id + 1, tokenizer.bos_token_id + 4001, dtype=torch.int32)
    train, _ = addition_split()

    def repeated(short):
        maker = BatchMaker(tokenizer, tokens, train, Mixture(0.0, 0.0, 0.0, natural=1.0, short=short), 128, seed=3)
        return [sum(t in row[1:i + 1] for i, t in enumerate(row[2:], 1)) for row in maker.batch(0, 64).tolist()]

    short, long = repeated(1.0), repeated(0.0)
    assert all(1 <= n <= 8 for n in short)
    assert sum(long) / len(long) > 12 and sum(n > 8 for n in long) > 32
    assert Mixture().short == 0.3  # the recipes' rows before the knob existed


def test_natural_copy_cases_repeat_their_passage(tokenizer):
    from replacement.evaluate import NATURAL_KINDS, natural_copy_cases

    text = ("The cat sat on the mat and the dog sat on the log. It was good, and then Alice met Bob at the mat. "
            "The dog and the cat sat on the log as it was 1985. They met at the mat, and Bob said it was good. ") * 8
    cases = natural_copy_cases(tokenizer, [text], n_per_kind=5, context=128)
    kinds = {c.kind for c in cases}
    assert kinds <= set(NATURAL_KINDS) and {"sentence", "name"} <= kinds
    for c in cases:
        first = c.ids[c.first + c.offset : c.first + c.offset + c.length]
        second = c.ids[c.second : c.second + c.length]
        assert first == second and c.length >= 2 and len(c.ids) <= 128 and c.ids[0] == tokenizer.bos_token_id
        assert c.second > c.first + c.offset + c.length - 1  # the copy comes after the first occurrence
        if c.kind == "partial":
            assert c.offset > 0
        if c.kind == "name":
            assert tokenizer.decode(second).strip()[0].isupper()


def test_a_showcase_prompt_is_cut_after_a_token_that_occurs_once_before():
    from replacement.evaluate import CopyCase, unambiguous_cut

    # BOS, the passage [5 6 7 6 8 9 6 4] (6 recurs), a gap [3 2], the passage again: its middle (j = 4) would end on
    # the second 6, which also occurs at 2 other places; j = 3 (7) and j = 5 (8) occur once: a tie, the shorter wins
    s = [5, 6, 7, 6, 8, 9, 6, 4]
    c = CopyCase("sentence", [0] + s + [3, 2] + s, first=1, second=11, length=8)
    j = unambiguous_cut(c)
    assert j == 3
    prompt = c.ids[: c.second + j]
    assert prompt.count(prompt[-1]) == 2  # once in the first copy, once as the current token
    # a middle that is already unique stays
    s2 = [5, 6, 7, 8, 9, 4]
    assert unambiguous_cut(CopyCase("sentence", [0] + s2 + [3] + s2, first=1, second=8, length=6)) == 3
    # nothing qualifies (every token recurs in the gap): the middle
    s3 = [5, 6, 7, 8]
    assert unambiguous_cut(CopyCase("sentence", [0] + s3 + s3 + s3, first=1, second=9, length=4)) == 2


def test_shipped_sample_is_the_held_out_part(tmp_path, monkeypatch):
    from replacement import corpus
    from replacement.errors import BadInputError

    files = []
    for i, name in enumerate(corpus.CORPUS_FILES):
        f = tmp_path / name
        f.write_text("".join(f"line {j} of file {i}\n" for j in range(300)))
        files.append(str(f))
    out = corpus.write_heldout_sample(files, tmp_path / "sample.json.xz")
    monkeypatch.setattr(corpus, "HELDOUT_SAMPLE", out)
    corpus._shipped_heldout.cache_clear()
    try:
        assert corpus.heldout_texts() == read_text_sources(files)[1]
    finally:
        corpus._shipped_heldout.cache_clear()
    assert corpus.heldout_texts(files[:1]) == read_text_sources(files[:1])[1]
    assert corpus.training_files(tmp_path) == files
    (tmp_path / "austen.txt").unlink()
    with pytest.raises(BadInputError, match="austen.txt"):
        corpus.training_files(tmp_path)
    monkeypatch.setattr(corpus, "HELDOUT_SAMPLE", tmp_path / "missing.json.xz")
    with pytest.raises(BadInputError, match="missing"):
        corpus.heldout_texts()


def test_the_package_ships_its_held_out_sample():
    from replacement.corpus import CORPUS_FILES, heldout_texts

    texts = heldout_texts()
    assert len(texts) == len(CORPUS_FILES) and all(len(t) > 20_000 for t in texts)


@pytest.mark.parametrize("name", ["toy", "pythia", "llama"])
def test_bundled_weights_record_the_recipe_stages(name):
    """Each bundled model's training_info lists the stages it went through; they must be the recipe's, so that
    `circuits train-lm` reproduces what is bundled (the first stage's name and the start folders aside)."""
    from pathlib import Path

    from replacement.lm.recipe import recipe_stages

    info = json.loads((Path(presets.PRESETS[name].folder) / "training_info.json").read_text())
    ran = [s["config"] for s in info.get("earlier_stages", [])] + [info["config"]]
    planned = [dataclasses.asdict(c) for c in recipe_stages(name)]
    assert len(ran) == len(planned)
    for k, (r, p) in enumerate(zip(ran, planned)):
        if k:
            assert r["stage"] == p["stage"]
        for key in ("steps", "batch_size", "seq_len", "lr", "warmup", "decay_frac", "weight_decay", "seed"):
            assert r[key] == p[key], (p["stage"], key)
        assert Mixture(**r["mixture"]) == Mixture(**p["mixture"]), p["stage"]
