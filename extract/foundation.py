"""Foundation-model backbones (CLIP, SigLIP, DINOv2, EVA, ... from timm): their own preprocessing and
which embedding is stored (docs/FOUNDATION.md, docs/FORMAT.md "Root attributes").

* Preprocessing: ``--transform auto`` (the default) uses the model's pretrained data configuration
  (interpolation, mean/std, crop) for these models and the reference transform for the others.
* Embedding: ``pre-logits`` (what timm's ``forward_head(pre_logits=True)`` returns: the pooled,
  pre-projection features) or ``projected`` (the model's own head, which for timm's CLIP image towers
  is the projection into the joint image-text space that ``ltr text-head`` embeds class names in).
  Models whose pooled output is already the embedding (SigLIP, DINOv2, EVA02 without a head) store it
  under either name, recorded as ``pre-logits``.
* ``--l2-normalize`` stores unit rows.

The file records all three as root attributes: ``embedding``, ``l2_normalized``, ``preprocess``.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

EMBEDDINGS = ("pre-logits", "projected")
TRANSFORM_KINDS = ("auto", "reference", "timm")
# names and pretrained tags of image-text or self-supervised towers trained on web-scale data
_FOUNDATION = re.compile(r"clip|siglip|dinov2|dinov3|eva|laion|openai|webli|lvd142m|datacomp|metaclip|dfn|aimv2",
                         re.IGNORECASE)


def is_foundation_model(name: str, model: Optional[nn.Module] = None) -> bool:
    """Whether ``name`` (or the model's pretrained tag) is a CLIP/SigLIP/DINOv2/EVA-style tower."""
    tag = "" if model is None else str(getattr(model, "pretrained_cfg", {}).get("tag") or "")
    arch = "" if model is None else str(getattr(model, "pretrained_cfg", {}).get("architecture") or "")
    return bool(_FOUNDATION.search(f"{name} {arch} {tag}"))


def transform_kind(kind: str, name: str, model: Optional[nn.Module] = None) -> str:
    """``auto`` resolved: ``timm`` (the model's own data config) for foundation models, else ``reference``."""
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform {kind!r}; choose one of {', '.join(TRANSFORM_KINDS)}")
    if kind != "auto":
        return kind
    return "timm" if is_foundation_model(name, model) else "reference"


def has_projection(model: nn.Module) -> bool:
    """Whether the model has a head of its own (timm CLIP towers: the image projection)."""
    return int(getattr(model, "num_classes", 0) or 0) > 0 and hasattr(model, "forward_head")


def embedding_function(model: nn.Module, embedding: str = "pre-logits", l2_normalize: bool = False,
                       name: str = "") -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """The feature function of ``model`` (timm name ``name``) for ``embedding`` and the root attributes
    that describe it.

    ``projected`` applies to foundation models (ValueError for others, whose head is a classifier);
    on one without a head of its own (SigLIP, DINOv2: the pooled output is the embedding) the pooled
    output is stored, recorded as ``pre-logits``.
    """
    import torch.nn.functional as F

    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(f"{type(model).__name__} lacks timm's forward_features/forward_head")
    if embedding == "projected" and not is_foundation_model(name, model):
        who = name or "this model"
        raise ValueError(f"--embedding projected stores the image-text projection of CLIP-style towers; {who} is "
                         "none (its head is a classifier): use --embedding pre-logits")
    projected = embedding == "projected" and has_projection(model)

    def features(x: torch.Tensor) -> torch.Tensor:
        f = model.forward_head(model.forward_features(x), pre_logits=not projected)
        return F.normalize(f.float(), dim=-1) if l2_normalize else f

    return features, {"embedding": "projected" if projected else "pre-logits", "l2_normalized": bool(l2_normalize)}
