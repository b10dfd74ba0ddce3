"""Tests of fit_gradient and of the Gaussian mixture's unconstrained coordinates.

Compilation dominates the cost here, so the fits share a few (model, optimizer, shape)
combinations through module-scoped fixtures: one dataset of 300 samples, three
components, and the optimizers below built once.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.mixture import GaussianMixture
from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

import latentem as lem
from latentem._gradient import _loss_fn
from tests.helpers import assert_trees_all_close, blobs, is_x64, random_covariances

N_COMPONENTS = 3
NUM_STEPS = 1000
TOL = 1e-9
# Built once: fit_gradient's compiled program is cached per optimizer object.
LBFGS = optax.lbfgs()
ADAM = optax.adam(0.05)
SGD_MOMENTUM = optax.sgd(0.05, momentum=0.9)
DIVERGING = optax.sgd(1e3)  # one accepted step, then NaN (float32 and float64)
OPTIMIZERS = {"lbfgs": LBFGS, "adam": ADAM, "sgd_momentum": SGD_MOMENTUM}
# Compiled once per model and shape (eager calls would dispatch op by op or retrace).
fit_em = jax.jit(lem.fit_em, static_argnums=0, static_argnames=("max_iter",))


def init(model, key, x):
    return jax.jit(model.init)(key, x, jnp.ones(x.shape[0], x.dtype))


def float_dtype():
    return np.float64 if is_x64() else np.float32


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(blobs(0, dtype=float_dtype()))


@pytest.fixture(scope="module")
def start(x):
    """Initial params for each covariance type, from the same k-means++ seeding."""
    return {
        covariance_type: init(lem.gaussian_mixture(N_COMPONENTS, covariance_type), jax.random.key(0), x)
        for covariance_type in ("full", "tied", "diag", "spherical")
    }


@pytest.fixture(scope="module")
def em_results(x, start):
    return {
        covariance_type: fit_em(
            lem.gaussian_mixture(N_COMPONENTS, covariance_type), params, x, max_iter=500, tol=TOL
        )
        for covariance_type, params in start.items()
    }


@pytest.fixture(scope="module")
def gradient_results(x, start):
    """The fits compared with EM: L-BFGS on every covariance type, Adam and SGD on full."""
    runs = [(c, "lbfgs") for c in ("full", "tied", "diag", "spherical")]
    runs += [("full", "adam"), ("full", "sgd_momentum")]
    return {
        (covariance_type, name): lem.fit_gradient(
            lem.gaussian_mixture(N_COMPONENTS, covariance_type),
            start[covariance_type],
            x,
            OPTIMIZERS[name],
            num_steps=NUM_STEPS,
            tol=TOL,
        )
        for covariance_type, name in runs
    }


def random_params(rng, covariance_type, dtype, n_components=3, n_features=3):
    return lem.GaussianMixtureParams(
        jnp.asarray(rng.dirichlet(np.ones(n_components)), dtype),
        jnp.asarray(5.0 * rng.standard_normal((n_components, n_features)), dtype),
        jnp.asarray(random_covariances(rng, covariance_type, n_components, n_features), dtype),
    )


# ---------------------------------------------------------------------------
# The bijection
# ---------------------------------------------------------------------------


def test_round_trip(covariance_type, dtype):
    model = lem.gaussian_mixture(3, covariance_type)
    rng = np.random.default_rng(0)
    for _ in range(10):
        params = random_params(rng, covariance_type, dtype)
        unconstrained = model.to_unconstrained(params)
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in unconstrained)
        assert_trees_all_close(model.from_unconstrained(unconstrained), params, rtol=1e-6, atol=1e-6)


def test_round_trip_of_a_zero_weight(covariance_type, dtype):
    model = lem.gaussian_mixture(3, covariance_type)
    params = random_params(np.random.default_rng(1), covariance_type, dtype)
    params = params._replace(weights=jnp.asarray([0.25, 0.75, 0.0], dtype))
    unconstrained = model.to_unconstrained(params)
    assert np.isfinite(np.asarray(unconstrained.logits)).all()
    assert_trees_all_close(model.from_unconstrained(unconstrained), params, rtol=1e-6, atol=1e-6)


def reference_from_unconstrained(unconstrained, covariance_type, n_features):
    """NumPy float64 construction of the params, written independently of the model."""
    logits = np.asarray(unconstrained.logits, np.float64)
    weights = np.exp(logits - logits.max())
    weights = weights / weights.sum()
    scales = np.asarray(unconstrained.scales, np.float64)
    if covariance_type in ("full", "tied"):
        packed = np.atleast_2d(scales)
        factors = np.zeros((packed.shape[0], n_features, n_features))
        rows, cols = np.tril_indices(n_features)
        for index, (row, col) in enumerate(zip(rows, cols, strict=True)):
            factors[:, row, col] = np.exp(packed[:, index]) if row == col else packed[:, index]
        covariances = factors @ factors.transpose(0, 2, 1)
        covariances = covariances[0] if covariance_type == "tied" else covariances
    else:
        covariances = np.exp(scales)
    return weights, covariances


def test_any_unconstrained_point_gives_valid_params(covariance_type, dtype):
    n_features = 3
    model = lem.gaussian_mixture(3, covariance_type)
    template = model.to_unconstrained(random_params(np.random.default_rng(2), covariance_type, dtype))
    rng = np.random.default_rng(3)
    points = [
        jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), dtype), template)
        for _ in range(20)
    ]
    # Logits so far apart that softmax underflows to zero in either precision.
    points.append(points[0]._replace(logits=jnp.asarray([0.0, -1e4, 30.0], dtype)))
    eps = float(jnp.finfo(dtype).eps)
    for point in points:
        params = model.from_unconstrained(point)
        weights = np.asarray(params.weights, np.float64)
        covariances = np.asarray(params.covariances, np.float64)
        assert (weights > 0).all()
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=0, atol=4 * eps)
        np.testing.assert_array_equal(np.asarray(params.means), np.asarray(point.means))
        if covariance_type in ("full", "tied"):
            np.testing.assert_allclose(covariances, np.swapaxes(covariances, -1, -2), rtol=0, atol=0)
            assert (np.linalg.eigvalsh(covariances) > 0).all()
        else:
            assert (covariances > 0).all()
        expected_weights, expected_covariances = reference_from_unconstrained(
            point, covariance_type, n_features
        )
        np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=float(jnp.finfo(dtype).tiny))
        np.testing.assert_allclose(covariances, expected_covariances, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Finite gradients
# ---------------------------------------------------------------------------


def directional_derivative(loss, point, direction, step):
    """Central finite difference of ``loss`` at ``point`` along ``direction``."""

    def moved(sign):
        return jax.tree_util.tree_map(lambda p, d: p + sign * step * d, point, direction)

    return (float(loss(moved(1))) - float(loss(moved(-1)))) / (2 * step)


def test_gradient_finite_when_a_weight_vanishes(x, start, covariance_type, dtype):
    model = lem.gaussian_mixture(N_COMPONENTS, covariance_type)
    ones = jnp.ones(x.shape[0], x.dtype)
    unconstrained = model.to_unconstrained(start[covariance_type])
    # Component 2's weight underflows to zero in softmax (floored at the smallest normal).
    vanished = unconstrained._replace(logits=unconstrained.logits.at[2].set(-1e4))
    loss = jax.jit(_loss_fn(model, x, ones))
    value, gradient = jax.jit(jax.value_and_grad(_loss_fn(model, x, ones)))(vanished)
    assert np.isfinite(float(value))
    for leaf in gradient:
        assert np.isfinite(np.asarray(leaf)).all()
    # The vanished component keeps the weight floor (the smallest normal number), so its
    # gradients are that small relative to the others, not exactly zero.
    scale = float(jnp.max(jnp.abs(gradient.means[:2])))
    np.testing.assert_allclose(np.asarray(gradient.logits[2]), 0.0, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(np.asarray(gradient.means[2]), 0.0, rtol=0, atol=1e-12 * scale)

    # Reference: the same mixture without component 2, through scikit-learn.
    params = model.from_unconstrained(vanished)
    reference = GaussianMixture(2, covariance_type=covariance_type)
    keep = np.array([0, 1])
    covariances = np.asarray(params.covariances, np.float64)
    reference.weights_ = np.asarray(params.weights, np.float64)[keep]
    reference.weights_ = reference.weights_ / reference.weights_.sum()
    reference.means_ = np.asarray(params.means, np.float64)[keep]
    reference.covariances_ = covariances if covariance_type == "tied" else covariances[keep]
    reference.precisions_cholesky_ = _compute_precision_cholesky(reference.covariances_, covariance_type)
    expected = -reference.score(np.asarray(x, np.float64))
    rtol = 1e-10 if is_x64() else 1e-5
    np.testing.assert_allclose(float(value), expected, rtol=rtol)

    # The gradient is the derivative: a central difference along a random direction.
    rng = np.random.default_rng(4)
    direction = jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), dtype), vanished
    )
    slope = sum(float(jnp.vdot(g, d)) for g, d in zip(gradient, direction, strict=True))
    step, rtol = (1e-5, 1e-6) if is_x64() else (1e-2, 2e-2)
    np.testing.assert_allclose(slope, directional_derivative(loss, vanished, direction, step), rtol=rtol)


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_gradient_finite_with_large_off_diagonal_cholesky_entries(x, start, covariance_type, dtype):
    """Off-diagonal entries of the packed Cholesky factors above log(largest float)
    (data in large units: Old Faithful in units 100 times smaller had them): exp of
    such an entry overflows, and where only the diagonal is exponentiated the gradient
    stays finite. Reference: autodiff of the same map written by indices (each entry
    set once, exp taken of the diagonal entries alone), through scikit-learn's score
    formula's ingredients in JAX (lem.score)."""
    model = lem.gaussian_mixture(N_COMPONENTS, covariance_type)
    ones = jnp.ones(x.shape[0], x.dtype)
    unconstrained = model.to_unconstrained(start[covariance_type])
    n_features = x.shape[1]
    rows, cols = np.tril_indices(n_features)
    large = float(np.log(np.finfo(dtype).max)) + 10  # 98.7 in float32, 719.8 in float64
    scales = unconstrained.scales.at[..., np.flatnonzero(rows != cols)[0]].set(large)
    point = unconstrained._replace(scales=scales)
    value, gradient = jax.jit(jax.value_and_grad(_loss_fn(model, x, ones)))(point)
    assert np.isfinite(float(value))
    for leaf in gradient:
        assert np.isfinite(np.asarray(leaf)).all()

    diagonal, off_diagonal = np.flatnonzero(rows == cols), np.flatnonzero(rows != cols)

    def reference_loss(u):
        packed = u.scales
        lower = jnp.zeros((*packed.shape[:-1], n_features, n_features), packed.dtype)
        lower = lower.at[..., rows[off_diagonal], cols[off_diagonal]].set(packed[..., off_diagonal])
        lower = lower.at[..., rows[diagonal], cols[diagonal]].set(jnp.exp(packed[..., diagonal]))
        params = model.from_unconstrained(u)._replace(covariances=lower @ jnp.swapaxes(lower, -1, -2))
        return -lem.score(model, params, x)

    expected_value, expected = jax.jit(jax.value_and_grad(reference_loss))(point)
    rtol = 1e-10 if is_x64() else 1e-4
    np.testing.assert_allclose(float(value), float(expected_value), rtol=rtol)
    assert_trees_all_close(
        gradient, expected, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(expected.scales)))
    )
    assert float(jnp.max(jnp.abs(gradient.scales[..., off_diagonal[0]]))) > 0


