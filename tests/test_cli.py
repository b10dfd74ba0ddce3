"""The command line, run as a subprocess: default data, a CSV, --select, --output, --plot,
progress, and a one-line error with a non-zero exit for every bad input.

Each subprocess pays for importing JAX and compiling, so the checks are grouped into
few invocations; the numbers they print are checked against scikit-learn and SciPy.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import blobs
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as ReferenceMixture

from latentem.cli import Progress
from latentem.datasets import load_faithful, read_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*arguments: str, cwd) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "latentem", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=300,
    )


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    """Three well-separated clusters in two named columns."""
    path = tmp_path_factory.mktemp("cli") / "clusters.csv"
    x = blobs(3, n_per_cluster=50)
    lines = ["length,width", *(f"{a:.6f},{b:.6f}" for a, b in x)]
    path.write_text("\n".join(lines) + "\n")
    return path


def log_joint(document: dict, x: np.ndarray) -> np.ndarray:
    """log p(x_n, z_n = k) from the JSON params with SciPy, any covariance type."""
    params = document["params"]
    weights = np.asarray(params["weights"])
    means = np.asarray(params["means"])
    covariances = np.asarray(params["covariances"])
    covariance_type = document["model"]["options"]["covariance_type"]
    columns = []
    for k in range(weights.shape[0]):
        if covariance_type == "full":
            covariance = covariances[k]
        elif covariance_type == "tied":
            covariance = covariances
        elif covariance_type == "diag":
            covariance = np.diag(covariances[k])
        else:
            covariance = covariances[k] * np.eye(x.shape[1])
        columns.append(np.log(weights[k]) + multivariate_normal(means[k], covariance).logpdf(x))
    return np.stack(columns, axis=1)


def check_document(document: dict, x: np.ndarray) -> None:
    """The JSON's log-likelihood, BIC, AIC and labels agree with its params (SciPy)."""
    joint = log_joint(document, x)
    per_sample = logsumexp(joint, axis=1)
    n_samples, n_features = x.shape
    k = len(document["params"]["weights"])
    covariance_count = {
        "full": k * n_features * (n_features + 1) // 2,
        "tied": n_features * (n_features + 1) // 2,
        "diag": k * n_features,
        "spherical": k,
    }[document["model"]["options"]["covariance_type"]]
    n_parameters = covariance_count + k * n_features + k - 1
    total = per_sample.sum()
    assert document["data"]["n_samples"] == n_samples and document["data"]["n_features"] == n_features
    np.testing.assert_allclose(document["log_likelihood"], total / n_samples, rtol=1e-5)
    np.testing.assert_allclose(document["bic"], -2 * total + n_parameters * np.log(n_samples), rtol=1e-5)
    np.testing.assert_allclose(document["aic"], -2 * total + 2 * n_parameters, rtol=1e-5)
    np.testing.assert_array_equal(document["labels"], np.argmax(joint, axis=1))
    assert document["status"] == "CONVERGED" and document["converged"] is True


