"""The Gaussian mixture against scikit-learn, NumPy and SciPy references."""

import functools
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.mixture import GaussianMixture
from sklearn.mixture._gaussian_mixture import (
    _compute_precision_cholesky,
    _estimate_gaussian_parameters,
)

import latentem as lem
from latentem.models._seeding import kmeans_plusplus
from tests.helpers import assert_trees_all_close, blobs, random_covariances

N_COMPONENTS = 3
N_FEATURES = 3


def reference_params(covariance_type, seed=0):
    """Random float64 parameters (NumPy) of the given covariance type."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(N_COMPONENTS) * 3)
    means = rng.standard_normal((N_COMPONENTS, N_FEATURES)) * 3
    covariances = random_covariances(rng, covariance_type, N_COMPONENTS, N_FEATURES)
    return weights, means, covariances


def sklearn_model(covariance_type, weights, means, covariances):
    """A scikit-learn GaussianMixture with its fitted attributes set by hand."""
    gm = GaussianMixture(N_COMPONENTS, covariance_type=covariance_type)
    gm.weights_, gm.means_, gm.covariances_ = weights, means, covariances
    gm.precisions_cholesky_ = _compute_precision_cholesky(covariances, covariance_type)
    return gm


def to_params(weights, means, covariances, dtype):
    return lem.GaussianMixtureParams(
        jnp.asarray(weights, dtype), jnp.asarray(means, dtype), jnp.asarray(covariances, dtype)
    )


def rtol_for(dtype, float64_rtol=1e-6, float32_rtol=2e-4):
    return float64_rtol if dtype == np.float64 else float32_rtol


# ---------------------------------------------------------------------------
# E-step and M-step at fixed inputs
# ---------------------------------------------------------------------------


@pytest.fixture(params=["fused", "gemm", "gemm_folded"])
def product_path(request, monkeypatch):
    """Products over features run as fused multiply-sums for few features and as GEMMs
    for many (with many features, the full E-step's GEMM also subtracts the projected
    means: "gemm_folded"); all must match the references. (Direct, eager calls of
    log_joint and m_step trace afresh, so the setting is in force.)"""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    monkeypatch.setattr(module, "_ELEMENTWISE_MAX_FEATURES", N_FEATURES if request.param == "fused" else 0)
    monkeypatch.setattr(module, "_FOLDED_MEANS_MIN_FEATURES", 0 if request.param == "gemm_folded" else 1000)
    return request.param


def test_log_joint_and_score_samples_match_sklearn(covariance_type, dtype, product_path):
    weights, means, covariances = reference_params(covariance_type)
    x = np.random.default_rng(1).standard_normal((200, N_FEATURES)) * 3
    gm = sklearn_model(covariance_type, weights, means, covariances)
    model = lem.gaussian_mixture(N_COMPONENTS, covariance_type)
    params = to_params(weights, means, covariances, dtype)

    log_joint = model.log_joint(params, jnp.asarray(x, dtype))
    assert log_joint.dtype == dtype
    rtol = rtol_for(dtype)
    np.testing.assert_allclose(log_joint, gm._estimate_weighted_log_prob(x), rtol=rtol, atol=0)
    np.testing.assert_allclose(
        lem.score_samples(model, params, jnp.asarray(x, dtype)), gm.score_samples(x), rtol=rtol
    )
    np.testing.assert_allclose(
        lem.predict_proba(model, params, jnp.asarray(x, dtype)), gm.predict_proba(x), rtol=0, atol=10 * rtol
    )
    np.testing.assert_array_equal(lem.predict(model, params, jnp.asarray(x, dtype)), gm.predict(x))


def test_log_density_matches_scipy_brute_force(covariance_type, dtype):
    """Bayes' rule computed directly with SciPy's multivariate normal."""
    weights, means, covariances = reference_params(covariance_type, seed=3)
    x = np.random.default_rng(4).standard_normal((50, N_FEATURES)) * 2
    full = {
        "full": covariances,
        "tied": np.broadcast_to(covariances, (N_COMPONENTS, N_FEATURES, N_FEATURES)),
        "diag": np.stack([np.diag(c) for c in covariances]) if covariance_type == "diag" else None,
        "spherical": np.stack([c * np.eye(N_FEATURES) for c in np.atleast_1d(covariances)])
        if covariance_type == "spherical"
        else None,
    }[covariance_type]
    expected = np.stack(
        [
            np.log(weights[k]) + stats.multivariate_normal(means[k], full[k]).logpdf(x)
            for k in range(N_COMPONENTS)
        ],
        axis=1,
    )
    model = lem.gaussian_mixture(N_COMPONENTS, covariance_type)
    params = to_params(weights, means, covariances, dtype)
    responsibilities, log_likelihood = lem.e_step(model, params, jnp.asarray(x, dtype))
    rtol = rtol_for(dtype, 1e-10, 2e-5)
    np.testing.assert_allclose(log_likelihood, np.logaddexp.reduce(expected, axis=1), rtol=rtol)
    expected_responsibilities = np.exp(expected - np.logaddexp.reduce(expected, axis=1)[:, None])
    np.testing.assert_allclose(responsibilities, expected_responsibilities, rtol=0, atol=10 * rtol)


def test_m_step_matches_sklearn(covariance_type, dtype, product_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((150, N_FEATURES)) * 2 + 1
    responsibilities = rng.dirichlet(np.ones(N_COMPONENTS), size=150)
    reg_covar = 1e-3
    nk, means, covariances = _estimate_gaussian_parameters(x, responsibilities, reg_covar, covariance_type)
    model = lem.gaussian_mixture(
        N_COMPONENTS, covariance_type, reg_covar=reg_covar, reg_covar_mode="absolute"
    )
    start = to_params(*reference_params(covariance_type), dtype)
    params = model.m_step(jnp.asarray(x, dtype), jnp.asarray(responsibilities, dtype), start)
    rtol = rtol_for(dtype, 1e-10, 1e-5)
    assert_trees_all_close(
        params, lem.GaussianMixtureParams(nk / nk.sum(), means, covariances), rtol=rtol, atol=rtol
    )


def test_relative_regularisation_scales_with_feature_variance(dtype):
    """reg_covar_mode="relative" adds reg_covar times each feature's (weighted) variance."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 2)) * np.array([1e-3, 1e3])
    responsibilities = rng.dirichlet(np.ones(2), size=100)
    reg_covar = 0.1
    _, _, unregularised = _estimate_gaussian_parameters(x, responsibilities, 0.0, "diag")
    model = lem.gaussian_mixture(2, "diag", reg_covar=reg_covar)
    start = to_params(np.full(2, 0.5), np.zeros((2, 2)), np.ones((2, 2)), dtype)
    params = model.m_step(jnp.asarray(x, dtype), jnp.asarray(responsibilities, dtype), start)
    expected = unregularised + reg_covar * x.var(axis=0)[None, :]
    np.testing.assert_allclose(params.covariances, expected, rtol=rtol_for(dtype, 1e-10, 1e-5))


def test_covariance_type_identities_after_one_m_step(dtype):
    """tied = weighted mean of full, diag = diagonal of full, spherical = mean of diag."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((120, 4)), dtype)
    responsibilities = jnp.asarray(rng.dirichlet(np.ones(3), size=120), dtype)
    steps = {}
    for covariance_type in ("full", "tied", "diag", "spherical"):
        model = lem.gaussian_mixture(3, covariance_type, reg_covar=0.0)
        start = model.init(jax.random.key(0), x, jnp.ones(120, dtype))
        steps[covariance_type] = model.m_step(x, responsibilities, start)
    full = np.asarray(steps["full"].covariances, np.float64)
    weights = np.asarray(steps["full"].weights, np.float64)
    rtol = rtol_for(dtype, 1e-12, 1e-5)
    np.testing.assert_allclose(
        steps["tied"].covariances, np.einsum("k,kij->ij", weights, full), rtol=rtol, atol=rtol
    )
    np.testing.assert_allclose(steps["diag"].covariances, np.diagonal(full, axis1=1, axis2=2), rtol=rtol)
    np.testing.assert_allclose(
        steps["spherical"].covariances, np.asarray(steps["diag"].covariances).mean(1), rtol=rtol
    )


# ---------------------------------------------------------------------------
# Full fits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob_data():
    return blobs(0, n_per_cluster=80, centres=((0, 0, 0), (4, 0, 0), (0, 4, 1)))


@functools.lru_cache
def jitted_fit_em(model, max_iter):
    return jax.jit(functools.partial(lem.fit_em, model, max_iter=max_iter))


def test_full_fit_from_same_init_matches_sklearn(covariance_type, dtype, blob_data):
    x = blob_data
    weights, means, covariances = reference_params(covariance_type, seed=7)
    means = x[[0, 1, 2]]  # a start inside the data
    precisions = np.linalg.inv(covariances) if covariance_type in ("full", "tied") else 1 / covariances
    max_iter = 40
    gm = GaussianMixture(
        N_COMPONENTS,
        covariance_type=covariance_type,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions,
        max_iter=max_iter,
        tol=0.0,
        reg_covar=1e-6,
    )
    with pytest.warns(Warning):  # scikit-learn's ConvergenceWarning at tol=0
        gm.fit(x)
    model = lem.gaussian_mixture(N_COMPONENTS, covariance_type, reg_covar=1e-6, reg_covar_mode="absolute")
    result = jitted_fit_em(model, max_iter)(
        to_params(weights, means, covariances, dtype), jnp.asarray(x, dtype), tol=0.0
    )
    assert int(result.n_iter) == max_iter == gm.n_iter_
    assert int(result.status) == lem.Status.MAX_ITER
    np.testing.assert_allclose(float(result.log_likelihood), gm.score(x), rtol=rtol_for(dtype, 1e-6, 1e-5))
    # scikit-learn's lower bounds are the objective before each M-step: ours, shifted.
    np.testing.assert_allclose(result.history[:-1], gm.lower_bounds_[1:], rtol=rtol_for(dtype, 1e-6, 1e-5))
    assert_trees_all_close(
        result.params,
        lem.GaussianMixtureParams(gm.weights_, gm.means_, gm.covariances_),
        rtol=rtol_for(dtype, 1e-5, 2e-2),
        atol=rtol_for(dtype, 1e-8, 1e-3),
    )


def test_log_likelihood_never_decreases(covariance_type, dtype, blob_data):
    """EM's invariant (with reg_covar=0 the M-step is the exact maximiser)."""
    x = jnp.asarray(blob_data, dtype)
    model = lem.gaussian_mixture(4, covariance_type, reg_covar=0.0, init="random")
    params = model.init(jax.random.key(3), x, jnp.ones(x.shape[0], dtype))
    result = jitted_fit_em(model, 60)(params, x, tol=0.0)
    history = np.asarray(result.history[: int(result.n_iter)], np.float64)
    assert np.all(np.isfinite(history))
    # Round-off of a mean over 240 samples: a few ulps of the objective.
    slack = 64 * np.finfo(dtype).eps * np.abs(history).max()
    assert np.all(np.diff(history) >= -slack), np.diff(history).min()
    assert history[-1] > history[0]


