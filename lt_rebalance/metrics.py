"""Evaluation metrics for long-tailed classification.

Accuracies are fractions in [0, 1]. Shot groups come from **training** counts (docs/METHODS.md,
"Evaluation"): many > 100, few < 20, medium otherwise; a group's accuracy is the mean of the
per-class accuracies of its classes that have evaluation images (the reference's ``shot_acc``),
and NaN when none do. Tail metrics (:func:`tail_accuracies`: worst class, worst 10 %, harmonic
mean of the groups) are here too; the imbalance of a train split (:func:`imbalance_stats`) and the
shot-group sizes (:func:`group_sizes`) are re-exported from the torch-free :mod:`lt_rebalance.imbalance`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from .blocks import SCORE_ROWS, all_finite, column_affine, row_blocks
from .imbalance import (  # noqa: F401 (re-exported; torch-free there)
    DEFAULT_FEW,
    DEFAULT_MANY,
    GROUPS,
    check_thresholds,
    group_sizes,
    imbalance_stats,
)


def _tensor(a: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    return t.to(dtype) if dtype is not None else t


def shot_groups(counts: Any, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict[str, torch.Tensor]:
    """Boolean masks (C,) of the many (> many), medium and few (< few) shot classes."""
    check_thresholds(many, few)
    c = _tensor(counts, torch.int64)
    m, f = c > many, c < few
    return {"many": m, "medium": ~m & ~f, "few": f}


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


def per_class_accuracy_table(pred: Any, labels: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy float64 (C,), support int64 (C,)) of predictions int (N,): the rows of a per-class CSV.

    ``support[j]`` is the number of evaluation rows of class j; ``accuracy[j]`` is NaN where it is 0.
    """
    pred, labels = _tensor(pred, torch.int64), _tensor(labels, torch.int64)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must both be (N,); got {tuple(pred.shape)} and {tuple(labels.shape)}")
    labels = labels.to(pred.device)
    return per_class_accuracy(pred, labels, num_classes), torch.bincount(labels, minlength=num_classes)


def per_class_records(pred: Any, labels: Any, counts: Any, many: int = DEFAULT_MANY,
                      few: int = DEFAULT_FEW) -> list[dict[str, Any]]:
    """One dict per class, in class order, for a per-class CSV: ``class`` (index), ``train_count``,
    ``group`` (many/medium/few), ``support`` (evaluation rows), ``correct`` and ``accuracy``
    (None where ``support`` is 0)."""
    pred, labels = _tensor(pred, torch.int64), _tensor(labels, torch.int64)
    acc, support = per_class_accuracy_table(pred, labels, len(counts))
    correct = torch.bincount(labels[pred == labels.to(pred.device)].cpu(), minlength=len(counts))
    groups = shot_groups(counts, many, few)
    group_of = ["many" if m else "few" if f else "medium" for m, f in zip(groups["many"].tolist(), groups["few"].tolist())]
    return [
        {"class": j, "train_count": int(n), "group": g, "support": int(s),
         "correct": k, "accuracy": a if s else None}
        for j, (n, g, s, k, a) in enumerate(zip(_tensor(counts, torch.int64).tolist(), group_of, support.tolist(),
                                                correct.tolist(), acc.tolist()))
    ]


