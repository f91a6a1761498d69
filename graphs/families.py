"""Head families (supernodes): the active Lorsa heads (or transcoder features) of one graph that do one thing.

Lorsa splits one behaviour over many heads: at the last position of an induction prompt dozens of heads attend
to the token after the earlier occurrence and write the same answer, each a few percent of the logit.  A
**family** groups them into one unit of the graph.

The rule (`FamilyConfig`; every field is a knob):

- candidates are the graph's Lorsa heads and, with ``transcoders``, its transcoder features; heads and
  features never share a family, and all members sit at one (query) position;
- **key position**: a head's key is the position its z pattern gives most of its activation (``key_rule="peak"``,
  `z_key`: the largest entry; the pictures' ←P and `graphs.circuits` read keys by the same rule), and a head whose
  peak holds less than ``min_share`` of its z pattern (in size) joins no family; members share
  the key.  A transcoder feature reads its own position, which is its key;
- **layers**: the members' layers span at most ``layer_span`` (0: one layer, the default; 1: adjacent layers).
  One layer, because heads of adjacent layers compose: a layer-1 induction head reads what layer-0 heads wrote,
  and a family's internal edges are dropped when it is collapsed, so a family across layers 0-1 would hide the
  composition the mechanism runs on.  On pythia's showcase the 0.0 rule with adjacent layers made one family of
  layer-0 and layer-1 heads keyed on the same token, with layer-0 members that cannot be induction heads;
- **output direction** (``direction``): "read" (the default), what the graph's nodes read of what the unit
  writes per unit of activation: its outgoing edge weights (into every later head, feature and logit of the
  graph) divided by its activation, i.e. its ``W_O`` row (a feature's decoder) projected onto the read vectors
  of the graph's targets; "weights", the ``W_O`` row or decoder itself (needs the model); "target", its total
  linear effect on the traced logit per unit of activation (one number: members push the target the same way,
  whatever else they write; `target_directions`).  A unit joins a family
  only if the cosine of its direction with the family leader's is at least ``cosine`` (0.0 by default: it
  does not write against the leader).  With raw weights, no two co-attending last-position heads of the toy's
  layer 1 reached a cosine of 0.3 on a natural-text prompt (docs/families.md), hence the "read"
  default.  Read directions are spread over thousands of targets, so even heads that do one thing share little
  of them: on the showcases, the pairwise cosines of the heads of one layer keyed on the token after the earlier
  occurrence have a median of 0.13 (toy, layer 1, 21 heads) and 0.06 (pythia, layer 1, 58 heads), and only
  19-30% of pairs reach 0.3, so a 0.3 threshold split them into 3 (toy) and 11 (pythia) families of the pruned
  graphs; 59-62% of the pairs are at or above 0.0, and 46 of those 58 pythia heads (18 of 21 on the toy) raise
  the answer's logit.

Grouping is greedy and deterministic (`group`): candidates are taken strongest first (activation x the norm of
the direction: the size of what they write; ties by kind, layer, index); each joins the existing family of its
kind, position and key, within the layer span, whose leader (its first, strongest member) it is most aligned
with at or above ``cosine``, or else starts a family.  Groups of fewer than ``min_members`` are not families.

A family's id is ``fam.lorsa.L.K@P`` or ``fam.tc.L.K@P`` (L: its lowest layer, K: its rank among the families
of that kind, layer and position, strongest first, P: the position); ids never collide with node ids.

Members carry their family on the node (``Node.family``, and ``Node.family_cosine``: the cosine of the
member's direction with the family's mean direction), so a pruned or loaded graph keeps them; `families`
lists the families of a graph whose members it still holds (at least ``min_members``, 2).

`collapse` makes the graph in which each family is one node: its edges are the exact sums of its members'
edges (each source's edges into the members summed into one edge into the family, each target's edges from
the members summed into one edge from it, by kind); edges between two members of one family are **dropped**
(no self-loop), so a family's incoming edges explain the sum of its members' pre-activations less what the
members write into each other.  Its activation, influence, pre-activation, constants, dropped weight and z
pattern are its members' sums.  QK pairs that touch a member are left out of the collapsed graph (its
expanded form keeps them).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from replacement.errors import BadInputError

from .graph import FAMILY_ID, AttributionGraph, EdgeArrays, Node, NodeKind, QKContrast, QKPair

KIND_TAG = {NodeKind.LORSA: "lorsa", NodeKind.TRANSCODER: "tc"}
_FAMILY_ID = re.compile(rf"^{FAMILY_ID.pattern}$")


@dataclass(frozen=True)
class FamilyConfig:
    """The grouping rule (module docstring): ``cosine``, the least cosine of a member's output direction with its
    family leader's; ``direction``, "read" (its outgoing edges per unit of activation), "weights" (its W_O row
    or decoder) or "target" (its effect on the traced logit per unit of activation); ``key_rule`` "peak"
    (members share the key position where their z pattern peaks);
    ``min_share``, the least share of a head's z pattern (in size) at its peak for it to join a family;
    ``layer_span``, the most layers a family spans minus one (0: one layer, 1: adjacent layers);
    ``transcoders``, group transcoder features too (by position and decoder direction); ``min_members``, the
    smallest family."""

    cosine: float = 0.0
    direction: str = "read"
    key_rule: str = "peak"
    min_share: float = 0.0
    layer_span: int = 0
    transcoders: bool = True
    min_members: int = 2

    def __post_init__(self):
        if not -1.0 <= self.cosine <= 1.0:
            raise BadInputError(f"the family cosine threshold must be in [-1, 1], not {self.cosine}")
        if self.direction not in ("read", "weights", "target"):
            raise BadInputError(f"unknown family direction {self.direction!r}; use 'read', 'weights' or 'target'")
        if self.key_rule != "peak":
            raise BadInputError(f"unknown family key rule {self.key_rule!r}; use 'peak'")
        if not 0.0 <= self.min_share <= 1.0:
            raise BadInputError(f"min_share must be in [0, 1], not {self.min_share}")
        if self.layer_span < 0 or self.min_members < 2:
            raise BadInputError("layer_span must be >= 0 and min_members >= 2")

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_FAMILIES = FamilyConfig()


@dataclass(frozen=True)
class Unit:
    """A candidate member: its node's kind, layer, position, key position (-1: it joins no family) and size."""

    kind: NodeKind
    layer: int
    pos: int
    key: int
    strength: float
    index: int = 0