def test_fit_recovers_sampled_parameters(covariance_type, dtype):
    model = lem.gaussian_mixture(3, covariance_type)
    weights, means, covariances = reference_params(covariance_type, seed=11)
    means = means * 3  # well separated
    truth = to_params(weights, means, covariances, dtype)
    x, z = model.sample(jax.random.key(0), truth, 6000)
    assert x.shape == (6000, N_FEATURES) and x.dtype == dtype and z.dtype == jnp.int32
    # Samples come in random order, not sorted by component.
    assert len(np.unique(np.asarray(z[:20]))) > 1
    np.testing.assert_allclose(np.bincount(np.asarray(z), minlength=3) / 6000, weights, atol=0.02)
    result = lem.fit(model, jax.random.key(1), x, n_init=3)
    assert int(result.status) == lem.Status.CONVERGED
    order = np.argsort(np.asarray(result.params.means)[:, 0])
    truth_order = np.argsort(means[:, 0])
    np.testing.assert_allclose(np.asarray(result.params.weights)[order], weights[truth_order], atol=0.02)
    np.testing.assert_allclose(np.asarray(result.params.means)[order], means[truth_order], atol=0.15)
    covariances_fit = np.asarray(result.params.covariances)
    if covariance_type != "tied":
        covariances_fit, covariances = covariances_fit[order], covariances[truth_order]
    np.testing.assert_allclose(covariances_fit, covariances, atol=0.25)


def test_bic_aic_match_sklearn(covariance_type, dtype, blob_data):
    x = blob_data
    gm = GaussianMixture(N_COMPONENTS, covariance_type=covariance_type, random_state=0).fit(x)
    model = lem.gaussian_mixture(N_COMPONENTS, covariance_type)
    params = to_params(gm.weights_, gm.means_, gm.covariances_, dtype)
    rtol = rtol_for(dtype, 1e-9, 1e-5)
    np.testing.assert_allclose(float(lem.bic(model, params, jnp.asarray(x, dtype))), gm.bic(x), rtol=rtol)
    np.testing.assert_allclose(float(lem.aic(model, params, jnp.asarray(x, dtype))), gm.aic(x), rtol=rtol)
    assert model.n_parameters(params) == gm._n_parameters()


def test_parameter_counts():
    params = {
        "full": lem.GaussianMixtureParams(jnp.ones(2), jnp.ones((2, 5)), jnp.ones((2, 5, 5))),
        "tied": lem.GaussianMixtureParams(jnp.ones(2), jnp.ones((2, 5)), jnp.ones((5, 5))),
        "diag": lem.GaussianMixtureParams(jnp.ones(2), jnp.ones((2, 5)), jnp.ones((2, 5))),
        "spherical": lem.GaussianMixtureParams(jnp.ones(2), jnp.ones((2, 5)), jnp.ones(2)),
    }
    counts = {key: lem.gaussian_mixture(2, key).n_parameters(value) for key, value in params.items()}
    assert counts == {"spherical": 13, "diag": 21, "tied": 26, "full": 41}


# ---------------------------------------------------------------------------
# Initialisation, factory, memory
# ---------------------------------------------------------------------------


def test_kmeans_plusplus_seeds_are_distinct_weighted_data_points(dtype):
    x = jnp.asarray(blobs(1, n_per_cluster=30), dtype)
    weights = jnp.ones(90, dtype).at[:45].set(0)
    for seed in range(5):
        centres = np.asarray(kmeans_plusplus(jax.random.key(seed), x, 3, weights))
        index = [int(np.flatnonzero((np.asarray(x) == c).all(1))[0]) for c in centres]
        assert len(set(index)) == 3
        assert all(i >= 45 for i in index), "a zero-weight sample was chosen as a centre"
    # One seed per well-separated cluster, whatever the key.
    labels = np.asarray(
        lem.predict(lem.gaussian_mixture(3), lem.fit(lem.gaussian_mixture(3), jax.random.key(0), x).params, x)
    )
    assert len(np.unique(labels)) == 3


def test_kmeans_plusplus_ignores_a_zero_weight_row_whose_distance_overflows(dtype):
    """Zero weight is removal, also for a row so far out that its squared distance is
    infinite: 0 * inf was NaN in the seeding's masses, which then drew a useless centre
    (a fit ended EMPTY_COMPONENT with the two-component log-likelihood)."""
    x = blobs(1, n_per_cluster=30)
    far = np.concatenate([x, np.full((1, 2), np.finfo(dtype).max ** 0.75)]).astype(dtype)
    weights = np.concatenate([np.ones(90), [0.0]]).astype(dtype)
    for seed in range(3):
        centres = kmeans_plusplus(jax.random.key(seed), jnp.asarray(far), 3, jnp.asarray(weights))
        np.testing.assert_array_equal(
            centres, kmeans_plusplus(jax.random.key(seed), jnp.asarray(x, dtype), 3, jnp.ones(90, dtype))
        )
    model = lem.gaussian_mixture(3)
    removed, zero_weight = (
        lem.fit(model, jax.random.key(0), x.astype(dtype)),
        lem.fit(model, jax.random.key(0), far, weights=weights),
    )
    assert int(removed.status) == int(zero_weight.status) == lem.Status.CONVERGED
    np.testing.assert_allclose(
        float(zero_weight.log_likelihood),
        float(removed.log_likelihood),
        rtol=1e-12 if dtype == np.float64 else 1e-5,
    )


@pytest.mark.parametrize("init", ["kmeans++", "random_from_data", "random"])
def test_every_init_gives_valid_params_and_a_good_fit(init, dtype):
    x = jnp.asarray(blobs(2, n_per_cluster=60), dtype)
    model = lem.gaussian_mixture(3, "full", init=init)
    params = model.init(jax.random.key(4), x, jnp.ones(180, dtype))
    assert np.allclose(float(params.weights.sum()), 1.0, rtol=1e-5)
    assert np.all(np.linalg.eigvalsh(np.asarray(params.covariances, np.float64)) > 0)
    # A tight tol: "random" starts near the symmetric point, where progress is slow at first.
    result = lem.fit(model, jax.random.key(5), x, n_init=4, tol=1e-6, max_iter=300)
    x64 = np.asarray(x, np.float64)
    reference = GaussianMixture(3, random_state=0, n_init=4).fit(x64).score(x64)
    np.testing.assert_allclose(float(result.log_likelihood), reference, rtol=1e-4)


def test_factory_is_memoised_and_validates():
    assert lem.gaussian_mixture(3) is lem.gaussian_mixture(3, "full")
    assert lem.gaussian_mixture(3) is not lem.gaussian_mixture(3, "diag")
    with pytest.raises(ValueError, match="n_components"):
        lem.gaussian_mixture(0)
    with pytest.raises(ValueError, match="covariance_type"):
        lem.gaussian_mixture(2, "banana")
    with pytest.raises(ValueError, match="reg_covar"):
        lem.gaussian_mixture(2, reg_covar=-1.0)
    with pytest.raises(ValueError, match="init"):
        lem.gaussian_mixture(2, init="kmeans")


def _all_avals(jaxpr):
    """Every abstract value in a jaxpr and its sub-jaxprs (while bodies, pjit, ...)."""
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        current = getattr(current, "jaxpr", current)
        for variable in list(current.invars) + list(current.constvars):
            yield variable.aval
        for equation in current.eqns:
            for variable in equation.outvars:
                yield variable.aval
            for value in equation.params.values():
                values = value if isinstance(value, (list, tuple)) else [value]
                for item in values:
                    if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
                        stack.append(item)


def test_no_samples_by_components_by_features_squared_array():
    n, k, d = 50, 3, 4
    model = lem.gaussian_mixture(k, "full")
    jaxpr = jax.make_jaxpr(lambda key, x: lem.fit(model, key, x, n_init=2))(
        jax.random.key(0), jnp.ones((n, d))
    )
    sizes = [int(np.prod(aval.shape)) for aval in _all_avals(jaxpr) if hasattr(aval, "shape")]
    assert max(sizes) >= 2 * n * k  # the walk sees the restarts' responsibilities inside the loop
    assert max(sizes) < n * k * d * d, max(sizes)