def tail_accuracies(class_acc: torch.Tensor, groups: dict[str, float]) -> dict[str, float]:
    """Worst-case summaries of per-class accuracies float (C,) (NaN: class without evaluation rows).

    ``worst_class``: the smallest accuracy over the classes with evaluation rows. ``worst_10pct``:
    the mean of the k smallest, k = ceil(K / 10) of those K classes (at least one class; computed
    in integers, -(-K // 10)). ``hmean``: the harmonic mean of the ``groups`` accuracies
    (``many``, ``medium``, ``few``) that are not NaN (groups with evaluation rows); 0 when any of
    them is 0. Each is NaN when there is nothing to summarise.
    """
    acc = class_acc[~torch.isnan(class_acc)].to(torch.float64)
    K = acc.numel()
    out = {"worst_class": float("nan"), "worst_10pct": float("nan")}
    if K:
        low = torch.sort(acc).values[: -(-K // 10)]
        out = {"worst_class": low[0].item(), "worst_10pct": low.mean().item()}
    vals = [float(groups[g]) for g in GROUPS if not math.isnan(float(groups[g]))]
    out["hmean"] = (float("nan") if not vals else 0.0 if min(vals) == 0 else len(vals) / sum(1 / v for v in vals))
    return out


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
    return _accuracy_summary(pred, labels, counts, **thresholds)[0]


def _accuracy_summary(pred: torch.Tensor, labels: torch.Tensor, counts: Any, **thresholds: int
                      ) -> tuple[dict, torch.Tensor]:
    """:func:`accuracy_summary` and the per-class accuracies it was built from."""
    labels = _tensor(labels, torch.int64).to(pred.device)
    num_classes = len(counts)
    class_acc = per_class_accuracy(pred, labels, num_classes)
    out = group_accuracies(class_acc, counts, **thresholds)
    all_ = ((pred == labels).to(torch.float64).mean(dim=-1) if len(labels)
            else torch.full(pred.shape[:-1], float("nan"), dtype=torch.float64, device=pred.device))
    out["all"] = all_.item() if all_.ndim == 0 else all_
    return out, class_acc


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes that appear in labels or predictions."""
    labels = labels.to(pred.device)  # buffers on the predictions' device (a GPU's, or the CPU)
    tp = torch.zeros(num_classes, dtype=torch.float64, device=pred.device).index_add_(
        0, labels, (pred == labels).to(torch.float64))
    n_pred = torch.bincount(pred, minlength=num_classes).to(torch.float64)
    n_true = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    present = (n_pred + n_true) > 0
    f1 = 2 * tp[present] / (n_pred[present] + n_true[present])
    return f1.mean().item() if present.any() else float("nan")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins over (0, 1]: sum_b |B|/N * |acc_b - conf_b|."""
    conf, pred = probs.max(dim=1)
    return calibration_error(conf.to(torch.float64), pred == labels, n_bins)


def calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> float:
    """ECE (``n_bins`` bins) of per-row confidences float64 (N,) and correctness bool (N,)."""
    correct = correct.to(torch.float64)
    # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 joins the first bin
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, correct.to(conf.device))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, conf)
    return ((acc_sum - conf_sum).abs().sum() / max(len(correct), 1)).item()


NONFINITE_SCORES = (
    "the classifier produced NaN/Inf scores (float32 overflow: features or weights of huge magnitude?); "
    "rescale the features, e.g. divide them by their mean L2 norm"
)


