"""Evaluation protocols: shifted test priors, prior correction, bootstrap intervals.

Pure functions of (scores or predictions, labels, train counts) returning plain dicts, shared by
every method command, ``ltr compare``, ``ltr report`` and the benchmarks (docs/METHODS.md,
"Evaluation protocols").

* Shifted test priors, exactly as LADE's evaluation notebook (Hong et al., CVPR 2021): classes
  ranked by train count, most first (a stable sort: equal counts keep class-index order);
  ``forward-R`` keeps ``int(M · (1/R)^(i/(C−1)))`` test rows of the class at rank i,
  ``backward-R`` ``int(M · (1/R)^((C−1−i)/(C−1)))``, ``uniform`` M, where M is the smallest test
  count of any class; a class keeps its first rows in file order (:func:`shift_counts`,
  :func:`shift_mask`, :func:`shifted_metrics`).
* Prior correction of scores treated as logits: known target prior, z + log p_target − log p_implied
  (:func:`correct_known`), or a target prior estimated on the test scores by EM (Saerens,
  Latinne & Decaestecker, Neural Computation 2002; :func:`em_prior`). The prior each head was
  balanced for is its own answer (:meth:`~lt_rebalance.heads.base.BaseHead.implied_prior`).
* Percentile bootstrap over test rows, stratified by class (:func:`stratified_resamples`,
  :func:`bootstrap_metrics`, :func:`bootstrap_ci`), and paired differences between two methods on
  the same resamples (:func:`paired_difference`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from .metrics import GROUPS, accuracy_summary, group_accuracies

CI_KEYS = ("all", "many", "medium", "few", "mean_class")
_PRIOR_NAME = re.compile(r"^(forward|backward)-(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Protocol:
    """What a run reports beyond the plain metrics (the options of ``protocol_options``).

    ``test_priors``: shift names (:func:`lt_rebalance.shifts.parse_shifts`: LADE's forward-R,
    backward-R, uniform, and step-R, dirichlet-A, knockout-P, tweakone-RHO); ``shift_seed``,
    ``shift_draws``: the random kinds' seed and draws (mean ± std over draws); ``shift_replace``:
    a class may give more rows than it has (drawn with replacement); ``prior_estimators``: the
    test-prior estimators of :mod:`lt_rebalance.label_shift` whose corrections are reported beside
    the known prior; ``calibration``: recalibration on val before em and mapls (None,
    "temperature", "bcts"); ``bootstrap``: resamples B (0: none); ``ci_level``: e.g. 0.95;
    ``bootstrap_seed``: seeds the resamples (the same for every method, so differences are
    paired); ``em_iterations``/``em_tol``: :func:`em_prior`.
    """

    test_priors: tuple[str, ...] = ()
    bootstrap: int = 0
    ci_level: float = 0.95
    bootstrap_seed: int = 0
    em_iterations: int = 1000
    em_tol: float = 1e-6
    shift_seed: int = 0
    shift_draws: int = 1
    shift_replace: bool = False
    prior_estimators: tuple[str, ...] = ("em",)
    calibration: Optional[str] = None

    @property
    def needs_val(self) -> bool:
        """Whether the shifted-prior corrections need the val split's scores (BBSE, RLLS, calibration)."""
        return bool(self.test_priors) and (
            self.calibration is not None or any(m in ("bbse", "rlls") for m in self.prior_estimators))

    @property
    def active(self) -> bool:
        return bool(self.test_priors) or self.bootstrap > 0

    def describe(self) -> dict:
        """The settings as results record them (JSON ``"protocol"``)."""
        return {"test_priors": list(self.test_priors), "bootstrap": self.bootstrap, "ci_level": self.ci_level,
                "bootstrap_seed": self.bootstrap_seed, "interval": "percentile, stratified by class",
                "shift_seed": self.shift_seed, "shift_draws": self.shift_draws, "shift_replace": self.shift_replace,
                "prior_estimators": list(self.prior_estimators), "calibration": self.calibration}

    def resamples(self, labels: torch.Tensor) -> Iterator[torch.Tensor]:
        """The (b, N) index chunks of :func:`stratified_resamples` for ``labels`` (same for every method)."""
        return stratified_resamples(labels, self.bootstrap, self.bootstrap_seed)


# -- shifted test priors ------------------------------------------------------------------------------

