r"""Mixtures for discrete data: binary vectors, categorical variables, counts.

Three finite mixtures whose components are products of independent discrete
distributions, one per feature:

- :func:`bernoulli_mixture`: binary vectors, :math:`p(x_n \mid z_n = k) = \prod_d
  p_{kd}^{x_{nd}} (1 - p_{kd})^{1 - x_{nd}}`;
- :func:`categorical_mixture`: one or several integer-coded categorical variables per
  sample, :math:`p(x_n \mid z_n = k) = \prod_v p_{kv}(x_{nv})`;
- :func:`poisson_mixture`: count vectors, :math:`p(x_n \mid z_n = k) = \prod_d
  \operatorname{Poisson}(x_{nd} \mid \lambda_{kd})`.

Each has a conjugate prior controlled by one pseudo-count, ``smoothing`` (:math:`s`),
and is fitted by MAP-EM (the prior enters through ``log_prior``): a symmetric
Dirichlet(:math:`1 + s`) on the mixing weights and on each categorical distribution, a
Beta(:math:`1 + s`, :math:`1 + s`) on each Bernoulli probability, a Gamma(:math:`1 +
s`, rate :math:`s`) on each Poisson rate. The M-step then adds :math:`s` pseudo-counts
to every outcome (Laplace smoothing for :math:`s = 1`), so with :math:`s > 0` every
probability stays strictly inside (0, 1) and every rate positive, whatever the data.
``smoothing=0`` is maximum likelihood; probabilities are then clipped to
:math:`[\epsilon, 1 - \epsilon]` and rates to at least the smallest normal number of the
dtype, so the log-likelihood stays finite.

Data outside a model's support (a 2 in binary data, a negative or fractional count, a
category code out of range) has probability zero: ``log_joint`` is :math:`-\infty`
for that sample, so a compiled fit ends with ``Status.NONFINITE``; eager calls to
``init`` and ``log_joint`` raise a ``ValueError`` that names the offending entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from latentem._base import (
    Array,
    LatentModel,
    PRNGKey,
    check_choice,
    check_nonnegative,
    check_param_fields,
    check_param_shapes,
    check_positive_int,
    float_dtype,
    is_concrete,
)
from latentem.models._seeding import kmeans_plusplus, random_from_data, squared_distances

INITS = ("kmeans++", "random_from_data", "random")


class BernoulliMixtureParams(NamedTuple):
    r"""Parameters of a mixture of products of Bernoulli distributions.

    Attributes:
      weights: mixing proportions, shape ``(n_components,)``.
      probabilities: :math:`p(x_d = 1 \mid z = k)`, shape ``(n_components, n_features)``.
    """

    weights: Array
    probabilities: Array


class BernoulliMixtureUnconstrained(NamedTuple):
    """Unconstrained coordinates: ``log(weights)`` and the logits of the probabilities."""

    logits: Array
    probability_logits: Array


class CategoricalMixtureParams(NamedTuple):
    r"""Parameters of a mixture of products of categorical distributions.

    Attributes:
      weights: mixing proportions, shape ``(n_components,)``.
      probabilities: :math:`p(x_v = c \mid z = k)`, shape ``(n_components, n_variables,
        max_categories)``; each ``[k, v, :]`` sums to one. For a variable with fewer
        categories than ``max_categories`` the trailing entries are padding, held at
        exactly 0.
    """

    weights: Array
    probabilities: Array


class CategoricalMixtureUnconstrained(NamedTuple):
    """Unconstrained coordinates: ``log(weights)`` and ``log(probabilities)`` (0 at padding)."""

    logits: Array
    probability_logits: Array


class PoissonMixtureParams(NamedTuple):
    """Parameters of a mixture of products of Poisson distributions.

    Attributes:
      weights: mixing proportions, shape ``(n_components,)``.
      rates: Poisson means, shape ``(n_components, n_features)``.
    """

    weights: Array
    rates: Array


class PoissonMixtureUnconstrained(NamedTuple):
    """Unconstrained coordinates: ``log(weights)`` and ``log(rates)``."""

    logits: Array
    log_rates: Array


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _check_factory_arguments(n_components: int, smoothing: float, init: str) -> tuple[int, float]:
    n_components = check_positive_int(n_components, "n_components")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float, np.floating, np.integer)):
        raise ValueError(f"smoothing must be a non-negative number; got {smoothing!r}.")
    check_nonnegative(smoothing, "smoothing")
    check_choice(init, "init", INITS)
    return n_components, float(smoothing)


def _check_features(x: Array, n_features: int | None) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D with shape (n_samples, n_features); got shape {x.shape}.")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(
            f"x has {x.shape[1]} features but the parameters have {n_features}; "
            f"pass data with shape (n_samples, {n_features})."
        )


def _check_values(x: Array, kind: str, upper: np.ndarray | None = None) -> None:
    """On concrete data only: every value is binary / a count / a valid category code."""
    if not is_concrete(x):
        return
    values = np.asarray(x)
    if values.dtype == np.bool_:
        values = values.astype(np.int8)
    whole = values == np.round(values)
    if kind == "binary":
        bad = (values != 0) & (values != 1)
        hint = "x must be binary (0 or 1); binarise it first, e.g. (x > threshold)."
    elif kind == "count":
        bad = ~whole | (values < 0)
        hint = "x must hold non-negative integer counts."
    else:
        bad = ~whole | (values < 0) | (values >= upper[None, :])
        hint = (
            "x must hold integer category codes, column j in 0 .. n_categories[j] - 1; "
            "encode categories as integers first (e.g. with numpy.unique(..., return_inverse=True))."
        )
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{hint} Found {values[row, column]!r} at row {row}, column {column}.")


def _check_binary(x: Array) -> None:
    """The Bernoulli mixture's ``check_data``."""
    _check_features(x, None)
    _check_values(x, "binary")


