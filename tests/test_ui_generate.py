"""The Generate tab (aksis/ui/generate_tab.py): settings to GenerationConfig, presets, the streamed output and the
token view as plain functions, then the `/generate` and `/generation_preset` API of the served app, checked
against the library with the same seed."""

import itertools
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from conftest import ServedApp

from aksis.checkpoint import load_model
from aksis.config import GenerationConfig
from aksis.generation import SAMPLER_PRESETS, TokenProb, beam_search, generate
from aksis.ui.context import MAX_PROMPT_CHARS
from aksis.ui.generate_tab import (
    CHECKPOINT_PRESET,
    MAX_BEAMS,
    SAMPLE,
    generation_config,
    model_preset_settings,
    preset_settings,
    run_generate,
    token_html,
    token_rows,
)
from aksis.ui.models import ModelStore
from aksis.ui.sampling import Sampling

LIMIT = 64


@pytest.fixture(scope="module")
def store(app_checkpoints: Path) -> ModelStore:
    return ModelStore(app_checkpoints, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def llama(app_checkpoints: Path) -> str:
    return str(app_checkpoints / "tiny-llama")


def settings(**overrides: Any) -> dict[str, Any]:
    """The tab's inputs after `source, prompt`, as the UI sends them."""
    values: dict[str, Any] = dict(
        sampler=SAMPLE,
        temperature=0.9,
        top_k=40,
        top_p=0.9,
        num_beams=3,
        repetition_penalty=1.0,
        max_new_tokens=24,
        seed=11,
    )
    return {**values, **overrides}


# ----- settings -----


def test_each_sampler_reads_only_its_own_sliders() -> None:
    base = GenerationConfig(stop=["\n\n"], length_penalty=0.8)  # a checkpoint's own settings that stay

    def config(sampler: str, **overrides: Any) -> GenerationConfig:
        return generation_config(base, Sampling(**settings(sampler=sampler, **overrides)), limit=LIMIT)

    sample = config(SAMPLE)
    assert (sample.temperature, sample.top_k, sample.top_p, sample.num_beams) == (0.9, 40, 0.9, 1)
    assert sample.seed == 11 and sample.max_new_tokens == 24
    assert sample.stop == ["\n\n"] and sample.length_penalty == 0.8
    top_k = config("top-k")
    assert (top_k.temperature, top_k.top_k, top_k.top_p) == (0.9, 40, 1.0)  # the top-p slider is not read
    top_p = config("top-p")
    assert (top_p.top_k, top_p.top_p) == (0, 0.9)
    assert (config("temperature").top_k, config("temperature").top_p) == (0, 1.0)
    assert config("greedy").temperature == 0.0
    beam = config("beam", repetition_penalty=1.3)
    assert beam.num_beams == 3 and beam.repetition_penalty == 1.3


def test_a_blank_or_negative_seed_is_a_fresh_random_one() -> None:
    base = GenerationConfig()
    seeds = [generation_config(base, Sampling(**settings(seed=s)), limit=LIMIT).seed for s in (None, -1, "")]
    assert all(isinstance(s, int) and s >= 0 for s in seeds)
    assert len(set(seeds)) > 1  # three draws from 2**31 seeds
    assert generation_config(base, Sampling(**settings(seed=5.0)), limit=LIMIT).seed == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_k=-3), "top_k must be >= 0"),
        (dict(max_new_tokens=LIMIT + 1), f"max new tokens must be between 1 and {LIMIT} .this app's limit., got 65"),
        (dict(max_new_tokens=0), "max new tokens must be between 1"),
        (dict(max_new_tokens=None), "max new tokens is missing"),
        (dict(max_new_tokens=2.5), "max new tokens must be a whole number"),
        (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(sampler="beam", num_beams=1), "beam width must be a whole number from 2 to 8, got 1"),
        (dict(sampler="beam", num_beams=5000), "beam width must be a whole number from 2 to 8, got 5000"),
        (dict(sampler="nucleus"), "unknown sampler 'nucleus': choose one of sample, greedy"),
        (dict(sampler="top-k", temperature=0), "needs a temperature above 0"),
    ],
)
def test_bad_settings_are_clear_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(gr.Error, match=message):
        generation_config(GenerationConfig(), Sampling(**settings(**overrides)), limit=LIMIT)


