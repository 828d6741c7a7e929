"""Benchmark shapes and the synthetic feature files, written once through the store and cached.

Per-class train counts: ImageNet-LT and Places-LT use the real counts of
``../shared/data/class_counts.json`` when present, else a Pareto-like formula with the same
number of classes, total, largest and smallest class; iNaturalist 2018 always uses the formula.

The features imitate pooled CNN features (non-negative, class structure plus noise) and the stored
joint classifier has row norms that grow with the class size, as a jointly trained one does;
what matters for speed is the shape, but this keeps the logits as peaked as real ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COUNTS_FILE = REPO.parent / "shared" / "data" / "class_counts.json"
DATA_VERSION = 2  # bump when the generator changes (invalidates cached files); 2: files carry checksums


@dataclass(frozen=True)
class Scale:
    name: str
    num_classes: int
    dim: int
    train: int  # rows (sum of the counts)
    val_per_class: int
    test_per_class: int  # 0: no test split (iNaturalist)
    counts_key: Optional[str] = None  # key in class_counts.json
    n_max: int = 1280
    n_min: int = 5
    count_divisor: int = 1  # scale the counts down (small): max(1, round(n / divisor))
    description: str = ""

    @property
    def val(self) -> int:
        return self.val_per_class * self.num_classes

    @property
    def test(self) -> int:
        return self.test_per_class * self.num_classes


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", 20, 32, 600, 3, 5, None, 100, 5, description="smoke-test shape"),
    "small": Scale(
        "small", 1000, 512, 115_846, 5, 12, "imagenet_lt", count_divisor=4,
        description="ImageNet-LT counts / 4, D 512",
    ),
    "imagenet_lt": Scale("imagenet_lt", 1000, 2048, 115_846, 20, 50, "imagenet_lt", description="ImageNet-LT"),
    "places_lt": Scale("places_lt", 365, 2048, 62_500, 20, 100, "places_lt", 4980, 5, description="Places-LT"),
    "inat2018": Scale("inat2018", 8142, 2048, 437_513, 3, 0, None, 1000, 2, description="iNaturalist 2018"),
}


def pareto_counts(num_classes: int, total: int, n_max: int, n_min: int) -> np.ndarray:
    """Decreasing counts n_j = max(n_min, round(n_max (j+1)^-a)) with a chosen so that they sum to ~total."""
    j = np.arange(1, num_classes + 1, dtype=np.float64)

    def counts(a: float) -> np.ndarray:
        return np.maximum(n_min, np.round(n_max * j**-a)).astype(np.int64)

    lo, hi = 0.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() > total else (lo, mid)
    c = counts(hi)
    # spread the remainder over the largest classes so the total is exact
    diff = total - int(c.sum())
    c[: abs(diff)] += np.sign(diff)
    return c


def class_counts(scale: Scale) -> tuple[np.ndarray, str]:
    """Per-class train counts and where they came from."""
    source = "formula (Pareto-like)"
    counts = None
    if scale.counts_key and COUNTS_FILE.exists():
        try:
            counts = np.asarray(json.loads(COUNTS_FILE.read_text())[scale.counts_key], dtype=np.int64)
            source = f"{COUNTS_FILE.name}[{scale.counts_key}]"
        except (OSError, ValueError, KeyError):
            counts = None
    if counts is None or len(counts) != scale.num_classes:
        counts = pareto_counts(scale.num_classes, scale.train, scale.n_max, scale.n_min)
        counts = np.random.default_rng(0).permutation(counts)  # class order carries no meaning
    if scale.count_divisor > 1:
        counts = np.maximum(1, np.round(counts / scale.count_divisor)).astype(np.int64)
        source += f" / {scale.count_divisor}"
    return counts, source


def shapes(scale: Scale, counts: np.ndarray) -> dict:
    out = {"train": int(counts.sum()), "val": scale.val}
    if scale.test:
        out["test"] = scale.test
    return {"splits": out, "dim": scale.dim, "num_classes": scale.num_classes}


def _labels(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def _features(mu: np.ndarray, y: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    x = mu[y] + noise * rng.standard_normal((len(y), mu.shape[1]), dtype=np.float32)
    return np.maximum(x, 0, out=x)


def feature_file(scale: Scale, folder: Path, dtype: str = "float16", log=print) -> Path:
    """The cached synthetic feature file of ``scale`` (written on first use)."""
    from lt_rebalance.store import FeatureFileError, FeatureFileWriter, FeatureStore

    counts, source = class_counts(scale)
    path = folder / f"{scale.name}-v{DATA_VERSION}-{dtype}.h5"
    meta = {"scale": asdict(scale), "counts_source": source, "data_version": DATA_VERSION}
    if path.exists():
        try:
            st = FeatureStore(path)
            if json.loads(st.attrs.get("benchmark", "{}")) == meta and np.array_equal(st.counts, counts):
                return path
        except (FeatureFileError, ValueError):
            pass
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    C, D = scale.num_classes, scale.dim
    rng = np.random.default_rng(1234)
    mu = (rng.standard_normal((C, D), dtype=np.float32) * 0.5 + 0.3).astype(np.float32)
    centred = mu - mu.mean(0)
    # norms grow with the class size, like a jointly trained classifier's
    norms = (counts / np.median(counts)) ** 0.25
    weight = (centred / np.linalg.norm(centred, axis=1, keepdims=True) * norms[:, None] * 0.5).astype(np.float32)
    bias = (0.05 * np.log(counts / counts.mean())).astype(np.float32)
    sizes = shapes(scale, counts)["splits"]
    labels = {"train": _labels(counts, rng)}
    for split, per in (("val", scale.val_per_class), ("test", scale.test_per_class)):
        if per:
            labels[split] = _labels(np.full(C, per), rng)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    log(f"writing synthetic features {path} ({sizes}, D={D}, C={C}) ...")
    try:
        with FeatureFileWriter.create(
            tmp, counts=counts, model="synthetic", dataset=scale.name, extra_attrs={"benchmark": json.dumps(meta)}
        ) as w:
            w.set_head(weight, bias)
            block = max(1, 2**24 // D)
            for split, y in labels.items():
                w.create_split(split, len(y), D, dtype=dtype)
                for start in range(0, len(y), block):
                    yb = y[start : start + block]
                    w.append(split, _features(mu, yb, rng, 2.5), yb)
                w.mark_complete(split)
        FeatureStore(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
