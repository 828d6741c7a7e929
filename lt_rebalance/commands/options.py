"""The options and parameter types shared by the ``ltr`` commands (no torch: ``--help`` reads them)."""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Optional

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")


def _one_feature_file(ctx: click.Context, param: click.Parameter, value: tuple) -> str:
    """``-f`` given twice used to mean silently the last one: refused, naming both."""
    if len(value) > 1:
        raise click.BadParameter(f"given {len(value)} times ({', '.join(value)}); this command reads one feature "
                                 "file (`ltr compare` and `ltr report` take several)", ctx, param)
    return value[0]


features_option = click.option(
    "--features",
    "-f",
    "features",
    required=True,
    multiple=True,
    callback=_one_feature_file,
    type=click.Path(dir_okay=False, path_type=str),
    help="Feature file (.h5) written by `ltr extract` or `ltr import`.",
)
allow_incomplete_option = click.option(
    "--allow-incomplete", is_flag=True, help="Use splits whose extraction has not finished (rows written so far)."
)
# integers that reach torch/numpy as int64: larger values are refused up front (exit 2), not deep inside a run
INT64_MAX = 2**63 - 1


class Int64Range(click.IntRange):
    """Integers ``min``..2^63 - 1, shown as ``x>=min`` in --help (not ``0<=x<=9223372036854775807``);
    a larger value is still refused with the whole range."""

    def __init__(self, min: int = 0):
        super().__init__(min, INT64_MAX)

    def _describe_range(self) -> str:
        return f"x>={self.min}"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = click.INT.convert(value, param, ctx)
        if number > INT64_MAX:
            self.fail(f"{number} is not in the range {self.min}<=x<=2^63 - 1 ({INT64_MAX}).", param, ctx)
        return super().convert(number, param, ctx)


SEED_RANGE = Int64Range(0)
seed_option = click.option("--seed", default=0, show_default=True, type=SEED_RANGE, help="Random seed (0 to 2^63 - 1).")
splits_option = click.option(
    "--splits", "splits", default=None, help="Comma-separated splits to evaluate (default: val and test)."
)
save_option = click.option("--save", type=click.Path(dir_okay=False), help="Save the fitted head to this .pt file.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing --save or --per-class-out file.")


class Device(click.ParamType):
    """auto, cpu, cuda or cuda:N, resolved to a device this machine has (a string such as 'cpu')."""

    name = "DEVICE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> str:
        from ..devices import DeviceUnavailable, resolve_device

        try:
            return str(resolve_device(value))
        except DeviceUnavailable as e:
            raise click.ClickException(f"{e}; use --device cpu") from None
        except ValueError as e:
            self.fail(str(e), param, ctx)


device_option = click.option(
    "--device", default="auto", show_default=True, type=Device(),
    help="auto, cpu, cuda or cuda:N (auto = cuda when available).",
)


PRECISIONS = ("float32", "bfloat16", "tf32", "auto")  # lt_rebalance.precision.PRECISIONS (tests check they agree)
PRECISION_HELP = ("Arithmetic of the matrix products: float32 (exact, today's numbers); bfloat16 (operands rounded, "
                  "float32 accumulation, weights/loss/metrics float32: fast on CPUs with AMX or AVX512-BF16 and "
                  "GPUs of compute capability >= 8.0); tf32 (CUDA tensor cores; float32 elsewhere); auto "
                  "(bfloat16 where the hardware has bfloat16 units and the method meets the accuracy contract "
                  "of docs/METHODS.md, else float32).")
precision_option = click.option(
    "--precision", default="float32", show_default=True, type=click.Choice(PRECISIONS, case_sensitive=False),
    help=PRECISION_HELP,
)


class MemorySize(click.ParamType):
    """A number of bytes: 2048, 500M, 8G, 1.5GiB (K/M/G/T are powers of 1024)."""

    name = "SIZE"
    _UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", str(value), re.I)
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a memory size; give e.g. 500M, 8G or 1.5GiB", param, ctx)
        return int(float(m.group(1)) * self._UNITS[m.group(2).upper()])


