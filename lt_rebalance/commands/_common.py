"""Options, output and error handling shared by the ``ltr`` commands.

Conventions: ``--json`` prints exactly one JSON document on stdout; tables go to stdout otherwise;
progress and logs go to stderr; a user mistake becomes ``click.ClickException`` (one ``Error:``
line, exit status 1) or ``click.BadParameter``/``UsageError`` (exit status 2).
"""
from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
features_option = click.option(
    "--features",
    "-f",
    "features",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Feature file (.h5) written by `ltr extract` or `ltr import`.",
)
allow_incomplete_option = click.option(
    "--allow-incomplete", is_flag=True, help="Use splits whose extraction has not finished (rows written so far)."
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (auto = cuda when available)."
)
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")


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


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's ValueError/FileNotFoundError/FileExistsError into one-line CLI errors."""
    try:
        yield
    except click.ClickException:
        raise
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as e:
        raise click.ClickException(str(e)) from None


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


def check_writable(path: Optional[str], overwrite: bool) -> None:
    """Fail before any work when an output file (--out, --save) cannot be written; None: no output."""
    if path:
        from ..store import atomic_output

        atomic_output(path, overwrite)


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


def check_batch_fits(store, batch_size: int) -> None:
    """--batch-size must not exceed the train rows (no check when the file has no train split)."""
    if "train" in store.splits and batch_size > store.splits["train"].rows:
        raise click.BadParameter(f"{batch_size} is larger than the {store.splits['train'].rows} train rows",
                                 param_hint="--batch-size")


def require_head(store, command: str) -> None:
    if not store.has_head:
        raise click.ClickException(
            f"{store.path} has no stored classifier (/head/weight), which `ltr {command}` needs; "
            "`ltr ncm` and `ltr crt` work without one"
        )


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

    wrapper = click.option("--few", default=20, show_default=True, type=click.IntRange(0),
                           help="few-shot classes: < FEW train images.")(wrapper)
    return click.option("--many", default=100, show_default=True, type=click.IntRange(0),
                        help="many-shot classes: > MANY train images.")(wrapper)


def training_overrides(crt_epochs: int, lws_epochs: int, batch_size: int) -> dict[str, dict]:
    """``overrides`` of :func:`lt_rebalance.experiments.compare`: epochs and batch size of cRT, LWS and
    MARC (trained like LWS; weight balancing keeps its authors' 10 epochs of batch 64)."""
    return {"crt": {"epochs": crt_epochs, "batch_size": batch_size},
            "lws": {"epochs": lws_epochs, "batch_size": batch_size},
            "marc": {"epochs": lws_epochs, "batch_size": batch_size}}


def training_options(f: Callable) -> Callable:
    """--crt-epochs, --lws-epochs and --batch-size; the command gets ``overrides`` for the runners."""

    @functools.wraps(f)
    def wrapper(crt_epochs: int, lws_epochs: int, batch_size: int, **kwargs: Any) -> Any:
        return f(overrides=training_overrides(crt_epochs, lws_epochs, batch_size), **kwargs)

    for opt in (
        click.option("--batch-size", default=512, show_default=True, type=click.IntRange(1),
                     help="cRT, LWS and MARC batch size (at most the train rows)."),
        click.option("--lws-epochs", default=5, show_default=True, type=click.IntRange(1), help="LWS and MARC epochs."),
        click.option("--crt-epochs", default=10, show_default=True, type=click.IntRange(1)),
    ):
        wrapper = opt(wrapper)
    return wrapper
