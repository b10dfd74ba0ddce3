r"""Hard (classification) EM for any finite-state model.

Classification EM replaces the posterior of the E-step by its arg-max: each sample is
assigned wholly to its most probable latent state, and the M-step then fits the
parameters to that partition. For a Gaussian mixture with equal weights and a shared
spherical covariance this is Lloyd's k-means.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from latentem._base import Array, LatentModel, LogJointFn, Params, check_latent_model, checked_log_joint


def hard_em(model: LatentModel) -> LatentModel:
    r"""Classification EM for a finite-state model: the posterior replaced by its arg-max.

    The returned model keeps ``model``'s functions and adds a ``posterior`` (the
    engine's E-step hook) that assigns each sample to its most probable state,

    .. math:: \hat z_n = \arg\max_k \log p(x_n, z_n = k \mid \theta), \qquad
              q(z_n = k) = [k = \hat z_n],

    so :func:`~latentem.fit_em` and :func:`~latentem.fit` run it unchanged, and the
    M-step of ``model`` fits the parameters to that partition (sample weights applied
    as usual). The per-sample objective is then the *classification* log-likelihood

    .. math:: \ell_C(\theta) = \frac{1}{\sum_n w_n} \sum_n w_n \max_k
              \log p(x_n, z_n = k \mid \theta),

    which classification EM never decreases: the assignment step maximises it over the
    labels and the M-step over the parameters (Celeux & Govaert, 1992). There are
    finitely many partitions, so the fit reaches a fixed point, where no sample changes
    state and the M-step refits the same partition; the engine stops there
    (``Status.CONVERGED``), and by default (``tol=None``, i.e. ``0`` for this model)
    only there or at ``max_iter``. A ``tol`` stops it earlier, once the objective
    changes by less than ``tol``. It is a lower
    bound of the marginal log-likelihood, and its maximiser is a different (biased)
    estimate when states overlap; ``result.log_likelihood``, ``score`` and
    ``score_samples`` on this model report :math:`\ell_C`, not the marginal
    likelihood (use the original ``model`` for that). ``predict_proba`` returns the
    one-hot assignments.

    Ties (two states with exactly equal log joint) go to the lowest state index, as
    ``jnp.argmax`` does; ties have probability zero for continuous data but are common
    for discrete data, so the fitted partition may then depend on the state order.
    A state that loses all its samples ends the fit with ``Status.EMPTY_COMPONENT``,
    as in soft EM; the base model's M-step decides what its parameters become.

    The factory is memoised: ``hard_em(m) is hard_em(m)``, so compiled fits are reused.

    Args:
      model: a :class:`~latentem.LatentModel` with ``log_joint`` (finite latent states).

    Returns:
      A :class:`~latentem.LatentModel` over the same parameters.

    Raises:
      ValueError: if ``model`` has no ``log_joint`` (continuous latent variables have no
        arg-max state to assign).

    Example:
      >>> import jax, latentem as lem
      >>> x = lem.datasets.load_faithful()
      >>> model = lem.hard_em(lem.gaussian_mixture(2, covariance_type="spherical"))
      >>> result = lem.fit(model, jax.random.key(0), x)
      >>> probabilities = lem.predict_proba(model, result.params, x[:2])  # one-hot rows
      >>> bool(result.converged), sorted(probabilities.tolist())
      (True, [[0.0, 1.0], [1.0, 0.0]])

    References:
      Celeux & Govaert (1992), A classification EM algorithm for clustering and two
      stochastic versions. Computational Statistics & Data Analysis 14(3).
    """
    check_latent_model(model, "hard_em")
    if model.log_joint is None:
        raise ValueError(
            "hard_em needs a finite-state model (one with log_joint): classification EM "
            "assigns each sample to its most probable state. This model's latent variable "
            "is continuous; fit it with fit_em directly."
        )
    return _hard_em(model)


@functools.lru_cache(maxsize=256)
def _hard_em(model: LatentModel) -> LatentModel:
    # The model's fused step (if any) is a soft-EM iteration: not this one.
    return LatentModel(
        **{
            **model._asdict(),
            "posterior": _ArgMaxPosterior(model.log_joint),
            "fused_step": None,
            "fused_prepare": None,
        }
    )


class _ArgMaxPosterior:
    """The E-step of classification EM; its type tells the engine a model is hard EM."""

    def __init__(self, log_joint: LogJointFn) -> None:
        self.log_joint = log_joint

    def __call__(self, params: Params, x: Array) -> tuple[Array, Array]:
        log_joint = checked_log_joint(self.log_joint, params, x)
        labels = jnp.argmax(log_joint, axis=1)
        assignments = jax.nn.one_hot(labels, log_joint.shape[1], dtype=log_joint.dtype)
        # max, not a gather at the labels: the same number, and no index arithmetic.
        return assignments, jnp.max(log_joint, axis=1)


def is_classification_em(model: LatentModel) -> bool:
    """Whether ``model`` was built by :func:`hard_em` (its E-step is an arg-max)."""
    return isinstance(model.posterior, _ArgMaxPosterior)
