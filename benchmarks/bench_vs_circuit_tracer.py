"""Our attribution against circuit-tracer 0.5.0's on the same work: the same random HF Llama, the same transcoders
(written by circuit-tracer's own classes, in its file layout), the same prompt; ours with `--attention frozen`
and `--bos zero` (circuit-tracer's conventions), both computing the full graph (no node budget), or with
`--max-feature-nodes N` both expanding N feature rows (circuit-tracer's `max_feature_nodes`, our budgeted
attribution; each picks its N by its own estimate of influence, so only the rows both computed are compared).

    CIRCUIT_TRACER_VENV=/path/to/venv python benchmarks/bench_vs_circuit_tracer.py [--runs 5] [--threads 1,2]
                                                                [--sizes small,large] [--max-feature-nodes N]

circuit-tracer pins transformers <= 4.57, so it runs in its own venv (benchmarks/make_circuit_tracer_venv.sh
builds one; with no CIRCUIT_TRACER_VENV this script builds it in .venv-circuit-tracer).  Sizes: small = 2 layers,
d = 64, 13 tokens; large = 4 layers, d = 256 (GQA: 4 query heads on 2 key/value heads), 30 tokens; 4d ReLU
transcoder features per layer.

Every timed run is a fresh process of one tool that loads the model, attributes once (warm-up) and then times a
second `attribute` (warm: model, transcoders and code loaded); the tools alternate run by run, so that a change
of load on the machine touches both alike (the first pair, whose graphs are compared, counts as the first run
of the first thread count).  The large size needs over 10 GB free: circuit-tracer's graph is a dense
[nodes, nodes] matrix, and ours holds the same edges as index arrays (our process reached 8.5 GB there).  Printed: medians (wall and the process's CPU time), the ratio
theirs / ours, and the largest difference between the two graphs' edges relative to the largest edge into
each target (they must agree: 1e-4 fails the run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": dict(layers=2, d=64, heads=4, kv_heads=4, tokens=13),
         "large": dict(layers=4, d=256, heads=4, kv_heads=2, tokens=30)}

OURS = r"""
import json, sys, time
import torch
folder, tcs, ids, threads, save = sys.argv[1:6]
budget = int(sys.argv[7]) or None
torch.set_num_threads(int(threads))
from graphs.attribution import attribute
from replacement.assemble import ReplacementModel
from replacement.models import load_model

model = ReplacementModel.load(load_model(folder), tcs, "frozen")
ids = torch.tensor([[int(t) for t in ids.split(",")]])
attribute(model, ids, bos="zero", qk=False, max_feature_nodes=budget)  # warm-up
t, c = time.perf_counter(), time.process_time()
g = attribute(model, ids, bos="zero", qk=False, max_feature_nodes=budget)
wall, cpu = time.perf_counter() - t, time.process_time() - c
if save != "-":
    from safetensors.torch import save_file
    E = g.edge_arrays
    save_file({"src": E.src.contiguous(), "tgt": E.tgt.contiguous(), "w": E.w.contiguous()}, save,
              {"ids": json.dumps([n.id for n in g.node_list])})
print(json.dumps({"wall": wall, "cpu": cpu}))
"""

THEIRS = r"""
import json, sys, time
import torch
folder, tcs, ids, threads, save = sys.argv[1:6]
budget = int(sys.argv[7]) or None
torch.set_num_threads(int(threads))
from pathlib import Path
from transformers import AutoConfig
from circuit_tracer import ReplacementModel, attribute
sys.path.insert(0, sys.argv[6])
from circuit_tracer_reference import HOOKS, make_transcoders

conf = AutoConfig.from_pretrained(folder)  # the same transcoders again (seeded), in memory
tset = make_transcoders(conf.hidden_size, conf.num_hidden_layers, "relu", 0, Path(tcs + "-again"), HOOKS["llama"])
model = ReplacementModel.from_pretrained_and_transcoders(folder, tset, backend="nnsight", device=torch.device("cpu"),
                                                         dtype=torch.float32)