def _check_counts(x: Array) -> None:
    """The Poisson mixture's ``check_data``."""
    _check_features(x, None)
    _check_values(x, "count")


def _outside_support(valid: Array) -> Array:
    """0 for a sample inside the support, -inf outside: its probability is zero under every
    component, so compiled fits on invalid data end with ``Status.NONFINITE``."""
    return jnp.where(jnp.all(valid, axis=1), 0.0, -jnp.inf)


def _is_whole(x: Array) -> Array:
    return x == jnp.round(x) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.ones(x.shape, bool)


def _mixture_weights(counts: Array, smoothing: float) -> Array:
    """MAP mixing weights under a symmetric Dirichlet(1 + s) prior: (N_k + s) / (N + K s)."""
    return (counts + smoothing) / (counts.sum() + counts.shape[0] * smoothing)


def _safe_log(values: Array) -> Array:
    """Elementwise log that gives 0 (not -inf) where ``values`` is 0; for masked terms."""
    return jnp.log(jnp.where(values > 0, values, 1))


def _initial_responsibilities(
    key: PRNGKey, features: Array, weights: Array, n_components: int, init: str
) -> Array:
    """Weighted hard (seeded) or random soft responsibilities to start the first M-step."""
    if init == "random":
        responsibilities = jax.random.uniform(key, (features.shape[0], n_components), features.dtype)
        responsibilities = responsibilities / responsibilities.sum(axis=1, keepdims=True)
    else:
        seed = kmeans_plusplus if init == "kmeans++" else random_from_data
        centres = seed(key, features, n_components, weights)
        nearest = jnp.argmin(squared_distances(features, centres), axis=1)
        responsibilities = jax.nn.one_hot(nearest, n_components, dtype=features.dtype)
    return responsibilities * weights[:, None]


def _sample_labels(key: PRNGKey, weights: Array, n_samples: int) -> Array:
    return jax.random.categorical(key, jnp.log(weights), shape=(n_samples,)).astype(jnp.int32)


