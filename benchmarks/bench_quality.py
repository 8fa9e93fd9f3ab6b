"""Quality at a fixed wall-clock budget: train on Tiny Shakespeare for a budget of seconds, then validation
bits per byte, beside nanoGPT's published CPU recipe.

    python benchmarks/bench_quality.py PATH/input.txt                     # the cpu-2min recipe, 120 s
    python benchmarks/bench_quality.py PATH/input.txt --reference         # and nanoGPT's recipe, same run
    python benchmarks/bench_quality.py PATH/input.txt --recipe cpu-2min --recipe cpu-10min --reference --repeats 3
    python benchmarks/bench_quality.py PATH/input.txt --recipe cpu-2min --recipe "cpu-2min optimizer=adamw \
        learning_rate=2e-3" --repeats 3                                   # a search: recipes side by side
    python benchmarks/bench_quality.py PATH/input.txt --config my.yaml --n-layer 6   # any recipe, any flag

A recipe (`--recipe`, repeatable) is a config file, or the name of one in training/configs/, followed by any
key=value overrides of its settings. Each trains for its own `max_time` (cpu-2min: 120 s, cpu-10min: 600 s), or
for `--budget` seconds if given; flags of the trainer given here (`--vocab-size 300`, `--data-cache DIR`) apply to
every recipe. `--reference` trains nanoGPT's recipe at each budget of the plan. With `--repeats N` every run
happens N times, the runs alternating (reference, recipe, other recipe, reference, ...) so that load from other
processes hits all alike, and the table shows the median bits per byte and the spread (lowest to highest).

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
recipe, reference, ...). Lower bits per byte is better; the ratios are run / published and run / the reference
at the same budget.
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
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aksis.checkpoint import load_model
from aksis.config import TrainConfig, read_settings
from aksis.corpora import load_corpus
from aksis.metrics import perplexity
from aksis.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
DEFAULT_RECIPE = CONFIGS / "cpu-2min.yaml"
DEFAULT_BUDGET = 120.0  # seconds, for the reference alone
REFERENCE_LABEL = "nanoGPT CPU recipe, through aksis"
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
    if result.stopped == "interrupted":  # Ctrl-C or SIGTERM: the trainer saved and returned; so does the benchmark
        raise SystemExit(f"[{name}] interrupted after {result.steps:,} steps: the benchmark stops, without a table")
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


def recipe_settings(spec: str) -> dict[str, Any]:
    """The settings of a recipe spec: a YAML/JSON file or the name of one in training/configs/, then any
    key=value overrides (values read as YAML: 0.02, true, none), e.g. "cpu-2min optimizer=adamw learning_rate=3e-3"."""
    if not spec.split():
        raise SystemExit("a --recipe is empty: give a config file or the name of one in training/configs/")
    name, *pairs = spec.split()
    path = Path(name)
    if path.suffix not in (".yaml", ".yml", ".json"):
        path = CONFIGS / f"{name}.yaml"
    try:
        settings = {k.replace("-", "_"): v for k, v in read_settings(path).items()}
    except ValueError as err:
        raise SystemExit(f"recipe {spec!r}: {err}") from None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"recipe {spec!r}: {pair!r} is not key=value")
        try:
            settings[key.replace("-", "_")] = _value(value)
        except yaml.YAMLError:
            raise SystemExit(f"recipe {spec!r}: the value of {key!r} is not a YAML value") from None
    return settings


def _value(text: str) -> Any:
    """A value as YAML reads it, and numbers YAML 1.1 leaves as text (4e-3, which it wants as 4.0e-3)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def recipe_label(spec: str) -> str:
    name, *pairs = spec.split()
    return " ".join(["aksis " + (Path(name).stem if Path(name).suffix else name), *pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="Tiny Shakespeare's input.txt")
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="SPEC",
        help="a recipe: a config file or the name of one in training/configs/, then any key=value overrides, "
        'e.g. --recipe "cpu-2min optimizer=adamw"; repeat to compare (default: cpu-2min)',
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of training per run (default: each recipe's max_time)"
    )
    parser.add_argument(
        "--reference", action="store_true", help="also train nanoGPT's CPU recipe through aksis, at each budget"
    )
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        help="stop the reference at this many steps if the budget lasts longer (2000: the published run exactly)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (alternating); the table shows medians")
    parser.add_argument("--no-recipe", action="store_true", help="train only the reference")
    TrainConfig.add_arguments(parser)  # --config FILE: one more recipe; any other flag applies to every recipe
    args = parser.parse_args()
    if not Path(args.path).is_file():
        raise SystemExit(f"{args.path} is not a file: give the path of Tiny Shakespeare's input.txt")
    if args.no_recipe and not args.reference:
        raise SystemExit("--no-recipe leaves nothing to train: add --reference")
    if args.repeats < 1 or (args.budget is not None and args.budget <= 0):
        raise SystemExit("--repeats must be at least 1 and --budget positive")
    specs = [*args.recipe, *([args.config] if args.config else [])] or [str(DEFAULT_RECIPE)]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}  # the flags given: over every recipe
    plan: list[tuple[str, TrainConfig, float]] = []  # (label, config, budget)
    if not args.no_recipe:
        for spec in specs:
            try:
                config = TrainConfig.from_dict({**recipe_settings(spec), **flags})
            except (ValueError, TypeError) as err:
                raise SystemExit(f"recipe {spec!r}: {err}") from None
            budget = args.budget or config.max_time
            if budget is None:
                raise SystemExit(f"recipe {spec!r} has no max_time: give --budget")
            plan.append((recipe_label(spec), config, budget))
    budgets = sorted({b for _, _, b in plan} or {args.budget or DEFAULT_BUDGET})
    if args.reference:
        reference = TrainConfig(
            **REFERENCE,
            max_steps=args.reference_steps,
            device=flags.get("device", "auto"),
            seed=flags.get("seed", 1337),
            data_cache=flags.get("data_cache"),
        )
        plan = [(REFERENCE_LABEL, reference, b) for b in budgets] + plan
    plan.sort(key=lambda item: item[2])  # shorter budgets first (a stable sort: the reference first in each)

    text = Path(args.path).read_text(encoding="utf-8")
    val_text = load_corpus(args.path, val_fraction=VAL_FRACTION, val_split="tail")["validation"]["text"][0]
    if len(text) != 1_115_394:
        print(f"note: {args.path} has {len(text):,} characters, not Tiny Shakespeare's 1,115,394", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"Tiny Shakespeare: {len(text):,} characters, the last {len(val_text.encode()):,} bytes validate; "
        f"budgets {', '.join(f'{b:g} s' for b in budgets)}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average {load:.2f}",
        flush=True,
    )

    runs: dict[tuple[str, float], list[Run]] = {(label, budget): [] for label, _, budget in plan}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.repeats):  # each repeat runs every recipe once: load from elsewhere hits all alike
            for n, (label, config, budget) in enumerate(plan):
                run_dir = str(Path(out) / f"{n}-{i}")
                run = train_and_score(label, bench_config(config, args.path, budget, run_dir), val_text)
                runs[(label, budget)].append(run)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        "\nvalidation bits per byte after each budget of training on this machine"
        + (f" (median of {args.repeats} runs each; spread: lowest to highest)" if args.repeats > 1 else "")
        + f"; load average {load:.2f} before, {load_after:.2f} after; lower is better"
    )
    print(table(runs, args.reference))
    for (label, budget), samples in runs.items():
        each = ", ".join(f"{r.bpb:.3f}" for r in samples)
        print(f"{label} ({budget:g} s): {samples[0].description}; bpb of each run: {each}")