def test_rank_deficient_component_far_from_centre_stays_positive_definite(dtype):
    """Six points in 32 dimensions, far from the rest: their covariance has rank 5, and
    only the regulariser keeps it definite. Rounding must not break that in float32."""
    rng = np.random.default_rng(8)
    bulk = rng.standard_normal((2000, 32))
    outliers = 8.0 * rng.standard_normal(32) / np.sqrt(32) * 4 + 0.3 * rng.standard_normal((6, 32))
    x = jnp.asarray(np.concatenate([bulk, outliers]), dtype)
    labels = np.r_[np.zeros(2000, int), np.ones(6, int)]
    responsibilities = jax.nn.one_hot(jnp.asarray(labels), 2, dtype=dtype)
    model = lem.gaussian_mixture(2, "full")
    start = model.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))
    params = model.m_step(x, responsibilities, start)
    eigenvalues = np.linalg.eigvalsh(np.asarray(params.covariances[1], np.float64))
    assert eigenvalues.min() > 0
    assert np.all(np.isfinite(np.asarray(model.log_joint(params, x))))
    # The regulariser (1e-6 x variance) plus the round-off floor: nothing larger was added.
    variance = np.asarray(x, np.float64).var(axis=0).mean()
    assert eigenvalues.min() < 1e-6 * variance + 64 * np.finfo(dtype).eps * eigenvalues.sum()


def test_chunked_computation_equals_unchunked(covariance_type, dtype, product_path, monkeypatch):
    """Large inputs are processed a block of samples at a time; the results must not change.
    A tiny chunk budget forces many chunks, including a shifted last one; both product
    paths (fused and GEMM) are chunked differently, so both are checked."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((1003, 3)) * 2, dtype)
    model = lem.gaussian_mixture(4, covariance_type)
    params = model.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))

    def run():  # a fresh trace each time, so the chunk budget in force is the one used
        return jax.jit(lambda p, x: (lem.e_step(model, p, x), lem.em_step(model, p, x)))(params, x)

    (responsibilities, log_likelihood), (stepped, objective) = run()
    monkeypatch.setitem(module._CHUNK_ELEMENTS, jax.default_backend(), 64)
    assert module._chunk_size(x.shape[0], 12) < x.shape[0]  # the budget does force chunks
    (chunked_responsibilities, chunked_log_likelihood), (chunked_stepped, chunked_objective) = run()
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(chunked_log_likelihood, log_likelihood, rtol=rtol)
    np.testing.assert_allclose(chunked_responsibilities, responsibilities, rtol=0, atol=rtol)
    np.testing.assert_allclose(float(chunked_objective), float(objective), rtol=rtol)
    assert_trees_all_close(chunked_stepped, stepped, rtol=rtol * 10, atol=rtol)


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_large_m_step_scatter_by_entries_matches_sklearn(covariance_type, dtype, monkeypatch):
    """On a CPU, data of 5 to 8 features and at least 2^20 values n k d form the scatter
    one reduction per entry, over blocks of features-first samples (with a shifted last
    block); the M-step must equal scikit-learn's and the GEMM path's."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    n_samples, n_components, n_features = 33_000, 4, 8
    rng = np.random.default_rng(21)
    x = rng.standard_normal((n_samples, n_features)) @ rng.standard_normal((n_features, n_features))
    x = x + 50.0  # away from the origin: the deviations are taken about a reference
    responsibilities = rng.dirichlet(np.ones(n_components), n_samples)
    model = lem.gaussian_mixture(n_components, covariance_type, reg_covar=1e-6, reg_covar_mode="absolute")
    xj, rj = jnp.asarray(x, dtype), jnp.asarray(responsibilities, dtype)
    start = model.init(jax.random.key(0), xj, jnp.ones(n_samples, dtype))
    assert module._chunk_size(n_samples, n_components * n_features) < n_samples
    if jax.default_backend() == "cpu":
        assert module._scatter_by_entries_applies(n_samples, n_components, n_features)
        assert not module._scatter_by_entries_applies(1000, n_components, n_features)

    def m_step():  # a fresh function each time: jax.jit's trace cache would reuse the first path
        return jax.jit(lambda x, r, p: model.m_step(x, r, p))

    entries_program = m_step().lower(xj, rj, start).as_text()
    by_entries = m_step()(xj, rj, start)
    monkeypatch.setattr(module, "_SCATTER_BY_ENTRIES_MAX_FEATURES", {})
    gemm_program = m_step().lower(xj, rj, start).as_text()
    by_gemm = m_step()(xj, rj, start)
    if jax.default_backend() == "cpu":
        assert gemm_program.count("dot_general") > entries_program.count("dot_general")
    _, means, covariances = _estimate_gaussian_parameters(x, responsibilities, 1e-6, covariance_type)
    rtol = rtol_for(dtype, 1e-10, 2e-4)
    np.testing.assert_allclose(by_entries.means, means, rtol=rtol)
    np.testing.assert_allclose(
        by_entries.covariances, covariances, rtol=rtol, atol=rtol * np.abs(covariances).max()
    )
    assert_trees_all_close(by_entries, by_gemm, rtol=rtol, atol=rtol * float(np.abs(covariances).max()))


@pytest.mark.parametrize("n_features", [1, 2, 3, 4, 5, 6, 8, 33])
def test_precision_cholesky_matches_sklearn(n_features, dtype):
    """Written-out factors up to four features; above, LAPACK's Cholesky factor inverted
    by forward substitution in XLA on a CPU (a LAPACK solve elsewhere): all equal
    scikit-learn's."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    rng = np.random.default_rng(n_features)
    factors = rng.standard_normal((7, n_features, n_features))
    covariances = factors @ np.swapaxes(factors, 1, 2) + 0.5 * np.eye(n_features)
    full = module.precision_cholesky(jnp.asarray(covariances, dtype), "full")
    tied = module.precision_cholesky(jnp.asarray(covariances[0], dtype), "tied")
    rtol = rtol_for(dtype, 1e-12, 1e-4)
    np.testing.assert_allclose(full, _compute_precision_cholesky(covariances, "full"), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(
        tied, _compute_precision_cholesky(covariances[0], "tied"), rtol=rtol, atol=rtol
    )
    indefinite = np.eye(n_features)
    indefinite[-1, -1] = -1.0
    assert np.isnan(np.asarray(module.precision_cholesky(jnp.asarray(indefinite, dtype)[None], "full"))).any()


# ---------------------------------------------------------------------------
# Expanded moments (moments="expanded"; what moments="auto" uses for large fits on a GPU)
# ---------------------------------------------------------------------------


def expanded_case(
    separation, seed, n_samples=3000, n_features=6, n_components=3, offset=50.0, start_at_truth=False
):
    """Clusters ``separation`` standard deviations apart (about), away from the origin,
    with uneven sample weights (some zero), and a start from random rows and the data's
    covariance (or from the true parameters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, separation / np.sqrt(2 * n_features), (n_components, n_features))
    mixing = rng.standard_normal((n_features, n_features)) / np.sqrt(n_features) + np.eye(n_features)
    labels = rng.integers(0, n_components, n_samples)
    x = centres[labels] + rng.standard_normal((n_samples, n_features)) @ mixing + offset
    weights = rng.uniform(0.5, 2.0, n_samples) * (rng.uniform(size=n_samples) > 0.05)
    start = (
        np.full(n_components, 1 / n_components),
        x[rng.choice(n_samples, n_components, replace=False)],
        np.broadcast_to(np.cov(x.T), (n_components, n_features, n_features)).copy(),
    )
    if start_at_truth:
        covariance = mixing.T @ mixing
        start = (start[0], centres + offset, np.broadcast_to(covariance, start[2].shape).copy())
    return x, weights, start


def numpy_em_iteration(x, weights, start, reg_covar):
    """One weighted EM iteration in float64 with SciPy densities: (params, sum w log p)."""
    mixing_weights, means, covariances = start
    log_joint = np.stack(
        [
            np.log(mixing_weights[k]) + stats.multivariate_normal(means[k], covariances[k]).logpdf(x)
            for k in range(len(mixing_weights))
        ],
        axis=1,
    )
    log_p = np.logaddexp.reduce(log_joint, axis=1)
    r = weights[:, None] * np.exp(log_joint - log_p[:, None])
    counts = r.sum(0)
    new_means = r.T @ x / counts[:, None]
    new_covariances = np.stack(
        [
            (r[:, k, None] * (x - new_means[k])).T @ (x - new_means[k]) / counts[k]
            + reg_covar * np.eye(x.shape[1])
            for k in range(len(counts))
        ]
    )
    return (counts / counts.sum(), new_means, new_covariances), np.sum(weights * log_p)


def expanded_cancellation(x, weights, params):
    module = importlib.import_module("latentem.models.gaussian_mixture")
    xw = jnp.asarray(weights, params.means.dtype)
    reference = (xw @ jnp.asarray(x, params.means.dtype)) / xw.sum()
    factor = module.precision_cholesky(params.covariances, "full")
    return float(module._expanded_cancellation(params, reference, factor))


def expanded_accurate(x, weights, params):
    module = importlib.import_module("latentem.models.gaussian_mixture")
    xw = jnp.asarray(weights, params.means.dtype)
    reference = (xw @ jnp.asarray(x, params.means.dtype)) / xw.sum()
    return bool(
        module._expanded_accurate(params, reference, module.precision_cholesky(params.covariances, "full"))
    )


def test_expanded_iteration_matches_numpy(dtype):
    """One iteration with moments="expanded" (the guard passes on these data) equals a
    float64 NumPy/SciPy iteration: to 1e-10 in float64, and in float32 to 2e-5 of the
    largest entry (the centred iteration's own float32 error is about 1e-6 here)."""
    x, weights, start = expanded_case(separation=8, seed=0)
    module = importlib.import_module("latentem.models.gaussian_mixture")
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments="expanded")
    params = to_params(*start, dtype)
    assert module._expanded_applies(x.shape[0], 3, x.shape[1], always=True)
    assert expanded_accurate(x, weights, params)
    iteration = jax.jit(model.fused_step)(params, jnp.asarray(x, dtype), jnp.asarray(weights, dtype))
    assert_iteration_matches(iteration, numpy_em_iteration(x, weights, start, 1e-6), weights, dtype)


