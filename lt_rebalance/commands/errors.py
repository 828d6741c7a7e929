"""How the ``ltr`` commands fail: a user mistake is one ``Error:`` line (exit status 1, or 2 for a
bad option), Ctrl-C one line and exit status 130, library warnings ``warning: ...`` lines on stderr."""
from __future__ import annotations

import errno
import functools
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
        try:
            yield
        except click.ClickException:
            raise
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # e.g. EROFS or ENOSPC outside a writer of lt_rebalance.outputs: name the path
            if e.strerror is None:
                raise click.ClickException(str(e)) from None
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})") from None


def handle_user_errors(f: Callable) -> Callable:
    """Decorator form of :func:`user_errors`."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return f(*args, **kwargs)

    return wrapper


class Interrupted(click.ClickException):
    """Ctrl-C: one ``Error:`` line saying what was (not) changed, exit status 130 (128 + SIGINT)."""

    exit_code = 130


@contextmanager
def interrupts_as_errors() -> Iterator[None]:
    """Ctrl-C becomes :class:`Interrupted` (its message from the writer that stopped), not click's "Aborted!"."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise Interrupted(str(e) or "interrupted; no output was written") from None
