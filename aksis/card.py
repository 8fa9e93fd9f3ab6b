"""The model card of a pushed checkpoint (the repo's README.md), and what a push may say about the run.

The card is written from the checkpoint folder: YAML metadata for the Hub (library_name: aksis, pipeline_tag, tags,
datasets, license, and `model-index` with the scores of eval_results.json on a Hub dataset), then the architecture,
the training setup and data, a loss curve drawn from metrics.jsonl (loss_curve.png), sample generations and how to
use the model. `card_metadata` is the metadata alone, which a run checks with the Hub before it trains.

Nothing pushed names a place on the machine that trained: the card names the run's settings by their public form
(aksis.runs.public_settings), and `public_files` rewrites the JSON files a push carries (trainer_state.json,
eval_results.json) the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCardData

from aksis.checkpoint import (
    CONFIG_FILE,
    EVAL_RESULTS_FILE,
    base_model_of,
    load_model,
    read_config,
    read_json,
    written_by,
)
from aksis.config import ModelConfig
from aksis.corpora import HUB_CORPORA
from aksis.generation import generate
from aksis.metrics import SIZES
from aksis.model import GPT
from aksis.plots import loss_curves, loss_figure
from aksis.runs import (
    TRAINER_STATE_FILE,
    TRAINING_STATE_DIR,
    is_local_path,
    public_name,
    public_settings,
    public_value,
    read_metrics,
)
from aksis.transformers_format import expressible_family

LOSS_CURVE_FILE = "loss_curve.png"
SAMPLE_PROMPTS = ("The ", "Once upon a time", "ROMEO:")


# ----- what may be said in public -----


def public_files(folder: Path) -> None:
    """Rewrite the JSON files of a staged checkpoint that record settings (its training state's trainer_state.json,
    eval_results.json) so that they name no place of this machine. Each is replaced, never written through: a
    staged file may be a hard link to the run's own."""
    rewrites = {
        folder / TRAINING_STATE_DIR / TRAINER_STATE_FILE: lambda d: {
            **d,
            "train_config": public_settings(d.get("train_config") or {}),
        },
        folder / EVAL_RESULTS_FILE: lambda d: {
            **public_value({k: v for k, v in d.items() if k != "settings"}),
            "settings": public_settings(d.get("settings") or {}),
        },
    }
    for path, rewrite in rewrites.items():
        if path.is_file():
            data = rewrite(read_json(path))
            path.unlink()
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----- the card -----


def plot_loss_curve(records: Sequence[dict[str, Any]], target: Path) -> bool:
    """Draw training and validation loss against tokens seen into `target` (PNG); False when there is nothing
    to draw."""
    figure = loss_figure(loss_curves(records, x="tokens"), x="tokens")
    if figure is None:
        return False
    figure.savefig(target)
    return True


def hub_dataset(dataset: str | None) -> str | None:
    """The Hub id of a training or evaluation dataset (None for local files and the embedded plays)."""
    if not dataset:
        return None
    if dataset in HUB_CORPORA:
        return HUB_CORPORA[dataset].path
    if not is_local_path(dataset) and dataset.count("/") == 1:
        return dataset
    return None


def eval_results(folder: Path) -> tuple[dict[str, Any], list[EvalResult]]:
    """What eval_results.json holds ({"dataset": ..., "split": ..., "metrics": {name: value}}, or a flat {name:
    value}), and its scores as `model-index` entries: only scores (not how much was scored), and only on a Hub
    dataset (model-index names a dataset by its Hub id)."""
    path = folder / EVAL_RESULTS_FILE
    if not path.is_file():
        return {}, []
    data = read_json(path)
    metrics = data.get("metrics", data)
    scores = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v) and k not in SIZES}
    dataset = hub_dataset(str(data.get("dataset") or ""))
    if dataset is None:
        return data, []
    entries = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=data.get("split"),
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in scores.items()
    ]
    return data, entries


def card_metadata(
    repo_id: str,
    *,
    arch: str | None,
    train_config: dict[str, Any] | None = None,
    license: str | None = None,
    results: Sequence[EvalResult] = (),
    family: str | None = None,
    base_model: str | None = None,
) -> ModelCardData:
    """The card's YAML metadata: what the Hub validates (a license it knows, datasets, model-index). `arch`: the
    model's flavour, a tag (None when not known yet); `family`: the transformers family its files are in, if any;
    `base_model`: the Hub model it was fine-tuned from (the Hub links the two)."""
    dataset = hub_dataset((train_config or {}).get("dataset"))
    family_tags = ["transformers", family] if family else []
    return ModelCardData(
        library_name="aksis",
        pipeline_tag="text-generation",
        tags=["aksis", "text-generation", *([f"{arch}-style"] if arch else []), *family_tags],
        base_model=base_model,
        license=license,
        datasets=[dataset] if dataset else None,
        model_name=repo_id.split("/")[-1],
        eval_results=list(results) or None,
    )


def sample_generations(folder: Path, prompts: Sequence[str] = SAMPLE_PROMPTS) -> list[tuple[str, str]]:
    """A few generations of the checkpoint (CPU, seeded, so a card is the same at every push) for the card."""
    model, tokenizer, defaults = load_model(folder, device="cpu")
    config = replace(defaults, max_new_tokens=48, seed=0, num_beams=1)
    return [(p, generate(model, tokenizer, p, config).text) for p in prompts]


