"""The EM engine: E-step, one EM step, the compiled EM loop, restarts, and the generic
functions (predict, predict_proba, score_samples, score, bic, aic) derived from a
model's ``log_joint``.

Everything here is a pure function of ``(model, params, x, weights)``. The lower layer
(:func:`e_step`, :func:`em_step`, :func:`fit_em`) leaves compilation to the caller;
:func:`fit` compiles itself and reuses the compiled program for the same model and
shapes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from latentem._base import (
    Array,
    Callback,
    EMResult,
    LatentModel,
    Params,
    Posterior,
    PRNGKey,
    Status,
    check_callback,
    check_key,
    check_latent_model,
    check_model_data,
    check_nonnegative,
    check_not_a_key,
    check_positive_int,
    check_weights,
    check_x,
    checked_log_joint,
    checked_posterior,
    float_dtype,
    is_concrete,
    jit,
    large_problem,
    optimization_barrier,
    tiny_problem,
    tree_all_finite,
    tree_select,
)
from latentem._hard_em import is_classification_em

# Internal status of a member still iterating; never returned.
_RUNNING = -1

# scikit-learn's GaussianMixture default, on the same objective (mean log-likelihood).
DEFAULT_TOL = 1e-3


def resolve_tol(model: LatentModel, tol: float | Array | None) -> float | Array:
    """``tol``, or for ``None`` the default: :data:`DEFAULT_TOL`, or ``0`` for
    classification EM, which then runs to its fixed point (reached in finitely many
    iterations) as scikit-learn's ``KMeans`` stops when no label changes. A relative
    change of Lloyd's inertia can be small for many iterations while a few samples at a
    time change cluster: at tol 1e-3 a two-cluster fit stopped at an inertia 6% above
    the fixed point's."""
    if tol is None:
        return 0.0 if is_classification_em(model) else DEFAULT_TOL
    return check_nonnegative(tol, "tol")


class ConvergenceWarning(UserWarning):
    """An eager fit ended without a clean convergence (see :class:`Status`)."""


# ---------------------------------------------------------------------------
# E-step and objective
# ---------------------------------------------------------------------------


def e_step(model: LatentModel, params: Params, x: Array) -> tuple[Posterior, Array]:
    r"""The E-step: the posterior over latent variables and the per-sample log-likelihood.

    For a finite-state model (one with ``log_joint``) the posterior is the matrix of
    responsibilities

    .. math:: r_{nk} = p(z_n = k \mid x_n) = \exp\big(\log p(x_n, z_n = k)
              - \log \textstyle\sum_j p(x_n, z_n = j)\big),

    and the log-likelihood :math:`\log p(x_n) = \operatorname{logsumexp}_k
    \log p(x_n, z_n = k)`. A model with a custom ``posterior`` function supplies both.
    Sample weights play no part in the E-step.

    Args:
      model: the :class:`LatentModel`.
      params: the current parameters.
      x: data, shape ``(n_samples, n_features)``.

    Returns:
      ``(posterior, log_likelihood)``: the posterior (``(n_samples, n_states)``
      responsibilities for finite-state models) and ``log p(x_n)``, shape
      ``(n_samples,)``.

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> model = lem.gaussian_mixture(2)
      >>> x = jnp.array([[0.0], [0.1], [5.0], [5.2]])
      >>> params = model.init(jax.random.key(0), x, jnp.ones(4))
      >>> responsibilities, log_likelihood = lem.e_step(model, params, x)
      >>> responsibilities.shape, log_likelihood.shape
      ((4, 2), (4,))
    """
    if model.posterior is not None:
        return checked_posterior(model, params, x)
    if model.log_joint is None:
        raise ValueError("The model has neither log_joint nor posterior; give it one of them.")
    responsibilities, log_likelihood = _responsibilities_by_state(model, params, x)
    return responsibilities.T, log_likelihood


