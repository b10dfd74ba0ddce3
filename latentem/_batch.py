"""Fitting many datasets at once: :func:`fit_batch` and :func:`stack_datasets`.

A batch of datasets is an array with a leading batch axis, ``(n_datasets, n_samples,
n_features)``, plus optional sample weights ``(n_datasets, n_samples)``. Datasets of
different lengths become one such array with :func:`stack_datasets`, which pads each
with rows of weight zero. The whole batch is one compiled program: ``jax.vmap`` of
:func:`latentem.fit` over datasets and their keys, so each dataset gets its own
restarts, its own stopping iteration and its own :class:`~latentem.Status`, and a
broken dataset (NaN, all points identical, fewer points than components) changes
nothing in the results of the others.

For a model of your own, or to batch the lower layer, the same thing is one line of
JAX::

    batched_fit_em = jax.jit(jax.vmap(functools.partial(lem.fit_em, model)))
    results = batched_fit_em(initial_params, x)  # params and x with a leading batch axis

(``vmap`` maps positional arguments; pass weights through a small wrapper, e.g.
``jax.vmap(lambda p, x, w: lem.fit_em(model, p, x, weights=w))``.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latentem._base import (
    Array,
    EMResult,
    LatentModel,
    PRNGKey,
    as_computed,
    check_latent_model,
    check_positive_int,
    check_real,
    check_weights,
    float_dtype,
    is_concrete,
    jit,
    large_problem,
)
from latentem._em import expects_convergence, fit, resolve_tol, warn_on_status

# ---------------------------------------------------------------------------
# Input checks for batches. Unlike ``check_x``, a NaN in a batch is not an error: the
# dataset that holds it is fitted to Status.NONFINITE and the others are unaffected.
# ---------------------------------------------------------------------------


def check_batch(x: Any, *, name: str = "x") -> Array:
    """Return a batch of datasets as a 3-D JAX array, or raise a ``ValueError``.

    NaN and infinite values are allowed: they are a property of one dataset, which
    the fit reports as ``Status.NONFINITE``.
    """
    x = check_real(x, name)
    if x.ndim != 3:
        hint = (
            " For a single dataset use lem.fit; for datasets of different lengths use "
            "lem.stack_datasets first."
            if x.ndim == 2 and name == "x"
            else ""
        )
        raise ValueError(
            f"{name} must be 3-D with shape (n_datasets, n_samples, n_features); got shape {x.shape}.{hint}"
        )
    if min(x.shape) == 0:
        raise ValueError(
            f"{name} must have at least one dataset, one sample and one feature; got shape {x.shape}."
        )
    return as_computed(jnp.asarray(x))


def check_batch_weights(
    weights: Any, n_datasets: int, n_samples: int, dtype: Any, *, name: str = "weights", data_name: str = "x"
) -> Array:
    """Sample weights of a batch, shape ``(n_datasets, n_samples)``; ones when ``None``.
    ``name`` and ``data_name`` name the weights and their data in errors."""
    if weights is None:
        return jnp.ones((n_datasets, n_samples), dtype)
    weights = jnp.asarray(check_real(weights, name))
    if weights.shape != (n_datasets, n_samples):
        raise ValueError(
            f"{name} must have shape (n_datasets, n_samples) = ({n_datasets}, {n_samples}), one "
            f"per row of {data_name}; got shape {weights.shape}."
        )
    if is_concrete(weights) and (np.asarray(weights) < 0).any():
        datasets = np.flatnonzero((np.asarray(weights) < 0).any(axis=1))[:10].tolist()
        raise ValueError(f"{name} must be non-negative; negative in datasets {datasets}.")
    # Finite and not all zero overall: the single-dataset check, flattened.
    flat = check_weights(weights.reshape(-1), n_datasets * n_samples, dtype, name=name, data_name=data_name)
    weights = flat.reshape(weights.shape)
    if is_concrete(weights):
        empty = np.flatnonzero(~(np.asarray(weights).sum(axis=1) > 0))
        if empty.size:
            shown = ", ".join(str(i) for i in empty[:10]) + (", ..." if empty.size > 10 else "")
            raise ValueError(
                f"{name} are all zero for {empty.size} dataset(s): {shown}; give every dataset at "
                "least one sample with positive weight, or leave those datasets out."
            )
    return weights


def dataset_keys(key: PRNGKey, n_datasets: int) -> PRNGKey:
    """One key per dataset: ``key`` split ``n_datasets`` ways, or ``key`` itself if batched.

    A single key is a typed key of shape ``()`` (``jax.random.key``) or a raw
    ``uint32[2]`` key; a batch of keys has one more leading axis of length
    ``n_datasets``.
    """
    key = jnp.asarray(key)
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single_ndim = 0 if typed else 1
    if key.ndim == single_ndim:
        return jax.random.split(key, n_datasets)
    if key.ndim == single_ndim + 1 and key.shape[0] == n_datasets:
        return key
    raise ValueError(
        f"key must be one PRNG key (jax.random.key(seed)) or one key per dataset, shape "
        f"({n_datasets},); got an array of shape {key.shape} and dtype {key.dtype}."
    )


# ---------------------------------------------------------------------------
# Batch fitting
# ---------------------------------------------------------------------------


def fit_batch(
    model: LatentModel,
    key: PRNGKey,
    x: Array,
    *,
    weights: Array | None = None,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float | Array | None = None,
) -> EMResult:
    r"""Fit one model to each of a batch of datasets, in one compiled call.

    Dataset :math:`b` is fitted exactly as :func:`latentem.fit` would fit it alone with
    key :math:`k_b`: ``n_init`` restarts from ``model.init``, EM until
    :math:`|\Delta \mathcal{L}_b| < \text{tol}` or ``max_iter``, the best restart kept,

    .. math:: \mathcal{L}_b(\theta) = \frac{\sum_n w_{bn} \log p(x_{bn} \mid \theta)}
              {\sum_n w_{bn}}.

    The keys :math:`k_b` are ``jax.random.split(key, n_datasets)``, or ``key`` itself
    when it already holds one key per dataset; so ``fit_batch(model, keys, x)`` at index
    ``b`` equals ``fit(model, keys[b], x[b])`` up to round-off. The batch runs as one
    ``jax.vmap`` (compiled once per model, shapes, ``n_init`` and ``max_iter``, and
    reused), until its slowest member stops; each member keeps its own ``n_iter`` and
    ``status``. A degenerate dataset does not disturb the others: NaN data gives
    ``Status.NONFINITE`` (a row of zero weight is removed whatever it holds, NaN
    padding included); identical points or fewer
    weighted samples than components give ``Status.EMPTY_COMPONENT`` from the
    data-seeded initialisations (``init="random"`` spreads random responsibilities over
    every component, which then collapse onto the same points). Called eagerly,
    ``fit_batch`` checks shapes and weights (``ValueError``) and warns once per bad
    status with the number of datasets affected (:class:`~latentem.ConvergenceWarning`);
    it never raises for the contents of one dataset.

    Datasets of different lengths: pad them with :func:`stack_datasets`. A model of
    your own batches the same way, or one level lower with
    ``jax.vmap(functools.partial(lem.fit_em, model))`` over initial params and data.

    Args:
      model: the :class:`~latentem.LatentModel`, e.g. ``gaussian_mixture(3)``.
      key: one PRNG key, or a batch of ``n_datasets`` keys.
      x: data, shape ``(n_datasets, n_samples, n_features)``.
      weights: optional non-negative sample weights, shape ``(n_datasets, n_samples)``;
        every dataset needs some positive weight.
      n_init: number of restarts per dataset.
      max_iter: maximum EM iterations per restart.
      tol: convergence threshold on the change of the mean objective; ``None``: the
        default of :func:`~latentem.fit_em` (``1e-3``; classification EM runs to its
        fixed point).

    Returns:
      An :class:`~latentem.EMResult` whose every leaf has a leading axis
      ``n_datasets``: ``result.params.means[b]``, ``result.status[b]`` and so on.

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> x = jax.random.normal(jax.random.key(1), (4, 50, 2))  # 4 datasets
      >>> x = x + jnp.where(jnp.arange(50) < 25, 0.0, 8.0)[None, :, None]
      >>> result = lem.fit_batch(lem.gaussian_mixture(2), jax.random.key(0), x)
      >>> result.params.means.shape, result.status.tolist()
      ((4, 2, 2), [0, 0, 0, 0])
    """
    check_latent_model(model, "fit_batch")
    x = check_batch(x)
    n_datasets, n_samples = x.shape[:2]
    weights = check_batch_weights(weights, n_datasets, n_samples, float_dtype(x))
    keys = dataset_keys(key, n_datasets)
    n_init = check_positive_int(n_init, "n_init")
    max_iter = check_positive_int(max_iter, "max_iter", minimum=0)
    tol = resolve_tol(model, tol)
    result = _fit_batch_compiled(model, keys, x, weights, tol, n_init=n_init, max_iter=max_iter)
    if is_concrete(result.status):
        warn_on_status(result.status, max_iter, expects_convergence(model, tol))
    return result


@functools.partial(
    jit,
    static_argnames=("model", "n_init", "max_iter"),
    tune_if=lambda model, keys, x, *args, n_init, **kwargs: large_problem(x, n_init),
)
def _fit_batch_compiled(
    model: LatentModel, keys: PRNGKey, x: Array, weights: Array, tol: Array, *, n_init: int, max_iter: int
) -> EMResult:
    def fit_one(key: PRNGKey, x: Array, weights: Array) -> EMResult:
        x = remove_zero_weight_rows(x, weights)
        return fit(model, key, x, weights=weights, n_init=n_init, max_iter=max_iter, tol=tol)

    return jax.vmap(fit_one)(keys, x, weights)


def remove_zero_weight_rows(x: Array, weights: Array) -> Array:
    """``x`` with its rows of zero weight replaced by a row of positive weight.

    A zero weight removes a sample whatever it holds: NaN or inf padding, which
    :func:`check_batch` lets through (a dataset's NaN is its own ``NONFINITE``), would
    otherwise reach the sums as 0 * NaN and fail the whole dataset.
    """
    filler = x[jnp.argmax(weights > 0)]
    return jnp.where((weights > 0)[:, None], x, filler[None, :])


# ---------------------------------------------------------------------------
# Ragged batches
# ---------------------------------------------------------------------------


def stack_datasets(
    datasets: Sequence[Array],
    *,
    weights: Sequence[Array | None] | None = None,
    n_samples: int | None = None,
) -> tuple[Array, Array]:
    r"""Stack datasets of different lengths into one padded batch with sample weights.

    Dataset :math:`b`, with :math:`n_b` rows, fills rows :math:`0 \ldots n_b - 1` of
    ``x[b]``; the remaining rows are copies of one of its own rows with positive
    weight, and get weight exactly zero. A zero weight is the same as removing the
    sample, so a fit of the padded batch equals fitting each dataset alone, up to
    round-off. Padding with a real row rather than zeros keeps every padded row a
    harmless, finite point of the dataset's own range.

    Shapes are static, so the function also runs under ``jax.jit``. Fixing
    ``n_samples`` (for example to a power of two) lets batches of varying lengths share
    one compiled fit.

    Args:
      datasets: a sequence of arrays, each ``(n_samples_b, n_features)`` with the same
        ``n_features``.
      weights: optional per-dataset sample weights, a sequence of the same length whose
        entries are ``(n_samples_b,)`` arrays or ``None`` (ones).
      n_samples: the padded length; default the longest dataset.

    Returns:
      ``(x, weights)`` of shapes ``(n_datasets, n_samples, n_features)`` and
      ``(n_datasets, n_samples)``, ready for :func:`fit_batch`.

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> x, weights = lem.stack_datasets([jnp.ones((2, 1)), jnp.zeros((3, 1))])
      >>> x.shape, weights.tolist()
      ((2, 3, 1), [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    """
    if isinstance(datasets, (jax.Array, np.ndarray)) or not isinstance(datasets, Sequence):
        raise ValueError(
            "datasets must be a list of 2-D arrays (n_samples_b, n_features); for an array that "
            "is already a batch, call fit_batch directly."
        )
    if len(datasets) == 0:
        raise ValueError("datasets is empty; give at least one dataset.")
    arrays = [check_real(data, f"datasets[{b}]") for b, data in enumerate(datasets)]
    for b, data in enumerate(arrays):
        if data.ndim != 2 or 0 in data.shape:
            raise ValueError(
                f"datasets[{b}] must be 2-D with shape (n_samples, n_features) and at least one "
                f"row and one column; got shape {data.shape}."
            )
    n_features = arrays[0].shape[1]
    mismatched = [b for b, data in enumerate(arrays) if data.shape[1] != n_features]
    if mismatched:
        raise ValueError(
            f"every dataset needs the same number of features; datasets[0] has {n_features} but "
            f"datasets {mismatched[:10]} have {[arrays[b].shape[1] for b in mismatched[:10]]}."
        )
    longest = max(data.shape[0] for data in arrays)
    if n_samples is None:
        n_samples = longest
    n_samples = check_positive_int(n_samples, "n_samples")
    if n_samples < longest:
        raise ValueError(f"n_samples={n_samples} is shorter than the longest dataset ({longest} rows).")
    if weights is None:
        weights = [None] * len(arrays)
    if isinstance(weights, (jax.Array, np.ndarray)) or len(weights) != len(arrays):
        raise ValueError(
            f"weights must be a list with one entry (an array or None) per dataset, {len(arrays)} in all."
        )
    common = np.result_type(*(data.dtype for data in arrays))
    dtype = jax.dtypes.canonicalize_dtype(common if jnp.issubdtype(common, jnp.floating) else jnp.float64)
    if is_concrete(arrays, weights):
        # Pad on the host: eager JAX would compile a small program for every distinct
        # dataset length, which dominates for thousands of ragged datasets.
        stacked_x = np.empty((len(arrays), n_samples, n_features), dtype)
        stacked_weights = np.zeros((len(arrays), n_samples), dtype)
        for b, (data, data_weights) in enumerate(zip(arrays, weights, strict=True)):
            rows = data.shape[0]
            data_weights = check_weights(
                data_weights, rows, dtype, xp=np, name=f"weights[{b}]", data_name=f"datasets[{b}]"
            )
            stacked_x[b, :rows] = np.asarray(data)
            stacked_x[b, rows:] = stacked_x[b, np.argmax(data_weights > 0)]
            stacked_weights[b, :rows] = data_weights
        return jnp.asarray(stacked_x), jnp.asarray(stacked_weights)
    padded_x, padded_weights = [], []
    for b, (data, data_weights) in enumerate(zip(arrays, weights, strict=True)):
        data = jnp.asarray(data).astype(dtype)
        rows = data.shape[0]
        names = {"name": f"weights[{b}]", "data_name": f"datasets[{b}]"}
        data_weights = check_weights(data_weights, rows, dtype, **names)
        filler = data[jnp.argmax(data_weights > 0)]
        padded_x.append(jnp.concatenate([data, jnp.broadcast_to(filler, (n_samples - rows, n_features))]))
        padded_weights.append(jnp.concatenate([data_weights, jnp.zeros((n_samples - rows,), dtype)]))
    return jnp.stack(padded_x), jnp.stack(padded_weights)
