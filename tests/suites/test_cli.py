"""The ``ltr`` command line (issue 4): JSON contracts, numbers, user errors, help and progress.

Every test drives the real click group through ``CliRunner`` on tiny synthetic long-tailed feature
files (C = 12 classes, D = 16, a few hundred rows), so the whole file runs in seconds on a CPU.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cli_support import (
    BASE_METHODS,
    COUNTS,
    METRIC_KEYS,
    TEST_PER_CLASS,
    TRAIN_ARGS,
    VAL_PER_CLASS,
    C,
    D,
    assert_metrics,
    np_metrics,
    np_tau_curve,
    run,
    run_json,
    user_error,
)

from lt_rebalance.cli import COMMANDS
from lt_rebalance.store import FeatureStore


# -- info ------------------------------------------------------------------------------------------
def test_info_json_contract(files):
    doc, _ = run_json(["info", files["full"]])
    for key in ("format_version", "model", "dataset", "num_classes", "dim", "has_head", "splits", "groups"):
        assert key in doc
    assert doc["format_version"] == 1
    assert (doc["model"], doc["dataset"]) == ("toy", "synthetic")
    assert (doc["num_classes"], doc["dim"], doc["has_head"]) == (C, D, True)
    n = {"train": COUNTS.sum(), "val": C * VAL_PER_CLASS, "test": C * TEST_PER_CLASS}
    assert set(doc["splits"]) == set(n)
    for s, info in doc["splits"].items():
        assert info == {"rows": int(n[s]), "complete": True, "dtype": "float32", "views": 0}
    assert doc["groups"] == {"many": 2, "medium": 5, "few": 5}


def test_info_views_incomplete_and_human(files):
    doc, _ = run_json(["info", files["views"]])
    assert doc["splits"]["train"]["views"] == 2 and doc["splits"]["test"]["views"] == 0
    doc, _ = run_json(["info", files["incomplete"]])
    assert doc["splits"]["test"]["rows"] == 40 and doc["splits"]["test"]["complete"] is False
    doc, _ = run_json(["info", files["nohead"]])
    assert doc["has_head"] is False
    out = run(["info", files["full"]]).stdout
    assert "12 classes" in out and "16-d" in out and "train" in out


# -- joint -----------------------------------------------------------------------------------------
def test_joint_matches_numpy(files, arrays):
    doc, _ = run_json(["joint", "--features", files["full"]])
    assert doc["method"] == "joint"
    for split in ("val", "test"):
        assert_metrics(doc[split])
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        expect = np_metrics(x.astype(np.float64) @ arrays["weight"].T.astype(np.float64) + arrays["bias"], y)
        for k, v in expect.items():
            assert doc[split][k] == pytest.approx(v, abs=1e-9), (split, k)


def test_joint_splits_option_and_human(files):
    doc, _ = run_json(["joint", "-f", files["full"], "--splits", "test"])
    assert "test" in doc and "val" not in doc
    out = run(["joint", "-f", files["full"]]).stdout
    assert "joint" in out and "val" in out and "test" in out


# -- tau-sweep -------------------------------------------------------------------------------------
def test_tau_sweep_json_contract_and_numbers(files, arrays):
    doc, _ = run_json(["tau-sweep", "--features", files["full"], "--taus", "0:2:21"])
    assert doc["method"] == "tau_norm"
    assert doc["taus"] == pytest.approx(np.linspace(0, 2, 21).tolist())
    assert set(doc["curves"]) == {"val", "test"}
    for split, curve in doc["curves"].items():
        for g in ("all", "many", "medium", "few"):
            assert len(curve[g]) == 21 and all(0.0 <= v <= 1.0 for v in curve[g])
        expect = np_tau_curve(arrays[f"x_{split}"], arrays[f"y_{split}"], arrays["weight"], doc["taus"])
        np.testing.assert_allclose(curve["all"], expect, atol=1e-9)
    # tau is the (first) argmax of the numpy val curve, and selected on val
    val_curve = np_tau_curve(arrays["x_val"], arrays["y_val"], arrays["weight"], doc["taus"])
    assert doc["selected_tau"] == pytest.approx(doc["taus"][int(np.argmax(val_curve))])
    assert doc["selected_on"] == "val"
    assert set(doc["test"]) >= {"all", "many", "medium", "few", "mean_class"}
    assert_metrics(doc["test"])
    # test metrics at the selected tau, computed independently
    w = arrays["weight"].astype(np.float64)
    w = w / np.linalg.norm(w, axis=1, keepdims=True) ** doc["selected_tau"]
    expect = np_metrics(arrays["x_test"].astype(np.float64) @ w.T, arrays["y_test"])
    for k, v in expect.items():
        assert doc["test"][k] == pytest.approx(v, abs=1e-9), k
    # the synthetic classifier is biased to the head classes: normalising it must help
    assert doc["selected_tau"] > 0


def test_tau_sweep_comma_list_and_metric(files, arrays):
    doc, _ = run_json(["tau-sweep", "-f", files["full"], "--taus", "0,0.5,1"])
    assert doc["taus"] == [0.0, 0.5, 1.0]
    assert len(doc["curves"]["val"]["all"]) == 3 and doc["selected_tau"] in (0.0, 0.5, 1.0)
    doc, _ = run_json(["tau-sweep", "-f", files["full"], "--taus", "0:2:11", "--metric", "few"])
    few = np_tau_curve(arrays["x_val"], arrays["y_val"], arrays["weight"], doc["taus"], key="few")
    assert doc["selected_tau"] == pytest.approx(doc["taus"][int(np.argmax(few))])


def test_tau_sweep_without_val_asks_how_to_select(files):
    line = user_error(["tau-sweep", "-f", files["noval"]], match="val")
    assert "--select-on test" in line and "--select-on none" in line
    # and never silently in JSON mode either
    user_error(["tau-sweep", "-f", files["noval"], "--json"], match="--select-on")


def test_tau_sweep_select_on_test_says_so(files):
    doc, _ = run_json(["tau-sweep", "-f", files["noval"], "--select-on", "test"])
    assert doc["selected_on"] == "test" and doc["selected_tau"] is not None
    assert list(doc["curves"]) == ["test"]
    out = run(["tau-sweep", "-f", files["noval"], "--select-on", "test"]).stdout
    assert "selected on test" in out


def test_tau_sweep_select_on_none(files):
    doc, _ = run_json(["tau-sweep", "-f", files["full"], "--select-on", "none", "--taus", "0,1"])
    assert doc["selected_tau"] is None and doc["selected_on"] is None
    assert len(doc["curves"]["test"]["all"]) == 2
    out = run(["tau-sweep", "-f", files["full"], "--select-on", "none"]).stdout
    assert "selected" not in out.replace("no selection", "")


def test_tau_sweep_human_marks_selected_tau(files):
    doc, _ = run_json(["tau-sweep", "-f", files["full"], "--taus", "0:2:21"])
    out = run(["tau-sweep", "-f", files["full"], "--taus", "0:2:21"]).stdout
    marked = [line for line in out.splitlines() if "<- selected" in line]
    assert len(marked) == 1
    assert float(marked[0].split()[0]) == pytest.approx(doc["selected_tau"])
    assert sum(1 for line in out.splitlines() if line.strip()[:1].isdigit()) >= 21  # one row per tau


@pytest.mark.parametrize("taus", ["abc", "", ",,", "0:1", "0:1:0", "0:2:x", "1:2:3:4", "nan,1", "0,inf"])
def test_tau_sweep_malformed_taus(files, taus):
    user_error(["tau-sweep", "-f", files["full"], "--taus", taus], code=2, match="--taus")


def test_tau_sweep_eval_split(files):
    doc, _ = run_json(["tau-sweep", "-f", files["full"], "--eval-split", "val", "--taus", "0,1"])
    assert_metrics(doc["val"])
    user_error(["tau-sweep", "-f", files["full"], "--eval-split", "nope"], match="nope")


# -- ncm -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cl2n", "l2n", "un", "cos"])
def test_ncm_json_contract(files, variant):
    doc, _ = run_json(["ncm", "-f", files["nohead"], "--variant", variant])
    assert doc["method"] == "ncm" and doc["variant"] == variant
    assert_metrics(doc["val"])
    assert_metrics(doc["test"])


def test_ncm_un_matches_numpy(files, arrays):
    doc, _ = run_json(["ncm", "-f", files["full"], "--variant", "un"])
    x, y = arrays["x_train"].astype(np.float64), arrays["y_train"]
    centroids = np.stack([x[y == c].mean(0) for c in range(C)])
    xt = arrays["x_test"].astype(np.float64)
    scores = -((xt[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert doc["test"]["all"] == pytest.approx(np_metrics(scores, arrays["y_test"])["all"], abs=1e-9)


# -- crt / lws -------------------------------------------------------------------------------------
def test_crt_json_contract(files):
    doc, err = run_json(["crt", "-f", files["nohead"], *TRAIN_ARGS, "--lr", "0.1", "--sampler", "sqrt"])
    assert doc["method"] == "crt"
    p = doc["params"]
    for key in ("epochs", "lr", "batch_size", "weight_decay", "momentum", "sampler", "seed", "views"):
        assert key in p, key
    assert (p["epochs"], p["lr"], p["batch_size"], p["sampler"], p["views"]) == (2, 0.1, 64, "sqrt", 0)
    assert_metrics(doc["val"])
    assert_metrics(doc["test"])
    assert "epoch" in err  # progress on stderr, not stdout


def test_lws_json_contract(files):
    doc, err = run_json(["lws", "-f", files["full"], *TRAIN_ARGS])
    assert doc["method"] == "lws"
    p = doc["params"]
    for key in ("epochs", "lr", "batch_size", "weight_decay", "momentum", "sampler", "seed"):
        assert key in p, key
    assert (p["epochs"], p["batch_size"], p["sampler"]) == (2, 64, "cb")
    assert_metrics(doc["val"])
    assert_metrics(doc["test"])
    assert "epoch" in err


def test_crt_with_stored_views(files):
    doc, _ = run_json(["crt", "-f", files["views"], "--views", "2", "--epochs", "1", "--batch-size", "64", "-q"])
    assert doc["params"]["views"] == 2
    assert_metrics(doc["test"])
    user_error(["crt", "-f", files["views"], "--views", "3", "--epochs", "1"], code=2, match="--views")


def test_crt_same_seed_same_result(files):
    a, _ = run_json(["crt", "-f", files["full"], "--epochs", "1", "--batch-size", "64", "-q", "--seed", "3"])
    b, _ = run_json(["crt", "-f", files["full"], "--epochs", "1", "--batch-size", "64", "-q", "--seed", "3"])
    assert a["test"] == b["test"]


@pytest.mark.parametrize("command", ["ncm", "crt", "lws"])
def test_save_head_and_overwrite(files, tmp_path, command):
    out = tmp_path / f"{command}.pt"
    extra = [*TRAIN_ARGS, "-q"] if command != "ncm" else []
    doc, _ = run_json([command, "-f", files["full"], *extra, "--save", out])
    assert out.is_file() and doc["saved"] == str(out)
    before = out.read_bytes()
    user_error([command, "-f", files["full"], *extra, "--save", out], match="exists")
    assert out.read_bytes() == before  # untouched
    run([command, "-f", files["full"], *extra, "--save", out, "--overwrite"])
    assert out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- compare ---------------------------------------------------------------------------------------
def test_compare_json_contract(files):
    doc, err = run_json(["compare", "-f", files["full"], "--crt-epochs", "2", "--lws-epochs", "2"])
    rows = {r["method"]: r for r in doc["rows"]}
    # the five methods of the paper, in this order (later methods may follow or interleave)
    assert [m for m in rows if m in BASE_METHODS] == list(BASE_METHODS)
    for r in doc["rows"]:
        assert_metrics(r["val"])
        assert_metrics(r["test"])
        assert isinstance(r["seconds"], (int, float)) and r["seconds"] >= 0
    joint, _ = run_json(["joint", "-f", files["full"]])
    assert rows["joint"]["test"] == joint["test"]
    tau, _ = run_json(["tau-sweep", "-f", files["full"]])
    assert rows["tau_norm"]["test"]["all"] == pytest.approx(tau["test"]["all"])
    assert "crt" in err and "lws" in err  # progress on stderr


def test_compare_without_head_skips_head_methods(files, tmp_path):
    out = tmp_path / "cmp.json"
    doc, _ = run_json(["compare", "-f", files["nohead"], "--crt-epochs", "1", "-q", "--out", out])
    methods = [r["method"] for r in doc["rows"]]
    assert [m for m in methods if m in BASE_METHODS] == ["ncm", "crt"]
    assert {s["method"] for s in doc["skipped"]} >= {"joint", "tau_norm", "lws"}
    assert not {s["method"] for s in doc["skipped"]} & set(methods)
    assert json.loads(out.read_text())["rows"][0]["method"] == "ncm"
    user_error(["compare", "-f", files["nohead"], "--out", out], match="exists")


def test_compare_human_table(files):
    out = run(["compare", "-f", files["full"], "--methods", "joint,ncm", "-q"]).stdout
    assert "joint" in out and "ncm" in out and "seconds" in out


# -- --quiet ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["crt", *TRAIN_ARGS],
    ["lws", *TRAIN_ARGS],
    ["compare", "--crt-epochs", "1", "--lws-epochs", "1"],
])
def test_quiet_silences_progress(files, args):
    loud = run([args[0], "-f", files["full"], *args[1:]])
    assert "epoch" in loud.stderr
    quiet = run([args[0], "-f", files["full"], *args[1:], "--quiet"])
    # only warnings remain (these settings are too few optimiser steps): no progress
    assert all(line.startswith("warning: ") for line in quiet.stderr.splitlines()), quiet.stderr
    assert "optimiser steps" in quiet.stderr
    assert quiet.stdout.strip()
    doc, err = run_json([args[0], "-f", files["full"], *args[1:], "-q"])
    assert all(line.startswith("warning: ") for line in err.splitlines()) and doc


# -- import ----------------------------------------------------------------------------------------
def test_import_round_trip(tmp_path, arrays):
    npz = tmp_path / "feats.npz"
    names = np.array([f"class_{i}" for i in range(C)])
    np.savez(npz, **arrays, class_names=names)
    out = tmp_path / "feats.h5"
    doc, err = run_json(["import", "--npz", npz, "--out", out, "--model", "m", "--dataset", "d"])
    assert doc["has_head"] is True
    assert doc["splits"] == {"train": int(COUNTS.sum()), "val": C * VAL_PER_CLASS, "test": C * TEST_PER_CLASS}
    store = FeatureStore(out)
    np.testing.assert_array_equal(store.counts, np.bincount(arrays["y_train"], minlength=C))
    np.testing.assert_array_equal(store.counts, COUNTS)
    assert store.class_names == names.tolist()
    assert (store.attrs["model"], store.attrs["dataset"]) == ("m", "d")
    for s in ("train", "val", "test"):
        X, y = store.load(s)
        np.testing.assert_array_equal(X.numpy(), arrays[f"x_{s}"])
        np.testing.assert_array_equal(y.numpy(), arrays[f"y_{s}"])
    W, b = store.head()
    np.testing.assert_array_equal(W.numpy(), arrays["weight"])
    np.testing.assert_array_equal(b.numpy(), arrays["bias"])
    # the imported file works with every command
    joint, _ = run_json(["joint", "-f", out])
    assert_metrics(joint["test"])
    info, _ = run_json(["info", out])
    assert info["groups"] == {"many": 2, "medium": 5, "few": 5}


def test_import_minimal_and_explicit_counts(tmp_path, arrays):
    """No weight/bias/class_names; counts given explicitly win over the y_train histogram."""
    npz = tmp_path / "min.npz"
    counts = COUNTS * 10
    np.savez(npz, **{k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}, counts=counts)
    out = tmp_path / "min.h5"
    doc, _ = run_json(["import", "--npz", npz, "--out", out, "--dtype", "float16", "-q"])
    assert doc["has_head"] is False
    store = FeatureStore(out)
    np.testing.assert_array_equal(store.counts, counts)
    assert store.class_names is None and not store.has_head
    assert set(store.splits) == {"train", "test"} and store.splits["train"].dtype == "float16"
    # counts from y_train reach the last class of the weight even when y_train never shows it
    npz2 = tmp_path / "head.npz"
    keep = arrays["y_train"] < C - 1
    np.savez(npz2, x_train=arrays["x_train"][keep], y_train=arrays["y_train"][keep], weight=arrays["weight"])
    out2 = tmp_path / "head.h5"
    run(["import", "--npz", npz2, "--out", out2, "-q"])
    assert FeatureStore(out2).counts.tolist() == [*COUNTS[:-1].tolist(), 0]


def test_import_errors(tmp_path, arrays):
    out = tmp_path / "out.h5"
    user_error(["import", "--npz", tmp_path / "missing.npz", "--out", out], match="missing.npz")
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    user_error(["import", "--npz", text, "--out", out], match="text.npz")
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros((3, 2)))
    user_error(["import", "--npz", npy, "--out", out], match="array.npy")
    half = tmp_path / "half.npz"
    np.savez(half, x_train=arrays["x_train"])
    user_error(["import", "--npz", half, "--out", out], match="y_train")
    neg = tmp_path / "neg.npz"
    np.savez(neg, x_train=np.zeros((3, 2), np.float32), y_train=np.array([0, -1, 1]))
    user_error(["import", "--npz", neg, "--out", out], match="y_train")
    frac = tmp_path / "frac.npz"
    np.savez(frac, x_train=np.zeros((3, 2), np.float32), y_train=np.array([0.0, 0.5, 1.0]))
    user_error(["import", "--npz", frac, "--out", out], match="y_train")
    shape = tmp_path / "shape.npz"
    np.savez(shape, x_train=np.zeros((3, 2), np.float32), y_train=np.array([0, 1, 1]), weight=np.zeros((2, 5)))
    line = user_error(["import", "--npz", shape, "--out", out], match="weight")
    assert ".tmp" not in line  # names the user's files, not a temporary one
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    run(["import", "--npz", good, "--out", out, "-q"])
    user_error(["import", "--npz", good, "--out", out], match="exists")
    run(["import", "--npz", good, "--out", out, "--overwrite", "-q"])
    user_error(["import", "--npz", good, "--out", tmp_path / "nodir" / "x.h5"], match="nodir")


# -- user errors -----------------------------------------------------------------------------------
FEATURE_COMMANDS = [["joint"], ["ncm"], ["tau-sweep"], ["crt", "--epochs", "1"], ["lws", "--epochs", "1"],
                    ["compare", "--crt-epochs", "1"]]


@pytest.mark.parametrize("kind", ["missing", "not_hdf5", "wrong_format", "no_counts", "future_version", "truncated"])
def test_bad_feature_files(bad_files, kind):
    path = bad_files[kind]
    user_error(["info", path], match=path)
    for cmd in FEATURE_COMMANDS:
        user_error([cmd[0], "-f", path, *cmd[1:]], match=path)


def test_incomplete_split_needs_allow_incomplete(files):
    user_error(["joint", "-f", files["incomplete"]], match="--allow-incomplete")
    doc, _ = run_json(["joint", "-f", files["incomplete"], "--allow-incomplete"])
    assert doc["test"]["n"] == 40


@pytest.mark.parametrize("cmd", FEATURE_COMMANDS)
def test_unknown_split(files, cmd):
    user_error([cmd[0], "-f", files["full"], *cmd[1:], "--splits", "nope"] if cmd[0] != "tau-sweep"
               else ["tau-sweep", "-f", files["full"], "--eval-split", "nope"], match="nope")


@pytest.mark.parametrize("cmd", [["tau-sweep"], ["lws", "--epochs", "1"], ["joint"]])
def test_commands_that_need_a_stored_head(files, cmd):
    line = user_error([cmd[0], "-f", files["nohead"], *cmd[1:]], match="classifier")
    assert "ncm" in line and "crt" in line  # says which commands work without one


def test_methods_that_need_train(files):
    for cmd in (["ncm"], ["crt", "--epochs", "1"], ["lws", "--epochs", "1"]):
        user_error([cmd[0], "-f", files["notrain"], *cmd[1:]], match="train")


@pytest.mark.parametrize("command", ["crt", "lws"])
@pytest.mark.parametrize("args,option", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-2"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--sampler", "nope"], "--sampler"),
    (["--sampler", "nan"], "--sampler"),
    (["--epochs", "two"], "--epochs"),
    (["--device", "tpu"], "--device"),
])
def test_training_usage_errors(files, command, args, option):
    user_error([command, "-f", files["full"], *args], code=2, match=option)


@pytest.mark.parametrize("args,code,match", [
    (["--crt-epochs", "0"], 2, "--crt-epochs"),
    (["--lws-epochs", "-1"], 2, "--lws-epochs"),
    (["--methods", "nope"], 2, "nope"),
])
def test_compare_errors(files, args, code, match):
    user_error(["compare", "-f", files["full"], *args], code=code, match=match)


@pytest.mark.parametrize("command", ["crt", "lws", "compare"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_gpu(files, command, device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    user_error([command, "-f", files["full"], "--device", device], match="cuda")


def test_views_larger_than_stored(files):
    user_error(["crt", "-f", files["full"], "--views", "1", "--epochs", "1"], code=2, match="--views")
    user_error(["crt", "-f", files["views"], "--views", "5", "--epochs", "1"], code=2, match="--views")


def test_features_is_required_and_a_file(files, tmp_path):
    user_error(["joint"], code=2, match="--features")
    user_error(["joint", "-f", tmp_path], code=2)
    user_error(["nonsense-command"], code=2)


# -- help and version ------------------------------------------------------------------------------
def test_help_lists_every_command_on_one_line():
    out = run(["--help"]).stdout
    lines = out.splitlines()
    for name, (_, _, summary) in COMMANDS.items():
        rows = [line.split(None, 1) for line in lines if line.strip().split(" ", 1)[0] == name]
        assert rows == [[name, summary]], (name, rows)


def test_help_does_not_import_torch_or_timm():
    script = textwrap.dedent(
        """
        import sys
        from lt_rebalance.cli import main
        try:
            main(["--help"], standalone_mode=False)
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in ("torch", "timm") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Commands:" in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name):
    out = run([name, "--help"]).stdout
    assert "Usage:" in out and "--help" in out


def test_version():
    from lt_rebalance import __version__

    out = run(["--version"]).stdout
    assert __version__ in out and "ltr" in out


def test_json_flag_everywhere():
    """Every method command takes --json (the issue's contract)."""
    for name in ("info", "joint", "ncm", "tau-sweep", "crt", "lws", "compare", "import"):
        assert "--json" in run([name, "--help"]).stdout, name


def test_accuracies_are_fractions_not_percent(files):
    doc, _ = run_json(["ncm", "-f", files["full"]])
    assert max(doc["test"][k] for k in METRIC_KEYS) <= 1.0
    assert not math.isnan(doc["test"]["all"])
