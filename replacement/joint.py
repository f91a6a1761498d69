"""The joint stage: every replacement module spliced into the model at once, trained to be faithful.

Per-layer training (`replacement.train`) fits each module to its own layer's output.  Spliced in together
with no error terms, small errors compound, and a module can reconstruct its layer well while missing the few
directions that later layers and the logits read.  This stage fine-tunes all modules together (end-to-end
sparse dictionary learning, Braun et al. 2024):

    loss = kl_coef x KL(real next-token distribution || the pure replacement model's)
         + recon_coef x mean over modules of FVU(module(x_clean), y_clean)

(with ``tc_token_norm``, each transcoder's FVU weighs every token's error by 1 / |y_t|^2, as per-layer training's
``--tc-token-norm`` does: the plain FVU of an MLP whose output is outsized on a few tokens is decided by those
tokens, and lets the module drift from the layer everywhere else), and with ``tc_readout_coef`` > 0

         + tc_readout_coef x logit_fvu(the last transcoder)

(`train.logit_fvu`: its error at the real model's inputs as the demeaned logits read it, through the final norm
at its clean scale).  The last MLP's output goes to the logits alone, so that error is what the graph's error node
of the last layer gives each logit directly; the KL term, measured on the pure model, would rather have the last
transcoder make up for the modules before it, which shows in the graph as that error node.  With
``tc_jacobian`` > 0

         + tc_jacobian x mean over transcoders of jacobian_error(transcoder, MLP)

(`train.jacobian_error`: the transcoder's Jacobian, active set held, against its MLP's, along random directions, or
for the last one with ``tc_jacobian_readout`` along the logit directions): the graph's edges through a layer are
the transcoder's linear map, and path patching goes through the real MLP, so that term is what they disagree by.

The pure replacement model runs every Lorsa (live patterns) and transcoder in place of its block, with no
error terms; the model's own weights stay frozen.  The reconstruction term keeps each module a dictionary of
its layer (FVU measured at the real model's inputs, BOS excluded), so the graph's error nodes stay small.

Units that stay silent for ``resample_every`` steps are re-initialised towards tokens with a large error
(dead-unit resampling): the encoder (Lorsa: the value vector) along the token's centred input, the decoder along
the module's error there at a fifth of the live units' mean norm; the encoder's size and a bias then make the unit
fire on the few tokens of the batch that project most onto it and enter the top-K at its own (units are ranked by
pre-activation x decoder norm, so a unit re-initialised small on both sides ranks at a 25th of a live one and never
fires: with that rule the Lorsa dead fractions stayed at 40-60%; scaled up without a bias, the revived units of
one resampling crowded out the live ones everywhere and the toy's KL went from 0.16 to 1.7).

As in per-layer training, modules train in normalised units (inputs and targets scaled to an average norm of
sqrt(d)); the scales are folded back at export.  Batches are a function of the step, states are saved
atomically and resume exactly, and a non-finite loss stops training with the last good state kept.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .activations import hook_points
from .data import Mixture
from .errors import CircuitsError, TrainingDiverged, last_good
from .io import postfix, progress_bar
from .evaluate import kl_per_token
from .hooks import FINAL_SCALE
from .sparse import SparseCode
from .train import (check_jacobian_options, fold_scales, fvu, jacobian_error, logit_fvu, norm_scales, readout_directions,
                    refuse_non_finite, token_normalised_fvu, warmup_then_decay)

Key = tuple[str, int]  # (kind, layer)


@dataclass
class JointConfig:
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 1e-4
    warmup: int = 50
    decay_frac: float = 0.3  # linear decay to 10% over the last 30%
    kl_coef: float = 1.0
    recon_coef: float = 0.5
    tc_token_norm: bool = False  # the transcoders' reconstruction term: `token_normalised_fvu` instead of `fvu`
    tc_readout_coef: float = 0.0  # > 0: plus this weight x the last transcoder's error as the logits read it
    tc_jacobian: float = 0.0  # > 0: plus this weight x the transcoders' mean relative Jacobian error (`jacobian_error`)
    tc_jacobian_tokens: int = 256  # tokens per step and transcoder on which the Jacobians are compared
    tc_jacobian_readout: bool = False  # the last transcoder's Jacobian along the logit directions (VJPs) instead
    grad_clip: float = 1.0
    resample_every: int = 250  # 0: never resample dead units
    resample_stop: float = 0.7  # no resampling after this fraction of the steps, so resampled units settle
    checkpoint_every: int = 50
    seed: int = 0
    # a preset's rows: natural text, text with recurring passages, additions, random-token repeats; None: the
    # model's own (`joint_mixture`: additions only for a model that was trained on them)
    mixture: Mixture | None = None

    def lr_at(self, step: int) -> float:
        return warmup_then_decay(self.lr, step, self.steps, self.warmup, self.decay_frac)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, n, d] -> [B * (n - 1), d]: every position but the first (BOS)."""
    return t[:, 1:].reshape(-1, t.shape[-1])


