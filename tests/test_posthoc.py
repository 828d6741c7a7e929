"""Post-hoc methods (issue 7): logit adjustment, PC softmax, cRT loss options, temperature scaling.

Each check is against an independent computation (numpy / scipy), on tiny synthetic data.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.special import log_softmax, logsumexp

from lt_rebalance.cli import main
from lt_rebalance.heads import CRT, JointHead
from lt_rebalance.heads.crt import class_balanced_weights, default_linear_init
from lt_rebalance.metrics import shot_groups
from lt_rebalance.posthoc import (
    LogitAdjustment,
    TemperatureScaled,
    calibration_metrics,
    fit_temperature,
    log_prior,
    logit_adjust_sweep,
    pc_softmax,
)
from lt_rebalance.store import write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data():
    from data_support import make_long_tailed

    d = make_long_tailed(num_classes=12, n_max=200, imbalance=50.0, dim=8, sep=2.0, noise=1.0, seed=1)
    rng = np.random.default_rng(1)
    # a joint-like head: norms and biases grow with the class size
    d["W"] = (d["means"] * (0.5 + d["counts"][:, None] / 100)).astype(np.float32)
    d["b"] = (0.1 * np.log(d["counts"]) + 0.01 * rng.normal(size=len(d["counts"]))).astype(np.float32)
    return d


def np_summary(pred: np.ndarray, y: np.ndarray, counts: np.ndarray) -> dict:
    """top-1 and per-group mean per-class accuracy, the slow way."""
    C = len(counts)
    acc = np.array([np.mean(pred[y == c] == c) if np.any(y == c) else np.nan for c in range(C)])
    groups = {"many": counts > 100, "few": counts < 20}
    groups["medium"] = ~groups["many"] & ~groups["few"]
    out = {g: np.nanmean(acc[m]) if np.any(m & ~np.isnan(acc)) else np.nan for g, m in groups.items()}
    return {**out, "all": np.mean(pred == y), "mean_class": np.nanmean(acc)}


# -- logit adjustment -------------------------------------------------------------------------------
def test_log_prior(data):
    n = data["counts"].astype(np.float64)
    np.testing.assert_allclose(log_prior(n).numpy(), np.log(n / n.sum()), rtol=1e-6)


def test_logit_adjustment_at_tau_zero_is_joint(data):
    joint = JointHead(data["W"], data["b"]).fit()
    la = LogitAdjustment(joint, data["counts"], tau=0.0).fit()
    np.testing.assert_array_equal(la.decision_function(data["X_test"]), joint.decision_function(data["X_test"]))
    curve = logit_adjust_sweep(data["X_test"], data["y_test"], data["W"], data["b"], data["counts"], [0.0])
    joint_pred = (data["X_test"] @ data["W"].T + data["b"]).argmax(1)
    assert curve["all"][0].item() == pytest.approx(np.mean(joint_pred == data["y_test"]))


def test_sweep_equals_naive_loop(data):
    taus = np.linspace(0, 2, 21)
    X, y, W, b, n = data["X_test"], data["y_test"], data["W"], data["b"], data["counts"]
    got = logit_adjust_sweep(X, y, W, b, n, taus, chunk=50)  # several row chunks
    logits = X.astype(np.float64) @ W.T.astype(np.float64) + b
    for i, t in enumerate(taus):
        want = np_summary((logits - t * np.log(n / n.sum())).argmax(1), y, n)
        for k, v in want.items():
            assert got[k][i].item() == pytest.approx(v, abs=1e-12), (t, k)


def test_selection_on_val_and_pc_softmax(data):
    joint = JointHead(data["W"], data["b"]).fit()
    taus = np.linspace(0, 2, 21)
    la = LogitAdjustment(joint, data["counts"], taus=taus).fit(data["X_val"], data["y_val"])
    val = la.curve_["all"].numpy()
    assert la.tau_ == pytest.approx(taus[np.flatnonzero(val == val.max())[0]])  # ties: the smaller tau
    n = data["counts"]
    logits = data["X_test"] @ data["W"].T + data["b"]
    # the head is a plain linear layer: bias b - tau log(pi)
    np.testing.assert_allclose(la.bias_.numpy(), data["b"] - la.tau_ * np.log(n / n.sum()), rtol=1e-5, atol=1e-6)
    # PC softmax (LADE): softmax(z - log pi_s + log pi_t) with a uniform target prior
    pc = pc_softmax(joint, n)
    want = log_softmax(logits - np.log(n / n.sum()) + np.log(1 / len(n)), axis=1)
    got = pc.predict_log_proba(data["X_test"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert pc.tau_ == 1.0


def test_logit_adjustment_errors(data):
    joint = JointHead(data["W"], data["b"]).fit()
    with pytest.raises(ValueError, match="pass X and y"):
        LogitAdjustment(joint, data["counts"]).fit()
    with pytest.raises(ValueError, match=r"counts must have one entry per class \(\d+, the rows of the weight\)"):
        LogitAdjustment(joint, data["counts"][:5], tau=1.0).fit()
    from lt_rebalance.heads import NCM

    ncm = NCM().fit(data["X_train"], data["y_train"])
    with pytest.raises(ValueError, match="linear head"):
        LogitAdjustment(ncm, data["counts"], tau=1.0).fit()


# -- cRT loss options -------------------------------------------------------------------------------
def test_class_balanced_weights_formula():
    n = np.array([500, 100, 20, 3, 1])
    for beta in (0.9, 0.999, 0.9999):
        w = (1 - beta) / (1 - beta ** n.astype(np.float64))
        np.testing.assert_allclose(class_balanced_weights(torch.tensor(n), beta).numpy(), w / w.sum() * len(n),
                                   rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss="balanced-softmax"),
        dict(loss="balanced-softmax", class_weights="cb", beta=0.99),
        dict(class_weights="cb", beta=0.999, label_smoothing=0.1),
        dict(loss="balanced-softmax", label_smoothing=0.2),
    ],
)
def test_crt_first_loss_equals_numpy(data, kw):
    """The first epoch's loss of one full batch at the initial weights, recomputed with numpy.

    Balanced Softmax: cross-entropy on z_j + log n_j; cb: weighted mean sum(w_y l) / sum(w_y);
    label smoothing eps: (1 - eps) * w_y * nll + eps * sum_j w_j (-log p_j) / C.
    """
    X, y, n = data["X_train"], data["y_train"], data["counts"]
    C, D = len(n), X.shape[1]
    h = CRT(epochs=1, batch_size=len(y), sampler="ib", lr=1e-3, seed=4, device="cpu", **kw).fit(X, y)
    w0, b0 = default_linear_init(C, D, torch.Generator().manual_seed(4))
    z = X.astype(np.float64) @ w0.numpy().T.astype(np.float64) + b0.numpy()
    if kw.get("loss") == "balanced-softmax":
        z = z + np.log(n)
    logp = log_softmax(z, axis=1)
    beta = kw.get("beta", 0.9999)
    w = (1 - beta) / (1 - beta ** n.astype(np.float64))
    w = w / w.sum() * C if kw.get("class_weights") == "cb" else np.ones(C)
    eps = kw.get("label_smoothing", 0.0)
    per_row = (1 - eps) * w[y] * -logp[np.arange(len(y)), y] + eps * (-(logp * w).sum(1)) / C
    assert h.history_.loss[0] == pytest.approx(per_row.sum() / w[y].sum(), rel=1e-5)


def test_balanced_softmax_predicts_with_plain_logits(data):
    h = CRT(epochs=2, batch_size=64, loss="balanced-softmax", device="cpu").fit(data["X_train"], data["y_train"])
    X = torch.from_numpy(data["X_test"])
    assert torch.allclose(h.decision_function(X), X @ h.weight_.T + h.bias_)


# -- temperature scaling ----------------------------------------------------------------------------
def brute_force_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """argmin over a dense grid of log T of the numpy NLL."""
    grid = np.linspace(-4, 4, 8001)
    nll = [np.mean(logsumexp(z / np.exp(t), axis=1) - z[np.arange(len(y)), y] / np.exp(t)) for t in grid]
    return float(np.exp(grid[int(np.argmin(nll))]))


@pytest.mark.parametrize("confident", [True, False])
def test_fit_temperature_matches_brute_force(confident):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 400)
    z = rng.normal(size=(400, 7)) * (4.0 if confident else 0.3)
    z[np.arange(400), y] += 1.5
    want = brute_force_temperature(z, y)
    assert fit_temperature(z, y) == pytest.approx(want, rel=2e-3)  # the grid's step is 1e-3 in log T
    # huge and tiny logits: T scales with them
    for scale in (1e7, 1e-7):
        assert fit_temperature(z * scale, y) / scale == pytest.approx(want, rel=2e-3)


def test_fit_temperature_edge_cases():
    y = np.array([0, 1, 2])
    assert fit_temperature(np.zeros((3, 3)), y) == 1.0  # no confidence to scale
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_temperature(np.full((3, 3), np.inf), y)
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((3, 3)), y[:2])


def test_temperature_scaled_head(data):
    joint = JointHead(data["W"], data["b"]).fit()
    ts = TemperatureScaled(joint).fit(data["X_val"], data["y_val"])
    X = data["X_test"]
    assert ts.temperature_ == pytest.approx(fit_temperature(joint.decision_function(data["X_val"]), data["y_val"]))
    np.testing.assert_allclose(ts.decision_function(X), joint.decision_function(X) / ts.temperature_, rtol=1e-6)
    np.testing.assert_array_equal(ts.predict(X), joint.predict(X))
    torch.testing.assert_close(torch.addmm(ts.bias_, torch.from_numpy(X), ts.weight_.T),
                               ts.decision_function(torch.from_numpy(X)))
    with pytest.raises(ValueError, match="temperature must be"):
        TemperatureScaled(joint, temperature=0.0).fit()


def test_calibration_metrics_hand_worked():
    # class 0 is many-shot (150 train images), class 1 few-shot (5)
    counts = np.array([150, 5])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    got = calibration_metrics(np.log(p), y, counts)
    # confidences 0.9 (bin 14 of 15: (13/15, 14/15]) with accuracy 1/2 and 0.6 (bin 9) with accuracy 1:
    # ECE = 2/4 |0.5 - 0.9| + 2/4 |1 - 0.6| = 0.4
    assert got["all"]["ece"] == pytest.approx(0.4)
    assert got["all"]["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1) + 2 * np.log(0.6)) / 4)
    # many: row 0 only (conf 0.9, correct) -> ECE 0.1; few: rows 1-3 -> 1/3 |0 - 0.9| + 2/3 |1 - 0.6|
    assert got["many"] == pytest.approx({"nll": -np.log(0.9), "ece": 0.1, "n": 1})
    assert got["few"]["ece"] == pytest.approx(0.9 / 3 + 0.8 / 3)
    assert got["few"]["n"] == 3
    assert got["medium"]["n"] == 0 and np.isnan(got["medium"]["nll"]) and np.isnan(got["medium"]["ece"])
    assert set(shot_groups(counts)) == {"many", "medium", "few"}


# -- CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc")
    splits = {s: (data[f"X_{s}"], data[f"y_{s}"]) for s in ("train", "val", "test")}
    full = write_features(root / "full.h5", splits, weight=data["W"], bias=data["b"])
    no_val = write_features(root / "noval.h5", {s: splits[s] for s in ("train", "test")}, weight=data["W"])
    no_head = write_features(root / "nohead.h5", splits)
    return {"full": str(full), "noval": str(no_val), "nohead": str(no_head)}


def invoke(args):
    return CliRunner().invoke(main, args)


def test_cli_logit_adjust_json(data, files):
    r = invoke(["logit-adjust", "-f", files["full"], "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    tau_json = json.loads(invoke(["tau-sweep", "-f", files["full"], "--json"]).output)
    assert set(out) == set(tau_json) | {"empty_classes"} and out["method"] == "logit_adjust"
    assert out["empty_classes"] == "one-row"  # the default rule for classes without train rows
    assert set(out["curves"]) == {"val", "test"} and len(out["taus"]) == 21
    la = LogitAdjustment(JointHead(data["W"], data["b"]).fit(), data["counts"]).fit(data["X_val"], data["y_val"])
    assert out["selected_tau"] == pytest.approx(la.tau_) and out["selected_on"] == "val"
    assert out["test"]["all"] == pytest.approx(la.evaluate(data["X_test"], data["y_test"], data["counts"])["all"])
    human = invoke(["logit-adjust", "-f", files["full"], "--taus", "0,1"])
    assert human.exit_code == 0 and "logit adjustment" in human.output and "<- selected" in human.output


def test_cli_calibrate(files):
    r = invoke(["calibrate", "-f", files["full"], "--method", "tau", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["base_method"] == "tau_norm" and out["temperature"] > 0 and out["fit_on"] == "val"
    for when in ("before", "after"):
        assert set(out[when]) == {"all", "many", "medium", "few"}
        assert out[when]["all"]["n"] == sum(out[when][g]["n"] for g in ("many", "medium", "few"))
    assert out["after"]["all"]["nll"] <= out["before"]["all"]["nll"] + 0.05  # T fitted on val, not test
    human = invoke(["calibrate", "-f", files["full"], "--method", "crt", "--epochs", "1", "-q"])
    assert human.exit_code == 0, human.output
    assert "temperature T" in human.output and "few" in human.output


def test_cli_compare_includes_posthoc(files):
    r = invoke(["compare", "-f", files["full"], "--methods", "joint,logit_adjust,pc_softmax", "--json", "-q"])
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in json.loads(r.output)["rows"]}
    assert set(rows) == {"joint", "logit_adjust", "pc_softmax"} and rows["pc_softmax"]["tau"] == 1.0
    r = invoke(["compare", "-f", files["noval"], "--methods", "logit_adjust,pc_softmax", "--json", "-q"])
    out = json.loads(r.output)
    assert [s["method"] for s in out["skipped"]] == ["logit_adjust"]


@pytest.mark.parametrize(
    "file, args, code, message",
    [
        ("noval", ["logit-adjust", "--taus", "0:x:3"], 2, "--taus"),
        ("noval", ["logit-adjust"], 1, "no 'val' split"),
        ("noval", ["calibrate", "--method", "ncm"], 1, "no 'val' split"),
        ("full", ["calibrate", "--method", "bogus"], 2, "--method"),
        ("full", ["calibrate", "--method", "joint", "--eval-split", "nope"], 1, "no 'nope' split"),
        ("full", ["calibrate", "--method", "crt", "--epochs", "0"], 2, "--epochs"),
        ("full", ["calibrate", "--method", "lws", "--batch-size", "100000"], 2, "larger than the"),
    ],
)
def test_cli_errors(files, file, args, code, message):
    r = invoke([args[0], "-f", files[file], *args[1:]])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert sum(line.startswith("Error:") for line in r.output.splitlines()) == 1


def test_cli_errors_without_head(files):
    for cmd in (["logit-adjust"], ["calibrate", "--method", "logit_adjust"]):
        r = invoke([cmd[0], "-f", files["nohead"], *cmd[1:]])
        assert r.exit_code == 1 and "stored classifier" in r.output and r.exception is not None
        assert "Traceback" not in r.output


# -- empty classes: the reference's log(π^τ + 1e-12) as an option ---------------------------------
def test_logit_adjustment_empty_classes_option():
    """google-research logit_adjustment: logits - log(prior**tau + 1e-12), prior = counts / sum."""
    from lt_rebalance.posthoc import LogitAdjustment, adjustment_offsets

    counts = np.array([500, 40, 3, 0])
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    X = rng.normal(size=(30, 5)).astype(np.float32)
    prior = counts / counts.sum()
    for tau in (0.5, 1.0, 2.0):
        ref = X @ W.T + b - np.log(prior**tau + 1e-12)
        la = LogitAdjustment(JointHead(W, b).fit(), counts, tau=tau, empty_classes="reference").fit()
        np.testing.assert_allclose(la.scores(X), ref, rtol=1e-5, atol=1e-4)
        assert (la.predict(X) == 3).all()  # the empty class (+27.6) wins every row
        ours = LogitAdjustment(JointHead(W, b).fit(), counts, tau=tau).fit()  # counted as one row
        one = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
        np.testing.assert_allclose(ours.scores(X), X @ W.T + b - tau * np.log(one), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(adjustment_offsets(counts, [1.0], "reference").numpy()[0, 3], np.log(1e-12), rtol=1e-6)
    with pytest.raises(ValueError, match="empty_classes"):
        LogitAdjustment(JointHead(W, b).fit(), counts, tau=1.0, empty_classes="drop").fit()
