"""Errors that the command line turns into one clear line (no traceback)."""


class CircuitsError(Exception):
    """Base class for user-facing errors: bad input, missing files, wrong checkpoint, diverged training."""


class ModelLoadError(CircuitsError):
    """The model name or path cannot be loaded."""


class BadInputError(CircuitsError, ValueError):
    """A prompt, option or argument that the tool cannot use."""


class TrainingDiverged(CircuitsError):
    """A loss or weight became NaN or infinite; training stopped and the last good checkpoint is kept."""


def last_good(state_file) -> str:
    """How a diverged run ends its message: where the last good state is, or that there is none yet."""
    from pathlib import Path

    if Path(state_file).is_file():
        return f"last good checkpoint kept at {state_file}"
    return "no checkpoint had been saved yet, so nothing is kept"


class CheckpointError(CircuitsError):
    """A checkpoint or replacements folder that is missing, corrupt, or for another model."""


class ForeignFormatError(CircuitsError, ValueError):
    """A replacement folder or file written by another tool that is corrupt, partial, or does not fit the model."""


def run_script(main, *args, **kwargs):
    """A script's entry point (benchmarks/, examples/, docs/screenshots.py): ``main(*args, **kwargs)``, where a
    `CircuitsError` (a model, folder or file it needs is missing or unusable) ends the script in one line, not a
    traceback."""
    try:
        return main(*args, **kwargs)
    except CircuitsError as e:
        raise SystemExit(f"error: {e}") from None
