"""Attribution graphs built on `replacement`: attribution, pruning, QK pairs, patching, export."""
from .graph import AttributionGraph, Edge, Node, NodeKey, NodeKind, QKContrast, QKEntry, QKLink, QKPair


def load(path) -> AttributionGraph:
    """Read a graph JSON file back into an `AttributionGraph`."""
    return AttributionGraph.load(path)


__all__ = ["AttributionGraph", "Edge", "Node", "NodeKey", "NodeKind", "QKContrast", "QKEntry", "QKLink", "QKPair", "load"]
