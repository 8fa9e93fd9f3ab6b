"""aksis.quantize: int8 and int4 layers against the arithmetic they stand for, and every precision (fp32, bf16, int8,
int4) through generation, checkpoints, the command line and the app."""

import json
import pickle
import platform
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import require_aksis_kernels, tiny_config

import aksis.quantize
from aksis import native
from aksis.checkpoint import CheckpointError, load_model, save_checkpoint
from aksis.cli import main
from aksis.config import GenerationConfig, ModelConfig
from aksis.generation import _Session, beam_search, generate, generate_batch, stream, token_probabilities
from aksis.kernels import inference_bytes
from aksis.model import GPT
from aksis.quantize import (
    INT4_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    QuantizationError,
    compute_dtype,
    fbgemm_available,
    int4_kernel_available,
    quantization_of,
    quantize,
)
from aksis.tokenizer import Tokenizer
from aksis.ui.context import AppSettings
from aksis.ui.models import ModelStore

PRECISIONS = [("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("fp32", "int4"), ("bf16", "int8")]


@pytest.fixture(params=["aksis", "pytorch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which real kernels the quantized layers run: aksis's own (aksis.native, where the CPU takes them) or
    PyTorch's (FBGEMM, ATen's int4 kernel), as on a CPU without AVX-512 VNNI or without a compiler."""
    if request.param == "aksis":
        require_aksis_kernels()
    if request.param == "pytorch":
        monkeypatch.setattr(native, "loaded", False)
    return str(request.param)


def linear(in_features: int = 64, out_features: int = 300, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    return layer


# ----- the layers -----


def test_int8_weights_are_the_rounded_rows_of_the_original() -> None:
    original = linear()
    layer = Int8Linear.from_linear(original)
    w = original.weight.detach()
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (300,)
    assert torch.equal(layer.scale, w.abs().amax(dim=1) / 127)  # symmetric: the largest weight of a row is ±127
    error = (layer.dequantized(torch.float32) - w).abs()
    assert bool((error <= layer.scale[:, None] / 2 + 1e-7).all())  # every weight within half a step
    assert torch.equal(layer.bias, original.bias)


def test_int4_codes_fit_each_group_within_half_a_step() -> None:
    original = linear()
    layer = Int4Linear.from_linear(original)
    assert layer.weight.shape == (300, 32) and layer.weight.dtype == torch.uint8  # two codes a byte
    assert layer.scale.shape == layer.zero.shape == (300, 64 // INT4_GROUP_SIZE)
    codes = layer.codes()
    assert codes.shape == (300, 64) and int(codes.max()) <= 15
    error = (layer.dequantized(torch.float32) - original.weight.detach()).abs().view(300, -1, INT4_GROUP_SIZE)
    step = layer.scale.float()[..., None]
    assert bool((error <= step / 2 + step / 64).all())  # half a step, and the bf16 rounding of scale and zero


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 1, 64), (2, 9, 64)])  # decode to prefill
def test_the_cpu_kernels_compute_what_the_stored_weights_say(cls: type, shape: tuple[int, ...], kernels: str) -> None:
    layer = cls.from_linear(linear())
    x = torch.randn(shape)
    with torch.inference_mode():
        y, reference = layer(x), layer.reference(x)
    assert y.shape == (*shape[:-1], 300) and y.dtype == torch.float32
    # The kernels round the activations to 8 bits (PyTorch's int4 kernel: to bf16).
    tolerance = 0.02 * float(reference.abs().max())
    torch.testing.assert_close(y, reference, atol=tolerance, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_both_fbgemm_paths_compute_the_int8_product(monkeypatch: pytest.MonkeyPatch, fused: bool, bias: bool) -> None:
    # Each x86 CPU runs both FBGEMM calls; without aksis's own kernels, `Int8Linear` picks the fused one where AVX-512
    # VNNI sums without overflow.
    monkeypatch.setattr(native, "loaded", False)
    assert aksis.quantize._FUSED_INT8 == (fbgemm_available() and aksis.quantize._vnni())
    monkeypatch.setattr(aksis.quantize, "_FUSED_INT8", fused)  # which of the two real kernels `Int8Linear` calls
    layer = Int8Linear.from_linear(linear(bias=bias))
    with torch.no_grad():  # weights within +-63: no 16-bit pair of products can overflow, VNNI or not
        layer.weight.copy_(torch.randint(-63, 64, layer.weight.shape))
    x = torch.randn(2, 9, 64)
    with torch.inference_mode():
        y, reference = layer(x), layer.reference(x)
    if not fbgemm_available():  # not an x86 CPU: the layer multiplies by its dequantized weight
        torch.testing.assert_close(y, reference)
        return
    # The activations are rounded to 8 bits by the fused call, to 7 by the other (CPUs without VNNI).
    error = float((y - reference).abs().max() / reference.abs().max())
    assert error < (0.01 if fused else 0.02)
    assert layer.packed_bytes() >= layer.weight.nbytes


def test_the_deprecated_fbgemm_calls_warn_no_one() -> None:
    code = (
        "import torch, torch.nn as nn, aksis.native; from aksis.quantize import Int8Linear; "
        "aksis.native.loaded = False; "  # FBGEMM's calls, not aksis's kernels
        "layer = Int8Linear.from_linear(nn.Linear(64, 32)); layer(torch.randn(1, 64)); layer(torch.randn(3, 64))"
    )
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "deprecated" not in run.stderr


def test_the_kernels_run_on_an_x86_cpu_and_the_reference_elsewhere(kernels: str) -> None:
    x86 = platform.machine().lower() in ("x86_64", "amd64")  # where the kernels were measured (CI's machine)
    assert fbgemm_available() == int4_kernel_available() == x86
    layers = [Int8Linear.from_linear(linear()), Int4Linear.from_linear(linear())]
    with torch.inference_mode():
        for layer in layers:
            layer(torch.randn(1, 64))
    # PyTorch's kernels want packed copies, made when one ran; aksis's read the stored tensors.
    assert all((layer._packed is not None) == (x86 and kernels == "pytorch") for layer in layers)


def test_a_changed_weight_is_packed_again(kernels: str) -> None:
    layer = Int4Linear.from_linear(linear())
    x = torch.randn(2, 64)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.zero.add_(1.0)  # every weight moves by +1
    with torch.inference_mode():
        after = layer(x)
    torch.testing.assert_close(after - before, x.sum(dim=1, keepdim=True).expand(-1, 300), atol=0.1, rtol=0.02)


def test_copies_and_pickles_leave_the_packed_copy_behind(kernels: str) -> None:
    model = quantize(GPT(tiny_config("llama")).eval(), "int8")
    with torch.inference_mode():
        expected = model(torch.tensor([[1, 2, 3]]))[0]
    again = pickle.loads(pickle.dumps(model))
    for copy in (deepcopy(model), again):
        with torch.inference_mode():
            torch.testing.assert_close(copy(torch.tensor([[1, 2, 3]]))[0], expected)


# ----- a model -----


def test_quantize_swaps_every_linear_layer_and_keeps_the_output_layer_at_int8_under_int4(arch: str) -> None:
    model = GPT(tiny_config(arch)).eval()
    total = model.num_params()
    quantize(model, "int4")
    layers = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))}
    assert layers.pop("lm_head") is Int8Linear and set(layers.values()) == {Int4Linear}
    assert quantization_of(model) == "int4" and model.num_params() == total  # the architecture's count
    assert model.transformer.wte.weight.dtype == torch.float32  # the embedding stays in the compute dtype


@pytest.mark.parametrize(("scheme", "tolerance"), [("int8", 0.05), ("int4", 0.15)])
def test_quantized_logits_stay_close_to_fp32(arch: str, scheme: str, tolerance: float) -> None:
    """Stated tolerance: the largest logit difference, as a share of the largest logit (random tiny models)."""
    model = GPT(tiny_config(arch)).eval()
    idx = torch.randint(0, 300, (2, 20))
    with torch.inference_mode():
        reference = model(idx)[0]
        logits = quantize(deepcopy(model), scheme)(idx)[0]
    assert float((logits - reference).abs().max()) <= tolerance * float(reference.abs().max())


def test_int4_refuses_a_width_it_cannot_pack_before_changing_anything() -> None:
    model = GPT(tiny_config("gpt2", n_embd=48, n_head=4, d_ff=96)).eval()
    with pytest.raises(QuantizationError, match="groups of 32 inputs.*48.*use --quantize int8"):
        quantize(model, "int4")
    assert quantization_of(model) == "none" and type(model.lm_head) is nn.Linear
    quantize(model, "int8")  # int8 takes any shape


def test_unknown_precisions_are_named() -> None:
    with pytest.raises(QuantizationError, match="unknown quantization 'int3': use one of none, int8, int4"):
        quantize(GPT(tiny_config()), "int3")
    with pytest.raises(QuantizationError, match="unknown dtype 'fp16': use one of fp32, bf16"):
        compute_dtype("fp16")


def model_at(arch: str, dtype: str, scheme: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(arch, vocab_size=260)).eval().to(compute_dtype(dtype))
    return quantize(model, scheme)  # type: ignore[return-value]


@pytest.mark.parametrize(("dtype", "scheme"), PRECISIONS)
def test_every_precision_generates_streams_searches_and_scores(arch: str, dtype: str, scheme: str) -> None:
    model, tokenizer = model_at(arch, dtype, scheme), Tokenizer.byte_level()
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=10)
    with torch.inference_mode():
        session = _Session(model, [[1, 2, 3]], 4, 260)
    assert {t.dtype for t in session.cache.k} == {compute_dtype(dtype)}  # the KV cache in the compute dtype
    [one, two] = generate_batch(model, tokenizer, ["To be", "or not"], greedy, stop_ids=set())
    assert len(one.token_ids) == len(two.token_ids) == 10
    assert generate(model, tokenizer, "To be", greedy, stop_ids=set()).token_ids == one.token_ids
    assert "".join(stream(model, tokenizer, "To be", greedy, stop_ids=set())) == one.text
    beams = beam_search(model, tokenizer, "To be", GenerationConfig(num_beams=3, max_new_tokens=6))
    assert beams and all(len(b.token_ids) <= 6 for b in beams)
    probabilities = token_probabilities(model, tokenizer, "To be", one.token_ids)
    assert [p.token_id for p in probabilities] == one.token_ids and all(0 < p.prob <= 1 for p in probabilities)
    weights = model.attention_weights(torch.tensor([[1, 2, 3, 4]]), layer=1)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(1, 4, 4), atol=1e-3, rtol=0)


def test_quantized_models_take_less_memory_counted_with_their_packed_copies() -> None:
    model = GPT(tiny_config("llama", n_embd=128, d_ff=512)).eval()
    fp32 = inference_bytes(model)
    int8 = inference_bytes(quantize(deepcopy(model), "int8"))
    int4 = inference_bytes(quantize(deepcopy(model), "int4"))
    assert int4 < int8 < fp32 * 0.75


# ----- checkpoints -----


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_checkpoint_loads_as_it_was_saved_without_quantizing_again(
    tmp_path: Path, arch: str, scheme: str
) -> None:
    model = model_at(arch, "fp32", scheme)
    save_checkpoint(model, tmp_path / "q", tokenizer=Tokenizer.byte_level())
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["format_version"] == 2 and config["quantization"]["scheme"] == scheme
    loaded, _, _ = load_model(tmp_path / "q", device="cpu")
    assert quantization_of(loaded) == scheme
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)
    again, _, _ = load_model(tmp_path / "q", device="cpu", quantize_to=scheme)  # asking for what it is: fine
    assert quantization_of(again) == scheme


def test_load_model_quantizes_a_full_precision_checkpoint_on_request(tmp_path: Path) -> None:
    save_checkpoint(model_at("llama", "fp32", "none"), tmp_path / "fp", tokenizer=Tokenizer.byte_level())
    model, _, _ = load_model(tmp_path / "fp", device="cpu", quantize_to="int8", dtype=torch.bfloat16)
    assert quantization_of(model) == "int8" and model.transformer.wte.weight.dtype == torch.bfloat16
    assert generate(model, Tokenizer.byte_level(), "Hi", GenerationConfig(temperature=0.0, max_new_tokens=3)).text


def test_a_quantized_checkpoint_refuses_another_precision_unless_told_to_run_as_stored(tmp_path: Path) -> None:
    save_checkpoint(model_at("gpt2", "fp32", "int8"), tmp_path / "q", tokenizer=Tokenizer.byte_level())
    with pytest.raises(CheckpointError, match="holds int8 weights and runs only as int8: load the full-precision"):
        load_model(tmp_path / "q", device="cpu", quantize_to="int4")
    model, _, _ = load_model(tmp_path / "q", device="cpu", quantize_to="int4", quantized_as_stored=True)
    assert quantization_of(model) == "int8"


def test_a_quantized_checkpoint_with_wrong_tensors_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_checkpoint(model_at("gpt2", "fp32", "int8"), tmp_path / "q", tokenizer=Tokenizer.byte_level())
    weights = tmp_path / "q" / "model.safetensors"
    tensors = load_file(weights)
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].float()
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="c_attn.weight is stored as torch.float32, not torch.int8"):
        load_model(tmp_path / "q", device="cpu")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quantization": {"scheme": "int2"}}))
    with pytest.raises(CheckpointError, match="unknown quantization 'int2'"):
        load_model(tmp_path / "q", device="cpu")


# ----- the command line and the app -----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(model_at("llama", "fp32", "none"), folder, tokenizer=Tokenizer.byte_level())
    return folder


@pytest.mark.parametrize(("dtype", "scheme"), PRECISIONS)
def test_generate_text_at_every_precision(
    checkpoint: Path, dtype: str, scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate-text", "--checkpoint-path", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "6"]
    assert main([*args, "--sampler", "greedy", "--device", "cpu", "--dtype", dtype, "--quantize", scheme]) == 0
    assert capsys.readouterr().out.startswith("To be")


def test_benchmark_inference_reports_the_precision(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["benchmark-inference", "--max-new-tokens", "4", "--num-runs", "1", "--device", "cpu", "--json"]
    assert main([*args, "--checkpoint-path", str(checkpoint), "--quantize", "int4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"] == "int4" and report["dtype"] == "float32"
    assert main([*args, "--preset", "tiny", "--dtype", "bf16", "--quantize", "int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"] == "int8" and report["dtype"] == "bfloat16"


def test_the_command_line_refuses_unknown_precisions_in_one_line(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate-text", "--checkpoint-path", str(checkpoint), "--prompt", "x"]
    with pytest.raises(SystemExit):
        main([*args, "--quantize", "int3"])
    assert "invalid choice: 'int3' (choose from 'none', 'int8', 'int4')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--dtype", "fp16"])
    assert "invalid choice: 'fp16' (choose from 'fp32', 'bf16')" in capsys.readouterr().err


def test_the_app_quantizes_what_it_loads_and_counts_the_real_bytes(checkpoint: Path) -> None:
    settings = AppSettings.from_env({"AKSIS_QUANTIZE": "int8", "AKSIS_DTYPE": "fp32"})
    assert settings.quantize == "int8" and settings.dtype == "fp32"
    store = ModelStore(checkpoint.parent, device=torch.device("cpu"), quantize=settings.quantize)
    entry = store.get(str(checkpoint))
    assert quantization_of(entry.model) == "int8" and entry.nbytes == inference_bytes(entry.model)
    assert "int8 weights" in entry.describe()
    full = ModelStore(checkpoint.parent, device=torch.device("cpu")).get(str(checkpoint))
    assert entry.nbytes < full.nbytes
    for name, value in (("AKSIS_QUANTIZE", "int9"), ("AKSIS_DTYPE", "fp64")):
        with pytest.raises(ValueError, match=f"{name}='{value}': use one of"):
            AppSettings.from_env({name: value})


def test_exports_refuse_a_quantized_checkpoint_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(model_at("llama", "fp32", "int4"), tmp_path / "q", tokenizer=Tokenizer.byte_level())
    for fmt, out in (("gguf", "model.gguf"), ("transformers", "hf")):
        args = ["export", "--format", fmt, "--checkpoint-path", str(tmp_path / "q"), "--output", str(tmp_path / out)]
        assert main(args) == 2
        assert "holds int4 weights, which exports do not carry" in capsys.readouterr().err
        assert not (tmp_path / out).exists()


def test_training_refuses_to_start_from_a_quantized_checkpoint(tmp_path: Path) -> None:
    from aksis.config import TrainConfig
    from aksis.trainer import Trainer, TrainingError

    save_checkpoint(model_at("gpt2", "fp32", "int8"), tmp_path / "q", tokenizer=Tokenizer.byte_level())
    config = TrainConfig(init_from=str(tmp_path / "q"), output_dir=str(tmp_path / "run"), device="cpu", progress=False)
    with pytest.raises(TrainingError, match="holds int8 weights, made for inference; fine-tune from the full"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_benchmark_counts_the_parameters_of_the_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["benchmark-inference", "--preset", "tiny", "--max-new-tokens", "2", "--num-runs", "1", "--device", "cpu"]
    counts = []
    for scheme in ("none", "int4"):
        assert main([*args, "--json", "--quantize", scheme]) == 0
        counts.append(json.loads(capsys.readouterr().out)["parameters"])
    assert counts[0] == counts[1] == GPT(ModelConfig.from_preset("tiny")).num_params()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_compiled_quantized_model_decodes_what_the_eager_one_does(scheme: str, kernels: str) -> None:
    from aksis.generation import compile_for_decoding

    model = model_at("llama", "fp32", scheme)
    compiled = compile_for_decoding(model)  # packs the weights first: the compiled step runs the kernels
    int4_layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if kernels == "pytorch":
        assert all(m._packed is not None for m in int4_layers) or not int4_kernel_available()
        assert all(m._handle is not None for m in int8_layers) or not fbgemm_available()  # FBGEMM in the graph
    else:  # aksis's ops take the stored tensors: nothing packed, no handles
        assert all(m._packed is None and m._handle is None for m in int8_layers)
    with torch.inference_mode():
        eager, fast = _Session(model, [[1, 2, 3]], 4, 260), _Session(compiled, [[1, 2, 3]], 4, 260)
        a, b = eager.prefill(), fast.prefill()
        for _ in range(3):
            torch.testing.assert_close(b, a, atol=0.03 * float(a.abs().max()), rtol=0)
            token = a.argmax(dim=-1)
            a, b = eager.step(token), fast.step(token)
