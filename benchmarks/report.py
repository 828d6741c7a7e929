"""Markdown for the README's Performance section from one or more ``--json`` outputs.

    python -m benchmarks.report bench-out/small.json bench-out/imagenet_lt.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence


def section(docs: Sequence[dict]) -> str:
    m = docs[0]["machine"]
    lines = [
        "## Performance",
        "",
        "Measured with `python -m benchmarks` (see `benchmarks/`): every operation is timed next to its floor in "
        "the same process (median of repeats after a warm-up), so the ratios hold better than absolute times. "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB, torch {m['torch']}, CPU only. "
        "Peak memory: " + docs[0]["memory"] + ". Features are synthetic with the real per-class train counts, "
        "float16 on disk.",
    ]
    for doc in docs:
        sh = doc["shapes"]
        splits = ", ".join(f"{k} {v:,}" for k, v in sh["splits"].items())
        load = doc["machine"].get("load_average"), doc["machine"].get("load_average_end")
        lines += [
            "",
            f"**{doc['scale']}** ({doc['description']}: {splits}; D {sh['dim']}, C {sh['num_classes']}; "
            f"load average {load[0]} / {load[1]} at start / end):",
            "",
            doc["table_markdown"],
        ]
        st = doc.get("study")
        if st:
            per = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in st["methods"].items())
            lines += [
                "",
                f"Whole {doc['scale']} classifier study end to end on CPU (`compare`'s default methods, cRT "
                f"{st['crt_epochs']} epochs; reading the file included): **{st['seconds']:.0f} s** ({per}).",
            ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = ()) -> int:
    paths = list(argv) or sys.argv[1:]
    print(section([json.loads(Path(p).read_text()) for p in paths]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
