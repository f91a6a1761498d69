"""Training text for the bundled models: local text files, HF datasets, and synthetic lines.

Three kinds of sequence are mixed, each starting with BOS:

* ``text``: a random window of the tokenised corpus;
* ``arith``: newline-separated additions ``a + b = c`` with operands 0-99 (held-out pairs excluded);
* ``repeat``: random-token spans, each repeated, so that induction heads form quickly;
* ``natural``: a window of the corpus into which passages of itself are copied again later (a phrase or a name,
  a sentence-length passage, or a copy that starts mid-passage, after a gap of up to the whole context), so that
  the model learns to copy in natural text and not only in random-token spans.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import BadInputError
from .io import atomic_write_text

HELDOUT_FRACTION = 0.02


MAX_UNDECODED = 0.01  # the share of a text file's characters that may be bytes UTF-8 cannot decode


def read_text_sources(sources: Sequence[str]) -> tuple[list[str], list[str]]:
    """Read local text files (or ``hf:NAME[:split]`` datasets); returns (train texts, held-out texts).

    The last 2% of each source is held out.
    """
    train, heldout = [], []
    for src in sources:
        if src.startswith("hf:"):
            text = _read_hf_dataset(src[3:])
        else:
            path = Path(src)
            if path.is_dir():
                raise BadInputError(f"text source {src} is a folder; pass text files")
            if not path.is_file():
                raise FileNotFoundError(f"text source not found: {src}")
            text = path.read_text(encoding="utf-8", errors="replace")  # a stray byte in a corpus is tolerated...
            if not text.strip():
                raise BadInputError(f"text source {src} holds no text")
            undecoded, nul = text.count("\ufffd") / len(text), "\x00" in text
            if nul or undecoded > MAX_UNDECODED:  # ...a binary or non-UTF-8 file is not
                raise BadInputError(f"text source {src} is not UTF-8 text ({undecoded:.0%} of it could not be decoded"
                                    f"{', and it holds NUL bytes' if nul else ''}); pass plain text files")
        cut = int(len(text) * (1 - HELDOUT_FRACTION))
        # at a line break within the last 1% before it; a file of a few long lines (or none) is cut mid-line
        # rather than holding out a whole paragraph of it, or all of it
        cut = text.rfind("\n", cut - len(text) // 100, cut) + 1 or cut
        train.append(text[:cut])
        heldout.append(text[cut:])
    return train, heldout


def _read_hf_dataset(spec: str, max_chars: int = 50_000_000) -> str:
    """``NAME[:split]`` of an HF dataset with a ``text`` column; needs the network or a local HF cache."""
    from .errors import BadInputError

    try:
        import datasets  # optional dependency
    except ImportError:
        raise BadInputError(f"--text hf:{spec} needs the optional `datasets` package: pip install -e '.[datasets]'") from None
    name, _, split = spec.partition(":")
    parts, total = [], 0
    try:
        for row in datasets.load_dataset(name, split=split or "train", streaming=True):
            parts.append(row["text"])
            total += len(row["text"])
            if total >= max_chars:
                break
    except Exception as e:  # noqa: BLE001 - no network, no such dataset or split, no text column: one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot read --text hf:{spec}: {why}") from None
    return "\n\n".join(parts)


def tokenize_texts(tokenizer, texts: Sequence[str], chunk_chars: int = 200_000) -> torch.Tensor:
    """Tokenise texts into one flat int32 tensor (no BOS), splitting on line boundaries."""
    pieces = []
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            pieces.append(text[start:end])
            start = end
    from .io import progress_bar

    step = 64  # pieces a call: a bar on a terminal (the corpora take 10-20 s on 2 cores), one call's speed nearly
    ids = []
    for at in progress_bar(range(0, len(pieces), step), "tokenizing the text", not sys.stderr.isatty() or len(pieces) < 4 * step):
        for e in tokenizer.backend_tokenizer.encode_batch(pieces[at : at + step], add_special_tokens=False):
            ids.extend(e.ids)
    return torch.tensor(ids, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# Addition
# ---------------------------------------------------------------------------------------------------------

SHOWCASE_PAIR = (36, 62)


def addition_split(n_heldout: int = 500, seed: int = 1234) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs). Operands 0-99 for training; held-out pairs are 2-digit (10-99)
    and always include the showcase pair (36, 62). A fixed seed makes the list reproducible."""
    rng = random.Random(seed)
    two_digit = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) != SHOWCASE_PAIR]
    heldout = [SHOWCASE_PAIR] + rng.sample(two_digit, n_heldout - 1)
    held = set(heldout)
    train = [(a, b) for a in range(100) for b in range(100) if (a, b) not in held]
    return train, heldout


