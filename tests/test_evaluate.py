"""The induction prompts and metrics of replacement/evaluate.py, on the bundled toy model."""
from __future__ import annotations

import math

import pytest
import torch

from replacement.data import random_token_pool
from replacement.evaluate import induction_losses, repeated_span_prompt
from replacement.models import load_model


def test_repeated_span_prompt():
    adapter = load_model("toy")
    tok = adapter.tokenizer
    ids, answer = repeated_span_prompt(adapter, span=5, seed=3, prefix=4)
    row = ids[0].tolist()
    assert len(row) == 1 + 4 + 5 + 4 and row[0] == tok.bos_token_id
    r = row[5:10]
    assert row[10:] == r[:-1] and answer == r[-1]
    assert not set(tok.all_special_ids) & set(row[1:])
    assert repeated_span_prompt(adapter, 5, 3, 4)[0].tolist() == [row]  # a function of the seed
    assert repeated_span_prompt(adapter, 5, 4, 4)[0].tolist() != [row]
    assert len(random_token_pool(adapter.tokenizer, adapter.vocab_size)) == len(tok) - len(set(tok.all_special_ids))


@pytest.mark.parametrize("gap", [0, 4])
def test_induction_losses_by_hand(gap):
    """The reported copy losses are the mean cross-entropies of tokens 2..span of each copy, and the second copy's
    top-1 rate and mean probability those of the same tokens, recomputed here one prompt and one token at a time
    (with ``gap`` random tokens between the copies)."""
    adapter = load_model("toy")
    span, n_seqs = 6, 3
    out = induction_losses(adapter, span=span, n_seqs=n_seqs, seed=5, gap=gap)
    g = torch.Generator().manual_seed(5)
    pool = random_token_pool(adapter.tokenizer, adapter.vocab_size)
    r = pool[torch.randint(0, len(pool), (n_seqs, span), generator=g)]
    between = pool[torch.randint(0, len(pool), (n_seqs, gap), generator=g)]
    first, second, hits = [], [], []
    for row, mid in zip(r, between):
        ids = torch.cat([torch.tensor([adapter.tokenizer.bos_token_id]), row, mid, row])
        with torch.no_grad():
            logp = adapter.run(ids[None]).logits[0].float().log_softmax(-1)
        for i in range(2, span + 1):  # token i of copy 1 is at position i, of copy 2 at span + gap + i
            j = span + gap + i
            first.append(-float(logp[i - 1, ids[i]]))
            second.append(-float(logp[j - 1, ids[j]]))
            hits.append(int(logp[j - 1].argmax()) == int(ids[j]))
    assert math.isclose(out["first_copy_loss"], sum(first) / len(first), rel_tol=1e-4)
    assert math.isclose(out["second_copy_loss"], sum(second) / len(second), rel_tol=1e-4)
    assert math.isclose(out["second_copy_top1"], sum(hits) / len(hits), rel_tol=1e-6)
    assert math.isclose(out["second_copy_prob"], sum(math.exp(-x) for x in second) / len(second), rel_tol=1e-4)
    assert out["second_copy_loss"] < out["first_copy_loss"]  # the toy does induction


def test_eval_and_heads_read_the_shipped_sample_and_fail_in_one_line_without_it(saved_model, tmp_path, monkeypatch):
    """Without --text, `circuits eval` and `circuits heads` read the held-out sample shipped with the package (no
    ../shared, no random tokens); with no sample at all they stop with one line."""
    import json

    from click.testing import CliRunner

    from cli.main import circuits
    from replacement import corpus
    from replacement.data import tokenize_texts

    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    r = runner.invoke(circuits, ["eval", "--model", str(saved_model), "--json", "--no-samples", "--no-faithfulness"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    adapter = load_model(str(saved_model))
    from replacement.evaluate import text_loss

    assert out["heldout_text_loss"] == text_loss(adapter, tokenize_texts(adapter.tokenizer, corpus.heldout_texts()))
    assert sum(k["n"] for k in out["natural_copying"].values()) > 0
    r = runner.invoke(circuits, ["heads", "--model", str(saved_model), "--layer", "0", "--top", "2", "--n-seqs", "2"])
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(corpus, "HELDOUT_SAMPLE", tmp_path / "missing.json.xz")
    corpus._shipped_heldout.cache_clear()
    try:
        for args in (["eval", "--model", str(saved_model), "--no-samples"],
                     ["heads", "--model", str(saved_model), "--layer", "0", "--rebuild"]):
            r = runner.invoke(circuits, args)
            lines = r.stderr.strip().splitlines()
            assert r.exit_code == 1 and len(lines) == 1 and "held-out text sample" in lines[0], r.output
    finally:
        corpus._shipped_heldout.cache_clear()


def test_eval_rows_start_as_traced_prompts_do(monkeypatch):
    """Every row `circuits eval` runs starts with the token every traced prompt starts with (the tokenizer's BOS),
    not the config's bos_token_id: a config keeping LlamaConfig's default 1 beside a tokenizer whose BOS is 0 had
    its induction rows start with an ordinary token, and nothing said so."""
    from replacement.evaluate import addition_accuracy, text_windows
    from replacement.models import encode_prompt

    adapter = load_model("toy")
    bos = adapter.tokenizer.bos_token_id
    monkeypatch.setattr(adapter.config, "bos_token_id", bos + 7)
    firsts = set()
    run = adapter.run

    def spy(ids, **kw):
        firsts.update(ids[:, 0].tolist())
        return run(ids, **kw)

    monkeypatch.setattr(adapter, "run", spy)
    induction_losses(adapter, span=5, n_seqs=2)
    addition_accuracy(adapter, [(1, 2)])
    firsts.update(text_windows(adapter, torch.arange(10, 60), 16, 2)[:, 0].tolist())
    firsts.add(repeated_span_prompt(adapter, span=3)[0][0, 0].item())
    assert firsts == {int(encode_prompt(adapter.tokenizer, "a b", adapter.context)[0, 0])} == {bos}


def test_copying_with_no_case_in_the_text_measures_nothing(capsys):
    """A text holding no copying case gave '0 cases: top-1 0.0%', read as a measured 0%: its figures are None,
    and eval prints that the text has no case."""
    from cli.main import _print_copying
    from replacement.evaluate import natural_copying

    stats = natural_copying(load_model("toy"), ["a b c"])
    assert stats and all(s["n"] == 0 and s["copy_top1"] is None and s["first_prob"] is None for s in stats.values())
    _print_copying(stats, "")
    out = capsys.readouterr().out
    assert "no case in this text" in out and "0.0%" not in out
