"""Loading a transformers checkpoint: aksis's `load_gpt` vs transformers' `AutoModelForCausalLM.from_pretrained`, side
by side: peak memory and wall time, each in a fresh process.

    python benchmarks/bench_load.py                          # SmolLM2-135M's shape, random weights, fp32
    python benchmarks/bench_load.py --checkpoint some/folder # a transformers checkpoint folder of your own

The checkpoint (without --checkpoint: the smollm2-135m preset with random weights, written by transformers'
`save_pretrained` from `aksis.interop.to_transformers`) is read once beforehand so both find it in the page cache.
Each loader then runs in its own Python process that has imported torch and its library first: peak RSS is that
process's high-water mark (VmHWM) after loading minus its RSS before (so imports do not count), set beside the size
of the model's weights in float32; then again after one forward pass, which touches every weight (a loader that maps
the file into memory reads it only then). A loader that materialises the state dict and then the model peaks near
twice the weights; one that fills the model tensor by tensor, near once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
{imports}
def rss(key):
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key))
    return int(line.split()[1]) * 1024
before = rss("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")
start = time.perf_counter()
model = {load}
seconds = time.perf_counter() - start
loaded = rss("VmHWM:") - before
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({{"seconds": seconds, "peak": loaded, "used": rss("VmHWM:") - before, "weights": weights}}))
"""

LOADERS = {
    "aksis load_gpt": ("from aksis.checkpoint import load_gpt", "load_gpt({folder!r})"),
    "transformers from_pretrained": (
        "import transformers; transformers.logging.set_verbosity_error()",
        "transformers.AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32)",
    ),
}


def write_random_checkpoint(folder: Path, preset: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from aksis.config import ModelConfig
    from aksis.interop import to_transformers
    from aksis.model import GPT

    torch.manual_seed(0)
    to_transformers(GPT(ModelConfig.from_preset(preset))).save_pretrained(folder)


def measure(name: str, folder: Path) -> dict[str, float]:
    imports, load = LOADERS[name]
    code = CHILD.format(root=str(ROOT), imports=imports, load=load.format(folder=str(folder)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a transformers checkpoint folder (default: random weights)")
    parser.add_argument("--preset", default="smollm2-135m", help="the shape of the random checkpoint")
    parser.add_argument("--runs", type=int, default=3, help="runs per loader (the median is shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.checkpoint or tmp)
        if args.checkpoint is None:
            write_random_checkpoint(folder, args.preset)
        for file in folder.glob("*.safetensors"):
            file.read_bytes()  # into the page cache, for both alike
        results = {name: [measure(name, folder) for _ in range(args.runs)] for name in LOADERS}
    print(f"loading {args.checkpoint or 'preset ' + args.preset + ' (random weights)'}; median of {args.runs} runs")
    header = (
        "| loader | seconds | peak RSS over imports, MiB | after a forward pass, MiB | weights (fp32), MiB "
        "| peak / weights |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, runs in results.items():
        mid = sorted(runs, key=lambda r: r["peak"])[len(runs) // 2]
        seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        print(
            f"| {name} | {seconds:.2f} | {mid['peak'] / 2**20:,.0f} | {mid['used'] / 2**20:,.0f} | "
            f"{mid['weights'] / 2**20:,.0f} | {max(mid['peak'], mid['used']) / mid['weights']:.2f} |"
        )


if __name__ == "__main__":
    main()
