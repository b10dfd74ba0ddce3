"""Gradient-based fitting: EM's objective, maximised with any optax optimizer.

:func:`fit_gradient` maximises the same objective as :func:`~latentem.fit_em` (the mean
marginal log-likelihood per unit of sample weight, plus the scaled log prior) by
gradient descent on its negative, in the unconstrained coordinates that the model's
``to_unconstrained`` / ``from_unconstrained`` bijection defines. Its result has the
shape of an :class:`~latentem.EMResult`, so the two paths can be compared step by step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from latentem._base import (
    Array,
    Callback,
    LatentModel,
    Params,
    Status,
    check_callback,
    check_latent_model,
    check_model_data,
    check_nonnegative,
    check_not_a_key,
    check_positive_int,
    is_concrete,
    tree_all_finite,
    tree_select,
)
from latentem._em import (
    _has_empty_state,
    _objective,
    _prepare,
    _weighted_log_likelihood,
    e_step,
    expects_convergence,
    warn_status_counts,
)

# Internal status of a member still iterating; never returned.
_RUNNING = -1


class GradientResult(NamedTuple):
    """What :func:`fit_gradient` returns: an :class:`~latentem.EMResult` with steps.

    Attributes:
      params: the fitted parameters (the last ones whose objective, unconstrained
        coordinates and gradient were all finite).
      log_likelihood: the objective at ``params``, exactly as in ``EMResult``: the
        mean log-likelihood per unit of sample weight, plus ``log_prior(params) /
        sum(weights)`` for a model with a prior.
      n_steps: the number of optimizer steps run (updates attempted).
      converged: whether ``tol`` was given and the change in the objective fell below it.
      status: a :class:`~latentem.Status` value, int32.
      history: shape ``(num_steps,)``; entry ``i`` is the objective after step
        ``i + 1``; NaN past ``n_steps``.
    """

    params: Params
    log_likelihood: Array
    n_steps: Array
    converged: Array
    status: Array
    history: Array


class _GradientState(NamedTuple):
    unconstrained: Any
    optimizer_state: Any
    value: Array  # the loss (negative objective) at `unconstrained`
    gradient: Any  # its gradient at `unconstrained`
    n_steps: Array
    status: Array
    history: Array


def _require_bijection(model: LatentModel) -> None:
    missing = [name for name in ("to_unconstrained", "from_unconstrained") if getattr(model, name) is None]
    if missing:
        raise ValueError(
            f"fit_gradient needs the model's {' and '.join(missing)}: a bijection between "
            "the parameters and a pytree of unconstrained real arrays (for example logits "
            "for mixture weights, log-variances for variances). Add them to the model, e.g. "
            "model._replace(to_unconstrained=..., from_unconstrained=...)."
        )


def _check_optimizer(optimizer: Any) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise ValueError(
            "optimizer must be an optax GradientTransformation, such as optax.adam(1e-2) "
            f"or optax.lbfgs(); got {type(optimizer).__name__}."
        )


def _loss_fn(model: LatentModel, x: Array, weights: Array) -> Any:
    """The negative objective as a function of unconstrained coordinates."""
    total_weight = weights.sum()
    # Zero-weight rows do not enter the objective, but their (masked) terms still enter
    # the backward pass: a far-away padding row with log p(x_n) = -inf would give
    # 0 * NaN there. Replacing such rows by a weighted row changes no value and keeps
    # every gradient finite.
    positive = weights > 0
    mask = positive.reshape(positive.shape + (1,) * (x.ndim - 1))
    safe_x = jnp.where(mask, x, x[jnp.argmax(positive)][None])

    def loss(unconstrained: Any) -> Array:
        params = model.from_unconstrained(unconstrained)
        log_likelihood = e_step(model, params, safe_x)[1]
        return -_objective(model, params, _weighted_log_likelihood(log_likelihood, weights), total_weight)

    return loss


def _optax_promotion() -> Any:
    """Standard dtype promotion for optax's own arithmetic.

    optax mixes Python floats and int32 step counts (Adam's bias correction raises a
    float to an int32 power), which ``jax_numpy_dtype_promotion="strict"`` rejects.
    Only ``init`` and ``update`` run under it (with the objective evaluations a line
    search makes inside ``update``); the rest stays under the caller's setting.
    """
    return jax.numpy_dtype_promotion("standard")


def _value_and_gradient_fn(loss: Any, optimizer_state: Any) -> Any:
    """``value_and_grad`` of ``loss``, reusing the ones a line search left in the state.

    optax's line searches (in ``optax.lbfgs`` and
    ``scale_by_zoom_linesearch``/``scale_by_backtracking_linesearch(store_grad=True)``)
    store the value and gradient at the accepted point as ``value`` and ``grad``
    fields; ``optax.value_and_grad_from_state`` reads them back. The decision is made on
    the state's (static) structure, so it costs nothing at run time.
    """
    try:
        stored = [optax.tree_utils.tree_get(optimizer_state, name) for name in ("value", "grad")]
    except (KeyError, ValueError):  # several line searches: recompute instead
        stored = [None, None]
    if all(leaf is not None for leaf in stored):
        from_state = optax.value_and_grad_from_state(loss)
        return lambda unconstrained, state: from_state(unconstrained, state=state)
    plain = jax.value_and_grad(loss)
    return lambda unconstrained, state: plain(unconstrained)


def fit_gradient(
    model: LatentModel,
    params: Params,
    x: Array,
    optimizer: optax.GradientTransformation,
    *,
    weights: Array | None = None,
    num_steps: int = 1000,
    tol: float | Array | None = None,
    callback: Callback | None = None,
) -> GradientResult:
    r"""Maximise EM's objective by gradient descent with an optax optimizer.

    The objective is the one :func:`~latentem.fit_em` reports,

    .. math:: \mathcal{L}(\theta) = \frac{\sum_n w_n \log p(x_n \mid \theta)
              \; [+ \log p(\theta)]}{\sum_n w_n},

    optimised as :math:`-\mathcal{L}(g(u))` over unconstrained coordinates :math:`u`,
    with :math:`g` the model's ``from_unconstrained`` (for a Gaussian mixture: weights
    as a softmax of logits, covariances from Cholesky factors with a log diagonal, or
    log-variances). Any ``optax.GradientTransformation`` works: ``optax.adam``,
    ``optax.sgd`` with momentum, and ``optax.lbfgs``, whose line search receives the
    objective through ``update(..., value=, grad=, value_fn=)`` and whose stored value
    and gradient are reused (``optax.value_and_grad_from_state``). The loop is a
    ``lax.while_loop``; it stops after ``num_steps``, when a step that moves the
    coordinates changes the objective by less than ``tol`` (a step that leaves them
    unchanged, as ``optax.MultiSteps`` takes while it accumulates gradients, does not
    count), or when the objective, the coordinates or the gradient stop being finite
    (``Status.NONFINITE``: the last finite parameters are returned).
    A finite-state fit that ends with a component holding no posterior mass reports
    ``Status.EMPTY_COMPONENT``, as in ``fit_em``.

    ``fit_gradient`` compiles itself (cached per model, optimizer, shapes and
    ``num_steps``: build the optimizer once and reuse it), and runs under ``jax.jit``
    and ``jax.vmap`` (over data, weights or params).

    Args:
      model: a :class:`~latentem.LatentModel` with ``to_unconstrained`` and
        ``from_unconstrained``.
      params: initial parameters, e.g. from ``model.init``.
      x: data, shape ``(n_samples, n_features)``.
      optimizer: an optax ``GradientTransformation``; it minimises the negative
        objective.
      weights: optional non-negative sample weights, shape ``(n_samples,)``.
      num_steps: maximum number of optimizer steps (a Python int).
      tol: stop when the objective changes by less than this in one step; ``None``
        (or ``0``) runs all ``num_steps`` (and ``MAX_ITER`` then brings no warning). The
        change per step scales with the step size: a small learning rate meets a
        ``tol`` early, far from the optimum.
      callback: optional ``callback(step, objective)`` called on the host through
        ``jax.debug.callback`` with the objective at the start (``step`` 0) and after
        each optimizer step, as :func:`~latentem.fit_em`'s; for progress displays and
        side-by-side EM / gradient traces. ``None`` adds nothing to the compiled program.

    Returns:
      A :class:`GradientResult` with the fields of an ``EMResult`` (``n_steps`` in
      place of ``n_iter``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, latentem as lem
      >>> x = jnp.concatenate([jax.random.normal(jax.random.key(1), (100, 2)),
      ...                      jax.random.normal(jax.random.key(2), (100, 2)) + 6.0])
      >>> model = lem.gaussian_mixture(2)
      >>> params = model.init(jax.random.key(0), x, jnp.ones(200))
      >>> result = lem.fit_gradient(model, params, x, optax.lbfgs(), num_steps=100, tol=1e-6)
      >>> em = lem.fit_em(model, params, x, tol=1e-6)
      >>> bool(result.converged), bool(jnp.abs(result.log_likelihood - em.log_likelihood) < 1e-3)
      (True, True)

    References:
      Xu & Jordan (1996), On convergence properties of the EM algorithm for Gaussian
      mixtures. Neural Computation 8(1). Liu & Nocedal (1989), On the limited memory
      BFGS method for large scale optimization. Math. Programming 45.
    """
    check_latent_model(model, "fit_gradient")
    check_not_a_key(params, "fit_gradient")
    _require_bijection(model)
    _check_optimizer(optimizer)
    x, weights = _prepare(x, weights)
    check_model_data(model, x)
    num_steps = check_positive_int(num_steps, "num_steps", minimum=0)
    if tol is None:
        tol = 0.0  # |change| < 0 never holds: run every step
    check_nonnegative(tol, "tol")
    expect_convergence = expects_convergence(None, tol)
    check_callback(callback)
    result = _fit_gradient_compiled(
        model, optimizer, params, x, weights, tol, num_steps=num_steps, callback=callback
    )
    if is_concrete(result.status):
        _warn_on_status(result.status, num_steps, expect_convergence)
    return result


def _warn_on_status(status: Array, num_steps: int, expect_convergence: bool) -> None:
    """Turn bad statuses of an eager gradient fit (any batch shape) into ConvergenceWarnings."""
    messages = {
        Status.NONFINITE: "the objective, the parameters or the gradient became NaN or infinite "
        "(Status.NONFINITE); the last finite parameters were returned. Lower the learning rate, "
        "or start from better parameters (e.g. a few EM iterations).",
        Status.EMPTY_COMPONENT: "a component ended with no posterior mass (Status.EMPTY_COMPONENT); "
        "the data support fewer components. Reduce n_components.",
    }
    if expect_convergence and num_steps > 0:
        messages[Status.MAX_ITER] = (
            f"the objective did not settle within tol in num_steps={num_steps} steps "
            "(Status.MAX_ITER); increase num_steps or tol, or tune the optimizer."
        )
    warn_status_counts(status, messages)


# Plain jax.jit, not lem.jit: the CPU options that speed up EM's E- and M-steps slow
# down the gradient's program (a step of adam at (1e5, 8, 8): 12.2 ms with XLA's
# defaults, 17.4 ms with the options; at (1e5, 32, 16): 191 and 268 ms; 2-core CPU).
@functools.partial(jax.jit, static_argnames=("model", "optimizer", "num_steps", "callback"))
def _fit_gradient_compiled(
    model: LatentModel,
    optimizer: optax.GradientTransformation,
    params: Params,
    x: Array,
    weights: Array,
    tol: Array,
    *,
    num_steps: int,
    callback: Callback | None = None,
) -> GradientResult:
    # Plain transformations ignore the line-search arguments; L-BFGS needs them.
    optimizer = optax.with_extra_args_support(optimizer)
    loss = _loss_fn(model, x, weights)
    unconstrained = model.to_unconstrained(params)
    with _optax_promotion():
        optimizer_state = optimizer.init(unconstrained)
    value_and_gradient = _value_and_gradient_fn(loss, optimizer_state)
    value, gradient = value_and_gradient(unconstrained, optimizer_state)
    tol = jnp.asarray(tol, value.dtype)
    start_finite = jnp.isfinite(value) & tree_all_finite(unconstrained) & tree_all_finite(gradient)
    state = _GradientState(
        unconstrained=unconstrained,
        optimizer_state=optimizer_state,
        value=value,
        gradient=gradient,
        n_steps=jnp.zeros((), jnp.int32),
        status=jnp.where(start_finite, _RUNNING, int(Status.NONFINITE)).astype(jnp.int32),
        history=jnp.full((num_steps,), jnp.nan, value.dtype),
    )
    if callback is not None:
        jax.debug.callback(callback, state.n_steps, -value)

    def keep_going(state: _GradientState) -> Array:
        return (state.status == _RUNNING) & (state.n_steps < num_steps)

    def step(state: _GradientState) -> _GradientState:
        with _optax_promotion():
            updates, new_optimizer_state = optimizer.update(
                state.gradient,
                state.optimizer_state,
                state.unconstrained,
                value=state.value,
                grad=state.gradient,
                value_fn=loss,
            )
        new_unconstrained = optax.apply_updates(state.unconstrained, updates)
        new_value, new_gradient = value_and_gradient(new_unconstrained, new_optimizer_state)
        finite = jnp.isfinite(new_value) & tree_all_finite(new_unconstrained) & tree_all_finite(new_gradient)
        # A step that left the coordinates where they were (an optimizer accumulating
        # gradients, as optax.MultiSteps between its updates) changes nothing, which
        # says nothing about convergence.
        moved = jnp.any(
            jnp.stack(
                [
                    jnp.any(new != old)
                    for new, old in zip(
                        jax.tree_util.tree_leaves(new_unconstrained),
                        jax.tree_util.tree_leaves(state.unconstrained),
                        strict=True,
                    )
                ]
            )
        )
        converged = finite & moved & (jnp.abs(new_value - state.value) < tol)
        status = jnp.where(
            finite, jnp.where(converged, int(Status.CONVERGED), _RUNNING), int(Status.NONFINITE)
        )
        if callback is not None:
            jax.debug.callback(callback, state.n_steps + 1, -new_value)
        return _GradientState(
            unconstrained=tree_select(finite, new_unconstrained, state.unconstrained),
            optimizer_state=tree_select(finite, new_optimizer_state, state.optimizer_state),
            value=jnp.where(finite, new_value, state.value),
            gradient=tree_select(finite, new_gradient, state.gradient),
            n_steps=state.n_steps + 1,
            status=status.astype(jnp.int32),
            history=state.history.at[state.n_steps].set(-new_value),
        )

    if num_steps > 0:  # with num_steps = 0 the body (which writes history) is not traced
        state = jax.lax.while_loop(keep_going, step, state)
    fitted = model.from_unconstrained(state.unconstrained)
    status = jnp.where(state.status == _RUNNING, int(Status.MAX_ITER), state.status)
    if model.log_joint is not None:  # finite-state: the engine's empty-component rule
        empty = _has_empty_state(e_step(model, fitted, x)[0], weights, weights.sum())
        status = jnp.where((status != int(Status.NONFINITE)) & empty, int(Status.EMPTY_COMPONENT), status)
    converged = (state.status == int(Status.CONVERGED)) & (status != int(Status.NONFINITE))
    return GradientResult(
        params=fitted,
        log_likelihood=-state.value,
        n_steps=state.n_steps,
        converged=converged,
        status=status.astype(jnp.int32),
        history=state.history,
    )
