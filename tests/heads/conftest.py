"""Fixtures shared by the head tests (tests/heads/): synthetic long-tailed splits of a fixed shape."""
import pytest


@pytest.fixture(scope="module")
def tau_data(lt_data):
    # counts from 400 down to 4: every shot group is populated
    return lt_data(num_classes=12, n_max=400, imbalance=100, dim=12, sep=2.5, seed=1)


@pytest.fixture(scope="module")
def crt_data(lt_data):
    return lt_data(num_classes=10, n_max=300, imbalance=60, dim=16, sep=3.0, noise=1.0, seed=0)
