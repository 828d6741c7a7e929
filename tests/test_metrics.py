"""Metrics against hand-worked examples and small numpy re-implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lt_rebalance.metrics import (
    accuracy_summary,
    evaluate,
    expected_calibration_error,
    group_sizes,
    macro_f1,
    shot_groups,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Hand-worked example: 4 classes, train counts 150 (many), 50 (medium), 10 (few), 100 (medium:
# "many" is strictly > 100).
COUNTS = [150, 50, 10, 100]
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
PREDS = [0, 0, 0, 1, 1, 0, 2, 3, 3, 3]
# per-class accuracy: c0 3/4, c1 1/2, c2 1/2, c3 2/2; 7 of 10 right overall


def one_hot_scores(pred, num_classes):
    s = np.zeros((len(pred), num_classes), dtype=np.float32)
    s[np.arange(len(pred)), pred] = 5.0
    return s


def test_shot_groups_default_thresholds():
    g = shot_groups([101, 100, 20, 19, 0, 500])
    assert g["many"].tolist() == [True, False, False, False, False, True]
    assert g["medium"].tolist() == [False, True, True, False, False, False]
    assert g["few"].tolist() == [False, False, False, True, True, False]
    assert group_sizes([101, 100, 20, 19, 0, 500]) == {"many": 2, "medium": 2, "few": 2}


def test_hand_worked_accuracies():
    out = evaluate(one_hot_scores(PREDS, 4), LABELS, COUNTS)
    assert out["all"] == pytest.approx(0.7)
    assert out["mean_class"] == pytest.approx((0.75 + 0.5 + 0.5 + 1.0) / 4)
    assert out["many"] == pytest.approx(0.75)
    assert out["medium"] == pytest.approx((0.5 + 1.0) / 2)  # classes 1 and 3
    assert out["few"] == pytest.approx(0.5)
    assert out["n"] == 10
    for k in ("all", "mean_class", "many", "medium", "few", "top5", "macro_f1"):
        assert 0.0 <= out[k] <= 1.0


def test_configurable_thresholds():
    out = evaluate(one_hot_scores(PREDS, 4), LABELS, COUNTS, many=60, few=12)
    # many: counts > 60 -> classes 0, 3; few: counts < 12 -> class 2; medium: class 1
    assert out["many"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["medium"] == pytest.approx(0.5)
    assert out["few"] == pytest.approx(0.5)
    s = accuracy_summary(torch.tensor(PREDS), torch.tensor(LABELS), COUNTS, many=60, few=12)
    assert s["many"] == pytest.approx(0.875)


def test_empty_group_is_nan_not_zero():
    # no few-shot class at all
    out = evaluate(one_hot_scores([0, 1, 1], 2), [0, 1, 0], [200, 50])
    assert math.isnan(out["few"])
    assert out["many"] == pytest.approx(0.5) and out["medium"] == pytest.approx(1.0)
    # a few-shot class exists in training but has no evaluation image
    out = evaluate(one_hot_scores([0, 1], 3), [0, 1], [200, 50, 5])
    assert math.isnan(out["few"])
    assert out["mean_class"] == pytest.approx(1.0)  # mean over classes with evaluation images


def test_empty_evaluation_set_gives_nans():
    out = evaluate(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), [200, 50, 5])
    for k in ("all", "mean_class", "many", "medium", "few", "top5", "macro_f1", "nll", "ece"):
        assert math.isnan(out[k]), k
    assert out["n"] == 0


def test_top5_hand_worked():
    # 8 classes; the true label sits at rank 0, 4, 5 and 7 of its row's scores
    ranks = [0, 4, 5, 7]
    rng = np.random.default_rng(0)
    scores, labels = [], []
    for r in ranks:
        order = rng.permutation(8)  # order[k] = class with the k-th highest score
        row = np.empty(8, np.float32)
        row[order] = -np.arange(8, dtype=np.float32)
        scores.append(row)
        labels.append(int(order[r]))
    out = evaluate(np.stack(scores), labels, [50] * 8)
    assert out["top5"] == pytest.approx(0.5)
    assert out["all"] == pytest.approx(0.25)


def test_top5_with_fewer_than_5_classes_is_1():
    out = evaluate(np.random.default_rng(0).normal(size=(6, 3)), [0, 1, 2, 0, 1, 2], [10, 10, 10])
    assert out["top5"] == 1.0


def test_macro_f1_hand_worked():
    # tp / predicted / true per class: c0 3/4/4 -> 0.75, c1 1/2/2 -> 0.5, c2 1/1/2 -> 2/3, c3 2/3/2 -> 0.8
    expected = (0.75 + 0.5 + 2 / 3 + 0.8) / 4
    assert macro_f1(torch.tensor(PREDS), torch.tensor(LABELS), 4) == pytest.approx(expected)
    assert evaluate(one_hot_scores(PREDS, 4), LABELS, COUNTS)["macro_f1"] == pytest.approx(expected)
    # a class that is neither a label nor a prediction does not count (sklearn's convention)
    assert macro_f1(torch.tensor(PREDS), torch.tensor(LABELS), 6) == pytest.approx(expected)
    # a class predicted but absent from the labels counts with F1 = 0
    assert macro_f1(torch.tensor([0, 1]), torch.tensor([0, 0]), 2) == pytest.approx((2 / 3 + 0) / 2)


def test_nll_matches_numpy():
    rng = np.random.default_rng(1)
    scores = rng.normal(scale=3.0, size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=40)
    s = scores.astype(np.float64)
    m = s.max(1, keepdims=True)
    logp = s - m - np.log(np.exp(s - m).sum(1, keepdims=True))
    expected = -logp[np.arange(40), labels].mean()
    assert evaluate(scores, labels, [30] * 6)["nll"] == pytest.approx(expected, rel=1e-6)


def test_ece_hand_worked():
    # 15 bins of width 1/15. conf 0.9 -> bin (13/15, 14/15]; conf 0.7 -> bin (10/15, 11/15].
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, 0])
    # bin 0.9: acc 1/2, conf 0.9, weight 2/5 -> 0.16; bin 0.7: acc 2/3, conf 0.7, weight 3/5 -> 0.02
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.18)
    # through evaluate (softmax of log-probabilities gives the probabilities back)
    out = evaluate(torch.log(probs).float(), labels, [50, 50])
    assert out["ece"] == pytest.approx(0.18, abs=1e-6)


def test_ece_neighbouring_bins_are_not_merged():
    # conf 0.62 lies in (9/15, 10/15], conf 0.7 in (10/15, 11/15]; both wrong -> ECE = mean conf
    probs = torch.tensor([[0.62, 0.38], [0.7, 0.3]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    assert expected_calibration_error(probs, labels, 15) == pytest.approx((0.62 + 0.7) / 2)
    # one right, one wrong in different bins: |1 - 0.62|/2 + |0 - 0.7|/2
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels, 15) == pytest.approx((0.38 + 0.7) / 2)


def numpy_ece(probs, labels, n_bins=15):
    """Guo et al. (2017): bins (lo, hi] of equal width, sum |B|/N |acc - conf|."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            total += inb.mean() * abs((pred[inb] == labels[inb]).mean() - conf[inb].mean())
    return total


