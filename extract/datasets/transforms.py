"""Eval and train transforms: the reference's (docs/EXTRACT.md, "Datasets"), CIFAR's, or timm's data config."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# family -> (mean, std)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inat": ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # LDAM-DRW
}
TRAIN_AUGMENTATIONS = ("reference", "reference_nojitter", "cifar")


@dataclass(frozen=True)
class TransformConfig:
    """One eval transform (resize shorter side -> center crop) and its matching train augmentation."""

    size: int = 224  # crop side
    resize: Optional[int] = 256  # shorter side before the crop; None keeps the image (CIFAR at 32x32)
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = NORMALIZATION["imagenet"][0]
    std: tuple[float, ...] = NORMALIZATION["imagenet"][1]
    train: str = "reference"  # one of TRAIN_AUGMENTATIONS
    source: str = "reference"  # "reference", "cifar" or "timm" (recorded in the file)

    def to_attr(self) -> dict[str, Any]:
        return asdict(self)


def _train_flavour(family: str) -> str:
    return {"inat": "reference_nojitter", "cifar": "cifar"}.get(family, "reference")


def reference_config(family: str, image_size: Optional[int] = None) -> TransformConfig:
    """Resize(256) -> CenterCrop(224) bilinear (scaled for ``image_size``); CIFAR keeps 32x32."""
    mean, std = NORMALIZATION[family]
    if family == "cifar":
        size = image_size or 32
        return TransformConfig(size, None if size == 32 else size, "bilinear", mean, std, "cifar", "cifar")
    size = image_size or 224
    return TransformConfig(size, math.floor(size / 0.875), "bilinear", mean, std, _train_flavour(family))


def timm_config(model: nn.Module, family: str, image_size: Optional[int] = None) -> TransformConfig:
    """The model's own timm data config (size, crop_pct, interpolation, mean/std)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {}, model=model)
    size = int(cfg["input_size"][-1])
    return TransformConfig(
        size,
        math.floor(size / cfg["crop_pct"]),
        cfg["interpolation"],
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        _train_flavour(family),
        "timm",
    )


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def eval_transform(cfg: TransformConfig):
    """PIL RGB -> float32 tensor (3, size, size)."""
    from torchvision import transforms as T

    steps = [T.Resize(cfg.resize, _interp(cfg.interpolation))] if cfg.resize else []
    steps += [T.CenterCrop(cfg.size), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


def train_transform(cfg: TransformConfig):
    """The reference's train augmentation for ``cfg.train`` (random: seed torch per image)."""
    from torchvision import transforms as T

    if cfg.train == "cifar":
        steps = [T.Resize(cfg.size, _interp(cfg.interpolation))] if cfg.resize else []
        steps += [T.RandomCrop(cfg.size, padding=cfg.size // 8), T.RandomHorizontalFlip()]
    else:
        steps = [T.RandomResizedCrop(cfg.size, interpolation=_interp(cfg.interpolation)), T.RandomHorizontalFlip()]
        if cfg.train == "reference":
            steps.append(T.ColorJitter(0.4, 0.4, 0.4, 0))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
