"""One owner for the logits of the stored classifier that several methods of a run share.

Two kinds, both of the file's stored classifier W (and bias b):

* ``"eval"``: X Wᵀ (no bias, float32 (N, C)) of an evaluation split. The heads built on W whose
  scores are a per-class affine map of it (joint, τ-norm, LWS, MARC, logit adjustment, PC softmax:
  registry ``scored_from_stored``) are scored from it, and the τ and logit-adjustment sweeps
  run on it: one GEMM per split for all of them.
* ``"joint"``: X Wᵀ + b of train and val in a compact precision, which LWS, MARC and DisAlign train
  on (registry ``trained_on_stored``; :class:`~lt_rebalance.heads.lws.JointLogits`; DisAlign's gate
  reads each batch's features from the train rows beside them).

Each entry has an explicit key (:class:`LogitKey`: file, kind, splits, precision, device, budget) and
lives until :meth:`LogitStore.release` or the end of the ``with`` block that owns the store. The
memory rule is here only: eval logits are kept when no ``max_memory`` was given, the splits are not
memory-mapped and each takes at most an eighth of the session's memory budget; joint logits get
half of ``max_memory`` when one was given (else :func:`~lt_rebalance.heads.lws.cache_budget`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .blocks import linear_logits
from .devices import canonical_device, resolve_device
from .heads.lws import JointLogits, cache_joint_logits
from .session import Session

EVAL_SHARE = 1 / 8  # of the memory budget, per kept evaluation split
JOINT_SHARE = 1 / 2  # of --max-memory, for the joint-logit cache


@dataclass(frozen=True)
class LogitKey:
    """What an entry holds: ``kind`` ("eval" or "joint") logits of ``splits`` of the file at ``path``,
    in ``dtype`` on ``device`` (with its index: "cuda:0", never "cuda"); ``budget``: the cache limit in
    GiB it was planned for (joint only); ``precision``: of the GEMMs that computed them."""

    path: str
    kind: str
    splits: tuple[str, ...]
    dtype: str
    device: str
    budget: Optional[float] = None
    precision: str = "float32"


def joint_cache_gb(session: Session) -> Optional[float]:
    """The joint-logit cache limit in GiB: half of ``max_memory`` when given, else None (the head's
    default: a share of the memory available, :func:`~lt_rebalance.heads.lws.cache_budget`)."""
    m = session.max_memory
    return None if m is None else m * JOINT_SHARE / 2**30


class LogitStore:
    """The shared logits of one session's stored classifier; a context manager that frees them.

    ``keep_eval``: whether evaluation logits may be kept at all (``compare`` keeps them when
    several methods are scored from them; a single method computes its scores directly).
    """

    def __init__(self, session: Session, *, keep_eval: bool = True):
        self.session = session
        self.keep_eval = keep_eval
        self._entries: dict[LogitKey, Any] = {}

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def keys(self) -> list[LogitKey]:
        """The entries held now."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of logits held now."""
        total = 0
        for v in self._entries.values():
            if isinstance(v, JointLogits):
                total += v.nbytes
            elif v is not None:
                total += v.numel() * v.element_size()
        return total

    def release(self, kind: Optional[str] = None) -> None:
        """Free the entries of ``kind`` ("eval", "joint"; None: all)."""
        for key in [k for k in self._entries if kind is None or k.kind == kind]:
            del self._entries[key]

    def _device(self, device: Any = None) -> torch.device:
        return canonical_device(resolve_device(self.session.device if device is None else str(device)))

    def eval_logits(self, split: str, device: Any = None, precision: Optional[str] = None
                    ) -> Optional[torch.Tensor]:
        """X Wᵀ of ``split`` (float32 (N, C), no bias) on ``device`` (default: the session's), its GEMM in
        ``precision`` (default: the joint head's, ``session.precision_for("joint")``, so that every head
        scored from them shares one entry), computed once and kept; None when the file has no stored
        classifier or the memory rule says no (each entry at most an eighth of the memory budget: on
        a CUDA device its free memory, :attr:`Session.device_budget`)."""
        s = self.session
        if not (self.keep_eval and s.store.has_head):
            return None
        dev = self._device(device)
        precision = precision or s.precision_for("joint")
        key = LogitKey(str(s.store.path), "eval", (split,), "float32", str(dev), precision=precision)
        if key not in self._entries:
            X, _ = s.load(split)
            W = s.head()[0]
            budget = s.device_budget if dev.type == "cuda" else s.memory_budget
            fits = s.max_memory is None and not s.memory_mapped and (
                budget is None or len(X) * W.shape[0] * 4 <= budget * EVAL_SHARE)
            self._entries[key] = linear_logits(X, W.to(dev), precision=precision) if fits else None
        return self._entries[key]

    def joint_logits(self, cache_dtype: str = "float16", device: Any = None, precision: str = "float32"
                     ) -> JointLogits:
        """X Wᵀ + b of train and val (val only when the file has it) in ``cache_dtype``, its GEMMs in
        ``precision``, computed once and kept (one entry: a request with another cache dtype, product
        precision or device replaces it, freeing the old one first)."""
        s = self.session
        dev = self._device(device)
        budget = joint_cache_gb(s)
        splits = ("train", "val") if "val" in s.store.splits else ("train",)
        key = LogitKey(str(s.store.path), "joint", splits, cache_dtype, str(dev), budget, precision)
        if key not in self._entries:
            self.release("joint")  # freed before the new cache is built
            W, b = s.head()
            W = W.to(device=dev, dtype=torch.float32)
            b = torch.zeros(W.shape[0], device=dev) if b is None else b.to(device=dev, dtype=torch.float32)
            X, _ = s.train()
            Xv = s.load("val")[0] if "val" in splits else None
            self._entries[key] = cache_joint_logits(W, b, X.to(dev), None if Xv is None else Xv.to(dev),
                                                    cache_dtype, budget, precision)
        return self._entries[key]
