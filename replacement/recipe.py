"""The recipe that trains the bundled replacements: for each bundled model, the chain of `circuits train` runs
that made the Lorsa and transcoders in ``replacement/bundled/<model>/replacements`` (the models themselves come
from `replacement.lm.recipe`).

    circuits train-replacements --model toy --workdir runs/replacements

A chain is a list of `Stage`s, each the options of one `circuits train` run. Every stage writes a complete
replacement set into its own folder, ``<workdir>/<model>/<NN>-<name>``, and starts from the one before
(``--init-from``). A stage that retrains some modules only (``partial``) starts its folder as a copy of the one
before, so that the modules it leaves alone are carried over; one that changes a module's width (``fresh``)
trains it from scratch. A finished stage leaves a ``stage.json``; running
the chain again skips those stages and resumes the interrupted one from its checkpoint.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BadInputError
from .io import atomic_path, atomic_write_text


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]  # `circuits train` options, less --model, --init-from and --out
    partial: bool = False  # retrains some modules only: the others are carried over from the stage before
    fresh: bool = False  # the modules it trains start anew, not from the stage before's (another width)


def _joint(steps: int, resample_every: int = 0, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("--joint", "--steps", str(steps), "--batch-size", "8", "--seq-len", "64", "--lr", "2e-4",
            "--resample-every", str(resample_every), *extra)


def _joint_rounds(first: int, n: int, steps: int, resample_first: int = 0, extra: tuple[str, ...] = ()) -> list[Stage]:
    """Joint rounds ``first`` .. ``first + n - 1``, each from the last's output; resampling in the first alone;
    ``extra``: more `circuits train --joint` options for every round."""
    return [Stage(f"joint{r}", _joint(steps, resample_first if r == first else 0, extra)) for r in range(first, first + n)]


_WIDE_TC = ("--tc-expansion", "16", "--tc-top-k", "64")  # 16 x d features, K = 64 (the per-layer default: 8 x d, K = 32)
_SKIP_TC = ("--tc-skip", "--tc-token-norm", "--tc-bos-weight", "1")
_READOUT_ROUND = ("--tc-token-norm", "--recon-coef", "4", "--tc-readout-coef", "4")  # llama's last rounds

# The chains as they were run for the bundled sets (2026-12-04 to 2026-12-06); each stage's times on 2 cores.
RECIPES: dict[str, list[Stage]] = {
    "toy": [
        Stage("per-layer", ("--what", "all", "--steps", "500", "--corpora-only", "--lorsa-bos-weight", "1",
                            "--tc-bos-weight", "1", *_WIDE_TC)),  # 11 min
        *_joint_rounds(1, 3, 600, resample_first=200),  # 5-6 min a round
        Stage("skip-transcoders", ("--what", "transcoder", "--steps", "500", "--corpora-only", *_WIDE_TC, *_SKIP_TC),
              partial=True),  # 5 min
        *_joint_rounds(4, 2, 600),
        Stage("half-lorsa", ("--what", "lorsa", "--steps", "1000", "--corpora-only", "--lorsa-bos-weight", "1",
                             "--lorsa-heads-per-group", "32"), partial=True, fresh=True),  # 1,024 heads a layer; 9 min
        *_joint_rounds(6, 2, 600),
        *_joint_rounds(8, 2, 600, extra=_READOUT_ROUND),
        Stage("long-transcoders", ("--what", "transcoder", "--steps", "1000", "--corpora-only", *_WIDE_TC, *_SKIP_TC),
              partial=True),  # ~10 min (twice the 500-step stage; the run itself shared the cores)
        *_joint_rounds(10, 2, 600, extra=_READOUT_ROUND),
    ],
    "pythia": [
        Stage("per-layer", ("--what", "all", "--steps", "500", "--corpora-only")),  # 20-30 min
        *_joint_rounds(1, 3, 450, resample_first=150),  # 7-8 min a round
        Stage("wide-transcoders", ("--what", "transcoder", "--layers", "1,2,3", "--steps", "500", "--corpora-only",
                                   *_WIDE_TC, "--tc-bos-weight", "1"), partial=True, fresh=True),  # 16 min
        *_joint_rounds(4, 2, 450),
        Stage("skip-transcoder0", ("--what", "transcoder", "--layers", "0", "--steps", "500", "--corpora-only",
                                   "--tc-top-k", "64", *_SKIP_TC), partial=True),  # 4 min
        *_joint_rounds(6, 2, 450),
        Stage("skip-transcoders", ("--what", "transcoder", "--layers", "1,2,3", "--steps", "500", "--corpora-only",
                                   *_WIDE_TC, *_SKIP_TC), partial=True),  # 10 min
        *_joint_rounds(8, 2, 450),
        Stage("half-lorsa", ("--what", "lorsa", "--steps", "1000", "--corpora-only", "--lorsa-bos-weight", "1",
                             "--lorsa-heads-per-group", "32"), partial=True, fresh=True),  # 1,024 heads a layer; 16 min
        *_joint_rounds(10, 2, 450),  # 6 min a round
        *_joint_rounds(12, 2, 450, extra=_READOUT_ROUND),
    ],
    "llama": [
        Stage("per-layer", ("--what", "all", "--steps", "700")),  # 23 min
        Stage("wide-transcoder3", ("--what", "transcoder", "--layers", "3", "--steps", "800", *_WIDE_TC,
                                   "--tc-token-norm"), partial=True, fresh=True),  # 6 min
        *_joint_rounds(1, 3, 800),  # 11-15 min a round
        Stage("wide-transcoders", ("--what", "transcoder", "--layers", "0,1,2", "--steps", "700", *_WIDE_TC,
                                   "--tc-bos-weight", "1"), partial=True, fresh=True),  # 18 min
        *_joint_rounds(4, 3, 800),
        Stage("skip-transcoders", ("--what", "transcoder", "--layers", "2,3", "--steps", "600", "--corpora-only",
                                   *_WIDE_TC, *_SKIP_TC), partial=True),  # 7 min
        *_joint_rounds(7, 3, 800, extra=("--tc-token-norm",)),  # 12-13 min a round
        *_joint_rounds(10, 1, 800, extra=("--tc-token-norm", "--recon-coef", "2")),
        *_joint_rounds(11, 1, 800, extra=("--tc-token-norm", "--recon-coef", "4")),
        *_joint_rounds(12, 2, 800, extra=_READOUT_ROUND),
        *_joint_rounds(14, 1, 1600, extra=_READOUT_ROUND),  # twice as long: 21-28 min
        # the same with every transcoder's Jacobian matched to its MLP's (the last along the logit directions)
        *_joint_rounds(15, 1, 800, extra=(*_READOUT_ROUND, "--tc-jacobian", "0.5", "--tc-jacobian-readout")),  # 15 min
    ],
}


def stage_folders(model: str, stages: list[Stage], workdir: str | Path) -> list[Path]:
    """Each stage's output folder, ``<workdir>/<model>/<NN>-<name>``."""
    return [Path(workdir) / model / f"{i:02d}-{s.name}" for i, s in enumerate(stages, 1)]