def _responsibilities_by_state(
    model: LatentModel, params: Params, x: Array, materialise: bool = False
) -> tuple[Array, Array]:
    """Responsibilities with the states first, ``(n_states, n_samples)``, and log p(x_n).

    The softmax runs over the leading axis so that the samples are the minor
    (contiguous) one: with a handful of states, that is several times faster on a CPU.
    A model that computes its log joint states-first and returns the transpose, as the
    Gaussian mixture does, never pays for a transposition.

    ``materialise`` computes the log joint once, behind an optimisation barrier: XLA
    otherwise fuses all of it (for a Gaussian mixture, the whitening products) into
    each of the softmax's three consumers and computes it three times, which made an
    EM iteration at (1e5, 8, 8) on a CPU 1.8x slower. The barrier holds the log joint
    states-first: for a model that computes it samples-first (the Gaussian mixture's
    GEMM path, from five features), XLA then writes the responsibilities states-first
    straight from the softmax, and the M-step's sums over samples read contiguous
    rows; with the barrier on the samples-first log joint, XLA wrote them samples-first
    and copied them transposed for the M-step (at (1e5, 8, 8) on a 2-core CPU, 8.0
    against 6.8 ms of XLA's operations per iteration outside the scatter, means of six
    alternating runs). Not used where the result is differentiated.
    """
    log_joint = checked_log_joint(model.log_joint, params, x).T
    if materialise:
        log_joint = optimization_barrier(log_joint)
    log_likelihood = logsumexp(log_joint, axis=0)
    return jnp.exp(log_joint - log_likelihood[None, :]), log_likelihood


def _weighted_posterior(posterior: Posterior, weights: Array, sample_axis: int = 0) -> Posterior:
    """Scale each posterior leaf by the sample weights along ``sample_axis``.

    Samples of weight zero become exactly zero even where the posterior is NaN (a sample
    with ``log p(x_n) = -inf``), so that a zero weight is the same as removal.
    """

    def scale(leaf: Array) -> Array:
        shape = [1] * leaf.ndim
        shape[sample_axis] = weights.shape[0]
        w = weights.astype(leaf.dtype).reshape(shape)
        return jnp.where(w > 0, leaf * w, jnp.zeros_like(leaf))

    return jax.tree_util.tree_map(scale, posterior)


def _weighted_log_likelihood(log_likelihood: Array, weights: Array) -> Array:
    """Sum of ``w_n log p(x_n)`` over samples of positive weight."""
    weights = weights.astype(log_likelihood.dtype)
    # where, not a product: a zero-weight sample with log p = -inf must not give NaN.
    return jnp.where(weights > 0, weights * log_likelihood, jnp.zeros_like(log_likelihood)).sum()


def _mean_log_likelihood(log_likelihood: Array, weights: Array, total_weight: Array) -> Array:
    """Sum of ``w_n log p(x_n)`` over samples of positive weight, per unit of weight."""
    return _weighted_log_likelihood(log_likelihood, weights) / total_weight.astype(log_likelihood.dtype)


def _objective(model: LatentModel, params: Params, log_likelihood_sum: Array, total_weight: Array) -> Array:
    """The EM objective from ``sum_n w_n log p(x_n)``: per unit of weight, plus
    ``log_prior / total_weight``."""
    objective = log_likelihood_sum / total_weight.astype(log_likelihood_sum.dtype)
    if model.log_prior is not None:
        objective = objective + model.log_prior(params) / total_weight.astype(objective.dtype)
    return objective


def _prepare(x: Any, weights: Any) -> tuple[Array, Array]:
    x = check_x(x)
    return x, check_weights(weights, x.shape[0], float_dtype(x))


def em_step(
    model: LatentModel, params: Params, x: Array, weights: Array | None = None
) -> tuple[Params, Array]:
    r"""One EM iteration: an E-step at ``params`` followed by the M-step.

    .. math:: \theta' = \arg\max_\theta \sum_n w_n\,
              \mathbb{E}_{p(z_n \mid x_n, \theta_{\text{old}})}[\log p(x_n, z_n \mid \theta)]

    Args:
      model: the :class:`LatentModel`.
      params: the current parameters :math:`\theta_{\text{old}}`.
      x: data, shape ``(n_samples, n_features)``.
      weights: optional non-negative sample weights, shape ``(n_samples,)``.

    Returns:
      ``(new_params, objective)`` where ``objective`` is the mean log-likelihood per
      unit of weight (plus the scaled log prior) at the *old* params; EM guarantees the
      objective at ``new_params`` is at least as large.

    One iteration does not pay for the model's ``fused_prepare`` (a fit's once-per-fit
    preparation of the data): its ``fused_step`` gets ``prepared=None`` and computes
    the iteration without it, or declines. For many iterations use :func:`fit_em`
    (a ``callback`` sees each one), which prepares once: on a 2-core CPU ``em_step``
    of a Gaussian mixture took 7.3 ms at (1e5, 8, 8) and 77 ms at (1e5, 32, 16),
    against 18.7 and 122 ms when it prepared the data at each call.

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> model = lem.gaussian_mixture(2)
      >>> x = jnp.array([[0.0], [0.1], [5.0], [5.2]])
      >>> params = model.init(jax.random.key(0), x, jnp.ones(4))
      >>> new_params, objective = lem.em_step(model, params, x)
      >>> new_params.means.shape
      (2, 1)
    """
    x, weights = _prepare(x, weights)
    check_model_data(model, x)
    new_params, objective, _ = _em_iteration(model, params, x, weights, weights.sum(), prepared=None)
    return new_params, objective


