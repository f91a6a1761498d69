"""The README's two screenshots: the HTML page of `36 + 62 =` on llama and of the induction showcase on pythia (a
held-out sentence that recurs: examples/induction.py's prompt), as headless Chromium shows them on opening at
1600 x 1000.

    python docs/screenshots.py [--out docs] [--model llama pythia]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

WINDOW = "1600,1000"


def page(model_name: str, folder: Path) -> Path:
    """Trace the model's showcase prompt as `trace` does and write its page (with dashboards) into ``folder``."""
    from graphs.html import write_html
    from graphs.pipeline import trace_graphs
    from replacement.assemble import ReplacementModel
    from replacement.dashboards import load_or_build
    from replacement.evaluate import natural_copy_prompt
    from replacement.models import load_model

    adapter = load_model(model_name)
    model = ReplacementModel.load(adapter)
    # pythia: examples/induction.py's showcase (its NATURAL_SEEDS["pythia"])
    ids = adapter.tokenize("36 + 62 =") if model_name == "llama" else natural_copy_prompt(adapter, 5)[0]
    _, graph = trace_graphs(model, ids)  # trace's feature budget, pruning, families and lens
    return write_html(graph, folder / f"{model_name}.html", load_or_build(model))


def find_chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def screenshot(html: Path, png: Path) -> None:
    chromium = find_chromium()
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--virtual-time-budget=10000", f"--window-size={WINDOW}", "--hide-scrollbars",
                        f"--screenshot={png}", f"file://{html.resolve()}"], check=True, capture_output=True, timeout=300)
    if shutil.which("pngquant"):  # a palette of a few dozen colours: a third of the size, the same picture
        subprocess.run(["pngquant", "--quality=60-90", "--speed=1", "--force", "--output", str(png), str(png)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent),
                    help="folder for the PNGs (default: docs/, over the tracked screenshots)")
    ap.add_argument("--model", nargs="+", choices=["llama", "pythia"], default=["llama", "pythia"])
    args = ap.parse_args()
    if find_chromium() is None:  # before the traces: say so in a line, not a StopIteration after minutes of work
        raise SystemExit("error: no headless Chromium found (chromium, chromium-browser or google-chrome on PATH; "
                         "apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = {"llama": "page-llama-addition.png", "pythia": "page-pythia-induction.png"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shot in ((m, shots[m]) for m in args.model):
            screenshot(page(name, Path(tmp)), out / shot)
            print(f"wrote {out / shot}")


if __name__ == "__main__":
    from replacement.errors import run_script

    run_script(main)
