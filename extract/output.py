"""Safe output handling: ``OUT.partial`` + lock file, resume checks, bad-image records, split shrinking."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from lt_rebalance.integrity import record_checksums
from lt_rebalance.store import FeatureFileWriter
from lt_rebalance.store.untrusted import outside_storage

FINGERPRINT_ATTR = "extract_fingerprint"


def partial_path(out: str | os.PathLike) -> Path:
    return Path(f"{out}.partial")


_HELD: set[str] = set()  # lock files held by this process


@contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive POSIX lock on ``target.lock``; refuse if another extraction holds it.

    POSIX (``lockf``) locks belong to the process: DataLoader workers forked while it is held do not
    inherit it, and the kernel drops it when the holder dies (even by SIGKILL), so a stale lock file
    never blocks. ``_HELD`` refuses a second extraction inside the same process.
    """
    lock = Path(f"{target}.lock")
    key = str(lock.resolve())
    while True:
        fd = _open_lock(lock)
        try:
            if key in _HELD:
                raise BlockingIOError
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(
                f"another extraction (pid {holder}) is writing {target}; wait for it or stop it first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file we locked: lock the one at the path
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    _HELD.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:  # removed on failure too (while still held), so a failed run leaves no file behind
        lock.unlink(missing_ok=True)
        _HELD.discard(key)
        os.close(fd)


def _open_lock(lock: Path) -> int:
    """Open (create) the lock file without following a link: a symlink planted at ``OUT.lock`` would
    otherwise have its target truncated. A link, or anything but a regular file, is refused."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise FileExistsError(f"{lock} is a symbolic link (to {os.readlink(lock)}); the extraction's lock file is "
                              "never opened through a link: remove the link, then retry") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileExistsError(f"{lock} is not a regular file; the extraction's lock file must be one: remove it, "
                              "then retry")
    return fd


def resume_partial(target: str | os.PathLike, fingerprint: Mapping[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """True when ``target.partial`` exists and is to be resumed (its fingerprint must match);
    False when a fresh one must be created (a leftover one is deleted only with ``overwrite``)."""
    partial = partial_path(target)
    if not partial.exists():
        return False
    if resume:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                stored = json.loads(f.attrs.get(FINGERPRINT_ATTR, "{}"))
                outside = outside_storage(f, limit=1)
        except OSError as e:
            raise ValueError(f"{partial} cannot be resumed ({e}); pass --overwrite to start over") from None
        if outside:
            raise ValueError(f"{partial} cannot be resumed: {outside[0]}, and resuming would write there; "
                             "pass --overwrite to start over")
        expected = json.loads(json.dumps(fingerprint))  # same JSON normal form as stored
        diff = sorted(k for k in expected.keys() | stored.keys() if stored.get(k) != expected.get(k))
        if diff:
            raise ValueError(
                f"{partial} was started with different settings ({', '.join(diff)}); rerun with the same "
                "options, or pass --overwrite to start over"
            )
        return True
    if overwrite:
        partial.unlink()
        return False
    raise FileExistsError(
        f"{partial} is left from an interrupted extraction; pass --resume to continue it or --overwrite to start over"
    )


def open_writer(partial: Path) -> FeatureFileWriter:
    """Open ``partial`` for appending without HDF5's own file lock.

    DataLoader workers forked later inherit the descriptor and may outlive a killed extractor by a few
    seconds; an HDF5 lock on it would block ``--resume`` meanwhile. :func:`output_lock` guards writers.
    """
    w = FeatureFileWriter(h5py.File(partial, "r+", locking=False))
    repair_shrink(w.file)
    return w


# -- bad images -------------------------------------------------------------------------------------
def bad_indices(g: h5py.Group) -> np.ndarray:
    """Source indices recorded as unreadable in split group ``g`` (int64, increasing)."""
    return np.asarray(g["bad_indices"][...], dtype=np.int64) if "bad_indices" in g else np.zeros(0, np.int64)


def drop_skipped_from_counts(w: FeatureFileWriter, block: int = 1 << 20) -> None:
    """After ``--skip-bad`` left train images out, make ``/classes/counts`` the histogram of the train
    labels written (the counts a run publishes must not include images that are not in the file).
    Idempotent (a resumed run may call it again); leaves counts alone when no train image was skipped."""
    f = w.file
    if "splits/train" not in f or not len(bad_indices(f["splits/train"])):
        return
    labels, counts = f["splits/train/labels"], np.asarray(f["classes/counts"][...], dtype=np.int64)
    hist = np.zeros(len(counts), dtype=np.int64)
    for start in range(0, labels.shape[0], block):
        hist += np.bincount(labels[start : start + block], minlength=len(counts))[: len(counts)]
    if (hist == counts).all():
        return
    f["classes/counts"][...] = hist
    record_checksums(f["classes"])
    f.flush()


def bad_paths(g: h5py.Group) -> list[str]:
    n = len(bad_indices(g))  # bad_paths may hold an unfinished record past the indices
    return [p.decode() if isinstance(p, bytes) else str(p) for p in g["bad_paths"][:n]] if n else []


def record_bad(g: h5py.Group, indices: np.ndarray, names: list[str]) -> None:
    """Append to ``bad_indices``/``bad_paths`` (resizable) and flush."""
    if "bad_indices" not in g:
        g.create_dataset("bad_indices", shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
        g.create_dataset("bad_paths", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
    n = g["bad_indices"].shape[0]
    for key, values in (("bad_paths", names), ("bad_indices", indices)):  # indices last: they mark the record
        g[key].resize((n + len(indices),))
        g[key][n:] = values
    g.file.flush()


def resume_position(num_items: int, rows: int, bad: np.ndarray) -> int:
    """Source index after the ``rows``-th readable item (rows written + recorded bad items before it)."""
    if rows == 0:
        return 0
    good = np.ones(num_items, dtype=np.int64)
    good[bad] = 0
    return int(np.searchsorted(np.cumsum(good), rows)) + 1


def shrink_split(w: FeatureFileWriter, name: str, rows: int, block: int = 8192) -> None:
    """Rewrite split ``name`` with capacity ``rows`` (after --skip-bad left rows unused), copying in blocks."""
    f = w.file
    g, tmp = f[f"splits/{name}"], f"{name}.shrunk"
    if f"splits/{tmp}" in f:
        del f[f"splits/{tmp}"]
    feats = g["features"]
    views = g["views"].shape[0] if "views" in g else 0
    w.create_split(tmp, rows, feats.shape[1], dtype=str(feats.dtype), views=views, with_paths="paths" in g)
    t = f[f"splits/{tmp}"]
    for start in range(0, rows, block):
        sl = slice(start, min(rows, start + block))
        for key in ("features", "labels", "paths"):
            if key in g:
                t[key][sl] = g[key][sl]
        if views:
            t["views"][:, sl] = g["views"][:, sl]
    for key in ("bad_indices", "bad_paths"):
        f.copy(g[key], t, key)
    for key, value in g.attrs.items():
        t.attrs[key] = value
    t.attrs["rows"] = rows
    if views:
        t.attrs["view_rows"] = np.full(views, rows, dtype=np.int64)
    f.flush()
    del f[f"splits/{name}"]
    f.move(f"splits/{tmp}", f"splits/{name}")
    f.flush()


def repair_shrink(f: h5py.File) -> None:
    """Finish or undo a :func:`shrink_split` interrupted by a crash."""
    for key in [k for k in f["splits"] if k.endswith(".shrunk")]:
        name = key[: -len(".shrunk")]
        if name in f["splits"]:
            del f[f"splits/{key}"]  # copy was incomplete: redo it later
        else:
            f.move(f"splits/{key}", f"splits/{name}")  # copy was complete, only the move was left
    f.flush()
