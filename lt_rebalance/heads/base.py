"""scikit-learn estimator plumbing for heads, without depending on scikit-learn.

``__init__`` only stores its arguments; ``fit`` validates them (``_parameter_constraints``),
learns state in attributes ending with ``_`` (``classes_``, ``n_features_in_``) and returns
``self``; ``scores`` gives (N, C) scores, ``predict`` the labels of their argmax. Heads speak
scikit-learn's protocol (``__sklearn_tags__``, ``score``, ``predict_proba``), importing it only
inside the hooks it calls. Torch input gives torch output; numpy or any array-like, numpy.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import sys
from typing import Any, Callable, Iterator, Optional

import numpy as np
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
        if not isinstance(value, numbers.Real) or value != value:  # NaN is in no interval
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
    """A head used before ``fit``; also a scikit-learn ``NotFittedError`` once scikit-learn is imported."""


@functools.cache
def _not_fitted_error(sklearn_error: Optional[type]) -> type:
    if sklearn_error is None:
        return NotFittedError
    return type("NotFittedError", (NotFittedError, sklearn_error), {"__module__": __name__})


class BaseHead:
    """The estimator protocol: parameters, validation, fitted checks, prediction in every form.

    A head implements ``fit`` (ending with ``classes_``, ``n_features_in_`` and the attribute
    named by ``_state``) and ``_scores``: validated float32 (N, D) features on the head's device
    -> (N, C) scores, column j for ``classes_[j]``, higher = more likely. Everything public
    derives from it: torch input gives torch output (no copy), anything else numpy.
    """

    _parameter_constraints: dict[str, list] = {}
    _state = ""  # the fitted attribute that check_is_fitted looks for (and whose device inputs go to)
    _requires_y = True  # scikit-learn tag: fit needs labels
    _estimator_type = "classifier"  # for tools predating scikit-learn's tags (< 1.6)
    # the precision the fitted head's matrix products run in ("float32", "bfloat16", "tf32";
    # lt_rebalance.precision): float32 unless a head's ``precision`` parameter resolved otherwise in fit
    precision_ = "float32"

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments by name; ``deep`` adds ``name__sub`` for arguments that are estimators."""
        out: dict[str, Any] = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params: Any) -> BaseHead:
        """Set constructor arguments (``name__sub`` reaches into an estimator argument); returns self."""
        valid = self._param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, delim, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; valid: {valid}")
            if delim:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values() if p.name != "self"
        }
        shown = []
        for k, v in self.get_params(deep=False).items():
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

    # -- the scikit-learn protocol (scikit-learn is imported only by the hooks it calls) ----------
    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=self._requires_y),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(),
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, self._state)

    # -- prediction -------------------------------------------------------------------------------
    # -- capabilities: what the protocols and the evaluation may ask of a head --------------------------

    # whether a row's scores depend on the other rows scored with it (a head that adapts to the test
    # set): evaluations then score each test subset on its own instead of taking rows of one scoring
    transductive = False

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The class prior float64 (C,) this fitted head's scores are balanced for, given the train
        ``counts``: what the shifted-prior correction divides out (docs/METHODS.md). Raises
        :class:`~lt_rebalance.priors.NoImpliedPrior` with the reason when there is none."""
        from ..priors import NoImpliedPrior

        raise NoImpliedPrior(f"a {type(self).__name__} declares no implied class prior")

    def logit_affine(self) -> Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """(a, c) float32 (C,) each (None: 1 and 0) such that this head's scores are (X Wᵀ) ⊙ a + c,
        W the classifier it was built on (its ``weight`` argument); None when they are not such a map."""
        return None

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (C, D), b (C,)) of the linear layer this head is; ValueError for a head that is none."""
        raise ValueError(f"a {type(self).__name__} is not a linear layer (weight, bias)")

    def _scores(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def _device(self) -> torch.device:
        return getattr(self, self._state).device

    def _checked(self, X: Any) -> torch.Tensor:
        """X validated and moved to the head's device once (float16 stays float16)."""
        check_is_fitted(self, self._state)
        return check_features(X, n_features=self.n_features_in_, device=self._device, expecting=type(self).__name__)

    def _forward(self, X: Any) -> torch.Tensor:
        return self._scores(self._checked(X))

    def scores_in_blocks(self, X: Any, rows: Optional[int] = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(s, scores of X[s])`` for consecutive blocks of ``rows`` rows (default ``SCORE_ROWS``): X is
        validated and moved to the head's device once, and no (N, C) score matrix exists (at least
        one, maybe empty, block)."""
        X = self._checked(X)
        for s in list(row_blocks(len(X), rows or SCORE_ROWS)) or [slice(0, 0)]:
            yield s, self._scores(X[s])

    def scores(self, X: Any) -> Any:
        """Scores float32 (N, C), column j for ``classes_[j]``, higher = more likely (see each head)."""
        return _output(self._forward(X), X)

    def decision_function(self, X: Any) -> Any:
        """:meth:`scores`, except for two classes: the margin s_1 - s_0 (N,), > 0 meaning ``classes_[1]``
        (scikit-learn's convention for binary classifiers)."""
        s = self._forward(X)
        return _output(s[:, 1] - s[:, 0] if s.shape[1] == 2 else s, X)

    def predict_proba(self, X: Any) -> Any:
        """softmax(:meth:`scores`) float32 (N, C); each head's docstring says whether it is calibrated."""
        return _output(torch.softmax(self._forward(X), dim=1), X)

    def predict_log_proba(self, X: Any) -> Any:
        """log_softmax(:meth:`scores`) float32 (N, C)."""
        return _output(torch.log_softmax(self._forward(X), dim=1), X)

    def predict(self, X: Any) -> Any:
        """Predicted labels (N,), values of ``classes_``: argmax of :meth:`scores`.

        Torch input gives a tensor (the int64 argmax itself when ``classes_`` is 0..C-1; numpy for
        string labels); anything else a numpy array of ``classes_``' dtype.
        """
        from .labels import decode_labels

        index = torch.cat([z.argmax(dim=1) for _, z in self.scores_in_blocks(X)])
        return decode_labels(self.classes_, index, isinstance(X, torch.Tensor))

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict` on (X, y), weighted by ``sample_weight``; a label outside
        ``classes_`` (a class without rows in this fit, as in a cross-validation fold) counts as a miss."""
        from .labels import label_array

        pred = self.predict(X)
        hit = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred) == label_array(y)
        w = sample_weight.cpu() if isinstance(sample_weight, torch.Tensor) else sample_weight
        return float(np.average(hit, weights=None if w is None else np.asarray(w, dtype=np.float64)))

    def evaluate(self, X: Any, y: Any, counts: Any, **kwargs: Any) -> dict[str, float]:
        """The metrics of :func:`lt_rebalance.metrics.evaluate` on (X, y); ``counts`` in ``classes_`` order.
        Scored a block of rows at a time (:meth:`scores_in_blocks`): no (N, C) score matrix is held."""
        from ..metrics import evaluate_rows, head_row_statistics
        from .labels import index_labels

        y = index_labels(y, self.classes_, self._device)
        return evaluate_rows(head_row_statistics(self, X, y, len(counts)), y, counts, **kwargs)


def _output(t: torch.Tensor, like: Any) -> Any:
    """``t`` for torch input ``like``, else its numpy copy on the CPU."""
    return t if isinstance(like, torch.Tensor) else t.cpu().numpy()


def clone_keeping(head: BaseHead, name: str) -> BaseHead:
    """scikit-learn's ``clone`` of ``head``, except that parameter ``name`` (a fitted base head, used
    as-is like data) is shared rather than re-created unfitted. For ``__sklearn_clone__``."""
    from sklearn.base import clone

    params = head.get_params(deep=False)
    return type(head)(**{k: v if k == name else clone(v, safe=False) for k, v in params.items()})


def check_is_fitted(head: BaseHead, attribute: str) -> None:
    if not hasattr(head, attribute):
        # scikit-learn's class only when it is already in use: it is never imported here
        error = _not_fitted_error(getattr(sys.modules.get("sklearn.exceptions"), "NotFittedError", None))
        raise error(f"this {type(head).__name__} is not fitted yet; call fit first")


def as_tensor(a: Any, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    return t.to(device=device, dtype=dtype)


FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def as_features(X: Any, device: Any = "cpu") -> torch.Tensor:
    """X as a float tensor on ``device``: float16, bfloat16 and float32 keep their dtype (kernels
    upcast a block of rows at a time, :mod:`lt_rebalance.blocks`), anything else becomes float32.
    A tensor is moved/cast (no copy when it already is), array-likes go through numpy (lists,
    memmaps, object arrays of numbers); sparse and complex input are errors."""
    if isinstance(X, torch.Tensor):
        if X.is_complex():
            raise ValueError("Complex data not supported: features must be real")
        return X.to(device=device, dtype=X.dtype if X.dtype in FEATURE_DTYPES else torch.float32)
    if hasattr(X, "tocsr"):
        raise TypeError("Sparse data was passed for X, but dense data is required. "
                        "Use '.toarray()' to convert to a dense numpy array.")
    A = np.asarray(X)
    if A.dtype.kind == "c":
        raise ValueError("Complex data not supported: features must be real")
    if A.dtype not in (np.float16, np.float32) or not A.flags.writeable:  # torch wants writeable memory
        A = A.astype(np.float32)  # float64 and the rest -> float32
    return torch.from_numpy(A).to(device)


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


def check_features(
    X: Any,
    y: Any = None,
    *,
    n_features: Optional[int] = None,
    classes: Optional[np.ndarray] = None,
    device: Any = "cpu",
    min_samples: int = 0,
    expecting: str = "the classifier",
):
    """Validate and convert: X to (N, D) (:func:`as_features`), y to int64 (N,) indices into ``classes`` (a head's
    ``classes_``, e.g. arange(C)); returns X or (X, y).

    ``min_samples``: the fewest rows accepted (1 when fitting); ``expecting`` names what the
    width must match in the error message.
    """
    check_no_grad(X, "X")
    X = as_features(X, device)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got shape {tuple(X.shape)}. Reshape your data with "
                         "reshape(1, -1) for a single row or reshape(-1, 1) for a single feature")
    if X.shape[0] < min_samples:
        raise ValueError(f"Found array with {X.shape[0]} sample(s) (shape={tuple(X.shape)}) while a minimum of "
                         f"{min_samples} is required.")
    if X.shape[1] == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is required.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"X has {X.shape[1]} features, but {expecting} is expecting {n_features} features as input")
    if not all_finite(X):
        raise ValueError("features contain NaN or Inf values")
    if y is None:
        return X
    from .labels import index_labels

    return X, check_rows(X, index_labels(y, classes, device))


def check_fit_data(X: Any, y: Any, num_classes: Optional[int], device: Any):
    """Train data of a head that learns its classes: ``(X float32 (N, D), y int64 indices (N,), classes_)``."""
    from .labels import encode_labels

    X = check_features(X, device=device, min_samples=1)
    classes, y = encode_labels(y, num_classes, device)
    return X, check_rows(X, y), classes


def check_rows(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.shape != (X.shape[0],):
        raise ValueError(f"labels must have shape ({X.shape[0]},) to match the features; got {tuple(y.shape)}")
    return y
