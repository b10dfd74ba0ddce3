"""Single large fits: latentem vs scikit-learn vs gmmx, per-iteration time, compile time,
memory at scale, and GPU throughput.

Every library starts from the same initial parameters on the same data and runs a fixed
number of EM iterations (tol = 0). Per-iteration time is the difference between a long
and a short run divided by the difference in iterations, so set-up costs (input
conversion, initialisation, compilation) cancel; the long run is at least half a second
longer than the short one, and the libraries of a table are timed in ``--repeat``
interleaved rounds (see ``per_iteration``), each taking its best round.

    python benchmarks/single.py                 # CPU table, float32 and float64
    python benchmarks/single.py --quick         # small sizes, a smoke run
    python benchmarks/single.py --memory        # the (1e6, 32, 64) float32 memory check
    python benchmarks/single.py --diagonal      # diagonal and spherical fits (CPU)
    python benchmarks/single.py --gpu           # GPU per-iteration times, FLOP/s and accuracy
    python benchmarks/single.py --gpu --quick   # the same table at a small size (any backend)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

import numpy as np


def make_data(n_samples: int, n_features: int, n_components: int, seed: int = 0):
    """Data from a random Gaussian mixture and initial parameters shared by all libraries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_components, n_features))
    labels = rng.integers(0, n_components, n_samples)
    x = centres[labels] + rng.standard_normal((n_samples, n_features))
    weights = np.full(n_components, 1 / n_components)
    means = x[rng.choice(n_samples, n_components, replace=False)]
    covariances = np.broadcast_to(
        np.cov(x.T) + 1e-3 * np.eye(n_features), (n_components, n_features, n_features)
    )
    return x, weights, means, np.ascontiguousarray(covariances)


def per_iteration(
    runners, short: int, long: int, repeat: int, pause: float = 0.25, window: float = 0.5
) -> dict[str, float]:
    """Seconds per iteration of each of ``runners`` (name -> ``run(iterations)``).

    The runners are timed in interleaved rounds: each round runs every one of them for
    its long run and then ``short`` iterations, so a slow phase of a shared machine
    falls on all the libraries of a table alike rather than on whichever was being timed
    (until the twelfth session each library ran all its repeats in one block). A
    runner's time per iteration is its best long run less its best short one, over the
    rounds, divided by the difference in iterations.

    A runner's long run has ``long`` iterations, or more (at most 400 more than
    ``short``) where that takes less than ``window`` seconds beyond the short run
    (estimated from one timed short run): a scheduling hiccup of a few milliseconds is
    then a small part of the difference. In the fourteenth session, twelve alternations
    of latentem at (100000, 8, 8) in float32 gave per-iteration times of 4.47-8.34 ms
    with 13 iterations against 3 (a 50 ms difference) and 5.01-5.74 ms with 53 against
    3. The final log-likelihoods compared in the tables still come from ``long``
    iterations for every library.

    Each runner starts after ``pause`` idle seconds, untimed: OpenBLAS's worker threads
    (scikit-learn's products) busy-wait for a while after each call, and on a two-core
    machine they took a core from whatever ran next. In the thirteenth session, at
    (100000, 8, 8) in float32, latentem timed in rounds with scikit-learn took 8.4 and
    7.9 ms per iteration, alone 5.1 and 6.1, with a 0.3 s pause before each run 6.1 and
    4.8; ``OPENBLAS_THREAD_TIMEOUT=4`` (workers that sleep almost at once) also removed
    most of it.
    """
    longs = {}
    for name, run in runners.items():
        run(short)  # warm-up (compilation for the JAX libraries)
        run(long)
        start = time.perf_counter()
        run(short)
        # An overestimate (the short run's set-up counts as iterations): a shorter window.
        estimate = (time.perf_counter() - start) / short
        longs[name] = short + min(max(long - short, math.ceil(window / estimate)), 400)
        if longs[name] != long:
            run(longs[name])  # warm-up of the longer run
        print(f"  {name}: timed over {short} and {longs[name]} iterations", file=sys.stderr, flush=True)
    best = {(name, iterations): float("inf") for name in runners for iterations in (short, longs[name])}
    for _ in range(repeat):
        for name, run in runners.items():
            time.sleep(pause)
            for iterations in (longs[name], short):
                start = time.perf_counter()
                run(iterations)
                best[name, iterations] = min(best[name, iterations], time.perf_counter() - start)
    return {name: (best[name, longs[name]] - best[name, short]) / (longs[name] - short) for name in runners}


