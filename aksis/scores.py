"""Scores of generated text: BLEU and ROUGE against references, and statistics of the generations themselves.

- `bleu` and `rouge` run the `evaluate` metric modules in aksis/metric_modules/ (sacreBLEU's corpus BLEU, 0-100;
  rouge_score's F-measures averaged over predictions, 0-1). They are loaded by path, which never asks the Hub
  for anything, online or offline, and once per process (`load_metric`).
- `generation_stats` needs no references: distinct-1/2, the 4-gram repetition rate, and the mean length.

`evaluate` is imported on first use, not with this module: importing it also imports `transformers` when that is
installed, which takes several seconds.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The metric modules ship inside the package (package data), so an installed wheel has them too.
METRIC_MODULES = Path(__file__).resolve().parent / "metric_modules"

REPETITION_N = 4  # generation_stats' repetition rate counts repeated 4-grams


@functools.cache
def load_metric(name: str) -> Any:
    """The `evaluate` metric module metric_modules/<name>/<name>.py ("bleu" or "rouge"), loaded once.

    It is an `evaluate.Metric`: `load_metric("bleu").compute(predictions=..., references=..., **options)`.
    Its inputs are kept in memory, not in a cache file on disk."""
    script = METRIC_MODULES / name / f"{name}.py"
    if not script.is_file():
        known = sorted(p.name for p in METRIC_MODULES.iterdir() if (p / f"{p.name}.py").is_file())
        raise FileNotFoundError(
            f"no metric module at {script}: aksis ships {', '.join(known)} in aksis/metric_modules/ (if one of those "
            "is missing, the installation is incomplete: reinstall aksis)"
        )
    # Imported here because it is slow (see the module docstring); through importlib because it ships no type
    # information, which mypy would otherwise report.
    evaluate = importlib.import_module("evaluate")
    if not hasattr(evaluate, "load"):
        # Running a script from a folder that holds a file named evaluate.py (a user's own) puts that file first on
        # sys.path.
        raise ImportError(
            f"`import evaluate` found {evaluate.__file__}, not the evaluate library: rename that file, or run "
            "your script from somewhere else"
        )
    # A path to a folder holding a script of the same name loads that script and nothing else: no Hub look-up.
    return evaluate.load(str(script.parent), keep_in_memory=True)


def bleu(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], **options: Any
) -> dict[str, Any]:
    """Corpus BLEU of `predictions` against `references` (one string, or a list of strings, per prediction).

    Options are sacreBLEU's: `tokenize` ("13a" by default, "intl", "char", "zh", "none", ...), `lowercase`,
    `smooth_method` ("exp", "floor", "add-k", "none"), `smooth_value`, `use_effective_order`, `force`.
    Returns score (0-100), counts and totals (matching and predicted n-grams, n = 1..4), precisions (percent),
    bp (brevity penalty), sys_len and ref_len (tokens)."""
    return dict(load_metric("bleu").compute(**_checked_inputs("bleu", predictions, references), **options))


def rouge(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], **options: Any
) -> dict[str, Any]:
    """ROUGE F-measures of `predictions` against `references` (one string, or a list of strings, per prediction;
    with several, each prediction counts against its best reference), averaged over predictions.

    Options: `use_stemmer` (False), `rouge_types` (default rouge1, rouge2, rougeL, rougeLsum; rougeLsum splits
    sentences on newlines), `use_aggregator` (True; False gives one score per prediction), `tokenizer` (a function
    from text to words, in place of rouge_score's, which keeps only [a-z0-9] runs).
    Returns {rouge type: F-measure in [0, 1]}."""
    return dict(load_metric("rouge").compute(**_checked_inputs("rouge", predictions, references), **options))


def _checked_inputs(
    metric: str, predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> dict[str, list[Any]]:
    """Predictions and references as lists `evaluate` accepts, or an error that says what to pass."""
    usage = (
        f"{metric} takes a list of predictions (strings) and a list of references of the same length "
        "(a string, or a list of strings, per prediction)"
    )
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(f"{usage}; got a single string, wrap it in a list")
    if not predictions or not references:
        raise ValueError(f"{usage}; got {len(predictions)} predictions and {len(references)} references")
    if len(predictions) != len(references):
        raise ValueError(f"{usage}; got {len(predictions)} predictions but {len(references)} references")
    if not all(isinstance(p, str) for p in predictions):
        raise TypeError(f"{usage}; a prediction is not a string")
    if all(isinstance(r, str) for r in references):
        return {"predictions": list(predictions), "references": list(references)}
    # `evaluate` wants one layout for the whole batch: a list of references for every prediction.
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    if not all(lists):
        raise ValueError(f"{usage}; a prediction has an empty list of references")
    if not all(isinstance(r, str) for refs in lists for r in refs):
        raise TypeError(f"{usage}; a reference is not a string")
    return {"predictions": list(predictions), "references": lists}


def generation_stats(texts: Sequence[str], tokenize: Callable[[str], Sequence[str]] = str.split) -> dict[str, float]:
    """Diversity and degeneration of generated texts, from their words (`tokenize`; whitespace by default).

    - distinct_1, distinct_2: distinct n-grams over all n-grams, pooled over all texts (Li et al., 2016);
      1.0 when nothing repeats, lower as the texts reuse words and phrases (0.0 if there are no n-grams).
    - repetition_4: the share of a text's 4-grams that repeat an earlier 4-gram of the same text, i.e.
      1 - distinct 4-grams / 4-grams ("seq-rep-4", Welleck et al., 2019), averaged over the texts that have at
      least one 4-gram (0.0 if none has). Looping text scores close to 1, text without loops 0.
    - mean_length: the mean number of words (tokens of `tokenize`) per text.
    """
    if isinstance(texts, str):
        raise TypeError("generation_stats takes a list of texts, not a single string: wrap it in a list")
    if not texts:
        raise ValueError("generation_stats needs at least one text; got none")
    words = [list(tokenize(text)) for text in texts]
    stats = {f"distinct_{n}": _distinct(words, n) for n in (1, 2)}
    repeated = [_repetition(ngrams) for ngrams in (_ngrams(w, REPETITION_N) for w in words) if ngrams]
    stats[f"repetition_{REPETITION_N}"] = sum(repeated) / len(repeated) if repeated else 0.0
    stats["mean_length"] = sum(len(w) for w in words) / len(words)
    return stats


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _distinct(texts: Sequence[Sequence[str]], n: int) -> float:
    """Distinct n-grams / n-grams, pooled over texts."""
    ngrams = [ngram for words in texts for ngram in _ngrams(words, n)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def _repetition(ngrams: Sequence[tuple[str, ...]]) -> float:
    """The share of n-grams that repeat an earlier one in the same sequence."""
    return 1 - len(set(ngrams)) / len(ngrams)