def test_ece_matches_numpy_reference_on_random_data():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=2.0, size=(500, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, size=500)
    got = expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels), 15)
    assert got == pytest.approx(numpy_ece(probs, labels), abs=1e-12)


def test_batched_predictions_match_single():
    preds = torch.tensor([PREDS, LABELS])  # (T=2, N)
    out = accuracy_summary(preds, torch.tensor(LABELS), COUNTS)
    assert out["all"].tolist() == pytest.approx([0.7, 1.0])
    assert out["few"].tolist() == pytest.approx([0.5, 1.0])


def test_evaluate_shape_errors():
    with pytest.raises(ValueError, match="classes but counts"):
        evaluate(np.zeros((2, 3)), [0, 1], [5, 5])
    with pytest.raises(ValueError, match="N = len"):
        evaluate(np.zeros((3, 2)), [0, 1], [5, 5])


# -- tail metrics, per-class table, imbalance: numpy hand computations ----------------------------
def np_tail(pred, labels, counts, many=100, few=20):
    """worst_class, worst_10pct, hmean from scratch (numpy): classes with test rows only."""
    pred, labels, counts = map(np.asarray, (pred, labels, counts))
    present = [c for c in range(len(counts)) if (labels == c).any()]
    acc = np.array([np.mean(pred[labels == c] == c) for c in present])
    k = int(np.ceil(len(acc) / 10 - 1e-12))
    groups = []
    for lo, hi in ((many + 1, np.inf), (few, many + 1), (0, few)):
        g = [a for c, a in zip(present, acc) if lo <= counts[c] < hi]
        if g:
            groups.append(np.mean(g))
    hmean = 0.0 if min(groups) == 0 else len(groups) / np.sum(1 / np.array(groups))
    return acc.min(), np.sort(acc)[:k].mean(), hmean


def test_tail_metrics_hand_worked():
    out = evaluate(one_hot_scores(PREDS, 4), LABELS, COUNTS)
    # per-class 3/4, 1/2, 1/2, 1; 4 classes -> the worst ceil(0.4) = 1 class
    assert out["worst_class"] == pytest.approx(0.5)
    assert out["worst_10pct"] == pytest.approx(0.5)
    # groups: many 0.75, medium 0.75, few 0.5 -> 3 / (1/0.75 + 1/0.75 + 1/0.5)
    assert out["hmean"] == pytest.approx(3 / (4 / 3 + 4 / 3 + 2))
    assert "balanced_accuracy" not in out  # it is mean_class (docs/METHODS.md)


