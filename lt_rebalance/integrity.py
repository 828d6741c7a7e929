"""Checksums of the stored datasets (docs/FORMAT.md, "Checksums").

Every dataset of a feature file may carry an attribute ``sha256``: the hex SHA-256 of its values in a
canonical byte form (:func:`dataset_sha256`). Writers record it when a dataset is final (the
``/classes`` and ``/head`` datasets when written, a split's datasets when the split is marked
complete); ``ltr check`` recomputes and compares (:func:`verify_checksums`). Reading a file never
looks at them, so the normal read path costs nothing extra.

Canonical bytes: numbers as little-endian values of the stored dtype in C order (for contiguous
datasets these are the stored bytes themselves); strings as, per element, the 8-byte little-endian
length of its UTF-8 encoding followed by that encoding.

A writer that appends in order feeds a :class:`StreamDigest` as it goes, so the common case hashes
data that is already in memory; anything else (a resumed file, a copy written in blocks) is hashed
from disk when the split is finalised.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import h5py
import numpy as np

ATTR = "sha256"
BLOCK_BYTES = 16 << 20  # bytes per block read from disk when hashing


def _is_string(dtype: np.dtype) -> bool:
    return h5py.check_string_dtype(dtype) is not None or dtype.kind in ("O", "S", "U")


def _update(h: Any, values: Any, dtype: np.dtype) -> None:
    """Feed ``values`` (an array or a list of strings/bytes) to ``h`` in canonical form."""
    if _is_string(dtype):
        for v in np.asarray(values, dtype=object).reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        a = np.ascontiguousarray(values, dtype=dtype.newbyteorder("<"))
        if a.size:
            h.update(memoryview(a).cast("B"))


def _blocks(ds: h5py.Dataset) -> Iterator[np.ndarray]:
    """The values of ``ds`` in C order, in blocks of about :data:`BLOCK_BYTES` (rows of the last two axes)."""
    if ds.ndim == 0:
        yield np.asarray(ds[()])
        return
    lead = ds.shape[:-2] if ds.ndim > 2 else ()
    row_bytes = max(1, int(np.prod(ds.shape[len(lead) + 1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    n = ds.shape[len(lead)]
    for index in np.ndindex(*lead):
        for start in range(0, n, step):
            yield ds[(*index, slice(start, min(n, start + step)))]


def dataset_sha256(ds: h5py.Dataset) -> str:
    """Hex SHA-256 of the canonical bytes of every value of ``ds`` (read from disk in blocks)."""
    h = hashlib.sha256()
    for block in _blocks(ds):
        _update(h, block, ds.dtype)
    return h.hexdigest()


def _datasets(obj: h5py.Group) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    obj.visititems(lambda _, o: found.append(o) if isinstance(o, h5py.Dataset) else None)
    return found


def record_checksums(obj: h5py.Group, known: Optional[dict[str, str]] = None) -> None:
    """Set the ``sha256`` attribute of every dataset under ``obj`` (a file or a group).

    ``known`` maps dataset names (``ds.name``) to digests already computed as the data was written;
    the others are hashed from disk.
    """
    known = known or {}
    for ds in _datasets(obj):
        ds.attrs[ATTR] = known.get(ds.name) or dataset_sha256(ds)


@dataclass
class StreamDigest:
    """SHA-256 of a dataset fed in storage order: ``feed(position, values)`` with position in rows of
    the flattened leading axes (row r of view k of a (K, N, D) dataset is k * N + r).

    A write out of order makes the digest unusable (``valid`` False): the writer then hashes from disk.
    """

    dtype: np.dtype
    position: int = 0
    valid: bool = True
    _h: Any = field(default_factory=hashlib.sha256, repr=False)

    def feed(self, position: int, values: Any) -> None:
        if not self.valid or position != self.position:
            self.valid = False
            return
        _update(self._h, values, self.dtype)
        self.position += len(values)

    def hexdigest(self, total_rows: int) -> Optional[str]:
        """The digest when exactly ``total_rows`` rows were fed in order, else None."""
        return self._h.hexdigest() if self.valid and self.position == total_rows else None


@dataclass(frozen=True)
class ChecksumReport:
    """What :func:`verify_checksums` found: dataset names per outcome."""

    verified: list[str]
    mismatched: list[str]
    missing: list[str]  # datasets without a checksum that should have one


def verify_checksums(f: h5py.File, incomplete_splits: tuple[str, ...] = ()) -> ChecksumReport:
    """Recompute every recorded ``sha256`` of ``f``.

    Datasets without one are ``missing`` when the file records checksums elsewhere, except those of
    ``incomplete_splits`` (recorded only when a split is complete). A file with no checksum at all
    (schema v1 as first written) reports nothing missing.
    """
    verified, mismatched, unrecorded = [], [], []
    for ds in _datasets(f):
        stored = ds.attrs.get(ATTR)
        if stored is None:
            unrecorded.append(ds.name)
            continue
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        (verified if dataset_sha256(ds) == stored else mismatched).append(ds.name)
    skip = tuple(f"/splits/{s}/" for s in incomplete_splits)
    missing = [n for n in unrecorded if not n.startswith(skip)] if verified or mismatched else []
    return ChecksumReport(verified, mismatched, missing)