def assert_iteration_matches(iteration, reference_iteration, weights, dtype):
    """A fused step's ``(new_params, sum w log p, state_mass)`` against a float64 NumPy
    iteration's ``((weights, means, covariances), sum w log p)``: each within 1e-10
    (float64) or 2e-5 (float32) of the reference's largest entry."""
    new_params, log_likelihood, state_mass = iteration
    (weights_ref, means_ref, covariances_ref), log_likelihood_ref = reference_iteration
    rtol = rtol_for(dtype, 1e-10, 2e-5)
    for value, reference in (
        (new_params.weights, weights_ref),
        (new_params.means, means_ref),
        (new_params.covariances, covariances_ref),
        (state_mass / weights.sum(), weights_ref),
    ):
        error = np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.max(np.abs(reference))
        assert error <= rtol, f"relative error {error:.2g} > {rtol:.0g}"
    assert abs(float(log_likelihood) - log_likelihood_ref) <= rtol * abs(log_likelihood_ref)


def twenty_iterations_against_numpy(model, x, weights, start, reference, dtype, label):
    """``lem.fit_em`` of 20 iterations from ``start``; asserts each parameter is within
    1e-9 (float64) or 1e-4 (float32) of ``reference``, 20 float64 NumPy/SciPy
    iterations (EM amplifies float32 rounding over iterations). Returns the fit."""
    fit = lem.fit_em(
        model,
        to_params(*start, dtype),
        jnp.asarray(x, dtype),
        weights=jnp.asarray(weights, dtype),
        max_iter=20,
        tol=0.0,
    )
    assert fit.status == lem.Status.MAX_ITER
    for value, expected in zip(fit.params, reference, strict=True):
        error = np.max(np.abs(np.asarray(value, np.float64) - expected)) / np.max(np.abs(expected))
        assert error <= rtol_for(dtype, 1e-9, 1e-4), f"{label}: relative error {error:.2g}"
    return fit


def test_expanded_fit_equals_centred_fit(dtype):
    """Twenty iterations of each from the same start against twenty float64 NumPy/SciPy
    iterations: within 1e-9 in float64 (and equal to each other to 1e-10), within 1e-4
    in float32 (EM amplifies rounding over iterations)."""
    x, weights, start = expanded_case(separation=8, seed=1)
    reference = start
    for _ in range(20):
        reference, _ = numpy_em_iteration(x, weights, reference, 1e-6)
    fits = {}
    for moments in ("expanded", "centred"):
        model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments=moments)
        fits[moments] = twenty_iterations_against_numpy(model, x, weights, start, reference, dtype, moments)
    if dtype == np.float64:
        scale = float(np.abs(fits["centred"].params.covariances).max())
        assert_trees_all_close(
            fits["expanded"].params, fits["centred"].params, rtol=1e-10, atol=1e-10 * scale
        )


def test_expanded_moments_by_blocks_of_samples_equal_one_product(dtype, monkeypatch):
    """The blocked moments (the GPU's form, here forced on this backend with a block
    that does not divide n_samples, so that padding rows of weight zero are added) give
    the same 20 iterations as one product, and both are within the float64 NumPy/SciPy
    iterations' tolerance of test_expanded_fit_equals_centred_fit."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    x, weights, start = expanded_case(separation=8, seed=1)
    block = 97
    assert x.shape[0] % block != 0
    reference = start
    for _ in range(20):
        reference, _ = numpy_em_iteration(x, weights, reference, 1e-6)
    fits = {}
    for blocks in (False, True):
        monkeypatch.setattr(
            module, "_EXPANDED_BLOCK_SAMPLES", {jax.default_backend(): block} if blocks else {}
        )
        data = module._expanded_data(jnp.asarray(x, dtype), jnp.asarray(weights, dtype))
        expected_rows = -(-x.shape[0] // block) * block if blocks else x.shape[0]
        assert data.features.shape[0] == data.weights.shape[0] == expected_rows
        assert np.all(np.asarray(data.weights[x.shape[0] :]) == 0)
        model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments="expanded")
        fits[blocks] = twenty_iterations_against_numpy(
            model, x, weights, start, reference, dtype, f"blocks={blocks}"
        )
    scale = float(np.abs(fits[False].params.covariances).max())
    assert_trees_all_close(
        fits[True].params,
        fits[False].params,
        rtol=rtol_for(dtype, 1e-12, 1e-5),
        atol=rtol_for(dtype, 1e-12, 1e-5) * scale,
    )
    assert abs(float(fits[True].log_likelihood) - float(fits[False].log_likelihood)) <= rtol_for(
        dtype, 1e-12, 1e-5
    ) * abs(float(fits[False].log_likelihood))


def test_fit_forms_the_products_of_features_once_outside_the_loop(dtype):
    """fit_em evaluates the model's fused_prepare before its while loop: the (n, F)
    products of features are made outside the loop's body (XLA on a GPU did not hoist
    them when they were formed inside), and the loop body holds no op that makes them."""
    x, _, start = expanded_case(separation=8, seed=1)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments="expanded")
    n_products = (x.shape[1] + 1) * (x.shape[1] + 2) // 2
    jaxpr = jax.make_jaxpr(functools.partial(lem.fit_em, model, max_iter=5, tol=0.0))(
        to_params(*start, dtype), jnp.asarray(x, dtype)
    ).jaxpr

    def inner_jaxprs(equation):
        for value in equation.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(item, "eqns"):
                    yield item
                elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                    yield item.jaxpr

    def makes_features(equations):
        """Whether any equation, or one nested in it (conditionals, calls), outputs an
        (n, F) array."""
        return any(
            any(
                var.aval.ndim == 2 and var.aval.shape[-1] == n_products and var.aval.shape[0] >= x.shape[0]
                for var in equation.outvars
            )
            or any(makes_features(inner.eqns) for inner in inner_jaxprs(equation))
            for equation in equations
        )

    loops = [equation for equation in jaxpr.eqns if equation.primitive.name == "while"]
    assert len(loops) == 1
    assert makes_features(jaxpr.eqns)
    assert not makes_features(loops[0].params["body_jaxpr"].jaxpr.eqns)


def test_expanded_iteration_falls_back_to_centred_where_it_would_lose_digits(dtype):
    """Clusters about 400 standard deviations apart: the expansion would lose more than
    11 bits, so the guard exceeds its limit in either dtype and the iteration is the
    centred one (in float32 the expanded moments alone are off by far more)."""
    x, weights, start = expanded_case(separation=400, seed=2, start_at_truth=True)
    module = importlib.import_module("latentem.models.gaussian_mixture")
    params = to_params(*start, dtype)
    assert expanded_cancellation(x, weights, params) > module._EXPANDED_MAX_CANCELLATION
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments="expanded")
    centred = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments="centred")
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    fused = jax.jit(model.fused_step)(params, xj, wj)
    engine = jax.jit(lambda p, x, w: lem.em_step(centred, p, x, weights=w))(params, xj, wj)
    (_, _, covariances_ref), _ = numpy_em_iteration(x, weights, start, 1e-6)
    scale = float(np.abs(covariances_ref).max())
    tolerance = rtol_for(dtype, 1e-12, 1e-6)
    assert_trees_all_close(fused[0], engine[0], rtol=tolerance, atol=tolerance * scale)
    error = np.max(np.abs(np.asarray(fused[0].covariances, np.float64) - covariances_ref))
    assert error <= rtol_for(dtype, 1e-12, 1e-5) * scale
    if dtype == np.float32:
        # What the guard avoids: the expanded moments alone, far off in float32.
        reference = (wj @ xj) / wj.sum()
        features = module._product_features(xj - reference[None, :])
        moments = module._expanded_moments(
            features, wj, params, reference, module.precision_cholesky(params.covariances, "full")
        )
        covariances = moments.scatter / moments.counts[:, None, None]
        error = np.max(np.abs(np.asarray(covariances, np.float64) - covariances_ref))
        assert error > 1e-4 * scale


def test_expanded_guard_sees_narrow_correlated_components(dtype):
    """Narrow components (condition number 1e6, three short axes) with their long axis
    off the coordinate axes and their means 3 standard deviations apart along it: the
    whitened distances to the data's mean are small, but the expanded terms
    P_ij y_i y_j, about |y|^2 / lambda_min, are large and cancel. The guard also bounds
    the terms' worst case (|m|' |P| |m|), so the iteration is the centred one and
    matches a float64 NumPy iteration. The whitened distance alone let the expansion
    through: in float32, from parameters of a soft M-step on these data, one iteration's
    weights were off by 2.3e-3 (1.2e-5 centred), its mean log-likelihood by 1.8e-2."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    rng = np.random.default_rng(10)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    covariance = (rotation * np.array([1.0, 1e-6, 1e-6, 1e-6])) @ rotation.T
    means = np.array([-3.0, 0.0, 3.0])[:, None] * rotation[:, 0][None, :]
    x = np.concatenate([rng.multivariate_normal(mean, covariance, 10000) for mean in means])
    weights = np.ones(x.shape[0])
    start = (np.full(3, 1 / 3), means, np.stack([covariance] * 3))
    params = to_params(*start, dtype)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    reference = (wj @ xj) / wj.sum()
    factor = module.precision_cholesky(params.covariances, "full")
    assert expanded_cancellation(x, weights, params) <= module._EXPANDED_MAX_CANCELLATION
    assert float(module._expanded_terms(params, reference, factor)) > module._EXPANDED_MAX_TERMS
    assert not expanded_accurate(x, weights, params)
    model = lem.gaussian_mixture(3, reg_covar=1e-9, reg_covar_mode="absolute", moments="expanded")
    iteration = jax.jit(model.fused_step)(params, xj, wj)
    (weights_ref, _, _), _ = numpy_em_iteration(x, weights, start, 1e-9)
    error = np.max(np.abs(np.asarray(iteration[0].weights, np.float64) - weights_ref))
    assert error <= rtol_for(dtype, 1e-10, 1e-4), error


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_batched_expanded_fits_equal_solo_fits(covariance_type, dtype):
    """Under jax.vmap the guard's lax.cond runs both branches and each member keeps its
    own: a batch with one member that falls back equals the solo fits."""
    if covariance_type == "full":
        make_case = expanded_case
    else:
        make_case = functools.partial(diagonal_case, covariance_type)
    cases = [make_case(separation=s, seed=10 + i, start_at_truth=True) for i, s in enumerate((8, 400, 8))]
    model = lem.gaussian_mixture(
        3, covariance_type, reg_covar=1e-6, reg_covar_mode="absolute", moments="expanded"
    )
    x = jnp.asarray(np.stack([c[0] for c in cases]), dtype)
    weights = jnp.asarray(np.stack([c[1] for c in cases]), dtype)
    starts = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[to_params(*c[2], dtype) for c in cases])
    fit = functools.partial(lem.fit_em, model, max_iter=8, tol=0.0)
    batched = jax.jit(jax.vmap(lambda p, x, w: fit(p, x, weights=w)))(starts, x, weights)
    for i in range(len(cases)):
        solo = fit(jax.tree_util.tree_map(lambda a, i=i: a[i], starts), x[i], weights=weights[i])
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], batched.params)
        scale = float(np.abs(solo.params.covariances).max())
        assert_trees_all_close(member, solo.params, rtol=rtol_for(dtype, 1e-10, 1e-4), atol=1e-5 * scale)