def test_gradient_finite_with_zero_weight_samples(x, start, dtype):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    unconstrained = model.to_unconstrained(start["full"])
    # Padding far enough away that log p(x_n) = -inf for those rows, plus an ordinary row.
    far = 1e200 if is_x64() else 1e30
    padded = jnp.concatenate([x, jnp.full((4, 2), far, dtype), jnp.zeros((1, 2), dtype)])
    weights = jnp.concatenate([jnp.ones(x.shape[0], dtype), jnp.zeros(5, dtype)])
    assert not np.isfinite(np.asarray(lem.score_samples(model, start["full"], padded))[-5:-1]).any()

    value, gradient = jax.jit(jax.value_and_grad(_loss_fn(model, padded, weights)))(unconstrained)
    reference_loss = _loss_fn(model, x, weights[: x.shape[0]])
    expected_value, expected_gradient = jax.jit(jax.value_and_grad(reference_loss))(unconstrained)
    for leaf in gradient:
        assert np.isfinite(np.asarray(leaf)).all()
    rtol = 1e-12 if is_x64() else 1e-5
    np.testing.assert_allclose(float(value), float(expected_value), rtol=rtol)
    assert_trees_all_close(gradient, expected_gradient, rtol=rtol, atol=rtol)


def test_fit_from_a_zero_weight_component(x, start, dtype):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    params = start["full"]._replace(weights=jnp.asarray([0.5, 0.5, 0.0], dtype))
    with pytest.warns(lem.ConvergenceWarning, match="EMPTY_COMPONENT"):
        result = lem.fit_gradient(model, params, x, LBFGS, num_steps=NUM_STEPS, tol=TOL)
    em = fit_em(model, params, x, max_iter=500, tol=TOL)
    assert int(result.status) == lem.Status.EMPTY_COMPONENT
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in result.params)
    assert float(result.params.weights[2]) <= 1e-30
    # A local optimum of the two live components: EM started from it gains nothing, and
    # it is no worse than the one EM reaches from the same start. (Which optimum L-BFGS
    # reaches depends on its line search: with optax 0.2.8 EM's own, with optax 0.2.3
    # a better one, -4.232 against EM's -4.254 in float64.)
    polished = fit_em(model, result.params, x, max_iter=500, tol=TOL)
    np.testing.assert_allclose(
        float(polished.log_likelihood), float(result.log_likelihood), rtol=0, atol=1e-7 if is_x64() else 1e-5
    )
    assert float(result.log_likelihood) >= float(em.log_likelihood) - 1e-3


