"""Conversations: the messages so far, token-budget truncation, JSON persistence, and streamed replies.

The messages are rendered with the tokenizer's chat format (aksis.jinja_template.render_chat: aksis's own template,
or a pretrained model's Jinja one). When a conversation outgrows the token budget, whole exchanges are dropped oldest
first; the system prompt and the newest user message are always kept.

`reply` streams the model's answer to the newest user message and adds it to the conversation. Its prompt
may use the budget (default: the model's context) less the room kept for the reply:
min(max_new_tokens, budget // 4) tokens.

A conversation saves to a small versioned JSON file:

    {"format": "aksis-chat", "version": 1, "system_prompt": "...", "messages": [{"role": ..., "content": ...}]}
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aksis.chat_template import ChatError, Message, render
from aksis.config import GenerationConfig
from aksis.generation import Completion, stream
from aksis.jinja_template import chat_stop_ids, model_chat, render_chat
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

FILE_FORMAT = "aksis-chat"
FILE_VERSION = 1


@dataclass
class Conversation:
    """A system prompt (may be empty) and the user / assistant messages that follow it."""

    system_prompt: str = ""
    messages: list[Message] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        if role == "system":
            raise ChatError("set the system prompt through Conversation.system_prompt, not as a message")
        self.messages.append(Message(role, content))

    def reset(self) -> None:
        """Forget the messages; keep the system prompt."""
        self.messages.clear()

    def all_messages(self) -> list[Message]:
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        return system + self.messages

    def prompt_ids(self, tokenizer: Tokenizer, budget: int) -> list[int]:
        """The prompt for the next reply, at most `budget` tokens: whole exchanges are dropped oldest first,
        never the system prompt or the newest user message. Raises ChatError when those two alone are over."""
        return self._window(tokenizer, budget)[1]

    def window(self, tokenizer: Tokenizer, budget: int) -> Conversation:
        """The conversation that `prompt_ids(tokenizer, budget)` renders: the system prompt and the messages kept."""
        return Conversation(self.system_prompt, self.messages[self._window(tokenizer, budget)[0] :])

    def _window(self, tokenizer: Tokenizer, budget: int) -> tuple[int, list[int]]:
        """The first message kept within `budget`, and the prompt's ids.

        Each message is rendered once (the template renders messages one after another), and exchanges are dropped by
        subtracting their lengths: linear in the length of the conversation, however long a loaded chat file is."""
        if model_chat(tokenizer) is not None:
            return self._window_by_search(tokenizer, budget)
        system = self.all_messages()[: 1 if self.system_prompt else 0]
        head, _ = render(tokenizer, system)
        pieces = [render(tokenizer, [m])[0] for m in self.messages]
        tail, _ = render(tokenizer, [], add_generation_prompt=True)  # the role token the reply starts after
        total = len(head) + sum(len(p) for p in pieces) + len(tail)
        first = 0  # the first message kept
        for start in [i for i, m in enumerate(self.messages) if m.role == "user"][1:]:
            if total <= budget:
                break
            total -= sum(len(p) for p in pieces[first:start])  # the oldest exchange: a user message and its replies
            first = start
        if total > budget:
            raise ChatError(
                f"the system prompt and your message take {total} tokens, more than the {budget} this chat "
                "can give a prompt: write a shorter message (or system prompt)"
            )
        return first, head + [token for piece in pieces[first:] for token in piece] + tail

    def _window_by_search(self, tokenizer: Tokenizer, budget: int) -> tuple[int, list[int]]:
        """`_window` for a pretrained model's Jinja template, which renders a conversation as a whole (a default
        system prompt, say), not message by message: a binary search over where the kept messages start, rendering
        the conversation O(log n) times."""
        system = self.all_messages()[: 1 if self.system_prompt else 0]
        starts = [0, *[i for i, m in enumerate(self.messages) if m.role == "user"][1:]]

        def prompt(start: int) -> list[int]:
            return render_chat(tokenizer, system + self.messages[start:], add_generation_prompt=True)[0]

        low, high = 0, len(starts) - 1  # the answer is the first start whose prompt fits
        newest = prompt(starts[high])
        if len(newest) > budget:
            raise ChatError(
                f"the system prompt and your message take {len(newest)} tokens, more than the {budget} this chat "
                "can give a prompt: write a shorter message (or system prompt)"
            )
        best = (starts[high], newest)
        while low < high:
            mid = (low + high) // 2
            ids = prompt(starts[mid])
            if len(ids) <= budget:
                best, high = (starts[mid], ids), mid
            else:
                low = mid + 1
        return best

    # ----- persistence -----

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "system_prompt": self.system_prompt,
            "messages": [m.to_dict() for m in self.messages],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ChatError(f'not an aksis chat file (it should be a JSON object with "format": "{FILE_FORMAT}")')
        if data.get("version") != FILE_VERSION:
            raise ChatError(
                f"chat file version {data.get('version')!r} is not supported (this aksis reads {FILE_VERSION})"
            )
        system_prompt, messages = data.get("system_prompt", ""), data.get("messages")
        if not isinstance(system_prompt, str) or not isinstance(messages, list):
            raise ChatError('"system_prompt" must be text and "messages" a list')
        parsed = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] == "system":
                raise ChatError(f'message {i} must be {{"role": "user" or "assistant", "content": "..."}}, got {m!r}')
            try:
                parsed.append(Message(m["role"], m["content"]))
            except ChatError as err:
                raise ChatError(f"message {i}: {err}") from None
        return cls(system_prompt, parsed)

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-save leaves the previous file intact."""
        path = Path(path).expanduser()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):  # there may be no temporary file, or no folder to hold one
                tmp.unlink(missing_ok=True)
            raise ChatError(f"cannot save the conversation to {path}: {err}; give a file path you can write") from err

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ChatError(f"no chat file at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ChatError(f"cannot read the chat file {path}: {err}. Fix or move it; it was left untouched") from err
        try:
            return cls.from_dict(data)
        except ChatError as err:
            raise ChatError(f"{path}: {err}. Fix or move the file; it was left untouched") from err


def prompt_budget(model: GPT, config: GenerationConfig, budget: int | None = None) -> int:
    """The tokens a reply's prompt may take: `budget` (at most, and by default, the model's context) less the room
    kept for the reply, min(max_new_tokens, budget // 4)."""
    budget = min(budget or model.config.block_size, model.config.block_size)
    return budget - min(config.max_new_tokens, budget // 4)


def reply(
    model: GPT,
    tokenizer: Tokenizer,
    conversation: Conversation,
    config: GenerationConfig | None = None,
    *,
    budget: int | None = None,
) -> Generator[str, None, Completion]:
    """Stream the reply to the conversation's newest user message, piece by piece; when the stream is read
    to its end, the reply (without surrounding whitespace) is added to the conversation as an assistant message,
    and the generator returns the Completion (how the reply ended: `finish_reason`).
    A `config.seed` is offset by the number of messages, so each turn draws differently, reproducibly."""
    if not conversation.messages or conversation.messages[-1].role != "user":
        raise ChatError("the conversation must end with a user message to reply to")
    config = config or GenerationConfig()
    if config.seed is not None:  # reproducible, yet not the same random draws at every turn
        config = replace(config, seed=config.seed + len(conversation.messages))
    prompt = conversation.prompt_ids(tokenizer, prompt_budget(model, config, budget))
    text_stream = stream(model, tokenizer, prompt, config, stop_ids=chat_stop_ids(tokenizer))
    yield from text_stream
    assert text_stream.completion is not None
    conversation.add("assistant", text_stream.completion.text.strip())
    return text_stream.completion