def _empty(counts: Array, denominators: Array) -> Array:
    """Components whose (smoothed) mass is zero to round-off; they keep their parameters."""
    return denominators <= jnp.finfo(counts.dtype).eps * counts.sum()


def _initial_params(
    key: PRNGKey,
    x: Array,
    features: Array,
    weights: Array,
    n_components: int,
    init: str,
    estimate: Callable[[Array, Array], tuple[Array, Array, Array]],
    m_step: Callable[[Array, Array, Any], Any],
    params_type: type,
) -> Any:
    """The first M-step from seeded responsibilities (``_initial_responsibilities`` on
    ``features``); a component whose cell is empty keeps the pooled estimate of every
    sample. ``estimate`` and ``m_step`` take ``x``; ``params_type(weights, table)``."""
    weights = weights.astype(features.dtype)
    responsibilities = _initial_responsibilities(key, features, weights, n_components, init)
    _, pooled, _ = estimate(x, weights[:, None])  # one component: (1, ...)
    start = params_type(
        jnp.full((n_components,), 1 / n_components, features.dtype),
        jnp.broadcast_to(pooled, (n_components, *pooled.shape[1:])),
    )
    return m_step(x, responsibilities, start)


def _sample_mixture(
    key: PRNGKey, weights: Array, n_samples: int, draw: Callable[[PRNGKey, Array], Array]
) -> tuple[Array, Array]:
    """``n_samples`` labels drawn from ``weights`` and the values ``draw(key, labels)``."""
    n_samples = check_positive_int(n_samples, "n_samples")
    label_key, value_key = jax.random.split(key)
    labels = _sample_labels(label_key, weights, n_samples)
    return draw(value_key, labels), labels


def _n_table_parameters(table: Array) -> int:
    """Free parameters of a mixture with a ``(k, d)`` table of free values: k d + k - 1."""
    k, d = table.shape
    return int(k * d + k - 1)


# ---------------------------------------------------------------------------
# Bernoulli mixture
# ---------------------------------------------------------------------------


def bernoulli_mixture(n_components: int, smoothing: float = 1.0, init: str = "kmeans++") -> LatentModel:
    r"""A mixture of products of Bernoulli distributions, for binary vectors.

    .. math:: \log p(x_n, z_n = k) = \log \pi_k + \sum_d \big(x_{nd} \log p_{kd}
              + (1 - x_{nd}) \log(1 - p_{kd})\big)

    MAP M-step from weighted responsibilities :math:`r_{nk}`, :math:`N_k = \sum_n
    r_{nk}`, with ``smoothing`` :math:`s` pseudo-counts of each outcome:

    .. math:: p_{kd} = \frac{\sum_n r_{nk} x_{nd} + s}{N_k + 2s}, \qquad
              \pi_k = \frac{N_k + s}{\sum_j N_j + K s}.

    This is the maximiser of the expected complete-data log-likelihood plus
    ``log_prior`` (Beta(1 + s, 1 + s) on each :math:`p_{kd}`, Dirichlet(1 + s) on
    :math:`\pi`), so every probability stays strictly inside (0, 1) for :math:`s > 0`.

    Initialisation (``init``): ``"kmeans++"`` or ``"random_from_data"`` seed centres on
    the binary vectors, assign each sample to its nearest centre and take one M-step;
    ``"random"`` takes the M-step from random responsibilities. Memoised.

    Args:
      n_components: number of components :math:`K`.
      smoothing: non-negative pseudo-count :math:`s` (``1`` is Laplace smoothing, ``0``
        maximum likelihood).
      init: ``"kmeans++"``, ``"random_from_data"`` or ``"random"``.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`BernoulliMixtureParams`; ``x`` holds
      0/1 values (any numeric or boolean dtype).

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> x = jnp.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]])
      >>> result = lem.fit(lem.bernoulli_mixture(2), jax.random.key(0), x)
      >>> result.params.probabilities.shape, bool(result.converged)
      ((2, 3), True)

    References:
      Bishop (2006), Pattern Recognition and Machine Learning, §9.3.3.
    """
    n_components, smoothing = _check_factory_arguments(n_components, smoothing, init)
    return _bernoulli_mixture(n_components, smoothing, init)


