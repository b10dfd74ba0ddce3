r"""k-means as hard EM on a Gaussian mixture with equal weights and unit variance.

Lloyd's algorithm is classification EM (:func:`latentem.hard_em`) on the model

.. math:: p(x_n, z_n = k) = \frac{1}{K}\, \mathcal{N}(x_n \mid c_k, I),

whose arg-max state is the nearest centre and whose M-step on a hard partition is the
(weighted) mean of each cluster. The classification log-likelihood the engine reports is
then an affine function of the inertia,

.. math:: \ell_C = -\frac{\text{inertia}}{2 \sum_n w_n} - \frac{d}{2} \log 2\pi - \log K,

so EM's monotone objective is minus the inertia, up to constants.
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
    check_param_shapes,
    check_positive_int,
    check_weights,
    check_x,
    float_dtype,
)
from latentem._hard_em import hard_em
from latentem.models._seeding import kmeans_plusplus, random_from_data, squared_distances

INITS = ("kmeans++", "random_from_data")


class KMeansParams(NamedTuple):
    """Parameters of k-means.

    Attributes:
      centres: cluster centres, shape ``(n_clusters, n_features)`` (scikit-learn's
        ``cluster_centers_``).
    """

    centres: Array


def kmeans(n_clusters: int, init: str = "kmeans++") -> LatentModel:
    r"""k-means (Lloyd's algorithm) as a :class:`~latentem.LatentModel` built on hard EM.

    The assignment step puts each sample in the cluster of its nearest centre; the
    update step moves each centre to the weighted mean of its cluster,
    :math:`c_k = \sum_{n: z_n = k} w_n x_n / \sum_{n: z_n = k} w_n`. A cluster that
    loses all its samples keeps its centre (scikit-learn instead relocates it to a far
    sample, so fits from a start that empties a cluster differ). From the same initial
    centres, :func:`~latentem.fit_em` with ``tol=0`` reaches the same fixed point
    (centres, labels and inertia) as scikit-learn's ``KMeans(algorithm="lloyd",
    tol=0)``.

    The underlying probabilistic model is an equal-weight mixture of unit-variance
    isotropic Gaussians around the centres (see the module docstring): ``log_joint`` is
    its log joint density, ``sample`` draws from it, and ``result.log_likelihood`` is
    the classification log-likelihood, an affine function of :func:`inertia`.

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
        if params is not None and x.shape[1] != params.centres.shape[-1]:
            raise ValueError(
                f"x has {x.shape[1]} features but the centres have {params.centres.shape[-1]}; "
                f"pass data with shape (n_samples, {params.centres.shape[-1]})."
            )
        if params is not None:
            check_params(params)

    def check_params(params: KMeansParams) -> None:
        n_features = params.centres.shape[-1]
        check_param_shapes(
            params, {"centres": (n_clusters, n_features)}, f"kmeans({n_clusters}) with {n_features} features"
        )

    def log_joint(params: KMeansParams, x: Array) -> Array:
        check_data(x, params)
        x = x.astype(params.centres.dtype)
        constant = 0.5 * x.shape[1] * math.log(2 * math.pi) + math.log(n_clusters)
        return -0.5 * squared_distances(x, params.centres) - constant

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
        return KMeansParams(jnp.where(empty[:, None], params.centres, means))

    def initialize(key: PRNGKey, x: Array, weights: Array) -> KMeansParams:
        check_data(x)
        if x.shape[0] < n_clusters:
            raise ValueError(
                f"x has {x.shape[0]} samples but n_clusters={n_clusters}; "
                "use at most as many clusters as samples."
            )
        x = jnp.asarray(x, float_dtype(x))
        seed = kmeans_plusplus if init == "kmeans++" else random_from_data
        return KMeansParams(seed(key, x, n_clusters, weights.astype(x.dtype)))

    def sample(key: PRNGKey, params: KMeansParams, n_samples: int) -> tuple[Array, Array]:
        n_samples = check_positive_int(n_samples, "n_samples")
        check_params(params)
        label_key, noise_key = jax.random.split(key)
        labels = jax.random.randint(label_key, (n_samples,), 0, n_clusters, dtype=jnp.int32)
        noise = jax.random.normal(noise_key, (n_samples, params.centres.shape[1]), params.centres.dtype)
        return params.centres[labels] + noise, labels

    def n_parameters(params: KMeansParams) -> int:
        check_params(params)
        return int(params.centres.shape[0] * params.centres.shape[1])

    def identity(params: KMeansParams) -> KMeansParams:
        return KMeansParams(params.centres)

    return hard_em(
        LatentModel(
            init=initialize,
            log_joint=log_joint,
            m_step=m_step,
            sample=sample,
            n_parameters=n_parameters,
            to_unconstrained=identity,
            from_unconstrained=identity,
        )
    )


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
      >>> params = lem.KMeansParams(jnp.array([[0.0], [10.0]]))
      >>> float(lem.inertia(params, jnp.array([[1.0], [8.0]])))
      5.0
    """
    x = check_x(x)
    weights = check_weights(weights, x.shape[0], params.centres.dtype)
    distances = jnp.min(squared_distances(x.astype(params.centres.dtype), params.centres), axis=1)
    return jnp.sum(jnp.where(weights > 0, weights * distances, jnp.zeros_like(distances)))
