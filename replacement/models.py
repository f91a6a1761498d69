"""`ModelAdapter`: uniform, hookable access to a Hugging Face causal LM (Llama family with Mistral, Qwen2 and Qwen3 (per-head QK-norm), GPT-NeoX/Pythia).

The adapter wraps the HF model in place (no weight copies) and runs its own forward pass built from the
model's modules, so that every intermediate value has a name and can be read or replaced:

    embed                         [B, n, d]   token embeddings
    blocks.L.resid_pre            [B, n, d]   residual stream entering layer L
    blocks.L.ln1.scale            [B, n, 1]   the attention norm's per-position denominator
    blocks.L.attn.in              [B, n, d]   what attention reads (after its norm)
    blocks.L.attn.q / .k          [B, H, n, dh] queries and keys after the rotary map (K/V heads repeated)
    blocks.L.attn.v               [B, H, n, dh]
    blocks.L.attn.pattern         [B, H, n, n] attention probabilities
    blocks.L.attn.z               [B, n, H, dh] per-head mixed values, before the output matrix
    blocks.L.attn.out             [B, n, d]   attention output, before the residual add (Gemma-2: after its
                                              own norm, whose denominator is blocks.L.ln1_post.scale [B, n, 1])
    blocks.L.resid_mid            [B, n, d]   (sequential blocks only) residual after attention
    blocks.L.ln2.scale            [B, n, 1]   the MLP norm's per-position denominator
    blocks.L.mlp.in / .out        [B, n, d]   MLP input (after its norm) and output (Gemma-2: after its own
                                              norm, blocks.L.ln2_post.scale)
    blocks.L.resid_post           [B, n, d]
    ln_final.scale                [B, n, 1]
    logits                        [B, n, V]

Names are made by `replacement.hooks.hook_name` (``hook_name(L, "attn.out")``); `ModelAdapter.run` refuses a
name the model does not have (`replacement.hooks.UnknownHookError`).

A hook is ``fn(tensor, name) -> tensor | None``; returning a tensor replaces the value.  Freezing a norm
scale or a pattern is a hook returning the cached clean value (see `freeze_hooks`).

Gemma-2 runs through the same names: norms multiply by (1 + weight), attention scores and logits are
soft-capped (``logits`` is the capped value), local layers attend within their sliding window.

Residual rules: Llama is sequential (the MLP reads resid_mid); GPT-NeoX with ``use_parallel_residual``
has attention and MLP both read resid_pre, and resid_post = resid_pre + attn.out + mlp.out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .errors import BadInputError, ModelLoadError
from .hooks import EMBED, FINAL_OUT, FINAL_SCALE, LOGITS, check_hook_names, hook_name, model_hook_names

Hook = Callable[[torch.Tensor, str], "torch.Tensor | None"]

SUPPORTED = {"llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama", "gemma2": "llama",
             "gpt_neox": "gpt_neox"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# Small pure functions
# ---------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., r]: (-x2, x1) for the halves x1, x2 of the last dimension (HF's rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x [..., n, dh] by position; the rest pass (partial rotary).

    cos, sin: [n, rot_dim] (or broadcastable to x[..., :rot_dim]).
    """
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def causal_pattern(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None = None,
                   window: int | None = None) -> torch.Tensor:
    """softmax_{s<=t}(q_t . k_s * scale); q, k [..., n, dh] -> [..., n, n], in q's dtype.  As HF's eager
    attention computes it: the scores in q's dtype (bfloat16 too), the softmax in float32, so that a bfloat16 run
    equals HF's own.  ``softcap``: scores -> softcap * tanh(scores / softcap) (Gemma-2); ``window``: only
    s > t - window."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float()
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    if window:
        mask = mask | torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window)
    return scores.masked_fill(mask, float("-inf")).softmax(-1).to(q.dtype)


def encode_prompt(tokenizer, prompt: str, context: int, truncate: bool = False, what: str = "prompt") -> torch.Tensor:
    """[1, n] token ids with BOS, checked against the context length (or, with ``truncate``, cut to it); errors
    name the text as ``what`` ("prompt", "counterfactual prompt", ...).

    Text that spells a special token (``<|bos|>``) stays text: only the BOS this function adds is special."""
    if not prompt or not prompt.strip():
        raise BadInputError(f"the {what} is empty")
    if tokenizer is None:
        raise BadInputError(NO_TOKENIZER)
    ids = tokenizer(prompt, return_tensors="pt", split_special_tokens=True).input_ids
    bos = start_token(tokenizer)
    if not any(int(i) != bos for i in ids[0]):  # a tokenizer that has no token for any of the text
        raise BadInputError(f"the {what} {prompt[:40]!r} has no tokens in this model's tokenizer")
    if bos is not None and (ids.shape[1] == 0 or ids[0, 0] != bos):
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    if truncate:
        ids = ids[:, :context]
    check_length(ids.shape[1], context, what)
    return ids


def start_token(tokenizer) -> int | None:
    """The token every prompt starts with: BOS; for a tokenizer without one (Qwen2), circuit-tracer's stand-in,
    the first of pad, eos and the other special tokens that is set and not id 0 (its rule skips id 0 too)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    candidates = [tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
    return next((i for i in candidates if i), None)


def _qk_norm(attn, name: str, x: torch.Tensor) -> torch.Tensor:
    """Qwen3's per-head RMSNorm of queries or keys (before the rotary map), x [B, n, heads, dh]; others: x."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def check_length(n: int, context: int, what: str = "prompt") -> None:
    if n > context:
        raise BadInputError(f"the {what} is {n} tokens, longer than the model's context of {context}")


def single_token(tokenizer, text: str, what: str = "target") -> int:
    """The id of ``text`` if it is exactly one token (a spelled-out special token is not), else of the vocabulary
    piece or bytes it names as `tokenizer.token_text` prints tokens (``▁s``, ``<0x82>``), else of the token it
    names as `trace` prints tokens between quotes (``\\n`` for a line break); else BadInputError."""
    from .tokenizer import unescape_printed

    try:
        return _single_token(tokenizer, text, what)
    except BadInputError:
        plain = unescape_printed(text)
        if plain == text:
            raise
        try:
            return _single_token(tokenizer, plain, what)
        except BadInputError:
            pass
        raise  # the message about the text as given


def _single_token(tokenizer, text: str, what: str) -> int:
    from .tokenizer import token_by_name, token_text

    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if tokenizer is not None else []
    if len(ids) == 1 and token_text(tokenizer, ids[0]) == text:
        return ids[0]
    named = token_by_name(tokenizer, text) if tokenizer is not None and text else None
    special = getattr(tokenizer, "all_special_ids", ())
    if named is not None and named not in special:
        return named  # "s" in a sentencepiece vocabulary: the piece that continues a word, as the prompt prints it
    if len(ids) == 1:
        return ids[0]
    if named is not None:
        raise BadInputError(f"{what} {text!r} is a special token (BOS, padding, ...), which is never a logit a graph "
                            "explains or compares")
    raise BadInputError(f"{what} {text!r} is not a single token of this model's vocabulary ({len(ids)} tokens), nor "
                        f"a token's piece or bytes as trace prints them (<0x82>)")


@dataclass
class RunResult:
    logits: torch.Tensor
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.cache[name]


def freeze_hooks(cache: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, Hook]:
    """Hooks that replace each named value by its value in ``cache`` (e.g. norm scales, patterns)."""
    return {name: (lambda t, n, v=cache[name]: v) for name in names}


# ---------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------


class ModelAdapter:
    """Hookable view of an HF causal LM. ``adapter.model`` is the wrapped HF model itself."""

    def __init__(self, model, tokenizer=None, name: str | None = None):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ModelLoadError(
                f"unsupported architecture {cfg.model_type!r}; supported: {', '.join(sorted(SUPPORTED))}"
            )
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.name = name or getattr(cfg, "_name_or_path", "") or f"unnamed-{cfg.model_type}"
        self.arch = SUPPORTED[cfg.model_type]
        if getattr(cfg, "use_sliding_window", False):
            raise ModelLoadError(f"{cfg.model_type} with sliding-window attention (use_sliding_window) is not supported")
        self.n_layers = cfg.num_hidden_layers
        self.d_model = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_head = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.context = context_of(cfg, name or cfg.model_type)
        self.vocab_size = cfg.vocab_size
        self.parallel_residual = self.arch == "gpt_neox" and bool(cfg.use_parallel_residual)
        base = model.gpt_neox if self.arch == "gpt_neox" else model.model
        self._base = base
        self.blocks = base.layers
        self.embedding = model.get_input_embeddings()  # nn.Embedding [V, d]
        self.unembedding = model.get_output_embeddings()  # nn.Linear d -> V
        self.final_norm = base.final_layer_norm if self.arch == "gpt_neox" else base.norm
        self._rotary_module = base.rotary_emb
        self.attn_scale = self.d_head**-0.5
        self.gemma = cfg.model_type == "gemma2"  # sandwich norms, (1 + w) norm weights, soft-capping (its embedding module scales by sqrt(d) itself)
        self.attn_softcap = self.logit_softcap = None
        if self.gemma:
            self._init_gemma2(cfg)
        self.hook_names = model_hook_names(self.n_layers, self.parallel_residual, self.gemma)  # every name `run` knows

    def _init_gemma2(self, cfg) -> None:
        if getattr(cfg, "attention_bias", False):
            raise ModelLoadError("gemma2 with attention biases is not supported (a post-attention norm would scale them "
                                 "per position)")
        self.attn_scale = cfg.query_pre_attn_scalar**-0.5
        self.attn_softcap, self.logit_softcap = cfg.attn_logit_softcapping, cfg.final_logit_softcapping

    def post_norm(self, layer: int, which: str):
        """Gemma-2's norm of the attention ("attn") or MLP ("mlp") output before the residual add; else None."""
        if not self.gemma:
            return None
        blk = self.blocks[layer]
        return blk.post_attention_layernorm if which == "attn" else blk.post_feedforward_layernorm

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer's attention (Gemma-2's local layers; every Mistral layer, whose config
        has one: Mistral-7B-v0.1's 4,096 tokens), else None."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return self.config.sliding_window if types[layer] == "sliding_attention" else None
        return getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def attn_module(self, layer: int):
        blk = self.blocks[layer]
        return blk.attention if self.arch == "gpt_neox" else blk.self_attn

    def attn_norm(self, layer: int):
        return self.blocks[layer].input_layernorm

    def mlp_norm(self, layer: int):
        blk = self.blocks[layer]
        return blk.pre_feedforward_layernorm if self.gemma else blk.post_attention_layernorm

    def mlp(self, layer: int):
        return self.blocks[layer].mlp

    @property
    def rotary_dim(self) -> int:
        if self.arch == "gpt_neox":
            factor = self.config.rope_parameters.get("partial_rotary_factor", 1.0)
            return int(self.d_head * factor)
        return self.d_head

    # -- weights per head (views or small derived tensors; the model's parameters are not copied) -------

    def _qkv_neox(self, layer: int, which: int):
        lin = self.attn_module(layer).query_key_value
        w = lin.weight.view(self.n_heads, 3, self.d_head, self.d_model)[:, which]  # [H, dh, d]
        b = None if lin.bias is None else lin.bias.view(self.n_heads, 3, self.d_head)[:, which]
        return w.transpose(1, 2), b

    def _proj(self, lin, n: int):
        w = lin.weight.view(n, self.d_head, self.d_model).transpose(1, 2)  # [n, d, dh]
        b = None if lin.bias is None else lin.bias.view(n, self.d_head)
        return w, b

    def kv_head_of(self, head: int) -> int:
        """The key/value head that query head ``head`` reads under GQA."""
        return head // (self.n_heads // self.n_kv_heads)

    def W_Q(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[H, d, dh] and bias [H, dh] (or None)."""
        if self.arch == "gpt_neox":
            return self._qkv_neox(layer, 0)
        return self._proj(self.attn_module(layer).q_proj, self.n_heads)

    def _kv(self, layer: int, which: int):
        if self.arch == "gpt_neox":
            return self._qkv_neox(layer, which)
        lin = self.attn_module(layer).k_proj if which == 1 else self.attn_module(layer).v_proj
        w, b = self._proj(lin, self.n_kv_heads)
        idx = torch.tensor([self.kv_head_of(h) for h in range(self.n_heads)], device=w.device)
        return w[idx], (None if b is None else b[idx])

    def W_K(self, layer: int):
        """[H, d, dh] per query head (GQA key heads mapped to query heads) and bias."""
        return self._kv(layer, 1)

    def W_V(self, layer: int):
        """[H, d, dh] per query head (GQA value heads mapped to query heads) and bias."""
        return self._kv(layer, 2)

    def W_O(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[H, dh, d] and the output bias [d] (or None)."""
        attn = self.attn_module(layer)
        lin = attn.dense if self.arch == "gpt_neox" else attn.o_proj
        return lin.weight.t().reshape(self.n_heads, self.d_head, self.d_model), lin.bias

    def rotary(self, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [n, rotary_dim], as the model computes them (rope scaling included)."""
        pos = torch.arange(offset, offset + n, device=self.device)[None]
        probe = torch.empty(0, device=self.device, dtype=torch.float32)
        cos, sin = self._rotary_module(probe, pos)
        return cos[0], sin[0]

    # -- tokens -------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str, truncate: bool = False, what: str = "prompt") -> torch.Tensor:
        """[1, n] token ids with BOS, checked against the context length (or, with ``truncate``, cut to it)."""
        return encode_prompt(self.tokenizer, prompt, self.context, truncate, what).to(self.device)

    def check_length(self, n: int) -> None:
        check_length(n, self.context)

    @property
    def model_arg(self) -> str:
        """What to give ``--model`` to load this model again: a bundled preset's name, a local model's folder
        (its path: its name alone would be read as a hub id), else its name."""
        from .bundle import is_preset

        path = getattr(self.config, "_name_or_path", "") or ""
        if not is_preset(self.name) and path and Path(path).is_dir():
            return str(Path(path))
        return self.name

    def prompt_ids(self, prompt, what: str = "prompt") -> torch.Tensor:
        """[1, n] token ids of ``prompt``: a string (tokenised, with BOS), or token ids already (a tensor, list or
        tuple of whole numbers, [n] or [1, n], each in the vocabulary, at most the context); BadInputError else."""
        if isinstance(prompt, str):
            return self.tokenize(prompt, what=what)
        if isinstance(prompt, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
                raise BadInputError(f"the {what} must be a string or token ids (whole numbers)")
            prompt = torch.tensor(prompt, dtype=torch.long)
        if not isinstance(prompt, torch.Tensor):
            raise BadInputError(f"the {what} must be a string or a tensor of token ids, not {type(prompt).__name__}")
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise BadInputError(f"the {what}'s token ids must be whole numbers, not {prompt.dtype}")
        if prompt.dim() > 2 or (prompt.dim() == 2 and prompt.shape[0] != 1):
            raise BadInputError(f"the {what} must be one sequence of token ids ([n] or [1, n]), not "
                                f"{list(prompt.shape)}")
        ids = prompt.reshape(1, -1).long()
        if ids.shape[1] == 0:
            raise BadInputError(f"the {what} is empty")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if len(bad):
            raise BadInputError(f"token id {int(bad[0])} in the {what} is outside the vocabulary "
                                f"(0-{self.vocab_size - 1})")
        check_length(ids.shape[1], self.context, what)
        return ids.to(self.device)

    def token_id(self, token, what: str = "target") -> int:
        """A token's id from its text (a single token) or its id; BadInputError else."""
        if isinstance(token, str):
            return single_token(self.tokenizer, token, what)
        if isinstance(token, bool) or not isinstance(token, int) and not (
                isinstance(token, torch.Tensor) and token.numel() == 1 and not token.is_floating_point()):
            raise BadInputError(f"{what} must be a token (text) or a token id, not {token!r}")
        i = int(token)
        if not 0 <= i < self.vocab_size:
            raise BadInputError(f"{what} id {i} is outside the vocabulary (0-{self.vocab_size - 1})")
        return i

    # -- forward ------------------------------------------------------------------------------------------

    def _norm(self, norm, x, name, hooks, cache):
        """Apply an RMSNorm/LayerNorm with its scale exposed as ``name`` [B, n, 1].  Rounded as HF's norms round,
        so that a bfloat16 model runs as HF runs it: x * rsqrt(variance + eps) in float32, then RMSNorm casts
        before its weight, Gemma-2's after its (1 + weight); a LayerNorm whose scale no hook changed is torch's
        own layer_norm (it rounds once, after the weight and bias, from statistics computed its own way)."""
        xf = x.float()
        layernorm = isinstance(norm, torch.nn.LayerNorm)
        if layernorm:
            xf = xf - xf.mean(-1, keepdim=True)
        var = xf.pow(2).mean(-1, keepdim=True) + (norm.eps if layernorm or self.gemma else norm.variance_epsilon)
        own = var.sqrt()
        # a hook gets a copy (it may change it in place); a scale frozen at its own value runs the norm as it is,
        # but where gradients flow through x: there a frozen scale is a constant, whose derivative the live norm's
        # (through its variance) is not (path patching's linear effects with the norms frozen took the live one)
        scale = self._hook(name, own.clone() if hooks and name in hooks else own, hooks, cache)
        grad = torch.is_grad_enabled() and xf.requires_grad
        as_is = scale is own or (not grad and torch.equal(scale, own))
        if layernorm and as_is:
            return torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        xn = xf * torch.rsqrt(var) if as_is else xf / scale
        if self.gemma:  # Gemma-2 multiplies in float32, then casts
            return (xn * (1.0 + norm.weight.float())).to(x.dtype)
        if layernorm:
            y = xn * norm.weight.float()
            return (y if norm.bias is None else y + norm.bias.float()).to(x.dtype)
        return xn.to(x.dtype) * norm.weight

    @staticmethod
    def _hook(name, t, hooks, cache):
        if hooks and name in hooks:
            out = hooks[name](t, name)
            if out is not None:
                t = out
        if cache is not None and (cache.get("__all__") is not None or name in cache.get("__want__", ())):
            cache[name] = t
        return t

    def _attention(self, layer, x, cos, sin, hooks, cache):
        B, n, _ = x.shape
        H, dh = self.n_heads, self.d_head
        attn = self.attn_module(layer)
        if self.arch == "gpt_neox":
            qkv = attn.query_key_value(x).view(B, n, H, 3 * dh).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            q = _qk_norm(attn, "q_norm", attn.q_proj(x).view(B, n, H, dh)).transpose(1, 2)
            rep = H // self.n_kv_heads
            k = _qk_norm(attn, "k_norm", attn.k_proj(x).view(B, n, self.n_kv_heads, dh))
            k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
            v = attn.v_proj(x).view(B, n, self.n_kv_heads, dh).transpose(1, 2).repeat_interleave(rep, dim=1)
        q = self._hook(hook_name(layer, "attn.q"), apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype)), hooks, cache)
        k = self._hook(hook_name(layer, "attn.k"), apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype)), hooks, cache)
        v = self._hook(hook_name(layer, "attn.v"), v, hooks, cache)
        pat = hook_name(layer, "attn.pattern")
        need_pattern = (hooks and pat in hooks) or (
            cache is not None and (cache.get("__all__") is not None or pat in cache.get("__want__", ()))
        )
        window = self.window(layer)
        if need_pattern or self.attn_softcap or window or q.dtype != torch.float32:  # bfloat16: as HF's eager
            pattern = causal_pattern(q, k, self.attn_scale, self.attn_softcap, window)
            pattern = self._hook(pat, pattern, hooks, cache)
            z = pattern @ v
        else:  # fused kernel; no [B, H, n, n] tensor is kept
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        z = self._hook(hook_name(layer, "attn.z"), z.transpose(1, 2), hooks, cache)  # [B, n, H, dh]
        out_lin = attn.dense if self.arch == "gpt_neox" else attn.o_proj
        out = out_lin(z.reshape(B, n, H * dh))
        post = self.post_norm(layer, "attn")
        return out if post is None else self._norm(post, out, hook_name(layer, "ln1_post.scale"), hooks, cache)

    def run(self, ids: torch.Tensor, hooks: dict[str, Hook] | None = None,
            capture: bool | Iterable[str] = False, embeds: torch.Tensor | None = None) -> RunResult:
        """Run the model through named, hookable steps.

        ids: [B, n] token ids.  ``capture``: True for every named value, or an iterable of names.
        ``embeds`` [B, n, d] replaces the embedding lookup (the input of linearity checks).
        A hook or capture name the model does not have is an `UnknownHookError`.
        """
        if ids.dim() == 1:
            ids = ids[None]
        n = ids.shape[1]
        self.check_length(n)
        cache = self._new_cache(hooks, capture)
        x = self.embedding(ids) if embeds is None else embeds
        x = self._hook(EMBED, x, hooks, cache)
        cos, sin = self.rotary(n)
        for L in range(self.n_layers):
            x = self._block(L, x, cos, sin, hooks, cache)
        x = self._norm(self.final_norm, x, FINAL_SCALE, hooks, cache)
        x = self._hook(FINAL_OUT, x, hooks, cache)
        logits = self.unembedding(x)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        logits = self._hook(LOGITS, logits, hooks, cache)
        if cache is not None:
            cache.pop("__all__", None)
            cache.pop("__want__", None)
        return RunResult(logits, cache or {})

    def _new_cache(self, hooks, capture) -> dict | None:
        """The run's cache (None: nothing captured), after checking every hook and capture name."""
        check_hook_names(hooks or (), self.hook_names, "hook")
        if capture is True:
            return {"__all__": True}
        if not capture:
            return None
        want = set(capture)
        check_hook_names(sorted(want), self.hook_names, "capture")
        return {"__want__": want}

    def _block(self, L: int, x, cos, sin, hooks, cache):
        """One transformer block on the residual stream x [B, n, d]; returns resid_post."""
        def h(point, t):
            return self._hook(hook_name(L, point), t, hooks, cache)

        x = h("resid_pre", x)
        a_in = h("attn.in", self._norm(self.attn_norm(L), x, hook_name(L, "ln1.scale"), hooks, cache))
        a_out = h("attn.out", self._attention(L, a_in, cos, sin, hooks, cache))
        if not self.parallel_residual:
            x = h("resid_mid", x + a_out)
        m_in = h("mlp.in", self._norm(self.mlp_norm(L), x, hook_name(L, "ln2.scale"), hooks, cache))
        m_out = self.mlp(L)(m_in)
        if self.post_norm(L, "mlp") is not None:
            m_out = self._norm(self.post_norm(L, "mlp"), m_out, hook_name(L, "ln2_post.scale"), hooks, cache)
        m_out = h("mlp.out", m_out)
        x = m_out + a_out + x if self.parallel_residual else x + m_out  # HF's order (it rounds in bfloat16)
        return h("resid_post", x)

    @torch.no_grad()
    def next_token_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """[V] the next-token distribution after the last of ``ids`` [1, n]; `BadInputError` if the logits are
        not finite (NaN weights)."""
        logits = self.run(ids).logits[0, -1].float()
        if not bool(torch.isfinite(logits).all()):
            raise BadInputError(f"the model {self.name} outputs NaN or infinite logits (NaN weights?)")
        return logits.softmax(-1)

    def hf_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The wrapped HF model's own forward pass (for checks)."""
        return self.model(ids).logits

    def to(self, device=None, dtype=None) -> "ModelAdapter":
        self.model.to(device=device, dtype=dtype)
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (``cpu:0`` too, as torch takes it); default: cuda where a GPU is."""
    import re

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if m is None:
        raise BadInputError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {device} was asked for, but no CUDA GPU is available; use --device cpu")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise BadInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                f"numbered from 0")
    elif m.group(2) not in (None, "0"):
        raise BadInputError(f"unknown device {device!r}; the CPU is cpu (or cpu:0)")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    return DTYPES[dtype]


def resolve_model_path(name: str) -> tuple[str, str, str | None]:
    """(path or HF id, display name, HF revision or None) for a preset name, a local folder, or an HF id
    ``owner/name`` with an optional ``@revision`` (a branch, tag or commit)."""
    from .bundle import PRESET_NAMES, is_preset, preset_folder

    if is_preset(name):
        folder = preset_folder(name)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"the bundled model {name!r} has no weights in {folder}; "
                f"train it with: circuits train-lm --model {name} --install"
            )
        return str(folder), name, None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} is not an HF model folder (no config.json)")
        # named by its folder's name, or by its path where that name is a preset's: a local folder called "llama"
        # was taken for the bundled model (its replacements saved and looked for there)
        return str(path), (str(path.resolve()) if is_preset(path.name) else path.name), None
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".safetensors")):
        raise ModelLoadError(f"no such model folder: {name}")
    repo, at, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision) or "@" in revision:
        raise ModelLoadError(
            f"unknown model {name!r}: not a bundled preset ({', '.join(PRESET_NAMES)}), "
            "not an existing folder, and not an HF id of the form owner/name[@revision]"
        )
    return repo, name, revision or None


def local_checkpoints(extra: Iterable[Path] = ()) -> list[tuple[str, str]]:
    """(name, where) of the HF checkpoints in sight: models in the HF hub cache (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``) and folders with an HF model's config.json (one naming a ``model_type``: a replacements
    folder's config.json does not) and safetensors weights in ./ and in ``extra``."""
    import os

    found = []
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            if any(repo.glob("snapshots/*/config.json")):
                found.append((repo.name[len("models--"):].replace("--", "/"), str(repo)))
    seen = set()
    for root in [Path.cwd(), *map(Path, extra)]:
        if root.is_dir():
            for cfg in sorted([*root.glob("config.json"), *root.glob("*/config.json")]):  # a model folder itself too
                if cfg.resolve() in seen:  # a --search folder that is ./ (or inside it) lists each model once
                    continue
                seen.add(cfg.resolve())
                pickles = _pickle_weights(cfg.parent)
                if not any(cfg.parent.glob("*.safetensors")) and not pickles:
                    continue
                config = _read_json(cfg)
                if not isinstance(config, dict):  # an unreadable model config (a replacements folder's is an object)
                    found.append((str(cfg.parent), "local folder: config.json is not valid JSON; it does not load"))
                elif not isinstance(config.get("model_type"), str):
                    continue
                elif not any(cfg.parent.glob("model*.safetensors")):  # the names loading reads (_check_safetensors_only)
                    found.append((str(cfg.parent), f"local folder: only pickle weights ({', '.join(pickles)}), which "
                                                   "are never loaded: convert them to safetensors"
                                  if pickles else "local folder: no model*.safetensors weights; it does not load"))
                else:
                    found.append((str(cfg.parent), "local folder: " + describe_folder(cfg.parent, config)))
    return found


