"""latentem.plot: what is drawn is checked against the parameters (ellipse contours by
Mahalanobis distance, point colours by SciPy's posterior, curves by the histories)."""

from __future__ import annotations

import io
import sys
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

import jax.numpy as jnp
import matplotlib.pyplot as pyplot
import numpy as np
import pytest
from helpers import random_covariances
from scipy.stats import multivariate_normal, norm

import latentem as lem
from latentem import plot

N_COMPONENTS = 3
N_FEATURES = 3  # three features: the plots show the first two


@pytest.fixture(autouse=True)
def close_figures():
    yield
    pyplot.close("all")


def full_covariances(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Each component's covariance as a full matrix (NumPy reference)."""
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.broadcast_to(covariances, (N_COMPONENTS, N_FEATURES, N_FEATURES))
    if covariance_type == "diag":
        return np.stack([np.diag(c) for c in covariances])
    return np.stack([c * np.eye(N_FEATURES) for c in covariances])


def mixture(covariance_type: str, dtype):
    rng = np.random.default_rng(4)
    covariances = random_covariances(rng, covariance_type, N_COMPONENTS, N_FEATURES)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -1.0], [0.0, 5.0, 2.0]])
    weights = np.array([0.3, 0.3, 0.4])
    params = lem.GaussianMixtureParams(
        jnp.asarray(weights, dtype), jnp.asarray(means, dtype), jnp.asarray(covariances, dtype)
    )
    x = np.concatenate([rng.multivariate_normal(m, np.eye(N_FEATURES), 20) for m in means])
    return params, full_covariances(covariances, covariance_type), x


def test_clusters_draws_contours_and_colours_by_posterior(covariance_type, dtype):
    params, covariances, x = mixture(covariance_type, dtype)
    ax = plot.clusters(x, params, covariance_type=covariance_type, feature_names=["a", "b", "c"], n_std=1.5)

    # Reference labels: the argmax of log w_k + log N(x | mu_k, Sigma_k) from SciPy.
    joint = np.stack(
        [
            np.log(float(params.weights[k])) + multivariate_normal(params.means[k], covariances[k]).logpdf(x)
            for k in range(N_COMPONENTS)
        ],
        axis=1,
    )
    labels = np.argmax(joint, axis=1)
    scatters = ax.collections
    assert len(scatters) == N_COMPONENTS
    for k, scatter in enumerate(scatters):
        np.testing.assert_allclose(scatter.get_offsets(), x[labels == k, :2], rtol=0, atol=0)

    # Each ellipse is the contour at n_std of the component's marginal over two features.
    assert len(ax.patches) == N_COMPONENTS
    for k, ellipse in enumerate(ax.patches):
        # The patch is the unit circle under its patch transform.
        angles = np.linspace(0.0, 2.0 * np.pi, 40)
        circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points = ellipse.get_patch_transform().transform(circle)
        differences = points - np.asarray(params.means[k, :2], np.float64)
        precision = np.linalg.inv(covariances[k, :2, :2])
        distances = np.einsum("ni,ij,nj->n", differences, precision, differences)
        np.testing.assert_allclose(distances, 1.5**2, rtol=1e-5)

    assert (ax.get_xlabel(), ax.get_ylabel()) == ("a", "b")
    assert ax.get_title() == "3 components, ellipses at 1.5 standard deviations"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["component 0 (weight 0.30)", "component 1 (weight 0.30)", "component 2 (weight 0.40)"]


def test_clusters_asks_for_the_type_when_shapes_are_ambiguous(dtype):
    # Three components, three features: tied (3, 3) and diag (3, 3) look alike.
    params, _, x = mixture("diag", dtype)
    with pytest.raises(ValueError, match="pass covariance_type="):
        plot.clusters(x, params)
    with pytest.raises(ValueError, match="at least one of each"):
        plot.clusters(x[:, :0], params, covariance_type="diag")


