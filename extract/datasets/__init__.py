"""Datasets for extraction: list files, CIFAR-LT pickles, ImageFolder, in-memory arrays."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .cifar import load_cifar_splits
from .imagefolder import load_imagefolder_splits
from .lists import LIST_DATASETS, load_list_splits, read_list_file
from .sources import ArraySource, FileSource, ImageSource
from .transforms import TransformConfig, eval_transform, reference_config, timm_config, train_transform

DATASETS = (*LIST_DATASETS, "cifar10_lt", "cifar100_lt", "imagefolder")

__all__ = [
    "DATASETS", "ArraySource", "DatasetOptions", "DatasetSplits", "FileSource", "ImageSource", "TransformConfig",
    "eval_transform", "load_dataset", "read_list_file", "reference_config", "timm_config", "train_transform",
]


@dataclass(frozen=True)
class DatasetOptions:
    root: str
    splits: tuple[str, ...] = ("train", "val", "test")
    list_dir: Optional[str] = None  # list datasets only
    imbalance: float = 100  # CIFAR-LT only
    val_per_class: int = 20  # CIFAR-LT only: balanced val drawn from unused train images
    seed: int = 0


@dataclass
class DatasetSplits:
    """The splits to extract and what the feature file records about the dataset."""

    name: str
    sources: dict[str, ImageSource]
    counts: np.ndarray  # int64 (C,): train images per class
    family: str  # transforms.NORMALIZATION key
    class_names: Optional[list[str]] = None
    notes: tuple[str, ...] = ()  # warnings for the user

    def missing_files(self) -> dict[str, list[str]]:
        """split -> relative paths of absent image files (file-backed splits only)."""
        out = {s: src.missing() for s, src in self.sources.items() if isinstance(src, FileSource)}
        return {s: m for s, m in out.items() if m}


def load_dataset(name: str, opts: DatasetOptions) -> DatasetSplits:
    """Build ``opts.splits`` of dataset ``name`` (one of :data:`DATASETS`)."""
    splits = list(opts.splits)
    if not os.path.isdir(opts.root):
        raise FileNotFoundError(f"dataset root {opts.root} is not a folder")
    if name in LIST_DATASETS:
        if opts.list_dir is None:
            raise ValueError(f"{name} needs --list-dir, the folder with its list files")
        sources, counts = load_list_splits(name, opts.root, opts.list_dir, splits)
        return DatasetSplits(name, sources, counts, LIST_DATASETS[name].family)
    if name in ("cifar10_lt", "cifar100_lt"):
        sources, counts, names, short = load_cifar_splits(
            name, opts.root, splits, imbalance=opts.imbalance, val_per_class=opts.val_per_class, seed=opts.seed
        )
        notes = (
            (f"val has fewer than {opts.val_per_class} images for class(es) {short[:10]}: the long-tailed "
             "train subset uses (nearly) all of their original images",) if short else ()
        )
        return DatasetSplits(name, sources, counts.astype(np.int64), "cifar", names, notes)
    if name == "imagefolder":
        sources, counts, names = load_imagefolder_splits(opts.root, splits)
        return DatasetSplits(name, sources, counts.astype(np.int64), "imagenet", names)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
