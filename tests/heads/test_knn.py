"""Weighted kNN, the L-BFGS linear probe, weight balancing (MaxNorm) and MARC (issue 16).

Each head is checked against a small numpy re-implementation of its paper's formula (float64),
and its ``ltr`` command against the same numbers; the probe also against scikit-learn itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import test_cli
import torch
from test_cli import C, assert_metrics, np_metrics, run_json, user_error

from lt_rebalance.heads import KNN, MARC, LinearProbe, WeightBalancing
from lt_rebalance.heads.knn import topk_similar

try:
    import sklearn.linear_model as sklm
except ImportError:  # pragma: no cover
    sklm = None
needs_sklearn = pytest.mark.skipif(sklm is None, reason="scikit-learn is not installed")
pytestmark = pytest.mark.usefixtures("torch_one_thread")
arrays, files = test_cli.arrays, test_cli.files  # the feature files of the CLI tests (fixtures)


def _gaussians(counts, dim=5, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(counts), dim))
    y = np.repeat(np.arange(len(counts)), counts)
    return means[y] + spread * rng.normal(size=(len(y), dim)), y, rng


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# -- kNN -------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("k,T,p", [(1, 0.07, 0.0), (5, 0.07, 0.0), (20, 0.1, 1.0), (7, 0.02, 0.5)])
def test_knn_matches_numpy_across_blocks(k, T, p):
    X, y, rng = _gaussians([40, 20, 9, 4], dim=6)
    Xq = rng.normal(size=(23, 6)) * 2
    # blocks smaller than k and not dividing the row counts exercise the running top-k merge
    head = KNN(k, T, balance=p, query_block=7, train_block=5).fit(X, y)
    want = np_knn_shares(X, y, Xq, k, T, p, 4)
    np.testing.assert_allclose(head.predict_proba(Xq), want, rtol=1e-4, atol=1e-6)  # softmax of the log shares
    assert (head.predict(Xq) == want.argmax(1)).all()


def test_topk_merge_equals_full_topk():
    rng = np.random.default_rng(3)
    Q, T = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)), torch.from_numpy(rng.normal(size=(50, 4))).float()
    s, i = topk_similar(Q, T, 6, train_block=8)
    s_full, i_full = (Q @ T.T).topk(6, dim=1)
    torch.testing.assert_close(s, s_full)
    assert torch.equal(i, i_full)


def test_knn_balance_helps_the_tail_and_k_larger_than_train():
    X, y, rng = _gaussians([200, 6], dim=2, spread=2.0)
    Xq = X[y == 1] + 0.1 * rng.normal(size=(6, 2))
    plain = KNN(50).fit(X, y).predict(Xq)
    balanced = KNN(50, balance=1.0).fit(X, y).predict(Xq)
    assert (balanced == 1).sum() >= (plain == 1).sum()
    KNN(10_000).fit(X[:30], y[:30]).predict(Xq)  # k above the train rows: every row votes


def test_knn_command_matches_numpy(files, arrays):
    doc, _ = run_json(["knn", "-f", files["full"], "--k", "10", "--temperature", "0.1", "--balance", "0.5"])
    assert doc["method"] == "knn" and (doc["k"], doc["temperature"], doc["balance"]) == (10, 0.1, 0.5)
    for split in ("val", "test"):
        assert_metrics(doc[split])
        shares = np_knn_shares(arrays["x_train"], arrays["y_train"], arrays[f"x_{split}"], 10, 0.1, 0.5, C)
        want = np_metrics(shares, arrays[f"y_{split}"])
        for key, v in want.items():
            assert doc[split][key] == pytest.approx(v), (split, key)


# -- linear probe ----------------------------------------------------------------------------------
def np_probe_objective(X, y, W, b, C_, balanced):
    """scikit-learn's lbfgs objective (1/S) Σ s ℓ + ‖W‖² / (2 C S) and its gradient in W, b."""
    K = W.shape[0]
    n = np.bincount(y, minlength=K)
    s = len(y) / ((n > 0).sum() * n[y]) if balanced else np.ones(len(y))
    S = s.sum()
    Z = X @ W.T + b
    P = _softmax(Z)
    f = (s * (np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1) - Z[np.arange(len(y)), y])).sum() / S
    f += (W**2).sum() / (2 * C_ * S)
    G = (P - np.eye(K)[y]) * s[:, None] / S
    return f, G.T @ X + W / (C_ * S), G.sum(0)


