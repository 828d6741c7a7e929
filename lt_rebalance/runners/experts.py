"""The test-agnostic ensemble of logit-adjusted experts of the stored classifier (``experts``)."""
from __future__ import annotations

from typing import Sequence

from ..blocks import linear_logits
from ..heads import LogitAdjustedExperts
from ..session import Session
from . import MethodRun, evaluated
from .stored_head import joint_head


def run_experts(session: Session, taus: Sequence[float] = (0.0, 1.0, 2.0)) -> MethodRun:
    """Experts z − τ log π of the stored classifier, weighted for the prior estimated on each set scored.

    The result adds ``"taus"`` and ``"combination": {split: {"tau", "weights"}}``, what the ensemble
    chose on each evaluation split (shifted subsets choose their own).
    """
    head = LogitAdjustedExperts(joint_head(session), session.counts, taus).fit()
    combination = {}
    for split in session.eval_splits:
        X, _ = session.load(split)
        if len(X):
            c = head.combination(linear_logits(X, head.weight_.to(X.device), head.bias_.to(X.device)))
            combination[split] = {"tau": c["tau"], "weights": c["weights"]}
    return evaluated(session, head, {"method": "experts", "taus": [float(t) for t in taus],
                                     "combination": combination})
