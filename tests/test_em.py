"""The EM engine: loop semantics, statuses, weights, transformations, MAP-EM."""

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import gammaln
from scipy import special, stats

import latentem as lem
from tests.helpers import assert_trees_all_close, assert_trees_equal, blobs

MODEL = lem.gaussian_mixture(3, "full")


def tight(dtype, float64=1e-10, float32=1e-4):
    return float64 if dtype == np.float64 else float32


@functools.lru_cache
def compiled_fit_em(model, max_iter=100):
    return jax.jit(functools.partial(lem.fit_em, model, max_iter=max_iter))


@pytest.fixture(scope="module")
def datasets():
    """Eight small datasets of three clusters, float64 NumPy, shape (8, 90, 2)."""
    return np.stack([blobs(seed, n_per_cluster=30) for seed in range(8)])


def start_params(x, dtype, key=0):
    x = jnp.asarray(x, dtype)
    return MODEL.init(jax.random.key(key), x, jnp.ones(x.shape[0], dtype))


# ---------------------------------------------------------------------------
# Loop semantics
# ---------------------------------------------------------------------------


def test_history_and_objective_semantics(dtype, datasets):
    x = jnp.asarray(datasets[0], dtype)
    # A poor start (random responsibilities), so that EM needs several iterations.
    params = lem.gaussian_mixture(3, init="random").init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))
    result = compiled_fit_em(MODEL, 100)(params, x, tol=1e-5)
    n_iter = int(result.n_iter)
    assert 3 <= n_iter < 100 and bool(result.converged) and int(result.status) == lem.Status.CONVERGED
    history = np.asarray(result.history)
    assert np.all(np.isfinite(history[:n_iter])) and np.all(np.isnan(history[n_iter:]))
    # The objective is evaluated at the returned params: the last history entry.
    assert history[n_iter - 1] == float(result.log_likelihood)
    np.testing.assert_allclose(
        float(result.log_likelihood),
        float(lem.score(MODEL, result.params, x)),
        rtol=tight(dtype, 1e-12, 1e-6),
    )
    assert (
        abs(history[n_iter - 1] - history[n_iter - 2])
        < 1e-6
        <= abs(history[n_iter - 2] - history[n_iter - 3])
    )


def test_em_step_is_one_iteration_of_fit_em(dtype, datasets):
    x = jnp.asarray(datasets[1], dtype)
    params = start_params(x, dtype)
    stepped, objective_before = lem.em_step(MODEL, params, x)
    result = compiled_fit_em(MODEL, 1)(params, x, tol=0.0)
    assert_trees_all_close(
        stepped, result.params, rtol=tight(dtype, 1e-12, 1e-5), atol=tight(dtype, 1e-12, 1e-5)
    )
    np.testing.assert_allclose(float(objective_before), float(lem.score(MODEL, params, x)), rtol=1e-6)
    assert float(result.log_likelihood) >= float(objective_before)


def test_em_step_does_not_prepare_and_fit_em_prepares_once(dtype, datasets):
    """A model with a fused_prepare: fit_em evaluates it once (traced once, outside the
    loop) and hands its result to fused_step; em_step, one iteration, does not evaluate
    it and hands fused_step None. (This fused_step records what it gets and declines,
    so both run the engine's iteration.)"""
    x = jnp.asarray(datasets[2], dtype)
    params = start_params(x, dtype)
    prepare_calls, received = [], []

    def fused_prepare(x, weights):
        prepare_calls.append(x.shape)
        return {"total": jnp.sum(weights)}

    def fused_step(params, x, weights, prepared):
        received.append(None if prepared is None else sorted(prepared))
        return None

    model = MODEL._replace(fused_step=fused_step, fused_prepare=fused_prepare)
    stepped, _ = lem.em_step(model, params, x)
    assert prepare_calls == [] and received == [None]
    one = jax.jit(functools.partial(lem.fit_em, model, max_iter=1, tol=0.0))(params, x)
    assert prepare_calls == [x.shape]
    assert len(received) > 1 and all(item == ["total"] for item in received[1:])
    assert_trees_all_close(
        stepped, one.params, rtol=tight(dtype, 1e-12, 1e-5), atol=tight(dtype, 1e-12, 1e-5)
    )


