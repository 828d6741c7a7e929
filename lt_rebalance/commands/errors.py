"""How the ``ltr`` commands fail: a user mistake is one ``Error:`` line (exit status 1, or 2 for a
bad option), Ctrl-C one line and exit status 130, library warnings ``warning: ...`` lines on stderr."""
from __future__ import annotations

import errno
import functools
import re
import signal
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click


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


def handle_user_errors(f: Callable) -> Callable:
    """Decorator form of :func:`user_errors`."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return f(*args, **kwargs)

    return wrapper


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
