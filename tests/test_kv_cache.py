import pytest
import torch
from conftest import tiny_config

from aksis.kv_cache import KVCache
from aksis.model import GPT


@torch.no_grad()
def test_prefill_then_cached_decode_equals_the_full_forward(arch: str) -> None:
    cfg = tiny_config(arch)
    model = GPT(cfg).eval()
    B, T, prompt = 3, 20, 7
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    full, _ = model(idx)

    cache = KVCache(cfg, batch_size=B, max_len=T)
    logits, _ = model(idx[:, :prompt], kv_cache=cache, input_pos=torch.arange(prompt))
    steps = [logits]
    for t in range(prompt, T):
        logits, _ = model(idx[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t]))
        steps.append(logits)
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_prefill_in_chunks_equals_one_prefill(arch: str) -> None:
    cfg = tiny_config(arch)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    full, _ = model(idx)
    cache = KVCache(cfg, batch_size=2)  # max_len defaults to the context
    a, _ = model(idx[:, :10], kv_cache=cache, input_pos=torch.arange(10))
    b, _ = model(idx[:, 10:], kv_cache=cache, input_pos=torch.arange(10, 16))
    assert (torch.cat([a, b], dim=1) - full).abs().max().item() <= 1e-5


def test_cache_is_preallocated_with_the_requested_shape_dtype_and_device() -> None:
    cfg = tiny_config("llama")
    cache = KVCache(cfg, batch_size=2, max_len=32, dtype=torch.bfloat16, device="cpu")
    assert cache.k.shape == (cfg.n_layer, 2, 2, 32, cfg.head_dim) == cache.v.shape
    assert cache.k.dtype == torch.bfloat16 and cache.k.device.type == "cpu"
    cache.k.fill_(1.0)
    cache.reset()
    assert torch.count_nonzero(cache.k) == 0


def test_bad_cache_use_is_a_clear_error() -> None:
    cfg = tiny_config()
    model = GPT(cfg).eval()
    with pytest.raises(ValueError, match="max_len must be between 1 and the model's context \\(64\\)"):
        KVCache(cfg, batch_size=1, max_len=65)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        KVCache(cfg, batch_size=0)
    cache = KVCache(cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch of 2 rows but the KV cache was made for 1"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache, input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="longer than the KV cache \\(8 tokens\\)"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache, input_pos=torch.arange(9))
