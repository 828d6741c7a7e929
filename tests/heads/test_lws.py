"""Learnable weight scaling (lt_rebalance.heads.lws) against the joint logits it rescales."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from head_refs import np_group_summary

from lt_rebalance.heads import CRT, LWS

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_lws_with_unit_scales_reproduces_joint_logits(lt_data):
    d = lt_data(num_classes=6, n_max=100, imbalance=20, dim=8, seed=3)
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    # a vanishing learning rate leaves s at its initial value 1
    head = LWS(W, b, epochs=1, lr=1e-30, batch_size=32, device="cpu").fit(d["X_train"], d["y_train"])
    np.testing.assert_array_equal(head.scales_.numpy(), np.ones(6, np.float32))
    joint = d["X_test"].astype(np.float64) @ W.T.astype(np.float64) + b
    np.testing.assert_allclose(head.decision_function(d["X_test"]), joint, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(head.weight_.numpy(), W)
    np.testing.assert_array_equal(head.bias_.numpy(), b)


def test_lws_folded_head_and_cache_paths(lt_data):
    d = lt_data(num_classes=6, n_max=100, imbalance=20, dim=8, seed=3)
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    kw = dict(epochs=3, lr=0.2, batch_size=32, device="cpu", seed=4)
    head = LWS(W, b, **kw).fit(d["X_train"], d["y_train"])
    s = head.scales_.numpy().astype(np.float64)
    assert not np.allclose(s, 1.0)  # it learned something
    np.testing.assert_allclose(head.weight_.numpy(), s[:, None] * W, rtol=1e-6)
    np.testing.assert_allclose(head.bias_.numpy(), s * b, rtol=1e-6)
    expected = s * (d["X_test"].astype(np.float64) @ W.T.astype(np.float64) + b)
    np.testing.assert_allclose(head.decision_function(d["X_test"]), expected, rtol=1e-4, atol=1e-4)
    # logits recomputed per batch (no cache) train the same scales as a float32 cache ...
    nocache = LWS(W, b, max_cache_gb=0.0, **kw).fit(d["X_train"], d["y_train"])
    assert nocache.cache_dtype_ is None and head.cache_dtype_ == "float16"
    exact = LWS(W, b, cache_dtype="float32", **kw).fit(d["X_train"], d["y_train"])
    np.testing.assert_allclose(nocache.scales_.numpy(), exact.scales_.numpy(), rtol=1e-4, atol=1e-5)
    # ... and the default float16 cache is within its rounding (2^-11 relative per logit) of them
    np.testing.assert_allclose(head.scales_.numpy(), exact.scales_.numpy(), rtol=3e-3, atol=1e-3)
    # deterministic given the seed
    again = LWS(W, b, **kw).fit(d["X_train"], d["y_train"])
    assert torch.equal(again.scales_, head.scales_)


def test_lws_and_marc_share_one_logit_cache(lt_data, monkeypatch):
    """Joint logits computed once (cache_joint_logits) serve LWS and MARC: results as if each computed its own."""
    from lt_rebalance.heads import MARC
    from lt_rebalance.heads import lws as lws_module

    d = lt_data(num_classes=6, n_max=100, imbalance=20, dim=8, seed=5)
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    X, y, Xv, yv = d["X_train"], d["y_train"], d["X_val"], d["y_val"]
    kw = dict(epochs=2, batch_size=32, device="cpu", seed=1)
    alone = MARC(W, b, **kw).fit(X, y, Xv, yv)
    passes = []
    real = lws_module.linear_logits
    monkeypatch.setattr(lws_module, "linear_logits", lambda *a, **k: passes.append(len(a[0])) or real(*a, **k))
    shared = lws_module.cache_joint_logits(torch.as_tensor(W), torch.as_tensor(b), torch.as_tensor(X),
                                           torch.as_tensor(Xv))
    LWS(W, b, **kw).fit(X, y, Xv, yv, joint_logits=shared)
    marc = MARC(W, b, **kw).fit(X, y, Xv, yv, joint_logits=shared)
    assert passes == [len(X), len(Xv)]  # train and val logits computed once
    assert torch.equal(marc.omega_, alone.omega_) and torch.equal(marc.beta_, alone.beta_)
    assert marc.history_.val == alone.history_.val and marc.cache_dtype_ == "float16"
    with pytest.raises(ValueError, match="joint train logits have shape"):  # logits of other rows are refused
        MARC(W, b, **kw).fit(X[:-1], y[:-1], Xv, yv, joint_logits=shared)


def test_lws_raises_few_shot_accuracy_over_joint(crt_data):
    d = crt_data
    joint = CRT(sampler="ib", epochs=8, batch_size=64, device="cpu").fit(d["X_train"], d["y_train"])
    lws = LWS(joint.weight_, joint.bias_, epochs=5, batch_size=64, device="cpu").fit(d["X_train"], d["y_train"])
    mj = np_group_summary(joint.predict(d["X_test"]), d["y_test"], d["counts"])
    ml = np_group_summary(lws.predict(d["X_test"]), d["y_test"], d["counts"])
    assert ml["few"] > mj["few"] + 0.05, (mj, ml)
