"""Heads (joint, τ-norm, NCM, LWS, cRT) and the shared SGD loop against direct numpy computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lt_rebalance.heads import (
    CRT,
    DEFAULT_TAUS,
    LWS,
    NCM,
    NCM_VARIANTS,
    JointHead,
    TauNorm,
    tau_normalize,
    tau_sweep,
)
from lt_rebalance.heads.base import NotFittedError
from lt_rebalance.heads.training import learning_rate, train_sgd
from lt_rebalance.samplers import make_sampler

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# -- independent numpy references ---------------------------------------------------------------
def np_group_summary(pred, y, counts, many=100, few=20):
    """all / mean_class / many / medium / few as the reference's shot_acc (NaN for an empty group)."""
    counts = np.asarray(counts)
    C = len(counts)
    acc = np.array([np.mean(pred[y == j] == j) if np.any(y == j) else np.nan for j in range(C)])

    def mean(mask):
        vals = acc[mask & ~np.isnan(acc)]
        return float(vals.mean()) if len(vals) else math.nan

    m, f = counts > many, counts < few
    return {
        "all": float(np.mean(pred == y)),
        "mean_class": mean(np.ones(C, bool)),
        "many": mean(m),
        "medium": mean(~m & ~f),
        "few": mean(f),
    }


def np_tau_logits(X, W, tau):
    X, W = np.asarray(X, np.float64), np.asarray(W, np.float64)
    Wt = W / np.linalg.norm(W, axis=1, keepdims=True) ** tau
    return X @ Wt.T


def min_top2_margin(logits):
    s = np.sort(logits, axis=1)
    return float(((s[:, -1] - s[:, -2]) / (np.abs(s[:, -1]) + 1e-12)).min())


def np_ncm_scores(Xtr, ytr, X, variant):
    """docs/METHODS.md, NCM: cl2n / l2n / un score = -squared distance; cos = cl2n feature · centroid / D."""
    Xtr, X = np.asarray(Xtr, np.float64), np.asarray(X, np.float64)
    mu = Xtr.mean(axis=0)

    def transform(Z):
        if variant == "un":
            return Z
        if variant in ("cl2n", "cos"):
            Z = Z - mu
        return Z / np.linalg.norm(Z, axis=1, keepdims=True)

    Ztr, Z = transform(Xtr), transform(X)
    C = int(ytr.max()) + 1
    cent = np.stack([Ztr[ytr == j].mean(axis=0) for j in range(C)])  # not renormalised
    if variant == "cos":
        return Z @ cent.T / Z.shape[1], cent
    return -((Z[:, None, :] - cent[None, :, :]) ** 2).sum(-1), cent


