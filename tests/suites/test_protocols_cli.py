"""--test-priors, --bootstrap, --seeds and several --features on the command line (issue 14).

Numbers are checked against numpy re-computations from the arrays written into the file.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from protocol_support import COUNTS, C, notebook_mask, notebook_shift_counts, protocol_files

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
files = protocol_files  # the feature files fixture


def run_json(args):
    res = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_joint_shifted_priors_match_numpy(files):
    paths, a = files
    doc = run_json(["joint", "-f", paths["a"], "--test-priors", "forward-10,uniform,backward-4"])
    logits = a["x_test"].astype(np.float64) @ a["weight"].T.astype(np.float64) + a["bias"]
    y = a["y_test"]
    train_prior = COUNTS / COUNTS.sum()
    for name in ("forward-10", "uniform", "backward-4"):
        keep = notebook_shift_counts(COUNTS, np.bincount(y).min(), name)
        mask = notebook_mask(y, keep)
        got = doc["shifted"][name]
        assert got["n"] == mask.sum() == keep.sum()
        assert got["all"] == pytest.approx(np.mean(logits[mask].argmax(1) == y[mask]))
        with np.errstate(divide="ignore"):  # a class keeping no row has target prior 0
            fixed = (logits[mask] + np.log(keep / keep.sum()) - np.log(train_prior)).argmax(1)
        assert doc["shifted_corrected"][name]["known_prior"]["all"] == pytest.approx(np.mean(fixed == y[mask]))
        assert set(doc["shifted_corrected"][name]["em"]) >= {"all", "many", "medium", "few", "n", "em_iterations"}
    assert doc["protocol"]["test_priors"] == ["forward-10", "uniform", "backward-4"]


def test_bootstrap_ci_keys_and_containment(files):
    paths, _ = files
    doc = run_json(["ncm", "-f", paths["a"], "--bootstrap", "200", "--ci-level", "0.9"])
    assert set(doc["ci"]) == {"val", "test"}
    for split in ("val", "test"):
        assert set(doc["ci"][split]) == {"all", "many", "medium", "few", "mean_class"}
        lo, hi = doc["ci"][split]["all"]
        assert lo <= doc[split]["all"] <= hi
    again = run_json(["ncm", "-f", paths["a"], "--bootstrap", "200", "--ci-level", "0.9"])
    assert again["ci"] == doc["ci"]  # seeded


def test_tau_sweep_protocol_at_selected_tau(files):
    paths, _ = files
    doc = run_json(["tau-sweep", "-f", paths["a"], "--test-priors", "uniform", "--bootstrap", "50"])
    # uniform keeps M rows of every class; its "all" is the plain accuracy on those rows at the selected tau
    assert doc["shifted"]["uniform"]["n"] == 9 * C
    assert set(doc["ci"]) == {"test"}
    cmp = run_json(["compare", "-f", paths["a"], "--methods", "tau_norm", "--batch-size", "32",
                    "--test-priors", "uniform"])
    assert cmp["rows"][0]["shifted"] == doc["shifted"]


def test_compare_several_files(files):
    paths, _ = files
    doc = run_json(["compare", "-f", paths["a"], "-f", paths["b"], "--methods", "joint,ncm,tau_norm",
                    "--batch-size", "32", "--bootstrap", "100", "-q"])
    assert doc["features"] == [paths["a"], paths["b"]]
    assert [(r["features"], r["method"]) for r in doc["rows"]] == [
        (p, m) for p in (paths["a"], paths["b"]) for m in ("joint", "ncm", "tau_norm")]
    single = run_json(["compare", "-f", paths["b"], "--methods", "joint,ncm,tau_norm", "--batch-size", "32", "-q"])
    assert single["features"] == paths["b"]
    for r, s in zip(doc["rows"][3:], single["rows"]):
        assert r["test"] == s["test"] and s["features"] == paths["b"]
    # different test rows: each file's rows are compared with that file's best row
    for part in (doc["rows"][:3], doc["rows"][3:]):
        best = max(part, key=lambda r: r["test"]["all"])
        assert all(r["vs_best"]["test"]["best"] == best["method"] for r in part)
        assert all(r["vs_best"]["test"]["best_features"] == best["features"] for r in part)
    table = CliRunner().invoke(main, ["compare", "-f", paths["a"], "-f", paths["b"], "--methods", "joint",
                                      "--batch-size", "32", "-q"]).stdout
    assert f"[{paths['a']}]" in table and f"[{paths['b']}]" in table


def test_compare_refuses_files_of_other_classes(files):
    paths, _ = files
    res = CliRunner().invoke(main, ["compare", "-f", paths["a"], "-f", paths["other"], "--batch-size", "32"])
    assert res.exit_code == 1
    assert "class 0 has 121 train rows vs 120" in res.output and "Traceback" not in res.output


def test_seeds_mean_and_std(files):
    paths, _ = files
    args = ["crt", "-f", paths["a"], "--epochs", "2", "--batch-size", "32", "-q"]
    doc = run_json([*args, "--seeds", "3,4"])
    runs = [run_json([*args, "--seed", s])["test"]["all"] for s in ("3", "4")]
    stats = doc["over_seeds"]["test"]["all"]
    assert doc["over_seeds"]["seeds"] == [3, 4]
    assert stats["mean"] == pytest.approx(np.mean(runs))
    assert stats["std"] == pytest.approx(np.std(runs, ddof=1))
    assert doc["test"]["all"] == pytest.approx(runs[0])  # the first seed is the reported head


@pytest.mark.parametrize("args,option", [
    (["joint", "--test-priors", "forward-0.5"], "--test-priors"),
    (["joint", "--test-priors", "left-3"], "--test-priors"),
    (["joint", "--bootstrap", "-1"], "--bootstrap"),
    (["joint", "--ci-level", "1.5"], "--ci-level"),
    (["crt", "--seeds", "a,b"], "--seeds"),
    (["lws", "--seeds", "1,1"], "--seeds"),
])
def test_protocol_usage_errors(files, args, option):
    paths, _ = files
    res = CliRunner().invoke(main, [args[0], "-f", paths["a"], *args[1:]])
    assert res.exit_code == 2 and option in res.output, res.output


def test_each_file_is_read_once(files, monkeypatch):
    from lt_rebalance.store import FeatureStore

    paths, _ = files
    reads = []
    load, head = FeatureStore.load, FeatureStore.head
    monkeypatch.setattr(FeatureStore, "load", lambda self, split, *a, **k: reads.append((self.path, split))
                        or load(self, split, *a, **k))
    monkeypatch.setattr(FeatureStore, "head", lambda self: reads.append((self.path, "head")) or head(self))
    run_json(["compare", "-f", paths["a"], "-f", paths["b"], "--methods", "joint,crt,tau_norm,lws",
              "--crt-epochs", "1", "--lws-epochs", "1", "--batch-size", "32", "--seeds", "0,1", "-q"])
    assert len(reads) == len(set(reads)) == 2 * 4  # train, val, test and the head of each file, once


def test_new_shift_kinds_and_estimators_through_the_cli(files):
    """Random kinds over draws (mean ± std, true prior), each estimator with its prior error, BBSE's
    correction against a numpy computation of its formula on the same subset."""
    from lt_rebalance.shifts import shift_subset

    paths, a = files
    doc = run_json(["joint", "-f", paths["a"], "--test-priors", "step-2,dirichlet-1", "--shift-draws", "3",
                    "--shift-seed", "4", "--prior-estimators", "em,bbse"])
    logits = a["x_test"].astype(np.float64) @ a["weight"].T.astype(np.float64) + a["bias"]
    y = a["y_test"]
    idx, true = shift_subset("step-2", y, COUNTS, seed=4)
    step = doc["shifted"]["step-2"]
    assert step["n"] == len(idx) and step["prior"] == pytest.approx(true.tolist()) and "draws" not in step
    assert step["all"] == pytest.approx(np.mean(logits[idx].argmax(1) == y[idx]))
    # BBSE (Lipton et al. 2018): C[i, j] = P(pred i, y j) on val, mu = P(pred i) on the subset, C w = mu
    v = a["x_val"].astype(np.float64) @ a["weight"].T.astype(np.float64) + a["bias"]
    conf = np.zeros((C, C))
    np.add.at(conf, (v.argmax(1), a["y_val"]), 1 / len(v))
    mu = np.bincount(logits[idx].argmax(1), minlength=C) / len(idx)
    w = np.clip(np.linalg.lstsq(conf, mu, rcond=None)[0], 0, None)
    source = np.bincount(a["y_val"], minlength=C) / len(v)
    p_hat = w * source / (w * source).sum()
    bbse = doc["shifted_corrected"]["step-2"]["bbse"]
    assert bbse["prior_error"]["l1"] == pytest.approx(np.abs(p_hat - true).sum(), abs=1e-6)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    with np.errstate(divide="ignore"):
        fixed = (logp[idx] + np.log(p_hat) - np.log(source)).argmax(1)
    assert bbse["all"] == pytest.approx(np.mean(fixed == y[idx]))
    dirichlet = doc["shifted"]["dirichlet-1"]
    assert dirichlet["draws"] == 3 and set(dirichlet["std"]) >= {"all", "n"} and len(dirichlet["prior"]) == C
    assert set(doc["shifted_corrected"]["dirichlet-1"]) == {"known_prior", "em", "bbse"}
    assert doc["protocol"]["prior_estimators"] == ["em", "bbse"] and doc["protocol"]["shift_draws"] == 3


@pytest.mark.parametrize("args,message", [
    (["--test-priors", "dirichlet-0"], "A > 0"),
    (["--test-priors", "knockout-1.5"], "0 < P < 1"),
    (["--test-priors", "tweakone-0.99"], "RHO must lie in"),
    (["--test-priors", "step-20"], "use R <= 9"),
    (["--test-priors", "uniform", "--prior-estimators", "em,magic"], "give distinct names from em, bbse"),
    (["--test-priors", "uniform", "--shift-draws", "0"], "--shift-draws"),
])
def test_shift_and_estimator_errors_are_one_line(files, args, message):
    paths, _ = files
    res = CliRunner().invoke(main, ["joint", "-f", paths["a"], *args])
    assert res.exit_code in (1, 2) and message in res.output, res.output
    assert "Traceback" not in res.output


def test_em_on_uncalibrated_scores_carries_a_caveat(files):
    """The registry marks NCM's and τ-norm's scores as no calibrated posteriors: their EM rows get a note,
    which the calibrated joint head's does not, and --prior-calibration removes."""
    paths, _ = files
    text = CliRunner().invoke(main, ["compare", "-f", paths["a"], "--methods", "joint,ncm",
                                     "--test-priors", "backward-4", "-q"]).output
    assert "(ncm: its scores are no calibrated posteriors" in text and "(joint:" not in text
    text = CliRunner().invoke(main, ["ncm", "-f", paths["a"], "--test-priors", "backward-4",
                                     "--prior-calibration", "temperature"]).output
    assert "no calibrated posteriors" not in text
