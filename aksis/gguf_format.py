"""GGUF export: an aksis model as a single file that llama.cpp (and so Ollama and LM Studio) loads and chats with.

Written with the `gguf` package (the writer llama.cpp maintains), from the model and its tokenizer directly, not
through llama.cpp's converter:

- architecture "gpt2" for the GPT-2 flavour (q, k and v fused in `blk.N.attn_qkv`, as llama.cpp wants them);
  "llama" for the LLaMA flavour, or "qwen2" when it has q/k/v biases (llama.cpp reads those only there). The
  weights go in as aksis holds them, (out, in): gguf writes numpy shapes reversed, which is llama.cpp's order.
- llama.cpp's "llama" rotates pairs of adjacent dimensions, aksis (like transformers and llama.cpp's "qwen2") the two
  halves of a head: q and k are permuted for "llama" as llama.cpp's converter does. "llama3" RoPE scaling becomes
  the `rope_freqs.weight` factors.
- the tokenizer as llama.cpp's "gpt2" BPE: tokens in GPT-2's byte alphabet, merges derived from the ranks, the
  specials as control tokens, and `tokenizer.ggml.pre` naming llama.cpp's split rule that equals aksis's pattern
  (aksis's own BPE and cl100k_base split as Llama 3 does; GPT-2's encodings as GPT-2). No BOS is added (aksis adds
  none); EOS is <|endoftext|>; aksis's chat template goes in as Jinja.
- out types f32, f16, q8_0 and q4_0; norms, biases and position embeddings stay f32, and a matrix whose rows are not
  a multiple of the 32-value block falls back to f16, as in llama.cpp's converter.

A pretrained model's own tokenizer (aksis.hf_tokenizer) is not written here yet: its folder is a transformers
checkpoint, which llama.cpp's `convert_hf_to_gguf.py` converts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from aksis.chat_template import JINJA as CHAT_JINJA
from aksis.config import GGUF_OUT_TYPES, ModelConfig
from aksis.hf_tokenizer import HFTokenizer
from aksis.model import GPT, rope_frequencies
from aksis.quantize import quantization_of
from aksis.tokenizer import BYTE_TO_CHAR, SPLIT_PATTERN, Tokenizer

OUT_TYPES = GGUF_OUT_TYPES
BLOCK = 32  # values per q8_0 / q4_0 block


class GGUFError(ValueError):
    """A model or tokenizer that cannot be written as GGUF; the message says why and what to do."""


# llama.cpp's split rules (`tokenizer.ggml.pre`) equal to the patterns of tiktoken's named encodings
_PRE_TOKENIZERS = {
    "cl100k_base": "llama-bpe",
    "gpt2": "gpt-2",
    "r50k_base": "gpt-2",
    "p50k_base": "gpt-2",
    "o200k_base": "gpt-4o",
}


def _pre_tokenizer(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for the split rule of `tokenizer` (it has its own code for each known rule): aksis's own
    pattern (GPT-4's) is Llama 3's rule; a named encoding's is looked up by its name."""
    if tokenizer.encoding._pat_str == SPLIT_PATTERN:
        return "llama-bpe"
    if tokenizer.kind == "tiktoken" and tokenizer.name in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[tokenizer.name]
    raise GGUFError(f"llama.cpp has no split rule equal to the pattern of the tokenizer {tokenizer.name!r}")


