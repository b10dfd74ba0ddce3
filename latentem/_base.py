"""The model protocol, results, statuses and input checks shared by every module.

A latent variable model is a :class:`LatentModel`: a NamedTuple of pure functions.
Everything static (number of components, covariance type, options) lives in the
closure of the factory that built it; only arrays travel in the parameter pytree.
Each field is typed by a Protocol below that says exactly what it receives and
returns.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

# Shapes are documented in docstrings and names; these aliases say what travels.
Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays, e.g. GaussianMixtureParams
Posterior = Any  # a pytree of per-sample arrays, each with leading axis n_samples


# ---------------------------------------------------------------------------
# The functions a model is made of
# ---------------------------------------------------------------------------


class InitFn(Protocol):
    """Initial parameters from data.

    ``init(key, x, weights) -> params``. ``x`` is the data, shape
    ``(n_samples, ...)``; ``weights`` the non-negative sample weights, shape
    ``(n_samples,)`` (all ones when the user gave none). A sample with zero weight must
    not influence the result, as if it had been removed. Randomness comes only from
    ``key``. Must be traceable: no Python control flow on array values.
    """

    def __call__(self, key: PRNGKey, x: Array, weights: Array) -> Params: ...


class LogJointFn(Protocol):
    r"""Log joint density of each sample with each latent state.

    ``log_joint(params, x) -> (n_samples, n_states)`` with entry ``[n, k]`` equal to
    :math:`\log p(x_n, z_n = k \mid \theta)`. The engine derives everything else from
    it: responsibilities are its softmax over states, the per-sample log-likelihood its
    logsumexp, hard assignments its argmax. Entries may be ``-inf`` (a state switched
    off with weight zero) but not NaN.
    """

    def __call__(self, params: Params, x: Array) -> Array: ...


class MStepFn(Protocol):
    r"""The closed-form M-step.

    ``m_step(x, posterior, params) -> params`` returns the maximiser over
    :math:`\theta` of the expected complete-data log-likelihood

    .. math:: Q(\theta) = \sum_n w_n \, \mathbb{E}_{q(z_n)}[\log p(x_n, z_n \mid \theta)]
              \; (+ \log p(\theta) \text{ if the model has a prior}).

    **How sample weights arrive.** The engine multiplies every leaf of the posterior by
    the sample weights before calling ``m_step``; the model never sees the weights
    separately. For a finite-state model ``posterior`` is the ``(n_samples, n_states)``
    array of weighted responsibilities :math:`w_n r_{nk}`, whose row sums are the sample
    weights :math:`w_n`. So an M-step that forms its statistics as plain sums over the
    sample axis of posterior-weighted terms honours the weights automatically, and the
    only way to ignore them is to ignore the posterior (which ``check_model`` detects).
    ``params`` are the current parameters: use them for components that received no
    posterior mass, and for models whose M-step needs them.
    """

    def __call__(self, x: Array, posterior: Posterior, params: Params) -> Params: ...


class PosteriorFn(Protocol):
    r"""The E-step for models whose latent variable is not one of finitely many states.

    ``posterior(params, x) -> (posterior, log_likelihood)``: ``posterior`` is a pytree
    of per-sample expectations, each leaf with leading axis ``n_samples`` (for example
    :math:`\mathbb{E}[z_n]` and :math:`\mathbb{E}[z_n z_n^\top]` for probabilistic PCA);
    ``log_likelihood`` is :math:`\log p(x_n \mid \theta)`, shape ``(n_samples,)``.
    The engine scales every leaf by the sample weights along the first axis before the
    M-step, so each leaf must be an expectation that the M-step sums over samples;
    include a leaf of ones if the M-step needs the weights themselves. A model that has
    both ``log_joint`` and ``posterior`` (such as :func:`latentem.hard_em`) must return
    responsibilities-shaped posteriors, ``(n_samples, n_states)``.
    """

    def __call__(self, params: Params, x: Array) -> tuple[Posterior, Array]: ...


class SampleFn(Protocol):
    """The generative direction.

    ``sample(key, params, n_samples) -> (x, z)``: ``n_samples`` independent draws of
    the data ``x`` and of the latent variable ``z`` that generated each, in random
    order. ``n_samples`` is a Python int.
    """

    def __call__(self, key: PRNGKey, params: Params, n_samples: int) -> tuple[Array, Array]: ...


class NParametersFn(Protocol):
    """Number of free parameters, for BIC and AIC.

    ``n_parameters(params) -> int``, computed from the (static) shapes of one
    unbatched parameter pytree; for a mixture of ``k`` components the weights count
    ``k - 1`` because they sum to one.
    """

    def __call__(self, params: Params) -> int: ...


class LogPriorFn(Protocol):
    r"""Log prior density :math:`\log p(\theta)` up to a constant, a scalar.

    With a prior, EM maximises the posterior: the M-step must maximise
    :math:`Q(\theta) + \log p(\theta)`, and the objective the engine reports is
    :math:`(\sum_n w_n \log p(x_n \mid \theta) + \log p(\theta)) / \sum_n w_n`.
    """

    def __call__(self, params: Params) -> Array: ...


class ToUnconstrainedFn(Protocol):
    """Map parameters to a pytree of unconstrained real arrays (for gradient fitting)."""

    def __call__(self, params: Params) -> Any: ...


class FromUnconstrainedFn(Protocol):
    """Inverse of ``to_unconstrained``: any real point maps to valid parameters."""

    def __call__(self, unconstrained: Any) -> Params: ...


class FusedStepFn(Protocol):
    r"""One EM iteration as one computation, for models that have a faster way to do it.

    ``fused_step(params, x, weights) -> (new_params, log_likelihood, state_mass)`` or
    ``None``. It must equal what the engine would do with ``log_joint`` and
    ``m_step``: ``new_params = m_step(x, w * r, params)`` with ``r`` the softmax of the
    log joint; ``log_likelihood`` is :math:`\sum_{n: w_n > 0} w_n \log p(x_n)` (a
    scalar) and ``state_mass`` is :math:`\sum_n w_n r_{nk}`. Returning ``None`` (a
    decision on static shapes and dtypes, at trace time) declines: the engine then uses
    ``log_joint`` and ``m_step``. Used by :func:`latentem.fit_em` and everything built
    on it, not by ``e_step``, ``predict`` or the gradient path; ``check_model`` compares
    it with the unfused iteration. A model with a ``fused_prepare`` gets what it
    returned as a fourth argument, ``fused_step(params, x, weights, prepared)``, or
    ``None`` from :func:`latentem.em_step`, which runs one iteration and does not
    prepare: it must then compute the iteration without, or decline.
    """

    def __call__(self, params: Params, x: Array, weights: Array) -> tuple[Params, Array, Array] | None: ...


class FusedPrepareFn(Protocol):
    r"""The part of a ``fused_step`` that depends on the data alone, computed once per fit.

    ``fused_prepare(x, weights) -> prepared``, any pytree of arrays (or ``None``).
    Where a model has one, the engine evaluates it once, before the EM loop, and calls
    ``fused_step(params, x, weights, prepared)`` with a fourth argument at every
    iteration (``em_step``, a single iteration, passes ``None`` instead). XLA does not
    hoist such work out of a loop reliably: on a GPU it leaves in the loop any
    operation whose result is much larger than its operands (the Gaussian mixture's
    products of features, 17.5 times the data at 32 features: an iteration at (1e6,
    32, 64) took 7.7 ms with them formed in the loop, 5.0 ms without, on an H200). A
    model whose ``fused_step`` is replaced
    (``model._replace(fused_step=...)``) keeps its ``fused_prepare``: replace both, or
    set ``fused_prepare=None`` for a ``fused_step`` of three arguments.
    """

    def __call__(self, x: Array, weights: Array) -> Any: ...


class CheckDataFn(Protocol):
    """Refuse data the model cannot fit, before anything is compiled.

    ``check_data(x) -> None`` raises a ``ValueError`` that says what to change when the
    values of ``x`` lie outside the model's support (counts that are negative, binary
    data that are not 0 or 1, category codes out of range). The engine calls it on
    concrete data only, at the entry of :func:`latentem.fit`, :func:`latentem.fit_em`,
    :func:`latentem.em_step`, :func:`latentem.fit_gradient` and
    :func:`latentem.check_model`, whose programs are compiled, so that such data give
    an error rather than a fit that ends ``Status.NONFINITE``. Under ``jit`` or
    ``vmap`` it is not called (the data are not known) and the compiled fit reports the
    status instead, as :func:`latentem.fit_batch` does for every dataset of a batch.
    """

    def __call__(self, x: Array) -> None: ...


class LatentModel(NamedTuple):
    """A latent variable model as a tuple of pure functions.

    Build one with a factory such as :func:`latentem.gaussian_mixture`, or write the
    functions yourself. A model is static configuration: build it once and reuse it
    (factories are memoised, so the same arguments return the same model and compiled
    programs are reused); never pass it as a traced argument.

    Attributes:
      init: :class:`InitFn`, initial parameters from data.
      log_joint: :class:`LogJointFn`, ``log p(x_n, z_n = k)``; ``None`` for models that
        supply ``posterior`` instead.
      m_step: :class:`MStepFn`, the closed-form M-step (receives weighted posteriors).
      sample: :class:`SampleFn`, draws ``(x, z)``; optional.
      n_parameters: :class:`NParametersFn`, free-parameter count for BIC/AIC; optional.
      posterior: :class:`PosteriorFn`, replaces the enumerated E-step for continuous or
        structured latent variables; optional.
      log_prior: :class:`LogPriorFn`, turns EM into MAP-EM; optional.
      to_unconstrained: :class:`ToUnconstrainedFn`, for ``fit_gradient``; optional.
      from_unconstrained: :class:`FromUnconstrainedFn`, for ``fit_gradient``; optional.
      fused_step: :class:`FusedStepFn`, a faster EM iteration equal to the one the
        engine derives (the Gaussian mixture's GPU kernel for batches of small fits);
        optional.
      fused_prepare: :class:`FusedPrepareFn`, the data-only part of ``fused_step``,
        evaluated once per fit; optional (needs ``fused_step``).
      check_data: :class:`CheckDataFn`, refuses data outside the model's support
        with a ``ValueError`` before a fit is compiled; optional.

    Example:
      A mixture of Poisson distributions (count data, one rate per component and
      feature) in a few lines::

        >>> from typing import NamedTuple
        >>> import jax, jax.numpy as jnp
        >>> from jax.scipy.special import gammaln
        >>> class PoissonParams(NamedTuple):
        ...     weights: jax.Array  # (k,)
        ...     rates: jax.Array  # (k, d)
        >>> def log_joint(params, x):
        ...     log_p = x @ jnp.log(params.rates).T - params.rates.sum(1)[None, :]
        ...     return log_p - gammaln(x + 1).sum(1)[:, None] + jnp.log(params.weights)[None]
        >>> params = PoissonParams(jnp.array([0.5, 0.5]), jnp.array([[1.0], [5.0]]))
        >>> log_joint(params, jnp.array([[0.0], [4.0]])).shape
        (2, 2)

      See the README for the full example with ``init`` and ``m_step``.
    """

    init: InitFn
    log_joint: LogJointFn | None
    m_step: MStepFn
    sample: SampleFn | None = None
    n_parameters: NParametersFn | None = None
    posterior: PosteriorFn | None = None
    log_prior: LogPriorFn | None = None
    to_unconstrained: ToUnconstrainedFn | None = None
    from_unconstrained: FromUnconstrainedFn | None = None
    fused_step: FusedStepFn | None = None
    fused_prepare: FusedPrepareFn | None = None
    check_data: CheckDataFn | None = None


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class Status(enum.IntEnum):
    """Why a fit stopped. Stored as an int32 array in results, so it survives ``vmap``.

    Attributes:
      CONVERGED: the objective changed by less than ``tol`` in the last iteration, or
        a classification-EM fit (:func:`~latentem.hard_em`, :func:`~latentem.kmeans`)
        reached its fixed point (no sample changed state).
      MAX_ITER: ``max_iter`` iterations ran without meeting ``tol``.
      NONFINITE: the objective or the parameters became NaN or infinite (NaN or inf in
        the data, a singular covariance with ``reg_covar=0``, a broken M-step). The loop
        stopped and the last parameters with a finite objective were returned; such a
        fit never reads as converged.
      EMPTY_COMPONENT: the fit ended with at least one latent state holding
        (numerically) no posterior mass: more components than the data supports, or
        duplicated data. Parameters are finite; ``converged`` still says whether the
        tolerance was met.

    Inside compiled code the library writes ``int(Status.X)``: a plain Python int is
    weakly typed and keeps status arithmetic in int32, whereas older JAX versions
    (0.4.30) treat an ``IntEnum`` as int64 under ``JAX_ENABLE_X64`` and then reject the
    mix under strict dtype promotion.
    """

    CONVERGED = 0
    MAX_ITER = 1
    NONFINITE = 2
    EMPTY_COMPONENT = 3


class EMResult(NamedTuple):
    """What :func:`fit_em` and :func:`fit` return (a pytree; batched under ``vmap``).

    Attributes:
      params: the fitted parameters (the last ones with a finite objective).
      log_likelihood: the objective at ``params``: the mean log-likelihood per unit of
        sample weight, as scikit-learn's ``score``; for a model with ``log_prior``,
        plus ``log_prior(params) / sum(weights)``.
      n_iter: the number of EM iterations run (M-steps attempted).
      converged: whether the change in the objective fell below ``tol``.
      status: a :class:`Status` value, int32.
      history: shape ``(max_iter,)``; entry ``i`` is the objective after iteration
        ``i + 1``; NaN past ``n_iter``.
    """

    params: Params
    log_likelihood: Array
    n_iter: Array
    converged: Array
    status: Array
    history: Array


# ---------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------

# Two of XLA's CPU defaults cost latentem's programs, which are chains of small
# elementwise products reduced over the samples:
# - reductions go to YNNPACK "library fusions", which materialise every operand of a
#   reduction before reducing it, where XLA's own loop emitter fuses the products in;
# - the tree-reduction rewrite turns each reduction over more than 32 samples into a
#   windowed partial reduction plus a second reduction; XLA's CPU reduction loops are
#   already accurate (float32 sums of 1e6 terms agree to 4e-8 relative with and
#   without it) and the windowed form is slow.
# On a 2-core CPU (jax 0.10.2) an EM iteration of 1000 vmapped (500, 2, 3) fits took
# 7.1 ms with the defaults, 5.2 ms without YNNPACK fusions and 3.5 ms without either.
# Both are CPU passes: on other backends the options are left out (a GPU needs the tree
# rewrite for parallel reductions).
_TUNED_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_disable_hlo_passes": "tree_reduction_rewriter",
}


# Small single fits the other way round: XLA's compile is most of their first call,
# and LLVM's second optimisation level (XLA's default) adds 0.1 to 0.3 s to the compile
# of a Gaussian mixture fit on a 2-core CPU, for run times that moved by -19% to +17%
# across (1e3 to 6e4 samples, 2 to 16 features); below the size where the tuned options
# pay off, a fit runs for less than that saving. Not for batches: the optimisation
# level changes where XLA contracts multiply-adds into FMAs, so a batch and the same
# batch without some members, two programs, could differ in the last bit
# (tests/test_batch.py::test_degenerate_members_leave_the_others_bitwise_equal).
_QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1}

# Tiny fits (see tiny_problem) go one step further, to LLVM's level 0 (no
# vectorisation): XLA's compile of a first Gaussian mixture fit of (1000, 8) data went
# from 1.03-1.34 s to 0.72-0.76 s in alternating fresh processes on a 2-core CPU, and
# the fit then ran in 25-37 ms instead of 9-11 ms (k = 8, 38 iterations; 2.6 to 4.2x
# slower across tiny shapes). That is tens of milliseconds per call: less than the
# compile saves unless the same program is called a dozen times, when the compile is
# amortised anyway.
_QUICKEST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}

# Both tiers also take XLA's older loop emitters instead of its MLIR fusion emitters,
# which cost most of a small program's compile on a CPU: XLA's compile of a first
# Gaussian mixture fit of (1000, 8) data went from 1.33-1.90 s to 0.48-0.66 s on a
# 2-core AMD EPYC without AVX-512 (the first call from 2.0-2.5 s to 1.4-1.7 s), for a
# fit that then ran 50 iterations in 55-78 ms instead of 43-65 ms; at (20000, 8, 8) the
# compile went from 4.1-4.3 s to 3.5-3.9 s, the run time within the noise. Large fits
# keep the fusion emitters: (1e5, 8, 8) 12.9-13.3 against 10.0-12.4 ms per iteration.
# XLA versions before the option reject it (a probe compile tells).
_LOOP_EMITTER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _quick_options(level_options: dict[str, Any]) -> dict[str, Any]:
    """A quick tier's options: its optimisation level (an XLA option as old as
    ``compiler_options``: no probe compile), and the loop emitters where XLA has them."""
    return {
        **_cpu_options(level_options, probe=False),
        **_cpu_options(_LOOP_EMITTER_OPTIONS),
    }


@functools.cache
def _jit_takes_compiler_options() -> bool:
    return "compiler_options" in inspect.signature(jax.jit).parameters  # not in older JAX


@functools.cache
def _options_supported(options: tuple[tuple[str, Any], ...]) -> bool:
    # Older XLA does not know every option (and has no YNNPACK fusions to turn off); a
    # probe compile tells.
    if not _jit_takes_compiler_options():
        return False
    try:
        jax.jit(lambda a: a + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception:  # an XLA that rejects an option: compile with its defaults
        return False
    return True


def _cpu_options(options: dict[str, Any], probe: bool = True) -> dict[str, Any]:
    """``options`` on a CPU backend whose XLA accepts them (``probe=False``: any XLA
    that takes compiler options does), else none."""
    if jax.default_backend() != "cpu":
        return {}
    supported = _options_supported(tuple(sorted(options.items()))) if probe else _jit_takes_compiler_options()
    return dict(options) if supported else {}


def compiler_options() -> dict[str, str]:
    """The XLA compiler options latentem compiles its own programs with.

    ``lem.fit``, ``lem.fit_batch``, ``lem.select_n_components`` and the estimator use
    them already for large problems. Pass them to your own ``jax.jit`` of latentem
    functions (or use :func:`jit`): ``jax.jit(f, compiler_options=lem.compiler_options())``.
    They only change how XLA compiles for a CPU; empty on other backends and when the
    installed JAX does not support them.

    Example:
      >>> import latentem as lem
      >>> isinstance(lem.compiler_options(), dict)
      True
    """
    return _cpu_options(_TUNED_OPTIONS)


def jit(
    fun: Callable,
    *,
    tune_if: Callable[..., bool] | None = None,
    quick_compile: bool = False,
    tiny_if: Callable[..., bool] | None = None,
    **jit_kwargs: Any,
) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` with :func:`compiler_options`.

    The options are looked up on the first use, so decorating at import time does not
    start JAX's backends. The result behaves as the jitted function (``.lower``,
    ``.trace``, ...). ``tune_if(*args, **kwargs)``, if given, decides per call whether
    to compile with the options (they make XLA's compile slower, by about 0.15 s for a
    Gaussian mixture fit on a 2-core CPU, which only pays off on large problems). When
    it says no and ``quick_compile`` is set, a CPU program is compiled for a short
    compile instead (LLVM's first optimisation level rather than its second; ``lem.fit``
    and the estimator do this for small fits), and when ``tiny_if(*args, **kwargs)``
    also says yes, for the shortest (LLVM's level 0, for problems that run in
    milliseconds; ``lem.fit`` and the estimator below 2^15 data values x restarts).
    Called inside another transformation
    (your own ``jax.jit``, ``vmap``, ...), it is a plain nested ``jax.jit``: XLA takes
    compiler options only for the outermost program.

    Example:
      >>> import functools, jax, jax.numpy as jnp, latentem as lem
      >>> model = lem.gaussian_mixture(2)
      >>> x = jnp.array([[0.0], [0.1], [5.0], [5.2]])
      >>> params = model.init(jax.random.key(0), x, jnp.ones(4))
      >>> fit = lem.jit(functools.partial(lem.fit_em, model, tol=0.0, max_iter=5))
      >>> int(fit(params, x).n_iter)
      5
    """
    return _LazyJit(fun, jit_kwargs, tune_if, quick_compile, tiny_if)


