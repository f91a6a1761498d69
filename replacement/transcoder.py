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

Interoperability: circuit-tracer per-layer files (``W_enc [d_tc, d]``, ``W_dec [d_tc, d]``, ``b_enc``,
``b_dec``, optional ``W_skip``; ``config.yaml``) and Llamascopium files (``W_E [d, d_tc]``, ``b_E``,
``W_D [d_tc, d]``, ``b_D``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ForeignFormatError
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
        y = decode(code, self.W_dec, self.b_dec)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a transcoder with a skip connection needs x to decode")
            y = y + self.skip(x)
        return y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
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

    # -- foreign formats ----------------------------------------------------------------------------------

    def to_circuit_tracer(self, folder: str | Path, layer: int, model_kind: str = "transcoder_set") -> Path:
        """Write circuit-tracer's ``layer_{i}.safetensors`` and the set's ``config.yaml`` (its input hook from
        ``cfg.reads``, the output hook ``mlp.hook_out``, and ``top_k``).  A folder whose config.yaml says otherwise
        (another input, another K: circuit-tracer reads one config for every layer) is refused in one line.

        circuit-tracer has no top-K: it keeps every feature its ReLU (JumpReLU) passes, so it runs a top-K
        transcoder as a wider code than ours (a warning says so); this tool's reader applies the ``top_k`` line."""
        import warnings

        from .checkpoint import atomic_save
        from .errors import ForeignFormatError
        from .foreign import CT_INPUT_HOOKS, CT_OUTPUT_HOOKS, _read_yaml
        from .io import atomic_write_text

        folder = Path(folder)
        if self.W_skip is not None and self.cfg.reads != "mlp.in":  # what circuit-tracer (and our reader) refuse
            raise ForeignFormatError(f"a transcoder reading {self.cfg.reads} with a skip connection has no "
                                     "circuit-tracer form (a skip reads the MLP's input, mlp.hook_in)")
        hook_in = next(h for h, reads in CT_INPUT_HOOKS.items() if reads == self.cfg.reads)
        settings = {"model_kind": model_kind, "feature_input_hook": hook_in, "feature_output_hook": CT_OUTPUT_HOOKS[0]}
        if self.cfg.top_k:
            settings["top_k"] = self.cfg.top_k
        cfg_path = folder / "config.yaml"
        if cfg_path.is_file():
            there = _read_yaml(cfg_path)
            same = lambda k: there.get(k) == settings.get(k) or (  # noqa: E731  the MLP's output, by either name
                k == "feature_output_hook" and there.get(k) in CT_OUTPUT_HOOKS)
            clash = [k for k in sorted(set(settings) | {"top_k"}) if not same(k)]
            if clash:
                k = clash[0]
                raise ForeignFormatError(f"{cfg_path} has {k} {there.get(k, 'none')!r} where this transcoder needs "
                                         f"{settings.get(k, 'none')!r}: circuit-tracer reads one config for every "
                                         "layer, so write it into another folder")
        if self.cfg.top_k:
            warnings.warn(f"circuit-tracer has no top-K: it keeps every feature its activation passes, so it runs "
                          f"this K = {self.cfg.top_k} transcoder as a wider code (this tool's reader applies the "
                          "top_k line of config.yaml)", stacklevel=2)
        folder.mkdir(parents=True, exist_ok=True)
        t = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            t["W_skip"] = self.W_skip.t()  # circuit-tracer: skip = x @ W_skip.T
        if self.threshold is not None:
            t["activation_function.threshold"] = self.threshold
        path = folder / f"layer_{layer}.safetensors"
        atomic_save(t, path)
        if not cfg_path.is_file():
            atomic_write_text(cfg_path, "".join(f"{k}: {v}\n" for k, v in settings.items()))
        return path

    @classmethod
    def from_circuit_tracer(cls, folder: str | Path, layer: int, top_k: int | None = None) -> "Transcoder":
        """circuit-tracer's ``layer_{layer}.safetensors`` in ``folder``, reading the input its ``config.yaml`` names;
        ``top_k`` (else ``top_k`` in its ``config.yaml``, else none): see `from_circuit_tracer_file`."""
        from .foreign import circuit_tracer_config, reading

        folder = Path(folder)
        _, reads, k = circuit_tracer_config(folder)
        tc = cls.from_circuit_tracer_file(folder / f"layer_{layer}.safetensors", layer, k if top_k is None else top_k)
        return reading({("transcoder", layer): tc}, reads, folder)[("transcoder", layer)]

    @classmethod
    def from_circuit_tracer_file(cls, path: str | Path, layer: int, top_k: int = 0) -> "Transcoder":
        """One circuit-tracer per-layer file: ReLU, or JumpReLU where it holds ``activation_function.threshold``;
        with a skip where it holds ``W_skip`` (applied as x @ W_skip.T).  ``top_k`` > 0 keeps only the k
        strongest features; 0 keeps every feature that passes its activation (circuit-tracer's rule)."""
        from .checkpoint import load

        t, _ = load(path)
        N, d = _check_circuit_tracer_tensors(t, Path(path))
        W_skip, theta = t.get("W_skip"), t.get("activation_function.threshold")
        tc = cls(TranscoderConfig(d_model=d, n_features=N, top_k=top_k, skip=W_skip is not None, layer=layer,
                                  jumprelu=theta is not None))
        tc._assign(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], None if W_skip is None else W_skip.t())
        if theta is not None:
            with torch.no_grad():
                tc.threshold.copy_(theta.float().reshape(-1).expand(N))  # [N], [1, N] or one value
        return tc

    @classmethod
    def from_llamascope(cls, path: str | Path, top_k: int, layer: int = 0) -> "Transcoder":
        """Llamascopium layout: ``W_E [d, d_tc]``, ``b_E``, ``W_D [d_tc, d]``, ``b_D``."""
        from .checkpoint import load

        t, _ = load(path)
        tc = cls(TranscoderConfig(d_model=t["W_E"].shape[0], n_features=t["W_E"].shape[1], top_k=top_k, layer=layer))
        tc._assign(t["W_E"].t(), t["b_E"], t["W_D"], t["b_D"], None)
        return tc

    @torch.no_grad()
    def _assign(self, W_enc, b_enc, W_dec, b_dec, W_skip):
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(b_enc)
        self.W_dec.copy_(W_dec)
        self.b_dec.copy_(b_dec)
        if W_skip is not None:
            self.W_skip.copy_(W_skip)


