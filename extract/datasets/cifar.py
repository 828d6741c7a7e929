"""CIFAR-10/100-LT from the official python pickles, with LDAM-DRW's long-tailed selection."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .sources import ArraySource

CIFAR_LAYOUT = {
    # name -> (folder, train files, test file, label key, meta file, names key)
    "cifar10_lt": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                   b"labels", "batches.meta", b"label_names"),
    "cifar100_lt": ("cifar-100-python", ["train"], "test", b"fine_labels", "meta", b"fine_label_names"),
}


# the only globals the official batch files (and numpy's own pickles of arrays) refer to
_ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | {
    (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | {
    ("numpy", "ndarray"), ("numpy", "dtype")}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays only: a crafted batch file cannot name
    any other class or function (plain ``pickle.load`` would run whatever it names)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch file never holds")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (--root must hold the official python-pickle folder {path.parent.name}/)")
    try:
        with open(path, "rb") as f:
            doc = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        truncated = isinstance(e, EOFError) or "truncated" in str(e)
        cause = "truncated (an interrupted download?)" if truncated else f"not an official CIFAR batch ({e})"
        raise ValueError(f"{path}: {cause}; download and unpack the official python version again") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not an official CIFAR batch (holds a {type(doc).__name__}, not a dict); "
                         "download and unpack the official python version again")
    return doc


def read_cifar_batches(paths: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate pickled batches -> images uint8 (N, 32, 32, 3), labels int64 (N,)."""
    batches = [_unpickle(p) for p in paths]
    for p, b in zip(paths, batches):
        if b"data" not in b or label_key not in b:
            raise ValueError(f"{p}: not an official CIFAR batch (no {b'data'!r} or {label_key!r}); download and "
                             "unpack the official python version again")
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """n_i = int(n_max * (1/IF) ** (i / (C - 1))), as LDAM-DRW's get_img_num_per_cls."""
    return np.array([int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)])


def lt_indices(labels: np.ndarray, imbalance: float) -> np.ndarray:
    """Indices of the long-tailed subset, exactly LDAM-DRW: seed 0, per class shuffle, keep the first n_i."""
    classes = np.unique(labels)
    counts = lt_counts(len(labels) // len(classes), len(classes), imbalance)
    rng = np.random.RandomState(0)  # == np.random.seed(0) then np.random.shuffle
    keep = []
    for c, n in zip(classes, counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def balanced_val_indices(labels: np.ndarray, used: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Up to ``per_class`` unused indices per class (seeded); also the classes that had fewer."""
    unused = np.ones(len(labels), dtype=bool)
    unused[used] = False
    rng = np.random.default_rng(seed)
    picks, short = [], []
    for c in np.unique(labels):
        pool = np.where(unused & (labels == c))[0]
        if len(pool) < per_class:
            short.append(int(c))
        picks.append(rng.permutation(pool)[:per_class])
    return np.sort(np.concatenate(picks)), short


def load_cifar_splits(
    name: str, root: str | os.PathLike, splits: list[str], *, imbalance: float, val_per_class: int, seed: int
) -> tuple[dict[str, ArraySource], np.ndarray, list[str], list[int]]:
    """-> (split sources, train counts (C,), class names, classes with a short val set)."""
    folder, train_files, test_file, label_key, meta_file, names_key = CIFAR_LAYOUT[name]
    base = Path(root) / folder
    unknown = [s for s in splits if s not in ("train", "val", "test")]
    if unknown:
        raise ValueError(f"{name} has no split(s) {unknown}; available: train, val, test")
    images, labels = read_cifar_batches([base / f for f in train_files], label_key)
    keep = lt_indices(labels, imbalance)
    counts = np.bincount(labels[keep], minlength=int(labels.max()) + 1)
    class_names = [n.decode() for n in _unpickle(base / meta_file)[names_key]]
    out: dict[str, ArraySource] = {}
    short: list[int] = []
    if "train" in splits:
        out["train"] = ArraySource(images[keep], labels[keep])
    if "val" in splits:
        val, short = balanced_val_indices(labels, keep, val_per_class, seed)
        out["val"] = ArraySource(images[val], labels[val])
    if "test" in splits:
        out["test"] = ArraySource(*read_cifar_batches([base / test_file], label_key))
    return {s: out[s] for s in splits}, counts, class_names, short
