"""`trace PROMPT --model NAME`: run a prompt through a model and report what it predicts.

Attribution graphs (Lorsa + transcoders, JSON/DOT/SVG export) are added on top of this command.
"""
from __future__ import annotations

import click
import torch

from .common import FriendlyCommand, model_options


@click.command(cls=FriendlyCommand)
@click.argument("prompt")
@model_options
@click.option("--top", default=5, show_default=True, help="How many predictions to print.")
def trace(prompt, model_name, device, dtype, top):
    """Trace PROMPT through MODEL."""
    from replacement.models import load_model

    adapter = load_model(model_name, device, dtype)
    ids = adapter.tokenize(prompt)
    with torch.no_grad():
        probs = adapter.run(ids).logits[0, -1].float().softmax(-1)
    toks = [adapter.tokenizer.decode([i]) for i in ids[0].tolist()]
    click.echo(f"model {adapter.name}: {len(toks)} tokens {toks}")
    vals, idx = probs.topk(top)
    click.echo("top predictions: " + ", ".join(f"{adapter.tokenizer.decode([i])!r} {p:.3f}" for p, i in zip(vals.tolist(), idx.tolist())))


main = trace
