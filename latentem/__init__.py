"""latentem: latent variable models fitted by Expectation-Maximization, compiled with JAX."""

from latentem import datasets
from latentem._base import (
    EMResult,
    LatentModel,
    Status,
)
from latentem._batch import fit_batch, stack_datasets
from latentem._check import CheckFinding, CheckReport, check_model
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
from latentem._gradient import GradientResult, fit_gradient
from latentem._hard_em import hard_em
from latentem._io import SavedModel, load, save
from latentem._select import SelectionResult, select_n_components
from latentem.models import (
    BernoulliMixtureParams,
    BernoulliMixtureUnconstrained,
    CategoricalMixtureParams,
    CategoricalMixtureUnconstrained,
    FactorAnalysisParams,
    GaussianMixtureParams,
    GaussianMixtureUnconstrained,
    KMeansParams,
    LinearGaussianPosterior,
    LinearGaussianUnconstrained,
    PoissonMixtureParams,
    PoissonMixtureUnconstrained,
    PPCAParams,
    bernoulli_mixture,
    categorical_mixture,
    factor_analysis,
    gaussian_mixture,
    inertia,
    kmeans,
    poisson_mixture,
    ppca,
)

__version__ = "0.1.0"

__all__ = [
    "BernoulliMixtureParams",
    "BernoulliMixtureUnconstrained",
    "CategoricalMixtureParams",
    "CategoricalMixtureUnconstrained",
    "CheckFinding",
    "CheckReport",
    "ConvergenceWarning",
    "EMResult",
    "FactorAnalysisParams",
    "GaussianMixtureParams",
    "GaussianMixtureUnconstrained",
    "GradientResult",
    "KMeansParams",
    "LatentModel",
    "LinearGaussianPosterior",
    "LinearGaussianUnconstrained",
    "PPCAParams",
    "PoissonMixtureParams",
    "PoissonMixtureUnconstrained",
    "SavedModel",
    "SelectionResult",
    "Status",
    "aic",
    "bernoulli_mixture",
    "bic",
    "categorical_mixture",
    "check_model",
    "datasets",
    "e_step",
    "em_step",
    "factor_analysis",
    "fit",
    "fit_batch",
    "fit_em",
    "fit_gradient",
    "gaussian_mixture",
    "hard_em",
    "inertia",
    "kmeans",
    "load",
    "poisson_mixture",
    "ppca",
    "predict",
    "predict_proba",
    "save",
    "score",
    "score_samples",
    "select_n_components",
    "stack_datasets",
]
