"""``ltr logit-adjust | calibrate``: post-hoc corrections of a head on a feature file."""
from __future__ import annotations

import math

import click

from ..registry import METHOD_NAMES
from .errors import handle_user_errors
from .options import (
    MethodNames,
    batch_size_option,
    common_options,
    device_option,
    epochs_option,
    max_memory_option,
    overwrite_option,
    precision_option,
    protocol_options,
    seed_option,
    sweep_options,
    thresholds_options,
)
from .render import emit, log
from .setup import check_batch_fits, make_session, per_class_option, require_head
from .sweeps import run_sweep_command


@click.command("logit-adjust")
@common_options
@thresholds_options
@sweep_options
@click.option("--empty-classes", type=click.Choice(["one-row", "reference"]), default="one-row", show_default=True,
              help="A class without train rows: counted as one row, or the reference's log(π^tau + 1e-12), which "
                   "makes it win nearly every row.")
@per_class_option
@overwrite_option
@protocol_options
@handle_user_errors
def logit_adjust(features, as_json, quiet, allow_incomplete, thresholds, taus, select_on, metric, eval_split,
                 empty_classes, per_class_out, overwrite, protocol, max_memory, precision):
    """Logit adjustment of the stored classifier (z - tau log prior) for every tau in one GEMM.

    tau = 1 is PC softmax. The JSON has the shape of `ltr tau-sweep` (method "logit_adjust").
    """
    from ..runners.sweeps import run_logit_adjust_sweep

    run_sweep_command("logit-adjust", run_logit_adjust_sweep, features, as_json, allow_incomplete, thresholds, taus,
                      select_on, metric, eval_split, protocol, max_memory, per_class_out, overwrite, quiet,
                      empty_classes=empty_classes, precision=precision)


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
@epochs_option("--epochs", 10, "Training epochs of crt/lws/marc/wb/disalign (auto: theirs, 10, 5, 5, 10 and 10)")
@batch_size_option("Batch size of crt/lws/marc/wb/disalign")
@seed_option
@device_option
@max_memory_option
@precision_option
@handle_user_errors
def calibrate(features, as_json, quiet, allow_incomplete, thresholds, method, eval_split, epochs, batch_size, seed,
              device, max_memory, precision):
    """Temperature scaling: fit T on val (minimising NLL over log T), report NLL and ECE before/after.

    Reported on --eval-split over all rows and per shot group (the rows of many/medium/few classes).
    """
    from ..registry import BY_NAME
    from ..study import run_calibrate

    spec = BY_NAME[method]
    session = make_session(features, allow_incomplete, None, device, seed, thresholds, max_memory=max_memory,
                           precision=precision)
    if spec.needs_head:
        require_head(session.store, f"calibrate --method {method}")
    options = {}
    if spec.trained:
        check_batch_fits(session.store, batch_size)
        options = {"batch_size": batch_size, "epochs": epochs}
    run = run_calibrate(session, method, eval_split, log=None if quiet else log, **options)
    emit(run.result, as_json, _calibration_human)