# ---------------------------------------------------------------------------
# Fits: against EM, against scikit-learn, statuses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run",
    [
        ("full", "lbfgs"),
        ("tied", "lbfgs"),
        ("diag", "lbfgs"),
        ("spherical", "lbfgs"),
        ("full", "adam"),
        ("full", "sgd_momentum"),
    ],
    ids="-".join,
)
def test_matches_em_from_the_same_start(run, gradient_results, em_results):
    # Specified in float64; float32 meets the same 1e-3 (measured gaps <= 2e-4).
    covariance_type, _ = run
    result = gradient_results[run]
    em = em_results[covariance_type]
    assert int(result.status) == lem.Status.CONVERGED
    assert bool(result.converged)
    assert int(em.status) == lem.Status.CONVERGED
    np.testing.assert_allclose(float(result.log_likelihood), float(em.log_likelihood), rtol=0, atol=1e-3)


def test_objective_is_scikit_learn_score(x, gradient_results):
    result = gradient_results[("full", "lbfgs")]
    reference = GaussianMixture(N_COMPONENTS, covariance_type="full")
    reference.weights_ = np.asarray(result.params.weights, np.float64)
    reference.means_ = np.asarray(result.params.means, np.float64)
    reference.covariances_ = np.asarray(result.params.covariances, np.float64)
    reference.precisions_cholesky_ = _compute_precision_cholesky(reference.covariances_, "full")
    rtol = 1e-10 if is_x64() else 1e-5
    np.testing.assert_allclose(
        float(result.log_likelihood), reference.score(np.asarray(x, np.float64)), rtol=rtol
    )
    n_steps = int(result.n_steps)
    history = np.asarray(result.history)
    assert history.shape == (NUM_STEPS,)
    np.testing.assert_allclose(history[n_steps - 1], float(result.log_likelihood), rtol=rtol)
    assert np.isfinite(history[:n_steps]).all() and np.isnan(history[n_steps:]).all()


