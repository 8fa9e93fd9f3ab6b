"""The Generate tab: continue a prompt with any sampler, watch the text stream in, then see every generated token
coloured by how likely the model found it, with the alternatives it considered.

- Settings: a sampler ("sample" uses temperature, top-k and top-p together, as the checkpoints' defaults do; the
  others are `aksis.generation.SAMPLERS`), its sliders, max new tokens (at most the app's limit) and a seed
  (blank or negative: a random one, shown in the stats line so the output can be reproduced). The sliders a
  sampler does not read are greyed out. `generation_config` turns them into a `GenerationConfig` through
  `sampler_config`, on top of the checkpoint's own defaults (its stop strings and length penalty stay).
- Presets: the checkpoint's generation_config.json or one of `aksis.generation.SAMPLER_PRESETS`. Picking a model or a
  preset fills the sampler and the sliders (a model switch thus also resets tweaked sliders to the preset).
- Output: the text streams in (beam search shows its text once, at the end); then the token view (HTML spans,
  coloured by probability, the alternatives in a tooltip), a token table and a stats line. Probabilities are
  the model's own (`token_probabilities`: softmax at temperature 1, before any sampler reshapes them).

API (`gradio_client`):
- `/generate` (source, prompt, sampler, temperature, top_k, top_p, num_beams, repetition_penalty,
  max_new_tokens, seed) -> (continuation, token view HTML, token table, stats). The continuation is the generated
  text alone, without the prompt: with a seed it equals `aksis.generation.generate(...).text` for the same
  settings (beam search: `beam_search(...)[0].text`). The prompt is at most `MAX_PROMPT_CHARS` characters, the
  beam width 2 to `MAX_BEAMS`, max new tokens 1 to the app's limit, all checked on the server (an API caller
  need not keep to the sliders).
- `/generation_preset` (source, preset) -> (sampler, temperature, top_k, top_p, num_beams, repetition_penalty,
  max_new_tokens): the settings a preset puts in the sliders.

Element ids (browser tests): generate-prompt, generate-button, generate-stop, generate-preset, generate-sampler,
generate-temperature, generate-top-k, generate-top-p, generate-beams, generate-repetition-penalty,
generate-max-new-tokens, generate-seed, generate-output, generate-stats, generate-tokens, generate-token-table.
"""

from __future__ import annotations

import html
import secrets
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import gradio as gr

from aksis.config import GenerationConfig
from aksis.generation import (
    DEFAULT_BEAM_WIDTH,
    SAMPLERS,
    Completion,
    TokenProb,
    sampler_config,
    stream,
    token_probabilities,
)
from aksis.ui.context import (
    AppContext,
    check_prompt,
    echo,
    input_error,
    on_gpu,
    quietly_get,
    timed,
    to_max_new_tokens,
    to_number,
    to_seed,
    to_whole,
    user_errors,
)
from aksis.ui.inputs import number, slider
from aksis.ui.models import LoadedModel, ModelStore
from aksis.ui.sampling import (
    CHECKPOINT_PRESET,
    PRESET_CHOICES,
    Sampling,
    max_new_tokens_slider,
    preset_config,
    sampling_slider,
    slider_values,
    takes_sampling,
)

SAMPLE = "sample"  # temperature + top-k + top-p together: sampler_config(None, ...)
SAMPLER_CHOICES = [SAMPLE, *SAMPLERS]
TOP_N = 5  # alternatives shown per token
MAX_BEAMS = 8

# The sliders each sampler reads. Only these reach sampler_config, where a setting given overrides the sampler's
# own choice (top_p given to "top-k" would switch top-p back on). The repetition penalty applies to all.
SAMPLER_SLIDERS: dict[str, tuple[str, ...]] = {
    SAMPLE: ("temperature", "top_k", "top_p"),
    "greedy": (),
    "temperature": ("temperature",),
    "top-k": ("temperature", "top_k"),
    "top-p": ("temperature", "top_p"),
    "beam": ("num_beams",),
}
SLIDERS = ("temperature", "top_k", "top_p", "num_beams")
# The sampling settings the tab offers, in the order of its controls (and of /generate's parameters).
GENERATE_SETTINGS = ("sampler", *SLIDERS, "repetition_penalty", "max_new_tokens", "seed")

