"""The Evaluate tab (aksis/ui/evaluate_tab.py): its plain functions against the library's own numbers, the bad
inputs it must refuse with a clear message, and the `/perplexity` and `/evaluate` API of the served app."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import datasets
import gradio as gr
import pytest
import torch
from conftest import Hub, ServedApp, write_run

from aksis.corpora import load_corpus
from aksis.metrics import evaluate_checkpoint, markdown_table, perplexity
from aksis.ui import evaluate_tab as ev
from aksis.ui.context import APP_MAX_NEW_TOKENS
from aksis.ui.models import ModelStore

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 3
LIMIT = 64  # the max-new-tokens limit these tests give run_evaluate


@pytest.fixture(scope="module")
def store(app_checkpoints: Path) -> ModelStore:
    return ModelStore(app_checkpoints, device=torch.device("cpu"))


def sources(app_checkpoints: Path) -> tuple[str, str]:
    return str(app_checkpoints / "tiny-llama"), str(app_checkpoints / "tiny-gpt2")


def evaluate(store: ModelStore, source: str, **overrides: object) -> ev.EvaluateOutput:
    """run_evaluate with the tab's defaults, small enough for tiny models, and `overrides`."""
    settings: dict[str, object] = dict(
        compare=None, texts_from=ev.PASTED, text=TEXT, file=None, dataset="shakespeare", split="validation",
        max_texts=10, scores=[ev.PERPLEXITY], generate_from=ev.CONTINUATION, prompts_file=None, temperature=0.0,
        max_new_tokens=8, prompt_tokens=8, num_samples=3, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return ev.run_evaluate(store, LIMIT, source, **settings)  # type: ignore[arg-type]


def test_perplexity_of_a_text_is_the_library_s(store: ModelStore, app_checkpoints: Path) -> None:
    llama, _ = sources(app_checkpoints)
    entry = store.get(llama)
    expected = perplexity(entry.model, entry.tokenizer, [TEXT])
    assert ev.run_perplexity(store, llama, TEXT) == (expected.perplexity, expected.bits_per_byte)


def test_two_models_side_by_side_with_continuation_scores(store: ModelStore, app_checkpoints: Path) -> None:
    llama, gpt2 = sources(app_checkpoints)
    ppl, bpb, table, report, markdown = evaluate(store, llama, compare=gpt2, scores=[ev.PERPLEXITY, ev.BLEU_ROUGE])
    columns, samples = {}, {}
    for source in (llama, gpt2):
        entry = store.get(source)
        config = dataclasses.replace(entry.generation, temperature=0.0, seed=0)
        results = evaluate_checkpoint(
            entry.model, entry.tokenizer, [TEXT], tasks=["perplexity", "continuation"], config=config,
            prompt_tokens=8, new_tokens=8, num_samples=3,
        )  # fmt: skip
        columns[source], samples[source] = results["metrics"], results["samples"]
    assert (ppl, bpb) == (columns[llama]["perplexity"], columns[llama]["bits_per_byte"])
    assert table["headers"] == ["metric", llama, gpt2]
    rows = {row[0]: row[1:] for row in table["data"]}
    assert rows["perplexity"] == [columns[llama]["perplexity"], columns[gpt2]["perplexity"]]
    assert rows["continuation bleu"] == [columns[llama]["continuation_bleu"], columns[gpt2]["continuation_bleu"]]
    assert "continuation rougeL" in rows
    assert markdown == markdown_table(columns)
    assert report.startswith(f"Scored on the pasted text ({len(TEXT)} characters).")
    for source in (llama, gpt2):  # the generations beside their references, line breaks shown as ↵
        assert f"continuation samples of {source}" in report
        for sample in samples[source]["continuation"]:
            assert f"generated  {sample['generated']}".replace("\n", "↵") in report


def test_bleu_and_rouge_of_an_uploaded_prompts_file(store: ModelStore, app_checkpoints: Path, tmp_path: Path) -> None:
    llama, _ = sources(app_checkpoints)
    path = tmp_path / "prompts.jsonl"
    pairs = [{"prompt": "ROMEO:", "reference": "But soft"}, {"prompt": "JULIET:", "reference": "O Romeo"}]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    ppl, bpb, table, report, _ = evaluate(
        store, llama, scores=[ev.BLEU_ROUGE], generate_from=ev.PROMPTS, prompts_file=str(path)
    )
    assert ppl is None and bpb is None  # perplexity was not asked for
    names = [row[0] for row in table["data"]]
    assert "prompts bleu" in names and "prompts rouge1" in names and "perplexity" not in names
    assert "2 prompt(s) of prompts.jsonl" in report and "prompts samples" in report

    path.write_text(json.dumps(pairs[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(gr.Error, match=r"prompts.jsonl, line 2: expected \{\"prompt\""):
        evaluate(store, llama, scores=[ev.BLEU_ROUGE], generate_from=ev.PROMPTS, prompts_file=str(path))
    with pytest.raises(gr.Error, match="No prompts file uploaded"):
        evaluate(store, llama, scores=[ev.BLEU_ROUGE], generate_from=ev.PROMPTS)


def test_an_uploaded_text_file_is_scored_and_bad_files_are_refused(
    store: ModelStore, app_checkpoints: Path, tmp_path: Path
) -> None:
    llama, _ = sources(app_checkpoints)
    good = tmp_path / "play.txt"
    good.write_text(TEXT, encoding="utf-8")
    assert evaluate(store, llama, texts_from=ev.UPLOADED, file=str(good))[:2] == ev.run_perplexity(store, llama, TEXT)

    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"a" * (ev.MAX_UPLOAD_BYTES + 1))
    binary = tmp_path / "picture.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Müller".encode("latin-1"))
    for path, message in (
        (huge, "huge.txt is 2.0 MiB; the text file may be at most 2 MiB"),
        (binary, r"picture.txt looks binary \(it holds NUL bytes\)"),
        (latin1, r"latin1.txt is not UTF-8 text \(byte 0xfc at offset 1\)"),
    ):
        with pytest.raises(gr.Error, match=message):
            evaluate(store, llama, texts_from=ev.UPLOADED, file=str(path))
        # A prompts file gets the same checks.
        with pytest.raises(gr.Error, match=message.replace("the text file", "the prompts file")):
            evaluate(store, llama, scores=[ev.BLEU_ROUGE], generate_from=ev.PROMPTS, prompts_file=str(path))
    with pytest.raises(gr.Error, match="No text file uploaded"):
        evaluate(store, llama, texts_from=ev.UPLOADED, file=None)
    nested = tmp_path / "uploads" / "f00d" / "prompts.jsonl"  # where the server keeps an upload
    nested.parent.mkdir(parents=True)
    nested.write_text('{"prompt": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(gr.Error) as err:
        evaluate(store, llama, scores=[ev.BLEU_ROUGE], generate_from=ev.PROMPTS, prompts_file=str(nested))
    assert "prompts.jsonl, line 1: expected" in err.value.message and str(tmp_path) not in err.value.message


def test_a_local_dataset_file_is_read_with_load_corpus(
    store: ModelStore, app_checkpoints: Path, tmp_path: Path
) -> None:
    llama, _ = sources(app_checkpoints)
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    texts, what = ev.load_texts(ev.DATASET, None, None, str(path), "validation", 5)
    assert texts == load_corpus(str(path))["validation"]["text"]
    assert what.startswith(f"1 text(s) of {path} / validation")
    ppl, *_ = evaluate(store, llama, texts_from=ev.DATASET, dataset=str(path))
    entry = store.get(llama)
    assert ppl == perplexity(entry.model, entry.tokenizer, texts).perplexity
    with pytest.raises(gr.Error, match="has no split 'test': choose one of train, validation"):
        ev.load_texts(ev.DATASET, None, None, str(path), "test", 5)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("no-such-corpus", "unknown dataset 'no-such-corpus'"),
        ("alice/no-such-dataset", "is not on the Hugging Face Hub, or it is private or gated"),  # the local test Hub
        ("", "No dataset named"),
    ],
)
def test_unknown_datasets_are_clear_errors(dataset: str, message: str, hub: Hub) -> None:
    with pytest.raises(gr.Error, match=message):
        ev.load_texts(ev.DATASET, None, None, dataset, "validation", 5)


def test_a_hub_dataset_offline_fails_at_once_with_a_clear_message(hub: Hub, tmp_path: Path) -> None:
    script = """
import gradio as gr
from aksis.ui.evaluate_tab import DATASET, load_texts
try:
    load_texts(DATASET, None, None, "wikitext2", "validation", 5)
except gr.Error as err:
    print(err)
"""
    env = hub.subprocess_env(tmp_path, offline=True)  # HF_HUB_OFFLINE=1 and an empty cache
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "Could not load the dataset: the dataset 'wikitext2'" in result.stdout, result.stdout + result.stderr
    assert "needs the network" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(text="   \n"), "The text is empty: paste some text"),
        (dict(scores=[]), "Choose what to score"),
        (
            dict(scores=[ev.BLEU_ROUGE], max_new_tokens=LIMIT + 1),
            f"max new tokens must be between 1 and {LIMIT} \\(this app's limit\\), got {LIMIT + 1}",
        ),
        (dict(num_samples=0), f"samples must be a whole number from 1 to {ev.MAX_SAMPLES}, got 0"),
        (dict(seed=-1), "seed must be a whole number from 0 to 2147483647, got -1"),
        (dict(temperature=3), "temperature must be a number from 0 to 2, got 3"),
        (dict(temperature="warm"), "temperature must be a number from 0 to 2, got 'warm'"),
        (dict(texts_from="a feeling"), "Unknown source of texts 'a feeling'"),
        (dict(scores=[ev.BLEU_ROUGE], prompt_tokens=40), "no text holds 48 tokens"),  # TEXT is too short
    ],
)
def test_bad_settings_are_clear_errors(
    store: ModelStore, app_checkpoints: Path, overrides: dict[str, object], message: str
) -> None:
    llama, _ = sources(app_checkpoints)
    with pytest.raises(gr.Error, match=message):
        evaluate(store, llama, **{"text": "short text", **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(max_new_tokens=ev.EVAL_MAX_TOKENS + 1), f"max new tokens must be between 1 and {ev.EVAL_MAX_TOKENS} "),
        (
            dict(prompt_tokens=ev.EVAL_MAX_TOKENS + 1),
            f"prompt tokens must be a whole number from 1 to {ev.EVAL_MAX_TOKENS}",
        ),
        (dict(num_samples=ev.MAX_SAMPLES + 1), f"samples must be a whole number from 1 to {ev.MAX_SAMPLES},"),
    ],
)
def test_generation_for_scores_is_bounded_below_the_app_s_limit(
    store: ModelStore, app_checkpoints: Path, overrides: dict[str, object], message: str
) -> None:
    """The app's limit (APP_MAX_NEW_TOKENS, for one generation) is far above what a request of up to MAX_SAMPLES
    generations per model may ask for."""
    llama, gpt2 = sources(app_checkpoints)
    assert 2 * ev.MAX_SAMPLES * ev.EVAL_MAX_TOKENS <= 60_000 < APP_MAX_NEW_TOKENS * 100
    settings: dict[str, object] = dict(
        compare=gpt2, texts_from=ev.PASTED, text=TEXT, file=None, dataset=None, split=None, max_texts=1,
        scores=[ev.BLEU_ROUGE], generate_from=ev.CONTINUATION, prompts_file=None, temperature=0.0,
        max_new_tokens=8, prompt_tokens=8, num_samples=3, seed=0,
    )  # fmt: skip
    with pytest.raises(gr.Error, match=message):
        ev.run_evaluate(store, APP_MAX_NEW_TOKENS, llama, **{**settings, **overrides})  # type: ignore[arg-type]


