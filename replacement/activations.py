"""Activation batches for training replacements: one model pass feeds every layer's modules.

Token sources all answer ``batch(step, batch_size) -> LongTensor [B, T]`` deterministically, so training
resumes exactly and data-parallel ranks can take disjoint rows of one global batch:

* `replacement.data.BatchMaker`: the bundled models' mixture (text, additions, repeated spans);
* `TextSource`: windows of any local text files (or ``hf:NAME`` datasets);
* `RandomTokenSource`: uniform random tokens (tests).

Activations can also be cached to disk as sharded safetensors (`cache_to_disk`) and replayed with
`ShardSource`, which then skips the model entirely.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import BadInputError
from .hooks import hook_name
from .io import make_folder, progress_bar, remove_leftovers
from .memory import gb


def hook_points(kind: str, layer: int) -> tuple[str, str]:
    """(input, target) names: Lorsa reads attn.in and predicts attn.out; transcoders read mlp.in/out."""
    part = "attn" if kind == "lorsa" else "mlp"
    return hook_name(layer, f"{part}.in"), hook_name(layer, f"{part}.out")


class RandomTokenSource:
    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, bos: int | None = None):
        self.vocab_size, self.seq_len, self.seed, self.bos = vocab_size, seq_len, seed, bos

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        ids = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), generator=g)
        if self.bos is not None:
            ids[:, 0] = self.bos
        return ids


class TextSource:
    """Random windows (BOS + seq_len-1 tokens) of tokenised text: ``files`` (their training part, or their last 2%
    with ``heldout``) or an already tokenised tensor [N]."""

    def __init__(self, tokenizer, files: list[str] | torch.Tensor, seq_len: int, seed: int = 0, heldout: bool = False):
        from .data import read_text_sources, tokenize_texts

        if isinstance(files, torch.Tensor):
            self.tokens = files
            self.describe = "tokens"
        else:
            if tokenizer is None:
                from .models import NO_TOKENIZER

                raise BadInputError(f"text files cannot be read: {NO_TOKENIZER}")
            train, held = read_text_sources(files)
            self.tokens = tokenize_texts(tokenizer, held if heldout else train)
            self.describe = "text: " + ", ".join(Path(f).name for f in files)  # recorded beside the weights
        if len(self.tokens) < seq_len:
            from .data import HELDOUT_FRACTION

            part = f"held-out part (the last {HELDOUT_FRACTION:.0%}) of the text" if heldout else "text"
            raise BadInputError(f"the {part} has {len(self.tokens)} tokens, fewer than one sequence of {seq_len}")
        from .models import start_token

        # each row starts as traced prompts do: BOS, or the stand-in of a tokenizer without one (Qwen2's)
        self.bos, self.seq_len, self.seed = start_token(tokenizer), seq_len, seed

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = self.seq_len - 1
        starts = torch.randint(0, len(self.tokens) - n, (batch_size,), generator=g)
        rows = torch.stack([self.tokens[s : s + n].long() for s in starts.tolist()])
        return torch.cat([torch.full((batch_size, 1), self.bos), rows], dim=1)


def default_source(adapter, seq_len: int = 128, seed: int = 0, heldout: bool = False, mixture=None):
    """The bundled models' training mixture when the model is a preset, windows of the recipe's corpora otherwise:
    their held-out part (shipped with the package) with ``heldout``, else the training corpora
    (`replacement.corpus.training_files`, a one-line error when absent).  A model without a tokenizer cannot
    read text: it gets uniform random tokens.  ``mixture``: the presets' row kinds (default `Mixture()`)."""
    from .corpus import heldout_texts, training_files
    from .bundle import is_preset
    from .data import BatchMaker, Mixture, addition_split, read_text_sources, tokenize_texts

    seq_len = min(seq_len, adapter.context)
    if adapter.tokenizer is None:
        return RandomTokenSource(adapter.vocab_size, seq_len, seed + (1 if heldout else 0), adapter.config.bos_token_id)
    texts = heldout_texts() if heldout else read_text_sources(training_files())[0]
    tokens = tokenize_texts(adapter.tokenizer, texts)
    if is_preset(adapter.name):
        return BatchMaker(adapter.tokenizer, tokens, addition_split()[0], mixture or Mixture(), seq_len,
                          seed + (1 if heldout else 0))
    return TextSource(adapter.tokenizer, tokens, seq_len, seed + (1 if heldout else 0))


