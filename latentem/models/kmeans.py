r"""k-means as hard EM on a Gaussian mixture with equal weights and a shared spherical
covariance.

Lloyd's algorithm is classification EM (:func:`latentem.hard_em`) on the model

.. math:: p(x_n, z_n = k) = \frac{1}{K}\, \mathcal{N}(x_n \mid c_k, \sigma^2 I),

whose arg-max state is the nearest centre whatever :math:`\sigma^2`, and whose M-step on
a hard partition is the (weighted) mean of each cluster and the within-cluster variance
:math:`\sigma^2 = \text{inertia} / (d \sum_n w_n)`. The classification log-likelihood
the engine reports after an M-step is then

.. math:: \ell_C = -\frac{d}{2} \Big(1 + \log \frac{2\pi\, \text{inertia}}{d \sum_n w_n}\Big)
          - \log K,

a decreasing function of the inertia, so EM's monotone objective is minus the inertia
on a log scale: a change of ``tol`` in it is a relative change of the inertia, the
same in any units of the data (as scikit-learn's ``tol`` is relative to the data's
variance). A fixed unit variance instead made ``tol`` an absolute inertia in squared
data units, and in float32 let the log joint's constant swamp the distances of data
on a small scale (every sample then tied in state 0).
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
    check_choice,
    check_param_fields,
    check_param_shapes,
    check_positive_int,
    check_weights,
    check_x,
    float_dtype,
)
from latentem._hard_em import hard_em
from latentem.models._seeding import kmeans_plusplus, random_from_data, squared_distances
from latentem.models.gaussian_mixture import feature_variances

INITS = ("kmeans++", "random_from_data")


class KMeansParams(NamedTuple):
    """Parameters of k-means.

    Attributes:
      centres: cluster centres, shape ``(n_clusters, n_features)`` (scikit-learn's
        ``cluster_centers_``).
      variance: the clusters' shared variance per feature, shape ``()``: the mean
        squared distance of a sample to its centre, per feature (``inertia / (d sum w)``
        after an M-step). It scales the log joint and ``sample``'s spread; the
        assignments do not depend on it.
    """

    centres: Array
    variance: Array


class KMeansUnconstrained(NamedTuple):
    """Unconstrained coordinates: the centres and ``log(variance)``."""

    centres: Array
    log_variance: Array


def kmeans(n_clusters: int, init: str = "kmeans++") -> LatentModel:
    r"""k-means (Lloyd's algorithm) as a :class:`~latentem.LatentModel` built on hard EM.

    The assignment step puts each sample in the cluster of its nearest centre; the
    update step moves each centre to the weighted mean of its cluster,
    :math:`c_k = \sum_{n: z_n = k} w_n x_n / \sum_{n: z_n = k} w_n`. A cluster that
    loses all its samples keeps its centre (scikit-learn instead relocates it to a far
    sample, so fits from a start that empties a cluster differ). By default a fit runs
    to Lloyd's fixed point, where no sample changes cluster (see :func:`~latentem.hard_em`):
    from the same initial centres, the centres, labels and inertia at which
    scikit-learn's ``KMeans(algorithm="lloyd", tol=0)`` stops, in one iteration fewer
    (scikit-learn counts the iteration that finds no label changed).

    The underlying probabilistic model is an equal-weight mixture of isotropic
    Gaussians around the centres with a shared variance, which the M-step sets to the
    within-cluster variance (see the module docstring): ``log_joint`` is its log joint
    density, ``sample`` draws from it, and ``result.log_likelihood`` is the
    classification log-likelihood, :math:`-\tfrac{d}{2}\log` of :func:`inertia` plus
    a constant, so that a ``tol`` is a relative change of the inertia: a fit given one
    also stops when an iteration lowers the inertia by a fraction of less than about
    ``2 tol / d``, which can be long before the fixed point while a few samples at a
    time change cluster.

    Initialisation (``init``): ``"kmeans++"`` (greedy weighted k-means++, as
    scikit-learn's default) or ``"random_from_data"`` (distinct samples drawn with
    probability proportional to their weight). The factory is memoised.

    Args:
      n_clusters: number of clusters :math:`K`.
      init: ``"kmeans++"`` or ``"random_from_data"``.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`KMeansParams`.

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> x = jnp.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [5.0, 6.0]])
      >>> model = lem.kmeans(2)
      >>> result = lem.fit(model, jax.random.key(0), x)
      >>> jnp.sort(result.params.centres[:, 1]).tolist(), float(lem.inertia(result.params, x))
      ([0.5, 5.5], 1.0)

    References:
      Lloyd (1982), Least squares quantization in PCM. IEEE Trans. Inf. Theory 28(2);
      Celeux & Govaert (1992), A classification EM algorithm for clustering.
    """
    n_clusters = check_positive_int(n_clusters, "n_clusters")
    check_choice(init, "init", INITS)
    return _kmeans(n_clusters, init)


@functools.lru_cache(maxsize=256)
def _kmeans(n_clusters: int, init: str) -> LatentModel:
    def check_data(x: Array, params: KMeansParams | None = None) -> None:
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D with shape (n_samples, n_features); got shape {x.shape}.")
        if params is not None:
            check_params(params)
        if params is not None and x.shape[1] != params.centres.shape[-1]:
            raise ValueError(
                f"x has {x.shape[1]} features but the centres have {params.centres.shape[-1]}; "
                f"pass data with shape (n_samples, {params.centres.shape[-1]})."
            )

    def check_params(params: KMeansParams) -> None:
        check_param_fields(params, KMeansParams._fields, f"kmeans({n_clusters})")
        n_features = params.centres.shape[-1]
        check_param_shapes(
            params,
            {"centres": (n_clusters, n_features), "variance": ()},
            f"kmeans({n_clusters}) with {n_features} features",
        )

    def log_joint(params: KMeansParams, x: Array) -> Array:
        check_data(x, params)
        x = x.astype(params.centres.dtype)
        variance = params.variance.astype(params.centres.dtype)
        constant = 0.5 * x.shape[1] * jnp.log(2 * math.pi * variance) + math.log(n_clusters)
        return -0.5 * squared_distances(x, params.centres) / variance - constant

    def m_step(x: Array, responsibilities: Array, params: KMeansParams) -> KMeansParams:
        check_data(x, params)
        x = x.astype(responsibilities.dtype)
        counts = responsibilities.sum(axis=0)
        total = counts.sum()
        # An empty cluster keeps its centre: the objective does not depend on it.
        empty = counts <= jnp.finfo(counts.dtype).eps * total
        safe_counts = jnp.where(empty, 1, counts)
        # Means of differences to a sample inside the data keep float32 accurate far
        # from the origin.
        reference = x[jnp.argmax(responsibilities.sum(axis=1) > 0)]
        means = (responsibilities.T @ (x - reference[None, :])) / safe_counts[:, None] + reference[None, :]
        centres = jnp.where(empty[:, None], params.centres, means)
        return KMeansParams(centres, _within_variance(x, responsibilities, centres))

    def initialize(key: PRNGKey, x: Array, weights: Array) -> KMeansParams:
        check_data(x)
        if x.shape[0] < n_clusters:
            raise ValueError(
                f"x has {x.shape[0]} samples but n_clusters={n_clusters}; "
                "use at most as many clusters as samples."
            )
        x = jnp.asarray(x, float_dtype(x))
        seed = kmeans_plusplus if init == "kmeans++" else random_from_data
        weights = weights.astype(x.dtype)
        centres = seed(key, x, n_clusters, weights)
        nearest = jax.nn.one_hot(jnp.argmin(squared_distances(x, centres), axis=1), n_clusters, dtype=x.dtype)
        return KMeansParams(centres, _within_variance(x, weights[:, None] * nearest, centres))

    def sample(key: PRNGKey, params: KMeansParams, n_samples: int) -> tuple[Array, Array]:
        n_samples = check_positive_int(n_samples, "n_samples")
        check_params(params)
        label_key, noise_key = jax.random.split(key)
        labels = jax.random.randint(label_key, (n_samples,), 0, n_clusters, dtype=jnp.int32)
        noise = jax.random.normal(noise_key, (n_samples, params.centres.shape[1]), params.centres.dtype)
        return params.centres[labels] + jnp.sqrt(params.variance) * noise, labels

    def n_parameters(params: KMeansParams) -> int:
        check_params(params)
        return int(params.centres.shape[0] * params.centres.shape[1]) + 1

    def to_unconstrained(params: KMeansParams) -> KMeansUnconstrained:
        check_params(params)
        return KMeansUnconstrained(params.centres, jnp.log(params.variance))

    def from_unconstrained(unconstrained: KMeansUnconstrained) -> KMeansParams:
        return KMeansParams(unconstrained.centres, jnp.exp(unconstrained.log_variance))

    return hard_em(
        LatentModel(
            init=initialize,
            log_joint=log_joint,
            m_step=m_step,
            sample=sample,
            n_parameters=n_parameters,
            to_unconstrained=to_unconstrained,
            from_unconstrained=from_unconstrained,
        )
    )


def _within_variance(x: Array, responsibilities: Array, centres: Array) -> Array:
    r"""The shared variance maximising the expected log joint for given centres,

    .. math:: \sigma^2 = \frac{\sum_{n,k} r_{nk} \lVert x_n - c_k \rVert^2}{d \sum_{n,k} r_{nk}},

    from explicit differences (exact far from the origin), kept above eps times the
    data's mean feature variance so that identical samples leave it positive.
    """
    distances = squared_distances(x, centres)
    # A zero-weight row far out has an infinite distance: 0 * inf would be NaN.
    within = jnp.sum(jnp.where(responsibilities > 0, responsibilities * distances, 0))
    sample_weights = responsibilities.sum(axis=1)
    variance = within / (sample_weights.sum() * x.shape[1])
    floor = jnp.finfo(x.dtype).eps * jnp.mean(feature_variances(x, sample_weights))
    return jnp.maximum(variance, floor)


def inertia(params: KMeansParams, x: Array, weights: Array | None = None) -> Array:
    r"""Sum of weighted squared distances of samples to their nearest centre.

    .. math:: \text{inertia} = \sum_n w_n \min_k \lVert x_n - c_k \rVert^2,

    scikit-learn's ``KMeans.inertia_`` (which also uses the nearest centre).

    Args:
      params: :class:`KMeansParams`.
      x: data, shape ``(n_samples, n_features)``.
      weights: optional non-negative sample weights, shape ``(n_samples,)``.

    Returns:
      A scalar in the dtype of the centres.

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> params = lem.KMeansParams(jnp.array([[0.0], [10.0]]), jnp.array(1.0))
      >>> float(lem.inertia(params, jnp.array([[1.0], [8.0]])))
      5.0
    """
    x = check_x(x)
    weights = check_weights(weights, x.shape[0], params.centres.dtype)
    distances = jnp.min(squared_distances(x.astype(params.centres.dtype), params.centres), axis=1)
    return jnp.sum(jnp.where(weights > 0, weights * distances, jnp.zeros_like(distances)))
