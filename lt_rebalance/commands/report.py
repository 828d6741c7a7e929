"""``ltr report``: one self-contained page (HTML, or Markdown with PNGs) of a compare run."""
from __future__ import annotations

from pathlib import Path

import click

from .compare import compare_options, run_compare_command
from .errors import handle_user_errors
from .render import emit, log
from .setup import check_writable


@click.command()
@compare_options
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The page to write, e.g. report.html (Markdown: report.md, figures in report_figures/).")
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default=None,
              help="html (one self-contained file) or md (Markdown with PNG figures beside it) "
                   "[default: from the --out suffix, else html].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (and its figures).")
@handle_user_errors
def report(features, out, fmt, overwrite, as_json, quiet, allow_incomplete, methods, overrides, thresholds, splits,
           seed, seeds, protocol, device, max_memory, precision):
    """The compare table(s), intervals and shifted priors when asked, and the figures, on one page.

    Runs `ltr compare` with the same options (its numbers), then draws the tau curve, per-class
    accuracy against class size for every method and the classifier weight norms, per file
    (with matplotlib; without it the page has the tables only).
    """
    from ..plots import require_matplotlib

    try:
        require_matplotlib()
        figures = True
    except ImportError as e:
        log(f"warning: {e}; writing the tables only", quiet or as_json)
        figures = False
    suffix = Path(out).suffix.lower()
    if fmt is None and suffix not in ("", ".html", ".htm", ".md", ".markdown"):
        raise click.BadParameter(f"{out}: the report is HTML (.html) or Markdown (.md), not {suffix}; for a PDF, "
                                 "write report.html and print it from a browser (or pass --format html)",
                                 param_hint="--out")
    fmt = fmt or ("md" if suffix in (".md", ".markdown") else "html")
    check_writable(out, overwrite, features)
    from ..report import build_report, write_report

    heads: dict = {}
    result, sessions = run_compare_command(features, allow_incomplete, methods, overrides, thresholds, splits, seed,
                                           seeds, protocol, device, quiet, heads=heads, max_memory=max_memory,
                                           precision=precision)
    page = build_report(result, sessions, list(features), heads, figures=figures)
    written = write_report(page, out, fmt, overwrite, features)
    log(f"wrote {written[0]}" + (f" and {len(written) - 1} figures" if len(written) > 1 else ""), quiet or as_json)
    emit({"report": str(written[0]), "format": fmt, "figures": [str(p) for p in written[1:]], "compare": result},
         as_json, lambda r: f"wrote {r['report']}")
