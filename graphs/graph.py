"""`AttributionGraph`: typed nodes, typed weighted edges, typed QK results, the prompt, settings, and queries.

A node's identity is a `NodeKey` (kind, layer, index, position).  Its string form, the node id, is made by
`NodeKey.__str__` (`NodeKey.ids` for many nodes of one kind and layer at once) and read back by `NodeKey.parse`;
a family's id is made by graphs/families.py's `family_id` and read by `FAMILY_ID`; ids never collide between kinds:

    emb@{pos}                 token embedding at a position
    lorsa.{L}.{head}@{pos}    a Lorsa head active at a query position
    tc.{L}.{feature}@{pos}    a transcoder feature active at a position
    attn_err.{L}@{pos}        the attention error of layer L at a position
    mlp_err.{L}@{pos}         the MLP error of layer L at a position
    logit.{token_id}@{pos}    an output logit (demeaned) at the last position
    fam.lorsa.{L}.{K}@{pos}   a family of heads (fam.tc. of features), a node of collapsed graphs only
                              (graphs/families.py; its members carry its id in ``Node.family``)

Edges run source -> target; ``kind`` is ``ov`` (into a Lorsa head, weighted by its pattern) or ``direct``
(into a feature or a logit through the residual stream).  A Lorsa head's attention scores are explained
by `QKEntry`s (one per explained key position) of `QKPair`s (a query-side node x a key-side node; see
graphs/qk.py); `AttributionGraph.qk` lists them as `QKLink`s.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from replacement.errors import BadInputError


class NodeKind(str, Enum):
    """What a node is; equal to (and printed as) its plain name, e.g. ``NodeKind.LORSA == "lorsa"``."""

    EMBEDDING = "embedding"
    LORSA = "lorsa"
    TRANSCODER = "transcoder"
    ATTN_ERROR = "attn_error"
    MLP_ERROR = "mlp_error"
    LOGIT = "logit"

    __str__ = str.__str__
    __format__ = str.__format__


NODE_TYPES = tuple(NodeKind)
FEATURE_KINDS = (NodeKind.LORSA, NodeKind.TRANSCODER)  # sparse units: written by an activation, explained by edges
ERROR_KINDS = (NodeKind.ATTN_ERROR, NodeKind.MLP_ERROR)
INPUT_KINDS = (NodeKind.EMBEDDING,) + ERROR_KINDS  # nodes with no incoming edges
TARGET_KINDS = FEATURE_KINDS + (NodeKind.LOGIT,)  # nodes whose pre-activation the incoming edges explain


def stage(kind: "NodeKind | str", layer: int) -> float:
    """Where a node of ``kind`` in ``layer`` sits in the forward pass: embeddings (-1), then each layer's attention
    (2L: Lorsa heads, the attention error) and MLP (2L + 1: transcoder features, the MLP error), then logits (inf).
    Edges run from an earlier stage to a later one; pictures draw the stages as rows, bottom to top."""
    kind = NodeKind(kind)
    if kind == NodeKind.EMBEDDING:
        return -1
    if kind == NodeKind.LOGIT:
        return math.inf
    return 2 * layer + (kind in (NodeKind.TRANSCODER, NodeKind.MLP_ERROR))

# the id's prefix, and which of layer and index the id holds, per kind
_ID_PREFIX = {NodeKind.EMBEDDING: "emb", NodeKind.LORSA: "lorsa", NodeKind.TRANSCODER: "tc",
              NodeKind.ATTN_ERROR: "attn_err", NodeKind.MLP_ERROR: "mlp_err", NodeKind.LOGIT: "logit"}
_ID_KIND = {v: k for k, v in _ID_PREFIX.items()}
ID_PREFIXES = [x for x in _ID_PREFIX.values() if x not in NODE_TYPES]  # names of kinds besides NODE_TYPES: "tc", ...
_ID_HAS_LAYER = {NodeKind.LORSA, NodeKind.TRANSCODER, NodeKind.ATTN_ERROR, NodeKind.MLP_ERROR}
_ID_HAS_INDEX = {NodeKind.LORSA, NodeKind.TRANSCODER, NodeKind.LOGIT}
_ID_PATTERN = re.compile(r"^([a-z_]+)((?:\.\d+){0,2})@(\d+)$")
ID_FORMS = "emb@P, lorsa.L.H@P, tc.L.F@P, attn_err.L@P, mlp_err.L@P or logit.T@P"


@dataclass(frozen=True)
class NodeKey:
    """A node's identity.  ``layer`` and ``index`` are -1 where the id holds none (an embedding's layer and
    token, a logit's layer, an error node's index); the node itself keeps them (`Node.layer`, `Node.index`)."""

    kind: NodeKind
    layer: int = -1
    index: int = -1
    pos: int = 0

    def __post_init__(self):
        kind = NodeKind(self.kind)
        object.__setattr__(self, "kind", kind)
        if kind not in _ID_HAS_LAYER:
            object.__setattr__(self, "layer", -1)
        if kind not in _ID_HAS_INDEX:
            object.__setattr__(self, "index", -1)

    def __str__(self) -> str:
        parts = [_ID_PREFIX[self.kind]] + [str(self.layer)] * (self.kind in _ID_HAS_LAYER)
        return ".".join(parts + [str(self.index)] * (self.kind in _ID_HAS_INDEX)) + f"@{self.pos}"

    @staticmethod
    def ids(kind: NodeKind, layer: int, indices: list[int], positions: list[int]) -> list[str]:
        """The ids of many nodes of one kind and layer (the same strings as ``str(NodeKey(...))``, made without
        a key object per node)."""
        key = NodeKey(kind, layer, 0, 0)
        head = ".".join([_ID_PREFIX[key.kind]] + [str(key.layer)] * (key.kind in _ID_HAS_LAYER))
        if key.kind in _ID_HAS_INDEX:
            return [f"{head}.{i}@{p}" for i, p in zip(indices, positions)]
        return [f"{head}@{p}" for p in positions]

    @staticmethod
    def parse(text: str) -> "NodeKey":
        """The key of a node id (see the module docstring); raises BadInputError (one line) otherwise."""
        if not isinstance(text, str):
            raise BadInputError(f"a node id is text ({ID_FORMS}), not {type(text).__name__}")
        m = _ID_PATTERN.match(text.strip())
        kind = _ID_KIND.get(m.group(1)) if m else None
        numbers = [int(x) for x in m.group(2).split(".")[1:]] if m else []
        if kind is None or len(numbers) != (kind in _ID_HAS_LAYER) + (kind in _ID_HAS_INDEX):
            raise BadInputError(f"cannot parse node id {text!r}; use {ID_FORMS}")
        layer = numbers.pop(0) if kind in _ID_HAS_LAYER else -1
        return NodeKey(kind, layer, numbers[0] if numbers else -1, int(m.group(3)))


def input_shares(tgt: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """[E] each edge's |w| as a share of all |w| into its target (edges into targets tgt [E] of ``n`` nodes)."""
    totals = torch.zeros(n).index_add_(0, tgt, w.abs())
    return w.abs() / totals[tgt].clamp_min(1e-30)


