"""Path patching: a component's causal effect on a logit through the residual stream and the MLPs only.

The component's output is ablated (zero; mean: its output averaged over every position but BOS of some
reference prompts; or a counterfactual prompt's value); every attention layer's output (so every other
head's output and pattern) stays at its clean value, while the residual stream, the norms and the MLPs
respond.  Components:

    lorsa.L.H@P       a Lorsa head's output at a query position
    head.L.H[@P]      an original attention head's output (at one position, or all)
    tc.L.F@P          a transcoder feature's output (a cross-layer feature's: into every MLP output it reaches)
    attn_err.L@P / mlp_err.L@P   an error node

A tuple of components is ablated together (e.g. every head of a circuit), in one run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from replacement.assemble import ReplacementModel, linear_mlp_hooks
from replacement.checks import check_count
from replacement.errors import BadInputError
from replacement.hooks import hook_name
from replacement.models import start_token

from .graph import ERROR_KINDS, FEATURE_KINDS, NodeKey, NodeKind, id_of_unit_label, kind_of

HEAD = "head"  # an original attention head: not a node of the graph, so not a NodeKind
_HEAD_PATTERN = re.compile(r"^head\.(\d+)\.(\d+)(?:@(\d+))?$")
_PATCHABLE = FEATURE_KINDS + ERROR_KINDS
_FORMS = "lorsa.L.H@P, head.L.H[@P], tc.L.F@P, attn_err.L@P or mlp_err.L@P"


@dataclass(frozen=True)
class Component:
    kind: "NodeKind | str"  # a Lorsa head, transcoder feature or error node (a NodeKind), or HEAD
    layer: int
    index: int = -1
    pos: int | None = None  # None: at every position (each its own activation or error)

    def __post_init__(self) -> None:
        """The kind as a NodeKind (an id's prefix such as "tc" allowed), or HEAD; BadInputError (one line) for a kind
        that cannot be patched (an embedding, a logit) or none at all, which an unchecked component ran as an
        original head."""
        kind = self.kind
        if kind != HEAD:
            try:
                kind = kind_of(kind.value if isinstance(kind, NodeKind) else str(kind))
            except BadInputError:
                kind = None
            if kind not in _PATCHABLE:
                name = getattr(self.kind, "value", self.kind)
                raise BadInputError(f"a component of kind {name!r} cannot be patched; the kinds are lorsa, transcoder "
                                    f"(tc), attn_error, mlp_error and {HEAD!r} (an original head): {_FORMS}")
            object.__setattr__(self, "kind", kind)

    def __str__(self) -> str:
        if self.kind == HEAD:
            return f"head.{self.layer}.{self.index}" + (f"@{self.pos}" if self.pos is not None else "")
        return str(NodeKey(self.kind, self.layer, self.index, self.pos))

    @property
    def writes_to(self) -> str:
        return "mlp" if self.kind in (NodeKind.TRANSCODER, NodeKind.MLP_ERROR) else "attn"


def parse_component(text: str) -> Component:
    """A component from its name: a node id of a Lorsa head, transcoder feature or error node
    (graphs/graph.py's `NodeKey`) or the name `trace` prints for one (``L0.H221 @4``, ``L3 MLP error @4``), or an
    original head ``head.L.H[@P]``."""
    if not isinstance(text, str):
        raise BadInputError(f"a component is named by text ({_FORMS}), not {type(text).__name__}")
    m = _HEAD_PATTERN.match(text.strip())
    if m:
        return Component(HEAD, int(m.group(1)), int(m.group(2)), None if m.group(3) is None else int(m.group(3)))
    try:
        key = NodeKey.parse(id_of_unit_label(text))
    except BadInputError:
        raise BadInputError(f"cannot parse component {text!r}; use {_FORMS}") from None
    if key.kind not in _PATCHABLE:
        raise BadInputError(f"component {text!r} names a node of kind {key.kind}, which cannot be patched; use {_FORMS}")
    return Component(key.kind, key.layer, key.index, key.pos)


@dataclass
class PatchResult:
    component: Component | tuple[Component, ...]  # a tuple: ablated together
    clean: float  # the clean metric (target logit, or logit difference)
    patched: float
    effect: float  # patched - clean


class PathPatcher:
    """Path patching on one prompt; ``effects`` evaluates many components in batched forward passes."""

    def __init__(self, model: ReplacementModel, ids: torch.Tensor, target: int, baseline: int | None = None,
                 counterfactual: torch.Tensor | None = None, demean: bool = False, freeze_norms: bool = False,
                 reference: list[torch.Tensor] | None = None):
        if not hasattr(model, "adapter"):
            raise BadInputError("path patching needs a ReplacementModel (replacement.assemble), not "
                                f"{type(model).__name__}")
        self.model, self.adapter = model, model.adapter
        a = self.adapter
        self.ids = a.prompt_ids(ids)[0]  # text or token ids
        self.rec = model.record(self.ids)
        self.cf = None
        if counterfactual is not None:
            cf = a.prompt_ids(counterfactual, "counterfactual prompt")[0]
            if cf.shape != self.ids.shape:
                raise BadInputError("the counterfactual prompt must have as many tokens as the prompt")
            self.cf = model.record(cf)
        target = a.token_id(target)
        baseline = None if baseline is None else a.token_id(baseline, "baseline")
        self.target, self.baseline, self.demean, self.freeze_norms = target, baseline, demean, freeze_norms
        self.clean = self.metric(self.rec.logits[None])[0].item()
        self.means = None if reference is None else self._mean_outputs(reference)

    @torch.no_grad()
    def _mean_outputs(self, prompts: list[torch.Tensor]) -> list[dict]:
        """For mean ablation, per layer, over every position but BOS of the reference ``prompts`` (each text, or
        token ids [n] or [1, n]; cut to the context): the mean activation of each Lorsa head [H] and transcoder
        feature [F], the mean error vectors [d], and the mean output of each original attention head [heads, d]."""
        a = self.adapter
        bos = start_token(a.tokenizer) if a.tokenizer is not None else None  # BOS, or the stand-in prompts start with
        sums, count = None, 0
        if isinstance(prompts, str):
            raise BadInputError("reference takes a list of prompts; for one, give [it]")
        for ids in prompts:
            if isinstance(ids, str):
                ids = a.tokenize(ids, truncate=True, what="reference prompt")
            ids = a.prompt_ids(ids.reshape(-1)[: a.context] if isinstance(ids, torch.Tensor) else ids,
                               "reference prompt")[0]
            keep = slice(1 if bos is not None and len(ids) and int(ids[0]) == bos else 0, None)
            rec = self.model.record(ids)
            per_layer = []
            for L, lr in enumerate(rec.layers):
                z = rec.cache[hook_name(L, "attn.z")][keep].float()  # [m, heads, dh]
                Wo, _ = a.W_O(L)
                out = {HEAD: torch.einsum("mhk,hkd->hd", z, Wo.float()),
                       NodeKind.TRANSCODER: lr.tc_code.dense(self.model.transcoders[L].cfg.n_features)[keep].float().sum(0),
                       NodeKind.MLP_ERROR: lr.mlp_err[keep].float().sum(0)}
                if lr.lorsa_code is not None:
                    out[NodeKind.LORSA] = lr.lorsa_code.dense(self.model.lorsas[L].cfg.n_heads)[keep].float().sum(0)
                    out[NodeKind.ATTN_ERROR] = lr.attn_err[keep].float().sum(0)
                per_layer.append(out)
            sums = per_layer if sums is None else [{k: s[k] + v for k, v in o.items()} for s, o in zip(sums, per_layer)]
            count += len(ids[keep])
        if not count:
            raise BadInputError("mean ablation needs at least one reference prompt with a token after BOS")
        return [{k: v / count for k, v in s.items()} for s in sums]

    def mean_write(self, c: Component) -> torch.Tensor:
        """[n, d]: component c's mean output over the reference prompts into its own layer (`mean_writes`)."""
        return self.mean_writes(c)[(c.layer, c.writes_to)]

    def mean_writes(self, c: Component) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, "attn" | "mlp"): [n, d]}: component c's mean output over the reference prompts, at c's
        position (or every position), into each block output it writes (a cross-layer feature: several)."""
        if self.means is None:
            raise BadInputError("mean ablation needs reference prompts (PathPatcher(reference=...), or "
                                "circuits patch --mean-over FILE)")
        self._check(c)
        m = self.means[c.layer]
        if c.kind == NodeKind.LORSA:
            means = {(c.layer, "attn"): m[c.kind][c.index] * self.model.lorsas[c.layer].W_O[c.index].float()}
        elif c.kind == NodeKind.TRANSCODER:
            tc = self.model.transcoders[c.layer]
            means = {(T, "mlp"): m[c.kind][c.index] * tc.decoder_into(T)[c.index].float() for T in tc.writes_into()}
        else:
            means = {(c.layer, c.writes_to): m[HEAD][c.index] if c.kind == HEAD else m[c.kind]}
        return {key: self._at(c.pos, mean) for key, mean in means.items()}

    def _at(self, pos: int | None, vec: torch.Tensor) -> torch.Tensor:
        """[n, d]: vec [d] at ``pos`` (None: at every position), zero elsewhere."""
        out = torch.zeros(self.ids.shape[0], self.adapter.d_model, device=self.rec.embed.device)
        out[slice(None) if pos is None else pos] = vec.to(out.device)
        return out

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """[B] target logit (minus the baseline's, or minus the mean logit with ``demean``) at the last position."""
        last = logits[:, -1].float()
        out = last[:, self.target] - (last.mean(-1) if self.demean and self.baseline is None else 0)
        return out - last[:, self.baseline] if self.baseline is not None else out

    # -- what a component writes -----------------------------------------------------------------------

    def _check(self, c: Component) -> None:
        a, n = self.adapter, self.ids.shape[0]
        if not 0 <= c.layer < a.n_layers:
            raise BadInputError(f"layer {c.layer} does not exist (the model has {a.n_layers})")
        if c.pos is not None and not 0 <= c.pos < n:
            raise BadInputError(f"position {c.pos} is outside the prompt's {n} tokens")
        if c.kind in (NodeKind.LORSA, NodeKind.ATTN_ERROR) and self.rec.layers[c.layer].lorsa_code is None:
            raise BadInputError("Lorsa components and attention error nodes need --attention lorsa and trained "
                                "Lorsa modules")
        if c.kind == HEAD and not 0 <= c.index < a.n_heads:
            raise BadInputError(f"head {c.index} does not exist (layer has {a.n_heads})")
        if c.kind in (NodeKind.LORSA, NodeKind.TRANSCODER):
            lorsa = c.kind == NodeKind.LORSA
            count = self.model.lorsas[c.layer].cfg.n_heads if lorsa else self.model.transcoders[c.layer].cfg.n_features
            if not 0 <= c.index < count:
                raise BadInputError(f"{'Lorsa head' if lorsa else 'feature'} {c.index} does not exist (layer {c.layer} "
                                    f"has {count})")

    def active(self, c: Component) -> bool:
        """Whether a Lorsa head or transcoder feature fires on the prompt (other components: always)."""
        self._check(c)
        lr = self.rec.layers[c.layer]
        code = {NodeKind.LORSA: lr.lorsa_code, NodeKind.TRANSCODER: lr.tc_code}.get(c.kind)
        if code is None:
            return True
        return bool((code.values[c.pos][code.indices[c.pos] == c.index] != 0).any())

    def write(self, c: Component, rec) -> torch.Tensor:
        """[n, d]: what component c writes into its own layer's block output on the prompt recorded in ``rec``
        (a cross-layer feature writes into later layers too: `writes`)."""
        return self.writes(c, rec)[(c.layer, c.writes_to)]

    def writes(self, c: Component, rec) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, "attn" | "mlp"): [n, d]}: what component c writes into each block output it reaches on the
        prompt recorded in ``rec`` (a cross-layer transcoder feature: every MLP output its decoders reach)."""
        self._check(c)
        lr = rec.layers[c.layer]
        if c.kind == NodeKind.LORSA:
            return {(c.layer, "attn"): self._unit(lr.lorsa_code, c, self.model.lorsas[c.layer].W_O[c.index])}
        if c.kind == NodeKind.TRANSCODER:
            tc = self.model.transcoders[c.layer]
            return {(T, "mlp"): self._unit(lr.tc_code, c, tc.decoder_into(T)[c.index]) for T in tc.writes_into()}
        if c.kind in ERROR_KINDS:
            err = lr.attn_err if c.kind == NodeKind.ATTN_ERROR else lr.mlp_err
            return {(c.layer, c.writes_to): err.float() if c.pos is None else self._at(c.pos, err[c.pos])}
        z = rec.cache[hook_name(c.layer, "attn.z")][:, c.index]  # an original head: [n, dh], recorded with the prompt
        Wo, _ = self.adapter.W_O(c.layer)
        contrib = z.float() @ Wo[c.index].float()  # [n, d]
        if c.pos is not None:
            contrib = self._at(c.pos, contrib[c.pos])
        return {(c.layer, "attn"): contrib}

    def _unit(self, code, c: Component, direction: torch.Tensor) -> torch.Tensor:
        """[n, d]: a head's or feature's activation at each position times its output ``direction`` [d], at c.pos
        alone, or with c.pos None at every position (each position its own activation: 0 where it is inactive)."""
        acts = (code.values * (code.indices == c.index)).sum(-1).float()  # [n]
        if c.pos is not None:
            acts = torch.where(torch.arange(len(acts), device=acts.device) == c.pos, acts, torch.zeros_like(acts))
        return acts[:, None].to(self.rec.embed.device) * direction.float().to(self.rec.embed.device)[None]

    def delta(self, c: Component, mode: str) -> torch.Tensor:
        """[n, d]: the ablation's change to what c writes into its own layer (`deltas`: into every layer)."""
        return self.deltas(c, mode)[(c.layer, c.writes_to)]

    def deltas(self, c: Component, mode: str) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, "attn" | "mlp"): [n, d]}: the ablation's change to what c writes into each block output."""
        clean = self.writes(c, self.rec)
        if mode == "zero":
            return {k: -v for k, v in clean.items()}
        if mode == "mean":
            other = self.mean_writes(c)
        elif mode == "counterfactual":
            if self.cf is None:
                raise BadInputError("counterfactual ablation needs a counterfactual prompt")
            other = self.writes(c, self.cf)
        else:
            raise BadInputError(f"unknown ablation {mode!r}; use zero, mean or counterfactual")
        return {k: other[k] - v for k, v in clean.items()}

    # -- runs -------------------------------------------------------------------------------------------

    def _hooks(self, deltas: dict) -> dict:
        """Hooks that freeze every attention output at its clean value plus deltas[(L, "attn")] and add
        deltas[(L, "mlp")] to MLP outputs (each [B, n, d]); with ``freeze_norms`` the norm scales too."""
        hooks = {}
        if self.freeze_norms:  # the linear regime of the attribution graph
            for name, v in self.rec.cache.items():
                if name.endswith(".scale"):
                    hooks[name] = lambda t, n, v=v: v[None].expand(t.shape[0], -1, -1)
        for L in range(self.adapter.n_layers):
            d_attn = deltas.get((L, "attn"))
            hooks[hook_name(L, "attn.out")] = (lambda t, n, v=self.rec.layers[L].attn_out, d=d_attn:
                                             (v[None] + (0 if d is None else d)).to(t.dtype))
            if (L, "mlp") in deltas:
                hooks[hook_name(L, "mlp.out")] = lambda t, n, d=deltas[(L, "mlp")]: t + d.to(t.dtype)
        return hooks

    @torch.no_grad()
    def effects(self, components: list[Component | tuple[Component, ...]], mode: str = "zero",
                batch_size: int = 32) -> list[PatchResult]:
        """Each entry's path-patching effect; an entry that is a tuple of components ablates them together; a
        component may be given by its name (`parse_component`)."""
        a = self.adapter
        components = _parsed_list(components)
        check_count("batch_size", batch_size)
        results = []
        shape = self.rec.layers[0].attn_out.shape
        for start in range(0, len(components), batch_size):
            batch = components[start : start + batch_size]
            B = len(batch)
            deltas, changed = {}, [False] * B
            for b, group in enumerate(batch):
                for c in _members(group):
                    for key, d in self.deltas(c, mode).items():
                        deltas.setdefault(key, torch.zeros(B, *shape, device=self.rec.embed.device))[b] += d
                        changed[b] = changed[b] or bool(d.any())
            logits = a.run(self.ids[None].expand(B, -1), hooks=self._hooks(deltas)).logits
            for c, m, moved in zip(batch, self.metric(logits).tolist(), changed):
                m = m if moved else self.clean  # nothing written changes (a unit not active, zero-ablated): the
                results.append(PatchResult(c, self.clean, m, m - self.clean))  # clean run itself, not a batch's rounding
        return results

    def linear_effects(self, components: list[Component | tuple[Component, ...]], mode: str = "zero",
                       mlp_maps: dict | None = None) -> list[float]:
        """The real model's first-order prediction of each component's path-patching effect: the gradient of
        the metric with respect to what each block writes (attention frozen, as in ``effects``), at the clean
        run, dotted with the ablation's change.  One backward pass serves every component.  Set against
        ``effects`` it measures how far the ablation is from the linear regime that attribution graphs assume.

        ``mlp_maps`` {L: f} replaces layer L's MLP by a linear map around the clean point, out = clean out +
        f(in - clean in), f: [n, d] -> [n, d] (e.g. its transcoder's Jacobian: what the graph sees there)."""
        a = self.adapter
        components = _parsed_list(components)
        shape = self.rec.layers[0].attn_out.shape
        deltas = {(L, w): torch.zeros(1, *shape, device=self.rec.embed.device, requires_grad=True)
                  for L in range(a.n_layers) for w in ("attn", "mlp")}
        hooks = self._hooks(deltas)
        for L, f in (mlp_maps or {}).items():
            hooks.update(linear_mlp_hooks(self.rec, L, self.rec.layers[L].mlp_out + deltas[(L, "mlp")][0], f))
        with torch.enable_grad():
            metric = self.metric(a.run(self.ids[None], hooks=hooks).logits)[0]
            grads = dict(zip(deltas, (g.detach() for g in torch.autograd.grad(metric, list(deltas.values())))))
        with torch.no_grad():
            return [sum(float((grads[key][0] * d).sum()) for c in _members(group) for key, d in self.deltas(c, mode).items())
                    for group in components]


