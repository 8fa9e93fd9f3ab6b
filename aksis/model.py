"""The decoder-only transformer, in two flavours chosen once from `ModelConfig.arch`.

- "gpt2": learned positional embeddings, pre-norm LayerNorm, GELU MLP (tanh approximation, as in GPT-2),
  biases everywhere, tied input/output embeddings. Parameter names follow Hugging Face's GPT-2, so its
  weights map over with only the Conv1D transposes (see aksis.interop).
- "llama": rotary position embeddings (RoPE), RMSNorm, SwiGLU MLP, no biases, grouped-query attention.

Attention goes through `F.scaled_dot_product_attention`, which never materialises the attention probabilities (with a
KV cache, through the cache's `attend`, which may use aksis's own CPU kernel); `GPT.attention_weights` recomputes
them for one layer, for inspection. `forward(..., last_only=True)` projects only
the last position onto the vocabulary, which is all generation needs.

The model knows nothing about sampling, files or the Hub: it maps token ids to logits, optionally reading and
writing a caller-owned `KVCache`. Saving and loading live in aksis.checkpoint; faster layers for inference are
swapped in by aksis.kernels when a model is loaded to run.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from aksis.config import IGNORE_INDEX, ModelConfig
from aksis.kv_cache import KVCache

Rope = tuple[torch.Tensor, torch.Tensor]  # cos and sin of the rotation angles of each position (llama)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: the mean of squares loses too much precision in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def maybe_dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, skipped where it changes nothing (evaluation, or p = 0): a decode step passes 13 of them, and
    each call costs about 2 microseconds."""
    return module(x) if module.training and module.p > 0 else x


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """The rotation frequency of each pair of a head's dimensions, (head_dim // 2,): theta^(-2i / head_dim), stretched
    as `config.rope_scaling` says ("llama3": long wavelengths slowed by `factor`, short ones kept, a smooth blend
    between, as Llama 3.1 was trained)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: long waves, 1: short ones
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (block_size, head_dim // 2)."""
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), rope_frequencies(config))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head: x (B, T, n_head, hd), cos/sin (T, hd/2) or (B, T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, hd/2) or per row (B, T, 1, hd/2): over heads
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        assert config.n_kv_head is not None
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        bias = config.arch == "gpt2"
        # One fused projection for queries, keys and values (keys/values are narrower under GQA).
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=bias or config.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        kv_cache: KVCache | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if kv_cache is None:
            dropout, gqa = self.dropout if self.training else 0.0, self.n_kv_head != self.n_head
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
        else:
            assert input_pos is not None
            y = kv_cache.attend(self.layer, input_pos, q, k, v)  # writes k, v at input_pos, attends over the cache
        y = y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, nh * hd)
        return maybe_dropout(self.resid_dropout, self.c_proj(y))

    def attention_weights(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) under the causal mask, (B, n_head, T, T) in float32, for this layer's input x
        (B, T, C) without a cache: what SDPA in `forward` computes without ever materialising it. For inspection
        (the app's attention view), not speed."""
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, _ = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # GQA: query head h reads key head h // (nh / nkv), as SDPA's enable_gqa does.
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=2)  # (B, T, nh, hd)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, nh, T, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    """GELU MLP (gpt2 flavour): c_proj(gelu(c_fc(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_dropout(self.dropout, self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """SwiGLU MLP (llama flavour): c_proj(silu(w_gate(x)) * w_up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.w_up = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_dropout(self.dropout, self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x)))