def unit_label(kind: NodeKind, layer: int, index: int) -> str:
    """The short name of a Lorsa head (``L1.H5``) or transcoder feature (``L1.F5``)."""
    return f"L{layer}.{'H' if kind == NodeKind.LORSA else 'F'}{index}"


class UnknownNodeError(BadInputError, KeyError):
    """A node (or logit) the graph does not hold: a one-line `BadInputError`, and a `KeyError` as a lookup's miss."""

    __str__ = BadInputError.__str__  # the message as written (KeyError's would quote it)


def check_k(k: int | None) -> None:
    """How many of the strongest to take: None (all) or at least 1; one line otherwise (a negative k sliced off the
    weakest instead)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise BadInputError(f"k must be a whole number >= 1 (or None for all), not {k!r}")


def kind_of(name: str) -> NodeKind:
    """The kind a type name or an id prefix names ("lorsa", "transcoder" or "tc", "embedding" or "emb", ...);
    BadInputError (one line) otherwise."""
    kind = _ID_KIND.get(name) or next((k for k in NodeKind if k.value == name), None)
    if kind is None:
        raise BadInputError(f"unknown node type {name!r}; one of {', '.join(NodeKind)} (or an id's prefix: "
                            f"{', '.join(_ID_KIND)})")
    return kind


_NAMES = ((re.compile(r"L(\d+)\.([HF])(\d+)\s*@\s*(\d+)"),  # a head or feature as pictures and printed paths name it
           lambda m: NodeKey(NodeKind.LORSA if m[2] == "H" else NodeKind.TRANSCODER, int(m[1]), int(m[3]), int(m[4]))),
          (re.compile(r"emb\s*@\s*(\d+)"), lambda m: NodeKey(NodeKind.EMBEDDING, pos=int(m[1]))),
          (re.compile(r"L(\d+) (attn|MLP) error\s*@\s*(\d+)"),
           lambda m: NodeKey(NodeKind.ATTN_ERROR if m[2] == "attn" else NodeKind.MLP_ERROR, int(m[1]), pos=int(m[3]))))


# a family's id fam.{lorsa|tc}.{L}.{K}@{P} (graphs/families.py's `family_id`): groups tag, layer, rank, position
FAMILY_ID = re.compile(r"fam\.(lorsa|tc)\.(\d+)\.(\d+)@(\d+)")
_FAMILY_NAME = re.compile(rf"family .*?({FAMILY_ID.pattern})(?: |$)")  # as `layout.node_name` names one
_LOGIT_NAME = re.compile(r'logit "(.*)"(?: \(p=[^)]*\))?(?: @(\d+))?$')
_FAMILY_BOX = re.compile(r"L(\d+)(?:-\d+)? x\d+(?: ←\d+)?\s+fam (\d+) @(\d+)")  # a family's box in a picture


def id_of_unit_label(text: str) -> str:
    """The node id a name stands for: a unit's short name at a position (``L1.H5@3`` -> ``lorsa.1.5@3``, ``L1.F5@3``
    -> ``tc.1.5@3``, as the pictures write them), or the start of a name `trace` and `circuits query` print (``L0.H136
    @4 " =" ...``, ``emb @1 "36"``, ``L3 MLP error @4 " ="``); any other text as it is, stripped."""
    text = text.strip()
    m = _FAMILY_NAME.match(text)
    if m:
        return m[1]
    for pattern, key in _NAMES:
        m = pattern.match(text)
        if m and (m.end() == len(text) or text[m.end()] == " "):
            return str(key(m))
    return text


@dataclass
class QKPair:
    """One term of a head's attention score at one key position: a query-side node x a key-side node.  A node's
    query or key vector is everything it writes that reaches the head's input through fixed linear maps, a
    transcoder's skip connection included: with a skip transcoder, most of an embedding's part can be its path
    through the skip (docs/qk.md)."""

    query: str  # node id
    key: str  # node id
    weight: float

    def to_json(self) -> list:
        return [self.query, self.key, self.weight]


@dataclass
class QKContrast:
    """Why the head looks at key position s rather than elsewhere: its score at s minus a reference score
    (``reference`` "mean": the attention-weighted mean of the scores of the other keys, "runner_up": the
    score of the strongest other key, at ``reference_pos``), split exactly (graphs/contrast.py):

        difference = pairs_total + query_bias_x_keys + position

    The key side of a pair is a unit (a Lorsa head, a transcoder feature, a token's embedding, a layer's error)
    summed over the key positions with weight (1 at s) - (its reference weight there), so what is the same at
    s and the reference cancels; ``key`` names its node at the position that gives most of the unit's term (for a
    key that loses to the reference, often the reference's position: the unit adds there, and the key lacks it).
    ``position``: the query (every node and the bias) x the difference of the key biases (the key's constant
    terms: rotated by the key position where the model has rotary, divided by each position's norm scale).
    Marginals, strongest first: a query node's row of the difference table plus its part of ``position`` (its
    query x the key biases' difference); a key unit's column plus its part of ``query_bias_x_keys`` (the query
    bias x its key difference).  Over every node, the query marginals add up to pairs_total + position and the
    key marginals to pairs_total + query_bias_x_keys.  A pair's or marginal's key-side node may be at another
    position than s.  The query bias is the query's constant part: the model's biases and the replacements'
    (Lorsa b_O, transcoder b_dec) in the residual stream, through W_Q (and b_Q)."""

    reference: str
    reference_pos: int  # the runner-up's key position; -1 for the mean
    reference_score: float
    difference: float
    pairs: list[QKPair] = field(default_factory=list)
    pairs_total: float = 0.0
    query_bias_x_keys: float = 0.0
    position: float = 0.0
    query_marginals: list[tuple[str, float]] = field(default_factory=list)
    key_marginals: list[tuple[str, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in _CONTRAST_NUMBERS}
        d.update(pairs=[p.to_json() for p in self.pairs], query_marginals=[list(m) for m in self.query_marginals],
                 key_marginals=[list(m) for m in self.key_marginals])
        return d

    @staticmethod
    def from_json(d: dict) -> "QKContrast":
        return QKContrast(**{k: d[k] for k in _CONTRAST_NUMBERS}, pairs=[QKPair(*p) for p in d["pairs"]],
                          query_marginals=[tuple(m) for m in d["query_marginals"]],
                          key_marginals=[tuple(m) for m in d["key_marginals"]])


_CONTRAST_NUMBERS = ("reference", "reference_pos", "reference_score", "difference", "pairs_total",
                     "query_bias_x_keys", "position")
CONTRAST_REFERENCES = ("mean", "runner_up")


@dataclass
class QKEntry:
    """A Lorsa head's pre-softmax score at one key position, split exactly: pairs_total (sum of every
    query-node x key-node term, of which ``pairs`` are the strongest) + query_bias_x_keys + queries_x_key_bias
    + bias_x_bias = score; marginals: each node's summed share of the score, strongest first."""

    key_pos: int
    attention: float
    score: float = 0.0
    pairs: list[QKPair] = field(default_factory=list)
    pairs_total: float = 0.0
    query_bias_x_keys: float = 0.0
    queries_x_key_bias: float = 0.0
    bias_x_bias: float = 0.0
    query_marginals: list[tuple[str, float]] = field(default_factory=list)
    key_marginals: list[tuple[str, float]] = field(default_factory=list)
    contrast: QKContrast | None = None  # why this key rather than the reference (None: one key only)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in _QK_NUMBERS}
        d.update(pairs=[p.to_json() for p in self.pairs], query_marginals=[list(m) for m in self.query_marginals],
                 key_marginals=[list(m) for m in self.key_marginals])
        if self.contrast is not None:
            d["contrast"] = self.contrast.to_json()
        return d

    @staticmethod
    def from_json(d: dict) -> "QKEntry":
        return QKEntry(**{k: d[k] for k in _QK_NUMBERS}, pairs=[QKPair(*p) for p in d["pairs"]],
                       query_marginals=[tuple(m) for m in d["query_marginals"]],
                       key_marginals=[tuple(m) for m in d["key_marginals"]],
                       contrast=QKContrast.from_json(d["contrast"]) if d.get("contrast") else None)


