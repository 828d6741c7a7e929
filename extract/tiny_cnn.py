"""A small CNN for tiny images (8-32 px), registered with timm as ``ltr_tiny_cnn`` (``ltr demo``'s stage 1).

It follows timm's interface (``forward_features``, ``forward_head(x, pre_logits=...)``,
``get_classifier``), so extraction and strict checkpoint loading treat it like any timm backbone.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn


class TinyCNN(nn.Module):
    """conv-BN-ReLU x2 -> max-pool -> conv-BN-ReLU -> global average pool (``4 * width`` features) -> linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.num_classes = num_classes
        self.num_features = 4 * width
        self.features = nn.Sequential(*block(in_chans, width), *block(width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 4 * width))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        # what timm.data.resolve_data_config reads for `ltr extract --transform timm`
        self.pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": 0.875, "interpolation": "bilinear",
                               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def ltr_tiny_cnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """timm entry point; there are no published weights (train one with ``ltr demo``)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return TinyCNN(**kwargs)
