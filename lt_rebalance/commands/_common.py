"""Options, output and error handling shared by the ``ltr`` commands.

Conventions: ``--json`` prints exactly one JSON document on stdout; tables go to stdout otherwise;
progress and logs go to stderr; a user mistake becomes ``click.ClickException`` (one ``Error:``
line, exit status 1) or ``click.BadParameter``/``UsageError`` (exit status 2).
"""
from __future__ import annotations

import errno
import functools
import json
import math
import re
import signal
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

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
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (auto = cuda when available)."
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


def jsonable(obj: Any) -> Any:
    """Convert results for JSON: NaN becomes null, tensors and numpy values become Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(result: Any) -> str:
    """The JSON document of ``result`` as ``--json`` prints it and results files hold it."""
    return json.dumps(jsonable(result), indent=2)


def emit(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    """Print ``result`` as one JSON document, or its human rendering, on stdout."""
    if as_json:
        click.echo(to_json(result))
    else:
        click.echo(human(result))


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        click.echo(message, err=True)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's ValueError and OS errors (missing, existing, read-only, full, ...) into one-line CLI
    errors, and its warnings (e.g. too few training steps) into ``warning: ...`` lines on stderr."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        # the library's own warnings are part of the command's output, whatever filters the caller set
        # (a test run ignores FewStepsWarning of direct library calls)
        warnings.filterwarnings("default", category=UserWarning, module=r"lt_rebalance(\.|$)")
        try:
            yield
        except click.ClickException:
            raise
        except MemoryError as e:
            raise click.ClickException(out_of_memory(str(e))) from None
        except RuntimeError as e:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory", "out of memory"
            if not re.search(r"can't allocate memory|out of memory|not enough memory", str(e), re.I):
                raise
            raise click.ClickException(out_of_memory(str(e).splitlines()[0])) from None
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as e:
            raise click.ClickException(getattr(e, "cli_message", None) or str(e)) from None
        except OSError as e:  # e.g. EROFS or ENOSPC outside a writer of lt_rebalance.outputs: name the path
            if e.strerror is None:
                raise click.ClickException(str(e)) from None
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})") from None


def out_of_memory(cause: str) -> str:
    """One line for an allocation that failed: what this job may use, and --max-memory."""
    from ..memory import available_memory, gib

    free = available_memory()
    room = f" (this job may use {gib(free)} now, its cgroup limit included)" if free is not None else ""
    return (f"out of memory{room}: {cause or 'an allocation failed'}; pass --max-memory with less than that "
            "(e.g. --max-memory 4G) so that large feature files are memory-mapped and processed in blocks, "
            "or use a machine with more memory")


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM: one ``Error:`` line saying what was (not) changed, exit status 128 + the
    signal (130 for SIGINT, 143 for SIGTERM)."""

    exit_code = 130


@contextmanager
def interrupts_as_errors() -> Iterator[None]:
    """Ctrl-C, and SIGTERM (batch schedulers), become :class:`Interrupted` (its message from the
    writer that stopped), not click's "Aborted!" or a silent death."""
    from ..outputs import last_stop_signal, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt as e:
        message = str(e) or "interrupted; no output was written"
        err = Interrupted(message)
        if last_stop_signal() == signal.SIGTERM:
            err = Interrupted(message.replace("interrupted", "terminated (SIGTERM)", 1))
            err.exit_code = 128 + signal.SIGTERM
        raise err from None


