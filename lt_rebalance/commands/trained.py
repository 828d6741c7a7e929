"""The shared body of the trained-method commands (crt, lws, marc, disalign, wb): their options (loss,
protocol, preset), checks, run, tables."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import click
from click.core import ParameterSource

from ._protocol_text import with_protocol
from .errors import handle_user_errors
from .options import common_options, protocol_options, seeds_option, sgd_options, thresholds_options
from .render import emit, fmt_acc, log, metric_splits, trained_human
from .setup import (
    check_batch_fits,
    check_writable,
    make_session,
    per_class_option,
    require_head,
    require_split,
    run_trained,
    save_head_file,
    write_per_class,
)

LAS_SHAPES = ("concave", "linear", "convex")  # lt_rebalance.heads.losses.LAS_SHAPES (no torch here; tested equal)
LOSS_HELP = {
    "ce": "ce: cross-entropy",
    "grw": "grw: generalized re-weighting, class weights ∝ n_j^-RHO",
    "las": "las: label-aware smoothing (MiSLAS), ε from --smooth-head (largest class) to --smooth-tail (smallest)",
    "balanced-softmax": "balanced-softmax: logits + log prior in the loss",
}


def loss_options(losses: Sequence[str], default: Optional[str], default_help: str = "") -> Callable:
    """--loss (one of ``losses``; None: the protocol's, see ``default_help``), --rho (with "grw"),
    --smooth-head, --smooth-tail and --smooth-shape (label-aware smoothing): the head's ``loss``,
    ``rho``, ``smooth_head``, ``smooth_tail``, ``smooth_shape``."""
    opts = [
        click.option("--loss", type=click.Choice(list(losses)), default=default, show_default=default is not None,
                     help="; ".join(LOSS_HELP[x] for x in losses) + "." + default_help),
        *([click.option("--rho", default=1.2, show_default=True, type=click.FloatRange(0),
                        help="GRW exponent ρ (--loss grw): class weights ∝ n_j^-ρ; 0 is plain cross-entropy.")]
          if "grw" in losses else []),
        click.option("--smooth-head", default=0.3, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                     help="Label-aware smoothing ε of the largest class (--loss las)."),
        click.option("--smooth-tail", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                     help="Label-aware smoothing ε of the smallest class (--loss las)."),
        click.option("--smooth-shape", type=click.Choice(list(LAS_SHAPES)), default="concave", show_default=True,
                     help="How ε goes from head to tail with the class count (--loss las; MiSLAS: concave)."),
    ]

    def decorate(f: Callable) -> Callable:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def train_protocol_option(help: str) -> Callable:
    """--protocol paper|authors: the head's ``protocol`` (the command gets ``train_protocol``: ``protocol``
    is the evaluation protocol of :func:`~.options.protocol_options`)."""
    return click.option("--protocol", "train_protocol", type=click.Choice(["paper", "authors"]), default="paper",
                        show_default=True, help=help)


def preset_option(*methods: str) -> Callable:
    """--preset DATASET: the published configuration of ``methods[0]`` (``presets.preset``); explicit flags win.
    Further ``methods`` (lws_las: lws with --loss las) have presets of their own, named in the help."""
    from ..presets import PRESETS

    have = [f"{', '.join(d for x, d in PRESETS if x == m)}" + ("" if m == methods[0] else f" (with --loss las: {m})")
            for m in methods]
    return click.option("--preset", default=None, metavar="DATASET",
                        help=f"Published configuration for DATASET: {'; '.join(have)}. Sets the epochs, lr, batch, "
                             "sampler and schedule (and loss) of the authors' config; flags given explicitly win. "
                             "Sources: docs/METHODS.md, \"Reference presets\".")


# preset keys (the head's keyword arguments) that a command spells differently
_OPTION_NAMES = {"protocol": "train_protocol"}


def apply_preset(method: str, dataset: str, options: dict, quiet: bool, lists: Sequence[str] = ()) -> dict:
    """Set ``options`` (the command's, by parameter name) from ``method``'s preset for ``dataset``, except
    those given on the command line (click's parameter source); ``lists``: options that take a list
    (cRT's grid). Logs the preset and its source on stderr; returns the JSON ``"preset"``:
    ``{"name", "method", "source", "settings", "overridden"}`` (the flags that won)."""
    from ..presets import preset, preset_source

    try:
        settings, source = preset(method, dataset), preset_source(method, dataset)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--preset") from None
    ctx = click.get_current_context()
    overridden = []
    for key, value in settings.items():
        name = _OPTION_NAMES.get(key, key)
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            overridden.append(key)
        else:
            options[name] = [value] if name in lists else value
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if k not in overridden)
    kept = f"; given flags kept: {', '.join('--' + k.replace('_', '-') for k in overridden)}" if overridden else ""
    log(f"preset {dataset} ({method}): {shown}{kept}\n  source: {source}", quiet)
    return {"name": dataset, "method": method, "source": source, "settings": settings, "overridden": overridden}


def crt_human(result: dict) -> str:
    """The grid (one line per head, the selected one marked) above the selected head's table."""
    if "grid" not in result:
        return trained_human(result)
    splits = metric_splits(result)
    lines = [f"cRT grid: {len(result['grid'])} heads trained in one pass, selected on val by top-1",
             f"{'lr':>8} {'wd':>8} {'epoch':>5}  " + "  ".join(f"{s[:5] + '/all':>9}" for s in splits)]
    for i, row in enumerate(result["grid"]):
        cells = "  ".join(f"{'diverged' if row['diverged'] else fmt_acc(row[s]['all']):>9}" for s in splits)
        mark = "  <- selected" if i == result["selected"]["index"] else ""
        lines.append(f"{row['lr']:>8g} {row['weight_decay']:>8g} {row['best_epoch'] + 1:>5}  {cells}{mark}")
    return "\n".join(lines) + "\n\n" + trained_human(result)


def train_command(method: str, human: Callable[[dict], str], *, features, as_json, quiet, allow_incomplete,
                  thresholds, seed, device, splits, overwrite, seeds, protocol, save=None, max_memory=None,
                  precision: str = "float32", needs_head: bool = True, preset: Optional[str] = None,
                  per_class_out: Optional[str] = None, **options: Any) -> None:
    """Check the options, train ``method`` (its registry runner; once per --seeds seed), print it.
    ``options``: the runner's keyword arguments (epochs, lr, batch_size, ...; ``train_protocol`` is the
    head's ``protocol``), after ``preset`` (a dataset of :mod:`lt_rebalance.presets`) filled those
    not given on the command line."""
    check_writable(save, overwrite, [features])
    check_writable(per_class_out, overwrite, [features, save])
    chosen = None
    if preset is not None:
        las = method == "lws" and options.get("loss") == "las"  # MiSLAS stage 2: LWS with label-aware smoothing
        chosen = apply_preset("lws_las" if las else method, preset, options, quiet)
    if "train_protocol" in options:
        options["protocol"] = options.pop("train_protocol")
    session = make_session(features, allow_incomplete, splits, device, seeds[0] if seeds else seed, thresholds,
                           protocol, max_memory, precision)
    if needs_head:
        require_head(session.store, method)
    require_split(session.store, "train", "to train on")
    check_batch_fits(session.store, options["batch_size"], chosen)
    run = run_trained(session, method, seeds, log=None if quiet else log, **options)
    if chosen is not None:
        run.result["preset"] = chosen
    save_head_file(save, overwrite, run.head, run.result, features, quiet)
    write_per_class(per_class_out, overwrite, session, {method: run.head}, run.result, features, quiet)
    emit(run.result, as_json, with_protocol(human))


def stored_head_command(name: str, help: str, *, epochs: Any = 5, lr: Optional[float] = 0.2,
                        sampler: Optional[str] = "cb",
                        sampler_help: str = "cb (class-balanced, default), ib, sqrt, pb or a power q.",
                        loss: Optional[str] = "ce", lr_help: str = "", loss_help: str = "", batch_note: str = "",
                        presets: Sequence[str] = (), extra: Sequence[Callable] = (), save: bool = True
                        ) -> click.Command:
    """``ltr <name>``: per-class parameters trained on the frozen stored classifier, with LWS's options,
    --loss ce|grw|las and its smoothing options, --preset (``presets``: the preset methods, default
    ``name``) and ``extra`` options (e.g. :func:`train_protocol_option`); ``save``: offer --save (a
    head that is no linear layer cannot be saved)."""

    def command(**options: Any) -> None:
        train_command(name, trained_human, **options)

    command.__name__ = name
    for opt in reversed([
        common_options, thresholds_options,
        sgd_options(epochs, lr, sampler_help, sampler=sampler, lr_help=lr_help, batch_note=batch_note, save=save),
        loss_options(("ce", "grw", "las"), loss, loss_help), *extra, preset_option(*(presets or (name,))),
        per_class_option, seeds_option, protocol_options, handle_user_errors,
    ]):
        command = opt(command)
    return click.command(name, help=help)(command)