@dataclass
class Family:
    """One family of a graph: ``members`` (node ids present in the graph, strongest first), the ``layers`` they
    sit in, their ``pos``ition, the ``key_positions`` their z patterns peak on (one by construction; a
    transcoder family's is its own position), and ``mean_cosine``, the mean over members of the cosine of each
    member's output direction with the family's mean direction."""

    id: str
    kind: NodeKind
    pos: int
    members: list[str]
    layers: tuple[int, ...]
    key_positions: tuple[int, ...]
    mean_cosine: float
    activation: float = 0.0  # the members' summed activation

    def __len__(self) -> int:
        return len(self.members)


# -- the rule, on plain tensors -------------------------------------------------------------------------------

def z_key(z_pattern: list[float], min_share: float = 0.0) -> int:
    """The key position a head takes most of its activation from: where its z pattern [n_keys] (A_{t,s} v_s, which
    sums to the activation) is largest, the first such as argmax (a negative entry takes activation away, so it is
    the answer only where no entry is positive: then the largest in size); -1 for an empty or all-zero pattern, or
    if the peak holds less than ``min_share`` of the pattern's total size.  The one rule for a head's key: the
    families', the pictures' (`lens.key_position`) and the circuits' (`circuits.z_peak`)."""
    z = list(z_pattern)  # plain floats: a tensor per head cost more than the rule itself
    total = sum(abs(x) for x in z)
    if not z or total <= 0:
        return -1
    size = z if max(z) > 0 else [abs(x) for x in z]
    peak = max(range(len(z)), key=size.__getitem__)
    return peak if abs(z[peak]) / total >= min_share else -1


