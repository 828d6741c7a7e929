"""Writing a feature file: :func:`write_features` writes a whole file atomically;
:class:`FeatureFileWriter` appends row batches (extraction and resume build on it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import h5py
import numpy as np

from ..integrity import StreamDigest, record_checksums
from ..outputs import atomic_write, check_interrupt, held_temp
from .reader import FeatureStore
from .schema import (
    FEATURE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    FeatureFileError,
    NonFiniteFeaturesError,
    PathLike,
    _class_counts,
    _class_indices,
    _class_name_texts,
    _to_numpy,
)


def package_versions() -> dict[str, str]:
    """Versions recorded in the ``created_with`` attribute."""
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    out = {"lt_rebalance": __version__, "h5py": h5py.__version__}
    for pkg in ("torch", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


class FeatureFileWriter:
    """Incremental writer of a feature file: create splits, append row batches, mark complete.

    Every append writes the rows, flushes, then bumps the split's ``rows`` attribute, so a process
    killed at any point leaves a file whose ``rows`` counts only rows that are on disk. Rows that
    would not be finite once stored (NaN/Inf, or beyond float16's range) are refused before they are
    written (:class:`NonFiniteFeaturesError`). Checksums (:mod:`lt_rebalance.integrity`) are recorded
    for ``/classes`` and ``/head`` when written and for a split's datasets by :meth:`mark_complete`;
    rows appended in order are hashed as they are written, anything else is hashed from disk then.

    Use :meth:`create` for a new file and :meth:`open_existing` to resume one.
    """

    def __init__(self, file: h5py.File):
        self.file = file
        self._digests: dict[str, StreamDigest] = {}  # dataset name -> digest of the rows written in order

    def _feed(self, ds: h5py.Dataset, position: int, values: Any) -> None:
        if ds.name in self._digests:
            self._digests[ds.name].feed(position, values)

    @classmethod
    def create(
        cls,
        path: PathLike,
        *,
        counts: Any,
        model: str = "",
        dataset: str = "",
        checkpoint_sha256: str = "",
        transform: Optional[Mapping[str, Any]] = None,
        class_names: Optional[Sequence[str]] = None,
        extra_attrs: Optional[Mapping[str, Any]] = None,
    ) -> FeatureFileWriter:
        """Create ``path`` (must not exist) with the root attributes and ``/classes``."""
        f = h5py.File(path, "w" if held_temp(path) else "w-")  # "w": our own, still empty temporary file
        try:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["model"] = model
            f.attrs["dataset"] = dataset
            f.attrs["checkpoint_sha256"] = checkpoint_sha256
            f.attrs["created_with"] = json.dumps(package_versions())
            f.attrs["transform"] = json.dumps(dict(transform or {}))
            for k, v in (extra_attrs or {}).items():
                f.attrs[k] = v
            counts = _class_counts(counts)
            if counts.ndim != 1 or counts.size == 0:
                raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
            f.create_dataset("classes/counts", data=counts)
            if class_names is not None:
                class_names = _class_name_texts(class_names)
                if len(class_names) != len(counts):
                    raise ValueError(f"{len(class_names)} class names for {len(counts)} classes")
                f.create_dataset("classes/names", data=class_names, dtype=h5py.string_dtype())
            record_checksums(f["classes"])
            f.create_group("splits")
        except BaseException:
            f.close()
            raise
        return cls(f)

    @classmethod
    def open_existing(cls, path: PathLike) -> FeatureFileWriter:
        """Re-open a partially written file to resume it."""
        return cls(h5py.File(path, "r+"))

    @property
    def num_classes(self) -> int:
        return int(self.file["classes/counts"].shape[0])

    def set_head(self, weight: Any, bias: Any = None, *, random_init: bool = False) -> None:
        """Store the stage-1 classifier: weight (C, D), bias (C,) or None.

        ``random_init``: the weights are a random initialisation, not a trained classifier
        (``/head`` attribute ``random_init``; head-based methods then skip or mark it).
        """
        w = _to_numpy(weight, "float32")
        if w.ndim != 2 or w.shape[0] != self.num_classes:
            raise ValueError(f"head weight must have shape (C={self.num_classes}, D), got {w.shape}")
        b = None if bias is None else _to_numpy(bias, "float32")
        if b is not None and b.shape != (self.num_classes,):
            raise ValueError(f"head bias must have shape ({self.num_classes},), got {b.shape}")
        for name, a in (("weight", w), ("bias", b)):
            if a is not None and not np.isfinite(a).all():
                raise NonFiniteFeaturesError(
                    f"head {name} has {int((~np.isfinite(a)).sum())} NaN/Inf value(s) (as float32); "
                    "a classifier with non-finite weights cannot be stored"
                )
        for key in ("head/weight", "head/bias"):
            if key in self.file:
                del self.file[key]
        self.file.create_dataset("head/weight", data=w)
        if b is not None:
            self.file.create_dataset("head/bias", data=b)
        self.file["head"].attrs["random_init"] = bool(random_init)
        record_checksums(self.file["head"])

    def create_split(
        self,
        name: str,
        num_rows: int,
        dim: int,
        *,
        dtype: str = "float32",
        views: int = 0,
        with_paths: bool = False,
    ) -> None:
        """Allocate a split of ``num_rows`` rows (contiguous datasets, written by :meth:`append`)."""
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        g = self.file.require_group("splits").create_group(name)
        created = [g.create_dataset("features", shape=(num_rows, dim), dtype=dtype),
                   g.create_dataset("labels", shape=(num_rows,), dtype="int64")]
        if with_paths:
            created.append(g.create_dataset("paths", shape=(num_rows,), dtype=h5py.string_dtype()))
        if views:
            created.append(g.create_dataset("views", shape=(views, num_rows, dim), dtype=dtype))
            g.attrs["view_rows"] = np.zeros(views, dtype=np.int64)
        self._digests.update({ds.name: StreamDigest(ds.dtype) for ds in created})
        g.attrs["rows"] = 0
        g.attrs["complete"] = num_rows == 0 and views == 0

    def rows(self, name: str) -> int:
        return int(self.file[f"splits/{name}"].attrs["rows"])

    def view_rows(self, name: str) -> list[int]:
        g = self.file[f"splits/{name}"]
        return [int(r) for r in g.attrs.get("view_rows", [])]

    def append(self, name: str, features: Any, labels: Any, paths: Optional[Sequence[str]] = None) -> int:
        """Write a batch after the rows already written; returns the new row count."""
        g = self.file[f"splits/{name}"]
        x = _to_numpy(features)
        y = _class_indices(labels, name)
        start = int(g.attrs["rows"])
        end = start + len(x)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
        if end > g["features"].shape[0]:
            raise ValueError(f"split {name!r} has room for {g['features'].shape[0]} rows, got row {end}")
        if len(x):
            stored = _finite_rows(x, g["features"].dtype, f"split {name!r}", start)
            g["features"][start:end] = stored
            g["labels"][start:end] = y
            self._feed(g["features"], start, stored)
            self._feed(g["labels"], start, y)
            if paths is not None:
                g["paths"][start:end] = list(paths)
                self._feed(g["paths"], start, list(paths))
        self.file.flush()
        g.attrs["rows"] = end
        self.file.flush()
        check_interrupt()  # a Ctrl-C that h5py swallowed stops the write here
        return end

    def append_view(self, name: str, view: int, features: Any) -> int:
        """Write a batch of augmented view ``view`` after its rows already written."""
        g = self.file[f"splits/{name}"]
        x = _to_numpy(features)
        view_rows = np.asarray(g.attrs["view_rows"], dtype=np.int64)
        start = int(view_rows[view])
        end = start + len(x)
        if end > g["views"].shape[1]:
            raise ValueError(f"view {view} of split {name!r} has room for {g['views'].shape[1]} rows")
        stored = _finite_rows(x, g["views"].dtype, f"view {view} of split {name!r}", start)
        g["views"][view, start:end] = stored
        self._feed(g["views"], view * g["views"].shape[1] + start, stored)
        self.file.flush()
        view_rows[view] = end
        g.attrs["view_rows"] = view_rows
        self.file.flush()
        return end

    def mark_complete(self, name: str) -> None:
        """Record the checksums of the split's datasets, then mark it complete."""
        g = self.file[f"splits/{name}"]
        n = g["features"].shape[0]
        if int(g.attrs["rows"]) != n or any(int(r) != n for r in g.attrs.get("view_rows", [])):
            raise ValueError(f"split {name!r} cannot be marked complete: not all rows are written")
        known = {}
        for key, digest in self._digests.items():
            if key.startswith(g.name + "/") and key in self.file:
                ds = self.file[key]
                known[key] = digest.hexdigest(int(np.prod(ds.shape[:-1])) if ds.ndim > 1 else ds.shape[0])
        record_checksums(g, {k: v for k, v in known.items() if v})
        g.attrs["complete"] = True
        self.file.flush()

    def is_complete(self, name: str) -> bool:
        return bool(self.file[f"splits/{name}"].attrs["complete"])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> FeatureFileWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# IEEE floats by size: (unsigned view, mask of everything but the sign, exponent all ones = NaN/Inf)
_FLOAT_BITS = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000),
               8: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def _all_finite(a: np.ndarray, block: int = 1 << 22) -> bool:
    """``np.isfinite(a).all()`` for a float array, much faster for float16: the largest |bit pattern|
    is compared with the NaN/Inf exponent, in cache-sized blocks."""
    if a.dtype.kind != "f" or a.dtype.itemsize not in _FLOAT_BITS or not a.flags.c_contiguous:
        return bool(np.isfinite(a).all())
    uint, mask, inf = _FLOAT_BITS[a.dtype.itemsize]
    flat = a.reshape(-1).view(uint)
    buf = np.empty(min(block, flat.size), dtype=uint)
    for s in range(0, flat.size, block):
        part = buf[: min(block, flat.size - s)]
        np.bitwise_and(flat[s : s + len(part)], mask, out=part)
        if part.max() >= inf:
            return False
    return True