_QK_NUMBERS = ("key_pos", "attention", "score", "pairs_total", "query_bias_x_keys", "queries_x_key_bias", "bias_x_bias")


@dataclass(frozen=True)
class QKLink:
    """A QK pair in the context of its head (a view: `AttributionGraph.qk`, `qk_pairs`)."""

    head: str  # the Lorsa head's node id
    entry: QKEntry
    pair: QKPair

    query = property(lambda self: self.pair.query)
    key = property(lambda self: self.pair.key)
    weight = property(lambda self: self.pair.weight)
    key_pos = property(lambda self: self.entry.key_pos)
    attention = property(lambda self: self.entry.attention)


@dataclass
class Node:
    id: str
    type: NodeKind  # a plain name ("lorsa") is taken as its NodeKind
    layer: int  # -1 for embeddings, n_layers for logits
    pos: int
    index: int  # head, feature or token id (-1 for errors)
    activation: float = 0.0  # head/feature activation; logit value for logits
    influence: float = 0.0
    label: str = ""
    prob: float = 0.0  # logits only
    const: float = 0.0  # targets: bias terms of the pre-activation
    preact: float = 0.0  # targets: the pre-activation the incoming edges (plus const) explain
    dropped: float = 0.0  # targets: summed weight of incoming edges not kept (edges_per_target)
    z_pattern: list[float] | None = None  # Lorsa heads: A_{t,s} v_s for s <= t (sums to the head's z)
    qk: list[QKEntry] = field(default_factory=list)  # Lorsa heads: the explained key positions
    family: str | None = None  # heads/features: the id of the family it belongs to (graphs/families.py)
    family_cosine: float | None = None  # a member: its output direction's cosine with its family's mean direction
    members: list[str] | None = None  # a family node of a collapsed graph: its members' node ids
    lens: list[list] | None = None  # heads/features: [[token, demeaned logit per unit activation], ...] (graphs/lens.py)
    family_lens: list[list] | None = None  # a family's member: the lens of the family's summed output (graphs/lens.py)

    def __post_init__(self):
        self.type = NodeKind(self.type)

    @staticmethod
    def make(kind: NodeKind, layer: int, index: int, pos: int, **fields) -> "Node":
        """A node with the id of its key."""
        return Node(str(NodeKey(kind, layer, index, pos)), kind, layer, pos, index, **fields)

    @property
    def is_family(self) -> bool:
        """Whether this is a family node of a collapsed graph (`AttributionGraph.collapsed`): its type is its
        members' (lorsa or transcoder), its index the family's rank, its ``members`` their ids."""
        return self.members is not None

    @property
    def key(self) -> NodeKey:
        """The unit's key (its id, parsed); a family node has none (BadInputError): its id is ``fam.``..."""
        if self.is_family:
            raise BadInputError(f"{self.id} is a family node; it has no unit key (its members: `members`)")
        return NodeKey(self.type, self.layer, self.index, self.pos)


