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
    accuracy against class size for every method and the classifier weight norms, per file.
    Needs matplotlib.
    """
    from ..plots import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    fmt = fmt or ("md" if Path(out).suffix.lower() in (".md", ".markdown") else "html")
    check_writable(out, overwrite, features)
    from ..report import build_report, write_report

    heads: dict = {}
    result, sessions = run_compare_command(features, allow_incomplete, methods, overrides, thresholds, splits, seed,
                                           seeds, protocol, device, quiet, heads=heads, max_memory=max_memory,
                                           precision=precision)
    page = build_report(result, sessions, list(features), heads)
    written = write_report(page, out, fmt, overwrite, features)
    log(f"wrote {written[0]}" + (f" and {len(written) - 1} figures" if len(written) > 1 else ""), quiet or as_json)
    emit({"report": str(written[0]), "format": fmt, "figures": [str(p) for p in written[1:]], "compare": result},
         as_json, lambda r: f"wrote {r['report']}")
