"""latentem: latent variable models fitted by Expectation-Maximization, compiled with JAX."""

from latentem import datasets
from latentem._base import (
    EMResult,
    LatentModel,
    Status,
)
from latentem._em import (
    ConvergenceWarning,
    aic,
    bic,
    e_step,
    em_step,
    fit,
    fit_em,
    predict,
    predict_proba,
    score,
    score_samples,
)
from latentem.models import (
    GaussianMixtureParams,
    GaussianMixtureUnconstrained,
    gaussian_mixture,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "EMResult",
    "GaussianMixtureParams",
    "GaussianMixtureUnconstrained",
    "LatentModel",
    "Status",
    "aic",
    "bic",
    "datasets",
    "e_step",
    "em_step",
    "fit",
    "fit_em",
    "gaussian_mixture",
    "predict",
    "predict_proba",
    "score",
    "score_samples",
]
