"""Faster layers for inference, put in place of the model's own when a model is loaded to run, not to train.

`aksis.model` builds its projections from plain `nn.Linear`; it is the transformer and nothing else. Decoding reads
every weight once per token, so its speed is the speed of few-row matmuls, which some kernels do much better than
the one `F.linear` calls. `use_cpu_kernels(model)` swaps each `nn.Linear` of a model for a `CPULinear` that shares
its parameters (nothing is copied, tied weights stay tied), the way gpt-fast's quantize.py swaps in quantized
layers at load time; `aksis.checkpoint.load_model` does it for a model loaded onto the CPU. `inference_bytes` is
the memory such a model's weights take, packed copies included. The measured gains are in the README
(Performance).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from aksis import native

PACKED_DTYPES = (torch.float32, torch.bfloat16)  # what CPULinear runs faster than F.linear
# Rows a call may bring to aksis's dense kernel (aksis.native), by dtype: where it measured faster than CPULinear's
# other paths. For the base preset's 25 layers (with biases), in ms: float32 1.87 against 2.06 at one row, 2.14
# against 2.30 at two, 2.41 against oneDNN's 2.23 at four; bf16 0.79 against oneDNN's 1.15 at one row, 1.41 against
# 1.53 at eight, 2.42 against 1.94 at sixteen. (Since then, one row, and two in float32, read a weight row at a time:
# float32 1.11-1.80 against 1.53-1.97 at one row, bf16 0.50-0.68 against 0.83-1.08, without biases.)
NATIVE_MAX_ROWS = {torch.float32: 2, torch.bfloat16: 8}


@functools.cache
def onednn_available() -> bool:
    """Whether `CPULinear` can run through oneDNN: PyTorch built with it (mkldnn) on an x86-64 CPU with AVX2 or
    AVX-512, where it was measured. Asked at the first forward pass, not at import."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class CPULinear(nn.Linear):
    """`nn.Linear` with faster kernels for float32 and bfloat16 inference on the CPU.

    A decode step multiplies a few rows (one per sequence) by every weight matrix: little arithmetic per weight
    read, a shape that MKL's GEMM, which `F.linear` calls on the CPU, handles poorly. So, without gradients:

    - one row: the product written as W @ x^T, batched over the two halves of W's rows, goes through MKL's batched
      GEMM, which reads the weight at the machine's full memory bandwidth (MKL's one-row path reaches a third of it);
    - more rows: oneDNN's matmul (`torch.ops.mkldnn`, the kernels `torch.compile` uses for frozen CPU models) on a
      copy of the weight packed once into its blocked layout;
    - bfloat16 (a model loaded with `--dtype bf16`), any number of rows: oneDNN on the packed copy too. `F.linear`'s
      own bf16 path was slower than float32 here (40 layers of 2048 x 512, one row: 4.8 ms against 3.5 ms; oneDNN
      packed: 1.7 ms);
    - on a CPU with aksis's own kernels (aksis.native), a few rows (`NATIVE_MAX_ROWS`: up to 8 in bf16, 2 in
      float32), eager or compiled: `aksis_cpu::dense_linear`, which streams the weight once for all the rows (for
      the base preset's layers at one row, bf16 0.50-0.68 ms against oneDNN's 0.83-1.08, float32 1.11-1.80 against
      the batched halves' 1.53-1.97).

    The packed copy costs as much memory as the weight (`inference_bytes`). It is made at the first inference pass
    with several rows and made again after the weight changes (in place, as an optimizer or `load_state_dict` does,
    or moved); a forward pass with gradients drops it. Inside `torch.compile` on a CPU (`compile_for_decoding`)
    without aksis's kernels, one row is an elementwise product and a sum, which inductor turns into its own
    vectorised pass over the weight, where it would call MKL's slow one-row path for `F.linear`. Results equal
    `F.linear`'s up to float rounding (tests/test_kernels.py). Elsewhere (training, a GPU, other dtypes, more rows
    inside `torch.compile`, no MKL or oneDNN) it is plain `F.linear`.
    """

    _packed: tuple[int, int, torch.Tensor] | None = None  # (weight's data_ptr, its version, packed weight)

    @classmethod
    def sharing(cls, linear: nn.Linear) -> CPULinear:
        """A CPULinear over `linear`'s own parameters (no copy)."""
        fast = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fast.weight, fast.bias = linear.weight, linear.bias
        return fast

    def _native(self, x: torch.Tensor, weight: torch.Tensor | None) -> bool:
        """Whether x goes through aksis's dense kernel: a few float32 or bf16 rows on a CPU that has it, without
        gradients."""
        rows = NATIVE_MAX_ROWS.get(x.dtype)
        return (
            rows is not None
            and x.numel() <= rows * self.in_features
            and x.device.type == "cpu"
            and weight is not None
            and weight.dtype == x.dtype
            and not torch.is_grad_enabled()
            and (native.available() if native.loaded is None else native.loaded)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The parameters read from `_parameters`, and the op called by its overload: as a quantized layer does (see
        # aksis.quantize, _direct), the attribute lookups cost more than the op's call.
        p = self._parameters
        if self._native(x, p["weight"]):  # eager or compiled: one op, which streams the weight once
            return torch.ops.aksis_cpu.dense_linear.default(x, p["weight"], p["bias"])
        if torch.compiler.is_compiling():  # here: the checks below would break the compiled graph
            if x.numel() == self.in_features and x.device.type == "cpu":  # one row (a decode step at batch 1)
                # An elementwise product and a sum over inputs, which inductor compiles into one vectorised pass
                # over the weight: for the base preset's decode step, 2.8 ms in fp32 against 6.7 through F.linear.
                y = (self.weight * x.reshape(1, self.in_features)).sum(-1).view(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            if self._packed is not None:  # training: the weight will change, so the copy only holds memory
                self._packed = None
            return F.linear(x, self.weight, self.bias)
        if x.device.type != "cpu" or x.dtype not in PACKED_DTYPES or self.weight.dtype != x.dtype:
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16:  # every row count: F.linear's bf16 path is slower than fp32's
            if onednn_available() and not self.weight.is_inference():
                return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        if rows == 1 and self.out_features % 2 == 0 and torch.backends.mkl.is_available():
            w = self.weight.view(2, self.out_features // 2, self.in_features)  # (2, out/2, in): halves of the rows
            # x as a column (in, 1) with strides (1, in), which MKL takes as it is; an (in, 1) made by reshape has
            # strides (1, 1), which sends bmm down a path 3.5x slower.
            xt = x.reshape(1, self.in_features).t().expand(2, -1, -1)  # (2, in, 1), a view
            y = torch.bmm(w, xt)  # (2, out/2, 1)
            y = y.view(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y += self.bias
            return y
        # A weight made under inference_mode has no version counter to tell of changes: it is never packed.
        if onednn_available() and not self.weight.is_inference():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's layout (an opaque mkldnn tensor), packed again if the weight changed since."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[:2] != key:
            # The layout is chosen for a batch of 8 rows; it served 1 to 1024 rows as well as one chosen for each.
            self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8))
        return self._packed[2]

    def __getstate__(self) -> dict[str, object]:
        # An mkldnn tensor has no storage to copy: copies and pickles of the module leave the packed weight behind.
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap every plain `nn.Linear` of `model` for a `CPULinear` over the same parameters, in place; returns the
    model. Harmless off the CPU or in training (it is then `F.linear`), but meant for a model that runs on a CPU."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, CPULinear.sharing(child))
    return model


def inference_bytes(model: nn.Module) -> int:
    """Memory the weights of `model` take for inference: its parameters (a tied weight once), plus the copies
    `CPULinear` packs of float32 and bf16 weights on a CPU with oneDNN and the quantized layers pack for their
    kernels (made at the first pass that uses them)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields a shared tensor once
    for m in model.modules():
        if isinstance(m, CPULinear) and onednn_available():
            n += m.weight.nbytes if m.weight.device.type == "cpu" and m.weight.dtype in PACKED_DTYPES else 0
        elif callable(packed_bytes := getattr(m, "packed_bytes", None)):  # aksis.quantize's layers
            n += packed_bytes() if m.weight.device.type == "cpu" else 0
    return n
