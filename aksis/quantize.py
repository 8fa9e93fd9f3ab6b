"""Low-precision inference: bf16 compute and int8 / int4 weights, put in place when a model is loaded to run.

`aksis.model` builds its projections from plain `nn.Linear`. `quantize(model, "int8" | "int4")` swaps each of them
for a layer that keeps its weight in 8 or 4 bits, the way gpt-fast's quantize.py does at load time; the embeddings,
norms and biases stay in the model's compute dtype (fp32, or bf16 with `--dtype bf16`), and so does the KV cache.
`aksis.checkpoint.load_model(..., quantize=...)` calls it, and a quantized model saves as a checkpoint folder of its
own that loads without quantizing again (`checkpoint.save_checkpoint`; config.json says `"quantization"`).

The schemes, and the kernels they run on, were chosen by measurement on a 2-core AVX-512 CPU (README, Performance):

- **int8**: symmetric int8 weights, one scale per output row; activations quantized per call to 8 bits (dynamic
  quantization) and multiplied in integers.
- **int4**: asymmetric 4-bit weights in groups of `INT4_GROUP_SIZE` inputs, a bf16 scale and zero per group. The
  output layer (`lm_head`), whose errors every token's distribution feels, stays at int8, as llama.cpp's q4_0 keeps
  it at 6 or 8 bits.
- **bf16**: the model in bfloat16, its linear layers through oneDNN on a packed copy of the weight (`kernels.py`).

Kernels, in order of preference:

1. **aksis's own** (`aksis.native`: C++ with AVX-512 VNNI, built at the first use on a CPU that has it). They read
   the stored tensors as they are, with no packed copy, quantize the input to 8 bits (per row for int8, per group of
   32 for int4, as llama.cpp does for q8_0 and q4_0) and multiply in integers. For 40 layers of 2048 x 512 and one
   row: int8 0.64-0.80 ms, int4 0.46-0.60 ms, against FBGEMM's 1.07-1.13 and ATen's int4 1.16-1.25.
2. **PyTorch's**, where aksis's cannot be built or the CPU lacks VNNI. int8 through FBGEMM: on a CPU with VNNI its
   fused call (`aten.fbgemm_linear_int8_weight`: the input quantized and multiplied in one pass, the row scales
   applied after), elsewhere `quantized::linear_dynamic` (the kernel behind `torch.ao`'s dynamic quantization) with
   activations in 7 bits, because without VNNI the CPU sums pairs of 8-bit products in 16 bits, which 8 bits can
   overflow. int4 through `aten._weight_int4pack_mm_for_cpu` on bf16 rows (on float32 rows it took 31 ms for the
   40 layers, so rows are converted). The weight-only alternative `aten._weight_int8pack_mm` took 14 ms on float32
   rows (1.5 ms on bf16 ones), `torch._int_mm` 1.8 ms, oneDNN's `qlinear_pointwise` 1.5 ms. torchao's CPU paths call
   these same ATen kernels (or need `torch.compile`), so aksis calls them itself rather than take another
   dependency. PyTorch marks both FBGEMM calls deprecated.
3. Off the CPU (a GPU), or on a CPU without either: the layer dequantizes its weight to the compute dtype for each
   call: the same numbers, correct everywhere, but fast only on the CPU.

The stored form is portable (a plain int8 matrix; int4 as two 4-bit values a byte, low nibble first). PyTorch's
kernels take packed copies, made at the first call, as `kernels.CPULinear` does, and counted by
`kernels.inference_bytes`. A compiled step (`generation.compile_for_decoding`) calls aksis's ops like any other;
with PyTorch's kernels it takes copies packed before compiling (`pack_all`): the int4 kernel is an ATen op a graph
holds as it is, and FBGEMM, whose packed weight is an opaque object no graph takes, is called through the
`aksis::int8_linear` op by the layer's handle.
"""

from __future__ import annotations