# `prepared` not given: `_fused_iteration` evaluates the model's `fused_prepare` itself.
_UNPREPARED = object()


def _uses_fused_step(model: LatentModel) -> bool:
    """Whether the engine's iteration starts from the model's ``fused_step`` (a model
    with a ``posterior`` uses that instead)."""
    return model.fused_step is not None and model.posterior is None


def _fused_prepare(model: LatentModel, x: Array, weights: Array) -> Any:
    """The model's ``fused_prepare(x, weights)`` where the engine uses its ``fused_step``
    and it has one; else None. ``fit_em`` evaluates it once, before its loop."""
    if not _uses_fused_step(model) or model.fused_prepare is None:
        return None
    return model.fused_prepare(x, weights)


def _fused_iteration(
    model: LatentModel, params: Params, x: Array, weights: Array, prepared: Any = _UNPREPARED
) -> tuple[Params, Array, Array] | None:
    """The model's ``fused_step`` (with what ``fused_prepare`` returned, when it has
    one; ``prepared=None`` where the caller does not prepare), or None where it has
    none or declines."""
    if not _uses_fused_step(model):
        return None
    if model.fused_prepare is None:
        return model.fused_step(params, x, weights)
    if prepared is _UNPREPARED:
        prepared = _fused_prepare(model, x, weights)
    return model.fused_step(params, x, weights, prepared)


def _em_iteration(
    model: LatentModel,
    params: Params,
    x: Array,
    weights: Array,
    total_weight: Array,
    prepared: Any = _UNPREPARED,
) -> tuple[Params, Array, Array | None]:
    """E-step and objective at ``params``, then the M-step.

    Returns ``(new_params, objective, state_mass)``; ``state_mass`` is the posterior mass
    of each latent state at ``params`` for finite-state models (``None`` otherwise).
    ``prepared``: the model's ``fused_prepare(x, weights)``, where the caller evaluated
    it already.
    """
    iteration = _fused_iteration(model, params, x, weights, prepared)
    if iteration is None:
        iteration = _unfused_iteration(model, params, x, weights)
    new_params, log_likelihood_sum, state_mass = iteration
    return new_params, _objective(model, params, log_likelihood_sum, total_weight), state_mass


def _unfused_iteration(
    model: LatentModel, params: Params, x: Array, weights: Array
) -> tuple[Params, Array, Array | None]:
    """The EM iteration from ``log_joint`` (or ``posterior``) and ``m_step``, without the
    model's ``fused_step``: ``(new_params, sum_n w_n log p(x_n), state_mass)``, what a
    ``fused_step`` returns. A ``fused_step`` that decides at run time (under
    ``lax.cond``) to fall back calls this."""
    if model.posterior is None:  # finite states, enumerated: work states-first
        weighted_by_state, log_likelihood_sum = _weighted_responsibilities_by_state(model, params, x, weights)
        weighted, state_mass = weighted_by_state.T, weighted_by_state.sum(axis=1)
        return model.m_step(x, weighted, params), log_likelihood_sum, state_mass
    return _posterior_iteration(model, params, x, weights)[:3]


def _posterior_iteration(
    model: LatentModel, params: Params, x: Array, weights: Array
) -> tuple[Params, Array, Array | None, Any]:
    """:func:`_unfused_iteration` through ``model.posterior``, which it also returns."""
    posterior, log_likelihood = checked_posterior(model, params, x)
    weighted = _weighted_posterior(posterior, weights)
    state_mass = weighted.sum(axis=0) if model.log_joint is not None else None
    new_params = model.m_step(x, weighted, params)
    return new_params, _weighted_log_likelihood(log_likelihood, weights), state_mass, posterior


def _classification_iteration(
    model: LatentModel, params: Params, x: Array, weights: Array, total_weight: Array
) -> tuple[Params, Array, Array, Array]:
    """:func:`_em_iteration` of classification EM, plus the partition it fitted: each
    sample's state, shape ``(n_samples,)``."""
    new_params, log_likelihood_sum, state_mass, assignments = _posterior_iteration(model, params, x, weights)
    objective = _objective(model, params, log_likelihood_sum, total_weight)
    return new_params, objective, state_mass, jnp.argmax(assignments, axis=1).astype(jnp.int32)


