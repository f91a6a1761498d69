"""Against circuit-tracer 0.5.0's own code: the same random small Llama, transcoders written by its own classes,
traced by both tools (ours: `--attention frozen`, `--bos zero`); every node and every edge must match.  Fixtures:
a Llama with ReLU, JumpReLU and JumpReLU-with-skip per-layer transcoders and with JumpReLU and ReLU cross-layer
transcoders (CLTs; a JumpReLU one reading hook_resid_mid too); a Qwen3 and a Gemma-2 with JumpReLU per-layer
transcoders and a JumpReLU CLT.

Slow, and skipped unless CIRCUIT_TRACER_VENV names a venv with circuit-tracer 0.5.0 installed
(benchmarks/make_circuit_tracer_venv.sh builds one; circuit-tracer pins transformers<=4.57, so it cannot share
this environment).  circuit-tracer's side runs in that venv as tests/circuit_tracer_reference.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

VENV = os.environ.get("CIRCUIT_TRACER_VENV")
# in CI (.ci/run builds the venv) a missing venv fails instead of skipping
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not VENV and not os.environ.get("CIRCUITS_CI"), reason="set CIRCUIT_TRACER_VENV to a venv with circuit-tracer "
                                                           "0.5.0 (bash benchmarks/make_circuit_tracer_venv.sh)")]
PROMPT = "the cat sat on the mat. 1 + 2 = 3"


def run_circuit_tracer(model_folder: Path, out: Path, kind: str, ids: list[int], seed: int = 0) -> dict:
    """circuit-tracer's graph (its tensors) of the token ids, and the transcoders it wrote to out/transcoders."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("circuit_tracer_reference.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(Path(VENV) / "bin" / "python"), str(script), str(model_folder), str(out), kind, str(seed),
                        ",".join(map(str, ids)), "auto"], capture_output=True, text=True, timeout=900, env=env,
                       cwd=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(out / "graph.safetensors"))


def for_old_transformers(model_folder: Path, dest: Path) -> Path:
    """A copy of the model folder that circuit-tracer's transformers (<=4.57) reads: our transformers names the
    tokenizer class ``TokenizersBackend``, which it lacks; ``PreTrainedTokenizerFast`` reads the same tokenizer.json."""
    import json
    import shutil

    shutil.copytree(model_folder, dest, ignore=shutil.ignore_patterns("replacements"))
    conf = json.loads((dest / "tokenizer_config.json").read_text())
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(conf))
    return dest


def model_folder(arch: str, saved_model: Path, dest: Path) -> Path:
    """The random small model of ``arch`` as an HF folder with saved_model's tokenizer: llama is saved_model
    itself; qwen3 and gemma2 have random norm weights and biases (tests/test_adapters.py's recipe): QK-norm and
    attention biases (qwen3); sandwich norms, GeGLU, a sliding window and soft-caps (gemma2)."""
    if arch == "llama":
        return saved_model
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tests.test_adapters import SMALL, _randomise

    tok = AutoTokenizer.from_pretrained(saved_model)
    torch.manual_seed(0)
    common = {**SMALL, "vocab_size": len(tok), "head_dim": 16, "bos_token_id": tok.bos_token_id}
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, attention_bias=True))
    else:  # sandwich norms, GeGLU, a sliding window on every other layer, both soft-caps
        model = Gemma2ForCausalLM(Gemma2Config(**common, query_pre_attn_scalar=16, sliding_window=5,
                                               final_logit_softcapping=0.5, attn_logit_softcapping=2.0))
    _randomise(model).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def circuit_tracer_node_ids(ct: dict, n_layers: int) -> list[str]:
    """circuit-tracer's node order: active features (layer, pos, feature), errors [layer][pos], tokens, logits."""
    n = len(ct["input_tokens"])
    feats = [f"tc.{L}.{f}@{p}" for L, p, f in ct["active_features"].tolist()]
    errors = [f"mlp_err.{L}@{p}" for L in range(n_layers) for p in range(n)]
    logits = [f"logit.{t}@{n - 1}" for t in ct["logit_token_ids"].tolist()]
    return feats + errors + [f"emb@{p}" for p in range(n)] + logits


