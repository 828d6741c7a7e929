"""scikit-learn style plumbing for heads, without depending on scikit-learn.

``__init__`` only stores its arguments; ``fit`` validates them (``_parameter_constraints``),
learns state in attributes ending with ``_`` and returns ``self``; ``decision_function`` gives
(N, C) scores, ``predict`` their argmax. Inputs may be numpy arrays or torch tensors.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Optional

import numpy as np
import torch


class StrOptions:
    def __init__(self, options: set[str]):
        self.options = options

    def check(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(o) for o in sorted(self.options))


class Interval:
    """A real interval; ``closed`` is 'both', 'left', 'right' or 'neither'."""

    def __init__(self, kind: type, left: Optional[float], right: Optional[float], closed: str = "both"):
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def check(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real):
            return False
        lo_ok = self.left is None or (value >= self.left if self.closed in ("both", "left") else value > self.left)
        hi_ok = self.right is None or (value <= self.right if self.closed in ("both", "right") else value < self.right)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        lb = "[" if self.closed in ("both", "left") else "("
        rb = "]" if self.closed in ("both", "right") else ")"
        lo = "-inf" if self.left is None else self.left
        hi = "inf" if self.right is None else self.right
        return f"{'an int' if self.kind is int else 'a number'} in {lb}{lo}, {hi}{rb}"


class Is:
    """Any value accepted by a predicate (e.g. tensors, None)."""

    def __init__(self, predicate: Callable[[Any], bool], description: str):
        self.predicate, self.description = predicate, description

    def check(self, value: Any) -> bool:
        return self.predicate(value)

    def __str__(self) -> str:
        return self.description


NONE = Is(lambda v: v is None, "None")
ARRAY = Is(lambda v: hasattr(v, "shape"), "an array or tensor")


class NotFittedError(ValueError, AttributeError):
    pass


class BaseHead:
    """get_params / set_params / repr / parameter validation / fitted checks."""

    _parameter_constraints: dict[str, list] = {}

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> BaseHead:
        valid = self._param_names()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}; valid: {valid}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values() if p.name != "self"
        }
        shown = []
        for k, v in self.get_params().items():
            if hasattr(v, "shape"):
                shown.append(f"{k}=<{type(v).__name__} {tuple(v.shape)}>")
            elif defaults.get(k, inspect.Parameter.empty) is inspect.Parameter.empty or v != defaults[k]:
                shown.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def _validate_params(self) -> None:
        for name, constraints in self._parameter_constraints.items():
            value = getattr(self, name)
            if not any(c.check(value) for c in constraints):
                allowed = " or ".join(str(c) for c in constraints)
                raise ValueError(f"{type(self).__name__}: {name} must be {allowed}; got {value!r}")

    # -- prediction -------------------------------------------------------------------------------
    def decision_function(self, X: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, X: Any) -> torch.Tensor:
        """Predicted class (N,) int64: argmax of :meth:`decision_function`."""
        return self.decision_function(X).argmax(dim=1)

    def evaluate(self, X: Any, y: Any, counts: Any, **kwargs: Any) -> dict[str, float]:
        """The metrics of :func:`lt_rebalance.metrics.evaluate` on (X, y)."""
        from ..metrics import evaluate

        return evaluate(self.decision_function(X), y, counts, **kwargs)


def check_is_fitted(head: BaseHead, attribute: str) -> None:
    if not hasattr(head, attribute):
        raise NotFittedError(f"this {type(head).__name__} is not fitted yet; call fit first")


def as_tensor(a: Any, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    return t.to(device=device, dtype=dtype)


def all_finite(X: torch.Tensor) -> bool:
    """True when X has no NaN/Inf: one min/max reduction (NaN propagates), no boolean copy of X."""
    if X.numel() == 0:
        return True
    lo, hi = torch.aminmax(X)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_no_grad(a: Any, name: str) -> None:
    """A tensor that requires grad would drag its autograd graph into the fitted state: refuse it."""
    if isinstance(a, torch.Tensor) and a.requires_grad:
        raise ValueError(f"{name} is a tensor that requires grad; pass {name}.detach()")


def check_weight(weight: Any, device: Any = "cpu", name: str = "weight") -> torch.Tensor:
    """A stage-1 classifier weight as float32 (C, D): one row per class."""
    check_no_grad(weight, name)
    W = as_tensor(weight, torch.float32, device)
    if W.ndim != 2:
        raise ValueError(f"{name} must be 2-D (C, D), one row per class; got shape {tuple(W.shape)}")
    return W


def check_bias(bias: Any, num_classes: int, device: Any = "cpu", name: str = "bias") -> torch.Tensor:
    """A classifier bias as float32 (C,); zeros when ``bias`` is None."""
    if bias is None:
        return torch.zeros(num_classes, device=device)
    check_no_grad(bias, name)
    b = as_tensor(bias, torch.float32, device)
    if b.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), one entry per row of the weight; "
                         f"got {tuple(b.shape)}")
    return b


def check_counts(counts: Any, num_classes: int, name: str = "counts") -> None:
    """Train counts must have one entry per class of the head."""
    shape = tuple(getattr(counts, "shape", (len(counts),)))
    if shape != (num_classes,):
        raise ValueError(f"{name} must have one entry per class ({num_classes}, the rows of the weight); "
                         f"got shape {shape}")


def check_labels(y: Any, device: Any = "cpu", name: str = "y") -> torch.Tensor:
    """Class indices as int64: whole numbers >= 0 (a float label such as 0.5 is never truncated)."""
    check_no_grad(y, name)
    t = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if t.is_floating_point() and t.numel() and not torch.equal(t, t.round()):
        bad = t[t != t.round()][0].item()
        raise ValueError(f"labels {name} must be whole class indices; got {bad}")
    t = t.to(device=device, dtype=torch.int64)
    if t.numel() and t.min() < 0:
        raise ValueError(f"labels {name} must be class indices >= 0; got {int(t.min())}")
    return t


def check_features(
    X: Any,
    y: Any = None,
    *,
    n_features: Optional[int] = None,
    num_classes: Optional[int] = None,
    device: Any = "cpu",
):
    """Validate and convert: X to float32 (N, D), y to int64 (N,); returns X or (X, y)."""
    check_no_grad(X, "X")
    X = as_tensor(X, torch.float32, device)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got shape {tuple(X.shape)}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"features have {X.shape[1]} dimensions, but the head was fitted on {n_features}")
    if not all_finite(X):
        raise ValueError("features contain NaN or Inf values")
    if y is None:
        return X
    y = check_labels(y, device)
    if y.shape != (X.shape[0],):
        raise ValueError(f"labels must have shape ({X.shape[0]},) to match the features; got {tuple(y.shape)}")
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{int(y.min())}, {int(y.max())}]")
    return X, y


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without a GPU is a ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available; use 'cpu'")
    return torch.device(device)


def chunked_matmul(X: torch.Tensor, W: torch.Tensor, fn: Callable[[torch.Tensor, slice], None], chunk: int = 8192):
    """Call ``fn(X[s] @ W.T, s)`` for row chunks ``s`` of X, bounding memory at chunk × C."""
    for start in range(0, X.shape[0], chunk):
        s = slice(start, min(start + chunk, X.shape[0]))
        fn(X[s] @ W.T, s)