def _members(group: Component | tuple[Component, ...]) -> tuple[Component, ...]:
    return group if isinstance(group, tuple) else (group,)


def _parsed_list(components) -> list:
    """The entries of a list of components (each a component, its name, or a tuple ablated together), read."""
    if isinstance(components, (str, Component)):
        raise BadInputError("effects take a list of components; for one, give [it]")
    return [_parsed(c) for c in components]


def _parsed(group):
    """A component, or a tuple of them, with names (`parse_component`) read; anything else a BadInputError."""
    if isinstance(group, tuple):
        return tuple(_parsed(c) for c in group)
    if isinstance(group, str):
        return parse_component(group)
    if not isinstance(group, Component):
        raise BadInputError(f"a component is a Component or its name ({_FORMS}), not {type(group).__name__}")
    return group


def path_patch(model: ReplacementModel, ids: torch.Tensor, component: str | Component, target: int,
               baseline: int | None = None, mode: str = "zero", counterfactual: torch.Tensor | None = None,
               reference: list[torch.Tensor] | None = None, demean: bool = False,
               freeze_norms: bool = False) -> PatchResult:
    """One component's path-patching effect on the target logit at the last position (`PathPatcher`): minus the
    baseline's logit when one is given, or with ``demean`` minus the mean logit, the quantity `trace`'s graph
    explains (`graph_effects` predicts it); ``freeze_norms`` keeps the norms' scales at their clean values (the
    graph's linear regime).  ``ids``: token ids or text; ``target``/``baseline``: token ids or text."""
    return PathPatcher(model, ids, target, baseline, counterfactual, demean=demean, freeze_norms=freeze_norms,
                       reference=reference).effects([component], mode)[0]