max_memory_option = click.option(
    "--max-memory", type=MemorySize(), default=None,
    help="Memory this run may use, e.g. 8G (default: what is available). Feature files larger than half of "
         "it are memory-mapped and streamed in blocks instead of read; results are identical.",
)


def common_options(f: Callable) -> Callable:
    """--features, --json, --quiet and --allow-incomplete, in that order."""
    for opt in (allow_incomplete_option, quiet_option, json_option, features_option):
        f = opt(f)
    return f


class MethodNames(click.ParamType):
    """A comma list of method names (old spellings accepted) -> canonical names; ``single``: exactly one."""

    def __init__(self, single: bool = False):
        self.single = single
        self.name = "METHOD" if single else "METHOD[,METHOD...]"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        from ..registry import parse_methods

        if isinstance(value, list):
            return value
        try:
            names = parse_methods(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if not names or (self.single and len(names) != 1):
            self.fail(f"give {'one method' if self.single else 'at least one method'}; got {value!r}", param, ctx)
        return names[0] if self.single else names


class AutoIntRange(click.IntRange):
    """An integer range, or the word ``auto`` (the library's default rule)."""

    name = "integer|auto"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return super().convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: Optional[click.Context] = None) -> str:
        return "INTEGER|auto"


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


class Sampler(click.ParamType):
    """A stage-2 sampler: ib, cb, sqrt, pb or a finite power q (-> the name, or q as a float)."""

    name = "SAMPLER"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        from ..samplers import parse_sampler

        try:
            return parse_sampler(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


# the rule of lt_rebalance.heads.training.plan_schedule (DEFAULT_BATCH_SIZE, MIN_STEPS), spelled
# out here because `--help` must not import torch; tests check they agree
EPOCHS_AUTO_HELP = ("auto: {n}, raised on small files until training takes at least 500 optimiser steps "
                    "(an explicit value is used as given, with a warning below 500 steps).")
BATCH_AUTO_HELP = ("auto: 512, or N // 8 for N < 4096 train rows (at least 8 batches an epoch); an explicit "
                   "value must not exceed the train rows.")


def epochs_option(name: str, reference: int, what: str = "Training epochs") -> Callable:
    return click.option(name, default="auto", show_default=True, type=AutoIntRange(1),
                        help=f"{what}; " + EPOCHS_AUTO_HELP.format(n=reference))


def batch_size_option(what: str = "Batch size", note: str = "") -> Callable:
    return click.option("--batch-size", default="auto", show_default=True, type=AutoIntRange(1),
                        help=f"{what}; " + BATCH_AUTO_HELP + note)


def thresholds_options(f: Callable) -> Callable:
    """--many/--few shot-group thresholds; the command gets ``thresholds={"many": .., "few": ..}``."""

    @functools.wraps(f)
    def wrapper(many: Optional[int], few: Optional[int], **kwargs: Any) -> Any:
        if many is not None and few is not None and few > many + 1:
            raise click.BadParameter(f"--few {few} leaves no room under --many {many}", param_hint="--few")
        given = {k: v for k, v in (("many", many), ("few", few)) if v is not None}
        return f(thresholds=given, **kwargs)

    wrapper = click.option("--few", default=None, type=Int64Range(0),
                           help="few-shot classes: < FEW train images [default: the file's shot_few, else 20].")(wrapper)
    return click.option("--many", default=None, type=Int64Range(0),
                        help="many-shot classes: > MANY train images [default: the file's shot_many, else 100].")(wrapper)


def training_options(f: Callable) -> Callable:
    """--crt-epochs, --lws-epochs and --batch-size; the command gets ``overrides``, the runner options
    of the trained methods (:func:`lt_rebalance.registry.schedule_options`)."""

    @functools.wraps(f)
    def wrapper(crt_epochs: int, lws_epochs: int, batch_size: int, **kwargs: Any) -> Any:
        from ..registry import schedule_options

        return f(overrides=schedule_options(crt_epochs, lws_epochs, batch_size), **kwargs)

    for opt in (
        batch_size_option("cRT, LWS and MARC batch size"),
        epochs_option("--lws-epochs", 5, "LWS and MARC epochs"),
        epochs_option("--crt-epochs", 10, "cRT epochs"),
    ):
        wrapper = opt(wrapper)
    return wrapper


PRIOR_ESTIMATORS = ("em", "bbse", "rlls", "mapls")  # lt_rebalance.label_shift.METHODS (tests check they agree)


class NameList(click.ParamType):
    """A comma list of distinct names from ``choices``."""

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices
        self.name = f"{{{','.join(choices)}}}[,...]"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, tuple):
            return value
        names = tuple(n.strip().lower() for n in str(value).split(",") if n.strip())
        bad = [n for n in names if n not in self.choices]
        if not names or bad or len(set(names)) != len(names):
            self.fail(f"{value!r}: give distinct names from {', '.join(self.choices)}", param, ctx)
        return names


