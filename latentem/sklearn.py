"""A scikit-learn estimator over latentem's Gaussian mixture.

``latentem.sklearn.GaussianMixture`` has scikit-learn's constructor, methods and
fitted attributes, so it drops into pipelines, grid searches and existing code; the
fitting runs on latentem's compiled EM engine (:func:`latentem.fit_em`), with the
restarts batched by ``jax.vmap``. This module imports scikit-learn, which stays an
optional dependency: ``import latentem`` does not import this module.

The estimator adds no numerics of its own: initialisation, EM, prediction, scores,
sampling and information criteria all come from latentem's functional API.
"""

from __future__ import annotations

import functools
import numbers
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

import latentem as lem
from latentem._base import (
    Array,
    LatentModel,
    Status,
    check_choice,
    check_positive_int,
    check_weights,
    large_problem,
    tiny_problem,
    tree_all_finite,
    tree_select,
)
from latentem.models.gaussian_mixture import COVARIANCE_TYPES, GaussianMixtureParams, precision_cholesky

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(estimator: Any, x: Any, **options: Any) -> Any:
        return estimator._validate_data(x, **options)


__all__ = ["GaussianMixture"]

# scikit-learn's init_params -> the factory's init. scikit-learn's "kmeans" runs full
# k-means; latentem seeds by k-means++ and takes one nearest-centre assignment.
_INIT_PARAMS = {
    "kmeans": "kmeans++",
    "k-means++": "kmeans++",
    "random": "random",
    "random_from_data": "random_from_data",
}


# ---------------------------------------------------------------------------
# The compiled fit: scikit-learn's loop on latentem's engine
# ---------------------------------------------------------------------------


class _Restarts(NamedTuple):
    """One entry per restart (leading axis), in scikit-learn's terms after mapping."""

    params: GaussianMixtureParams  # after the final M-step
    initial_objective: Array  # the objective at the initial params
    objective: Array  # the objective before the final M-step: scikit-learn's lower_bound_
    n_iter: Array  # the engine's iterations (scikit-learn's n_iter_ is one more)
    converged: Array
    status: Array
    history: Array


def _override(params: GaussianMixtureParams, overrides: tuple[Any, Any, Any]) -> GaussianMixtureParams:
    """Replace the initial weights, means or covariances the user gave."""
    return GaussianMixtureParams(
        *(given if given is not None else value for value, given in zip(params, overrides, strict=True))
    )


@functools.partial(
    lem.jit,
    static_argnames=("model", "max_iter", "callback"),
    tune_if=lambda model, keys, x, *args, **kwargs: large_problem(x, keys.shape[0]),
    quick_compile=True,
    tiny_if=lambda model, keys, x, *args, **kwargs: tiny_problem(x, keys.shape[0]),
)
def _fit_restarts(
    model: LatentModel,
    keys: Array,
    x: Array,
    weights: Array,
    tol: Array,
    overrides: tuple[Any, Any, Any],
    start: GaussianMixtureParams | None,
    *,
    max_iter: int,
    callback: Any,
) -> _Restarts:
    """Every restart of scikit-learn's EM loop, batched over ``keys`` (or ``start``).

    scikit-learn evaluates the objective in the E-step *before* each M-step and stops
    when it changed by less than ``tol``, so it ends one M-step after the point where
    latentem's :func:`~latentem.fit_em` (which evaluates after each M-step) stops.
    Running ``fit_em`` for ``max_iter - 1`` iterations and then one :func:`~latentem.em_step`
    therefore reproduces scikit-learn's iterates, stopping rule and ``max_iter`` exactly.
    """

    def one(key: Array, start_params: GaussianMixtureParams | None) -> _Restarts:
        params = model.init(key, x, weights) if start_params is None else start_params
        params = _override(params, overrides)
        initial = lem.score(model, params, x, weights)
        if max_iter == 0:
            return _Restarts(
                params=params,
                initial_objective=initial,
                objective=jnp.full_like(initial, -jnp.inf),
                n_iter=jnp.zeros((), jnp.int32),
                converged=jnp.zeros((), bool),
                status=jnp.asarray(Status.MAX_ITER, jnp.int32),
                history=jnp.zeros((0,), initial.dtype),
            )
        result = lem.fit_em(
            model, params, x, weights=weights, max_iter=max_iter - 1, tol=tol, callback=callback
        )
        stepped, _ = lem.em_step(model, result.params, x, weights)
        usable = (result.status != int(Status.NONFINITE)) & tree_all_finite(stepped)
        return _Restarts(
            params=tree_select(usable, stepped, result.params),
            initial_objective=initial,
            objective=result.log_likelihood,
            n_iter=result.n_iter,
            converged=result.converged & usable,
            status=jnp.where(usable, result.status, int(Status.NONFINITE)).astype(jnp.int32),
            history=result.history,
        )

    if start is None:
        return jax.vmap(lambda key: one(key, None))(keys)
    return jax.vmap(one)(keys, start)


