"""A static, pre-allocated key/value cache for incremental decoding.

The caller creates the cache (batch size, maximum length, dtype, device) and passes it to
`GPT.forward(idx, kv_cache=cache, input_pos=pos)`; the model writes each layer's keys and values at
the slots `input_pos` and attends over everything written so far. Memory is allocated once, so the
shapes never change between decode steps (friendly to `torch.compile` and CUDA graphs).

Typical use (prefill the prompt, then one token at a time):

    cache = KVCache(model.config, batch_size=B, max_len=T_prompt + n_new)
    logits, _ = model(prompt, kv_cache=cache, input_pos=torch.arange(T_prompt))
    logits, _ = model(next_tok, kv_cache=cache, input_pos=torch.tensor([T_prompt]))

Positions are shared by every row of the batch.
"""

from __future__ import annotations

import torch

from aksis.config import ModelConfig


class KVCache:
    """Keys and values for every layer: `k`, `v` of shape (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        max_len = config.block_size if max_len is None else max_len
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 1 <= max_len <= config.block_size:
            raise ValueError(f"max_len must be between 1 and the model's context ({config.block_size}), got {max_len}")
        assert config.n_kv_head is not None  # set by ModelConfig.__post_init__
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch_size = batch_size
        self.max_len = max_len

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at slots `input_pos` (T,) and return the layer's whole cache."""
        k_all, v_all = self.k[layer], self.v[layer]  # (B, n_kv_head, max_len, head_dim), views
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        return k_all, v_all

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (T, max_len) mask: the query at position p sees the slots 0..p (causal over the cache)."""
        slots = torch.arange(self.max_len, device=input_pos.device)
        return slots[None, :] <= input_pos[:, None]

    def reset(self) -> None:
        """Forget everything written (only needed for reuse; stale slots are masked out anyway)."""
        self.k.zero_()
        self.v.zero_()
