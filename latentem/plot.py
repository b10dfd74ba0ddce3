"""Plots of fitted models: clusters with component ellipses, log-likelihood histories,
model-selection curves.

matplotlib is an optional dependency (``pip install "latentem[plot]"``); it is imported
when a plotting function is first called, never by ``import latentem``. Every function
draws on the Axes it is given (``ax=``) or on a new figure, and returns the Axes.

Example:
  >>> import jax, matplotlib
  >>> matplotlib.use("Agg")
  >>> import latentem as lem, latentem.plot
  >>> x = lem.datasets.load_faithful()
  >>> model = lem.gaussian_mixture(2)
  >>> result = lem.fit(model, jax.random.key(0), x)
  >>> ax = latentem.plot.clusters(x, result.params, feature_names=["eruptions", "waiting"])
  >>> ax.get_xlabel(), len(ax.patches)
  ('eruptions', 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["clusters", "history", "selection"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise ImportError(
            "latentem.plot needs matplotlib; install it with pip install 'latentem[plot]' "
            "(or pip install matplotlib)."
        ) from None
    return pyplot


def _new_axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots(figsize=(6.0, 4.5), layout="constrained")
    return ax


def _colour(index: int) -> Any:
    return _pyplot().get_cmap("tab10")(index % 10)


# ---------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------


def _infer_covariance_type(params: Any) -> str:
    """The covariance type of Gaussian mixture params, from the shapes of its arrays."""
    n_components, n_features = np.shape(params.means)
    shape = np.shape(params.covariances)
    candidates = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }
    matches = [name for name, expected in candidates.items() if shape == expected]
    if len(matches) != 1:
        raise ValueError(
            f"cannot tell the covariance type from covariances of shape {shape} "
            f"({' or '.join(matches) or 'no type matches'}); pass covariance_type=."
        )
    return matches[0]


def _marginal_covariance(
    covariances: np.ndarray, covariance_type: str, component: int, n_features: int
) -> np.ndarray:
    """The covariance of the first ``n_features`` features (the component's marginal)."""
    if covariance_type == "full":
        return covariances[component, :n_features, :n_features]
    if covariance_type == "tied":
        return covariances[:n_features, :n_features]
    if covariance_type == "diag":
        return np.diag(covariances[component, :n_features])
    return covariances[component] * np.eye(n_features)


def _ellipse(mean: np.ndarray, covariance: np.ndarray, n_std: float, colour: Any) -> Any:
    """The ellipse ``(x - mean)^T covariance^-1 (x - mean) = n_std^2``."""
    from matplotlib.patches import Ellipse

    variances, vectors = np.linalg.eigh(covariance)
    variances = np.maximum(variances, 0.0)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    width, height = 2.0 * n_std * np.sqrt(variances[::-1])
    return Ellipse(
        (float(mean[0]), float(mean[1])),
        float(width),
        float(height),
        angle=angle,
        fill=False,
        edgecolor=colour,
        linewidth=2.0,
    )


def _histogram_by_component(
    ax: Any, x: np.ndarray, labels: np.ndarray, params: Any, covariance_type: str | None, legend: list[str]
) -> None:
    """One feature: a stacked histogram by component under the weighted component densities."""
    n_components = len(legend)
    edges = np.histogram_bin_edges(x, bins="auto")
    # density=True with stacked=True normalises the whole stack to area one, so each
    # component's layer is comparable with its weighted density pi_k N(x | mu_k, sigma_k^2).
    ax.hist(
        [x[labels == k] for k in range(n_components)],
        bins=edges,
        stacked=True,
        density=True,
        alpha=0.5,
        color=[_colour(k) for k in range(n_components)],
        label=legend,
    )
    if params is None:
        return
    span = float(edges[-1] - edges[0]) or 1.0
    grid = np.linspace(edges[0] - 0.1 * span, edges[-1] + 0.1 * span, 400)
    weights = np.asarray(params.weights, np.float64)
    means = np.asarray(params.means, np.float64)[:, 0]
    covariances = np.asarray(params.covariances, np.float64)
    mixture = np.zeros_like(grid)
    for k in range(n_components):
        variance = float(_marginal_covariance(covariances, covariance_type, k, 1)[0, 0])
        density = (
            weights[k]
            * np.exp(-0.5 * (grid - means[k]) ** 2 / variance)
            / math.sqrt(2.0 * math.pi * variance)
        )
        mixture += density
        ax.plot(grid, density, color=_colour(k), linewidth=2.0)
    ax.plot(grid, mixture, color="black", linewidth=1.5, label="mixture density")


def clusters(
    x: Any,
    params: Any,
    *,
    model: Any = None,
    labels: Any = None,
    covariance_type: str | None = None,
    feature_names: Sequence[str] | None = None,
    n_std: float = 2.0,
    title: str | None = None,
    ax: Any = None,
) -> Any:
    r"""Scatter the data coloured by component, with an ellipse per Gaussian component.

    Plots the first two features. Each ellipse is the contour
    :math:`(x - \mu_k)^\top \Sigma_k^{-1} (x - \mu_k) = \text{n\_std}^2` of the
    component's marginal over those two features; the means are marked with crosses.
    For models whose parameters have no ``means``/``covariances`` the data are still
    coloured by ``labels`` (or by ``latentem.predict(model, params, x)``).

    Data with one feature get a histogram instead, stacked by component and normalised
    so that its total area is one, under the weighted component densities
    :math:`\pi_k \, \mathcal{N}(x \mid \mu_k, \sigma_k^2)` and their sum, the mixture
    density (black), for Gaussian parameters.

    Args:
      x: data, shape ``(n_samples, n_features)``.
      params: fitted parameters, e.g. :class:`~latentem.GaussianMixtureParams`.
      model: the model, used to compute ``labels`` when they are not given (default: a
        Gaussian mixture of the shape of ``params``).
      labels: component of each sample; default the most probable one.
      covariance_type: of Gaussian mixture ``params``; inferred from their shapes when
        unambiguous.
      feature_names: names of the features, for the axis labels.
      n_std: size of the ellipses in standard deviations.
      title: the title; default says the number of components.
      ax: matplotlib Axes to draw on; default a new figure.

    Returns:
      The matplotlib Axes.

    Example:
      See the module docstring.
    """
    import latentem as lem

    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"clusters plots data of shape (n_samples, n_features), at least one of each; got {x.shape}."
        )
    gaussian = hasattr(params, "means") and hasattr(params, "covariances")
    if gaussian and covariance_type is None:
        covariance_type = _infer_covariance_type(params)
    if labels is None:
        if model is None:
            if not gaussian:
                raise ValueError(
                    "pass model= (or labels=) to colour the data of a model that is not Gaussian."
                )
            model = lem.gaussian_mixture(int(np.shape(params.means)[0]), covariance_type)
        labels = lem.predict(model, params, x)
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), one per sample; got {labels.shape}.")

    ax = _new_axes(ax)
    n_components = int(np.shape(params.means)[0]) if gaussian else int(labels.max(initial=0)) + 1
    weights = np.asarray(params.weights) if hasattr(params, "weights") else None
    names = list(feature_names) if feature_names is not None else ["feature 0", "feature 1"]
    legend = [
        f"component {k}" + (f" (weight {weights[k]:.2f})" if weights is not None else "")
        for k in range(n_components)
    ]
    if x.shape[1] == 1:
        _histogram_by_component(ax, x[:, 0], labels, params if gaussian else None, covariance_type, legend)
        ax.set_xlabel(names[0])
        ax.set_ylabel("density")
        suffix = ", weighted component densities" if gaussian else ""
        ax.set_title(title if title is not None else f"{n_components} components{suffix}")
        ax.legend(loc="best", fontsize="small")
        return ax
    for k in range(n_components):
        members = labels == k
        ax.scatter(x[members, 0], x[members, 1], s=12, alpha=0.6, color=_colour(k), label=legend[k])
    if gaussian:
        means = np.asarray(params.means)
        covariances = np.asarray(params.covariances)
        for k in range(n_components):
            covariance = _marginal_covariance(covariances, covariance_type, k, 2)
            ax.add_patch(_ellipse(means[k, :2], covariance, n_std, _colour(k)))
            ax.plot(means[k, 0], means[k, 1], marker="x", markersize=10, mew=2.5, color="black")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    suffix = f", ellipses at {n_std:g} standard deviations" if gaussian else ""
    ax.set_title(title if title is not None else f"{n_components} components{suffix}")
    ax.legend(loc="best", fontsize="small")
    return ax


