"""Full verification of a feature file (``ltr check``): every check reads what it needs, in blocks."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import h5py
import numpy as np

from .store import FeatureFileError, FeatureStore, PathLike

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
    """Run every check on ``path``; the file is never modified."""
    try:
        store = FeatureStore(path, allow_incomplete=True)
    except FeatureFileError as e:
        return [Check("schema", False, e.problem)]
    checks = [Check("schema", True, f"format lt-rebalance/features v{store.format_version}, "
                                    f"C = {store.num_classes}, D = {store.dim}")]
    with h5py.File(store.path, "r") as f:
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
            y = f["splits/train/labels"][: store.splits["train"].rows]
            hist = np.bincount(y, minlength=store.num_classes)
            diff = np.flatnonzero(hist != store.counts)
            checks.append(Check("counts = train label histogram", len(diff) == 0,
                                "equal" if len(diff) == 0 else f"{len(diff)} classes differ, e.g. class {diff[0]}: "
                                f"counts {store.counts[diff[0]]} vs {hist[diff[0]]} train rows"))
        if store.has_head:
            bad = sum(int((~np.isfinite(f[k][...])).sum()) for k in ("head/weight", "head/bias") if k in f)
            checks.append(Check("head finite", bad == 0, f"{bad} NaN/Inf values"))
    return checks


def _check_dtypes(f: h5py.File, store: FeatureStore) -> Check:
    wrong = []
    if f["classes/counts"].dtype != np.int64:
        wrong.append(f"/classes/counts is {f['classes/counts'].dtype}")
    for name in store.splits:
        if f[f"splits/{name}/labels"].dtype != np.int64:
            wrong.append(f"/splits/{name}/labels is {f[f'splits/{name}/labels'].dtype}")
    for k in ("head/weight", "head/bias"):
        if k in f and f[k].dtype != np.float32:
            wrong.append(f"/{k} is {f[k].dtype}")
    return Check("dtypes", not wrong, "; ".join(wrong) or "as in the schema")
