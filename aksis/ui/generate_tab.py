"""PLACEHOLDER: the Generate tab (being written)."""

from __future__ import annotations

import gradio as gr

from aksis.ui.context import AppContext


def build(ctx: AppContext) -> None:
    with gr.Tab("Generate"):
        gr.Markdown("Generate")
