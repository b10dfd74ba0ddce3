"""The fused EM iteration of small full-covariance Gaussian mixtures (a Pallas kernel).

On a GPU the factory's full-covariance models use it; here, without a GPU, the same
kernel runs through Pallas's interpreter and is checked against a NumPy computation,
the engine's unfused iteration and ``check_model``; its lowering for CUDA (where the
Triton backend's constraints are enforced) is checked without a device.
"""

import contextlib
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import latentem as lem
from latentem.models import _gaussian_kernel
from tests.helpers import assert_trees_all_close, assert_trees_equal, random_covariances

gaussian_mixture_module = importlib.import_module("latentem.models.gaussian_mixture")

pytestmark = pytest.mark.skipif(
    _gaussian_kernel.pl is None, reason="this JAX has no Pallas Triton backend (the kernel is not used)"
)


def kernel_model(n_components, mode="interpret", reg_covar=1e-6, reg_covar_mode="absolute"):
    return gaussian_mixture_module._gaussian_mixture(
        n_components, "full", reg_covar, "kmeans++", reg_covar_mode, mode
    )


def datasets(n_datasets, n_samples, n_features, n_components, dtype, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_datasets, n_components, n_features))
    labels = rng.integers(0, n_components, (n_datasets, n_samples))
    x = np.take_along_axis(centres, labels[:, :, None], 1) + rng.standard_normal(
        (n_datasets, n_samples, n_features)
    )
    return x.astype(dtype)


def brute_force_moments(x, weights, params):
    """The kernel's outputs in float64 NumPy, from the definitions."""
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    pi, means, covariances = (np.asarray(leaf, np.float64) for leaf in params)
    n_features = x.shape[1]
    log_joint = np.stack(
        [
            np.log(pi[k])
            - 0.5 * n_features * np.log(2 * np.pi)
            - 0.5 * np.linalg.slogdet(covariances[k])[1]
            - 0.5 * np.einsum("ni,ij,nj->n", x - means[k], np.linalg.inv(covariances[k]), x - means[k])
            for k in range(len(pi))
        ],
        axis=1,
    )
    largest = log_joint.max(axis=1, keepdims=True)
    log_p = np.log(np.exp(log_joint - largest).sum(axis=1)) + largest[:, 0]
    responsibilities = weights[:, None] * np.exp(log_joint - log_p[:, None])
    counts = responsibilities.sum(axis=0)
    reference = pi @ means
    centred = x - reference
    centred_means = responsibilities.T @ centred / counts[:, None]
    scatter = np.stack(
        [
            (responsibilities[:, k, None] * (centred - centred_means[k])).T @ (centred - centred_means[k])
            for k in range(len(pi))
        ]
    )
    total = weights.sum()
    return _gaussian_kernel.Moments(
        log_likelihood=np.sum(weights * log_p),
        total=total,
        counts=counts,
        centred_means=centred_means,
        scatter=scatter,
        second_moments=weights @ np.square(centred) / total,
    )


@pytest.mark.parametrize("shape", [(37, 1, 1), (500, 2, 3), (999, 3, 5), (2048, 4, 8)])
def test_kernel_moments_equal_a_numpy_computation(shape, dtype):
    n_samples, n_features, n_components = shape
    rng = np.random.default_rng(1)
    x = datasets(1, n_samples, n_features, n_components, dtype)[0]
    weights = rng.uniform(0.5, 2, n_samples).astype(dtype)
    weights[::7] = 0  # zero weights must not count
    params = lem.GaussianMixtureParams(
        weights=rng.dirichlet(np.ones(n_components)).astype(dtype),
        means=x[rng.choice(n_samples, n_components, replace=False)],
        covariances=random_covariances(rng, "full", n_components, n_features).astype(dtype),
    )
    reference = params.weights @ params.means
    factor = gaussian_mixture_module.precision_cholesky(jnp.asarray(params.covariances), "full")
    moments = _gaussian_kernel.moments(
        jnp.asarray(x),
        jnp.asarray(weights),
        jnp.asarray(reference),
        factor,
        jnp.einsum("kd,kde->ke", params.means - reference, factor),
        jnp.log(params.weights) + jnp.sum(jnp.log(jnp.diagonal(factor, axis1=1, axis2=2)), axis=1),
        interpret=True,
    )
    expected = brute_force_moments(x, weights, params)
    rtol = 1e-10 if dtype == np.float64 else 2e-4
    for name, value, reference_value in zip(moments._fields, moments, expected, strict=True):
        value, reference_value = np.asarray(value, np.float64), np.asarray(reference_value, np.float64)
        scale = np.max(np.abs(reference_value)) + 1e-300
        error = np.max(np.abs(value - reference_value)) / scale
        assert error <= rtol, f"{name}: relative error {error:.2g} > {rtol:.0g}"


def test_check_model_passes_the_fused_step_and_flags_a_wrong_one(dtype):
    x = jnp.asarray(datasets(1, 300, 2, 3, dtype, seed=3)[0])
    model = kernel_model(3)
    report = lem.check_model(model, jax.random.key(0), x, n_samples=300)
    assert report.passed, str(report)
    assert report["fused_step"].passed is True, str(report)

    def fused_step_ignoring_weights(params, x, weights):
        return model.fused_step(params, x, jnp.ones_like(weights))

    broken = model._replace(fused_step=fused_step_ignoring_weights)
    weights = jnp.asarray(np.random.default_rng(0).uniform(0.2, 3, x.shape[0]), dtype)
    report = lem.check_model(broken, jax.random.key(0), x, weights=weights, n_samples=300)
    assert report["fused_step"].passed is False
    assert "fused_step differs" in report["fused_step"].message


