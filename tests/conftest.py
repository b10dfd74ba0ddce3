"""Test configuration: strict dtype and rank promotion, dtype fixtures.

The whole suite runs twice in CI: as is (float32) and with ``JAX_ENABLE_X64=1``
(float64). The ``dtype`` fixture follows that switch.
"""

import jax
import numpy as np
import pytest

# Mixed-precision arithmetic and implicit broadcasting across ranks are bugs here.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


@pytest.fixture
def dtype():
    """The floating dtype of this run: float64 under JAX_ENABLE_X64=1, else float32."""
    return np.dtype(np.float64) if jax.config.jax_enable_x64 else np.dtype(np.float32)


@pytest.fixture(params=COVARIANCE_TYPES)
def covariance_type(request):
    return request.param


def pytest_report_header(config):
    return f"jax {jax.__version__}, x64={jax.config.jax_enable_x64}, backend={jax.default_backend()}"
