"""``ltr report`` (issue 14): a self-contained page whose numbers are those of ``ltr compare --json``."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

from protocol_support import protocol_files as files  # noqa: E402,F401  (the feature files fixture)

ARGS = ["--methods", "joint,ncm,tau_norm,crt", "--crt-epochs", "1", "--batch-size", "32", "-q",
        "--bootstrap", "60", "--test-priors", "forward-5,uniform"]


class Cells(HTMLParser):
    """Collects data-value cells by (split, method, metric), shifted cells by (method, scores, prior), tags."""

    def __init__(self):
        super().__init__()
        self.row, self.values, self.shifted, self.tags, self.images = {}, {}, {}, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr":
            self.row = a
        elif tag == "td" and "data-value" in a:
            if "data-metric" in a and "data-split" in self.row:
                self.values[(self.row["data-split"], self.row["data-method"], a["data-metric"])] = float(a["data-value"])
            if "data-prior" in a:
                self.shifted[(self.row["data-method"], self.row["data-scores"], a["data-prior"])] = float(a["data-value"])
        elif tag == "img":
            self.images.append(a["src"])


@pytest.fixture(scope="module")
def page(files, tmp_path_factory):  # noqa: F811
    paths, _ = files
    out = tmp_path_factory.mktemp("report") / "report.html"
    res = CliRunner().invoke(main, ["report", "-f", paths["a"], "--out", str(out), *ARGS, "--json"])
    assert res.exit_code == 0, res.output
    cmp = CliRunner().invoke(main, ["compare", "-f", paths["a"], *ARGS, "--json"])
    assert cmp.exit_code == 0, cmp.output
    return out, json.loads(res.stdout), json.loads(cmp.stdout)


def test_html_numbers_are_those_of_compare(page):
    out, doc, cmp = page
    text = out.read_text(encoding="utf-8")
    parser = Cells()
    parser.feed(text)
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(doc["compare"]["rows"]) == strip(cmp["rows"])  # the report runs compare
    checked = 0
    for r in cmp["rows"]:
        for split in cmp["eval_splits"]:
            for k in ("many", "medium", "few", "all", "mean_class", "worst_class", "worst_10pct", "hmean"):
                v = r[split][k]
                if v is not None:
                    assert parser.values[(split, r["method"], k)] == pytest.approx(v, abs=1e-12)
                    checked += 1
            assert parser.values[(split, r["method"], "diff")] == pytest.approx(r["vs_best"][split]["diff"])
        for prior in ("forward-5", "uniform"):
            assert parser.shifted[(r["method"], "plain", prior)] == pytest.approx(r["shifted"][prior]["all"])
            em = r["shifted_corrected"][prior]["em"]["all"]
            assert parser.shifted[(r["method"], "EM prior", prior)] == pytest.approx(em)
    assert checked >= 4 * 2 * 7


def test_html_describes_the_train_imbalance(page):
    from protocol_support import COUNTS

    out, _, _ = page
    text = out.read_text(encoding="utf-8")
    n = COUNTS.astype(float)  # 120 80 40 25 12 6: factor 20, the ceil(6 / 5) = 2 largest hold 200 / 283
    gini = np.abs(n[:, None] - n[None, :]).sum() / (2 * len(n) * n.sum())
    cells = {m: float(v) for v, m in re.findall(r'data-value="([^"]+)" data-metric="(imbalance_factor|gini|'
                                                  r'top20_share)"', text)}
    assert cells == pytest.approx({"imbalance_factor": 20.0, "gini": gini, "top20_share": 200 / 283})
    assert "imbalance factor" in text and "Gini" in text


def test_html_is_self_contained(page):
    out, _, _ = page
    text = out.read_text(encoding="utf-8")
    parser = Cells()
    parser.feed(text)
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing fetched from the network
    # tau curve, per-class accuracy, weight norms: SVG data URIs
    assert len(parser.images) == 4  # τ curve, per-class, norms, accuracy against the shifted priors
    assert "Accuracy against the shifted test prior" in text
    for src in parser.images:
        assert src.startswith("data:image/svg+xml;base64,")
        assert b"<svg" in base64.b64decode(src.split(",", 1)[1])
    assert "@media print" in text


def test_markdown_with_png_figures(files, tmp_path):  # noqa: F811
    paths, _ = files
    out = tmp_path / "report.md"
    res = CliRunner().invoke(main, ["report", "-f", paths["a"], "--out", str(out), "--methods", "joint",
                                    "--batch-size", "32", "-q", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["format"] == "md" and len(doc["figures"]) == 3
    text = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3 and all(link.startswith("report_figures/") for link in links)
    for link in links:
        assert (tmp_path / link).read_bytes().startswith(b"\x89PNG")
    joint = doc["compare"]["rows"][0]
    assert f"| joint | {100 * joint['test']['many']:.2f} |" in text
    again = CliRunner().invoke(main, ["report", "-f", paths["a"], "--out", str(out), "--methods", "joint"])
    assert again.exit_code == 1 and "already exists" in again.output


def test_tables_group_several_files():
    from lt_rebalance.report import _html_table, _md_table, compare_tables

    def row(path, method, acc):
        return {"method": method, "features": path, "seconds": 0.5,
                "test": {"many": acc, "medium": acc, "few": None, "all": acc, "mean_class": acc}}

    result = {"eval_splits": ["test"], "features": ["a.h5", "b.h5"],
              "rows": [row("a.h5", "joint", 0.5), row("a.h5", "ncm", 0.625), row("b.h5", "joint", 0.75)]}
    (table,) = compare_tables(result)
    assert table.header[:2] == ["features", "method"]
    assert [[c.text for c in r[:6]] for r in table.rows] == [
        ["a.h5", "joint", "50.00", "50.00", "–", "50.00"], ["a.h5", "ncm", "62.50", "62.50", "–", "62.50"],
        ["b.h5", "joint", "75.00", "75.00", "–", "75.00"]]
    html = _html_table(table)
    assert html.count('data-features="a.h5"') == 2 and 'data-value="0.625"' in html
    assert "| b.h5 | joint | 75.00 |" in _md_table(table)


@pytest.mark.parametrize("name", ["r.html", "r.md"])
def test_missing_matplotlib_writes_the_tables_only(files, tmp_path, monkeypatch, name):  # noqa: F811
    paths, _ = files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = CliRunner().invoke(main, ["report", "-f", paths["a"], "--out", str(tmp_path / name), "--methods",
                                    "joint,ncm"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "warning:" in res.output and "pip install" in res.output and "tables only" in res.output
    text = (tmp_path / name).read_text()
    assert "Figures omitted: matplotlib is not installed" in text and "joint" in text
    assert "<img" not in text and "![" not in text and not (tmp_path / "r_figures").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) absent")
def test_renders_in_headless_chromium(page, tmp_path):
    out, _, _ = page
    pdf, png = tmp_path / "r.pdf", tmp_path / "r.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}"]
    for extra, target in ((["--print-to-pdf=" + str(pdf), "--no-pdf-header-footer"], pdf),
                          (["--screenshot=" + str(png), "--window-size=1200,1600"], png)):
        proc = subprocess.run([*base, *extra, out.as_uri()], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert target.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(b"%PDF")
    assert png.read_bytes().startswith(b"\x89PNG")
