"""aksis's own C++ CPU kernels for x86 CPUs with AVX-512 VNNI (`csrc/cpu_kernels.cpp`): int8 and int4 layers
(aksis.quantize), float32 and bf16 layers at a few rows (aksis.kernels) and attention over the KV cache
(aksis.kv_cache).

They are compiled from source the first time they are asked for on such a CPU (`available()`: when a model is
loaded onto the CPU or compiled for decoding, else at its first forward pass), with `torch.utils.cpp_extension`:
about 10 seconds with g++, then cached on disk under `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`.
They are registered as the PyTorch ops `aksis_cpu::int8_linear`, `int4_linear`, `dense_linear` and
`cached_attention`, which eager code and compiled graphs call alike. Building needs a C++ compiler and ninja (a
requirement of aksis), as `torch.compile` on a CPU needs the compiler. Where the CPU lacks VNNI, or the build fails,
or `AKSIS_NATIVE_KERNELS=0` is set, `available()` is False and PyTorch's own kernels run instead (one log line says
why). Nothing is built at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
INT4_GROUP_SIZE = 32  # the int4 kernel's group of inputs (kGroup in the source)
ATTENTION_MAX_HEAD_DIM = 256  # the widest head the attention kernel takes (kMaxHeadDim)
NEEDS = ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_vnni")  # the instructions the kernels use

loaded: bool | None = None  # None until `available()` has been asked; then whether the ops are there
_lock = threading.Lock()


def cpu_supported() -> bool:
    """Whether this CPU has every instruction the kernels use (as PyTorch reports them)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # older PyTorch lacks it: nothing known
    if capabilities is None:
        return False
    have = capabilities()
    return all(have.get(flag, False) for flag in NEEDS)


def why_not() -> str | None:
    """Why the kernels would not be built here, or None if nothing stands in the way before building."""
    if os.environ.get("AKSIS_NATIVE_KERNELS", "1") == "0":
        return "AKSIS_NATIVE_KERNELS=0 is set"
    if not cpu_supported():
        return f"this CPU lacks one of {', '.join(NEEDS)}"
    return None


def available() -> bool:
    """Whether the `aksis_cpu` ops can be called: built (or found built) and loaded on the first call, in any
    thread; the answer is kept for the process."""
    global loaded
    if loaded is not None:
        return loaded
    with _lock:
        if loaded is None:
            loaded = _load()
    return loaded


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """PATH with the `ninja` package's binary on it while building, if no ninja is on it already: a virtual
    environment used without activating it has the package but not its bin folder on PATH."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        if shutil.which("ninja") is None:
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, old])
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _load() -> bool:
    reason = why_not()
    if reason is None and hasattr(torch.ops.aksis_cpu, "int4_linear"):
        return True  # loaded already (a second library defining the same ops would end the process)
    if reason is None:
        try:
            from torch.utils import cpp_extension

            log.info("loading aksis's CPU kernels (built once per machine, in about 10 s: %s)", SOURCE.name)
            with _ninja_on_path():
                cpp_extension.load(
                    name="aksis_cpu_kernels",
                    sources=[str(SOURCE)],
                    # -fopenmp: at::parallel_for runs its threads through OpenMP pragmas in PyTorch's headers, which
                    # without it run on one thread. The OpenMP library loaded is the one PyTorch already loaded.
                    extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                )
            return True
        except Exception as err:  # no compiler, no ninja, an unwritable cache: PyTorch's kernels still work
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("aksis's CPU kernels failed to build (%s); PyTorch's kernels run instead", first_line)
            return False
    log.info("aksis's CPU kernels are not used: %s; PyTorch's kernels run instead", reason)
    return False
