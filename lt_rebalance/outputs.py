"""Writing output files safely: every ``ltr`` writer goes through here (docs/BAD_INPUTS.md, "Output safety").

- :func:`check_output` before any long work: the folder exists and is writable (a probe file is
  created and removed, so a read-only file system fails now, not after training), the output is not
  one of the command's inputs however it is spelled, and it exists only with ``overwrite``.
- :func:`atomic_write`: write a temporary file in the same folder, then :func:`publish` it: a rename
  with ``overwrite``, else a hard link that fails if the target appeared meanwhile (never a blind
  rename over a file nobody checked).
- Temporary files are named ``.NAME.ltr-HOST-PID-RAND.tmp``; a process killed by SIGKILL cannot
  remove its own, so every later write to the folder removes those of dead processes of this host
  (:func:`remove_stale_temps`).
- Ctrl-C: h5py runs Python code in weakref callbacks, where a ``KeyboardInterrupt`` is only printed
  ("Exception ignored in ... WeakValueDictionary") and lost. :func:`interrupt_guard` records such
  interrupts and raises them at the next :func:`check_interrupt` or at the end of the block, so a
  write is always stopped before it publishes.
- OS errors of a write (read-only file system, full disk, quota, permissions), which h5py and torch
  hide in their own messages, become one :class:`OutputError` naming the path, the cause and the fix.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()
_TEMP = re.compile(r"^\..+\.ltr-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")

_HINTS = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space (disk quota exceeded) or choose another folder",
    errno.EROFS: "the file system is mounted read-only: choose a writable folder",
    errno.EACCES: "check the folder's permissions or choose another folder",
    errno.EPERM: "check the folder's permissions or choose another folder",
    errno.EFBIG: "the file system cannot hold a file this large: choose another folder",
    errno.EIO: "the disk reported an I/O error: check it, or choose another folder",
}
_BY_MESSAGE = {os.strerror(code): code for code in _HINTS}


class OutputError(OSError):
    """An output that cannot be written; the message names the path, the cause and what to do."""


class OutputExists(FileExistsError):
    """An output that exists and may not be replaced: ``str()`` in the library's words
    (``overwrite=True``), :attr:`cli_message` in the command line's (``--overwrite``)."""

    def __init__(self, path: PathLike):
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")
        self.cli_message = f"{path} already exists; pass --overwrite to replace it"


