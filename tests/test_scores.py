import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
from conftest import Hub
from rouge_score import rouge_scorer

from aksis.scores import METRIC_MODULES, bleu, generation_stats, load_metric, rouge

PREDICTIONS = [
    "the cat sat on the mat",
    "there is a dog in the garden today",
    "It was a dark and stormy night.",
]
REFERENCES = [
    "the cat is sitting on the mat",
    "a dog is in the garden",
    "It was a dark and stormy night!",
]
MULTI_REFERENCES = [
    ["the cat is sitting on the mat", "a cat sat on the mat"],
    ["a dog is in the garden", "there is a dog in the yard"],
    ["It was a dark and stormy night!", "The night was dark and stormy."],
]


def sacrebleu_dict(predictions: list[str], streams: list[list[str | None]], **options: object) -> dict[str, object]:
    result = sacrebleu.corpus_bleu(predictions, streams, **options)
    return {
        "score": result.score,
        "counts": result.counts,
        "totals": result.totals,
        "precisions": result.precisions,
        "bp": result.bp,
        "sys_len": result.sys_len,
        "ref_len": result.ref_len,
    }


def rouge_score_means(
    predictions: list[str], references: list[str] | list[list[str]], **options: object
) -> dict[str, float]:
    """The mean F-measure of each ROUGE type, computed with rouge_score directly."""
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, **options)
    scores = [
        scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(ref, pred)
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}


def test_bleu_equals_sacrebleu_with_one_or_several_references() -> None:
    assert bleu(PREDICTIONS, REFERENCES) == sacrebleu_dict(PREDICTIONS, [REFERENCES])
    streams = [[refs[j] for refs in MULTI_REFERENCES] for j in range(2)]
    assert bleu(PREDICTIONS, MULTI_REFERENCES) == sacrebleu_dict(PREDICTIONS, streams)
    assert 0 < bleu(PREDICTIONS, REFERENCES)["score"] < bleu(PREDICTIONS, MULTI_REFERENCES)["score"] < 100


def test_bleu_takes_different_numbers_of_references_per_prediction() -> None:
    references = [MULTI_REFERENCES[0], [REFERENCES[1]], MULTI_REFERENCES[2]]
    streams = [REFERENCES, [MULTI_REFERENCES[0][1], None, MULTI_REFERENCES[2][1]]]  # sacreBLEU skips a None
    assert bleu(PREDICTIONS, references) == sacrebleu_dict(PREDICTIONS, streams)


@pytest.mark.parametrize(
    "options",
    [{"lowercase": True}, {"tokenize": "char"}, {"smooth_method": "floor", "smooth_value": 0.2}],
    ids=["lowercase", "char", "floor"],
)
def test_bleu_options_reach_sacrebleu(options: dict[str, object]) -> None:
    predictions, references = ["The Cat sat on a mat", "A dog"], ["the cat sat on the mat", "the dog barked"]
    expected = sacrebleu_dict(predictions, [references], **options)
    assert bleu(predictions, references, **options) == expected
    assert expected["score"] != bleu(predictions, references)["score"]  # the option changes the result


def test_rouge_equals_the_mean_of_rouge_score_results() -> None:
    assert rouge(PREDICTIONS, REFERENCES) == pytest.approx(rouge_score_means(PREDICTIONS, REFERENCES), abs=1e-12)
    assert rouge(PREDICTIONS, MULTI_REFERENCES) == pytest.approx(
        rouge_score_means(PREDICTIONS, MULTI_REFERENCES), abs=1e-12
    )


def test_rouge_stemming_and_per_prediction_scores() -> None:
    predictions, references = ["the cats were running"], ["the cat was running"]
    stemmed = rouge(predictions, references, use_stemmer=True)
    assert stemmed == pytest.approx(rouge_score_means(predictions, references, use_stemmer=True), abs=1e-12)
    assert stemmed["rouge1"] > rouge(predictions, references)["rouge1"]  # "cats" matches "cat" once stemmed
    per_prediction = rouge(PREDICTIONS, REFERENCES, use_aggregator=False)
    scorer = rouge_scorer.RougeScorer(["rouge2"])
    assert per_prediction["rouge2"] == [
        scorer.score(r, p)["rouge2"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)
    ]


def test_rouge_with_a_tokenizer_scores_text_the_default_tokenizer_drops() -> None:
    greek = ["γεια σου κόσμε"]
    assert rouge(greek, greek)["rouge1"] == 0.0  # rouge_score keeps only [a-z0-9]: no words at all
    assert rouge(greek, greek, tokenizer=str.split)["rouge1"] == 1.0


def test_rouge_lsum_reads_lines_as_sentences() -> None:
    prediction, reference = ["b c\na"], ["a\nb c"]
    scores = rouge(prediction, reference)
    assert scores["rougeLsum"] == 1.0 > scores["rougeL"]  # each line matches a line; the whole order differs