def protocol_options(f: Callable) -> Callable:
    """--test-priors, the shift and prior-estimation options, --bootstrap, --ci-level and
    --bootstrap-seed; the command gets ``protocol`` (a :class:`lt_rebalance.protocols.Protocol`)."""

    @functools.wraps(f)
    def wrapper(test_priors: Optional[str], shift_seed: int, shift_draws: int, shift_replace: bool,
                prior_estimators: tuple, prior_calibration: str, bootstrap: int, ci_level: float,
                bootstrap_seed: int, **kwargs: Any) -> Any:
        from ..protocols import Protocol
        from ..shifts import parse_shifts

        try:
            names = parse_shifts(test_priors) if test_priors is not None else ()
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--test-priors") from None
        protocol = Protocol(test_priors=names, bootstrap=bootstrap, ci_level=ci_level, bootstrap_seed=bootstrap_seed,
                            shift_seed=shift_seed, shift_draws=shift_draws, shift_replace=shift_replace,
                            prior_estimators=prior_estimators,
                            calibration=None if prior_calibration == "none" else prior_calibration)
        return f(protocol=protocol, **kwargs)

    for opt in (
        click.option("--bootstrap-seed", default=0, show_default=True, type=int,
                     help="Seed of the bootstrap resamples (the same for every method: paired differences)."),
        click.option("--ci-level", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                     max_open=True), help="Confidence level of the bootstrap intervals."),
        click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0), metavar="B",
                     help="Percentile bootstrap with B resamples of the rows, stratified by class (e.g. 1000)."),
        click.option("--prior-calibration", type=click.Choice(["none", "temperature", "bcts"]), default="none",
                     show_default=True, help="Recalibrate the scores on val before the em and mapls estimators "
                     "(bcts: bias-corrected temperature scaling)."),
        click.option("--prior-estimators", default="em", show_default=True, type=NameList(PRIOR_ESTIMATORS),
                     help="Test-prior estimators reported beside the known prior under --test-priors: "
                          "em, bbse, rlls, mapls (bbse and rlls use the val split)."),
        click.option("--shift-replace", is_flag=True,
                     help="Let a shift take more rows of a class than it has (drawn with replacement)."),
        click.option("--shift-draws", default=1, show_default=True, type=click.IntRange(1), metavar="K",
                     help="Draws of each random shift (dirichlet, knockout, tweakone): mean ± std over K."),
        click.option("--shift-seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
                     help="Seed of the random shifts (draw d uses SEED + d)."),
        click.option("--test-priors", default=None, metavar="LIST",
                     help="Shifted test priors on the test split, e.g. forward-50,uniform,backward-50 (LADE's), "
                          "step-R, dirichlet-A, knockout-P, tweakone-RHO (R >= 1, A > 0, 0 < P, RHO < 1)."),
    ):
        wrapper = opt(wrapper)
    return wrapper


