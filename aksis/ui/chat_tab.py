"""The Chat tab: a `gr.ChatInterface` over `aksis.chat`, replies streamed, with a system prompt, sampler settings,
like/dislike feedback on replies, and the conversation saved and loaded as the JSON of `aksis chat-with-model
--context-file` (`aksis.chat.Conversation`).

- Each turn rebuilds a `Conversation` from the chat history (the system prompt, then the user and assistant
  messages; a user message left without a reply, because it failed or was stopped before any text, is dropped,
  as the CLI drops a message it could not answer) and streams `aksis.chat.reply` into it. The prompt gets the
  token budget the CLI gives it: the model's context less the room kept for the reply (oldest exchanges are
  dropped first; see `Conversation.prompt_ids`).
- Sampling: a preset ("checkpoint defaults" or one of `aksis.generation.SAMPLER_PRESETS`) fills the sliders; the sliders
  are what is used, through `sampler_config` on top of the checkpoint's defaults (its stop strings stay). A blank
  or negative seed samples freshly; a seed makes a turn reproducible (`reply` offsets it by the turn).
- Like/dislike: the Chatbot's `.like` event records "like", "dislike" (or "retract", when a thumb is taken back)
  in the feedback log with the model that wrote the reply, its settings, the prompt and the conversation it
  answered. All of it is what the server kept when it wrote the reply (a gr.State by message index, the session's
  newest MAX_KEPT_REPLIES): a thumb names a reply, and the text a client sends with it is never recorded, so
  switching models mid-chat still credits the right one and a client cannot write its own text into the log. A
  reply the app did not write (one loaded from a file) cannot be rated; a session rates at most
  `feedback.RATE` replies a minute.
- Save/load: "Save conversation" writes the chat as aksis-chat JSON for download, in Gradio's cache folder, where
  it stays an hour (each save removes older ones); "Load conversation" reads one back (at most
  MAX_CHAT_FILE_BYTES). A file that is not a chat this app can load is a gr.Error and the current chat stays as
  it was.
- Length: a message, and the system prompt, are at most `MAX_PROMPT_CHARS` characters (checked on the server).

API (`gradio_client`):
- `/chat` (message, model, system_prompt, preset, temperature, top_k, top_p, repetition_penalty,
  max_new_tokens, seed) -> the reply: with a seed, equal to what `aksis.chat.reply` writes for the same model and
  `sampler_config(preset, checkpoint defaults, ...)`. The calls of one client are one conversation, turn after
  turn (the session keeps it, as the browser's chat does); a new client starts a new one.
- `/chat_save` (system_prompt) -> the aksis-chat JSON file of this session's chat;
  `/chat_load` (file) -> (chat messages, system prompt), which the next `/chat` goes on from;
  `/chat_preset` (model, preset) -> the values the preset puts in the sliders.

Element ids (browser tests): chat-history (the Chatbot), chat-input (the message box), chat-system-prompt,
chat-preset, chat-temperature, chat-top-k, chat-top-p, chat-repetition-penalty, chat-max-new-tokens, chat-seed,
chat-save, chat-file (the saved file, for download), chat-load (upload button), chat-clear.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from aksis.chat import Conversation, prompt_budget, reply
from aksis.chat_template import ChatError
from aksis.config import GenerationConfig
from aksis.generation import sampler_config
from aksis.ui.context import (
    AppContext,
    check_prompt,
    input_error,
    on_gpu,
    out_of_time,
    quietly_get,
    read_text_upload,
    text_value,
    timed,
    to_max_new_tokens,
    to_number,
    to_seed,
    to_whole,
    user_errors,
)
from aksis.ui.feedback import FeedbackLog
from aksis.ui.inputs import number, textbox
from aksis.ui.models import LoadedModel, ModelStore
from aksis.ui.sampling import (
    CHECKPOINT_PRESET,
    PRESET_CHOICES,
    Sampling,
    SliderValues,
    max_new_tokens_slider,
    preset_config,
    preset_name,
    sampling_slider,
    slider_values,
    takes_sampling,
)

# A chat file holds text a small model can read in its context: a megabyte is far more than any real one, and
# small enough that reading it cannot hold a worker.
MAX_CHAT_FILE_BYTES = 1 << 20
# How long a saved chat stays on the server for download; each save removes those older (see `remove_old_saves`).
SAVED_CHAT_TTL_S = 3600
HELP = (
    "Chat with the picked model (its replies are sampled token by token and streamed). A model trained on plain "
    "text rather than conversations still answers, in its own way. The thumbs under a reply record your "
    "feedback, with the conversation, to improve the models."
)

# The sampling settings the tab offers, in the order of its controls (and of /chat's parameters).
CHAT_SETTINGS = ("preset", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed")
# Per reply: which model wrote it, with which settings, answering which conversation (see `reply_info`).
ReplyInfo = dict[int, dict[str, Any]]
MAX_KEPT_REPLIES = 200  # the replies of a session that can still be rated (older ones are forgotten)


# ----- the conversation -----


def message_text(content: Any) -> str:
    """The text of a chat message's content as Gradio hands it over: a string, or (Gradio 6 normalises messages)
    a list of parts, of which the {"type": "text", "text": ...} ones hold text. Files and components have none."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list | tuple):
        return "".join(
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") == "text")
        )
    return ""


