"""Lorsa: low-rank sparse attention (He et al. 2025).

    q_t^g = R_t (W_Q^g x_t + b_Q^g),   k_s^g = R_s (W_K^g x_s + b_K^g)       R = the model's rotary map
    A^g_{t,s} = softmax_{s <= t}(q_t^g . k_s^g / sqrt(d_qk))                  one pattern per QK group
    v_s^h = w_v^h . x_s + b_v^h                                             one scalar per head (1-D OV)
    z_t^h = sum_{s <= t} A^{g(h)}_{t,s} v_s^h
    a_t = TopK_K(ReLU(z_t * ||w_o||)) / ||w_o||
    y_t = sum_h a_t^h w_o^h + b_o

Heads of a QK group are contiguous: g(h) = h // heads_per_group.  An H x n x n tensor is never built:
attention runs per QK group with the group's heads as the value width, so peak memory grows with
n_qk * n^2 (and the fused `scaled_dot_product_attention` kernel applies).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import apply_rotary
from .sparse import ModuleConfig, SparseCode, decode, topk_relu


@dataclass
class LorsaConfig(ModuleConfig):
    d_model: int
    n_qk: int
    d_qk: int
    heads_per_group: int
    top_k: int
    rotary_dim: int = 0  # rotary applied to the first rotary_dim dims of each QK group (0: none)
    model_heads: int = 0  # the wrapped model's heads and head dim, for the paper's constraints
    model_d_head: int = 0
    layer: int = 0

    @property
    def n_heads(self) -> int:
        return self.n_qk * self.heads_per_group

    def problems(self) -> list[str]:
        bad = self._below_one("d_model", "n_qk", "d_qk", "heads_per_group", "top_k")
        bad += self._below_zero("rotary_dim", "model_heads", "model_d_head", "layer")
        if not bad and self.top_k > self.n_heads:
            bad.append(f"top_k {self.top_k} is more than its {self.n_heads} heads")
        if not bad and (self.rotary_dim > self.d_qk or self.rotary_dim % 2):
            bad.append(f"rotary_dim {self.rotary_dim} must be even and <= d_qk {self.d_qk}")
        return bad

    def weak_reasons(self) -> list[str]:
        """The paper's two hard constraints (d_qk >= head dim, n_qk >= heads) that this config breaks."""
        out = []
        if self.model_d_head and self.d_qk < self.model_d_head:
            out.append(f"d_qk={self.d_qk} < the model's head dimension {self.model_d_head}")
        if self.model_heads and self.n_qk < self.model_heads:
            out.append(f"n_qk={self.n_qk} < the model's {self.model_heads} heads")
        return out

    @classmethod
    def default_for(cls, adapter, layer: int = 0, heads_per_group: int = 64, qk_per_head: int = 8,
                    top_k: int = 64) -> "LorsaConfig":
        """Defaults: d_qk = head dim, n_qk = 8 x heads, 64 heads per QK group, K = 64."""
        return cls(d_model=adapter.d_model, n_qk=qk_per_head * adapter.n_heads, d_qk=adapter.d_head,
                   heads_per_group=heads_per_group, top_k=top_k, rotary_dim=adapter.rotary_dim,
                   model_heads=adapter.n_heads, model_d_head=adapter.d_head, layer=layer)