def of_type(covariances, covariance_type):
    """The shared full start covariances as ``covariance_type``'s (their diagonals, or
    the mean of each diagonal)."""
    if covariance_type == "full":
        return covariances
    variances = np.diagonal(covariances, axis1=1, axis2=2)
    return variances.copy() if covariance_type == "diag" else variances.mean(axis=1)


def latentem_runner(x, weights, means, covariances, dtype, moments="auto", covariance_type="full"):
    """``run(iterations)``: a compiled fit of that many iterations from the shared start."""
    import jax.numpy as jnp

    import latentem as lem

    model = lem.gaussian_mixture(
        means.shape[0], covariance_type, reg_covar=1e-6, reg_covar_mode="absolute", moments=moments
    )
    covariances = of_type(covariances, covariance_type)
    xj = jnp.asarray(x, dtype)
    params = lem.GaussianMixtureParams(*(jnp.asarray(a, dtype) for a in (weights, means, covariances)))
    compiled = {}

    def run(iterations):
        # lem.jit: jax.jit with latentem's XLA options, as lem.fit uses for data of this size.
        if iterations not in compiled:
            compiled[iterations] = lem.jit(functools.partial(lem.fit_em, model, max_iter=iterations, tol=0.0))
        result = compiled[iterations](params, xj)
        result.log_likelihood.block_until_ready()
        return result

    return run


def sklearn_runner(x, weights, means, covariances, dtype, blas_threads=None, covariance_type="full"):
    """``(run, score)``: ``run(iterations)`` is scikit-learn's fit of that many iterations
    from the shared start, ``score(fit)`` its mean log-likelihood of the data.

    ``blas_threads`` limits the BLAS threads of the fit (``threadpoolctl``, a dependency
    of scikit-learn); None leaves scikit-learn as a user gets it.
    """
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    xs = np.asarray(x, dtype)
    covariances = of_type(covariances, covariance_type)
    precisions = np.linalg.inv(covariances) if covariance_type == "full" else 1 / covariances

    def run(iterations):
        gm = GaussianMixture(
            means.shape[0],
            covariance_type=covariance_type,
            tol=0.0,
            max_iter=iterations,
            init_params="random_from_data",
            weights_init=weights,
            means_init=means,
            precisions_init=precisions,
            reg_covar=1e-6,
        )
        with warnings.catch_warnings(), threadpool_limits(blas_threads, user_api="blas"):
            warnings.simplefilter("ignore")
            return gm.fit(xs)

    return run, lambda fit: float(fit.score(xs))


def gmmx_runner(x, weights, means, covariances, dtype):
    """``(run, score)`` for gmmx as for ``sklearn_runner``, or None where gmmx does not run
    (not float32, or not installed)."""
    if np.dtype(dtype) != np.float32:
        return None  # gmmx checks for float32 and supports nothing else
    try:
        import jax.numpy as jnp
        from gmmx import EMFitter, GaussianMixtureModelJax
    except ImportError:
        return None
    xj = jnp.asarray(x, dtype)
    gmm = GaussianMixtureModelJax.from_squeezed(
        means=jnp.asarray(means, dtype),
        covariances=jnp.asarray(covariances, dtype),
        weights=jnp.asarray(weights, dtype),
        covariance_type="full",
    )
    fitters = {}

    def run(iterations):
        if iterations not in fitters:
            fitters[iterations] = EMFitter(max_iter=iterations, tol=0.0, reg_covar=1e-6)
        result = fitters[iterations].fit(xj, gmm)
        result.log_likelihood.block_until_ready()
        return result

    return run, lambda fit: float(fit.gmm.score(xj))