def _weighted_responsibilities_by_state(
    model: LatentModel, params: Params, x: Array, weights: Array
) -> tuple[Array, Array]:
    r"""The E-step of a finite-state model, states first: ``(w_n r_nk)`` of shape
    ``(k, n)`` and :math:`\sum_n w_n \log p(x_n)`; what an M-step takes, for a
    ``fused_step`` that forms its moments its own way."""
    responsibilities, log_likelihood = _responsibilities_by_state(model, params, x, materialise=True)
    weighted = _weighted_posterior(responsibilities, weights, sample_axis=1)
    return weighted, _weighted_log_likelihood(log_likelihood, weights)


# ---------------------------------------------------------------------------
# The EM loop
# ---------------------------------------------------------------------------


class _EMState(NamedTuple):
    candidate: Params  # the next parameters, objective not evaluated yet
    params: Params  # the last parameters whose objective is known and finite
    objective: Array  # at `params`
    state_mass: Array | None  # posterior mass of each state at `params`
    step: Array  # number of EM iterations evaluated so far
    status: Array
    history: Array
    partition: Array | None  # classification EM: each sample's state at `params`


def fit_em(
    model: LatentModel,
    params: Params,
    x: Array,
    *,
    weights: Array | None = None,
    max_iter: int = 100,
    tol: float | Array | None = None,
    callback: Callback | None = None,
) -> EMResult:
    r"""Run EM from ``params`` until the objective stops changing, in ``lax.while_loop``.

    Each iteration applies the M-step to the weighted posterior and then evaluates the
    posterior and the objective at the new parameters,

    .. math:: \mathcal{L}(\theta) = \frac{\sum_n w_n \log p(x_n \mid \theta)
              \; [+ \log p(\theta)]}{\sum_n w_n},

    which EM never decreases. The loop stops when
    :math:`|\mathcal{L}(\theta_t) - \mathcal{L}(\theta_{t-1})| < \text{tol}`
    (``Status.CONVERGED``), after ``max_iter`` iterations (``Status.MAX_ITER``), or as
    soon as the objective or the parameters are not finite (``Status.NONFINITE``; the
    last parameters with a finite objective are returned). A finite-state fit whose
    final posterior leaves a state with no mass reports ``Status.EMPTY_COMPONENT``.
    Classification EM (:func:`hard_em`, :func:`kmeans`) also stops, converged, at its
    fixed point: when no sample (with positive weight) changed state in an iteration,
    so the M-step refits the same partition and every further iteration would repeat
    this one.

    Pure and traceable: wrap it in ``jax.jit`` (with ``model`` and ``max_iter`` static)
    and ``jax.vmap`` over data, weights or params. Under ``vmap`` the loop runs until
    the slowest member stops; finished members are frozen. Called eagerly, it warns
    with a :class:`ConvergenceWarning` when the fit did not converge cleanly, as
    :func:`fit` does.

    Args:
      model: the :class:`LatentModel`.
      params: initial parameters, e.g. from ``model.init``.
      x: data, shape ``(n_samples, n_features)``.
      weights: optional non-negative sample weights, shape ``(n_samples,)``. Zero
        weight is the same as removing the sample; integer weight, as repeating it.
      max_iter: maximum number of iterations (a Python int; ``0`` returns ``params``).
      tol: convergence threshold on the change of the mean objective. ``None``
        (default): ``1e-3`` (scikit-learn's ``GaussianMixture`` default), and ``0`` for
        classification EM, which then runs to its fixed point. ``0`` runs exactly
        ``max_iter`` iterations (classification EM: up to its fixed point). In float32
        the mean objective itself carries round-off of about ``1e-7`` times its size
        (more for large ``n_samples``), so a ``tol`` below that level may never be met
        and the fit ends at ``MAX_ITER``; use float64 (``JAX_ENABLE_X64=1``) for
        tighter tolerances.
      callback: optional ``callback(iteration, objective)`` called on the host through
        ``jax.debug.callback`` with the objective after each iteration (``iteration``
        0 is the initial parameters), for progress displays. ``None`` adds nothing to
        the compiled program.

    Returns:
      An :class:`EMResult`.

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> x = jnp.concatenate([jax.random.normal(jax.random.key(1), (100, 2)),
      ...                      jax.random.normal(jax.random.key(2), (100, 2)) + 6.0])
      >>> model = lem.gaussian_mixture(2)
      >>> params = model.init(jax.random.key(0), x, jnp.ones(200))
      >>> result = jax.jit(lem.fit_em, static_argnums=0)(model, params, x)
      >>> bool(result.converged), result.params.weights.round(1).sort().tolist()
      (True, [0.5, 0.5])

    References:
      Dempster, Laird & Rubin (1977), Maximum likelihood from incomplete data via the
      EM algorithm. JRSS B 39(1).
    """
    check_latent_model(model, "fit_em")
    check_not_a_key(params, "fit_em")
    x, weights = _prepare(x, weights)
    check_model_data(model, x)
    max_iter = check_positive_int(max_iter, "max_iter", minimum=0)
    tol = resolve_tol(model, tol)
    check_callback(callback)
    total_weight = weights.sum()
    # Outside the loop: XLA does not reliably hoist it (see FusedPrepareFn).
    prepared = _fused_prepare(model, x, weights)
    classification = is_classification_em(model)
    if classification:  # also returns the partition, to stop at the fixed point
        iterate = functools.partial(
            _classification_iteration, model, x=x, weights=weights, total_weight=total_weight
        )
    else:
        iterate = functools.partial(
            _em_iteration, model, x=x, weights=weights, total_weight=total_weight, prepared=prepared
        )
    _, objective_shape, mass_shape, *_ = jax.eval_shape(iterate, params)
    tol = jnp.asarray(tol, objective_shape.dtype)

    # One evaluation of `iterate` per pass: the E-step at the candidate gives its
    # objective (and so the verdict on the previous iteration), the M-step the next
    # candidate. A fit of n iterations evaluates n + 1 candidates; the M-step of the
    # last is discarded, which keeps a single copy of the E- and M-steps in the program.
    def iteration(state: _EMState) -> _EMState:
        step = state.step
        candidate, objective, state_mass, *partition = iterate(state.candidate)
        finite = jnp.isfinite(objective) & tree_all_finite(state.candidate)
        converged = jnp.abs(objective - state.objective) < tol
        if classification:
            # No sample (that carries weight) changed state: the M-step refits the same
            # partition, so every further iteration would repeat this one.
            (partition,) = partition
            converged = converged | jnp.all((partition == state.partition) | (weights <= 0))
        converged = finite & (step > 0) & converged
        status = jnp.where(
            finite,
            jnp.where(
                converged, int(Status.CONVERGED), jnp.where(step >= max_iter, int(Status.MAX_ITER), _RUNNING)
            ),
            int(Status.NONFINITE),
        )
        history = state.history
        if max_iter > 0:  # history[i] is the objective after iteration i + 1
            history = history.at[jnp.where(step > 0, step - 1, max_iter)].set(objective, mode="drop")
        if callback is not None:
            jax.debug.callback(callback, step, objective)
        return _EMState(
            candidate=candidate,
            params=tree_select(finite, state.candidate, state.params),
            objective=jnp.where(finite, objective, state.objective),
            state_mass=tree_select(finite, state_mass, state.state_mass),
            step=step + 1,
            status=status.astype(jnp.int32),
            history=history,
            partition=partition if classification else None,
        )

    state = _EMState(
        candidate=params,
        params=params,
        objective=jnp.full((), jnp.nan, objective_shape.dtype),
        state_mass=None if mass_shape is None else jnp.zeros(mass_shape.shape, mass_shape.dtype),
        step=jnp.zeros((), jnp.int32),
        status=jnp.asarray(_RUNNING, jnp.int32),
        history=jnp.full((max_iter,), jnp.nan, objective_shape.dtype),
        partition=jnp.zeros(x.shape[0], jnp.int32) if classification else None,
    )
    state = jax.lax.while_loop(lambda state: state.status == _RUNNING, iteration, state)
    converged = state.status == int(Status.CONVERGED)
    status = state.status
    if state.state_mass is not None:
        empty = _any_empty_state(state.state_mass, total_weight)
        status = jnp.where((status != int(Status.NONFINITE)) & empty, int(Status.EMPTY_COMPONENT), status)
    result = EMResult(
        params=state.params,
        log_likelihood=state.objective,
        n_iter=state.step - 1,
        converged=converged,
        status=status.astype(jnp.int32),
        history=state.history,
    )
    if is_concrete(result.status):  # called eagerly, as fit is
        warn_on_status(result.status, max_iter, expects_convergence(model, tol))
    return result


