"""latentem.sklearn.GaussianMixture against scikit-learn's GaussianMixture.

The reference is scikit-learn itself: from the same initial parameters both must give
the same fitted attributes, iteration counts, lower bounds and scores (to round-off in
float64). check_estimator runs on the default estimator.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from helpers import blobs, is_x64
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as ReferenceMixture
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import latentem as lem
from latentem.sklearn import GaussianMixture

# Checks of scikit-learn's check_estimator that this estimator cannot pass, with the
# reason. None at present: keep the mapping so that a future exception is documented.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}

N_COMPONENTS = 3


def rtol() -> float:
    # float64 promises scikit-learn's results to 1e-6; float32 carries ~1e-7 round-off,
    # amplified over the iterations.
    return 1e-6 if is_x64() else 1e-4


@functools.lru_cache(maxsize=1)
def data() -> np.ndarray:
    return blobs(0, n_per_cluster=60)


def initial_params(covariance_type: str) -> dict:
    """Initial weights, means and precisions shared by both estimators."""
    x = data()
    rng = np.random.default_rng(1)
    means = x[rng.choice(x.shape[0], N_COMPONENTS, replace=False)]
    precisions = {
        "full": np.stack([np.eye(2), 0.5 * np.eye(2) + 0.1, np.diag([1.0, 2.0])]),
        "tied": np.array([[1.0, 0.2], [0.2, 0.5]]),
        "diag": rng.uniform(0.5, 2.0, (N_COMPONENTS, 2)),
        "spherical": rng.uniform(0.5, 2.0, N_COMPONENTS),
    }[covariance_type]
    return {
        "weights_init": np.array([0.2, 0.3, 0.5]),
        "means_init": means,
        "precisions_init": precisions,
    }


def fitted_pair(covariance_type: str, **options) -> tuple[GaussianMixture, ReferenceMixture]:
    settings = dict(
        n_components=N_COMPONENTS, covariance_type=covariance_type, tol=1e-4, max_iter=200, random_state=0
    )
    settings.update(initial_params(covariance_type), **options)
    x = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture(**settings).fit(x)
        reference = ReferenceMixture(**settings).fit(x)
    return ours, reference


ATTRIBUTES = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")


def assert_same_fit(ours: GaussianMixture, reference: ReferenceMixture) -> None:
    for name in ATTRIBUTES:
        np.testing.assert_allclose(
            getattr(ours, name), getattr(reference, name), rtol=rtol(), atol=rtol(), err_msg=name
        )
    assert ours.n_iter_ == reference.n_iter_
    assert ours.converged_ == reference.converged_
    np.testing.assert_allclose(ours.lower_bound_, reference.lower_bound_, rtol=rtol(), atol=0)
    np.testing.assert_allclose(ours.lower_bounds_, reference.lower_bounds_, rtol=rtol(), atol=0)


# ---------------------------------------------------------------------------
# scikit-learn's own conformance checks
# ---------------------------------------------------------------------------


def test_check_estimator():
    # Every check runs; a failure not listed in EXPECTED_FAILED_CHECKS raises.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(GaussianMixture(), expected_failed_checks=EXPECTED_FAILED_CHECKS)
    statuses = {result["check_name"]: result["status"] for result in results}
    assert statuses["check_fit_idempotent"] == "passed"
    assert statuses["check_estimators_pickle"] == "passed"
    assert all(status in ("passed", "skipped", "xfail") for status in statuses.values()), statuses


# ---------------------------------------------------------------------------
# Same results as scikit-learn from the same initial parameters
# ---------------------------------------------------------------------------


def test_matches_scikit_learn_from_same_initial_params(covariance_type):
    ours, reference = fitted_pair(covariance_type)
    assert reference.converged_  # the comparison covers the stopping rule
    assert_same_fit(ours, reference)
    x = data()
    new_x = x[::7] + 0.25
    np.testing.assert_array_equal(ours.predict(new_x), reference.predict(new_x))
    np.testing.assert_allclose(ours.predict_proba(new_x), reference.predict_proba(new_x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.score_samples(new_x), reference.score_samples(new_x), rtol=rtol())
    np.testing.assert_allclose(ours.score(x), reference.score(x), rtol=rtol())
    np.testing.assert_allclose(ours.bic(x), reference.bic(x), rtol=rtol())
    np.testing.assert_allclose(ours.aic(x), reference.aic(x), rtol=rtol())


def test_expanded_moments_match_scikit_learn():
    ours, reference = fitted_pair("full")
    settings = {**ours.get_params(), "moments": "expanded"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        expanded = GaussianMixture(**settings).fit(data())
    # The fit took the expanded iteration, not its centred fallback, to the end.
    gm = sys.modules["latentem.models.gaussian_mixture"]
    x = jax.numpy.asarray(data(), expanded._params().means.dtype)
    factor = gm.precision_cholesky(expanded._params().covariances, "full")
    assert bool(gm._expanded_accurate(expanded._params(), x.mean(0), factor))
    assert_same_fit(expanded, reference)


def test_max_iter_and_warm_start_match_scikit_learn():
    # Three iterations do not converge: same iterates, n_iter_, lower bounds and warning.
    ours, reference = fitted_pair("full", max_iter=3, warm_start=True)
    assert not reference.converged_
    assert_same_fit(ours, reference)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        ours.fit(data())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference.fit(data())
    # The second fit continued from the first one's parameters in both.
    assert_same_fit(ours, reference)


def test_fit_predict_is_fit_then_predict():
    ours, _ = fitted_pair("diag")
    x = data()
    labels = GaussianMixture(**ours.get_params()).fit_predict(x)
    np.testing.assert_array_equal(labels, ours.predict(x))


# ---------------------------------------------------------------------------
# Sample weights
# ---------------------------------------------------------------------------


def test_sample_weight_is_repetition_and_zero_is_removal():
    x = data()
    counts = np.random.default_rng(2).integers(0, 3, x.shape[0])
    counts[:N_COMPONENTS] = 1
    settings = dict(
        n_components=N_COMPONENTS, covariance_type="spherical", tol=1e-4, **initial_params("spherical")
    )
    weighted = GaussianMixture(**settings).fit(x, sample_weight=counts.astype(np.float64))
    repeated = ReferenceMixture(**settings).fit(np.repeat(x, counts, axis=0))
    for name in ATTRIBUTES:
        np.testing.assert_allclose(
            getattr(weighted, name), getattr(repeated, name), rtol=rtol(), atol=rtol(), err_msg=name
        )
    assert weighted.n_iter_ == repeated.n_iter_


# ---------------------------------------------------------------------------
# Ecosystem: pipelines, grid search, pickling, parameters
# ---------------------------------------------------------------------------


def test_pipeline_and_grid_search_choose_three_components():
    x = data()
    pipeline = Pipeline([("scale", StandardScaler()), ("mixture", GaussianMixture(random_state=0, n_init=2))])
    # Two folds of 90 samples share one padded size, hence one compiled fit per candidate.
    search = GridSearchCV(pipeline, {"mixture__n_components": [1, 3]}, cv=2)
    search.fit(x)
    assert search.best_params_ == {"mixture__n_components": 3}
    best = search.best_estimator_
    scaled = best.named_steps["scale"].transform(x)
    np.testing.assert_allclose(search.score(x), best.named_steps["mixture"].score(scaled), rtol=1e-6)


def test_pickle_round_trip():
    ours, _ = fitted_pair("tied")
    restored = pickle.loads(pickle.dumps(ours))
    for name in (*ATTRIBUTES, "lower_bounds_"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(ours, name))
    x = data()
    np.testing.assert_array_equal(restored.predict_proba(x), ours.predict_proba(x))
    assert restored.n_iter_ == ours.n_iter_ and restored.converged_ == ours.converged_
    np.testing.assert_array_equal(restored.means_init, ours.means_init)


def test_parameters_are_scikit_learns():
    defaults = ReferenceMixture().get_params()
    ours = GaussianMixture().get_params()
    assert ours.pop("reg_covar_mode") == "absolute"
    assert ours.pop("moments") == "auto"
    assert ours == defaults
    model = GaussianMixture(3, covariance_type="diag", init_params="kmeans")._fit_model()
    assert model is lem.gaussian_mixture(3, "diag", 1e-6, "kmeans++", "absolute")
    model = GaussianMixture(3, moments="expanded")._fit_model()
    assert model is lem.gaussian_mixture(3, "full", 1e-6, "kmeans++", "absolute", "expanded")
    for name, init in [
        ("k-means++", "kmeans++"),
        ("random", "random"),
        ("random_from_data", "random_from_data"),
    ]:
        assert GaussianMixture(init_params=name)._fit_model() is lem.gaussian_mixture(
            1, "full", 1e-6, init, "absolute"
        )


def test_sample_is_grouped_and_reproducible():
    ours, _ = fitted_pair("full")
    x, labels = ours.sample(3000)
    assert x.shape == (3000, 2) and labels.shape == (3000,)
    assert np.all(np.diff(labels) >= 0)
    x_again, _ = ours.sample(3000)
    np.testing.assert_array_equal(x, x_again)  # an int random_state gives the same draw
    # Component frequencies follow the weights (binomial standard error < 0.01).
    np.testing.assert_allclose(np.bincount(labels, minlength=3) / 3000, ours.weights_, rtol=0, atol=0.04)


def test_errors_say_what_to_change():
    x = data()
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixture(n_components=5).fit(x[:4])
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(covariance_type="round").fit(x)
    with pytest.raises(ValueError, match="means_init must have shape"):
        GaussianMixture(n_components=2, means_init=np.zeros((3, 2))).fit(x)
    with pytest.raises(ValueError, match="init_params"):
        GaussianMixture(init_params="best").fit(x)
    with pytest.raises(ValueError, match="moments"):
        GaussianMixture(moments="fast").fit(x)
    with pytest.raises(ValueError, match='moments="expanded" is for covariance_type "full", "diag" or'):
        GaussianMixture(covariance_type="tied", moments="expanded").fit(x)
    with pytest.raises(ValueError, match="n_samples"):
        fitted_pair("diag")[0].sample(0)
    # Initial values as scikit-learn's checks take them: finite, weights summing to one.
    with pytest.raises(ValueError, match="means_init has NaN or infinite entries"):
        GaussianMixture(n_components=2, means_init=[[np.nan, 0.0], [5.0, 5.0]]).fit(x)
    for covariance_type, precisions in [
        ("spherical", [np.inf, 1.0]),
        ("diag", [[1.0, np.nan], [1.0, 1.0]]),
        ("full", np.stack([np.eye(2), np.full((2, 2), np.inf)])),
    ]:
        with pytest.raises(ValueError, match="precisions_init has NaN or infinite entries"):
            GaussianMixture(2, covariance_type=covariance_type, precisions_init=precisions).fit(x)
    with pytest.raises(ValueError, match=r"sum to 1 \(within 1e-08\).*sum 1.00001"):
        GaussianMixture(n_components=2, weights_init=[0.5, 0.50001]).fit(x)
    with pytest.raises(ValueError, match="weights_init must be an array of numbers"):
        GaussianMixture(n_components=2, weights_init=["a", "b"]).fit(x)
    GaussianMixture(n_components=2, weights_init=np.array([0.5, 0.5000005], np.float32), max_iter=1).fit(x)


def test_a_fit_whose_every_restart_collapses_raises_like_scikit_learn():
    # Two groups of fifty identical points: with reg_covar=0 every start (k-means++ puts
    # one centre on each group) gives both components an exactly zero covariance.
    # scikit-learn raises; the estimator must raise too, not return NaN scores.
    x = np.concatenate([np.ones((50, 2)), np.full((50, 2), 5.0)])
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        ReferenceMixture(2, reg_covar=0.0).fit(x)
    for n_init in (1, 3):
        with pytest.raises(ValueError, match="every restart's objective or parameters became NaN"):
            GaussianMixture(2, reg_covar=0.0, n_init=n_init, random_state=n_init).fit(x)


def test_a_collapse_that_round_off_decides_ends_in_the_error_or_a_warning_never_in_nan():
    # Fifty identical points beside a Gaussian cloud, reg_covar=0: the cloud's points give
    # the collapsing component tiny responsibilities, so its covariance is positive but
    # shrinks each iteration until round-off decides the end. Either it reaches zero (the
    # error above) or it falls below the rounding of its own mean, loses its points and
    # ends EMPTY_COMPONENT; which one comes first differs between CPUs (CI saw the second).
    # Either way the estimator says so, and never keeps NaN.
    x = np.concatenate([np.ones((50, 2)), np.random.default_rng(0).normal(5.0, 1.0, (50, 2))])
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        ReferenceMixture(2, reg_covar=0.0, means_init=[[1.0, 1.0], [5.0, 5.0]]).fit(x)
    for n_init in (1, 3):
        estimator = GaussianMixture(2, reg_covar=0.0, n_init=n_init, means_init=[[1.0, 1.0], [5.0, 5.0]])
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                estimator.fit(x)
        except ValueError as error:
            assert "every restart's objective or parameters became NaN" in str(error)
            continue
        assert any("ended with no samples" in str(warning.message) for warning in caught)
        assert np.isfinite(estimator.lower_bound_)
        assert np.isfinite(estimator.score_samples(x)).all()
        for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
            assert np.isfinite(getattr(estimator, name)).all(), name


def test_an_empty_component_warns_and_keeps_finite_parameters():
    # A third initial mean far from every sample: its responsibilities underflow to zero,
    # the fit stops with EMPTY_COMPONENT (README's status table), and the estimator warns
    # and keeps the empty component's previous, finite parameters.
    x = np.random.default_rng(0).normal(0.0, 1.0, (100, 2))
    estimator = GaussianMixture(3, means_init=[[0.0, 0.0], [1.0, 1.0], [1e3, 1e3]])
    with pytest.warns(ConvergenceWarning, match="ended with no samples"):
        estimator.fit(x)
    assert estimator.weights_[2] == 0
    np.testing.assert_array_equal(estimator.means_[2], [1e3, 1e3])
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.isfinite(getattr(estimator, name)).all(), name
    scores = estimator.score_samples(x)
    assert np.isfinite(scores).all() and np.isfinite(estimator.lower_bound_)
    # Two live components: the scores are those of the two-component mixture they form.
    live = slice(0, 2)
    reference = np.log(
        sum(
            w * multivariate_normal(m, c).pdf(x)
            for w, m, c in zip(
                estimator.weights_[live], estimator.means_[live], estimator.covariances_[live], strict=True
            )
        )
    )
    np.testing.assert_allclose(scores, reference, rtol=1e-5)


# ---------------------------------------------------------------------------
# Progress from inside the compiled loop
# ---------------------------------------------------------------------------


def test_progress_callback_is_off_by_default_and_reports_every_iteration():
    x = data()
    model = lem.gaussian_mixture(N_COMPONENTS, "diag")
    key = jax.random.key(0)
    calls = []
    callback = lambda iteration, objective: calls.append((int(iteration), float(objective)))
    # Off: nothing of the callback reaches the compiled program.
    without = str(jax.make_jaxpr(functools.partial(lem.fit, model, tol=1e-4))(key, x))
    with_callback = str(
        jax.make_jaxpr(functools.partial(lem.fit, model, tol=1e-4, callback=callback))(key, x)
    )
    assert "callback" not in without and "callback" in with_callback
    assert not calls  # tracing alone reports nothing
    # On: one call per iteration, in order, with the objective after it (iteration 0:
    # the initial parameters, which EM only improves).
    result = lem.fit(model, key, x, tol=1e-4, callback=callback)
    jax.effects_barrier()
    n_iter = int(result.n_iter)
    assert n_iter >= 3
    assert [iteration for iteration, _ in calls] == list(range(n_iter + 1))
    np.testing.assert_allclose([value for _, value in calls[1:]], result.history[:n_iter], rtol=1e-6)
    assert calls[0][1] <= calls[1][1]


def test_verbose_prints_scikit_learns_messages():
    settings = dict(
        n_components=N_COMPONENTS,
        covariance_type="full",
        tol=1e-4,
        max_iter=200,
        verbose=2,
        verbose_interval=2,
        **initial_params("full"),
    )
    outputs = []
    for estimator in (GaussianMixture(**settings), ReferenceMixture(**settings)):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            estimator.fit(data())
            jax.effects_barrier()
        outputs.append(buffer.getvalue().splitlines())
    ours, reference = outputs

    def iterations(lines):
        return [(line.split()[1], float(line.rsplit(" ", 1)[1])) for line in lines if "Iteration" in line]

    assert ours[0] == reference[0] == "Initialization 0"
    assert [n for n, _ in iterations(ours)] == [n for n, _ in iterations(reference)]
    assert len(iterations(ours)) >= 3
    np.testing.assert_allclose(
        [change for _, change in iterations(ours)],
        [change for _, change in iterations(reference)],
        rtol=1e-3,
        atol=2e-5,
    )
    assert ours[-1].startswith("Initialization converged.") and reference[-1].startswith(
        "Initialization converged."
    )


def test_importing_latentem_imports_neither_sklearn_nor_matplotlib():
    code = (
        "import sys, latentem, latentem.plot; "
        "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"
