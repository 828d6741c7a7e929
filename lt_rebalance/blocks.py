"""Row blocks: large feature matrices are processed a block of rows at a time.

Features stay in their stored dtype in memory (float16 for most files: half the bytes of float32)
and each kernel upcasts one block of rows to float32 where it needs float32 (GEMMs, norms, losses).
Upcasting float16 to float32 is exact, so a block-wise result equals the one computed from a
float32 copy of the whole matrix; only the memory differs (one block instead of N rows).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from .memory import available_memory  # noqa: F401 (re-exported: heads and sessions plan with it)

BLOCK_ROWS = 8192  # rows per GEMM block: large enough for full GEMM speed, small enough to bound memory
CACHE_ROWS = 1024  # rows per element-wise block that should stay in cache
SCORE_ROWS = 1024  # rows scored at a time when only per-row results are kept (predict, metrics)


def row_blocks(n: int, size: int = BLOCK_ROWS) -> Iterator[slice]:
    """Consecutive slices of ``size`` rows covering ``range(n)``."""
    return (slice(s, min(s + size, n)) for s in range(0, n, size))


def upcast_buffer(X: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """A reusable float32 buffer for blocks of ``rows`` rows of X, or None when X is float32 already.

    Upcasting into one buffer instead of a fresh tensor per block avoids the page faults of a new
    large allocation each time (they cost more than the conversion itself).
    """
    return None if X.dtype == torch.float32 else X.new_empty(min(rows, max(len(X), 1)), X.shape[1],
                                                             dtype=torch.float32)


def float32_rows(X: torch.Tensor, rows: slice, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``X[rows]`` as float32: a view when X is float32, else the block upcast into ``buffer``
    (from :func:`upcast_buffer`; a fresh tensor when None). Exact: float16 -> float32 loses nothing."""
    if X.dtype == torch.float32:
        return X[rows]
    if buffer is None:
        return X[rows].to(torch.float32)
    return buffer[: rows.stop - rows.start].copy_(X[rows])


def low_precision(precision: str) -> Optional[torch.dtype]:
    """The operand dtype of a product in ``precision``: bfloat16 for "bfloat16", None for float32 ("float32",
    "tf32", and the probe's "float64" whose scores are float32)."""
    return torch.bfloat16 if precision == "bfloat16" else None


