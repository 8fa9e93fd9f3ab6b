"""Conversion between aksis GPT-2-flavour models and Hugging Face transformers' `GPT2LMHeadModel`.

aksis's parameter names follow transformers' GPT-2, so the mapping is name for name; transformers stores
its projections as `Conv1D` with (in, out) weights, which are transposed to `nn.Linear`'s (out, in).
transformers is an optional dependency: it is imported only inside these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aksis.config import ModelConfig
from aksis.model import GPT

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

# Weights stored as Conv1D (in, out) by transformers and as nn.Linear (out, in) by aksis.
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "GPT-2 import/export needs Hugging Face transformers: pip install transformers "
            "(or the dev extra: pip install -e '.[dev]')"
        ) from err
    return transformers


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The ModelConfig of a transformers GPT2Config; refuses options aksis does not implement."""
    unsupported = {
        "activation_function": hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": not hf_config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": hf_config.reorder_and_upcast_attn,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"this GPT-2 checkpoint uses options aksis does not implement: {', '.join(bad)}")
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_embd=hf_config.n_embd,
        n_head=hf_config.n_head,
        d_ff=hf_config.n_inner or 4 * hf_config.n_embd,
        norm_eps=hf_config.layer_norm_epsilon,
        tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
    )


def from_hf_gpt2(hf_model: GPT2LMHeadModel) -> GPT:
    """An aksis GPT with the weights of an in-memory transformers GPT2LMHeadModel."""
    model = GPT(config_from_hf(hf_model.config))
    source = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    target = model.state_dict()
    converted = {}
    for name, tensor in source.items():
        if name not in target:
            raise ValueError(f"unexpected GPT-2 weight {name!r}")
        converted[name] = tensor.t() if name.endswith(_TRANSPOSED) else tensor
    missing = set(target) - set(converted)
    if model.config.tie_embeddings:
        missing.discard("lm_head.weight")  # shares its tensor with transformer.wte.weight
    if missing:
        raise ValueError(f"GPT-2 checkpoint lacks weights: {sorted(missing)}")
    model.load_state_dict(converted, strict=False)
    return model.eval()


def import_gpt2(name_or_path: str | Path = "openai-community/gpt2") -> GPT:
    """Load a GPT2LMHeadModel checkpoint (a local folder, or a Hub id when online) as an aksis GPT."""
    transformers = _transformers()
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(name_or_path))
    return from_hf_gpt2(hf_model)


def to_hf_gpt2(model: GPT) -> GPT2LMHeadModel:
    """An in-memory transformers GPT2LMHeadModel with the weights of an aksis GPT-2-flavour model."""
    cfg = model.config
    if cfg.arch != "gpt2" or cfg.n_kv_head != cfg.n_head:
        raise ValueError("only GPT-2-flavour models with n_kv_head == n_head can be exported to GPT2LMHeadModel")
    transformers = _transformers()
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_ff,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    state = {
        name: (tensor.t() if name.endswith(_TRANSPOSED) else tensor).detach().clone()
        for name, tensor in model.state_dict().items()
    }
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
    return hf_model.eval()


def export_gpt2(model: GPT, folder: str | Path) -> Path:
    """Write `model` to `folder` so that `transformers.GPT2LMHeadModel.from_pretrained(folder)` loads it."""
    folder = Path(folder)
    with torch.no_grad():
        to_hf_gpt2(model).save_pretrained(folder)
    return folder
