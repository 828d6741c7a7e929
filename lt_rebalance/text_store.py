"""The optional ``/text_head`` group of a feature file (docs/FORMAT.md, "Text head").

``/text_head/weight`` float32 (C, D): one unit-norm text embedding per class (the prompt ensemble of
its class name); ``/text_head/names`` the class names that were encoded; attributes ``logit_scale``,
``model``, ``pretrained``, ``templates`` (a JSON list), ``features_model`` (the file's ``model`` when
the head was written), ``forced`` (written with ``--force`` across models) and, for SigLIP-style
towers, ``logit_bias``. Files without the group stay valid; methods that need it are skipped.

Writing (:func:`write_text_head`) never edits the file in place: the file is copied beside itself,
the group is added to the copy, its checksums recorded and the copy validated, then it replaces the
original in one rename (:func:`lt_rebalance.outputs.atomic_write`). An interruption at any point
leaves the original file as it was; the cost is one copy of the file on the same disk.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import h5py
import numpy as np

from .integrity import record_checksums
from .outputs import PathLike, atomic_write, check_interrupt

GROUP = "text_head"


@dataclass
class TextHead:
    """A text head: ``weight`` float32 (C, D) unit rows, the logit scale and where it came from."""

    weight: Any
    logit_scale: float
    model: str
    pretrained: str
    templates: list[str]
    names: list[str] = field(default_factory=list)
    logit_bias: Optional[float] = None
    features_model: str = ""
    forced: bool = False


def has_text_head(store: Any) -> bool:
    """Whether the open :class:`~lt_rebalance.store.FeatureStore` ``store`` holds ``/text_head/weight``."""
    with store._reading() as f:
        return f"{GROUP}/weight" in f


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_text_head(store: Any) -> TextHead:
    """The text head of ``store`` (weight as a float32 torch tensor); FeatureFileError when the file
    has none or it does not fit the file's classes and feature width."""
    import torch

    if not has_text_head(store):
        raise store._fail("has no text head (/text_head); add one with `ltr text-head` (docs/FOUNDATION.md)")
    with store._reading() as f:
        g = f[GROUP]
        w = np.asarray(g["weight"][...], dtype=np.float32)
        if w.shape != (store.num_classes, store.dim):
            raise store._damaged(f"/text_head/weight has shape {w.shape}, expected (C, D) = "
                                 f"({store.num_classes}, {store.dim})")
        a = g.attrs
        names = [_str(s) for s in g["names"][...]] if "names" in g else []
        return TextHead(
            weight=torch.from_numpy(w), logit_scale=float(a.get("logit_scale", 1.0)), model=_str(a.get("model", "")),
            pretrained=_str(a.get("pretrained", "")), templates=json.loads(_str(a.get("templates", "[]"))),
            names=names, logit_bias=float(a["logit_bias"]) if "logit_bias" in a else None,
            features_model=_str(a.get("features_model", "")), forced=bool(a.get("forced", False)),
        )


def text_head_summary(store: Any) -> Optional[dict]:
    """``ltr info``'s ``"text_head"``: model, pretrained, templates (count), logit scale; None without one."""
    if not has_text_head(store):
        return None
    with store._reading() as f:
        a = f[GROUP].attrs
        return {"model": _str(a.get("model", "")), "pretrained": _str(a.get("pretrained", "")),
                "templates": len(json.loads(_str(a.get("templates", "[]")))),
                "logit_scale": float(a.get("logit_scale", 1.0)), "forced": bool(a.get("forced", False))}


def text_head_problem(f: h5py.File, num_classes: int, dim: int) -> Optional[str]:
    """What is wrong with ``f``'s ``/text_head`` (``ltr check``): shape, dtype, non-finite or non-unit
    rows; None when it is sound (or absent)."""
    if GROUP not in f:
        return None
    if "weight" not in f[GROUP]:
        return "/text_head has no weight"
    ds = f[GROUP]["weight"]
    if ds.shape != (num_classes, dim) or ds.dtype != np.float32:
        return f"/text_head/weight is {ds.dtype} {ds.shape}, expected float32 ({num_classes}, {dim})"
    w = ds[...].astype(np.float64)
    if not np.isfinite(w).all():
        return f"/text_head/weight has {int((~np.isfinite(w)).sum())} NaN/Inf values"
    off = int((np.abs(np.linalg.norm(w, axis=1) - 1) > 1e-3).sum())
    return f"{off} row(s) of /text_head/weight are not unit-norm" if off else None


