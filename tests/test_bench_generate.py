"""benchmarks/bench_generate.py's profile: a decode step's time sorted by kind."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import tiny_config

from aksis.model import GPT
from aksis.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]


def bench_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_profiler_events_are_sorted_by_kind() -> None:
    kind_of = bench_generate().kind_of
    for op in ["aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "aten::fbgemm_linear_int8_weight"]:
        assert kind_of(op) == "multiplies", op
    assert kind_of("aten::_weight_int4pack_mm_for_cpu") == kind_of("quantized::linear_dynamic") == "multiplies"
    assert kind_of("aksis::int8_linear") == "int8 op Python"  # its own time; the FBGEMM call inside is a multiply
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert (
        kind_of("## Call CompiledFxGraph fx4fs2 ##")
        == kind_of("## Call CompiledFxGraph fmm2linear")
        == "compiled kernels"
    )
    assert kind_of("TorchDynamo Cache Lookup") == kind_of("Torch-Compiled Region: 0/3") == "Dynamo"
    assert kind_of("aten::add") == kind_of("aten::index_copy_") == kind_of("aten::layer_norm") == "other ops"


@pytest.mark.parametrize("scheme", ["none", "int8"])
def test_a_profiled_decode_step_is_accounted_for(scheme: str) -> None:
    bench = bench_generate()
    torch.manual_seed(0)
    model = quantize(GPT(tiny_config("llama", vocab_size=260)).eval(), scheme)
    ms = bench.profile_decoding(model, [[1, 2, 3], [4, 5, 6]], 260, steps=4)
    assert set(ms) == {*bench.PROFILE_KINDS, "step"}
    assert ms["multiplies"] > 0 and ms["attention"] > 0 and ms["other ops"] > 0
    assert ms["compiled kernels"] == ms["Dynamo"] == 0  # an eager model
    assert sum(ms[kind] for kind in bench.PROFILE_KINDS) >= ms["step"] * 0.999  # untracked: the rest of the wall time
    lines = bench.profile_table({"aksis": ms}, 2, 4, []).splitlines()
    assert lines[0].startswith("| batch | implementation") and lines[2].startswith("|     2 | aksis ")
    assert "compiled ahead of time" not in lines[-1]
    ahead = bench.profile_table({"aksis": ms, "aksis compiled": ms}, 2, 4, ["aksis compiled"]).splitlines()
    assert ahead[-1].startswith("(aksis compiled: compiled ahead of time") and len(ahead) == len(lines) + 2
