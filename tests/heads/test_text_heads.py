"""Text-head methods (zero-shot, GLA debiasing, GLA, LIFT's text-initialised classifier) against
independent numpy/scipy computations of the papers' formulas. No open_clip needed: text heads here
are arrays."""
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax, logsumexp, softmax

from lt_rebalance.heads import GLA, JointHead, TextInitCosine, ZeroShot, ZeroShotDebiased
from lt_rebalance.heads.training import FewStepsWarning
from lt_rebalance.heads.zero_shot import confidence_temperature, estimate_log_prior
from lt_rebalance.priors import NoImpliedPrior
from lt_rebalance.templates import IMAGENET_TEMPLATES, load_templates


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    C, D = 5, 16
    T = _unit(rng.normal(size=(C, D))).astype(np.float32)
    y = np.repeat(np.arange(C), 12)
    X = (3 * T[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    return X, y, T


def _cos(X, T, s):
    return s * _unit(X.astype(np.float64)) @ _unit(T.astype(np.float64)).T


def test_templates():
    assert len(load_templates("imagenet")) == 80 == len(set(IMAGENET_TEMPLATES))
    assert load_templates("photo") == ["a photo of a {}."]
    with pytest.raises(ValueError, match="neither a template set"):
        load_templates("no-such-set")


def test_template_file(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("a {}.\n\nan image of {}\n")
    assert load_templates(str(good)) == ["a {}.", "an image of {}"]
    bad = tmp_path / "b.txt"
    bad.write_text("a photo\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_templates(str(bad))


def test_zero_shot_is_scaled_cosine(data):
    X, y, T = data
    head = ZeroShot(T * 3.0, logit_scale=50.0).fit()  # rows are normalised by the head
    np.testing.assert_allclose(head.scores(X), _cos(X, T, 50.0), rtol=1e-5, atol=1e-4)
    with pytest.raises(NoImpliedPrior, match="pre-training"):
        head.implied_prior(np.ones(5))


def test_confidence_temperature_matches_accuracy(data):
    X, y, T = data
    z = _cos(X, T, 30.0)
    t = confidence_temperature(z, y)
    acc = (z.argmax(1) == y).mean()
    assert softmax(z / t, axis=1).max(1).mean() == pytest.approx(acc, abs=1e-6)


def _authors_prior(z, y):
    """GLA's estimator as the authors state it: argmin over the simplex of the cross-entropy of
    z − log q on labelled rows (parametrised q = softmax(θ)); scipy, float64, per-row labels."""
    C = z.shape[1]

    def ce(theta):
        lq = log_softmax(theta)
        a = z - lq
        return np.mean(logsumexp(a, axis=1) - a[np.arange(len(y)), y])

    res = minimize(ce, np.zeros(C), method="BFGS", options={"gtol": 1e-10})
    return log_softmax(res.x)


def test_prior_estimate_matches_the_authors_objective(data):
    X, y, T = data
    rng = np.random.default_rng(1)
    bias = np.log(rng.dirichlet(np.ones(5)))  # a skewed "pre-training" prior baked into the scores
    z = _cos(X, T, 20.0) + bias
    lq = estimate_log_prior(z, np.bincount(y)).numpy()
    np.testing.assert_allclose(lq, _authors_prior(z, y), atol=1e-4)
    # stationarity: the adjusted mean softmax equals the label frequencies
    np.testing.assert_allclose(softmax(z - lq, axis=1).mean(0), np.bincount(y) / len(y), atol=1e-6)


def test_prior_estimate_refuses_empty_target():
    with pytest.raises(ValueError, match="no rows"):
        estimate_log_prior(np.zeros((3, 2)), [3, 0])


def test_debiased_scores_and_tau_selection(data):
    X, y, T = data
    Tb = T + 0.4 * T[0]  # every text embedding leans towards class 0: a prior-like bias of the scores
    Xb = X
    head = ZeroShotDebiased(Tb, 20.0, tau=None, taus=(0.0, 0.5, 1.0, 1.5)).fit(Xb, y)
    z = _cos(Xb, Tb, 20.0)
    t = confidence_temperature(z, y)
    lq = _authors_prior(z / t, y)
    accs = {tau: ((z / t - tau * lq).argmax(1) == y).mean() for tau in (0.0, 0.5, 1.0, 1.5)}
    best = min(k for k, v in accs.items() if v == max(accs.values()))
    assert head.tau_ == best
    assert head.temperature_ == pytest.approx(t, rel=1e-6)
    np.testing.assert_allclose(head.scores(Xb), z / t - best * lq, atol=2e-3)
    q = np.exp(lq)
    expected = q ** (1 - best) / (q ** (1 - best)).sum()
    np.testing.assert_allclose(head.implied_prior(np.ones(5)).numpy(), expected, atol=1e-4)
    fixed = ZeroShotDebiased(Tb, 20.0, tau=1.0, temperature=2.0, target="uniform").fit(Xb, y)
    lq_u = estimate_log_prior(z / 2.0, np.ones(5)).numpy()
    np.testing.assert_allclose(fixed.scores(Xb), z / 2.0 - lq_u, atol=2e-3)
    np.testing.assert_allclose(fixed.implied_prior(np.ones(5)).numpy(), np.full(5, 0.2), atol=1e-9)


def test_gla_combines_both_parts_without_their_priors(data):
    X, y, T = data
    rng = np.random.default_rng(2)
    W, b = rng.normal(size=(5, 16)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    counts = np.array([40, 20, 10, 5, 2])
    zs = ZeroShotDebiased(T, 20.0, tau=1.0).fit(X, y)
    head = GLA(zs, JointHead(W, b).fit(), counts).fit()
    z = _cos(X, T, 20.0)
    t = confidence_temperature(z, y)
    lq = _authors_prior(z / t, y)
    expected = z / t - lq + X.astype(np.float64) @ W.T + b - np.log(counts / counts.sum())
    np.testing.assert_allclose(head.scores(X), expected, atol=3e-3)
    np.testing.assert_allclose(head.implied_prior(counts).numpy(), np.full(5, 0.2))


def test_text_init_one_sgd_step_matches_numpy(data):
    """One full-batch step of plain SGD (no momentum, no decay) against the hand-derived gradient of
    the logit-adjusted loss through the row normalisation of W."""
    X, y, T = data
    keep = np.r_[np.arange(12 * 2), 24 + np.arange(12 * 3)[::2]]  # classes 0-1 full, 2-4 halved: imbalanced
    X, y = X[keep], y[keep]
    counts = np.bincount(y, minlength=5).astype(np.float64)
    s, lr, N = 25.0, 0.5, len(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStepsWarning)
        head = TextInitCosine(T, scale=s, epochs=1, batch_size=N, lr=lr, momentum=0.0, weight_decay=0.0,
                              schedule="constant", keep_best=False, device="cpu").fit(X, y)
    Xn, W0 = _unit(X.astype(np.float64)), _unit(T.astype(np.float64))
    z = s * Xn @ W0.T + np.log(counts / counts.sum())
    G = s * (softmax(z, axis=1) - np.eye(5)[y]).T @ Xn / N  # dL/dŵ (C, D)
    grad = G - (G * W0).sum(1, keepdims=True) * W0  # through ŵ = w / ||w|| at ||w|| = 1
    np.testing.assert_allclose(head.weight_.numpy(), _unit(W0 - lr * grad), atol=1e-5)
    np.testing.assert_allclose(head.scores(X), s * Xn @ _unit(W0 - lr * grad).T, atol=1e-3)
    np.testing.assert_allclose(head.implied_prior(counts).numpy(), np.full(5, 0.2), atol=1e-12)
    assert len(set(counts)) > 1


def test_text_init_learns_and_random_init_differs(data):
    X, y, T = data
    text = TextInitCosine(T, device="cpu").fit(X, y, X, y)
    rand = TextInitCosine(T, init="random", device="cpu").fit(X, y)
    assert text.score(X, y) > 0.9
    assert not torch.allclose(text.weight_, rand.weight_)
    assert text.schedule_.steps >= 500
