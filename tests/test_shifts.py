"""Shift generators against numpy counting and hand-worked class sizes."""
import math

import numpy as np
import pytest
import torch

from lt_rebalance import protocols as P
from lt_rebalance import shifts as S


@pytest.fixture(scope="module")
def split():
    """10 classes; test rows per class 12..30 (M = 12) in a shuffled file order; train counts descending
    except two ties."""
    rng = np.random.default_rng(0)
    support = np.array([30, 12, 20, 15, 25, 18, 12, 22, 16, 14])
    labels = rng.permutation(np.repeat(np.arange(10), support))
    counts = np.array([500, 400, 400, 300, 200, 150, 100, 100, 50, 20])
    return labels, counts, support


def first_rows(labels, keep):
    """The first keep[c] rows of each class in file order, by plain counting."""
    seen = np.zeros(len(keep), dtype=int)
    out = []
    for i, c in enumerate(labels):
        if seen[c] < keep[c]:
            out.append(i)
            seen[c] += 1
    return np.array(out)


def check(labels, idx, prior, support, replace=False):
    k = np.bincount(labels[idx], minlength=len(support))
    np.testing.assert_allclose(prior, k / k.sum(), rtol=0, atol=1e-15)
    assert idx.dtype == np.int64 and prior.dtype == np.float64 and np.all(np.diff(idx) >= 0)
    if not replace:
        assert len(np.unique(idx)) == len(idx) and np.all(k <= support)
    return k


@pytest.mark.parametrize("name", ["forward-5", "backward-2.5", "uniform"])
def test_lade_kinds_are_the_protocol_subsets(split, name):
    labels, counts, support = split
    idx, prior = S.shift_subset(name, labels, counts, seed=3)
    keep = P.shift_counts(name, counts, torch.as_tensor(support)).numpy()
    np.testing.assert_array_equal(idx, first_rows(labels, keep))
    check(labels, idx, prior, support)
    assert not S.is_random(name)


