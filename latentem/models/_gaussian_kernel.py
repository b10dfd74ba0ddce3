"""One EM iteration of a small full-covariance Gaussian mixture as one GPU kernel.

A batch of thousands of small fits (a few hundred samples, a few features and
components each) is bound by memory bandwidth on a GPU: XLA's program for an iteration
reads the data, log joint and responsibilities in about seven passes (log joint,
log-sum-exp, responsibilities, and the M-step's reductions, each a kernel of its own).
Here one Pallas kernel per fit (a grid over the batch under ``jax.vmap``) loads the
fit's samples once, keeps them in registers, and computes the log-likelihood and every
moment the M-step needs: the same two-pass algorithm (the scatter about the new means
from explicit deviations), in one pass over memory.

Pallas's Triton backend needs every array in the kernel to have a power-of-two size:
samples are padded to the next power of two inside the kernel (masked, never copied),
and features and components are unrolled in Python, so each value is one
``(n_padded,)`` vector.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

try:  # jax.experimental: absent, or a different interface, in some JAX versions
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pallas_triton

    _TRITON_PARAMS = pallas_triton.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX version
    pl = None

Array = jax.Array

# Beyond these the per-fit vectors no longer fit in one thread block's registers (and
# a single large fit is better served by XLA's tiled kernels anyway).
MAX_SAMPLES = 2048
MAX_FEATURES = 4
MAX_COMPONENTS = 8


def supported(n_samples: int, n_features: int, n_components: int) -> bool:
    """Whether :func:`moments` handles these (static) sizes in this JAX version."""
    return (
        pl is not None
        and n_samples <= MAX_SAMPLES
        and n_features <= MAX_FEATURES
        and n_components <= MAX_COMPONENTS
    )


class Moments(NamedTuple):
    """What the M-step needs from one pass over the samples, with ``c`` the reference.

    Attributes:
      log_likelihood: ``sum_n w_n log p(x_n)`` over samples of positive weight.
      total: ``sum_n sum_k r_nk``, the total weight.
      counts: ``N_k = sum_n r_nk``, shape ``(k,)``.
      centred_means: ``sum_n r_nk (x_n - c) / N_k`` (``N_k`` replaced by 1 for a
        component with no mass), shape ``(k, d)``.
      scatter: ``sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T``, shape ``(k, d, d)``.
      second_moments: ``sum_n w_n (x_n - c)^2 / total``, shape ``(d,)``.
    """

    log_likelihood: Array
    total: Array
    counts: Array
    centred_means: Array
    scatter: Array
    second_moments: Array


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def moments(
    x: Array,
    weights: Array,
    reference: Array,
    factor: Array,
    projected_means: Array,
    log_constants: Array,
    *,
    interpret: bool = False,
) -> Moments:
    r"""E-step and M-step moments of a full-covariance Gaussian mixture in one kernel.

    With :math:`y_n = x_n - c`, precision factors :math:`U_k` (:math:`\Sigma_k^{-1} =
    U_k U_k^\top`) and :math:`m_k = U_k^\top (\mu_k - c)`, the log joint is
    :math:`\ell_{nk} = a_k - \tfrac12 \lVert U_k^\top y_n - m_k \rVert^2` with
    :math:`a_k = \log \pi_k + \log |U_k| - \tfrac d2 \log 2\pi`; then
    :math:`\log p(x_n) = \operatorname{logsumexp}_k \ell_{nk}`,
    :math:`r_{nk} = w_n \exp(\ell_{nk} - \log p(x_n))` and the moments of
    :class:`Moments`.

    Args:
      x: ``(n, d)`` samples of one fit (vmap for a batch).
      weights: ``(n,)`` sample weights.
      reference: ``(d,)`` the shift ``c``.
      factor: ``(k, d, d)`` upper-triangular precision factors ``U_k``.
      projected_means: ``(k, d)`` the ``m_k``.
      log_constants: ``(k,)`` the ``a_k``.
      interpret: always run the kernel through Pallas's interpreter (any backend; for
        tests). Otherwise Triton compiles it for NVIDIA GPUs, and other platforms
        interpret it.

    Example:
      >>> import jax.numpy as jnp
      >>> from latentem.models import _gaussian_kernel as kernel
      >>> x = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
      >>> out = kernel.moments(x, jnp.ones(3), jnp.zeros(2), jnp.eye(2)[None],
      ...                      jnp.zeros((1, 2)), jnp.zeros(1), interpret=True)
      >>> out.counts.tolist(), out.centred_means.tolist()
      ([3.0], [[2.0, 3.0]])
    """
    n_samples, n_features = x.shape
    n_components = factor.shape[0]
    dtype = x.dtype
    n_padded = _next_power_of_two(n_samples)
    triangle = [(i, j) for i in range(n_features) for j in range(i + 1)]
    parameters = jnp.concatenate(
        [reference, factor.reshape(-1), projected_means.reshape(-1), log_constants]
    ).astype(dtype)
    parameters_padded = _next_power_of_two(parameters.shape[0])
    parameters = jnp.pad(parameters, (0, parameters_padded - parameters.shape[0]))
    # Output layout: log-likelihood, total, counts, means, scatter (lower triangle),
    # second moments.
    offsets = {}
    size = 0
    for name, length in (
        ("log_likelihood", 1),
        ("total", 1),
        ("counts", n_components),
        ("means", n_components * n_features),
        ("scatter", n_components * len(triangle)),
        ("second", n_features),
    ):
        offsets[name] = size
        size += length
    out_padded = _next_power_of_two(size)
    eps = float(jnp.finfo(dtype).eps)
    half_log_two_pi = 0.5 * n_features * math.log(2 * math.pi)

    def kernel(x_ref, weights_ref, parameters_ref, out_ref):
        valid = jnp.arange(n_padded) < n_samples
        zero = jnp.zeros((n_padded,), dtype)
        w = jnp.where(valid, weights_ref[...], zero)
        shift = [parameters_ref[j] for j in range(n_features)]
        centred = [jnp.where(valid, x_ref[:, j] - shift[j], zero) for j in range(n_features)]

        def factor_entry(k, a, e):
            return parameters_ref[n_features + (k * n_features + a) * n_features + e]

        means_start = n_features + n_components * n_features * n_features
        log_joint = []
        for k in range(n_components):
            squares = zero
            for e in range(n_features):
                projected = sum(factor_entry(k, a, e) * centred[a] for a in range(n_features))
                squares = squares + jnp.square(projected - parameters_ref[means_start + k * n_features + e])
            constant = parameters_ref[means_start + n_components * n_features + k]
            log_joint.append(constant - half_log_two_pi - 0.5 * squares)
        largest = log_joint[0]
        for value in log_joint[1:]:
            largest = jnp.maximum(largest, value)
        # As logsumexp: a sample with every log joint -inf has log p = -inf.
        largest = jnp.where(largest > -jnp.inf, largest, zero)
        log_likelihood = jnp.log(sum(jnp.exp(value - largest) for value in log_joint)) + largest
        positive = w > 0
        out_ref[offsets["log_likelihood"]] = jnp.sum(jnp.where(positive, w * log_likelihood, zero))
        responsibilities = [
            jnp.where(positive, jnp.exp(value - log_likelihood) * w, zero) for value in log_joint
        ]
        sample_weights = sum(responsibilities)
        total = jnp.sum(sample_weights)
        out_ref[offsets["total"]] = total
        for j in range(n_features):
            out_ref[offsets["second"] + j] = jnp.sum(sample_weights * jnp.square(centred[j])) / total
        for k in range(n_components):
            count = jnp.sum(responsibilities[k])
            out_ref[offsets["counts"] + k] = count
            safe_count = jnp.where(count <= eps * total, jnp.ones((), dtype), count)
            deviations = []
            for j in range(n_features):
                mean = jnp.sum(responsibilities[k] * centred[j]) / safe_count
                out_ref[offsets["means"] + k * n_features + j] = mean
                deviations.append(centred[j] - mean)
            for t, (i, j) in enumerate(triangle):
                out_ref[offsets["scatter"] + k * len(triangle) + t] = jnp.sum(
                    responsibilities[k] * deviations[i] * deviations[j]
                )
        for index in range(size, out_padded):
            out_ref[index] = jnp.zeros((), dtype)

    def call(interpret: bool, *operands: Array) -> Array:
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((out_padded,), dtype),
            in_specs=[
                pl.BlockSpec((n_padded, n_features), lambda: (0, 0)),
                pl.BlockSpec((n_padded,), lambda: (0,)),
                pl.BlockSpec((parameters_padded,), lambda: (0,)),
            ],
            out_specs=pl.BlockSpec((out_padded,), lambda: (0,)),
            compiler_params=_TRITON_PARAMS(num_warps=max(1, min(8, n_padded // 128))),
            interpret=interpret,
            name="gaussian_mixture_em_moments",
        )(*operands)

    operands = (x.astype(dtype), weights.astype(dtype), parameters)
    if interpret:
        out = call(True, *operands)
    else:
        # Compiled by Triton where the program runs on an NVIDIA GPU, interpreted
        # elsewhere (data placed on the CPU of a GPU machine, other GPUs): the platform
        # is known only when the program is lowered.
        out = jax.lax.platform_dependent(
            *operands, cuda=functools.partial(call, False), default=functools.partial(call, True)
        )

    def block(name: str, length: int) -> Array:
        return out[offsets[name] : offsets[name] + length]

    lower = block("scatter", n_components * len(triangle)).reshape(n_components, len(triangle))
    entries = {}
    for t, (i, j) in enumerate(triangle):
        entries[i, j] = entries[j, i] = lower[:, t]
    scatter = jnp.stack(
        [jnp.stack([entries[i, j] for j in range(n_features)], axis=-1) for i in range(n_features)], axis=-2
    )
    return Moments(
        log_likelihood=out[offsets["log_likelihood"]],
        total=out[offsets["total"]],
        counts=block("counts", n_components),
        centred_means=block("means", n_components * n_features).reshape(n_components, n_features),
        scatter=scatter,
        second_moments=block("second", n_features),
    )
