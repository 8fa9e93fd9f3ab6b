"""Generation speed: aksis's `generate_batch` vs Hugging Face transformers' `generate`, side by side, on identical
weights (GPT2LMHeadModel for a gpt2-flavour model, LlamaForCausalLM or Qwen2ForCausalLM for a llama-flavour one).

    python benchmarks/bench_generate.py                                  # base preset, CPU fp32, batch 1 and 8
    python benchmarks/bench_generate.py --preset smollm2-135m --new-tokens 128 --runs 3   # SmolLM2-135M's shape
    python benchmarks/bench_generate.py --llama-cpp --batch-sizes 1   # + llama.cpp f32/f16/q8_0/q4_0 rows
    python benchmarks/bench_generate.py --aksis-precisions bf16 int8 int4 --llama-cpp   # low precision, side by side
    python benchmarks/bench_generate.py --text tinyshakespeare.txt --compile --runs 5
    python benchmarks/bench_generate.py --threads 1          # a busy machine: one thread suffers less from others
    python benchmarks/bench_generate.py --preset gpt2 --device cuda --compile   # bf16 on a GPU

Both run greedy decoding of the same prompts (`--prompt-tokens` each, cut from `--text`, default the embedded
Shakespeare plays) for exactly `--new-tokens` tokens (no stop token: aksis gets `stop_ids=set()`, transformers
`eos_token_id=None`), on identical weights: the aksis model (random weights of `--preset`, or `--checkpoint`) and
its export through `aksis.interop.to_transformers`. Without a checkpoint, the tokenizer is a BPE trained on the text
to the preset's vocabulary size (at most 10,004 tokens; both then generate only the tokenizer's ids). aksis is timed
through `generate_batch`, the call the CLI and the app make (text decoding and stop checks included); transformers
through `generate` in the settings listed below. Each repetition runs every implementation once, starting with a
different one each time, so machine noise hits all alike.

Columns: tokens/s = batch x new tokens / wall time (median over runs); time to first token = a separate 1-token
generation (prefill + first token); ms/token = (total - first token) / (new tokens - 1): the decode step; peak
memory = the process's peak RSS while that implementation ran (CPU; both models are loaded, so compare the
difference) or `torch.cuda.max_memory_allocated` (GPU); same ids = the generated token ids equal aksis's; the last
column is tokens/s relative to the fastest transformers setting.

transformers settings: "dynamic cache" is the default (DynamicCache); "static cache" is
`cache_implementation="static"` with auto-compilation off; "static cache + compile" (with --compile) is a second
copy of the model, compiled as transformers users get it: on a CPU `forward = torch.compile(forward)`, on a GPU
the static cache with transformers' own automatic compilation of the decode step (mode "reduce-overhead", CUDA
graphs). aksis "compiled" (with --compile) is `compile_for_decoding(model)` passed to generation, as `aksis
benchmark-inference --compile` does: on a GPU the same mode, on a CPU with aksis's kernels decode steps compiled ahead
of time (aksis.aot), on other CPUs `torch.compile`. Compilation happens in the warm-up and is not timed.

Low precision (CPU): `--aksis-precisions bf16 int8 int4` adds aksis rows for the same weights loaded as
`--dtype bf16` and `--quantize int8` / `int4` do (aksis.quantize); `--llama-cpp` adds llama.cpp rows on aksis's GGUF
export of the same weights in f32 / f16 / q8_0 / q4_0. With both, the "vs llama.cpp" column compares each aksis row
with llama.cpp at the same bits (fp32 with f32, bf16 with f16, int8 with q8_0, int4 with q4_0). With --compile too,
each precision also gets a compiled row (`compile_for_decoding`). The "same ids" of a
low-precision row is expected to end somewhere (rounding changes a near tie), so it says how many tokens matched.

`--profile` adds, after the tables, where an aksis decode step's time goes: `torch.profiler` over `--profile-steps`
decode steps of each aksis row (after a prefill and a few unprofiled steps), per step, with each op's own time
(not its callees') summed by kind: the matrix multiplies (every op named for mm or linear, FBGEMM's and the int4
kernel included), attention, the kernels inductor generated for a compiled step, Dynamo's work around a compiled
call (its guards above all), the Python of aksis's int8 op, every other op, and what no op accounts for (Python
between the ops; in a step compiled ahead of time, also the library's own kernels, which record no event). The
profiler adds a little to each op, so a profiled step is usually slower than the table's (the machine's state moves
too: compare steps within one table).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aksis.aot import CompiledDecoder
from aksis.checkpoint import load_model
from aksis.config import GGUF_OUT_TYPES, GenerationConfig, ModelConfig
from aksis.generation import _Session, compile_for_decoding, generate_batch
from aksis.interop import to_transformers
from aksis.kernels import use_cpu_kernels
from aksis.kv_cache import KVCache
from aksis.model import GPT
from aksis.quantize import quantize
from aksis.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer

PEERS = {  # each aksis row and the llama.cpp row at the same bits
    "aksis": "llama.cpp f32",
    "aksis bf16": "llama.cpp f16",
    "aksis int8": "llama.cpp q8_0",
    "aksis int4": "llama.cpp q4_0",
    "aksis compiled": "llama.cpp f32",
    "aksis bf16 compiled": "llama.cpp f16",
    "aksis int8 compiled": "llama.cpp q8_0",
    "aksis int4 compiled": "llama.cpp q4_0",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory while a block runs: the process's RSS high-water mark on the CPU (reset through
    /proc/self/clear_refs, Linux), allocated GPU memory on CUDA. In bytes; None where it cannot be measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # not Linux: the peak stays that of the whole process
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return
        line = next((s for s in status.splitlines() if s.startswith("VmHWM:")), None)
        self.peak = int(line.split()[1]) * 1024 if line else None


@dataclass
class Impl:
    name: str
    run: Callable[[int], list[list[int]]]  # new tokens -> token ids (B rows)
    totals: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    peak: int = 0
    ids: list[list[int]] | None = None


def timed(device: torch.device, fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    sync(device)
    start = time.perf_counter()
    ids = fn()
    sync(device)
    return time.perf_counter() - start, ids


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[GPT, Tokenizer, str]:
    if args.checkpoint:
        model, tokenizer, _ = load_model(args.checkpoint, device=device, dtype=dtype)
        return model, tokenizer, args.checkpoint
    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device=device, dtype=dtype).eval()
    if device.type == "cpu":  # as load_model does
        use_cpu_kernels(model)
    tokenizer = Tokenizer.train([read_text(args.text)], vocab_size=min(config.vocab_size, DEFAULT_VOCAB_SIZE))
    return model, tokenizer, f"preset {args.preset} (random weights, seed {args.seed}; BPE trained on the text)"


def read_text(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8")
    from aksis.corpora import shakespeare_plays

    return "".join(shakespeare_plays())


def prompts_from(tokenizer: Tokenizer, text: str, batch: int, length: int) -> list[list[int]]:
    """`batch` different prompts of `length` tokens: consecutive slices from the middle of the text."""
    ids = tokenizer.encode(text[len(text) // 2 : len(text) // 2 + 200 * length * batch])
    if len(ids) < batch * length:
        raise SystemExit(f"the text is too short for {batch} prompts of {length} tokens")
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def kv_cache_check(model: GPT, prompt_tokens: int, new_tokens: int) -> str:
    """The KV cache generation allocates for batch 1, against the arithmetic, and whether decoding kept it."""
    cfg = model.config
    param = next(model.parameters())
    max_len = min(cfg.block_size, prompt_tokens + new_tokens)
    assert cfg.n_kv_head is not None
    expected = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * max_len * param.element_size()
    with torch.inference_mode():
        session = _Session(model, [[1] * prompt_tokens], new_tokens, cfg.vocab_size)
        cache: KVCache = session.cache
        pointers = cache.data_ptrs()
        tokens = session.prefill().argmax(dim=-1)
        for _ in range(min(new_tokens, 16) - 1):
            tokens = session.step(tokens).argmax(dim=-1)
        kept = pointers == cache.data_ptrs()
    return (
        f"KV cache, batch 1: 2 (k, v) x {cfg.n_layer} layers x {cfg.n_kv_head} KV heads x {cfg.head_dim} head dim x "
        f"{max_len} slots x {param.element_size()} bytes = {expected:,} bytes; allocated {cache.nbytes:,} bytes "
        f"({'equal' if cache.nbytes == expected else 'DIFFERENT'}), "
        f"{'same storage through decoding' if kept else 'storage CHANGED while decoding'}"
    )


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    """ "yes", or how far the rows agree: the shortest common prefix over the rows, in tokens."""
    matched = []
    for x, y in zip(a, b, strict=True):
        matched.append(next((i for i, (s, t) in enumerate(zip(x, y, strict=True)) if s != t), len(x)))
    return "yes" if all(m == len(x) for m, x in zip(matched, a, strict=True)) else f"first {min(matched)}"


def precision_copy(model: GPT, precision: str) -> GPT:
    """The model as `load_model(..., dtype=, quantize_to=)` makes it: bf16 compute, or int8 / int4 linear layers."""
    m = copy.deepcopy(model)
    if precision == "bf16":
        return m.to(torch.bfloat16)
    return quantize(m, precision)  # type: ignore[return-value]


def bench_batch(
    args: argparse.Namespace,
    model: GPT,
    tokenizer: Tokenizer,
    hf_models: dict[str, Any],
    device: torch.device,
    batch: int,
    text: str,
) -> list[Impl]:
    prompts = prompts_from(tokenizer, text, batch, args.prompt_tokens)
    input_ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(input_ids)
    vocab = tokenizer.vocab_size
    # aksis samples only the tokenizer's ids; tell transformers the same when the model's table is larger.
    suppress = list(range(vocab, model.config.vocab_size)) or None

    def aksis(m: Any) -> Callable[[int], list[list[int]]]:
        def run(n: int) -> list[list[int]]:
            config = GenerationConfig(temperature=0.0, max_new_tokens=n)
            return [c.token_ids for c in generate_batch(m, tokenizer, prompts, config, stop_ids=set())]

        return run

    def hf(m: Any, **settings: Any) -> Callable[[int], list[list[int]]]:
        def run(n: int) -> list[list[int]]:
            with torch.inference_mode():
                out = m.generate(
                    input_ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    suppress_tokens=suppress,
                    **settings,
                )
            return out[:, input_ids.size(1) :].tolist()

        return run

    impls = [Impl("aksis", aksis(model))]
    for precision, m in hf_models.get("aksis_precisions", {}).items():
        impls.append(Impl(f"aksis {precision}", aksis(m)))
    for precision, m in hf_models.get("aksis_precisions_compiled", {}).items():
        impls.append(Impl(f"aksis {precision} compiled", aksis(m)))
    if "aksis_compiled" in hf_models:
        impls.append(Impl("aksis compiled", aksis(hf_models["aksis_compiled"])))
    impls.append(Impl("transformers, dynamic cache", hf(hf_models["eager"])))
    impls.append(Impl("transformers, static cache", hf(hf_models["eager"], cache_implementation="static")))
    if "compiled" in hf_models:
        impls.append(
            Impl("transformers, static cache + compile", hf(hf_models["compiled"], cache_implementation="static"))
        )
    for outtype, llm in hf_models.get("llama_cpp", {}).items():
        impls.append(Impl(f"llama.cpp {outtype}", llama_cpp_run(llm, prompts)))
    for impl in impls:  # warm-up: allocation, kernel choice, compilation
        start = time.perf_counter()
        for _ in range(args.warmup):
            impl.run(1)
            impl.run(args.new_tokens)
        if "compile" in impl.name:
            print(f"  warm-up of {impl.name} (compilation included): {time.perf_counter() - start:.0f}s", flush=True)
    for rep in range(args.runs):
        order = impls[rep % len(impls) :] + impls[: rep % len(impls)]
        for impl in order:
            with PeakMemory(device) as peak:
                ttft, _ = timed(device, lambda impl=impl: impl.run(1))  # type: ignore[misc]
                total, ids = timed(device, lambda impl=impl: impl.run(args.new_tokens))  # type: ignore[misc]
            impl.ttfts.append(ttft)
            impl.totals.append(total)
            impl.peak = max(impl.peak, peak.peak or 0)
            impl.ids = impl.ids or ids
        print(
            f"  batch {batch}, run {rep + 1}/{args.runs}: "
            + ", ".join(f"{i.name} {batch * args.new_tokens / i.totals[-1]:.0f}" for i in impls)
            + " tokens/s",
            flush=True,
        )
    return impls


def llama_cpp_models(model: GPT, tokenizer: Tokenizer, outtypes: list[str], folder: Path) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) models of the same weights: aksis's GGUF export in each out type."""
    import llama_cpp

    from aksis.gguf_format import export_gguf

    models = {}
    for outtype in outtypes:
        path = export_gguf(model, tokenizer, folder / f"model-{outtype}.gguf", outtype=outtype)
        models[outtype] = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=model.config.block_size,
            n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(),
            verbose=False,
        )
    return models