def test_default_data_with_no_arguments(tmp_path):
    completed = run_cli(cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "data: Old Faithful (embedded), 272 samples x 2 features" in out
    assert re.search(r"component\s+weight\s+mean eruptions\s+mean waiting", out)
    assert re.search(r"status\s+CONVERGED", out)
    printed = float(re.search(r"mean log-likelihood\s+(-?\d+\.\d+)", out).group(1))
    reference = ReferenceMixture(2, n_init=5, tol=1e-8, max_iter=500, random_state=0).fit(load_faithful())
    np.testing.assert_allclose(printed, reference.score(load_faithful()), rtol=1e-5)


def test_csv_with_select_output_and_plot(csv_file, tmp_path):
    completed = run_cli(
        "fit",
        str(csv_file),
        "--select",
        "1-3",
        "--covariance-type",
        "diag",
        "--n-init",
        "2",
        "--seed",
        "1",
        "--output",
        "result.json",
        "--plot",
        "figure.png",
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert "data: " + str(csv_file) + ", 150 samples x 2 features" in completed.stdout
    assert re.search(r"n_components\s+BIC", completed.stdout)
    assert re.search(r"^\s+3 .*<- lowest BIC$", completed.stdout, flags=re.MULTILINE)

    document = json.loads((tmp_path / "result.json").read_text())
    x = np.loadtxt(csv_file, delimiter=",", skiprows=1)
    assert document["data"]["columns"] == ["length", "width"]
    assert document["model"] == {
        "model": "gaussian_mixture",
        "options": {"n_components": 3, "covariance_type": "diag"},
    }
    check_document(document, x)
    selection = document["selection"]
    assert selection["candidates"] == [1, 2, 3] and selection["best"] == 3
    assert int(np.argmin(selection["score"])) == 2
    np.testing.assert_allclose(selection["score"][2], document["bic"], rtol=1e-6)
    # The selection's BIC of each candidate from its log-likelihood and parameter count.
    expected = [
        -2 * ll * x.shape[0] + p * np.log(x.shape[0])
        for ll, p in zip(selection["log_likelihood"], selection["n_parameters"], strict=True)
    ]
    np.testing.assert_allclose(selection["score"], expected, rtol=1e-5)

    png = (tmp_path / "figure.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_missing_file_exits_non_zero_with_one_line(tmp_path):
    completed = run_cli("fit", "no-such-file.csv", cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.strip().splitlines() == ["error: no such file: no-such-file.csv"]


# Every bad input, run through the command line's main() in one subprocess (one JAX
# import for all), plus a single fit with --progress on, --output and --plot.
DRIVER = """
import contextlib, io, json, sys
from latentem.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)  # an exception here fails the test with its traceback
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_bad_inputs_give_one_line_errors_and_a_fit_reports_progress(csv_file, tmp_path):
    files = {
        "text.csv": "a,b\n1.0,2.0\n3.0,abc\n",
        "missing_value.csv": "a,b\n1.0,2.0\n3.0,\n5.0,6.0\n",
        "nan.csv": "a,b\n1.0,nan\n3.0,4.0\n5.0,6.0\n",
        "short.csv": "a,b\n1.0,2.0\n3.0,4.0\n",
        "header_only.csv": "a,b\n",
        "semicolons.csv": "a;b\n1;2\n3;4\n",
        "blank_lines.csv": "a,b\n\n1,2\n\n3,\n5,6\n",
        "no_header_nan.csv": "1.0,2.0\nnan,4.0\n5.0,6.0\n",
        "one_column.csv": "duration\n"
        + "".join(f"{2.0 + 0.1 * (i % 5) + 3.0 * (i % 2)}\n" for i in range(40)),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [
        (["fit", "absent.csv"], r"no such file: absent\.csv"),
        (["fit", "text.csv"], r"line 3, column 'b': 'abc' is not a number"),
        (["fit", "missing_value.csv"], r"1 row\(s\) with missing, NaN or infinite values \(line 3"),
        (["fit", "nan.csv"], r"missing, NaN or infinite values \(line 2; column 'b'\)"),
        (
            ["fit", "short.csv", "--n-components", "3"],
            r"has 2 row\(s\) but --n-components 3 needs at least 3",
        ),
        (["fit", "short.csv", "--select", "1-5"], r"--select 5 needs at least 5"),
        (["fit", "header_only.csv"], r"has no data rows"),
        (["fit", "semicolons.csv"], r"line 2, column 'a;b': '1;2' is not a number.*must be comma-separated"),
        (["fit", "blank_lines.csv"], r"values \(line 5; column 'b'\)"),  # blank lines counted
        (["fit", "no_header_nan.csv"], r"values \(line 2; column '1'\)"),
        (["--covariance-type", "round"], r"argument --covariance-type: invalid choice: 'round'"),
        (["--n-components", "0"], r"--n-components must be at least 1; got 0"),
        (["--n-components", "two"], r"argument --n-components/-k: invalid int value: 'two'"),
        (["--select", "5-2"], r"--select needs numbers of components >= 1 with A <= B"),
        (["--select", "a-b"], r"--select takes a range A-B"),
        (["-k", "2", "--select", "1-3"], r"not allowed with argument"),
        (["--n-init", "0"], r"--n-init must be at least 1"),
        (["--tol", "-1"], r"--tol must be non-negative"),
        (["--output", "no/such/folder/result.json"], r"the folder no/such/folder does not exist"),
        (["--bogus"], r"unrecognized arguments: --bogus"),
        (["fit", "a.csv", "b.csv"], r"unrecognized arguments: b\.csv"),
        (["--seed", str(2**64)], r"--seed must be an integer from 0 to 4294967295; got 18446744073709551616"),
        (["--seed", "-1"], r"--seed must be an integer from 0 to 4294967295"),
    ]
    if not jax.config.jax_enable_x64:  # 5e38 is finite in the file, infinite in float32
        (tmp_path / "huge.csv").write_text("a,b\n1.0,2.0\n3.0,5e38\n5.0,6.0\n-4e38,1.0\n")
        cases.append(
            (
                ["fit", "huge.csv"],
                r"2 row\(s\) with values beyond float32's range.*\(line 3, 5; column 'a', 'b'\)",
            )
        )
    fit = ["fit", str(csv_file), "-k", "3", "--progress", "on", "--output", "one.json", "--plot", "one.png"]
    one_column = ["fit", "one_column.csv", "-k", "2", "--plot", "one_column.png"]
    argvs = [argv for argv, _ in cases] + [fit, one_column]
    completed = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)

    for (argv, pattern), result in zip(cases, results, strict=False):
        lines = result["stderr"].splitlines()
        assert result["code"] == 2, (argv, result)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
        assert re.search(pattern, lines[0]), (argv, lines[0])
        assert "Traceback" not in result["stderr"] and result["stdout"] == ""

    fitted = results[-2]
    assert fitted["code"] == 0, fitted["stderr"]
    # --progress on: lines from inside the compiled loop, iteration numbers in range.
    progress = [line for line in fitted["stderr"].splitlines() if line.startswith("iteration ")]
    assert progress and all(
        re.fullmatch(r"iteration \d+/200, mean log-likelihood -?\d+\.\d+", p) for p in progress
    )
    document = json.loads((tmp_path / "one.json").read_text())
    x = np.loadtxt(csv_file, delimiter=",", skiprows=1)
    check_document(document, x)
    assert document["n_iter"] >= 1 and "selection" not in document
    assert f"iterations           {document['n_iter']}" in fitted["stdout"]
    assert (tmp_path / "one.png").read_bytes().startswith(PNG_SIGNATURE)

    # One column: the plot still has its clusters panel (a histogram) beside the history,
    # so it is two panels of 5.5 inches at 120 dots per inch wide.
    assert results[-1]["code"] == 0, results[-1]["stderr"]
    png = (tmp_path / "one_column.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert int.from_bytes(png[16:20], "big") == 2 * 5.5 * 120  # the IHDR width


def test_csv_with_or_without_header_row(tmp_path):
    """A first row of numbers is data (np.savetxt writes no header); any other is the header."""
    x = np.random.default_rng(0).normal(size=(7, 3))
    np.savetxt(tmp_path / "plain.csv", x, delimiter=",")
    data, names = read_csv(tmp_path / "plain.csv")
    np.testing.assert_array_equal(data, np.loadtxt(tmp_path / "plain.csv", delimiter=","))
    assert names == ["1", "2", "3"] and data.shape == (7, 3)
    # A missing value in a first row of numbers leaves it data (the fit then names the row).
    (tmp_path / "gap.csv").write_text("1.5,,2\n3,4,5\n")
    data, names = read_csv(tmp_path / "gap.csv")
    assert names == ["1", "2", "3"] and data.shape == (2, 3) and np.isnan(data[0, 1])
    # A byte-order mark, as spreadsheets write "CSV UTF-8", belongs to no cell.
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    data, names = read_csv(tmp_path / "bom.csv")
    assert names == ["1", "2", "3"] and data.shape == (7, 3)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfa,b,c\n" + (tmp_path / "plain.csv").read_bytes())
    data, names = read_csv(tmp_path / "bom.csv")
    assert names == ["a", "b", "c"] and data.shape == (7, 3)
    for header in ("a,b,c", "1,b,3", "x1, x2 ,x3"):
        (tmp_path / "named.csv").write_text(header + "\n" + (tmp_path / "plain.csv").read_text())
        data, names = read_csv(tmp_path / "named.csv")
        np.testing.assert_array_equal(data, np.loadtxt(tmp_path / "plain.csv", delimiter=","))
        assert names == [name.strip() for name in header.split(",")]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_display_handles_batched_calls_and_erases_itself():
    stream = FakeTerminal()
    progress = Progress(stream, max_iter=50, delay=0.0, interval=0.0)
    progress(np.int32(0), np.float32(-3.0))
    # Restarts under vmap: one call per restart, or batched arrays; the furthest wins.
    progress(np.array([2, 5, 3]), np.array([-2.5, -2.0, -2.2]))
    progress(np.int32(4), np.float32(-2.1))  # a frozen restart lagging behind
    text = stream.getvalue()
    assert "\riteration 0/50, mean log-likelihood -3.000000" in text
    assert text.rstrip().endswith("iteration 5/50, mean log-likelihood -2.000000")
    progress.close()
    assert stream.getvalue().endswith("\r")
    # Nothing shows before the delay.
    quiet = FakeTerminal()
    Progress(quiet, max_iter=50, delay=60.0)(np.int32(1), np.float32(-1.0))
    assert quiet.getvalue() == ""
