"""PLACEHOLDER: the Model tab (being written)."""

from __future__ import annotations

import gradio as gr

from aksis.ui.context import AppContext


def build(ctx: AppContext) -> None:
    with gr.Tab("Model"):
        gr.Markdown("Model")