def _finite_array(values: Any, name: str) -> np.ndarray:
    """``values`` as a float64 array, or a ``ValueError`` if it has NaN or infinite entries."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers; got {values!r}.") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite entries; give finite values.")
    return array


def _padded_size(n_samples: int) -> int:
    """Round a sample count up to one of four sizes per octave (at most 25% more), min 32.

    Padding rows carry zero weight, which the engine treats as absent, so fits and
    predictions on data of nearby sizes (cross-validation folds, grid searches) share
    one compiled program.
    """
    if n_samples <= 32:
        return 32
    step = 1 << (n_samples.bit_length() - 3)
    return -(-n_samples // step) * step


def _pad(x: np.ndarray, weights: np.ndarray) -> tuple[Array, Array]:
    """Append copies of the first row with zero weight, up to :func:`_padded_size`."""
    extra = _padded_size(x.shape[0]) - x.shape[0]
    if extra:
        x = np.concatenate([x, np.repeat(x[:1], extra, axis=0)])
        weights = np.concatenate([weights, np.zeros((extra,), weights.dtype)])
    return jnp.asarray(x), jnp.asarray(weights)


class _Evaluation(NamedTuple):
    labels: Array
    responsibilities: Array
    log_likelihood: Array  # per sample
    score: Array
    bic: Array
    aic: Array
    precisions_cholesky: Array


@functools.partial(jax.jit, static_argnames=("model", "covariance_type"))
def _evaluate(
    model: LatentModel, covariance_type: str, params: GaussianMixtureParams, x: Array, weights: Array
) -> _Evaluation:
    """Everything the fitted estimator reports about (padded, weighted) data, compiled once."""
    return _Evaluation(
        labels=lem.predict(model, params, x),
        responsibilities=lem.predict_proba(model, params, x),
        log_likelihood=lem.score_samples(model, params, x),
        score=lem.score(model, params, x, weights),
        bic=lem.bic(model, params, x, weights),
        aic=lem.aic(model, params, x, weights),
        precisions_cholesky=precision_cholesky(params.covariances, covariance_type),
    )


_em_step = jax.jit(lem.em_step, static_argnums=0)
_sample = jax.jit(
    lambda model, key, params, n_samples: model.sample(key, params, n_samples), static_argnums=(0, 3)
)


class _VerboseProgress:
    """scikit-learn's verbose messages, printed from inside the compiled loop.

    Called by ``jax.debug.callback`` with the engine's iteration ``i`` and the objective
    after it (``i = 0``: the initial objective); that is scikit-learn's iteration
    ``i + 1``, whose "ll change" is the difference between the objectives after
    iterations ``i`` and ``i - 1``. One instance serves every fit (it is a static
    argument of the compiled program: a new one would recompile); ``start`` resets it
    before each restart.
    """

    def start(self, verbose: int, interval: int) -> None:
        self.verbose = verbose
        self.interval = interval
        self.previous = -np.inf
        self.started = self.last = time.perf_counter()

    def __call__(self, iteration: Any, objective: Any) -> None:
        # Unbatched here (restarts run one at a time), but accept batched arrays.
        # Iteration 0 carries the objective at the initial params: scikit-learn's first
        # iteration, whose change is from -inf.
        for step, value in zip(np.ravel(iteration), np.ravel(objective), strict=True):
            change, self.previous = float(value) - self.previous, float(value)
            self.report(int(step) + 1, change)

    def report(self, iteration: int, change: float) -> None:
        if iteration % self.interval:
            return
        if self.verbose == 1:
            print(f"  Iteration {iteration}")
        else:
            now = time.perf_counter()
            print(f"  Iteration {iteration}\t time lapse {now - self.last:.5f}s\t ll change {change:.5f}")
            self.last = now

    def finish(self, converged: bool, lower_bound: float) -> None:
        message = "converged" if converged else "did not converge"
        if self.verbose == 1:
            print(f"Initialization {message}.")
        else:
            elapsed = time.perf_counter() - self.started
            print(f"Initialization {message}. time lapse {elapsed:.5f}s\t lower bound {lower_bound:.5f}.")


_PROGRESS = _VerboseProgress()


# ---------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------


class GaussianMixture(DensityMixin, BaseEstimator):
    r"""Gaussian mixture fitted by EM, with scikit-learn's interface, on latentem's engine.

    A drop-in for :class:`sklearn.mixture.GaussianMixture`: the same constructor
    parameters and defaults, methods and fitted attributes, plus ``sample_weight`` in
    :meth:`fit`, which scikit-learn's lacks (a zero weight removes a sample, an integer
    weight repeats it), ``reg_covar_mode`` and ``moments``.

    .. math:: p(x) = \sum_{k=1}^K \pi_k\, \mathcal{N}(x \mid \mu_k, \Sigma_k)

    **Same results as scikit-learn.** Covariance diagonals get ``reg_covar`` added as
    in scikit-learn (``reg_covar_mode="absolute"``, the default here; latentem's own
    default is ``"relative"``), and the loop stops by scikit-learn's rule: its
    objective is evaluated in the E-step *before* each M-step, so it stops one M-step
    after latentem's :func:`~latentem.fit_em` would. The estimator runs ``fit_em`` for
    up to ``max_iter - 1`` iterations and then one more M-step, which reproduces
    scikit-learn's iterates, so from the same initial parameters (``weights_init``,
    ``means_init``, ``precisions_init``) the fitted attributes agree with
    scikit-learn's to round-off. ``lower_bound_`` (the objective before the last
    M-step), ``lower_bounds_``, ``n_iter_`` and ``converged_`` have scikit-learn's
    meaning.

    **Differences.** The random initialisations differ: ``init_params="kmeans"`` and
    ``"k-means++"`` both seed centres by k-means++ and assign each sample to its
    nearest centre (scikit-learn's ``"kmeans"`` runs k-means to convergence; its
    ``"k-means++"`` starts each component from its seed point alone);
    ``"random_from_data"`` likewise assigns samples to randomly drawn data points;
    ``"random"`` is scikit-learn's random responsibilities. The restarts
    (``n_init``) run together as one ``jax.vmap``. A component left with no samples
    keeps its parameters instead of collapsing, and gives a ``ConvergenceWarning``. A
    restart whose objective or parameters become NaN or infinite (a singular covariance,
    with ``reg_covar=0``) is dropped, and the fit raises a ``ValueError``, as
    scikit-learn does, only when every restart is (scikit-learn raises when any one is).
    Arrays are float64 when JAX runs in 64-bit mode (``JAX_ENABLE_X64=1``) and float32
    otherwise. Each fit compiles once per model, number of features and data size
    (sizes are padded with zero-weight rows to a few sizes per octave, so data of
    similar sizes share one compiled program).

    Parameters:
      n_components: number of components.
      covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
      tol: convergence threshold on the change of the mean log-likelihood.
      reg_covar: non-negative regularisation added to covariance diagonals.
      max_iter: maximum number of EM iterations per restart.
      n_init: number of restarts; the best is kept.
      init_params: ``"kmeans"``, ``"k-means++"``, ``"random"`` or ``"random_from_data"``.
      weights_init: initial weights, shape ``(n_components,)``.
      means_init: initial means, shape ``(n_components, n_features)``.
      precisions_init: initial precision matrices (inverse covariances), in the shape
        of ``covariance_type`` (see ``covariances_``).
      random_state: int, ``numpy.random.RandomState`` or None; seeds the JAX key.
      warm_start: continue from the last fit's parameters (one restart).
      verbose: 1 prints each restart, 2 also each ``verbose_interval``-th iteration
        with timings (from inside the compiled loop, through ``jax.debug.callback``;
        restarts then run one after another).
      verbose_interval: iterations between verbose messages.
      reg_covar_mode: ``"absolute"`` (scikit-learn's rule, default) or ``"relative"``
        (``reg_covar`` times each feature's variance; see
        :func:`latentem.gaussian_mixture`).
      moments: how a fit forms its moments: ``"auto"`` (default), ``"centred"``
        (exact to round-off everywhere) or ``"expanded"`` (full, diagonal and
        spherical fits: faster, and on a GPU at default precision more accurate; see
        :func:`latentem.gaussian_mixture`).

    Attributes:
      weights_, means_, covariances_, precisions_, precisions_cholesky_: the fitted
        parameters, with scikit-learn's shapes.
      converged_: whether the best restart met ``tol``.
      n_iter_: EM iterations (M-steps) of the best restart.
      lower_bound_: mean log-likelihood of the training data before the last M-step.
      lower_bounds_: that value at every iteration of the best restart.
      n_features_in_, feature_names_in_: as in every scikit-learn estimator.

    Example:
      >>> import numpy as np
      >>> from latentem.sklearn import GaussianMixture
      >>> x = np.array([[1.0, 2], [1, 4], [1, 0], [10, 2], [10, 4], [10, 0]])
      >>> gm = GaussianMixture(n_components=2, random_state=0).fit(x)
      >>> gm.means_.round(1).tolist() in ([[1.0, 2.0], [10.0, 2.0]], [[10.0, 2.0], [1.0, 2.0]])
      True
      >>> bool(gm.predict([[0, 0], [12, 3]])[0] != gm.predict([[0, 0], [12, 3]])[1])
      True
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        reg_covar_mode: str = "absolute",
        moments: str = "auto",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.reg_covar_mode = reg_covar_mode
        self.moments = moments

    # -- helpers ------------------------------------------------------------

    def _fit_model(self) -> LatentModel:
        """The memoised latentem model for the current constructor parameters."""
        init = _INIT_PARAMS[check_choice(self.init_params, "init_params", tuple(_INIT_PARAMS))]
        reg_covar = self.reg_covar
        if isinstance(reg_covar, numbers.Real) and not isinstance(reg_covar, bool):
            reg_covar = float(reg_covar)
        return lem.gaussian_mixture(
            self.n_components,
            self.covariance_type,
            reg_covar,
            init,
            self.reg_covar_mode,
            self.moments,
        )

    def _fitted_model(self) -> LatentModel:
        """The model for the fitted parameters (evaluation needs only their shapes)."""
        check_choice(self.covariance_type, "covariance_type", COVARIANCE_TYPES)
        return lem.gaussian_mixture(int(np.shape(self.weights_)[0]), self.covariance_type)

    def _params(self) -> GaussianMixtureParams:
        return GaussianMixtureParams(
            jnp.asarray(self.weights_), jnp.asarray(self.means_), jnp.asarray(self.covariances_)
        )

    def _key(self) -> Array:
        """A JAX key drawn from ``random_state`` (an int gives the same key every time)."""
        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        return jax.random.key(seed)

    def _check_tol(self) -> float:
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol must be a non-negative number; got {self.tol!r}.")
        return float(self.tol)

    def _evaluation(self, X: Any) -> tuple[_Evaluation, int]:
        """scikit-learn's input checks, then the compiled evaluation of the fitted model."""
        check_is_fitted(self)
        x = _validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        x = np.asarray(x, dtype=np.asarray(self.means_).dtype)
        weights = np.ones((x.shape[0],), x.dtype)
        x_padded, weights_padded = _pad(x, weights)
        evaluation = _evaluate(
            self._fitted_model(), self.covariance_type, self._params(), x_padded, weights_padded
        )
        return evaluation, x.shape[0]

    def _initial_overrides(self, n_features: int, dtype: Any) -> tuple[Any, Any, Any]:
        """``weights_init``, ``means_init`` and the covariances of ``precisions_init``."""
        k = self.n_components
        weights = means = covariances = None
        if self.weights_init is not None:
            given = np.asarray(self.weights_init)
            weights = _finite_array(given, "weights_init")
            if weights.shape != (k,):
                raise ValueError(f"weights_init must have shape ({k},); got {weights.shape}.")
            # scikit-learn's tolerance on the sum: 1e-6 for float32 weights, else 1e-8.
            atol = 1e-6 if given.dtype == np.float32 else 1e-8
            if (weights < 0).any() or (weights > 1).any() or not abs(1.0 - weights.sum()) <= atol:
                raise ValueError(
                    f"weights_init must be in [0, 1] and sum to 1 (within {atol:g}); got {weights.tolist()} "
                    f"(sum {float(weights.sum())!r})."
                )
            weights = jnp.asarray(weights, dtype)
        if self.means_init is not None:
            means = _finite_array(self.means_init, "means_init")
            if means.shape != (k, n_features):
                raise ValueError(f"means_init must have shape ({k}, {n_features}); got {means.shape}.")
            means = jnp.asarray(means, dtype)
        if self.precisions_init is not None:
            precisions = _finite_array(self.precisions_init, "precisions_init")
            expected = {
                "full": (k, n_features, n_features),
                "tied": (n_features, n_features),
                "diag": (k, n_features),
                "spherical": (k,),
            }[self.covariance_type]
            if precisions.shape != expected:
                raise ValueError(
                    f"precisions_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}; got {precisions.shape}."
                )
            if self.covariance_type in ("full", "tied"):
                symmetric = np.allclose(precisions, np.swapaxes(precisions, -1, -2))
                if not symmetric or (np.linalg.eigvalsh(precisions) <= 0).any():
                    raise ValueError("precisions_init must be symmetric positive-definite matrices.")
                covariances = np.linalg.inv(precisions)
            else:
                if (precisions <= 0).any():
                    raise ValueError("precisions_init must be positive.")
                covariances = 1.0 / precisions
            covariances = jnp.asarray(covariances, dtype)
        return weights, means, covariances

    def _set_fitted(self, params: GaussianMixtureParams, x: Array, weights: Array) -> np.ndarray:
        """Store the fitted parameters; return the labels of the (padded) training data."""
        self.weights_ = np.asarray(params.weights)
        self.means_ = np.asarray(params.means)
        self.covariances_ = np.asarray(params.covariances)
        evaluation = _evaluate(self._fitted_model(), self.covariance_type, self._params(), x, weights)
        factor = np.asarray(evaluation.precisions_cholesky)
        self.precisions_cholesky_ = factor
        if self.covariance_type == "full":
            self.precisions_ = factor @ np.swapaxes(factor, 1, 2)
        elif self.covariance_type == "tied":
            self.precisions_ = factor @ factor.T
        else:
            self.precisions_ = np.square(factor)
        return np.asarray(evaluation.labels)

    # -- fitting ------------------------------------------------------------

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> GaussianMixture:
        """Estimate the parameters by EM from ``n_init`` restarts; keep the best.

        Args:
          X: data, shape ``(n_samples, n_features)``.
          y: ignored.
          sample_weight: optional non-negative weights, shape ``(n_samples,)``.

        Returns:
          The fitted estimator.
        """
        self.fit_predict(X, y, sample_weight=sample_weight)
        return self

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit as :meth:`fit`, then return the most probable component of each sample."""
        x = _validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        x = np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(x.dtype))
        n_samples = x.shape[0]
        model = self._fit_model()
        max_iter = check_positive_int(self.max_iter, "max_iter", minimum=0)
        n_init = check_positive_int(self.n_init, "n_init")
        interval = check_positive_int(self.verbose_interval, "verbose_interval")
        verbose = int(self.verbose)
        tol = self._check_tol()
        weights = np.asarray(check_weights(sample_weight, n_samples, x.dtype))
        n_weighted = int(np.count_nonzero(weights > 0))
        if n_weighted < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_weighted} (with positive weight)."
            )
        warm = bool(self.warm_start) and hasattr(self, "converged_")
        # A warm start continues from the fitted params; the *_init arrays are for inits.
        overrides = (None, None, None) if warm else self._initial_overrides(x.shape[1], x.dtype)

        x_padded, weights_padded = _pad(x, weights)
        tol_array = jnp.asarray(tol, x.dtype)
        keys = jax.random.split(self._key(), 1 if warm else n_init)
        start = None
        if warm:
            start = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, x.dtype)[None], self._params())
            if max_iter > 0:
                stepped = self._warm_start_converged(model, x_padded, weights_padded, tol, verbose)
                if stepped is not None:
                    return self._set_fitted(stepped, x_padded, weights_padded)[:n_samples]

        def run(indices: slice, callback: Any) -> _Restarts:
            batch_start = None if start is None else jax.tree_util.tree_map(lambda leaf: leaf[indices], start)
            return _fit_restarts(
                model,
                keys[indices],
                x_padded,
                weights_padded,
                tol_array,
                overrides,
                batch_start,
                max_iter=max_iter,
                callback=callback,
            )

        if verbose > 0:
            # One restart at a time, so that the messages read as scikit-learn's.
            pieces = []
            for index in range(keys.shape[0]):
                print(f"Initialization {index}")
                callback = _PROGRESS if max_iter > 0 else None
                _PROGRESS.start(verbose, interval)
                restart = run(slice(index, index + 1), callback)
                if max_iter > 0:
                    jax.effects_barrier()  # every iteration printed before the summary line
                    _PROGRESS.finish(bool(restart.converged[0]), float(restart.objective[0]))
                pieces.append(restart)
            restarts = jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves), *pieces)
        else:
            restarts = run(slice(None), None)

        restarts = jax.tree_util.tree_map(np.asarray, restarts)
        usable = restarts.status != int(Status.NONFINITE)
        if not usable.any():
            # scikit-learn raises when a covariance cannot be factorised; latentem's loop
            # stops instead, and a fit with no restart left standing has nothing to keep.
            raise ValueError(
                "Fitting the mixture model failed: every restart's objective or parameters became "
                "NaN or infinite, as when a component collapses onto a single point or onto "
                "identical samples. Increase reg_covar (it must be > 0 for such data), decrease "
                "n_components, or scale the input data"
                + (" (or pass float64 data with JAX_ENABLE_X64=1)." if x.dtype == np.float32 else ".")
            )
        scores = np.where(usable & np.isfinite(restarts.objective), restarts.objective, -np.inf)
        best = jax.tree_util.tree_map(lambda leaf: leaf[int(np.argmax(scores))], restarts)
        labels = self._set_fitted(best.params, x_padded, weights_padded)
        self._record(best, max_iter)
        return labels[:n_samples]

    def _warm_start_converged(
        self, model: LatentModel, x: Array, weights: Array, tol: float, verbose: int
    ) -> GaussianMixtureParams | None:
        """scikit-learn's first warm-start test: has the objective moved less than tol?

        scikit-learn compares the objective at the current params with the stored
        ``lower_bound_`` (the objective one M-step earlier) before anything else, and
        then stops after a single M-step. Returns that step's params, or ``None``.
        """
        params = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, x.dtype), self._params())
        current = float(_evaluate(self._fitted_model(), self.covariance_type, params, x, weights).score)
        if not abs(current - float(self.lower_bound_)) < tol:
            return None
        stepped, _ = _em_step(model, params, x, weights)
        if verbose > 0:
            print("Initialization 0")
            print("Initialization converged.")
        self.converged_ = True
        self.n_iter_ = 1
        self.lower_bound_ = current
        self.lower_bounds_ = [current]
        return stepped

    def _record(self, best: _Restarts, max_iter: int) -> None:
        """scikit-learn's convergence attributes from the engine's, and the warnings."""
        status = Status(int(best.status))
        n_iter = int(best.n_iter)
        if max_iter == 0:
            self.converged_ = False
            self.n_iter_ = 0
            self.lower_bound_ = -np.inf
            self.lower_bounds_ = []
            return
        self.converged_ = bool(best.converged)
        self.n_iter_ = n_iter + 1  # fit_em's iterations and the final M-step
        self.lower_bound_ = float(best.objective)
        self.lower_bounds_ = [float(best.initial_objective), *(float(v) for v in best.history[:n_iter])]
        if not self.converged_:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,
            )
        if status == Status.EMPTY_COMPONENT:
            warnings.warn(
                "a component ended with no samples; the data support fewer components (or "
                "contain duplicated points). Reduce n_components.",
                ConvergenceWarning,
                stacklevel=3,
            )

    # -- fitted model -------------------------------------------------------

    def predict(self, X: Any) -> np.ndarray:
        """The most probable component of each sample, shape ``(n_samples,)``."""
        evaluation, n_samples = self._evaluation(X)
        return np.asarray(evaluation.labels)[:n_samples]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Posterior probability of each component, shape ``(n_samples, n_components)``."""
        evaluation, n_samples = self._evaluation(X)
        return np.asarray(evaluation.responsibilities)[:n_samples]

    def score_samples(self, X: Any) -> np.ndarray:
        """Log-likelihood of each sample, :math:`\\log p(x_n)`, shape ``(n_samples,)``."""
        evaluation, n_samples = self._evaluation(X)
        return np.asarray(evaluation.log_likelihood)[:n_samples]

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood of the samples (higher is better; GridSearchCV's default)."""
        return float(self._evaluation(X)[0].score)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X``, lower is better (see :func:`latentem.bic`)."""
        return float(self._evaluation(X)[0].bic)

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X``, lower is better (see :func:`latentem.aic`)."""
        return float(self._evaluation(X)[0].aic)

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw samples from the fitted mixture, grouped by component as scikit-learn does.

        Returns:
          ``(X, y)``: samples, shape ``(n_samples, n_features)``, and their components.
        """
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at least one sample."
            )
        x, labels = _sample(self._fitted_model(), self._key(), self._params(), int(n_samples))
        labels = np.asarray(labels).astype(np.int64)
        order = np.argsort(labels, kind="stable")
        return np.asarray(x)[order], labels[order]