@functools.lru_cache(maxsize=256)
def _bernoulli_mixture(n_components: int, smoothing: float, init: str) -> LatentModel:
    def check_params(params: BernoulliMixtureParams) -> None:
        check_param_fields(params, BernoulliMixtureParams._fields, f"bernoulli_mixture({n_components})")
        d = params.probabilities.shape[-1]
        expected = {"probabilities": (n_components, d), "weights": (n_components,)}
        check_param_shapes(params, expected, f"bernoulli_mixture({n_components}) with {d} features")

    def log_joint(params: BernoulliMixtureParams, x: Array) -> Array:
        check_params(params)
        _check_features(x, params.probabilities.shape[1])
        _check_values(x, "binary")
        x = x.astype(params.probabilities.dtype)
        log_p = jnp.log(params.probabilities)
        log_not_p = jnp.log1p(-params.probabilities)
        support = _outside_support((x == 0) | (x == 1)).astype(x.dtype)
        log_joint = x @ (log_p - log_not_p).T + (log_not_p.sum(axis=1) + jnp.log(params.weights))[None, :]
        return log_joint + support[:, None]

    def estimate(x: Array, responsibilities: Array) -> tuple[Array, Array, Array]:
        x = x.astype(responsibilities.dtype)
        counts = responsibilities.sum(axis=0)
        denominators = counts + 2 * smoothing
        safe = jnp.where(_empty(counts, denominators), 1, denominators)
        probabilities = (responsibilities.T @ x + smoothing) / safe[:, None]
        eps = jnp.finfo(probabilities.dtype).eps
        return counts, jnp.clip(probabilities, eps, 1 - eps), _empty(counts, denominators)

    def m_step(x: Array, responsibilities: Array, params: BernoulliMixtureParams) -> BernoulliMixtureParams:
        check_params(params)
        _check_features(x, params.probabilities.shape[1])
        counts, probabilities, empty = estimate(x, responsibilities)
        probabilities = jnp.where(empty[:, None], params.probabilities, probabilities)
        return BernoulliMixtureParams(_mixture_weights(counts, smoothing), probabilities)

    def initialize(key: PRNGKey, x: Array, weights: Array) -> BernoulliMixtureParams:
        _check_binary(x)
        features = jnp.asarray(x, float_dtype(x))
        return _initial_params(
            key, features, features, weights, n_components, init, estimate, m_step, BernoulliMixtureParams
        )

    def sample(key: PRNGKey, params: BernoulliMixtureParams, n_samples: int) -> tuple[Array, Array]:
        check_params(params)

        def draw(key: PRNGKey, labels: Array) -> Array:
            x = jax.random.bernoulli(key, params.probabilities[labels])
            return x.astype(params.probabilities.dtype)

        return _sample_mixture(key, params.weights, n_samples, draw)

    def n_parameters(params: BernoulliMixtureParams) -> int:
        check_params(params)
        return _n_table_parameters(params.probabilities)

    def log_prior(params: BernoulliMixtureParams) -> Array:
        p = params.probabilities
        return smoothing * (jnp.sum(jnp.log(p) + jnp.log1p(-p)) + jnp.sum(jnp.log(params.weights)))

    def to_unconstrained(params: BernoulliMixtureParams) -> BernoulliMixtureUnconstrained:
        check_params(params)
        p = params.probabilities
        return BernoulliMixtureUnconstrained(jnp.log(params.weights), jnp.log(p) - jnp.log1p(-p))

    def from_unconstrained(unconstrained: BernoulliMixtureUnconstrained) -> BernoulliMixtureParams:
        return BernoulliMixtureParams(
            jax.nn.softmax(unconstrained.logits), jax.nn.sigmoid(unconstrained.probability_logits)
        )

    return LatentModel(
        init=initialize,
        log_joint=log_joint,
        m_step=m_step,
        sample=sample,
        n_parameters=n_parameters,
        log_prior=log_prior if smoothing > 0 else None,
        to_unconstrained=to_unconstrained,
        from_unconstrained=from_unconstrained,
        check_data=_check_binary,
    )


