"""The example scripts (examples/*.py) as modules, for the benchmarks that measure them over many prompts.

Run a benchmark as ``python benchmarks/NAME.py``: its folder is then on sys.path, so ``from _examples import
example`` finds this file."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def example(name: str):
    """examples/<name>.py, loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
