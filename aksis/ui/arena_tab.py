"""The Arena tab: blind A/B human evaluation. Two models answer one prompt; the answers are shown as A and B
only; the visitor votes (A is better, B is better, tie, both are bad); the vote is recorded in the feedback log
and the models are revealed; a leaderboard counts the wins.

- Blind: the two models picked (model 1, model 2; by default two different models of the picker's choices,
  drawn at random) are assigned to A and B at random for each battle, and which is which stays server-side in
  the session's `Battle` (a gr.State) until the vote. Both answer with the same settings (a preset of
  `aksis.generation.SAMPLER_PRESETS` over the library defaults, the same max new tokens and seed, drawn by the
  server), so the vote compares
  the models, not their checkpoints' sampling defaults.
- Mode: "continue" continues the prompt as text (what a model trained on plain text does well); "chat" answers
  it as the user message of a new conversation (`aksis.chat.reply`), for chat fine-tuned models.
- One vote per battle: a second vote on the same answers is refused with a message; a new battle (press Answer
  again) can be voted on. Votes wait until both answers are complete.
- The vote record ("vote": battle id, model_a, model_b, winner a/b/tie/both-bad, prompt, answer_a, answer_b,
  mode, settings) goes to `ctx.feedback` (a JSONL file, and a Hub dataset when AKSIS_FEEDBACK_REPO is set).
  The leaderboard is the log's running tally (`FeedbackLog.standings`).

API (`gradio_client`; one client is one session, so a vote applies to that client's last battle):
- `/arena_answer` (prompt, model_1, model_2, mode, preset, max_new_tokens) -> (answer A, answer B, status); the seed
  is drawn by the server for each battle (a seed chosen by the visitor would let them tell the models apart)
- `/arena_vote` (winner: "a", "b", "tie" or "both-bad") -> (the reveal, the leaderboard)
- `/leaderboard` () -> the leaderboard (model, battles, wins, ties, losses, win rate)

Element ids (browser tests): arena-prompt, arena-answer, arena-model-1, arena-model-2, arena-random-pair,
arena-mode, arena-preset, arena-max-new-tokens, arena-answer-a, arena-answer-b, arena-vote-a,
arena-vote-b, arena-vote-tie, arena-vote-both-bad, arena-reveal, arena-leaderboard, arena-refresh.
"""

from __future__ import annotations

import random
import secrets
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import gradio as gr

from aksis.chat import Conversation, reply
from aksis.config import GenerationConfig
from aksis.generation import SAMPLER_PRESETS, sampler_config, stream
from aksis.ui.context import (
    AppContext,
    bound,
    check_prompt,
    echo,
    input_error,
    on_gpu,
    text_value,
    timed,
    to_max_new_tokens,
    to_seed,
    user_errors,
)
from aksis.ui.feedback import LEADERBOARD_COLUMNS, WINNERS, FeedbackLog
from aksis.ui.models import LoadedModel, ModelStore
from aksis.ui.sampling import Sampling, max_new_tokens_slider, takes_sampling

MODES = {"continue": "Continue the text", "chat": "Answer as a chat reply"}
VOTES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both-bad": "Both are bad"}
DEFAULT_PRESET = "balanced"
# What the tab offers, in the order of /arena_answer's parameters. No seed: a visitor who fixes the seed learns what
# each model writes with it and can tell A from B; the server draws one for every battle.
ARENA_SETTINGS = ("preset", "max_new_tokens")
DEFAULT_MAX_NEW_TOKENS = 64
HELP = (
    "Two models answer the same prompt; you see only **A** and **B**. Vote for the better answer and the models "
    "are revealed. Your prompt, both answers and your vote are recorded (without any account or address) to "
    "rank the models."
)
READY = "Which answer is better? Vote below; the models are revealed after your vote."
_vote_lock = threading.Lock()  # one vote per battle, also when two requests of a session race


@dataclass
class Battle:
    """One blind comparison: what was asked, which model is behind A and B, their answers, and the vote."""

    prompt: str
    mode: str
    models: tuple[str, str]  # (behind A, behind B)
    settings: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    answers: list[str] = field(default_factory=lambda: ["", ""])
    complete: bool = False  # both answers are written
    cut: list[str] = field(default_factory=list)  # the sides ("A", "B") whose answer the time limit ended
    winner: str | None = None  # set by the vote