FINISH = {
    "eos": "a stop token",
    "stop": "a stop string",
    "length": "max new tokens reached",
    "time": "this app's time limit per request",
}
TABLE_HEADERS = ["#", "token", "probability", "top alternatives"]
EXAMPLES = ["To be, or not to be", "ROMEO:\n", "Once upon a time", "The king said"]
HELP = (
    "Continue a prompt with the picked model. **sample** draws with temperature, top-k and top-p together; "
    "**greedy** always takes the most likely token; **beam** searches for the most likely continuation. "
    "After generating, each token is coloured by its probability under the model (red: unlikely, green: likely); "
    "hover over a token to see what else the model considered."
)


# ----- settings -----


def generation_config(base: GenerationConfig, sampling: Sampling, limit: int) -> GenerationConfig:
    """The GenerationConfig for the tab's settings (GENERATE_SETTINGS) on top of `base` (the checkpoint's
    defaults): only the sliders the sampler reads are used (see SAMPLER_SLIDERS); max new tokens must be 1 to
    `limit`; a blank or negative seed becomes a random one. Bad settings raise gr.Error with what would be
    accepted."""
    sampler = sampling.sampler or SAMPLE
    if not isinstance(sampler, str) or sampler not in SAMPLER_SLIDERS:
        raise input_error(f"unknown sampler {echo(sampler)}: choose one of {', '.join(SAMPLER_CHOICES)}")
    n = to_max_new_tokens(sampling.max_new_tokens, limit)
    given: dict[str, Any] = {}
    for name in SAMPLER_SLIDERS[sampler]:
        value = getattr(sampling, name)
        if value is None:
            continue
        if name == "num_beams":
            # Bounded as the slider is: the API need not keep to it, and each beam is a sequence decoded at once.
            given[name] = to_whole(value, "beam width", 2, MAX_BEAMS)
        elif name == "top_k":
            given[name] = to_whole(value, "top-k")
        else:
            given[name] = to_number(value, name.replace("_", "-"))
    if sampling.repetition_penalty is not None:
        given["repetition_penalty"] = to_number(sampling.repetition_penalty, "repetition penalty")
    seed = to_seed(sampling.seed)
    # A blank or negative seed: a random one, shown in the stats line so that a good draw can be had again.
    given["seed"] = secrets.randbelow(2**31) if seed is None else seed
    with user_errors("use these settings"):  # sampler_config checks the values (top-p 0, a negative top-k...)
        return sampler_config(None if sampler == SAMPLE else sampler, base, max_new_tokens=n, **given)


class PresetSettings(NamedTuple):
    """What a preset puts in the sampler dropdown and the sliders, in the order of the tab's settings."""

    sampler: str
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    repetition_penalty: float
    max_new_tokens: int


def preset_settings(base: GenerationConfig, preset: str | None, limit: int) -> PresetSettings:
    """What a preset puts in the sampler dropdown and the sliders. "checkpoint defaults" is `base` itself;
    values beyond a slider's range are brought within it."""
    config = preset_config(base, preset)
    sampler = "beam" if config.num_beams > 1 else "greedy" if config.temperature == 0 else SAMPLE
    values = slider_values(config, limit)
    return PresetSettings(
        sampler,
        values.temperature,
        values.top_k,
        values.top_p,
        min(config.num_beams, MAX_BEAMS) if config.num_beams > 1 else DEFAULT_BEAM_WIDTH,
        values.repetition_penalty,
        values.max_new_tokens,
    )


def model_preset_settings(store: ModelStore, limit: int, source: str | None, preset: str | None) -> PresetSettings:
    """The `/generation_preset` event: `preset_settings` over the picked model's defaults; over the library's
    when the model cannot be loaded (quietly: the picker's own load event says why)."""
    entry = quietly_get(store, source)
    return preset_settings(entry.generation if entry else GenerationConfig(), preset, limit)


# ----- showing the tokens -----


WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥"}


def _control(c: str) -> str:
    """Control characters (a tiny model writes plenty) as their Unicode pictures, e.g. U+0015 as ␕."""
    code = ord(c)
    return chr(0x2400 + code) if code < 0x20 else "␡" if code == 0x7F else c


