"""transformers checkpoints (LLaMA, Qwen2, Mistral, GPT-2 families) read by aksis without transformers: the same
logits with and without the KV cache, the same greedy tokens as transformers' generate, and one-line refusals of what
aksis cannot read. transformers (a dev dependency) makes the random-weight reference models."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from aksis.checkpoint import CheckpointError, load_generation_config, load_gpt
from aksis.config import GenerationConfig, ModelConfig
from aksis.generation import generate
from aksis.kv_cache import KVCache
from aksis.tokenizer import Tokenizer
from aksis.transformers_format import (
    FormatError,
    config_from_transformers,
    generation_from_transformers,
    generation_to_transformers,
)

transformers = pytest.importorskip("transformers")

VOCAB = 260  # the byte-level tokenizer's size: generation samples only ids a tokenizer can decode
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)


def hf_model(family: str, **overrides: Any) -> Any:
    """A random-weight transformers model of `family`, tiny, deterministic."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4, **overrides)
        return transformers.GPT2LMHeadModel(config).eval()
    settings: dict[str, Any] = {**SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, **overrides}
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    model = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**settings))
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-head-dim": ("llama", {"head_dim": 24}),  # n_head * head_dim != hidden_size
    "llama3-rope": (
        "llama",
        {
            "rope_theta": 500_000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1_000_000.0}),
    "mistral": ("mistral", {"sliding_window": 4096}),
    "gpt2": ("gpt2", {}),
}


@pytest.fixture(params=list(CASES), scope="module")
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    family, overrides = CASES[request.param]
    hf = hf_model(family, **overrides)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, folder


def test_logits_equal_transformers_with_and_without_the_kv_cache(saved: tuple[Any, Path]) -> None:
    hf, folder = saved
    model = load_gpt(folder)
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        plain, _ = model(idx)
        cache = KVCache(model.config, batch_size=2, max_len=48)
        first, _ = model(idx[:, :30], kv_cache=cache, input_pos=torch.arange(30))
        steps = [model(idx[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t]))[0] for t in range(30, 40)]
    assert (plain - expected).abs().max().item() < 1e-4
    cached = torch.cat([first, *steps], dim=1)
    assert (cached - expected).abs().max().item() < 1e-4


def test_greedy_generation_equals_transformers_token_for_token(saved: tuple[Any, Path]) -> None:
    hf, folder = saved
    model = load_gpt(folder)
    prompt = [5, 17, 99, 3, 250, 42]
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    ours = generate(
        model, Tokenizer.byte_level(), prompt, GenerationConfig(max_new_tokens=20, temperature=0.0), stop_ids=set()
    )
    assert ours.token_ids == expected


def test_sharded_weights_load_from_their_index(tmp_path: Path) -> None:
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_gpt(tmp_path)
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_a_mapped_config_has_the_family_knobs() -> None:
    config = config_from_transformers(
        {
            "model_type": "qwen2",
            "vocab_size": 151_936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
        }
    )
    assert config == ModelConfig(
        arch="llama",
        vocab_size=151_936,
        block_size=32768,
        n_layer=24,
        n_embd=896,
        n_head=14,
        n_kv_head=2,
        d_ff=4864,
        norm_eps=1e-6,
        rope_theta=1_000_000.0,
        qkv_bias=True,
        tie_embeddings=True,
    )
    mistral = config_from_transformers({**_llama_json(), "model_type": "mistral", "sliding_window": 64})
    assert mistral.block_size == 64  # the window is the context aksis serves


def _llama_json(**overrides: Any) -> dict[str, Any]:
    return {"model_type": "llama", **SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "phi3"}, "model_type is 'phi3'; aksis reads the llama, qwen2, mistral, gpt2 families"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        ({"mlp_bias": True}, "biases in the MLP"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
        ({"num_attention_heads": 3}, "n_embd \\(64\\) must be divisible by n_head \\(3\\)"),
        ({"hidden_size": None}, "hidden_size is missing"),
    ],
)
def test_configs_aksis_cannot_run_are_refused_by_name(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        config_from_transformers(_llama_json(**overrides))


def test_bad_repos_give_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    hf = hf_model("llama")
    good = tmp_path / "good"
    hf.save_pretrained(good)

    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps(_llama_json(model_type="falcon")))
    with pytest.raises(CheckpointError, match="config.json: its model_type is 'falcon'; aksis reads the llama"):
        load_gpt(unsupported)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never pytorch_model.bin \\(a pickle, which can run code"):
        load_gpt(pickled)

    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists {shard.name}, which .* lacks: the upload is incomplete"):
        load_gpt(sharded)

    mismatched = tmp_path / "mismatched"
    hf.save_pretrained(mismatched)
    (mismatched / "config.json").write_text(
        json.dumps({**json.loads((good / "config.json").read_text()), "intermediate_size": 64})
    )
    wrong = r"model.safetensors does not match config.json.*mlp.gate_proj.weight is \(96, 64\) in the file but \(64, 64"
    with pytest.raises(CheckpointError, match=wrong):
        load_gpt(mismatched)

    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "config.json").write_text((good / "config.json").read_text())
    (escaping / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../good/model.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="names weight files aksis does not read"):
        load_gpt(escaping)
    assert sorted(p.name for p in pickled.iterdir()) == ["config.json", "pytorch_model.bin"]  # nothing written


