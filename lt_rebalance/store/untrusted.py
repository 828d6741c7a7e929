"""Checks for files from strangers, made before anything is read (docs/BAD_INPUTS.md, issue 24).

- :func:`outside_storage`: HDF5 objects whose data lives outside the file (external links, external
  raw storage, virtual datasets) would be read, and on resume written, wherever they point.
- :func:`declared_size_problem`: a small file can declare a dataset of terabytes; its size is
  checked against the bytes the file actually stores before a read allocates it.
- :func:`npz_members`: the shapes an ``.npz`` archive declares, read from the ``.npy`` headers
  without inflating the arrays (a small archive can expand to gigabytes).
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from typing import Optional

import h5py
import numpy as np

from ..memory import gib

# deflate cannot compress beyond ~1032:1 and LZF far less; shuffle and fletcher32 do not compress.
# Data declared larger than this many times its stored bytes cannot be in the file.
_MAX_RATIO = {h5py.h5z.FILTER_DEFLATE: 1100, h5py.h5z.FILTER_SHUFFLE: 1, h5py.h5z.FILTER_FLETCHER32: 1,
              h5py.h5z.FILTER_LZF: 1100}


def outside_storage(f: h5py.File, limit: int = 10) -> list[str]:
    """Objects of ``f`` whose data lives outside it, one description each (at most ``limit``):
    ``/x is an external link to other.h5:/y``, ``/x stores its data outside this file (in raw.bin)``,
    ``/x is a virtual dataset mapping data of a.h5, b.h5``. Soft links stay inside the file and are
    not followed (their target is visited where it lives)."""
    found: list[str] = []
    seen: set[int] = set()

    def walk(g: h5py.Group, depth: int) -> None:
        if depth > 64:
            return
        for name in g:
            if len(found) >= limit:
                return
            where = f"{g.name.rstrip('/')}/{name}"
            link = g.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                found.append(f"{where} is an external link to {link.filename}:{link.path}")
                continue
            if isinstance(link, h5py.SoftLink):
                continue
            obj = g.get(name)
            key = hash(obj.id)
            if key in seen:  # hard-linked twice (or a cycle)
                continue
            seen.add(key)
            if isinstance(obj, h5py.Group):
                walk(obj, depth + 1)
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    files = sorted({s.file_name for s in obj.virtual_sources()})
                    found.append(f"{where} is a virtual dataset mapping data of {', '.join(files)}")
                elif obj.external:
                    files = sorted({_text(e[0]) for e in obj.external})
                    found.append(f"{where} stores its data outside this file (in {', '.join(files)})")

    walk(f, 0)
    return found


def _text(name) -> str:
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def declared_bytes(ds: h5py.Dataset, rows: Optional[int] = None) -> int:
    """Bytes of the first ``rows`` rows (default: all) of ``ds`` as stored (file type size)."""
    rows = ds.shape[0] if rows is None and ds.shape else (rows or 0)
    per_row = math.prod(ds.shape[1:]) if ds.ndim > 1 else 1
    if ds.ndim == 0:
        rows = 1
    return int(rows) * per_row * ds.id.get_type().get_size()


def declared_size_problem(ds: h5py.Dataset, rows: Optional[int] = None) -> Optional[str]:
    """Why the first ``rows`` rows of ``ds`` cannot be what the file holds, or None.

    Uncompressed data must have at least its declared bytes allocated in the file; compressed data
    (deflate, LZF) at least 1/1100 of them. Other filters are not judged (their data is read in blocks).
    """
    need = declared_bytes(ds, rows)
    if need == 0:
        return None
    plist = ds.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if any(code not in _MAX_RATIO for code in filters):
        return None
    ratio = max([_MAX_RATIO[code] for code in filters], default=1)
    stored = ds.id.get_storage_size()
    if stored * ratio >= need:
        return None
    shape = " x ".join(str(n) for n in ((rows,) + tuple(ds.shape[1:]) if rows is not None else ds.shape))
    return (f"{ds.name} declares {shape} {ds.dtype} ({gib(need)}) but the file stores only {gib(stored)} of it: "
            "the file is truncated or crafted")


@dataclass(frozen=True)
class NpzMember:
    name: str  # array name (without .npy)
    shape: tuple
    dtype: np.dtype
    declared: int  # bytes the array takes once loaded
    stored: int  # uncompressed bytes the archive says the member holds


def npz_members(path: str) -> list[NpzMember]:
    """The arrays of an ``.npz`` archive as their ``.npy`` headers declare them (nothing inflated
    beyond the headers). Raises ValueError for a member that is not a plain ``.npy`` array."""
    out = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f"{info.filename}: unsupported .npy version {version}")
                shape, _, dtype = reader(f)
                header = f.tell()
            size = math.prod(shape) * dtype.itemsize if not dtype.hasobject else 0
            out.append(NpzMember(info.filename[:-4], tuple(shape), dtype, int(size), int(info.file_size) - header))
    return out