@pytest.mark.parametrize("C", [9, 10, 11, 30, 57])
def test_tail_metrics_against_numpy(C):
    rng = np.random.default_rng(C)
    counts = rng.integers(1, 300, size=C)
    labels = rng.integers(0, C, size=25 * C)
    labels[: C // 3] = 0  # some classes may have no test row
    pred = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, C, size=len(labels)))
    out = evaluate(one_hot_scores(pred, C), labels, counts)
    wc, w10, hm = np_tail(pred, labels, counts)
    assert out["worst_class"] == pytest.approx(wc)
    assert out["worst_10pct"] == pytest.approx(w10)
    assert out["hmean"] == pytest.approx(hm)
    # balanced accuracy (sklearn's definition: mean recall over classes present in y_true) is mean_class
    present = np.unique(labels)
    assert out["mean_class"] == pytest.approx(np.mean([np.mean(pred[labels == c] == c) for c in present]))


def test_worst_10pct_rounds_up_in_integers():
    # 30 classes: 0.1 * 30 is 3.0000000000000004 in floats, but the worst 3 (not 4) are averaged
    C = 30
    labels = np.repeat(np.arange(C), 10)
    pred = labels.copy()
    for c in range(C):  # class c gets max(10 - c, 0) of its 10 rows wrong: accuracies 0, 0.1, 0.2, ...
        idx = np.flatnonzero(labels == c)[: max(10 - c, 0)]
        pred[idx] = (c + 1) % C
    out = evaluate(one_hot_scores(pred, C), labels, [50] * C)
    acc = np.sort([np.mean(pred[labels == c] == c) for c in range(C)])
    assert out["worst_10pct"] == pytest.approx(0.1) and acc[:3].mean() == pytest.approx(0.1)
    assert out["worst_class"] == 0.0 and acc[2] < acc[3]  # the 4th worst would change the mean


def test_hmean_zero_group_and_empty_groups():
    # few group at 0 -> hmean 0; a group without test rows is left out (not 0, not NaN)
    out = evaluate(one_hot_scores([0, 0, 1], 3), [0, 1, 1], [200, 50, 5])
    assert out["few"] != out["few"] and out["hmean"] == pytest.approx(2 / (1 / 1.0 + 1 / 0.5))
    out = evaluate(one_hot_scores([0, 1, 0], 3), [0, 1, 2], [200, 50, 5])
    assert out["few"] == 0.0 and out["hmean"] == 0.0
    out = evaluate(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), [200, 50, 5])
    for k in ("worst_class", "worst_10pct", "hmean"):
        assert math.isnan(out[k]), k


def test_per_class_table_and_records():
    from lt_rebalance.metrics import per_class_accuracy_table, per_class_records

    acc, support = per_class_accuracy_table(np.array(PREDS + [1]), np.array(LABELS + [1]), 5)
    np.testing.assert_allclose(acc[:4].numpy(), [3 / 4, 2 / 3, 1 / 2, 1.0])
    assert math.isnan(acc[4]) and support.tolist() == [4, 3, 2, 2, 0]
    rec = per_class_records(PREDS, LABELS, COUNTS + [0])
    assert [r["group"] for r in rec] == ["many", "medium", "few", "medium", "few"]
    assert [r["correct"] for r in rec] == [3, 1, 1, 2, 0] and rec[4]["accuracy"] is None
    assert rec[0] == {"class": 0, "train_count": 150, "group": "many", "support": 4, "correct": 3, "accuracy": 0.75}
    with pytest.raises(ValueError, match="must both be"):
        per_class_accuracy_table(np.zeros(3, int), np.zeros(4, int), 2)


def np_gini(x):
    """Mean absolute difference over all ordered pairs / (2 * mean): the textbook definition."""
    x = np.asarray(x, np.float64)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_imbalance_stats_against_numpy():
    from lt_rebalance.metrics import imbalance_stats

    rng = np.random.default_rng(0)
    for C in (1, 5, 10, 23, 1000):
        counts = rng.integers(1, 1280, size=C)
        s = imbalance_stats(counts)
        assert s["imbalance_factor"] == pytest.approx(counts.max() / counts.min())
        assert s["gini"] == pytest.approx(np_gini(counts), abs=1e-12)
        k = int(np.ceil(C / 5 - 1e-12))
        assert s["top20_share"] == pytest.approx(np.sort(counts)[::-1][:k].sum() / counts.sum())
        assert s["num_classes"] == C and s["empty_classes"] == 0
    # hand-worked: equal counts; one class holds everything; an empty class
    assert imbalance_stats([7, 7, 7, 7])["gini"] == pytest.approx(0.0)
    s = imbalance_stats([0, 0, 0, 12])
    assert s["gini"] == pytest.approx(3 / 4) and s["imbalance_factor"] == 1.0 and s["empty_classes"] == 3
    assert s["top20_share"] == 1.0
    s = imbalance_stats([100, 0, 10, 1, 50])  # empty class left out of max/min
    assert s["imbalance_factor"] == 100.0 and s["gini"] == pytest.approx(np_gini([100, 0, 10, 1, 50]))
    assert s["top20_share"] == pytest.approx(100 / 161)
    assert math.isnan(imbalance_stats([0, 0])["gini"])
    with pytest.raises(ValueError, match="non-negative"):
        imbalance_stats([3, -1])
