"""Training-step throughput: aksis's trainer step vs Hugging Face transformers' GPT2LMHeadModel, side by side.

    python benchmarks/bench_train.py                       # base preset, CPU, fp32
    python benchmarks/bench_train.py --preset gpt2 --device cuda --precision bf16 --batch-size 16

aksis is timed through `Trainer._train_step`, the exact step a run executes (accelerate, accumulation, the
loss kept for the NaN check, clipping, fused AdamW, the LR schedule), and its loss is read after every step (a
run reads the losses at log steps only). The reference is the same network as a `GPT2LMHeadModel` with identical
weights (exported with aksis.interop) doing forward, backward, clipping and fused AdamW on the same batches. The
two are timed alternately, step by step, so machine noise hits both alike. MFU is model FLOPs per second (6 x
weights + attention, PaLM appendix B) over a peak: the datasheet peak for known GPUs, and always a measured
dense-matmul peak on this device and precision (the best of measurements before and between the steps).

Peak memory of training: aksis's is measured alone, over its warmup steps before the reference model exists
(on a GPU the peak allocated; on a CPU the process's peak RSS: interpreter, data and all). The reference's on
a GPU is its own peak over its warmup steps, above what aksis keeps allocated; on a CPU the process's peak can
only grow, so its column shows the peak of both together.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aksis.config import TrainConfig
from aksis.interop import to_hf_gpt2
from aksis.trainer import Trainer

DATASHEET_TFLOPS = {  # dense, without sparsity
    ("H100", "bf16"): 989.0,
    ("H100", "fp32"): 67.0,  # without TF32
    ("H200", "bf16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp32"): 19.5,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int | None = None) -> float:
    """Measured FLOP/s of a large square matmul: what this device can actually do at this precision."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = reps or (50 if device.type == "cuda" else 10)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_memory(device: torch.device) -> float:
    """Bytes: the peak allocated on a GPU since the last reset; on a CPU the process's peak RSS so far."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return float(rss if sys.platform == "darwin" else rss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=None, help="default: the preset's context")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()  # config notes about GPT-2's own token ids do not apply here

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            preset=args.preset,
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_steps=10**9,
            warmup_steps=0,
            device=args.device,
            mixed_precision="no" if args.precision == "fp32" else "bf16",
            compile=args.compile,
            output_dir=out,
            progress=False,
        )
        trainer = Trainer(config)
        model_config = trainer.model_config
        if model_config.arch != "gpt2":
            raise SystemExit("the reference (GPT2LMHeadModel) exists for the gpt2 flavour only; pick a gpt2 preset")
        device = trainer.accelerator.device
        plain = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

        batches = trainer._batches()
        pool = [next(batches).to(device) for _ in range(args.steps + args.warmup)]
        feed = iter(pool * 2)

        def aksis_step() -> None:
            trainer._train_step(feed)
            trainer._read_losses()

        # Warm up aksis alone first, so its peak memory is its own.
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            aksis_step()
        sync(device)
        peak = {"aksis": peak_memory(device)}
        kept = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

        hf = to_hf_gpt2(plain).to(device).train()
        hf.config.use_cache = False
        if args.compile:
            hf = torch.compile(hf)
        hf_opt = torch.optim.AdamW(
            hf.parameters(), lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=True
        )

        def hf_step(batch: torch.Tensor) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
                loss = hf(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), config.grad_clip)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {"aksis": [], "transformers": []}
        runs: dict[str, Callable[[int], None]] = {
            "aksis": lambda i: aksis_step(),
            "transformers": lambda i: hf_step(pool[i]),
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            hf_step(pool[i])
        sync(device)
        peak["transformers"] = peak_memory(device) - kept  # on a CPU: the peak of both (see the docstring)
        # The peak is measured between the steps too, and the best taken: load from other processes only ever
        # lowers a measurement, and one taken at a quiet moment would make the steps' MFU look better than it is.
        peaks = [matmul_peak(device, dtype)]
        for i in range(args.warmup, args.warmup + args.steps):
            for name, run in runs.items():
                sync(device)
                start = time.perf_counter()
                run(i)
                sync(device)
                times[name].append(time.perf_counter() - start)
            peaks.append(matmul_peak(device, dtype, reps=3 if device.type == "cpu" else 10))

        tokens = args.batch_size * trainer.block_size
        flops_per_token = plain.flops_per_token(trainer.block_size, training=True)
        measured_peak = max(peaks)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        sheet = next((v for (k, p), v in DATASHEET_TFLOPS.items() if k in gpu and p == args.precision), None)
        memory_kind = "GPU memory, each its own" if device.type == "cuda" else "process RSS: aksis alone, then both"

    print(
        f"\ntraining step: preset {args.preset} ({plain.num_params() / 1e6:.1f}M parameters), batch {args.batch_size}"
        f" x {trainer.block_size} tokens, {device.type}{' ' + gpu if gpu else ''}, {args.precision}"
        f"{', compiled' if args.compile else ''}; median of {args.steps} steps; peak memory: {memory_kind}"
    )
    print(
        f"measured matmul peak: {measured_peak / 1e12:.2f} TFLOP/s" + (f"; datasheet {sheet} TFLOP/s" if sheet else "")
    )
    header = f"| {'implementation':<14} | {'ms/step':>9} | {'tokens/s':>10} | {'MFU (measured)':>14} |"
    if sheet:
        header += f" {'MFU (datasheet)':>15} |"
    header += f" {'speed vs transformers':>21} | {'peak memory':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    reference = statistics.median(times["transformers"])
    for name, samples in times.items():
        step = statistics.median(samples)
        throughput = tokens / step
        mfu = throughput * flops_per_token / measured_peak
        row = f"| {name:<14} | {step * 1e3:>9.1f} | {throughput:>10,.0f} | {mfu:>14.1%} |"
        if sheet:
            row += f" {throughput * flops_per_token / (sheet * 1e12):>15.1%} |"
        row += f" {reference / step:>20.2f}x | {peak[name] / 2**30:>7.2f} GiB |"
        print(row)


if __name__ == "__main__":
    main()