def describe_folder(folder: Path, config: dict) -> str:
    """A local model folder in one line, from its files alone (nothing loaded; ``config``: its config.json):
    architecture and sizes, whether the tool supports it, its tokenizer, its weights' integrity (a truncated file)
    and its trained replacements."""
    kind = config.get("model_type")
    heads = config.get("num_attention_heads", "?")
    sizes = (f"{config.get('num_hidden_layers', '?')} layers, d={config.get('hidden_size', '?')}, "
             f"{heads} heads/{config.get('num_key_value_heads', heads)} kv")
    parts = [f"{kind}, {sizes}" if kind in SUPPORTED else f"{kind}: not supported (supported: {', '.join(sorted(SUPPORTED))})"]
    broken = [f.name for f in sorted(folder.glob("*.safetensors")) if not _safetensors_readable(f)]
    if broken:
        parts.append(f"truncated or corrupt weights ({', '.join(broken)})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        parts.append("no tokenizer")
    reps = folder / "replacements" / "config.json"
    parts.append("replacements trained" if reps.is_file() else "no replacements yet")
    return "; ".join(parts)


def _safetensors_readable(path: Path) -> bool:
    """Whether safetensors opens the file: its header whole, and every byte the header promises there (a truncated
    file is "not fully covered")."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


def _read_json(path: Path):
    """A JSON file's contents; None if it cannot be read or is not JSON."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str, device: str | None = "cpu", dtype: str | torch.dtype = "float32") -> ModelAdapter:
    """Load a preset, a local HF folder, or an HF hub id into a `ModelAdapter`."""
    import warnings

    from transformers import AutoModelForCausalLM

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    config, path, display, revision, local_only = _load_config(name)
    if config.model_type not in SUPPORTED:
        raise ModelLoadError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(sorted(SUPPORTED))}")
    _check_safetensors_only(path, name)
    _check_layer_count(path, name, config)
    try:
        with warnings.catch_warnings():  # e.g. torch's on zero-size tensors of a broken config: the error says it
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="eager",
                                                               local_files_only=local_only, use_safetensors=True,
                                                               output_loading_info=True, revision=revision)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files raise many kinds (SafetensorError, ...)
        why = _first_line(e)
        if "ignore_mismatched_sizes" in why:  # HF's line points at a report it printed, which we keep quiet
            why = "the weights' shapes differ from what its config.json describes"
        raise ModelLoadError(f"cannot load the weights of {name!r}: {why}") from None
    missing, unused = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing or unused:  # HF would initialise the missing ones at random, or drop the unused: another model
        part = f"{len(missing)} weights missing (first {sorted(missing)[0]})" if missing else \
            f"{len(unused)} weights unused (first {sorted(unused)[0]})"
        raise ModelLoadError(f"cannot load {name!r}: its config.json does not match its weights: {part}")
    tokenizer = _load_tokenizer(path, local_only, revision)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelAdapter(model, tokenizer, display)


