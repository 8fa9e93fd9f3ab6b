"""aksis models to and from Hugging Face transformers' model objects, in memory (GPT-2, LLaMA, Qwen2, Mistral families).

Files need no transformers at all: `aksis.checkpoint.load_gpt` reads a transformers checkpoint folder or repo, and
aksis writes its own checkpoints in transformers' layout where a family expresses them (aksis.transformers_format
holds the mapping). This module is for code that holds a transformers model object (a benchmark comparing the two on
identical weights, a notebook): transformers is an optional dependency, imported only inside these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aksis.checkpoint import load_gpt
from aksis.model import GPT
from aksis.transformers_format import (
    FormatError,
    config_from_transformers,
    config_to_transformers,
    expressible_family,
    ignored,
    transformers_state,
    weight_sources,
)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "this needs Hugging Face transformers: pip install transformers (or the dev extra: pip install -e '.[dev]')"
        ) from err
    return transformers


def from_transformers(hf_model: Any) -> GPT:
    """An aksis GPT with the weights of an in-memory transformers model of a family aksis reads."""
    config = config_from_transformers(hf_model.config.to_dict())
    state = {k: v for k, v in hf_model.state_dict().items() if not ignored(k)}
    sources = weight_sources(config, set(state))
    missing = sorted({n for src in sources.values() for n in src.names if n not in state})
    if missing:
        raise FormatError(f"the transformers model lacks weights: {missing[:8]}")
    model = GPT(config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, src in sources.items():
            params[name].copy_(src.make([state[n] for n in src.names]))
    return model.eval()


def to_transformers(model: GPT) -> Any:
    """An in-memory transformers model (GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM) with the weights of an
    aksis GPT; FormatError when no transformers family expresses it."""
    family = expressible_family(model.config)
    if family is None:
        raise FormatError(f"no transformers family expresses this model ({model.config.describe()})")
    transformers = _transformers()
    data = config_to_transformers(model.config, family)
    data.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: v.detach().clone() for k, v in transformers_state(model).items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not ignored(k) and not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise FormatError(f"transformers export mismatch: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


# ----- GPT-2 names, kept for code written against them -----


def from_hf_gpt2(hf_model: Any) -> GPT:
    """An aksis GPT with the weights of an in-memory transformers GPT2LMHeadModel."""
    return from_transformers(hf_model)


def to_hf_gpt2(model: GPT) -> Any:
    """An in-memory transformers GPT2LMHeadModel with the weights of an aksis GPT-2-flavour model."""
    if expressible_family(model.config) != "gpt2":
        raise ValueError("only GPT-2-flavour models with n_kv_head == n_head can be exported to GPT2LMHeadModel")
    return to_transformers(model)


def import_gpt2(name_or_path: str | Path = "openai-community/gpt2") -> GPT:
    """A GPT2LMHeadModel checkpoint (a local folder, or a Hub id) as an aksis GPT: `load_gpt`, which reads it
    without transformers."""
    return load_gpt(name_or_path)


def export_gpt2(model: GPT, folder: str | Path) -> Path:
    """Write `model` to `folder` so that `transformers.GPT2LMHeadModel.from_pretrained(folder)` loads it."""
    folder = Path(folder)
    with torch.no_grad():
        to_hf_gpt2(model).save_pretrained(folder)
    return folder
