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
    from .heads import NCM

    if isinstance(head, NCM):  # the one head saved as class means rather than a linear layer
        C, D = head.centroids_.shape
        state.update(variant=head.variant, mean=head.mean_.cpu(), centroids=head.centroids_.cpu())
    else:
        W, b = head.linear_form()
        C, D = W.shape
        state.update(weight=W.cpu(), bias=b.cpu())
    state.update(num_classes=C, dim=D)
    return state


def save_head(path: str | os.PathLike, state: dict, overwrite: bool = False) -> Path:
    """Write ``state`` atomically (temporary file in the same folder, then rename)."""
    from .store import atomic_write

    return atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite)


RESAVE_HINT = "save it again with `ltr crt|lws|ncm --save`"
# tensors of each kind of head: name -> shape in terms of (C, D)
_TENSORS = {"linear": {"weight": ("C", "D"), "bias": ("C",)}, "ncm": {"mean": ("D",), "centroids": ("C", "D")}}


def check_head_state(state: dict, path: str | os.PathLike) -> None:
    """ValueError unless ``state`` is a complete head: its metadata, tensor types, shapes (against its own
    ``num_classes`` and ``dim``) and finite values."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}; {RESAVE_HINT}")

    sizes = {}
    for key, letter in (("num_classes", "C"), ("dim", "D")):
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"{key} is {v!r}, expected a positive integer")
        sizes[letter] = v
    if not isinstance(state.get("method"), str):
        raise bad(f"method is {state.get('method')!r}, expected a name")
    kind = "linear" if "weight" in state else "ncm" if "centroids" in state else None
    if kind is None:
        raise bad("it holds neither a weight matrix (a linear head) nor centroids (an NCM head)")
    for key, dims in _TENSORS[kind].items():
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise bad(f"{key} is {'missing' if t is None else type(t).__name__}, expected a float tensor "
                      f"of shape ({', '.join(dims)})")
        expected = tuple(sizes[d] for d in dims)
        if tuple(t.shape) != expected:
            raise bad(f"{key} has shape {tuple(t.shape)}, but the head says {' x '.join(dims)} = {expected}")
        if not torch.isfinite(t).all():
            raise bad(f"{key} has {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    if kind == "ncm" and not isinstance(state.get("variant"), str):
        raise bad(f"an NCM head needs a variant name, got {state.get('variant')!r}")


def check_head_fits(state: dict, path: str | os.PathLike, store: Any) -> None:
    """ValueError unless the head has the feature file's class count and feature dimension."""
    if (state["num_classes"], state["dim"]) != (store.num_classes, store.dim):
        raise ValueError(
            f"{path} has {state['num_classes']} classes x {state['dim']} dims, but {store.path} has "
            f"{store.num_classes} x {store.dim}; give the head fitted on this feature file"
        )


def load_head(path: str | os.PathLike) -> dict:
    """Read a head saved by :func:`save_head`, checked by :func:`check_head_state`; a clear ValueError
    for anything else."""
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
    check_head_state(state, path)
    return state
