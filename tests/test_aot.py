"""Decode steps compiled ahead of time on a CPU (aksis.aot), as `compile_for_decoding` returns them there."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import require_aksis_kernels, tiny_config

from aksis.aot import CompiledDecoder, steps_dir
from aksis.config import GenerationConfig
from aksis.generation import _Session, beam_search, compile_for_decoding, generate, generate_batch
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(autouse=True)
def kernels() -> None:
    """Steps compile ahead of time on a CPU with aksis's kernels (elsewhere compile_for_decoding is torch.compile)."""
    require_aksis_kernels()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


def model_for(arch: str) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(arch, vocab_size=260)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_steps_generate_what_the_eager_model_does(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch)
    compiled = compile_for_decoding(model)
    assert isinstance(compiled, CompiledDecoder)
    out = generate(compiled, tok, "Hello", GREEDY, stop_ids=set())
    assert out.token_ids == generate(model, tok, "Hello", GREEDY, stop_ids=set()).token_ids
    prompts = ["Hi", "To be, or not"]  # left-padded rows: a step of its own
    batch = generate_batch(compiled, tok, prompts, GREEDY, stop_ids=set())
    assert [c.token_ids for c in batch] == [
        c.token_ids for c in generate_batch(model, tok, prompts, GREEDY, stop_ids=set())
    ]
    beams = GenerationConfig(num_beams=3, max_new_tokens=8)
    assert [b.token_ids for b in beam_search(compiled, tok, "To be", beams, stop_ids=set())] == [
        b.token_ids for b in beam_search(model, tok, "To be", beams, stop_ids=set())
    ]
    assert set(compiled._steps) == {(1, False, torch.float32), (2, True, torch.float32), (3, False, torch.float32)}
    # Everything but one-token steps is the model's own: prefill, training-style calls, attributes.
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(compiled(idx)[0], model(idx)[0])
    assert compiled.config is model.config and compiled.attention_weights(idx, 0).shape == (1, 4, 3, 3)


def test_a_step_writes_the_cache_in_place_and_matches_a_direct_call_at_every_slot() -> None:
    model = model_for("llama")
    compiled = compile_for_decoding(model)
    with torch.inference_mode():
        eager, fast = _Session(model, [[5, 6, 7]], 40, 260), _Session(compiled, [[5, 6, 7]], 40, 260)
        pointers = fast.cache.data_ptrs()
        a, b = eager.prefill(), fast.prefill()
        for _ in range(30):  # the cache's length is dynamic: one library for every slot
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
            token = a.argmax(dim=-1)
            a, b = eager.step(token), fast.step(token)
        for x, y in zip((*eager.cache.k, *eager.cache.v), (*fast.cache.k, *fast.cache.v), strict=True):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert fast.cache.data_ptrs() == pointers and len(compiled._steps) == 1


def test_the_library_uses_the_models_own_weights_without_a_copy(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    compiled = compile_for_decoding(model)
    before = generate(compiled, tok, "Hi", GREEDY, stop_ids=set()).token_ids
    [step] = compiled._steps.values()
    pointers = {p.data_ptr() for p in model.parameters()}
    assert step._constants and all(t.data_ptr() in pointers for t in step._constants.values())
    with torch.no_grad():
        model.lm_head.weight.neg_()  # a change to the model's weights shows in the next compiled step
    after = generate(compiled, tok, "Hi", GREEDY, stop_ids=set()).token_ids
    assert after == generate(model, tok, "Hi", GREEDY, stop_ids=set()).token_ids and after[1:] != before[1:]


def test_a_compiled_step_is_kept_on_disk_and_a_broken_one_is_compiled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tok: Tokenizer
) -> None:
    monkeypatch.setenv("AKSIS_CACHE", str(tmp_path))
    model = model_for("gpt2")
    expected = generate(model, tok, "Hello", GREEDY, stop_ids=set()).token_ids
    with caplog.at_level(logging.INFO, logger="aksis.aot"):
        assert generate(compile_for_decoding(model), tok, "Hello", GREEDY, stop_ids=set()).token_ids == expected
    [package] = steps_dir().glob("*.pt2")
    assert steps_dir() == tmp_path / "decode_steps" and "compiling a decode step" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aksis.aot"):  # another process would find it the same way
        assert (
            generate(compile_for_decoding(model_for("gpt2")), tok, "Hello", GREEDY, stop_ids=set()).token_ids
            == expected
        )
    assert "compiling" not in caplog.text
    package.write_bytes(b"not a library")
    with caplog.at_level(logging.INFO, logger="aksis.aot"):
        assert generate(compile_for_decoding(model), tok, "Hello", GREEDY, stop_ids=set()).token_ids == expected
    assert "does not load" in caplog.text and "compiling a decode step" in caplog.text
    assert [p.name for p in steps_dir().iterdir()] == [package.name]  # rewritten in place, no temporary left