def test_objective_includes_log_prior(x, start):
    base = lem.gaussian_mixture(N_COMPONENTS, "spherical")

    def log_prior(params):
        return -jnp.sum(jnp.square(params.means))

    model = base._replace(log_prior=log_prior)
    result = lem.fit_gradient(model, start["spherical"], x, LBFGS, num_steps=NUM_STEPS, tol=TOL)
    total = x.shape[0]
    score = float(lem.score(model, result.params, x))
    expected = score + float(log_prior(result.params)) / total
    rtol = 1e-12 if is_x64() else 1e-6
    np.testing.assert_allclose(float(result.log_likelihood), expected, rtol=rtol)
    # The prior pulls the means towards the origin compared with maximum likelihood.
    unregularised = lem.fit_gradient(base, start["spherical"], x, LBFGS, num_steps=NUM_STEPS, tol=TOL)
    assert float(jnp.sum(jnp.square(result.params.means))) < float(
        jnp.sum(jnp.square(unregularised.params.means))
    )


@pytest.mark.parametrize("tol", [None, 0.0])
def test_runs_all_steps_without_tol(x, start, tol):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # running out of steps without tol is no warning
        result = lem.fit_gradient(model, start["full"], x, ADAM, num_steps=NUM_STEPS, tol=tol)
    assert int(result.status) == lem.Status.MAX_ITER
    assert not bool(result.converged)
    assert int(result.n_steps) == NUM_STEPS
    assert np.isfinite(np.asarray(result.history)).all()
    rtol = 1e-12 if is_x64() else 1e-6
    np.testing.assert_allclose(float(result.history[-1]), float(result.log_likelihood), rtol=rtol)


