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


def _whole(a: np.ndarray) -> np.ndarray:
    """Mask of the entries of a numeric array that are whole numbers (NaN and Inf are not)."""
    if a.dtype.kind != "f":
        return np.ones(a.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.isfinite(a) & (a == np.round(a))


def _class_counts(counts: Any) -> np.ndarray:
    """Training images per class as int64 (C,); fractional, NaN or negative counts are an error, never truncated."""
    c = _to_numpy(counts)
    if c.dtype.kind not in "biuf":
        raise ValueError(f"counts must be whole numbers of training images; got dtype {c.dtype}")
    whole = _whole(c)
    if not whole.all():
        i = int(np.flatnonzero(~whole.reshape(-1))[0])
        raise ValueError(f"counts must be whole numbers of training images; got {c.reshape(-1)[i]} for class {i}")
    c = c.astype(np.int64)
    if c.size and c.min() < 0:
        raise ValueError(f"counts must be >= 0; got {int(c.min())} for class {int(np.argmin(c))}")
    return c


def _class_name_texts(names: Any) -> list[str]:
    """Class names as text: bytes are decoded (UTF-8), never stored as ``"b'cat'"``; a NUL character
    (which HDF5 strings cannot hold) is an error naming the class."""
    out = []
    for i, name in enumerate(names):
        if isinstance(name, (bytes, np.bytes_)):
            try:
                name = bytes(name).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"class name {i} ({bytes(name)!r}) is not UTF-8 text") from None
        name = str(name)
        if "\0" in name:
            raise ValueError(f"class name {i} ({name!r}) holds a NUL character, which a feature file cannot store")
        out.append(name)
    return out


def _class_indices(labels: Any, split: str) -> np.ndarray:
    """Labels as int64 class indices; fractional or negative values are an error, never truncated."""
    y = _to_numpy(labels)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels of split {split!r} must be integer class indices; got dtype {y.dtype}")
    whole = _whole(y)
    if not whole.all():
        i = int(np.flatnonzero(~whole.reshape(-1))[0])
        raise ValueError(f"labels of split {split!r} must be whole class indices; got {y.reshape(-1)[i]} at row {i}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"labels of split {split!r} must be class indices >= 0; got {int(y.min())}")
    return y