# ---------------------------------------------------------------------------
# Log-likelihood histories
# ---------------------------------------------------------------------------


def _history_curves(result: Any) -> tuple[list[np.ndarray], str]:
    """The objective after each iteration/step of a result (one curve per batch member)."""
    if not hasattr(result, "history"):
        raise ValueError(
            "history needs fit results with a history (EMResult, GradientResult); "
            f"got {type(result).__name__}."
        )
    history = np.asarray(result.history, dtype=np.float64)
    if hasattr(result, "n_iter"):
        counts, kind = np.asarray(result.n_iter), "EM"
    elif hasattr(result, "n_steps"):
        counts, kind = np.asarray(result.n_steps), "gradient"
    else:
        counts, kind = np.sum(np.isfinite(history), axis=-1), "fit"
    history = history.reshape(-1, history.shape[-1])
    counts = np.broadcast_to(counts, history.shape[:1]) if counts.ndim == 0 else counts.reshape(-1)
    return [row[: int(count)] for row, count in zip(history, counts, strict=True)], kind


def history(
    *results: Any,
    labels: Sequence[str] | None = None,
    xscale: str = "linear",
    title: str | None = "Objective during fitting",
    ax: Any = None,
) -> Any:
    """Plot the mean log-likelihood after each iteration of one or more fits, on one axis.

    Takes anything with a ``history`` (the objective after each iteration or step,
    NaN-padded) and ``n_iter`` (EM, :class:`~latentem.EMResult`) or ``n_steps``
    (gradient fitting): EM and gradient runs of the same model compare directly.
    Batched results (from ``vmap``) draw one thin line per member.

    Args:
      *results: fit results.
      labels: legend entry of each result; default "EM" / "gradient" (numbered when
        there are several of a kind).
      xscale: ``"linear"`` or ``"log"`` (useful when a few EM iterations meet
        thousands of gradient steps).
      title: the title.
      ax: matplotlib Axes to draw on; default a new figure.

    Returns:
      The matplotlib Axes.

    Example:
      >>> import jax, matplotlib
      >>> matplotlib.use("Agg")
      >>> import latentem as lem, latentem.plot
      >>> x = lem.datasets.load_faithful()
      >>> result = lem.fit(lem.gaussian_mixture(2), jax.random.key(0), x)
      >>> ax = latentem.plot.history(result)
      >>> len(ax.lines[0].get_xdata()) == int(result.n_iter)
      True
    """
    if not results:
        raise ValueError("history needs at least one fit result.")
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"give one label per result: {len(results)} results, {len(labels)} labels.")
    curves = [_history_curves(result) for result in results]
    kinds = [kind for _, kind in curves]
    ax = _new_axes(ax)
    for index, (rows, kind) in enumerate(curves):
        if labels is not None:
            label = labels[index]
        else:
            label = kind if kinds.count(kind) == 1 else f"{kind} {kinds[: index + 1].count(kind)}"
        colour = _colour(index)
        batched = len(rows) > 1
        for member, row in enumerate(rows):
            ax.plot(
                np.arange(1, row.shape[0] + 1),
                row,
                color=colour,
                linewidth=1.0 if batched else 2.0,
                alpha=0.6 if batched else 1.0,
                marker="." if row.shape[0] <= 50 and not batched else None,
                label=label if member == 0 else None,
            )
    ax.set_xscale(xscale)
    ax.set_xlabel("iteration (EM) or step (gradient)")
    ax.set_ylabel("mean log-likelihood")
    if title is not None:
        ax.set_title(title)
    ax.legend(loc="lower right")
    return ax


