"""The Chat tab (aksis/ui/chat_tab.py): conversations rebuilt from the chat history, sampler settings, streamed
replies equal to `aksis.chat.reply`, like/dislike feedback, saving and loading the aksis-chat JSON, and the same
through the running app's API."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from conftest import ServedApp
from gradio_client import handle_file

from aksis.chat import Conversation, reply
from aksis.checkpoint import load_model
from aksis.config import GenerationConfig
from aksis.generation import SAMPLER_PRESETS, sampler_config
from aksis.ui.chat_tab import (
    CHECKPOINT_PRESET,
    MAX_CHAT_FILE_BYTES,
    SAVED_CHAT_TTL_S,
    ReplyInfo,
    conversation_from_history,
    load_conversation,
    message_text,
    model_defaults,
    preset_values,
    record_feedback,
    respond,
    sampling_config,
    save_conversation,
    saved_chats_folder,
    stream_reply,
)
from aksis.ui.context import MAX_PROMPT_CHARS
from aksis.ui.feedback import MAX_RECORD_BYTES, RATE, FeedbackLog, FeedbackRefused
from aksis.ui.models import LoadedModel, ModelStore
from aksis.ui.sampling import Sampling

SLIDERS = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1, max_new_tokens=12)


@pytest.fixture(scope="module")
def llama(app_checkpoints: Path) -> LoadedModel:
    return ModelStore(app_checkpoints, device=torch.device("cpu")).get(str(app_checkpoints / "tiny-llama"))


def library_reply(source: str, conversation: Conversation, preset: str | None, seed: int, **sliders: Any) -> str:
    """What aksis.chat.reply answers, with the model loaded afresh by the library (not through the app)."""
    model, tokenizer, base = load_model(source, device="cpu")
    config = sampler_config(preset, base, seed=seed, num_beams=1, **sliders)
    for _ in reply(model, tokenizer, conversation, config):
        pass
    return conversation.messages[-1].content


# ----- the conversation -----


def test_message_text_reads_plain_and_normalised_messages() -> None:
    assert message_text("Hi there") == "Hi there"
    parts = [
        {"type": "text", "text": "Hi "},
        {"type": "file", "file": {"path": "x.png"}},
        {"type": "text", "text": "you"},
    ]
    assert message_text(parts) == "Hi you"  # Gradio 6 hands history content over as parts
    assert message_text({"type": "text", "text": "one"}) == "one"
    assert message_text(None) == ""


def test_conversation_from_history_keeps_what_the_model_answered() -> None:
    history = [
        {"role": "user", "content": "first, failed"},  # no reply before the next message: dropped
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "  "},  # empty: dropped
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": ""},  # a reply that was empty is still the model's turn
        {"role": "user", "content": "stopped before any text"},  # the newest, unanswered: dropped
    ]
    conversation = conversation_from_history(history, "  Be brief.  ")
    assert conversation.system_prompt == "Be brief."
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "Hello"),
        ("assistant", "Hi."),
        ("user", "How are you?"),
        ("assistant", ""),
    ]
    assert conversation_from_history([], None) == Conversation()


def test_replies_read_back_as_the_model_wrote_them_not_as_the_chatbot_shows_them() -> None:
    written = "Roses\n\tare red,\n\t  violets blue."
    shown = "Roses\nare red,\n  violets blue."  # inspect.cleandoc, as gr.Chatbot shows (and sends back) it
    history = [{"role": "user", "content": "A poem?"}, {"role": "assistant", "content": shown}]
    assert conversation_from_history(history).messages[-1].content == shown
    replies = {1: {"model": "m", "reply": written}}
    assert conversation_from_history(history, "", replies).messages[-1].content == written
    edited = [history[0], {"role": "assistant", "content": "Edited in the browser."}]
    assert conversation_from_history(edited, "", replies).messages[-1].content == "Edited in the browser."


# ----- sampling settings -----


@pytest.mark.parametrize("preset", [CHECKPOINT_PRESET, *SAMPLER_PRESETS])
def test_sampling_config_is_sampler_config_with_the_sliders(preset: str) -> None:
    base = GenerationConfig(stop=["\n\n"], seed=3)
    config = sampling_config(base, Sampling(preset=preset, seed=5, **SLIDERS), limit=64)
    expected = sampler_config(None if preset == CHECKPOINT_PRESET else preset, base, seed=5, **SLIDERS)
    assert config == expected and config.stop == ["\n\n"]  # the checkpoint's stop strings stay
    # A blank or negative seed draws afresh, even when the checkpoint saved one.
    assert sampling_config(base, Sampling(preset=preset, seed=None, **SLIDERS), limit=64).seed is None
    assert sampling_config(base, Sampling(preset=preset, seed=-1, **SLIDERS), limit=64).seed is None
    assert (
        sampling_config(base, Sampling(preset=preset, seed=7.0, **SLIDERS), limit=64).seed == 7
    )  # gr.Number gives floats


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(max_new_tokens=65), "max new tokens must be between 1 and 64"),
        (dict(max_new_tokens=0), "max new tokens must be between 1 and 64"),
        (dict(max_new_tokens=None), "max new tokens is missing"),
        (dict(max_new_tokens=2.5), "max new tokens must be a whole number"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(preset="wild"), "unknown preset 'wild'"),
    ],
)
def test_sampling_config_names_bad_settings(change: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {**SLIDERS, "preset": CHECKPOINT_PRESET, "seed": None, **change}
    preset = settings.pop("preset")
    with pytest.raises(gr.Error, match=message):
        sampling_config(GenerationConfig(), Sampling(preset=preset, **settings), limit=64)


def test_presets_fill_the_sliders() -> None:
    base = GenerationConfig(temperature=0.5, top_k=10, top_p=0.8, repetition_penalty=1.2, max_new_tokens=5000)
    assert preset_values(base, CHECKPOINT_PRESET, limit=1024) == (0.5, 10, 0.8, 1.2, 1024)  # within the slider
    creative = SAMPLER_PRESETS["creative"]
    assert preset_values(base, "creative", limit=1024) == (
        creative["temperature"],
        creative["top_k"],
        creative["top_p"],
        creative["repetition_penalty"],
        1024,
    )
    with pytest.raises(gr.Error, match="unknown preset"):
        preset_values(base, "wild", limit=1024)


def test_a_new_model_fills_the_sliders_with_its_defaults_or_quietly_leaves_them(
    app_checkpoints: Path, tmp_path: Path
) -> None:
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    source = str(app_checkpoints / "tiny-llama")
    assert model_defaults(store, 64, source, CHECKPOINT_PRESET) == preset_values(
        store.get(source).generation, CHECKPOINT_PRESET, 64
    )
    assert model_defaults(store, 64, source, "creative") is None  # the preset's values stay in the sliders
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    for broken in (None, str(tmp_path), "alice/no-such-model@bad revision"):
        assert model_defaults(store, 64, broken, CHECKPOINT_PRESET) is None  # the picker says why, not this


# ----- replies -----


def test_stream_reply_grows_to_what_the_library_replies(llama: LoadedModel) -> None:
    config = sampling_config(llama.generation, Sampling(preset="creative", seed=11, **SLIDERS), limit=64)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    conversation = conversation_from_history(history, "Be brief.")
    conversation.add("user", "Tell me a story")
    texts = list(stream_reply(llama, conversation, config))
    assert len(texts) >= 2 and all(b.startswith(a) for a, b in itertools.pairwise(texts[:-1]))
    assert texts[-1] == texts[-2].strip() == conversation.messages[-1].content  # ends as the chat keeps it

    expected = Conversation("Be brief.")
    for role, text in [("user", "Hello"), ("assistant", "Hi."), ("user", "Tell me a story")]:
        expected.add(role, text)
    assert texts[-1] and texts[-1] == library_reply(llama.source, expected, "creative", seed=11, **SLIDERS)


def test_a_chat_longer_than_the_context_drops_old_turns_but_not_the_new_message(llama: LoadedModel) -> None:
    context = llama.model.config.block_size  # 128 byte tokens
    long_history = []
    for i in range(6):
        long_history += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": "ok " * 8}]
    config = sampling_config(llama.generation, Sampling(preset=CHECKPOINT_PRESET, seed=1, **SLIDERS), limit=64)
    conversation = conversation_from_history(long_history)
    assert len(conversation.prompt_ids(llama.tokenizer, 10_000)) > context
    conversation.add("user", "and now?")
    *_, last = stream_reply(llama, conversation, config)
    assert conversation.messages[-1].content == last  # answered, within the budget

    too_long = Conversation()
    too_long.add("user", "x" * context)
    with pytest.raises(gr.Error, match="write a shorter message"):
        list(stream_reply(llama, too_long, config))


def turn(message: Any, system_prompt: str | None = "", model: str | None = None) -> list[Any]:
    """The inputs of one chat turn after the store and the limit (an empty history)."""
    return [message, [], model, system_prompt, "precise", *SLIDERS.values(), 3, {}]


def test_a_turn_checks_its_texts_before_fetching_the_model(app_checkpoints: Path) -> None:
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    too_long = "a" * (MAX_PROMPT_CHARS + 1)
    with pytest.raises(gr.Error, match=f"The message has {MAX_PROMPT_CHARS + 1:,} characters; this app takes at"):
        next(respond(store, 64, *turn(too_long)))  # no model picked: the message is refused first
    with pytest.raises(gr.Error, match="The system prompt has"):
        next(respond(store, 64, *turn("Hello", system_prompt=too_long)))
    with pytest.raises(gr.Error, match="The message is empty"):
        next(respond(store, 64, *turn(" \n")))
    with pytest.raises(gr.Error, match="no model picked"):  # a blank system prompt is no system prompt
        next(respond(store, 64, *turn("Hello", system_prompt="   ")))
    source = str(app_checkpoints / "tiny-llama")
    *_, (text, replies) = respond(store, 64, *turn("Hello", system_prompt="Be brief.", model=source))
    assert replies[1]["reply"] == text and replies[1]["model"] == source


# ----- feedback -----


def chat_turns(store: ModelStore, source: str, *messages: str, system_prompt: str = "") -> tuple[list[Any], ReplyInfo]:
    """The chat history and the session's ReplyInfo after the app answers `messages` one after another."""
    history: list[Any] = []
    replies: ReplyInfo = {}
    for message in messages:
        inputs = [message, history, source, system_prompt, "precise", *SLIDERS.values(), 3, replies]
        *_, (text, replies) = respond(store, 64, *inputs)
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": text}]
    return history, replies