def joint_like_weight(data):
    """A joint-style classifier: class means, with norms growing with the class's train count."""
    norms = 0.5 + np.log(data["counts"]) / np.log(data["counts"].max())
    return (data["means"] * norms[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def tau_data(lt_data):
    # counts from 400 down to 4: every shot group is populated
    return lt_data(num_classes=12, n_max=400, imbalance=100, dim=12, sep=2.5, seed=1)


# -- joint head and τ-normalisation ------------------------------------------------------------
def test_joint_head_logits(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    b = np.linspace(-1, 1, 12).astype(np.float32)
    got = JointHead(W, b).fit().decision_function(d["X_test"])
    np.testing.assert_allclose(got, d["X_test"].astype(np.float64) @ W.T.astype(np.float64) + b, rtol=1e-5, atol=1e-5)
    no_bias = JointHead(torch.from_numpy(W)).fit().decision_function(torch.from_numpy(d["X_test"])).numpy()
    np.testing.assert_allclose(no_bias, d["X_test"].astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)


def test_tau_zero_is_joint_head_without_bias(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    b = np.linspace(-1, 1, 12).astype(np.float32)
    tau0 = TauNorm(W, tau=0.0).fit().decision_function(d["X_test"])
    joint_nobias = JointHead(W, None).fit().decision_function(d["X_test"])
    joint_bias = JointHead(W, b).fit().decision_function(d["X_test"])
    np.testing.assert_allclose(tau0, d["X_test"].astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)
    assert np.allclose(tau0, joint_nobias, rtol=0, atol=1e-6)
    assert not np.allclose(tau0, joint_bias, atol=1e-3)  # the bias is dropped


def test_tau_normalize_formula():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 7)) * np.array([[0.1], [1], [3], [10], [0.5]])
    for tau in (0.0, 0.3, 1.0, 1.7, 2.0):
        expected = W / np.linalg.norm(W, axis=1, keepdims=True) ** tau
        np.testing.assert_allclose(tau_normalize(W.astype(np.float32), tau).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tau_normalize(W, 1.0).numpy(), axis=1), 1.0, rtol=1e-6)


def test_default_tau_grid():
    np.testing.assert_allclose(DEFAULT_TAUS, np.linspace(0, 2, 21), atol=1e-12)


@pytest.mark.parametrize("split", ["val", "test"])
def test_tau_sweep_equals_naive_loop(tau_data, split):
    d = tau_data
    W = joint_like_weight(d)
    X, y = d[f"X_{split}"], d[f"y_{split}"]
    taus = list(np.linspace(0, 2, 21))
    got = tau_sweep(X, y, W, d["counts"], taus, chunk=50)  # several row chunks
    curves = {k: [] for k in ("all", "mean_class", "many", "medium", "few")}
    for tau in taus:
        logits = np_tau_logits(X, W, tau)
        assert min_top2_margin(logits) > 1e-5  # no near-ties: float32 and float64 agree on the argmax
        s = np_group_summary(logits.argmax(1), y, d["counts"])
        for k in curves:
            curves[k].append(s[k])
    for k, v in curves.items():
        assert got[k].shape == (21,)
        np.testing.assert_allclose(got[k].numpy(), v, rtol=0, atol=1e-12, err_msg=k)
    # the curve is not flat: τ matters on this data
    assert got["few"].max() > got["few"][0] + 0.05


def test_tau_sweep_thresholds(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    taus = [0.0, 1.0]
    got = tau_sweep(d["X_test"], d["y_test"], W, d["counts"], taus, many=50, few=10)
    for i, tau in enumerate(taus):
        s = np_group_summary(np_tau_logits(d["X_test"], W, tau).argmax(1), d["y_test"], d["counts"], 50, 10)
        for k in ("many", "medium", "few"):
            assert got[k][i].item() == pytest.approx(s[k], abs=1e-12)


@pytest.mark.parametrize("metric,key", [("top1", "all"), ("mean_class", "mean_class"), ("few", "few")])
def test_taunorm_selects_argmax_on_val(tau_data, metric, key):
    d = tau_data
    W = joint_like_weight(d)
    head = TauNorm(W, metric=metric).fit(d["X_val"], d["y_val"], d["counts"])
    taus = list(DEFAULT_TAUS)
    val = np.array([np_group_summary(np_tau_logits(d["X_val"], W, t).argmax(1), d["y_val"], d["counts"])[key]
                    for t in taus])
    best = taus[int(np.flatnonzero(val == val.max())[0])]  # first maximum = smallest τ on the sorted grid
    assert head.tau_ == pytest.approx(best)
    np.testing.assert_allclose(head.curve_[key].numpy(), val, atol=1e-12)
    # test logits at the selected τ
    np.testing.assert_allclose(head.decision_function(d["X_test"]), np_tau_logits(d["X_test"], W, best),
                               rtol=1e-4, atol=1e-5)


def test_taunorm_ties_go_to_smaller_tau():
    # equal row norms: every τ rescales all logits alike, so every τ ties on every metric
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 4))
    W = (W / np.linalg.norm(W, axis=1, keepdims=True) * 2.0).astype(np.float32)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=30)
    for taus in ([0.0, 0.5, 1.0], [2.0, 1.0, 0.5], [1.5, 0.25, 0.75]):
        head = TauNorm(W, taus=taus).fit(X, y, [50, 50, 50])
        assert head.tau_ == min(taus), taus


