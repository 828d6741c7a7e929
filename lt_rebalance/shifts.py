"""Shifted test priors as subsets of the test rows (docs/METHODS.md, "Kinds of shift").

Pure, seeded functions. Every kind starts from LADE's uniform base of M rows per class, M the
smallest test count of any class (so every test class must have a row), and keeps at most M rows of
a class — except ``dirichlet-A`` with ``replace=True``, which keeps the MAPLS authors' M·C rows in
total and draws a class's missing rows with replacement:

* ``forward-R``, ``backward-R``, ``uniform`` — LADE's protocol (``protocols.shift_counts``), the
  first rows of each class in file order;
* ``step-R`` — the ⌊C/2⌋ classes with most train rows keep M, the rest int(M / R); first rows;
* ``tweakone-RHO`` — one random class holds the share RHO, the others equal shares;
* ``dirichlet-A`` — class shares π ~ Dirichlet(A, ..., A);
* ``knockout-P`` — int(P·M·C) of the M·C base rows removed uniformly at random.

Random kinds (:func:`is_random`) draw their class shares and their rows (uniformly without
replacement within each class) from ``numpy.random.default_rng(seed)``. :func:`shift_subset`
returns the row indices and the subset's true class prior.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .protocols import class_ranks, parse_test_priors, shift_counts, shift_mask

KINDS = ("forward-R", "backward-R", "uniform", "step-R", "dirichlet-A", "knockout-P", "tweakone-RHO")
RANDOM_KINDS = ("dirichlet", "knockout", "tweakone")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NAME = re.compile(rf"^(forward|backward|step|dirichlet|knockout|tweakone)-({_NUMBER})$")


@dataclass(frozen=True)
class Shift:
    """A parsed shift name: ``kind`` (forward, backward, uniform, step, dirichlet, knockout, tweakone)
    and its number ``param`` (None for uniform)."""

    name: str
    kind: str
    param: Optional[float]

    @property
    def random(self) -> bool:
        return self.kind in RANDOM_KINDS


def parse_shift(name: str) -> Shift:
    """Check one shift name; ValueError with the accepted kinds or the parameter's range otherwise.

    forward-R, backward-R, step-R: R >= 1; dirichlet-A: A > 0; knockout-P: 0 < P < 1;
    tweakone-RHO: 0 < RHO < 1 (the range that leaves every class a row depends on the test split
    and is checked by :func:`shift_subset`).
    """
    name = name.strip()
    if name == "uniform":
        return Shift(name, "uniform", None)
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"unknown shift {name!r}; use one of {', '.join(KINDS)} (e.g. dirichlet-1.0)")
    kind, value = m.group(1), float(m.group(2))
    if not math.isfinite(value):
        raise ValueError(f"shift {name!r}: the number must be finite")
    if kind in ("forward", "backward"):
        parse_test_priors(name)  # LADE's names keep their own check (R a number >= 1)
    elif kind == "step" and value < 1:
        raise ValueError(f"shift {name!r}: step-R needs R >= 1 (the ratio of the two class sizes)")
    elif kind == "dirichlet" and value <= 0:
        raise ValueError(f"shift {name!r}: dirichlet-A needs a concentration A > 0")
    elif kind == "knockout" and not 0 < value < 1:
        raise ValueError(f"shift {name!r}: knockout-P needs a fraction P with 0 < P < 1")
    elif kind == "tweakone" and not 0 < value < 1:
        raise ValueError(f"shift {name!r}: tweakone-RHO needs a share RHO with 0 < RHO < 1")
    return Shift(name, kind, value)


def parse_shifts(text: str) -> tuple[str, ...]:
    """'forward-50,dirichlet-1,uniform' -> the names, each checked by :func:`parse_shift`; no repeats."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"no shift given; use e.g. forward-50,uniform,dirichlet-1 (kinds: {', '.join(KINDS)})")
    for n in names:
        parse_shift(n)
    if len(set(names)) != len(names):
        raise ValueError(f"shifts repeat a name: {text!r}")
    return names


def is_random(name: str) -> bool:
    """Whether the kind draws at random (dirichlet, knockout, tweakone): report it over several seeds."""
    return parse_shift(name).random


def tweakone_range(num_classes: int, M: int) -> tuple[float, float]:
    """[RHO_min, RHO_max] = [1 / ((C − 1)·M + 1), M / (M + C − 1)]: the shares that leave every class a row."""
    return 1.0 / ((num_classes - 1) * M + 1), M / (M + num_classes - 1)


