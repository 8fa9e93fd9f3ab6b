from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # a dev dependency: aksis itself imports it only inside aksis.interop
from conftest import tiny_config

from aksis.interop import export_gpt2, from_hf_gpt2, from_transformers, import_gpt2, to_transformers
from aksis.model import GPT


def random_hf_gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def test_imported_gpt2_gives_the_same_logits() -> None:
    hf = random_hf_gpt2()
    model = from_hf_gpt2(hf)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        expected = hf(idx).logits
        ours, _ = model(idx)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_import_from_a_local_folder(tmp_path: Path) -> None:
    hf = random_hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    model = import_gpt2(tmp_path / "hf")
    assert model.config.n_layer == 2 and model.config.block_size == 64 and model.config.d_ff == 256
    idx = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path: Path) -> None:
    model = GPT(tiny_config(vocab_size=300)).eval()
    export_gpt2(model, tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4


def test_llama_flavour_cannot_be_exported_as_gpt2(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only GPT-2-flavour models"):
        export_gpt2(GPT(tiny_config("llama")), tmp_path / "x")


def test_unsupported_gpt2_options_are_refused() -> None:
    config = transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True
    )
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        from_hf_gpt2(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qkv_bias": True}, {"tie_embeddings": False, "head_dim": 24}],
    ids=["llama", "qwen2", "untied-head-dim"],
)
def test_llama_flavour_models_go_to_transformers_and_back_with_the_same_logits(overrides: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config("llama", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf = to_transformers(model)
    expected_class = "Qwen2ForCausalLM" if overrides.get("qkv_bias") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
        back = from_transformers(hf)
        assert back.config == model.config
        assert torch.equal(back(idx)[0], model(idx)[0])


def test_a_gpt2_flavour_model_with_grouped_query_attention_has_no_transformers_family() -> None:
    with pytest.raises(ValueError, match="no transformers family expresses this model"):
        to_transformers(GPT(tiny_config(n_kv_head=2)))