class _LazyJit:
    """``jax.jit``-ed variants of a function, created on first use (see :func:`jit`)."""

    def __init__(
        self,
        fun: Callable,
        jit_kwargs: dict[str, Any],
        tune_if: Callable[..., bool] | None,
        quick_compile: bool,
        tiny_if: Callable[..., bool] | None = None,
    ):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._tune_if = fun, jit_kwargs, tune_if
        self._quick_compile, self._tiny_if = quick_compile, tiny_if
        self._variants: dict[str, Callable] = {}

    def _variant(self, tier: str) -> Callable:
        """The jitted function compiled with the options of ``tier``: ``"tuned"``
        (:func:`compiler_options`), ``"quick"`` or ``"quickest"`` (shorter compiles for
        small and tiny problems) or ``"plain"`` (none)."""
        if tier not in self._variants:
            options = {
                "tuned": compiler_options,
                "quick": lambda: _quick_options(_QUICK_COMPILE_OPTIONS),
                "quickest": lambda: _quick_options(_QUICKEST_COMPILE_OPTIONS),
                "plain": dict,
            }[tier]()
            extra = {"compiler_options": options} if options else {}
            self._variants[tier] = jax.jit(self._fun, **self._jit_kwargs, **extra)
        return self._variants[tier]

    def _tier(self, args: tuple, kwargs: dict) -> str:
        if _inside_a_trace(args, kwargs):
            # Called from inside a user's jit (or vmap, grad, ...): this is a nested
            # jit, which takes no compiler options (the outer program's apply).
            return "plain"
        if self._tune_if is None or self._tune_if(*args, **kwargs):
            return "tuned"
        if not self._quick_compile:
            return "plain"
        return "quickest" if self._tiny_if is not None and self._tiny_if(*args, **kwargs) else "quick"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._variant(self._tier(args, kwargs))(*args, **kwargs)

    def _cache_size(self) -> int:
        """Compiled programs held, over all variants."""
        return sum(variant._cache_size() for variant in self._variants.values())

    def __getattr__(self, name: str) -> Any:  # lower, trace, ... of the tuned variant
        if name.startswith("_"):  # own attributes not set yet (copy, pickle), dunders
            raise AttributeError(name)
        return getattr(self._variant("tuned"), name)