def _finite_rows(x: np.ndarray, dtype: np.dtype, where: str, start: int) -> np.ndarray:
    """``x`` cast to the stored ``dtype``; NonFiniteFeaturesError naming the rows that are not finite then."""
    with np.errstate(over="ignore"):  # overflow is reported below, by row
        stored = x.astype(dtype, copy=False)
    if _all_finite(stored):
        return stored
    bad = np.flatnonzero(~np.isfinite(stored.reshape(len(stored), -1)).all(axis=1))
    rows = ", ".join(str(start + int(i)) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    source_finite = np.isfinite(x[bad]).all()
    if source_finite:  # finite values beyond the stored dtype's range
        limit = float(np.finfo(dtype).max)
        fix = "store them as float32 (--dtype float32)" if dtype == np.float16 else "rescale them"
        raise NonFiniteFeaturesError(
            f"{where}: {len(bad)} feature row(s) (rows {rows}) have values beyond {np.dtype(dtype).name}'s range "
            f"(largest |value| {float(np.abs(x[bad]).max()):.6g} > {limit:.6g}); {fix}"
        )
    raise NonFiniteFeaturesError(
        f"{where}: {len(bad)} feature row(s) (rows {rows}) hold NaN/Inf values; fix them at their source "
        "(a backbone or checkpoint producing NaN, or the arrays given)"
    )


def write_features(
    path: PathLike,
    splits: Mapping[str, tuple],
    *,
    counts: Any = None,
    weight: Any = None,
    bias: Any = None,
    class_names: Optional[Sequence[str]] = None,
    dtype: str = "float32",
    model: str = "",
    dataset: str = "",
    overwrite: bool = False,
    head_random_init: bool = False,
    **attrs: Any,
) -> Path:
    """Write a complete feature file atomically (temporary file in the same folder, then rename).

    Parameters
    ----------
    splits : mapping of split name to ``(features, labels)`` or ``(features, labels, paths)``
        features (N, D) float, labels (N,) int; numpy arrays or torch tensors.
    counts : array of int (C,), optional
        Training images per class; computed from the ``train`` labels when omitted.
    weight, bias : arrays (C, D) and (C,), optional
        The stage-1 classifier.
    head_random_init : bool, default=False
        ``weight``/``bias`` are a random initialisation, not a trained classifier (``/head`` attribute).

    Examples
    --------
    >>> write_features("feats.h5", {"train": (Xtr, ytr), "test": (Xte, yte)},
    ...                weight=W, bias=b)                      # doctest: +SKIP
    """
    if counts is None:
        if "train" not in splits:
            raise ValueError("counts not given and no 'train' split to count them from")
        ytr = _class_indices(splits["train"][1], "train")
        num_classes = int(ytr.max()) + 1 if ytr.size else 0
        if weight is not None:
            num_classes = max(num_classes, _to_numpy(weight).shape[0])
        counts = np.bincount(ytr, minlength=num_classes)

    def write(tmp: Path) -> None:
        with FeatureFileWriter.create(
            tmp, counts=counts, model=model, dataset=dataset, class_names=class_names, **_root_kwargs(attrs)
        ) as w:
            if weight is not None:
                w.set_head(weight, bias, random_init=head_random_init)
            for name, arrays in splits.items():
                x = _to_numpy(arrays[0])
                if x.ndim != 2:
                    raise ValueError(f"features of split {name!r} must be 2-D (N, D), got shape {x.shape}")
                paths = arrays[2] if len(arrays) > 2 else None
                w.create_split(name, len(x), x.shape[1], dtype=dtype, with_paths=paths is not None)
                w.append(name, x, arrays[1], paths)
                w.mark_complete(name)
        # validate before publishing, so a bad file never reaches the final path
        try:
            FeatureStore(tmp).close()
        except FeatureFileError as e:  # name the file the caller asked for, not the temporary one
            raise FeatureFileError(path, e.problem) from None

    try:
        return atomic_write(path, write, overwrite)
    except (FeatureFileError, NonFiniteFeaturesError):
        raise
    except ValueError as e:  # the arrays given: name the file they were meant for
        raise FeatureFileError(path, str(e)) from None


def _root_kwargs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    known = {"checkpoint_sha256", "transform"}
    out: dict[str, Any] = {k: attrs[k] for k in known if k in attrs}
    extra = {k: v for k, v in attrs.items() if k not in known}
    if extra:
        out["extra_attrs"] = extra
    return out