def clt_from_circuit_tracer(folder: str | Path, top_k: int = 0) -> dict[int, Transcoder]:
    """circuit-tracer's cross-layer transcoder folder (what its ``CrossLayerTranscoder.to_safetensors`` writes),
    as one `Transcoder` per layer L (``n_later`` = n_layers - 1 - L):

        W_enc_{L}.safetensors   W_enc_{L} [N, d], b_enc_{L} [N], b_dec_{L} [d] (the bias of layer L's MLP
                                output), threshold_{L} [N] (JumpReLU; absent: ReLU)
        W_dec_{L}.safetensors   W_dec_{L} [N, n_layers - L, d]: slice j is the decoder into layer L + j

    Layers are 0 .. n_layers - 1 with no gap.  Anything missing, misshapen or not finite: ForeignFormatError."""
    import re

    from .checkpoint import load

    folder = Path(folder)
    layers = sorted(int(m.group(1)) for p in folder.glob("W_enc_*.safetensors")
                    if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)))
    if not layers:
        raise ForeignFormatError(f"{folder} holds no W_enc_<L>.safetensors files of a circuit-tracer CLT")
    n = len(layers)
    if layers != list(range(n)):
        raise ForeignFormatError(f"{folder}: the CLT's W_enc_<L>.safetensors files must be layers 0..{n - 1} with "
                                 f"no gap; found {layers}")
    out, jump = {}, None
    for L in range(n):
        enc, _ = load(folder / f"W_enc_{L}.safetensors")
        dec_path = folder / f"W_dec_{L}.safetensors"
        if not dec_path.is_file():
            raise ForeignFormatError(f"{folder} is a partial CLT: W_enc_{L}.safetensors has no W_dec_{L}.safetensors")
        dec, _ = load(dec_path)
        t = _clt_layer_tensors(enc, dec, L, n, folder)
        N, d = t["W_enc"].shape
        if jump is None:
            jump, width = "threshold" in t, (N, d)
        if ("threshold" in t) != jump or (N, d) != width:
            raise ForeignFormatError(f"{folder}: the CLT's layer {L} differs from layer 0 (features, width or "
                                     "activation); every layer must share them")
        tc = Transcoder(TranscoderConfig(d_model=d, n_features=N, top_k=top_k, layer=L, jumprelu=jump,
                                         n_later=n - 1 - L))
        W_dec = t["W_dec"]  # [N, n - L, d]
        tc._assign(t["W_enc"], t["b_enc"], W_dec[:, 0], t["b_dec"], None)
        with torch.no_grad():
            if tc.W_dec_later is not None:
                tc.W_dec_later.copy_(W_dec[:, 1:])
            if jump:
                tc.threshold.copy_(t["threshold"].float().reshape(-1).expand(N))
        out[L] = tc
    return out


