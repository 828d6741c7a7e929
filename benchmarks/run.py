"""Command line and driver: ``python -m benchmarks [--scale ...] [--only NAME] [--json out.json]``."""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from .data import REPO, SCALES, class_counts, feature_file, shapes
from .harness import Result, format_markdown, format_table, machine, memory_method
from .ops import OPERATIONS, Bench, run_study

DEFAULT_OUT = REPO / "bench-out"


def run(
    scale: str = "small",
    only: Optional[Sequence[str]] = None,
    *,
    device: str = "cpu",
    repeats: Optional[int] = None,
    out_dir: Path = DEFAULT_OUT,
    study: bool = False,
    crt_epochs: int = 10,
    warmup: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the suite at ``scale``; returns the JSON document (also what ``--json`` writes)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    names = list(only or OPERATIONS)
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(OPERATIONS)}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    sc = SCALES[scale]
    t0 = time.perf_counter()
    path = feature_file(sc, Path(out_dir), log=log)
    counts, source = class_counts(sc)
    if repeats is None:
        repeats = 3 if scale in ("tiny", "small") else 2
    bench = Bench(path, sc, device=device, repeats=repeats, warmup=warmup, workdir=Path(out_dir), log=log)
    results: list[Result] = []
    for name in names:
        t = time.perf_counter()
        try:
            rs = OPERATIONS[name](bench)
        except Exception as e:  # one broken operation must not hide the others
            traceback.print_exc(file=sys.stderr)
            rs = Result(name, name, status="error", note=f"{type(e).__name__}: {e}")
        for r in rs if isinstance(rs, list) else [rs]:  # an operation may report several rows
            log(f"[{name}] {r.operation}: {r.ratio_text} (goal {r.goal_text}) {r.status}  "
                f"({time.perf_counter() - t:.1f} s)")
            results.append(r)
    doc = {
        "scale": scale,
        "description": sc.description,
        "shapes": {**shapes(sc, counts), "feature_dtype_on_disk": "float16", "counts": source},
        "device": device,
        "repeats": repeats,
        "memory": memory_method(),
        "machine": machine(),
        "operations": [r.to_dict() for r in results],
        "table_markdown": format_markdown(results),
    }
    if study:
        log(f"running the whole classifier study at scale {scale} (cRT {crt_epochs} epochs) ...")
        doc["study"] = run_study(bench, crt_epochs)
    doc["total_seconds"] = time.perf_counter() - t0
    doc["machine"]["load_average_end"] = machine().get("load_average")
    return doc


def summary(doc: dict) -> str:
    from .harness import Result as R

    results = [R(**{k: v for k, v in r.items() if k != "goal_text"}) for r in doc["operations"]]
    m = doc["machine"]
    sh = doc["shapes"]
    lines = [
        f"scale {doc['scale']} ({doc['description']}): " + ", ".join(f"{k} {v}" for k, v in sh["splits"].items())
        + f"; D {sh['dim']}, C {sh['num_classes']}; counts: {sh['counts']}; {sh['feature_dtype_on_disk']} on disk",
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; device {doc['device']}"
        + f"; load average {m.get('load_average')} at start, {m.get('load_average_end')} at end",
        f"times: median of {doc['repeats']} after a warm-up; memory: {doc['memory']}",
        "",
        format_table(results),
    ]
    if "study" in doc:
        st = doc["study"]
        lines += ["", f"whole classifier study (compare's default methods, cRT {st['crt_epochs']} epochs): "
                  f"{st['seconds']:.1f} s end to end, peak RSS +{st['peak_rss_mib']:.0f} MiB"]
        lines += [f"  {k}: {v['seconds']:.2f} s" for k, v in st["methods"].items()]
    lines.append(f"total {doc['total_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--scale", default="small", choices=list(SCALES))
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"run only this operation (repeatable, or comma-separated): {', '.join(OPERATIONS)}")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, help="timed repeats per operation (default 3; 2 at full scales)")
    p.add_argument("--study", action="store_true",
                   help="also time the whole classifier study end to end (ltr compare, its default methods)")
    p.add_argument("--crt-epochs", type=int, default=10, help="cRT epochs in --study (default 10)")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help="where the synthetic feature files are cached")
    a = p.parse_args(argv)
    only = [n for item in a.only or [] for n in item.split(",") if n]
    try:
        doc = run(a.scale, only or None, device=a.device, repeats=a.repeats, out_dir=Path(a.out_dir),
                  study=a.study, crt_epochs=a.crt_epochs, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        p.error(str(e))
    print(summary(doc))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0