def our_matrix(graph, ids: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Our edges as a dense [target, source] matrix in circuit-tracer's node order; our nodes it does not have."""
    index = {i: k for k, i in enumerate(ids)}
    W = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    extra = [n.id for n in graph.nodes() if n.id not in index]
    for e in graph.edges:
        if e.source in index and e.target in index:
            W[index[e.target], index[e.source]] += e.weight
    return W, extra


@pytest.mark.parametrize("arch,kind", [("llama", "relu"), ("llama", "jumprelu"), ("llama", "jumprelu-skip"),
                                       ("qwen3", "jumprelu"), ("llama", "clt-jumprelu"), ("llama", "clt-relu"),
                                       ("qwen3", "clt-jumprelu"), ("gemma2", "jumprelu"), ("gemma2", "clt-jumprelu"),
                                       ("llama", "clt-jumprelu-resid")])
def test_every_node_and_edge_matches_circuit_tracer(tmp_path, saved_model, arch, kind):
    from graphs.attribution import attribute
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    folder = model_folder(arch, saved_model, tmp_path / arch)
    adapter = load_model(str(folder))
    ids = adapter.tokenize(PROMPT)[0].tolist()
    ct = run_circuit_tracer(for_old_transformers(folder, tmp_path / "model"), tmp_path / "ct", kind, ids)
    assert ct["input_tokens"].tolist() == ids  # its own BOS rule kept ours
    model = ReplacementModel.load(adapter, str(tmp_path / "ct" / "transcoders"), "frozen")
    assert all(model.transcoders[L].cfg.jumprelu == ("jumprelu" in kind) for L in range(adapter.n_layers))
    assert all(model.transcoders[L].cfg.skip == kind.endswith("-skip") for L in range(adapter.n_layers))
    assert model.cross_layer == kind.startswith("clt-")
    graph = attribute(model, torch.tensor([ids]), bos="zero", qk=False)

    node_ids = circuit_tracer_node_ids(ct, adapter.n_layers)
    theirs = ct["adjacency_matrix"].double()
    ours, extra = our_matrix(graph, node_ids)
    assert extra == []  # every node of ours is one of theirs
    ours_ids = {n.id for n in graph.nodes()}
    alive = theirs.abs().sum(0) > 0  # a node of theirs with an edge out of it must be ours
    assert all(node_ids[j] in ours_ids for j in torch.nonzero(alive).flatten().tolist())
    n_feat = len(ct["active_features"])
    assert n_feat > 20 and {n.id for n in graph.nodes("transcoder")} == set(node_ids[:n_feat])
    assert {n.id for n in graph.logits()} == {i for i in node_ids if i.startswith("logit.")}
    acts = {n.id: n.activation for n in graph.nodes("transcoder")}
    theirs_acts = ct["activation_values"]
    ours_acts = torch.tensor([acts[i] for i in node_ids[:n_feat]])
    assert float((ours_acts - theirs_acts).abs().max()) <= 1e-4 * float(theirs_acts.abs().max())
    rows = torch.nonzero(theirs.abs().sum(1) > 0).flatten()
    assert len(rows) == n_feat + len(graph.logits())  # every feature and logit is a target in theirs
    scale = theirs[rows].abs().amax(1, keepdim=True)
    rel = ((ours[rows] - theirs[rows]).abs() / scale).max()
    print(f"{arch} {kind}: {n_feat} features, {int((theirs != 0).sum())} edges, max |difference| / largest edge "
          f"into its target {float(rel):.1e}")
    assert float(rel) <= 1e-4, float(rel)


@pytest.mark.parametrize("arch,kind", [("llama", "jumprelu"), ("llama", "clt-jumprelu"), ("qwen3", "jumprelu"),
                                       ("gemma2", "clt-jumprelu")])
def test_the_trace_command_agrees_with_circuit_tracer(tmp_path, saved_model, arch, kind):
    """The CLI path (`trace --replacements <its folder> --attention frozen --bos zero`), with per-layer and
    cross-layer transcoders: its pruned graph.json holds only nodes circuit-tracer has, and every edge it keeps
    equals circuit-tracer's to 1e-4 relative."""
    import json
    import sys

    from replacement.models import load_model

    folder = model_folder(arch, saved_model, tmp_path / arch)
    adapter = load_model(str(folder))
    ids = adapter.tokenize(PROMPT)[0].tolist()
    ct = run_circuit_tracer(for_old_transformers(folder, tmp_path / "model"), tmp_path / "ct", kind, ids)
    r = subprocess.run([sys.executable, "-c", "from cli.trace import main; main()", PROMPT, "--model", str(folder),
                        "--replacements", str(tmp_path / "ct" / "transcoders"), "--attention", "frozen", "--bos", "zero",
                        "--format", "json", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    g = json.loads((tmp_path / "out" / "graph.json").read_text())
    node_ids = circuit_tracer_node_ids(ct, adapter.n_layers)
    index = {i: k for k, i in enumerate(node_ids)}
    assert [n["node_id"] for n in g["nodes"] if n["node_id"] not in index] == []
    theirs = ct["adjacency_matrix"].double()
    links = [(index[e["target"]], index[e["source"]], e["weight"]) for e in g["links"]]
    assert len(links) > 100 and any(node_ids[t].startswith("tc.") for t, _, _ in links)
    scale = theirs.abs().amax(1)
    worst = max(abs(w - float(theirs[t, s])) / float(scale[t]) for t, s, w in links)
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("name", ["toy", "pythia", "llama"])
def test_the_bundled_models_run_the_same_under_circuit_tracers_transformers(tmp_path, name):
    """The bundled folders are plain HF folders for transformers 4.x too (circuit-tracer's, <= 4.57): the same
    tokens and logits as ours.  Before their config.json carried the flat rotary keys, 4.57 ran `toy` and `llama`
    at rope_theta 10,000 and `pythia` with rotary on a quarter of each head (logits off by 1.6-7.7)."""
    import json

    from replacement.lm.presets import PRESETS
    from replacement.models import load_model

    folder = PRESETS[name].folder
    text = "The cat sat on the mat. 36 + 62 = 98. The cat sat on"
    script = ("import json, sys, torch\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
              "ids = tok(sys.argv[2], return_tensors='pt').input_ids\n"
              "print(json.dumps({'ids': ids[0].tolist(), 'logits': model(ids).logits[0].tolist()}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(Path(VENV) / "bin" / "python"), "-c", script, str(folder), text], capture_output=True,
                       text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout)
    adapter = load_model(name)
    ids = adapter.tokenize(text)
    assert theirs["ids"] == ids[0].tolist()
    ours = adapter.model(ids).logits[0]
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, atol=1e-3, rtol=0)