def test_step_keeps_m_for_the_head_half_and_m_over_r_for_the_rest(split):
    labels, counts, support = split
    idx, prior = S.shift_subset("step-4", labels, counts)
    # ranks by train count (ties: lower class first): classes 0,1,2,3,4 are the head half
    keep = np.array([12, 12, 12, 12, 12, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(idx, first_rows(labels, keep))
    np.testing.assert_array_equal(check(labels, idx, prior, support), keep)
    np.testing.assert_array_equal(S.shift_subset("step-4", labels, counts, seed=9)[0], idx)  # not random
    assert not S.is_random("step-4")


def test_tweakone_one_class_holds_rho(split):
    labels, counts, support = split
    M, C = 12, 10
    # rho > 1/C: the tweaked class keeps M, the others floor((M / rho - M) / (C - 1))
    idx, prior = S.shift_subset("tweakone-0.4", labels, counts, seed=1)
    k = check(labels, idx, prior, support)
    one = int(np.argmax(k))
    rest = math.floor((M / 0.4 - M) / 9)
    assert k[one] == M and np.all(np.delete(k, one) == rest) and rest == 2
    # rho < 1/C: the others keep M, the tweaked class floor(M (C - 1) rho / (1 - rho))
    idx, prior = S.shift_subset("tweakone-0.02", labels, counts, seed=1)
    k = check(labels, idx, prior, support)
    one = int(np.argmin(k))
    assert k[one] == math.floor(12 * 9 * 0.02 / 0.98) == 2 and np.all(np.delete(k, one) == M)
    # the tweaked class is the generator's first draw
    assert one == np.random.default_rng(1).integers(C)
    # the ends of the range leave exactly one row
    lo, hi = 1 / (9 * 12 + 1), 12 / (12 + 9)
    assert S.tweakone_range(10, 12) == pytest.approx((lo, hi))
    for rho in (lo, hi):
        idx, prior = S.shift_subset(f"tweakone-{rho!r}", labels, counts, seed=2)
        assert check(labels, idx, prior, support).min() == 1
    assert S.is_random("tweakone-0.4")


def test_tweakone_classes_and_rows_vary_with_the_seed(split):
    labels, counts, _ = split
    draws = {tuple(S.shift_subset("tweakone-0.4", labels, counts, seed=s)[0]) for s in range(6)}
    assert len(draws) == 6
    a, pa = S.shift_subset("tweakone-0.4", labels, counts, seed=4)
    b, pb = S.shift_subset("tweakone-0.4", labels, counts, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa, pb)


def test_knockout_removes_a_fraction_of_the_uniform_base(split):
    labels, counts, support = split
    for seed in range(5):
        idx, prior = S.shift_subset("knockout-0.3", labels, counts, seed=seed)
        k = check(labels, idx, prior, support)
        assert k.sum() == 120 - int(0.3 * 120) and k.max() <= 12
    sizes = {tuple(np.bincount(labels[S.shift_subset("knockout-0.3", labels, counts, seed=s)[0]], minlength=10))
             for s in range(5)}
    assert len(sizes) > 1 and S.is_random("knockout-0.3")


def test_dirichlet_shares_are_the_generators_draw(split):
    labels, counts, support = split
    pi = np.random.default_rng(7).dirichlet(np.full(10, 0.5))
    idx, prior = S.shift_subset("dirichlet-0.5", labels, counts, seed=7)
    k = check(labels, idx, prior, support)
    expect = np.floor(12 * pi / pi.max()).astype(int)
    expect[np.argmax(pi)] = 12
    np.testing.assert_array_equal(k, expect)
    assert S.is_random("dirichlet-0.5")


def test_dirichlet_with_replacement_keeps_m_times_c_rows(split):
    labels, counts, support = split
    pi = np.random.default_rng(7).dirichlet(np.full(10, 0.5))
    want = np.floor(pi * 120).astype(int)
    assert np.any(want > support)  # some class needs more rows than it has
    idx, prior = S.shift_subset("dirichlet-0.5", labels, counts, seed=7, replace=True)
    k = check(labels, idx, prior, support, replace=True)
    np.testing.assert_array_equal(k, want)
    for c in range(10):
        rows = idx[labels[idx] == c]
        if want[c] > support[c]:  # every row of the class, then draws with replacement
            assert set(rows) == set(np.flatnonzero(labels == c))
        else:
            assert len(set(rows)) == len(rows)


def test_no_kind_gives_more_rows_than_a_class_has(split):
    labels, counts, support = split
    for name in ("forward-20", "backward-20", "uniform", "step-2", "dirichlet-0.1", "dirichlet-10",
                 "knockout-0.9", "tweakone-0.5", "tweakone-0.01"):
        for seed in range(4):
            idx, prior = S.shift_subset(name, labels, counts, seed=seed)
            check(labels, idx, prior, support)


def test_more_rows_than_a_class_has_is_refused_without_replacement(split, monkeypatch):
    labels, counts, support = split
    monkeypatch.setattr(S, "class_sizes", lambda *a, **k: support + np.eye(10, dtype=int)[3] * 5)
    with pytest.raises(ValueError, match=r"asks 20 rows of class 3, which has 15 \(at most 15 without replacement\)"):
        S.shift_subset("dirichlet-1", labels, counts)
    idx, prior = S.shift_subset("dirichlet-1", labels, counts, replace=True)
    assert np.bincount(labels[idx])[3] == 20


def test_large_split_without_python_loops():
    rng = np.random.default_rng(1)
    C = 8142
    labels = rng.permutation(np.concatenate([np.repeat(np.arange(C), 12), rng.integers(0, C, 20000)]))
    counts = rng.integers(2, 1000, C)
    support = np.bincount(labels, minlength=C)
    for name in ("forward-100", "step-3", "dirichlet-1", "knockout-0.5", "tweakone-0.001"):
        idx, prior = S.shift_subset(name, labels, counts, seed=2)
        check(labels, idx, prior, support)
    idx, prior = S.shift_subset("dirichlet-0.3", labels, counts, seed=2, replace=True)
    total = check(labels, idx, prior, support, replace=True).sum()
    assert 12 * C - C < total <= 12 * C  # M*C rows, each class truncated


@pytest.mark.parametrize("name,match", [
    ("dirichlet-0", "dirichlet-A needs a concentration A > 0"),
    ("dirichlet--2", "A > 0"),
    ("knockout-1", "0 < P < 1"),
    ("knockout-0", "0 < P < 1"),
    ("tweakone-1.5", "0 < RHO < 1"),
    ("step-0.5", "R >= 1"),
    ("forward-0.5", "unknown test prior 'forward-0.5'"),
    ("sideways-3", "unknown shift 'sideways-3'; use one of forward-R, backward-R, uniform, step-R, dirichlet-A, "
                   "knockout-P, tweakone-RHO"),
    ("dirichlet", "unknown shift"),
])
def test_parse_shift_refuses(name, match):
    with pytest.raises(ValueError, match=match):
        S.parse_shift(name)


def test_parse_shifts_list():
    assert S.parse_shifts(" forward-50, dirichlet-1 ,uniform") == ("forward-50", "dirichlet-1", "uniform")
    assert S.parse_shift("knockout-.25").param == 0.25 and S.parse_shift("dirichlet-1e-1").param == 0.1
    with pytest.raises(ValueError, match="repeat"):
        S.parse_shifts("uniform,uniform")
    with pytest.raises(ValueError, match="no shift given"):
        S.parse_shifts(" , ")


def test_data_dependent_refusals(split):
    labels, counts, _ = split
    with pytest.raises(ValueError, match=r"RHO must lie in \[0\.00917431, 0\.571429\]"):
        S.shift_subset("tweakone-0.6", labels, counts)
    with pytest.raises(ValueError, match=r"int\(M / R\) = 0 rows .* use R <= 12"):
        S.shift_subset("step-13", labels, counts)
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        S.shift_subset("uniform", labels[labels != 2], counts)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        S.shift_subset("uniform", np.append(labels, 10), counts)
    with pytest.raises(ValueError, match="integer"):
        S.shift_subset("uniform", labels.astype(float), counts)
