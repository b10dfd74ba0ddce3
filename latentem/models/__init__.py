"""Model factories: each returns a :class:`~latentem.LatentModel`."""

from latentem.models.discrete import (
    BernoulliMixtureParams,
    BernoulliMixtureUnconstrained,
    CategoricalMixtureParams,
    CategoricalMixtureUnconstrained,
    PoissonMixtureParams,
    PoissonMixtureUnconstrained,
    bernoulli_mixture,
    categorical_mixture,
    poisson_mixture,
)
from latentem.models.gaussian_mixture import (
    GaussianMixtureParams,
    GaussianMixtureUnconstrained,
    gaussian_mixture,
)
from latentem.models.kmeans import KMeansParams, KMeansUnconstrained, inertia, kmeans
from latentem.models.linear_gaussian import (
    FactorAnalysisParams,
    LinearGaussianPosterior,
    LinearGaussianUnconstrained,
    PPCAParams,
    factor_analysis,
    ppca,
)

__all__ = [
    "BernoulliMixtureParams",
    "BernoulliMixtureUnconstrained",
    "CategoricalMixtureParams",
    "CategoricalMixtureUnconstrained",
    "FactorAnalysisParams",
    "GaussianMixtureParams",
    "GaussianMixtureUnconstrained",
    "KMeansParams",
    "KMeansUnconstrained",
    "LinearGaussianPosterior",
    "LinearGaussianUnconstrained",
    "PPCAParams",
    "PoissonMixtureParams",
    "PoissonMixtureUnconstrained",
    "bernoulli_mixture",
    "categorical_mixture",
    "factor_analysis",
    "gaussian_mixture",
    "inertia",
    "kmeans",
    "poisson_mixture",
    "ppca",
]
