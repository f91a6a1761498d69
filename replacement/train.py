"""One training engine for Lorsa and transcoders.

Every step runs the model once, capturing each layer's attention and MLP input/output, and feeds all the
modules being trained (``--what all`` trains every Lorsa and transcoder of the model in one pass over the
data).  Inputs and targets are normalised by dataset-wide average norms, estimated before training; the
scales are folded back into the weights at export, so saved modules act on raw activations.  The BOS
position is read (it is a key for attention) but left out of every loss and metric: its activations are
outliers.

Adam, linear warmup, constant then linear decay, gradient clipping, optional K annealing, an AuxK loss that
revives dead units, bf16 autocast on CUDA, periodic atomic checkpoints, exact ``--resume``, NaN detection,
and data-parallel training under ``torchrun`` (each rank takes its rows of the global batch; gradients are
all-reduced).
"""
from __future__ import annotations

import copy
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .activations import hook_points
from .norms import centre, is_layernorm, norm_weight
from .errors import BadInputError, CircuitsError, TrainingDiverged, last_good
from .io import postfix, progress_bar
from .lorsa import LorsaConfig, lorsa_for_model
from .memory import check_fits
from .sparse import SparseCode, decode, topk_relu
from .transcoder import Transcoder, TranscoderConfig


def warmup_then_decay(lr: float, step: int, steps: int, warmup: int, decay_frac: float) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps, constant, then a linear decay to 10%
    over the last ``decay_frac`` of the ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    start = int(steps * (1 - decay_frac))
    return lr if step < start else lr * (1 - 0.9 * (step - start) / max(1, steps - start))


@dataclass
class TrainConfig:
    what: str = "all"  # lorsa | transcoder | all
    layers: list[int] | None = None  # default: every layer
    steps: int = 1500
    batch_size: int = 16  # sequences per step (the global batch under torchrun)
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 50
    decay_frac: float = 0.3
    grad_clip: float = 1.0
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 100_000
    k_start_mult: float = 1.0  # > 1: anneal K from k_start_mult * K down to K over the first 30% of steps
    checkpoint_every: int = 100
    seed: int = 0
    norm_batches: int = 4
    # Lorsa
    lorsa_qk_per_head: int = 4  # n_qk = lorsa_qk_per_head x the model's heads
    lorsa_heads_per_group: int = 64
    lorsa_d_qk: int | None = None  # default: the model's head dimension
    lorsa_top_k: int = 64
    lorsa_init: str = "model"  # model | random
    lorsa_bos_weight: float = 0.0  # > 0: position 0's relative error joins the loss at this weight (lorsa_loss)
    lorsa_freq_penalty: float = 0.0  # > 0: `frequency_penalty` on heads firing on more than lorsa_freq_target
    lorsa_freq_target: float = 0.2  # of the tokens (an average over recent steps)
    allow_weak_config: bool = False
    # transcoders
    tc_expansion: int = 8
    tc_top_k: int = 32
    tc_skip: bool = False
    tc_jacobian: float = 0.0  # > 0: also match the MLP's Jacobian (JVPs along random directions), this weight
    tc_jacobian_tokens: int = 256  # tokens per step on which the JVPs are taken
    tc_jacobian_readout: bool = False  # the last layer's Jacobian term: VJPs along the logit directions instead
    tc_token_norm: bool = False  # weigh each token's error by 1 / |y_t|^2 (see token_normalised_mse)
    tc_bos_weight: float = 0.0  # > 0: position 0's relative error joins the loss at this weight (bos_term)
    init_from: str | None = None  # a replacements folder of this model: start each module from its saved one

    def kinds(self) -> list[str]:
        if self.what not in ("lorsa", "transcoder", "all"):
            raise CircuitsError(f"--what must be lorsa, transcoder or all, not {self.what!r}")
        return ["lorsa", "transcoder"] if self.what == "all" else [self.what]

    def lr_at(self, step: int) -> float:
        return warmup_then_decay(self.lr, step, self.steps, self.warmup, self.decay_frac)

    def k_at(self, k: int, step: int) -> int:
        if self.k_start_mult <= 1:
            return k
        frac = max(0.0, 1 - step / max(1, 0.3 * self.steps))
        return int(round(k * (1 + (self.k_start_mult - 1) * frac)))


class Unit:
    """One module being trained, with its optimiser, normalisation scales and dead-unit counters."""

    def __init__(self, kind: str, layer: int, module: torch.nn.Module, lr: float):
        self.kind, self.layer, self.module = kind, layer, module
        self.name = f"{kind}{layer}"
        self.opt = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.999))
        n_units = module.decoder()[0].shape[0]
        self.since_fired = torch.zeros(n_units, dtype=torch.long)
        self.freq = torch.zeros(n_units)  # each unit's firing frequency, a running average over steps (FREQ_DECAY)
        self.c_x = self.c_y = 1.0

    def forward(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, SparseCode, torch.Tensor]:
        """(y_hat [.., d], code, pre-activations) in normalised space."""
        pre = self.module.pre_activations(x)
        W, b = self.module.decoder()
        code = topk_relu(pre, W.norm(dim=-1), k)
        y = decode(code, W, b)
        if self.kind == "transcoder" and self.module.W_skip is not None:
            y = y + self.module.skip(x)
        return y, code, pre


