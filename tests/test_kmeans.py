"""k-means as hard EM: scikit-learn's Lloyd as the reference, weights, vmap, recovery."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

import latentem as lem
from tests.helpers import assert_trees_all_close, blobs

MODEL = lem.kmeans(3)
MAX_ITER = 60


@functools.lru_cache
def compiled_fit_em(model, max_iter=MAX_ITER):
    return jax.jit(functools.partial(lem.fit_em, model, max_iter=max_iter))


@pytest.fixture(scope="module")
def data():
    """Three overlapping clusters (so Lloyd needs several iterations) and integer weights."""
    x = blobs(0, n_per_cluster=100, centres=((0.0, 0.0), (3.0, 0.0), (0.0, 3.0)), scale=1.2)
    weights = np.random.default_rng(1).integers(0, 4, x.shape[0]).astype(np.float64)
    return x, weights


def fitted(x, weights, dtype, key=0):
    x, weights = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    params = MODEL.init(jax.random.key(key), x, weights)
    # tol=0: run to the fixed point (it is reached exactly: labels, then centres, stop changing).
    return params, compiled_fit_em(MODEL)(params, x, weights=weights, tol=0.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_scikit_learn_lloyd_from_the_same_centres(dtype, data, weighted):
    x, weights = data
    weights = weights if weighted else np.ones(x.shape[0])
    start, result = fitted(x, weights, dtype)
    reference = KMeans(
        3, init=np.asarray(start.centres, np.float64), n_init=1, algorithm="lloyd", tol=0.0, max_iter=300
    ).fit(x.astype(dtype).astype(np.float64), sample_weight=weights)
    assert reference.n_iter_ < MAX_ITER and reference.n_iter_ >= 3  # a real run, finished in our budget
    rtol = 1e-6 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(
        np.asarray(result.params.centres), reference.cluster_centers_, rtol=rtol, atol=rtol
    )
    np.testing.assert_array_equal(
        np.asarray(lem.predict(MODEL, result.params, x.astype(dtype))), reference.labels_
    )
    np.testing.assert_allclose(
        float(lem.inertia(result.params, x.astype(dtype), weights)), reference.inertia_, rtol=rtol
    )


def test_objective_is_minus_log_inertia_up_to_constants_and_monotone(dtype, data):
    x, weights = data
    _, result = fitted(x, weights, dtype)
    n_iter = int(result.n_iter)
    history = np.asarray(result.history[:n_iter], np.float64)
    # Classification EM never lowers its objective.
    assert np.all(np.diff(history) >= -1e-6 * np.abs(history[1:]))
    rtol = 1e-6 if dtype == np.float64 else 1e-5
    # The M-step's variance is the within-cluster variance per feature (d = 2) ...
    inertia = float(lem.inertia(result.params, x.astype(dtype), weights))
    variance = inertia / (2 * weights.sum())
    np.testing.assert_allclose(float(result.params.variance), variance, rtol=rtol)
    # ... so the objective is -(d/2)(1 + log(2 pi variance)) - log K.
    expected = -(1 + math.log(2 * math.pi * variance)) - math.log(3)
    np.testing.assert_allclose(float(result.log_likelihood), expected, rtol=rtol)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_fits_are_the_same_in_any_units(dtype, data, scale):
    """Rescaling the data rescales the centres and changes nothing else: the labels, the
    inertia over scale^2, and with the default tol the iteration at which the fit stops
    (the objective's changes are relative changes of the inertia). With a unit variance,
    float32 data in units of 1e-4 tied every sample in state 0."""
    x, _ = data
    x = x.astype(dtype)
    start = MODEL.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))
    scaled_x = (x * scale).astype(dtype)
    scaled_start = MODEL.init(jax.random.key(0), scaled_x, jnp.ones(x.shape[0], dtype))
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(np.asarray(scaled_start.centres) / scale, start.centres, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(float(scaled_start.variance) / scale**2, float(start.variance), rtol=rtol)
    fit = jax.jit(functools.partial(lem.fit_em, MODEL))  # default tol and max_iter
    result, scaled = fit(start, x), fit(scaled_start, scaled_x)
    assert int(result.status) == int(scaled.status) == lem.Status.CONVERGED
    assert int(scaled.n_iter) == int(result.n_iter) >= 3
    np.testing.assert_array_equal(
        lem.predict(MODEL, scaled.params, scaled_x), lem.predict(MODEL, result.params, x)
    )
    np.testing.assert_allclose(
        float(lem.inertia(scaled.params, scaled_x)) / scale**2,
        float(lem.inertia(result.params, x)),
        rtol=rtol,
    )
    # From the same centres, scikit-learn's Lloyd on the scaled data gives the same labels.
    reference = KMeans(
        3, init=np.asarray(scaled_start.centres, np.float64), n_init=1, algorithm="lloyd", tol=0.0
    )
    reference.fit(np.asarray(scaled_x, np.float64))
    lloyd = compiled_fit_em(MODEL)(scaled_start, scaled_x, tol=0.0)
    np.testing.assert_array_equal(lem.predict(MODEL, lloyd.params, scaled_x), reference.labels_)


def test_inertia_matches_brute_force(dtype, data):
    x, weights = data
    centres = np.array([[0.0, 0.0], [1.0, 1.0], [-2.0, 3.0]])
    distances = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    params = lem.KMeansParams(jnp.asarray(centres, dtype), jnp.asarray(1.0, dtype))
    np.testing.assert_allclose(
        float(lem.inertia(params, x.astype(dtype), weights)),
        (weights * distances).sum(),
        rtol=1e-12 if dtype == np.float64 else 1e-5,
    )


def test_zero_weight_is_removal_and_integer_weight_is_repetition(dtype, data):
    x, _ = data
    # Row 0 counted three times, rows 1 and 2 removed, against the same rows copied.
    weights = np.ones(x.shape[0])
    weights[:3] = (3, 0, 0)
    copied = x.copy()
    copied[1:3] = x[0]
    x, copied = jnp.asarray(x, dtype), jnp.asarray(copied, dtype)
    start = MODEL.init(jax.random.key(2), x, jnp.asarray(weights, dtype))
    with_weights = compiled_fit_em(MODEL)(start, x, weights=jnp.asarray(weights, dtype), tol=0.0)
    with_copies = compiled_fit_em(MODEL)(start, copied, weights=jnp.ones(x.shape[0], dtype), tol=0.0)
    assert_trees_all_close(with_weights.params, with_copies.params, rtol=1e-5, atol=1e-5)
    assert int(with_weights.status) == int(with_copies.status) == lem.Status.CONVERGED
    assert int(with_weights.n_iter) == int(with_copies.n_iter)


def test_a_zero_weight_sample_changing_cluster_does_not_delay_the_stop(dtype):
    """The fixed point is where no sample *with weight* changes cluster: a removed sample
    that changes cluster as the centres move must not cost an iteration."""
    model = lem.kmeans(2)
    x = jnp.asarray([[0.0], [2.0], [10.0], [11.0]], dtype)
    start = lem.KMeansParams(jnp.asarray([[0.0], [11.0]], dtype), jnp.asarray(1.0, dtype))
    # Midway 5.5 between the first centres, 5.75 between the fitted ones (1, 10.5).
    with_row = jnp.concatenate([x, jnp.asarray([[5.6]], dtype)])
    weights = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0], dtype)
    labels = [
        lem.predict(model, params, with_row[4:]).tolist()
        for params in (start, lem.em_step(model, start, x)[0])
    ]
    assert labels == [[1], [0]]
    removed, zero_weight = lem.fit_em(model, start, x), lem.fit_em(model, start, with_row, weights=weights)
    assert int(removed.n_iter) == int(zero_weight.n_iter) == 1
    assert int(removed.status) == int(zero_weight.status) == lem.Status.CONVERGED
    assert_trees_all_close(zero_weight.params, removed.params, rtol=0, atol=0)


def test_default_fit_runs_to_lloyds_fixed_point_as_scikit_learn(dtype):
    """A relative change of the inertia can be small long before the fixed point: here
    tol=1e-3 stopped after 3 iterations at an inertia 6% above it. By default the fit runs
    until no label changes, as scikit-learn's KMeans (which counts one iteration more)."""
    rng = np.random.default_rng(0)  # notebook 02's data
    means = np.array([[0.0, 0.0], [4.0, 0.5], [1.5, 4.0], [5.5, 4.5]])
    covariances = np.array(
        [
            [[1.0, 0.5], [0.5, 0.8]],
            [[0.6, -0.3], [-0.3, 1.0]],
            [[0.5, 0.0], [0.0, 0.5]],
            [[1.2, 0.6], [0.6, 0.7]],
        ]
    )
    labels = rng.choice(4, size=400, p=[0.3, 0.3, 0.2, 0.2])
    noise = rng.standard_normal((400, 2))
    x = (means[labels] + np.einsum("nij,nj->ni", np.linalg.cholesky(covariances)[labels], noise)).astype(
        dtype
    )
    model = lem.kmeans(2)
    start = lem.KMeansParams(jnp.asarray([[0.0, 2.0], [6.0, 2.0]], dtype), jnp.asarray(1.0, dtype))
    reference = KMeans(2, init=np.asarray(start.centres, np.float64), n_init=1, algorithm="lloyd", tol=0.0)
    reference.fit(x.astype(np.float64))
    result = compiled_fit_em(model)(start, x)  # default tol
    assert int(result.status) == lem.Status.CONVERGED
    assert int(result.n_iter) == reference.n_iter_ - 1 >= 10
    rtol = 1e-9 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(float(lem.inertia(result.params, x)), reference.inertia_, rtol=rtol)
    np.testing.assert_array_equal(lem.predict(model, result.params, x), reference.labels_)
    # A tolerance still stops it early (why it is not the default).
    early = compiled_fit_em(model)(start, x, tol=1e-3)
    assert int(early.n_iter) < int(result.n_iter)
    assert float(lem.inertia(early.params, x)) > 1.05 * reference.inertia_


def test_vmap_over_datasets_equals_a_loop(dtype):
    xs = jnp.asarray(np.stack([blobs(seed, n_per_cluster=100) for seed in (3, 4)]), dtype)
    keys = jax.random.split(jax.random.key(5), 2)
    batched = jax.vmap(functools.partial(lem.fit, MODEL, n_init=2))(keys, xs)
    for index in range(2):
        single = lem.fit(MODEL, keys[index], xs[index], n_init=2)
        member = jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], batched)
        assert_trees_all_close(member, single, rtol=1e-5, atol=1e-5)


