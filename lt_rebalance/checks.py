"""Full verification of a feature file (``ltr check``): every check reads what it needs, in blocks."""
from __future__ import annotations

import multiprocessing
import signal
from dataclasses import asdict, dataclass
from typing import Iterator

import h5py
import numpy as np

from .integrity import verify_checksums
from .store import DAMAGE_ERRORS, REMAKE_HINT, FeatureFileError, FeatureStore, PathLike

BLOCK_ROWS = 16384


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def _blocks(ds: h5py.Dataset, rows: int) -> Iterator[np.ndarray]:
    for start in range(0, rows, BLOCK_ROWS):
        yield ds[start : min(start + BLOCK_ROWS, rows)]


def _finite_rows(ds: h5py.Dataset, rows: int) -> int:
    """Number of rows of ``ds[:rows]`` (2-D) holding a NaN or Inf."""
    return sum(int((~np.isfinite(block)).any(axis=1).sum()) for block in _blocks(ds, rows))


def verify(path: PathLike) -> list[Check]:
    """Run every check on ``path``; the file is never modified.

    A file whose HDF5 structure breaks while it is read (damaged metadata) ends the list with one
    failed ``readable`` check.
    """
    try:
        store = FeatureStore(path, allow_incomplete=True)
    except FeatureFileError as e:
        return [Check("schema", False, e.problem)]
    checks = [Check("schema", True, f"format lt-rebalance/features v{store.format_version}, "
                                    f"C = {store.num_classes}, D = {store.dim}")]
    with store:
        try:
            _verify_contents(store, checks)
        except DAMAGE_ERRORS as e:
            checks.append(Check("readable", False, f"damaged HDF5 file, reading failed ({e}); {REMAKE_HINT}"))
    return checks


def _verify_to(path: PathLike, conn) -> None:
    import faulthandler

    faulthandler.disable()  # a crash is reported by the parent, as one failed check
    conn.send(verify(path))
    conn.close()


def verify_isolated(path: PathLike) -> list[Check]:
    """:func:`verify` in a forked child process, so that the HDF5 library crashing on damaged metadata
    (a segmentation fault, which no exception handler can catch) becomes one failed ``readable`` check."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_verify_to, args=(path, send), daemon=True)
    child.start()
    send.close()
    try:
        checks = receive.recv()
    except EOFError:  # the child died before it could answer
        checks = None
    child.join()
    if checks is None:
        code = child.exitcode or 0
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return [Check("readable", False, f"the HDF5 library crashed reading it ({cause}): the file is damaged; "
                                         f"{REMAKE_HINT}")]
    return checks


def _checksums(f: h5py.File, store: FeatureStore) -> Check:
    """Recorded SHA-256 of every dataset against the stored bytes (lt_rebalance.integrity)."""
    report = verify_checksums(f, tuple(s.name for s in store.splits.values() if not s.complete))
    if report.mismatched:
        return Check("checksums", False, f"{len(report.mismatched)} dataset(s) differ from the SHA-256 recorded "
                                         f"when written: {', '.join(report.mismatched[:4])} (the stored bytes "
                                         f"changed: the file is damaged); {REMAKE_HINT}")
    if report.missing:
        return Check("checksums", False, f"{len(report.missing)} dataset(s) of a finished file have no checksum: "
                                         f"{', '.join(report.missing[:4])} (changed after it was written); {REMAKE_HINT}")
    if not report.verified:
        return Check("checksums", True, "no checksums recorded (a file written before lt-rebalance recorded "
                                        "them, or by another tool): the stored bytes cannot be verified")
    return Check("checksums", True, f"{len(report.verified)} datasets match their recorded SHA-256")


def _verify_contents(store: FeatureStore, checks: list[Check]) -> None:
    f = store.file
    checks.append(_checksums(f, store))
    checks.append(_check_dtypes(f, store))
    for info in store.splits.values():
        g = f[f"splits/{info.name}"]
        checks.append(Check(f"{info.name}: complete", info.complete and info.rows == info.capacity,
                            f"{info.rows}/{info.capacity} rows written"))
        y = g["labels"][: info.rows]
        bad = int(((y < 0) | (y >= store.num_classes)).sum())
        checks.append(Check(f"{info.name}: labels in [0, C)", bad == 0, f"{bad} out of range"))
        n_bad = _finite_rows(g["features"], info.rows)
        checks.append(Check(f"{info.name}: features finite", n_bad == 0, f"{n_bad} rows with NaN/Inf"))
        if info.has_paths:
            n_paths = g["paths"].shape[0]
            checks.append(Check(f"{info.name}: paths", n_paths == info.capacity,
                                f"{n_paths} paths for {info.capacity} rows"))
        if info.views:
            v = g["views"]
            n_bad = sum(_finite_rows(v[k], info.rows) for k in range(info.views))
            checks.append(Check(f"{info.name}: views", n_bad == 0,
                                f"{info.views} views of shape {v.shape[1:]}, {n_bad} rows with NaN/Inf"))
    if "train" in store.splits:
        y = np.asarray(f["splits/train/labels"][: store.splits["train"].rows]).astype(np.int64)  # whole (checked on opening)
        hist = np.bincount(y, minlength=store.num_classes)
        diff = np.flatnonzero(hist != store.counts)
        checks.append(Check("counts = train label histogram", len(diff) == 0,
                            "equal" if len(diff) == 0 else f"{len(diff)} classes differ, e.g. class {diff[0]}: "
                            f"counts {store.counts[diff[0]]} vs {hist[diff[0]]} train rows"))
    if store.has_head:
        bad = sum(int((~np.isfinite(f[k][...])).sum()) for k in ("head/weight", "head/bias") if k in f)
        checks.append(Check("head finite", bad == 0, f"{bad} NaN/Inf values"))
    if "text_head" in f:
        from .text_store import text_head_problem

        problem = text_head_problem(f, store.num_classes, store.dim)
        checks.append(Check("text head", problem is None, problem or "(C, D) float32, unit rows"))


def _check_dtypes(f: h5py.File, store: FeatureStore) -> Check:
    wrong, readable = [], []
    if f["classes/counts"].dtype != np.int64:
        wrong.append(f"/classes/counts is {f['classes/counts'].dtype}")
    for name in store.splits:
        dtype = f[f"splits/{name}/labels"].dtype
        if dtype.kind == "f":  # whole numbers (checked on opening): read as class indices
            readable.append(f"/splits/{name}/labels")
        elif dtype != np.int64:
            wrong.append(f"/splits/{name}/labels is {dtype}")
    for k in ("head/weight", "head/bias"):
        if k in f and f[k].dtype != np.float32:
            wrong.append(f"/{k} is {f[k].dtype}")
    if readable and not wrong:
        return Check("dtypes", True, f"{', '.join(readable)} stored as floats holding whole numbers: read as class "
                                     "indices (the schema stores int64, as `ltr import` writes)")
    return Check("dtypes", not wrong, "; ".join(wrong) or "as in the schema")
