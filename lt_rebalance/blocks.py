"""Row blocks: large feature matrices are processed a block of rows at a time.

Features stay in their stored dtype in memory (float16 for most files: half the bytes of float32)
and each kernel upcasts one block of rows to float32 where it needs float32 (GEMMs, norms, losses).
Upcasting float16 to float32 is exact, so a block-wise result equals the one computed from a
float32 copy of the whole matrix; only the memory differs (one block instead of N rows).
"""
from __future__ import annotations

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


def chunked_matmul(X: torch.Tensor, W: torch.Tensor, fn: Callable[[torch.Tensor, slice], None],
                   chunk: int = BLOCK_ROWS, logits: Optional[torch.Tensor] = None) -> None:
    """Call ``fn(X[s] @ W.T, s)`` for row chunks ``s`` of X (upcast per chunk), bounding memory at chunk × C.

    ``logits``: X Wᵀ (N, C) already computed (e.g. kept by ``compare``); its row chunks are passed
    instead and X is not multiplied (``fn`` must then leave its block unchanged)."""
    if logits is not None:
        if logits.shape != (X.shape[0], W.shape[0]):
            raise ValueError(f"logits must be X Wᵀ, shape ({X.shape[0]}, {W.shape[0]}); got {tuple(logits.shape)}")
        for s in row_blocks(logits.shape[0], chunk):
            fn(logits[s], s)
        return
    buffer = upcast_buffer(X, chunk)
    for s in row_blocks(X.shape[0], chunk):
        fn(float32_rows(X, s, buffer) @ W.T, s)


def linear_logits(X: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor] = None, *,
                  dtype: torch.dtype = torch.float32, chunk: int = BLOCK_ROWS) -> torch.Tensor:
    """X Wᵀ + b as a (N, C) tensor of ``dtype`` (float32, or float16/bfloat16 for a compact cache).

    X (N, D) of any float dtype (on any device: each chunk moves to W's) is upcast per chunk; each
    chunk's logits are computed in float32 and then stored (rounded once when ``dtype`` is
    narrower). The product is taken class-major,
    (W xᵀ + b)ᵀ, and transposed into ``out`` by the copy that stores it: PyTorch's CPU GEMM runs
    that layout faster for head shapes (benchmarks/ measures it, the copy included).
    """
    out = torch.empty(X.shape[0], W.shape[0], dtype=dtype, device=W.device)
    buffer = upcast_buffer(X, chunk)
    for s in row_blocks(X.shape[0], chunk):
        x = float32_rows(X, s, buffer).to(W.device, non_blocking=True)
        out[s] = (torch.mm(W, x.T) if b is None else torch.addmm(b[:, None], W, x.T)).T
    return out


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
