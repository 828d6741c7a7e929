"""Multinomial logistic regression with full-batch L-BFGS, scikit-learn's objective (the CLIP linear probe).

scikit-learn's ``LogisticRegression(C, class_weight)`` with the lbfgs solver minimises
½‖W‖² + C · Σᵢ sᵢ · ℓᵢ (ℓ the multinomial cross-entropy, the intercept not penalised), which its
code (``_logistic.py``, ``_linear_loss.py``, scikit-learn 1.9) hands to
``scipy.optimize.minimize(method="L-BFGS-B")`` divided by C · S, S = Σᵢ sᵢ:

    f(W, b) = (1/S) Σᵢ sᵢ ℓᵢ + ‖W‖² / (2 C S),

starting from zeros, with ``maxiter=max_iter``, ``gtol=tol``, ``ftol=64·eps``, ``maxls=50``.
We drive the same scipy optimiser with the same f and options, and evaluate f and its gradient
with torch on the head's device (the two GEMMs of a pass over the train rows, in row chunks), so
a C means the same in both and the predictions agree.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..blocks import low_mm, low_precision, tf32_products
from ..devices import resolve_device
from ..precision import fit_precision
from ..priors import normalise, train_prior, uniform_prior
from .base import BaseHead, Interval, Is, StrOptions, check_fit_data
from .linear import LinearDecision

CLASS_WEIGHTS = ("balanced", "none")
PRECISIONS = ("float32", "float64", "bfloat16", "tf32", "auto")


def sample_weights(y: torch.Tensor, classes: np.ndarray, class_weight: Any) -> torch.Tensor:
    """sᵢ (float64, (N,)) for class indices y: 1 (``"none"``); ``"balanced"``: N / (K · n_yᵢ) with K the
    classes present in y (scikit-learn's); a dict: ``class_weight[classes_[yᵢ]]`` (1 for classes it omits)."""
    if isinstance(class_weight, dict):
        w = torch.tensor([float(class_weight.get(c.item() if hasattr(c, "item") else c, 1.0)) for c in classes],
                         dtype=torch.float64, device=y.device)
        return w[y]
    if class_weight == "none":
        return torch.ones(len(y), dtype=torch.float64, device=y.device)
    counts = torch.bincount(y, minlength=len(classes)).to(torch.float64)
    return (len(y) / (int((counts > 0).sum()) * counts))[y]


class _Objective:
    """f and ∇f of the module docstring on (X, y, s), for a flat float64 parameter vector (K·(D+1),)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, s: torch.Tensor, K: int, C: float, dtype: torch.dtype,
                 chunk: int, precision: str = "float32"):
        """``dtype``: of the pass arithmetic (float32, float64); ``precision``: of its two GEMMs
        ("bfloat16": operands rounded, :func:`lt_rebalance.blocks.mm`)."""
        self.X, self.y, self.K, self.dtype, self.chunk = X, y, K, dtype, chunk
        self.precision, self.low = precision, low_precision(precision)
        self.s_sum = float(s.sum())
        self.s = (s / self.s_sum).to(dtype)  # (N,), normalised: f's data term is Σ s ℓ
        self.l2 = 1.0 / (C * self.s_sum)
        self.evaluations = 0

    def unpack(self, theta: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(theta.reshape(self.K, -1)).to(self.X.device, self.dtype)
        return t[:, :-1], t[:, -1]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        W, b = self.unpack(theta)
        Wl = None if self.low is None else W.to(self.low)
        gW, gb = torch.zeros_like(W), torch.zeros_like(b)
        data = torch.zeros((), dtype=torch.float64, device=W.device)
        for start in range(0, self.X.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            x, y, s = self.X[rows].to(self.low or self.dtype), self.y[rows], self.s[rows]
            if self.low is None:
                with tf32_products(self.precision == "tf32" and x.is_cuda):
                    z = torch.addmm(b, x, W.T)  # (n, K)
            else:
                z = low_mm(x, Wl.T).add_(b)
            lse = torch.logsumexp(z, 1)
            data += (s * (lse - z.gather(1, y[:, None])[:, 0])).sum(dtype=torch.float64)
            g = torch.exp_(z.sub_(lse[:, None]))  # softmax, in place of the logits
            g[torch.arange(len(y), device=y.device), y] -= 1
            g.mul_(s[:, None])  # ∂(Σ s ℓ)/∂z
            if self.low is None:
                with tf32_products(self.precision == "tf32" and x.is_cuda):
                    gW.addmm_(g.T, x)
            else:
                gW.add_(low_mm(g.T.to(self.low), x))
            gb += g.sum(0)
        gW.add_(W, alpha=self.l2)
        f = data.item() + 0.5 * self.l2 * float(W.double().square().sum())
        grad = torch.cat([gW, gb[:, None]], 1).double().cpu().numpy().ravel()
        return f, grad


class LinearProbe(LinearDecision, BaseHead):
    """Multinomial logistic regression on cached features, scikit-learn's ``LogisticRegression``
    objective (lbfgs solver) with full-batch L-BFGS; see the module docstring.

    For two classes scikit-learn fits the binary logistic loss with one weight vector, whose
    optimum is the multinomial one at C / 2 (w = w₁ − w₂, w₁ = −w₂); the probe uses that C, so
    the predictions agree there too.

    Parameters
    ----------
    C : float, default=1.0
        Inverse regularisation strength, as in scikit-learn.
    class_weight : {"balanced", "none"} or dict, default="balanced"
        "balanced": sᵢ = N / (K · n_yᵢ) (scikit-learn's ``class_weight="balanced"``); a dict
        {class label: weight} as scikit-learn's (classes it omits weigh 1).
    max_iter : int, default=100
    tol : float, default=1e-4
        scikit-learn's: stop when max |projected gradient of f| ≤ tol.
    precision : {"float32", "float64", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the passes over the train rows (the optimiser itself runs in float64).
        "bfloat16" and "tf32" (CUDA) run the passes' two GEMMs so, their sums in float32; "auto"
        resolves as :func:`lt_rebalance.precision.resolve_precision`; scoring follows the
        products' precision (float32 for float64 passes).
    chunk : int, default=8192
        Rows per pass chunk (memory: chunk × K logits).
    device : str, default="auto"

    Attributes
    ----------
    weight_, bias_ : float32 (K, D), (K,)
    n_iter_ : int
        L-BFGS iterations.
    n_evaluations_ : int
        Evaluations of f and ∇f (each two GEMMs over the train rows).
    converged_ : bool
        False when ``max_iter`` was reached before the tolerance.
    classes_ : ndarray (K,)
    objective_ : float
        f at the solution.

    Notes
    -----
    ``predict_proba`` is the fitted multinomial model; with ``class_weight="balanced"`` it estimates
    the posterior for a balanced prior.
    """

    _parameter_constraints = {
        "C": [Interval(float, 0, None, closed="neither")],
        "class_weight": [StrOptions(set(CLASS_WEIGHTS)), Is(lambda v: isinstance(v, dict), "a dict {class: weight}")],
        "max_iter": [Interval(int, 1, None)],
        "tol": [Interval(float, 0, None)],
        "precision": [StrOptions(set(PRECISIONS))],
        "chunk": [Interval(int, 1, None)],
    }

    def __init__(
        self,
        C: float = 1.0,
        *,
        class_weight: str = "balanced",
        max_iter: int = 100,
        tol: float = 1e-4,
        precision: str = "float32",
        chunk: int = 8192,
        device: str = "auto",
    ):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.precision = precision
        self.chunk = chunk
        self.device = device

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """π re-weighted by the class weights: uniform for "balanced", π for "none", π·w for a dict."""
        pi = train_prior(counts)
        if self.class_weight == "balanced":
            return uniform_prior(counts)
        if self.class_weight == "none":
            return pi
        w = sample_weights(torch.arange(len(pi)), self.classes_, self.class_weight).to(torch.float64)
        return normalise(pi * w)

    def fit(self, X: Any, y: Any, num_classes: Optional[int] = None, *, init: Optional[LinearProbe] = None
            ) -> LinearProbe:
        """Fit on X float (N, D), labels (N,). ``num_classes``: the labels are ints in [0, num_classes)
        (classes_ = arange(num_classes)), else classes_ = the distinct labels. ``init``: a fitted probe
        (same classes) to start from."""
        from scipy.optimize import minimize

        self._validate_params()
        device = resolve_device(self.device)
        X, y, classes = check_fit_data(X, y, num_classes, device)
        K = len(classes)
        present = int((torch.bincount(y, minlength=K) > 0).sum())
        if present < 2:
            raise ValueError(f"logistic regression needs train rows of at least 2 classes; got {present} class")
        C = self.C / 2 if present == 2 else self.C
        dtype = torch.float64 if self.precision == "float64" else torch.float32
        passes = self.precision if self.precision == "float64" else fit_precision(self.precision, device,
                                                                                  "linear_probe")
        self.precision_ = "float32" if passes == "float64" else passes
        obj = _Objective(X, y, sample_weights(y, classes, self.class_weight), K, C, dtype, self.chunk, passes)
        D = X.shape[1]
        theta0 = np.zeros(K * (D + 1))
        if init is not None:
            theta0 = torch.cat([init.weight_, init.bias_[:, None]], 1).double().cpu().numpy().ravel()
        res = minimize(obj, theta0, method="L-BFGS-B", jac=True,
                       options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                                "ftol": 64 * np.finfo(float).eps})
        W, b = obj.unpack(res.x)
        self.weight_, self.bias_ = W.float().contiguous(), b.float().contiguous()
        self.n_iter_, self.n_evaluations_ = int(res.nit), obj.evaluations
        self.converged_ = bool(res.status == 0)  # 1: max_iter reached, 2: line search failed
        self.objective_ = float(res.fun)
        self.n_features_in_ = D
        self.classes_ = classes
        return self


def fit_C_grid(
    probe: LinearProbe, X: Any, y: Any, X_val: Any, y_val: Any, Cs: Sequence[float], num_classes: Optional[int] = None
) -> tuple[LinearProbe, list[dict]]:
    """Fit ``probe`` at every C of ``Cs`` (ascending, each warm-started from the previous optimum, as
    scikit-learn's path) and select the best val top-1 (ties: the smaller C).

    Returns (the selected probe, one ``{"C", "val_top1", "n_iter", "converged"}`` per C in ascending order).
    """
    best, best_acc, rows, prev = None, -1.0, [], None
    for C in sorted(Cs):
        head = LinearProbe(**{**probe.get_params(deep=False), "C": float(C)}).fit(X, y, num_classes, init=prev)
        acc = head.score(X_val, y_val)
        rows.append({"C": float(C), "val_top1": acc, "n_iter": head.n_iter_, "converged": head.converged_})
        if acc > best_acc:
            best, best_acc = head, acc
        prev = head
    return best, rows
