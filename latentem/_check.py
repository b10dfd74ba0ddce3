r"""``check_model``: find the usual mistakes in a hand-written model.

A custom :class:`~latentem.LatentModel` can run without error and still be wrong: an
M-step that is not the maximiser, weights that are silently ignored, a ``log_joint``
that forgets a term, a sampler that draws from another model. Each such mistake breaks
a property that holds for every correct model, and :func:`check_model` tests those
properties numerically on the user's data:

- every function returns arrays of the documented shapes and of the data's dtype, and
  traces under ``jax.jit`` and ``jax.vmap``;
- the log-likelihood is finite on the data, and every parameter enters it;
- on random posteriors :math:`R`, the M-step's output maximises the expected
  complete-data objective :math:`Q(\theta; R) = \sum_{nk} R_{nk} \log p(x_n, z_n = k
  \mid \theta) + \log p(\theta)`: it is no lower than the input parameters or nearby
  points, and its gradient (by autodiff, in unconstrained coordinates) vanishes;
- EM from ``init`` never lowers the objective, and a model's fused EM iteration (if
  it has one) equals the one derived from ``log_joint`` and ``m_step``;
- a zero sample weight equals removing the sample, an integer weight repeating it;
- ``sample`` draws from the distribution ``log_joint`` describes: the states it draws
  are calibrated against the posterior, and EM started at the true parameters on a
  large sample of their draws barely moves (the likelihood gain is of the order
  expected from sampling noise).

Models with a custom ``posterior`` and no ``log_joint`` (continuous latent variables)
have no generic :math:`Q`; for them stationarity is checked where EM stops, through
Fisher's identity: at a fixed point of EM the gradient of the marginal log-likelihood
vanishes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentem._base import (
    Array,
    LatentModel,
    Params,
    PRNGKey,
    check_key,
    check_latent_model,
    check_model_data,
    check_positive_int,
    check_weights,
    check_x,
    float_dtype,
    jit,
    tree_all_finite,
)
from latentem._em import _em_iteration, _fused_iteration, e_step, em_step

# Names of the checks, in the order they run.
FUNCTIONS = "functions"
TRACEABLE = "traceable"
FINITE = "finite"
USES_PARAMETERS = "uses_parameters"
M_STEP_IMPROVES = "m_step_improves"
M_STEP_STATIONARY = "m_step_stationary"
EM_MONOTONE = "em_monotone"
FUSED_STEP = "fused_step"
WEIGHTS = "weights"
SAMPLE_CALIBRATION = "sample_calibration"
SAMPLE_RECOVERY = "sample_recovery"
CHECKS = (
    FUNCTIONS,
    TRACEABLE,
    FINITE,
    USES_PARAMETERS,
    M_STEP_IMPROVES,
    M_STEP_STATIONARY,
    EM_MONOTONE,
    FUSED_STEP,
    WEIGHTS,
    SAMPLE_CALIBRATION,
    SAMPLE_RECOVERY,
)


class CheckFinding(NamedTuple):
    """One finding of :func:`check_model`.

    Attributes:
      name: which check, one of ``latentem._check.CHECKS`` (e.g. ``"weights"``).
      passed: ``True`` (passed), ``False`` (failed) or ``None`` (not run, with the
        reason in ``message``).
      message: what was checked and what was found, in plain words.
    """

    name: str
    passed: bool | None
    message: str


class CheckReport(NamedTuple):
    """What :func:`check_model` returns: its findings, in the order the checks ran.

    ``report.passed`` is true when no check failed (skipped checks do not count);
    ``report.failures`` lists the failed findings; ``report["weights"]`` returns a
    finding by name; ``print(report)`` shows one line per finding.
    """

    findings: tuple[CheckFinding, ...]

    @property
    def passed(self) -> bool:
        return all(finding.passed is not False for finding in self.findings)

    @property
    def failures(self) -> tuple[CheckFinding, ...]:
        return tuple(finding for finding in self.findings if finding.passed is False)

    def __getitem__(self, name: Any) -> Any:  # type: ignore[override]
        if isinstance(name, str):
            for finding in self.findings:
                if finding.name == name:
                    return finding
            raise KeyError(f"no finding named {name!r}; the checks are {', '.join(CHECKS)}.")
        return tuple.__getitem__(self, name)

    def __str__(self) -> str:
        labels = {True: "PASS", False: "FAIL", None: "SKIP"}
        lines = [f"[{labels[finding.passed]}] {finding.name}: {finding.message}" for finding in self.findings]
        verdict = "all checks passed" if self.passed else f"{len(self.failures)} check(s) failed"
        return "\n".join([f"check_model: {verdict}", *lines])


class _Failed(Exception):
    """A check found a problem; the message says which, in plain words."""


class _Skipped(Exception):
    """A check could not run; the message says why."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _numpy_rng(key: PRNGKey) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (cheap: no compiled random kernels)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _floating_leaves(tree: Any) -> list[tuple[str, Array]]:
    """(path, leaf) for every floating-point leaf of a pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in flat
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]


def _leaf_name(path: str) -> str:
    return "params" + path if path else "params"


def _max_relative_difference(actual: Any, expected: Any) -> tuple[float, str]:
    """Largest leafwise ``|a - e| / (|e| + max|e|)`` and the leaf where it occurs."""
    worst, where = 0.0, ""
    expected_leaves = dict(_floating_leaves(expected))
    for path, leaf in _floating_leaves(actual):
        a = np.asarray(leaf, np.float64)
        e = np.asarray(expected_leaves[path], np.float64)
        scale = np.abs(e) + np.max(np.abs(e), initial=0.0) + np.finfo(np.float64).tiny
        difference = np.abs(a - e) / scale
        value = float(np.nanmax(difference, initial=0.0)) if np.isfinite(a).all() else math.inf
        if value > worst:
            worst, where = value, _leaf_name(path)
    return worst, where


def _same_structure(name: str, actual: Any, expected: Any) -> None:
    actual_structure = jax.tree_util.tree_structure(actual)
    expected_structure = jax.tree_util.tree_structure(expected)
    if actual_structure != expected_structure:
        raise _Failed(
            f"{name} returned a pytree of structure {actual_structure}, but the parameters "
            f"have {expected_structure}; return the same parameter type."
        )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_leaves(expected), strict=True
    ):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise _Failed(
                f"{name} returned {_leaf_name(jax.tree_util.keystr(path))} with shape {a.shape} and "
                f"dtype {a.dtype}, but the parameters have shape {b.shape} and dtype {b.dtype}."
            )


def _quick_jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit`` for the shortest compile (on a CPU: LLVM's level 0, XLA's loop emitters).

    A check runs each program a few times on a few hundred samples, so compiling is
    most of its cost: a check of a three-component full Gaussian mixture on Old
    Faithful took 7.3 s with XLA's default options and 3.4 to 3.7 s with these (2-core
    CPU, jax 0.10.2); a second check, which reuses the programs, 0.14 and 0.12 s. One tier
    for every program, so that results compared with each other (zero weights against
    removed rows, a fused iteration against the derived one) come from the same code
    generation.
    """
    return jit(
        fun,
        tune_if=lambda *args, **kwargs: False,
        quick_compile=True,
        tiny_if=lambda *args, **kwargs: True,
        **jit_kwargs,
    )