def seeds_option(f: Callable) -> Callable:
    """--seeds 0,1,2: the trained heads run once per seed; the command gets ``seeds`` (list or None)."""

    @functools.wraps(f)
    def wrapper(seeds: Optional[str], **kwargs: Any) -> Any:
        if seeds is None:
            return f(seeds=None, **kwargs)
        try:
            values = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            values = []
        if not values or len(set(values)) != len(values):
            raise click.BadParameter(f"{seeds!r}: give distinct integer seeds, e.g. 0,1,2,3,4", param_hint="--seeds")
        return f(seeds=values, **kwargs)

    return click.option("--seeds", default=None, metavar="LIST",
                        help="Train once per seed (e.g. 0,1,2,3,4) and report mean ± std over seeds; the first "
                             "seed's head is the one reported in full (and saved). Overrides --seed.")(wrapper)


def sgd_options(epochs: Any, lr: Optional[float], sampler_help: str, grid: bool = False, *,
                weight_decay: float = 5e-4, sampler: Optional[str] = "cb", schedule: Optional[str] = "cosine",
                lr_help: str = "", schedule_help: str = "", batch_note: str = "", save: bool = True):
    """The training options shared by crt, lws, marc, disalign and wb (defaults: the reference's, or the
    method's).

    ``grid``: --lr and --weight-decay take comma lists (:class:`FloatList`), a grid trained in one pass.
    ``epochs``: what "auto" epochs stand for on a large file (a number, or words). A default of None
    (``lr``, ``sampler``, ``schedule``) is "the protocol's", explained by ``lr_help``,
    ``sampler_help``, ``schedule_help``; ``batch_note`` is appended to --batch-size's help. ``save``:
    offer --save (not for a head that is no linear layer).
    """
    if grid:
        lr_type, wd_type, grid_help = FloatList(positive=True), FloatList(), " A comma list trains a grid in one pass."
        lr_help, wd_help = f"{lr_help} [{lr_type.range_text}]", f" [{wd_type.range_text}]"
    else:
        lr_type, wd_type, grid_help = click.FloatRange(0, min_open=True), click.FloatRange(0), ""
        wd_help = ""
    opts = [
        epochs_option("--epochs", epochs),
        click.option("--lr", default=lr, show_default=lr is not None, type=lr_type,
                     help="Base learning rate (cosine schedule)." + grid_help + lr_help),
        batch_size_option(note=batch_note),
        click.option("--weight-decay", default=weight_decay, show_default=True, type=wd_type,
                     help=(grid_help.strip() + wd_help).strip() or None),
        click.option("--momentum", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
        click.option("--sampler", default=sampler, show_default=sampler is not None, type=Sampler(), help=sampler_help),
        click.option("--schedule", type=click.Choice(["cosine", "cosine-reference", "constant"]), default=schedule,
                     show_default=schedule is not None,
                     help="cosine-reference: the reference's (last epoch at lr = 0)." + schedule_help),
        click.option("--keep-best/--last-epoch", default=True, show_default=True,
                     help="Keep the epoch with the best val top-1 (needs a val split)."),
        seed_option,
        device_option,
        splits_option,
        *([save_option] if save else []),
        overwrite_option,
        max_memory_option,
        precision_option,
    ]

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def sweep_options(f: Callable) -> Callable:
    """--taus, --select-on, --metric, --eval-split, --max-memory and --precision of the τ sweeps (tau-sweep,
    logit-adjust)."""
    opts = [
        click.option("--taus", default="0:2:21", show_default=True, help="START:STOP:NUM (linspace) or a comma list."),
        click.option("--select-on", type=click.Choice(["val", "test", "none"]), default=None,
                     help="Split to select tau on (default: val; test only when asked for explicitly)."),
        click.option("--metric", type=click.Choice(["top1", "mean_class", "few"]), default="top1",
                     show_default=True, help="What the selection maximises."),
        click.option("--eval-split", default="test", show_default=True, help="Split reported at the selected tau."),
        max_memory_option,
        precision_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f
