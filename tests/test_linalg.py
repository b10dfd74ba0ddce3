"""XLA's triangular inverses (models/_linalg.py), which replace LAPACK's solves on a CPU:
float64 NumPy and LAPACK references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentem.models import _linalg


@pytest.fixture(autouse=True, params=["substitution", "solve"])
def route(request, monkeypatch):
    """Both ways of inverting: XLA's forward substitution (on a CPU) and the backend's
    triangular solve (elsewhere)."""
    if request.param == "solve":
        monkeypatch.setattr(_linalg, "SUBSTITUTION_BACKENDS", ())
    return request.param


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 4)])
@pytest.mark.parametrize("n_features", [1, 5, 32])
def test_lower_triangular_inverse_matches_numpy(batch_shape, n_features, dtype):
    """The inverse equals NumPy's float64 inverse and LAPACK's triangular solve to
    round-off, is exactly lower triangular, and turns a NaN factor into NaN."""
    rng = np.random.default_rng(n_features)
    factors = rng.standard_normal((*batch_shape, n_features, n_features))
    covariances = factors @ np.swapaxes(factors, -1, -2) + 0.5 * np.eye(n_features)
    lower = np.linalg.cholesky(covariances)
    inverse = np.asarray(_linalg.lower_triangular_inverse(jnp.asarray(lower, dtype)))
    expected = np.linalg.inv(lower)
    # Forward substitution's error bound: d eps cond(L) relative to the inverse.
    rtol = n_features * float(jnp.finfo(dtype).eps) * np.linalg.cond(lower).max()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(inverse, expected, rtol=0, atol=rtol * scale)
    assert np.all(np.triu(inverse, 1) == 0)
    identity = np.broadcast_to(np.eye(n_features), lower.shape)
    by_lapack = jax.scipy.linalg.solve_triangular(
        jnp.asarray(lower, dtype), jnp.asarray(identity, dtype), lower=True
    )
    np.testing.assert_allclose(inverse, by_lapack, rtol=0, atol=rtol * scale)
    with_nan = lower.copy()
    with_nan[..., -1, 0] = np.nan
    assert np.isnan(np.asarray(_linalg.lower_triangular_inverse(jnp.asarray(with_nan, dtype)))).any()


@pytest.mark.parametrize("n_features", [1, 4, 9])
def test_inverse_from_cholesky_matches_numpy(n_features, dtype):
    """L^-T L^-1 is the inverse of L L^T, as cho_solve((L, True), I) computes it."""
    rng = np.random.default_rng(n_features)
    factors = rng.standard_normal((3, n_features, n_features))
    matrices = factors @ np.swapaxes(factors, -1, -2) + np.eye(n_features)
    lower = jnp.asarray(np.linalg.cholesky(matrices), dtype)
    inverse = np.asarray(_linalg.inverse_from_cholesky(lower))
    expected = np.linalg.inv(matrices)
    rtol = 4 * n_features * float(jnp.finfo(dtype).eps) * np.linalg.cond(matrices).max()
    np.testing.assert_allclose(inverse, expected, rtol=0, atol=rtol * np.abs(expected).max())
    by_lapack = jax.scipy.linalg.cho_solve((lower[0], True), jnp.eye(n_features, dtype=dtype))
    np.testing.assert_allclose(inverse[0], by_lapack, rtol=0, atol=rtol * np.abs(expected).max())
