"""Nearest class mean (REFERENCE.md, "NCM")."""
from __future__ import annotations

from typing import Any

import torch

from .base import BaseHead, StrOptions, check_features, check_is_fitted

NCM_VARIANTS = ("cl2n", "l2n", "un", "cos")


class NCM(BaseHead):
    """Nearest class mean classifier on (eval-transform) train features.

    Parameters
    ----------
    variant : {"cl2n", "l2n", "un", "cos"}, default="cl2n"
        ``cl2n``: subtract the plain mean of all train rows, then L2-normalise each feature;
        ``l2n``: normalise only; ``un``: raw features. Score = -squared Euclidean distance to each
        centroid. ``cos`` (the reference's ``dist_type='cos'``): the cl2n feature dotted with the
        (not renormalised) cl2n centroid, divided by D.
    device : str, default="cpu"

    Attributes
    ----------
    mean_ : float32 (D,)
        Train mean subtracted by cl2n/cos (zeros otherwise).
    centroids_ : float32 (C, D)
        Mean of each class's transformed train features (not renormalised).
    n_features_in_ : int

    Examples
    --------
    >>> NCM().fit(X_train, y_train).predict(X_test)          # doctest: +SKIP
    """

    _parameter_constraints = {"variant": [StrOptions(set(NCM_VARIANTS))]}

    def __init__(self, variant: str = "cl2n", *, device: str = "cpu"):
        self.variant = variant
        self.device = device

    def _transform(self, X: torch.Tensor) -> torch.Tensor:
        if self.variant == "un":
            return X
        Z = X - self.mean_ if self.variant in ("cl2n", "cos") else X
        return torch.nn.functional.normalize(Z, dim=1)

    def fit(self, X: Any, y: Any, num_classes: int | None = None) -> NCM:
        """Compute the train mean and class centroids. X float (N, D), y int (N,)."""
        self._validate_params()
        X, y = check_features(X, y, device=self.device)
        self.n_features_in_ = X.shape[1]
        self.mean_ = X.mean(0) if self.variant in ("cl2n", "cos") else X.new_zeros(X.shape[1])
        Z = self._transform(X)
        counts = torch.bincount(y, minlength=num_classes or 0)
        if (counts == 0).any():
            missing = counts.eq(0).nonzero().flatten().tolist()
            raise ValueError(f"NCM needs train rows for every class; none for classes {missing[:10]}")
        self.centroids_ = Z.new_zeros(len(counts), Z.shape[1]).index_add_(0, y, Z) / counts[:, None]
        return self

    def decision_function(self, X: Any) -> torch.Tensor:
        """Scores float32 (N, C): -squared distance to each centroid (``cos``: scaled dot product)."""
        check_is_fitted(self, "centroids_")
        Z = self._transform(check_features(X, n_features=self.n_features_in_, device=self.device))
        if self.variant == "cos":
            return Z @ self.centroids_.T / Z.shape[1]
        # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2, one GEMM
        d = torch.addmm(self.centroids_.square().sum(1)[None, :], Z, self.centroids_.T, alpha=-2.0)
        return d.add_(Z.square().sum(1, keepdim=True)).neg_()  # in place: no extra (N, C) arrays