def first_fit_compile_time(n_components: int, n_features: int) -> tuple[float, float]:
    """Seconds of the first ``lem.fit`` call beyond a second identical call (a fresh
    process), and the same for the process's first ``jax.random.key(0)``.

    The key is made before the timed call, as a user passes one in: its first call
    starts JAX's CPU runtime and compiles JAX's seeding (0.1 s here), a cost of the
    process rather than of the fit. Until the tenth session the key was made inside the
    timed call; that figure is the sum of the two.
    """
    code = f"""
import time, numpy as np, jax, latentem as lem
x = np.random.default_rng(0).standard_normal((1000, {n_features}))
model = lem.gaussian_mixture({n_components})
def elapsed(call):
    start = time.perf_counter(); jax.block_until_ready(call()); return time.perf_counter() - start
key_first = elapsed(lambda: jax.random.key(0))
key_again = elapsed(lambda: jax.random.key(0))
key = jax.random.key(0)
fit_first = elapsed(lambda: lem.fit(model, key, x).log_likelihood)
fit_again = elapsed(lambda: lem.fit(model, key, x).log_likelihood)
print(fit_first - fit_again, key_first - key_again)
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fit_seconds, key_seconds = output.stdout.strip().splitlines()[-1].split()
    return float(fit_seconds), float(key_seconds)


def cpu_table(sizes, dtypes, short, long, repeat):
    rows = []
    for dtype in dtypes:
        for n, d, k in sizes:
            x, weights, means, covariances = make_data(n, d, k)
            runners = {
                "latentem": latentem_runner(x, weights, means, covariances, dtype),
                # The opt-in expanded moments (moments="expanded"; "auto" is centred on a CPU).
                "expanded": latentem_runner(x, weights, means, covariances, dtype, "expanded"),
            }
            sk_run, sk_score = sklearn_runner(x, weights, means, covariances, dtype)
            runners["sklearn"] = sk_run
            # scikit-learn with one BLAS thread: on this two-core machine its default
            # (OpenBLAS workers that busy-wait between products) slows its own
            # single-threaded NumPy work (thirteenth session, scikit-learn timed alone at
            # (100000, 8, 8): 163 and 171 ms per iteration, 103 and 107 with one
            # thread), so the tables give the ratio to both.
            runners["sklearn_1"] = sklearn_runner(x, weights, means, covariances, dtype, 1)[0]
            gmmx = gmmx_runner(x, weights, means, covariances, dtype)
            if gmmx is not None:
                runners["gmmx"] = gmmx[0]
            seconds = per_iteration(runners, short, long, repeat)
            ours, sk, expanded = seconds["latentem"], seconds["sklearn"], seconds["expanded"]
            sk1 = seconds["sklearn_1"]
            gx = seconds.get("gmmx")
            our_ll = float(runners["latentem"](long).log_likelihood)
            sk_ll = sk_score(sk_run(long))
            gx_ll = None if gmmx is None else gmmx[1](gmmx[0](long))
            expanded_fit = runners["expanded"](long)
            rows.append(
                {
                    "dtype": np.dtype(dtype).name,
                    "size": (n, d, k),
                    "latentem_ms": 1e3 * ours,
                    "sklearn_ms": 1e3 * sk,
                    "gmmx_ms": None if gx is None else 1e3 * gx,
                    "vs_sklearn": sk / ours,
                    "sklearn_1thread_ms": 1e3 * sk1,
                    "vs_sklearn_1thread": sk1 / ours,
                    "vs_gmmx": None if gx is None else gx / ours,
                    "loglik": (our_ll, sk_ll, gx_ll),
                    "expanded_ms": 1e3 * expanded,
                    "expanded_vs_sklearn": sk / expanded,
                    "expanded_vs_sklearn_1thread": sk1 / expanded,
                    "expanded_vs_gmmx": None if gx is None else gx / expanded,
                    "expanded_loglik": float(expanded_fit.log_likelihood),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| dtype | (n, d, k) | latentem ms/iter | scikit-learn ms/iter | gmmx ms/iter "
        "| vs scikit-learn | vs gmmx | scikit-learn, 1 BLAS thread | vs it |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gmmx_ms = "n/a" if r["gmmx_ms"] is None else f"{r['gmmx_ms']:.2f}"
        vs_gmmx = "n/a" if r["vs_gmmx"] is None else f"{r['vs_gmmx']:.1f}x"
        print(
            f"| {r['dtype']} | {r['size']} | {r['latentem_ms']:.2f} | {r['sklearn_ms']:.2f} | {gmmx_ms} "
            f"| {r['vs_sklearn']:.1f}x | {vs_gmmx} | {r['sklearn_1thread_ms']:.2f} "
            f"| {r['vs_sklearn_1thread']:.1f}x |"
        )
    print()
    print("Final mean log-likelihoods (latentem, scikit-learn, gmmx) agree:")
    for r in rows:
        print(
            f"  {r['dtype']} {r['size']}: "
            + ", ".join("n/a" if v is None else f"{v:.6f}" for v in r["loglik"])
        )
    print()
    print("latentem with moments='expanded' (opt-in on a CPU), same run:")
    print(
        "| dtype | (n, d, k) | ms/iter | vs scikit-learn | vs gmmx "
        "| vs scikit-learn, 1 BLAS thread | final mean log-lik. |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_gmmx = "n/a" if r["expanded_vs_gmmx"] is None else f"{r['expanded_vs_gmmx']:.1f}x"
        print(
            f"| {r['dtype']} | {r['size']} | {r['expanded_ms']:.2f} | {r['expanded_vs_sklearn']:.1f}x "
            f"| {vs_gmmx} | {r['expanded_vs_sklearn_1thread']:.1f}x | {r['expanded_loglik']:.6f} |"
        )


def diagonal_table(sizes, dtypes, short, long, repeat):
    """Diagonal and spherical fits, per iteration: latentem ("auto": on a CPU the
    expanded moments for large float64 fits, the centred ones for float32), latentem
    with moments="centred" and with moments="expanded", and scikit-learn."""
    rows = []
    for dtype in dtypes:
        for n, d, k in sizes:
            x, weights, means, covariances = make_data(n, d, k)
            for covariance_type in ("diag", "spherical"):
                start = (x, weights, means, covariances, dtype)
                runners = {
                    "latentem": latentem_runner(*start, covariance_type=covariance_type),
                    "centred": latentem_runner(*start, "centred", covariance_type=covariance_type),
                    "expanded": latentem_runner(*start, "expanded", covariance_type=covariance_type),
                }
                sk_run, sk_score = sklearn_runner(*start, covariance_type=covariance_type)
                runners["sklearn"] = sk_run
                seconds = per_iteration(runners, short, long, repeat)
                rows.append(
                    {
                        "dtype": np.dtype(dtype).name,
                        "size": (n, d, k),
                        "type": covariance_type,
                        "ms": {name: 1e3 * value for name, value in seconds.items()},
                        "loglik": (
                            *(float(runners[name](long).log_likelihood) for name in ("centred", "expanded")),
                            sk_score(sk_run(long)),
                        ),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| dtype | (n, d, k) | type | latentem (auto) ms/iter | centred | expanded | scikit-learn "
        "| auto vs scikit-learn | expanded vs scikit-learn | expanded vs centred "
        "| final mean log-lik. (centred, expanded, scikit-learn) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"]
        print(
            f"| {r['dtype']} | {r['size']} | {r['type']} | {ms['latentem']:.2f} | {ms['centred']:.2f} "
            f"| {ms['expanded']:.2f} | {ms['sklearn']:.2f} | {ms['sklearn'] / ms['latentem']:.1f}x "
            f"| {ms['sklearn'] / ms['expanded']:.1f}x | {ms['centred'] / ms['expanded']:.1f}x | "
            + ", ".join(f"{v:.6f}" for v in r["loglik"])
            + " |"
        )


def memory_child(n: int, d: int, k: int, iterations: int) -> None:
    """Run one fixed-iteration fit and report peak RSS and XLA's memory analysis (JSON)."""
    import jax
    import jax.numpy as jnp

    import latentem as lem

    key_x, key_init = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (n, d), jnp.float32)
    x.block_until_ready()
    model = lem.gaussian_mixture(k, "full")
    params = model.init(key_init, x[:20000], jnp.ones(20000, jnp.float32))
    jitted = lem.jit(functools.partial(lem.fit_em, model, max_iter=iterations, tol=0.0))
    compiled = jitted.lower(params, x).compile()
    analysis = compiled.memory_analysis()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = compiled(params, x)
    result.log_likelihood.block_until_ready()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "peak_rss": peak,
                "baseline_rss": baseline,
                "xla_temp": getattr(analysis, "temp_size_in_bytes", None),
                "xla_arguments": getattr(analysis, "argument_size_in_bytes", None),
                "xla_output": getattr(analysis, "output_size_in_bytes", None),
                "seconds_per_iteration": seconds / (iterations + 1),
                "status": int(result.status),
            }
        )
    )