def _any_empty_state(state_mass: Array, total_weight: Array) -> Array:
    """A state is empty when its posterior mass is below round-off of the total weight."""
    return jnp.any(state_mass <= jnp.finfo(state_mass.dtype).eps * total_weight.astype(state_mass.dtype))


def _has_empty_state(responsibilities: Array, weights: Array, total_weight: Array) -> Array:
    """``_any_empty_state`` from unweighted responsibilities."""
    return _any_empty_state(_weighted_posterior(responsibilities, weights).sum(axis=0), total_weight)


# ---------------------------------------------------------------------------
# Restarts: the convenience entry point that compiles itself
# ---------------------------------------------------------------------------


def fit(
    model: LatentModel,
    key: PRNGKey,
    x: Array,
    *,
    weights: Array | None = None,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float | Array | None = None,
    callback: Callback | None = None,
) -> EMResult:
    r"""Fit a model by EM from ``n_init`` initialisations and keep the best.

    The restarts run as one ``vmap`` over keys split from ``key``: each calls
    ``model.init`` and then :func:`fit_em`; the restart with the highest final
    objective wins (a non-finite restart never wins). The whole fit is one compiled
    program, cached per model, shapes, ``n_init`` and ``max_iter``, so calling ``fit``
    again with the same model reuses it. ``fit`` is itself traceable, so
    ``jax.vmap(functools.partial(lem.fit, model))`` fits a batch of datasets.

    Called eagerly, ``fit`` checks its inputs (``ValueError`` for NaN rows, bad shapes,
    negative weights, fewer weighted samples than components, and values outside the
    model's support through its ``check_data``) and warns with a
    :class:`ConvergenceWarning` when the chosen fit did not converge cleanly.

    Args:
      model: the :class:`LatentModel`, e.g. ``gaussian_mixture(3)``.
      key: a PRNG key (``jax.random.key(seed)``); same key, same result.
      x: data, shape ``(n_samples, n_features)``.
      weights: optional non-negative sample weights, shape ``(n_samples,)``.
      n_init: number of restarts.
      max_iter: maximum EM iterations per restart.
      tol: convergence threshold on the change of the mean objective; ``None``: the
        default of :func:`fit_em` (``1e-3``; classification EM runs to its fixed point).
      callback: optional progress ``callback(iteration, objective)``, see
        :func:`fit_em`.

    Returns:
      The :class:`EMResult` of the best restart.

    Example:
      >>> import jax, latentem as lem
      >>> x = lem.datasets.load_faithful()
      >>> result = lem.fit(lem.gaussian_mixture(2), jax.random.key(0), x, n_init=3)
      >>> int(result.status) == lem.Status.CONVERGED, round(float(result.log_likelihood), 2)
      (True, -4.16)
    """
    check_latent_model(model, "fit")
    key = check_key(key)
    x, weights = _prepare(x, weights)
    n_init = check_positive_int(n_init, "n_init")
    max_iter = check_positive_int(max_iter, "max_iter", minimum=0)
    tol = resolve_tol(model, tol)
    check_callback(callback)
    if is_concrete(x, weights):
        check_model_data(model, x)
        check_enough_samples(model, key, x, weights)
    result = _fit_compiled(model, key, x, weights, tol, n_init=n_init, max_iter=max_iter, callback=callback)
    if is_concrete(result.status):
        warn_on_status(result.status, max_iter, expects_convergence(model, tol))
    return result


