"""ModelAdapter against the real HF forward pass (independent computation)."""
from __future__ import annotations

import pytest
import torch

from replacement.models import ModelAdapter, apply_rotary, freeze_hooks
from tests.conftest import tiny_llama, tiny_neox

ARCH_VARIANTS = {
    "llama_gqa": lambda: tiny_llama(),
    "llama_bias_rope3": lambda: tiny_llama(
        attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "neox_parallel": lambda: tiny_neox(),
    "neox_sequential": lambda: tiny_neox(use_parallel_residual=False, rotary_pct=0.5),
}


@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
def test_adapter_forward_equals_hf(variant, ids):
    adapter = ModelAdapter(ARCH_VARIANTS[variant]())
    with torch.no_grad():
        ours = adapter.run(ids).logits
        theirs = adapter.hf_logits(ids)
        captured = adapter.run(ids, capture=True).logits  # the explicit-pattern path
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(captured, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
def test_block_updates_equal_hf_residual_updates(variant, ids):
    """attn.out + mlp.out = what each HF decoder layer adds to its input (read with HF forward hooks)."""
    adapter = ModelAdapter(ARCH_VARIANTS[variant]())
    seen = {}

    def grab(layer):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            seen[layer] = (x_in.detach(), out.detach())
        return hook

    handles = [blk.register_forward_hook(grab(i), with_kwargs=True) for i, blk in enumerate(adapter.blocks)]
    with torch.no_grad():
        adapter.hf_logits(ids)
        cache = adapter.run(ids, capture=True).cache
    for h in handles:
        h.remove()
    for L in range(adapter.n_layers):
        x_in, x_out = seen[L]
        torch.testing.assert_close(cache[f"blocks.{L}.resid_pre"], x_in, atol=1e-5, rtol=0)
        update = cache[f"blocks.{L}.attn.out"] + cache[f"blocks.{L}.mlp.out"]
        torch.testing.assert_close(update, x_out - x_in, atol=1e-5, rtol=0)
        # the MLP reads the block input (parallel) or the residual after attention (sequential)
        src = cache[f"blocks.{L}.resid_pre"] if adapter.parallel_residual else cache[f"blocks.{L}.resid_mid"]
        torch.testing.assert_close(cache[f"blocks.{L}.mlp.in"], adapter.mlp_norm(L)(src), atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{L}.attn.in"], adapter.attn_norm(L)(x_in), atol=1e-5, rtol=0)


def assert_patterns_equal_hf(model, ids) -> None:
    """Every layer's captured attention pattern equals the HF model's own (eager) attentions."""
    model.config._attn_implementation = "eager"
    adapter = ModelAdapter(model)
    with torch.no_grad():
        hf = model(ids, output_attentions=True).attentions
        cache = adapter.run(ids, capture=True).cache
    for L in range(adapter.n_layers):
        torch.testing.assert_close(cache[f"blocks.{L}.attn.pattern"], hf[L], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["llama_gqa", "neox_parallel"])
def test_patterns_equal_hf_attentions(variant, ids):
    assert_patterns_equal_hf(ARCH_VARIANTS[variant](), ids)


def test_norm_scales_are_the_denominators(adapter, ids):
    with torch.no_grad():
        cache = adapter.run(ids, capture=True).cache
    for L in range(adapter.n_layers):
        x = cache[f"blocks.{L}.resid_pre"]
        if adapter.arch == "gpt_neox":
            expected = (x.var(-1, unbiased=False, keepdim=True) + adapter.attn_norm(L).eps).sqrt()
        else:
            expected = (x.pow(2).mean(-1, keepdim=True) + adapter.attn_norm(L).variance_epsilon).sqrt()
        torch.testing.assert_close(cache[f"blocks.{L}.ln1.scale"], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["llama_gqa", "neox_parallel", "neox_sequential"])
def test_per_head_weights_rebuild_attention(variant, ids):
    """Q (with rotary) and the per-head OV sum, from W_Q/W_K/W_V/W_O, equal the captured values."""
    adapter = ModelAdapter(ARCH_VARIANTS[variant]())
    n = ids.shape[1]
    with torch.no_grad():
        cache = adapter.run(ids, capture=True).cache
        cos, sin = adapter.rotary(n)
        for L in range(adapter.n_layers):
            x = cache[f"blocks.{L}.attn.in"]  # [B, n, d]
            for (W, b), name in ((adapter.W_Q(L), "q"), (adapter.W_K(L), "k")):
                proj = torch.einsum("bnd,hde->bhne", x, W) + (0 if b is None else b[None, :, None])
                torch.testing.assert_close(apply_rotary(proj, cos, sin), cache[f"blocks.{L}.attn.{name}"], atol=1e-5, rtol=0)
            (Wv, bv), (Wo, bo) = adapter.W_V(L), adapter.W_O(L)
            v = torch.einsum("bnd,hde->bhne", x, Wv) + (0 if bv is None else bv[None, :, None])
            z = cache[f"blocks.{L}.attn.pattern"] @ v  # [B, H, n, dh]
            out = torch.einsum("bhne,hed->bnd", z, Wo) + (0 if bo is None else bo)
            torch.testing.assert_close(out, cache[f"blocks.{L}.attn.out"], atol=1e-5, rtol=0)


def test_gqa_head_mapping():
    adapter = ModelAdapter(tiny_llama())
    assert [adapter.kv_head_of(h) for h in range(4)] == [0, 0, 1, 1]
    Wk = adapter.attn_module(0).k_proj.weight.view(2, adapter.d_head, adapter.d_model)
    torch.testing.assert_close(adapter.W_K(0)[0][3], Wk[1].t())


def test_partial_rotary_leaves_tail_untouched():
    adapter = ModelAdapter(tiny_neox())
    assert adapter.rotary_dim == adapter.d_head // 4
    cos, sin = adapter.rotary(5)
    x = torch.randn(1, 5, adapter.d_head)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[..., adapter.rotary_dim:], x[..., adapter.rotary_dim:])
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated
    assert not torch.allclose(y[:, 3, : adapter.rotary_dim], x[:, 3, : adapter.rotary_dim])


def _frozen(adapter, cache, extra=()):
    names = [k for k in cache if k.endswith(".scale") or k.endswith("attn.pattern")]
    return freeze_hooks(cache, list(names) + list(extra))


def test_freezing_norms_and_patterns_keeps_logits_and_linearises(adapter, ids):
    with torch.no_grad():
        clean = adapter.run(ids, capture=True)
        hooks = _frozen(adapter, clean.cache)
        frozen = adapter.run(ids, hooks=hooks).logits
        torch.testing.assert_close(frozen, clean.logits, atol=1e-5, rtol=0)

        # with the MLP outputs frozen too (the replacement model handles them with transcoders + errors),
        # the map embedding -> logits is affine: g(x) = f(x) - f(0) is linear.
        mlp_outs = [f"blocks.{L}.mlp.out" for L in range(adapter.n_layers)]
        hooks = _frozen(adapter, clean.cache, mlp_outs)
        f = lambda e: adapter.run(ids, hooks=hooks, embeds=e).logits  # noqa: E731
        e = clean.cache["embed"]
        a, b = torch.randn_like(e), torch.randn_like(e)
        zero = f(torch.zeros_like(e))
        g = lambda x: f(x) - zero  # noqa: E731
        torch.testing.assert_close(g(a + b), g(a) + g(b), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g(2.5 * a), 2.5 * g(a), atol=1e-4, rtol=1e-4)
        # and without freezing, the same check fails: the test can tell
        g_free = lambda x: adapter.run(ids, embeds=x).logits - adapter.run(ids, embeds=torch.zeros_like(e)).logits  # noqa: E731
        assert not torch.allclose(g_free(a + b), g_free(a) + g_free(b), atol=1e-3)


def test_hooks_replace_values(llama_adapter, ids):
    """Zeroing every attention output through a hook equals deleting attention from the HF model."""
    hooks = {f"blocks.{L}.attn.out": (lambda t, n: torch.zeros_like(t)) for L in range(2)}
    with torch.no_grad():
        ours = llama_adapter.run(ids, hooks=hooks).logits
        for blk in llama_adapter.blocks:
            blk.self_attn.o_proj.weight.zero_()
        theirs = llama_adapter.hf_logits(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pythia_160m_shape_forward():
    """A config of Pythia-160M's exact shape loads and runs 64 tokens on CPU."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048,
                        use_parallel_residual=True)
    torch.manual_seed(0)
    adapter = ModelAdapter(GPTNeoXForCausalLM(cfg).eval())
    ids = torch.randint(0, 50304, (1, 64))
    with torch.no_grad():
        logits = adapter.run(ids).logits
        ref = adapter.hf_logits(ids)
    assert logits.shape == (1, 64, 50304)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
def test_every_name_the_helper_makes_is_hooked_and_captured(variant, ids):
    """Each name of `replacement.hooks` reaches a hook exactly once per run and is captured; resid_mid exists only
    in sequential blocks, the post-norm scales only in Gemma-2's sandwich blocks (tests/test_adapters.py)."""
    from replacement.hooks import BLOCK_POINTS, GLOBAL_POINTS, SANDWICH_ONLY, layer_names

    adapter = ModelAdapter(ARCH_VARIANTS[variant]())
    names = [n for n in [*GLOBAL_POINTS, *layer_names(range(adapter.n_layers), *BLOCK_POINTS)]
             if not (adapter.parallel_residual and n.endswith(".resid_mid"))
             and not (not adapter.gemma and n.split(".", 2)[-1] in SANDWICH_ONLY)]
    calls = {}
    hooks = {n: (lambda t, name: calls.__setitem__(name, calls.get(name, 0) + 1)) for n in names}
    with torch.no_grad():
        run = adapter.run(ids, hooks=hooks, capture=names)
        everything = adapter.run(ids, capture=True)
    assert calls == {n: 1 for n in names}
    assert set(run.cache) == set(names) == set(everything.cache)


def test_unknown_hook_and_capture_names_raise(adapter, ids):
    from replacement.errors import CircuitsError
    from replacement.hooks import UnknownHookError, hook_name

    for bad in ("blocks.0.attn.outt", f"blocks.{adapter.n_layers}.attn.out", "blocks.0.mlp_out", "final.scale"):
        with pytest.raises(UnknownHookError, match="unknown hook name"):
            adapter.run(ids, hooks={bad: lambda t, n: torch.zeros_like(t)})
    with pytest.raises(UnknownHookError, match=r"unknown capture name 'blocks.0.attn.patern' \(did you mean 'blocks.0.attn.pattern'"):
        adapter.run(ids, capture=["blocks.0.attn.pattern", "blocks.0.attn.patern"])
    if adapter.parallel_residual:  # no residual between attention and MLP to hook
        with pytest.raises(UnknownHookError):
            adapter.run(ids, capture=["blocks.0.resid_mid"])
    with pytest.raises(UnknownHookError, match="unknown hook point 'attn.outt'"):
        hook_name(0, "attn.outt")
    assert issubclass(UnknownHookError, CircuitsError)


def test_fingerprints_take_tensors_of_any_size():
    """`sample_tensors` (every trace fingerprints the model with it) reads 64 evenly spaced entries: a tensor of
    more than 2^24 entries (Pythia-160M's embedding has 38.6M) made float32's spacing round the last index past the
    end, an IndexError in every attribution of such a model; the entries it reads are the ones computed exactly."""
    import hashlib

    from replacement.models import sample_tensors

    n = 38_633_472
    t = torch.arange(n, dtype=torch.float64).to(torch.bfloat16)
    h = hashlib.sha256()
    sample_tensors(h, {"w": t})
    idx = torch.linspace(0, n - 1, 64).long().clamp(max=n - 1)
    assert idx[-1] == n - 1 and (idx[1:] > idx[:-1]).all()
    want = hashlib.sha256()
    want.update(b"w")
    want.update(t[idx].float().to(torch.bfloat16).float().numpy().tobytes())
    assert h.hexdigest() == want.hexdigest()