def test_likes_and_dislikes_record_what_the_server_wrote_never_what_the_client_sends(
    app_checkpoints: Path, tmp_path: Path
) -> None:
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    first, second = (str(app_checkpoints / name) for name in ("tiny-llama", "tiny-gpt2"))
    history, replies = chat_turns(store, first, "Hello", system_prompt="Be kind.")
    history, replies = chat_turns(store, second, "Hello", "Bye")  # a new chat: another model, no system prompt
    _, earlier = chat_turns(store, first, "Hello", system_prompt="Be kind.")
    replies = {**replies, 1: earlier[1]}  # the first reply was the first model's, in that chat
    liked = record_feedback(log, replies, 1, True, "s1")
    disliked = record_feedback(log, replies, [3, 0], False, "s1")
    retracted = record_feedback(log, replies, 3, "", "s1")
    assert (liked["kind"], disliked["kind"], retracted["kind"]) == ("like", "dislike", "retract")
    assert (liked["model"], liked["prompt"], liked["reply"]) == (first, "Hello", earlier[1]["reply"])
    assert liked["settings"] == earlier[1]["settings"] and liked["settings"]["seed"] == 3
    assert liked["conversation"] == {  # as the model saw it: the system prompt of that reply
        "format": "aksis-chat",
        "version": 1,
        "system_prompt": "Be kind.",
        "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": earlier[1]["reply"]}],
    }
    assert (disliked["model"], disliked["prompt"], disliked["reply"]) == (second, "Bye", history[3]["content"])
    assert [m["content"] for m in disliked["conversation"]["messages"]] == [m["content"] for m in history]
    assert [r["id"] for r in log.records()] == [liked["id"], disliked["id"], retracted["id"]]
    for index in (0, 2, 4, -1, "1", [], None):  # a user message, no message, not an index
        with pytest.raises(gr.Error, match="Only the model's replies written in this chat"):
            record_feedback(log, replies, index, True, "s1")  # type: ignore[arg-type]
    with pytest.raises(gr.Error, match="Only the model's replies written in this chat"):
        record_feedback(log, {}, 1, True, "s1")  # e.g. a reply loaded from a file


