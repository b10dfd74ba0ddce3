"""Seeding of cluster centres from data (k-means++ and uniform), written in JAX."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from latentem._base import Array, PRNGKey


def squared_distances(x: Array, centres: Array) -> Array:
    """``||x_n - c_k||^2``, shape ``(n_samples, n_centres)``, from explicit differences.

    Differences rather than the expansion ``|x|^2 - 2 x.c + |c|^2``, which cancels
    catastrophically on data far from the origin (float32 with an offset of 1e4).
    """
    return jnp.sum(jnp.square(x[:, None, :] - centres[None, :, :]), axis=2)


def _draw(mass: Array, uniforms: Array) -> Array:
    """Indices drawn with probability proportional to non-negative ``mass``.

    Inverse-CDF sampling from pre-drawn uniforms: one random-number call for the whole
    seeding keeps the compiled program small (each threefry call costs compile time).
    A sample of zero mass is never drawn.
    """
    cumulative = jnp.cumsum(mass)
    targets = uniforms * cumulative[-1]
    index = jnp.sum(cumulative[None, :] <= targets[:, None], axis=1)
    return jnp.minimum(index, mass.shape[0] - 1)


def kmeans_plusplus(key: PRNGKey, x: Array, n_clusters: int, weights: Array) -> Array:
    r"""Greedy weighted k-means++ seeding: centres drawn from the data, shape ``(k, d)``.

    The first centre is drawn with probability proportional to the sample weight; each
    next one among ``2 + floor(log k)`` candidates drawn with probability
    :math:`\propto w_n D(x_n)^2`, :math:`D` the distance to the nearest centre so far,
    keeping the candidate that lowers the weighted potential most.

    References:
      Arthur & Vassilvitskii (2007), k-means++: the advantages of careful seeding;
      the greedy variant as in scikit-learn's ``kmeans_plusplus``.
    """
    n_trials = 2 + int(math.log(n_clusters))
    uniforms = jax.random.uniform(key, (n_clusters, n_trials), x.dtype)
    first = _draw(weights, uniforms[0, :1])[0]
    centres = jnp.broadcast_to(x[first], (n_clusters, x.shape[1]))
    closest = jnp.sum(jnp.square(x - x[first][None, :]), axis=1)

    def weighted(distances: Array) -> Array:
        """``w_n`` times the distances, shape ``(..., n_samples)``. A zero-weight row far
        out has an infinite squared distance, and 0 * inf is NaN."""
        w = weights.reshape((1,) * (distances.ndim - 1) + weights.shape)
        return jnp.where(w > 0, w * distances, 0)

    def add_centre(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        centres, closest = carry
        mass = weighted(closest)
        # When every weighted point already sits on a centre (duplicated data), draw by
        # weight alone: the duplicate centre becomes an empty component, reported later.
        mass = jnp.where(jnp.any(mass > 0), mass, weights)
        candidates = _draw(mass, uniforms[i])
        distances = squared_distances(x, x[candidates]).T  # (n_trials, n_samples)
        new_closest = jnp.minimum(closest[None, :], distances)
        best = jnp.argmin(jnp.sum(weighted(new_closest), axis=1))
        return centres.at[i].set(x[candidates[best]]), new_closest[best]

    centres, _ = jax.lax.fori_loop(1, n_clusters, add_centre, (centres, closest))
    return centres


def random_from_data(key: PRNGKey, x: Array, n_clusters: int, weights: Array) -> Array:
    """``n_clusters`` distinct samples drawn with probability proportional to weight."""
    probabilities = weights / weights.sum()
    index = jax.random.choice(key, x.shape[0], (n_clusters,), replace=False, p=probabilities)
    return x[index]
