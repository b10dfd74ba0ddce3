"""Model selection: BIC, AIC and held-out likelihood, against scikit-learn and single fits.

The data are four well-separated clusters; every selection here compiles once (one
program per criterion and shape), so the candidate range is kept short.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture
from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

import latentem as lem
from latentem._select import _select_compiled
from tests.helpers import assert_trees_all_close, blobs, is_x64

CENTRES = ((0.0, 0.0), (8.0, 0.0), (0.0, 8.0), (8.0, 8.0))
CANDIDATES = (1, 2, 3, 4, 5, 6)
N_INIT = 20  # many restarts: the training likelihood of the best restart rises with K
KEY = jax.random.key(2024)


def float_dtype():
    return np.float64 if is_x64() else np.float32


def rtol():
    """Single-program results against separate fits: round-off only."""
    return 1e-12 if is_x64() else 2e-4


def training_data(seed=0):
    return blobs(seed, 50, CENTRES).astype(float_dtype())  # 200 x 2


def validation_data():
    return blobs(100, 500, CENTRES).astype(float_dtype())  # 2000 x 2


def sklearn_mixture(n_components, covariance_type, params):
    """scikit-learn's GaussianMixture holding our fitted parameters."""
    gm = GaussianMixture(n_components, covariance_type=covariance_type)
    gm.weights_ = np.asarray(params.weights, np.float64)
    gm.means_ = np.asarray(params.means, np.float64)
    gm.covariances_ = np.asarray(params.covariances, np.float64)
    gm.precisions_cholesky_ = _compute_precision_cholesky(gm.covariances_, covariance_type)
    return gm


@pytest.fixture(scope="module")
def bic_result():
    return lem.select_n_components(KEY, training_data(), CANDIDATES, criterion="bic", n_init=N_INIT)


@pytest.fixture(scope="module")
def heldout_result():
    return lem.select_n_components(
        KEY, training_data(), CANDIDATES, criterion="heldout", x_validation=validation_data(), n_init=N_INIT
    )


# ---------------------------------------------------------------------------
# The tutorial's argument
# ---------------------------------------------------------------------------


def test_bic_and_heldout_both_choose_four(bic_result, heldout_result):
    assert int(bic_result.best_n_components) == 4
    assert int(heldout_result.best_n_components) == 4
    # scikit-learn, fitted independently, picks the same by BIC.
    x = np.asarray(training_data(), np.float64)
    sklearn_bic = [GaussianMixture(k, n_init=5, random_state=0).fit(x).bic(x) for k in CANDIDATES]
    assert CANDIDATES[int(np.argmin(sklearn_bic))] == 4


def test_heldout_likelihood_peaks_while_training_likelihood_keeps_rising(heldout_result):
    training = np.asarray(heldout_result.log_likelihood)
    held_out = np.asarray(heldout_result.score)
    # Training: every extra component fits the sample a little better...
    assert np.all(np.diff(training) > 0), training
    # ...held-out: up to the true four, then worse on new data from the same source.
    peak = CANDIDATES.index(4)
    assert int(np.argmax(held_out)) == peak, held_out
    assert np.all(np.diff(held_out[: peak + 1]) > 0), held_out
    assert np.all(held_out[peak + 1 :] < held_out[peak]), held_out
    # The gap between the two widens past the peak: overfitting.
    gap = training - held_out
    assert gap[-1] > gap[peak], gap