def test_feedback_is_bounded_per_record_and_per_session(app_checkpoints: Path, tmp_path: Path) -> None:
    """A like used to store whatever history the client made up (one 50 MB request: 105 MB of log)."""
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    source = str(app_checkpoints / "tiny-llama")
    history, replies = chat_turns(store, source, "x" * 100, "Hello")  # the two turns are over the 128-token context
    record = record_feedback(log, replies, 3, True, "s1")
    assert [m["content"] for m in record["conversation"]["messages"]] == ["Hello", history[3]["content"]]
    assert "x" * 100 not in json.dumps(record)  # what the model saw, within its context: not the whole chat
    limit = RATE[0]
    for _ in range(limit - 1):
        record_feedback(log, replies, 3, True, "s1")
    with pytest.raises(gr.Error, match=f"at most {limit} ratings a minute"):
        record_feedback(log, replies, 3, False, "s1")
    record_feedback(log, replies, 3, False, "s2")  # another visitor is not held back
    assert len(log.records()) == limit + 1
    with pytest.raises(FeedbackRefused, match="too large to keep"):
        log.record("like", reply="x" * MAX_RECORD_BYTES)
    assert len(log.records()) == limit + 1


def test_the_chatbot_like_event_records_through_the_app(served_app: ServedApp, app_checkpoints: Path) -> None:
    """The Chatbot's .like listener as the app wires it (a browser sends gr.LikeData; here it is built by hand):
    the reply is named by its index, and the text the browser sends with it is not what is recorded."""
    demo = served_app.demo
    likes = [fn for fn in demo.fns.values() if any(event == "like" for _, event in fn.targets)]
    assert len(likes) == 1
    source = str(app_checkpoints / "tiny-llama")
    _, replies = chat_turns(ModelStore(app_checkpoints, device=torch.device("cpu")), source, "Hello")
    request = gr.Request(session_hash="visitor")
    likes[0].fn(replies, gr.LikeData(None, {"index": 1, "value": ["made up"], "liked": False}), request)
    last = FeedbackLog(served_app.settings.feedback_file).records()[-1]
    assert (last["kind"], last["model"], last["prompt"], last["reply"]) == (
        "dislike",
        source,
        "Hello",
        replies[1]["reply"],
    )


