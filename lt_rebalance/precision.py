"""The arithmetic of the matrix products: ``float32``, ``bfloat16``, ``tf32`` or ``auto`` (docs/METHODS.md,
"Precision").

* ``float32`` (the default): every product in float32, today's numbers bit for bit.
* ``bfloat16``: the operands of each product are rounded to bfloat16, one block of rows at a time
  (:func:`lt_rebalance.blocks.mm`); the product accumulates in float32 inside the GEMM and is
  stored in bfloat16 (PyTorch's CPU ``mm`` has no float32 output for bfloat16 operands), then
  upcast. Master weights, optimiser state, softmax, losses, metrics and selection stay float32.
* ``tf32``: float32 storage with TensorFloat-32 tensor-core products on CUDA GPUs of compute
  capability >= 8.0 (``torch.backends.cuda.matmul.allow_tf32`` while the product runs); float32
  elsewhere. Used only when asked for.
* ``auto``: ``bfloat16`` on hardware with bfloat16 matrix units (CPU: the ``avx512_bf16`` or
  ``amx_bf16`` flag and oneDNN's bfloat16 support; CUDA: compute capability >= 8.0) for the
  methods whose bfloat16 results meet the accuracy contract (the registry's ``auto_bfloat16``),
  float32 otherwise.

Forcing ``bfloat16`` on hardware without bfloat16 units runs (emulated, slower than float32) with
one warning (:func:`hardware_note`).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

PRECISIONS = ("float32", "bfloat16", "tf32", "auto")
RESOLVED = ("float32", "bfloat16", "tf32")

class PrecisionWarning(UserWarning):
    """bfloat16 asked for on hardware without bfloat16 matrix units (it runs, emulated and slow)."""


def parse_precision(name: str) -> str:
    """``name`` checked: one of :data:`PRECISIONS` (case-insensitive); ValueError listing them otherwise."""
    text = str(name).strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return text


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> frozenset[str]:
    """The CPU feature flags of ``cpuinfo`` (the text of /proc/cpuinfo; None: read it), lower case."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.lower().split())
    return frozenset()


def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_bf16_units(cpuinfo: Optional[str] = None, mkldnn_bf16: Optional[bool] = None) -> bool:
    """Whether the CPU multiplies bfloat16 natively: an ``avx512_bf16`` or ``amx_bf16`` flag, and
    oneDNN's bfloat16 kernels available (``mkldnn_bf16``: None asks torch). torch's own
    ``get_cpu_capability()`` reports only the vector width ("AVX512"), not these units."""
    flags = cpu_flags(cpuinfo)
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    return _mkldnn_bf16() if mkldnn_bf16 is None else bool(mkldnn_bf16)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


def has_bf16_units(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` has bfloat16 matrix units (CUDA: compute capability >= 8.0)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return cuda_capability(dev) >= (8, 0)
    return _cpu_bf16_cached()


@functools.cache
def _cpu_bf16_cached() -> bool:
    return cpu_has_bf16_units()


def resolve_precision(name: str, device: str | torch.device = "cpu", method: Optional[str] = None) -> str:
    """The precision a product runs in: "float32", "bfloat16" or "tf32".

    ``auto``: "bfloat16" when ``device`` has bfloat16 units and ``method`` (a registry name; None:
    any) may run in bfloat16 (:attr:`lt_rebalance.registry.Method.auto_bfloat16`), else "float32". ``tf32`` stays "tf32" only on a CUDA
    device of compute capability >= 8.0 (float32 elsewhere: no TF32 units). Explicit float32 and
    bfloat16 are returned as given.
    """
    text = parse_precision(name)
    dev = torch.device(device)
    if text == "auto":
        return "bfloat16" if has_bf16_units(dev) and _auto_bfloat16(method) else "float32"
    if text == "tf32":
        return "tf32" if dev.type == "cuda" and cuda_capability(dev) >= (8, 0) else "float32"
    return text


def _auto_bfloat16(method: Optional[str]) -> bool:
    """Whether ``auto`` may run ``method`` in bfloat16 (None, or a name outside the registry: yes)."""
    from .registry import BY_NAME

    return method not in BY_NAME or BY_NAME[method].auto_bfloat16


def hardware_note(name: str, device: str | torch.device = "cpu") -> Optional[str]:
    """One line saying that ``name`` asks for bfloat16 on ``device`` without bfloat16 matrix units
    (it runs emulated, slower than float32); None when there is nothing to say."""
    if parse_precision(name) != "bfloat16" or has_bf16_units(device):
        return None
    where = "this CPU has no bfloat16 matrix units (avx512_bf16/amx_bf16)" if torch.device(device).type != "cuda" \
        else "this GPU has no bfloat16 tensor cores (compute capability < 8.0)"
    return f"--precision bfloat16: {where}; products run emulated, slower than float32 (use float32 or auto)"


def warn_if_emulated(name: str, device: str | torch.device = "cpu") -> None:
    """:func:`hardware_note` as a :class:`PrecisionWarning` (library callers)."""
    note = hardware_note(name, device)
    if note:
        warnings.warn(note, PrecisionWarning, stacklevel=3)


def fit_precision(name: str, device: str | torch.device, method: Optional[str]) -> str:
    """What a head fitted on ``device`` runs in (:func:`resolve_precision`), warning once
    (:class:`PrecisionWarning`) when bfloat16 is forced on hardware without bfloat16 units."""
    if parse_precision(name) == "bfloat16":
        warn_if_emulated(name, device)
    return resolve_precision(name, device, method)