def conversation_from_history(
    history: Sequence[Any], system_prompt: str | None = "", replies: ReplyInfo | None = None
) -> Conversation:
    """The `Conversation` that the chat history shows: its user and assistant messages after the system prompt.
    User messages that are empty, or that got no reply before the next user message (or the end), are left out.

    The Chatbot shows a reply through `inspect.cleandoc` (tabs expanded, common indentation removed), and the
    browser sends back what it shows; `replies` (by message index) holds the replies as the model wrote them,
    which are used instead where they still read the same (a reply edited in the browser stays as edited)."""
    messages = []
    for index, message in enumerate(history or []):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue
        text = message_text(message.get("content"))
        written = (replies or {}).get(index, {}).get("reply")
        if message["role"] == "assistant" and isinstance(written, str):
            text = written if inspect.cleandoc(written) == inspect.cleandoc(text) else text
        if message["role"] == "user" and not text.strip():
            continue
        messages.append((message["role"], text))
    conversation = Conversation((system_prompt or "").strip())
    for i, (role, text) in enumerate(messages):
        answered = i + 1 < len(messages) and messages[i + 1][0] == "assistant"
        if role == "assistant" or answered:
            conversation.add(role, text)
    return conversation


def history_from_conversation(conversation: Conversation) -> list[dict[str, str]]:
    """Chat messages for the Chatbot ({"role", "content"} dicts; the system prompt goes to its own box)."""
    return [m.to_dict() for m in conversation.messages]


# ----- sampling settings -----


def sampling_config(base: GenerationConfig, sampling: Sampling, limit: int) -> GenerationConfig:
    """The GenerationConfig of the tab's settings (CHAT_SETTINGS): `sampler_config(preset, base, ...sliders)`. The
    sliders are applied over the preset (a preset only fills them); max new tokens must be 1 to `limit` (the app's
    limit); a blank or negative seed means unseeded. Bad settings raise gr.Error with what would be accepted."""
    preset = preset_name(sampling.preset)
    n = to_max_new_tokens(sampling.max_new_tokens, limit)
    given: dict[str, Any] = {
        "temperature": to_number(sampling.temperature, "temperature"),
        "top_k": to_whole(sampling.top_k, "top-k"),
        "top_p": to_number(sampling.top_p, "top-p"),
        "repetition_penalty": to_number(sampling.repetition_penalty, "repetition penalty"),
        "max_new_tokens": n,
        "num_beams": 1,  # a chat streams its replies; beam search has its text only at the end
    }
    seed_value = to_seed(sampling.seed)  # checked before any work
    with user_errors("use these settings"):
        config = sampler_config(None if preset == CHECKPOINT_PRESET else preset, base, **given)
    # Unseeded means fresh draws every turn, even from a checkpoint that saved a seed among its defaults.
    return replace(config, seed=seed_value)


def preset_values(base: GenerationConfig, preset: str | None, limit: int) -> SliderValues:
    """What a preset puts in the sliders: (temperature, top_k, top_p, repetition_penalty, max_new_tokens), within
    the sliders' ranges. "checkpoint defaults" is `base`, the checkpoint's generation_config.json."""
    return slider_values(preset_config(base, preset), limit)


