"""Bernoulli, categorical and Poisson mixtures: SciPy/NumPy references, MAP smoothing,
monotone EM, weights, vmap, recovery from their own samples, and digits."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from sklearn.datasets import load_digits

import latentem as lem
from tests.helpers import assert_trees_all_close, is_x64

MAX_ITER = 100
N_SAMPLES = 600
CATEGORIES = (2, 3, 4)


class Case(NamedTuple):
    name: str
    model: lem.LatentModel
    smoothing: float
    truth: tuple  # weights, then the emission parameters, as float64 NumPy


CASES = {
    "bernoulli": Case(
        "bernoulli",
        lem.bernoulli_mixture(2, smoothing=0.5),
        0.5,
        (
            np.array([0.35, 0.65]),
            np.array([[0.9, 0.9, 0.8, 0.1, 0.2, 0.1, 0.5, 0.05], [0.1, 0.2, 0.2, 0.9, 0.7, 0.8, 0.5, 0.05]]),
        ),
    ),
    "categorical": Case(
        "categorical",
        lem.categorical_mixture(2, CATEGORIES, smoothing=0.5),
        0.5,
        (
            np.array([0.4, 0.6]),
            np.array(
                [
                    [[0.9, 0.1, 0, 0], [0.7, 0.2, 0.1, 0], [0.1, 0.1, 0.1, 0.7]],
                    [[0.2, 0.8, 0, 0], [0.1, 0.1, 0.8, 0], [0.6, 0.2, 0.1, 0.1]],
                ]
            ),
        ),
    ),
    "poisson": Case(
        "poisson",
        lem.poisson_mixture(2, smoothing=0.5),
        0.5,
        (np.array([0.3, 0.7]), np.array([[1.0, 6.0, 2.0, 9.0], [7.0, 1.0, 5.0, 2.0]])),
    ),
}


def reference_log_joint(name, weights, emission, x):
    """log p(x_n, z_n = k) from SciPy's distributions, float64."""
    x = np.asarray(x, np.float64)
    if name == "bernoulli":
        per_component = stats.bernoulli.logpmf(x[:, None, :], emission[None]).sum(axis=2)
    elif name == "poisson":
        per_component = stats.poisson.logpmf(x[:, None, :], emission[None]).sum(axis=2)
    else:
        codes = x.astype(int)
        per_component = np.zeros((x.shape[0], len(weights)))
        for k in range(len(weights)):
            for v, size in enumerate(CATEGORIES):
                one_hot = np.eye(size)[codes[:, v]]
                per_component[:, k] += stats.multinomial.logpmf(one_hot, 1, emission[k, v, :size])
    return per_component + np.log(weights)[None, :]


def reference_m_step(name, x, responsibilities, smoothing):
    """MAP estimates in closed form (pseudo-counts), float64."""
    x = np.asarray(x, np.float64)
    counts = responsibilities.sum(axis=0)
    weights = (counts + smoothing) / (counts.sum() + len(counts) * smoothing)
    if name == "bernoulli":
        return weights, (responsibilities.T @ x + smoothing) / (counts + 2 * smoothing)[:, None]
    if name == "poisson":
        return weights, (responsibilities.T @ x + smoothing) / (counts + smoothing)[:, None]
    probabilities = np.zeros((len(counts), len(CATEGORIES), max(CATEGORIES)))
    for v, size in enumerate(CATEGORIES):
        table = responsibilities.T @ np.eye(size)[x[:, v].astype(int)]
        probabilities[:, v, :size] = (table + smoothing) / (counts + size * smoothing)[:, None]
    return weights, probabilities


def params_of(case, values, dtype):
    params_type = type(jax.eval_shape(case.model.m_step, *_dummy(case)))
    return params_type(*(jnp.asarray(value, dtype) for value in values))


def _dummy(case):
    x = jnp.zeros((2, len(case.truth[1][0])), jnp.int32)
    start = case.model.init(jax.random.key(0), x, jnp.ones(2))
    return x, jnp.ones((2, 2), start[0].dtype), start


@functools.lru_cache
def programs(model):
    """The compiled programs the tests share: init, one fit, and a vmapped fit."""
    fit_em = functools.partial(lem.fit_em, model, max_iter=MAX_ITER, tol=1e-6)
    return jax.jit(model.init), jax.jit(fit_em), jax.jit(jax.vmap(fit_em))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """A model, its true parameters, N_SAMPLES draws from them, and a fit to those draws."""
    case = CASES[request.param]
    dtype = np.float64 if is_x64() else np.float32
    truth = params_of(case, case.truth, dtype)
    x, labels = case.model.sample(jax.random.key(1), truth, N_SAMPLES)
    init, fit, _ = programs(case.model)
    weights = jnp.ones(N_SAMPLES, dtype)
    result = fit(init(jax.random.key(2), x, weights), x)
    return case, truth, x, labels, result