@functools.partial(
    jit,
    static_argnames=("model", "n_init", "max_iter", "callback"),
    tune_if=lambda model, key, x, *args, n_init, **kwargs: large_problem(x, n_init),
    quick_compile=True,
    tiny_if=lambda model, key, x, *args, n_init, **kwargs: tiny_problem(x, n_init),
)
def _fit_compiled(
    model: LatentModel,
    key: PRNGKey,
    x: Array,
    weights: Array,
    tol: Array,
    *,
    n_init: int,
    max_iter: int,
    callback: Callback | None,
) -> EMResult:
    def one_restart(restart_key: PRNGKey) -> EMResult:
        # jax.jit(model.init): the trace check_enough_samples made of it is reused.
        params = jax.jit(model.init)(restart_key, x, weights)
        return fit_em(model, params, x, weights=weights, max_iter=max_iter, tol=tol, callback=callback)

    if n_init == 1:
        return one_restart(jax.random.split(key, 1)[0])
    results = jax.vmap(one_restart)(jax.random.split(key, n_init))
    return best_restart(results)


def best_restart(results: EMResult) -> EMResult:
    """The member of a batch of restarts (leading axis) with the highest finite objective.

    Objectives equal to within round-off are ties (restarts that found the same optimum,
    often with the components in another order), resolved in favour of the first
    restart, so the choice does not depend on last-bit differences between a batched
    and an unbatched run.
    """
    scores = jnp.where(jnp.isfinite(results.log_likelihood), results.log_likelihood, -jnp.inf)
    best_score = jnp.max(scores)
    tolerance = 64 * jnp.finfo(scores.dtype).eps * jnp.maximum(jnp.abs(best_score), 1)
    best = jnp.argmax(scores >= best_score - tolerance)
    return jax.tree_util.tree_map(lambda leaf: leaf[best], results)


