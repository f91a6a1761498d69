"""Attribution at real model sizes: random-weight models of the Pythia-160M and Llama-3.2-1B shapes (HF configs,
no download) with random replacements of the paper's sizes (8 QK groups per model head, 64 Lorsa heads per
group, K = 64; transcoders as wide as the Lorsa layer, K = 64), traced under the node budget.

    python benchmarks/bench_scale.py [--shape pythia160m|llama1b] [--tokens 16,64,256] [--max-feature-nodes 1500]
                                     [--device cpu|cuda] [--dtype float32|bfloat16] [--qk-per-head 8]
                                     [--heads-per-group 64]

Each prompt length runs in a fresh process (so that each peak is its own): the memory estimate and its
verdict (graphs/memory_estimate.py), then the time of the record + budgeted attribution + pruning (with QK for the
25 most influential heads), the graph's size, and the peak resident memory (and peak CUDA memory on a GPU).
Random weights make every head and feature slot active, the worst case for the graph's size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "pythia160m": ("neox", dict(vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=2048, rotary_pct=0.25,
                                use_parallel_residual=True)),
    "llama1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                              tie_word_embeddings=True)),
}

ONE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_scale import build, run_one
print(json.dumps(run_one(*build(sys.argv[2], sys.argv[5], sys.argv[6], int(sys.argv[7]), int(sys.argv[8])),
                         int(sys.argv[3]), int(sys.argv[4]))))
"""


def build(shape: str, device: str, dtype: str = "float32", qk_per_head: int = 8, heads_per_group: int = 64):
    """(ReplacementModel, device) for a random model of ``shape`` with random paper-sized replacements, the model's
    weights in ``dtype`` (bfloat16 halves them) and the replacements' in float32 (they run on float32 inputs).
    ``qk_per_head`` QK groups per model head and ``heads_per_group`` Lorsa heads per group (the paper's 8 and 64 by
    default); the transcoders are as wide as the Lorsa layer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from replacement.assemble import ReplacementModel
    from replacement.lorsa import LorsaConfig, lorsa_for_model
    from replacement.models import ModelAdapter
    from replacement.transcoder import Transcoder, TranscoderConfig

    arch, kw = SHAPES[shape]
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    torch.set_default_dtype(dt)  # the random weights are made in dtype: no float32 copy of a 1B model first
    hf = (GPTNeoXForCausalLM(GPTNeoXConfig(**kw)) if arch == "neox" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    adapter = ModelAdapter(hf.to(device), name=shape)
    modules = {}
    for L in range(adapter.n_layers):
        cfg = LorsaConfig.default_for(adapter, L, heads_per_group, qk_per_head)  # K = 64
        lorsa = lorsa_for_model(adapter, L, cfg)
        tc = Transcoder(TranscoderConfig(adapter.d_model, cfg.n_heads, 64, layer=L))
        modules[("lorsa", L)] = lorsa.to(device, torch.float32).eval()
        modules[("transcoder", L)] = tc.to(device, torch.float32).eval()
    torch.set_default_dtype(torch.float32)
    return ReplacementModel(adapter, modules, "lorsa"), device


def run_one(model, device: str, n_tokens: int, max_feature_nodes: int) -> dict:
    import resource
    import time

    import torch

    from graphs.attribution import attribute
    from graphs.memory_estimate import estimate
    from replacement.memory import available_bytes
    from graphs.prune import FILE_MAX_EDGES, FILE_MAX_FEATURES, prune

    ks = [model.lorsas[L].cfg.top_k for L in sorted(model.lorsas)], [model.transcoders[L].cfg.top_k for L in sorted(model.transcoders)]
    est = estimate(n_tokens, *ks, max_feature_nodes=max_feature_nodes, d_model=model.adapter.d_model)
    out = {"tokens": n_tokens, "est_edges": est.edges, "est_gb": est.bytes / 2**30,
           "budget_gb": (available_bytes() or 0) / 2**30}
    if available_bytes() is not None and est.bytes > available_bytes():
        return {**out, "refused": True}
    torch.manual_seed(1)
    ids = torch.randint(0, model.adapter.config.vocab_size, (1, n_tokens), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.time()
    g = attribute(model, ids, max_feature_nodes=max_feature_nodes, qk_heads=25)
    t_attr = time.time() - t
    p = prune(g, max_nodes=FILE_MAX_FEATURES, max_edges=FILE_MAX_EDGES)
    out.update(seconds=time.time() - t, attribution_s=t_attr, nodes=len(g), edges=len(g.edge_arrays),
               active_features=g.settings["active_features"], pruned_nodes=len(p), pruned_edges=len(p.edge_arrays),
               peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
               model_gb=base / 2**30)
    if device == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="pythia160m")
    ap.add_argument("--tokens", default="16,64,256")
    ap.add_argument("--max-feature-nodes", type=int, default=1500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qk-per-head", type=int, default=8, help="QK groups per model head (the paper: 8)")
    ap.add_argument("--heads-per-group", type=int, default=64, help="Lorsa heads per QK group (the paper: 64)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="of the model's weights (the replacements stay float32)")
    a = ap.parse_args()
    print(f"{a.shape}, random weights and random replacements, --max-feature-nodes "
          f"{a.max_feature_nodes}, {a.device}, {a.dtype} weights, {a.qk_per_head} QK groups per head x {a.heads_per_group} heads per group, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for n in (int(x) for x in a.tokens.split(",")):
        r = subprocess.run([sys.executable, "-c", ONE, str(ROOT), a.shape, str(n), str(a.max_feature_nodes), a.device, a.dtype,
                            str(a.qk_per_head), str(a.heads_per_group)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            print(f"  {n} tokens: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        head = f"  {n} tokens: estimate {m['est_edges'] / 1e6:.1f}M edges, {m['est_gb']:.1f} GB (budget {m['budget_gb']:.1f} GB)"
        if m.get("refused"):
            print(head + ": refused (a smaller --max-feature-nodes or a shorter prompt)")
            continue
        cuda = f", CUDA peak {m['cuda_peak_gb']:.2f} GB" if "cuda_peak_gb" in m else ""
        print(head + f"; {m['seconds']:.1f} s (attribution {m['attribution_s']:.1f} s), {m['active_features']:,} active "
              f"features, graph {m['nodes']:,} nodes / {m['edges'] / 1e6:.2f}M edges -> pruned {m['pruned_nodes']:,} / "
              f"{m['pruned_edges']:,}; peak RSS {m['peak_gb']:.2f} GB (model and replacements {m['model_gb']:.2f} GB){cuda}")


if __name__ == "__main__":
    main()
