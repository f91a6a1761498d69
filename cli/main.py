"""`circuits`: everything except `trace` (models, train-lm, eval)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .common import FriendlyGroup, model_options


@click.group(cls=FriendlyGroup)
def circuits():
    """Replacement-model circuit tracer: train Lorsa and transcoders, evaluate, trace, patch, render."""


@circuits.command()
@click.option("--search", "search_dirs", multiple=True, type=click.Path(), help="Extra folders to scan for HF checkpoints.")
def models(search_dirs):
    """List the bundled presets and the local HF checkpoints in sight."""
    from replacement.presets import PRESETS

    click.echo("bundled presets:")
    for p in PRESETS.values():
        status = "trained" if (p.folder / "config.json").is_file() else "not trained (circuits train-lm --model " + p.name + ")"
        click.echo(f"  {p.name:<7} {p.architecture:<9} {p.n_layers} layers, d={p.d_model}, "
                   f"{p.n_heads} heads/{p.n_kv_heads} kv  {status}")
        click.echo(f"          {p.description}")
    found = _local_checkpoints([Path(d) for d in search_dirs])
    click.echo("local HF checkpoints:" + ("" if found else " none found (HF cache, ./ and --search folders)"))
    for name, where in found:
        click.echo(f"  {name}  ({where})")


def _local_checkpoints(extra: list[Path]) -> list[tuple[str, str]]:
    found = []
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            if any(repo.glob("snapshots/*/config.json")):
                found.append((repo.name[len("models--"):].replace("--", "/"), str(repo)))
    for root in [Path.cwd(), *extra]:
        if root.is_dir():
            for cfg in sorted(root.glob("*/config.json")):
                if any(cfg.parent.glob("*.safetensors")):
                    found.append((str(cfg.parent), "local folder"))
    return found


@circuits.command("train-lm")
@click.option("--model", "presets", default="all", show_default=True, help="toy, pythia, llama, or all.")
@click.option("--workdir", default="runs/bundled", show_default=True, type=click.Path(), help="Tokenizer, data cache and resumable states.")
@click.option("--text", "texts", multiple=True, help="Text files (or hf:NAME[:split]); default: ../shared/data corpora.")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's per preset).")
@click.option("--resume/--no-resume", default=True, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True, help="torch.compile the training step.")
@click.option("--export/--no-export", default=True, show_default=True, help="Write the result into the package's bundled folder.")
def train_lm(presets, workdir, texts, steps, resume, compile_, export):
    """Train the bundled language models (the project's recipe)."""
    from replacement.presets import PRESETS
    from replacement.recipe import run_recipe

    names = list(PRESETS) if presets == "all" else [presets]
    for n in names:
        if n not in PRESETS:
            raise click.BadParameter(f"unknown preset {n!r}; choose from {', '.join(PRESETS)} or all", param_hint="--model")
    for out in run_recipe(names, workdir, list(texts) or None, steps=steps, compile=compile_, export=export, resume=resume):
        click.echo(f"wrote {out}")


@circuits.command("eval")
@model_options
@click.option("--text", "texts", multiple=True, help="Held-out text files (default: ../shared/data corpora).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--samples/--no-samples", default=True, show_default=True)
def eval_cmd(model_name, device, dtype, texts, as_json, samples):
    """Metrics of a model: induction, addition, held-out text loss, samples."""
    from replacement import evaluate as ev
    from replacement.data import addition_split, read_text_sources, tokenize_texts
    from replacement.models import load_model
    from replacement.recipe import DEFAULT_SOURCES

    adapter = load_model(model_name, device, dtype)
    out = {"model": adapter.name, "induction": ev.induction_losses(adapter)}
    if adapter.tokenizer is not None:
        try:
            train_pairs, heldout = addition_split()
            out["addition_heldout"] = ev.addition_accuracy(adapter, heldout)
            out["addition_train_sample"] = ev.addition_accuracy(adapter, train_pairs[::15])
            out["showcase"] = {"prompt": "36 + 62 =", "greedy": ev.greedy_answer(adapter, "36 + 62 =")}
        except ValueError:
            pass  # a tokenizer without single-token numbers: addition is not defined
        sources = [s for s in (list(texts) or DEFAULT_SOURCES) if s.startswith("hf:") or Path(s).is_file()]
        if sources:
            _, held_text = read_text_sources(sources)
            out["heldout_text_loss"] = ev.text_loss(adapter, tokenize_texts(adapter.tokenizer, held_text))
        if samples:
            out["samples"] = {p: ev.sample(adapter, p) for p in ("The", "It is a truth", "And God said")}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    ind = out["induction"]
    click.echo(f"model {out['model']}")
    click.echo(f"  induction ({ind['span']} random tokens repeated): first copy {ind['first_copy_loss']:.2f} nats, "
               f"second copy {ind['second_copy_loss']:.2f} nats")
    if "addition_heldout" in out:
        click.echo(f"  addition a + b = (2-digit): held-out {out['addition_heldout']['accuracy']:.1%} "
                   f"of {out['addition_heldout']['n']}, training sample {out['addition_train_sample']['accuracy']:.1%} "
                   f"of {out['addition_train_sample']['n']}")
        click.echo(f"  36 + 62 = ->{out['showcase']['greedy']!r}")
    if "heldout_text_loss" in out:
        click.echo(f"  held-out text loss {out['heldout_text_loss']:.3f} nats/token")
    for p, s in out.get("samples", {}).items():
        click.echo(f"  sample: {s!r}")


if __name__ == "__main__":
    circuits()