tokens = torch.tensor([int(t) for t in ids.split(",")])
attribute(tokens, model, max_feature_nodes=budget)  # warm-up
t, c = time.perf_counter(), time.process_time()
g = attribute(tokens, model, max_feature_nodes=budget)
wall, cpu = time.perf_counter() - t, time.process_time() - c
if save != "-":
    from safetensors.torch import save_file
    save_file({"active_features": g.active_features[g.selected_features].long().contiguous(),
               "adjacency_matrix": g.adjacency_matrix.float().contiguous(),
               "input_tokens": g.input_tokens.long().contiguous(),
               "logit_token_ids": g.logit_token_ids.long().contiguous()}, save)
print(json.dumps({"wall": wall, "cpu": cpu}))
"""

MAKE_TRANSCODERS = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from circuit_tracer_reference import HOOKS, make_transcoders
make_transcoders(int(sys.argv[2]), int(sys.argv[3]), "relu", 0, Path(sys.argv[4]), HOOKS["llama"])
"""


def venv() -> Path:
    """circuit-tracer's venv: $CIRCUIT_TRACER_VENV, or .venv-circuit-tracer (built here if missing)."""
    path = Path(os.environ.get("CIRCUIT_TRACER_VENV") or ROOT / ".venv-circuit-tracer")
    python = path / "bin" / "python"
    ready = python.exists() and subprocess.run([str(python), "-c", "import circuit_tracer"], capture_output=True,
                                               env=_env(1, ct=True)).returncode == 0
    if not ready:  # missing, or a build that stopped half-way
        print(f"no circuit-tracer venv at {path}: building one with benchmarks/make_circuit_tracer_venv.sh (pip, "
              "network needed)", flush=True)
        r = subprocess.run(["bash", str(ROOT / "benchmarks" / "make_circuit_tracer_venv.sh"), str(path)])
        if r.returncode != 0:
            raise SystemExit(f"error: could not build circuit-tracer's venv at {path} (make_circuit_tracer_venv.sh "
                             f"ended with {r.returncode}; it installs from PyPI); set CIRCUIT_TRACER_VENV to a built one")
    return path


