"""The memory estimate made before attribution (graphs/memory_estimate.py): an upper bound on the edges counted in real
graphs, the budget's parsing, and the one-line refusal of `trace` above the budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphs.attribution import attribute
from graphs.memory_estimate import BYTES_PER_EDGE, check, estimate
from replacement.memory import available_bytes, parse_bytes
from replacement.errors import BadInputError
from replacement.models import ModelAdapter
from tests.conftest import ROOT, random_replacements, tiny_llama, tiny_neox


def _ks(model):
    lorsa = [model.lorsas[L].cfg.top_k for L in sorted(model.lorsas)] if model.attention == "lorsa" else None
    return lorsa, [model.transcoders[L].cfg.top_k for L in sorted(model.transcoders)]


def _bound_from_nodes(graph) -> int:
    """The same bound counted from the graph's own nodes: every target times the sources it may read."""
    order = {"embedding": 0, "lorsa": 1, "attn_error": 2, "transcoder": 3, "mlp_error": 4}
    sources = [n for n in graph.node_list if n.type != "logit"]
    frozen = not any(n.type in ("lorsa", "attn_error") for n in graph.node_list)
    total = 0
    for t in graph.node_list:
        if t.type not in ("lorsa", "transcoder", "logit"):
            continue
        key = (t.layer, order.get(t.type, 9))
        total += sum(1 for s in sources if (s.layer, order[s.type]) < key
                     and (s.pos <= t.pos if t.type == "lorsa" or frozen else s.pos == t.pos))
    return total


@pytest.mark.parametrize("arch, attention", [("llama", "lorsa"), ("neox", "lorsa"), ("llama", "frozen")])
def test_estimate_bounds_the_edges_of_real_graphs(arch, attention):
    adapter = ModelAdapter(tiny_llama() if arch == "llama" else tiny_neox(), name=arch)
    model = random_replacements(adapter, attention=attention)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 10))
    graph = attribute(model, ids, qk=False)
    est = estimate(10, *_ks(model))
    assert len(graph.edge_arrays) <= _bound_from_nodes(graph) <= est.edges
    assert est.bytes == est.edges * BYTES_PER_EDGE


def test_estimate_of_the_design_example():
    """DESIGN.md: 127 tokens on a d=256, 4-layer model (llama's K) is about 313M edges."""
    est = estimate(127, [64] * 4, [32, 32, 32, 64])
    assert 300e6 < est.edges < 330e6


def test_parse_bytes_and_budget(monkeypatch):
    assert parse_bytes("8G") == 8 * 2**30 and parse_bytes("500M") == 500 * 2**20 and parse_bytes("1024") == 1024
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5k") == 1536
    for bad in ("lots", "-1G", "0", "inf", "1e999", "1e30"):  # the last three: an OverflowError traceback
        with pytest.raises(BadInputError):
            parse_bytes(bad)
    monkeypatch.setenv("CIRCUITS_MEMORY_BUDGET", "1M")
    assert available_bytes() == 2**20
    with pytest.raises(BadInputError, match=r"a graph of 50 tokens needs about .* more than the 1 MB available"):
        check(estimate(50, [4, 4], [4, 4]), 50)
    check(estimate(2, [1], [1]), 2)  # 2 tokens: well under 1 MB
    monkeypatch.delenv("CIRCUITS_MEMORY_BUDGET")
    if Path("/proc/meminfo").is_file():
        assert 0 < available_bytes() < 2**50


def test_trace_refuses_above_the_budget(saved_model, tmp_path):
    r = subprocess.run([sys.executable, "-c", "from cli.trace import trace; trace()", "the cat sat on the mat",
                        "--model", str(saved_model)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "CIRCUITS_MEMORY_BUDGET": "100K"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "needs about" in r.stderr and "more than the 100 KB available" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())  # no output folder left behind


def test_attribute_refuses_above_the_budget_before_building(monkeypatch):
    """The library call is guarded as `trace` is: a graph over the budget is a one-line error raised before the
    record is made (a Python user is not killed by the kernel either); ``check_memory=False`` skips the guard."""
    import replacement.assemble as assemble

    adapter = ModelAdapter(tiny_llama(), name="llama")
    model = random_replacements(adapter)
    ids = torch.randint(0, 97, (1, 40))
    monkeypatch.setenv("CIRCUITS_MEMORY_BUDGET", "1K")
    recorded, record = [], assemble.ReplacementModel.record
    monkeypatch.setattr(assemble.ReplacementModel, "record", lambda self, *a, **k: recorded.append(1) or record(self, *a, **k))
    with pytest.raises(BadInputError, match=r"^a graph of 40 tokens needs about .* more than the 1 KB available; use"):
        attribute(model, ids, qk=False)
    assert not recorded
    est = estimate(40, *_ks(model))
    assert est.bytes > 1024
    monkeypatch.undo()
    graph = attribute(model, ids, qk=False, check_memory=False)
    assert 0 < len(graph.edge_arrays) <= est.edges


MEASURE = """
import json, sys
from graphs.attribution import attribute
from graphs.memory_estimate import estimate
from graphs.prune import prune
from replacement.assemble import ReplacementModel
from replacement.models import load_model
def high_water():  # this process's peak resident memory (not ru_maxrss: Linux carries the parent's over a fork)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
a = load_model("llama"); m = ReplacementModel.load(a)
ids = a.tokenize(" ".join(str(i) for i in range(30)))
base = high_water()
g = attribute(m, ids)
edges = len(g.edge_arrays)
prune(g)
peak = high_water()
e = estimate(ids.shape[1], [m.lorsas[L].cfg.top_k for L in range(4)], [m.transcoders[L].cfg.top_k for L in range(4)])
print(json.dumps({"edges": edges, "est_edges": e.edges, "est_bytes": e.bytes, "used": peak - base}))
"""


@pytest.mark.slow
def test_estimate_bounds_the_measured_peak_on_llama():
    r = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["edges"] <= m["est_edges"] <= 1.01 * m["edges"]  # every slot is active in the bundled llama
    assert 0.6 * m["est_bytes"] <= m["used"] <= m["est_bytes"], m
