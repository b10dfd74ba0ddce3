"""Saving and loading fitted parameters with the description of their model.

A file is a plain NumPy ``.npz`` archive: one array per parameter leaf, plus one
string array holding JSON metadata (the file format and its version, the model's
factory name and options, and the structure of the parameter tree: NamedTuple types
and field names, dtypes and shapes). Nothing is pickled, so loading a file never runs
code from it; :func:`load` reads it with ``allow_pickle=False``.

The model is described by the factory that built it, e.g.
``{"model": "gaussian_mixture", "options": {"n_components": 3, "covariance_type": "diag"}}``;
:func:`load` rebuilds it by calling that factory from :mod:`latentem.models`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections import namedtuple
from collections.abc import Mapping
from typing import Any, BinaryIO, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentem._base import LatentModel, Params

FORMAT_NAME = "latentem-params"
FORMAT_VERSION = 1
# The archive member that holds the metadata; parameter leaves live under "params.*".
_METADATA_KEY = "__latentem_metadata__"
_PARAMS_PREFIX = "params"


class SavedModel(NamedTuple):
    """What :func:`load` returns.

    Attributes:
      model: the :class:`~latentem.LatentModel` rebuilt from its factory in
        :mod:`latentem.models`, or ``None`` when the file names a model that is not
        one of latentem's factories (a model of your own: rebuild it from
        ``description``).
      params: the parameters, the same pytree (NamedTuple type, field names, dtypes,
        shapes and bits) as was saved, with JAX arrays as leaves.
      description: the model description, ``{"model": name, "options": {...}}``.
    """

    model: LatentModel | None
    params: Params
    description: dict[str, Any]


# ---------------------------------------------------------------------------
# Model descriptions and the factory registry
# ---------------------------------------------------------------------------


def _factory(name: str) -> Any | None:
    """The factory called ``name`` in :mod:`latentem.models`, or ``None``."""
    models = importlib.import_module("latentem.models")
    if name not in getattr(models, "__all__", ()):
        return None
    factory = getattr(models, name, None)
    if not callable(factory) or isinstance(factory, type):
        return None
    return factory


def _check_option(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data (tuples become lists), or raise."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite to be saved; got {value!r}.")
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_check_option(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise ValueError(
        f"{where} must be a number, string, bool, None or a list of those to be saved; "
        f"got {type(value).__name__}."
    )


def _to_hashable(value: Any) -> Any:
    """JSON lists back to tuples, so that memoised factories can hash the options."""
    if isinstance(value, list):
        return tuple(_to_hashable(item) for item in value)
    return value


def _normalise_description(description: Any) -> dict[str, Any]:
    """Check a model description and return it as ``{"model": str, "options": dict}``."""
    if isinstance(description, str):
        description = {"model": description}
    if not isinstance(description, Mapping):
        raise ValueError(
            "the model description must be a dict such as "
            '{"model": "gaussian_mixture", "options": {"n_components": 3}}; '
            f"got {type(description).__name__}."
        )
    unknown = sorted(set(description) - {"model", "options"})
    if unknown:
        raise ValueError(f"the model description has unknown keys {unknown}; use 'model' and 'options'.")
    name = description.get("model")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "the model description needs 'model', the name of the model's factory "
            f"(e.g. 'gaussian_mixture'); got {name!r}."
        )
    options = description.get("options", {})
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise ValueError("the model description's 'options' must be a dict with string keys.")
    options = {key: _check_option(value, f"option {key!r}") for key, value in options.items()}
    return {"model": name, "options": options}


def _build_model(description: dict[str, Any]) -> LatentModel | None:
    """Call the described factory; ``None`` when it is not one of latentem's."""
    factory = _factory(description["model"])
    if factory is None:
        return None
    options = {key: _to_hashable(value) for key, value in description["options"].items()}
    try:
        model = factory(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"latentem.models.{description['model']} does not accept the options {options}: {error}"
        ) from None
    if not isinstance(model, LatentModel):
        raise ValueError(f"latentem.models.{description['model']} is not a model factory.")
    return model