# ----- saving and loading -----


def test_save_then_load_round_trips_the_conversation(tmp_path: Path) -> None:
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi — ünïcode."}]
    path = save_conversation(history, "Be brief.", root=tmp_path)
    saved = Conversation.load(path)  # what aksis chat-with-model --context-file reads
    assert saved == conversation_from_history(history, "Be brief.")
    assert load_conversation(str(path)) == saved
    with pytest.raises(gr.Error, match="nothing to save"):
        save_conversation([], "", root=tmp_path)


def test_saves_go_to_gradio_s_cache_and_old_ones_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    old, recent = save_conversation(history, ""), save_conversation(history, "")
    assert saved_chats_folder() == tmp_path / "gradio" / "aksis-chat"
    assert old.parent.parent == recent.parent.parent == saved_chats_folder() and old != recent
    an_hour_ago = time.time() - SAVED_CHAT_TTL_S - 1
    os.utime(old.parent, (an_hour_ago, an_hour_ago))
    newest = save_conversation(history, "")
    assert not old.parent.exists()  # removed by the next save
    assert recent.is_file() and newest.is_file()  # still there to download
    assert sorted(p.name for p in saved_chats_folder().iterdir()) == sorted([recent.parent.name, newest.parent.name])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"format": "aksis-chat", "version": 1, "messages": [', "not valid JSON"),
        (b"\xff\xfe not text", "not UTF-8 text \\(byte 0xff at offset 0\\)"),
        ('{"messages": []}'.encode("utf-16"), "looks binary"),
        (b"[" * 200_000 + b"]" * 200_000, "not valid JSON \\(nested too deeply\\)"),
        (b" " * (MAX_CHAT_FILE_BYTES + 1), "upload.json is 1.0 MiB; the chat file may be at most 1 MiB"),
        (b'{"messages": []}', "not a chat this app can load: not an aksis chat file"),
        (
            b'{"format": "aksis-chat", "version": 1, "messages": [{"role": "wizard", "content": "x"}]}',
            "message 0",
        ),
    ],
    ids=["truncated", "not-utf8", "utf16", "nested", "huge", "not-a-chat", "bad-role"],
)
def test_loading_a_bad_file_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "upload.json"
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        load_conversation(str(path))
    with pytest.raises(gr.Error, match="No chat file uploaded"):
        load_conversation(None)


# ----- through the running app -----


def chat_args(source: str, system_prompt: str, seed: int | None) -> list[Any]:
    """/chat's inputs after the message, in order."""
    return [source, system_prompt, "precise", *SLIDERS.values(), seed]


