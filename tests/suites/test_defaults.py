"""Issue 12, sections 2 and 3: defaults that work on any file, and the rough edges of a first run.

Small files (fewer train rows than the reference's batch of 512), the "auto" training length
(numbers worked out by hand from the rule in heads/training.py), canonical method names, the
random-init head marker, extraction progress in logs, and the export load snippet.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.heads import CRT, LWS
from lt_rebalance.heads.crt_grid import CRTGrid
from lt_rebalance.heads.training import FewStepsWarning, plan_schedule
from lt_rebalance.registry import DEFAULT_METHODS, METHOD_NAMES, canonical_method, parse_methods
from lt_rebalance.store import FeatureStore, write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")
C, D = 6, 8
COUNTS = np.array([60, 40, 25, 12, 6, 3])  # 146 train rows: far fewer than a batch of 512


def _draw(rng, means, per_class):
    """Non-negative features (like pooled CNN ones) around the class means."""
    y = np.repeat(np.arange(C), per_class)
    x = np.maximum(means[y] + 0.3 * rng.normal(size=(len(y), D)), 0)
    p = rng.permutation(len(y))
    return x[p].astype(np.float32), y[p].astype(np.int64)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 146-row long-tailed file whose stage-1 head was trained with instance-balanced batches,
    the same marked random-init, and one written before the /head attribute existed."""
    rng = np.random.default_rng(1)
    means = np.abs(rng.normal(size=(C, D)) * 0.5 + 0.3)
    splits = {"train": _draw(rng, means, COUNTS), "val": _draw(rng, means, 5), "test": _draw(rng, means, 30)}
    joint = CRT(sampler="ib", keep_best=False, device="cpu").fit(*splits["train"])
    weight, bias = joint.weight_.numpy(), joint.bias_.numpy()
    root = tmp_path_factory.mktemp("defaults")
    paths = {"file": root / "small.h5", "random": root / "random.h5", "legacy": root / "legacy.h5"}
    # thresholds that fit its class sizes (60 .. 3 rows), recorded in the file: no empty shot group
    write_features(paths["file"], splits, weight=weight, bias=bias, shot_many=30, shot_few=10)
    write_features(paths["random"], splits, weight=weight, bias=bias, head_random_init=True)
    # written before the /head attribute existed: only the root attribute says random-init
    write_features(paths["legacy"], splits, weight=weight, bias=bias, weights="random-init")
    with h5py.File(paths["legacy"], "a") as f:
        del f["head"].attrs["random_init"]
    return {"splits": splits, "weight": weight, "bias": bias, **{k: str(v) for k, v in paths.items()}}