class _Programs:
    """The model's functions, compiled once per check_model call and shape.

    Everything numerical runs through these jitted programs (data passed as arguments,
    not closed over), so a check costs a few compilations rather than one per
    primitive, as eager execution would.
    """

    def __init__(self, model: LatentModel) -> None:
        self.model = model
        self.init = _quick_jit(model.init)
        self.step = _quick_jit(lambda params, x, weights: em_step(model, params, x, weights))
        if model.fused_step is not None:
            unfused = model._replace(fused_step=None)
            self.iterations = {
                name: _quick_jit(
                    lambda params, x, weights, m=m: _em_iteration(m, params, x, weights, weights.sum())
                )
                for name, m in (("fused", model), ("unfused", unfused))
            }
        self.sample = _quick_jit(model.sample, static_argnums=2) if model.sample is not None else None
        self.log_joint = _quick_jit(model.log_joint) if model.log_joint is not None else None
        self.marginal_gradient = _quick_jit(jax.grad(self._marginal))
        self.terms_gradient = _quick_jit(jax.grad(self._terms))
        self.expected = _quick_jit(self._expected)
        if _has_bijection(model):
            self.moved = _quick_jit(
                lambda params, noise: model.from_unconstrained(
                    jax.tree_util.tree_map(jnp.add, model.to_unconstrained(params), noise)
                )
            )

    def _marginal(self, unconstrained: Any, x: Array, weights: Array) -> Array:
        return _objective(self.model, self.model.from_unconstrained(unconstrained), x, weights)

    def _terms(self, params: Params, x: Array, coefficients: Array) -> Array:
        """A random linear combination of every entry of log p(x_n, z_n) (or of log p(x_n))."""
        if self.model.log_joint is not None:
            log_joint = self.model.log_joint(params, x)
            return jnp.sum(jnp.where(jnp.isfinite(log_joint), coefficients * log_joint, 0))
        return jnp.sum(coefficients[:, 0] * e_step(self.model, params, x)[1])

    def _expected(
        self, start: Params, x: Array, posterior: Array, noises: Any, targets: Params
    ) -> tuple[Any, ...]:
        """M-step output on ``posterior``; Q there, at ``start`` and nearby; slopes of Q
        along chords to ``targets``; gradient norms of Q.

        ``targets`` are valid parameters (a leading axis over them). Along each chord
        ``new + t (target - new)``: the slopes dQ/dt at t = 0 and t = 0.05 (forward-mode
        autodiff), and whether Q is finite at t = -0.001, on the other side of ``new``;
        shape ``(n_targets, 3)``. The gradient norms are at the M-step output
        and at the first nearby point, which gives the scale the first is compared with.

        ``noises`` is the unconstrained pytree with a leading axis of random directions.
        Q is evaluated once under ``vmap`` over all points, to keep the program small.
        """
        model = self.model
        new = model.m_step(x, posterior, start)
        q = lambda params: _expected_objective(model, params, x, posterior)

        def chord(target: Params) -> Array:
            def along(s: Array) -> Array:
                return q(
                    jax.tree_util.tree_map(
                        lambda a, b: (
                            a + s.astype(a.dtype) * (b - a) if jnp.issubdtype(a.dtype, jnp.inexact) else a
                        ),
                        new,
                        target,
                    )
                )

            slope = lambda t: jax.jvp(along, (t,), (jnp.ones_like(t),))[1]
            steps = jnp.asarray([0.0, 0.05], posterior.dtype)
            behind = jnp.isfinite(along(jnp.asarray(-0.001, posterior.dtype))).astype(posterior.dtype)
            return jnp.concatenate([jax.vmap(slope)(steps), behind[None]])

        chords = jax.vmap(chord)(targets)
        if not _has_bijection(model):
            return new, jnp.stack([q(new), q(start)]), chords, None, None
        unconstrained = model.to_unconstrained(new)
        origin = model.to_unconstrained(start)
        nearby = jax.tree_util.tree_map(
            lambda leaf, noise: leaf[None] + 0.05 * (1 + jnp.abs(leaf[None])) * noise, unconstrained, noises
        )
        points = jax.tree_util.tree_map(
            lambda a, b, c: jnp.concatenate([a[None], b[None], c]), unconstrained, origin, nearby
        )
        values = jax.vmap(lambda u: q(model.from_unconstrained(u)))(points)
        # Gradients at the M-step output and at the first nearby point (their scale), vmapped.
        pair = jax.tree_util.tree_map(lambda leaf: leaf[::2][:2], points)
        gradients = jax.vmap(jax.grad(lambda u: q(model.from_unconstrained(u))))(pair)
        norms = jax.tree_util.tree_map(
            lambda leaf: jnp.sqrt(jnp.sum(jnp.square(leaf.reshape(2, -1)), axis=1)), gradients
        )
        return (
            new,
            values,
            chords,
            jax.tree_util.tree_map(lambda leaf: leaf[0], norms),
            jax.tree_util.tree_map(lambda leaf: leaf[1], norms),
        )

    def batched_shapes(self, params: Params, x: Array, weights: Array) -> Any:
        """Abstract evaluation of the E-step and M-step under vmap over two parameter sets."""
        model = self.model

        def one(params: Params) -> Any:
            posterior, log_likelihood = e_step(model, params, x)
            weighted = jax.tree_util.tree_map(
                lambda leaf: leaf * weights.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype),
                posterior,
            )
            return log_likelihood, model.m_step(x, weighted, params)

        stacked = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf, leaf]), params)
        return jax.eval_shape(jax.vmap(one), stacked)


def _programs(model: LatentModel) -> _Programs:
    """One set of compiled programs per model, so checking a model again costs no compilation."""
    try:
        return _cached_programs(model)
    except TypeError:  # a model with an unhashable field: compile afresh
        return _Programs(model)