def test_batches_past_the_dense_kernels_rows_stay_eager(tok: Tokenizer) -> None:
    from aksis.kernels import NATIVE_MAX_ROWS, use_cpu_kernels

    model = use_cpu_kernels(model_for("gpt2"))  # float32 CPULinear layers: oneDNN past the dense kernel's rows
    compiled = compile_for_decoding(model)
    rows = NATIVE_MAX_ROWS[torch.float32]
    prompts = ["To be"] * (rows + 1)
    assert [c.token_ids for c in generate_batch(compiled, tok, prompts, GREEDY, stop_ids=set())] == [
        c.token_ids for c in generate_batch(model, tok, prompts, GREEDY, stop_ids=set())
    ]
    assert not compiled._steps
    generate_batch(compiled, tok, ["To be"] * rows, GREEDY, stop_ids=set())
    assert set(compiled._steps) == {(rows, False, torch.float32)}


def test_a_cache_folder_that_cannot_be_written_costs_only_the_keeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tok: Tokenizer
) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("AKSIS_CACHE", str(tmp_path / "file"))
    model = model_for("gpt2")
    with caplog.at_level(logging.WARNING, logger="aksis.aot"):
        out = generate(compile_for_decoding(model), tok, "Hello", GREEDY, stop_ids=set())
    assert out.token_ids == generate(model, tok, "Hello", GREEDY, stop_ids=set()).token_ids
    assert "cannot keep the compiled decode step" in caplog.text and "for this process only" in caplog.text


def test_a_step_the_library_cannot_run_decodes_eager_with_a_warning(
    caplog: pytest.LogCaptureFixture, tok: Tokenizer
) -> None:
    from aksis.quantize import Int4Linear, _linears, int4_kernel_available

    assert int4_kernel_available()  # PyTorch's, which groups of 64 run on
    model = model_for("gpt2")
    for parent, name, _, layer in _linears(model):  # groups of 64: PyTorch's int4 kernel, not aksis's (32)
        setattr(parent, name, Int4Linear.from_linear(layer, group_size=64))
    compiled = compile_for_decoding(model)  # its lowering adds a constant of inductor's own (the group size)
    with caplog.at_level(logging.WARNING, logger="aksis.aot"):
        out = generate(compiled, tok, "Hello", GREEDY, stop_ids=set())
    assert out.token_ids == generate(model, tok, "Hello", GREEDY, stop_ids=set()).token_ids
    assert "runs eager" in caplog.text and compiled._steps == {(1, False, torch.float32): None}


def test_past_the_context_the_compiled_steps_go_on_over_the_slid_window(tok: Tokenizer) -> None:
    model = model_for("llama")  # a context of 64 tokens: 150 new ones slide the window several times
    long = GenerationConfig(temperature=0.0, max_new_tokens=150)
    compiled = compile_for_decoding(model)
    out = generate(compiled, tok, "Hello", long, stop_ids=set())
    assert out.token_ids == generate(model, tok, "Hello", long, stop_ids=set()).token_ids
    assert len(out.token_ids) == 150 and len(compiled._steps) == 1


def test_the_app_compiles_the_step_of_one_row_as_it_loads_a_model_and_no_other(tmp_path: Path, tok: Tokenizer) -> None:
    from aksis.checkpoint import save_checkpoint
    from aksis.ui.context import AppSettings
    from aksis.ui.models import ModelStore

    assert AppSettings.from_env({"AKSIS_COMPILE": "1"}).compile and not AppSettings.from_env({}).compile
    save_checkpoint(model_for("llama"), tmp_path / "m", tokenizer=tok)
    entry = ModelStore(tmp_path, device=torch.device("cpu"), compile=True).get(str(tmp_path / "m"))
    compiled = entry.model
    assert isinstance(compiled, CompiledDecoder) and set(compiled._steps) == {(1, False, torch.float32)}  # at load
    plain = ModelStore(tmp_path, device=torch.device("cpu")).get(str(tmp_path / "m")).model
    assert not isinstance(plain, CompiledDecoder)
    assert (
        generate(compiled, tok, "Hi", GREEDY, stop_ids=set()).token_ids
        == generate(plain, tok, "Hi", GREEDY, stop_ids=set()).token_ids
    )
    beams = GenerationConfig(num_beams=4, max_new_tokens=6)  # a visitor's beam width: eager, nothing compiled
    assert [b.token_ids for b in beam_search(compiled, tok, "Hi", beams, stop_ids=set())] == [
        b.token_ids for b in beam_search(plain, tok, "Hi", beams, stop_ids=set())
    ]
    assert set(compiled._steps) == {(1, False, torch.float32)}
    assert entry.nbytes == ModelStore(tmp_path, device=torch.device("cpu")).get(str(tmp_path / "m")).nbytes
    assert "llama" in entry.describe() and entry.device.type == "cpu"