@dataclass
class Edge:
    source: str
    target: str
    weight: float
    kind: str = "direct"  # ov | direct


def _kind_code(kind: str, allowed: tuple[str, ...]) -> int:
    """An edge kind's code in `EdgeArrays.KINDS`; BadInputError for a kind not in ``allowed``."""
    if kind not in allowed:
        raise BadInputError(f"unknown edge kind {kind!r}; use one of {', '.join(allowed)}")
    return EdgeArrays.KINDS.index(kind)


class EdgeArrays:
    """Compact edge storage: node-index tensors src/tgt, weights, and kind codes (ov, direct)."""

    KINDS = ("ov", "direct")

    def __init__(self, src=None, tgt=None, w=None, kind=None):
        self._parts: list[tuple] = []
        if src is not None:
            self._parts.append((src.long(), tgt.long(), w.float(), kind.to(torch.int8)))
        self._cat = None

    def add(self, src: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, kind: str) -> None:
        code = torch.full((len(src),), self.KINDS.index(kind), dtype=torch.int8)
        self._parts.append((src.long(), tgt.long(), w.float(), code))
        self._cat = None

    def extend(self, other: "EdgeArrays") -> None:
        """Append ``other``'s edges."""
        self._parts.extend(other._parts)
        self._cat = None

    def _merged(self):
        if self._cat is None:
            if not self._parts:
                e = torch.zeros(0, dtype=torch.long)
                self._cat = (e, e, torch.zeros(0), torch.zeros(0, dtype=torch.int8))
            else:
                self._cat = tuple(torch.cat(x) for x in zip(*self._parts))
                self._parts = [self._cat]
        return self._cat

    src = property(lambda self: self._merged()[0])
    tgt = property(lambda self: self._merged()[1])
    w = property(lambda self: self._merged()[2])
    kind = property(lambda self: self._merged()[3])

    def __len__(self) -> int:
        return len(self.src)

    def select(self, mask: torch.Tensor, remap: torch.Tensor | None = None) -> "EdgeArrays":
        """The edges where ``mask`` [E] is true; ``remap`` [n] renumbers their nodes."""
        idx = mask.nonzero().squeeze(1)  # once, not once per array as four boolean indexings would
        src, tgt = self.src.index_select(0, idx), self.tgt.index_select(0, idx)
        if remap is not None:
            src, tgt = remap[src], remap[tgt]
        return EdgeArrays(src, tgt, self.w.index_select(0, idx), self.kind.index_select(0, idx))


