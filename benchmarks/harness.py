"""Measuring: medians of repeats after one warm-up, peak memory, results and the table.

Peak memory is the process's peak RSS over the call minus its RSS just before (Linux: the peak
counter ``VmHWM`` is reset through ``/proc/self/clear_refs`` before each call, so the figure is
exact, not sampled). Where that is not possible, a thread samples ``VmRSS`` every 2 ms. On CUDA
the peak of ``torch.cuda.max_memory_allocated`` over the call is reported as well.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

MiB = 2**20


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Context manager: ``delta_mib`` is the peak RSS during the block minus RSS at its start."""

    method = "VmHWM reset via /proc/self/clear_refs"

    def __enter__(self) -> PeakRSS:
        self.start = _status_kib("VmRSS") or 0
        self._exact = _reset_hwm() and _status_kib("VmHWM") is not None
        self._peak = self.start
        self._stop = threading.Event()
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _status_kib("VmRSS") or 0)

    def __exit__(self, *exc: Any) -> None:
        if self._exact:
            self._peak = _status_kib("VmHWM") or self.start
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _status_kib("VmRSS") or 0)
        self.delta_mib = max(self._peak - self.start, 0) / 1024


def memory_method() -> str:
    ok = _reset_hwm() and _status_kib("VmHWM") is not None
    return "peak RSS delta (VmHWM reset per call)" if ok else "peak RSS delta (VmRSS sampled every 2 ms)"


@dataclass
class Timing:
    seconds: float  # median
    runs: list[float]
    peak_rss_mib: float  # largest over the runs
    cuda_peak_mib: Optional[float] = None