def test_a_step_that_moves_nothing_is_not_convergence(x, start, em_results):
    """optax.MultiSteps returns zero updates while it accumulates gradients: the objective
    does not change in those steps, which had stopped the fit after one step, CONVERGED
    far from the optimum."""
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    optimizer = optax.MultiSteps(optax.adam(0.05), every_k_schedule=2)
    result = lem.fit_gradient(model, start["full"], x, optimizer, num_steps=NUM_STEPS, tol=1e-6)
    assert int(result.status) == lem.Status.CONVERGED and int(result.n_steps) > 10
    history = np.asarray(result.history[: int(result.n_steps)])
    assert np.any(history[1:] == history[:-1])  # the accumulating steps were there
    # Near EM's optimum: Adam stops once a step gains less than tol, 1e-5 to 1.1e-4 short
    # of it (optax 0.2.3 and 0.2.8, both precisions); after one step it was 8e-4 to 1.7e-3.
    np.testing.assert_allclose(
        float(result.log_likelihood), float(em_results["full"].log_likelihood), rtol=0, atol=3e-4
    )


def test_progress_callback_reports_every_step(x, start):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    calls = []
    callback = lambda step, objective: calls.append((int(step), float(objective)))
    # Off: nothing of the callback reaches the compiled program.
    fit = lambda callback: (
        lambda params: lem.fit_gradient(model, params, x, ADAM, num_steps=5, callback=callback)
    )
    assert "callback" not in str(jax.make_jaxpr(fit(None))(start["full"]))
    assert "callback" in str(jax.make_jaxpr(fit(callback))(start["full"]))
    assert not calls  # tracing alone reports nothing
    # On: step 0 is the start, then one call per step with the objective after it,
    # the values the history records.
    result = lem.fit_gradient(model, start["full"], x, ADAM, num_steps=NUM_STEPS, tol=TOL, callback=callback)
    jax.effects_barrier()
    n_steps = int(result.n_steps)
    assert n_steps >= 3
    assert [step for step, _ in calls] == list(range(n_steps + 1))
    start_objective = float(lem.score(model, start["full"], x))
    rtol = 1e-12 if is_x64() else 1e-6
    np.testing.assert_allclose(calls[0][1], start_objective, rtol=rtol)
    np.testing.assert_allclose([value for _, value in calls[1:]], result.history[:n_steps], rtol=rtol)