def make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "llama":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.arch == "llama" else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        kv_cache: KVCache | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, input_pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """Embeddings, blocks and final norm; named as in GPT-2 (`transformer.wte`, `transformer.h.0.attn`, ...)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.arch == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)


class GPT(nn.Module):
    """A decoder-only transformer language model, built only from a `ModelConfig`."""

    rope_cos: torch.Tensor  # llama flavour: buffers (block_size, head_dim // 2)
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.arch == "llama":
            cos, sin = rope_tables(config)
            # Not persistent: derived from the config, so they never go into checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def reset_rope(self) -> None:
        """Compute the RoPE tables again, on the device of the weights: for a model built on the meta device (no
        memory, no initialisation) and then given storage with `to_empty` to receive a checkpoint's weights."""
        if self.config.arch == "llama":
            cos, sin = rope_tables(self.config)
            device = self.transformer.wte.weight.device
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        """The blocks' input for token ids `idx` (B, T) at positions `pos` (T,) or (B, T), and the RoPE tables of
        those positions (llama; None for gpt2, whose positions are added here)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.transformer.wpe is not None:  # gpt2: learned positions
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch, or (B, T, C)
        else:  # llama: rotary positions, applied to queries and keys in attention
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # each (T, hd/2) or (B, T, hd/2)
        return maybe_dropout(self.transformer.drop, x), rope

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T), and the mean cross-entropy loss when
        `targets` (B, T) is given (positions equal to IGNORE_INDEX are skipped). With `last_only`, the logits
        of the last position only, (B, 1, vocab_size): what generation needs, for one row of the output
        projection instead of T.

        With a `kv_cache`, `input_pos` (T,) gives the cache slot of each of the T tokens; their keys and values
        are written there and attention covers every earlier slot. A slot is the token's position, except in
        left-padded rows (see `KVCache.set_padding`).
        """
        T = idx.size(1)
        limit = self.config.block_size if kv_cache is None else kv_cache.max_len
        if T > limit:
            raise ValueError(
                f"input of {T} tokens is longer than the {'context' if kv_cache is None else 'KV cache'} "
                f"({limit} tokens); keep only the last {limit} tokens (or use a model with a longer block_size)"
            )
        if last_only and targets is not None:
            raise ValueError("last_only gives the logits of one position, so it cannot compute a loss over targets")
        if kv_cache is not None and input_pos is None:
            raise ValueError("forward with a kv_cache needs input_pos: the positions (T,) of the tokens in idx")
        if kv_cache is not None and idx.size(0) != kv_cache.batch_size:
            raise ValueError(f"batch of {idx.size(0)} rows but the KV cache was made for {kv_cache.batch_size}")
        if kv_cache is not None:
            assert input_pos is not None
            pos = kv_cache.positions(input_pos)  # (T,), or (B, T) with left padding
        else:
            pos = torch.arange(T, device=idx.device)  # (T,)

        x, rope = self._embed(idx, pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size), or (B, 1, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention probabilities (B, n_head, T, T) of block `layer` for token ids `idx` (B, T): the blocks before
        it run as in `forward` (no cache), then that block's attention recomputes its weights explicitly."""
        if not 0 <= layer < self.config.n_layer:
            raise ValueError(f"layer must be between 0 and {self.config.n_layer - 1}, got {layer}")
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"input of {T} tokens is longer than the context ({self.config.block_size} tokens)")
        x, rope = self._embed(idx, torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.transformer.h[:layer]:
            x = block(x, rope, None, None)
        block = self.transformer.h[layer]
        assert isinstance(block, Block)  # for the type checker: ModuleList items are plain Modules
        return block.attn.attention_weights(block.ln_1(x), rope)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights counted once); optionally without token and position embeddings. A model
        whose linear layers were quantized (aksis.quantize: packed integers, scales, an untied output copy) counts the
        parameters of its architecture, those of the same model unquantized."""
        params = list(self.parameters())  # parameters() yields a shared tensor once
        if not all(p.is_floating_point() for p in params):
            with torch.device("meta"):
                return GPT(self.config).num_params(exclude_embeddings)
        n = sum(p.numel() for p in params)
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Estimated FLOPs per token (PaLM, appendix B): 2 per weight in a matmul per token for the forward
        pass, plus attention scores and values (2 * 2 * n_layer * T * n_head * head_dim); training (forward and
        backward) costs three times the forward pass. Used for MFU."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        # Weights used in matmuls: everything but the embedding lookups; the output projection is a
        # matmul even when it shares its weight with the token embedding.
        matmul = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            matmul += self.lm_head.weight.numel()
        forward = 2 * matmul + 4 * cfg.n_layer * T * cfg.n_head * cfg.head_dim
        return 3 * forward if training else forward
