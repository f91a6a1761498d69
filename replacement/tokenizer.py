"""Reading tokens: each token as distinct text (`token_text`), and the number tokens 0-999 (`number_token_ids`)
that addition prompts are made of.  Training the bundled models' tokenizer is the recipe's
(`replacement.lm.tokenizer`)."""
from __future__ import annotations

import codecs
import re


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


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_BYTES = re.compile(r"(<0x[0-9A-Fa-f]{2}>)+")  # a token read as its bytes (`token_text`)


def token_text(tokenizer, token_id: int) -> str:
    """One token as text.  A token holding part of a multi-byte character (which decodes to U+FFFD alone)
    reads as its bytes, e.g. ``<0xE2>`` or ``<0xE2><0x80>``, as does a sentencepiece byte-fallback token where its
    byte is a character (``<0x61>``, which is not the token ``a``), and a sentencepiece token that starts a word
    (``▁s``) with its space (`` s``, where ``s`` continues a word), so that distinct tokens never read the same.
    An id the tokenizer has no token for (a padded vocabulary: Pythia's unembedding has 50,304 rows for 50,277
    tokens) reads ``<id N>``."""
    if not 0 <= token_id < len(tokenizer):
        return f"<id {token_id}>"
    text = tokenizer.decode([token_id])
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece):  # sentencepiece's byte fallback: <0x61> is not "a"
        return piece
    if "\ufffd" not in text:  # sentencepiece's word-start mark (▁) reads as the space it is, which decode drops
        return " " + text if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" ") else text
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE: one character per byte
    if not all(c in byte_of for c in piece):
        return piece
    return bytes(byte_of[c] for c in piece).decode("utf-8", errors=_HEX_BYTES)


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[nrt\\'\"])")
_ESCAPED = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'", '"': '"'}


def unescape_printed(text: str) -> str:
    """A token as `trace` prints it between quotes (Python's escapes: ``\\n``, ``\\t``, ``\\x82``, ``\\\\``), typed
    back on a command line, as the text it stands for."""
    def one(m: re.Match) -> str:
        if m[1] in _ESCAPED:
            return _ESCAPED[m[1]]
        code = int(m[1][1:], 16)
        return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else m[0]  # no such character: as is

    return _ESCAPE.sub(one, text)


def token_by_name(tokenizer, name: str) -> int | None:
    """The token a name stands for where the name does not encode to one token: a vocabulary piece (``▁s``,
    ``Ġ98``), or a token's bytes as `token_text` prints them (``<0x82>``); None if there is none."""
    unk = tokenizer.unk_token_id
    upper = re.sub(r"<0x([0-9A-Fa-f]{2})>", lambda m: f"<0x{m[1].upper()}>", name)  # <0xc3> is <0xC3>
    candidates = [name, upper, name.replace(" ", "\u2581")]  # a sentencepiece piece as `token_text` prints it
    if re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", name):  # byte-level BPE: the bytes' characters form the piece
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        char = bytes_to_unicode()
        candidates.append("".join(char[int(h, 16)] for h in re.findall(r"<0x([0-9A-Fa-f]{2})>", name)))
    for piece in candidates:
        i = tokenizer.convert_tokens_to_ids(piece)  # the unknown token's id (or None) for a piece not in the vocabulary
        if isinstance(i, int) and i != unk and tokenizer.convert_ids_to_tokens(i) == piece:
            printed = token_text(tokenizer, i)
            if _BYTES.fullmatch(printed) and printed.upper() != name.upper():  # a byte-level piece such as "é" is
                continue  # the byte 0xE9, not the text "é" (two bytes): trace prints it <0xE9>, and so must it be named
            return i
    return None


def _hex_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in err.object[err.start : err.end]), err.end


_HEX_BYTES = "circuits-hex-bytes"
codecs.register_error(_HEX_BYTES, _hex_bytes)


def special_ids(tokenizer, vocab: int) -> list[int]:
    """The tokenizer's special tokens (padding, end of text, ...) within the unembedding's ``vocab`` rows, and the
    rows past its last token (a padded vocabulary): never listed in a lens, since special tokens' unembedding rows
    are often the longest (pythia's <|pad|> and <|endoftext|> top a quarter of random directions), padded rows
    stand for no text, and neither says anything about what a unit does."""
    if tokenizer is None:  # a model without one: token ids only
        return []
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab]
    return sorted(set(special) | set(range(len(tokenizer), vocab)))
