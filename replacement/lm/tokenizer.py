"""Byte-level BPE tokenizer for the bundled models.

Every integer 0-999 is a single token, both bare ("98") and with a leading space (" 98"), as in Llama-3,
so each operand of ``36 + 62 =`` is one token and so is the answer `` 98``.  Longer digit runs are split
into groups of at most three digits before BPE sees them.

The number tokens are guaranteed by seeding the tokenizer's training text with every number; the
function checks the guarantee after training and fails loudly if BPE did not produce them.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from ..errors import BadInputError
from ..tokenizer import number_token_ids

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"

# GPT-2's pre-tokenizer pattern, with digit runs capped at three characters.
PRETOKEN_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)


def _number_seed_lines(copies: int) -> Iterator[str]:
    """Lines holding every number 0-999, bare and space-prefixed, `copies` times each."""
    numbers = [str(n) for n in range(1000)]
    for _ in range(copies):
        for i in range(0, 1000, 20):
            chunk = numbers[i : i + 20]
            yield "".join(" " + n for n in chunk) + "\n"
            yield "\n".join(chunk) + "\n"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6144, number_copies: int = 2000):
    """Train a byte-level BPE tokenizer; returns a `transformers.PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus() -> Iterator[str]:
        yield from _number_seed_lines(number_copies)
        yield from texts

    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    try:
        check_number_tokens(fast)
    except ValueError as e:
        raise BadInputError(f"the tokenizer trained on this text cannot be used ({e}); train-lm needs far more text "
                            "(the recipe's corpora are 28 MB)") from None
    return fast


def check_number_tokens(tokenizer) -> None:
    number_token_ids(tokenizer)
    for text in (" +", " ="):
        if len(tokenizer.encode(text, add_special_tokens=False)) != 1:
            raise ValueError(f"tokenizer splits {text!r}; train it on text that contains additions")
