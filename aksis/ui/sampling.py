"""The sampling settings that the Chat and Generate tabs share (and the Arena and Evaluate tabs, in part): the
settings a request sends, the presets the tabs offer, the sliders that show the settings, and what a preset puts in
those sliders.

- A request's settings travel as one `Sampling` (as sent, unchecked: each tab turns it into a `GenerationConfig`
  with its own rules and checks). Gradio passes an event's inputs one by one and names an API endpoint's
  parameters after its function's, so an event function that takes `sampling: Sampling` is decorated with
  `takes_sampling(*names)`: Gradio and other callers see the settings it offers as parameters of their own, in
  that order, and the function gets them as one `Sampling`. A new setting is a field here, a control in the tabs
  that offer it, and its name in their lists.
- Presets: "checkpoint defaults" is the picked checkpoint's own generation_config.json; the others are
  `aksis.generation.SAMPLER_PRESETS`, applied over it (its stop strings and length penalty stay).
- Sliders: one definition per setting (range, step, label, help), so that the tabs agree on what a setting
  means and accepts; a tab gives only its elem_id prefix (elem_id `<tab>-temperature`, `<tab>-top-k`,
  `<tab>-top-p`, `<tab>-repetition-penalty`, `<tab>-max-new-tokens`).
- A config's values are brought within the sliders' ranges before they are shown (a checkpoint may have saved
  a temperature of 3, or more new tokens than the app allows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import gradio as gr

from aksis.config import GenerationConfig
from aksis.generation import SAMPLER_PRESETS, sampler_config
from aksis.ui.context import echo, input_error, spread, user_errors
from aksis.ui.inputs import slider

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one request, as a visitor (or an API caller) sent them. A tab offers some of them;
    those it does not offer stay None."""

    preset: Any = None  # "checkpoint defaults" or a name of aksis.generation.SAMPLER_PRESETS
    sampler: Any = None  # "sample" or a name of aksis.generation.SAMPLERS
    temperature: Any = None
    top_k: Any = None
    top_p: Any = None
    num_beams: Any = None
    repetition_penalty: Any = None
    max_new_tokens: Any = None
    seed: Any = None


def takes_sampling(*names: str) -> Callable[[F], F]:
    """Decorate an event function that takes a `sampling: Sampling` parameter: Gradio (and any caller) sees the
    settings `names` in its place, one parameter each (see `aksis.ui.context.spread`)."""
    return spread("sampling", Sampling, names)


CHECKPOINT_PRESET = "checkpoint defaults"
PRESET_CHOICES = [CHECKPOINT_PRESET, *SAMPLER_PRESETS]
MAX_TEMPERATURE, MAX_TOP_K, MAX_PENALTY = 2.0, 200, 2.0

# gr.Slider's arguments for each sampling setting, by its GenerationConfig name.
SLIDER_ARGS: dict[str, dict[str, Any]] = {
    "temperature": dict(
        minimum=0,
        maximum=MAX_TEMPERATURE,
        step=0.05,
        label="Temperature",
        info="0 is greedy; higher is more surprising",
    ),
    "top_k": dict(
        minimum=0, maximum=MAX_TOP_K, step=1, label="Top-k", info="sample among the k most likely tokens (0: all)"
    ),
    "top_p": dict(
        minimum=0.01,
        maximum=1.0,
        step=0.01,
        label="Top-p",
        info="sample among the most likely tokens that make up this probability (1: all)",
    ),
    "repetition_penalty": dict(
        minimum=1.0,
        maximum=MAX_PENALTY,
        step=0.05,
        label="Repetition penalty",
        info="above 1 makes tokens already in the text less likely",
    ),
}


def sampling_slider(name: str, tab: str, value: float, **args: Any) -> gr.Slider:
    """The slider of a sampling setting (a key of SLIDER_ARGS) with elem_id `<tab>-<name with dashes>`; `args`
    (a label, interactive=False...) go to gr.Slider over the shared ones."""
    return slider(value=value, elem_id=f"{tab}-{name.replace('_', '-')}", **{**SLIDER_ARGS[name], **args})


def max_new_tokens_slider(tab: str, value: int, limit: int, **args: Any) -> gr.Slider:
    """The max new tokens slider, 1 to `limit` (the app's limit, unless `args` set a lower maximum)."""
    args = {"maximum": limit, "label": "Max new tokens", **args}
    return slider(minimum=1, value=value, step=1, elem_id=f"{tab}-max-new-tokens", **args)


def preset_name(preset: str | None) -> str:
    """The preset chosen ("checkpoint defaults" when none), or a gr.Error that lists the choices."""
    preset = preset or CHECKPOINT_PRESET
    if not isinstance(preset, str) or preset not in PRESET_CHOICES:
        raise input_error(f"unknown preset {echo(preset)}: choose one of {', '.join(PRESET_CHOICES)}")
    return preset


def preset_config(base: GenerationConfig, preset: str | None) -> GenerationConfig:
    """The settings a preset stands for over `base` (the checkpoint's defaults): "checkpoint defaults" is `base`
    itself; a preset of SAMPLER_PRESETS samples (one beam, whatever `base` says)."""
    preset = preset_name(preset)
    if preset == CHECKPOINT_PRESET:
        return base
    with user_errors("apply the preset"):
        return sampler_config(preset, base, num_beams=1)


class SliderValues(NamedTuple):
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    max_new_tokens: int


def slider_values(config: GenerationConfig, limit: int) -> SliderValues:
    """The settings of `config` that the sliders show, within the sliders' ranges; `limit` is the app's max new
    tokens."""
    return SliderValues(
        min(config.temperature, MAX_TEMPERATURE),
        min(config.top_k, MAX_TOP_K),
        config.top_p,
        min(max(config.repetition_penalty, 1.0), MAX_PENALTY),
        min(config.max_new_tokens, limit),
    )