BYTES_PER_TRAINED_PARAMETER = 16  # its float32 weight, gradient and Adam's two moments


# `circuits train`'s option for each module config field, to name in errors ("TranscoderConfig: top_k ..." said
# nothing of --tc-top-k)
_OPTION_OF = {"TranscoderConfig": {"top_k": "--tc-top-k", "n_features": "features (--tc-expansion)"},
              "LorsaConfig": {"top_k": "--lorsa-top-k", "n_qk": "--lorsa-qk-per-head x heads", "d_qk": "--lorsa-d-qk",
                              "heads_per_group": "--lorsa-heads-per-group"}}


def _new_module(adapter, cfg: TrainConfig, kind: str, L: int):
    """A fresh module of ``kind`` for layer ``L`` as ``cfg`` asks (built on the current default device); a config
    that cannot be is a one-line error in the options' words."""
    try:
        return _build_module(adapter, cfg, kind, L)
    except BadInputError as e:
        cls, _, why = str(e).partition(": ")
        if cls not in _OPTION_OF:
            raise
        for field_name, option in _OPTION_OF[cls].items():
            why = re.sub(rf"\b{field_name}\b", option, why)
        raise BadInputError(f"layer {L}'s {kind}: {why}") from None


def _build_module(adapter, cfg: TrainConfig, kind: str, L: int):
    if not 0 <= L < adapter.n_layers:
        raise CircuitsError(f"layer {L} does not exist; the model has {adapter.n_layers} layers")
    if kind == "lorsa":
        lc = LorsaConfig.default_for(adapter, L, cfg.lorsa_heads_per_group, cfg.lorsa_qk_per_head, cfg.lorsa_top_k)
        if cfg.lorsa_d_qk:
            lc.d_qk = cfg.lorsa_d_qk
        try:
            return lorsa_for_model(adapter, L, lc, allow_weak=cfg.allow_weak_config)
        except ValueError as e:
            raise CircuitsError(str(e)) from None
    tc = TranscoderConfig.default_for(adapter, L, cfg.tc_expansion, cfg.tc_top_k)
    tc.skip = cfg.tc_skip
    return Transcoder(tc)


def check_units(adapter, cfg: TrainConfig) -> None:
    """Every module ``cfg`` asks for, built on the meta device (no memory, no data read): each config checked,
    and the training's parameter memory against the budget (`replacement.memory`), in one line before anything
    runs (a per-layer run caches its activations first)."""
    with torch.device("meta"):
        modules = [_new_module(adapter, cfg, kind, L) for L in _layers(adapter, cfg) for kind in cfg.kinds()]
    n = sum(p.numel() for m in modules for p in m.parameters())
    check_fits(BYTES_PER_TRAINED_PARAMETER * n, f"training {len(modules)} modules of {n:,} parameters",
               "train fewer Lorsa heads (--lorsa-heads-per-group, --lorsa-qk-per-head) or transcoder features "
               "(--tc-expansion), or fewer --layers", detail=" (weights, gradients and Adam's moments)")
    tokens = cfg.batch_size * cfg.seq_len
    check_fits(BYTES_PER_TRAINED_PARAMETER * n + activation_floor(adapter, modules, tokens),
               f"a step of --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}", "use a smaller --batch-size or "
               "--seq-len", detail=" (the modules' training state, and one float per token per unit the step computes at "
               "least)")


def activation_floor(adapter, modules, tokens: int) -> int:
    """A lower bound of the bytes one training step's activations take: one float32 per token for each hidden
    unit of every module (a transcoder's features; a Lorsa's heads and its queries and keys) and for the model's
    residual stream at each layer's four hook points."""
    width = 4 * adapter.d_model * adapter.n_layers
    for m in modules:
        c = m.cfg
        width += c.n_features if hasattr(c, "n_features") else c.n_heads + 2 * c.n_qk * c.d_qk
    return 4 * tokens * width


def _layers(adapter, cfg: TrainConfig) -> list[int]:
    return cfg.layers if cfg.layers is not None else list(range(adapter.n_layers))


def build_units(adapter, cfg: TrainConfig) -> list[Unit]:
    check_units(adapter, cfg)
    units = []
    for L in _layers(adapter, cfg):
        torch.manual_seed(cfg.seed * 1000 + L)
        for kind in cfg.kinds():
            units.append(Unit(kind, L, _new_module(adapter, cfg, kind, L).to(adapter.device), cfg.lr))
    return units


def _points(units: list[Unit]) -> list[str]:
    return sorted({p for u in units for p in hook_points(u.kind, u.layer)})