@pytest.mark.parametrize("half", [jnp.float16, jnp.bfloat16])
def test_half_precision_data_are_fitted_in_float32(half, datasets):
    """float16 and bfloat16 data fit, predict, score and fit in a batch as the same
    values in float32 (in float16 a log-likelihood summed over 20000 samples
    overflowed, and the fit ended NONFINITE)."""
    x_half = jnp.asarray(datasets[:2] * 10, half)
    x_single = x_half.astype(jnp.float32)
    assert lem.fit(MODEL, jax.random.key(0), x_half[0]).params.means.dtype == jnp.float32
    for x in (x_half[0], np.asarray(x_half[0])):  # a JAX array and a NumPy one (ml_dtypes)
        fitted = lem.fit(MODEL, jax.random.key(0), x)
        reference = lem.fit(MODEL, jax.random.key(0), x_single[0])
        assert_trees_equal(fitted, reference)
    assert_trees_equal(
        lem.fit_batch(MODEL, jax.random.key(1), x_half), lem.fit_batch(MODEL, jax.random.key(1), x_single)
    )
    params = reference.params
    assert_trees_equal(
        lem.predict_proba(MODEL, params, x_half[1]), lem.predict_proba(MODEL, params, x_single[1])
    )
    assert float(lem.score(MODEL, params, x_half[1])) == float(lem.score(MODEL, params, x_single[1]))
    large = jax.random.normal(jax.random.key(2), (20000, 2)) * 10 + 60.0
    result = lem.fit(lem.gaussian_mixture(2), jax.random.key(3), large.astype(jnp.float16))
    assert int(result.status) == lem.Status.CONVERGED and np.isfinite(float(result.log_likelihood))


def test_nan_dataset_leaves_rest_of_batch_bitwise_equal(dtype, datasets):
    xs = jnp.asarray(datasets[:4], dtype)
    params = jax.vmap(lambda x: start_params(x, dtype))(xs)
    poisoned = xs.at[2, 5, 0].set(jnp.nan)
    batched = jax.jit(jax.vmap(functools.partial(lem.fit_em, MODEL)))
    with_nan = batched(params, poisoned)
    keep = np.array([0, 1, 3])
    without = batched(jax.tree_util.tree_map(lambda a: a[keep], params), xs[keep])
    assert np.asarray(with_nan.status).tolist()[2] == lem.Status.NONFINITE
    assert_trees_equal(jax.tree_util.tree_map(lambda a: a[keep], with_nan), without)


# ---------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------


def test_vmap_fit_em_equals_loop(dtype, datasets):
    xs = jnp.asarray(datasets, dtype)
    params = jax.vmap(lambda x: start_params(x, dtype))(xs)
    batched = jax.jit(jax.vmap(functools.partial(lem.fit_em, MODEL, tol=1e-5)))(params, xs)
    single = compiled_fit_em(MODEL)
    for b in range(xs.shape[0]):
        one = single(jax.tree_util.tree_map(lambda a, b=b: a[b], params), xs[b], tol=1e-5)
        assert int(batched.n_iter[b]) == int(one.n_iter)
        assert_trees_all_close(
            jax.tree_util.tree_map(lambda a, b=b: a[b], batched),
            one,
            rtol=tight(dtype, 1e-10, 1e-4),
            atol=1e-6,
        )


def test_vmap_fit_equals_loop_and_fit_does_not_recompile(dtype, datasets):
    xs = jnp.asarray(datasets, dtype)
    keys = jax.random.split(jax.random.key(42), xs.shape[0])
    batched = jax.vmap(functools.partial(lem.fit, MODEL, n_init=2))(keys, xs)
    for b in range(xs.shape[0]):
        one = lem.fit(MODEL, keys[b], xs[b], n_init=2)
        assert_trees_all_close(
            jax.tree_util.tree_map(lambda a, b=b: a[b], batched),
            one,
            rtol=tight(dtype, 1e-10, 1e-4),
            atol=1e-6,
        )
    # The loop above compiled once and reused the program for every dataset.
    before = lem._em._fit_compiled._cache_size()
    again = lem.fit(lem.gaussian_mixture(3, "full"), jax.random.key(7), xs[0] + 1, n_init=2)
    assert lem._em._fit_compiled._cache_size() == before
    assert int(again.n_iter) > 0


def test_eager_equals_jit(dtype, datasets):
    x = jnp.asarray(datasets[6], dtype)
    params = start_params(x, dtype)
    eager = lem.fit_em(MODEL, params, x, max_iter=5, tol=0.0)
    jitted = compiled_fit_em(MODEL, 5)(params, x, tol=0.0)
    assert_trees_all_close(eager, jitted, rtol=tight(dtype, 1e-10, 1e-5), atol=1e-6)