def make_case(size: dict, work: Path, ct_python: Path) -> tuple[Path, Path, list[int]]:
    """(model folder, transcoder folder, prompt ids): a random Llama of ``size`` with the bundled llama's tokenizer,
    saved as circuit-tracer's transformers reads it, and ReLU transcoders written by circuit-tracer's classes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "replacement" / "bundled" / "llama")
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=size["d"], intermediate_size=4 * size["d"],
                       num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                       num_key_value_heads=size["kv_heads"], max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id)
    folder = work / "model"
    LlamaForCausalLM(conf).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    tc_conf = json.loads((folder / "tokenizer_config.json").read_text())
    tc_conf["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name circuit-tracer's transformers knows
    (folder / "tokenizer_config.json").write_text(json.dumps(tc_conf))
    tcs = work / "transcoders"
    subprocess.run([str(ct_python), "-c", MAKE_TRANSCODERS, str(ROOT / "tests"), str(size["d"]), str(size["layers"]),
                    str(tcs)], check=True, env=_env(1, ct=True), cwd=work)
    g = torch.Generator().manual_seed(1)
    ids = [tok.bos_token_id] + torch.randint(10, len(tok), (size["tokens"] - 1,), generator=g).tolist()
    return folder, tcs, ids


def _env(threads: int, ct: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if not ct:
        env["PYTHONPATH"] = str(ROOT)
    return env


def timed(python: Path | str, script: str, case, threads: int, save: str = "-", ct: bool = False,
          budget: int | None = None) -> dict:
    folder, tcs, ids = case
    r = subprocess.run([str(python), "-c", script, str(folder), str(tcs), ",".join(map(str, ids)), str(threads), save,
                        str(ROOT / "tests"), str(budget or 0)],
                       capture_output=True, text=True, env=_env(threads, ct), cwd=str(Path(folder).parent))
    if r.returncode != 0:
        raise SystemExit(f"{'circuit-tracer' if ct else 'ours'} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def disagreement(ours_file: Path, theirs_file: Path, n_layers: int, budgeted: bool = False) -> tuple[float, int]:
    """The largest |ours - theirs| over every edge, relative to the largest |edge| into its target (theirs), and
    how many feature nodes both graphs hold.  ``budgeted``: each tool expanded its own choice of features; the
    edges compared are those between nodes both graphs hold, into targets both expanded."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from tests.test_circuit_tracer import circuit_tracer_node_ids

    from safetensors import safe_open

    ct, ours = load_file(str(theirs_file)), load_file(str(ours_file))
    with safe_open(str(ours_file), "pt") as f:
        ours["ids"] = json.loads(f.metadata()["ids"])
    ids = circuit_tracer_node_ids(ct, n_layers)
    index = {i: k for k, i in enumerate(ids)}
    where = torch.tensor([index.get(i, -1) for i in ours["ids"]])
    if (where < 0).any() and not budgeted:
        raise SystemExit(f"nodes of ours that circuit-tracer lacks: {[i for i in ours['ids'] if i not in index][:5]}")
    common = torch.zeros(len(ids), dtype=torch.bool)
    common[where[where >= 0]] = True
    both = int(sum(1 for i in ours["ids"] if i in index and i.startswith("tc.")))
    live = (where[ours["tgt"]] >= 0) & (where[ours["src"]] >= 0)
    W = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    W.index_put_((where[ours["tgt"][live]], where[ours["src"][live]]), ours["w"][live].double(), accumulate=True)
    theirs = ct["adjacency_matrix"].double()
    if budgeted:
        theirs = theirs * common[None, :]  # sources both graphs hold (a full graph must hold every one)
    ours_rows = torch.zeros(len(ids), dtype=torch.bool)
    ours_rows[where[ours["tgt"][live]]] = True
    rows = theirs.abs().sum(1) > 0
    if budgeted:
        rows &= ours_rows
    scale = theirs[rows].abs().amax(1, keepdim=True)
    return float(((W[rows] - theirs[rows]).abs() / scale).max()), both


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    a = ap.parse_args()
    ct_python = venv() / "bin" / "python"
    budget = a.max_feature_nodes
    work_done = f"{budget} feature rows" if budget else "full graph"
    print(f"ours against circuit-tracer 0.5.0, warm attribute(), {work_done}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    for name in a.sizes.split(","):
        size = SIZES[name]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            case = make_case(size, work, ct_python)
            threads = [int(t) for t in a.threads.split(",")]
            first = (timed(sys.executable, OURS, case, threads[0], str(work / "ours.safetensors"), budget=budget),
                     timed(ct_python, THEIRS, case, threads[0], str(work / "theirs.safetensors"), ct=True,
                           budget=budget))
            gap, both = disagreement(work / "ours.safetensors", work / "theirs.safetensors", size["layers"],
                                     budgeted=bool(budget))
            print(f"{name}: {size['layers']} layers, d={size['d']}, {size['heads']} heads / {size['kv_heads']} kv heads, "
                  f"{size['tokens']} tokens; edges agree to {gap:.1e} of the largest edge into each target"
                  + (f" (the {both} features both expanded)" if budget else ""))
            if gap > 1e-4:
                raise SystemExit("the two graphs disagree")
            for i, threads in enumerate(threads):
                ours, theirs = ([first[0]], [first[1]]) if i == 0 else ([], [])  # the checked runs count too
                while len(ours) < a.runs:  # alternating
                    ours.append(timed(sys.executable, OURS, case, threads, budget=budget))
                    theirs.append(timed(ct_python, THEIRS, case, threads, ct=True, budget=budget))
                ow, tw = _med([r["wall"] for r in ours]), _med([r["wall"] for r in theirs])
                oc, tc = _med([r["cpu"] for r in ours]), _med([r["cpu"] for r in theirs])
                print(f"  {threads} thread{'s' * (threads > 1)}: ours {ow:.3f} s wall / {oc:.3f} s CPU, circuit-tracer "
                      f"{tw:.3f} s / {tc:.3f} s; ours is {tw / ow:.2f}x faster (wall), {tc / oc:.2f}x (CPU); "
                      f"{a.runs} runs each, load average {os.getloadavg()[0]:.2f}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