def _visible(text: str, whitespace: bool = True) -> str:
    """A token's text with control characters, and unless `whitespace` is False its whitespace, made visible
    (a table cell or a tooltip would hide them)."""
    shown = []
    for c in text:
        if c in WHITESPACE:
            shown.append(WHITESPACE[c] if whitespace else c)
        else:
            shown.append(_control(c))
    return "".join(shown)


def _colour(prob: float) -> str:
    """Red (unlikely) through yellow to green (likely)."""
    return f"hsl({round(120 * prob)}, 80%, 80%)"


def _escape(text: str) -> str:
    """HTML-escaped, and braces and dollars too: gr.HTML fills its value into a template (JS `${}` and
    Handlebars `{{}}`), where the model's text must stay text."""
    return html.escape(text).replace("{", "&#123;").replace("}", "&#125;").replace("$", "&#36;")


# A thin line on each token's right shows where one ends and the next begins.
TOKEN_STYLE = "color:#111;border-radius:3px;box-shadow:inset -1px 0 0 rgba(0,0,0,0.2)"


def token_html(prompt: str, scores: Sequence[TokenProb]) -> str:
    """The prompt (grey), then each token on a background coloured by its probability; its tooltip shows the
    probability and the alternatives. Every text is escaped: the model may well write '<script>'."""
    spans = []
    for score in scores:
        alternatives = "\n".join(f"{_visible(text)}  {prob:.3f}" for text, prob in score.alternatives)
        tip = f"p = {score.prob:.3f}\nalternatives:\n{alternatives}"
        spans.append(
            f'<span class="aksis-token" style="background:{_colour(score.prob)};{TOKEN_STYLE}" '
            f'title="{_escape(tip)}">{_escape(_visible(score.text, whitespace=False))}</span>'
        )
    return (
        '<div id="aksis-token-view" style="white-space:pre-wrap;font-family:monospace;line-height:1.9">'
        f'<span style="opacity:0.55">{_escape(prompt)}</span>{"".join(spans)}</div>'
    )


def token_rows(scores: Sequence[TokenProb]) -> list[list[Any]]:
    """The token table: position, token, probability, and the alternatives with theirs."""
    return [
        [
            i,
            _visible(score.text),
            round(score.prob, 4),
            "   ".join(f"{_visible(text)} {prob:.3f}" for text, prob in score.alternatives),
        ]
        for i, score in enumerate(scores, start=1)
    ]


def stats_line(completion: Completion, seconds: float, config: GenerationConfig) -> str:
    n = len(completion.token_ids)
    rate = n / seconds if seconds > 0 else float("inf")
    parts = [
        f"{n} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)",
        f"stopped by {FINISH.get(completion.finish_reason, completion.finish_reason)}",
        f"prompt {completion.prompt_tokens} tokens",
    ]
    if config.num_beams == 1 and config.temperature > 0:  # greedy and beam search draw nothing at random
        parts.append(f"seed {config.seed}")
    return " · ".join(parts)


# ----- generating -----

Output = tuple[str, str, list[list[Any]], str]  # continuation, token view, token table, stats


@on_gpu
def stream_generation(
    entry: LoadedModel, prompt: str, config: GenerationConfig, top_n: int = TOP_N
) -> Iterator[Output]:
    """Yield the growing continuation while it is decoded (beam search: nothing until the end), then once
    more with the finished text, the token view, the token table and the stats line."""
    start = time.perf_counter()
    pieces = stream(entry.model, entry.tokenizer, prompt, config)
    text = ""
    for piece in pieces:
        text += piece
        if config.num_beams == 1:
            yield text, "", [], "generating…"
    seconds = time.perf_counter() - start
    completion = pieces.completion
    assert completion is not None  # set when the stream ends
    scores = token_probabilities(entry.model, entry.tokenizer, prompt, completion.token_ids, top_n)
    yield completion.text, token_html(prompt, scores), token_rows(scores), stats_line(completion, seconds, config)


