"""The transformers checkpoint format, read and written without transformers: the `config.json` and safetensors weights
of the LLaMA, Qwen2, Mistral and GPT-2 families, mapped onto aksis's one `ModelConfig` and `GPT`.

A family is the llama or gpt2 flavour with the knobs it needs, not a second model:

    llama    RoPE (theta, "default" or "llama3" scaling), RMSNorm, SwiGLU, grouped-query attention, tied or untied head
    mistral  the same; its sliding window is at least the context aksis serves (block_size is capped to the window),
             so attention over the whole context is what the window computes
    qwen2    the same with biases on the query, key and value projections
    gpt2     learned positions, LayerNorm, GELU; transformers keeps its projections as Conv1D, (in, out)

Names map one to one except where aksis fuses: its `c_attn` is transformers' q_proj, k_proj and v_proj stacked, in
that order. `weight_sources` says, for every aksis parameter, which tensors of the files make it and how, so a loader
can check every name and shape against the files' headers before it allocates anything, and then fill the model one
tensor at a time (aksis.checkpoint). `transformers_state` goes the other way, for writing.

Only what is read is trusted: a config names its family, and anything aksis does not compute the same way (another
activation, sliding windows shorter than the context, biases where aksis has none, an unknown RoPE scaling) is
refused by name, never approximated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from aksis.config import ROPE_TYPES, ModelConfig

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
INDEX_FILE = "model.safetensors.index.json"  # sharded weights: {"weight_map": {tensor name: shard file}}
# Tensors some transformers files hold that are not weights (buffers derived from the config): skipped.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class FormatError(ValueError):
    """A transformers config or weights file aksis cannot read as it is; the message names what and why."""


def is_transformers_config(data: dict[str, Any]) -> bool:
    """True for a transformers config.json (it names its family in `model_type`); aksis's own configs do not."""
    return "model_type" in data


# ----- config.json -----


