"""Weighted k-nearest-neighbour vote on L2-normalised features (Wu et al., CVPR 2018; DINO/DINOv2 eval)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..blocks import low_precision, mm
from ..precision import PRECISIONS, fit_precision
from .base import BaseHead, Interval, StrOptions, check_fit_data

_FLOOR = 1e-12  # vote share given to classes without votes, so log-scores stay finite


def topk_similar(
    Q: torch.Tensor, T: torch.Tensor, k: int, *, train_block: int = 32768, precision: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest Q Tᵀ per row of Q (n, D), over rows of T (N, D) taken ``train_block`` at a time.

    Returns (similarities float32 (n, k), indices int64 (n, k)), sorted in decreasing order. Memory
    stays at n × (train_block + k): each block's top-k is merged into the running top-k.
    ``precision``: of the products (:func:`lt_rebalance.blocks.mm`; T may already be bfloat16).
    """
    best_s = Q.new_full((Q.shape[0], 0), -torch.inf)
    best_i = torch.empty((Q.shape[0], 0), dtype=torch.int64, device=Q.device)
    for start in range(0, T.shape[0], train_block):
        S = mm(Q, T[start : start + train_block].T, precision)
        s, i = S.topk(min(k, S.shape[1]), dim=1)
        del S
        cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i = cand_i.gather(1, pos)
    return best_s, best_i


def add_votes(out: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, by_column: Optional[bool] = None
              ) -> torch.Tensor:
    """``out[i, labels[i, j]] += weights[i, j]`` (out (n, C), labels and weights (n, k)), in place.

    Deterministic on every device: the CPU's ``scatter_add_`` adds a row's k votes serially in
    column order; CUDA's adds them with float atomics in a varying order, so there (``by_column``,
    None: by device) the votes are added one column j at a time, each touching one entry per row
    (no two additions to one entry race), in the same order j = 0..k-1.
    """
    if by_column is None:
        by_column = out.is_cuda
    if not by_column:
        return out.scatter_add_(1, labels, weights)
    for j in range(labels.shape[1]):  # k columns (k ~ 20), not samples or classes
        out.scatter_add_(1, labels[:, j : j + 1], weights[:, j : j + 1])
    return out


class KNN(BaseHead):
    """Weighted kNN classifier: the k most cosine-similar train rows vote with weight exp(sim / T).

    Train and query features are L2-normalised; for a query x the vote for class c is
    v_c = Σ_{i ∈ top-k(x), y_i = c} exp(cos(x, x_i) / T), as DINO's ``knn_classifier``
    (which sums one-hot labels weighted by exp(sim / T)). The class-balanced variant divides by
    the class's train count raised to ``balance``: v_c / n_c^p (p = 0: plain DINO, p = 1: votes
    per train image). Scores are log(v_c / Σ_c' v_c'), the log of the vote shares (DINO's
    "probs" normalised), with shares floored at 1e-12 so classes without votes stay finite; the
    argmax is DINO's prediction (ties: the smaller class index), and ``predict_proba`` (their
    softmax) gives the vote shares: a vote distribution, not a calibrated posterior.

    Computation is blocked over query rows (``query_block``) and train rows (``train_block``),
    with a running top-k merge per query block, so memory stays at query_block × train_block
    similarities (iNaturalist: 437k train × 24k queries in 128 MiB blocks).

    Parameters
    ----------
    k : int, default=20
    temperature : float, default=0.07
        T of DINO / DINOv2 (which evaluate k in 10, 20, 100, 200 with T = 0.07).
    balance : float, default=0.0
        Power p of the class-balanced variant.
    query_block, train_block : int, default=1024, 32768
    device : str, default="cpu"
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the similarity products (:mod:`lt_rebalance.precision`); votes are float32.

    Attributes
    ----------
    train_features_ : float32 (N, D), L2-normalised (bfloat16 under precision bfloat16: rounded once)
    train_labels_ : int64 (N,)
    class_weights_ : float32 (C,)
        1 / n_c^p (0 for classes without train rows).
    classes_ : ndarray (C,)
    """

    _state = "train_features_"
    _parameter_constraints = {
        "k": [Interval(int, 1, None)],
        "temperature": [Interval(float, 0, None, closed="neither")],
        "balance": [Interval(float, 0, None)],
        "query_block": [Interval(int, 1, None)],
        "train_block": [Interval(int, 1, None)],
        "precision": [StrOptions(set(PRECISIONS))],
    }

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        *,
        balance: float = 0.0,
        query_block: int = 1024,
        train_block: int = 32768,
        device: str = "cpu",
        precision: str = "float32",
    ):
        self.k = k
        self.temperature = temperature
        self.balance = balance
        self.query_block = query_block
        self.train_block = train_block
        self.device = device
        self.precision = precision

    def fit(self, X: Any, y: Any, num_classes: Optional[int] = None) -> KNN:
        """Store the normalised train rows. X float (N, D), labels (N,); ``num_classes``: the labels are
        ints in [0, num_classes) (classes_ = arange(num_classes)), else classes_ = the distinct labels."""
        self._validate_params()
        X, y, classes = check_fit_data(X, y, num_classes, self.device)
        self.precision_ = fit_precision(self.precision, X.device, "knn")
        counts = torch.bincount(y, minlength=len(classes)).float()
        self.class_weights_ = torch.where(counts > 0, counts.clamp_min(1).pow(-self.balance), 0.0)
        self.train_features_ = F.normalize(X.float(), dim=1)  # float16 features are upcast (exact)
        low = low_precision(self.precision_)
        if low is not None:  # rounded once: converting the train rows for every query block costs more
            self.train_features_ = self.train_features_.to(low)
        self.train_labels_ = y
        self.n_features_in_ = X.shape[1]
        self.classes_ = classes
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """None: the votes are weighted counts of neighbours, not posteriors balanced for a known prior."""
        from ..priors import NoImpliedPrior

        raise NoImpliedPrior("kNN votes are weighted counts of neighbours, not class posteriors of a known prior")

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Log vote shares float32 (N, C), floored at 1e-12: log(v_c / Σ_c' v_c')."""
        T, labels = self.train_features_, self.train_labels_
        out = X.new_zeros(X.shape[0], len(self.class_weights_), dtype=torch.float32)
        for start in range(0, X.shape[0], self.query_block):
            rows = slice(start, start + self.query_block)
            sim, idx = topk_similar(F.normalize(X[rows].float(), dim=1), T, self.k, train_block=self.train_block,
                                    precision=self.precision_)
            # exp((s - s_max) / T): exp(s / T) up to a per-row factor (the shares are unchanged),
            # neither overflowing nor underflowing to all-zero votes at small T
            add_votes(out[rows], labels[idx], (sim - sim[:, :1]).div_(self.temperature).exp_())
        out.mul_(self.class_weights_)
        return out.div_(out.sum(1, keepdim=True)).clamp_min_(_FLOOR).log_()