def _inside_a_trace(args: tuple, kwargs: dict) -> bool:
    """Whether a call runs inside a JAX transformation (jit, vmap, grad, ...)."""
    try:  # JAX's own answer (private, present from jax 0.4.30 to 0.12)
        from jax._src.core import trace_state_clean
    except ImportError:  # else: a traced argument (misses closed-over concrete data)
        return not is_concrete(args, kwargs)
    return not trace_state_clean()


# Below this many data values times restarts the extra compile time of the tuned
# options outweighs what they save over a fit ((1e5, 8) data is above, (1000, 8) below).
_TUNE_MIN_VALUES = 1 << 19


def large_problem(x: Array, n_fits: int = 1) -> bool:
    """Whether fitting ``x`` (``n_fits`` times) is large enough for
    :func:`compiler_options` to pay off."""
    return int(np.prod(x.shape)) * n_fits >= _TUNE_MIN_VALUES


# Below this many data values times restarts a fit runs in tens of milliseconds even
# without vectorised code ((1000, 8) data, four restarts), and the shortest compile
# (_QUICKEST_COMPILE_OPTIONS) makes its first call about 0.3 s shorter.
_TINY_MAX_VALUES = 1 << 15


def tiny_problem(x: Array, n_fits: int = 1) -> bool:
    """Whether fitting ``x`` (``n_fits`` times) is small enough for the shortest compile."""
    return int(np.prod(x.shape)) * n_fits < _TINY_MAX_VALUES


