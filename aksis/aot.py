"""Decode steps compiled ahead of time for a CPU (AOTInductor): what `generation.compile_for_decoding` runs there.

At batch 1 on a CPU, a small model's decode step is mostly the code around its matrix multiplies. `torch.compile`
keeps a share of it: every call goes through Dynamo, which checks its guards over the step's tensors in Python, and
enters the generated code from Python. Here the one-token step is traced once with `torch.export` and compiled by
AOTInductor into a shared library, and a step is one call of its C++ entry point over the token ids, the slot and
the cache tensors. On the base preset at batch 1, alternating in one process (README, Performance): an int4 step
0.34 ms against 0.47 compiled with `torch.compile` and 0.64 eager; fp32 2.11 against 2.43 and 2.45.

- A step is compiled for one batch size and for rows with or without left padding (`KVCache.set_padding`); the
  cache's length is a dynamic dimension, so every later generation of that batch size reuses it. Prefill (several
  tokens), training, and every other call run the model as it is, and so do batches of more rows than aksis's
  dense kernel takes in a float32 or bf16 model (`kernels.NATIVE_MAX_ROWS`: eager, its layers use oneDNN there).
- The library holds no weights: it is handed the model's own tensors (`load_constants(user_managed=True)`), so it
  adds no memory beyond its activations; a change to them in place shows in the next step. It keeps references to
  them, so a parameter replaced by another (not written in place) leaves it reading the old one: compile again.
- Compiling takes 7-11 s for the base preset on a 2-core CPU. The library is kept under
  `default_cache_dir()/decode_steps`, named by a hash of the exported program (the model's code, shapes and dtypes as
  traced), PyTorch's version, the CPU's vector capability and the thread count, and loaded from there the next time.
- A library keeps its activations between calls, so calls are serialised by a lock (generation may run in several
  threads, as the app's does).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._inductor.package.package import AOTICompiledModel

from aksis.config import default_cache_dir
from aksis.kernels import NATIVE_MAX_ROWS, CPULinear
from aksis.kv_cache import KVCache
from aksis.model import GPT

log = logging.getLogger(__name__)

_INDUCTOR_OPTIONS = {"aot_inductor.package_constants_in_so": False}  # weights come from the model at load time


def steps_dir() -> Path:
    """Where compiled decode steps are kept: `default_cache_dir()/decode_steps` ($AKSIS_CACHE/decode_steps if set)."""
    return default_cache_dir() / "decode_steps"


class NotCompilable(RuntimeError):
    """The step compiled into a library that needs what the model cannot hand it: it runs eager instead."""


class _StepModule(nn.Module):
    """The model's one-token step over a cache made of its inputs, as `torch.export` traces it."""

    def __init__(self, model: GPT, padded: bool) -> None:
        super().__init__()
        self.model, self.padded = model, padded

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        n = self.model.config.n_layer
        pad = tensors[2 * n] if self.padded else None
        cache = KVCache.over(tensors[:n], tensors[n : 2 * n], pad)
        logits, _ = self.model(idx, kv_cache=cache, input_pos=input_pos, last_only=True)
        return logits


class DecodeStep:
    """One compiled step: `step(idx, input_pos, cache)` is `model(idx, kv_cache=cache, input_pos=input_pos,
    last_only=True)[0]` for one token per row, with the cache written in place, for caches of `batch_size` rows of
    `dtype`, padded or not."""

    def __init__(self, model: GPT, batch_size: int, padded: bool, dtype: torch.dtype) -> None:
        cfg = model.config
        assert cfg.n_kv_head is not None
        slots = torch.export.Dim("slots", min=2, max=cfg.block_size)
        with torch.inference_mode(False), torch.no_grad():  # export wants tensors made outside inference mode
            shape = (batch_size, cfg.n_kv_head, cfg.block_size, cfg.head_dim)  # the longest cache: any shorter fits
            kv = [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.n_layer)]
            extra = [torch.zeros(batch_size, dtype=torch.long)] if padded else []
            example = (torch.zeros(batch_size, 1, dtype=torch.long), torch.tensor([cfg.block_size - 1]), *kv, *extra)
            dynamic = (None, None, (*[{2: slots}] * len(kv), *[None] * len(extra)))  # (idx, input_pos, *tensors)
            program = torch.export.export(_StepModule(model, padded), example, dynamic_shapes=dynamic)
        # Inductor fits its kernels' loops to the CPU's vector width and the threads it may use.
        machine = [torch.backends.cpu.get_cpu_capability(), platform.machine(), str(torch.get_num_threads())]
        key = hashlib.sha256("\n".join([str(program), torch.__version__, *machine]).encode()).hexdigest()[:24]
        path = steps_dir() / f"{key}.pt2"
        package = _load(path) if path.exists() else None
        if package is None:
            log.info("compiling a decode step for %d row(s) ahead of time (once: kept in %s)", batch_size, path.parent)
            start = time.perf_counter()
            try:
                _compile(program, path)
            except OSError as err:  # a cache folder that cannot be written (a read-only home, a full disk)
                log.warning(
                    "cannot keep the compiled decode step in %s (%s): compiling it for this process only",
                    path.parent,
                    err,
                )
                folder = tempfile.mkdtemp(prefix="aksis-decode-step-")
                atexit.register(shutil.rmtree, folder, ignore_errors=True)
                path = Path(folder) / path.name
                _compile(program, path)
            log.info("compiled the decode step in %.1f s", time.perf_counter() - start)
            package = _load(path)
            if package is None:
                raise RuntimeError(f"the decode step just compiled to {path} does not load")
        constants = {**program.state_dict, **program.constants}
        unknown = [name for name in package.get_constant_fqns() if name not in constants]
        if unknown:  # inductor's own (e.g. PyTorch's int4 kernel's group size): not in the library, nothing to hand
            raise NotCompilable(f"the compiled decode step wants constants the model does not have: {unknown[:3]}")
        self._constants = {name: constants[name] for name in package.get_constant_fqns()}  # kept alive here
        package.load_constants(self._constants, check_full_update=True, user_managed=True)
        self.package, self.padded = package, padded

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The library reads each input as laid out like the example it was traced with (contiguous) and checks no
        # strides: a column of the session's token buffer, (B, 1) with a row stride of its capacity, must be copied.
        inputs = [idx.contiguous(), input_pos.contiguous(), *cache.k, *cache.v]  # KVCache allocates them contiguous
        if self.padded:
            assert cache.pad is not None
            inputs.append(cache.pad.contiguous())
        return self.package.loader.boxed_run(inputs)[0]  # the flat call: the package's own parses its specs each time