def refuse_non_finite(acts: dict[str, torch.Tensor], step: int) -> None:
    """TrainingDiverged naming the first of the model's own ``acts`` that holds NaN or infinite values on step
    ``step``'s batch: the model's, not its replacements' (every resume would meet it again)."""
    bad = next((k for k, v in acts.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise TrainingDiverged(f"the model's own {bad} is not finite on step {step}'s batch (NaN or infinite "
                               "activations of the model itself, not of its replacements): check the model's "
                               "weights and dtype; no module was trained on it")


def _xy(unit: Unit, acts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (x, y): [B, n, d] for Lorsa (whole sequences), [tokens, d] without BOS for transcoders."""
    xn, yn = hook_points(unit.kind, unit.layer)
    x, y = acts[xn].float() * unit.c_x, acts[yn].float() * unit.c_y
    if unit.kind == "transcoder":
        x, y = x[:, 1:].reshape(-1, x.shape[-1]), y[:, 1:].reshape(-1, y.shape[-1])
    return x, y


def _bos_xy(unit: Unit, acts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (x, y) [B, d] at position 0 (BOS)."""
    xn, yn = hook_points(unit.kind, unit.layer)
    return acts[xn][:, 0].float() * unit.c_x, acts[yn][:, 0].float() * unit.c_y


def _drop_bos(unit: Unit, t: torch.Tensor) -> torch.Tensor:
    return t[:, 1:].reshape(-1, t.shape[-1]) if unit.kind == "lorsa" else t


def bos_term(y_hat0: torch.Tensor, y0: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Position 0's (BOS's) error y_hat0, y0 [B, d]: its squared error relative to its own size, times ``scale``
    (the other positions' mean square, so that weight 1 counts it like their MSE).  BOS outputs are outsized, so a
    plain MSE would spend the module on them; left out of the loss, the module's output there is arbitrary, and
    every later position reads it (in the pure replacement, llama's layer-0 Lorsa alone then cost 0.71 nats)."""
    rel = (y_hat0 - y0).pow(2).sum(-1).mean() / y0.pow(2).sum(-1).mean().clamp_min(1e-12)
    return rel * scale.detach()


FREQ_DECAY = 0.99  # the running average of firing frequencies takes 1% of each step's (the first step's whole)


def frequency_penalty(code: SparseCode, w_norm: torch.Tensor, freq: torch.Tensor, target: float,
                      y: torch.Tensor) -> torch.Tensor:
    """sum_h max(0, f_h / target - 1) x mean_t a_t^h |w_o^h|, over mean_t |y_t|.

    code: [T, K] active units per token, w_norm [N] decoder norms, freq [N] firing frequencies (held fixed),
    y [T, d] the targets.  What the units that fire on more than ``target`` of the tokens write, weighted by how
    far over it they are and relative to the target's size: it lowers those units' outputs, so they lose more of
    the top-K contests to others, which then take part of a dense unit's direction each (a Lorsa writes its layer's
    most common directions with a few heads that fire on nearly every token and fill most of its K slots, and the
    rest of its heads then rarely or never fire)."""
    over = torch.relu(freq.to(w_norm.device) / target - 1)
    size = code.values * (w_norm * over)[code.indices]  # [T, K]
    return size.sum(-1).mean() / y.norm(dim=-1).mean().clamp_min(1e-12)


def lorsa_loss(y_hat: torch.Tensor, y: torch.Tensor, bos_weight: float = 0.0) -> torch.Tensor:
    """A Lorsa's reconstruction loss on whole sequences y_hat, y [B, n, d]: the mean squared error at positions
    1.., plus, with ``bos_weight`` > 0, ``bos_weight`` x `bos_term` of position 0."""
    rest = (y_hat[:, 1:] - y[:, 1:]).pow(2).mean()
    if bos_weight <= 0:
        return rest
    return rest + bos_weight * bos_term(y_hat[:, 0], y[:, 0], y[:, 1:].pow(2).mean())


def jacobian_error(unit: Unit, mlp: torch.nn.Module, x: torch.Tensor, code: SparseCode, n_tokens: int,
                   generator: torch.Generator, readout: torch.Tensor | None = None) -> torch.Tensor:
    """Relative error of the transcoder's Jacobian against the MLP's on ``n_tokens`` tokens of x [T, d]
    (normalised space), one random direction per token:
      JVPs  sum ||J_tc v - J_mlp v||^2 / sum ||J_mlp v||^2, v Gaussian at the input, or, given ``readout`` [R, d],
      VJPs  the same with u J (u = xi @ readout, xi Gaussian [R]): only the output directions downstream reads.
    In normalised units the MLP is y_n = c_y mlp(x_n / c_x), so its Jacobian is c_y / c_x J_mlp."""
    sub = torch.randperm(len(x), generator=generator)[:n_tokens].to(x.device)
    d = x.shape[-1]
    v = torch.randn(len(sub), d if readout is None else len(readout), generator=generator).to(x)
    sub_code = SparseCode(code.values[sub], code.indices[sub])
    with torch.no_grad():
        dtype = next(mlp.parameters()).dtype
        x_in = (x[sub] / unit.c_x).to(dtype)
        if readout is None:
            _, jm = torch.func.jvp(mlp, (x_in,), ((v / unit.c_x).to(dtype),))
        else:
            v = v @ readout.to(v)  # [n, d] output directions
            jm = torch.func.vjp(mlp, x_in)[1](v.to(dtype))[0] / unit.c_x
        jm = jm.float() * unit.c_y
    jt = unit.module.jvp(sub_code, v) if readout is None else unit.module.vjp(sub_code, v)
    return (jt - jm).pow(2).sum() / jm.pow(2).sum().clamp_min(1e-12)


def check_jacobian_options(weight: float, readout: bool) -> None:
    """The Jacobian term's options, as both training stages take them: the readout variant needs a weight."""
    if readout and weight <= 0:
        raise CircuitsError("--tc-jacobian-readout needs a Jacobian weight: --tc-jacobian W with W > 0")


def readout_directions(adapter) -> torch.Tensor:
    """[V, d]: the directions in which the logits (demeaned) read the last residual stream through the final
    norm's weight: (W_U[v] - mean W_U) * w, centred over d for a LayerNorm."""
    W = adapter.unembedding.weight.detach().float()
    D = W - W.mean(0)
    D = D if getattr(adapter.final_norm, "weight", None) is None else D * norm_weight(adapter.final_norm)
    return centre(D, is_layernorm(adapter.final_norm))


def token_normalised_mse(y_hat: torch.Tensor, y: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """MSE over tokens [N, d] with each token's error weighted by m / (|y_t|^2 + floor m), m = mean |y_t|^2:
    a relative error per token (the floor keeps near-zero outputs from dominating), on the plain MSE's scale.
    Plain MSE lets the tokens with the largest outputs decide; this lets a small output count as much."""
    norm2 = y.pow(2).sum(-1)  # [N]
    m = norm2.mean().detach()
    weight = m / (norm2.detach() + floor * m)
    return ((y_hat - y).pow(2).sum(-1) * weight).mean() / y.shape[-1]


def fvu(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over tokens [N, d]."""
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)


def logit_fvu(y_hat: torch.Tensor, y: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The last MLP's reconstruction error as the logits read it, as a fraction of what its output moves them.

    y_hat, y [N, d]: the module's output and the MLP's, added to the residual stream the final norm reads;
    gram [d, d] = R^T R with R [V, d] the demeaned logit directions (`readout_directions`); scale [N]: the final
    norm's divisor at each token (the clean run's, frozen).  With e = y - y_hat and c = y - mean(y):

        sum_t |R e_t|^2 / s_t^2  /  sum_t |R c_t|^2 / s_t^2

    (|R e_t| / s_t: the change of the demeaned logits at token t if e_t were added to the residual stream).
    Invariant to a common rescaling of y and y_hat, so it can be taken in normalised units."""
    w = scale.reshape(-1).pow(-2)
    e, c = y - y_hat, y - y.mean(0)
    return (((e @ gram) * e).sum(-1) @ w) / (((c @ gram) * c).sum(-1) @ w).clamp_min(1e-12)


def token_normalised_fvu(y_hat: torch.Tensor, y: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """`token_normalised_mse` on the FVU's scale (divided by the variance per coordinate): `fvu` / (1 + floor)
    where every token's output has the same norm; tokens [N, d]."""
    return token_normalised_mse(y_hat, y, floor) * y.shape[-1] / (y - y.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


class Trainer:
    def __init__(self, adapter, cfg: TrainConfig, source, state_file: str | Path, world: int = 1, rank: int = 0,
                 activations=None):
        self.adapter, self.cfg, self.source = adapter, cfg, source
        self.state_file = Path(state_file)
        self.world, self.rank = world, rank
        if cfg.batch_size % world:
            raise CircuitsError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
        self.activations = activations  # optional ShardSource (cached activations)
        check_jacobian_options(cfg.tc_jacobian, cfg.tc_jacobian_readout)
        self.units = build_units(adapter, cfg)
        self.readout = None  # [V, d] the logit directions, built on first use (tc_jacobian_readout)
        self.points = _points(self.units)
        self.step = 0
        self.resumed_at: int | None = None  # the step a resumed run started from
        self.elapsed = 0.0
        self.jacobian_errors: dict[str, float] = {}  # the last step's, per transcoder trained with tc_jacobian
        self.inputs = ckpt.run_inputs(adapter, source)  # the model and text a saved state must come from
        self.saved_step: int | None = None  # the step of the last state saved (or resumed from)

    # -- data ---------------------------------------------------------------------------------------------

    def acts(self, step: int, local: bool = True) -> dict[str, torch.Tensor]:
        """A step's activations: this rank's rows of the global batch (or all rows with local=False)."""
        if self.activations is not None:
            acts = self.activations.acts(step)
        else:
            ids = self.source.batch(step, self.cfg.batch_size)
            acts = self.adapter.run(ids.to(self.adapter.device), capture=self.points).cache
        if self.world > 1 and local:
            per = self.cfg.batch_size // self.world
            acts = {k: v[self.rank * per : (self.rank + 1) * per] for k, v in acts.items()}
        return {k: v.detach() for k, v in acts.items()}

    def estimate_norms(self) -> None:
        """Dataset-wide average norms (BOS excluded) from batches that training does not use."""
        scales = norm_scales(self.adapter, self.source, [(u.kind, u.layer) for u in self.units],
                             self.cfg.batch_size, self.cfg.norm_batches)
        for u in self.units:
            u.c_x, u.c_y = scales[(u.kind, u.layer)]

    @torch.no_grad()
    def init_modules(self) -> None:
        """Q/K from the model's heads (Lorsa), and output biases at the target's mean; or, with ``init_from``,
        the saved modules (brought into the normalised units)."""
        if self.cfg.init_from:
            self._init_from_saved(self.cfg.init_from)
            return
        acts = self.acts(10**9, local=False)  # identical on every rank
        torch.manual_seed(self.cfg.seed)
        for u in self.units:
            x, y = _xy(u, acts)
            u.module.decoder()[1].copy_(_drop_bos(u, y).mean(0))
            if u.kind == "lorsa" and self.cfg.lorsa_init == "model":
                u.module.init_qk_from_model(self.adapter, u.layer, x_scale=u.c_x)

    def _init_from_saved(self, folder: str) -> None:
        """Each unit's module from the saved one in ``folder``, in the normalised units
        (runs under init_modules' no_grad)."""
        from .store import load_replacements

        saved = load_replacements(folder, self.adapter, earlier_version=True)
        for u in self.units:
            m = saved.get((u.kind, u.layer))
            if m is None:
                raise CircuitsError(f"{folder} has no {u.kind} for layer {u.layer} to start from")
            adds_skip = u.kind == "transcoder" and u.module.cfg.skip and not m.cfg.skip
            # the same sizes; K may change (a top-K code of another K has the same weights), and a plain
            # transcoder can start a skip one (the skip starts at zero)
            same = replace(m.cfg, top_k=u.module.cfg.top_k, **({"skip": True} if adds_skip else {}))
            if same != u.module.cfg:
                raise CircuitsError(f"the {u.kind} of layer {u.layer} in {folder} has another configuration "
                                    f"({m.cfg}); pass the same sizes")
            u.module.load_state_dict(fold_scales(m, 1 / u.c_x, 1 / u.c_y).state_dict(), strict=not adds_skip)

    # -- checkpoints --------------------------------------------------------------------------------------

    def save_state(self) -> None:
        if self.rank != 0:
            return
        for u in self.units:
            if not all(torch.isfinite(p).all() for p in u.module.parameters()):
                raise TrainingDiverged(f"{u.name}: weights are not finite at step {self.step}; stopped, "
                                       f"{last_good(self.state_file)}")
        tensors = {}
        for u in self.units:
            names = {p: n for n, p in u.module.named_parameters()}
            tensors.update({f"{u.name}.param.{n}": p for n, p in u.module.state_dict().items()})
            tensors.update({f"{u.name}.{k}": v for k, v in ckpt.optimizer_tensors(u.opt, names).items()})
            tensors[f"{u.name}.since_fired"] = u.since_fired
            tensors[f"{u.name}.freq"] = u.freq
            tensors[f"{u.name}.scales"] = torch.tensor([u.c_x, u.c_y], dtype=torch.float64)
        meta = {"step": self.step, "elapsed_s": self.elapsed, "config": asdict(self.cfg), "model": self.adapter.name,
                "inputs": self.inputs}
        ckpt.atomic_save(tensors, self.state_file, meta)
        self.saved_step = self.step

    def load_state(self) -> bool:
        return ckpt.resume(self, TrainConfig())

    def _restore(self, tensors: dict, meta: dict) -> None:
        """Every unit's weights, optimizer, silence counters and scales, and the step, from a saved state."""
        for u in self.units:
            pre = f"{u.name}.param."
            own = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            if not own:
                raise ckpt.CheckpointError(f"{self.state_file} has no state for {u.name}; start without --resume")
            try:
                u.module.load_state_dict(own)
            except RuntimeError:
                raise ckpt.CheckpointError(
                    f"{self.state_file} was saved with other settings for {u.name} (e.g. --tc-expansion or "
                    "--lorsa-*); resume with the same settings or start afresh with --no-resume") from None
            ckpt.restore_optimizer(u.opt, dict(u.module.named_parameters()),
                                   {k[len(u.name) + 1:]: v for k, v in tensors.items() if k.startswith(u.name + ".opt.")})
            for counter in ("since_fired", "freq"):  # of another shape: a RuntimeError traceback at the next step
                saved = tensors.get(f"{u.name}.{counter}", getattr(u, counter))  # freq: states saved before it, none
                if saved.shape != getattr(u, counter).shape:
                    raise ValueError(f"{u.name}.{counter} has shape {list(saved.shape)}, the run's units "
                                     f"{list(getattr(u, counter).shape)}")
            u.since_fired = tensors[f"{u.name}.since_fired"].cpu()
            u.freq = tensors.get(f"{u.name}.freq", torch.zeros_like(u.freq)).cpu()  # states saved before it: none
            u.c_x, u.c_y = tensors[f"{u.name}.scales"].tolist()
        self.step, self.elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))

    # -- training -----------------------------------------------------------------------------------------

    def _aux_loss(self, u: Unit, pre: torch.Tensor, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """AuxK: the dead units (silent for ``dead_after_tokens`` tokens) fit what the live ones miss.  pre [..., units]
        the module's pre-activations, y_hat and y [..., d] its output and the target; the dead units' top 2K
        (at most) by pre-activation x decoder size decode the residual y - y_hat, whose relative squared error
        (BOS left out where the unit leaves it out) is the loss, a scalar."""
        dead = u.since_fired.to(pre.device) > self.cfg.dead_after_tokens
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_coef == 0:
            return pre.new_zeros(())
        W, _ = u.module.decoder()
        masked = torch.where(dead, pre, torch.full_like(pre, -1e9))
        code = topk_relu(masked, W.norm(dim=-1), min(n_dead, 2 * u.module.cfg.top_k))
        recon = decode(code, W, torch.zeros_like(W[0]))
        err = (y - y_hat).detach()
        recon, err = _drop_bos(u, recon), _drop_bos(u, err)
        return (recon - err).pow(2).sum(-1).mean() / err.pow(2).sum(-1).mean().clamp_min(1e-12)

    def train_step(self, step: int) -> dict[str, float]:
        acts = self.acts(step)
        refuse_non_finite(acts, step)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.adapter.device.type == "cuda" else _null()
        out, jac_errors = {}, {}
        for u in self.units:
            for g in u.opt.param_groups:
                g["lr"] = self.cfg.lr_at(step)
            x, y = _xy(u, acts)
            with autocast:
                y_hat, code, pre = u.forward(x, self.cfg.k_at(u.module.cfg.top_k, step))
            y_hat = y_hat.float()
            if u.kind == "transcoder" and self.cfg.tc_token_norm:
                mse = token_normalised_mse(y_hat, y)
            else:
                mse = lorsa_loss(y_hat, y, self.cfg.lorsa_bos_weight) if u.kind == "lorsa" else (y_hat - y).pow(2).mean()
            loss = mse + self.cfg.aux_coef * self._aux_loss(u, pre.float(), y_hat, y)
            if u.kind == "lorsa" and self.cfg.lorsa_freq_penalty > 0:
                flat = SparseCode(_drop_bos(u, code.values.float()), _drop_bos(u, code.indices))
                loss = loss + self.cfg.lorsa_freq_penalty * frequency_penalty(
                    flat, u.module.W_O.norm(dim=-1), u.freq, self.cfg.lorsa_freq_target, _drop_bos(u, y))
            if u.kind == "transcoder" and self.cfg.tc_bos_weight > 0:  # _xy leaves BOS out: its rows apart
                x0, y0 = _bos_xy(u, acts)
                with autocast:
                    y_hat0 = u.forward(x0, self.cfg.k_at(u.module.cfg.top_k, step))[0]
                loss = loss + self.cfg.tc_bos_weight * bos_term(y_hat0.float(), y0, y.pow(2).mean())
            if u.kind == "transcoder" and self.cfg.tc_jacobian > 0:
                # relative JVP error, scaled like the MSE (mean over coordinates of the normalised targets)
                gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)  # resumable: a function of step
                last = self.cfg.tc_jacobian_readout and u.layer == self.adapter.n_layers - 1
                if last and self.readout is None:
                    self.readout = readout_directions(self.adapter).to(x.device)
                readout = self.readout if last else None
                jac = jacobian_error(u, self.adapter.mlp(u.layer), x, code, self.cfg.tc_jacobian_tokens, gen, readout)
                loss = loss + self.cfg.tc_jacobian * jac * y.pow(2).mean().detach()
                jac_errors[u.name] = jac.item()
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{u.name}: loss is {loss.item()} at step {step}; stopped, "
                                       f"{last_good(self.state_file)}"
                                       + (" (the state this run resumed from; --no-resume starts afresh)"
                                          if step == self.resumed_at else ""))
            u.opt.zero_grad(set_to_none=True)
            loss.backward()
            active = _drop_bos(u, code.dense(pre.shape[-1])) > 0  # [T, N]
            fired, share = active.any(0), active.float().mean(0)
            if self.world > 1:
                for p in u.module.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
                fired = fired.to(torch.int32)
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                fired = fired.bool()
                dist.all_reduce(share)
                share /= self.world
            torch.nn.utils.clip_grad_norm_(u.module.parameters(), self.cfg.grad_clip)
            u.opt.step()
            n_tok = _drop_bos(u, y).shape[0] * self.world
            u.since_fired = torch.where(fired.cpu(), torch.zeros_like(u.since_fired), u.since_fired + n_tok)
            u.freq = share.cpu() if step == 0 else FREQ_DECAY * u.freq + (1 - FREQ_DECAY) * share.cpu()
            with torch.no_grad():
                out[u.name] = fvu(_drop_bos(u, y_hat), _drop_bos(u, y)).item()
        self.jacobian_errors = jac_errors
        return out

    def train(self, resume: bool = True, progress: bool = True, stop_after: int | None = None) -> None:
        if resume and self.load_state():
            self.resumed_at = self.step
            if progress and self.rank == 0:
                print(f"resuming {self.state_file} at step {self.step} of {self.cfg.steps}", file=sys.stderr)
        else:
            self.estimate_norms()
            self.init_modules()
            self.step = 0
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, stop_after)
        tokens = self.cfg.batch_size * self.cfg.seq_len
        bar = progress_bar(range(self.step, end), "train replacements", not progress or self.rank != 0, self.cfg.steps,
                       self.step)
        t_last = time.time()
        with ckpt.reporting_interrupts(self) as stop:
            for step in bar:
                fvus = self.train_step(step)
                self.step = step + 1
                now = time.time()
                self.elapsed += now - t_last
                extra = {}
                if self.jacobian_errors:
                    extra["jac_err"] = f"{sum(self.jacobian_errors.values()) / len(self.jacobian_errors):.3f}"
                postfix(bar, tok_s=f"{tokens / max(now - t_last, 1e-9):.0f}", fvu=f"{sum(fvus.values()) / len(fvus):.3f}",
                             worst=max(fvus, key=fvus.get), **extra)
                t_last = now
                stopping = self._stop_requested(stop)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == end or stopping:
                    self.save_state()
                if stopping:
                    raise KeyboardInterrupt

    def _stop_requested(self, stop: ckpt.StopRequest) -> bool:
        """Whether to save and stop after this step: under torchrun every rank stops after the same step, the
        first at which any rank was interrupted."""
        if self.world == 1:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.adapter.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # -- export -------------------------------------------------------------------------------------------

    def folded_modules(self) -> dict[tuple[str, int], torch.nn.Module]:
        """Copies whose weights act on raw activations (normalisation folded in)."""
        return {(u.kind, u.layer): fold_scales(u.module, u.c_x, u.c_y) for u in self.units}


@torch.no_grad()
def norm_scales(adapter, source, keys: list[tuple[str, int]], batch_size: int, n_batches: int = 4
                ) -> dict[tuple[str, int], tuple[float, float]]:
    """(c_x, c_y) per (kind, layer): sqrt(d) / the average norm of the module's input and target over
    ``n_batches`` batches that training does not use (BOS excluded), so that c x has an average norm of sqrt(d)."""
    points = sorted({p for kind, L in keys for p in hook_points(kind, L)})
    sums = {key: [0.0, 0.0, 0] for key in keys}
    for i in range(n_batches):
        ids = source.batch(10**9 + i, batch_size)
        acts = adapter.run(ids.to(adapter.device), capture=points).cache
        for key in keys:
            xn, yn = hook_points(*key)
            x, y = acts[xn][:, 1:].float(), acts[yn][:, 1:].float()
            s = sums[key]
            s[0] += x.norm(dim=-1).sum().item()
            s[1] += y.norm(dim=-1).sum().item()
            s[2] += x.shape[0] * x.shape[1]
    root_d = math.sqrt(adapter.d_model)
    return {key: (root_d / (sx / n), root_d / (sy / n)) for key, (sx, sy, n) in sums.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def fold_scales(module: torch.nn.Module, c_x: float, c_y: float) -> torch.nn.Module:
    """A copy of a module trained on (c_x x -> c_y y) that maps x -> y.

    Lorsa: W_Q, W_K, W_V scale by c_x (scores and values unchanged); W_O, b_O by 1/c_y.
    Transcoder: W_enc by c_x; W_dec, b_dec by 1/c_y; W_skip by c_x / c_y.
    TopK ranks are unchanged: every decoder norm is scaled by the same factor."""
    m = copy.deepcopy(module).float()
    if isinstance(m, Transcoder):
        m.W_enc.mul_(c_x)
        m.W_dec.div_(c_y)
        m.b_dec.div_(c_y)
        if m.W_skip is not None:
            m.W_skip.mul_(c_x / c_y)
    else:
        m.W_Q.mul_(c_x)
        m.W_K.mul_(c_x)
        m.W_V.mul_(c_x)
        m.W_O.div_(c_y)
        m.b_O.div_(c_y)
    return m


# ---------------------------------------------------------------------------------------------------------
# Evaluation of trained (folded) modules
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_modules(adapter, modules: dict[tuple[str, int], torch.nn.Module], source, n_batches: int = 8,
                     batch_size: int = 16) -> dict[str, dict]:
    """Per module on held-out batches: FVU, mean L0, dead fraction (never fired), the units active on more than
    half of the tokens (``dense_units``) and how many of a token's L0 they are on average (``dense_l0``), and the next-token loss
    with that one layer spliced (its attention by Lorsa, or its MLP by the transcoder) against the clean
    loss and the loss with that output zero-ablated. BOS is excluded everywhere."""
    from .store import module_key

    points = sorted({p for (k, L) in modules for p in hook_points(k, L)})
    stats = {key: {"se": 0.0, "n": 0, "fires": None, "spliced": 0.0, "zero": 0.0}
             for key in modules}
    clean_total, n_pred = 0.0, 0
    ys = {key: [] for key in modules}
    for i in progress_bar(range(n_batches), "measuring the modules on held-out data", not sys.stderr.isatty()):
        ids = source.batch(i, batch_size).to(adapter.device)
        clean = adapter.run(ids, capture=points)
        clean_total += _next_token_loss(clean.logits, ids) * ids.shape[0]
        n_pred += ids.shape[0]
        for key, m in modules.items():
            kind, L = key
            xn, yn = hook_points(kind, L)
            x, y = clean.cache[xn].float(), clean.cache[yn].float()
            y_hat, code = m(x)
            y_hat[:, 0] = y[:, 0]  # BOS keeps its real output (it is an error node in the graph)
            s = stats[key]
            s["se"] += (y_hat - y)[:, 1:].pow(2).sum().item()
            ys[key].append(y[:, 1:].reshape(-1, y.shape[-1]).cpu())
            active = code.dense(m.decoder()[0].shape[0])[:, 1:] > 0
            s["n"] += active.shape[0] * active.shape[1]
            fires = active.reshape(-1, active.shape[-1]).sum(0).cpu()  # [units] tokens each unit fired on
            s["fires"] = fires if s["fires"] is None else s["fires"] + fires
            s["spliced"] += _next_token_loss(adapter.run(ids, hooks={yn: lambda t, n, v=y_hat: v.to(t.dtype)}).logits, ids) * ids.shape[0]
            s["zero"] += _next_token_loss(adapter.run(ids, hooks={yn: lambda t, n: torch.zeros_like(t)}).logits, ids) * ids.shape[0]
    out = {}
    clean_loss = clean_total / n_pred
    for (kind, L), s in stats.items():
        y = torch.cat(ys[(kind, L)])
        var = (y - y.mean(0)).pow(2).sum().item()
        dense = s["fires"] > s["n"] / 2  # units active on more than half of the tokens
        out[module_key(kind, L)] = {
            "fvu": s["se"] / var, "l0": s["fires"].sum().item() / s["n"], "dead_fraction": (s["fires"] == 0).float().mean().item(),
            "dense_units": int(dense.sum()), "dense_l0": s["fires"][dense].sum().item() / s["n"],
            "clean_loss": clean_loss, "spliced_loss": s["spliced"] / n_pred, "zero_ablation_loss": s["zero"] / n_pred,
            "eval_tokens": s["n"],
        }
    return out


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean loss over predicted tokens 2..n (the prediction made at BOS is left out)."""
    lg = logits[:, 1:-1].float()
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 2:].reshape(-1)).item()


def check_replaceable(adapter, cfg: TrainConfig, out: Path, resume: bool, overwrite: bool) -> Path:
    """The training state a run into ``out`` keeps; BadInputError if ``out`` already holds a module the run would
    replace (`store.refuse_replacing`): unless ``overwrite``, or the run resumes an interrupted one there."""
    from .models import model_fingerprint
    from .store import refuse_replacing

    state = out / f".train_state.{cfg.what}.safetensors"
    layers = cfg.layers if cfg.layers is not None else range(adapter.n_layers)
    refuse_replacing(out, [(k, L) for L in layers for k in cfg.kinds()], state, resume, overwrite,
                     model_fingerprint(adapter))
    return state


def fit_replacements(adapter, cfg: TrainConfig, out_folder: str | Path | None = None, resume: bool = True,
                     progress: bool = True, source=None, eval_source=None, activations=None,
                     world: int = 1, rank: int = 0, overwrite: bool = False) -> dict[str, dict]:
    """Train, evaluate and save every requested module of ``adapter``; returns the metrics per module.  A folder
    that already holds one of them is refused (BadInputError) unless ``overwrite``, or a run there is resumed."""
    from .activations import default_source
    from .models import model_fingerprint
    from .store import default_train_folder, module_key, save_modules

    out = Path(out_folder) if out_folder else default_train_folder(adapter)
    state = check_replaceable(adapter, cfg, out, resume, overwrite)
    source = source or default_source(adapter, cfg.seq_len, cfg.seed)
    trainer = Trainer(adapter, cfg, source, state, world=world, rank=rank, activations=activations)
    trainer.train(resume=resume, progress=progress)
    if rank != 0:
        return {}
    modules = trainer.folded_modules()
    eval_source = eval_source or default_source(adapter, cfg.seq_len, cfg.seed, heldout=True)
    metrics = evaluate_modules(adapter, modules, eval_source, batch_size=min(16, cfg.batch_size))
    fp = model_fingerprint(adapter)
    items = []
    for (kind, L), m in modules.items():
        info = dict(metrics[module_key(kind, L)], train_steps=trainer.step, train_seconds=round(trainer.elapsed, 1),
                    train_tokens=trainer.step * cfg.batch_size * cfg.seq_len, train_source=getattr(source, "describe", type(source).__name__),
                    train_config=asdict(cfg))  # every setting of the run (lr, batch, BOS weights, ...), as the joint stage's
        items.append((m, kind, info))
    save_modules(items, out, fp, adapter.name)
    state.unlink(missing_ok=True)
    return metrics
