"""Issue 23 on the command line: ``ltr disalign``, ``--protocol`` (marc, wb), ``--loss`` and its
smoothing options, ``--preset``, ``logit-adjust --empty-classes``, ``--per-class-out``, the tail
metrics in the tables and the train imbalance of ``ltr info``.

Numbers are checked against numpy computations from the arrays written into the files (the joint
classifier's per-class accuracies, logit adjustment of an empty class, the imbalance statistics by
their pairwise definition) and settings against the published configurations as written in
docs/METHODS.md (not read from lt_rebalance.presets).
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cli_support import COUNTS, C, _splits, make_arrays, run, run_json

from lt_rebalance.store import write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")
N_TRAIN = int(COUNTS.sum())  # 516
FAST = ["--epochs", "2", "--batch-size", "64"]


@pytest.fixture(scope="module")
def arrays():
    return make_arrays()


@pytest.fixture(scope="module")
def full(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("stage2") / "full.h5"
    write_features(path, _splits(arrays), weight=arrays["weight"], bias=arrays["bias"])
    return str(path)


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def _one_error(args, code: int = 2) -> str:
    lines = _error_lines(run(args, expect=code))
    assert len(lines) == 1, lines
    return lines[0]


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _numpy_per_class(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """support, correct and accuracy (NaN without support) per class, by counting."""
    support = np.array([(y == j).sum() for j in range(C)])
    correct = np.array([((y == j) & (pred == j)).sum() for j in range(C)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return support, correct, correct / support


# -- DisAlign ----------------------------------------------------------------------------------------
def test_disalign_command_with_shifted_priors(full):
    doc, _ = run_json(["disalign", "-f", full, *FAST, "--test-priors", "forward-10"])
    assert doc["method"] == "disalign"
    p = doc["params"]
    # the authors' ImageNet-LT recipe: GRW loss with rho 1.2, instance-balanced sampling, lr 0.1
    assert (p["loss"], p["rho"], p["sampler"], p["lr"], p["epochs"], p["batch_size"]) == ("grw", 1.2, "ib", 0.1, 2, 64)
    assert len(doc["alpha"]) == len(doc["beta"]) == C
    corrected = doc["shifted_corrected"]["forward-10"]  # it has an implied prior, so it is corrected
    assert set(corrected) == {"known_prior", "em"} and 0 <= corrected["known_prior"]["all"] <= 1
    for key in ("worst_class", "worst_10pct", "hmean"):
        assert 0 <= doc["test"][key] <= 1


def test_disalign_in_compare_is_opt_in(full):
    doc, _ = run_json(["compare", "-f", full, "--methods", "joint,disalign", "--crt-epochs", "1"])
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"joint", "disalign"} and rows["disalign"]["params"]["loss"] == "grw"
    assert rows["disalign"]["test"]["n"] == rows["joint"]["test"]["n"] > 0
    default, _ = run_json(["compare", "-f", full, "--methods", "joint"])
    assert [r["method"] for r in default["rows"]] == ["joint"]
    from lt_rebalance.registry import DEFAULT_METHODS

    assert "disalign" not in DEFAULT_METHODS


# -- --protocol --------------------------------------------------------------------------------------
def test_marc_protocols_record_what_they_ran(full):
    paper, _ = run_json(["marc", "-f", full, *FAST])
    authors, _ = run_json(["marc", "-f", full, *FAST, "--protocol", "authors"])
    p, a = paper["params"], authors["params"]
    assert (p["protocol"], p["lr"], p["sampler"], p["loss"]) == ("paper", 0.2, "cb", "ce")
    assert (a["protocol"], a["lr"], a["sampler"], a["loss"], a["rho"]) == ("authors", 0.05, "ib", "grw", 1.2)
    # the authors' loop: floor(N / B) - 1 steps an epoch; the paper's: floor(N / B)
    assert p["steps_per_epoch"] == N_TRAIN // 64 and a["steps_per_epoch"] == N_TRAIN // 64 - 1
    assert a["steps"] == 2 * (N_TRAIN // 64 - 1) and a["batch_size"] == 64
    mixed, _ = run_json(["marc", "-f", full, *FAST, "--protocol", "authors", "--lr", "0.3", "--sampler", "cb"])
    assert (mixed["params"]["lr"], mixed["params"]["sampler"], mixed["params"]["loss"]) == (0.3, "cb", "grw")


def test_wb_protocols(full):
    paper, _ = run_json(["wb", "-f", full, *FAST])
    authors, _ = run_json(["wb", "-f", full, *FAST, "--protocol", "authors"])
    p, a = paper["params"], authors["params"]
    assert (p["protocol"], p["schedule"], p["projection"], p["steps_per_epoch"]) == ("paper", "cosine", "step",
                                                                                     N_TRAIN // 64)
    assert (a["protocol"], a["schedule"], a["projection"], a["steps_per_epoch"]) == (
        "authors", "cosine-reference", "epoch", -(-N_TRAIN // 64))  # the last partial batch kept
    assert p["loss"] == a["loss"] == "cb-softmax-bce" and p["lr"] == 0.01 and p["sampler"] == "ib"
    explicit, _ = run_json(["wb", "-f", full, *FAST, "--protocol", "authors", "--schedule", "constant"])
    assert explicit["params"]["schedule"] == "constant"


def test_protocol_help_says_what_each_uses():
    marc = " ".join(run(["marc", "--help"]).stdout.split())  # unwrapped
    assert "paper 0.2, authors 0.05" in marc and "paper cb, authors ib" in marc and "paper ce, authors grw" in marc
    assert "--protocol [paper|authors]" in marc
    wb = " ".join(run(["wb", "--help"]).stdout.split())
    assert "paper: cosine; authors: cosine-reference" in wb and "--protocol [paper|authors]" in wb


# -- --loss and label-aware smoothing ---------------------------------------------------------------
@pytest.mark.parametrize("cmd, args, expect", [
    ("lws", ["--loss", "grw", "--rho", "0.5"], {"loss": "grw", "rho": 0.5}),
    ("lws", ["--loss", "las", "--smooth-head", "0.4", "--smooth-tail", "0.1", "--smooth-shape", "linear"],
     {"loss": "las", "smooth_head": 0.4, "smooth_tail": 0.1, "smooth_shape": "linear"}),
    ("marc", ["--loss", "las", "--smooth-head", "0.2"], {"loss": "las", "smooth_head": 0.2}),
    ("disalign", ["--loss", "ce"], {"loss": "ce"}),
    ("crt", ["--loss", "las", "--smooth-head", "0.2", "--smooth-shape", "convex"],
     {"loss": "las", "smooth_head": 0.2, "smooth_shape": "convex"}),
])
def test_loss_options_reach_the_head(full, cmd, args, expect):
    doc, _ = run_json([cmd, "-f", full, *FAST, *args])
    assert {k: doc["params"][k] for k in expect} == expect


def test_different_losses_train_different_heads(full):
    ce, _ = run_json(["lws", "-f", full, *FAST, "--loss", "ce"])
    las, _ = run_json(["lws", "-f", full, *FAST, "--loss", "las", "--smooth-head", "0.6"])
    assert ce["history"]["loss"] != las["history"]["loss"]


@pytest.mark.parametrize("args, needles", [
    (["marc", "--rho", "-1"], ("--rho", "x>=0")),
    (["disalign", "--smooth-head", "1"], ("--smooth-head", "0<=x<1")),
    (["lws", "--smooth-tail", "-0.1"], ("--smooth-tail", "0<=x<1")),
    (["crt", "--loss", "grw"], ("--loss", "'ce', 'balanced-softmax', 'las'")),
    (["crt", "--rho", "1"], ("No such option", "--rho")),
    (["marc", "--protocol", "official"], ("--protocol", "'paper', 'authors'")),
    (["crt", "--preset", "cifar10_lt"], ("--preset", "imagenet_lt, places_lt, inat2018")),
    (["disalign", "--preset", "places_lt"], ("--preset", "choose one of imagenet_lt")),
    (["wb", "--preset", "imagenet_lt"], ("--preset", "choose one of cifar100_lt")),
    (["logit-adjust", "--empty-classes", "zero"], ("--empty-classes", "'one-row', 'reference'")),
])
def test_bad_values_are_one_error_line(full, args, needles):
    line = _one_error([args[0], "-f", full, *args[1:]])
    for n in needles:
        assert n in line, line


# -- --preset ---------------------------------------------------------------------------------------
# the published settings as docs/METHODS.md lists them (written out here, not read from presets.py)
LWS_PLACES = {"epochs": 5, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4, "momentum": 0.9, "sampler": "cb",
              "schedule": "cosine-reference"}


def test_preset_sets_the_published_configuration(full):
    doc, err = run_json(["lws", "-f", full, "--preset", "places_lt"])
    assert {k: doc["params"][k] for k in LWS_PLACES} == LWS_PLACES
    pre = doc["preset"]
    assert pre["name"] == "places_lt" and pre["method"] == "lws" and pre["settings"] == LWS_PLACES
    assert pre["overridden"] == [] and "Places_LT" in pre["source"] and "cls_lws" in pre["source"]
    assert "preset places_lt (lws)" in err and pre["source"] in err


def test_explicit_flags_win_over_the_preset(full):
    doc, err = run_json(["lws", "-f", full, "--preset", "places_lt", "--lr", "0.3", "--epochs", "2"])
    p = doc["params"]
    assert (p["lr"], p["epochs"], p["batch_size"], p["schedule"]) == (0.3, 2, 256, "cosine-reference")
    assert doc["preset"]["overridden"] == ["epochs", "lr"] and doc["preset"]["settings"]["lr"] == 0.1
    assert "given flags kept: --epochs, --lr" in err
    # a flag given with its default value still wins (what counts is that it was given)
    same, _ = run_json(["lws", "-f", full, "--preset", "places_lt", "--epochs", "1", "--sampler", "ib",
                        "--schedule", "cosine"])
    assert (same["params"]["sampler"], same["params"]["schedule"]) == ("ib", "cosine")


@pytest.mark.parametrize("cmd, dataset, expect", [
    ("crt", "imagenet_lt", {"lr": 0.2, "batch_size": 512, "weight_decay": 5e-4, "sampler": "cb",
                            "schedule": "cosine-reference"}),
    ("marc", "places_lt", {"protocol": "authors", "lr": 0.05, "batch_size": 128, "sampler": "ib", "loss": "grw",
                           "rho": 1.2}),
    ("disalign", "imagenet_lt", {"lr": 0.1, "batch_size": 256, "sampler": "ib", "loss": "grw", "rho": 1.2}),
    ("wb", "cifar100_lt", {"protocol": "authors", "lr": 0.01, "batch_size": 64, "weight_decay": 0.1,
                           "schedule": "cosine-reference", "thresh": 0.1}),
])
def test_presets_of_each_trained_command(full, cmd, dataset, expect):
    doc, _ = run_json([cmd, "-f", full, "--preset", dataset, "--epochs", "1"])
    assert {k: doc["params"][k] for k in expect} == expect
    assert doc["preset"]["name"] == dataset and doc["preset"]["overridden"] == ["epochs"]


def test_lws_with_label_aware_smoothing_takes_the_mislas_preset(full):
    doc, _ = run_json(["lws", "-f", full, "--preset", "places_lt", "--loss", "las", "--epochs", "1"])
    assert doc["preset"]["method"] == "lws_las" and "MiSLAS" in doc["preset"]["source"]
    p = doc["params"]
    assert (p["loss"], p["smooth_head"], p["smooth_tail"], p["lr"], p["batch_size"]) == ("las", 0.4, 0.1, 0.1, 256)


# -- logit adjustment of a class without train rows -------------------------------------------------
def test_logit_adjust_empty_classes(tmp_path, arrays):
    a = dict(arrays)
    keep = a["y_train"] != C - 1  # the last class loses its train rows
    a["x_train"], a["y_train"] = a["x_train"][keep], a["y_train"][keep]
    path = tmp_path / "empty.h5"
    counts = np.bincount(a["y_train"], minlength=C)
    write_features(path, _splits(a), counts=counts, weight=a["weight"], bias=a["bias"])
    logits = a["x_test"].astype(np.float64) @ a["weight"].T + a["bias"]
    pi = counts / counts.sum()
    reference = logits - np.log(pi + 1e-12)  # the reference's log(pi^tau + 1e-12) at tau 1
    n1 = np.maximum(counts, 1)
    one_row = logits - np.log(n1 / n1.sum())
    for mode, adjusted in (("reference", reference), ("one-row", one_row)):
        doc, _ = run_json(["logit-adjust", "-f", path, "--taus", "1", "--empty-classes", mode])
        assert doc["empty_classes"] == mode and doc["selected_tau"] == 1
        assert doc["test"]["all"] == pytest.approx((adjusted.argmax(1) == a["y_test"]).mean())
    # the reference's form makes the empty class win (nearly) every row
    assert (reference.argmax(1) == C - 1).mean() > 0.9


# -- --per-class-out --------------------------------------------------------------------------------
def test_per_class_csv_of_the_joint_classifier_against_numpy(full, arrays, tmp_path):
    out = tmp_path / "pc.csv"
    doc, err = run_json(["joint", "-f", full, "--per-class-out", out])
    assert doc["per_class_out"] == str(out) and str(out) in err
    rows = _read_csv(out)
    assert list(rows[0]) == ["method", "split", "class", "train_count", "group", "support", "correct", "accuracy"]
    for split in ("val", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        pred = (x.astype(np.float64) @ arrays["weight"].T + arrays["bias"]).argmax(1)
        support, correct, acc = _numpy_per_class(pred, y)
        got = [r for r in rows if r["split"] == split]
        assert [int(r["class"]) for r in got] == list(range(C)) and {r["method"] for r in got} == {"joint"}
        assert [int(r["train_count"]) for r in got] == COUNTS.tolist()
        assert [r["group"] for r in got] == ["many" if n > 100 else "few" if n < 20 else "medium" for n in COUNTS]
        assert [int(r["support"]) for r in got] == support.tolist()
        assert [int(r["correct"]) for r in got] == correct.tolist()
        np.testing.assert_allclose([float(r["accuracy"]) for r in got], acc, rtol=1e-12)
        assert doc[split]["worst_class"] == pytest.approx(acc.min())


def test_per_class_csv_agrees_with_the_trained_result(full, tmp_path):
    out = tmp_path / "lws.csv"
    doc, _ = run_json(["lws", "-f", full, *FAST, "--per-class-out", out])
    rows = _read_csv(out)
    for split in ("val", "test"):
        acc = np.array([float(r["accuracy"]) for r in rows if r["split"] == split and r["accuracy"]])
        k = math.ceil(len(acc) / 10)
        assert doc[split]["mean_class"] == pytest.approx(acc.mean())
        assert doc[split]["worst_10pct"] == pytest.approx(np.sort(acc)[:k].mean())


def test_per_class_out_is_never_overwritten_without_overwrite(full, tmp_path):
    out = tmp_path / "pc.csv"
    out.write_text("keep me\n")
    line = _one_error(["ncm", "-f", full, "--per-class-out", out], code=1)
    assert "already exists" in line and "--overwrite" in line and out.read_text() == "keep me\n"
    run(["ncm", "-f", full, "--per-class-out", out, "--overwrite", "-q"])
    assert _read_csv(out)[0]["method"] == "ncm"


def test_per_class_out_of_compare_has_a_method_column(full, arrays, tmp_path):
    out = tmp_path / "cmp.csv"
    doc, _ = run_json(["compare", "-f", full, "--methods", "joint,ncm,tau_norm", "--per-class-out", out])
    rows = _read_csv(out)
    assert [r["method"] for r in rows[:: C]] == ["joint", "ncm", "tau_norm"] * 2  # val, then test
    by_method = {r["method"]: r for r in doc["rows"]}
    for m in ("joint", "ncm", "tau_norm"):
        acc = np.array([float(r["accuracy"]) for r in rows if r["method"] == m and r["split"] == "test"])
        assert by_method[m]["test"]["mean_class"] == pytest.approx(acc.mean())
        assert by_method[m]["test"]["worst_class"] == pytest.approx(acc.min())
    pred = (arrays["x_test"].astype(np.float64) @ arrays["weight"].T + arrays["bias"]).argmax(1)
    joint = [r for r in rows if r["method"] == "joint" and r["split"] == "test"]
    assert [int(r["correct"]) for r in joint] == _numpy_per_class(pred, arrays["y_test"])[1].tolist()


def test_per_class_out_of_a_sweep_is_the_selected_head(full, tmp_path):
    out = tmp_path / "tau.csv"
    doc, _ = run_json(["tau-sweep", "-f", full, "--per-class-out", out])
    rows = _read_csv(out)
    assert {r["split"] for r in rows} == {"test"} and {r["method"] for r in rows} == {"tau_norm"}
    assert doc["test"]["mean_class"] == pytest.approx(np.mean([float(r["accuracy"]) for r in rows]))
    line = _one_error(["tau-sweep", "-f", full, "--select-on", "none", "--per-class-out", tmp_path / "x.csv"])
    assert "--per-class-out" in line and not (tmp_path / "x.csv").exists()


# -- tables ------------------------------------------------------------------------------------------
def test_tables_show_the_tail_metrics(full):
    table = run(["joint", "-f", full]).stdout
    header = table.splitlines()[1].split()
    assert header == ["many", "medium", "few", "all", "mean_class", "worst_class", "worst_10pct", "hmean"]
    doc, _ = run_json(["joint", "-f", full])
    test_row = next(line for line in table.splitlines() if line.startswith("test")).split()
    assert float(test_row[6]) == pytest.approx(100 * doc["test"]["worst_class"], abs=0.006)
    assert float(test_row[8]) == pytest.approx(100 * doc["test"]["hmean"], abs=0.006)
    cmp = run(["compare", "-f", full, "--methods", "joint"]).stdout
    assert "balanced and tail accuracy %" in cmp and "test/worst" in cmp and "test/hmean" in cmp


# -- ltr info: the train imbalance ------------------------------------------------------------------
def test_info_imbalance_against_a_hand_computation(full):
    doc, _ = run_json(["info", full])
    n = COUNTS.astype(float)
    gini = np.abs(n[:, None] - n[None, :]).sum() / (2 * len(n) * n.sum())  # the pairwise definition
    assert doc["imbalance_factor"] == pytest.approx(150 / 3)
    assert doc["gini"] == pytest.approx(gini, rel=1e-12)
    assert doc["top20_share"] == pytest.approx((150 + 120 + 60) / 516)  # ceil(12 / 5) = 3 largest classes
    assert doc["empty_classes"] == 0
    text = run(["info", full]).stdout
    assert f"factor 50 (max / min class count), Gini {gini:.3f}, top 20 % of classes hold 64.0 %" in text


def test_info_stays_torch_free(full):
    script = textwrap.dedent(f"""
        import sys
        from lt_rebalance.cli import main
        try:
            main(["info", {full!r}, "--json"], standalone_mode=False)
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in ("torch",) if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout[: proc.stdout.rindex("HEAVY")])["gini"] > 0
    assert "HEAVY []" in proc.stdout


def test_las_shapes_of_the_cli_are_the_library_s():
    from lt_rebalance.commands.trained import LAS_SHAPES
    from lt_rebalance.heads.losses import LAS_SHAPES as LIBRARY

    assert tuple(LAS_SHAPES) == tuple(LIBRARY)


def test_per_class_out_of_compare_on_several_files(full, tmp_path):
    other = tmp_path / "other.h5"
    b = make_arrays(seed=1)  # same classes and train counts, another representation
    write_features(other, _splits(b), weight=b["weight"], bias=b["bias"])
    out = tmp_path / "two.csv"
    run(["compare", "-f", full, "-f", other, "--methods", "joint", "--splits", "test", "--per-class-out", out, "-q"])
    rows = _read_csv(out)
    assert list(rows[0])[:3] == ["features", "method", "split"]
    assert [r["features"] for r in rows] == [full] * C + [str(other)] * C
    pred = (b["x_test"].astype(np.float64) @ b["weight"].T + b["bias"]).argmax(1)
    assert [int(r["correct"]) for r in rows[C:]] == _numpy_per_class(pred, b["y_test"])[1].tolist()
