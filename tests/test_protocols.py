"""Evaluation protocols (lt_rebalance.protocols) against hand-worked cases and small numpy re-implementations."""
import numpy as np
import pytest
import torch
from protocol_support import notebook_mask, notebook_shift_counts

from lt_rebalance import protocols as P

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("name", ["forward-50", "backward-50", "forward-2.5", "backward-1", "uniform"])
def test_shift_counts_match_lade_notebook(name):
    rng = np.random.default_rng(0)
    train = rng.permutation(np.arange(10, 400, 13))  # distinct counts: no ties, order unambiguous
    test = rng.integers(60, 90, size=len(train))
    got = P.shift_counts(name, train, test).numpy()
    np.testing.assert_array_equal(got, notebook_shift_counts(train, test.min(), name))


def test_shift_counts_hand_case_and_ties():
    # C = 3, M = 8: forward-4 keeps 8, int(8 * 0.25 ** 0.5) = 4, 2 rows by rank (most train rows first)
    assert P.shift_counts("forward-4", [5, 50, 20], [9, 8, 10]).tolist() == [2, 8, 4]
    assert P.shift_counts("backward-4", [5, 50, 20], [9, 8, 10]).tolist() == [8, 2, 4]
    # equal train counts: the lower class index ranks first (stable sort)
    assert P.class_ranks([7, 7, 9]).tolist() == [1, 2, 0]


def test_shift_mask_keeps_first_rows_in_file_order():
    labels = np.array([1, 0, 1, 1, 0, 2, 0])
    keep = torch.tensor([1, 2, 0])
    mask = P.shift_mask(labels, keep)
    assert mask.tolist() == [True, True, True, False, False, False, False]
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=300)
    keep = torch.as_tensor(rng.integers(0, 30, size=6))
    np.testing.assert_array_equal(P.shift_mask(labels, keep).numpy(), notebook_mask(labels, keep.numpy()))


def test_shifted_metrics_hand_case():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 0, 2, 2])
    mask = torch.tensor([True, True, True, False, False, False])  # class 2 keeps no row
    counts = [200, 50, 5]  # many, medium, few
    m = P.shifted_metrics(pred, labels, counts, mask)
    assert m["all"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["many"] == pytest.approx(0.5) and m["medium"] == pytest.approx(1.0)
    assert np.isnan(m["few"])


def test_parse_test_priors():
    assert P.parse_test_priors("forward-50, uniform,backward-2.5") == ("forward-50", "uniform", "backward-2.5")
    for bad in ("forward-0.5", "sideways-3", "", "uniform,uniform", "forward-"):
        with pytest.raises(ValueError):
            P.parse_test_priors(bad)


def test_correct_known_adds_log_ratio():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t, i = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    expected = s.numpy() + np.log([0.5, 0.25, 0.25]) - np.log([0.2, 0.6, 0.2])
    np.testing.assert_allclose(P.correct_known(s, t, i).numpy(), expected, rtol=1e-12)


def numpy_em(scores, implied, iters):
    post = np.exp(scores - scores.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    p = implied.copy()
    for _ in range(iters):
        w = post * (p / implied)
        w /= w.sum(1, keepdims=True)
        p = w.mean(0)
    return p


def test_em_matches_numpy_reimplementation():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(200, 5)) * 2
    implied = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    p, iters = P.em_prior(torch.as_tensor(scores), torch.as_tensor(implied), max_iter=25, tol=0.0)
    assert iters == 25
    np.testing.assert_allclose(p.numpy(), numpy_em(scores, implied, 25), rtol=1e-10)


def test_em_recovers_the_true_prior():
    # three 1-D Gaussian classes; scores = log-likelihood + log implied, so softmax = posterior under `implied`
    rng = np.random.default_rng(3)
    true = np.array([0.6, 0.3, 0.1])
    y = rng.choice(3, size=40000, p=true)
    mu = np.array([-2.0, 0.0, 2.0])
    x = mu[y] + rng.normal(size=len(y))
    implied = np.full(3, 1 / 3)
    scores = -0.5 * (x[:, None] - mu[None]) ** 2 + np.log(implied)
    p, _ = P.em_prior(torch.as_tensor(scores), torch.as_tensor(implied))
    np.testing.assert_allclose(p.numpy(), true, atol=0.01)
    # perfectly separated scores: the prior is the label frequency after one step
    sharp = np.eye(3)[y] * 50.0
    p, _ = P.em_prior(torch.as_tensor(sharp), torch.as_tensor(implied))
    np.testing.assert_allclose(p.numpy(), np.bincount(y) / len(y), atol=1e-12)


def test_stratified_resamples_keep_class_sizes():
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 1])
    chunks = list(P.stratified_resamples(labels, 50, seed=4, max_elements=9 * 7))
    assert [c.shape[0] for c in chunks] == [7] * 7 + [1]
    idx = torch.cat(chunks)
    for row in idx:
        assert torch.equal(torch.bincount(labels[row], minlength=3), torch.bincount(labels))
    again = torch.cat(list(P.stratified_resamples(labels, 50, seed=4, max_elements=9 * 7)))
    assert torch.equal(idx, again)  # seeded