def parse_test_priors(text: str) -> tuple[str, ...]:
    """'forward-50,uniform,backward-50' -> the names, checked (R any number >= 1); ValueError otherwise."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("no test prior given; use e.g. forward-50,uniform,backward-50")
    for n in names:
        m = _PRIOR_NAME.match(n)
        if n != "uniform" and (m is None or float(m.group(2)) < 1):
            raise ValueError(f"unknown test prior {n!r}; use forward-R, backward-R (R a number >= 1) or uniform")
    if len(set(names)) != len(names):
        raise ValueError(f"test priors repeat a name: {text!r}")
    return names


def class_ranks(counts: Any) -> torch.Tensor:
    """Rank (C,) int64 of each class by train count, most first; equal counts keep class order."""
    c = torch.as_tensor(counts, dtype=torch.int64)
    order = torch.argsort(c, descending=True, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(len(c)))


def shift_counts(name: str, counts: Any, test_counts: Any) -> torch.Tensor:
    """Test rows (C,) int64 each class keeps under the shifted prior ``name`` (LADE's protocol).

    ``counts``: train rows per class (the ranking); ``test_counts``: test rows per class (M is
    their minimum).
    """
    parse_test_priors(name)
    test_counts = torch.as_tensor(test_counts, dtype=torch.int64)
    C, M = len(test_counts), int(test_counts.min())
    if name == "uniform" or C == 1:
        return torch.full((C,), M, dtype=torch.int64)
    direction, R = _PRIOR_NAME.match(name).groups()
    i = class_ranks(counts).to(torch.float64)
    exponent = i / (C - 1) if direction == "forward" else (C - 1 - i) / (C - 1)
    # float64 then truncation, as int() of the notebook's numpy float
    return (M * (1.0 / float(R)) ** exponent).to(torch.int64)


def shift_mask(labels: Any, keep: torch.Tensor) -> torch.Tensor:
    """bool (N,): the first ``keep[c]`` rows of each class c, in file order."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    order = torch.argsort(labels, stable=True)  # class by class, file order within a class
    support = torch.bincount(labels, minlength=len(keep))
    start = torch.cumsum(support, 0) - support
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - start[labels[order]]
    return rank < keep.to(labels.device)[labels]


def shifted_metrics(pred: torch.Tensor, labels: Any, counts: Any, mask: torch.Tensor, **thresholds: int) -> dict:
    """{all, many, medium, few, n} of ``pred`` (N,) on the rows of ``mask``.

    ``all`` is over the kept rows; a group is the mean per-class accuracy of its classes that keep
    at least one row (NaN when none does).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).to(pred.device)
    mask = mask.to(pred.device)
    m = accuracy_summary(pred[mask], labels[mask], counts, **thresholds)
    return {**{k: m[k] for k in ("all", *GROUPS)}, "n": int(mask.sum())}


# -- prior correction ----------------------------------------------------------------------------------

def correct_known(scores: torch.Tensor, target: torch.Tensor, implied: torch.Tensor) -> torch.Tensor:
    """Scores (N, C) + log p_target − log p_implied (a class of zero target prior gets −inf)."""
    offset = torch.log(target.to(torch.float64)) - torch.log(implied.to(torch.float64))
    return scores.to(torch.float64) + offset.to(scores.device)


def em_prior(scores: torch.Tensor, implied: torch.Tensor, *, max_iter: int = 1000,
             tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Target prior float64 (C,) estimated by EM on unlabelled scores (Saerens et al., 2002).

    The posteriors P = softmax(scores) (N, C) are taken to hold under ``implied``; each step
    reweights them by w = p_t / p_implied, renormalises each row, and sets p_t to their mean, until
    the prior moves less than ``tol`` (max-norm). A step is two matrix-vector products:
    p_t ← w ⊙ Pᵀ(1 / (P w)) / N. Returns (p_t, iterations run).
    """
    from .label_shift import em_iterate  # the iteration, shared with label_shift's "em" and "mapls"

    P = torch.softmax(scores.to(torch.float64), dim=1)
    return em_iterate(P, implied.to(torch.float64).to(P.device), max_iter=max_iter, tol=tol)


# -- bootstrap -------------------------------------------------------------------------------------------

def stratified_resamples(labels: Any, B: int, seed: int = 0, max_elements: int = 1 << 24) -> Iterator[torch.Tensor]:
    """Row indices of ``B`` stratified bootstrap resamples, int64 chunks (b, N), b·N <= max_elements.

    Each resample draws, for every class, as many rows as it has, with replacement from its own
    rows, so every class keeps its size. Column k of a chunk always holds a row of the class of
    ``labels[sorted_k]`` (columns are ordered class by class). Seeded: the same labels, B and seed
    give the same resamples.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    N = len(labels)
    order = torch.argsort(labels, stable=True)
    support = torch.bincount(labels)
    start = (torch.cumsum(support, 0) - support)[labels[order]]  # (N,) first sorted position of the class
    size = support[labels[order]]
    gen = torch.Generator().manual_seed(seed)
    step = max(1, max_elements // max(N, 1))
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        # uniform draw within the class: int(u · n_c) with u in [0, 1), float64 so that n_c up to 2^52 is exact
        pos = torch.rand(b, N, generator=gen, dtype=torch.float64).mul_(size).long().clamp_max_(size - 1)
        yield order[pos.add_(start)]


def bootstrap_metrics(pred: torch.Tensor, labels: Any, counts: Any, resamples: Iterator[torch.Tensor],
                      **thresholds: int) -> dict[str, torch.Tensor]:
    """all / many / medium / few / mean_class of ``pred`` (N,) on every resample: float64 (B,) each.

    Per chunk one gather and one running sum give the (b, C) hits; no loop over resamples.
    ``resamples`` are :func:`stratified_resamples` chunks (columns grouped by class).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    correct = (pred.cpu() == labels).to(torch.float32)
    C, N = len(counts), len(labels)
    support = torch.bincount(labels, minlength=C)
    ends = torch.cumsum(support, 0)  # the columns of a resample hold class 0's rows, then class 1's, ...
    out: dict[str, list[torch.Tensor]] = {k: [] for k in CI_KEYS}
    for idx in resamples:
        # hits of class c: the sum over its columns, from one running sum (exact: integers < 2^24)
        run = torch.nn.functional.pad(correct[idx].cumsum_(1), (1, 0))
        hits = (run[:, ends] - run[:, ends - support]).to(torch.float64)
        out["all"].append(hits.sum(1) / N)
        for k, v in group_accuracies(hits / support.to(torch.float64), counts, **thresholds).items():
            out[k].append(v)
    return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.float64) for k, v in out.items()}