def load_tokenizer(name: str) -> tuple[object | None, int]:
    """The tokenizer (None if the model has none) and context length of a model, without loading its weights:
    prompts and targets are checked with them before the (slow) model load."""
    config, path, _, revision, local_only = _load_config(name)
    return _load_tokenizer(path, local_only, revision), context_of(config, name)


def _load_config(name: str) -> tuple:
    """(its HF config, path, display name, revision, local_only) of a model named as `resolve_model_path` takes
    it; ``local_only``: an HF id read from the local cache, the hub being unreachable.  ModelLoadError (one line)
    for a config.json that cannot be read."""
    from transformers import AutoConfig

    _quiet_hf()
    path, display, revision = resolve_model_path(name)
    local_only = not Path(path).exists() and not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only, revision=revision)
    except Exception as e:  # noqa: BLE001 - an unreadable config.json raises OSError, ValueError or JSONDecodeError
        raise ModelLoadError(f"cannot load {name!r}: {_unloadable(e, local_only, revision)}") from None
    return config, path, display, revision, local_only


def _unloadable(error: Exception, local_only: bool, revision: str | None) -> str:
    """Why a model's config.json could not be read, as a clause."""
    if not local_only:
        return _first_line(error)
    what = f"revision {revision!r}" if revision else "it"
    return f"{what} is not in the local HF cache and the hub is unreachable (offline)"