def _compile(program: torch.export.ExportedProgram, path: Path) -> None:
    """Compile to a temporary file beside `path`, then move it there: a reader never sees half a library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # PyTorch's own pytree, packaging: nothing a user of aksis can act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=_INDUCTOR_OPTIONS)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load(path: Path) -> AOTICompiledModel | None:
    """The compiled package, or None (with a warning) if the file does not load: it is compiled again."""
    try:  # run_single_threaded: calls come one at a time (DecodeStep's lock), so no pool of runners
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    except Exception as err:  # a truncated or foreign file: compiled anew over it
        log.warning("the compiled decode step %s does not load (%s): compiling it again", path, err)
        return None


class CompiledDecoder(nn.Module):
    """A GPT whose one-token decode steps on a CPU run through `DecodeStep`s, compiled on first use for each batch
    size (only those of `batch_sizes`, if given: the app compiles batch 1 only, so that no visitor can make it compile
    for every beam width); every other call runs the model itself. Attributes not its own (config,
    attention_weights, ...) are the model's."""

    def __init__(self, model: GPT, batch_sizes: Collection[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self._batch_sizes = None if batch_sizes is None else frozenset(batch_sizes)
        self._steps: dict[tuple[int, bool, torch.dtype], DecodeStep | None] = {}  # None: that step runs eager
        self._lock = threading.Lock()
        # Past its dense kernel's rows, an eager CPULinear multiplies through oneDNN's packed weights, which cannot
        # enter a compiled library, where F.linear (MKL) would be slower than eager: those batches stay eager.
        dense = [NATIVE_MAX_ROWS.get(m.weight.dtype, 0) for m in model.modules() if isinstance(m, CPULinear)]
        self._max_rows = min(dense, default=sys.maxsize)

    def prepare(self, batch_size: int = 1, padded: bool = False) -> None:
        """Compile (or load) the step of `batch_size` rows now, so that the first generation does not wait for it."""
        self._step((batch_size, padded, next(self.model.parameters()).dtype))

    def _step(self, key: tuple[int, bool, torch.dtype]) -> DecodeStep | None:
        with self._lock:
            if key not in self._steps:
                try:
                    self._steps[key] = DecodeStep(self.model, *key)
                except NotCompilable as err:
                    log.warning("%s: decoding %d row(s) runs eager", err, key[0])
                    self._steps[key] = None
            return self._steps[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            kv_cache is None
            or input_pos is None
            or targets is not None
            or not last_only
            or idx.shape != (kv_cache.batch_size, 1)
            or idx.device.type != "cpu"
            or kv_cache.max_len < 2
            or self.model.config.block_size < 3  # the dynamic cache length needs a range of at least 2..3
            or torch.is_grad_enabled()
            or kv_cache.batch_size > self._max_rows
            or (self._batch_sizes is not None and kv_cache.batch_size not in self._batch_sizes)
        ):
            return self.model(idx, targets, kv_cache, input_pos, last_only)
        step = self._step((kv_cache.batch_size, kv_cache.pad is not None, kv_cache.dtype))
        if step is None:
            return self.model(idx, targets, kv_cache, input_pos, last_only)
        with self._lock:  # the library's activations are its own: one call at a time
            return step(idx, input_pos, kv_cache), None
