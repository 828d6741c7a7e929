"""Features kept float16 in memory, block-wise kernels and metrics, LWS's reduced-precision cache.

Every block-wise result is checked against an independent numpy computation on the float32 (or
float64) data, with blocks small enough that several are used.
"""
import numpy as np
import pytest
import torch
from scipy.special import log_softmax

import lt_rebalance.metrics as metrics
from lt_rebalance.blocks import chunked_matmul, linear_logits, row_blocks
from lt_rebalance.heads import CRT, LWS, NCM, JointHead, TauNorm, tau_sweep
from lt_rebalance.heads.base import check_features
from lt_rebalance.posthoc import calibration_metrics, fit_temperature
from lt_rebalance.session import Session
from lt_rebalance.store import FeatureStore, write_features


@pytest.fixture(scope="module")
def d16(lt_data):
    """Long-tailed data rounded to float16 (so the float32 copies hold exactly the same values)."""
    d = lt_data(num_classes=7, n_max=120, imbalance=20, dim=12, seed=5)
    for k in list(d):
        if k.startswith("X_"):
            d[k] = d[k].astype(np.float16)
    rng = np.random.default_rng(1)
    d["W"] = rng.normal(size=(7, 12)).astype(np.float32)
    d["b"] = rng.normal(size=7).astype(np.float32)
    return d


@pytest.fixture
def small_blocks(monkeypatch):
    """Score 5 rows at a time so that every block-wise path runs over several blocks."""
    monkeypatch.setattr(metrics, "SCORE_ROWS", 5)
    import lt_rebalance.heads.base as base

    monkeypatch.setattr(base, "SCORE_ROWS", 5)


def test_row_blocks_and_linear_logits():
    assert [(s.start, s.stop) for s in row_blocks(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert list(row_blocks(0, 3)) == []
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 4)).astype(np.float16)
    W, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    want = X.astype(np.float64) @ W.T.astype(np.float64) + b
    got = linear_logits(torch.from_numpy(X), torch.from_numpy(W), torch.from_numpy(b), chunk=3)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    half = linear_logits(torch.from_numpy(X), torch.from_numpy(W), torch.from_numpy(b), dtype=torch.float16, chunk=4)
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().numpy(), want, rtol=2**-10, atol=1e-3)
    seen = []
    chunked_matmul(torch.from_numpy(X), torch.from_numpy(W), lambda z, s: seen.append((z.dtype, s.stop - s.start)), 4)
    assert seen == [(torch.float32, 4), (torch.float32, 4), (torch.float32, 2)]