class Lorsa(nn.Module):
    def __init__(self, cfg: LorsaConfig, inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0,
                 allow_weak: bool = True):
        super().__init__()
        weak = cfg.weak_reasons()
        if weak and not allow_weak:
            raise ValueError("weak Lorsa config (" + "; ".join(weak) + "); pass --allow-weak-config to train it")
        if weak:
            warnings.warn("weak Lorsa config: " + "; ".join(weak), stacklevel=2)
        self.cfg = cfg
        d, G, e, H = cfg.d_model, cfg.n_qk, cfg.d_qk, cfg.n_heads
        self.W_Q = nn.Parameter(torch.randn(G, d, e) / math.sqrt(d))  # [n_qk, d, d_qk]
        self.W_K = nn.Parameter(torch.randn(G, d, e) / math.sqrt(d))
        self.b_Q = nn.Parameter(torch.zeros(G, e))
        self.b_K = nn.Parameter(torch.zeros(G, e))
        self.W_V = nn.Parameter(torch.randn(H, d) / math.sqrt(d))  # [H, d]
        self.b_V = nn.Parameter(torch.zeros(H))
        self.W_O = nn.Parameter(torch.randn(H, d) / math.sqrt(d))  # [H, d]
        self.b_O = nn.Parameter(torch.zeros(d))
        if inv_freq is None:
            inv_freq = torch.zeros(cfg.rotary_dim // 2)
        # the model's rotary frequencies (rope scaling already applied to them), and cos/sin's factor
        self.register_buffer("inv_freq", inv_freq.float().clone().reshape(cfg.rotary_dim // 2))
        self.register_buffer("rope_scaling", torch.tensor(float(rope_scaling)))

    # -- pieces -------------------------------------------------------------------------------------------

    def rotary(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [n, rotary_dim], the same map as the wrapped model's."""
        pos = torch.arange(n, device=device or self.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries and keys [B, n_qk, n, d_qk] from x [B, n, d]."""
        B, n, d = x.shape
        G, e = self.cfg.n_qk, self.cfg.d_qk
        # one [B*n, d] x [d, G*e] product per side (much faster than a batched product over groups)
        q = (x.reshape(B * n, d) @ self.W_Q.permute(1, 0, 2).reshape(d, G * e)).view(B, n, G, e).transpose(1, 2)
        k = (x.reshape(B * n, d) @ self.W_K.permute(1, 0, 2).reshape(d, G * e)).view(B, n, G, e).transpose(1, 2)
        q = q + self.b_Q[None, :, None]
        k = k + self.b_K[None, :, None]
        if self.cfg.rotary_dim:
            cos, sin = self.rotary(x.shape[1], x.device)
            q, k = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        return q, k

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """v [B, n_qk, n, heads_per_group] from x [B, n, d]."""
        B, n, _ = x.shape
        v = x @ self.W_V.t() + self.b_V  # [B, n, H]
        return v.view(B, n, self.cfg.n_qk, self.cfg.heads_per_group).transpose(1, 2)

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """A [B, n_qk, n, n], explicit (for analysis; the forward pass does not build it)."""
        from .models import causal_pattern

        q, k = self.qk(x)
        return causal_pattern(q, k, 1 / math.sqrt(self.cfg.d_qk))

    def head_activations(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, n, H]: every head's pre-TopK activation. ``pattern`` [B, n_qk, n, n] freezes attention."""
        B, n, _ = x.shape
        v = self.values(x)
        if pattern is None:
            q, k = self.qk(x)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(self.cfg.d_qk))
        else:
            z = pattern.to(v.dtype) @ v
        return z.transpose(1, 2).reshape(B, n, self.cfg.n_heads)

    def encode(self, x: torch.Tensor, pattern: torch.Tensor | None = None, k: int | None = None) -> SparseCode:
        """x [B, n, d] -> the TopK code, values/indices [B, n, K] (``pattern`` as in `head_activations`)."""
        return self.code_of(self.head_activations(x, pattern), k)

    def code_of(self, z: torch.Tensor, k: int | None = None) -> SparseCode:
        """The TopK code of head activations z [B, n, H] (`head_activations`): what `encode` returns."""
        return topk_relu(z, self.W_O.norm(dim=-1), k or self.cfg.top_k)

    def decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_dec [H, d], b_dec [d]): what the training engine treats as the dictionary."""
        return self.W_O, self.b_O

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """z [B, n, H] from x [B, n, d] (`head_activations`, live patterns): the training engine's name for it."""
        return self.head_activations(x)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """y [..., d] = sum of the active heads' a^h w_o^h + b_o, from a code [..., K]."""
        return decode(code, self.W_O, self.b_O)

    def forward(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> tuple[torch.Tensor, SparseCode]:
        """x [B, n, d] -> (y [B, n, d], sparse activations with K heads per token)."""
        code = self.encode(x, pattern)
        return self.decode(code), code

    def z_pattern(self, x: torch.Tensor, head: int, query: int) -> torch.Tensor:
        """[B, n]: (A_{t,s} v_s^h)_s for head h at query position t; it sums to z_t^h."""
        return torch.stack([self.z_patterns(xb, torch.tensor([head]), torch.tensor([query]))[0] for xb in x])

    def z_patterns(self, x: torch.Tensor, heads: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """[C, n]: the z patterns of heads [C] at query positions queries [C] on one sequence x [n, d] (zero
        after each query position): (A_{t,s} v_s^h)_s, which sums to z_t^h."""
        from .models import causal_pattern

        heads, queries = heads.to(x.device), queries.to(x.device)
        q, k = self.qk(x[None])  # [1, G, n, e]
        g = heads // self.cfg.heads_per_group
        A = causal_pattern(q[0, g], k[0, g], 1 / math.sqrt(self.cfg.d_qk))  # [C, n, n]
        A = A[torch.arange(len(queries), device=x.device), queries]  # [C, n]
        v = x @ self.W_V[heads].to(x.dtype).t() + self.b_V[heads].to(x.dtype)  # [n, C]
        return A * v.t()

    # -- initialisation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def init_qk_from_model(self, adapter, layer: int, noise: float = 0.01, x_scale: float = 1.0) -> None:
        """Each original head's W_Q/W_K (and biases) repeated over its share of QK groups.

        ``x_scale`` is the input normalisation factor used in training (the weights act on x * x_scale).
        Extra QK dims (d_qk > head dim) start as small noise."""
        Wq, bq = adapter.W_Q(layer)
        Wk, bk = adapter.W_K(layer)
        G, H = self.cfg.n_qk, adapter.n_heads
        dh = min(self.cfg.d_qk, adapter.d_head)
        for g in range(G):
            h = g * H // G
            for W, b, Wm, bm in ((self.W_Q, self.b_Q, Wq, bq), (self.W_K, self.b_K, Wk, bk)):
                W[g].normal_(0, noise / math.sqrt(self.cfg.d_model))
                W[g, :, :dh] += Wm[h, :, :dh].float() / x_scale
                b[g].zero_()
                if bm is not None:
                    b[g, :dh] = bm[h, :dh].float()


def one_head_lorsa(adapter, layer: int, head: int) -> Lorsa:
    """A Lorsa with one QK group that equals one real head (closed form, used by the tests).

    W_Q/W_K are the head's; the OV circuit W_V^h W_O^h (rank d_head) is split into d_head rank-1 heads
    in sign pairs: ReLU(z) w - ReLU(-z) w = z w, so with K = H the output equals the head's output."""
    Wq, bq = adapter.W_Q(layer)
    Wk, bk = adapter.W_K(layer)
    Wv, bv = adapter.W_V(layer)
    Wo, _ = adapter.W_O(layer)
    dh = adapter.d_head
    cfg = LorsaConfig(d_model=adapter.d_model, n_qk=1, d_qk=dh, heads_per_group=2 * dh, top_k=2 * dh,
                      rotary_dim=adapter.rotary_dim, layer=layer)
    inv, scale = inv_freq_of(adapter)
    lorsa = Lorsa(cfg, inv_freq=inv, rope_scaling=scale)
    with torch.no_grad():
        lorsa.W_Q[0] = Wq[head].float()
        lorsa.W_K[0] = Wk[head].float()
        lorsa.b_Q[0] = 0 if bq is None else bq[head].float()
        lorsa.b_K[0] = 0 if bk is None else bk[head].float()
        for i in range(dh):
            for s, sign in enumerate((1.0, -1.0)):
                h = 2 * i + s
                lorsa.W_V[h] = sign * Wv[head, :, i].float()
                lorsa.b_V[h] = 0 if bv is None else sign * bv[head, i].float()
                lorsa.W_O[h] = sign * Wo[head, i].float()
        lorsa.b_O.zero_()
    return lorsa


def inv_freq_of(adapter) -> tuple[torch.Tensor, float]:
    """The wrapped model's rotary inverse frequencies and cos/sin scaling factor."""
    rot = adapter._rotary_module
    inv = rot.inv_freq.detach().float().cpu()
    return inv[: adapter.rotary_dim // 2], float(getattr(rot, "attention_scaling", 1.0))


def lorsa_for_model(adapter, layer: int, cfg: LorsaConfig | None = None, allow_weak: bool = False) -> Lorsa:
    cfg = cfg or LorsaConfig.default_for(adapter, layer)
    inv, scale = inv_freq_of(adapter)
    rd = cfg.rotary_dim
    if rd and rd != adapter.rotary_dim:
        raise ValueError(f"rotary_dim {rd} differs from the model's {adapter.rotary_dim}")
    return Lorsa(cfg, inv_freq=inv if rd else None, rope_scaling=scale, allow_weak=allow_weak)
