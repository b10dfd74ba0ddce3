"""Adversarial inputs and faults: each row of the reliability table is a test here.

Nothing silent: bad input raises a ValueError that says what to change; inside compiled
code a broken fit gets a status (never a NaN that reads as converged); one bad dataset
never spoils a batch.
"""

import functools
from typing import NamedTuple

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from sklearn.mixture import GaussianMixture

import latentem as lem
from tests.helpers import assert_trees_all_close, assert_trees_equal, blobs

MODEL = lem.gaussian_mixture(3, "full")


def tolerance(dtype, float64, float32):
    return float64 if dtype == np.float64 else float32


@functools.lru_cache
def compiled_fit_em(model, max_iter=100):
    return jax.jit(functools.partial(lem.fit_em, model, max_iter=max_iter))


@pytest.fixture(scope="module")
def three_blobs():
    return blobs(0, n_per_cluster=40)  # (120, 2) float64


def ones(x):
    return np.ones(x.shape[0], x.dtype)  # NumPy: a float64 x keeps float64 weights without x64


# ---------------------------------------------------------------------------
# NaN and inf
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_data_eager_error_names_rows(bad, three_blobs):
    x = three_blobs.copy()
    x[[4, 17], 1] = bad
    for call in (
        lambda: lem.fit(MODEL, jax.random.key(0), x),
        lambda: lem.fit_em(MODEL, MODEL.init(jax.random.key(0), three_blobs, ones(three_blobs)), x),
        lambda: lem.score(MODEL, lem.fit(MODEL, jax.random.key(0), three_blobs).params, x),
    ):
        with pytest.raises(ValueError, match=r"2 row\(s\): 4, 17"):
            call()


def test_float64_data_beyond_the_computed_dtype_are_refused_not_turned_into_infinities(dtype, three_blobs):
    # Finite float64 data; in JAX's 32-bit mode 5e38 has no float32 (the cast gives inf).
    x = three_blobs * 1e37
    x[[4, 17], 0] = 5e38
    calls = (
        lambda: lem.fit(MODEL, jax.random.key(0), x),
        lambda: lem.score(MODEL, lem.fit(MODEL, jax.random.key(0), three_blobs).params, x),
    )
    if dtype == np.float64:  # representable: fitted, not refused
        result = lem.fit(MODEL, jax.random.key(0), x)
        assert np.isfinite(float(result.log_likelihood))
        return
    for call in calls:
        with pytest.raises(
            ValueError, match=r"beyond float32's range .* 2 row\(s\): 4, 17.*JAX_ENABLE_X64=1"
        ):
            call()
    assert np.all(np.isfinite(x))  # the data are left as they were


def test_nonfinite_data_under_jit_is_a_status_never_converged(dtype, three_blobs):
    clean = jnp.asarray(three_blobs, dtype)
    params = MODEL.init(jax.random.key(0), clean, ones(clean))
    for bad in (jnp.nan, jnp.inf):
        x = clean.at[7, 1].set(bad)
        result = compiled_fit_em(MODEL)(params, x)
        assert int(result.status) == lem.Status.NONFINITE and not bool(result.converged)
        assert int(result.n_iter) == 0
        assert_trees_equal(result.params, params)
        restarted = jax.jit(lambda key, x: lem.fit(MODEL, key, x, n_init=2))(jax.random.key(0), x)
        assert int(restarted.status) == lem.Status.NONFINITE and not bool(restarted.converged)


# ---------------------------------------------------------------------------
# Shapes, arguments, weights
# ---------------------------------------------------------------------------


def test_wrong_dimensions_say_the_expected_shape(three_blobs):
    with pytest.raises(ValueError, match=r"reshape\(-1, 1\)"):
        lem.fit(MODEL, jax.random.key(0), three_blobs[:, 0])
    with pytest.raises(ValueError, match=r"\(n_samples, n_features\); got shape \(1, 120, 2\)"):
        lem.fit(MODEL, jax.random.key(0), three_blobs[None])
    params = lem.fit(MODEL, jax.random.key(0), three_blobs).params
    for function in (lem.predict, lem.predict_proba, lem.score_samples):
        with pytest.raises(ValueError, match=r"x has 3 features but the parameters have 2"):
            function(MODEL, params, np.ones((5, 3)))


