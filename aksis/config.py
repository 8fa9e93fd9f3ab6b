"""Configuration as data: `ModelConfig` (the network's shape), `GenerationConfig` (default sampling) and
`TrainConfig` (one training run).

All are small typed dataclasses, validated in `__post_init__`. The first two are saved as JSON beside the
weights (`config.json`, `generation_config.json`). Presets are plain dictionaries of overrides; build one with
`ModelConfig.from_preset("base", n_layer=4)`. `TrainConfig` is the single source of truth for the trainer's
command-line flags (generated from its fields and their help text) and its YAML/JSON config files. Nothing
here imports torch, so configs can be read and checked anywhere, and `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = ("gpt2", "llama")


def default_cache_dir() -> Path:
    """Where aksis keeps what it derives once and reuses (trained tokenizers, tokenized corpora, compiled decode
    steps): $AKSIS_CACHE, else beside the datasets cache."""
    if os.environ.get("AKSIS_CACHE"):
        return Path(os.environ["AKSIS_CACHE"])
    import datasets.config  # only asked for here: configs stay quick to import

    return Path(datasets.config.HF_DATASETS_CACHE) / "aksis"


GGUF_OUT_TYPES = ("f32", "f16", "q8_0", "q4_0")  # weight types of a GGUF export (aksis.gguf_format)
IGNORE_INDEX = -100  # a target with this value carries no loss (padding, a prompt token of a chat fine-tune)

# Overrides of the `ModelConfig` defaults (which are the `base` preset). A preset names only what differs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The product default: 6 x 512, 8 heads, context 512, a 10,000-token BPE plus 4 special tokens.
    "base": {},
    "small": dict(n_embd=256, n_head=8, d_ff=1024),
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, d_ff=512),
    # The 124M GPT-2 shape, so OpenAI's weights import without changes (see aksis.interop).
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, d_ff=3072, block_size=1024, vocab_size=50257),
    # LLaMA flavour of the base size: 4 KV heads (grouped-query attention) and a SwiGLU width of
    # about 2/3 * 4 * n_embd, so the MLP has as many parameters as the GELU one (3 * 512 * 1408 ~ 2 * 512 * 2048).
    "base-llama": dict(arch="llama", n_kv_head=4, d_ff=1408),
    # The shape of HuggingFaceTB/SmolLM2-135M (its 49,152-token vocabulary, 3 KV heads, tied embeddings).
    "smollm2-135m": dict(
        arch="llama",
        n_layer=30,
        n_embd=576,
        n_head=9,
        n_kv_head=3,
        d_ff=1536,
        vocab_size=49_152,
        block_size=8192,
        rope_theta=100_000.0,
    ),
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
    # Width of one attention head; 0 means n_embd // n_head. Some families set it apart (n_head * head_dim may
    # differ from n_embd: the attention's output projection maps n_head * head_dim back to n_embd).
    head_dim: int = 0
    # llama flavour only:
    rope_theta: float = 10_000.0
    # How RoPE's frequencies are stretched for a longer context: None (as trained) or a transformers-style
    # {"rope_type": "llama3", "factor": ..., "low_freq_factor": ..., "high_freq_factor": ...,
    # "original_max_position_embeddings": ...}.
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2); gpt2 has biases everywhere

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        derivable = _is_int(self.n_embd) and _is_int(self.n_head) and self.n_head > 0 and self.n_embd % self.n_head == 0
        if self.head_dim == 0 and derivable:
            self.head_dim = self.n_embd // self.n_head
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.head_dim == 0:
                problems.append(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or head_dim must be given"
                )
            elif not _is_int(self.head_dim) or self.head_dim <= 0:
                problems.append(f"head_dim must be a positive integer, got {self.head_dim!r}")
            elif self.arch == "llama" and self.head_dim % 2:
                problems.append(f"RoPE needs an even head size, got head_dim = {self.head_dim}")
            if self.n_head % self.n_kv_head:
                problems.append(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        problems.extend(rope_scaling_problems(self.rope_scaling))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("norm_eps", "rope_theta"):
            if not (_is_finite(getattr(self, name)) and getattr(self, name) > 0):
                problems.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def describe(self) -> str:
        """One line for logs and messages: "gpt2, 6 layers x 512, 8 heads, context 512, vocab 10004"."""
        return (
            f"{self.arch}, {self.n_layer} layers x {self.n_embd}, {self.n_head} heads, "
            f"context {self.block_size}, vocab {self.vocab_size}"
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset with `overrides` applied on top, e.g. `from_preset("tiny", vocab_size=260)`."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; the family knobs (head_dim, rope_scaling, qkv_bias) only where they differ from what
        the rest of the config implies, so a config.json names only what its model uses."""
        data = dataclasses.asdict(self)
        if self.head_dim == self.n_embd // self.n_head:
            del data["head_dim"]
        for name in ("rope_scaling", "qkv_bias"):
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, refusing unknown keys (a typo or a newer format should not pass silently)."""
        return cls(**_known_fields(cls, data))


ROPE_TYPES = ("default", "llama3")  # rope_scaling types aksis implements (transformers' names)
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_scaling_problems(scaling: Any) -> list[str]:
    """What is wrong with a `rope_scaling` setting (empty when it is usable)."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be null or an object, got {scaling!r}"]
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        return [f"rope_scaling type {kind!r} is not supported; aksis implements {', '.join(map(repr, ROPE_TYPES))}"]
    if kind == "llama3":
        bad = [k for k in _LLAMA3_ROPE_KEYS if not (_is_finite(scaling.get(k)) and scaling[k] > 0)]
        if bad:
            return [f"rope_scaling of type 'llama3' needs positive numbers for {', '.join(bad)}"]
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            return ["rope_scaling of type 'llama3' needs high_freq_factor > low_freq_factor"]
    return []