def random_pair(choices: Sequence[str], rng: random.Random | None = None) -> tuple[str | None, str | None]:
    """Two different models of `choices` in random order (one model twice when there is only one; None when
    there are none)."""
    names = list(dict.fromkeys(choices))
    if len(names) < 2:
        first = names[0] if names else None
        return first, first
    a, b = (rng or random.SystemRandom()).sample(names, 2)
    return a, b


def arena_config(sampling: Sampling, limit: int) -> GenerationConfig:
    """The settings both models answer with (ARENA_SETTINGS): a preset over the library defaults (not either
    checkpoint's own)."""
    preset = sampling.preset or DEFAULT_PRESET
    if not isinstance(preset, str) or preset not in SAMPLER_PRESETS:
        raise input_error(f"unknown preset {echo(preset)}: choose one of {', '.join(SAMPLER_PRESETS)}")
    n = to_max_new_tokens(sampling.max_new_tokens, limit)
    with user_errors("use these settings"):
        return sampler_config(preset, GenerationConfig(), max_new_tokens=n, seed=to_seed(sampling.seed))


def new_battle(
    prompt: str | None,
    model_1: str | None,
    model_2: str | None,
    mode: str | None,
    config: GenerationConfig,
    *,
    swap: bool | None = None,
) -> Battle:
    """A battle of model 1 against model 2, assigned to A and B at random (`swap` fixes it, for tests). The prompt
    is at most MAX_PROMPT_CHARS characters (an API caller need not keep to the textbox)."""
    prompt = check_prompt(prompt)
    model_1, model_2 = text_value(model_1, "model 1").strip(), text_value(model_2, "model 2").strip()
    if not model_1 or not model_2:
        raise input_error("Pick two models to compare (model 1 and model 2, under 'Models and settings').")
    if model_1 == model_2:
        raise input_error("Pick two different models: a model compared with itself tells the leaderboard nothing.")
    mode = mode or "continue"
    if not isinstance(mode, str) or mode not in MODES:
        raise input_error(f"unknown mode {echo(mode)}: choose one of {', '.join(MODES)}")
    if swap is None:
        swap = random.SystemRandom().random() < 0.5
    models = (model_2, model_1) if swap else (model_1, model_2)
    return Battle(prompt, mode, models, config.to_dict())


@on_gpu
def answer_text(
    entry: LoadedModel, prompt: str, mode: str, config: GenerationConfig, ended: list[str] | None = None
) -> Iterator[str]:
    """One model's answer as it grows (each value is the text so far): the continuation of `prompt`, or in
    "chat" mode the reply to it as a user message (its last value without surrounding space, as a chat keeps it).
    How it ended (Completion.finish_reason) is appended to `ended` (not returned: a ZeroGPU wrapper would drop a
    generator's return value)."""
    text = ""
    with user_errors("answer"):
        if mode == "chat":
            conversation = Conversation()
            conversation.add("user", prompt)
            pieces: Iterator[str] = reply(entry.model, entry.tokenizer, conversation, config)
        else:
            text_stream = stream(entry.model, entry.tokenizer, prompt, config)
            pieces = iter(text_stream)
        while True:
            try:
                text += next(pieces)
            except StopIteration as done:
                completion = done.value if mode == "chat" else text_stream.completion
                break
            yield text
        if mode == "chat":
            yield conversation.messages[-1].content
    assert completion is not None  # set when the stream ends
    if ended is not None:
        ended.append(completion.finish_reason)


def run_battle(store: ModelStore, battle: Battle) -> Iterator[Battle]:
    """Write A's answer, then B's, yielding the battle as they grow; the last one is complete. An answer that ran
    out of the request's time is noted in `battle.cut`."""
    config = GenerationConfig.from_dict(battle.settings)
    for side, source in zip("AB", battle.models, strict=True):
        # The error names the model: a battle that fails is not voted on, so nothing blind is spoiled.
        with user_errors(f"load model {side}"):
            entry = store.get(source)
        ended: list[str] = []
        for text in answer_text(entry, battle.prompt, battle.mode, config, ended):
            battle.answers["AB".index(side)] = text
            yield battle
        if ended == ["time"]:
            battle.cut.append(side)
    battle.complete = True
    yield battle


def status_line(battle: Battle, seconds: float | None) -> str:
    """The status under the answers: answering, or ready for the vote (saying which answer the time limit cut)."""
    if not battle.complete:
        return "Answering…"
    if not battle.cut:
        return READY
    answers = f"answer{'s' if len(battle.cut) > 1 else ''} {' and '.join(battle.cut)}"
    return f"{READY} (This app's time limit per request, {seconds:g} s for each answer, cut {answers} short.)"


