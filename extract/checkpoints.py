"""Strict weight loading: plain state dicts and checkpoints of the reference implementation.

Reference layout (docs/EXTRACT.md): ``{"state_dict_best": {"feat_model": {"module.<key>": ...},
"classifier": {"module.fc.weight", "module.fc.bias"[, "module.scales"]}}, ...}``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn


@dataclass(frozen=True)
class LoadedCheckpoint:
    sha256: str
    scales: Optional[Tensor]  # LWS scales s (C,) of a reference checkpoint, else None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def classifier_prefix(model: nn.Module) -> str:
    """Name of the model's classifier module (``fc`` for ResNets), from ``get_classifier()``."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise ValueError(f"{type(model).__name__} has no named classifier module")


def _strip(sd: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def remap_reference_checkpoint(ckpt: Mapping[str, Any], head_prefix: str = "fc") -> tuple[dict, Optional[Tensor]]:
    """classifier-balancing checkpoint -> flat state dict (``fc.*`` merged in) and LWS scales or None."""
    best = ckpt["state_dict_best"]
    if "feat_model" not in best or "classifier" not in best:
        raise ValueError(f"state_dict_best needs 'feat_model' and 'classifier', has {sorted(best)}")
    sd = _strip(best["feat_model"])
    head = _strip(best["classifier"])
    for part in ("weight", "bias"):
        if f"fc.{part}" not in head:
            raise ValueError(f"classifier has no 'module.fc.{part}' (keys: {sorted(head)})")
        sd[f"{head_prefix}.{part}"] = head.pop(f"fc.{part}")
    scales = head.pop("scales", None)
    if head:
        raise ValueError(f"unexpected classifier keys: {sorted(head)}")
    return sd, scales


def to_state_dict(obj: Any, head_prefix: str = "fc") -> tuple[dict, Optional[Tensor]]:
    """Whatever ``torch.load`` returned -> (flat state dict, LWS scales or None)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if "state_dict_best" in obj:
        return remap_reference_checkpoint(obj, head_prefix)
    for key in ("state_dict", "model"):  # common training-script wrappers
        if isinstance(obj.get(key), Mapping):
            return _strip(obj[key]), None
    return _strip(obj), None


def check_state_dict(sd: Mapping[str, Any], model: nn.Module) -> None:
    """Raise ValueError naming missing/unexpected keys and shape mismatches."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}")
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
        for k, v in sd.items()
        if k in ours and tuple(v.shape) != tuple(ours[k].shape)
    ]
    if shapes:
        problems.append(f"shape mismatches: {'; '.join(shapes[:4])}")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
                         + "; pass the --model the checkpoint was trained with")


def read_checkpoint(path: str | os.PathLike, head_prefix: str = "fc") -> tuple[dict, Optional[Tensor]]:
    """``torch.load`` of ``path`` (weights only) -> (flat state dict, LWS scales or None); ValueError if unreadable."""
    import torch

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"cannot read checkpoint {path}: the file is empty; give the .pth file saved by training")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, not a torch file: all unreadable
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first} (a truncated or damaged "
                         "file, or not a torch checkpoint); give the .pth file saved by training") from None
    return to_state_dict(obj, head_prefix)


def load_strict(model: nn.Module, sd: Mapping[str, Any], path: str | os.PathLike) -> None:
    """:func:`check_state_dict` (its error prefixed with ``path``), then ``load_state_dict(strict=True)``."""
    try:
        check_state_dict(sd, model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model.load_state_dict(sd, strict=True)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> LoadedCheckpoint:
    """Load ``path`` into ``model`` strictly; returns the file's sha256 and LWS scales if any."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sd, scales = read_checkpoint(path, classifier_prefix(model))
    load_strict(model, sd, path)
    return LoadedCheckpoint(file_sha256(path), scales)


def save_reference_checkpoint(model: nn.Module, path: str | os.PathLike, scales: Optional[Tensor] = None) -> None:
    """Write ``model`` in the reference's layout (``module.`` prefixes, head under ``classifier``)."""
    import torch

    prefix = classifier_prefix(model) + "."
    sd = model.state_dict()
    feat = {f"module.{k}": v for k, v in sd.items() if not k.startswith(prefix)}
    clf = {f"module.fc.{k[len(prefix):]}": v for k, v in sd.items() if k.startswith(prefix)}
    if scales is not None:
        clf["module.scales"] = scales
    best = {"feat_model": feat, "classifier": clf}
    torch.save({"state_dict_best": best, "best_acc": 0.0, "best_epoch": 0, "centroids": None}, path)


def linear_head(model: nn.Module, scales: Optional[Tensor] = None) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """The model's linear classifier as (W (C, D), b (C,) or None), LWS ``scales`` folded in; None if not linear."""
    import torch

    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        return None
    w = head.weight.detach().float().cpu().clone()
    b = head.bias.detach().float().cpu().clone() if head.bias is not None else None
    if scales is not None:
        s = scales.detach().float().cpu().reshape(-1)
        w, b = w * s[:, None], (b * s if b is not None else None)
    return w, b
