"""The app's inputs that check what an API caller sends: `gr.Slider` and `gr.Number` that refuse a value out of range
(or not a number) as a visitor's mistake, and a `gr.Textbox` that hands on no text as "" (not None).

Gradio checks a slider's range itself, before the event function runs, with its own `gr.Error`, which it logs with
a traceback: an API caller sending 1e9 to a slider would fill the server log with stack traces of the app working
as meant, and hide the real ones. `slider` and `number` make the component and have it say the same thing, naming
the setting, as a refusal (`aksis.ui.context.input_error`: no traceback). They wrap the component's own `preprocess`
rather than subclass it: Gradio writes a .pyi file beside the module of any subclass of a component.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from aksis.ui.context import input_error

C = TypeVar("C", gr.Slider, gr.Number)


def slider(*args: Any, **kwargs: Any) -> gr.Slider:
    """`gr.Slider(*args, **kwargs)`, refusing a bad value as bad input."""
    return _refusing(gr.Slider(*args, **kwargs))


def number(*args: Any, **kwargs: Any) -> gr.Number:
    """`gr.Number(*args, **kwargs)`, refusing a bad value as bad input."""
    return _refusing(gr.Number(*args, **kwargs))


def textbox(*args: Any, **kwargs: Any) -> gr.Textbox:
    """`gr.Textbox(*args, **kwargs)` whose value is always text: an API caller may send null, which would reach the
    event (or gr.ChatInterface's own wrapper, which fails on it) as None."""
    component = gr.Textbox(*args, **kwargs)
    given: Callable[[Any], Any] = component.preprocess

    def preprocess(payload: Any) -> Any:
        value = given(payload)
        return "" if value is None else value

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _refusing(component: C) -> C:
    checked: Callable[[Any], Any] = component.preprocess
    name = component.label or "a number"

    def preprocess(payload: Any) -> Any:
        try:
            return checked(payload)
        except gr.Error as err:
            raise input_error(f"{name}: {err.message}") from None
        except (TypeError, ValueError, OverflowError):
            raise input_error(f"{name} must be a number, got {str(payload)[:40]!r}") from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component
