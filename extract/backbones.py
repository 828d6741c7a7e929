"""Backbone registry: the paper's aliases -> timm architectures (any timm name also works)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone with ``timm.create_model``."""

    timm_name: str  # arch[.tag]
    model_kwargs: dict = field(default_factory=dict)  # override the timm entrypoint's defaults
    has_pretrained: bool = True  # False when the layers differ from every published timm weight


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(alias: str, spec: BackboneSpec) -> None:
    if alias in _BACKBONES:
        raise ValueError(f"backbone alias {alias!r} is already registered")
    _BACKBONES[alias] = spec


register_backbone("resnext50", BackboneSpec("resnext50_32x4d"))
# ResNet-10 of OLTR / classifier-balancing: BasicBlocks, layers 1-1-1-1, 512-d features.
register_backbone("resnet10", BackboneSpec("resnet18", {"layers": (1, 1, 1, 1)}, has_pretrained=False))
register_backbone("resnet50", BackboneSpec("resnet50"))
register_backbone("resnet152", BackboneSpec("resnet152"))
# ResNeXt-152 of the paper: Bottleneck 3-8-36-3, cardinality 32, base width 4.
register_backbone("resnext152", BackboneSpec("resnext101_32x4d", {"layers": (3, 8, 36, 3)}, has_pretrained=False))
# ltr demo's stage-1 CNN for tiny images; importing tiny_cnn registers "ltr_tiny_cnn" with timm.
from . import tiny_cnn  # noqa: E402,F401

register_backbone("tiny_cnn", BackboneSpec("ltr_tiny_cnn", has_pretrained=False))


def backbone_aliases() -> list[str]:
    return sorted(_BACKBONES)


def resolve_backbone(name: str) -> BackboneSpec:
    """An alias, or any name ``timm.is_model`` accepts (``arch`` or ``arch.tag``)."""
    import timm

    if name in _BACKBONES:
        return _BACKBONES[name]
    if timm.is_model(name):
        return BackboneSpec(name)
    raise ValueError(
        f"unknown model {name!r}: use an alias ({', '.join(backbone_aliases())}) or a timm model name "
        "(see timm.list_models())"
    )


def create_backbone(name: str, *, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """Build ``name`` in eval mode; ``pretrained`` downloads timm's weights (fails offline).

    ``num_classes=None`` keeps the architecture's default head (1000 classes for ImageNet weights).
    """
    import timm

    spec = resolve_backbone(name)
    kwargs: dict[str, Any] = dict(spec.model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained and not spec.has_pretrained:
        raise ValueError(f"no published weights for {name!r}; pass --checkpoint PATH")
    try:
        model = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:  # hub unreachable (offline), missing file, bad download
        if not pretrained:
            raise
        raise ValueError(
            f"could not download pretrained weights for {name!r} ({type(e).__name__}); without network "
            "access pass --checkpoint PATH with a local state dict"
        ) from None
    return model.eval()
