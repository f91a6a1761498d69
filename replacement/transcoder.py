"""TopK transcoders: read what the MLP reads (after its norm), predict the MLP's output.

    f = TopK_K(ReLU(W_enc x + b_enc))        ranked by f * ||W_dec row||, like Lorsa's heads
    y_hat = W_dec^T f + b_dec (+ x W_skip, optional, off by default; circuit-tracer's files hold W_skip^T)

A cross-layer transcoder (CLT) is one such module per layer L whose features also write into the MLP outputs
of the ``n_later`` layers after L, each through its own decoder (``W_dec_later [N, n_later, d]``): the MLP
output of layer T is then replaced by  sum over L <= T of W_dec(L -> T)^T f_L + b_dec(T)  (`decoder_into`;
the sum itself: replacement/assemble.py's `ReplacementModel.mlp_replacement`).

Loaded from elsewhere, a transcoder may instead be JumpReLU (``jumprelu``: f_i = pre_i if pre_i > theta_i, else
0, thresholds theta [N] >= 0) and may have no top-K (``top_k`` 0: every feature that passes its activation).

Decoder rows are not constrained to unit norm; instead features are ranked by what they write
(activation x decoder norm), so a feature cannot win the top-K by shrinking its decoder.

Other tools' files (circuit-tracer's per-layer transcoders and CLTs, Llamascopium's) are read and written by
replacement/foreign.py.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from .sparse import ModuleConfig, SparseCode, decode, gated_code, topk_relu


READS = ("mlp.in", "mlp.normalized", "resid_mid")  # what a transcoder's encoder can read (TranscoderConfig.reads)


@dataclass
class TranscoderConfig(ModuleConfig):
    d_model: int
    n_features: int
    top_k: int
    skip: bool = False
    layer: int = 0
    jumprelu: bool = False  # JumpReLU with per-feature thresholds (the ``threshold`` parameter [N])
    n_later: int = 0  # a CLT layer: its features also write into the MLP outputs of the next n_later layers
    reads: str = "mlp.in"  # what the encoder reads: the MLP's input ("mlp.in", after its norm and gain); the norm's
    # output before its gain and bias ("mlp.normalized", TransformerLens's ln2.hook_normalized); or the residual
    # stream before the norm ("resid_mid", circuit-tracer's hook_resid_mid)

    def problems(self) -> list[str]:
        bad = self._below_one("d_model", "n_features") + self._below_zero("layer", "n_later")
        bad += self._not_bool("skip", "jumprelu")
        if self.reads not in READS:
            bad.append(f"reads {self.reads!r} is not one of {', '.join(READS)}")
        k = self.top_k  # 0 or None: every feature that passes (ReLU / JumpReLU), no top-K
        if k is not None and (not isinstance(k, numbers.Integral) or k < 0 or (not bad and k > self.n_features)):
            bad.append(f"top_k {k} is not between 0 (no top-K) and its {self.n_features} features")
        return bad

    @classmethod
    def default_for(cls, adapter, layer: int = 0, expansion: int = 8, top_k: int = 32) -> "TranscoderConfig":
        return cls(d_model=adapter.d_model, n_features=expansion * adapter.d_model, top_k=top_k, layer=layer)


class Transcoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        d, N = cfg.d_model, cfg.n_features
        self.W_enc = nn.Parameter(torch.randn(N, d) / math.sqrt(d))  # [N, d]
        self.b_enc = nn.Parameter(torch.zeros(N))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone() * 0.1)  # [N, d]
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_skip = nn.Parameter(torch.zeros(d, d)) if cfg.skip else None  # y += x @ W_skip
        self.threshold = nn.Parameter(torch.zeros(N)) if cfg.jumprelu else None  # [N] JumpReLU thresholds
        # [N, n_later, d]: a CLT layer's decoders into layers layer+1 .. layer+n_later
        self.W_dec_later = nn.Parameter(torch.zeros(N, cfg.n_later, d)) if cfg.n_later else None

    def writes_into(self) -> range:
        """The layers whose MLP output the features write: their own, and a CLT layer's ``n_later`` after it."""
        return range(self.cfg.layer, self.cfg.layer + 1 + self.cfg.n_later)

    def decoder_into(self, T: int) -> torch.Tensor:
        """[N, d]: the decoder of the features into layer T's MLP output (T in `writes_into`)."""
        if T not in self.writes_into():
            raise ValueError(f"the layer-{self.cfg.layer} transcoder does not write into layer {T}")
        return self.W_dec if T == self.cfg.layer else self.W_dec_later[:, T - self.cfg.layer - 1]

    def write_norms(self) -> torch.Tensor:
        """[N]: the size of everything a feature writes per unit of activation (its decoders, into every layer)."""
        if self.W_dec_later is None:
            return self.W_dec.norm(dim=-1)
        return (self.W_dec.square().sum(-1) + self.W_dec_later.square().sum((-1, -2))).sqrt()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N] from x [..., d]."""
        return x @ self.W_enc.t() + self.b_enc

    def encode(self, x: torch.Tensor, k: int | None = None) -> SparseCode:
        """x [..., d] -> the code, values/indices [..., K] (K: ``k``, else the config's top_k; 0: every feature that
        passes, `gated_code`)."""
        k = k or self.cfg.top_k
        if self.threshold is None and k:
            return topk_relu(self.pre_activations(x), self.write_norms(), k)
        return gated_code(self.pre_activations(x), self.threshold, self.write_norms(), k)

    def decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W_dec, self.b_dec

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip connection's term x [.., d] @ W_skip [d, d] (in x's dtype); zero without one."""
        return torch.zeros_like(x) if self.W_skip is None else x @ self.W_skip.to(x.dtype)

    def decode(self, code: SparseCode, x: torch.Tensor | None = None) -> torch.Tensor:
        """y [..., d] from a code [..., K]: into this layer's MLP output only (a CLT's later decoders are
        `ReplacementModel.mlp_replacement`'s), plus the skip of x [..., d] where there is one."""
        y = decode(code, self.W_dec, self.b_dec)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a transcoder with a skip connection needs x to decode")
            y = y + self.skip(x)
        return y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        """x [..., d] -> (y [..., d], code [..., K])."""
        code = self.encode(x)
        return self.decode(code, x), code

    def jvp(self, code: SparseCode, v: torch.Tensor) -> torch.Tensor:
        """[T, d]: the Jacobian at the inputs that gave ``code`` (their active sets held, as attribution does)
        times v [T, d]: the sum over active features of (w_enc . v) w_dec, plus the skip."""
        on = (code.values > 0).to(v.dtype)
        g = torch.einsum("tkd,td->tk", self.W_enc[code.indices], v) * on
        out = torch.einsum("tk,tkd->td", g, self.W_dec[code.indices])
        return out if self.W_skip is None else out + self.skip(v)

    def vjp(self, code: SparseCode, u: torch.Tensor) -> torch.Tensor:
        """[T, d]: u [T, d] (a direction at the output) times the Jacobian at the inputs that gave ``code``
        (active sets held): the sum over active features of (w_dec . u) w_enc, plus the skip's transpose."""
        on = (code.values > 0).to(u.dtype)
        g = torch.einsum("tkd,td->tk", self.W_dec[code.indices], u) * on
        out = torch.einsum("tk,tkd->td", g, self.W_enc[code.indices])
        return out if self.W_skip is None else out + u @ self.W_skip.t()

    @torch.no_grad()
    def assign_weights(self, W_enc, b_enc, W_dec, b_dec, W_skip=None) -> None:
        """Copy in weights read from a file of another layout (replacement/foreign.py), in our orientation."""
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(b_enc)
        self.W_dec.copy_(W_dec)
        self.b_dec.copy_(b_dec)
        if W_skip is not None:
            self.W_skip.copy_(W_skip)