@pytest.mark.parametrize("balanced,C_", [(True, 0.05), (False, 50.0)])
def test_probe_minimises_sklearn_objective(balanced, C_):
    X, y, _ = _gaussians([50, 25, 12, 6])
    head = LinearProbe(C_, class_weight="balanced" if balanced else "none", tol=1e-9, max_iter=500,
                       precision="float64", device="cpu").fit(X, y)
    W, b = head.weight_.double().numpy(), head.bias_.double().numpy()
    f, gW, gb = np_probe_objective(X, y, W, b, C_, balanced)
    assert head.converged_ and head.objective_ == pytest.approx(f, rel=1e-6)
    assert max(np.abs(gW).max(), np.abs(gb).max()) < 1e-5  # a stationary point of the numpy objective


@needs_sklearn
@pytest.mark.parametrize("K,class_weight,C_", [(2, "balanced", 1.0), (2, None, 0.01), (4, "balanced", 0.01),
                                              (4, "balanced", 100.0), (4, None, 1.0),
                                              (4, {0: 3.0, 3: 0.5}, 1.0)])
def test_probe_agrees_with_sklearn(K, class_weight, C_):
    X, y, rng = _gaussians([50, 25, 12, 6][:K])
    Xq = 2 * rng.normal(size=(300, X.shape[1]))
    sk = sklm.LogisticRegression(C=C_, class_weight=class_weight).fit(X, y)  # defaults: lbfgs, tol 1e-4
    ours = LinearProbe(C_, class_weight=class_weight or "none", precision="float64", device="cpu").fit(X, y)
    assert (ours.predict(Xq) == sk.predict(Xq)).mean() >= 0.99
    if K > 2:
        assert ours.n_iter_ == sk.n_iter_[0]  # the same optimiser on the same objective
    # at a tight tolerance both reach the same optimum (binary: w = w_1 - w_0, b = b_1 - b_0)
    sk = sklm.LogisticRegression(C=C_, class_weight=class_weight, tol=1e-9, max_iter=1000).fit(X, y)
    ours = LinearProbe(C_, class_weight=class_weight or "none", tol=1e-9, max_iter=1000, precision="float64",
                       device="cpu").fit(X, y)
    W, b = ours.weight_.double().numpy(), ours.bias_.double().numpy()
    coef, icpt = (W[1:] - W[:1], b[1:] - b[:1]) if K == 2 else (W, b - b.mean())
    scale = max(1, np.abs(sk.coef_).max())
    np.testing.assert_allclose(coef, sk.coef_, atol=1e-5 * scale)
    np.testing.assert_allclose(icpt, sk.intercept_ - (0 if K == 2 else sk.intercept_.mean()), atol=1e-5 * scale)
    # float32 arithmetic: the same predictions
    ours32 = LinearProbe(C_, class_weight=class_weight or "none", device="cpu").fit(X.astype(np.float32), y)
    assert (ours32.predict(Xq) == sk.predict(Xq)).mean() >= 0.99


def test_probe_refuses_one_class_and_reports_max_iter():
    X, y, _ = _gaussians([10, 10])
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearProbe(device="cpu").fit(X[:10], y[:10])
    head = LinearProbe(100.0, max_iter=1, device="cpu").fit(X, y)
    assert head.n_iter_ == 1 and not head.converged_


