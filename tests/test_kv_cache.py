import pytest
import torch
from conftest import count_kernel_calls, require_aksis_kernels, tiny_config

from aksis.config import ModelConfig
from aksis.generation import _Session
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
    assert len(cache.k) == len(cache.v) == cfg.n_layer  # one tensor per layer: compiled steps write each in place
    assert {t.shape for t in (*cache.k, *cache.v)} == {(2, 2, 32, cfg.head_dim)}
    assert {(t.dtype, t.device.type) for t in (*cache.k, *cache.v)} == {
        (torch.bfloat16, "cpu")
    } and cache.dtype == torch.bfloat16
    for t in cache.k:
        t.fill_(1.0)
    cache.reset()
    assert torch.count_nonzero(torch.stack(cache.k)) == 0


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


@torch.no_grad()
def test_a_left_padded_row_computes_what_it_would_alone(arch: str) -> None:
    cfg = tiny_config(arch)
    model = GPT(cfg).eval()
    short, long = torch.randint(0, cfg.vocab_size, (1, 5)), torch.randint(0, cfg.vocab_size, (1, 9))
    alone_cache = KVCache(cfg, batch_size=1, max_len=12)
    alone, _ = model(short, kv_cache=alone_cache, input_pos=torch.arange(5))
    alone_next, _ = model(long[:, :1], kv_cache=alone_cache, input_pos=torch.tensor([5]))

    cache = KVCache(cfg, batch_size=2, max_len=16)
    cache.set_padding(torch.tensor([4, 0]))  # the short prompt is left-padded with 4 junk tokens
    batch = torch.cat([torch.cat([torch.full((1, 4), 7), short], dim=1), long])
    logits, _ = model(batch, kv_cache=cache, input_pos=torch.arange(9))
    nxt, _ = model(torch.cat([long[:, :1], long[:, :1]]), kv_cache=cache, input_pos=torch.tensor([9]))
    assert torch.isfinite(logits).all()
    assert (logits[0, 4:] - alone[0]).abs().max().item() <= 1e-5
    assert (nxt[0] - alone_next[0]).abs().max().item() <= 1e-5
    assert (logits[1] - model(long)[0][0]).abs().max().item() <= 1e-5  # the unpadded row is unaffected


@torch.no_grad()
def test_reorder_permutes_the_cached_rows() -> None:
    cfg = tiny_config("llama")
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 6))
    cache = KVCache(cfg, batch_size=3, max_len=8)
    cache.set_padding(torch.tensor([0, 2, 1]))
    model(idx, kv_cache=cache, input_pos=torch.arange(6))
    rows = torch.tensor([2, 2, 0])
    k, v, pad = torch.stack(cache.k), torch.stack(cache.v), cache.pad
    cache.reorder(rows)
    assert torch.equal(torch.stack(cache.k), k[:, rows]) and torch.equal(torch.stack(cache.v), v[:, rows])
    assert pad is not None and cache.pad is not None
    assert cache.pad.tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="one entry per row"):
        cache.set_padding(torch.tensor([1, 2]))


def test_the_base_preset_cache_is_the_size_the_arithmetic_says() -> None:
    cfg = ModelConfig.from_preset("base")
    for max_len, dtype in ((cfg.block_size, torch.float32), (288, torch.bfloat16)):
        cache = KVCache(cfg, batch_size=1, max_len=max_len, dtype=dtype)
        assert cfg.n_kv_head is not None
        expected = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * max_len * dtype.itemsize  # k and v
        assert cache.nbytes == expected
        assert sum(t.untyped_storage().nbytes() for t in (*cache.k, *cache.v)) == expected


def test_decoding_writes_into_the_cache_it_allocated_once(arch: str) -> None:
    """Prefill, decode steps, a window slide past the context and a beam reorder all reuse the one storage."""
    model = GPT(tiny_config(arch, block_size=16)).eval()
    with torch.inference_mode():
        session = _Session(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=30, vocab=300)
        cache = session.cache
        pointers = cache.data_ptrs()
        before = torch.stack(cache.k)
        tokens = session.prefill().argmax(dim=-1)
        for _ in range(20):  # 5 + 20 tokens in a context of 16: the window slides once
            tokens = session.step(tokens).argmax(dim=-1)
        session.reorder(torch.tensor([1, 1]))
        session.step(tokens[[1, 1]])
    assert session.cache is cache and cache.data_ptrs() == pointers
    assert not torch.equal(torch.stack(cache.k), before)  # it was written to


@torch.no_grad()
def test_attending_over_the_written_slots_equals_attending_over_the_whole_static_cache(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In eager mode on the CPU the cache hands attention only the slots written so far; compiled (or on a GPU)
    it hands all max_len slots and a mask. Both give the same logits, with and without left padding."""
    model = GPT(tiny_config(arch)).eval()
    idx = torch.randint(0, 300, (2, 9))

    def decode() -> torch.Tensor:
        cache = KVCache(model.config, batch_size=2, max_len=32)
        cache.set_padding(torch.tensor([3, 0]))
        steps = [model(idx[:, :6], kv_cache=cache, input_pos=torch.arange(6))[0]]
        steps += [model(idx[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t]))[0] for t in range(6, 9)]
        cache.set_padding(None)
        steps.append(model(idx[:, :1], kv_cache=cache, input_pos=torch.tensor([9]))[0])
        return torch.cat(steps, dim=1)

    sliced = decode()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    static = decode()
    torch.testing.assert_close(sliced, static, atol=1e-5, rtol=0)


@torch.no_grad()
def test_attend_through_aksis_kernel_equals_sdpa(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without padding, a few new tokens on a CPU with aksis's kernels attend through `aksis_cpu::cached_attention`,
    which reads only the slots each query sees; SDPA (over the written slots, or the whole cache and a mask as a
    compiled step has it) gives the same logits, for a prefill, chunks of new tokens and single ones."""
    from aksis import native

    require_aksis_kernels()
    model = GPT(tiny_config(arch)).eval()
    idx = torch.randint(0, 300, (2, 40))

    def decode() -> torch.Tensor:
        cache = KVCache(model.config, batch_size=2, max_len=48)
        steps = [model(idx[:, :20], kv_cache=cache, input_pos=torch.arange(20))[0]]  # > 16 tokens: SDPA
        steps.append(model(idx[:, 20:30], kv_cache=cache, input_pos=torch.arange(20, 30))[0])
        steps += [model(idx[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t]))[0] for t in range(30, 40)]
        return torch.cat(steps, dim=1)

    calls = count_kernel_calls(monkeypatch, "cached_attention")
    kernel = decode()
    assert len(calls) == model.config.n_layer * 11  # the chunk of 10 and the 10 single tokens, in every layer
    monkeypatch.setattr(native, "loaded", False)
    sdpa = decode()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    static = decode()
    torch.testing.assert_close(kernel, sdpa, atol=1e-5, rtol=0)
    torch.testing.assert_close(kernel, static, atol=1e-5, rtol=0)
