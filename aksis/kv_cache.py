"""A static, pre-allocated key/value cache for incremental decoding.

The caller creates the cache (batch size, maximum length, dtype, device) and passes it to
`GPT.forward(idx, kv_cache=cache, input_pos=pos)`; the model writes each layer's keys and values at
the slots `input_pos` and attends over everything written so far. Memory is allocated once
(2 x n_layer x B x n_kv_head x max_len x head_dim elements, `nbytes`) and every write is in place, so shapes and
storage never change between decode steps (friendly to `torch.compile` and CUDA graphs). Each layer has tensors of
its own rather than a view into one tensor for all layers: a compiled step then writes each in place, where writes
through views of one input made inductor copy the whole cache back after every layer (on a CPU, 0.9 ms of a
2.6 ms step of the base preset at int4).

Typical use (prefill the prompt, then one token at a time):

    cache = KVCache(model.config, batch_size=B, max_len=T_prompt + n_new)
    logits, _ = model(prompt, kv_cache=cache, input_pos=torch.arange(T_prompt))
    logits, _ = model(next_tok, kv_cache=cache, input_pos=torch.tensor([T_prompt]))

Slots (`input_pos`) are shared by every row of the batch. Prompts of different lengths are left-padded
to one length and the cache is told how many pad slots each row has (`set_padding`): a row's pad slots are
hidden from its real tokens, and its positions count from its first real token (`positions`), so a padded
row computes what it would alone. `reorder` permutes the rows (beam search keeps its best beams).

The model's attention layers call `attend`, which writes the new keys and values and attends over the cache:
through `F.scaled_dot_product_attention` over the slots `update` hands out, or, for a few new tokens on a CPU with
aksis's own kernels (aksis.native) and no padding, through `aksis_cpu::cached_attention`, which reads only the
slots each query sees, in a compiled step too (where SDPA's shapes must be fixed, so it reads the whole cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aksis import native
from aksis.config import ModelConfig

ATTEND_NATIVE_MAX_TOKENS = 16  # new tokens a call may bring to attend through aksis's kernel (more: a prefill, SDPA)


class KVCache:
    """Keys and values for every layer: `k[layer]`, `v[layer]` of shape (B, n_kv_head, max_len, head_dim)."""

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
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer))
        self.v = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer))
        self.dtype = dtype
        if self.k[0].is_cuda:
            # Compiled decoding on a GPU (mode="reduce-overhead") replays CUDA graphs, and inductor skips the graphs
            # of a step that writes into an input unless that input's address is fixed: say so, as it is.
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pad: torch.Tensor | None = None  # (B,) left-pad slots per row; None: no padding

    @classmethod
    def over(cls, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], pad: torch.Tensor | None = None) -> KVCache:
        """A cache over existing per-layer tensors (each (B, n_kv_head, max_len, head_dim)), written in place: how a
        step compiled ahead of time (aksis.aot) sees the cache it is handed."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.pad = tuple(k), tuple(v), pad
        cache.dtype, cache.batch_size, cache.max_len = k[0].dtype, k[0].shape[0], k[0].shape[2]
        return cache

    @property
    def nbytes(self) -> int:
        """Memory held by the keys and values: 2 x n_layer x B x n_kv_head x max_len x head_dim x element size."""
        return sum(t.nbytes for t in (*self.k, *self.v))

    def data_ptrs(self) -> tuple[int, ...]:
        """Where each layer's keys and values lie: the same for the cache's whole life (decoding writes in place)."""
        return tuple(t.data_ptr() for t in (*self.k, *self.v))

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Row b's first `pad[b]` slots hold padding: hide them and start its positions after them."""
        if pad is not None and pad.shape != (self.batch_size,):
            raise ValueError(f"padding must have one entry per row ({self.batch_size}), got shape {tuple(pad.shape)}")
        self.pad = pad.to(self.k[0].device) if pad is not None and bool(pad.any()) else None

    def positions(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Position ids of the tokens at slots `input_pos` (T,): (T,) without padding, else (B, T)."""
        if self.pad is None:
            return input_pos
        return (input_pos[None, :] - self.pad[:, None]).clamp(min=0)

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v (B, n_kv_head, T, head_dim) at slots `input_pos` (T,); return the keys and values to attend
        over, each (B, n_kv_head, S, head_dim), and the attention mask for them (None: every one of the S slots).

        S is max_len (fixed shapes, as torch.compile and CUDA graphs want), except in eager mode on the CPU, where
        it ends at the last slot written: the slots after it would be read only to be masked out, and at batch 8
        reading the whole cache is a fifth of a decode step's time. (On a GPU, finding that slot would cost a sync.)
        """
        k_all, v_all = self._write(layer, input_pos, k, v)
        if input_pos.device.type != "cpu" or torch.compiler.is_compiling():
            return k_all, v_all, self.attention_mask(input_pos)
        end = int(input_pos.max()) + 1
        # One new token without padding sees every slot up to its own: no mask needed.
        mask = None if input_pos.numel() == 1 and self.pad is None else self.attention_mask(input_pos)[..., :end]
        return k_all[:, :, :end], v_all[:, :, :end], mask

    def _write(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_all, v_all = self.k[layer], self.v[layer]  # (B, n_kv_head, max_len, head_dim)
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        return k_all, v_all

    def attend(
        self, layer: int, input_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Write k, v (B, n_kv_head, T, head_dim) at slots `input_pos` (T,), then attend the queries q
        (B, n_head, T, head_dim) over the cache, causally (and past each row's padding): (B, n_head, T, head_dim).
        Grouped-query attention when n_head is a multiple of n_kv_head."""
        if (
            self.pad is None
            and input_pos.device.type == "cpu"
            and q.dtype == self.dtype
            and q.shape[-2] <= ATTEND_NATIVE_MAX_TOKENS
            and q.shape[-1] <= native.ATTENTION_MAX_HEAD_DIM
            and (native.available() if native.loaded is None else native.loaded)
        ):
            # One op that reads, for each query, only the slots it sees (aksis.native): where SDPA would read the
            # whole cache in a compiled step, and each call would cost more around the arithmetic in eager mode.
            k_all, v_all = self._write(layer, input_pos, k, v)
            return torch.ops.aksis_cpu.cached_attention.default(q, k_all, v_all, input_pos)
        k_all, v_all, mask = self.update(layer, input_pos, k, v)  # (B, nkv, S, hd): the S slots to attend over
        gqa = q.shape[1] != k_all.shape[1]
        return F.scaled_dot_product_attention(q, k_all.type_as(q), v_all.type_as(q), attn_mask=mask, enable_gqa=gqa)

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Boolean mask, True where attention is allowed: the query in slot p sees the slots 0..p (causal over
        the cache). With padding it is (B, 1, T, max_len) and also hides each row's pad slots; a pad slot's own
        query still sees itself, so no softmax row is empty (that would write NaNs into the cache)."""
        slots = torch.arange(self.max_len, device=input_pos.device)
        causal = slots[None, :] <= input_pos[:, None]  # (T, max_len)
        if self.pad is None:
            return causal
        real = slots[None, None, :] >= self.pad[:, None, None]  # (B, 1, max_len)
        own = slots[None, :] == input_pos[:, None]  # (T, max_len)
        return (causal & (real | own))[:, None]  # (B, 1, T, max_len)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B,) in that order, e.g. the parents of the surviving beams (in place: the cache keeps
        its storage)."""
        for t in (*self.k, *self.v):
            t.copy_(t.index_select(0, rows))
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)

    def reset(self) -> None:
        """Forget everything written (only needed for reuse; stale slots are masked out anyway)."""
        for t in (*self.k, *self.v):
            t.zero_()
