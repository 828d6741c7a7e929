"""What the ``ltr`` commands print: one JSON document with ``--json``, else human tables on stdout;
progress and logs on stderr."""
from __future__ import annotations

import math
from typing import Callable, Optional

import click

from ..results import to_json


def emit(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    """Print ``result`` as one JSON document, or its human rendering, on stdout."""
    if as_json:
        click.echo(to_json(result))
    else:
        click.echo(human(result))


def log(message: str, quiet: bool = False) -> None:
    """A progress or log line on stderr (none when ``quiet``)."""
    if not quiet:
        click.echo(message, err=True)


# the columns of a method's per-split table (accuracy %): shot groups, top-1, balanced (mean-class)
# accuracy, the worst class, the mean of the worst 10 % of classes, the harmonic mean of the groups
SPLIT_COLUMNS = ("many", "medium", "few", "all", "mean_class", "worst_class", "worst_10pct", "hmean")


def fmt_acc(v: Optional[float]) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def metrics_table(rows: list[tuple[str, dict]], keys=("many", "medium", "few", "all")) -> str:
    """A fixed-width table of accuracies in percent: one row per (label, metrics dict)."""
    width = max([len("method")] + [len(label) for label, _ in rows])
    cols = [max(6, len(k)) for k in keys]
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>{c}}" for k, c in zip(keys, cols))]
    for label, m in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{fmt_acc(m.get(k)):>{c}}" for k, c in zip(keys, cols)))
    return "\n".join(lines)


def metric_splits(result: dict) -> list[str]:
    """The splits a method's result reports metrics for."""
    return [k for k, v in result.items() if isinstance(v, dict) and "all" in v]


def splits_table(result: dict, splits=None) -> str:
    """The per-split table of a method's result (default: every split it reports)."""
    splits = metric_splits(result) if splits is None else splits
    return metrics_table([(s, result[s]) for s in splits if result.get(s) is not None], keys=SPLIT_COLUMNS)


def trained_human(result: dict) -> str:
    """The schedule of a trained method's result above its table."""
    p = result["params"]
    h = result["history"]
    best = f", kept epoch {h['best_epoch'] + 1}" if h["val_top1"] else ""
    auto = p.get("auto", ())
    epochs = f"{p['epochs']} epochs{' (auto)' if 'epochs' in auto else ''}"
    batch = f"batch {p['batch_size']}{' (auto)' if 'batch_size' in auto else ''}"
    steps = f" = {p['steps']} steps" if "steps" in p else ""
    extra = "".join(f", {k} {p[k]}" for k in ("loss", "protocol") if p.get(k) is not None)
    title = (f"{result['method']}: {epochs} x {batch}{steps}, lr {p['lr']}, sampler {p['sampler']}{extra}{best}; "
             "accuracy %")
    return f"{title}\n{splits_table(result)}"
