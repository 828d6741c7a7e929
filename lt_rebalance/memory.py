"""How much memory this process may use: the kernel's ``MemAvailable`` and the job's cgroup limit.

Batch schedulers (SLURM, Kubernetes, containers) confine a job to a memory cgroup much smaller than
the machine: a plan from ``/proc/meminfo`` alone then overshoots and the job is OOM-killed. Both
cgroup v2 (``memory.max`` - ``memory.current``) and v1 (``memory.limit_in_bytes`` -
``memory.usage_in_bytes``), less the inactive file cache of ``memory.stat``, are read for this
process's cgroup and each of its ancestors. Torch-free, so that ``ltr info`` can use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-aligned number


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None  # "max" (v2: no limit) -> None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of this process's memory cgroup and its ancestors, v2 and v1."""
    out = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified hierarchy
            base, limit, usage = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base = root / "memory" if (root / "memory").is_dir() else root / controllers
            limit, usage = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        here = Path(rel.strip())
        for p in [here, *here.parents]:  # a limit set on an ancestor (the job) also binds
            out.append((base / str(p).lstrip("/"), limit, usage))
    return out


def _inactive_file(folder: Path) -> int:
    """Bytes of inactive file cache charged to the cgroup (``memory.stat``): reclaimable, so not in use."""
    try:
        text = (folder / "memory.stat").read_text()
    except OSError:
        return 0
    m = re.search(r"^(?:total_)?inactive_file (\d+)$", text, re.M)
    return int(m.group(1)) if m else 0


def cgroup_available(root: Path = CGROUP_ROOT, proc_cgroup: Optional[str] = None) -> Optional[int]:
    """Bytes left below the tightest memory cgroup limit over this process's cgroups; None when unlimited."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    best = None
    for folder, limit_file, usage_file in _cgroup_dirs(root, proc_cgroup):
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= _UNLIMITED:
            continue
        usage = (_read_int(folder / usage_file) or 0) - _inactive_file(folder)  # page cache the kernel can drop
        left = max(limit - max(usage, 0), 0)
        best = left if best is None else min(best, left)
    return best


def available_memory() -> Optional[int]:
    """Bytes of memory this process can still use: the kernel's ``MemAvailable``, capped by the job's
    cgroup limit (v1 or v2) when one is set; None when unknown."""
    free = _meminfo_available()
    limit = cgroup_available()
    if limit is None:
        return free
    return limit if free is None else min(free, limit)


def gib(n: float) -> str:
    """``n`` bytes as a short human size (``2.0 GB``, ``512 MB``, ``3.1 TB``; powers of 1024)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"
