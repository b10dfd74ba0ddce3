"""Classification (hard) EM: brute-force NumPy reference, objective, weights, vmap, recovery."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.optimize import linear_sum_assignment

import latentem as lem
from tests.helpers import assert_trees_all_close, blobs, is_x64

BASE = lem.gaussian_mixture(3, "diag")
MODEL = lem.hard_em(BASE)
MAX_ITER = 40


@functools.lru_cache
def compiled_fit_em(model, max_iter=MAX_ITER):
    return jax.jit(functools.partial(lem.fit_em, model, max_iter=max_iter))


@pytest.fixture(scope="module")
def data():
    x = blobs(0, n_per_cluster=100, centres=((0.0, 0.0), (3.5, 0.0), (0.0, 3.5)), scale=1.0)
    weights = np.random.default_rng(1).integers(1, 4, x.shape[0]).astype(np.float64)
    return x, weights


def numpy_classification_em(x, weights, start, n_iter, reg_covar=1e-6):
    """Classification EM for a diagonal Gaussian mixture, written out in NumPy (float64)."""
    pi, means, variances = (np.asarray(leaf, np.float64) for leaf in start)
    mean = weights @ x / weights.sum()
    regulariser = reg_covar * (weights @ (x - mean) ** 2) / weights.sum()  # relative reg_covar

    def log_joint(pi, means, variances):
        columns = [stats.norm.logpdf(x, means[k], np.sqrt(variances[k])).sum(axis=1) for k in range(len(pi))]
        return np.log(pi)[None, :] + np.stack(columns, axis=1)

    history = []
    for _ in range(n_iter):
        labels = np.argmax(log_joint(pi, means, variances), axis=1)
        assignments = np.eye(len(pi))[labels] * weights[:, None]
        counts = assignments.sum(axis=0)
        assert np.all(counts > 0), "the reference assumes no cluster empties"
        pi = counts / counts.sum()
        means = assignments.T @ x / counts[:, None]
        variances = (
            np.stack([assignments[:, k] @ (x - means[k]) ** 2 / counts[k] for k in range(len(pi))])
            + regulariser[None, :]
        )
        best = log_joint(pi, means, variances).max(axis=1)
        history.append(weights @ best / weights.sum())
    return (pi, means, variances), np.asarray(history)


@pytest.fixture(scope="module")
def fit(data):
    """One weighted hard-EM fit to the fixed point, shared by several tests."""
    dtype = np.float64 if is_x64() else np.float32
    x, weights = data
    x_, w_ = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    start = BASE.init(jax.random.key(0), x_, w_)
    return start, compiled_fit_em(MODEL)(start, x_, weights=w_, tol=0.0)


def test_matches_numpy_classification_em(fit, data, dtype):
    x, weights = data
    start, result = fit
    expected_params, expected_history = numpy_classification_em(x.astype(dtype), weights, start, MAX_ITER)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    # The fit stops at the fixed point, where the reference's objective stops changing.
    n_iter = int(result.n_iter)
    assert int(result.status) == lem.Status.CONVERGED and 3 <= n_iter < MAX_ITER
    np.testing.assert_array_equal(expected_history[n_iter - 1 :], expected_history[n_iter - 1])
    assert expected_history[n_iter - 2] < expected_history[n_iter - 1]
    np.testing.assert_allclose(np.asarray(result.history[:n_iter]), expected_history[:n_iter], rtol=rtol)
    assert np.all(np.isnan(np.asarray(result.history[n_iter:])))
    assert_trees_all_close(result.params, lem.GaussianMixtureParams(*expected_params), rtol=rtol, atol=rtol)


def test_objective_is_the_classification_likelihood(fit, data, dtype):
    x, weights = data
    _, result = fit
    x = jnp.asarray(x, dtype)
    log_joint = np.asarray(BASE.log_joint(result.params, x), np.float64)
    assignments, per_sample = lem.e_step(MODEL, result.params, x)
    np.testing.assert_allclose(np.asarray(per_sample), log_joint.max(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(assignments), np.eye(3)[log_joint.argmax(axis=1)])
    np.testing.assert_array_equal(
        np.asarray(lem.predict_proba(MODEL, result.params, x)), np.asarray(assignments)
    )
    # A lower bound of the marginal log-likelihood of the same parameters.
    assert float(result.log_likelihood) <= float(lem.score(BASE, result.params, x, weights))
    np.testing.assert_allclose(
        float(result.log_likelihood), float(lem.score(MODEL, result.params, x, weights)), rtol=1e-6
    )


def test_history_never_decreases(fit):
    _, result = fit
    history = np.asarray(result.history[: int(result.n_iter)], np.float64)
    assert np.all(np.isfinite(history))
    assert np.all(np.diff(history) >= -1e-6 * np.abs(history[1:]))


def test_ties_go_to_the_lowest_state(dtype):
    params = lem.GaussianMixtureParams(
        jnp.asarray([0.5, 0.5], dtype), jnp.asarray([[-1.0], [1.0]], dtype), jnp.ones((2, 1), dtype)
    )
    model = lem.hard_em(lem.gaussian_mixture(2, "diag"))
    assignments, _ = lem.e_step(model, params, jnp.asarray([[0.0], [2.0]], dtype))
    np.testing.assert_array_equal(np.asarray(assignments), [[1.0, 0.0], [0.0, 1.0]])


def test_zero_weight_is_removal_and_integer_weight_is_repetition(data, dtype):
    x, _ = data
    weights = np.ones(x.shape[0])
    weights[:3] = (3, 0, 0)
    copied = x.copy()
    copied[1:3] = x[0]
    x, copied = jnp.asarray(x, dtype), jnp.asarray(copied, dtype)
    start = BASE.init(jax.random.key(2), x, jnp.asarray(weights, dtype))
    with_weights = compiled_fit_em(MODEL)(start, x, weights=jnp.asarray(weights, dtype), tol=0.0)
    with_copies = compiled_fit_em(MODEL)(start, copied, weights=jnp.ones(x.shape[0], dtype), tol=0.0)
    assert_trees_all_close(with_weights.params, with_copies.params, rtol=1e-5, atol=1e-6)


def test_vmap_over_datasets_equals_a_loop(dtype):
    xs = jnp.asarray(np.stack([blobs(seed, n_per_cluster=100) for seed in (3, 4)]), dtype)
    keys = jax.random.split(jax.random.key(5), 2)
    batched = jax.vmap(functools.partial(lem.fit, MODEL))(keys, xs)
    for index in range(2):
        single = lem.fit(MODEL, keys[index], xs[index])
        member = jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], batched)
        assert_trees_all_close(member, single, rtol=1e-5, atol=1e-5)


def test_recovers_well_separated_clusters_from_its_own_samples(dtype):
    truth = lem.GaussianMixtureParams(
        jnp.asarray([0.2, 0.3, 0.5], dtype),
        jnp.asarray([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]], dtype),
        jnp.asarray([[1.0, 0.5], [0.7, 1.5], [1.0, 1.0]], dtype),
    )
    x, _ = MODEL.sample(jax.random.key(6), truth, 300)
    result = lem.fit(MODEL, jax.random.key(7), x)
    means = np.asarray(result.params.means, np.float64)
    rows, cols = linear_sum_assignment(((means[:, None] - np.asarray(truth.means)[None]) ** 2).sum(axis=2))
    # 60 or more samples per cluster, standard deviations up to 1.2: within 4 standard errors.
    np.testing.assert_allclose(means[rows], np.asarray(truth.means)[cols], atol=0.65)
    np.testing.assert_allclose(
        np.asarray(result.params.weights)[rows], np.asarray(truth.weights)[cols], atol=0.1
    )


def test_check_model_passes(data, dtype):
    x, _ = data
    report = lem.check_model(MODEL, jax.random.key(8), x.astype(dtype), n_samples=300)
    assert report.passed, str(report)


def test_needs_a_finite_state_model_and_is_memoised():
    assert lem.hard_em(BASE) is MODEL
    with pytest.raises(ValueError, match="finite-state"):
        lem.hard_em(lem.ppca(1))
    with pytest.raises(ValueError, match="LatentModel"):
        lem.hard_em("kmeans")


def test_empty_state_is_reported(dtype):
    """A state that wins no sample ends with zero mass: Status.EMPTY_COMPONENT, as in soft EM."""
    x = jnp.asarray(blobs(2, n_per_cluster=30), dtype)
    params = BASE.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))
    far = params.means.at[2].set(jnp.asarray([1e3, 1e3], dtype))
    result = compiled_fit_em(MODEL)(lem.GaussianMixtureParams(params.weights, far, params.covariances), x)
    assert int(result.status) == lem.Status.EMPTY_COMPONENT
    assert float(result.params.weights[2]) == 0.0
