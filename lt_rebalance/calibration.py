"""Recalibration of class probabilities on a labelled sample, for label-shift estimation
(docs/METHODS.md, "Label-shift estimation"): temperature scaling and bias-corrected temperature
scaling (BCTS; Alexandari, Kundaje & Shrikumar, ICML 2020), fitted by minimising the NLL.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # log-probabilities floored at -87.3


def log_probs(P: torch.Tensor) -> torch.Tensor:
    """log P floored at log(float32 tiny) = −87.3 (a float32 softmax underflows to 0 below it)."""
    return torch.log(P).clamp_min(LOG_FLOOR)


def fit_bcts(logits: Any, labels: Any, *, max_iter: int = 2000) -> tuple[float, np.ndarray]:
    """(T, b): bias-corrected temperature scaling, softmax(z / T + b) minimising the mean NLL.

    ``logits`` float (N, C), ``labels`` int (N,). The NLL is convex in (1/T, b), so L-BFGS-B (scipy)
    from the temperature-scaling optimum (b = 0) finds the minimum; b is returned centred (softmax
    ignores a common shift). At the optimum the mean calibrated probability equals the label
    frequency of every class (the bias's stationarity condition).
    """
    from scipy.optimize import minimize

    from .posthoc import fit_temperature

    z = torch.as_tensor(logits).to(torch.float64)
    y = torch.as_tensor(labels).to(torch.int64).to(z.device)
    n, C = z.shape
    freq = torch.bincount(y, minlength=C).to(z) / n
    z_y = z.gather(1, y[:, None]).squeeze(1)

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x[0], torch.from_numpy(x[1:]).to(z)
        s = a * z + b
        lse = torch.logsumexp(s, 1)
        S = torch.exp(s - lse[:, None])
        loss = float((lse - a * z_y - b[y]).mean())
        ga = float(((S * z).sum(1) - z_y).mean())
        gb = (S.mean(0) - freq).cpu().numpy()
        return loss, np.concatenate([[ga], gb])

    x0 = np.concatenate([[1.0 / fit_temperature(z, y)], np.zeros(C)])
    res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=[(1e-8, None)] + [(None, None)] * C,
                   options={"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-10})
    b = res.x[1:] - res.x[1:].mean()
    return float(1.0 / res.x[0]), b


def recalibrate(V: torch.Tensor, y: torch.Tensor, P: torch.Tensor,
                kind: str) -> tuple[torch.Tensor, torch.Tensor, float, Optional[np.ndarray]]:
    """Fit ``kind`` ("temperature" or "bcts") on val probabilities ``V`` (N, C) and labels ``y``;
    return (V, P) recalibrated (float64), T and the centred bias (None for temperature scaling)."""
    from .posthoc import fit_temperature

    zv, zt = log_probs(V), log_probs(P)
    if kind == "temperature":
        T, bias = fit_temperature(zv, y), None
        b = torch.zeros(V.shape[1], dtype=torch.float64)
    else:
        T, bias = fit_bcts(zv, y)
        b = torch.from_numpy(bias)
    b = b.to(P.device)
    return torch.softmax(zv / T + b, dim=1), torch.softmax(zt / T + b, dim=1), T, bias