def test_batch_aware_cond_runs_one_branch_for_a_uniform_batch():
    """Under vmap, the guard's conditional runs only the branch every member takes (a
    plain lax.cond would run both for every member); a mixed batch runs both and each
    member keeps its own."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    calls = {"true": 0, "false": 0}

    def counting(name, shift):
        def branch(x, y):
            jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
            return x + shift * y

        return branch

    def cond(predicate, x, y):
        return module._batch_aware_cond(predicate, counting("true", 1.0), counting("false", -1.0), x, y)

    x = jnp.arange(4.0)
    y = jnp.asarray(2, x.dtype)
    batched = jax.jit(jax.vmap(cond, in_axes=(0, 0, None)))
    for predicate, shifts, ran in [
        ([True] * 4, [2, 2, 2, 2], {"true"}),
        ([False] * 4, [-2, -2, -2, -2], {"false"}),
        ([True, False, False, True], [2, -2, -2, 2], {"true", "false"}),
    ]:
        calls.update(true=0, false=0)
        result = batched(jnp.array(predicate), x, y)
        jax.effects_barrier()
        np.testing.assert_array_equal(result, x + jnp.array(shifts, x.dtype))
        assert {name for name, count in calls.items() if count} == ran, (predicate, calls)
    # An unbatched predicate with batched operands, and no vmap at all.
    calls.update(true=0, false=0)
    result = jax.jit(jax.vmap(cond, in_axes=(None, 0, None)))(jnp.array(False), x, y)
    jax.effects_barrier()
    np.testing.assert_array_equal(result, x - 2)
    assert calls["true"] == 0
    assert float(jax.jit(cond)(jnp.array(True), x[3], y)) == 5.0


def test_check_model_passes_the_expanded_step(dtype):
    x, _, _ = expanded_case(separation=8, seed=3, n_samples=1000)
    model = lem.gaussian_mixture(3, reg_covar_mode="absolute", moments="expanded")
    report = lem.check_model(model, jax.random.key(0), jnp.asarray(x, dtype), n_samples=1000)
    assert report["fused_step"].passed is True, str(report)


def diagonal_case(covariance_type, separation, seed, start_at_truth=False):
    """``expanded_case`` with diagonal (or spherical) start covariances."""
    x, weights, (mixing_weights, means, covariances) = expanded_case(
        separation=separation, seed=seed, start_at_truth=start_at_truth
    )
    variances = np.diagonal(covariances, axis1=1, axis2=2).copy()
    if covariance_type == "spherical":
        variances = variances.mean(axis=1)
    return x, weights, (mixing_weights, means, variances)


def numpy_diagonal_em_iteration(x, weights, start, reg_covar, covariance_type):
    """One weighted EM iteration of a diagonal or spherical mixture in float64, densities
    from SciPy: (params, sum w log p)."""
    mixing_weights, means, variances = start
    by_feature = variances if covariance_type == "diag" else np.repeat(variances[:, None], x.shape[1], 1)
    log_joint = np.stack(
        [
            np.log(mixing_weights[k]) + stats.norm(means[k], np.sqrt(by_feature[k])).logpdf(x).sum(axis=1)
            for k in range(len(mixing_weights))
        ],
        axis=1,
    )
    log_p = np.logaddexp.reduce(log_joint, axis=1)
    r = weights[:, None] * np.exp(log_joint - log_p[:, None])
    counts = r.sum(0)
    new_means = r.T @ x / counts[:, None]
    new_variances = np.stack(
        [(r[:, k, None] * (x - new_means[k]) ** 2).sum(0) / counts[k] for k in range(len(counts))]
    )
    if covariance_type == "spherical":
        new_variances = new_variances.mean(axis=1)
    return (counts / counts.sum(), new_means, new_variances + reg_covar), np.sum(weights * log_p)


def diagonal_cancellation(x, weights, params):
    module = importlib.import_module("latentem.models.gaussian_mixture")
    xw = jnp.asarray(weights, params.means.dtype)
    reference = (xw @ jnp.asarray(x, params.means.dtype)) / xw.sum()
    return float(module._diagonal_expanded_cancellation(params, reference))


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_diagonal_expanded_iteration_matches_numpy(covariance_type, dtype):
    """One diagonal (spherical) iteration with moments="expanded", where the guard passes,
    equals a float64 NumPy/SciPy iteration: to 1e-10 in float64, to 2e-5 of the largest
    entry in float32."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    x, weights, start = diagonal_case(covariance_type, separation=8, seed=0)
    model = lem.gaussian_mixture(
        3, covariance_type, reg_covar=1e-6, reg_covar_mode="absolute", moments="expanded"
    )
    params = to_params(*start, dtype)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    assert isinstance(model.fused_prepare(xj, wj), module._DiagonalExpandedData)
    assert diagonal_cancellation(x, weights, params) <= module._EXPANDED_MAX_CANCELLATION
    reference = numpy_diagonal_em_iteration(x, weights, start, 1e-6, covariance_type)
    for prepared in (None, model.fused_prepare(xj, wj)):  # em_step's call, and fit_em's
        iteration = jax.jit(model.fused_step)(params, xj, wj, prepared)
        assert_iteration_matches(iteration, reference, weights, dtype)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_diagonal_expanded_fit_equals_centred_fit(covariance_type, dtype):
    """Twenty iterations of each from the same start against twenty float64 NumPy/SciPy
    iterations (1e-9 in float64, 1e-4 in float32), and to each other in float64."""
    x, weights, start = diagonal_case(covariance_type, separation=8, seed=1)
    reference = start
    for _ in range(20):
        reference, _ = numpy_diagonal_em_iteration(x, weights, reference, 1e-6, covariance_type)
    fits = {}
    for moments in ("expanded", "centred"):
        model = lem.gaussian_mixture(
            3, covariance_type, reg_covar=1e-6, reg_covar_mode="absolute", moments=moments
        )
        fits[moments] = twenty_iterations_against_numpy(model, x, weights, start, reference, dtype, moments)
    if dtype == np.float64:
        scale = float(np.abs(fits["centred"].params.covariances).max())
        assert_trees_all_close(
            fits["expanded"].params, fits["centred"].params, rtol=1e-10, atol=1e-10 * scale
        )


