"""Attribution graphs built on `replacement`: attribution, pruning, QK pairs, head families, patching, export."""
from .families import Family, FamilyConfig
from .graph import AttributionGraph, Edge, Node, NodeKey, NodeKind, QKContrast, QKEntry, QKLink, QKPair


def load(path) -> AttributionGraph:
    """Read a graph JSON file (or the graph.json in a trace's output folder) back into an `AttributionGraph`."""
    return AttributionGraph.load(path)


__all__ = ["AttributionGraph", "Edge", "Family", "FamilyConfig", "Node", "NodeKey", "NodeKind", "QKContrast", "QKEntry", "QKLink", "QKPair", "load"]
