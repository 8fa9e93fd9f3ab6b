"""aksis.kernels: the CPU inference layers against plain `F.linear`, and the swap that puts them in a model."""

from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import count_kernel_calls, require_aksis_kernels, tiny_config

from aksis import native
from aksis.checkpoint import load_model, save_checkpoint
from aksis.kernels import NATIVE_MAX_ROWS, CPULinear, inference_bytes, onednn_available, use_cpu_kernels
from aksis.model import GPT
from aksis.tokenizer import Tokenizer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 1, 64), (2, 4, 64), (2, 100, 64)])  # decode to prefill
def test_linear_inference_path_equals_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    layer = CPULinear(64, 300, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        fast = layer(x)
        sliced = layer(torch.randn(2, 5, 64)[:, -1:])  # a strided view, as `last_only` makes
    assert fast.shape == (*shape[:-1], 300) and fast.is_contiguous() and sliced.shape == (2, 1, 300)
    torch.testing.assert_close(fast, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [0, 3])
def test_a_dtype_without_aksis_kernels_goes_through_f_linear_even_with_no_rows(rows: int) -> None:
    layer = CPULinear(64, 300).double()  # float64: no fast path takes it
    x = torch.randn(rows, 64, dtype=torch.float64)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (rows, 300) and y.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_linear_takes_the_batched_halves_for_one_row_and_packs_its_weight_for_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "loaded", False)  # PyTorch's kernels, as on a CPU without aksis's
    layer = CPULinear(64, 300)
    bmm_calls: list[int] = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: bmm_calls.append(1) or bmm(*args))
    with torch.inference_mode():
        layer(torch.randn(1, 1, 64))  # one row: MKL's batched GEMM over the two halves of the weight
        mkl = torch.backends.mkl.is_available()  # without MKL, one row goes to oneDNN too, where it exists
        assert bmm_calls == ([1] if mkl else []) and (layer._packed is None) == (mkl or not onednn_available())
        CPULinear(64, 301)(torch.randn(1, 64))  # an odd number of outputs cannot be halved
        assert len(bmm_calls) <= 1
        layer(torch.randn(2, 1, 64))  # more rows: oneDNN on the packed weight, exactly where oneDNN is
        assert (layer._packed is not None) == onednn_available() and len(bmm_calls) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("aksis_kernels", [True, False])
def test_a_compiled_layer_calls_one_op_or_sums_one_row_itself(
    rows: int, dtype: torch.dtype, aksis_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if aksis_kernels:
        require_aksis_kernels()
    monkeypatch.setattr(native, "loaded", native.available() and aksis_kernels)
    torch._dynamo.reset()  # each case compiles CPULinear.forward afresh (12 would pass Dynamo's recompile limit)
    layer = CPULinear(64, 300).to(dtype)
    graphs: list[torch.fx.GraphModule] = []

    def keep(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(graph)
        return graph.forward

    x = torch.randn(rows, 1, 64, dtype=dtype)
    with torch.inference_mode():
        y = torch.compile(layer, backend=keep, fullgraph=True)(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=tolerance, rtol=tolerance)
    [graph] = graphs
    # Each call's function by name (an op's overload, "dense_linear.default", by its op's).
    called = {getattr(node.target, "__name__", str(node.target)).removesuffix(".default") for node in graph.graph.nodes}
    if aksis_kernels and rows <= NATIVE_MAX_ROWS[dtype]:  # aksis's dense kernel, as one op
        assert "dense_linear" in called and "linear" not in called
    else:  # inductor sums one row itself; F.linear for more
        assert ("linear" in called) == (rows > 1) and ("sum" in called) == (rows == 1)


@pytest.mark.parametrize(
    ("dtype", "rows"), [(torch.float32, r) for r in (1, 2, 3)] + [(torch.bfloat16, r) for r in (1, 8, 9)]
)
def test_a_few_rows_go_through_aksis_dense_kernel(
    dtype: torch.dtype, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_aksis_kernels()
    calls = count_kernel_calls(monkeypatch, "dense_linear")
    layer = CPULinear(64, 300).to(dtype)
    x = torch.randn(rows, 64, dtype=dtype)
    with torch.inference_mode():
        y = layer(x)
    assert calls == ([1] if rows <= NATIVE_MAX_ROWS[dtype] else [])
    expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=tolerance)


def test_linear_packs_its_weight_once_and_again_after_it_changes() -> None:
    layer = CPULinear(64, 300)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)
        packed = layer._packed
        layer(x)
        assert layer._packed is packed  # packed once, not per call
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # with gradients: plain F.linear, and the stale copy is dropped
    assert layer._packed is None
    optimizer.step()  # the weight changes in place
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.load_state_dict(CPULinear(64, 300).state_dict())  # so does loading, while a packed copy exists
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    copy = deepcopy(layer)  # an mkldnn tensor cannot be copied: the copy packs its own
    assert copy._packed is None
    with torch.inference_mode():
        torch.testing.assert_close(copy(x), layer(x), atol=0, rtol=0)
        double = CPULinear(64, 300).double()
        double(x.double())
        made_here = CPULinear(64, 300)  # a weight made under inference_mode cannot tell of changes: never packed
        made_here(x)
    assert double._packed is None and made_here._packed is None


def test_inference_bytes_count_the_packed_copies(arch: str) -> None:
    model = use_cpu_kernels(GPT(tiny_config(arch)).eval())
    params = sum(p.nbytes for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, CPULinear)]
    with torch.inference_mode():
        model(torch.randint(0, 300, (2, 8)))
    packed = sum(m.weight.nbytes for m in linears if m._packed is not None)
    assert packed == (sum(m.weight.nbytes for m in linears) if onednn_available() else 0)
    assert inference_bytes(model) == params + packed
    assert inference_bytes(model.double()) == 2 * params  # float64: nothing is packed


def test_the_swap_shares_the_parameters_and_changes_no_output(arch: str) -> None:
    model = GPT(tiny_config(arch)).eval()
    before = {name: p for name, p in model.named_parameters()}
    idx = torch.randint(0, 300, (2, 12))
    with torch.inference_mode():
        plain, _ = model(idx)
        plain_last, _ = model(idx[:1], last_only=True)  # one row: the batched-halves path once swapped
    assert use_cpu_kernels(model) is model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is CPULinear for m in linears)
    assert {name: p for name, p in model.named_parameters()} == before  # the same Parameter objects: nothing copied
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied
    with torch.inference_mode():
        fast, _ = model(idx)
        fast_last, _ = model(idx[:1], last_only=True)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_last, plain_last, atol=1e-5, rtol=1e-5)
    loss = model(idx, idx)[1]  # and it still trains: with gradients every layer is F.linear
    assert loss is not None
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_loaded_onto_the_cpu_runs_on_the_cpu_kernels(tmp_path: Path) -> None:
    save_checkpoint(GPT(tiny_config("llama", vocab_size=260)), tmp_path / "m", tokenizer=Tokenizer.byte_level())
    model, _, _ = load_model(tmp_path / "m", device="cpu")
    assert all(type(m) is CPULinear for m in model.modules() if isinstance(m, nn.Linear))
