"""latentem.save / latentem.load: plain .npz files, bitwise round trips, clear errors."""

from __future__ import annotations

import inspect
import json
import sys
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal

import latentem as lem
import latentem.models

# Values for the required arguments of the factories in latentem.models.
FACTORY_ARGUMENTS = {"n_components": 2, "n_clusters": 2, "n_categories": 2}


def factories() -> list[str]:
    """Every model factory latentem.models exports: callables whose required arguments
    are sizes and that return a LatentModel (helpers such as ``inertia`` are not)."""
    names = []
    for name in latentem.models.__all__:
        factory = getattr(latentem.models, name)
        if isinstance(factory, type) or not callable(factory):
            continue
        required = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        if set(required) <= set(FACTORY_ARGUMENTS):
            names.append(name)
    return names


def options_for(name: str) -> dict:
    factory = getattr(latentem.models, name)
    required = [
        p.name for p in inspect.signature(factory).parameters.values() if p.default is inspect.Parameter.empty
    ]
    return {argument: FACTORY_ARGUMENTS[argument] for argument in required}


def binary_data(dtype) -> jax.Array:
    # Zeros and ones are valid data for every built-in model (counts, categories coded
    # 0..1, binary features, real values).
    return jnp.asarray(np.random.default_rng(0).integers(0, 2, (30, 4)), dtype)


def test_every_builtin_factory_is_covered():
    # The registry holds at least the Gaussian mixture; the test below covers them all.
    assert "gaussian_mixture" in factories()


@pytest.mark.parametrize("name", factories())
def test_round_trip_is_bitwise_for_every_builtin_model(name, dtype, tmp_path):
    options = options_for(name)
    model = getattr(latentem.models, name)(**options)
    assert isinstance(model, lem.LatentModel)
    x = binary_data(dtype)
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((x.shape[0],), dtype))
    path = tmp_path / f"{name}.npz"
    lem.save(path, {"model": name, "options": options}, params)

    loaded = lem.load(path)
    assert loaded.model is model  # rebuilt from the memoised factory
    assert loaded.description == {"model": name, "options": options}
    assert type(loaded.params) is type(params)
    assert_trees_equal(loaded.params, params)
    for saved, restored in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded.params), strict=True
    ):
        assert restored.dtype == saved.dtype and restored.shape == saved.shape
    # A plain archive: every member reads without pickle.
    with np.load(path, allow_pickle=False) as archive:
        for member in archive.files:
            archive[member]


def test_round_trip_keeps_the_options(dtype, tmp_path):
    options = {
        "n_components": 3,
        "covariance_type": "tied",
        "reg_covar": 1e-4,
        "init": "random",
        "reg_covar_mode": "absolute",
    }
    rng = np.random.default_rng(1)
    params = lem.GaussianMixtureParams(
        jnp.asarray(rng.dirichlet(np.ones(3)), dtype),
        jnp.asarray(rng.normal(size=(3, 2)), dtype),
        jnp.asarray([[2.0, 0.5], [0.5, 1.0]], dtype),
    )
    lem.save(tmp_path / "model.npz", {"model": "gaussian_mixture", "options": options}, params)
    loaded_model, loaded_params, description = lem.load(tmp_path / "model.npz")
    assert loaded_model is lem.gaussian_mixture(**options)
    assert description == {"model": "gaussian_mixture", "options": options}
    assert_trees_equal(loaded_params, params)


def test_file_is_plain_npz_with_json_metadata(tmp_path):
    params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.zeros((1, 2)), jnp.ones((1, 2)))
    path = tmp_path / "exact-name.data"  # written as given: no suffix added
    lem.save(
        path, {"model": "gaussian_mixture", "options": {"n_components": 1, "covariance_type": "diag"}}, params
    )
    with zipfile.ZipFile(path) as archive:
        members = sorted(archive.namelist())
        metadata = json.loads(str(np.load(path, allow_pickle=False)["__latentem_metadata__"]))
    assert members == [
        "__latentem_metadata__.npy",
        "params.covariances.npy",
        "params.means.npy",
        "params.weights.npy",
    ]
    assert metadata["format"] == "latentem-params" and metadata["format_version"] == 1
    assert metadata["model"] == "gaussian_mixture"
    assert metadata["params"]["type"] == "latentem.models.gaussian_mixture:GaussianMixtureParams"
    assert list(metadata["params"]["fields"]) == ["weights", "means", "covariances"]


def rewrite_metadata(path, change) -> None:
    with np.load(path, allow_pickle=False) as archive:
        members = {name: archive[name] for name in archive.files}
    metadata = json.loads(str(members["__latentem_metadata__"]))
    change(metadata)
    members["__latentem_metadata__"] = np.array(json.dumps(metadata))
    with open(path, "wb") as handle:
        np.savez(handle, **members)


