"""check_model: passes correct models, flags three planted mistakes, reports in plain words."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaln

import latentem as lem
from latentem._check import CHECKS
from tests.helpers import blobs, is_x64

BASE = lem.poisson_mixture(2, smoothing=0.0)  # maximum likelihood: no log_prior to account for


def wrong_m_step(x, responsibilities, params):
    """Planted mistake 1: rates divided by the total weight instead of each component's."""
    counts = responsibilities.sum(axis=0)
    return lem.PoissonMixtureParams(counts / counts.sum(), responsibilities.T @ x / counts.sum())


def m_step_ignoring_weights(x, responsibilities, params):
    """Planted mistake 2: mixing weights normalised by the number of rows, not by the weight."""
    counts = responsibilities.sum(axis=0)
    return lem.PoissonMixtureParams(counts / x.shape[0], responsibilities.T @ x / counts[:, None])


def log_joint_without_weights(params, x):
    """Planted mistake 3: log p(x_n | z_n = k), the log mixture weight forgotten."""
    log_p = x @ jnp.log(params.rates).T - params.rates.sum(axis=1)[None, :]
    return log_p - gammaln(x + 1).sum(axis=1)[:, None]


MODELS = {
    "correct": BASE,
    "wrong_m_step": BASE._replace(m_step=wrong_m_step),
    "weights_ignored": BASE._replace(m_step=m_step_ignoring_weights),
    "missing_mixture_weights": BASE._replace(log_joint=log_joint_without_weights),
}


@pytest.fixture(scope="module")
def counts():
    """Overlapping count data from two components with unequal weights."""
    rng = np.random.default_rng(0)
    rates = np.where(rng.random(2000) < 0.2, 3.0, 6.0)
    return rng.poisson(rates[:, None], (2000, 3)).astype(np.float64 if is_x64() else np.float32)


@pytest.fixture(scope="module")
def reports(counts):
    """Each model checked once."""
    key = jax.random.key(0)
    return {name: lem.check_model(model, key, counts, n_samples=2000) for name, model in MODELS.items()}


def test_correct_model_passes_every_check(reports):
    report = reports["correct"]
    assert report.passed, str(report)
    assert [finding.name for finding in report.findings] == list(CHECKS)
    assert "no fused_step" in report["fused_step"].message
    assert all(
        finding.passed is (None if finding.name == "fused_step" else True) for finding in report.findings
    )


def test_flags_a_wrong_m_step(reports):
    report = reports["wrong_m_step"]
    assert not report.passed
    assert report["m_step_improves"].passed is False
    assert "not the maximiser" in report["m_step_improves"].message
    assert report["m_step_stationary"].passed is False
    assert "not a stationary point" in report["m_step_stationary"].message
    assert ".log_rates" in report["m_step_stationary"].message
    assert report["weights"].passed is True  # the mistake is not about weights


def test_flags_ignored_weights(reports):
    report = reports["weights_ignored"]
    assert [finding.name for finding in report.failures] == ["weights"], str(report)
    assert "zero sample weight is not the same as removing" in report["weights"].message
    assert "params.weights" in report["weights"].message


def test_flags_a_log_joint_missing_the_mixture_weights(reports, counts):
    report = reports["missing_mixture_weights"]
    failed = {finding.name for finding in report.failures}
    # The gradient check always sees it, and nothing but the three checks that can fails.
    assert "uses_parameters" in failed, str(report)
    assert failed <= {"uses_parameters", "sample_calibration", "sample_recovery"}, str(report)
    assert "does not depend on params.weights" in report["uses_parameters"].message
    assert report["m_step_stationary"].passed is True  # the M-step itself is right
    # The sampling checks are statistical: they see it when a point they draw from has
    # unequal weights and overlapping states. Over five keys, most must see it.
    recovery = [report["sample_recovery"]] + [
        lem.check_model(MODELS["missing_mixture_weights"], jax.random.key(seed), counts, n_samples=2000)[
            "sample_recovery"
        ]
        for seed in range(1, 5)
    ]
    flagged = [finding for finding in recovery if finding.passed is False]
    assert len(flagged) >= 3, [finding.message for finding in recovery]
    assert all("sample and log_joint disagree" in finding.message for finding in flagged)


def m_step_rates_too_large(x, responsibilities, params):
    """Planted mistake 4: rates 5% too large, an M-step that still raises Q."""
    counts = responsibilities.sum(axis=0)
    return lem.PoissonMixtureParams(counts / counts.sum(), 1.05 * (responsibilities.T @ x) / counts[:, None])


def m_step_weights_mixed_up(x, responsibilities, params):
    """Planted mistake 5: mixing weights a tenth of the way to the other component's."""
    counts = responsibilities.sum(axis=0)
    weights = counts / counts.sum()
    return lem.PoissonMixtureParams(
        0.9 * weights + 0.1 * weights[::-1], responsibilities.T @ x / counts[:, None]
    )


def test_m_step_is_checked_without_unconstrained_coordinates(counts):
    """The README's minimal model has no to_unconstrained/from_unconstrained, so no
    gradient check: the slopes of Q along chords to other valid parameters (init's)
    still flag an M-step that improves Q without maximising it, for every key, and
    pass the correct one."""
    plain = BASE._replace(to_unconstrained=None, from_unconstrained=None)
    planted = (wrong_m_step, m_step_rates_too_large, m_step_weights_mixed_up)
    for seed in range(3):
        key = jax.random.key(seed)
        correct = lem.check_model(plain, key, counts, n_samples=500)
        assert correct.passed, str(correct)
        for m_step in planted:
            report = lem.check_model(plain._replace(m_step=m_step), key, counts, n_samples=500)
            finding = report["m_step_improves"]
            assert finding.passed is False, (m_step.__name__, finding.message)
            assert "is not the maximiser of the expected complete-data log-likelihood" in finding.message
            if m_step is not wrong_m_step:  # Q is higher there than at the input: only a slope shows it
                assert "Q rises from m_step's output" in finding.message


