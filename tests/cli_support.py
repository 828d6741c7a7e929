"""The command-line tests' data and helpers (not a test module): the synthetic long-tailed arrays behind
the ``arrays`` / ``files`` fixtures of conftest.py, a click runner that checks the JSON and error contracts,
and independent numpy metrics."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from lt_rebalance.cli import main

C, D = 12, 16
# many (> 100): 2 classes, medium (20..100): 5 classes, few (< 20): 5 classes
COUNTS = np.array([150, 120, 60, 50, 40, 30, 25, 15, 10, 8, 5, 3])
VAL_PER_CLASS, TEST_PER_CLASS = 5, 8
TRAIN_ARGS = ["--epochs", "2", "--batch-size", "64"]
METRIC_KEYS = ("all", "many", "medium", "few", "mean_class")
BASE_METHODS = ("joint", "ncm", "crt", "tau_norm", "lws")


# -- data ------------------------------------------------------------------------------------------
def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian classes with a stage-1 classifier whose norms grow with the class size (as in joint
    training), so that tau-normalisation changes the predictions."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D))

    def draw(per_class):
        y = np.repeat(np.arange(C), per_class)
        x = means[y] + rng.normal(size=(len(y), D))
        p = rng.permutation(len(y))
        return x[p].astype(np.float32), y[p].astype(np.int64)

    out = {}
    for split, per_class in (("train", COUNTS), ("val", VAL_PER_CLASS), ("test", TEST_PER_CLASS)):
        out[f"x_{split}"], out[f"y_{split}"] = draw(per_class)
    out["weight"] = (means * (0.5 + COUNTS[:, None] / 100)).astype(np.float32)
    out["bias"] = (0.05 * np.log(COUNTS)).astype(np.float32)
    return out


def _splits(a: dict, names=("train", "val", "test")) -> dict:
    return {s: (a[f"x_{s}"], a[f"y_{s}"]) for s in names}


# -- running ltr ---------------------------------------------------------------------------------------
def _runner() -> CliRunner:
    """A runner that keeps stdout and stderr apart (click < 8.2 needs mix_stderr=False)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2: result.stdout / result.stderr are always separate
        return CliRunner()


def run(args, expect: int = 0):
    result = _runner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"ltr {' '.join(map(str, args))} raised {result.exception!r}\n{result.output}")
    assert result.exit_code == expect, f"exit {result.exit_code}, expected {expect}:\n{result.output}"
    return result


def run_json(args) -> tuple[dict, str]:
    """Run with --json; stdout must be exactly one JSON document. Returns (document, stderr)."""
    result = run([*args, "--json"])
    doc = json.loads(result.stdout)  # raises on anything but one document
    assert isinstance(doc, dict)
    return doc, result.stderr


def user_error(args, code: int = 1, *, match=()) -> str:
    """A user mistake: exit status ``code``, one ``Error:`` line on stderr, no traceback, no stdout."""
    result = run(args, expect=code)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert result.stdout == "", result.stdout
    for m in [match] if isinstance(match, str) else match:
        assert m.lower() in errors[0].lower(), errors[0]
    return errors[0]


def assert_metrics(m: dict) -> None:
    for k in (*METRIC_KEYS, "top5"):
        assert k in m, k
        assert m[k] is not None and 0.0 <= m[k] <= 1.0, (k, m[k])


def np_metrics(scores: np.ndarray, y: np.ndarray) -> dict:
    """Independent top-1, mean-class and shot-group accuracy (groups from the train counts)."""
    pred = scores.argmax(1)
    per_class = np.array([(pred[y == c] == c).mean() for c in range(C)])
    groups = {"many": COUNTS > 100, "few": COUNTS < 20}
    groups["medium"] = ~groups["many"] & ~groups["few"]
    return {"all": float((pred == y).mean()), "mean_class": float(per_class.mean()),
            **{g: float(per_class[mask].mean()) for g, mask in groups.items()}}


def np_tau_curve(x: np.ndarray, y: np.ndarray, w: np.ndarray, taus, key: str = "all") -> np.ndarray:
    w = w.astype(np.float64)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.array([np_metrics(x.astype(np.float64) @ (w / norms**t).T, y)[key] for t in taus])