def test_taunorm_fixed_tau_and_errors(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    head = TauNorm(W, tau=1.3).fit()
    assert head.tau_ == 1.3 and head.curve_ is None
    np.testing.assert_allclose(head.predict(d["X_test"]), np_tau_logits(d["X_test"], W, 1.3).argmax(1))
    with pytest.raises(ValueError, match="pass X, y and counts"):
        TauNorm(W).fit()
    # no few-shot class in counts -> selecting on "few" is undefined
    with pytest.raises(ValueError, match="undefined"):
        TauNorm(W, metric="few").fit(d["X_val"], d["y_val"], np.full(12, 500))
    with pytest.raises(ValueError, match=r"TauNorm: metric must be one of .*'top1'.*got 'f1'"):
        TauNorm(W, metric="f1").fit(d["X_val"], d["y_val"], d["counts"])


# -- NCM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", NCM_VARIANTS)
def test_ncm_variant_equals_numpy_formula(lt_data, variant):
    d = lt_data(num_classes=6, n_max=80, imbalance=20, dim=8, seed=2)
    # an offset makes centring matter
    Xtr, Xte = d["X_train"] + 2.0, d["X_test"] + 2.0
    head = NCM(variant).fit(Xtr, d["y_train"])
    expected, cent = np_ncm_scores(Xtr, d["y_train"], Xte, variant)
    got = head.decision_function(Xte)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.centroids_.numpy(), cent, rtol=1e-5, atol=1e-6)
    assert min_top2_margin(expected) > 1e-5
    np.testing.assert_array_equal(head.predict(torch.from_numpy(Xte)).numpy(), expected.argmax(1))
    if variant in ("cl2n", "cos"):
        np.testing.assert_allclose(head.mean_.numpy(), Xtr.astype(np.float64).mean(0), rtol=1e-5)


def test_ncm_variants_differ(lt_data):
    d = lt_data(num_classes=6, n_max=80, imbalance=20, dim=8, seed=2)
    Xtr = d["X_train"] + 2.0
    scores = {v: NCM(v).fit(Xtr, d["y_train"]).decision_function(d["X_test"] + 2.0) for v in NCM_VARIANTS}
    for a in NCM_VARIANTS:
        for b in NCM_VARIANTS:
            if a < b:
                assert not np.allclose(scores[a], scores[b]), (a, b)


def test_ncm_needs_every_class():
    X = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"none for classes \[1\]"):
        NCM().fit(X, [0, 2, 2], num_classes=3)
    with pytest.raises(ValueError, match=r"none for classes \[3\]"):
        NCM().fit(X, [0, 1, 2], num_classes=4)
    # without num_classes the classes are the labels seen: a gap is no missing class
    np.testing.assert_array_equal(NCM().fit(X, [0, 2, 2]).classes_, [0, 2])


# -- LWS -------------------------------------------------------------------------------------------
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

# -- cRT -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crt_data(lt_data):
    return lt_data(num_classes=10, n_max=300, imbalance=60, dim=16, sep=3.0, noise=1.0, seed=0)


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


def test_lws_raises_few_shot_accuracy_over_joint(crt_data):
    d = crt_data
    joint = CRT(sampler="ib", epochs=8, batch_size=64, device="cpu").fit(d["X_train"], d["y_train"])
    lws = LWS(joint.weight_, joint.bias_, epochs=5, batch_size=64, device="cpu").fit(d["X_train"], d["y_train"])
    mj = np_group_summary(joint.predict(d["X_test"]), d["y_test"], d["counts"])
    ml = np_group_summary(lws.predict(d["X_test"]), d["y_test"], d["counts"])
    assert ml["few"] > mj["few"] + 0.05, (mj, ml)


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


# -- the SGD loop: schedules and keep-best ------------------------------------------------------
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


# -- parameters, validation, fitted checks ------------------------------------------------------
W4 = np.eye(4, dtype=np.float32)
X4 = np.eye(4, dtype=np.float32)
Y4 = np.arange(4)