def check_data_refusing_zero_counts(x):
    """Planted mistake 6: a check_data stricter than the model, which draws zero counts."""
    if np.any(np.asarray(x) == 0):
        raise ValueError("counts must be positive")


def test_check_data_must_accept_the_models_own_samples(counts):
    positive = counts + 1  # data that pass the strict check
    strict = BASE._replace(check_data=check_data_refusing_zero_counts)
    for seed in range(2):  # without check_data it passes: test_correct_model_passes_every_check
        finding = lem.check_model(strict, jax.random.key(seed), positive, n_samples=500)["sample_calibration"]
        assert finding.passed is False and "check_data refused data drawn by sample" in finding.message
        assert "counts must be positive" in finding.message


def test_report_reads_in_plain_words_and_can_raise(reports):
    text = str(reports["weights_ignored"])
    assert text.startswith("check_model: 1 check(s) failed")
    assert "[FAIL] weights: a zero sample weight" in text and "[PASS] em_monotone" in text
    assert str(reports["correct"]).startswith("check_model: all checks passed")
    with pytest.raises(KeyError, match="no finding named"):
        reports["correct"]["no_such_check"]


def test_raise_on_failure_and_input_validation(counts):
    x = counts  # the same model, data and key as above: its compiled programs are reused
    with pytest.raises(ValueError, match=r"\[FAIL\] weights"):
        lem.check_model(
            MODELS["weights_ignored"], jax.random.key(0), x, n_samples=2000, raise_on_failure=True
        )
    with pytest.raises(ValueError, match="LatentModel"):
        lem.check_model(lambda x: x, jax.random.key(0), x)
    with pytest.raises(ValueError, match="2-D"):
        lem.check_model(BASE, jax.random.key(0), x[:, 0])


def test_gaussian_mixtures_pass(covariance_type, dtype):
    x = blobs(2, n_per_cluster=50, centres=((0.0, 0.0), (4.0, 0.0), (0.0, 4.0))).astype(dtype)
    report = lem.check_model(lem.gaussian_mixture(3, covariance_type), jax.random.key(1), x, n_samples=150)
    assert report.passed, str(report)
    # On a CPU the factory's models have no fused step (the GPU kernel's is checked in
    # tests/test_gaussian_kernel.py).
    assert all(
        finding.passed is (None if finding.name == "fused_step" else True) for finding in report.findings
    )


def test_minimal_model_skips_what_it_cannot_check_and_reports_crashes(dtype):
    """The README's three-function Poisson mixture: no sample, no unconstrained maps."""

    def log_joint(params, x):
        log_p = x @ jnp.log(params.rates).T - params.rates.sum(1)[None, :]
        return log_p - gammaln(x + 1).sum(1)[:, None] + jnp.log(params.weights)[None, :]

    def m_step(x, responsibilities, params):
        counts = responsibilities.sum(0)
        return lem.PoissonMixtureParams(counts / counts.sum(), responsibilities.T @ x / counts[:, None])

    def init(key, x, weights):
        responsibilities = jax.random.dirichlet(key, jnp.ones(2, x.dtype), (x.shape[0],))
        return m_step(x, responsibilities * weights[:, None], None)

    x = jnp.asarray(np.random.default_rng(2).poisson(4.0, (60, 2)), dtype)
    minimal = lem.LatentModel(init=init, log_joint=log_joint, m_step=m_step)
    report = lem.check_model(minimal, jax.random.key(0), x)
    assert report.passed, str(report)
    skipped = {finding.name for finding in report.findings if finding.passed is None}
    assert skipped == {"m_step_stationary", "fused_step", "sample_calibration", "sample_recovery"}
    assert "to_unconstrained" in report["m_step_stationary"].message

    def broken_m_step(x, responsibilities, params):
        raise RuntimeError("not written yet")

    broken = lem.LatentModel(init=init, log_joint=log_joint, m_step=broken_m_step)
    report = lem.check_model(broken, jax.random.key(0), x)
    assert report["functions"].passed is False
    assert "RuntimeError: not written yet" in report["functions"].message
    assert all(finding.passed is None for finding in report.findings[1:])


def log_joint_with_unguarded_logs(params, x):
    """Planted mistake 6 (with the M-step below): x log(rate) as a product, NaN where a
    rate and its counts are 0, as in the README's minimal model."""
    log_p = x @ jnp.log(params.rates).T - params.rates.sum(axis=1)[None, :]
    return log_p - gammaln(x + 1).sum(axis=1)[:, None] + jnp.log(params.weights)[None, :]


def m_step_without_a_floor(x, responsibilities, params):
    counts = responsibilities.sum(axis=0)
    return lem.PoissonMixtureParams(counts / counts.sum(), responsibilities.T @ x / counts[:, None])


def test_a_nan_gradient_points_at_logs_of_zero(counts):
    """A feature that is always 0 gets a maximum-likelihood rate of 0; an unguarded
    0 * log 0 makes Q's gradient NaN there, which the report says (not "the M-step does
    not maximise Q"). The built-in model (rates floored) passes."""
    x = counts.copy()
    x[:, 1] = 0
    assert lem.check_model(BASE, jax.random.key(0), x, n_samples=500).passed
    unguarded = BASE._replace(log_joint=log_joint_with_unguarded_logs, m_step=m_step_without_a_floor)
    finding = lem.check_model(unguarded, jax.random.key(0), x, n_samples=500)["m_step_stationary"]
    assert finding.passed is False
    assert "is NaN at m_step's output" in finding.message and "0 * log 0" in finding.message
