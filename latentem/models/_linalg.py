"""Small dense linear algebra that XLA does itself on a CPU instead of calling LAPACK.

jaxlib's LAPACK on a CPU is SciPy's OpenBLAS, which runs triangular solves on threads
of its own; after each solve those threads wait spinning, and on a machine with few
cores they take the cores from XLA's own threads for the rest of an EM iteration. On a
2-core CPU, a (1e5, 32, 16) Gaussian mixture iteration took 153-170 ms with LAPACK's
solve of its sixteen 32 x 32 Cholesky factors and 93-119 ms with the factors inverted
here (117-119 ms with LAPACK and ``OPENBLAS_NUM_THREADS=1``); a (1e5, 32, 8) factor
analysis iteration 18.6-25.7 ms with ``cho_solve`` (15.0-15.6 ms with
``OPENBLAS_NUM_THREADS=1``) and 9.8-10.8 ms multiplying by the inverse from here.
Cholesky factorisations stay LAPACK's (single-threaded at these sizes), and GPUs keep
cuBLAS's solves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from latentem._base import Array

# Backends on which triangular matrices are inverted by forward substitution in XLA.
SUBSTITUTION_BACKENDS = ("cpu",)


def lower_triangular_inverse(lower: Array) -> Array:
    r"""Inverse of lower-triangular matrices ``(..., d, d)``.

    On the backends of ``SUBSTITUTION_BACKENDS`` (the CPU) by forward substitution in
    XLA, a row at a time, as LAPACK's ``trtri``:
    :math:`X_{i\cdot} = (e_i - \sum_{m<i} L_{im} X_{m\cdot}) / L_{ii}`, a ``fori_loop``
    of batched vector-matrix products, so the program stays small for any ``d``;
    elsewhere by the backend's triangular solve against the identity. Either way the
    result is lower triangular, and a factor with NaN (from a matrix that is not
    positive definite) gives NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> lower_triangular_inverse(jnp.array([[2.0, 0.0], [1.0, 4.0]])).tolist()
      [[0.5, 0.0], [-0.125, 0.25]]
    """
    n_features = lower.shape[-1]
    identity = jnp.eye(n_features, dtype=lower.dtype)
    if jax.default_backend() not in SUBSTITUTION_BACKENDS:
        return solve_triangular(lower, jnp.broadcast_to(identity, lower.shape), lower=True)

    def next_row(i: Array, inverse: Array) -> Array:
        row = jax.lax.dynamic_index_in_dim(lower, i, axis=-2, keepdims=False)  # (..., d)
        diagonal = jax.lax.dynamic_index_in_dim(row, i, axis=-1)  # (..., 1)
        unit_row = jnp.broadcast_to(identity[i], row.shape)
        # Rows i and beyond of `inverse` are still zero: the product sums over m < i.
        value = (unit_row - jnp.einsum("...m,...mj->...j", row, inverse)) / diagonal
        return jax.lax.dynamic_update_index_in_dim(inverse, value, i, axis=-2)

    return jax.lax.fori_loop(0, n_features, next_row, jnp.zeros_like(lower))


def inverse_from_cholesky(lower: Array) -> Array:
    r""":math:`M^{-1} = L^{-\top} L^{-1}` from the Cholesky factor :math:`L` of a
    positive-definite :math:`M`, what ``cho_solve((lower, True), I)`` gives.

    Example:
      >>> import jax.numpy as jnp
      >>> inverse_from_cholesky(jnp.array([[2.0, 0.0], [0.0, 4.0]])).tolist()
      [[0.25, 0.0], [0.0, 0.0625]]
    """
    inverse = lower_triangular_inverse(lower)
    return jnp.swapaxes(inverse, -1, -2) @ inverse
