"""The README's demo tables are what the code prints today (benchmarks/readme_tables.py made them)."""
import importlib.util
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="the demo needs scikit-learn's digits")
def test_readme_demo_tables_match_a_fresh_run(tmp_path, torch_one_thread):
    from benchmarks.readme_tables import demo_tables, readme_block

    want = demo_tables(tmp_path / "ltr-demo")
    assert readme_block(README.read_text(encoding="utf-8")) == want, (
        "README demo tables are stale: run `python -m benchmarks.readme_tables --write README.md`")
