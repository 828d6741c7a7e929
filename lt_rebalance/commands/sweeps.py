"""The shared body of ``ltr tau-sweep`` and ``ltr logit-adjust``: options checked, sweep run, curve table."""
from __future__ import annotations

from typing import Any, Callable, Optional

import click

from ._protocol_text import with_protocol
from .render import emit, metrics_table
from .setup import check_writable, make_session, require_head, require_split, write_per_class

SWEEP_TITLES = {"tau_norm": "tau-normalisation", "logit_adjust": "logit adjustment"}


def tau_table(result: dict) -> str:
    """The curve per τ (val and test, per shot group), the selected τ marked, and the report at it."""
    curves, taus, sel = result["curves"], result["taus"], result["selected_tau"]
    title = SWEEP_TITLES[result["method"]]
    cols = [(s, g) for s in curves for g in ("many", "medium", "few", "all")]
    head = f"{'tau':>6}  " + "  ".join(f"{s[:4]}/{g[:3]:>3}" for s, g in cols) + "   (accuracy %)"
    lines = [f"{title}, selected on {result['selected_on']} by {result['metric']}" if sel is not None
             else f"{title}, no selection (--select-on none)", head]
    for i, t in enumerate(taus):
        vals = "  ".join(f"{100 * curves[s][g][i]:>8.2f}" if curves[s][g][i] is not None and curves[s][g][i] == curves[s][g][i] else f"{'-':>8}" for s, g in cols)
        mark = "  <- selected" if sel is not None and abs(t - sel) < 1e-12 else ""
        lines.append(f"{t:>6.3g}  {vals}{mark}")
    eval_split = next((s for s in curves if s in result and result[s] is not None and s != "curves"), None)
    if sel is not None and eval_split:
        lines.append(f"\n{eval_split} at tau = {sel:g}:")
        lines.append(metrics_table([(eval_split, result[eval_split])], keys=("many", "medium", "few", "all", "mean_class")))
    return "\n".join(lines)


def run_sweep_command(command: str, runner: Callable, features: str, as_json: bool, allow_incomplete: bool,
                      thresholds: dict, taus: str, select_on: Optional[str], metric: str, eval_split: str,
                      protocol: Any, max_memory: Optional[int] = None, per_class_out: Optional[str] = None,
                      overwrite: bool = False, quiet: bool = False, precision: str = "float32",
                      **runner_options: Any) -> None:
    """Parse and check the sweep options, run ``runner`` (run_tau_sweep's signature, and ``runner_options``),
    print the result; ``per_class_out``: the per-class CSV of the head at the selected τ on ``eval_split``."""
    from ..runners.sweeps import parse_taus

    try:
        tau_list = parse_taus(taus)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--taus") from None
    if protocol.test_priors and eval_split != "test":
        raise click.BadParameter("--test-priors are evaluated on the test split; use --eval-split test",
                                 param_hint="--eval-split")
    if per_class_out and select_on == "none":
        raise click.BadParameter("--select-on none reports no head; select tau to write per-class accuracy",
                                 param_hint="--per-class-out")
    check_writable(per_class_out, overwrite, [features])
    session = make_session(features, allow_incomplete, None, thresholds=thresholds, protocol=protocol,
                           max_memory=max_memory, precision=precision)
    require_head(session.store, command)
    if select_on is None:
        if "val" not in session.store.splits:
            raise click.ClickException(
                f"{features} has no 'val' split to select tau on; pass --select-on test to select on the test "
                "split (reported as such), or --select-on none to print the curves only"
            )
        select_on = "val"
    require_split(session.store, eval_split, "for --eval-split")
    run = runner(session, tau_list, None if select_on == "none" else select_on, metric, eval_split, **runner_options)
    if per_class_out:
        from dataclasses import replace

        write_per_class(per_class_out, overwrite, replace(session, eval_splits=[eval_split]),
                        {run.result["method"]: run.head}, run.result, features, quiet)
    emit(run.result, as_json, with_protocol(tau_table))
