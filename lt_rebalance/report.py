"""``ltr report``: the compare tables and figures of one or more feature files on one page.

HTML (default): one self-contained file — styles inline, figures embedded as SVG data URIs, no
script, no network — that prints cleanly. Markdown: the same tables, PNG figures in a folder
beside the page. The numbers are those of ``ltr compare --json`` (the same runners); each HTML cell
also carries its exact value in ``data-value``.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ._version import __version__
from .imbalance import group_sizes, imbalance_stats

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .session import Session

METRIC_COLUMNS = ("many", "medium", "few", "all", "mean_class", "worst_class", "worst_10pct", "hmean")
FORMATS = ("html", "md")


@dataclass
class Cell:
    """A table cell: its text, and (numbers) its exact value and what it is."""

    text: str
    value: Optional[float] = None
    attrs: dict = field(default_factory=dict)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    row_attrs: list[dict] = field(default_factory=list)
    note: str = ""


@dataclass
class ReportFigure:
    name: str  # file stem of the Markdown format's PNG
    title: str
    caption: str
    figure: Figure


def _pct(v: Optional[float]) -> str:
    return "–" if v is None or v != v else f"{100 * v:.2f}"


def _num(v: Optional[float], attrs: Optional[dict] = None) -> Cell:
    return Cell(_pct(v), v, attrs or {})


def _ci_cell(ci: Optional[list], attrs: dict) -> Cell:
    if not ci or ci[0] is None:
        return Cell("–", None, attrs)
    return Cell(f"[{_pct(ci[0])}, {_pct(ci[1])}]", None, {**attrs, "data-lo": ci[0], "data-hi": ci[1]})


# -- tables ------------------------------------------------------------------------------------------

def files_table(sessions: Sequence[Session], labels: Sequence[str]) -> Table:
    """One row per feature file: classes, feature dimension, rows per split, classes per shot group, and
    the imbalance of the train counts (:func:`~lt_rebalance.imbalance.imbalance_stats`)."""
    t = sessions[0].group_thresholds
    header = ["features", "model / dataset", "classes", "dim", "rows per split",
              f"many (> {t['many']})", f"medium ({t['few']}–{t['many']})", f"few (< {t['few']})",
              "imbalance factor", "Gini", "top 20 % share (%)"]
    rows = []
    for ctx, label in zip(sessions, labels):
        s = ctx.store
        sizes = group_sizes(ctx.counts, **ctx.group_thresholds)
        splits = ", ".join(f"{name} {info.rows}" for name, info in s.splits.items())
        model = " / ".join(str(s.attrs.get(k) or "–") for k in ("model", "dataset"))
        rows.append([Cell(label), Cell(model),
                     Cell(str(s.num_classes)), Cell(str(s.dim)), Cell(splits),
                     *(Cell(str(sizes[g])) for g in ("many", "medium", "few")), *_imbalance_cells(ctx.counts)])
    note = ("Train imbalance: imbalance factor = largest / smallest class count (classes without train rows left "
            "out); Gini coefficient of the class counts (0: balanced, (C − 1) / C: one class holds every row); "
            "share of the train rows in the largest 20 % of classes.")
    return Table("Feature files, shot groups (classes by training images) and train imbalance", header, rows,
                 note=note)


def _imbalance_cells(counts: Any) -> list[Cell]:
    s = imbalance_stats(counts)
    f, g = s["imbalance_factor"], s["gini"]
    return [Cell("–" if f != f else f"{f:.4g}", f, {"data-metric": "imbalance_factor"}),
            Cell("–" if g != g else f"{g:.3f}", g, {"data-metric": "gini"}),
            _num(s["top20_share"], {"data-metric": "top20_share"})]


def compare_tables(result: dict) -> list[Table]:
    """Per evaluation split: method × many / medium / few / all / mean-class (balanced accuracy) / worst class /
    worst 10 % / harmonic mean of the groups, with intervals if asked."""
    several = isinstance(result.get("features"), list)
    tables = []
    for split in result["eval_splits"]:
        rows_in = [r for r in result["rows"] if r.get(split)]
        has_ci = any(split in (r.get("ci") or {}) for r in rows_in)
        has_vs = any(split in (r.get("vs_best") or {}) for r in rows_in)
        has_seeds = any(r.get("over_seeds") for r in rows_in)
        header = (["features"] if several else []) + ["method", *METRIC_COLUMNS]
        header += ["all: interval"] if has_ci else []
        header += ["all − best", "interval of difference", "verdict"] if has_vs else []
        header += ["all over seeds (mean ± std)"] if has_seeds else []
        header += ["seconds"]
        rows, attrs = [], []
        for r in rows_in:
            a = {"data-split": split, "data-method": r["method"]}
            cells = ([Cell(r.get("features", ""))] if several else []) + [Cell(r["method"])]
            cells += [_num(r[split].get(k), {"data-metric": k}) for k in METRIC_COLUMNS]
            if has_ci:
                cells.append(_ci_cell((r.get("ci") or {}).get(split, {}).get("all"), {"data-metric": "ci_all"}))
            if has_vs:
                vs = (r.get("vs_best") or {}).get(split)
                if vs is None:
                    cells += [Cell("–"), Cell("–"), Cell("")]
                else:
                    is_best = vs["best"] == r["method"] and vs.get("best_features") == r.get("features")
                    verdict = "best" if is_best else ("differs" if vs["differs"] else "not distinguishable")
                    cells += [Cell(f"{100 * vs['diff']:+.2f}", vs["diff"], {"data-metric": "diff"}),
                              _ci_cell(vs["ci"], {"data-metric": "ci_diff"}), Cell(verdict)]
            if has_seeds:
                m = ((r.get("over_seeds") or {}).get(split) or {}).get("all")
                cells.append(Cell(f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f}", m["mean"],
                                  {"data-metric": "seeds_mean"}) if m else Cell("–"))
            cells.append(Cell(f"{r['seconds']:.2f}", r["seconds"]))
            rows.append(cells)
            attrs.append({**a, **({"data-features": r["features"]} if "features" in r else {})})
        note = ""
        p = result.get("protocol") or {}
        if has_ci:
            note = (f"{100 * p.get('ci_level', 0.95):g} % percentile bootstrap intervals, {p.get('bootstrap')} "
                    "resamples of the rows stratified by class; differences to the best method (highest top-1) "
                    "on the same resamples: it differs when the interval excludes 0.")
        if has_seeds:
            seeds = next(r["over_seeds"]["seeds"] for r in rows_in if r.get("over_seeds"))
            note += f" Trained heads over seeds {', '.join(map(str, seeds))}: sample std."
        tables.append(Table(f"Top-1 accuracy (%) on {split}, per shot group", header, rows, attrs, note.strip()))
    return tables


ESTIMATOR_NAMES = {"known_prior": "known", "em": "EM", "bbse": "BBSE", "rlls": "RLLS", "mapls": "MAPLS"}


def shifted_table(result: dict) -> Optional[Table]:
    """Test top-1 under each shifted prior: plain predictions, known-prior and EM-corrected."""
    rows_in = [r for r in result["rows"] if r.get("shifted")]
    if not rows_in:
        return None
    several = isinstance(result.get("features"), list)
    names = list(rows_in[0]["shifted"])
    header = (["features"] if several else []) + ["method", "scores", *names]
    rows, attrs, uncorrected = [], [], []
    for r in rows_in:
        variants = [("plain", r["shifted"])]
        corrected = r.get("shifted_corrected") or {}
        if "reason" in corrected:  # a method without an implied prior: no corrected rows, and why
            uncorrected.append(f"{r['method']}: {corrected['reason']}")
        elif corrected:
            variants += [(f"{ESTIMATOR_NAMES.get(k, k)} prior", {n: c[k] for n, c in corrected.items()})
                         for k in next(iter(corrected.values()))]
        for kind, table in variants:
            cells = ([Cell(r.get("features", ""))] if several else []) + [Cell(r["method"]), Cell(kind)]
            cells += [_num((table.get(n) or {}).get("all"), {"data-prior": n}) for n in names]
            rows.append(cells)
            attrs.append({"data-method": r["method"], "data-scores": kind,
                          **({"data-features": r["features"]} if "features" in r else {})})
    n_rows = ", ".join(f"{n} {rows_in[0]['shifted'][n]['n']}" for n in names)
    note = ("LADE's protocol on the test split: classes ranked by training images; forward-R keeps "
            "int(M·(1/R)^(i/(C−1))) rows of the class at rank i, backward-R the reverse, M the smallest test "
            f"count; rows kept: {n_rows}. Known prior: scores + log p_target − log p_implied; EM: p_target "
            "estimated on the test scores (Saerens et al. 2002).")
    if uncorrected:
        note += " Not corrected (no implied prior): " + "; ".join(uncorrected) + "."
    return Table("Top-1 accuracy (%) under shifted test priors", header, rows, attrs, note)


# -- figures ------------------------------------------------------------------------------------------

def report_figures(ctx: Session, heads: dict[str, Any], stem: str) -> list[ReportFigure]:
    """τ curve (stored classifier), per-class accuracy of every method, weight norms, shot-group bars."""
    from .plots import norms_figure, per_class_figure, tau_curve_figure
    from .runners.sweeps import run_tau_sweep

    figs = []
    if ctx.store.has_head:
        sweep = run_tau_sweep(ctx, select_on="val" if "val" in ctx.store.splits else None).result
        sel = sweep["selected_tau"]
        figs.append(ReportFigure(f"{stem}-tau-curve", "τ-normalisation: accuracy against τ",
                                 "Accuracy per shot group on val and test for every τ"
                                 + (f"; τ = {sel:g} selected on {sweep['selected_on']}." if sel is not None else "."),
                                 tau_curve_figure(ctx, sweep)))
    split = "test" if "test" in ctx.store.splits else ctx.eval_splits[-1]
    figs.append(ReportFigure(f"{stem}-per-class", f"Per-class accuracy on {split} against class size",
                             "Classes sorted by training images (bars, right axis), most first.",
                             per_class_figure(ctx, heads, split)))
    weights: dict[str, Any] = {}
    for name, head in heads.items():
        W = getattr(head, "weight_", None)
        if W is not None and not any(W is w or (W.shape == w.shape and bool((W == w).all()))
                                     for w in weights.values()):
            weights[name] = W  # logit adjustment / PC softmax share the joint weights: shown once
    if weights:
        figs.append(ReportFigure(f"{stem}-norms", "Classifier weight norms against class size",
                                 "‖w_j‖ relative to the mean over classes (Kang et al., Figure 2); NCM has no "
                                 "weight matrix.", norms_figure(ctx, weights)))
    return figs


def svg_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- pages --------------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; margin-top: 1.8em;
       border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
.meta { color: #555; font-size: .9em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .55em; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { font-weight: 600; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
p.note { color: #555; font-size: .85em; max-width: 60em; }
figure { margin: 1em 0; } figure img { width: 100%; max-width: 900px; height: auto; }
figcaption { color: #444; font-size: .9em; }
@media print { body { margin: 0; max-width: none; font-size: 11pt; }
  figure, table { break-inside: avoid; } h2 { break-after: avoid; } }
"""