def test_scores_match_scikit_learn_at_the_chosen_params(bic_result, heldout_result):
    x = np.asarray(training_data(), np.float64)
    tolerance = 1e-10 if is_x64() else 1e-5
    n_components, covariance_type, params = bic_result.chosen()
    assert (n_components, covariance_type) == (4, "full")
    gm = sklearn_mixture(n_components, covariance_type, params)
    np.testing.assert_allclose(float(bic_result.score[bic_result.best]), gm.bic(x), rtol=tolerance)
    np.testing.assert_allclose(float(bic_result.log_likelihood[bic_result.best]), gm.score(x), rtol=tolerance)
    # AIC from the same table: the same likelihood, the other penalty.
    n_parameters = int(bic_result.n_parameters[bic_result.best])
    assert n_parameters == gm._n_parameters()
    np.testing.assert_allclose(-2 * gm.score(x) * x.shape[0] + 2 * n_parameters, gm.aic(x), rtol=1e-12)

    n_components, covariance_type, params = heldout_result.chosen()
    gm = sklearn_mixture(n_components, covariance_type, params)
    np.testing.assert_allclose(
        float(heldout_result.score[heldout_result.best]),
        gm.score(np.asarray(validation_data(), np.float64)),
        rtol=tolerance,
    )
    # The padded params in the result score the same with the largest model.
    padded = lem.score(lem.gaussian_mixture(CANDIDATES[-1]), heldout_result.params, validation_data())
    np.testing.assert_allclose(
        float(padded), float(heldout_result.score[heldout_result.best]), rtol=tolerance
    )


def test_padded_params_switch_extra_components_off(bic_result):
    weights = np.asarray(bic_result.params.weights)
    assert weights.shape == (CANDIDATES[-1],)
    np.testing.assert_array_equal(weights[4:], 0.0)
    assert np.all(weights[:4] > 0)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(bic_result.params))
    rows = bic_result.table()
    assert [row["n_components"] for row in rows] == list(CANDIDATES)
    assert [row["best"] for row in rows] == [k == 4 for k in CANDIDATES]


# ---------------------------------------------------------------------------
# One program for all candidates equals one fit per candidate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_components", [5])
def test_each_candidate_equals_its_own_fit(bic_result, n_components):
    row = CANDIDATES.index(n_components)
    key = jax.random.split(KEY, len(CANDIDATES))[row]
    model = lem.gaussian_mixture(n_components)
    solo = lem.fit(model, key, training_data(), n_init=N_INIT)
    np.testing.assert_allclose(float(bic_result.log_likelihood[row]), float(solo.log_likelihood), rtol=rtol())
    # The engine's status, judged on the candidate's own components.
    assert int(bic_result.status[row]) == int(solo.status)
    x = np.asarray(training_data(), np.float64)
    expected_bic = -2 * float(solo.log_likelihood) * x.shape[0] + model.n_parameters(solo.params) * np.log(
        200
    )
    np.testing.assert_allclose(float(bic_result.score[row]), expected_bic, rtol=rtol())


def test_statuses_are_judged_on_own_components(bic_result):
    """Switched-off components have no mass, yet no candidate reads as EMPTY_COMPONENT."""
    assert set(np.asarray(bic_result.status).tolist()) <= {lem.Status.CONVERGED, lem.Status.MAX_ITER}


# ---------------------------------------------------------------------------
# A batch of datasets
# ---------------------------------------------------------------------------


def identical_points():
    """200 copies of one point: one component fits, any more leave components empty."""
    return np.full((200, 2), 1.5, float_dtype())


@pytest.fixture(scope="module")
def batch():
    with_nan = training_data(seed=3).copy()
    with_nan[5, 0] = np.nan
    x = np.stack([training_data(seed=1), identical_points(), with_nan, training_data(seed=2)])
    keys = jax.random.split(jax.random.key(7), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lem.ConvergenceWarning)
        result = lem.select_n_components(keys, x, CANDIDATES, criterion="bic", n_init=N_INIT)
    return keys, x, result


def test_batched_selection_equals_loop_of_single_calls(batch):
    keys, x, result = batch
    assert result.score.shape == (4, len(CANDIDATES))
    for index in (0, 1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lem.ConvergenceWarning)
            single = lem.select_n_components(
                keys[index], x[index], CANDIDATES, criterion="bic", n_init=N_INIT
            )
        batched = jax.tree.map(lambda leaf, index=index: leaf[index], result)
        np.testing.assert_array_equal(batched.best, single.best)
        np.testing.assert_array_equal(batched.status, single.status)
        if index == 1:
            # One point repeated: the likelihood of a collapsed component (variance =
            # reg_covar) is ill-conditioned; for this member the statuses are the point.
            continue
        np.testing.assert_allclose(batched.score, single.score, rtol=rtol())
        np.testing.assert_allclose(batched.log_likelihood, single.log_likelihood, rtol=rtol())
        assert_trees_all_close(batched.params, single.params, rtol=rtol(), atol=rtol())


