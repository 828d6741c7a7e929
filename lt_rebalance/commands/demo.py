"""``ltr demo``: the whole pipeline on scikit-learn's bundled digits (thin wrapper over :mod:`lt_rebalance.commands.demo_pipeline`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .errors import handle_user_errors
from .options import SEED_RANGE, json_option, quiet_option
from .render import emit, log


def _human(result: dict) -> str:
    from .compare import compare_table

    d = result["demo"]
    lines = [compare_table(result), "", *result["summary"], ""]
    if d["plots"]:
        lines.append("plots: " + ", ".join(d["plots"]))
    lines += [f"done in {d['seconds']:.0f} s; results in {Path(result['features']).parent / 'results.json'}", "",
              "Reproduce each step by hand (stage 1 is trained only by the demo):",
              *(f"  {c}" for c in result["reproduce"])]
    return "\n".join(lines)


@click.command()
@click.option("--out", default="ltr-demo", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (refused when it exists, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder written by the demo.")
@click.option("--seed", default=0, show_default=True, type=SEED_RANGE,
              help="Random seed (split, training, methods; 0 to 2^63 - 1).")
@click.option("--quick", is_flag=True, help="Reduced setting (3 epochs per training stage) for tests.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Epochs of stage 1, cRT and LWS (reduced setting; overrides --quick).")
@json_option
@quiet_option
@handle_user_errors
def demo(out: str, overwrite: bool, seed: int, quick: bool, epochs: Optional[int], as_json: bool, quiet: bool) -> None:
    """Long-tailed digits -> stage-1 CNN -> ltr extract -> every method, a table and plots (~1 min on a CPU)."""
    from .demo_pipeline import DemoConfig, run_demo

    cfg = DemoConfig(seed=seed)
    if epochs or quick:
        cfg = cfg.quick(epochs or 3)
    try:
        result = run_demo(Path(out), cfg, overwrite=overwrite, quiet=quiet,
                          log=lambda m: log(m, quiet))
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    emit(result, as_json, _human)
