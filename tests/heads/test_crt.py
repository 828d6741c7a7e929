"""Classifier re-training (lt_rebalance.heads.crt): tail accuracy, determinism, views, initialisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from head_refs import np_group_summary

from lt_rebalance.heads import CRT

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_crt_raises_few_shot_accuracy_over_instance_balanced(crt_data):
    d = crt_data
    kw = dict(epochs=8, lr=0.2, batch_size=64, device="cpu", seed=0)
    joint = CRT(sampler="ib", **kw).fit(d["X_train"], d["y_train"])
    crt = CRT(**kw).fit(d["X_train"], d["y_train"])  # class-balanced by default
    mj = np_group_summary(joint.predict(d["X_test"]), d["y_test"], d["counts"])
    mc = np_group_summary(crt.predict(d["X_test"]), d["y_test"], d["counts"])
    assert np.isfinite(mj["few"]) and np.isfinite(mj["many"])
    assert mc["few"] > mj["few"] + 0.1, (mj, mc)
    assert mc["mean_class"] > mj["mean_class"]


def test_crt_deterministic_with_seed(crt_data):
    d = crt_data
    X, y = d["X_train"][:400], d["y_train"][:400]
    kw = dict(epochs=2, batch_size=32, device="cpu")
    a = CRT(seed=7, **kw).fit(X, y)
    b = CRT(seed=7, **kw).fit(torch.from_numpy(X), torch.from_numpy(y))
    c = CRT(seed=8, **kw).fit(X, y)
    assert torch.equal(a.weight_, b.weight_) and torch.equal(a.bias_, b.bias_)
    assert not torch.equal(a.weight_, c.weight_)
    assert a.history_.loss == b.history_.loss


def test_crt_views_equal_to_features_change_nothing(crt_data):
    d = crt_data
    X, y = d["X_train"][:300], d["y_train"][:300]
    kw = dict(epochs=2, batch_size=32, device="cpu", seed=1)
    plain = CRT(**kw).fit(X, y)
    views = torch.from_numpy(np.stack([X, X, X])).half()
    with_views = CRT(**kw).fit(X, y, views=views)
    plain_half = CRT(**kw).fit(views[0].float(), y)
    assert torch.allclose(with_views.weight_, plain_half.weight_, atol=1e-6)
    assert with_views.weight_.shape == plain.weight_.shape
    # distinct views do change the result
    noisy = views + 0.5 * torch.randn(views.shape, generator=torch.Generator().manual_seed(0)).half()
    assert not torch.allclose(CRT(**kw).fit(X, y, views=noisy).weight_, with_views.weight_, atol=1e-3)
    with pytest.raises(ValueError, match=r"views must have shape \(K, 300, 16\)"):
        CRT(**kw).fit(X, y, views=views[:, :10])


def test_crt_num_classes_and_init_bound(crt_data):
    d = crt_data
    X, y = d["X_train"][:200], d["y_train"][:200]
    # a single epoch of the reference's cosine schedule runs at lr = 0: the fresh nn.Linear init survives
    h = CRT(epochs=1, batch_size=32, schedule="cosine-reference", device="cpu").fit(X, y, num_classes=12)
    assert h.weight_.shape == (12, 16) and h.bias_.shape == (12,)
    assert h.weight_.abs().max() <= 1 / math.sqrt(16) and h.bias_.abs().max() <= 1 / math.sqrt(16)
    h2 = CRT(epochs=1, batch_size=32, schedule="cosine-reference", lr=0.7, device="cpu").fit(X, y, num_classes=12)
    assert torch.equal(h.weight_, h2.weight_)
    h3 = CRT(epochs=1, batch_size=32, schedule="cosine", device="cpu").fit(X, y, num_classes=12)
    assert not torch.equal(h.weight_, h3.weight_)
