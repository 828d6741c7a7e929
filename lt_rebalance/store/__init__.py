"""The feature file: HDF5 schema version 1 (see docs/FORMAT.md).

Reading: :class:`FeatureStore` opens and validates a file, then hands out float32 torch tensors.
Writing: :func:`write_features` writes a whole file atomically; :class:`FeatureFileWriter` appends
row batches (extraction and resume build on it).

This package re-exports the public names of its modules: :mod:`.schema` (names, constants,
errors), :mod:`.reader` and :mod:`.writer`.
"""
from __future__ import annotations

from ..outputs import atomic_output, atomic_write, check_interrupt  # noqa: F401 (public API)
from .reader import FeatureStore
from .schema import (
    DAMAGE_ERRORS,
    FEATURE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    RANDOM_HEAD_NOTE,
    REMAKE_HINT,
    FeatureFileError,
    NonFiniteFeaturesError,
    PathLike,
    SplitInfo,
)
from .writer import FeatureFileWriter, package_versions, write_features

__all__ = [
    "DAMAGE_ERRORS", "FEATURE_DTYPES", "FORMAT", "FORMAT_VERSION", "RANDOM_HEAD_NOTE", "REMAKE_HINT",
    "FeatureFileError", "FeatureFileWriter", "FeatureStore", "NonFiniteFeaturesError", "PathLike",
    "SplitInfo", "atomic_output", "atomic_write", "check_interrupt", "package_versions", "write_features",
]