def memory_check(n: int, d: int, k: int, iterations: int) -> None:
    output = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), str(d), str(k), str(iterations)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(output.stdout.strip().splitlines()[-1])
    x_bytes = n * d * 4
    responsibilities_bytes = n * k * 4
    budget = 3 * (x_bytes + responsibilities_bytes)
    mib = 2**20
    print(f"Memory, full covariance, float32, (n, d, k) = ({n}, {d}, {k}), {iterations} iterations:")
    print(
        f"  bytes of x {x_bytes / mib:.0f} MiB, "
        f"of the responsibilities {responsibilities_bytes / mib:.0f} MiB"
    )
    print(f"  budget 3 x (x + responsibilities) = {budget / mib:.0f} MiB")
    fit_rss = report["peak_rss"] - report["baseline_rss"] + x_bytes
    print(
        f"  peak resident memory {report['peak_rss'] / mib:.0f} MiB; "
        "before the fit (x already on the device) "
        f"{report['baseline_rss'] / mib:.0f} MiB; the fit's own peak including x: {fit_rss / mib:.0f} MiB "
        f"= {fit_rss / budget:.2f} x budget"
    )
    if report["xla_temp"] is not None:
        xla_total = report["xla_temp"] + report["xla_arguments"] + report["xla_output"]
        print(
            f"  XLA memory analysis: arguments {report['xla_arguments'] / mib:.0f} MiB, temporaries "
            f"{report['xla_temp'] / mib:.0f} MiB, outputs {report['xla_output'] / mib:.0f} MiB, total "
            f"{xla_total / mib:.0f} MiB = {xla_total / budget:.2f} x budget"
        )
    print(f"  {report['seconds_per_iteration']:.2f} s per iteration, status {report['status']}")