def test_unknown_format_version_is_rejected_clearly(tmp_path):
    params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)))
    path = tmp_path / "future.npz"
    lem.save(path, {"model": "gaussian_mixture", "options": {"n_components": 1}}, params)
    rewrite_metadata(path, lambda metadata: metadata.update(format_version=99))
    with pytest.raises(ValueError, match=r"format version 99.*reads version 1"):
        lem.load(path)


def test_other_files_are_rejected_clearly(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a latentem parameter file"):
        lem.load(tmp_path / "plain.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a latentem parameter file"):
        lem.load(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError):
        lem.load(tmp_path / "missing.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))  # NumPy's other format: a bare array
    with pytest.raises(ValueError, match=r"not a latentem parameter file: it is not an \.npz archive"):
        lem.load(tmp_path / "array.npy")


DAMAGES = {
    "no model": lambda metadata: metadata.pop("model"),
    "no options": lambda metadata: metadata.pop("options"),
    "no params": lambda metadata: metadata.pop("params"),
    "params not a table": lambda metadata: metadata.update(params=[1, 2]),
    "no fields": lambda metadata: metadata["params"].pop("fields"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_metadata_is_a_value_error(damage, tmp_path):
    params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)))
    path = tmp_path / "model.npz"
    lem.save(path, {"model": "gaussian_mixture", "options": {"n_components": 1}}, params)
    rewrite_metadata(path, DAMAGES[damage])
    with pytest.raises(ValueError, match=r"model\.npz is damaged"):
        lem.load(path)


def test_loading_imports_no_module_named_by_the_file(tmp_path):
    # A file naming latentem.__main__ (the command line) as its parameters' module: were
    # it imported, it would fit Old Faithful and exit the process.
    params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)))
    path = tmp_path / "model.npz"
    lem.save(path, {"model": "gaussian_mixture", "options": {"n_components": 1}}, params)
    for module in ("latentem.__main__", "latentem.sklearn", "latentem.no_such_module"):
        rewrite_metadata(
            path,
            lambda metadata, module=module: metadata["params"].update(type=f"{module}:GaussianMixtureParams"),
        )
        was_imported = module in sys.modules
        _, loaded, _ = lem.load(path)
        assert (module in sys.modules) == was_imported
        assert type(loaded).__name__ == "GaussianMixtureParams" and loaded._fields == params._fields
        np.testing.assert_array_equal(loaded.covariances, params.covariances)


def test_save_checks_description_and_params(tmp_path):
    params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)))
    with pytest.raises(ValueError, match="does not accept the options"):
        lem.save(tmp_path / "a.npz", {"model": "gaussian_mixture", "options": {"n_components": 0}}, params)
    with pytest.raises(ValueError, match="needs 'model'"):
        lem.save(tmp_path / "a.npz", {"options": {}}, params)
    with pytest.raises(ValueError, match="must be a number, string"):
        lem.save(
            tmp_path / "a.npz", {"model": "gaussian_mixture", "options": {"n_components": object()}}, params
        )
    with pytest.raises(ValueError, match="only numeric arrays"):
        lem.save(tmp_path / "a.npz", "mine", {"names": np.array(["a", "b"])})
    # Parameters of another model than the described one: a file that would load wrong.
    for options in ({"n_components": 2}, {"n_components": 1, "covariance_type": "diag"}):
        with pytest.raises(ValueError, match=r"not those of the described model.*params.* has shape"):
            lem.save(tmp_path / "a.npz", {"model": "gaussian_mixture", "options": options}, params)
    with pytest.raises(
        ValueError,
        match=r"not those of the described model.*parameters of kmeans\(1\), with fields centres, variance; "
        "got a GaussianMixtureParams",
    ):
        lem.save(tmp_path / "a.npz", {"model": "kmeans", "options": {"n_clusters": 1}}, params)
    assert not (tmp_path / "a.npz").exists()


class MyParams(NamedTuple):
    rates: jax.Array
    extra: tuple


def test_own_model_round_trips_without_importing_its_module(tmp_path):
    params = MyParams(jnp.arange(3.0), (jnp.ones((2, 2), jnp.int32), None))
    lem.save(tmp_path / "mine.npz", {"model": "my_model", "options": {"sizes": (2, 3)}}, params)
    model, loaded, description = lem.load(tmp_path / "mine.npz")
    assert model is None  # not a latentem factory: rebuild it from the description
    assert description == {"model": "my_model", "options": {"sizes": [2, 3]}}
    # The class lives outside latentem, so it is not imported: a namedtuple with the
    # same name and fields comes back.
    assert type(loaded).__name__ == "MyParams" and loaded._fields == ("rates", "extra")
    np.testing.assert_array_equal(loaded.rates, params.rates)
    np.testing.assert_array_equal(loaded.extra[0], params.extra[0])
    assert loaded.extra[1] is None and loaded.extra[0].dtype == jnp.int32