# ---------------------------------------------------------------------------
# Categorical mixture
# ---------------------------------------------------------------------------


def categorical_mixture(
    n_components: int, n_categories: int | tuple[int, ...], smoothing: float = 1.0, init: str = "kmeans++"
) -> LatentModel:
    r"""A mixture of products of categorical distributions, for integer-coded data.

    Each sample holds ``n_variables`` categorical variables, coded as integers: column
    :math:`v` takes values :math:`0, \dots, C_v - 1`. One variable per sample is the
    plain categorical (multinoulli) mixture; several are the latent class model.

    .. math:: \log p(x_n, z_n = k) = \log \pi_k + \sum_v \log p_{kv}(x_{nv})

    MAP M-step with ``smoothing`` :math:`s` pseudo-counts of each category:

    .. math:: p_{kv}(c) = \frac{\sum_n r_{nk} [x_{nv} = c] + s}{N_k + C_v s}, \qquad
              \pi_k = \frac{N_k + s}{\sum_j N_j + K s},

    the maximiser of the expected complete-data log-likelihood plus ``log_prior``
    (Dirichlet(1 + s) on each distribution and on :math:`\pi`).

    Initialisation (``init``) as :func:`bernoulli_mixture`, on the one-hot encoding of
    the data. Memoised.

    Args:
      n_components: number of components :math:`K`.
      n_categories: the number of categories :math:`C_v`: one int shared by every
        variable (any number of columns), or a tuple with one entry per column of ``x``.
      smoothing: non-negative pseudo-count :math:`s`.
      init: ``"kmeans++"``, ``"random_from_data"`` or ``"random"``.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`CategoricalMixtureParams`; ``x`` has
      shape ``(n_samples, n_variables)`` and holds integer codes (any numeric dtype).

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> x = jnp.array([[0, 2], [0, 2], [1, 0], [1, 1]])
      >>> model = lem.categorical_mixture(2, n_categories=(2, 3))
      >>> result = lem.fit(model, jax.random.key(0), x)
      >>> result.params.probabilities.shape, bool(result.converged)
      ((2, 2, 3), True)

    References:
      Lazarsfeld & Henry (1968), Latent Structure Analysis; Bishop (2006), §9.3.3.
    """
    n_components, smoothing = _check_factory_arguments(n_components, smoothing, init)
    if isinstance(n_categories, (tuple, list)):
        if len(n_categories) == 0:
            raise ValueError("n_categories must have one entry per variable; got an empty tuple.")
        n_categories = tuple(check_positive_int(c, "each entry of n_categories") for c in n_categories)
    else:
        n_categories = check_positive_int(n_categories, "n_categories")
    return _categorical_mixture(n_components, n_categories, smoothing, init)


