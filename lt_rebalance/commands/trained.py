"""The shared body of the trained-method commands (crt, lws, marc, wb): checks, run, tables."""
from __future__ import annotations

from typing import Any, Callable

import click

from ._protocol_text import with_protocol
from .errors import handle_user_errors
from .options import common_options, protocol_options, seeds_option, sgd_options, thresholds_options
from .render import emit, fmt_acc, log, metric_splits, trained_human
from .setup import (
    check_batch_fits,
    check_writable,
    make_session,
    require_head,
    require_split,
    run_trained,
    save_head_file,
)


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
                  thresholds, seed, device, splits, save, overwrite, seeds, protocol, max_memory=None,
                  precision: str = "float32", needs_head: bool = True, **options: Any) -> None:
    """Check the options, train ``method`` (its registry runner; once per --seeds seed), print it.
    ``options``: the runner's keyword arguments (epochs, lr, batch_size, ...)."""
    check_writable(save, overwrite, [features])
    session = make_session(features, allow_incomplete, splits, device, seeds[0] if seeds else seed, thresholds,
                           protocol, max_memory, precision)
    if needs_head:
        require_head(session.store, method)
    require_split(session.store, "train", "to train on")
    check_batch_fits(session.store, options["batch_size"])
    run = run_trained(session, method, seeds, log=None if quiet else log, **options)
    save_head_file(save, overwrite, run.head, run.result, features, quiet)
    emit(run.result, as_json, with_protocol(human))


def stored_head_command(name: str, help: str) -> click.Command:
    """``ltr <name>``: per-class parameters trained on the frozen stored classifier, with LWS's options."""

    @click.command(name, help=help)
    @common_options
    @thresholds_options
    @sgd_options(5, 0.2, "cb (class-balanced, default), ib, sqrt, pb or a power q.")
    @seeds_option
    @protocol_options
    @handle_user_errors
    def command(**options: Any) -> None:
        train_command(name, trained_human, **options)

    return command