def test_diagonal_expanded_iteration_falls_back_to_centred_where_it_would_lose_digits(dtype):
    """Clusters about 400 standard deviations apart: the expansion would lose more than
    11 bits, so in either dtype the guard exceeds its limit and the iteration is the
    centred one (in float64 it had been taken, its variances 3.5e-11 off, where the
    centred ones are 1e-15)."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    x, weights, start = diagonal_case("diag", separation=400, seed=2, start_at_truth=True)
    params = to_params(*start, dtype)
    options = dict(reg_covar=1e-6, reg_covar_mode="absolute")
    model = lem.gaussian_mixture(3, "diag", moments="expanded", **options)
    centred = lem.gaussian_mixture(3, "diag", moments="centred", **options)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    fused = jax.jit(model.fused_step)(params, xj, wj)
    engine = jax.jit(lambda p, x, w: lem.em_step(centred, p, x, weights=w))(params, xj, wj)
    (_, _, variances_ref), _ = numpy_diagonal_em_iteration(x, weights, start, 1e-6, "diag")
    assert diagonal_cancellation(x, weights, params) > module._EXPANDED_MAX_CANCELLATION
    assert_trees_all_close(
        fused[0],
        engine[0],
        rtol=rtol_for(dtype, 1e-12, 1e-6),
        atol=rtol_for(dtype, 1e-12, 1e-6) * float(np.abs(variances_ref).max()),
    )
    if dtype == np.float32:
        data = module._diagonal_expanded_data(xj, wj)
        moments = module._diagonal_expanded_moments(data.features, wj, params, data.reference)
        variances = np.asarray(moments.scatter / moments.counts[:, None], np.float64)
        assert np.max(np.abs(variances - variances_ref)) > 1e-4 * np.abs(variances_ref).max()
    error = np.max(np.abs(np.asarray(fused[0].covariances, np.float64) - variances_ref))
    assert error <= rtol_for(dtype, 1e-12, 1e-5) * np.abs(variances_ref).max()


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_check_model_passes_the_diagonal_expanded_step(covariance_type, dtype):
    x, _, _ = expanded_case(separation=8, seed=3, n_samples=1000)
    model = lem.gaussian_mixture(3, covariance_type, reg_covar_mode="absolute", moments="expanded")
    report = lem.check_model(model, jax.random.key(0), jnp.asarray(x, dtype), n_samples=1000)
    assert report["fused_step"].passed is True, str(report)


def test_moments_choice_and_size_rule():
    module = importlib.import_module("latentem.models.gaussian_mixture")
    with pytest.raises(ValueError, match="moments must be one of"):
        lem.gaussian_mixture(2, moments="fast")
    with pytest.raises(ValueError, match='moments="expanded" is for covariance_type "full", "diag" or'):
        lem.gaussian_mixture(2, "tied", moments="expanded")
    if jax.default_backend() not in module._EXPANDED_BACKENDS:  # "auto": centred here
        model = lem.gaussian_mixture(2)
        x, weights = jnp.zeros((1000, 8)), jnp.ones(1000)
        assert model.fused_prepare is None or model.fused_prepare(x, weights) is None
        assert (
            model.fused_step is None
            or model.fused_step(to_params(*_two_components(8), x.dtype), x, weights) is None
        )
    # Float64 diagonal and spherical fits of at least 2^18 values n k d expand their
    # moments on a CPU; smaller ones, float32 ones and "centred" keep the deviations,
    # and "expanded" expands any.
    if jax.default_backend() in module._DIAGONAL_EXPANDED_BACKENDS:
        dtypes = (np.float32, np.float64) if jax.config.jax_enable_x64 else (np.float32,)
        for covariance_type, dtype in itertools.product(("diag", "spherical"), dtypes):
            for n_samples, moments, expanded in [
                (100_000, "auto", dtype == np.float64),
                (16_384, "auto", dtype == np.float64),
                (16_383, "auto", False),
                (100_000, "centred", False),
                (1000, "expanded", True),
            ]:
                model = lem.gaussian_mixture(2, covariance_type, moments=moments)
                x, weights = jnp.zeros((n_samples, 8), dtype), jnp.ones(n_samples, dtype)
                prepared = None if model.fused_prepare is None else model.fused_prepare(x, weights)
                case = (covariance_type, dtype, n_samples, moments)
                assert isinstance(prepared, module._DiagonalExpandedData) == expanded, case
    # Large full and tied float32 fits on a CPU skip components block by block; float64
    # fits, small fits and fits whose scatter is formed by entries do not.
    if jax.default_backend() == "cpu":
        assert module._active_component_slots(100_000, 16, 32, "full", np.float32) == 4
        assert module._active_component_slots(100_000, 16, 32, "tied", np.float32) == 4
        assert module._active_component_slots(100_000, 16, 32, "full", np.float64) is None
        assert module._active_component_slots(100_000, 16, 32, "diag", np.float32) is None
        assert module._active_component_slots(1000, 16, 32, "full", np.float32) is None
        assert module._active_component_slots(100_000, 8, 8, "full", np.float32) is None
        # ... and those of up to eight features (more than four) form their moments
        # about block centres instead (float64 too): blocks halved until the padding, at
        # most a block per component, is at most 1/32 of the samples.
        assert module._block_centred_samples(100_000, 8, 8, "full") == 256
        assert module._block_centred_samples(100_000, 8, 8, "tied") == 256
        assert module._block_centred_samples(1_000_000, 8, 8, "full") == 512
        assert module._block_centred_samples(100_000, 16, 8, "full") == 128
        assert module._block_centred_samples(100_000, 8, 5, "full") == 256
        assert module._block_centred_samples(100_000, 8, 8, "diag") is None
        assert module._block_centred_samples(100_000, 8, 4, "full") is None
        assert module._block_centred_samples(100_000, 16, 32, "full") is None
        assert module._block_centred_samples(10_000, 8, 8, "full") is None  # 2^20 values
        assert module._block_centred_samples(100_000, 64, 8, "full") is None  # padding
    # "auto" takes large fits only; neither takes products of features beyond the budget.
    assert not module._expanded_applies(1000, 8, 8, always=False)
    assert module._expanded_applies(1_000_000, 64, 32, always=False)
    assert module._expanded_applies(1000, 8, 8, always=True)
    # "auto" keeps the centred moments when float32-accurate products are asked for.
    assert not module._float32_products_requested()
    for precision in ("float32", "highest", "F32_F32_F32"):
        try:
            with jax.default_matmul_precision(precision):
                requested = module._float32_products_requested()
        except ValueError:  # a name this JAX does not take (jax 0.4.30: "float32" alone of these)
            assert precision != "float32"
            continue
        assert requested, precision
    with jax.default_matmul_precision("tensorfloat32"):
        assert not module._float32_products_requested()
    assert not module._expanded_applies(10_000_000, 64, 32, always=True)


def _two_components(n_features):
    return (
        np.full(2, 0.5),
        np.stack([np.zeros(n_features), np.ones(n_features)]),
        np.stack([np.eye(n_features)] * 2),
    )


# ---------------------------------------------------------------------------
# Samples grouped by landmark; the scatter of the components a block meets
# ---------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Skipping of components in blocks of samples (a CPU's large full and tied fits),
    here on this backend, for small data: ``configure(block, slots, n_components,
    n_features)`` makes blocks of ``block`` samples at that size, with ``slots`` slots."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    backend = jax.default_backend()

    def configure(block, slots, n_components=3, n_features=6):
        monkeypatch.setattr(module, "_ACTIVE_COMPONENT_SLOTS", {backend: slots})
        monkeypatch.setattr(module, "_ACTIVE_COMPONENTS_MIN_VALUES", 0)
        monkeypatch.setattr(module, "_ACTIVE_COMPONENTS_MAX_BITS", 64)  # float64 runs too
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", {backend: block * n_components * n_features})
        return module

    return configure


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_scatter_of_active_components_equals_every_components_scatter(covariance_type, dtype, small_blocks):
    """Blocks in which at most ``slots`` components have responsibilities other than
    zero compute those components' scatter alone; blocks with more compute all. With
    blocks of every kind (one component, filling one slot of two; two; all five), and a
    last block shifted back over samples already counted, the scatter equals NumPy's,
    and the one without skipping."""
    n_samples, n_components, n_features = 2050, 5, 6
    module = small_blocks(block=200, slots=2, n_components=n_components, n_features=n_features)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n_samples, n_features)) * 3 + 20.0
    # Blocks 0-4 meet one component (0, 1, 2, 3, 4), blocks 5-7 two, the rest all five.
    responsibilities = np.zeros((n_samples, n_components))
    for block in range(-(-n_samples // 200)):
        rows = slice(block * 200, (block + 1) * 200)
        meets = [block] if block < 5 else [0, block - 3] if block < 8 else list(range(n_components))
        responsibilities[rows, meets] = rng.dirichlet(np.ones(len(meets)), 200)[: len(x[rows])]
    responsibilities *= rng.uniform(0.5, 2.0, (n_samples, 1))  # sample weights
    reference = x.mean(axis=0)
    counts = responsibilities.sum(axis=0)
    means = responsibilities.T @ x / counts[:, None]
    expected = np.stack(
        [(responsibilities[:, k, None] * (x - means[k])).T @ (x - means[k]) for k in range(n_components)]
    )
    if covariance_type == "tied":
        expected = expected.sum(axis=0)
    chunk = module._chunk_size(n_samples, n_components * n_features)
    assert chunk == 200 and n_samples % chunk != 0
    active = [
        np.count_nonzero((responsibilities[i : i + chunk] > 0).any(axis=0))
        for i in range(0, n_samples, chunk)
    ]
    assert min(active) == 1 and 2 in active and max(active) == n_components
    assert module._active_component_slots(n_samples, n_components, n_features, covariance_type, dtype) == 2

    def scatter():  # a fresh function each time: jax.jit's trace cache would reuse the first path
        return jax.jit(lambda x, r, m, c: module._scatter(x, r, m, c, covariance_type))

    arguments = (
        jnp.asarray(x, dtype),
        jnp.asarray(responsibilities.T, dtype),
        jnp.asarray(means - reference, dtype),
        jnp.asarray(reference, dtype),
    )
    skipping = scatter()(*arguments)
    rtol = rtol_for(dtype, 1e-10, 1e-5)
    np.testing.assert_allclose(skipping, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    small_blocks(block=200, slots=0, n_components=n_components, n_features=n_features)
    assert module._active_component_slots(n_samples, n_components, n_features, covariance_type, dtype) is None
    np.testing.assert_allclose(scatter()(*arguments), skipping, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_sample_order_puts_each_cluster_together(dtype):
    """Farthest-point landmarks visit every separated cluster before any twice, so the
    order is a permutation in which each cluster's samples are consecutive."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, 4000)
    x = rng.normal(0, 30, (5, 7))[labels] + rng.standard_normal((4000, 7)) + 1e3
    order = np.asarray(jax.jit(module._sample_order, static_argnums=1)(jnp.asarray(x, dtype), 5))
    np.testing.assert_array_equal(np.sort(order), np.arange(4000))
    assert np.count_nonzero(np.diff(labels[order])) == 4  # five runs, one per cluster


