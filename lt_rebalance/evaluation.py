"""Evaluate a fitted head on a session's splits; every number comes back as a value.

:func:`evaluate_head` returns an :class:`Evaluation`: per split, the metrics of
:func:`lt_rebalance.metrics.evaluate` and, under the session's protocol, bootstrap intervals and
their samples, and on the test split the shifted-prior numbers (:mod:`lt_rebalance.protocols`).
:meth:`Evaluation.result` is the JSON form runners put in their results.

A head whose scores are a per-class affine map of the stored classifier's logits
(:meth:`~lt_rebalance.heads.base.BaseHead.logit_affine`) is scored from the logits a
:class:`~lt_rebalance.logit_store.LogitStore` keeps, when one is given and keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .blocks import column_affine
from .logit_store import LogitStore
from .metrics import affine_row_statistics, evaluate, evaluate_rows
from .priors import NoImpliedPrior
from .protocols import bootstrap_report
from .session import Session
from .shifted import shifted_report


@dataclass
class SplitEvaluation:
    """One split: ``metrics``; with a bootstrap ``ci`` ({metric: [lo, hi]}) and ``samples``
    ({metric: float64 (B,)}, for paired differences; not JSON); on the test split under shifted
    priors ``shifted`` and ``shifted_corrected`` (:func:`lt_rebalance.shifted.shifted_report`)."""

    metrics: dict
    ci: Optional[dict] = None
    samples: Optional[dict] = None
    shifted: Optional[dict] = None
    shifted_corrected: Optional[dict] = None


@dataclass
class Evaluation:
    """Every evaluation split of one head (in order) and the protocol description, if one ran."""

    splits: dict[str, SplitEvaluation] = field(default_factory=dict)
    protocol: Optional[dict] = None

    @property
    def samples(self) -> dict[str, dict]:
        """split -> bootstrap samples, for the splits that have them."""
        return {s: e.samples for s, e in self.splits.items() if e.samples is not None}

    def result(self) -> dict:
        """``{split: metrics, ..., "ci": {split: ...}, "shifted", "shifted_corrected", "protocol"}``
        (the protocol keys only when computed)."""
        out: dict[str, Any] = {s: e.metrics for s, e in self.splits.items()}
        ci = {s: e.ci for s, e in self.splits.items() if e.ci is not None}
        if ci:
            out["ci"] = ci
        for e in self.splits.values():
            if e.shifted is not None:
                out["shifted"] = e.shifted
            if e.shifted_corrected is not None:
                out["shifted_corrected"] = e.shifted_corrected
        if self.protocol is not None:
            out["protocol"] = self.protocol
        return out


def stored_affine(head: Any, split: str, logits: Optional[LogitStore]) -> Optional[tuple]:
    """(R, a, c) with ``head``'s scores on ``split`` = R ⊙ a + c, R the kept X Wᵀ of the stored
    classifier; None without a store, when it keeps no logits for ``split``, or when the head is no
    affine map of them."""
    if logits is None:
        return None
    affine = head.logit_affine()
    R = None if affine is None else logits.eval_logits(split, head._device)
    return None if R is None else (R, *affine)


def evaluate_split(session: Session, head: Any, split: str, *, protocol: bool = True,
                   logits: Optional[LogitStore] = None) -> SplitEvaluation:
    """``head`` on ``split``: metrics, and with ``protocol`` the session protocol's numbers.

    Without a protocol the scores are reduced a block of rows at a time (no (N, C) matrix is held).
    A head without an implied prior gets ``shifted_corrected = {"reason": ...}``.
    """
    X, y = session.load(split)
    counts, thresholds = session.counts, session.thresholds
    shared = stored_affine(head, split, logits)
    p = session.protocol
    if not (protocol and p.active):
        if shared is not None:
            rows = affine_row_statistics(*shared, y, len(counts))
            return SplitEvaluation(evaluate_rows(rows, y, counts, **thresholds))
        return SplitEvaluation(head.evaluate(X, y, counts, **thresholds))
    scores = head.scores(X) if shared is None else column_affine(*shared)  # the protocols need every score
    out = SplitEvaluation(evaluate(scores, y, counts, **thresholds))
    boot = bootstrap_report(scores, y, counts, p, **thresholds)
    out.ci, out.samples = boot.get("ci"), boot.get("samples")
    if p.test_priors and split == "test":
        implied, reason = None, None
        try:
            implied = head.implied_prior(counts)
        except NoImpliedPrior as e:
            reason = str(e)
        val = None
        if implied is not None and p.needs_val:
            if not session.has_rows("val"):
                raise ValueError(f"{', '.join(p.prior_estimators)} with calibration {p.calibration} need a labelled "
                                 f"source sample, and {session.store.path} has no val rows; use --prior-estimators em")
            Xv, yv = session.load("val")
            shared_val = stored_affine(head, "val", logits)
            val = (head.scores(Xv) if shared_val is None else column_affine(*shared_val), yv)
        rescore = (lambda rows: head.scores(X[rows.to(X.device)])) if head.transductive else None
        extra = shifted_report(scores, y, counts, implied, p, reason, val, rescore, **thresholds)
        out.shifted, out.shifted_corrected = extra["shifted"], extra["shifted_corrected"]
    return out


def evaluate_head(session: Session, head: Any, *, protocol: bool = True, logits: Optional[LogitStore] = None,
                  splits: Optional[Sequence[str]] = None) -> Evaluation:
    """``head`` on ``splits`` (default: the session's evaluation splits), see :func:`evaluate_split`."""
    run_protocol = protocol and session.protocol.active
    splits = list(session.eval_splits if splits is None else splits)
    if run_protocol and session.protocol.test_priors and "test" not in splits:
        raise ValueError("--test-priors are evaluated on the test split; add it to --splits")
    ev = Evaluation({s: evaluate_split(session, head, s, protocol=protocol, logits=logits) for s in splits})
    if run_protocol:
        ev.protocol = session.protocol.describe()
    return ev


def report(session: Session, head: Any, *, protocol: bool = True, logits: Optional[LogitStore] = None) -> dict:
    """The JSON form of :func:`evaluate_head` (its samples dropped)."""
    return evaluate_head(session, head, protocol=protocol, logits=logits).result()

