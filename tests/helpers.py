"""Shared test helpers: tree comparisons, reference data, dtype-aware tolerances."""

from __future__ import annotations

import jax
import numpy as np


def is_x64() -> bool:
    return bool(jax.config.jax_enable_x64)


def assert_trees_all_close(actual, expected, *, rtol: float, atol: float = 0.0) -> None:
    """Leafwise ``np.testing.assert_allclose`` over two pytrees of the same structure."""
    actual_leaves, actual_tree = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten(expected)
    assert actual_tree == expected_tree, f"tree structures differ: {actual_tree} vs {expected_tree}"
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(e, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"leaf {index}",
        )


def assert_trees_equal(actual, expected) -> None:
    """Bitwise equality of two pytrees (NaN equal to NaN)."""
    actual_leaves, actual_tree = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten(expected)
    assert actual_tree == expected_tree
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=f"leaf {index}")


def blobs(
    seed: int,
    n_per_cluster: int = 100,
    centres=((0.0, 0.0), (6.0, 0.0), (0.0, 6.0)),
    scale: float = 1.0,
    dtype=np.float64,
) -> np.ndarray:
    """Well-separated Gaussian clusters as a NumPy array (rows shuffled)."""
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, dtype=np.float64)
    x = np.concatenate([c + scale * rng.standard_normal((n_per_cluster, centres.shape[1])) for c in centres])
    return rng.permutation(x).astype(dtype)


def random_covariances(rng: np.random.Generator, covariance_type: str, n_components: int, n_features: int):
    """Random valid covariances of the given type (well conditioned)."""
    if covariance_type == "full":
        a = rng.standard_normal((n_components, n_features, n_features))
        return a @ a.transpose(0, 2, 1) / n_features + 0.5 * np.eye(n_features)
    if covariance_type == "tied":
        a = rng.standard_normal((n_features, n_features))
        return a @ a.T / n_features + 0.5 * np.eye(n_features)
    if covariance_type == "diag":
        return rng.uniform(0.5, 2.0, (n_components, n_features))
    return rng.uniform(0.5, 2.0, n_components)
