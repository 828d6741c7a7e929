"""Methods built on the stored stage-1 classifier without training: joint, τ-norm, logit adjustment
and PC softmax (τ of the two selected on val, as ``compare`` runs them)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..devices import resolve_device
from ..heads import JointHead, TauNorm
from ..logit_store import LogitStore
from ..posthoc import LogitAdjustment, pc_softmax
from ..session import Session
from . import MethodRun, evaluated


def joint_head(session: Session, method: str = "joint") -> JointHead:
    """The stored classifier as a fitted head on the session's device, its products in the precision
    ``method`` (a registry name) runs in (:meth:`Session.precision_for`)."""
    W, b = session.head()
    return JointHead(W, b, device=session.device, precision=session.precision_for(method)).fit()


def run_joint(session: Session, logits: Optional[LogitStore] = None) -> MethodRun:
    """The stored stage-1 classifier (logits = X Wᵀ + b)."""
    head = joint_head(session)
    return evaluated(session, head, {"method": "joint", "precision": head.precision_}, logits)


def _val_logits(logits: Optional[LogitStore], device: Any, precision: str) -> Optional[torch.Tensor]:
    """The kept X Wᵀ of val (the sweep's GEMM), or None; only when kept in ``precision`` (the sweep's)."""
    if logits is None or precision != logits.session.precision_for("joint"):
        return None
    return logits.eval_logits("val", device, precision)


def run_tau_norm(session: Session, logits: Optional[LogitStore] = None) -> MethodRun:
    """τ-norm with τ selected on val, reported on every evaluation split."""
    if not session.has_rows("val"):
        raise ValueError("tau-norm needs a 'val' split with rows to select tau on (see `ltr tau-sweep --select-on`)")
    W, _ = session.head()
    Xv, yv = session.load("val")
    precision = session.precision_for("tau_norm")
    head = TauNorm(W, device=session.device, precision=precision)
    head.fit(Xv, yv, session.counts, logits=_val_logits(logits, resolve_device(session.device), precision))
    return evaluated(session, head, {"method": "tau_norm", "selected_tau": head.tau_, "selected_on": "val",
                                     "precision": precision}, logits)


def run_logit_adjust(session: Session, logits: Optional[LogitStore] = None) -> MethodRun:
    """Logit adjustment of the stored classifier, τ selected on val."""
    if not session.has_rows("val"):
        raise ValueError("logit adjustment needs a 'val' split with rows to select tau on "
                         "(see `ltr logit-adjust --select-on`)")
    base = joint_head(session, "logit_adjust")
    head = LogitAdjustment(base, session.counts).fit(*session.load("val"),
                                                     logits=_val_logits(logits, base._device, base.precision_))
    return evaluated(session, head, {"method": "logit_adjust", "selected_tau": head.tau_, "selected_on": "val",
                                     "precision": base.precision_}, logits)


def run_pc_softmax(session: Session, logits: Optional[LogitStore] = None) -> MethodRun:
    """PC softmax: the stored classifier's logits minus log π (logit adjustment at τ = 1)."""
    base = joint_head(session, "pc_softmax")
    head = pc_softmax(base, session.counts)
    return evaluated(session, head, {"method": "pc_softmax", "tau": 1.0, "precision": base.precision_}, logits)