@contextlib.contextmanager
def tf32_products(enabled: bool = True) -> Iterator[None]:
    """CUDA float32 products on TF32 tensor cores while inside (when ``enabled``); the setting is restored."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def low_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bfloat16 operands as float32. CUDA GEMMs write the float32 accumulator itself
    (``out_dtype``, where this torch has it); the CPU's ``mm`` has no such output, so there the
    bfloat16 result is upcast (one bfloat16 rounding of each product: docs/METHODS.md, "Precision")."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(a, b).float()


def mm(a: torch.Tensor, b: torch.Tensor, precision: str = "float32", out: Optional[torch.Tensor] = None
       ) -> torch.Tensor:
    """a @ b as float32 in ``precision`` (:mod:`lt_rebalance.precision`): float32 operands multiplied as
    they are ("float32"; "tf32": on TF32 tensor cores of a CUDA GPU), or both rounded to bfloat16
    ("bfloat16": the GEMM accumulates in float32, its result is rounded to bfloat16 and upcast).
    ``out``: a float32 tensor to write into (returned)."""
    low = low_precision(precision)
    if low is None:
        with tf32_products(precision == "tf32" and a.is_cuda):
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    r = low_mm(a.to(low), b.to(low))
    return r if out is None else out.copy_(r)


def lowered_rows(X: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """``X[rows]`` converted to ``dtype`` (a narrow product dtype): one block at a time, no float32 copy."""
    return X[rows].to(dtype)


def chunked_matmul(X: torch.Tensor, W: torch.Tensor, fn: Callable[[torch.Tensor, slice], None],
                   chunk: int = BLOCK_ROWS, logits: Optional[torch.Tensor] = None, precision: str = "float32"
                   ) -> None:
    """Call ``fn(X[s] @ W.T, s)`` for row chunks ``s`` of X (upcast per chunk), bounding memory at chunk × C.

    ``logits``: X Wᵀ (N, C) already computed (e.g. kept by ``compare``); its row chunks are passed
    instead and X is not multiplied (``fn`` must then leave its block unchanged). ``precision``: of
    the products (:func:`mm`); each chunk is converted on its own (bfloat16: W once, rows per chunk),
    and ``fn`` always receives float32."""
    if logits is not None:
        if logits.shape != (X.shape[0], W.shape[0]):
            raise ValueError(f"logits must be X Wᵀ, shape ({X.shape[0]}, {W.shape[0]}); got {tuple(logits.shape)}")
        for s in row_blocks(logits.shape[0], chunk):
            fn(logits[s], s)
        return
    low = low_precision(precision)
    if low is not None:
        Wt = W.to(low).T
        for s in row_blocks(X.shape[0], chunk):
            fn(low_mm(lowered_rows(X, s, low), Wt), s)
        return
    buffer = upcast_buffer(X, chunk)
    with tf32_products(precision == "tf32" and W.is_cuda):
        for s in row_blocks(X.shape[0], chunk):
            fn(float32_rows(X, s, buffer) @ W.T, s)


def linear_logits(X: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor] = None, *,
                  dtype: torch.dtype = torch.float32, chunk: int = BLOCK_ROWS, precision: str = "float32"
                  ) -> torch.Tensor:
    """X Wᵀ + b as a (N, C) tensor of ``dtype`` (float32, or float16/bfloat16 for a compact cache).

    X (N, D) of any float dtype (on any device: each chunk moves to W's) is upcast per chunk; each
    chunk's logits are computed in float32 and then stored (rounded once when ``dtype`` is
    narrower). The product is taken class-major,
    (W xᵀ + b)ᵀ, and transposed into ``out`` by the copy that stores it: PyTorch's CPU GEMM runs
    that layout faster for head shapes (benchmarks/ measures it, the copy included).

    ``precision`` "bfloat16": W is rounded to bfloat16 once and each chunk of X on its own (no
    full-size bfloat16 copy of X); the product (float32 accumulation, bfloat16 result) is upcast
    and the bias added in float32. "tf32": float32 products on a CUDA GPU's TF32 tensor cores.
    """
    out = torch.empty(X.shape[0], W.shape[0], dtype=dtype, device=W.device)
    low = low_precision(precision)
    if low is not None:
        Wl = W.to(low)
        for s in row_blocks(X.shape[0], chunk):
            z = low_mm(Wl, lowered_rows(X, s, low).to(W.device, non_blocking=True).T).T
            out[s] = z if b is None else z.add_(b)
        return out
    buffer = upcast_buffer(X, chunk)
    with tf32_products(precision == "tf32" and W.is_cuda):
        for s in row_blocks(X.shape[0], chunk):
            x = float32_rows(X, s, buffer).to(W.device, non_blocking=True)
            out[s] = (torch.mm(W, x.T) if b is None else torch.addmm(b[:, None], W, x.T)).T
    return out


def class_sums(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor, one_hot: Optional[bool] = None
               ) -> torch.Tensor:
    """``out[index[i]] += values[i]`` for rows i of ``values`` (n, D) into ``out`` (C, D), in place; returns out.

    Deterministic on every device: on the CPU ``index_add_`` (serial, in row order); on CUDA, whose
    ``index_add_`` adds with float atomics in a varying order, a one-hot product
    ``one_hot(index)ᵀ values`` (one GEMM). ``one_hot``: force the form (None: by device).
    """
    if one_hot is None:
        one_hot = values.is_cuda
    if not one_hot:
        return out.index_add_(0, index, values)
    hot = torch.zeros(out.shape[0], len(index), dtype=values.dtype, device=values.device)
    hot[index, torch.arange(len(index), device=values.device)] = 1
    return out.addmm_(hot, values)


def column_affine(z: torch.Tensor, a: Optional[torch.Tensor], c: Optional[torch.Tensor]) -> torch.Tensor:
    """z ⊙ a + c for z (n, C) and per-class a, c (C,) (None: 1 and 0); a new tensor."""
    if a is None:
        return z.clone() if c is None else z + c
    return z * a if c is None else torch.addcmul(c, z, a)


def all_finite(X: torch.Tensor) -> bool:
    """True when X has no NaN/Inf: one min/max reduction (NaN propagates), no boolean copy of X."""
    if X.numel() == 0:
        return True
    lo, hi = torch.aminmax(X)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def device_memory(device: Optional[torch.device | str] = None) -> Optional[int]:
    """Bytes free for tensors on ``device``: a CUDA device's free memory (``torch.cuda.mem_get_info``),
    else the host's :func:`available_memory`; None when unknown."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return available_memory()
