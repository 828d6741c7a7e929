"""ltr demo end to end on the reduced setting, and its refusals and install hints."""
import importlib.util
import json

import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ltr-demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "2", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@needs_sklearn
def test_results_have_every_method_and_group(demo_run):
    from lt_rebalance.experiments import DEFAULT_METHODS

    out, result = demo_run
    assert json.loads((out / "results.json").read_text()) == result
    assert [r["method"] for r in result["rows"]] == list(DEFAULT_METHODS)
    for row in result["rows"]:
        for split in ("val", "test"):
            assert all(row[split][g] is not None for g in ("many", "medium", "few", "all")), (row["method"], split)
    d = result["demo"]
    assert all(n > 0 for n in d["groups"].values()) and sum(d["groups"].values()) == 10
    assert d["extract"]["rows"] == {"train": sum(d["counts"]), "val": 300, "test": 400}
    assert result["summary"] and result["reproduce"][0].startswith("ltr extract --model tiny_cnn --data imagefolder")


@needs_sklearn
def test_outputs_written(demo_run):
    from lt_rebalance.store import FeatureStore

    out, result = demo_run
    for name in ("stage1.pth", "features.h5", "crt.pt", "results.json"):
        assert (out / name).stat().st_size > 0
    store = FeatureStore(out / "features.h5")
    assert store.has_head and store.attrs["model"] == "tiny_cnn" and store.attrs["checkpoint_sha256"]
    if result["demo"]["plots"]:
        from test_plots import SIZE, png_size

        assert sorted(p.rsplit("/", 1)[-1] for p in result["demo"]["plots"]) == [
            "compare.png", "norms.png", "per-class.png", "tau-curve.png"]
        assert all(png_size(out / p.rsplit("/", 1)[-1]) == SIZE for p in result["demo"]["plots"])


@needs_sklearn
def test_plot_commands_on_demo_output(demo_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = demo_run
    r = CliRunner().invoke(main, ["plot", "norms", "-f", str(out / "features.h5"), "--head", str(out / "crt.pt"),
                                  "--many", "40", "--few", "10", "--batch-size", "32", "--out", str(tmp_path / "n.png"), "-q"])
    assert r.exit_code == 0, r.output


@needs_sklearn
def test_existing_out_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick"])
    assert r.exit_code == 1 and "exists; pass --overwrite" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--overwrite"])
    assert r.exit_code == 1 and "did not write (mine.txt)" in r.output
    assert (out / "mine.txt").read_text() == "keep me"


def test_overwrite_replaces_a_demo_folder(tmp_path):
    from lt_rebalance.demo import prepare_out

    out = tmp_path / "old"
    (out / "images").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    prepare_out(out, overwrite=True)
    assert not out.exists()


def test_missing_sklearn_hint(tmp_path, monkeypatch):
    from test_plots import block_import

    block_import(monkeypatch, "sklearn")
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d")])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: the demo needs scikit-learn") and 'pip install "lt-rebalance[demo]"' in r.output
    assert not (tmp_path / "d").exists()