def run(args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def run_json(args):
    r = run([*args, "--json"])
    return json.loads(r.stdout), r.stderr


# -- the rule, with hand-worked numbers -----------------------------------------------------------
@pytest.mark.parametrize("n, ref, want", [
    (115_846, 10, (10, 512, 226)),  # ImageNet-LT cRT: 226 batches of 512 x 10 epochs, unchanged
    (115_846, 5, (5, 512, 226)),  # ImageNet-LT LWS: 1,130 steps, unchanged
    (62_500, 5, (5, 512, 122)),  # Places-LT LWS: 610 steps, unchanged
    (437_513, 10, (10, 512, 854)),  # iNaturalist
    (10_847, 10, (24, 512, 21)),  # CIFAR-100-LT: 21 x 10 = 210 < 500 -> ceil(500 / 21) = 24 epochs
    (5_000, 5, (56, 512, 9)),  # 9 batches an epoch -> ceil(500 / 9) = 56 epochs
    (4_096, 10, (63, 512, 8)),  # from 4,096 rows up the batch is 512
    (4_095, 10, (63, 511, 8)),  # below, N // 8: 8 batches an epoch -> ceil(500 / 8) = 63 epochs
    (318, 10, (63, 39, 8)),  # the demo's train split
    (7, 10, (72, 1, 7)),  # 7 rows: batch 1, 7 steps an epoch -> ceil(500 / 7) = 72 epochs
    (1, 10, (500, 1, 1)),
])
def test_auto_schedule(n, ref, want):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults never warn
        p = plan_schedule(n, "auto", "auto", ref)
    assert (p.epochs, p.batch_size, p.batches_per_epoch) == want
    assert p.steps == want[0] * want[2] and p.steps >= 500 and p.auto == ("epochs", "batch_size")


def test_explicit_settings_are_kept_and_checked():
    p = plan_schedule(5_000, 30, 64, 10)  # 78 batches x 30 = 2,340 steps: no warning
    assert (p.epochs, p.batch_size, p.steps, p.auto) == (30, 64, 2_340, ())
    with pytest.warns(FewStepsWarning, match=r"10 epochs of 8 batch\(es\) of 39 rows are only 80 optimiser steps"):
        p = plan_schedule(318, 10, "auto", 10)  # CRT(epochs=10) on the demo
    assert (p.epochs, p.batch_size, p.auto) == (10, 39, ("batch_size",))
    with pytest.raises(ValueError, match=r"batch_size=512 is larger than the 318 train rows"):
        plan_schedule(318, "auto", 512, 10)
    with pytest.raises(ValueError, match="no train rows"):
        plan_schedule(0, "auto", "auto", 10)


# -- library -----------------------------------------------------------------------------------
def test_library_defaults_fit_a_small_file(small):
    (X, y), (Xv, yv) = small["splits"]["train"], small["splits"]["val"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crt = CRT(device="cpu").fit(X, y, Xv, yv)
        lws = LWS(small["weight"], small["bias"], device="cpu").fit(X, y, Xv, yv)
        grid = CRTGrid(CRT(device="cpu"), [0.1, 0.2], [5e-4]).fit(X, y, Xv, yv)
    for head in (crt, lws, grid.best_estimator_):
        s = head.schedule_
        assert (s.epochs, s.batch_size, s.batches_per_epoch) == (63, 18, 8)  # 146 // 8 = 18; ceil(500 / 8)
        assert len(head.history_.lr) == 63 and len(head.history_.val) == 63  # one entry per epoch run
    with pytest.raises(ValueError, match="batch_size=512 is larger than the 146 train rows"):
        CRT(batch_size=512, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="batch_size=200 is larger"):
        LWS(small["weight"], small["bias"], batch_size=200, device="cpu").fit(X, y)
    with pytest.warns(FewStepsWarning, match="only 24 optimiser steps"):  # 3 epochs x 8 batches
        CRT(epochs=3, device="cpu").fit(X, y)


def test_small_file_gets_enough_steps(small):
    """The default cRT lands at NCM or above, and LWS lifts few-shot accuracy over the joint head."""
    from lt_rebalance.metrics import evaluate

    (X, y), (Xv, yv), (Xt, yt) = (small["splits"][s] for s in ("train", "val", "test"))
    counts = torch.as_tensor(COUNTS)
    # the reference's fixed schedule: one full-batch step per epoch, 10 steps in all
    with pytest.warns(FewStepsWarning):
        under = CRT(epochs=10, batch_size=146, device="cpu").fit(X, y, Xv, yv)
    crt = CRT(device="cpu").fit(X, y, Xv, yv)
    ncm_acc = _ncm_accuracy(X, y, Xt, yt)
    acc = lambda h: (np.asarray(h.predict(Xt)) == yt).mean()  # noqa: E731
    assert acc(crt) >= ncm_acc - 0.03 and acc(crt) > acc(under) + 0.2  # 10 steps: 49 %, 504: 82 % (NCM 84 %)
    joint_few = evaluate(torch.as_tensor(Xt @ small["weight"].T + small["bias"]), yt, counts, many=30, few=10)["few"]
    lws = LWS(small["weight"], small["bias"], device="cpu").fit(X, y, Xv, yv)
    assert lws.evaluate(Xt, yt, counts, many=30, few=10)["few"] > joint_few


def _ncm_accuracy(X, y, Xt, yt):
    """Nearest class mean, cl2n, in numpy (an independent reference for the test above)."""
    mu = X.mean(0)
    z = (X - mu) / np.linalg.norm(X - mu, axis=1, keepdims=True)
    cent = np.stack([z[y == c].mean(0) for c in range(C)])
    zt = (Xt - mu) / np.linalg.norm(Xt - mu, axis=1, keepdims=True)
    return (((zt[:, None] - cent[None]) ** 2).sum(2).argmin(1) == yt).mean()


# -- CLI: defaults and explicit values ---------------------------------------------------------
def test_compare_with_no_flags_on_a_small_file(small):
    doc, err = run_json(["compare", "-f", small["file"], "-q"])
    assert [r["method"] for r in doc["rows"]] == list(DEFAULT_METHODS) and doc["skipped"] == []
    doc_wb, err_wb = run_json(["compare", "-f", small["file"], "--methods", "wb", "-q"])  # wb runs when named
    params = {r["method"]: r["params"] for r in doc["rows"] + doc_wb["rows"] if "params" in r}
    for m in ("crt", "lws", "marc", "wb"):  # wb: the authors' batch 64 shrinks to N // 8 as well
        assert (params[m]["epochs"], params[m]["batch_size"], params[m]["steps"]) == (63, 18, 504)
        assert params[m]["auto"] == ["epochs", "batch_size"]
    assert "warning" not in err + err_wb
    assert all(r["test"]["many"] is not None for r in doc["rows"])  # the file's thresholds: many > 30


def test_thresholds_recorded_in_the_file_and_empty_groups_warned(small, tmp_path):
    """--many/--few > the file's shot_many/shot_few > 100/20; an empty group is one warning line."""
    doc, err = run_json(["joint", "-f", small["file"], "-q"])
    groups = {g: sum(1 for n in COUNTS if (n > 30 if g == "many" else n < 10 if g == "few" else 10 <= n <= 30))
              for g in ("many", "medium", "few")}
    assert groups == {"many": 2, "medium": 2, "few": 2} and err == ""
    info, _ = run_json(["info", small["file"]])
    assert info["groups"] == groups and info["shot_thresholds"] == {"many": 30, "few": 10}
    doc, err = run_json(["joint", "-f", small["random"], "-q"])  # no thresholds recorded: 100 / 20
    assert doc["test"]["many"] is None
    assert "no many-shot classes under many > 100, few < 20 train images (largest class 60)" in err
    doc, err = run_json(["joint", "-f", small["random"], "--many", "30", "--few", "10", "-q"])
    assert doc["test"]["many"] is not None and "shot classes" not in err


@pytest.mark.parametrize("args", [
    ["crt", "--epochs", "auto", "--batch-size", "auto"],
    ["calibrate", "--method", "crt"],
    ["calibrate", "--method", "lws", "--epochs", "600"],
])
def test_trained_commands_default_on_a_small_file(small, args):
    doc, err = run_json([*args, "-f", small["file"], "-q"])
    assert "warning" not in err
    if args[0] != "calibrate":
        assert doc["params"]["batch_size"] == 18 and doc["params"]["steps"] >= 500


def test_explicit_values_warn_or_fail_naming_the_flag(small):
    doc, err = run_json(["crt", "-f", small["file"], "--epochs", "4", "-q"])
    assert doc["params"]["epochs"] == 4 and doc["params"]["steps"] == 32
    assert "warning: 4 epochs of 8 batch(es) of 18 rows are only 32 optimiser steps" in err
    for args in (["crt"], ["lws"], ["compare"], ["compare", "--methods", "crt"], ["calibrate", "--method", "lws"],
                 ["plot", "per-class", "--methods", "joint,crt"]):
        r = run([*args, "-f", small["file"], "--batch-size", "147"], code=2)
        assert "--batch-size" in r.output and "larger than the 146 train rows" in r.output, args


def test_options_a_method_does_not_use_never_block_it(small, tmp_path):
    doc, _ = run_json(["compare", "-f", small["file"], "--methods", "joint,tau", "--batch-size", "100000", "-q"])
    assert [r["method"] for r in doc["rows"]] == ["joint", "tau_norm"]
    run(["calibrate", "-f", small["file"], "--method", "ncm", "--batch-size", "100000", "-q"])
    pytest.importorskip("matplotlib")
    run(["plot", "per-class", "-f", small["file"], "--methods", "joint,ncm", "--batch-size", "100000",
         "--out", tmp_path / "p.png", "-q"])


# -- names -------------------------------------------------------------------------------------
def test_one_name_per_method():
    from lt_rebalance import registry

    assert tuple(m.name for m in registry.METHODS) == METHOD_NAMES
    assert len(set(registry.ALIASES) | set(METHOD_NAMES)) == len(registry.ALIASES) + len(METHOD_NAMES)
    for name in METHOD_NAMES:  # every runner exists and takes a session first
        assert callable(registry.runner(name))
    assert [canonical_method(a) for a in ("tau", "tau-norm", "TAU_NORM", "logit-adjust", "pc-softmax")] == [
        "tau_norm", "tau_norm", "tau_norm", "logit_adjust", "pc_softmax"]
    assert parse_methods("joint, tau,tau_norm,crt") == ["joint", "tau_norm", "crt"]
    with pytest.raises(ValueError, match="unknown method 'taunorm'"):
        canonical_method("taunorm")


def test_calibrate_accepts_canonical_names_and_aliases(small):
    a, _ = run_json(["calibrate", "-f", small["file"], "--method", "tau_norm"])
    b, _ = run_json(["calibrate", "-f", small["file"], "--method", "tau"])
    assert a == b and a["base_method"] == "tau_norm"
    c, _ = run_json(["calibrate", "-f", small["file"], "--method", "pc_softmax"])
    assert c["base_method"] == "pc_softmax"
    r = run(["calibrate", "-f", small["file"], "--method", "bogus"], code=2)
    assert "unknown method 'bogus'" in r.output and "tau_norm" in r.output


def test_help_lists_every_method_and_valid_ranges():
    out = run(["compare", "--help"]).stdout.replace("\n", " ")
    for m in METHOD_NAMES:
        assert m in out, m
    crt = " ".join(run(["crt", "--help"]).stdout.split())
    for text in ("--epochs INTEGER|auto", "[default: auto; x>=1]", "--momentum FLOAT RANGE", "0<=x<1",
                 "--label-smoothing FLOAT RANGE", "--views INTEGER RANGE", "[default: 0; x>=0]", "[x>0]",
                 "--batch-size INTEGER|auto", "at least 500 optimiser steps", "--many", "--few"):
        assert text in crt, text


def test_negative_rates_are_usage_errors(small):
    for args in (["crt", "--lr", "-0.1"], ["crt", "--lr", "0.1,0"], ["lws", "--weight-decay", "-1"],
                 ["crt", "--momentum", "1"]):
        r = run([*args, "-f", small["file"]], code=2)
        assert args[1] in r.output, args


# -- random-init heads -------------------------------------------------------------------------
def test_random_init_head_is_recorded_and_shown(small):
    assert not FeatureStore(small["file"]).head_random_init
    for key in ("random", "legacy"):
        assert FeatureStore(small[key]).head_random_init, key
        doc, _ = run_json(["info", small[key]])
        assert doc["head_random_init"] is True and doc["has_head"] is True
    assert "random-init" in run(["info", small["random"]]).stdout
    with h5py.File(small["random"], "r") as f:
        assert bool(f["head"].attrs["random_init"]) is True
    for args in (["joint"], ["calibrate", "--method", "tau"]):  # head-based commands say it on stderr
        r = run([*args, "-f", small["random"], "-q"])
        assert r.stderr.startswith("warning: ") and "random initialisation" in r.stderr, args
    assert run(["joint", "-f", small["file"], "-q"]).stderr == ""


def test_compare_skips_or_marks_methods_on_a_random_head(small):
    doc, _ = run_json(["compare", "-f", small["random"], "-q"])
    assert [r["method"] for r in doc["rows"]] == ["ncm", "crt"]
    assert {s["method"] for s in doc["skipped"]} == {"joint", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc"}
    assert all("random initialisation" in s["reason"] for s in doc["skipped"])
    doc, _ = run_json(["compare", "-f", small["random"], "--methods", "joint,ncm", "-q"])
    notes = {r["method"]: r.get("note") for r in doc["rows"]}
    assert "random initialisation" in notes["joint"] and notes["ncm"] is None
    table = run(["compare", "-f", small["random"], "--methods", "joint,ncm", "-q"]).stdout
    assert "joint*" in table and "(* the stored classifier is a random initialisation" in table


# -- import, demo ------------------------------------------------------------------------------
def test_import_prints_wrote_once(small, tmp_path):
    (X, y), (Xt, yt) = small["splits"]["train"], small["splits"]["test"]
    np.savez(tmp_path / "a.npz", x_train=X, y_train=y, x_test=Xt, y_test=yt)
    r = run(["import", "--npz", tmp_path / "a.npz", "--out", tmp_path / "a.h5"])
    lines = (r.stdout + r.stderr).splitlines()
    assert [line.split(":")[0] for line in lines] == [f"wrote {tmp_path / 'a.h5'}"] and r.stderr == ""


def test_demo_reproduce_commands_use_its_thresholds(tmp_path):
    from lt_rebalance.commands.demo_pipeline import DemoConfig, reproduce_commands

    cfg = DemoConfig()
    cmds = reproduce_commands(tmp_path, cfg)
    with_features = [c for c in cmds if "--features" in c and not c.startswith("ltr extract")]
    assert len(with_features) == 5
    for c in with_features:
        assert f"--many {cfg.many} --few {cfg.few}" in c, c
        assert "--batch-size" not in c and "--epochs" not in c, c  # auto, as the demo ran
    quick = reproduce_commands(tmp_path, cfg.quick(2))
    assert "--epochs 2" in quick[2] and "--crt-epochs 2 --lws-epochs 2" in quick[1]


# -- extraction progress in logs ------------------------------------------------------------------
def test_log_progress_lines():
    from lt_rebalance.extract.progress import LogProgress

    t = [100.0]
    lines = []
    with LogProgress(1000, lines.append, interval=30, clock=lambda: t[0]) as p:
        p.update(200)  # rows already on disk (resume): not counted in the rate
        for _ in range(4):
            t[0] += 10
            p.update(100)  # 10 images/s
    # one line at t = 130 s: 500 done, (500 - 200) / 30 s = 10 images/s, 500 left -> 50 s
    assert lines[0] == "extracting: 500/1,000 images (50.0%), 10.0 images/s, ETA 50s"
    assert lines[1] == "extracting: 600/1,000 images done in 40s (10.0 images/s)" and len(lines) == 2


def test_extract_logs_progress_when_stderr_is_not_a_terminal(image_folder, tmp_path):
    r = CliRunner().invoke(main, ["extract", "--model", "tiny_cnn", "--random-init", "--data", "imagefolder",
                                  "--root", str(image_folder), "--out", str(tmp_path / "f.h5"), "--image-size", "16",
                                  "--workers", "0", "--device", "cpu", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    last = [line for line in r.stderr.splitlines() if line.startswith("extracting:")]
    assert last and "images done in" in last[-1] and "images/s" in last[-1]
    store = FeatureStore(tmp_path / "f.h5")
    assert store.has_head and store.head_random_init


# -- export snippet ------------------------------------------------------------------------------
def test_export_snippet_loads_tiny_cnn_in_a_fresh_interpreter(tmp_path):
    from lt_rebalance.extract.backbones import create_backbone
    from lt_rebalance.extract.checkpoints import file_sha256

    torch.manual_seed(0)
    model = create_backbone("tiny_cnn", num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "stage1.pth")
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
    y = torch.arange(24) % 3
    write_features(tmp_path / "f.h5", {"train": (feats, y), "test": (feats, y)}, weight=model.fc.weight.detach(),
                   bias=model.fc.bias.detach(), model="tiny_cnn", checkpoint_sha256=file_sha256(tmp_path / "stage1.pth"))
    run(["ncm", "-f", tmp_path / "f.h5", "--variant", "un", "--save", tmp_path / "ncm.pt", "-q"])
    doc, _ = run_json(["export", "--head", tmp_path / "ncm.pt", "-f", tmp_path / "f.h5", "--checkpoint",
                       tmp_path / "stage1.pth", "--out", tmp_path / "model.pth", "-q"])
    assert "import lt_rebalance.extract.tiny_cnn" in doc["load_snippet"]
    torch.save(images, tmp_path / "images.pt")
    code = doc["load_snippet"] + "\nimport torch\nprint(model(torch.load('images.pt')).argmax(1).tolist())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the NCM 'un' head as its exported linear layer: argmax of -||x - c_j||^2, computed here
    cent = torch.stack([feats[y == c].mean(0) for c in range(3)])
    assert json.loads(out.stdout) == torch.cdist(feats, cent).argmin(1).tolist()


# -- library input checks ----------------------------------------------------------------------------
def test_inputs_that_do_not_fit_together_name_the_argument(tmp_path):
    from lt_rebalance.heads import NCM, JointHead, TauNorm, tau_sweep
    from lt_rebalance.posthoc import LogitAdjustment

    g = torch.Generator().manual_seed(0)
    W, X, y = torch.randn(5, 3, generator=g), torch.randn(20, 3, generator=g), torch.arange(20) % 4
    with pytest.raises(ValueError, match=r"counts must have one entry per class \(5, the rows of the weight\); got shape \(4,\)"):
        TauNorm(W).fit(X, y, torch.ones(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        tau_sweep(X, y + 2, W, torch.ones(5), [0.0, 1.0])
    with pytest.raises(ValueError, match="counts must have one entry per class"):
        LogitAdjustment(JointHead(W).fit(), torch.ones(6)).fit(X, y)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        LWS(W, torch.zeros(4), device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        JointHead(torch.zeros(5)).fit()
    with pytest.raises(ValueError, match="Unknown label type: continuous.*such as .*0.5"):
        NCM().fit(X, y.double() + 0.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\); got range \[-1, 2\]"):
        tau_sweep(X, y - 1, W, torch.ones(5), [0.0])  # the weight's rows are classes 0..4
    with pytest.raises(ValueError, match=r"X is a tensor that requires grad; pass X.detach\(\)"):
        NCM().fit(X.clone().requires_grad_(), y)
    with pytest.raises(ValueError, match="weight is a tensor that requires grad"):
        TauNorm(W.clone().requires_grad_(), tau=1.0).fit()
    assert NCM().fit(X, y.double()).centroids_.shape == (4, 3)  # whole-number floats are fine
    with pytest.raises(ValueError, match="labels of split 'train' must be whole class indices; got 0.5"):
        write_features(tmp_path / "f.h5", {"train": (X, np.array([0.5] * 20))})
    with pytest.raises(ValueError, match="labels of split 'test' must be class indices >= 0; got -2"):
        write_features(tmp_path / "f.h5", {"train": (X, y), "test": (X, y - 2)})
    assert not (tmp_path / "f.h5").exists()


def test_help_text_states_the_library_rule():
    from lt_rebalance.commands.options import BATCH_AUTO_HELP, EPOCHS_AUTO_HELP
    from lt_rebalance.heads.training import DEFAULT_BATCH_SIZE, MIN_BATCHES_PER_EPOCH, MIN_STEPS

    assert f"at least {MIN_STEPS} optimiser steps" in EPOCHS_AUTO_HELP
    assert f"auto: {DEFAULT_BATCH_SIZE}, or N // {MIN_BATCHES_PER_EPOCH} for N < {DEFAULT_BATCH_SIZE * MIN_BATCHES_PER_EPOCH}" in BATCH_AUTO_HELP
