r"""Linear-Gaussian latent variable models: probabilistic PCA and factor analysis.

Both explain ``n_features``-dimensional data by ``n_components`` continuous Gaussian
factors through a linear map,

.. math:: z_n \sim \mathcal{N}(0, I_q), \qquad
          x_n \mid z_n \sim \mathcal{N}(\mu + W^\top z_n, \Psi),

with :math:`W` of shape ``(n_components, n_features)`` (scikit-learn's ``components_``
layout) and a diagonal noise covariance :math:`\Psi`: isotropic, :math:`\sigma^2 I`, for
probabilistic PCA; one variance per feature for factor analysis. The marginal is
:math:`\mathcal{N}(x_n \mid \mu, W^\top W + \Psi)`.

The latent variable is continuous, so these models supply the engine's ``posterior``
hook instead of ``log_joint``. The E-step is Gaussian,

.. math:: M = I_q + W \Psi^{-1} W^\top, \qquad
          \mathbb{E}[z_n] = M^{-1} W \Psi^{-1} (x_n - \mu), \qquad
          \operatorname{Cov}[z_n] = M^{-1},

and the log-likelihood is evaluated through the Woodbury identity and the matrix
determinant lemma, in :math:`O(n d q + q^3)` without forming the ``d x d`` covariance.
The M-step maximises the expected complete-data log-likelihood jointly over
:math:`(W, \mu)` (regressing :math:`x_n` on :math:`[\mathbb{E} z_n; 1]`) and then over
:math:`\Psi`. Both the Mahalanobis term and :math:`\Psi` are computed as sums of
non-negative terms (with the residual :math:`x_n - \mu - W^\top \mathbb{E}[z_n]`),
equal to the differences in the formulas of :func:`ppca` and :func:`factor_analysis`,
which lose float32 digits to cancellation where the noise is small against the data's
spread.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from latentem._base import (
    Array,
    LatentModel,
    PRNGKey,
    check_param_fields,
    check_param_shapes,
    check_positive_int,
    float_dtype,
)
from latentem.models import _linalg
from latentem.models.gaussian_mixture import _regulariser_scale


class PPCAParams(NamedTuple):
    """Parameters of probabilistic PCA.

    Attributes:
      mean: :math:`\\mu`, shape ``(n_features,)``.
      components: the loadings :math:`W`, shape ``(n_components, n_features)``; the
        covariance is ``components.T @ components + noise_variance * I``. Rows are not
        orthonormal: :math:`W` is determined up to a rotation of the latent space.
      noise_variance: :math:`\\sigma^2`, a positive scalar (shape ``()``).
    """

    mean: Array
    components: Array
    noise_variance: Array


class FactorAnalysisParams(NamedTuple):
    """Parameters of factor analysis, with scikit-learn's ``FactorAnalysis`` names.

    Attributes:
      mean: :math:`\\mu`, shape ``(n_features,)``.
      components: the loadings :math:`W`, shape ``(n_components, n_features)``.
      noise_variance: the diagonal of :math:`\\Psi`, shape ``(n_features,)``, positive.
    """

    mean: Array
    components: Array
    noise_variance: Array


class LinearGaussianUnconstrained(NamedTuple):
    """Unconstrained coordinates of PPCA or factor analysis: the log of the noise variance."""

    mean: Array
    components: Array
    log_noise_variance: Array


class LinearGaussianPosterior(NamedTuple):
    """What the E-step hands to the M-step (the engine scales both leaves by the weights).

    Attributes:
      weights: ones, shape ``(n_samples,)``; the engine turns them into the sample
        weights :math:`w_n`.
      means: :math:`\\mathbb{E}[z_n \\mid x_n]`, shape ``(n_samples, n_components)``
        (:math:`w_n \\mathbb{E}[z_n]` after weighting). The posterior covariance is the
        same for every sample and is recomputed by the M-step from the parameters, so
        the posterior takes :math:`O(n q)` memory rather than :math:`O(n q^2)`.
    """

    weights: Array
    means: Array


# ---------------------------------------------------------------------------
# E-step, M-step
# ---------------------------------------------------------------------------


def _noise_vector(noise_variance: Array, n_features: int) -> Array:
    return jnp.broadcast_to(noise_variance, (n_features,))


def _latent_precision_cholesky(components: Array, noise: Array) -> tuple[Array, Array]:
    """``W Psi^-1`` and the Cholesky factor of ``M = I + W Psi^-1 W^T``."""
    scaled = components / noise[None, :]
    precision = jnp.eye(components.shape[0], dtype=components.dtype) + scaled @ components.T
    return scaled, jnp.linalg.cholesky(precision)


def _posterior(
    mean: Array, components: Array, noise_variance: Array, x: Array
) -> tuple[LinearGaussianPosterior, Array]:
    x = x.astype(mean.dtype)
    n_features = x.shape[1]
    noise = _noise_vector(noise_variance, n_features)
    scaled, lower = _latent_precision_cholesky(components, noise)
    centred = x - mean[None, :]
    projected = centred @ scaled.T  # (n, q): W Psi^-1 (x - mu)
    # A GEMM by the (q, q) M^-1 rather than a solve with n right-hand sides (on a CPU
    # OpenBLAS's solve left its threads spinning, see _linalg).
    posterior_means = projected @ _linalg.inverse_from_cholesky(lower)
    # Woodbury, (x-mu)^T C^-1 (x-mu) = (x-mu)^T Psi^-1 (x-mu) - b^T M^-1 b, rearranged
    # into two non-negative terms with the residual e = x - mu - W^T E[z]:
    # e^T Psi^-1 e + |E[z]|^2. The difference cancels where the noise is small against
    # the data's spread: float32 per-sample log-densities of a PPCA fit of Old Faithful
    # were 2.4e-4 off (EM's objective then fell in 12 of 117 iterations and the fit
    # stopped far from the maximum), against about 1e-6 this way.
    residual = centred - posterior_means @ components
    mahalanobis = jnp.square(residual) @ (1 / noise) + jnp.sum(jnp.square(posterior_means), axis=1)
    # Determinant lemma: log|C| = log|Psi| + log|M|.
    log_det = jnp.sum(jnp.log(noise)) + 2 * jnp.sum(jnp.log(jnp.diagonal(lower)))
    log_likelihood = -0.5 * (n_features * math.log(2 * math.pi) + log_det + mahalanobis)
    posterior = LinearGaussianPosterior(jnp.ones(x.shape[:1], x.dtype), posterior_means)
    return posterior, log_likelihood


def _m_step(
    x: Array, posterior: LinearGaussianPosterior, mean: Array, components: Array, noise_variance: Array
) -> tuple[Array, Array, Array]:
    """Joint maximiser over (W, mu), then Psi (per feature) of the expected log-likelihood."""
    weights = posterior.weights  # w_n, as applied by the engine
    weighted_means = posterior.means  # w_n E[z_n]
    x = x.astype(weights.dtype)
    n_components, n_features = components.shape
    total = weights.sum()
    # Differences to the current mean keep float32 accurate far from the origin. Rows of
    # zero weight are zeroed: a large one squared overflows, and 0 * inf is NaN.
    centred = jnp.where((weights > 0)[:, None], x - mean[None, :], 0)
    # sum_n w_n E[z_n] E[z_n]^T from the weighted means: (w E)(w E)^T / w.
    posterior_means = weighted_means / jnp.where(weights > 0, weights, 1)[:, None]  # E[z_n]
    outer = posterior_means.T @ weighted_means
    _, lower = _latent_precision_cholesky(components, _noise_vector(noise_variance, n_features))
    covariance = _linalg.inverse_from_cholesky(lower)
    second_moment = total * covariance + outer  # sum_n w_n E[z_n z_n^T]
    first_moment = weighted_means.sum(axis=0)  # sum_n w_n E[z_n]
    # Regression of x on [E z; 1]: W~ = A B^-1 with A = sum w x [Ez;1]^T, B = sum w E[[z;1][z;1]^T].
    cross = jnp.concatenate([centred.T @ weighted_means, (weights @ centred)[:, None]], axis=1)
    gram = jnp.block([[second_moment, first_moment[:, None]], [first_moment[None, :], total[None, None]]])
    gram = 0.5 * (gram + gram.T)
    regression = jnp.linalg.solve(gram, cross.T).T  # (d, q + 1)
    new_components = regression[:, :n_components].T
    # Psi = diag(sum w x x^T - W~ A^T) / sum w, which at W~ = A B^-1 equals the expected
    # squared residual diag(sum w (x - W~ E[z~])(x - W~ E[z~])^T + W Cov[z] W^T) / sum w:
    # a sum of non-negative terms, where the difference lost the small noise variance of
    # data with a large spread to cancellation.
    residual = centred - posterior_means @ new_components - regression[None, :, n_components]
    latent_uncertainty = jnp.sum(new_components * (covariance @ new_components), axis=0)
    noise = weights @ jnp.square(residual) / total + latent_uncertainty
    second = weights @ jnp.square(centred)
    # Noise variances stay above eps times each feature's variance: data of lower rank
    # (or a Heywood case in factor analysis) would otherwise drive one to zero. A
    # constant feature takes the mean variance of the others (as for the Gaussian
    # mixture's regulariser): a floor of zero gave factor analysis a zero noise variance
    # there, and a fit of data with a constant column ended NONFINITE.
    variances = second / total - jnp.square(weights @ centred / total)
    floor = jnp.finfo(noise.dtype).eps * _regulariser_scale(variances, second / total)
    return regression[:, n_components] + mean, new_components, noise, floor


def _initial(key: PRNGKey, x: Array, weights: Array, n_components: int) -> tuple[Array, Array, Array]:
    """Weighted mean, random loadings on the scale of the data, and per-feature variances."""
    n_features = x.shape[1]
    if n_components >= n_features:
        raise ValueError(
            f"n_components={n_components} must be smaller than n_features={n_features}; "
            "with as many factors as features the noise is not identifiable. Use fewer components."
        )
    x = jnp.asarray(x, float_dtype(x))
    weights = weights.astype(x.dtype)
    reference = x[jnp.argmax(weights > 0)]
    # Rows of zero weight stand at the reference: removed, even where squaring overflows.
    x = jnp.where((weights > 0)[:, None], x, reference[None, :])
    centred_mean = weights @ (x - reference[None, :]) / weights.sum()
    mean = centred_mean + reference
    variances = weights @ jnp.square(x - mean[None, :]) / weights.sum()
    # A constant feature gets the mean variance of the others (1 if all are constant),
    # so that the starting noise variance is positive.
    variances = _regulariser_scale(variances, variances)
    directions = jax.random.normal(key, (n_components, n_features), x.dtype)
    components = directions * jnp.sqrt(variances / n_components)[None, :]
    return mean, components, variances


def _check_features(x: Array, n_features: int) -> None:
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(
            f"x must have shape (n_samples, {n_features}) to match the parameters; got shape {x.shape}."
        )


def _check_params(
    params: PPCAParams | FactorAnalysisParams, n_components: int, name: str, isotropic: bool
) -> None:
    """A ``ValueError`` for parameters of another model (``check_param_shapes``)."""
    check_param_fields(params, PPCAParams._fields, f"{name}({n_components})")  # FA's are the same
    d = params.mean.shape[-1]
    expected = {"mean": (d,), "components": (n_components, d), "noise_variance": () if isotropic else (d,)}
    check_param_shapes(params, expected, f"{name}({n_components}) with {d} features")


def _n_free_loadings(n_components: int, n_features: int) -> int:
    """Loadings minus the rotations of the latent space that leave the model unchanged."""
    return n_features * n_components - n_components * (n_components - 1) // 2


# ---------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------


def ppca(n_components: int) -> LatentModel:
    r"""Probabilistic PCA (Tipping & Bishop) as a :class:`~latentem.LatentModel`, fitted by EM.

    :math:`x_n = \mu + W^\top z_n + \epsilon_n` with :math:`z_n \sim \mathcal{N}(0,
    I_q)` and isotropic noise :math:`\epsilon_n \sim \mathcal{N}(0, \sigma^2 I_d)`.
    EM iterates the Gaussian E-step of the module docstring and the M-step

    .. math:: [W^\top, \mu] = \Big(\sum_n w_n x_n \tilde z_n^\top\Big)
              \Big(\sum_n w_n \mathbb{E}[\tilde z_n \tilde z_n^\top]\Big)^{-1},
              \quad \sigma^2 = \frac{1}{d \sum_n w_n} \operatorname{tr}
              \sum_n w_n (x_n x_n^\top - [W^\top, \mu]\, \mathbb{E}[\tilde z_n] x_n^\top),

    with :math:`\tilde z_n = [z_n; 1]`. Its maximum-likelihood fixed point spans the
    leading principal subspace, and the mean log-likelihood equals scikit-learn's
    ``PCA(n_components).score`` (up to scikit-learn's ``n - 1`` normalisation of the
    variances, a relative difference of order :math:`1/n^2`). ``fit`` starts from random
    loadings; ``lem.e_step`` gives the posterior means :math:`\mathbb{E}[z_n]`, the
    probabilistic analogue of the PCA scores. Memoised.

    Args:
      n_components: number of latent dimensions :math:`q`, smaller than ``n_features``.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`PPCAParams`, with ``posterior`` and
      no ``log_joint``.

    Example:
      >>> import jax, latentem as lem
      >>> z, noise = jax.random.normal(jax.random.key(1), (2, 500, 3))
      >>> x = z[:, :2] @ jax.numpy.array([[3.0, 1, 0], [0, 1, 2]]) + 0.5 * noise
      >>> result = lem.fit(lem.ppca(2), jax.random.key(0), x, tol=1e-6, max_iter=500)
      >>> result.params.components.shape, bool(0.2 < result.params.noise_variance < 0.3)
      ((2, 3), True)

    References:
      Tipping & Bishop (1999), Probabilistic principal component analysis. JRSS B 61(3);
      Roweis (1998), EM algorithms for PCA and SPCA.
    """
    return _ppca(check_positive_int(n_components, "n_components"))


@functools.lru_cache(maxsize=256)
def _ppca(n_components: int) -> LatentModel:
    def check_params(params: PPCAParams) -> None:
        _check_params(params, n_components, "ppca", isotropic=True)

    def posterior(params: PPCAParams, x: Array) -> tuple[LinearGaussianPosterior, Array]:
        check_params(params)
        _check_features(x, params.mean.shape[0])
        return _posterior(params.mean, params.components, params.noise_variance, x)

    def m_step(x: Array, posterior: LinearGaussianPosterior, params: PPCAParams) -> PPCAParams:
        check_params(params)
        _check_features(x, params.mean.shape[0])
        mean, components, noise, floor = _m_step(x, posterior, *params)
        return PPCAParams(mean, components, jnp.maximum(jnp.mean(noise), jnp.mean(floor)))

    def initialize(key: PRNGKey, x: Array, weights: Array) -> PPCAParams:
        mean, components, variances = _initial(key, x, weights, n_components)
        return PPCAParams(mean, components, jnp.mean(variances))

    def sample(key: PRNGKey, params: PPCAParams, n_samples: int) -> tuple[Array, Array]:
        check_params(params)
        return _sample(key, params, n_samples)

    def n_parameters(params: PPCAParams) -> int:
        check_params(params)
        q, d = params.components.shape
        return int(d + _n_free_loadings(q, d) + 1)

    def to_unconstrained(params: PPCAParams) -> LinearGaussianUnconstrained:
        check_params(params)
        return _to_unconstrained(params)

    return LatentModel(
        init=initialize,
        log_joint=None,
        m_step=m_step,
        sample=sample,
        n_parameters=n_parameters,
        posterior=posterior,
        to_unconstrained=to_unconstrained,
        from_unconstrained=functools.partial(_from_unconstrained, PPCAParams),
    )


def factor_analysis(n_components: int) -> LatentModel:
    r"""Factor analysis as a :class:`~latentem.LatentModel`, fitted by EM.

    :math:`x_n = \mu + W^\top z_n + \epsilon_n` with :math:`z_n \sim \mathcal{N}(0,
    I_q)` and :math:`\epsilon_n \sim \mathcal{N}(0, \Psi)`, :math:`\Psi` diagonal (one
    noise variance per feature). The M-step is that of :func:`ppca` with the noise kept
    per feature,

    .. math:: \Psi = \frac{1}{\sum_n w_n} \operatorname{diag}
              \sum_n w_n (x_n x_n^\top - [W^\top, \mu]\, \mathbb{E}[\tilde z_n] x_n^\top),

    floored at ``eps`` times the variance of each feature (of the others, on average,
    for a constant feature), so that a variance driven to zero (a Heywood case, a
    constant column) stays positive. At convergence the mean log-likelihood reaches scikit-learn's
    ``FactorAnalysis(n_components).score``. Memoised.

    Args:
      n_components: number of factors :math:`q`, smaller than ``n_features``.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`FactorAnalysisParams`, with
      ``posterior`` and no ``log_joint``.

    Example:
      >>> import jax, latentem as lem
      >>> x = lem.datasets.load_faithful()
      >>> x = jax.numpy.concatenate([x, x[:, :1] + x[:, 1:] / 10], axis=1)
      >>> result = lem.fit(lem.factor_analysis(1), jax.random.key(0), x, tol=1e-6, max_iter=2000)
      >>> result.params.noise_variance.shape, bool(result.converged)
      ((3,), True)

    References:
      Rubin & Thayer (1982), EM algorithms for ML factor analysis. Psychometrika 47(1);
      Ghahramani & Hinton (1996), The EM algorithm for mixtures of factor analyzers.
    """
    return _factor_analysis(check_positive_int(n_components, "n_components"))


@functools.lru_cache(maxsize=256)
def _factor_analysis(n_components: int) -> LatentModel:
    def check_params(params: FactorAnalysisParams) -> None:
        _check_params(params, n_components, "factor_analysis", isotropic=False)

    def posterior(params: FactorAnalysisParams, x: Array) -> tuple[LinearGaussianPosterior, Array]:
        check_params(params)
        _check_features(x, params.mean.shape[0])
        return _posterior(params.mean, params.components, params.noise_variance, x)

    def m_step(
        x: Array, posterior: LinearGaussianPosterior, params: FactorAnalysisParams
    ) -> FactorAnalysisParams:
        check_params(params)
        _check_features(x, params.mean.shape[0])
        mean, components, noise, floor = _m_step(x, posterior, *params)
        return FactorAnalysisParams(mean, components, jnp.maximum(noise, floor))

    def initialize(key: PRNGKey, x: Array, weights: Array) -> FactorAnalysisParams:
        return FactorAnalysisParams(*_initial(key, x, weights, n_components))

    def sample(key: PRNGKey, params: FactorAnalysisParams, n_samples: int) -> tuple[Array, Array]:
        check_params(params)
        return _sample(key, params, n_samples)

    def n_parameters(params: FactorAnalysisParams) -> int:
        check_params(params)
        q, d = params.components.shape
        return int(d + _n_free_loadings(q, d) + d)

    def to_unconstrained(params: FactorAnalysisParams) -> LinearGaussianUnconstrained:
        check_params(params)
        return _to_unconstrained(params)

    return LatentModel(
        init=initialize,
        log_joint=None,
        m_step=m_step,
        sample=sample,
        n_parameters=n_parameters,
        posterior=posterior,
        to_unconstrained=to_unconstrained,
        from_unconstrained=functools.partial(_from_unconstrained, FactorAnalysisParams),
    )


# ---------------------------------------------------------------------------
# Shared by both factories
# ---------------------------------------------------------------------------


def _sample(key: PRNGKey, params: PPCAParams | FactorAnalysisParams, n_samples: int) -> tuple[Array, Array]:
    n_samples = check_positive_int(n_samples, "n_samples")
    n_components, n_features = params.components.shape
    noise = _noise_vector(params.noise_variance, n_features)
    draws = jax.random.normal(key, (n_samples, n_components + n_features), params.mean.dtype)
    z, epsilon = draws[:, :n_components], draws[:, n_components:]
    x = params.mean[None, :] + z @ params.components + epsilon * jnp.sqrt(noise)[None, :]
    return x, z


def _to_unconstrained(params: PPCAParams | FactorAnalysisParams) -> LinearGaussianUnconstrained:
    return LinearGaussianUnconstrained(params.mean, params.components, jnp.log(params.noise_variance))


def _from_unconstrained(
    params_type: type, unconstrained: LinearGaussianUnconstrained
) -> PPCAParams | FactorAnalysisParams:
    return params_type(
        unconstrained.mean, unconstrained.components, jnp.exp(unconstrained.log_noise_variance)
    )
