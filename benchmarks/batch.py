"""Fitting many small Gaussian mixtures: latentem against scikit-learn and gmmx.

Three measurements, printed as Markdown tables:

1. **Fixed iterations** (the like-for-like kernel comparison): ``--batch`` datasets
   (default 1000) of 500 points, 2 features, 3 full-covariance components, the same
   initial parameters for every library, exactly 100 EM iterations (``tol = 0``).
   latentem runs one vmapped ``fit_em`` call (compile time reported separately);
   scikit-learn a loop of ``GaussianMixture`` fits; gmmx a loop of its jitted
   ``EMFitter.fit`` (and, for reference, the same fit under ``jax.vmap``). Loops are
   timed on a subset of the datasets and scaled to the batch (said in the table).
2. **End to end with defaults**: k-means++ initialisation, ``tol = 1e-3``, 5 restarts:
   ``lem.fit_batch`` against scikit-learn's ``GaussianMixture(n_init=5,
   init_params="k-means++")`` in a loop.
3. **Model selection**: ``lem.select_n_components`` (one program, candidates padded to
   the largest) against one compiled ``lem.fit`` per candidate, compile + run and run
   alone.

Every library uses scikit-learn's absolute ``reg_covar = 1e-6`` (latentem's
``reg_covar_mode="absolute"``) so that all of them run the same algorithm; the script
checks that the final log-likelihoods agree. scikit-learn computes in float64; gmmx
only supports float32; latentem runs in float32 unless ``--x64``. scikit-learn runs with
one BLAS thread (``threadpoolctl``): on these tiny matrices a multi-threaded BLAS only
spins, and on two busy cores made each fit 10 to 50 times slower.

Usage::

    python benchmarks/batch.py              # B = 1000, all three measurements
    python benchmarks/batch.py --quick      # a smoke run in well under a minute
    python benchmarks/batch.py --x64        # latentem in float64
    python benchmarks/batch.py --batch 10000 --sklearn-subset 20 --sections fixed,end-to-end  # GPU
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import warnings

N_SAMPLES = 500
N_FEATURES = 2
N_COMPONENTS = 3
N_ITER = 100
REG_COVAR = 1e-6


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="number of datasets (default 1000)")
    parser.add_argument("--quick", action="store_true", help="small smoke run (B = 64, few repeats)")
    parser.add_argument("--x64", action="store_true", help="latentem in float64 (default float32)")
    parser.add_argument(
        "--sklearn-subset", type=int, default=None, help="datasets timed in the loops (default 100)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs of each latentem call (best kept)"
    )
    parser.add_argument(
        "--sklearn-threads",
        type=int,
        default=1,
        help="BLAS threads for scikit-learn (default 1; 0: BLAS default)",
    )
    parser.add_argument("--skip-gmmx", action="store_true", help="leave gmmx out")
    parser.add_argument(
        "--sections",
        default="fixed,end-to-end,selection",
        help="comma-separated measurements to run: fixed, end-to-end, selection (default all)",
    )
    arguments = parser.parse_args(argv)
    arguments.sections = [name.strip() for name in arguments.sections.split(",") if name.strip()]
    unknown = set(arguments.sections) - {"fixed", "end-to-end", "selection"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from fixed, end-to-end, selection")
    if arguments.batch is None:
        arguments.batch = 64 if arguments.quick else 1000
    if arguments.sklearn_subset is None:
        arguments.sklearn_subset = 8 if arguments.quick else 100
    arguments.sklearn_subset = min(arguments.sklearn_subset, arguments.batch)
    if arguments.repeats is None:
        arguments.repeats = 2 if arguments.quick else 5
    return arguments


ARGUMENTS = parse_arguments()
if ARGUMENTS.x64:
    os.environ["JAX_ENABLE_X64"] = "1"

import jax  # noqa: E402  (after choosing the precision)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import latentem as lem  # noqa: E402

# ---------------------------------------------------------------------------
# Data and timing
# ---------------------------------------------------------------------------


def make_datasets(n_datasets: int, seed: int = 0) -> np.ndarray:
    """``n_datasets`` samples of 500 points from random 3-component mixtures, float64."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-6, 6, (n_datasets, N_COMPONENTS, N_FEATURES))
    factors = rng.standard_normal((n_datasets, N_COMPONENTS, N_FEATURES, N_FEATURES))
    covariances = factors @ np.swapaxes(factors, -1, -2) / 2 + 0.3 * np.eye(N_FEATURES)
    weights = rng.dirichlet(np.full(N_COMPONENTS, 4.0), n_datasets)
    labels = (rng.random((n_datasets, N_SAMPLES, 1)) > np.cumsum(weights, axis=1)[:, None, :]).sum(axis=2)
    labels = np.minimum(labels, N_COMPONENTS - 1)
    noise = rng.standard_normal((n_datasets, N_SAMPLES, N_FEATURES))
    lower = np.linalg.cholesky(covariances)
    chosen_lower = np.take_along_axis(lower, labels[:, :, None, None], axis=1)
    chosen_means = np.take_along_axis(means, labels[:, :, None], axis=1)
    return chosen_means + np.einsum("bnij,bnj->bni", chosen_lower, noise)


