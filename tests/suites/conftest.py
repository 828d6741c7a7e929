"""Fixtures shared by the cross-cutting suites (faults and hostile inputs)."""
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def big_npz(tmp_path_factory) -> Path:
    """x_train 100,000 x 128 float32 (~50 MB): its import takes long enough to be signalled."""
    path = tmp_path_factory.mktemp("big") / "big.npz"
    n = 100_000
    np.savez(path, x_train=np.ones((n, 128), np.float32), y_train=np.arange(n) % 10)
    return path