def _test_support(labels: np.ndarray, C: int) -> np.ndarray:
    support = np.bincount(labels, minlength=C)
    if support.min() == 0:
        missing = np.flatnonzero(support == 0).tolist()
        raise ValueError(f"shifted test priors need test rows of every class; classes {missing[:10]} have none")
    return support


def class_sizes(shift: Shift, support: np.ndarray, counts: Any, rng: np.random.Generator,
                replace: bool = False) -> np.ndarray:
    """Rows (C,) int64 each class keeps under ``shift``; ``support``: test rows per class."""
    C, M = len(support), int(support.min())
    if shift.kind in ("forward", "backward", "uniform"):
        return shift_counts(shift.name, counts, torch.as_tensor(support)).numpy()
    if shift.kind == "step":
        low = int(M / shift.param)
        if low == 0:
            raise ValueError(f"shift {shift.name!r} keeps int(M / R) = 0 rows of the rarer half (M = {M}, the "
                             f"smallest test class); use R <= {M}")
        rank = class_ranks(counts).numpy()
        return np.where(rank < C // 2, M, low).astype(np.int64) if C > 1 else np.array([M])
    if shift.kind == "tweakone":
        if C < 2:
            raise ValueError(f"shift {shift.name!r} needs at least 2 classes")
        rho = shift.param
        lo, hi = tweakone_range(C, M)
        if not lo <= rho <= hi:
            raise ValueError(f"shift {shift.name!r}: with {C} classes and M = {M} rows in the smallest test class, "
                             f"RHO must lie in [{lo:.6g}, {hi:.6g}] for every class to keep a row")
        one = int(rng.integers(C))
        if rho > 1 / C:  # the tweaked class keeps M, the others their share of M / RHO
            k = np.full(C, math.floor((M / rho - M) / (C - 1) + 1e-9), dtype=np.int64)
            k[one] = M
        else:
            k = np.full(C, M, dtype=np.int64)
            k[one] = math.floor(M * (C - 1) * rho / (1 - rho) + 1e-9)
        return k
    if shift.kind == "knockout":
        removed = rng.multivariate_hypergeometric(np.full(C, M, dtype=np.int64), int(shift.param * M * C))
        return M - removed.astype(np.int64)
    # dirichlet
    pi = rng.dirichlet(np.full(C, shift.param))
    if replace:  # the MAPLS authors' size: M·C rows in total
        return np.floor(pi * (M * C)).astype(np.int64)
    k = np.floor(M * pi / pi.max()).astype(np.int64)
    k[int(pi.argmax())] = M
    return k


def _random_rows(labels: np.ndarray, support: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """k[c] rows of each class c: uniformly without replacement up to its support, the rest with replacement."""
    C = len(support)
    order = np.lexsort((rng.random(len(labels)), labels))  # class by class, random order within a class
    start = np.cumsum(support) - support
    sorted_labels = labels[order]
    rank = np.arange(len(labels)) - start[sorted_labels]
    idx = order[rank < np.minimum(k, support)[sorted_labels]]
    extra = np.maximum(k - support, 0)
    if extra.any():
        cls = np.repeat(np.arange(C), extra)
        pos = start[cls] + np.minimum((rng.random(len(cls)) * support[cls]).astype(np.int64), support[cls] - 1)
        idx = np.concatenate([idx, order[pos]])
    return np.sort(idx)


def shift_subset(name: str, labels: Any, counts: Any, *, seed: int = 0,
                 replace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(row indices int64 (n,), true prior float64 (C,)) of the test subset under the shift ``name``.

    ``labels``: test labels (N,); ``counts``: train rows per class (C,) (ranks classes for forward,
    backward and step). ``seed`` seeds the random kinds (deterministic kinds ignore it). Without
    ``replace`` no class gives more rows than it has; the indices are sorted and, with
    ``replace``, may repeat. The prior is the kept rows per class over their total.
    """
    shift = parse_shift(name)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    C = len(np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts))
    if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty (N,) integer array; got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"labels must lie in [0, {C}) (one train count per class); got {y.min()}..{y.max()}")
    support = _test_support(y, C)
    rng = np.random.default_rng(seed)
    k = class_sizes(shift, support, counts, rng, replace)
    over = np.flatnonzero(k > support)
    if len(over) and not replace:
        c = int(over[0])
        raise ValueError(f"shift {name!r} asks {int(k[c])} rows of class {c}, which has {int(support[c])} "
                         f"(at most {int(support[c])} without replacement); allow replacement to draw more")
    if shift.random:
        idx = _random_rows(y, support, k, rng)
    else:
        idx = shift_mask(torch.as_tensor(y), torch.as_tensor(k)).nonzero().flatten().numpy()
    return idx.astype(np.int64), k.astype(np.float64) / k.sum()