def model_defaults(store: ModelStore, limit: int, source: str | None, preset: str | None) -> SliderValues | None:
    """On a model switch: the new model's defaults when those are what the sliders show ("checkpoint defaults");
    None, to leave the sliders alone, under another preset or when the model cannot be loaded (quietly: the
    picker's own load event says why)."""
    if preset not in (None, CHECKPOINT_PRESET):
        return None
    entry = quietly_get(store, source)
    return None if entry is None else preset_values(entry.generation, CHECKPOINT_PRESET, limit)


# ----- replies -----


@on_gpu
def stream_reply(entry: LoadedModel, conversation: Conversation, config: GenerationConfig) -> Iterator[str]:
    """The reply to the conversation's newest user message as it grows (each value is the text so far); the
    last value is the reply as `aksis.chat.reply` adds it to the conversation (without surrounding space)."""
    text = ""
    with user_errors("reply"):
        pieces = reply(entry.model, entry.tokenizer, conversation, config)
        while True:
            try:
                text += next(pieces)
            except StopIteration as done:
                completion = done.value
                break
            yield text
    if completion.finish_reason == "time":
        gr.Warning(f"{out_of_time(config.max_time)} The reply is cut short.")
    yield conversation.messages[-1].content


def reply_info(source: str, seen: Conversation, config: GenerationConfig) -> dict[str, Any]:
    """What is kept about a reply while it is written (its text, as "reply", is added as it grows): the model, the
    settings, and `seen`, the conversation as the model saw it (within its context: bounded, however long the chat)."""
    return {"model": source, "settings": config.to_dict(), "seen": seen}


@takes_sampling(*CHAT_SETTINGS)
def respond(
    store: ModelStore,
    limit: int,
    message: Any,
    history: Sequence[Any],
    model: str | None,
    system_prompt: str | None,
    sampling: Sampling,
    replies: ReplyInfo | None,
) -> Iterator[tuple[str, ReplyInfo]]:
    """The `/chat` event: stream the model's reply to `message`, after the chat so far, with the session's
    ReplyInfo updated as it grows. The texts are checked before the model is fetched: a message, and a system
    prompt where given, of at most MAX_PROMPT_CHARS characters (an API caller need not keep to the textbox)."""
    message = check_prompt(message, "message")
    system_prompt = text_value(system_prompt, "system prompt")
    if system_prompt.strip():
        check_prompt(system_prompt, "system prompt")
    with user_errors("load the model"):
        entry = store.get(model)
    config = timed(sampling_config(entry.generation, sampling, limit), store.request_seconds)
    with user_errors("read the chat"):
        conversation = conversation_from_history(history, system_prompt, replies)
        conversation.add("user", message)
        seen = conversation.window(entry.tokenizer, prompt_budget(entry.model, config))
    # The ChatInterface shows the message at len(history) and the reply right after it.
    index, about = len(history) + 1, reply_info(entry.source, seen, config)
    kept = {i: info for i, info in (replies or {}).items() if i != index}
    kept = dict(sorted(kept.items())[-(MAX_KEPT_REPLIES - 1) :])
    for text in stream_reply(entry, conversation, config):
        yield text, {**kept, index: {**about, "reply": text}}


def record_feedback(
    feedback: FeedbackLog,
    replies: ReplyInfo | None,
    index: int | Sequence[int],
    liked: bool | str | None,
    session: str | None = None,
) -> dict[str, Any]:
    """Record a like (`liked` True), a dislike (False) or its retraction (anything else: the thumb was clicked
    again) of the reply at `index` of the chat, for `session`; returns the record. Everything recorded is what the
    server kept when it wrote the reply (`replies`): the model, its settings, the conversation it answered, then the
    reply. A reply it did not write, or no longer keeps, is refused."""
    if isinstance(index, list | tuple) and index:  # a Chatbot in tuples format would give (row, column)
        index = index[0]
    info = (replies or {}).get(index) if isinstance(index, int) else None
    if info is None or not isinstance(info.get("seen"), Conversation):
        raise input_error(
            "Only the model's replies written in this chat can be liked or disliked (not a reply loaded from a file, "
            f"nor one older than the newest {MAX_KEPT_REPLIES})."
        )
    answered: Conversation = info["seen"]
    conversation = Conversation(answered.system_prompt, [*answered.messages])
    conversation.add("assistant", info.get("reply", ""))
    kind = "like" if liked is True else "dislike" if liked is False else "retract"
    with user_errors("record your feedback"):
        return feedback.record(
            kind,
            session=session,
            model=info.get("model"),
            prompt=answered.messages[-1].content,
            reply=conversation.messages[-1].content,
            conversation=conversation.to_dict(),
            settings=info.get("settings"),
        )


