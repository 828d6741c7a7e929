"""scikit-learn style plumbing for heads, without depending on scikit-learn.

``__init__`` only stores its arguments; ``fit`` validates them (``_parameter_constraints``),
learns state in attributes ending with ``_`` and returns ``self``; ``decision_function`` gives
(N, C) scores, ``predict`` their argmax. Inputs may be numpy arrays or torch tensors.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Optional

import torch

from ..blocks import SCORE_ROWS, all_finite, row_blocks


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
        """Predicted class (N,) int64: argmax of :meth:`decision_function`, a block of rows at a time."""
        X = to_features(X, self.fitted_device())  # moved once, not per block
        if len(X) == 0:
            return self.decision_function(X).argmax(dim=1)
        return torch.cat([self.decision_function(X[s]).argmax(dim=1) for s in row_blocks(len(X), SCORE_ROWS)])

    def fitted_device(self) -> torch.device:
        """The device of the fitted state (tensor attributes ending in ``_``, or a wrapped ``head``'s)."""
        for k, v in vars(self).items():
            if k.endswith("_") and isinstance(v, torch.Tensor):
                return v.device
        inner = getattr(self, "head", None)
        return inner.fitted_device() if isinstance(inner, BaseHead) else torch.device("cpu")

    def evaluate(self, X: Any, y: Any, counts: Any, **kwargs: Any) -> dict[str, float]:
        """The metrics of :func:`lt_rebalance.metrics.evaluate` on (X, y), scored a block of rows at a time
        (no (N, C) score matrix is held)."""
        from ..metrics import evaluate_rows, head_row_statistics

        return evaluate_rows(head_row_statistics(self, X, y, len(counts)), y, counts, **kwargs)


def check_is_fitted(head: BaseHead, attribute: str) -> None:
    if not hasattr(head, attribute):
        raise NotFittedError(f"this {type(head).__name__} is not fitted yet; call fit first")


def as_tensor(a: Any, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    return t.to(device=device, dtype=dtype)


FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def to_features(X: Any, device: Any = "cpu") -> torch.Tensor:
    """X as a tensor on ``device``: float16/bfloat16/float32 keep their dtype, others become float32."""
    X = X if isinstance(X, torch.Tensor) else torch.as_tensor(X)
    return as_tensor(X, X.dtype if X.dtype in FEATURE_DTYPES else torch.float32, device)


def check_features(
    X: Any,
    y: Any = None,
    *,
    n_features: Optional[int] = None,
    num_classes: Optional[int] = None,
    device: Any = "cpu",
):
    """Validate and convert: X to (N, D) on ``device``, y to int64 (N,); returns X or (X, y).

    float16, bfloat16 and float32 features keep their dtype (kernels upcast a block of rows at a
    time, :mod:`lt_rebalance.blocks`); any other dtype becomes float32.
    """
    X = to_features(X, device)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got shape {tuple(X.shape)}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"features have {X.shape[1]} dimensions, but the head was fitted on {n_features}")
    if not all_finite(X):
        raise ValueError("features contain NaN or Inf values")
    if y is None:
        return X
    y = as_tensor(y, torch.int64, device)
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
