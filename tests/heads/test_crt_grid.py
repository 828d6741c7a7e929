"""Batched cRT grid (issue 7): G heads in one pass equal G heads trained one by one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.heads import CRT
from lt_rebalance.heads.crt_grid import CRTGrid
from lt_rebalance.store import write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")
LRS, WDS = [0.05, 0.3, 2.0], [1e-4, 5e-3]


@pytest.fixture(scope="module")
def data():
    from data_support import make_long_tailed

    return make_long_tailed(num_classes=8, n_max=120, imbalance=30.0, dim=12, sep=2.0, seed=3)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"loss": "balanced-softmax", "class_weights": "cb", "beta": 0.99, "label_smoothing": 0.1, "sampler": "sqrt"},
    ],
)
@pytest.mark.parametrize("with_views", [False, True])
def test_grid_heads_equal_lone_runs(data, extra, with_views):
    X, y = data["X_train"], data["y_train"]
    views = None
    if with_views:  # three noisy views: every step draws one per row, from the same stream for all heads
        rng = np.random.default_rng(0)
        views = torch.from_numpy((X[None] + 0.3 * rng.normal(size=(3, *X.shape))).astype(np.float32))
    kw = dict(epochs=3, batch_size=32, seed=11, device="cpu", **extra)
    grid = CRTGrid(CRT(**kw), LRS, WDS).fit(X, y, data["X_val"], data["y_val"], views=views)
    assert [(e.lr, e.weight_decay) for e in grid.estimators_] == [(a, b) for a in LRS for b in WDS]
    for e in grid.estimators_:
        lone = CRT(lr=e.lr, weight_decay=e.weight_decay, **kw).fit(X, y, data["X_val"], data["y_val"], views=views)
        # one [G*C, D] GEMM vs G [C, D] GEMMs: equal up to float32 rounding
        torch.testing.assert_close(e.weight_, lone.weight_, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(e.bias_, lone.bias_, atol=2e-5, rtol=1e-5)
        assert e.history_.val == lone.history_.val
        assert e.history_.best_epoch == lone.history_.best_epoch
        assert e.history_.lr == lone.history_.lr
        np.testing.assert_allclose(e.history_.loss, lone.history_.loss, rtol=1e-5)
    # selection: the best val top-1, ties to the earlier grid entry
    best = [max(e.history_.val) for e in grid.estimators_]
    assert grid.best_index_ == int(np.argmax(best))
    assert np.array_equal(grid.predict(data["X_test"]), grid.best_estimator_.predict(data["X_test"]))


def test_diverged_member_is_excluded(data):
    X, y = data["X_train"] * 1e3, data["y_train"]
    kw = dict(epochs=2, batch_size=32, momentum=0.0, device="cpu", schedule="constant")
    grid = CRTGrid(CRT(**kw), [1e-4, 1e36], [0.0]).fit(X, y, data["X_val"] * 1e3, data["y_val"])
    assert [e.history_.diverged for e in grid.estimators_] == [False, True]
    assert grid.best_index_ == 0 and grid.val_scores_[1] == -np.inf
    with pytest.raises(ValueError, match="training diverged"):
        CRTGrid(CRT(**kw), [1e36, 1e37], [0.0]).fit(X, y, data["X_val"], data["y_val"])


def test_grid_errors(data):
    X, y = data["X_train"], data["y_train"]
    with pytest.raises(ValueError, match="val data"):
        CRTGrid(CRT(epochs=1), [0.1, 0.2], [0.0]).fit(X, y, None, None)
    with pytest.raises(ValueError, match="lr must be"):
        CRTGrid(CRT(epochs=1, device="cpu"), [0.1, -1.0], [0.0]).fit(X, y, data["X_val"], data["y_val"])
    with pytest.raises(ValueError, match="lrs must be"):
        CRTGrid(CRT(epochs=1), [], [0.0]).fit(X, y, data["X_val"], data["y_val"])


# -- CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    splits = {s: (data[f"X_{s}"], data[f"y_{s}"]) for s in ("train", "val", "test")}
    return {
        "full": str(write_features(root / "full.h5", splits)),
        "noval": str(write_features(root / "noval.h5", {s: splits[s] for s in ("train", "test")})),
        "root": root,
    }


ARGS = ["--epochs", "2", "--batch-size", "32", "-q"]


def test_cli_grid_json(data, files):
    head = str(files["root"] / "best.pt")
    r = CliRunner().invoke(main, ["crt", "-f", files["full"], "--lr", "0.05,0.3", "--weight-decay", "1e-4,5e-3",
                                  "--json", "--save", head, *ARGS])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [(g["lr"], g["weight_decay"]) for g in out["grid"]] == [(0.05, 1e-4), (0.05, 5e-3), (0.3, 1e-4), (0.3, 5e-3)]
    sel = out["selected"]
    vals = [g["val"]["all"] for g in out["grid"]]
    assert sel["index"] == int(np.argmax(vals)) and sel["selected_on"] == "val"
    chosen = out["grid"][sel["index"]]
    assert (out["params"]["lr"], out["params"]["weight_decay"]) == (chosen["lr"], chosen["weight_decay"])
    assert out["test"] == chosen["test"] and out["val"] == chosen["val"]
    # the selected head is what --save wrote
    lone = CRT(lr=chosen["lr"], weight_decay=chosen["weight_decay"], epochs=2, batch_size=32, device="cpu").fit(
        data["X_train"], data["y_train"], data["X_val"], data["y_val"])
    saved = torch.load(head, weights_only=True)
    torch.testing.assert_close(saved["weight"], lone.weight_, atol=2e-5, rtol=1e-5)
    human = CliRunner().invoke(main, ["crt", "-f", files["full"], "--lr", "0.05,0.3", *ARGS])
    assert human.exit_code == 0 and "<- selected" in human.output and "2 heads" in human.output


def test_cli_single_value_keeps_contract(files):
    r = CliRunner().invoke(main, ["crt", "-f", files["full"], "--lr", "0.3", "--json", *ARGS])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"method", "params", "history", "val", "test"} and out["params"]["lr"] == 0.3


@pytest.mark.parametrize(
    "file, opts, code, message",
    [
        ("full", ["--lr", "0.1,abc"], 2, "--lr"),
        ("full", ["--weight-decay", "1e-4,1e-4"], 2, "distinct"),
        ("full", ["--lr", "0.1,nan"], 2, "finite"),
        ("full", ["--lr", "0.1,-2"], 2, "every value must be > 0"),
        ("noval", ["--lr", "0.1,0.2"], 1, "no 'val' split"),
    ],
)
def test_cli_grid_errors(files, file, opts, code, message):
    r = CliRunner().invoke(main, ["crt", "-f", files[file], *opts, *ARGS])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert sum(line.startswith("Error:") for line in r.output.splitlines()) == 1


@pytest.mark.parametrize("sampler,with_views", [("cb", False), ("sqrt", True)])
def test_seed_members_equal_lone_runs(data, sampler, with_views):
    """cRT seeds as members of one batched pass (issue 14): each equals a lone run with its seed."""
    from lt_rebalance.heads.crt_grid import fit_seeds

    X, y = data["X_train"], data["y_train"]
    views = None
    if with_views:
        rng = np.random.default_rng(1)
        views = torch.from_numpy((X[None] + 0.3 * rng.normal(size=(2, *X.shape))).astype(np.float32))
    kw = dict(epochs=2, batch_size=32, device="cpu", sampler=sampler, class_weights="cb", beta=0.99)
    members = fit_seeds(CRT(**kw), [0, 5, 9], X, y, data["X_val"], data["y_val"], views=views)
    assert [m.seed for m in members] == [0, 5, 9]
    for m in members:
        lone = CRT(seed=m.seed, **kw).fit(X, y, data["X_val"], data["y_val"], views=views)
        torch.testing.assert_close(m.weight_, lone.weight_, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(m.bias_, lone.bias_, atol=2e-5, rtol=1e-5)
        assert m.history_.val == lone.history_.val
        np.testing.assert_allclose(m.history_.loss, lone.history_.loss, rtol=1e-5)
    assert not torch.allclose(members[0].weight_, members[1].weight_)  # the seeds differ
