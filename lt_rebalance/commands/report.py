"""``ltr report``: one self-contained page (HTML, or Markdown with PNGs) of a compare run."""
from __future__ import annotations

from pathlib import Path

import click

from ._common import (
    allow_incomplete_option,
    check_writable,
    device_option,
    emit,
    handle_user_errors,
    json_option,
    log,
    protocol_options,
    quiet_option,
    seed_option,
    seeds_option,
    thresholds_options,
    training_options,
)


@click.command()
@click.option("--features", "-f", "features", required=True, multiple=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="Feature file (.h5); repeat for several stage-1 representations of one dataset.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The page to write, e.g. report.html (Markdown: report.md, figures in report_figures/).")
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default=None,
              help="html (one self-contained file) or md (Markdown with PNG figures beside it) "
                   "[default: from the --out suffix, else html].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (and its figures).")
@json_option
@quiet_option
@allow_incomplete_option
@click.option("--methods", default=None, help="Comma-separated subset (default: all the file supports).")
@training_options
@thresholds_options
@click.option("--splits", default=None, help="Comma-separated splits to evaluate (default: val and test).")
@seed_option
@seeds_option
@protocol_options
@device_option
@handle_user_errors
def report(features, out, fmt, overwrite, as_json, quiet, allow_incomplete, methods, overrides, thresholds, splits,
           seed, seeds, protocol, device):
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
    check_writable(out, overwrite)
    from ..report import build_report, write_report
    from .compare import run_compare_command

    heads: dict = {}
    result, contexts = run_compare_command(features, allow_incomplete, methods, overrides, thresholds, splits, seed,
                                           seeds, protocol, device, quiet, heads=heads)
    page = build_report(result, contexts, list(features), heads)
    written = write_report(page, out, fmt, overwrite)
    log(f"wrote {written[0]}" + (f" and {len(written) - 1} figures" if len(written) > 1 else ""), quiet or as_json)
    emit({"report": str(written[0]), "format": fmt, "figures": [str(p) for p in written[1:]], "compare": result},
         as_json, lambda r: f"wrote {r['report']}")
