"""``--root`` with ``train/``, ``val/``, ``test/`` folders of class folders (class index = sorted train names)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .sources import FileSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _class_dirs(folder: Path) -> list[str]:
    """Class folders of ``folder``: hidden ones (``.ipynb_checkpoints``, ``.git``) are not classes."""
    return sorted(_utf8(folder, d.name) for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _utf8(folder: Path, name: str) -> str:
    """``name`` (from the file system), refused before any extraction when it is not valid UTF-8:
    the feature file stores names as UTF-8 text (paths, class names)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode("utf-8", errors="backslashreplace")
        raise ValueError(f"{folder / shown}: the name is not valid UTF-8; rename it (e.g. with convmv) and "
                         "run again") from None
    return name


def _image_files(folder: Path) -> list[str]:
    """Regular image files of ``folder`` (hidden files, FIFOs, sockets and devices left out), sorted."""
    out = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if entry.is_file():  # follows symlinks; False for a FIFO, socket or device
            out.append(_utf8(folder, entry.name))
    return sorted(out)


def scan_split(root: Path, split: str, class_index: dict[str, int]) -> FileSource:
    """Images of ``root/split/<class>/`` sorted by class then file name; unknown classes are an error."""
    folder = root / split
    unknown = [c for c in _class_dirs(folder) if c not in class_index]
    if unknown:
        raise ValueError(f"{folder}: class folder(s) not in train/: {unknown[:10]}")
    paths, labels = [], []
    for cls in _class_dirs(folder):
        files = _image_files(folder / cls)
        paths += [f"{split}/{cls}/{f}" for f in files]
        labels += [class_index[cls]] * len(files)
    if not paths:
        raise ValueError(f"{folder}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return FileSource(root, paths, labels)


def load_imagefolder_splits(root: str | os.PathLike, splits: list[str]) -> tuple[dict[str, FileSource], np.ndarray, list[str]]:
    """-> (split sources, train counts (C,), class names)."""
    root = Path(root)
    absent = [s for s in dict.fromkeys(["train", *splits]) if not (root / s).is_dir()]
    if absent:
        raise FileNotFoundError(f"{root} has no {', '.join(a + '/' for a in absent)} folder(s) (imagefolder needs train/ and each split asked for)")
    names = _class_dirs(root / "train")
    if not names:
        raise ValueError(f"{root / 'train'} has no class folders")
    class_index = {c: i for i, c in enumerate(names)}
    sources = {s: scan_split(root, s, class_index) for s in dict.fromkeys(["train", *splits])}
    counts = np.bincount(sources["train"].labels, minlength=len(names))
    return {s: sources[s] for s in splits}, counts, names
