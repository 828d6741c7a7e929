"""Class labels <-> column indices, as scikit-learn classifiers do it (``classes_``).

A head's ``classes_`` is a sorted numpy array: column j of its scores is class ``classes_[j]``.
Fitted without ``num_classes`` it is ``np.unique(y)`` (any sortable labels: strings,
non-contiguous ints); with ``num_classes`` (or a stage-1 classifier of C rows) it is
``arange(C)``, classes without train rows included, and labels must be ints in [0, C).
Internally labels are int64 indices 0..C-1. For torch integer labels and ``classes_ = arange(C)``
(what the CLI passes) the mapping is a range check only: no copy, no sort.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import torch


def is_identity(classes: np.ndarray) -> bool:
    """True when ``classes`` (sorted, unique) is 0..C-1, so labels are their own indices."""
    return classes.dtype.kind in "iu" and len(classes) > 0 and classes[0] == 0 and classes[-1] == len(classes) - 1


def label_array(y: Any) -> np.ndarray:
    """``y`` as a checked 1-D numpy array of class labels (ValueError / warning as scikit-learn)."""
    if y is None:
        raise ValueError("this head requires y to be passed, but the target y is None")
    a = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if a.ndim == 2 and a.shape[1] == 1:
        # scikit-learn's warning class when scikit-learn is in use (never imported here)
        category = getattr(sys.modules.get("sklearn.exceptions"), "DataConversionWarning", UserWarning)
        warnings.warn("A column-vector y was passed when a 1d array was expected. Please change the shape of y "
                      "to (n_samples,), for example using ravel().", category, stacklevel=3)
        a = a.ravel()
    if a.ndim != 1:
        raise ValueError(f"y should be a 1d array, got an array of shape {a.shape} instead.")
    if a.dtype.kind == "c":
        raise ValueError("Complex data not supported: y holds complex labels")
    if a.dtype.kind == "f":
        if np.isnan(a).any():
            raise ValueError("Input y contains NaN.")
        if np.isinf(a).any():
            raise ValueError("Input y contains infinity or a value too large for dtype('float64').")
        if (a != np.round(a)).any():
            raise ValueError("Unknown label type: continuous. A classifier needs discrete class labels; "
                             f"y holds fractional values such as {a[a != np.round(a)][0]!r}")
    return a


def _check_range(y: torch.Tensor, C: int) -> torch.Tensor:
    if len(y) and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"labels must lie in [0, {C}); got range [{int(y.min())}, {int(y.max())}]")
    return y


def index_labels(y: Any, classes: np.ndarray, device: Any = "cpu") -> torch.Tensor:
    """Column index int64 (N,) on ``device`` of every label of ``y`` in ``classes``; ValueError for an unknown one."""
    C = len(classes)
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex() and is_identity(classes):
        if y.ndim != 1:
            raise ValueError(f"y should be a 1d array, got an array of shape {tuple(y.shape)} instead.")
        return _check_range(y.to(device=device, dtype=torch.int64), C)
    a = label_array(y)
    if is_identity(classes):
        if a.dtype.kind not in "iufb":
            raise ValueError(f"labels must be integers in [0, {C}) (the classifier's rows); got {a.dtype} labels")
        return _check_range(torch.from_numpy(a.astype(np.int64)).to(device), C)
    pos = np.searchsorted(classes, a).clip(max=C - 1)
    unknown = classes[pos] != a
    if unknown.any():
        raise ValueError(f"y contains labels the head was not fitted on: {np.unique(a[unknown])[:5].tolist()}; "
                         f"its classes_ are {classes[:10].tolist()}{' ...' if C > 10 else ''}")
    return torch.from_numpy(pos.astype(np.int64)).to(device)


def encode_labels(y: Any, num_classes: int | None = None, device: Any = "cpu") -> tuple[np.ndarray, torch.Tensor]:
    """``(classes_, indices int64 (N,))`` of train labels ``y``; ``num_classes`` fixes classes_ to arange(C)."""
    if num_classes is not None:
        classes = np.arange(int(num_classes))
        return classes, index_labels(y, classes, device)
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex() and y.ndim == 1:
        uniq = torch.unique(y)  # sorted
        if len(uniq) and uniq[0] == 0 and uniq[-1] == len(uniq) - 1:
            return np.arange(len(uniq)), y.to(device=device, dtype=torch.int64)
        return uniq.cpu().numpy(), torch.searchsorted(uniq, y).to(device=device, dtype=torch.int64)
    classes, inverse = np.unique(label_array(y), return_inverse=True)
    return classes, torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device)


def decode_labels(classes: np.ndarray, index: torch.Tensor, torch_out: bool) -> Any:
    """The labels of column indices ``index``: a tensor for torch input (numeric labels), else numpy."""
    if torch_out:
        if is_identity(classes):
            return index
        if classes.dtype.kind in "iufb":
            return torch.as_tensor(classes, device=index.device)[index]
    return classes[index.cpu().numpy()]
