"""The Evaluate tab: how good is the picked model (and, side by side, a second one) on texts of your choice.

- Texts: pasted, an uploaded UTF-8 file (at most `MAX_UPLOAD_BYTES`), or a dataset split read by
  `aksis.corpora.load_corpus` (the embedded "shakespeare", a local .txt/.md/.jsonl/.parquet path, or a Hub dataset,
  which needs the network: offline it fails with `load_corpus`'s message). Hub datasets are streamed: only the
  few rows scored are read, nothing is downloaded whole. At most `MAX_TEXT_CHARS` characters are scored, so one
  request cannot hold a worker for long.
- On a public Space (`AppSettings.local_paths` off) a dataset is only a name `dataset_allowed` accepts: the
  embedded corpus, a short name of `aksis.corpora.HUB_CORPORA` or a Hub id; never a path or a glob of the server's.
- Generation for BLEU / ROUGE is bounded apart from the app's own limit: at most `EVAL_MAX_TOKENS` prompt and new
  tokens and `MAX_SAMPLES` samples per model, so one request with two models stays within seconds to minutes.
- Scores: perplexity and bits per byte (`aksis.metrics.perplexity`), and BLEU / ROUGE (`aksis.scores`) of
  generations, either continuing held-out windows of the texts (`metrics.continuation_pairs`) or answering the
  prompts of an uploaded JSONL file of {"prompt": ..., "reference": ...} (`metrics.read_prompts`). Generation
  is greedy unless a temperature is set (then seeded, so scores can be reproduced).
- A second model (optional) is scored on the same texts; the table puts them side by side
  (`metrics.markdown_table`). Bits per byte compare across tokenizers; perplexity only within one. Its choices
  are refreshed whenever the tab is shown, so a run trained since the page opened is offered.

API (`gradio_client`):
- `/perplexity` (source, text) -> (perplexity, bits per byte): equal to `aksis.metrics.perplexity(model,
  tokenizer, [text])` for the same model.
- `/evaluate` (source, compare, texts_from, text, file, dataset, split, max_texts, scores, generate_from,
  prompts_file, temperature, max_new_tokens, prompt_tokens, num_samples, seed) -> (perplexity, bits per byte,
  table, report, markdown table). Perplexity and bits per byte are the first model's (None without that score).

Element ids (browser tests): evaluate-tab, eval-source, eval-text, eval-text-perplexity (the "Score this text"
button), eval-file, eval-dataset, eval-split, eval-max-texts, eval-compare, eval-scores, eval-generate-from,
eval-prompts-file, eval-temperature, eval-max-new-tokens, eval-prompt-tokens, eval-samples, eval-seed, eval-run,
eval-perplexity, eval-bpb, eval-table, eval-report, eval-markdown.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import gradio as gr

from aksis.metrics import (
    LABELS,
    OutOfTime,
    PerplexityResult,
    evaluate_checkpoint,
    markdown_table,
    perplexity,
    read_prompts,
)
from aksis.ui.context import (
    AppContext,
    bound,
    echo,
    input_error,
    on_gpu,
    out_of_time,
    read_text_upload,
    text_value,
    to_max_new_tokens,
    to_number,
    to_whole,
    user_errors,
)
from aksis.ui.inputs import number, slider
from aksis.ui.models import LoadedModel, ModelStore
from aksis.ui.sampling import MAX_TEMPERATURE, max_new_tokens_slider, sampling_slider

if TYPE_CHECKING:
    import datasets

MAX_UPLOAD_BYTES = 2 << 20  # 2 MiB: a long novel; scoring more on a CPU Space would hold a worker for minutes
MAX_TEXT_CHARS = 2_000_000  # the same bound on pasted text and on what is read from a dataset
MAX_TEXTS = 100  # documents read from a dataset split
# BLEU / ROUGE generate: at most MAX_SAMPLES windows or prompts of at most EVAL_MAX_TOKENS tokens each, per model
# (two models: 2 x 100 x 256 = about 51k generated tokens, minutes on a CPU at worst). The app's own max new tokens
# (settings.max_new_tokens) is for one generation, not for a hundred.
MAX_SAMPLES = 100
EVAL_MAX_TOKENS = 256
# A Hub id as the Hub spells one (user/name): no path, glob or "~" can match it. ".." is refused apart.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

PASTED, UPLOADED, DATASET = "pasted text", "uploaded file", "dataset"
SOURCES = (PASTED, UPLOADED, DATASET)
PERPLEXITY, BLEU_ROUGE = "perplexity", "BLEU / ROUGE"
SCORES = (PERPLEXITY, BLEU_ROUGE)
CONTINUATION, PROMPTS = "continuation of the texts", "prompts file (JSONL)"
GENERATE_FROM = {CONTINUATION: "continuation", PROMPTS: "prompts"}  # choice -> metrics task

HELP = (
    "Score the picked model on texts of your choice: **perplexity** (lower is better; compare it only between "
    "models with the same tokenizer) and **bits per byte** (the same loss per byte of UTF-8 text, comparable "
    "across tokenizers). **BLEU / ROUGE** compare what the model generates with references: the true "
    "continuation of windows of the texts, or the references of an uploaded JSONL file of "
    '`{"prompt": "...", "reference": "..."}` lines. Pick a second model to compare the two in one table.'
)


# ----- reading the input -----


def load_texts(
    texts_from: str | None,
    text: Any,
    file: str | None,
    dataset: Any,
    split: Any,
    max_texts: Any,
    local_paths: bool = True,
) -> tuple[list[str], str]:
    """The texts to score and a few words saying what they are, from the source chosen; gr.Error when there is
    nothing to score. Without `local_paths` (a public Space) a dataset may not be a file of this machine."""
    texts_from = texts_from or PASTED
    if texts_from == PASTED:
        if not isinstance(text, str) or not text.strip():
            raise input_error("The text is empty: paste some text to score (or upload a file, or name a dataset).")
        if len(text) > MAX_TEXT_CHARS:
            raise input_error(f"The text has {len(text):,} characters; this app scores at most {MAX_TEXT_CHARS:,}.")
        return [text], f"the pasted text ({len(text):,} characters)"
    if texts_from == UPLOADED:
        content = read_text_upload(file, "text file", MAX_UPLOAD_BYTES)
        if not content.strip():
            raise input_error("The uploaded file holds no text.")
        return [content], f"{os.path.basename(file or '')} ({len(content):,} characters)"
    if texts_from == DATASET:
        return _dataset_texts(dataset, split, max_texts, local_paths)
    raise input_error(f"Unknown source of texts {echo(texts_from)}: choose one of {', '.join(SOURCES)}.")


def dataset_allowed(name: str, local_paths: bool) -> bool:
    """Whether a visitor may name this dataset. With `local_paths` anything `load_corpus` reads; without (a public
    Space) only the embedded corpus, a short name of `HUB_CORPORA` or a Hub id, and none that is a file or folder
    here: `load_corpus` reads local paths (and expands globs such as '*/*.txt') before it asks the Hub."""
    from aksis.corpora import HUB_CORPORA

    if local_paths or name == "shakespeare":
        return True
    named = name in HUB_CORPORA or (HUB_ID.fullmatch(name) is not None and ".." not in name)
    return named and not os.path.lexists(name)


def open_dataset(name: str, local_paths: bool = True) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """The corpus `name` as `load_corpus` splits it, or a gr.Error. The embedded corpus and local files are read
    whole, so their validation split is the one training held out; Hub datasets are streamed (only the rows
    scored are fetched; one without its own validation split then holds out documents by checksum, as
    streamed training does)."""
    from aksis.corpora import DataError, load_corpus

    if not name:
        raise input_error("No dataset named: give 'shakespeare', a Hub dataset id or a local text file.")
    if not dataset_allowed(name, local_paths):
        raise input_error(
            f"This server does not read its own files ({echo(name)}): upload the file instead, or name 'shakespeare', "
            "a dataset short name such as 'wikitext2', or a Hub dataset id (user/name)."
        )
    # load_corpus reads a path or a glob of local files before it asks the Hub; only the Hub is streamed.
    local = name == "shakespeare" or os.path.lexists(os.path.expanduser(name)) or glob.has_magic(name)
    try:
        return load_corpus(name, streaming=None if local else True)
    except DataError as err:  # not a ValueError: user_errors would not know it
        raise input_error(f"Could not load the dataset: {err}") from err


def _dataset_texts(dataset: Any, split: Any, max_texts: Any, local_paths: bool = True) -> tuple[list[str], str]:
    name = dataset.strip() if isinstance(dataset, str) else ""
    split = str(split).strip() if split else "validation"
    count = to_whole(max_texts if max_texts is not None else 10, "max texts", 1, MAX_TEXTS)
    corpus = open_dataset(name, local_paths)
    if split not in corpus:
        raise input_error(f"The dataset {echo(name)} has no split {echo(split)}: choose one of {', '.join(corpus)}.")
    texts, chars = [], 0
    for row in corpus[split].take(count):
        text = row["text"][: MAX_TEXT_CHARS - chars]
        if text:
            texts.append(text)
            chars += len(text)
        if chars >= MAX_TEXT_CHARS:
            break
    if not texts:
        raise input_error(f"The split {echo(split)} of {echo(name)} holds no text.")
    cut = " (cut at this app's limit)" if chars >= MAX_TEXT_CHARS else ""
    return texts, f"{len(texts)} text(s) of {name} / {split}, {chars:,} characters{cut}"


def read_prompt_pairs(path: str | None) -> list[tuple[str, str]]:
    """(prompt, reference) pairs of an uploaded JSONL file, with read_prompts' message when a line is bad."""
    read_text_upload(path, "prompts file", MAX_UPLOAD_BYTES)  # the size, binary and encoding checks
    assert path is not None
    try:
        return read_prompts(path)
    except ValueError as err:  # named by the file's name: where Gradio keeps uploads is the server's business
        message = str(err).replace(str(path), os.path.basename(path))
        raise input_error(f"Could not read the prompts file: {message}") from None


