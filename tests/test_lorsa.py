"""Lorsa against closed forms: one QK group equals a real attention head; top-K; z pattern; memory."""
from __future__ import annotations

import pytest
import torch

from replacement.lorsa import Lorsa, LorsaConfig, lorsa_for_model, one_head_lorsa
from replacement.models import ModelAdapter
from tests.conftest import tiny_llama, tiny_neox


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox, lambda: tiny_llama(attention_bias=True)],
                         ids=["llama_gqa", "neox_partial_rotary", "llama_bias"])
@pytest.mark.parametrize("head", [0, 3])
def test_one_group_lorsa_equals_a_real_head(make, head, ids):
    """Copy head h's W_Q/W_K and its OV circuit as 2*d_head sign-paired rank-1 heads: with K = H the
    Lorsa output equals that head's output (pattern @ V @ W_O for head h), rotary included."""
    adapter = ModelAdapter(make())
    layer = 1
    with torch.no_grad():
        cache = adapter.run(ids, capture=True).cache
        x = cache[f"blocks.{layer}.attn.in"]
        z = cache[f"blocks.{layer}.attn.z"][:, :, head]  # [B, n, dh], independent: from the model's run
        Wo, _ = adapter.W_O(layer)
        expected = z @ Wo[head]
        lorsa = one_head_lorsa(adapter, layer, head)
        y, code = lorsa(x)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        # and its single pattern is the head's pattern
        torch.testing.assert_close(lorsa.patterns(x)[:, 0], cache[f"blocks.{layer}.attn.pattern"][:, head],
                                   atol=1e-6, rtol=0)


def _random_lorsa(rotary_dim=4, **kw):
    base = dict(d_model=16, n_qk=3, d_qk=8, heads_per_group=5, top_k=4, rotary_dim=rotary_dim)
    base.update(kw)
    torch.manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)) if rotary_dim else None
    lorsa = Lorsa(LorsaConfig(**base), inv_freq=inv)
    with torch.no_grad():
        for p in (lorsa.b_Q, lorsa.b_K, lorsa.b_V, lorsa.b_O):
            p.normal_(0, 0.3)
    return lorsa


def test_topk_keeps_exactly_k_heads_per_token():
    lorsa = _random_lorsa()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        code = lorsa.encode(x)
        z = lorsa.head_activations(x)
    assert code.indices.shape == (2, 9, 4)
    dense = code.dense(lorsa.cfg.n_heads)
    assert ((dense != 0).sum(-1) <= 4).all()
    # the kept heads are the K largest of ReLU(z * ||w_o||), brute force
    score = torch.relu(z * lorsa.W_O.norm(dim=-1))
    for b in range(2):
        for t in range(9):
            top = set(score[b, t].topk(4).indices.tolist())
            assert set(code.indices[b, t].tolist()) == top
            torch.testing.assert_close(dense[b, t, code.indices[b, t]], torch.relu(z[b, t, code.indices[b, t]]))


def test_forward_equals_brute_force_per_head_attention():
    """The grouped fused path equals an explicit per-head loop over H x n x n (built only here)."""
    lorsa = _random_lorsa()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        z = lorsa.head_activations(x)
        q, k = lorsa.qk(x)
        n = x.shape[1]
        for h in range(lorsa.cfg.n_heads):
            g = h // lorsa.cfg.heads_per_group
            scores = q[:, g] @ k[:, g].transpose(-1, -2) / lorsa.cfg.d_qk ** 0.5
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            v = x @ lorsa.W_V[h] + lorsa.b_V[h]
            torch.testing.assert_close(z[..., h], (scores.softmax(-1) @ v[..., None])[..., 0], atol=1e-5, rtol=1e-5)
        y, code = lorsa(x)
        dense = code.dense(lorsa.cfg.n_heads)
        torch.testing.assert_close(y, dense @ lorsa.W_O + lorsa.b_O, atol=1e-5, rtol=1e-5)


def test_z_pattern_sums_to_z():
    lorsa = _random_lorsa()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        z = lorsa.head_activations(x)
        for head, t in [(0, 7), (7, 3), (14, 0)]:
            zp = lorsa.z_pattern(x, head, t)
            assert zp.shape == (1, 8) and (zp[:, t + 1:] == 0).all()
            torch.testing.assert_close(zp.sum(-1), z[:, t, head], atol=1e-5, rtol=1e-5)


def test_z_patterns_take_each_heads_own_qk_group():
    """`z_patterns` for every head at every query position, one call, against a brute force per head: its QK
    group's causal softmax(q_t . k_s / sqrt(d_qk)) row times the head's values w_v . x_s + b_v.  Every head of
    every group (h // heads_per_group differs from h % n_qk for most of them: a group index taken the wrong way
    passed heads 0, 7 and 14)."""
    lorsa = _random_lorsa()
    x = torch.randn(8, 16)
    H, n = lorsa.cfg.n_heads, x.shape[0]
    heads, queries = torch.arange(H).repeat_interleave(n), torch.arange(n).repeat(H)
    with torch.no_grad():
        got = lorsa.z_patterns(x, heads, queries)  # [H n, n]
        q, k = lorsa.qk(x[None])
        for h in range(H):
            g = h // lorsa.cfg.heads_per_group
            scores = q[0, g] @ k[0, g].t() / lorsa.cfg.d_qk ** 0.5
            A = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")).softmax(-1)  # [t, s]
            v = x @ lorsa.W_V[h] + lorsa.b_V[h]  # [s]
            torch.testing.assert_close(got[h * n : (h + 1) * n], A * v[None], atol=1e-5, rtol=1e-5, msg=f"head {h}")


def test_rotary_matches_the_model():
    adapter = ModelAdapter(tiny_neox())
    lorsa = lorsa_for_model(adapter, 0, LorsaConfig.default_for(adapter, 0, heads_per_group=2, top_k=2))
    cos, sin = lorsa.rotary(10)
    mc, ms = adapter.rotary(10)
    torch.testing.assert_close(cos, mc)
    torch.testing.assert_close(sin, ms)


def test_weak_config_needs_explicit_permission():
    adapter = ModelAdapter(tiny_llama())
    weak = LorsaConfig.default_for(adapter, 0, qk_per_head=1, heads_per_group=2, top_k=2)
    weak.n_qk = 2  # fewer QK groups than the model's 4 heads
    with pytest.raises(ValueError, match="allow-weak-config"):
        lorsa_for_model(adapter, 0, weak, allow_weak=False)
    with pytest.warns(UserWarning, match="n_qk=2"):
        lorsa_for_model(adapter, 0, weak, allow_weak=True)
    ok = LorsaConfig.default_for(adapter, 0)
    assert ok.n_qk == 8 * adapter.n_heads and ok.d_qk == adapter.d_head and ok.top_k == 64
    assert ok.weak_reasons() == []


def test_init_from_model_repeats_each_head():
    adapter = ModelAdapter(tiny_llama())
    cfg = LorsaConfig.default_for(adapter, 1, qk_per_head=2, heads_per_group=2, top_k=2)
    lorsa = lorsa_for_model(adapter, 1, cfg)
    lorsa.init_qk_from_model(adapter, 1, noise=0.0)
    Wq, _ = adapter.W_Q(1)
    for g in range(cfg.n_qk):
        torch.testing.assert_close(lorsa.W_Q.data[g], Wq[g // 2])
