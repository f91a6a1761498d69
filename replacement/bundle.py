"""Where the bundled models live: one folder per preset name inside the package.

This is all the generic engine knows of the bundled models; how they are built (their architectures,
tokenizer, data mixture and training) is the recipe's, in `replacement.lm`.
"""
from __future__ import annotations

from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "bundled"
PRESET_NAMES = ("toy", "pythia", "llama")


def is_preset(name: str) -> bool:
    return name in PRESET_NAMES


def preset_folder(name: str) -> Path:
    """The HF folder of a bundled model (its replacements in ``replacements/`` inside it)."""
    return BUNDLE_DIR / name
