"""Two graphs side by side: which nodes only one holds, and how the shared ones' influence and activation moved.

The question a researcher asks of two prompts (``36 + 62 =`` and ``36 + 61 =``): what did the change of one token
change in the circuit?  Nodes are matched by their id (`align="id"`: the same unit at the same position, for
prompts of one length), or with ``align="end"`` by their position counted from the prompt's end (the last token's
circuit of prompts of different lengths: ``lorsa.0.5@-1``).  Each graph's numbers are its own: influence is a
share of that graph's logits' input, so a node's change is comparable, its absolute value is not a logit.
"""
from __future__ import annotations

from dataclasses import dataclass

from replacement.errors import BadInputError

from .graph import AttributionGraph, Node, NodeKey

ALIGNS = ("id", "end")


@dataclass
class NodeChange:
    """One matched node: ``key`` (its id, or with positions from the end), and the node in each graph (None where
    that graph does not hold it)."""

    key: str
    a: Node | None
    b: Node | None

    @property
    def d_influence(self) -> float:
        """Influence in b minus influence in a (a node a graph lacks counts 0)."""
        return (self.b.influence if self.b else 0.0) - (self.a.influence if self.a else 0.0)

    @property
    def d_activation(self) -> float:
        """Activation in b minus activation in a (a node a graph lacks counts 0)."""
        return (self.b.activation if self.b else 0.0) - (self.a.activation if self.a else 0.0)

    @property
    def where(self) -> str:
        return "both" if self.a and self.b else "only a" if self.a else "only b"


def match_key(graph: AttributionGraph, n: Node, align: str) -> str:
    """The key two graphs' nodes are matched by: the id, or with ``align="end"`` the id with the position counted
    from the prompt's end (-1: the last token).  A family node of a collapsed graph matches none of the other's
    (families are ranked per graph: ``fam.lorsa.0.0@4`` of two prompts are two groups): its key names its graph."""
    if n.is_family:
        return f"{n.id} of {graph.prompt[-20:]!r}"
    if align == "id":
        return n.id
    return str(NodeKey(n.type, n.layer, n.index, n.pos - len(graph.tokens)))


def compare(a: AttributionGraph, b: AttributionGraph, align: str = "id") -> list[NodeChange]:
    """Every node of ``a`` or ``b`` matched by `match_key`, the largest change of influence first (a node only one
    graph holds changes by its whole influence); logits, all at the last position, match by token."""
    if align not in ALIGNS:
        raise BadInputError(f"unknown alignment {align!r}; use one of {', '.join(ALIGNS)}")
    bad = [g for g in (a, b) if not isinstance(g, AttributionGraph)]  # (None itself is one: not next(..., None))
    if bad:
        raise BadInputError(f"compare takes two graphs (graphs.load(folder or graph.json)), not {type(bad[0]).__name__}")
    for key, what in (("model_fingerprint", "models"), ("replacements_fingerprint", "replacements")):
        fa, fb = a.settings.get(key), b.settings.get(key)
        if fa and fb and fa != fb:  # a unit's id names another unit there (graphs written before record neither)
            raise BadInputError(f"the graphs were traced with different {what} ({a.settings.get('model')!r} "
                                f"{fa} and {b.settings.get('model')!r} {fb}): their nodes do not correspond")
    if align == "id" and len(a.tokens) != len(b.tokens):
        raise BadInputError(f"the prompts have {len(a.tokens)} and {len(b.tokens)} tokens: match nodes by position "
                            "from the end (align='end', query --align end)")

    ka, kb = ({match_key(g, n, align): n for n in g.node_list} for g in (a, b))
    out = [NodeChange(k, ka.get(k), kb.get(k)) for k in dict.fromkeys([*ka, *kb])]
    return sorted(out, key=lambda c: -abs(c.d_influence))