def handle_user_errors(f: Callable) -> Callable:
    """Decorator form of :func:`user_errors`."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return f(*args, **kwargs)

    return wrapper


def open_store(path: str, allow_incomplete: bool = False):
    from ..store import FeatureStore

    with user_errors():
        return FeatureStore(path, allow_incomplete=allow_incomplete)


def check_writable(path: Optional[str], overwrite: bool, inputs: Iterable[Optional[str]] = ()) -> None:
    """Fail before any work when an output file (--out, --save) cannot be written or is one of the
    command's ``inputs`` (with or without --overwrite); None: no output."""
    if path:
        from ..outputs import check_output

        check_output(path, overwrite, inputs)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; a CUDA device without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.ClickException(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
        return device
    if device == "cpu":
        return device
    raise click.BadParameter(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N", param_hint="--device")


def eval_splits(store, names: Optional[str] = None) -> list[str]:
    """The splits named in ``names`` (comma-separated, each checked), or [] for :class:`Context`'s default."""
    wanted = [s.strip() for s in (names or "").split(",") if s.strip()]
    for s in wanted:
        if s not in store.splits:
            raise click.ClickException(f"no split {s!r} in {store.path}; available: {', '.join(store.splits)}")
    return wanted


def require_split(store, name: str, purpose: str) -> None:
    if name not in store.splits:
        raise click.ClickException(
            f"{store.path} has no {name!r} split, needed {purpose}; available: {', '.join(store.splits)}"
        )


def check_batch_fits(store, batch_size: Any) -> None:
    """An explicit --batch-size must not exceed the train rows ("auto" shrinks to them; no check
    when the file has no train split)."""
    rows = store.splits["train"].rows if "train" in store.splits else None
    if batch_size != "auto" and rows is not None and batch_size > rows:
        raise click.BadParameter(f"{batch_size} is larger than the {rows} train rows; give at most {rows}, "
                                 "or leave it at auto", param_hint="--batch-size")


def check_training_fits(store, overrides: dict[str, dict], methods: Any) -> None:
    """:func:`check_batch_fits` for the trained methods among ``methods`` (cRT, and LWS when the
    file has a stored classifier): an option only blocks the methods that use it."""
    from ..names import HEAD_METHODS, TRAINED_METHODS

    for m in TRAINED_METHODS:
        if m in methods and (m not in HEAD_METHODS or store.has_head) and "batch_size" in overrides.get(m, {}):
            check_batch_fits(store, overrides[m]["batch_size"])


class MethodNames(click.ParamType):
    """A comma list of method names (old spellings accepted) -> canonical names; ``single``: exactly one."""

    def __init__(self, single: bool = False):
        self.single = single
        self.name = "METHOD" if single else "METHOD[,METHOD...]"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        from ..names import parse_methods

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


# the rule of lt_rebalance.heads.training.plan_schedule (DEFAULT_BATCH_SIZE, MIN_STEPS), spelled
# out here because `--help` must not import torch; tests/test_defaults.py checks they agree
EPOCHS_AUTO_HELP = ("auto: {n}, raised on small files until training takes at least 500 optimiser steps "
                    "(an explicit value is used as given, with a warning below 500 steps).")
BATCH_AUTO_HELP = ("auto: 512, or N // 8 for N < 4096 train rows (at least 8 batches an epoch); an explicit "
                   "value must not exceed the train rows.")


def epochs_option(name: str, reference: int, what: str = "Training epochs") -> Callable:
    return click.option(name, default="auto", show_default=True, type=AutoIntRange(1),
                        help=f"{what}; " + EPOCHS_AUTO_HELP.format(n=reference))


def batch_size_option(what: str = "Batch size") -> Callable:
    return click.option("--batch-size", default="auto", show_default=True, type=AutoIntRange(1),
                        help=f"{what}; " + BATCH_AUTO_HELP)


def require_head(store, command: str) -> None:
    """A stored classifier must exist; a random-init one gets a warning line (its numbers mean little)."""
    if not store.has_head:
        raise click.ClickException(
            f"{store.path} has no stored classifier (/head/weight), which `ltr {command}` needs; "
            "`ltr ncm` and `ltr crt` work without one"
        )
    if store.head_random_init:
        from ..store import RANDOM_HEAD_NOTE

        click.echo(f"warning: {store.path}: {RANDOM_HEAD_NOTE}; `ltr {command}` builds on it", err=True)


def fmt_acc(v: Optional[float]) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def metrics_table(rows: list[tuple[str, dict]], keys=("many", "medium", "few", "all")) -> str:
    """A fixed-width table of accuracies in percent: one row per (label, metrics dict)."""
    width = max([len("method")] + [len(label) for label, _ in rows])
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>6}" for k in keys)]
    for label, m in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(fmt_acc(m.get(k)) for k in keys))
    return "\n".join(lines)


