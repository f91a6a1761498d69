"""Where the bundled models live: one folder per preset name inside the package.

This is all the generic engine knows of the bundled models' recipe; how they are built (their architectures,
tokenizer training, training corpora and staged training) is `replacement.lm`'s.  The token mixture they were
trained on (`replacement.data.BatchMaker`) stays generic: replacement training and dashboards draw from it too.
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
