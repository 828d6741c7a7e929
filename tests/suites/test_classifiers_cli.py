"""``ltr knn``, ``ltr linear-probe``, ``ltr wb``, ``ltr marc`` and ``compare`` with them (issue 16), on the
command-line tests' feature files, against the numpy references of tests/head_refs.py and scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from cli_support import C, assert_metrics, np_metrics, run_json, user_error
from head_refs import np_knn_shares

try:
    import sklearn.linear_model as sklm
except ImportError:  # pragma: no cover
    sklm = None

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_knn_command_matches_numpy(files, arrays):
    doc, _ = run_json(["knn", "-f", files["full"], "--k", "10", "--temperature", "0.1", "--balance", "0.5"])
    assert doc["method"] == "knn" and (doc["k"], doc["temperature"], doc["balance"]) == (10, 0.1, 0.5)
    for split in ("val", "test"):
        assert_metrics(doc[split])
        shares = np_knn_shares(arrays["x_train"], arrays["y_train"], arrays[f"x_{split}"], 10, 0.1, 0.5, C)
        want = np_metrics(shares, arrays[f"y_{split}"])
        for key, v in want.items():
            assert doc[split][key] == pytest.approx(v), (split, key)


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


def test_wb_command_reports_norms_inside_the_ball(files, arrays):
    doc, err = run_json(["wb", "-f", files["full"], "--epochs", "3"])
    assert doc["method"] == "wb" and doc["params"]["thresh"] == 0.1 and doc["params"]["batch_size"] == 64
    norms0 = np.linalg.norm(arrays["weight"], axis=1)
    assert doc["radius"] == pytest.approx(norms0.min() + 0.1 * (norms0.max() - norms0.min()), rel=1e-5)
    assert len(doc["norms"]) == C and max(doc["norms"]) <= doc["radius"] * (1 + 1e-5)
    assert_metrics(doc["test"]) and "wb epoch 1/3" in err
    user_error(["wb", "-f", files["nohead"]], match="classifier")


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


def test_compare_runs_marc_by_default_wb_knn_and_probe_when_named(files):
    doc, _ = run_json(["compare", "-f", files["full"], "--crt-epochs", "1", "--lws-epochs", "1", "-q"])
    methods = [r["method"] for r in doc["rows"]]
    assert "marc" in methods and not {"wb", "knn", "linear_probe"} & set(methods)
    doc, _ = run_json(["compare", "-f", files["nohead"], "--methods", "knn,linear_probe,marc,wb", "-q"])
    assert [r["method"] for r in doc["rows"]] == ["knn", "linear_probe"]
    assert {s["method"] for s in doc["skipped"]} == {"marc", "wb"}
    knn, _ = run_json(["knn", "-f", files["nohead"]])
    assert doc["rows"][0]["test"] == knn["test"]
