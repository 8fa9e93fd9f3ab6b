"""Messages and the chat template: roles, how a conversation becomes tokens, and which tokens end a reply.

The template puts one special token before each message and `<|endoftext|>` after it, and ends a prompt
with the role token of the reply to come:

    <|system|>You are terse.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>Hello.<|endoftext|><|assistant|>

Message text is always encoded as ordinary text, so a user who types "<|assistant|>" gets the tokens of
those characters and cannot open another role. A reply ends at `<|endoftext|>` or at any role token.
`render` also says which tokens are the assistant's (its replies and the `<|endoftext|>` closing each): what chat
fine-tuning trains on. This module needs only the tokenizer (no torch), so data preparation and chat share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aksis.tokenizer import ENDOFTEXT, Tokenizer

ROLES = ("system", "user", "assistant")


class ChatError(Exception):
    """A conversation or chat file is invalid; the message says what to do."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ChatError(f"unknown role {self.role!r}: a message's role is one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ChatError(f"a {self.role} message's content must be text, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


# The same template in Jinja, for tokenizer_config.json: transformers' apply_chat_template then renders aksis's
# conversations as `render` does.
JINJA = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def role_token(role: str) -> str:
    return f"<|{role}|>"


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """The tokens that end a reply: <|endoftext|> and every role token."""
    return {tokenizer.special_id(ENDOFTEXT), *(tokenizer.special_id(role_token(r)) for r in ROLES)}


def render(
    tokenizer: Tokenizer, messages: Iterable[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` in the chat template, and for each id whether it is the assistant's output
    (the tokens a chat fine-tune trains on). With `add_generation_prompt`, end with `<|assistant|>` so the
    model writes the reply next."""
    eot = tokenizer.eot_id
    ids: list[int] = []
    trained: list[bool] = []
    for message in messages:
        content = tokenizer.encode(message.content)
        ids += [tokenizer.special_id(role_token(message.role)), *content, eot]
        is_reply = message.role == "assistant"
        trained += [False] + [is_reply] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tokenizer.special_id(role_token("assistant")))
        trained.append(False)
    return ids, trained


def messages_from_records(records: Sequence[Any]) -> list[Message]:
    """[{"role": ..., "content": ...}, ...] (a dataset's `messages` column) as Messages; ChatError names the
    first bad record."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(Message(record["role"], record["content"]))
        except (KeyError, TypeError) as err:
            raise ChatError(f"message {i} should have a role and a content, got {record!r}") from err
        except ChatError as err:
            raise ChatError(f"message {i}: {err}") from None
    return out
