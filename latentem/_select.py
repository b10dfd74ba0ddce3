"""Choosing the number of components (and the covariance type) of a Gaussian mixture.

:func:`select_n_components` fits every candidate and scores it by BIC, AIC or the
mean log-likelihood of held-out data. All candidates of one covariance type run in one
``vmap`` of a single EM loop: each candidate is fitted with ``max(candidates)``
components, the ones it does not have switched off (weight exactly zero). A
switched-off component has ``log p(x_n, z_n = k) = -inf``, so its responsibilities are
exactly zero, the M-step leaves its weight at exactly zero, and the fit is the
candidate's own fit up to round-off. One compilation then serves every candidate: on
two CPU cores, candidates 1 to 8 compile and run in about a third of the time that one
compiled fit per candidate takes (``benchmarks/batch.py --sections selection``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentem._base import (
    Array,
    EMResult,
    LatentModel,
    PRNGKey,
    Status,
    check_choice,
    check_key,
    check_nonnegative,
    check_positive_int,
    check_weights,
    check_x,
    float_dtype,
    is_concrete,
    jit,
    large_problem,
    tiny_problem,
)
from latentem._batch import check_batch, check_batch_weights, dataset_keys
from latentem._em import (
    _any_empty_state,
    _weighted_posterior,
    best_restart,
    e_step,
    expects_convergence,
    fit_em,
    score,
    warn_on_status,
)
from latentem.models.gaussian_mixture import COVARIANCE_TYPES, GaussianMixtureParams, gaussian_mixture

CRITERIA = ("bic", "aic", "heldout")


class SelectionResult(NamedTuple):
    """What :func:`select_n_components` returns: the table of candidates and the choice.

    One row per candidate, in the order: each covariance type as given, and within it
    ``n_components`` ascending. For a batch of datasets every field has a leading axis
    ``n_datasets``. ``SelectionResult.COVARIANCE_TYPES`` decodes ``covariance_type``.

    Attributes:
      n_components: shape ``(n_candidates,)``, int32, each candidate's number of
        components.
      covariance_type: shape ``(n_candidates,)``, int32, each candidate's covariance
        type as an index into ``COVARIANCE_TYPES = ("full", "tied", "diag",
        "spherical")``.
      score: shape ``(n_candidates,)``, the criterion: BIC or AIC (lower is better) or
        the mean held-out log-likelihood (higher is better); ``inf`` (``-inf`` for
        held-out) for a candidate whose fit is not finite.
      log_likelihood: shape ``(n_candidates,)``, the mean log-likelihood of the
        training data at each candidate's fitted parameters.
      n_parameters: shape ``(n_candidates,)``, int32, free parameters of each candidate.
      status: shape ``(n_candidates,)``, int32, each candidate's :class:`Status`,
        judged on its own components only.
      best: int32 index of the chosen candidate (the best finite score; ties go to the
        earlier row, so to fewer components). When no score is finite (as when every
        status is ``NONFINITE``) it is 0, and :meth:`chosen` raises.
      best_n_components: int32, ``n_components[best]``.
      params: the chosen candidate's fitted :class:`GaussianMixtureParams`, padded to
        ``max(candidates)`` components: the components it does not have come last, with
        weight exactly zero (finite means and covariances), so the params work as they
        are with ``gaussian_mixture(max(candidates), covariance_type)``. When several
        covariance types are compared, covariances are given as full matrices (for
        ``gaussian_mixture(max(candidates), "full")``), whatever the type chosen. Use
        :meth:`chosen` for the params in the candidate's own shape.
    """

    n_components: Array
    covariance_type: Array
    score: Array
    log_likelihood: Array
    n_parameters: Array
    status: Array
    best: Array
    best_n_components: Array
    params: GaussianMixtureParams

    COVARIANCE_TYPES = COVARIANCE_TYPES  # a class constant, not a field

    def table(self) -> list[dict[str, Any]]:
        """The candidates as a list of rows (dicts), for printing or ``pandas.DataFrame``.

        Needs a concrete, unbatched result (an eager call on one dataset).
        """
        _require_unbatched(self)
        rows = []
        for index in range(int(np.asarray(self.n_components).shape[0])):
            rows.append(
                {
                    "n_components": int(self.n_components[index]),
                    "covariance_type": COVARIANCE_TYPES[int(self.covariance_type[index])],
                    "score": float(self.score[index]),
                    "log_likelihood": float(self.log_likelihood[index]),
                    "n_parameters": int(self.n_parameters[index]),
                    "status": Status(int(self.status[index])).name,
                    "best": index == int(self.best) and self._has_a_finite_score(),
                }
            )
        return rows

    def chosen(self) -> tuple[int, str, GaussianMixtureParams]:
        """``(n_components, covariance_type, params)`` of the chosen candidate.

        ``params`` are trimmed to the candidate's own components and covariance shape,
        ready for ``gaussian_mixture(n_components, covariance_type)``. Needs a
        concrete, unbatched result, and raises a ``ValueError`` when no candidate has a
        finite score (there is nothing to choose).
        """
        _require_unbatched(self)
        if not self._has_a_finite_score():
            raise ValueError(
                "no candidate has a finite score (see table(): every fit NONFINITE, or held-out "
                "log-likelihoods of -inf), so there is nothing to choose: increase reg_covar (it "
                "must be > 0 for data with identical points), try fewer components, or scale the "
                "data."
            )
        n_components = int(self.best_n_components)
        covariance_type = COVARIANCE_TYPES[int(self.covariance_type[int(self.best)])]
        several_types = len(set(np.asarray(self.covariance_type).tolist())) > 1
        covariances = self.params.covariances
        if several_types:  # full matrices for every type: take the chosen type's back
            covariances = covariances[:n_components]
            if covariance_type != "full":
                covariances = _from_full(covariances, covariance_type)
        elif covariance_type != "tied":  # "tied" is one shared matrix, never padded
            covariances = covariances[:n_components]
        trimmed = GaussianMixtureParams(
            weights=self.params.weights[:n_components],
            means=self.params.means[:n_components],
            covariances=covariances,
        )
        return n_components, covariance_type, trimmed

    def _has_a_finite_score(self) -> bool:
        # best is the best finite score; with none finite it is the first row, and its
        # score is infinite (inf for BIC and AIC, -inf held out).
        return bool(np.isfinite(np.asarray(self.score)[int(self.best)]))


def _require_unbatched(result: SelectionResult) -> None:
    if not is_concrete(result.best) or np.ndim(result.best) != 0:
        raise ValueError(
            "this method needs the result of an eager call on one dataset; for a batch, take "
            "one dataset first: jax.tree.map(lambda leaf: leaf[i], result)."
        )


def _to_full(covariances: Array, covariance_type: str, n_components: int, n_features: int) -> Array:
    """Covariances of any type as full matrices, shape ``(n_components, d, d)``."""
    identity = jnp.eye(n_features, dtype=covariances.dtype)
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return jnp.broadcast_to(covariances, (n_components, n_features, n_features))
    if covariance_type == "diag":
        return covariances[:, :, None] * identity[None, :, :]
    return covariances[:, None, None] * identity[None, :, :]


def _from_full(covariances: Array, covariance_type: str) -> Array:
    """Inverse of ``_to_full`` for the covariance type that produced the matrices."""
    if covariance_type == "tied":
        return covariances[0]
    diagonal = jnp.diagonal(covariances, axis1=1, axis2=2)
    return diagonal if covariance_type == "diag" else diagonal[:, 0]


# ---------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------


def select_n_components(
    key: PRNGKey,
    x: Array,
    candidates: Sequence[int],
    *,
    covariance_type: str | Sequence[str] = "full",
    criterion: str = "bic",
    x_validation: Array | None = None,
    validation_weights: Array | None = None,
    weights: Array | None = None,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float | Array = 1e-3,
    reg_covar: float = 1e-6,
    init: str = "kmeans++",
    reg_covar_mode: str = "relative",
) -> SelectionResult:
    r"""Fit a Gaussian mixture for every candidate number of components and choose one.

    Each candidate :math:`(K, \text{type})` is fitted as :func:`latentem.fit` would fit
    ``gaussian_mixture(K, type)`` (``n_init`` restarts, the best kept) and scored by

    .. math:: \mathrm{BIC} = -2 \sum_n w_n \log p(x_n \mid \hat\theta) + p \log \sum_n w_n,
              \qquad \mathrm{AIC} = -2 \sum_n w_n \log p(x_n \mid \hat\theta) + 2p,

    with :math:`p` the candidate's own number of free parameters (lower is better), or,
    with ``criterion="heldout"``, by the mean log-likelihood of ``x_validation``,
    :math:`\sum_m v_m \log p(x'_m \mid \hat\theta) / \sum_m v_m` (higher is better): the
    training likelihood keeps rising with :math:`K`, the held-out one peaks where extra
    components start to fit noise. Candidate :math:`c` (in table order) uses key
    ``jax.random.split(key, n_candidates)[c]``, so it equals
    ``fit(gaussian_mixture(K, type), that_key, x, n_init=n_init)`` up to round-off.

    All candidates of a covariance type are one ``vmap`` over a single compiled EM loop,
    padded to ``max(candidates)`` components with the extra ones switched off; the
    program is compiled once per shapes and options and reused. A status of
    ``Status.EMPTY_COMPONENT`` refers to a candidate's own components only.

    **A batch of datasets**: pass ``x`` of shape ``(n_datasets, n_samples,
    n_features)`` (with ``weights`` ``(n_datasets, n_samples)``, ``x_validation``
    ``(n_datasets, n_validation, n_features)``; ragged data through
    :func:`latentem.stack_datasets`); dataset :math:`b` uses
    ``jax.random.split(key, n_datasets)[b]`` (or ``key[b]`` when ``key`` holds one key
    per dataset) and the result gains a leading axis. Equivalently, ``jax.vmap`` the
    one-dataset call. A degenerate dataset (NaN) gets its own statuses and leaves the
    others unchanged.

    Args:
      key: a PRNG key (one per dataset also accepted for a batch).
      x: training data, ``(n_samples, n_features)`` or a batch of them.
      candidates: the numbers of components to try, positive ints (sorted, duplicates
        dropped), each at most ``n_samples``.
      covariance_type: one of ``"full"``, ``"tied"``, ``"diag"``, ``"spherical"``, or
        a sequence of them to compare those too.
      criterion: ``"bic"``, ``"aic"`` or ``"heldout"``.
      x_validation: held-out data, required for (and only used with) ``"heldout"``.
      validation_weights: optional sample weights of ``x_validation``.
      weights: optional non-negative sample weights of ``x``.
      n_init: restarts per candidate.
      max_iter: maximum EM iterations per restart.
      tol: convergence threshold on the change of the mean log-likelihood.
      reg_covar: as in :func:`latentem.gaussian_mixture`.
      init: as in :func:`latentem.gaussian_mixture`.
      reg_covar_mode: as in :func:`latentem.gaussian_mixture`.

    Returns:
      A :class:`SelectionResult`: the table of candidates, their scores and statuses,
      the choice and its fitted params.

    Example:
      >>> import jax, latentem as lem
      >>> x = lem.datasets.load_faithful()
      >>> result = lem.select_n_components(jax.random.key(0), x, range(1, 5), n_init=2)
      >>> int(result.best_n_components), result.score.shape
      (2, (4,))
      >>> n_components, covariance_type, params = result.chosen()
      >>> params.means.shape
      (2, 2)
    """
    check_choice(criterion, "criterion", CRITERIA)
    covariance_types = _check_covariance_types(covariance_type)
    candidates = _check_candidates(candidates)
    n_init = check_positive_int(n_init, "n_init")
    max_iter = check_positive_int(max_iter, "max_iter", minimum=0)
    check_nonnegative(tol, "tol")
    # Validate the model options once, with the factory's own messages.
    gaussian_mixture(candidates[-1], covariance_types[0], reg_covar, init, reg_covar_mode)
    if criterion == "heldout" and x_validation is None:
        raise ValueError('criterion="heldout" needs x_validation, the held-out data to score.')
    if criterion != "heldout" and (x_validation is not None or validation_weights is not None):
        raise ValueError(
            f'x_validation is only used with criterion="heldout"; drop it or use that '
            f"criterion (got criterion={criterion!r})."
        )

    batched = np.ndim(x) == 3
    if batched:
        x = check_batch(x)
        weights = check_batch_weights(weights, x.shape[0], x.shape[1], float_dtype(x))
        keys = dataset_keys(key, x.shape[0])
    else:
        x = check_x(x)
        weights = check_weights(weights, x.shape[0], float_dtype(x))
        keys = check_key(key)
    if candidates[-1] > x.shape[-2]:
        raise ValueError(
            f"candidates go up to {candidates[-1]} components but x has {x.shape[-2]} samples; "
            f"use candidates <= {x.shape[-2]}."
        )
    if criterion == "heldout":
        x_validation, validation_weights = _check_validation(x, x_validation, validation_weights, batched)
    else:
        # Dummy validation data keeps one signature for the compiled program.
        x_validation = x[..., :1, :]
        validation_weights = weights[..., :1]

    options = dict(
        candidates=candidates,
        covariance_types=covariance_types,
        criterion=criterion,
        n_init=n_init,
        max_iter=max_iter,
        reg_covar=float(reg_covar),
        init=init,
        reg_covar_mode=reg_covar_mode,
    )
    result = _select_compiled(
        keys, x, weights, x_validation, validation_weights, tol, batched=batched, **options
    )
    if is_concrete(result.status):
        warn_on_status(result.status, max_iter, expects_convergence(None, tol))
    return result


def _check_covariance_types(covariance_type: Any) -> tuple[str, ...]:
    types = (covariance_type,) if isinstance(covariance_type, str) else tuple(covariance_type)
    if not types:
        raise ValueError("covariance_type is empty; give one type or a sequence of them.")
    for name in types:
        check_choice(name, "covariance_type", COVARIANCE_TYPES)
    if len(set(types)) != len(types):
        raise ValueError(f"covariance_type lists a type twice: {types}.")
    return types


def _check_candidates(candidates: Any) -> tuple[int, ...]:
    if isinstance(candidates, (int, np.integer)):
        raise ValueError(
            f"candidates must be a sequence of numbers of components, e.g. range(1, {candidates + 1}); "
            f"got the single number {candidates}."
        )
    try:
        values = list(candidates)
    except TypeError as error:
        raise ValueError(f"candidates must be a sequence of positive ints; got {candidates!r}.") from error
    if not values:
        raise ValueError("candidates is empty; give at least one number of components.")
    return tuple(sorted({check_positive_int(value, "each candidate") for value in values}))


def _check_validation(
    x: Array, x_validation: Any, validation_weights: Any, batched: bool
) -> tuple[Array, Array]:
    if batched:
        x_validation = check_batch(x_validation, name="x_validation")
        if x_validation.shape[0] != x.shape[0]:
            raise ValueError(
                f"x_validation must hold one dataset per dataset of x ({x.shape[0]}); got "
                f"{x_validation.shape[0]}."
            )
        validation_weights = check_batch_weights(
            validation_weights,
            x_validation.shape[0],
            x_validation.shape[1],
            float_dtype(x),
            name="validation_weights",
            data_name="x_validation",
        )
    else:
        x_validation = check_x(x_validation, name="x_validation")
        validation_weights = check_weights(
            validation_weights,
            x_validation.shape[0],
            float_dtype(x),
            name="validation_weights",
            data_name="x_validation",
        )
    if x_validation.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"x_validation has {x_validation.shape[-1]} features but x has {x.shape[-1]}; they "
            "must describe the same features."
        )
    # The training data's float dtype: integer x (counts) must not truncate them.
    return x_validation.astype(float_dtype(x)), validation_weights


# ---------------------------------------------------------------------------
# The compiled program
# ---------------------------------------------------------------------------


@functools.partial(
    jit,
    static_argnames=(
        "batched",
        "candidates",
        "covariance_types",
        "criterion",
        "n_init",
        "max_iter",
        "reg_covar",
        "init",
        "reg_covar_mode",
    ),
    tune_if=lambda keys, x, *args, candidates, n_init, **kwargs: large_problem(x, n_init * len(candidates)),
    quick_compile=True,
    tiny_if=lambda keys, x, *args, candidates, n_init, **kwargs: tiny_problem(x, n_init * len(candidates)),
)
def _select_compiled(
    keys: PRNGKey,
    x: Array,
    weights: Array,
    x_validation: Array,
    validation_weights: Array,
    tol: Array,
    *,
    batched: bool,
    **options: Any,
) -> SelectionResult:
    select_one = functools.partial(_select_one, tol=tol, **options)
    if batched:
        return jax.vmap(select_one)(keys, x, weights, x_validation, validation_weights)
    return select_one(keys, x, weights, x_validation, validation_weights)


class _TypeFits(NamedTuple):
    """Every candidate of one covariance type, fitted (leading axis: candidates)."""

    params: GaussianMixtureParams
    log_likelihood: Array
    status: Array
    held_out: Array | None
    n_parameters: list[int]


def _fit_type(
    keys: PRNGKey,
    x: Array,
    weights: Array,
    x_validation: Array,
    validation_weights: Array,
    *,
    covariance_type: str,
    tol: Array,
    candidates: tuple[int, ...],
    criterion: str,
    n_init: int,
    max_iter: int,
    reg_covar: float,
    init: str,
    reg_covar_mode: str,
) -> _TypeFits:
    """All candidates of one covariance type: one vmap of one EM loop, padded models."""
    largest = candidates[-1]
    model = gaussian_mixture(largest, covariance_type, reg_covar, init, reg_covar_mode)
    # Each candidate's own initialisation (as lem.fit would draw it), padded to `largest`
    # with switched-off components. A Python loop: only the small init code is compiled
    # per candidate, the EM loop once.
    starts, n_parameters = [], []
    for key, n_components in zip(keys, candidates, strict=True):
        own = gaussian_mixture(n_components, covariance_type, reg_covar, init, reg_covar_mode)
        own_params = jax.vmap(lambda restart_key, own=own: own.init(restart_key, x, weights))(
            jax.random.split(key, n_init)
        )
        starts.append(_pad_components(own_params, largest, covariance_type))
        n_parameters.append(own.n_parameters(jax.tree.map(lambda leaf: leaf[0], own_params)))
    starts = jax.tree.map(lambda *leaves: jnp.stack(leaves), *starts)  # (n_candidates, n_init, ...)

    def fit_candidate(restart_params: GaussianMixtureParams) -> EMResult:
        results = jax.vmap(
            lambda params: fit_em(model, params, x, weights=weights, max_iter=max_iter, tol=tol)
        )(restart_params)
        # The best restart, chosen as lem.fit chooses it.
        return best_restart(results) if n_init > 1 else jax.tree.map(lambda leaf: leaf[0], results)

    results = jax.vmap(fit_candidate)(starts)
    status = jax.vmap(lambda result, n_own: _own_status(model, result, x, weights, n_own))(
        results, jnp.asarray(candidates, jnp.int32)
    )
    held_out = None
    if criterion == "heldout":
        held_out = jax.vmap(lambda params: score(model, params, x_validation, validation_weights))(
            results.params
        )
    return _TypeFits(results.params, results.log_likelihood, status, held_out, n_parameters)


def _select_one(
    key: PRNGKey,
    x: Array,
    weights: Array,
    x_validation: Array,
    validation_weights: Array,
    *,
    covariance_types: tuple[str, ...],
    **options: Any,
) -> SelectionResult:
    """All candidates on one dataset (traceable; the body of the compiled program)."""
    x = x.astype(float_dtype(x))
    weights = weights.astype(x.dtype)
    candidates, criterion = options["candidates"], options["criterion"]
    largest, n_features = candidates[-1], x.shape[1]
    # Row r of the table (types outer, n_components inner) uses split(key, n_rows)[r].
    keys = jax.random.split(key, len(candidates) * len(covariance_types))
    keys = keys.reshape(len(covariance_types), len(candidates))
    fits = [
        _fit_type(keys[index], x, weights, x_validation, validation_weights, covariance_type=name, **options)
        for index, name in enumerate(covariance_types)
    ]

    log_likelihood = jnp.concatenate([fit.log_likelihood for fit in fits])
    status = jnp.concatenate([fit.status for fit in fits])
    n_parameters = jnp.asarray([count for fit in fits for count in fit.n_parameters], log_likelihood.dtype)
    finite = (status != int(Status.NONFINITE)) & jnp.isfinite(log_likelihood)
    if criterion == "heldout":
        scores = jnp.concatenate([fit.held_out for fit in fits])
        scores = jnp.where(finite & jnp.isfinite(scores), scores, -jnp.inf)
        best = jnp.argmax(scores)
    else:
        total = weights.sum()
        penalty = n_parameters * (jnp.log(total) if criterion == "bic" else 2.0)
        scores = -2.0 * log_likelihood * total + penalty
        scores = jnp.where(finite & jnp.isfinite(scores), scores, jnp.inf)
        best = jnp.argmin(scores)

    if len(covariance_types) == 1:
        all_params = fits[0].params
    else:  # one shape for all: covariances as full matrices
        all_params = GaussianMixtureParams(
            weights=jnp.concatenate([fit.params.weights for fit in fits]),
            means=jnp.concatenate([fit.params.means for fit in fits]),
            covariances=jnp.concatenate(
                [
                    jax.vmap(lambda c, name=name: _to_full(c, name, largest, n_features))(
                        fit.params.covariances
                    )
                    for fit, name in zip(fits, covariance_types, strict=True)
                ]
            ),
        )
    n_components = jnp.tile(jnp.asarray(candidates, jnp.int32), len(covariance_types))
    type_codes = jnp.repeat(
        jnp.asarray([COVARIANCE_TYPES.index(name) for name in covariance_types], jnp.int32), len(candidates)
    )
    return SelectionResult(
        n_components=n_components,
        covariance_type=type_codes,
        score=scores,
        log_likelihood=log_likelihood,
        n_parameters=n_parameters.astype(jnp.int32),
        status=status,
        best=best.astype(jnp.int32),
        best_n_components=n_components[best],
        params=jax.tree.map(lambda leaf: leaf[best], all_params),
    )


def _pad_components(
    params: GaussianMixtureParams, largest: int, covariance_type: str
) -> GaussianMixtureParams:
    """Append switched-off components (weight 0, copies of component 0) up to ``largest``.

    Works on a batch of restarts (leading axis). Copies keep every log-density finite,
    so ``log(0) + finite = -inf`` and the component takes exactly no responsibility.
    """
    n_extra = largest - params.weights.shape[-1]
    if n_extra == 0:
        return params

    def pad(leaf: Array, value: Array | None = None) -> Array:
        filler = leaf[:, :1] if value is None else value
        filler = jnp.broadcast_to(filler, (leaf.shape[0], n_extra, *leaf.shape[2:]))
        return jnp.concatenate([leaf, filler], axis=1)

    weights = pad(params.weights, jnp.zeros((), params.weights.dtype))
    covariances = params.covariances if covariance_type == "tied" else pad(params.covariances)
    return GaussianMixtureParams(weights=weights, means=pad(params.means), covariances=covariances)


def _own_status(
    model: LatentModel, result: EMResult, x: Array, weights: Array, n_own_components: Array
) -> Array:
    """The candidate's status with ``EMPTY_COMPONENT`` judged on its own components only.

    The engine flags any state without posterior mass, which a switched-off component
    always is. One E-step at the fitted params gives each component's mass, judged with
    the engine's threshold (round-off of the total weight).
    """
    responsibilities, _ = e_step(model, result.params, x)
    mass = _weighted_posterior(responsibilities, weights).sum(axis=0)
    own = jnp.arange(mass.shape[0], dtype=jnp.int32) < n_own_components
    # Switched-off components are never empty for this purpose.
    empty = _any_empty_state(jnp.where(own, mass, jnp.inf), weights.sum())
    running = jnp.where(result.converged, int(Status.CONVERGED), int(Status.MAX_ITER))
    return jnp.where(
        result.status == int(Status.EMPTY_COMPONENT),
        jnp.where(empty, int(Status.EMPTY_COMPONENT), running),
        result.status,
    ).astype(jnp.int32)