def test_linear_probe_command_grid_and_errors(files, arrays):
    doc, _ = run_json(["linear-probe", "-f", files["full"], "--C-grid", "0.01,1,100"])
    assert doc["method"] == "linear_probe" and doc["selected_on"] == "val"
    assert [r["C"] for r in doc["grid"]] == [0.01, 1.0, 100.0]
    best = max(doc["grid"], key=lambda r: r["val_top1"])  # first of the best: the smaller C
    assert doc["C"] == best["C"] and doc["val"]["all"] == pytest.approx(best["val_top1"])
    assert doc["class_weight"] == "balanced" and isinstance(doc["n_iter"], int)
    one, _ = run_json(["linear-probe", "-f", files["full"], "--class-weight", "none", "--precision", "float64"])
    assert one["C"] == 1.0 and "grid" not in one and one["converged"]
    if sklm is not None:
        sk = sklm.LogisticRegression(C=1.0).fit(arrays["x_train"].astype(np.float64), arrays["y_train"])
        for split in ("val", "test"):
            acc = (sk.predict(arrays[f"x_{split}"].astype(np.float64)) == arrays[f"y_{split}"]).mean()
            assert one[split]["all"] == pytest.approx(acc, abs=1.5 / len(arrays[f"y_{split}"]))
    user_error(["linear-probe", "-f", files["full"], "--C", "1", "--C-grid", "1,2"], code=2, match="not both")
    user_error(["linear-probe", "-f", files["noval"], "--C-grid", "1,2"], match="val")


# -- weight balancing ------------------------------------------------------------------------------
def np_cb_weights(counts, beta):
    w = (1 - beta) / (1 - beta ** counts.astype(np.float64))
    return w / w.sum() * len(counts)


def np_wb_loss(W, b, X, y, cw):
    """The authors' CB_loss(..., 'softmax'): BCE of softmax(z) vs one-hot, weight w_y, mean over n x C;
    1 - p_j written as Σ_{k≠j} p_k so that float64 keeps its digits when p_j is near 1."""
    Z = X @ W.T + b
    K = W.shape[0]
    lse = np.logaddexp.reduce(Z, axis=1)
    log_p = Z - lse[:, None]
    log_1mp = np.stack([np.logaddexp.reduce(np.delete(Z, j, axis=1), axis=1) for j in range(K)], 1) - lse[:, None]
    Y = np.eye(K)[y]
    return (cw[y][:, None] * -(Y * log_p + (1 - Y) * log_1mp)).mean()


def _num_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


@pytest.mark.parametrize("scale", [1.0, 6.0])  # 6: a float32 softmax saturates (p of a wrong class is 1)
def test_wb_step_is_projected_sgd_on_the_authors_loss(scale):
    X, y, rng = _gaussians([30, 12, 5], dim=4)
    W0 = rng.normal(size=(3, 4)) * np.array([[1.0], [0.5], [0.2]]) * scale  # norms grow with the class size
    b0 = rng.normal(size=3)
    lr, wd, thresh = 0.5 / scale, 0.1, 0.2
    if scale > 1:
        wrong = np.eye(3)[y] == 0
        assert (torch.from_numpy(X @ W0.T + b0).float().softmax(1).numpy()[wrong] == 1).any()
    head = WeightBalancing(W0, b0, epochs=1, lr=lr, batch_size=len(y), weight_decay=wd, thresh=thresh,
                           schedule="constant", keep_best=False, device="cpu").fit(X, y)
    cw = np_cb_weights(np.bincount(y), 0.9999)
    gW = _num_grad(lambda W: np_wb_loss(W, b0, X, y, cw), W0)
    gb = _num_grad(lambda b: np_wb_loss(W0, b, X, y, cw), b0)
    norms0 = np.linalg.norm(W0, axis=1)
    r = norms0.min() + thresh * (norms0.max() - norms0.min())
    W1 = W0 - lr * (gW + wd * W0)  # first SGD step: momentum buffer = gradient
    n1 = np.linalg.norm(W1, axis=1, keepdims=True)
    W1 = np.where(n1 > r, W1 * r / n1, W1)
    np.testing.assert_allclose(head.weight_.numpy(), W1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.bias_.numpy(), b0 - lr * (gb + wd * b0), rtol=1e-4, atol=1e-5)
    assert head.radius_ == pytest.approx(r, rel=1e-6)
    np.testing.assert_allclose(head.norms_.numpy(), np.linalg.norm(W1, axis=1), rtol=1e-4)