def test_chat_api_replies_as_the_library_does_turn_after_turn(served_app: ServedApp, app_checkpoints: Path) -> None:
    client = served_app.client()
    source = str(app_checkpoints / "tiny-gpt2")  # not the model picked first
    first = client.predict("Hello", *chat_args(source, "Be brief.", 21), api_name="/chat")
    second = client.predict("And then?", *chat_args(source, "Be brief.", 21), api_name="/chat")

    conversation = Conversation("Be brief.")
    conversation.add("user", "Hello")
    assert first and first == library_reply(source, conversation, "precise", seed=21, **SLIDERS)
    conversation.add("user", "And then?")  # a client's calls continue one conversation
    assert second and second == library_reply(source, conversation, "precise", seed=21, **SLIDERS)
    downloaded = client.predict("Be brief.", api_name="/chat_save")
    assert Conversation.load(downloaded) == conversation
    # The server's copy is in the one folder that saves are cleaned from, not in a temporary folder of its own.
    assert [p.read_text() for p in saved_chats_folder().glob(f"*/{Path(downloaded).name}")] == [
        Path(downloaded).read_text()
    ]


def test_chat_api_says_a_client_s_calls_are_one_conversation(served_app: ServedApp) -> None:
    info = served_app.client().view_api(print_info=False, return_format="dict")
    description = info["named_endpoints"]["/chat"]["description"]
    assert "the calls of one client are one conversation" in description
    assert "new conversation per call" not in description


def test_chat_api_refuses_bad_input_clearly_and_keeps_serving(served_app: ServedApp, app_checkpoints: Path) -> None:
    client = served_app.client()
    source = str(app_checkpoints / "tiny-llama")
    limit = served_app.settings.max_new_tokens
    with pytest.raises(Exception, match="The message is empty"):
        client.predict("   ", *chat_args(source, "", 1), api_name="/chat")
    with pytest.raises(Exception, match=f"this app takes at most {MAX_PROMPT_CHARS:,}"):
        client.predict("a" * (MAX_PROMPT_CHARS + 1), *chat_args(source, "", 1), api_name="/chat")
    too_many = [source, "", "precise", 0.7, 50, 0.9, 1.0, limit + 1, 1]
    with pytest.raises(Exception, match=f"greater than maximum value {limit}"):  # the slider's own check
        client.predict("Hello", *too_many, api_name="/chat")
    with pytest.raises(Exception, match="Could not load the model"):
        client.predict("Hello", *chat_args("alice/no-such-model", "", 1), api_name="/chat")
    assert isinstance(client.predict("Hello", *chat_args(source, "", 1), api_name="/chat"), str)


def test_chat_api_loads_a_conversation_and_goes_on_from_it(
    served_app: ServedApp, app_checkpoints: Path, tmp_path: Path
) -> None:
    client = served_app.client()
    source = str(app_checkpoints / "tiny-llama")
    conversation = Conversation("You are a poet.")
    conversation.add("user", "Write a line")
    conversation.add("assistant", "The sea is wide.")
    conversation.save(tmp_path / "chat.json")

    history, system_prompt = client.predict(handle_file(str(tmp_path / "chat.json")), api_name="/chat_load")
    assert system_prompt == "You are a poet."
    assert [(m["role"], message_text(m["content"])) for m in history] == [
        ("user", "Write a line"),
        ("assistant", "The sea is wide."),
    ]
    (tmp_path / "bad.json").write_text('{"format": "aksis-chat", "version": 2}', encoding="utf-8")
    with pytest.raises(Exception, match="bad.json is not a chat this app can load: chat file version 2"):
        client.predict(handle_file(str(tmp_path / "bad.json")), api_name="/chat_load")

    answer = client.predict("Another", *chat_args(source, "You are a poet.", 4), api_name="/chat")
    conversation.add("user", "Another")  # the failed upload lost nothing: the chat goes on from the loaded one
    assert answer and answer == library_reply(source, conversation, "precise", seed=4, **SLIDERS)
    assert json.loads(Path(client.predict("You are a poet.", api_name="/chat_save")).read_text()) == (
        conversation.to_dict()
    )


def test_chat_preset_api_gives_the_models_defaults(served_app: ServedApp, app_checkpoints: Path) -> None:
    client = served_app.client()
    source = str(app_checkpoints / "tiny-llama")
    _, _, base = load_model(source, device="cpu")
    values = client.predict(source, CHECKPOINT_PRESET, api_name="/chat_preset")
    assert tuple(values) == preset_values(base, CHECKPOINT_PRESET, served_app.settings.max_new_tokens)