def model_card(
    folder: str | Path,
    repo_id: str,
    *,
    train_config: dict[str, Any] | None = None,
    license: str | None = None,
    samples: Sequence[tuple[str, str]] = (),
    loss_curve: bool = False,
) -> str:
    """The README.md of a checkpoint folder's Hub repo. `train_config` is the run's settings (TrainConfig's);
    only their public form is written."""
    folder = Path(folder)
    config, in_transformers_layout = read_config(folder / CONFIG_FILE)
    family = expressible_family(config) if in_transformers_layout else None
    base = base_model_of(folder)
    train = public_settings(train_config or {})
    records = read_metrics(folder)
    evaluation, results = eval_results(folder)
    data = card_metadata(
        repo_id, arch=config.arch, train_config=train, license=license, results=results, family=family, base_model=base
    )
    n_params = _parameter_count(config)
    version = written_by(folder)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {n_params / 1e6:.1f}M-parameter decoder-only transformer language model, trained with aksis"
        + (f" {version}" if version else "")
        + (f", fine-tuned from [{base}](https://huggingface.co/{base})." if base else "."),
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| flavour | {_flavour(config.arch)} |",
        f"| layers | {config.n_layer} |",
        f"| model width (n_embd) | {config.n_embd} |",
        f"| attention heads (key/value) | {config.n_head} ({config.n_kv_head}) |",
        f"| MLP width (d_ff) | {config.d_ff} |",
        f"| context | {config.block_size} tokens |",
        f"| vocabulary | {config.vocab_size:,} tokens |",
        f"| parameters | {n_params:,} |",
        "",
    ]
    if train or records:
        lines += ["## Training", ""]
        dataset = train.get("dataset")
        if dataset:
            on_hub = hub_dataset(dataset)
            where = f"[{on_hub}](https://huggingface.co/datasets/{on_hub})" if on_hub else f"`{dataset}`"
            fmt = " (conversations, loss on the assistant's replies)" if train.get("data_format") == "chat" else ""
            lines.append(f"- data: {where}{fmt}")
        for key, label in (
            ("init_from", "fine-tuned from"),
            ("tokenizer", "tokenizer"),
            ("batch_size", "batch size per process"),
            ("grad_accum_steps", "gradient accumulation"),
            ("optimizer", "optimizer"),
            ("learning_rate", "peak learning rate"),
            ("mixed_precision", "mixed precision"),
        ):
            if train.get(key) is not None:
                lines.append(f"- {label}: `{train[key]}`")
        last = records[-1] if records else {}
        if last:
            lines.append(f"- trained for {last.get('step', 0):,} steps, {last.get('tokens', 0):,} tokens")
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        if vals:
            best = min(vals)
            lines.append(f"- best validation loss: {best:.4f} nats/token (perplexity {math.exp(min(best, 50)):.2f})")
        lines.append("")
        if loss_curve:
            lines += [f"![training and validation loss]({LOSS_CURVE_FILE})", ""]
    metrics = evaluation.get("metrics", evaluation)
    scores = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v) and k not in SIZES}
    if scores:
        on = public_name(str(evaluation.get("dataset") or "")) or "held-out text"
        split = f" ({evaluation['split']} split)" if evaluation.get("split") else ""
        sizes = ", ".join(f"{int(metrics[k]):,} {k.split('_')[0]}" for k in SIZES if k in metrics)
        lines += ["## Evaluation", "", f"On `{on}`{split}{f', {sizes} scored' if sizes else ''}:", ""]
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in scores.items()), ""]
    if samples:
        lines += ["## Samples", "", "Default sampling settings, seed 0, 48 new tokens:", ""]
        for prompt, text in samples:
            lines += ["```text", (prompt + text).replace("```", "'''"), "```", ""]
    wheel = f"aksis-{version}-py3-none-any.whl" if version else "aksis-VERSION-py3-none-any.whl"
    lines += [
        "## Use it",
        "",
        f"With aksis{f' {version}' if version else ''} installed: from a release, `pip install {wheel}` (the wheel "
        "of that release), or from a clone of aksis's source repository, `pip install .` (install PyTorch first, "
        "e.g. `pip install torch`).",
        "",
        "```bash",
        f'aksis generate-text --checkpoint-path {repo_id} --prompt "Once upon a time" --stream',
        f"aksis chat-with-model --checkpoint-path {repo_id}",
        "```",
        "",
        "```python",
        "from aksis.checkpoint import load_model",
        "from aksis.generation import generate",
        "",
        f'model, tokenizer, settings = load_model("{repo_id}")',
        'print(generate(model, tokenizer, "Once upon a time", settings).text)',
        "```",
        "",
    ]
    if family:
        lines += [
            f"The repo is also a transformers checkpoint ({family} family), so transformers loads it as it is:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    return "\n".join(lines)


def _flavour(arch: str) -> str:
    if arch == "llama":
        return "LLaMA style: rotary positions, RMSNorm, SwiGLU"
    return "GPT-2 style: learned positions, pre-norm LayerNorm, GELU"


def _parameter_count(config: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time
        return GPT(config).num_params()