@takes_sampling(*ARENA_SETTINGS)
def answer_battle(
    store: ModelStore,
    limit: int,
    prompt: str,
    model_1: str | None,
    model_2: str | None,
    mode: str | None,
    sampling: Sampling,
) -> Iterator[tuple[str, str, Battle, str]]:
    """The `/arena_answer` event: both models' answers to `prompt`, labelled A and B only (which is which is
    revealed by the vote), with the session's battle and a status line. The models are named as the store names
    them (so `checkpoints/x/` and `checkpoints/x` are one model on the leaderboard), and the seed is the server's."""
    # The request's time is shared by the two answers.
    each = store.request_seconds / 2 if store.request_seconds is not None else None
    config = timed(arena_config(replace(sampling, seed=secrets.randbelow(2**31)), limit), each)
    model_1, model_2 = (store.canonical(m) if isinstance(m, str) and m.strip() else m for m in (model_1, model_2))
    battle = new_battle(prompt, model_1, model_2, mode, config)
    for state in run_battle(store, battle):
        yield state.answers[0], state.answers[1], state, status_line(state, each)


def winner_code(winner: str | None) -> str:
    """ "a", "b", "tie" or "both-bad" from a code or a vote button's label."""
    text = text_value(winner, "vote").strip()
    for code, label in VOTES.items():
        if text.lower() == code or text == label:
            return code
    raise input_error(f"unknown vote {echo(winner)}: vote one of {', '.join(WINNERS)}")


def vote(
    feedback: FeedbackLog, battle: Battle | None, winner: str | None, session: str | None = None
) -> dict[str, Any]:
    """Record the vote on `battle` (once) for `session` (the visitor's) and return the record."""
    code = winner_code(winner)
    if battle is None:
        raise input_error("There is nothing to vote on yet: write a prompt and press Answer.")
    if not battle.complete:
        raise input_error("Both answers are not written yet (still answering, or it failed): wait, or press Answer.")
    with _vote_lock:  # one vote per battle, even from two requests at once
        if battle.winner is not None:
            raise input_error(
                f"You already voted on this battle ({VOTES[battle.winner]}). Press Answer for a new one to vote again."
            )
        with user_errors("record the vote"):
            record = feedback.record(
                "vote",
                session=session,
                battle=battle.id,
                model_a=battle.models[0],
                model_b=battle.models[1],
                winner=code,
                prompt=battle.prompt,
                answer_a=battle.answers[0],
                answer_b=battle.answers[1],
                mode=battle.mode,
                settings=battle.settings,
            )
        battle.winner = code  # only once the vote is kept: a refused one can be cast again
    return record


def reveal(record: dict[str, Any]) -> str:
    """Markdown naming the models behind A and B, and the vote, from a vote record."""
    return (
        f"**A** was `{record['model_a']}`; **B** was `{record['model_b']}`. Your vote: **{VOTES[record['winner']]}**. "
        "Thank you! Write another prompt (or press Answer again) for a new battle."
    )


def leaderboard_table(feedback: FeedbackLog) -> dict[str, Any]:
    """The leaderboard of every vote so far, as gr.Dataframe takes it."""
    rows = feedback.standings()
    return {"headers": list(LEADERBOARD_COLUMNS), "data": [[row[c] for c in LEADERBOARD_COLUMNS] for row in rows]}


# ----- the tab -----


