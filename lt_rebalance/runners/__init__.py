"""The runners: one function per method, ``run_<method>(session, **options) -> MethodRun``.

A runner fits its method's head on a :class:`~lt_rebalance.session.Session`, evaluates it
(:mod:`lt_rebalance.evaluation`) and returns everything as a value: the JSON-ready result
``{"method": ..., <split>: metrics, ...}`` (accuracies as fractions in [0, 1]), the fitted head
(for saving, exporting or plotting) and the bootstrap samples of its evaluation (for paired
differences in ``compare``). Which runner a method has is the registry's word
(:mod:`lt_rebalance.registry`); runners that use the stored classifier's shared logits take a
:class:`~lt_rebalance.logit_store.LogitStore` as ``logits``.

Hyper-parameters are never chosen on the test split unless the caller asks for it: the
selection split of tau-normalisation and the keep-best epoch of cRT/LWS use ``val``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..evaluation import evaluate_head
from ..logit_store import LogitStore
from ..session import Session


@dataclass
class MethodRun:
    """What a runner returns: ``result`` (JSON-ready dict), the fitted ``head``, and ``samples``
    (split -> bootstrap samples of the reported head; empty without a bootstrap)."""

    result: dict
    head: Any
    samples: dict = field(default_factory=dict)


def evaluated(session: Session, head: Any, result: dict, logits: Optional[LogitStore] = None) -> MethodRun:
    """``head`` evaluated on the session's splits, its numbers appended to ``result``."""
    ev = evaluate_head(session, head, logits=logits)
    return MethodRun({**result, **ev.result()}, head, ev.samples)