def rank_lorsa_heads(model: ReplacementModel, ids: torch.Tensor, layer: int, target: int, baseline: int | None = None,
                     positions: list[int] | None = None, mode: str = "zero",
                     counterfactual: torch.Tensor | None = None,
                     reference: list[torch.Tensor] | None = None, demean: bool = False,
                     freeze_norms: bool = False) -> list[PatchResult]:
    """Every Lorsa head of ``layer`` active at ``positions`` (default: the last), ranked by |effect| on the metric
    `path_patch` describes (``demean``, ``freeze_norms`` as there; ``reference``: the prompts whose mean output
    ``mode="mean"`` ablates to)."""
    patcher = PathPatcher(model, ids, target, baseline, counterfactual, demean=demean, freeze_norms=freeze_norms,
                          reference=reference)
    positions = positions if positions is not None else [patcher.ids.shape[0] - 1]
    for p in positions:  # the layer, the positions and the Lorsa modules, each in one line
        patcher._check(Component(NodeKind.LORSA, layer, 0, p))
    lr = patcher.rec.layers[layer]
    comps = [Component(NodeKind.LORSA, layer, h, p) for p in positions
             for v, h in zip(lr.lorsa_code.values[p].tolist(), lr.lorsa_code.indices[p].tolist()) if v > 0]
    return sorted(patcher.effects(comps, mode), key=lambda r: -abs(r.effect))


