"""Reading tokens: each token as distinct text (`token_text`), and the number tokens 0-999 (`number_token_ids`)
that addition prompts are made of.  Training the bundled models' tokenizer is the recipe's
(`replacement.lm.tokenizer`)."""
from __future__ import annotations

import codecs


def number_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of "n" and " n" for n = 0..999 (raises if any is not a single token)."""
    bare, spaced = [], []
    for n in range(1000):
        for text, out in ((str(n), bare), (" " + str(n), spaced)):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"tokenizer splits {text!r} into {len(ids)} tokens; every 0-999 must be one token")
            out.append(ids[0])
    return bare, spaced


def token_text(tokenizer, token_id: int) -> str:
    """One token as text.  A token holding part of a multi-byte character (which decodes to U+FFFD alone)
    reads as its bytes, e.g. ``<0xE2>`` or ``<0xE2><0x80>``, so that distinct tokens never read the same."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece.startswith("<0x"):  # sentencepiece's byte fallback names bytes so already
        return piece
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE: one character per byte
    if not all(c in byte_of for c in piece):
        return piece
    return bytes(byte_of[c] for c in piece).decode("utf-8", errors=_HEX_BYTES)


def _hex_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in err.object[err.start : err.end]), err.end


_HEX_BYTES = "circuits-hex-bytes"
codecs.register_error(_HEX_BYTES, _hex_bytes)


def special_ids(tokenizer, vocab: int) -> list[int]:
    """The tokenizer's special tokens (padding, end of text, ...) within the unembedding's ``vocab`` rows: never
    listed in a lens, since their unembedding rows are often the longest (pythia's <|pad|> and <|endoftext|>
    top a quarter of random directions) and they say nothing about what a unit does."""
    return [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab]
