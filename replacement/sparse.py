"""What Lorsa and transcoders share: top-K sparse codes, decoding, and their small config base."""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class SparseCode:
    """K active units per token: values [..., K] and indices [..., K] into the dictionary."""

    values: torch.Tensor
    indices: torch.Tensor

    def dense(self, size: int) -> torch.Tensor:
        """[..., size] with zeros where a unit is inactive."""
        out = torch.zeros(*self.values.shape[:-1], size, dtype=self.values.dtype, device=self.values.device)
        return out.scatter(-1, self.indices, self.values)


def topk_relu(pre: torch.Tensor, scale: torch.Tensor, k: int) -> SparseCode:
    """a = TopK_k(ReLU(pre * scale)) / scale, as (values, indices).

    pre: [..., N] pre-activations, scale: [N] positive (the decoder norms), so units are ranked by the size
    of what they would write. Units with a non-positive pre-activation get value 0 even when selected.
    """
    ranked = torch.relu(pre * scale)
    _, idx = ranked.topk(k, dim=-1)
    vals = torch.relu(pre.gather(-1, idx))
    return SparseCode(vals, idx)


def gated_code(pre: torch.Tensor, threshold: torch.Tensor | None, scale: torch.Tensor, k: int) -> SparseCode:
    """JumpReLU (``threshold`` [N]: a = pre where pre > threshold, else 0) or ReLU (``threshold`` None), then the
    ``k`` largest a * scale; ``k`` = 0: every unit that passes (K = the most that pass in any row, at least 1;
    the rest of a row is padded with zero values).  pre: [..., N] -> values/indices [..., K]."""
    act = torch.relu(pre) if threshold is None else pre * (pre > threshold)
    if not k:
        k = max(1, int((act > 0).sum(-1).max())) if act.numel() else 1
    _, idx = (act * scale).topk(min(k, pre.shape[-1]), dim=-1)
    return SparseCode(act.gather(-1, idx), idx)


def decode(code: SparseCode, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """y = sum_k values_k W_dec[indices_k] + b_dec.  W_dec: [N, d] -> y: [..., d].

    With N/K modest (the bundled sizes) a dense product is faster on CPU than gathering K rows per token;
    for dictionaries far wider than K the gather wins."""
    if W_dec.shape[0] > 128 * code.values.shape[-1]:
        return torch.einsum("...k,...kd->...d", code.values, W_dec[code.indices]) + b_dec
    return code.dense(W_dec.shape[0]) @ W_dec + b_dec


@dataclass
class ModuleConfig:
    """Fields every replacement module records next to its weights."""

    def __post_init__(self):
        bad = self.problems()
        if bad:
            from .errors import BadInputError

            raise BadInputError(f"{type(self).__name__}: " + "; ".join(bad))

    def problems(self) -> list[str]:
        """What makes this config unusable (sizes below 1, a top-K beyond the units); none by default."""
        return []

    def _below_one(self, *names: str) -> list[str]:
        return [f"{n} must be at least 1, not {getattr(self, n)!r}" for n in names
                if not isinstance(getattr(self, n), numbers.Integral) or getattr(self, n) < 1]

    def _below_zero(self, *names: str) -> list[str]:
        return [f"{n} must be a whole number, at least 0, not {getattr(self, n)!r}" for n in names
                if not isinstance(getattr(self, n), numbers.Integral) or getattr(self, n) < 0]

    def _not_bool(self, *names: str) -> list[str]:
        return [f"{n} must be true or false, not {getattr(self, n)!r}" for n in names
                if not isinstance(getattr(self, n), bool)]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