def _vocabulary(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (one per embedding row), their types and the merges, as llama.cpp's "gpt2" BPE reads them."""
    from gguf import TokenType

    ranks: dict[bytes, int] = tokenizer.encoding._mergeable_ranks
    specials = tokenizer.specials

    def text(token: bytes) -> str:
        return "".join(BYTE_TO_CHAR[b] for b in token)

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows no token uses (the model's table may be larger)
    types = [int(TokenType.UNUSED)] * n_vocab
    for token, rank in ranks.items():
        tokens[rank], types[rank] = text(token), int(TokenType.NORMAL)
    for special, special_id in specials.items():
        tokens[special_id], types[special_id] = special, int(TokenType.CONTROL)
    merges = sorted(
        (rank, ranks[token[:i]], ranks[token[i:]], f"{text(token[:i])} {text(token[i:])}")
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    names = [m[-1] for m in merges]
    if not names:  # a byte tokenizer has none, but llama.cpp needs the key: one merge that never applies
        first, second = sorted(specials, key=specials.__getitem__)[:2]
        names = [f"{first} {second}"]
    return tokens, types, names


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from (first half, second half) to interleaved pairs: llama.cpp's "llama" RoPE."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(config: ModelConfig) -> np.ndarray:
    """llama3 RoPE scaling as llama.cpp takes it: what each of the head_dim / 2 frequencies is divided by."""
    plain = rope_frequencies(dataclasses.replace(config, rope_scaling=None))
    return (plain / rope_frequencies(config)).numpy().astype(np.float32)


def export_gguf(model: GPT, tokenizer: Tokenizer, path: str | Path, outtype: str = "f32", name: str = "aksis") -> Path:
    """Write `model` and `tokenizer` to the GGUF file `path` (written to a temporary name, then renamed)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType

    if outtype not in OUT_TYPES:
        raise GGUFError(f"unknown GGUF out type {outtype!r}; choose one of {', '.join(OUT_TYPES)}")
    if quantization_of(model) != "none":
        raise GGUFError(
            f"the model holds {quantization_of(model)} weights: export its full-precision checkpoint (--outtype q8_0 "
            "or q4_0 quantizes for llama.cpp)"
        )
    if isinstance(tokenizer, HFTokenizer):
        raise GGUFError(
            "aksis writes its own tokenizers to GGUF, not a pretrained model's yet: this checkpoint is in "
            "transformers' layout, so llama.cpp's convert_hf_to_gguf.py converts it"
        )
    config = model.config
    assert config.n_kv_head is not None
    qtype, ftype = {
        "f32": (Q.F32, LlamaFileType.ALL_F32),
        "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
        "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    }[outtype]
    arch = "gpt2" if config.arch == "gpt2" else ("qwen2" if config.qkv_bias else "llama")
    if arch == "gpt2" and (config.n_kv_head != config.n_head or config.head_dim * config.n_head != config.n_embd):
        raise GGUFError("llama.cpp's gpt2 has one key/value head per query head and head_dim = n_embd / n_head")
    if arch == "qwen2" and config.head_dim * config.n_head != config.n_embd:
        raise GGUFError("llama.cpp's qwen2 needs head_dim = n_embd / n_head")
    if config.arch == "llama" and config.head_dim % 2:
        raise GGUFError("RoPE needs an even head_dim")
    weights = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)

    def put(gguf_name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        kind = qtype
        if array.ndim == 1 or gguf_name.endswith("_norm.weight") or gguf_name == "position_embd.weight":
            kind = Q.F32  # small, and read at full precision, as llama.cpp's converter keeps them
        elif kind in (Q.Q8_0, Q.Q4_0) and array.shape[-1] % BLOCK:
            kind = Q.F16  # rows that do not fill whole blocks
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    try:
        writer.add_name(name)
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch == "gpt2":
            writer.add_layer_norm_eps(config.norm_eps)
        else:
            writer.add_layer_norm_rms_eps(config.norm_eps)
            writer.add_rope_freq_base(config.rope_theta)
            writer.add_rope_dimension_count(config.head_dim)
            if config.head_dim * config.n_head != config.n_embd:
                writer.add_key_length(config.head_dim)
                writer.add_value_length(config.head_dim)
        tokens, types, merges = _vocabulary(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_bos_token_id(tokenizer.eot_id)  # llama.cpp wants one; aksis never adds it (add_bos_token false)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_JINJA)

        put("token_embd.weight", weights["transformer.wte.weight"])
        if arch == "gpt2":
            put("position_embd.weight", weights["transformer.wpe.weight"])
        elif config.rope_scaling:
            put("rope_freqs.weight", _rope_factors(config))
        q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        for i in range(config.n_layer):
            ours = f"transformer.h.{i}."
            parts = {"attn_norm": "ln_1", "attn_output": "attn.c_proj", "ffn_norm": "ln_2"}
            if arch == "gpt2":
                parts |= {"attn_qkv": "attn.c_attn", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
            else:
                parts |= {"ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up", "ffn_down": "mlp.c_proj"}
                for suffix in ("weight", "bias"):
                    qkv = weights.get(f"{ours}attn.c_attn.{suffix}")
                    if qkv is None:
                        continue
                    q, k, v = np.split(qkv, [q_rows, q_rows + kv_rows], axis=0)
                    if arch == "llama":
                        q, k = _permute(q, config.n_head), _permute(k, config.n_kv_head)
                    for part, array in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
                        put(f"blk.{i}.{part}.{suffix}", array)
            for theirs, source in parts.items():
                for suffix in ("weight", "bias"):
                    if f"{ours}{source}.{suffix}" in weights:
                        put(f"blk.{i}.{theirs}.{suffix}", weights[f"{ours}{source}.{suffix}"])
        put("output_norm.weight", weights["transformer.ln_f.weight"])
        if "transformer.ln_f.bias" in weights:
            put("output_norm.bias", weights["transformer.ln_f.bias"])
        if not config.tie_embeddings:  # tied: llama.cpp reads the output projection from token_embd
            put("output.weight", weights["lm_head.weight"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