def graph_effects(graph, logit_id: str) -> torch.Tensor:
    """[n_nodes]: the graph's prediction of zero-ablating each node, i.e. minus its total linear effect on
    the logit through paths whose intermediate nodes are transcoder features (attention stays frozen, as in
    path patching):  e(t) = w(t -> logit) + sum_u w(t -> u) e(u) / a(u)  over transcoder features u.

    Through the edges ``graph`` holds: on a pruned graph (graph.json) the paths pruning dropped are missing, and
    a node's prediction can differ from the full graph's, even in sign; predict from the graph `attribute`
    returns (`graphs.pipeline.trace_graphs`' first graph) to compare with path patching."""
    E = graph.edge_arrays
    n = len(graph)
    logit = graph.index[graph.node(logit_id).id]  # an id or a printed name; UnknownNodeError (one line) if none
    e = torch.zeros(n, dtype=torch.float64)
    direct = E.tgt == logit
    e.index_add_(0, E.src[direct], E.w[direct].double())
    layers = torch.tensor([nd.layer if nd.type == NodeKind.TRANSCODER else -10 for nd in graph.node_list])
    acts = torch.tensor([nd.activation for nd in graph.node_list], dtype=torch.float64)
    for L in sorted({int(x) for x in layers.tolist() if x >= 0}, reverse=True):
        into = (layers[E.tgt] == L) & (acts[E.tgt] > 0)
        coef = e / acts.clamp_min(1e-30)
        e.index_add_(0, E.src[into], E.w[into].double() * coef[E.tgt[into]])
    return -e


