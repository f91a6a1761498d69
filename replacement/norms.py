"""The linear parts of a normalisation layer (RMSNorm or LayerNorm) with its scale held fixed.

A LayerNorm centres its input before scaling; an RMSNorm does not.  ``centre`` is that map P (centre the last
dimension for a LayerNorm, the identity for an RMSNorm); it is its own transpose, so it also carries
gradients and read directions back through the norm."""
from __future__ import annotations

import torch


def is_layernorm(norm) -> bool:
    return isinstance(norm, torch.nn.LayerNorm)


def centre(v: torch.Tensor, layernorm: bool) -> torch.Tensor:
    """P v [..., d]: v minus its mean over the last dimension for a LayerNorm, v itself otherwise."""
    return v - v.mean(-1, keepdim=True) if layernorm else v


# norms whose gain is 1 + weight (Gemma's RMSNorm stores the offset from 1)
OFFSET_GAIN_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def norm_weight(norm) -> torch.Tensor:
    """[d] the factor the norm multiplies by (its gain: the weight, or 1 + weight for Gemma), detached, float32."""
    w = norm.weight.detach().float()
    return w + 1.0 if type(norm).__name__ in OFFSET_GAIN_NORMS else w


def norm_bias(norm) -> torch.Tensor | None:
    """[d] the norm's bias, detached, float32; None for a norm without one (RMSNorm)."""
    b = getattr(norm, "bias", None)
    return None if b is None else b.detach().float()
