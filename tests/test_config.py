import argparse
import json

import pytest

from aksis.config import MODEL_PRESETS, GenerationConfig, ModelConfig, TrainConfig, parse_duration


def test_base_preset_is_the_product_default() -> None:
    cfg = ModelConfig.from_preset("base")
    assert cfg == ModelConfig()
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.d_ff, cfg.block_size, cfg.vocab_size) == (
        6,
        512,
        8,
        2048,
        512,
        10_004,
    )
    assert cfg.arch == "gpt2" and cfg.n_kv_head == 8 and cfg.head_dim == 64


def test_presets_have_the_documented_shapes() -> None:
    small, tiny, gpt2 = (ModelConfig.from_preset(n) for n in ("small", "tiny", "gpt2"))
    assert (small.n_layer, small.n_embd, small.n_head, small.d_ff) == (6, 256, 8, 1024)
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.d_ff) == (2, 128, 4, 512)
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.block_size, gpt2.vocab_size) == (12, 768, 12, 1024, 50257)
    llama = ModelConfig.from_preset("base-llama")
    assert llama.arch == "llama" and llama.n_layer == 6 and llama.n_embd == 512 and llama.n_kv_head < llama.n_head


def test_from_preset_applies_overrides_and_rejects_unknown_names() -> None:
    cfg = ModelConfig.from_preset("tiny", vocab_size=260, dropout=0.1)
    assert cfg.vocab_size == 260 and cfg.dropout == 0.1 and cfg.n_layer == 2
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*base"):
        ModelConfig.from_preset("huge")
    assert set(MODEL_PRESETS) >= {"base", "small", "tiny", "gpt2", "base-llama"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_embd=100, n_head=8), "n_embd \\(100\\) must be divisible by n_head \\(8\\)"),
        (dict(n_head=8, n_kv_head=3), "n_head \\(8\\) must be divisible by n_kv_head \\(3\\)"),
        (dict(arch="rwkv"), "arch must be one of"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(arch="llama", n_embd=12, n_head=4), "RoPE needs an even head size"),
        (dict(arch="llama", head_dim=-4), "head_dim must be a positive integer"),
        (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
        (dict(arch="llama", rope_scaling={"rope_type": "yarn"}), "rope_scaling type 'yarn' is not supported"),
        (dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs positive numbers for"),
        (dict(arch="llama", rope_scaling=[1]), "rope_scaling must be null or an object"),
    ],
)
def test_invalid_configs_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_family_knobs_are_written_only_when_a_model_uses_them() -> None:
    plain = ModelConfig.from_preset("base-llama")
    assert plain.head_dim == 64 and not {"head_dim", "rope_scaling", "qkv_bias"} & set(plain.to_dict())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    wide = ModelConfig.from_preset(
        "base-llama", head_dim=96, qkv_bias=True, rope_scaling={**scaling, "original_max_position_embeddings": 64}
    )
    assert {"head_dim", "rope_scaling", "qkv_bias"} <= set(wide.to_dict())
    assert ModelConfig.from_dict(json.loads(json.dumps(wide.to_dict()))) == wide
    smol = ModelConfig.from_preset("smollm2-135m")
    assert (smol.n_layer, smol.n_embd, smol.n_head, smol.n_kv_head, smol.d_ff, smol.vocab_size, smol.head_dim) == (
        30,
        576,
        9,
        3,
        1536,
        49_152,
        64,
    )


def test_dict_round_trip_and_unknown_fields() -> None:
    cfg = ModelConfig.from_preset("base-llama")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field.*n_layers"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


def test_generation_config_defaults_and_validation() -> None:
    gen = GenerationConfig()
    assert (gen.temperature, gen.top_k, gen.top_p) == (0.7, 50, 0.95)
    assert GenerationConfig.from_dict(gen.to_dict()) == gen
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        GenerationConfig(temperature=-1)


@pytest.mark.parametrize(
    "text, seconds", [("90", 90.0), (90, 90.0), ("90s", 90.0), ("2m", 120.0), ("1.5h", 5400.0), ("1h30m", 5400.0)]
)
def test_a_time_budget_is_seconds_or_a_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert TrainConfig(max_time=text).max_time == seconds  # type: ignore[arg-type]  # a YAML file may hold "2m"


def test_bad_time_budgets_and_the_flag() -> None:
    for bad in ("2x", "1h30", "", "0s", -5):
        with pytest.raises(ValueError, match="max_time"):
            TrainConfig(max_time=bad)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    assert TrainConfig.from_args(parser.parse_args(["--max-time", "2m"])).max_time == 120.0
    assert TrainConfig.from_args(parser.parse_args(["--max-time", "none"])).max_time is None


def test_val_split_and_model_shape_settings_are_checked() -> None:
    assert TrainConfig(val_split="tail", n_layer=4, n_embd=128, n_head=4, d_ff=512).val_split == "tail"
    with pytest.raises(ValueError, match="val_split must be one of auto, tail"):
        TrainConfig(val_split="head")
    with pytest.raises(ValueError, match="--val-split tail applies to plain text"):
        TrainConfig(val_split="tail", streaming=True, max_steps=5)
    with pytest.raises(ValueError, match="n_layer must be at least 1"):
        TrainConfig(n_layer=0)