# ----- saving and loading -----


def saved_chats_folder() -> Path:
    """Where saved chats go: a folder in Gradio's own cache (GRADIO_TEMP_DIR), whose files Gradio serves as they
    are instead of copying them into it."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()) / "aksis-chat"


def remove_old_saves(root: Path, max_age_s: float = SAVED_CHAT_TTL_S) -> None:
    """Remove the saves under `root` (one folder each) last written more than `max_age_s` seconds ago."""
    cutoff = time.time() - max_age_s
    for save in root.iterdir():
        try:
            if save.stat().st_mtime < cutoff:
                if save.is_dir():
                    shutil.rmtree(save)
                else:
                    save.unlink()
        except OSError:
            continue  # removed meanwhile, by a save of another session


def save_conversation(
    history: Sequence[Any], system_prompt: str | None, replies: ReplyInfo | None = None, root: Path | None = None
) -> Path:
    """Write the chat as an aksis-chat JSON file (what `Conversation.load` and `aksis chat-with-model
    --context-file` read) in a new folder under `root` (default: `saved_chats_folder()`), and return its path.
    Saves older than SAVED_CHAT_TTL_S are removed first, so the saves of a long-running app do not pile up."""
    conversation = conversation_from_history(history, system_prompt, replies)
    if not conversation.messages and not conversation.system_prompt:
        raise input_error("There is nothing to save yet: chat first (or write a system prompt).")
    root = Path(root) if root is not None else saved_chats_folder()
    with user_errors("save the conversation"):
        root.mkdir(parents=True, exist_ok=True)
        remove_old_saves(root)
        # A folder per save: the file keeps a readable name, and two saves in the same second do not collide.
        path = Path(tempfile.mkdtemp(dir=root)) / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
        conversation.save(path)
    return path


def load_conversation(path: str | Path | None) -> Conversation:
    """Read an aksis-chat JSON file (an upload); a file too large, not UTF-8 text, not JSON or not a chat is a
    gr.Error that says which."""
    text = read_text_upload(path, "chat file", MAX_CHAT_FILE_BYTES)
    name = Path(str(path)).name
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise input_error(f"{name} is not valid JSON ({reason}): upload a chat .json file.") from None
    try:
        return Conversation.from_dict(data)
    except ChatError as err:
        raise input_error(f"{name} is not a chat this app can load: {err}.") from None


# ----- the tab -----


def build(ctx: AppContext) -> None:
    limit = ctx.settings.max_new_tokens
    start = preset_values(GenerationConfig(), CHECKPOINT_PRESET, limit)

    with gr.Tab("Chat", id="chat"):
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                system_box = gr.Textbox(
                    label="System prompt",
                    placeholder="e.g. You are a helpful assistant who answers briefly.",
                    lines=3,
                    elem_id="chat-system-prompt",
                )
                with gr.Accordion("Sampling", open=False):
                    preset_box = gr.Dropdown(
                        PRESET_CHOICES,
                        value=CHECKPOINT_PRESET,
                        label="Preset (fills the sliders)",
                        elem_id="chat-preset",
                    )
                    temperature_slider = sampling_slider("temperature", "chat", start.temperature)
                    top_k_slider = sampling_slider("top_k", "chat", start.top_k)
                    top_p_slider = sampling_slider("top_p", "chat", start.top_p)
                    penalty_slider = sampling_slider("repetition_penalty", "chat", start.repetition_penalty)
                    max_new_slider = max_new_tokens_slider(
                        "chat", start.max_new_tokens, limit, label="Max new tokens per reply"
                    )
                    seed_box = number(value=None, precision=0, label="Seed (blank: random)", elem_id="chat-seed")
                reply_state = gr.State({})  # ReplyInfo of this session's chat

            with gr.Column(scale=3):
                controls = dict(
                    preset=preset_box,
                    temperature=temperature_slider,
                    top_k=top_k_slider,
                    top_p=top_p_slider,
                    repetition_penalty=penalty_slider,
                    max_new_tokens=max_new_slider,
                    seed=seed_box,
                )
                chat = gr.ChatInterface(
                    partial(respond, ctx.store, limit),  # the API's parameters: respond's own after these two
                    chatbot=gr.Chatbot(label="Chat", height=480, elem_id="chat-history", buttons=["copy", "copy_all"]),
                    textbox=textbox(
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        submit_btn=True,
                        stop_btn=True,
                        autofocus=False,
                        elem_id="chat-input",
                    ),
                    additional_inputs=[ctx.picker, system_box, *(controls[n] for n in CHAT_SETTINGS), reply_state],
                    additional_outputs=[reply_state],
                    api_name="chat",
                    api_description=(
                        "The model's reply to a message, after this client's earlier messages and replies: the calls "
                        "of one client are one conversation (a new client starts a new one; /chat_load replaces it)."
                    ),
                    fill_height=False,
                )
                with gr.Row():
                    save_button = gr.Button("Save conversation", elem_id="chat-save", size="sm")
                    load_button = gr.UploadButton(
                        "Load conversation", file_types=[".json"], type="filepath", elem_id="chat-load", size="sm"
                    )
                    clear_button = gr.Button("Clear", elem_id="chat-clear", size="sm")
                saved_file = gr.File(
                    label="Saved conversation (aksis-chat JSON, for aksis chat-with-model --context-file)",
                    interactive=False,
                    height=80,
                    elem_id="chat-file",
                )

        def fill_sliders(model: str | None, preset: str | None) -> tuple[float, int, float, float, int]:
            """The sliders' values for a preset ("checkpoint defaults": the picked model's own settings)."""
            base = GenerationConfig()
            if preset in (None, CHECKPOINT_PRESET):
                with user_errors("load the model"):
                    base = ctx.store.get(model).generation
            return preset_values(base, preset, limit)

        def new_model(model: str | None, preset: str | None) -> Any:
            values = model_defaults(ctx.store, limit, model, preset)
            return [gr.skip()] * len(sliders) if values is None else values

        sliders = [temperature_slider, top_k_slider, top_p_slider, penalty_slider, max_new_slider]
        preset_box.input(fill_sliders, [ctx.picker, preset_box], sliders, api_name="chat_preset")
        # No triggers: when the page opens and whenever the model (or preset) changes.
        gr.on(None, new_model, [ctx.picker, preset_box], sliders, api_visibility="private")

        def like(replies: ReplyInfo | None, data: gr.LikeData, request: gr.Request) -> None:
            record_feedback(ctx.feedback, replies, data.index, data.liked, request.session_hash)

        chat.chatbot.like(like, reply_state, None, api_visibility="private")

        def save(history: list[dict[str, Any]], system_prompt: str | None, replies: ReplyInfo | None) -> str:
            return str(save_conversation(history, text_value(system_prompt, "system prompt"), replies))

        save_button.click(save, [chat.chatbot_state, system_box, reply_state], saved_file, api_name="chat_save")

        def load(file: str | None) -> tuple[list[dict[str, str]], list[dict[str, str]], str, ReplyInfo]:
            conversation = load_conversation(file)
            history = history_from_conversation(conversation)
            gr.Info(f"Loaded {len(history)} messages.")
            return history, history, conversation.system_prompt, {}

        # The chat's own state (what the next turn reads) is set with what it shows.
        load_button.upload(
            load, load_button, [chat.chatbot, chat.chatbot_state, system_box, reply_state], api_name="chat_load"
        )
        clear_button.click(
            lambda: ([], [], {}, None),
            None,
            [chat.chatbot, chat.chatbot_state, reply_state, saved_file],
            api_visibility="private",
        )
        chat.chatbot.clear(lambda: {}, None, reply_state, api_visibility="private")