def gpu_table(sizes, short, long, repeat):
    import jax

    # For the float64 reference fit only; the timed fits are float32.
    jax.config.update("jax_enable_x64", True)
    device = jax.devices()[0]
    print(f"Device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    print(
        "| (n, d, k) | moments | matmul precision | ms/iter | TFLOP/s (4 n k d^2 per iteration) "
        "| covariances vs float64 | means vs float64 | mean log-lik. vs float64 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, d, k in sizes:
        x, weights, means, covariances = make_data(n, d, k)
        reference = latentem_runner(x, weights, means, covariances, np.float64, "centred")(long)
        for moments in ("centred", "auto", "expanded"):
            for precision in ("default", "highest"):
                with jax.default_matmul_precision(None if precision == "default" else "highest"):
                    run = latentem_runner(x, weights, means, covariances, np.float32, moments)
                    seconds = per_iteration({"latentem": run}, short, long, repeat)["latentem"]
                    fit = run(long)
                errors = [
                    float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))
                    for ours, ref in (
                        (fit.params.covariances, reference.params.covariances),
                        (fit.params.means, reference.params.means),
                    )
                ]
                log_lik = abs(float(fit.log_likelihood) - float(reference.log_likelihood))
                flops = 4 * n * k * d * d
                print(
                    f"| ({n}, {d}, {k}) | {moments} | {precision} | {1e3 * seconds:.2f} "
                    f"| {flops / seconds / 1e12:.1f} | {errors[0]:.1e} | {errors[1]:.1e} | {log_lik:.1e} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--memory", action="store_true", help="run the (1e6, 32, 64) memory check")
    parser.add_argument(
        "--gpu", action="store_true", help="GPU per-iteration times at (1e6, 32, 64) and (1e6, 8, 16)"
    )
    parser.add_argument(
        "--diagonal", action="store_true", help="diagonal and spherical fits against scikit-learn (CPU)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.gpu:
        # --quick: a small run of the same table, on any backend, to try the script first.
        sizes = [(20_000, 8, 4)] if args.quick else [(1_000_000, 32, 64), (1_000_000, 8, 16)]
        gpu_table(sizes, 1 if args.quick else 5, 3 if args.quick else 25, 1 if args.quick else args.repeat)
        return
    if args.memory:
        memory_check(1_000_000, 32, 64, 2)
        return
    import jax

    print(f"CPU: {os.cpu_count()} cores, jax {jax.__version__}, device {jax.devices()[0].device_kind}")
    if args.diagonal:
        if args.quick:
            diagonal_table([(20_000, 8, 8)], [np.float32], 2, 5, 1)
            return
        sizes = [(100_000, 8, 8), (100_000, 32, 16), (100_000, 100, 10)]
        diagonal_table(sizes, [np.float32], 3, 13, args.repeat)
        jax.config.update("jax_enable_x64", True)
        diagonal_table(sizes, [np.float64], 3, 13, args.repeat)
        return
    if args.quick:
        cpu_table([(20_000, 8, 8)], [np.float32], 2, 5, 1)
        return
    # Three fresh processes: a single one moves by 0.3 s with the load of a shared machine.
    runs = [first_fit_compile_time(8, 8) for _ in range(3)]
    fits = sorted(fit for fit, _ in runs)
    with_key = sorted(fit + key for fit, key in runs)
    print(
        "Compile time of the first lem.fit call (n_components=8, n_features=8, 1000 samples, "
        f"3 fresh processes): median {fits[1]:.2f} s ({', '.join(f'{s:.2f}' for s in fits)}; "
        "target 1.5 s); with the process's first jax.random.key(0) in the timed call: "
        f"median {with_key[1]:.2f} s ({', '.join(f'{s:.2f}' for s in with_key)})"
    )
    print()
    sizes = [(100_000, 8, 8), (100_000, 32, 16)]
    cpu_table(sizes, [np.float32], 3, 13, args.repeat)  # before x64: gmmx fails with x64 enabled
    jax.config.update("jax_enable_x64", True)
    cpu_table(sizes, [np.float64], 3, 13, args.repeat)


if __name__ == "__main__":
    main()
