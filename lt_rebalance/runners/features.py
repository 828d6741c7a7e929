"""Methods fitted on the train features alone (no stored classifier): NCM, weighted kNN and the
L-BFGS linear probe."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ..heads import KNN, NCM, LinearProbe
from ..heads.linear_probe import fit_C_grid
from ..session import Session
from . import MethodRun, evaluated


def run_ncm(session: Session, variant: str = "cl2n") -> MethodRun:
    """Nearest class mean of the train rows (``variant``: cl2n, l2n, un, cos)."""
    X, y = session.train()
    head = NCM(variant, device=session.device, precision=session.precision_for("ncm"))
    head.fit(X, y, num_classes=session.num_classes)
    return evaluated(session, head, {"method": "ncm", "variant": variant, "precision": head.precision_})


def run_knn(session: Session, k: int = 20, temperature: float = 0.07, balance: float = 0.0) -> MethodRun:
    """Weighted kNN on the train rows (votes exp(sim / T) of the k nearest, divided by n_c^balance)."""
    X, y = session.train()
    head = KNN(k, temperature, balance=balance, device=session.device, precision=session.precision_for("knn"))
    head.fit(X, y, num_classes=session.num_classes)
    return evaluated(session, head, {"method": "knn", "k": k, "temperature": temperature, "balance": balance,
                                     "precision": head.precision_})


def run_linear_probe(session: Session, C: float = 1.0, C_grid: Optional[Sequence[float]] = None,
                     **params: Any) -> MethodRun:
    """L-BFGS logistic regression (scikit-learn's objective) with ``params`` (LinearProbe's keywords;
    ``precision`` defaults to the session's, and the result's ``precision`` is the one its passes ran in).

    With ``C_grid`` every C is fitted and the best val top-1 is kept; the result then also has
    ``"grid"``: one ``{"C", "val_top1", "n_iter", "converged"}`` per C, and ``"selected_on": "val"``.
    """
    X, y = session.train()
    params.setdefault("precision", session.precision)
    probe = LinearProbe(C, device=session.device, **params)
    extra: dict[str, Any] = {}
    if C_grid:
        Xv, yv = session.val()
        if Xv is None:
            raise ValueError(f"a C grid selects C on val, and {session.store.path} has no 'val' split")
        probe, extra["grid"] = fit_C_grid(probe, X, y, Xv, yv, C_grid, session.num_classes)
        extra["selected_on"] = "val"
    else:
        probe.fit(X, y, session.num_classes)
    shown = {k: v for k, v in probe.get_params().items() if k not in ("device", "chunk")}
    shown["precision"] = "float64" if probe.precision == "float64" else probe.precision_
    return evaluated(session, probe, {"method": "linear_probe", **shown, "n_iter": probe.n_iter_,
                                      "converged": probe.converged_, **extra})