def test_wb_command_reports_norms_inside_the_ball(files, arrays):
    doc, err = run_json(["wb", "-f", files["full"], "--epochs", "3"])
    assert doc["method"] == "wb" and doc["params"]["thresh"] == 0.1 and doc["params"]["batch_size"] == 64
    norms0 = np.linalg.norm(arrays["weight"], axis=1)
    assert doc["radius"] == pytest.approx(norms0.min() + 0.1 * (norms0.max() - norms0.min()), rel=1e-5)
    assert len(doc["norms"]) == C and max(doc["norms"]) <= doc["radius"] * (1 + 1e-5)
    assert_metrics(doc["test"]) and "wb epoch 1/3" in err
    user_error(["wb", "-f", files["nohead"]], match="classifier")


# -- MARC ------------------------------------------------------------------------------------------
def test_marc_step_and_folded_head_match_numpy():
    X, y, rng = _gaussians([30, 12, 5], dim=4)
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    lr, wd = 0.3, 5e-4
    head = MARC(W, b, epochs=1, lr=lr, batch_size=len(y), sampler="ib", weight_decay=wd, schedule="constant",
                cache_dtype="float32",  # the exact step (the default float16 cache rounds z to 2^-11)
                keep_best=False, device="cpu").fit(X, y)
    Z, norms = X @ W.T + b, np.linalg.norm(W, axis=1)
    G = (_softmax(Z) - np.eye(3)[y]) / len(y)  # d mean CE / dz' at omega = 1, beta = 0
    omega = 1 - lr * ((G * Z).sum(0) + wd)
    beta = -lr * (G.sum(0) * norms)
    np.testing.assert_allclose(head.omega_.numpy(), omega, rtol=1e-5)
    np.testing.assert_allclose(head.beta_.numpy(), beta, rtol=1e-4, atol=1e-7)
    Xq = rng.normal(size=(10, 4))
    np.testing.assert_allclose(head.scores(Xq), omega * (Xq @ W.T + b) + beta * norms,
                               rtol=1e-5, atol=1e-5)


def test_marc_command_matches_its_parameters(files, arrays):
    doc, err = run_json(["marc", "-f", files["full"], "--epochs", "2", "--batch-size", "64"])
    assert doc["method"] == "marc" and doc["params"]["sampler"] == "cb" and "marc epoch 2/2" in err
    omega, beta = np.array(doc["omega"]), np.array(doc["beta"])
    norms = np.linalg.norm(arrays["weight"].astype(np.float64), axis=1)
    for split in ("val", "test"):
        z = arrays[f"x_{split}"] @ arrays["weight"].T.astype(np.float64) + arrays["bias"]
        for key, v in np_metrics(omega * z + beta * norms, arrays[f"y_{split}"]).items():
            assert doc[split][key] == pytest.approx(v), (split, key)
    user_error(["marc", "-f", files["nohead"]], match="classifier")


# -- compare ---------------------------------------------------------------------------------------
def test_compare_runs_marc_by_default_wb_knn_and_probe_when_named(files):
    doc, _ = run_json(["compare", "-f", files["full"], "--crt-epochs", "1", "--lws-epochs", "1", "-q"])
    methods = [r["method"] for r in doc["rows"]]
    assert "marc" in methods and not {"wb", "knn", "linear_probe"} & set(methods)
    doc, _ = run_json(["compare", "-f", files["nohead"], "--methods", "knn,linear_probe,marc,wb", "-q"])
    assert [r["method"] for r in doc["rows"]] == ["knn", "linear_probe"]
    assert {s["method"] for s in doc["skipped"]} == {"marc", "wb"}
    knn, _ = run_json(["knn", "-f", files["nohead"]])
    assert doc["rows"][0]["test"] == knn["test"]


def test_precomputed_logits_of_the_wrong_shape_are_refused():
    from lt_rebalance.blocks import chunked_matmul

    X, W = torch.zeros(5, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"shape \(5, 4\)"):
        chunked_matmul(X, W, lambda z, s: None, logits=torch.zeros(4, 4))