@functools.lru_cache(maxsize=32)
def _cached_programs(model: LatentModel) -> _Programs:
    return _Programs(model)


class _Context(NamedTuple):
    """Everything the checks share."""

    model: LatentModel
    programs: _Programs
    x: Array
    weights: Array
    dtype: np.dtype
    params: Params  # from init
    key: PRNGKey
    rng: np.random.Generator
    n_samples: int
    n_em_steps: int


def _objective(model: LatentModel, params: Params, x: Array, weights: Array) -> Array:
    """EM's objective: mean log-likelihood per unit weight, plus log_prior / sum(weights)."""
    log_likelihood = e_step(model, params, x)[1]
    total = weights.sum()
    value = jnp.sum(jnp.where(weights > 0, weights * log_likelihood, 0)) / total
    if model.log_prior is not None:
        value = value + model.log_prior(params) / total
    return value


def _expected_objective(model: LatentModel, params: Params, x: Array, posterior: Array) -> Array:
    """Q(theta; R) per unit weight: sum_nk R_nk log p(x_n, k | theta) (+ log prior)."""
    log_joint = model.log_joint(params, x)
    value = jnp.sum(jnp.where(posterior > 0, posterior * log_joint, 0))
    if model.log_prior is not None:
        value = value + model.log_prior(params)
    return value / posterior.sum()


def _has_bijection(model: LatentModel) -> bool:
    return model.to_unconstrained is not None and model.from_unconstrained is not None


def _n_free_parameters(model: LatentModel, params: Params) -> int:
    if model.n_parameters is not None:
        return int(model.n_parameters(params))
    return int(sum(np.size(leaf) for _, leaf in _floating_leaves(params)))


def _loose_rtol(dtype: np.dtype) -> float:
    """Round-off allowance for comparisons of results computed in different orders."""
    return float(np.sqrt(np.finfo(dtype).eps))


def _stationarity_rtol(dtype: np.dtype) -> float:
    """Allowed |grad at the M-step| / |grad 5% away|: round-off (float32), and small
    deliberate regularisers such as the Gaussian mixture's reg_covar=1e-6 (float64)."""
    return max(1e-4, 1e4 * float(np.finfo(dtype).eps))


def _norms(tree: Any) -> dict[str, float]:
    return {path: float(leaf) for path, leaf in _floating_leaves(tree)}


def _gradient_ratios(
    at_point: dict[str, float], at_reference: dict[str, float], dtype: np.dtype
) -> dict[str, float]:
    """Leafwise |grad| at a point over |grad| at a reference point, with a round-off floor."""
    finfo = np.finfo(dtype)
    floor = float(finfo.tiny) + float(finfo.eps) * max(at_reference.values(), default=0.0)
    return {path: norm / max(at_reference[path], floor) for path, norm in at_point.items()}


def _nearby(ctx: _Context, unconstrained: Any) -> Any:
    """A random point 5% (relative, per coordinate) away, in unconstrained coordinates."""
    return jax.tree_util.tree_map(
        lambda leaf: (
            leaf + 0.05 * (1 + jnp.abs(leaf)) * jnp.asarray(ctx.rng.standard_normal(leaf.shape), leaf.dtype)
        ),
        unconstrained,
    )


# ---------------------------------------------------------------------------
# The checks. Each returns a message on success, raises _Failed or _Skipped.
# ---------------------------------------------------------------------------


def _check_functions(ctx: _Context) -> str:
    """Shapes and dtypes, from abstract evaluation (no compilation) where possible."""
    model, x, params = ctx.model, ctx.x, ctx.params
    if not jax.tree_util.tree_leaves(params):
        raise _Failed("init returned no arrays; parameters must be a pytree (e.g. a NamedTuple) of arrays.")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _leaf_name(jax.tree_util.keystr(path))
        if not isinstance(leaf, jax.Array | np.ndarray):
            raise _Failed(
                f"init returned {name} of type {type(leaf).__name__}; parameters must be arrays only."
            )
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.dtype != ctx.dtype:
            raise _Failed(
                f"init returned {name} in {leaf.dtype} for {ctx.dtype} data; the dtype must follow the "
                "data (cast with x.dtype; take epsilons from jnp.finfo)."
            )
    n = x.shape[0]
    checked = ["init"]
    if model.log_joint is None and model.posterior is None:
        raise _Failed("the model has neither log_joint nor posterior; give it one of them.")
    if model.log_joint is not None:
        log_joint = jax.eval_shape(model.log_joint, params, x)
        if log_joint.ndim != 2 or log_joint.shape[0] != n:
            raise _Failed(
                f"log_joint must return shape (n_samples, n_states) = ({n}, K); got {log_joint.shape}."
            )
        if log_joint.dtype != ctx.dtype:
            raise _Failed(f"log_joint returned {log_joint.dtype} for {ctx.dtype} data and parameters.")
        checked.append("log_joint")
    posterior, log_likelihood = jax.eval_shape(lambda p, x: e_step(model, p, x), params, x)
    if model.posterior is not None:
        if log_likelihood.shape != (n,) or log_likelihood.dtype != ctx.dtype:
            raise _Failed(
                f"posterior must return a per-sample log-likelihood of shape ({n},) and dtype {ctx.dtype}; "
                f"got shape {log_likelihood.shape} and dtype {log_likelihood.dtype}."
            )
        for path, leaf in jax.tree_util.tree_flatten_with_path(posterior)[0]:
            if len(leaf.shape) == 0 or leaf.shape[0] != n:
                raise _Failed(
                    f"posterior leaf {jax.tree_util.keystr(path) or 'posterior'} has shape {leaf.shape}; "
                    f"every leaf needs leading axis n_samples = {n} (the engine scales it by the weights)."
                )
        checked.append("posterior")
    _same_structure("m_step", jax.eval_shape(model.m_step, x, posterior, params), params)
    checked.append("m_step")
    if model.sample is not None:
        n_draws = ctx.n_samples
        drawn, states = jax.eval_shape(lambda key, p: model.sample(key, p, n_draws), ctx.key, params)
        if drawn.shape != (n_draws, *x.shape[1:]):
            raise _Failed(
                f"sample(key, params, {n_draws}) returned x of shape {drawn.shape}; "
                f"expected {(n_draws, *x.shape[1:])}."
            )
        if any(leaf.shape[:1] != (n_draws,) for leaf in jax.tree_util.tree_leaves(states)):
            raise _Failed(f"sample(key, params, {n_draws}) must return z with leading axis {n_draws}.")
        checked.append("sample")
    if model.n_parameters is not None:
        count = model.n_parameters(params)
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise _Failed(f"n_parameters must return a positive Python int; got {count!r}.")
        checked.append("n_parameters")
    if model.log_prior is not None:
        value = _quick_jit(model.log_prior)(params)
        if jnp.shape(value) != () or not bool(jnp.isfinite(value)):
            raise _Failed(f"log_prior must return a finite scalar; got {value!r}.")
        checked.append("log_prior")
    if (model.to_unconstrained is None) != (model.from_unconstrained is None):
        raise _Failed("give both to_unconstrained and from_unconstrained, or neither.")
    if _has_bijection(model):
        unconstrained, back = _quick_jit(
            lambda p: (model.to_unconstrained(p), model.from_unconstrained(model.to_unconstrained(p)))
        )(params)
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for _, leaf in _floating_leaves(unconstrained)):
            raise _Failed("to_unconstrained returned non-finite values at the initial parameters.")
        _same_structure("from_unconstrained", back, params)
        error, where = _max_relative_difference(back, params)
        if error > _loose_rtol(ctx.dtype):
            raise _Failed(
                f"from_unconstrained(to_unconstrained(params)) differs from params by {error:.2g} "
                f"(relative) at {where}; the two must be inverses."
            )
        checked.append("to/from_unconstrained")
    return f"{', '.join(checked)} return the documented shapes and dtype {ctx.dtype}."