def _attrs(d: dict) -> str:
    return "".join(f' {k}="{html.escape(str(v))}"' for k, v in d.items())


def _html_table(t: Table) -> str:
    out = [f"<table><caption>{html.escape(t.title)}</caption>",
           "<thead><tr>" + "".join(f"<th scope=\"col\">{html.escape(h)}</th>" for h in t.header) + "</tr></thead>",
           "<tbody>"]
    for i, row in enumerate(t.rows):
        attrs = t.row_attrs[i] if i < len(t.row_attrs) else {}
        best = any(c.text == "best" for c in row)
        cls = ' class="best"' if best else ""
        cells = []
        for c in row:
            numeric = c.value is not None or c.text.startswith("[") or c.text == "–"
            extra = {**({"data-value": repr(float(c.value))} if c.value is not None else {}), **c.attrs}
            cls_num = ' class="num"' if numeric else ""
            cells.append(f"<td{cls_num}{_attrs(extra)}>{html.escape(c.text)}</td>")
        out.append(f"<tr{cls}{_attrs(attrs)}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f'<p class="note">{html.escape(t.note)}</p>')
    return "\n".join(out)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#|~])")


def md_escape(s: str) -> str:
    """Text safe to place in Markdown: HTML markup neutralised (``<`` -> ``&lt;``, as the HTML report
    does), Markdown punctuation backslash-escaped and line breaks flattened, so that file attributes
    (model, dataset, class names) cannot inject links, images, scripts or table cells."""
    flat = " ".join(str(s).splitlines())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(flat, quote=False))