def measure(fn: Callable[[], Any], *, repeats: int = 3, warmup: bool = True, device: str = "cpu") -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one unmeasured warm-up call)."""
    import gc

    cuda = device.startswith("cuda")
    if cuda:
        import torch
    if warmup:
        fn()
        _sync(device)
    runs, rss, cuda_peak = [], 0.0, None
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            runs.append(time.perf_counter() - t0)
        del out
        rss = max(rss, mem.delta_mib)
        if cuda:
            cuda_peak = max(cuda_peak or 0.0, (torch.cuda.max_memory_allocated() - base) / MiB)
    return Timing(statistics.median(runs), runs, rss, cuda_peak)


def measure_pair(fa: Callable[[], Any], fb: Callable[[], Any], *, repeats: int = 3, warmup: bool = True,
                 device: str = "cpu") -> tuple[Timing, Timing]:
    """:func:`measure` of ``fa`` and ``fb`` interleaved (a, b, a, b, ...): on a shared machine the load
    changes over seconds, so a ratio is fairer between neighbouring runs. Each Timing's ``seconds``
    is the best (minimum) of its runs: the least disturbed one."""
    ta: list[Timing] = []
    tb: list[Timing] = []
    if warmup:
        fa(), _sync(device), fb(), _sync(device)
    for _ in range(repeats):
        ta.append(measure(fa, repeats=1, warmup=False, device=device))
        tb.append(measure(fb, repeats=1, warmup=False, device=device))

    def merged(ts: list[Timing]) -> Timing:
        runs = [t.runs[0] for t in ts]
        peaks = [t.cuda_peak_mib for t in ts if t.cuda_peak_mib is not None]
        return Timing(min(runs), runs, max(t.peak_rss_mib for t in ts), max(peaks) if peaks else None)

    return merged(ta), merged(tb)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Result:
    """One row of the table.

    ``ratio`` is op/floor for kind "time" (goal: at most ``goal``), floor/op for kind "speed"
    (fraction of the floor's speed; goal: at least ``goal``), op - floor in seconds for kind "excess"
    (goal: at most ``goal``), floor/op as a speed-up for kind "info" (no goal), and peak RSS over the
    memory floor ``floor_peak_rss_mib`` for kind "memory" (goal: at most ``goal``)."""

    name: str
    operation: str
    seconds: Optional[float] = None
    floor_seconds: Optional[float] = None
    floor: str = ""
    kind: str = "time"
    goal: Optional[float] = None
    ratio: Optional[float] = None
    passed: Optional[bool] = None
    peak_rss_mib: Optional[float] = None
    floor_peak_rss_mib: Optional[float] = None
    cuda_peak_mib: Optional[float] = None
    status: str = "ok"  # "ok", "not available yet", "skipped", "error"
    note: str = ""
    runs: list = field(default_factory=list)
    floor_runs: list = field(default_factory=list)

    def finish(self) -> Result:
        if self.kind == "memory":  # peak RSS of a whole process over a memory floor
            if self.peak_rss_mib and self.floor_peak_rss_mib:
                self.ratio = self.peak_rss_mib / self.floor_peak_rss_mib
                self.passed = self.ratio <= self.goal
            return self
        if self.seconds is None or self.floor_seconds is None or self.floor_seconds <= 0 or self.seconds <= 0:
            return self
        if self.kind == "time":
            self.ratio = self.seconds / self.floor_seconds
            self.passed = self.ratio <= self.goal
        elif self.kind == "speed":
            self.ratio = self.floor_seconds / self.seconds
            self.passed = self.ratio >= self.goal
        elif self.kind == "excess":
            self.ratio = self.seconds - self.floor_seconds
            self.passed = self.ratio <= self.goal
        else:  # info: the speed-up of the floor (our way) over the operation (the naive way)
            self.ratio = self.seconds / self.floor_seconds
        return self

    @property
    def goal_text(self) -> str:
        if self.goal is None:
            return "report"
        return {"time": f"<= {self.goal:g}x", "memory": f"<= {self.goal:g}x", "speed": f">= {self.goal:g}x", "excess": f"<= +{self.goal:g} s"}[self.kind]

    @property
    def ratio_text(self) -> str:
        if self.ratio is None:
            return "-"
        if self.kind == "excess":
            return f"{self.ratio:+.3f} s"
        return f"{self.ratio:.2f}x"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["goal_text"] = self.goal_text
        return d


def timed(
    name: str,
    operation: str,
    op: Callable[[], Any],
    floor_fn: Callable[[], Any],
    *,
    floor: str,
    kind: str = "time",
    goal: Optional[float] = None,
    repeats: int = 3,
    warmup: bool = True,
    device: str = "cpu",
    note: str = "",
    floor_scale: float = 1.0,
) -> Result:
    """Measure ``op`` and ``floor_fn`` side by side (floor first) and build the row.

    ``floor_scale`` multiplies the floor's time (e.g. G x one head).
    """
    f = measure(floor_fn, repeats=repeats, warmup=warmup, device=device)
    o = measure(op, repeats=repeats, warmup=warmup, device=device)
    return Result(
        name, operation, o.seconds, f.seconds * floor_scale, floor, kind, goal,
        peak_rss_mib=o.peak_rss_mib, floor_peak_rss_mib=f.peak_rss_mib, cuda_peak_mib=o.cuda_peak_mib,
        note=note, runs=o.runs, floor_runs=[r * floor_scale for r in f.runs],
    ).finish()


def timed_pair(name: str, operation: str, op: Callable[[], Any], floor_fn: Callable[[], Any], *, floor: str,
               kind: str = "time", goal: Optional[float] = None, repeats: int = 3, warmup: bool = True,
               device: str = "cpu", note: str = "") -> Result:
    """:func:`timed` with op and floor interleaved and the best run of each (:func:`measure_pair`):
    for ratios between two variants of one operation (bfloat16 against float32)."""
    f, o = measure_pair(floor_fn, op, repeats=repeats, warmup=warmup, device=device)
    return Result(
        name, operation, o.seconds, f.seconds, floor, kind, goal,
        peak_rss_mib=o.peak_rss_mib, floor_peak_rss_mib=f.peak_rss_mib, cuda_peak_mib=o.cuda_peak_mib,
        note=note, runs=o.runs, floor_runs=f.runs,
    ).finish()


def machine() -> dict:
    """CPU model, cores, torch version (and GPU when present)."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    out = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        with open("/proc/meminfo") as f:
            out["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    if hasattr(os, "getloadavg"):  # other work on the machine skews the times (1-minute load average)
        out["load_average"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    from lt_rebalance.precision import cpu_flags, cpu_has_bf16_units

    out["cpu_bf16_units"] = cpu_has_bf16_units()
    out["cpu_bf16_flags"] = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    return out


def _fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_mib(r: Result) -> str:
    if r.peak_rss_mib is None:
        return "-"
    s = f"{r.peak_rss_mib:.0f} MiB"
    if r.cuda_peak_mib is not None:
        s += f" (CUDA {r.cuda_peak_mib:.0f} MiB)"
    return s


COLUMNS = ("operation", "time", "floor", "ratio", "goal", "pass/fail", "peak memory")


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        verdict = {True: "pass", False: "FAIL", None: "-"}[r.passed]
        if r.status != "ok":
            verdict = r.status
        floor = f"{_fmt_s(r.floor_seconds)} ({r.floor})" if r.floor_seconds is not None else r.floor or "-"
        if r.kind == "memory" and r.floor_peak_rss_mib is not None:
            floor = f"{r.floor_peak_rss_mib:.0f} MiB ({r.floor})"
        rows.append((r.operation, _fmt_s(r.seconds), floor, r.ratio_text, r.goal_text, verdict, _fmt_mib(r)))
    return rows


def format_table(results: list[Result]) -> str:
    """A plain-text table for the terminal."""
    rows = [COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(results: list[Result]) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)
