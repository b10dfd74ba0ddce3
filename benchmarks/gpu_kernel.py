"""The Gaussian mixture's fused GPU kernel against the engine's XLA path, per iteration.

Batches of small full-covariance fits, vmapped ``fit_em`` with tol = 0; the same data
and starts for both paths. Per-iteration time = (time of 120 iterations - time of 20)
/ 100, best of 3 runs, in 3 alternating rounds; prints one JSON line per path and case
with the compile time and the largest difference of final log-likelihoods.

    python benchmarks/gpu_kernel.py                      # float32 cases
    JAX_ENABLE_X64=1 python benchmarks/gpu_kernel.py     # float64 cases

Needs an NVIDIA GPU (elsewhere the kernel runs through Pallas's interpreter).
"""

import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import latentem as lem

gaussian_mixture_module = importlib.import_module("latentem.models.gaussian_mixture")
SHORT, LONG = 20, 120


def case(n_datasets, n_samples, n_features, n_components, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (n_datasets, n_components, n_features))
    labels = rng.integers(0, n_components, (n_datasets, n_samples))
    noise = rng.standard_normal((n_datasets, n_samples, n_features))
    x = jnp.asarray(np.take_along_axis(centres, labels[:, :, None], 1) + noise, dtype)
    weights = jnp.ones((n_datasets, n_samples), dtype)
    models = {
        path: gaussian_mixture_module._gaussian_mixture(
            n_components, "full", 1e-6, "kmeans++", "absolute", path
        )
        for path in (None, "compiled")
    }
    keys = jax.random.split(jax.random.key(0), n_datasets)
    start = jax.jit(jax.vmap(models[None].init))(keys, x, weights)
    programs, results = {}, {}
    for path, model in models.items():
        programs[path] = {}
        for n_iter in (SHORT, LONG):
            fit = lem.jit(
                jax.vmap(
                    lambda p, xx, ww, n_iter=n_iter, model=model: lem.fit_em(
                        model, p, xx, weights=ww, max_iter=n_iter, tol=0.0
                    )
                )
            )
            begin = time.perf_counter()
            programs[path][n_iter] = fit.lower(start, x, weights).compile()
            compile_time = time.perf_counter() - begin
        result = programs[path][LONG](start, x, weights)
        results[path] = {
            "compile_s": compile_time,
            "log_likelihood": np.asarray(result.log_likelihood, np.float64),
            "status_counts": np.bincount(np.asarray(result.status), minlength=4).tolist(),
            "times": [],
        }

    def run(program):
        begin = time.perf_counter()
        jax.block_until_ready(program(start, x, weights))
        return time.perf_counter() - begin

    for path in programs:
        run(programs[path][SHORT]), run(programs[path][LONG])
    for _ in range(3):
        for path in programs:
            short = min(run(programs[path][SHORT]) for _ in range(3))
            long = min(run(programs[path][LONG]) for _ in range(3))
            results[path]["times"].append((long - short) / (LONG - SHORT))
    reference = results[None]["log_likelihood"]
    for path, result in results.items():
        best = min(result["times"])
        print(
            json.dumps(
                {
                    "case": [n_datasets, n_samples, n_features, n_components, np.dtype(dtype).name],
                    "path": "kernel" if path else "xla",
                    "ms_per_iter": best * 1e3,
                    "all_ms": [t * 1e3 for t in result["times"]],
                    "fits_per_s_100_iters": n_datasets / (best * 100),
                    "compile_s": result["compile_s"],
                    "max_abs_log_likelihood_difference": float(
                        np.max(np.abs(result["log_likelihood"] - reference))
                    ),
                    "status_counts": result["status_counts"],
                }
            ),
            flush=True,
        )


def main() -> None:
    device = jax.devices()[0]
    print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    if jax.config.jax_enable_x64:
        cases = [
            (10000, 500, 2, 3, jnp.float64),
            (1000, 37, 1, 1, jnp.float64),
            (1000, 999, 3, 5, jnp.float64),
        ]
    else:
        cases = [(10000, 500, 2, 3), (10000, 2000, 4, 8), (1000, 500, 2, 3)]
    for arguments in cases:
        case(*arguments)


if __name__ == "__main__":
    main()