def test_sample_shapes_and_values(case, dtype):
    case, _, x, labels, _ = case
    assert labels.shape == (N_SAMPLES,) and labels.dtype == jnp.int32
    values = np.asarray(x)
    if case.name == "categorical":
        assert x.dtype == jnp.int32 and x.shape == (N_SAMPLES, len(CATEGORIES))
        assert np.all((values >= 0) & (values < np.array(CATEGORIES)[None, :]))
    else:
        assert x.dtype == dtype
        assert np.all(values == np.round(values)) and values.min() >= 0
        if case.name == "bernoulli":
            assert set(np.unique(values)) <= {0.0, 1.0}


def test_log_joint_matches_scipy(case, dtype):
    case, truth, x, _, _ = case
    expected = reference_log_joint(case.name, *case.truth, x)
    actual = np.asarray(case.model.log_joint(truth, x))
    np.testing.assert_allclose(actual, expected, rtol=1e-10 if dtype == np.float64 else 1e-5)


def test_m_step_is_the_closed_form_map_estimate(case, dtype):
    case, truth, x, _, _ = case
    rng = np.random.default_rng(3)
    responsibilities = rng.dirichlet(np.ones(2), N_SAMPLES) * rng.integers(0, 3, N_SAMPLES)[:, None]
    new = case.model.m_step(x, jnp.asarray(responsibilities, dtype), truth)
    expected = reference_m_step(case.name, x, responsibilities, case.smoothing)
    assert_trees_all_close(tuple(new), expected, rtol=1e-10 if dtype == np.float64 else 1e-5)


def test_smoothing_keeps_probabilities_inside_the_unit_interval(dtype):
    # A feature that is always 0 and one that is always 1: ML would give exactly 0 and 1.
    x = jnp.asarray(np.array([[0, 1, 0], [0, 1, 1], [0, 1, 1], [0, 1, 0]]), dtype)
    model = lem.bernoulli_mixture(2)
    responsibilities = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype)
    params = model.m_step(x, responsibilities, model.init(jax.random.key(0), x, jnp.ones(4, dtype)))
    # Laplace smoothing (s = 1): (0 + 1) / (4 + 2), (4 + 1) / (4 + 2); the empty component 1/2.
    np.testing.assert_allclose(
        np.asarray(params.probabilities), [[1 / 6, 5 / 6, 1 / 2], [1 / 2, 1 / 2, 1 / 2]], rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(params.weights), [5 / 6, 1 / 6], rtol=1e-6)
    poisson = lem.poisson_mixture(1)
    rates = poisson.m_step(x, responsibilities[:, :1], poisson.init(jax.random.key(0), x, jnp.ones(4, dtype)))
    np.testing.assert_allclose(np.asarray(rates.rates), [[1 / 5, 5 / 5, 3 / 5]], rtol=1e-6)


def test_map_em_never_lowers_the_objective(case):
    case, _, x, _, result = case
    n_iter = int(result.n_iter)
    history = np.asarray(result.history[:n_iter], np.float64)
    assert 2 <= n_iter < MAX_ITER and bool(result.converged)
    assert np.all(np.diff(history) >= -1e-6 * np.abs(history[1:]))
    # The objective includes the log prior: score plus log_prior / n.
    expected = float(lem.score(case.model, result.params, x)) + float(
        case.model.log_prior(result.params)
    ) / len(x)
    np.testing.assert_allclose(float(result.log_likelihood), expected, rtol=1e-5)


def test_recovers_the_parameters_it_sampled_from(case):
    case, _, _, _, result = case
    weights, emission = (np.asarray(leaf, np.float64) for leaf in result.params)
    true_weights, true_emission = case.truth
    cost = ((emission[:, None] - true_emission[None]) ** 2).reshape(2, 2, -1).sum(axis=2)
    rows, cols = linear_sum_assignment(cost)
    # N_SAMPLES = 600 draws: weights within 0.06, probabilities within 0.1, rates within 15%.
    np.testing.assert_allclose(weights[rows], true_weights[cols], atol=0.06)
    if case.name == "poisson":
        np.testing.assert_allclose(emission[rows], true_emission[cols], rtol=0.15)
    else:
        np.testing.assert_allclose(emission[rows], true_emission[cols], atol=0.1)


