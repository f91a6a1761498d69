"""The BOS policy: ``bos="zero"`` (circuit-tracer's convention) makes no Lorsa-head, feature or error node at
position 0 and folds what they write into the targets' constants; the tokenizer rule for models without BOS."""
from __future__ import annotations


import pytest
import torch

from graphs.attribution import attribute, reconstruction_errors
from replacement.models import ModelAdapter
from tests.conftest import qk_entries_with_real_scores, random_replacements, tiny_llama, tiny_neox


def _edges(graph) -> dict:
    E = graph.edge_arrays
    ids = [n.id for n in graph.node_list]
    return {(ids[s], ids[t]): float(w) for s, t, w in zip(E.src.tolist(), E.tgt.tolist(), E.w.tolist())}


@pytest.mark.parametrize("skip", [False, True], ids=["", "skip"])
@pytest.mark.parametrize("attention", ["lorsa", "frozen"])
@pytest.mark.parametrize("make", [lambda: tiny_llama(attention_bias=True), tiny_neox], ids=["llama", "neox"])
def test_bos_zero_folds_position_0_into_constants_exactly(make, attention, skip):
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter, attention=attention, skip=skip)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    keep, zero = attribute(model, ids, qk=False), attribute(model, ids, qk=False, bos="zero")
    at0 = [n for n in zero.node_list if n.pos == 0]
    assert [n.type for n in at0] == ["embedding"]
    assert any(n.pos == 0 and n.type == "transcoder" for n in keep.node_list)
    assert max(reconstruction_errors(zero).values()) <= 1e-4
    # every edge between the nodes both graphs have is the same; the removed nodes' edges became constants
    ek, ez = _edges(keep), _edges(zero)
    assert set(ez) == {e for e in ek if e[0] in {n.id for n in zero.node_list} and e[1] in {n.id for n in zero.node_list}}
    for e, w in ez.items():
        assert w == pytest.approx(ek[e], rel=1e-5, abs=1e-6)
    gone = {n.id for n in keep.node_list} - {n.id for n in zero.node_list}
    kept_const = {n.id: n.const for n in keep.node_list}
    for n in zero.node_list:
        if n.type in ("transcoder", "lorsa", "logit"):
            folded = sum(w for (s, t), w in ek.items() if t == n.id and s in gone)
            assert n.const == pytest.approx(kept_const[n.id] + folded, rel=1e-4, abs=1e-5)


def test_bos_zero_keeps_qk_tables_exact():
    adapter = ModelAdapter(tiny_llama(attention_bias=True), name="m")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(7))
    graph = attribute(model, ids, bos="zero", qk_top_keys=2)
    checked = 0
    for _, e, real in qk_entries_with_real_scores(model, graph, ids):
        parts = e.pairs_total + e.query_bias_x_keys + e.queries_x_key_bias + e.bias_x_bias
        assert parts == pytest.approx(real, rel=1e-4, abs=1e-4)
        checked += 1
    assert checked > 10


def test_unknown_bos_policy_is_refused():
    from replacement.errors import BadInputError

    adapter = ModelAdapter(tiny_llama(), name="m")
    with pytest.raises(BadInputError, match="bos must be"):
        attribute(random_replacements(adapter), torch.tensor([[1, 2, 3]]), bos="drop")


def _tokenizer(**special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<other>": 2, "the": 3, "cat": 4, "[UNK]": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


@pytest.mark.parametrize("special,first", [
    ({"bos_token": "<other>", "eos_token": "<eos>"}, 2),          # a BOS: it
    ({"pad_token": "<eos>", "eos_token": "<pad>"}, 1),            # none: pad (here id 1)
    ({"pad_token": "<pad>", "eos_token": "<eos>"}, 1),            # pad is id 0, which circuit-tracer skips: eos
    ({"eos_token": "<other>"}, 2),                                # no pad: eos
])
def test_prompts_start_as_circuit_tracer_starts_them(special, first):
    from replacement.models import encode_prompt

    ids = encode_prompt(_tokenizer(**special), "the cat", 64)[0].tolist()
    assert ids == [first, 3, 4]


def test_without_bos_pad_or_eos_the_first_other_special_token_leads():
    from replacement.models import encode_prompt

    assert encode_prompt(_tokenizer(), "the cat", 64)[0].tolist() == [5, 3, 4]  # [UNK], as circuit-tracer does
