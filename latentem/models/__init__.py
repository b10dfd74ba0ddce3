"""Model factories: each returns a :class:`~latentem.LatentModel`."""

from latentem.models.gaussian_mixture import (
    GaussianMixtureParams,
    GaussianMixtureUnconstrained,
    gaussian_mixture,
)

__all__ = ["GaussianMixtureParams", "GaussianMixtureUnconstrained", "gaussian_mixture"]
