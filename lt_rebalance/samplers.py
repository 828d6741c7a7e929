"""Stage-2 samplers over training labels (docs/METHODS.md, "Samplers"), vectorised and seeded.

Every sampler returns the row indices of one epoch as an int64 tensor of shape
(num_batches, batch_size) with ``num_batches = int(N / batch_size)``, as the reference does
(its epoch stops after that many batches).

======  ======================================================================================
name    class probability p_j
======  ======================================================================================
ib      n_j / N: a random permutation of the rows (a shuffled DataLoader)
cb      uniform over classes: the reference's ClassAwareSampler (shuffled class cycle, 4
        consecutive rows of each visited class, each class's rows reshuffled when exhausted)
sqrt    n_j^(1/2) (any power q via :class:`PowerSampler`)
pb      progressively balanced: (1 - t/T) p_IB + (t/T) p_CB at epoch t of T
======  ======================================================================================
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch


def class_probabilities(counts: Any, q: float) -> torch.Tensor:
    """p_j ∝ n_j^q over classes (float64, sums to 1); classes with n_j = 0 get 0.

    Computed in log space (a softmax of q log n_j), so any finite q works: n^q of a 1,280-image class
    overflows float64 from q ≈ 100, and large q then concentrates on the largest classes, as it should.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    logw = torch.where(n > 0, q * n.clamp_min(1).log(), torch.full_like(n, -torch.inf))
    return torch.softmax(logw, 0)


def progressive_probabilities(counts: Any, epoch: int, num_epochs: int) -> torch.Tensor:
    """Progressively-balanced p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB."""
    t = epoch / max(num_epochs, 1)
    return (1 - t) * class_probabilities(counts, 1.0) + t * class_probabilities(counts, 0.0)


