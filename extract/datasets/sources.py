"""Image sources: indexable images + int64 labels, decoded lazily to RGB PIL images."""
from __future__ import annotations

import os
import stat
from typing import Optional, Protocol, Sequence

import numpy as np
from PIL import Image


class ImageSource(Protocol):
    """What the extraction loop reads: ``labels`` int64 (N,), ``load(i)`` an RGB PIL image."""

    labels: np.ndarray
    paths: Optional[list[str]]  # stored in /splits/<split>/paths when not None

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image: ...

    def name(self, i: int) -> str: ...


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; 16- and 32-bit integer grayscale (16-bit PNGs open as I;16 or I) is scaled
    from 0..65535 to 0..255 (``convert("RGB")`` would clip every value above 255 to white)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a, 0, 65535) * (255 / 65535)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _labels(labels: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{n} images but {len(y)} labels")
    return y


class FileSource:
    """Image files ``root/relpath`` with their labels (list files, ImageFolder)."""

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], labels: Sequence[int] | np.ndarray):
        self.root = str(root)
        self.paths = list(paths)
        self.labels = _labels(labels, len(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def load(self, i: int) -> Image.Image:
        path = os.path.join(self.root, self.paths[i])
        # a FIFO or device among the images would block the read forever: only regular files are images
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.paths[i]} is not a regular file (a FIFO, socket or device)")
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f, Image.open(f) as im:
            return to_rgb(im)

    def missing(self) -> list[str]:
        """Relative paths with no file under ``root``."""
        return [p for p in self.paths if not os.path.isfile(os.path.join(self.root, p))]


class ArraySource:
    """In-memory images: uint8 array (N, H, W, 3) or (N, H, W) grayscale, with labels (N,)."""

    paths = None

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(
                f"images must be uint8 (N, H, W, 3) or (N, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images
        self.labels = _labels(labels, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"#{i}"

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")