@functools.lru_cache(maxsize=256)
def _categorical_mixture(
    n_components: int, n_categories: int | tuple[int, ...], smoothing: float, init: str
) -> LatentModel:
    shared = isinstance(n_categories, int)
    max_categories = n_categories if shared else max(n_categories)

    def sizes(n_variables: int) -> np.ndarray:
        return np.full(n_variables, n_categories) if shared else np.asarray(n_categories)

    def mask(n_variables: int) -> np.ndarray:
        """Static (n_variables, max_categories) mask of the categories that exist."""
        return np.arange(max_categories)[None, :] < sizes(n_variables)[:, None]

    def check_data(x: Array, n_variables: int | None) -> None:
        _check_features(x, n_variables)
        if not shared and x.shape[1] != len(n_categories):
            raise ValueError(
                f"x has {x.shape[1]} columns but n_categories has {len(n_categories)} entries; "
                "give one number of categories per column."
            )
        _check_values(x, "categorical", sizes(x.shape[1]))

    def check_params(params: CategoricalMixtureParams) -> None:
        model = f"categorical_mixture({n_components}, n_categories={n_categories!r})"
        check_param_fields(params, CategoricalMixtureParams._fields, model)
        v = params.probabilities.shape[-2] if shared else len(n_categories)
        check_param_shapes(
            params,
            {"probabilities": (n_components, v, max_categories), "weights": (n_components,)},
            f"categorical_mixture({n_components}, n_categories={n_categories!r}) with {v} variables",
        )

    def one_hot(x: Array, dtype: np.dtype) -> Array:
        """(n_samples, n_variables * max_categories) indicators of the observed codes."""
        codes = x.astype(jnp.int32) if not jnp.issubdtype(x.dtype, jnp.integer) else x
        indicators = jax.nn.one_hot(codes, max_categories, dtype=dtype)
        return indicators.reshape(x.shape[0], -1)

    def log_joint(params: CategoricalMixtureParams, x: Array) -> Array:
        check_params(params)
        check_data(x, params.probabilities.shape[1])
        k = params.probabilities.shape[0]
        present = jnp.asarray(mask(x.shape[1]))[None, :, :]
        # Padded categories are never observed; log 0 there would give 0 * -inf = NaN.
        log_p = jnp.where(present, _safe_log(params.probabilities), 0).reshape(k, -1)
        upper = jnp.asarray(sizes(x.shape[1]), x.dtype)[None, :]
        support = _outside_support((x >= 0) & (x < upper) & _is_whole(x)).astype(params.weights.dtype)
        log_joint = one_hot(x, params.probabilities.dtype) @ log_p.T + jnp.log(params.weights)[None, :]
        return log_joint + support[:, None]

    def estimate(x: Array, responsibilities: Array) -> tuple[Array, Array, Array]:
        n_variables = x.shape[1]
        k = responsibilities.shape[1]
        counts = responsibilities.sum(axis=0)
        present = jnp.asarray(mask(n_variables))[None, :, :]
        table = (responsibilities.T @ one_hot(x, responsibilities.dtype)).reshape(
            k, n_variables, max_categories
        )
        size = jnp.asarray(sizes(n_variables), responsibilities.dtype)
        denominators = counts[:, None] + size[None, :] * smoothing  # (k, v)
        empty = _empty(counts, denominators.min(axis=1))
        safe = jnp.where(empty[:, None], 1, denominators)
        probabilities = jnp.where(present, (table + smoothing) / safe[:, :, None], 0)
        # Keep every probability at least eps, then renormalise (inactive when s > 0).
        eps = jnp.finfo(probabilities.dtype).eps
        probabilities = jnp.where(present, jnp.maximum(probabilities, eps), 0)
        probabilities = probabilities / probabilities.sum(axis=2, keepdims=True)
        return counts, probabilities, empty

    def m_step(
        x: Array, responsibilities: Array, params: CategoricalMixtureParams
    ) -> CategoricalMixtureParams:
        check_params(params)
        check_data(x, params.probabilities.shape[1])
        counts, probabilities, empty = estimate(x, responsibilities)
        probabilities = jnp.where(empty[:, None, None], params.probabilities, probabilities)
        return CategoricalMixtureParams(_mixture_weights(counts, smoothing), probabilities)

    def initialize(key: PRNGKey, x: Array, weights: Array) -> CategoricalMixtureParams:
        check_data(x, None)
        features = one_hot(x, float_dtype(x))
        return _initial_params(
            key, x, features, weights, n_components, init, estimate, m_step, CategoricalMixtureParams
        )

    def sample(key: PRNGKey, params: CategoricalMixtureParams, n_samples: int) -> tuple[Array, Array]:
        check_params(params)

        def draw(key: PRNGKey, labels: Array) -> Array:
            # log 0 = -inf at the padding: those categories are never drawn.
            x = jax.random.categorical(key, jnp.log(params.probabilities[labels]), axis=-1)
            return x.astype(jnp.int32)

        return _sample_mixture(key, params.weights, n_samples, draw)

    def n_parameters(params: CategoricalMixtureParams) -> int:
        check_params(params)
        k, n_variables, _ = params.probabilities.shape
        return int(k * (int(sizes(n_variables).sum()) - n_variables) + k - 1)

    def log_prior(params: CategoricalMixtureParams) -> Array:
        present = jnp.asarray(mask(params.probabilities.shape[1]))[None, :, :]
        log_p = jnp.where(present, _safe_log(params.probabilities), 0)
        return smoothing * (jnp.sum(log_p) + jnp.sum(jnp.log(params.weights)))

    def to_unconstrained(params: CategoricalMixtureParams) -> CategoricalMixtureUnconstrained:
        check_params(params)
        present = jnp.asarray(mask(params.probabilities.shape[1]))[None, :, :]
        log_p = jnp.where(present, _safe_log(params.probabilities), 0)
        return CategoricalMixtureUnconstrained(jnp.log(params.weights), log_p)

    def from_unconstrained(unconstrained: CategoricalMixtureUnconstrained) -> CategoricalMixtureParams:
        logits = unconstrained.probability_logits
        present = jnp.asarray(mask(logits.shape[1]))[None, :, :]
        probabilities = jax.nn.softmax(jnp.where(present, logits, -jnp.inf), axis=2)
        return CategoricalMixtureParams(jax.nn.softmax(unconstrained.logits), probabilities)

    return LatentModel(
        init=initialize,
        log_joint=log_joint,
        m_step=m_step,
        sample=sample,
        n_parameters=n_parameters,
        log_prior=log_prior if smoothing > 0 else None,
        to_unconstrained=to_unconstrained,
        from_unconstrained=from_unconstrained,
        check_data=functools.partial(check_data, n_variables=None),
    )