@pytest.mark.parametrize(
    "make,fit,pattern",
    [
        (lambda: CRT(epochs=0), lambda h: h.fit(X4, Y4), r"CRT: epochs must be an int in \[1, inf\] or one of 'auto'; got 0"),
        (lambda: CRT(epochs=2.5), lambda h: h.fit(X4, Y4), r"epochs must be an int.*got 2.5"),
        (lambda: CRT(lr=0), lambda h: h.fit(X4, Y4), r"CRT: lr must be a number in \(0, inf\); got 0"),
        (lambda: CRT(sampler="balanced"), lambda h: h.fit(X4, Y4), r"sampler must be 'ib', 'cb'.*got 'balanced'"),
        (lambda: CRT(schedule="step"), lambda h: h.fit(X4, Y4), r"schedule must be one of .*'cosine'.*got 'step'"),
        (lambda: CRT(momentum=1.0), lambda h: h.fit(X4, Y4), r"momentum must be .*got 1.0"),
        (lambda: CRT(loss="focal"), lambda h: h.fit(X4, Y4), r"loss must be one of .*got 'focal'"),
        (lambda: CRT(batch_size=4, device="cpu"), lambda h: h.fit(X4, [0, 1, 2, 7], num_classes=5),
         r"labels must lie in \[0, 5\); got range \[0, 7\]"),
        (lambda: CRT(batch_size=4, device="cpu"), lambda h: h.fit(X4, [0, 1, -1, 2], num_classes=3),
         r"labels must lie in \[0, 3\)"),
        (lambda: CRT(batch_size=4, device="cpu"), lambda h: h.fit(X4, [0, 1, 0.5, 2]), r"Unknown label type: continuous"),
        (lambda: NCM("cosine"), lambda h: h.fit(X4, Y4), r"NCM: variant must be one of 'cl2n', 'cos', 'l2n', 'un'"),
        (lambda: LWS(W4, epochs=0), lambda h: h.fit(X4, Y4), r"LWS: epochs must be an int in \[1, inf\] or one of 'auto'; got 0"),
        (lambda: LWS(W4, sampler="x"), lambda h: h.fit(X4, Y4), r"LWS: sampler must be"),
        (lambda: LWS(W4, device="cpu"), lambda h: h.fit(X4[:, :3], Y4), r"X has 3 features, but weight is expecting 4"),
        (lambda: TauNorm("W"), lambda h: h.fit(), r"TauNorm: weight must be an array or tensor"),
        (lambda: JointHead(W4, np.zeros(3)), lambda h: h.fit(), r"bias must be an array or tensor|shape \(4,\)"),
    ],
)
def test_parameter_validation_messages(make, fit, pattern):
    with pytest.raises(ValueError, match=pattern):
        fit(make())


def test_batch_size_larger_than_train_set():
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 4 train rows"):
        CRT(batch_size=8, device="cpu").fit(X4, Y4)
    # the default batch ("auto", 512) shrinks on the 4 rows: to max(1, 4 // 8) = 1, 4 batches an epoch
    with pytest.warns(UserWarning, match="only 12 optimiser steps"):
        h = CRT(epochs=3, device="cpu").fit(X4, Y4)
    assert len(h.history_.loss) == 3 and (h.schedule_.batch_size, h.schedule_.batches_per_epoch) == (1, 4)


def test_features_must_be_finite_and_2d():
    X = X4.copy()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        NCM().fit(X, Y4)
    with pytest.raises(ValueError, match="2-D"):
        NCM().fit(np.zeros(4), Y4)
    with pytest.raises(ValueError, match="labels must have shape"):
        NCM().fit(X4, Y4[:3])


def test_get_and_set_params():
    h = CRT()
    p = h.get_params()
    assert p["epochs"] == "auto" and p["lr"] == 0.2 and p["batch_size"] == "auto" and p["momentum"] == 0.9
    assert p["weight_decay"] == 5e-4 and p["sampler"] == "cb" and p["schedule"] == "cosine" and p["keep_best"]
    assert h.set_params(lr=0.05, epochs=3) is h
    assert h.get_params()["lr"] == 0.05 and h.epochs == 3
    with pytest.raises(ValueError, match="invalid parameter 'learning_rate'"):
        h.set_params(learning_rate=1.0)
    assert NCM().get_params() == {"variant": "cl2n", "device": "cpu"}
    lws = LWS(W4)
    assert lws.get_params()["epochs"] == "auto" and lws.get_params()["weight"] is W4
    assert TauNorm(W4).get_params()["taus"] == DEFAULT_TAUS
    # a copy from get_params behaves the same
    clone = CRT(**{**h.get_params(), "device": "cpu", "batch_size": 2})
    assert clone.get_params()["lr"] == 0.05
    assert "lr=0.05" in repr(h) and "epochs=3" in repr(h)


@pytest.mark.parametrize(
    "head", [CRT(), NCM(), LWS(W4), TauNorm(W4, tau=1.0), JointHead(W4)], ids=lambda h: type(h).__name__
)
def test_predict_before_fit_raises(head):
    for call in (head.predict, head.decision_function):
        with pytest.raises(NotFittedError, match="not fitted yet; call fit first"):
            call(X4)


def test_fit_returns_self_and_head_evaluate():
    for head, fit in ((NCM(), lambda h: h.fit(X4, Y4)), (JointHead(W4), lambda h: h.fit()),
                      (TauNorm(W4, tau=0.5), lambda h: h.fit())):
        assert fit(head) is head
        out = head.evaluate(X4, Y4, [200, 50, 50, 5])
        assert out["all"] == 1.0 and out["few"] == 1.0 and out["many"] == 1.0
