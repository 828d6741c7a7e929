"""Label-shift estimators against independent numpy computations of their papers' formulas."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize, minimize_scalar

from lt_rebalance import label_shift as L
from lt_rebalance import protocols as P
from lt_rebalance.calibration import fit_bcts

MU = np.array([-3.0, -1.0, 1.0, 3.0])
SOURCE = np.array([0.4, 0.3, 0.2, 0.1])
TARGET = np.array([0.1, 0.2, 0.3, 0.4])


def gaussian_probs(prior, n, rng, implied=SOURCE, scale=1.0):
    """Rows of four 1-D Gaussian classes; probabilities = the exact posteriors under ``implied``
    (``scale`` != 1: a miscalibrated model, the log-likelihood multiplied by it)."""
    y = rng.choice(len(prior), size=n, p=prior)
    x = MU[y] + rng.normal(size=n)
    s = -0.5 * (x[:, None] - MU[None]) ** 2 * scale + np.log(implied)
    p = np.exp(s - s.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    val, yv = gaussian_probs(SOURCE, 20000, rng)
    test, yt = gaussian_probs(TARGET, 20000, rng)
    return val, yv, test, yt


# -- numpy re-implementations ---------------------------------------------------------------------------

def np_em(probs, source, iters):
    p = source.copy()
    for _ in range(iters):
        w = probs * (p / source)
        w /= w.sum(1, keepdims=True)
        p = w.mean(0)
    return p


def np_mapls_em(probs, pz, lam, q_prior, iters):  # the authors' mapls_EM (soft M-step, init 'identical')
    pz = pz / pz.sum()
    qz = pz.copy()
    w = qz / pz
    for _ in range(iters):
        mp = probs * w
        mp = mp / np.abs(mp).sum(-1, keepdims=True)
        qz = lam * mp.mean(0) + (1 - lam) * q_prior
        qz = qz / qz.sum()
        w = qz / pz
    return qz


def np_kl(p, q):
    q = q + 1e-8
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(p != 0, p * np.log(p / q), 0))


def np_mapls_lambda(probs, pz, iters):  # the authors' get_lamda
    K = len(pz)
    u = np.ones(K) / K
    q = np_mapls_em(probs, pz, 1, 0, iters)
    tu, ts, su = np_kl(q, u), np_kl(q, pz), np_kl(pz, u)
    lam_inv = lambda d, lam: (1 / (1 - lam) - 1) / d  # noqa: E731
    forward = lambda d, g: g * d / (1 + g * d)  # noqa: E731
    su_conf = 1 - forward(su, lam_inv(0.5, 0.2))
    return 0.9 * forward(tu, lam_inv(0.5, su_conf)) + 0.1 * (1 - forward(ts, lam_inv(0.5, su_conf)))


def np_confusion(probs, y, mode):
    C = probs.shape[1]
    M = np.zeros((C, C))
    for row, label in zip(probs, y):
        if mode == "hard":
            M[np.argmax(row), label] += 1
        else:
            M[:, label] += row
    return M / len(y)


def np_marginal(probs, mode):
    if mode == "hard":
        return np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
    return probs.mean(0)


def np_nll(z, y):
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


# -- every estimator recovers a known target prior --------------------------------------------------------

@pytest.mark.parametrize("method,options", [("em", {}), ("bbse", {}), ("bbse", {"mode": "soft"}),
                                            ("rlls", {}), ("mapls", {"lam": 1.0})])
def test_estimators_recover_the_true_target_prior(problem, method, options):
    val, yv, test, yt = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback needed on this well-posed problem
        q = L.estimate_prior(test, method, val_probs=val, val_labels=yv, source_prior=SOURCE, **options)
    assert q.dtype == np.float64 and q.shape == (4,) and (q >= 0).all()
    assert q.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(q, np.bincount(yt) / len(yt), atol=0.02)


def test_em_is_the_saerens_iteration_and_protocols_em_prior(problem):
    _, _, test, _ = problem
    d = L.estimate_prior_details(test, "em", source_prior=SOURCE, max_iter=40, tol=0.0)
    assert d.iterations == 40
    np.testing.assert_allclose(d.prior, np_em(test, SOURCE, 40), rtol=1e-10)
    p, iters = P.em_prior(torch.log(torch.as_tensor(test)), torch.as_tensor(SOURCE), max_iter=40, tol=0.0)
    np.testing.assert_allclose(d.prior, p.numpy(), rtol=1e-10)
    # without source_prior the source is uniform
    np.testing.assert_allclose(L.estimate_prior(test, "em", max_iter=7, tol=0.0), np_em(test, np.full(4, 0.25), 7),
                               rtol=1e-10)


def test_mapls_matches_the_authors_update_and_lambda_rule(problem):
    _, _, test, yt = problem
    d = L.estimate_prior_details(torch.as_tensor(test), "mapls", source_prior=SOURCE)
    lam = np_mapls_lambda(test, SOURCE, 100)
    assert 0 < lam < 1 and d.lam == pytest.approx(lam, rel=1e-10)
    assert d.iterations == 100
    np.testing.assert_allclose(d.prior, np_mapls_em(test, SOURCE, lam, np.full(4, 0.25), 100), rtol=1e-10)
    # the MAP estimate lies between the uniform prior and the ML estimate, class by class
    ml = np_em(test, SOURCE, 100)
    assert np.all(np.abs(d.prior - 0.25) <= np.abs(ml - 0.25) + 1e-12)
    fixed = L.estimate_prior(test, "mapls", source_prior=SOURCE, lam=0.3, max_iter=50)
    np.testing.assert_allclose(fixed, np_mapls_em(test, SOURCE, 0.3, np.full(4, 0.25), 50), rtol=1e-10)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_bbse_is_a_direct_linear_solve(problem, mode):
    val, yv, test, _ = problem
    Cm = np_confusion(val[:3000], yv[:3000], mode)
    w = np.linalg.solve(Cm, np_marginal(test, mode))
    expect = w * np.bincount(yv[:3000]) / 3000
    q = L.estimate_prior(test, "bbse", val_probs=val[:3000], val_labels=yv[:3000], mode=mode,
                         source_prior=[0.25] * 4)  # not used: BBSE's source is val
    np.testing.assert_allclose(q, expect / expect.sum(), rtol=1e-9)


def test_bbse_singular_confusion_matrix_uses_least_squares_with_a_warning():
    # class 2 is never predicted on val: row 2 of C is 0
    val = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    yv = np.array([0, 1, 2, 2, 1])
    test = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    Cm, mu = np_confusion(val, yv, "hard"), np_marginal(test, "hard")
    w = np.clip(np.linalg.lstsq(Cm, mu, rcond=None)[0], 0, None)
    expect = w * np.bincount(yv) / 5
    with pytest.warns(L.LabelShiftWarning, match=r"singular.*\[2\].*least-squares"):
        d = L.estimate_prior_details(test, "bbse", val_probs=val, val_labels=yv)
    np.testing.assert_allclose(d.prior, expect / expect.sum(), rtol=1e-9)
    assert any("singular" in n for n in d.notes)


def test_bbse_clips_negative_weights_with_a_warning():
    val = np.eye(3)[[0, 0, 1, 1, 2, 2, 0, 1]] * 0.97 + 0.01
    yv = np.array([0, 0, 1, 1, 2, 2, 1, 0])  # C = [[2,1,0],[1,2,0],[0,0,2]] / 8
    test = np.eye(3)[[0, 0, 0, 0, 2]] * 0.97 + 0.01  # mu = (0.8, 0, 0.2): w_1 < 0
    Cm, mu = np_confusion(val, yv, "hard"), np_marginal(test, "hard")
    w = np.linalg.solve(Cm, mu)
    assert w[1] < 0
    expect = np.clip(w, 0, None) * np.bincount(yv) / 8
    with pytest.warns(L.LabelShiftWarning, match="1 negative importance weights clipped"):
        q = L.estimate_prior(test, "bbse", val_probs=val, val_labels=yv)
    np.testing.assert_allclose(q, expect / expect.sum(), rtol=1e-9)
    assert q[1] == 0


# -- RLLS ----------------------------------------------------------------------------------------------

def np_rlls_interior(A, b, rho):
    """The minimiser of ||A t - b|| + rho ||t|| with both norms > 0 and no active bound: the ridge
    solution t(m) = (A'A + m I)^-1 A'b at the m where m ||t(m)|| = rho ||A t(m) - b||."""
    t = lambda m: np.linalg.solve(A.T @ A + m * np.eye(len(b)), A.T @ b)  # noqa: E731
    h = lambda m: m * np.linalg.norm(t(m)) - rho * np.linalg.norm(A @ t(m) - b)  # noqa: E731
    return t(brentq(h, 1e-9, 1e3, xtol=1e-15))


def interior_range(A, b):
    """(rho_1, rho_2): below rho_1 the exact fit A t = b is optimal, above rho_2 t = 0."""
    e = np.linalg.solve(A, b)
    return 1 / np.linalg.norm(np.linalg.solve(A.T, e / np.linalg.norm(e))), np.linalg.norm(A.T @ b) / np.linalg.norm(b)


def test_rlls_rho_is_the_authors_3_delta_c():
    L_ = math.log(2 * 10 / 0.05)  # C = 10, n = 1000, delta = 0.05
    assert L.rlls_rho(10, 1000) == pytest.approx(3 * (2 * L_ / 3000 + math.sqrt(2 * L_ / 1000)), rel=1e-14)
    assert L.rlls_rho(10, 1000) == pytest.approx(0.34038, abs=1e-5)


def test_rlls_three_regimes_against_closed_forms():
    A = np.array([[0.30, 0.05, 0.02], [0.04, 0.25, 0.03], [0.01, 0.05, 0.25]])
    b = np.array([0.04, -0.03, -0.01])
    # interior: both norms > 0
    lo, hi = interior_range(A, b)
    assert lo < hi
    rho = (lo + hi) / 2
    t = L.rlls_theta(A, b, rho)
    ref = np_rlls_interior(A, b, rho)
    assert np.linalg.norm(A @ ref - b) > 1e-4 and (ref > -1).all()
    np.testing.assert_allclose(t, ref, atol=1e-6)
    assert L.rlls_objective(t, A, b, rho) <= L.rlls_objective(ref, A, b, rho) + 1e-12
    # strong regulariser: theta = 0 exactly (w = 1) iff ||A'b|| <= rho ||b||
    big = 1.01 * np.linalg.norm(A.T @ b) / np.linalg.norm(b)
    np.testing.assert_array_equal(L.rlls_theta(A, b, big), 0.0)
    # weak regulariser: the exact fit A t = b (= BBSE) is optimal when ||A^-T rho t/||t|| || <= 1
    small = 1e-3
    exact = np.linalg.solve(A, b)
    assert np.linalg.norm(np.linalg.solve(A.T, small * exact / np.linalg.norm(exact))) <= 1
    np.testing.assert_allclose(L.rlls_theta(A, b, small), exact, rtol=1e-12)


def test_rlls_respects_the_bound_theta_at_least_minus_one():
    A = np.diag([0.5, 0.3, 0.2])
    b = np.array([0.3, -0.45, 0.15])  # the exact fit has theta_1 = -1.5
    rho = 0.01
    t = L.rlls_theta(A, b, rho)
    assert t.min() >= -1 - 1e-12 and t[1] == pytest.approx(-1, abs=1e-7)
    # no feasible point does better (an independent SLSQP search over the same objective)
    obj = lambda x: np.linalg.norm(A @ x - b) + rho * np.linalg.norm(x)  # noqa: E731
    ref = minimize(obj, np.zeros(3), method="SLSQP", bounds=[(-1, None)] * 3, options={"ftol": 1e-14})
    assert obj(t) <= ref.fun + 1e-9


def test_rlls_end_to_end(problem):
    val, yv, test, _ = problem
    n = 2000
    Cm, mu = np_confusion(val[:n], yv[:n], "hard"), np_marginal(test, "hard")
    b = mu - Cm.sum(1)  # the test predicted marginal minus val's
    three_delta = 3 * (2 * math.log(2 * 4 / 0.05) / (3 * n) + math.sqrt(2 * math.log(2 * 4 / 0.05) / n))
    lo, hi = interior_range(Cm, b)
    rho = (lo + hi) / 2
    alpha = rho / three_delta
    theta = np_rlls_interior(Cm, b, rho)
    expect = (1 + theta) * np.bincount(yv[:n]) / n
    q = L.estimate_prior(test, "rlls", val_probs=val[:n], val_labels=yv[:n], alpha=alpha)
    np.testing.assert_allclose(q, expect / expect.sum(), atol=1e-6)
    # the default alpha = 0.01 is weak here: RLLS = BBSE
    np.testing.assert_allclose(L.estimate_prior(test, "rlls", val_probs=val[:n], val_labels=yv[:n]),
                               L.estimate_prior(test, "bbse", val_probs=val[:n], val_labels=yv[:n]), atol=1e-9)


# -- calibration ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def miscalibrated():
    rng = np.random.default_rng(5)
    val, yv = gaussian_probs(np.full(4, 0.25), 3000, rng, implied=np.full(4, 0.25), scale=2.5)
    test, yt = gaussian_probs(TARGET, 3000, rng, implied=np.full(4, 0.25), scale=2.5)
    return val, yv, test, yt


def test_temperature_calibration_then_em(miscalibrated):
    val, yv, test, _ = miscalibrated
    zv, zt = np.log(val), np.log(test)
    T = minimize_scalar(lambda t: np_nll(zv / t, yv), bounds=(0.05, 20), method="bounded",
                        options={"xatol": 1e-10}).x
    d = L.estimate_prior_details(test, "em", val_probs=val, val_labels=yv, calibration="temperature",
                                 source_prior=SOURCE, max_iter=30, tol=0.0)  # source_prior not used
    assert d.temperature == pytest.approx(T, rel=1e-5) and d.temperature > 1.5  # overconfident scores
    pt = np.exp(zt / T - (zt / T).max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    marginal = np.bincount(yv, minlength=4) / len(yv)
    np.testing.assert_allclose(d.source_prior, marginal)
    np.testing.assert_allclose(d.prior, np_em(pt, marginal, 30), rtol=1e-6)


def test_bcts_fit_matches_a_numpy_nll_minimisation(miscalibrated):
    val, yv, _, _ = miscalibrated
    zv = np.log(val)
    # a biased model: class 0 favoured by +1
    zb = zv + np.array([1.0, 0, 0, 0])

    def nll(x):
        return np_nll(x[0] * zb + np.concatenate([[0.0], x[1:]]), yv)

    ref = minimize(nll, np.array([1.0, 0, 0, 0]), method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 40000, "maxfev": 40000})
    T, b = fit_bcts(zb, yv)
    b_ref = np.concatenate([[0.0], ref.x[1:]])
    assert T == pytest.approx(1 / ref.x[0], rel=1e-4)
    np.testing.assert_allclose(b, b_ref - b_ref.mean(), atol=1e-4)
    assert np_nll(zb / T + b, yv) <= ref.fun + 1e-10
    assert b[0] - b[1:].mean() < -0.2  # the bias takes back class 0's offset (+1 before / T)
    # stationarity in b: mean calibrated probability = label frequency
    s = zb / T + b
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p.mean(0), np.bincount(yv) / len(yv), atol=1e-7)


def test_bcts_then_em_and_mapls(miscalibrated):
    val, yv, test, yt = miscalibrated
    T, b = fit_bcts(np.log(val), yv)
    s = np.log(test) / T + b
    pt = np.exp(s - s.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    marginal = np.bincount(yv, minlength=4) / len(yv)
    d = L.estimate_prior_details(test, "em", val_probs=val, val_labels=yv, calibration="bcts", max_iter=50, tol=0)
    assert d.temperature == pytest.approx(T) and np.allclose(d.bias, b)
    np.testing.assert_allclose(d.prior, np_em(pt, marginal, 50), rtol=1e-6)
    np.testing.assert_allclose(d.prior, np.bincount(yt) / len(yt), atol=0.03)
    m = L.estimate_prior_details(test, "mapls", val_probs=val, val_labels=yv, calibration="bcts")
    lam = np_mapls_lambda(pt, marginal, 100)
    assert m.lam == pytest.approx(lam, rel=1e-5)
    np.testing.assert_allclose(m.prior, np_mapls_em(pt, marginal, lam, np.full(4, 0.25), 100), rtol=1e-5)


def test_bcts_repairs_em_on_biased_overconfident_scores(miscalibrated):
    def biased(p):  # the model adds +1.5 to class 0's log-probability: its implied prior is not uniform
        q = p * np.exp([1.5, 0, 0, 0])
        return q / q.sum(1, keepdims=True)

    val, yv, test, yt = miscalibrated
    truth = np.bincount(yt) / len(yt)
    plain = L.estimate_prior(biased(test), "em")
    cal = L.estimate_prior(biased(test), "em", val_probs=biased(val), val_labels=yv, calibration="bcts")
    assert np.abs(cal - truth).sum() < 0.05 < np.abs(plain - truth).sum()


# -- bad input ---------------------------------------------------------------------------------------------

GOOD = np.full((3, 2), 0.5)


@pytest.mark.parametrize("test,kwargs,match", [
    (np.array([[1.2, -0.2], [0.5, 0.5]]), {}, "test_probs hold negative values"),
    (np.array([[0.5, 0.4], [0.5, 0.5]]), {}, r"not distributions: row 0 sums to 0\.9"),
    (np.array([[np.nan, 0.5], [0.5, 0.5]]), {}, "NaN or Inf"),
    (np.ones(3), {}, r"non-empty \(N, C\)"),
    (GOOD, {"val_probs": np.full((3, 3), 1 / 3), "val_labels": [0, 1, 2], "method": "bbse"},
     "val_probs have 3 classes but test_probs have 2"),
    (GOOD, {"val_probs": GOOD, "val_labels": [0, 1], "method": "bbse"}, r"val_labels must be \(N,\) with N = 3"),
    (GOOD, {"val_probs": GOOD, "val_labels": [0, 1, 2], "method": "bbse"}, r"must lie in \[0, 2\)"),
    (GOOD, {"val_probs": GOOD, "val_labels": [0, 0, 0], "method": "bbse"},
     r"val split has no row of classes \[1\] \(1 of 2\); BBSE cannot estimate their weights"),
    (GOOD, {"val_probs": GOOD, "val_labels": [1, 1, 1], "method": "em", "calibration": "bcts"},
     r"no row of classes \[0\].*source prior"),
    (GOOD, {"method": "bbse"}, "BBSE needs a labelled source sample"),
    (GOOD, {"method": "em", "calibration": "temperature"}, "calibration 'temperature' needs a labelled"),
    (GOOD, {"method": "kmm"}, "unknown label-shift estimator 'kmm'; use one of em, bbse, rlls, mapls"),
    (GOOD, {"method": "em", "calibration": "platt"}, "unknown calibration 'platt'"),
    (GOOD, {"method": "em", "lam": 0.5}, r"unknown option\(s\) \['lam'\] for 'em'"),
    (GOOD, {"method": "bbse", "mode": "fuzzy"}, "mode must be 'hard' or 'soft'"),
    (GOOD, {"method": "mapls", "lam": 1.5}, r"lam must lie in \[0, 1\]"),
    (GOOD, {"method": "rlls", "alpha": -1}, "rlls needs alpha >= 0"),
    (GOOD, {"method": "em", "source_prior": [1.0]}, r"source_prior must have shape \(2,\)"),
    (GOOD, {"method": "em", "source_prior": [0.7, 0.7]}, "source_prior must be a distribution"),
    (GOOD, {"method": "em", "source_prior": [1.0, 0.0]}, r"source prior is 0 for classes \[1\]"),
    (GOOD, {"method": "em", "max_iter": 0}, "at least one iteration"),
])
def test_bad_inputs(test, kwargs, match):
    kwargs = {"method": "em", **kwargs}
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        L.estimate_prior(test, method, **kwargs)


def test_float32_rows_within_tolerance_and_torch_inputs_are_accepted():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 8142)).astype(np.float32)
    p = torch.softmax(torch.from_numpy(z), 1)  # float32 rows: sums within ~1e-6 of 1
    q = L.estimate_prior(p, "em", max_iter=3, tol=0.0)
    assert q.shape == (8142,) and q.sum() == pytest.approx(1)


def test_mapls_lambda_near_a_uniform_source_is_unstable_and_clipped():
    # uniform source, one-hot rows: the MLLS estimate is the label frequency 0.5 + k / 20000
    src = np.array([0.5, 0.5])
    lams = []
    for k in range(5):
        probs = np.zeros((20000, 2))
        probs[: 10000 + k, 0] = 1
        probs[10000 + k:, 1] = 1
        ref = np_mapls_lambda(probs, src, 100)
        if 0 <= ref <= 1:
            lams.append(L.mapls_lambda(torch.as_tensor(probs), torch.as_tensor(src)))
            assert lams[-1] == pytest.approx(ref, abs=1e-4)  # ill-conditioned: rounding moves it by ~2e-5
        else:  # the authors' rule leaves [0, 1]: clipped, with a warning
            assert ref == pytest.approx(1.1, abs=1e-3)
            with pytest.warns(L.LabelShiftWarning, match="lambda = 1.1.*clipped to 1"):
                lams.append(L.mapls_lambda(torch.as_tensor(probs), torch.as_tensor(src)))
            assert lams[-1] == 1.0
    np.testing.assert_allclose(lams, [0.74, 0.70, 0.10, 1.0, 0.973], atol=2e-3)


def test_calibration_applies_to_bbse_too(problem):
    val, yv, test, _ = problem
    plain = L.estimate_prior(test, "bbse", val_probs=val, val_labels=yv)
    scaled = L.estimate_prior(test, "bbse", val_probs=val, val_labels=yv, calibration="temperature")
    np.testing.assert_allclose(scaled, plain, rtol=1e-12)  # hard mode: the argmax ignores a temperature


def test_adjusted_scores_and_prior_error(problem, miscalibrated):
    _, _, test, _ = problem
    d = L.estimate_prior_details(test, "em", source_prior=SOURCE)
    # uncalibrated: the argmax of protocols.correct_known on any logits of these probabilities
    logits = torch.as_tensor(np.log(test) + 3.0)
    known = P.correct_known(logits, torch.as_tensor(d.prior), torch.as_tensor(SOURCE)).argmax(1)
    np.testing.assert_array_equal(d.adjusted_scores(test).argmax(1).numpy(), known.numpy())
    # calibrated: log softmax(z / T + b) + log p - log p_val, in numpy
    val, yv, test, _ = miscalibrated
    d = L.estimate_prior_details(test, "em", val_probs=val, val_labels=yv, calibration="bcts")
    s = np.maximum(np.log(test), np.log(np.finfo(np.float32).tiny)) / d.temperature + d.bias  # the documented floor
    expect = s + np.log(d.prior) - np.log(np.bincount(yv) / len(yv))
    got = d.adjusted_scores(test).numpy()
    np.testing.assert_allclose(got - got[:, :1], expect - expect[:, :1], atol=1e-9)
    err = d.error([0.25, 0.25, 0.25, 0.25])
    assert err["l1"] == pytest.approx(np.abs(d.prior - 0.25).sum()) and err["mse"] == pytest.approx(
        np.mean((d.prior - 0.25) ** 2))