def set_effect(graph, effects: torch.Tensor, units) -> float:
    """The graph's prediction of zero-ablating ``units`` (node ids or components) together, from `graph_effects`'
    ``effects`` [n_nodes]: the sum of theirs; a component at every position (``pos`` None) is its nodes at each
    position (it summed to nothing); a unit with no node in the graph (an original head) adds nothing."""
    return sum(float(effects[i]) for u in units for i in _node_indices(graph, u))


def _node_indices(graph, unit) -> list[int]:
    if isinstance(unit, Component) and unit.pos is None and unit.kind != HEAD:
        return [i for i, n in enumerate(graph.node_list) if n.type == unit.kind and n.layer == unit.layer
                and (unit.kind in ERROR_KINDS or n.index == unit.index)]
    return [graph.index[str(unit)]] if str(unit) in graph.index else []


class GraphPrediction:
    """The prompt's attribution graph as `trace` builds it with its defaults (`graphs.pipeline.trace_graphs`), full and
    pruned, and each node's predicted effect of a zero ablation on the logit of token ``t_id`` (demeaned; `graph_effects`:
    its total linear effect through transcoder features), to print beside path patching (`circuits patch`);
    ``asked``: the token was asked for (as `trace --target`, which weighs in pruning)."""

    def __init__(self, model, ids, t_id: int, asked: bool):
        from .pipeline import trace_graphs

        # as `trace` would build it: with --target only when one was asked for (a target weighs in pruning)
        self.graph, self.pruned = trace_graphs(model, ids, target=t_id if asked else None)  # families mark both
        self.effects = graph_effects(self.graph, self.graph.logit(t_id).id)
        self.kept = graph_effects(self.pruned, self.pruned.logit(t_id).id)  # pruning keeps every logit node

    def full(self, components) -> float:
        """The full graph's prediction of ablating ``components`` together: the sum of theirs."""
        return set_effect(self.graph, self.effects, components)

    def in_pruned(self, components) -> float:
        """The same on the pruned graph, as graph.json holds it."""
        return set_effect(self.pruned, self.kept, components)

    def describe(self, components) -> str:
        """What a component line adds: the two graphs' predictions, or why there is none."""
        missing = [str(c) for c in components if not _node_indices(self.graph, c)]
        if len(missing) == len(components):
            return ("graph: no node (an original head, a unit not active, or one `trace`'s default node budget, "
                    "--max-feature-nodes, leaves out)")
        also = f" ({', '.join(missing)} no node)" if missing else ""
        return f"graph {self.full(components):+.4f}, pruned {self.in_pruned(components):+.4f}{also}"


def agreement(predicted, patched, k: int = 5) -> tuple[float, int, int]:
    """How well predicted effects [m] (e.g. a graph's, listed most influential first) match path patching [m]:
    their correlation (nan under 3 entries), and how many agree in sign among the first k entries and among
    the k largest |predicted|."""
    p, r = torch.as_tensor(predicted, dtype=torch.float32), torch.as_tensor(patched, dtype=torch.float32)
    corr = float(torch.corrcoef(torch.stack([p, r]))[0, 1]) if len(p) > 2 else float("nan")
    agree = p.sign() == r.sign()
    return corr, int(agree[:k].sum()), int(agree[p.abs().argsort(descending=True)[:k]].sum())