def test_identical_texts_get_the_maximum_scores() -> None:
    assert bleu(PREDICTIONS, PREDICTIONS)["score"] == pytest.approx(100)
    assert rouge(PREDICTIONS, PREDICTIONS) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}


@pytest.mark.parametrize("score", [bleu, rouge])
def test_wrong_inputs_say_what_to_pass(score: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"list of predictions .* got 0 predictions and 0 references"):
        score([], [])
    with pytest.raises(ValueError, match=r"got 2 predictions but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"empty list of references"):
        score(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match=r"single string, wrap it in a list"):
        score("the cat", "the cat")
    with pytest.raises(TypeError, match=r"a prediction is not a string"):
        score([1], ["1"])
    with pytest.raises(TypeError, match=r"a reference is not a string"):
        score(["a"], [["a", None]])


def test_the_modules_load_by_path_without_the_network(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate
    import huggingface_hub.constants

    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # online, as the app runs, with the test Hub as endpoint

    def refuse(sock: socket.socket, address: object) -> None:
        raise AssertionError(f"loading a local metric module connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    requests = len(hub.requests)
    for name, key, best in [("bleu", "score", 100.0), ("rouge", "rouge1", 1.0)]:
        metric = evaluate.load(str(METRIC_MODULES / name))
        assert isinstance(metric, evaluate.Metric) and metric.name == name
        assert metric.compute(predictions=["a b c d"], references=["a b c d"])[key] == pytest.approx(best)
    assert len(hub.requests) == requests


def test_a_missing_module_says_where_modules_come_from() -> None:
    assert (METRIC_MODULES / "bleu" / "bleu.py").is_file() and (METRIC_MODULES / "rouge" / "rouge.py").is_file()
    with pytest.raises(FileNotFoundError, match=r"aksis ships bleu, rouge in aksis/metric_modules/.*reinstall aksis"):
        load_metric("meteor")


def test_a_file_named_evaluate_py_ahead_on_the_path_is_reported(tmp_path: Path) -> None:
    # What running a script of one's own from a folder holding an evaluate.py does: that folder comes first.
    (tmp_path / "evaluate.py").write_text("")
    code = "from aksis.scores import load_metric; load_metric('bleu')"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"found {tmp_path / 'evaluate.py'}, not the evaluate library: rename that file" in result.stderr


def test_generation_stats_by_hand() -> None:
    texts = ["the cat sat on the mat", "the cat the cat the cat", "hi there"]
    stats = generation_stats(texts)
    # 14 words, 7 distinct (the cat sat on mat hi there); 11 bigrams, 7 distinct (the cat, cat sat, sat on, on the,
    # the mat, cat the, hi there).
    assert stats["distinct_1"] == pytest.approx(7 / 14)
    assert stats["distinct_2"] == pytest.approx(7 / 11)
    # 4-grams: the first text repeats none of its 3, the second repeats 1 of its 3 ("the cat the cat" twice), the
    # third has none and does not count.
    assert stats["repetition_4"] == pytest.approx((0 + 1 / 3) / 2)
    assert stats["mean_length"] == pytest.approx(14 / 3)
    assert set(stats) == {"distinct_1", "distinct_2", "repetition_4", "mean_length"}


def test_generation_stats_with_another_tokenizer_and_short_texts() -> None:
    assert generation_stats(["abab"], tokenize=list) == pytest.approx(
        {"distinct_1": 2 / 4, "distinct_2": 2 / 3, "repetition_4": 0.0, "mean_length": 4.0}
    )
    looping = generation_stats(["a b c d a b c d a b c d"])["repetition_4"]
    assert looping == pytest.approx(5 / 9)  # 9 four-grams, 4 distinct
    assert generation_stats(["a", ""]) == {
        "distinct_1": 1.0,
        "distinct_2": 0.0,
        "repetition_4": 0.0,
        "mean_length": 0.5,
    }


def test_generation_stats_errors() -> None:
    with pytest.raises(ValueError, match="at least one text"):
        generation_stats([])
    with pytest.raises(TypeError, match="not a single string"):
        generation_stats("the cat sat")


def test_the_metric_modules_ship_in_the_wheel() -> None:
    """They are loaded by path from inside the package, so pyproject.toml's package data must cover every file."""
    import ast
    import fnmatch
    import re

    root = METRIC_MODULES.parents[1]
    section = (root / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    match = re.search(r"^aksis = (\[.*?\])$", section, re.M)
    assert match, "pyproject.toml declares no package data for aksis"
    globs = ast.literal_eval(match.group(1))
    files = [p.relative_to(root / "aksis").as_posix() for p in METRIC_MODULES.rglob("*") if p.is_file()]
    files = [f for f in files if "__pycache__" not in f]
    assert {"metric_modules/bleu/bleu.py", "metric_modules/rouge/rouge.py"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