# ---------------------------------------------------------------------------
# Input checks. Shape checks are static and run under jit; value checks run only on
# concrete (eager) arrays, since traced values cannot be inspected.
# ---------------------------------------------------------------------------


def is_concrete(*arrays: Any) -> bool:
    """True when no argument is a tracer, so values can be checked on the host."""
    leaves = jax.tree_util.tree_leaves(arrays)
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def check_latent_model(model: Any, caller: str) -> LatentModel:
    """Raise a ``ValueError`` unless ``model`` is a :class:`LatentModel`."""
    if not isinstance(model, LatentModel):
        raise ValueError(
            f"{caller} needs a LatentModel, e.g. lem.gaussian_mixture(3); got {type(model).__name__}."
        )
    return model


def check_model_data(model: LatentModel, x: Array) -> None:
    """The model's own ``check_data`` on ``x``, when it has one and ``x`` is concrete."""
    if model.check_data is not None and is_concrete(x):
        model.check_data(x)


def checked_log_joint(log_joint_fn: LogJointFn, params: Params, x: Array) -> Array:
    """``log_joint_fn(params, x)``, or a ``ValueError`` when its shape is not
    ``(n_samples, n_states)``. Shapes are static, so a wrong one is refused while tracing,
    instead of broadcasting against the sample weights into wrong numbers."""
    log_joint = log_joint_fn(params, x)
    shape = jnp.shape(log_joint)
    if len(shape) != 2 or shape[0] != x.shape[0]:
        raise ValueError(
            f"log_joint must return shape (n_samples, n_states) = ({x.shape[0]}, n_states); got {shape}"
            + (" (transpose a log joint computed states-first)." if shape[-1:] == (x.shape[0],) else ".")
        )
    return log_joint


