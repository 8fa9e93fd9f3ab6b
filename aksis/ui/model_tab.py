"""The Model tab: what the picked model is and what it has learned to look at.

- Details: the config (JSON), the parameter count, the tokenizer (name, kind, vocabulary, special tokens), the
  training curves (loss and validation loss against step, from the run's metrics.jsonl) and the model card
  (README.md: its YAML front matter is shown apart, as metadata; images with relative links, such as the card's
  loss curve, are dropped, since the page cannot fetch them and the curves are plotted here anyway). They refresh
  when the picked model changes.
- Attention: the attention probabilities of one layer and head over a prompt (`GPT.attention_weights`), as a
  heatmap with the tokens on both axes (row: the token attending; column: the token attended to). At most
  `MAX_ATTENTION_TOKENS` tokens, beyond which the labels cannot be read.

API (`gradio_client`):
- `/model_info` (source) -> (config, summary Markdown, training curves, card Markdown, card metadata YAML).
- `/attention` (source, prompt, layer, head) -> (heatmap, {"tokens": [...], "weights": [[...]]}): weights[i][j]
  is how much token i attends to token j.

Element ids (browser tests): model-tab, model-refresh, model-summary, model-config, model-curves, model-card,
model-card-metadata, attention-prompt, attention-layer, attention-head, attention-run, attention-heatmap,
attention-data.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import gradio as gr
import torch
from matplotlib.figure import Figure

from aksis.checkpoint import CARD_FILE
from aksis.plots import Curves, loss_curves, loss_figure
from aksis.quantize import quantization_of
from aksis.runs import METRICS_FILE, read_metrics
from aksis.ui.context import AppContext, check_prompt, input_error, on_gpu, quietly_get, to_whole, user_errors
from aksis.ui.inputs import slider
from aksis.ui.models import LoadedModel, ModelStore

MAX_ATTENTION_TOKENS = 64
EXAMPLE_PROMPT = "To be, or not to be, that is the question."
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)  # YAML between two --- lines, at the very top
RELATIVE_IMAGE = re.compile(r"!\[[^\]]*\]\((?!https?://|data:)[^)]*\)\n?")
FLAVOURS = {
    "gpt2": "GPT-2 style: learned positions, LayerNorm, GELU",
    "llama": "LLaMA style: rotary positions, RMSNorm, SwiGLU",
}

# ----- details -----


def config_dict(entry: LoadedModel) -> dict[str, Any]:
    return entry.model.config.to_dict()


def summary(entry: LoadedModel) -> str:
    """Parameters, shape and tokenizer of a model, as a Markdown table (its first row, the flavour, as header)."""
    cfg, tok, model = entry.model.config, entry.tokenizer, entry.model
    ordered = sorted(tok.specials.items(), key=lambda item: item[1])
    specials = [f"`{token}` {token_id}" for token, token_id in ordered[:12]]
    if len(ordered) > 12:
        specials.append(f"and {len(ordered) - 12:,} more")
    total, body = model.num_params(), model.num_params(exclude_embeddings=True)
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    if (scheme := quantization_of(model)) != "none":
        dtype += f", linear layers {scheme}"
    rows = [
        ("flavour", FLAVOURS.get(cfg.arch, cfg.arch)),
        ("parameters", f"{total:,} ({total / 1e6:.2f}M; {body:,} without embeddings)"),
        ("layers × width", f"{cfg.n_layer} × {cfg.n_embd}, MLP {cfg.d_ff}"),
        ("attention heads (key/value)", f"{cfg.n_head} ({cfg.n_kv_head}), {cfg.head_dim} wide"),
        ("context", f"{cfg.block_size} tokens"),
        ("tokenizer", f"{tok.name} ({tok.kind}), {tok.vocab_size:,} tokens; the model has {cfg.vocab_size:,}"),
        ("special tokens", ", ".join(specials) or "none"),
        ("weights", f"{entry.nbytes / 1e6:.1f} MB of {dtype} on {entry.device}"),
        ("checkpoint", f"`{entry.checkpoint}`"),
    ]
    cells = ["| " + name + " | " + value.replace("|", r"\|") + " |" for name, value in rows]  # a bare | ends a cell
    return "\n".join([cells[0], "|---|---|", *cells[1:]])


def training_curves(entry: LoadedModel) -> Curves:
    """Loss against step from the run's metrics.jsonl: training loss and validation loss (no points without a
    log)."""
    path = entry.file(METRICS_FILE)
    return loss_curves(read_metrics(path) if path is not None else [])


def model_card(entry: LoadedModel) -> tuple[str, str]:
    """The model card (README.md) as (Markdown body, YAML front matter); a note when there is none."""
    path = entry.file(CARD_FILE)
    if path is None:
        return "_This checkpoint has no model card (README.md)._", ""
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    match = FRONT_MATTER.match(text)
    meta, body = (match.group(1), text[match.end() :]) if match else ("", text)
    return RELATIVE_IMAGE.sub("", body).strip() or "_The model card has metadata only._", meta


Info = tuple[dict[str, Any], str, Figure | None, str, str]


def model_info(store: ModelStore, source: str | None) -> Info:
    """The `/model_info` event: (config, summary, training curves plot, card, card metadata)."""
    with user_errors("load the model"):
        entry = store.get(source)
    with user_errors("read the training log"):
        curves = loss_figure(training_curves(entry))
    card, meta = model_card(entry)
    return config_dict(entry), summary(entry), curves, card, meta


def model_switched(store: ModelStore, source: str | None) -> tuple[Any, ...]:
    """On a model switch: the details, or nothing when the model cannot be loaded (quietly: the picker's own load
    event says why)."""
    if quietly_get(store, source) is None:
        return None, "", None, "", ""
    return model_info(store, source)


def slider_ranges(store: ModelStore, source: str | None, layer: Any, head: Any) -> tuple[Any, Any]:
    """Updates of the layer and head sliders that fit the picked model (their values kept where they still
    fit); no change when the model cannot be loaded."""
    entry = quietly_get(store, source)
    if entry is None:
        return gr.update(), gr.update()
    cfg = entry.model.config
    return (
        gr.update(maximum=cfg.n_layer - 1, value=min(int(layer or 0), cfg.n_layer - 1)),
        gr.update(maximum=cfg.n_head - 1, value=min(int(head or 0), cfg.n_head - 1)),
    )


# ----- attention -----


def token_labels(entry: LoadedModel, ids: list[int]) -> list[str]:
    """Each token's text, whitespace made visible; bytes that are part of a character show as U+FFFD."""
    labels = []
    for i in ids:
        text = entry.tokenizer.token_bytes(i).decode("utf-8", errors="replace")
        labels.append(text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥"))
    return labels


@on_gpu
def attention(entry: LoadedModel, prompt: str, layer: int, head: int) -> tuple[list[str], list[list[float]]]:
    """(tokens, weights): the attention probabilities (T, T) of `head` in `layer` over the prompt's tokens."""
    cfg = entry.model.config
    if not 0 <= layer < cfg.n_layer:
        raise input_error(f"layer must be from 0 to {cfg.n_layer - 1} (this model has {cfg.n_layer}), got {layer}")
    if not 0 <= head < cfg.n_head:
        raise input_error(f"head must be from 0 to {cfg.n_head - 1} (this model has {cfg.n_head}), got {head}")
    ids = entry.tokenizer.encode(prompt)
    if not ids:
        raise input_error("The prompt is empty: type a few words to see where the model looks.")
    most = min(MAX_ATTENTION_TOKENS, cfg.block_size)
    if len(ids) > most:
        raise input_error(f"The prompt is {len(ids)} tokens; the attention view shows at most {most}: shorten it.")
    idx = torch.tensor([ids], device=entry.device)  # (1, T)
    weights = entry.model.attention_weights(idx, layer)[0, head]  # (T, T)
    return token_labels(entry, ids), weights.cpu().tolist()


def heatmap(tokens: list[str], weights: list[list[float]], title: str) -> Figure:
    """The weights as an image, the attending tokens down the side and the attended ones along the bottom.
    A plain Figure (not pyplot): no global state, so requests can draw at the same time."""
    size = min(3 + 0.15 * len(tokens), 10)
    fig = Figure(figsize=(size + 1.2, size), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, aspect="equal")
    # "$" would start matplotlib's mathtext: escape it so tokens show as written.
    labels = [t.replace("$", r"\$") for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), labels, fontsize=8)
    ax.set_xlabel("attended to (key)")
    ax.set_ylabel("attending (query)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    fig.tight_layout()
    return fig


def run_attention(
    store: ModelStore, source: str | None, prompt: Any, layer: Any, head: Any
) -> tuple[Figure, dict[str, Any]]:
    """The `/attention` event: the heatmap and its numbers. The prompt is at most MAX_PROMPT_CHARS characters
    before it is tokenized (`attention` then allows MAX_ATTENTION_TOKENS tokens)."""
    prompt = check_prompt(prompt)
    # Their ranges depend on the model: `attention` checks them once it is loaded.
    layer, head = to_whole(layer, "layer"), to_whole(head, "head")
    with user_errors("load the model"):
        entry = store.get(source)
    with user_errors("compute the attention"):
        tokens, weights = attention(entry, prompt, layer, head)
    return heatmap(tokens, weights, f"layer {layer}, head {head}"), {"tokens": tokens, "weights": weights}


# ----- the tab -----


def build(ctx: AppContext) -> None:
    store = ctx.store
    with gr.Tab("Model", elem_id="model-tab") as tab:
        with gr.Row():
            gr.Markdown("What the picked model is, how its training went, and where it looks.")
            refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="model-refresh")
        with gr.Row():
            with gr.Column(scale=3):
                summary_view = gr.Markdown(elem_id="model-summary")
                curves = gr.Plot(label="Training curves (from metrics.jsonl)", elem_id="model-curves")
            with gr.Column(scale=2):
                config = gr.JSON(label="config.json", elem_id="model-config")
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown(elem_id="model-card")
            meta = gr.Code(language="yaml", label="Card metadata (YAML front matter)", elem_id="model-card-metadata")
        gr.Markdown(
            "### Attention\nWhere each token of a prompt looks, in one layer and head: row *i* shows how token *i* "
            "spreads its attention over itself and the tokens before it (a causal model never looks ahead)."
        )
        with gr.Row():
            prompt = gr.Textbox(EXAMPLE_PROMPT, label="Prompt", scale=4, elem_id="attention-prompt")
            layer = slider(0, 11, 0, step=1, label="Layer", scale=1, elem_id="attention-layer")
            head = slider(0, 11, 0, step=1, label="Head", scale=1, elem_id="attention-head")
        attention_button = gr.Button("Show attention", variant="primary", elem_id="attention-run")
        plot = gr.Plot(label="Attention", elem_id="attention-heatmap")
        with gr.Accordion("Attention weights (numbers)", open=False):
            numbers = gr.JSON(elem_id="attention-data")

        details = [config, summary_view, curves, card, meta]

        def info(source: str | None) -> Info:
            return model_info(store, source)

        refresh.click(info, ctx.picker, details, api_name="model_info")
        # No triggers: runs when the page loads and whenever the picked model changes.
        gr.on(
            None, partial(model_switched, store), ctx.picker, details, api_visibility="private", show_progress="hidden"
        ).then(
            partial(slider_ranges, store),
            [ctx.picker, layer, head],
            [layer, head],
            api_visibility="private",
            show_progress="hidden",
        )
        tab.select(info, ctx.picker, details, api_visibility="private", show_progress="hidden")
        gr.on(
            [attention_button.click, prompt.submit],
            partial(run_attention, store),  # the API's parameters: source, prompt, layer, head
            [ctx.picker, prompt, layer, head],
            [plot, numbers],
            api_name="attention",
            # The inputs reach `run_attention` as sent: Gradio would hold layer and head to the sliders' range at
            # build (0 to 11), which a model with more layers or heads passes; `attention` checks the model's own.
            preprocess=False,
        )