def test_presets_fill_the_sampler_and_sliders() -> None:
    base = GenerationConfig(temperature=0.5, top_k=30, top_p=0.8, repetition_penalty=1.2, max_new_tokens=500)
    assert preset_settings(base, CHECKPOINT_PRESET, LIMIT) == (SAMPLE, 0.5, 30, 0.8, 4, 1.2, LIMIT)  # within limit
    precise = SAMPLER_PRESETS["precise"]
    assert preset_settings(base, "precise", 1024) == (
        SAMPLE,
        precise["temperature"],
        precise["top_k"],
        precise["top_p"],
        4,
        precise["repetition_penalty"],
        500,
    )
    assert preset_settings(GenerationConfig(num_beams=3), CHECKPOINT_PRESET, LIMIT)[:1] == ("beam",)
    assert preset_settings(GenerationConfig(num_beams=3), CHECKPOINT_PRESET, LIMIT)[4] == 3
    assert preset_settings(GenerationConfig(num_beams=3), "creative", LIMIT)[0] == SAMPLE  # a preset samples
    assert preset_settings(GenerationConfig(temperature=0.0), CHECKPOINT_PRESET, LIMIT)[0] == "greedy"
    with pytest.raises(gr.Error, match="unknown preset 'wild'"):
        preset_settings(base, "wild", LIMIT)


def test_a_model_that_cannot_be_loaded_fills_the_library_defaults_quietly(
    store: ModelStore, llama: str, tmp_path: Path
) -> None:
    defaults = preset_settings(GenerationConfig(), CHECKPOINT_PRESET, LIMIT)
    assert model_preset_settings(store, LIMIT, llama, CHECKPOINT_PRESET) == preset_settings(
        store.get(llama).generation, CHECKPOINT_PRESET, LIMIT
    )
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")  # a broken checkpoint
    for source in (None, "", str(tmp_path), str(tmp_path / "missing")):
        assert model_preset_settings(store, LIMIT, source, CHECKPOINT_PRESET) == defaults
    with pytest.raises(gr.Error, match="unknown preset"):  # the visitor's own input is still checked
        model_preset_settings(store, LIMIT, llama, "wild")


# ----- generating (plain functions) -----


