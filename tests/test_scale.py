"""Working at real sizes: the file caps of a default trace, and (graphs/memory_estimate.py) what bounds memory."""
from __future__ import annotations

import pytest
import torch

from graphs.attribution import attribute
from graphs.prune import FILE_MAX_EDGES, FILE_MAX_FEATURES, file_caps, influence, normalised_weights, prune
from replacement.models import ModelAdapter
from tests.conftest import ROOT, qk_entries_with_real_scores, random_replacements, tiny_llama


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
    cores read from /proc/loadavg's runnable count (the median of several readings, less this process's own
    threads); a busy moment does not stick; an explicit count wins, a bad one is refused in one line."""
    from replacement.errors import BadInputError
    from replacement.threads import busy_cores, set_threads, thread_count

    assert busy_cores("0.10 0.20 0.30 1/300 123") == 0  # only this process runnable, no load
    assert busy_cores("0.10 0.20 0.30 3/300 123") == 2  # two others runnable now
    assert busy_cores("1.90 0.20 0.30 1/300 123") == 0  # a busy minute, nothing runnable now: maybe our own work
    # the median of several readings: a task runnable at most of them counts, a blip at one does not
    assert busy_cores(["0.1 0.2 0.3 2/300 1", "0.1 0.2 0.3 2/300 1", "0.1 0.2 0.3 1/300 1"]) == 1
    assert busy_cores(["0.1 0.2 0.3 1/300 1", "0.1 0.2 0.3 2/300 1", "0.1 0.2 0.3 1/300 1"]) == 0
    assert busy_cores("garbage") == 0
    # this process's own running threads (OpenMP workers spinning after torch work) are not other work
    assert busy_cores("0.1 0.2 0.3 3/300 1", own=[2]) == 1 and busy_cores(["0.1 0.2 0.3 3/300 1"] * 2, own=[3, 1]) == 2
    assert thread_count(2, 0, 2) == 2 and thread_count(2, 1, 2) == 1 and thread_count(2, 5, 2) == 1
    assert thread_count(16, 2, 8) == 8
    before = torch.get_num_threads()
    try:
        # the policy starts from torch's own count every time: a busy moment does not stick to a warm process
        import replacement.threads as threads

        monkeypatch.delenv("CIRCUITS_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "cores", lambda: 2)
        monkeypatch.setattr(threads, "_TORCH_DEFAULT", 2)
        monkeypatch.setattr(threads, "busy_cores", lambda: 1)
        assert set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "busy_cores", lambda: 0)
        assert set_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("CIRCUITS_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CIRCUITS_THREADS", "many")
        with pytest.raises(BadInputError, match="CIRCUITS_THREADS='many' must be a whole number"):
            set_threads()
        monkeypatch.setenv("CIRCUITS_THREADS", "8")  # 4 a core: allowed; more is refused (5,000 took 80 s)
        assert set_threads() == 8
        monkeypatch.setenv("CIRCUITS_THREADS", "9")
        with pytest.raises(BadInputError, match="CIRCUITS_THREADS=9 is more threads than this machine's 2 cores"):
            set_threads()
    finally:
        torch.set_num_threads(before)


def test_own_running_threads_counts_a_computing_thread():
    """A thread of this process inside a long torch product (GIL released, running) is counted as this
    process's: seen running at least once over many readings (a count of the reader alone would never be 2)."""
    import threading

    from replacement.threads import own_running_threads

    stop = threading.Event()

    def work():
        x = torch.randn(384, 384)
        while not stop.is_set():
            x @ x

    t = threading.Thread(target=work)
    t.start()
    try:
        seen = [own_running_threads() for _ in range(300)]
    finally:
        stop.set()
        t.join()
    assert max(seen) >= 2 and min(seen) >= 1


BUDGET_CASES = [("llama", "lorsa"), ("neox", "lorsa"), ("llama", "frozen")]


def _model(arch, attention):
    from tests.conftest import tiny_neox

    adapter = ModelAdapter(tiny_llama() if arch == "llama" else tiny_neox(), name=arch)
    model = random_replacements(adapter, attention=attention)
    torch.manual_seed(3)
    return model, torch.randint(0, 97, (1, 9))


def _rows(graph) -> dict[str, dict[str, float]]:
    """target id -> {source id: weight}, from the Edge objects."""
    out: dict[str, dict[str, float]] = {}
    for e in graph.edges:
        out.setdefault(e.target, {})[e.source] = e.weight
    return out