def test_best_restart_never_picks_nan():
    scores = jnp.array([jnp.nan, -3.0, -2.0, jnp.inf * 0])
    results = lem.EMResult(
        params=jnp.arange(4.0),
        log_likelihood=scores,
        n_iter=jnp.ones(4, jnp.int32),
        converged=jnp.array([False, True, True, False]),
        status=jnp.array([2, 0, 0, 2], jnp.int32),
        history=jnp.zeros((4, 1)),
    )
    assert float(lem._em.best_restart(results).params) == 2.0
    # Objectives equal to round-off are ties, resolved in favour of the first restart.
    nearly = jnp.array([-2.0, -2.0 + 8 * jnp.finfo(scores.dtype).eps, -5.0, -2.0])
    assert float(lem._em.best_restart(results._replace(log_likelihood=nearly)).params) == 0.0
    apart = jnp.array([-2.0, -1.999, -5.0, -2.0])
    assert float(lem._em.best_restart(results._replace(log_likelihood=apart)).params) == 1.0


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def test_zero_weight_equals_removal(dtype, datasets):
    x = jnp.asarray(datasets[0], dtype)
    params = start_params(x, dtype)
    weights = jnp.ones(x.shape[0], dtype).at[::4].set(0.0)
    keep = np.flatnonzero(np.asarray(weights) > 0)
    weighted = compiled_fit_em(MODEL, 30)(params, x, weights=weights, tol=0.0)
    removed = compiled_fit_em(MODEL, 30)(params, x[keep], tol=0.0)
    rtol = tight(dtype, 1e-9, 1e-4)
    assert_trees_all_close(weighted.params, removed.params, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(weighted.history, removed.history, rtol=rtol)


def test_zero_weight_row_with_garbage_log_likelihood_is_ignored(dtype):
    """A zero-weight sample with log p = -inf must not turn the objective or params into NaN."""
    model = poisson_mixture(2)
    x = jnp.asarray([[0.0, 0.0], [1.0, 1.0], [4.0, 0.0], [5.0, 0.0], [3.0, 0.0]], dtype)
    # The second feature has rate 0 in both components: row 1 is impossible (log p = -inf).
    params = PoissonParams(jnp.asarray([0.5, 0.5], dtype), jnp.asarray([[0.5, 0.0], [4.0, 0.0]], dtype))
    assert np.isneginf(float(lem.score_samples(model, params, x)[1]))
    weights = jnp.asarray([1, 0, 1, 1, 1], dtype)
    new_params, objective = lem.em_step(model, params, x, weights)
    assert np.isfinite(float(objective)) and bool(lem._base.tree_all_finite(new_params))
    kept = np.array([0, 2, 3, 4])
    removed_params, removed_objective = lem.em_step(model, params, x[kept])
    np.testing.assert_allclose(float(objective), float(removed_objective), rtol=tight(dtype, 1e-12, 1e-6))
    assert_trees_all_close(new_params, removed_params, rtol=tight(dtype, 1e-12, 1e-6))


def test_integer_weight_equals_repetition(dtype, datasets):
    x = jnp.asarray(datasets[1], dtype)
    params = start_params(x, dtype)
    counts = np.random.default_rng(0).integers(0, 4, x.shape[0])
    weighted = compiled_fit_em(MODEL, 30)(params, x, weights=jnp.asarray(counts, dtype), tol=0.0)
    repeated = compiled_fit_em(MODEL, 30)(params, jnp.repeat(x, counts, axis=0), tol=0.0)
    rtol = tight(dtype, 1e-9, 1e-4)
    assert_trees_all_close(weighted.params, repeated.params, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(weighted.log_likelihood, repeated.log_likelihood, rtol=rtol)


class PoissonParams(NamedTuple):
    weights: jax.Array
    rates: jax.Array


@functools.lru_cache
def poisson_mixture(n_components, prior_shape=None, prior_rate=None):
    """Poisson mixture; with a Gamma(shape, rate) prior on each rate it does MAP-EM."""

    def log_joint(params, x):
        log_rates = jnp.log(params.rates)
        # x log(rate) with 0 log 0 = 0, so that a zero rate explains zero counts.
        terms = jnp.where(x[:, None, :] > 0, x[:, None, :] * log_rates[None, :, :], 0.0)
        log_p = terms.sum(2) - params.rates.sum(1)[None, :] - gammaln(x + 1).sum(1)[:, None]
        return log_p + jnp.log(params.weights)[None, :]

    def m_step(x, responsibilities, params):
        counts = responsibilities.sum(0)
        if prior_shape is None:
            rates = responsibilities.T @ x / counts[:, None]
        else:
            rates = (responsibilities.T @ x + prior_shape - 1) / (counts[:, None] + prior_rate)
        return PoissonParams(counts / counts.sum(), rates)

    def init(key, x, weights):
        responsibilities = jax.random.dirichlet(key, jnp.ones(n_components, x.dtype), (x.shape[0],))
        return m_step(x, responsibilities * weights[:, None], None)

    def log_prior(params):
        return jnp.sum((prior_shape - 1) * jnp.log(params.rates) - prior_rate * params.rates)

    return lem.LatentModel(
        init=init, log_joint=log_joint, m_step=m_step, log_prior=None if prior_shape is None else log_prior
    )


def test_map_em_objective_includes_prior_and_never_decreases(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.poisson(np.where(rng.random(300) < 0.4, 9.0, 2.0)[:, None], (300, 3)), dtype)
    model = poisson_mixture(2, prior_shape=3.0, prior_rate=0.5)
    params = model.init(jax.random.key(0), x, jnp.ones(300, dtype))
    result = jax.jit(functools.partial(lem.fit_em, model, max_iter=40))(params, x, tol=0.0)
    history = np.asarray(result.history, np.float64)
    assert np.all(np.diff(history) >= -64 * np.finfo(dtype).eps * np.abs(history).max())
    # Independent check of the reported objective with SciPy densities.
    weights, rates = (np.asarray(a, np.float64) for a in result.params)
    x64 = np.asarray(x, np.float64)
    joint = np.log(weights)[None, :] + np.stack(
        [stats.poisson(rates[k]).logpmf(x64).sum(1) for k in range(2)], axis=1
    )
    # Our log prior drops the Gamma normaliser a log b - log Gamma(a) of each rate.
    normaliser = 3.0 * np.log(0.5) - special.gammaln(3.0)
    log_prior = (stats.gamma(3.0, scale=1 / 0.5).logpdf(rates) - normaliser).sum()
    expected = (np.logaddexp.reduce(joint, axis=1).sum() + log_prior) / 300
    np.testing.assert_allclose(float(result.log_likelihood), expected, rtol=tight(dtype, 1e-10, 1e-5))
    # The MAP rates differ from the maximum-likelihood ones in the direction of the prior mode.
    ml = jax.jit(functools.partial(lem.fit_em, poisson_mixture(2), max_iter=40))(params, x, tol=0.0)
    assert not np.allclose(np.asarray(ml.params.rates), rates, rtol=1e-6)


def test_data_captured_by_a_traced_function(dtype, datasets):
    """Concrete data closed over by a jitted function: checks that need values are skipped."""
    x = jnp.asarray(datasets[0], dtype)
    params = start_params(x, dtype)
    stepped, objective = jax.jit(lambda p: lem.em_step(MODEL, p, x))(params)
    eager, eager_objective = lem.em_step(MODEL, params, x)
    assert_trees_all_close(stepped, eager, rtol=tight(dtype, 1e-12, 1e-5), atol=tight(dtype, 1e-12, 1e-5))
    np.testing.assert_allclose(float(objective), float(eager_objective), rtol=tight(dtype, 1e-12, 1e-6))


@pytest.mark.parametrize(("tier", "n_per_cluster"), [("tuned", 150), ("quick", 3000), ("quickest", 150)])
def test_tuned_compile_gives_the_same_fit_as_jax_jit(dtype, tier, n_per_cluster):
    """lem.jit's XLA options (lem.compiler_options for large problems, quicker LLVM
    optimisation levels for small and tiny ones) change speed, not results."""
    x = jnp.asarray(blobs(3, n_per_cluster), dtype)
    params = MODEL.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))
    fit = functools.partial(lem.fit_em, MODEL, max_iter=30, tol=0.0)
    compiled = lem.jit(
        fit,
        tune_if=lambda *args: tier == "tuned",
        quick_compile=True,
        tiny_if=lambda *args: n_per_cluster < 1000,
    )
    assert compiled._tier((params, x), {}) == tier
    ours = compiled(params, x)
    plain = jax.jit(fit)(params, x)
    assert_trees_all_close(ours.params, plain.params, rtol=tight(dtype, 1e-9, 1e-4), atol=1e-6)
    np.testing.assert_allclose(
        float(ours.log_likelihood), float(plain.log_likelihood), rtol=tight(dtype, 1e-12, 1e-6)
    )
    options = lem.compiler_options()
    assert isinstance(options, dict)
    options["changed"] = "by the caller"
    assert "changed" not in lem.compiler_options()