def _unit_rows(weight: Any) -> np.ndarray:
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"a text head weight must be 2-D (C, D); got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("the text embeddings hold NaN or Inf values; the text tower's weights are broken")
    norms = np.linalg.norm(w.astype(np.float64), axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f"text head rows must have unit norm (found norms from {norms.min():.4g} to {norms.max():.4g})")
    return w


def write_text_head(path: PathLike, head: TextHead, *, overwrite: bool = False) -> Path:
    """Add ``head`` as ``/text_head`` to the feature file ``path`` (replacing one only with ``overwrite``).

    The file is rewritten safely (module docstring): copy, add, checksum, validate, rename over.
    ValueError when the weight does not fit the file's classes or width (both numbers), FileExistsError
    when the file has a text head and ``overwrite`` is False.
    """
    from .store import FeatureFileError, FeatureStore

    path = Path(path)
    w = _unit_rows(head.weight)
    with FeatureStore(path, allow_incomplete=True) as store:
        if w.shape[0] != store.num_classes:
            raise ValueError(f"{len(w)} text embeddings for the {store.num_classes} classes of {path}")
        if w.shape[1] != store.dim:
            raise ValueError(f"the text tower of {head.model} embeds in {w.shape[1]} dimensions but {path} holds "
                             f"{store.dim}-d features: the features must be the image embedding of the same "
                             "model (ltr extract --embedding projected)")
        if has_text_head(store) and not overwrite:
            raise FileExistsError(f"{path} already has a text head; pass --overwrite to replace it")
    names = list(head.names)

    def write(tmp: Path) -> None:
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        check_interrupt()
        with h5py.File(tmp, "r+") as f:
            if GROUP in f:
                del f[GROUP]
            g = f.create_group(GROUP)
            g.create_dataset("weight", data=w)
            if names:
                g.create_dataset("names", data=names, dtype=h5py.string_dtype())
            g.attrs["logit_scale"] = float(head.logit_scale)
            g.attrs["model"] = head.model
            g.attrs["pretrained"] = head.pretrained
            g.attrs["templates"] = json.dumps(list(head.templates))
            g.attrs["features_model"] = head.features_model
            g.attrs["forced"] = bool(head.forced)
            if head.logit_bias is not None:
                g.attrs["logit_bias"] = float(head.logit_bias)
            record_checksums(g)
        try:  # validate before publishing
            with FeatureStore(tmp, allow_incomplete=True) as s:
                read_text_head(s)
        except FeatureFileError as e:
            raise FeatureFileError(path, e.problem) from None

    return atomic_write(path, write, overwrite=True)


def check_names(names: Sequence[str], num_classes: int, source: str) -> list[str]:
    """Class names for a text head: one per class, none empty; ValueError otherwise (both numbers).
    Duplicates are allowed (their classes get the same text embedding) but warned about."""
    import warnings

    names = [str(n).strip() for n in names]
    if len(names) != num_classes:
        raise ValueError(f"{source} has {len(names)} class names for the {num_classes} classes of the features "
                         "(one name a line, in class-index order)")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{source}: class name(s) {empty[:10]} are empty (line {empty[0] + 1} first); "
                         "every class needs a name to build its prompts")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        if n.lower() in seen:
            dups.append(f"{n!r} (classes {seen[n.lower()]} and {i})")
        seen.setdefault(n.lower(), i)
    if dups:
        warnings.warn(f"{source}: duplicated class name(s) {', '.join(dups[:5])}: their classes get the same text "
                      "embedding, so the text-based methods cannot tell them apart", stacklevel=2)
    return names
