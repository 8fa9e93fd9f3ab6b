"""Every API endpoint of the app, as a public Space serves it, against random values of every kind (issue 18): each
call either answers or raises the app's own error (gr.Error, with a message for the visitor), never another
exception. Values come from hypothesis: junk of every JSON-ish type, mixed with values each parameter plausibly takes
(so that calls get past the first check and into the model). gr.State inputs are the server's, never the client's:
they get the values the server keeps."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aksis.generation import SAMPLER_PRESETS, SAMPLERS
from aksis.ui import AppSettings, build_app
from aksis.ui import evaluate_tab as ev
from aksis.ui.chat_tab import respond
from aksis.ui.context import APP_MAX_NEW_TOKENS
from aksis.ui.models import ModelStore

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=2),
)


def plausible(app_checkpoints: Path) -> dict[str, list[Any]]:
    """Values each parameter (by name) plausibly takes: valid ones (the first of each list), and edges around them."""
    llama, gpt2 = str(app_checkpoints / "tiny-llama"), str(app_checkpoints / "tiny-gpt2")
    models = [llama, gpt2, "alice/no-such-repo", "../x"]
    return {
        "source": models, "model": models, "compare": models, "model_1": models, "model_2": [gpt2, *models],
        "current": models,
        "prompt": ["To be", " ", "é" * 3000], "text": ["To be, or not to be." * 5, ""], "message": ["Hi", "x" * 30_000],
        "system_prompt": ["", "Be brief."],
        "sampler": list(SAMPLERS), "preset": [*SAMPLER_PRESETS, "checkpoint defaults"],
        "temperature": [0, 0.7, 1e-300, 2.0], "top_k": [0, 40, -1], "top_p": [0.9, 0.0, 1.0],
        "num_beams": [1, 3, 100_000], "repetition_penalty": [1.0, 1.3, 0.0], "max_new_tokens": [4, 6, 8, 1025, 0],
        "seed": [0, 7, -1, 2**70], "layer": [0, 1, -1, 99], "head": [0, 3, 99],
        "mode": ["continue", "chat"], "winner": ["a", "b", "tie", "both-bad"],
        "texts_from": [ev.PASTED, ev.UPLOADED], "max_texts": [1, 0, 101], "scores": [[ev.PERPLEXITY], [ev.BLEU_ROUGE]],
        "generate_from": list(ev.GENERATE_FROM), "prompt_tokens": [4, 0], "num_samples": [1, 0],
        "corpus": ["upload"], "steps": [1, 0], "tokenizer": ["byte", "bpe"], "overwrite": [True, False],
        "repo_id": ["alice/copy", "not a repo"], "token": ["", "hf_x"],
    }  # fmt: skip


@pytest.fixture(scope="module")
def space(app_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[gr.Blocks]:
    settings_ = AppSettings(
        model=str(app_checkpoints / "tiny-llama"),
        checkpoints_dir=app_checkpoints,
        feedback_file=tmp_path_factory.mktemp("feedback") / "feedback.jsonl",
        device="cpu",
        local_paths=False,
        request_seconds=20,
    )
    demo = build_app(settings_)
    yield demo
    demo.close()


def endpoints(demo: gr.Blocks) -> dict[str, Any]:
    return {fn.api_name: fn for fn in demo.fns.values() if fn.api_visibility == "public"}


ENDPOINTS = [
    "load_model", "list_models", "chat", "chat_preset", "chat_save", "chat_load", "generation_preset", "generate",
    "perplexity", "evaluate", "model_info", "attention", "arena_answer", "arena_vote", "leaderboard", "train",
    "stop_training", "push",
]  # fmt: skip


# Endpoints whose random calls must sometimes answer (the others need an upload, a token or a running training).
ANSWERING = {
    "load_model", "list_models", "chat", "chat_preset", "generation_preset", "generate", "perplexity", "evaluate",
    "model_info", "attention", "arena_answer", "leaderboard", "stop_training",
}  # fmt: skip


def test_the_list_covers_every_public_endpoint(space: gr.Blocks) -> None:
    # The leaderboard's value is a function, which Gradio runs at page load as an event of its own (no inputs).
    page_load = {name for name, event in endpoints(space).items() if name.startswith("lambda") and not event.inputs}
    assert sorted(set(endpoints(space)) - page_load) == sorted(ENDPOINTS)


def call(fn: Any, args: list[Any]) -> Any:
    """Call an event's function as Gradio would (the inputs in order), to the end of any stream it returns."""
    result = fn(*args)
    if inspect.isasyncgen(result):

        async def drain() -> list[Any]:
            return [item async for item in result]

        return asyncio.run(drain())
    if inspect.isawaitable(result):
        return asyncio.run(result)  # type: ignore[arg-type]
    if inspect.isgenerator(result):
        return list(result)
    return result


