"""Corpus BLEU as an `evaluate` metric module, computed by sacreBLEU.

Load it by path, which reads nothing from the Hub (a path to an existing folder with a script of the same name
never reaches the network, online or offline):

    metric = evaluate.load("/abs/path/to/aksis/metric_modules/bleu")
    metric.compute(predictions=["the cat sat"], references=[["the cat sat", "a cat sat"]])

It is the Hub's "sacrebleu" metric under aksis's name, not the Hub's "bleu": the score is sacreBLEU's corpus
BLEU on a 0-100 scale, with its standard tokenisation ("13a"), so numbers compare with published sacreBLEU
scores. One difference from the Hub's script: predictions may have different numbers of references (sacreBLEU
skips a missing reference, given as None in its reference streams).
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """\
BLEU (Papineni et al., 2002) as computed by sacreBLEU (Post, 2018): the geometric mean of the modified n-gram
precisions (n = 1..4) of the predictions against their references, pooled over the whole corpus, times a brevity
penalty for predictions shorter than their references. sacreBLEU tokenises the text itself, so pass detokenised
text; scores range from 0 to 100.
"""

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W18-6319",
    pages = "186--191",
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): the generated texts.
    references (list of str, or list of lists of str): one reference per prediction, or a list of references
        per prediction (at least one each; the lists may differ in length).
    smooth_method (str): "exp" (default), "floor", "add-k" or "none".
    smooth_value (float, optional): the value for "floor" (default 0.1) or "add-k" (default 1).
    tokenize (str): sacreBLEU's tokeniser: "13a" (default), "intl", "char", "zh", "ja-mecab", "none", ...
    lowercase (bool): compare lowercased text.
    use_effective_order (bool): ignore n-gram orders with no matches (for sentence-level scores).
    force (bool): score text that already looks tokenised without a warning.
Returns:
    score (float): BLEU, 0-100.
    counts (list of int): matching n-grams, n = 1..4.
    totals (list of int): n-grams in the predictions, n = 1..4.
    precisions (list of float): counts / totals in percent.
    bp (float): the brevity penalty.
    sys_len (int): tokens in the predictions.
    ref_len (int): effective reference length (the closest reference length per prediction, summed).
Example:
    >>> bleu = evaluate.load("aksis/metric_modules/bleu")
    >>> result = bleu.compute(predictions=["hello there general kenobi"], references=[["hello there general kenobi"]])
    >>> round(result["score"], 1)
    100.0
"""


def reference_streams(references: list[str] | list[list[str]]) -> list[list[str | None]]:
    """Turn one entry of references per prediction into sacreBLEU's layout: streams[j][i] is the j-th reference of
    prediction i, None where prediction i has fewer than j + 1 references (sacreBLEU then skips it)."""
    per_prediction = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if any(not refs for refs in per_prediction):
        raise ValueError("BLEU needs at least one reference for every prediction; one got an empty list")
    width = max(len(refs) for refs in per_prediction)
    return [[refs[j] if j < len(refs) else None for refs in per_prediction] for j in range(width)]


class Bleu(evaluate.Metric):
    """sacreBLEU's corpus BLEU with its tokenisation and smoothing options."""

    def _info(self) -> evaluate.MetricInfo:
        # Two accepted layouts, tried in order: a list of references per prediction, or a single reference string.
        string = datasets.Value("string", id="sequence")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            homepage="https://github.com/mjpost/sacreBLEU",
            features=[
                datasets.Features({"predictions": string, "references": datasets.Sequence(string, id="references")}),
                datasets.Features({"predictions": string, "references": string}),
            ],
            codebase_urls=["https://github.com/mjpost/sacreBLEU"],
            reference_urls=["https://aclanthology.org/P02-1040/", "https://aclanthology.org/W18-6319/"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        tokenize: str = "13a",
        lowercase: bool = False,
        use_effective_order: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        result = sacrebleu.corpus_bleu(
            predictions,
            reference_streams(references),  # type: ignore[arg-type]  # None (no reference) is sacreBLEU's, untyped
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            force=force,
            lowercase=lowercase,
            tokenize=tokenize,
            use_effective_order=use_effective_order,
        )
        return {
            "score": result.score,
            "counts": list(result.counts),
            "totals": list(result.totals),
            "precisions": list(result.precisions),
            "bp": result.bp,
            "sys_len": result.sys_len,
            "ref_len": result.ref_len,
        }