# ----- scoring -----


@contextmanager
def within_time(seconds: float | None) -> Iterator[float | None]:
    """The deadline (a time.monotonic() instant) of a request that may run `seconds` (None: no bound); scoring that
    runs past it is a message saying so, and what to ask for instead."""
    try:
        yield None if seconds is None else time.monotonic() + seconds
    except OutOfTime:
        raise input_error(f"{out_of_time(seconds)} Score fewer or shorter texts, or fewer samples.") from None


@on_gpu
def score_text(entry: LoadedModel, texts: Sequence[str], deadline: float | None = None) -> PerplexityResult:
    return perplexity(entry.model, entry.tokenizer, texts, progress=True, deadline=deadline)


@on_gpu
def evaluate_model(
    entry: LoadedModel,
    texts: Sequence[str],
    *,
    tasks: Sequence[str],
    prompts: Sequence[tuple[str, str]],
    temperature: float,
    max_new_tokens: int,
    prompt_tokens: int,
    num_samples: int,
    seed: int,
    deadline: float | None = None,
) -> dict[str, Any]:
    """`metrics.evaluate_checkpoint` for one model: its metrics ({name: value}) and samples of its generations.
    Sampling settings other than the temperature are the checkpoint's own."""
    config = dataclasses.replace(entry.generation, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return evaluate_checkpoint(
        entry.model,
        entry.tokenizer,
        texts,
        tasks=tasks,
        config=config,
        prompts=prompts[:num_samples],
        prompt_tokens=prompt_tokens,
        new_tokens=max_new_tokens,
        num_samples=num_samples,
        progress=True,
        deadline=deadline,
    )


def run_perplexity(store: ModelStore, source: str | None, text: Any, progress: Any = None) -> tuple[float, float]:
    """The `/perplexity` event: perplexity and bits per byte of one pasted text (`progress`: Gradio's, which shows
    the scoring's progress bar)."""
    texts, _ = load_texts(PASTED, text, None, None, None, None)
    with user_errors("load the model"):
        entry = store.get(source)
    with within_time(store.request_seconds) as deadline, user_errors("score the text"):
        result = score_text(entry, texts, deadline)
    return result.perplexity, result.bits_per_byte


def results_table(columns: dict[str, dict[str, float]]) -> dict[str, list[Any]]:
    """The comparison table as gr.Dataframe takes it: one row per metric (named as in markdown_table), one
    column per model."""
    names = list(dict.fromkeys(k for metrics in columns.values() for k in metrics))
    rows = [[LABELS.get(n, n.replace("_", " ")), *(metrics.get(n) for metrics in columns.values())] for n in names]
    return {"headers": ["metric", *columns], "data": rows}


def report(what: str, samples: dict[str, dict[str, list[dict[str, str]]]]) -> str:
    """What was scored, and a few generations of each model beside their references (the table is shown apart):
    one code block per sample, a line each for the prompt, the reference and the generation (line breaks shown
    as ↵, so the three stay aligned)."""
    lines = [f"Scored on {what}."]
    for source, tasks in samples.items():
        for task, items in tasks.items():
            lines += ["", f"#### {task} samples of {source}"]
            for item in items:
                rows = [f"{key:<10} {item[key]}".replace("\n", "↵") for key in ("prompt", "reference", "generated")]
                lines += ["", "```text", *(row.replace("```", "'''") for row in rows), "```"]
    return "\n".join(lines)


EvaluateOutput = tuple[float | None, float | None, dict[str, list[Any]], str, str]


def run_evaluate(
    store: ModelStore,
    limit: int,
    source: str | None,
    compare: str | None,
    texts_from: str | None,
    text: Any,
    file: str | None,
    dataset: Any,
    split: Any,
    max_texts: Any,
    scores: Sequence[str] | None,
    generate_from: str | None,
    prompts_file: str | None,
    temperature: Any,
    max_new_tokens: Any,
    prompt_tokens: Any,
    num_samples: Any,
    seed: Any,
    progress: Any = None,
) -> EvaluateOutput:
    """The `/evaluate` event: check the settings, read the texts (and prompts), then score each model (`progress`:
    Gradio's, which shows the progress bars of scoring and generation)."""
    chosen = list(scores) if isinstance(scores, list | tuple) else []
    if not chosen or not all(isinstance(c, str) and c in SCORES for c in chosen):
        raise input_error(f"Choose what to score: {' and/or '.join(SCORES)}.")
    tasks = [PERPLEXITY] if PERPLEXITY in chosen else []
    if BLEU_ROUGE in chosen:
        if not isinstance(generate_from or CONTINUATION, str) or (generate_from or CONTINUATION) not in GENERATE_FROM:
            raise input_error(f"BLEU / ROUGE score generations from: {' or '.join(GENERATE_FROM)}.")
        tasks.append(GENERATE_FROM[generate_from or CONTINUATION])
    settings = dict(
        max_new_tokens=to_max_new_tokens(max_new_tokens, min(limit, EVAL_MAX_TOKENS)),
        prompt_tokens=to_whole(prompt_tokens, "prompt tokens", 1, EVAL_MAX_TOKENS),
        num_samples=to_whole(num_samples, "samples", 1, MAX_SAMPLES),
        seed=to_whole(seed if seed is not None else 0, "seed", 0, 2**31 - 1),  # always seeded: scores reproduce
    )
    heat = to_number(temperature if temperature is not None else 0.0, "temperature", 0, MAX_TEMPERATURE)
    what: list[str] = []
    texts: list[str] = []
    prompts: list[tuple[str, str]] = []
    if {"perplexity", "continuation"} & set(tasks):
        texts, described = load_texts(texts_from, text, file, dataset, split, max_texts, store.local_paths)
        what.append(described)
    if "prompts" in tasks:
        prompts = read_prompt_pairs(prompts_file)
        what.append(f"{min(len(prompts), settings['num_samples'])} prompt(s) of {os.path.basename(prompts_file or '')}")
    sources = [
        s for s in dict.fromkeys([text_value(source, "model"), text_value(compare, "model to compare")]) if s.strip()
    ]
    if not sources:
        raise input_error("No model picked: choose one in the model picker.")
    columns: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[dict[str, str]]]] = {}
    with within_time(store.request_seconds) as deadline:  # one bound for the whole request, both models
        for name in sources:
            with user_errors(f"load the model {name}"):
                entry = store.get(name)
            with user_errors(f"evaluate {name}"):
                results = evaluate_model(
                    entry, texts, tasks=tasks, prompts=prompts, temperature=heat, deadline=deadline, **settings
                )
            columns[name] = results["metrics"]
            samples[name] = results["samples"]
    first = columns[sources[0]]
    return (
        first.get("perplexity"),
        first.get("bits_per_byte"),
        results_table(columns),
        report(" and ".join(what), samples),
        markdown_table(columns),
    )