def checked_posterior(model: LatentModel, params: Params, x: Array) -> tuple[Any, Array]:
    """``model.posterior(params, x)``, or a ``ValueError`` when the log-likelihood it
    returns is not one value per sample, shape ``(n_samples,)``: an ``(n, 1)`` column
    broadcast against the weights into an ``(n, n)`` objective, n times too large."""
    posterior, log_likelihood = model.posterior(params, x)
    if jnp.shape(log_likelihood) != (x.shape[0],):
        raise ValueError(
            "posterior must return (posterior, log_likelihood) with log_likelihood of shape "
            f"(n_samples,) = ({x.shape[0]},), log p(x_n) of each sample; got {jnp.shape(log_likelihood)}."
        )
    return posterior, log_likelihood


def float_dtype(x: Array) -> np.dtype:
    """The floating dtype that computations on ``x`` use: its own if float32 or float64
    (float64 only when JAX has x64 enabled), float32 for half precision (float16,
    bfloat16), else JAX's default float.

    Half precision is too coarse for EM: a log-likelihood summed over 20000 samples
    overflowed float16 (the fit ended ``NONFINITE``), and bfloat16 keeps about three
    significant digits of a mean.
    """
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float64
    elif jnp.finfo(dtype).bits < 32:
        dtype = jnp.float32
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def as_computed(x: Array) -> Array:
    """Half-precision ``x`` in float32, the dtype computations on it use (see
    ``float_dtype``), so that no epsilon or sum anywhere is taken in half precision;
    other data unchanged (each model casts integers itself)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def check_real(x: Any, name: str) -> Any:
    """``x`` as an array (NumPy or JAX) of real numbers or booleans, or a ``ValueError``.

    Complex values are refused rather than cast: the cast would drop the imaginary
    parts without a word.
    """
    if not isinstance(x, (jax.Array, np.ndarray)):
        try:
            x = np.asarray(x)
        except Exception as error:
            raise ValueError(f"{name} must be an array of numbers; got {type(x).__name__}.") from error
    if x.dtype == object or not (jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)):
        raise ValueError(f"{name} must hold numbers; got dtype {x.dtype}.")
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(
            f"{name} must hold real numbers; got dtype {x.dtype}. Pass the real part "
            f"({name}.real), or the real and imaginary parts as separate features."
        )
    return x


def check_not_a_key(params: Any, caller: str) -> None:
    """Raise a ``ValueError`` when ``params`` is a PRNG key, the argument ``lem.fit``
    takes in the same place, so that the mix-up is named rather than failing deep inside
    the model with an ``AttributeError``."""
    if _is_a_key(params):
        raise ValueError(
            f"{caller} starts from parameters, but params is a PRNG key. Pass model.init(key, x, "
            "weights), or call lem.fit(model, key, x), which starts from a key."
        )


def _is_a_key(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # jax.random.key
        return True
    return dtype == np.uint32 and np.shape(value) == (2,)  # jax.random.PRNGKey


def check_param_fields(params: Any, fields: tuple[str, ...], model: str) -> None:
    """Raise a ``ValueError`` unless ``params`` has every one of ``fields``: a model's
    checks read its sizes from them (``check_param_shapes``), and a missing one would
    fail as an ``AttributeError`` that does not say what to pass."""
    missing = [name for name in fields if not hasattr(params, name)]
    if not missing:
        return
    key = _is_a_key(params)
    got = "a PRNG key" if key else f"a {type(params).__name__}"
    lacking = "" if len(missing) == len(fields) else f" without {', '.join(missing)}"
    hint = "; lem.fit(model, key, x) is the function that starts from a key" if key else ""
    raise ValueError(
        f"params must be parameters of {model}, with fields {', '.join(fields)}; got {got}{lacking}. "
        f"Pass parameters of this model (from its init or a fit with it){hint}."
    )


def check_param_shapes(params: Any, expected: dict[str, tuple[int, ...]], model: str) -> None:
    """Raise a ``ValueError`` unless each field ``params.<name>`` has the shape
    ``expected[name]``.

    A model's functions rely on its own sizes (the number of components in sampling and
    in the log-likelihood's constants, the covariance type in the covariances' layout):
    parameters of another model would fit, score or sample a different one, or fail
    deep inside with a broadcasting error. ``model`` names the model for the message,
    e.g. ``"kmeans(3) with 2 features"``.
    """
    for name, shape in expected.items():
        actual = tuple(np.shape(getattr(params, name)))
        if actual != tuple(shape):
            raise ValueError(
                f"params.{name} has shape {actual}, but {model} needs {tuple(shape)}; "
                "pass parameters of this model (from its init or a fit with it)."
            )


def check_x(x: Any, *, name: str = "x") -> Array:
    """Return ``x`` as a 2-D JAX array, or raise a ``ValueError`` that says what to do."""
    x = check_real(x, name)
    if x.ndim == 1:
        raise ValueError(
            f"{name} must be 2-D with shape (n_samples, n_features); got shape {x.shape}. "
            f"For a single feature use {name}.reshape(-1, 1); for a single sample "
            f"{name}.reshape(1, -1)."
        )
    if x.ndim != 2:
        # The hint is for the data a fit takes; validation data follow that data's shape.
        hint = " To fit a batch of datasets use fit_batch (or jax.vmap over fit)." if name == "x" else ""
        raise ValueError(f"{name} must be 2-D with shape (n_samples, n_features); got shape {x.shape}.{hint}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one sample and one feature; got shape {x.shape}.")
    if isinstance(x, np.ndarray):
        # Host data are checked on the host: no small program to compile (the first
        # fit of a session pays for every eager JAX operation it runs).
        finite_rows = np.isfinite(x).all(axis=1) if np.issubdtype(x.dtype, np.inexact) else None
        all_finite = finite_rows is None or bool(finite_rows.all())
        if all_finite:
            _check_representable(x, name)
        x = _transfer(x, jnp)
    else:
        x = jnp.asarray(x)
        # One scalar crosses to the host in the common case; the rows only on failure.
        # A concrete x can still be captured inside a traced function, where the check
        # itself is traced: then it is skipped (the compiled fit reports Status.NONFINITE).
        all_finite = (
            jnp.isfinite(x).all() if is_concrete(x) and jnp.issubdtype(x.dtype, jnp.inexact) else True
        )
        if not is_concrete(all_finite):
            all_finite = True
        finite_rows = None
    if not bool(all_finite):
        if finite_rows is None:
            finite_rows = np.asarray(jnp.isfinite(x).all(axis=1))
        rows = np.flatnonzero(~finite_rows)
        shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if rows.size > 10 else "")
        raise ValueError(
            f"{name} has NaN or infinite values in {rows.size} row(s): {shown}. Remove or impute those rows."
        )
    return as_computed(x)


def check_weights(
    weights: Any, n_samples: int, dtype: Any, *, xp: Any = jnp, name: str = "weights", data_name: str = "x"
) -> Array:
    """Return sample weights as an array of shape ``(n_samples,)``; ones when ``None``.

    ``xp=np`` returns a NumPy array (for concrete weights), which avoids one small
    compiled conversion per distinct ``n_samples`` when many datasets are checked.
    ``name`` and ``data_name`` name the weights and their data in errors.
    """
    if weights is None:
        # Built on the host and transferred: jnp.ones would compile a program.
        return _transfer(np.ones((n_samples,), dtype), xp)
    weights = check_real(weights, name)  # NumPy weights are checked and converted on the host
    if weights.ndim != 1 or weights.shape[0] != n_samples:
        raise ValueError(
            f"{name} must have shape (n_samples,) = ({n_samples},), one per row of {data_name}; "
            f"got shape {weights.shape}."
        )
    weights = weights.astype(dtype)
    if is_concrete(weights):
        values = np.asarray(weights)
        if not np.isfinite(values).all():
            raise ValueError(f"{name} must be finite; some are NaN or infinite.")
        if (values < 0).any():
            rows = np.flatnonzero(values < 0)[:10].tolist()
            raise ValueError(f"{name} must be non-negative; negative at rows {rows}.")
        if not values.sum() > 0:
            raise ValueError(f"{name} are all zero; at least one sample needs positive weight.")
    return _transfer(weights, xp)


def _check_representable(x: np.ndarray, name: str) -> None:
    """A ``ValueError`` for float64 host data beyond float32's range when JAX runs in
    32-bit mode: the transfer would turn them into infinities, and the fit would end
    ``NONFINITE`` on data that had none."""
    target = np.dtype(jax.dtypes.canonicalize_dtype(x.dtype))
    if not np.issubdtype(x.dtype, np.floating) or np.finfo(target).max >= np.finfo(x.dtype).max:
        return
    limit = np.finfo(target).max
    if x.max() <= limit and x.min() >= -limit:  # two passes without a temporary array
        return
    rows = np.flatnonzero((np.abs(x) > limit).any(axis=1))
    shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if rows.size > 10 else "")
    raise ValueError(
        f"{name} has values beyond {target}'s range (magnitudes up to {limit:.4g}) in {rows.size} row(s): "
        f"{shown}; JAX computes in {target}. Rescale the data, or enable float64 "
        "(JAX_ENABLE_X64=1, or jax.config.update('jax_enable_x64', True) before any JAX work)."
    )


def _transfer(values: Any, xp: Any) -> Any:
    """``xp.asarray(values)``; NumPy values go to the device with ``jax.device_put``,
    which (unlike ``jnp.asarray``, in jax 0.10) compiles no small program per shape."""
    if xp is jnp and isinstance(values, np.ndarray):
        return jax.device_put(values)
    return xp.asarray(values)


def check_key(key: Any, *, name: str = "key") -> Array:
    """Return ``key`` if it is one PRNG key: a typed key of shape ``()``
    (``jax.random.key(seed)``) or a raw ``uint32`` one (``jax.random.PRNGKey(seed)``:
    2 words, 4 with the "rbg" implementations), concrete or traced; else raise a
    ``ValueError`` that says what to pass."""
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.ndim == 0:
                return key
        elif key.dtype == np.uint32 and key.shape in ((2,), (4,)):
            return key
        got = f"an array of shape {key.shape} and dtype {key.dtype}"
    else:
        got = f"{key!r} ({type(key).__name__})"
    raise ValueError(
        f"{name} must be one PRNG key, e.g. jax.random.key(0) (for a seed s, jax.random.key(s)); "
        f"got {got}. For one key per dataset use lem.fit_batch or jax.vmap."
    )


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int ``>= minimum`` or raise a ``ValueError`` naming it."""
    if isinstance(value, jax.core.Tracer):
        # Sizes (iterations, restarts, samples) shape the compiled program.
        raise ValueError(
            f"{name} must be a Python int, known when the program is compiled; got a traced value. "
            f"Pass it as a static argument (jax.jit(..., static_argnames=...)) or close over it."
        )
    if isinstance(value, jax.Array) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        value = int(value)  # a concrete JAX integer, e.g. from jnp.arange
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")
    return int(value)