def test_bad_arguments_name_the_argument_and_value(three_blobs):
    params = MODEL.init(jax.random.key(0), three_blobs, jnp.ones(len(three_blobs)))
    cases = [
        (lambda: lem.gaussian_mixture(0), "n_components must be an integer >= 1; got 0"),
        (lambda: lem.gaussian_mixture(2.5), "n_components"),
        (lambda: lem.gaussian_mixture(2, "banana"), "covariance_type must be one of .*'banana'"),
        (lambda: lem.gaussian_mixture(2, init="kmeans"), "init must be one of .*'kmeans'"),
        (lambda: lem.gaussian_mixture(2, reg_covar=-1e-3), r"reg_covar must be non-negative; got -0.001"),
        (lambda: lem.gaussian_mixture(2, reg_covar_mode="scaled"), "reg_covar_mode"),
        (
            lambda: lem.fit(MODEL, jax.random.key(0), three_blobs, tol=-1.0),
            "tol must be non-negative; got -1.0",
        ),
        (
            lambda: lem.fit(MODEL, jax.random.key(0), three_blobs, max_iter=-5),
            "max_iter must be an integer >= 0; got -5",
        ),
        (
            lambda: lem.fit(MODEL, jax.random.key(0), three_blobs, n_init=0),
            "n_init must be an integer >= 1; got 0",
        ),
        (lambda: lem.fit(lem.gaussian_mixture(200), jax.random.key(0), three_blobs), "n_components=200"),
        (lambda: lem.fit(MODEL, 0, three_blobs), r"key must be one PRNG key, .*got 0 \(int\)"),
        (
            lambda: lem.fit(MODEL, jax.random.split(jax.random.key(0), 3), three_blobs),
            r"key must be one PRNG key, .*got an array of shape \(3,\).*lem.fit_batch or jax.vmap",
        ),
        (lambda: lem.fit(MODEL, np.array([1, 2]), three_blobs), r"shape \(2,\) and dtype int"),
        (lambda: lem.check_model(MODEL, 7, three_blobs), r"key must be one PRNG key, .*got 7"),
        (lambda: lem.select_n_components(7, three_blobs, [1, 2]), r"key must be one PRNG key, .*got 7"),
        (
            lambda: lem.fit(MODEL, jax.random.key(0), three_blobs, weights=np.r_[1.0, 1.0, np.zeros(118)]),
            "2 sample\\(s\\) with positive weight but the model has 3 components",
        ),
        (
            lambda: lem.fit(MODEL, jax.random.key(0), three_blobs, callback=[print]),
            "callback must be a function callback\\(iteration, objective\\) or None; got \\[",
        ),
        (
            lambda: lem.fit_em(MODEL, params, three_blobs, callback="tqdm"),
            "callback must be a function .*got 'tqdm'",
        ),
        (
            lambda: lem.fit_gradient(MODEL, params, three_blobs, optax.adam(0.1), callback=1),
            "callback must be a function .*got 1",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # A size traced under jit cannot shape the program: say to make it static.
    with pytest.raises(ValueError, match="max_iter must be a Python int, known when the program is compiled"):
        jax.jit(lambda max_iter: lem.fit(MODEL, jax.random.key(0), three_blobs, max_iter=max_iter))(5)
    # A concrete JAX integer is as good as a Python one.
    with pytest.warns(lem.ConvergenceWarning, match="max_iter=3"):
        assert lem.fit(MODEL, jax.random.key(0), three_blobs, max_iter=jnp.int32(3), tol=1e-30).n_iter == 3


def test_every_kind_of_key_fits_the_same(three_blobs):
    """A typed key, the raw uint32[2] key of the same seed, and a raw key traced under
    jax.vmap give the same fit."""
    typed = jax.random.key(5)
    raw = jax.random.key_data(typed)
    assert raw.dtype == np.uint32 and raw.shape == (2,)
    fits = [lem.fit(MODEL, key, three_blobs) for key in (typed, raw)]
    batched = jax.vmap(lambda key: lem.fit(MODEL, key, three_blobs))(raw[None])
    fits.append(jax.tree_util.tree_map(lambda a: a[0], batched))
    for fit in fits[1:]:
        assert_trees_all_close(fit.params, fits[0].params, rtol=1e-5, atol=1e-6)


def test_complex_data_are_refused_not_cast_to_their_real_part(three_blobs):
    """A cast to float would drop the imaginary parts silently (NumPy only warns)."""
    complex_x = three_blobs + 1j * np.ones_like(three_blobs)
    params = lem.fit(MODEL, jax.random.key(0), three_blobs).params
    calls = {
        "fit": lambda x: lem.fit(MODEL, jax.random.key(0), x),
        "fit, JAX array": lambda x: lem.fit(MODEL, jax.random.key(0), jnp.asarray(x)),
        "predict": lambda x: lem.predict(MODEL, params, x),
        "score": lambda x: lem.score(MODEL, params, x),
        "fit_batch": lambda x: lem.fit_batch(MODEL, jax.random.key(0), x[None]),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"x must hold real numbers; got dtype complex.*x\.real"):
            call(complex_x)
    # stack_datasets names the dataset; weights are checked the same way.
    with pytest.raises(ValueError, match=r"datasets\[1\] must hold real numbers"):
        lem.stack_datasets([three_blobs, complex_x])
    with pytest.raises(ValueError, match="weights must hold real numbers"):
        lem.fit(MODEL, jax.random.key(0), three_blobs, weights=np.ones(120, complex))
    with pytest.raises(ValueError, match="weights must hold real numbers"):
        lem.fit_batch(MODEL, jax.random.key(0), three_blobs[None], weights=np.ones((1, 120), complex))


ANOTHER_MODELS_PARAMETERS = {  # model, the model whose parameters are passed, data, message
    "components": (
        lem.gaussian_mixture(3),
        lem.gaussian_mixture(2),
        "x",
        r"params.means has shape \(2, 2\), but ",
    ),
    "diag": (lem.gaussian_mixture(3, "diag"), lem.gaussian_mixture(3), "x", r"type='diag'.* needs \(3, 2\)"),
    "tied": (lem.gaussian_mixture(3, "tied"), lem.gaussian_mixture(3, "spherical"), "x", r"needs \(2, 2\)"),
    "hard_em": (lem.hard_em(lem.gaussian_mixture(3)), lem.gaussian_mixture(2), "x", r"gaussian_mixture\(3, "),
    "kmeans": (lem.kmeans(3), lem.kmeans(2), "x", r"params.centres has shape \(2, 2\), but kmeans\(3\)"),
    "poisson": (
        lem.poisson_mixture(3),
        lem.poisson_mixture(2),
        "counts",
        r"poisson_mixture\(3\) with 2 features",
    ),
    "bernoulli": (lem.bernoulli_mixture(3), lem.bernoulli_mixture(2), "binary", "bernoulli_mixture"),
    "categories": (
        lem.categorical_mixture(2, 3),
        lem.categorical_mixture(2, 4),
        "codes",
        r"needs \(2, 2, 3\)",
    ),
    "ppca": (lem.ppca(2), lem.ppca(1), "wider", r"params.components has shape \(1, 3\), but ppca\(2\)"),
    "fa": (
        lem.factor_analysis(1),
        lem.ppca(1),
        "wider",
        r"params.noise_variance has shape \(\), .* needs \(3,\)",
    ),
}


@pytest.mark.parametrize("case", ANOTHER_MODELS_PARAMETERS)
def test_parameters_of_another_model_are_refused(case, three_blobs):
    """Parameters of another number of components, covariance type or number of
    categories are a ValueError in every function that takes them. Before, a Gaussian
    mixture of 2 components sampling with 3 components' parameters returned the third
    mean without noise, and k-means scored with its own number of clusters in the
    constant and sampled labels from it."""
    model, other, data_name, message = ANOTHER_MODELS_PARAMETERS[case]
    x = jnp.asarray(three_blobs)
    data = {
        "x": x,
        "counts": jnp.round(jnp.abs(x)),
        "binary": (x > 0).astype(x.dtype),
        "codes": jnp.asarray(np.random.default_rng(0).integers(0, 3, (120, 2)), x.dtype),
        "wider": jnp.concatenate([x, 2 * x[:, :1] + 1], axis=1),
    }[data_name]
    key = jax.random.key(0)
    weights = jnp.ones(data.shape[0], data.dtype)
    params = jax.jit(other.init)(key, data, weights)  # one program, not many small eager ones
    calls = [
        functools.partial(lem.fit_em, model, params, data),
        functools.partial(lem.em_step, model, params, data),
        functools.partial(lem.score, model, params, data),
        functools.partial(lem.bic, model, params, data),
        functools.partial(model.sample, key, params, 5),
    ]
    if model.log_joint is not None:
        calls.append(functools.partial(lem.predict, model, params, data))
    for call in calls:
        with pytest.raises(ValueError, match=message + ".*pass parameters of this model"):
            call()
    # The model's own parameters pass (traced only: the shapes are all that is checked).
    own = jax.eval_shape(model.init, key, data, weights)
    assert isinstance(model.n_parameters(own), int)
    assert jax.eval_shape(functools.partial(model.sample, n_samples=5), key, own)[0].shape == (
        5,
        data.shape[1],
    )
    assert jax.eval_shape(functools.partial(lem.fit_em, model), own, data).params == own


WRONG_KINDS_OF_PARAMS = {
    "jax.random.key": lambda: jax.random.key(0),
    "jax.random.PRNGKey": lambda: jax.random.PRNGKey(0),
    "a tuple": lambda: (jnp.ones(3), jnp.ones((3, 2))),
    "a dict": lambda: {"means": jnp.ones((3, 2))},
}


@pytest.mark.parametrize("kind", WRONG_KINDS_OF_PARAMS)
def test_a_key_or_a_foreign_pytree_as_params_is_a_value_error(kind, three_blobs):
    """fit_em(model, key, x), the order of lem.fit, was an AttributeError deep inside the
    model ('DynamicJaxprTracer has no attribute means'); now every function that takes
    parameters of a built-in model says what to pass instead."""
    params = WRONG_KINDS_OF_PARAMS[kind]()
    is_key = kind.startswith("jax.random")
    x = jnp.asarray(three_blobs)
    counts = jnp.round(jnp.abs(x))
    for model, data in [
        (MODEL, x),
        (lem.kmeans(3), x),
        (lem.ppca(1), x),
        (lem.factor_analysis(1), x),
        (lem.poisson_mixture(3), counts),
        (lem.bernoulli_mixture(3), (x > 0).astype(x.dtype)),
        (lem.categorical_mixture(3, 3), jnp.clip(counts, 0, 2)),
        (lem.hard_em(MODEL), x),
    ]:
        calls = {
            "em_step": lambda model=model, data=data: lem.em_step(model, params, data),
            "score": lambda model=model, data=data: lem.score(model, params, data),
            "sample": lambda model=model: model.sample(jax.random.key(1), params, 5),
        }
        if model.to_unconstrained is not None:
            calls["fit_gradient"] = lambda model=model, data=data: lem.fit_gradient(
                model, params, data, optax.adam(0.1), num_steps=2
            )
        calls["fit_em"] = lambda model=model, data=data: lem.fit_em(model, params, data, max_iter=2)
        for name, call in calls.items():
            if is_key and name in ("fit_em", "fit_gradient"):
                message = (
                    f"{name} starts from parameters, but params is a PRNG key.*lem.fit\\(model, key, x\\)"
                )
            else:
                got = "a PRNG key" if is_key else f"a {type(params).__name__}"
                message = f"params must be parameters of .*; got {got}.*Pass parameters of this model"
                message += ".*lem.fit\\(model, key, x\\)" if is_key else ""
            with pytest.raises(ValueError, match=message):
                call()
    # An object that has the fields is judged on its shapes, as parameters of another model are.
    fields = MODEL.init(jax.random.key(0), x, jnp.ones(x.shape[0], x.dtype))._asdict()
    with pytest.raises(ValueError, match="needs"):
        lem.score(lem.gaussian_mixture(2), type("Fields", (), fields)(), x)


def test_bad_weights_raise(three_blobs):
    cases = [
        (np.zeros(120), "all zero"),
        (-np.ones(120), "non-negative"),
        (np.ones(119), r"shape \(n_samples,\) = \(120,\)"),
        (np.ones((120, 1)), r"shape \(n_samples,\) = \(120,\)"),
        (np.r_[np.nan, np.ones(119)], "finite"),
    ]
    for weights, message in cases:
        with pytest.raises(ValueError, match=message):
            lem.fit(MODEL, jax.random.key(0), three_blobs, weights=weights)


def test_inputs_are_not_mutated(three_blobs):
    x = three_blobs.copy()
    weights = np.ones(x.shape[0])
    result = lem.fit(MODEL, jax.random.key(0), x, weights=weights)
    lem.predict(MODEL, result.params, x)
    np.testing.assert_array_equal(x, three_blobs)
    np.testing.assert_array_equal(weights, np.ones(x.shape[0]))


# ---------------------------------------------------------------------------
# Degenerate data
# ---------------------------------------------------------------------------


def test_one_component_is_the_closed_form_gaussian(covariance_type, dtype, three_blobs):
    model = lem.gaussian_mixture(1, covariance_type, reg_covar=1e-6, reg_covar_mode="absolute")
    x = jnp.asarray(three_blobs, dtype)
    result = lem.fit(model, jax.random.key(0), x, tol=1e-10)
    assert int(result.status) == lem.Status.CONVERGED and int(result.n_iter) <= 2
    covariance = np.cov(three_blobs.T, bias=True) + 1e-6 * np.eye(2)
    expected = {
        "full": covariance[None],
        "tied": covariance,
        "diag": np.diag(covariance)[None],
        "spherical": np.diag(covariance).mean()[None],
    }[covariance_type]
    rtol = tolerance(dtype, 1e-10, 1e-5)
    np.testing.assert_allclose(result.params.means, three_blobs.mean(0)[None], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(result.params.covariances, expected, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(result.params.weights, [1.0], rtol=rtol)


def test_duplicated_points_fewer_distinct_than_components(covariance_type, dtype):
    """Three distinct points repeated, five components: finite with reg_covar > 0 and an
    EMPTY_COMPONENT status; with reg_covar = 0 a singular covariance is NONFINITE."""
    x = jnp.asarray(np.repeat([[0.0, 0.0], [3.0, 1.0], [1.0, 4.0]], 10, axis=0), dtype)
    model = lem.gaussian_mixture(5, covariance_type)
    with pytest.warns(lem.ConvergenceWarning):
        result = lem.fit(model, jax.random.key(0), x, n_init=2)
    assert bool(lem._base.tree_all_finite(result.params)) and np.isfinite(float(result.log_likelihood))
    assert int(result.status) in (lem.Status.EMPTY_COMPONENT, lem.Status.CONVERGED)
    if covariance_type in ("full", "diag", "spherical"):
        # Each distinct point can hold at most one component; two must be empty.
        assert int(result.status) == lem.Status.EMPTY_COMPONENT
    unregularised = lem.gaussian_mixture(3, covariance_type, reg_covar=0.0)
    with pytest.warns(lem.ConvergenceWarning, match="NONFINITE"):
        singular = lem.fit(unregularised, jax.random.key(0), x)
    assert int(singular.status) == lem.Status.NONFINITE and not bool(singular.converged)


def test_constant_feature(covariance_type, dtype, three_blobs):
    x = jnp.asarray(np.c_[three_blobs, np.full(120, 7.0)], dtype)
    model = lem.gaussian_mixture(3, covariance_type)
    result = lem.fit(model, jax.random.key(0), x)
    assert bool(lem._base.tree_all_finite(result.params)) and np.isfinite(float(result.log_likelihood))
    assert int(result.status) == lem.Status.CONVERGED
    unregularised = lem.gaussian_mixture(3, covariance_type, reg_covar=0.0)
    if covariance_type == "spherical":  # one variance shared with the other features: not singular
        assert int(lem.fit(unregularised, jax.random.key(0), x).status) == lem.Status.CONVERGED
        return
    with pytest.warns(lem.ConvergenceWarning, match="NONFINITE"):
        singular = lem.fit(unregularised, jax.random.key(0), x)
    assert int(singular.status) == lem.Status.NONFINITE


@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_scaling_the_data_scales_the_fit(scale, dtype, three_blobs):
    x = jnp.asarray(three_blobs, dtype)
    scaled = jnp.asarray(three_blobs * scale, dtype)
    # The same number of iterations for both (tol = 0), so that they differ only by the
    # rounding of the scaled inputs, not by where a tolerance happened to stop them.
    base = lem.fit(MODEL, jax.random.key(1), x, tol=0.0, max_iter=200)
    fit = lem.fit(MODEL, jax.random.key(1), scaled, tol=0.0, max_iter=200)
    rtol = tolerance(dtype, 1e-6, 1e-4)
    np.testing.assert_allclose(fit.params.weights, base.params.weights, rtol=rtol)
    np.testing.assert_allclose(np.asarray(fit.params.means) / scale, base.params.means, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(
        np.asarray(fit.params.covariances, np.float64) / scale**2,
        base.params.covariances,
        rtol=rtol,
        atol=rtol,
    )
    shift = -x.shape[1] * np.log(scale)
    np.testing.assert_allclose(float(fit.log_likelihood), float(base.log_likelihood) + shift, rtol=1e-6)


def test_float32_offset_data_matches_float64(three_blobs):
    """float32 data at an offset of 1e4: the fit agrees with a float64 reference."""
    offset = three_blobs + 1e4
    x32 = jnp.asarray(offset, jnp.float32)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")
    result = lem.fit(model, jax.random.key(0), x32, tol=1e-7, max_iter=500)
    assert result.params.means.dtype == jnp.float32
    # The float64 reference: scikit-learn from latentem's solution, on the same float32 values
    # (weights renormalised in float64: scikit-learn wants their sum to be 1 within 1e-8).
    weights = np.asarray(result.params.weights, np.float64)
    reference = GaussianMixture(
        3,
        weights_init=weights / weights.sum(),
        means_init=np.asarray(result.params.means, np.float64),
        precisions_init=np.linalg.inv(np.asarray(result.params.covariances, np.float64)),
        tol=1e-12,
        max_iter=500,
        reg_covar=1e-6,
    ).fit(np.asarray(x32, np.float64))
    np.testing.assert_allclose(
        float(result.log_likelihood), reference.score(np.asarray(x32, np.float64)), rtol=1e-4
    )
    np.testing.assert_allclose(result.params.means, reference.means_, rtol=1e-6, atol=2e-3)


def test_component_that_loses_its_samples(dtype, three_blobs):
    x = jnp.asarray(three_blobs, dtype)
    params = MODEL.init(jax.random.key(0), x, ones(x))
    far = params.means.at[2].set(jnp.asarray([1e4, 1e4], dtype))
    params = lem.GaussianMixtureParams(params.weights, far, params.covariances)
    result = compiled_fit_em(MODEL)(params, x)
    assert int(result.status) == lem.Status.EMPTY_COMPONENT
    assert bool(lem._base.tree_all_finite(result.params)) and np.isfinite(float(result.log_likelihood))
    assert float(result.params.weights[2]) < 1e-6
    # Its mean and covariance were kept: finite, not moved to the origin.
    np.testing.assert_array_equal(result.params.means[2], far[2])
    with pytest.warns(lem.ConvergenceWarning, match="EMPTY_COMPONENT"):
        lem._em.warn_on_status(result.status, 100)


def test_imbalanced_clusters_small_one_found(dtype):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((10_000, 2)), 30.0 + rng.standard_normal((10, 2))])
    model = lem.gaussian_mixture(2, "full")
    result = lem.fit(model, jax.random.key(0), jnp.asarray(x, dtype), n_init=5)
    small = int(np.argmin(np.asarray(result.params.weights)))
    np.testing.assert_allclose(float(result.params.weights[small]), 10 / 10_010, rtol=1e-4)
    np.testing.assert_allclose(result.params.means[small], x[10_000:].mean(0), rtol=1e-4)


# ---------------------------------------------------------------------------
# Faults in the loop
# ---------------------------------------------------------------------------


class CountingParams(NamedTuple):
    mixture: lem.GaussianMixtureParams
    step: jax.Array


def broken_at_third_m_step():
    """A custom model whose M-step returns NaN parameters at its third call."""

    def init(key, x, weights):
        return CountingParams(MODEL.init(key, x, weights), jnp.zeros((), jnp.int32))

    def log_joint(params, x):
        return MODEL.log_joint(params.mixture, x)

    def m_step(x, posterior, params):
        mixture = MODEL.m_step(x, posterior, params.mixture)
        poison = jnp.where(params.step == 2, jnp.nan, 0.0).astype(mixture.means.dtype)
        return CountingParams(mixture._replace(means=mixture.means + poison), params.step + 1)

    return lem.LatentModel(init=init, log_joint=log_joint, m_step=m_step)


def test_nan_from_m_step_at_iteration_three(dtype, three_blobs):
    model = broken_at_third_m_step()
    x = jnp.asarray(three_blobs, dtype)
    params = model.init(jax.random.key(0), x, ones(x))
    result = jax.jit(functools.partial(lem.fit_em, model, max_iter=20))(params, x, tol=0.0)
    assert int(result.status) == lem.Status.NONFINITE and not bool(result.converged)
    assert int(result.n_iter) == 3
    two_steps = compiled_fit_em(MODEL, 2)(params.mixture, x, tol=0.0)
    assert_trees_equal(result.params.mixture, two_steps.params)
    assert int(result.params.step) == 2
    assert float(result.log_likelihood) == float(two_steps.log_likelihood)
    assert np.isnan(result.history[2]) and np.all(np.isfinite(result.history[:2]))


def test_max_iter_reached_and_zero_iterations(dtype, three_blobs):
    x = jnp.asarray(three_blobs, dtype)
    params = MODEL.init(jax.random.key(0), x, ones(x))
    result = compiled_fit_em(MODEL, 3)(params, x, tol=0.0)
    assert (
        int(result.status) == lem.Status.MAX_ITER and not bool(result.converged) and int(result.n_iter) == 3
    )
    with pytest.warns(lem.ConvergenceWarning, match="max_iter=3"):  # a tol never met
        lem.fit(MODEL, jax.random.key(0), x, max_iter=3, tol=1e-30)
    untouched = compiled_fit_em(MODEL, 0)(params, x)
    assert_trees_equal(untouched.params, params)
    assert int(untouched.n_iter) == 0 and untouched.history.shape == (0,)
    np.testing.assert_allclose(float(untouched.log_likelihood), float(lem.score(MODEL, params, x)), rtol=1e-6)


def test_degenerate_dataset_in_a_batch_changes_only_its_own_status(dtype):
    """NaN, identical points and fewer distinct points than components, one at a time,
    inside a batch of fits: every other member is bitwise what it is without it."""
    clean = np.stack([blobs(seed, n_per_cluster=20) for seed in range(3)])  # (3, 60, 2)
    degenerate = {
        "nan": np.where(np.arange(60)[:, None] == 5, np.nan, clean[0]),
        "identical": np.ones((60, 2)),
        "two distinct points": np.repeat([[0.0, 0.0], [5.0, 5.0]], 30, axis=0),
    }
    keys = jax.random.split(jax.random.key(0), 4)
    batched = jax.jit(jax.vmap(functools.partial(lem.fit, MODEL, n_init=2)))
    without = batched(keys[np.array([0, 1, 3])], jnp.asarray(clean, dtype))
    for name, data in degenerate.items():
        xs = jnp.asarray(np.stack([clean[0], clean[1], data, clean[2]]), dtype)
        result = batched(keys, xs)
        others = jax.tree_util.tree_map(lambda leaf: leaf[np.array([0, 1, 3])], result)
        assert_trees_equal(others, without)
        status = int(result.status[2])
        expected = lem.Status.NONFINITE if name == "nan" else lem.Status.EMPTY_COMPONENT
        assert status == expected, (name, status)
        assert not (name == "nan" and bool(result.converged[2]))


# ---------------------------------------------------------------------------
# Determinism, resumption, invariances
# ---------------------------------------------------------------------------


def test_same_key_same_result_and_restarts_differ(dtype, three_blobs):
    x = jnp.asarray(three_blobs, dtype)
    first = lem.fit(MODEL, jax.random.key(3), x, n_init=3)
    second = lem.fit(MODEL, jax.random.key(3), x, n_init=3)
    assert_trees_equal(first, second)
    keys = jax.random.split(jax.random.key(3), 3)
    inits = [np.asarray(MODEL.init(k, x, ones(x)).means) for k in keys]
    assert not np.array_equal(inits[0], inits[1]) and not np.array_equal(inits[1], inits[2])


def test_resuming_equals_one_longer_fit(dtype, three_blobs):
    x = jnp.asarray(three_blobs, dtype)
    params = MODEL.init(jax.random.key(0), x, ones(x))
    both = compiled_fit_em(MODEL, 7)(params, x, tol=0.0)
    first = compiled_fit_em(MODEL, 3)(params, x, tol=0.0)
    resumed = compiled_fit_em(MODEL, 4)(first.params, x, tol=0.0)
    assert_trees_equal(resumed.params, both.params)
    np.testing.assert_array_equal(np.concatenate([first.history, resumed.history]), both.history)


def test_translation_shifts_means_by_exactly_the_offset(covariance_type, dtype, three_blobs):
    model = lem.gaussian_mixture(3, covariance_type)
    offset = np.array([250.0, -40.0])
    base = lem.fit(model, jax.random.key(2), jnp.asarray(three_blobs, dtype), tol=1e-9, max_iter=300)
    moved = lem.fit(
        model, jax.random.key(2), jnp.asarray(three_blobs + offset, dtype), tol=1e-9, max_iter=300
    )
    # Exact up to the rounding of the shifted data themselves.
    atol = tolerance(dtype, 1e-9, 5e-4)
    np.testing.assert_allclose(np.asarray(moved.params.means) - offset, base.params.means, atol=atol)
    np.testing.assert_allclose(moved.params.covariances, base.params.covariances, rtol=atol * 10, atol=atol)
    np.testing.assert_allclose(moved.params.weights, base.params.weights, atol=atol)


# ---------------------------------------------------------------------------
# Near-singular covariances against SciPy in float64 (property-based)
# ---------------------------------------------------------------------------


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    log_condition=st.floats(0.0, 6.0),
    n_features=st.integers(1, 5),
)
def test_near_singular_covariances_match_scipy(seed, log_condition, n_features):
    dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((n_features, n_features)))
    eigenvalues = np.logspace(0, -log_condition, n_features) * rng.uniform(0.5, 2.0)
    covariance = (rotation * eigenvalues) @ rotation.T
    covariance = 0.5 * (covariance + covariance.T)
    mean = rng.standard_normal(n_features)
    # Points at typical distances in the metric of the covariance.
    x = mean + rng.standard_normal((20, n_features)) @ np.linalg.cholesky(covariance).T
    cast = np.asarray(covariance, dtype).astype(np.float64)  # what the model actually sees
    expected = stats.multivariate_normal(np.asarray(mean, dtype), cast, allow_singular=False).logpdf(
        np.asarray(x, dtype).astype(np.float64)
    )
    params = lem.GaussianMixtureParams(
        jnp.ones(1, dtype), jnp.asarray(mean[None], dtype), jnp.asarray(covariance[None], dtype)
    )
    ours = np.asarray(lem.gaussian_mixture(1).log_joint(params, jnp.asarray(x, dtype))[:, 0], np.float64)
    # Error bound: round-off times the condition number, in units of the log-density's size.
    condition = 10.0**log_condition
    atol = 50 * np.finfo(dtype).eps * condition * (1 + np.abs(expected))
    error = np.abs(ours - np.atleast_1d(expected))
    assert np.all(error <= atol), (error.max(), condition)
