r"""The Gaussian mixture, latentem's reference model.

.. math:: p(x) = \sum_{k=1}^K \pi_k \, \mathcal{N}(x \mid \mu_k, \Sigma_k)

with four covariance structures, as in scikit-learn: ``"full"`` (one matrix per
component), ``"tied"`` (one matrix shared by all), ``"diag"`` (one diagonal per
component) and ``"spherical"`` (one variance per component). Parameter names and shapes
follow scikit-learn's ``GaussianMixture``, so its attributes map one-to-one.

Numerics (after scikit-learn's ``_gaussian_mixture.py``, with two changes):

- densities go through the Cholesky factor of each precision matrix, in log space;
- data are shifted by a reference point inside the data before moments are formed, and
  covariances are computed from differences to the new means (two passes), so that
  float32 data far from the origin (an offset of 1e4) still fit;
- the regularisation added to covariance diagonals scales by default with each feature's
  variance (``reg_covar_mode="relative"``), so a fit is equivariant to the units of the
  data; ``reg_covar_mode="absolute"`` adds ``reg_covar`` as scikit-learn does.

No array of shape ``(n_samples, n_components, n_features, n_features)`` is ever formed;
the largest intermediates are ``(n_samples, n_components, n_features)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentem import _em
from latentem._base import (
    Array,
    LatentModel,
    PRNGKey,
    check_choice,
    check_nonnegative,
    check_param_fields,
    check_param_shapes,
    check_positive_int,
    float_dtype,
    optimization_barrier,
)
from latentem.models import _gaussian_kernel, _linalg
from latentem.models._seeding import kmeans_plusplus, random_from_data, squared_distances

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
INITS = ("kmeans++", "random_from_data", "random")
REG_COVAR_MODES = ("relative", "absolute")


class GaussianMixtureParams(NamedTuple):
    """Parameters of a Gaussian mixture, with scikit-learn's names and shapes.

    Attributes:
      weights: mixing proportions, shape ``(n_components,)``, non-negative, sum to one.
      means: component means, shape ``(n_components, n_features)``.
      covariances: ``(n_components, n_features, n_features)`` for ``"full"``,
        ``(n_features, n_features)`` for ``"tied"``, ``(n_components, n_features)`` for
        ``"diag"``, ``(n_components,)`` for ``"spherical"``.
    """

    weights: Array
    means: Array
    covariances: Array


class GaussianMixtureUnconstrained(NamedTuple):
    """Unconstrained coordinates of a Gaussian mixture, for gradient-based fitting.

    Attributes:
      logits: ``log(weights)`` up to a constant; weights are ``softmax(logits)``.
      means: the means, already unconstrained.
      scales: for ``"full"`` and ``"tied"``, the lower-triangular Cholesky factor of each
        covariance packed row by row, with the log of its diagonal, shape
        ``(..., n_features * (n_features + 1) // 2)``; for ``"diag"`` and
        ``"spherical"``, log-variances.
    """

    logits: Array
    means: Array
    scales: Array


# ---------------------------------------------------------------------------
# Layout and chunks
#
# Per-sample results (log densities, responsibilities) are states-first, shape
# (n_components, n_samples), with the samples on the minor (contiguous) axis: with a
# handful of components, that is what lets XLA vectorise on a CPU (several times faster
# than samples-first for batches of small fits). The engine computes the softmax
# states-first too, so the transposes at the interface cancel. Up to
# _ELEMENTWISE_MAX_FEATURES features the products over features are states-first too;
# above it they are GEMMs with the features last, and only their (k, c) results are
# transposed.
#
# The largest intermediates are (n_components, n_features, n_samples) blocks (the data
# projected by every component's precision factor, and deviations from every mean).
# Above the chunk budget they are formed a block of samples at a time, in a loop inside
# the compiled program, so memory stays linear in n_samples with a small constant and,
# on a CPU, the blocks stay in cache.
# ---------------------------------------------------------------------------

_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 31  # accelerators: few, large blocks keep the device busy

# Up to this many features, products over the feature axis are written as broadcast
# multiplies and sums, which XLA fuses with their neighbours into one loop over samples;
# a matrix product with a contraction of two or three is a poor fit for a GEMM kernel
# (the E-step of 1000 vmapped (500, 2, 3) fits: 4.9 ms as a GEMM, 1.2 ms fused, on a
# CPU). Above it, GEMM wins.
_ELEMENTWISE_MAX_FEATURES = 4

# Full and tied scatter matrices are one fused reduction per entry (_scatter_by_entries)
# up to _ELEMENTWISE_MAX_FEATURES features, and on a CPU up to this many for data of at
# least _SCATTER_BY_ENTRIES_MIN_VALUES values n k d: with the samples minor, each entry
# is a vectorised dot product of two contiguous rows, where a batched GEMM with a d x d
# output per component and a contraction over the samples runs at a fraction of its
# speed. On a 2-core CPU the scatter of (1e5, 8, 8) took 1.9 ms against 4.1 ms as a
# GEMM, (1e5, 16, 8) 7.3 against 9.1 ms, and at (1e5, 32, 16) they tie, with d(d+1)/2
# reductions to compile; in the fit, an EM iteration of (1e5, 8, 8) went from 8.3 to
# 6.7 ms, (1e5, 8, 16) from 22.3 to 13.6 ms, tied (1e5, 8, 8) from 8.1 to 5.6 ms. The
# 36 reductions of 8 features add about 0.3 s to a first fit's compile, which small
# fits would not win back: they keep the GEMM.
_SCATTER_BY_ENTRIES_MAX_FEATURES = {"cpu": 8}
_SCATTER_BY_ENTRIES_MIN_VALUES = 1 << 20

# On these backends, full and tied fits whose scatter is a GEMM (above) and of at least
# _ACTIVE_COMPONENTS_MIN_VALUES values n k d form the scatter of a block of samples for
# the components whose responsibilities there are not all zero, when they are at most
# this many and at most half of them (_scatter_of_active_components), and the model
# orders its samples once per fit so that blocks meet few components (_sample_order).
# A float32 responsibility is exactly zero from about 104 nats below the sample's best
# component (745 in float64), which separated clusters reach after a few iterations.
# On a 2-core AVX2 CPU at (1e5, 32, 16), float32, the benchmark's clusters: after 3
# iterations 86% of the responsibilities were zero, and each of the 49 blocks of 2048
# ordered samples met at most 4 components (in the data's own order, all 16); the
# scatter took 11 against 34 ms, an iteration 36 against 57 ms. On overlapping
# clusters, with no block to skip, 58 against 58 ms. At (1e5, 8, 8) the blocks met 6
# to 8 of 8 components even ordered, and the conditional slowed the scatter by entries
# (4.6 against 3.0 ms): fits that form it by entries keep every component.
_ACTIVE_COMPONENT_SLOTS = {"cpu": 4}
_ACTIVE_COMPONENTS_MIN_VALUES = 1 << 20
# Float64 fits keep every component and their order: their responsibilities are
# exactly zero only 745 nats down, and on the benchmark's clusters 11% were (86% in
# float32) and every block met all 16 components, so the ordering would cost its pass
# and its copy for nothing. (Their (1e5, 32, 16) iterations moved from 171-203 ms with
# the ordering to 216 ms without it in the benchmark runs of one session: the machine.)
_ACTIVE_COMPONENTS_MAX_BITS = 32

# On these backends, full and tied fits whose scatter would be formed by entries (five
# to eight features on a CPU, at least _SCATTER_BY_ENTRIES_MIN_VALUES values n k d)
# form the M-step's moments about the centres of blocks of this many samples
# (_block_centred_moments): the samples are grouped by landmark once per fit, each
# group padded to whole blocks with rows of weight zero, and the products of each
# sample's deviations from its block's centre formed once per fit, so that an
# iteration's moments are one GEMM over those and one fused reduction per block. On a
# 2-core AVX2 CPU, float32, an iteration of (1e5, 8, 8) took 3.5-3.7 against 4.7-4.9 ms
# by entries, (1e5, 8, 16) 7.6 against 9.7, (1e5, 6, 8) 2.6 against 3.3, (1e5, 5, 8)
# 2.3 against 2.8, (1e5, 8, 32) 16.1 against 20.5, (5e4, 8, 8) 1.7 against 2.5; on
# clusters of random anisotropic shapes (1e5, 8, 8) 3.6 against 4.7; in float64
# (1e5, 8, 8) 11.5 against 12.4. The grouping and products cost 17 ms once per fit at
# (1e5, 8) and 0.2 s at (1e6, 8), what about 15 iterations save. With four features or
# fewer (the E-step's fused multiply-sums) it was mixed, (1e5, 4, 8) 5.2 against 5.6
# ms, (1e5, 2, 16) 5.2 against 4.6: those keep the scatter by entries. Blocks of 128
# to 1024 samples timed alike. The block is halved (down to _BLOCK_CENTRED_MIN_SAMPLES)
# until the padding, at most block - 1 rows per group, is at most
# 1/_BLOCK_CENTRED_MAX_PADDING of the samples; where it cannot be, the fit forms its
# scatter by entries.
_BLOCK_CENTRED_SAMPLES = {"cpu": 512}
_BLOCK_CENTRED_MIN_SAMPLES = 64
_BLOCK_CENTRED_MAX_PADDING = 32
# An iteration whose moments about block centres would cancel to more than this many
# times the rounding of the centred form's (see _block_centred_moments) forms the
# scatter from deviations about the new means instead.
_BLOCK_CENTRED_MAX_CANCELLATION = 16.0

# From this many features the full-covariance E-step subtracts the projected means
# inside its GEMM (see _log_gaussian_density_by_state). On a 2-core AVX2 CPU the log
# densities of (1e5, 32, 16) took 58 against 89 ms, (1e5, 16, 8) 8.6-9.4 against 11.9
# ms; at (1e5, 8, 8) 4.8-5.1 against 4.6-4.7 ms, where the extra column costs more than
# the pass it saves (the threshold lies between the two sizes measured). The rounding is
# that of the subtraction after the product: both cancel U'(x - c) against U'(mu - c).
_FOLDED_MEANS_MIN_FEATURES = 12


def _scatter_by_entries_applies(n_samples: int, n_components: int, n_features: int) -> bool:
    """Whether full and tied scatter matrices are formed entry by entry (see above)."""
    if n_features <= _ELEMENTWISE_MAX_FEATURES:
        return True
    limit = _SCATTER_BY_ENTRIES_MAX_FEATURES.get(jax.default_backend(), _ELEMENTWISE_MAX_FEATURES)
    return n_features <= limit and n_samples * n_components * n_features >= _SCATTER_BY_ENTRIES_MIN_VALUES


# Backends on which full-covariance models get the fused EM iteration of
# _gaussian_kernel (one Pallas kernel per small fit; used where its sizes allow): on a
# GPU a batch of small fits is bound by memory bandwidth, and XLA's program reads the
# data and responsibilities in about seven passes where the kernel reads the data once.
_KERNEL_MODES = {"gpu": "compiled"}

# How a full-covariance fit forms its moments (the ``moments`` argument of
# ``gaussian_mixture``): from explicit deviations ("centred", two passes, as
# scikit-learn), or from the products of features ("expanded", _expanded_moments), which
# "auto" picks on the backends below for fits of at least _EXPANDED_MIN_VALUES values
# n k d. On an H100, an iteration at (1e6, 32, 64) took 24.4 ms centred at highest
# precision (21.3 ms at the default, TF32) and 8.3-8.5 ms expanded: XLA's batched
# products with a d x d result per component use a fraction of a GPU, where the
# expanded form is one large GEMM per step with half the FLOPs. There, at JAX's default
# precision, the centred products run in TF32 and the expanded ones (in float32) are
# also the more accurate. On a CPU the default products are float32 and the centred
# moments accurate to round-off, so "auto" keeps them; "expanded" is the opt-in there,
# with the accuracy of _expanded_cancellation. Since its products of features are formed
# once per fit (they depend on the data alone) rather than at every iteration, it is
# the faster form on a 2-core AMD EPYC without AVX-512: float32 (1e5, 8, 8) 5.3 against
# 9.1 ms per iteration centred, (1e5, 32, 16) 84 against 105 ms, in one benchmark run
# (forming the products at every iteration, 9.6-9.7 and 140 ms).
MOMENTS = ("auto", "centred", "expanded")
_EXPANDED_BACKENDS = ("gpu",)
_EXPANDED_MIN_VALUES = 1 << 22
# The products of features, n (d + 1)(d + 2) / 2 values, are formed in one piece and
# held for the whole fit: above this many the fit keeps the centred moments (memory).
_EXPANDED_MAX_FEATURE_VALUES = 1 << 30
# The expanded form is used for an iteration only when the whitened distances of the
# means from c, by which its terms typically exceed the sums they cancel to, are at
# most _EXPANDED_MAX_CANCELLATION (so it loses about 11 bits at most against the
# centred form, 2^-12 relative in float32 and 2^-41 in float64), and the terms' worst
# case |m|' |P| |m| is at most _EXPANDED_MAX_TERMS (_expanded_accurate). A bound of
# 2^-12 on eps times the distance in both dtypes let float64 fits lose up to 40 bits (a
# diagonal fit's variances 4.5e-6 off, with a cluster of standard deviation 1e-3 at 100
# from the data's mean, against 4e-15 centred). The worst case alone was too strict: on
# the GPU benchmark's data ((1e6, 32, 64) float32, 20 iterations in) it reached 4500,
# with the whitened distance at 780, where the expanded iteration's covariances were
# off by 5.3e-4 in whitened units against the centred float32 iteration's 1.8e-4. The
# worst case catches narrow correlated components, whose whitened distances are small.
_EXPANDED_MAX_CANCELLATION = 2.0**11
_EXPANDED_MAX_TERMS = 2.0**16
# On these backends the moments (w r)' phi, one contraction over every sample with a
# small (k, F) result, are a batched product over blocks of this many samples and a sum
# of the blocks' results: as one GEMM, the long contraction leaves most of a GPU idle.
# At (1e6, 32, 64) on an H200 (float32, highest precision) an EM iteration (a scratch
# replica of this step, products formed once) took 4.96 ms with one GEMM, 3.90 / 3.55 /
# 3.63 ms with blocks of 15625 / 4000 / 1000 samples; on a 2-core CPU blocks were slower
# (80 against 62 ms at (64000, 32, 64)). The products of features are padded once per
# fit with rows of weight zero to a multiple of the block.
_EXPANDED_BLOCK_SAMPLES = {"gpu": 4096}

# Diagonal and spherical fits expanded (_diagonal_expanded_moments): the E-step's
# quadratic forms and the M-step's moments as two matrix products over the squares and
# values of y = x - c, formed once per fit, where the centred form reduces (k, d, n)
# deviations elementwise. "auto" takes it on these backends for float64 fits of at
# least this many values n k d, with the same guard as the full expanded form
# (_diagonal_expanded_cancellation). benchmarks/single.py --diagonal on a 2-core AMD EPYC,
# per iteration with latentem's compiler options: float64 (1e5, 8, 8) 3.9 against 5.9
# ms centred, (1e5, 32, 16) 16.4 against 24.3; float32 1.3 against 2.3 and 5.1
# against 10.7. At (1e5, 100, 10) a narrow component far from the data's mean trips
# the guard in either dtype (sum_j m_j^2 / sigma_j^2 reached 2e6 by the fourth
# iteration, limit 2^11), and the fallback runs as fast as the plain centred iteration
# (float32 24 against 25 ms, float64 61 and 61; 44 ms in float32 before it was given
# the transposed data, see _DiagonalExpandedData). The guard limits the bits lost,
# whatever the dtype: in float64 "auto" takes the expanded form where it loses at most
# 11 of 53 bits (2^-41 relative); a float32 fit keeps the centred form, accurate to
# round-off, unless asked for moments="expanded" (up to 2^-12 relative, guarded), as a
# full one does.
# Below about 2^18 values the two forms were within a factor 2 either way ((1e4, 2,
# 3): 0.21 against 0.11 ms). Not on a GPU until timed there.
_DIAGONAL_EXPANDED_BACKENDS = ("cpu",)
_DIAGONAL_EXPANDED_MIN_VALUES = 1 << 18


def _chunk_size(n_samples: int, elements_per_sample: int) -> int:
    """Samples per chunk so that a block holds at most the backend's chunk budget."""
    budget = _CHUNK_ELEMENTS.get(jax.default_backend(), _DEFAULT_CHUNK_ELEMENTS)
    return n_samples if n_samples * elements_per_sample <= budget else max(8, budget // elements_per_sample)


def _map_sample_chunks(fn, x: Array, chunk: int, samples_first: bool = False) -> Array:
    """``fn(x)`` for an ``fn`` mapping rows ``(c, d)`` to columns ``(k, c)``, in chunks.

    With ``samples_first`` ``fn`` returns ``(c, k)`` instead; the chunks are then
    written as contiguous rows of an ``(n, k)`` buffer, which is transposed once at the
    end (writing each chunk transposed into a ``(k, n)`` buffer cost a sixth of an
    iteration at (1e5, 8, 8) on a CPU).
    """
    n_samples = x.shape[0]
    if chunk >= n_samples:
        return fn(x).T if samples_first else fn(x)
    output = jax.eval_shape(fn, x[:chunk])
    axis = 0 if samples_first else 1

    def one_chunk(i: Array, out: Array) -> Array:
        # The last chunk is shifted back to end at n_samples; samples it repeats get the
        # same values.
        start = jnp.minimum(i * chunk, n_samples - chunk)
        rows = jax.lax.dynamic_slice_in_dim(x, start, chunk)
        return jax.lax.dynamic_update_slice_in_dim(out, fn(rows), start, axis)

    shape = (n_samples, output.shape[1]) if samples_first else (output.shape[0], n_samples)
    result = jax.lax.fori_loop(0, -(-n_samples // chunk), one_chunk, jnp.zeros(shape, output.dtype))
    return result.T if samples_first else result


def _sum_sample_chunks(fn, x: Array, responsibilities: Array, chunk: int, sample_axis: int = 0):
    """``fn(x, responsibilities)`` for an ``fn`` that sums over samples, in chunks;
    ``x`` is ``(n, d)`` (or ``(d, n)`` with ``sample_axis=1``) and ``responsibilities``
    states-first, ``(k, n)``."""
    n_samples = x.shape[sample_axis]
    if chunk >= n_samples:
        return fn(x, responsibilities)

    def one_chunk(i: Array, total):
        start = jnp.minimum(i * chunk, n_samples - chunk)
        # Samples of a shifted last chunk that an earlier chunk already counted get weight 0.
        fresh = (start + jnp.arange(chunk)) >= i * chunk
        part = jax.lax.dynamic_slice_in_dim(responsibilities, start, chunk, axis=1)
        part = jnp.where(fresh[None, :], part, jnp.zeros_like(part))
        value = fn(jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=sample_axis), part)
        return jax.tree_util.tree_map(jnp.add, total, value)

    shapes = jax.eval_shape(
        fn, jax.lax.slice_in_dim(x, 0, chunk, axis=sample_axis), responsibilities[:, :chunk]
    )
    initial = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
    return jax.lax.fori_loop(0, -(-n_samples // chunk), one_chunk, initial)


# ---------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------


def precision_cholesky(covariances: Array, covariance_type: str) -> Array:
    r"""Cholesky factor :math:`U` of each precision, :math:`\Sigma^{-1} = U U^\top`.

    ``U`` is upper triangular (``"full"``/``"tied"``) or the inverse standard
    deviations (``"diag"``/``"spherical"``), as scikit-learn's
    ``_compute_precision_cholesky``. A covariance that is not positive definite gives
    NaN, which the engine reports as ``Status.NONFINITE``.
    """
    if covariance_type in ("full", "tied") and covariances.shape[-1] <= _ELEMENTWISE_MAX_FEATURES:
        return _small_precision_cholesky(covariances)
    if covariance_type in ("full", "tied"):
        lower = jnp.linalg.cholesky(covariances)
        return jnp.swapaxes(_linalg.lower_triangular_inverse(lower), -1, -2)
    return jax.lax.rsqrt(covariances)


def _small_precision_cholesky(covariances: Array) -> Array:
    r"""``precision_cholesky`` of ``(..., d, d)`` covariances with ``d`` at most
    ``_ELEMENTWISE_MAX_FEATURES``, written out entry by entry.

    The Cholesky factor, column by column,
    :math:`L_{jj} = (\Sigma_{jj} - \sum_{m<j} L_{jm}^2)^{1/2}`,
    :math:`L_{ij} = (\Sigma_{ij} - \sum_{m<j} L_{im} L_{jm}) / L_{jj}`, then its inverse
    by forward substitution, :math:`X_{ii} = 1 / L_{ii}`,
    :math:`X_{ij} = -\sum_{j \le m < i} L_{im} X_{mj} / L_{ii}`, and :math:`U = X^\top`.
    These are elementwise operations over the leading axes, which XLA fuses: for
    thousands of 2x2 or 3x3 matrices (a batch of small fits) that is cheaper than one
    LAPACK or cuSOLVER call per matrix. As ``jnp.linalg.cholesky``, the off-diagonal
    entries are the mean of the two triangles, and a matrix that is not positive
    definite gives NaN.
    """
    n_features = covariances.shape[-1]

    def entry(i: int, j: int) -> Array:
        if i == j:
            return covariances[..., i, i]
        return 0.5 * (covariances[..., i, j] + covariances[..., j, i])

    lower: dict[tuple[int, int], Array] = {}
    for j in range(n_features):
        lower[j, j] = jnp.sqrt(entry(j, j) - sum(jnp.square(lower[j, m]) for m in range(j)))
        for i in range(j + 1, n_features):
            lower[i, j] = (entry(i, j) - sum(lower[i, m] * lower[j, m] for m in range(j))) / lower[j, j]
    inverse: dict[tuple[int, int], Array] = {}
    for i in range(n_features):
        inverse[i, i] = 1 / lower[i, i]
        for j in range(i):
            inverse[i, j] = -sum(lower[i, m] * inverse[m, j] for m in range(j, i)) / lower[i, i]
    zero = jnp.zeros_like(covariances[..., 0, 0])
    rows = [
        jnp.stack([inverse[c, r] if c >= r else zero for c in range(n_features)], axis=-1)
        for r in range(n_features)
    ]
    return jnp.stack(rows, axis=-2)


def _full_whitening(params: GaussianMixtureParams) -> tuple[Array, Array, Array, Array]:
    r"""For full covariances: the reference :math:`c` (the mixture mean), precision
    factors :math:`U_k`, projected means :math:`U_k^\top (\mu_k - c)` and
    :math:`\log |U_k|`, what both the E-step and the fused GPU kernel whiten with."""
    reference = params.weights @ params.means
    factor = precision_cholesky(params.covariances, "full")
    projected_means = jnp.einsum("kd,kde->ke", params.means - reference[None, :], factor)
    log_det = jnp.sum(jnp.log(jnp.diagonal(factor, axis1=1, axis2=2)), axis=1)
    return reference, factor, projected_means, log_det


def _log_gaussian_density_by_state(x: Array, params: GaussianMixtureParams, covariance_type: str) -> Array:
    """``log N(x_n | mu_k, Sigma_k)``, states first: shape ``(n_components, n_samples)``.

    Mahalanobis distances are sums of squares of whitened deviations, as in
    scikit-learn. Data and means are first shifted by the mixture mean (a point inside
    the data), so that float32 data far from the origin keep their precision.
    """
    means = params.means
    n_components, n_features = means.shape
    elementwise = n_features <= _ELEMENTWISE_MAX_FEATURES
    if covariance_type == "full":
        reference, factor, projected_means, log_det = _full_whitening(params)
    else:
        reference = params.weights @ means
        factor = precision_cholesky(params.covariances, covariance_type)
    centred_means = means - reference[None, :]
    if covariance_type == "full" and elementwise:

        def mahalanobis(rows: Array) -> Array:
            return _whitened_squares(factor, projected_means, (rows - reference[None, :]).T)

    elif covariance_type == "full":
        # One (c, d) @ (d, e k) product per chunk projects the samples for every
        # component, samples first, its columns ordered by whitened coordinate e and
        # then component k: the sum of squares over e then adds whole rows of k
        # contiguous values, where summing each component's e values within a row
        # vectorised poorly (log densities of (1e5, 8, 8) 3.3-3.4 against 4.5-5.0 ms on
        # a 2-core AVX2 CPU). From _FOLDED_MEANS_MIN_FEATURES features a column of ones
        # against the projected means subtracts those in the same product, and the sum
        # of squares reads the product alone.
        stacked = jnp.transpose(factor, (1, 2, 0)).reshape(n_features, n_features * n_components)
        folded = n_features >= _FOLDED_MEANS_MIN_FEATURES
        if folded:
            stacked = jnp.concatenate([stacked, -projected_means.T.reshape(1, -1)])

        def mahalanobis(rows: Array) -> Array:
            centred_rows = rows - reference[None, :]
            if folded:
                ones = jnp.ones((rows.shape[0], 1), rows.dtype)
                centred_rows = jnp.concatenate([centred_rows, ones], axis=1)
            projected = (centred_rows @ stacked).reshape(rows.shape[0], n_features, n_components)
            if not folded:
                projected = projected - projected_means.T[None, :, :]
            return jnp.sum(jnp.square(projected), axis=1)

    elif covariance_type == "tied":
        projected_means = centred_means @ factor

        def mahalanobis(rows: Array) -> Array:
            rows_centred = rows - reference[None, :]
            if elementwise:
                return _whitened_squares(factor[None], projected_means, rows_centred.T)
            projected = rows_centred @ factor  # (c, d), samples-first as for "full"
            return jnp.sum(jnp.square(projected[:, :, None] - projected_means.T[None, :, :]), axis=1)

        log_det = jnp.broadcast_to(jnp.sum(jnp.log(jnp.diagonal(factor))), (n_components,))
    else:
        # Elementwise differences reduced over features: XLA fuses them into one loop.
        scale = factor if covariance_type == "diag" else jnp.broadcast_to(factor[:, None], means.shape)

        def mahalanobis(rows: Array) -> Array:
            deviations = (rows - reference[None, :]).T[None, :, :] - centred_means[:, :, None]
            return jnp.sum(jnp.square(deviations * scale[:, :, None]), axis=1)

        log_det = jnp.sum(jnp.log(scale), axis=1)
    chunk = _chunk_size(x.shape[0], n_components * n_features)
    # The GEMM paths give (c, k) blocks, the others (k, c).
    samples_first = covariance_type in ("full", "tied") and not elementwise
    distances = _map_sample_chunks(mahalanobis, x, chunk, samples_first=samples_first)
    return -0.5 * (n_features * math.log(2 * math.pi) + distances) + log_det[:, None]


# ---------------------------------------------------------------------------
# Moments
# ---------------------------------------------------------------------------


def _whitened_squares(factor: Array, projected_means: Array, centred: Array) -> Array:
    """``sum_e ((U_k^T x_c)_e - (U_k^T mu_k)_e)^2``, shape ``(k, c)``, for a few features,
    one whitened coordinate ``e`` at a time as fused multiply-adds over ``d``. ``factor``
    is ``(k or 1, d, e)``, ``centred`` the samples ``(d, c)``."""
    n_features = centred.shape[0]
    squares = 0
    for e in range(n_features):
        projected = sum(factor[:, d, e][:, None] * centred[d][None, :] for d in range(n_features))
        squares = squares + jnp.square(projected - projected_means[:, e][:, None])
    return squares


def _first_weighted_row(x: Array, sample_weights: Array) -> Array:
    """A sample with positive weight: a shift that lies inside the data."""
    return x[jnp.argmax(sample_weights > 0)]


def _is_round_off(variances: Array, second_moments: Array) -> Array:
    """Variances indistinguishable from zero: below the rounding of their second moments.

    The variance of identical values, computed about a mean that is itself rounded, is
    of order ``(eps * |x - c|)^2``; anything below ``16 eps^2`` times the second moment
    about ``c`` is that, not spread in the data.
    """
    return variances <= 16 * jnp.square(jnp.finfo(variances.dtype).eps) * second_moments


def _regulariser_scale(variances: Array, second_moments: Array) -> Array:
    """Feature variances for the relative regulariser, constant features replaced by the
    mean variance of the others (or 1 when every feature is constant), so that the
    regulariser stays positive."""
    constant = _is_round_off(variances, second_moments)
    n_varying = jnp.sum(~constant).astype(variances.dtype)
    fallback = jnp.where(
        n_varying > 0, jnp.sum(jnp.where(constant, 0, variances)) / jnp.maximum(n_varying, 1), 1
    )
    return jnp.where(constant, fallback, variances)


def feature_variances(x: Array, sample_weights: Array) -> Array:
    """Weighted variance of each feature, shape ``(n_features,)``, constant features
    replaced as in ``_regulariser_scale``."""
    centred = x - _first_weighted_row(x, sample_weights)[None, :]
    # Rows of zero weight are zeroed: a large one squared overflows, and 0 * inf is NaN.
    centred = jnp.where((sample_weights > 0)[:, None], centred, 0)
    total = sample_weights.sum()
    mean = (sample_weights @ centred) / total
    second = (sample_weights @ jnp.square(centred)) / total
    return _regulariser_scale(jnp.maximum(second - jnp.square(mean), 0), second)


def _check_params(params: GaussianMixtureParams, n_components: int, covariance_type: str) -> None:
    """A ``ValueError`` for parameters of another mixture (``check_param_shapes``)."""
    check_param_fields(
        params,
        GaussianMixtureParams._fields,
        f"gaussian_mixture({n_components}, covariance_type={covariance_type!r})",
    )
    n_features = params.means.shape[-1]
    covariance_shape = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]
    check_param_shapes(
        params,
        {"means": (n_components, n_features), "weights": (n_components,), "covariances": covariance_shape},
        f"gaussian_mixture({n_components}, covariance_type={covariance_type!r}) with {n_features} features",
    )


def _covariances_from_variances(variances: Array, n_components: int, covariance_type: str) -> Array:
    """Covariances of the given per-feature variances, in the shape of a covariance type."""
    if covariance_type == "full":
        return jnp.broadcast_to(jnp.diag(variances), (n_components, *2 * variances.shape))
    if covariance_type == "tied":
        return jnp.diag(variances)
    if covariance_type == "diag":
        return jnp.broadcast_to(variances, (n_components, variances.shape[0]))
    return jnp.broadcast_to(jnp.mean(variances), (n_components,))


def _scatter(
    x: Array,
    responsibilities: Array,
    centred_means: Array,
    reference: Array,
    covariance_type: str,
    transposed: Array | None = None,
):
    """Weighted scatter about the new means, sum_n r_kn (x_n - mu_k)(x_n - mu_k)^T (or its
    diagonal for diag and spherical covariances), from explicit deviations (two passes,
    as scikit-learn), so that it is positive semi-definite to round-off.
    ``responsibilities`` are states-first, ``(k, n)``; ``transposed`` is ``x.T`` where
    the caller formed it once per fit (in a conditional's branch, XLA does not hoist
    the transpose out of the EM loop)."""
    n_samples = x.shape[0]
    n_components, n_features = centred_means.shape
    chunk = _chunk_size(n_samples, n_components * n_features)
    if covariance_type in ("full", "tied") and not _scatter_by_entries_applies(
        n_samples, n_components, n_features
    ):

        def scatter_of_block(rows: Array, weights: Array, centred_means: Array, reference: Array) -> Array:
            # Features last for the GEMMs (as in the E-step): (k, c, d). Deviations
            # scaled by the square roots of the weights make the scatter a Gram
            # matrix, one operand read twice: on a 2-core AVX2 CPU the scatter of
            # (1e5, 32, 16) took 62 against 83 ms with weighted and plain deviations.
            scaled = jnp.sqrt(weights)[:, :, None] * (
                (rows - reference[None, :])[None, :, :] - centred_means[:, None, :]
            )
            if covariance_type == "full":
                return jnp.einsum("kci,kcj->kij", scaled, scaled)
            flat = scaled.reshape(-1, n_features)
            return flat.T @ flat

        data, sample_axis = x, 0
    else:

        def scatter_of_block(columns: Array, weights: Array, centred_means: Array, reference: Array) -> Array:
            deviations = (columns - reference[:, None])[None, :, :] - centred_means[:, :, None]  # (k, d, c)
            weighted = weights[:, None, :] * deviations
            if covariance_type in ("full", "tied"):
                return _scatter_by_entries(weighted, deviations, tied=covariance_type == "tied")
            return jnp.sum(weighted * deviations, axis=2)

        # Features first, transposed once: every reduction then reads contiguous samples
        # (transposing each block inside the reductions made them strided, and the
        # scatter of (1e5, 8, 8) slower than the GEMM's). Behind an optimisation
        # barrier, XLA hoists the transposed copy out of the EM loop, where a bare
        # transpose (which its loop-invariant code motion leaves in place as not worth
        # hoisting) was copied at every iteration: 0.5-0.7 ms of a (1e5, 8, 8)
        # iteration's XLA operations on a 2-core CPU, once per fit now.
        data, sample_axis = (optimization_barrier(x.T) if transposed is None else transposed), 1

    slots = _active_component_slots(n_samples, n_components, n_features, covariance_type, x.dtype)
    if slots is None:
        block_scatter = functools.partial(scatter_of_block, centred_means=centred_means, reference=reference)
    else:
        block_scatter = functools.partial(
            _scatter_of_active_components,
            scatter_of_block,
            slots,
            covariance_type == "tied",
            centred_means=centred_means,
            reference=reference,
        )
    return _sum_sample_chunks(block_scatter, data, responsibilities, chunk, sample_axis=sample_axis)


def _active_component_slots(
    n_samples: int, n_components: int, n_features: int, covariance_type: str, dtype
) -> int | None:
    """How many components a block of samples may have with responsibilities other than
    zero for its scatter to be computed for those alone (see
    _ACTIVE_COMPONENT_SLOTS); None where every block computes every component's."""
    slots = _ACTIVE_COMPONENT_SLOTS.get(jax.default_backend())
    if (
        slots is None
        or jnp.finfo(dtype).bits > _ACTIVE_COMPONENTS_MAX_BITS
        or covariance_type not in ("full", "tied")
        or _scatter_by_entries_applies(n_samples, n_components, n_features)
        or n_samples * n_components * n_features < _ACTIVE_COMPONENTS_MIN_VALUES
    ):
        return None
    slots = min(slots, n_components // 2)
    return slots if slots >= 1 else None


def _scatter_of_active_components(
    scatter_of_block,
    slots: int,
    tied: bool,
    data: Array,
    weights: Array,
    *,
    centred_means: Array,
    reference: Array,
) -> Array:
    """``scatter_of_block(data, weights, centred_means, reference)`` for a block of
    samples, computed for the components whose weights in the block are not all zero
    when there are at most ``slots`` of them.

    A component whose responsibilities are all exactly zero over the block adds
    exactly zero to its scatter, so leaving it out changes nothing; with the samples
    grouped by where they lie (``_sample_order``), most blocks of a fit of separated
    clusters meet a few components. Their weights and means are gathered into
    ``slots`` slots (unused slots get weight zero) and their results added back at their
    indices; a block with more active components computes all of them.
    """
    n_components = weights.shape[0]
    active = jnp.any(weights > 0, axis=1)

    def of_active(data, weights, centred_means, reference, active):
        index = jnp.nonzero(active, size=slots, fill_value=0)[0]
        used = jnp.arange(slots) < jnp.sum(active)
        part = jnp.where(used[:, None], weights[index], 0)
        result = scatter_of_block(data, part, centred_means[index], reference)
        if tied:  # summed over the components already
            return result
        return jnp.zeros((n_components, *result.shape[1:]), result.dtype).at[index].add(result)

    def of_all(data, weights, centred_means, reference, active):
        return scatter_of_block(data, weights, centred_means, reference)

    few = jnp.sum(active) <= slots
    return _batch_aware_cond(few, of_active, of_all, data, weights, centred_means, reference, active)


class _GroupedData(NamedTuple):
    """The data and sample weights with the samples in the order of ``_sample_order``,
    formed once per fit (the model's ``fused_prepare``)."""

    x: Array
    weights: Array


def _sample_order(x: Array, n_groups: int) -> Array:
    r"""A permutation of the samples that puts samples lying near each other together:
    sorted by ``_landmark_groups``, stably.

    On separated clusters a block of consecutive samples then meets few components and
    ``_scatter_of_active_components`` skips the rest. ``n_groups`` passes over ``x``
    and one sort, memory linear in ``n_samples``: on a 2-core CPU 36 ms at (1e5, 32)
    with 16 groups, 1.0 s at (1e6, 32) with 64 (about 0.6 and 0.25 of an EM iteration).
    Deterministic; the order changes the results of a fit only by the rounding of its
    sums.
    """
    return jnp.argsort(_landmark_groups(x, n_groups), stable=True)


def _landmark_groups(x: Array, n_groups: int) -> Array:
    r"""Each sample's group, ``(n,)`` integers below ``n_groups``: its nearest landmark.

    ``n_groups`` landmarks are chosen by farthest-point traversal (the first sample,
    then each time the sample farthest from every landmark so far), and each sample is
    labelled with its nearest landmark as they are chosen. On separated clusters the
    traversal visits every cluster before it visits one twice, so with at least as many
    groups as clusters no group spans two clusters.
    """

    def add_landmark(label: int, state: tuple[Array, Array]) -> tuple[Array, Array]:
        distance, group = state
        landmark = x[jnp.argmax(distance)]
        to_landmark = jnp.sum(jnp.square(x - landmark[None, :]), axis=1)
        closer = to_landmark < distance
        return jnp.where(closer, to_landmark, distance), jnp.where(closer, label, group)

    distance = jnp.sum(jnp.square(x - x[0][None, :]), axis=1)
    group = jnp.zeros(x.shape[0], jnp.int32)
    _, group = jax.lax.fori_loop(1, n_groups, add_landmark, (distance, group))
    return group


def _scatter_by_entries(weighted: Array, deviations: Array, tied: bool) -> Array:
    """``einsum("kic,kjc->kij")`` (summed over ``k`` too when ``tied``) for a few
    features, or ``einsum("k...ic,k...jc->kij")`` for operands with axes of samples
    between (blocks of them): one fused reduction per entry of the lower triangle,
    mirrored. Faster on a
    CPU than a GEMM with a tiny output or one reduction over a 4-D broadcast (which
    XLA re-reads for every output entry). With the fused E-step, an iteration of 1000
    vmapped (500, 2, 3) fits went from 11.4 to 6.7 ms on a 2-core CPU."""
    n_features = weighted.shape[-2]
    axes = tuple(range(0 if tied else 1, weighted.ndim - 1))  # all but k (and the feature)
    entries = {}
    for i in range(n_features):
        for j in range(i + 1):
            entries[i, j] = entries[j, i] = jnp.sum(weighted[..., i, :] * deviations[..., j, :], axis=axes)
    rows = [jnp.stack([entries[i, j] for j in range(n_features)], axis=-1) for i in range(n_features)]
    return jnp.stack(rows, axis=-2)


def _add_to_diagonal(covariances: Array, amount: Array, covariance_type: str) -> Array:
    """Add ``amount`` to the diagonal of each covariance; ``amount`` has the shape of a
    diagonal covariance of the type: (k, d) for full and diag, (d,) tied, (k,) spherical."""
    if covariance_type == "full":
        return (
            covariances + amount[:, :, None] * jnp.eye(covariances.shape[-1], dtype=covariances.dtype)[None]
        )
    if covariance_type == "tied":
        return covariances + jnp.diag(amount)
    return covariances + amount


def _gaussian_m_step(
    x: Array,
    responsibilities: Array,
    params: GaussianMixtureParams,
    covariance_type: str,
    reg_covar: float,
    reg_covar_mode: str,
    transposed: Array | None = None,
) -> GaussianMixtureParams:
    """Weighted maximum-likelihood parameters from weighted responsibilities.

    ``transposed``: ``x.T``, where the caller holds it already (see ``_scatter``)."""
    dtype = responsibilities.dtype
    x = x.astype(dtype)
    n_features = x.shape[1]
    responsibilities = responsibilities.T  # states first (see "Layout and chunks")
    counts = responsibilities.sum(axis=1)  # (k,)
    total = counts.sum()
    # A component with (numerically) no mass keeps its parameters: the expected
    # complete-data log-likelihood does not depend on them, so any value maximises it.
    empty = counts <= jnp.finfo(dtype).eps * total
    safe_counts = jnp.where(empty, 1, counts)

    # Shift by the previous mixture mean (inside the data) before forming moments.
    reference = (params.weights @ params.means).astype(dtype)
    centred = x - reference[None, :]
    elementwise = n_features <= _ELEMENTWISE_MAX_FEATURES
    if elementwise:  # fused multiply-sums (see _ELEMENTWISE_MAX_FEATURES)
        sums = jnp.sum(responsibilities[:, None, :] * centred.T[None, :, :], axis=2)
    else:
        sums = responsibilities @ centred
    centred_means = sums / safe_counts[:, None]
    scatter = _scatter(x, responsibilities, centred_means, reference, covariance_type, transposed)
    return _m_step_from_moments(
        counts,
        total,
        reference,
        centred_means,
        scatter,
        _data_second_moments(scatter, counts, centred_means, total, covariance_type),
        params,
        covariance_type,
        reg_covar,
        reg_covar_mode,
    )


def _data_second_moments(
    scatter: Array, counts: Array, centred_means: Array, total: Array, covariance_type: str
) -> Array:
    r"""The data's own second moments about the reference, per feature, from the
    moments at hand: a sample's weight is the sum of its responsibilities, so
    :math:`\sum_n w_n (x_{nj} - c_j)^2 = \sum_k (S_{k,jj} + N_k m_{kj}^2)`, a sum of
    non-negative terms (``scatter`` of a tied fit is summed over components already).

    That saves the M-step a pass over x and two over the responsibilities: on a 2-core
    AVX2 CPU the M-step of (1e5, 8, 8) took 6.0-6.6 against 6.7-7.2 ms, and a diag fit
    of (1e5, 32, 16) 28-29 against 35-38 ms per iteration.
    """
    diagonal = jnp.diagonal(scatter, axis1=-2, axis2=-1) if covariance_type in ("full", "tied") else scatter
    within = diagonal if covariance_type == "tied" else diagonal.sum(axis=0)
    return (within + counts @ jnp.square(centred_means)) / total


def _m_step_from_moments(
    counts: Array,
    total: Array,
    reference: Array,
    centred_means: Array,
    scatter: Array,
    second_moments: Array,
    params: GaussianMixtureParams,
    covariance_type: str,
    reg_covar: float,
    reg_covar_mode: str,
) -> GaussianMixtureParams:
    """The M-step from the moments of the samples about ``reference`` (the fields of
    ``_gaussian_kernel.Moments``): covariances, round-off, regulariser, empty components."""
    dtype = counts.dtype
    n_features = centred_means.shape[1]
    empty = counts <= jnp.finfo(dtype).eps * total
    safe_counts = jnp.where(empty, 1, counts)
    if covariance_type == "full":
        covariances = scatter / safe_counts[:, None, None]
    elif covariance_type == "tied":
        covariances = scatter / total
    else:
        covariances = scatter / safe_counts[:, None]
        if covariance_type == "spherical":
            covariances = jnp.mean(covariances, axis=1)

    data_variances = jnp.maximum(second_moments - jnp.square(counts @ centred_means / total), 0)
    # Variances at round-off level are zero: identical points give an exactly singular
    # covariance (reported, with reg_covar = 0), not a finite one of size eps^2.
    if covariance_type in ("full", "tied"):
        covariances = 0.5 * (covariances + jnp.swapaxes(covariances, -1, -2))
        scale = second_moments if covariance_type == "tied" else second_moments[None, :]
        spread = ~_is_round_off(jnp.diagonal(covariances, axis1=-2, axis2=-1), scale)
        covariances = covariances * (spread[..., :, None] & spread[..., None, :]).astype(dtype)
    elif covariance_type == "diag":
        covariances = jnp.where(_is_round_off(covariances, second_moments[None, :]), 0, covariances)
    else:
        covariances = jnp.where(_is_round_off(covariances, jnp.mean(second_moments)), 0, covariances)

    if reg_covar_mode == "relative":
        regulariser = reg_covar * _regulariser_scale(data_variances, second_moments)
    else:
        regulariser = jnp.full((n_features,), reg_covar, dtype)
    if covariance_type in ("full", "tied") and reg_covar > 0:
        # Plus a round-off floor, d * eps * Sigma_jj, on each diagonal entry: a computed
        # scatter matrix is exact only to that level relative to its diagonal, and in
        # float32 (eps ~ 1e-7, close to reg_covar = 1e-6) rounding could otherwise make
        # a nearly singular covariance indefinite. It scales with each feature, so the
        # fit stays equivariant to units. (Diagonal variances are sums of non-negative
        # terms and need none; with reg_covar = 0 a singular covariance is reported.)
        round_off = n_features * jnp.finfo(dtype).eps * jnp.diagonal(covariances, axis1=-2, axis2=-1)
        regulariser = (regulariser[None, :] if covariance_type == "full" else regulariser) + round_off
    if covariance_type in ("full", "diag"):
        regulariser = jnp.broadcast_to(regulariser, (covariances.shape[0], n_features))
    elif covariance_type == "spherical":
        regulariser = jnp.mean(regulariser)
    covariances = _add_to_diagonal(covariances, regulariser, covariance_type)

    means = jnp.where(empty[:, None], params.means, centred_means + reference[None, :])
    if covariance_type != "tied":
        keep = empty.reshape(empty.shape + (1,) * (covariances.ndim - 1))
        covariances = jnp.where(keep, params.covariances, covariances)
    return GaussianMixtureParams(weights=counts / total, means=means, covariances=covariances)


# ---------------------------------------------------------------------------
# Expanded moments
# ---------------------------------------------------------------------------


def _product_features(centred: Array) -> Array:
    r"""Products of features :math:`\phi(y) = (y_i y_j \text{ for } i \le j,\ y,\ 1)`
    of each row, shape ``(n, (d + 1)(d + 2) / 2)``; the products as in
    ``_products_of_pairs``."""
    ones = jnp.ones((centred.shape[0], 1), centred.dtype)
    return jnp.concatenate([_products_of_pairs(centred), centred, ones], axis=1)


def _products_of_pairs(centred: Array) -> Array:
    """``y_i y_j`` for ``i <= j`` of each row ``y``, shape ``(n, d (d + 1) / 2)``, in the
    row-major order of ``np.triu_indices(d)``."""
    n_features = centred.shape[1]
    return jnp.concatenate([centred[:, i:] * centred[:, i : i + 1] for i in range(n_features)], axis=1)


class _ExpandedData(NamedTuple):
    """What the expanded moments need of the data, formed once per fit (the model's
    ``fused_prepare``): the reference :math:`c` (the data's weighted mean), the
    products of features of :math:`x - c` and the sample weights, both padded with
    rows of weight zero to a multiple of the backend's block of samples."""

    reference: Array
    features: Array
    weights: Array


def _weighted_mean(x: Array, weights: Array) -> Array:
    """The data's weighted mean, ``(d,)``: the reference the prepared moments are
    formed about."""
    return (weights @ x) / jnp.sum(weights)


def _expanded_data(x: Array, weights: Array) -> _ExpandedData:
    """``_ExpandedData`` of ``x`` (``(n, d)``) and ``weights`` (``(n,)``)."""
    reference = _weighted_mean(x, weights)
    centred = x - reference[None, :]
    block = _EXPANDED_BLOCK_SAMPLES.get(jax.default_backend())
    if block is not None and x.shape[0] > block:
        padding = -x.shape[0] % block
        centred = jnp.pad(centred, ((0, padding), (0, 0)))
        weights = jnp.pad(weights, (0, padding))
    return _ExpandedData(reference, _product_features(centred), weights)


def _expanded_applies(n_samples: int, n_components: int, n_features: int, always: bool) -> bool:
    """Whether an iteration may use the expanded moments (static sizes)."""
    size = n_samples * (n_features + 1) * (n_features + 2) // 2
    if size > _EXPANDED_MAX_FEATURE_VALUES:
        return False
    return always or n_samples * n_components * n_features >= _EXPANDED_MIN_VALUES


# Default matmul precisions that ask for float32-accurate products.
_FLOAT32_PRECISIONS = frozenset(
    {"highest", "float32", "F32_F32_F32", "TF32_TF32_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X9"}
)


def _float32_products_requested() -> bool:
    """Whether ``jax.default_matmul_precision`` asks for float32-accurate products (read
    at trace time; part of ``jax.jit``'s cache key). ``moments="auto"`` then keeps the
    centred moments: at (1e6, 32, 64) on an H100, 25 float32 iterations of the expanded
    form were 7.7e-5 (relative) from float64 in the covariances where the centred ones
    were 3.9e-6. At the default precision (TF32 on a GPU) the centred iteration's error
    is 2.0e-3 and the expanded one's, with its float32 products, 7.8e-5."""
    precision = jax.config.jax_default_matmul_precision
    return str(getattr(precision, "name", precision)) in _FLOAT32_PRECISIONS


def _expanded_cancellation(params: GaussianMixtureParams, reference: Array, factor: Array) -> Array:
    r""":math:`\max_k m_k^\top P_k m_k`, :math:`m_k = \mu_k - c`, :math:`P_k = \Sigma_k^{-1}`:
    by about this factor the expanded form's terms exceed the sums they cancel to, so
    its relative rounding error is about ``eps`` times it.

    Expanded about :math:`c`, the log density of a sample near :math:`\mu_k` is a sum
    of terms of about this size that cancel to one of size :math:`d`, and the covariance
    :math:`Q_k / N_k - m_k m_k^\top` loses the same factor against the centred scatter:
    a component far from the data's mean in units of its own spread is where the
    expansion loses digits. Measured in float32 against float64, one iteration's
    covariances were off by 2.5e-6 (relative to the largest entry; 2.5e-7 centred) on
    the benchmark data, where eps times this is 1.5e-4, and by 3.4e-3 (5.4e-7 centred)
    on clusters 40 standard deviations apart, where it is 2e-3.
    """
    projected = jnp.einsum(
        "kd,kde->ke", params.means - reference[None, :], factor, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.max(jnp.sum(jnp.square(projected), axis=1))


def _expanded_terms(params: GaussianMixtureParams, reference: Array, factor: Array) -> Array:
    r"""The expanded terms' worst case, :math:`\max_k |m_k|^\top |P_k| \, |m_k|` (absolute
    values entrywise): the sum of the sizes of the terms :math:`P_{k,ij} m_i m_j`. For a
    narrow component whose mean lies along its long axis the whitened distance
    (``_expanded_cancellation``) is small while these are of size
    :math:`|m_k|^2 / \lambda_{\min}(\Sigma_k)`: float32, condition number 1e6, means 3
    standard deviations apart, weights 2.3e-3 off after one expanded iteration against
    1.2e-5 centred, with eps times the whitened distance at 7.9e-7."""
    highest = jax.lax.Precision.HIGHEST
    precision = jnp.matmul(factor, jnp.swapaxes(factor, 1, 2), precision=highest)
    distances = jnp.abs(params.means - reference[None, :])
    return jnp.max(jnp.einsum("ki,kij,kj->k", distances, jnp.abs(precision), distances, precision=highest))


def _expanded_accurate(params: GaussianMixtureParams, reference: Array, factor: Array) -> Array:
    """Whether the expanded iteration keeps its accuracy here (see
    ``_EXPANDED_MAX_CANCELLATION``): a scalar boolean."""
    return (_expanded_cancellation(params, reference, factor) <= _EXPANDED_MAX_CANCELLATION) & (
        _expanded_terms(params, reference, factor) <= _EXPANDED_MAX_TERMS
    )


def _linear_e_step(features: Array, weights: Array, coefficients: Array) -> tuple[Array, Array]:
    r"""The E-step of a log joint linear in the features, ``features @ coefficients.T``
    (``(n, F)`` by ``(k, F)``), and the moments ``(w r)^T features``: returns
    :math:`\sum_{n: w_n > 0} w_n \log p(x_n)` and the ``(k, F)`` moments. Both products
    run at full float32 precision whatever the default matmul precision (the expansions
    cancel; in TF32 little of the result would be left); the moments by blocks of
    samples on the backends of ``_EXPANDED_BLOCK_SAMPLES``."""
    highest = jax.lax.Precision.HIGHEST
    log_joint = jnp.matmul(features, coefficients.T, precision=highest)  # (n, k)
    log_likelihood = jax.nn.logsumexp(log_joint, axis=1)
    positive = weights > 0
    responsibilities = jnp.exp(log_joint - log_likelihood[:, None])
    weighted = jnp.where(positive[:, None], weights[:, None] * responsibilities, 0)
    n_rows, n_columns = features.shape
    block = _EXPANDED_BLOCK_SAMPLES.get(jax.default_backend())
    if block is not None and n_rows > block and n_rows % block == 0:  # see _EXPANDED_BLOCK_SAMPLES
        by_block = jax.lax.dot_general(
            weighted.reshape(-1, block, weighted.shape[1]),
            features.reshape(-1, block, n_columns),
            (((1,), (1,)), ((0,), (0,))),
            precision=highest,
        )  # (blocks, k, F)
        moments = jnp.sum(by_block, axis=0)
    else:
        moments = jnp.matmul(weighted.T, features, precision=highest)  # (k, F)
    return jnp.sum(jnp.where(positive, weights * log_likelihood, 0)), moments


def _expanded_moments(
    features: Array, weights: Array, params: GaussianMixtureParams, reference: Array, factor: Array
) -> _gaussian_kernel.Moments:
    r"""The E-step and the M-step's moments as two GEMMs over products of features.

    With :math:`y = x - c`, :math:`P_k = \Sigma_k^{-1} = U_k U_k^\top` and
    :math:`m_k = \mu_k - c`, the log joint is linear in :math:`\phi(y)`
    (``_product_features``),

    .. math:: \log \pi_k \mathcal{N}(x \mid \mu_k, \Sigma_k)
              = -\tfrac12 \sum_{i \le j} (2 - \delta_{ij}) P_{k,ij} y_i y_j
              + (P_k m_k)^\top y + \log \pi_k + \log |U_k|
              - \tfrac12 (d \log 2\pi + m_k^\top P_k m_k),

    so ``log_joint = phi @ coefficients.T`` (``features`` are :math:`\phi(x - c)`); and
    every moment the M-step needs is a column of ``(w r)^T phi``: the counts, the sums
    of :math:`y`, and :math:`Q_k = \sum_n w_n r_{nk} y_n y_n^\top`, from which the
    scatter about the new mean is :math:`Q_k - s_k s_k^\top / N_k`. Every product here
    runs at full float32 precision whatever the default matmul precision (in TF32 the
    cancellation would leave little of the result); see ``_expanded_cancellation`` for
    what the expansion costs in accuracy.
    """
    n_features = params.means.shape[1]
    dtype = features.dtype
    rows, cols = np.triu_indices(n_features)
    n_products = rows.shape[0]
    highest = jax.lax.Precision.HIGHEST
    precision = jnp.matmul(factor, jnp.swapaxes(factor, 1, 2), precision=highest)
    centred_means = params.means - reference[None, :]
    linear = jnp.einsum("kij,kj->ki", precision, centred_means, precision=highest)
    log_det = jnp.sum(jnp.log(jnp.diagonal(factor, axis1=1, axis2=2)), axis=1)
    constant = (
        jnp.log(params.weights)
        + log_det
        - 0.5 * (n_features * math.log(2 * math.pi) + jnp.sum(centred_means * linear, axis=1))
    )
    doubled = np.where(rows == cols, 1.0, 2.0).astype(dtype)
    coefficients = jnp.concatenate(
        [-0.5 * doubled[None, :] * precision[:, rows, cols], linear, constant[:, None]], axis=1
    )
    log_likelihood, moments = _linear_e_step(features, weights, coefficients)
    counts = moments[:, -1]
    total = jnp.sum(counts)
    safe_counts = jnp.where(counts <= jnp.finfo(dtype).eps * total, 1, counts)
    sums = moments[:, n_products : n_products + n_features]
    index = np.zeros((n_features, n_features), dtype=int)
    index[rows, cols] = index[cols, rows] = np.arange(n_products)
    second = moments[:, index]  # (k, d, d)
    diagonal = index[np.arange(n_features), np.arange(n_features)]
    return _gaussian_kernel.Moments(
        log_likelihood=log_likelihood,
        total=total,
        counts=counts,
        centred_means=sums / safe_counts[:, None],
        scatter=second - sums[:, :, None] * sums[:, None, :] / safe_counts[:, None, None],
        second_moments=jnp.sum(moments[:, diagonal], axis=0) / total,
    )


class _DiagonalExpandedData(NamedTuple):
    """What the diagonal expanded moments need of the data, formed once per fit: the
    reference :math:`c` (the data's weighted mean), the squares, values and a one of each
    row of :math:`x - c` side by side, ``(n, 2 d + 1)``, and the sample weights; and,
    for the centred iteration it falls back to, ``x.T``: formed inside the fallback's
    branch, the transpose was copied at every iteration (a float32 (1e5, 100, 10)
    iteration that fell back took 44 against 26 ms for the plain centred one)."""

    reference: Array
    features: Array
    weights: Array
    transposed: Array


def _diagonal_expanded_data(x: Array, weights: Array) -> _DiagonalExpandedData:
    """``_DiagonalExpandedData`` of ``x`` (``(n, d)``) and ``weights`` (``(n,)``)."""
    reference = _weighted_mean(x, weights)
    centred = x - reference[None, :]
    ones = jnp.ones((x.shape[0], 1), x.dtype)
    features = jnp.concatenate([jnp.square(centred), centred, ones], 1)
    return _DiagonalExpandedData(reference, features, weights, optimization_barrier(x.T))


def _diagonal_expanded_applies(n_samples: int, n_components: int, n_features: int, always: bool) -> bool:
    """Whether a diagonal or spherical iteration may use the expanded moments (static sizes)."""
    return always or n_samples * n_components * n_features >= _DIAGONAL_EXPANDED_MIN_VALUES


def _diagonal_variances(params: GaussianMixtureParams) -> Array:
    """The variances of a diagonal or spherical mixture as ``(k, d)``."""
    if params.covariances.ndim == 1:  # spherical
        return jnp.broadcast_to(params.covariances[:, None], params.means.shape)
    return params.covariances


def _diagonal_expanded_cancellation(params: GaussianMixtureParams, reference: Array) -> Array:
    r""":math:`\max_k \sum_j (\mu_{kj} - c_j)^2 / \sigma^2_{kj}`, how much larger the diagonal
    expanded form's terms are than the sums they cancel to (``_expanded_cancellation``
    with a diagonal :math:`\Sigma_k`): the variances :math:`Q_{kj} / N_k - m_{kj}^2` and
    the log densities lose ``eps`` times that against their centred forms."""
    variances = _diagonal_variances(params)
    return jnp.max(jnp.sum(jnp.square(params.means - reference[None, :]) / variances, axis=1))


def _diagonal_expanded_moments(
    features: Array, weights: Array, params: GaussianMixtureParams, reference: Array
) -> _gaussian_kernel.Moments:
    r"""The E-step and the M-step's moments of a diagonal or spherical mixture as two
    GEMMs over :math:`\phi(y) = (y_1^2, \dots, y_d^2, y, 1)`, :math:`y = x - c`.

    With :math:`m_k = \mu_k - c` and variances :math:`\sigma^2_{kj}`,

    .. math:: \log \pi_k \mathcal{N}(x \mid \mu_k, \Sigma_k)
              = \sum_j \Big(-\frac{y_j^2}{2 \sigma^2_{kj}} + \frac{m_{kj} y_j}{\sigma^2_{kj}}\Big)
              + \log \pi_k - \tfrac12 \sum_j \Big(\log 2\pi\sigma^2_{kj}
              + \frac{m_{kj}^2}{\sigma^2_{kj}}\Big),

    so ``log_joint = phi @ coefficients.T``; and ``(w r)^T phi`` holds, per component,
    :math:`Q_{kj} = \sum_n w_n r_{nk} y_{nj}^2`, the sums :math:`s_k` of :math:`y` and the
    counts, from which the scatter about the new mean is :math:`Q_{kj} - s_{kj}^2 / N_k`.
    The products run at full float32 precision whatever the default matmul precision;
    ``_diagonal_expanded_cancellation`` says what the expansion costs in accuracy.
    """
    n_features = params.means.shape[1]
    dtype = features.dtype
    inverse = 1 / _diagonal_variances(params)  # (k, d)
    centred_means = params.means - reference[None, :]
    linear = centred_means * inverse
    constant = jnp.log(params.weights) - 0.5 * (
        n_features * math.log(2 * math.pi)
        - jnp.sum(jnp.log(inverse), axis=1)
        + jnp.sum(centred_means * linear, axis=1)
    )
    coefficients = jnp.concatenate([-0.5 * inverse, linear, constant[:, None]], axis=1)
    log_likelihood, moments = _linear_e_step(features, weights, coefficients)  # moments (k, 2 d + 1)
    counts = moments[:, -1]
    total = jnp.sum(counts)
    safe_counts = jnp.where(counts <= jnp.finfo(dtype).eps * total, 1, counts)
    squares, sums = moments[:, :n_features], moments[:, n_features:-1]
    return _gaussian_kernel.Moments(
        log_likelihood=log_likelihood,
        total=total,
        counts=counts,
        centred_means=sums / safe_counts[:, None],
        scatter=squares - jnp.square(sums) / safe_counts[:, None],
        second_moments=jnp.sum(squares, axis=0) / total,
    )


# ---------------------------------------------------------------------------
# Moments about block centres
# ---------------------------------------------------------------------------


def _block_centred_samples(
    n_samples: int, n_components: int, n_features: int, covariance_type: str
) -> int | None:
    """Samples per block of a fit whose moments are formed about block centres (see
    _BLOCK_CENTRED_SAMPLES), or None where the fit forms them otherwise."""
    block = _BLOCK_CENTRED_SAMPLES.get(jax.default_backend())
    if (
        block is None
        or covariance_type not in ("full", "tied")
        or n_features <= _ELEMENTWISE_MAX_FEATURES
        or not _scatter_by_entries_applies(n_samples, n_components, n_features)
        or n_samples * n_features * (n_features + 1) // 2 > _EXPANDED_MAX_FEATURE_VALUES
    ):
        return None

    def few_padding_rows(block: int) -> bool:  # at most block - 1 of them per group
        return block * n_components * _BLOCK_CENTRED_MAX_PADDING <= n_samples

    while block > _BLOCK_CENTRED_MIN_SAMPLES and not few_padding_rows(block):
        block //= 2
    return block if few_padding_rows(block) else None


class _BlockCentredData(NamedTuple):
    r"""What the moments about block centres need of the data, formed once per fit (the
    model's ``fused_prepare``, ``_block_centred_data``), for ``B`` blocks of ``c``
    samples:

    Attributes:
      x: ``(B c, d)``, the samples grouped by ``_landmark_groups``, each group padded
        with copies of the reference to whole blocks (the E-step reads these).
      weights: ``(B c,)``, the sample weights, zero on padding rows.
      reference: ``(d,)``, the data's weighted mean :math:`c`.
      centres: ``(B, d)``, each block's weighted mean less :math:`c` (zero for a block
        of weight zero).
      products: ``(B c, d (d + 1) / 2)``, the products :math:`y_i y_j`, :math:`i \le j`
        (row-major order of ``np.triu_indices(d)``), of each sample's deviation from its
        block's centre, :math:`y_n = x_n - c - c_{b(n)}` (zero where the weight is zero).
      deviations: ``(B, d, c)``, the deviations :math:`y_n`, features first in a block.
    """

    x: Array
    weights: Array
    reference: Array
    centres: Array
    products: Array
    deviations: Array


def _block_centred_data(x: Array, weights: Array, n_groups: int, block: int) -> _BlockCentredData:
    """``_BlockCentredData`` of ``x`` (``(n, d)``) and ``weights`` (``(n,)``), in blocks of
    ``block`` samples of one group of ``_landmark_groups(x, n_groups)`` each."""
    n_samples, n_features = x.shape
    group = _landmark_groups(x, n_groups)
    # Each sample's rank within its group, in the data's order, from running counts
    # (a stable sort by group took 16 of 30 ms at (1e5, 8) on a 2-core CPU; these, 5).
    in_group = group[:, None] == jnp.arange(n_groups, dtype=group.dtype)[None, :]
    running = jnp.cumsum(in_group.astype(jnp.int32), axis=0)
    rank = jnp.take_along_axis(running, group[:, None], axis=1)[:, 0] - 1
    sizes = running[-1]
    padded_sizes = (sizes + block - 1) // block * block
    row = (jnp.cumsum(padded_sizes) - padded_sizes)[group] + rank
    # Static: at most block - 1 padding rows per group.
    n_blocks = (n_samples + n_groups * (block - 1)) // block
    reference = _weighted_mean(x, weights)
    grouped_x = jnp.broadcast_to(reference, (n_blocks * block, n_features))
    grouped_x = grouped_x.at[row].set(x, unique_indices=True)
    grouped_weights = jnp.zeros(n_blocks * block, weights.dtype).at[row].set(weights, unique_indices=True)
    centred = (grouped_x - reference[None, :]).reshape(n_blocks, block, n_features)
    block_weights = grouped_weights.reshape(n_blocks, block)
    mass = jnp.sum(block_weights, axis=1)
    highest = jax.lax.Precision.HIGHEST
    centres = jnp.einsum("bc,bcd->bd", block_weights, centred, precision=highest)
    centres = centres / jnp.where(mass > 0, mass, 1)[:, None]
    deviations = jnp.where(block_weights[:, :, None] > 0, centred - centres[:, None, :], 0)
    return _BlockCentredData(
        x=grouped_x,
        weights=grouped_weights,
        reference=reference,
        centres=centres,
        products=_products_of_pairs(deviations.reshape(-1, n_features)),
        deviations=jnp.swapaxes(deviations, 1, 2),
    )


def _block_centred_moments(
    data: _BlockCentredData, weighted: Array, log_likelihood: Array, tied: bool
) -> _gaussian_kernel.Moments:
    r"""The M-step's moments from weighted responsibilities ``weighted`` (states first,
    ``(k, B c)``, on the samples of ``data``), about the centres of the blocks.

    With :math:`y_n` a sample's deviation from its block's centre :math:`c_b` (both
    relative to the reference :math:`c`), :math:`N_{bk}` and :math:`s_{bk}` the sums of
    :math:`r_{nk}` and :math:`r_{nk} y_n` over block :math:`b`, and
    :math:`\delta_{bk} = c_b - m_k` for the new mean :math:`m_k = \mu_k - c`:

    .. math:: S_k = \sum_n r_{nk} (y_n + \delta_{b(n)k})(y_n + \delta_{b(n)k})^\top
              = \underbrace{\sum_n r_{nk} y_n y_n^\top}_{Q_k}
              + \sum_b \big(s_{bk} \delta_{bk}^\top + \delta_{bk} s_{bk}^\top\big)
              + \underbrace{\sum_b N_{bk} \delta_{bk} \delta_{bk}^\top}_{D_k}.

    :math:`Q_k` is ``(w r)'`` times the products of deviations formed once per fit (one
    GEMM), the rest comes from one reduction per block. Its terms are of size
    :math:`Q_k + D_k` and cancel to :math:`S_k`, so relative to the largest entry of
    :math:`S_k` the rounding is about
    :math:`\rho_k = \max_{ij} |Q_k + D_k|_{ij} / \max_{ij} |S_k|_{ij}` times that of
    the scatter from deviations about the new means (the centred form, for which
    :math:`\rho_k = 1`): large where a block's centre lies far from the samples of a
    component in units of that component's spread, as in a block shared by two
    clusters far apart. Blocks hold one landmark group each: where the groups
    separate the clusters, :math:`\rho_k` is close to 1. Where some :math:`\rho_k`
    exceeds ``_BLOCK_CENTRED_MAX_CANCELLATION``, the scatter is formed from those
    deviations instead, entry by entry over the blocks (a batch-aware conditional),
    from the same responsibilities and means.
    """
    n_components = weighted.shape[0]
    n_blocks, n_features, block = data.deviations.shape
    rows, cols = np.triu_indices(n_features)
    n_products = rows.shape[0]
    highest = jax.lax.Precision.HIGHEST
    products = jnp.matmul(weighted, data.products, precision=highest)  # (k, d (d + 1) / 2)
    by_block = weighted.reshape(n_components, n_blocks, 1, block)
    block_counts = jnp.sum(by_block[:, :, 0, :], axis=-1)  # (k, B)
    # A broadcast product reduced over the block's samples: XLA fuses it into one pass,
    # where a batched dot_general over blocks ran at a third of the speed on a CPU.
    block_sums = jnp.sum(by_block * data.deviations[None], axis=-1)  # (k, B, d)
    # Behind a barrier: XLA otherwise merges the sum over blocks below into a second
    # reduction of the broadcast product, which it then writes out in full for the two
    # (k, B, d, c: 26 MB at (1e5, 8, 8)).
    block_counts, block_sums = optimization_barrier((block_counts, block_sums))
    # Counts and sums from the blocks' reductions rather than from columns of the GEMM:
    # their rounding was 3 to 4 times smaller (weights and means at (1e5, 8, 8)).
    counts = jnp.sum(block_counts, axis=1)
    total = jnp.sum(counts)
    occupied = counts > jnp.finfo(counts.dtype).eps * total
    safe_counts = jnp.where(occupied, counts, 1)
    sums = jnp.sum(block_sums, axis=1) + jnp.matmul(block_counts, data.centres, precision=highest)
    centred_means = sums / safe_counts[:, None]
    offsets = data.centres[None, :, :] - centred_means[:, None, :]  # (k, B, d)
    index = np.zeros((n_features, n_features), dtype=int)
    index[rows, cols] = index[cols, rows] = np.arange(n_products)
    spread = products[:, index]  # Q_k
    between = jnp.einsum("kb,kbi,kbj->kij", block_counts, offsets, offsets, precision=highest)  # D_k
    cross = jnp.einsum("kbi,kbj->kij", block_sums, offsets, precision=highest)
    scatter = spread + cross + jnp.swapaxes(cross, 1, 2) + between

    scale = jnp.max(jnp.abs(scatter), axis=(1, 2))
    cancellation = jnp.max(jnp.abs(spread + between), axis=(1, 2)) / jnp.where(scale > 0, scale, 1)
    # NaN, a scatter of no spread or too much cancellation: from the deviations.
    acceptable = (scale > 0) & (cancellation <= _BLOCK_CENTRED_MAX_CANCELLATION)
    accurate = jnp.all(acceptable | ~occupied)

    def from_products(scatter, weighted, offsets, deviations):
        return scatter

    def from_deviations(scatter, weighted, offsets, deviations):
        deviations = deviations[None] + offsets[:, :, :, None]  # (k, B, d, c)
        weighted = weighted.reshape(n_components, n_blocks, 1, block)
        return _scatter_by_entries(weighted * deviations, deviations, tied=False)

    scatter = _batch_aware_cond(
        accurate, from_products, from_deviations, scatter, weighted, offsets, data.deviations
    )
    return _gaussian_kernel.Moments(
        log_likelihood=log_likelihood,
        total=total,
        counts=counts,
        centred_means=centred_means,
        scatter=jnp.sum(scatter, axis=0) if tied else scatter,
        # From the scatter of each component, before a tied fit sums it.
        second_moments=_data_second_moments(scatter, counts, centred_means, total, "full"),
    )


def _batch_aware_cond(predicate: Array, true_fun, false_fun, *operands):
    """``jax.lax.cond(predicate, true_fun, false_fun, *operands)``, which under
    ``jax.vmap`` runs one branch for the whole batch when every member takes it.

    ``jax.vmap`` turns a ``lax.cond`` on a batched predicate into a select that runs
    both branches for every member: for the expanded moments' guard, restarts
    (``lem.fit`` with ``n_init > 1``) and batches of fits paid for the expanded and the
    centred iteration at every step. Here a batch whose members all take the same
    branch runs that branch alone; only a mixed batch runs both, each member keeping
    its own result, as before. The branches take every array they use as an operand
    (``jax.custom_batching.custom_vmap`` batches its operands, not closures).
    """

    @jax.custom_batching.custom_vmap
    def cond(predicate, *operands):
        return jax.lax.cond(predicate, true_fun, false_fun, *operands)

    @cond.def_vmap
    def batched_cond(axis_size, in_batched, predicate, *operands):
        predicate_batched, *operands_batched = in_batched
        in_axes = [
            jax.tree_util.tree_map(lambda batched: 0 if batched else None, b) for b in operands_batched
        ]

        def each(fun):
            return jax.vmap(fun, in_axes=in_axes, axis_size=axis_size)

        if not predicate_batched:
            result = jax.lax.cond(predicate, each(true_fun), each(false_fun), *operands)
        else:

            def mixed(*operands):
                def member(predicate, *operands):
                    return jax.lax.cond(predicate, true_fun, false_fun, *operands)

                return jax.vmap(member, in_axes=[0, *in_axes], axis_size=axis_size)(predicate, *operands)

            branch = jnp.where(jnp.all(predicate), 2, jnp.where(jnp.any(predicate), 1, 0))
            result = jax.lax.switch(branch, [each(false_fun), mixed, each(true_fun)], *operands)
        return result, jax.tree_util.tree_map(lambda _: True, result)

    return cond(predicate, *operands)


# ---------------------------------------------------------------------------
# Unconstrained coordinates
# ---------------------------------------------------------------------------


def _pack_cholesky(covariances: Array) -> Array:
    """Cholesky factors packed row by row, with the log of their diagonal."""
    rows, cols = np.tril_indices(covariances.shape[-1])
    packed = jnp.linalg.cholesky(covariances)[..., rows, cols]
    on_diagonal = jnp.broadcast_to(rows == cols, packed.shape)
    return jnp.where(on_diagonal, jnp.log(jnp.where(on_diagonal, packed, 1)), packed)


def _unpack_cholesky(packed: Array, n_features: int) -> Array:
    """Inverse of ``_pack_cholesky``: any real vector gives a positive-definite matrix."""
    rows, cols = np.tril_indices(n_features)
    on_diagonal = jnp.broadcast_to(rows == cols, packed.shape)
    # exp of the diagonal alone: an off-diagonal entry above 88 (float32) would give
    # exp = inf on the discarded side, and its gradient 0 * inf = NaN (a fit_gradient
    # of Old Faithful in units 100 times smaller ended NONFINITE).
    values = jnp.where(on_diagonal, jnp.exp(jnp.where(on_diagonal, packed, 0)), packed)
    lower = jnp.zeros((*packed.shape[:-1], n_features, n_features), packed.dtype)
    lower = lower.at[..., rows, cols].set(values)
    return lower @ jnp.swapaxes(lower, -1, -2)


# ---------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------


def gaussian_mixture(
    n_components: int,
    covariance_type: str = "full",
    reg_covar: float = 1e-6,
    init: str = "kmeans++",
    reg_covar_mode: str = "relative",
    moments: str = "auto",
) -> LatentModel:
    r"""A Gaussian mixture model as a :class:`~latentem.LatentModel`.

    .. math:: \log p(x_n, z_n = k) = \log \pi_k - \tfrac12 \big(d \log 2\pi
              + (x_n - \mu_k)^\top \Sigma_k^{-1} (x_n - \mu_k)\big)
              + \log |\Sigma_k^{-1}|^{1/2}

    The M-step is the weighted maximum-likelihood estimate from responsibilities
    :math:`r_{nk}` (weights already applied), :math:`N_k = \sum_n r_{nk}`:
    :math:`\pi_k = N_k / \sum_j N_j`, :math:`\mu_k = \sum_n r_{nk} x_n / N_k`,
    :math:`\Sigma_k = \sum_n r_{nk} (x_n - \mu_k)(x_n - \mu_k)^\top / N_k + \lambda`,
    with the tied, diagonal and spherical variants of the last.

    Initialisation (``init``): ``"kmeans++"`` seeds centres by greedy weighted
    k-means++, ``"random_from_data"`` by random samples (distinct rows, drawn in
    proportion to weight; on data with repeated values two centres can still coincide);
    both then assign each sample to its nearest centre and take one M-step from that
    partition. ``"random"`` takes the M-step from random responsibilities
    (scikit-learn's ``"random"``): every component then starts near the overall mean,
    and EM can stop near that symmetric saddle point, as scikit-learn's does, so use it
    with restarts. The factory is memoised: the same arguments return the same model,
    so compiled fits are reused.

    On a CPU, large full and tied fits (at least 2^20 values n k d) group their samples
    once per fit by nearest landmark. With more than eight features (float32), each
    block of samples forms the scatter of the few components it meets (on separated
    clusters, most responsibilities are exactly zero after a few iterations); with five
    to eight and ``moments="auto"``, the moments are formed about the centres of blocks
    of one group each, from products of deviations formed once per fit (one matrix
    product per iteration). The result differs from a fit in the data's own order only
    by rounding, of the size of the centred form's.

    Args:
      n_components: number of components :math:`K`.
      covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
      reg_covar: non-negative regularisation added to covariance diagonals.
      init: ``"kmeans++"``, ``"random_from_data"`` or ``"random"``.
      reg_covar_mode: ``"relative"`` (default) adds ``reg_covar`` times each feature's
        variance in the data, so the fit does not depend on the units of the data;
        ``"absolute"`` adds ``reg_covar`` itself, as scikit-learn does.
      moments: how a fit forms the M-step's moments and the E-step's quadratic forms.
        ``"centred"``: from the deviations of each sample from each mean, as
        scikit-learn (accurate to round-off). ``"expanded"`` (full, diagonal and
        spherical fits): as two large matrix products over the products of features
        :math:`y_i y_j` (full) or the squares :math:`y_j^2` (diagonal, spherical), ``y``
        the data less their mean, accurate to about ``eps (mu_k - c)' Sigma_k^-1
        (mu_k - c)`` relative, for ``c`` the data's mean; an iteration where that
        factor of ``eps`` exceeds ``2**11`` (a component many of its own standard
        deviations from the mean), or where the terms' worst case ``|mu_k - c|'
        |Sigma_k^-1| |mu_k - c|`` exceeds ``2**16`` (narrow, correlated components), is
        computed centred instead, so the expanded form loses about 11 bits at most
        (``2**-12`` relative in float32, ``2**-41`` in float64). ``"auto"``
        (default): for full fits, expanded for large fits on a GPU unless
        ``jax.default_matmul_precision`` asks for float32 products (``"highest"``);
        on a CPU, about the centres of blocks of grouped samples for large full and
        tied fits of five to eight features (see above; an iteration whose expansion
        would cancel more than 16 times the centred form's rounding takes the
        centred scatter), centred otherwise. For diagonal and spherical fits on a
        CPU, expanded in float64 from 2^18 values n k d where the guard holds (1.3 to
        1.7x faster than centred at (1e5, 8, 8) and (1e5, 32, 16)), centred below, in
        float32 and on a GPU; in float32 ``"expanded"`` made (1e5, 8, 8) and (1e5, 32,
        16) 1.7 to 2.1x faster.
        For full fits on a CPU ``"expanded"`` made a float32 (1e5, 8, 8) iteration 1.0
        to 2.2x faster, depending on the machine.

    Returns:
      A :class:`~latentem.LatentModel` over :class:`GaussianMixtureParams`.

    Example:
      >>> import jax, latentem as lem
      >>> model = lem.gaussian_mixture(2, covariance_type="diag")
      >>> x = lem.datasets.load_faithful()
      >>> result = lem.fit(model, jax.random.key(0), x)
      >>> result.params.means.shape, result.params.covariances.shape
      ((2, 2), (2, 2))

    References:
      Bishop (2006), Pattern Recognition and Machine Learning, §9.2.
    """
    n_components = check_positive_int(n_components, "n_components")
    check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
    check_choice(init, "init", INITS)
    check_choice(reg_covar_mode, "reg_covar_mode", REG_COVAR_MODES)
    check_choice(moments, "moments", MOMENTS)
    if moments == "expanded" and covariance_type == "tied":
        raise ValueError(
            'moments="expanded" is for covariance_type "full", "diag" or "spherical"; got "tied". '
            'Use moments="auto" or "centred".'
        )
    if isinstance(reg_covar, bool) or not isinstance(reg_covar, (int, float)):
        raise ValueError(f"reg_covar must be a non-negative number; got {reg_covar!r}.")
    check_nonnegative(reg_covar, "reg_covar")
    kernel = _KERNEL_MODES.get(jax.default_backend()) if covariance_type == "full" else None
    # Moments about block centres are "auto"'s: "centred" keeps deviations about the means.
    block_centred = (
        moments == "auto"
        and covariance_type in ("full", "tied")
        and jax.default_backend() in _BLOCK_CENTRED_SAMPLES
    )
    if moments == "auto":
        backend = jax.default_backend()
        auto = (covariance_type == "full" and backend in _EXPANDED_BACKENDS) or (
            covariance_type in ("diag", "spherical") and backend in _DIAGONAL_EXPANDED_BACKENDS
        )
        moments = "auto" if auto else "centred"
    group_samples = covariance_type in ("full", "tied") and jax.default_backend() in _ACTIVE_COMPONENT_SLOTS
    return _gaussian_mixture(
        n_components,
        covariance_type,
        float(reg_covar),
        init,
        reg_covar_mode,
        kernel,
        moments,
        group_samples,
        block_centred,
    )


@functools.lru_cache(maxsize=256)
def _gaussian_mixture(
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    init: str,
    reg_covar_mode: str,
    kernel: str | None = None,
    moments: str = "centred",
    group_samples: bool = False,
    block_centred: bool = False,
) -> LatentModel:
    """The model; ``kernel`` ("compiled", "interpret" or None) gives it the fused EM
    iteration of ``_gaussian_kernel`` for full covariances; ``moments`` is "centred",
    "expanded", or "auto" (expanded where ``_expanded_applies``), resolved for the
    backend by ``gaussian_mixture``; ``group_samples`` lets large centred fits reorder
    their samples once per fit (``_sample_order``), for the scatter to skip the
    components a block of samples does not meet; ``block_centred`` lets fits of five to
    eight features form their moments about block centres (``_block_centred_moments``)."""

    def check_data(x: Array, params: GaussianMixtureParams | None = None) -> None:
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D with shape (n_samples, n_features); got shape {x.shape}.")
        if params is not None:
            _check_params(params, n_components, covariance_type)
        if params is not None and x.shape[1] != params.means.shape[-1]:
            raise ValueError(
                f"x has {x.shape[1]} features but the parameters have "
                f"{params.means.shape[-1]}; pass data with shape (n_samples, {params.means.shape[-1]})."
            )

    def log_joint(params: GaussianMixtureParams, x: Array) -> Array:
        x = jnp.asarray(x)
        check_data(x, params)
        x = x.astype(params.means.dtype)
        log_joint = (
            _log_gaussian_density_by_state(x, params, covariance_type) + jnp.log(params.weights)[:, None]
        )
        return log_joint.T

    def m_step(x: Array, responsibilities: Array, params: GaussianMixtureParams) -> GaussianMixtureParams:
        x, responsibilities = jnp.asarray(x), jnp.asarray(responsibilities)
        check_data(x, params)
        return _gaussian_m_step(x, responsibilities, params, covariance_type, reg_covar, reg_covar_mode)

    def initialize(key: PRNGKey, x: Array, weights: Array) -> GaussianMixtureParams:
        x = jnp.asarray(x)
        check_data(x)
        if x.shape[0] < n_components:
            raise ValueError(
                f"x has {x.shape[0]} samples but n_components={n_components}; "
                "use at most as many components as samples."
            )
        x = x.astype(float_dtype(x))
        weights = jnp.asarray(weights).astype(x.dtype)
        if init == "random":
            responsibilities = jax.random.uniform(key, (x.shape[0], n_components), x.dtype)
            responsibilities = responsibilities / responsibilities.sum(axis=1, keepdims=True)
            centres = jnp.broadcast_to(_first_weighted_row(x, weights), (n_components, x.shape[1]))
        else:
            seed = kmeans_plusplus if init == "kmeans++" else random_from_data
            centres = seed(key, x, n_components, weights)
            nearest = jnp.argmin(squared_distances(x, centres), axis=1)
            responsibilities = jax.nn.one_hot(nearest, n_components, dtype=x.dtype)
        # Components whose cell is empty keep these: the seed and the data's variances.
        start = GaussianMixtureParams(
            weights=jnp.full((n_components,), 1 / n_components, x.dtype),
            means=centres,
            covariances=_covariances_from_variances(
                feature_variances(x, weights), n_components, covariance_type
            ),
        )
        return m_step(x, responsibilities * weights[:, None], start)

    def sample(key: PRNGKey, params: GaussianMixtureParams, n_samples: int) -> tuple[Array, Array]:
        n_samples = check_positive_int(n_samples, "n_samples")
        _check_params(params, n_components, covariance_type)
        component_key, noise_key = jax.random.split(key)
        labels = jax.random.categorical(component_key, jnp.log(params.weights), shape=(n_samples,))
        noise = jax.random.normal(noise_key, (n_samples, params.means.shape[1]), params.means.dtype)
        if covariance_type == "full":
            lower = jnp.linalg.cholesky(params.covariances)

            # One component at a time keeps memory at O(n d) rather than O(n k d).
            def add_component(k: Array, x: Array) -> Array:
                return jnp.where((labels == k)[:, None], noise @ lower[k].T, x)

            x = jax.lax.fori_loop(0, n_components, add_component, jnp.zeros_like(noise))
        elif covariance_type == "tied":
            x = noise @ jnp.linalg.cholesky(params.covariances).T
        elif covariance_type == "diag":
            x = noise * jnp.sqrt(params.covariances)[labels]
        else:
            x = noise * jnp.sqrt(params.covariances)[labels][:, None]
        return x + params.means[labels], labels.astype(jnp.int32)

    def n_parameters(params: GaussianMixtureParams) -> int:
        _check_params(params, n_components, covariance_type)
        k, d = params.means.shape
        covariance_count = {
            "full": k * d * (d + 1) // 2,
            "tied": d * (d + 1) // 2,
            "diag": k * d,
            "spherical": k,
        }[covariance_type]
        return covariance_count + k * d + k - 1

    def to_unconstrained(params: GaussianMixtureParams) -> GaussianMixtureUnconstrained:
        _check_params(params, n_components, covariance_type)
        if covariance_type in ("full", "tied"):
            scales = _pack_cholesky(params.covariances)
        else:
            scales = jnp.log(params.covariances)
        # A weight of exactly zero (an emptied component) would give a logit of -inf;
        # the smallest normal number keeps the point finite and maps back to ~0.
        tiny = jnp.finfo(params.weights.dtype).tiny
        logits = jnp.log(jnp.maximum(params.weights, tiny))
        return GaussianMixtureUnconstrained(logits, params.means, scales)

    def from_unconstrained(unconstrained: GaussianMixtureUnconstrained) -> GaussianMixtureParams:
        if covariance_type in ("full", "tied"):
            covariances = _unpack_cholesky(unconstrained.scales, unconstrained.means.shape[-1])
        else:
            covariances = jnp.exp(unconstrained.scales)
        # softmax underflows to exactly 0 for a logit far below the others; log_joint
        # then takes log(0) and its gradient is 0 * inf = NaN. Flooring at the smallest
        # normal number keeps every weight positive and the gradient finite (zero
        # through the floor); the sum stays one to rounding, since tiny << eps.
        weights = jax.nn.softmax(unconstrained.logits)
        weights = jnp.maximum(weights, jnp.finfo(weights.dtype).tiny)
        return GaussianMixtureParams(weights, unconstrained.means, covariances)

    def kernel_step(params: GaussianMixtureParams, x: Array, weights: Array):
        dtype = params.means.dtype
        reference, factor, projected_means, log_det = _full_whitening(params)
        moments = _gaussian_kernel.moments(
            x.astype(dtype),
            weights,
            reference,
            factor,
            projected_means,
            jnp.log(params.weights) + log_det,
            interpret=kernel == "interpret",
        )
        return moments_step(moments, reference, params)

    def moments_step(moments: _gaussian_kernel.Moments, reference: Array, params: GaussianMixtureParams):
        new_params = _m_step_from_moments(
            moments.counts,
            moments.total,
            reference,
            moments.centred_means,
            moments.scatter,
            moments.second_moments,
            params,
            covariance_type,
            reg_covar,
            reg_covar_mode,
        )
        return new_params, moments.log_likelihood, moments.counts

    def expanded_step(params: GaussianMixtureParams, x: Array, weights: Array, data: _ExpandedData):
        dtype = params.means.dtype
        x, weights = x.astype(dtype), weights.astype(dtype)
        factor = precision_cholesky(params.covariances, "full")

        def expanded(params, x, weights, data, factor):
            moments = _expanded_moments(data.features, data.weights, params, data.reference, factor)
            return moments_step(moments, data.reference, params)

        def centred(params, x, weights, data, factor):
            return _em._unfused_iteration(centred_model, params, x, weights)

        accurate = _expanded_accurate(params, data.reference, factor)
        return _batch_aware_cond(accurate, expanded, centred, params, x, weights, data, factor)

    def diagonal_expanded_step(
        params: GaussianMixtureParams, x: Array, weights: Array, data: _DiagonalExpandedData
    ):
        def expanded(params, x, weights, data):
            moments = _diagonal_expanded_moments(data.features, data.weights, params, data.reference)
            return moments_step(moments, data.reference, params)

        def centred(params, x, weights, data):
            # The engine's iteration (_em._unfused_iteration) with the transpose held.
            weighted, log_likelihood = _em._weighted_responsibilities_by_state(
                centred_model, params, x, weights
            )
            new_params = _gaussian_m_step(
                x, weighted.T, params, covariance_type, reg_covar, reg_covar_mode, data.transposed
            )
            return new_params, log_likelihood, weighted.sum(axis=1)

        dtype = params.means.dtype
        x, weights = x.astype(dtype), weights.astype(dtype)
        accurate = _diagonal_expanded_cancellation(params, data.reference) <= _EXPANDED_MAX_CANCELLATION
        return _batch_aware_cond(accurate, expanded, centred, params, x, weights, data)

    def block_centred_step(params: GaussianMixtureParams, data: _BlockCentredData):
        weighted, log_likelihood = _em._weighted_responsibilities_by_state(
            centred_model, params, data.x, data.weights
        )
        moments = _block_centred_moments(data, weighted, log_likelihood, tied=covariance_type == "tied")
        return moments_step(moments, data.reference, params)

    def block_centred_data(x: Array, weights: Array) -> _BlockCentredData:
        block = _block_centred_samples(x.shape[0], n_components, x.shape[1], covariance_type)
        return _block_centred_data(x, weights.astype(x.dtype), n_components, block)

    def route(n_samples: int, n_features: int, dtype) -> str | None:
        """Which fused iteration a fit of this size takes (static): "kernel",
        "expanded", "diagonal_expanded" (``_diagonal_expanded_moments``),
        "block_centred" (``_block_centred_moments``), "grouped" (the engine's log_joint
        and m_step on the samples in the order of ``_sample_order``), or None (those on
        the samples as given)."""
        if kernel is not None and _gaussian_kernel.supported(n_samples, n_features, n_components):
            return "kernel"
        if covariance_type in ("diag", "spherical"):
            # "auto" in float64 alone: see _DIAGONAL_EXPANDED_BACKENDS.
            wanted = moments == "expanded" or (moments == "auto" and jnp.finfo(dtype).bits > 32)
            if wanted and _diagonal_expanded_applies(
                n_samples, n_components, n_features, moments == "expanded"
            ):
                return "diagonal_expanded"
            return None
        if moments == "expanded" or (moments == "auto" and not _float32_products_requested()):
            if _expanded_applies(n_samples, n_components, n_features, always=moments == "expanded"):
                return "expanded"
        if block_centred and _block_centred_samples(n_samples, n_components, n_features, covariance_type):
            return "block_centred"
        if (
            group_samples
            and _active_component_slots(n_samples, n_components, n_features, covariance_type, dtype)
            is not None
        ):
            return "grouped"
        return None

    def fused_prepare(
        x: Array, weights: Array
    ) -> _ExpandedData | _DiagonalExpandedData | _BlockCentredData | _GroupedData | None:
        # What depends on the data alone, formed here once per fit (see
        # FusedPrepareFn): the products of features (in the loop they cost 2.7 of 7.7 ms
        # per iteration at (1e6, 32, 64) on an H200), the samples in blocks of one group
        # with the products of their deviations, or the samples in their order.
        x = jnp.asarray(x)
        x = x.astype(float_dtype(x))  # integer data are fitted as floats
        path = route(*x.shape, x.dtype) if x.ndim == 2 else None
        if path == "diagonal_expanded":
            return _diagonal_expanded_data(x, jnp.asarray(weights, x.dtype))
        if path == "block_centred":
            return block_centred_data(x, jnp.asarray(weights))
        if path == "grouped":
            order = _sample_order(x, n_components)
            return _GroupedData(x[order], jnp.asarray(weights)[order])
        if path != "expanded":
            return None
        return _expanded_data(x, jnp.asarray(weights, x.dtype))

    def fused_step(params: GaussianMixtureParams, x: Array, weights: Array, prepared=None):
        x = jnp.asarray(x)
        check_data(x, params)
        n_samples, n_features = x.shape
        path = route(n_samples, n_features, params.means.dtype)
        if path == "kernel":
            return kernel_step(params, x, weights)
        if path == "expanded":
            dtype = params.means.dtype
            # Not prepared (em_step): the products of features are worth forming even
            # for one iteration (at (1e6, 32, 64) on an H100 24 ms centred, 8 ms
            # expanded; forming the products about 3 ms on an H200).
            if prepared is None or prepared.features.dtype != dtype:
                prepared = _expanded_data(x.astype(dtype), weights.astype(dtype))
            return expanded_step(params, x, weights, prepared)
        if path == "diagonal_expanded":
            # Not prepared (em_step): the squares are one elementwise pass, worth it.
            dtype = params.means.dtype
            if prepared is None or prepared.features.dtype != dtype:
                prepared = _diagonal_expanded_data(x.astype(dtype), weights.astype(dtype))
            return diagonal_expanded_step(params, x, weights, prepared)
        if path == "block_centred":
            # Not prepared (em_step, one iteration): the grouping would cost about three
            # iterations, so the engine's iteration on the samples as given.
            if prepared is None or prepared.products.dtype != params.means.dtype:
                return None
            return block_centred_step(params, prepared)
        if path == "grouped" and prepared is not None:
            return _em._unfused_iteration(centred_model, params, prepared.x, prepared.weights)
        return None  # the engine's log_joint and m_step (on the samples as given)

    centred_model = LatentModel(init=initialize, log_joint=log_joint, m_step=m_step)
    return LatentModel(
        init=initialize,
        log_joint=log_joint,
        m_step=m_step,
        sample=sample,
        n_parameters=n_parameters,
        to_unconstrained=to_unconstrained,
        from_unconstrained=from_unconstrained,
        fused_step=fused_step
        if kernel is not None or moments != "centred" or group_samples or block_centred
        else None,
        fused_prepare=fused_prepare if moments != "centred" or group_samples or block_centred else None,
    )