def context_of(config, name: str) -> int:
    """The model's context length (its config's ``max_position_embeddings``; none given: unlimited, 2^31)."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return 2**31
    if isinstance(n, float) and n.is_integer():  # 2048.0
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelLoadError(f"cannot load {name!r}: its config.json's max_position_embeddings is {n!r}, not a "
                             "positive whole number")
    return n


# the files a tokenizer is saved as (one of them is enough); without any, AutoTokenizer would build an empty one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
NO_TOKENIZER = ("the model has no tokenizer (none of " + ", ".join(TOKENIZER_FILES) + " in its folder): save one there "
                "(tokenizer.save_pretrained); from Python, token ids work without one")


def _load_tokenizer(path: str, local_only: bool, revision: str | None = None):
    """The model's tokenizer; None for a local folder without one (the library then takes token ids); a
    ModelLoadError (one line) for a local one that cannot be read."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=local_only, revision=revision)
    except Exception as e:  # noqa: BLE001 - a hub model without a (readable) tokenizer takes token ids
        if folder.is_dir():
            raise ModelLoadError(f"cannot read the tokenizer in {path}: {_first_line(e)}") from None
        return None


def _pickle_weights(folder: Path) -> list[str]:
    """The names of a folder's pickle weight files (``pytorch_model.bin``, ``*.pt``), which are never loaded."""
    return sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))