# ----- datasets -----


def _text_dataset(hub: Hub, rows: int) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("texts"), repo_type="dataset").repo_id
    data = "".join(json.dumps({"text": f"Document {i}: {TEXT}"}) + "\n" for i in range(rows)).encode()
    api.upload_file(path_or_fileobj=data, path_in_repo="data/train.jsonl", repo_id=repo_id, repo_type="dataset")
    return repo_id


def test_hub_datasets_are_streamed_and_the_embedded_corpus_is_split_as_in_training(hub: Hub) -> None:
    repo_id = _text_dataset(hub, rows=200)
    before = len(hub.requests)
    assert isinstance(ev.open_dataset(repo_id), datasets.IterableDatasetDict)
    texts, what = ev.load_texts(ev.DATASET, None, None, repo_id, "train", 3, local_paths=False)  # a Space may
    assert texts == [f"Document {i}: {TEXT}" for i in range(3)] and what.startswith(f"3 text(s) of {repo_id} / train")
    reads = [r for r in hub.requests[before:] if r.method == "GET" and r.path.endswith("/data/train.jsonl")]
    # Streamed: the data file is read in ranges, never downloaded whole.
    assert reads and all(r.status == 206 and "range" in {k.lower() for k in r.headers} for r in reads)
    # The embedded corpus is read whole: its validation split is the one training held out.
    corpus = ev.open_dataset("shakespeare", local_paths=False)
    assert isinstance(corpus, datasets.DatasetDict)
    assert corpus["validation"]["text"][:2] == load_corpus("shakespeare")["validation"]["text"][:2]