def test_batched_fits_with_the_kernel_equal_the_engine_and_isolate_degenerate_members(dtype):
    n_datasets, n_samples = 8, 200
    x = datasets(n_datasets, n_samples, 2, 3, dtype, seed=4)
    weights = np.ones((n_datasets, n_samples), dtype)
    weights[1, 150:] = 0  # a ragged member
    x[2, 5] = np.nan  # non-finite data
    x[3] = x[3, 0]  # all points identical
    x, weights = jnp.asarray(x), jnp.asarray(weights)
    engine = gaussian_mixture_module._gaussian_mixture(3, "full", 1e-6, "kmeans++", "absolute", None)
    fused = kernel_model(3)
    keys = jax.random.split(jax.random.key(0), n_datasets)
    start = jax.vmap(engine.init)(keys, jnp.nan_to_num(x), weights)

    def fit(model, start, x, weights):
        one = functools.partial(lem.fit_em, model, max_iter=30, tol=0.0)
        return jax.jit(jax.vmap(lambda p, xx, ww: one(p, xx, weights=ww)))(start, x, weights)

    expected = fit(engine, start, x, weights)
    result = fit(fused, start, x, weights)
    np.testing.assert_array_equal(result.status, expected.status)
    assert int(result.status[2]) == int(lem.Status.NONFINITE)
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    assert_trees_all_close(result.params, expected.params, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(result.log_likelihood, expected.log_likelihood, rtol=rtol, atol=rtol)

    # The healthy members alone: bitwise the same results.
    healthy = np.array([0, 1, 4, 5, 6, 7])
    alone = fit(fused, jax.tree.map(lambda leaf: leaf[healthy], start), x[healthy], weights[healthy])
    assert_trees_equal(alone.params, jax.tree.map(lambda leaf: leaf[healthy], result.params))


def an_abstract_gpu():
    """A context naming the GPU to lower for, where there is none: from JAX 0.12 Pallas's
    Triton lowering asks for the device's kind (and fails without a GPU) unless the
    abstract mesh names one. JAX versions without abstract devices did not ask."""
    try:
        device = jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"
        )
        mesh = jax.sharding.AbstractMesh((1,), ("fits",), abstract_device=device)
        return jax.sharding.use_abstract_mesh(mesh)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


@pytest.mark.parametrize(
    ("shape", "fused"),
    [((500, 2, 3), True), ((2048, 4, 8), True), ((2049, 2, 3), False), ((500, 5, 3), False)],
)
def test_the_kernel_lowers_for_cuda_within_its_sizes(shape, fused, dtype):
    """Lowering for CUDA runs Pallas's Triton lowering (power-of-two shapes and the
    operations it supports) without a GPU; beyond its sizes the model declines."""
    n_samples, n_features, n_components = shape
    model = kernel_model(n_components, mode="compiled")
    x = jnp.zeros((4, n_samples, n_features), dtype)
    weights = jnp.ones((4, n_samples), dtype)
    params = lem.GaussianMixtureParams(
        weights=jnp.full((4, n_components), 1 / n_components, dtype),
        means=jnp.zeros((4, n_components, n_features), dtype),
        covariances=jnp.broadcast_to(
            jnp.eye(n_features, dtype=dtype), (4, n_components, n_features, n_features)
        ),
    )
    fit = jax.jit(jax.vmap(lambda p, xx, ww: lem.fit_em(model, p, xx, weights=ww, max_iter=5)))
    with an_abstract_gpu():
        text = fit.trace(params, x, weights).lower(lowering_platforms=("cuda",)).as_text()
    assert ("gaussian_mixture_em_moments" in text) is fused


def test_the_factory_uses_the_kernel_for_full_covariances_on_the_configured_backends(monkeypatch):
    on_a_gpu = jax.default_backend() == "gpu"
    model = lem.gaussian_mixture(3)
    x = jnp.asarray(datasets(1, 300, 2, 3, np.float32, seed=6)[0])
    weights = jnp.ones(x.shape[0], x.dtype)
    # (A CPU's model has a fused step too, for large fits: it declines this small one.)
    params = model.init(jax.random.key(0), x, weights)
    fused = None if model.fused_step is None else model.fused_step(params, x, weights)
    assert (fused is not None) == on_a_gpu
    monkeypatch.setitem(gaussian_mixture_module._KERNEL_MODES, jax.default_backend(), "interpret")
    assert lem.gaussian_mixture(3).fused_step is not None
    # Not for other covariance types (a CPU's diagonal model has a fused step for large
    # float64 fits, the expanded one: it declines this small float32 one).
    diagonal = lem.gaussian_mixture(3, "diag")
    diagonal_params = diagonal.init(jax.random.key(0), x, weights)
    assert diagonal.fused_step is None or diagonal.fused_step(diagonal_params, x, weights) is None
    # Hard EM replaces the E-step: the soft fused iteration must not be used.
    assert lem.hard_em(lem.gaussian_mixture(3)).fused_step is None


def test_the_compiled_kernel_runs_interpreted_off_nvidia_gpus(dtype):
    """A GPU machine's model fitting data placed on its CPU: the program is lowered for
    the CPU, where the kernel runs through the interpreter, with the same result."""
    x = jnp.asarray(datasets(1, 300, 2, 3, dtype, seed=5)[0])
    engine = gaussian_mixture_module._gaussian_mixture(3, "full", 1e-6, "kmeans++", "relative", None)
    compiled = gaussian_mixture_module._gaussian_mixture(3, "full", 1e-6, "kmeans++", "relative", "compiled")
    expected = lem.fit(engine, jax.random.key(0), x)
    result = lem.fit(compiled, jax.random.key(0), x)
    assert int(result.n_iter) == int(expected.n_iter)
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    assert_trees_all_close(result.params, expected.params, rtol=rtol, atol=rtol)
