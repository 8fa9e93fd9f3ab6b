import json

import pytest

from aksis.config import PRESETS, GenerationConfig, ModelConfig


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
    assert set(PRESETS) >= {"base", "small", "tiny", "gpt2", "base-llama"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_embd=100, n_head=8), "n_embd \\(100\\) must be divisible by n_head \\(8\\)"),
        (dict(n_head=8, n_kv_head=3), "n_head \\(8\\) must be divisible by n_kv_head \\(3\\)"),
        (dict(arch="rwkv"), "arch must be one of"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(arch="llama", n_embd=12, n_head=4), "RoPE needs an even head size"),
    ],
)
def test_invalid_configs_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


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
