"""aksis.native: the C++ int8 and int4 kernels against the integer arithmetic they stand for, built where the CPU
takes them, and the PyTorch kernels wherever they cannot be built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from aksis import native
from aksis.quantize import Int4Linear, Int8Linear

needs_kernels = pytest.mark.skipif(not native.cpu_supported(), reason="the CPU lacks AVX-512 VNNI")


def test_the_kernels_are_built_wherever_the_cpu_takes_them() -> None:
    # So that a CPU with VNNI (CI's) never skips the tests below: a failed build fails here.
    turned_off = os.environ.get("AKSIS_NATIVE_KERNELS") == "0"
    assert native.available() == (native.cpu_supported() and not turned_off)


def quantized_input(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to 8 bits per group of `group` inputs as the kernels round it: (codes, scales), codes as floats."""
    xg = x.float().view(*x.shape[:-1], -1, group)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))  # float32, as the kernels divide
    return torch.round(xg * inv), amax / 127  # round: to nearest, ties to even, as the CPU


def int8_expected(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    xq, dx = quantized_input(x, layer.in_features)  # one scale per row
    dots = xq.flatten(-2).double() @ layer.weight.double().T  # exact integers
    y = dx[..., 0].double() * layer.scale.double() * dots
    return y + layer.bias.double() if layer.bias is not None else y


def int4_expected(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    xq, dx = quantized_input(x, 32)  # (..., groups, 32)
    q = layer.codes().double().view(layer.out_features, -1, 32) - 8
    dots = torch.einsum("...gi,ngi->...ng", xq.double(), q)  # exact integers, per output row and group
    y = (dots * dx[..., 0].double().unsqueeze(-2) * layer.scale.double()).sum(-1)
    y = y + (layer.zero.double() * x.float().view(*x.shape[:-1], -1, 32).sum(-1).double().unsqueeze(-2)).sum(-1)
    return y + layer.bias.double() if layer.bias is not None else y


SHAPES = [  # (inputs, outputs, rows): whole 512-input blocks, a block's tail, output rows not in fours, many rows
    (512, 2048, 1),
    (2048, 64, 3),
    (576, 36, 5),
    (64, 17, 2),
    (96, 7, 9),
    (32, 1, 1),
]


@needs_kernels
@pytest.mark.parametrize(("k", "n", "rows"), [*SHAPES, (100, 9, 4), (1, 3, 2)])  # int8 takes any width
@pytest.mark.parametrize("bias", [True, False])
def test_int8_kernel_is_the_integer_product_of_8_bit_inputs_and_weights(k: int, n: int, rows: int, bias: bool) -> None:
    assert native.available()
    layer = Int8Linear.from_linear(nn.Linear(k, n, bias=bias))
    x = torch.randn(rows, k)
    y = torch.ops.aksis_cpu.int8_linear(x, layer.weight, layer.scale, layer.bias)
    torch.testing.assert_close(y, int8_expected(x, layer).float(), atol=1e-5, rtol=1e-5)  # float sums, in any order
    reference = layer.reference(x)  # the dequantized weight times the unrounded input
    assert float((y - reference).abs().max()) < 0.02 * float(reference.abs().max())


@needs_kernels
@pytest.mark.parametrize(("k", "n", "rows"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int4_kernel_is_the_integer_product_per_group(k: int, n: int, rows: int, bias: bool) -> None:
    assert native.available()
    layer = Int4Linear.from_linear(nn.Linear(k, n, bias=bias))
    x = torch.randn(rows, k)
    y = torch.ops.aksis_cpu.int4_linear(x, layer.weight, layer.scale, layer.zero, layer.bias)
    torch.testing.assert_close(y, int4_expected(x, layer).float(), atol=1e-5, rtol=1e-5)
    reference = layer.reference(x)
    assert float((y - reference).abs().max()) < 0.02 * float(reference.abs().max())


@needs_kernels
def test_the_kernels_keep_the_input_shape_and_dtype_and_take_zero_rows() -> None:
    assert native.available()
    int8, int4 = Int8Linear.from_linear(nn.Linear(64, 40)), Int4Linear.from_linear(nn.Linear(64, 40))
    x = torch.randn(2, 3, 64).bfloat16()
    x[0, 1] = 0  # a row of zeros: scale 0, product 0 (the bias alone)
    for layer, y in [
        (int8, torch.ops.aksis_cpu.int8_linear(x, int8.weight, int8.scale, int8.bias.bfloat16())),
        (int4, torch.ops.aksis_cpu.int4_linear(x, int4.weight, int4.scale, int4.zero, int4.bias)),
    ]:
        assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y[0, 1], layer.bias.bfloat16())
        reference = layer.reference(x.float())
        assert float((y.float() - reference).abs().max()) < 0.03 * float(reference.abs().max())
    empty = torch.ops.aksis_cpu.int8_linear(torch.randn(0, 64), int8.weight, int8.scale, None)
    assert empty.shape == (0, 40)


@needs_kernels
def test_the_kernels_refuse_tensors_they_cannot_read_by_name() -> None:
    assert native.available()
    layer = Int8Linear.from_linear(nn.Linear(64, 8))
    with pytest.raises(RuntimeError, match="x has 32 features, the weight 64"):
        torch.ops.aksis_cpu.int8_linear(torch.randn(1, 32), layer.weight, layer.scale, None)
    with pytest.raises(RuntimeError, match="contiguous int8 matrix"):
        torch.ops.aksis_cpu.int8_linear(torch.randn(1, 64), layer.weight.float(), layer.scale, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.aksis_cpu.int8_linear(torch.randn(1, 64).double(), layer.weight, layer.scale, None)
    int4 = Int4Linear.from_linear(nn.Linear(64, 8))
    with pytest.raises(RuntimeError, match="scale and zero must be contiguous bf16"):
        torch.ops.aksis_cpu.int4_linear(torch.randn(1, 64), int4.weight, int4.scale.float(), int4.zero, None)


@needs_kernels
def test_quantized_layers_run_the_kernels_with_no_packed_copy() -> None:
    assert native.available()
    for layer in (Int8Linear.from_linear(nn.Linear(64, 40)), Int4Linear.from_linear(nn.Linear(64, 40))):
        x = torch.randn(2, 64)
        with torch.inference_mode():
            y = layer(x)
        assert layer._packed is None and layer.packed_bytes() == 0  # the stored tensors, read as they are
        assert float((y - layer.reference(x)).abs().max()) < 0.02 * float(layer.reference(x).abs().max())


GENERATE = (
    "import torch, aksis.native as n; from aksis.config import GenerationConfig, ModelConfig; "
    "from aksis.model import GPT; from aksis.quantize import quantize; from aksis.generation import generate_batch; "
    "from aksis.tokenizer import Tokenizer; torch.manual_seed(0); "
    "m = quantize(GPT(ModelConfig.from_preset('tiny', vocab_size=260)).eval(), 'int4'); "
    "greedy = GenerationConfig(max_new_tokens=4, temperature=0.0); "  # sampling could end early on an end token
    "done = generate_batch(m, Tokenizer.byte_level(), [[1, 2, 3]], greedy); "
    "print(n.available(), n.why_not(), len(done[0].token_ids))"
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_the_kernels_can_be_turned_off_and_pytorchs_run_instead() -> None:
    run = run_python(GENERATE, AKSIS_NATIVE_KERNELS="0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "AKSIS_NATIVE_KERNELS=0", "is", "set", "4"]


@needs_kernels
def test_a_failed_build_falls_back_to_pytorchs_kernels_with_one_warning(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # the build folder cannot be made under a file, even as root
    code = "import logging; logging.basicConfig(); " + GENERATE
    run = run_python(code, TORCH_EXTENSIONS_DIR=str(blocked / "extensions"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "None", "4"]
    warnings = [line for line in run.stderr.splitlines() if "failed to build" in line]
    assert len(warnings) == 1 and "PyTorch's kernels run instead" in warnings[0]


@needs_kernels
def test_bf16_in_and_out_is_the_float32_computation_rounded_as_pytorch_rounds() -> None:
    # The ops convert bf16 inputs and outputs themselves: exactly what .float() and .bfloat16() give.
    assert native.available()
    int8, int4 = Int8Linear.from_linear(nn.Linear(100, 37)), Int4Linear.from_linear(nn.Linear(64, 37))
    dense = nn.Linear(100, 37).bfloat16()
    x, x4 = torch.randn(3, 100).bfloat16(), torch.randn(3, 64).bfloat16()
    x[1, 5] = float("nan")  # a NaN makes its row NaN, which rounds to bf16's NaN
    int8_op = lambda x, b: torch.ops.aksis_cpu.int8_linear(x, int8.weight, int8.scale, b)
    int4_op = lambda x, b: torch.ops.aksis_cpu.int4_linear(x, int4.weight, int4.scale, int4.zero, b)
    for op, inputs in [(int8_op, x), (int4_op, x4)]:
        bias = torch.randn(37).bfloat16()
        y = op(inputs, bias)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, op(inputs.float(), bias.float()).bfloat16(), atol=0, rtol=0, equal_nan=True)
    y = torch.ops.aksis_cpu.dense_linear(x, dense.weight, dense.bias)
    exact = torch.ops.aksis_cpu.dense_linear(x.float(), dense.weight.float(), dense.bias.float())
    torch.testing.assert_close(y, exact.bfloat16(), atol=0, rtol=0, equal_nan=True)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    q = torch.randn(2, 8, 3, 64).bfloat16()
    k, v = (torch.randn(2, 8, 16, 64).bfloat16() for _ in range(2))
    positions = torch.arange(5, 8)
    y = torch.ops.aksis_cpu.cached_attention(q, k, v, positions)
    exact = torch.ops.aksis_cpu.cached_attention(q.float(), k.float(), v.float(), positions)
    torch.testing.assert_close(y, exact.bfloat16(), atol=0, rtol=0)
    none = torch.ops.aksis_cpu.cached_attention(q[:, :, :0], k, v, positions[:0])  # no queries: an empty bf16 result
    assert none.shape == (2, 8, 0, 64) and none.dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "queries", "first", "dtype"),
    [
        (8, 8, 64, 1, 100, torch.float32),  # a decode step of the base preset
        (9, 3, 64, 5, 10, torch.float32),  # grouped-query attention, several new tokens
        (4, 2, 20, 1, 39, torch.float32),  # a head width not a multiple of 16, the cache's last slot
        (8, 8, 64, 1, 0, torch.bfloat16),  # the first slot: one key to attend
        (2, 1, 128, 7, 0, torch.bfloat16),
    ],
)
def test_cached_attention_is_causal_sdpa_over_the_slots_each_query_sees(
    heads: int, kv_heads: int, head_dim: int, queries: int, first: int, dtype: torch.dtype
) -> None:
    assert native.available()
    slots = 40 if first == 39 else 128
    q = torch.randn(2, queries, heads, head_dim, dtype=dtype).transpose(1, 2)  # as the model makes it
    k, v = (torch.randn(2, kv_heads, slots, head_dim, dtype=dtype) for _ in range(2))
    positions = torch.arange(first, first + queries)
    y = torch.ops.aksis_cpu.cached_attention(q, k, v, positions)
    mask = torch.arange(slots)[None, :] <= positions[:, None]
    gqa = heads != kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa
    )
    assert y.shape == q.shape and y.dtype == dtype
    assert y.transpose(1, 2).is_contiguous()  # (B, T, heads, hd) in memory: the model's next reshape copies nothing
    torch.testing.assert_close(y.float(), expected, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)


@needs_kernels
def test_cached_attention_refuses_what_it_cannot_read() -> None:
    assert native.available()
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="slot 8 is outside the cache"):
        torch.ops.aksis_cpu.cached_attention(q, k, k, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="in q's dtype"):
        torch.ops.aksis_cpu.cached_attention(q, k.bfloat16(), k.bfloat16(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="does not fit the cache"):
        torch.ops.aksis_cpu.cached_attention(torch.randn(1, 3, 1, 16), k, k, torch.tensor([0]))


def test_compiling_for_decoding_asks_for_the_kernels_before_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiled step reads `native.loaded` as a constant: it must be settled before Dynamo traces the model (an fp32
    # model has no quantized layer to settle it on its way).
    from conftest import tiny_config

    from aksis.generation import compile_for_decoding
    from aksis.model import GPT

    monkeypatch.setattr(native, "loaded", None)
    compile_for_decoding(GPT(tiny_config("llama")).eval())
    assert native.loaded == (native.cpu_supported() and os.environ.get("AKSIS_NATIVE_KERNELS") != "0")


def test_loading_a_model_onto_the_cpu_settles_the_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Built (the first time on a machine) while loading, so the first reply does not wait for the compiler.
    from conftest import tiny_config

    from aksis.checkpoint import load_model, save_checkpoint
    from aksis.model import GPT
    from aksis.tokenizer import Tokenizer

    save_checkpoint(GPT(tiny_config("gpt2", vocab_size=260)), tmp_path / "m", tokenizer=Tokenizer.byte_level())
    monkeypatch.setattr(native, "loaded", None)
    load_model(tmp_path / "m", device="cpu")
    assert native.loaded is not None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# One row (two in float32) is read a weight row at a time, more rows four weight rows at a time; tails of both.
@pytest.mark.parametrize(
    ("k", "n", "rows"), [(512, 2048, 1), (100, 7, 1), (600, 37, 2), (100, 7, 3), (64, 300, 4), (16, 5, 9)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_kernel_is_f_linear(dtype: torch.dtype, k: int, n: int, rows: int, bias: bool) -> None:
    assert native.available()
    layer = nn.Linear(k, n, bias=bias).to(dtype)
    x = torch.randn(rows, k, dtype=dtype)
    y = torch.ops.aksis_cpu.dense_linear(x, layer.weight, layer.bias)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), None if not bias else layer.bias.float())
    assert y.shape == (rows, n) and y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # float sums in another order; bf16 rounds the result
    torch.testing.assert_close(y.float(), expected, atol=tolerance, rtol=tolerance)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        torch.ops.aksis_cpu.dense_linear(x.float() if dtype == torch.bfloat16 else x.bfloat16(), layer.weight, None)