class _LabelIndex:
    """Rows grouped by class: ``order`` sorts rows by label, class j is order[start[j]:start[j]+count[j]]."""

    def __init__(self, labels: torch.Tensor, num_classes: Optional[int] = None):
        self.labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if self.labels.ndim != 1 or len(self.labels) == 0:
            raise ValueError("a sampler needs a non-empty 1-D label vector")
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        self.counts = torch.bincount(self.labels, minlength=self.num_classes)
        self.order = torch.argsort(self.labels, stable=True)
        self.start = torch.cumsum(self.counts, 0) - self.counts

    def rows_of_classes(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniformly drawn row of each given class (with replacement)."""
        r = torch.rand(classes.shape, generator=generator, dtype=torch.float64)
        within = (r * self.counts[classes]).long().clamp_max(self.counts[classes] - 1)
        return self.order[self.start[classes] + within]


class BaseSampler:
    """Common interface: ``epoch(epoch, num_epochs, batch_size, generator) -> (B, batch_size)``."""

    name = "base"

    def __init__(self, labels: Any, num_classes: Optional[int] = None):
        self.index = _LabelIndex(torch.as_tensor(labels), num_classes)

    def num_batches(self, batch_size: int) -> int:
        n = len(self.index.labels)
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch size must be between 1 and the number of training rows ({n}); got {batch_size}")
        return n // batch_size

    def epoch(self, epoch: int, num_epochs: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        m = self.num_batches(batch_size) * batch_size
        return self._draw(m, epoch, num_epochs, generator).view(-1, batch_size)

    def _draw(self, m: int, epoch: int, num_epochs: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def class_probabilities(self, epoch: int = 0, num_epochs: int = 1) -> torch.Tensor:
        """The probability of drawing each class (expected, per draw)."""
        raise NotImplementedError


class InstanceBalancedSampler(BaseSampler):
    """q = 1: a random permutation of the rows, without replacement (a shuffled DataLoader)."""

    name = "ib"

    def _draw(self, m, epoch, num_epochs, generator):
        return torch.randperm(len(self.index.labels), generator=generator)[:m]

    def class_probabilities(self, epoch=0, num_epochs=1):
        return class_probabilities(self.index.counts, 1.0)


class PowerSampler(BaseSampler):
    """p_j ∝ n_j^q, then a uniform row within the class (with replacement). q = 1/2 is square-root."""

    name = "power"

    def __init__(self, labels: Any, q: float = 0.5, num_classes: Optional[int] = None):
        super().__init__(labels, num_classes)
        self.q = q

    def class_probabilities(self, epoch=0, num_epochs=1):
        return class_probabilities(self.index.counts, self.q)

    def _draw(self, m, epoch, num_epochs, generator):
        cdf = torch.cumsum(self.class_probabilities(epoch, num_epochs), 0)
        u = torch.rand(m, generator=generator, dtype=torch.float64) * cdf[-1]
        classes = torch.searchsorted(cdf, u, right=True).clamp_max(len(cdf) - 1)
        return self.index.rows_of_classes(classes, generator)


class ProgressiveSampler(PowerSampler):
    """Progressively balanced: class probabilities move from IB (epoch 0) to CB (epoch T)."""

    name = "pb"

    def __init__(self, labels: Any, num_classes: Optional[int] = None):
        super().__init__(labels, 1.0, num_classes)

    def class_probabilities(self, epoch=0, num_epochs=1):
        return progressive_probabilities(self.index.counts, epoch, num_epochs)


class ClassAwareSampler(BaseSampler):
    """The reference's class-balanced sampler (``ClassAwareSampler`` with ``num_samples_cls=4``).

    Classes are visited in a shuffled cycle (reshuffled after each full cycle); each visit yields
    ``samples_per_class`` consecutive rows from that class's own shuffled cycle of rows (reshuffled
    when exhausted). Vectorised: the class visits and every class's row cycles of an epoch are
    drawn with a few sorts. Note: the reference carries its cycle positions over epoch boundaries;
    here each epoch starts fresh cycles, which leaves the sampling distribution unchanged.
    """

    name = "cb"

    def __init__(self, labels: Any, samples_per_class: int = 4, num_classes: Optional[int] = None):
        super().__init__(labels, num_classes)
        self.samples_per_class = samples_per_class

    def class_probabilities(self, epoch=0, num_epochs=1):
        return class_probabilities(self.index.counts, 0.0)

    def _draw(self, m, epoch, num_epochs, generator):
        idx, k = self.index, self.samples_per_class
        present = torch.nonzero(idx.counts > 0).flatten()
        n_visits = math.ceil(m / k)
        n_cycles = math.ceil(n_visits / len(present))
        cycle_order = torch.argsort(torch.rand(n_cycles, len(present), generator=generator), dim=1)
        visits = present[cycle_order.flatten()[:n_visits]]  # class of each visit

        # occurrence number of each visit within its class (0, 1, 2, ... in visit order)
        per_class = torch.bincount(visits, minlength=idx.num_classes)
        by_class = torch.argsort(visits, stable=True)
        first = torch.cumsum(per_class, 0) - per_class
        occurrence = torch.empty_like(visits)
        occurrence[by_class] = torch.arange(n_visits) - first[visits[by_class]]

        # each class's stream of rows: ceil(need / n) shuffled passes over its rows, back to back
        passes = torch.where(idx.counts > 0, -(-(per_class * k) // idx.counts.clamp_min(1)), 0)
        rep = passes[idx.labels[idx.order]]  # passes needed for each row (rows in class order)
        rows = idx.order.repeat_interleave(rep)
        cls = idx.labels[rows]
        group_start = torch.cumsum(rep, 0) - rep
        pass_no = torch.arange(len(rows)) - group_start.repeat_interleave(rep)
        group = cls * (int(passes.max()) + 1) + pass_no  # (class, pass), increasing
        key = (group << 31) | torch.randint(0, 2**31, (len(rows),), generator=generator)
        stream = rows[torch.argsort(key)]
        stream_len = passes * idx.counts
        stream_start = torch.cumsum(stream_len, 0) - stream_len
        pos = stream_start[visits, None] + occurrence[:, None] * k + torch.arange(k)
        return stream[pos].flatten()[:m]


SAMPLERS = ("ib", "cb", "sqrt", "pb")
# q of each named sampler (p_j ∝ n_j^q) once training ends: pb ends class-balanced
SAMPLER_POWERS = {"ib": 1.0, "cb": 0.0, "sqrt": 0.5, "pb": 0.0}


def parse_sampler(sampler: Union[str, float]) -> Union[str, float]:
    """A sampler name, or a finite power q given as a number or its text; ValueError otherwise."""
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return sampler
    try:
        q = float(sampler)
    except (TypeError, ValueError):
        q = math.nan
    if not math.isfinite(q):
        raise ValueError(f"unknown sampler {sampler!r}; use {', '.join(SAMPLERS)} or a finite power q")
    return q


def final_class_probabilities(counts: Any, sampler: Union[str, float]) -> torch.Tensor:
    """p_j (float64, sums to 1) the sampler draws at the end of training; a class without train rows
    counts as one row (as :func:`lt_rebalance.priors.train_prior`)."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1)
    return class_probabilities(n, SAMPLER_POWERS[sampler] if sampler in SAMPLER_POWERS else float(sampler))


def make_sampler(name: Union[str, float], labels: Any, num_classes: Optional[int] = None) -> BaseSampler:
    """Build a sampler by name (``ib``, ``cb``, ``sqrt``, ``pb``) or by power q (a number)."""
    if isinstance(name, (int, float)) or _is_number(name):
        q = float(name)
        if q == 1.0:
            return InstanceBalancedSampler(labels, num_classes)
        return PowerSampler(labels, q, num_classes)
    if name == "ib":
        return InstanceBalancedSampler(labels, num_classes)
    if name == "cb":
        return ClassAwareSampler(labels, num_classes=num_classes)
    if name == "sqrt":
        return PowerSampler(labels, 0.5, num_classes)
    if name == "pb":
        return ProgressiveSampler(labels, num_classes)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} or a power q (e.g. 0.5)")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except (TypeError, ValueError):
        return False
    return True