def test_zero_weight_is_removal_and_integer_weight_is_repetition(case):
    case, _, x, _, _ = case
    dtype = np.float64 if is_x64() else np.float32
    init, fit, _ = programs(case.model)
    weights = np.ones(N_SAMPLES)
    weights[:3] = (3, 0, 0)
    copied = np.asarray(x).copy()
    copied[1:3] = copied[0]
    copied = jnp.asarray(copied, x.dtype)
    start = init(jax.random.key(4), x, jnp.ones(N_SAMPLES, dtype))
    # The same iterates, to round-off: a fixed number of iterations, since in float32 a
    # tolerance of 1e-6 on the mean log-likelihood is a few units of its last place and
    # round-off (the sums run in another order) can decide where each fit stops.
    fixed = jax.jit(functools.partial(lem.fit_em, case.model, max_iter=20, tol=0.0))
    with_weights = fixed(start, x, weights=jnp.asarray(weights, dtype))
    with_copies = fixed(start, copied, weights=jnp.ones(N_SAMPLES, dtype))
    assert_trees_all_close(with_weights.params, with_copies.params, rtol=1e-5, atol=1e-6)
    if dtype == np.float64:  # there the tolerance is far above round-off: same stopping point
        with_weights = fit(start, x, weights=jnp.asarray(weights, dtype))
        with_copies = fit(start, copied, weights=jnp.ones(N_SAMPLES, dtype))
        assert_trees_all_close(with_weights.params, with_copies.params, rtol=1e-9, atol=1e-12)
        assert int(with_weights.n_iter) == int(with_copies.n_iter)


def test_vmap_over_datasets_equals_a_loop(case):
    case, truth, x, _, _ = case
    init, _, _ = programs(case.model)
    dtype = np.float64 if is_x64() else np.float32
    other, _ = case.model.sample(jax.random.key(5), truth, N_SAMPLES)
    xs = jnp.stack([x, other])
    starts = jax.vmap(init, in_axes=(None, 0, None))(jax.random.key(6), xs, jnp.ones(N_SAMPLES, dtype))
    # A fixed number of iterations: a tolerance near float32's resolution of the
    # objective would let round-off decide where each fit stops.
    fit_em = functools.partial(lem.fit_em, case.model, max_iter=20, tol=0.0)
    results = jax.jit(jax.vmap(fit_em))(starts, xs)
    for index in range(2):
        single = jax.jit(fit_em)(jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], starts), xs[index])
        member = jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], results)
        # Batched products may sum in another order: round-off only.
        tolerance = 1e-9 if dtype == np.float64 else 1e-4
        assert_trees_all_close(member, single, rtol=tolerance, atol=tolerance)


def test_check_model_passes(case):
    case, _, x, _, _ = case
    report = lem.check_model(case.model, jax.random.key(7), x, n_samples=N_SAMPLES)
    assert report.passed, str(report)


def test_unconstrained_round_trip_and_parameter_count(case):
    case, truth, _, _, _ = case
    back = case.model.from_unconstrained(case.model.to_unconstrained(truth))
    assert_trees_all_close(back, truth, rtol=1e-5, atol=1e-7)
    per_component = {"bernoulli": 8, "categorical": sum(CATEGORIES) - len(CATEGORIES), "poisson": 4}
    assert case.model.n_parameters(truth) == 2 * per_component[case.name] + 1


def test_bernoulli_mixture_beats_one_bernoulli_product_on_held_out_digits(dtype):
    images = (load_digits().data > 7).astype(dtype)  # 1797 binarised 8 x 8 images
    order = np.random.default_rng(0).permutation(len(images))
    train, test = images[order[:1500]], images[order[1500:]]
    # One product of Bernoulli distributions: its MAP fit is closed form (Laplace-smoothed
    # pixel frequencies); the one-component model scores it as SciPy does.
    p = (train.astype(np.float64).sum(axis=0) + 1) / (len(train) + 2)
    single_held_out = stats.bernoulli.logpmf(test, p[None, :]).sum(axis=1).mean()
    single = lem.BernoulliMixtureParams(jnp.ones(1, dtype), jnp.asarray(p[None, :], dtype))
    np.testing.assert_allclose(
        float(lem.score(lem.bernoulli_mixture(1), single, test)), single_held_out, rtol=1e-5
    )
    mixture = lem.bernoulli_mixture(10)
    result = lem.fit(mixture, jax.random.key(0), train)
    assert int(result.status) == lem.Status.CONVERGED
    # The mixture's held-out log-likelihood, recomputed with SciPy from its parameters.
    weights, probabilities = (np.asarray(leaf, np.float64) for leaf in result.params)
    log_joint = stats.bernoulli.logpmf(test[:, None, :], probabilities[None]).sum(axis=2) + np.log(weights)
    mixture_held_out = logsumexp(log_joint, axis=1).mean()
    np.testing.assert_allclose(float(lem.score(mixture, result.params, test)), mixture_held_out, rtol=1e-5)
    # About -25 nats per image for one product against about -20 for ten components.
    assert mixture_held_out > single_held_out + 3.0, (mixture_held_out, single_held_out)