def test_a_space_reads_no_dataset_of_its_own_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_corpus reads local paths, folders and globs before it asks the Hub: on a Space (local_paths off)
    only the embedded corpus, the short names of HUB_CORPORA and Hub ids that name nothing here are read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "secret.txt").write_text("the server's secret " * 100, encoding="utf-8")
    (tmp_path / "wikitext2").mkdir()  # a folder with a short name's name
    (tmp_path / "wikitext2" / "notes.txt").write_text("private notes " * 100, encoding="utf-8")
    refused = [
        "*/*.txt", "data/*.txt", "**", "d?ta/secret.txt", "[d]ata/secret.txt", "data/secret.txt", "data", "wikitext2",
        "./data/secret.txt", "../data/secret.txt", "alice/../data", "/etc/passwd", "~/secret.txt", "C:\\secret.txt",
    ]  # fmt: skip
    for name in refused:
        assert not ev.dataset_allowed(name, local_paths=False), name
        with pytest.raises(gr.Error, match="This server does not read its own files"):
            ev.load_texts(ev.DATASET, None, None, name, "train", 5, local_paths=False)
    for name in ("shakespeare", "tinystories", "alice/some-texts", "Org_1/data.v2"):
        assert ev.dataset_allowed(name, local_paths=False), name
    # One's own app reads its own files, globs included.
    texts, _ = ev.load_texts(ev.DATASET, None, None, "*/*.txt", "train", 5, local_paths=True)
    assert any("the server's secret" in t for t in texts)