def thresholds_options(f: Callable) -> Callable:
    """--many/--few shot-group thresholds; the command gets ``thresholds={"many": .., "few": ..}``."""

    @functools.wraps(f)
    def wrapper(many: int, few: int, **kwargs: Any) -> Any:
        if few > many + 1:
            raise click.BadParameter(f"--few {few} leaves no room under --many {many}", param_hint="--few")
        return f(thresholds={"many": many, "few": few}, **kwargs)

    wrapper = click.option("--few", default=20, show_default=True, type=Int64Range(0),
                           help="few-shot classes: < FEW train images.")(wrapper)
    return click.option("--many", default=100, show_default=True, type=Int64Range(0),
                        help="many-shot classes: > MANY train images.")(wrapper)


def training_overrides(crt_epochs: Any = "auto", lws_epochs: Any = "auto", batch_size: Any = "auto") -> dict[str, dict]:
    """``overrides`` of :func:`lt_rebalance.experiments.compare`: epochs and batch size of cRT, LWS and
    MARC (trained like LWS); weight balancing keeps its own auto schedule (the authors' 10 epochs of
    batch 64, lengthened on small files)."""
    return {"crt": {"epochs": crt_epochs, "batch_size": batch_size},
            "lws": {"epochs": lws_epochs, "batch_size": batch_size},
            "marc": {"epochs": lws_epochs, "batch_size": batch_size},
            "wb": {}}


def training_options(f: Callable) -> Callable:
    """--crt-epochs, --lws-epochs and --batch-size; the command gets ``overrides`` for the runners."""

    @functools.wraps(f)
    def wrapper(crt_epochs: int, lws_epochs: int, batch_size: int, **kwargs: Any) -> Any:
        return f(overrides=training_overrides(crt_epochs, lws_epochs, batch_size), **kwargs)

    for opt in (
        batch_size_option("cRT, LWS and MARC batch size"),
        epochs_option("--lws-epochs", 5, "LWS and MARC epochs"),
        epochs_option("--crt-epochs", 10, "cRT epochs"),
    ):
        wrapper = opt(wrapper)
    return wrapper


def protocol_options(f: Callable) -> Callable:
    """--test-priors, --bootstrap, --ci-level and --bootstrap-seed; the command gets ``protocol``.

    ``protocol`` is a :class:`lt_rebalance.protocols.Protocol` (shifted test priors, bootstrap).
    """

    @functools.wraps(f)
    def wrapper(test_priors: Optional[str], bootstrap: int, ci_level: float, bootstrap_seed: int,
                **kwargs: Any) -> Any:
        from ..protocols import Protocol, parse_test_priors

        try:
            names = parse_test_priors(test_priors) if test_priors is not None else ()
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--test-priors") from None
        protocol = Protocol(test_priors=names, bootstrap=bootstrap, ci_level=ci_level, bootstrap_seed=bootstrap_seed)
        return f(protocol=protocol, **kwargs)

    for opt in (
        click.option("--bootstrap-seed", default=0, show_default=True, type=int,
                     help="Seed of the bootstrap resamples (the same for every method: paired differences)."),
        click.option("--ci-level", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                     max_open=True), help="Confidence level of the bootstrap intervals."),
        click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0), metavar="B",
                     help="Percentile bootstrap with B resamples of the rows, stratified by class (e.g. 1000)."),
        click.option("--test-priors", default=None, metavar="LIST",
                     help="Shifted test priors (LADE protocol) on the test split, e.g. "
                          "forward-50,forward-10,uniform,backward-10,backward-50 (R >= 1 in forward-R, backward-R)."),
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