def group(units: list[Unit], directions: torch.Tensor, cfg: FamilyConfig) -> list[list[int]]:
    """Greedy leader grouping (module docstring) of ``units`` with output ``directions`` [m, d] (dense, or a sparse
    COO tensor): the groups of at least ``cfg.min_members`` units, as indices into ``units``, each strongest first;
    groups in order of their leaders' strength.  Only units of one slot (kind, position, key) are compared."""
    order = sorted(range(len(units)), key=lambda i: (-units[i].strength, units[i].kind.value, units[i].layer,
                                                     units[i].index, i))
    rank = {i: r for r, i in enumerate(order)}
    slots: dict[tuple, list[int]] = {}
    for i in order:
        if units[i].key >= 0:
            slots.setdefault((units[i].kind, units[i].pos, units[i].key), []).append(i)
    out = []
    for members in slots.values():
        if len(members) < cfg.min_members:
            continue
        cos = _cosines(directions, members)  # [k, k]
        local: list[list[int]] = []  # positions in ``members``
        for a, i in enumerate(members):
            best, best_cos = None, cfg.cosine
            for g in local:
                layers = [units[members[b]].layer for b in g] + [units[i].layer]
                if max(layers) - min(layers) <= cfg.layer_span and float(cos[g[0], a]) >= best_cos:
                    best, best_cos = g, float(cos[g[0], a])
            if best is None:
                local.append([a])
            else:
                best.append(a)
        out += [[members[b] for b in g] for g in local if len(g) >= cfg.min_members]
    return sorted(out, key=lambda g: rank[g[0]])


