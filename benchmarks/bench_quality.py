"""Quality at a fixed wall-clock budget: train on Tiny Shakespeare for `--budget` seconds, then validation
bits per byte, beside nanoGPT's published CPU recipe.

    python benchmarks/bench_quality.py PATH/input.txt                     # the cpu-2min recipe, 120 s
    python benchmarks/bench_quality.py PATH/input.txt --reference         # and nanoGPT's recipe, same run
    python benchmarks/bench_quality.py PATH/input.txt --reference --repeats 3 --budget 120
    python benchmarks/bench_quality.py PATH/input.txt --config my.yaml --n-layer 6   # any recipe, any flag

PATH/input.txt is a copy of the classic Tiny Shakespeare (karpathy/char-rnn's input.txt, 1,115,394
characters). As nanoGPT does, its first 90% of characters train and its last 10% validate (`--val-split tail`).

Each run is `aksis.trainer` with `--max-time BUDGET` (the schedule follows the budget; periodic evaluations
and saves are off, so the budget is spent on training steps: the first steps include a `torch.compile` where
the recipe asks for one; data preparation and tokenizer training come before the clock starts). Then the last
checkpoint scores the whole validation text with `aksis.metrics.perplexity` in back-to-back windows of the
model's context: each token sees the tokens since its window began, as in nanoGPT's evaluation of random
blocks. Bits per byte = total NLL in nats / ln 2 / UTF-8 bytes of the validation text, the same for any
tokenizer; for this ASCII file, bits per byte = bits per character = nats per character / ln 2.

The published point: nanoGPT's README trains a 4-layer, 128-wide model (4 heads, context 64, batch 12, no
dropout) for 2000 iterations on a CPU and reports a validation loss of about 1.88 nats per character, 2.71 bits
per byte (2000 such steps take about 2 minutes on a 2-core CPU like the one this benchmark was made on;
`--reference --reference-steps 2000` reproduces it: 1.89 nats per character there). `--reference` trains
that recipe itself through aksis (byte tokens = characters for ASCII text; gpt2 flavour; learning rate 1e-3
to 1e-4 with 100 warmup steps, AdamW betas 0.9/0.99, weight decay 0.1, clipping 1.0) under the same budget in
the same process, so the comparison is on the same machine at the same time. The runs alternate (reference,
recipe, reference, ...) so that load from other processes hits both; with `--repeats N` the table shows
medians. Lower bits per byte is better; the ratios are run / published and run / reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aksis.checkpoint import load_model
from aksis.config import TrainConfig
from aksis.corpora import load_corpus
from aksis.metrics import perplexity
from aksis.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "training" / "configs" / "cpu-2min.yaml"
PUBLISHED_NATS = 1.88  # nanoGPT README, CPU recipe: val loss after 2000 iterations
PUBLISHED_BPB = PUBLISHED_NATS / math.log(2)
VAL_FRACTION = 0.1  # nanoGPT: the last 10% of the characters validate

# nanoGPT's config/train_shakespeare_char.py with the README's CPU overrides (--block_size=64 --batch_size=12
# --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0), in aksis terms.
REFERENCE = dict(
    tokenizer="byte",
    preset="tiny",  # 128 wide, 4 heads, MLP 512
    n_layer=4,
    block_size=64,
    batch_size=12,
    dropout=0.0,
    learning_rate=1e-3,
    min_lr_ratio=0.1,  # min_lr 1e-4
    warmup_steps=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
)


@dataclass
class Run:
    name: str
    description: str
    steps: int
    tokens: int
    seconds: float  # the training loop's clock
    nll: float  # nats per token
    bpb: float


def bench_config(base: TrainConfig, path: str, budget: float, output_dir: str) -> TrainConfig:
    """`base` trained on `path` with nanoGPT's split, for `budget` seconds of training with no periodic
    evaluation or save (the final ones come after the budget)."""
    return dataclasses.replace(
        base,
        dataset=path,
        val_fraction=VAL_FRACTION,
        val_split="tail",
        max_time=budget,
        epochs=max(base.epochs, 10_000),  # the budget ends the run, not the epochs
        eval_every=10**9,
        save_every=10**9,
        keep_last=1,
        output_dir=output_dir,
        overwrite=True,
        resume=None,
        push_to_hub=False,
        hub_model_id=None,
        push_every=None,
        push_training_state=False,
        report_to="none",
        progress=False,
    )


def train_and_score(name: str, config: TrainConfig, val_text: str) -> Run:
    trainer = Trainer(config)
    model_config = trainer.model_config
    description = (
        f"{model_config.n_layer}x{model_config.n_embd} {model_config.arch}, context {trainer.block_size}, "
        f"batch {config.batch_size}x{config.grad_accum_steps}, {trainer.tokenizer.name} "
        f"({trainer.tokenizer.vocab_size} tokens), lr {config.learning_rate:g}"
        + (", bf16" if config.mixed_precision == "bf16" else "")
        + (", compiled" if config.compile else "")
    )
    print(f"[{name}] {description}: training for {config.max_time:g} s ...", flush=True)
    result = trainer.train()
    seconds = trainer.state.clock
    assert result.last_checkpoint is not None
    model, tokenizer, _ = load_model(result.last_checkpoint, device="cpu")
    context = model.config.block_size
    score = perplexity(model, tokenizer, [val_text], stride=context, batch_size=max(1, 16_384 // context))
    run = Run(name, description, result.steps, result.tokens, seconds, score.nll, score.bits_per_byte)
    print(
        f"[{name}] {run.steps:,} steps, {run.tokens:,} tokens in {seconds:.1f} s ({run.tokens / seconds:,.0f} "
        f"tokens/s): validation {run.bpb:.4f} bits per byte ({score.nll:.4f} nats per token)",
        flush=True,
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="Tiny Shakespeare's input.txt")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training per run (default: 120)")
    parser.add_argument("--reference", action="store_true", help="also train nanoGPT's CPU recipe through aksis")
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        help="stop the reference at this many steps if the budget lasts longer (2000: the published run exactly)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (alternating); the table shows medians")
    parser.add_argument("--no-recipe", action="store_true", help="train only the reference")
    TrainConfig.add_arguments(parser)  # the recipe: --config FILE (default: cpu-2min.yaml), then any flag
    args = parser.parse_args()
    if args.config is None:
        args.config = str(DEFAULT_RECIPE)
    if not Path(args.path).is_file():
        raise SystemExit(f"{args.path} is not a file: give the path of Tiny Shakespeare's input.txt")
    if args.no_recipe and not args.reference:
        raise SystemExit("--no-recipe leaves nothing to train: add --reference")
    recipe = TrainConfig.from_args(args)
    reference = TrainConfig(
        **REFERENCE,
        max_steps=args.reference_steps,
        device=recipe.device,
        seed=recipe.seed,
        data_cache=recipe.data_cache,
    )

    text = Path(args.path).read_text(encoding="utf-8")
    val_text = load_corpus(args.path, val_fraction=VAL_FRACTION, val_split="tail")["validation"]["text"][0]
    if len(text) != 1_115_394:
        print(f"note: {args.path} has {len(text):,} characters, not Tiny Shakespeare's 1,115,394", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"Tiny Shakespeare: {len(text):,} characters, the last {len(val_text.encode()):,} bytes validate; "
        f"budget {args.budget:g} s per run; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average {load:.2f}",
        flush=True,
    )

    plan = [("reference", reference)] if args.reference else []
    plan += [] if args.no_recipe else [("recipe", recipe)]
    runs: dict[str, list[Run]] = {name: [] for name, _ in plan}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.repeats):
            for name, config in plan:
                run_dir = str(Path(out) / f"{name}-{i}")
                runs[name].append(
                    train_and_score(name, bench_config(config, args.path, args.budget, run_dir), val_text)
                )
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    labels = {
        "reference": "nanoGPT CPU recipe, through aksis",
        "recipe": f"aksis {Path(args.config).stem}" if args.config else "aksis",
    }
    print(
        f"\nvalidation bits per byte after {args.budget:g} s of training on this machine"
        + (f" (median of {args.repeats} runs each)" if args.repeats > 1 else "")
        + f"; load average {load:.2f} before, {load_after:.2f} after; lower is better"
    )
    has_reference = "reference" in runs
    header = (
        f"| {'run':<34} | {'steps':>6} | {'tokens':>9} | {'tokens/s':>8} | {'val bpb':>7} | "
        f"{'vs nanoGPT published':>20} |" + (f" {'vs reference':>12} |" if has_reference else "")
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    row = f"| {'nanoGPT CPU recipe, published':<34} | {2000:>6,} | {2000 * 12 * 64:>9,} | {'':>8} | "
    row += f"{PUBLISHED_BPB:>7.3f} | {1.0:>19.2f}x |" + (f" {'':>12} |" if has_reference else "")
    print(row)
    reference_bpb = statistics.median(r.bpb for r in runs["reference"]) if has_reference else None
    for name, samples in runs.items():
        bpb = statistics.median(r.bpb for r in samples)
        steps = statistics.median(r.steps for r in samples)
        tokens = statistics.median(r.tokens for r in samples)
        speed = statistics.median(r.tokens / r.seconds for r in samples)
        row = f"| {labels[name]:<34} | {steps:>6,.0f} | {tokens:>9,.0f} | {speed:>8,.0f} | {bpb:>7.3f} | "
        row += f"{bpb / PUBLISHED_BPB:>19.2f}x |"
        if reference_bpb is not None:
            row += f" {bpb / reference_bpb:>11.2f}x |"
        print(row)
    for name, samples in runs.items():
        print(
            f"{labels[name]}: {samples[0].description}; bpb of each run: {', '.join(f'{r.bpb:.3f}' for r in samples)}"
        )


if __name__ == "__main__":
    main()