def test_stops_on_nonfinite_with_last_finite_params(x, start):
    model = lem.gaussian_mixture(N_COMPONENTS, "spherical")
    with pytest.warns(lem.ConvergenceWarning, match="NONFINITE"):
        result = lem.fit_gradient(model, start["spherical"], x, DIVERGING, num_steps=NUM_STEPS, tol=TOL)
    n_steps = int(result.n_steps)
    assert int(result.status) == lem.Status.NONFINITE
    assert not bool(result.converged)
    assert 1 < n_steps < NUM_STEPS
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in result.params)
    rtol = 1e-10 if is_x64() else 1e-5
    np.testing.assert_allclose(
        float(result.log_likelihood), float(lem.score(model, result.params, x)), rtol=rtol
    )
    # The returned fit is the last accepted step; the step after it was rejected (its
    # objective, coordinates or gradient were not finite) and ended the loop.
    np.testing.assert_allclose(float(result.log_likelihood), float(result.history[n_steps - 2]), rtol=rtol)
    assert np.isnan(np.asarray(result.history[n_steps:])).all()


def test_nonfinite_start(x, start, dtype):
    model = lem.gaussian_mixture(N_COMPONENTS, "spherical")
    params = start["spherical"]._replace(means=start["spherical"].means.at[0, 0].set(jnp.nan))
    with pytest.warns(lem.ConvergenceWarning, match="NONFINITE"):
        result = lem.fit_gradient(model, params, x, DIVERGING, num_steps=NUM_STEPS, tol=TOL)
    assert int(result.status) == lem.Status.NONFINITE
    assert int(result.n_steps) == 0
    assert np.isnan(np.asarray(result.history)).all()


# ---------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------


def test_vmap_equals_loop(dtype):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    xs = jnp.stack([jnp.asarray(blobs(seed, dtype=dtype)) for seed in range(8)])
    stacked = jax.vmap(lambda key, x: init(model, key, x))(jax.random.split(jax.random.key(5), 8), xs)
    starts = [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked) for i in range(8)]

    def fit_one(params, x):
        return lem.fit_gradient(model, params, x, LBFGS, num_steps=NUM_STEPS, tol=TOL)

    batched = jax.vmap(fit_one)(stacked, xs)
    looped = [fit_one(params, x) for params, x in zip(starts, xs, strict=True)]
    looped = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *looped)
    np.testing.assert_array_equal(np.asarray(batched.status), np.asarray(looped.status))
    if is_x64():
        np.testing.assert_array_equal(np.asarray(batched.n_steps), np.asarray(looped.n_steps))
        assert_trees_all_close(batched.params, looped.params, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(batched.log_likelihood, looped.log_likelihood, rtol=1e-12)
    else:
        # Batched float32 products round differently, which can move the step at which
        # |change| < tol by one and the params along the likelihood's flat directions.
        assert_trees_all_close(batched.params, looped.params, rtol=0, atol=5e-3)
        np.testing.assert_allclose(batched.log_likelihood, looped.log_likelihood, rtol=0, atol=1e-5)


def test_jit_equals_eager(x, start, gradient_results):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    jitted = jax.jit(lem.fit_gradient, static_argnums=(0, 3), static_argnames=("num_steps",))
    result = jitted(model, start["full"], x, SGD_MOMENTUM, num_steps=NUM_STEPS, tol=TOL)
    eager = gradient_results[("full", "sgd_momentum")]
    np.testing.assert_array_equal(int(result.n_steps), int(eager.n_steps))
    assert_trees_all_close(result, eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_model_without_bijection_is_an_error(x, start):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")._replace(
        to_unconstrained=None, from_unconstrained=None
    )
    with pytest.raises(ValueError, match="to_unconstrained and from_unconstrained"):
        lem.fit_gradient(model, start["full"], x, ADAM)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"optimizer": "adam"}, "optax GradientTransformation"),
        ({"num_steps": -1}, "num_steps"),
        ({"tol": -1.0}, "tol"),
        ({"weights": np.ones(3)}, "weights"),
    ],
)
def test_invalid_arguments(x, start, arguments, match):
    model = lem.gaussian_mixture(N_COMPONENTS, "full")
    call = {"optimizer": ADAM, **arguments}
    optimizer = call.pop("optimizer")
    with pytest.raises(ValueError, match=match):
        lem.fit_gradient(model, start["full"], x, optimizer, **call)