def _rows(directions: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """[k, d] dense float64: the given rows of a dense or sparse COO matrix [m, d].  A coalesced COO matrix
    stores its entries sorted by row, so a row is a slice found by binary search (an index_select would pass
    over every stored entry, once per call)."""
    if not directions.is_sparse:
        return directions[torch.tensor(rows, dtype=torch.long)].double()
    if not directions.is_coalesced():
        directions = directions.coalesce()
    row_of, col, val = directions.indices()[0], directions.indices()[1], directions.values()  # [nnz] each
    r = torch.tensor(rows, dtype=torch.long)
    starts = torch.searchsorted(row_of, r).tolist()
    ends = torch.searchsorted(row_of, r, right=True).tolist()
    out = torch.zeros(len(rows), directions.shape[1], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(starts, ends)):
        out[k, col[a:b]] = val[a:b].double()
    return out


def _row_norms(directions: torch.Tensor) -> torch.Tensor:
    """[m] float64: the norm of each row of a dense or sparse COO matrix [m, d]."""
    if not directions.is_sparse:
        return directions.double().norm(dim=-1)
    d = directions if directions.is_coalesced() else directions.coalesce()
    return torch.zeros(d.shape[0], dtype=torch.float64).index_add_(0, d.indices()[0], d.values().double() ** 2).sqrt()


def _cosines(directions: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """[k, k]: the cosines between the given rows of ``directions`` (0 with a zero row)."""
    sub = _rows(directions, rows)
    unit = sub / sub.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.T


def mean_direction_cosines(directions: torch.Tensor) -> torch.Tensor:
    """[m]: the cosine of each of ``directions`` [m, d] with their mean unit direction."""
    unit = directions.double() / directions.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    mean = unit.mean(0)
    return (unit @ mean) / mean.norm().clamp_min(1e-30)


def family_id(kind: NodeKind, layer: int, rank: int, pos: int) -> str:
    return f"fam.{KIND_TAG[NodeKind(kind)]}.{layer}.{rank}@{pos}"


def is_family_id(text: str) -> bool:
    return bool(_FAMILY_ID.match(text.strip()))


# -- on a graph -------------------------------------------------------------------------------------------------

def output_directions(model, nodes: list[Node]) -> torch.Tensor:
    """[m, d]: what each Lorsa head or transcoder feature node writes per unit of activation (a head's W_O row,
    a feature's decoder into its own layer)."""
    rows = []
    for n in nodes:
        if n.type == NodeKind.LORSA:
            rows.append(model.lorsas[n.layer].W_O[n.index])
        else:
            rows.append(model.transcoders[n.layer].decoder_into(n.layer)[n.index])
    d = model.adapter.d_model
    return torch.stack([r.detach().float().cpu() for r in rows]) if rows else torch.zeros(0, d)


def read_directions(graph: AttributionGraph, nodes: list[Node]) -> torch.Tensor:
    """[m, N] sparse COO float64, coalesced: each node's outgoing edge weights into the graph's N nodes, divided
    by its activation (what the graph's targets read of its output direction; zero for a node with no
    activation).  Sparse, so that a full graph of many thousand features costs its edges, not m x N; coalesced,
    so that `group` reads a slot's rows as slices (`_rows`; an index_select per slot took 5 minutes on the toy
    showcase's full graph of 14M edges, slices 7 s)."""
    E, N = graph.edge_arrays, len(graph.node_list)
    row = torch.full((N,), -1, dtype=torch.long)
    if nodes:
        row[torch.tensor([graph.index[n.id] for n in nodes], dtype=torch.long)] = torch.arange(len(nodes))
    keep = row[E.src] >= 0
    acts = torch.tensor([n.activation for n in nodes], dtype=torch.float64)
    scale = 1.0 / torch.where(acts.abs() > 0, acts, torch.ones_like(acts))
    r = row[E.src[keep]]
    return torch.sparse_coo_tensor(torch.stack([r, E.tgt[keep]]), E.w[keep].double() * scale[r],
                                   (len(nodes), N), check_invariants=True).coalesce()


def target_directions(graph: AttributionGraph, nodes: list[Node]) -> torch.Tensor:
    """[m, 1] float64: each node's total linear effect on the graph's target logit (`patching.graph_effects`)
    per unit of activation, so that two units' cosine is 1 when they push the target the same way, -1 when they
    push it apart (0 for a node with no activation)."""
    from .patching import graph_effects

    effects = graph_effects(graph, graph.target.id)
    idx = torch.tensor([graph.index[n.id] for n in nodes], dtype=torch.long)
    acts = torch.tensor([n.activation for n in nodes], dtype=torch.float64)
    active = acts.abs() > 0
    return torch.where(active, effects[idx] / torch.where(active, acts, 1.0), 0.0)[:, None]


def find_families(graph: AttributionGraph, model=None, cfg: FamilyConfig = DEFAULT_FAMILIES,
                  also: AttributionGraph | None = None) -> list[Family]:
    """Group the graph's active heads (and features) by the rule of ``cfg``, mark each member's node
    (``family``, ``family_cosine``), record the rule in ``graph.settings["families"]`` and return the
    families (`families`).  ``model`` is needed for ``direction="weights"`` only.  ``also``: another graph
    holding these nodes (the full graph a pruned one came from), whose nodes of the same ids get the same marks.
    A unit that writes nothing in the graph (no outgoing edge: a node kept for its QK pairs) joins no family."""
    if not isinstance(cfg, FamilyConfig):
        raise BadInputError(f"the family rule is a FamilyConfig (graphs.families), not {type(cfg).__name__}")
    kinds = (NodeKind.LORSA, NodeKind.TRANSCODER) if cfg.transcoders else (NodeKind.LORSA,)
    nodes = [n for n in graph.node_list if n.type in kinds]
    for n in graph.node_list + (also.node_list if also is not None else []):
        n.family, n.family_cosine, n.family_lens = None, None, None
    if cfg.direction == "weights":
        if model is None:
            raise BadInputError("family direction 'weights' needs the model (its W_O rows and decoders)")
        dirs = output_directions(model, nodes)  # [m, d]
    elif cfg.direction == "target":
        dirs = target_directions(graph, nodes)  # [m, 1]
    else:
        dirs = read_directions(graph, nodes)  # [m, N]
    sizes = _row_norms(dirs)  # [m]
    units = [Unit(n.type, n.layer, n.pos, _key(n, cfg) if sizes[i] > 0 else -1, abs(n.activation) * float(sizes[i]),
                  n.index) for i, n in enumerate(nodes)]  # key -1: in no slot
    groups = group(units, dirs, cfg)
    ranks: dict[tuple, int] = {}
    for g in groups:
        members = [nodes[i] for i in g]
        lead = members[0]
        low = min(m.layer for m in members)
        rank = ranks[(lead.type, low, lead.pos)] = ranks.get((lead.type, low, lead.pos), -1) + 1
        fid = family_id(lead.type, low, rank, lead.pos)
        for m, c in zip(members, mean_direction_cosines(_rows(dirs, g)).tolist()):
            m.family, m.family_cosine = fid, c
            if also is not None and m.id in also.index:
                twin = also.node(m.id)
                twin.family, twin.family_cosine = fid, c
    graph.settings["families"] = cfg.to_json()
    if also is not None:
        also.settings["families"] = cfg.to_json()
    return families(graph)


def _key(n: Node, cfg: FamilyConfig) -> int:
    if n.type == NodeKind.TRANSCODER:
        return n.pos
    return z_key(n.z_pattern, cfg.min_share) if n.z_pattern else -1


def families(graph: AttributionGraph, min_members: int = 2) -> list[Family]:
    """The families whose members the graph holds (at least ``min_members`` of them), by position, then
    lowest layer, then kind and rank (``fam.lorsa.1.2`` before ``fam.lorsa.1.10``); members strongest (largest
    activation) first."""
    found: dict[str, list[Node]] = {}
    for n in graph.node_list:
        if getattr(n, "family", None):
            found.setdefault(n.family, []).append(n)
    out = []
    for fid, ns in found.items():
        if len(ns) < min_members:
            continue
        ns.sort(key=lambda n: (-abs(n.activation), n.layer, n.index))
        keys = tuple(sorted({n.pos if n.type == NodeKind.TRANSCODER else _key(n, FamilyConfig()) for n in ns}))
        cos = [n.family_cosine for n in ns if n.family_cosine is not None]
        out.append(Family(fid, ns[0].type, ns[0].pos, [n.id for n in ns], tuple(sorted({n.layer for n in ns})), keys,
                          sum(cos) / len(cos) if cos else float("nan"), sum(n.activation for n in ns)))
    return sorted(out, key=lambda f: (f.pos, f.layers[0], f.kind.value, _rank(f.id), f.id))


def _rank(fid: str) -> int:
    """A family id's rank K (``fam.lorsa.L.K@P``); -1 for an id of another form (a graph.json from elsewhere)."""
    m = _FAMILY_ID.match(fid)
    return int(m.group(3)) if m else -1


def family(graph: AttributionGraph, family_id_: str) -> Family:
    """The family ``family_id_`` of the graph; raises BadInputError (one line) if there is none."""
    fams = {f.id: f for f in families(graph)}
    if family_id_ not in fams:
        known = ", ".join(list(fams)[:8]) + (", ..." if len(fams) > 8 else "")
        raise BadInputError(f"no family {family_id_!r} in this graph" + (f" (families: {known})" if fams else
                                                                       " (it has no families)"))
    return fams[family_id_]


def family_label(f: Family) -> str:
    """``L1 x21 ←60`` (a layer, or ``L1-2``, the member count and, for heads, the key position they attend to)."""
    layers = f"L{f.layers[0]}" + (f"-{f.layers[-1]}" if len(f.layers) > 1 else "")
    key = f" ←{f.key_positions[0]}" if f.kind == NodeKind.LORSA and f.key_positions else ""
    return f"{layers} x{len(f)}{key}"


def family_components(f: Family) -> tuple:
    """The family as one unit for path patching: the tuple of its members (graphs/patching.py ablates a tuple
    together)."""
    from .patching import parse_component

    return tuple(parse_component(m) for m in f.members)


def predicted_effect(graph: AttributionGraph, f: Family, logit_id: str) -> float:
    """The graph's prediction of zero-ablating the family: the sum of its members' `graph_effects` on the logit."""
    from .patching import graph_effects, set_effect

    return set_effect(graph, graph_effects(graph, logit_id), f.members)


def family_contrast(graph: AttributionGraph, f: Family, fams: list[Family] | None = None
                    ) -> tuple[QKContrast, int] | None:
    """Why a family of heads looks at its key rather than elsewhere: its members' `QKContrast`s at the family's
    key position (graphs/contrast.py), summed over the members that have one, and how many members those are.
    The difference, its parts (pairs_total, query_bias_x_keys, position) and the reference score are the members'
    sums, exact; pairs and marginals sum what each member keeps (its strongest few, `trace`'s ``top_pairs``) by
    node, each end that is a member of a family named by that family, strongest first, so they need not add up
    to pairs_total.  ``reference_pos`` is the members' runner-up key when they share one, else -1.  ``graph``:
    the graph that holds the members (a collapsed graph's ``expanded``); ``fams``: its `families` (found again
    when not given).  None for a family of features, or when no member holds a contrast at that key (traced
    without QK, or the key is the only one)."""
    if f.kind != NodeKind.LORSA or not f.key_positions:
        return None
    key = f.key_positions[0]
    contrasts = [e.contrast for m in f.members for e in graph.node(m).qk if e.key_pos == key and e.contrast]
    if not contrasts:
        return None
    family_of = {m: g.id for g in (families(graph) if fams is None else fams) for m in g.members}
    named = lambda node_id: family_of.get(node_id, node_id)  # noqa: E731

    def summed(items) -> list[tuple]:  # (name, weight) pairs summed by name, strongest first
        out: dict = {}
        for k, w in items:
            out[k] = out.get(k, 0.0) + w
        return sorted(out.items(), key=lambda kv: -abs(kv[1]))

    total = lambda field: sum(getattr(c, field) for c in contrasts)  # noqa: E731
    refs = {c.reference_pos for c in contrasts}
    return QKContrast(
        reference=contrasts[0].reference, reference_pos=refs.pop() if len(refs) == 1 else -1,
        reference_score=total("reference_score"), difference=total("difference"), pairs_total=total("pairs_total"),
        query_bias_x_keys=total("query_bias_x_keys"), position=total("position"),
        pairs=[QKPair(q, k, w) for (q, k), w in summed(((named(p.query), named(p.key)), p.weight)
                                                        for c in contrasts for p in c.pairs)],
        query_marginals=summed((named(u), w) for c in contrasts for u, w in c.query_marginals),
        key_marginals=summed((named(u), w) for c in contrasts for u, w in c.key_marginals),
    ), len(contrasts)


# -- the collapsed graph ----------------------------------------------------------------------------------------

def collapse_edges(src: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, kind: torch.Tensor, group_of: torch.Tensor,
                   is_member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edges [E] (src, tgt, w, kind codes) mapped through ``group_of`` [N] (a node's index in the collapsed graph)
    and summed per (source, target, kind); edges between two members of one family (``is_member`` [N]) are
    dropped.  Returns the collapsed (src, tgt, w, kind), sorted by (source, target, kind)."""
    s, t = group_of[src], group_of[tgt]
    keep = ~((s == t) & is_member[src] & is_member[tgt])
    s, t, w, kind = s[keep], t[keep], w[keep].double(), kind[keep].long()
    n = int(group_of.max()) + 1 if len(group_of) else 1
    code = (s * n + t) * len(EdgeArrays.KINDS) + kind
    uniq, inv = torch.unique(code, return_inverse=True)
    summed = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, w)
    k = uniq % len(EdgeArrays.KINDS)
    st = uniq // len(EdgeArrays.KINDS)
    return st // n, st % n, summed.float(), k.to(torch.int8)


def collapse(graph: AttributionGraph, fams: list[Family] | None = None) -> AttributionGraph:
    """The graph with each family of ``fams`` (default: every family it holds) as one node (module docstring).
    Other nodes keep their order; each family node takes the place of its first member in node order."""
    fams = families(graph) if fams is None else fams
    if not fams:
        return graph
    fam_of = {m: f for f in fams for m in f.members}
    nodes, group_of, placed = [], [], {}
    for n in graph.node_list:
        f = fam_of.get(n.id)
        if f is None:
            group_of.append(len(nodes))
            nodes.append(n)
        else:
            if f.id not in placed:
                placed[f.id] = len(nodes)
                nodes.append(_family_node(graph, f))
            group_of.append(placed[f.id])
    group_of_t = torch.tensor(group_of, dtype=torch.long)
    is_member = torch.tensor([n.id in fam_of for n in graph.node_list], dtype=torch.bool)
    E = graph.edge_arrays
    src, tgt, w, kind = collapse_edges(E.src, E.tgt, E.w, E.kind, group_of_t, is_member)
    out = AttributionGraph(graph.prompt, graph.tokens, graph.token_ids, nodes, EdgeArrays(src, tgt, w, kind),
                           dict(graph.settings), dict(graph.scores))
    out.expanded = graph  # where the members' QK pairs are (`layout.drawn_qk` draws a family's)
    return out


def _family_node(graph: AttributionGraph, f: Family) -> Node:
    ms = [graph.node(m) for m in f.members]
    z = None
    if all(m.z_pattern is not None for m in ms):
        width = max(len(m.z_pattern) for m in ms)
        z = [sum(m.z_pattern[s] for m in ms if s < len(m.z_pattern)) for s in range(width)]
    rank = _rank(f.id)
    return Node(f.id, f.kind, f.layers[0], f.pos, rank, activation=sum(m.activation for m in ms),
                influence=sum(m.influence for m in ms), label=family_label(f), const=sum(m.const for m in ms),
                preact=sum(m.preact for m in ms), dropped=sum(m.dropped for m in ms), z_pattern=z,
                members=list(f.members), lens=ms[0].family_lens)