class WriteInterrupted(KeyboardInterrupt):
    """Ctrl-C during a write; ``str()`` says what was (not) changed."""


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` are one file: same inode (symlinks, hard links), or same real path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def not_regular(path: PathLike) -> Optional[str]:
    """What is at ``path`` when it exists and is not a regular file (never following a link), else None.

    Outputs are written only as regular files: a rename over a device node, a FIFO or a symbolic link
    replaces that object (``--out /dev/null --overwrite`` run as root would replace the system's
    ``/dev/null``).
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link to {os.readlink(path)}"
        except OSError:
            return "a symbolic link"
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def refuse_not_regular(path: PathLike) -> None:
    """Raise :class:`OutputError` when ``path`` exists and is not a regular file (see :func:`not_regular`)."""
    kind = not_regular(path)
    if kind is not None:
        raise OutputError(f"{path} is {kind}, not a regular file; outputs are written only as regular files and "
                          "this one is not replaced, even with --overwrite: choose another path")


def temp_path(path: PathLike) -> Path:
    """A fresh temporary name beside ``path`` (the caller creates the file, e.g. h5py mode "w-")."""
    path = Path(path)
    return path.parent / f".{path.name}.ltr-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


# Open-file-description locks (Linux): held by the descriptor, not the process, so a writer's own
# close of another descriptor of the file (h5py, torch.save) does not drop it; they do not conflict
# with the flock() that HDF5 takes on files it writes.
_F_OFD_GETLK, _F_OFD_SETLK = getattr(fcntl, "F_OFD_GETLK", None), getattr(fcntl, "F_OFD_SETLK", None)
_held: dict[str, int] = {}  # temporary files this process writes -> the descriptor holding their lock


def _ofd(fd: int, cmd: Optional[int], kind: int) -> Optional[int]:
    """fcntl(F_OFD_*) of a whole-file lock of ``kind``; the l_type the kernel returns, None if unsupported."""
    if cmd is None:
        return None
    try:
        out = fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", kind, 0, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return fcntl.F_WRLCK  # held by someone else
        return None
    return struct.unpack("hhqqi4x", out)[0]


def hold_temp(tmp: PathLike) -> None:
    """Create the temporary file ``tmp`` and hold a lock on it until :func:`release_temp`: proof that
    its writer is alive, which a pid is not (another pid namespace on this host, e.g. a container
    with host networking, reuses pids). Writers then write into the file (same inode)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    _ofd(fd, _F_OFD_SETLK, fcntl.F_WRLCK)
    _held[str(tmp)] = fd


def held_temp(path: PathLike) -> bool:
    """True when ``path`` is a temporary file this process created with :func:`hold_temp` (still empty
    or being written): writers may open it with truncation instead of exclusive creation."""
    return str(path) in _held


def release_temp(tmp: PathLike) -> None:
    fd = _held.pop(str(tmp), None)
    if fd is not None:
        quietly(os.close, fd)


def _locked_by_writer(path: str) -> bool:
    """True when some process (in any pid namespace) holds the lock of :func:`hold_temp` on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _ofd(fd, _F_OFD_GETLK, fcntl.F_WRLCK) not in (None, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid: keep
        return True
    return True


def remove_stale_temps(folder: PathLike) -> list[Path]:
    """Remove our temporary files in ``folder`` left by dead processes of this host; returns them.

    Only regular files owned by this user whose name matches :func:`temp_path`'s pattern, written
    on this host by a pid that no longer runs, and whose writer's lock (:func:`hold_temp`) is not
    held, are removed. (Earlier versions named them
    ``.NAME.PID.HEX.tmp``, too close to a user's name to delete unasked.)
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _HOST:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not _alive(int(m["pid"]))
                    and not _locked_by_writer(entry.path)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def os_cause(exc: BaseException, folder: PathLike) -> Optional[int]:
    """The errno behind a failed write, or None when it was not an OS error.

    h5py puts it in its message ("errno = 28"), torch only the strerror text or nothing at all
    ("unexpected pos 576 vs 534" on a full disk), so a full file system is also asked directly.
    """
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    if m := re.search(r"errno = (\d+)", text):
        return int(m.group(1))
    for message, code in _BY_MESSAGE.items():
        if message in text:
            return code
    try:
        if os.statvfs(folder).f_bavail == 0:
            return errno.ENOSPC
    except OSError:
        pass
    return None


def write_failure(path: PathLike, code: int, what: str = "cannot write", then: str = "") -> OutputError:
    """One line: ``{what} {path}: {strerror} ({ENAME}); {what to do}{then}``."""
    name = errno.errorcode.get(code, str(code))
    hint = _HINTS.get(code, "choose another folder")
    return OutputError(f"{what} {path}: {os.strerror(code)} ({name}); {hint}{then}")


def check_output(path: PathLike, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Check that ``path`` may be written by a command that reads ``inputs``; fail before any work.

    Raises FileNotFoundError (no folder), ValueError (``path`` is an input, with or without
    ``overwrite``), IsADirectoryError, FileExistsError (exists, no ``overwrite``) or
    :class:`OutputError` (the folder cannot be written: read-only, permissions, full; or ``path``
    is not a regular file: a device, FIFO, socket or symbolic link, with or without ``overwrite``).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    for source in inputs:
        if source is not None and same_file(path, source):
            raise ValueError(f"{path} is the same file as the input {source}; writing it would destroy the "
                             "input (even with --overwrite): choose another output path")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    refuse_not_regular(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExists(path)
    remove_stale_temps(path.parent)
    probe = temp_path(path)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise write_failure(path, e.errno or errno.EIO) from None
    quietly(os.unlink, probe)
    return path


def atomic_output(path: PathLike, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """:func:`check_output`, then a fresh temporary path in the same folder."""
    return temp_path(check_output(path, overwrite, inputs))


def publish(tmp: PathLike, path: PathLike, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path``: ``os.replace`` with ``overwrite``, else a no-replace move.

    Without ``overwrite`` a hard link publishes the file, which fails when ``path`` appeared while the
    command ran (another process wrote it): that file is left alone and FileExistsError raised.
    Where hard links are not supported, a rename after a last check is used instead.
    """
    if overwrite:
        refuse_not_regular(path)  # appeared since check_output
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while this command ran (written by another process?); "
                              "not replacing it: pass --overwrite to replace it, or choose another path") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):  # no hard links on this file system (FAT, some FUSE mounts)
            raise FileExistsError(f"{path} appeared while this command ran; not replacing it: pass --overwrite "
                                  "to replace it, or choose another path") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Clean-up that never hides the error being reported: ``fn(*args)``, its own errors dropped."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


def atomic_write(path: PathLike, write: Callable[[Path], Any], overwrite: bool = False,
                 inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """``write(tmp)`` a temporary file in ``path``'s folder, then :func:`publish` it as ``path``.

    The temporary file is removed on any failure (Ctrl-C included, raised as
    :class:`WriteInterrupted`), so ``path`` only ever holds a complete file; an existing ``path`` is
    replaced only with ``overwrite``, and never when it is one of ``inputs``.
    """
    path = Path(path)
    tmp = atomic_output(path, overwrite, inputs)
    try:
        hold_temp(tmp)
        with interrupt_guard():
            write(tmp)
        with deferred_sigint() as pending:
            publish(tmp, path, overwrite)
    except BaseException as e:
        # the cause first: a full disk is seen only while the temporary file still fills it
        code = None if isinstance(e, (FileExistsError, KeyboardInterrupt)) else os_cause(e, path.parent)
        quietly(os.unlink, tmp)
        if isinstance(e, KeyboardInterrupt):
            raise WriteInterrupted(f"interrupted; {path} was not changed") from None
        if code is not None:
            raise write_failure(path, code) from None
        raise
    finally:
        release_temp(tmp)
    if pending:
        raise WriteInterrupted(f"interrupted; {path} was written completely")
    return path


# -- Ctrl-C inside h5py ------------------------------------------------------------------------------
_guards = 0
_lost = 0  # KeyboardInterrupts swallowed as "unraisable" inside a guard, not yet re-raised
_previous_hook = sys.unraisablehook


def _record_lost_interrupt(unraisable: Any) -> None:
    global _lost
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        _lost += 1
    else:
        _previous_hook(unraisable)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if one was swallowed (inside :func:`interrupt_guard`) since the last call."""
    global _lost
    if _lost:
        _lost = 0
        raise KeyboardInterrupt


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_last_signal: list[int] = []  # the stop signal last received (SIGINT when a Ctrl-C came some other way)


def last_stop_signal() -> int:
    """The signal behind the current interrupt: SIGTERM when :func:`sigterm_as_interrupt` turned one
    into a KeyboardInterrupt, else SIGINT."""
    return _last_signal[-1] if _last_signal else signal.SIGINT


def _raise_interrupt(signum: int, frame: Any) -> None:
    _last_signal.append(signum)
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what batch schedulers send before SIGKILL) raises KeyboardInterrupt, like Ctrl-C, so
    every writer stops the same way: temporary files removed, outputs intact, locks released, children
    stopped. :func:`last_stop_signal` says which it was. Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _last_signal.clear()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_sigint() -> Iterator[list]:
    """Hold Ctrl-C and SIGTERM off a step that must not be cut in two (publishing a file): the yielded
    list records the signals that arrived, for the caller to act on afterwards. Main thread only."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)
        _last_signal.append(signum)

    previous = {s: signal.signal(s, hold) for s in _STOP_SIGNALS}
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def interrupt_guard() -> Iterator[None]:
    """Keep Ctrl-C from being lost in h5py's weakref callbacks: recorded there, raised at the end."""
    global _guards, _lost, _previous_hook
    if _guards == 0:
        _lost = 0
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _record_lost_interrupt
    _guards += 1
    try:
        yield
        check_interrupt()
    finally:
        _guards -= 1
        if _guards == 0:
            sys.unraisablehook = _previous_hook