# ---------------------------------------------------------------------------
# Model selection
# ---------------------------------------------------------------------------


_CRITERION_NAMES = {"bic": "BIC", "aic": "AIC", "heldout": "held-out mean log-likelihood"}


def _criterion_name(name: str | None) -> str:
    if name is None:
        return "score"
    return _CRITERION_NAMES.get(name.lower(), name)


def _result_curves(
    result: Any, criterion: str | None
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], Any]:
    """Curves ``(label, candidates, values)`` and the choice from a selection result."""
    candidates = getattr(result, "n_components", getattr(result, "candidates", None))
    values = getattr(result, "score", getattr(result, "scores", None))
    if candidates is None or values is None:
        raise ValueError(
            "selection needs a result with n_components and score (such as "
            "latentem.select_n_components returns), or candidates= and scores=."
        )
    candidates = np.asarray(candidates)
    values = np.asarray(values, dtype=np.float64)
    if candidates.ndim != 1 or values.shape != candidates.shape:
        raise ValueError(
            "selection plots one dataset's result; for a batch take one dataset first: "
            "jax.tree.map(lambda leaf: leaf[i], result)."
        )
    name = _criterion_name(criterion)
    types = np.asarray(getattr(result, "covariance_type", np.zeros(candidates.shape, int)))
    type_names = getattr(result, "COVARIANCE_TYPES", None)
    curves = []
    for code in dict.fromkeys(types.tolist()):
        rows = types == code
        label = name
        if len(set(types.tolist())) > 1:
            label = f"{name} ({type_names[code] if type_names is not None else code})"
        curves.append((label, candidates[rows], values[rows]))
    best = getattr(result, "best_n_components", getattr(result, "best", None))
    return curves, best