def numpy_metrics(pred, labels, counts, idx, many=100, few=20):
    out = {k: [] for k in P.CI_KEYS}
    counts = np.asarray(counts)
    groups = {"many": counts > many, "few": counts < few}
    groups["medium"] = ~groups["many"] & ~groups["few"]
    for row in idx:
        p, lab = pred[row], labels[row]
        acc = np.array([np.mean(p[lab == c] == c) if np.any(lab == c) else np.nan for c in range(len(counts))])
        out["all"].append(np.mean(p == lab))
        out["mean_class"].append(np.nanmean(acc))
        for g, m in groups.items():
            out[g].append(np.nanmean(acc[m]) if np.any(~np.isnan(acc[m])) else np.nan)
    return {k: np.array(v) for k, v in out.items()}


def test_bootstrap_metrics_match_a_loop_over_resamples():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 6, size=120)
    pred = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 6, size=120))
    counts = [300, 150, 60, 30, 10, 3]
    idx = torch.cat(list(P.stratified_resamples(labels, 40, seed=1)))
    got = P.bootstrap_metrics(torch.as_tensor(pred), labels, counts, iter([idx]))
    want = numpy_metrics(pred, labels, counts, idx.numpy())
    for k in P.CI_KEYS:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-12)
    lo, hi = P.percentile_interval(got["all"], 0.9)
    assert [lo, hi] == pytest.approx(list(np.percentile(want["all"], [5, 95])))


def test_bootstrap_interval_width_is_binomial():
    # 2000 balanced rows, 80 % correct: the 95 % interval is about p ± 1.96 sqrt(p (1 - p) / N)
    labels = np.repeat(np.arange(4), 500)
    correct = np.random.default_rng(6).random(2000) < 0.8
    pred = torch.as_tensor(np.where(correct, labels, (labels + 1) % 4))
    samples = P.bootstrap_metrics(pred, labels, [500] * 4, P.stratified_resamples(labels, 2000, seed=0))
    lo, hi = P.percentile_interval(samples["all"], 0.95)
    half = 1.96 * np.sqrt(0.8 * 0.2 / 2000)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_paired_difference_on_the_same_resamples():
    labels = np.repeat(np.arange(3), 200)
    good = torch.as_tensor(labels.copy())
    bad = good.clone()
    bad[::4] = (bad[::4] + 1) % 3  # 25 % wrong
    nearly = good.clone()
    nearly[:2] = (nearly[:2] + 1) % 3
    res = lambda: P.stratified_resamples(labels, 300, seed=0)  # noqa: E731
    s = {n: P.bootstrap_metrics(p, labels, [100] * 3, res()) for n, p in
         {"good": good, "bad": bad, "nearly": nearly}.items()}
    assert P.paired_difference(s["bad"], s["good"], 0.95)["differs"]
    same = P.paired_difference(s["good"], s["good"], 0.95)
    assert same["ci"] == [0.0, 0.0] and not same["differs"]
    rows = [{"method": n, "test": {"all": float((p.numpy() == labels).mean())}} for n, p in
            [("bad", bad), ("good", good)]]
    P.paired_differences(rows, [{"test": s["bad"]}, {"test": s["good"]}], 0.95)
    assert rows[0]["vs_best"]["test"]["best"] == "good" and rows[0]["vs_best"]["test"]["differs"]
    assert rows[0]["vs_best"]["test"]["diff"] == pytest.approx(-0.25)