def build(ctx: AppContext) -> None:
    limit = ctx.settings.max_new_tokens
    choices = ctx.store.choices(ctx.settings.model)
    first, second = random_pair(choices)

    with gr.Tab("Arena", id="arena") as tab:
        gr.Markdown(HELP)
        if ctx.feedback.hub_error:
            gr.Markdown(f"Votes are kept on this machine only: {ctx.feedback.hub_error}.")
        with gr.Row(equal_height=True):
            prompt_box = gr.Textbox(label="Prompt", placeholder="e.g. ROMEO:", lines=2, scale=5, elem_id="arena-prompt")
            answer_button = gr.Button("Answer", variant="primary", scale=1, elem_id="arena-answer")
        with gr.Accordion("Models and settings", open=False):
            with gr.Row(equal_height=True):
                model_1_box = gr.Dropdown(
                    choices, value=first, allow_custom_value=True, label="Model 1", elem_id="arena-model-1"
                )
                model_2_box = gr.Dropdown(
                    choices, value=second, allow_custom_value=True, label="Model 2", elem_id="arena-model-2"
                )
                pair_button = gr.Button("Random pair", size="sm", elem_id="arena-random-pair")
            with gr.Row():
                mode_box = gr.Radio(
                    [(label, mode) for mode, label in MODES.items()],
                    value="continue",
                    label="Task",
                    elem_id="arena-mode",
                )
                preset_box = gr.Dropdown(
                    list(SAMPLER_PRESETS),
                    value=DEFAULT_PRESET,
                    label="Sampling preset (both models)",
                    elem_id="arena-preset",
                )
                max_new_slider = max_new_tokens_slider("arena", min(DEFAULT_MAX_NEW_TOKENS, limit), limit)
        with gr.Row():
            answer_a = gr.Textbox(label="A", lines=8, interactive=False, elem_id="arena-answer-a")
            answer_b = gr.Textbox(label="B", lines=8, interactive=False, elem_id="arena-answer-b")
        with gr.Row():
            vote_buttons = [
                gr.Button(label, interactive=False, elem_id=f"arena-vote-{code}") for code, label in VOTES.items()
            ]
        status = gr.Markdown(elem_id="arena-reveal")
        gr.Markdown("### Leaderboard")
        board = gr.Dataframe(
            value=lambda: leaderboard_table(ctx.feedback),
            headers=list(LEADERBOARD_COLUMNS),
            interactive=False,
            elem_id="arena-leaderboard",
        )
        refresh_button = gr.Button("Refresh leaderboard", size="sm", elem_id="arena-refresh")
        battle_state = gr.State(None)  # this session's Battle: which model is A and which is B stays here
        # The API's vote endpoint: the four buttons each vote one way; this takes the way as an input.
        winner_box = gr.Textbox(visible=False)
        vote_api_button = gr.Button(visible=False)

    def votable(battle: Battle | None) -> list[Any]:
        ready = battle is not None and battle.complete and battle.winner is None
        return [gr.Button(interactive=ready) for _ in vote_buttons]

    def cast_vote(
        winner: str, battle: Battle | None, request: gr.Request | None = None
    ) -> tuple[str, Battle | None, dict[str, Any]]:
        """Record the vote on this session's battle; reveal the models and the updated leaderboard."""
        record = vote(ctx.feedback, battle, winner, request.session_hash if request else None)
        return reveal(record), battle, leaderboard_table(ctx.feedback)

    triggers = [answer_button.click, prompt_box.submit]
    gr.on(triggers, lambda: votable(None), None, vote_buttons, api_visibility="private", queue=False)
    controls = dict(preset=preset_box, max_new_tokens=max_new_slider)
    gr.on(
        triggers,
        partial(answer_battle, ctx.store, limit),  # the API's parameters: answer_battle's own after these two
        [prompt_box, model_1_box, model_2_box, mode_box, *(controls[name] for name in ARENA_SETTINGS)],
        [answer_a, answer_b, battle_state, status],
        api_name="arena_answer",
    ).then(votable, battle_state, vote_buttons, api_visibility="private", queue=False)

    outputs = [status, battle_state, board]
    for code, button in zip(VOTES, vote_buttons, strict=True):
        button.click(bound(cast_vote, code), battle_state, outputs, api_visibility="private").then(
            votable, battle_state, vote_buttons, api_visibility="private", queue=False
        )
    vote_api_button.click(cast_vote, [winner_box, battle_state], outputs, api_name="arena_vote")

    refresh_button.click(lambda: leaderboard_table(ctx.feedback), None, board, api_name="leaderboard")

    def offer_models(model_1: str | None, model_2: str | None) -> tuple[Any, Any]:
        """Opening the tab lists the models there are now (a run trained meanwhile, say), keeping the pair."""
        names = ctx.store.choices(ctx.settings.model)
        if not model_1 or not model_2:
            model_1, model_2 = random_pair(names)
        return (
            gr.Dropdown(choices=names, value=model_1, allow_custom_value=True),
            gr.Dropdown(choices=names, value=model_2, allow_custom_value=True),
        )

    tab.select(offer_models, [model_1_box, model_2_box], [model_1_box, model_2_box], api_visibility="private")

    def shuffle() -> tuple[str | None, str | None]:
        return random_pair(ctx.store.choices(ctx.settings.model))

    pair_button.click(shuffle, None, [model_1_box, model_2_box], api_visibility="private")
