"""Working at real sizes: the file caps of a default trace, and (graphs/budget.py) what bounds memory."""
from __future__ import annotations

import pytest
import torch

from graphs.attribution import attribute
from graphs.prune import FILE_MAX_EDGES, FILE_MAX_FEATURES, file_caps, influence, normalised_weights, prune
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama


def _graph():
    adapter = ModelAdapter(tiny_llama(), name="llama")
    model = random_replacements(adapter)
    torch.manual_seed(3)
    return attribute(model, torch.randint(0, 97, (1, 9)), qk=False)


def test_max_edges_keeps_the_strongest_edges():
    """With a cap of k edges, the kept edges are among the k strongest by influence-weighted score (counted
    here by brute force over the Edge objects), and no more than k are kept."""
    graph = _graph()
    x, E = influence(graph), graph.edge_arrays
    score = normalised_weights(graph) * x[E.tgt]
    ids = [n.id for n in graph.node_list]
    ranked = sorted(zip(score.tolist(), E.src.tolist(), E.tgt.tolist()), reverse=True)
    for k in (1, 10, 50, 200):  # (an edge into a feature left without outgoing edges goes too)
        pruned = prune(graph, 1.0, 1.0, max_edges=k)
        kept = {(e.source, e.target) for e in pruned.edges}
        assert len(kept) <= k
        assert kept <= {(ids[s], ids[t]) for _, s, t in ranked[:k]}
    assert kept and len(prune(graph, 1.0, 1.0).edge_arrays) > 200  # the cap mattered


def test_file_caps():
    assert file_caps(None, False) == (FILE_MAX_FEATURES, FILE_MAX_EDGES)
    assert file_caps(7, False) == (7, FILE_MAX_EDGES) and file_caps(10**6, False)[0] == FILE_MAX_FEATURES
    assert file_caps(None, True) == (None, None) and file_caps(7, True) == (7, None)


def test_thread_policy(monkeypatch):
    """Threads: never more than the free cores, never fewer than 1, never more than torch's default; the busy
    cores read from /proc/loadavg's text; an explicit count wins, a bad one is refused in one line."""
    from replacement.errors import BadInputError
    from replacement.threads import busy_cores, set_threads, thread_count

    assert busy_cores("0.10 0.20 0.30 1/300 123") == 0  # only this process runnable, no load
    assert busy_cores("0.10 0.20 0.30 3/300 123") == 2  # two others runnable now
    assert busy_cores("1.90 0.20 0.30 1/300 123") == 1  # a busy minute, whole cores
    assert busy_cores("garbage") == 0
    assert thread_count(2, 0, 2) == 2 and thread_count(2, 1, 2) == 1 and thread_count(2, 5, 2) == 1
    assert thread_count(16, 2, 8) == 8
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("CIRCUITS_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CIRCUITS_THREADS", "many")
        with pytest.raises(BadInputError, match="CIRCUITS_THREADS='many' must be a whole number"):
            set_threads()
    finally:
        torch.set_num_threads(before)