@pytest.mark.parametrize("arch, attention, bos", [(*c, "keep") for c in BUDGET_CASES] + [("llama", "lorsa", "zero")])
def test_budgeted_rows_equal_the_full_graphs_rows(arch, attention, bos):
    """Every row the budgeted graph computes is the full graph's row: the edges from the nodes it kept are the
    full graph's edges, those from the features it left out are summed in `dropped`, the constants agree; it
    keeps every embedding, error node and logit, and exactly ``max_feature_nodes`` features."""
    from graphs.attribution import reconstruction_errors

    model, ids = _model(arch, attention)
    full = attribute(model, ids, qk=False, bos=bos)
    n_feat = full.settings["active_features"]
    k = n_feat // 3
    part = attribute(model, ids, qk=False, max_feature_nodes=k, batch_size=4, bos=bos)
    assert part.settings["budgeted"] and not full.settings["budgeted"]
    kept = set(part.index)
    assert sum(n.type in ("lorsa", "transcoder") for n in part.node_list) == k
    assert {n.id for n in full.node_list if n.type not in ("lorsa", "transcoder")} <= kept <= set(full.index)
    full_rows, part_rows = _rows(full), _rows(part)
    for node in part.node_list:
        if node.type not in ("lorsa", "transcoder", "logit"):
            continue
        whole = full_rows.get(node.id, {})
        inside = {s: w for s, w in whole.items() if s in kept}
        got = part_rows.get(node.id, {})
        assert got.keys() == inside.keys(), node.id
        for s, w in inside.items():  # float32 rows computed in batches of other shapes: rounding differs (1.4e-6
            assert got[s] == pytest.approx(w, rel=1e-5, abs=3e-6)  # on a 0.13 edge since the norms' rsqrt)
        assert node.dropped == pytest.approx(sum(w for s, w in whole.items() if s not in kept), rel=1e-4, abs=1e-5)
        assert node.const == pytest.approx(full.node(node.id).const, rel=1e-5, abs=1e-6)
    assert max(reconstruction_errors(part).values()) < 1e-4


@pytest.mark.parametrize("arch, attention", BUDGET_CASES)
def test_budgeted_keeps_the_most_influential_features(arch, attention):
    """The k features a budgeted graph expands carry (almost) the full graph's top-k influence, counted in the
    full graph (influence is a dense solve there: tests/test_attribution.py checks it)."""
    model, ids = _model(arch, attention)
    full = attribute(model, ids, qk=False)
    x = influence(full)
    feats = sorted((i for i, n in enumerate(full.node_list) if n.type in ("lorsa", "transcoder")), key=lambda i: -x[i])
    for k in (5, 20, len(feats) // 2):
        part = attribute(model, ids, qk=False, max_feature_nodes=k, batch_size=2)
        got = [full.index[n.id] for n in part.node_list if n.type in ("lorsa", "transcoder")]
        top = feats[:k]
        assert len(set(got) & set(top)) >= k - max(1, k // 10)
        assert float(x[got].sum()) >= 0.97 * float(x[top].sum()), float(x[got].sum()) / float(x[top].sum())


def test_budget_above_the_active_features_is_the_full_graph():
    model, ids = _model("llama", "lorsa")
    full = attribute(model, ids, qk=False)
    same = attribute(model, ids, qk=False, max_feature_nodes=full.settings["active_features"])
    assert not same.settings["budgeted"]
    assert [n.id for n in same.node_list] == [n.id for n in full.node_list]
    assert torch.equal(same.edge_arrays.w, full.edge_arrays.w)


def test_budgeted_graph_with_qk_prunes_and_explains_scores_exactly():
    """A budgeted graph's heads are explained with every writer (the features it left out too), so each QK
    entry still adds up to the head's score; pruning keeps only QK pair nodes that are in the graph."""
    model, ids = _model("llama", "lorsa")
    part = attribute(model, ids, max_feature_nodes=20, batch_size=4)
    checked = 0
    for head, e, real in qk_entries_with_real_scores(model, part, ids):  # the module's own q . k, every writer in it
        assert e.score == pytest.approx(real, rel=1e-4, abs=1e-4), (head.id, e.key_pos)
        checked += 1
    assert checked
    pruned = prune(part, 0.9, 0.99)
    assert all(link.query in pruned.index and link.key in pruned.index for link in pruned.qk)
    # a head's pairs: those the graph holds, or with outside=True all its entries' pairs, the left-out ones too
    heads = [n for n in pruned.node_list if n.qk]
    every = {h.id: pruned.qk_pairs(h, outside=True) for h in heads}
    assert all(len(every[h.id]) == sum(len(e.pairs) for e in h.qk) for h in heads)
    outside = [x for h in heads for x in every[h.id] if x.query not in pruned.index or x.key not in pruned.index]
    assert outside, "this budget leaves some pair nodes out"
    for h in heads:
        inside = [(x.query, x.key, x.key_pos) for x in every[h.id] if x.query in pruned.index and x.key in pruned.index]
        assert [(x.query, x.key, x.key_pos) for x in pruned.qk_pairs(h)] == inside
        assert [abs(x.weight) for x in every[h.id]] == sorted((abs(x.weight) for x in every[h.id]), reverse=True)


@pytest.mark.slow
def test_long_llama_prompt_fits_six_gb_and_twenty_mb(tmp_path):
    """The 127-token llama prompt of issue 23 (the full graph: 313M edges, 18.7 GB) under the default node
    budget: the process peaks under 6 GB and graph.json stays under 20 MB."""
    import os
    import resource
    import subprocess
    import sys

    prompt = " ".join(str(i % 100) for i in range(126))  # BOS and 126 numbers
    root = ROOT
    r = subprocess.run([sys.executable, "-c", "from cli.trace import main; main()", prompt, "--model", "llama", "--out",
                        str(tmp_path / "o"), "--format", "json"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "127 tokens" in r.stdout
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < 6 * 2**30
    assert (tmp_path / "o" / "graph.json").stat().st_size < 20 * 2**20
