"""``ltr logit-adjust | calibrate``: post-hoc corrections of a head on a feature file."""
from __future__ import annotations

import math

import click

from ..names import HEAD_METHODS, METHOD_NAMES, TRAINED_METHODS
from ._common import (
    MethodNames,
    batch_size_option,
    check_batch_fits,
    common_options,
    device_option,
    emit,
    epochs_option,
    handle_user_errors,
    log,
    max_memory_option,
    protocol_options,
    require_head,
    resolve_device,
    seed_option,
    thresholds_options,
)
from .methods import _context, run_sweep_command, sweep_options


@click.command("logit-adjust")
@common_options
@thresholds_options
@sweep_options
@protocol_options
@handle_user_errors
def logit_adjust(features, as_json, quiet, allow_incomplete, thresholds, taus, select_on, metric, eval_split,
                 protocol, max_memory):
    """Logit adjustment of the stored classifier (z - tau log prior) for every tau in one GEMM.

    tau = 1 is PC softmax. The JSON has the shape of `ltr tau-sweep` (method "logit_adjust").
    """
    from ..experiments import run_logit_adjust

    run_sweep_command("logit-adjust", run_logit_adjust, features, as_json, allow_incomplete, thresholds, taus,
                      select_on, metric, eval_split, protocol, max_memory)


def _num(v: float, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _calibration_human(result: dict) -> str:
    lines = [
        f"{result['base_method']}: temperature T = {result['temperature']:.4g} fitted on {result['fit_on']} "
        f"(NLL); {result['eval_split']} before -> after, ECE with 15 bins",
        f"{'':<7} {'n':>7}  {'NLL':>8} {'-> NLL':>8}  {'ECE %':>7} {'-> ECE %':>8}",
    ]
    for g, b in result["before"].items():
        a = result["after"][g]
        ece = [None if m["ece"] is None or math.isnan(m["ece"]) else 100 * m["ece"] for m in (b, a)]
        lines.append(
            f"{g:<7} {b['n']:>7}  {_num(b['nll'], '.4f'):>8} {_num(a['nll'], '.4f'):>8}  "
            f"{_num(ece[0], '.2f'):>7} {_num(ece[1], '.2f'):>8}"
        )
    return "\n".join(lines)


@click.command()
@common_options
@thresholds_options
@click.option("--method", required=True, type=MethodNames(single=True),
              help=f"The head to calibrate: {', '.join(METHOD_NAMES)} (tau_norm and logit_adjust with tau "
                   "selected on val; old spellings such as tau accepted).")
@click.option("--eval-split", default="test", show_default=True, help="Split the NLL and ECE are reported on.")
@epochs_option("--epochs", 10, "Training epochs of crt/lws/marc/wb (auto: theirs, 10, 5, 5 and 10)")
@batch_size_option("Batch size of crt/lws/marc/wb")
@seed_option
@device_option
@max_memory_option
@handle_user_errors
def calibrate(features, as_json, quiet, allow_incomplete, thresholds, method, eval_split, epochs, batch_size, seed,
              device, max_memory):
    """Temperature scaling: fit T on val (minimising NLL over log T), report NLL and ECE before/after.

    Reported on --eval-split over all rows and per shot group (the rows of many/medium/few classes).
    """
    from ..experiments import run_calibrate

    name = method
    ctx = _context(features, allow_incomplete, None, resolve_device(device), seed, thresholds, max_memory=max_memory)
    if name in HEAD_METHODS:
        require_head(ctx.store, f"calibrate --method {name}")
    params = {}
    if name in TRAINED_METHODS:
        check_batch_fits(ctx.store, batch_size)
        params = {"batch_size": batch_size, "epochs": epochs}
    result, _ = run_calibrate(ctx, name, eval_split, log=None if quiet else log, **params)
    emit(result, as_json, _calibration_human)
