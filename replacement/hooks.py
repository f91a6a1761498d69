"""The names of a `ModelAdapter`'s hook points, made and checked in one place.

Every name is either global (``embed``, ``ln_final.scale``, ``ln_final.out``, ``logits``) or
``blocks.{layer}.{point}`` with a point of `BLOCK_POINTS` (shapes in `replacement.models`).  Code builds a
name with `hook_name(layer, point)`, which refuses a point that does not exist; `ModelAdapter.run` refuses a
hook or a capture under a name that the model does not have (a typo such as ``blocks.0.attn.outt`` would
otherwise change nothing, and capturing it would return nothing).
"""
from __future__ import annotations

import difflib
from typing import Iterable

from .errors import BadInputError

EMBED, FINAL_SCALE, FINAL_OUT, LOGITS = "embed", "ln_final.scale", "ln_final.out", "logits"
GLOBAL_POINTS = (EMBED, FINAL_SCALE, FINAL_OUT, LOGITS)
SANDWICH_ONLY = ("ln1_post.scale", "ln2_post.scale")  # Gemma-2's norms of the attention and MLP outputs
BLOCK_POINTS = ("resid_pre", "ln1.scale", "attn.in", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z",
                "attn.out", "resid_mid", "ln2.scale", "mlp.in", "mlp.out", "resid_post") + SANDWICH_ONLY
SEQUENTIAL_ONLY = ("resid_mid",)  # a parallel-residual block (GPT-NeoX) has no residual between its halves


class UnknownHookError(BadInputError):
    """A hook or capture name that the model does not have."""


def hook_name(layer: int, point: str) -> str:
    """``blocks.{layer}.{point}``; `UnknownHookError` if ``point`` is not one of `BLOCK_POINTS`."""
    if point not in BLOCK_POINTS:
        raise UnknownHookError(f"unknown hook point {point!r}{_suggest(point, BLOCK_POINTS)}; "
                               f"block points are {', '.join(BLOCK_POINTS)}")
    return f"blocks.{int(layer)}.{point}"


def layer_names(layers: Iterable[int], *points: str) -> list[str]:
    """``hook_name(L, p)`` for every layer and point, layer by layer."""
    return [hook_name(L, p) for L in layers for p in points]


def model_hook_names(n_layers: int, parallel_residual: bool = False, sandwich: bool = False) -> frozenset[str]:
    """Every name a model with ``n_layers`` blocks exposes (``sandwich``: Gemma-2's post-norms too)."""
    points = [p for p in BLOCK_POINTS
              if not (parallel_residual and p in SEQUENTIAL_ONLY) and (sandwich or p not in SANDWICH_ONLY)]
    return frozenset(GLOBAL_POINTS) | frozenset(layer_names(range(n_layers), *points))


def check_hook_names(names: Iterable[str], known: frozenset[str], what: str = "hook") -> None:
    """`UnknownHookError` naming the first of ``names`` that is not in ``known`` (and the closest known one)."""
    for name in names:
        if name not in known:
            raise UnknownHookError(f"unknown {what} name {name!r}{_suggest(name, known)}; "
                                   "names are embed, blocks.L.<point>, ln_final.scale, ln_final.out, logits "
                                   "(see replacement.hooks.BLOCK_POINTS)")


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["BLOCK_POINTS", "EMBED", "SANDWICH_ONLY", "FINAL_OUT", "FINAL_SCALE", "GLOBAL_POINTS", "LOGITS", "UnknownHookError",
           "check_hook_names", "hook_name", "layer_names", "model_hook_names"]
