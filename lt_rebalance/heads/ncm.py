"""Nearest class mean (docs/METHODS.md, "NCM")."""
from __future__ import annotations

from typing import Any

import torch

from ..blocks import CACHE_ROWS, class_sums, low_precision, mm, row_blocks
from ..precision import PRECISIONS, fit_precision
from ..priors import uniform_prior
from .base import BaseHead, StrOptions, check_fit_data

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
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the scoring GEMM (transformed rows · centroids; :mod:`lt_rebalance.precision`).
        The mean, the centroids and the distances are float32 whatever it is.

    Attributes
    ----------
    mean_ : float32 (D,)
        Train mean subtracted by cl2n/cos (zeros otherwise).
    centroids_ : float32 (C, D)
        Mean of each class's transformed train features (not renormalised), row j for ``classes_[j]``.
    precision_ : str
        The precision of the scoring GEMM ("float32", "bfloat16" or "tf32").
    classes_ : ndarray (C,)
        The sorted train labels, or arange(num_classes) when ``fit`` is given ``num_classes``.
    n_features_in_ : int

    Notes
    -----
    ``predict_proba`` is softmax(-squared distance) (``cos``: of the scaled dot product). It ranks
    classes as ``predict`` does but is not calibrated: cl2n distances lie in [0, 4], so the
    probabilities are nearly uniform. Fit :class:`~lt_rebalance.posthoc.TemperatureScaled` on
    val data for usable probabilities.

    Examples
    --------
    >>> NCM().fit(X_train, y_train).predict(X_test)          # doctest: +SKIP
    """

    _parameter_constraints = {"variant": [StrOptions(set(NCM_VARIANTS))], "precision": [StrOptions(set(PRECISIONS))]}
    _state = "centroids_"

    def __init__(self, variant: str = "cl2n", *, device: str = "cpu", precision: str = "float32"):
        self.variant = variant
        self.device = device
        self.precision = precision

    def _centred_norms(self, X: torch.Tensor, rows: slice, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the block ``X[rows]`` upcast into ``buffer`` (float32 (CACHE_ROWS, D), overwritten):
        (X - mean, row norms clamped as F.normalize does) for cl2n/l2n/cos; (X, None) for un."""
        D = buffer[: rows.stop - rows.start].copy_(X[rows])
        if self.variant == "un":
            return D, None
        if self.variant in ("cl2n", "cos"):
            D.sub_(self.mean_)
        return D, torch.linalg.vector_norm(D, dim=1, keepdim=True).clamp_min_(_EPS)

    def fit(self, X: Any, y: Any, num_classes: int | None = None) -> NCM:
        """Compute the train mean and class centroids. X float (N, D), y (N,) labels.

        ``num_classes``: the labels are ints in [0, num_classes) and every class needs train rows.
        float16 features stay float16; the mean is accumulated in float64 over float32 blocks, then
        rounded to float32.
        """
        self._validate_params()
        X, y, classes = check_fit_data(X, y, num_classes, self.device)
        self.precision_ = fit_precision(self.precision, X.device, "ncm")
        self.n_features_in_ = X.shape[1]
        self.mean_ = torch.zeros(X.shape[1], device=X.device)
        if self.variant in ("cl2n", "cos"):
            total = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
            for rows in row_blocks(X.shape[0]):
                total += X[rows].sum(0, dtype=torch.float64)  # exact float64 values of any float dtype
            self.mean_ = (total / max(X.shape[0], 1)).to(torch.float32)
        counts = torch.bincount(y, minlength=len(classes))
        if (counts == 0).any():
            missing = counts.eq(0).nonzero().flatten().tolist()
            raise ValueError(f"NCM needs train rows for every class; none for classes {missing[:10]}")
        sums = torch.zeros(len(counts), X.shape[1], device=X.device)
        buffer = _block_buffer(X)
        for rows in row_blocks(X.shape[0], CACHE_ROWS):  # cache-sized blocks: the transformed rows never exist at once
            Z, norms = self._centred_norms(X, rows, buffer)
            class_sums(sums, y[rows], Z if norms is None else Z.div_(norms))  # deterministic on CUDA too
        self.classes_ = classes
        self.centroids_ = sums / counts[:, None]
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """Uniform: one mean per class, whatever its size."""
        return uniform_prior(counts)

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Scores float32 (N, C): -squared distance to each centroid (``cos``: scaled dot product).

        With z = d / |d| (d the centred row): z·c = (d·c) / |d|, so one GEMM of the centred rows
        with the centroids gives every score; ||z - c||^2 = ||z||^2 - 2 z·c + ||c||^2.
        """
        C = self.centroids_
        out = C.new_empty(X.shape[0], C.shape[0])
        c_sq = C.square().sum(1)[None, :]
        low = low_precision(self.precision_)
        Ct = C.T if low is None else C.to(low).T  # rounded once, not per block
        buffer = _block_buffer(X)
        for rows in row_blocks(X.shape[0], CACHE_ROWS):
            Dc, norms = self._centred_norms(X, rows, buffer)
            scores = mm(Dc, Ct, self.precision_, out=out[rows])  # d·c
            if self.variant == "cos":
                scores.div_(norms * Dc.shape[1])
                continue
            if norms is None:
                z_sq = Dc.square().sum(1, keepdim=True)
            else:
                scores.div_(norms)
                z_sq = (norms > _EPS).to(norms.dtype)  # |z| is 1, or 0 for a zero row (F.normalize)
            scores.mul_(2).sub_(c_sq).sub_(z_sq)  # -(||z||^2 - 2 z·c + ||c||^2)
        return out


_EPS = 1e-12  # F.normalize's default


def _block_buffer(X: torch.Tensor) -> torch.Tensor:
    """One float32 (CACHE_ROWS, D) block that every block of X is copied (upcast) into: the transform
    works in place, and no block is a fresh allocation."""
    return X.new_empty(min(CACHE_ROWS, max(len(X), 1)), X.shape[1], dtype=torch.float32)

