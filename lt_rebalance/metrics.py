"""Evaluation metrics for long-tailed classification.

Accuracies are fractions in [0, 1]. Shot groups come from **training** counts (REFERENCE.md):
many > 100, few < 20, medium otherwise; a group's accuracy is the mean of the per-class accuracies
of its classes that have evaluation images (the reference's ``shot_acc``), and NaN when none do.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

GROUPS = ("many", "medium", "few")
DEFAULT_MANY, DEFAULT_FEW = 100, 20


def _tensor(a: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    return t.to(dtype) if dtype is not None else t


def shot_groups(counts: Any, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict[str, torch.Tensor]:
    """Boolean masks (C,) of the many (> many), medium and few (< few) shot classes."""
    if few > many + 1:
        raise ValueError(f"the few threshold ({few}) must not exceed the many threshold ({many}) + 1")
    c = _tensor(counts, torch.int64)
    m, f = c > many, c < few
    return {"many": m, "medium": ~m & ~f, "few": f}


def group_sizes(counts: Any, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict[str, int]:
    return {g: int(mask.sum()) for g, mask in shot_groups(counts, many, few).items()}


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class, float64 (C,); NaN for classes with no evaluation images.

    ``pred`` may be (N,) or batched (T, N) predictions; the result is then (T, C).
    """
    labels = labels.to(pred.device)
    support = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    correct = (pred == labels).to(torch.float64)
    if pred.ndim == 1:
        hits = torch.zeros(num_classes, dtype=torch.float64, device=pred.device).index_add_(0, labels, correct)
    else:
        hits = torch.zeros(pred.shape[0], num_classes, dtype=torch.float64, device=pred.device)
        hits.index_add_(1, labels, correct)
    return hits / support  # 0/0 -> NaN for absent classes


def group_accuracies(class_acc: torch.Tensor, counts: Any, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict:
    """Mean per-class accuracy over all classes and over each shot group (NaN when empty).

    ``class_acc`` is (C,) or (T, C); each value in the result is a float or a (T,) tensor.
    """
    out = {"mean_class": torch.nanmean(class_acc, dim=-1)}
    for g, mask in shot_groups(counts, many, few).items():
        out[g] = torch.nanmean(class_acc[..., mask.to(class_acc.device)], dim=-1)
    return {k: (v.item() if v.ndim == 0 else v) for k, v in out.items()}


def accuracy_summary(pred: torch.Tensor, labels: torch.Tensor, counts: Any, **thresholds: int) -> dict:
    """Top-1 ("all", micro), mean-class and many/medium/few accuracy from predictions (N,) or (T, N)."""
    labels = _tensor(labels, torch.int64).to(pred.device)
    num_classes = len(counts)
    out = group_accuracies(per_class_accuracy(pred, labels, num_classes), counts, **thresholds)
    all_ = ((pred == labels).to(torch.float64).mean(dim=-1) if len(labels)
            else torch.full(pred.shape[:-1], float("nan"), dtype=torch.float64, device=pred.device))
    out["all"] = all_.item() if all_.ndim == 0 else all_
    return out


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes that appear in labels or predictions."""
    tp = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, (pred == labels).to(torch.float64))
    n_pred = torch.bincount(pred, minlength=num_classes).to(torch.float64)
    n_true = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    present = (n_pred + n_true) > 0
    f1 = 2 * tp[present] / (n_pred[present] + n_true[present])
    return f1.mean().item() if present.any() else float("nan")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins over (0, 1]: sum_b |B|/N * |acc_b - conf_b|."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(torch.float64)
    conf = conf.to(torch.float64)
    # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 joins the first bin
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    return ((acc_sum - conf_sum).abs().sum() / max(len(labels), 1)).item()


def evaluate(
    scores: Any,
    labels: Any,
    counts: Any,
    *,
    many: int = DEFAULT_MANY,
    few: int = DEFAULT_FEW,
    n_bins: int = 15,
) -> dict[str, float]:
    """Every metric of a classifier's scores on one split.

    Parameters
    ----------
    scores : tensor or array (N, C)
        Logits (or any scores where higher is better; NLL/ECE use their softmax).
    labels : int (N,)
    counts : int (C,)
        Training images per class (defines the shot groups).

    Returns
    -------
    dict with ``all`` (top-1, micro), ``mean_class``, ``many``, ``medium``, ``few``, ``top5``,
    ``macro_f1``, ``nll``, ``ece`` (floats; NaN where undefined, e.g. an empty group) and ``n``.
    """
    scores = _tensor(scores).float()
    labels = _tensor(labels, torch.int64).to(scores.device)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (N, C) with N = len(labels) = {labels.shape[0]}; got {tuple(scores.shape)}")
    if scores.shape[1] != len(counts):
        raise ValueError(f"scores have {scores.shape[1]} classes but counts have {len(counts)}")
    if not torch.isfinite(scores).all():
        raise ValueError(
            "the classifier produced NaN/Inf scores (float32 overflow: features or weights of huge magnitude?); "
            "rescale the features, e.g. divide them by their mean L2 norm"
        )
    num_classes = scores.shape[1]
    pred = scores.argmax(dim=1)
    out = accuracy_summary(pred, labels, counts, many=many, few=few)
    if len(labels) == 0:
        return {**out, "top5": float("nan"), "macro_f1": float("nan"), "nll": float("nan"), "ece": float("nan"), "n": 0}
    k = min(5, num_classes)
    out["top5"] = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    pred, labels_cpu = pred.cpu(), labels.cpu()
    out["macro_f1"] = macro_f1(pred, labels_cpu, num_classes)
    logp = torch.log_softmax(scores.double(), dim=1)
    out["nll"] = -logp.gather(1, labels[:, None]).mean().item()
    out["ece"] = expected_calibration_error(logp.exp().cpu(), labels_cpu, n_bins)
    out["n"] = int(len(labels))
    return out
