"""``ltr joint | ncm | tau-sweep | crt | lws``: one method on a feature file, per split and group."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import click

from ._common import (
    batch_size_option,
    check_batch_fits,
    check_writable,
    common_options,
    device_option,
    emit,
    epochs_option,
    eval_splits,
    fmt_acc,
    handle_user_errors,
    log,
    max_memory_option,
    metrics_table,
    open_store,
    protocol_options,
    require_head,
    require_split,
    resolve_device,
    seed_option,
    seeds_option,
    thresholds_options,
)
from ._protocol_text import with_protocol

splits_option = click.option(
    "--splits", "splits", default=None, help="Comma-separated splits to evaluate (default: val and test)."
)
save_option = click.option("--save", type=click.Path(dir_okay=False), help="Save the fitted head to this .pt file.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing --save file.")


def _context(features: str, allow_incomplete: bool, splits: Optional[str], device: str = "cpu", seed: int = 0,
             thresholds: Optional[dict] = None, protocol: Any = None, max_memory: Optional[int] = None):
    from ..experiments import Context
    from ..protocols import Protocol

    store = open_store(features, allow_incomplete)
    protocol = protocol or Protocol()
    if protocol.test_priors:
        require_split(store, "test", "for --test-priors")
    return Context(store, eval_splits=eval_splits(store, splits), device=device, seed=seed,
                   thresholds=thresholds or {}, protocol=protocol, max_memory=max_memory)


def _splits_table(result: dict, splits) -> str:
    return metrics_table([(s, result[s]) for s in splits if result.get(s) is not None], keys=("many", "medium", "few", "all", "mean_class"))


def _human(title: Callable[[dict], str], splits) -> Callable[[dict], str]:
    return with_protocol(lambda r: f"{title(r)}\n{_splits_table(r, splits)}")


def _save(save: Optional[str], overwrite: bool, head: Any, result: dict, features: str, quiet: bool) -> None:
    if save:
        from ..head_io import head_state, save_head

        save_head(save, head_state(head, result["method"], result.get("params"), features), overwrite)
        result["saved"] = save
        log(f"saved {result['method']} head to {save}", quiet)


@click.command()
@common_options
@thresholds_options
@splits_option
@protocol_options
@max_memory_option
@handle_user_errors
def joint(features, as_json, quiet, allow_incomplete, thresholds, splits, protocol, max_memory):
    """Evaluate the stored stage-1 (joint) classifier: the baseline every method is compared with."""
    from ..experiments import run_joint

    ctx = _context(features, allow_incomplete, splits, thresholds=thresholds, protocol=protocol, max_memory=max_memory)
    require_head(ctx.store, "joint")
    result, _ = run_joint(ctx)
    emit(result, as_json, _human(lambda r: "joint (stored stage-1 classifier), accuracy %", ctx.eval_splits))


@click.command()
@common_options
@thresholds_options
@click.option("--variant", type=click.Choice(["cl2n", "l2n", "un", "cos"]), default="cl2n", show_default=True,
              help="cl2n: centre on the train mean then L2-normalise; l2n: normalise; un: raw; cos: reference's cosine.")
@splits_option
@save_option
@overwrite_option
@protocol_options
@max_memory_option
@handle_user_errors
def ncm(features, as_json, quiet, allow_incomplete, thresholds, variant, splits, save, overwrite, protocol,
        max_memory):
    """Nearest class mean on the cached train features (needs no stored classifier)."""
    from ..experiments import run_ncm

    check_writable(save, overwrite, [features])
    ctx = _context(features, allow_incomplete, splits, thresholds=thresholds, protocol=protocol, max_memory=max_memory)
    require_split(ctx.store, "train", "to compute class means")
    result, head = run_ncm(ctx, variant)
    _save(save, overwrite, head, result, features, quiet)
    emit(result, as_json, _human(lambda r: f"NCM ({variant}), accuracy %", ctx.eval_splits))


SWEEP_TITLES = {"tau_norm": "tau-normalisation", "logit_adjust": "logit adjustment"}


def _tau_table(result: dict) -> str:
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


_tau_human = with_protocol(_tau_table)


def sweep_options(f: Callable) -> Callable:
    """--taus, --select-on, --metric and --eval-split of the tau sweeps (tau-sweep, logit-adjust)."""
    opts = [
        click.option("--taus", default="0:2:21", show_default=True, help="START:STOP:NUM (linspace) or a comma list."),
        click.option("--select-on", type=click.Choice(["val", "test", "none"]), default=None,
                     help="Split to select tau on (default: val; test only when asked for explicitly)."),
        click.option("--metric", type=click.Choice(["top1", "mean_class", "few"]), default="top1",
                     show_default=True, help="What the selection maximises."),
        click.option("--eval-split", default="test", show_default=True, help="Split reported at the selected tau."),
        max_memory_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def run_sweep_command(command: str, runner: Callable, features: str, as_json: bool, allow_incomplete: bool,
                      thresholds: dict, taus: str, select_on: Optional[str], metric: str, eval_split: str,
                      protocol: Any, max_memory: Optional[int] = None) -> None:
    """Parse and check the sweep options, run ``runner`` (run_tau_sweep's signature), print the result."""
    from ..experiments import parse_taus

    try:
        tau_list = parse_taus(taus)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--taus") from None
    if protocol.test_priors and eval_split != "test":
        raise click.BadParameter("--test-priors are evaluated on the test split; use --eval-split test",
                                 param_hint="--eval-split")
    ctx = _context(features, allow_incomplete, None, thresholds=thresholds, protocol=protocol, max_memory=max_memory)
    require_head(ctx.store, command)
    if select_on is None:
        if "val" not in ctx.store.splits:
            raise click.ClickException(
                f"{features} has no 'val' split to select tau on; pass --select-on test to select on the test "
                "split (reported as such), or --select-on none to print the curves only"
            )
        select_on = "val"
    require_split(ctx.store, eval_split, "for --eval-split")
    result, _ = runner(ctx, tau_list, None if select_on == "none" else select_on, metric, eval_split)
    emit(result, as_json, _tau_human)


@click.command("tau-sweep")
@common_options
@thresholds_options
@sweep_options
@protocol_options
@handle_user_errors
def tau_sweep(features, as_json, quiet, allow_incomplete, thresholds, taus, select_on, metric, eval_split, protocol,
              max_memory):
    """tau-normalise the stored classifier (w / ||w||^tau, bias dropped) for every tau in one GEMM.

    --bootstrap and --test-priors are reported at the selected tau.
    """
    from ..experiments import run_tau_sweep

    run_sweep_command("tau-sweep", run_tau_sweep, features, as_json, allow_incomplete, thresholds, taus, select_on,
                      metric, eval_split, protocol, max_memory)


class FloatList(click.ParamType):
    """A comma-separated list of distinct finite numbers: '0.05,0.1,0.2' -> [0.05, 0.1, 0.2].

    ``positive``: each must be > 0 (else >= 0).
    """

    name = "FLOAT[,FLOAT...]"

    def __init__(self, positive: bool = False):
        self.positive = positive

    @property
    def range_text(self) -> str:
        return "x>0" if self.positive else "x>=0"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            out = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a number or a comma-separated list of numbers", param, ctx)
        if not out or not all(math.isfinite(v) for v in out) or len(set(out)) != len(out):
            self.fail(f"{value!r}: give one or more distinct finite numbers, e.g. 0.05,0.1,0.2", param, ctx)
        if any(v <= 0 if self.positive else v < 0 for v in out):
            self.fail(f"{value!r}: every value must be {'> 0' if self.positive else '>= 0'}", param, ctx)
        return out


def sgd_options(epochs: int, lr: float, sampler_help: str, grid: bool = False, *, weight_decay: float = 5e-4,
                sampler: str = "cb"):
    """The training options shared by crt, lws, marc and wb (defaults: the reference's, or the method's).

    ``grid``: --lr and --weight-decay take comma lists (:class:`FloatList`), a grid trained in one pass.
    """
    if grid:
        lr_type, wd_type, grid_help = FloatList(positive=True), FloatList(), " A comma list trains a grid in one pass."
        lr_help, wd_help = f" [{lr_type.range_text}]", f" [{wd_type.range_text}]"
    else:
        lr_type, wd_type, grid_help = click.FloatRange(0, min_open=True), click.FloatRange(0), ""
        lr_help = wd_help = ""
    opts = [
        epochs_option("--epochs", epochs),
        click.option("--lr", default=lr, show_default=True, type=lr_type,
                     help="Base learning rate (cosine schedule)." + grid_help + lr_help),
        batch_size_option(),
        click.option("--weight-decay", default=weight_decay, show_default=True, type=wd_type,
                     help=(grid_help.strip() + wd_help).strip() or None),
        click.option("--momentum", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
        click.option("--sampler", default=sampler, show_default=True, help=sampler_help),
        click.option("--schedule", type=click.Choice(["cosine", "cosine-reference", "constant"]), default="cosine",
                     show_default=True, help="cosine-reference: the reference's (last epoch at lr = 0)."),
        click.option("--keep-best/--last-epoch", default=True, show_default=True,
                     help="Keep the epoch with the best val top-1 (needs a val split)."),
        seed_option,
        device_option,
        splits_option,
        save_option,
        overwrite_option,
        max_memory_option,
    ]

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def _parse_sampler(sampler: str) -> Any:
    if sampler in ("ib", "cb", "sqrt", "pb"):
        return sampler
    try:
        q = float(sampler)
        if q != q or q in (float("inf"), float("-inf")):  # nan / inf: not a usable power
            raise ValueError
        return q
    except ValueError:
        raise click.BadParameter(f"unknown sampler {sampler!r}; use ib, cb, sqrt, pb or a finite power q",
                                 param_hint="--sampler") from None


def _metric_splits(result: dict) -> list[str]:
    """The splits a trained method's result reports metrics for."""
    return [k for k, v in result.items() if isinstance(v, dict) and "all" in v]


def _trained_human(result: dict) -> str:
    p = result["params"]
    h = result["history"]
    best = f", kept epoch {h['best_epoch'] + 1}" if h["val_top1"] else ""
    auto = p.get("auto", ())
    epochs = f"{p['epochs']} epochs{' (auto)' if 'epochs' in auto else ''}"
    batch = f"batch {p['batch_size']}{' (auto)' if 'batch_size' in auto else ''}"
    steps = f" = {p['steps']} steps" if "steps" in p else ""
    title = f"{result['method']}: {epochs} x {batch}{steps}, lr {p['lr']}, sampler {p['sampler']}{best}; accuracy %"
    return f"{title}\n{_splits_table(result, _metric_splits(result))}"


def _run_trained(ctx: Any, method: str, runner: Callable, seeds: Optional[list[int]], **kwargs: Any):
    """``runner(ctx, **kwargs)``, or once per seed of ``seeds`` (:func:`lt_rebalance.experiments.run_seeds`)."""
    from ..experiments import run_seeds

    if seeds and len(seeds) > 1:
        return run_seeds(ctx, method, seeds, **kwargs)
    return runner(ctx, **kwargs)


def _crt_human(result: dict) -> str:
    """The grid (one line per head, the selected one marked) above the selected head's table."""
    if "grid" not in result:
        return _trained_human(result)
    splits = _metric_splits(result)
    lines = [f"cRT grid: {len(result['grid'])} heads trained in one pass, selected on val by top-1",
             f"{'lr':>8} {'wd':>8} {'epoch':>5}  " + "  ".join(f"{s[:5] + '/all':>9}" for s in splits)]
    for i, row in enumerate(result["grid"]):
        cells = "  ".join(f"{'diverged' if row['diverged'] else fmt_acc(row[s]['all']):>9}" for s in splits)
        mark = "  <- selected" if i == result["selected"]["index"] else ""
        lines.append(f"{row['lr']:>8g} {row['weight_decay']:>8g} {row['best_epoch'] + 1:>5}  {cells}{mark}")
    return "\n".join(lines) + "\n\n" + _trained_human(result)


def _train_on_joint(command: str, human: Callable[[dict], str], *, features, as_json, quiet, allow_incomplete,
                    thresholds, epochs, lr, batch_size, weight_decay, momentum, sampler, schedule, keep_best, seed,
                    device, splits, save, overwrite, seeds, protocol, max_memory=None, **extra) -> None:
    """Check the options, train ``run_<command>`` (an experiments runner) from the stored head (once per
    --seeds seed), print it."""
    from .. import experiments

    sampler = _parse_sampler(sampler)
    check_writable(save, overwrite, [features])
    ctx = _context(features, allow_incomplete, splits, resolve_device(device), seeds[0] if seeds else seed,
                   thresholds, protocol, max_memory)
    require_head(ctx.store, command)
    require_split(ctx.store, "train", "to train on")
    check_batch_fits(ctx.store, batch_size)
    result, head = _run_trained(
        ctx, command, getattr(experiments, f"run_{command}"), seeds, log=None if quiet else log, epochs=epochs, lr=lr,
        batch_size=batch_size, weight_decay=weight_decay, momentum=momentum, sampler=sampler, schedule=schedule,
        keep_best=keep_best, **extra,
    )
    _save(save, overwrite, head, result, features, quiet)
    emit(result, as_json, with_protocol(human))


def joint_calibration_command(name: str, help: str) -> click.Command:
    """``ltr <name>``: per-class parameters trained on the frozen stored classifier, with LWS's options."""

    @click.command(name, help=help)
    @common_options
    @thresholds_options
    @sgd_options(5, 0.2, "cb (class-balanced, default), ib, sqrt, pb or a power q.")
    @seeds_option
    @protocol_options
    @handle_user_errors
    def command(**options: Any) -> None:
        _train_on_joint(name, _trained_human, **options)

    return command


@click.command()
@common_options
@thresholds_options
@sgd_options(10, 0.2, "ib, cb (class-balanced, default), sqrt, pb or a power q.", grid=True)
@click.option("--views", default=0, show_default=True, type=click.IntRange(0),
              help="Train on K stored augmented views (a random view per row per step; at most the stored K).")
@click.option("--loss", type=click.Choice(["ce", "balanced-softmax"]), default="ce", show_default=True)
@click.option("--class-weights", type=click.Choice(["none", "cb"]), default="none", show_default=True,
              help="cb: class-balanced loss weights (Cui et al.) with --beta.")
@click.option("--beta", default=0.9999, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@seeds_option
@protocol_options
@handle_user_errors
def crt(features, as_json, quiet, allow_incomplete, thresholds, epochs, lr, batch_size, weight_decay, momentum, sampler,
        schedule, keep_best, seed, device, splits, save, overwrite, views, loss, class_weights, beta,
        label_smoothing, seeds, protocol, max_memory):
    """Re-train the linear classifier on the cached features (class-balanced sampling by default)."""
    from ..experiments import run_crt

    sampler = _parse_sampler(sampler)
    check_writable(save, overwrite, [features])
    ctx = _context(features, allow_incomplete, splits, resolve_device(device), seeds[0] if seeds else seed,
                   thresholds, protocol, max_memory)
    require_split(ctx.store, "train", "to train on")
    check_batch_fits(ctx.store, batch_size)
    stored = ctx.store.splits["train"].views
    if views < 0 or views > stored:
        raise click.BadParameter(f"{views} views asked for, but {features} stores {stored} train views",
                                 param_hint="--views")
    grid = None if len(lr) == len(weight_decay) == 1 else (lr, weight_decay)
    result, head = _run_trained(
        ctx, "crt", run_crt, seeds, views=views, log=None if quiet else log, grid=grid, epochs=epochs, lr=lr[0],
        batch_size=batch_size, weight_decay=weight_decay[0], momentum=momentum, sampler=sampler, schedule=schedule,
        keep_best=keep_best, loss=loss, class_weights=class_weights, beta=beta, label_smoothing=label_smoothing,
    )
    _save(save, overwrite, head, result, features, quiet)
    emit(result, as_json, with_protocol(_crt_human))


lws = joint_calibration_command("lws", "Learn one scale per class on the frozen stored classifier (Places-LT: --lr 0.1).")