class AttributionGraph:
    def __init__(self, prompt: str, tokens: list[str], token_ids: list[int], nodes: list[Node],
                 edges: "EdgeArrays | list[Edge]", settings: dict | None = None, scores: dict | None = None):
        self.prompt, self.tokens, self.token_ids = prompt, tokens, token_ids
        self.node_list = nodes
        self.index = {n.id: i for i, n in enumerate(nodes)}
        if isinstance(edges, list):  # from Edge objects (files, tests)
            edges = EdgeArrays(torch.tensor([self.index[e.source] for e in edges], dtype=torch.long),
                               torch.tensor([self.index[e.target] for e in edges], dtype=torch.long),
                               torch.tensor([e.weight for e in edges], dtype=torch.float32),
                               torch.tensor([EdgeArrays.KINDS.index(e.kind) for e in edges], dtype=torch.int8))
        self.edge_arrays = edges
        self._qk: list[QKLink] | None = None  # derived from the Lorsa heads' `qk` (see `qk`)
        self.explain_heads = None  # attribute(..., qk_defer=True): explains Lorsa heads on demand (`prune` calls it)
        self.settings = settings or {}
        self.scores = scores or {}
        self.expanded: AttributionGraph | None = None  # a collapsed graph's: the graph its families were found in
        self.marked_target: str | None = None  # a file's is_target_logit, where the scores name no target

    @property
    def qk(self) -> list[QKLink]:
        """Every QK pair of every Lorsa head's `qk` entries whose two nodes are in this graph (`qk_pairs(head,
        outside=True)` gives a head's others too)."""
        if self._qk is None:
            self._qk = [QKLink(n.id, entry, p) for n in self.node_list for entry in n.qk for p in entry.pairs
                        if p.query in self.index and p.key in self.index]
        return self._qk

    def invalidate_qk(self) -> None:
        """Forget the derived QK pairs (`qk`) after Lorsa heads' ``qk`` entries changed (explained later)."""
        self._qk = None

    # -- queries ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.node_list)

    @property
    def edges(self) -> list[Edge]:
        """Every OV/direct edge as an `Edge` (use on pruned graphs; full graphs can hold millions)."""
        E = self.edge_arrays
        ids = [n.id for n in self.node_list]
        return [Edge(ids[s], ids[t], w, EdgeArrays.KINDS[k]) for s, t, w, k in
                zip(E.src.tolist(), E.tgt.tolist(), E.w.tolist(), E.kind.tolist())]

    def resolve(self, name: str) -> str:
        """The id ``name`` stands for: an id as it is, or a name the pictures and printed paths give a node
        (`id_of_unit_label`: a unit's or a family's), a logit as `trace` prints it (``logit " 98" (p=0.958)
        @4``), or a family as its box in a picture reads (``L1 x21 ←60 fam 0 @64``); the text itself, stripped, when
        it names nothing here."""
        found = name if name in self.index else id_of_unit_label(name)
        logit = _LOGIT_NAME.match(name.strip())
        if found not in self.index and logit:
            from .layout import one_line

            hits = [n.id for n in self.nodes(type=NodeKind.LOGIT) if one_line(n.label) == logit[1]
                    and (logit[2] is None or n.pos == int(logit[2]))]
            found = hits[0] if len(hits) == 1 else found
        box = _FAMILY_BOX.match(name.strip())  # "L1 x21 ←60 fam 0 @64", as a picture's box reads (layout.box_label)
        if found not in self.index and box:
            ids = {f.id for f in self.families()}  # "←key": heads; none: features (or heads with no key)
            tags = ("lorsa",) if "\u2190" in box[0] else ("tc", "lorsa")
            found = next((i for i in (f"fam.{t}.{box[1]}.{box[2]}@{box[3]}" for t in tags) if i in ids), found)
        return found

    def node(self, node_id: "str | Node | NodeKey") -> Node:
        """A node by its id, or by a name the pictures and printed paths give it (`resolve`), or this graph's node
        of a `Node` or `NodeKey` (by its id); `UnknownNodeError` (a BadInputError and a KeyError) if it holds none."""
        if isinstance(node_id, (Node, NodeKey)):
            node_id = node_id.id if isinstance(node_id, Node) else str(node_id)
        if not isinstance(node_id, str):
            raise BadInputError(f"a node is named by its id (text), a Node or a NodeKey, not {type(node_id).__name__}")
        found = self.resolve(node_id)
        if found not in self.index:
            family = node_id.startswith("fam.") and node_id in {f.id for f in self.families()}
            raise UnknownNodeError(f"no node {node_id!r} in this graph" + ("; a family is a node of `collapsed()`"
                                                                           if family else ""))
        return self.node_list[self.index[found]]

    def nodes(self, type: str | None = None, layer: int | None = None, position: int | None = None) -> list[Node]:
        """The nodes of one type (a `NodeKind`, its name or an id's prefix: "tc"), layer and/or position (each None:
        any); an unknown type is a BadInputError.  A collapsed graph's family nodes have their members' type
        (`Node.is_family` tells them apart)."""
        type = None if type is None else kind_of(type)
        for name, value in (("layer", layer), ("position", position)):  # "1" matched nothing, without a word
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise BadInputError(f"nodes(): {name} must be a whole number (or None), not {value!r}")
        return [n for n in self.node_list if (type is None or n.type == type) and (layer is None or n.layer == layer)
                and (position is None or n.pos == position)]

    def logits(self) -> list[Node]:
        """The logit nodes, most probable first."""
        return sorted(self.nodes(type="logit"), key=lambda n: -n.prob)

    @property
    def target(self) -> Node:
        """The logit node the graph was traced for: `attribute`'s ``target`` (`trace --target`), else the most
        probable logit.  Paths end there by default; graph.json marks it ``is_target_logit`` (read back where its
        scores name none)."""
        traced = self.scores.get("logit_decomposition", {}).get("target", {}).get("node") or self.marked_target
        if traced in self.index:
            return self.node_list[self.index[traced]]
        if not self.logits():
            raise BadInputError("this graph holds no logit node (a subgraph without one?), so it has no target")
        return self.logits()[0]

    def logit(self, token: "int | str") -> Node:
        """The logit node of a token, by its id or its text as the graph labels it (``" 98"``); KeyError if it is
        not among the graph's logits."""
        for n in self.nodes(type=NodeKind.LOGIT):
            if (n.index == token) if isinstance(token, int) else (n.label == token):
                return n
        raise UnknownNodeError(f"no logit node for token {token!r} in this graph")

    def _edges_where(self, mask: torch.Tensor, k: int | None) -> list[Edge]:
        check_k(k)
        E = self.edge_arrays
        idx = mask.nonzero()[:, 0]
        idx = idx[E.w[idx].abs().argsort(descending=True)][:k]
        ids = [n.id for n in self.node_list]
        return [Edge(ids[int(E.src[i])], ids[int(E.tgt[i])], float(E.w[i]), EdgeArrays.KINDS[int(E.kind[i])]) for i in idx]

    def incoming(self, node: "str | Node | NodeKey", k: int | None = None,
                 kind: str | None = None) -> "list[Edge] | list[QKLink]":
        """The ``k`` strongest edges into a node (all: None), of one kind (ov, direct) or any; ``kind="qk"``: its QK
        pairs instead (`QKLink`s, `qk_pairs`)."""
        nid = self.node(node).id  # an id, a printed name, a Node or a NodeKey
        if kind == "qk":
            check_k(k)
            return self.qk_pairs(nid)[:k]
        mask = self.edge_arrays.tgt == self.index[nid]
        if kind is not None:
            mask &= self.edge_arrays.kind == _kind_code(kind, EdgeArrays.KINDS + ("qk",))
        return self._edges_where(mask, k)

    def outgoing(self, node: "str | Node | NodeKey", k: int | None = None, kind: str | None = None) -> list[Edge]:
        """The ``k`` strongest edges out of a node (all: None), of one kind (ov, direct) or any."""
        nid = self.node(node).id  # an id, a printed name, a Node or a NodeKey
        mask = self.edge_arrays.src == self.index[nid]
        if kind is not None:
            mask &= self.edge_arrays.kind == _kind_code(kind, EdgeArrays.KINDS)
        return self._edges_where(mask, k)

    def qk_pairs(self, node: "str | Node | NodeKey", outside: bool = False) -> list[QKLink]:
        """The QK pairs of one Lorsa head (all its explained key positions), strongest first: those whose two nodes
        this graph holds, or with ``outside`` every pair, also those naming a node the graph does not hold (a
        budgeted graph leaves out the features it did not expand, which still enter the QK split; ``pair.query in
        graph.index`` tells them apart)."""
        head = self.node(node)  # UnknownNodeError (a KeyError) for a node the graph lacks
        if head.type != NodeKind.LORSA:
            raise BadInputError(f"{head.id} is a {head.type.value} node; only Lorsa heads have QK pairs")
        if outside:
            links = [QKLink(head.id, entry, p) for entry in head.qk for p in entry.pairs]
        else:
            links = [e for e in self.qk if e.head == head.id]
        return sorted(links, key=lambda e: -abs(e.weight))

    def to_networkx(self, include_qk: bool = False):
        """A networkx DiGraph: node attributes are the Node's scalar fields (``type`` as its plain name; fields that
        are None and the lists ``qk``, ``z_pattern``, ``lens`` and ``members`` are left out, `node` has them; a
        collapsed graph's family node has ``is_family`` True and ``n_members``, every other node False), edge attributes
        ``weight`` and ``kind``, so that networkx's writers (GraphML, node-link JSON) take it as it is (but for
        GraphML, XML 1.0, a label holding a control character such as a token "\x01": node-link JSON keeps it).

        QK pairs are not edges of the linear graph (a pair is two sources of one score term); with ``include_qk``
        the result is a MultiDiGraph where each pair of `qk` adds two edges into its head, query side and key side,
        each with ``kind`` "qk", the pair's ``weight``, ``side`` (query, key), ``query_node``, ``key_node`` and
        ``key_pos``."""
        import networkx as nx

        g = nx.MultiDiGraph() if include_qk else nx.DiGraph()
        for n in self.node_list:
            attrs = {k: v for k, v in n.__dict__.items() if k != "id" and isinstance(v, (int, float, str))}
            family = {"is_family": n.is_family} | ({"n_members": len(n.members)} if n.is_family else {})
            g.add_node(n.id, **{**attrs, "type": n.type.value, **family})
        E = self.edge_arrays
        ids = [n.id for n in self.node_list]
        for s, t, w, k in zip(E.src.tolist(), E.tgt.tolist(), E.w.tolist(), E.kind.tolist()):
            g.add_edge(ids[s], ids[t], weight=w, kind=EdgeArrays.KINDS[k])
        if include_qk:
            for e in self.qk:
                for side, source in (("query", e.query), ("key", e.key)):
                    g.add_edge(source, e.head, weight=e.weight, kind="qk", side=side, query_node=e.query,
                               key_node=e.key, key_pos=e.key_pos)  # `key` names a MultiDiGraph's edge key
        return g

    def families(self) -> list:
        """The head (and feature) families whose members this graph holds (graphs/families.py: `Family`, with
        ``members``, ``layers``, ``key_positions`` and ``mean_cosine``); empty if the graph was made without."""
        from .families import families

        return families(self)

    def collapsed(self) -> "AttributionGraph":
        """This graph with each family as one node whose edges are its members' sums (graphs/families.py)."""
        from .families import collapse

        return collapse(self)

    def top_paths(self, to: str | None = None, k: int = 10, max_len: int = 12,
                  sources: tuple[str, ...] = INPUT_KINDS, families: bool = False,
                  min_len: int = 2) -> list[tuple[float, list[str]]]:
        """The k strongest paths of ``min_len`` to ``max_len`` nodes from a source node of the types ``sources``
        (by default embeddings and error nodes; the types with no incoming edges) into ``to`` (default: the
        target logit, `target`); ``min_len=3`` leaves out direct edges, so that every path passes through a head or feature.
        ``families``: on the collapsed graph (`collapsed`), where a family's members are one node (its id in the
        paths; ``to`` may name a member, which then stands for its family).

        A path's strength is the product, along it, of each edge's share of its target's absolute input (of the
        edges this graph holds: a pruned graph's shares, and so its strengths, are a little larger than the full's);
        paths come out strongest first (networkx's shortest simple paths on -log shares; the strongest alone,
        k = 1, by `_strongest_path` on the edge arrays, without networkx)."""
        whole = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)  # noqa: E731
        if not (whole(k) and whole(max_len) and whole(min_len)) or k < 1 or max_len < 1:
            # a k of 1.5 was never len(out): every simple path into the target was enumerated, without end
            raise BadInputError(f"top_paths needs whole numbers k >= 1 and max_len >= 1 (k={k!r}, max_len={max_len!r}, "
                                f"min_len={min_len!r})")
        if isinstance(to, (Node, NodeKey)):  # as `node` takes them
            to = to.id if isinstance(to, Node) else str(to)
        if to is not None and not isinstance(to, str):
            raise BadInputError(f"to= names a node by its id (text), a Node or a NodeKey, not {type(to).__name__}")
        to = None if to is None else self.resolve(to)  # a name as printed
        if to is not None and to not in self.index and not (families and to in {f.id for f in self.families()}):
            raise BadInputError(f"no node {to!r} in this graph")
        sources = (sources,) if isinstance(sources, str) else sources  # one kind given alone: not its characters
        sources = tuple(kind_of(x) for x in sources)  # a kind's name or an id's prefix ("emb")
        if families:
            collapsed = self.collapsed()
            if to is not None and to not in collapsed.index and to in self.index and self.node(to).family:
                to = self.node(to).family
            return collapsed.top_paths(to, k, max_len, sources, min_len=min_len)
        if k == 1:
            best = self._strongest_path(to, max_len, sources, min_len)
            return [] if best is None else [best]
        return self._top_paths_nx(to, k, max_len, sources, min_len)

    def feature_path(self, families: bool = False) -> tuple[float, list[str]] | None:
        """The strongest path from a token's embedding through at least one head or feature into the target logit
        (what `trace` prints as the strongest feature path; ``families``: on the collapsed graph), or None."""
        found = self.top_paths(to=self.target.id, k=1, sources=(NodeKind.EMBEDDING,), min_len=3, families=families)
        return found[0] if found else None

    def _strongest_path(self, to: str | None, max_len: int, sources: tuple[str, ...],
                        min_len: int = 2) -> tuple[float, list[str]] | None:
        """The strongest path of ``min_len`` to ``max_len`` nodes from a node of the types ``sources`` into ``to``:
        a hop-limited Bellman-Ford on -log shares, one vectorised relaxation per hop (costs are >= 0)."""
        target = self.index.get(to or self.target.id)
        if target is None:
            return None
        E, N = self.edge_arrays, len(self.node_list)
        live = E.w != 0
        src, tgt = E.src[live], E.tgt[live]
        cost = -torch.log(input_shares(E.tgt, E.w, N)[live].double())  # [E]
        kinds = set(sources)
        dist = torch.tensor([0.0 if n.type in kinds else math.inf for n in self.node_list], dtype=torch.float64)
        best = (float(dist[target]) if min_len <= 1 else math.inf, 0)  # (cost, hops) of the best path so far
        preds = []
        for hop in range(1, max_len):
            cand = dist[src] + cost  # [E]: paths of exactly `hop` edges ending with each edge
            dist = torch.full((N,), math.inf, dtype=torch.float64).scatter_reduce(0, tgt, cand, "amin")
            hit = (cand == dist[tgt]) & torch.isfinite(cand)
            pred = torch.full((N,), -1, dtype=torch.long)
            pred[tgt[hit]] = src[hit]
            preds.append(pred)
            if hop + 1 >= min_len and float(dist[target]) < best[0]:
                best = (float(dist[target]), hop)
        if not math.isfinite(best[0]):
            return None
        path = [target]
        for hop in range(best[1], 0, -1):
            path.append(int(preds[hop - 1][path[-1]]))
        ids = [self.node_list[i].id for i in reversed(path)]
        return math.exp(-best[0]), ids

    def _top_paths_nx(self, to: str | None, k: int, max_len: int, sources: tuple[str, ...],
                      min_len: int = 2) -> list[tuple[float, list[str]]]:
        """Yen's k shortest simple paths (networkx) on -log shares.  When no path can have more than ``max_len``
        nodes (nor fewer than ``min_len``), on the graph itself; else on a copy unrolled by hops, so that paths
        of the wrong length are never enumerated (skipping them could take forever when fewer than k fit)."""
        if min_len <= 2 and self._longest_path_nodes(max_len) <= max_len:
            return self._top_paths_plain(to, k, sources, min_len)
        return self._top_paths_unrolled(to, k, max_len, sources, min_len)

    def _longest_path_nodes(self, cap: int) -> int:
        """The number of nodes on the graph's longest path of live edges, or ``cap + 1`` if it is longer."""
        E, N = self.edge_arrays, len(self.node_list)
        live = E.w != 0
        src, tgt = E.src[live], E.tgt[live]
        depth = torch.zeros(N, dtype=torch.long)  # edges on the longest path ending at each node
        for _ in range(cap):
            new = depth.scatter_reduce(0, tgt, depth[src] + 1, "amax")
            if torch.equal(new, depth):
                return int(depth.max()) + 1 if N else 0
            depth = new
        return cap + 1

    def _top_paths_plain(self, to: str | None, k: int, sources: tuple[str, ...],
                         min_len: int = 2) -> list[tuple[float, list[str]]]:
        import networkx as nx

        target = to or self.target.id
        E = self.edge_arrays
        g = nx.DiGraph()
        ids = [n.id for n in self.node_list]
        shares = input_shares(E.tgt, E.w, len(self.node_list))
        for s, t, a in zip(E.src.tolist(), E.tgt.tolist(), shares.tolist()):
            if a > 0:
                g.add_edge(ids[s], ids[t], cost=-math.log(a))
        if target not in g:
            return []
        g.add_node("__src__")
        for n in self.node_list:
            if n.type in sources and n.id in g:
                g.add_edge("__src__", n.id, cost=0.0)
        out = []
        try:
            for path in nx.shortest_simple_paths(g, "__src__", target, weight="cost"):
                path = path[1:]
                if len(path) < min_len:  # the target itself, where it is a source
                    continue
                cost = sum(g[a][b]["cost"] for a, b in zip(path, path[1:]))
                out.append((math.exp(-cost), path))
                if len(out) == k:
                    break
        except nx.NetworkXNoPath:
            pass
        return out

    def _top_paths_unrolled(self, to: str | None, k: int, max_len: int, sources: tuple[str, ...],
                            min_len: int) -> list[tuple[float, list[str]]]:
        """Node (v, h) of the unrolled graph is v reached after h edges, so every path it enumerates has
        min_len..max_len nodes, and the enumeration ends when no more exist (the graph's edges only go forward,
        so a path of the unrolled graph is a simple path of this one)."""
        import networkx as nx

        target = self.index[to or self.target.id]
        E, N = self.edge_arrays, len(self.node_list)
        shares = input_shares(E.tgt, E.w, N)
        live = shares > 0
        src, tgt, cost = E.src[live], E.tgt[live], -torch.log(shares[live].double())
        # hops left to the target: only (v, h) with h + hops_to_target(v) <= max_len - 1 can lie on a path
        to_target = torch.full((N,), max_len, dtype=torch.long)
        to_target[target] = 0
        for _ in range(max_len - 1):
            to_target = torch.minimum(to_target, torch.full((N,), max_len, dtype=torch.long).scatter_reduce(
                0, src, to_target[tgt] + 1, "amin"))
        kinds = set(sources)
        level = torch.tensor([n.type in kinds for n in self.node_list]) & (to_target <= max_len - 1)
        g = nx.DiGraph()
        for v in level.nonzero().flatten().tolist():
            g.add_edge("__src__", (v, 0), cost=0.0)
        for h in range(max_len - 1):
            if h >= min_len - 1 and bool(level[target]):
                g.add_edge((target, h), "__dst__", cost=0.0)
            step = level[src] & (to_target[tgt] <= max_len - 2 - h)
            if not bool(step.any()):
                level = torch.zeros(N, dtype=torch.bool)
                break
            for s_, t_, c in zip(src[step].tolist(), tgt[step].tolist(), cost[step].tolist()):
                g.add_edge((s_, h), (t_, h + 1), cost=c)
            level = torch.zeros(N, dtype=torch.bool)
            level[tgt[step]] = True
        if bool(level[target]) and max_len - 1 >= min_len - 1:
            g.add_edge((target, max_len - 1), "__dst__", cost=0.0)
        out = []
        if "__src__" not in g or "__dst__" not in g:
            return out
        try:
            for path in nx.shortest_simple_paths(g, "__src__", "__dst__", weight="cost"):
                nodes = path[1:-1]
                total = sum(g[a][b]["cost"] for a, b in zip(path, path[1:]))
                out.append((math.exp(-total), [self.node_list[v].id for v, _ in nodes]))
                if len(out) == k:
                    break
        except nx.NetworkXNoPath:
            pass
        return out

    def subgraph(self, node_ids) -> "AttributionGraph":
        """The graph on the given nodes (ids of this graph, or names `node` reads) and the edges between them."""
        if isinstance(node_ids, (str, Node, NodeKey)):
            raise BadInputError("subgraph takes a collection of nodes; for one node, give [it]")
        keep = set()
        for n in node_ids:
            n = n.id if isinstance(n, Node) else str(n) if isinstance(n, NodeKey) else n
            keep.add(self.resolve(n) if isinstance(n, str) and n not in self.index else n)
        unknown = sorted(str(n) for n in keep - set(self.index))
        if unknown:
            raise UnknownNodeError(f"no node {unknown[0]!r} in this graph" + (f" (and {len(unknown) - 1} more)"
                                                                              if len(unknown) > 1 else ""))
        kept = [i for i, n in enumerate(self.node_list) if n.id in keep]
        remap = torch.full((len(self.node_list),), -1, dtype=torch.long)
        remap[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        E = self.edge_arrays
        mask = (remap[E.src] >= 0) & (remap[E.tgt] >= 0)
        return AttributionGraph(self.prompt, self.tokens, self.token_ids, [self.node_list[i] for i in kept],
                                E.select(mask, remap), dict(self.settings), dict(self.scores))

    # -- files --------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        from .export import write_json

        return write_json(self, path)

    @staticmethod
    def load(path: str | Path) -> "AttributionGraph":
        from .export import read_json

        return read_json(path)

    def __eq__(self, other) -> bool:
        if not isinstance(other, AttributionGraph):
            return NotImplemented
        return (self.prompt, self.tokens, self.token_ids, self.node_list, self.edges, self.qk, self.settings,
                self.scores) == (other.prompt, other.tokens, other.token_ids, other.node_list, other.edges, other.qk,
                                 other.settings, other.scores)

    def __repr__(self) -> str:
        counts = {t.value: len(self.nodes(type=t)) for t in NODE_TYPES}
        return f"AttributionGraph({self.prompt!r}, nodes={counts}, edges={len(self.edge_arrays)}, qk={len(self.qk)})"
