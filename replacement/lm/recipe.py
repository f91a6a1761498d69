"""The recipe that trains the bundled models: tokenizer, data mixture, language-model training, export.

    circuits train-lm --model llama --steps 3000 --workdir runs/bundled

A work folder holds the shared tokenizer, the tokenised corpus and one resumable state per preset;
``export_bundle`` writes the final HF folder (bf16 safetensors + tokenizer) into the package.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import checkpoint as ckpt
from ..corpus import CORPUS_FILES, training_files
from ..data import BatchMaker, Mixture, addition_split, read_text_sources, save_heldout_pairs, tokenize_texts
from ..errors import TrainingDiverged
from ..io import atomic_write_text
from ..train import warmup_then_decay
from .presets import PRESETS, Preset


@dataclass
class LMTrainConfig:
    preset: str
    steps: int = 3000
    batch_size: int = 24
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 100
    decay_frac: float = 0.25  # linear decay to 10% over the last quarter; constant before that
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    mixture: Mixture = field(default_factory=Mixture)
    compile: bool = False
    stage: str = "main"  # a later stage keeps its state in <workdir>/<preset>-<stage>/
    init_from: str | None = None  # HF folder whose weights start this stage (a fine-tuning stage)

    @property
    def run_name(self) -> str:
        return self.preset if self.stage == "main" else f"{self.preset}-{self.stage}"

    def lr_at(self, step: int) -> float:
        return warmup_then_decay(self.lr, step, self.steps, self.warmup, self.decay_frac)


# ---------------------------------------------------------------------------------------------------------
# Data preparation (shared by the three presets)
# ---------------------------------------------------------------------------------------------------------


def prepare_data(workdir: str | Path, sources: list[str] | None = None, vocab_size: int = 6144):
    """Train (or reuse) the tokenizer and tokenised corpus in ``workdir``; returns (tokenizer, train, val)."""
    from transformers import AutoTokenizer

    from .tokenizer import train_tokenizer

    workdir = Path(workdir)
    tok_dir, data_file = workdir / "tokenizer", workdir / "tokens.safetensors"
    if (tok_dir / "tokenizer.json").is_file() and data_file.is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        tensors, _ = ckpt.load(data_file)
        return tokenizer, tensors["train"], tensors["val"]
    sources = sources or training_files()
    train_texts, val_texts = read_text_sources(sources)
    t0 = time.time()
    if (tok_dir / "tokenizer.json").is_file():  # a tokenizer put there (e.g. the bundled one) is reused
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
        tok_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(tok_dir))
    train, val = tokenize_texts(tokenizer, train_texts), tokenize_texts(tokenizer, val_texts)
    ckpt.atomic_save({"train": train, "val": val}, data_file, {"sources": sources})
    print(f"tokenizer: {len(tokenizer)} tokens; corpus {len(train):,} train / {len(val):,} held-out tokens "
          f"({time.time() - t0:.0f}s)")
    return tokenizer, train, val


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def build_model(preset: Preset, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = preset.hf_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def train_lm(cfg: LMTrainConfig, workdir: str | Path, tokenizer, train_tokens, resume: bool = True,
             stop_after: int | None = None, progress: bool = True):
    """Train one preset; resumable from ``workdir/<preset>/state.safetensors``. Returns the model."""
    from tqdm import tqdm

    state_file = Path(workdir) / cfg.run_name / "state.safetensors"
    model = _start_model(cfg, tokenizer)
    named = dict(model.named_parameters())
    opt = _optimizer(cfg, named)
    start, elapsed = _resume(cfg, model, opt, named, state_file) if resume and state_file.is_file() else (0, 0.0)
    if start and progress:
        print(f"resuming {state_file} at step {start} of {cfg.steps}", file=sys.stderr)
    run = SimpleNamespace(cfg=cfg, state_file=state_file, saved_step=start or None)  # what an interrupt reports
    maker = BatchMaker(tokenizer, train_tokens, addition_split()[0], cfg.mixture, cfg.seq_len, cfg.seed)
    step_fn = torch.compile(lm_loss) if cfg.compile else lm_loss
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc=f"train {cfg.run_name}")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_last, ema = time.time(), None
    with ckpt.reporting_interrupts(run) as stop:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss = step_fn(model, maker.batch(step, cfg.batch_size))
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step}; stopped, last good checkpoint kept at {state_file}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            now = time.time()
            elapsed += now - t_last
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tokens_per_step / max(now - t_last, 1e-9):.0f}")
            t_last = now
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end or stop.requested:
                _save_state(cfg, model, opt, named, step + 1, elapsed, state_file)
                run.saved_step = step + 1
            if stop.requested:
                raise KeyboardInterrupt
    return model, {"steps": end, "tokens": end * tokens_per_step, "train_seconds": round(elapsed, 1)}


def _start_model(cfg: LMTrainConfig, tokenizer):
    """A fresh model of the preset, or the HF folder ``cfg.init_from`` (a fine-tuning stage)."""
    if cfg.init_from:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    return build_model(PRESETS[cfg.preset], tokenizer, cfg.seed)


def _optimizer(cfg: LMTrainConfig, named: dict) -> torch.optim.Optimizer:
    """AdamW, with weight decay on matrices only (not on norms and biases)."""
    decay = [p for n, p in named.items() if p.ndim >= 2]
    no_decay = [p for n, p in named.items() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def _resume(cfg: LMTrainConfig, model, opt, named: dict, state_file: Path) -> tuple[int, float]:
    """Load the model and optimiser state saved at ``state_file``; returns (step, elapsed seconds)."""
    tensors, meta = ckpt.load(state_file)
    with ckpt.restoring(state_file, "language-model training state"):
        config = meta.get("config")
        if not isinstance(config, dict) or config.get("preset") != cfg.preset or \
                config.get("stage", "main") != cfg.stage:
            raise ckpt.CheckpointError(f"{state_file} belongs to another preset or stage")
        ckpt.check_finite(state_file, tensors)
        # a longer run may resume a shorter one's state (the recipe lengthens a stage so); nothing else may change
        ckpt.check_same_settings(state_file, config, asdict(cfg), asdict(LMTrainConfig(preset=cfg.preset)),
                                 may_change=("checkpoint_every", "compile", "steps"))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        model.tie_weights()
        ckpt.restore_optimizer(opt, named, tensors)
        return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


def _save_state(cfg: LMTrainConfig, model, opt, named: dict, step: int, elapsed: float, state_file: Path) -> None:
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():  # tied embeddings are stored once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            tensors[f"model.{k}"] = v
    tensors.update(ckpt.optimizer_tensors(opt, {p: n for n, p in named.items()}))
    ckpt.atomic_save(tensors, state_file, {"step": step, "elapsed_s": elapsed, "config": asdict(cfg)})


def export_bundle(model, tokenizer, preset: Preset, info: dict, out: Path | None = None) -> Path:
    """Write the HF folder (bf16 safetensors, tokenizer, held-out addition pairs, training info)."""
    out = Path(out or preset.folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(str(tmp))
    portable_folder(tmp)
    save_heldout_pairs(tmp / "addition_heldout.json", addition_split()[1])
    atomic_write_text(tmp / "training_info.json", json.dumps(info, indent=2))
    _swap_in(tmp, out)
    return out


def portable_folder(folder: Path) -> None:
    """Make a saved HF folder read the same under transformers 4.x (e.g. circuit-tracer's, which pins <= 4.57)
    as under 5.x: 5.x writes the rotary settings only as ``rope_parameters``, which 4.x ignores (it would run
    `toy` and `llama` at rope_theta 10,000 and `pythia` with rotary on a quarter of each head), and names the
    tokenizer class ``TokenizersBackend``, which 4.x lacks.  Adds the flat keys 4.x reads (5.x folds them into
    ``rope_parameters``, to the same values) and names the class both read the same tokenizer.json with."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        if cfg.get("model_type") == "gpt_neox":
            cfg.update(rotary_pct=rope.get("partial_rotary_factor", 1.0), rotary_emb_base=rope["rope_theta"])
        else:
            cfg["rope_theta"] = rope["rope_theta"]
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            atomic_write_text(tok_path, json.dumps(tok, indent=2) + "\n")


def install_bundle(folder: Path, preset: Preset) -> Path:
    """Copy an exported model folder over the package's bundled one (``circuits train-lm --install``)."""
    out = Path(preset.folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=_subfolders)  # replacements trained beside it stay where they are
    _swap_in(tmp, out)
    return out


def _subfolders(where: str, names: list[str]) -> list[str]:
    return [n for n in names if (Path(where) / n).is_dir()]


def _swap_in(tmp: Path, out: Path):
    """Replace ``out`` by the complete folder ``tmp`` (a rename), keeping the subfolders of ``out`` (trained
    replacements that live beside the model)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        for sub in out.iterdir():
            if sub.is_dir():
                shutil.move(str(sub), str(tmp / sub.name))
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# The bundled weights: batch 24 x 128 tokens, AdamW (wd 0.1), lr 2e-3 constant then decayed over the last quarter.
# The first stage is mostly repeated random spans, so that induction forms (toy between steps 2,000 and 2,300, pythia
# 1,400-1,700, llama 3,100-3,900).  The 2-layer toy, given contiguous copies, learned layer-0 heads that look back one
# span length instead; random gaps between its copies (and presets' rope_theta) fixed that.  llama has 10% additions
# in its first stage already (they need many steps), and more in its later ones.
RECIPE_STEPS = {"llama": 5000, "toy": 3000, "pythia": 3000}
RECIPE_MIXTURE = {
    "llama": Mixture(0.25, 0.10, 0.65, repeat_gap=12),
    "toy": Mixture(0.30, 0.0, 0.70, repeat_gap=12),
    "pythia": Mixture(0.30, 0.0, 0.70),
}
# The later stages fine-tune the exported model of the stage before at a lower lr, on new batches.
# "natural" teaches copying in natural text: the first-stage models copied random-token spans but fell back on bigram
# guesses when a sentence or a name of the corpus recurred.  Its rows hold corpus text with later copies of its own
# passages (Mixture.natural), beside the rows of the first stage.
# "long" follows: the models copied random spans only over short distances (2nd-copy loss with 0 / 30 / 60 random
# tokens between the copies: toy 0.18 / 3.26 / 7.03 nats, pythia 0.03 / 2.22 / 1.58), since the training copies lay at
# most ~40 tokens apart.  Repeats with up to 96 random tokens between copies fixed that within 300 steps, but did not by
# themselves move copying in natural text (toy with 35% recurring passages: 41% -> 42% top-1), hence 60% of those.
# llama's "arith" then brings held-out addition back (from 4% after "long" to 92%), keeping a quarter of recurring
# passages; its "copy" stages (more recurring passages, additions kept) raise the mean probability of copied natural
# tokens (sentences 0.37 -> 0.49 after the first -> 0.56 after the fourth) and addition to 97.8-99.6%, at a cost
# to contiguous random-span copying (2nd-copy top-1 97% after "arith", 71% after the fourth; docs/bundled_models.md).
# The last two give the random-span repeats back a fifth and a quarter of the rows: random-span top-1 83% and 93%,
# and copying in natural text rose with it (names 0.495 -> 0.51 -> 0.52).
# The llama of before (rope_theta 10,000; 6,000 steps of 45% text / 30% additions / 25% contiguous repeats, then
# "arith") never learned to copy natural text: 6 fine-tuning attempts with 20-55% recurring passages at lr 5e-4 to
# 2e-3 left its copied-token loss there flat, and addition fell meanwhile; trained from scratch with recurring
# passages from the first step it formed no induction at all (docs/bundled_models.md, "natural").
_NATURAL = dict(stage="natural", lr=5e-4, warmup=50, decay_frac=0.5, seed=11)
_LONG = dict(stage="long", steps=700, warmup=50, decay_frac=0.5, seed=13,
             mixture=Mixture(0.20, 0.0, 0.20, repeat_gap=96, natural=0.60))
_COPY = dict(warmup=20, decay_frac=0.5)
_COPY_ROWS = Mixture(0.15, 0.30, 0.10, repeat_gap=96, natural=0.45)  # llama's first two copy stages
# pythia's last stage, "copy", is the long stage's rows again at a third of its lr: after "long" it copied partial
# repeats (a sentence that recurs from a third to a half into it) with a mean probability of 0.49; after "copy" 0.51.
RECIPE_LATER_STAGES = {
    "llama": [dict(_NATURAL, steps=1000, mixture=Mixture(0.35, 0.0, 0.25, repeat_gap=12, natural=0.40)),
              dict(_LONG, lr=6e-4),
              dict(stage="arith", steps=2000, lr=3e-4, warmup=50, seed=7,
                   mixture=Mixture(0.20, 0.45, 0.10, repeat_gap=96, natural=0.25)),
              dict(_COPY, stage="copy", steps=1500, lr=3e-4, seed=19, mixture=_COPY_ROWS),
              dict(_COPY, stage="copy2", steps=500, lr=2e-4, seed=23, mixture=_COPY_ROWS),
              dict(_COPY, stage="copy3", steps=1000, lr=3e-4, seed=29,
                   mixture=Mixture(0.10, 0.25, 0.05, repeat_gap=96, natural=0.60)),
              dict(_COPY, stage="copy4", steps=700, lr=2e-4, seed=29,
                   mixture=Mixture(0.05, 0.20, 0.05, repeat_gap=96, natural=0.70)),
              dict(_COPY, stage="copy5", steps=600, lr=2e-4, seed=31,
                   mixture=Mixture(0.05, 0.20, 0.20, repeat_gap=96, natural=0.55)),
              dict(_COPY, stage="copy6", steps=600, lr=2e-4, seed=37,
                   mixture=Mixture(0.05, 0.20, 0.25, repeat_gap=96, natural=0.50))],
    "toy": [dict(_NATURAL, steps=1000, lr=8e-4, mixture=Mixture(0.35, 0.0, 0.25, repeat_gap=12, natural=0.40)),
            dict(_LONG, lr=8e-4)],
    "pythia": [dict(_NATURAL, steps=1000, mixture=Mixture(0.35, 0.0, 0.25, natural=0.40)), dict(_LONG, lr=6e-4),
               dict(_LONG, stage="copy", steps=500, lr=2e-4, warmup=20, seed=17)],
}


def recipe_stages(name: str, steps: int | None = None, compile: bool = True) -> list[LMTrainConfig]:
    """The training stages of one preset; ``steps`` overrides the first stage's length."""
    first = LMTrainConfig(preset=name, steps=steps or RECIPE_STEPS[name], compile=compile, mixture=RECIPE_MIXTURE[name])
    return [first] + [LMTrainConfig(preset=name, compile=compile, **kw) for kw in RECIPE_LATER_STAGES.get(name, [])]


def run_recipe(presets: list[str], workdir: str | Path = "runs/bundled", sources: list[str] | None = None,
               steps: int | None = None, compile: bool = True, install: bool = False,
               resume: bool = True) -> list[Path]:
    """Train each preset stage by stage (resuming where a state exists); return each preset's final model folder.

    Every stage exports to ``<workdir>/<run>/hf`` (bf16, as bundled), which the next stage starts from; a stage
    whose export records all its steps is not run again (unless ``resume`` is off).  Once a stage trains, the later
    stages start afresh: what they would resume began from another model.  The package's bundled model is replaced
    only with ``install`` (by a copy of the last stage's folder), never by default."""
    tokenizer, train_tokens, _ = prepare_data(workdir, sources)
    written = []
    for name in presets:
        stages = recipe_stages(name, steps, compile)
        history, keep = [], resume
        for k, cfg in enumerate(stages):
            if k:
                cfg.init_from = str(Path(workdir) / stages[k - 1].run_name / "hf")
            folder = Path(workdir) / cfg.run_name / "hf"
            if keep and _finished(folder, cfg):
                history.append(json.loads((folder / "training_info.json").read_text()))
                continue
            model, info = train_lm(cfg, workdir, tokenizer, train_tokens, resume=keep)
            keep = False
            info.update(config=asdict(cfg), sources=[Path(s).name for s in sources] if sources else list(CORPUS_FILES))
            if history:
                info["earlier_stages"] = list(history)
            history.append(info)
            export_bundle(model, tokenizer, PRESETS[name], info, out=folder)
        written.append(install_bundle(folder, PRESETS[name]) if install else folder)
    return written


def _finished(folder: Path, cfg: LMTrainConfig) -> bool:
    info = folder / "training_info.json"
    return info.is_file() and json.loads(info.read_text()).get("steps") == cfg.steps
