"""The feature file: HDF5 schema version 1 (see docs/FORMAT.md).

Reading: :class:`FeatureStore` opens and validates a file, then hands out float32 torch tensors.
Writing: :func:`write_features` writes a whole file atomically; :class:`FeatureFileWriter` appends
row batches (extraction and resume build on it).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import h5py
import numpy as np

from .integrity import StreamDigest, record_checksums
from .outputs import atomic_output, atomic_write, check_interrupt  # noqa: F401 (atomic_output: public API)

if TYPE_CHECKING:  # pragma: no cover
    import torch

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


class FeatureStore:
    """Read-only view of a feature file, validated on opening.

    The file stays open (one HDF5 handle, bound to the file's inode) until :meth:`close`, so every
    read of a run comes from the same file even if the path is replaced meanwhile.

    Parameters
    ----------
    path : str or PathLike
        The ``.h5`` file.
    allow_incomplete : bool, default=False
        Accept splits whose extraction has not finished (only the rows written so far are read).

    Attributes
    ----------
    counts : ndarray of int64, shape (C,)
        Training images per class; defines the shot groups.
    num_classes, dim : int
    splits : dict of str to SplitInfo
    attrs : dict
        Root attributes (model, dataset, checkpoint_sha256, created_with, transform, ...).

    Examples
    --------
    >>> store = FeatureStore("feats.h5")                     # doctest: +SKIP
    >>> X, y = store.load("train")                           # doctest: +SKIP
    """

    def __init__(self, path: PathLike, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self.allow_incomplete = allow_incomplete
        if not self.path.exists():
            raise FeatureFileError(path, "no such file", "check the path, or create the file with `ltr extract` or `ltr import`")
        if self.path.is_dir():
            raise FeatureFileError(path, "is a folder, not a feature file")
        if not os.access(self.path, os.R_OK):
            raise FeatureFileError(path, "cannot be read (permission denied)", "check the file's permissions")
        try:
            is_hdf5 = h5py.is_hdf5(self.path)
        except OSError as e:  # unreadable
            raise FeatureFileError(path, f"cannot be read ({e.strerror or e})", "check the file's permissions") from None
        if not is_hdf5:
            raise FeatureFileError(path, "not an HDF5 file (create one with `ltr extract` or `ltr import`)")
        self.file: Optional[h5py.File] = None
        try:
            self.file = h5py.File(self.path, "r")
            self._read_metadata(self.file)
        except BaseException as e:
            self.close()
            if isinstance(e, FeatureFileError) or not isinstance(e, DAMAGE_ERRORS):
                raise
            if isinstance(e, OSError) and "unable to lock file" in str(e):  # HDF5's lock: open for writing
                raise FeatureFileError(path, "being written by another process (it holds the HDF5 file lock)",
                                       "wait until that process has finished, then retry") from None
            raise FeatureFileError(path, f"damaged or truncated HDF5 file ({e})", REMAKE_HINT) from None

    def close(self) -> None:
        """Close the file (reads fail afterwards)."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[h5py.File]:
        """The open file; HDF5 errors while reading (damaged metadata or data) become FeatureFileError."""
        if self.file is None:
            raise self._fail("is closed")
        try:
            yield self.file
        except FeatureFileError:
            raise
        except DAMAGE_ERRORS as e:
            raise self._damaged(f"damaged HDF5 file, reading failed ({e})") from None

    # -- validation -----------------------------------------------------------------------------
    def _fail(self, problem: str) -> FeatureFileError:
        return FeatureFileError(self.path, problem)

    def _damaged(self, problem: str) -> FeatureFileError:
        """A structural problem: the file was damaged or not written by lt-rebalance."""
        return FeatureFileError(self.path, problem, REMAKE_HINT)

    def _read_metadata(self, f: h5py.File) -> None:
        fmt = _str_attr(f.attrs.get("format", ""))
        if fmt != FORMAT:
            raise FeatureFileError(self.path, f"format is {fmt!r}, expected {FORMAT!r}: not an lt-rebalance feature file",
                                   "give a file written by `ltr extract` or `ltr import`")
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise self._fail(
                f"format_version {version} is newer than this lt-rebalance supports ({FORMAT_VERSION}); "
                "upgrade lt-rebalance"
            )
        if version < 1:
            raise self._damaged(f"invalid format_version {version}")
        self.format_version = version
        self.attrs = {k: (_str_attr(v) if isinstance(v, (bytes, str)) else v) for k, v in f.attrs.items()}
        if "classes/counts" not in f:
            raise self._damaged("missing /classes/counts (training images per class)")
        self.counts = np.asarray(f["classes/counts"][...], dtype=np.int64)
        if self.counts.ndim != 1 or len(self.counts) == 0:
            raise self._damaged(f"/classes/counts must be a non-empty 1-D array, got shape {self.counts.shape}")
        if (self.counts < 0).any():
            raise self._damaged("/classes/counts has negative entries")
        self.num_classes = len(self.counts)
        names = f.get("classes/names")
        self.class_names = [_str_attr(s) for s in names[...]] if names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise self._damaged(f"/classes/names has {len(self.class_names)} entries for {self.num_classes} classes")

        self.splits: dict[str, SplitInfo] = {}
        dims = set()
        for name, g in f.get("splits", {}).items():
            info = self._read_split(name, g)
            dims.add(g["features"].shape[1])
            self.splits[name] = info
        if not self.splits:
            raise self._damaged("no splits under /splits")
        if len(dims) > 1:
            raise self._damaged(f"splits have different feature dimensions {sorted(dims)}")
        self.dim = dims.pop()

        self.has_head = "head/weight" in f
        self.has_bias = "head/bias" in f
        if self.has_head:
            shape = tuple(f["head/weight"].shape)
            if shape != (self.num_classes, self.dim):
                raise self._damaged(
                    f"/head/weight has shape {shape}, expected (C, D) = ({self.num_classes}, {self.dim})"
                )
        if self.has_bias and tuple(f["head/bias"].shape) != (self.num_classes,):
            raise self._damaged(f"/head/bias has shape {tuple(f['head/bias'].shape)}, expected ({self.num_classes},)")
        # a random initialisation is not a stage-1 classifier; files written before the /head
        # attribute existed record it only in the root attribute weights (ltr extract --random-init)
        self.head_random_init = self.has_head and (
            bool(f["head"].attrs.get("random_init", False)) or self.attrs.get("weights") == "random-init"
        )

    def _read_split(self, name: str, g: h5py.Group) -> SplitInfo:
        where = f"/splits/{name}"
        if "features" not in g or "labels" not in g:
            raise self._damaged(f"{where} needs both 'features' and 'labels'")
        feats, labels = g["features"], g["labels"]
        if feats.ndim != 2:
            raise self._damaged(f"{where}/features must be 2-D [N, D], got shape {feats.shape}")
        if str(feats.dtype) not in FEATURE_DTYPES:
            raise self._damaged(f"{where}/features has dtype {feats.dtype}, expected float16 or float32")
        capacity = feats.shape[0]
        if feats.shape[1] == 0:
            raise self._damaged(f"{where}/features has shape {feats.shape}: no feature columns (D = 0)")
        if labels.shape != (capacity,):
            raise self._damaged(
                f"{where}: features have {capacity} rows but labels have shape {labels.shape} (length mismatch)"
            )
        rows, complete = self._split_attrs(where, g, capacity)
        if not complete and not self.allow_incomplete:
            raise self._fail(
                f"split {name!r} is incomplete ({rows}/{capacity} rows written); finish it with "
                "`ltr extract --resume` or pass --allow-incomplete to use the rows written so far"
            )
        y = labels[:rows]
        if rows and (y.min() < 0 or y.max() >= self.num_classes):
            bad = y[(y < 0) | (y >= self.num_classes)]
            raise self._damaged(
                f"{where}/labels has {len(bad)} value(s) outside [0, {self.num_classes}) (e.g. {int(bad[0])})"
            )
        views, view_rows = 0, ()
        if "views" in g:
            vshape = g["views"].shape
            if len(vshape) != 3 or vshape[1:] != feats.shape:
                raise self._damaged(f"{where}/views has shape {vshape}, expected [K, {capacity}, {feats.shape[1]}]")
            views = vshape[0]
            view_rows = self._view_rows(where, g, views, capacity, complete)
        return SplitInfo(name, rows, capacity, complete, str(feats.dtype), views, "paths" in g, view_rows)

    def _split_attrs(self, where: str, g: h5py.Group, capacity: int) -> tuple[int, bool]:
        """``rows`` and ``complete`` of a split, checked against each other, their types and ``capacity``."""
        rows, complete = (_plain(g.attrs.get(k, default)) for k, default in (("rows", capacity), ("complete", True)))
        if isinstance(rows, bool) or not isinstance(rows, int):
            raise self._damaged(f"{where}: attribute rows={rows!r} is a {type(rows).__name__}, expected an integer")
        if not isinstance(complete, bool):
            raise self._damaged(
                f"{where}: attribute complete={complete!r} is a {type(complete).__name__}, expected a boolean"
            )
        rows, complete = int(rows), bool(complete)
        if not 0 <= rows <= capacity:
            raise self._damaged(f"{where}: attribute rows={rows} outside [0, {capacity}]")
        if complete and rows != capacity:
            raise self._damaged(f"{where}: marked complete but attribute rows={rows} of {capacity} rows")
        return rows, complete

    def _view_rows(self, where: str, g: h5py.Group, views: int, capacity: int, complete: bool) -> tuple[int, ...]:
        """``view_rows`` (rows written of each view), checked like ``rows``; all rows when not recorded."""
        if "view_rows" not in g.attrs:
            return (capacity,) * views
        vr = np.asarray(g.attrs["view_rows"])
        if vr.shape != (views,) or not np.issubdtype(vr.dtype, np.integer):
            raise self._damaged(f"{where}: attribute view_rows={vr.tolist()!r} is not {views} integers (one per view)")
        if ((vr < 0) | (vr > capacity)).any() or (complete and (vr != capacity).any()):
            state = "marked complete but " if complete else ""
            raise self._damaged(f"{where}: {state}attribute view_rows={vr.tolist()} for {capacity} rows")
        return tuple(int(r) for r in vr)

    # -- reading --------------------------------------------------------------------------------
    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise self._fail(f"no split {split!r}; available: {', '.join(self.splits)}")
        return self.splits[split]

    def features(self, split: str, dtype: str = "float32", *, mmap: bool = False) -> torch.Tensor:
        """Features of ``split``, shape (N, D): float32 (float16 on disk is upcast), or with
        ``dtype="stored"`` the on-disk dtype (half the memory for float16 files; the heads upcast
        a block of rows at a time).

        ``mmap=True`` (stored dtype only): a tensor over the file's own pages (a copy-on-write
        ``numpy.memmap``; the file is never written), so the split takes no memory beyond the
        page cache, which the kernel reclaims under pressure: splits larger than memory work.
        Needs a contiguous, uncompressed dataset (what lt-rebalance writes); others are read.
        """
        info = self._split(split)
        with self._reading() as f:
            ds = f[f"splits/{split}/features"]
            if dtype == "float32" and ds.dtype != np.float32:
                return _read_rows_float32(ds, info.rows)
            mapped = _memmap_rows(self.path, ds, info.rows) if mmap else None
            return mapped if mapped is not None else _read_rows(ds, info.rows)

    def feature_bytes(self) -> int:
        """Bytes of every split's features in the stored dtype (what reading them all takes)."""
        return sum(s.rows * self.dim * np.dtype(s.dtype).itemsize for s in self.splits.values())

    def labels(self, split: str) -> torch.Tensor:
        """Labels of ``split`` as int64, shape (N,)."""
        import torch

        info = self._split(split)
        with self._reading() as f:
            return torch.from_numpy(np.asarray(f[f"splits/{split}/labels"][: info.rows], dtype=np.int64))

    def load(self, split: str, dtype: str = "float32", *, mmap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` of ``split``: (N, D) float32 (or the stored dtype, memory-mapped
        with ``mmap``, see :meth:`features`) and int64 (N,)."""
        return self.features(split, dtype, mmap=mmap), self.labels(split)

    def views(self, split: str = "train", k: Optional[int] = None, *, dtype: str = "float32") -> torch.Tensor:
        """The first ``k`` (default: all) augmented views of ``split``, shape (k, N, D).

        ``dtype="stored"`` keeps the on-disk dtype (halves memory for float16 files).
        """
        import torch

        info = self._split(split)
        if info.views == 0:
            raise self._fail(f"split {split!r} has no augmented views (extract with --train-views K)")
        k = info.views if k is None else k
        if not 1 <= k <= info.views:
            raise self._fail(f"asked for {k} views of split {split!r}, but only {info.views} are stored")
        short = [v for v in range(k) if info.view_rows[v] < info.rows]
        if short:
            full = sum(r >= info.rows for r in info.view_rows)
            use = f"use the {full} fully written view(s) (--views {full})" if full else "train without --views"
            raise self._fail(
                f"split {split!r}: augmented view(s) {short} have fewer rows written than the split's {info.rows} "
                f"(view rows {list(info.view_rows)}); finish the file with `ltr extract --resume`, or {use}"
            )
        with self._reading() as f:
            arr = f[f"splits/{split}/views"][:k, : info.rows]
        t = torch.from_numpy(arr)
        return t if dtype == "stored" else t.to(getattr(torch, dtype))

    def paths(self, split: str) -> Optional[list[str]]:
        info = self._split(split)
        if not info.has_paths:
            return None
        with self._reading() as f:
            return [_str_attr(p) for p in f[f"splits/{split}/paths"][: info.rows]]

    def head(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stored stage-1 classifier: weight float32 (C, D) and bias float32 (C,) or None."""
        import torch

        if not self.has_head:
            raise self._fail(
                "has no stored classifier (/head/weight); methods that need one (joint, tau-sweep, lws) "
                "cannot run, while ncm and crt work without it"
            )
        with self._reading() as f:
            w = torch.from_numpy(np.asarray(f["head/weight"][...], dtype=np.float32))
            b = torch.from_numpy(np.asarray(f["head/bias"][...], dtype=np.float32)) if self.has_bias else None
        return w, b

    def counts_tensor(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.counts.copy())

    def __repr__(self) -> str:
        splits = ", ".join(f"{s.name}={s.rows}" for s in self.splits.values())
        return f"FeatureStore({str(self.path)!r}, C={self.num_classes}, D={self.dim}, splits: {splits})"


def _read_rows_float32(ds: h5py.Dataset, rows: int, block_rows: int = 2048) -> torch.Tensor:
    """Read ``ds[:rows]`` as a float32 tensor with contiguous slab reads.

    float16 data is read in blocks into a reused, cache-sized buffer and upcast by torch, which is
    much faster than HDF5's own half-to-float conversion and keeps peak memory at one output array.
    The output is allocated by numpy, which asks the kernel for huge pages on large arrays
    (``torch.empty`` does not): first-touch page faults were a third of the read time.
    """
    import torch

    if ds.dtype == np.float32:
        return _read_rows(ds, rows)
    out = torch.from_numpy(np.empty((rows, ds.shape[1]), dtype=np.float32))
    buf = np.empty((min(block_rows, max(rows, 1)), ds.shape[1]), dtype=ds.dtype)
    for start in range(0, rows, block_rows):
        n = min(block_rows, rows - start)
        ds.read_direct(buf, np.s_[start : start + n], np.s_[:n])
        out[start : start + n].copy_(torch.from_numpy(buf[:n]))
    return out


def _memmap_rows(path: Path, ds: h5py.Dataset, rows: int) -> Optional[torch.Tensor]:
    """``ds[:rows]`` as a tensor over the file's pages, or None when ``ds`` cannot be mapped
    (chunked, compressed, not yet allocated, or empty)."""
    import torch

    offset = ds.id.get_offset()
    if ds.chunks is not None or ds.compression is not None or offset is None or rows == 0:
        return None
    return torch.from_numpy(np.memmap(path, dtype=ds.dtype, mode="c", offset=offset, shape=(rows, ds.shape[1])))


def _read_rows(ds: h5py.Dataset, rows: int) -> torch.Tensor:
    """``ds[:rows]`` in the stored dtype, read straight into one array (no conversion, no copy)."""
    import torch

    out = np.empty((rows, ds.shape[1]), dtype=ds.dtype)
    if rows:
        ds.read_direct(out, np.s_[:rows], np.s_[:rows])
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Versions recorded in the ``created_with`` attribute."""
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

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
        f = h5py.File(path, "w-")
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
            counts = _to_numpy(counts, "int64")
            if counts.ndim != 1 or counts.size == 0:
                raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
            f.create_dataset("classes/counts", data=counts)
            if class_names is not None:
                if len(class_names) != len(counts):
                    raise ValueError(f"{len(class_names)} class names for {len(counts)} classes")
                f.create_dataset("classes/names", data=list(class_names), dtype=h5py.string_dtype())
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

    return atomic_write(path, write, overwrite)


def _root_kwargs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    known = {"checkpoint_sha256", "transform"}
    out: dict[str, Any] = {k: attrs[k] for k in known if k in attrs}
    extra = {k: v for k, v in attrs.items() if k not in known}
    if extra:
        out["extra_attrs"] = extra
    return out
