"""Save and load fitted heads (``ltr crt --save head.pt``) as plain tensors in a torch file.

Layout: ``{"format": "lt-rebalance/head", "format_version": 1, "method": str, "num_classes": C,
"dim": D, "weight": float32 (C, D), "bias": float32 (C,), "params": dict, "features": str}``;
NCM heads hold ``variant``, ``mean`` (D,) and ``centroids`` (C, D) instead of weight and bias.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

HEAD_FORMAT = "lt-rebalance/head"


def head_state(head: Any, method: str, params: Optional[dict] = None, features: str = "") -> dict:
    """The saved form of a fitted head (any head with ``weight_``, or an NCM)."""
    state: dict[str, Any] = {
        "format": HEAD_FORMAT,
        "format_version": 1,
        "method": method,
        "params": dict(params or {}),
        "features": features,
    }
    if hasattr(head, "centroids_"):
        C, D = head.centroids_.shape
        state.update(variant=head.variant, mean=head.mean_.cpu(), centroids=head.centroids_.cpu())
    else:
        C, D = head.weight_.shape
        bias = getattr(head, "bias_", None)
        state.update(weight=head.weight_.cpu(), bias=(torch.zeros(C) if bias is None else bias.cpu()))
    state.update(num_classes=C, dim=D)
    return state


def save_head(path: str | os.PathLike, state: dict, overwrite: bool = False) -> Path:
    """Write ``state`` atomically (temporary file in the same folder, then rename)."""
    from .store import atomic_write

    return atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite)


def load_head(path: str | os.PathLike) -> dict:
    """Read a head saved by :func:`save_head`; a clear ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such head file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise ValueError(f"{path}: not a head file saved by lt-rebalance ({type(e).__name__}); "
                         "`ltr crt --save` writes one") from None
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}: not a head file saved by lt-rebalance (`ltr crt --save` writes one)")
    return state
