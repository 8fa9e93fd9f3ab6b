"""How good is a checkpoint: perplexity and bits per byte, BLEU / ROUGE of generations, generation statistics.

- `perplexity` scores every token of each text given as much left context as the model allows: each text
  starts after `<|endoftext|>` (as documents follow one another in training, so its first token is scored too)
  and long texts are read in windows of the model's context that advance by `stride` tokens (default half the
  context); each window scores only the tokens no earlier window scored, so every token but the first
  `context` ones sees at least `context - stride` tokens before it. It reports the mean negative
  log-likelihood per token, its exponential (perplexity) and bits per byte: the total NLL in bits over the
  UTF-8 bytes of the texts, which does not depend on the tokenizer, so models with different tokenizers compare.
- Generation tasks score generated text against references with BLEU and ROUGE (`aksis.scores`, through the
  `evaluate` library and the metric modules in aksis/metric_modules/): "continuation" prompts with the first
  `prompt_tokens` tokens of held-out windows and compares the next `new_tokens` generated tokens with the true
  ones; "prompts" reads a JSONL of {"prompt": ..., "reference": ...}. Generation statistics (distinct-n,
  repetition, length) describe the generated texts themselves.
- `evaluate_checkpoint` runs the chosen tasks and returns a flat {metric: value} dict plus details; `markdown_table`
  puts several checkpoints side by side; `save_results` writes eval_results.json, which the Hub model card turns
  into `model-index` results.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aksis.checkpoint import EVAL_RESULTS_FILE
from aksis.config import IGNORE_INDEX, GenerationConfig
from aksis.generation import generate_batch
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

TASKS = ("perplexity", "continuation", "prompts")


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token, in nats
    bits_per_byte: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the texts scored


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n ids whose first id is only context: (begin, stop, keep) reads ids[begin:stop]
    (at most context + 1 ids: inputs [:-1], targets [1:]) and scores its last `keep` targets, those no earlier
    window scored."""
    out, scored, begin = [], 1, 0
    while scored < n:
        stop = min(begin + context + 1, n)
        if stop > scored:
            out.append((begin, stop, stop - scored))
            scored = stop
        begin += stride
    return out


class OutOfTime(Exception):
    """Scoring ran past its deadline (a public Space bounds each request by time). Not a ValueError: the input was
    fine, the time was short, and the app says so in its own words."""


def _check_time(deadline: float | None, what: str) -> None:
    """OutOfTime once time.monotonic() has reached `deadline` (never, without one)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise OutOfTime(f"{what} ran out of the time it was given: score fewer or shorter texts")


@torch.inference_mode()
def perplexity(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    deadline: float | None = None,
) -> PerplexityResult:
    """Perplexity, NLL per token and bits per byte of `texts` (see the module docstring for the windows). OutOfTime
    when `deadline` (a time.monotonic() instant) passes first."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no text to score: give at least one non-empty text")
    context = model.config.block_size
    stride = stride or max(context // 2, 1)
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    device = next(model.parameters()).device
    jobs: list[tuple[list[int], int]] = []  # (window ids, how many of its last targets to score)
    for text in texts:
        ids = [tokenizer.document_start, *tokenizer.encode(text)]
        jobs += [(ids[begin:stop], keep) for begin, stop, keep in _windows(len(ids), context, stride)]
    total_nll, total_tokens = 0.0, 0
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        _check_time(deadline, "scoring the perplexity")
        batch = jobs[start : start + batch_size]
        width = max(len(w) for w, _ in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, (window, keep) in enumerate(batch):
            n = len(window) - 1
            inputs[row, :n] = torch.tensor(window[:-1])
            targets[row, n - keep : n] = torch.tensor(window[n - keep + 1 :])
        logits, _ = model(inputs.to(device))
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), targets.to(device), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    mean = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        bits_per_byte=total_nll / math.log(2) / n_bytes,
        tokens=total_tokens,
        bytes=n_bytes,
    )


# ----- generation tasks -----