@takes_sampling(*GENERATE_SETTINGS)
def run_generate(
    store: ModelStore, limit: int, source: str | None, prompt: Any, sampling: Sampling
) -> Iterator[Output]:
    """The `/generate` event: check the input, fetch the model, stream. Cheap checks come before the model load,
    so a bad request fails at once."""
    prompt = check_prompt(prompt)
    to_max_new_tokens(sampling.max_new_tokens, limit)
    with user_errors("load the model"):
        entry = store.get(source)
    config = timed(generation_config(entry.generation, sampling, limit), store.request_seconds)
    with user_errors("generate"):
        yield from stream_generation(entry, prompt, config)


# ----- the tab -----


def build(ctx: AppContext) -> None:
    store, limit = ctx.store, ctx.settings.max_new_tokens
    # Until the picked model's settings are known (the preset event fills them in when the page loads).
    start = preset_settings(GenerationConfig(), CHECKPOINT_PRESET, limit)
    with gr.Tab("Generate", elem_id="generate-tab"):
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=4,
                    placeholder="Type the start of a text for the model to continue…",
                    elem_id="generate-prompt",
                )
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="generate-stop")
                gr.Examples(EXAMPLES, inputs=prompt, label="Example prompts")
                output = gr.Textbox(
                    label="Continuation", lines=8, interactive=False, buttons=["copy"], elem_id="generate-output"
                )
                stats = gr.Markdown(label="Stats", elem_id="generate-stats")
                token_view = gr.HTML(
                    label="Tokens, coloured by probability (hover for the alternatives)",
                    show_label=True,
                    container=True,
                    padding=True,
                    elem_id="generate-tokens",
                )
                with gr.Accordion("Token table", open=False):
                    table = gr.Dataframe(
                        headers=TABLE_HEADERS,
                        label="Token table",
                        datatype=["number", "str", "number", "str"],
                        interactive=False,
                        wrap=True,
                        elem_id="generate-token-table",
                    )
            with gr.Column(scale=2):
                preset = gr.Dropdown(
                    PRESET_CHOICES,
                    value=CHECKPOINT_PRESET,
                    label="Preset",
                    info="fills the settings below",
                    elem_id="generate-preset",
                )
                sampler = gr.Dropdown(SAMPLER_CHOICES, value=start.sampler, label="Sampler", elem_id="generate-sampler")
                temperature = sampling_slider("temperature", "generate", start.temperature)
                top_k = sampling_slider("top_k", "generate", start.top_k)
                top_p = sampling_slider("top_p", "generate", start.top_p)
                num_beams = slider(
                    2,
                    MAX_BEAMS,
                    start.num_beams,
                    step=1,
                    label="Beam width",
                    info="continuations kept by beam search",
                    interactive=False,
                    elem_id="generate-beams",
                )
                repetition_penalty = sampling_slider("repetition_penalty", "generate", start.repetition_penalty)
                max_new_tokens = max_new_tokens_slider("generate", start.max_new_tokens, limit)
                seed = number(
                    -1,
                    label="Seed",
                    info="blank or -1: a new random draw each time",
                    precision=0,
                    elem_id="generate-seed",
                )

        controls = dict(
            sampler=sampler,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
        sliders = [controls[name] for name in SLIDERS]
        settings = [controls[name] for name in GENERATE_SETTINGS if name != "seed"]  # what a preset fills

        def grey_out(chosen: str | None) -> list[Any]:
            used = SAMPLER_SLIDERS.get(chosen or SAMPLE, ())
            return [gr.update(interactive=name in used) for name in SLIDERS]

        # No triggers: runs when the page loads and whenever the model or the preset changes.
        gr.on(
            None,
            partial(model_preset_settings, store, limit),  # the API's parameters: source, preset
            [ctx.picker, preset],
            settings,
            api_name="generation_preset",
            show_progress="hidden",
        )
        sampler.change(grey_out, sampler, sliders, api_visibility="private", show_progress="hidden")
        event = gr.on(
            [generate_button.click, prompt.submit],
            partial(run_generate, store, limit),  # the API's parameters: run_generate's own after these two
            [ctx.picker, prompt, *(controls[name] for name in GENERATE_SETTINGS)],
            [output, token_view, table, stats],
            api_name="generate",
            # The inputs reach `run_generate` as sent, unchecked by Gradio: it checks each itself, so a bad value from
            # the API gets a message naming the setting (Gradio's own says only "Value 0 is less than minimum").
            preprocess=False,
        )
        stop_button.click(None, cancels=[event], api_visibility="private")