def test_implied_priors():
    """Each head's own answer, against the priors worked out by hand (docs/METHODS.md)."""
    from lt_rebalance.heads import (
        CRT,
        KNN,
        LWS,
        MARC,
        DisAlign,
        JointHead,
        LinearProbe,
        TauNorm,
        WeightBalancing,
    )
    from lt_rebalance.posthoc import LogitAdjustment, TemperatureScaled
    from lt_rebalance.priors import NoImpliedPrior

    counts = torch.tensor([60, 30, 10])
    W, b = torch.randn(3, 4), torch.randn(3)
    joint = JointHead(W, b).fit()
    np.testing.assert_allclose(joint.implied_prior(counts).numpy(), [0.6, 0.3, 0.1])
    uniform = [1 / 3] * 3
    np.testing.assert_allclose(TauNorm(W, 1.0).fit().implied_prior(counts).numpy(), uniform)
    np.testing.assert_allclose(CRT().implied_prior(counts).numpy(), uniform)  # class-balanced sampling
    np.testing.assert_allclose(CRT(sampler="ib", loss="balanced-softmax").implied_prior(counts).numpy(), uniform)
    sq = np.sqrt([60, 30, 10])
    np.testing.assert_allclose(LWS(W, b, sampler="sqrt").implied_prior(counts).numpy(), sq / sq.sum())
    np.testing.assert_allclose(MARC(W, b).implied_prior(counts).numpy(), uniform)  # class-balanced, like LWS
    np.testing.assert_allclose(MARC(W, b, sampler="ib").implied_prior(counts).numpy(), [0.6, 0.3, 0.1])
    cb = 1 / (1 - 0.99 ** np.array([60.0, 30.0, 10.0]))  # Cui et al. weights on instance-balanced draws
    np.testing.assert_allclose(WeightBalancing(W, b, beta=0.99).implied_prior(counts).numpy(),
                               np.array([60, 30, 10]) * cb / (np.array([60, 30, 10]) * cb).sum())
    tail = np.array([60.0, 30.0, 10.0]) ** -0.2  # DisAlign: GRW rho 1.2 on instance-balanced draws, n^(1 - rho)
    np.testing.assert_allclose(DisAlign(W, b).implied_prior(counts).numpy(), tail / tail.sum())
    np.testing.assert_allclose(DisAlign(W, b, rho=1.0).implied_prior(counts).numpy(), uniform)
    np.testing.assert_allclose(LinearProbe().implied_prior(counts).numpy(), uniform)
    np.testing.assert_allclose(LinearProbe(class_weight="none").implied_prior(counts).numpy(), [0.6, 0.3, 0.1])
    np.testing.assert_allclose(LogitAdjustment(joint, counts, tau=1.0).fit().implied_prior(counts).numpy(),
                               uniform, rtol=1e-6)
    half = np.sqrt([0.6, 0.3, 0.1])
    np.testing.assert_allclose(LogitAdjustment(joint, counts, tau=0.5).fit().implied_prior(counts).numpy(),
                               half / half.sum(), rtol=1e-6)
    X, y = torch.randn(30, 4), torch.arange(30) % 3
    np.testing.assert_allclose(TemperatureScaled(joint, 2.0).fit().implied_prior(counts).numpy(), [0.6, 0.3, 0.1])
    with pytest.raises(NoImpliedPrior, match="kNN votes"):
        KNN(k=3).fit(X, y).implied_prior(counts)
    # text heads (docs/METHODS.md, "Text heads")
    from lt_rebalance.heads import GLA, TextInitCosine, ZeroShot, ZeroShotDebiased

    with pytest.raises(NoImpliedPrior, match="pre-training"):
        ZeroShot(W).fit().implied_prior(counts)
    zs = ZeroShotDebiased(W, 10.0, tau=0.5, temperature=1.0).fit(X, y)
    q = zs.log_prior_.exp().numpy()
    np.testing.assert_allclose(zs.implied_prior(counts).numpy(), np.sqrt(q) / np.sqrt(q).sum(), rtol=1e-6)
    np.testing.assert_allclose(GLA(zs, joint, counts).fit().implied_prior(counts).numpy(), uniform)
    np.testing.assert_allclose(TextInitCosine(W).implied_prior(counts).numpy(), uniform)  # ib draws, LA loss
    np.testing.assert_allclose(TextInitCosine(W, tau=0.0).implied_prior(counts).numpy(), [0.6, 0.3, 0.1])


def test_known_prior_correction_undoes_a_shift():
    # Bayes-optimal scores under the implied prior, corrected to the target prior: accuracy does not drop
    rng = np.random.default_rng(7)
    mu = np.array([-1.5, 0.0, 1.5])
    target = np.array([0.8, 0.15, 0.05])
    y = rng.choice(3, size=5000, p=target)
    x = mu[y] + rng.normal(size=len(y))
    scores = torch.as_tensor(-0.5 * (x[:, None] - mu) ** 2)  # uniform implied prior
    plain = (scores.argmax(1).numpy() == y).mean()
    fixed = P.correct_known(scores, torch.as_tensor(target), torch.full((3,), 1 / 3)).argmax(1).numpy()
    assert (fixed == y).mean() > plain + 0.05