def best_time(function, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``function()`` (which blocks), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def device_description() -> str:
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    kind = device.device_kind
    if device.platform == "cpu":
        processor = platform.processor() or platform.machine()
        return f"CPU ({kind}, {processor}), {cores} cores visible"
    return f"{device.platform.upper()} {kind} (host: {cores} CPU cores)"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 0.1 else f"{value * 1e3:.3g} ms"


# ---------------------------------------------------------------------------
# 1. Fixed iterations from the same initial parameters
# ---------------------------------------------------------------------------


def fixed_iterations(x64: np.ndarray, arguments: argparse.Namespace) -> list[str]:
    n_datasets = x64.shape[0]
    subset = arguments.sklearn_subset
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    model = lem.gaussian_mixture(N_COMPONENTS, reg_covar=REG_COVAR, reg_covar_mode="absolute")
    x = jnp.asarray(x64, dtype)
    weights = jnp.ones(x.shape[:2], dtype)
    # The same initial parameters for every library: latentem's k-means++ start.
    keys = jax.random.split(jax.random.key(0), n_datasets)
    start64 = jax.tree.map(
        lambda leaf: np.asarray(leaf, np.float64), jax.jit(jax.vmap(model.init))(keys, x, weights)
    )
    # scikit-learn checks that the weights sum to one in float64.
    start64 = start64._replace(weights=start64.weights / start64.weights.sum(axis=1, keepdims=True))
    start = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), start64)

    # lem.jit: jax.jit with latentem's XLA options (lem.compiler_options()), as lem.fit_batch uses.
    fit_many = lem.jit(jax.vmap(functools.partial(lem.fit_em, model, max_iter=N_ITER, tol=0.0)))
    begin = time.perf_counter()
    compiled = fit_many.lower(start, x).compile()
    compile_time = time.perf_counter() - begin
    result = jax.block_until_ready(compiled(start, x))
    run_time = best_time(lambda: jax.block_until_ready(compiled(start, x)), arguments.repeats)
    assert int(jnp.min(result.n_iter)) == N_ITER, "tol = 0 must run every iteration"

    # scikit-learn: a loop of fits from the same start, timed on a subset and scaled.
    sklearn_scores = []

    def sklearn_loop():
        sklearn_scores.clear()
        for index in range(subset):
            gm = GaussianMixture(
                N_COMPONENTS,
                covariance_type="full",
                tol=0.0,
                max_iter=N_ITER,
                reg_covar=REG_COVAR,
                weights_init=start64.weights[index],
                means_init=start64.means[index],
                precisions_init=np.linalg.inv(start64.covariances[index]),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gm.fit(x64[index])
            sklearn_scores.append(gm.score(x64[index]))

    with threadpool_limits(limits=arguments.sklearn_threads or None):
        sklearn_time = best_time(sklearn_loop, 1) * n_datasets / subset
    # The same algorithm: final mean log-likelihoods agree (EM is contracting here).
    ours = np.asarray(result.log_likelihood[:subset], np.float64)
    agreement = float(np.max(np.abs(ours - np.asarray(sklearn_scores))))

    rows = [
        [
            f"latentem, one vmapped fit_em ({np.dtype(dtype).name})",
            seconds(run_time),
            seconds(compile_time),
            f"{n_datasets / run_time:,.0f}",
            "1",
        ],
        [
            f"scikit-learn loop (float64, {arguments.sklearn_threads or 'default'} BLAS thread(s); "
            f"{subset} fits timed, scaled)",
            seconds(sklearn_time),
            "-",
            f"{n_datasets / sklearn_time:,.0f}",
            f"{sklearn_time / run_time:,.1f}",
        ],
    ]
    if not arguments.skip_gmmx:
        rows += gmmx_rows(x64, start64, n_datasets, subset, run_time, arguments)
    lines = [
        f"### Fixed iterations: {n_datasets} datasets x {N_SAMPLES} points, {N_FEATURES} features, "
        f"{N_COMPONENTS} full components, {N_ITER} EM iterations, same start",
        "",
        table(["implementation", "run time", "compile", "fits / s", "slower than latentem by"], rows),
        "",
        f"Largest |difference| of final mean log-likelihood, latentem vs scikit-learn: {agreement:.2e}.",
        "",
    ]
    return lines


def gmmx_rows(x64, start64, n_datasets, subset, run_time, arguments) -> list[list[str]]:
    try:
        from gmmx import EMFitter, GaussianMixtureModelJax
    except ImportError:
        return [["gmmx", "not installed", "-", "-", "-"]]
    fitter = EMFitter(max_iter=N_ITER, tol=0.0, reg_covar=REG_COVAR)
    x32 = jnp.asarray(x64, jnp.float32)
    weights = jnp.asarray(start64.weights, jnp.float32)
    means = jnp.asarray(start64.means, jnp.float32)
    covariances = jnp.asarray(start64.covariances, jnp.float32)

    def one(x, weights, means, covariances):
        gmm = GaussianMixtureModelJax.from_squeezed(means=means, covariances=covariances, weights=weights)
        return fitter.fit(x=x, gmm=gmm).log_likelihood

    jax.block_until_ready(one(x32[0], weights[0], means[0], covariances[0]))  # compile

    def loop():
        for index in range(subset):
            jax.block_until_ready(one(x32[index], weights[index], means[index], covariances[index]))

    loop_time = best_time(loop, 1) * n_datasets / subset
    batched = jax.jit(jax.vmap(one))
    begin = time.perf_counter()
    compiled = batched.lower(x32, weights, means, covariances).compile()
    compile_time = time.perf_counter() - begin
    vmapped_time = best_time(
        lambda: jax.block_until_ready(compiled(x32, weights, means, covariances)), arguments.repeats
    )
    return [
        [
            f"gmmx loop of jitted fits (float32; {subset} timed, scaled)",
            seconds(loop_time),
            "-",
            f"{n_datasets / loop_time:,.0f}",
            f"{loop_time / run_time:,.1f}",
        ],
        [
            "gmmx fit under jax.vmap (float32)",
            seconds(vmapped_time),
            seconds(compile_time),
            f"{n_datasets / vmapped_time:,.0f}",
            f"{vmapped_time / run_time:,.1f}",
        ],
    ]


# ---------------------------------------------------------------------------
# 2. End to end with the default tolerance and restarts
# ---------------------------------------------------------------------------


def end_to_end(x64: np.ndarray, arguments: argparse.Namespace) -> list[str]:
    n_datasets = x64.shape[0]
    subset = arguments.sklearn_subset
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    model = lem.gaussian_mixture(N_COMPONENTS, reg_covar=REG_COVAR, reg_covar_mode="absolute")
    x = jnp.asarray(x64, dtype)
    key = jax.random.key(1)

    def latentem_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lem.ConvergenceWarning)
            return jax.block_until_ready(lem.fit_batch(model, key, x, n_init=5, tol=1e-3))

    begin = time.perf_counter()
    result = latentem_fit()
    first_call = time.perf_counter() - begin
    run_time = best_time(latentem_fit, arguments.repeats)

    sklearn_scores = []

    def sklearn_loop():
        sklearn_scores.clear()
        for index in range(subset):
            gm = GaussianMixture(
                N_COMPONENTS,
                n_init=5,
                tol=1e-3,
                reg_covar=REG_COVAR,
                init_params="k-means++",
                random_state=index,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gm.fit(x64[index])
            sklearn_scores.append(gm.score(x64[index]))

    with threadpool_limits(limits=arguments.sklearn_threads or None):
        sklearn_time = best_time(sklearn_loop, 1) * n_datasets / subset
    difference = np.asarray(result.log_likelihood[:subset], np.float64) - np.asarray(sklearn_scores)
    rows = [
        [
            f"latentem fit_batch ({np.dtype(dtype).name})",
            seconds(run_time),
            seconds(max(first_call - run_time, 0.0)),
            f"{n_datasets / run_time:,.0f}",
            "1",
        ],
        [
            f"scikit-learn loop, n_init=5 (float64, {arguments.sklearn_threads or 'default'} BLAS "
            f"thread(s); {subset} fits timed, scaled)",
            seconds(sklearn_time),
            "-",
            f"{n_datasets / sklearn_time:,.0f}",
            f"{sklearn_time / run_time:,.1f}",
        ],
    ]
    return [
        f"### End to end: k-means++ init, tol 1e-3, 5 restarts, max_iter 100 ({n_datasets} datasets)",
        "",
        table(["implementation", "run time", "compile", "fits / s", "slower than latentem by"], rows),
        "",
        "Final mean log-likelihood, latentem minus scikit-learn (different random starts): "
        f"median {np.median(difference):+.2e}, min {np.min(difference):+.2e}, max {np.max(difference):+.2e}.",
        "",
    ]


# ---------------------------------------------------------------------------
# 3. Model selection: one padded program against one compiled fit per candidate
# ---------------------------------------------------------------------------


def selection(x64: np.ndarray, arguments: argparse.Namespace) -> list[str]:
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    candidates = tuple(range(1, 5 if arguments.quick else 9))
    n_init = 5
    rows = []
    for n_datasets in (1, min(100, x64.shape[0])):
        x = jnp.asarray(x64[:n_datasets] if n_datasets > 1 else x64[0], dtype)
        key = jax.random.key(2)

        def padded(x=x, key=key):
            return jax.block_until_ready(
                lem.select_n_components(key, x, candidates, n_init=n_init, reg_covar_mode="absolute")
            )

        def per_candidate(x=x, key=key):
            keys = jax.random.split(key, len(candidates))
            scores = []
            for row, n_components in enumerate(candidates):
                model = lem.gaussian_mixture(n_components, reg_covar_mode="absolute")
                if x.ndim == 2:
                    result = lem.fit(model, keys[row], x, n_init=n_init)
                    scores.append(lem.bic(model, result.params, x))
                else:
                    result = lem.fit_batch(model, keys[row], x, n_init=n_init)
                    scores.append(jax.vmap(lambda p, d, model=model: lem.bic(model, p, d))(result.params, x))
            return jax.block_until_ready(jnp.stack(scores))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lem.ConvergenceWarning)
            for name, function in (
                ("one padded program", padded),
                ("one compiled fit per candidate", per_candidate),
            ):
                begin = time.perf_counter()
                function()
                first = time.perf_counter() - begin
                run = best_time(function, arguments.repeats)
                rows.append([str(n_datasets), name, seconds(first), seconds(run)])
    return [
        f"### Model selection: candidates {candidates[0]}..{candidates[-1]}, n_init {n_init}, "
        f"{N_SAMPLES} points each",
        "",
        table(["datasets", "approach", "compile + first run", "run (compiled)"], rows),
        "",
    ]


def main() -> None:
    arguments = ARGUMENTS
    x64 = make_datasets(arguments.batch)
    print(f"## latentem batch benchmark ({time.strftime('%Y-%m-%d')})")
    print()
    print(f"- device: {device_description()}")
    print(f"- jax {jax.__version__}, latentem {lem.__version__}, Python {sys.version.split()[0]}")
    print(f"- latentem precision: {'float64' if jax.config.jax_enable_x64 else 'float32'}")
    print()
    sections = {"fixed": fixed_iterations, "end-to-end": end_to_end, "selection": selection}
    for name in arguments.sections:
        print("\n".join(sections[name](x64, arguments)), flush=True)


if __name__ == "__main__":
    main()