MIN_TEMPERATURE = 1e-3
MIN_PENALTY = 1e-2  # repetition penalties from this to its inverse
MAX_BEAMS = 64  # beams are sequences decoded together: a wider search costs as much as that many generations
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    # Seconds a generation may take (after the prompt is read); it then ends with finish_reason "time". A public
    # Space bounds every request this way.
    max_time: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_new_tokens", "top_k", "num_beams"):
            if not _is_int(getattr(self, name)):
                problems.append(f"{name} must be a whole number, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            if not _is_finite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if problems:  # the checks below compare numbers
            raise ValueError("invalid GenerationConfig: " + "; ".join(problems))
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        elif 0 < self.temperature < MIN_TEMPERATURE:
            # Below this, logits / temperature overflow to infinity and nothing can be sampled.
            problems.append(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not MIN_PENALTY <= self.repetition_penalty <= 1 / MIN_PENALTY:
            problems.append(
                f"repetition_penalty must be between {MIN_PENALTY} and {1 / MIN_PENALTY:g} (1: none), "
                f"got {self.repetition_penalty}"
            )
        if not 1 <= self.num_beams <= MAX_BEAMS:
            problems.append(f"num_beams must be between 1 and {MAX_BEAMS}, got {self.num_beams}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            problems.append(f"seed must be a whole number from 0 to {MAX_SEED} (or unset), got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            problems.append(f"stop must be a list of strings, got {self.stop!r}")
        if self.max_time is not None and not (_is_finite(self.max_time) and self.max_time > 0):
            problems.append(f"max_time must be a positive number of seconds (or unset), got {self.max_time!r}")
        if problems:
            raise ValueError("invalid GenerationConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        return cls(**_known_fields(cls, data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _help(text: str) -> Any:
    return field(metadata={"help": text})


@dataclass
class TrainConfig:
    """Everything that decides a training run. `training/train.py` and `aksis train-model` expose each field
    as a flag (`learning_rate` -> `--learning-rate`); a YAML or JSON file (`--config`) may set any of them."""

    # data
    dataset: str = "shakespeare"
    data_format: str = "text"
    text_column: str | None = None
    streaming: bool = False
    tokenizer: str = "bpe"
    vocab_size: int = 10_004
    val_fraction: float = 0.05
    val_split: str = "auto"
    stride: int | None = None
    num_proc: int | None = None
    data_cache: str | None = None
    # model
    preset: str = "base"
    arch: str | None = None
    block_size: int | None = None
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    d_ff: int | None = None
    dropout: float | None = None
    init_from: str | None = None
    # optimisation
    epochs: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None
    batch_size: int = 16
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.9
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    compile: bool = False
    seed: int = 1337
    device: str = "auto"
    # evaluation, checkpoints, logging
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int | None = None
    keep_last: int = 2
    patience: int | None = None
    output_dir: str = "checkpoints/run"
    resume: str | None = None
    overwrite: bool = False
    log_every: int = 10
    report_to: str = "none"
    progress: bool = True
    # sharing on the Hugging Face Hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool | None = None
    hub_license: str | None = None
    push_every: int | None = None
    push_training_state: bool = False

    def __post_init__(self) -> None:
        problems = []
        try:  # a number of seconds, or "90s", "2m", "1h30m" from a config file
            self.max_time = None if self.max_time is None else parse_duration(self.max_time)
        except ValueError as err:
            problems.append(str(err))
        else:
            if self.max_time is not None and not 0 < self.max_time < math.inf:
                problems.append(f"max_time must be a positive number of seconds (or unset), got {self.max_time}")
        for name in ("vocab_size", "epochs", "batch_size", "grad_accum_steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "stride",
            "num_proc",
            "block_size",
            "n_layer",
            "n_embd",
            "n_head",
            "d_ff",
            "max_steps",
            "max_tokens",
            "save_every",
            "patience",
            "push_every",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 (or unset), got {value}")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("--push-to-hub needs --hub-model-id user/name (the repo to push to)")
        if not self.push_to_hub and (self.hub_model_id or self.push_training_state or self.push_every):
            problems.append("--hub-model-id, --push-every and --push-training-state apply with --push-to-hub")
        if self.log_every < 1 or self.keep_last < 1:
            problems.append("log_every and keep_last must be at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        floats = (
            "learning_rate",
            "min_lr_ratio",
            "weight_decay",
            "beta1",
            "beta2",
            "momentum",
            "muon_lr",
            "muon_momentum",
            "muon_weight_decay",
            "grad_clip",
        )
        bad = [f"{name} {getattr(self, name)!r}" for name in floats if not _is_finite(getattr(self, name))]
        if bad or (self.dropout is not None and not _is_finite(self.dropout)):
            problems.append(f"these settings must be finite numbers: {', '.join(bad) or f'dropout {self.dropout!r}'}")
        elif self.learning_rate <= 0 or self.muon_lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append("learning_rate and muon_lr must be positive and min_lr_ratio in [0, 1]")
        elif min(self.weight_decay, self.muon_weight_decay, self.grad_clip) < 0:
            problems.append(
                "weight_decay, muon_weight_decay and grad_clip must be >= 0 (grad_clip 0 disables clipping)"
            )
        elif not all(0.0 <= getattr(self, name) < 1.0 for name in ("beta1", "beta2", "momentum", "muon_momentum")):
            problems.append("beta1, beta2, momentum and muon_momentum must be in [0, 1)")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:  # numpy's seeds, which accelerate's set_seed sets
            problems.append(f"seed must be a whole number from 0 to {2**32 - 1}, got {self.seed!r}")
        choices = {
            "optimizer": OPTIMIZERS,
            "mixed_precision": MIXED_PRECISIONS,
            "device": DEVICES,
            "report_to": REPORTERS,
            "data_format": DATA_FORMATS,
            "val_split": VAL_SPLITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.arch is not None and self.arch not in ARCHS:
            problems.append(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.preset not in MODEL_PRESETS:
            problems.append(f"preset must be one of {', '.join(MODEL_PRESETS)}, got {self.preset!r}")
        if self.data_format == "chat" and self.streaming:
            problems.append(
                "--streaming cannot be combined with --data-format chat (conversations are tokenized "
                "and cached whole); drop --streaming"
            )
        if self.val_split != "auto" and (self.streaming or self.data_format == "chat"):
            problems.append("--val-split tail applies to plain text that is not streamed")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From a dict whose keys are field names (dashes allowed: `learning-rate`); unknown keys are errors."""
        return cls(**_known_fields(cls, {k.replace("-", "_"): v for k, v in data.items()}))

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """From a YAML (.yaml/.yml) or JSON file of field names and values."""
        return cls.from_dict(read_settings(path))

    # ----- command line -----

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, with its help text; defaults stay unset so a config file can fill them."""
        parser.add_argument(
            "--config", metavar="FILE", help="a YAML or JSON file of settings (e.g. training/configs/tiny-cpu.yaml)"
        )
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            default = f"(default: {f.default})"
            help_text = f"{TRAIN_HELP[f.name]} {default}".replace("%", "%%")
            if kind is bool or kind == bool | None:
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            elif f.name == "resume":  # --resume alone means: the latest checkpoint in --output-dir
                parser.add_argument(
                    flag, nargs="?", const="latest", default=argparse.SUPPRESS, metavar="PATH", help=help_text
                )
            else:
                base = TRAIN_TYPES.get(f.name) or next(
                    t for t in typing.get_args(kind) or (kind,) if t is not type(None)
                )
                choices = TRAIN_CHOICES.get(f.name)
                parser.add_argument(
                    flag,
                    type=_optional(base) if _is_optional(kind) else base,
                    choices=choices,
                    default=argparse.SUPPRESS,
                    metavar=None if choices else f.name.upper(),
                    help=help_text,
                )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """Defaults, then the `--config` file, then the flags given on the command line."""
        settings: dict[str, Any] = {}
        if getattr(args, "config", None):
            settings.update({k.replace("-", "_"): v for k, v in read_settings(args.config).items()})
        names = {f.name for f in dataclasses.fields(cls)}
        settings.update({k: v for k, v in vars(args).items() if k in names})
        return cls.from_dict(settings)


# Settings that change where a run keeps its files, what it reports and where it pushes, not what it trains: a run
# resumed with other values (on another machine, say) still matches an uninterrupted one.
BOOKKEEPING = (
    "output_dir",
    "resume",
    "overwrite",
    "progress",
    "report_to",
    "log_every",
    "save_every",
    "keep_last",
    "data_cache",
    "num_proc",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "hub_license",
    "push_every",
    "push_training_state",
)
OPTIMIZERS = ("adamw", "adam", "sgd", "muon")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
REPORTERS = ("none", "tensorboard", "wandb", "trackio")
DATA_FORMATS = ("text", "chat")
VAL_SPLITS = ("auto", "tail")
TRAIN_CHOICES = {
    "data_format": DATA_FORMATS,
    "optimizer": OPTIMIZERS,
    "mixed_precision": MIXED_PRECISIONS,
    "device": DEVICES,
    "report_to": REPORTERS,
    "preset": tuple(MODEL_PRESETS),
    "arch": ARCHS,
    "val_split": VAL_SPLITS,
}
TRAIN_HELP = {
    "dataset": "corpus: 'shakespeare' (embedded, offline), wikitext2, wikitext103, tiny_shakespeare, tinystories, "
    "fineweb-edu, a Hub dataset id, or local .txt/.md/.jsonl/.parquet files, a folder or a glob; with "
    "--data-format chat: 'shakespeare-chat' (embedded; 'shakespeare' means it too), smoltalk, "
    "everyday-conversations, a Hub dataset id or local .jsonl/.json/.parquet files with a 'messages' column",
    "data_format": "'text': plain text, the loss on every token; 'chat': conversations (a 'messages' column of "
    "{role, content}) in the chat template, the loss only on the assistant's replies (fine-tune with --init-from)",
    "text_column": "the column holding the text (or, with --data-format chat, the messages), for Hub ids and "
    ".jsonl/.parquet files",
    "streaming": "read the corpus as a stream (for corpora too large to download); needs --max-steps, --max-tokens "
    "or --max-time",
    "tokenizer": "'bpe' (trained on the corpus once, then cached), 'byte', a tiktoken encoding (cl100k_base, gpt2, "
    "...), or a tokenizer.json path",
    "vocab_size": "size of the trained BPE, the 4 special tokens included",
    "val_fraction": "share of the corpus held out for validation when it has no validation split",
    "val_split": "how the validation share is held out when the corpus has no validation split: 'auto' (whole "
    "documents when there are 20 or more, else the tail of each cut at a line break) or 'tail' (the last "
    "val_fraction of each document's characters, cut exactly: nanoGPT's split of one file)",
    "stride": "tokens between the starts of training blocks (smaller than the context: overlapping blocks)",
    "num_proc": "processes for tokenizing",
    "data_cache": "folder for cached tokenizers and tokenized corpora ($AKSIS_CACHE, else the datasets cache)",
    "preset": "model size",
    "arch": "'gpt2' (learned positions, LayerNorm, GELU) or 'llama' (RoPE, RMSNorm, SwiGLU); default: the preset's",
    "block_size": "context length in tokens; default: the preset's (or the --init-from model's)",
    "n_layer": "transformer blocks; default: the preset's (for a new model)",
    "n_embd": "model width; default: the preset's (for a new model)",
    "n_head": "attention heads; default: the preset's (for a new model)",
    "d_ff": "hidden width of the MLP; default: the preset's (for a new model)",
    "dropout": "dropout rate; default: the preset's",
    "init_from": "start from this checkpoint (folder or Hub id), with its config and tokenizer, e.g. to fine-tune",
    "epochs": "passes over the training data",
    "max_steps": "stop after this many optimizer steps (sets the length of the LR schedule)",
    "max_tokens": "stop after this many training tokens (all processes together)",
    "max_time": "stop after this much wall-clock time in the training loop: seconds, or 90s, 2m, 1.5h, 1h30m; the "
    "cosine then follows the share of it spent (a resumed run counts the time already spent)",
    "batch_size": "blocks per batch, per process",
    "grad_accum_steps": "batches accumulated per optimizer step",
    "optimizer": "AdamW (weight decay on matrices only), Adam, SGD with momentum, or Muon (orthogonalised momentum "
    "on the blocks' weight matrices, AdamW with --learning-rate on embeddings, output layer, norms and biases)",
    "learning_rate": "peak learning rate",
    "min_lr_ratio": "the cosine decay ends at learning_rate x this",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW/SGD weight decay, applied to weight matrices and embeddings only",
    "beta1": "Adam beta1",
    "beta2": "Adam beta2",
    "momentum": "SGD momentum",
    "muon_lr": "Muon's peak learning rate (its matrices; scaled by sqrt(rows / columns) for tall ones)",
    "muon_momentum": "Muon's momentum (Nesterov)",
    "muon_weight_decay": "Muon's decoupled weight decay, times its learning rate each step",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "mixed_precision": "autocast precision",
    "compile": "compile the model with torch.compile",
    "seed": "random seed (initialisation, data order, dropout)",
    "device": "where to train when not under a distributed `accelerate launch`",
    "eval_every": "evaluate on the validation split every N steps (and at the end)",
    "eval_batches": "validation batches per evaluation",
    "save_every": "save a resumable checkpoint every N steps (default: with every evaluation)",
    "keep_last": "how many step checkpoints to keep (the best one is kept separately)",
    "patience": "stop when the validation loss has not improved for this many evaluations",
    "output_dir": "the run folder: step-N checkpoints, best/, metrics.jsonl",
    "resume": "continue a run: alone, from the latest checkpoint in --output-dir; or from a step-N folder, or a "
    "training state pushed to the Hub (user/name@training-state)",
    "overwrite": "start afresh in an --output-dir that already holds this run's checkpoints (deletes them); with "
    "--push-to-hub, also move the step-N tags another run left in the repo to this run's checkpoints",
    "log_every": "log the training loss every N steps",
    "report_to": "also log to this tracker",
    "progress": "show a progress bar",
    "push_to_hub": "push checkpoints to the Hugging Face Hub as training goes (in the background), and the best "
    "model to main at the end; the token comes from HF_TOKEN or `hf auth login`",
    "hub_model_id": "the Hub repo to push to, user/name or org/name (created if needed)",
    "hub_private": "make the Hub repo private (--hub-private) or public (--no-hub-private); unset: a new repo is "
    "public and an existing one keeps its visibility",
    "hub_license": "the license in the model card (e.g. mit, apache-2.0)",
    "push_every": "push a step checkpoint (tagged step-N) every N steps (default: every saved checkpoint)",
    "push_training_state": "also push the resumable training state to the branch 'training-state', so "
    "`--resume user/name@training-state` continues the run on another machine",
}


def parse_duration(text: str | float) -> float:
    """Seconds from a number or a duration such as "90", "90s", "2m", "1.5h" or "1h30m"."""
    if isinstance(text, int | float):
        return float(text)
    value = text.strip().lower()
    try:
        return float(value)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)\s*([hms])", value)
    if not parts or re.sub(r"(\d+(?:\.\d*)?|\.\d+)\s*[hms]", "", value).strip():
        raise ValueError(f"max_time must be seconds or a duration such as 90s, 2m, 1.5h or 1h30m, got {text!r}")
    return sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)


def duration(text: str) -> float:
    """The argparse type of --max-time (argparse names it in its error: "invalid duration value")."""
    return parse_duration(text)


TRAIN_TYPES: dict[str, Any] = {"max_time": duration}  # flags parsed by something else than their field's type


def read_settings(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a YAML or JSON file, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read the config file {path}: {err.strerror}") from err
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise their own error types
        raise ValueError(f"the config file {path} is not valid {path.suffix.lstrip('.').upper()}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"the config file {path} must hold a mapping of setting: value")
    return data


def _is_optional(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)


def _optional(base: type) -> Any:
    """An argparse type that also accepts 'none' (to unset an optional setting)."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s): {', '.join(unknown)}; expected some of: {', '.join(sorted(names))}"
        )
    return dict(data)