def _md_table(t: Table) -> str:
    esc = md_escape
    lines = [f"**{esc(t.title)}**", "", "| " + " | ".join(esc(h) for h in t.header) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(esc(c.text) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"*{esc(t.note)}*"]
    return "\n".join(lines)


@dataclass
class Report:
    """Everything a page shows: meta lines, tables, and the figures of each file."""

    title: str
    meta: list[str]
    tables: list[Table]
    figures: list[tuple[str, list[ReportFigure]]]  # (features label, figures)


def build_report(result: dict, sessions: Sequence[Session], labels: Sequence[str],
                 heads: dict[str, dict[str, Any]], *, figures: bool = True) -> Report:
    """The page of a :func:`~lt_rebalance.study.compare_files` result and its fitted heads;
    ``figures=False``: tables only (matplotlib missing), said in the page's meta lines."""
    t = result["thresholds"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = [f"lt-rebalance {__version__}, {now}.",
            f"Shot groups by training images: many > {t['many']}, medium {t['few']}–{t['many']}, few < {t['few']}; "
            "group accuracy = mean of per-class accuracies. mean_class is the balanced accuracy; worst_class the "
            "lowest per-class accuracy, worst_10pct the mean of the lowest 10 % (classes with evaluation rows), "
            "hmean the harmonic mean of many/medium/few. Hyper-parameters (τ, epochs kept) selected on val."]
    tables = [files_table(sessions, labels), *compare_tables(result)]
    shifted = shifted_table(result)
    if shifted is not None:
        tables.append(shifted)
    drawn = []
    for k, (ctx, label) in enumerate(zip(sessions, labels) if figures else ()):
        from .plots import shift_figure

        stem = f"f{k + 1}-{Path(label).stem}"
        file_figures = report_figures(ctx, heads.get(label, {}), stem)
        shift = shift_figure([r for r in result["rows"] if r.get("features", label) == label])
        if shift is not None:
            file_figures.append(ReportFigure(
                f"{stem}-shifts", "Accuracy against the shifted test prior",
                "Top-1 on each shifted test subset: plain predictions, and after correcting with each estimated "
                "prior; the true prior's correction is the ceiling.", shift))
        drawn.append((label, file_figures))
    if not figures:
        meta.append("Figures omitted: matplotlib is not installed (pip install matplotlib).")
    return Report("Long-tailed classification report", meta, tables, drawn)


def render_html(report: Report) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(report.title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
             f"<h1>{html.escape(report.title)}</h1>"]
    parts += [f'<p class="meta">{html.escape(m)}</p>' for m in report.meta]
    parts.append('<section id="tables"><h2>Tables</h2>')
    parts += [_html_table(t) for t in report.tables]
    parts.append("</section>")
    for k, (label, figs) in enumerate(report.figures):
        parts.append(f'<section id="figures-{k + 1}"><h2>Figures: {html.escape(label)}</h2>')
        for f in figs:
            parts.append(f'<figure id="{html.escape(f.name)}"><img alt="{html.escape(f.title)}" '
                         f'src="{svg_data_uri(f.figure)}"><figcaption><strong>{html.escape(f.title)}.</strong> '
                         f"{html.escape(f.caption)}</figcaption></figure>")
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def render_markdown(report: Report, figure_dir: str) -> str:
    """Markdown page; figures are referenced as ``figure_dir/<name>.png`` (written by :func:`write_report`)."""
    esc = md_escape
    parts = [f"# {esc(report.title)}", "", *map(esc, report.meta), "", "## Tables", ""]
    for t in report.tables:
        parts += [_md_table(t), ""]
    for label, figs in report.figures:
        parts += [f"## Figures: {esc(label)}", ""]
        for f in figs:
            link = urllib.parse.quote(f"{figure_dir}/{f.name}.png")
            parts += [f"![{esc(f.title)}]({link})", "", f"*{esc(f.title)}.* {esc(f.caption)}", ""]
    return "\n".join(parts)


def write_report(report: Report, out: str | os.PathLike, fmt: str = "html", overwrite: bool = False,
                 inputs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write the page (atomically); for Markdown also ``<out stem>_figures/*.png``. Returns the paths written.

    Neither the page nor a figure may be one of ``inputs`` (the feature files)."""
    from .outputs import check_output
    from .plots import DPI
    from .store import atomic_write

    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = Path(out)
    check_output(out, overwrite, inputs)  # fail before writing any figure
    if fmt == "html":
        text = render_html(report)
        return [atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite, inputs)]
    fig_dir = out.parent / f"{out.stem}_figures"
    if any(figs for _, figs in report.figures):
        fig_dir.mkdir(exist_ok=True)
    written = []
    for _, figs in report.figures:
        for f in figs:
            written.append(atomic_write(fig_dir / f"{f.name}.png",
                                        lambda tmp, f=f: f.figure.savefig(tmp, format="png", dpi=DPI), overwrite,
                                        inputs))
    text = render_markdown(report, fig_dir.name)
    return [atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite, inputs), *written]
