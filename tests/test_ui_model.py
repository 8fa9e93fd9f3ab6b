"""The Model tab (aksis/ui/model_tab.py): details read from the fixture runs (config, tokenizer, curves from
metrics.jsonl, the card), the attention view against the model's own weights, and its API on the served app."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import ServedApp, tiny_config

from aksis.checkpoint import save_checkpoint
from aksis.model import GPT
from aksis.tokenizer import Tokenizer
from aksis.ui import model_tab as mt
from aksis.ui.context import MAX_PROMPT_CHARS, quietly_get
from aksis.ui.models import ModelStore


@pytest.fixture(scope="module")
def store(app_checkpoints: Path) -> ModelStore:
    return ModelStore(app_checkpoints, device=torch.device("cpu"))


def test_details_of_a_run(store: ModelStore, app_checkpoints: Path) -> None:
    source = str(app_checkpoints / "tiny-llama")
    entry = store.get(source)
    config, summary, plot, card, meta = mt.model_info(store, source)
    assert config == entry.model.config.to_dict()
    assert config["arch"] == "llama" and config["n_kv_head"] == 2
    assert f"{entry.model.num_params():,}" in summary
    assert "LLaMA style" in summary and "byte" in summary and f"{entry.tokenizer.vocab_size:,} tokens" in summary
    assert f"`<\\|endoftext\\|>` {entry.tokenizer.eot_id}" in summary  # a bare | would end the table cell
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 3 for line in summary.splitlines())  # two columns each

    # The curves are the run's metrics.jsonl (beside best/), one row per logged loss.
    records = [json.loads(line) for line in (app_checkpoints / "tiny-llama" / "metrics.jsonl").read_text().splitlines()]
    curves = mt.training_curves(entry)
    assert curves["training"] == [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert curves["validation"] == [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] == [(50, 5.2)]
    lines = {line.get_label(): line.get_xydata().tolist() for line in plot.axes[0].get_lines()}
    assert lines == {name: [list(p) for p in points] for name, points in curves.items()}
    assert all(line.get_marker() == "o" for line in plot.axes[0].get_lines())  # the lone validation point shows

    # The card's YAML front matter is apart from its text.
    raw = (app_checkpoints / "tiny-llama" / "best" / "README.md").read_text()
    assert raw.startswith("---\n") and "library_name: aksis" in meta
    assert not card.startswith("---") and "library_name" not in card and card in raw


def test_a_checkpoint_without_log_or_card(store: ModelStore, app_checkpoints: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(app_checkpoints / "tiny-gpt2" / "best", bare)
    (bare / "README.md").unlink()
    _, summary, plot, card, meta = mt.model_info(store, str(bare))
    assert "GPT-2 style" in summary
    assert mt.training_curves(store.get(str(bare))) == {"training": [], "validation": []} and plot is None
    assert "no model card" in card and meta == ""


def test_a_card_s_relative_images_are_dropped(store: ModelStore, app_checkpoints: Path, tmp_path: Path) -> None:
    folder = tmp_path / "carded"
    shutil.copytree(app_checkpoints / "tiny-gpt2" / "best", folder)
    (folder / "README.md").write_text(
        "---\nlicense: mit\n---\n# tiny\n\n![loss](loss_curve.png)\n\n![badge](https://example.com/b.svg)\n"
    )
    _, _, _, card, meta = mt.model_info(store, str(folder))
    assert meta == "license: mit"
    assert card == "# tiny\n\n\n![badge](https://example.com/b.svg)"


def test_attention_view_is_the_model_s_weights(store: ModelStore, app_checkpoints: Path) -> None:
    source = str(app_checkpoints / "tiny-llama")
    entry = store.get(source)
    prompt = "To be, or not"
    figure, data = mt.run_attention(store, source, prompt, 1, 3)
    ids = entry.tokenizer.encode(prompt)
    assert data["tokens"] == ["T", "o", "␣", "b", "e", ",", "␣", "o", "r", "␣", "n", "o", "t"]
    expected = entry.model.attention_weights(torch.tensor([ids]), 1)[0, 3]
    assert torch.tensor(data["weights"]).shape == (len(ids), len(ids))
    torch.testing.assert_close(torch.tensor(data["weights"]), expected)
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (len(ids), len(ids))
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == data["tokens"]


@pytest.mark.parametrize(
    ("prompt", "layer", "head", "message"),
    [
        ("", 0, 0, "The prompt is empty"),
        ("hi", 2, 0, "layer must be from 0 to 1 \\(this model has 2\\), got 2"),
        ("hi", 0, 4, "head must be from 0 to 3 \\(this model has 4\\), got 4"),
        ("x" * (mt.MAX_ATTENTION_TOKENS + 1), 0, 0, "The prompt is 65 tokens; the attention view shows at most 64"),
        ("x" * (MAX_PROMPT_CHARS + 1), 0, 0, f"this app takes at most {MAX_PROMPT_CHARS:,}"),  # before tokenizing
        (["not", "text"], 0, 0, "The prompt is empty"),
        ("hi", "one", 0, "layer must be a whole number, got 'one'"),
        ("hi", 0, 1.5, "head must be a whole number, got 1.5"),
    ],
)
def test_bad_attention_requests_are_clear_errors(
    store: ModelStore, app_checkpoints: Path, prompt: str, layer: object, head: object, message: str
) -> None:
    with pytest.raises(gr.Error, match=message):
        mt.run_attention(store, str(app_checkpoints / "tiny-gpt2"), prompt, layer, head)


def test_a_model_switch_skips_a_model_that_cannot_be_loaded_but_not_a_bug(
    store: ModelStore, app_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(app_checkpoints / "tiny-gpt2")  # 2 layers, 4 heads
    layer, head = mt.slider_ranges(store, source, 5, 3)
    assert (layer["maximum"], layer["value"], head["maximum"], head["value"]) == (1, 1, 3, 3)
    assert mt.model_switched(store, source)[1] == mt.model_info(store, source)[1]
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    for broken in (None, str(tmp_path), str(tmp_path / "missing"), 42):  # 42: an API caller's value, not text
        assert quietly_get(store, broken) is None  # type: ignore[arg-type]
        assert mt.slider_ranges(store, broken, 5, 3) == (gr.update(), gr.update())  # type: ignore[arg-type]
        assert mt.model_switched(store, broken) == (None, "", None, "", "")  # type: ignore[arg-type]
    # Only what the picker reports is skipped: a bug (here, a loader failing with an error of its own) still surfaces.

    def faulty_loader(source: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "_load", faulty_loader)
    with pytest.raises(RuntimeError, match="a bug"):
        mt.slider_ranges(store, str(tmp_path / "another"), 0, 0)


def test_attention_reaches_every_layer_and_head_of_a_deep_model(served_app: ServedApp, tmp_path: Path) -> None:
    """The sliders are built for 12 layers and heads; the API is not held to that range."""
    deep = tmp_path / "deep"
    save_checkpoint(
        GPT(tiny_config("gpt2", vocab_size=260, block_size=128, n_layer=13, n_head=16)),
        deep,
        tokenizer=Tokenizer.byte_level(),
    )
    client = served_app.client()
    _, data = client.predict(source=str(deep), prompt="Once", layer=12, head=15, api_name="/attention")
    assert len(data["tokens"]) == 4 and len(data["weights"]) == 4
    with pytest.raises(Exception, match="layer must be from 0 to 12 \\(this model has 13\\), got 13"):
        client.predict(source=str(deep), prompt="Once", layer=13, head=0, api_name="/attention")
    with pytest.raises(Exception, match=f"this app takes at most {MAX_PROMPT_CHARS:,}"):
        client.predict(source=str(deep), prompt="x" * (MAX_PROMPT_CHARS + 1), layer=0, head=0, api_name="/attention")


def test_the_served_app_s_model_info_and_attention(served_app: ServedApp, app_checkpoints: Path) -> None:
    source = str(app_checkpoints / "tiny-gpt2")
    client = served_app.client()
    config, summary, _, _, meta = client.predict(source=source, api_name="/model_info")
    assert config["arch"] == "gpt2" and "GPT-2 style" in summary and "library_name: aksis" in meta
    _, data = client.predict(source=source, prompt="Once upon", layer=1, head=2, api_name="/attention")
    assert len(data["tokens"]) == 9 and all(len(row) == 9 for row in data["weights"])
    for i, row in enumerate(data["weights"]):
        assert sum(row) == pytest.approx(1.0, abs=1e-5) and all(w == 0 for w in row[i + 1 :])
    with pytest.raises(Exception, match="head must be from 0 to 3"):
        client.predict(source=source, prompt="Once upon", layer=0, head=9, api_name="/attention")
