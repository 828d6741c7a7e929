"""``ltr plot``: figures of a feature file or a results file (thin wrappers over :mod:`lt_rebalance.plots`)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..registry import METHOD_NAMES, TRAINED_METHODS
from .errors import handle_user_errors
from .options import (
    MethodNames,
    device_option,
    features_option,
    json_option,
    quiet_option,
    seed_option,
    thresholds_options,
    training_options,
)
from .render import emit, log
from .setup import check_training_fits, check_writable, open_store


def _out_options(default: str) -> Callable:
    def decorate(f: Callable) -> Callable:
        f = click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")(f)
        f = click.option("--out", default=default, show_default=True, type=click.Path(dir_okay=False),
                         help="Image file; the suffix picks the format (.png, .pdf, .svg).")(f)
        return quiet_option(json_option(f))

    return decorate


def _feature_options(f: Callable) -> Callable:
    """--features, the shot-group thresholds, --seed and --device; the command gets ``ctx`` instead."""
    @functools.wraps(f)
    def wrapper(features: str, thresholds: dict, seed: int, device: str, **kwargs: Any) -> Any:
        from ..session import Session

        store = open_store(features)
        ctx = Session(store, device=device, seed=seed, thresholds=thresholds)
        return f(ctx=ctx, **kwargs)

    for opt in (device_option, seed_option, thresholds_options, features_option):
        wrapper = opt(wrapper)
    return wrapper


def _done(kind: str, path: Any, as_json: bool, quiet: bool) -> None:
    log(f"wrote {path}", quiet or as_json)
    if as_json:
        emit({"plot": kind, "out": str(path)}, True, str)


def _plot_command(name: str) -> Callable:
    """A subcommand of ``plot`` that turns a missing matplotlib into one ``Error:`` line."""
    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(**kwargs: Any) -> Any:
            from ..plots import require_matplotlib

            try:
                require_matplotlib()
            except ImportError as e:
                raise click.ClickException(str(e)) from None
            return f(**kwargs)

        return plot.command(name)(handle_user_errors(wrapper))

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def plot() -> None:
    """Figures (PNG by default; needs matplotlib): tau-curve, norms, per-class, compare."""


@_plot_command("tau-curve")
@_feature_options
@_out_options("tau-curve.png")
def tau_curve(ctx, out: str, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Accuracy vs tau on val and test, per shot group, the tau selected on val marked."""
    from ..plots import plot_tau_curve

    check_writable(out, overwrite, [ctx.store.path])
    _done("tau-curve", plot_tau_curve(ctx, out, overwrite), as_json, quiet)


@_plot_command("norms")
@_feature_options
@click.option("--head", "head_path", type=click.Path(dir_okay=False),
              help="A saved re-balanced head (`ltr crt --save crt.pt`) shown instead of training cRT.")
@training_options
@_out_options("norms.png")
def norms(ctx, head_path: Optional[str], overrides: dict, out: str, overwrite: bool, as_json: bool,
          quiet: bool) -> None:
    """Per-class weight norm vs training images (log x): joint vs re-balanced heads."""
    from ..head_io import check_head_fits, load_head
    from ..plots import plot_norms

    check_writable(out, overwrite, [ctx.store.path, head_path])
    head = load_head(head_path) if head_path else None
    if head is not None:
        check_head_fits(head, head_path, ctx.store)
    check_training_fits(ctx.store, overrides, ("lws",) if head_path else TRAINED_METHODS)
    _done("norms", plot_norms(ctx, out, head, overrides, overwrite), as_json, quiet)


@_plot_command("per-class")
@_feature_options
@click.option("--methods", default="joint,crt,tau_norm", show_default=True, type=MethodNames(),
              help=f"Comma-separated methods: {', '.join(METHOD_NAMES)} (old spellings such as tau accepted).")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@training_options
@_out_options("per-class.png")
def per_class(ctx, methods: str, split: str, overrides: dict, out: str, overwrite: bool, as_json: bool,
              quiet: bool) -> None:
    """Per-class accuracy of each method, classes sorted by training images."""
    from ..plots import plot_per_class

    check_writable(out, overwrite, [ctx.store.path])
    check_training_fits(ctx.store, overrides, methods)
    path = plot_per_class(ctx, out, methods, split, overrides, overwrite)
    _done("per-class", path, as_json, quiet)


_RESULTS_HINT = ("`ltr plot compare` draws a results file, not a feature file: run `ltr compare -f FEATURES "
                 "--out results.json`, then `ltr plot compare --results results.json`")


def _results_needed(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> str:
    if value is None:
        raise click.UsageError(f"Missing option '--results'. {_RESULTS_HINT}", ctx)
    return value


def _no_features(ctx: click.Context, param: click.Parameter, value: tuple) -> None:
    if value:
        raise click.UsageError(f"--features/-f is not an option of this command: {_RESULTS_HINT}", ctx)


@_plot_command("compare")
@click.option("--results", callback=_results_needed, type=click.Path(exists=True, dir_okay=False),
              help="JSON of `ltr compare --out` or the demo's results.json.  [required]")
@click.option("--features", "-f", "features", multiple=True, hidden=True, expose_value=False, callback=_no_features,
              is_eager=True)
@click.option("--split", default=None, help="Split to show [default: test when present].")
@_out_options("compare.png")
def compare(results: str, split: Optional[str], out: str, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Grouped bars: many / medium / few / all accuracy per method."""
    from ..plots import plot_compare

    check_writable(out, overwrite, [results])
    try:
        result = json.loads(Path(results).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise click.ClickException(f"{results} is not a JSON results file ({e}); write one with "
                                   "`ltr compare --out results.json`") from None
    _done("compare", plot_compare(result, out, split, overwrite), as_json, quiet)