def test_batch_members_get_their_own_statuses(batch):
    _, _, result = batch
    status = np.asarray(result.status)
    np.testing.assert_array_equal(status[2], lem.Status.NONFINITE)
    assert np.all(np.isinf(np.asarray(result.score[2])))
    # One point repeated: one component fits (its switched-off padding does not count),
    # every larger candidate has components of its own left empty.
    assert status[1][0] == lem.Status.CONVERGED, status[1]
    np.testing.assert_array_equal(status[1][1:], lem.Status.EMPTY_COMPONENT)


def test_a_selection_compiles_for_its_size_as_a_fit_does(bic_result):
    """Small selections compile for a short compile, as lem.fit's do: six candidates on
    Old Faithful (four restarts) took 4.7 s of XLA compile with its default options and
    1.2 s at LLVM's level 0 (2-core CPU); large ones get lem.compiler_options."""

    def tier(n_samples, n_init):
        x = jnp.zeros((n_samples, 2), float_dtype())
        weights = jnp.ones(n_samples, float_dtype())
        args = (jax.random.split(KEY, len(CANDIDATES)), x, weights, x, weights, 1e-3)
        return _select_compiled._tier(args, {"candidates": CANDIDATES, "n_init": n_init, "batched": False})

    assert [tier(272, 4), tier(200, N_INIT), tier(50_000, 4)] == ["quickest", "quick", "tuned"]
    # The module's selection (200 samples, 20 restarts, six candidates) ran in that tier.
    assert "quick" in _select_compiled._variants


def test_second_call_reuses_the_compiled_program(bic_result):
    size = _select_compiled._cache_size()
    lem.select_n_components(KEY, training_data() + 1.0, CANDIDATES, criterion="bic", n_init=N_INIT)
    assert _select_compiled._cache_size() == size


# ---------------------------------------------------------------------------
# Several covariance types
# ---------------------------------------------------------------------------


