"""Lorsa training throughput and peak memory, and how memory scales with context length.

    python benchmarks/bench_lorsa.py            # the bundled llama's layer shape (d=256, 32 QK groups x 64 heads)

Each measurement runs in a fresh process so that its peak RSS is its own.  The forward pass never builds an
H x n x n tensor: memory should grow like n_qk * n^2 (the per-group patterns), not H * n^2.
"""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from replacement.lorsa import Lorsa, LorsaConfig
d, n_qk, hpg, n, B, steps = 256, 32, 64, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
device = sys.argv[4]
cfg = LorsaConfig(d_model=d, n_qk=n_qk, d_qk=32, heads_per_group=hpg, top_k=64, rotary_dim=32)
lorsa = Lorsa(cfg, inv_freq=1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))).to(device)
opt = torch.optim.Adam(lorsa.parameters(), 1e-3)
x, y = torch.randn(B, n, d, device=device), torch.randn(B, n, d, device=device)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def step():
    out, _ = lorsa(x)
    loss = (out - y).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
step()
t = time.time()
for _ in range(steps):
    step()
dt = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "batch": B, "tokens_per_s": B * n * steps / dt, "peak_rss_mb": peak / 1024,
                  "step_rss_mb": (peak - base) / 1024}))
"""


def run(n: int, batch: int, steps: int, device: str = "cpu", threads: int = 2) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(batch), str(steps), device, str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no options; --help says what it does
    H, n_qk = 32 * 64, 32
    print("Lorsa layer: d=256, n_qk=32, d_qk=32, 64 heads per group (H=2048), K=64, Adam, fp32, 2 threads")
    r = run(128, 16, 10)
    print(f"training throughput (16 x 128 tokens per step): {r['tokens_per_s']:.0f} tokens/s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"{'n':>5} {'tokens/s':>10} {'step RSS MB':>12} {'n_qk*n^2 MB':>12} {'H*n^2 MB (never built)':>24}")
    for n in (64, 128, 256, 512):
        B = max(1, 2048 // n)
        r = run(n, B, 5)
        print(f"{n:>5} {r['tokens_per_s']:>10.0f} {r['step_rss_mb']:>12.0f} {B * n_qk * n * n * 4 / 2**20:>12.1f} "
              f"{B * H * n * n * 4 / 2**20:>24.1f}")


if __name__ == "__main__":
    main()