import abc
import itertools
import platform
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from aksis import native
from aksis.kernels import CPULinear

SCHEMES = ("none", "int8", "int4")  # --quantize
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype: the compute dtype
INT4_GROUP_SIZE = 32  # inputs sharing one scale and zero (the CPU kernel takes 32, 64, 128 or 256)
INT4_KEEP_INT8 = ("lm_head",)  # layers that stay at int8 under the int4 scheme


class QuantizationError(ValueError):
    """A precision that is not known, or a layer the scheme cannot hold (say which, and what to use instead)."""


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (fp32, bf16)."""
    if name not in DTYPES:
        raise QuantizationError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}: use one of {', '.join(SCHEMES)}")
    return scheme


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _vnni() -> bool:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # older PyTorch lacks it: no VNNI known
    return bool(capabilities and capabilities().get("avx512_vnni", False))


# Known once, at import: plain constants, which a compiled step reads without tracing a cached function.
_FBGEMM = _x86() and "fbgemm" in torch.backends.quantized.supported_engines
_FUSED_INT8 = _FBGEMM and hasattr(torch, "fbgemm_linear_int8_weight") and _vnni()  # see the module's docstring
_INT4_KERNEL = _x86() and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fbgemm_available() -> bool:
    """Whether int8 layers can run through FBGEMM: an x86-64 CPU and a PyTorch built with it."""
    return _FBGEMM


def int4_kernel_available() -> bool:
    """Whether int4 layers can run through ATen's CPU int4 kernel (x86-64, where it was measured)."""
    return _INT4_KERNEL


def _kernels_loaded() -> bool:
    """Whether aksis's own kernels (aksis.native) are loaded: built at the first ask on a CPU that takes them."""
    return native.available() if native.loaded is None else native.loaded


def _native(t: torch.Tensor) -> bool:
    """Whether a layer whose weight is `t` runs aksis's own kernels: on a CPU that has them."""
    return t.device.type == "cpu" and _kernels_loaded()