def check_enough_samples(model: LatentModel, key: PRNGKey, x: Array, weights: Array) -> None:
    """Raise a ``ValueError`` when fewer samples carry weight than the model has states."""
    if model.log_joint is None:
        return
    # Traced through jax.jit so that the fit reuses the trace (0.05 s of a first fit).
    params_shape = jax.eval_shape(jax.jit(model.init), key, x, weights)
    n_states = jax.eval_shape(model.log_joint, params_shape, x).shape[-1]
    n_weighted = int(np.count_nonzero(np.asarray(weights) > 0))  # on the host: nothing to compile
    if n_weighted < n_states:
        raise ValueError(
            f"x has {n_weighted} sample(s) with positive weight but the model has "
            f"{n_states} components; use n_components <= {n_weighted} or more data."
        )


def expects_convergence(model: LatentModel | None, tol: float | Array) -> bool:
    """Whether ``Status.MAX_ITER`` is a failure worth a warning: not where ``tol=0``
    asked for exactly ``max_iter`` iterations. Classification EM still stops at its
    fixed point with ``tol=0`` (its default), and not reaching it is one."""
    if model is not None and is_classification_em(model):
        return True
    return not is_concrete(tol) or float(np.asarray(tol)) > 0


def warn_on_status(status: Array, max_iter: int, expect_convergence: bool = True) -> None:
    """Turn bad statuses of an eager EM fit (any batch shape) into ConvergenceWarnings;
    ``Status.MAX_ITER`` only when ``expect_convergence`` (see :func:`expects_convergence`)."""
    messages = {
        Status.NONFINITE: "the objective or parameters became NaN or infinite (Status.NONFINITE); the "
        "last finite parameters were returned. Check the data for NaN/inf or values outside the "
        "model's support (e.g. negative counts), and keep reg_covar > 0.",
        Status.EMPTY_COMPONENT: "a component ended with no samples (Status.EMPTY_COMPONENT); the data "
        "support fewer components (or contain duplicated points). Reduce n_components.",
    }
    if max_iter > 0 and expect_convergence:
        messages[Status.MAX_ITER] = (
            f"EM did not converge in max_iter={max_iter} iterations (Status.MAX_ITER); "
            "increase max_iter or tol."
        )
    warn_status_counts(status, messages)


def warn_status_counts(status: Array, messages: dict[Status, str]) -> None:
    """One ConvergenceWarning per status in ``messages`` that some fit of ``status`` has,
    prefixed by how many fits of the batch have it."""
    status = np.asarray(status)
    for code in (Status.NONFINITE, Status.MAX_ITER, Status.EMPTY_COMPONENT):
        count = int(np.sum(status == code))
        if count and code in messages:
            prefix = "" if status.size == 1 else f"{count} of {status.size} fits: "
            # stacklevel 4: past this helper and the module's warn function, to the caller.
            warnings.warn(prefix + messages[code], ConvergenceWarning, stacklevel=4)


# ---------------------------------------------------------------------------
# Generic functions derived from log_joint
# ---------------------------------------------------------------------------


def _require_log_joint(model: LatentModel, name: str) -> None:
    if model.log_joint is None:
        raise ValueError(
            f"{name} needs a finite-state model (one with log_joint); this model's latent "
            "variable is continuous. Use score_samples for its log-likelihood."
        )