def _read_input(m, kind: str, x_full: torch.Tensor, tok: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """[D, d]: what unit ``units[i]`` reads at token ``tok[i]`` (an index into the BOS-less flattened batch of
    x_full [B, n, d]): a transcoder feature its input there; a Lorsa head, whose z is its value vector applied to
    the pattern-weighted input (the pattern's rows sum to 1), that weighted input under its QK group's pattern."""
    B, n, _ = x_full.shape
    b, t = tok // (n - 1), tok % (n - 1) + 1
    if kind != "lorsa":
        return x_full[b, t]
    group = units.to(tok.device) // m.cfg.heads_per_group
    A = m.patterns(x_full)  # [B, n_qk, n, n]
    return torch.einsum("ks,ksd->kd", A[b, group, t].to(x_full.dtype), x_full[b])


class JointTrainer:
    """Fine-tunes ``modules`` (raw-space modules of ``adapter``, keyed by (kind, layer)) together."""

    def __init__(self, adapter, modules: dict[Key, torch.nn.Module], cfg: JointConfig, source,
                 state_file: str | Path):
        if not modules:
            raise CircuitsError("the joint stage needs trained modules to start from")
        self.adapter, self.cfg, self.source = adapter, cfg, source
        self.state_file = Path(state_file)
        for p in adapter.model.parameters():
            p.requires_grad_(False)
        self.keys = sorted(modules)
        self.scales = norm_scales(adapter, source, self.keys, cfg.batch_size)
        self.mods = {k: fold_scales(modules[k], 1 / self.scales[k][0], 1 / self.scales[k][1]).to(adapter.device)
                     for k in self.keys}
        for m in self.mods.values():
            m.requires_grad_(True).train()
        self.named = {f"{kind}{L}.{n}": p for (kind, L), m in self.mods.items() for n, p in m.named_parameters()}
        self.inputs = ckpt.run_inputs(adapter, source, self.named)  # a saved state must come from these
        self.saved_step: int | None = None  # the step of the last state saved (or resumed from)
        self.opt = torch.optim.Adam(self.named.values(), lr=cfg.lr)
        self.fired = {k: torch.zeros(m.decoder()[0].shape[0], dtype=torch.bool) for k, m in self.mods.items()}
        self.points = sorted({p for k in self.keys for p in hook_points(*k)})
        self.last = ("transcoder", adapter.n_layers - 1)
        check_jacobian_options(cfg.tc_jacobian, cfg.tc_jacobian_readout)
        # [V, d] the logit directions, read by the readout term and the last transcoder's Jacobian term
        R = (readout_directions(adapter).to(adapter.device) if cfg.tc_readout_coef > 0 or cfg.tc_jacobian_readout
             else None)
        self.readout = R if cfg.tc_jacobian_readout else None
        self.gram = None  # [d, d] R^T R, for the readout term
        if cfg.tc_readout_coef > 0:
            if self.last not in self.mods:
                raise CircuitsError(f"the readout term needs the last layer's transcoder (layer{self.last[1]}.transcoder)")
            self.gram = R.T @ R
            self.points.append(FINAL_SCALE)
        self.step, self.elapsed, self.resampled = 0, 0.0, 0

    # -- the pure replacement model -----------------------------------------------------------------------

    def spliced_hooks(self) -> dict:
        """Hooks that replace each module's block output by the module's output on the live input."""
        live, hooks = {}, {}
        for key, m in self.mods.items():
            xn, yn = hook_points(*key)
            c_x, c_y = self.scales[key]
            hooks[xn] = lambda t, n: live.__setitem__(n, t.float())
            hooks[yn] = (lambda t, n, m=m, xn=xn, c_x=c_x, c_y=c_y:
                         (m(live[xn] * c_x)[0] / c_y).to(t.dtype))
        return hooks

    def losses(self, ids: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """KL, the mean FVU, the readout term (0 without ``tc_readout_coef``), the transcoders' mean Jacobian error
        (0 without ``tc_jacobian``; its random directions drawn from ``step``) and each module's (FVU, code, x, y,
        y_hat) on one batch [B, n]."""
        with torch.no_grad():
            clean = self.adapter.run(ids, capture=self.points)
        refuse_non_finite(clean.cache | {"logits": clean.logits}, step)
        logits = self.adapter.run(ids, hooks=self.spliced_hooks()).logits
        kl = kl_per_token(clean.logits[:, 1:], logits[:, 1:]).mean()
        per = {}
        for key, m in self.mods.items():
            xn, yn = hook_points(*key)
            c_x, c_y = self.scales[key]
            x, y = clean.cache[xn].float() * c_x, clean.cache[yn].float() * c_y
            y_hat, code = m(x)
            error = token_normalised_fvu if key[0] == "transcoder" and self.cfg.tc_token_norm else fvu
            per[key] = (error(_flat(y_hat), _flat(y)), code, x, y, y_hat)
        recon = torch.stack([v[0] for v in per.values()]).mean()
        readout = torch.zeros((), device=kl.device)
        if self.gram is not None:
            _, _, _, y, y_hat = per[self.last]
            readout = logit_fvu(_flat(y_hat), _flat(y), self.gram, clean.cache[FINAL_SCALE][:, 1:].float())
        jacobian = self.jacobian_term(per, step) if self.cfg.tc_jacobian > 0 else torch.zeros((), device=kl.device)
        return {"kl": kl, "recon": recon, "readout": readout, "jacobian": jacobian, "per": per}

    def jacobian_term(self, per: dict, step: int) -> torch.Tensor:
        """The transcoders' mean `jacobian_error` at the real model's inputs (BOS left out, active sets held as
        the graph holds them): how far each transcoder's linear map is from its MLP's Jacobian, which the graph's
        edges through that layer stand for; the last one's along the logit directions with ``tc_jacobian_readout``."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)  # resumable: a function of the step
        errors = []
        for key in self.keys:
            if key[0] != "transcoder":
                continue
            _, code, x, _, _ = per[key]
            k = code.values.shape[-1]
            flat = SparseCode(code.values[:, 1:].reshape(-1, k), code.indices[:, 1:].reshape(-1, k))
            c_x, c_y = self.scales[key]
            unit = SimpleNamespace(module=self.mods[key], c_x=c_x, c_y=c_y)
            readout = self.readout if key == self.last else None
            errors.append(jacobian_error(unit, self.adapter.mlp(key[1]), _flat(x), flat, self.cfg.tc_jacobian_tokens,
                                         gen, readout))
        return torch.stack(errors).mean()

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        ids = self.source.batch(step, cfg.batch_size).to(self.adapter.device)
        out = self.losses(ids, step)
        loss = (cfg.kl_coef * out["kl"] + cfg.recon_coef * out["recon"] + cfg.tc_readout_coef * out["readout"]
                + cfg.tc_jacobian * out["jacobian"])
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"joint loss is {loss.item()} at step {step}; stopped, {last_good(self.state_file)}"
                                   + (" (resume, or start again with --no-resume)" if self.state_file.is_file() else ""))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.named.values()), cfg.grad_clip)
        self.opt.step()
        for key, (_, code, *_rest) in out["per"].items():
            idx = code.indices[:, 1:][code.values[:, 1:] > 0]
            self.fired[key][idx.cpu()] = True
        if cfg.resample_every and (step + 1) % cfg.resample_every == 0 and step + 1 < cfg.resample_stop * cfg.steps:
            self.resample(out["per"], step)
        return {"kl": out["kl"].item(), "fvu": out["recon"].item(), "readout": out["readout"].item(),
                "jac": out["jacobian"].item()}

    # -- dead units -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def resample(self, per: dict, step: int) -> None:
        """Re-initialise the units that never fired since the last resampling (see the module docstring)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        for key, (_, _, x_full, y, y_hat) in per.items():
            dead = (~self.fired[key]).nonzero().flatten()
            self.fired[key].zero_()
            if not len(dead):
                continue
            m = self.mods[key]
            x, err = _flat(x_full), _flat(y - y_hat).float()  # [T, d] each, BOS left out
            weight = err.pow(2).sum(-1)
            # distinct tokens while there are enough: units drawn to one token would compete for its top-K
            w = weight.cpu() / weight.sum().cpu()
            tok = torch.multinomial(w, len(dead), replacement=len(dead) > int((w > 0).sum()), generator=g)
            tok = tok.to(x.device)
            # the token's input direction, centred: the residual stream's common direction would make a unit fire
            # on every token (uncentred, one resampling of pythia took its mean FVU from 0.09 to 0.49)
            xd = F.normalize(_read_input(m, key[0], x_full, tok, dead) - x.mean(0), dim=-1)  # [D, d]
            ed = F.normalize(err[tok], dim=-1)
            enc, W_dec = (m.W_V, m.W_O) if key[0] == "lorsa" else (m.W_enc, m.W_dec)
            bias = m.b_V if key[0] == "lorsa" else m.b_enc
            d = dead.to(W_dec.device)
            alive = torch.ones(len(W_dec), dtype=torch.bool, device=W_dec.device)
            alive[d] = False
            if not alive.any():
                raise TrainingDiverged(f"every unit of {key[0]} {key[1]} is dead at step {step}")
            # a JumpReLU threshold opens at 0; a cross-layer transcoder's later decoders write nothing yet
            zeroed = [p for p in (getattr(m, "threshold", None), getattr(m, "W_dec_later", None)) if p is not None]
            for p in zeroed:
                p[d] = 0.0
            enc[d], bias[d] = xd, 0.0
            W_dec[d] = ed * W_dec[alive].norm(dim=-1).mean() * 0.2
            scale, offset = self._entry(m, x_full, tok, d, alive)
            enc[d] *= scale[:, None]
            bias[d] = -scale * offset
            for p in [enc, bias, W_dec] + zeroed:
                st = self.opt.state.get(p, {})  # fresh Adam moments for the new rows
                for name in ("exp_avg", "exp_avg_sq"):
                    if name in st:
                        st[name][d] = 0.0
            self.resampled += len(dead)

    @staticmethod
    def _entry(m, x_full: torch.Tensor, tok: torch.Tensor, d: torch.Tensor, alive: torch.Tensor,
               rate: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [D], offset [D]) for the units ``d``, whose encoders are unit directions with zero bias now:
        encoder x scale and bias -scale x offset make each unit fire only where its pre-activation (linear in the
        encoder: a Lorsa head's z is its value of the pattern-weighted input) exceeds ``offset``, the top
        ``rate`` (default a fifth of K / N) of the batch's tokens, and rank at its own token ``tok`` (an index
        into the BOS-less flattened batch of x_full [B, n, d]) at 1.1 x the K-th largest rank value of the live
        units there (rank value: pre-activation x decoder norm), so that it enters the top-K where it was drawn
        without crowding out the live units elsewhere.  A negative scale flips an encoder whose token projects
        negatively."""
        pre = _flat(m.pre_activations(x_full)).float()  # [T, N]
        norms = (m.write_norms() if hasattr(m, "write_norms") else m.decoder()[0].norm(dim=-1)).float()  # [N]
        K = min(m.cfg.top_k or 1, int(alive.sum()))
        rank = torch.relu(pre[tok][:, alive] * norms[alive])  # [D, alive]
        tau = rank.topk(K, dim=-1).values[:, -1].clamp_min(1e-6)  # [D]
        sign = torch.where(pre[tok, d] < 0, -1.0, 1.0)  # [D]
        P = pre[:, d] * sign  # [T, D], each unit's own token now positive
        own = P[tok, torch.arange(len(d))]  # [D]
        rate = rate if rate is not None else 0.2 * K / pre.shape[1]
        q = P.kthvalue(max(1, math.ceil((1 - rate) * P.shape[0])), dim=0).values  # [D] (quantile caps its input)
        offset = torch.minimum(q, 0.75 * own)  # at most three quarters of the way up to its own token
        scale = 1.1 * tau / ((own - offset).clamp_min(1e-6) * norms[d])
        return scale.clamp(max=100.0) * sign, offset * sign

    # -- checkpoints and the loop ---------------------------------------------------------------------------

    def save_state(self) -> None:
        for name, p in self.named.items():
            if not torch.isfinite(p).all():
                raise TrainingDiverged(f"{name} is not finite at step {self.step}; stopped, {last_good(self.state_file)}")
        tensors = {f"param.{n}": p for n, p in self.named.items()}
        tensors.update(ckpt.optimizer_tensors(self.opt, {p: n for n, p in self.named.items()}))
        tensors.update({f"fired.{k[0]}{k[1]}": f for k, f in self.fired.items()})
        tensors["scales"] = torch.tensor([self.scales[k] for k in self.keys], dtype=torch.float64)
        meta = {"step": self.step, "elapsed_s": self.elapsed, "resampled": self.resampled,
                "config": asdict(self.cfg), "model": self.adapter.name, "inputs": self.inputs}
        ckpt.atomic_save(tensors, self.state_file, meta)
        self.saved_step = self.step

    def load_state(self) -> bool:
        return ckpt.resume(self, JointConfig(), "joint-training state")

    def _restore(self, tensors: dict, meta: dict) -> None:
        """The modules' weights, the optimizer, firing records, scales and the step, from a saved state."""
        missing = [n for n in self.named if f"param.{n}" not in tensors]
        if missing or tensors[f"param.{next(iter(self.named))}"].shape != next(iter(self.named.values())).shape:
            raise ckpt.CheckpointError(f"{self.state_file} holds other modules; start again with --no-resume")
        with torch.no_grad():
            for n, p in self.named.items():
                if tensors[f"param.{n}"].shape != p.shape:
                    raise ckpt.CheckpointError(f"{self.state_file}: {n} has another shape; start again with --no-resume")
                p.copy_(tensors[f"param.{n}"])
        ckpt.restore_optimizer(self.opt, self.named, tensors)
        for k in self.keys:
            self.fired[k] = tensors[f"fired.{k[0]}{k[1]}"].cpu().bool()
        self.scales = {k: tuple(v) for k, v in zip(self.keys, tensors["scales"].tolist())}
        self.step, self.elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        self.resampled = int(meta.get("resampled", 0))

    def train(self, resume: bool = True, progress: bool = True, stop_after: int | None = None) -> None:
        if resume and self.load_state():
            if progress:
                print(f"resuming {self.state_file} at step {self.step} of {self.cfg.steps}", file=sys.stderr)
        else:
            self.step = 0
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, stop_after)
        bar = progress_bar(range(self.step, end), "joint stage", not progress, self.cfg.steps, self.step)
        t_last, ema = time.time(), None
        with ckpt.reporting_interrupts(self) as stop:
            for step in bar:
                m = self.train_step(step)
                self.step = step + 1
                now = time.time()
                self.elapsed += now - t_last
                t_last = now
                ema = m if ema is None else {k: 0.95 * ema[k] + 0.05 * m[k] for k in m}
                shown = {k: f"{v:.3f}" for k, v in ema.items()
                         if (k != "readout" or self.gram is not None) and (k != "jac" or self.cfg.tc_jacobian > 0)}
                postfix(bar, **shown, resampled=self.resampled)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == end or stop.requested:
                    self.save_state()
                if stop.requested:
                    raise KeyboardInterrupt

    def folded_modules(self) -> dict[Key, torch.nn.Module]:
        """Copies acting on raw activations, gradients off."""
        out = {}
        for k, m in self.mods.items():
            f = fold_scales(m, *self.scales[k])
            out[k] = f.requires_grad_(False).eval()
        return out


def fit_joint(adapter, cfg: JointConfig, start_folder: str | Path | None = None, out_folder: str | Path | None = None,
              resume: bool = True, progress: bool = True, source=None, eval_source=None,
              overwrite: bool = False) -> dict[str, dict]:
    """Run the joint stage from the modules in ``start_folder`` (default: the model's replacement folder) and
    save them, with held-out metrics (on ``eval_source``, default the model's held-out data), to ``out_folder``
    (default: ``start_folder`` if given, else `store.default_train_folder`, which is the same folder but for a
    bundled preset's).  Modules another folder ``out_folder`` holds already are not replaced unless ``overwrite``
    (`store.refuse_replacing`).  Returns the metrics."""
    from .models import model_fingerprint
    from .store import (default_folder, default_train_folder, load_replacements, module_key, refuse_replacing,
                        save_modules, saved_metrics)
    from .train import evaluate_modules

    start = Path(start_folder) if start_folder else default_folder(adapter)
    out = Path(out_folder) if out_folder else start if start_folder else default_train_folder(adapter)
    modules = load_replacements(start, adapter, earlier_version=start_folder is not None)
    state = out / ".train_state.joint.safetensors"
    fp = model_fingerprint(adapter)
    if out.resolve() != start.resolve():  # refining the start folder in place is what was asked
        refuse_replacing(out, list(modules), state, resume, overwrite, fp)
    source = source or joint_source(adapter, cfg)
    trainer = JointTrainer(adapter, modules, cfg, source, state)
    trainer.train(resume=resume, progress=progress)
    folded = trainer.folded_modules()

    metrics = evaluate_modules(adapter, folded, eval_source or joint_eval_source(adapter, cfg))
    old = saved_metrics(start)
    items = []
    for (kind, L), m in folded.items():
        name = module_key(kind, L)
        prior = old.get(name, {})
        info = dict(metrics[name], joint_steps=trainer.step, joint_seconds=round(trainer.elapsed, 1),
                    joint_resampled=trainer.resampled, joint_config=asdict(cfg),
                    joint_source=getattr(source, "describe", type(source).__name__), joint_rounds=_rounds(prior))
        for k in ("train_steps", "train_seconds", "train_tokens", "train_source"):  # the per-layer stage's record
            if k in prior:
                info[k] = prior[k]
        items.append((m, kind, info))
    save_modules(items, out, fp, adapter.name)  # all or none: an interrupted save resumes from the same modules
    state.unlink(missing_ok=True)
    return metrics


def _rounds(prior: dict) -> int | None:
    """This joint round's number: one more than the starting folder's (None where that is unknown: a folder
    fine-tuned jointly before rounds were counted)."""
    if "joint_steps" not in prior:
        return 1
    return prior["joint_rounds"] + 1 if prior.get("joint_rounds") is not None else None


# a preset's joint-stage rows: 35% text, 25% additions, 15% random-token repeats, 25% recurring passages; a model
# never trained on additions gets text in their place (its replacement should not spend itself on inputs its model
# never learned to handle)
WITH_ADDITIONS = Mixture(0.35, 0.25, 0.15, natural=0.25)
WITHOUT_ADDITIONS = Mixture(0.60, 0.0, 0.15, natural=0.25)


def joint_mixture(adapter, cfg: JointConfig) -> Mixture:
    """``cfg.mixture``, or the preset's: with additions when any stage of its training had them (its
    ``training_info.json``; a preset without one is taken to have them)."""
    if cfg.mixture is not None:
        return cfg.mixture
    from .bundle import is_preset, preset_folder

    info = preset_folder(adapter.name) / "training_info.json" if is_preset(adapter.name) else None
    if info is None or not info.is_file():
        return WITH_ADDITIONS
    d = json.loads(info.read_text())
    stages = [d.get("config", {})] + [s.get("config", {}) for s in d.get("earlier_stages", [])]
    return WITH_ADDITIONS if any(s.get("mixture", {}).get("arith", 0) > 0 for s in stages) else WITHOUT_ADDITIONS


def joint_source(adapter, cfg: JointConfig, texts: list[str] | None = None):
    """The joint stage's batches: windows of ``texts`` (the first 98% of each) if given; else the preset's mixture
    (`joint_mixture`) for a preset, text windows of the training corpora otherwise."""
    from .activations import TextSource, default_source

    if texts:
        return TextSource(adapter.tokenizer, list(texts), cfg.seq_len, cfg.seed + 5)
    return default_source(adapter, cfg.seq_len, cfg.seed + 5, mixture=joint_mixture(adapter, cfg))


def joint_eval_source(adapter, cfg: JointConfig, texts: list[str] | None = None):
    """Where the joint stage measures the modules it saves: the last 2% of ``texts`` if given (the text it trained
    on; windows of the training length, as the per-layer stage's), else the model's held-out data (windows twice
    as long)."""
    from .activations import TextSource, default_source

    if texts:
        return TextSource(adapter.tokenizer, list(texts), cfg.seq_len, cfg.seed + 1, heldout=True)
    return default_source(adapter, cfg.seq_len * 2, cfg.seed, heldout=True)