def test_grouped_fit_equals_numpy_iterations(dtype, small_blocks):
    """A fit on samples grouped by ``_sample_order`` (once, before the loop), with blocks
    that skip components: twenty iterations equal twenty float64 NumPy/SciPy iterations
    on the samples as given (uneven sample weights, some zero), and the blocks did skip."""
    module = small_blocks(block=100, slots=1)
    # Clusters far enough apart for exact zeros even in float64 (beyond 745 nats).
    x, weights, start = expanded_case(separation=100, seed=7)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    grouped = model.fused_prepare(xj, wj)
    assert isinstance(grouped, module._GroupedData)
    order = np.asarray(module._sample_order(xj, 3))
    np.testing.assert_array_equal(grouped.x, xj[order])
    np.testing.assert_array_equal(grouped.weights, wj[order])
    reference = start
    for _ in range(20):
        reference, _ = numpy_em_iteration(x, weights, reference, 1e-6)
    fit = twenty_iterations_against_numpy(model, x, weights, start, reference, dtype, "grouped")
    responsibilities = np.asarray(lem.predict_proba(model, fit.params, grouped.x))
    chunk = module._chunk_size(x.shape[0], 3 * x.shape[1])
    active = [
        np.count_nonzero((responsibilities[i : i + chunk] > 0).any(axis=0))
        for i in range(0, x.shape[0], chunk)
    ]
    assert active.count(1) >= len(active) // 2, active


def test_batched_grouped_fits_equal_solo_fits(dtype, small_blocks):
    """Restarts under jax.vmap (one dataset, several starts): the skipping's conditional
    runs per batch, and every member equals its solo fit."""
    small_blocks(block=100, slots=1)
    x, weights, _ = expanded_case(separation=100, seed=8)
    rng = np.random.default_rng(9)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")
    starts = [
        to_params(
            np.full(3, 1 / 3), x[rng.choice(len(x), 3, replace=False)], np.stack([np.cov(x.T)] * 3), dtype
        )
        for _ in range(3)
    ]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *starts)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    fit = functools.partial(lem.fit_em, model, max_iter=10, tol=0.0)
    batched = jax.jit(jax.vmap(lambda p: fit(p, xj, weights=wj)))(stacked)
    for i, start in enumerate(starts):
        solo = fit(start, xj, weights=wj)
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], batched.params)
        scale = float(np.abs(solo.params.covariances).max())
        assert_trees_all_close(member, solo.params, rtol=rtol_for(dtype, 1e-10, 1e-4), atol=1e-5 * scale)


def test_check_model_passes_the_grouped_step(dtype, small_blocks):
    small_blocks(block=100, slots=1)
    x, _, _ = expanded_case(separation=100, seed=3, n_samples=1000)
    model = lem.gaussian_mixture(3, reg_covar_mode="absolute")
    assert model.fused_prepare(jnp.asarray(x, dtype), jnp.ones(1000, dtype)) is not None
    report = lem.check_model(model, jax.random.key(0), jnp.asarray(x, dtype), n_samples=1000)
    assert report["fused_step"].passed is True, str(report)


# ---------------------------------------------------------------------------
# Moments about the centres of blocks of grouped samples
# ---------------------------------------------------------------------------