def selection(
    result: Any = None,
    *,
    candidates: Sequence[int] | None = None,
    scores: dict[str, Sequence[float]] | Sequence[float] | None = None,
    best: Any = None,
    criterion: str | None = None,
    title: str | None = "Model selection",
    ax: Any = None,
) -> Any:
    """Plot a model-selection criterion against the number of components.

    Takes the :class:`~latentem.SelectionResult` of :func:`latentem.select_n_components`
    (one curve per covariance type compared) or explicit arrays. The chosen number of
    components is marked by a vertical line.

    Args:
      result: a selection result with ``n_components``, ``score`` (and optionally
        ``covariance_type``, ``best_n_components``).
      candidates: the numbers of components compared (instead of ``result``).
      scores: their criterion values: one sequence, or a dict ``{name: values}`` for
        several curves.
      best: the chosen number of components (default: the result's).
      criterion: the criterion's name for the axis and legend (``"bic"``, ``"aic"``,
        ``"heldout"`` or any text).
      title: the title.
      ax: matplotlib Axes to draw on; default a new figure.

    Returns:
      The matplotlib Axes.

    Example:
      >>> import matplotlib
      >>> matplotlib.use("Agg")
      >>> import latentem.plot
      >>> ax = latentem.plot.selection(candidates=[1, 2, 3], scores=[2.0, 1.0, 1.5], best=2, criterion="bic")
      >>> ax.get_xlabel(), ax.get_ylabel()
      ('number of components', 'BIC')
    """
    if result is not None:
        curves, result_best = _result_curves(result, criterion)
        best = result_best if best is None else best
    else:
        if candidates is None or scores is None:
            raise ValueError("selection needs a selection result, or candidates= and scores=.")
        candidates = np.asarray(candidates)
        named = scores if isinstance(scores, dict) else {_criterion_name(criterion): scores}
        curves = []
        for name, values in named.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != candidates.shape:
                raise ValueError(
                    f"{name} has {values.shape} values but there are {candidates.shape} candidates; "
                    "give one value per candidate."
                )
            curves.append((_criterion_name(name), candidates, values))
    ax = _new_axes(ax)
    for index, (label, xs, ys) in enumerate(curves):
        ax.plot(xs, ys, marker="o", color=_colour(index), label=label)
    if best is not None:
        chosen = int(np.asarray(best))
        ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen: {chosen}")
    ax.set_xlabel("number of components")
    ax.set_ylabel(", ".join(dict.fromkeys(label.split(" (")[0] for label, _, _ in curves)))
    every = np.unique(np.concatenate([np.asarray(xs) for _, xs, _ in curves]))
    if np.issubdtype(every.dtype, np.integer):
        ax.set_xticks(every)
    if title is not None:
        ax.set_title(title)
    ax.legend(loc="best")
    return ax