def _check_traceable(ctx: _Context) -> str:
    try:
        ctx.programs.step(ctx.params, ctx.x, ctx.weights)
    except Exception as error:
        raise _Failed(
            f"one EM step fails under jax.jit ({type(error).__name__}: {error}); avoid Python control "
            "flow on array values (use jnp.where, lax.cond) and host conversions (float(), np.asarray)."
        ) from None
    try:
        ctx.programs.batched_shapes(ctx.params, ctx.x, ctx.weights)
    except Exception as error:
        raise _Failed(
            f"the E-step or m_step fails under jax.vmap over parameters ({type(error).__name__}: {error}); "
            "write each function for one unbatched parameter set."
        ) from None
    return "one EM step compiles under jax.jit, and the E-step and m_step trace under jax.vmap."


def _check_finite(ctx: _Context) -> str:
    model, programs, x, params = ctx.model, ctx.programs, ctx.x, ctx.params
    if model.log_joint is not None:
        log_joint = np.asarray(programs.log_joint(params, x))
        if np.isnan(log_joint).any() or np.isposinf(log_joint).any():
            rows = np.flatnonzero(np.isnan(log_joint).any(axis=1) | np.isposinf(log_joint).any(axis=1))
            raise _Failed(
                f"log_joint is NaN or +inf at the initial parameters for {rows.size} sample(s), "
                f"e.g. row {rows[0]}; guard logs of zero (0 * log 0) and divisions."
            )
        with np.errstate(divide="ignore"):
            peak = log_joint.max(axis=1, keepdims=True)
            safe_peak = np.where(np.isfinite(peak), peak, 0)
            log_likelihood = (np.log(np.exp(log_joint - safe_peak).sum(axis=1, keepdims=True)) + safe_peak)[
                :, 0
            ]
    else:
        log_likelihood = np.asarray(_quick_jit(lambda p, x: e_step(model, p, x)[1])(params, x))
    bad = np.flatnonzero(~np.isfinite(log_likelihood) & (np.asarray(ctx.weights) > 0))
    if bad.size:
        raise _Failed(
            f"the log-likelihood is not finite for {bad.size} weighted sample(s), e.g. row {bad[0]} "
            f"(value {log_likelihood[bad[0]]}); every sample must have positive probability under init's "
            "parameters (smooth probabilities away from 0)."
        )
    return "the log-likelihood is finite for every sample at the initial parameters."


def _check_uses_parameters(ctx: _Context) -> str:
    model, x = ctx.model, ctx.x
    n_states = jax.eval_shape(model.log_joint, ctx.params, x).shape[1] if model.log_joint is not None else 1
    coefficients = jnp.asarray(ctx.rng.standard_normal((x.shape[0], n_states)), ctx.dtype)
    gradient = ctx.programs.terms_gradient(ctx.params, x, coefficients)
    unused = [
        _leaf_name(path)
        for path, leaf in _floating_leaves(gradient)
        if not bool(jnp.any(leaf != 0)) and bool(jnp.all(jnp.isfinite(leaf)))
    ]
    if unused:
        what = "log_joint" if model.log_joint is not None else "the log-likelihood"
        raise _Failed(
            f"{what} does not depend on {', '.join(unused)} (its gradient is exactly zero): every "
            "parameter should enter log p(x, z); is a term missing, such as log(weights) in a mixture?"
        )
    return "every parameter leaf enters the log-likelihood (non-zero gradient)."