# _direct: a layer's forward on aksis's kernels reads its tensors from `_parameters` and calls the op's overload
# (`.default`) directly. Through the module's attributes, `_runs_native` and the op's packet, the same call took
# 60-90 microseconds more a decode step of the base preset (25 layers), 9-11% of an int8 or int4 step.


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _QuantizedLinear(nn.Module, abc.ABC):
    """What the int8 and int4 layers share: the bias in the compute dtype, a packed copy for the CPU kernel (made at
    the first call, made again when one of its parameters changes), and copies and pickles that leave that copy
    behind."""

    in_features: int
    out_features: int
    weight: nn.Parameter
    _packed: tuple[tuple[int, ...], Any] | None = None  # (the parameters' pointers and versions, packed copy)

    def _init_bias(self, bias: bool, out_features: int, device: Any, dtype: torch.dtype | None) -> None:
        self.bias = _frozen(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def _key(self) -> tuple[int, ...]:
        # Every parameter: the stored tensors and the bias. Read from `_parameters` directly, as each decode step does
        # for every layer: through the module's attributes this took 2.6 microseconds, now 0.8. A tensor made under
        # inference_mode has no version counter: it is told apart by its storage alone.
        key: list[int] = []
        for t in self._parameters.values():
            if t is not None:
                key += (t.data_ptr(), 0 if t.is_inference() else t._version)
        return tuple(key)

    def _runs_native(self) -> bool:
        """Whether the layer runs aksis's own kernel (aksis.native), which reads the stored tensors as they are."""
        return _native(self.weight)

    @classmethod
    @abc.abstractmethod
    def from_linear(cls, linear: nn.Linear) -> _QuantizedLinear:
        """The layer quantized from `linear`'s weight (and its bias, kept as it is)."""

    def packed(self) -> Any:
        if torch.compiler.is_compiling() and self._packed is not None:
            return self._packed[1]  # a compiled step takes the copy `pack_all` made, as it is
        key = self._key()
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, self._pack())
        return self._packed[1]

    @abc.abstractmethod
    def _pack(self) -> Any:
        """The kernel's packed copy of the stored tensors."""

    def packed_bytes(self) -> int:
        """Memory of the kernel's packed copy (once made; an estimate of it before)."""
        return 0

    @abc.abstractmethod
    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype`: what the layer multiplies by."""

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The product by the dequantized weight in x's dtype: the path off the CPU kernels; the tests' reference."""
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_handle")}


class Int8Linear(_QuantizedLinear):
    """A linear layer with int8 weights: W ≈ scale[:, None] * weight, one float32 scale per output row (symmetric,
    so zero stays exactly zero). On an x86 CPU the input is quantized per call (one scale for the whole call, so rows
    of a batch share it) and FBGEMM multiplies in integers."""

    scheme = "int8"
    _handle: int | None = None  # its number among the layers compiled steps call (pack_all)

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(out_features, in_features, device=device, dtype=torch.int8))
        self.scale = _frozen(torch.empty(out_features, device=device, dtype=torch.float32))
        self._init_bias(bias, out_features, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, linear.weight.dtype)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # a zero row stays zero
        with torch.no_grad():
            layer.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127))
            layer.scale.copy_(scale)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def _pack(self) -> Any:
        bias = None if self.bias is None else self.bias.float()
        with warnings.catch_warnings():  # PyTorch deprecates both FBGEMM paths (module docstring)
            warnings.simplefilter("ignore", UserWarning)
            if _FUSED_INT8:
                # The fused call takes one weight scale: it multiplies by the integers (scale 1, zero point 0, no
                # bias), and `_fbgemm` applies the row scales and the bias. col_offsets: each row's sum, which
                # corrects for the input's zero point.
                zeros = torch.zeros(self.out_features)
                packed = (torch.fbgemm_pack_quantized_matrix(self.weight), self.weight.sum(1, dtype=torch.int32))
                torch.fbgemm_linear_int8_weight(
                    zeros.new_zeros(1, self.in_features), self.weight, *packed, 1.0, 0, zeros
                )
                # That call spent PyTorch's one deprecation warning, here, silenced. The weight (whose shape the call
                # checks) and the scales come along, so that a decode step reads no module attribute.
                return (*packed, zeros, bias, self.weight, self.scale)
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            q = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(q, bias)

    def _fbgemm(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        """x (float32) times the weight, plus the bias, through FBGEMM with the packed copy `packed`."""
        if not _FUSED_INT8:
            # reduce_range=True: activations in 7 bits, so the 16-bit pairwise sums of CPUs without VNNI cannot
            # saturate (torch.ao's default on x86 too).
            return torch.ops.quantized.linear_dynamic(x, packed, True)
        matrix, col_offsets, zeros, bias, weight, scale = packed
        y = torch.fbgemm_linear_int8_weight(x, weight, matrix, col_offsets, 1.0, 0, zeros)
        return y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale)

    def packed_bytes(self) -> int:
        if self._runs_native() or not fbgemm_available():
            return 0
        return self.weight.nbytes + (12 * self.out_features if _FUSED_INT8 else 0)  # + row sums, zeros and bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _kernels_loaded():  # the stored tensors as they are, in a compiled graph too
            p = self._parameters  # see _direct
            return torch.ops.aksis_cpu.int8_linear.default(x, p["weight"], p["scale"], p.get("bias"))
        if x.device.type != "cpu":
            return self.reference(x)
        if not fbgemm_available():
            return self.reference(x)
        if torch.compiler.is_compiling():
            # FBGEMM's packed weight is an opaque object a compiled graph cannot take: the graph calls the layer by
            # its handle instead (an aksis::int8_linear op, which `pack_all` registered), as an opaque call.
            if self._handle is None:
                return self.reference(x)
            return torch.ops.aksis.int8_linear(x, self._handle, self.out_features)
        return self._fbgemm(x.float(), self.packed()).to(x.dtype)


class Int4Linear(_QuantizedLinear):
    """A linear layer with 4-bit weights in groups of `group_size` inputs: W ≈ (q - 8) * scale + zero, q in 0..15,
    with a bf16 scale and zero per group (asymmetric: each group's range is used whole). `weight` holds two values a
    byte (uint8, (out_features, in_features / 2), the even input in the low nibble); `scale` and `zero` are
    (out_features, in_features / group_size)."""

    scheme = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        group_size: int = INT4_GROUP_SIZE,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise QuantizationError(
                f"int4 packs groups of {group_size} inputs, and a layer here has {in_features}: use --quantize int8"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.weight = _frozen(torch.empty(out_features, in_features // 2, device=device, dtype=torch.uint8))
        self.scale = _frozen(torch.empty(out_features, groups, device=device, dtype=torch.bfloat16))
        self.zero = _frozen(torch.empty(out_features, groups, device=device, dtype=torch.bfloat16))
        self._init_bias(bias, out_features, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        w = linear.weight.detach().float()
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, w.device, linear.weight.dtype, group_size
        )
        wg = w.view(linear.out_features, -1, group_size)  # (out, groups, group_size)
        low, high = wg.amin(dim=-1), wg.amax(dim=-1)
        # Scale and zero are rounded to bf16 first and the codes chosen against the rounded values, so the stored
        # numbers are the ones the codes were fitted to.
        scale = ((high - low) / 15).clamp(min=1e-12).bfloat16()
        zero = (low + 8 * scale.float()).bfloat16()
        q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15).to(torch.uint8)
        q = q.view(linear.out_features, -1)
        with torch.no_grad():
            layer.weight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
            layer.scale.copy_(scale)
            layer.zero.copy_(zero)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        """The 4-bit values, one a byte: (out_features, in_features), 0..15."""
        w = self.weight
        return torch.stack([w & 15, w >> 4], dim=-1).view(self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.codes().float().view(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def _padded_rows(self) -> int:
        return -self.out_features % 16  # the kernel packs output rows in sixteens

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pad = self._padded_rows()
        codes = F.pad(self.codes().to(torch.int32), (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_zeros = torch.stack([self.scale, self.zero], dim=-1)  # (out, groups, 2)
        scales_zeros = F.pad(scales_zeros, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()  # (groups, out+pad, 2)
        return packed, scales_zeros, self.bias  # the bias along, so that a decode step reads no module attribute

    def _runs_native(self) -> bool:
        return self.group_size == native.INT4_GROUP_SIZE and _native(self.weight)

    def packed_bytes(self) -> int:
        if self._runs_native() or not int4_kernel_available():
            return 0
        rows = self.out_features + self._padded_rows()
        return rows * self.in_features // 2 + rows * (self.in_features // self.group_size) * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.group_size == native.INT4_GROUP_SIZE and _kernels_loaded():
            p = self._parameters  # see _direct
            return torch.ops.aksis_cpu.int4_linear.default(x, p["weight"], p["scale"], p["zero"], p.get("bias"))
        if x.device.type != "cpu":
            return self.reference(x)
        if not int4_kernel_available():
            return self.reference(x)
        if torch.compiler.is_compiling() and self._packed is None:  # not packed before compiling: no kernel
            return self.reference(x)
        packed, scales_zeros, bias = self.packed()
        rows = x.reshape(-1, self.in_features).bfloat16()  # the kernel is vectorised for bf16 rows only
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scales_zeros)
        if y.shape[-1] != self.out_features:  # rows padded to a multiple of 16
            y = y[:, : self.out_features]
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias.to(x.dtype)


QUANTIZED_LAYERS: dict[str, type[_QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def _layer_scheme(scheme: str, name: str) -> str:
    return "int8" if scheme == "int4" and name in INT4_KEEP_INT8 else scheme


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, full name, layer) of every linear layer of `model` (plain or CPULinear)."""
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) in (nn.Linear, CPULinear):
                found.append((parent, name, f"{parent_name}.{name}".lstrip("."), child))
    return found


def check_quantizable(model: nn.Module, scheme: str) -> None:
    """QuantizationError, before anything changes, unless every linear layer of `model` can be held by `scheme`."""
    if check_scheme(scheme) != "int4":
        return
    for _, _, full, layer in _linears(model):
        if _layer_scheme(scheme, full) == "int4" and layer.in_features % INT4_GROUP_SIZE:
            raise QuantizationError(
                f"int4 packs groups of {INT4_GROUP_SIZE} inputs, and {full} has {layer.in_features} (the model's "
                "width must be a multiple of it): use --quantize int8 for this model"
            )


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every linear layer of `model` by its `scheme` counterpart, in place, one layer at a time (so the
    full-precision weights are freed as it goes); returns the model. A tied output layer (lm_head sharing the
    embedding's weight) gets a quantized copy and the embedding keeps its own. Run it on a model to infer with, not
    to train."""
    check_quantizable(model, scheme)
    if scheme == "none":
        return model
    with torch.no_grad():
        for parent, name, full, layer in _linears(model):
            setattr(parent, name, QUANTIZED_LAYERS[_layer_scheme(scheme, full)].from_linear(layer))
    model.quantization = scheme  # type: ignore[assignment]
    return model


def quantized_shell(model: nn.Module, scheme: str) -> nn.Module:
    """Swap `model`'s linear layers for empty `scheme` layers of the same shapes (no quantizing): the form a
    quantized checkpoint is read into. Meant for a model on the meta device."""
    check_quantizable(model, scheme)
    if scheme == "none":
        return model
    for parent, name, full, layer in _linears(model):
        cls = QUANTIZED_LAYERS[_layer_scheme(scheme, full)]
        w, bias = layer.weight, layer.bias is not None
        setattr(parent, name, cls(layer.in_features, layer.out_features, bias, w.device, w.dtype))
    model.quantization = scheme  # type: ignore[assignment]
    return model


# The int8 layers a compiled step calls, by handle: weakly, so a model that is dropped frees its layers.
_COMPILED_INT8: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()
_handles = itertools.count()


# The op is defined with `torch.library.Library` rather than the `custom_op` decorator: a call then goes from the
# dispatcher straight to the function, where the decorator's wrappers cost 3-4 microseconds a call (measured),
# which a decode step pays for every int8 layer.
_OPS = torch.library.Library("aksis", "DEF")
_OPS.define("int8_linear(Tensor x, int handle, int out_features) -> Tensor")


def _int8_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The int8 layer `handle` applied to x, through FBGEMM: one opaque call in a compiled graph."""
    layer = _COMPILED_INT8[handle]
    assert layer._packed is not None  # packed by `pack_all`, and used as it is, as a compiled step does
    return layer._fbgemm(x.float(), layer._packed[1]).to(x.dtype)


_OPS.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("aksis::int8_linear")
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def pack_all(model: nn.Module) -> nn.Module:
    """Make every quantized layer's packed copy now, as compiling wants: a compiled step uses the copies as they are
    (it does not check for weights changed since). Returns the model."""
    with torch.inference_mode():
        for m in model.modules():
            if not isinstance(m, _QuantizedLinear) or m.weight.device.type != "cpu" or m._runs_native():
                continue  # aksis's own kernels read the stored tensors: nothing to pack
            if isinstance(m, Int4Linear) and int4_kernel_available():
                m.packed()
            elif isinstance(m, Int8Linear) and fbgemm_available():
                m.packed()
                if m._handle is None:
                    m._handle = next(_handles)
                    _COMPILED_INT8[m._handle] = m
    return model


def quantization_of(model: nn.Module) -> str:
    """The scheme a model's weights are held in: "none", "int8" or "int4"."""
    return str(getattr(model, "quantization", "none"))