def percentile_interval(samples: torch.Tensor, level: float) -> list[Optional[float]]:
    """[lo, hi] percentile interval (linear interpolation, numpy's default) at ``level``; NaN-free."""
    s = samples[~torch.isnan(samples)]
    if len(s) == 0:
        return [None, None]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(s, q).tolist()
    return [lo, hi]


def bootstrap_ci(samples: dict[str, torch.Tensor], level: float) -> dict[str, list]:
    """{metric: [lo, hi]} of :func:`bootstrap_metrics`'s samples."""
    return {k: percentile_interval(v, level) for k, v in samples.items()}


def paired_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], level: float,
                      key: str = "all") -> dict:
    """``key`` of a − b on the same resamples: {"metric", "ci": [lo, hi], "differs"} (0 outside the CI)."""
    d = a[key] - b[key]
    lo, hi = percentile_interval(d, level)
    differs = lo is not None and (lo > 0 or hi < 0)
    return {"metric": key, "ci": [lo, hi], "differs": bool(differs)}


def bootstrap_report(scores: torch.Tensor, labels: Any, counts: Any, protocol: Protocol, **thresholds: int) -> dict:
    """``{"ci": {metric: [lo, hi]}, "samples": {metric: (B,)}}`` of the bootstrap on one split (the
    samples are for paired differences, not JSON); ``{}`` without a bootstrap."""
    if protocol.bootstrap <= 0:
        return {}
    pred = scores.argmax(1)
    samples = bootstrap_metrics(pred, labels, counts, protocol.resamples(torch.as_tensor(labels)), **thresholds)
    return {"ci": bootstrap_ci(samples, protocol.ci_level), "samples": samples}


def seed_summary(results: Sequence[dict], splits: Sequence[str], keys: Sequence[str] = CI_KEYS) -> dict:
    """{"seeds": n, split: {metric: {"mean", "std"}}} over runs (std: sample, ddof = 1; 0 for one run)."""
    out: dict[str, Any] = {}
    for s in splits:
        per = {}
        for k in keys:
            vals = [r[s][k] for r in results if r.get(s) is not None and r[s].get(k) is not None
                    and not (isinstance(r[s][k], float) and math.isnan(r[s][k]))]
            if vals:
                t = torch.tensor(vals, dtype=torch.float64)
                per[k] = {"mean": t.mean().item(), "std": t.std().item() if len(vals) > 1 else 0.0}
        out[s] = per
    return out


def paired_differences(rows: Sequence[dict], samples: Sequence[dict], level: float, key: str = "all") -> None:
    """Add ``"vs_best": {split: {...}}`` to each of ``rows`` (in place), against the best row per split.

    ``samples[i]`` holds row i's bootstrap samples per split (:func:`bootstrap_metrics`, the same
    resamples for every row). The best row has the highest point ``key``; each row gets
    ``{"best": <its method>, "metric": key, "diff": point difference, "ci": [lo, hi], "differs"}``
    (and ``"best_features"`` when the rows carry ``"features"``).
    """
    splits = {s for smp in samples for s in smp}
    for split in sorted(splits):
        scored = [(i, r[split][key]) for i, r in enumerate(rows)
                  if split in samples[i] and r.get(split) and r[split].get(key) is not None
                  and not math.isnan(r[split][key])]
        if not scored:
            continue
        best = max(scored, key=lambda t: t[1])[0]  # ties: the earlier row
        for i, point in scored:
            d = paired_difference(samples[i][split], samples[best][split], level, key)
            where = {"best_features": rows[best]["features"]} if "features" in rows[best] else {}
            rows[i].setdefault("vs_best", {})[split] = {
                "best": rows[best]["method"], **where, **d, "diff": point - rows[best][split][key],
            }
