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
