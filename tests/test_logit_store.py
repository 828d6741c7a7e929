"""lt_rebalance.logit_store: one owner of the stored classifier's shared logits, through its public API."""
import numpy as np
import pytest
import torch

from lt_rebalance import logit_store
from lt_rebalance.heads import lws as lws_module
from lt_rebalance.logit_store import LogitKey, LogitStore
from lt_rebalance.session import Session
from lt_rebalance.store import FeatureStore
from lt_rebalance.study import compare, run_seeds


@pytest.fixture
def session(files):
    return Session(FeatureStore(files["full"]))


def _numpy(session, split):
    X, y = session.load(split)
    W, b = session.head()
    return X.double().numpy(), W.double().numpy(), (None if b is None else b.double().numpy())


def test_eval_logits_are_x_w_transposed_and_kept_until_released(session):
    X, W, _ = _numpy(session, "test")
    with LogitStore(session) as store:
        R = store.eval_logits("test")
        np.testing.assert_allclose(R.numpy(), X @ W.T, rtol=1e-5, atol=1e-5)  # no bias
        assert store.eval_logits("test") is R  # computed once
        (key,) = store.keys()
        assert key == LogitKey(str(session.store.path), "eval", ("test",), "float32", "cpu")
        assert store.nbytes == R.numel() * 4
        store.release("joint")  # another kind: kept
        assert store.keys() == [key]
    assert store.keys() == [] and store.nbytes == 0  # the with block frees everything


def test_joint_logits_hold_train_and_val_with_the_bias(session):
    Xt, W, b = _numpy(session, "train")
    Xv = _numpy(session, "val")[0]
    store = LogitStore(session)
    J = store.joint_logits("float32")
    np.testing.assert_allclose(J.train.numpy(), Xt @ W.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(J.val.numpy(), Xv @ W.T + b, rtol=1e-5, atol=1e-5)
    assert J.dtype == "float32" and store.joint_logits("float32") is J
    half = store.joint_logits("float16")  # another precision replaces the entry
    assert half.train.dtype == torch.float16 and [k.dtype for k in store.keys()] == ["float16"]
    store.release()
    assert store.keys() == []


def test_memory_rule(files):
    """Eval logits are kept only within an eighth of the budget and never under --max-memory;
    joint logits get half of --max-memory (here too little: train logits left to each batch)."""
    s = FeatureStore(files["full"])
    assert LogitStore(Session(s, max_memory=1000)).eval_logits("test") is None
    assert LogitStore(Session(s), keep_eval=False).eval_logits("test") is None
    J = LogitStore(Session(s, max_memory=1000)).joint_logits()
    assert J.train is None and J.dtype is None and J.val.dtype == torch.float32
    assert logit_store.joint_cache_gb(Session(s, max_memory=2**31)) == 1.0


def test_compare_computes_each_logit_pass_once_and_rows_equal_lone_runs(session, files, monkeypatch):
    """LWS and MARC share one train/val logit pass; the heads built on the stored classifier are scored
    from one X Wᵀ per evaluation split; rows equal lone runs (accuracies exactly, NLL/ECE to rounding)."""
    n_train = session.store.splits["train"].rows
    passes, eval_passes = [], []
    real = lws_module.linear_logits
    monkeypatch.setattr(lws_module, "linear_logits", lambda *a, **k: passes.append(len(a[0])) or real(*a, **k))
    monkeypatch.setattr(logit_store, "linear_logits", lambda *a, **k: eval_passes.append(len(a[0])) or real(*a, **k))
    options = {m: {"epochs": 2} for m in ("lws", "marc")}
    methods = ["lws", "joint", "tau_norm", "logit_adjust", "pc_softmax", "marc"]
    doc = compare(session, methods, options)
    assert passes.count(n_train) == 1 and len(passes) == 2  # one train pass, one val pass
    assert sorted(eval_passes) == sorted(session.store.splits[s].rows for s in ("val", "test"))
    small = Session(FeatureStore(files["full"]), max_memory=1000)  # R would exceed budget / 8
    assert compare(small, methods, options)["rows"][1]["test"] == doc["rows"][1]["test"]
    assert len(eval_passes) == 2  # nothing kept: each head scored the splits itself (joint: identical)
    for row in doc["rows"]:  # each method alone: scored by its own head, nothing shared
        (lone,) = compare(Session(FeatureStore(files["full"])), [row["method"]], options)["rows"]
        for split in ("val", "test"):
            for key, value in row[split].items():
                assert value == pytest.approx(lone[split][key], rel=1e-5, abs=1e-7), (row["method"], split, key)
            assert row[split]["all"] == lone[split]["all"] and row[split]["few"] == lone[split]["few"]


def test_seeds_share_one_logit_pass(session, monkeypatch):
    passes = []
    real = lws_module.linear_logits
    monkeypatch.setattr(lws_module, "linear_logits", lambda *a, **k: passes.append(len(a[0])) or real(*a, **k))
    run = run_seeds(session, "marc", [0, 1, 2], epochs=1)
    assert len(passes) == 2 and len(run.result["over_seeds"]["seeds"]) == 3  # train + val, once for 3 seeds