def test_recovers_centres_from_its_own_samples(dtype):
    truth = lem.KMeansParams(
        jnp.asarray([[0.0, 0.0], [12.0, 0.0], [0.0, 12.0]], dtype), jnp.asarray(4.0, dtype)
    )
    x, labels = MODEL.sample(jax.random.key(6), truth, 300)
    assert x.shape == (300, 2) and x.dtype == dtype and labels.dtype == jnp.int32
    result = lem.fit(MODEL, jax.random.key(7), x, n_init=2)
    centres = np.asarray(result.params.centres, np.float64)
    rows, cols = linear_sum_assignment(
        ((centres[:, None] - np.asarray(truth.centres)[None]) ** 2).sum(axis=2)
    )
    # Clusters of standard deviation 2 and about 100 samples: each centre within 0.8
    # (4 standard errors), and the variance from 600 squared deviations within 4 standard
    # errors (relative standard error sqrt(2 / 600)).
    np.testing.assert_allclose(centres[rows], np.asarray(truth.centres)[cols], atol=0.8)
    np.testing.assert_allclose(float(result.params.variance), 4.0, rtol=4 * math.sqrt(2 / 600))


def test_empty_cluster_keeps_its_centre(dtype):
    x = jnp.asarray([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype)
    params = lem.KMeansParams(
        jnp.asarray([[0.0, 0.5], [5.0, 5.0], [100.0, 100.0]], dtype), jnp.asarray(1.0, dtype)
    )
    stepped, _ = lem.em_step(MODEL, params, x)
    np.testing.assert_allclose(
        np.asarray(stepped.centres), [[0.0, 0.5], [5.0, 5.0], [100.0, 100.0]], rtol=1e-6
    )
    # Inertia 0.5 over d = 2 features and 3 samples.
    np.testing.assert_allclose(float(stepped.variance), 0.5 / 6, rtol=1e-6)


def test_identical_samples_keep_a_positive_variance(dtype):
    x = jnp.ones((10, 2), dtype)
    result = lem.fit(lem.kmeans(1), jax.random.key(0), x)
    assert int(result.status) == lem.Status.CONVERGED
    assert 0 < float(result.params.variance) <= 10 * np.finfo(dtype).eps
    np.testing.assert_array_equal(np.asarray(result.params.centres), np.ones((1, 2)))


def test_check_model_passes(dtype, data):
    x, _ = data
    report = lem.check_model(MODEL, jax.random.key(8), x.astype(dtype), n_samples=300)
    assert report.passed, str(report)


def test_factory_validation_and_memoisation():
    assert lem.kmeans(3) is MODEL
    with pytest.raises(ValueError, match="n_clusters"):
        lem.kmeans(0)
    with pytest.raises(ValueError, match="init"):
        lem.kmeans(2, init="random")
    with pytest.raises(ValueError, match="n_clusters=3"):
        MODEL.init(jax.random.key(0), jnp.zeros((2, 2)), jnp.ones(2))
