"""Text embeddings of class names with an open_clip text tower (``ltr text-head``; docs/FOUNDATION.md).

open_clip (``pip install "lt-rebalance[clip]"``) is imported only here, on use. Its models are named
by architecture (``ViT-B-16``) and weights (a pretrained tag such as ``openai``, downloaded on first
use, or a local checkpoint file); ``random_init`` builds the architecture from its shipped
configuration with random weights, offline (tests, the worked example: numbers about mechanics only).
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

INSTALL_HINT = 'pip install "lt-rebalance[clip]"'
RANDOM_INIT = "random-init"
ENCODE_ROWS = 256  # prompts encoded per forward pass


def require_open_clip() -> Any:
    """The ``open_clip`` module; ValueError naming the extra to install when it is missing."""
    try:
        import open_clip
    except ImportError:
        raise ValueError(f"text heads need open_clip, which is not installed: {INSTALL_HINT}") from None
    return open_clip


def check_architecture(arch: str) -> None:
    """ValueError for an architecture open_clip does not know, listing the closest names."""
    oc = require_open_clip()
    known = oc.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"see open_clip.list_models() ({len(known)} names)"
        raise ValueError(f"unknown open_clip architecture {arch!r}; {hint}")


@dataclass
class TextTower:
    """An open_clip model, its tokenizer and what it is (``pretrained``: tag, path or "random-init")."""

    model: Any
    tokenizer: Any
    arch: str
    pretrained: str

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> Optional[float]:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())


def load_tower(arch: str, pretrained: Optional[str], random_init: bool = False, device: str = "cpu") -> TextTower:
    """open_clip model ``arch`` with weights ``pretrained`` (a tag or a local checkpoint file), or random
    weights with ``random_init``. Every failure is a one-line ValueError saying what to do."""
    oc = require_open_clip()
    check_architecture(arch)
    if random_init == (pretrained is not None):
        raise ValueError("give either --pretrained TAG|PATH or --random-init (random weights: mechanics only)")
    source: Optional[str] = None
    if not random_init:
        if os.path.isfile(pretrained):
            source = pretrained
        else:
            tags = oc.list_pretrained_tags_by_model(arch)
            if pretrained not in tags:
                raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {arch} "
                                 f"(tags: {', '.join(tags) or 'none'})")
            source = pretrained
    try:
        logging.disable(logging.ERROR)  # open_clip logs its failures too: the ValueError below says it once
        model = oc.create_model(arch, pretrained=source, device=device)
    except Exception as e:  # noqa: BLE001 - download, unpickling, shape mismatch: one line each
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if source is not None and not os.path.isfile(source):
            raise ValueError(f"could not get the {arch} weights {source!r} ({type(e).__name__}: {first}); they are "
                             "downloaded on first use, so run once with network access, or download the "
                             "checkpoint and pass --pretrained PATH") from None
        what = f"load {source} as {arch} weights" if source else f"build {arch}"
        raise ValueError(f"could not {what} ({type(e).__name__}: {first})") from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    return TextTower(model, oc.get_tokenizer(arch), arch, RANDOM_INIT if random_init else str(pretrained))


@torch.no_grad()
def encode_class_names(tower: TextTower, names: Sequence[str], templates: Sequence[str],
                       rows: int = ENCODE_ROWS) -> torch.Tensor:
    """The CLIP prompt ensemble: float32 (C, D), row c the mean of the L2-normalised embeddings of
    ``t.format(names[c])`` over ``templates``, L2-normalised again. Names' underscores become spaces."""
    clean = [n.replace("_", " ") for n in names]
    prompts = [t.format(n) for t in templates for n in clean]  # template-major: (T·C,)
    device = next(tower.model.parameters()).device
    parts = []
    for start in range(0, len(prompts), rows):
        tokens = tower.tokenizer(prompts[start:start + rows]).to(device)
        parts.append(torch.nn.functional.normalize(tower.model.encode_text(tokens).float(), dim=-1))
    E = torch.cat(parts).view(len(templates), len(names), -1).mean(0)
    return torch.nn.functional.normalize(E, dim=-1).cpu()


def _plain_name(name: str) -> str:
    """A model name without hub prefixes and trailing slashes, lower case."""
    name = name.strip().lower()
    for prefix in ("hf-hub:", "hf_hub:", "timm/", "open_clip:"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.strip("/")


def identities(arch: str, pretrained: str) -> set[str]:
    """The names a features file's ``model`` attribute may carry for open_clip ``arch`` with
    ``pretrained``: ``arch``, ``arch/tag``, ``arch.tag`` and the timm name of the same weights."""
    names = {arch, f"{arch}/{pretrained}", f"{arch}.{pretrained}"}
    try:
        hub = require_open_clip().get_pretrained_cfg(arch, pretrained).get("hf_hub", "")
    except Exception:  # noqa: BLE001 - a local checkpoint or random weights have no pretrained cfg
        hub = ""
    if hub:
        names.add(hub)
    return {_plain_name(n) for n in names}


def model_mismatch(features_model: str, arch: str, pretrained: str) -> Optional[str]:
    """Why a text head of ``arch``/``pretrained`` does not belong to features of ``features_model``
    (the file's ``model`` attribute), naming both; None when they match or the file names no model."""
    if not features_model.strip():
        return None
    if _plain_name(features_model) in identities(arch, pretrained):
        return None
    return (f"the text head comes from {arch} ({pretrained}) but the features from {features_model!r}: "
            "their embeddings are unrelated, so zero-shot scores would be noise; pass --force if they are "
            "the same model under another name")