def function(event: Any, app_checkpoints: Path) -> Any:
    """The app's function behind an event. The chat's event function is gr.ChatInterface's wrapper around the app's
    own, `respond` (after a store and the limit); the others are the app's own."""
    if event.api_name == "chat":
        store = ModelStore(app_checkpoints, device=torch.device("cpu"), local_paths=False, request_seconds=20)
        return functools.partial(respond, store, APP_MAX_NEW_TOKENS)
    return event.fn


@pytest.mark.parametrize("api_name", ENDPOINTS)
def test_each_endpoint_answers_or_refuses_any_value(api_name: str, space: gr.Blocks, app_checkpoints: Path) -> None:
    event = endpoints(space)[api_name]
    fn = function(event, app_checkpoints)
    names = [p for p in inspect.signature(fn).parameters if p not in ("request", "progress")]
    assert len(names) == len(event.inputs), api_name
    values = plausible(app_checkpoints)
    server: dict[str, Any] = {}  # inputs the server holds (a client cannot send them), with the server's values
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for name, component in zip(names, event.inputs, strict=True):
        if isinstance(component, gr.State):
            initial = component.value
            server[name] = initial() if callable(initial) else initial
        elif name == "history":  # the chat's history is the session's (gr.State in ChatInterface's own wiring)
            server[name] = []
        elif name in ("file", "upload", "prompts_file"):  # an upload is a path Gradio wrote, or nothing
            strategies[name] = st.one_of(st.none(), st.sampled_from(["/etc/passwd", str(app_checkpoints)]), JUNK)
        elif name in values:
            strategies[name] = st.one_of(st.sampled_from(values[name]), JUNK)
        else:
            strategies[name] = JUNK
    strategies.update({name: st.just(value) for name, value in server.items()})
    # First, a call of valid values (each parameter's first plausible value), which must answer where ANSWERING.
    valid = {name: server[name] if name in server else values.get(name, [None])[0] for name in names}

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @example(valid)
    @given(st.fixed_dictionaries(strategies))
    def answers_or_refuses(kwargs: dict[str, Any]) -> None:
        nonlocal answered
        with contextlib.suppress(gr.Error):  # the app's own refusal, with a message for the visitor
            call(fn, [kwargs[name] for name in names])
            answered += 1

    answered = 0
    answers_or_refuses()
    if api_name in ANSWERING:  # the harness reaches the model, not only the first checks
        assert answered > 0, api_name


def test_a_refusal_is_the_app_s_own_error_and_not_a_crash(space: gr.Blocks, app_checkpoints: Path) -> None:
    """The property above can fail: a value the app does not check would surface as another exception."""
    event = endpoints(space)["generate"]
    source = str(app_checkpoints / "tiny-llama")
    with pytest.raises(gr.Error, match="max new tokens must be"):
        call(event.fn, [source, "To be", "sample", 0.7, 40, 0.9, 1, 1.0, 10**9, 1])
    outputs = call(event.fn, [source, "To be", "greedy", 0, 0, 1.0, 1, 1.0, 4, None])
    assert outputs[-1][0]  # an answer


HUGE = "x" * 100_000


@pytest.mark.parametrize("api_name", ENDPOINTS)
def test_a_huge_value_is_never_echoed_in_a_refusal_or_the_log(
    api_name: str, space: gr.Blocks, app_checkpoints: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A visitor may send 100,000 characters where a word is expected (a vote, a run name, a repo id, a path, a
    setting): a refusal quotes a short prefix at most, and the server's log does not carry the value either. (An
    answer may hold it: a chat shows the message it answers.)"""
    event = endpoints(space)[api_name]
    fn = function(event, app_checkpoints)
    names = [p for p in inspect.signature(fn).parameters if p not in ("request", "progress")]
    values = plausible(app_checkpoints)
    valid: dict[str, Any] = {}
    for name, component in zip(names, event.inputs, strict=True):
        if isinstance(component, gr.State):
            initial = component.value
            valid[name] = initial() if callable(initial) else initial
        else:
            valid[name] = [] if name == "history" else values.get(name, [None])[0]
    visitor = [n for n, c in zip(names, event.inputs, strict=True) if not isinstance(c, gr.State) and n != "history"]
    caplog.set_level(logging.DEBUG)
    for name in visitor:
        caplog.clear()
        try:
            call(fn, [HUGE if n == name else valid[n] for n in names])
        except gr.Error as err:
            assert len(str(err.message)) < 1_000, (api_name, name, str(err.message)[:200])
        logged = sum(len(r.getMessage()) + len(r.exc_text or "") for r in caplog.records)
        assert logged < 5_000, (api_name, name, [r.getMessage()[:200] for r in caplog.records])