def _check_m_step_improves(ctx: _Context, analyses: list[Any]) -> str:
    """Q at the M-step output beats Q at the input and at nearby points, and does not
    rise along the chords from it to other valid parameters.

    The chords need no unconstrained coordinates: the parameters of a mixture (weights
    on the simplex, positive rates and variances, positive definite covariances,
    probabilities) form a convex set, so every point of a chord between valid
    parameters is valid, and at a maximiser of Q over that set the slope of Q toward
    any of them is at most zero. Where Q is also finite a little behind the M-step's
    output (an interior point, not one on the edge of the support), the slope must be
    zero: a negative one is a direction, backwards, in which Q rises.

    Appends the analyses (M-step output, Q values, gradient norms) to ``analyses`` before
    judging them, so that the stationarity check runs on them even when this one fails.
    """
    model, x = ctx.model, ctx.x
    if model.log_joint is None:
        raise _Skipped(
            "no log_joint, so no generic expected complete-data objective; EM monotonicity and "
            "stationarity at the EM fixed point are checked instead."
        )
    n_states = jax.eval_shape(model.log_joint, ctx.params, x).shape[1]
    tolerance_scale = 100 * float(np.finfo(ctx.dtype).eps)
    if _has_bijection(model):
        shapes = jax.eval_shape(model.to_unconstrained, ctx.params)
    # Valid parameters to draw chords to: init's, on the data with other keys too.
    targets = [ctx.params] + [
        ctx.programs.init(jax.random.fold_in(ctx.key, 1 + index), x, ctx.weights) for index in range(3)
    ]
    targets = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *targets)
    for _ in range(2):
        draws = ctx.rng.dirichlet(np.ones(n_states), size=x.shape[0])
        posterior = jnp.asarray(draws, ctx.dtype) * ctx.weights[:, None]
        noises = (
            jax.tree_util.tree_map(
                lambda leaf: jnp.asarray(ctx.rng.standard_normal((3, *leaf.shape)), leaf.dtype), shapes
            )
            if _has_bijection(model)
            else None
        )
        analyses.append(ctx.programs.expected(ctx.params, x, posterior, noises, targets))
    for analysis in analyses:
        values = np.asarray(analysis[1], np.float64)
        q_new = values[0]
        if not math.isfinite(q_new):
            raise _Failed("m_step on random posteriors returned parameters where Q is not finite.")
        descriptions = ["the input parameters"] + [f"a random nearby point ({i + 1})" for i in range(3)]
        for description, q_other in zip(descriptions, values[1:], strict=False):
            if q_other > q_new + tolerance_scale * (1 + abs(q_new)):
                raise _Failed(
                    f"on random posteriors the M-step's output is not the maximiser of the expected "
                    f"complete-data log-likelihood Q: Q = {q_new:.6g} per sample at m_step's output but "
                    f"{q_other:.6g} at {description}. Re-derive the M-step (it must maximise Q, "
                    "plus log_prior if the model has one)."
                )
    rtol = _stationarity_rtol(ctx.dtype)
    for analysis in analyses:
        q_new = float(analysis[1][0])
        for index, (at_output, further, behind) in enumerate(np.asarray(analysis[2], np.float64)):
            if not (math.isfinite(at_output) and math.isfinite(further)):
                continue  # a chord through the edge of the support says nothing
            allowed = rtol * abs(further) + tolerance_scale * (1 + abs(q_new))
            if at_output > allowed or (behind == 1 and -at_output > allowed):
                target = (
                    "init's parameters" if index == 0 else f"init's parameters with another key ({index})"
                )
                side = "toward" if at_output > 0 else "away from"
                ratio = abs(at_output) / max(abs(further), float(np.finfo(np.float64).tiny))
                raise _Failed(
                    f"on random posteriors the M-step's output is not the maximiser of the expected "
                    f"complete-data log-likelihood Q: Q rises from m_step's output {side} {target}, "
                    f"with slope {abs(at_output):.3g} per unit of the chord between them ({ratio:.2g} "
                    f"times the slope 5% along it, allowed {rtol:.0e}). Re-derive the M-step (it must "
                    "maximise Q, plus log_prior if the model has one)."
                )
    return (
        "on random posteriors, Q at m_step's output is at least Q at the input parameters"
        + (", at random nearby points," if _has_bijection(model) else "")
        + " and does not rise along the chords between it and other valid parameters."
    )


def _check_m_step_stationary(ctx: _Context, analyses: list[Any]) -> str:
    model = ctx.model
    if not _has_bijection(model):
        raise _Skipped(
            "the model has no to_unconstrained/from_unconstrained, so its constrained parameters "
            "(weights on the simplex, positive variances) have no coordinates in which the gradient "
            "must vanish; add them to check stationarity by autodiff."
        )
    if model.log_joint is None:
        return _check_fixed_point(ctx)
    rtol = _stationarity_rtol(ctx.dtype)
    worst = 0.0
    for _, _, _, at_m_step, at_nearby in analyses:
        ratios = _gradient_ratios(_norms(at_m_step), _norms(at_nearby), ctx.dtype)
        for path, ratio in ratios.items():
            if math.isnan(ratio):
                raise _Failed(
                    f"the gradient of the expected complete-data log-likelihood Q with respect to "
                    f"{path or 'the parameters'} is NaN at m_step's output on random posteriors: "
                    "Q or its gradient is not finite there, usually a log of a zero probability "
                    "(0 * log 0) or a division by zero. Guard them (jnp.where, jax.scipy.special.xlogy) "
                    "so that Q and its gradient stay finite where a state or category has no mass."
                )
            if not math.isfinite(ratio) or ratio > rtol:
                raise _Failed(
                    f"the M-step's output is not a stationary point of the expected complete-data "
                    f"log-likelihood Q: on random posteriors, the gradient of Q with respect to "
                    f"{path or 'the parameters'} (unconstrained coordinates) is {ratio:.2g} times its size "
                    f"at a point 5% away (allowed {rtol:.0e}). The M-step does not maximise Q for this "
                    "parameter (an M-step that regularises on purpose should express that as log_prior)."
                )
            worst = max(worst, ratio)
    return (
        "on random posteriors, the gradient of Q (autodiff, unconstrained coordinates) at m_step's "
        f"output is at most {worst:.1g} of its size at a point 5% away (allowed {rtol:.0e})."
    )


def _check_fixed_point(ctx: _Context) -> str:
    """Continuous latent variables: at EM's fixed point the marginal gradient vanishes.

    Fisher's identity: the gradient of the log-likelihood at theta equals that of
    Q(. ; theta) there, which the M-step zeroes at a fixed point theta = M(theta).
    """
    model, programs, x, weights = ctx.model, ctx.programs, ctx.x, ctx.weights
    rtol = 1e-3 if ctx.dtype == np.float64 else 1e-2
    eps = float(np.finfo(ctx.dtype).eps)

    def norms(point: Any) -> dict[str, float]:
        gradient = programs.marginal_gradient(point, x, weights)
        return {path: float(jnp.sqrt(jnp.sum(jnp.square(leaf)))) for path, leaf in _floating_leaves(gradient)}

    params = ctx.params
    max_steps = 50 * ctx.n_em_steps
    for step in range(1, max_steps + 1):
        new_params, _ = programs.step(params, x, weights)
        # Stopped: no parameter moves by more than round-off in one step.
        stalled = _max_relative_difference(new_params, params)[0] <= 100 * eps
        params = new_params
        if step % 25 and not stalled and step < max_steps:
            continue
        unconstrained = model.to_unconstrained(params)
        ratios = _gradient_ratios(norms(unconstrained), norms(_nearby(ctx, unconstrained)), ctx.dtype)
        path, worst = max(ratios.items(), key=lambda item: item[1])
        if worst <= rtol:
            return (
                f"after {step} EM steps the gradient of the log-likelihood (Fisher's identity: the "
                f"gradient of Q at a fixed point) is {worst:.1g} of its size at a point 5% away "
                f"(allowed {rtol:.0e})."
            )
        if stalled:
            raise _Failed(
                f"EM stopped moving at a point that is not a stationary point of the log-likelihood: "
                f"the gradient with respect to {path or 'the parameters'} is {worst:.2g} of its size at a "
                f"point 5% away (allowed {rtol:.0e}). The M-step does not maximise the expected "
                "complete-data log-likelihood."
            )
    raise _Skipped(
        f"EM had not reached a fixed point after {max_steps} steps; the gradient there is still "
        f"{worst:.1g} of its size at a point 5% away, so stationarity is inconclusive."
    )