def test_a_tied_file_may_also_hold_the_output_projection(tmp_path: Path) -> None:
    hf = hf_model("llama", tie_word_embeddings=True, num_key_value_heads=4)
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_gpt(tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_sampling_defaults_come_from_transformers_generation_config(tmp_path: Path) -> None:
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    assert load_generation_config(tmp_path) == GenerationConfig()  # none: aksis's defaults
    transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=64).save_pretrained(
        tmp_path
    )
    settings = load_generation_config(tmp_path)
    assert (settings.temperature, settings.top_p, settings.top_k, settings.max_new_tokens) == (0.6, 0.9, 50, 64)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 3]).save_pretrained(tmp_path)
    assert load_generation_config(tmp_path).temperature == 0.0  # do_sample false: greedy


def test_generation_config_round_trips_through_transformers_vocabulary() -> None:
    for config in (GenerationConfig(), GenerationConfig(temperature=0.0, stop=["\n\n"], seed=3, max_time=5.0)):
        data = generation_to_transformers(config.to_dict(), eos_ids=[7], bos_id=None)
        assert GenerationConfig.from_dict(generation_from_transformers(data)) == config
        assert transformers.GenerationConfig(**data).do_sample == (config.temperature > 0)


def test_bf16_weights_load_as_stored_or_widened(tmp_path: Path) -> None:
    hf = hf_model("qwen2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    as_stored = load_gpt(tmp_path, dtype=torch.bfloat16)  # read straight into the parameters
    widened = load_gpt(tmp_path)  # through a temporary bf16 tensor
    q = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(as_stored.transformer.h[1].attn.c_attn.weight[: q.size(0)], q)
    assert widened.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(widened.transformer.wte.weight, hf.state_dict()["model.embed_tokens.weight"].float())


def test_a_truncated_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    hf_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_gpt(tmp_path)


# ----- aksis checkpoints in transformers' layout -----


@pytest.fixture(scope="module")
def bpe(shakespeare_texts: list[str]) -> Tokenizer:
    return Tokenizer.train(shakespeare_texts[:300], vocab_size=400)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_aksis_checkpoint_loads_in_transformers_and_generates_the_same_ids(
    arch: str, bpe: Tokenizer, tmp_path: Path
) -> None:
    from conftest import tiny_config

    from aksis.chat_template import Message, render
    from aksis.checkpoint import load_model, save_checkpoint
    from aksis.model import GPT

    torch.manual_seed(0)
    model = GPT(tiny_config(arch, vocab_size=400, qkv_bias=arch == "llama")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    save_checkpoint(model, tmp_path, tokenizer=bpe, base_model="someone/base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if arch == "llama" else "GPT2LMHeadModel")
    text = "ROMEO: But soft! what light through yonder window breaks? 1234  spaces\n\ttabs <|endoftext|> 🙂"
    # transformers reads a special's spelling in text as the token unless told not to; aksis always keeps it text
    assert fast(text, split_special_tokens=True).input_ids == bpe.encode(text)
    loaded, tokenizer, _ = load_model(tmp_path, device="cpu")
    assert tokenizer.kind == "bpe" and tokenizer.encoding._mergeable_ranks == bpe.encoding._mergeable_ranks
    prompt = bpe.encode("JULIET: Romeo,")
    ours = generate(loaded, tokenizer, prompt, GenerationConfig(max_new_tokens=16, temperature=0.0), stop_ids=set())
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert ours.token_ids == theirs[0, len(prompt) :].tolist()
    messages = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello.")]
    chat = fast.apply_chat_template([m.to_dict() for m in messages], add_generation_prompt=True, return_dict=False)
    assert list(chat) == render(bpe, messages, add_generation_prompt=True)[0]
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["aksis"]["base_model"] == "someone/base"
    assert "base_model: someone/base" in (tmp_path / "README.md").read_text()


def test_a_pretrained_models_tokenizer_files_are_written_back_as_they_came(
    shakespeare_texts: list[str], tmp_path: Path
) -> None:
    from conftest import write_hf_repo

    from aksis.checkpoint import load_model, save_checkpoint

    write_hf_repo(tmp_path / "hf", shakespeare_texts[:100])
    model, tokenizer, settings = load_model(tmp_path / "hf", device="cpu")
    save_checkpoint(model, tmp_path / "again", tokenizer=tokenizer, generation_config=settings)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "Good den"}]
    assert again.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert again.eos_token == "<|im_end|>"
    _, reloaded, reloaded_settings = load_model(tmp_path / "again", device="cpu")
    assert reloaded.eos_ids == tokenizer.eos_ids and reloaded.chat_template == tokenizer.chat_template
    assert reloaded_settings == settings


def test_a_mismatched_transformers_layout_config_is_refused_before_allocating(bpe: Tokenizer, tmp_path: Path) -> None:
    from conftest import tiny_config

    from aksis.checkpoint import save_checkpoint
    from aksis.model import GPT

    save_checkpoint(GPT(tiny_config("llama", vocab_size=400)), tmp_path, tokenizer=bpe)
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "vocab_size": 2**40}))
    with pytest.raises(
        CheckpointError, match=r"model.embed_tokens.weight is \(400, 64\) in the file but \(1099511627776, 64\)"
    ):
        load_gpt(tmp_path)
    path.write_text(json.dumps({**good, "num_hidden_layers": 20_000}))
    with pytest.raises(CheckpointError, match="holds 2 layers but config.json beside it asks for 20000"):
        load_gpt(tmp_path)
    path.write_text(json.dumps({**good, "aksis": [1]}))
    with pytest.raises(CheckpointError, match='its "aksis" entry should be an object'):
        load_gpt(tmp_path)