def table(runs: dict[tuple[str, float], list[Run]], has_reference: bool) -> str:
    columns = ["run", "budget s", "steps", "tokens", "tokens/s", "val bpb", "spread", "vs nanoGPT published"]
    columns += ["vs reference"] if has_reference else []
    published = ["nanoGPT CPU recipe, published", "", "2,000", f"{2000 * 12 * 64:,}", "", f"{PUBLISHED_BPB:.3f}"]
    rows = [published + ["", "1.00x"] + ([""] if has_reference else [])]
    for (label, budget), samples in runs.items():
        bpb = statistics.median(r.bpb for r in samples)
        row = [
            label,
            f"{budget:g}",
            f"{statistics.median(r.steps for r in samples):,.0f}",
            f"{statistics.median(r.tokens for r in samples):,.0f}",
            f"{statistics.median(r.tokens / r.seconds for r in samples):,.0f}",
            f"{bpb:.3f}",
            f"{min(r.bpb for r in samples):.3f}-{max(r.bpb for r in samples):.3f}" if len(samples) > 1 else "",
            f"{bpb / PUBLISHED_BPB:.2f}x",
        ]
        if has_reference:
            reference = runs.get((REFERENCE_LABEL, budget))
            row.append(f"{bpb / statistics.median(r.bpb for r in reference):.2f}x" if reference else "")
        rows.append(row)
    widths = [max(len(columns[i]), *(len(r[i]) for r in rows)) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


if __name__ == "__main__":
    main()