def save_heldout_pairs(path: str | Path, pairs: list[tuple[int, int]]) -> None:
    atomic_write_text(path, json.dumps({"format": "a + b =", "pairs": pairs}))


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Mixture:
    text: float = 0.45
    arith: float = 0.30
    repeat: float = 0.25
    repeat_gap: int = 0  # up to this many random tokens before each later copy of a span (0: copies are contiguous)
    natural: float = 0.0  # rows of corpus text holding later copies of their own passages
    short: float = 0.3  # of those copied passages, the share that are a name or short phrase (1-4 tokens)

    def weights(self) -> list[float]:
        """Row-kind probabilities; the ``natural`` kind only where used, so older recipes draw the same rows."""
        w = [self.text, self.arith, self.repeat]
        return w + [self.natural] if self.natural else w


def random_token_pool(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """[V'] the token ids random spans draw from: the tokenizer's (below ``vocab_size`` too, if given; without a
    tokenizer, every id below ``vocab_size``), its special tokens left out."""
    n = len(tokenizer) if tokenizer is not None else vocab_size
    if tokenizer is not None and vocab_size is not None:
        n = min(n, vocab_size)
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    return torch.tensor([i for i in range(n) if i not in special])


class BatchMaker:
    """Deterministic batches of token ids [B, T], each row ``BOS + ...``."""

    def __init__(self, tokenizer, train_tokens: torch.Tensor, train_pairs, mixture: Mixture, seq_len: int, seed: int):
        from .tokenizer import number_token_ids

        self.tokens = train_tokens
        self.pairs = train_pairs
        self.mix = mixture
        self.seq_len = seq_len
        self.seed = seed
        from .models import start_token

        self.bos = start_token(tokenizer)  # BOS, or the stand-in traced prompts start with
        self.bare, self.spaced = number_token_ids(tokenizer)
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        (self.plus,), (self.eq,), (self.nl,) = enc(" +"), enc(" ="), enc("\n")
        self.random_pool = random_token_pool(tokenizer)

    @property
    def describe(self) -> str:
        """The rows it makes, in words (recorded beside the weights trained on them)."""
        return "mixture: " + ", ".join(f"{k} {v}" for k, v in asdict(self.mix).items())

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rng = random.Random(self.seed * 1_000_003 + step)
        kinds = torch.multinomial(torch.tensor(self.mix.weights()), batch_size, True, generator=g)
        rows = []
        for k in kinds.tolist():
            if k == 3 and len(self.tokens) > self.seq_len:
                rows.append(self._natural_row(g, rng))
            elif k == 0 and len(self.tokens) > self.seq_len:
                rows.append(self._text_row(g))
            elif k == 1 or len(self.tokens) <= self.seq_len:
                rows.append(self._arith_row(rng))
            else:
                rows.append(self._repeat_row(g, rng))
        return torch.stack(rows)

    def _text_row(self, g) -> torch.Tensor:
        n = self.seq_len - 1
        start = int(torch.randint(0, len(self.tokens) - n, (1,), generator=g))
        return torch.cat([torch.tensor([self.bos]), self.tokens[start : start + n].long()])

    def _natural_row(self, g, rng: random.Random) -> torch.Tensor:
        """A text window with one or two of its passages copied again later in it: a name or short phrase (1-4
        tokens; ``Mixture.short`` of them), or a passage of 5-40 tokens, a third of the time copied from a point
        inside it (a partial repeat); the copy goes anywhere after the first occurrence, so gaps reach the whole
        context."""
        n = self.seq_len - 1
        row = self._text_row(g)[1:].tolist()
        for _ in range(rng.choice((1, 1, 2))):
            span = rng.randint(1, 4) if rng.random() < self.mix.short else rng.randint(5, 40)
            p = rng.randint(0, max(0, len(row) - span - 1))
            first = p + (rng.randint(1, span // 2) if span >= 6 and rng.random() < 0.33 else 0)
            q = rng.randint(p + span, max(p + span, n - 2))
            row = row[:q] + row[first : p + span] + row[q:]
        return torch.tensor([self.bos] + row[:n])

    def _arith_row(self, rng: random.Random) -> torch.Tensor:
        ids = [self.bos]
        while len(ids) < self.seq_len:  # each line starts with a bare number: "36 + 62 = 98\n"
            a, b = rng.choice(self.pairs)
            ids += [self.bare[a], self.plus, self.spaced[b], self.eq, self.spaced[a + b], self.nl]
        return torch.tensor(ids[: self.seq_len])

    def _repeat_row(self, g, rng: random.Random) -> torch.Tensor:
        ids = [self.bos]
        while len(ids) < self.seq_len:
            span_len = rng.randint(3, 30)
            span = self._random_tokens(span_len, g)
            copies = rng.choice((2, 2, 3))
            if not self.mix.repeat_gap:  # draws nothing more, so gap-0 batches are those made before gaps existed
                ids += span * copies
                continue
            # a gap of random length makes the offset between copies vary, so that only induction (match the
            # current token, copy what followed it) predicts the copy, not a head that looks a fixed distance back
            ids += span
            for _ in range(copies - 1):
                ids += self._random_tokens(rng.randint(0, self.mix.repeat_gap), g) + span
        return torch.tensor(ids[: self.seq_len])

    def _random_tokens(self, n: int, g) -> list[int]:
        return self.random_pool[torch.randint(0, len(self.random_pool), (n,), generator=g)].tolist()