def test_covariance_types_are_compared_as_scikit_learn_would():
    x = training_data()
    types = ("full", "spherical")
    result = lem.select_n_components(KEY, x, (4, 5), covariance_type=types, criterion="bic", n_init=5)
    assert result.params.covariances.shape == (5, 2, 2)  # full matrices when types are mixed
    assert [row["covariance_type"] for row in result.table()] == ["full"] * 2 + ["spherical"] * 2
    x64 = np.asarray(x, np.float64)
    sklearn_bic = {
        (k, t): GaussianMixture(k, covariance_type=t, n_init=5, random_state=0).fit(x64).bic(x64)
        for t in types
        for k in (4, 5)
    }
    n_components, covariance_type, params = result.chosen()
    assert (n_components, covariance_type) == min(sklearn_bic, key=sklearn_bic.get)
    assert params.covariances.shape == (4,)
    gm = sklearn_mixture(n_components, covariance_type, params)
    np.testing.assert_allclose(
        float(result.score[result.best]), gm.bic(x64), rtol=1e-10 if is_x64() else 1e-5
    )


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def test_select_rejects_bad_inputs_with_clear_messages():
    x = training_data()
    with pytest.raises(ValueError, match="criterion must be one of"):
        lem.select_n_components(KEY, x, CANDIDATES, criterion="likelihood")
    with pytest.raises(ValueError, match="needs x_validation"):
        lem.select_n_components(KEY, x, CANDIDATES, criterion="heldout")
    with pytest.raises(ValueError, match="only used with"):
        lem.select_n_components(KEY, x, CANDIDATES, x_validation=x)
    with pytest.raises(ValueError, match="sequence of numbers of components"):
        lem.select_n_components(KEY, x, 4)
    with pytest.raises(ValueError, match="empty"):
        lem.select_n_components(KEY, x, [])
    with pytest.raises(ValueError, match="each candidate"):
        lem.select_n_components(KEY, x, [0, 2])
    with pytest.raises(ValueError, match="covariance_type must be one of"):
        lem.select_n_components(KEY, x, CANDIDATES, covariance_type=("full", "banana"))
    with pytest.raises(ValueError, match="candidates <= 200"):
        lem.select_n_components(KEY, x, [2, 500])
    with pytest.raises(ValueError, match="3 features but x has 2"):
        lem.select_n_components(KEY, x, CANDIDATES, criterion="heldout", x_validation=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        lem.select_n_components(KEY, np.full((10, 2), np.nan), CANDIDATES)
    with pytest.raises(
        ValueError, match=r"validation_weights must have shape .* one per row of x_validation"
    ):
        lem.select_n_components(
            KEY, x, CANDIDATES, criterion="heldout", x_validation=x, validation_weights=np.ones(5)
        )
    with pytest.raises(ValueError, match=r"x_validation must be 2-D .* got shape \(1, 5, 2\)\.$"):
        lem.select_n_components(KEY, x, CANDIDATES, criterion="heldout", x_validation=np.zeros((1, 5, 2)))


def test_integer_data_do_not_truncate_the_validation_data():
    """Counts as training data are fitted in floats; the validation data and weights must
    not be cast to the counts' integer dtype (scores of truncated data, and weights of
    0.5 read as all zero)."""
    x = np.round(training_data() * 3).astype(np.int32)
    x_validation = np.random.default_rng(5).standard_normal((200, 2)) * 3 + 0.5
    options = {"criterion": "heldout", "x_validation": x_validation, "n_init": 2}
    from_counts = lem.select_n_components(KEY, x, [1, 2, 3], **options)
    from_floats = lem.select_n_components(KEY, x.astype(np.float64), [1, 2, 3], **options)
    rtol = 1e-12 if is_x64() else 1e-6
    np.testing.assert_allclose(np.asarray(from_counts.score), np.asarray(from_floats.score), rtol=rtol)
    _, covariance_type, params = from_counts.chosen()
    model = lem.gaussian_mixture(from_counts.best_n_components, covariance_type)
    np.testing.assert_allclose(
        float(np.asarray(from_counts.score)[int(from_counts.best)]),
        float(lem.score(model, params, x_validation)),
        rtol=rtol,
    )
    halves = lem.select_n_components(KEY, x, [1, 2, 3], **options, validation_weights=np.full(200, 0.5))
    np.testing.assert_allclose(np.asarray(halves.score), np.asarray(from_counts.score), rtol=rtol)


@pytest.mark.parametrize("criterion", ["bic", "heldout"])
def test_no_finite_candidate_leaves_nothing_to_choose(criterion):
    """Two groups of identical points with reg_covar=0: every candidate's covariances
    are exactly singular. The table must not mark a NaN fit as best, and chosen() must
    refuse rather than hand back singular params."""
    x = np.concatenate([np.ones((50, 2)), np.full((50, 2), 5.0)])
    options = {"x_validation": x} if criterion == "heldout" else {}
    with pytest.warns(lem.ConvergenceWarning, match="NONFINITE"):
        result = lem.select_n_components(KEY, x, [2, 3], reg_covar=0.0, criterion=criterion, **options)
    rows = result.table()
    assert [row["status"] for row in rows] == ["NONFINITE", "NONFINITE"]
    assert not any(row["best"] for row in rows)
    assert not np.isfinite(np.asarray(result.score)).any()
    with pytest.raises(ValueError, match="no candidate has a finite score"):
        result.chosen()
    # With a regulariser the same data have finite fits, and one is chosen (three
    # components on two distinct points may end EMPTY_COMPONENT, which is finite).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lem.ConvergenceWarning)
        regularised = lem.select_n_components(KEY, x, [2, 3], criterion=criterion, **options)
    assert sum(row["best"] for row in regularised.table()) == 1
    assert regularised.chosen()[0] in (2, 3)