def continuation_pairs(
    tokenizer: Tokenizer, texts: Sequence[str], *, prompt_tokens: int = 32, new_tokens: int = 32, num_samples: int = 50
) -> list[tuple[list[int], str]]:
    """(prompt ids, reference text) pairs cut from held-out texts: of all the back-to-back windows of
    `prompt_tokens` + `new_tokens` tokens in the texts, `num_samples` spread evenly from first to last."""
    span = prompt_tokens + new_tokens
    windows = [
        (ids, start) for ids in (tokenizer.encode(t) for t in texts) for start in range(0, len(ids) - span + 1, span)
    ]
    if not windows:
        raise ValueError(f"no text holds {span} tokens ({prompt_tokens} of prompt + {new_tokens} to generate)")
    step = len(windows) / min(num_samples, len(windows))
    chosen = [windows[int(i * step)] for i in range(min(num_samples, len(windows)))]
    return [(ids[s : s + prompt_tokens], tokenizer.decode(ids[s + prompt_tokens : s + span])) for ids, s in chosen]


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, reference) pairs of a JSONL file with one {"prompt": ..., "reference": ...} per line."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the prompts file {path}: {err}") from err
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        expected = f'{path}, line {number}: expected {{"prompt": "...", "reference": "..."}}'
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: JSON nested too deeply
            raise ValueError(f"{expected} ({type(err).__name__})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "reference")):
            raise ValueError(f"{expected}, with text for both")
        pairs.append((record["prompt"], record["reference"]))
    if not pairs:
        raise ValueError(f"{path} holds no prompts: write one JSON object per line")
    return pairs


def score_generations(
    model: GPT,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str | list[int], str]],
    config: GenerationConfig,
    *,
    metrics: Sequence[str] = ("bleu", "rouge"),
    batch_size: int = 8,
    progress: bool = False,
    deadline: float | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Generate from each prompt (in batches), then BLEU / ROUGE against the references and generation
    statistics of the generated texts; ({metric: value}, generated texts). OutOfTime when `deadline` (a
    time.monotonic() instant) passes first: a batch under way then stops at it."""
    from aksis.scores import bleu, generation_stats, rouge

    generated: list[str] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="generating", unit="batch", disable=not progress):
        _check_time(deadline, "generating for BLEU / ROUGE")
        prompts = [prompt for prompt, _ in pairs[start : start + batch_size]]
        timed = config if deadline is None else replace(config, max_time=max(deadline - time.monotonic(), 1e-3))
        completions = generate_batch(model, tokenizer, prompts, timed)
        if any(c.finish_reason == "time" for c in completions):
            _check_time(deadline, "generating for BLEU / ROUGE")  # a batch cut short would score its texts unfairly
        generated += [c.text for c in completions]
    references = [reference for _, reference in pairs]
    scores: dict[str, float] = {}
    if "bleu" in metrics:
        scores["bleu"] = float(bleu(generated, references)["score"])
    if "rouge" in metrics:
        scores.update({k: float(v) for k, v in rouge(generated, references).items()})
    scores.update({k: float(v) for k, v in generation_stats(generated).items()})
    return scores, generated


# ----- the report -----


def evaluate_checkpoint(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    tasks: Sequence[str] = ("perplexity", "continuation"),
    metrics: Sequence[str] = ("bleu", "rouge"),
    config: GenerationConfig | None = None,
    prompts: Sequence[tuple[str, str]] = (),
    stride: int | None = None,
    batch_size: int = 8,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    num_samples: int = 50,
    progress: bool = False,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Run `tasks` ("perplexity", "continuation" on `texts`, "prompts" on (prompt, reference) pairs); a flat
    {name: value} under "metrics" (names prefixed by task for the generation tasks), and samples. OutOfTime when
    `deadline` (a time.monotonic() instant) passes first."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    config = config or GenerationConfig(temperature=0.0)
    out: dict[str, Any] = {"metrics": {}, "samples": {}}
    if "perplexity" in tasks:
        result = perplexity(
            model, tokenizer, texts, stride=stride, batch_size=batch_size, progress=progress, deadline=deadline
        )
        out["metrics"].update(
            perplexity=result.perplexity,
            nll=result.nll,
            bits_per_byte=result.bits_per_byte,
            tokens_scored=result.tokens,
            bytes_scored=result.bytes,
        )
    jobs: list[tuple[str, Sequence[tuple[str | list[int], str]], GenerationConfig]] = []
    if "continuation" in tasks:
        pairs = continuation_pairs(
            tokenizer, texts, prompt_tokens=prompt_tokens, new_tokens=new_tokens, num_samples=num_samples
        )
        jobs.append(("continuation", pairs, GenerationConfig(**{**config.to_dict(), "max_new_tokens": new_tokens})))
    if "prompts" in tasks:
        if not prompts:
            raise ValueError("the prompts task needs (prompt, reference) pairs: give --prompts-file FILE.jsonl")
        jobs.append(("prompts", list(prompts), config))
    for name, pairs_, task_config in jobs:
        scores, generated = score_generations(
            model,
            tokenizer,
            pairs_,
            task_config,
            metrics=metrics,
            batch_size=batch_size,
            progress=progress,
            deadline=deadline,
        )
        out["metrics"].update({f"{name}_{k}": v for k, v in scores.items()})
        out["samples"][name] = [
            {"prompt": p if isinstance(p, str) else tokenizer.decode(p), "reference": r, "generated": g}
            for (p, r), g in list(zip(pairs_, generated, strict=True))[:3]
        ]
    return out


def save_results(
    folder: str | Path, results: dict[str, Any], *, dataset: str, split: str, settings: dict[str, Any]
) -> Path:
    """Write eval_results.json into a checkpoint folder (the model card reads its "metrics")."""
    path = Path(folder) / EVAL_RESULTS_FILE
    record = {"dataset": dataset, "split": split, "metrics": results["metrics"], "settings": settings}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


SIZES = ("tokens_scored", "bytes_scored")  # how much was scored, not how well: no model-index scores
LABELS = {
    "perplexity": "perplexity",
    "nll": "NLL per token (nats)",
    "bits_per_byte": "bits per byte",
    "tokens_scored": "tokens scored",
    "bytes_scored": "bytes scored",
}


def markdown_table(columns: dict[str, dict[str, float]]) -> str:
    """Checkpoints side by side: one row per metric, one column per checkpoint."""
    names = list(dict.fromkeys(k for metrics in columns.values() for k in metrics))
    header = "| metric | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [_fmt(metrics.get(name)) for metrics in columns.values()]
        lines.append(f"| {LABELS.get(name, name.replace('_', ' '))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4g}"