def test_the_stream_grows_and_ends_with_the_library_text(store: ModelStore, llama: str) -> None:
    outputs = list(run_generate(store, LIMIT, llama, "To be, or", **settings()))
    texts = [text for text, *_ in outputs]
    assert len(outputs) > 2  # streamed: several updates before the last
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    entry = store.get(llama)
    config = GenerationConfig(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=24, seed=11)
    expected = generate(entry.model, entry.tokenizer, "To be, or", config)
    text, view, rows, stats = outputs[-1]
    assert text == expected.text
    assert len(rows) == len(expected.token_ids) and [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert all(0 <= r[2] <= 1 for r in rows)
    assert view.count('class="aksis-token"') == len(expected.token_ids)
    assert f"{len(expected.token_ids)} tokens in" in stats and "tokens/s" in stats and "seed 11" in stats


def test_beam_search_is_shown_once_and_equals_the_library(store: ModelStore, llama: str) -> None:
    outputs = list(run_generate(store, LIMIT, llama, "To be", **settings(sampler="beam", max_new_tokens=12)))
    assert len(outputs) == 1
    entry = store.get(llama)
    [best] = beam_search(entry.model, entry.tokenizer, "To be", GenerationConfig(num_beams=3, max_new_tokens=12))
    assert outputs[0][0] == best.text
    assert "seed" not in outputs[0][3]  # nothing was drawn at random


def test_bad_requests_fail_before_any_generation(store: ModelStore, llama: str) -> None:
    with pytest.raises(gr.Error, match="The prompt is empty"):
        next(run_generate(store, LIMIT, llama, "  \n", **settings()))
    with pytest.raises(gr.Error, match="no model picked"):
        next(run_generate(store, LIMIT, None, "Hello", **settings()))
    with pytest.raises(gr.Error, match=f"max new tokens must be between 1 and {LIMIT}"):
        next(run_generate(store, LIMIT, "", "Hello", **settings(max_new_tokens=1000)))  # checked before the model
    with pytest.raises(gr.Error, match=f"this app takes at most {MAX_PROMPT_CHARS:,}"):
        next(run_generate(store, LIMIT, "", "a" * (MAX_PROMPT_CHARS + 1), **settings()))  # before the model, too
    with pytest.raises(gr.Error, match="The prompt is empty"):
        next(run_generate(store, LIMIT, llama, ["not", "text"], **settings()))


def test_the_token_view_colours_and_escapes_each_token() -> None:
    scores = [
        TokenProb(1, "<b>", 0.9, [("<b>", 0.9), ("x", 0.05)]),
        TokenProb(2, " a\x15", 0.01, [("\n", 0.5), (" a\x15", 0.01)]),
    ]
    view = token_html("1 < 2 & ${x} {{y}}", scores)
    assert "<b>" not in view and "&lt;b&gt;" in view and "1 &lt; 2 &amp;" in view
    assert "&#36;&#123;x&#125; &#123;&#123;y&#125;&#125;" in view  # gr.HTML's template syntax stays text
    assert "hsl(108, 80%, 80%)" in view and "hsl(1, 80%, 80%)" in view  # likely green, unlikely red
    assert " a␕</span>" in view  # a control character is shown, a space stays a space
    assert "p = 0.010" in view and "↵  0.500" in view  # the tooltip: probability and alternatives
    assert token_rows(scores) == [
        [1, "<b>", 0.9, "<b> 0.900   x 0.050"],
        [2, "␣a␕", 0.01, "↵ 0.500   ␣a␕ 0.010"],
    ]


# ----- the API of the served app -----


def test_generate_api_equals_the_library_with_the_same_seed(served_app: ServedApp) -> None:
    source = served_app.settings.model
    client = served_app.client()
    text, view, table, stats = client.predict(source, "ROMEO:", **settings(), api_name="/generate")
    model, tokenizer, _ = load_model(source, device="cpu")
    config = GenerationConfig(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=24, seed=11)
    expected = generate(model, tokenizer, "ROMEO:", config)
    assert text == expected.text  # the continuation alone, without the prompt
    assert len(table["data"]) == len(expected.token_ids) and table["headers"][1] == "token"
    assert view.startswith('<div id="aksis-token-view"') and "seed 11" in stats

    text, *_ = client.predict(source, "ROMEO:", **settings(sampler="beam", max_new_tokens=10), api_name="/generate")
    [best] = beam_search(model, tokenizer, "ROMEO:", GenerationConfig(num_beams=3, max_new_tokens=10))
    assert text == best.text


def test_generation_preset_api_returns_the_slider_values(served_app: ServedApp) -> None:
    client = served_app.client()
    sampler, temperature, top_k, top_p, *_ = client.predict(
        served_app.settings.model, "creative", api_name="/generation_preset"
    )
    creative = SAMPLER_PRESETS["creative"]
    assert (sampler, temperature, top_k, top_p) == (
        SAMPLE,
        creative["temperature"],
        creative["top_k"],
        creative["top_p"],
    )


def test_bad_input_through_the_api_is_a_clear_error_and_the_app_keeps_serving(served_app: ServedApp) -> None:
    from gradio_client.exceptions import AppError

    source = served_app.settings.model
    client = served_app.client()
    limit = served_app.settings.max_new_tokens
    bad = [
        (source, "", settings(), "The prompt is empty"),
        (source, "Hi", settings(max_new_tokens=limit + 1), f"max new tokens must be between 1 and {limit}"),
        (source, "Hi", settings(top_p=0), r"top_p must be in \(0, 1\]"),
        ("", "Hi", settings(), "no model picked"),
        (
            source,
            "Hi",
            settings(sampler="beam", num_beams=5000),
            f"beam width must be a whole number from 2 to {MAX_BEAMS}",
        ),
        (source, "a" * (MAX_PROMPT_CHARS + 1), settings(), f"this app takes at most {MAX_PROMPT_CHARS:,}"),
    ]
    for model, prompt, values, message in bad:
        with pytest.raises(AppError, match=message):
            client.predict(model, prompt, **values, api_name="/generate")
    text, *_ = client.predict(source, "Hi", **settings(max_new_tokens=4), api_name="/generate")
    assert isinstance(text, str)  # still serving