def _clt_layer_tensors(enc: dict, dec: dict, L: int, n: int, folder: Path) -> dict:
    """One CLT layer's tensors under our names (W_enc, b_enc, b_dec, W_dec, threshold), checked."""
    names = {"W_enc": (enc, f"W_enc_{L}"), "b_enc": (enc, f"b_enc_{L}"), "b_dec": (enc, f"b_dec_{L}"),
             "W_dec": (dec, f"W_dec_{L}"), "threshold": (enc, f"threshold_{L}")}
    missing = [key for name, (src, key) in names.items() if key not in src and name != "threshold"]
    if missing:
        raise ForeignFormatError(f"{folder} is not a complete circuit-tracer CLT: layer {L} lacks {', '.join(missing)}")
    t = {name: src[key] for name, (src, key) in names.items() if key in src}
    N, d = t["W_enc"].shape if t["W_enc"].dim() == 2 else (-1, -1)
    want = {"W_enc": (N, d), "b_enc": (N,), "b_dec": (d,), "W_dec": (N, n - L, d)}
    for name, shape in want.items():
        if tuple(t[name].shape) != shape:
            raise ForeignFormatError(f"{folder}: the CLT's {names[name][1]} has shape {tuple(t[name].shape)}, expected "
                                     f"{shape} (a CLT of {n} layers)")
    theta = t.get("threshold")
    if theta is not None and (theta.numel() not in (1, N) or bool((theta.float() < 0).any())):
        raise ForeignFormatError(f"{folder}: threshold_{L} must be {N} values >= 0 (or one)")
    bad = [names[k][1] for k, v in t.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ForeignFormatError(f"{folder}: the CLT's {bad[0]} holds NaN or infinite values")
    return t


def _check_circuit_tracer_tensors(t: dict, path: Path) -> tuple[int, int]:
    """(n_features, d_model) of a circuit-tracer per-layer file; ForeignFormatError (one line) if a tensor is
    missing, misshapen, not finite, or a threshold is negative (JumpReLU features would then write negative
    activations, which no graph node can carry)."""
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in t]
    if missing or "log_thresholds" in t:
        what = f"lacks {', '.join(missing)}" if missing else "holds log_thresholds (not a circuit-tracer layout)"
        raise ForeignFormatError(f"{path} is not a circuit-tracer transcoder file: it {what}")
    N, d = t["W_enc"].shape if t["W_enc"].dim() == 2 else (-1, -1)
    want = {"W_enc": (N, d), "W_dec": (N, d), "b_enc": (N,), "b_dec": (d,), "W_skip": (d, d)}
    for k, shape in want.items():
        if k in t and tuple(t[k].shape) != shape:
            raise ForeignFormatError(f"{path}: {k} has shape {tuple(t[k].shape)}, expected {shape}")
    theta = t.get("activation_function.threshold")
    if theta is not None and (theta.numel() not in (1, N) or bool((theta.float() < 0).any())):
        raise ForeignFormatError(f"{path}: activation_function.threshold must be {N} values >= 0 (or one)")
    bad = [k for k, v in t.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ForeignFormatError(f"{path}: {bad[0]} holds NaN or infinite values")
    return N, d