def _em_steps(
    ctx: _Context, params: Params, x: Array, weights: Array, programs: _Programs | None = None
) -> tuple[Params, np.ndarray]:
    """``n_em_steps`` EM steps; the objective before each step and after the last."""
    programs = programs or ctx.programs
    objectives = []
    for _ in range(ctx.n_em_steps + 1):
        new_params, objective = programs.step(params, x, weights)
        objectives.append(float(objective))
        if len(objectives) <= ctx.n_em_steps:
            params = new_params
    return params, np.asarray(objectives)


def _check_em_monotone(ctx: _Context) -> str:
    _, values = _em_steps(ctx, ctx.params, ctx.x, ctx.weights)
    if not np.isfinite(values).all():
        step = int(np.flatnonzero(~np.isfinite(values))[0])
        raise _Failed(f"the EM objective became non-finite after {step} EM step(s) from init.")
    allowance = 100 * float(np.finfo(ctx.dtype).eps) * (1 + np.abs(values[:-1]))
    drops = values[:-1] - values[1:]
    if (drops > allowance).any():
        step = int(np.argmax(drops - allowance))
        raise _Failed(
            f"EM lowered the objective at step {step + 1}: from {values[step]:.8g} to "
            f"{values[step + 1]:.8g}. EM never decreases it, so the M-step (or the E-step) is wrong."
        )
    return (
        f"{ctx.n_em_steps} EM steps from init never lowered the objective "
        f"({values[0]:.6g} to {values[-1]:.6g})."
    )


def _check_fused_step(ctx: _Context) -> str:
    """The model's fused EM iteration equals the one the engine derives from log_joint
    and m_step (new parameters, objective, state mass), to round-off."""
    model, x, weights = ctx.model, ctx.x, ctx.weights
    if model.fused_step is None:
        raise _Skipped("the model has no fused_step.")
    if model.posterior is not None:
        raise _Skipped("the model has a posterior, which the engine uses instead of fused_step.")
    if jax.eval_shape(functools.partial(_fused_iteration, model), ctx.params, x, weights) is None:
        raise _Skipped("fused_step declines data of this size; the engine uses log_joint and m_step.")
    tolerance = 1000 * float(np.finfo(ctx.dtype).eps)
    params, worst = ctx.params, 0.0
    for _ in range(3):  # at init's parameters and after one and two EM steps
        fused = ctx.programs.iterations["fused"](params, x, weights)
        unfused = ctx.programs.iterations["unfused"](params, x, weights)
        difference, where = _max_relative_difference(fused[0], unfused[0])
        objective = abs(float(fused[1]) - float(unfused[1])) / (1 + abs(float(unfused[1])))
        mass = float(jnp.max(jnp.abs(fused[2] - unfused[2]))) / float(weights.sum())
        for value, what in ((difference, where), (objective, "the objective"), (mass, "the state mass")):
            if not value <= tolerance:
                raise _Failed(
                    f"fused_step differs from the EM iteration of log_joint and m_step in {what} by "
                    f"{value:.2g} (relative; allowed {tolerance:.1g}). It must compute the same iteration."
                )
            worst = max(worst, value)
        params = unfused[0]
    return (
        "fused_step equals the iteration of log_joint and m_step over 3 steps "
        f"(largest relative difference {worst:.1g})."
    )