# ---------------------------------------------------------------------------
# Poisson mixture
# ---------------------------------------------------------------------------


def poisson_mixture(n_components: int, smoothing: float = 1.0, init: str = "kmeans++") -> LatentModel:
    r"""A mixture of products of Poisson distributions, for count vectors.

    .. math:: \log p(x_n, z_n = k) = \log \pi_k + \sum_d \big(x_{nd} \log \lambda_{kd}
              - \lambda_{kd} - \log x_{nd}!\big)

    MAP M-step with ``smoothing`` :math:`s`: a Gamma(1 + s, rate s) prior on each rate
    (mode 1, the weight of :math:`s` pseudo-observations of one count) and
    Dirichlet(1 + s) on the weights,

    .. math:: \lambda_{kd} = \frac{\sum_n r_{nk} x_{nd} + s}{N_k + s}, \qquad
              \pi_k = \frac{N_k + s}{\sum_j N_j + K s},

    so every rate stays positive even for a feature that is always zero in a
    component. Initialisation as :func:`bernoulli_mixture`, on the raw counts. Memoised.

    Args:
      n_components: number of components :math:`K`.
      smoothing: non-negative pseudo-count :math:`s` (``0`` is maximum likelihood).
      init: ``"kmeans++"``, ``"random_from_data"`` or ``"random"``.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`PoissonMixtureParams`; ``x`` holds
      non-negative integer counts (any numeric dtype).

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> x = jnp.array([[0, 1], [1, 0], [9, 12], [11, 10]])
      >>> result = lem.fit(lem.poisson_mixture(2, smoothing=0.0), jax.random.key(0), x)
      >>> jnp.sort(result.params.rates[:, 0]).round(2).tolist()
      [0.5, 10.0]

    References:
      Bishop (2006), Pattern Recognition and Machine Learning, §9.3 (EM for mixtures);
      McLachlan & Peel (2000), Finite Mixture Models, §1.
    """
    n_components, smoothing = _check_factory_arguments(n_components, smoothing, init)
    return _poisson_mixture(n_components, smoothing, init)


