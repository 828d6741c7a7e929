"""The reference's list files (``<relative/path> <integer label>`` per line) for ImageNet-LT, Places-LT, iNat 2018."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import FileSource


@dataclass(frozen=True)
class ListDatasetSpec:
    num_classes: int
    family: str  # normalisation / augmentation family (transforms.NORMALIZATION)
    files: dict  # split -> list file name inside --list-dir


LIST_DATASETS: dict[str, ListDatasetSpec] = {
    "imagenet_lt": ListDatasetSpec(
        1000, "imagenet", {s: f"ImageNet_LT_{s}.txt" for s in ("train", "val", "test")}
    ),
    "places_lt": ListDatasetSpec(365, "imagenet", {s: f"Places_LT_{s}.txt" for s in ("train", "val", "test")}),
    # The reference evaluates iNaturalist 2018 on its val list; there is no separate test list.
    "inat2018": ListDatasetSpec(8142, "inat", {s: f"iNaturalist18_{s}.txt" for s in ("train", "val")}),
}


def read_list_file(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Parse a list file -> (relative paths, labels int64 (N,)); errors name ``file:line``."""
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rsplit(None, 1)
            if not parts:
                continue  # blank line
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{lineno}: expected '<relative/path> <integer label>', got {line.strip()!r}")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise ValueError(f"{path}:{lineno}: label {label} outside [0, {num_classes})")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise ValueError(f"{path}: no entries")
    return paths, np.asarray(labels, dtype=np.int64)


def list_file_paths(name: str, list_dir: str | os.PathLike, splits: list[str]) -> dict[str, Path]:
    """split -> list file, for ``splits`` plus train (its counts define the shot groups); all must exist."""
    spec = LIST_DATASETS[name]
    unknown = [s for s in splits if s not in spec.files]
    if unknown:
        raise ValueError(f"{name} has no split(s) {unknown}; available: {', '.join(spec.files)}")
    wanted = {s: Path(list_dir) / spec.files[s] for s in dict.fromkeys(["train", *splits])}
    absent = [str(p) for p in wanted.values() if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"list file(s) not found: {', '.join(absent)} (--list-dir holds the reference's "
            f"{', '.join(spec.files.values())}; train lists are not bundled with lt-rebalance)"
        )
    return wanted


def load_list_splits(
    name: str, root: str | os.PathLike, list_dir: str | os.PathLike, splits: list[str]
) -> tuple[dict[str, FileSource], np.ndarray]:
    """``splits`` as FileSources under ``root`` and the train counts (C,)."""
    spec = LIST_DATASETS[name]
    files = list_file_paths(name, list_dir, splits)
    parsed = {s: read_list_file(p, spec.num_classes) for s, p in files.items()}
    counts = np.bincount(parsed["train"][1], minlength=spec.num_classes)
    return {s: FileSource(root, *parsed[s]) for s in splits}, counts
