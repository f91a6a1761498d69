"""Running the replacement trainers for a model by name, as `circuits train` does: loading the model, the
process group under ``torchrun``, text sources, and the optional on-disk activation cache.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process loads the model on its own device, streams its rows of
each global batch, and gradients are all-reduced; only rank 0 evaluates and saves.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from .io import exclusive_folder
from .joint import JointConfig
from .train import TrainConfig


def distributed_setup(device: str) -> tuple[str, int, int]:
    """(device, world size, rank): under torchrun, this process's device (``cuda:<LOCAL_RANK>`` for cuda) with
    the process group initialised (nccl on cuda, gloo on cpu); (device, 1, 0) in a plain run."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, world, rank


def text_sources(adapter, texts: list[str], cfg: TrainConfig):
    """(training, held-out) windows of text files: their first 98% and their last 2%."""
    from .activations import TextSource

    return (TextSource(adapter.tokenizer, list(texts), cfg.seq_len, cfg.seed),
            TextSource(adapter.tokenizer, list(texts), cfg.seq_len, cfg.seed + 1, heldout=True))


def cached_activations(adapter, cfg: TrainConfig, source, folder: str | Path):
    """Cache one batch of activations per training step in ``folder`` (resumable), from ``source`` or the
    model's default source; returns the `ShardSource` that replays them."""
    from .activations import ShardSource, cache_to_disk, default_source, hook_points

    layers = cfg.layers if cfg.layers is not None else range(adapter.n_layers)
    points = sorted({p for L in layers for k in cfg.kinds() for p in hook_points(k, L)})
    src = source or default_source(adapter, cfg.seq_len, cfg.seed)
    return ShardSource(cache_to_disk(adapter, src, points, folder, cfg.steps, cfg.batch_size))


def output_folder(adapter, out: str | Path | None, init_from: str | Path | None = None) -> Path:
    """The folder a training run writes to (``out``, never inside the package's bundled models; else ``init_from``, which a joint run refines in place, unless
    it is a folder of the package's, whose shipped replacements change only by `train-replacements --install`; else
    `store.default_train_folder`).  The trainers create and lock it (`io.exclusive_folder`) before they start."""
    from .bundle import BUNDLE_DIR
    from .errors import BadInputError
    from .store import default_train_folder

    if out is not None and Path(out).resolve().is_relative_to(BUNDLE_DIR.resolve()):
        raise BadInputError(f"--out {out} is inside the package's bundled models, whose shipped replacements change "
                            f"only by `circuits train-replacements --install`; choose another folder")
    if out is None and init_from is not None and not Path(init_from).resolve().is_relative_to(BUNDLE_DIR.resolve()):
        return Path(init_from)  # read before anything is written: it must exist
    return Path(out) if out is not None else default_train_folder(adapter)


def within_context(cfg, adapter):
    """(``cfg`` with its sequence length capped at the model's context, a note to print once the run's checks pass
    when a length asked for was longer, else None: it was cut without a word; the default, capped for a short
    model, is not worth a line)."""
    if cfg.seq_len <= adapter.context:
        return cfg, None
    note = None if cfg.seq_len == type(cfg)().seq_len else (
        f"note: --seq-len {cfg.seq_len} is longer than {adapter.name}'s context of {adapter.context} tokens; "
        f"training on windows of {adapter.context}")
    return replace(cfg, seq_len=adapter.context), note


def _say(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)


def train_replacements(model_name: str, cfg: TrainConfig, device: str = "cpu", dtype: str = "float32",
                       out: str | Path | None = None, resume: bool = True, texts: list[str] | None = None,
                       cache_folder: str | Path | None = None, overwrite: bool = False) -> tuple[dict[str, dict], Path]:
    """Train every module ``cfg`` asks for on ``model_name`` (``cfg.seq_len`` capped at the model's context):
    (the metrics per module on rank 0, {} on the other ranks; the folder they were saved in).  ``overwrite``:
    replace modules the folder holds already (`fit_replacements`)."""
    from .models import load_model
    from .train import check_replaceable, check_units, fit_replacements

    device, world, rank = distributed_setup(device)
    try:
        adapter = load_model(model_name, device, dtype)
        cfg, note = within_context(cfg, adapter)
        check_units(adapter, cfg)  # before the activations are cached, which can take long
        source, eval_source = text_sources(adapter, texts, cfg) if texts else (None, None)
        folder = output_folder(adapter, out)
        check_replaceable(adapter, cfg, folder, resume, overwrite)  # before the activations are cached
        _say(note)
        with exclusive_folder(folder, "the output folder", lock=rank == 0):  # a torchrun job's ranks share it
            shards = cached_activations(adapter, cfg, source, cache_folder) if cache_folder else None
            return fit_replacements(adapter, cfg, folder, resume=resume, source=source, eval_source=eval_source,
                                    activations=shards, world=world, rank=rank, overwrite=overwrite), folder
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def train_joint(model_name: str, cfg: JointConfig, device: str = "cpu", dtype: str = "float32",
                init_from: str | Path | None = None, out: str | Path | None = None, resume: bool = True,
                texts: list[str] | None = None, overwrite: bool = False) -> tuple[dict, Path]:
    """The joint stage on ``model_name`` (``cfg.seq_len`` capped at the model's context), starting from the
    modules in ``init_from`` (default: beside the model), on windows of ``texts`` (the first 98% of each) if
    given, else the model's joint mixture (`joint.joint_source`): (the metrics per module, their folder)."""
    from .joint import fit_joint, joint_eval_source, joint_source
    from .models import load_model

    adapter = load_model(model_name, device, dtype)
    cfg, note = within_context(cfg, adapter)
    folder = output_folder(adapter, out, init_from)
    _say(note)
    with exclusive_folder(folder, "the output folder"):
        return fit_joint(adapter, cfg, init_from, folder, resume=resume, source=joint_source(adapter, cfg, texts),
                         eval_source=joint_eval_source(adapter, cfg, texts), overwrite=overwrite), folder


__all__ = ["cached_activations", "distributed_setup", "output_folder", "text_sources", "train_joint",
           "train_replacements"]
