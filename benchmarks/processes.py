"""Whole ``ltr`` processes: wall time and peak RSS of one command on the benchmark file.

Each command runs in a child of a small python wrapper that prints
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (a child forked from the large benchmark process
would report that process's RSS as its own peak). The memory floor is what any run must hold: the
RSS of a process that only imports torch, plus the feature bytes of the file in their stored dtype
(every split is read once and kept). Goal: peak RSS at most 1.5 x that floor.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .harness import Result

MEMORY_GOAL = 1.5
_WRAPPER = (
    "import resource, subprocess, sys; "
    "r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'wb'), stderr=subprocess.DEVNULL); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def child_run(argv: list[str], stdout_path: Optional[Path] = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``argv``; its stdout goes to ``stdout_path`` (default: discarded)."""
    out = str(stdout_path) if stdout_path else "/dev/null"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, out, *argv], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    code, kib = (int(v) for v in done.stdout.split()[-2:])
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with status {code}")
    return seconds, kib / 1024


def ltr_argv(*args: str) -> list[str]:
    ltr = shutil.which("ltr")
    return [ltr, *args] if ltr else [sys.executable, "-m", "lt_rebalance.cli", *args]


def feature_bytes(store) -> int:
    """Bytes of every split's features (and stored views) in their on-disk dtype."""
    itemsize = {"float16": 2, "float32": 4}
    total = 0
    for info in store.splits.values():
        total += info.rows * store.dim * itemsize[info.dtype] * (1 + info.views)
    return total


# name -> (label, ltr arguments after the command's own name); "{f}" is the feature file
COMMANDS: dict[str, tuple[str, ...]] = {
    "joint": ("joint",),
    "ncm": ("ncm",),
    "tau-sweep": ("tau-sweep",),
    "logit-adjust": ("logit-adjust",),
    "crt": ("crt", "--epochs", "1", "--device", "cpu"),
    "calibrate": ("calibrate", "--method", "joint", "--device", "cpu"),
    "lws": ("lws", "--device", "cpu"),
    "compare": ("compare", "--crt-epochs", "1", "--device", "cpu"),
}
TINY_COMMANDS = ("joint",)  # the smoke test runs one child; full scales run them all


def process_memory_op(b, commands: Optional[tuple[str, ...]] = None) -> list[Result]:
    """One row per command: peak RSS against (torch import + float16 feature bytes), wall time beside."""
    commands = commands or (TINY_COMMANDS if b.scale.name == "tiny" else tuple(COMMANDS))
    import_s, import_mib = child_run([sys.executable, "-c", "import torch"])
    data_mib = feature_bytes(b.store) / 2**20
    floor_mib = import_mib + data_mib
    rows = []
    for name in commands:
        args = COMMANDS[name]
        stdout = Path(b.workdir or ".") / f".bench-{name}.json"
        seconds, peak = child_run(ltr_argv(*args, "-f", str(b.path), "--json", "--quiet"), stdout)
        note = f"floor: torch import {import_mib:.0f} MiB + features {data_mib:.0f} MiB"
        if name == "compare":
            doc = json.loads(stdout.read_text())
            note += "; " + ", ".join(f"{r['method']} {r['seconds']:.1f} s" for r in doc["rows"])
        stdout.unlink(missing_ok=True)
        b.log(f"  ltr {' '.join(args)}: {seconds:.1f} s, peak RSS {peak:.0f} MiB (floor {floor_mib:.0f} MiB)")
        rows.append(Result(
            "process_memory", f"`ltr {' '.join(args)}` (whole process)", seconds, import_s,
            "torch import + features in memory", "memory", MEMORY_GOAL, peak_rss_mib=peak,
            floor_peak_rss_mib=floor_mib, note=note, runs=[seconds], floor_runs=[import_s],
        ).finish())
    return rows


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1 memory controller (where writable)


def _cgroup(limit: int) -> Optional[Path]:
    """A fresh memory cgroup limited to ``limit`` bytes (swap included), or None where none can be made."""
    path = CGROUP_ROOT / f"ltr-bench-{time.time_ns()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit))
    except OSError:
        if path.exists():
            path.rmdir()
        return None
    return path


def larger_than_memory_op(b, commands: Optional[tuple[str, ...]] = None) -> list[Result]:
    """Each command run with ``--max-memory`` at half the file's feature bytes (the file is 2x the
    allowance), inside a memory cgroup of torch import + that allowance where one can be made, and
    its JSON compared with the in-memory run's: identical results are the goal (ratio = peak
    cgroup memory / limit)."""
    commands = commands or (TINY_COMMANDS if b.scale.name == "tiny" else ("joint", "ncm", "tau-sweep", "crt"))
    import_s, import_mib = child_run([sys.executable, "-c", "import torch"])
    allowance = feature_bytes(b.store) // 2
    limit = int(import_mib * 2**20) + allowance
    rows = []
    for name in commands:
        args = COMMANDS[name]
        base = ltr_argv(*args, "-f", str(b.path), "--json")
        ref, out = (Path(b.workdir or ".") / f".bench-{name}-{k}.json" for k in ("memory", "mapped"))
        child_run(base, ref)
        group = _cgroup(limit)
        argv = [*base, "--max-memory", str(allowance)]
        if group is not None:
            argv = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *argv]
        try:
            seconds, peak = child_run(argv, out)
            if group is not None:
                peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        finally:
            if group is not None:
                group.rmdir()
        same = ref.read_text() == out.read_text()
        ref.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        where = f"cgroup limit {limit / 2**20:.0f} MiB" if group is not None else "no cgroup (limit not enforced)"
        note = (f"file features {2 * allowance / 2**20:.0f} MiB, --max-memory {allowance / 2**20:.0f} MiB, {where}; "
                f"results identical to the in-memory run: {same}")
        b.log(f"  ltr {' '.join(args)} --max-memory: {seconds:.1f} s, peak {peak:.0f} MiB; {note}")
        rows.append(Result(
            "larger_than_memory", f"`ltr {' '.join(args)} --max-memory` on a file 2x the allowance", seconds, import_s,
            "torch import + allowance", "memory", 1.0, peak_rss_mib=peak, floor_peak_rss_mib=limit / 2**20,
            note=note, runs=[seconds], floor_runs=[import_s],
        ).finish())
        rows[-1].passed = rows[-1].passed and same
    return rows
