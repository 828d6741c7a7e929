"""lt_rebalance.heads.experts: logit-adjusted experts weighted for the estimated test prior."""
import cli_support
import numpy as np
import pytest
import torch

from lt_rebalance.heads import JointHead, LogitAdjustedExperts


def np_experts(X, W, b, counts, taus=(0.0, 1.0, 2.0), grid=401):
    """The recipe in numpy: EM from the balanced expert's posteriors, τ* = argmin KL(p̂ ‖ q_τ), z − τ* log π."""
    z = X.astype(np.float64) @ W.T.astype(np.float64) + b
    pi = counts / counts.sum()
    base = pi  # the joint head's prior
    balanced = base * pi ** -1.0
    balanced /= balanced.sum()
    s = z - np.log(pi)
    P = np.exp(s - s.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    p = balanced.copy()
    for _ in range(1000):
        w = p / balanced
        q = P * w
        new = (q / q.sum(1, keepdims=True)).mean(0)
        done = np.abs(new - p).max() < 1e-6
        p = new
        if done:
            break
    ts = np.linspace(min(taus), max(taus), grid)
    logq = np.log(base)[None] - ts[:, None] * np.log(pi)[None]
    logq -= np.log(np.exp(logq).sum(1, keepdims=True))
    kl = (p[None] * (np.log(p)[None] - logq)).sum(1)
    tau = ts[kl.argmin()]
    return z - tau * np.log(pi), tau, p


def test_scores_follow_the_recipe(arrays):
    counts = cli_support.COUNTS
    W, b = arrays["weight"], arrays["bias"]
    head = LogitAdjustedExperts(JointHead(W, b).fit(), counts).fit()
    for X in (arrays["x_test"], arrays["x_test"][arrays["y_test"] < 4]):  # the full split, a head-heavy subset
        want, tau, p = np_experts(X, W, b, counts)
        got = head.scores(X)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        c = head.combination(torch.as_tensor(X) @ torch.as_tensor(W).T + torch.as_tensor(b))
        assert c["tau"] == pytest.approx(tau, abs=1e-9) and sum(c["weights"]) == pytest.approx(1.0)
        assert float(np.dot(c["weights"], [0, 1, 2])) == pytest.approx(tau)
        np.testing.assert_allclose(c["prior"].numpy(), p, atol=1e-5)


def test_the_ensemble_adapts_to_the_rows_it_scores(arrays):
    """Rows of head classes only pull τ* down (toward the train prior); tail rows push it up."""
    head = LogitAdjustedExperts(JointHead(arrays["weight"], arrays["bias"]).fit(), cli_support.COUNTS).fit()
    X, y = torch.as_tensor(arrays["x_test"]), torch.as_tensor(arrays["y_test"])
    z = X @ head.weight_.T + head.bias_
    assert head.combination(z[y < 3])["tau"] < head.combination(z[y >= 9])["tau"]
    with pytest.raises(Exception, match="adapts to the test prior"):
        head.implied_prior(cli_support.COUNTS)


def test_experts_in_compare_under_shifts(files):
    doc, _ = cli_support.run_json(["compare", "-f", files["full"], "--methods", "joint,experts",
                                "--test-priors", "forward-5,backward-5"])
    row = doc["rows"][1]
    assert row["method"] == "experts" and set(row["combination"]) == {"val", "test"}
    assert set(row["shifted"]) == {"forward-5", "backward-5"}
    assert "reason" in row["shifted_corrected"]