# ----- the tab -----


def compare_choices(store: ModelStore, first: str | None, current: str | None) -> gr.Dropdown:
    """The "Compare with" dropdown offering the store's models as they are now, keeping the visitor's choice."""
    return gr.Dropdown(choices=store.choices(first), value=current, allow_custom_value=True)


def build(ctx: AppContext) -> None:
    store, limit = ctx.store, ctx.settings.max_new_tokens
    with gr.Tab("Evaluate", elem_id="evaluate-tab") as tab:
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column(scale=3):
                texts_from = gr.Radio(list(SOURCES), value=PASTED, label="Texts to score", elem_id="eval-source")
                with gr.Group(visible=True) as pasted_group:
                    text = gr.Textbox(
                        label="Text",
                        lines=8,
                        max_length=MAX_TEXT_CHARS,
                        placeholder="Paste the text to score here…",
                        elem_id="eval-text",
                    )
                    score_button = gr.Button("Score this text (perplexity)", elem_id="eval-text-perplexity")
                file = gr.File(
                    label=f"A UTF-8 text file (at most {MAX_UPLOAD_BYTES >> 20} MiB)",
                    file_types=[".txt", ".md", "text"],
                    visible=False,
                    elem_id="eval-file",
                )
                with gr.Row(visible=False) as dataset_row:
                    dataset = gr.Textbox(
                        "shakespeare",
                        label="Dataset",
                        info="'shakespeare' (built in), a Hub dataset id (needs the network)"
                        + (" or a local file path" if ctx.settings.local_paths else ""),
                        elem_id="eval-dataset",
                        scale=3,
                    )
                    split = gr.Dropdown(
                        ["validation", "train"], value="validation", allow_custom_value=True, label="Split",
                        elem_id="eval-split", scale=1,
                    )  # fmt: skip
                    max_texts = slider(
                        1, MAX_TEXTS, 10, step=1, label="At most this many texts", elem_id="eval-max-texts", scale=2
                    )
            with gr.Column(scale=2):
                compare = gr.Dropdown(
                    store.choices(ctx.settings.model),
                    value=None,
                    allow_custom_value=True,
                    label="Compare with (optional)",
                    info="a second model, scored on the same texts",
                    elem_id="eval-compare",
                )
                scores = gr.CheckboxGroup(list(SCORES), value=[PERPLEXITY], label="Scores", elem_id="eval-scores")
                generate_from = gr.Radio(
                    list(GENERATE_FROM), value=CONTINUATION, label="BLEU / ROUGE of", elem_id="eval-generate-from"
                )
                prompts_file = gr.File(
                    label='Prompts: a JSONL file of {"prompt": "...", "reference": "..."} lines',
                    file_types=[".jsonl", ".json"],
                    visible=False,
                    elem_id="eval-prompts-file",
                )
                with gr.Accordion("Generation settings (BLEU / ROUGE)", open=False):
                    temperature = sampling_slider("temperature", "eval", 0.0)
                    max_new_tokens = max_new_tokens_slider(
                        "eval",
                        32,
                        limit,
                        maximum=min(EVAL_MAX_TOKENS, limit),
                        info="continuation: also the reference's length",
                    )
                    prompt_tokens = slider(
                        1,
                        EVAL_MAX_TOKENS,
                        32,
                        step=1,
                        label="Prompt tokens (continuation)",
                        elem_id="eval-prompt-tokens",
                    )
                    num_samples = slider(
                        1, MAX_SAMPLES, 20, step=1, label="Samples", info="windows or prompts scored, at most",
                        elem_id="eval-samples",
                    )  # fmt: skip
                    seed = number(0, label="Seed (temperature above 0)", precision=0, elem_id="eval-seed")
        run_button = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
        with gr.Row():
            ppl = number(label="Perplexity", interactive=False, elem_id="eval-perplexity")
            bpb = number(label="Bits per byte", interactive=False, elem_id="eval-bpb")
        table = gr.Dataframe(label="Scores", interactive=False, wrap=True, elem_id="eval-table")
        with gr.Accordion("Markdown table (for a model card)", open=False):
            markdown = gr.Code(language="markdown", elem_id="eval-markdown")
        report_view = gr.Markdown(elem_id="eval-report")

        def show_source(chosen: str | None) -> tuple[Any, Any, Any]:
            return (
                gr.update(visible=chosen == PASTED),
                gr.update(visible=chosen == UPLOADED),
                gr.update(visible=chosen == DATASET),
            )

        # The models trained or listed since the page opened (the picker has its own "Refresh list").
        tab.select(
            lambda current: compare_choices(store, ctx.settings.model, current),
            compare,
            compare,
            api_visibility="private",
            show_progress="hidden",
        )
        generate_from.change(
            lambda chosen: gr.update(visible=chosen == PROMPTS),
            generate_from,
            prompts_file,
            api_visibility="private",
            show_progress="hidden",
        )
        texts_from.change(
            show_source, texts_from, [pasted_group, file, dataset_row], api_visibility="private", show_progress="hidden"
        )
        # The API's parameters: the functions' own after the store (and the limit).
        tracked = gr.Progress(track_tqdm=True)
        score_button.click(
            bound(run_perplexity, store, progress=tracked), [ctx.picker, text], [ppl, bpb], api_name="perplexity"
        )
        run_button.click(
            bound(run_evaluate, store, limit, progress=tracked),
            [
                ctx.picker,
                compare,
                texts_from,
                text,
                file,
                dataset,
                split,
                max_texts,
                scores,
                generate_from,
                prompts_file,
                temperature,
                max_new_tokens,
                prompt_tokens,
                num_samples,
                seed,
            ],
            [ppl, bpb, table, report_view, markdown],
            api_name="evaluate",
        )
