"""Configuration as data: `ModelConfig` (the network's shape) and `GenerationConfig` (default sampling).

Both are small typed dataclasses, validated in `__post_init__` and saved as JSON beside the weights
(`config.json`, `generation_config.json`). Presets are plain dictionaries of overrides; build one with
`ModelConfig.from_preset("base", n_layer=4)`. Nothing here imports torch, so configs can be read and
checked anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = ("gpt2", "llama")

# Overrides of the `ModelConfig` defaults (which are the `base` preset). A preset names only what differs.
PRESETS: dict[str, dict[str, Any]] = {
    # The product default: 6 x 512, 8 heads, context 512, a 10,000-token BPE plus 4 special tokens.
    "base": {},
    "small": dict(n_embd=256, n_head=8, d_ff=1024),
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, d_ff=512),
    # The 124M GPT-2 shape, so OpenAI's weights import without changes (see aksis.interop).
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, d_ff=3072, block_size=1024, vocab_size=50257),
    # LLaMA flavour of the base size: 4 KV heads (grouped-query attention) and a SwiGLU width of
    # about 2/3 * 4 * n_embd, so the MLP has as many parameters as the GELU one (3 * 512 * 1408 ~ 2 * 512 * 2048).
    "base-llama": dict(arch="llama", n_kv_head=4, d_ff=1408),
}


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer. The defaults are the `base` preset."""

    arch: str = "gpt2"  # "gpt2": learned positions, LayerNorm, GELU, biases | "llama": RoPE, RMSNorm, SwiGLU
    vocab_size: int = 10_004
    block_size: int = 512  # context length in tokens
    n_layer: int = 6
    n_embd: int = 512
    n_head: int = 8
    n_kv_head: int | None = None  # None means n_head (multi-head attention); fewer gives grouped-query attention
    d_ff: int = 2048  # hidden width of the MLP
    dropout: float = 0.0
    tie_embeddings: bool = True  # share the input embedding with the output projection
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0  # llama flavour only

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.n_embd % self.n_head:
                problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            if self.n_head % self.n_kv_head:
                problems.append(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
            if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
                problems.append(f"RoPE needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            problems.append("norm_eps and rope_theta must be positive")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset with `overrides` applied on top, e.g. `from_preset("tiny", vocab_size=260)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, refusing unknown keys (a typo or a newer format should not pass silently)."""
        return cls(**_known_fields(cls, data))


@dataclass
class GenerationConfig:
    """Default sampling settings saved with a checkpoint (`generation_config.json`)."""

    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables
    num_beams: int = 1  # > 1 switches to beam search
    length_penalty: float = 1.0  # beam search only
    stop: list[str] = field(default_factory=list)  # stop strings, in addition to <|endoftext|>
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if problems:
            raise ValueError("invalid GenerationConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        return cls(**_known_fields(cls, data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s): {', '.join(unknown)}; expected some of: {', '.join(sorted(names))}"
        )
    return dict(data)