def _check_weights(ctx: _Context) -> str:
    model, programs, x, params = ctx.model, ctx.programs, ctx.x, ctx.params
    n = x.shape[0]
    if n < 8:
        raise _Skipped("needs at least 8 samples.")
    rtol = _loose_rtol(ctx.dtype)
    base = np.asarray(ctx.weights)
    # Zero weight = removal: a quarter of the samples get weight zero.
    removed = ctx.rng.permutation(n)[: n // 4]
    removed = removed[removed != np.flatnonzero(base > 0)[0]]
    zero = np.zeros(n, bool)
    zero[removed] = True
    kept = np.flatnonzero(~zero)
    zeroed = jnp.asarray(np.where(zero, 0, base), ctx.dtype)
    with_zeros, _ = programs.step(params, x, zeroed)
    without, _ = programs.step(params, x[kept], zeroed[kept])
    error, where = _max_relative_difference(with_zeros, without)
    if error > rtol:
        raise _Failed(
            f"a zero sample weight is not the same as removing the sample: after one EM step, {where} "
            f"differs by {error:.2g} (relative). The M-step must form its statistics only from the "
            "weighted posterior it receives (e.g. normalise by sums of the posterior, not by x.shape[0])."
        )
    # Integer weight = repetition, on the kept samples (so no new shape is compiled):
    # weight 2 on as many samples as were removed equals appending copies of them.
    doubled = ctx.rng.choice(kept.size, size=n - kept.size, replace=False)
    counts = np.ones(kept.size)
    counts[doubled] = 2
    with_counts, _ = programs.step(params, x[kept], jnp.asarray(counts * base[kept], ctx.dtype))
    rows = np.concatenate([kept, kept[doubled]])
    repeated, _ = programs.step(params, x[rows], jnp.asarray(base[rows], ctx.dtype))
    error, where = _max_relative_difference(with_counts, repeated)
    if error > rtol:
        raise _Failed(
            f"an integer sample weight is not the same as repeating the sample: after one EM step, "
            f"{where} differs by {error:.2g} (relative)."
        )
    # init: samples of zero weight must not influence the start.
    replacement = kept[ctx.rng.integers(0, kept.size, n)]
    changed = jnp.where(jnp.asarray(zero).reshape((n,) + (1,) * (x.ndim - 1)), x[replacement], x)
    first = programs.init(ctx.key, x, zeroed)
    second = programs.init(ctx.key, changed, zeroed)
    error, where = _max_relative_difference(second, first)
    if error > rtol:
        raise _Failed(
            f"init depends on samples of zero weight: changing their values moved {where} by {error:.2g} "
            "(relative). Weight every statistic and every random draw in init."
        )
    del model
    return (
        "zero weights equal removal and integer weights equal repetition (one EM step), and init "
        "ignores samples of zero weight."
    )


def _check_sample_calibration(ctx: _Context, draws: list[tuple[Params, Array, Any]]) -> str:
    if ctx.model.check_data is not None:
        for _, drawn, _ in draws:
            try:
                ctx.model.check_data(drawn)
            except ValueError as error:
                raise _Failed(
                    f"check_data refused data drawn by sample ({error}); it must accept every value "
                    "the model can generate."
                ) from error
    if ctx.model.log_joint is None:
        raise _Skipped("needs log_joint (finite latent states).")
    largest = 0.0
    for params, drawn, states in draws:
        states = np.asarray(states)
        if states.shape != (drawn.shape[0],) or not np.issubdtype(states.dtype, np.integer):
            raise _Skipped(
                f"sample returned z of shape {states.shape}; integer states of shape (n,) are needed."
            )
        log_joint = ctx.programs.log_joint(params, drawn)
        n_states = log_joint.shape[1]
        responsibilities = np.asarray(jax.nn.softmax(log_joint, axis=1), np.float64)
        observed = np.bincount(states, minlength=n_states)[:n_states] / states.size
        expected = responsibilities.mean(axis=0)
        # Given x_n, [z_n = k] - r_nk has mean 0 and variance r_nk (1 - r_nk).
        standard_error = np.sqrt(np.mean(responsibilities * (1 - responsibilities), axis=0) / states.size)
        deviations = np.abs(observed - expected) / (standard_error + 1 / states.size)
        worst = int(np.argmax(deviations))
        if deviations[worst] > 5:
            raise _Failed(
                f"sample and log_joint disagree: sample drew state {worst} for {observed[worst]:.3f} of "
                f"{states.size} samples, but the posterior from log_joint gives it {expected[worst]:.3f} "
                f"on average ({deviations[worst]:.1f} standard errors). Check that log_joint includes "
                "every term of log p(x, z), the log prior weight of each state included, and that "
                "sample draws the same model."
            )
        largest = max(largest, float(deviations[worst]))
    return (
        f"the states sample draws match the posterior from log_joint ({len(draws)} parameter sets, "
        f"{draws[0][1].shape[0]} draws each; largest deviation {largest:.1f} standard errors)."
    )


def _check_sample_recovery(ctx: _Context, draws: list[tuple[Params, Array, Any]]) -> str:
    programs = ctx.programs
    if ctx.model.log_joint is not None and ctx.model.posterior is not None:
        # A hard-EM model: check the generative model that log_joint describes, by soft EM.
        programs = _programs(LatentModel(**{**ctx.model._asdict(), "posterior": None}))
    largest, allowed = 0.0, 0.0
    for params, drawn, _ in draws:
        n = drawn.shape[0]
        weights = jnp.ones((n,), ctx.dtype)
        fitted, values = _em_steps(ctx, params, drawn, weights, programs)
        n_parameters = _n_free_parameters(ctx.model, params)
        # 2 n (gain) is asymptotically chi-square with p degrees of freedom (Wilks):
        # allow its mean plus six standard deviations.
        allowed = (n_parameters + 6 * math.sqrt(2 * n_parameters) + 10) / (2 * n)
        gain = float(values[-1] - values[0])
        if not np.isfinite(values).all():
            step = int(np.flatnonzero(~np.isfinite(values))[0])
            raise _Failed(
                f"on {n} samples drawn from the model, EM started at the parameters they were drawn "
                f"from reached a non-finite objective after {step} step(s); a correct model stays near "
                "its own parameters."
            )
        if gain > allowed:
            change, where = _max_relative_difference(fitted, params)
            raise _Failed(
                f"sample and log_joint disagree: on {n} samples drawn from some parameters, "
                f"{ctx.n_em_steps} EM steps started at those same parameters raised the mean "
                f"log-likelihood by {gain:.3g} (sampling noise allows about {allowed:.2g}) and moved "
                f"{where} by {change:.2g}. The data sample draws are not distributed as log_joint says."
            )
        largest = max(largest, gain)
    return (
        f"EM started at the true parameters on their own samples stays there ({len(draws)} parameter "
        f"sets): the mean log-likelihood rose by at most {largest:.2g} (sampling noise allows {allowed:.2g})."
    )


# ---------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------


def check_model(
    model: LatentModel,
    key: PRNGKey,
    x: Array,
    *,
    weights: Array | None = None,
    n_samples: int = 2000,
    n_em_steps: int = 20,
    raise_on_failure: bool = False,
) -> CheckReport:
    r"""Check a :class:`~latentem.LatentModel` for the usual mistakes, on your data.

    Runs the checks listed in the module docstring and reports each in plain words:

    ``functions``
      ``init``, ``log_joint`` / ``posterior``, ``m_step``, ``sample``,
      ``n_parameters``, ``log_prior`` and the unconstrained maps return the documented
      shapes, and floating arrays in the dtype of the data; the maps are inverses.
    ``traceable``
      one EM step compiles under ``jax.jit``; the E-step and M-step trace under
      ``jax.vmap`` over parameters.
    ``finite``
      the log-likelihood is finite on every weighted sample at ``init``'s parameters.
    ``uses_parameters``
      every parameter leaf enters ``log_joint`` (catches a forgotten ``log(weights)``).
    ``m_step_improves``
      on random posteriors :math:`R`, :math:`Q(\theta; R)` at ``m_step``'s output is no
      lower than at its input or at random nearby points, and its slope along the
      chords toward other valid parameters (``init``'s, four keys) is not positive,
      nor negative where Q is finite just behind the output (beyond the tolerance of
      ``m_step_stationary``). Parameter sets of mixtures are convex, so this needs no
      unconstrained coordinates; a model whose parameters do not form a convex set
      (orthonormal loadings, say) may fail it falsely.
    ``m_step_stationary``
      there, :math:`\nabla Q = 0` (autodiff, unconstrained coordinates), to ``1e-4``
      (float64) or ``1.2e-3`` (float32) of its size at a point 5% away; for models
      without ``log_joint``, the gradient of the log-likelihood vanishes at EM's fixed
      point (Fisher's identity).
    ``em_monotone``
      ``n_em_steps`` EM steps from ``init`` never lower the objective.
    ``fused_step``
      a model's optional fused EM iteration equals the one derived from ``log_joint``
      and ``m_step`` (parameters, objective, state mass; to ``1000 eps`` relative),
      over three steps from ``init``.
    ``weights``
      zero weight equals removal and integer weight repetition (one EM step), and
      ``init`` ignores samples of zero weight.
    ``sample_calibration``
      states drawn by ``sample`` occur as often as the posterior from ``log_joint``
      predicts on the drawn data (within 5 standard errors), and the model's
      ``check_data``, if any, accepts the drawn data.
    ``sample_recovery``
      EM started at the parameters, on ``n_samples`` of their own draws, gains no more
      log-likelihood than sampling noise allows (Wilks: about
      :math:`p / 2n` per sample), i.e. the fit recovers the parameters.

    The checks run on ``init``'s parameters; the sampling checks on eight random points
    around them (every unconstrained coordinate moved by a standard normal draw), so
    that mixture weights are unequal, which a forgotten ``log(weights)`` needs to show.
    Each numerical piece is compiled once per model and shape and reused by a later call
    on the same model. A check that cannot run (no ``sample``, no unconstrained maps,
    EM not yet at a fixed point) is reported as skipped, with the reason; ``passed``
    ignores skipped checks.

    Args:
      model: the model to check.
      key: a PRNG key; all randomness (init, random posteriors, draws) derives from it.
      x: representative data, shape ``(n_samples, n_features)``; a few hundred samples
        are enough.
      weights: optional sample weights of ``x``.
      n_samples: number of draws for the sampling checks.
      n_em_steps: EM steps for the monotonicity and recovery checks.
      raise_on_failure: raise a ``ValueError`` with the report when a check fails.

    Returns:
      A :class:`CheckReport`; ``report.passed``, ``report.failures``,
      ``report["weights"]``, ``print(report)``.

    Example:
      >>> import jax, latentem as lem
      >>> x = lem.datasets.load_faithful()
      >>> report = lem.check_model(lem.gaussian_mixture(2), jax.random.key(0), x)
      >>> report.passed, report["weights"].passed
      (True, True)
    """
    check_latent_model(model, "check_model")
    x = check_x(x)
    check_model_data(model, x)
    weights = check_weights(weights, x.shape[0], float_dtype(x))
    n_samples = check_positive_int(n_samples, "n_samples", minimum=10)
    n_em_steps = check_positive_int(n_em_steps, "n_em_steps")
    init_key, sample_key, numpy_key = jax.random.split(check_key(key), 3)
    rng = _numpy_rng(numpy_key)
    findings: list[CheckFinding] = []

    def run(name: str, check: Callable[[], Any]) -> Any:
        try:
            result = check()
        except _Failed as failure:
            findings.append(CheckFinding(name, False, str(failure)))
            return None
        except _Skipped as skipped:
            findings.append(CheckFinding(name, None, f"not checked: {skipped}"))
            return None
        except Exception as error:  # a crash inside the user's functions is itself a finding
            findings.append(CheckFinding(name, False, f"raised {type(error).__name__}: {error}"))
            return None
        findings.append(CheckFinding(name, True, result))
        return True

    programs = _programs(model)
    try:
        params = programs.init(init_key, x, weights)
    except Exception as error:
        findings.append(CheckFinding(FUNCTIONS, False, f"init raised {type(error).__name__}: {error}"))
        return _finish(findings, raise_on_failure)
    ctx = _Context(
        model, programs, x, weights, float_dtype(x), params, sample_key, rng, n_samples, n_em_steps
    )

    if run(FUNCTIONS, lambda: _check_functions(ctx)) is None:
        for name in CHECKS[1:]:
            findings.append(CheckFinding(name, None, "not checked: the functions check failed first."))
        return _finish(findings, raise_on_failure)
    run(TRACEABLE, lambda: _check_traceable(ctx))
    run(FINITE, lambda: _check_finite(ctx))
    run(USES_PARAMETERS, lambda: _check_uses_parameters(ctx))
    analyses: list[Any] = []
    run(M_STEP_IMPROVES, lambda: _check_m_step_improves(ctx, analyses))
    if model.log_joint is not None and len(analyses) < 2:
        findings.append(
            CheckFinding(M_STEP_STATIONARY, None, "not checked: m_step failed on random posteriors.")
        )
    else:
        run(M_STEP_STATIONARY, lambda: _check_m_step_stationary(ctx, analyses))
    run(EM_MONOTONE, lambda: _check_em_monotone(ctx))
    run(FUSED_STEP, lambda: _check_fused_step(ctx))
    run(WEIGHTS, lambda: _check_weights(ctx))
    if model.sample is None:
        for name in (SAMPLE_CALIBRATION, SAMPLE_RECOVERY):
            findings.append(CheckFinding(name, None, "not checked: the model has no sample function."))
        return _finish(findings, raise_on_failure)
    try:
        draws = []
        for index, truth in enumerate(_sampling_parameters(ctx)):
            drawn, states = programs.sample(jax.random.fold_in(sample_key, index), truth, n_samples)
            draws.append((truth, drawn, states))
    except Exception as error:
        for name in (SAMPLE_CALIBRATION, SAMPLE_RECOVERY):
            findings.append(CheckFinding(name, False, f"sample raised {type(error).__name__}: {error}"))
        return _finish(findings, raise_on_failure)
    run(SAMPLE_CALIBRATION, lambda: _check_sample_calibration(ctx, draws))
    run(SAMPLE_RECOVERY, lambda: _check_sample_recovery(ctx, draws))
    return _finish(findings, raise_on_failure)


def _sampling_parameters(ctx: _Context, n_points: int = 8) -> list[Params]:
    """Where the sampling checks draw from: init's parameters, moved at random.

    Not fitted parameters: at a fixed point of a wrong EM the mixture weights equal the
    mean posterior, which hides a forgotten log(weights). Moving every unconstrained
    coordinate by a standard normal draw makes the states' weights unequal, which such a
    mistake needs in order to show (with equal weights it only shifts log p(x) by a
    constant, and with well-separated states hardly moves EM). Each point shows it only
    with some probability, so there are eight: a Poisson mixture that forgets
    log(weights) was flagged by ``sample_recovery`` for 6 of 8 keys with three points,
    and for 15 of 16 with eight. Any valid parameters serve: a correct model agrees with
    its own samples everywhere.
    """
    if not _has_bijection(ctx.model):
        return [ctx.params]
    shapes = jax.eval_shape(ctx.model.to_unconstrained, ctx.params)
    points = []
    for _ in range(n_points):
        noise = jax.tree_util.tree_map(
            lambda leaf: jnp.asarray(ctx.rng.standard_normal(leaf.shape), leaf.dtype), shapes
        )
        moved = ctx.programs.moved(ctx.params, noise)
        points.append(moved if bool(tree_all_finite(moved)) else ctx.params)
    return points


def _finish(findings: list[CheckFinding], raise_on_failure: bool) -> CheckReport:
    report = CheckReport(tuple(findings))
    if raise_on_failure and not report.passed:
        raise ValueError(str(report))
    return report