@torch.no_grad()
def collect(adapter, ids: torch.Tensor, points: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass capturing every named point (all layers at once)."""
    return adapter.run(ids.to(adapter.device), capture=points).cache


def check_cache(folder: Path, record: dict) -> bool:
    """Whether ``folder`` holds shards made from the inputs ``record`` says (and at least its points); False if it
    holds none; BadInputError (one line) if they were made from others, or hold no ``cache.json`` (whose inputs
    cannot be known)."""
    import json

    if not any(folder.glob("shard_*.safetensors")):
        return False
    path = folder / "cache.json"
    if not path.is_file():
        raise BadInputError(f"{folder} holds activation shards but no cache.json saying what they were made from; "
                            "give --cache-activations an empty or new folder")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise BadInputError(f"{path} is not readable JSON; give --cache-activations an empty or new folder") from None
    names = {"model": "another model", "model_dtype": "the model at another --dtype",
             "text": "other text (--text, or the model's mixture)",
             "batch_size": "another --batch-size", "seq_len": "another --seq-len", "dtype": "another dtype"}
    differ = [names[k] for k in names if saved.get(k) != record[k]]
    missing = sorted(set(record["points"]) - set(saved.get("points", [])))
    if missing:
        differ.append(f"other hook points ({missing[0]} is not in it: another --what or --layers)")
    if differ:
        raise BadInputError(f"the activation cache {folder} was made from {', '.join(differ)} than this run's; give "
                            "--cache-activations another folder, or empty it")
    return True


class ShardSource:
    """Replays activations cached by `cache_to_disk`; ``acts(step)`` returns that step's dict."""

    def __init__(self, folder: str | Path):
        self.files = sorted(Path(folder).glob("shard_*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"no activation shards in {folder}")

    def acts(self, step: int) -> dict[str, torch.Tensor]:
        tensors, _ = ckpt.load(self.files[step % len(self.files)])
        return tensors


def cache_to_disk(adapter, source, points: list[str], folder: str | Path, n_batches: int, batch_size: int,
                  dtype=torch.bfloat16, progress: bool = True) -> Path:
    """Write ``n_batches`` shards of activations (one per training step) as safetensors, and ``cache.json``: what
    they hold.  A folder's shards are reused (an interrupted cache resumes) only if they hold the same: the same
    model, text, batch size, sequence length and dtype, and every hook point asked for; else one line says what
    differs (`check_cache`)."""
    import json

    from .io import atomic_write_text
    from .models import model_fingerprint

    folder = make_folder(folder, "the activation cache")
    remove_leftovers(folder)  # the temporary files of a killed caching run
    first = source.batch(0, 2)  # [2, T]: with the next, the text (as `checkpoint.run_inputs` takes it)
    record = {"model": model_fingerprint(adapter), "model_dtype": str(adapter.dtype).removeprefix("torch."),
              "text": ckpt.fingerprint([first, source.batch(1, 2)]), "batch_size": batch_size,
              "seq_len": int(first.shape[1]), "dtype": str(dtype).removeprefix("torch."), "points": sorted(points)}
    if not check_cache(folder, record):
        atomic_write_text(folder / "cache.json", json.dumps(record, indent=2))
    checked = False
    for step in progress_bar(range(n_batches), "caching activations", not progress):
        path = folder / f"shard_{step:06d}.safetensors"
        if path.is_file():
            continue  # resumable
        acts = collect(adapter, source.batch(step, batch_size), points)
        ckpt.atomic_save({k: v.to(dtype) for k, v in acts.items()}, path, {"step": step})
        if not checked:  # every shard has this one's size: refuse a cache the disk cannot hold, not fill it
            checked = True
            missing = sum(not (folder / f"shard_{s:06d}.safetensors").is_file() for s in range(step + 1, n_batches))
            need, free = missing * path.stat().st_size, shutil.disk_usage(folder).free
            if need > free:
                raise BadInputError(f"caching {n_batches} steps of activations needs about {gb(need)} more on disk, "
                                    f"more than the {gb(free)} free at {folder}; cache fewer --steps or elsewhere")
    return folder