def test_quick_tiers_take_the_loop_emitters_where_xla_has_them():
    base = lem._base
    on_cpu = jax.default_backend() == "cpu" and base._jit_takes_compiler_options()
    has_loop_emitters = on_cpu and base._options_supported(tuple(base._LOOP_EMITTER_OPTIONS.items()))
    for level, tier_options in ((1, base._QUICK_COMPILE_OPTIONS), (0, base._QUICKEST_COMPILE_OPTIONS)):
        expected = {"xla_backend_optimization_level": level} if on_cpu else {}
        if has_loop_emitters:
            expected["xla_cpu_use_fusion_emitters"] = False
        assert base._quick_options(tier_options) == expected


@pytest.mark.parametrize("n_samples", [300, 70_000], ids=["small", "large"])
def test_fit_inside_a_user_jit_compiles_without_options(dtype, n_samples):
    """jax.jit takes compiler options only at the top level: lem.fit called inside a
    user's jit (tuned for large data, quick-compile for small) must not pass them."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n_samples, 8)), dtype)
    assert lem._base.large_problem(x) == (n_samples > 1000)
    fit = functools.partial(lem.fit, MODEL, max_iter=2, tol=1e-30)
    inside = jax.jit(lambda x: fit(jax.random.key(0), x))(x)
    with pytest.warns(lem.ConvergenceWarning, match="MAX_ITER"):  # eager fits warn
        outside = fit(jax.random.key(0), x)
    np.testing.assert_allclose(
        float(inside.log_likelihood), float(outside.log_likelihood), rtol=tight(dtype, 1e-10, 1e-5)
    )


def test_only_large_fits_pay_for_tuned_compilation(dtype, datasets):
    small = np.zeros((1000, 8))
    large = np.zeros((100_000, 8))
    assert not lem._base.large_problem(small)
    assert lem._base.large_problem(large)
    assert lem._base.large_problem(small, n_fits=100)
    # A tiny fit compiles (or reuses) the program of the quickest compile.
    lem.fit(MODEL, jax.random.key(0), jnp.asarray(datasets[0], dtype))
    assert "quickest" in lem._em._fit_compiled._variants

    def tier(n_samples, n_init=1):
        x = jnp.zeros((n_samples, 8), dtype)
        args = (MODEL, jax.random.key(0), x, jnp.ones(n_samples, dtype), 1e-3)
        return lem._em._fit_compiled._tier(args, {"n_init": n_init, "max_iter": 100, "callback": None})

    assert [tier(1000), tier(1000, n_init=5), tier(5000), tier(100_000), tier(1000, n_init=100)] == [
        "quickest",
        "quick",
        "quick",
        "tuned",
        "tuned",
    ]
    assert lem._base.tiny_problem(small) and not lem._base.tiny_problem(small, n_fits=5)


def misshapen_model(case: str) -> lem.LatentModel:
    """A built-in model with one output in the wrong shape."""
    if case == "column log-likelihood":
        ppca = lem.ppca(1)

        def column_posterior(params, x):
            posterior, log_likelihood = ppca.posterior(params, x)
            return posterior, log_likelihood[:, None]

        return lem.LatentModel(**{**ppca._asdict(), "posterior": column_posterior})
    mixture = lem.gaussian_mixture(2, "diag")
    transposed = lem.LatentModel(
        **{
            **mixture._asdict(),
            "log_joint": lambda params, x: mixture.log_joint(params, x).T,
            "fused_step": None,
            "fused_prepare": None,
        }
    )
    return lem.hard_em(transposed) if case == "hard EM, states-first log joint" else transposed


@pytest.mark.parametrize(
    "case, pattern",
    [
        (
            "states-first log joint",
            r"log_joint must return shape \(n_samples, n_states\) = \(120, n_states\); got \(2, 120\)",
        ),
        ("hard EM, states-first log joint", r"log_joint must return shape .* got \(2, 120\)"),
        ("column log-likelihood", r"log_likelihood of shape \(n_samples,\) = \(120,\).*got \(120, 1\)"),
    ],
    ids=["states-first", "hard-em", "column"],
)
def test_misshapen_outputs_of_a_custom_model_are_refused_while_tracing(dtype, case, pattern):
    """Shapes are static: a log joint states-first, or a posterior's log-likelihood as a
    column, get a ValueError naming the function. The column used to broadcast against
    the weights into an (n, n) objective: fits 'converged' to numbers n times too large."""
    x = jnp.asarray(blobs(0, n_per_cluster=40), dtype)
    model = misshapen_model(case)
    params = model.init(jax.random.key(0), x, jnp.ones(x.shape[0], dtype))
    calls = [
        lambda: lem.fit(model, jax.random.key(0), x),
        lambda: lem.fit_em(model, params, x),
        lambda: jax.jit(functools.partial(lem.fit_em, model))(params, x),
        lambda: lem.em_step(model, params, x),
        lambda: lem.e_step(model, params, x),
        lambda: lem.score(model, params, x),
        lambda: lem.bic(model, params, x),
        lambda: lem.fit_gradient(model, params, x, optax.adam(0.1), num_steps=2),
    ]
    if model.log_joint is not None:
        calls.append(lambda: lem.predict(model, params, x))
    for call in calls:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_eager_fit_em_warns_on_a_bad_status_and_traced_fit_em_does_not(dtype):
    """Eager entry points turn a bad status into a warning; fit_em is one when called
    eagerly, and stays silent inside a transformation (the status is in the result)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((200, 2)), dtype)
    params = MODEL.init(jax.random.key(0), x, jnp.ones(200, dtype))
    with pytest.warns(lem.ConvergenceWarning, match=r"max_iter=2 iterations \(Status.MAX_ITER\)"):
        eager = lem.fit_em(MODEL, params, x, max_iter=2, tol=1e-30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = jax.jit(functools.partial(lem.fit_em, MODEL, max_iter=2, tol=1e-30))(params, x)
    assert int(eager.status) == int(traced.status) == lem.Status.MAX_ITER
    far = params._replace(means=params.means.at[2].set(1e3))  # a component no sample reaches
    with pytest.warns(lem.ConvergenceWarning, match="EMPTY_COMPONENT"):
        assert int(lem.fit_em(MODEL, far, x).status) == lem.Status.EMPTY_COMPONENT


def test_tol_zero_asks_for_max_iter_iterations_without_a_warning(dtype):
    """tol=0 runs exactly max_iter iterations: MAX_ITER is what was asked for, not a
    failure to converge. Classification EM still stops at its fixed point with tol=0,
    so for it MAX_ITER does warn."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((200, 2)), dtype)
    params = MODEL.init(jax.random.key(0), x, jnp.ones(200, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(lem.fit_em(MODEL, params, x, max_iter=2, tol=0.0).status) == lem.Status.MAX_ITER
        assert int(lem.fit(MODEL, jax.random.key(0), x, max_iter=2, tol=0).status) == lem.Status.MAX_ITER
        batch = lem.fit_batch(MODEL, jax.random.key(0), x[None], max_iter=2, tol=0.0)
        assert int(batch.status[0]) == lem.Status.MAX_ITER
    kmeans = lem.kmeans(3)
    with pytest.warns(lem.ConvergenceWarning, match="MAX_ITER"):
        result = lem.fit(kmeans, jax.random.key(0), x, max_iter=1, tol=0.0)
    assert int(result.status) == lem.Status.MAX_ITER


def test_entry_points_refuse_what_is_not_a_model_and_a_tol_that_is_not_a_scalar(dtype):
    x = np.random.default_rng(0).standard_normal((50, 2)).astype(dtype)
    calls = {
        "fit": lambda model, **kw: lem.fit(model, jax.random.key(0), x, **kw),
        "fit_em": lambda model, **kw: lem.fit_em(
            model, MODEL.init(jax.random.key(0), x, np.ones(50)), x, **kw
        ),
        "fit_batch": lambda model, **kw: lem.fit_batch(model, jax.random.key(0), x[None], **kw),
        "fit_gradient": lambda model, **kw: lem.fit_gradient(
            model, MODEL.init(jax.random.key(0), x, np.ones(50)), x, optax.adam(0.1), **kw
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name} needs a LatentModel, e.g. lem.gaussian_mixture"):
            call("gmm")
        with pytest.raises(ValueError, match=r"tol must be a scalar; got an array of shape \(2,\)"):
            call(MODEL, tol=np.array([1e-3, 1e-3]))
