"""JSON (schema-checked, viewer layout, exact round trip), DOT and rendering, queries, and `trace` end to end
on a tiny saved model with random replacements."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import graphs
from graphs.attribution import attribute
from graphs.export import SCHEMA_PATH, render, to_dict, to_dot, validate, write_dot, write_json
from graphs.prune import prune
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama


@pytest.fixture(scope="module")
def graph():
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(0)
    return prune(attribute(model, torch.randint(0, 97, (1, 8)), qk_heads=4), 0.95, 0.995)


def test_json_validates_and_round_trips(graph, tmp_path):
    path = write_json(graph, tmp_path / "g.json")
    d = json.loads(path.read_text())
    validate(d)
    assert d["metadata"]["schema_version"] == 1 and json.loads(SCHEMA_PATH.read_text())["title"]
    for field in ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
                  "activation", "token_prob", "is_target_logit"):
        assert all(field in n for n in d["nodes"])
    logit = [n for n in d["nodes"] if n["feature_type"] == "logit"][0]
    assert logit["clerp"].startswith('Output "') and "(p=" in logit["clerp"]
    assert sum(n["is_target_logit"] for n in d["nodes"]) == 1
    ids = [n["node_id"] for n in d["nodes"]]
    assert len(ids) == len(set(ids))
    assert d["qk_links"] and any("z_pattern" in n for n in d["nodes"])
    back = graphs.load(path)
    assert back == graph


def test_schema_rejects_broken_files(graph):
    import jsonschema

    d = to_dict(graph)
    del d["nodes"][0]["ctx_idx"]
    with pytest.raises(jsonschema.ValidationError):
        validate(d)


def test_dot_and_render(graph, tmp_path):
    dot = to_dot(graph)
    assert dot.startswith("digraph") and "rank=same" in dot and "style=dashed" in dot and "legend" in dot
    assert "L1.H" in dot or "L0.H" in dot
    path = write_dot(graph, tmp_path / "g.dot")
    if shutil.which("dot") is None:
        pytest.skip("graphviz is not installed")
    svg = render(path, "svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


def test_queries(graph):
    logit = graph.logits()[0]
    paths = graph.top_paths(k=3)
    assert paths and paths[0][1][-1] == logit.id
    assert [p[0] for p in paths] == sorted((p[0] for p in paths), reverse=True)
    inc = graph.incoming(logit, k=3)
    assert all(e.target == logit.id for e in inc) and abs(inc[0].weight) >= abs(inc[-1].weight)
    g = graph.to_networkx()
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g) and logit.id in g
    assert all(n.pos == 3 for n in graph.nodes(position=3))
    sub = graph.subgraph([n.id for n in graph.node_list if n.type != "mlp_error"])
    assert not sub.nodes(type="mlp_error") and len(sub.edge_arrays) <= len(graph.edge_arrays)


def _trace(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from cli.trace import trace; trace()", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_trace_writes_json_dot_svg(saved_model, tmp_path):
    r = _trace("the cat sat", "--model", str(saved_model), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "replacement score" in r.stdout and "strongest path" in r.stdout
    validate(json.loads((tmp_path / "o" / "graph.json").read_text()))
    assert (tmp_path / "o" / "graph.dot").is_file()
    if shutil.which("dot"):
        assert (tmp_path / "o" / "graph.svg").is_file()


@pytest.mark.parametrize("args, message", [
    (("",), "the prompt is empty"),
    (("the cat " * 40,), "longer than the model's context"),
    (("the cat", "--node-threshold", "1.5"), "--node-threshold must be in (0, 1]"),
    (("the cat", "--target", "zzqqxx yy"), "not a single token"),
    (("the cat", "--out", "/proc/nope/x"), "cannot write to --out"),
    (("the cat", "--device", "cuda"), "no CUDA GPU") if not torch.cuda.is_available() else (("", ), "empty"),
    (("the cat", "--format", "gif"), "unknown format"),
])
def test_trace_bad_input_is_one_line(saved_model, tmp_path, args, message):
    r = _trace(args[0], "--model", str(saved_model), "--out", str(tmp_path / "o"), *args[1:])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_trace_without_replacements_and_with_foreign_ones(saved_model, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(saved_model, plain, ignore=shutil.ignore_patterns("replacements"))
    r = _trace("the cat", "--model", str(plain), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "circuits train --model" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other"
    shutil.copytree(saved_model, other)
    m = tiny_llama(vocab_size=2400, num_hidden_layers=2)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    m.save_pretrained(other)  # same shape, other weights: the replacements belong to another model
    r = _trace("the cat", "--model", str(other), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "were trained on model" in r.stderr and "Traceback" not in r.stderr
    # a truncated checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    f = broken / "replacements" / "layer0.transcoder.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = _trace("the cat", "--model", str(broken), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr


def test_circuits_train_and_eval_commands(saved_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log.\n" * 200)
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "train", "--model", str(saved_model),
                        "--what", "transcoder", "--layers", "1", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
                        "--tc-expansion", "2", "--text", str(text), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layer1.transcoder" in r.stdout and (out / "layer1.transcoder.safetensors").is_file()
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "eval", "--model", str(saved_model),
                        "--replacements", str(out), "--json", "--no-samples", "--text", str(text)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "layer1.transcoder" in d["replacements"] and d["replacements"]["layer1.transcoder"]["l0"] <= 32


def test_json_loads_with_circuit_tracers_own_models(graph, tmp_path):
    """circuit-tracer's pydantic graph models (frontend/graph_models.py, read from its wheel without installing
    the package, whose pins clash with ours) accept the JSON we write."""
    import os
    import types
    import zipfile

    wheel = os.environ.get("CIRCUIT_TRACER_WHEEL")
    if not wheel:
        if os.environ.get("CIRCUITS_CI"):  # .ci/run fetches the wheel
            pytest.fail("CIRCUIT_TRACER_WHEEL is not set")
        pytest.skip("set CIRCUIT_TRACER_WHEEL to a circuit-tracer wheel (pip download --no-deps circuit-tracer)")
    pytest.importorskip("pydantic")
    source = zipfile.ZipFile(wheel).read("circuit_tracer/frontend/graph_models.py").decode()
    mod = types.ModuleType("circuit_tracer_graph_models")
    exec(compile(source, "graph_models.py", "exec", dont_inherit=True), mod.__dict__)  # not our __future__ flags
    d = json.loads(write_json(graph, tmp_path / "g.json").read_text())
    model = mod.Model.model_validate(d)
    assert len(model.nodes) == len(d["nodes"]) and len(model.links) == len(d["links"])
    assert {n.node_id for n in model.nodes} == {n.id for n in graph.node_list}
    assert sum(n.is_target_logit for n in model.nodes) == 1
    assert all(n.layer == "E" for n in model.nodes if n.feature_type == "embedding")
