"""Argument checks of the references: the Python mirror of ``csrc/checks/*.h``.

Every check raises ``RuntimeError`` (what ``TORCH_CHECK`` raises) with the message text of the
C++ check it mirrors, so an op refuses the same inputs with the same error on both backends. The
per-family checks live next to their reference (``check_*`` functions in ``random.py``,
``sgmcmc.py``, ``calibration.py``, ``swag.py``); this module holds the pieces they share: the
c10 spellings of dtypes, sizes, devices and floats, the dispatcher's refusals (meta/real mixes:
the fake kernels; sparse tensors: ``csrc/ops/dense_only.cpp``), the device-type check of the
kernel the dispatcher would pick, and the memory-overlap check of the mutating ops
(``csrc/checks/common.h``).

The fake kernels (:mod:`pyfastbayes.ops`) run the same checks with ``fake=True``, which skips
what needs real memory (overlap), so ``torch.compile`` refuses bad inputs with the same text.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._memory import memory_overlaps, overlaps_itself

_SCALAR_TYPE = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}
for _name, _c10 in (("float8_e5m2", "Float8_e5m2"), ("float8_e4m3fn", "Float8_e4m3fn"),
                    ("float8_e5m2fnuz", "Float8_e5m2fnuz"), ("float8_e4m3fnuz", "Float8_e4m3fnuz"),
                    ("float8_e8m0fnu", "Float8_e8m0fnu"), ("float4_e2m1fn_x2", "Float4_e2m1fn_x2"),
                    ("uint16", "UInt16"), ("uint32", "UInt32"), ("uint64", "UInt64")):
    if hasattr(torch, _name):  # the dtypes of this torch build
        _SCALAR_TYPE[getattr(torch, _name)] = _c10
# the floating dtypes every kernel is compiled for (kernel_float_dtype, csrc/checks/common.h)
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# backends in the dispatcher's priority order (lowest first): a call mixing devices runs the
# kernel of the highest one, whose checks then speak
_BACKEND_PRIORITY = ("cpu", "cuda", "hip", "xla", "mps", "ipu", "xpu", "hpu", "ve", "lazy", "mtia",
                     "privateuseone", "meta")


def fail(*parts) -> None:
    """Raise what ``TORCH_CHECK(false, parts...)`` raises: a RuntimeError with the parts joined."""
    raise RuntimeError("".join(str(p) for p in parts))


def check(cond, *parts) -> None:
    """``TORCH_CHECK(cond, parts...)``."""
    if not cond:
        fail(*parts)


def scalar_type(dtype: torch.dtype) -> str:
    """How c10 prints a ScalarType: torch.float32 -> 'Float'."""
    return _SCALAR_TYPE.get(dtype, str(dtype).replace("torch.", ""))


def sizes(t: Tensor | Sequence[int]) -> str:
    """How c10 prints an IntArrayRef: '[3, 4]'."""
    shape = t.shape if isinstance(t, Tensor) else t
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def device_type(t: Tensor | torch.device | str) -> str:
    """How c10 prints a DeviceType: 'CPU', 'CUDA'."""
    dev = t.device if isinstance(t, Tensor) else torch.device(t)
    return dev.type.upper()


def num(x: float) -> str:
    """How a C++ ostream prints a double (precision 6, %g): 0.0 -> '0', 1e-05 -> '1e-05'."""
    return f"{float(x):g}"


def named_tensors(args: dict) -> list[tuple[str, Tensor]]:
    """(label, tensor) of every tensor argument in call order; list elements as 'name[i]'."""
    out = []
    for name, v in args.items():
        if isinstance(v, Tensor):
            out.append((name, v))
        elif isinstance(v, (list, tuple)):
            out += [(f"{name}[{i}]", t) for i, t in enumerate(v) if isinstance(t, Tensor)]
    return out


def check_meta_mix(op: str, **args) -> None:
    """Fake kernels run for meta tensors. A call mixing meta and real tensors would reach the
    fake kernel too and silently do nothing (or return uninitialised tensors): refuse it."""
    named = named_tensors(args)
    meta = [n for n, t in named if t.device.type == "meta"]
    real = [(n, t.device) for n, t in named if t.device.type != "meta"]
    if meta and real:
        fail(f"{op}: {meta[0]} is a meta tensor but {real[0][0]} is on {real[0][1]}; "
             f"all tensors of one call must be on one device")


def check_dense(op: str, **args) -> None:
    """Sparse inputs: the native dispatcher sends them to the dense-only kernel
    (``csrc/ops/dense_only.cpp``), which names the first one."""
    for name, t in named_tensors(args):
        if t.layout != torch.strided:
            fail(f"{op}: {name} is a sparse tensor ({t.layout}); pyfastbayes ops take dense (strided) tensors "
                 f"only: pass dense tensors (.to_dense())")


def dispatch_device_type(*tensors: Tensor | None | Iterable[Tensor]) -> str:
    """The device type whose kernel the dispatcher runs for these arguments (the highest-priority
    backend among them), e.g. 'CUDA' for a call mixing CPU and CUDA tensors."""
    best = -1
    for arg in tensors:
        for t in (arg if isinstance(arg, (list, tuple)) else [arg]):
            if isinstance(t, Tensor):
                typ = t.device.type
                rank = _BACKEND_PRIORITY.index(typ) if typ in _BACKEND_PRIORITY else len(_BACKEND_PRIORITY)
                if rank > best:
                    best, best_type = rank, typ
    return best_type.upper() if best >= 0 else "CPU"


def is_fake(t: Tensor) -> bool:
    """A meta or fake tensor: it has no memory to check for overlap."""
    return t.device.type == "meta" or isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


class OverlapCheck:
    """Mirror of ``OverlapCheck`` (csrc/checks/common.h): every tensor argument of one call is
    added in schema order; a tensor the call writes must not overlap itself (an expanded view)
    nor share a byte with any other argument. ``run()`` raises naming both arguments."""

    def __init__(self, op: str, fake: bool = False):
        self.op, self.fake = op, fake
        self.args: list[tuple[str, Tensor, bool]] = []

    def add(self, t: Tensor | None, label: str, mutated: bool) -> "OverlapCheck":
        if t is None or t.layout != torch.strided:
            return self
        if mutated and t.is_inference() and not torch.is_inference_mode_enabled():
            # the native ops' ADInplaceOrView kernel (csrc/ops/version_bump.cpp) refuses this before any write
            fail(self.op, ": ", label.split("[")[0], " is an inference tensor (made under torch.inference_mode()), "
                 "which may be written in place only inside torch.inference_mode(): call the op there, or pass a "
                 "clone made outside it")
        if mutated:
            check(not overlaps_itself(t), self.op, ": ", label,
                  " has internal overlap (an expanded, stride-0 or as_strided view: several of its elements share memory), "
                  "so it cannot be written in place; pass a tensor with memory of its own (e.g. .clone())")
        if t.numel() and not self.fake and not is_fake(t):
            self.args.append((label, t, mutated))
        return self

    def add_list(self, ts: Sequence[Tensor], name: str, mutated: bool) -> "OverlapCheck":
        for i, t in enumerate(ts):
            self.add(t, f"{name}[{i}]", mutated)
        return self

    def run(self) -> None:
        for i, j in memory_overlaps([t for _, t, _ in self.args]):  # in address order, as the C++ sweep
            (n1, _, m1), (n2, _, m2) = (self.args[k] for k in sorted((i, j)))
            if m1 or m2:
                fail(self.op, ": ", n2, " overlaps ", n1, " (the same memory twice in one call); pass each tensor once")