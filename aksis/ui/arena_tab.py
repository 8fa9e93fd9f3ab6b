"""PLACEHOLDER: the Arena tab (being written)."""

from __future__ import annotations

import gradio as gr

from aksis.ui.context import AppContext


def build(ctx: AppContext) -> None:
    with gr.Tab("Arena"):
        gr.Markdown("Arena")
