"""ROUGE as an `evaluate` metric module, computed by Google's `rouge_score` package.

Load it by path, which reads nothing from the Hub (a path to an existing folder with a script of the same name
never reaches the network, online or offline):

    metric = evaluate.load("/abs/path/to/aksis/metric_modules/rouge")
    metric.compute(predictions=["the cat sat"], references=["the cat sat on the mat"])

Like the Hub's "rouge" metric it reports the F-measure of rouge1, rouge2, rougeL and rougeLsum, scores each
prediction against its reference (or the best of its references), and takes `use_stemmer`, `rouge_types`,
`use_aggregator` and `tokenizer`. One difference: the aggregate is the plain mean over predictions. The Hub's
script reports the median of a bootstrap resampling of that mean, which is random (unseeded) and only close to
the mean; here the same inputs always give the same score, equal to averaging `RougeScorer` results by hand.

rouge_score's default tokeniser lowercases and keeps only [a-z0-9] runs, so text in other scripts scores zero
unless a `tokenizer` is given. rougeLsum splits on newlines into sentences; on text without newlines it equals
rougeL.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_DESCRIPTION = """\
ROUGE (Lin, 2004) compares a generated text with a reference by overlapping units: rouge1 and rouge2 count
shared unigrams and bigrams, rougeL uses the longest common subsequence, and rougeLsum the union of longest
common subsequences between the sentences (lines) of the two texts. Each is reported as the F-measure of its
precision and recall, from 0 to 1.
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W04-1013",
    pages = "74--81",
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): the generated texts.
    references (list of str, or list of lists of str): one reference per prediction, or a list of references
        per prediction (each prediction is then scored against its best reference, per ROUGE type).
    rouge_types (list of str): from "rouge1" ... "rouge9", "rougeL", "rougeLsum"; default rouge1, rouge2, rougeL
        and rougeLsum.
    use_stemmer (bool): Porter-stem words before comparing ("running" matches "run").
    use_aggregator (bool): the mean over predictions (default), or one score per prediction if False.
    tokenizer (callable str -> list of str, optional): replaces rouge_score's default tokeniser.
Returns:
    {rouge_type: mean F-measure} (floats in [0, 1]), or {rouge_type: [F-measure per prediction]}.
Example:
    >>> rouge = evaluate.load("aksis/metric_modules/rouge")
    >>> rouge.compute(predictions=["hello there"], references=["hello there"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
"""


class _CallableTokenizer:
    """rouge_score wants an object with a `tokenize` method; this wraps a plain function."""

    def __init__(self, tokenize: Callable[[str], list[str]]) -> None:
        self.tokenize = tokenize


class Rouge(evaluate.Metric):
    """rouge_score's RougeScorer, F-measures averaged over predictions."""

    def _info(self) -> evaluate.MetricInfo:
        # Two accepted layouts, tried in order: a list of references per prediction, or a single reference string.
        string = datasets.Value("string", id="sequence")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": string, "references": datasets.Sequence(string)}),
                datasets.Features({"predictions": string, "references": string}),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013/"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        rouge_types: list[str] | None = None,
        use_stemmer: bool = False,
        use_aggregator: bool = True,
        tokenizer: Callable[[str], list[str]] | None = None,
    ) -> dict[str, float] | dict[str, list[float]]:
        types = list(rouge_types or ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(
            types, use_stemmer=use_stemmer, tokenizer=_CallableTokenizer(tokenizer) if tokenizer else None
        )
        per_prediction: dict[str, list[float]] = {rouge_type: [] for rouge_type in types}
        for prediction, refs in zip(predictions, references, strict=True):
            if isinstance(refs, str):
                scores = scorer.score(refs, prediction)
            elif refs:
                scores = scorer.score_multi(refs, prediction)  # the best reference, per ROUGE type
            else:
                raise ValueError("ROUGE needs at least one reference for every prediction; one got an empty list")
            for rouge_type in types:
                per_prediction[rouge_type].append(scores[rouge_type].fmeasure)
        if not use_aggregator:
            return per_prediction
        return {rouge_type: sum(values) / len(values) for rouge_type, values in per_prediction.items()}