@pytest.mark.parametrize(
    ("model", "bad", "params", "message"),
    [
        (lem.bernoulli_mixture(2), [[0, 2], [1, 0]], lem.BernoulliMixtureParams, "binary"),
        (lem.poisson_mixture(2), [[0.5, 2], [1, 0]], lem.PoissonMixtureParams, "counts"),
        (lem.poisson_mixture(2), [[-1, 2], [1, 0]], lem.PoissonMixtureParams, "counts"),
    ],
    ids=["bernoulli", "poisson-fraction", "poisson-negative"],
)
def test_data_outside_the_support_is_refused_or_impossible(model, bad, params, message, dtype):
    x = jnp.asarray(np.asarray(bad), dtype)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), x, jnp.ones(2, dtype))
    # Under jit the first sample has probability zero: log_joint is -inf there, finite elsewhere.
    params = params(jnp.asarray([0.5, 0.5], dtype), jnp.asarray([[0.3, 0.6], [0.6, 0.3]], dtype))
    log_joint = np.asarray(jax.jit(model.log_joint)(params, x))
    assert np.all(np.isneginf(log_joint[0])) and np.all(np.isfinite(log_joint[1:]))


def test_category_codes_outside_the_support_are_refused_or_impossible(dtype):
    model = lem.categorical_mixture(2, (2, 3))
    x = jnp.asarray([[0, 3], [1, 2]], jnp.int32)
    with pytest.raises(ValueError, match="category codes"):
        model.init(jax.random.key(0), x, jnp.ones(2, dtype))
    probabilities = jnp.asarray([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]] * 2, dtype)
    params = lem.CategoricalMixtureParams(jnp.asarray([0.5, 0.5], dtype), probabilities)
    log_joint = np.asarray(jax.jit(model.log_joint)(params, x))
    assert np.all(np.isneginf(log_joint[0])) and np.all(np.isfinite(log_joint[1:]))


OUTSIDE_THE_SUPPORT = {
    "bernoulli": (lem.bernoulli_mixture(2), lambda rng: rng.integers(0, 2, (12, 3)), 2, "binary"),
    "poisson": (lem.poisson_mixture(2), lambda rng: rng.poisson(3.0, (12, 3)), -1, "counts"),
    "categorical": (
        lem.categorical_mixture(2, 3),
        lambda rng: rng.integers(0, 3, (12, 3)),
        3,
        "category codes",
    ),
}


@pytest.mark.parametrize("name", list(OUTSIDE_THE_SUPPORT))
def test_compiled_fits_refuse_data_outside_the_support(name, dtype):
    # fit, fit_gradient and check_model compile the whole fit, where the model's own
    # checks see no values: the engine calls its check_data first. Without it they ended
    # Status.NONFINITE with a warning (fit) or a failed report (check_model).
    model, draw, bad_value, message = OUTSIDE_THE_SUPPORT[name]
    good = np.asarray(draw(np.random.default_rng(0)), dtype)
    bad = good.copy()
    bad[7, 1] = bad_value
    key = jax.random.key(0)
    params = lem.fit(model, key, good).params
    calls = {
        "fit": lambda x: lem.fit(model, key, x),
        "fit hard_em": lambda x: lem.fit(lem.hard_em(model), key, x),
        "fit_em": lambda x: lem.fit_em(model, params, x),
        "em_step": lambda x: lem.em_step(model, params, x),
        "fit_gradient": lambda x: lem.fit_gradient(model, params, x, optax.adam(0.1), num_steps=3),
        "check_model": lambda x: lem.check_model(model, key, x),
    }
    for call_name, call in calls.items():
        if call_name != "check_model":  # which passes these models in test_check_model_passes
            call(good)
        with pytest.raises(ValueError, match=f"{message}.*row 7, column 1"):
            call(bad)
            raise AssertionError(f"{call_name} accepted data outside the support")
    # Where the data are not known (under jit, or one dataset of a batch), the compiled
    # fit reports the status instead, and the other datasets of a batch are untouched.
    assert int(jax.jit(lambda x: lem.fit(model, key, x).status)(bad)) == lem.Status.NONFINITE
    with pytest.warns(lem.ConvergenceWarning, match="1 of 2 fits"):
        batch = lem.fit_batch(model, key, np.stack([good, bad]))
    assert batch.status.tolist()[1] == lem.Status.NONFINITE
    assert batch.status.tolist()[0] != lem.Status.NONFINITE


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="columns"):
        lem.categorical_mixture(2, (2, 3)).init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32), jnp.ones(2))
    with pytest.raises(ValueError, match="smoothing"):
        lem.poisson_mixture(2, smoothing=-1.0)
    with pytest.raises(ValueError, match="n_categories"):
        lem.categorical_mixture(2, 0)
    with pytest.raises(ValueError, match="init"):
        lem.bernoulli_mixture(2, init="kmeans")
    assert lem.bernoulli_mixture(3) is lem.bernoulli_mixture(3)
