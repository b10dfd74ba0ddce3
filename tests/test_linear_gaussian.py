"""Probabilistic PCA and factor analysis: scikit-learn and closed-form references, EM
monotonicity, weights, vmap, recovery from their own samples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.decomposition import PCA, FactorAnalysis

import latentem as lem
from latentem.models import _linalg
from tests.helpers import assert_trees_all_close, is_x64

N_SAMPLES, N_FEATURES, N_COMPONENTS = 400, 6, 2
MAX_ITER = 3000
PPCA = lem.ppca(N_COMPONENTS)
FACTOR_ANALYSIS = lem.factor_analysis(N_COMPONENTS)
MODELS = {"ppca": PPCA, "factor_analysis": FACTOR_ANALYSIS}
CONSTRUCTORS = {"ppca": lem.ppca, "factor_analysis": lem.factor_analysis}


@pytest.fixture(params=["substitution", "solve"])
def fresh_model(request, monkeypatch):
    """``fresh_model(name)``: a new model (so that nothing compiled is reused) whose
    latent precision is inverted by XLA's forward substitution (as on a CPU) or by a
    triangular solve (as on a GPU)."""
    if request.param == "solve":
        monkeypatch.setattr(_linalg, "SUBSTITUTION_BACKENDS", ())
    return lambda name: CONSTRUCTORS[name](N_COMPONENTS)


@pytest.fixture(scope="module")
def data():
    """Draws from a factor-analysis model with an offset, float64 NumPy, and integer weights."""
    rng = np.random.default_rng(0)
    loadings = rng.normal(size=(N_COMPONENTS, N_FEATURES)) * np.array([[2.0], [1.0]])
    noise = rng.uniform(0.5, 1.5, N_FEATURES)
    x = rng.normal(size=(N_SAMPLES, N_COMPONENTS)) @ loadings
    x = x + rng.normal(size=(N_SAMPLES, N_FEATURES)) * np.sqrt(noise) + 10.0
    return x, rng.integers(1, 4, N_SAMPLES).astype(np.float64)


def dtype_of_run():
    return np.float64 if is_x64() else np.float32


@functools.lru_cache
def compiled_fit_em(model):
    return jax.jit(functools.partial(lem.fit_em, model, max_iter=MAX_ITER))


@pytest.fixture(scope="module", params=list(MODELS))
def fitted(request, data):
    """A converged unweighted fit from a random start, shared by several tests."""
    model = MODELS[request.param]
    x = jnp.asarray(data[0], dtype_of_run())
    start = model.init(jax.random.key(1), x, jnp.ones(N_SAMPLES, x.dtype))
    tol = 1e-11 if x.dtype == np.float64 else 1e-6
    return request.param, model, compiled_fit_em(model)(start, x, tol=tol)


def projector(components):
    """Orthogonal projector onto the row space of ``components`` (n_components, n_features)."""
    components = np.asarray(components, np.float64)
    return components.T @ np.linalg.solve(components @ components.T, components)


def test_converged_fit_matches_scikit_learn(fitted, data, dtype):
    name, _, result = fitted
    x = data[0].astype(dtype).astype(np.float64)
    assert int(result.status) == lem.Status.CONVERGED
    if name == "ppca":
        reference = PCA(N_COMPONENTS).fit(x)
        # PCA's variances use n - 1; the maximum-likelihood ones n: a difference of order d / n^2.
        tolerance = 1e-4 if dtype == np.float64 else 1e-3
        np.testing.assert_allclose(float(result.log_likelihood), reference.score(x), atol=tolerance)
        np.testing.assert_allclose(
            projector(result.params.components),
            projector(reference.components_),
            atol=1e-6 if dtype == np.float64 else 1e-3,
        )
        eigenvalues = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1]
        np.testing.assert_allclose(
            float(result.params.noise_variance),
            eigenvalues[N_COMPONENTS:].mean(),
            rtol=1e-6 if dtype == np.float64 else 1e-3,
        )
    else:
        reference = FactorAnalysis(N_COMPONENTS, tol=1e-10, max_iter=10000).fit(x)
        np.testing.assert_allclose(float(result.log_likelihood), reference.score(x), atol=1e-3)
        covariance = np.asarray(result.params.components, np.float64).T @ np.asarray(result.params.components)
        covariance += np.diag(np.asarray(result.params.noise_variance, np.float64))
        np.testing.assert_allclose(covariance, reference.get_covariance(), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(result.params.mean), x.mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_constant_feature_gets_a_small_positive_noise_variance(name, data, dtype):
    """A constant column (a dummy feature, say): the fit converges, the constant feature
    gets a noise variance of eps times the mean variance of the others and no loading,
    and the other features fit as without it. Factor analysis ended NONFINITE here (a
    noise floor of zero for a feature of zero variance)."""
    x = data[0].astype(dtype)
    with_constant = np.insert(x, 2, 7.0, axis=1)
    model = lem.factor_analysis(N_COMPONENTS) if name == "factor_analysis" else lem.ppca(N_COMPONENTS)
    tol = 1e-11 if dtype == np.float64 else 1e-6
    result = lem.fit(model, jax.random.key(1), with_constant, max_iter=MAX_ITER, tol=tol)
    assert int(result.status) == lem.Status.CONVERGED
    mean, components, noise = (np.asarray(leaf, np.float64) for leaf in result.params)
    noise = np.broadcast_to(noise, mean.shape)
    assert mean[2] == pytest.approx(7.0, rel=1e-6)
    if name == "factor_analysis":
        eps = np.finfo(dtype).eps
        floor = eps * np.var(x.astype(np.float64), axis=0).mean()
        assert noise[2] == pytest.approx(floor, rel=1e-3)
        assert np.max(np.abs(components[:, 2])) <= 1e-3 * np.max(np.abs(components))
        # The other features: scikit-learn's fit without the constant column.
        varying = np.delete(np.arange(x.shape[1] + 1), 2)
        covariance = components.T @ components + np.diag(noise)
        reference = FactorAnalysis(N_COMPONENTS, tol=1e-10, max_iter=10000).fit(x.astype(np.float64))
        np.testing.assert_allclose(
            covariance[np.ix_(varying, varying)], reference.get_covariance(), rtol=1e-2, atol=1e-2
        )
        # Each sample's log density gains exactly that of x_c = mu_c under N(mu_c, psi_c).
        constant_term = -0.5 * np.log(2 * np.pi * noise[2])
        np.testing.assert_allclose(
            float(result.log_likelihood) - constant_term, reference.score(x.astype(np.float64)), atol=2e-3
        )
    else:  # one noise variance for all: the constant feature lowers it, and the fit is finite
        assert np.isfinite(float(result.log_likelihood))


def test_em_never_lowers_the_log_likelihood(fitted):
    _, _, result = fitted
    n_iter = int(result.n_iter)
    history = np.asarray(result.history[:n_iter], np.float64)
    assert n_iter >= 5 and np.all(np.isfinite(history))
    assert np.all(np.diff(history) >= -1e-6 * np.abs(history[1:]))


def reference_posterior(params, x):
    """E[z | x] = W C^-1 (x - mu) and log N(x | mu, C), C = W^T W + Psi, from the full covariance."""
    mean, components, noise = (np.asarray(leaf, np.float64) for leaf in params)
    covariance = components.T @ components + np.diag(np.broadcast_to(noise, mean.shape))
    means = np.linalg.solve(covariance, (x - mean).T).T @ components.T
    return means, stats.multivariate_normal(mean, covariance).logpdf(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_posterior_matches_the_full_covariance_formulas(name, data, dtype, fresh_model):
    model = fresh_model(name)
    x = jnp.asarray(data[0], dtype)
    params = model.init(jax.random.key(2), x, jnp.ones(N_SAMPLES, dtype))
    posterior, log_likelihood = lem.e_step(model, params, x)
    expected_means, expected_log_likelihood = reference_posterior(params, np.asarray(x, np.float64))
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(np.asarray(posterior.means), expected_means, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(np.asarray(log_likelihood), expected_log_likelihood, rtol=rtol)
    np.testing.assert_array_equal(np.asarray(posterior.weights), np.ones(N_SAMPLES))


def reference_m_step(name, params, x, weights):
    """Tipping & Bishop's (PPCA) and Rubin & Thayer's (FA) updates with the weighted covariance."""
    _, components, noise = (np.asarray(leaf, np.float64) for leaf in params)
    n_components, n_features = components.shape
    mean = weights @ x / weights.sum()
    scatter = (x - mean).T @ ((x - mean) * weights[:, None]) / weights.sum()
    loadings = components.T  # (d, q), the papers' W
    if name == "ppca":
        inner = loadings.T @ loadings + noise * np.eye(n_components)
        new = (
            scatter
            @ loadings
            @ np.linalg.inv(
                noise * np.eye(n_components) + np.linalg.solve(inner, loadings.T) @ scatter @ loadings
            )
        )
        new_noise = np.trace(scatter - scatter @ loadings @ np.linalg.solve(inner, new.T)) / n_features
    else:
        beta = loadings.T @ np.linalg.inv(np.diag(noise) + loadings @ loadings.T)  # (q, d)
        new = (
            scatter @ beta.T @ np.linalg.inv(np.eye(n_components) - beta @ loadings + beta @ scatter @ beta.T)
        )
        new_noise = np.diag(scatter - new @ beta @ scatter)
    return mean, new.T, new_noise


@pytest.mark.parametrize("name", list(MODELS))
def test_m_step_matches_the_published_updates(name, data, dtype, fresh_model):
    model = fresh_model(name)
    x, weights = data
    x_, w_ = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    params = model.init(jax.random.key(3), x_, w_)  # its mean is the weighted mean, as the papers assume
    stepped, _ = lem.em_step(model, params, x_, w_)
    expected = reference_m_step(name, params, np.asarray(x_, np.float64), weights)
    rtol = 1e-8 if dtype == np.float64 else 2e-3
    assert_trees_all_close(tuple(stepped), expected, rtol=rtol, atol=rtol)


def test_zero_weight_is_removal_and_integer_weight_is_repetition(fitted, data, dtype):
    _, model, _ = fitted
    x = data[0]
    weights = np.ones(N_SAMPLES)
    weights[:3] = (3, 0, 0)
    copied = x.copy()
    copied[1:3] = x[0]
    x, copied = jnp.asarray(x, dtype), jnp.asarray(copied, dtype)
    start = model.init(jax.random.key(4), x, jnp.ones(N_SAMPLES, dtype))
    fit = compiled_fit_em(model)
    with_weights = fit(start, x, weights=jnp.asarray(weights, dtype), tol=1e-4)
    with_copies = fit(start, copied, weights=jnp.ones(N_SAMPLES, dtype), tol=1e-4)
    assert int(with_weights.n_iter) == int(with_copies.n_iter)
    tolerance = 1e-8 if dtype == np.float64 else 1e-3
    assert_trees_all_close(with_weights.params, with_copies.params, rtol=tolerance, atol=tolerance)
    # A zero-weight row so far out that its square overflows is removed all the same,
    # from the initialisation on (0 * inf would be NaN).
    far = x.at[1].set(float(np.finfo(dtype).max) ** 0.75)
    weights = jnp.asarray(weights, dtype)
    far_start = model.init(jax.random.key(5), far, weights)
    assert_trees_all_close(far_start, model.init(jax.random.key(5), x, weights), rtol=1e-12, atol=0)
    with_far = fit(far_start, far, weights=weights, tol=1e-4)
    assert int(with_far.status) == lem.Status.CONVERGED
    assert_trees_all_close(
        with_far.params, fit(far_start, x, weights=weights, tol=1e-4).params, rtol=1e-12, atol=0
    )


def test_vmap_over_datasets_equals_a_loop(fitted, data, dtype):
    _, model, _ = fitted
    xs = jnp.asarray(np.stack([data[0], data[0][::-1] * 0.5]), dtype)
    keys = jax.random.split(jax.random.key(5), 2)
    fit = functools.partial(lem.fit, model, max_iter=50, tol=1e-4)
    batched = jax.vmap(fit)(keys, xs)
    for index in range(2):
        member = jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], batched)
        tolerance = 1e-8 if dtype == np.float64 else 1e-4
        assert_trees_all_close(member, fit(keys[index], xs[index]), rtol=tolerance, atol=tolerance)


def test_recovers_the_covariance_it_sampled_from(fitted, dtype):
    _, model, result = fitted
    truth = result.params
    x, z = model.sample(jax.random.key(6), truth, N_SAMPLES)
    assert x.shape == (N_SAMPLES, N_FEATURES) and z.shape == (N_SAMPLES, N_COMPONENTS) and x.dtype == dtype
    start = model.init(jax.random.key(7), x, jnp.ones(N_SAMPLES, dtype))
    refit = compiled_fit_em(model)(start, x, tol=1e-6)

    def covariance(params):
        components = np.asarray(params.components, np.float64)
        noise = np.broadcast_to(np.asarray(params.noise_variance, np.float64), (N_FEATURES,))
        return components.T @ components + np.diag(noise)

    true_covariance, fitted_covariance = covariance(truth), covariance(refit.params)
    # KL(true || fitted) between the zero-mean Gaussians: about n_parameters / (2 n) = 0.02
    # for the maximum-likelihood fit to 400 draws; a wrong sampler or M-step gives O(1).
    kl = 0.5 * (
        np.trace(np.linalg.solve(fitted_covariance, true_covariance))
        - N_FEATURES
        + np.linalg.slogdet(fitted_covariance)[1]
        - np.linalg.slogdet(true_covariance)[1]
    )
    assert 0 <= kl < 0.1, kl
    # The mean within 5 standard errors, feature by feature.
    standard_error = np.sqrt(np.diag(true_covariance) / N_SAMPLES)
    np.testing.assert_allclose(
        np.asarray(refit.params.mean), np.asarray(truth.mean), atol=5 * standard_error.max()
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_check_model_passes(name, data, dtype):
    report = lem.check_model(MODELS[name], jax.random.key(8), data[0].astype(dtype), n_samples=N_SAMPLES)
    assert report.passed, str(report)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="smaller than n_features"):
        PPCA.init(jax.random.key(0), jnp.zeros((10, 2)), jnp.ones(10))
    with pytest.raises(ValueError, match="n_components"):
        lem.factor_analysis(0)
    with pytest.raises(ValueError, match="finite-state"):
        lem.predict(PPCA, None, jnp.zeros((3, 3)))
    assert lem.ppca(2) is PPCA
    params = lem.PPCAParams(jnp.zeros(6), jnp.zeros((2, 6)), jnp.ones(()))
    assert PPCA.n_parameters(params) == 6 + 6 * 2 - 1 + 1
    params = lem.FactorAnalysisParams(jnp.zeros(6), jnp.zeros((2, 6)), jnp.ones(6))
    assert FACTOR_ANALYSIS.n_parameters(params) == 6 + 6 * 2 - 1 + 6


@pytest.mark.parametrize("name", list(MODELS))
def test_accurate_where_the_noise_is_small_against_the_spread(name, dtype):
    """Old Faithful: feature variances 1.3 and 185, the noise 0.24 along the minor axis.
    As differences (Woodbury's x'Psi^-1 x - b'M^-1 b, the M-step's x'x - W~A'), the
    log-density and the noise variance lost float32 digits to cancellation: per-sample
    log-densities 2.4e-4 off, and EM's objective fell in 12 of 117 iterations."""
    model = {"ppca": lem.ppca, "factor_analysis": lem.factor_analysis}[name](1)
    x64 = np.asarray(lem.datasets.load_faithful(), np.float64)
    x = jnp.asarray(x64, dtype)
    # The maximum-likelihood PPCA (also FA's start here): sigma^2 the minor eigenvalue.
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x64.T, bias=True))
    noise = np.full(2, eigenvalues[0]) if name == "factor_analysis" else eigenvalues[0]
    components = np.sqrt(eigenvalues[1] - eigenvalues[0]) * eigenvectors[:, 1:].T
    params = type(model.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype)))(
        jnp.asarray(x64.mean(axis=0), dtype), jnp.asarray(components, dtype), jnp.asarray(noise, dtype)
    )
    _, log_likelihood = lem.e_step(model, params, x)
    _, expected = reference_posterior(params, x64)
    atol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(np.asarray(log_likelihood, np.float64), expected, rtol=0, atol=atol)
    # One M-step from loadings turned off the principal axis, against the published update.
    turned = params._replace(components=jnp.asarray(components @ np.array([[0.9, -0.3], [0.3, 0.9]]), dtype))
    stepped, _ = lem.em_step(model, turned, x)
    expected_step = reference_m_step(name, turned, x64, np.ones(x64.shape[0]))
    rtol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(np.asarray(stepped.noise_variance, np.float64), expected_step[2], rtol=rtol)
    # EM never lowers the objective (up to its round-off). Its rate is slow here: PPCA took
    # 770 to 1210 iterations to tol=1e-6 over four keys, in jax 0.10.2 and jax 0.4.30
    # (whose random streams differ); 1000 was too few for key 0 in jax 0.4.30.
    result = lem.fit(model, jax.random.key(0), x, tol=1e-6, max_iter=5000)
    history = np.asarray(result.history[: int(result.n_iter)], np.float64)
    assert int(result.status) == lem.Status.CONVERGED
    assert np.all(np.diff(history) >= -1e-6 * np.abs(history[1:]))
