"""The shared SGD loop (lt_rebalance.heads.training): learning-rate schedules and keep-best."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lt_rebalance.heads import CRT
from lt_rebalance.heads.training import learning_rate, train_sgd
from lt_rebalance.samplers import make_sampler

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_learning_rate_formulas():
    lr, T = 0.2, 10
    for e in range(T):
        assert learning_rate(lr, e, T, "cosine") == pytest.approx(0.5 * lr * (1 + math.cos(math.pi * e / T)))
        assert learning_rate(lr, e, T, "cosine-reference") == pytest.approx(
            0.5 * lr * (1 + math.cos(math.pi * (e + 1) / T)))
        assert learning_rate(lr, e, T, "constant") == lr
    assert learning_rate(lr, 0, T, "cosine") == pytest.approx(lr)
    assert learning_rate(lr, T - 1, T, "cosine") > 0
    assert learning_rate(lr, T - 1, T, "cosine-reference") == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate(lr, 0, T, "step")


@pytest.mark.parametrize("schedule", ["cosine", "cosine-reference", "constant"])
def test_history_lr_follows_schedule(crt_data, schedule):
    d = crt_data
    h = CRT(epochs=4, lr=0.3, batch_size=64, schedule=schedule, device="cpu").fit(d["X_train"][:256], d["y_train"][:256])
    if schedule == "cosine":
        expected = [0.15 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    elif schedule == "cosine-reference":
        expected = [0.15 * (1 + math.cos(math.pi * (e + 1) / 4)) for e in range(4)]
    else:
        expected = [0.3] * 4
    assert h.history_.lr == pytest.approx(expected, abs=1e-12)
    assert len(h.history_.loss) == 4 and h.history_.val == []


def test_schedule_is_applied_to_the_optimizer():
    # plain SGD on loss = c·p: every step moves p by -lr_e·c, so after T epochs of B batches
    # p = -B·c·Σ_e lr_e
    c = torch.tensor([1.0, -2.0])
    labels = torch.zeros(12, dtype=torch.int64)
    for schedule in ("cosine", "cosine-reference", "constant"):
        p = torch.zeros(2, requires_grad=True)
        train_sgd([p], lambda idx, p=p: (c * p).sum(), make_sampler("ib", labels), epochs=5, lr=0.1, batch_size=4,
                  momentum=0.0, weight_decay=0.0, schedule=schedule, generator=torch.Generator().manual_seed(0))
        total = sum(learning_rate(0.1, e, 5, schedule) for e in range(5))
        np.testing.assert_allclose(p.detach().numpy(), (-3 * total * c).numpy(), rtol=1e-5)


def run_scripted(scores, keep_best=True):
    """train_sgd with a scripted val score per epoch; snapshots of the parameter after each epoch."""
    p = torch.zeros(3, requires_grad=True)
    target = torch.tensor([1.0, 2.0, 3.0])
    snaps = []
    it = iter(scores)
    hist = train_sgd(
        [p], lambda idx: ((p - target) ** 2).sum(), make_sampler("ib", torch.zeros(8, dtype=torch.int64)),
        epochs=len(scores), lr=0.05, batch_size=4, momentum=0.9, weight_decay=0.0, schedule="constant",
        generator=torch.Generator().manual_seed(0), validate=(lambda: next(it)) if scores[0] is not None else None,
        keep_best=keep_best, progress=lambda e, T, loss, score: snaps.append(p.detach().clone()),
    )
    return p.detach(), hist, snaps


def test_keep_best_restores_best_val_epoch():
    p, hist, snaps = run_scripted([0.1, 0.5, 0.3, 0.5, 0.2])
    assert hist.best_epoch == 1  # ties keep the earlier epoch
    assert hist.val == [0.1, 0.5, 0.3, 0.5, 0.2]
    assert torch.equal(p, snaps[1]) and not torch.equal(p, snaps[-1])
    p, hist, snaps = run_scripted([0.1, 0.5, 0.3, 0.5, 0.2], keep_best=False)
    assert hist.best_epoch == 4 and torch.equal(p, snaps[-1])
    p, hist, snaps = run_scripted([None, None, None])
    assert hist.best_epoch == 2 and torch.equal(p, snaps[-1])


def test_crt_keep_best_on_val(crt_data):
    d = crt_data
    X, y = d["X_train"], d["y_train"]
    # a huge constant rate makes val accuracy jump around from epoch to epoch
    kw = dict(epochs=6, lr=20.0, momentum=0.0, batch_size=64, schedule="constant", device="cpu", seed=3)
    h = CRT(**kw).fit(X, y, d["X_val"], d["y_val"])
    val = h.history_.val
    assert len(val) == 6
    best = int(np.argmax(val))
    assert h.history_.best_epoch == best
    acc = float(np.mean(h.predict(d["X_val"]) == d["y_val"]))
    assert acc == pytest.approx(max(val))
    if best < 5:  # the kept parameters are those of a shorter run (constant schedule, same seed)
        short = CRT(**{**kw, "epochs": best + 1}).fit(X, y)
        assert torch.equal(short.weight_, h.weight_)
    nokeep = CRT(**kw, keep_best=False).fit(X, y, d["X_val"], d["y_val"])
    assert nokeep.history_.best_epoch == 5
    assert float(np.mean(nokeep.predict(d["X_val"]) == d["y_val"])) == pytest.approx(val[-1])
