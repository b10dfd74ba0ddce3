"""Data-parallel fits: x sharded over devices (jax.sharding) gives the unsharded result,
over the samples of one dataset (fit_em, fit) or over the datasets of a batch (fit_batch).

Run in a subprocess with four virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``), since the device count is
fixed when JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import functools, importlib, json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import latentem as lem

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("samples",))
    rows, vector = NamedSharding(mesh, P("samples", None)), NamedSharding(mesh, P("samples"))
    rng = np.random.default_rng(0)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    x = jnp.asarray(rng.standard_normal((800, 3)) + rng.choice([0.0, 5.0], (800, 1)), dtype)
    weights = jnp.asarray(rng.integers(0, 3, 800), dtype)
    x_sharded, weights_sharded = jax.device_put(x, rows), jax.device_put(weights, vector)

    report = {"devices": len(x_sharded.sharding.device_set)}
    cases = {
        "full": ("full", "auto"),
        "diag": ("diag", "auto"),
        "full_expanded": ("full", "expanded"),
        "full_grouped": ("full", "auto"),
        "full_block_centred": ("full", "auto"),
    }
    for name, (covariance_type, moments) in cases.items():
        if name == "full_grouped":
            # Samples reordered once per fit (a CPU's large full fits), here for small
            # data in blocks of 100 samples: three clusters far apart in ten features.
            gm = importlib.import_module("latentem.models.gaussian_mixture")
            gm._ACTIVE_COMPONENTS_MIN_VALUES = 0
            gm._ACTIVE_COMPONENTS_MAX_BITS = 64
            gm._CHUNK_ELEMENTS = {"cpu": 100 * 3 * 10}
            x = jnp.asarray(rng.standard_normal((800, 10)) + rng.choice([0.0, 40.0, 80.0], (800, 1)), dtype)
            x_sharded = jax.device_put(x, rows)
        if name == "full_block_centred":
            # Moments about the centres of blocks of grouped samples (a CPU's large
            # fits of five to eight features), here for small data in blocks of 32.
            gm._BLOCK_CENTRED_SAMPLES = {"cpu": 32}
            gm._BLOCK_CENTRED_MAX_PADDING = 1
            gm._SCATTER_BY_ENTRIES_MIN_VALUES = 0
            x = jnp.asarray(rng.standard_normal((800, 6)) + rng.choice([0.0, 40.0, 80.0], (800, 1)), dtype)
            x_sharded = jax.device_put(x, rows)
        model = lem.gaussian_mixture(3, covariance_type, moments=moments)
        if name == "full_grouped":
            assert isinstance(model.fused_prepare(x, weights), gm._GroupedData)
        if name == "full_block_centred":
            assert isinstance(model.fused_prepare(x, weights), gm._BlockCentredData)
        params = model.init(jax.random.key(0), x, weights)
        fit_em = jax.jit(functools.partial(lem.fit_em, model, max_iter=30, tol=0.0))
        plain = fit_em(params, x, weights=weights)
        sharded = fit_em(params, x_sharded, weights=weights_sharded)
        # Data-parallel, not gathered: the compiled program reduces across devices.
        program = fit_em.lower(params, x_sharded, weights=weights_sharded).compile().as_text()
        restarts = lem.fit(model, jax.random.key(1), x, weights=weights, n_init=2, max_iter=30, tol=0.0)
        restarts_sharded = lem.fit(model, jax.random.key(1), x_sharded, weights=weights_sharded, n_init=2,
                                   max_iter=30, tol=0.0)
        difference = lambda a, b: max(
            float(jnp.max(jnp.abs(u - v) / (1 + jnp.abs(v))))
            for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
        if moments == "expanded":  # the expanded moments, not their centred fallback, ran
            gm = importlib.import_module("latentem.models.gaussian_mixture")
            reference = (weights @ x) / weights.sum()
            factor = gm.precision_cholesky(sharded.params.covariances, "full")
            assert bool(gm._expanded_accurate(sharded.params, reference, factor))
        report[name] = {
            "fit_em": difference(sharded.params, plain.params),
            "fit_em_objective": abs(float(sharded.log_likelihood - plain.log_likelihood)),
            "fit": difference(restarts_sharded.params, restarts.params),
            "n_iter": [int(sharded.n_iter), int(plain.n_iter)],
            "status": [int(sharded.status), int(plain.status)],
            "all_reduce": "all-reduce" in program,
        }

    # A batch of datasets sharded over devices: each device fits its own datasets.
    by_dataset = Mesh(np.array(jax.devices()), ("datasets",))
    batch = jnp.asarray(rng.standard_normal((8, 200, 2)) + rng.choice([0.0, 6.0], (8, 200, 1)), dtype)
    batch_weights = jnp.asarray(rng.integers(0, 3, (8, 200)), dtype)
    batch_sharded = jax.device_put(batch, NamedSharding(by_dataset, P("datasets", None, None)))
    batch_weights_sharded = jax.device_put(batch_weights, NamedSharding(by_dataset, P("datasets", None)))
    model = lem.gaussian_mixture(2)
    options = dict(n_init=2, max_iter=30, tol=0.0)
    plain = lem.fit_batch(model, jax.random.key(2), batch, weights=batch_weights, **options)
    sharded = lem.fit_batch(model, jax.random.key(2), batch_sharded, weights=batch_weights_sharded, **options)
    report["fit_batch"] = {
        "difference": difference(sharded.params, plain.params),
        "objective": float(jnp.max(jnp.abs(sharded.log_likelihood - plain.log_likelihood))),
        "status": [sharded.status.tolist(), plain.status.tolist()],
        "result_devices": len(sharded.params.means.sharding.device_set),
        "result_spec": str(sharded.params.means.sharding.spec),
    }
    print(json.dumps(report))
    """
)


def test_sharded_fit_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    output = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert output.returncode == 0, output.stderr[-3000:]
    report = json.loads(output.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    tolerance = 1e-10 if os.environ.get("JAX_ENABLE_X64") in ("1", "true", "True") else 1e-4
    for name in ("full", "diag", "full_expanded", "full_grouped", "full_block_centred"):
        result = report[name]
        # Sums over samples are reduced per device, then across: the same up to rounding.
        assert result["fit_em"] < tolerance, result
        assert result["fit_em_objective"] < tolerance, result
        assert result["fit"] < tolerance, result
        assert result["n_iter"] == [30, 30] and result["status"][0] == result["status"][1]
        assert result["all_reduce"], "the sharded fit did not reduce across devices"
    # A batch sharded over datasets gives the unsharded batch's fits, and stays sharded.
    batch = report["fit_batch"]
    assert batch["difference"] < tolerance and batch["objective"] < tolerance, batch
    assert batch["status"][0] == batch["status"][1], batch
    assert batch["result_devices"] == 4 and "datasets" in batch["result_spec"], batch
