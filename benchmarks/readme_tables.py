"""The README's demo tables, generated from a run (``python -m benchmarks.readme_tables [--write README.md]``).

Runs ``ltr demo`` (the bundled digits, deterministic) and ``ltr compare`` of the opt-in methods on its
features, and renders the two tables that sit between the README's ``<!-- demo-tables -->`` markers,
so the README's numbers cannot drift from what the code prints (tests/test_readme.py checks them).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner

START, END = "<!-- demo-tables:start -->", "<!-- demo-tables:end -->"
GROUPS_ARGS = ["--many", "40", "--few", "10"]  # the demo's thresholds, scaled to its 318 train images
OPT_IN = "joint,wb,disalign,knn,linear_probe,experts"  # each also run when named in compare
LABELS = {"joint": "joint", "ncm": "NCM", "crt": "cRT", "tau_norm": "τ-norm", "lws": "LWS",
          "logit_adjust": "logit adjustment", "pc_softmax": "PC softmax", "marc": "MARC",
          "wb": "weight balancing (MaxNorm)", "disalign": "DisAlign", "knn": "weighted kNN (k 20, T 0.07)",
          "linear_probe": "linear probe (C 1, balanced)", "experts": "logit-adjusted experts (test-agnostic)"}


def _invoke(args: list[str]) -> dict:
    from lt_rebalance.cli import main

    r = CliRunner().invoke(main, [*args, "--json", "--quiet"])
    if r.exit_code != 0:
        raise RuntimeError(f"ltr {' '.join(args)} failed: {r.output}")
    return json.loads(r.stdout)


def _table(rows: list[dict]) -> str:
    lines = ["| method | many | medium | few | all |", "|---|---|---|---|---|"]
    for r in rows:
        label = LABELS[r["method"]]
        if r.get("selected_tau") is not None:
            label += f" (τ = {r['selected_tau']:g}, on val)"
        t = r["test"]
        lines.append(f"| {label} | " + " | ".join(f"{100 * t[g]:.1f}" for g in ("many", "medium", "few", "all")) + " |")
    return "\n".join(lines)


def demo_tables(out: Path) -> str:
    """The markdown between the markers, from a fresh demo run into ``out``."""
    demo = _invoke(["demo", "--out", str(out)])
    later = _invoke(["compare", "-f", str(out / "features.h5"), *GROUPS_ARGS, "--methods", OPT_IN])
    return "\n".join([
        "One run of `ltr demo` (test accuracy %, thresholds scaled to the 318 training images: many > 40,",
        "few < 10); every default method of `compare`:", "", _table(demo["rows"]), "",
        f"The opt-in methods on the same file (`ltr compare -f ltr-demo/features.h5 --many 40 --few 10 --methods "
        f"{OPT_IN}`):", "", _table(later["rows"]),
    ])


def readme_block(text: str) -> str:
    """What the README holds between the markers."""
    m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    if m is None:
        raise ValueError(f"the README has no {START} ... {END} block")
    return m.group(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="README", help="replace the block in this README instead of printing it")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        block = demo_tables(Path(tmp) / "ltr-demo")
    if not args.write:
        print(block)
        return 0
    path = Path(args.write)
    text = path.read_text(encoding="utf-8")
    old = readme_block(text)
    path.write_text(text.replace(old, block), encoding="utf-8")
    print(f"wrote the demo tables into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
