"""Feature file schema version 1 (see docs/FORMAT.md): names, constants, errors, value checks.

Shared by the reader (:mod:`.reader`) and the writer (:mod:`.writer`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

FORMAT = "lt-rebalance/features"
FORMAT_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")

PathLike = Union[str, os.PathLike]


# what h5py raises on damaged metadata or data (e.g. RuntimeError: unable to offset into local heap)
DAMAGE_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)

REMAKE_HINT = "re-create it with `ltr extract` or `ltr import` (`ltr check` lists every problem)"


class FeatureFileError(ValueError):
    """A feature file that cannot be used; the message names the file, the problem and the fix.

    ``problem`` is the bare problem; ``hint`` (may be empty) what to do about it.
    """

    def __init__(self, path: PathLike, problem: str, hint: str = ""):
        self.path, self.problem, self.hint = str(path), problem, hint
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


class NonFiniteFeaturesError(ValueError):
    """Features that are NaN/Inf once stored (NaN input, or values beyond the stored dtype's range)."""


@dataclass(frozen=True)
class SplitInfo:
    """What a split holds, read from metadata only (no feature reads)."""

    name: str
    rows: int  # rows written so far
    capacity: int  # rows allocated (N)
    complete: bool
    dtype: str
    views: int  # K augmented views (0 when absent)
    has_paths: bool
    view_rows: tuple[int, ...] = ()  # rows written of each view (all rows when not recorded)


def _str_attr(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """A numpy scalar attribute as the Python value (np.int64 -> int, np.bool_ -> bool)."""
    return value.item() if isinstance(value, np.generic) else value


def _to_numpy(a: Any, dtype: Optional[str] = None) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a.astype(dtype, copy=False) if dtype is not None else a


RANDOM_HEAD_NOTE = ("the stored classifier is a random initialisation (ltr extract --random-init), "
                    "not a trained stage-1 classifier")


def _class_indices(labels: Any, split: str) -> np.ndarray:
    """Labels as int64 class indices; fractional or negative values are an error, never truncated."""
    y = _to_numpy(labels)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels of split {split!r} must be integer class indices; got dtype {y.dtype}")
    if y.dtype.kind == "f" and y.size and not np.array_equal(y, np.round(y)):
        bad = y[y != np.round(y)][0]
        raise ValueError(f"labels of split {split!r} must be whole class indices; got {bad}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"labels of split {split!r} must be class indices >= 0; got {int(y.min())}")
    return y