# ----- the served app -----


def test_compare_choices_are_refreshed_when_the_tab_is_shown(tmp_path: Path) -> None:
    from aksis.ui import AppSettings, build_app

    root = tmp_path / "checkpoints"
    write_run(root / "first", "gpt2", seed=0)
    settings = AppSettings(checkpoints_dir=root, feedback_file=tmp_path / "feedback.jsonl", device="cpu")
    demo = build_app(settings)
    write_run(root / "trained-later", "gpt2", seed=1)  # e.g. by the Train tab, after the page opened
    ids = {c["props"].get("elem_id"): c["id"] for c in demo.config["components"] if c["props"].get("elem_id")}
    select = [d for d in demo.config["dependencies"] if [ids["evaluate-tab"], "select"] in map(list, d["targets"])]
    assert [(d["inputs"], d["outputs"]) for d in select] == [([ids["eval-compare"]], [ids["eval-compare"]])]
    fn = demo.fns[select[0]["id"]].fn
    dropdown = fn(str(root / "first"))
    assert [value for _, value in dropdown.choices] == [str(root / "first"), str(root / "trained-later")]
    assert dropdown.value == str(root / "first")  # the visitor's choice is kept


def test_the_served_app_s_perplexity_api_equals_the_library(
    served_app: ServedApp, app_checkpoints: Path, tmp_path: Path
) -> None:
    from gradio_client import handle_file

    from aksis.checkpoint import load_model

    llama, gpt2 = sources(app_checkpoints)
    client = served_app.client()
    model, tokenizer, _ = load_model(str(app_checkpoints / "tiny-llama" / "best"), device="cpu")
    expected = perplexity(model, tokenizer, [TEXT])
    got = client.predict(source=llama, text=TEXT, api_name="/perplexity")
    assert got == pytest.approx((expected.perplexity, expected.bits_per_byte), rel=1e-6)

    with pytest.raises(Exception, match="The text is empty"):  # shown in the UI; the app goes on serving
        client.predict(source=llama, text="", api_name="/perplexity")

    upload = tmp_path / "upload.txt"
    upload.write_text(TEXT, encoding="utf-8")
    ppl, bpb, table, _, _ = client.predict(
        source=llama, compare=gpt2, texts_from=ev.UPLOADED, text="", file=handle_file(str(upload)),
        dataset="shakespeare", split="validation", max_texts=1, scores=[ev.PERPLEXITY], generate_from=ev.CONTINUATION,
        prompts_file=None, temperature=0, max_new_tokens=8, prompt_tokens=8, num_samples=2, seed=0,
        api_name="/evaluate",
    )  # fmt: skip
    assert (ppl, bpb) == pytest.approx(got, rel=1e-6)
    assert table["headers"] == ["metric", llama, gpt2]
