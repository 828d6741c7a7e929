"""A feature file opened for a run: its splits and stored classifier, read once, and the memory plan.

A :class:`Session` is what every runner (:mod:`lt_rebalance.runners`) takes: data access and the
choices shared by the methods of a run (evaluation splits, device, seed, shot-group thresholds,
protocol, memory budget). It holds no logits (:class:`lt_rebalance.logit_store.LogitStore` does) and
no results (runners and :mod:`lt_rebalance.evaluation` return them).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .blocks import all_finite, available_memory, device_memory
from .devices import resolve_device
from .imbalance import DEFAULT_FEW, DEFAULT_MANY, group_sizes
from .precision import parse_precision, resolve_precision
from .protocols import Protocol
from .store import FeatureStore


class EmptyShotGroupWarning(UserWarning):
    """A shot group (many, medium or few) holds no class under the thresholds in use."""


@dataclass
class _Loaded:
    """What a session has read: split -> (X, y), the stored classifier, the memory plan. Shared by
    copies of a session (``dataclasses.replace``: the seeds of one method), so each is read once."""

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    head: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    memory_mapped: Optional[bool] = None


@dataclass
class Session:
    """A feature file and the choices shared by every method of a run.

    ``eval_splits``: the splits to report (default: val and test when present, else every
    non-train split). ``max_memory``: the bytes this run may use (None: the memory available when
    a split is first loaded). When the file's features exceed half of it, splits are
    memory-mapped instead of read (:meth:`FeatureStore.features`): every method then streams them
    a block of rows at a time, and cRT gathers its batches from the mapped train split; results
    are the same bytes, so identical. LWS's logit cache gets the other half.

    ``precision``: of the matrix products (float32, bfloat16, tf32 or auto; :mod:`lt_rebalance.precision`);
    :meth:`precision_for` resolves it for one method on the session's device.
    """

    store: FeatureStore
    eval_splits: Sequence[str] = ()
    device: str = "cpu"
    seed: int = 0
    thresholds: dict = field(default_factory=dict)  # many=, few= for the shot groups
    protocol: Protocol = field(default_factory=Protocol)  # shifted priors, bootstrap (lt_rebalance.protocols)
    max_memory: Optional[int] = None
    precision: str = "float32"
    loaded: _Loaded = field(default_factory=_Loaded, repr=False)

    def __post_init__(self) -> None:
        self.precision = parse_precision(self.precision)
        if not self.eval_splits:
            present = [s for s in ("val", "test") if s in self.store.splits]
            self.eval_splits = present or [s for s in self.store.splits if s != "train"]
        # thresholds given > the file's own (root attributes shot_many / shot_few) > 100 and 20
        self.thresholds = {**self.store.shot_thresholds, **self.thresholds}
        t = self.group_thresholds
        sizes = group_sizes(self.store.counts, t["many"], t["few"])
        empty = [g for g, n in sizes.items() if n == 0]
        if empty and int(self.store.counts.sum()) > 0:
            warnings.warn(EmptyShotGroupWarning(
                f"{self.store.path}: no {' and no '.join(empty)}-shot classes under many > {t['many']}, "
                f"few < {t['few']} train images (largest class {int(self.store.counts.max())}); their accuracies "
                "are NaN: pass --many/--few scaled to this file (or record them: ltr extract/import --shot-many, "
                "--shot-few)"), stacklevel=2)

    @property
    def group_thresholds(self) -> dict[str, int]:
        """The shot-group thresholds in use, ``{"many": .., "few": ..}``, defaults filled in."""
        return {"many": DEFAULT_MANY, "few": DEFAULT_FEW, **self.thresholds}

    @property
    def counts(self) -> torch.Tensor:
        return self.store.counts_tensor()

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    def _require_finite(self, X: torch.Tensor, subject: str, unit: str) -> None:
        """Say that the file holds NaN or Inf (which, where) before a method blames its own numbers
        (an "overflow", a "diverged" training). ``unit`` names a row of X (a value for 1-D X)."""
        if not all_finite(X):
            bad = ~torch.isfinite(X)
            n = int((bad.flatten(0, -2).any(dim=-1) if X.ndim > 1 else bad).sum())
            kinds = " and ".join(k for k, found in (("NaN", X.isnan().any()), ("Inf", X.isinf().any())) if found)
            raise ValueError(
                f"{self.store.path}: {subject} has {n} {unit} with {kinds} values; "
                f"`ltr check {self.store.path}` lists every problem, re-extract the file to fix it"
            )

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, y) of ``split``, read once: features in the stored dtype (float16 stays float16: the
        heads upcast a block of rows at a time), labels int64."""
        if split not in self.loaded.splits:
            X, y = self.store.load(split, dtype="stored", mmap=self.memory_mapped)
            self._require_finite(X, f"split {split!r}", "feature row(s)")
            self.loaded.splits[split] = (X, y)
        return self.loaded.splits[split]

    @property
    def memory_budget(self) -> Optional[int]:
        """``max_memory``, or the memory available now; None when unknown."""
        return self.max_memory if self.max_memory is not None else available_memory()

    def precision_for(self, method: Optional[str] = None) -> str:
        """The precision ``method`` (a registry name) runs in on this session's device: "float32",
        "bfloat16" or "tf32" (:func:`lt_rebalance.precision.resolve_precision`)."""
        return resolve_precision(self.precision, resolve_device(self.device), method)

    @property
    def device_budget(self) -> Optional[int]:
        """Bytes the run may give to tensors on its device: on a CUDA device its free memory now
        (``torch.cuda.mem_get_info``), on the CPU :attr:`memory_budget`; None when unknown."""
        dev = resolve_device(self.device)
        return device_memory(dev) if dev.type == "cuda" else self.memory_budget

    @property
    def memory_mapped(self) -> bool:
        """Whether splits are memory-mapped: the features exceed half of :attr:`memory_budget`.

        Decided once, when first asked (splits loaded later follow the same plan, however the
        memory available changes meanwhile), and shared by copies of this session."""
        if self.loaded.memory_mapped is None:
            budget = self.memory_budget
            self.loaded.memory_mapped = budget is not None and self.store.feature_bytes() > budget / 2
        return self.loaded.memory_mapped

    def views(self, k: int) -> torch.Tensor:
        """The first ``k`` stored augmented views of train, (k, N, D) in the stored dtype, checked finite."""
        V = self.store.views("train", k, dtype="stored")
        self._require_finite(V, "split 'train'", f"row(s) of its first {k} augmented views")
        return V

    def head(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stored stage-1 classifier (:meth:`FeatureStore.head`), read once and checked finite."""
        if self.loaded.head is None:
            W, b = self.store.head()
            self._require_finite(W, "the stored classifier", "class row(s) of /head/weight")
            if b is not None:
                self._require_finite(b, "the stored classifier", "value(s) of /head/bias")
            self.loaded.head = (W, b)
        return self.loaded.head

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "train" not in self.store.splits:
            raise ValueError(f"{self.store.path} has no 'train' split, which this method trains on")
        if self.store.splits["train"].rows == 0:
            raise ValueError(f"split 'train' of {self.store.path} has no rows, and this method trains on it; "
                             "give a file whose train split holds features")
        return self.load("train")

    def has_rows(self, split: str) -> bool:
        """Whether the file has ``split`` with at least one row."""
        return split in self.store.splits and self.store.splits[split].rows > 0

    def val(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.load("val") if "val" in self.store.splits else (None, None)
