"""ltr plot: every subcommand writes a PNG of the expected size; missing matplotlib is one Error line."""
import builtins
import importlib.util
import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.plots import DPI, FIGSIZE

pytestmark = pytest.mark.usefixtures("torch_one_thread")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def block_import(monkeypatch, package):
    """Make ``import package`` (and its submodules) fail, as if it were not installed."""
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def lt_data_module():
    from data_support import make_long_tailed

    return make_long_tailed(n_max=300, imbalance=60.0)


@pytest.fixture(scope="module")
def feats(tmp_path_factory, lt_data_module):
    from lt_rebalance.store import write_features

    d = lt_data_module
    W = (d["means"] * np.log(d["counts"])[:, None]).astype(np.float32)  # norms grow with class size
    path = tmp_path_factory.mktemp("plots") / "feats.h5"
    write_features(path, {s: (d[f"X_{s}"], d[f"y_{s}"]) for s in ("train", "val", "test")},
                   weight=W, bias=np.zeros(len(W), np.float32))
    return path


def invoke(*args):
    return CliRunner().invoke(main, ["plot", *map(str, args)])


@needs_matplotlib
@pytest.mark.parametrize("kind, extra", [
    ("tau-curve", []),
    ("norms", ["--crt-epochs", 2]),
    ("per-class", ["--methods", "joint,crt,tau,ncm", "--crt-epochs", 2]),
])
def test_feature_plots_write_png(feats, tmp_path, kind, extra):
    out = tmp_path / f"{kind}.png"
    r = invoke(kind, "--features", feats, "--out", out, "--json", *extra)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"plot": kind, "out": str(out)}
    assert out.stat().st_size > 10_000 and png_size(out) == SIZE
    assert invoke(kind, "--features", feats, "--out", out, *extra).exit_code == 1  # exists, no --overwrite


@needs_matplotlib
def test_norms_with_saved_head(feats, tmp_path):
    head = tmp_path / "crt.pt"
    assert CliRunner().invoke(main, ["crt", "-f", str(feats), "--epochs", "2", "--save", str(head), "-q"]).exit_code == 0
    out = tmp_path / "norms.png"
    r = invoke("norms", "--features", feats, "--head", head, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert png_size(out) == SIZE


@needs_matplotlib
def test_compare_plot_from_results(feats, tmp_path):
    results = tmp_path / "results.json"
    r = CliRunner().invoke(main, ["compare", "-f", str(feats), "--crt-epochs", "2", "--lws-epochs", "1",
                                  "--out", str(results), "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "compare.svg"
    assert invoke("compare", "--results", results, "--out", tmp_path / "compare.png").exit_code == 0
    assert png_size(tmp_path / "compare.png") == SIZE
    assert invoke("compare", "--results", results, "--out", out).exit_code == 0
    assert out.read_text().lstrip().startswith("<?xml")


@needs_matplotlib
def test_unknown_method_is_one_error_line(feats, tmp_path):
    r = invoke("per-class", "--features", feats, "--methods", "joint,nope", "--out", tmp_path / "p.png")
    assert r.exit_code == 2 and "Invalid value for '--methods': unknown method 'nope'" in r.output


def test_missing_matplotlib_hint(feats, tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    r = invoke("tau-curve", "--features", feats, "--out", tmp_path / "t.png")
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: plots need matplotlib: pip install")
    assert not (tmp_path / "t.png").exists()