def run_stages(model: str, stages: list[Stage], workdir: str | Path, train: Callable[[list[str]], None],
               echo: Callable[[str], None] = print) -> Path:
    """Run ``stages`` on ``model`` in order, skipping finished ones; ``train(argv)`` runs `circuits train` with
    those arguments. Returns the last stage's folder (the finished replacement set)."""
    if not stages:
        raise BadInputError(f"the recipe for {model} has no stages")
    prev: Path | None = None
    for i, (stage, out) in enumerate(zip(stages, stage_folders(model, stages, workdir)), 1):
        done = out / "stage.json"
        if done.is_file():
            echo(f"stage {i}/{len(stages)} {stage.name}: done before ({out})")
        else:
            if stage.partial and prev is None:
                raise BadInputError(f"stage {stage.name} retrains some modules only: it needs a stage before it")
            if stage.partial and not (out / "config.json").is_file():
                copy_set(prev, out)  # not yet copied (an interrupted stage keeps what it has)
            start = prev is not None and not stage.fresh
            argv = ["--model", model, *stage.args, "--out", str(out)] + (["--init-from", str(prev)] if start else [])
            if stage.partial and "--joint" not in stage.args:
                argv.append("--overwrite")  # the modules it retrains were copied in from the stage before
            echo(f"stage {i}/{len(stages)} {stage.name}: circuits train {' '.join(argv)}")
            train(argv)
            atomic_write_text(done, json.dumps({"stage": stage.name, "argv": argv}, indent=2))
        prev = out
    return prev


def copy_set(src: Path, out: Path) -> None:
    """Copy a replacement set's module files, then its config.json, into ``out``, each file atomically: a folder
    with a config.json holds the whole set."""
    for f in sorted(src.glob("*.safetensors")) + [src / "config.json"]:
        if not f.name.startswith("."):  # training states are not part of the set
            with atomic_path(out / f.name) as tmp:
                shutil.copyfile(f, tmp)


__all__ = ["RECIPES", "Stage", "copy_set", "run_stages", "stage_folders"]
