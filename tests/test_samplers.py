"""Samplers: class frequencies vs p_j ∝ n_j^q, the reference's class-aware scheme, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lt_rebalance.samplers import (
    ClassAwareSampler,
    InstanceBalancedSampler,
    PowerSampler,
    ProgressiveSampler,
    class_probabilities,
    make_sampler,
    progressive_probabilities,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

COUNTS = np.array([400, 200, 100, 50, 20, 10, 5, 2])


def labels_from_counts(counts, seed=0):
    y = np.repeat(np.arange(len(counts)), counts)
    return torch.from_numpy(np.random.default_rng(seed).permutation(y))


def numpy_p(counts, q):
    n = np.asarray(counts, dtype=np.float64)
    w = np.where(n > 0, n**q, 0.0)
    return w / w.sum()


def empirical_class_freq(sampler, labels, num_classes, epochs=60, epoch=0, num_epochs=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    draws = torch.cat(
        [sampler.epoch(epoch, num_epochs, 1, g).flatten() for _ in range(epochs)]
    )
    hist = np.bincount(labels[draws].numpy(), minlength=num_classes)
    return hist / hist.sum(), len(draws)


def assert_freq_close(freq, p, m):
    tol = 5 * np.sqrt(p * (1 - p) / m) + 1e-4
    np.testing.assert_array_less(np.abs(freq - p), tol)


@pytest.mark.parametrize("name,q", [("ib", 1.0), ("cb", 0.0), ("sqrt", 0.5), (0.25, 0.25), (0.0, 0.0), (2.0, 2.0)])
def test_class_frequencies_match_power_law(name, q):
    y = labels_from_counts(COUNTS)
    s = make_sampler(name, y)
    freq, m = empirical_class_freq(s, y, len(COUNTS))
    p = numpy_p(COUNTS, q)
    assert_freq_close(freq, p, m)
    np.testing.assert_allclose(s.class_probabilities().numpy(), p, rtol=1e-12)


def test_class_probabilities_formula_and_empty_classes():
    counts = [9, 0, 4, 1]
    for q in (0.0, 0.5, 1.0, 1.7):
        np.testing.assert_allclose(class_probabilities(counts, q).numpy(), numpy_p(counts, q), rtol=1e-12)
    assert class_probabilities(counts, 0.0)[1] == 0  # an empty class is never drawn, even for q = 0


def test_instance_balanced_is_a_permutation_without_replacement():
    y = labels_from_counts(COUNTS)
    s = InstanceBalancedSampler(y)
    g = torch.Generator().manual_seed(0)
    ep = s.epoch(0, 1, 1, g).flatten()
    assert sorted(ep.tolist()) == list(range(len(y)))
    np.testing.assert_array_equal(np.bincount(y[ep].numpy()), COUNTS)


def test_progressive_endpoints_equal_ib_and_cb():
    T = 8
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 0, T).numpy(), numpy_p(COUNTS, 1.0), rtol=1e-12)
    np.testing.assert_allclose(progressive_probabilities(COUNTS, T, T).numpy(), numpy_p(COUNTS, 0.0), rtol=1e-12)
    for t in (1, 3, 6):
        expected = (1 - t / T) * numpy_p(COUNTS, 1.0) + (t / T) * numpy_p(COUNTS, 0.0)
        np.testing.assert_allclose(progressive_probabilities(COUNTS, t, T).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("t", [0, 4, 8])
def test_progressive_sampler_frequencies(t):
    T = 8
    y = labels_from_counts(COUNTS)
    s = make_sampler("pb", y)
    assert isinstance(s, ProgressiveSampler)
    freq, m = empirical_class_freq(s, y, len(COUNTS), epoch=t, num_epochs=T)
    expected = (1 - t / T) * numpy_p(COUNTS, 1.0) + (t / T) * numpy_p(COUNTS, 0.0)
    assert_freq_close(freq, expected, m)


def test_power_sampler_rows_uniform_within_class():
    counts = [30, 3]
    y = labels_from_counts(counts)
    s = PowerSampler(y, q=0.0)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([s.epoch(0, 1, 1, g).flatten() for _ in range(600)]).numpy()
    rows1 = np.flatnonzero(y.numpy() == 1)
    hits = np.array([(draws == r).sum() for r in rows1])
    m = hits.sum()
    assert_freq_close(hits / m, np.full(3, 1 / 3), m)


def test_absent_classes_never_drawn():
    y = torch.tensor([0, 0, 0, 2, 2, 4, 4, 4, 4, 4, 4])  # classes 1, 3, 5 empty
    for name in ("ib", "cb", "sqrt", "pb", 0.3):
        s = make_sampler(name, y, num_classes=6)
        g = torch.Generator().manual_seed(1)
        drawn = set(y[torch.cat([s.epoch(0, 2, 1, g).flatten() for _ in range(50)])].tolist())
        assert drawn == {0, 2, 4}, name


def class_aware_epoch(counts, k=4, batch_size=1, seed=0, num_classes=None):
    y = labels_from_counts(counts, seed=seed)
    s = ClassAwareSampler(y, samples_per_class=k, num_classes=num_classes)
    ep = s.epoch(0, 1, batch_size, torch.Generator().manual_seed(seed)).flatten()
    return y, ep


def test_class_aware_runs_of_four_and_class_cycle():
    counts = [400, 200, 100, 50, 20, 10, 5, 2, 0, 3]  # class 8 empty
    y, ep = class_aware_epoch(counts)
    present = {j for j, n in enumerate(counts) if n > 0}
    m = len(ep) // 4 * 4
    cls = y[ep[:m]].numpy().reshape(-1, 4)
    assert (cls == cls[:, :1]).all(), "each visit yields 4 consecutive rows of one class"
    visits = cls[:, 0]
    C = len(present)
    for start in range(0, len(visits) - C + 1, C):
        assert set(visits[start : start + C].tolist()) == present, "every present class once per cycle"
    # visit orders differ between cycles (the class cycle is reshuffled)
    cycles = [tuple(visits[i : i + C]) for i in range(0, len(visits) - C + 1, C)]
    assert len(set(cycles)) > 1


def test_class_aware_row_stream_cycles_each_class():
    counts = [400, 200, 100, 50, 20, 10, 5, 2, 3]
    y, ep = class_aware_epoch(counts, seed=3)
    yn, epn = y.numpy(), ep.numpy()
    reshuffled = []
    for j, n in enumerate(counts):
        stream = epn[yn[epn] == j]  # rows of class j in the order drawn
        rows_j = set(np.flatnonzero(yn == j).tolist())
        for start in range(0, len(stream), n):
            chunk = stream[start : start + n].tolist()
            assert len(set(chunk)) == len(chunk), "no row repeats before the class's rows are exhausted"
            if len(chunk) == n:
                assert set(chunk) == rows_j
        if len(stream) >= 2 * n and n > 2:
            reshuffled.append(stream[:n].tolist() != stream[n : 2 * n].tolist())
    assert reshuffled and any(reshuffled), "a class's rows are reshuffled for each pass"


def test_class_aware_frequencies_uniform():
    y = labels_from_counts(COUNTS)
    s = ClassAwareSampler(y)
    freq, m = empirical_class_freq(s, y, len(COUNTS))
    # draws come in visits of 4, so the count variance is 4x that of independent draws
    tol = 10 * np.sqrt(1 / 8 * 7 / 8 / m) + 1e-4
    np.testing.assert_array_less(np.abs(freq - 1 / 8), tol)


@pytest.mark.parametrize("name", ["ib", "cb", "sqrt", "pb", 0.3])
def test_epoch_shape_and_determinism(name):
    y = labels_from_counts(COUNTS)  # N = 787
    s = make_sampler(name, y)
    for bs in (1, 64, 100, 787):
        ep = s.epoch(1, 3, bs, torch.Generator().manual_seed(5))
        assert tuple(ep.shape) == (int(787 / bs), bs)
        assert ep.dtype == torch.int64
        assert ep.min() >= 0 and ep.max() < 787
    a = s.epoch(1, 3, 64, torch.Generator().manual_seed(5))
    b = make_sampler(name, y).epoch(1, 3, 64, torch.Generator().manual_seed(5))
    c = s.epoch(1, 3, 64, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_size_out_of_range():
    s = make_sampler("cb", labels_from_counts(COUNTS))
    with pytest.raises(ValueError, match="batch size"):
        s.epoch(0, 1, 788, torch.Generator())
    with pytest.raises(ValueError, match="batch size"):
        s.epoch(0, 1, 0, torch.Generator())


def test_make_sampler_names_and_errors():
    y = labels_from_counts(COUNTS)
    assert isinstance(make_sampler("ib", y), InstanceBalancedSampler)
    assert isinstance(make_sampler("cb", y), ClassAwareSampler)
    assert isinstance(make_sampler("sqrt", y), PowerSampler) and make_sampler("sqrt", y).q == 0.5
    assert isinstance(make_sampler("pb", y), ProgressiveSampler)
    assert make_sampler("0.25", y).q == 0.25
    assert isinstance(make_sampler(1, y), InstanceBalancedSampler)
    with pytest.raises(ValueError, match=r"unknown sampler 'foo'.*ib, cb, sqrt, pb"):
        make_sampler("foo", y)
    with pytest.raises(ValueError, match="non-empty"):
        make_sampler("cb", torch.zeros(0, dtype=torch.int64))
