"""``ltr check``: verify a feature file in full; exit status 1 on any failure."""
from __future__ import annotations

import click

from .options import json_option
from .render import emit


def _human(result: dict) -> str:
    lines = [f"{result['path']}:"]
    for c in result["checks"]:
        lines.append(f"  [{'pass' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
    n_fail = sum(not c["ok"] for c in result["checks"])
    lines.append("all checks passed" if result["ok"] else f"{n_fail} check(s) failed")
    return "\n".join(lines)


@click.command()
@click.argument("features", type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def check(ctx, features, as_json):
    """Verify FEATURES in full: schema, dtypes, completeness, labels, counts, NaN/Inf, views."""
    from ..checks import verify_isolated

    checks = verify_isolated(features)
    result = {"path": features, "ok": all(c.ok for c in checks), "checks": [c.to_dict() for c in checks]}
    emit(result, as_json, _human)
    if not result["ok"]:
        ctx.exit(1)