def predict(model: LatentModel, params: Params, x: Array) -> Array:
    r"""The most probable latent state of each sample, :math:`\arg\max_k p(z_n = k \mid x_n)`.

    Args:
      model: a finite-state :class:`LatentModel`.
      params: fitted parameters.
      x: data, shape ``(n_samples, n_features)``.

    Returns:
      int32 labels, shape ``(n_samples,)``.

    Example:
      >>> import jax, jax.numpy as jnp, latentem as lem
      >>> model = lem.gaussian_mixture(2)
      >>> params = lem.GaussianMixtureParams(jnp.array([0.5, 0.5]), jnp.array([[0.0], [5.0]]),
      ...                                    jnp.ones((2, 1, 1)))
      >>> lem.predict(model, params, jnp.array([[0.2], [4.0]])).tolist()
      [0, 1]
    """
    _require_log_joint(model, "predict")
    return jnp.argmax(checked_log_joint(model.log_joint, params, check_x(x)), axis=1).astype(jnp.int32)


def predict_proba(model: LatentModel, params: Params, x: Array) -> Array:
    r"""Responsibilities :math:`p(z_n = k \mid x_n)`, shape ``(n_samples, n_states)``.

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> model = lem.gaussian_mixture(2)
      >>> params = lem.GaussianMixtureParams(jnp.array([0.5, 0.5]), jnp.array([[0.0], [5.0]]),
      ...                                    jnp.ones((2, 1, 1)))
      >>> lem.predict_proba(model, params, jnp.array([[2.5]])).round(6).tolist()
      [[0.5, 0.5]]
    """
    _require_log_joint(model, "predict_proba")
    return e_step(model, params, check_x(x))[0]


def score_samples(model: LatentModel, params: Params, x: Array) -> Array:
    r"""Per-sample log-likelihood :math:`\log p(x_n \mid \theta)`, shape ``(n_samples,)``.

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.array([[0.0]]),
      ...                                    jnp.ones((1, 1, 1)))
      >>> log_densities = lem.score_samples(lem.gaussian_mixture(1), params, jnp.array([[0.0]]))
      >>> [round(value, 4) for value in log_densities.tolist()]
      [-0.9189]
    """
    return e_step(model, params, check_x(x))[1]


def score(model: LatentModel, params: Params, x: Array, weights: Array | None = None) -> Array:
    r"""Mean log-likelihood per unit of weight, :math:`\sum_n w_n \log p(x_n) / \sum_n w_n`.

    The same number as scikit-learn's ``score``; it excludes any log prior, so it is
    the held-out criterion for comparing models.

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.array([[0.0]]),
      ...                                    jnp.ones((1, 1, 1)))
      >>> float(lem.score(lem.gaussian_mixture(1), params, jnp.zeros((3, 1)))).__round__(4)
      -0.9189
    """
    x, weights = _prepare(x, weights)
    return _mean_log_likelihood(e_step(model, params, x)[1], weights, weights.sum())


def _information_penalty(model: LatentModel, params: Params) -> int:
    if model.n_parameters is None:
        raise ValueError("bic and aic need the model's n_parameters function; add one to the model.")
    return model.n_parameters(params)


def bic(model: LatentModel, params: Params, x: Array, weights: Array | None = None) -> Array:
    r"""Bayesian information criterion, lower is better.

    .. math:: \mathrm{BIC} = -2 \sum_n w_n \log p(x_n \mid \theta) + p \log \sum_n w_n

    with :math:`p` the number of free parameters (``model.n_parameters``). With unit
    weights this is scikit-learn's ``GaussianMixture.bic``.

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.array([[0.0]]),
      ...                                    jnp.ones((1, 1, 1)))
      >>> float(lem.bic(lem.gaussian_mixture(1), params, jnp.zeros((4, 1)))).__round__(3)
      10.124
    """
    x, weights = _prepare(x, weights)
    total = weights.sum()
    penalty = _information_penalty(model, params)
    return -2.0 * score(model, params, x, weights) * total + penalty * jnp.log(total)


def aic(model: LatentModel, params: Params, x: Array, weights: Array | None = None) -> Array:
    r"""Akaike information criterion, lower is better.

    .. math:: \mathrm{AIC} = -2 \sum_n w_n \log p(x_n \mid \theta) + 2p

    Example:
      >>> import jax.numpy as jnp, latentem as lem
      >>> params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.array([[0.0]]),
      ...                                    jnp.ones((1, 1, 1)))
      >>> float(lem.aic(lem.gaussian_mixture(1), params, jnp.zeros((4, 1)))).__round__(3)
      11.352
    """
    x, weights = _prepare(x, weights)
    total = weights.sum()
    penalty = _information_penalty(model, params)
    return -2.0 * score(model, params, x, weights) * total + 2.0 * penalty