def test_check_features_keeps_float16_and_converts_the_rest():
    assert check_features(np.zeros((2, 3), np.float16)).dtype == torch.float16
    assert check_features(torch.zeros(2, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert check_features(np.zeros((2, 3), np.float64)).dtype == torch.float32
    assert check_features(np.zeros((2, 3), np.int64)).dtype == torch.float32
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_features(np.array([[np.inf, 0]], np.float16))


def test_store_and_context_keep_the_stored_dtype(tmp_path, d16):
    path = write_features(tmp_path / "f.h5", {"train": (d16["X_train"], d16["y_train"]),
                                               "val": (d16["X_val"], d16["y_val"])}, dtype="float16")
    store = FeatureStore(path)
    X16 = store.features("train", dtype="stored")
    assert X16.dtype == torch.float16
    np.testing.assert_array_equal(X16.numpy(), d16["X_train"])
    assert store.features("train").dtype == torch.float32  # the default stays float32
    assert torch.equal(store.features("train"), X16.float())
    assert Session(store).load("val")[0].dtype == torch.float16


def test_heads_on_float16_equal_float32_and_numpy(d16, small_blocks):
    """float16 -> float32 is exact, so every head gives the same result on either; numpy checks the values."""
    X, y, Xt = d16["X_train"], d16["y_train"], d16["X_test"]
    X64, Xt64 = X.astype(np.float64), Xt.astype(np.float64)
    W, b = d16["W"], d16["b"]
    to16, to32 = torch.from_numpy, lambda a: torch.from_numpy(a.astype(np.float32))

    joint = JointHead(W, b).fit()
    np.testing.assert_allclose(joint.decision_function(to16(Xt)).numpy(), Xt64 @ W.T + b, rtol=1e-5, atol=1e-5)
    assert torch.equal(joint.predict(to16(Xt)), joint.predict(to32(Xt)))

    ncm16, ncm32 = NCM().fit(to16(X), y), NCM().fit(to32(X), y)
    Z = X64 - X64.mean(0)
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    cents = np.stack([Z[y == j].mean(0) for j in range(7)])
    Zt = Xt64 - X64.mean(0)
    Zt /= np.linalg.norm(Zt, axis=1, keepdims=True)
    want = -((Zt[:, None, :] - cents[None]) ** 2).sum(2)
    np.testing.assert_allclose(ncm16.decision_function(to16(Xt)).numpy(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(ncm16.predict(to16(Xt)), ncm32.predict(to32(Xt)))
    assert torch.equal(ncm16.predict(to16(Xt)), torch.from_numpy(want.argmax(1)))

    tau = TauNorm(W, 1.0).fit()
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    np.testing.assert_allclose(tau.decision_function(to16(Xt)).numpy(), Xt64 @ Wn.T, rtol=1e-5, atol=1e-5)
    curves16 = tau_sweep(to16(Xt), d16["y_test"], W, d16["counts"], chunk=7)
    curves32 = tau_sweep(to32(Xt), d16["y_test"], W, d16["counts"])
    assert all(torch.equal(curves16[k], curves32[k]) for k in curves32)

    kw = dict(epochs=2, batch_size=32, device="cpu", seed=1)
    c16 = CRT(**kw).fit(to16(X), y, to16(d16["X_val"]), d16["y_val"])
    c32 = CRT(**kw).fit(to32(X), y, to32(d16["X_val"]), d16["y_val"])
    assert torch.equal(c16.weight_, c32.weight_) and c16.history_.val == c32.history_.val


def test_block_wise_evaluate_matches_numpy(small_blocks):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(23, 6)) * 2
    y = rng.integers(0, 6, 23)
    counts = np.array([300, 150, 50, 40, 10, 5])
    got = metrics.evaluate(scores, y, counts)
    logp = log_softmax(scores, axis=1)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert got["nll"] == pytest.approx(-logp[np.arange(23), y].mean(), rel=1e-6)
    assert got["top5"] == pytest.approx((top5 == y[:, None]).any(1).mean())
    assert got["all"] == pytest.approx((scores.argmax(1) == y).mean())
    conf, correct = np.exp(logp.max(1)), scores.argmax(1) == y
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum(abs(correct[bins == k].sum() - conf[bins == k].sum()) for k in range(15)) / 23
    assert got["ece"] == pytest.approx(ece, rel=1e-6)
    cal = calibration_metrics(scores, y, counts)
    assert cal["all"]["nll"] == pytest.approx(got["nll"]) and cal["all"]["ece"] == pytest.approx(ece, rel=1e-6)
    # a head's evaluate scores a block at a time and gives the same numbers
    W = rng.normal(size=(6, 4)).astype(np.float32)
    X = rng.normal(size=(23, 4)).astype(np.float16)
    head = JointHead(W).fit()
    want = metrics.evaluate(X.astype(np.float64) @ W.T.astype(np.float64), y, counts)
    got = head.evaluate(X, y, counts)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, nan_ok=True), k


def test_fit_temperature_block_wise(monkeypatch):
    import lt_rebalance.posthoc as posthoc

    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 40)
    z = rng.normal(size=(40, 5)) * 3
    z[np.arange(40), y] += 2.0
    whole = fit_temperature(z, y)
    monkeypatch.setattr(posthoc, "SCORE_ROWS", 7)
    assert fit_temperature(z, y) == pytest.approx(whole, rel=1e-6)  # Brent stops at 1e-7 in log T
    assert fit_temperature(z.astype(np.float32), y) == pytest.approx(whole, rel=1e-5)


def test_lws_cache_precision_rules(d16):
    X, y = d16["X_train"], d16["y_train"]
    W, b = d16["W"], d16["b"]
    kw = dict(epochs=2, batch_size=32, device="cpu", seed=2)
    half = LWS(W, b, **kw).fit(X, y, d16["X_val"], d16["y_val"])
    assert half.cache_dtype_ == "float16"
    exact = LWS(W, b, max_cache_gb=0.0, **kw).fit(X, y, d16["X_val"], d16["y_val"])
    assert exact.cache_dtype_ is None  # no room: logits recomputed per batch in float32
    np.testing.assert_allclose(half.scales_.numpy(), exact.scales_.numpy(), rtol=3e-3, atol=1e-3)
    # logits beyond float16's range (65504) are cached in bfloat16 instead
    big = LWS(W * 1e5, b, epochs=1, batch_size=32, device="cpu", lr=1e-12).fit(X, y)
    assert big.cache_dtype_ == "bfloat16"
    with pytest.raises(ValueError, match="cache_dtype"):
        LWS(W, b, cache_dtype="float8").fit(X, y)


def test_one_memory_plan_per_run(tmp_path, d16, monkeypatch):
    """Whether splits are mapped is decided once: memory freeing up (or filling) between two loads
    does not map one split and read the next."""
    from lt_rebalance import session as session_module

    splits = {s: (d16[f"X_{s}"], d16[f"y_{s}"]) for s in ("train", "val")}
    store = FeatureStore(write_features(tmp_path / "f.h5", splits, dtype="float16"))
    free = [store.feature_bytes()]  # features exceed half of it: mapped
    monkeypatch.setattr(session_module, "available_memory", lambda: free[0])
    ctx = Session(store)
    X, _ = ctx.load("train")
    free[0] = 100 * store.feature_bytes()
    Xv, _ = ctx.load("val")
    assert not X.numpy().flags.owndata and not Xv.numpy().flags.owndata  # both views of the file


def test_memory_mapped_splits_give_identical_results(tmp_path, d16):
    from click.testing import CliRunner

    from lt_rebalance.cli import main

    splits = {s: (d16[f"X_{s}"], d16[f"y_{s}"]) for s in ("train", "val", "test")}
    path = write_features(tmp_path / "f.h5", splits, weight=d16["W"], bias=d16["b"], dtype="float16")
    store = FeatureStore(path)
    mapped = Session(store, max_memory=store.feature_bytes())  # features exceed half the budget
    assert mapped.memory_mapped and not Session(store, max_memory=10 * store.feature_bytes()).memory_mapped
    X, _ = mapped.load("train")
    assert X.dtype == torch.float16 and not X.numpy().flags.owndata  # a view of the file's pages
    np.testing.assert_array_equal(X.numpy(), d16["X_train"])
    runs = {}
    for opt in ([], ["--max-memory", "1K"]):
        runs[bool(opt)] = {}
        for cmd in (["joint"], ["ncm"], ["tau-sweep"], ["crt", "--epochs", "2", "--batch-size", "64"],
                    ["lws", "--epochs", "2", "--batch-size", "64"]):
            res = CliRunner().invoke(main, [*cmd, "-f", str(path), "--json", "--quiet", "--device", "cpu", *opt]
                                     if cmd[0] in ("crt", "lws") else [*cmd, "-f", str(path), "--json", *opt])
            assert res.exit_code == 0, res.output
            runs[bool(opt)][cmd[0]] = res.stdout  # the JSON (warnings go to stderr)
    assert runs[True] == {**runs[False], "lws": runs[True]["lws"]}
    # LWS under --max-memory 1K has no room for a logit cache: exact float32, same accuracy within rounding
    import json

    lws_in, lws_mapped = (json.loads(runs[k]["lws"]) for k in (False, True))
    assert abs(lws_in["test"]["all"] - lws_mapped["test"]["all"]) <= 0.05
    res = CliRunner().invoke(main, ["joint", "-f", str(path), "--max-memory", "lots"])
    assert res.exit_code == 2 and "not a memory size" in res.output


def test_sweeps_and_selection_from_precomputed_logits(d16):
    """Given X Wᵀ (as compare keeps it), the tau and logit-adjustment sweeps and selections use it
    instead of multiplying X: the logits of other rows give those rows' curves."""
    from lt_rebalance.posthoc import LogitAdjustment, logit_adjust_sweep

    X, y, counts = d16["X_val"], d16["y_val"], d16["counts"]
    W, b = torch.from_numpy(d16["W"]), torch.from_numpy(d16["b"])
    perm = np.random.default_rng(0).permutation(len(y))
    logits = torch.from_numpy(X[perm].astype(np.float32)) @ W.T  # the logits of the permuted rows
    want_tau = tau_sweep(X[perm], y[perm], W, counts, chunk=50)
    got_tau = tau_sweep(X, y[perm], W, counts, chunk=50, logits=logits)
    want_la = logit_adjust_sweep(X[perm], y[perm], W, b, counts, chunk=50)
    got_la = logit_adjust_sweep(X, y[perm], W, b, counts, chunk=50, logits=logits)
    for want, got in ((want_tau, got_tau), (want_la, got_la)):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    tau = TauNorm(W).fit(X, y[perm], counts, logits=logits)
    assert tau.tau_ == TauNorm(W).fit(X[perm], y[perm], counts).tau_
    la = LogitAdjustment(JointHead(W, b).fit(), counts).fit(X, y[perm], logits=logits)
    assert la.tau_ == LogitAdjustment(JointHead(W, b).fit(), counts).fit(X[perm], y[perm]).tau_


def test_precomputed_logits_of_the_wrong_shape_are_refused():
    from lt_rebalance.blocks import chunked_matmul

    X, W = torch.zeros(5, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"shape \(5, 4\)"):
        chunked_matmul(X, W, lambda z, s: None, logits=torch.zeros(4, 4))
