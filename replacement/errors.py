"""Errors that the command line turns into one clear line (no traceback)."""


class CircuitsError(Exception):
    """Base class for user-facing errors: bad input, missing files, wrong checkpoint, diverged training."""


class ModelLoadError(CircuitsError):
    """The model name or path cannot be loaded."""


class BadInputError(CircuitsError, ValueError):
    """A prompt, option or argument that the tool cannot use."""


class TrainingDiverged(CircuitsError):
    """A loss or weight became NaN or infinite; training stopped and the last good checkpoint is kept."""


class CheckpointError(CircuitsError):
    """A checkpoint or replacements folder that is missing, corrupt, or for another model."""


class ForeignFormatError(CircuitsError, ValueError):
    """A replacement folder or file written by another tool that is corrupt, partial, or does not fit the model."""