@pytest.fixture
def small_centred_blocks(monkeypatch):
    """Moments about block centres (a CPU's large full and tied fits of five to eight
    features), here on this backend, for small data:
    ``configure(block)`` makes blocks of ``block`` samples."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    backend = jax.default_backend()

    def configure(block):
        monkeypatch.setattr(module, "_BLOCK_CENTRED_SAMPLES", {backend: block})
        monkeypatch.setattr(module, "_BLOCK_CENTRED_MAX_PADDING", 1)
        monkeypatch.setattr(module, "_SCATTER_BY_ENTRIES_MAX_FEATURES", {backend: 8})
        monkeypatch.setattr(module, "_SCATTER_BY_ENTRIES_MIN_VALUES", 0)
        return module

    return configure


def test_block_centred_data_puts_one_group_in_each_block(dtype, small_centred_blocks):
    """Every block holds samples of one landmark group (padded with rows of weight zero);
    the blocks hold every sample once with its weight; the centres are the blocks'
    weighted means and the features the products of the deviations from them (NumPy)."""
    module = small_centred_blocks(block=64)
    x, weights, _ = expanded_case(separation=100, seed=10, n_samples=1000)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(weights, dtype)
    data = jax.jit(module._block_centred_data, static_argnums=(2, 3))(xj, wj, 3, 64)
    groups = np.asarray(module._landmark_groups(xj, 3))
    grouped_x, grouped_weights = np.asarray(data.x, np.float64), np.asarray(data.weights, np.float64)
    # Each sample of positive weight once (matched by its row of x), padding rows of weight zero.
    x_rows = {tuple(row): i for i, row in enumerate(np.asarray(xj, np.float64))}
    index = np.array([x_rows.get(tuple(row), -1) for row in grouped_x])
    positive = grouped_weights > 0
    np.testing.assert_array_equal(np.sort(index[positive]), np.flatnonzero(weights > 0))
    np.testing.assert_array_equal(grouped_weights[positive], np.asarray(wj, np.float64)[index[positive]])
    n_blocks = len(grouped_weights) // 64
    assert n_blocks == (1000 + 3 * 63) // 64
    for block in range(n_blocks):
        rows = slice(64 * block, 64 * (block + 1))
        met = {groups[i] for i in index[rows] if i >= 0}
        assert len(met) <= 1, (block, met)
    assert len(set(groups)) == 3
    # Centres and features against NumPy.
    reference = weights @ x / weights.sum()
    np.testing.assert_allclose(data.reference, reference, rtol=rtol_for(dtype, 1e-12, 1e-6))
    centred = (grouped_x - np.asarray(data.reference, np.float64)).reshape(n_blocks, 64, -1)
    block_weights = grouped_weights.reshape(n_blocks, 64)
    mass = block_weights.sum(axis=1)
    centres = np.einsum("bc,bcd->bd", block_weights, centred) / np.where(mass > 0, mass, 1)[:, None]
    tolerance = rtol_for(dtype, 1e-10, 1e-5) * np.abs(x).max()
    np.testing.assert_allclose(data.centres, centres, atol=tolerance)
    deviations = np.where(block_weights[:, :, None] > 0, centred - centres[:, None, :], 0)
    np.testing.assert_allclose(data.deviations, np.swapaxes(deviations, 1, 2), atol=tolerance)
    flat = deviations.reshape(-1, x.shape[1])
    rows, cols = np.triu_indices(x.shape[1])
    expected = flat[:, rows] * flat[:, cols]
    np.testing.assert_allclose(data.products, expected, atol=tolerance * np.abs(flat).max())


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("scatter_from", ["products", "deviations"])
def test_block_centred_moments_equal_numpy(
    covariance_type, scatter_from, dtype, small_centred_blocks, monkeypatch
):
    """Counts, means, scatter about the new means and second moments from the block
    moments equal NumPy's, for responsibilities of any kind (here random, every block
    meeting every component, some components far from the blocks' centres), with the
    scatter from the products of deviations and from the deviations (the conditional's
    two branches, each forced by the bound on the cancellation)."""
    module = small_centred_blocks(block=64)
    bound = np.inf if scatter_from == "products" else 0.0  # rho >= 1 always exceeds 0
    monkeypatch.setattr(module, "_BLOCK_CENTRED_MAX_CANCELLATION", bound)
    x, weights, _ = expanded_case(separation=30, seed=11, n_samples=1000)
    data = module._block_centred_data(jnp.asarray(x, dtype), jnp.asarray(weights, dtype), 3, 64)
    rng = np.random.default_rng(12)
    responsibilities = rng.dirichlet(np.ones(3), len(data.weights)) * np.asarray(data.weights)[:, None]
    moments = jax.jit(module._block_centred_moments, static_argnums=3)(
        data, jnp.asarray(responsibilities.T, dtype), jnp.asarray(0.0, dtype), covariance_type == "tied"
    )
    grouped_x = np.asarray(data.x, np.float64)
    reference = np.asarray(data.reference, np.float64)
    counts = responsibilities.sum(axis=0)
    means = responsibilities.T @ grouped_x / counts[:, None]
    scatter = np.stack(
        [(responsibilities[:, k, None] * (grouped_x - means[k])).T @ (grouped_x - means[k]) for k in range(3)]
    )
    if covariance_type == "tied":
        scatter = scatter.sum(axis=0)
    second = (responsibilities.sum(axis=1) @ np.square(grouped_x - reference)) / counts.sum()
    rtol = rtol_for(dtype, 1e-10, 2e-5)
    np.testing.assert_allclose(moments.counts, counts, rtol=rtol)
    np.testing.assert_allclose(moments.total, counts.sum(), rtol=rtol)
    centred_means = np.asarray(moments.centred_means, np.float64)
    np.testing.assert_allclose(centred_means + reference, means, atol=rtol * np.abs(x).max())
    np.testing.assert_allclose(moments.scatter, scatter, atol=rtol * np.abs(scatter).max())
    np.testing.assert_allclose(moments.second_moments, second, rtol=rtol)


def test_block_centred_scatter_is_as_accurate_as_centred(small_centred_blocks, monkeypatch):
    """In float32, on clusters 100 standard deviations apart and 50 from the origin, one
    iteration's covariances about the centres of blocks of grouped samples are as
    accurate as the centred form's (against float64 NumPy), and ten times more accurate
    than the same moments about one centre for all samples (one block), which cancel by
    more than the bound; the fused step then forms the scatter from deviations and is
    as accurate as the centred form again."""
    module = small_centred_blocks(block=64)
    x, weights, start = expanded_case(separation=100, seed=13, n_samples=2000, start_at_truth=True)
    expected = numpy_em_iteration(x, weights, start, 1e-6)[0][2]
    xj, wj = jnp.asarray(x, np.float32), jnp.asarray(weights, np.float32)
    params = to_params(*start, np.float32)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")

    def error(covariances):
        difference = np.abs(np.asarray(covariances, np.float64) - expected)
        return np.max(difference / np.abs(expected).max(axis=(1, 2), keepdims=True))

    def step_error(prepared):  # a fresh jit: the bound is read at trace time
        step = jax.jit(lambda *args: model.fused_step(*args)[0].covariances)
        return error(step(params, prepared.x, prepared.weights, prepared))

    grouped = module._block_centred_data(xj, wj, 3, 64)
    one_block = module._block_centred_data(xj, wj, 1, 2000)
    assert grouped.centres.shape == (34, 6) and one_block.centres.shape == (1, 6)
    centred = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute", moments="centred")
    assert centred.fused_prepare is None or centred.fused_prepare(xj, wj) is None  # "auto"'s alone
    centred_error = error(lem.em_step(centred, params, xj, weights=wj)[0].covariances)
    grouped_error, one_block_checked = step_error(grouped), step_error(one_block)
    monkeypatch.setattr(module, "_BLOCK_CENTRED_MAX_CANCELLATION", np.inf)  # no check
    one_block_error = step_error(one_block)
    assert step_error(grouped) == grouped_error  # grouped, the check passed
    assert grouped_error <= 4 * centred_error, (grouped_error, centred_error)
    assert one_block_error >= 10 * grouped_error, (one_block_error, grouped_error)
    assert one_block_checked <= 4 * centred_error, (one_block_checked, centred_error)


@pytest.mark.parametrize("scatter_from", ["products", "deviations"])
def test_block_centred_fit_equals_numpy_iterations(scatter_from, dtype, small_centred_blocks, monkeypatch):
    """Twenty iterations about block centres (the data grouped once, before the loop)
    equal twenty float64 NumPy/SciPy iterations on the samples as given (uneven sample
    weights, some zero), with either branch of the conditional forced."""
    module = small_centred_blocks(block=64)
    bound = np.inf if scatter_from == "products" else 0.0
    monkeypatch.setattr(module, "_BLOCK_CENTRED_MAX_CANCELLATION", bound)
    x, weights, start = expanded_case(separation=100, seed=7)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")
    prepared = model.fused_prepare(jnp.asarray(x, dtype), jnp.asarray(weights, dtype))
    assert isinstance(prepared, module._BlockCentredData)
    reference = start
    for _ in range(20):
        reference, _ = numpy_em_iteration(x, weights, reference, 1e-6)
    twenty_iterations_against_numpy(model, x, weights, start, reference, dtype, "block_centred")


def test_batched_block_centred_fits_equal_solo_fits(dtype, small_centred_blocks):
    """Restarts under jax.vmap (one dataset, several starts) and a batch of datasets:
    every member equals its solo fit."""
    small_centred_blocks(block=64)
    rng = np.random.default_rng(14)
    cases = [expanded_case(separation=100, seed=seed, start_at_truth=True) for seed in (15, 16)]
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")
    fit = functools.partial(lem.fit_em, model, max_iter=10, tol=0.0)

    def start(case):  # near the truth: from random rows and the data's covariance, a
        # component can take two clusters 100 standard deviations apart, where float32
        # EM amplifies the rounding of any order of summation past the tolerance.
        weights, means, covariances = case[2]
        return to_params(weights, means + rng.standard_normal(means.shape), 2 * covariances, dtype)

    x, weights = (jnp.asarray(np.stack([case[i] for case in cases]), dtype) for i in (0, 1))
    starts = [start(case) for case in cases]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *starts)
    restarts = jax.jit(jax.vmap(lambda p: fit(p, x[0], weights=weights[0])))(stacked)
    datasets = jax.jit(jax.vmap(lambda p, x, w: fit(p, x, weights=w)))(stacked, x, weights)
    for i, params in enumerate(starts):
        for batched, data in ((restarts, 0), (datasets, i)):
            solo = fit(params, x[data], weights=weights[data])
            member = jax.tree_util.tree_map(lambda a, i=i: a[i], batched.params)
            scale = float(np.abs(solo.params.covariances).max())
            assert_trees_all_close(member, solo.params, rtol=rtol_for(dtype, 1e-10, 1e-4), atol=1e-5 * scale)


@pytest.mark.parametrize("route", ["block_centred", "grouped"])
def test_em_step_skips_the_preparation_and_equals_one_iteration_of_a_fit(
    route, dtype, monkeypatch, small_blocks, small_centred_blocks
):
    """em_step (one iteration) does not group the samples, which costs more than the
    iteration saves; its result is the same iteration as a fit's first, which does."""
    if route == "grouped":
        module = small_blocks(block=200, slots=1, n_features=6)
        preparation = "_sample_order"
    else:
        module = small_centred_blocks(block=64)
        preparation = "_block_centred_data"
    x, weights, start = expanded_case(separation=100, seed=23, n_samples=1000, start_at_truth=True)
    xj, wj, params = jnp.asarray(x, dtype), jnp.asarray(weights, dtype), to_params(*start, dtype)
    model = lem.gaussian_mixture(3, reg_covar=1e-6, reg_covar_mode="absolute")
    assert model.fused_prepare(xj, wj) is not None
    fitted = lem.fit_em(model, params, xj, weights=wj, max_iter=1, tol=0.0)

    def fail(*args, **kwargs):
        raise AssertionError(f"em_step called {preparation}")

    monkeypatch.setattr(module, preparation, fail)
    stepped, objective = lem.em_step(model, params, xj, wj)
    scale = float(np.abs(fitted.params.covariances).max())
    assert_trees_all_close(stepped, fitted.params, rtol=rtol_for(dtype, 1e-10, 1e-4), atol=1e-6 * scale)
    np.testing.assert_allclose(  # at the parameters before the step
        float(objective), float(lem.score(model, params, xj, wj)), rtol=rtol_for(dtype, 1e-12, 1e-6)
    )


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_check_model_passes_the_block_centred_step(covariance_type, dtype, small_centred_blocks):
    module = small_centred_blocks(block=64)
    x, _, _ = expanded_case(separation=100, seed=3, n_samples=1000)
    model = lem.gaussian_mixture(3, covariance_type, reg_covar_mode="absolute")
    prepared = model.fused_prepare(jnp.asarray(x, dtype), jnp.ones(1000, dtype))
    assert isinstance(prepared, module._BlockCentredData)
    report = lem.check_model(model, jax.random.key(0), jnp.asarray(x, dtype), n_samples=1000)
    assert report["fused_step"].passed is True, str(report)


# ---------------------------------------------------------------------------
# Integer data
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::latentem.ConvergenceWarning")  # fixed iterations
@pytest.mark.parametrize(
    "case",
    ["full", "tied", "diag", "spherical", "full_expanded", "full_grouped", "tied_block_centred"],
)
def test_integer_data_are_fitted_as_their_float_copy(case, dtype, small_blocks, small_centred_blocks):
    """Integer data (counts, rounded measurements) fit as the same values in JAX's
    default float dtype, on every route a fit can take: the data-only preparation
    (``fused_prepare``) included, which picks its route by the data's dtype."""
    module = importlib.import_module("latentem.models.gaussian_mixture")
    covariance_type, _, route = case.partition("_")
    x, _, _ = expanded_case(separation=100, seed=21, n_samples=1000)
    x_int = np.round(4 * x).astype(np.int64 if dtype == np.float64 else np.int32)
    if route == "grouped":
        small_blocks(block=200, slots=1, n_features=x.shape[1])
        kind = module._GroupedData
    elif route == "block_centred":
        small_centred_blocks(block=64)
        kind = module._BlockCentredData
    else:
        kind = module._ExpandedData if route == "expanded" else type(None)
    model = lem.gaussian_mixture(
        3, covariance_type, reg_covar_mode="absolute", moments="expanded" if route == "expanded" else "auto"
    )
    weights = jnp.ones(x.shape[0], dtype)
    prepared = model.fused_prepare(x_int, weights) if model.fused_prepare is not None else None
    assert isinstance(prepared, kind)
    from_int = lem.fit(model, jax.random.key(3), x_int, max_iter=20, tol=0.0)
    from_float = lem.fit(model, jax.random.key(3), x_int.astype(dtype), max_iter=20, tol=0.0)
    assert from_int.params.means.dtype == dtype
    assert int(from_int.status) == int(from_float.status)
    scale = float(np.abs(from_float.params.covariances).max())
    assert_trees_all_close(
        from_int.params, from_float.params, rtol=rtol_for(dtype, 1e-12, 1e-6), atol=1e-12 * scale
    )
    np.testing.assert_allclose(float(from_int.log_likelihood), float(from_float.log_likelihood), rtol=1e-6)


@pytest.mark.filterwarnings("ignore::latentem.ConvergenceWarning")  # fixed iterations
@pytest.mark.parametrize("factory", [lem.kmeans, lem.ppca, lem.factor_analysis])
def test_other_models_fit_integer_data_as_their_float_copy(factory, dtype):
    model = factory(2)
    x, _, _ = expanded_case(separation=10, seed=22, n_samples=500)
    x_int = np.round(4 * x).astype(np.int64 if dtype == np.float64 else np.int32)
    from_int = lem.fit(model, jax.random.key(4), x_int, max_iter=10, tol=0.0)
    from_float = lem.fit(model, jax.random.key(4), x_int.astype(dtype), max_iter=10, tol=0.0)
    assert_trees_all_close(from_int.params, from_float.params, rtol=rtol_for(dtype, 1e-12, 1e-6), atol=0)