def llama_cpp_run(llm: Any, prompts: list[list[int]]) -> Callable[[int], list[list[int]]]:
    """Greedy decoding in llama.cpp, one prompt after another (its Python API decodes one sequence at a time)."""

    def run(n: int) -> list[list[int]]:
        out = []
        for prompt in prompts:
            ids: list[int] = []
            for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                ids.append(int(token))
                if len(ids) == n:
                    break
            out.append(ids)
        return out

    return run


PROFILE_KINDS = ("multiplies", "attention", "compiled kernels", "Dynamo", "int8 op Python", "other ops", "untracked")


def kind_of(op: str) -> str:
    """The kind (PROFILE_KINDS) of a profiler event by its name."""
    if op.startswith("## Call CompiledFxGraph"):  # first: the graph's name ends in a hash, which may hold "mm"
        return "compiled kernels"
    if op.startswith(("TorchDynamo", "Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher")):
        return "Dynamo"
    if op.startswith("aksis::"):
        return "int8 op Python"  # its own time: the Python around the FBGEMM call (recorded as a multiply)
    if "scaled_dot_product" in op or "attention" in op:
        return "attention"
    if "mm" in op.split("::")[-1] or "linear" in op:
        return "multiplies"
    return "other ops"


def profile_decoding(model: GPT, prompts: list[list[int]], vocab: int, steps: int) -> dict[str, float]:
    """Milliseconds per decode step of each kind (PROFILE_KINDS), and "step": the profiled step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        session = _Session(model, prompts, steps + 8, vocab)
        tokens = session.prefill().argmax(dim=-1)
        for _ in range(5):  # settle: the first steps allocate and choose kernels
            tokens = session.step(tokens).argmax(dim=-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                tokens = session.step(tokens).argmax(dim=-1)
            wall = time.perf_counter() - start
    ms = dict.fromkeys(PROFILE_KINDS, 0.0)
    for event in prof.key_averages():
        ms[kind_of(event.key)] += event.self_cpu_time_total / 1000 / steps
    ms["untracked"] = max(1000 * wall / steps - sum(ms.values()), 0.0)
    ms["step"] = 1000 * wall / steps
    return ms


def profile_table(rows: dict[str, dict[str, float]], batch: int, steps: int, ahead: list[str]) -> str:
    header = f"| batch | {'implementation':<24} | step ms | " + " | ".join(PROFILE_KINDS) + " |"
    lines = [header, "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"]
    for name, ms in rows.items():
        cells = " | ".join(f"{ms[kind]:>{len(kind)}.2f}" for kind in PROFILE_KINDS)
        lines.append(f"| {batch:>5} | {name:<24} | {ms['step']:>7.2f} | {cells} |")
    lines.append(f"(torch.profiler, {steps} decode steps, ms per step, each op's own time summed by kind)")
    if ahead:
        lines.append(
            f"({', '.join(ahead)}: compiled ahead of time; the library's own kernels record no event, so they are in "
            "untracked)"
        )
    return "\n".join(lines)


def table(impls: list[Impl], batch: int, new_tokens: int, device: torch.device) -> str:
    reference = [i for i in impls if i.name.startswith("transformers")]
    best = min(reference, key=lambda i: statistics.median(i.totals))
    best_tps = batch * new_tokens / statistics.median(best.totals)
    assert impls[0].ids is not None
    memory_label = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    by_name = {i.name: i for i in impls}
    peers = any(name in by_name for name in PEERS.values())
    header = (
        f"| batch | {'implementation':<36} | tokens/s | first token ms | ms/token | {memory_label} | same ids |"
        " vs transformers |" + (" vs llama.cpp |" if peers else "")
    )
    lines = [header, "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"]
    for impl in impls:
        assert impl.ids is not None
        total, ttft = statistics.median(impl.totals), statistics.median(impl.ttfts)
        tps = batch * new_tokens / total
        ms = 1000 * (total - ttft) / max(new_tokens - 1, 1)
        same = "-" if impl is impls[0] else first_difference(impls[0].ids, impl.ids)
        peer = by_name.get(PEERS.get(impl.name, ""))
        vs_peer = f"{statistics.median(peer.totals) / total:.2f}x" if peer else "-"
        lines.append(
            f"| {batch:>5} | {impl.name:<36} | {tps:>8,.0f} | {1000 * ttft:>14.1f} | {ms:>8.2f} | "
            f"{impl.peak / 2**20:>{len(memory_label)},.0f} | {same:>8} | {tps / best_tps:>14.2f}x |"
            + (f" {vs_peer:>12} |" if peers else "")
        )
    lines.append(f"(fastest transformers setting at batch {batch}: {best.name})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", help="model preset (random weights)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder or Hub id instead of a preset")
    parser.add_argument("--text", default=None, help="text for the prompts (and the BPE); default: embedded plays")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"), help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per implementation and batch size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd aksis and transformers rows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="add where each aksis row's decode step time goes")
    parser.add_argument("--profile-steps", type=int, default=20, help="decode steps profiled per row")
    parser.add_argument(
        "--llama-cpp",
        nargs="*",
        choices=GGUF_OUT_TYPES,
        default=None,
        help="add llama.cpp rows (llama-cpp-python) on aksis's GGUF export of the same weights, in these out types "
        "(default with no value: all); llama.cpp decodes the prompts of a batch one after another",
    )
    parser.add_argument(
        "--aksis-precisions",
        nargs="*",
        choices=("bf16", "int8", "int4"),
        default=[],
        help="add aksis rows at these precisions (CPU; default with no value: all three)",
    )
    args = parser.parse_args()
    if args.aksis_precisions == [] and "--aksis-precisions" in sys.argv:
        args.aksis_precisions = ["bf16", "int8", "int4"]
    if args.llama_cpp == []:
        args.llama_cpp = list(GGUF_OUT_TYPES)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.runs < 1 or args.profile_steps < 1:
        raise SystemExit("--new-tokens must be at least 2, --prompt-tokens, --runs and --profile-steps at least 1")
    import transformers

    transformers.logging.set_verbosity_error()  # config notes about GPT-2's own token ids do not apply here
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    model, tokenizer, source = build(args, device, dtype)
    if model.config.block_size < args.prompt_tokens + max(
        args.new_tokens, args.profile_steps + 8 if args.profile else 0
    ):
        raise SystemExit(
            f"prompt + new tokens (or profiled steps + 8) must fit the context ({model.config.block_size})"
        )
    hf_models: dict[str, Any] = {"eager": to_transformers(model).to(device=device, dtype=dtype)}
    if args.compile:
        # Dynamo keeps its compiled variants per function (GPT.forward), up to recompile_limit (8) in all: each model
        # compiled here takes two or three (prefill lengths, the decode step), and past the limit a model would run
        # eager under a "compiled" name. So the limit makes room for every compiled model of this run.
        torch._dynamo.config.recompile_limit = 64
        hf_models["aksis_compiled"] = compile_for_decoding(model)  # as benchmark-inference --compile does
        compiled = to_transformers(model).to(device=device, dtype=dtype)
        if device.type == "cpu":
            compiled.forward = torch.compile(compiled.forward, fullgraph=True)
        # On a GPU, transformers' generate compiles the decode step itself when the cache is static (CUDA graphs,
        # "reduce-overhead"), marking each step so that a graph's outputs are read before the next replay: the
        # way its users compile. A forward compiled from outside fails there ("accessing tensor output of
        # CUDAGraphs that has been overwritten by a subsequent run").
        hf_models["compiled"] = compiled
    if args.aksis_precisions:
        if device.type != "cpu" or dtype != torch.float32:
            raise SystemExit("--aksis-precisions compares with the fp32 model on the CPU")
        hf_models["aksis_precisions"] = {p: precision_copy(model, p) for p in args.aksis_precisions}
        if args.compile:
            copies = {p: precision_copy(model, p) for p in args.aksis_precisions}
            hf_models["aksis_precisions_compiled"] = {p: compile_for_decoding(m) for p, m in copies.items()}
    if args.llama_cpp:
        if device.type != "cpu":
            raise SystemExit("--llama-cpp compares on the CPU")
        try:
            hf_models["llama_cpp"] = llama_cpp_models(model, tokenizer, args.llama_cpp, Path(tempfile.mkdtemp()))
        except ImportError:
            raise SystemExit("--llama-cpp needs llama.cpp's Python package: pip install llama-cpp-python") from None
    for key, m in hf_models.items():
        if hasattr(m, "generation_config"):  # only the compiled row compiles (on a GPU, transformers would too)
            m.generation_config.disable_compile = not (key == "compiled" and device.type == "cuda")

    text = read_text(args.text)
    gpu = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"generation: {source}, {model.num_params() / 1e6:.1f}M parameters; {device.type}{gpu}, {precision}, "
        f"{torch.get_num_threads()} threads; greedy, {args.prompt_tokens}-token prompts, exactly {args.new_tokens} "
        f"new tokens; median of {args.runs} runs; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(kv_cache_check(model, args.prompt_tokens, args.new_tokens))
    tables = []
    for batch in args.batch_sizes:
        impls = bench_batch(args, model, tokenizer, hf_models, device, batch, text)
        tables.append(table(impls, batch, args.new_tokens, device))
    if args.profile:
        aksis_models = {"aksis": model, **{f"aksis {p}": m for p, m in hf_models.get("aksis_precisions", {}).items()}}
        aksis_models.update(
            {f"aksis {p} compiled": m for p, m in hf_models.get("aksis_precisions_compiled", {}).items()}
        )
        if "aksis_compiled" in hf_models:
            aksis_models["aksis compiled"] = hf_models["aksis_compiled"]
        for batch in args.batch_sizes:
            prompts = prompts_from(tokenizer, text, batch, args.prompt_tokens)
            vocab = tokenizer.vocab_size
            rows = {name: profile_decoding(m, prompts, vocab, args.profile_steps) for name, m in aksis_models.items()}
            ahead = [name for name, m in aksis_models.items() if isinstance(m, CompiledDecoder)]
            tables.append(profile_table(rows, batch, args.profile_steps, ahead))
    print()
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
