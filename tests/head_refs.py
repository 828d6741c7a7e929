"""Independent numpy references and small Gaussian data shared by the head tests of several folders (not a
test module). Each reference is a direct float64 transcription of the formula in docs/METHODS.md or of the
paper's code, never a call into lt_rebalance."""
from __future__ import annotations

import math

import numpy as np


def np_group_summary(pred, y, counts, many=100, few=20):
    """all / mean_class / many / medium / few as the reference's shot_acc (NaN for an empty group)."""
    counts = np.asarray(counts)
    C = len(counts)
    acc = np.array([np.mean(pred[y == j] == j) if np.any(y == j) else np.nan for j in range(C)])

    def mean(mask):
        vals = acc[mask & ~np.isnan(acc)]
        return float(vals.mean()) if len(vals) else math.nan

    m, f = counts > many, counts < few
    return {
        "all": float(np.mean(pred == y)),
        "mean_class": mean(np.ones(C, bool)),
        "many": mean(m),
        "medium": mean(~m & ~f),
        "few": mean(f),
    }


def np_tau_logits(X, W, tau):
    X, W = np.asarray(X, np.float64), np.asarray(W, np.float64)
    Wt = W / np.linalg.norm(W, axis=1, keepdims=True) ** tau
    return X @ Wt.T


def min_top2_margin(logits):
    s = np.sort(logits, axis=1)
    return float(((s[:, -1] - s[:, -2]) / (np.abs(s[:, -1]) + 1e-12)).min())


def joint_like_weight(data):
    """A joint-style classifier: class means, with norms growing with the class's train count."""
    norms = 0.5 + np.log(data["counts"]) / np.log(data["counts"].max())
    return (data["means"] * norms[:, None]).astype(np.float32)


def gaussians(counts, dim=5, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(counts), dim))
    y = np.repeat(np.arange(len(counts)), counts)
    return means[y] + spread * rng.normal(size=(len(y), dim)), y, rng


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_knn_shares(Xtr, ytr, Xq, k, T, p, num_classes):
    """DINO's knn_classifier: one-hot labels of the k most cosine-similar rows, summed with weight
    exp(sim / T); divided by n_c^p; as shares of the row's total."""
    A = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    Q = Xq / np.linalg.norm(Xq, axis=1, keepdims=True)
    S = Q @ A.T
    V = np.zeros((len(Q), num_classes))
    for i in range(len(Q)):
        for j in np.argsort(-S[i])[:k]:
            V[i, ytr[j]] += np.exp(S[i, j] / T)
    V /= np.bincount(ytr, minlength=num_classes) ** p
    return V / V.sum(1, keepdims=True)
