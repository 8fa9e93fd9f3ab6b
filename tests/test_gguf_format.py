"""GGUF export (aksis.gguf_format): the file's tensors and metadata read back with gguf's own reader equal the model's;
where llama.cpp is installed (the llama-cpp-python package), it computes the model's logits and tokenizes as aksis."""

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_config

from aksis.gguf_format import GGUFError, export_gguf
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

PROMPT = "ROMEO: But soft, what light through yonder window breaks? 1234 🙂"


@pytest.fixture(scope="module")
def bpe(shakespeare_texts: list[str]) -> Tokenizer:
    return Tokenizer.train(shakespeare_texts[:300], vocab_size=400)


MODELS = {
    "gpt2": dict(arch="gpt2"),
    "gpt2-untied": dict(arch="gpt2", tie_embeddings=False),
    "llama": dict(arch="llama", tie_embeddings=False),
    "llama-head-dim": dict(arch="llama", head_dim=24),
    "llama3-rope": dict(
        arch="llama",
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": dict(arch="llama", qkv_bias=True),
}


def model_of(case: str) -> GPT:
    torch.manual_seed(0)
    settings = dict(MODELS[case])
    model = GPT(tiny_config(str(settings.pop("arch")), vocab_size=400, **settings)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def fields(reader: object) -> dict[str, object]:
    return {name: field.contents() for name, field in reader.fields.items()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", list(MODELS))
def test_the_files_tensors_and_metadata_are_the_models(case: str, bpe: Tokenizer, tmp_path: Path) -> None:
    model = model_of(case)
    path = export_gguf(model, bpe, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    meta = fields(reader)
    arch = meta["general.architecture"]
    assert arch == {"gpt2": "gpt2", "llama": "llama", "llama3": "llama", "qwen2": "qwen2"}[case.split("-")[0]]
    cfg = model.config
    assert meta[f"{arch}.block_count"] == cfg.n_layer and meta[f"{arch}.embedding_length"] == cfg.n_embd
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.n_kv_head and meta[f"{arch}.context_length"] == 64
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[bpe.eot_id] == "<|endoftext|>"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.add_bos_token"] is False
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    state = model.state_dict()
    assert np.array_equal(tensors["token_embd.weight"], state["transformer.wte.weight"].numpy())
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    qkv = state["transformer.h.1.attn.c_attn.weight"].numpy()
    if arch == "gpt2":
        assert np.array_equal(tensors["blk.1.attn_qkv.weight"], qkv)
        assert np.array_equal(tensors["position_embd.weight"], state["transformer.wpe.weight"].numpy())
    else:
        assert np.array_equal(tensors["blk.1.attn_v.weight"], qkv[q_rows + kv_rows :])
        q = tensors["blk.1.attn_q.weight"]  # "llama": each head's rows interleaved (pairs), "qwen2": as they are
        assert sorted(map(tuple, q)) == sorted(map(tuple, qkv[:q_rows]))
        assert np.array_equal(q, qkv[:q_rows]) == (arch == "qwen2")
        assert ("rope_freqs.weight" in tensors) == (case == "llama3-rope")
    assert np.array_equal(tensors["blk.0.ffn_down.weight"], state["transformer.h.0.mlp.c_proj.weight"].numpy())


@pytest.mark.parametrize(("outtype", "tolerance"), [("f16", 1e-3), ("q8_0", 2e-2), ("q4_0", 2e-1)])
def test_lower_precision_files_hold_the_weights_within_their_precision(
    outtype: str, tolerance: float, bpe: Tokenizer, tmp_path: Path
) -> None:
    model = model_of("llama")
    reader = gguf.GGUFReader(str(export_gguf(model, bpe, tmp_path / "m.gguf", outtype=outtype)))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert tensor.tensor_type.name == outtype.upper()
    weights = model.state_dict()["transformer.h.0.mlp.w_up.weight"].numpy()
    error = np.abs(gguf.quants.dequantize(tensor.data, tensor.tensor_type) - weights).max()
    assert error <= tolerance * np.abs(weights).max()
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert norm.tensor_type.name == "F32"  # norms stay full precision


def test_the_split_rule_is_named_as_llama_cpp_knows_it(bpe: Tokenizer) -> None:
    from aksis.gguf_format import _pre_tokenizer

    assert _pre_tokenizer(bpe) == _pre_tokenizer(Tokenizer.byte_level()) == "llama-bpe"
    assert _pre_tokenizer(Tokenizer.from_name("cl100k_base")) == "llama-bpe"  # bundled offline
    import tiktoken

    odd = Tokenizer(
        tiktoken.Encoding(
            "odd",
            pat_str=r"\S+|\s+",
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens=dict(Tokenizer.byte_level().specials),
        ),
        "bpe",
        "odd",
    )
    with pytest.raises(GGUFError, match="llama.cpp has no split rule equal to the pattern of the tokenizer 'odd'"):
        _pre_tokenizer(odd)


def test_what_cannot_be_written_is_a_clear_error(bpe: Tokenizer, tmp_path: Path) -> None:
    model = model_of("gpt2")
    with pytest.raises(GGUFError, match="unknown GGUF out type 'q2_k'; choose one of f32, f16, q8_0, q4_0"):
        export_gguf(model, bpe, tmp_path / "m.gguf", outtype="q2_k")
    gqa = GPT(tiny_config("gpt2", vocab_size=400, n_kv_head=2))
    with pytest.raises(GGUFError, match="llama.cpp's gpt2 has one key/value head per query head"):
        export_gguf(gqa, bpe, tmp_path / "m.gguf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        export_gguf(model, bpe, tmp_path / "file" / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing left behind


@pytest.mark.parametrize("case", ["gpt2", "llama", "llama-head-dim", "llama3-rope", "qwen2"])
def test_llama_cpp_computes_the_same_logits_and_tokens(case: str, bpe: Tokenizer, tmp_path: Path) -> None:
    if os.environ.get("AKSIS_REQUIRE_LLAMA_CPP") == "1":  # CI installs llama-cpp-python: the test may not skip there
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp")
    model = model_of(case)
    path = export_gguf(model, bpe, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = bpe.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    # llama.cpp keeps its KV cache in f16 and computes some steps in f16: about 1e-3 of the logits' scale
    assert np.abs(theirs - ours).max() <= 1e-2 * np.abs(ours).max()


def test_export_from_the_cli(bpe: Tokenizer, tmp_path: Path) -> None:
    import subprocess
    import sys

    from aksis.checkpoint import save_checkpoint

    save_checkpoint(model_of("llama"), tmp_path / "ckpt", tokenizer=bpe)
    command = [sys.executable, "-m", "aksis.cli", "export", "--checkpoint-path", str(tmp_path / "ckpt")]
    command += ["--format", "gguf", "--outtype", "q8_0", "--output", str(tmp_path / "m.gguf")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "GGUF (q8_0) for llama.cpp" in out.stdout
    assert fields(gguf.GGUFReader(str(tmp_path / "m.gguf")))["general.architecture"] == "llama"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists: choose another path, or add --overwrite" in again.stderr
    wrong = [*command[:-6], "--format", "transformers", "--outtype", "q8_0", "--output", str(tmp_path / "x")]
    refused = subprocess.run(wrong, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--outtype applies to --format gguf" in refused.stderr