def _check_safetensors_only(path: str, name: str) -> None:
    """A local folder must hold its weights as safetensors: pickle files (``pytorch_model.bin``) are never loaded."""
    folder = Path(path)
    weights = list(folder.glob("model*.safetensors")) if folder.is_dir() else []  # HF's names (sharded too), not
    if folder.is_dir() and not weights:  # any other .safetensors beside them
        pickles = _pickle_weights(folder)
        why = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        also = f" (and {', '.join(others[:3])}, not named as HF names a model's weights: model.safetensors)" if others else ""
        raise ModelLoadError(f"cannot load {name!r}: the folder holds {why}{also}; convert them to safetensors")


def _quiet_hf() -> None:
    """Our commands print one line per error; HF's progress bars and warnings would add noise to it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _check_layer_count(path: str, name: str, config) -> None:
    """A local folder's weights hold as many layers as its config.json says (read from the safetensors headers,
    before HF builds the model: a config claiming a trillion layers would build forever, one claiming fewer would
    drop weights)."""
    import re

    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    layers = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                layers.update(int(m.group(1)) for k in h.keys() if (m := re.search(r"\.layers\.(\d+)\.", k)))
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the load itself, in one line
            return
    claimed = getattr(config, "num_hidden_layers", None)
    if layers and claimed != max(layers) + 1:
        raise ModelLoadError(f"cannot load {name!r}: its config.json says {claimed!r} layers, its weights hold "
                             f"{max(layers) + 1}")


def _first_line(e: BaseException) -> str:
    """An exception's first line, with the line after it when it ends in a colon (a validator's "Validation error
    for field 'hidden_size':" says why on the next)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}"[:300] if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def model_fingerprint(adapter: ModelAdapter) -> str:
    """A short hash of the model's config and weights: replacement checkpoints record it."""
    import hashlib

    skip = {"transformers_version", "dtype", "torch_dtype", "architectures", "attn_implementation"}
    cfg = {k: v for k, v in adapter.config.to_dict().items() if k not in skip and not k.startswith("_")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    sample_tensors(h, adapter.model.state_dict())
    return h.hexdigest()[:16]


def sample_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed the hash ``h`` each tensor's name and 64 of its entries, evenly spaced, in bf16 (no float copy of the
    weights: a trace fingerprints them each time)."""
    for name, p in sorted(tensors.items()):
        t = p.detach().flatten()
        # float32 spacing (the fingerprints recorded so far); past 2^24 entries its last index rounds past the end
        idx = torch.linspace(0, t.numel() - 1, steps=min(64, t.numel())).long().clamp_(max=t.numel() - 1).to(t.device)
        h.update(name.encode())
        h.update(t[idx].float().cpu().to(torch.bfloat16).float().numpy().tobytes())


__all__ = [
    "ModelAdapter", "RunResult", "apply_rotary", "causal_pattern", "check_length", "encode_prompt", "freeze_hooks",
    "load_model", "load_tokenizer", "local_checkpoints", "model_fingerprint", "single_token", "resolve_device", "resolve_dtype",
]