# ---------------------------------------------------------------------------
# Parameter trees <-> arrays plus a JSON structure
# ---------------------------------------------------------------------------


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON structure of a parameter tree; its leaves go into ``arrays``."""
    if value is None:
        return {"kind": "none"}
    if _is_namedtuple(value):
        kind = type(value)
        return {
            "kind": "namedtuple",
            "type": f"{kind.__module__}:{kind.__qualname__}",
            "fields": {
                name: _encode(child, f"{path}.{name}", arrays)
                for name, child in zip(kind._fields, value, strict=True)
            },
        }
    if isinstance(value, (tuple, list)):
        return {
            "kind": type(value).__name__,
            "items": [_encode(child, f"{path}.{index}", arrays) for index, child in enumerate(value)],
        }
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) and key.isidentifier() for key in value):
            raise ValueError(f"{path}: dict keys in parameters must be identifiers to be saved.")
        return {
            "kind": "dict",
            "items": {key: _encode(child, f"{path}.{key}", arrays) for key, child in value.items()},
        }
    if isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            raise ValueError(f"{path} is a PRNG key; store jax.random.key_data(key) instead.")
        array = np.asarray(value)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_ or array.dtype.kind == "V"):
            raise ValueError(f"{path} has dtype {array.dtype}; only numeric arrays can be saved.")
        arrays[path] = array
        return {"kind": "array", "dtype": jnp.dtype(array.dtype).name, "shape": list(array.shape)}
    raise ValueError(
        f"{path} is a {type(value).__name__}; parameters must be NamedTuples (or tuples, lists, "
        "dicts) of arrays."
    )


def _params_type(spec: str, fields: list[str]) -> type:
    """The NamedTuple class named in a file.

    Classes are looked up only in latentem's modules that are already imported: loading
    imports nothing, since importing a module named by the file runs its code (even
    ``latentem.__main__`` would run the command line). Other types come back as a plain
    namedtuple with the same name and fields.
    """
    module_name, _, qualname = spec.partition(":")
    if module_name == "latentem" or module_name.startswith("latentem."):
        kind: Any = sys.modules.get(module_name)
        for part in qualname.split("."):
            kind = getattr(kind, part, None)
        if (
            isinstance(kind, type)
            and issubclass(kind, tuple)
            and list(getattr(kind, "_fields", ())) == fields
        ):
            return kind
    name = qualname.rpartition(".")[2]
    return namedtuple(name if name.isidentifier() else "Params", fields)


def _decode(spec: dict[str, Any], path: str, archive: Any) -> Any:
    kind = spec.get("kind")
    if kind == "none":
        return None
    if kind == "namedtuple":
        fields = list(spec["fields"])
        children = [_decode(child, f"{path}.{name}", archive) for name, child in spec["fields"].items()]
        return _params_type(spec["type"], fields)(*children)
    if kind in ("tuple", "list"):
        children = [_decode(child, f"{path}.{index}", archive) for index, child in enumerate(spec["items"])]
        return tuple(children) if kind == "tuple" else children
    if kind == "dict":
        return {key: _decode(child, f"{path}.{key}", archive) for key, child in spec["items"].items()}
    if kind == "array":
        if path not in archive.files:
            raise ValueError(f"the file is damaged: the array {path} is missing.")
        array = archive[path]
        dtype = jnp.dtype(spec["dtype"])
        if array.dtype != dtype:
            # Extended dtypes such as bfloat16 are stored as raw bytes of the same width.
            array = array.view(dtype)
        if list(array.shape) != spec["shape"]:
            raise ValueError(
                f"the file is damaged: {path} has shape {array.shape}, expected {spec['shape']}."
            )
        return jnp.asarray(array)
    raise ValueError(f"the file is damaged: unknown entry {kind!r} at {path}.")


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def save(path: str | os.PathLike | BinaryIO, model_description: Any, params: Params) -> None:
    """Save fitted parameters and the description of their model to a ``.npz`` file.

    The file is a plain NumPy archive (no pickle): each parameter array is stored
    bit for bit with its dtype and shape, and a JSON metadata entry records the file
    format version, the model (factory name and options) and the parameter tree
    (NamedTuple types and field names). :func:`load` gives back the same parameters,
    bitwise, and the model rebuilt from its factory.

    Args:
      path: file name (written as given, no suffix is added) or a binary file object.
      model_description: the model's factory in :mod:`latentem.models` and its
        options, ``{"model": "gaussian_mixture", "options": {"n_components": 3}}``
        (a bare name means no options). The options must be JSON data (numbers,
        strings, bools, None, lists); when the name is one of latentem's factories
        they are checked by building the model now. Any other name is saved as is,
        for a model of your own that you rebuild after loading.
      params: the parameter pytree, e.g. ``result.params``: NamedTuples (or tuples,
        lists, dicts) of numeric arrays.

    Raises:
      ValueError: the description or the options are invalid, the parameters are not
        those of the described latentem model (another number of components, say), or
        they hold something other than numeric arrays.

    Example:
      >>> import io, jax, latentem as lem
      >>> x = lem.datasets.load_faithful()
      >>> description = {"model": "gaussian_mixture", "options": {"n_components": 2}}
      >>> model = lem.gaussian_mixture(**description["options"])
      >>> result = lem.fit(model, jax.random.key(0), x)
      >>> buffer = io.BytesIO()
      >>> lem.save(buffer, description, result.params)
      >>> _ = buffer.seek(0)
      >>> loaded = lem.load(buffer)
      >>> loaded.model is model, bool((loaded.params.means == result.params.means).all())
      (True, True)
    """
    description = _normalise_description(model_description)
    model = _build_model(description)
    if model is not None and model.n_parameters is not None:
        # The built-in models check the parameters' shapes in every function that
        # takes them; n_parameters is the one that computes nothing with them.
        try:
            model.n_parameters(params)
        except (AttributeError, TypeError, ValueError) as error:
            raise ValueError(
                f"the parameters are not those of the described model {description}: {error}"
            ) from None
    arrays: dict[str, np.ndarray] = {}
    structure = _encode(params, _PARAMS_PREFIX, arrays)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "latentem_version": importlib.import_module("latentem").__version__,
        "model": description["model"],
        "options": description["options"],
        "params": structure,
    }
    text = json.dumps(metadata, allow_nan=False)
    if isinstance(path, (str, os.PathLike)):
        with open(path, "wb") as handle:
            np.savez(handle, **{_METADATA_KEY: np.array(text)}, **arrays)
    else:
        np.savez(path, **{_METADATA_KEY: np.array(text)}, **arrays)


def load(path: str | os.PathLike | BinaryIO) -> SavedModel:
    """Load parameters saved by :func:`save`, and rebuild their model.

    The archive is read with ``allow_pickle=False``. Parameter arrays come back as
    JAX arrays with the saved dtype and bits (under JAX's default 32-bit mode a
    float64 file gives float32 arrays, as any float64 array handed to JAX does).

    Args:
      path: file name or binary file object.

    Returns:
      A :class:`SavedModel` ``(model, params, description)``; ``model`` is ``None``
      when the file names a model that is not one of latentem's factories.

    Raises:
      ValueError: the file is not a latentem parameter file, is damaged, or was
        written in a format version this version of latentem does not read (the
        message says which version it has and which this one reads).

    Example:
      >>> import io, jax.numpy as jnp, latentem as lem
      >>> params = lem.GaussianMixtureParams(jnp.array([1.0]), jnp.zeros((1, 2)), jnp.ones((1, 2)))
      >>> buffer = io.BytesIO()
      >>> lem.save(buffer, {"model": "gaussian_mixture",
      ...                   "options": {"n_components": 1, "covariance_type": "diag"}}, params)
      >>> _ = buffer.seek(0)
      >>> model, loaded, description = lem.load(buffer)
      >>> type(loaded).__name__, description["options"]["covariance_type"]
      ('GaussianMixtureParams', 'diag')
    """
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "the file"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{name} is not a latentem parameter file (.npz): {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a .npy file gives a bare array
        raise ValueError(f"{name} is not a latentem parameter file: it is not an .npz archive.")
    with archive:
        if _METADATA_KEY not in archive.files:
            raise ValueError(f"{name} is not a latentem parameter file: it has no latentem metadata.")
        try:
            metadata = json.loads(str(archive[_METADATA_KEY][()]))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{name} is damaged: its metadata is not valid JSON ({error}).") from None
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{name} is not a latentem parameter file.")
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{name} was written in latentem file format version {version!r}, but this "
                f"version of latentem ({importlib.import_module('latentem').__version__}) reads "
                f"version {FORMAT_VERSION} only. Load it with the latentem version that wrote it "
                f"({metadata.get('latentem_version', 'unknown')}), or upgrade latentem."
            )
        try:
            description = _normalise_description({"model": metadata["model"], "options": metadata["options"]})
            params = _decode(metadata["params"], _PARAMS_PREFIX, archive)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(
                f"{name} is damaged: an entry of its metadata is missing or malformed ({error!r})."
            ) from None
    return SavedModel(model=_build_model(description), params=params, description=description)