@functools.lru_cache(maxsize=256)
def _poisson_mixture(n_components: int, smoothing: float, init: str) -> LatentModel:
    def check_params(params: PoissonMixtureParams) -> None:
        check_param_fields(params, PoissonMixtureParams._fields, f"poisson_mixture({n_components})")
        d = params.rates.shape[-1]
        expected = {"rates": (n_components, d), "weights": (n_components,)}
        check_param_shapes(params, expected, f"poisson_mixture({n_components}) with {d} features")

    def log_joint(params: PoissonMixtureParams, x: Array) -> Array:
        check_params(params)
        _check_features(x, params.rates.shape[1])
        _check_values(x, "count")
        x = x.astype(params.rates.dtype)
        support = _outside_support((x >= 0) & _is_whole(x)).astype(x.dtype)
        # gammaln of a negative count would be finite garbage; the support term says -inf.
        log_normaliser = gammaln(jnp.abs(x) + 1).sum(axis=1)
        # Rates at least the smallest normal float: a rate of exactly 0 (a feature never
        # counted, its rate underflowed or given so) would make 0 * log 0 NaN in the product.
        log_rates = jnp.log(jnp.maximum(params.rates, jnp.finfo(params.rates.dtype).tiny))
        log_p = x @ log_rates.T - (log_normaliser - support)[:, None]
        return log_p + (jnp.log(params.weights) - params.rates.sum(axis=1))[None, :]

    def estimate(x: Array, responsibilities: Array) -> tuple[Array, Array, Array]:
        x = x.astype(responsibilities.dtype)
        counts = responsibilities.sum(axis=0)
        denominators = counts + smoothing
        empty = _empty(counts, denominators)
        safe = jnp.where(empty, 1, denominators)
        rates = (responsibilities.T @ x + smoothing) / safe[:, None]
        return counts, jnp.maximum(rates, jnp.finfo(rates.dtype).tiny), empty

    def m_step(x: Array, responsibilities: Array, params: PoissonMixtureParams) -> PoissonMixtureParams:
        check_params(params)
        _check_features(x, params.rates.shape[1])
        counts, rates, empty = estimate(x, responsibilities)
        return PoissonMixtureParams(
            _mixture_weights(counts, smoothing), jnp.where(empty[:, None], params.rates, rates)
        )

    def initialize(key: PRNGKey, x: Array, weights: Array) -> PoissonMixtureParams:
        _check_counts(x)
        features = jnp.asarray(x, float_dtype(x))
        return _initial_params(
            key, features, features, weights, n_components, init, estimate, m_step, PoissonMixtureParams
        )

    def sample(key: PRNGKey, params: PoissonMixtureParams, n_samples: int) -> tuple[Array, Array]:
        check_params(params)

        def draw(key: PRNGKey, labels: Array) -> Array:
            return jax.random.poisson(key, params.rates[labels]).astype(params.rates.dtype)

        return _sample_mixture(key, params.weights, n_samples, draw)

    def n_parameters(params: PoissonMixtureParams) -> int:
        check_params(params)
        return _n_table_parameters(params.rates)

    def log_prior(params: PoissonMixtureParams) -> Array:
        rates = params.rates
        return smoothing * (jnp.sum(jnp.log(rates) - rates) + jnp.sum(jnp.log(params.weights)))

    def to_unconstrained(params: PoissonMixtureParams) -> PoissonMixtureUnconstrained:
        check_params(params)
        return PoissonMixtureUnconstrained(jnp.log(params.weights), jnp.log(params.rates))

    def from_unconstrained(unconstrained: PoissonMixtureUnconstrained) -> PoissonMixtureParams:
        return PoissonMixtureParams(jax.nn.softmax(unconstrained.logits), jnp.exp(unconstrained.log_rates))

    return LatentModel(
        init=initialize,
        log_joint=log_joint,
        m_step=m_step,
        sample=sample,
        n_parameters=n_parameters,
        log_prior=log_prior if smoothing > 0 else None,
        to_unconstrained=to_unconstrained,
        from_unconstrained=from_unconstrained,
        check_data=_check_counts,
    )