def _number(data: dict[str, Any], key: str, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        raise FormatError(f"its {key} is missing")
    return value


def _rope(data: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and scaling from a transformers 4 config (`rope_theta`, `rope_scaling`) or a 5 (`rope_parameters`)."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise FormatError(f"its RoPE settings should be an object, got {params!r}")
    theta = params.get("rope_theta", data.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise FormatError(
            f"its RoPE scaling {kind!r} is not supported; aksis implements {', '.join(map(repr, ROPE_TYPES))}"
        )
    if kind == "default":
        return theta, None
    return theta, {k: v for k, v in params.items() if k != "rope_theta"}


def config_from_transformers(data: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a transformers config.json; FormatError names the family or option aksis cannot run."""
    family = data.get("model_type")
    if family not in FAMILIES:
        raise FormatError(
            f"its model_type is {family!r}; aksis reads the {', '.join(FAMILIES)} families of transformers checkpoints"
        )
    try:
        config = _gpt2_config(data) if family == "gpt2" else _llama_config(family, data)
    except (ValueError, TypeError) as err:
        if isinstance(err, FormatError):
            raise
        raise FormatError(str(err)) from None
    return config


def _gpt2_config(data: dict[str, Any]) -> ModelConfig:
    unsupported = {
        "activation_function": data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": not data.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": data.get("scale_attn_by_inverse_layer_idx", False),
        "reorder_and_upcast_attn": data.get("reorder_and_upcast_attn", False),
        "add_cross_attention": data.get("add_cross_attention", False),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise FormatError(f"this GPT-2 checkpoint uses options aksis does not implement: {', '.join(bad)}")
    n_embd = _number(data, "n_embd")
    return ModelConfig(
        arch="gpt2",
        vocab_size=_number(data, "vocab_size"),
        block_size=_number(data, "n_positions"),
        n_layer=_number(data, "n_layer"),
        n_embd=n_embd,
        n_head=_number(data, "n_head"),
        d_ff=data.get("n_inner") or 4 * n_embd,
        norm_eps=_number(data, "layer_norm_epsilon", 1e-5),
        tie_embeddings=data.get("tie_word_embeddings", True),
    )


def _llama_config(family: str, data: dict[str, Any]) -> ModelConfig:
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise FormatError(f"its hidden_act is {act!r}; aksis's SwiGLU uses 'silu'")
    if data.get("mlp_bias"):
        raise FormatError("it has biases in the MLP (mlp_bias), which aksis's llama flavour does not implement")
    qkv_bias = family == "qwen2"
    if data.get("attention_bias"):  # llama's option puts biases on the output projection too
        raise FormatError("it has biases on the attention's output projection (attention_bias), which aksis lacks")
    context = _number(data, "max_position_embeddings")
    window = data.get("sliding_window")
    windowed = family == "mistral" or data.get("use_sliding_window", False)
    if windowed and window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise FormatError(f"its sliding_window should be a positive integer, got {window!r}")
        context = min(context, window)  # within the window, sliding-window attention is full causal attention
    theta, scaling = _rope(data)
    n_head = _number(data, "num_attention_heads")
    return ModelConfig(
        arch="llama",
        vocab_size=_number(data, "vocab_size"),
        block_size=context,
        n_layer=_number(data, "num_hidden_layers"),
        n_embd=_number(data, "hidden_size"),
        n_head=n_head,
        n_kv_head=data.get("num_key_value_heads") or n_head,
        head_dim=data.get("head_dim") or 0,
        d_ff=_number(data, "intermediate_size"),
        norm_eps=_number(data, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        tie_embeddings=data.get("tie_word_embeddings", False),
    )


def config_to_transformers(config: ModelConfig, family: str | None = None) -> dict[str, Any]:
    """A transformers config.json for `config` (family: "llama" or "qwen2" for the llama flavour, by default the one
    its biases say; "gpt2" for the gpt2 flavour). FormatError when no family expresses it."""
    family = family or expressible_family(config)
    if family is None:
        raise FormatError(f"no transformers family expresses this model ({config.describe()})")
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32"}
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            **common,
        }
    rope = {"rope_type": "default"} if config.rope_scaling is None else dict(config.rope_scaling)
    data = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family,
        "hidden_size": config.n_embd,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        # Both spellings: transformers 4 reads rope_theta and rope_scaling, transformers 5 rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": {"rope_theta": config.rope_theta, **rope},
        "attention_dropout": config.dropout,
        **common,
    }
    if family == "llama":
        data.update(attention_bias=False, mlp_bias=False)
    else:
        data.update(use_sliding_window=False, sliding_window=None)
    return data


def expressible_family(config: ModelConfig) -> str | None:
    """The transformers family that computes exactly what `config` does, or None (a gpt2-flavour model with grouped-
    query attention or a head width apart from n_embd / n_head has none)."""
    if config.arch == "gpt2":
        plain = config.n_kv_head == config.n_head and config.head_dim == config.n_embd // config.n_head
        return "gpt2" if plain else None
    return "qwen2" if config.qkv_bias else "llama"


# ----- weights -----


@dataclass(frozen=True)
class Source:
    """Where an aksis parameter comes from in a transformers file: the tensors `names`, stacked along dim 0 when there
    are several (q, k, v into c_attn), transposed when `transpose` (GPT-2's Conv1D)."""

    names: tuple[str, ...]
    transpose: bool = False

    def shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The shape this source makes from tensors of the given `shapes`."""
        parts = [shapes[name] for name in self.names]
        if self.transpose:
            parts = [tuple(reversed(p)) for p in parts]
        if len(parts) == 1:
            return parts[0]
        return (sum(p[0] for p in parts), *parts[0][1:])

    def make(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.transpose:
            tensors = [t.t() for t in tensors]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def _llama_sources(config: ModelConfig) -> Iterator[tuple[str, Source]]:
    yield "transformer.wte.weight", Source(("model.embed_tokens.weight",))
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}", f"model.layers.{i}"
        yield f"{ours}.ln_1.weight", Source((f"{theirs}.input_layernorm.weight",))
        qkv = tuple(f"{theirs}.self_attn.{p}_proj" for p in "qkv")
        yield f"{ours}.attn.c_attn.weight", Source(tuple(f"{n}.weight" for n in qkv))
        if config.qkv_bias:
            yield f"{ours}.attn.c_attn.bias", Source(tuple(f"{n}.bias" for n in qkv))
        yield f"{ours}.attn.c_proj.weight", Source((f"{theirs}.self_attn.o_proj.weight",))
        yield f"{ours}.ln_2.weight", Source((f"{theirs}.post_attention_layernorm.weight",))
        yield f"{ours}.mlp.w_gate.weight", Source((f"{theirs}.mlp.gate_proj.weight",))
        yield f"{ours}.mlp.w_up.weight", Source((f"{theirs}.mlp.up_proj.weight",))
        yield f"{ours}.mlp.c_proj.weight", Source((f"{theirs}.mlp.down_proj.weight",))
    yield "transformer.ln_f.weight", Source(("model.norm.weight",))
    if not config.tie_embeddings:
        yield "lm_head.weight", Source(("lm_head.weight",))


def _gpt2_sources(config: ModelConfig, names: set[str]) -> Iterator[tuple[str, Source]]:
    # GPT2LMHeadModel saves "transformer.h.0...." (and so does aksis); a file saved from the bare GPT2Model
    # (openai-community/gpt2's own) has no "transformer." prefix.
    prefix = "" if names and not any(n.startswith("transformer.") for n in names) else "transformer."
    ours = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config.n_layer):
        for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            ours += [f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"]
    ours += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    for name in ours:
        theirs = prefix + name.removeprefix("transformer.")
        yield name, Source((theirs,), transpose=name.endswith(_GPT2_CONV1D))
    if not config.tie_embeddings:
        yield "lm_head.weight", Source(("lm_head.weight",))


def weight_sources(config: ModelConfig, names: set[str]) -> dict[str, Source]:
    """For every parameter of `GPT(config)` (tied ones once), the tensors of a transformers file that make it; `names`
    are the tensors the files hold (GPT-2 files name them two ways; empty when writing)."""
    pairs = _gpt2_sources(config, names) if config.arch == "gpt2" else _llama_sources(config)
    return dict(pairs)


def ignored(name: str) -> bool:
    """A tensor of a transformers file that is not a weight (a buffer its config determines)."""
    return name.endswith(IGNORED_SUFFIXES)


def transformers_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a transformers weights file for `model` (an aksis GPT), by transformers' names; tied embeddings
    stored once, under the input embedding's name."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for ours, source in weight_sources(config, set()).items():
        tensor = params[ours].detach()
        if source.transpose:
            tensor = tensor.t()
        if len(source.names) == 1:
            state[source.names[0]] = tensor.contiguous()
            continue
        assert config.n_kv_head is not None
        sizes = [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
        for name, part in zip(source.names, tensor.split(sizes, dim=0), strict=True):
            state[name] = part.contiguous()
    return state


# ----- generation_config.json -----


def generation_from_transformers(data: dict[str, Any]) -> dict[str, Any]:
    """aksis GenerationConfig fields from a transformers generation_config.json: sampling only when `do_sample` says
    so (else greedy, or beam search with num_beams > 1), transformers' defaults where a setting is absent."""
    sample = bool(data.get("do_sample", False))
    fields: dict[str, Any] = {
        "temperature": data.get("temperature", 1.0) if sample else 0.0,
        "repetition_penalty": data.get("repetition_penalty", 1.0),
        "num_beams": data.get("num_beams", 1),
        "length_penalty": data.get("length_penalty", 1.0),
    }
    if sample:  # greedy decoding ignores them: aksis's defaults stand
        fields.update(top_k=data.get("top_k", 50), top_p=data.get("top_p", 1.0))
    fields = {k: v for k, v in fields.items() if v is not None}
    if sample and fields.get("temperature") == 0:
        fields["temperature"] = 1.0  # transformers refuses 0 with sampling; aksis reads 0 as greedy
    if data.get("max_new_tokens") is not None:
        fields["max_new_tokens"] = data["max_new_tokens"]
    stops = data.get("stop_strings")
    if stops is not None:
        fields["stop"] = [stops] if isinstance(stops, str) else stops
    for key in ("seed", "max_time"):
        if data.get(key) is not None:
            fields[key] = data[key]
    return fields


def generation_to_transformers(settings: dict[str, Any], eos_ids: list[int], bos_id: int | None) -> dict[str, Any]:
    """A generation_config.json that transformers reads as the same sampling defaults (from aksis GenerationConfig
    fields, `settings`), and `generation_from_transformers` reads back unchanged."""
    sample = settings["temperature"] > 0
    data: dict[str, Any] = {
        "do_sample": sample,
        "max_new_tokens": settings["max_new_tokens"],
        "repetition_penalty": settings["repetition_penalty"],
        "num_beams": settings["num_beams"],
        "length_penalty": settings["length_penalty"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
    }
    if sample:
        data.update(temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"])
    if bos_id is not None:
        data["bos_token_id"] = bos_id
    if settings.get("stop"):
        data["stop_strings"] = settings["stop"]
    for key in ("seed", "max_time"):
        if settings.get(key) is not None:
            data[key] = settings[key]
    return data


def is_transformers_generation_config(data: dict[str, Any]) -> bool:
    """A generation_config.json in transformers' vocabulary (aksis's own holds only GenerationConfig's fields)."""
    return "do_sample" in data or "transformers_version" in data or "eos_token_id" in data