def test_clusters_of_one_feature_stacks_a_histogram_under_the_component_densities(covariance_type, dtype):
    rng = np.random.default_rng(5)
    means = np.array([[-3.0], [0.5], [4.0]])
    variances = np.array([0.5, 1.5, 0.8])
    weights = np.array([0.2, 0.5, 0.3])
    shapes = {"full": (3, 1, 1), "tied": (1, 1), "diag": (3, 1), "spherical": (3,)}
    covariances = variances[:1] if covariance_type == "tied" else variances
    params = lem.GaussianMixtureParams(
        jnp.asarray(weights, dtype),
        jnp.asarray(means, dtype),
        jnp.asarray(covariances.reshape(shapes[covariance_type]), dtype),
    )
    variances = np.broadcast_to(covariances, (3,))
    x = np.concatenate([rng.normal(m, 1.0, (n, 1)) for m, n in zip(means[:, 0], (20, 50, 30), strict=True)])
    ax = plot.clusters(x, params, feature_names=["duration"])  # the type is inferred from the shapes

    # The components' curves are pi_k N(x | mu_k, sigma_k^2) by SciPy; the last is their sum.
    *components, mixture = ax.lines
    assert len(components) == 3
    grid = mixture.get_xdata()
    assert grid.min() < x.min() and grid.max() > x.max()
    for k, line in enumerate(components):
        np.testing.assert_array_equal(line.get_xdata(), grid)
        expected = weights[k] * norm(means[k, 0], np.sqrt(variances[k])).pdf(grid)
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(mixture.get_ydata(), sum(line.get_ydata() for line in components), rtol=1e-12)

    # Each component's layer of the stacked histogram holds its samples (labels by SciPy's
    # posterior), as a density of the whole data set: the stack's area is one.
    joint = np.log(weights) + norm(means[:, 0], np.sqrt(variances)).logpdf(x)
    labels = np.argmax(joint, axis=1)
    bars = ax.patches
    n_bins = len(bars) // 3
    edges = np.append(
        [bar.get_x() for bar in bars[:n_bins]], bars[n_bins - 1].get_x() + bars[n_bins - 1].get_width()
    )
    width = np.diff(edges)
    area = 0.0
    for k in range(3):
        layer = bars[k * n_bins : (k + 1) * n_bins]
        heights = np.array([bar.get_height() for bar in layer])
        counts, _ = np.histogram(x[labels == k, 0], bins=edges)
        np.testing.assert_allclose(heights * width * x.shape[0], counts, atol=1e-9)
        area += float(np.sum(heights * width))
    np.testing.assert_allclose(area, 1.0, rtol=1e-12)

    assert (ax.get_xlabel(), ax.get_ylabel()) == ("duration", "density")
    assert ax.get_title() == "3 components, weighted component densities"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [
        "component 0 (weight 0.20)",
        "component 1 (weight 0.50)",
        "component 2 (weight 0.30)",
        "mixture density",
    ]


class CountParams(NamedTuple):
    weights: jnp.ndarray
    rates: jnp.ndarray


def test_clusters_of_a_model_without_ellipses():
    params = CountParams(jnp.array([0.5, 0.5]), jnp.ones((2, 2)))
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    ax = plot.clusters(x, params, labels=[0, 1, 1])
    assert len(ax.patches) == 0 and len(ax.collections) == 2
    np.testing.assert_array_equal(ax.collections[1].get_offsets(), x[1:])
    with pytest.raises(ValueError, match="pass model="):
        plot.clusters(x, params)


def test_history_puts_em_and_gradient_on_one_axis():
    em_history = np.full(10, np.nan)
    em_history[:4] = [-3.0, -2.5, -2.4, -2.39]
    em = lem.EMResult(None, jnp.asarray(-2.39), jnp.asarray(4), jnp.asarray(True), jnp.asarray(0), em_history)
    gradient_history = np.full(20, np.nan)
    gradient_history[:7] = np.linspace(-3.5, -2.4, 7)
    gradient = lem.GradientResult(
        None, jnp.asarray(-2.4), jnp.asarray(7), jnp.asarray(False), jnp.asarray(1), gradient_history
    )
    ax = plot.history(em, gradient, xscale="log")
    assert len(ax.lines) == 2
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), em_history[:4])
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), np.arange(1, 8))
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), gradient_history[:7])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["EM", "gradient"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "mean log-likelihood"

    # A batch of restarts: one line per member, one legend entry.
    batched_history = np.stack([em_history, em_history - 1.0, em_history - 2.0])
    batched = em._replace(n_iter=np.array([4, 2, 3]), history=batched_history)
    ax = plot.history(batched, labels=["restarts"])
    assert [len(line.get_xdata()) for line in ax.lines] == [4, 2, 3]
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), batched_history[1, :2])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["restarts"]


def test_selection_draws_one_curve_per_covariance_type_and_marks_the_choice():
    scores = np.array([30.0, 20.0, 25.0, 35.0, 22.0, 21.0])
    result = lem.SelectionResult(
        n_components=np.array([1, 2, 3, 1, 2, 3]),
        covariance_type=np.array([0, 0, 0, 2, 2, 2]),
        score=scores,
        log_likelihood=None,
        n_parameters=None,
        status=None,
        best=np.int32(1),
        best_n_components=np.int32(2),
        params=None,
    )
    ax = plot.selection(result, criterion="bic")
    curves = [line for line in ax.lines if line.get_linestyle() == "-"]
    np.testing.assert_array_equal(curves[0].get_ydata(), scores[:3])
    np.testing.assert_array_equal(curves[1].get_ydata(), scores[3:])
    chosen = [line for line in ax.lines if line.get_linestyle() == "--"]
    np.testing.assert_array_equal(chosen[0].get_xdata(), [2, 2])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["BIC (full)", "BIC (diag)", "chosen: 2"]
    assert ax.get_ylabel() == "BIC" and ax.get_xlabel() == "number of components"

    ax = plot.selection(candidates=[1, 2, 4], scores={"aic": [3.0, 1.0, 2.0], "bic": [4.0, 2.0, 5.0]}, best=2)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["AIC", "BIC", "chosen: 2"]
    with pytest.raises(ValueError, match="one value per candidate"):
        plot.selection(candidates=[1, 2], scores=[1.0, 2.0, 3.0])


def test_figures_save_as_png(dtype):
    params, _, x = mixture("full", dtype)
    figure, axes = pyplot.subplots(1, 2)
    plot.clusters(x, params, ax=axes[0])
    plot.selection(candidates=[1, 2], scores=[2.0, 1.0], ax=axes[1])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG\r\n\x1a\n")


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'latentem\[plot\]'"):
        plot.selection(candidates=[1], scores=[1.0])