def row_statistics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-row quantities every metric is built from, for one block of rows.

    ``scores`` float (n, C), ``labels`` int64 (n,). Returns tensors (n,) on the scores' device: ``pred`` int64
    (argmax), ``top5`` bool (label among the 5 best), ``nll`` float64 (−log softmax of the label)
    and ``conf`` float64 (the largest softmax probability).

    log Σ_j exp(z_j) = m + log Σ_j exp(z_j − m) with m the row maximum, the exponentials and
    their (cascaded) sum in float32: the sum is within 4e-7 relative of a float64 one, so NLL is
    within about 4e-7 of a float64 log-softmax and conf = 1 / Σ_j exp(z_j − m) within 4e-7
    relative, at a fraction of its cost (benchmarks/ measures it).
    """
    scores = scores.float()
    if not all_finite(scores):
        raise ValueError(NONFINITE_SCORES)
    m, pred = scores.max(dim=1, keepdim=True)  # the first maximal index on ties, as argmax
    total = torch.exp(scores - m).sum(dim=1).double()  # >= 1: the maximum's term
    k = min(5, scores.shape[1])
    out = {
        "pred": pred[:, 0],
        "top5": (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1),
        "nll": m[:, 0].double() + total.log() - scores.gather(1, labels[:, None])[:, 0].double(),
        "conf": total.reciprocal(),
    }
    return out


def _rows(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict[str, torch.Tensor]:
    parts = []
    for scores, labels in blocks:
        if scores.ndim != 2 or scores.shape[1] != num_classes:
            raise ValueError(f"scores have {scores.shape[-1]} classes but counts have {num_classes}")
        parts.append(row_statistics(scores, labels.to(scores.device)))
    return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}  # one copy to the host, at the end


def _blocks(n: int) -> list[slice]:
    return list(row_blocks(n, SCORE_ROWS)) or [slice(0, 0)]


def score_row_statistics(scores: Any, labels: Any, num_classes: int) -> dict[str, torch.Tensor]:
    """:func:`row_statistics` of a whole (N, C) score matrix, taken a block of rows at a time."""
    scores, labels = _tensor(scores), _tensor(labels, torch.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (N, C) with N = len(labels) = {labels.shape[0]}; got {tuple(scores.shape)}")
    return _rows(((scores[s], labels[s]) for s in _blocks(len(labels))), num_classes)


def head_row_statistics(head: Any, X: Any, labels: Any, num_classes: int) -> dict[str, torch.Tensor]:
    """:func:`row_statistics` of a fitted head's scores on X (N, D) for labels int64 (N,) (indices
    into ``classes_``), computed a block of rows at a time (``head.scores_in_blocks``), so no
    (N, C) score matrix exists."""
    labels = _tensor(labels, torch.int64)
    if labels.shape != (len(X),):
        raise ValueError(f"labels must have shape ({len(X)},) to match the features; got {tuple(labels.shape)}")
    return _rows(((z, labels[s]) for s, z in head.scores_in_blocks(X, SCORE_ROWS)), num_classes)


def affine_row_statistics(logits: torch.Tensor, a: Optional[torch.Tensor], c: Optional[torch.Tensor],
                          labels: Any, num_classes: int) -> dict[str, torch.Tensor]:
    """:func:`row_statistics` of the scores ``logits`` ⊙ a + c, built a block of rows at a time.

    logits float (N, C); a, c float (C,) on its device, or None (1 and 0); labels int64 (N,)."""
    labels = _tensor(labels, torch.int64)
    return _rows(((column_affine(logits[s], a, c), labels[s]) for s in _blocks(len(labels))), num_classes)


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
    dict with ``all`` (top-1, micro), ``mean_class`` (= balanced accuracy), ``many``, ``medium``,
    ``few``, ``worst_class``, ``worst_10pct``, ``hmean`` (:func:`tail_accuracies`), ``top5``,
    ``macro_f1``, ``nll``, ``ece`` (floats; NaN where undefined, e.g. an empty group) and ``n``.
    """
    return evaluate_rows(score_row_statistics(scores, labels, len(counts)), labels, counts, n_bins, many=many, few=few)


def evaluate_rows(rows: dict[str, torch.Tensor], labels: Any, counts: Any, n_bins: int = 15,
                  **thresholds: int) -> dict[str, float]:
    """:func:`evaluate` from the per-row statistics of :func:`row_statistics` (all N rows);
    ``thresholds``: ``many=``, ``few=``."""
    labels = _tensor(labels, torch.int64).cpu()
    pred = rows["pred"]
    out, class_acc = _accuracy_summary(pred, labels, counts, **thresholds)
    out.update(tail_accuracies(class_acc, out))
    if len(labels) == 0:
        return {**out, "top5": float("nan"), "macro_f1": float("nan"), "nll": float("nan"), "ece": float("nan"), "n": 0}
    out["top5"] = rows["top5"].double().mean().item()
    out["macro_f1"] = macro_f1(pred, labels, len(counts))
    out["nll"] = rows["nll"].mean().item()
    out["ece"] = calibration_error(rows["conf"], pred == labels, n_bins)
    out["n"] = int(len(labels))
    return out
