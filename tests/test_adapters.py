"""Adapters beyond Llama and GPT-NeoX (Qwen2: attention biases; Qwen3: per-head QK-norm; Gemma-2: sandwich norms,
(1 + w) norm weights, attention and logit soft-capping, GeGLU, sliding windows), each against the HF forward pass
on a random small config, with Lorsa's closed form and the graph's reconstruction."""
from __future__ import annotations

import pytest
import torch

from graphs.attribution import attribute, reconstruction_errors
from replacement.models import ModelAdapter
from tests.conftest import random_replacements

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _randomise(model):
    """Random norm weights and biases, so that every term (QK-norm scales, biases) is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return _randomise(Qwen2ForCausalLM(Qwen2Config(**SMALL)))  # q/k/v biases


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return _randomise(Qwen3ForCausalLM(Qwen3Config(head_dim=16, attention_bias=True, **SMALL)))  # QK-norm


def tiny_gemma2(**overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = dict(SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=5, final_logit_softcapping=0.5,
              attn_logit_softcapping=2.0)  # caps small enough to bend this model's logits and scores
    kw.update(overrides)
    torch.manual_seed(0)
    return _randomise(Gemma2ForCausalLM(Gemma2Config(**kw)))


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return _randomise(MistralForCausalLM(MistralConfig(sliding_window=4, **SMALL)))  # a window shorter than `ids`


MODELS = {"qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "gemma2": tiny_gemma2, "mistral": tiny_mistral}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_adapter_equals_the_hf_forward_pass(arch, ids):
    adapter = ModelAdapter(MODELS[arch]())
    with torch.no_grad():
        theirs = adapter.hf_logits(ids)
        torch.testing.assert_close(adapter.run(ids).logits, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.run(ids, capture=True).logits, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_patterns_equal_hf_attentions(arch, ids):
    from tests.test_models import assert_patterns_equal_hf

    assert_patterns_equal_hf(MODELS[arch](), ids)


def test_soft_caps_bend_the_tiny_gemma():
    """The caps of tiny_gemma2 are active: without them the logits differ (so the 1e-5 match above tests them)."""
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        capped = ModelAdapter(tiny_gemma2()).run(ids).logits
        free = ModelAdapter(tiny_gemma2(final_logit_softcapping=None, attn_logit_softcapping=None)).run(ids).logits
    assert (capped - free).abs().max() > 1e-2


@pytest.mark.parametrize("head", [0, 3])
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_one_group_lorsa_equals_a_real_head(arch, head, ids):
    """Qwen2's biased and Gemma-2's Q/K/V heads in Lorsa's closed form (see tests/test_lorsa.py); Gemma-2 without
    attention soft-capping, which no bilinear QK can express, and with a full window on the tested layer."""
    from replacement.lorsa import one_head_lorsa

    model = tiny_qwen2() if arch == "qwen2" else tiny_gemma2(attn_logit_softcapping=None)
    adapter = ModelAdapter(model)
    with torch.no_grad():
        cache = adapter.run(ids, capture=True).cache
        x = cache["blocks.1.attn.in"]
        expected = cache["blocks.1.attn.z"][:, :, head] @ adapter.W_O(1)[0][head]
        lorsa = one_head_lorsa(adapter, 1, head)
        torch.testing.assert_close(lorsa(x)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["lorsa", "frozen"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_graph_reconstructs_every_target(arch, attention):
    adapter = ModelAdapter(MODELS[arch](), name=arch)
    model = random_replacements(adapter, attention=attention)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    rec = model.record(ids)
    torch.testing.assert_close(model.run_with_errors(rec), rec.logits, atol=1e-4, rtol=0)
    errs = reconstruction_errors(attribute(model, ids, qk=attention == "lorsa"))
    assert len(errs) > 20 and max(errs.values()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "neox", *sorted(MODELS)])
def test_a_bfloat16_model_runs_as_hf_does_and_its_capture_as_its_plain_run(arch, ids):
    """In bfloat16 the recorded run (patterns captured) scored in float32 and the plain run used the fused kernel:
    on `36 + 62 =` (llama) trace printed ' 98' at p = 0.960 from one and drew p = 0.955 from the other, and neither
    was HF's own forward (0.25 apart on a logit).  Both now score as HF's eager attention does (the scores in
    bfloat16, the softmax in float32): equal to each other, and to HF's forward exactly (the norms round as HF's do:
    x * rsqrt(variance + eps), LayerNorm rounded once after its weight and bias, NeoX's parallel residual summed in
    HF's order; the NeoX model differed in the third decimal)."""
    from tests.conftest import tiny_llama, tiny_neox

    model = {"llama": tiny_llama, "neox": tiny_neox, **MODELS}[arch]()
    model.config._attn_implementation = "eager"
    adapter = ModelAdapter(model.to(torch.bfloat16))
    with torch.no_grad():
        theirs = adapter.hf_logits(ids).float()
        plain = adapter.run(ids).logits.float()
        captured = adapter.run(ids, capture=True).logits.float()
    assert torch.equal(captured, plain)
    torch.testing.assert_close(plain, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_a_norm_scale_hook_is_read_however_it_changes_the_scale(arch, ids):
    """A hook on a norm's scale is honoured whether it returns a new tensor or changes the one it is given in place
    (the latter was ignored for a while); frozen at its own values the run is unchanged, bit for bit in bfloat16
    (`patch --freeze-norms` compares such runs with the clean one)."""
    from replacement.hooks import hook_name
    from tests.conftest import tiny_llama, tiny_neox

    model = {"llama": tiny_llama, "neox": tiny_neox}[arch]()
    a = ModelAdapter(model)
    name = hook_name(0, "ln1.scale")
    with torch.no_grad():
        clean = a.run(ids).logits
        returned = a.run(ids, hooks={name: lambda t, n: t * 2}).logits
        in_place = a.run(ids, hooks={name: lambda t, n: t.mul_(2)}).logits
    assert not torch.allclose(returned, clean, atol=1e-3) and torch.equal(in_place, returned)
    model.config._attn_implementation = "eager"
    b = ModelAdapter(model.to(torch.bfloat16))
    with torch.no_grad():
        run = b.run(ids, capture=True)
        frozen = b.run(ids, hooks={n: (lambda t, _, v=v: v) for n, v in run.cache.items() if n.endswith(".scale")})
    assert torch.equal(frozen.logits, run.logits)