def check_nonnegative(value: Any, name: str) -> Any:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a scalar, and, when it is
    concrete, a non-negative one (not NaN)."""
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got an array of shape {np.shape(value)}.")
    if is_concrete(value):
        scalar = float(np.asarray(value))
        if not scalar >= 0:
            raise ValueError(f"{name} must be non-negative; got {scalar}.")
    return value


def check_callback(callback: Any) -> Any:
    """Raise a ``ValueError`` unless ``callback`` is ``None`` or callable."""
    if callback is not None and not callable(callback):
        raise ValueError(
            f"callback must be a function callback(iteration, objective) or None; got {callback!r}."
        )
    return callback


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Raise a ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}.")
    return value


def tree_all_finite(tree: Any) -> Array:
    """A traced boolean: every floating leaf of ``tree`` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# Not public in jax.lax in older JAX (0.4.30 lacks it): there programs run without the
# barriers (slower, same results).
_optimization_barrier = getattr(jax.lax, "optimization_barrier", None)


def optimization_barrier(value: Any) -> Any:
    """``jax.lax.optimization_barrier(value)`` where JAX has it, else ``value``: XLA
    neither moves computations across it nor fuses through it."""
    return value if _optimization_barrier is None else _optimization_barrier(value)


def tree_select(pred: Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``where(pred, on_true, on_false)`` for a scalar predicate."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


Callback = Callable[[Array, Array], None]
